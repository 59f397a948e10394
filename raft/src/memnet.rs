//! An in-memory [`Transport`] for tests, benchmarks and the seeded simulation: every
//! node of one process registers its [`Service`]; calls are delivered through tokio
//! timers with seeded faults.
//!
//! Faults: partitions (a blocked pair of nodes, both directions), crashed nodes (no
//! service registered: calls fail as unreachable), a random delay per message, and random
//! loss of the request (the callee never sees it) or of the response (the callee acted
//! but the caller hears nothing: the case idempotency keys exist for), also one chosen
//! answer at a time ([`MemNet::lose_next_answer`]). Decisions come
//! from one seeded xorshift generator, so a run on a current-thread runtime with a
//! paused clock draws the same faults for the same sequence of calls.
//!
//! The simulations (raft's `tests/simulation.rs`, the broker's data-plane `server::sim`)
//! also share their schedule generator ([`SimRng`]) and seed runner ([`run_seeds`]:
//! `SIM_SEED`, `SIM_SEEDS`, regression seeds, a failure names its seed).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::store::lock;
use crate::transport::{BoxFuture, Channel, NodeId, Service, Transport, TransportError};

/// Fault settings of a [`MemNet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    /// Requests lost, per mille.
    pub drop_request_per_mille: u32,
    /// Responses lost, per mille.
    pub drop_response_per_mille: u32,
    /// Smallest one-way delay, µs.
    pub delay_min_us: u64,
    /// Largest one-way delay, µs.
    pub delay_max_us: u64,
}

struct State {
    services: BTreeMap<NodeId, Arc<dyn Service>>,
    blocked: BTreeSet<(NodeId, NodeId)>,
    /// (caller, channel) pairs whose next answer is lost after the callee acted.
    lose_next: BTreeSet<(NodeId, u8)>,
    faults: Faults,
    rng: u64,
    calls: u64,
}

impl State {
    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && (self.next() % 1000) < per_mille as u64
    }

    fn delay(&mut self) -> Duration {
        let (lo, hi) = (
            self.faults.delay_min_us,
            self.faults.delay_max_us.max(self.faults.delay_min_us),
        );
        let us = if hi > lo {
            lo + self.next() % (hi - lo + 1)
        } else {
            lo
        };
        Duration::from_micros(us)
    }

    fn cut(&self, a: NodeId, b: NodeId) -> bool {
        self.blocked.contains(&(a, b)) || self.blocked.contains(&(b, a))
    }
}

/// The in-memory network of one process.
#[derive(Clone)]
pub struct MemNet {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemNet").finish_non_exhaustive()
    }
}

impl MemNet {
    /// A network with no faults, drawing fault decisions from `seed`.
    pub fn new(seed: u64) -> MemNet {
        MemNet {
            state: Arc::new(Mutex::new(State {
                services: BTreeMap::new(),
                blocked: BTreeSet::new(),
                lose_next: BTreeSet::new(),
                faults: Faults::default(),
                rng: seed | 1,
                calls: 0,
            })),
        }
    }

    /// The transport node `me` calls through.
    pub fn transport(&self, me: NodeId) -> Arc<dyn Transport> {
        Arc::new(MemTransport {
            net: self.clone(),
            me,
        })
    }

    /// Node `id` is up and serves with `service`.
    pub fn register(&self, id: NodeId, service: Arc<dyn Service>) {
        lock(&self.state).services.insert(id, service);
    }

    /// Node `id` is down: calls to it fail.
    pub fn unregister(&self, id: NodeId) {
        lock(&self.state).services.remove(&id);
    }

    /// Cuts the link between `a` and `b` (both directions).
    pub fn partition(&self, a: NodeId, b: NodeId) {
        lock(&self.state).blocked.insert((a, b));
    }

    /// Cuts `id` from every node in `others`.
    pub fn isolate(&self, id: NodeId, others: impl IntoIterator<Item = NodeId>) {
        let mut s = lock(&self.state);
        for o in others {
            if o != id {
                s.blocked.insert((id, o));
            }
        }
    }

    /// Loses the next answer to `caller` on `channel`: the callee acts on the request,
    /// the caller hears a timeout (a link that drops right after the callee acted).
    pub fn lose_next_answer(&self, caller: NodeId, channel: Channel) {
        lock(&self.state).lose_next.insert((caller, channel as u8));
    }

    /// Restores every link.
    pub fn heal(&self) {
        lock(&self.state).blocked.clear();
    }

    /// Sets the random faults.
    pub fn set_faults(&self, faults: Faults) {
        lock(&self.state).faults = faults;
    }

    /// A random number from the network's generator (for a harness that wants one
    /// seeded stream).
    pub fn random(&self) -> u64 {
        lock(&self.state).next()
    }

    /// Calls delivered so far.
    pub fn calls(&self) -> u64 {
        lock(&self.state).calls
    }
}

struct MemTransport {
    net: MemNet,
    me: NodeId,
}

impl Transport for MemTransport {
    fn call(
        &self,
        to: NodeId,
        channel: Channel,
        request: Bytes,
    ) -> BoxFuture<'_, Result<Bytes, TransportError>> {
        Box::pin(async move {
            let me = self.me;
            let unreachable = || TransportError::Unreachable {
                node: to,
                reason: "no route (simulated)".into(),
            };
            let (d1, d2, drop_req, drop_resp) = {
                let mut s = lock(&self.net.state);
                s.calls += 1;
                if !s.services.contains_key(&to) || s.cut(me, to) || !s.services.contains_key(&me) {
                    return Err(unreachable());
                }
                let (dq, dr) = (
                    s.faults.drop_request_per_mille,
                    s.faults.drop_response_per_mille,
                );
                (s.delay(), s.delay(), s.chance(dq), s.chance(dr))
            };
            if !d1.is_zero() {
                tokio::time::sleep(d1).await;
            }
            if drop_req {
                return Err(TransportError::Timeout(to));
            }
            let svc = {
                let s = lock(&self.net.state);
                if s.cut(me, to) {
                    return Err(unreachable());
                }
                s.services.get(&to).cloned()
            };
            let Some(svc) = svc else {
                return Err(unreachable());
            };
            let resp = svc.serve(me, channel, request).await;
            if !d2.is_zero() {
                tokio::time::sleep(d2).await;
            }
            {
                let mut s = lock(&self.net.state);
                let lost = s.lose_next.remove(&(me, channel as u8));
                if lost || drop_resp || s.cut(me, to) || !s.services.contains_key(&me) {
                    return Err(TransportError::Timeout(to));
                }
            }
            resp.map_err(|reason| TransportError::Remote { node: to, reason })
        })
    }
}

/// The seeded generator of the simulations' schedules (xorshift64*): one stream per run,
/// so a seed replays its schedule.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next number.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 for `n` = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Runs a seeded simulation over its seeds: `SIM_SEED=n` runs seed `n` alone; otherwise
/// seeds `1..=SIM_SEEDS` (default `default_seeds`; `SIM_SEEDS=a..b` runs `a..=b`) and
/// then `regression`. A failing seed panics with its number and the command that reruns
/// it; with `SIM_KEEP_GOING=1` every seed runs and the panic at the end names all the
/// failing ones (a sweep).
pub fn run_seeds(name: &str, default_seeds: u64, regression: &[u64], run: impl Fn(u64)) {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED is a number")],
        Err(_) => {
            let range = std::env::var("SIM_SEEDS")
                .ok()
                .map(|s| seed_range(&s).expect("SIM_SEEDS is a count N or a range A..B"))
                .unwrap_or(1..=default_seeds);
            range.chain(regression.iter().copied()).collect()
        }
    };
    let keep_going = std::env::var("SIM_KEEP_GOING").is_ok_and(|v| v != "0");
    let mut failed = Vec::new();
    for seed in seeds {
        eprintln!("{name} seed {seed}");
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            if !keep_going {
                panic!("{name} seed {seed} failed (rerun: SIM_SEED={seed}): {msg}");
            }
            eprintln!("{name} seed {seed} FAILED: {msg}");
            failed.push(seed);
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: seeds {failed:?} failed (rerun one: SIM_SEED=n)"
    );
}

/// `SIM_SEEDS`: a count `N` (seeds `1..=N`) or a range `A..B` (`A..=B`).
fn seed_range(s: &str) -> Option<std::ops::RangeInclusive<u64>> {
    match s.split_once("..") {
        Some((a, b)) => {
            let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            (a <= b).then_some(a..=b)
        }
        None => Some(1..=s.trim().parse().ok()?),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sim_seeds_is_a_count_or_a_range() {
        assert_eq!(super::seed_range("4"), Some(1..=4));
        assert_eq!(super::seed_range("401..1000"), Some(401..=1000));
        assert_eq!(super::seed_range("7..7"), Some(7..=7));
        assert_eq!(super::seed_range("9..3"), None);
        assert_eq!(super::seed_range("x"), None);
        assert_eq!(super::seed_range("1..y"), None);
    }
}
