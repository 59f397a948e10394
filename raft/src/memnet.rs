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
//! Faults of the process harness (issue 16), which draw nothing from the generator (a
//! run that uses none of them draws what it drew before):
//! - **One-way cuts** ([`MemNet::cut_one_way`]). A call is a request one way and an
//!   answer the other, so cutting `a -> b` loses `a`'s requests to `b` (`b` never sees
//!   them) and the answers to `b`'s requests to `a` (`a` acted, `b` hears nothing). On
//!   the QUIC link (`link`) that lasts only until the idle timeout: `b` hears nothing
//!   from `a` and drops the connection silently, `a` then hears nothing from `b`, and a
//!   redial needs a handshake both ways, so a one-way cut becomes a dead link in both
//!   directions. Modelled so: for [`MemNet::set_idle_timeout`] after the cut, calls
//!   across it lose their request or their answer and fail as a timeout at the end of
//!   that window; after it, calls either way fail as unreachable at once (the link's
//!   answer for a peer it holds dead), until [`MemNet::heal`].
//! - **A paused node** ([`MemNet::pause`], SIGSTOP): it sends nothing (a call it makes
//!   waits until it resumes, and an answer to it waits there too: a stopped process's
//!   socket buffer), and requests to it wait, up to [`PAUSED_QUEUE_MAX`] of them, to be
//!   served when it resumes; a caller gives up with a timeout at the idle timeout after
//!   the pause began (the link's liveness), and calls after that fail as unreachable at
//!   once, as to a dead peer. A request served at resume whose caller gave up is acted
//!   on, its answer lost. A paused node that crashes ([`MemNet::unregister`]) drops
//!   what waited for it. The node's own tasks are the harness's to stop.
//! - **A slow or lossy link** ([`MemNet::set_link_faults`]): [`Faults`] for one pair of
//!   nodes instead of the network's.
//!
//! Reordering: every message has its own random delay, so calls in flight at once (on
//! one channel or on several) arrive in any order; the forwarder keeps several batches
//! in flight, and the receiver refuses one out of order (`forward`, `wire`). The QUIC
//! link keeps the order of one channel's stream, so this is more reordering than the
//! link has, never less.
//!
//! The simulations (raft's `tests/simulation.rs`, the broker's data-plane `server::sim`)
//! also share their schedule generator ([`SimRng`]) and seed runner ([`run_seeds`]:
//! `SIM_SEED`, `SIM_SEEDS`, regression seeds, a failure names its seed).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use tokio::sync::watch;
use tokio::time::Instant;

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

/// How many requests wait for a paused node before more are lost (a socket buffer).
pub const PAUSED_QUEUE_MAX: usize = 256;

/// The link's idle timeout in the simulations unless set ([`MemNet::set_idle_timeout`]):
/// `LinkConfig::tuned_for_election` for elections of 150-300 ms.
const IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_millis(300);

/// A paused node.
struct Paused {
    /// This pause's number (the network's count of pauses), which waiters hold.
    epoch: u64,
    since: Instant,
    /// Requests waiting for it.
    queued: usize,
}

/// How a wait for a paused node ended.
enum Unpaused {
    Resumed,
    /// The node crashed while paused: what waited for it is gone.
    Crashed,
}

struct State {
    services: BTreeMap<NodeId, Arc<dyn Service>>,
    blocked: BTreeSet<(NodeId, NodeId)>,
    /// One-way cuts: (from, to) -> when messages from `from` to `to` began to be lost.
    one_way: BTreeMap<(NodeId, NodeId), Instant>,
    paused: BTreeMap<NodeId, Paused>,
    pauses: u64,
    /// Pauses that ended with a crash.
    crashed_pauses: BTreeSet<u64>,
    /// Faults of one link (key: the pair, lower id first) instead of `faults`.
    link_faults: BTreeMap<(NodeId, NodeId), Faults>,
    idle_timeout: Duration,
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

    fn delay(&mut self, faults: Faults) -> Duration {
        let (lo, hi) = (
            faults.delay_min_us,
            faults.delay_max_us.max(faults.delay_min_us),
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

    fn faults_of(&self, a: NodeId, b: NodeId) -> Faults {
        self.link_faults
            .get(&(a.min(b), a.max(b)))
            .copied()
            .unwrap_or(self.faults)
    }

    /// When the link between `a` and `b` dies of a one-way cut or of a pause (the idle
    /// timeout after it began), if one is on.
    fn dies_at(&self, a: NodeId, b: NodeId) -> Option<Instant> {
        let cut = [(a, b), (b, a)]
            .iter()
            .filter_map(|k| self.one_way.get(k).copied())
            .min();
        let paused = [a, b]
            .iter()
            .filter_map(|n| self.paused.get(n).map(|p| p.since))
            .min();
        [cut, paused]
            .into_iter()
            .flatten()
            .min()
            .map(|since| since + self.idle_timeout)
    }

    /// The link between `a` and `b` is held dead (a one-way cut or a pause older than
    /// the idle timeout): calls fail at once.
    fn dead(&self, a: NodeId, b: NodeId) -> bool {
        self.dies_at(a, b).is_some_and(|t| Instant::now() >= t)
    }
}

/// The in-memory network of one process.
#[derive(Clone)]
pub struct MemNet {
    state: Arc<Mutex<State>>,
    /// Bumped when a pause ends (resumed or crashed), for the calls that wait on one.
    unpaused: Arc<watch::Sender<u64>>,
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
                one_way: BTreeMap::new(),
                paused: BTreeMap::new(),
                pauses: 0,
                crashed_pauses: BTreeSet::new(),
                link_faults: BTreeMap::new(),
                idle_timeout: IDLE_TIMEOUT_DEFAULT,
                lose_next: BTreeSet::new(),
                faults: Faults::default(),
                rng: seed | 1,
                calls: 0,
            })),
            unpaused: Arc::new(watch::channel(0).0),
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

    /// Node `id` is down: calls to it fail (requests waiting for it while it was paused
    /// are lost, and its pause ends).
    pub fn unregister(&self, id: NodeId) {
        let mut s = lock(&self.state);
        s.services.remove(&id);
        if let Some(p) = s.paused.remove(&id) {
            s.crashed_pauses.insert(p.epoch);
            drop(s);
            self.unpaused.send_modify(|n| *n += 1);
        }
    }

    /// Node `id` stops (SIGSTOP): see the module's header. Its own tasks are the
    /// caller's to stop.
    pub fn pause(&self, id: NodeId) {
        let mut s = lock(&self.state);
        if s.paused.contains_key(&id) {
            return;
        }
        s.pauses += 1;
        let epoch = s.pauses;
        s.paused.insert(
            id,
            Paused {
                epoch,
                since: Instant::now(),
                queued: 0,
            },
        );
    }

    /// Node `id` runs again (SIGCONT): what waited for it is served, what it sent goes.
    pub fn resume(&self, id: NodeId) {
        if lock(&self.state).paused.remove(&id).is_some() {
            self.unpaused.send_modify(|n| *n += 1);
        }
    }

    /// Whether node `id` is paused.
    pub fn is_paused(&self, id: NodeId) -> bool {
        lock(&self.state).paused.contains_key(&id)
    }

    /// Cuts messages from `from` to `to` only (see the module's header: on a
    /// request/answer link this is `from`'s requests and the answers to `to`'s).
    pub fn cut_one_way(&self, from: NodeId, to: NodeId) {
        lock(&self.state)
            .one_way
            .entry((from, to))
            .or_insert_with(Instant::now);
    }

    /// How long a link lives after one of its directions stopped carrying messages (a
    /// one-way cut, a paused end): the link's idle timeout.
    pub fn set_idle_timeout(&self, idle: Duration) {
        lock(&self.state).idle_timeout = idle;
    }

    /// Random faults of the link between `a` and `b`, instead of the network's.
    pub fn set_link_faults(&self, a: NodeId, b: NodeId, faults: Faults) {
        lock(&self.state)
            .link_faults
            .insert((a.min(b), a.max(b)), faults);
    }

    /// Every link has the network's faults again.
    pub fn clear_link_faults(&self) {
        lock(&self.state).link_faults.clear();
    }

    /// Waits while `id` is paused; says whether it resumed or crashed meanwhile.
    async fn while_paused(&self, id: NodeId) -> Unpaused {
        let mut rx = self.unpaused.subscribe();
        let epoch = match lock(&self.state).paused.get(&id) {
            Some(p) => p.epoch,
            None => return Unpaused::Resumed,
        };
        loop {
            {
                let s = lock(&self.state);
                if s.crashed_pauses.contains(&epoch) {
                    return Unpaused::Crashed;
                }
                if s.paused.get(&id).is_none_or(|p| p.epoch != epoch) {
                    return Unpaused::Resumed;
                }
            }
            if rx.changed().await.is_err() {
                return Unpaused::Crashed;
            }
        }
    }

    /// A request to the paused node `to`: waits in its queue (bounded) to be served
    /// when it resumes, whether or not its caller still waits then. The answer comes
    /// on the returned channel; `None` if the queue is full.
    fn queue_for_paused(
        &self,
        from: NodeId,
        to: NodeId,
        channel: Channel,
        request: Bytes,
    ) -> Option<tokio::sync::oneshot::Receiver<Result<Bytes, String>>> {
        {
            let mut s = lock(&self.state);
            let p = s.paused.get_mut(&to)?;
            if p.queued >= PAUSED_QUEUE_MAX {
                return None;
            }
            p.queued += 1;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let net = self.clone();
        tokio::spawn(async move {
            if let Unpaused::Crashed = net.while_paused(to).await {
                return;
            }
            let svc = lock(&net.state).services.get(&to).cloned();
            if let Some(svc) = svc {
                let _ = tx.send(svc.serve(from, channel, request).await);
            }
        });
        Some(rx)
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

    /// Restores every link (one-way cuts too; not a paused node, nor a link's faults).
    pub fn heal(&self) {
        let mut s = lock(&self.state);
        s.blocked.clear();
        s.one_way.clear();
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
            let net = &self.net;
            let unreachable = || TransportError::Unreachable {
                node: to,
                reason: "no route (simulated)".into(),
            };
            // A paused node sends nothing until it runs again.
            if let Unpaused::Crashed = net.while_paused(me).await {
                return Err(TransportError::Closed);
            }
            let (d1, d2, drop_req, drop_resp) = {
                let mut s = lock(&net.state);
                s.calls += 1;
                if !s.services.contains_key(&to)
                    || s.cut(me, to)
                    || !s.services.contains_key(&me)
                    || s.dead(me, to)
                {
                    return Err(unreachable());
                }
                let f = s.faults_of(me, to);
                let (dq, dr) = (f.drop_request_per_mille, f.drop_response_per_mille);
                (s.delay(f), s.delay(f), s.chance(dq), s.chance(dr))
            };
            if !d1.is_zero() {
                tokio::time::sleep(d1).await;
            }
            if drop_req {
                return Err(TransportError::Timeout(to));
            }
            let (svc, lost_until, paused_until) = {
                let s = lock(&net.state);
                if s.cut(me, to) || s.dead(me, to) {
                    return Err(unreachable());
                }
                let lost = s.one_way.contains_key(&(me, to));
                let paused = s.paused.contains_key(&to);
                let until = s.dies_at(me, to);
                (
                    s.services.get(&to).cloned(),
                    until.filter(|_| lost),
                    until.filter(|_| paused),
                )
            };
            // The request is lost one way: the caller hears nothing until its link dies.
            if let Some(until) = lost_until {
                tokio::time::sleep_until(until).await;
                return Err(TransportError::Timeout(to));
            }
            let resp = if let Some(until) = paused_until {
                let Some(answer) = net.queue_for_paused(me, to, channel, request) else {
                    return Err(TransportError::Timeout(to));
                };
                match tokio::time::timeout_at(until, answer).await {
                    Ok(Ok(resp)) => resp,
                    _ => return Err(TransportError::Timeout(to)),
                }
            } else {
                let Some(svc) = svc else {
                    return Err(unreachable());
                };
                svc.serve(me, channel, request).await
            };
            if !d2.is_zero() {
                tokio::time::sleep(d2).await;
            }
            // The answer is lost one way: the caller hears nothing until its link dies.
            let lost_until = {
                let s = lock(&net.state);
                s.dies_at(me, to)
                    .filter(|_| s.one_way.contains_key(&(to, me)))
            };
            if let Some(until) = lost_until {
                tokio::time::sleep_until(until).await;
                return Err(TransportError::Timeout(to));
            }
            // An answer to a paused caller waits in its socket buffer.
            if let Unpaused::Crashed = net.while_paused(me).await {
                return Err(TransportError::Closed);
            }
            {
                let mut s = lock(&net.state);
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
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// Answers every request with its own bytes and counts what it served.
    struct Echo(Arc<AtomicU64>);

    impl Service for Echo {
        fn serve(
            &self,
            _from: NodeId,
            _channel: Channel,
            request: Bytes,
        ) -> BoxFuture<'_, Result<Bytes, String>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move { Ok(request) })
        }
    }

    /// Nodes 1 and 2, each with its served count.
    fn two_nodes() -> (MemNet, [Arc<AtomicU64>; 2]) {
        let net = MemNet::new(7);
        let served = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
        net.register(1, Arc::new(Echo(served[0].clone())));
        net.register(2, Arc::new(Echo(served[1].clone())));
        (net, served)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime")
    }

    fn call(
        net: &MemNet,
        from: NodeId,
        to: NodeId,
    ) -> BoxFuture<'static, Result<Bytes, TransportError>> {
        let t = net.transport(from);
        Box::pin(async move { t.call(to, Channel::Forward, Bytes::from_static(b"x")).await })
    }

    const IDLE: Duration = Duration::from_millis(300);

    #[test]
    fn a_one_way_cut_loses_requests_one_way_and_answers_the_other_then_the_link_dies() {
        runtime().block_on(async {
            let (net, served) = two_nodes();
            net.set_idle_timeout(IDLE);
            net.cut_one_way(1, 2);
            let start = Instant::now();
            // 1's request is lost: 2 never sees it, 1 hears a timeout when the link dies.
            assert_eq!(call(&net, 1, 2).await, Err(TransportError::Timeout(2)));
            assert_eq!(served[1].load(Ordering::Relaxed), 0);
            assert_eq!(start.elapsed(), IDLE);
            // Within the window (a new cut), 2's request reaches 1, which acts; the
            // answer is lost.
            net.heal();
            net.cut_one_way(1, 2);
            let start = Instant::now();
            assert_eq!(call(&net, 2, 1).await, Err(TransportError::Timeout(1)));
            assert_eq!(served[0].load(Ordering::Relaxed), 1);
            assert_eq!(start.elapsed(), IDLE);
            // After it, the link is dead both ways, at once.
            for (a, b) in [(1, 2), (2, 1)] {
                assert!(matches!(
                    call(&net, a, b).await,
                    Err(TransportError::Unreachable { .. })
                ));
            }
            assert_eq!(start.elapsed(), IDLE);
            assert_eq!(served[0].load(Ordering::Relaxed), 1);
            net.heal();
            assert_eq!(call(&net, 1, 2).await, Ok(Bytes::from_static(b"x")));
            assert_eq!(call(&net, 2, 1).await, Ok(Bytes::from_static(b"x")));
        });
    }

    #[test]
    fn a_paused_node_serves_at_resume_what_waited_and_sends_nothing_before() {
        runtime().block_on(async {
            let (net, served) = two_nodes();
            net.set_idle_timeout(IDLE);
            // A short pause: the caller waits and gets its answer at resume.
            net.pause(2);
            let n = net.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                n.resume(2);
            });
            let start = Instant::now();
            assert_eq!(call(&net, 1, 2).await, Ok(Bytes::from_static(b"x")));
            assert_eq!(start.elapsed(), Duration::from_millis(100));

            // A long one: the caller gives up at the idle timeout; the request waits and
            // is served at resume (its answer lost); later calls fail at once.
            net.pause(2);
            let start = Instant::now();
            assert_eq!(call(&net, 1, 2).await, Err(TransportError::Timeout(2)));
            assert_eq!(start.elapsed(), IDLE);
            assert!(matches!(
                call(&net, 1, 2).await,
                Err(TransportError::Unreachable { .. })
            ));
            // What the paused node sends waits until it runs again.
            let from_paused = tokio::spawn(call(&net, 2, 1));
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert_eq!(served[1].load(Ordering::Relaxed), 1);
            assert_eq!(served[0].load(Ordering::Relaxed), 0);
            assert!(!from_paused.is_finished());
            net.resume(2);
            assert_eq!(
                from_paused.await.expect("the call"),
                Ok(Bytes::from_static(b"x"))
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert_eq!(served[1].load(Ordering::Relaxed), 2);
            assert_eq!(served[0].load(Ordering::Relaxed), 1);

            // Killed while paused: what waited is gone, not served by the next life.
            net.pause(2);
            let waiting = tokio::spawn(call(&net, 1, 2));
            tokio::time::sleep(Duration::from_millis(10)).await;
            net.unregister(2);
            net.register(2, Arc::new(Echo(served[1].clone())));
            assert!(waiting.await.expect("the call").is_err());
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(served[1].load(Ordering::Relaxed), 2);
            assert_eq!(call(&net, 1, 2).await, Ok(Bytes::from_static(b"x")));
        });
    }

    #[test]
    fn a_links_own_faults_replace_the_networks() {
        runtime().block_on(async {
            let (net, _) = two_nodes();
            net.register(3, Arc::new(Echo(Arc::new(AtomicU64::new(0)))));
            net.set_link_faults(
                2,
                1,
                Faults {
                    delay_min_us: 200_000,
                    delay_max_us: 200_000,
                    ..Faults::default()
                },
            );
            let start = Instant::now();
            assert!(call(&net, 1, 2).await.is_ok());
            assert_eq!(start.elapsed(), Duration::from_millis(400));
            let start = Instant::now();
            assert!(call(&net, 1, 3).await.is_ok());
            assert_eq!(start.elapsed(), Duration::ZERO);
            net.clear_link_faults();
            let start = Instant::now();
            assert!(call(&net, 2, 1).await.is_ok());
            assert_eq!(start.elapsed(), Duration::ZERO);
        });
    }

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
