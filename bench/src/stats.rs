//! Measurement plumbing shared by the scenarios: live counters for the progress
//! line, per-client time series of message counts (so rates can be computed over
//! the exact measurement window after the run), latency histogram summaries, and
//! the once-a-second progress line on stderr.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Distinct error reasons kept; further ones are counted under "other reasons".
const ERROR_REASONS_MAX: usize = 64;

/// Largest latency a histogram records, ns (an hour); larger values are clamped.
pub const LATENCY_NS_MAX: u64 = 3_600_000_000_000;

/// Counters every task of a run updates and the progress line reads.
#[derive(Debug)]
pub struct Live {
    /// Messages published (or connections opened, in `conn`).
    pub sent: AtomicU64,
    /// Messages received by subscribers (or connect attempts done, in `conn`).
    pub received: AtomicU64,
    /// Errors so far; their reasons are in `reasons`.
    pub errors: AtomicU64,
    /// Messages each publisher has produced: `produced[p]`. Stored before the bytes
    /// reach the socket, so a subscriber never sees a sequence number at or above it.
    produced: Vec<AtomicU64>,
    reasons: Mutex<BTreeMap<String, u64>>,
    /// Latencies of messages received so far, coarse, for the progress line's p99.
    pub latency: CoarseHistogram,
}

impl Live {
    /// Counters for a run with `publishers` publishers.
    pub fn new(publishers: u32) -> Live {
        Live {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            produced: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
            reasons: Mutex::new(BTreeMap::new()),
            latency: CoarseHistogram::default(),
        }
    }

    /// Counts an error under `reason`.
    pub fn error(&self, reason: impl Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut reasons = self.reasons.lock().expect("no panics while holding it");
        let key = reason.to_string();
        if reasons.len() < ERROR_REASONS_MAX || reasons.contains_key(&key) {
            *reasons.entry(key).or_insert(0) += 1;
        } else {
            *reasons.entry("other reasons".to_string()).or_insert(0) += 1;
        }
    }

    /// Errors by reason so far.
    pub fn reasons(&self) -> BTreeMap<String, u64> {
        self.reasons
            .lock()
            .expect("no panics while holding it")
            .clone()
    }

    /// Records that publisher `p` has produced `n` messages.
    pub fn set_produced(&self, p: u32, n: u64) {
        self.produced[p as usize].store(n, Ordering::Release);
    }

    /// Messages publisher `p` has produced so far; 0 for an unknown publisher.
    pub fn produced(&self, p: u32) -> u64 {
        self.produced
            .get(p as usize)
            .map_or(0, |a| a.load(Ordering::Acquire))
    }
}

/// Sub-buckets per power of two of a [`CoarseHistogram`]: 12.5 % resolution.
const COARSE_SUB: usize = 8;

/// Buckets of a [`CoarseHistogram`]: every power of two of a u64.
pub const COARSE_BUCKETS: usize = 64 * COARSE_SUB;

/// The bucket of `ns` in a coarse histogram: its power of two and the next three
/// bits.
pub fn coarse_bucket(ns: u64) -> usize {
    let e = 63 - (ns | 1).leading_zeros() as usize;
    let sub = if e >= 3 {
        ((ns >> (e - 3)) & 7) as usize
    } else {
        (ns as usize) & 7
    };
    e * COARSE_SUB + sub
}

/// The upper bound of coarse bucket `b`, ns.
fn coarse_upper(b: usize) -> u64 {
    let (e, sub) = (b / COARSE_SUB, (b % COARSE_SUB) as u64);
    if e < 3 {
        return sub + 1;
    }
    let upper = (u128::from(8 + sub + 1) << (e - 3)) - 1;
    u64::try_from(upper).unwrap_or(u64::MAX)
}

/// A lock-free latency histogram with 12.5 % resolution that the progress line
/// reads once a second. Subscribers count into a local [`CoarseBatch`] per read
/// and flush only its non-empty buckets, so the shared atomics are touched once
/// per bucket per read, not once per message.
#[derive(Debug)]
pub struct CoarseHistogram {
    counts: Box<[AtomicU64]>,
}

impl Default for CoarseHistogram {
    fn default() -> CoarseHistogram {
        CoarseHistogram {
            counts: (0..COARSE_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl CoarseHistogram {
    /// Adds a batch and empties it.
    pub fn flush(&self, batch: &mut CoarseBatch) {
        for &b in &batch.touched {
            let n = std::mem::take(&mut batch.counts[b]);
            self.counts[b].fetch_add(n, Ordering::Relaxed);
        }
        batch.touched.clear();
    }

    /// The counts so far.
    pub fn snapshot(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// The `q` quantile (0..1) of the counts `now - before` of two snapshots, ns
/// (upper bucket bound); `None` when nothing was counted in between.
pub fn coarse_quantile(now: &[u64], before: &[u64], q: f64) -> Option<u64> {
    let delta: Vec<u64> = now.iter().zip(before).map(|(a, b)| a - b).collect();
    let total: u64 = delta.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64 * q).ceil() as u64).max(1);
    let mut seen = 0;
    for (b, n) in delta.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(coarse_upper(b));
        }
    }
    Some(coarse_upper(COARSE_BUCKETS - 1))
}

/// One task's latencies since its last flush into a [`CoarseHistogram`].
#[derive(Debug)]
pub struct CoarseBatch {
    counts: Box<[u64]>,
    touched: Vec<usize>,
}

impl Default for CoarseBatch {
    fn default() -> CoarseBatch {
        CoarseBatch {
            counts: vec![0; COARSE_BUCKETS].into_boxed_slice(),
            touched: Vec::with_capacity(16),
        }
    }
}

impl CoarseBatch {
    /// Counts one latency.
    pub fn record(&mut self, ns: u64) {
        let b = coarse_bucket(ns);
        if self.counts[b] == 0 {
            self.touched.push(b);
        }
        self.counts[b] += 1;
    }
}

/// Finest bucket of a [`Series`].
const BUCKET_NS_MIN: u64 = 10_000_000;

/// Most buckets in a [`Series`]; longer runs get coarser buckets.
const BUCKETS_MAX: u64 = 4096;

/// Message counts over time for one client, in fixed buckets from `start_ns`.
#[derive(Debug, Clone)]
pub struct Series {
    start_ns: u64,
    bucket_ns: u64,
    counts: Vec<u64>,
}

impl Series {
    /// A series covering `span_ns` from `start_ns`; later events land in the last
    /// bucket, earlier ones in the first.
    pub fn new(start_ns: u64, span_ns: u64) -> Series {
        let bucket_ns = BUCKET_NS_MIN.max(span_ns.div_ceil(BUCKETS_MAX));
        Series {
            start_ns,
            bucket_ns,
            counts: vec![0; (span_ns / bucket_ns + 1) as usize],
        }
    }

    fn index(&self, t_ns: u64) -> usize {
        let i = (t_ns.saturating_sub(self.start_ns) / self.bucket_ns) as usize;
        i.min(self.counts.len() - 1)
    }

    /// Counts `n` events at `t_ns`.
    pub fn add(&mut self, t_ns: u64, n: u64) {
        let i = self.index(t_ns);
        self.counts[i] += n;
    }

    /// Adds another series of the same shape.
    pub fn merge(&mut self, other: &Series) {
        assert_eq!(
            (self.start_ns, self.bucket_ns, self.counts.len()),
            (other.start_ns, other.bucket_ns, other.counts.len()),
            "series of one run share their shape"
        );
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    /// Start of the first bucket, on the bench clock.
    pub fn start_ns(&self) -> u64 {
        self.start_ns
    }

    /// Width of each bucket, ns.
    pub fn bucket_ns(&self) -> u64 {
        self.bucket_ns
    }

    /// Events per bucket.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The measurement window `[from_ns, to_ns)` rounded outwards to whole buckets:
    /// (events in it, its length in ns).
    pub fn window(&self, from_ns: u64, to_ns: u64) -> (u64, u64) {
        if to_ns <= from_ns {
            return (0, 0);
        }
        let a = self.index(from_ns);
        let b = self.index(to_ns.saturating_sub(1)) + 1;
        (
            self.counts[a..b].iter().sum(),
            (b - a) as u64 * self.bucket_ns,
        )
    }
}

/// A new latency histogram in ns: 1 ns to [`LATENCY_NS_MAX`], 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid histogram bounds")
}

/// Records `ns` (at least 1) into `h`, clamping at the top.
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.max(1));
}

/// Percentiles of a histogram recorded in ns, in µs.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest value.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl LatencySummary {
    /// Summarises `h`; all zero when it is empty.
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        LatencySummary {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: (h.mean() / 100.0).round() / 10.0,
        }
    }
}

/// What the progress line calls its two counters.
#[derive(Debug, Clone, Copy)]
pub enum ProgressLabels {
    /// `out` / `in`, as rates: publish and receive.
    Messages,
    /// `connected` / `attempted`, as totals: the `conn` scenario.
    Connections,
}

/// Prints one progress line per second on stderr until the returned task is
/// aborted.
pub fn spawn_progress(
    scenario: &'static str,
    live: std::sync::Arc<Live>,
    labels: ProgressLabels,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let (mut sent, mut received) = (0u64, 0u64);
        let mut latencies = live.latency.snapshot();
        let mut at = tokio::time::Instant::now();
        let mut second = 0u64;
        loop {
            tick.tick().await;
            second += 1;
            let dt = at.elapsed().as_secs_f64().max(1e-3);
            at = tokio::time::Instant::now();
            let s = live.sent.load(Ordering::Relaxed);
            let r = live.received.load(Ordering::Relaxed);
            let e = live.errors.load(Ordering::Relaxed);
            match labels {
                ProgressLabels::Messages => {
                    let now = live.latency.snapshot();
                    let p99 = coarse_quantile(&now, &latencies, 0.99)
                        .map_or("-".to_string(), |ns| format!("{:.0} µs", ns as f64 / 1e3));
                    latencies = now;
                    eprintln!(
                        "bench {scenario}: {second:>4}s  out {:>9.0} msg/s  in {:>9.0} msg/s  errors {e}  p99 {p99}",
                        (s - sent) as f64 / dt,
                        (r - received) as f64 / dt,
                    )
                }
                ProgressLabels::Connections => eprintln!(
                    "bench {scenario}: {second:>4}s  connected {s}  attempted {r}  failures {e}"
                ),
            }
            sent = s;
            received = r;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_window_rounds_to_buckets() {
        let mut s = Series::new(1_000, 1_000_000_000);
        assert_eq!(s.bucket_ns, BUCKET_NS_MIN);
        s.add(1_000, 1);
        s.add(1_000 + BUCKET_NS_MIN, 2);
        s.add(1_000 + 5 * BUCKET_NS_MIN, 4);
        s.add(u64::MAX, 8);
        assert_eq!(
            s.window(1_000 + BUCKET_NS_MIN, 1_000 + 5 * BUCKET_NS_MIN),
            (2, 4 * BUCKET_NS_MIN)
        );
        assert_eq!(s.window(0, u64::MAX).0, 15);
        assert_eq!(s.window(5_000, 5_000), (0, 0));
    }

    #[test]
    fn coarse_buckets_bound_their_values() {
        for ns in [
            0u64,
            1,
            7,
            8,
            9,
            100,
            1_000,
            123_456,
            10_000_000_000,
            u64::MAX,
        ] {
            let b = coarse_bucket(ns);
            assert!(coarse_upper(b) >= ns, "{ns} in bucket {b}");
            assert!(
                coarse_upper(b) as f64 <= (ns as f64 * 1.126).max(8.0),
                "{ns}"
            );
            assert!(b < COARSE_BUCKETS);
        }
        let live = CoarseHistogram::default();
        let before = live.snapshot();
        let mut batch = CoarseBatch::default();
        for us in 1..=100u64 {
            batch.record(us * 1000);
        }
        live.flush(&mut batch);
        let p99 = coarse_quantile(&live.snapshot(), &before, 0.99).unwrap();
        assert!((99_000..=113_000).contains(&p99), "{p99}");
        assert_eq!(coarse_quantile(&before, &before, 0.99), None);
    }

    #[test]
    fn long_spans_get_coarser_buckets() {
        let s = Series::new(0, 3_600_000_000_000);
        assert!(s.counts.len() as u64 <= BUCKETS_MAX + 1);
    }

    #[test]
    fn latency_summary_is_in_microseconds() {
        let mut h = latency_histogram();
        for us in 1..=1000u64 {
            record_ns(&mut h, us * 1000);
        }
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50_us - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.max_us - 1000.0).abs() < 1.0, "{s:?}");
    }
}
