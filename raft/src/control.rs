//! The control plane: one raft node on the caller's tokio runtime (the control thread),
//! its batcher, membership operations, status and metrics. See the crate header for the
//! API as the broker uses it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, RaftMetrics, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{ClusterConfig, ConfigError};
use crate::metrics::{ClusterMetrics, MetricsCore};
use crate::network::Network;
use crate::op::{Batch, BatchResult, EntryData, Op, OpResult, Rejection, RouteChange};
use crate::rpc::{self, AdminReply, AdminRequest, ProposeRefusal, RaftReply, RaftRequest};
use crate::service::RaftService;
use crate::status::{ClusterStatus, MemberStatus, Role};
use crate::store::log::LogStore;
use crate::store::stm::{AppliedEvent, StateMachine, TablesView};
use crate::store::{Store, StoreError, StoreOptions, lock};
use crate::transport::{Channel, NodeId, Service, Transport};
use crate::types::{NodeInfo, Raft};

/// Approximate encoded bytes one batch may hold before the batcher closes it (keeps an
/// append-entries RPC of `MAX_PAYLOAD_ENTRIES` batches under the link's 32 MiB bound of
/// the raft channel).
pub const BATCH_BYTES_MAX: usize = 1 << 20;
/// Most entries in one append-entries RPC.
const MAX_PAYLOAD_ENTRIES: u64 = 24;
/// Most hops an admin request is forwarded towards the leader.
const ADMIN_HOPS_MAX: u8 = 3;

/// Why the control plane did not start. The broker prints it and exits with code 2.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store cannot be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data dir belongs to another node id.
    #[error(
        "{path} belongs to node {stored}, but this node was started with node id \
         {configured}: start it with --node-id {stored}, or give node {configured} its own \
         data dir (nothing was changed)"
    )]
    NodeIdMismatch {
        /// The raft dir.
        path: String,
        /// The stored id.
        stored: NodeId,
        /// The configured id.
        configured: NodeId,
    },
    /// The peer list disagrees with the one the cluster was created with.
    #[error(
        "--cluster-peers ({configured}) disagrees with the initial voters stored in {path} \
         ({stored}): pass the list this cluster was created with (later membership changes \
         are made with `brokerctl cluster join/remove`, not by editing the list); nothing \
         was changed"
    )]
    PeersMismatch {
        /// The raft dir.
        path: String,
        /// The stored list.
        stored: String,
        /// The configured list.
        configured: String,
    },
    /// openraft refused to start.
    #[error("raft did not start: {0}")]
    Raft(String),
}

/// Why a proposal or an operator request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The proposal channel is full: the control thread is behind. Counted in
    /// `ClusterMetrics::proposals_busy`; the caller answers its client at once.
    #[error("the cluster control plane is busy (proposal queue full)")]
    Busy,
    /// The op breaks a bound; nothing was proposed.
    #[error("invalid op: {0}")]
    Invalid(Rejection),
    /// No leader with a quorum answered within the proposal timeout.
    #[error("the cluster has no available leader: {0}")]
    Unavailable(String),
    /// The control plane is shut down (or raft stopped on a storage error).
    #[error("the cluster control plane is shut down: {0}")]
    Shutdown(String),
    /// The leader refused an operator request.
    #[error("{0}")]
    Refused(String),
}

/// The applied result of one proposed op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The log index of the entry that carried the op (the local tables reflect it once
    /// `ClusterHandle::applied_index() >= index`).
    pub index: u64,
    /// What the op did.
    pub result: OpResult,
}

struct Proposal {
    op: Op,
    reply: oneshot::Sender<Result<Applied, ClusterError>>,
    queued: Instant,
}

/// The answer to a proposal, ready later. Awaitable from any executor (glommio shards
/// included): it is a tokio oneshot receiver, which needs no tokio runtime (one
/// allocation per proposal; a flume channel per proposal, the earlier reply, cost its
/// shared queue state and lock on every claim).
#[derive(Debug)]
pub struct PendingOp {
    /// `None` once `try_result` has handed the answer out (a tokio receiver must not
    /// be awaited after that).
    rx: Option<oneshot::Receiver<Result<Applied, ClusterError>>>,
}

impl PendingOp {
    /// Waits for the op's answer: committed and applied on the leader that took the
    /// proposal (or failed). This node may not have applied it yet, and may apply later
    /// entries before the waiting task runs: read local tables only once
    /// [`ClusterHandle::applied_index`] reaches [`Applied::index`], and check them then
    /// (the broker's claims do both). Never hangs: every proposal is answered within
    /// `proposal_timeout_ms` (plus one RPC timeout), and one still queued when the
    /// control plane stops is answered `ClusterError::Shutdown` then.
    pub async fn wait(self) -> Result<Applied, ClusterError> {
        let Some(rx) = self.rx else {
            return Err(ClusterError::Shutdown("proposal answered already".into()));
        };
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(ClusterError::Shutdown("proposal dropped".into())),
        }
    }

    /// The answer if it is there. Once it has returned the answer, later calls return
    /// `None` and `wait` answers `ClusterError::Shutdown`.
    pub fn try_result(&mut self) -> Option<Result<Applied, ClusterError>> {
        let rx = self.rx.as_mut()?;
        let r = match rx.try_recv() {
            Ok(r) => r,
            Err(oneshot::error::TryRecvError::Empty) => return None,
            Err(oneshot::error::TryRecvError::Closed) => {
                Err(ClusterError::Shutdown("proposal dropped".into()))
            }
        };
        self.rx = None;
        Some(r)
    }
}

/// What the handle, the batcher and the service share.
struct Shared {
    node_id: NodeId,
    store: Arc<Store>,
    metrics_rx: watch::Receiver<RaftMetrics<NodeId, NodeInfo>>,
    core: Arc<MetricsCore>,
    /// When this node started (the base of `leader_contact_ms`). tokio's clock, so the
    /// paused clock of the simulation drives it too (outside a runtime it is the
    /// system's monotonic clock).
    started: tokio::time::Instant,
    /// When the current leader last reached this follower (ms since `started`, plus 1;
    /// 0: never).
    leader_contact_ms: AtomicU64,
    /// The proposal channel's receiving end, beside the batcher's: to answer what is
    /// still queued when the batcher ends ([`Shared::close_proposals`]).
    proposals: flume::Receiver<Proposal>,
    /// The batcher ended: proposals are refused, and one queued in the same instant is
    /// answered by its proposer.
    stopped: AtomicBool,
}

impl Shared {
    /// Refuses proposals from now on and answers every queued one with
    /// `ClusterError::Shutdown`. Without it a proposal queued when the batcher ended
    /// stayed in the channel, which every `ClusterHandle` keeps alive: its waiter,
    /// holding a handle (and through it the raft store and its lock), waited forever, so
    /// the node could not be started again in the same process (data-plane simulation
    /// seed 335: a crashed node's route proposal).
    fn close_proposals(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let mut n = 0;
        for p in self.proposals.drain() {
            n += 1;
            let _ = p.reply.send(Err(ClusterError::Shutdown(
                "the control plane stopped before the proposal was batched".into(),
            )));
        }
        self.core.proposals_failed.fetch_add(n, Ordering::Relaxed);
    }

    /// Records a contact with the cluster `ago_ms` ago (a quorum's answer while this node
    /// leads), unless a later one is known.
    fn note_contact_ms_ago(&self, ago_ms: u64) {
        let at = (self.started.elapsed().as_millis() as u64).saturating_sub(ago_ms) + 1;
        self.leader_contact_ms.fetch_max(at, Ordering::Relaxed);
    }

    /// When the leader last reached this node (None: never since start).
    fn last_leader_contact(&self) -> Option<tokio::time::Instant> {
        match self.leader_contact_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.started + Duration::from_millis(at - 1)),
        }
    }
}

/// The shards' door to the control plane: `Clone + Send + Sync`, never blocks.
///
/// Lives on every shard (and anywhere else in the broker); every method returns at once.
#[derive(Clone)]
pub struct ClusterHandle {
    tx: flume::Sender<Proposal>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ClusterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHandle")
            .field("node_id", &self.shared.node_id)
            .finish_non_exhaustive()
    }
}

impl ClusterHandle {
    /// Queues `op` for the next batch. Returns at once: `Err(Busy)` if the proposal
    /// channel is full (counted), `Err(Invalid)` if the op breaks a bound, else a
    /// [`PendingOp`] answered when the op is applied on this node.
    pub fn propose(&self, op: Op) -> Result<PendingOp, ClusterError> {
        op.validate().map_err(ClusterError::Invalid)?;
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(ClusterError::Shutdown("control plane stopped".into()));
        }
        let (reply, rx) = oneshot::channel();
        let p = Proposal {
            op,
            reply,
            queued: Instant::now(),
        };
        match self.tx.try_send(p) {
            Ok(()) => {
                self.shared.core.proposals.fetch_add(1, Ordering::Relaxed);
                // The batcher may have ended (and drained the queue) since the check
                // above: then nothing takes this one, so answer it here. (Either the
                // drain saw it, or this load sees `stopped`: both are `SeqCst`.)
                if self.shared.stopped.load(Ordering::SeqCst) {
                    self.shared.close_proposals();
                }
                Ok(PendingOp { rx: Some(rx) })
            }
            Err(flume::TrySendError::Full(_)) => {
                self.shared
                    .core
                    .proposals_busy
                    .fetch_add(1, Ordering::Relaxed);
                Err(ClusterError::Busy)
            }
            Err(flume::TrySendError::Disconnected(_)) => {
                Err(ClusterError::Shutdown("control plane stopped".into()))
            }
        }
    }

    /// Subscribes to applied changes (for a shard's replica tables). The channel holds
    /// `capacity` events; a subscriber that falls that far behind is dropped (its
    /// receiver reports disconnection) and must resync: subscribe again, then read a
    /// [`TablesView`] and skip events at or below its `applied_index()`.
    pub fn subscribe(&self, capacity: usize) -> flume::Receiver<AppliedEvent> {
        self.shared.store.applied_subscribers.add(capacity.max(1))
    }

    /// A consistent read view of the replicated tables (ownership, routes, retained,
    /// nodes), stamped with the index it reflects.
    pub fn tables(&self) -> Result<TablesView, StoreError> {
        self.shared.store.read()
    }

    /// The index this node's tables reflect.
    pub fn applied_index(&self) -> u64 {
        self.shared
            .store
            .counters
            .applied_index
            .load(Ordering::Acquire)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.node_id
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.shared.metrics_rx.borrow().current_leader
    }

    /// Whether this node was in touch with a working cluster within `within`: as a
    /// leader, a quorum of voters answered it; otherwise its leader reached it. A node
    /// cut off for longer than its session lease must stop serving the ClientIDs it
    /// holds, since the rest of the cluster may have given them to another node.
    /// (openraft refreshes `millis_since_quorum_ack` every time its loop runs, at
    /// least every tick.)
    ///
    /// A new leader knows no quorum acknowledgement until its first heartbeats are
    /// answered (`millis_since_quorum_ack` is `None` for a round trip or more): until
    /// then the contact it had as a follower counts, as it did a moment before. Without
    /// that, a shard tick in the window ended every connection of the new leader after
    /// any election or leader transfer. Safe for the lease: that contact is older than
    /// the votes that made it leader, and once it is older than `within` only a quorum's
    /// answer keeps the leader in contact.
    pub fn in_contact(&self, within: Duration) -> bool {
        let leading = {
            let m = self.shared.metrics_rx.borrow();
            (m.state == ServerState::Leader).then_some(m.millis_since_quorum_ack)
        };
        let as_follower = || {
            self.shared
                .last_leader_contact()
                .is_some_and(|at| at.elapsed() < within)
        };
        match leading {
            Some(Some(ms)) => {
                // Kept as this node's last contact with its cluster, so a leader that
                // steps down (a transfer, a higher term) is not taken for cut off until
                // the new leader's first append arrives: the contact it had as a
                // follower is from before it led, possibly longer ago than the lease
                // (a shard tick in that window ended every connection of the old
                // leader). Safe for the lease: it is when a quorum last answered it.
                self.shared.note_contact_ms_ago(ms);
                Duration::from_millis(ms) < within
            }
            Some(None) | None => as_follower(),
        }
    }

    /// Addresses of every member, from the latest membership (the link's address book
    /// for nodes that joined after start).
    pub fn members(&self) -> BTreeMap<NodeId, NodeInfo> {
        let m = self.shared.metrics_rx.borrow();
        m.membership_config
            .nodes()
            .map(|(id, n)| (*id, n.clone()))
            .collect()
    }
}

/// A running raft node. Create it with [`ControlPlane::start`] on the control thread's
/// tokio runtime; stop it with [`ControlPlane::shutdown`].
pub struct ControlPlane {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("node_id", &self.inner.shared.node_id)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) config: ClusterConfig,
    pub(crate) raft: Raft,
    shared: Arc<Shared>,
    transport: Arc<dyn Transport>,
    handle: ClusterHandle,
    pub(crate) forward: Mutex<Option<Arc<dyn Service>>>,
    stop: Arc<Notify>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Bootstrap {
    node_id: NodeId,
    initial_voters: BTreeMap<NodeId, String>,
}

fn peers_text(m: &BTreeMap<NodeId, String>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(id, a)| format!("{id}={a}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ControlPlane {
    /// Starts this node's raft on the current tokio runtime (call it on the control
    /// thread). Returns the control plane and the [`Service`] the link must dispatch
    /// incoming requests to.
    ///
    /// Refuses (with [`StartError`], nothing in the data dir changed) a bad setting, a
    /// corrupt or incompatible store, a data dir of another node id, and an
    /// `initial_voters` list that disagrees with the stored one. A fresh node listed in
    /// `initial_voters` initializes the cluster with that list (every initial node does
    /// the same; raft makes it one membership); a fresh node not listed waits to be
    /// added ([`ControlPlane::join`]). A restarted node resumes from its data dir.
    pub async fn start(
        config: ClusterConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<(ControlPlane, Arc<dyn Service>), StartError> {
        config.validate()?;
        let raft_dir = config.data_dir.join("raft");
        let store = Store::open(
            &raft_dir,
            StoreOptions {
                map_size_bytes: config.map_size_bytes,
                fsync: config.fsync,
                io_on_blocking_pool: config.io_on_blocking_pool,
            },
        )?;
        let path = raft_dir.display().to_string();
        let given = Bootstrap {
            node_id: config.node_id,
            initial_voters: config
                .initial_voters
                .iter()
                .map(|(id, n)| (*id, n.cluster_addr.clone()))
                .collect(),
        };
        let stored: Option<Bootstrap> =
            store.meta_get(store.dbs.raft_meta, "raft_meta", b"bootstrap")?;
        let fresh = match &stored {
            None => true,
            Some(b) => {
                if b.node_id != config.node_id {
                    return Err(StartError::NodeIdMismatch {
                        path,
                        stored: b.node_id,
                        configured: config.node_id,
                    });
                }
                if !given.initial_voters.is_empty() && b.initial_voters != given.initial_voters {
                    return Err(StartError::PeersMismatch {
                        path,
                        stored: peers_text(&b.initial_voters),
                        configured: peers_text(&given.initial_voters),
                    });
                }
                false
            }
        };
        if fresh {
            store.meta_put(store.dbs.raft_meta, b"bootstrap", &given)?;
        }
        let incarnation = store.next_incarnation()?;

        let rc = openraft::Config {
            cluster_name: "tessera".into(),
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            heartbeat_interval: config.heartbeat_interval_ms,
            install_snapshot_timeout: 10_000,
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: config.logs_kept_after_snapshot,
            snapshot_max_chunk_size: config.snapshot_chunk_bytes,
            purge_batch_size: (config.snapshot_logs_since_last / 2).clamp(1, 1024),
            // Elections are started by `election_timer` (a fresh random timeout per
            // round, not ticks): see there.
            enable_elect: false,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let raft = Raft::new(
            config.node_id,
            Arc::new(rc),
            Network::new(transport.clone()),
            LogStore::new(store.clone()),
            StateMachine::new(store.clone()),
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;

        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if !initialized && config.initial_voters.contains_key(&config.node_id) {
            match raft.initialize(config.initial_voters.clone()).await {
                Ok(()) => {}
                // Another initial voter got there first: same membership, nothing to do.
                Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(StartError::Raft(e.to_string())),
            }
        }

        let core = Arc::new(MetricsCore::default());
        let (tx, rx) = flume::bounded(config.proposal_queue_max);
        let shared = Arc::new(Shared {
            node_id: config.node_id,
            store: store.clone(),
            metrics_rx: raft.metrics(),
            core: core.clone(),
            started: tokio::time::Instant::now(),
            leader_contact_ms: AtomicU64::new(0),
            proposals: rx.clone(),
            stopped: AtomicBool::new(false),
        });
        let handle = ClusterHandle {
            tx,
            shared: shared.clone(),
        };
        let inner = Arc::new(Inner {
            config,
            raft,
            shared,
            transport,
            handle,
            forward: Mutex::new(None),
            stop: Arc::new(Notify::new()),
            tasks: Mutex::new(Vec::new()),
        });
        let batcher = tokio::spawn(batcher(inner.clone(), rx, incarnation));
        let watcher = tokio::spawn(watch_leader(inner.clone()));
        let meta = tokio::spawn(announce_self(inner.clone()));
        let elections = tokio::spawn(election_timer(inner.clone()));
        lock(&inner.tasks).extend([batcher, watcher, meta, elections]);
        let service: Arc<dyn Service> = Arc::new(RaftService::new(inner.clone()));
        Ok((ControlPlane { inner }, service))
    }

    /// The handle shards use (clone it per shard).
    pub fn handle(&self) -> ClusterHandle {
        self.inner.handle.clone()
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.shared.node_id
    }

    /// The underlying openraft node (tests and diagnostics).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Registers the data plane's handler for [`Channel::Forward`] requests (issue 15);
    /// until then they are answered with an error.
    pub fn serve_forward(&self, service: Arc<dyn Service>) {
        *lock(&self.inner.forward) = Some(service);
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> ClusterStatus {
        self.inner.local_status()
    }

    /// The leader's view (members' match index and lag are known there), or this node's
    /// own if the leader cannot be asked.
    pub async fn cluster_status(&self) -> ClusterStatus {
        match self.inner.admin(AdminRequest::Status, 0).await {
            Ok(AdminReply::Status(s)) => *s,
            _ => self.inner.local_status(),
        }
    }

    /// Waits until raft stops on this node by itself and says why: a storage error (a
    /// full disk, an I/O error: openraft's fatal path, after which this node's raft
    /// never runs again) or a panic in openraft's core. Returns `None` if raft was shut
    /// down ([`ControlPlane::shutdown`]); never returns while raft runs.
    pub async fn stopped(&self) -> Option<String> {
        let mut rx = self.inner.shared.metrics_rx.clone();
        loop {
            if let Err(fatal) = &rx.borrow_and_update().running_state {
                return match fatal {
                    openraft::error::Fatal::Stopped => None,
                    other => Some(other.to_string()),
                };
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Current metric values.
    pub fn metrics(&self) -> ClusterMetrics {
        let m = self.inner.shared.metrics_rx.borrow().clone();
        self.inner
            .shared
            .core
            .snapshot(&m, &self.inner.shared.store)
    }

    /// Adds `id` as a learner and waits until it caught up (done by the leader).
    pub async fn add_learner(&self, id: NodeId, info: NodeInfo) -> Result<u64, ClusterError> {
        self.done(AdminRequest::AddLearner { id, info }).await
    }

    /// Makes learner `id` a voter.
    pub async fn promote(&self, id: NodeId) -> Result<u64, ClusterError> {
        self.done(AdminRequest::Promote { id }).await
    }

    /// Removes `id` (voter or learner) from the cluster.
    pub async fn remove(&self, id: NodeId) -> Result<u64, ClusterError> {
        self.done(AdminRequest::Remove { id }).await
    }

    /// Moves leadership to voter `to`, which must be caught up. Takes about one
    /// election timeout (openraft 0.9 has no transfer RPC: the leader pauses heartbeats and
    /// tells `to` to campaign as soon as the followers' lease expires).
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), ClusterError> {
        self.done(AdminRequest::TransferLeader { to })
            .await
            .map(|_| ())
    }

    /// Joins a running cluster through node `via` (any member; it forwards to the
    /// leader): this node becomes a learner, catches up, then becomes a voter. Returns
    /// when it is a voter. Idempotent: a node that already is a voter returns at once.
    pub async fn join(&self, via: NodeId) -> Result<u64, ClusterError> {
        let req = AdminRequest::Join {
            id: self.inner.shared.node_id,
            info: self.inner.config.self_info.clone(),
        };
        let reply = self.inner.send_admin(via, req, 0).await?;
        match reply {
            AdminReply::Done { index } => Ok(index),
            AdminReply::Status(_) => Err(ClusterError::Refused("unexpected reply".into())),
        }
    }

    /// Removes this node from the cluster (through the leader). Returns the log index
    /// of the change, or (when the answer was lost) an applied index that includes it.
    ///
    /// The leader stops talking to a node as soon as the change that removes it
    /// commits, which may be before its answer reaches this node: a lost answer is
    /// checked with the other members, and a leave that is done is reported done.
    pub async fn leave(&self) -> Result<u64, ClusterError> {
        let me = self.inner.shared.node_id;
        let error = match self.remove(me).await {
            Ok(index) => return Ok(index),
            Err(e @ ClusterError::Unavailable(_)) => e,
            Err(e) => return Err(e),
        };
        let others: Vec<NodeId> = self
            .inner
            .metrics_now()
            .membership_config
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != me)
            .collect();
        for peer in others {
            // A member forwards Status to its leader: the membership as the leader sees it.
            if let Ok(AdminReply::Status(s)) =
                self.inner.send_admin(peer, AdminRequest::Status, 0).await
            {
                if s.members.iter().all(|m| m.id != me) {
                    return Ok(s.applied_index);
                }
                break;
            }
        }
        Err(error)
    }

    async fn done(&self, req: AdminRequest) -> Result<u64, ClusterError> {
        match self.inner.admin(req, 0).await? {
            AdminReply::Done { index } => Ok(index),
            AdminReply::Status(_) => Err(ClusterError::Refused("unexpected reply".into())),
        }
    }

    /// Stops raft and the batcher; pending proposals fail with `Shutdown`.
    pub async fn shutdown(self) {
        self.inner.stop.notify_waiters();
        let tasks: Vec<_> = lock(&self.inner.tasks).drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        // The batcher answers what is queued when it ends, but a batcher aborted before
        // it first ran never set that up (a shutdown right after the start): a proposal
        // queued meanwhile kept its waiter, and the handle it holds kept the store open.
        self.inner.shared.close_proposals();
        let _ = self.inner.raft.shutdown().await;
        // Raft has stopped: nothing applies any more, so the state machine can be closed
        // clean even while views and handles elsewhere keep the store alive.
        self.inner.shared.store.close_clean();
    }
}

enum Attempt {
    Retry(String),
    Fail(ClusterError),
}

impl Inner {
    fn metrics_now(&self) -> RaftMetrics<NodeId, NodeInfo> {
        self.shared.metrics_rx.borrow().clone()
    }

    /// The leader's append-entries (or heartbeat) was taken by this node.
    pub(crate) fn note_leader_contact(&self) {
        let ms = self.shared.started.elapsed().as_millis() as u64 + 1;
        self.shared.leader_contact_ms.store(ms, Ordering::Relaxed);
    }

    /// A snapshot from the leader was refused (it did not parse).
    pub(crate) fn note_snapshot_refused(&self) {
        self.shared
            .store
            .counters
            .snapshots_refused
            .fetch_add(1, Ordering::Relaxed);
    }

    /// How recent a leader's contact with a follower, or a quorum's answer to a
    /// leader, must be for it to count as ready: three heartbeats, at most the
    /// shortest election timeout. A follower whose leader died stops being ready
    /// then, instead of after the election that follows (openraft keeps the dead
    /// leader as `current_leader` until a new one is elected); a leader cut off from
    /// its followers, which keeps its role but cannot commit, stops being ready too.
    fn contact_window(&self) -> Duration {
        Duration::from_millis(
            (self.config.heartbeat_interval_ms * 3).min(self.config.election_timeout_min_ms),
        )
    }

    pub(crate) fn local_status(&self) -> ClusterStatus {
        let m = self.metrics_now();
        let counters = &self.shared.store.counters;
        let role = match (&m.running_state, m.state) {
            (Err(_), _) => Role::Shutdown,
            (_, ServerState::Leader) => Role::Leader,
            (_, ServerState::Follower) => Role::Follower,
            (_, ServerState::Candidate) => Role::Candidate,
            (_, ServerState::Learner) => Role::Learner,
            (_, ServerState::Shutdown) => Role::Shutdown,
        };
        let last = m.last_log_index.unwrap_or(0);
        let voters: BTreeSet<NodeId> = m.membership_config.voter_ids().collect();
        let members = m
            .membership_config
            .nodes()
            .map(|(id, info)| {
                let match_index = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).map(|l| l.map_or(0, |l| l.index)));
                let match_index = if *id == m.id && role == Role::Leader {
                    Some(last)
                } else {
                    match_index
                };
                let role = if Some(*id) == m.current_leader {
                    Role::Leader
                } else if voters.contains(id) {
                    Role::Follower
                } else {
                    Role::Learner
                };
                MemberStatus {
                    id: *id,
                    info: info.clone(),
                    role,
                    match_index,
                    lag: match_index.map(|mi| last.saturating_sub(mi)),
                }
            })
            .collect();
        let applied = m.last_applied.map_or(0, |l| l.index);
        let commit = counters
            .committed_index
            .load(Ordering::Relaxed)
            .max(applied);
        let ready = m.running_state.is_ok()
            && m.current_leader.is_some()
            && voters.contains(&m.id)
            && applied >= commit
            && self.handle.in_contact(self.contact_window());
        ClusterStatus {
            node_id: m.id,
            role,
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: last,
            commit_index: commit,
            applied_index: applied,
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            members,
            ready,
            error: m.running_state.as_ref().err().map(|e| e.to_string()),
        }
    }

    /// Runs an admin request here if this node leads, else on the leader.
    pub(crate) async fn admin(
        &self,
        req: AdminRequest,
        hops: u8,
    ) -> Result<AdminReply, ClusterError> {
        let leader = self.shared.metrics_rx.borrow().current_leader;
        match leader {
            Some(l) if l == self.shared.node_id => self.admin_as_leader(req).await,
            Some(l) if hops < ADMIN_HOPS_MAX => self.send_admin(l, req, hops + 1).await,
            Some(_) => Err(ClusterError::Unavailable("leadership keeps moving".into())),
            None => Err(ClusterError::Unavailable("no leader is known".into())),
        }
    }

    async fn send_admin(
        &self,
        to: NodeId,
        req: AdminRequest,
        hops: u8,
    ) -> Result<AdminReply, ClusterError> {
        let bytes = rpc::encode(&(hops, req));
        let timeout = Duration::from_millis(self.config.proposal_timeout_ms * 3);
        let call = self.transport.call(to, Channel::Admin, bytes);
        let reply = match tokio::time::timeout(timeout, call).await {
            Err(_) => {
                return Err(ClusterError::Unavailable(format!(
                    "node {to} did not answer"
                )));
            }
            Ok(Err(e)) => return Err(ClusterError::Unavailable(e.to_string())),
            Ok(Ok(b)) => b,
        };
        let r: Result<AdminReply, String> = rpc::decode(&reply)
            .map_err(|e| ClusterError::Refused(format!("bad reply from node {to}: {e}")))?;
        r.map_err(ClusterError::Refused)
    }

    async fn admin_as_leader(&self, req: AdminRequest) -> Result<AdminReply, ClusterError> {
        let refused = |e: &dyn std::fmt::Display| ClusterError::Refused(e.to_string());
        let m = self.metrics_now();
        let voters: BTreeSet<NodeId> = m.membership_config.voter_ids().collect();
        let index = match req {
            AdminRequest::Status => return Ok(AdminReply::Status(Box::new(self.local_status()))),
            AdminRequest::ElectAfter { after_ms } => {
                let raft = self.raft.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    let _ = raft.trigger().elect().await;
                });
                0
            }
            AdminRequest::Join { id, info } => {
                if let Some(existing) = m.membership_config.membership().get_node(&id)
                    && existing.cluster_addr != info.cluster_addr
                {
                    return Err(ClusterError::Refused(format!(
                        "node id {id} is already taken by the member at {}",
                        existing.cluster_addr
                    )));
                }
                if voters.contains(&id) {
                    0
                } else {
                    if m.membership_config.membership().get_node(&id).is_none() {
                        self.raft
                            .add_learner(id, info, true)
                            .await
                            .map_err(|e| refused(&e))?;
                    }
                    let r = self
                        .raft
                        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                        .await
                        .map_err(|e| refused(&e))?;
                    r.log_id.index
                }
            }
            AdminRequest::AddLearner { id, info } => {
                if let Some(existing) = m.membership_config.membership().get_node(&id)
                    && existing.cluster_addr != info.cluster_addr
                {
                    return Err(ClusterError::Refused(format!(
                        "node id {id} is already taken by the member at {}",
                        existing.cluster_addr
                    )));
                }
                self.raft
                    .add_learner(id, info, true)
                    .await
                    .map_err(|e| refused(&e))?
                    .log_id
                    .index
            }
            AdminRequest::Promote { id } => {
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(|e| refused(&e))?
                    .log_id
                    .index
            }
            AdminRequest::Remove { id } => {
                if m.membership_config.membership().get_node(&id).is_none() {
                    return Err(ClusterError::Refused(format!("node {id} is not a member")));
                }
                let change = if voters.contains(&id) {
                    if voters.len() == 1 {
                        return Err(ClusterError::Refused(format!(
                            "node {id} is the only voter; a cluster cannot remove its last voter"
                        )));
                    }
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                };
                self.raft
                    .change_membership(change, false)
                    .await
                    .map_err(|e| refused(&e))?
                    .log_id
                    .index
            }
            AdminRequest::TransferLeader { to } => {
                self.transfer_leader(to, &m, &voters).await?;
                0
            }
        };
        Ok(AdminReply::Done { index })
    }

    async fn transfer_leader(
        &self,
        to: NodeId,
        m: &RaftMetrics<NodeId, NodeInfo>,
        voters: &BTreeSet<NodeId>,
    ) -> Result<(), ClusterError> {
        if to == self.shared.node_id {
            return Ok(());
        }
        if !voters.contains(&to) {
            return Err(ClusterError::Refused(format!("node {to} is not a voter")));
        }
        let last = m.last_log_index.unwrap_or(0);
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&to).copied().flatten())
            .map_or(0, |l| l.index);
        if matched + MAX_PAYLOAD_ENTRIES < last {
            return Err(ClusterError::Refused(format!(
                "node {to} is {} entries behind; transfer when it caught up",
                last - matched
            )));
        }
        // Followers refuse votes while their leader lease (election_timeout_max) runs:
        // stop heartbeats, let `to` campaign just after the lease, before the others'
        // election timers (lease + a random timeout) fire.
        let lease = self.config.election_timeout_max_ms;
        self.raft.runtime_config().heartbeat(false);
        let sent = self
            .send_admin(
                to,
                AdminRequest::ElectAfter {
                    after_ms: lease + 20,
                },
                ADMIN_HOPS_MAX,
            )
            .await;
        let outcome = match sent {
            Err(e) => Err(e),
            Ok(_) => {
                let mut rx = self.raft.metrics();
                let wait = Duration::from_millis(lease * 4 + 500);
                let done = tokio::time::timeout(wait, async {
                    loop {
                        if rx.borrow().current_leader == Some(to) {
                            return;
                        }
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                })
                .await;
                match done {
                    Ok(()) if rx.borrow().current_leader == Some(to) => Ok(()),
                    _ => Err(ClusterError::Unavailable(format!(
                        "node {to} did not become leader in time"
                    ))),
                }
            }
        };
        self.raft.runtime_config().heartbeat(true);
        outcome
    }

    /// One attempt to get `data` committed and applied.
    async fn propose_once(
        &self,
        data: &EntryData,
        deadline: tokio::time::Instant,
    ) -> Result<BatchResult, Attempt> {
        let leader = self.shared.metrics_rx.borrow().current_leader;
        match leader {
            None => Err(Attempt::Retry("no leader is known".into())),
            // Bounded by the batch's deadline: openraft answers a leader's write when the
            // entry is applied or truncated, but not when this node, having stepped
            // down, installs a snapshot that covers the entry (its answer never comes;
            // the seeded simulation's seed 104 hung here). The batch's idempotency key
            // keeps a retry from applying it twice.
            Some(l) if l == self.shared.node_id => {
                match tokio::time::timeout_at(deadline, self.write_as_leader(data.clone())).await {
                    Err(_) => Err(Attempt::Retry(
                        "this node's raft did not answer the write in time".into(),
                    )),
                    Ok(r) => r.map_err(|r| match r {
                        ProposeRefusal::NotLeader { .. } => {
                            Attempt::Retry("leadership moved".into())
                        }
                        ProposeRefusal::Malformed(e) => Attempt::Fail(ClusterError::Refused(e)),
                        ProposeRefusal::Failed(e) => Attempt::Fail(ClusterError::Shutdown(e)),
                    }),
                }
            }
            Some(l) => {
                let req = rpc::encode(&RaftRequest::Propose(data.clone()));
                let timeout = Duration::from_millis(self.config.proposal_timeout_ms);
                let call = self.transport.call(l, Channel::Raft, req);
                let bytes = match tokio::time::timeout(timeout, call).await {
                    Err(_) => return Err(Attempt::Retry(format!("leader {l} did not answer"))),
                    Ok(Err(e)) => return Err(Attempt::Retry(e.to_string())),
                    Ok(Ok(b)) => b,
                };
                match rpc::decode::<RaftReply>(&bytes) {
                    Ok(RaftReply::Propose(Ok(r))) => Ok(r),
                    Ok(RaftReply::Propose(Err(ProposeRefusal::Malformed(e)))) => {
                        Err(Attempt::Fail(ClusterError::Refused(e)))
                    }
                    Ok(RaftReply::Propose(Err(e))) => Err(Attempt::Retry(format!("{e:?}"))),
                    Ok(_) => Err(Attempt::Retry("reply of another kind".into())),
                    Err(e) => Err(Attempt::Retry(format!("bad reply from leader {l}: {e}"))),
                }
            }
        }
    }

    /// Proposes `data` on this node's raft (which must lead).
    pub(crate) async fn write_as_leader(
        &self,
        data: EntryData,
    ) -> Result<BatchResult, ProposeRefusal> {
        match self.raft.client_write(data).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ProposeRefusal::NotLeader {
                    leader: f.leader_id,
                })
            }
            Err(RaftError::APIError(e)) => Err(ProposeRefusal::Failed(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(ProposeRefusal::Failed(e.to_string())),
        }
    }
}

/// Coalesces proposals from every shard into batches: one log entry per
/// `batch_window_us` or `batch_ops_max` ops, with up to `batches_in_flight_max`
/// entries proposed at once.
async fn batcher(inner: Arc<Inner>, rx: flume::Receiver<Proposal>, incarnation: u64) {
    // However the batcher ends (a shutdown aborts it), what is still queued is answered.
    struct Closing(Arc<Shared>);
    impl Drop for Closing {
        fn drop(&mut self) {
            self.0.close_proposals();
        }
    }
    let _closing = Closing(inner.shared.clone());
    // The batches being proposed. They end with the batcher (dropping the set aborts
    // them, and their waiters get `Shutdown`): a batch still waiting for a leader kept
    // the raft store, and its lock, open for up to `proposal_timeout_ms` after a
    // shutdown, so the node could not start again in the same process meanwhile.
    let mut submits = tokio::task::JoinSet::new();
    let max = inner.config.batch_ops_max;
    let window = Duration::from_micros(inner.config.batch_window_us);
    let permits = Arc::new(Semaphore::new(inner.config.batches_in_flight_max));
    let mut seq = 0u64;
    loop {
        // The permit first, then the batch: while every permit is out, proposals wait in
        // the channel and the next batch takes all of them (up to its bounds) when one
        // returns, so entries grow with the load instead of a small batch, formed
        // early, waiting for a permit while later proposals queue behind it.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = inner.stop.notified() => return,
        };
        let first = tokio::select! {
            r = rx.recv_async() => match r { Ok(p) => p, Err(_) => return },
            _ = inner.stop.notified() => return,
        };
        let mut bytes = approx_bytes(&first.op);
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + window;
        while batch.len() < max && bytes < BATCH_BYTES_MAX {
            let next = match rx.try_recv() {
                Ok(p) => p,
                Err(flume::TryRecvError::Disconnected) => break,
                Err(flume::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rx.recv_async()).await {
                        Ok(Ok(p)) => p,
                        _ => break,
                    }
                }
            };
            bytes += approx_bytes(&next.op);
            batch.push(next);
        }
        seq += 1;
        let inner = inner.clone();
        while submits.try_join_next().is_some() {}
        submits.spawn(async move {
            submit(&inner, batch, incarnation, seq).await;
            drop(permit);
        });
    }
}

fn approx_bytes(op: &Op) -> usize {
    24 + match op {
        Op::ClaimSession { client_id, .. }
        | Op::ClaimCleanStart { client_id, .. }
        | Op::ReleaseSession { client_id, .. }
        | Op::SessionFresh { client_id, .. } => client_id.len(),
        Op::RouteDelta { filter, group, .. } => {
            filter.len() + group.as_ref().map_or(0, String::len)
        }
        Op::RouteDeltas { changes, .. } => changes.iter().map(RouteChange::approx_bytes).sum(),
        Op::RetainedSet { topic, inline, .. } => topic.len() + inline.as_ref().map_or(0, Vec::len),
        Op::RetainedClear { topic, .. } => topic.len(),
        Op::NodeMeta { info, .. } => {
            info.cluster_addr.len() + info.mqtt_addr.len() + info.admin_addr.len()
        }
    }
}

async fn submit(inner: &Inner, proposals: Vec<Proposal>, incarnation: u64, seq: u64) {
    let mut replies = Vec::with_capacity(proposals.len());
    let mut ops = Vec::with_capacity(proposals.len());
    for p in proposals {
        replies.push((p.reply, p.queued));
        ops.push(p.op);
    }
    let n = ops.len();
    let data = Batch {
        proposer: inner.shared.node_id,
        incarnation,
        seq,
        time_ms: wall_ms(),
        ops,
    }
    .encode();
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(inner.config.proposal_timeout_ms);
    let mut backoff = Duration::from_millis(5);
    let outcome = loop {
        match inner.propose_once(&data, deadline).await {
            Ok(r) => break Ok(r),
            Err(Attempt::Fail(e)) => break Err(e),
            Err(Attempt::Retry(reason)) => {
                if tokio::time::Instant::now() + backoff >= deadline {
                    break Err(ClusterError::Unavailable(reason));
                }
                // Wake when the known leader changes or after the backoff, whichever is
                // first (never at once for a change that already happened: that would
                // spin).
                let mut rx = inner.shared.metrics_rx.clone();
                let seen = rx.borrow_and_update().current_leader;
                let woke =
                    tokio::time::timeout(backoff, rx.wait_for(|m| m.current_leader != seen)).await;
                if let Ok(Err(_)) = woke {
                    break Err(ClusterError::Shutdown("raft stopped".into()));
                }
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
        }
    };
    let core = &inner.shared.core;
    match outcome {
        Ok(r) if r.results.len() == n => {
            core.record_entry(n);
            let now = Instant::now();
            core.record_latencies(
                replies
                    .iter()
                    .map(|(_, queued)| now.duration_since(*queued)),
            );
            for ((reply, _), result) in replies.into_iter().zip(r.results) {
                let _ = reply.send(Ok(Applied {
                    index: r.index,
                    result,
                }));
            }
        }
        other => {
            let e = match other {
                Err(e) => e,
                Ok(r) => ClusterError::Refused(format!(
                    "entry {} carried {} results for {n} ops (it did not decode on apply)",
                    r.index,
                    r.results.len()
                )),
            };
            core.proposals_failed.fetch_add(n as u64, Ordering::Relaxed);
            for (reply, _) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// Counts leader changes (for metrics).
async fn watch_leader(inner: Arc<Inner>) {
    let mut rx = inner.raft.metrics();
    let mut last = rx.borrow().current_leader;
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = inner.stop.notified() => return,
        }
        let m = rx.borrow().clone();
        inner.shared.core.observe(&m);
        if m.current_leader != last {
            if m.current_leader.is_some() {
                inner
                    .shared
                    .core
                    .leader_changes
                    .fetch_add(1, Ordering::Relaxed);
            }
            last = m.current_leader;
        }
    }
}

/// xorshift64* (the election timer's draws; no dependency, seedable).
struct XorShift(u64);

impl XorShift {
    fn seeded(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// Starts elections: a voter that has heard from no leader, and changed its vote, for a
/// random election timeout campaigns, with a new random timeout for every round. While
/// it knows a leader (its vote is committed) it waits the leader lease on top, as
/// openraft's own timer does, since voters refuse to vote during the lease.
///
/// Why not openraft's timer: openraft 0.9 draws a node's election timeout once, when the
/// node starts, and checks it only on its tick (every 1.5 heartbeats). With the default
/// 300-600 ms timeout and 150 ms ticks that leaves three possible timeouts; two voters
/// with the same one whose ticks fall within a vote round trip of each other campaign in
/// the same instant, split the vote, and do it again every round, for as long as both
/// run. The seeded simulation found it (5 nodes, 300 terms with no leader); on real
/// machines tick phases are random, so it is rarer, not impossible. A timeout redrawn per
/// round with full resolution breaks every tie within a round or two (Raft §5.2).
async fn election_timer(inner: Arc<Inner>) {
    use tokio::time::Instant;
    let seed = inner.config.election_seed.unwrap_or_else(|| {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    });
    let mut rng = XorShift::seeded(seed ^ inner.shared.node_id.rotate_left(32));
    let (min, max) = (
        inner.config.election_timeout_min_ms,
        inner.config.election_timeout_max_ms,
    );
    let lease = Duration::from_millis(max);
    let mut rx = inner.raft.metrics();
    let mut timeout = Duration::from_millis(min + rng.below(max - min + 1));
    let (mut vote, mut vote_changed) = (rx.borrow().vote, Instant::now());
    loop {
        let due = {
            let m = rx.borrow();
            if m.vote != vote {
                vote = m.vote;
                vote_changed = Instant::now();
            }
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|id| id == m.id);
            if m.state == ServerState::Leader || !voter || m.running_state.is_err() {
                None
            } else {
                let heard = inner
                    .shared
                    .last_leader_contact()
                    .map_or(vote_changed, |t| t.max(vote_changed));
                let wait = if vote.is_committed() {
                    lease + timeout
                } else {
                    timeout
                };
                Some(heard + wait)
            }
        };
        match due {
            Some(due) if due <= Instant::now() => {
                timeout = Duration::from_millis(min + rng.below(max - min + 1));
                if inner.raft.trigger().elect().await.is_err() {
                    return;
                }
                // The new vote is seen on the next turn; until then the old base would
                // be due again at once.
                vote_changed = Instant::now();
            }
            Some(due) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    r = rx.changed() => if r.is_err() { return },
                    _ = inner.stop.notified() => return,
                }
            }
            None => {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = inner.stop.notified() => return,
                }
            }
        }
    }
}

/// Proposes this node's `NodeMeta` until it is applied (retrying while the node has no
/// leader, e.g. before it joined).
async fn announce_self(inner: Arc<Inner>) {
    let id = inner.shared.node_id;
    let info = inner.config.self_info.clone();
    // A restart with the same addresses costs no write.
    if let Ok(v) = inner.shared.store.read()
        && v.nodes().is_ok_and(|n| n.contains(&(id, info.clone())))
    {
        return;
    }
    let op = Op::NodeMeta { id, info };
    loop {
        if let Ok(p) = inner.handle.propose(op.clone())
            && p.wait().await.is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
