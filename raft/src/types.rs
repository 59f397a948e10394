//! The openraft type configuration and the node description every member carries.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::op::{BatchResult, EntryData};
pub use crate::transport::NodeId;

openraft::declare_raft_types!(
    /// Tessera's raft types: entries carry an rkyv-encoded batch of MQTT ops
    /// ([`EntryData`]); a snapshot is a file streamed in chunks.
    pub TypeConfig:
        D = EntryData,
        R = BatchResult,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The raft handle of this crate's type configuration.
pub type Raft = openraft::Raft<TypeConfig>;

/// What the cluster knows about one node: where to reach it and how it is shaped.
///
/// Carried in the raft membership (so every member can reach every other) and in the
/// `NodeMeta` op (so the data plane knows the MQTT/admin addresses and shard counts).
/// Addresses are strings as the operator wrote them (`host:port`); the link resolves them.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct NodeInfo {
    /// The cluster (QUIC) address, e.g. `127.0.0.1:7000`.
    pub cluster_addr: String,
    /// The MQTT listener address clients use, e.g. `127.0.0.1:1883` (may be empty).
    pub mqtt_addr: String,
    /// The admin HTTP address, e.g. `127.0.0.1:18083` (may be empty).
    pub admin_addr: String,
    /// How many shards (cores) the node runs; `0` when not yet known.
    pub shards: u32,
}

impl NodeInfo {
    /// A node known only by its cluster address (the initial peer list gives no more).
    pub fn with_cluster_addr(addr: impl Into<String>) -> NodeInfo {
        NodeInfo {
            cluster_addr: addr.into(),
            ..NodeInfo::default()
        }
    }
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cluster={}", self.cluster_addr)?;
        if !self.mqtt_addr.is_empty() {
            write!(f, " mqtt={}", self.mqtt_addr)?;
        }
        if !self.admin_addr.is_empty() {
            write!(f, " admin={}", self.admin_addr)?;
        }
        write!(f, " shards={}", self.shards)
    }
}
