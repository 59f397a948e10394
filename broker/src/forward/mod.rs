//! The cluster data plane's forwarder (issue 15, guarantee 2: "subscribe, then any
//! publish anywhere is delivered"): routes between nodes, publications to other nodes,
//! and publications from them. Design and reasons: docs/ARCHITECTURE.md "Cluster data
//! plane: routes and forwarding".
//!
//! Where it runs: on the control thread (tokio), beside raft and the QUIC link. The
//! shards reach it only through bounded channels ([`Hub`]): each shard's engine treats
//! the other nodes as one more mesh peer, the *remote id* `shard_count`
//! (`tessera_shard::engine` module `remote`), so the engine's route acknowledgements,
//! held PUBACKs and `route_match` work unchanged.
//!
//! - **Routes.** A shard's first subscriber to a filter sends `RouteAdd` to the
//!   forwarder. The node's first shard with the filter makes the forwarder propose
//!   `RouteDelta{add}` (its last one leaving, `RouteDelta{remove}`); proposals for one
//!   filter never overlap, so the log's order is the node's order. Route changes are
//!   aggregated: up to [`ROUTE_PROPOSALS_IN_FLIGHT_MAX`] proposals are in flight, and
//!   the changes that arrive meanwhile go out together as one `RouteDeltas` op (one
//!   answer, one barrier for all its adds), so a subscribe storm costs per aggregate,
//!   not per filter; a lone change goes out at once. When the add is
//!   applied here at index `i`, the forwarder asks every other member for a barrier at
//!   `i` on the forward channel; a node answers once its forwarder applied `i` and every
//!   one of its shards took the route changes up to `i`. Only then are the SUBSCRIBEs
//!   that waited acknowledged (`Ack` to the shard, which sends the SUBACK). A commit is
//!   not an apply: this is what makes a publication that starts anywhere after the SUBACK
//!   find the route. Subscriptions to a filter the node already routes answer at once.
//!   At boot each shard first reports what its restored sessions subscribe to
//!   ([`FromShard::restored`]): those count as its routes (proposed again), and once
//!   every shard reported, this node's routes in the log that no local entry has are
//!   removed (`Forwarder::reconcile`).
//! - **Other nodes' routes** come from the applied log ([`routes::NodeRoutes`]); when a
//!   filter gets its first other node the forwarder sends `RouteAdd{shard: remote}` to
//!   every shard (and `RouteRemove` after the last), each acknowledged so barriers know
//!   when the shards route it.
//! - **Publications** the shards hand over are matched once against the node table and
//!   queued once per matching node ([`PeerQueue`]). One sender task per peer sends the
//!   queue as batches ([`wire`]) on the link's forward stream, up to
//!   [`BATCHES_IN_FLIGHT`] awaiting their first answer (what arrives meanwhile forms
//!   the next batch), so order per publisher holds and batches grow with load. Answers
//!   come in two steps ([`wire`], "Answers in two steps"): a batch the receiver must
//!   still wait for is *received* at once and *done* later, so a held batch does not
//!   stop the stream. After a failure every batch not done is sent again, in order (the
//!   receiver drops a batch it already accepted). QoS 1/2 publications carry the
//!   publisher's token: when every node it was sent to is done with it, the shard gets
//!   `Ack` and releases the PUBACK/PUBREC (the receiver keeps a batch from being done
//!   while a subscriber queue there is congested: back-pressure across nodes). At
//!   [`PEER_QUEUE_HIGH_WATER`] queued for a live peer the forwarder stops taking the
//!   shards' batches until the peer's sender takes the next one, so the shards pause
//!   their readers and publishers are slowed through TCP. QoS 0 beyond
//!   [`PEER_QUEUE_MESSAGES_MAX`] queued for a peer whose calls fail is dropped and
//!   counted; QoS 1/2 are never dropped (their publishers' windows bound them).
//! - **Hints** ([`hints`]): once a peer has not answered for the session lease, its
//!   sender writes what it owes it to `data_dir/hints` and answers the publishers, so a
//!   dead node does not stall publishers cluster-wide; the batches keep their numbers
//!   and go when it is back (docs/ARCHITECTURE.md, "Cluster: hints for an unreachable
//!   peer").
//! - **Publications from other nodes** arrive on the link's forward channel as requests
//!   of kind `Publish` (`cluster::peer`), all of one sending node served by one shard in
//!   order ([`serve_request`]: decoded as untrusted input, retries dropped); that shard
//!   hands each to its engine as `MeshMsg::Forwarded` with its [`ForwardMark`], which
//!   delivers it and passes it to the other local shards, never back out, and then
//!   answers the batch, accepted or received (done under `sync` durability once what
//!   the shards stored for it is committed; the marks make a retry after the receiver
//!   restarted a duplicate).

pub mod hints;
pub mod routes;
pub mod wire;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tessera_proto::{ReasonCode, Str};
use tessera_raft::{
    AppliedEvent, Channel, ClusterError, ClusterHandle, NodeId, Op, OpResult, RouteChange,
    Transport,
};
use tessera_shard::mesh::{ForwardMark, MeshMsg, PubId, ShardId};
use tessera_shard::message::{Message, SessionUid};
use tessera_shard::trie::ShardSet;
use tokio::sync::{Notify, mpsc};

use hints::{HintIo, HintStore};
use routes::{NodeRoutes, Transition};
use wire::{Answer, BatchWriter, Request, RetainedRef};

pub use wire::WireError;

/// Batches one shard may have queued for the forwarder (each shard's mesh writer waits,
/// and its readers pause, beyond it).
pub const FROM_SHARD_BATCHES_MAX: usize = 256;
/// Batches the forwarder may have queued for one shard.
pub const TO_SHARD_BATCHES_MAX: usize = 1024;
/// QoS 0 publications queued for one peer beyond which new ones are dropped (reached
/// only while the peer does not accept batches: a live peer's queue stops the
/// forwarder's intake at [`PEER_QUEUE_HIGH_WATER`] first).
pub const PEER_QUEUE_MESSAGES_MAX: usize = 100_000;
/// Publications queued for a live peer at which the forwarder stops taking the shards'
/// batches until its sender took the next batch: the shards' channels fill, their mesh
/// backlog grows and their connection readers pause, so publishers faster than the
/// link are slowed through TCP (as by a slow peer shard) instead of having their QoS 0
/// messages dropped here. Two batches: one being sent, the next one full.
pub const PEER_QUEUE_HIGH_WATER: usize = 2 * BATCH_MESSAGES_TARGET;
/// Publications per batch sent to a peer.
const BATCH_MESSAGES_TARGET: usize = 4096;
/// Batches sent to one peer before the first is answered: the next batch is encoded
/// and on its way while the peer delivers the one before (with one, each node waited
/// for the other in turn).
const BATCHES_IN_FLIGHT: usize = 2;
/// Bytes per batch sent to a peer (well under the link's 16 MiB forward frame bound;
/// one large message may exceed it alone).
const BATCH_BYTES_TARGET: usize = 1 << 20;
/// How long SUBSCRIBEs wait for their route's proposal before they get a failure for
/// its filter (the proposal goes on).
pub const ROUTE_ANSWER_WAIT: Duration = Duration::from_secs(5);
/// Route proposals (each one `Op::RouteDeltas` of up to `ROUTE_CHANGES_MAX` changes) in
/// flight at once; the route changes that arrive meanwhile wait and form the next ones,
/// so a subscribe storm costs one proposal, one answer and one barrier per aggregate
/// instead of per filter, while a lone change still goes out at once. 8 x 1,024 changes
/// per node keep the log's pipeline full: `raft_bench --kind route` on a quiet machine,
/// 3 nodes, did 485K deltas/s with 4 per node in flight and 554K with 8 (it is bound by
/// the changes in flight over the commit latency).
pub const ROUTE_PROPOSALS_IN_FLIGHT_MAX: usize = 8;
/// How long a barrier waits for this node to apply the asked index.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
/// First and largest pause before re-sending a batch a peer did not accept.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Applied events buffered for the forwarder.
const APPLIED_EVENTS_MAX: usize = 4096;
/// Largest retained record carried inline in the log whatever the setting (raft's
/// bound for an inline record is 64 KiB).
const RETAINED_RECORD_INLINE_MAX: usize = 63 * 1024;
/// How long a node waits for the origin of a large retained message to send it.
const RETAINED_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node sends its table of shared members to every other member while it
/// has any (besides at once, after [`SHARES_PAUSE`], when it changes): a node that
/// restarted, or joined, learns it within this.
const SHARES_REFRESH: Duration = Duration::from_secs(5);
/// Least pause between two sends of the table of shared members: a burst of member
/// changes (a fleet of workers connecting) costs one send per pause, not one per change.
const SHARES_PAUSE: Duration = Duration::from_millis(50);
/// Barriers from other nodes queued for the forwarder.
const BARRIERS_QUEUED_MAX: usize = 1024;
/// The envelope the link's forward channel dispatches on (`cluster::peer`): kind
/// `Publish`, no key, so every request of one node is served by one shard, in order.
const ENVELOPE: [u8; 3] = [crate::cluster::peer::PeerKind::Publish as u8, 0, 0];

/// What a shard sends the forwarder: its outbox for the remote id.
#[derive(Debug)]
pub struct FromShard {
    /// The sending shard.
    pub shard: ShardId,
    /// The messages, in order.
    pub msgs: Vec<MeshMsg>,
    /// Sent once per shard at boot, before anything else ([`FromShard::restored`]): the
    /// route keys its restored sessions subscribe to.
    pub restored: Option<Vec<String>>,
    /// Another node's table of its shared subscriptions' connected members, which it
    /// sent this shard ([`wire::Request::Shares`]): (that node, the table).
    pub peer_shares: Option<(NodeId, Vec<wire::ShareCount>)>,
}

impl FromShard {
    /// A shard's report at boot of the filters its restored sessions subscribe to
    /// (`Engine::subscribed_filters`; shared ones as subscribed, `$share/{group}/{filter}`).
    /// The forwarder counts them as the shard's routes and, once every shard reported,
    /// proposes the removal of this node's routes in the log that none of them needs
    /// (`Forwarder::reconcile`).
    pub fn restored(shard: ShardId, filters: &[Str]) -> FromShard {
        let restored = filters
            .iter()
            .filter_map(|f| match tessera_proto::topic::parse_shared(f) {
                Ok(Some(s)) => Some(route_key(Some(s.group), s.filter)),
                Ok(None) => Some(route_key(None, f)),
                Err(_) => None,
            })
            .collect();
        FromShard {
            shard,
            msgs: Vec::new(),
            restored: Some(restored),
            peer_shares: None,
        }
    }
}

/// A barrier asked by another node, for the forwarder: `reply` gets `()` once routes up
/// to `index` are in force on every shard of this node.
#[derive(Debug)]
pub struct BarrierAsk {
    /// The log index.
    pub index: u64,
    /// Answered once.
    pub reply: flume::Sender<()>,
}

/// A shard's ends of its channels to and from the forwarder.
#[derive(Debug, Clone)]
pub struct ShardEnd {
    /// To the forwarder.
    pub to_forwarder: flume::Sender<FromShard>,
    /// From the forwarder: messages to handle as coming from the remote id, in order.
    pub from_forwarder: flume::Receiver<Vec<MeshMsg>>,
    /// Barriers other nodes ask, for the forwarder.
    pub barriers: flume::Sender<BarrierAsk>,
    /// The forwarder's counters.
    pub metrics: Arc<ForwardMetrics>,
    /// This process's origin tag for publication ids (`Engine::set_origin`).
    pub origin: u64,
    /// The lowest log index of a route add of this node's present life (`u64::MAX`
    /// until one was applied): a forwarded record whose routes index is below it was
    /// matched for the node's earlier life ([`serve_request`]).
    pub own_routes_from: Arc<AtomicU64>,
}

/// The forwarder's ends (taken by the control thread).
#[derive(Debug)]
pub struct ForwarderEnds {
    /// `cluster.retained_inline_bytes`.
    retained_inline_bytes: usize,
    from_shards: flume::Receiver<FromShard>,
    to_shards: Vec<flume::Sender<Vec<MeshMsg>>>,
    barriers: flume::Receiver<BarrierAsk>,
    metrics: Arc<ForwardMetrics>,
    /// How long a barrier waits for a member that does not answer.
    unanswered_wait: Duration,
    /// See [`ShardEnd::own_routes_from`].
    own_routes_from: Arc<AtomicU64>,
    /// The hint store and what earlier lives left in it ([`hints`]); `None`: hints off.
    hints: Option<(Arc<HintStore>, BTreeMap<NodeId, hints::Stored>)>,
    /// How long a peer fails before its batches are hinted (`None`: the unanswered
    /// wait, the session lease).
    hint_wait: Option<Duration>,
}

/// How long a barrier waits for a member that does not answer, unless set: the
/// default session lease (`cluster.session_lease_ms`; the broker sets the node's own).
pub const UNANSWERED_WAIT_DEFAULT: Duration =
    Duration::from_millis(crate::config::cluster::SESSION_LEASE_DEFAULT_MS);

impl ForwarderEnds {
    /// A barrier asks a member that does not answer again until it has been
    /// unreachable for `wait`: the node's session lease ([`barrier`]).
    pub fn set_unanswered_wait(&mut self, wait: Duration) {
        self.unanswered_wait = wait;
    }

    /// The forwarder's counters.
    pub fn metrics(&self) -> Arc<ForwardMetrics> {
        self.metrics.clone()
    }

    /// Batches for a peer unreachable for longer than the unanswered wait (the session
    /// lease) are kept in `store` and their publishers answered ([`hints`]); `earlier`:
    /// what the store held at open, sent first.
    pub fn set_hints(&mut self, store: HintStore, earlier: BTreeMap<NodeId, hints::Stored>) {
        self.metrics
            .hint_budget_bytes
            .store(store.budget(), Ordering::Relaxed);
        self.hints = Some((Arc::new(store), earlier));
    }

    /// Hints start once a peer has failed for `wait` instead of the session lease: the
    /// data-plane simulation draws it per seed, so short outages hint too (when is
    /// not a question of correctness: a batch is answered either once the peer
    /// committed it or once this node did).
    pub fn set_hint_wait(&mut self, wait: Duration) {
        self.hint_wait = Some(wait);
    }
}

/// Opens the hint store of a node whose data directory is `data_dir`
/// (`data_dir/hints`), with a budget of `budget` bytes; fsynced, written on tokio's
/// blocking pool.
pub fn open_hints(
    data_dir: &std::path::Path,
    budget: u64,
) -> Result<(HintStore, BTreeMap<NodeId, hints::Stored>), hints::HintError> {
    HintStore::open(
        &data_dir.join("hints"),
        budget,
        true,
        HintIo::Blocking,
        ENVELOPE.len(),
    )
}

/// [`open_hints`] for the data-plane simulation: no fsync, writes on the caller's task.
pub fn open_hints_sim(
    dir: &std::path::Path,
    budget: u64,
) -> Result<(HintStore, BTreeMap<NodeId, hints::Stored>), hints::HintError> {
    HintStore::open(dir, budget, false, HintIo::Inline, ENVELOPE.len())
}

/// The channels between the shards and the forwarder, made at boot before the shards
/// (the forwarder starts later, on the control thread), with this process's origin
/// tag ([`origin_tag`]).
pub fn channels(
    shard_count: usize,
    retained_inline_bytes: usize,
) -> (ForwarderEnds, Vec<ShardEnd>) {
    channels_with_origin(shard_count, retained_inline_bytes, origin_tag())
}

/// [`channels`] with the origin tag given: the data-plane simulation draws a node
/// incarnation's tag from its seed, so a seed replays (the tag orders maps of marks and
/// ids); it must still differ per process start, and be non-zero.
pub fn channels_with_origin(
    shard_count: usize,
    retained_inline_bytes: usize,
    origin: u64,
) -> (ForwarderEnds, Vec<ShardEnd>) {
    let origin = origin.max(1);
    let (from_tx, from_rx) = flume::bounded(FROM_SHARD_BATCHES_MAX * shard_count);
    let (barrier_tx, barrier_rx) = flume::bounded(BARRIERS_QUEUED_MAX);
    let metrics: Arc<ForwardMetrics> = Arc::default();
    let (to_shards, shard_rx): (Vec<_>, Vec<_>) = (0..shard_count)
        .map(|_| flume::bounded(TO_SHARD_BATCHES_MAX))
        .unzip();
    let own_routes_from = Arc::new(AtomicU64::new(u64::MAX));
    let shard_ends = shard_rx
        .into_iter()
        .map(|rx| ShardEnd {
            to_forwarder: from_tx.clone(),
            from_forwarder: rx,
            barriers: barrier_tx.clone(),
            metrics: metrics.clone(),
            origin,
            own_routes_from: own_routes_from.clone(),
        })
        .collect();
    (
        ForwarderEnds {
            retained_inline_bytes,
            from_shards: from_rx,
            to_shards,
            barriers: barrier_rx,
            metrics,
            unanswered_wait: UNANSWERED_WAIT_DEFAULT,
            own_routes_from,
            hints: None,
            hint_wait: None,
        },
        shard_ends,
    )
}

/// A tag for this process's publication ids: the boot time in ns mixed with a
/// counter (tests start several forwarders in one process), never 0.
pub fn origin_tag() -> u64 {
    static STARTED: AtomicU64 = AtomicU64::new(0);
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = STARTED.fetch_add(1, Ordering::Relaxed);
    // splitmix64 of both, so nearby boot times give unrelated tags.
    let mut z = ns ^ n.rotate_left(40) ^ u64::from(std::process::id()).rotate_left(20);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).max(1)
}

/// Counters of one peer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PeerCounters {
    /// Publications sent (accepted by the peer).
    pub messages: u64,
    /// Batches sent.
    pub batches: u64,
    /// Bytes of the batches sent.
    pub bytes: u64,
    /// Calls that failed and were retried.
    pub retries: u64,
    /// QoS 0 publications dropped because the peer's queue was full.
    pub dropped: u64,
    /// Batches for the peer kept in the hint store now ([`hints`]).
    pub hinted_batches: u64,
    /// Their bytes.
    pub hinted_bytes: u64,
    /// Batches written to the hint store (their publishers answered then).
    pub hints_written: u64,
}

/// The forwarder's counters, read by `/metrics`.
#[derive(Debug, Default)]
pub struct ForwardMetrics {
    /// Per peer, sending side.
    pub peers: Mutex<HashMap<NodeId, PeerCounters>>,
    /// Routes (filters and shared groups) per other node, from the node table.
    pub routes_per_node: Mutex<HashMap<NodeId, u64>>,
    /// Connected shared-subscription members per node (summed over its shares): what
    /// each other node last said, and this node's own under [`NodeId`] 0.
    pub shared_members: Mutex<HashMap<NodeId, u64>>,
    /// Filters this node routes (its own `RouteDelta`s applied).
    pub local_routes: AtomicU64,
    /// Publications received from other nodes.
    pub received: AtomicU64,
    /// Batches received that repeated one already accepted (a retry).
    pub duplicates: AtomicU64,
    /// Barriers answered for other nodes.
    pub barriers: AtomicU64,
    /// Shared-subscription publications this node's members left before they arrived,
    /// handed back to the group on another node.
    pub shared_handed_back: AtomicU64,
    /// Shared-subscription publications for other nodes that no node had members for
    /// any more (the group's last members left meanwhile).
    pub shared_dropped: AtomicU64,
    /// Publications sent on to the node a session moved to (they matched it here
    /// after it left).
    pub redirected: AtomicU64,
    /// `cluster.hint_budget_bytes` (0: hints off).
    pub hint_budget_bytes: AtomicU64,
    /// Writes to the hint store that failed (hints stop for that peer).
    pub hint_write_errors: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The broker's clocks, as the shards use them (engine milliseconds for deadlines,
/// microseconds for latency stamps).
#[derive(Debug, Clone, Copy)]
pub struct Clocks {
    /// Engine milliseconds.
    pub now_ms: fn() -> u64,
    /// Engine microseconds.
    pub now_us: fn() -> u64,
}

/// Starts the forwarder on the current tokio runtime (the control thread). Requests
/// from other nodes reach the shards through `cluster::peer` (kind `Publish`) and
/// [`serve_request`].
pub fn start(
    ends: ForwarderEnds,
    handle: ClusterHandle,
    transport: Arc<dyn Transport>,
    remote: ShardId,
    clocks: Clocks,
) {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let to_shards_len = ends.to_shards.len();
    let (hints, earlier) = match ends.hints {
        Some((store, earlier)) => (Some(store), earlier),
        None => (None, BTreeMap::new()),
    };
    let hint_wait = ends.hint_wait.unwrap_or(ends.unanswered_wait);
    let mut fwd = Forwarder {
        me: handle.node_id(),
        routes: NodeRoutes::new(handle.node_id()),
        handle,
        transport,
        shard_acked: vec![0; ends.to_shards.len()],
        to_shards: ends.to_shards,
        remote,
        local: HashMap::new(),
        peers: HashMap::new(),
        drained: Arc::new(Notify::new()),
        pending: HashMap::new(),
        events: events_tx,
        route_seq: 0,
        barriers: Vec::new(),
        barriers_seq: Vec::new(),
        match_buf: Vec::new(),
        incarnation,
        clocks,
        metrics: ends.metrics,
        retained_big: HashMap::new(),
        retained_inline_bytes: ends.retained_inline_bytes,
        fetching: std::collections::BTreeMap::new(),
        share_cursor: 0,
        share_members: HashMap::new(),
        shares_next: None,
        peer_shares: HashMap::new(),
        share_weights: HashMap::new(),
        route_queue: Vec::new(),
        route_proposals: 0,
        reach: Reach {
            wait: ends.unanswered_wait,
            since: Arc::default(),
        },
        own_routes_from: ends.own_routes_from,
        unreported: to_shards_len,
        reconciled: false,
        hints,
        hint_wait,
    };
    for (node, stored) in earlier {
        fwd.send_earlier_hints(node, stored);
    }
    tokio::spawn(fwd.run(ends.from_shards, ends.barriers, events_rx));
}

/// Internal events of the forwarder's task.
enum Event {
    /// Route changes of this node (route key, add) were applied at `index` (or failed).
    Proposed {
        changes: Vec<(String, bool)>,
        result: Result<u64, ClusterError>,
    },
    /// A route proposal's task ended: another may start.
    ProposalEnded,
    /// Every other member answered (or failed) the barrier of these filters' adds.
    BarrierDone { filters: Vec<String> },
    /// A peer accepted a batch: the tokens it carried.
    PeerDone { tokens: Vec<(ShardId, u64)> },
    /// A retained update is in force on every node: release its publisher.
    RetainDone { token: Option<(ShardId, u64)> },
    /// A large retained message applied at `index` was fetched from its origin (or
    /// could not be: `None`, served as cleared).
    RetainedFetched {
        topic: String,
        index: u64,
        message: Option<Message>,
    },
    /// Answer once this node's shards took what was applied up to `index`.
    LocalBarrier {
        index: u64,
        reply: flume::Sender<()>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalState {
    /// No route of this node in the log.
    Idle,
    /// An add is being proposed or its barrier is running.
    Adding,
    /// The route is in force cluster-wide.
    Routed,
    /// A remove is being proposed.
    Removing,
}

/// A filter this node's shards subscribe to.
struct LocalRoute {
    shards: ShardSet,
    state: LocalState,
    /// SUBSCRIBE tokens waiting for the route: (shard, token).
    waiters: Vec<(ShardId, u64)>,
}

/// One publication queued for a peer.
struct Item {
    message: Message,
    publisher: u64,
    token: Option<(ShardId, u64)>,
    /// For one member of this shared subscription.
    share: Option<wire::ShareFor>,
    /// The publication's cluster-wide id.
    id: Option<PubId>,
    /// For one session that moved to the peer: (ClientID, claim epoch).
    session: Option<(Str, u64)>,
    /// This node's applied log index when it matched the publication against the
    /// peer's routes (`wire`: the routes index).
    routes: Option<u64>,
}

/// The publications queued for one peer, drained by its sender task.
#[derive(Default)]
struct PeerQueue {
    items: Mutex<VecDeque<Item>>,
    notify: Notify,
    /// Whether the last call to the peer failed (it is being retried): a peer that does
    /// not accept batches does not stop the intake; its QoS 0 messages are dropped at
    /// [`PEER_QUEUE_MESSAGES_MAX`] instead.
    failing: std::sync::atomic::AtomicBool,
}

impl PeerQueue {
    /// Whether this queue stops the forwarder's intake.
    fn full(&self) -> bool {
        !self.failing.load(Ordering::Relaxed) && lock(&self.items).len() >= PEER_QUEUE_HIGH_WATER
    }
}

struct Forwarder {
    me: NodeId,
    handle: ClusterHandle,
    transport: Arc<dyn Transport>,
    to_shards: Vec<flume::Sender<Vec<MeshMsg>>>,
    remote: ShardId,
    routes: NodeRoutes,
    local: HashMap<String, LocalRoute>,
    peers: HashMap<NodeId, Arc<PeerQueue>>,
    /// Notified by a peer's sender when it took a batch from a queue
    /// (`PEER_QUEUE_HIGH_WATER`: the intake may go on).
    drained: Arc<Notify>,
    /// QoS 1/2 publications waiting for nodes: (shard, token) -> (answers missing,
    /// `Ack`s owed). One token can wait for several things at once, each owed its own
    /// `Ack` (the shard counts them): a publication for plain routes and for a shared
    /// group's member on another node, or for two groups; records of one forwarded
    /// batch handed back to their groups. The `Ack`s go out when every answer is in.
    pending: HashMap<(ShardId, u64), (usize, usize)>,
    events: mpsc::UnboundedSender<Event>,
    /// Route adds sent to the shards (each carries its number as ack token).
    route_seq: u64,
    /// The last route add each shard acknowledged.
    shard_acked: Vec<u64>,
    /// Barriers waiting for the table to reach their index.
    barriers: Vec<(u64, flume::Sender<()>)>,
    /// Barriers waiting for the shards to acknowledge route adds up to a number.
    barriers_seq: Vec<(u64, flume::Sender<()>)>,
    match_buf: Vec<NodeId>,
    incarnation: u64,
    clocks: Clocks,
    metrics: Arc<ForwardMetrics>,
    /// Retained messages this node proposed that were too large to ride inline, until
    /// their update is applied.
    retained_big: HashMap<String, Message>,
    /// `cluster.retained_inline_bytes`: larger payloads go by reference.
    retained_inline_bytes: usize,
    /// Large retained messages being fetched from their origins: log index -> how many.
    /// Barriers at or above such an index wait for them.
    fetching: std::collections::BTreeMap<u64, u32>,
    /// Turns over the nodes with members of a shared subscription (by their weight).
    share_cursor: u64,
    /// This node's shared subscriptions: route key -> per shard (connected, offline)
    /// members, as the shards announce them (`ShareRoute`).
    share_members: HashMap<String, Vec<(u32, u32)>>,
    /// When the table of shared members goes to the other nodes next (`None`: only at
    /// the refresh, [`SHARES_REFRESH`], or when it changes).
    shares_next: Option<tokio::time::Instant>,
    /// What each other node said of its shared members (route key -> connected
    /// members); a node not in it weighs one member per share it has a route for.
    /// (node -> group -> filter -> connected members).
    peer_shares: HashMap<NodeId, HashMap<String, HashMap<String, u32>>>,
    /// The weight of the other nodes in each share, as the shards were last told:
    /// route key -> (connected members, offline-only nodes).
    share_weights: HashMap<String, (u32, u32)>,
    /// Route changes (route key, add) waiting to be proposed, in the order they came.
    route_queue: Vec<(String, bool)>,
    /// Route proposals in flight ([`ROUTE_PROPOSALS_IN_FLIGHT_MAX`]).
    route_proposals: usize,
    /// Members that do not answer barriers ([`barrier`]).
    reach: Reach,
    /// See [`ShardEnd::own_routes_from`].
    own_routes_from: Arc<AtomicU64>,
    /// Shards that have not yet reported what their restored sessions subscribe to
    /// ([`FromShard::restored`]).
    unreported: usize,
    /// Whether every shard reported and this node's routes in the log were reconciled
    /// with them ([`Self::reconcile`]).
    reconciled: bool,
    /// The hint store ([`hints`]; `None`: hints off).
    hints: Option<Arc<HintStore>>,
    /// How long a peer fails before its batches are hinted.
    hint_wait: Duration,
}

impl Forwarder {
    async fn run(
        mut self,
        from_shards: flume::Receiver<FromShard>,
        barriers: flume::Receiver<BarrierAsk>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        let mut applied = self.resync();
        loop {
            // A live peer's full queue stops the intake (`PEER_QUEUE_HIGH_WATER`).
            let intake = !self.peers.values().any(|q| q.full());
            let drained = self.drained.clone();
            tokio::select! {
                batch = from_shards.recv_async(), if intake => match batch {
                    Ok(b) => self.on_shard(b),
                    Err(_) => return,
                },
                () = drained.notified(), if !intake => {}
                ev = applied.recv_async() => match ev {
                    Ok(AppliedEvent::Entry(e)) => {
                        if e.index > self.routes.applied() {
                            for (op, result) in &e.changes {
                                self.on_applied(op, result);
                                self.on_applied_retained(op, e.index, e.time_ms);
                            }
                            self.routes.stamp(e.index);
                            self.check_barriers();
                        }
                    }
                    Ok(AppliedEvent::SnapshotInstalled { .. }) | Err(_) => {
                        applied = self.resync();
                    }
                },
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => return,
                },
                ask = barriers.recv_async() => match ask {
                    Ok(BarrierAsk { index, reply }) => {
                        self.barriers.push((index, reply));
                        self.check_barriers();
                    }
                    Err(_) => return,
                },
                () = sleep_until_some(self.shares_next) => self.send_shares(),
            }
            self.flush_routes();
        }
    }

    /// (Re)subscribes to applied entries and rebuilds the node table from the tables.
    fn resync(&mut self) -> flume::Receiver<AppliedEvent> {
        let rx = self.handle.subscribe(APPLIED_EVENTS_MAX);
        match self
            .handle
            .tables()
            .and_then(|t| Ok((t.applied_index()?, t.routes()?)))
        {
            Ok((index, rows)) => {
                let mine = rows
                    .iter()
                    .filter(|r| r.node == self.me && r.group.is_none())
                    .count();
                self.metrics
                    .local_routes
                    .store(mine as u64, Ordering::Relaxed);
                let transitions = self
                    .routes
                    .rebuild(rows.into_iter().map(|r| (r.node, r.filter, r.group)), index);
                for t in transitions {
                    self.transition(t);
                }
                self.publish_route_metrics();
                self.check_barriers();
            }
            Err(e) => tracing::error!("cluster route table unreadable: {e}"),
        }
        // Retained messages as the log left them (the shards' own stores may be older).
        match self.handle.tables().and_then(|t| t.retained_all()) {
            Ok(all) => {
                for (topic, rec) in all {
                    if let Some(r) = rec.inline.as_deref().and_then(RetainedRef::decode) {
                        // Kept by its origin: this node's shards have it if it is the
                        // origin (their store), else it is fetched.
                        if rec.origin != self.me {
                            self.fetch_retained(topic, rec.origin, rec.index, r);
                        }
                        continue;
                    }
                    let message =
                        self.retained_message(&topic, rec.origin, rec.inline, rec.time_ms);
                    if message.is_some() {
                        self.send_retained(topic, message, rec.index);
                    }
                }
            }
            Err(e) => tracing::error!("cluster retained table unreadable: {e}"),
        }
        rx
    }

    /// A shard's retained update: proposed to the log (inline when the payload is at most
    /// `cluster.retained_inline_bytes`, else as a [`RetainedRef`]); the publisher's token is answered once the update is
    /// in force on every node.
    fn retain(&mut self, shard: ShardId, topic: Str, message: Option<Message>, ack: Option<u64>) {
        let token = ack.map(|t| (shard, t));
        let op = match &message {
            Some(m) => {
                let record = wire::retained_record((self.clocks.now_ms)(), self.publisher_of(m), m);
                let small = m.payload.len() <= self.retained_inline_bytes
                    && record.len() <= RETAINED_RECORD_INLINE_MAX;
                let inline = if small {
                    record.to_vec()
                } else {
                    // Too large for the log: it stays here, the log names it.
                    self.retained_big
                        .insert(topic.as_str().to_owned(), m.clone());
                    RetainedRef {
                        size: u32::try_from(record.len()).unwrap_or(u32::MAX),
                        digest: wire::retained_digest(m),
                    }
                    .encode()
                };
                let inline = Some(inline);
                Op::RetainedSet {
                    topic: topic.as_str().to_owned(),
                    origin: self.me,
                    size: u32::try_from(record.len()).unwrap_or(u32::MAX),
                    inline,
                }
            }
            None => Op::RetainedClear {
                topic: topic.as_str().to_owned(),
                origin: self.me,
            },
        };
        let handle = self.handle.clone();
        let events = self.events.clone();
        let transport = self.transport.clone();
        let reach = self.reach.clone();
        let me = self.me;
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(10);
            let index = loop {
                let r = match handle.propose(op.clone()) {
                    Ok(p) => p.wait().await.map(|a| a.index),
                    Err(e) => Err(e),
                };
                match r {
                    Ok(index) => break Some(index),
                    Err(ClusterError::Busy) => {}
                    Err(e) => {
                        // No quorum (or a topic beyond the cluster's bound): the
                        // publisher is answered, not held; the update did not happen.
                        tracing::warn!(topic = %topic, "retained update not replicated: {e}");
                        break None;
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            };
            if let Some(index) = index {
                let members: Vec<NodeId> =
                    handle.members().into_keys().filter(|n| *n != me).collect();
                let (reply, local) = flume::bounded(1);
                let _ = events.send(Event::LocalBarrier { index, reply });
                barrier(&transport, &members, index, &reach).await;
                let _ = tokio::time::timeout(BARRIER_TIMEOUT, local.recv_async()).await;
            }
            let _ = events.send(Event::RetainDone { token });
        });
    }

    /// The publisher identity sent with a message: its session, mixed with this node's
    /// id so publishers of different nodes differ.
    fn publisher_of(&self, m: &Message) -> u64 {
        m.origin.map_or(0, |u| u.0 ^ self.me.rotate_left(48))
    }

    /// The message of an inline retained record, or (a record without one, written
    /// before references existed) the one this node proposed; `None` for such a record
    /// of another node. References are handled before (`fetch_retained`).
    fn retained_message(
        &self,
        topic: &str,
        origin: NodeId,
        inline: Option<Vec<u8>>,
        time_ms: u64,
    ) -> Option<Message> {
        let Some(bytes) = inline else {
            return if origin == self.me {
                self.retained_big.get(topic).cloned()
            } else {
                None
            };
        };
        let levels = tessera_proto::topic::TOPIC_LEVELS_MAX;
        let Ok(Request::Batch { mut records, .. }) =
            wire::decode_request(Bytes::from(bytes), levels)
        else {
            tracing::warn!(
                topic,
                "a retained record in the log does not decode; skipped"
            );
            return None;
        };
        let r = records.pop()?;
        // The remaining lifetime was measured at proposal; the entry's wall-clock time
        // says how long ago that was.
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let age = wall_ms.saturating_sub(time_ms);
        let mut m = r.message;
        m.origin = Some(SessionUid::remote(r.publisher));
        m.expires_at_ms = r
            .expiry_ms
            .map(|e| (self.clocks.now_ms)() + e.saturating_sub(age));
        Some(m)
    }

    /// Fetches the retained message of `topic` applied at `index` from `origin`, which
    /// keeps it (`r` names it), or from any other member that holds that very message
    /// (every node fetches each update, so each is a replica: a node that restarts after
    /// the origin died still gets it); its shards get it (or, if no node can give it, a
    /// clear) when it arrives. Never a wrong payload: the digest must match.
    fn fetch_retained(&mut self, topic: String, origin: NodeId, index: u64, r: RetainedRef) {
        *self.fetching.entry(index).or_default() += 1;
        let mut from = vec![origin];
        from.extend(
            self.handle
                .members()
                .into_keys()
                .filter(|n| *n != origin && *n != self.me),
        );
        let transport = self.transport.clone();
        let events = self.events.clone();
        let now_ms = self.clocks.now_ms;
        tokio::spawn(async move {
            let mut body = Vec::with_capacity(28);
            body.extend_from_slice(&index.to_be_bytes());
            body.extend_from_slice(&r.size.to_be_bytes());
            body.extend_from_slice(&r.digest.to_be_bytes());
            let request = crate::cluster::peer::encode_envelope(
                crate::cluster::peer::PeerKind::Retained,
                topic.as_bytes(),
                &body,
            );
            // The origin's shards may not have applied the update yet when this node
            // asks (or an older version is still there): the origin first, then each
            // other member in turn, asked again until the bound.
            let deadline = tokio::time::Instant::now() + RETAINED_FETCH_TIMEOUT;
            let mut pause = Duration::from_millis(10);
            let mut errors = Vec::new();
            let got = 'rounds: loop {
                for &node in &from {
                    let call = transport.call(node, Channel::Forward, request.clone());
                    let got = match tokio::time::timeout_at(deadline, call).await {
                        Err(_) => Err(format!("no answer within {RETAINED_FETCH_TIMEOUT:?}")),
                        Ok(Err(e)) => Err(e.to_string()),
                        Ok(Ok(bytes)) => checked_retained(bytes, &topic, r, now_ms),
                    };
                    match got {
                        Ok(m) => break 'rounds Ok(m),
                        Err(e) => {
                            errors.retain(|(n, _)| *n != node);
                            errors.push((node, e));
                        }
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break 'rounds Err(());
                    }
                }
                if tokio::time::Instant::now() + pause >= deadline {
                    break Err(());
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            };
            let got = got.map_err(|()| {
                errors
                    .iter()
                    .map(|(n, e)| format!("node {n}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            });
            let message = match got {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(
                        topic,
                        origin,
                        index,
                        size = r.size,
                        "a retained message kept on other nodes could not be fetched from its \
                         origin or any other member; the topic is served as cleared here: {e}"
                    );
                    None
                }
            };
            let _ = events.send(Event::RetainedFetched {
                topic,
                index,
                message,
            });
        });
    }

    /// Every shard sets (or clears) the retained message of `topic` as applied at
    /// `index`; each acknowledges, for barriers.
    fn send_retained(&mut self, topic: String, message: Option<Message>, index: u64) {
        let Ok(topic) = Str::try_from(topic) else {
            return;
        };
        self.route_seq += 1;
        let msg = MeshMsg::Retain {
            topic,
            message,
            stamp: tessera_shard::engine::raft_stamp(index),
            ack: Some(self.route_seq),
        };
        self.send_all(msg);
    }

    fn on_applied_retained(&mut self, op: &Op, index: u64, time_ms: u64) {
        match op {
            Op::RetainedSet {
                topic,
                origin,
                inline,
                ..
            } => {
                if let Some(r) = inline.as_deref().and_then(RetainedRef::decode) {
                    if *origin == self.me {
                        // This node's shards get the message it kept; if it is gone
                        // (a restart in between), they keep what they have.
                        if let Some(m) = self.retained_big.remove(topic) {
                            self.send_retained(topic.clone(), Some(m), index);
                        }
                    } else {
                        self.fetch_retained(topic.clone(), *origin, index, r);
                    }
                    return;
                }
                let m = self.retained_message(topic, *origin, inline.clone(), time_ms);
                if *origin == self.me && inline.is_none() {
                    self.retained_big.remove(topic);
                }
                self.send_retained(topic.clone(), m, index);
            }
            Op::RetainedClear { topic, .. } => self.send_retained(topic.clone(), None, index),
            _ => {}
        }
    }

    fn on_applied(&mut self, op: &Op, result: &OpResult) {
        match (op, result) {
            (
                Op::RouteDelta {
                    node,
                    filter,
                    group,
                    add,
                },
                OpResult::RouteAdded(true) | OpResult::RouteRemoved(true),
            ) => self.on_applied_route(*node, filter, group.as_deref(), *add),
            (Op::RouteDeltas { node, changes }, OpResult::RoutesChanged(changed)) => {
                for (c, _) in changes.iter().zip(changed).filter(|(_, yes)| **yes) {
                    self.on_applied_route(*node, &c.filter, c.group.as_deref(), c.add);
                }
            }
            _ => {}
        }
    }

    /// One route change that changed the table.
    fn on_applied_route(&mut self, node: NodeId, filter: &str, group: Option<&str>, add: bool) {
        if node == self.me {
            if group.is_none() {
                let delta = if add { 1 } else { u64::MAX };
                self.metrics
                    .local_routes
                    .fetch_add(delta, Ordering::Relaxed);
            }
            // An add of this node's earlier life that this node applies only now (its
            // apply was behind the log at boot), and no subscriber here needs it. (Or an
            // add of this life applied after the answer to its removal came: the
            // removal proposed again changes nothing.)
            if add && self.reconciled && self.remove_orphan(route_key(group, filter)) {
                tracing::info!(%filter, "this node's route has no subscriber here: removing it");
            }
            return;
        }
        if let Some(t) = self.routes.apply(node, filter, group, add) {
            self.transition(t);
        }
        self.publish_route_metrics();
    }

    fn publish_route_metrics(&self) {
        *lock(&self.metrics.routes_per_node) = self.routes.routes_per_node().into_iter().collect();
    }

    /// Tells every shard that the filter now has (or no longer has) other nodes.
    fn transition(&mut self, t: Transition) {
        let (add, filter) = match t {
            Transition::Add(f) => (true, f),
            Transition::Remove(f) => (false, f),
            Transition::Share { group, filter, .. } => {
                // The other nodes weigh as many members as they said they have.
                return self.send_share_weight(&group, &filter, true);
            }
        };
        let Ok(filter) = Str::try_from(filter) else {
            tracing::warn!("a route's filter is not a valid MQTT string; not routed");
            return;
        };
        let msg = if add {
            self.route_seq += 1;
            MeshMsg::RouteAdd {
                filter,
                shard: self.remote,
                ack: Some(self.route_seq),
            }
        } else {
            MeshMsg::RouteRemove {
                filter,
                shard: self.remote,
            }
        };
        self.send_all(msg);
    }

    /// The other nodes' weight in `$share/{group}/{filter}`: (connected members,
    /// nodes with offline members only). A node that said nothing of its members yet
    /// (an older table, a restart) weighs one member, as every node did before nodes
    /// told their counts.
    fn share_weight(&self, group: &str, filter: &str) -> (u32, u32) {
        let Some(nodes) = self.routes.shared_nodes(group, filter) else {
            return (0, 0);
        };
        let (mut connected, mut offline) = (0u32, 0u32);
        for n in nodes {
            match self.peer_members(n, group, filter) {
                None => connected = connected.saturating_add(1),
                Some(c) if c > 0 => connected = connected.saturating_add(c),
                Some(_) => offline += 1,
            }
        }
        (connected, offline)
    }

    /// The connected members `node` said it has in `$share/{group}/{filter}` (0 for a
    /// share its table leaves out), `None` if it said nothing yet.
    fn peer_members(&self, node: &NodeId, group: &str, filter: &str) -> Option<u32> {
        let table = self.peer_shares.get(node)?;
        Some(
            table
                .get(group)
                .and_then(|g| g.get(filter))
                .copied()
                .unwrap_or(0),
        )
    }

    /// Tells every shard the other nodes' weight in a share if it changed (`always`:
    /// also if not, after a route change, with a number the shards acknowledge).
    fn send_share_weight(&mut self, group: &str, filter: &str, always: bool) {
        let key = route_key(Some(group), filter);
        let weight = self.share_weight(group, filter);
        let before = if weight == (0, 0) {
            self.share_weights.remove(&key)
        } else {
            self.share_weights.insert(key, weight)
        };
        if !always && before.unwrap_or((0, 0)) == weight {
            return;
        }
        let (Ok(group), Ok(filter)) = (Str::try_from(group), Str::try_from(filter)) else {
            return;
        };
        self.route_seq += 1;
        let msg = MeshMsg::ShareRoute {
            group,
            filter,
            shard: self.remote,
            connected: weight.0,
            offline: weight.1,
            ack: Some(self.route_seq),
        };
        self.send_all(msg);
    }

    /// A shard announced its members of a share: this node's table changed, the other
    /// nodes hear of it (after [`SHARES_PAUSE`]).
    fn local_share_members(&mut self, shard: ShardId, key: &str, connected: u32, offline: u32) {
        let shards = self.to_shards.len();
        let entry = self
            .share_members
            .entry(key.to_owned())
            .or_insert_with(|| vec![(0, 0); shards]);
        let Some(slot) = entry.get_mut(usize::from(shard)) else {
            return;
        };
        if *slot == (connected, offline) {
            return;
        }
        *slot = (connected, offline);
        if entry.iter().all(|&(c, o)| c == 0 && o == 0) {
            self.share_members.remove(key);
        }
        let soon = tokio::time::Instant::now() + SHARES_PAUSE;
        if self.shares_next.is_none_or(|t| t > soon) {
            self.shares_next = Some(soon);
        }
    }

    /// Sends this node's table of shared members to every other member, and plans the
    /// next send: the refresh while it has shares.
    fn send_shares(&mut self) {
        let own: u64 = self
            .share_members
            .values()
            .flat_map(|shards| shards.iter().map(|&(c, _)| u64::from(c)))
            .sum();
        lock(&self.metrics.shared_members).insert(0, own);
        self.shares_next =
            (!self.share_members.is_empty()).then(|| tokio::time::Instant::now() + SHARES_REFRESH);
        let counts: Vec<(&str, &str, u32)> = self
            .share_members
            .iter()
            .filter_map(|(key, shards)| {
                let (group, filter) = split_key(key);
                let connected = shards.iter().map(|&(c, _)| c).sum();
                Some((group?, filter, connected))
            })
            .collect();
        let request = wire::encode_shares(&ENVELOPE, counts.into_iter());
        for node in self.handle.members().into_keys().filter(|n| *n != self.me) {
            let transport = self.transport.clone();
            let request = request.clone();
            let wait = self.reach.wait;
            tokio::spawn(async move {
                let call = transport.call(node, Channel::Forward, request);
                match tokio::time::timeout(wait, call).await {
                    Ok(Ok(b)) if wire::decode_answer(b.clone()) == Ok(Answer::Noted) => {}
                    Ok(Ok(_)) => tracing::warn!(node, "unexpected answer to this node's shares"),
                    // The refresh sends them again.
                    Ok(Err(e)) => tracing::debug!(node, "shares not sent: {e}"),
                    Err(_) => tracing::debug!(node, "shares not answered in time"),
                }
            });
        }
    }

    /// Another node's table of its shared members: it replaces what that node said
    /// before, and the shares whose weight changed are told to the shards.
    fn on_peer_shares(&mut self, from: NodeId, counts: Vec<wire::ShareCount>) {
        if from == self.me {
            return;
        }
        let mut table: HashMap<String, HashMap<String, u32>> = HashMap::new();
        let mut members = 0u64;
        for c in counts {
            members += u64::from(c.members);
            table
                .entry(c.group.to_string())
                .or_default()
                .insert(c.filter.to_string(), c.members);
        }
        lock(&self.metrics.shared_members).insert(from, members);
        let shares = |t: &HashMap<String, HashMap<String, u32>>| -> Vec<(String, String)> {
            t.iter()
                .flat_map(|(g, fs)| fs.keys().map(move |f| (g.clone(), f.clone())))
                .collect()
        };
        let mut keys = shares(&table);
        if let Some(old) = self.peer_shares.insert(from, table) {
            keys.extend(shares(&old));
        }
        keys.sort_unstable();
        keys.dedup();
        for (group, filter) in keys {
            if self.routes.shared_nodes(&group, &filter).is_some() {
                self.send_share_weight(&group, &filter, false);
            }
        }
    }

    /// Sends `msg` to every shard. A full channel (a shard far behind) makes the
    /// message wait in a task rather than be lost.
    fn send_all(&self, msg: MeshMsg) {
        for tx in &self.to_shards {
            if let Err(flume::TrySendError::Full(m)) = tx.try_send(vec![msg.clone()]) {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send_async(m).await;
                });
            }
        }
    }

    fn check_barriers(&mut self) {
        let applied = self.routes.applied();
        let seq = self.route_seq;
        // A large retained message applied at or below a barrier's index and still
        // being fetched holds the barrier: its update is not in force here yet.
        let fetching = self.fetching.keys().next().copied().unwrap_or(u64::MAX);
        let mut i = 0;
        while i < self.barriers.len() {
            if self.barriers[i].0 <= applied && self.barriers[i].0 < fetching {
                let (_, reply) = self.barriers.swap_remove(i);
                self.barriers_seq.push((seq, reply));
            } else {
                i += 1;
            }
        }
        let acked = self.shard_acked.iter().copied().min().unwrap_or(u64::MAX);
        let mut i = 0;
        while i < self.barriers_seq.len() {
            if self.barriers_seq[i].0 <= acked {
                let (_, reply) = self.barriers_seq.swap_remove(i);
                let _ = reply.send(());
            } else {
                i += 1;
            }
        }
    }

    fn on_shard(&mut self, b: FromShard) {
        let shard = b.shard;
        if let Some(keys) = b.restored {
            self.on_restored(shard, keys);
        }
        if let Some((from, counts)) = b.peer_shares {
            self.on_peer_shares(from, counts);
        }
        for msg in b.msgs {
            match msg {
                MeshMsg::Publish { message, id } => self.forward(shard, message, None, id),
                MeshMsg::PublishDurable {
                    message, ack, id, ..
                } => self.forward(shard, message, Some(ack), id),
                MeshMsg::PublishRemote { message, ack, id } => {
                    self.forward(shard, message, ack, id)
                }
                MeshMsg::Redirect {
                    client_id,
                    node,
                    epoch,
                    message,
                    id,
                    ack,
                } => self.redirect(shard, node, (client_id, epoch), message, id, ack),
                MeshMsg::RouteAdd { filter, ack, .. } => {
                    self.local_add(shard, route_key(None, &filter), ack)
                }
                MeshMsg::RouteRemove { filter, .. } => {
                    self.local_remove(shard, route_key(None, &filter))
                }
                MeshMsg::ShareRoute {
                    group,
                    filter,
                    connected,
                    offline,
                    ack,
                    ..
                } => {
                    let key = route_key(Some(&group), &filter);
                    self.local_share_members(shard, &key, connected, offline);
                    if connected > 0 || offline > 0 {
                        self.local_add(shard, key, ack);
                    } else {
                        self.local_remove(shard, key);
                        if let Some(t) = ack {
                            self.ack_shard((shard, t));
                        }
                    }
                }
                MeshMsg::SharedPublish {
                    group,
                    filter,
                    message,
                    key,
                    handed_back,
                    ack,
                    ..
                } => {
                    let share = wire::ShareFor {
                        group,
                        filter,
                        handed_back,
                    };
                    self.forward_shared(share, message, key, ack)
                }
                MeshMsg::Retain {
                    topic,
                    message,
                    ack,
                    ..
                } => self.retain(shard, topic, message, ack),
                MeshMsg::Ack { token } => {
                    if let Some(a) = self.shard_acked.get_mut(usize::from(shard)) {
                        *a = (*a).max(token);
                    }
                    self.check_barriers();
                }
                other => tracing::debug!(shard, "forwarder ignores {other:?}"),
            }
        }
    }

    /// A publication for one session that moved from a shard here to `node`
    /// (`tessera_shard::engine` module `moved`): queued for that node alone, the
    /// shard's token answered once it accepted it.
    fn redirect(
        &mut self,
        shard: ShardId,
        node: NodeId,
        session: (Str, u64),
        message: Message,
        id: Option<PubId>,
        token: Option<u64>,
    ) {
        let token = token.map(|t| (shard, t));
        if node == self.me {
            // Never: a session moves to another node. Answered, not held.
            if let Some(t) = token {
                self.ack_shard(t);
            }
            return;
        }
        if let Some(t) = token {
            self.wait_for(t, 1);
        }
        self.metrics.redirected.fetch_add(1, Ordering::Relaxed);
        let publisher = self.publisher_of(&message);
        let item = Item {
            message,
            publisher,
            token,
            share: None,
            id,
            session: Some(session),
            routes: None,
        };
        self.queue_for(node, item);
    }

    /// Queues `item` for `node` (its sender wakes when the queue was empty).
    fn queue_for(&mut self, node: NodeId, item: Item) {
        let queue = self.peer(node);
        let mut items = lock(&queue.items);
        items.push_back(item);
        let first = items.len() == 1;
        drop(items);
        if first {
            queue.notify.notify_one();
        }
    }

    fn forward(&mut self, shard: ShardId, message: Message, token: Option<u64>, id: Option<PubId>) {
        let mut nodes = std::mem::take(&mut self.match_buf);
        self.routes.match_nodes(&message.topic, &mut nodes);
        let publisher = self.publisher_of(&message);
        // The table it was matched in: the receiver gives a copy matched before this
        // node applied any route add of the receiver's present life only to the
        // subscriptions the receiver kept from its earlier one (`wire`).
        let routes = Some(self.routes.applied());
        let token = token.map(|t| (shard, t));
        if let Some(t) = token {
            if nodes.is_empty() {
                // The route went away meanwhile: nothing to wait for.
                self.ack_shard(t);
            } else {
                self.wait_for(t, nodes.len());
            }
        }
        // The last node gets the message itself, the others a clone: with one node (the
        // common case) its topic and payload are not cloned and dropped again here.
        let mut message = Some(message);
        let last = nodes.len().saturating_sub(1);
        for (i, &node) in nodes.iter().enumerate() {
            if !self.peers.contains_key(&node) {
                self.peer(node);
            }
            let Some(queue) = self.peers.get(&node) else {
                continue;
            };
            let mut items = lock(&queue.items);
            if token.is_none() && items.len() >= PEER_QUEUE_MESSAGES_MAX {
                drop(items);
                let mut peers = lock(&self.metrics.peers);
                peers.entry(node).or_default().dropped += 1;
                continue;
            }
            let message = if i == last {
                message.take()
            } else {
                message.clone()
            };
            let Some(message) = message else {
                continue;
            };
            items.push_back(Item {
                message,
                publisher,
                token,
                share: None,
                id,
                session: None,
                routes,
            });
            let first = items.len() == 1;
            drop(items);
            if first {
                queue.notify.notify_one();
            }
        }
        self.match_buf = nodes;
    }

    /// A publication for one member of `$share/{group}/{filter}` that a shard chose to
    /// give to another node (or handed back: this node's members left after another
    /// node chose it): one node with members, in turn, gets it. Nodes whose calls fail
    /// (down, partitioned) are passed over while another node with members answers, so
    /// a dead node's share goes to the rest of the group; what is already queued for it
    /// waits for it (QoS 1/2 are never dropped).
    fn forward_shared(
        &mut self,
        share: wire::ShareFor,
        message: Message,
        key: u64,
        ack: Option<(ShardId, u64)>,
    ) {
        self.share_cursor = self.share_cursor.wrapping_add(1);
        let cursor = self.share_cursor;
        let node = self
            .routes
            .shared_nodes(&share.group, &share.filter)
            .and_then(|nodes| {
                let answering = |n: &NodeId| {
                    self.peers
                        .get(n)
                        .is_none_or(|q| !q.failing.load(Ordering::Relaxed))
                };
                // Each node by its connected members (one if it said nothing yet).
                let weight = |n: &NodeId| -> u64 {
                    self.peer_members(n, &share.group, &share.filter)
                        .map_or(1, u64::from)
                };
                if nodes.iter().any(answering) {
                    let live = nodes.iter().copied().filter(|n| answering(n));
                    pick_weighted(live, cursor, weight)
                } else {
                    pick_weighted(nodes.iter().copied(), cursor, weight)
                }
            });
        let Some(node) = node else {
            // The other nodes' members left meanwhile: nobody to give it to.
            self.metrics.shared_dropped.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = ack {
                self.ack_shard(t);
            }
            return;
        };
        if share.handed_back {
            self.metrics
                .shared_handed_back
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Some(t) = ack {
            self.wait_for(t, 1);
        }
        let item = Item {
            message,
            publisher: key,
            token: ack,
            share: Some(share),
            id: None,
            session: None,
            routes: None,
        };
        self.queue_for(node, item);
    }

    fn peer(&mut self, node: NodeId) -> Arc<PeerQueue> {
        self.peer_gated(node, None)
    }

    /// Batches an earlier life of this node hinted for `node`: a task sends them
    /// ([`send_earlier_hints`]), and this life's sender for `node` sends nothing before
    /// it is done (it hints what comes meanwhile).
    fn send_earlier_hints(&mut self, node: NodeId, stored: hints::Stored) {
        let Some(store) = self.hints.clone() else {
            return;
        };
        if node == self.me {
            return;
        }
        let (open, gate) = tokio::sync::watch::channel(false);
        self.peer_gated(node, Some(gate));
        tokio::spawn(send_earlier_hints(
            node,
            store,
            stored,
            self.transport.clone(),
            self.handle.clone(),
            open,
            self.events.clone(),
            self.metrics.clone(),
        ));
    }

    fn peer_gated(
        &mut self,
        node: NodeId,
        gate: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Arc<PeerQueue> {
        if let Some(q) = self.peers.get(&node) {
            return q.clone();
        }
        let q = Arc::new(PeerQueue::default());
        if gate.is_some() {
            // Sends nothing yet: its queue must not stop the intake.
            q.failing.store(true, Ordering::Relaxed);
        }
        self.peers.insert(node, q.clone());
        let (sender, done_rx) = PeerSender::new(
            node,
            q.clone(),
            self.drained.clone(),
            self.transport.clone(),
            self.events.clone(),
            (self.incarnation, self.metrics.clone()),
            (self.hints.clone(), self.hint_wait),
            gate,
        );
        tokio::spawn(send_to_peer(
            sender,
            done_rx,
            self.clocks,
            self.handle.clone(),
        ));
        q
    }

    /// Token `t` waits for `answers` more peer answers and is owed one more `Ack`.
    fn wait_for(&mut self, t: (ShardId, u64), answers: usize) {
        let (missing, acks) = self.pending.entry(t).or_insert((0, 0));
        *missing += answers;
        *acks += 1;
    }

    fn ack_shard(&self, (shard, token): (ShardId, u64)) {
        self.send_shard(shard, MeshMsg::Ack { token });
    }

    fn send_shard(&self, shard: ShardId, msg: MeshMsg) {
        if let Some(tx) = self.to_shards.get(usize::from(shard)) {
            let msg = vec![msg];
            if let Err(flume::TrySendError::Full(m)) = tx.try_send(msg) {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send_async(m).await;
                });
            }
        }
    }

    fn local_add(&mut self, shard: ShardId, key: String, ack: Option<u64>) {
        let e = self.local.entry(key.clone()).or_insert_with(|| LocalRoute {
            shards: ShardSet::new(),
            state: LocalState::Idle,
            waiters: Vec::new(),
        });
        e.shards.insert(shard);
        if let Some(t) = ack {
            e.waiters.push((shard, t));
        }
        match e.state {
            LocalState::Routed => {
                let waiters = std::mem::take(&mut e.waiters);
                for w in waiters {
                    self.ack_shard(w);
                }
            }
            LocalState::Idle => self.propose(key, true),
            LocalState::Adding | LocalState::Removing => {}
        }
    }

    /// Shard `shard`'s report at boot: the route keys its restored sessions subscribe
    /// to. Each counts as the shard's first subscriber to it, with no SUBSCRIBE
    /// waiting: the route is proposed again unless a SUBSCRIBE since already did (an
    /// add the log already holds changes nothing there, but its commit index marks this
    /// life, [`ShardEnd::own_routes_from`], and its barrier has every other member
    /// apply the route before a SUBSCRIBE beside these subscriptions is acknowledged).
    /// After the last shard's report, [`Self::reconcile`].
    fn on_restored(&mut self, shard: ShardId, keys: Vec<String>) {
        for key in keys {
            self.local_add(shard, key, None);
        }
        self.unreported = self.unreported.saturating_sub(1);
        if self.unreported == 0 && !self.reconciled {
            self.reconcile();
        }
    }

    /// Once every shard reported what its restored sessions subscribe to: proposes the
    /// removal of each route of this node in the committed table that no local
    /// subscription needs (left by sessions that were not restored: `memory`
    /// durability, a session that expired or ended while the node was down, a crash
    /// between an unsubscribe and its route removal). A key with a local entry is left
    /// alone: a subscriber has it (restored, or a SUBSCRIBE that came meanwhile), or a
    /// change of it is on its way; so no remove is ever proposed for a filter a
    /// subscriber needs, and the per-key order of proposals holds (a SUBSCRIBE that
    /// comes while the remove is proposed waits for it, then proposes its add).
    /// Own adds applied later (this node's apply was behind the log at boot) are
    /// checked as they are applied ([`Self::on_applied_route`]).
    fn reconcile(&mut self) {
        self.reconciled = true;
        let rows = match self.handle.tables().and_then(|t| t.routes()) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!("cluster route table unreadable: {e}");
                return;
            }
        };
        let me = self.me;
        let mut orphans = 0usize;
        for r in rows.into_iter().filter(|r| r.node == me) {
            if self.remove_orphan(route_key(r.group.as_deref(), &r.filter)) {
                tracing::debug!(filter = %r.filter, group = ?r.group, "this node's route has no subscriber here: removing it");
                orphans += 1;
            }
        }
        tracing::info!(
            node = self.me,
            kept = self.local.len(),
            removing = orphans,
            "this node's routes reconciled with its restored subscriptions"
        );
    }

    /// Proposes the removal of this node's route `key` when no local entry has it
    /// (see [`Self::reconcile`]); whether it did.
    fn remove_orphan(&mut self, key: String) -> bool {
        if self.local.contains_key(&key) {
            return false;
        }
        self.local.insert(
            key.clone(),
            LocalRoute {
                shards: ShardSet::new(),
                state: LocalState::Idle,
                waiters: Vec::new(),
            },
        );
        self.propose(key, false);
        true
    }

    fn local_remove(&mut self, shard: ShardId, key: String) {
        let Some(e) = self.local.get_mut(&key) else {
            return;
        };
        e.shards.remove(shard);
        if e.shards.is_empty() && e.state == LocalState::Routed {
            self.propose(key, false);
        }
    }

    /// Queues this node's route change for `filter` (a route key); [`Self::flush_routes`]
    /// proposes it until it is applied, then (for an add) the barrier runs on every other
    /// member.
    fn propose(&mut self, filter: String, add: bool) {
        if let Some(e) = self.local.get_mut(&filter) {
            e.state = if add {
                LocalState::Adding
            } else {
                LocalState::Removing
            };
        }
        let (group, plain) = split_key(&filter);
        let change = RouteChange {
            filter: plain.to_owned(),
            group: group.map(str::to_owned),
            add,
        };
        if let Err(r) = change.validate() {
            // A filter longer than the cluster's bound: it cannot be routed to other
            // nodes; local subscribers still work.
            tracing::warn!(%filter, "route not replicated: {r}");
            self.on_proposed(filter, add, Err(ClusterError::Invalid(r)));
            return;
        }
        self.route_queue.push((filter, add));
    }

    /// Proposes the queued route changes, up to [`ROUTE_PROPOSALS_IN_FLIGHT_MAX`]
    /// proposals at once, each with up to `ROUTE_CHANGES_MAX` changes: one
    /// `Op::RouteDeltas` (a lone change: `Op::RouteDelta`), retried until applied.
    fn flush_routes(&mut self) {
        while !self.route_queue.is_empty() && self.route_proposals < ROUTE_PROPOSALS_IN_FLIGHT_MAX {
            let n = self
                .route_queue
                .len()
                .min(tessera_raft::op::ROUTE_CHANGES_MAX);
            let rest = self.route_queue.split_off(n);
            let changes = std::mem::replace(&mut self.route_queue, rest);
            self.route_proposals += 1;
            self.spawn_route_proposal(changes);
        }
    }

    fn spawn_route_proposal(&self, changes: Vec<(String, bool)>) {
        let handle = self.handle.clone();
        let events = self.events.clone();
        let me = self.me;
        let op = route_op(me, &changes);
        // Whatever ends the task (an answer, a shutdown, a panic), the forwarder learns.
        struct Ended(mpsc::UnboundedSender<Event>);
        impl Drop for Ended {
            fn drop(&mut self) {
                let _ = self.0.send(Event::ProposalEnded);
            }
        }
        tokio::spawn(async move {
            let _ended = Ended(events.clone());
            let adds: Vec<(String, bool)> = changes.iter().filter(|c| c.1).cloned().collect();
            let mut pause = Duration::from_millis(10);
            loop {
                let result = match handle.propose(op.clone()) {
                    Ok(p) => {
                        let mut wait = std::pin::pin!(p.wait());
                        loop {
                            match tokio::time::timeout(ROUTE_ANSWER_WAIT, &mut wait).await {
                                Ok(r) => break r.map(|a| a.index),
                                // A leader that lost its quorum may never answer (openraft
                                // keeps the write): the SUBSCRIBEs waiting by now get
                                // their failure, and the proposal is awaited on.
                                Err(_) if !adds.is_empty() => {
                                    let _ = events.send(Event::Proposed {
                                        changes: adds.clone(),
                                        result: Err(ClusterError::Unavailable(format!(
                                            "not committed within {ROUTE_ANSWER_WAIT:?}"
                                        ))),
                                    });
                                }
                                Err(_) => {}
                            }
                        }
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Err(ClusterError::Busy) => {}
                    Err(ClusterError::Shutdown(_)) => return,
                    r => {
                        // Invalid cannot happen (every change was checked when queued);
                        // if it does, the changes get their failure and are not retried.
                        let done = r.is_ok() || matches!(r, Err(ClusterError::Invalid(_)));
                        let _ = events.send(Event::Proposed {
                            changes: changes.clone(),
                            result: r,
                        });
                        if done {
                            return;
                        }
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        });
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Proposed { changes, result } => {
                // One barrier for every add of the proposal: they share its index.
                let mut barrier = Vec::new();
                for (filter, add) in changes {
                    if let Some(f) = self.on_proposed(filter, add, result.clone()) {
                        barrier.push(f);
                    }
                }
                if let (Ok(index), false) = (result, barrier.is_empty()) {
                    // Before any SUBACK that waits for this add: from here a copy
                    // another node matched below `index` is one for this node's
                    // earlier life ([`serve_request`]).
                    self.own_routes_from.fetch_min(index, Ordering::SeqCst);
                    self.run_barrier(index, barrier);
                }
            }
            Event::ProposalEnded => self.route_proposals = self.route_proposals.saturating_sub(1),
            Event::BarrierDone { filters } => {
                for filter in filters {
                    self.barrier_done(filter);
                }
            }
            Event::RetainedFetched {
                topic,
                index,
                message,
            } => {
                if let Some(n) = self.fetching.get_mut(&index) {
                    *n -= 1;
                    if *n == 0 {
                        self.fetching.remove(&index);
                    }
                }
                self.send_retained(topic, message, index);
                self.check_barriers();
            }
            Event::RetainDone { token } => {
                if let Some(t) = token {
                    self.ack_shard(t);
                }
            }
            Event::LocalBarrier { index, reply } => {
                self.barriers.push((index, reply));
                self.check_barriers();
            }
            Event::PeerDone { tokens } => {
                for t in tokens {
                    if let Some((missing, acks)) = self.pending.get_mut(&t) {
                        *missing -= 1;
                        if *missing == 0 {
                            let acks = *acks;
                            self.pending.remove(&t);
                            for _ in 0..acks {
                                self.ack_shard(t);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The barrier of route adds applied at `index`: when every other member applied it
    /// (or failed to answer), their SUBSCRIBEs are acknowledged.
    fn run_barrier(&self, index: u64, filters: Vec<String>) {
        let members: Vec<NodeId> = self
            .handle
            .members()
            .into_keys()
            .filter(|n| *n != self.me)
            .collect();
        let transport = self.transport.clone();
        let events = self.events.clone();
        let reach = self.reach.clone();
        tokio::spawn(async move {
            barrier(&transport, &members, index, &reach).await;
            let _ = events.send(Event::BarrierDone { filters });
        });
    }

    fn barrier_done(&mut self, filter: String) {
        let Some(e) = self.local.get_mut(&filter) else {
            return;
        };
        if e.state != LocalState::Adding {
            return;
        }
        e.state = LocalState::Routed;
        let waiters = std::mem::take(&mut e.waiters);
        let empty = e.shards.is_empty();
        for w in waiters {
            self.ack_shard(w);
        }
        if empty {
            self.propose(filter, false);
        }
    }

    /// What a route change's proposal did. Returns the filter when its add was applied
    /// and its barrier must run.
    fn on_proposed(
        &mut self,
        filter: String,
        add: bool,
        result: Result<u64, ClusterError>,
    ) -> Option<String> {
        let e = self.local.get_mut(&filter)?;
        match (add, result) {
            (true, Ok(_)) => return Some(filter),
            (true, Err(err)) => {
                // No quorum, a timeout or a filter the cluster cannot hold: the SUBACKs
                // that wait are not held without bound, and they must not claim a route
                // that is not there, so they answer a failure for this filter (the
                // shards drop the subscription). The proposal keeps being retried
                // (unless invalid) and the route lands when the cluster can commit it.
                tracing::warn!(%filter, "route proposal failed, SUBSCRIBE refused for this filter: {err}");
                let waiters = std::mem::take(&mut e.waiters);
                let reason = if matches!(err, ClusterError::Invalid(_)) {
                    e.state = LocalState::Idle;
                    ReasonCode::TopicFilterInvalid
                } else {
                    ReasonCode::UnspecifiedError
                };
                let (group, plain) = split_key(&filter);
                let subscribed = match group {
                    Some(g) => format!("$share/{g}/{plain}"),
                    None => plain.to_owned(),
                };
                match Str::try_from(subscribed) {
                    Ok(subscribed) => {
                        for (shard, token) in waiters {
                            self.send_shard(
                                shard,
                                MeshMsg::RouteFailed {
                                    token,
                                    filter: subscribed.clone(),
                                    reason,
                                },
                            );
                        }
                    }
                    Err(_) => {
                        for w in waiters {
                            self.ack_shard(w);
                        }
                    }
                }
            }
            (false, Ok(_)) => {
                if e.shards.is_empty() {
                    e.state = LocalState::Idle;
                    if e.waiters.is_empty() {
                        self.local.remove(&filter);
                    }
                } else {
                    self.propose(filter, true);
                }
            }
            (false, Err(err)) => {
                tracing::debug!(%filter, "route removal failed, retrying: {err}");
            }
        }
        None
    }
}

/// The op of `me`'s route changes (route key, add): one `RouteDelta` for a lone change
/// (the op every version of the log knows), else one `RouteDeltas`.
fn route_op(me: NodeId, changes: &[(String, bool)]) -> Op {
    let change = |(key, add): &(String, bool)| {
        let (group, plain) = split_key(key);
        RouteChange {
            filter: plain.to_owned(),
            group: group.map(str::to_owned),
            add: *add,
        }
    };
    match changes {
        [one] => {
            let c = change(one);
            Op::RouteDelta {
                node: me,
                filter: c.filter,
                group: c.group,
                add: c.add,
            }
        }
        many => Op::RouteDeltas {
            node: me,
            changes: many.iter().map(change).collect(),
        },
    }
}

/// The message of a fetched retained record, if it is the one the log names: the topic
/// asked for, RETAIN set, the digest in the reference.
fn checked_retained(
    bytes: Bytes,
    topic: &str,
    r: RetainedRef,
    now_ms: fn() -> u64,
) -> Result<Message, String> {
    let rec = wire::decode_retained_record(bytes).map_err(|e| e.to_string())?;
    let mut m = rec.message;
    if m.topic.as_str() != topic {
        return Err(format!("a record for topic {:?}", m.topic.as_str()));
    }
    if !m.retain {
        return Err("a record without RETAIN".into());
    }
    if wire::retained_digest(&m) != r.digest {
        return Err(
            "a message whose digest is not the one in the log (it changed or is gone there)".into(),
        );
    }
    m.origin = Some(SessionUid::remote(rec.publisher));
    m.expires_at_ms = rec.expiry_ms.map(|e| now_ms() + e);
    Ok(m)
}

/// Asks every node of `members` for a barrier at `index`, in parallel; a node that does
/// not answer (down, partitioned) is logged and skipped.
///
/// Not at once: a member that does not answer is asked again until it has been
/// unreachable (from here) for [`Reach::wait`], the session lease. A node that misses
/// a route add may take a publication for it and acknowledge it without forwarding
/// it; once it has been out of touch for its lease it has ended its clients'
/// connections and refuses new ones (`server::claims::fence`), and a node that is in
/// touch with the rest has applied the route within that time. Before, a member that
/// failed to answer was skipped at once, and the simulation (seeds 293, 294) found a
/// SUBACK followed by an acknowledged publication on the partitioned node that never
/// arrived.
async fn barrier(transport: &Arc<dyn Transport>, members: &[NodeId], index: u64, reach: &Reach) {
    let mut set = tokio::task::JoinSet::new();
    for &node in members {
        let transport = transport.clone();
        let reach = reach.clone();
        set.spawn(async move {
            let mut pause = Duration::from_millis(20);
            loop {
                let call = transport.call(
                    node,
                    Channel::Forward,
                    wire::encode_barrier(&ENVELOPE, index),
                );
                let r = match tokio::time::timeout(reach.wait, call).await {
                    Ok(r) => r,
                    Err(_) => Err(tessera_raft::TransportError::Timeout(node)),
                };
                match r {
                    Ok(b) => {
                        reach.answered(node);
                        break (node, Ok(b));
                    }
                    Err(e) if reach.given_up(node) => break (node, Err(e)),
                    Err(_) => {}
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        });
    }
    while let Some(done) = set.join_next().await {
        match done {
            Ok((node, Ok(b))) => {
                if wire::decode_answer(b) != Ok(Answer::Applied { index }) {
                    tracing::warn!(node, index, "unexpected answer to a route barrier");
                }
            }
            Ok((node, Err(e))) => {
                tracing::warn!(node, index, "route barrier not answered: {e}")
            }
            Err(_) => {}
        }
    }
}

/// Since when each member has not answered a barrier, and how long a barrier waits
/// for one that does not ([`barrier`]).
#[derive(Debug, Clone)]
struct Reach {
    wait: Duration,
    since: Arc<Mutex<HashMap<NodeId, tokio::time::Instant>>>,
}

impl Reach {
    fn answered(&self, node: NodeId) {
        lock(&self.since).remove(&node);
    }

    /// A call to `node` failed: whether it has been unreachable for the wait.
    fn given_up(&self, node: NodeId) -> bool {
        let now = tokio::time::Instant::now();
        let since = *lock(&self.since).entry(node).or_insert(now);
        now.duration_since(since) >= self.wait
    }
}

/// A batch from being taken off a peer's queue until it is complete at the peer.
struct Sent {
    seq: u64,
    count: u64,
    /// The batch as first sent, while memory keeps it: `None` once it is complete
    /// (sent again after a failure, it goes without records, see `wire`) or once it
    /// is in the hint store (read from there to be sent again).
    bytes: Option<Bytes>,
    /// Its size, for the counters.
    size: u64,
    /// The QoS 1/2 publications it carries: (shard, token); empty once answered
    /// (complete, or hinted).
    tokens: Vec<(ShardId, u64)>,
    state: SentState,
    /// Counted as sent (the peer accepted it once).
    counted: bool,
    /// Complete at the peer.
    complete: bool,
    /// Where it is in the hint store.
    disk: Disk,
}

/// Where a [`Sent`] batch is in the hint store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disk {
    /// Not there.
    No,
    /// Its write is queued or running.
    Writing,
    /// Committed: its publishers were answered.
    Written,
}

/// Where a [`Sent`] batch is.
enum SentState {
    /// To be sent (again, after a failure; or, taken while hinting, for the first time).
    Idle,
    /// Its call is running.
    Sending(tokio::task::JoinHandle<Result<Answer, String>>),
    /// The peer answered received; a done request is running.
    Received(tokio::task::AbortHandle),
    /// Complete at the peer: its publications are answered.
    Done,
}

impl Sent {
    fn abort(&mut self) {
        match std::mem::replace(&mut self.state, SentState::Idle) {
            SentState::Sending(call) => call.abort(),
            SentState::Received(done) => done.abort(),
            SentState::Done => self.state = SentState::Done,
            SentState::Idle => {}
        }
    }
}

/// Batches that are not done that a sender keeps (sent, received or to send again)
/// while it does not hint: the batches' bytes are kept until they are done, so this
/// bounds them. Below the link's requests served at once per stream (64), which their
/// done requests take. Hinted batches are bounded by the hint budget and
/// [`hints::HINTED_BATCHES_MAX`] instead.
const BATCHES_NOT_DONE_MAX: usize = 32;
/// Batch calls in flight at once when batches go again after a failure once the peer
/// accepted one of them, or when batches taken while hinting go while the peer
/// answers (no more than [`BATCHES_NOT_DONE_MAX`] not done at the peer). A hint
/// backlog is many small batches (one per write: one per fsync while the peer was
/// away); one per round trip, a node resent ~8 s of hints in 11.8 s in the pause
/// scenario (debug build), longer than a moved session's hold at its new owner.
const RESEND_IN_FLIGHT: usize = 16;
/// The simulation's pause before a hint write (its paused clock: a commit takes time).
const HINT_WRITE_SIM: Duration = Duration::from_millis(2);
/// How often a sender that would hint, but whose node is out of touch with its
/// cluster, looks again.
const HINT_CONTACT_RECHECK: Duration = Duration::from_millis(100);

/// Takes the next batch from `queue`: `seq`, sent while the batches from `base` on are
/// not done. `None` when the queue is empty.
fn take_batch(
    queue: &PeerQueue,
    drained: &Notify,
    incarnation: u64,
    (seq, base): (u64, u64),
    now_ms: u64,
) -> Option<Sent> {
    let mut items = lock(&queue.items);
    if items.is_empty() {
        return None;
    }
    let mut w = BatchWriter::with_base(&ENVELOPE, incarnation, seq, base);
    let mut tokens = Vec::new();
    while w.len() < BATCH_MESSAGES_TARGET
        && w.bytes() < BATCH_BYTES_TARGET
        && let Some(item) = items.pop_front()
    {
        let tags = wire::Tags {
            share: item.share.as_ref(),
            id: item.id,
            session: item.session.as_ref().map(|(c, e)| (c, *e)),
            routes: item.routes,
        };
        w.push_tagged(now_ms, item.publisher, &item.message, tags);
        if let Some(t) = item.token {
            tokens.push(t);
        }
    }
    if items.len() < PEER_QUEUE_HIGH_WATER {
        drained.notify_one();
    }
    let count = w.len() as u64;
    let bytes = w.finish();
    Some(Sent {
        seq,
        count,
        size: bytes.len() as u64,
        bytes: Some(bytes),
        tokens,
        state: SentState::Idle,
        counted: false,
        complete: false,
        disk: Disk::No,
    })
}

/// Sends the peer's queue to it, in order, with answers in two steps (`wire`, "Answers in
/// two steps"): up to [`BATCHES_IN_FLIGHT`] batches wait for their first answer; a
/// batch answered received waits for its done request while the next ones go, up to
/// [`BATCHES_NOT_DONE_MAX`]. Its QoS 1/2 publications are answered when it is done.
/// After any failure (a call, a done request, a peer that restarted) every batch from
/// the oldest one not done is sent again, in order (done ones with no records), after
/// a pause that grows with each failure: the first alone (a peer that restarted takes
/// only the batch whose base is its number), and once the peer accepted it the rest
/// [`RESEND_IN_FLIGHT`] at a time (the link keeps the order of one channel's calls;
/// the receiver takes a batch only after the one before it and refuses one whose
/// predecessor it did not take, and any refusal or failure starts a new round).
///
/// **Hints** ([`hints`]): once calls to the peer have failed for the session lease,
/// every batch not done and every batch taken from then on is written to the hint
/// store, and its publications are answered once it is committed there; the batches
/// keep their place and number in the window, so the peer gets them as every resend
/// after a failure (their records read back from the store), and each is deleted
/// from the store once done. Hinting ends when the peer answers and no hinted batch is
/// left. At the hint budget, batches wait in the queue as without hints.
///
/// Ends when the forwarder's task ended (its events channel closed), so nothing of a
/// stopped forwarder keeps calling peers or holds the raft handle (the data-plane
/// simulation stops and restarts nodes in one process).
async fn send_to_peer(
    mut p: PeerSender,
    mut done_rx: mpsc::UnboundedReceiver<(u64, u64, Result<Answer, String>)>,
    clocks: Clocks,
    handle: ClusterHandle,
) {
    let queue = p.queue.clone();
    let events = p.events.clone();
    loop {
        // The forwarder is gone (it ended): so is this peer's sender, with its handle.
        if events.is_closed() {
            p.abort_all();
            return;
        }
        let notified = queue.notify.notified();
        let now = tokio::time::Instant::now();
        let now_ms = (clocks.now_ms)();
        p.tidy();
        p.in_contact = p.hints.is_some() && handle.leader().is_some() && handle.in_contact(p.lease);
        p.check_hinting(now);
        p.hint_more(now_ms);
        p.flush_hints();
        p.send_more(now_ms, now);
        // The oldest batch waiting for its first answer.
        let sending = p
            .window
            .iter()
            .position(|b| matches!(b.state, SentState::Sending(_)));
        let room = (p.resend.is_none() && p.sending() < BATCHES_IN_FLIGHT) || p.hinting;
        let take = sending.is_none() || room;
        let wake_at = p.wake_at(now);
        let gated = p.gated();
        let running = sending.and_then(|at| match &mut p.window[at].state {
            SentState::Sending(call) => Some(call),
            _ => None,
        });
        let writing = p.hint_io.as_mut().map(|w| &mut w.task);
        let gate = p.gate.as_mut().filter(|_| gated);
        // A call may wait long for its answer (the peer holds it while it sends a
        // moved session's publications on): the forwarder's end ends it too.
        let woke = tokio::select! {
            r = some_or_pending(running) => Woke::Answer(
                sending.unwrap_or_default(),
                r.unwrap_or_else(|e| Err(format!("the call's task failed: {e}"))),
            ),
            Some(d) = done_rx.recv() => Woke::Done(d),
            () = notified, if take => Woke::More,
            r = some_or_pending(writing) => {
                Woke::Hinted(r.unwrap_or_else(|e| Err(format!("the write's task failed: {e}"))))
            }
            () = sleep_until_some(wake_at) => Woke::More,
            open = gate_opened(gate) => Woke::Gate(open),
            () = events.closed() => {
                p.abort_all();
                return;
            }
        };
        match woke {
            Woke::Answer(at, result) => p.on_answer(at, result, &handle),
            Woke::Done(d) => p.on_done(d, &handle),
            Woke::Hinted(result) => p.on_hint_written(result),
            Woke::Gate(open) => {
                if open {
                    p.open_gate();
                }
            }
            Woke::More => {}
        }
    }
}

/// Awaits `f`, or forever without one.
async fn some_or_pending<F: std::future::Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Whether the gate opened (or its task ended); forever without a gate.
async fn gate_opened(gate: Option<&mut tokio::sync::watch::Receiver<bool>>) -> bool {
    match gate {
        Some(g) => g.changed().await.map_or(true, |()| *g.borrow()),
        None => std::future::pending().await,
    }
}

/// What woke a peer's sender.
enum Woke {
    /// The first answer to the batch at this place in the window.
    Answer(usize, Result<Answer, String>),
    /// An answer to a done request: (round, seq, answer).
    Done((u64, u64, Result<Answer, String>)),
    /// A hint write ended.
    Hinted(Result<(), String>),
    /// The gate of an earlier life's hints changed: whether it is open.
    Gate(bool),
    /// More to send, or room for it, or a pause ended.
    More,
}

/// One request on the forward channel to `node`, its answer decoded.
async fn forward_call(
    transport: &dyn Transport,
    node: NodeId,
    bytes: Bytes,
) -> Result<Answer, String> {
    transport
        .call(node, Channel::Forward, bytes)
        .await
        .map_err(|e| e.to_string())
        .and_then(|b| wire::decode_answer(b).map_err(|e| e.to_string()))
}

/// A hint write running: the batches it puts (seq, size), the bytes its deletes free.
struct HintWrite {
    puts: Vec<(u64, u64)>,
    freed: u64,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

/// Runs one hint store transaction as the store says ([`HintIo`]); skipped if the
/// forwarder ended meanwhile (the simulation's crash: nothing of it runs after).
fn spawn_hint_write(
    store: Arc<HintStore>,
    puts: Vec<(NodeId, u64, u64, Bytes)>,
    deletes: Vec<(NodeId, u64, u64)>,
    events: mpsc::UnboundedSender<Event>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    match store.io() {
        HintIo::Blocking => tokio::task::spawn_blocking(move || store.write(&puts, &deletes)),
        HintIo::Inline => tokio::spawn(async move {
            tokio::time::sleep(HINT_WRITE_SIM).await;
            if events.is_closed() {
                return Err("the forwarder ended".into());
            }
            store.write(&puts, &deletes)
        }),
    }
}

/// Adds to a peer's hinted gauges.
fn hinted_delta(metrics: &ForwardMetrics, node: NodeId, batches: i64, bytes: i64) {
    let mut peers = lock(&metrics.peers);
    let c = peers.entry(node).or_default();
    c.hinted_batches = c.hinted_batches.saturating_add_signed(batches);
    c.hinted_bytes = c.hinted_bytes.saturating_add_signed(bytes);
}

/// An answer to a done request: (round, seq, answer).
type DoneAnswer = (u64, u64, Result<Answer, String>);

/// One peer's sender (see [`send_to_peer`]).
struct PeerSender {
    node: NodeId,
    queue: Arc<PeerQueue>,
    drained: Arc<Notify>,
    transport: Arc<dyn Transport>,
    events: mpsc::UnboundedSender<Event>,
    incarnation: u64,
    metrics: Arc<ForwardMetrics>,
    /// Answers to done requests: (round, seq, answer). A round ends at each failure;
    /// what a request of an earlier round answers is ignored.
    done_tx: mpsc::UnboundedSender<(u64, u64, Result<Answer, String>)>,
    /// The last batch number taken.
    seq: u64,
    /// From the oldest batch not done (the front is never done) to the newest taken.
    window: VecDeque<Sent>,
    /// After a failure: the next batch to send again, until past the last one taken.
    resend: Option<u64>,
    /// Whether the peer accepted a batch since the last failure: the rest of a round
    /// of sending again then goes [`RESEND_IN_FLIGHT`] at a time.
    answered: bool,
    round: u64,
    pause: Duration,
    /// The hint store (`None`: hints off).
    hints: Option<Arc<HintStore>>,
    /// How long calls fail before the peer's batches are hinted (the session lease).
    lease: Duration,
    /// Since when calls to the peer fail (an answer ends it).
    failing_since: Option<tokio::time::Instant>,
    /// When the next batch may be sent again after a failure.
    retry_at: Option<tokio::time::Instant>,
    /// Whether the batches taken are hinted.
    hinting: bool,
    /// Hints stopped for this peer (a write failed, or the peer left the cluster).
    hints_off: bool,
    /// Batches of the window in the hint store (or being written) and not done, and
    /// their bytes.
    hinted: (u64, u64),
    /// The hint write running.
    hint_io: Option<HintWrite>,
    /// Batches to write next: (seq, size).
    hint_puts: Vec<(u64, u64)>,
    /// Batches to delete next: (seq, size).
    hint_dels: Vec<(u64, u64)>,
    /// Closed while an earlier life's hints for the peer are being sent
    /// ([`send_earlier_hints`]): nothing of this life goes before them.
    gate: Option<tokio::sync::watch::Receiver<bool>>,
    /// Whether this node is in touch with its cluster (a leader, and contact within
    /// the hint wait): only then does it hint (see [`PeerSender::check_hinting`]).
    in_contact: bool,
}

impl PeerSender {
    /// A sender for `node`'s queue, and where its done requests answer.
    #[allow(clippy::too_many_arguments)]
    fn new(
        node: NodeId,
        queue: Arc<PeerQueue>,
        drained: Arc<Notify>,
        transport: Arc<dyn Transport>,
        events: mpsc::UnboundedSender<Event>,
        (incarnation, metrics): (u64, Arc<ForwardMetrics>),
        (hints, lease): (Option<Arc<HintStore>>, Duration),
        gate: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> (PeerSender, mpsc::UnboundedReceiver<DoneAnswer>) {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let sender = PeerSender {
            node,
            queue,
            drained,
            transport,
            events,
            incarnation,
            metrics,
            done_tx,
            seq: 0,
            window: VecDeque::new(),
            resend: None,
            answered: false,
            round: 0,
            pause: RETRY_MIN,
            hints,
            lease,
            failing_since: None,
            retry_at: None,
            hinting: false,
            hints_off: false,
            hinted: (0, 0),
            hint_io: None,
            hint_puts: Vec::new(),
            hint_dels: Vec::new(),
            gate,
            in_contact: false,
        };
        (sender, done_rx)
    }

    fn call(&self, bytes: Bytes) -> tokio::task::JoinHandle<Result<Answer, String>> {
        let (transport, node) = (self.transport.clone(), self.node);
        tokio::spawn(async move { forward_call(&*transport, node, bytes).await })
    }

    /// Asks (after `after`) whether batch `seq` is done.
    fn ask_done(&self, seq: u64, after: Duration) -> tokio::task::AbortHandle {
        let (transport, node, done_tx) = (self.transport.clone(), self.node, self.done_tx.clone());
        let (round, incarnation) = (self.round, self.incarnation);
        tokio::spawn(async move {
            if !after.is_zero() {
                tokio::time::sleep(after).await;
            }
            let bytes = wire::encode_done(&ENVELOPE, incarnation, seq);
            let answer = forward_call(&*transport, node, bytes).await;
            let _ = done_tx.send((round, seq, answer));
        })
        .abort_handle()
    }

    fn sending(&self) -> usize {
        self.window
            .iter()
            .filter(|b| matches!(b.state, SentState::Sending(_)))
            .count()
    }

    /// The queue's next batch, numbered next in this sender's sequence (sent at once or
    /// hinted: both go into the window with that number).
    fn take_next(&mut self, frontier: u64, now_ms: u64) -> Option<Sent> {
        let batch = take_batch(
            &self.queue,
            &self.drained,
            self.incarnation,
            (self.seq + 1, frontier),
            now_ms,
        )?;
        self.seq += 1;
        Some(batch)
    }

    fn frontier(&self) -> u64 {
        self.window.front().map_or(self.seq + 1, |b| b.seq)
    }

    /// Whether an earlier life's hints for the peer still go first.
    fn gated(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| !*g.borrow())
    }

    /// An earlier life's hints were sent: this life's batches may go.
    fn open_gate(&mut self) {
        self.gate = None;
        if self.resend.is_none() && self.queue.failing.swap(false, Ordering::Relaxed) {
            self.drained.notify_one();
        }
    }

    /// When the sender must look again without another event: a pause after a
    /// failure ends, or the peer has failed for the lease (hints start), or, while
    /// this node is out of touch with its cluster and would hint, a while later.
    fn wake_at(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let mut at = self.retry_at;
        let mut also = |t: tokio::time::Instant| at = Some(at.map_or(t, |a| a.min(t)));
        let recheck = now + HINT_CONTACT_RECHECK;
        if self.hints.is_none() || self.hints_off {
            return at;
        }
        if self.hinting {
            // `hint_more` waits for contact.
            if !self.in_contact {
                also(recheck);
            }
        } else if let Some(t) = self.failing_since {
            let due = t + self.lease;
            if due > now {
                also(due);
            } else if !self.in_contact {
                also(recheck);
            }
        } else if self.gated() && !self.in_contact {
            also(recheck);
        }
        at
    }

    /// Starts hinting once the peer has failed for the lease (or while an earlier
    /// life's hints go first) if this node is in touch with its cluster: every batch
    /// not done is written to the store. Ends it once the peer answers and no hinted
    /// batch is left.
    ///
    /// Only in touch: a hinted batch is answered on this node's word alone, where an
    /// answer otherwise means a node in touch with the cluster took the batch (the
    /// peer). A node cut off matches publications against a table that may be stale
    /// (a session moved between two other nodes meanwhile: its copy goes to the old
    /// node, which may have lost the session's ghost that would send it on); without
    /// hints it cannot answer them before its lease fences its clients, and they send
    /// them again elsewhere. The simulation found it (seed 1 of the harness test, a
    /// 300 ms hint wait: the isolated leader answered four QoS 2 messages for a session
    /// that had moved, and they were lost).
    fn check_hinting(&mut self, now: tokio::time::Instant) {
        let Some(store) = self.hints.clone() else {
            return;
        };
        if self.hints_off {
            self.hinting = false;
            return;
        }
        if self.hinting {
            if self.hinted.0 == 0
                && self.failing_since.is_none()
                && !self.gated()
                && self.hint_puts.is_empty()
                && self.hint_io.is_none()
            {
                self.hinting = false;
                tracing::info!(
                    node = self.node,
                    "peer answers and its hinted batches are done: hints for it end"
                );
            }
            return;
        }
        let failed_long = self
            .failing_since
            .is_some_and(|t| now.duration_since(t) >= self.lease);
        if (!failed_long && !self.gated()) || !self.in_contact {
            return;
        }
        self.hinting = true;
        if failed_long {
            tracing::warn!(
                node = self.node,
                lease_ms = self.lease.as_millis() as u64,
                "peer unreachable for longer than the session lease: its batches go to the \
                 hint store and their publishers are answered"
            );
        }
        let (mut n, mut bytes) = (0u64, 0u64);
        for b in self.window.iter_mut() {
            if !b.complete && b.disk == Disk::No && b.bytes.is_some() {
                b.disk = Disk::Writing;
                store.add(b.size);
                self.hint_puts.push((b.seq, b.size));
                n += 1;
                bytes += b.size;
            }
        }
        self.hinted.0 += n;
        self.hinted.1 += bytes;
        hinted_delta(&self.metrics, self.node, n as i64, bytes as i64);
    }

    /// While hinting and no write runs, takes what is queued (as batches up to the
    /// budget) for the next write: what came during a write goes in one batch.
    fn hint_more(&mut self, now_ms: u64) {
        if !self.hinting || self.hint_io.is_some() || !self.in_contact {
            return;
        }
        let Some(store) = self.hints.clone() else {
            return;
        };
        let frontier = self.frontier();
        let (mut n, mut bytes) = (0u64, 0u64);
        while store.has_room() && self.window.len() < hints::HINTED_BATCHES_MAX {
            let Some(mut b) = self.take_next(frontier, now_ms) else {
                break;
            };
            b.disk = Disk::Writing;
            store.add(b.size);
            self.hint_puts.push((b.seq, b.size));
            n += 1;
            bytes += b.size;
            self.window.push_back(b);
        }
        self.hinted.0 += n;
        self.hinted.1 += bytes;
        hinted_delta(&self.metrics, self.node, n as i64, bytes as i64);
    }

    /// Starts the next hint write (one transaction) if none runs.
    fn flush_hints(&mut self) {
        if self.hint_io.is_some() || (self.hint_puts.is_empty() && self.hint_dels.is_empty()) {
            return;
        }
        let Some(store) = self.hints.clone() else {
            return;
        };
        let generation = store.generation();
        let frontier = self.frontier();
        let mut puts = Vec::new();
        let mut written = Vec::new();
        for (seq, size) in std::mem::take(&mut self.hint_puts) {
            let b = seq
                .checked_sub(frontier)
                .and_then(|at| self.window.get(at as usize));
            match b.and_then(|b| b.bytes.clone().filter(|_| !b.complete)) {
                Some(bytes) => {
                    puts.push((self.node, generation, seq, bytes));
                    written.push((seq, size));
                }
                // Done before its write: nothing to keep.
                None => store.release(size),
            }
        }
        let deletes = self
            .hint_dels
            .iter()
            .map(|&(seq, _)| (self.node, generation, seq))
            .collect();
        let freed = self.hint_dels.drain(..).map(|(_, size)| size).sum();
        let task = spawn_hint_write(store, puts, deletes, self.events.clone());
        self.hint_io = Some(HintWrite {
            puts: written,
            freed,
            task,
        });
    }

    /// A hint write ended: its batches' publications are answered (or, if it failed,
    /// hints stop for this peer and they wait for it as without hints).
    fn on_hint_written(&mut self, result: Result<(), String>) {
        let (Some(w), Some(store)) = (self.hint_io.take(), self.hints.clone()) else {
            return;
        };
        store.release(w.freed);
        let frontier = self.frontier();
        match result {
            Ok(()) => {
                let mut tokens = Vec::new();
                let mut n = 0u64;
                for (seq, size) in w.puts {
                    let b = seq
                        .checked_sub(frontier)
                        .and_then(|at| self.window.get_mut(at as usize));
                    match b {
                        Some(b) if !b.complete => {
                            b.disk = Disk::Written;
                            b.bytes = None;
                            tokens.append(&mut b.tokens);
                            n += 1;
                        }
                        // Done while it was written: deleted with the next write.
                        _ => self.hint_dels.push((seq, size)),
                    }
                }
                lock(&self.metrics.peers)
                    .entry(self.node)
                    .or_default()
                    .hints_written += n;
                if !tokens.is_empty() {
                    let _ = self.events.send(Event::PeerDone { tokens });
                }
            }
            Err(e) => {
                tracing::error!(
                    node = self.node,
                    path = %store.path().display(),
                    "cannot write the hint store: {e}; hints stop for this peer (its \
                     publishers wait for it, as without hints)"
                );
                self.metrics
                    .hint_write_errors
                    .fetch_add(1, Ordering::Relaxed);
                self.hints_off = true;
                let pending = std::mem::take(&mut self.hint_puts);
                let (mut n, mut bytes) = (0u64, 0u64);
                for (seq, size) in w.puts.into_iter().chain(pending) {
                    store.release(size);
                    let b = seq
                        .checked_sub(frontier)
                        .and_then(|at| self.window.get_mut(at as usize));
                    if let Some(b) = b
                        && b.disk == Disk::Writing
                    {
                        b.disk = Disk::No;
                        if !b.complete {
                            n += 1;
                            bytes += size;
                        }
                    }
                }
                self.hinted.0 -= n;
                self.hinted.1 -= bytes;
                hinted_delta(&self.metrics, self.node, -(n as i64), -(bytes as i64));
            }
        }
    }

    /// Batch `at` is complete at the peer: its publications are answered (unless its
    /// hint was), and its hint is deleted.
    fn finish(&mut self, at: usize) {
        let b = &mut self.window[at];
        b.state = SentState::Done;
        if b.complete {
            return;
        }
        b.complete = true;
        settle(self.node, b, &self.metrics, &self.events);
        let (seq, size, disk) = (b.seq, b.size, b.disk);
        if disk != Disk::No {
            self.hinted.0 -= 1;
            self.hinted.1 -= size;
            hinted_delta(&self.metrics, self.node, -1, -(size as i64));
        }
        if disk == Disk::Written {
            self.hint_dels.push((seq, size));
        }
    }

    /// The bytes that send batch `at` (again) with base `frontier`: its records, from
    /// memory or the hint store, or none if it is complete. `None` if its hint cannot
    /// be read (logged; tried again after a pause).
    fn batch_bytes(&self, at: usize, frontier: u64) -> Option<Bytes> {
        let b = self.window.get(at)?;
        if b.complete {
            return Some(
                BatchWriter::with_base(&ENVELOPE, self.incarnation, b.seq, frontier).finish(),
            );
        }
        let bytes = match (&b.bytes, &self.hints) {
            (Some(bytes), _) => bytes.clone(),
            (None, Some(store)) => match store.read(self.node, store.generation(), b.seq) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => {
                    tracing::error!(node = self.node, seq = b.seq, path = %store.path().display(), "a hinted batch is missing from the hint store");
                    return None;
                }
                Err(e) => {
                    tracing::error!(node = self.node, seq = b.seq, path = %store.path().display(), "a hinted batch cannot be read: {e}");
                    return None;
                }
            },
            (None, None) => return None,
        };
        Some(wire::rebase(&bytes, ENVELOPE.len(), frontier).unwrap_or(bytes))
    }

    /// Pops the done batches at the front; ends a round of sending again once it
    /// passed the last batch (the peer answers again: its queue stops the intake again).
    ///
    /// During such a round a done batch the round has not sent again yet stays: a peer
    /// that restarted and took the batches before it in this round knows this sender
    /// and takes only the next number, so it must get it (with no records). Before, the
    /// round skipped it once the batch before it was done, and the peer refused every
    /// later batch ("batch 7 after its batch 5") for good: the simulation with hints
    /// found it (sync seed 233: three acknowledged messages never arrived).
    fn tidy(&mut self) {
        while self.window.front().is_some_and(|b| {
            matches!(b.state, SentState::Done) && self.resend.is_none_or(|next| b.seq < next)
        }) {
            self.window.pop_front();
        }
        let frontier = self.frontier();
        if let Some(next) = self.resend.as_mut() {
            *next = (*next).max(frontier);
        }
        if self.resend.is_some_and(|next| next > self.seq) {
            self.resend = None;
            if !self.gated() && self.queue.failing.swap(false, Ordering::Relaxed) {
                self.drained.notify_one();
            }
            self.pause = RETRY_MIN;
        }
    }

    /// Batches sent and not done at the peer (waiting for their first answer or for a
    /// done request).
    fn at_peer(&self) -> usize {
        self.window
            .iter()
            .filter(|b| matches!(b.state, SentState::Sending(_) | SentState::Received(_)))
            .count()
    }

    /// Starts the calls there is room for: the batches taken while hinting that were
    /// not sent yet and new batches, or after a failure (once its pause is over) the
    /// next ones to send again: one until the peer accepted a batch in this round (it
    /// may still be away; and a peer that restarted takes only the batch whose base is
    /// its number), then up to [`RESEND_IN_FLIGHT`] (the peer takes each after the one
    /// before it, in the order they go on the link). Nothing while an earlier life's
    /// hints go first.
    fn send_more(&mut self, now_ms: u64, now: tokio::time::Instant) {
        if self.gated() {
            return;
        }
        if let Some(t) = self.retry_at {
            if now < t {
                return;
            }
            self.retry_at = None;
        }
        let frontier = self.frontier();
        match self.resend {
            None => {
                let mut sending = self.sending();
                let mut at_peer = self.at_peer();
                // Batches taken while hinting, in order, before any new one; a backlog
                // of them goes with more in flight while the peer answers.
                let in_flight = if self.failing_since.is_none() {
                    RESEND_IN_FLIGHT
                } else {
                    BATCHES_IN_FLIGHT
                };
                let mut idle = self
                    .window
                    .iter()
                    .position(|b| matches!(b.state, SentState::Idle));
                while sending < in_flight
                    && at_peer < BATCHES_NOT_DONE_MAX
                    && let Some(at) = idle
                {
                    let Some(bytes) = self.batch_bytes(at, frontier) else {
                        self.retry_at = Some(now + RETRY_MAX);
                        return;
                    };
                    let call = self.call(bytes);
                    self.window[at].state = SentState::Sending(call);
                    sending += 1;
                    at_peer += 1;
                    idle = self
                        .window
                        .get(at + 1)
                        .is_some_and(|b| matches!(b.state, SentState::Idle))
                        .then_some(at + 1);
                }
                if idle.is_some() {
                    return;
                }
                let mut not_done = self
                    .window
                    .iter()
                    .filter(|b| !matches!(b.state, SentState::Done))
                    .count();
                while sending < BATCHES_IN_FLIGHT && not_done < BATCHES_NOT_DONE_MAX {
                    let Some(mut batch) = self.take_next(frontier, now_ms) else {
                        break;
                    };
                    let bytes = batch.bytes.clone().unwrap_or_default();
                    batch.state = SentState::Sending(self.call(bytes));
                    self.window.push_back(batch);
                    sending += 1;
                    not_done += 1;
                }
            }
            Some(mut next) => {
                let in_flight = if self.answered { RESEND_IN_FLIGHT } else { 1 };
                let (mut sending, mut at_peer) = (self.sending(), self.at_peer());
                while sending < in_flight && at_peer < BATCHES_NOT_DONE_MAX {
                    let Some(at) = next.checked_sub(frontier).map(|at| at as usize) else {
                        break;
                    };
                    if at >= self.window.len() {
                        break;
                    }
                    let Some(bytes) = self.batch_bytes(at, frontier) else {
                        self.retry_at = Some(now + RETRY_MAX);
                        break;
                    };
                    let call = self.call(bytes);
                    let b = &mut self.window[at];
                    if let SentState::Received(done) = &b.state {
                        done.abort();
                    }
                    b.state = SentState::Sending(call);
                    sending += 1;
                    at_peer += 1;
                    next += 1;
                }
                self.resend = Some(next);
            }
        }
    }

    /// The first answer to the batch at `at`.
    fn on_answer(&mut self, at: usize, result: Result<Answer, String>, handle: &ClusterHandle) {
        let node = self.node;
        let seq = self.window[at].seq;
        let done_already = self.window[at].complete;
        match result {
            Ok(Answer::Accepted { seq: s }) if s == seq => {
                self.failing_since = None;
                self.finish(at);
            }
            // Sent again with no records: it was done already.
            Ok(Answer::Received { seq: s }) if s == seq && done_already => {
                self.failing_since = None;
                self.window[at].state = SentState::Done;
            }
            Ok(Answer::Received { seq: s }) if s == seq => {
                self.failing_since = None;
                let done = self.ask_done(seq, Duration::ZERO);
                let b = &mut self.window[at];
                count(node, b, &self.metrics);
                b.state = SentState::Received(done);
            }
            Ok(a) => {
                tracing::warn!(node, seq, "unexpected answer to a batch: {a:?}");
                return self.fail();
            }
            Err(e) => {
                if self.left(handle) {
                    return;
                }
                tracing::debug!(node, seq, "batch not accepted, retrying: {e}");
                return self.fail();
            }
        }
        if !self.answered && self.resend.is_some() && self.hinted.0 > 0 {
            tracing::info!(
                node,
                hinted = self.hinted.0,
                "peer answers again: its hinted batches go to it"
            );
        }
        self.answered = true;
    }

    /// An answer to a done request.
    fn on_done(
        &mut self,
        (round, seq, answer): (u64, u64, Result<Answer, String>),
        handle: &ClusterHandle,
    ) {
        if round != self.round {
            return;
        }
        let node = self.node;
        let Some(at) = self.window.iter().position(|b| b.seq == seq) else {
            return;
        };
        if !matches!(self.window[at].state, SentState::Received(_)) {
            return;
        }
        match answer {
            Ok(Answer::Accepted { seq: s }) if s == seq => self.finish(at),
            Ok(a) => {
                tracing::debug!(node, seq, "batch not known to the peer any more: {a:?}");
                self.fail();
            }
            // A timeout (the batch waits longer than a call may) or the link is down: ask
            // again, a little later. A peer that restarted answers unknown.
            Err(e) => {
                if self.left(handle) {
                    return;
                }
                tracing::debug!(node, seq, "done request failed, asking again: {e}");
                // A peer that took the batch and died fails here only: its lease runs
                // too (hints start with it).
                self.failing_since
                    .get_or_insert_with(tokio::time::Instant::now);
                let again = self.ask_done(seq, RETRY_MIN);
                self.window[at].state = SentState::Received(again);
            }
        }
    }

    /// Whether the peer left the cluster: then everything queued for it is given up
    /// (its hints deleted), and a later batch starts a new sequence.
    fn left(&mut self, handle: &ClusterHandle) -> bool {
        if handle.members().contains_key(&self.node) {
            return false;
        }
        tracing::info!(
            node = self.node,
            "peer left the cluster; dropping its queue"
        );
        for mut b in self.window.drain(..) {
            b.abort();
            if !b.complete {
                settle(self.node, &mut b, &self.metrics, &self.events);
            }
            // Being written: deleted when its write ends (it is not in the window).
            if b.disk == Disk::Written {
                self.hint_dels.push((b.seq, b.size));
            }
        }
        let (n, bytes) = std::mem::take(&mut self.hinted);
        hinted_delta(&self.metrics, self.node, -(n as i64), -(bytes as i64));
        // A new sequence would reuse the numbers this generation's hints are stored
        // under.
        self.hints_off = true;
        self.hinting = false;
        self.incarnation = self.incarnation.wrapping_add(1);
        self.seq = 0;
        self.resend = None;
        self.answered = false;
        self.round += 1;
        true
    }

    /// A failure: every call stops, and every batch from the oldest not done on is sent
    /// again, after a pause (the first alone). The pause grows with each failure of a
    /// peer that accepted nothing since the last one.
    fn fail(&mut self) {
        self.abort_all();
        self.round += 1;
        if std::mem::take(&mut self.answered) {
            self.pause = RETRY_MIN;
        }
        self.resend = self.window.front().map(|b| b.seq);
        // While it fails, its queue does not stop the intake.
        if !self.queue.failing.swap(true, Ordering::Relaxed) {
            self.drained.notify_one();
        }
        lock(&self.metrics.peers)
            .entry(self.node)
            .or_default()
            .retries += 1;
        let now = tokio::time::Instant::now();
        self.failing_since.get_or_insert(now);
        self.retry_at = Some(now + self.pause);
        self.pause = (self.pause * 2).min(RETRY_MAX);
    }

    fn abort_all(&mut self) {
        for b in self.window.iter_mut() {
            b.abort();
        }
    }
}

/// Sends the batches earlier lives of this node hinted for `node` ([`hints`]): each
/// generation in order, under its own incarnation and numbers (so the peer's marks
/// drop what it had already committed), one batch at a time, each deleted once it is
/// complete at the peer (a gap, a batch done before, goes with no records); then opens
/// `open`, and this life's sender may send. A peer that left the cluster gets nothing:
/// its hints are deleted.
#[allow(clippy::too_many_arguments)]
async fn send_earlier_hints(
    node: NodeId,
    store: Arc<HintStore>,
    stored: hints::Stored,
    transport: Arc<dyn Transport>,
    handle: ClusterHandle,
    open: tokio::sync::watch::Sender<bool>,
    events: mpsc::UnboundedSender<Event>,
    metrics: Arc<ForwardMetrics>,
) {
    let total: u64 = stored.values().sum();
    hinted_delta(&metrics, node, stored.len() as i64, total as i64);
    let mut gens: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
    for ((generation, seq), size) in stored {
        gens.entry(generation).or_default().insert(seq, size);
    }
    tracing::info!(
        node,
        batches = gens.values().map(BTreeMap::len).sum::<usize>(),
        bytes = total,
        "sending the hints an earlier life of this node kept for this peer"
    );
    let mut pause = RETRY_MIN;
    'gens: while let Some((generation, mut seqs)) = gens.pop_first() {
        let Some(first) = seqs.keys().next().copied() else {
            continue;
        };
        let last = seqs.keys().next_back().copied().unwrap_or(first);
        let mut incarnation = None;
        let mut seq = first;
        while seq <= last {
            let stored_size = seqs.get(&seq).copied();
            let bytes = match stored_size {
                Some(_) => match store.read(node, generation, seq) {
                    Ok(Some(b)) => {
                        incarnation = hints::batch_header(&b, ENVELOPE.len()).map(|h| h.0);
                        wire::rebase(&b, ENVELOPE.len(), seq).unwrap_or(b)
                    }
                    r => {
                        tracing::error!(
                            node,
                            generation,
                            seq,
                            path = %store.path().display(),
                            "a hinted batch cannot be read ({r:?}): its messages are not sent"
                        );
                        seqs.remove(&seq);
                        seq += 1;
                        continue;
                    }
                },
                None => match incarnation {
                    Some(inc) => BatchWriter::with_base(&ENVELOPE, inc, seq, seq).finish(),
                    None => {
                        seq += 1;
                        continue;
                    }
                },
            };
            let Some(inc) = incarnation else {
                seq += 1;
                continue;
            };
            let call = deliver_earlier(&*transport, node, bytes, inc, seq);
            let complete = tokio::select! {
                c = call => c,
                () = events.closed() => return,
            };
            if !complete {
                if !handle.members().contains_key(&node) {
                    // Gone: this generation's rest and every later one are deleted.
                    let mut rest: Vec<(u64, u64, u64)> = seqs
                        .range(seq..)
                        .map(|(&s, &size)| (generation, s, size))
                        .collect();
                    for (g, s) in std::mem::take(&mut gens) {
                        rest.extend(s.into_iter().map(|(s, size)| (g, s, size)));
                    }
                    forget_earlier(&store, node, &rest, &metrics, &events).await;
                    tracing::info!(node, "peer left the cluster; its hints are deleted");
                    break 'gens;
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = events.closed() => return,
                }
                pause = (pause * 2).min(RETRY_MAX);
                continue;
            }
            pause = RETRY_MIN;
            if let Some(size) = stored_size {
                forget_earlier(&store, node, &[(generation, seq, size)], &metrics, &events).await;
                seqs.remove(&seq);
            }
            seq += 1;
        }
    }
    let _ = open.send(true);
}

/// Sends one batch of an earlier life and, if the peer answers received, asks until it
/// is complete: whether it is (`false`: send it again after a pause; a peer that
/// restarted answers the done request unknown).
async fn deliver_earlier(
    transport: &dyn Transport,
    node: NodeId,
    bytes: Bytes,
    incarnation: u64,
    seq: u64,
) -> bool {
    match forward_call(transport, node, bytes).await {
        Ok(Answer::Accepted { seq: s }) if s == seq => true,
        Ok(Answer::Received { seq: s }) if s == seq => loop {
            let done = wire::encode_done(&ENVELOPE, incarnation, seq);
            match forward_call(transport, node, done).await {
                Ok(Answer::Accepted { seq: s }) if s == seq => break true,
                Ok(_) => break false,
                Err(e) => {
                    tracing::debug!(node, seq, "done request of an earlier hint failed: {e}");
                    tokio::time::sleep(RETRY_MIN).await;
                }
            }
        },
        Ok(a) => {
            tracing::warn!(node, seq, "unexpected answer to an earlier hint: {a:?}");
            false
        }
        Err(e) => {
            tracing::debug!(node, seq, "earlier hint not accepted, retrying: {e}");
            false
        }
    }
}

/// Deletes earlier hints (generation, seq, size) of `node` (committed before the next
/// is sent, so a later life never sends a batch the peer took under a newer number).
async fn forget_earlier(
    store: &Arc<HintStore>,
    node: NodeId,
    batches: &[(u64, u64, u64)],
    metrics: &ForwardMetrics,
    events: &mpsc::UnboundedSender<Event>,
) {
    let deletes: Vec<(NodeId, u64, u64)> = batches.iter().map(|&(g, s, _)| (node, g, s)).collect();
    let bytes: u64 = batches.iter().map(|b| b.2).sum();
    match spawn_hint_write(store.clone(), Vec::new(), deletes, events.clone()).await {
        Ok(Ok(())) => {}
        r => tracing::error!(
            node,
            path = %store.path().display(),
            "cannot delete hints sent: {r:?} (a later start sends them again)"
        ),
    }
    store.release(bytes);
    hinted_delta(metrics, node, -(batches.len() as i64), -(bytes as i64));
}

/// A batch the peer accepted (received or complete) for the first time: counted.
fn count(node: NodeId, b: &mut Sent, metrics: &ForwardMetrics) {
    if b.counted {
        return;
    }
    b.counted = true;
    let mut peers = lock(&metrics.peers);
    let c = peers.entry(node).or_default();
    c.messages += b.count;
    c.batches += 1;
    c.bytes += b.size;
}

/// A batch is done (or given up with its peer): counted, its bytes dropped, and its
/// QoS 1/2 publications answered (unless its hint answered them).
fn settle(
    node: NodeId,
    b: &mut Sent,
    metrics: &ForwardMetrics,
    events: &mpsc::UnboundedSender<Event>,
) {
    count(node, b, metrics);
    b.bytes = None;
    if !b.tokens.is_empty() {
        let _ = events.send(Event::PeerDone {
            tokens: std::mem::take(&mut b.tokens),
        });
    }
}

/// What a request from another node asks of the shard serving it.
#[derive(Debug)]
pub enum Incoming {
    /// Hand these to the engine (as from the remote id), then answer `answer`.
    Deliver {
        /// The publications, ready for the engine: `Forwarded`, or `SharedPublish`
        /// for one member of a shared subscription (never passed back to the remote
        /// id: it is in `tried`).
        messages: Vec<MeshMsg>,
        /// The answer once they were handed to the engine (under `sync`
        /// durability: once what they stored is committed).
        answer: Bytes,
        /// The sender's incarnation.
        incarnation: u64,
        /// The batch's sequence number.
        seq: u64,
    },
    /// A batch already accepted (a retry after a lost answer): answer `answer`
    /// (accepted) if it is complete, else received.
    Duplicate {
        /// The answer.
        answer: Bytes,
        /// The sender's incarnation.
        incarnation: u64,
        /// The batch's sequence number.
        seq: u64,
    },
    /// The sender asks whether batch `seq`, answered received, is complete: answer
    /// `answer` (accepted) once it is. `known`: this shard accepted that batch (in this
    /// life); if it no longer waits for it, it is complete. Not known: answer
    /// [`Answer::Unknown`] (this node restarted since, the sender sends it again).
    Done {
        /// The sender's incarnation.
        incarnation: u64,
        /// The batch's sequence number.
        seq: u64,
        /// Whether this shard accepted the batch.
        known: bool,
        /// The answer once it is complete.
        answer: Bytes,
    },
    /// Answer `answer` once routes up to `index` are in force here ([`BarrierAsk`]).
    Barrier {
        /// The log index.
        index: u64,
        /// The answer.
        answer: Bytes,
    },
    /// The sending node's table of its shared members: give it to the forwarder
    /// ([`FromShard::peer_shares`]) and answer `answer`.
    Shares {
        /// The table.
        counts: Vec<wire::ShareCount>,
        /// The answer.
        answer: Bytes,
    },
}

/// The batches a shard accepted, per sending node: (incarnation, last sequence number).
/// Every request of one node is served by the same shard (`cluster::peer`), in order.
#[derive(Debug, Default)]
pub struct Accepted {
    last: HashMap<NodeId, (u64, u64)>,
}

/// Decodes a `Publish` request from node `from` (untrusted) and says what to do with it.
/// `own_routes_from`: [`ShardEnd::own_routes_from`] now; a plain record matched on
/// `from` below it is marked `earlier_life` (the engine gives it only to subscriptions
/// older than this node's present life).
#[allow(clippy::too_many_arguments)]
pub fn serve_request(
    accepted: &mut Accepted,
    remote: ShardId,
    from: NodeId,
    body: Bytes,
    topic_levels_max: usize,
    clocks: Clocks,
    metrics: &ForwardMetrics,
    own_routes_from: u64,
) -> Result<Incoming, WireError> {
    match wire::decode_request(body, topic_levels_max)? {
        Request::Shares { counts } => Ok(Incoming::Shares {
            counts,
            answer: wire::encode_answer(Answer::Noted),
        }),
        Request::Barrier { index } => Ok(Incoming::Barrier {
            index,
            answer: wire::encode_answer(Answer::Applied { index }),
        }),
        Request::Done { incarnation, seq } => Ok(Incoming::Done {
            incarnation,
            seq,
            known: accepted
                .last
                .get(&from)
                .is_some_and(|&(inc, last)| inc == incarnation && seq <= last),
            answer: wire::encode_answer(Answer::Accepted { seq }),
        }),
        Request::Batch {
            incarnation,
            seq,
            base,
            records,
        } => {
            let answer = wire::encode_answer(Answer::Accepted { seq });
            // Batches of one sender are accepted in order, each once (`wire`, the
            // sender keeps several in flight): a retry of one accepted is answered
            // again, one after a batch that was not accepted is refused.
            match accepted.last.get(&from) {
                Some(&(inc, last)) if inc == incarnation => {
                    if seq <= last {
                        metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                        return Ok(Incoming::Duplicate {
                            answer,
                            incarnation,
                            seq,
                        });
                    }
                    if seq != last + 1 {
                        return Err(wire::out_of_order(format!(
                            "batch {seq} of node {from} after its batch {last}"
                        )));
                    }
                }
                _ if base != seq => {
                    return Err(wire::out_of_order(format!(
                        "batch {seq} of node {from} before its batch {base}"
                    )));
                }
                _ => {}
            }
            accepted.last.insert(from, (incarnation, seq));
            metrics
                .received
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            let (now_ms, now_us) = ((clocks.now_ms)(), (clocks.now_us)());
            let messages = records
                .into_iter()
                .enumerate()
                .map(|(index, r)| {
                    let mut m = r.message;
                    m.origin = Some(SessionUid::remote(r.publisher));
                    m.expires_at_ms = r.expiry_ms.map(|e| now_ms + e);
                    m.received_us = now_us;
                    match (r.share, r.session) {
                        (None, Some((client_id, epoch))) => MeshMsg::Redirect {
                            client_id,
                            node: 0,
                            epoch,
                            message: m,
                            id: r.id,
                            ack: None,
                        },
                        (None, None) => MeshMsg::Forwarded {
                            message: m,
                            mark: Some(ForwardMark {
                                node: from,
                                incarnation,
                                seq,
                                index: index as u32,
                            }),
                            ack: None,
                            id: r.id,
                            earlier_life: r.routes.is_some_and(|i| i < own_routes_from),
                            routes_index: r.routes.unwrap_or(0),
                        },
                        (Some(share), _) => {
                            let mut tried = ShardSet::new();
                            tried.insert(remote);
                            MeshMsg::SharedPublish {
                                group: share.group,
                                filter: share.filter,
                                message: m,
                                key: r.publisher,
                                tried,
                                hops: 0,
                                handed_back: share.handed_back,
                                ack: None,
                            }
                        }
                    }
                })
                .collect();
            Ok(Incoming::Deliver {
                messages,
                answer,
                incarnation,
                seq,
            })
        }
    }
}

/// The key of one of this node's routes: the filter, or for a shared subscription NUL,
/// the group, NUL, the filter (a filter never contains NUL).
/// The node at `cursor` of a turn over `nodes` in which each takes as many slots as
/// its weight; nodes of weight 0 (members all offline) only when every one has 0.
fn pick_weighted(
    nodes: impl Iterator<Item = NodeId> + Clone,
    cursor: u64,
    weight: impl Fn(&NodeId) -> u64,
) -> Option<NodeId> {
    let total: u64 = nodes.clone().map(|n| weight(&n)).sum();
    if total == 0 {
        let n = nodes.clone().count().max(1) as u64;
        return nodes.clone().nth((cursor % n) as usize);
    }
    let mut slot = cursor % total;
    for n in nodes {
        let w = weight(&n);
        if slot < w {
            return Some(n);
        }
        slot -= w;
    }
    None
}

/// Waits until `at`, forever for `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn route_key(group: Option<&str>, filter: &str) -> String {
    match group {
        None => filter.to_owned(),
        Some(g) => format!("\0{g}\0{filter}"),
    }
}

/// The group and the filter of a [`route_key`].
fn split_key(key: &str) -> (Option<&str>, &str) {
    match key.strip_prefix('\0').and_then(|k| k.split_once('\0')) {
        Some((g, f)) => (Some(g), f),
        None => (None, key),
    }
}

#[cfg(test)]
mod tests {
    //! Goal: a receiver accepts one sender's batches in order and each once, though the
    //! sender keeps several in flight: a retry of an accepted batch is answered again
    //! (not delivered), a batch after one it did not accept is refused (so it is sent
    //! again after it, never delivered first), and a receiver that knows nothing of the
    //! sender (it restarted) accepts only the sender's oldest unanswered batch.

    use super::*;

    fn clocks() -> Clocks {
        fn zero() -> u64 {
            0
        }
        Clocks {
            now_ms: zero,
            now_us: zero,
        }
    }

    fn batch(incarnation: u64, seq: u64, base: u64) -> Bytes {
        let mut w = BatchWriter::with_base(&[], incarnation, seq, base);
        let m = Message {
            topic: Str::from_static("t"),
            payload: Bytes::from(seq.to_string()),
            qos: tessera_proto::QoS::AtMostOnce,
            retain: false,
            properties: None,
            expires_at_ms: None,
            origin: None,
            received_us: 0,
        };
        assert!(w.push(0, 1, &m, None));
        w.finish()
    }

    /// What the receiver does with `body` from node 5: "deliver", "duplicate",
    /// "known" or "unknown" (a done request), or "refused".
    fn serve(accepted: &mut Accepted, body: Bytes) -> &'static str {
        let metrics = ForwardMetrics::default();
        match serve_request(accepted, 2, 5, body, 16, clocks(), &metrics, u64::MAX) {
            Ok(Incoming::Deliver { .. }) => "deliver",
            Ok(Incoming::Duplicate { .. }) => "duplicate",
            Ok(Incoming::Barrier { .. }) => "barrier",
            Ok(Incoming::Shares { .. }) => "shares",
            Ok(Incoming::Done { known: true, .. }) => "known",
            Ok(Incoming::Done { known: false, .. }) => "unknown",
            Err(_) => "refused",
        }
    }

    /// Seed 632: a node matched publications against a restarted node's routes of
    /// its earlier life (still in the log) and queued them while it was down; the
    /// restarted node must not hand them to a session subscribed since.
    #[test]
    fn a_copy_matched_before_the_receivers_first_route_add_is_for_its_earlier_life() {
        let m = Message {
            topic: Str::from_static("t/1"),
            payload: Bytes::from_static(b"x"),
            qos: tessera_proto::QoS::ExactlyOnce,
            retain: false,
            properties: None,
            expires_at_ms: None,
            origin: None,
            received_us: 0,
        };
        let share = wire::ShareFor {
            group: Str::from_static("g"),
            filter: Str::from_static("t/+"),
            handed_back: false,
        };
        let c = Str::from_static("c");
        let mut w = BatchWriter::new(&[], 1, 1);
        let plain = |routes| wire::Tags {
            routes,
            ..wire::Tags::default()
        };
        for tags in [
            plain(Some(9)),
            plain(Some(10)),
            plain(Some(11)),
            plain(None),
            wire::Tags {
                share: Some(&share),
                routes: Some(1),
                ..wire::Tags::default()
            },
            wire::Tags {
                session: Some((&c, 3)),
                routes: Some(1),
                ..wire::Tags::default()
            },
        ] {
            assert!(w.push_tagged(0, 1, &m, tags));
        }
        let body = w.finish();
        // What each record becomes when this node's first route add of its life was
        // applied at `from` (u64::MAX: none yet).
        let served = |from| {
            let metrics = ForwardMetrics::default();
            let mut a = Accepted::default();
            let Ok(Incoming::Deliver { messages, .. }) =
                serve_request(&mut a, 2, 5, body.clone(), 16, clocks(), &metrics, from)
            else {
                panic!("not delivered")
            };
            messages
                .iter()
                .map(|m| match m {
                    MeshMsg::Forwarded { earlier_life, .. } => Some(*earlier_life),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let (t, f) = (Some(true), Some(false));
        assert_eq!(served(10), vec![t, f, f, f, None, None]);
        assert_eq!(served(u64::MAX), vec![t, t, t, f, None, None]);
        assert_eq!(served(0), vec![f, f, f, f, None, None]);
    }

    #[test]
    fn a_done_request_is_known_only_for_a_batch_accepted_in_this_life() {
        let mut a = Accepted::default();
        let done = |inc, seq| wire::encode_done(&[], inc, seq);
        // A receiver that restarted knows nothing: the sender sends again.
        assert_eq!(serve(&mut a, done(1, 3)), "unknown");
        assert_eq!(serve(&mut a, batch(1, 3, 3)), "deliver");
        assert_eq!(serve(&mut a, done(1, 3)), "known");
        // Not yet accepted, or of another incarnation of the sender.
        assert_eq!(serve(&mut a, done(1, 4)), "unknown");
        assert_eq!(serve(&mut a, done(2, 3)), "unknown");
        // A batch sent again with no records (it was done) keeps the numbering.
        assert_eq!(
            serve(&mut a, BatchWriter::with_base(&[], 1, 4, 4).finish()),
            "deliver"
        );
        assert_eq!(serve(&mut a, batch(1, 5, 4)), "deliver");
    }

    /// A turn over nodes gives each as many slots as its weight, in one cycle of the
    /// total; nodes of weight 0 only when all are.
    #[test]
    fn a_turn_over_nodes_follows_their_weights() {
        let nodes = [1, 2, 3];
        let weight = |n: &NodeId| [0, 1, 3, 0][*n as usize];
        let turn: Vec<_> = (0..8)
            .map(|c| pick_weighted(nodes.iter().copied(), c, weight))
            .collect();
        let s = |n| Some(n);
        assert_eq!(turn, [s(1), s(2), s(2), s(2), s(1), s(2), s(2), s(2)]);
        let none = |_: &NodeId| 0;
        let turn: Vec<_> = (0..4)
            .map(|c| pick_weighted(nodes.iter().copied(), c, none))
            .collect();
        assert_eq!(turn, [s(1), s(2), s(3), s(1)]);
        assert_eq!(pick_weighted(std::iter::empty(), 5, none), None);
    }

    #[test]
    fn batches_in_flight_are_accepted_in_order_and_once() {
        let mut a = Accepted::default();
        // A receiver that knows nothing of the sender: only its oldest unanswered batch.
        assert_eq!(serve(&mut a, batch(1, 8, 7)), "refused", "8 before 7");
        assert_eq!(serve(&mut a, batch(1, 7, 7)), "deliver");
        assert_eq!(serve(&mut a, batch(1, 8, 7)), "deliver");
        // 9 was lost: 10 (sent with 9 in flight) is refused, then both come again.
        assert_eq!(serve(&mut a, batch(1, 10, 9)), "refused", "10 before 9");
        assert_eq!(serve(&mut a, batch(1, 9, 9)), "deliver");
        assert_eq!(serve(&mut a, batch(1, 10, 10)), "deliver");
        // A retry of an accepted batch (its answer was lost) is answered, not delivered.
        assert_eq!(serve(&mut a, batch(1, 9, 9)), "duplicate");
        assert_eq!(serve(&mut a, batch(1, 10, 9)), "duplicate");
        // The sender restarted (or gave batches up): a new incarnation starts again.
        assert_eq!(serve(&mut a, batch(2, 1, 1)), "deliver");
        assert_eq!(serve(&mut a, batch(2, 3, 2)), "refused", "3 after 1");
        // A batch of one in flight (tag 1) reads as its own base.
        assert_eq!(
            serve(&mut a, BatchWriter::new(&[], 3, 4).finish()),
            "deliver"
        );
    }
}

#[cfg(test)]
mod reconcile_tests {
    //! Goal: after a restart the forwarder reconciles this node's routes in the log with
    //! what its restored sessions subscribe to: routes nobody here needs are removed, the
    //! ones a restored session needs stay and are counted (so the last unsubscribe
    //! removes them), and a SUBSCRIBE that comes meanwhile is neither lost nor refused,
    //! nor does its route get removed.
    //!
    //! Method: a one-node control plane (in memory) with this node's routes of an
    //! "earlier life" committed, then a forwarder for two shards fed the shards' boot
    //! reports and route changes as the shards would send them; the committed table is
    //! read until it is as expected (bounded).

    use std::collections::BTreeSet;

    use tessera_raft::memnet::MemNet;
    use tessera_raft::{ClusterConfig, ControlPlane, NodeInfo, op::Op};

    use super::*;

    pub(super) async fn one_node(dir: &std::path::Path) -> ControlPlane {
        let info = NodeInfo::with_cluster_addr("127.0.0.1:1".to_string());
        let mut c = ClusterConfig::new(1, dir.to_path_buf(), info.clone());
        c.initial_voters = [(1, info)].into_iter().collect();
        c.election_timeout_min_ms = 50;
        c.election_timeout_max_ms = 100;
        c.heartbeat_interval_ms = 20;
        c.fsync = false;
        let net = MemNet::new(1);
        let (cp, service) = ControlPlane::start(c, net.transport(1)).await.unwrap();
        net.register(1, service);
        cp
    }

    async fn commit(cp: &ControlPlane, op: Op) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(p) = cp.handle().propose(op.clone())
                && p.wait().await.is_ok()
            {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "no commit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn own_routes(cp: &ControlPlane) -> BTreeSet<String> {
        cp.handle()
            .tables()
            .and_then(|t| t.routes())
            .unwrap()
            .into_iter()
            .filter(|r| r.node == 1)
            .map(|r| route_key(r.group.as_deref(), &r.filter))
            .collect()
    }

    fn add(shard: ShardId, filter: &'static str, ack: u64) -> FromShard {
        FromShard {
            shard,
            msgs: vec![MeshMsg::RouteAdd {
                filter: Str::from_static(filter),
                shard: 2,
                ack: Some(ack),
            }],
            restored: None,
            peer_shares: None,
        }
    }

    fn remove(shard: ShardId, filter: &'static str) -> FromShard {
        FromShard {
            shard,
            msgs: vec![MeshMsg::RouteRemove {
                filter: Str::from_static(filter),
                shard: 2,
            }],
            restored: None,
            peer_shares: None,
        }
    }

    /// Waits until shard `rx` got `Ack{token}` (bounded); panics on `RouteFailed`.
    async fn acked(rx: &flume::Receiver<Vec<MeshMsg>>, token: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let batch = tokio::time::timeout_at(deadline, rx.recv_async())
                .await
                .expect("no Ack in time")
                .unwrap();
            for m in batch {
                match m {
                    MeshMsg::Ack { token: t } if t == token => return,
                    MeshMsg::RouteFailed { .. } => panic!("SUBSCRIBE refused: {m:?}"),
                    _ => {}
                }
            }
        }
    }

    async fn until_routes(cp: &ControlPlane, want: &[&str]) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while own_routes(cp) != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "own routes {:?}, want {want:?}",
                own_routes(cp)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn zero() -> u64 {
        0
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_restarted_nodes_routes_follow_its_restored_subscriptions() {
        let dir = tempfile::tempdir().unwrap();
        let cp = one_node(dir.path()).await;
        // The earlier life's routes: kept/1 (a restored session still has it), the
        // shared group g on s (a restored member), and five no session here needs any
        // more, one of which a SUBSCRIBE asks for again before and one after the
        // reconciliation.
        let delta = |filter: &str, group: Option<&str>| Op::RouteDelta {
            node: 1,
            filter: filter.to_string(),
            group: group.map(str::to_string),
            add: true,
        };
        for f in ["kept/1", "gone/1", "gone/2", "again/before", "again/after"] {
            commit(&cp, delta(f, None)).await;
        }
        commit(&cp, delta("s", Some("g"))).await;
        commit(&cp, delta("t", Some("gone"))).await;

        let (mut ends, shard_ends) = channels(2, 1024);
        ends.set_unanswered_wait(Duration::from_millis(100));
        let net = MemNet::new(2);
        start(
            ends,
            cp.handle(),
            net.transport(1),
            2,
            Clocks {
                now_ms: zero,
                now_us: zero,
            },
        );
        let to_forwarder = shard_ends[0].to_forwarder.clone();
        let send = |b: FromShard| to_forwarder.try_send(b).unwrap();

        // Shard 1 reports first, then a SUBSCRIBE on it for a route no restored
        // session needs; shard 0's report comes after it: the reconciliation must
        // not remove that route.
        send(FromShard::restored(1, &[Str::from_static("$share/g/s")]));
        send(add(1, "again/before", 1));
        send(FromShard::restored(0, &[Str::from_static("kept/1")]));
        // A SUBSCRIBE right after the reconciliation, for a route it removes: it waits
        // for the removal, then the route is added again.
        send(add(0, "again/after", 2));
        acked(&shard_ends[1].from_forwarder, 1).await;
        acked(&shard_ends[0].from_forwarder, 2).await;
        until_routes(&cp, &["kept/1", "\0g\0s", "again/before", "again/after"]).await;

        // The restored subscriber of kept/1 unsubscribes: the route goes (before the
        // reconciliation counted it, the forwarder did not know the filter and the
        // route stayed in the log for ever).
        send(remove(0, "kept/1"));
        until_routes(&cp, &["\0g\0s", "again/before", "again/after"]).await;
        cp.shutdown().await;
    }
}

#[cfg(test)]
mod resend_tests {
    //! Goal: a backlog of hinted batches (many small ones: one per hint write) goes to a
    //! peer that answers again with several batches in flight, not one per round trip
    //! (the pause scenario: node 2 took 11.8 s to resend ~8 s of hints, longer than a
    //! moved session's hold), and still in order, each batch once and under its
    //! number, with no more than [`BATCHES_NOT_DONE_MAX`] not done at the peer.
    //!
    //! Method: node 1's control plane alone (in memory, paused clock), the peer (node 2)
    //! a learner so that it is a member; a [`PeerSender`] for it over a fake link that
    //! fails every call while the peer is away, then serves each call on arrival as a
    //! receiver does ([`serve_request`]: in order, once, refusing a batch whose
    //! predecessor it did not take) and answers it one round trip later. Calls arrive in
    //! the order they were made, as on the link's ordered forward stream. The round
    //! trips the backlog took are the distinct instants at which batches arrived.

    use std::collections::BTreeSet;

    use tessera_raft::{NodeInfo, TransportError, transport::BoxFuture};

    use super::*;

    const RTT: Duration = Duration::from_millis(40);

    fn clocks() -> Clocks {
        fn zero() -> u64 {
            0
        }
        Clocks {
            now_ms: zero,
            now_us: zero,
        }
    }

    /// The fake peer and what it saw.
    #[derive(Default)]
    struct Peer {
        up: std::sync::atomic::AtomicBool,
        /// Answer a delivered batch received, complete this many round trips later
        /// (`None`: accepted at once).
        done_after: Option<u32>,
        seen: Mutex<Seen>,
    }

    #[derive(Default)]
    struct Seen {
        accepted: Accepted,
        /// Batches delivered: (seq, payloads).
        delivered: Vec<(u64, Vec<Bytes>)>,
        /// When batch requests arrived (the peer being up).
        arrivals: BTreeSet<tokio::time::Instant>,
        /// Batches refused (out of order).
        refused: usize,
        /// Delivered batches not complete yet: seq -> when complete.
        waiting: BTreeMap<u64, tokio::time::Instant>,
        /// Most batches delivered and not yet answered complete at once.
        not_done_max: usize,
        /// Batch calls being answered, and the most at once.
        in_flight: usize,
        in_flight_max: usize,
    }

    impl Transport for Peer {
        fn call(
            &self,
            to: NodeId,
            _channel: Channel,
            request: Bytes,
        ) -> BoxFuture<'_, Result<Bytes, TransportError>> {
            Box::pin(async move {
                if !self.up.load(Ordering::SeqCst) {
                    return Err(TransportError::Unreachable {
                        node: to,
                        reason: "away".into(),
                    });
                }
                let (is_batch, answer, wait_until) = self.serve(request);
                tokio::time::sleep_until(wait_until).await;
                let mut s = lock(&self.seen);
                if is_batch {
                    s.in_flight -= 1;
                }
                if let Ok(Answer::Accepted { seq }) = &answer {
                    s.waiting.remove(seq);
                }
                drop(s);
                answer
                    .map(wire::encode_answer)
                    .map_err(|reason| TransportError::Remote { node: to, reason })
            })
        }
    }

    impl Peer {
        /// Serves `request` on arrival: whether it is a batch, the answer, and when
        /// it goes.
        fn serve(&self, request: Bytes) -> (bool, Result<Answer, String>, tokio::time::Instant) {
            let now = tokio::time::Instant::now();
            let body = request.slice(ENVELOPE.len()..);
            let metrics = ForwardMetrics::default();
            let mut seen = lock(&self.seen);
            let s = &mut *seen;
            let served = serve_request(
                &mut s.accepted,
                0,
                1,
                body,
                16,
                clocks(),
                &metrics,
                u64::MAX,
            );
            let is_batch = matches!(
                served,
                Ok(Incoming::Deliver { .. } | Incoming::Duplicate { .. }) | Err(_)
            );
            let complete_at = self.done_after.map(|n| now + RTT * n);
            let (answer, wait_until) = match served {
                Err(e) => {
                    s.refused += 1;
                    (Err(e.to_string()), now + RTT)
                }
                Ok(Incoming::Deliver { messages, seq, .. }) => {
                    let payloads = messages
                        .into_iter()
                        .map(|m| match m {
                            MeshMsg::Forwarded { message, .. } => message.payload,
                            _ => Bytes::new(),
                        })
                        .collect();
                    s.delivered.push((seq, payloads));
                    match complete_at {
                        Some(at) => {
                            s.waiting.insert(seq, at);
                            s.not_done_max = s.not_done_max.max(s.waiting.len());
                            (Ok(Answer::Received { seq }), now + RTT)
                        }
                        None => (Ok(Answer::Accepted { seq }), now + RTT),
                    }
                }
                Ok(Incoming::Duplicate { seq, .. }) => match s.waiting.get(&seq) {
                    Some(_) => (Ok(Answer::Received { seq }), now + RTT),
                    None => (Ok(Answer::Accepted { seq }), now + RTT),
                },
                Ok(Incoming::Done { seq, known, .. }) => match s.waiting.get(&seq) {
                    Some(&at) => (Ok(Answer::Accepted { seq }), at.max(now) + RTT),
                    None if known => (Ok(Answer::Accepted { seq }), now + RTT),
                    None => (Ok(Answer::Unknown { seq }), now + RTT),
                },
                Ok(other) => panic!("not a forward request of a sender: {other:?}"),
            };
            if is_batch {
                s.arrivals.insert(now);
                s.in_flight += 1;
                s.in_flight_max = s.in_flight_max.max(s.in_flight);
            }
            (is_batch, answer, wait_until)
        }
    }

    fn item(i: u64) -> Item {
        Item {
            message: Message {
                topic: Str::from_static("t"),
                payload: Bytes::from(i.to_string()),
                qos: tessera_proto::QoS::AtLeastOnce,
                retain: false,
                properties: None,
                expires_at_ms: None,
                origin: None,
                received_us: 0,
            },
            publisher: 7,
            token: Some((0, i)),
            share: None,
            id: None,
            session: None,
            routes: Some(0),
        }
    }

    /// Waits (bounded) until the sender answered token `i`'s publication (hinted).
    async fn answered(events: &mut mpsc::UnboundedReceiver<Event>, i: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ev = tokio::time::timeout_at(deadline, events.recv())
                .await
                .expect("the hinted publication is answered in time")
                .expect("the sender runs");
            if let Event::PeerDone { tokens } = ev
                && tokens.contains(&(0, i))
            {
                return;
            }
        }
    }

    /// A backlog of `n` hinted batches for a peer that comes back: what it saw.
    async fn drain_backlog(n: u64, done_after: Option<u32>) -> Seen {
        let dir = tempfile::tempdir().unwrap();
        let cp = super::reconcile_tests::one_node(&dir.path().join("raft")).await;
        // The peer must be a member (a sender whose calls fail gives up a peer that
        // left the cluster); it never answers raft, so its catching up never ends.
        let info = NodeInfo::with_cluster_addr("127.0.0.1:2".to_string());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !cp.handle().members().contains_key(&2) {
            let added =
                tokio::time::timeout(Duration::from_secs(1), cp.add_learner(2, info.clone())).await;
            if !matches!(added, Ok(Ok(_))) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(tokio::time::Instant::now() < deadline, "no learner");
        }

        let (store, earlier) = open_hints_sim(&dir.path().join("hints"), 1 << 30).unwrap();
        assert!(earlier.is_empty());
        let peer = Arc::new(Peer {
            done_after,
            ..Peer::default()
        });
        let queue = Arc::new(PeerQueue::default());
        let (events, mut events_rx) = mpsc::unbounded_channel();
        let (sender, done_rx) = PeerSender::new(
            2,
            queue.clone(),
            Arc::new(Notify::new()),
            peer.clone(),
            events,
            (1, Arc::new(ForwardMetrics::default())),
            (Some(Arc::new(store)), Duration::from_millis(200)),
            None,
        );
        let task = tokio::spawn(send_to_peer(sender, done_rx, clocks(), cp.handle()));
        // One publication at a time, each answered (hinted) before the next comes:
        // one batch per hint write, as under a steady load while the peer is away.
        for i in 0..n {
            lock(&queue.items).push_back(item(i));
            queue.notify.notify_one();
            answered(&mut events_rx, i).await;
        }
        peer.up.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            {
                let s = lock(&peer.seen);
                if s.delivered.len() as u64 >= n && s.waiting.is_empty() && s.in_flight == 0 {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the backlog never reached the peer"
            );
            tokio::time::sleep(RTT).await;
        }
        task.abort();
        cp.shutdown().await;
        std::mem::take(&mut *lock(&peer.seen))
    }

    /// Each batch delivered once, in order, under its number, one publication each.
    fn check_delivered(seen: &Seen, n: u64) {
        println!(
            "{n} hinted batches: {} round trips, at most {} batch calls in flight and {} \
             batches not done at the peer at once",
            seen.arrivals.len(),
            seen.in_flight_max,
            seen.not_done_max
        );
        let want: Vec<(u64, Vec<Bytes>)> = (0..n)
            .map(|i| (i + 1, vec![Bytes::from(i.to_string())]))
            .collect();
        assert_eq!(seen.delivered, want);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_hinted_backlog_goes_with_several_batches_in_flight_in_order() {
        let n = 64;
        let seen = drain_backlog(n, None).await;
        check_delivered(&seen, n);
        // The first batch alone (is the peer back?), then RESEND_IN_FLIGHT at a time:
        // one per round trip took `n` round trips.
        let most = 1 + (n as usize - 1).div_ceil(RESEND_IN_FLIGHT);
        assert!(
            seen.arrivals.len() <= most,
            "{n} hinted batches took {} round trips (at most {most} wanted)",
            seen.arrivals.len()
        );
        assert_eq!(seen.in_flight_max, RESEND_IN_FLIGHT);
        assert_eq!(seen.refused, 0);
    }

    /// A receiver that answers received and completes the batch later (its commit):
    /// the batches not done at the peer stay within the bound while the backlog goes.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_hinted_backlog_keeps_the_batches_not_done_at_the_peer_bounded() {
        let n = 100;
        let seen = drain_backlog(n, Some(5)).await;
        check_delivered(&seen, n);
        assert!(
            seen.not_done_max <= BATCHES_NOT_DONE_MAX,
            "{} batches not done at the peer at once",
            seen.not_done_max
        );
        assert!(
            seen.not_done_max > RESEND_IN_FLIGHT,
            "{}",
            seen.not_done_max
        );
        assert!(
            seen.arrivals.len() < n as usize / 4,
            "{}",
            seen.arrivals.len()
        );
        assert_eq!(seen.refused, 0);
    }
}
