//! What `status()` reports: the cluster as this node (or the leader) sees it.

use serde::{Deserialize, Serialize};

use crate::transport::NodeId;
use crate::types::NodeInfo;

/// A node's role in the raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Leads the group.
    Leader,
    /// A voter following the leader.
    Follower,
    /// A voter campaigning for leadership.
    Candidate,
    /// Receives the log but does not vote.
    Learner,
    /// Raft has stopped on this node (see `ClusterStatus::error`).
    Shutdown,
}

impl Role {
    /// Lower-case name, as the admin API and brokerctl print it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        }
    }
}

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Its id.
    pub id: NodeId,
    /// Its addresses (from the membership).
    pub info: NodeInfo,
    /// Voter roles are `Leader` or `Follower` as seen by the reporting node; non-voters
    /// are `Learner`.
    pub role: Role,
    /// The highest log index known replicated to it (known on the leader only).
    pub match_index: Option<u64>,
    /// How many entries it is behind the leader's last log index (leader only).
    pub lag: Option<u64>,
}

/// The cluster seen from one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The reporting node.
    pub node_id: NodeId,
    /// Its role.
    pub role: Role,
    /// The current term.
    pub term: u64,
    /// The leader, if known.
    pub leader: Option<NodeId>,
    /// The last log index this node has.
    pub last_log_index: u64,
    /// The committed index this node knows of.
    pub commit_index: u64,
    /// The index its tables reflect.
    pub applied_index: u64,
    /// The last index in its newest snapshot.
    pub snapshot_index: u64,
    /// The log is purged up to here.
    pub purged_index: u64,
    /// Every member (voters and learners), by id.
    pub members: Vec<MemberStatus>,
    /// A caught-up voter that knows a leader and heard from it within three heartbeats:
    /// the broker's `/ready`.
    pub ready: bool,
    /// Why raft stopped, if it did.
    pub error: Option<String>,
}
