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
use std::time::{Duration, Instant};

thread_local! {
    /// On a simulation thread: the real instant and tokio's (paused) instant at entry.
    static SIM: Cell<Option<(Instant, tokio::time::Instant)>> = const { Cell::new(None) };
    /// Where the last simulation on this thread left [`now`]: the next one starts no
    /// earlier, so the clock never goes back between two simulations.
    #[cfg(test)]
    static SIM_LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

fn sim() -> Option<(Instant, tokio::time::Instant)> {
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
        Some((real, paused)) => real + paused.elapsed(),
    }
}

/// Wall-clock milliseconds since the Unix epoch. In the simulation they follow [`now`]
/// (the real wall clock at a fixed instant, plus the simulated time since), so the
/// wall-clock times the store and the takeover keep (expiries, a ghost's window) move
/// with the simulated clock across a node's restart, as they do in production.
pub(super) fn unix_ms() -> u64 {
    fn system_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
    if sim().is_none() {
        return system_ms();
    }
    static ANCHOR: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    let (at, ms) = *ANCHOR.get_or_init(|| (Instant::now(), system_ms()));
    let t = now();
    match t.checked_duration_since(at) {
        Some(d) => ms + d.as_millis() as u64,
        None => ms.saturating_sub(at.duration_since(t).as_millis() as u64),
    }
}

/// Marks this thread as a simulation thread until the guard drops: [`sleep`],
/// [`spawn_local`] and [`now`] use tokio (call inside the runtime and its `LocalSet`).
#[cfg(test)]
pub(super) fn enter_sim() -> SimGuard {
    let real = SIM_LAST
        .with(Cell::get)
        .map_or_else(Instant::now, |last| last.max(Instant::now()));
    SIM.with(|s| s.set(Some((real, tokio::time::Instant::now()))));
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

    #[test]
    fn in_the_simulation_timers_and_now_follow_the_paused_clock() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let _enter = runtime.enter();
        let _sim = enter_sim();
        assert!(now() >= t1);
    }
}
