//! The glommio driver: boots one pinned executor per shard, joins them in a full
//! channel mesh, accepts MQTT connections on every shard (`SO_REUSEPORT`), hands
//! each connection to the shard owning its ClientID, and runs the shard's
//! [`Engine`] against real sockets.
//!
//! Lifecycle: [`Server::start`] returns once every shard listens; [`Server::stop`]
//! asks the shards to shut down (v5 clients get DISCONNECT 0x8B, output is
//! flushed); [`Server::join`] waits for the executors to exit.
//!
//! Every listener kind (`mqtt`, `mqtts`, `ws`, `wss`) runs its transport
//! handshakes on the accepting shard (`crate::transport`), which then hands
//! the socket together with the transport state to the owner shard.
//!
//! Per connection there is one task on the owner shard (`conn`), which reads
//! packets into the engine and writes what the engine produced. Listen sockets
//! are set up in `listen` (`TCP_DEFER_ACCEPT`, a `somaxconn`-sized backlog).
//! With `server.idle_poll_us` each executor polls that long before it sleeps
//! (glommio's `spin_before_park`). Large packets draw on the node's
//! read-buffer budget (`read_budget`); the shards share one count of the
//! node's sessions (`tessera_shard::engine::SessionBudget`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bytes::{Bytes, BytesMut};
use futures_lite::future::poll_fn;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};
use tessera_proto::{
    ConnAck, Connect, DecodeError, Encode, Packet, PacketType, ProtocolVersion, ReasonCode, Str,
};
use tessera_shard::authz::Admission;
use tessera_shard::engine::{
    Engine, Limit, Limits, QueueOverflow as EngineOverflow, SessionBudget,
    SharedStrategy as EngineShared,
};
use tessera_shard::handoff::Handoff;
use tessera_shard::hash::{assign_client_id, shard_for};
use tessera_shard::mesh::{MeshMsg, ShardId};
use tracing::{debug, info, warn};

use crate::admin::shard_call::{self, DriverView, ShardCall, ShardEnds, ShardLinks, ShardUpGuard};
use crate::auth::listener_limits::ListenerLimits;
use crate::auth::{AuthHub, ShardAuth, Verdict};
use crate::config::{
    Config, ListenerConfig, ListenerId, ListenerKind, QueueOverflow, SharedStrategy,
};
use crate::transport::tls::TlsStore;
use crate::transport::{AcceptError, Transport, TransportState};
use persist::{ShardStore, StoreBoot};

mod conn;
mod listen;
mod park;
mod persist;
mod read_budget;
pub use read_budget::ReadBudget;
mod refusals;
use refusals::{Refusal, RefusalLog};
use tessera_shard::probe::EarlyRefusal;

/// Slots of each shard-to-shard channel (one channel per ordered pair). A slot
/// holds one batch, so this bounds batches, not messages.
const MESH_CHANNEL_SLOTS: usize = 256;

/// Batches queued locally for one peer before connection readers on this shard
/// pause (back-pressure on publishers when a peer shard falls behind).
const MESH_BACKLOG_BATCHES_MAX: usize = 256;

/// Messages one envelope may carry when the writer coalesces batches. The
/// receiving shard handles one envelope per turn and then yields, so this
/// bounds how much one turn can push into subscriber queues before their
/// writers run.
const MESH_ENVELOPE_MESSAGES_MAX: usize = 512;

/// Bytes read from a socket per read call while a connection is busy.
const READ_CHUNK_BYTES: usize = 4096;

/// Bytes of the read an idle connection waits in: small enough to live inside
/// the connection task, large enough for a PINGREQ, an acknowledgement or a
/// small PUBLISH in one read. Only a connection whose reads fill it gets a heap
/// read buffer (`READ_CHUNK_BYTES`).
const PROBE_BYTES: usize = 128;

/// How often each shard fires its due timers (keep alives, expiries: see
/// `Engine::poll_timeout`), advances the parking epoch and checks the stop flag.
const TICK: Duration = Duration::from_millis(250);

/// How long a shard waits at shutdown for connections to flush.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

/// How long a connection the broker closes keeps discarding what the client
/// still sends before the socket is closed (see `conn::close`).
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Memory glommio registers for I/O per shard; well under the 8 MiB locked-memory
/// limit common on small hosts (glommio's default of 10 MiB exceeds it).
const IO_MEMORY_BYTES: usize = 1024 * 1024;

static CLOCK_START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Broker-relative milliseconds: the engine's clock.
fn now_ms() -> u64 {
    CLOCK_START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Broker-relative microseconds, the same clock on every shard: stamps
/// messages for the publish-to-deliver latency (`Engine::set_now_us`).
fn now_us() -> u64 {
    CLOCK_START.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1
}

/// What travels between shards.
#[derive(Debug)]
enum Envelope {
    /// Engine messages, in order.
    Batch(Vec<MeshMsg>),
    /// A connection whose ClientID the receiver owns. Boxed: a CONNECT is
    /// large, and every batch would otherwise take its size.
    Handoff(Box<Handoff<Accepted>>),
}

/// What the accepting shard learned about a connection, handed off with it.
#[derive(Debug)]
struct Accepted {
    connect: Connect,
    /// Whether the ClientID was assigned by the broker.
    assigned: bool,
    /// The listener it came in on.
    listener: ListenerId,
    /// TLS and WebSocket state (the socket travels as a file descriptor).
    transport: TransportState,
    /// What authentication decided (`admit`).
    admission: Admission,
}

/// A running broker.
#[derive(Debug)]
pub struct Server {
    stop: Arc<AtomicBool>,
    auth: Arc<AuthHub>,
    /// The data directory lock, held while the broker runs (persistence on).
    _data_lock: Option<tessera_shard::store::DirLock>,
    /// Each shard's store counters (commits, batches, commit latency), for
    /// metrics; empty with `durability = "memory"`.
    pub store_stats: Vec<tessera_shard::store::SharedStoreStats>,
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
    /// The MQTT over TCP listen addresses, with ports resolved.
    pub mqtt_addrs: Vec<SocketAddr>,
    /// Every listener with its URL (ports resolved), in listener id order.
    pub urls: Vec<(ListenerKind, String)>,
    listeners: Vec<ListenerConfig>,
    tls: Arc<TlsStore>,
    /// The admin thread's channels to the shards (see [`crate::admin`]).
    pub admin_links: ShardLinks,
    /// Client connections served at most, all shards together.
    pub connections_max: usize,
    /// The node's read-buffer budget, for metrics.
    pub read_budget: Arc<ReadBudget>,
}

/// Everything a shard needs to boot.
#[derive(Clone)]
struct ShardBoot {
    shard_count: usize,
    mesh: MeshBuilder<Envelope, Full>,
    /// Every listener, by id, with its port resolved.
    listeners: Vec<ListenerConfig>,
    tls: Arc<TlsStore>,
    limits: Limits,
    connections_max: usize,
    /// New connections per second per shard; 0 = unlimited.
    connect_rate_per_s: f64,
    connect_timeout: Duration,
    auth: Arc<AuthHub>,
    memory_high_water_bytes: u64,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<Result<usize, String>>,
    /// Each shard's store and what it restores, taken by shard id.
    stores: StoreBoot,
    /// Each shard takes the admin channel of its id.
    admin: ShardEnds,
    /// The node's sessions, counted by every shard (`limits.max_sessions`).
    sessions: Arc<SessionBudget>,
    /// The node's bytes of large packets in read buffers.
    read_budget: Arc<ReadBudget>,
}

impl Server {
    /// Boots the shards and returns once every shard listens on every address.
    pub fn start(config: &Config) -> anyhow::Result<Server> {
        tessera_shard::memlock::check_memlock().map_err(|e| anyhow!("{e}"))?;
        let cpus =
            tessera_shard::placement::plan(config.server.shards).map_err(|e| anyhow!("{e}"))?;
        let shard_count = cpus.len();

        // Resolve port 0 once, so every shard binds the same concrete port. The
        // reserving sockets are bound but never listen, so no connection is
        // queued on them; they close once the shards listen.
        let mut reservations = Vec::new();
        let mut listeners = config.listeners();
        for l in &mut listeners {
            let addr = l.bind;
            let sock = reserve_port(addr)
                .with_context(|| format!("cannot listen on {addr} ({} listener)", l.kind))?;
            l.bind = sock.local_addr()?.as_socket().expect("inet address");
            reservations.push(sock);
        }
        let tls = Arc::new(TlsStore::load(&listeners)?);
        if let Some(cap) = listen::somaxconn()
            && cap < listen::BACKLOG_ADVISED
        {
            warn!(
                "net.core.somaxconn is {cap}: listen backlogs are capped there, and a connect \
                 storm overflows them (raise it to {} or more, see docs/ARCHITECTURE.md)",
                listen::BACKLOG_ADVISED
            );
        }

        let closed = listeners.iter().any(|l| l.allow_anonymous == Some(false));
        let auth = AuthHub::load(&config.auth, closed)?;
        // Start the engines' clock now: `$SYS/broker/uptime` counts from here.
        now_ms();
        // Recovery runs before any shard starts, so every shard has its
        // sessions, the whole route table and retained replica before
        // listeners open.
        let (data_lock, stores, store_stats) = persist::boot(config, shard_count, now_ms())?;
        let limits = engine_limits(config, shard_count);
        let limits_sessions_max = limits.sessions_count_max;
        let read_budget = ReadBudget::new(config.limits.max_read_buffers_bytes);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (admin_links, admin_ends) = shard_call::links(shard_count);
        let connections_total_max = connections_max(config.limits.max_connections as usize);
        let boot = ShardBoot {
            shard_count,
            mesh: MeshBuilder::full(shard_count, MESH_CHANNEL_SLOTS),
            listeners: listeners.clone(),
            tls: tls.clone(),
            limits,
            connections_max: connections_total_max.div_ceil(shard_count),
            connect_rate_per_s: f64::from(config.limits.connect_rate_per_s) / shard_count as f64,
            connect_timeout: Duration::from_secs(u64::from(config.limits.connect_timeout_s)),
            auth: auth.clone(),
            memory_high_water_bytes: config.limits.memory_high_water_bytes,
            stop: stop.clone(),
            ready: ready_tx,
            stores,
            admin: admin_ends,
            sessions: Arc::new(SessionBudget::new(limits_sessions_max)),
            read_budget: read_budget.clone(),
        };
        let idle_poll = Duration::from_micros(u64::from(config.server.idle_poll_us));
        if !idle_poll.is_zero() {
            info!(
                idle_poll_us = config.server.idle_poll_us,
                "shards poll for I/O before they sleep: each shard's CPU stays busy while \
                 messages arrive closer together than this"
            );
        }
        let mut executors = Vec::with_capacity(shard_count);
        for (k, cpu) in cpus.iter().enumerate() {
            let boot = boot.clone();
            let mut builder = LocalExecutorBuilder::new(Placement::Fixed(*cpu));
            if !idle_poll.is_zero() {
                // glommio polls its rings (no sleep, no membarrier) until this
                // long has passed since the shard last ran a task, then parks.
                builder = builder.spin_before_park(idle_poll);
            }
            let handle = builder
                .name(&format!("shard-{k}"))
                .io_memory(IO_MEMORY_BYTES)
                // Password hashing runs here: one thread the OS may place on
                // any CPU, so a hash never waits behind this shard.
                .blocking_thread_pool_placement(PoolPlacement::Unbound(1))
                .spawn(move || shard_main(boot))
                .map_err(|e| {
                    anyhow!(
                        "cannot start shard {k} on CPU {cpu}: {e}. glommio needs io_uring \
                         (Linux 5.8+, not disabled by kernel.io_uring_disabled or a container \
                         seccomp profile) and at least 512 KiB of locked memory (ulimit -l)"
                    )
                })?;
            executors.push(handle);
        }
        drop(boot);
        for _ in 0..shard_count {
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    stop.store(true, Ordering::SeqCst);
                    bail!("{e}");
                }
                Err(_) => {
                    stop.store(true, Ordering::SeqCst);
                    bail!("shards did not start within 10 s");
                }
            }
        }
        drop(reservations);
        spawn_auth_reloader(&auth, &stop);
        Ok(Server {
            stop,
            auth,
            _data_lock: data_lock,
            store_stats,
            executors,
            mqtt_addrs: listeners
                .iter()
                .filter(|l| l.kind == ListenerKind::Mqtt)
                .map(|l| l.bind)
                .collect(),
            urls: listeners.iter().map(|l| (l.kind, l.url(l.bind))).collect(),
            listeners,
            tls,
            admin_links,
            connections_max: connections_total_max,
            read_budget,
        })
    }

    /// Re-reads the certificates, keys and CAs of every TLS listener: new
    /// handshakes use them, established connections are untouched. On any
    /// error nothing changes. Returns the number of TLS listeners.
    pub fn reload_tls(&self) -> anyhow::Result<usize> {
        self.tls.reload(&self.listeners)
    }

    /// Re-reads the password, ACL, ban and JWT key files now (SIGHUP). A
    /// broken file is logged and the previous ones stay in force.
    pub fn reload_auth(&self) {
        self.auth.reload();
    }

    /// The security files' hub (the admin API's ban endpoints edit it).
    pub fn auth_hub(&self) -> Arc<AuthHub> {
        self.auth.clone()
    }

    /// Number of shards running.
    pub fn shards(&self) -> usize {
        self.executors.len()
    }

    /// Asks every shard to shut down gracefully.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Waits until every shard exited.
    pub fn join(self) -> anyhow::Result<()> {
        for h in self.executors {
            h.join().map_err(|e| anyhow!("shard failed: {e}"))?;
        }
        Ok(())
    }
}

/// File descriptors kept for everything but client sockets: listeners, the
/// io_uring rings, logs, data files.
const FDS_RESERVED: usize = 64;

/// Raises the soft open-files limit to the hard one and returns the number of
/// client connections that fit under it: the configured maximum, or less, with
/// a warning naming the limit and the fix.
fn connections_max(configured: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return configured;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    let fit = (lim.rlim_cur as usize).saturating_sub(FDS_RESERVED);
    if configured > fit {
        warn!(
            max_connections = configured,
            open_files_limit = lim.rlim_cur,
            "limits.max_connections exceeds what the open-files limit allows; serving at most \
             {fit}. Raise the limit (LimitNOFILE= in systemd, ulimit -n, \
             kernel-tuning/) to serve more"
        );
        return fit;
    }
    configured
}

/// Checks the security files' modification times every `reload_interval_s`
/// until the broker stops.
fn spawn_auth_reloader(auth: &Arc<AuthHub>, stop: &Arc<AtomicBool>) {
    let interval = auth.config().reload_interval_s;
    if interval == 0 || !auth.enabled() {
        return;
    }
    let (auth, stop) = (auth.clone(), stop.clone());
    let spawned = std::thread::Builder::new()
        .name("auth-reload".into())
        .spawn(move || {
            let step = Duration::from_millis(100);
            let mut waited = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(step);
                waited += step;
                if waited >= Duration::from_secs(u64::from(interval)) {
                    waited = Duration::ZERO;
                    auth.reload_if_changed();
                }
            }
        });
    if let Err(e) = spawned {
        warn!("cannot start the security file reload thread ({e}); SIGHUP still reloads");
    }
}

fn engine_limits(config: &Config, shard_count: usize) -> Limits {
    let l = &config.limits;
    Limits {
        packet_size_bytes_max: l.max_packet_size_bytes,
        inflight_count_max: l.max_inflight,
        receive_maximum: l.max_inflight,
        queued_count_max: l.max_queued_messages as usize,
        subscriptions_count_max: match l.max_subscriptions_per_client {
            0 => usize::MAX,
            n => n as usize,
        },
        topic_levels_max: l.max_topic_levels as usize,
        topic_alias_max: l.max_topic_alias,
        outbound_topic_alias_max: l.max_outbound_topic_alias,
        mqtt5: mqtt5_settings(&config.mqtt5),
        sys: tessera_shard::sys::SysSettings {
            interval_ms: u64::from(config.sys.interval_s) * 1000,
            version: format!("tessera {}", env!("CARGO_PKG_VERSION")),
        },
        keep_alive_s_max: l.max_keep_alive_s,
        publish_rate_per_s: l.publish_rate_per_s,
        publish_bytes_per_s: l.publish_bytes_per_s,
        queue_overflow: match l.queue_overflow {
            QueueOverflow::DropQos0ThenOldest => EngineOverflow::DropQos0ThenOldest,
            QueueOverflow::DropOldest => EngineOverflow::DropOldest,
            QueueOverflow::DropNew => EngineOverflow::DropNew,
            QueueOverflow::Disconnect => EngineOverflow::Disconnect,
        },
        queue_high_water: l.queue_high_water() as usize,
        backpressure_hold_ms_max: u64::from(l.backpressure_hold_ms_max),
        session_expiry_s_max: l.max_session_expiry_s,
        sessions_count_max: unlimited_if_zero(l.max_sessions.into()) as usize,
        retained_count_max: unlimited_if_zero(l.max_retained_messages.into()) as usize,
        retained_bytes_max: unlimited_if_zero(l.max_retained_bytes),
        queue_bytes_max: l.max_queued_bytes,
        queue_bytes_shard_max: l.max_queued_bytes_total / shard_count as u64,
        shared_subscription_strategy: match l.shared_subscription_strategy {
            SharedStrategy::RoundRobin => EngineShared::RoundRobin,
            SharedStrategy::Random => EngineShared::Random,
            SharedStrategy::Sticky => EngineShared::Sticky,
            SharedStrategy::HashClientId => EngineShared::HashClientId,
        },
        ..Limits::default()
    }
}

/// A count limit where the config's 0 means "no limit".
fn unlimited_if_zero(n: u64) -> u64 {
    if n == 0 { u64::MAX } else { n }
}

/// The engine's `[mqtt5]` settings; the strings were validated with the config.
fn mqtt5_settings(m: &crate::config::Mqtt5Config) -> tessera_shard::engine::Mqtt5Settings {
    use crate::config::Redirect;
    use tessera_shard::engine::Redirect as EngineRedirect;
    tessera_shard::engine::Mqtt5Settings {
        reason_strings: m.reason_strings,
        response_information_prefix: m.response_information_prefix.clone(),
        redirect: match m.redirect {
            Redirect::None => EngineRedirect::None,
            Redirect::UseAnotherServer => EngineRedirect::UseAnotherServer,
            Redirect::ServerMoved => EngineRedirect::ServerMoved,
        },
        server_reference: (!m.server_reference.is_empty()).then(|| {
            Str::try_from(m.server_reference.as_str()).expect("validated server reference")
        }),
    }
}

fn reserve_port(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    Ok(sock)
}

/// A token bucket for the connect rate: `rate` tokens per second, bursts of up
/// to one second's worth. A rate of 0 never limits.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: f64) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: rate.max(1.0),
            at: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One shard's state shared by its tasks (all on one thread).
struct Shard {
    id: usize,
    shard_count: usize,
    engine: RefCell<Engine>,
    senders: Senders<Envelope>,
    /// Envelopes waiting for each peer's channel, in order.
    mesh_out: RefCell<Vec<VecDeque<Envelope>>>,
    mesh_wakers: RefCell<Vec<Option<Waker>>>,
    connections: Cell<usize>,
    /// Accepted sockets still reading their CONNECT on this shard.
    pending_connects: Cell<usize>,
    connections_max: usize,
    connect_rate: RefCell<TokenBucket>,
    max_packet: usize,
    connect_timeout: Duration,
    id_seed: Cell<u64>,
    /// Authentication, ACL, bans and flapping detection of this shard.
    auth: Rc<ShardAuth>,
    /// New connections are refused while the process's RSS is above it; 0 = off.
    memory_high_water_bytes: u64,
    /// Per-listener connection counts and connect rates of this shard.
    listener_limits: ListenerLimits,
    /// The rate limit of WARN lines about refused connections.
    refusals: RefCell<RefusalLog>,
    /// Idle connections waiting without a task (`park`).
    parking: park::Parking,
    listeners: Vec<ListenerConfig>,
    tls: Arc<TlsStore>,
    /// This shard's copy of the TLS configurations and the store generation
    /// it was taken at (refreshed after a reload).
    tls_cache: RefCell<(u64, Vec<Option<Arc<rustls::ServerConfig>>>)>,
    /// The shard's store, when persistence is on.
    store: Option<ShardStore>,
    /// The node's bytes of large packets in read buffers (`read_budget`).
    read_budget: Arc<ReadBudget>,
}

impl Shard {
    /// Moves what the engine produced for other shards into the peer queues,
    /// and what it produced for the store into the writer's queue.
    fn flush_outbox(&self) {
        if let Some(store) = &self.store {
            store.take_batch(&mut self.engine.borrow_mut());
        }
        let mut engine = self.engine.borrow_mut();
        if !engine.has_outbox() {
            return;
        }
        let mut out = self.mesh_out.borrow_mut();
        let mut wakers = self.mesh_wakers.borrow_mut();
        engine.drain_outbox(|to, batch| {
            let to = usize::from(to);
            out[to].push_back(Envelope::Batch(batch));
            if let Some(w) = wakers[to].take() {
                w.wake();
            }
        });
    }

    fn send_envelope(&self, to: usize, env: Envelope) {
        self.mesh_out.borrow_mut()[to].push_back(env);
        if let Some(w) = self.mesh_wakers.borrow_mut()[to].take() {
            w.wake();
        }
    }

    /// The current TLS configuration of a listener (`None` without TLS).
    fn tls_config(&self, listener: ListenerId) -> Option<Arc<rustls::ServerConfig>> {
        let generation = self.tls.generation();
        let mut cache = self.tls_cache.borrow_mut();
        if cache.0 != generation {
            *cache = (generation, self.tls.snapshot());
        }
        cache.1.get(usize::from(listener)).cloned().flatten()
    }

    /// Whether readers should pause: the store writer is behind.
    fn store_backlogged(&self) -> bool {
        self.store.as_ref().is_some_and(ShardStore::backlogged)
    }

    fn mesh_backlog(&self) -> usize {
        self.mesh_out
            .borrow()
            .iter()
            .map(VecDeque::len)
            .max()
            .unwrap_or(0)
    }
}

async fn shard_main(boot: ShardBoot) {
    let stop = boot.stop.clone();
    let ready = boot.ready.clone();
    let (senders, mut receivers) = match boot.mesh.join().await {
        Ok(pair) => pair,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot join the shard mesh: {e}")));
            return;
        }
    };
    let id = senders.peer_id();
    let auth = Rc::new(ShardAuth::new(boot.auth.clone()));
    let mut engine = Engine::new(id as ShardId, boot.shard_count, boot.limits.clone());
    if auth.enabled() {
        engine.set_auth_hook(auth.clone());
    }
    // Before recovery, so the restored sessions count.
    engine.set_session_budget(boot.sessions.clone());
    let store = persist::attach(&boot.stores, id, &mut engine, now_ms());
    let status = boot.admin.status[id].clone();
    let _up = ShardUpGuard(status.clone());
    let admin_rx = boot.admin.receivers[id].clone();
    let (parking, doorbell) = match park::Parking::new(id, stop.clone()) {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "shard {id}: cannot set up parked connections: {e}"
            )));
            return;
        }
    };
    let shard = Rc::new(Shard {
        id,
        shard_count: boot.shard_count,
        engine: RefCell::new(engine),
        senders,
        mesh_out: RefCell::new((0..boot.shard_count).map(|_| VecDeque::new()).collect()),
        mesh_wakers: RefCell::new((0..boot.shard_count).map(|_| None).collect()),
        connections: Cell::new(0),
        pending_connects: Cell::new(0),
        connections_max: boot.connections_max,
        connect_rate: RefCell::new(TokenBucket::new(boot.connect_rate_per_s)),
        max_packet: boot.limits.packet_size_bytes_max as usize,
        connect_timeout: boot.connect_timeout,
        id_seed: Cell::new(now_ms() ^ ((id as u64) << 56) ^ u64::from(std::process::id())),
        tls_cache: RefCell::new((boot.tls.generation(), boot.tls.snapshot())),
        listeners: boot.listeners.clone(),
        tls: boot.tls.clone(),
        auth,
        memory_high_water_bytes: boot.memory_high_water_bytes,
        store,
        listener_limits: ListenerLimits::new(&boot.listeners, boot.shard_count),
        refusals: RefCell::new(RefusalLog::default()),
        parking,
        read_budget: boot.read_budget.clone(),
    });
    glommio::spawn_local(park::run_unparker(shard.clone(), doorbell)).detach();
    let _ = shard.auth.tick(now_ms(), shard.memory_high_water_bytes > 0);
    if shard.store.is_some() {
        glommio::spawn_local(persist::feed_writer(shard.clone())).detach();
        glommio::spawn_local(persist::receive_commits(shard.clone())).detach();
        // What the restore produced (records of sessions whose connection the
        // stop ended, shared-subscription announcements).
        shard.flush_outbox();
    }

    let mut listeners = Vec::new();
    for (listener_id, l) in boot.listeners.iter().enumerate() {
        match listen::bind(l.bind, boot.connect_timeout) {
            Ok(socket) => listeners.push((listener_id as ListenerId, socket)),
            Err(e) => {
                let _ = ready.send(Err(format!(
                    "shard {id}: cannot listen on {} ({} listener): {e}",
                    l.bind, l.kind
                )));
                return;
            }
        }
    }
    for (peer, receiver) in receivers.streams() {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(env) = receiver.recv().await {
                on_envelope(&shard, peer, env);
                // As in `conn::run`: a receive from a busy peer completes at once,
                // and without yielding, the writers of the subscribers these
                // batches feed would starve (and their queues overflow).
                futures_lite::future::yield_now().await;
            }
        })
        .detach();
    }
    for peer in (0..boot.shard_count).filter(|p| *p != id) {
        glommio::spawn_local(mesh_writer(shard.clone(), peer)).detach();
    }
    for (listener_id, listener) in listeners {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let mut failures = 0u64;
            let mut last_log = None;
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        shard.engine.borrow_mut().probe_mut().connection_accepted();
                        if let Ok(peer) = stream.peer_addr()
                            && shard.auth.ip_banned(peer.ip())
                        {
                            debug!(shard = shard.id, "banned address: closing");
                            drop(stream);
                            continue;
                        }
                        let now = Instant::now();
                        if !shard.connect_rate.borrow_mut().take(now)
                            || !shard
                                .listener_limits
                                .take_connect(usize::from(listener_id), now)
                        {
                            // Over the connect rate: close before reading anything.
                            refused_early(&shard, EarlyRefusal::ConnectionRateExceeded);
                            debug!(shard = shard.id, "connect rate exceeded: closing");
                            drop(stream);
                            continue;
                        }
                        glommio::spawn_local(accept_connection(shard.clone(), listener_id, stream))
                            .detach();
                    }
                    Err(e) => {
                        // Out of file descriptors (EMFILE/ENFILE) repeats until
                        // connections close: back off, and log once a minute
                        // with a count instead of a hundred times a second.
                        failures += 1;
                        if last_log.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(60))
                        {
                            warn!(shard = shard.id, failures, "accept failed: {e}");
                            last_log = Some(Instant::now());
                            failures = 0;
                        }
                        glommio::timer::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
        .detach();
    }
    glommio::spawn_local(admin_task(shard.clone(), admin_rx)).detach();
    // Recovery ran in `persist::attach` above, before any listener accepts:
    // from here the shard serves its restored state, and `/ready` says so.
    status.recovered.store(true, Ordering::SeqCst);
    status.up.store(true, Ordering::SeqCst);
    let _ = ready.send(Ok(id));
    info!(shard = id, "shard running");

    while !stop.load(Ordering::Relaxed) {
        glommio::timer::sleep(TICK).await;
        if shard.auth.tick(now_ms(), shard.memory_high_water_bytes > 0) {
            // A reload may ban clients that are connected: they go now.
            let auth = shard.auth.clone();
            let n = shard.engine.borrow_mut().disconnect_where(
                now_ms(),
                ReasonCode::AdministrativeAction,
                |client_id, user| auth.client_banned(client_id, user),
            );
            if n > 0 {
                info!(shard = shard.id, clients = n, "banned clients disconnected");
            }
        }
        // The engine's tick fires only what is due (a bounded batch; nothing
        // per idle connection). When a batch left more due, the rest runs in
        // further batches, yielding to connections between them.
        let now = now_ms();
        shard.engine.borrow_mut().tick(now);
        while shard
            .engine
            .borrow()
            .poll_timeout()
            .is_some_and(|t| t <= now)
        {
            shard.flush_outbox();
            futures_lite::future::yield_now().await;
            shard.engine.borrow_mut().tick(now);
        }
        shard.flush_outbox();
        shard
            .refusals
            .borrow_mut()
            .roll(now_ms(), |why, n| log_refusal_summary(shard.id, why, n));
        shard.parking.tick();
    }
    shard.engine.borrow_mut().shutdown(now_ms());
    shard.flush_outbox();
    let deadline = Instant::now() + SHUTDOWN_FLUSH;
    while shard.connections.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    persist::drain(&shard, SHUTDOWN_FLUSH).await;
    info!(shard = id, "shard stopped");
}

/// Whether this refused connection gets its own WARN line (at most a few per
/// second and kind, see `refusals`); logs the summary of a window that ended.
fn warn_refusal(shard: &Shard, why: Refusal) -> bool {
    shard.refusals.borrow_mut().admit(now_ms(), why, |why, n| {
        log_refusal_summary(shard.id, why, n)
    })
}

/// The one line for the refusals a window did not log one by one.
fn log_refusal_summary(shard: usize, why: Refusal, n: u64) {
    warn!(
        shard,
        reason = why.name(),
        refused = n,
        "{n} more connections refused ({}) in the last second",
        why.name()
    );
}

/// Counts a CONNECT the driver refused before the engine saw it.
fn refused_early(shard: &Shard, why: EarlyRefusal) {
    shard
        .engine
        .borrow_mut()
        .probe_mut()
        .connect_refused_early(why);
}

/// Answers the admin thread's queries on this shard, one at a time between
/// other tasks (see [`crate::admin::shard_call`]).
async fn admin_task(shard: Rc<Shard>, rx: flume::Receiver<ShardCall>) {
    while let Ok(call) = rx.recv_async().await {
        let view = DriverView {
            connections_current: shard.connections.get() + shard.pending_connects.get(),
        };
        call.answer(&mut shard.engine.borrow_mut(), now_ms(), view);
        shard.flush_outbox();
        futures_lite::future::yield_now().await;
    }
}

/// Counts a socket reading its CONNECT on this shard while alive.
struct PendingConnect<'a>(&'a Shard);

impl<'a> PendingConnect<'a> {
    fn new(shard: &'a Shard) -> PendingConnect<'a> {
        shard.pending_connects.set(shard.pending_connects.get() + 1);
        PendingConnect(shard)
    }
}

impl Drop for PendingConnect<'_> {
    fn drop(&mut self) {
        self.0
            .pending_connects
            .set(self.0.pending_connects.get() - 1);
    }
}

fn on_envelope(shard: &Rc<Shard>, from: usize, env: Envelope) {
    match env {
        Envelope::Batch(batch) => {
            let now = now_ms();
            {
                let mut engine = shard.engine.borrow_mut();
                engine.set_now_us(now_us());
                for msg in batch {
                    engine.handle_mesh(now, from as ShardId, msg);
                }
            }
            shard.flush_outbox();
        }
        Envelope::Handoff(h) => {
            let (stream, already_read, accepted) = h.into_stream(shard.id);
            let transport = Transport::from_parts(stream, accepted.transport);
            glommio::spawn_local(serve(
                shard.clone(),
                transport,
                already_read,
                accepted.connect,
                accepted.assigned,
                accepted.listener,
                accepted.admission,
            ))
            .detach();
        }
    }
}

/// Sends this shard's queued envelopes to `peer`, coalescing batches.
async fn mesh_writer(shard: Rc<Shard>, peer: usize) {
    loop {
        let env = poll_fn(|cx| {
            let mut out = shard.mesh_out.borrow_mut();
            let Some(first) = out[peer].pop_front() else {
                shard.mesh_wakers.borrow_mut()[peer] = Some(cx.waker().clone());
                return Poll::Pending;
            };
            let Envelope::Batch(mut batch) = first else {
                return Poll::Ready(first);
            };
            while batch.len() < MESH_ENVELOPE_MESSAGES_MAX
                && let Some(Envelope::Batch(_)) = out[peer].front()
            {
                if let Some(Envelope::Batch(more)) = out[peer].pop_front() {
                    batch.extend(more);
                }
            }
            Poll::Ready(Envelope::Batch(batch))
        })
        .await;
        if shard.senders.send_to(peer, env).await.is_err() {
            debug!(shard = shard.id, peer, "peer channel closed");
            return;
        }
    }
}

/// Runs the transport handshakes of a new connection (TLS, WebSocket) and
/// reads its CONNECT, all within the connect timeout, then serves it here or
/// hands it to the shard owning its ClientID.
async fn accept_connection(shard: Rc<Shard>, listener: ListenerId, stream: TcpStream) {
    let pending = PendingConnect::new(&shard);
    let _ = stream.set_nodelay(true);
    // TCP keepalive catches peers that vanished without a FIN when the client
    // asked for MQTT keep alive 0 (no broker-side timeout then).
    // SAFETY: the fd belongs to `stream`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let _ = socket2::SockRef::from(&fd).set_keepalive(true);
    let deadline = Instant::now() + shard.connect_timeout;
    let spec = &shard.listeners[usize::from(listener)];
    let peer = stream.peer_addr().ok();
    let handshake =
        async { Some(Transport::accept(stream, spec, shard.tls_config(listener)).await) };
    let expire = async {
        glommio::timer::sleep(shard.connect_timeout).await;
        None
    };
    let (mut stream, mut buf, identity) = match futures_lite::future::or(handshake, expire).await {
        Some(Ok(accepted)) => accepted,
        Some(Err(e @ (AcceptError::Tls(_) | AcceptError::Upgrade(_)))) => {
            // Operators need to see refused certificates and upgrades; the
            // client's address says who.
            if warn_refusal(&shard, Refusal::Handshake) {
                warn!(
                    listener = %spec.url(spec.bind),
                    peer = ?peer,
                    reason = Refusal::Handshake.name(),
                    "connection refused: {e}"
                );
            }
            return;
        }
        Some(Err(e)) => {
            // A client (or a port scanner) that went away mid-handshake.
            debug!(listener = %spec.url(spec.bind), peer = ?peer, "handshake ended: {e}");
            return;
        }
        None => {
            debug!(listener = %spec.url(spec.bind), "no handshake within the connect timeout: closing");
            return;
        }
    };
    // A CONNECT may carry a large will: it draws on the read budget too.
    let mut reservation = read_budget::Reservation::new(shard.read_budget.clone());
    let connect = loop {
        match tessera_proto::check(&buf, shard.max_packet) {
            Ok(h) if h.packet_type != PacketType::Connect => {
                debug!("first packet is {:?}, not CONNECT: closing", h.packet_type);
                refused_early(&shard, EarlyRefusal::Malformed);
                return;
            }
            Ok(_) => {
                match tessera_proto::decode(&mut buf, ProtocolVersion::V3_1_1, shard.max_packet) {
                    Ok(Some(Packet::Connect(c))) => break *c,
                    Err(DecodeError::UnsupportedProtocol { level, .. }) => {
                        // [MQTT-3.1.2-2]: answer an unsupported level with return code
                        // 0x01 (3.1.1 format, which every version can parse) and close.
                        debug!(level, "unsupported protocol level: refusing");
                        refused_early(&shard, EarlyRefusal::UnsupportedProtocolVersion);
                        let _ = stream.send(&[0x20, 0x02, 0x00, 0x01]).await;
                        return;
                    }
                    other => {
                        debug!("bad CONNECT: {other:?}: closing");
                        refused_early(&shard, EarlyRefusal::Malformed);
                        return;
                    }
                }
            }
            Err(DecodeError::Incomplete { .. }) => {
                if reservation.track(&mut buf, shard.max_packet).is_err() {
                    // No version known yet to answer in: closed, counted, logged.
                    shard
                        .engine
                        .borrow_mut()
                        .limit_refused(Limit::ReadBuffers, None);
                    return;
                }
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    debug!("no CONNECT within the connect timeout: closing");
                    refused_early(&shard, EarlyRefusal::ConnectTimeout);
                    return;
                };
                // Dropping a pending read loses nothing: glommio's unbuffered
                // read waits for readiness, then copies straight into `buf`.
                let read = async { Some(read_more(&mut stream, &mut buf).await) };
                let expire = async {
                    glommio::timer::sleep(left).await;
                    None
                };
                match futures_lite::future::or(read, expire).await {
                    Some(Ok(n)) if n > 0 => {}
                    None => {
                        debug!("no CONNECT within the connect timeout: closing");
                        refused_early(&shard, EarlyRefusal::ConnectTimeout);
                        return;
                    }
                    _ => return,
                }
            }
            Err(e) => {
                debug!("bad first packet: {e}: closing");
                if matches!(e, DecodeError::PacketTooLarge { .. }) {
                    shard
                        .engine
                        .borrow_mut()
                        .limit_refused(Limit::PacketSize, None);
                }
                refused_early(&shard, EarlyRefusal::Malformed);
                return;
            }
        }
    };
    let mut connect = connect;
    if let Some(name) = identity {
        match Str::try_from(name) {
            Ok(name) => {
                debug!(listener = %spec.url(spec.bind), username = %name.as_str(), "username from the client certificate");
                connect.username = Some(name);
            }
            Err(e) => {
                if warn_refusal(&shard, Refusal::CertificateIdentity) {
                    warn!(listener = %spec.url(spec.bind), peer = ?peer, reason = Refusal::CertificateIdentity.name(), "client certificate identity is not a valid MQTT username ({e:?}): closing");
                }
                return;
            }
        }
    } else if spec.username_from_cert != crate::config::CertIdentity::None {
        if warn_refusal(&shard, Refusal::CertificateIdentity) {
            warn!(
                listener = %spec.url(spec.bind),
                peer = ?peer,
                reason = Refusal::CertificateIdentity.name(),
                "client certificate has no {} to use as username: closing",
                spec.username_from_cert
            );
        }
        return;
    }
    let Some(admission) = admit(
        &shard,
        &mut stream,
        &mut buf,
        &mut connect,
        spec.username_from_cert != crate::config::CertIdentity::None,
        spec.allow_anonymous,
        deadline,
    )
    .await
    else {
        return;
    };
    let mut assigned = false;
    if connect.client_id.is_empty() {
        // An assigned id hashes to this shard, so the connection never hops.
        let mut seed = shard.id_seed.get();
        let id = assign_client_id(shard.id, shard.shard_count, &mut seed);
        shard.id_seed.set(seed);
        connect.client_id = Str::try_from(id).expect("assigned ids are ASCII");
        assigned = true;
    }
    let owner = shard_for(connect.client_id.as_bytes(), shard.shard_count);
    // From here the connection counts in `connections` (of this shard or the
    // owner): no longer pending.
    drop(pending);
    if owner == shard.id {
        glommio::spawn_local(serve(
            shard,
            stream,
            buf.freeze(),
            connect,
            assigned,
            listener,
            admission,
        ))
        .detach();
    } else {
        let (stream, transport) = stream.into_parts();
        let accepted = Accepted {
            connect,
            assigned,
            listener,
            transport,
            admission,
        };
        match Handoff::detach(stream, buf.freeze(), owner, accepted) {
            Ok(h) => shard.send_envelope(owner, Envelope::Handoff(Box::new(h))),
            Err(e) => warn!("hand-off to shard {owner} failed: {e}"),
        }
    }
}

/// Writes a refusing CONNACK in the client's version and closes.
async fn refuse(mut stream: Transport, version: ProtocolVersion, rc: ReasonCode) {
    let _ = send_connack(&mut stream, version, rc).await;
}

async fn send_connack(
    stream: &mut Transport,
    version: ProtocolVersion,
    rc: ReasonCode,
) -> std::io::Result<()> {
    let ack = ConnAck {
        session_present: false,
        reason_code: rc,
        properties: Default::default(),
    };
    let mut out = BytesMut::new();
    if ack.encode(version, &mut out).is_ok() {
        stream.send(&out).await?;
    }
    Ok(())
}

/// Authenticates a decoded CONNECT on the accepting shard (so a refused
/// client never costs a hand-off), running an MQTT 5 enhanced authentication
/// exchange (AUTH 0x18 both ways) within the connect deadline. Returns what
/// the engine needs, or `None` after refusing the client (CONNACK written).
/// Either way the CONNECT no longer holds its password. `cert_identity`: the
/// listener took the user name from a verified client certificate.
async fn admit(
    shard: &Shard,
    stream: &mut Transport,
    buf: &mut BytesMut,
    connect: &mut Connect,
    cert_identity: bool,
    allow_anonymous: Option<bool>,
    deadline: Instant,
) -> Option<Admission> {
    if !shard.auth.enabled() {
        connect.password = None;
        return Some(Admission::default());
    }
    let version = connect.version;
    let method = connect.properties.authentication_method.clone();
    let mut verdict = shard
        .auth
        .authenticate(connect, cert_identity, allow_anonymous)
        .await;
    let mut exchanges = 0;
    loop {
        match verdict {
            Verdict::Accept {
                expires_unix_s,
                token_acl,
            } => {
                return Some(Admission {
                    auth_data: connect.properties.authentication_data.take(),
                    auth_method: method,
                    expires_at_ms: expires_unix_s.map(engine_ms_of_unix),
                    token_acl,
                });
            }
            Verdict::Refuse(rc) => {
                shard.engine.borrow_mut().probe_mut().connect_result(rc);
                let _ = send_connack(stream, version, rc).await;
                debug!(reason = ?rc, "CONNECT refused");
                return None;
            }
            Verdict::Continue { data, state } => {
                // SCRAM needs one round trip; a bound keeps a client from
                // holding the exchange open.
                exchanges += 1;
                let method = method.clone()?;
                let auth = tessera_proto::Auth {
                    reason_code: ReasonCode::ContinueAuthentication,
                    properties: tessera_proto::AuthProperties {
                        authentication_method: Some(method.clone()),
                        authentication_data: Some(data),
                        ..Default::default()
                    },
                };
                let mut out = BytesMut::new();
                Packet::Auth(auth).encode(version, &mut out).ok()?;
                stream.send(&out).await.ok()?;
                let answer = read_packet(stream, buf, version, shard.max_packet, deadline).await?;
                verdict = match answer {
                    Packet::Auth(a)
                        if exchanges <= 2
                            && a.reason_code == ReasonCode::ContinueAuthentication
                            && a.properties.authentication_method.as_ref() == Some(&method) =>
                    {
                        let data = a.properties.authentication_data.unwrap_or_default();
                        shard.auth.continue_auth(connect, &state, &data)
                    }
                    _ => Verdict::Refuse(ReasonCode::ProtocolError),
                };
            }
        }
    }
}

/// The engine clock's value at a Unix time in seconds.
fn engine_ms_of_unix(unix_s: u64) -> u64 {
    let now_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (now_ms() + unix_s.saturating_mul(1000)).saturating_sub(now_unix_ms)
}

/// Reads one packet before `deadline`; `None` on timeout, close or a decode
/// error.
async fn read_packet(
    stream: &mut Transport,
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet: usize,
    deadline: Instant,
) -> Option<Packet> {
    loop {
        match tessera_proto::decode(buf, version, max_packet) {
            Ok(Some(p)) => return Some(p),
            Ok(None) => {}
            Err(e) => {
                debug!("bad packet during authentication: {e}");
                return None;
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        let read = async { Some(read_more(stream, buf).await) };
        let expire = async {
            glommio::timer::sleep(left).await;
            None
        };
        match futures_lite::future::or(read, expire).await {
            Some(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

/// Reads once into `buf`; returns the bytes read (0 at end of stream).
async fn read_more(stream: &mut Transport, buf: &mut BytesMut) -> std::io::Result<usize> {
    let start = buf.len();
    // The first read is small: a CONNECT usually fits, and a burst of
    // thousands of new connections then holds thousands of small buffers, not
    // 4 KiB ones that leave the heap fragmented once freed.
    let chunk = if start == 0 {
        PROBE_BYTES
    } else {
        READ_CHUNK_BYTES
    };
    buf.resize(start + chunk, 0);
    let r = poll_fn(|cx| stream.poll_read(cx, &mut buf[start..])).await;
    let n = *r.as_ref().unwrap_or(&0);
    buf.truncate(start + n);
    r
}

/// Serves one connection on its owner shard until it ends.
async fn serve(
    shard: Rc<Shard>,
    stream: Transport,
    already_read: Bytes,
    connect: Connect,
    assigned: bool,
    listener: ListenerId,
    admission: Admission,
) {
    let version = connect.version;
    #[cfg(feature = "fault-injection")]
    crate::fatal::fault::on_connect(shard.id, connect.client_id.as_str());
    // Refusals for load: 3.1.1 return code 3, v5 0x89.
    let busy = if version.is_v5() {
        ReasonCode::ServerBusy
    } else {
        ReasonCode::ServerUnavailable
    };
    let high_water = shard.memory_high_water_bytes;
    if high_water > 0 && shard.auth.rss_bytes.get() > high_water {
        if warn_refusal(&shard, Refusal::MemoryHighWater) {
            warn!(
                shard = shard.id,
                rss_bytes = shard.auth.rss_bytes.get(),
                high_water,
                reason = Refusal::MemoryHighWater.name(),
                "memory above limits.memory_high_water_bytes: refusing new connections"
            );
        }
        shard.engine.borrow_mut().probe_mut().connect_result(busy);
        return refuse(stream, version, busy).await;
    }
    // Flapping is counted here, on the owner shard of the ClientID.
    if shard.auth.flapping(now_ms(), &connect.client_id) {
        let banned = ReasonCode::Banned;
        shard.engine.borrow_mut().probe_mut().connect_result(banned);
        return refuse(stream, version, banned).await;
    }
    if shard.connections.get() >= shard.connections_max {
        refused_early(&shard, EarlyRefusal::ConnectionLimit);
        refuse(stream, version, busy).await;
        if warn_refusal(&shard, Refusal::ConnectionLimit) {
            warn!(
                shard = shard.id,
                max = shard.connections_max,
                listener = %shard.listeners[usize::from(listener)].url(shard.listeners[usize::from(listener)].bind),
                reason = Refusal::ConnectionLimit.name(),
                "connection limit reached: refusing"
            );
        }
        return;
    }
    if !shard.listener_limits.hold(usize::from(listener)) {
        if warn_refusal(&shard, Refusal::ListenerConnectionLimit) {
            warn!(
                shard = shard.id,
                listener = %shard.listeners[usize::from(listener)].url(shard.listeners[usize::from(listener)].bind),
                reason = Refusal::ListenerConnectionLimit.name(),
                "listener connection limit reached: refusing"
            );
        }
        return refuse(stream, version, busy).await;
    }
    shard.connections.set(shard.connections.get() + 1);
    // What the accepting shard read: the CONNECT and the bytes after it.
    let bytes_read = connect.encoded_len(version) + already_read.len();
    let conn = {
        let mut engine = shard.engine.borrow_mut();
        engine.record_bytes_received(bytes_read);
        engine.connect_admitted(now_ms(), connect, assigned, admission)
    };
    shard.flush_outbox();
    // The bytes left from the CONNECT read are copied into a right-sized
    // buffer so the accept-time read buffer is freed now.
    let input = BytesMut::from(&already_read[..]);
    drop(already_read);
    conn::spawn(shard, stream, input, conn, version, listener);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_limits_bursts_and_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0);
        assert!(b.take(t0) && b.take(t0), "a burst of one second's worth");
        assert!(!b.take(t0), "then nothing until it refills");
        assert!(
            b.take(t0 + Duration::from_millis(500)),
            "half a second refills one token"
        );
        assert!(!b.take(t0 + Duration::from_millis(500)));
        let mut unlimited = TokenBucket::new(0.0);
        assert!((0..10_000).all(|_| unlimited.take(t0)));
    }
}
