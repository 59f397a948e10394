//! The one clock of the bench: nanoseconds on the host's `CLOCK_MONOTONIC`.
//! Publishers stamp intended send times with it and subscribers compare arrival
//! times to those stamps. Every process on one host reads the same monotonic
//! clock, so a `bench sub` measures the latency of a `bench pub` running in
//! another process, and `--procs` children share one timeline; across hosts the
//! stamps mean nothing (and the bench says nothing about clock synchronisation).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `CLOCK_MONOTONIC` now, ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An `Instant` and the clock reading taken with it, to convert readings to
/// instants (std's `Instant` is `CLOCK_MONOTONIC` on Linux, but opaque).
fn anchor() -> (Instant, u64) {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    *ANCHOR.get_or_init(|| (Instant::now(), monotonic_ns()))
}

/// Nanoseconds on the host's monotonic clock.
pub fn now_ns() -> u64 {
    monotonic_ns()
}

/// The `Instant` of a clock reading, for sleeping until it.
pub fn instant_at(ns: u64) -> Instant {
    let (at, at_ns) = anchor();
    if ns >= at_ns {
        at + Duration::from_nanos(ns - at_ns)
    } else {
        at.checked_sub(Duration::from_nanos(at_ns - ns))
            .unwrap_or(at)
    }
}

/// Seconds, as a clock duration in ns.
pub fn secs_ns(s: f64) -> u64 {
    (s * 1e9) as u64
}
