//! The messages nodes exchange on the transport's channels, and their validated decoding.
//!
//! Encoding: bincode (varint integers) with a size limit of [`RPC_BYTES_MAX`] and no
//! trailing bytes. Every request is decoded with [`decode`] (bytes from a peer are
//! untrusted: a bad frame is an error answer, never a panic), then checked for what
//! openraft itself assumes (e.g. consecutive entries), so a buggy or lying peer cannot
//! trip an assertion inside openraft.
//!
//! | channel | request | response |
//! |---|---|---|
//! | `Raft` | [`RaftRequest`] | [`RaftReply`] |
//! | `Snapshot` | `InstallSnapshotRequest` | `Result<InstallSnapshotResponse, RaftError<InstallSnapshotError>>` |
//! | `Admin` | [`AdminRequest`] | `Result<`[`AdminReply`]`, String>` |
//! | `Forward` | owned by the data plane (see `ControlPlane::serve_forward`) | |

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::op::{BatchResult, EntryData};
use crate::status::ClusterStatus;
use crate::transport::NodeId;
use crate::types::{NodeInfo, TypeConfig};

pub use crate::network::RPC_BYTES_MAX;

/// A request on [`Channel::Raft`](crate::transport::Channel::Raft).
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    /// Append-entries (and heartbeats) from the leader.
    Append(AppendEntriesRequest<TypeConfig>),
    /// A candidate asks for a vote.
    Vote(VoteRequest<NodeId>),
    /// A follower's batch for the leader to propose (one log entry).
    Propose(EntryData),
}

/// Why the leader did not take a proposed batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProposeRefusal {
    /// This node is not the leader; `leader` is, if known.
    NotLeader {
        /// The leader this node knows of.
        leader: Option<NodeId>,
    },
    /// The batch does not decode.
    Malformed(String),
    /// Raft failed (shutting down, storage error).
    Failed(String),
}

/// The answer on [`Channel::Raft`](crate::transport::Channel::Raft).
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    /// To [`RaftRequest::Append`].
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To [`RaftRequest::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To [`RaftRequest::Propose`]: the applied results.
    Propose(Result<BatchResult, ProposeRefusal>),
}

/// The answer on [`Channel::Snapshot`](crate::transport::Channel::Snapshot).
pub type SnapshotReply =
    Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>;

/// Operator and membership requests, served by the leader (others forward them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Add node `id` as a learner, wait until it caught up, then make it a voter.
    Join {
        /// The joining node.
        id: NodeId,
        /// Its addresses.
        info: NodeInfo,
    },
    /// Add node `id` as a learner (and wait until it caught up).
    AddLearner {
        /// The node.
        id: NodeId,
        /// Its addresses.
        info: NodeInfo,
    },
    /// Make learner `id` a voter.
    Promote {
        /// The node.
        id: NodeId,
    },
    /// Remove node `id` from the cluster (voter or learner).
    Remove {
        /// The node.
        id: NodeId,
    },
    /// Make `to` the leader.
    TransferLeader {
        /// The next leader.
        to: NodeId,
    },
    /// Sent by the leader to the transfer target: start an election after `after_ms`.
    ElectAfter {
        /// Delay before the election, ms (the followers' leader lease).
        after_ms: u64,
    },
    /// The leader's view of the cluster.
    Status,
}

/// The answer to an [`AdminRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminReply {
    /// Done; the membership change (if any) committed at this log index.
    Done {
        /// The log index of the change, 0 if none was needed.
        index: u64,
    },
    /// The leader's status.
    Status(Box<ClusterStatus>),
}

/// Encodes a message.
pub fn encode<T: Serialize>(value: &T) -> bytes::Bytes {
    bytes::Bytes::from(crate::store::encode_bincode(value))
}

/// Decodes a message from untrusted bytes.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() > RPC_BYTES_MAX {
        return Err(format!(
            "message of {} bytes exceeds {RPC_BYTES_MAX}",
            bytes.len()
        ));
    }
    crate::store::decode_bincode(bytes)
}

/// Checks what openraft assumes of an append-entries request: entries consecutive,
/// following `prev_log_id`, and no entry from a term after the sender's vote.
pub fn validate_append(req: &AppendEntriesRequest<TypeConfig>) -> Result<(), String> {
    let first = req.prev_log_id.map_or(0, |l| l.index + 1);
    let mut last_term = req.prev_log_id.map_or(0, |l| l.leader_id.term);
    for (expect, e) in (first..).zip(&req.entries) {
        if e.log_id.index != expect {
            return Err(format!(
                "append-entries: entry index {} where {expect} was expected",
                e.log_id.index
            ));
        }
        if e.log_id.leader_id.term < last_term || e.log_id.leader_id.term > req.vote.leader_id.term
        {
            return Err(format!(
                "append-entries: entry term {} out of order (previous {last_term}, vote {})",
                e.log_id.leader_id.term, req.vote.leader_id.term
            ));
        }
        last_term = e.log_id.leader_id.term;
    }
    if let Some(c) = req.leader_commit
        && c.leader_id.term > req.vote.leader_id.term
    {
        return Err("append-entries: commit from a future term".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_requests_round_trip_and_garbage_is_an_error() {
        let r = AdminRequest::Join {
            id: 4,
            info: NodeInfo::with_cluster_addr("127.0.0.1:7003"),
        };
        let b = encode(&r);
        assert_eq!(decode::<AdminRequest>(&b).unwrap(), r);
        for cut in 0..b.len() {
            assert!(decode::<AdminRequest>(&b[..cut]).is_err());
        }
        let mut extra = b.to_vec();
        extra.push(0);
        assert!(
            decode::<AdminRequest>(&extra).is_err(),
            "trailing bytes refused"
        );
        // A huge declared length is refused by the size limit, not allocated.
        let huge = [0u8, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x00];
        assert!(decode::<RaftRequest>(&huge).is_err());
    }
}
