//! The link between cluster nodes: QUIC (quinn) with mutual TLS, implementing the
//! [`Transport`] seam for real processes.
//!
//! Lifecycle: [`Link::start`] runs inside the control thread's tokio runtime (quinn needs
//! tokio; the glommio shards never touch the link). It binds one UDP socket that both
//! accepts and dials, and keeps one connection per peer. Incoming requests are served by a
//! [`Service`] set later with [`Link::set_service`] (raft needs the transport before it can
//! build its service); until then the link answers "not ready". [`Link::shutdown`] closes
//! every connection and stops every task.
//!
//! On one connection each [`Channel`] has its own long-lived bidirectional stream per
//! direction, so a large snapshot never delays a vote (QUIC streams do not block each
//! other, and the raft stream has the highest send priority). A stream carries
//! length-prefixed frames ([`frame`]) with request ids, so many requests can be in flight
//! and answers are matched to them; each channel has its own frame size bound and call
//! timeout. The forward and snapshot channels are served in order (a publisher's order
//! holds, issue 15); raft and admin requests are served concurrently, up to a bound.
//!
//! Who a peer is comes from its certificate ([`tls`]): a dialer verifies the name
//! `node-<id>` of the node it dials, an acceptor reads the id from the client certificate.
//! Both must chain to the cluster CA; a handshake with a certificate from another CA is
//! refused and logged as such.
//!
//! One connection per peer pair: both sides may dial (at start, after a loss), and when
//! two connections exist for the same pair the rule below keeps the same one on both
//! sides. Each side says its instance id (boot time in ns) in a hello when a connection
//! opens; a connection from a newer instance of the peer (it restarted) replaces the old
//! one at once; two connections between the same instances keep the one dialed by the
//! lower node id and close the other after a grace period (so requests in flight on it
//! still get answers).
//!
//! Dead peers: QUIC keep-alives and the idle timeout ([`LinkConfig::tuned_for_election`])
//! detect a peer that stopped answering; a lost connection is redialed with capped
//! exponential back-off and jitter. While a peer is unreachable, calls to it fail at once
//! with [`TransportError::Unreachable`] (raft retries on its own schedule) rather than each
//! waiting out its timeout. [`Link::peers`] reports reachability, RTT and counters.
//!
//! What it does not do: decode channel payloads (the [`Service`] does, as untrusted input),
//! retry a failed call, or persist anything.

pub mod certs;
pub mod frame;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};

use crate::transport::{BoxFuture, Channel, NodeId, Service, Transport, TransportError};
use frame::{FrameError, FrameHeader, FrameKind, StreamKind};
pub use tls::{LinkCerts, TlsError};

/// QUIC application error codes the link closes connections and streams with.
mod code {
    /// The link is shutting down.
    pub const SHUTDOWN: u32 = 1;
    /// The connection duplicates another one between the same two nodes.
    pub const DUPLICATE: u32 = 2;
    /// The peer broke the link protocol (bad header, oversize frame, bad hello).
    pub const PROTOCOL: u32 = 3;
    /// The peer was removed from the cluster.
    pub const REMOVED: u32 = 4;
}

/// Settings of the link. [`LinkConfig::new`] gives defaults for a raft election timeout of
/// 1-2 s; [`LinkConfig::tuned_for_election`] derives the liveness settings from the real one.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// This node's id; its certificate must name it.
    pub node_id: NodeId,
    /// The UDP address to bind (accepts and dials from it).
    pub listen: SocketAddr,
    /// The peers to keep connections to, by id (not this node).
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// TLS material.
    pub certs: LinkCerts,
    /// A connection with no packet from the peer for this long is dead.
    pub idle_timeout: Duration,
    /// Send a keep-alive when a connection has been quiet this long.
    pub keep_alive: Duration,
    /// How long a call may take, per channel (index: [`channel_index`]).
    pub call_timeout: [Duration; 4],
    /// The largest request or response body, per channel (index: [`channel_index`]).
    pub frame_bytes_max: [usize; 4],
    /// Requests served at once per raft or admin stream.
    pub serve_concurrency_max: usize,
    /// Frames queued for one stream's writer before callers wait.
    pub write_queue_frames_max: usize,
    /// The first reconnect delay after a failure; doubles per failure up to `backoff_max`.
    pub backoff_min: Duration,
    /// The largest reconnect delay.
    pub backoff_max: Duration,
    /// How long a duplicate connection stays open for requests in flight on it.
    pub duplicate_grace: Duration,
    /// How long the hello exchange of a new connection may take.
    pub hello_timeout: Duration,
}

/// The index of a channel in the per-channel arrays of [`LinkConfig`].
pub fn channel_index(channel: Channel) -> usize {
    channel as usize - 1
}

/// Frame bodies are bounded well below the 4 GiB a frame's length field can say.
pub const FRAME_BYTES_MAX_LIMIT: usize = 1 << 30;

impl LinkConfig {
    /// Defaults for a raft election timeout of 1-2 s.
    pub fn new(node_id: NodeId, listen: SocketAddr, certs: LinkCerts) -> LinkConfig {
        LinkConfig {
            node_id,
            listen,
            peers: BTreeMap::new(),
            certs,
            idle_timeout: Duration::from_secs(2),
            keep_alive: Duration::from_millis(300),
            call_timeout: [
                Duration::from_secs(2),  // raft
                Duration::from_secs(60), // snapshot
                Duration::from_secs(5),  // forward
                Duration::from_secs(10), // admin
            ],
            frame_bytes_max: [32 << 20, 64 << 20, 16 << 20, 4 << 20],
            serve_concurrency_max: 64,
            write_queue_frames_max: 1024,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            duplicate_grace: Duration::from_secs(2),
            hello_timeout: Duration::from_secs(2),
        }
    }

    /// Liveness settings derived from raft's election timeout range: a peer that stopped
    /// answering is declared dead by the time the cluster would elect a leader without it
    /// (idle timeout = the largest election timeout), and an idle but live connection sends
    /// at least three keep-alives within the smallest election timeout, so it never looks
    /// dead. A raft call may take at most one election timeout.
    pub fn tuned_for_election(mut self, min: Duration, max: Duration) -> LinkConfig {
        let max = max.max(min);
        self.idle_timeout = max.max(Duration::from_millis(100));
        self.keep_alive = (min / 4).max(Duration::from_millis(10));
        self.call_timeout[channel_index(Channel::Raft)] = max;
        self
    }

    fn check(&self) -> Result<(), LinkError> {
        if self.node_id == 0 {
            return Err(LinkError::Config("node id 0 is not valid".into()));
        }
        if self.peers.contains_key(&self.node_id) {
            return Err(LinkError::Config(format!(
                "node {} is listed as its own peer",
                self.node_id
            )));
        }
        if let Some(max) = self
            .frame_bytes_max
            .iter()
            .find(|m| **m > FRAME_BYTES_MAX_LIMIT)
        {
            return Err(LinkError::Config(format!(
                "frame bound {max} exceeds {FRAME_BYTES_MAX_LIMIT} bytes"
            )));
        }
        if self.keep_alive >= self.idle_timeout {
            return Err(LinkError::Config(format!(
                "keep-alive {:?} must be below the idle timeout {:?}",
                self.keep_alive, self.idle_timeout
            )));
        }
        if self.serve_concurrency_max == 0 || self.write_queue_frames_max == 0 {
            return Err(LinkError::Config(
                "concurrency and queue bounds must be > 0".into(),
            ));
        }
        Ok(())
    }
}

/// Why the link could not start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The settings contradict each other.
    #[error("cluster link settings: {0}")]
    Config(String),
    /// TLS material unusable.
    #[error("cluster certificates: {0}")]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("cannot bind the cluster address {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What the link knows about one peer, for status and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    /// The peer's node id.
    pub id: NodeId,
    /// The address this node dials it at (`None` for a peer known only by its own dial).
    pub addr: Option<SocketAddr>,
    /// Whether a live connection exists.
    pub reachable: bool,
    /// The connection's smoothed round-trip time, when reachable.
    pub rtt: Option<Duration>,
    /// Why the last connection attempt or connection failed, until one succeeds.
    pub last_error: Option<String>,
    /// Connections established with the peer since start.
    pub connects: u64,
    /// Calls answered (successfully or with the service's error).
    pub calls_answered: u64,
    /// Calls that failed: timeout, unreachable or lost connection.
    pub calls_failed: u64,
    /// Calls that timed out (also counted in `calls_failed`).
    pub calls_timed_out: u64,
}

/// The QUIC link of one node. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("node_id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    id: NodeId,
    instance: u64,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    any_node_client_config: quinn::ClientConfig,
    config: LinkConfig,
    service: OnceLock<Arc<dyn Service>>,
    peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    shutdown: watch::Sender<bool>,
    jitter: AtomicU64,
}

struct Peer {
    id: NodeId,
    state: Mutex<PeerState>,
    /// Woken when the live connection or the last error changes (callers wait on it).
    changed: Notify,
    /// Wakes the peer's dialer (connection lost, address changed, removed).
    wake: Notify,
    calls_answered: AtomicU64,
    calls_failed: AtomicU64,
    calls_timed_out: AtomicU64,
}

#[derive(Default)]
struct PeerState {
    addr: Option<SocketAddr>,
    live: Option<Arc<Live>>,
    last_error: Option<String>,
    connects: u64,
    dialer_running: bool,
    removed: bool,
}

/// One established, hello'd connection to a peer.
struct Live {
    conn: Connection,
    peer_instance: u64,
    dialed_by: NodeId,
    streams: [tokio::sync::Mutex<Option<Arc<ClientStream>>>; 4],
}

impl Live {
    fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }
}

/// The caller's side of one channel stream.
struct ClientStream {
    writer: mpsc::Sender<[Bytes; 2]>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next_id: AtomicU64,
    dead: AtomicBool,
}

enum Reply {
    Ok(Bytes),
    Remote(String),
    NotReady,
    Lost(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere already; the data (maps, counters) is
    // still consistent for our use, so keep going rather than cascade.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Send priority of a channel's streams: raft first, snapshots last.
fn priority(channel: Channel) -> i32 {
    match channel {
        Channel::Raft => 3,
        Channel::Admin => 2,
        Channel::Forward => 1,
        Channel::Snapshot => 0,
    }
}

/// Whether a channel's requests are served one at a time in arrival order.
fn ordered(channel: Channel) -> bool {
    matches!(channel, Channel::Snapshot)
}

/// Whether a channel's requests reach the service in arrival order while their answers
/// go back as each is ready: the link polls a request's `serve` future once before it
/// reads the next request, and the service orders requests in that first poll (the
/// broker's forward service queues each for its shard there). A request whose answer
/// waits (a forwarded batch waiting for its commit) so holds up no other.
fn ordered_dispatch(channel: Channel) -> bool {
    matches!(channel, Channel::Forward)
}

impl Link {
    /// Binds the link's UDP socket and starts accepting and dialing. Must be called inside
    /// a tokio runtime (the control thread's); every task of the link runs on it.
    pub fn start(config: LinkConfig) -> Result<Link, LinkError> {
        config.check()?;
        config.certs.check_identity(config.node_id)?;
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(config.idle_timeout)
                    .map_err(|e| LinkError::Config(format!("idle timeout: {e}")))?,
            ))
            .keep_alive_interval(Some(config.keep_alive))
            .max_concurrent_bidi_streams(VarInt::from_u32(64))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(8 << 20))
            .receive_window(VarInt::from_u32(32 << 20))
            .send_window(32 << 20)
            .datagram_receive_buffer_size(None);
        let transport = Arc::new(transport);
        let server_tls = QuicServerConfig::try_from(config.certs.server_config()?)
            .map_err(|e| LinkError::Config(format!("QUIC server TLS: {e}")))?;
        let client_tls = QuicClientConfig::try_from(config.certs.client_config()?)
            .map_err(|e| LinkError::Config(format!("QUIC client TLS: {e}")))?;
        let any_node_tls = QuicClientConfig::try_from(config.certs.any_node_client_config()?)
            .map_err(|e| LinkError::Config(format!("QUIC client TLS: {e}")))?;
        let mut any_node_client_config = quinn::ClientConfig::new(Arc::new(any_node_tls));
        any_node_client_config.transport_config(transport.clone());
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server_config.transport_config(transport.clone());
        let mut client_config = quinn::ClientConfig::new(Arc::new(client_tls));
        client_config.transport_config(transport);
        let endpoint = quinn::Endpoint::server(server_config, config.listen).map_err(|source| {
            LinkError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let instance = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let inner = Arc::new(Inner {
            id: config.node_id,
            instance,
            endpoint,
            client_config,
            any_node_client_config,
            service: OnceLock::new(),
            peers: Mutex::new(HashMap::new()),
            shutdown: watch::channel(false).0,
            jitter: AtomicU64::new(instance | 1),
            config,
        });
        let peers = inner.config.peers.clone();
        for (id, addr) in peers {
            inner.set_peer(id, addr);
        }
        tokio::spawn(inner.clone().accept_loop());
        tracing::info!(
            node = inner.id,
            listen = %inner.endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "cluster link started"
        );
        Ok(Link { inner })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.id
    }

    /// The bound UDP address (useful when `listen` had port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// Sets the service that answers peers' requests. Only the first call has an effect
    /// (returns `false` after that); until it is made, requests are answered "not ready".
    pub fn set_service(&self, service: Arc<dyn Service>) -> bool {
        self.inner.service.set(service).is_ok()
    }

    /// Adds a peer or changes its address, and keeps a connection to it.
    pub fn set_peer(&self, id: NodeId, addr: SocketAddr) {
        self.inner.set_peer(id, addr);
    }

    /// Connects to `addr` without knowing which node listens there (`--join ADDR`): the
    /// node is identified by its certificate (which must come from the cluster CA), added
    /// as a peer at `addr`, and its id returned.
    pub async fn discover(&self, addr: SocketAddr) -> Result<NodeId, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable { node: 0, reason };
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.any_node_client_config.clone(), addr, "node-0")
            .map_err(|e| unreachable(format!("cannot dial {addr}: {e}")))?;
        let timeout = self.inner.config.idle_timeout + self.inner.config.hello_timeout;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(unreachable(describe_handshake_error(&e, true))),
            Err(_) => return Err(unreachable(format!("no answer from {addr}"))),
        };
        let Some(id) = certificate_node_id(&conn).filter(|id| *id != self.inner.id) else {
            conn.close(VarInt::from_u32(code::PROTOCOL), b"not another node");
            return Err(unreachable(format!(
                "{addr} is not another node of this cluster"
            )));
        };
        let hello = tokio::time::timeout(
            self.inner.config.hello_timeout,
            self.inner.hello_as_dialer(&conn),
        )
        .await;
        match hello {
            Ok(Ok(instance)) => {
                self.inner.set_peer(id, addr);
                self.inner.register(id, conn, instance, self.inner.id);
                Ok(id)
            }
            Ok(Err(e)) => Err(unreachable(format!("hello with {addr} failed: {e}"))),
            Err(_) => Err(unreachable(format!("hello with {addr} timed out"))),
        }
    }

    /// Forgets a peer: closes its connection and stops dialing it.
    pub fn remove_peer(&self, id: NodeId) {
        let peer = lock(&self.inner.peers).remove(&id);
        if let Some(peer) = peer {
            let live = {
                let mut state = lock(&peer.state);
                state.removed = true;
                state.live.take()
            };
            if let Some(live) = live {
                live.conn
                    .close(VarInt::from_u32(code::REMOVED), b"removed from the cluster");
            }
            peer.wake.notify_one();
            peer.changed.notify_waiters();
        }
    }

    /// Every known peer's state, by id.
    pub fn peers(&self) -> Vec<PeerStats> {
        let peers: Vec<Arc<Peer>> = lock(&self.inner.peers).values().cloned().collect();
        let mut stats: Vec<PeerStats> = peers.iter().map(|p| p.stats()).collect();
        stats.sort_by_key(|s| s.id);
        stats
    }

    /// Closes every connection and stops every task of the link.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        self.inner
            .endpoint
            .close(VarInt::from_u32(code::SHUTDOWN), b"shutting down");
        for peer in lock(&self.inner.peers).values() {
            peer.wake.notify_one();
            peer.changed.notify_waiters();
        }
    }

    /// Waits until every connection is closed (after [`Link::shutdown`]).
    pub async fn wait_idle(&self) {
        self.inner.endpoint.wait_idle().await;
    }
}

impl Transport for Link {
    fn call(
        &self,
        to: NodeId,
        channel: Channel,
        request: Bytes,
    ) -> BoxFuture<'_, Result<Bytes, TransportError>> {
        Box::pin(self.inner.clone().call(to, channel, request))
    }
}

impl Peer {
    fn new(id: NodeId) -> Peer {
        Peer {
            id,
            state: Mutex::new(PeerState::default()),
            changed: Notify::new(),
            wake: Notify::new(),
            calls_answered: AtomicU64::new(0),
            calls_failed: AtomicU64::new(0),
            calls_timed_out: AtomicU64::new(0),
        }
    }

    fn stats(&self) -> PeerStats {
        let state = lock(&self.state);
        let live = state.live.as_ref().filter(|l| l.is_open());
        PeerStats {
            id: self.id,
            addr: state.addr,
            reachable: live.is_some(),
            rtt: live.map(|l| l.conn.rtt()),
            last_error: state.last_error.clone(),
            connects: state.connects,
            calls_answered: self.calls_answered.load(Ordering::Relaxed),
            calls_failed: self.calls_failed.load(Ordering::Relaxed),
            calls_timed_out: self.calls_timed_out.load(Ordering::Relaxed),
        }
    }

    fn set_error(&self, reason: String) {
        lock(&self.state).last_error = Some(reason);
        self.changed.notify_waiters();
    }
}

impl Inner {
    fn is_shut_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn peer(&self, id: NodeId) -> Option<Arc<Peer>> {
        lock(&self.peers).get(&id).cloned()
    }

    fn peer_or_insert(&self, id: NodeId) -> Arc<Peer> {
        lock(&self.peers)
            .entry(id)
            .or_insert_with(|| Arc::new(Peer::new(id)))
            .clone()
    }

    fn set_peer(self: &Arc<Self>, id: NodeId, addr: SocketAddr) {
        if id == self.id {
            return;
        }
        let peer = self.peer_or_insert(id);
        let start_dialer = {
            let mut state = lock(&peer.state);
            state.addr = Some(addr);
            state.removed = false;
            !std::mem::replace(&mut state.dialer_running, true)
        };
        if start_dialer {
            tokio::spawn(self.clone().dialer(peer));
        } else {
            peer.wake.notify_one();
        }
    }

    /// A pseudo-random delay in `[d/2, d]` (xorshift; the jitter only needs to spread
    /// nodes' retries apart).
    fn jittered(&self, d: Duration) -> Duration {
        let mut x = self.jitter.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter.store(x, Ordering::Relaxed);
        let half = d / 2;
        half + Duration::from_nanos(x % (half.as_nanos() as u64 + 1))
    }

    async fn sleep_or_shutdown(&self, d: Duration) -> bool {
        let mut shutdown = self.shutdown.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.is_shut_down(),
            _ = shutdown.wait_for(|s| *s) => false,
        }
    }

    // ---- the client side ----

    async fn call(
        self: Arc<Self>,
        to: NodeId,
        channel: Channel,
        request: Bytes,
    ) -> Result<Bytes, TransportError> {
        if self.is_shut_down() {
            return Err(TransportError::Closed);
        }
        let bound = self.config.frame_bytes_max[channel_index(channel)];
        if request.len() > bound {
            return Err(TransportError::TooLarge(request.len()));
        }
        let peer = self.peer(to).ok_or(TransportError::UnknownPeer(to))?;
        let timeout = self.config.call_timeout[channel_index(channel)];
        let result =
            match tokio::time::timeout(timeout, self.call_peer(&peer, channel, request)).await {
                Ok(result) => result,
                Err(_) => {
                    peer.calls_timed_out.fetch_add(1, Ordering::Relaxed);
                    Err(TransportError::Timeout(to))
                }
            };
        match &result {
            Ok(_) | Err(TransportError::Remote { .. }) => {
                peer.calls_answered.fetch_add(1, Ordering::Relaxed)
            }
            Err(_) => peer.calls_failed.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    async fn call_peer(
        &self,
        peer: &Peer,
        channel: Channel,
        request: Bytes,
    ) -> Result<Bytes, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable {
            node: peer.id,
            reason,
        };
        let live = self.live(peer).await?;
        let stream = self
            .client_stream(&live, channel)
            .await
            .map_err(unreachable)?;
        let (tx, rx) = oneshot::channel();
        let id = stream.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&stream.pending).insert(id, tx);
        // Removes the waiter if this call is cancelled (timeout) before the answer.
        let _waiter = PendingGuard {
            stream: &stream,
            id,
        };
        let header = frame::frame_header(id, FrameKind::Request, request.len());
        if stream.writer.send([header, request]).await.is_err() {
            return Err(unreachable("the stream to the peer closed".into()));
        }
        match rx.await {
            Ok(Reply::Ok(body)) => Ok(body),
            Ok(Reply::Remote(reason)) => Err(TransportError::Remote {
                node: peer.id,
                reason,
            }),
            Ok(Reply::NotReady) => Err(TransportError::Remote {
                node: peer.id,
                reason: "not ready: the node is still starting".into(),
            }),
            Ok(Reply::Lost(reason)) => Err(unreachable(reason)),
            Err(_) => Err(unreachable("the stream to the peer closed".into())),
        }
    }

    /// The peer's live connection; waits while the first connection is being made, fails
    /// at once when the last attempt failed.
    async fn live(&self, peer: &Peer) -> Result<Arc<Live>, TransportError> {
        loop {
            let changed = peer.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = lock(&peer.state);
                if self.is_shut_down() {
                    return Err(TransportError::Closed);
                }
                if let Some(live) = state.live.as_ref().filter(|l| l.is_open()) {
                    return Ok(live.clone());
                }
                if let Some(reason) = &state.last_error {
                    return Err(TransportError::Unreachable {
                        node: peer.id,
                        reason: reason.clone(),
                    });
                }
                if state.removed || state.addr.is_none() {
                    return Err(TransportError::Unreachable {
                        node: peer.id,
                        reason: "no connection and no address to dial".into(),
                    });
                }
            }
            changed.await;
        }
    }

    async fn client_stream(
        &self,
        live: &Live,
        channel: Channel,
    ) -> Result<Arc<ClientStream>, String> {
        let mut slot = live.streams[channel_index(channel)].lock().await;
        if let Some(stream) = slot.as_ref().filter(|s| !s.dead.load(Ordering::Acquire)) {
            return Ok(stream.clone());
        }
        let (mut send, recv) = live.conn.open_bi().await.map_err(|e| e.to_string())?;
        let _ = send.set_priority(priority(channel));
        send.write_all(&frame::stream_header(StreamKind::Channel(channel)))
            .await
            .map_err(|e| e.to_string())?;
        let (writer, queue) = mpsc::channel(self.config.write_queue_frames_max);
        let stream = Arc::new(ClientStream {
            writer,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            dead: AtomicBool::new(false),
        });
        tokio::spawn(write_frames(send, queue));
        let bound = self.config.frame_bytes_max[channel_index(channel)];
        tokio::spawn(read_responses(recv, stream.clone(), bound));
        *slot = Some(stream.clone());
        Ok(stream)
    }

    // ---- connections ----

    /// Keeps a connection to `peer` while it has an address: dials when there is none,
    /// with capped exponential back-off and jitter after failures.
    async fn dialer(self: Arc<Self>, peer: Arc<Peer>) {
        let mut failures: u32 = 0;
        // The higher id waits a little before its first dial, so two nodes starting
        // together rarely dial each other at the same moment.
        let mut delay = if self.id > peer.id {
            Some(self.jittered(Duration::from_millis(200)))
        } else {
            None
        };
        loop {
            // Wait until there is no live connection.
            loop {
                let wake = peer.wake.notified();
                tokio::pin!(wake);
                wake.as_mut().enable();
                {
                    let state = lock(&peer.state);
                    if self.is_shut_down() || state.removed {
                        drop(state);
                        lock(&peer.state).dialer_running = false;
                        return;
                    }
                    if !state.live.as_ref().is_some_and(|l| l.is_open()) {
                        break;
                    }
                }
                let mut shutdown = self.shutdown.subscribe();
                tokio::select! {
                    _ = wake => {}
                    _ = shutdown.wait_for(|s| *s) => {}
                }
            }
            if let Some(d) = delay.take() {
                if !self.sleep_or_shutdown(d).await {
                    continue;
                }
                // A connection from the peer may have arrived meanwhile.
                if lock(&peer.state).live.as_ref().is_some_and(|l| l.is_open()) {
                    continue;
                }
            }
            let Some(addr) = lock(&peer.state).addr else {
                lock(&peer.state).dialer_running = false;
                return;
            };
            match self.dial(&peer, addr).await {
                Ok(()) => failures = 0,
                Err(reason) => {
                    if failures == 0 {
                        tracing::warn!(node = self.id, peer = peer.id, %addr, "cannot reach cluster peer: {reason}");
                    } else {
                        tracing::debug!(node = self.id, peer = peer.id, %addr, failures, "cannot reach cluster peer: {reason}");
                    }
                    peer.set_error(reason);
                    failures = failures.saturating_add(1);
                    let backoff = self
                        .config
                        .backoff_min
                        .saturating_mul(1u32 << failures.min(16).saturating_sub(1))
                        .min(self.config.backoff_max);
                    delay = Some(self.jittered(backoff));
                }
            }
        }
    }

    async fn dial(self: &Arc<Self>, peer: &Arc<Peer>, addr: SocketAddr) -> Result<(), String> {
        let name = certs::node_name(peer.id);
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), addr, &name)
            .map_err(|e| format!("cannot dial {addr}: {e}"))?;
        let conn = connecting
            .await
            .map_err(|e| describe_handshake_error(&e, true))?;
        // The dialer verified the name `node-<id>`; read it back as a second check.
        match certificate_node_id(&conn) {
            Some(id) if id == peer.id => {}
            other => {
                conn.close(VarInt::from_u32(code::PROTOCOL), b"wrong node");
                return Err(format!(
                    "{addr} presented a certificate for {other:?}, not node {}",
                    peer.id
                ));
            }
        }
        let hello =
            tokio::time::timeout(self.config.hello_timeout, self.hello_as_dialer(&conn)).await;
        let peer_instance = match hello {
            Ok(Ok(instance)) => instance,
            Ok(Err(e)) => {
                conn.close(VarInt::from_u32(code::PROTOCOL), b"bad hello");
                return Err(format!("hello with {addr} failed: {e}"));
            }
            Err(_) => {
                conn.close(VarInt::from_u32(code::PROTOCOL), b"hello timed out");
                return Err(format!("hello with {addr} timed out"));
            }
        };
        self.register(peer.id, conn, peer_instance, self.id);
        Ok(())
    }

    async fn hello_as_dialer(&self, conn: &Connection) -> Result<u64, String> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&hello_bytes(self.instance))
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        read_hello(&mut recv).await
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            if self.is_shut_down() {
                incoming.refuse();
                continue;
            }
            tokio::spawn(self.clone().accept_one(incoming));
        }
    }

    async fn accept_one(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(node = self.id, %remote, "refused a cluster connection: {}", describe_handshake_error(&e, false));
                return;
            }
        };
        let Some(peer_id) = certificate_node_id(&conn).filter(|id| *id != self.id) else {
            tracing::warn!(node = self.id, %remote, "refused a cluster connection: its certificate names no other node (node-<id>)");
            conn.close(
                VarInt::from_u32(code::PROTOCOL),
                b"certificate names no node",
            );
            return;
        };
        let hello = tokio::time::timeout(self.config.hello_timeout, async {
            let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
            let instance = read_hello(&mut recv).await?;
            send.write_all(&hello_bytes(self.instance))
                .await
                .map_err(|e| e.to_string())?;
            let _ = send.finish();
            Ok::<u64, String>(instance)
        })
        .await;
        match hello {
            Ok(Ok(instance)) => self.register(peer_id, conn, instance, peer_id),
            Ok(Err(e)) => {
                tracing::warn!(node = self.id, peer = peer_id, %remote, "cluster hello failed: {e}");
                conn.close(VarInt::from_u32(code::PROTOCOL), b"bad hello");
            }
            Err(_) => {
                tracing::warn!(node = self.id, peer = peer_id, %remote, "cluster hello timed out");
                conn.close(VarInt::from_u32(code::PROTOCOL), b"hello timed out");
            }
        }
    }

    /// Makes a new hello'd connection the peer's live one, or closes it as a duplicate
    /// (see the module doc for the rule, which both sides apply alike).
    fn register(
        self: &Arc<Self>,
        peer_id: NodeId,
        conn: Connection,
        peer_instance: u64,
        dialed_by: NodeId,
    ) {
        let peer = self.peer_or_insert(peer_id);
        let live = Arc::new(Live {
            conn: conn.clone(),
            peer_instance,
            dialed_by,
            streams: Default::default(),
        });
        let preferred_dialer = self.id.min(peer_id);
        let (keep_new, old) = {
            let mut state = lock(&peer.state);
            if state.removed {
                drop(state);
                conn.close(VarInt::from_u32(code::REMOVED), b"removed from the cluster");
                return;
            }
            let keep_new = match state.live.as_ref() {
                None => true,
                Some(old) if !old.is_open() => true,
                Some(old) if old.peer_instance != peer_instance => {
                    peer_instance > old.peer_instance
                }
                Some(old) => dialed_by == preferred_dialer && old.dialed_by != preferred_dialer,
            };
            if keep_new {
                let old = state.live.replace(live.clone());
                state.last_error = None;
                state.connects += 1;
                (true, old)
            } else {
                (false, None)
            }
        };
        if !keep_new {
            tracing::debug!(
                node = self.id,
                peer = peer_id,
                "closing a duplicate cluster connection"
            );
            self.close_later(conn);
            return;
        }
        tracing::info!(node = self.id, peer = peer_id, remote = %conn.remote_address(), "cluster link up");
        peer.changed.notify_waiters();
        if let Some(old) = old.filter(|o| o.is_open()) {
            if old.peer_instance == peer_instance {
                self.close_later(old.conn.clone());
            } else {
                old.conn
                    .close(VarInt::from_u32(code::DUPLICATE), b"peer restarted");
            }
        }
        tokio::spawn(self.clone().serve_connection(peer_id, conn.clone()));
        tokio::spawn(self.clone().watch_connection(peer, live));
    }

    fn close_later(&self, conn: Connection) {
        let grace = self.config.duplicate_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            conn.close(VarInt::from_u32(code::DUPLICATE), b"duplicate connection");
        });
    }

    async fn watch_connection(self: Arc<Self>, peer: Arc<Peer>, live: Arc<Live>) {
        let reason = live.conn.closed().await;
        let was_live = {
            let mut state = lock(&peer.state);
            let same = state.live.as_ref().is_some_and(|l| Arc::ptr_eq(l, &live));
            if same {
                state.live = None;
                state.last_error = Some(format!("connection lost: {reason}"));
            }
            same
        };
        if was_live {
            if !self.is_shut_down() {
                tracing::warn!(
                    node = self.id,
                    peer = peer.id,
                    "cluster link down: {reason}"
                );
            }
            peer.changed.notify_waiters();
            peer.wake.notify_one();
        }
    }

    // ---- the server side ----

    async fn serve_connection(self: Arc<Self>, peer_id: NodeId, conn: Connection) {
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    tokio::spawn(self.clone().serve_stream(peer_id, send, recv));
                }
                Err(_) => return,
            }
        }
    }

    async fn serve_stream(self: Arc<Self>, from: NodeId, send: SendStream, mut recv: RecvStream) {
        let mut header = [0u8; frame::STREAM_HEADER_LEN];
        let read =
            tokio::time::timeout(self.config.hello_timeout, recv.read_exact(&mut header)).await;
        let kind = match read {
            Ok(Ok(())) => frame::parse_stream_header(&header).map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no stream header in time".to_owned()),
        };
        let channel = match kind {
            Ok(StreamKind::Channel(channel)) => channel,
            Ok(StreamKind::Hello) => {
                protocol_violation(self.id, from, "a second hello", send, recv);
                return;
            }
            Err(e) => {
                protocol_violation(self.id, from, &e, send, recv);
                return;
            }
        };
        let _ = send.set_priority(priority(channel));
        let bound = self.config.frame_bytes_max[channel_index(channel)];
        let (writer, queue) = mpsc::channel(self.config.write_queue_frames_max);
        tokio::spawn(write_frames(send, queue));
        let concurrency = Arc::new(Semaphore::new(self.config.serve_concurrency_max));
        loop {
            let (header, body) = match read_frame(&mut recv, bound).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(ReadFrameError::Closed(_)) => return,
                Err(ReadFrameError::Frame(e)) => {
                    tracing::warn!(node = self.id, peer = from, %channel, "cluster peer broke the link protocol: {e}");
                    let _ = recv.stop(VarInt::from_u32(code::PROTOCOL));
                    return;
                }
            };
            if header.kind != FrameKind::Request {
                tracing::warn!(node = self.id, peer = from, %channel, "cluster peer sent a {:?} frame where requests go", header.kind);
                let _ = recv.stop(VarInt::from_u32(code::PROTOCOL));
                return;
            }
            if ordered(channel) {
                let answer = self.answer(from, channel, body, bound).await;
                if writer.send(answer_frame(header.id, answer)).await.is_err() {
                    return;
                }
            } else if ordered_dispatch(channel) {
                let Ok(permit) = concurrency.clone().acquire_owned().await else {
                    return;
                };
                let this = self.clone();
                let mut answer = Box::pin(async move {
                    let answer = this.answer(from, channel, body, bound).await;
                    drop(permit);
                    answer
                });
                // The first poll hands the request to the service, before the next is read.
                let first = {
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    answer.as_mut().poll(&mut cx)
                };
                match first {
                    std::task::Poll::Ready(answer) => {
                        if writer.send(answer_frame(header.id, answer)).await.is_err() {
                            return;
                        }
                    }
                    std::task::Poll::Pending => {
                        let writer = writer.clone();
                        tokio::spawn(async move {
                            let answer = answer.await;
                            let _ = writer.send(answer_frame(header.id, answer)).await;
                        });
                    }
                }
            } else {
                let Ok(permit) = concurrency.clone().acquire_owned().await else {
                    return;
                };
                let this = self.clone();
                let writer = writer.clone();
                tokio::spawn(async move {
                    let answer = this.answer(from, channel, body, bound).await;
                    let _ = writer.send(answer_frame(header.id, answer)).await;
                    drop(permit);
                });
            }
        }
    }

    async fn answer(&self, from: NodeId, channel: Channel, body: Bytes, bound: usize) -> Answer {
        let Some(service) = self.service.get() else {
            return Answer::NotReady;
        };
        match service.serve(from, channel, body).await {
            Ok(response) if response.len() > bound => Answer::Error(format!(
                "response of {} bytes exceeds the {channel} channel's bound of {bound}",
                response.len()
            )),
            Ok(response) => Answer::Ok(response),
            Err(reason) => Answer::Error(reason),
        }
    }
}

enum Answer {
    Ok(Bytes),
    Error(String),
    NotReady,
}

fn answer_frame(id: u64, answer: Answer) -> [Bytes; 2] {
    let (kind, body) = match answer {
        Answer::Ok(body) => (FrameKind::Response, body),
        Answer::Error(reason) => (FrameKind::Error, frame::reason_body(&reason)),
        Answer::NotReady => (FrameKind::NotReady, Bytes::new()),
    };
    [frame::frame_header(id, kind, body.len()), body]
}

fn protocol_violation(
    node: NodeId,
    from: NodeId,
    what: &str,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    tracing::warn!(
        node,
        peer = from,
        "cluster peer broke the link protocol: {what}"
    );
    let _ = recv.stop(VarInt::from_u32(code::PROTOCOL));
    let _ = send.reset(VarInt::from_u32(code::PROTOCOL));
}

/// Removes a call's waiter when the call ends, however it ends.
struct PendingGuard<'a> {
    stream: &'a ClientStream,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.stream.pending).remove(&self.id);
    }
}

/// Writes whole frames from a queue, so a caller that gives up (timeout) never leaves a
/// half-written frame on the stream.
async fn write_frames(mut send: SendStream, mut queue: mpsc::Receiver<[Bytes; 2]>) {
    while let Some(mut frame) = queue.recv().await {
        if send.write_all_chunks(&mut frame).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

async fn read_responses(mut recv: RecvStream, stream: Arc<ClientStream>, bound: usize) {
    let reason = loop {
        match read_frame(&mut recv, bound).await {
            Ok(Some((header, body))) => {
                let reply = match header.kind {
                    FrameKind::Response => Reply::Ok(body),
                    FrameKind::Error => Reply::Remote(frame::reason_from_body(&body)),
                    FrameKind::NotReady => Reply::NotReady,
                    FrameKind::Request => {
                        let _ = recv.stop(VarInt::from_u32(code::PROTOCOL));
                        break "the peer sent a request where responses go".to_owned();
                    }
                };
                // No waiter: the call timed out and went away; drop the answer.
                if let Some(waiter) = lock(&stream.pending).remove(&header.id) {
                    let _ = waiter.send(reply);
                }
            }
            Ok(None) => break "the peer closed the stream".to_owned(),
            Err(ReadFrameError::Closed(reason)) => break reason,
            Err(ReadFrameError::Frame(e)) => {
                let _ = recv.stop(VarInt::from_u32(code::PROTOCOL));
                break format!("the peer broke the link protocol: {e}");
            }
        }
    };
    stream.dead.store(true, Ordering::Release);
    let waiters: Vec<_> = lock(&stream.pending).drain().collect();
    for (_, waiter) in waiters {
        let _ = waiter.send(Reply::Lost(reason.clone()));
    }
}

enum ReadFrameError {
    /// The stream or connection ended mid-frame or failed.
    Closed(String),
    /// The bytes are not a valid frame.
    Frame(FrameError),
}

/// Reads one frame; `None` when the stream ended cleanly between frames. The body is read
/// in the chunks QUIC delivers (one chunk: no copy) and only as it arrives, so an announced
/// length never allocates more than the bytes actually received.
async fn read_frame(
    recv: &mut RecvStream,
    bound: usize,
) -> Result<Option<(FrameHeader, Bytes)>, ReadFrameError> {
    let mut head = [0u8; frame::FRAME_HEADER_LEN];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(ReadFrameError::Closed(e.to_string())),
    }
    let header = frame::parse_frame_header(&head, bound).map_err(ReadFrameError::Frame)?;
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    let mut remaining = header.body_len;
    while remaining > 0 {
        let chunk = match recv.read_chunk(remaining, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => {
                return Err(ReadFrameError::Closed(
                    "the stream ended inside a frame".into(),
                ));
            }
            Err(e) => return Err(ReadFrameError::Closed(e.to_string())),
        };
        remaining -= chunk.len();
        match first.take() {
            None if rest.is_empty() => first = Some(chunk),
            None => rest.extend_from_slice(&chunk),
            Some(previous) => {
                rest.extend_from_slice(&previous);
                rest.extend_from_slice(&chunk);
            }
        }
    }
    let body = first.unwrap_or_else(|| rest.freeze());
    Ok(Some((header, body)))
}

fn hello_bytes(instance: u64) -> [u8; frame::STREAM_HEADER_LEN + frame::HELLO_LEN] {
    let mut bytes = [0u8; frame::STREAM_HEADER_LEN + frame::HELLO_LEN];
    bytes[..frame::STREAM_HEADER_LEN].copy_from_slice(&frame::stream_header(StreamKind::Hello));
    bytes[frame::STREAM_HEADER_LEN..].copy_from_slice(&instance.to_be_bytes());
    bytes
}

async fn read_hello(recv: &mut RecvStream) -> Result<u64, String> {
    let mut bytes = [0u8; frame::STREAM_HEADER_LEN + frame::HELLO_LEN];
    recv.read_exact(&mut bytes)
        .await
        .map_err(|e| e.to_string())?;
    let mut header = [0u8; frame::STREAM_HEADER_LEN];
    header.copy_from_slice(&bytes[..frame::STREAM_HEADER_LEN]);
    match frame::parse_stream_header(&header) {
        Ok(StreamKind::Hello) => {}
        Ok(StreamKind::Channel(c)) => return Err(format!("expected a hello, got a {c} stream")),
        Err(e) => return Err(e.to_string()),
    }
    let mut instance = [0u8; 8];
    instance.copy_from_slice(&bytes[frame::STREAM_HEADER_LEN..]);
    Ok(u64::from_be_bytes(instance))
}

/// The node id named by a connection's (verified) peer certificate.
fn certificate_node_id(conn: &Connection) -> Option<NodeId> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    tls::peer_node_id(chain.first()?)
}

/// A handshake failure in words an operator can act on; a certificate from another CA
/// says so.
/// Says in words why a link handshake failed (`dialing`: this node opened the
/// connection): a certificate of another CA or node, or a node of another Tessera version.
pub fn describe_handshake_error(e: &ConnectionError, dialing: bool) -> String {
    let text = e.to_string();
    let foreign_ca = text.contains("UnknownIssuer") || text.contains("BadSignature");
    // No ALPN in common: TLS alert 120, no_application_protocol (quinn: "the
    // cryptographic handshake failed: error 120: peer doesn't support any known protocol").
    let other_version = text.contains("error 120") || text.contains("known protocol");
    if other_version {
        format!(
            "the peer speaks another cluster protocol version (this node: {}): every node \
             of a cluster must run the same Tessera version ({text})",
            String::from_utf8_lossy(tls::ALPN)
        )
    } else if foreign_ca && dialing {
        format!("the peer's certificate is not signed by this cluster's CA ({text})")
    } else if foreign_ca {
        format!(
            "the peer's certificate is not signed by this cluster's CA ({text}): check --cluster-certs on that node"
        )
    } else if dialing && (text.contains("certificate") || text.contains("alert")) {
        format!(
            "the peer refused this node's certificate, is it signed by the same cluster CA? ({text})"
        )
    } else if text.contains("NotValidForName") {
        format!("the peer's certificate names another node ({text})")
    } else {
        text
    }
}
