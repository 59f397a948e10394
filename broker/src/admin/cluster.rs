//! The cluster endpoints of the admin API (`/api/v1/cluster...`) and the cluster metrics
//! of `/metrics`. Everything asks the control thread ([`crate::cluster::ClusterNode`])
//! with a timeout; a node without a cluster answers 404 `no_cluster`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tessera_raft::metrics::HistogramSnapshot;

use super::api::AdminState;
use super::http::{Request, Response};
use crate::cluster::{Change, ClusterNode, ClusterView};

/// How long a status read may wait for the control thread (and the leader).
pub const VIEW_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a membership change may take (a joining node catches up first).
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

fn node(state: &AdminState) -> Result<&ClusterNode, Response> {
    state.cluster.as_deref().ok_or_else(|| {
        Response::error(
            404,
            "no_cluster",
            "this broker runs as a single node (no cluster settings)",
        )
    })
}

/// The cluster document (this node's view, members as the leader sees them): members with addresses, role, reachability, match index and
/// lag; term, commit, applied and leader.
pub fn document(view: &ClusterView) -> Value {
    let s = &view.status;
    let members: Vec<Value> = s
        .members
        .iter()
        .map(|m| {
            let peer = view.peers.iter().find(|p| p.id == m.id);
            let reachable = m.id == s.node_id || peer.is_some_and(|p| p.reachable);
            json!({
                "id": m.id,
                "cluster_addr": m.info.cluster_addr,
                "mqtt_addr": m.info.mqtt_addr,
                "admin_addr": m.info.admin_addr,
                "shards": m.info.shards,
                "role": m.role.as_str(),
                "reachable": reachable,
                "rtt_ms": peer.and_then(|p| p.rtt).map(|d| d.as_secs_f64() * 1000.0),
                "last_error": peer.and_then(|p| p.last_error.clone()),
                "match_index": m.match_index,
                "lag": m.lag,
            })
        })
        .collect();
    json!({
        "node_id": s.node_id,
        "role": s.role.as_str(),
        "term": s.term,
        "leader": s.leader,
        "last_log_index": s.last_log_index,
        "commit_index": s.commit_index,
        "applied_index": s.applied_index,
        "snapshot_index": s.snapshot_index,
        "purged_index": s.purged_index,
        "ready": s.ready,
        "error": s.error,
        "members": members,
    })
}

/// `GET /api/v1/cluster`.
pub fn status(state: &AdminState, _: &Request, _: &[String]) -> Response {
    let node = match node(state) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match node.view(true, VIEW_TIMEOUT) {
        Some(view) => Response::json(200, &document(&view)),
        None => Response::error(
            503,
            "cluster_unavailable",
            "the control thread did not answer",
        ),
    }
}

fn change(state: &AdminState, change: Change) -> Response {
    let node = match node(state) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match node.change(change.clone(), CHANGE_TIMEOUT) {
        Ok(index) => Response::json(
            200,
            &json!({ "done": format!("{change:?}"), "index": index }),
        ),
        Err(e) => Response::error(409, "cluster_refused", e),
    }
}

fn id_param(value: Option<&str>, name: &str) -> Result<u64, Response> {
    value
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            Response::error(
                400,
                "bad_parameter",
                format!("{name} must be a node id (1 or more)"),
            )
        })
}

/// `POST /api/v1/cluster/members?id=N&addr=ADDR:PORT`: add a node (learner, then voter).
pub fn join(state: &AdminState, req: &Request, _: &[String]) -> Response {
    let id = match id_param(req.param("id"), "id") {
        Ok(id) => id,
        Err(r) => return r,
    };
    let Some(addr) = req.param("addr").and_then(|a| a.parse::<SocketAddr>().ok()) else {
        return Response::error(
            400,
            "bad_parameter",
            "addr must be the node's cluster ADDR:PORT",
        );
    };
    change(state, Change::Join { id, addr })
}

/// `DELETE /api/v1/cluster/members/{id}`.
pub fn remove(state: &AdminState, _: &Request, params: &[String]) -> Response {
    match id_param(params.first().map(String::as_str), "the member id") {
        Ok(id) => change(state, Change::Remove(id)),
        Err(r) => r,
    }
}

/// `POST /api/v1/cluster/leave`: this node leaves.
pub fn leave(state: &AdminState, _: &Request, _: &[String]) -> Response {
    change(state, Change::Leave)
}

/// `POST /api/v1/cluster/leader?to=N`.
pub fn transfer_leader(state: &AdminState, req: &Request, _: &[String]) -> Response {
    match id_param(req.param("to"), "to") {
        Ok(to) => change(state, Change::TransferLeader(to)),
        Err(r) => r,
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

fn histogram(out: &mut String, name: &str, help: &str, h: &HistogramSnapshot, scale: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (bound, count) in &h.buckets {
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {count}",
            *bound as f64 * scale
        );
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum as f64 * scale);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

/// Appends the cluster metrics to a Prometheus text exposition.
pub fn render_metrics(view: &ClusterView, out: &mut String) {
    let m = &view.metrics;
    let s = &view.status;
    metric(
        out,
        "tessera_cluster_term",
        "gauge",
        "Current raft term.",
        m.term,
    );
    metric(
        out,
        "tessera_cluster_has_leader",
        "gauge",
        "1 when this node knows a leader.",
        u8::from(m.leader.is_some()),
    );
    metric(
        out,
        "tessera_cluster_is_leader",
        "gauge",
        "1 when this node is the leader.",
        u8::from(m.leader == Some(s.node_id)),
    );
    metric(
        out,
        "tessera_cluster_leader_changes_total",
        "counter",
        "Times a new leader became known to this node.",
        m.leader_changes,
    );
    metric(
        out,
        "tessera_cluster_last_log_index",
        "gauge",
        "Last raft log index.",
        m.last_log_index,
    );
    metric(
        out,
        "tessera_cluster_commit_index",
        "gauge",
        "Committed raft index known here.",
        m.commit_index,
    );
    metric(
        out,
        "tessera_cluster_applied_index",
        "gauge",
        "Index the tables reflect.",
        m.applied_index,
    );
    metric(
        out,
        "tessera_cluster_apply_lag_entries",
        "gauge",
        "Committed entries not yet applied here.",
        m.apply_lag,
    );
    metric(
        out,
        "tessera_cluster_member_ready",
        "gauge",
        "1 when this node is a caught-up member that knows a leader.",
        u8::from(s.ready),
    );
    metric(
        out,
        "tessera_cluster_proposals_total",
        "counter",
        "Ops proposed by this node.",
        m.proposals,
    );
    metric(
        out,
        "tessera_cluster_proposals_busy_total",
        "counter",
        "Ops refused because the proposal channel was full.",
        m.proposals_busy,
    );
    metric(
        out,
        "tessera_cluster_proposals_failed_total",
        "counter",
        "Ops that failed (no leader in time, shutdown).",
        m.proposals_failed,
    );
    metric(
        out,
        "tessera_cluster_ops_applied_total",
        "counter",
        "Ops applied.",
        m.ops_applied,
    );
    metric(
        out,
        "tessera_cluster_entries_applied_total",
        "counter",
        "Log entries applied.",
        m.entries_applied,
    );
    histogram(
        out,
        "tessera_cluster_ops_per_entry",
        "Ops per log entry proposed by this node.",
        &m.ops_per_entry,
        1.0,
    );
    histogram(
        out,
        "tessera_cluster_proposal_commit_seconds",
        "Time from proposal to the op applied on this node.",
        &m.commit_latency_us,
        1e-6,
    );
    metric(
        out,
        "tessera_cluster_snapshots_built_total",
        "counter",
        "Raft snapshots built here.",
        m.snapshots_built,
    );
    metric(
        out,
        "tessera_cluster_snapshots_installed_total",
        "counter",
        "Raft snapshots installed from a leader.",
        m.snapshots_installed,
    );
    metric(
        out,
        "tessera_cluster_snapshots_refused_total",
        "counter",
        "Raft snapshots from a leader refused because they did not parse.",
        m.snapshots_refused,
    );
    metric(
        out,
        "tessera_cluster_snapshot_last_bytes",
        "gauge",
        "Size of the last raft snapshot.",
        m.snapshot_last_bytes,
    );
    let _ = writeln!(
        out,
        "# HELP tessera_cluster_peer_reachable 1 when the link to the peer is up.\n\
         # TYPE tessera_cluster_peer_reachable gauge"
    );
    for p in &view.peers {
        let _ = writeln!(
            out,
            "tessera_cluster_peer_reachable{{peer=\"{}\"}} {}",
            p.id,
            u8::from(p.reachable)
        );
    }
    let _ = writeln!(
        out,
        "# HELP tessera_cluster_peer_rtt_seconds Smoothed round-trip time of the link to the peer.\n\
         # TYPE tessera_cluster_peer_rtt_seconds gauge"
    );
    for p in view.peers.iter().filter(|p| p.rtt.is_some()) {
        let rtt = p.rtt.map_or(0.0, |d| d.as_secs_f64());
        let _ = writeln!(
            out,
            "tessera_cluster_peer_rtt_seconds{{peer=\"{}\"}} {rtt}",
            p.id
        );
    }
    let _ = writeln!(
        out,
        "# HELP tessera_cluster_peer_calls_failed_total Calls to the peer that failed (timeout, unreachable).\n\
         # TYPE tessera_cluster_peer_calls_failed_total counter"
    );
    for p in &view.peers {
        let _ = writeln!(
            out,
            "tessera_cluster_peer_calls_failed_total{{peer=\"{}\"}} {}",
            p.id, p.calls_failed
        );
    }
    render_session_metrics(&view.sessions, out);
    if let Some(f) = &view.forward {
        render_forward(f, out);
    }
}

/// The forwarder's counters (`crate::forward`): per peer, and the route tables.
fn render_forward(f: &crate::forward::ForwardMetrics, out: &mut String) {
    use std::sync::atomic::Ordering::Relaxed;
    let peers = f.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut peers: Vec<_> = peers.into_iter().collect();
    peers.sort_by_key(|(id, _)| *id);
    type Get = fn(&crate::forward::PeerCounters) -> u64;
    let per_peer: [(&str, &str, Get); 6] = [
        (
            "tessera_cluster_forward_messages_total",
            "Publications sent to the peer (accepted by it).",
            |c| c.messages,
        ),
        (
            "tessera_cluster_forward_batches_total",
            "Batches of publications sent to the peer.",
            |c| c.batches,
        ),
        (
            "tessera_cluster_forward_bytes_total",
            "Bytes of the batches sent to the peer.",
            |c| c.bytes,
        ),
        (
            "tessera_cluster_forward_retries_total",
            "Batches re-sent to the peer after a failed call.",
            |c| c.retries,
        ),
        (
            "tessera_cluster_forward_dropped_total",
            "QoS 0 publications dropped because the peer's queue was full.",
            |c| c.dropped,
        ),
        (
            "tessera_cluster_forward_hints_written_total",
            "Batches for the peer written to the hint store (it had not answered for the session lease); their publishers were answered then.",
            |c| c.hints_written,
        ),
    ];
    for (name, help, get) in per_peer {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (id, c) in &peers {
            let _ = writeln!(out, "{name}{{peer=\"{id}\"}} {}", get(c));
        }
    }
    let hinted: [(&str, &str, Get); 2] = [
        (
            "tessera_cluster_forward_hinted_batches",
            "Batches for the peer kept in this node's hint store now, sent when it answers.",
            |c| c.hinted_batches,
        ),
        (
            "tessera_cluster_forward_hinted_bytes",
            "Bytes of the batches for the peer kept in this node's hint store now.",
            |c| c.hinted_bytes,
        ),
    ];
    for (name, help, get) in hinted {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (id, c) in &peers {
            let _ = writeln!(out, "{name}{{peer=\"{id}\"}} {}", get(c));
        }
    }
    metric(
        out,
        "tessera_cluster_forward_hint_budget_bytes",
        "gauge",
        "cluster.hint_budget_bytes: at this many bytes of hints (all peers) publishers wait for an unreachable peer again; 0: hints off.",
        f.hint_budget_bytes.load(Relaxed),
    );
    metric(
        out,
        "tessera_cluster_forward_hint_write_errors_total",
        "counter",
        "Writes to the hint store that failed (hints stop for that peer; its publishers wait for it).",
        f.hint_write_errors.load(Relaxed),
    );
    let routes = f
        .routes_per_node
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut routes: Vec<_> = routes.into_iter().collect();
    routes.sort_by_key(|(id, _)| *id);
    let _ = writeln!(
        out,
        "# HELP tessera_cluster_routes Routes (filters and shared groups) of each node, as this node's table has them.\n\
         # TYPE tessera_cluster_routes gauge"
    );
    let _ = writeln!(
        out,
        "tessera_cluster_routes{{node=\"self\"}} {}",
        f.local_routes.load(Relaxed)
    );
    for (id, n) in routes {
        let _ = writeln!(out, "tessera_cluster_routes{{node=\"{id}\"}} {n}");
    }
    let mut members: Vec<_> = f
        .shared_members
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .into_iter()
        .collect();
    members.sort_by_key(|(id, _)| *id);
    let _ = writeln!(
        out,
        "# HELP tessera_cluster_shared_members Connected members of shared subscriptions on each node (summed over its groups), as it last told this node; node=\"self\" for this node's own.\n\
         # TYPE tessera_cluster_shared_members gauge"
    );
    for (id, n) in members {
        if id == 0 {
            let _ = writeln!(out, "tessera_cluster_shared_members{{node=\"self\"}} {n}");
        } else {
            let _ = writeln!(out, "tessera_cluster_shared_members{{node=\"{id}\"}} {n}");
        }
    }
    metric(
        out,
        "tessera_cluster_forward_received_total",
        "counter",
        "Publications received from other nodes.",
        f.received.load(Relaxed),
    );
    metric(
        out,
        "tessera_cluster_forward_duplicates_total",
        "counter",
        "Batches received again after a lost answer (answered, not delivered again).",
        f.duplicates.load(Relaxed),
    );
    metric(
        out,
        "tessera_cluster_route_barriers_total",
        "counter",
        "Route barriers answered for other nodes.",
        f.barriers.load(Relaxed),
    );
    metric(
        out,
        "tessera_cluster_shared_handed_back_total",
        "counter",
        "Shared-subscription publications another node chose this node for after its members left, handed back to the group on another node.",
        f.shared_handed_back.load(Relaxed),
    );
    metric(
        out,
        "tessera_cluster_shared_dropped_total",
        "counter",
        "Shared-subscription publications for other nodes that no node had members for any more.",
        f.shared_dropped.load(Relaxed),
    );
    metric(
        out,
        "tessera_cluster_redirected_total",
        "counter",
        "Publications that matched a session after it moved to another node, sent on to that node.",
        f.redirected.load(Relaxed),
    );
}

/// The data plane's session-ownership metrics (issue 15).
fn render_session_metrics(m: &crate::cluster::metrics::SessionMetricsSnapshot, out: &mut String) {
    let counters: [(&str, &str, u64); 14] = [
        (
            "tessera_cluster_session_claims_total",
            "CONNECTs that needed a raft claim and got it.",
            m.claims,
        ),
        (
            "tessera_cluster_session_claims_held_total",
            "CONNECTs served by a claim this node already held (no raft write).",
            m.claims_held,
        ),
        (
            "tessera_cluster_session_claims_refused_total",
            "CONNECTs refused with 0x88 / 0x03 because no claim committed in time.",
            m.claims_refused,
        ),
        (
            "tessera_cluster_session_owner_waits_total",
            "CONNECTs refused with 0x88 / 0x03 because the node holding their session could not be reached (cluster.wait_for_session_owner): the session moves once that node is back.",
            m.owner_waits,
        ),
        (
            "tessera_cluster_session_releases_total",
            "Claims released after their session ended here.",
            m.releases,
        ),
        (
            "tessera_cluster_session_takeovers_total",
            "Claims that took a ClientID over from another node.",
            m.takeovers,
        ),
        (
            "tessera_cluster_session_takeover_failures_total",
            "Takeovers whose session could not be fetched or imported.",
            m.takeover_failures,
        ),
        (
            "tessera_cluster_sessions_exported_total",
            "Sessions handed out to another node.",
            m.sessions_exported,
        ),
        (
            "tessera_cluster_sessions_taken_over_here_total",
            "Live connections ended here because another node claimed their ClientID.",
            m.taken_over_here,
        ),
        (
            "tessera_cluster_sessions_fenced_total",
            "Live connections ended because the node was out of touch with its cluster for longer than cluster.session_lease_ms.",
            m.fenced,
        ),
        (
            "tessera_cluster_session_redirects_total",
            "MQTT 5 CONNECTs redirected to the node holding their session (0x9C).",
            m.redirects,
        ),
        (
            "tessera_cluster_session_tail_deliveries_moved_total",
            "Queued deliveries read from an old owner's disk tail at takeovers.",
            m.tail_deliveries_moved,
        ),
        (
            "tessera_cluster_session_confirm_failures_total",
            "Takeovers not confirmed to the old owner (it keeps its copy until the session would expire).",
            m.confirm_failures,
        ),
        (
            "tessera_cluster_session_moving_copies_recovered_total",
            "Sessions recovered from an old owner's copy after the node they went to never confirmed them.",
            m.moving_copies_recovered,
        ),
    ];
    for (name, help, value) in counters {
        metric(out, name, "counter", help, value);
    }
    histogram(
        out,
        "tessera_cluster_session_takeover_seconds",
        "From the new owner's committed claim to the session imported (cross-node takeover).",
        &m.takeover_us,
        1e-6,
    );
}
