//! The runtime seam of the shard glue: timers, task spawning and the clock that the
//! cluster parts of a shard (`cluster`, `claims`, `takeover`, `remote`, `persist`) and
//! the engine's clock (`now_ms`) use instead of glommio and `std::time` directly.
//!
//! Why: in production a shard runs on its glommio executor; the data-plane simulation
//! (`sim`, tests only) runs the same glue on a current-thread tokio runtime with a
//! paused clock, beside raft and the forwarder over `MemNet`, so that one seed replays
//! one schedule. The choice is a thread-local set by the simulation on its own thread
//! ([`enter_sim`]); a shard's executor thread never sets it, so production takes the
//! glommio branch after one thread-local read (nothing allocated, no lock).
//!
//! In the simulation [`now`] is a `std::time::Instant` moved along by tokio's paused
//! clock (its value at [`enter_sim`] plus the simulated time since), so deadlines,
//! the engine's milliseconds and timers agree with each other there too.

use std::cell::Cell;
use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A simulation thread's clock: where it started and tokio's (paused) instant then.
#[derive(Clone, Copy)]
struct SimClock {
    /// The real instant the simulated clock started at: [`ANCHOR`] plus `since_anchor`.
    real: Instant,
    /// Tokio's (paused) instant at entry.
    paused: tokio::time::Instant,
    /// Whole milliseconds from [`ANCHOR`] to `real`.
    since_anchor: Duration,
}

thread_local! {
    /// Set on a simulation thread.
    static SIM: Cell<Option<SimClock>> = const { Cell::new(None) };
    /// Where the last simulation on this thread left [`now`]: the next one starts no
    /// earlier, so the clock never goes back between two simulations.
    #[cfg(test)]
    static SIM_LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The simulations' common origin (the first simulation's start) and the wall clock
/// then, in Unix milliseconds. Every simulation starts a whole number of milliseconds
/// after it, so the engine's milliseconds ([`sim_elapsed`]) and the wall clock
/// ([`unix_ms`]) have the same phase against the simulated clock in every run: a
/// seed's run does not depend on the real instant it started at (a tick that falls in
/// the next millisecond in one run and not in another would change its schedule).
static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();

fn sim() -> Option<SimClock> {
    SIM.with(Cell::get)
}

/// Waits `d` (glommio's timer on a shard, tokio's in the simulation).
pub(super) async fn sleep(d: Duration) {
    if sim().is_some() {
        tokio::time::sleep(d).await;
    } else {
        glommio::timer::sleep(d).await;
    }
}

/// Runs `task` on this thread's executor, detached.
pub(super) fn spawn_local(task: impl Future<Output = ()> + 'static) {
    if sim().is_some() {
        drop(tokio::task::spawn_local(task));
    } else {
        glommio::spawn_local(task).detach();
    }
}

/// The current instant (moved by the simulated clock in the simulation).
pub(super) fn now() -> Instant {
    match sim() {
        None => Instant::now(),
        Some(c) => c.real + c.paused.elapsed(),
    }
}

/// In the simulation, the time since [`ANCHOR`] (whole milliseconds at entry plus
/// the simulated time since): the engine's clock there (`server::clock_elapsed`), the
/// same in every run of a seed up to the whole milliseconds at entry. `None` outside.
pub(super) fn sim_elapsed() -> Option<Duration> {
    sim().map(|c| c.since_anchor + c.paused.elapsed())
}

fn system_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Wall-clock milliseconds since the Unix epoch. In the simulation they follow [`now`]
/// (the real wall clock at [`ANCHOR`], plus [`sim_elapsed`]), so the wall-clock times
/// the store and the takeover keep (expiries, a ghost's window) move with the
/// simulated clock across a node's restart, as they do in production.
pub(super) fn unix_ms() -> u64 {
    match (sim_elapsed(), ANCHOR.get()) {
        (Some(d), Some(&(_, ms))) => ms + d.as_millis() as u64,
        _ => system_ms(),
    }
}

/// Marks this thread as a simulation thread until the guard drops: [`sleep`],
/// [`spawn_local`] and [`now`] use tokio (call inside the runtime and its `LocalSet`).
#[cfg(test)]
pub(super) fn enter_sim() -> SimGuard {
    let (anchor, _) = *ANCHOR.get_or_init(|| (Instant::now(), system_ms()));
    let from = SIM_LAST
        .with(Cell::get)
        .map_or_else(Instant::now, |last| last.max(Instant::now()));
    // Up to the next whole millisecond after the anchor.
    let since_anchor =
        Duration::from_millis(from.saturating_duration_since(anchor).as_millis() as u64 + 1);
    SIM.with(|s| {
        s.set(Some(SimClock {
            real: anchor + since_anchor,
            paused: tokio::time::Instant::now(),
            since_anchor,
        }))
    });
    SimGuard(())
}

/// Ends the simulation mode of this thread when dropped.
#[cfg(test)]
pub(super) struct SimGuard(());

#[cfg(test)]
impl Drop for SimGuard {
    fn drop(&mut self) {
        SIM_LAST.with(|l| l.set(Some(now())));
        SIM.with(|s| s.set(None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A current-thread runtime whose clock starts paused, as the simulation runs one.
    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime")
    }

    /// The engine's milliseconds in a simulation have the same phase against the
    /// simulated clock whenever the simulation starts: a seed's run does not depend on
    /// the real instant it began at (before, the engine clock was the real time since
    /// the process's clock start plus the simulated time, so a deadline fell into one
    /// millisecond in one run and the next in another).
    #[test]
    fn a_simulations_engine_clock_has_the_same_phase_whenever_it_starts() {
        let phase = || {
            let runtime = paused_runtime();
            let _enter = runtime.enter();
            let _sim = enter_sim();
            (
                super::super::clock_elapsed().subsec_nanos() % 1_000_000,
                unix_ms(),
                super::super::now_ms(),
            )
        };
        let (a, wall_a, ms_a) = phase();
        std::thread::sleep(Duration::from_micros(300));
        let (b, wall_b, ms_b) = phase();
        assert_eq!(a, b, "the phase within a millisecond");
        assert_eq!(
            wall_b - wall_a,
            ms_b - ms_a,
            "the wall clock follows the engine's"
        );
    }

    #[test]
    fn in_the_simulation_timers_and_now_follow_the_paused_clock() {
        let runtime = paused_runtime();
        let real = Instant::now();
        let local = tokio::task::LocalSet::new();
        let (t0, t1) = local.block_on(&runtime, async {
            let _sim = enter_sim();
            let t0 = now();
            let (tx, rx) = flume::bounded(1);
            spawn_local(async move {
                sleep(Duration::from_secs(3600)).await;
                let _ = tx.send(now());
            });
            (t0, rx.recv_async().await.expect("the task ran"))
        });
        assert!(t1 - t0 >= Duration::from_secs(3600), "{:?}", t1 - t0);
        assert!(
            real.elapsed() < Duration::from_secs(600),
            "the hour was simulated"
        );
        // A later simulation on this thread starts where the last one ended.
        let runtime = paused_runtime();
        let _enter = runtime.enter();
        let _sim = enter_sim();
        assert!(now() >= t1);
    }
}
