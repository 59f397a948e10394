//! The control thread: this node's part of the cluster (issue 14), beside the glommio
//! shards.
//!
//! Lifecycle: [`ClusterNode::start`] (after the shards are up, so the node's MQTT and
//! admin addresses are known) spawns the `cluster` thread with a current-thread tokio
//! runtime and waits until the QUIC link ([`tessera_raft::link`]) and the raft control
//! plane ([`tessera_raft::ControlPlane`]) are running, or returns why not
//! ([`ClusterStartError`]: `main` exits with code 2; the control plane refuses a wrong
//! node id, a peer list that disagrees with the stored one, or bad certificates before it
//! writes anything). [`ClusterNode::stop`] shuts raft and the link down.
//!
//! On the thread: the link serves the control plane's service; a membership watcher keeps
//! the link's address book equal to the raft membership (nodes added later, nodes
//! removed); with `--join`, a task dials the given address, learns the node's id from its
//! certificate and joins through it (learner, catch up, voter), retrying until it is a
//! voter. The admin thread talks to it only through a bounded channel with a timeout
//! ([`ClusterNode::view`] and the membership requests), so a stuck control thread costs
//! a 503, never a hung admin port.
//!
//! The shards (the data plane, issue 15) get a [`ClusterPort`] once the control plane
//! runs (`Server::attach_cluster`): the raft [`ClusterHandle`] (claims, routes, applied
//! events, the replicated tables) and [`peer::PeerCalls`] to call other nodes on the
//! link's Forward channel; requests from other nodes reach them through
//! [`peer::ForwardService`] (see [`peer`]).

pub mod metrics;
pub mod peer;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tessera_raft::link::{Link, LinkCerts, LinkConfig, PeerStats};
use tessera_raft::{
    Channel, ClusterHandle, ClusterMetrics, ClusterStatus, ControlPlane, NodeId, NodeInfo,
    Transport,
};

use crate::config::ClusterConfig;
use metrics::{SessionMetrics, SessionMetricsSnapshot};
use peer::{ForwardService, PeerCall, PeerCalls, PeerRequest};

/// Requests from the admin thread waiting for the control thread.
const REQUESTS_QUEUED_MAX: usize = 64;
/// How long the broker waits for the link and raft to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the membership watcher syncs the link's address book.
const MEMBERSHIP_POLL: Duration = Duration::from_millis(200);
/// Pause between two join attempts.
const JOIN_RETRY: Duration = Duration::from_secs(1);

/// Why the cluster did not start: a wrong setting or data dir; `main` exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("cluster: {0}")]
pub struct ClusterStartError(pub String);

/// What this node's addresses and shape are, for the cluster's `NodeMeta`.
#[derive(Debug, Clone)]
pub struct NodeAddrs {
    /// The first MQTT listener.
    pub mqtt: Option<SocketAddr>,
    /// The admin API.
    pub admin: SocketAddr,
    /// Shards (cores).
    pub shards: usize,
}

/// The cluster as the admin API shows it: raft's status (the leader's view when it can
/// be asked), this node's link statistics and its metric values.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// Raft status.
    pub status: ClusterStatus,
    /// This node's links to its peers.
    pub peers: Vec<PeerStats>,
    /// Control-plane metrics of this node.
    pub metrics: ClusterMetrics,
    /// The data plane's forwarder counters (`crate::forward`), once it runs.
    pub forward: Option<Arc<crate::forward::ForwardMetrics>>,
    /// Session-ownership metrics of this node's shards.
    pub sessions: SessionMetricsSnapshot,
}

/// A membership change asked for by an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Add node `id` at cluster address `addr` as a learner, then make it a voter.
    Join {
        /// The node.
        id: NodeId,
        /// Its cluster address.
        addr: SocketAddr,
    },
    /// Remove node `id`.
    Remove(NodeId),
    /// Remove this node.
    Leave,
    /// Move leadership to `to`.
    TransferLeader(NodeId),
}

enum Request {
    View {
        leader_view: bool,
        reply: flume::Sender<ClusterView>,
    },
    Change {
        change: Change,
        reply: flume::Sender<Result<u64, String>>,
    },
    /// Start the data plane's forwarder (`crate::forward`).
    Forward {
        ends: crate::forward::ForwarderEnds,
        remote: tessera_shard::mesh::ShardId,
        clocks: crate::forward::Clocks,
    },
}

/// What every shard gets from the control thread once it runs: this node's door to raft
/// and to the other nodes. `Clone + Send`; nothing in it blocks.
#[derive(Debug, Clone)]
pub struct ClusterPort {
    /// This node's id.
    pub node_id: NodeId,
    /// Proposals, applied events and the replicated tables.
    pub handle: ClusterHandle,
    /// Calls to other nodes on the Forward channel.
    pub peers: PeerCalls,
    /// Session-ownership metrics, shared by the shards.
    pub sessions: Arc<SessionMetrics>,
    /// `cluster.redirect_to_owner`: MQTT 5 clients of a session held elsewhere are
    /// redirected to its node.
    pub redirect_to_owner: bool,
    /// `cluster.wait_for_session_owner`: a takeover whose old owner cannot be reached
    /// refuses the CONNECT (the session and its messages stay there) instead of giving
    /// the client a new session after the lease (`server::claims`).
    pub wait_for_session_owner: bool,
    /// `cluster.session_lease_ms`: how long the node serves its ClientIDs without
    /// contact with the cluster (`server::claims`).
    pub session_lease: std::time::Duration,
}

/// The running control thread. Shared with the admin thread.
#[derive(Debug)]
pub struct ClusterNode {
    node_id: NodeId,
    /// When the first of the node's link certificates (its chain, the CA) expires, Unix s.
    cert_not_after: Option<i64>,
    port: ClusterPort,
    requests: flume::Sender<Request>,
    /// The forwarder's counters, once it was started.
    forward: Mutex<Option<Arc<crate::forward::ForwardMetrics>>>,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Request")
    }
}

impl ClusterNode {
    /// Starts the control thread and waits until the link and raft run (or fail).
    /// `forward`: each shard's queue for requests from other nodes (index = shard id).
    /// `forward_hold`: the longest a node holds its answer to a forwarded batch for a
    /// congested subscriber (`limits.backpressure_hold_ms_max`); a forward call may take
    /// that much longer than the link's default before the peer counts as failing.
    pub fn start(
        config: &ClusterConfig,
        data_dir: &Path,
        addrs: NodeAddrs,
        forward: Vec<flume::Sender<PeerRequest>>,
        forward_hold: Duration,
    ) -> Result<ClusterNode, ClusterStartError> {
        let error = |m: String| ClusterStartError(m);
        let (node_id, listen, certs_dir) = match (config.node_id, config.listen, &config.certs) {
            (Some(id), Some(listen), Some(certs)) => (id, listen, certs.clone()),
            _ => {
                return Err(error(
                    "cluster.node_id, listen and certs are required".into(),
                ));
            }
        };
        let peers = config
            .peer_map()
            .map_err(|e| error(format!("{}: {}", e.field, e.expected)))?;
        // Certificates first: a wrong file is the likeliest mistake and needs no thread.
        let certs = LinkCerts::load_dir(&certs_dir, node_id)
            .map_err(|e| error(format!("certificates in {}: {e}", certs_dir.display())))?;
        let cert_not_after = certs.not_after().map(|(at, date)| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            crate::transport::tls::log_cert_expiry(
                &format!("cluster {}", certs_dir.display()),
                (at, &date),
                now,
                "make new ones with `brokerctl cluster certs` from the same CA and restart the \
                 node (one at a time)",
            );
            at
        });
        let mut link_config = LinkConfig::new(node_id, listen, certs).tuned_for_election(
            Duration::from_millis(config.election_timeout_min_ms),
            Duration::from_millis(config.election_timeout_max_ms),
        );
        // A held batch (back-pressure across nodes) is not a dead peer: its done request
        // waits up to the hold, and one that times out is asked again.
        link_config.call_timeout
            [tessera_raft::link::channel_index(tessera_raft::Channel::Forward)] += forward_hold;
        link_config.peers = peers
            .iter()
            .filter(|(id, _)| **id != node_id)
            .map(|(i, a)| (*i, *a))
            .collect();

        let self_info = NodeInfo {
            cluster_addr: listen.to_string(),
            mqtt_addr: addrs.mqtt.map(|a| a.to_string()).unwrap_or_default(),
            admin_addr: addrs.admin.to_string(),
            shards: addrs.shards as u32,
        };
        let mut raft_config = tessera_raft::ClusterConfig::new(node_id, data_dir, self_info);
        raft_config.initial_voters = peers
            .iter()
            .map(|(id, addr)| (*id, NodeInfo::with_cluster_addr(addr.to_string())))
            .collect();
        raft_config.election_timeout_min_ms = config.election_timeout_min_ms;
        raft_config.election_timeout_max_ms = config.election_timeout_max_ms;
        raft_config.heartbeat_interval_ms = config.heartbeat_interval_ms;
        raft_config.snapshot_logs_since_last = config.snapshot_logs_since_last;
        raft_config.logs_kept_after_snapshot = config.logs_kept_after_snapshot;
        raft_config.validate().map_err(|e| error(e.to_string()))?;

        let (requests, inbox) = flume::bounded(REQUESTS_QUEUED_MAX);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (peers, calls) = PeerCalls::new(peer::PEER_CALLS_QUEUED_MAX);
        let join = config.join;
        let redirect_to_owner = config.redirect_to_owner;
        let wait_for_session_owner = config.wait_for_session_owner;
        let session_lease = config.session_lease();
        let thread = std::thread::Builder::new()
            .name("cluster".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started_tx.send(Err(format!(
                            "cannot start the control thread's runtime: {e}"
                        )));
                        return;
                    }
                };
                runtime.block_on(control_thread(
                    link_config,
                    raft_config,
                    join,
                    Ports {
                        inbox,
                        calls,
                        forward,
                    },
                    stop_rx,
                    started_tx,
                ));
            })
            .map_err(|e| error(format!("cannot spawn the control thread: {e}")))?;
        match started_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(handle)) => Ok(ClusterNode {
                node_id,
                cert_not_after,
                port: ClusterPort {
                    node_id,
                    handle,
                    peers,
                    sessions: Arc::new(SessionMetrics::default()),
                    redirect_to_owner,
                    wait_for_session_owner,
                    session_lease,
                },
                requests,
                forward: Mutex::new(None),
                stop: Mutex::new(Some(stop_tx)),
                thread: Mutex::new(Some(thread)),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(error(e))
            }
            Err(_) => Err(error(format!(
                "the link and raft did not start within {START_TIMEOUT:?}"
            ))),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// When the first of this node's link certificates (its chain, the CA) stops being
    /// valid, seconds since the Unix epoch.
    pub fn cert_not_after(&self) -> Option<i64> {
        self.cert_not_after
    }

    /// What the shards need to reach raft and the other nodes.
    pub fn port(&self) -> ClusterPort {
        self.port.clone()
    }

    /// The cluster now: the leader's view when `leader_view` (members' match index and
    /// lag), this node's own otherwise; `None` if the control thread did not answer in
    /// `timeout`.
    pub fn view(&self, leader_view: bool, timeout: Duration) -> Option<ClusterView> {
        let (reply, answer) = flume::bounded(1);
        self.requests
            .try_send(Request::View { leader_view, reply })
            .ok()?;
        let mut view = answer.recv_timeout(timeout).ok()?;
        view.forward = self
            .forward
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        view.sessions = self.port.sessions.snapshot();
        Some(view)
    }

    /// Makes a membership change (through the leader); the log index it committed at.
    pub fn change(&self, change: Change, timeout: Duration) -> Result<u64, String> {
        let (reply, answer) = flume::bounded(1);
        self.requests
            .try_send(Request::Change { change, reply })
            .map_err(|_| "the control thread is busy".to_owned())?;
        answer
            .recv_timeout(timeout)
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }

    /// Starts the data plane's forwarder on the control thread (`crate::forward`), with
    /// the shards' ends from `Server::take_forwarder`.
    pub fn start_forwarder(
        &self,
        ends: crate::forward::ForwarderEnds,
        remote: tessera_shard::mesh::ShardId,
        clocks: crate::forward::Clocks,
    ) -> Result<(), String> {
        *self.forward.lock().unwrap_or_else(|e| e.into_inner()) = Some(ends.metrics());
        self.requests
            .try_send(Request::Forward {
                ends,
                remote,
                clocks,
            })
            .map_err(|_| "the control thread is busy or stopped".to_owned())
    }

    /// Stops raft and the link, and waits for the thread.
    pub fn stop(&self) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

/// The control thread's queues: admin requests, the shards' calls to other nodes, and
/// the shards' queues for requests from other nodes.
struct Ports {
    inbox: flume::Receiver<Request>,
    calls: flume::Receiver<PeerCall>,
    forward: Vec<flume::Sender<PeerRequest>>,
}

async fn control_thread(
    link_config: LinkConfig,
    raft_config: tessera_raft::ClusterConfig,
    join: Option<SocketAddr>,
    ports: Ports,
    stop: tokio::sync::oneshot::Receiver<()>,
    started: std::sync::mpsc::Sender<Result<ClusterHandle, String>>,
) {
    let Ports {
        inbox,
        calls,
        forward,
    } = ports;
    let node_id = raft_config.node_id;
    let raft_dir = raft_config.data_dir.join("raft");
    let initial: BTreeSet<NodeId> = raft_config.initial_voters.keys().copied().collect();
    let link = match Link::start(link_config) {
        Ok(link) => link,
        Err(e) => {
            let _ = started.send(Err(e.to_string()));
            return;
        }
    };
    let transport: Arc<dyn Transport> = Arc::new(link.clone());
    let (cp, service) = match ControlPlane::start(raft_config, transport).await {
        Ok(started) => started,
        Err(e) => {
            link.shutdown();
            let _ = started.send(Err(e.to_string()));
            return;
        }
    };
    link.set_service(service);
    cp.serve_forward(Arc::new(ForwardService::new(forward)));
    // A node joining through an address learns there at once whether the cluster accepts
    // its certificate: a certificate from another CA is a wrong setting (exit code 2),
    // an unreachable seed is retried in the background.
    if let Some(addr) = join
        && let Err(e) = link.discover(addr).await
    {
        let reason = e.to_string();
        if reason.contains("not signed by this cluster's CA")
            || reason.contains("refused this node's certificate")
        {
            cp.shutdown().await;
            link.shutdown();
            let _ = started.send(Err(format!(
                "the node at --join {addr} refused the handshake: {reason}"
            )));
            return;
        }
    }
    let cp = Arc::new(cp);
    let _ = started.send(Ok(cp.handle()));
    tracing::info!(node = node_id, "cluster control plane running");

    let mut tasks = vec![tokio::spawn(watch_membership(
        cp.clone(),
        link.clone(),
        initial,
    ))];
    if let Some(addr) = join {
        tasks.push(tokio::spawn(join_through(cp.clone(), link.clone(), addr)));
    }
    tasks.push(tokio::spawn(serve_calls(Arc::new(link.clone()), calls)));
    tasks.push(tokio::spawn(exit_when_raft_stops(cp.clone(), raft_dir)));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            request = inbox.recv_async() => {
                let Ok(request) = request else { break };
                // Each request on its own task: a slow membership change never delays a
                // status read.
                tasks.retain(|t| !t.is_finished());
                tasks.push(tokio::spawn(answer(cp.clone(), link.clone(), request)));
            }
        }
    }
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    match Arc::try_unwrap(cp) {
        Ok(cp) => cp.shutdown().await,
        Err(_) => tracing::warn!("the control plane is still referenced; not waiting for it"),
    }
    link.shutdown();
    tracing::info!(node = node_id, "cluster control plane stopped");
}

async fn answer(cp: Arc<ControlPlane>, link: Link, request: Request) {
    match request {
        Request::View { leader_view, reply } => {
            // This node's own status, with the members as the leader sees them (their
            // match index and lag are known there) and their addresses from the NodeMeta
            // table (the membership knows only the cluster address of initial voters).
            let mut status = cp.status();
            if leader_view {
                status.members = cp.cluster_status().await.members;
            }
            if let Ok(nodes) = cp.handle().tables().and_then(|t| t.nodes()) {
                for member in &mut status.members {
                    if let Some((_, info)) = nodes.iter().find(|(id, _)| *id == member.id) {
                        member.info = info.clone();
                    }
                }
            }
            let _ = reply.send(ClusterView {
                status,
                peers: link.peers(),
                metrics: cp.metrics(),
                forward: None,
                sessions: SessionMetricsSnapshot::default(),
            });
        }
        Request::Change { change, reply } => {
            let result = match change {
                Change::Join { id, addr } => {
                    let info = NodeInfo::with_cluster_addr(addr.to_string());
                    link.set_peer(id, addr);
                    match cp.add_learner(id, info).await {
                        Ok(_) => cp.promote(id).await,
                        Err(e) => Err(e),
                    }
                }
                Change::Remove(id) => cp.remove(id).await,
                Change::Leave => cp.leave().await,
                Change::TransferLeader(to) => cp.transfer_leader(to).await.map(|()| 0),
            };
            let _ = reply.send(result.map_err(|e| e.to_string()));
        }
        Request::Forward {
            ends,
            remote,
            clocks,
        } => {
            let transport: Arc<dyn Transport> = Arc::new(link);
            crate::forward::start(ends, cp.handle(), transport, remote, clocks);
        }
    }
}

/// Ends the process when raft stops on this node by itself (a storage error: a full
/// disk, an I/O error). openraft never restarts a stopped raft, so the node would stay
/// up as a member that can neither vote nor commit: every CONNECT refused (no claim can
/// commit), its sessions fenced after the lease, and nothing to recover it but a
/// restart. Ending it at once, with one line naming the store and what to do, lets its
/// clients reconnect to other nodes now and its supervisor start it again (after the
/// operator freed space, it rejoins and catches up). Not a graceful stop: the shard
/// stores on the same full disk may never commit again, and an end without waiting is
/// the state of a `kill -9` that persistence is built for (nothing acknowledged lost).
async fn exit_when_raft_stops(cp: Arc<ControlPlane>, raft_dir: std::path::PathBuf) {
    let Some(reason) = cp.stopped().await else {
        return;
    };
    let code = crate::fatal::RAFT_STOPPED_EXIT_CODE;
    tracing::error!(
        node = cp.node_id(),
        "raft stopped on this node: {reason}; the raft store is {}. A member that cannot \
         write its raft store cannot vote or commit: the node ends now (exit code {code}) \
         and its clients reconnect to the other nodes. If the disk is full, free space on \
         it and start the node again: it rejoins and catches up",
        raft_dir.display()
    );
    crate::fatal::exit_now(code)
}

/// Sends the shards' calls to other nodes, each on its own task (a slow peer never
/// delays a call to another); the link bounds each call's time.
/// (The data-plane simulation serves its nodes' calls over `MemNet` with it too.)
pub(crate) async fn serve_calls(transport: Arc<dyn Transport>, calls: flume::Receiver<PeerCall>) {
    while let Ok(call) = calls.recv_async().await {
        let transport = transport.clone();
        tokio::spawn(async move {
            let answer = transport
                .call(call.to, Channel::Forward, call.request)
                .await;
            let _ = call.reply.send(answer);
        });
    }
}

/// Keeps the link's address book equal to the raft membership: members added later get
/// dialed, members removed are forgotten (the initial voters stay until the membership
/// is known).
async fn watch_membership(cp: Arc<ControlPlane>, link: Link, initial: BTreeSet<NodeId>) {
    let me = cp.node_id();
    let mut known: BTreeMap<NodeId, SocketAddr> = BTreeMap::new();
    let mut ever_members: BTreeSet<NodeId> = initial;
    loop {
        let members = cp.handle().members();
        if !members.is_empty() {
            for (id, info) in &members {
                if *id == me {
                    continue;
                }
                ever_members.insert(*id);
                let Ok(addr) = info.cluster_addr.parse::<SocketAddr>() else {
                    tracing::warn!(node = me, peer = id, addr = %info.cluster_addr, "member has an unusable cluster address");
                    continue;
                };
                if known.get(id) != Some(&addr) {
                    link.set_peer(*id, addr);
                    known.insert(*id, addr);
                }
            }
            let gone: Vec<NodeId> = ever_members
                .iter()
                .filter(|id| **id != me && !members.contains_key(id))
                .copied()
                .collect();
            for id in gone {
                tracing::info!(
                    node = me,
                    peer = id,
                    "node left the cluster; closing its link"
                );
                link.remove_peer(id);
                known.remove(&id);
                ever_members.remove(&id);
            }
        }
        tokio::time::sleep(MEMBERSHIP_POLL).await;
    }
}

/// `--join ADDR`: find which node listens at `addr`, then join through it until this
/// node is a voter.
async fn join_through(cp: Arc<ControlPlane>, link: Link, addr: SocketAddr) {
    let me = cp.node_id();
    loop {
        match link.discover(addr).await {
            Ok(via) => match cp.join(via).await {
                Ok(index) => {
                    tracing::info!(node = me, via, index, "joined the cluster as a voter");
                    return;
                }
                Err(e) => {
                    tracing::warn!(node = me, via, "joining the cluster failed, retrying: {e}")
                }
            },
            Err(e) => {
                tracing::warn!(node = me, %addr, "cannot reach the node to join through, retrying: {e}")
            }
        }
        tokio::time::sleep(JOIN_RETRY).await;
    }
}
