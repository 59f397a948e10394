//! The glommio driver: boots one pinned executor per shard, joins them in a full
//! channel mesh, accepts MQTT connections on every shard (`SO_REUSEPORT`), hands
//! each connection to the shard owning its ClientID, and runs the shard's
//! [`Engine`] against real sockets.
//!
//! Lifecycle: [`Server::start`] returns once every shard listens; [`Server::stop`]
//! asks the shards to shut down (v5 clients get DISCONNECT 0x8B, output is
//! flushed); [`Server::join`] waits for the executors to exit. In a cluster,
//! [`Server::attach_cluster`] gives the shards the control plane once it runs.
//!
//! This file is the boot: the executors, the shard's state ([`Shard`]) and its
//! main loop (listeners, tick, shutdown). The rest, one home each:
//! - `accept`: transport handshakes (TLS, WebSocket, on the accepting shard),
//!   reading and authenticating the CONNECT, the hand-off to the owner shard;
//! - `mesh`: the shard-to-shard transport (batches of engine messages and
//!   hand-offs, one writer per peer);
//! - `serve`: a connection's admission on its owner shard; `conn`: its task,
//!   which reads packets into the engine and writes what the engine produced;
//! - `cluster`: a shard's side of the cluster (issue 15): its port to the
//!   control plane, committed ops and requests from other nodes;
//! - `listen` (`TCP_DEFER_ACCEPT`, a `somaxconn`-sized backlog), `park` (idle
//!   connections without a task), `persist` (the shard store), `read_budget`
//!   (the node's budget of large packets in read buffers), `refusals` (rate
//!   limited refusal logs), `rt` (the runtime seam of the cluster glue: glommio
//!   here, tokio's paused clock in the data-plane simulation, `sim`).
//!
//! With `server.idle_poll_us` each executor polls that long before it sleeps
//! (glommio's `spin_before_park`). The shards share one count of the node's
//! sessions (`tessera_shard::engine::SessionBudget`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd as _, IntoRawFd as _};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::task::Waker;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};
use tessera_proto::{Connect, ReasonCode, Str};
use tessera_shard::authz::Admission;
use tessera_shard::engine::{
    Engine, Limits, QueueOverflow as EngineOverflow, SessionBudget, SharedStrategy as EngineShared,
};
use tessera_shard::mesh::ShardId;
use tracing::{debug, info, warn};

use crate::admin::shard_call::{self, DriverView, ShardCall, ShardEnds, ShardLinks, ShardUpGuard};
use crate::auth::listener_limits::ListenerLimits;
use crate::auth::{AuthHub, ShardAuth};
use crate::config::{
    Config, ListenerConfig, ListenerId, ListenerKind, QueueOverflow, SharedStrategy,
};
use crate::transport::TransportState;
use crate::transport::tls::TlsStore;
use persist::{ShardStore, StoreBoot};

mod accept;
mod bridge;
mod claims;
mod cluster;
mod conn;
mod listen;
mod mesh;
mod park;
mod persist;
mod read_budget;
pub use read_budget::ReadBudget;
mod refusals;
mod remote;
mod rt;
mod serve;
#[cfg(test)]
mod sim;
mod takeover;
use accept::accept_connection;
use mesh::{Envelope, mesh_writer};
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
    clock_elapsed().as_millis() as u64 + 1
}

/// Broker-relative microseconds, the same clock on every shard: stamps
/// messages for the publish-to-deliver latency (`Engine::set_now_us`).
fn now_us() -> u64 {
    clock_elapsed().as_micros() as u64 + 1
}

/// Time since the broker's clock started (`rt::now`), or in the simulation since its
/// anchor (`rt::sim_elapsed`: a phase against the simulated clock that is the same in
/// every run, so a seed replays).
fn clock_elapsed() -> Duration {
    if let Some(d) = rt::sim_elapsed() {
        return d;
    }
    let start = *CLOCK_START.get_or_init(Instant::now);
    rt::now().saturating_duration_since(start)
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
    /// With `[cluster]`: the shards' cluster ends.
    cluster: Option<cluster::ServerClusterEnds>,
    /// The endpoint threads of the `quic` listeners.
    quic: Vec<crate::quic::QuicListener>,
    /// The bridges and their counters (`[[bridge]]`, reloaded on SIGHUP).
    pub bridges: Arc<crate::bridge::BridgeHub>,
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
    /// With `[cluster]`: where each shard's cluster port arrives.
    cluster: Option<cluster::ClusterEnds>,
    /// The configured bridges; each runs on its ClientID's owner shard.
    bridges: Arc<crate::bridge::BridgeHub>,
    /// Shards whose bridges are not subscribed yet: no shard listens before
    /// it is 0 (`bridge::Bridges::primed`).
    bridges_pending: Arc<AtomicUsize>,
    /// Where each shard (by id) takes new QUIC connections from the endpoint
    /// threads (`quic`).
    quic: Vec<flume::Receiver<crate::quic::NewQuic>>,
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
        // A QUIC listener's UDP sockets are its endpoints' (`endpoints`,
        // default one per shard, on one port).
        let mut reservations = Vec::new();
        let mut udp_sockets = Vec::new();
        let mut listeners = config.listeners();
        for (id, l) in listeners.iter_mut().enumerate() {
            let addr = l.bind;
            let context = || format!("cannot listen on {addr} ({} listener)", l.kind);
            if l.kind.is_udp() {
                let endpoints = l.endpoints.map_or(shard_count, |n| n as usize);
                let bound = crate::quic::bind(addr, endpoints).with_context(context)?;
                if let Some(why) = &bound.fallback {
                    warn!(listener = %addr, "QUIC listener: {why}");
                }
                l.bind = bound.sockets[0].local_addr()?;
                udp_sockets.push((id as ListenerId, bound.sockets));
                continue;
            }
            let sock = reserve_port(addr).with_context(context)?;
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
        let (server_cluster, shard_cluster) = if config.cluster.enabled() {
            let (server_ends, shard_ends) = cluster::ends(
                shard_count,
                config.cluster.retained_inline_bytes,
                crate::forward::origin_tag(),
            );
            (Some(server_ends), Some(shard_ends))
        } else {
            (None, None)
        };
        let bridges = crate::bridge::BridgeHub::new(&config.bridge);
        let (quic_tx, quic_rx): (Vec<_>, Vec<_>) = (0..shard_count)
            .map(|_| flume::bounded(crate::quic::NEW_CONNECTIONS_QUEUED_MAX))
            .unzip();
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
            cluster: shard_cluster,
            bridges: bridges.clone(),
            bridges_pending: Arc::new(AtomicUsize::new(shard_count)),
            quic: if udp_sockets.is_empty() {
                Vec::new()
            } else {
                quic_rx
            },
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
        let quic_settings = crate::quic::QuicSettings::new(
            config.limits.connect_timeout_s,
            config.limits.max_keep_alive_s,
        );
        let mut quic = Vec::new();
        for (id, sockets) in udp_sockets {
            let started = crate::quic::QuicListener::start(
                id,
                &listeners[usize::from(id)],
                sockets,
                tls.clone(),
                quic_tx.clone(),
                quic_settings.clone(),
                stop.clone(),
            );
            match started {
                Ok(q) => quic.push(q),
                Err(e) => {
                    stop.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
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
            cluster: server_cluster,
            quic,
            bridges,
        })
    }

    /// With `[cluster]`: each shard's queue for requests from other nodes (index = shard
    /// id), for the control thread's `ForwardService`. Empty without a cluster.
    pub fn peer_request_queues(&self) -> Vec<flume::Sender<crate::cluster::peer::PeerRequest>> {
        self.cluster
            .as_ref()
            .map(|c| c.requests.clone())
            .unwrap_or_default()
    }

    /// With `[cluster]`, once: what the control thread needs to start the forwarder
    /// (`crate::forward::start`): its channel ends, the shards' remote id and the
    /// broker's clocks.
    pub fn take_forwarder(
        &self,
    ) -> Option<(
        crate::forward::ForwarderEnds,
        ShardId,
        crate::forward::Clocks,
    )> {
        let c = self.cluster.as_ref()?;
        let ends = c
            .forwarder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        Some((ends, self.shards() as ShardId, remote::CLOCKS))
    }

    /// Gives every shard this node's cluster port (once the control plane runs). Until
    /// then a clustered shard refuses what needs the cluster. A no-op without
    /// `[cluster]`.
    pub fn attach_cluster(&self, port: &crate::cluster::ClusterPort) {
        if let Some(c) = &self.cluster {
            for tx in &c.attach {
                let _ = tx.try_send(port.clone());
            }
        }
    }

    /// Re-reads the certificates, keys and CAs of every TLS listener: new
    /// handshakes use them, established connections are untouched. On any
    /// error nothing changes. Returns the number of TLS listeners.
    pub fn reload_tls(&self) -> anyhow::Result<usize> {
        self.tls.reload(&self.listeners)
    }

    /// The TLS listeners' configurations and certificate expiries.
    pub fn tls_store(&self) -> Arc<TlsStore> {
        self.tls.clone()
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

    /// Each QUIC listener's URL and gauges (for `/metrics`).
    pub fn quic_counters(&self) -> Vec<(String, Arc<crate::quic::QuicCounters>)> {
        self.quic.iter().map(|q| q.counters.clone()).collect()
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
        for q in self.quic {
            q.join();
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
        forward_pace_ms_max: config.cluster.forward_pace_ms_max,
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
    /// The shard mesh (`None` only in the simulation, which carries the envelopes
    /// between its shards itself: `sim`, over `mesh::next_envelope`).
    senders: Option<Senders<Envelope>>,
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
    /// Whether the node runs in a cluster (`[cluster]`): then `cluster` is needed for
    /// what the data plane guarantees, and is `None` until the control plane runs.
    clustered: bool,
    /// The cluster, once attached (`cluster`).
    cluster: RefCell<Option<Rc<cluster::ShardCluster>>>,
    /// With `[cluster]`: the engine's remote id and the forwarder's channels (`remote`).
    remote: Option<remote::ShardRemote>,
    stop: Arc<AtomicBool>,
}

impl Shard {
    /// The current TLS configuration of a listener (`None` without TLS).
    fn tls_config(&self, listener: ListenerId) -> Option<Arc<rustls::ServerConfig>> {
        let generation = self.tls.generation();
        let mut cache = self.tls_cache.borrow_mut();
        if cache.0 != generation {
            *cache = (generation, self.tls.snapshot());
        }
        cache.1.get(usize::from(listener)).cloned().flatten()
    }

    /// Counts a new connection on `listener` from `peer` and says whether it
    /// may go on: not from a banned address, within the connect rates (the
    /// shard's and the listener's). A refused one is closed before anything
    /// is read.
    fn admit_new(&self, listener: ListenerId, peer: Option<SocketAddr>) -> bool {
        self.engine.borrow_mut().probe_mut().connection_accepted();
        if peer.is_some_and(|p| self.auth.ip_banned(p.ip())) {
            debug!(shard = self.id, "banned address: closing");
            return false;
        }
        let now = Instant::now();
        if !self.connect_rate.borrow_mut().take(now)
            || !self
                .listener_limits
                .take_connect(usize::from(listener), now)
        {
            refused_early(self, EarlyRefusal::ConnectionRateExceeded);
            debug!(shard = self.id, "connect rate exceeded: closing");
            return false;
        }
        true
    }

    /// Whether the shard is shutting down.
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The cluster, when attached.
    fn cluster(&self) -> Option<Rc<cluster::ShardCluster>> {
        self.cluster.borrow().clone()
    }

    /// Whether readers should pause: the store writer is behind.
    fn store_backlogged(&self) -> bool {
        self.store
            .as_ref()
            .is_some_and(|s| s.backlogged(&self.engine.borrow()))
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

/// The part of a shard's start that needs no sockets and no glommio mesh (the
/// data-plane simulation starts its shards with it too): the engine, its remote id in a
/// cluster, the restore from the store, the [`Shard`], and the tasks of the cluster
/// glue and the store (spawned through `rt`). `senders` is `None` only in the
/// simulation (its own ordered channels carry the envelopes between a node's shards).
fn start_shard(
    boot: &ShardBoot,
    id: usize,
    senders: Option<Senders<Envelope>>,
    parking: park::Parking,
) -> Result<Rc<Shard>, String> {
    let auth = Rc::new(ShardAuth::new(boot.auth.clone()));
    let mut engine = Engine::new(id as ShardId, boot.shard_count, boot.limits.clone());
    if auth.enabled() {
        engine.set_auth_hook(auth.clone());
    }
    // Before recovery, so the restored sessions count.
    engine.set_session_budget(boot.sessions.clone());
    // In a cluster the other nodes are one more mesh peer (before recovery, whose
    // routes they need too).
    let remote = match boot.cluster.as_ref().and_then(|c| c.forward.get(id)) {
        Some(end) => match engine.enable_remote() {
            Some(rid) => {
                engine.set_origin(end.origin);
                Some(remote::ShardRemote::new(rid, end.clone()))
            }
            None => {
                return Err(format!(
                    "{} shards leave no room for the cluster's remote id",
                    boot.shard_count
                ));
            }
        },
        None => None,
    };
    let mesh_slots = boot.shard_count + usize::from(remote.is_some());
    let store = persist::attach(&boot.stores, id, &mut engine, now_ms());
    let shard = Rc::new(Shard {
        id,
        shard_count: boot.shard_count,
        engine: RefCell::new(engine),
        senders,
        mesh_out: RefCell::new((0..mesh_slots).map(|_| VecDeque::new()).collect()),
        mesh_wakers: RefCell::new((0..mesh_slots).map(|_| None).collect()),
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
        clustered: boot.cluster.is_some(),
        cluster: RefCell::new(None),
        remote,
        stop: boot.stop.clone(),
    });
    remote::spawn(&shard);
    if let Some(ends) = boot.cluster.clone() {
        rt::spawn_local(cluster::run(shard.clone(), ends));
    }
    if shard.store.is_some() {
        rt::spawn_local(persist::feed_writer(shard.clone()));
        rt::spawn_local(persist::receive_commits(shard.clone()));
        // What the restore produced (records of sessions whose connection the
        // stop ended, shared-subscription announcements).
        shard.flush_outbox();
    }
    Ok(shard)
}

/// Fires the engine's due timers (keep alives, expiries): a bounded batch at a time;
/// when a batch left more due, the rest runs in further batches, yielding to
/// connections between them.
async fn tick_engine(shard: &Shard) {
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
}

async fn shard_main(boot: ShardBoot) {
    let stop = boot.stop.clone();
    let ready = boot.ready.clone();
    let (senders, mut receivers) = match boot.mesh.clone().join().await {
        Ok(pair) => pair,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot join the shard mesh: {e}")));
            return;
        }
    };
    let id = senders.peer_id();
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
    // SAFETY: the fd comes from a std stream we own and give up here.
    let doorbell = unsafe { glommio::net::UnixStream::from_raw_fd(doorbell.into_raw_fd()) };
    let shard = match start_shard(&boot, id, Some(senders), parking) {
        Ok(shard) => shard,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt::spawn_local(park::run_unparker(shard.clone(), doorbell));
    let _ = shard.auth.tick(now_ms(), shard.memory_high_water_bytes > 0);

    for (peer, receiver) in receivers.streams() {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(env) = receiver.recv().await {
                mesh::received(&shard, peer, env).await;
            }
        })
        .detach();
    }
    for peer in (0..boot.shard_count).filter(|p| *p != id) {
        glommio::spawn_local(mesh_writer(shard.clone(), peer)).detach();
    }
    // Bridges before any listener: a bridge's local session subscribes and
    // waits for its SUBACK (every shard has its routes), and no shard listens
    // before every shard's bridges did, so what a client publishes once the
    // broker accepts connections is queued for the bridges it matches.
    let mut bridges = bridge::Bridges::new(boot.bridges.clone());
    bridges.tick(&shard);
    bridges.primed().await;
    boot.bridges_pending.fetch_sub(1, Ordering::SeqCst);
    let barrier_deadline = Instant::now() + bridge::ROUTES_WAIT;
    while boot.bridges_pending.load(Ordering::SeqCst) > 0 && Instant::now() < barrier_deadline {
        // A shard that failed to start never counts down: the main thread
        // reports that failure, the deadline only ends this wait.
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    let mut listeners = Vec::new();
    for (listener_id, l) in boot.listeners.iter().enumerate() {
        if l.kind.is_udp() {
            // QUIC: the endpoint thread hands this shard its connections.
            continue;
        }
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
    for (listener_id, listener) in listeners {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let mut failures = 0u64;
            let mut last_log = None;
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        if !shard.admit_new(listener_id, stream.peer_addr().ok()) {
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
    if let Some(rx) = boot.quic.get(id) {
        glommio::spawn_local(quic_accept(shard.clone(), rx.clone())).detach();
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
        // The engine's tick fires only what is due (nothing per idle connection).
        tick_engine(&shard).await;
        shard
            .refusals
            .borrow_mut()
            .roll(now_ms(), |why, n| log_refusal_summary(shard.id, why, n));
        shard.parking.tick();
        bridges.tick(&shard);
    }
    bridges.stop_all();
    futures_lite::future::yield_now().await;
    shard.engine.borrow_mut().shutdown(now_ms());
    shard.flush_outbox();
    let deadline = Instant::now() + SHUTDOWN_FLUSH;
    while shard.connections.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    persist::drain(&shard, SHUTDOWN_FLUSH).await;
    info!(shard = id, "shard stopped");
}

/// Takes the QUIC connections the endpoint threads give this shard (their
/// MQTT stream is open), with the same admission checks as a TCP accept.
async fn quic_accept(shard: Rc<Shard>, rx: flume::Receiver<crate::quic::NewQuic>) {
    while let Ok(new) = rx.recv_async().await {
        if shard.admit_new(new.listener, Some(new.pipe.peer())) {
            glommio::spawn_local(accept::accept_quic(
                shard.clone(),
                new.listener,
                new.pipe,
                new.identity,
            ))
            .detach();
        }
    }
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
            listener_connections: shard.listener_limits.held(),
        };
        call.answer(&mut shard.engine.borrow_mut(), now_ms(), view);
        shard.flush_outbox();
        futures_lite::future::yield_now().await;
    }
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
