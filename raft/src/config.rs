//! [`ClusterConfig`]: everything the control plane needs to start, with validation that
//! names the field at fault.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::op::{BATCH_OPS_HARD_MAX, IDEMPOTENCY_WINDOW_MS};
use crate::transport::NodeId;
use crate::types::NodeInfo;

/// Settings of the control plane. The broker fills it from `--node-id`,
/// `--cluster-peers`, the `[cluster]` section and `TESSERA_CLUSTER__*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's id (`--node-id`), never 0. Stored at first start; a later start with
    /// another id is refused.
    pub node_id: NodeId,
    /// The broker's data directory; raft keeps everything under `data_dir/raft/`.
    pub data_dir: PathBuf,
    /// This node's addresses and shard count (proposed as a `NodeMeta` op at start).
    pub self_info: NodeInfo,
    /// The initial voters (`--cluster-peers`), the same map on every initial node, as
    /// etcd's `--initial-cluster`. Empty for a node that joins a running cluster. Stored
    /// at first start; a later start with a different non-empty map is refused.
    pub initial_voters: BTreeMap<NodeId, NodeInfo>,
    /// Lower bound of the randomized election timeout, ms.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the election timeout, ms (also the followers' leader lease).
    pub election_timeout_max_ms: u64,
    /// Leader heartbeat interval, ms.
    pub heartbeat_interval_ms: u64,
    /// Most ops in one log entry.
    pub batch_ops_max: usize,
    /// How long the batcher waits for more ops after the first, µs.
    pub batch_window_us: u64,
    /// Bound of the shards -> control-thread proposal channel; a full channel answers
    /// `ProposeError::Busy` at once.
    pub proposal_queue_max: usize,
    /// Most batches proposed and not yet answered at once. Default 4: the batcher takes a
    /// permit before it collects a batch, so while every permit is out proposals queue and
    /// the next entry is bigger. More permits mean more, smaller entries, each a synced
    /// log write on the leader and the followers: with 32 (the earlier default) claims
    /// topped out at 98K/s and had a p99 of 78-90 ms at 94K/s, against 142-157K/s and
    /// 12-22 ms with 4 (`raft_bench`, docs/BENCHMARKS.md). Fewer than 4 leaves a node
    /// with little room when one batch is retried (a leader change) until its timeout.
    pub batches_in_flight_max: usize,
    /// How long a batch is retried (leader changes, no quorum) before its ops fail, ms.
    pub proposal_timeout_ms: u64,
    /// Take a snapshot after this many entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log behind a snapshot (for slow followers).
    pub logs_kept_after_snapshot: u64,
    /// Snapshot transfer chunk, bytes.
    pub snapshot_chunk_bytes: u64,
    /// LMDB map size (virtual address space reserved), bytes.
    pub map_size_bytes: usize,
    /// fsync every log append and apply. Always `true` in the broker; `false` is for
    /// tests and the simulation (see `StoreOptions::fsync`).
    pub fsync: bool,
    /// Run storage commits on tokio's blocking pool (always `true` in the broker; the
    /// deterministic simulation sets `false`, see `StoreOptions::io_on_blocking_pool`).
    pub io_on_blocking_pool: bool,
    /// Seed of this node's election-timeout draws. `None` (the broker): a random seed
    /// per start. The deterministic simulation sets one so a seed replays its elections.
    pub election_seed: Option<u64>,
}

impl ClusterConfig {
    /// Defaults for everything but identity and addresses.
    pub fn new(
        node_id: NodeId,
        data_dir: impl Into<PathBuf>,
        self_info: NodeInfo,
    ) -> ClusterConfig {
        ClusterConfig {
            node_id,
            data_dir: data_dir.into(),
            self_info,
            initial_voters: BTreeMap::new(),
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            heartbeat_interval_ms: 100,
            batch_ops_max: 1024,
            batch_window_us: 500,
            proposal_queue_max: 65_536,
            batches_in_flight_max: 4,
            proposal_timeout_ms: 10_000,
            snapshot_logs_since_last: 20_000,
            logs_kept_after_snapshot: 2_000,
            snapshot_chunk_bytes: 4 << 20,
            map_size_bytes: crate::store::MAP_SIZE_BYTES_DEFAULT,
            fsync: true,
            io_on_blocking_pool: true,
            election_seed: None,
        }
    }

    /// Checks every field and the relations between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: &'static str, reason: String| Err(ConfigError { field, reason });
        if self.node_id == 0 {
            return err("node_id", "must be at least 1".into());
        }
        if self.self_info.cluster_addr.is_empty() {
            return err(
                "self_info.cluster_addr",
                "the cluster listen address is required".into(),
            );
        }
        if let Err(e) = (crate::op::Op::NodeMeta {
            id: self.node_id,
            info: self.self_info.clone(),
        })
        .validate()
        {
            return err("self_info", e.to_string());
        }
        if self.initial_voters.contains_key(&0) {
            return err("initial_voters", "node id 0 is not valid".into());
        }
        if let Some(mine) = self.initial_voters.get(&self.node_id)
            && mine.cluster_addr != self.self_info.cluster_addr
        {
            return err(
                "initial_voters",
                format!(
                    "lists node {} at {} but this node listens on {}",
                    self.node_id, mine.cluster_addr, self.self_info.cluster_addr
                ),
            );
        }
        if !self.initial_voters.is_empty() && !self.initial_voters.contains_key(&self.node_id) {
            // A node outside the initial voters must join; it keeps the list only to check
            // it against the stored one.
            tracing::info!(
                node = self.node_id,
                "node is not an initial voter: it joins a running cluster"
            );
        }
        if self.election_timeout_min_ms == 0
            || self.election_timeout_min_ms >= self.election_timeout_max_ms
        {
            return err(
                "election_timeout_min_ms",
                format!(
                    "must be above 0 and below election_timeout_max_ms ({})",
                    self.election_timeout_max_ms
                ),
            );
        }
        if self.heartbeat_interval_ms == 0
            || self.heartbeat_interval_ms * 2 > self.election_timeout_min_ms
        {
            return err(
                "heartbeat_interval_ms",
                format!(
                    "must be above 0 and at most half of election_timeout_min_ms ({})",
                    self.election_timeout_min_ms
                ),
            );
        }
        if self.batch_ops_max == 0 || self.batch_ops_max > BATCH_OPS_HARD_MAX {
            return err("batch_ops_max", format!("must be 1..={BATCH_OPS_HARD_MAX}"));
        }
        if self.batch_window_us > 1_000_000 {
            return err("batch_window_us", "must be at most 1,000,000 (1 s)".into());
        }
        if self.proposal_queue_max < self.batch_ops_max {
            return err(
                "proposal_queue_max",
                format!("must be at least batch_ops_max ({})", self.batch_ops_max),
            );
        }
        if self.batches_in_flight_max == 0 {
            return err("batches_in_flight_max", "must be at least 1".into());
        }
        if self.proposal_timeout_ms == 0 || self.proposal_timeout_ms * 2 > IDEMPOTENCY_WINDOW_MS {
            return err(
                "proposal_timeout_ms",
                format!(
                    "must be above 0 and at most half the idempotency window ({IDEMPOTENCY_WINDOW_MS} ms)"
                ),
            );
        }
        if self.snapshot_logs_since_last == 0 {
            return err("snapshot_logs_since_last", "must be at least 1".into());
        }
        if self.snapshot_chunk_bytes == 0
            || self.snapshot_chunk_bytes as usize > crate::network::RPC_BYTES_MAX / 2
        {
            return err(
                "snapshot_chunk_bytes",
                format!("must be 1..={}", crate::network::RPC_BYTES_MAX / 2),
            );
        }
        if self.map_size_bytes < (64 << 20) {
            return err("map_size_bytes", "must be at least 64 MiB".into());
        }
        Ok(())
    }
}

/// A setting that cannot work, naming the field (`cluster.<field>` in the broker's terms).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster.{field}: {reason}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ClusterConfig {
        let mut c = ClusterConfig::new(1, "/tmp/x", NodeInfo::with_cluster_addr("127.0.0.1:7000"));
        c.initial_voters
            .insert(1, NodeInfo::with_cluster_addr("127.0.0.1:7000"));
        c
    }

    #[test]
    fn defaults_validate_and_errors_name_the_field() {
        base().validate().unwrap();
        let mut c = base();
        c.node_id = 0;
        assert_eq!(c.validate().unwrap_err().field, "node_id");
        let mut c = base();
        c.election_timeout_min_ms = 900;
        assert_eq!(c.validate().unwrap_err().field, "election_timeout_min_ms");
        let mut c = base();
        c.heartbeat_interval_ms = 300;
        assert_eq!(c.validate().unwrap_err().field, "heartbeat_interval_ms");
        let mut c = base();
        c.initial_voters
            .insert(1, NodeInfo::with_cluster_addr("127.0.0.1:7999"));
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "initial_voters");
        assert!(
            e.to_string()
                .starts_with("cluster.initial_voters: lists node 1"),
            "{e}"
        );
        let mut c = base();
        c.proposal_queue_max = 10;
        assert_eq!(c.validate().unwrap_err().field, "proposal_queue_max");
    }
}
