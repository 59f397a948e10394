//! The one clock of a bench process: nanoseconds since a process-wide epoch on the
//! monotonic clock. Publishers stamp intended send times with it and subscribers
//! compare arrival times to those stamps; both live in this process, so no clock
//! synchronisation is involved.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the epoch. The first call sets the epoch.
pub fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// The `Instant` of a clock reading, for sleeping until it.
pub fn instant_at(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

/// Seconds, as a clock duration in ns.
pub fn secs_ns(s: f64) -> u64 {
    (s * 1e9) as u64
}
