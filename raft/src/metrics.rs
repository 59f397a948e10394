//! Control-plane metrics (`*_probe`): counters kept by the batcher and the store, and a
//! [`ClusterMetrics`] snapshot the broker exports on `/metrics`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use openraft::RaftMetrics;
use serde::{Deserialize, Serialize};

use crate::store::{Store, lock};
use crate::transport::NodeId;
use crate::types::NodeInfo;

/// Upper bounds of the ops-per-entry histogram buckets.
pub const OPS_PER_ENTRY_BUCKETS: [u64; 12] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];
/// Upper bounds of the proposal-to-commit latency buckets, µs.
pub const COMMIT_LATENCY_BUCKETS_US: [u64; 14] = [
    250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000,
    1_024_000, 4_096_000,
];

/// A histogram as exported: cumulative counts per upper bound, plus quantiles.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// Samples.
    pub count: u64,
    /// Sum of the samples.
    pub sum: u64,
    /// `(upper bound, samples <= bound)`, cumulative as Prometheus expects.
    pub buckets: Vec<(u64, u64)>,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest sample.
    pub max: u64,
}

fn snapshot_of(h: &Histogram<u64>, sum: u64, bounds: &[u64]) -> HistogramSnapshot {
    HistogramSnapshot {
        count: h.len(),
        sum,
        buckets: bounds
            .iter()
            .map(|b| (*b, h.count_between(0, *b)))
            .collect(),
        p50: h.value_at_quantile(0.5),
        p99: h.value_at_quantile(0.99),
        max: h.max(),
    }
}

/// Every control-plane metric at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterMetrics {
    /// Current term.
    pub term: u64,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Times a (new) leader became known to this node.
    pub leader_changes: u64,
    /// Last log index.
    pub last_log_index: u64,
    /// Committed index known here.
    pub commit_index: u64,
    /// Applied index of the tables.
    pub applied_index: u64,
    /// `commit_index - applied_index`.
    pub apply_lag: u64,
    /// Ops proposed through handles (accepted into the channel).
    pub proposals: u64,
    /// Ops refused because the proposal channel was full.
    pub proposals_busy: u64,
    /// Ops that failed (no leader in time, shutdown).
    pub proposals_failed: u64,
    /// Ops per log entry proposed by this node.
    pub ops_per_entry: HistogramSnapshot,
    /// Time from `propose` to the op applied on this node, µs.
    pub commit_latency_us: HistogramSnapshot,
    /// Snapshots built here.
    pub snapshots_built: u64,
    /// Snapshots installed from a leader.
    pub snapshots_installed: u64,
    /// Size of the last snapshot, bytes.
    pub snapshot_last_bytes: u64,
    /// Snapshots from a leader refused because they did not parse.
    pub snapshots_refused: u64,
    /// Entries applied.
    pub entries_applied: u64,
    /// Ops applied.
    pub ops_applied: u64,
    /// Duplicate batches (retries) answered from the idempotency window.
    pub duplicate_batches: u64,
    /// Ops rejected at apply.
    pub ops_rejected: u64,
    /// Applied-change subscribers dropped for falling behind.
    pub subscribers_lagged: u64,
}

pub(crate) struct MetricsCore {
    pub(crate) proposals: AtomicU64,
    pub(crate) proposals_busy: AtomicU64,
    pub(crate) proposals_failed: AtomicU64,
    pub(crate) leader_changes: AtomicU64,
    ops_per_entry: Mutex<(Histogram<u64>, u64)>,
    latency_us: Mutex<(Histogram<u64>, u64)>,
}

impl Default for MetricsCore {
    fn default() -> Self {
        let h = |max| {
            Histogram::new_with_bounds(1, max, 2).unwrap_or_else(|_| unreachable!("valid bounds"))
        };
        MetricsCore {
            proposals: AtomicU64::new(0),
            proposals_busy: AtomicU64::new(0),
            proposals_failed: AtomicU64::new(0),
            leader_changes: AtomicU64::new(0),
            ops_per_entry: Mutex::new((h(1 << 21), 0)),
            latency_us: Mutex::new((h(3_600_000_000), 0)),
        }
    }
}

impl MetricsCore {
    pub(crate) fn record_entry(&self, ops: usize) {
        let mut g = lock(&self.ops_per_entry);
        g.0.saturating_record(ops as u64);
        g.1 += ops as u64;
    }

    /// Records the proposal-to-applied latency of every op of a batch (one lock).
    pub(crate) fn record_latencies(&self, ds: impl Iterator<Item = Duration>) {
        let mut g = lock(&self.latency_us);
        for d in ds {
            let us = d.as_micros().min(u64::MAX as u128) as u64;
            g.0.saturating_record(us.max(1));
            g.1 = g.1.saturating_add(us);
        }
    }

    pub(crate) fn observe(&self, _m: &RaftMetrics<NodeId, NodeInfo>) {}

    pub(crate) fn snapshot(
        &self,
        m: &RaftMetrics<NodeId, NodeInfo>,
        store: &Store,
    ) -> ClusterMetrics {
        let c = &store.counters;
        let applied = c.applied_index.load(Ordering::Relaxed);
        let commit = c.committed_index.load(Ordering::Relaxed).max(applied);
        let ope = {
            let g = lock(&self.ops_per_entry);
            snapshot_of(&g.0, g.1, &OPS_PER_ENTRY_BUCKETS)
        };
        let lat = {
            let g = lock(&self.latency_us);
            snapshot_of(&g.0, g.1, &COMMIT_LATENCY_BUCKETS_US)
        };
        ClusterMetrics {
            term: m.current_term,
            leader: m.current_leader,
            leader_changes: self.leader_changes.load(Ordering::Relaxed),
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: commit,
            applied_index: applied,
            apply_lag: commit - applied,
            proposals: self.proposals.load(Ordering::Relaxed),
            proposals_busy: self.proposals_busy.load(Ordering::Relaxed),
            proposals_failed: self.proposals_failed.load(Ordering::Relaxed),
            ops_per_entry: ope,
            commit_latency_us: lat,
            snapshots_built: c.snapshots_built.load(Ordering::Relaxed),
            snapshots_installed: c.snapshots_installed.load(Ordering::Relaxed),
            snapshot_last_bytes: c.snapshot_last_bytes.load(Ordering::Relaxed),
            snapshots_refused: c.snapshots_refused.load(Ordering::Relaxed),
            entries_applied: c.entries_applied.load(Ordering::Relaxed),
            ops_applied: c.ops_applied.load(Ordering::Relaxed),
            duplicate_batches: c.duplicate_batches.load(Ordering::Relaxed),
            ops_rejected: c.ops_rejected.load(Ordering::Relaxed),
            subscribers_lagged: store.applied_subscribers.lagged.load(Ordering::Relaxed),
        }
    }
}
