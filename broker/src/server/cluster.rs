//! A shard's side of the cluster (issue 15): the [`ClusterPort`] it gets once the
//! control plane runs, the committed ops it reacts to, and the requests other nodes send
//! it. Without `[cluster]` none of this exists on a shard (`Shard::cluster` stays `None`
//! and no task runs), so a single node pays nothing.
//!
//! Start order: the shards listen before the control plane starts (the node's addresses
//! go into its `NodeMeta`), so the port arrives at runtime on a per-shard channel
//! ([`ClusterEnds`]); until it is there, [`Shard::cluster`] is `None` and the data plane
//! treats the cluster as unavailable (a CONNECT that needs a claim is refused).
//!
//! Two tasks per shard once attached:
//! - **applied events**: the shard's own subscription to the control plane's applied
//!   entries ([`ClusterHandle::subscribe`]), handed to [`on_applied`] in log order. A
//!   subscription dropped for lagging is renewed and [`resync`] runs (the tables are
//!   read, events at or below their index are skipped).
//! - **peer requests**: requests from other nodes for this shard
//!   ([`crate::cluster::peer`]), handed to [`on_peer_request`] in arrival order.
//!
//! Both dispatchers are the one place where each part of the data plane (session
//! ownership, routes and forwarding) plugs in its handler.

use std::cell::Cell;
use std::rc::Rc;

use tessera_raft::{AppliedEntry, AppliedEvent, ClusterHandle};
use tracing::{debug, info, warn};

use super::{Shard, claims, rt, takeover};
use crate::cluster::ClusterPort;
use crate::cluster::peer::{PeerKind, PeerRequest};

/// Applied events a shard's subscription holds before it is dropped for lagging.
const APPLIED_EVENTS_QUEUED_MAX: usize = 16_384;

/// What each shard takes at boot (index = shard id): where its port arrives and where
/// requests from other nodes are queued for it.
#[derive(Clone, Debug)]
pub(crate) struct ClusterEnds {
    pub(crate) attach: Vec<flume::Receiver<ClusterPort>>,
    pub(crate) requests: Vec<flume::Receiver<PeerRequest>>,
    /// Each shard's channels to the forwarder (`crate::forward`).
    pub(crate) forward: Vec<crate::forward::ShardEnd>,
}

/// The server's ends: the port's senders and the peer request queues (for the control
/// thread's `ForwardService`).
#[derive(Debug)]
pub(crate) struct ServerClusterEnds {
    pub(crate) attach: Vec<flume::Sender<ClusterPort>>,
    pub(crate) requests: Vec<flume::Sender<PeerRequest>>,
    /// The forwarder's ends, taken when the control thread starts it.
    pub(crate) forwarder: std::sync::Mutex<Option<crate::forward::ForwarderEnds>>,
}

/// Both ends for `shard_count` shards; `origin` is the process's origin tag for
/// publication ids (`forward::origin_tag` in production; see `forward::channels_with_origin`).
pub(crate) fn ends(
    shard_count: usize,
    retained_inline_bytes: usize,
    origin: u64,
) -> (ServerClusterEnds, ClusterEnds) {
    let (attach_tx, attach_rx): (Vec<_>, Vec<_>) =
        (0..shard_count).map(|_| flume::bounded(1)).unzip();
    let (req_tx, req_rx): (Vec<_>, Vec<_>) = (0..shard_count)
        .map(|_| flume::bounded(crate::cluster::peer::PEER_REQUESTS_QUEUED_MAX))
        .unzip();
    let (forwarder, forward) =
        crate::forward::channels_with_origin(shard_count, retained_inline_bytes, origin);
    (
        ServerClusterEnds {
            attach: attach_tx,
            requests: req_tx,
            forwarder: std::sync::Mutex::new(Some(forwarder)),
        },
        ClusterEnds {
            attach: attach_rx,
            requests: req_rx,
            forward,
        },
    )
}

/// A shard's cluster state, once the port arrived.
#[derive(Debug)]
pub(crate) struct ShardCluster {
    pub(crate) port: ClusterPort,
    /// The highest log index this shard has reacted to.
    pub(crate) applied: Cell<u64>,
    /// This shard's claims on the ClientIDs it owns (`claims`).
    pub(crate) claims: claims::Claims,
}

impl ShardCluster {
    pub(crate) fn handle(&self) -> &ClusterHandle {
        &self.port.handle
    }

    /// The owner of `client_id` in this node's committed table (`None` also when the
    /// table cannot be read: callers treat that as "not known").
    pub(crate) fn owner(&self, client_id: &str) -> Option<tessera_raft::store::stm::OwnerRecord> {
        self.handle()
            .tables()
            .and_then(|t| t.owner(client_id))
            .ok()
            .flatten()
    }

    /// This node no longer holds `client_id` (it handed the session out).
    pub(crate) fn forget_claim(&self, client_id: &str) {
        self.claims.forget(client_id);
    }

    /// Waits until this node applied log index `index`, at most `bound`; whether it did.
    /// (A proposal's answer and a peer's epoch can come before the local apply.)
    pub(crate) async fn applied(&self, index: u64, bound: std::time::Duration) -> bool {
        let deadline = rt::now() + bound;
        while self.handle().applied_index() < index {
            if rt::now() >= deadline {
                return false;
            }
            rt::sleep(std::time::Duration::from_millis(1)).await;
        }
        true
    }

    /// Waits until this shard reacted to log index `index` ([`on_applied`] ran for it and
    /// every entry before it), at most `bound`; whether it did. Stricter than
    /// [`ShardCluster::applied`]: the table is written before the shard's applied events
    /// are handled, so what the shard derives from the entries (a session parked for
    /// another node's claim, the claims it holds, where a held claim's session still
    /// is) can lag behind the table it reads. Only for the index of an entry that
    /// changed something (every claim does), which the shard gets as an event.
    pub(crate) async fn reacted(&self, index: u64, bound: std::time::Duration) -> bool {
        let deadline = rt::now() + bound;
        while self.applied.get() < index {
            if rt::now() >= deadline {
                return false;
            }
            rt::sleep(std::time::Duration::from_millis(1)).await;
        }
        true
    }

    /// Whether a takeover whose old owner `old` does not answer waits for it (the
    /// CONNECT refused until it is back) rather than serving a new session after its
    /// lease: `cluster.wait_for_session_owner` is on and `old` is still a member.
    pub(crate) fn waits_for(&self, old: tessera_raft::NodeId) -> bool {
        self.port.wait_for_session_owner && self.handle().members().contains_key(&old)
    }
}

/// Waits for the port, then runs the shard's applied-event and peer-request tasks.
pub(super) async fn run(shard: Rc<Shard>, ends: ClusterEnds) {
    let Some(attach) = ends.attach.get(shard.id).cloned() else {
        return;
    };
    let Some(requests) = ends.requests.get(shard.id).cloned() else {
        return;
    };
    let Ok(port) = attach.recv_async().await else {
        return;
    };
    let events = port.handle.subscribe(APPLIED_EVENTS_QUEUED_MAX);
    let cluster = Rc::new(ShardCluster {
        applied: Cell::new(port.handle.applied_index()),
        port,
        claims: claims::Claims::default(),
    });
    // Sessions that end here have their claims released (`claims::tick`).
    shard.engine.borrow_mut().track_session_ends();
    // The client log lines name the node (`tessera::clients`).
    shard.engine.borrow_mut().set_node_id(cluster.port.node_id);
    *shard.cluster.borrow_mut() = Some(cluster.clone());
    debug!(
        shard = shard.id,
        node = cluster.port.node_id,
        "cluster attached"
    );
    resync(&shard, &cluster);
    takeover::park_sessions_owned_elsewhere(&shard, &cluster);
    rt::spawn_local(serve_requests(shard.clone(), requests));
    rt::spawn_local(tick(shard.clone(), cluster.clone()));
    applied_events(shard, cluster, events).await;
}

async fn applied_events(
    shard: Rc<Shard>,
    cluster: Rc<ShardCluster>,
    mut events: flume::Receiver<AppliedEvent>,
) {
    loop {
        match events.recv_async().await {
            Ok(AppliedEvent::Entry(entry)) => {
                if entry.index <= cluster.applied.get() {
                    continue;
                }
                cluster.applied.set(entry.index);
                on_applied(&shard, &cluster, &entry);
                shard.flush_outbox();
            }
            Ok(AppliedEvent::SnapshotInstalled { index }) => {
                info!(
                    shard = shard.id,
                    index, "cluster snapshot installed: rereading the tables"
                );
                resync(&shard, &cluster);
            }
            Err(_) => {
                // Dropped for lagging (or the control plane stopped): subscribe again and
                // reread the tables.
                if shard.stopping() {
                    return;
                }
                warn!(
                    shard = shard.id,
                    "fell behind the cluster's applied entries: rereading the tables"
                );
                events = cluster.handle().subscribe(APPLIED_EVENTS_QUEUED_MAX);
                resync(&shard, &cluster);
                rt::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        // Applied entries can come in bursts: let connections run between them.
        futures_lite::future::yield_now().await;
    }
}

/// Rebuilds what the shard derives from the replicated tables (after attaching, a
/// snapshot, or a dropped subscription); later events at or below the index read are
/// skipped.
fn resync(shard: &Shard, cluster: &ShardCluster) {
    let index = cluster.handle().applied_index();
    cluster.applied.set(cluster.applied.get().max(index));
    debug!(shard = shard.id, index, "cluster tables read");
}

/// One committed entry, in log order, on every shard of this node.
fn on_applied(shard: &Shard, cluster: &ShardCluster, entry: &AppliedEntry) {
    claims::on_applied(shard, cluster, entry);
}

/// Time-driven cluster work of the shard (lazy releases of claims).
async fn tick(shard: Rc<Shard>, cluster: Rc<ShardCluster>) {
    let mut ticks = 0u64;
    while !shard.stopping() {
        rt::sleep(super::TICK).await;
        claims::tick(&shard, &cluster);
        // Shard 0 publishes `$SYS/broker/cluster/...`: the node's view, refreshed about
        // once a second (a `$SYS` round is at least a second apart).
        if shard.id == 0 && ticks.is_multiple_of(SYS_VIEW_TICKS) {
            let handle = cluster.handle();
            shard
                .engine
                .borrow_mut()
                .set_sys_cluster(tessera_shard::sys::SysCluster {
                    node_id: cluster.port.node_id,
                    leader: handle.leader(),
                    members: handle.members().len() as u64,
                });
        }
        ticks = ticks.wrapping_add(1);
        shard.flush_outbox();
    }
}

/// Ticks between two refreshes of the cluster view `$SYS` publishes.
const SYS_VIEW_TICKS: u64 = 4;

async fn serve_requests(shard: Rc<Shard>, requests: flume::Receiver<PeerRequest>) {
    while let Ok(req) = requests.recv_async().await {
        on_peer_request(&shard, req).await;
        futures_lite::future::yield_now().await;
    }
}

/// One request from another node, in arrival order.
async fn on_peer_request(shard: &Rc<Shard>, req: PeerRequest) {
    match req.envelope.kind {
        PeerKind::Publish => super::remote::on_request(shard, req).await,
        PeerKind::Retained => super::remote::on_retained_fetch(shard, req),
        // Served on its own task: it may wait for this node to apply a claim or for
        // the store to read a disk tail.
        PeerKind::Session => {
            rt::spawn_local(takeover::serve(shard.clone(), req));
        }
    }
}
