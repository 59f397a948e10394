//! MQTT over QUIC: the endpoint threads of each `quic` listener.
//!
//! Each `[[listener]] kind = "quic"` gets N endpoint threads (`endpoints`,
//! default one per shard), each running a current-thread tokio runtime with
//! a quinn endpoint on its own UDP socket, all N bound to the listener's
//! address with `SO_REUSEPORT` (quinn needs `Send + Sync` sockets, which
//! glommio's are not; the cluster link in `raft/src/link` runs quinn the
//! same way). Endpoint k issues connection ids whose first byte is k, and a
//! BPF program on the sockets' reuseport group steers every datagram to the
//! endpoint its connection id names ([`steer`]), so a client whose address
//! changes still reaches the endpoint that holds its connection. A thread
//! does the QUIC work of its connections:
//! packets, TLS 1.3 (ALPN `mqtt`, optional client certificates), loss
//! recovery, connection migration. The MQTT work stays on the shards: once a
//! connection's first bidirectional stream is open, the stream's bytes go to
//! a shard through a [`QuicPipe`] (`crate::transport::quic`), and from there
//! the connection is accepted like a TCP one (CONNECT, authentication, the
//! hand-off to the ClientID's owner shard) and served by the same engine and
//! connection task. docs/ARCHITECTURE.md ("MQTT over QUIC") says why this
//! layout and what it costs.
//!
//! Single-stream mode (EMQX, NanoSDK, RMQTT): the client opens one
//! bidirectional stream and sends every MQTT packet on it, CONNECT first; the
//! server opens no stream. Multi-stream mode (EMQX 5.0.18+): the client opens
//! further bidirectional data streams for PUBLISH and SUBSCRIBE; their
//! packets wait for the CONNACK, then join the shard's byte stream whole, and
//! the answers go back on the stream the rules of [`mux`] name. `max_streams`
//! bounds the streams a client has open at once (QUIC's stream limit).
//! `congestion` picks quinn's congestion controller for what the broker sends
//! ([`congestion_factory`]: CUBIC by default, NewReno, or BBR, which keeps its
//! rate on links with random loss; docs/ARCHITECTURE.md says why CUBIC stays
//! the default).
//!
//! Bounds: at most [`HANDSHAKES_MAX`] connections of the listener (all its
//! endpoints together) between the first packet
//! and their MQTT stream (a flood beyond that is refused at once; beyond half
//! of it, clients whose address is not validated are asked to retry, which
//! costs a spoofed source its answer); a handshake and the first stream must
//! come within `limits.connect_timeout_s`; a pipe holds at most
//! [`PIPE_IN_CHUNKS`] chunks from the client and [`PIPE_OUT_BYTES_MAX`]
//! bytes for it; 0-RTT data (`zero_rtt = true`) is only
//! read after the handshake completed, so nothing of it is acted on before
//! (it could be a replay).
//!
//! Lifecycle: [`QuicListener::start`] binds nothing itself (the sockets come
//! from the boot, which resolved port 0 with [`bind`]) and returns once every
//! endpoint runs; after the stop flag they accept nothing new, wait for the
//! listener's connections to end (the shards disconnect their clients) and
//! close.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tracing::{debug, info, warn};

use crate::config::{CertIdentity, ListenerConfig, ListenerId, QuicCongestion};
use crate::transport::quic::{QuicPipe, close_code};
use crate::transport::tls::{self, TlsStore};

mod mux;
mod steer;

pub use steer::{Bound, CID_LEN, ENDPOINTS_MAX};

/// Connections at most between their first packet and their MQTT stream, per
/// listener (all its endpoints together). quinn's own bound on connection
/// attempts not yet accepted (`max_incoming`) and on the datagrams they
/// buffer is split between the endpoints, so the listener's total stays the
/// same whatever their number.
pub const HANDSHAKES_MAX: usize = 4096;

/// The datagrams quinn buffers for connection attempts not yet accepted, per
/// listener (quinn's default per endpoint), split between its endpoints.
const INCOMING_BUFFER_BYTES_MAX: u64 = 100 << 20;

/// Chunks a pipe holds from the client (a chunk is one read of the stream,
/// at most [`READ_CHUNK_BYTES_MAX`]). Beyond them the stream is not read and
/// QUIC flow control holds the client back.
pub const PIPE_IN_CHUNKS: usize = 8;

/// Bytes a pipe holds for the client: output the shard wrote that the
/// endpoint thread has not yet handed to quinn. It is the QUIC connection's
/// counterpart of a TCP socket's send buffer (Linux autotunes that up to
/// `net.ipv4.tcp_wmem`'s 4 MiB), so a subscriber whose endpoint thread is
/// off the CPU for a moment is not taken for a slow one: at the QoS 0
/// fan-in rate of docs/BENCHMARKS.md (about 1.2 M messages/s of 64 bytes,
/// ~100 MB/s to one subscriber) it covers a stall of about 10 ms, a
/// scheduler time slice on a loaded machine. Only a backlogged connection
/// holds it; an idle one holds nothing (the channel is empty).
pub const PIPE_OUT_BYTES_MAX: usize = 1 << 20;

/// Bytes at most in one chunk read from a stream.
pub(crate) const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;

/// New connections waiting for a shard to take them, per shard.
pub const NEW_CONNECTIONS_QUEUED_MAX: usize = 1024;

/// How long a finished stream may wait for the client to acknowledge its last
/// bytes before the connection is closed anyway.
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// How often the endpoint looks at the stop flag and the TLS generation.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long a stopping endpoint waits for its connections to end.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// A QUIC connection with its MQTT stream open, for a shard to accept.
#[derive(Debug)]
pub struct NewQuic {
    /// The listener it came in on.
    pub listener: ListenerId,
    /// The shard's end of the stream.
    pub pipe: QuicPipe,
    /// The username its client certificate gives (per `username_from_cert`).
    pub identity: Option<String>,
}

/// Settings of one QUIC listener's endpoint, from the config.
#[derive(Debug, Clone)]
pub struct QuicSettings {
    /// The handshake and the first stream must come within this.
    pub connect_timeout: Duration,
    /// The QUIC idle timeout: more than 1.5 times the largest Keep Alive the
    /// broker accepts, so a client keeping MQTT's keep alive never idles out.
    pub idle_timeout: Duration,
}

impl QuicSettings {
    /// The settings for `limits.connect_timeout_s` and `limits.max_keep_alive_s`.
    pub fn new(connect_timeout_s: u32, keep_alive_s_max: u16) -> QuicSettings {
        let keep_alive_ms = u64::from(keep_alive_s_max.max(1)) * 1000;
        QuicSettings {
            connect_timeout: Duration::from_secs(u64::from(connect_timeout_s.max(1))),
            // 1.5x plus a margin for a client that pings late.
            idle_timeout: Duration::from_millis(keep_alive_ms * 3 / 2 + 5_000),
        }
    }
}

/// A running QUIC listener: its endpoint threads.
#[derive(Debug)]
pub struct QuicListener {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Its URL and gauges, for `/metrics`.
    pub counters: (String, Arc<QuicCounters>),
}

/// The gauges of one QUIC listener, written by its endpoint threads (all
/// of them count in the same gauges).
#[derive(Debug, Default)]
pub struct QuicCounters {
    /// Endpoint threads (UDP sockets) the listener runs.
    pub endpoints: AtomicUsize,
    /// QUIC connections the endpoint holds, from their first packet until
    /// their close (handshaking ones included).
    pub live: AtomicUsize,
    /// Of those, the ones before their MQTT stream opened (handshake, or
    /// waiting for the stream); bounded by [`HANDSHAKES_MAX`].
    pub handshaking: AtomicUsize,
}

/// What every endpoint and connection task of one listener shares.
struct Ctx {
    listener: ListenerId,
    username_from_cert: CertIdentity,
    url: String,
    settings: QuicSettings,
    /// The quinn server configuration every endpoint starts from, one for
    /// the listener so all endpoints share its token key: a Retry or
    /// NEW_TOKEN token one endpoint issued is valid at any other (a client
    /// that reconnects with a new random connection id may land elsewhere).
    /// A TLS reload replaces only its `crypto`.
    base: quinn::ServerConfig,
    shards: Vec<flume::Sender<NewQuic>>,
    next_shard: AtomicUsize,
    counters: Arc<QuicCounters>,
    refused_log: std::sync::Mutex<(Instant, u32)>,
}

impl Ctx {
    /// Whether a refused handshake gets its own WARN line: the first 3 of each
    /// second, as for TCP listeners (`server::refusals`).
    fn warn_refusal(&self) -> bool {
        let mut log = self.refused_log.lock().unwrap_or_else(|e| e.into_inner());
        if log.0.elapsed() >= Duration::from_secs(1) {
            *log = (Instant::now(), 0);
        }
        log.1 += 1;
        log.1 <= 3
    }
}

/// Counts a connection in one of the context's gauges while alive.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(n: &'a AtomicUsize) -> Counted<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        Counted(n)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// quinn's view of a listener's TLS configuration (from the [`TlsStore`],
/// TLS 1.3 with ALPN `mqtt`).
fn quic_crypto(tls: Arc<rustls::ServerConfig>) -> anyhow::Result<Arc<QuicServerConfig>> {
    QuicServerConfig::try_from(tls)
        .map(Arc::new)
        .map_err(|e| anyhow!("the TLS configuration cannot serve QUIC: {e}"))
}

/// The quinn server configuration of a listener with `endpoints` endpoints:
/// its TLS configuration, the stream limit, the idle timeout and each
/// endpoint's share of the bounds on connection attempts.
fn server_config(
    tls: Arc<rustls::ServerConfig>,
    spec: &ListenerConfig,
    settings: &QuicSettings,
    endpoints: usize,
) -> anyhow::Result<quinn::ServerConfig> {
    let crypto = quic_crypto(tls)?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(spec.max_streams))
        // Unidirectional data streams: mqtt-lib's multi-stream mode sends
        // PUBLISH and SUBSCRIBE on them (see `data_streams`).
        .max_concurrent_uni_streams(VarInt::from_u32(spec.max_streams))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(settings.idle_timeout)
                .map_err(|e| anyhow!("QUIC idle timeout: {e}"))?,
        ));
    transport.congestion_controller_factory(congestion_factory(spec.congestion));
    let mut config = quinn::ServerConfig::with_crypto(crypto);
    let share = endpoints.max(1);
    config
        .transport_config(Arc::new(transport))
        .max_incoming(HANDSHAKES_MAX.div_ceil(share))
        .incoming_buffer_size_total(INCOMING_BUFFER_BYTES_MAX / share as u64)
        .migration(true);
    Ok(config)
}

/// quinn's controller for `congestion` (the listener's, or a bridge's).
pub fn congestion_factory(
    congestion: QuicCongestion,
) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
    match congestion {
        QuicCongestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
        QuicCongestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
        QuicCongestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
    }
}

impl QuicListener {
    /// Starts listener `listener` (`spec`) with one endpoint thread on each
    /// of `sockets` (from [`bind`]: endpoint k on `sockets[k]`); new
    /// connections go to the shards through `shards`, in turn. Returns once
    /// every endpoint runs, or why one cannot (the others then end at the
    /// stop flag).
    pub fn start(
        listener: ListenerId,
        spec: &ListenerConfig,
        sockets: Vec<std::net::UdpSocket>,
        tls: Arc<TlsStore>,
        shards: Vec<flume::Sender<NewQuic>>,
        settings: QuicSettings,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<QuicListener> {
        let bound = sockets
            .first()
            .ok_or_else(|| anyhow!("quic listener {listener} has no socket"))?
            .local_addr()?;
        let generation = tls.generation();
        let crypto = tls
            .snapshot()
            .get(usize::from(listener))
            .cloned()
            .flatten()
            .ok_or_else(|| anyhow!("listener {listener} has no TLS configuration"))?;
        let base = server_config(crypto, spec, &settings, sockets.len())
            .with_context(|| format!("quic listener {bound}"))?;
        let ctx = Arc::new(Ctx {
            listener,
            username_from_cert: spec.username_from_cert,
            url: spec.url(bound),
            settings,
            base,
            shards,
            next_shard: AtomicUsize::new(0),
            counters: Arc::new(QuicCounters::default()),
            refused_log: std::sync::Mutex::new((Instant::now(), 0)),
        });
        ctx.counters
            .endpoints
            .store(sockets.len(), Ordering::Relaxed);
        let counters = (ctx.url.clone(), ctx.counters.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::with_capacity(sockets.len());
        let endpoints = sockets.len();
        for (index, socket) in sockets.into_iter().enumerate() {
            let index = u8::try_from(index).map_err(|_| anyhow!("too many endpoints"))?;
            let (ready_tx, failed) = (ready_tx.clone(), ready_tx.clone());
            let (ctx, tls, stop) = (ctx.clone(), tls.clone(), stop.clone());
            let config = ctx.base.clone();
            let thread = runtime_thread(
                format!("quic-{listener}-{index}"),
                move |e| {
                    let _ = failed.send(Err(anyhow!("cannot start its runtime: {e}")));
                },
                move || async move {
                    let mut endpoint_config = quinn::EndpointConfig::default();
                    endpoint_config
                        .cid_generator(move || Box::new(steer::EndpointCids::new(index)));
                    let endpoint = match quinn::Endpoint::new(
                        endpoint_config,
                        Some(config),
                        socket,
                        Arc::new(quinn::TokioRuntime),
                    ) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow!("cannot start its endpoint: {e}")));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    run(endpoint, index, ctx, tls, generation, stop).await;
                },
            )?;
            threads.push(thread);
        }
        for _ in 0..endpoints {
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.context(format!("quic listener {bound}"))),
                Err(_) => return Err(anyhow!("quic listener {bound} did not start within 10 s")),
            }
        }
        Ok(QuicListener { threads, counters })
    }

    /// Waits until the endpoint threads ended (after the stop flag).
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Starts thread `name` running `main` on a current-thread tokio runtime
/// (what quinn needs: the shards' glommio executors are not one); calls
/// `failed` instead when the runtime cannot start.
pub(crate) fn runtime_thread<F>(
    name: String,
    failed: impl FnOnce(std::io::Error) + Send + 'static,
    main: impl FnOnce() -> F + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: std::future::Future<Output = ()>,
{
    std::thread::Builder::new().name(name).spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(main()),
            Err(e) => failed(e),
        }
    })
}

/// Endpoint `index`'s accept loop until the stop flag, then the drain.
async fn run(
    endpoint: quinn::Endpoint,
    index: u8,
    ctx: Arc<Ctx>,
    tls: Arc<TlsStore>,
    mut generation: u64,
    stop: Arc<AtomicBool>,
) {
    debug!(listener = %ctx.url, endpoint = index, "QUIC endpoint running");
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = poll.tick() => {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if tls.generation() != generation {
                    generation = tls.generation();
                    reload(&endpoint, index, &ctx, &tls);
                }
                continue;
            }
        };
        let Some(incoming) = incoming else {
            break;
        };
        let handshaking = ctx.counters.handshaking.load(Ordering::Relaxed);
        if handshaking >= HANDSHAKES_MAX {
            debug!(listener = %ctx.url, peer = %incoming.remote_address(), "too many handshakes: refused");
            incoming.refuse();
            continue;
        }
        if handshaking >= HANDSHAKES_MAX / 2
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            // Under a flood, a client must prove it receives at its address
            // (a spoofed source never answers the retry).
            let _ = incoming.retry();
            continue;
        }
        tokio::spawn(connection(incoming, ctx.clone()));
    }
    // Stopping: nothing new; the shards end the live connections (of all
    // endpoints: each waits for the listener's count).
    endpoint.set_server_config(None);
    let deadline = Instant::now() + STOP_WAIT;
    while ctx.counters.live.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    endpoint.close(VarInt::from_u32(close_code::BUSY), b"server shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    debug!(listener = %ctx.url, endpoint = index, "QUIC endpoint stopped");
}

/// Takes the listener's new TLS configuration after a reload (SIGHUP) into
/// endpoint `index` (each endpoint sees the store's generation change
/// itself): new handshakes use it, established connections keep theirs.
fn reload(endpoint: &quinn::Endpoint, index: u8, ctx: &Ctx, tls: &TlsStore) {
    let Some(crypto) = tls
        .snapshot()
        .get(usize::from(ctx.listener))
        .cloned()
        .flatten()
    else {
        return;
    };
    match quic_crypto(crypto) {
        Ok(crypto) => {
            let mut config = ctx.base.clone();
            config.crypto = crypto;
            endpoint.set_server_config(Some(config));
            info!(listener = %ctx.url, endpoint = index, "QUIC listener: TLS configuration reloaded");
        }
        Err(e) => {
            warn!(listener = %ctx.url, endpoint = index, "QUIC listener keeps its TLS configuration: {e:#}")
        }
    }
}

/// One connection: the handshake and the MQTT stream within the connect
/// timeout, then a shard takes the stream and this task carries its bytes.
async fn connection(incoming: Incoming, ctx: Arc<Ctx>) {
    let live = Counted::new(&ctx.counters.live);
    let handshaking = Counted::new(&ctx.counters.handshaking);
    let peer = incoming.remote_address();
    let deadline = tokio::time::Instant::now() + ctx.settings.connect_timeout;
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!(listener = %ctx.url, %peer, "QUIC connection not accepted: {e}");
            return;
        }
    };
    let conn = match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            if ctx.warn_refusal() {
                warn!(listener = %ctx.url, %peer, reason = "handshake", "connection refused: QUIC handshake failed: {e}");
            }
            return;
        }
        Err(_) => {
            debug!(listener = %ctx.url, %peer, "no QUIC handshake within the connect timeout: closing");
            return;
        }
    };
    let identity = match ctx.username_from_cert {
        CertIdentity::None => None,
        mode => conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| {
                chain
                    .first()
                    .and_then(|leaf| tls::cert_identity(leaf, mode))
            }),
    };
    let (send, recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            debug!(listener = %ctx.url, %peer, "QUIC connection ended before its MQTT stream: {e}");
            return;
        }
        Err(_) => {
            debug!(listener = %ctx.url, %peer, "no MQTT stream within the connect timeout: closing");
            conn.close(
                VarInt::from_u32(close_code::NO_STREAM),
                b"no MQTT stream opened within the connect timeout",
            );
            return;
        }
    };
    drop(handshaking);
    let (pipe, end) = QuicPipe::new(peer, PIPE_IN_CHUNKS, PIPE_OUT_BYTES_MAX);
    let shard = ctx.next_shard.fetch_add(1, Ordering::Relaxed) % ctx.shards.len();
    let new = NewQuic {
        listener: ctx.listener,
        pipe,
        identity,
    };
    if ctx.shards[shard].try_send(new).is_err() {
        debug!(listener = %ctx.url, %peer, shard, "shard queue full: closing");
        conn.close(VarInt::from_u32(close_code::BUSY), b"server busy");
        return;
    }
    carry(conn, send, recv, end).await;
    drop(live);
}

/// What the tasks of one connection share: the protocol version (from the
/// CONNECT) and, once a data stream opened, the multi-stream router.
#[derive(Debug, Default)]
struct Streams {
    version: Option<tessera_proto::ProtocolVersion>,
    router: Option<mux::Router>,
}

/// Carries the MQTT bytes between the client and the shard until the shard
/// ends the connection (or the connection is lost), then closes it with the
/// shard's close code. The first stream's bytes go to the shard cut at packet
/// boundaries; further streams are data streams (multi-stream mode, `mux`),
/// whose packets join the same pipe and whose answers the router sends back
/// on them.
async fn carry(
    conn: Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    end: crate::transport::quic::QuicPipeEnd,
) {
    let to_shard = end.to_shard;
    let shared = Arc::new(std::sync::Mutex::new(Streams::default()));
    let (connacked_tx, connacked_rx) = tokio::sync::watch::channel(false);
    let (streams_tx, mut streams_rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = {
        let (to_shard, shared, conn) = (to_shard.clone(), shared.clone(), conn.clone());
        tokio::spawn(async move {
            // Ends at the end of the stream or of the connection; dropping
            // `to_shard` tells the shard.
            let seen = |s: &mut Streams, frames: &bytes::Bytes| {
                if s.version.is_none() {
                    s.version = mux::connect_version(frames);
                }
            };
            let malformed = b"malformed MQTT packet";
            pump_packets(&mut recv, &conn, &to_shard, &shared, malformed, seen).await;
        })
    };
    let data = tokio::spawn(data_streams(
        conn.clone(),
        to_shard,
        shared.clone(),
        connacked_rx,
        streams_tx,
    ));
    // The writer runs here: the connection ends when the shard is done.
    let mut data_senders: HashMap<mux::StreamNo, SendStream> = HashMap::new();
    'write: loop {
        let chunk = tokio::select! {
            biased;
            // A data stream is known here before the shard can answer it.
            Some(event) = streams_rx.recv() => {
                match event {
                    DataStream::Opened(no, sender) => {
                        data_senders.insert(no, sender);
                    }
                    // The client finished or reset it: finish ours, so the
                    // stream closes and its credit returns to the client.
                    DataStream::Ended(no) => {
                        if let Some(mut sender) = data_senders.remove(&no) {
                            let _ = sender.finish();
                        }
                    }
                }
                continue;
            }
            chunk = end.from_shard.recv() => match chunk {
                Some(chunk) => chunk,
                None => break,
            },
        };
        if !*connacked_tx.borrow() && mux::starts_with_connack(&chunk) {
            let _ = connacked_tx.send(true);
        }
        let chunk_len = chunk.len();
        let routed = {
            let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
            match s.router.as_mut() {
                Some(router) => router.outbound(chunk),
                None => vec![(0, chunk)],
            }
        };
        let mut lost = false;
        for (no, bytes) in routed {
            let stream = match data_senders.get_mut(&no) {
                Some(stream) if no != 0 => stream,
                _ => &mut send,
            };
            if stream.write_chunk(bytes).await.is_err() {
                if no == 0 || !data_senders.contains_key(&no) {
                    lost = true;
                    break;
                }
                // A data stream the client stopped: its answers are lost,
                // the connection goes on.
                data_senders.remove(&no);
            }
        }
        // The chunk is quinn's now (or lost with the stream): its room in
        // the pipe goes back to the shard.
        end.from_shard.written(chunk_len);
        if lost {
            break 'write;
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(CLOSE_LINGER, send.stopped()).await;
    let code = end.close.load(Ordering::Relaxed);
    let reason: &[u8] = match code {
        close_code::DONE => b"",
        close_code::BUSY => b"server busy",
        _ => b"MQTT protocol error",
    };
    conn.close(VarInt::from_u32(code), reason);
    reader.abort();
    data.abort();
}

/// What the data stream tasks tell the writer.
#[derive(Debug)]
enum DataStream {
    /// A new data stream and its sending side.
    Opened(mux::StreamNo, SendStream),
    /// The client's side of the stream ended.
    Ended(mux::StreamNo),
}

/// Multi-stream mode: every further stream the client opens is a data
/// stream. Its packets wait until the CONNACK went out, then join the pipe
/// whole. A bidirectional one's sending side goes to the writer for the
/// router's answers (EMQX's convention); a unidirectional one (mqtt-lib's,
/// e.g. `mqttv5 --quic-stream-strategy per-topic`) has none, so what the
/// router would send on it goes on the first stream, where that client reads
/// its answers.
async fn data_streams(
    conn: Connection,
    to_shard: flume::Sender<bytes::Bytes>,
    shared: Arc<std::sync::Mutex<Streams>>,
    connacked: tokio::sync::watch::Receiver<bool>,
    senders: tokio::sync::mpsc::UnboundedSender<DataStream>,
) {
    let mut no: mux::StreamNo = 0;
    loop {
        // Both accepts are cancel-safe: a stream is taken only when one
        // returns it.
        let (send, recv) = tokio::select! {
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => (Some(send), recv),
                Err(_) => return,
            },
            uni = conn.accept_uni() => match uni {
                Ok(recv) => (None, recv),
                Err(_) => return,
            },
        };
        no += 1;
        if let Some(send) = send
            && senders.send(DataStream::Opened(no, send)).is_err()
        {
            return;
        }
        let (conn, to_shard, shared) = (conn.clone(), to_shard.clone(), shared.clone());
        let (connacked, senders) = (connacked.clone(), senders.clone());
        tokio::spawn(async move {
            data_stream(no, recv, conn, to_shard, shared, connacked).await;
            let _ = senders.send(DataStream::Ended(no));
        });
    }
}

/// Reads one data stream into the pipe (see [`data_streams`]).
async fn data_stream(
    no: mux::StreamNo,
    mut recv: RecvStream,
    conn: Connection,
    to_shard: flume::Sender<bytes::Bytes>,
    shared: Arc<std::sync::Mutex<Streams>>,
    mut connacked: tokio::sync::watch::Receiver<bool>,
) {
    // Data streams opened before the CONNACK wait for it.
    if connacked.wait_for(|c| *c).await.is_err() {
        return;
    }
    let seen = |s: &mut Streams, frames: &bytes::Bytes| {
        let version = s.version.unwrap_or(tessera_proto::ProtocolVersion::V3_1_1);
        s.router
            .get_or_insert_with(|| mux::Router::new(version))
            .inbound(no, frames);
    };
    let malformed = b"malformed MQTT packet on a data stream";
    pump_packets(&mut recv, &conn, &to_shard, &shared, malformed, seen).await;
}

/// Reads a stream into whole MQTT packets for the shard: each run of complete
/// packets is shown to `seen` (under the streams' lock), then sent on. A
/// malformed packet closes the connection with `malformed`. Returns at the
/// end of the stream or the connection, or when the shard is gone.
async fn pump_packets(
    recv: &mut RecvStream,
    conn: &Connection,
    to_shard: &flume::Sender<bytes::Bytes>,
    shared: &std::sync::Mutex<Streams>,
    malformed: &'static [u8],
    mut seen: impl FnMut(&mut Streams, &bytes::Bytes),
) {
    let mut framer = mux::Framer::default();
    while let Ok(Some(chunk)) = recv.read_chunk(READ_CHUNK_BYTES_MAX, true).await {
        let frames = match framer.push(chunk.bytes) {
            Ok(Some(frames)) => frames,
            Ok(None) => continue,
            Err(_) => {
                conn.close(VarInt::from_u32(close_code::PROTOCOL_ERROR), malformed);
                return;
            }
        };
        seen(
            &mut shared.lock().unwrap_or_else(|e| e.into_inner()),
            &frames,
        );
        if to_shard.send_async(frames).await.is_err() {
            return;
        }
    }
}

/// Receive buffer asked for each UDP socket of a listener. A burst of new
/// clients is a burst of 1,200-byte Initial datagrams (each costs about 2.3
/// KB of buffer accounting); with the kernel's default 208 KiB about 90 fit,
/// the rest are dropped (`RcvbufErrors` in /proc/net/snmp) and those clients
/// wait for their retransmission timers (1 s, then 2 s, ...). Measured: 2,000
/// clients at once took 3 s at the median (docs/BENCHMARKS.md, QUIC section).
/// Linux caps the value at `net.core.rmem_max` (4 MiB here), or takes it as
/// asked with `CAP_NET_ADMIN` (`SO_RCVBUFFORCE`).
pub const UDP_RCVBUF_BYTES: usize = 16 << 20;

/// Binds the `endpoints` UDP sockets of a QUIC listener on `addr` (port 0
/// picks one, the same for all), each with a receive buffer sized for
/// handshake bursts ([`UDP_RCVBUF_BYTES`]), steered by connection id
/// ([`steer`]). When steering cannot be set up there is one socket, and
/// `fallback` says why.
pub fn bind(addr: SocketAddr, endpoints: usize) -> std::io::Result<Bound> {
    steer::bind(addr, endpoints, UDP_RCVBUF_BYTES)
}
