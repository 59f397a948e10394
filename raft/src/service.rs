//! The server side of the raft RPCs: what a node does with a request from a peer.
//!
//! [`RaftService`] implements the transport's [`Service`]: it decodes (bytes from a peer
//! are untrusted), checks the request against the authenticated sender id, and hands it to
//! the local raft. Admin requests run on the leader (others forward them, at most
//! `ADMIN_HOPS_MAX` hops); `Forward` requests go to the data plane's handler once one is
//! registered.
//!
//! Snapshot chunks are checked as they stream in ([`SnapshotCheck`]); a snapshot that
//! does not parse is refused before its last chunk reaches raft (openraft treats a failed
//! install as a fatal storage error and would stop raft on this node), so a corrupt or
//! lying peer's snapshot costs a retry, not the node.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use openraft::raft::AppendEntriesResponse;

use crate::control::Inner;
use crate::rpc::{
    self, AdminReply, AdminRequest, ProposeRefusal, RaftReply, RaftRequest, SnapshotReply,
};
use crate::store::lock;
use crate::store::snapshot::SnapshotCheck;
use crate::transport::{BoxFuture, Channel, NodeId, Service};

/// Dispatches incoming RPCs to the local raft node.
pub struct RaftService {
    inner: Arc<Inner>,
    /// The snapshot stream being received, checked chunk by chunk.
    snapshot_check: Mutex<Option<SnapshotCheck>>,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService").finish_non_exhaustive()
    }
}

impl RaftService {
    pub(crate) fn new(inner: Arc<Inner>) -> RaftService {
        RaftService {
            inner,
            snapshot_check: Mutex::new(None),
        }
    }

    async fn raft(&self, from: NodeId, bytes: &[u8]) -> Result<Bytes, String> {
        let req: RaftRequest = rpc::decode(bytes)?;
        let reply = match req {
            RaftRequest::Append(req) => {
                if req.vote.leader_id.voted_for() != Some(from) {
                    return Err(format!(
                        "append-entries from node {from} claims to come from leader {:?}",
                        req.vote.leader_id.voted_for()
                    ));
                }
                rpc::validate_append(&req)?;
                let r = self.inner.raft.append_entries(req).await;
                if let Ok(
                    AppendEntriesResponse::Success
                    | AppendEntriesResponse::PartialSuccess(_)
                    | AppendEntriesResponse::Conflict,
                ) = &r
                {
                    // The current leader reached us (a stale one gets `HigherVote`).
                    self.inner.note_leader_contact();
                }
                RaftReply::Append(r)
            }
            RaftRequest::Vote(req) => {
                if req.vote.leader_id.voted_for() != Some(from) {
                    return Err(format!(
                        "vote request from node {from} names candidate {:?}",
                        req.vote.leader_id.voted_for()
                    ));
                }
                RaftReply::Vote(self.inner.raft.vote(req).await)
            }
            RaftRequest::Propose(data) => {
                let r = match data.check_shape() {
                    Err(e) => Err(ProposeRefusal::Malformed(e.to_string())),
                    Ok(proposer) if proposer != from => Err(ProposeRefusal::Malformed(format!(
                        "batch of node {proposer} sent by node {from}"
                    ))),
                    Ok(_) => self.inner.write_as_leader(data).await,
                };
                RaftReply::Propose(r)
            }
        };
        Ok(rpc::encode(&reply))
    }

    async fn snapshot(&self, from: NodeId, bytes: &[u8]) -> Result<Bytes, String> {
        let req: openraft::raft::InstallSnapshotRequest<crate::types::TypeConfig> =
            rpc::decode(bytes)?;
        if req.vote.leader_id.voted_for() != Some(from) {
            return Err(format!(
                "snapshot from node {from} claims to come from leader {:?}",
                req.vote.leader_id.voted_for()
            ));
        }
        let id = req.meta.snapshot_id.clone();
        let verdict = {
            let mut check = lock(&self.snapshot_check);
            if req.offset == 0 {
                *check = Some(SnapshotCheck::new(&id));
            }
            let verdict = match check.as_mut() {
                Some(c) if c.continues(&id, req.offset) => c
                    .feed(&req.data)
                    .and_then(|()| if req.done { c.finish() } else { Ok(()) }),
                _ => Err(format!(
                    "chunk at offset {} does not continue a stream this node checked",
                    req.offset
                )),
            };
            if verdict.is_err() || req.done {
                *check = None;
            }
            verdict
        };
        if let Err(reason) = verdict {
            self.inner.note_snapshot_refused();
            tracing::warn!(
                from,
                snapshot = %id,
                %reason,
                "refused a snapshot from the leader: it does not parse; raft keeps running \
                 and the leader will send it again"
            );
            return Err(format!("snapshot {id} refused by the receiver: {reason}"));
        }
        let reply: SnapshotReply = self.inner.raft.install_snapshot(req).await;
        Ok(rpc::encode(&reply))
    }

    async fn admin(&self, bytes: &[u8]) -> Result<Bytes, String> {
        let (hops, req): (u8, AdminRequest) = rpc::decode(bytes)?;
        let reply: Result<AdminReply, String> = match req {
            // Addressed to this node, whatever its role.
            AdminRequest::ElectAfter { after_ms } => {
                let raft = self.inner.raft.clone();
                let after_ms = after_ms.min(self.inner.config.election_timeout_max_ms * 4);
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(after_ms)).await;
                    let _ = raft.trigger().elect().await;
                });
                Ok(AdminReply::Done { index: 0 })
            }
            req => self.inner.admin(req, hops).await.map_err(|e| e.to_string()),
        };
        Ok(rpc::encode(&reply))
    }
}

impl Service for RaftService {
    fn serve(
        &self,
        from: NodeId,
        channel: Channel,
        request: Bytes,
    ) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            match channel {
                Channel::Raft => self.raft(from, &request).await,
                Channel::Snapshot => self.snapshot(from, &request).await,
                Channel::Admin => self.admin(&request).await,
                Channel::Forward => {
                    let svc = lock(&self.inner.forward).clone();
                    match svc {
                        Some(s) => s.serve(from, channel, request).await,
                        None => Err("this node serves no forwarded publishes yet".into()),
                    }
                }
            }
        })
    }
}
