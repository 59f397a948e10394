//! The bridge's QUIC transport (`transport = "quic"`): MQTT over one
//! bidirectional QUIC stream (ALPN `mqtt`, TLS 1.3), as a `quic` listener
//! serves it (single-stream mode).
//!
//! quinn needs a tokio runtime and `Send` sockets, which a glommio shard has
//! not, so the QUIC work runs where the `quic` listener runs its own
//! (`crate::quic`): on a thread with a current-thread tokio runtime. One such
//! thread, started at the first QUIC bridge connect, holds a client endpoint
//! per address family for every QUIC bridge of the process. A bridge task on
//! its shard asks it for a connection and gets back the shard's end of a
//! [`QuicPipe`] (`crate::transport::quic`, the same pipe a listener's
//! connection has): bounded channels of byte chunks, polled without blocking
//! the shard; the thread carries the bytes between the pipe and the stream.
//!
//! Liveness: the connection's QUIC idle timeout is the bridge's keep alive
//! (30 s without one) and the client pings at a third of it, so a healthy
//! link never idles out and a remote that vanished (killed: no close, and a
//! restarted remote's stateless reset cannot be verified) ends the link
//! within the keep alive; the bridge then reconnects after its back-off.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tracing::debug;

use crate::config::BridgeConfig;
use crate::quic::{
    CLOSE_LINGER, PIPE_IN_CHUNKS, PIPE_OUT_BYTES_MAX, READ_CHUNK_BYTES_MAX, runtime_thread,
};
use crate::transport::quic::{QuicPipe, QuicPipeEnd, close_code};

/// Connect requests waiting for the client thread.
const REQUESTS_QUEUED_MAX: usize = 64;

/// The QUIC idle timeout of a bridge without keep alive.
const IDLE_WITHOUT_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// The quinn client configuration of bridge `c`: its TLS settings
/// (`tls`, from [`super::stream::tls_config`]) with ALPN `mqtt`, and the idle
/// timeout and pings of the module doc.
pub fn client_config(
    c: &BridgeConfig,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<quinn::ClientConfig, String> {
    let mut tls = (**tls).clone();
    tls.alpn_protocols = vec![b"mqtt".to_vec()];
    let crypto = QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| format!("the TLS settings cannot serve QUIC: {e}"))?;
    let idle = match c.keep_alive_s {
        0 => IDLE_WITHOUT_KEEP_ALIVE,
        s => Duration::from_secs(u64::from(s)),
    };
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(idle).map_err(|e| format!("QUIC idle timeout: {e}"))?,
        ))
        .keep_alive_interval(Some(idle / 3))
        // The remote opens no stream towards a client.
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .congestion_controller_factory(crate::quic::congestion_factory(c.congestion));
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// One connect request for the client thread.
struct Request {
    addr: SocketAddr,
    server_name: String,
    config: quinn::ClientConfig,
    reply: flume::Sender<Result<QuicPipe, String>>,
}

/// The client thread's request queue (started at the first request).
fn requests() -> Result<flume::Sender<Request>, String> {
    static THREAD: OnceLock<Mutex<Option<flume::Sender<Request>>>> = OnceLock::new();
    let slot = THREAD.get_or_init(|| Mutex::new(None));
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_disconnected()) {
        return Ok(tx.clone());
    }
    let (tx, rx) = flume::bounded(REQUESTS_QUEUED_MAX);
    runtime_thread(
        "bridge-quic".into(),
        |e| tracing::error!("the bridges' QUIC thread cannot start its runtime: {e}"),
        move || serve(rx),
    )
    .map_err(|e| format!("cannot start the bridges' QUIC thread: {e}"))?;
    *slot = Some(tx.clone());
    Ok(tx)
}

/// Connects to `addr` over QUIC, checking the remote's certificate for
/// `server_name`, and opens the MQTT stream, within `timeout`. Waits without
/// blocking the calling executor.
pub async fn connect(
    addr: SocketAddr,
    server_name: String,
    config: quinn::ClientConfig,
    timeout: Duration,
) -> Result<QuicPipe, String> {
    let tx = requests()?;
    let (reply, answer) = flume::bounded(1);
    tx.try_send(Request {
        addr,
        server_name,
        config,
        reply,
    })
    .map_err(|_| "the bridges' QUIC thread is busy or gone".to_owned())?;
    let answer = glommio::timer::timeout(timeout, async {
        answer
            .recv_async()
            .await
            .map_err(|_| glommio::GlommioError::IoError(std::io::Error::other("no answer")))
    })
    .await;
    match answer {
        Ok(r) => r,
        Err(e) => Err(format!("QUIC connect to {addr}: {e}")),
    }
}

/// The client thread: one endpoint per address family, a task per connection.
async fn serve(rx: flume::Receiver<Request>) {
    let mut v4: Option<quinn::Endpoint> = None;
    let mut v6: Option<quinn::Endpoint> = None;
    while let Ok(req) = rx.recv_async().await {
        let (slot, any) = match req.addr {
            SocketAddr::V4(_) => (&mut v4, "0.0.0.0:0"),
            SocketAddr::V6(_) => (&mut v6, "[::]:0"),
        };
        if slot.is_none() {
            match quinn::Endpoint::client(any.parse().expect("address")) {
                Ok(e) => *slot = Some(e),
                Err(e) => {
                    let _ = req
                        .reply
                        .send(Err(format!("cannot open a QUIC client socket: {e}")));
                    continue;
                }
            }
        }
        let endpoint = slot.clone().expect("set above");
        tokio::spawn(async move {
            let Request {
                addr,
                server_name,
                config,
                reply,
            } = req;
            let opened = async {
                let connecting = endpoint
                    .connect_with(config, addr, &server_name)
                    .map_err(|e| format!("QUIC connect to {addr}: {e}"))?;
                let conn = connecting
                    .await
                    .map_err(|e| format!("QUIC handshake with {addr}: {e}"))?;
                let (send, recv) = conn
                    .open_bi()
                    .await
                    .map_err(|e| format!("QUIC stream to {addr}: {e}"))?;
                Ok::<_, String>((conn, send, recv))
            };
            match opened.await {
                Ok((conn, send, recv)) => {
                    let (pipe, end) = QuicPipe::new(addr, PIPE_IN_CHUNKS, PIPE_OUT_BYTES_MAX);
                    // The shard gave up waiting: nothing to carry.
                    if reply.send(Ok(pipe)).is_err() {
                        conn.close(VarInt::from_u32(close_code::DONE), b"");
                        return;
                    }
                    carry(conn, send, recv, end).await;
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        });
    }
}

/// Carries the MQTT bytes between the pipe and the stream until the bridge
/// drops its end (then the stream is finished and the connection closed with
/// the pipe's close code) or the connection is lost (then the bridge reads
/// the end of the stream).
async fn carry(conn: Connection, mut send: SendStream, mut recv: RecvStream, end: QuicPipeEnd) {
    let QuicPipeEnd {
        to_shard,
        from_shard,
        close,
    } = end;
    let reader = tokio::spawn(async move {
        while let Ok(Some(chunk)) = recv.read_chunk(READ_CHUNK_BYTES_MAX, true).await {
            if to_shard.send_async(chunk.bytes).await.is_err() {
                return;
            }
        }
        // Dropping `to_shard`: the bridge reads the end of the stream.
    });
    let mut lost = false;
    while let Some(chunk) = from_shard.recv().await {
        let len = chunk.len();
        let written = send.write_chunk(chunk).await;
        // quinn holds the chunk now (or it is lost with the stream): its
        // room in the pipe goes back to the bridge task.
        from_shard.written(len);
        if written.is_err() {
            lost = true;
            break;
        }
    }
    if !lost {
        let _ = send.finish();
        let _ = tokio::time::timeout(CLOSE_LINGER, send.stopped()).await;
    }
    conn.close(VarInt::from_u32(close.load(Ordering::Relaxed)), b"");
    reader.abort();
    debug!(remote = %conn.remote_address(), "bridge QUIC connection closed");
}
