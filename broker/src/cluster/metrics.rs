//! Session-ownership metrics of the data plane (issue 15), shared by the shards of a
//! node: counters of claims, refusals, releases and takeovers, and the takeover
//! duration histogram. Written at CONNECT and takeover only (never per message), so
//! plain atomics and a mutex around the histogram cost nothing on the hot path.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use tessera_raft::HistogramSnapshot;

/// Upper bounds of the takeover duration buckets, µs.
const TAKEOVER_BOUNDS_US: &[u64] = &[
    1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000,
    5_000_000,
];

/// The node's session-ownership counters.
#[derive(Debug)]
pub struct SessionMetrics {
    /// CONNECTs that needed a raft claim and got it.
    pub claims: AtomicU64,
    /// CONNECTs served by a claim this node already held (no raft write).
    pub claims_held: AtomicU64,
    /// CONNECTs refused because no claim could be committed in time (0x88 / 0x03).
    /// CONNECTs refused because the node holding their session could not be reached
    /// (`cluster.wait_for_session_owner`).
    pub claims_refused: AtomicU64,
    pub owner_waits: AtomicU64,
    /// Releases proposed for sessions that ended here.
    pub releases: AtomicU64,
    /// Claims whose previous owner was another node (a cross-node takeover).
    pub takeovers: AtomicU64,
    /// Takeovers whose session could not be fetched from the old owner.
    pub takeover_failures: AtomicU64,
    /// Sessions handed out to another node (this node was the old owner).
    pub sessions_exported: AtomicU64,
    /// Live connections ended here because another node claimed their ClientID.
    pub taken_over_here: AtomicU64,
    /// MQTT 5 CONNECTs redirected to the node holding their session.
    pub redirects: AtomicU64,
    /// Queued deliveries read from the old owner's disk tail at takeovers.
    pub tail_deliveries_moved: AtomicU64,
    /// Takeovers the new owner could not confirm to the old owner (the old owner keeps
    /// its copy until the session would expire).
    pub confirm_failures: AtomicU64,
    /// Sessions recovered from a moving copy after the node they were handed to never
    /// confirmed them.
    pub moving_copies_recovered: AtomicU64,
    /// Live connections ended because the node was out of touch with its cluster for
    /// longer than its session lease.
    pub fenced: AtomicU64,
    takeover_us: Mutex<(Histogram<u64>, u64)>,
}

impl Default for SessionMetrics {
    fn default() -> Self {
        SessionMetrics {
            claims: AtomicU64::new(0),
            claims_held: AtomicU64::new(0),
            claims_refused: AtomicU64::new(0),
            owner_waits: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            takeover_failures: AtomicU64::new(0),
            sessions_exported: AtomicU64::new(0),
            taken_over_here: AtomicU64::new(0),
            redirects: AtomicU64::new(0),
            tail_deliveries_moved: AtomicU64::new(0),
            confirm_failures: AtomicU64::new(0),
            moving_copies_recovered: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            takeover_us: Mutex::new((
                Histogram::new_with_bounds(1, 60_000_000, 2).expect("static bounds"),
                0,
            )),
        }
    }
}

/// The counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionMetricsSnapshot {
    pub claims: u64,
    pub claims_held: u64,
    pub claims_refused: u64,
    pub owner_waits: u64,
    pub releases: u64,
    pub takeovers: u64,
    pub takeover_failures: u64,
    pub sessions_exported: u64,
    pub taken_over_here: u64,
    pub redirects: u64,
    pub tail_deliveries_moved: u64,
    pub confirm_failures: u64,
    pub moving_copies_recovered: u64,
    pub fenced: u64,
    /// Claim committed to session imported (the new owner's side of a takeover), µs.
    pub takeover_us: HistogramSnapshot,
}

impl SessionMetrics {
    /// Counts one.
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n`.
    pub fn add_n(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one takeover's duration.
    pub fn takeover_took(&self, us: u64) {
        let mut h = self.takeover_us.lock().unwrap_or_else(|e| e.into_inner());
        let _ = h.0.record(us.clamp(1, 60_000_000));
        h.1 += us;
    }

    /// The values now.
    pub fn snapshot(&self) -> SessionMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let h = self.takeover_us.lock().unwrap_or_else(|e| e.into_inner());
        SessionMetricsSnapshot {
            claims: get(&self.claims),
            claims_held: get(&self.claims_held),
            claims_refused: get(&self.claims_refused),
            owner_waits: get(&self.owner_waits),
            releases: get(&self.releases),
            takeovers: get(&self.takeovers),
            takeover_failures: get(&self.takeover_failures),
            sessions_exported: get(&self.sessions_exported),
            taken_over_here: get(&self.taken_over_here),
            redirects: get(&self.redirects),
            tail_deliveries_moved: get(&self.tail_deliveries_moved),
            confirm_failures: get(&self.confirm_failures),
            moving_copies_recovered: get(&self.moving_copies_recovered),
            fenced: get(&self.fenced),
            takeover_us: HistogramSnapshot {
                count: h.0.len(),
                sum: h.1,
                buckets: TAKEOVER_BOUNDS_US
                    .iter()
                    .map(|b| (*b, h.0.count_between(0, *b)))
                    .collect(),
                p50: h.0.value_at_quantile(0.5),
                p99: h.0.value_at_quantile(0.99),
                max: h.0.max(),
            },
        }
    }
}
