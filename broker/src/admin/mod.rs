//! The admin surface: an HTTP server on its own thread (the `admin` thread)
//! serving `/metrics`, `/health`, `/ready` and the JSON API under `/api/v1/`
//! (`docs/ADMIN_API.md`).
//!
//! Lifecycle: `main` binds the admin listener before the shards boot (a busy
//! port fails start-up early), [`spawn`] starts the thread once the shards
//! run, and the thread lives until the process exits. It never touches shard
//! state: it asks the shards by message ([`shard_call`]) and waits with a
//! timeout, so a scrape or a listing never blocks a shard, and a stuck shard
//! costs a 503, not a hung admin port.
//!
//! Bounds: [`CONNECTIONS_MAX`] requests served at once (one short-lived
//! thread each; more get 503 at once), [`http::REQUEST_HEAD_BYTES_MAX`] per
//! request head, [`IO_TIMEOUT`] per read or write, pages of at most
//! `tessera_shard::admin::PAGE_LIMIT_MAX` items.
//!
//! Modules: [`http`] (request parsing, responses, the client `brokerctl`
//! uses), [`api`] (routes, token check, JSON), [`cluster`] (the
//! `/api/v1/cluster` endpoints and cluster metrics), [`metrics`] (Prometheus
//! export), [`process`] (`process_*` metrics), [`shard_call`] (the messages
//! to shards and the shard-side handler).

pub mod api;
pub mod client;
pub mod cluster;
pub mod http;
pub mod metrics;
pub mod process;
pub mod shard_call;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tracing::{debug, info, warn};

use api::AdminState;
use http::Response;

/// Requests served at once.
pub const CONNECTIONS_MAX: usize = 16;

/// Longest wait for a client's request bytes or for it to take the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the admin thread on `listener`; returns its address.
pub fn spawn(listener: TcpListener, state: AdminState) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let state = Arc::new(state);
    info!(
        %addr,
        token_required = state.token.is_some(),
        "admin API listening"
    );
    std::thread::Builder::new()
        .name("admin".to_owned())
        .spawn(move || accept_loop(listener, state))?;
    Ok(addr)
}

fn accept_loop(listener: TcpListener, state: Arc<AdminState>) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!("admin accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        if active.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
            let _ = Response::error(503, "busy", "too many admin requests at once; retry")
                .write_to(&stream);
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (state, active2) = (state.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("admin-request".to_owned())
            .spawn(move || {
                serve(&stream, &state);
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            warn!("cannot start an admin request thread: {e}");
        }
    }
}

fn serve(stream: &TcpStream, state: &AdminState) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let response = match http::read_request(stream) {
        Ok(req) => {
            #[cfg(feature = "fault-injection")]
            crate::fatal::fault::on_admin_request(&format!("/{}", req.segments.join("/")));
            let resp = api::handle(state, &req);
            // The path may name a ClientID; the token is never logged.
            debug!(method = %req.method, path = ?req.segments, status = resp.status, "admin");
            resp
        }
        Err(http::RequestError::Io(e)) => {
            debug!("admin request not read: {e}");
            return;
        }
        Err(http::RequestError::TooLarge) => {
            Response::error(413, "too_large", "request head too large")
        }
        Err(e) => Response::error(400, "bad_request", e.to_string()),
    };
    if let Err(e) = response.write_to(stream) {
        debug!("admin response not written: {e}");
    }
}
