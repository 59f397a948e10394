//! Time-driven work of the engine (`impl Engine`), scheduled by deadline: an
//! idle connection, session or retained message costs nothing per tick.
//!
//! What is timed, and by what:
//! - keep alive (1.5 times the client's value): one entry per connection,
//!   armed at CONNECT; a packet only updates `Conn::last_packet_ms`, and when
//!   the entry comes due it is re-armed at the real deadline if the client
//!   was heard from meanwhile (so a busy connection costs one heap operation
//!   per keep-alive period, not one per packet);
//! - credential expiry (a JWT's `exp`): one entry per connection that has one;
//! - delayed wills (v5 Will Delay Interval) and session expiry: armed when the
//!   session loses its connection (or is restored without one);
//! - retained messages: a message with a Message Expiry Interval becomes a
//!   tombstone when it expires (stored deletion on the owner shard), and a
//!   tombstone is dropped `RETAINED_TOMBSTONE_MS` after it was written;
//! - back-pressure: each congested session's next hold bound, and the
//!   withdrawal of the congestion announcement (`backpressure`).
//!
//! Not timed here: message expiry in session queues is checked when a
//! delivery leaves the queue (`pump`), which costs nothing while it waits;
//! `$SYS` reports keep their own `sys_due_ms`, and the 3.1.1 publishers held
//! for a refused message (`queue_budget`) a deque in deadline order; both
//! count in `poll_timeout`.
//!
//! How: binary heaps of `(deadline, key)` with lazy cancellation. Nothing is
//! removed when the state it timed changes (a reconnect, a new retained
//! message, a freed slot); instead each entry is checked against the state
//! when it comes due, and fires only if the state still says it is due. A
//! key names a slot (connection id with its serial, session index, topic) and
//! the check compares the deadline the state holds now, so a stale or
//! duplicated entry does nothing. Stale entries are dropped from a heap once
//! it has doubled since it was last compacted (amortised O(1) per push), so
//! churn cannot grow it without bound. Ties are broken by the key's order, so
//! a run is reproducible: the simulation gives the same result for a seed.
//!
//! `Engine::tick(now_ms)` fires what is due, at most `TIMERS_PER_TICK_MAX`
//! entries per call; `Engine::poll_timeout` says when the next is due (a
//! deadline in the past means the driver should tick again at once).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tessera_proto::{Disconnect, Packet, ReasonCode, Str};

use super::{CloseReason, Engine, RETAINED_TOMBSTONE_MS, quota};
use crate::session::{ConnId, SessionIdx};

/// Entries fired per `tick` at most; the rest wait for the next call (the
/// driver calls again at once when `poll_timeout` is in the past). Bounds the
/// time one tick holds the shard when a million keep alives fall due together.
pub(super) const TIMERS_PER_TICK_MAX: usize = 10_000;

/// A heap is not compacted below this many entries: compaction is O(n), and
/// a small heap's stale entries cost little.
const COMPACT_LEN_MIN: usize = 1024;

/// A min-heap of `(deadline_ms, key)` with lazy cancellation (module docs).
#[derive(Debug)]
pub(super) struct DeadlineHeap<K: Ord> {
    heap: BinaryHeap<Reverse<(u64, K)>>,
    /// Length after the last compaction: the next one waits until the heap
    /// has doubled, which keeps compaction amortised O(1) per push.
    compacted_len: usize,
}

impl<K: Ord> Default for DeadlineHeap<K> {
    fn default() -> Self {
        DeadlineHeap {
            heap: BinaryHeap::new(),
            compacted_len: 0,
        }
    }
}

impl<K: Ord> DeadlineHeap<K> {
    pub(super) fn push(&mut self, due_ms: u64, key: K) {
        self.heap.push(Reverse((due_ms, key)));
    }

    /// The earliest deadline, stale or not.
    pub(super) fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((due, _))| *due)
    }

    /// The earliest entry if it is due at `now_ms`.
    pub(super) fn pop_due(&mut self, now_ms: u64) -> Option<(u64, K)> {
        if self.next_due()? > now_ms {
            return None;
        }
        self.heap.pop().map(|Reverse(e)| e)
    }

    /// Entries, stale ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Drops the entries `current` rejects, once the heap has doubled since
    /// the last compaction.
    pub(super) fn compact(&mut self, mut current: impl FnMut(u64, &K) -> bool) {
        if self.heap.len() <= COMPACT_LEN_MIN.max(self.compacted_len * 2) {
            return;
        }
        self.heap.retain(|Reverse((due, key))| current(*due, key));
        if self.heap.capacity() > self.heap.len() * 4 {
            self.heap.shrink_to(self.heap.len() * 2);
        }
        self.compacted_len = self.heap.len();
    }
}

/// A session-level or shard-level deadline. The order of the variants
/// breaks ties between entries due at the same millisecond: a will due when
/// its session expires is published first [MQTT-3.1.3-9].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Due {
    /// The delayed will of this session (`Engine::delayed_wills`).
    Will(SessionIdx),
    /// The end of this disconnected session.
    SessionExpiry(SessionIdx),
    /// The next back-pressure hold bound of this congested session.
    HoldBound(SessionIdx),
    /// Withdraw this shard's congestion announcement if nothing congested since.
    CongestionLinger,
}

/// The engine's deadline heaps, one per key type: a keep-alive entry is 16
/// bytes, which matters at a million idle connections.
#[derive(Debug, Default)]
pub(super) struct Timers {
    pub(super) keep_alive: DeadlineHeap<ConnId>,
    pub(super) credentials: DeadlineHeap<ConnId>,
    pub(super) due: DeadlineHeap<Due>,
    /// Retained topics whose message expires or whose tombstone ends.
    pub(super) retained: DeadlineHeap<Str>,
}

/// Which heap an entry comes from, in the order same-millisecond entries of
/// different heaps fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heap {
    Credentials,
    KeepAlive,
    Due,
    Retained,
}

impl Timers {
    /// The heap holding the earliest deadline, with it.
    fn earliest(&self) -> Option<(u64, Heap)> {
        [
            (self.credentials.next_due(), Heap::Credentials),
            (self.keep_alive.next_due(), Heap::KeepAlive),
            (self.due.next_due(), Heap::Due),
            (self.retained.next_due(), Heap::Retained),
        ]
        .into_iter()
        .filter_map(|(due, heap)| due.map(|d| (d, heap)))
        // `min_by_key` keeps the first of equal deadlines: the order above.
        .min_by_key(|(due, _)| *due)
    }

    /// Entries in all heaps, stale ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.keep_alive.len() + self.credentials.len() + self.due.len() + self.retained.len()
    }
}

impl Engine {
    /// When the engine next has time-driven work: the earliest deadline of
    /// its timers (maybe one that turns out to be cancelled) or of its `$SYS`
    /// report. `None`: nothing is scheduled. The driver calls
    /// [`Engine::tick`] at or after it; a deadline already past means work
    /// was left for another call.
    pub fn poll_timeout(&self) -> Option<u64> {
        let sys = (self.limits.sys.interval_ms > 0).then_some(self.sys_due_ms);
        let held = self.refused_holds.front().map(|(due, _)| *due);
        [self.timers.earliest().map(|(due, _)| due), sys, held]
            .into_iter()
            .flatten()
            .min()
    }

    /// Fires the timers due at `now_ms` (at most `TIMERS_PER_TICK_MAX`) and
    /// sends the `$SYS` report when it is due. Costs O(log n) per entry
    /// fired and nothing per idle connection, session or retained message.
    pub fn tick(&mut self, now_ms: u64) {
        self.compact_timers();
        for _ in 0..TIMERS_PER_TICK_MAX {
            let Some((due, heap)) = self.timers.earliest().filter(|(d, _)| *d <= now_ms) else {
                break;
            };
            match heap {
                Heap::Credentials => {
                    let (_, conn) = self.timers.credentials.pop_due(now_ms).expect("due");
                    self.credentials_due(now_ms, conn);
                }
                Heap::KeepAlive => {
                    let (_, conn) = self.timers.keep_alive.pop_due(now_ms).expect("due");
                    self.keep_alive_due(now_ms, conn);
                }
                Heap::Due => {
                    let (_, what) = self.timers.due.pop_due(now_ms).expect("due");
                    self.due(now_ms, due, what);
                }
                Heap::Retained => {
                    let (_, topic) = self.timers.retained.pop_due(now_ms).expect("due");
                    self.retained_due(now_ms, topic);
                }
            }
        }
        self.refused_holds_tick(now_ms);
        self.sys_tick(now_ms);
    }

    /// Entries in the timer heaps, cancelled ones included (tests check that
    /// idle state does not make them grow).
    #[cfg(test)]
    pub(super) fn timer_count(&self) -> usize {
        self.timers.len()
    }

    // ------------------------------------------------------------------
    // Arming: called where the state that defines a deadline is set.

    /// Arms the keep-alive timer of a connection just accepted (once per
    /// connection: the entry re-arms itself while the client is heard from).
    pub(super) fn arm_keep_alive(&mut self, conn: ConnId) {
        let c = self.conn(conn);
        if c.keep_alive_s > 0 {
            let due = keep_alive_deadline(c.last_packet_ms, c.keep_alive_s);
            self.timers.keep_alive.push(due, conn);
        }
    }

    /// Arms the credential expiry of a connection (once, when it is accepted).
    pub(super) fn arm_credentials(&mut self, conn: ConnId, expires_at_ms: u64) {
        self.timers.credentials.push(expires_at_ms, conn);
    }

    /// Arms the expiry of session `idx` after it lost its connection (or was
    /// restored without one), from its state; a session that never expires
    /// arms nothing.
    pub(super) fn arm_session_expiry(&mut self, idx: SessionIdx) {
        if let Some(due) = self.session(idx).expiry_deadline_ms() {
            self.timers.due.push(due, Due::SessionExpiry(idx));
        }
    }

    /// Arms the delayed will of session `idx`, due at `due_ms`.
    pub(super) fn arm_will(&mut self, idx: SessionIdx, due_ms: u64) {
        self.timers.due.push(due_ms, Due::Will(idx));
    }

    /// Arms the hold-bound check of congested session `idx` (`backpressure`).
    pub(super) fn arm_hold_bound(&mut self, idx: SessionIdx, due_ms: u64) {
        self.timers.due.push(due_ms, Due::HoldBound(idx));
    }

    /// Arms the withdrawal of this shard's congestion announcement.
    pub(super) fn arm_congestion_linger(&mut self, due_ms: u64) {
        self.timers.due.push(due_ms, Due::CongestionLinger);
    }

    /// Arms whatever the retained entry of `topic` now waits for: its
    /// message's expiry, or the end of its tombstone.
    pub(super) fn arm_retained(&mut self, topic: &Str) {
        let Some(e) = self.retained.get(topic, ()) else {
            return;
        };
        let due = match &e.message {
            Some(m) => m.expires_at_ms,
            None => Some(e.cleared_at_ms + RETAINED_TOMBSTONE_MS),
        };
        if let Some(due) = due {
            self.timers.retained.push(due, topic.clone());
        }
    }

    // ------------------------------------------------------------------
    // Firing: each checks that the state still says it is due.

    fn keep_alive_due(&mut self, now_ms: u64, conn: ConnId) {
        let Some(c) = self.slot(conn).filter(|c| !c.ended && c.keep_alive_s > 0) else {
            return; // the connection ended (or its slot was reused)
        };
        let due = keep_alive_deadline(c.last_packet_ms, c.keep_alive_s);
        if due > now_ms {
            // Heard from since the entry was armed: re-arm at the real deadline.
            self.timers.keep_alive.push(due, conn);
            return;
        }
        if c.version.is_v5() {
            self.write_packet(
                conn,
                &Packet::Disconnect(Disconnect::new(ReasonCode::KeepAliveTimeout)),
            );
        }
        self.end_conn(now_ms, conn, CloseReason::KeepAliveTimeout);
    }

    fn due(&mut self, now_ms: u64, due_ms: u64, what: Due) {
        match what {
            Due::Will(idx) => {
                if self
                    .delayed_wills
                    .get(&idx)
                    .is_some_and(|d| d.due_ms <= now_ms)
                {
                    let d = self.delayed_wills.remove(&idx).expect("due will present");
                    self.persist_delayed_will(idx, None);
                    self.publish_will(now_ms, d.will, d.origin);
                }
            }
            Due::SessionExpiry(idx) => {
                let expired = self
                    .sessions
                    .get(idx as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|s| s.is_expired(now_ms));
                if expired {
                    // A will is due no later than its session's end, so none
                    // should be left; if one is, the session's end publishes
                    // it [MQTT-3.1.3-9].
                    if let Some(d) = self.delayed_wills.remove(&idx) {
                        self.publish_will(now_ms, d.will, d.origin);
                    }
                    self.stats.sessions_expired += 1;
                    self.destroy_session(now_ms, idx);
                }
            }
            Due::HoldBound(idx) => self.bp_hold_bound(now_ms, idx, due_ms),
            Due::CongestionLinger => self.bp_linger_over(now_ms),
        }
    }

    fn retained_due(&mut self, now_ms: u64, topic: Str) {
        let Some(e) = self.retained.get_mut(&topic, ()) else {
            return;
        };
        match &e.message {
            Some(m) if m.is_expired(now_ms) => {
                // Every replica does this at the same deadline and keeps the
                // stamp, so an older update arriving late stays ignored.
                let size = quota::retained_size(m);
                e.message = None;
                e.cleared_at_ms = now_ms;
                self.retained_changed(Some(size), None);
                self.persist_retained(&topic);
                self.arm_retained(&topic);
            }
            None if now_ms >= e.cleared_at_ms + RETAINED_TOMBSTONE_MS => {
                self.retained.remove(&topic, ());
            }
            _ => {} // replaced since it was armed
        }
    }

    /// Drops cancelled entries from heaps that doubled since they were last
    /// compacted.
    fn compact_timers(&mut self) {
        let mut t = std::mem::take(&mut self.timers);
        let live = |e: &Engine, conn: &ConnId| e.slot(*conn).is_some_and(|c| !c.ended);
        t.keep_alive.compact(|_, conn| live(self, conn));
        t.credentials.compact(|_, conn| live(self, conn));
        t.due.compact(|due, what| match *what {
            Due::Will(idx) => self
                .delayed_wills
                .get(&idx)
                .is_some_and(|d| d.due_ms == due),
            Due::SessionExpiry(idx) => self
                .sessions
                .get(idx as usize)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.expiry_deadline_ms() == Some(due)),
            Due::HoldBound(idx) => self.bp_hold_armed(idx, due),
            Due::CongestionLinger => true,
        });
        t.retained.compact(|due, topic| {
            self.retained
                .get(topic, ())
                .is_some_and(|e| match &e.message {
                    Some(m) => m.expires_at_ms == Some(due),
                    None => e.cleared_at_ms + RETAINED_TOMBSTONE_MS == due,
                })
        });
        self.timers = t;
    }
}

/// When a connection last heard from at `last_packet_ms` times out: 1.5
/// times its keep alive [MQTT-3.1.2-22].
fn keep_alive_deadline(last_packet_ms: u64, keep_alive_s: u16) -> u64 {
    last_packet_ms + u64::from(keep_alive_s) * 1500
}

#[cfg(test)]
mod tests {
    //! Goal: every kind of timed work fires at its deadline and not a tick
    //! before, and what cancels it (traffic, a reconnect, a newer retained
    //! message) cancels it; idle state does not grow the heaps. Method: one
    //! engine driven with explicit times; the tests assert the packets a
    //! client is written, the engine's counts and its timer entry count.

    use bytes::Bytes;
    use tessera_proto::{
        ConnectProperties, Packet, ProtocolVersion, Publish, QoS, ReasonCode, Str, Subscribe,
        Subscription, SubscriptionOptions, Will, WillProperties,
    };

    use super::COMPACT_LEN_MIN;
    use crate::authz::Admission;
    use crate::engine::testing::{connect_packet, drain};
    use crate::engine::{Engine, Limits, RETAINED_TOMBSTONE_MS};
    use crate::session::ConnId;

    const V5: ProtocolVersion = ProtocolVersion::V5;

    fn engine() -> Engine {
        Engine::new(0, 1, Limits::default())
    }

    /// A v5 client `id` with keep alive `keep_alive_s`, connected at `at_ms`.
    fn connect_ka(e: &mut Engine, at_ms: u64, id: &str, keep_alive_s: u16) -> ConnId {
        let mut c = connect_packet(V5, id, true);
        c.keep_alive = keep_alive_s;
        let conn = e.connect(at_ms, c, false);
        drain(e, conn, V5); // the CONNACK
        conn
    }

    /// A persistent v5 session (`expiry_s`) for `id`, connected at `at_ms`.
    fn connect_persistent(e: &mut Engine, at_ms: u64, id: &str, expiry_s: u32) -> ConnId {
        let mut c = connect_packet(V5, id, false);
        c.properties = ConnectProperties {
            session_expiry_interval: Some(expiry_s),
            ..Default::default()
        };
        let conn = e.connect(at_ms, c, false);
        drain(e, conn, V5);
        conn
    }

    fn subscribe(e: &mut Engine, at_ms: u64, conn: ConnId, filter: &'static str) {
        let s = Subscribe {
            packet_id: 1,
            properties: Default::default(),
            subscriptions: vec![Subscription {
                filter: Str::from_static(filter),
                options: SubscriptionOptions::qos(QoS::AtLeastOnce),
            }],
        };
        e.handle_packet(at_ms, conn, Packet::Subscribe(s));
        drain(e, conn, V5); // the SUBACK (and any retained message)
    }

    fn payloads(packets: &[Packet]) -> Vec<String> {
        packets
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(String::from_utf8(p.payload.to_vec()).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn disconnect_reason(packets: &[Packet]) -> Option<ReasonCode> {
        packets.iter().find_map(|p| match p {
            Packet::Disconnect(d) => Some(d.reason_code),
            _ => None,
        })
    }

    #[test]
    fn keep_alive_ends_a_silent_connection_at_one_and_a_half_times_not_before() {
        let mut e = engine();
        let conn = connect_ka(&mut e, 1_000, "ka", 10);
        e.tick(15_999);
        assert!(!e.is_ended(conn), "1.5 x 10 s after 1 s is 16 s");
        assert!(drain(&mut e, conn, V5).is_empty());
        e.tick(16_000);
        assert!(e.is_ended(conn));
        let out = drain(&mut e, conn, V5);
        assert_eq!(disconnect_reason(&out), Some(ReasonCode::KeepAliveTimeout));
        assert_eq!(e.connection_count(), 0);
    }

    #[test]
    fn traffic_moves_the_keep_alive_deadline_with_one_timer_entry() {
        let mut e = engine();
        let conn = connect_ka(&mut e, 0, "ka", 10);
        // A PINGREQ every 10 s for ten minutes, ticking every 250 ms.
        let mut now = 0;
        while now < 600_000 {
            now += 250;
            if now % 10_000 == 0 {
                e.handle_packet(now, conn, Packet::PingReq);
            }
            e.tick(now);
            assert!(!e.is_ended(conn), "pinged in time, ended at {now}");
            assert_eq!(e.timer_count(), 1, "one keep-alive entry at {now}");
        }
        // The last PINGREQ was at 600 s: the deadline is 615 s.
        e.tick(614_999);
        assert!(!e.is_ended(conn));
        e.tick(615_000);
        assert!(e.is_ended(conn));
    }

    #[test]
    fn keep_alive_zero_arms_nothing_and_never_times_out() {
        let mut e = engine();
        let conn = connect_ka(&mut e, 0, "none", 0);
        assert_eq!(e.timer_count(), 0);
        assert_eq!(e.poll_timeout(), None);
        e.tick(u64::MAX / 2);
        assert!(!e.is_ended(conn));
    }

    #[test]
    fn a_taken_over_connection_leaves_no_keep_alive_for_its_successor() {
        let mut e = engine();
        let old = connect_ka(&mut e, 0, "same", 10);
        let new = connect_ka(&mut e, 5_000, "same", 10);
        assert!(e.is_ended(old));
        e.tick(15_000); // the old connection's deadline
        assert!(!e.is_ended(new), "the new connection's deadline is 20 s");
        e.tick(20_000);
        assert!(e.is_ended(new));
    }

    #[test]
    fn poll_timeout_names_the_next_deadline() {
        let mut e = engine();
        assert_eq!(e.poll_timeout(), None);
        let conn = connect_ka(&mut e, 1_000, "a", 4);
        assert_eq!(e.poll_timeout(), Some(7_000));
        e.handle_packet(3_000, conn, Packet::PingReq);
        // The entry still says 7 s; at 7 s it re-arms for 9 s.
        e.tick(7_000);
        assert_eq!(e.poll_timeout(), Some(9_000));
    }

    #[test]
    fn a_session_expires_at_its_interval_after_the_disconnect_not_before() {
        let mut e = engine();
        let conn = connect_persistent(&mut e, 0, "s", 10);
        e.connection_lost(1_000, conn);
        e.release(1_000, conn);
        e.tick(10_999);
        assert_eq!(e.session_count(), 1);
        e.tick(11_000);
        assert_eq!(e.session_count(), 0);
        assert_eq!(e.stats().sessions_expired, 1);
    }

    #[test]
    fn a_reconnect_cancels_the_session_expiry_and_the_next_disconnect_rearms_it() {
        let mut e = engine();
        let conn = connect_persistent(&mut e, 0, "s", 10);
        e.connection_lost(1_000, conn);
        e.release(1_000, conn);
        let conn = connect_persistent(&mut e, 5_000, "s", 10);
        e.tick(11_000); // the first disconnect's deadline
        assert_eq!(e.session_count(), 1, "connected sessions do not expire");
        e.connection_lost(8_000, conn);
        e.release(8_000, conn);
        e.tick(17_999);
        assert_eq!(e.session_count(), 1);
        e.tick(18_000);
        assert_eq!(e.session_count(), 0);
    }

    #[test]
    fn a_session_that_never_expires_arms_nothing() {
        let mut e = engine();
        let conn = connect_persistent(&mut e, 0, "forever", u32::MAX);
        e.connection_lost(1_000, conn);
        e.release(1_000, conn);
        assert_eq!(e.poll_timeout(), None);
        e.tick(u64::MAX / 2);
        assert_eq!(e.session_count(), 1);
    }

    /// A persistent session "w" with a will on `will/w` delayed 5 s, and a
    /// subscriber to `will/#`.
    fn will_setup(e: &mut Engine) -> (ConnId, ConnId) {
        let sub = connect_ka(e, 0, "sub", 0);
        subscribe(e, 0, sub, "will/#");
        let mut c = connect_packet(V5, "w", false);
        c.properties.session_expiry_interval = Some(60);
        c.will = Some(Will {
            topic: Str::from_static("will/w"),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: WillProperties {
                will_delay_interval: Some(5),
                ..Default::default()
            },
        });
        let w = e.connect(0, c, false);
        drain(e, w, V5);
        (sub, w)
    }

    #[test]
    fn a_delayed_will_is_published_at_its_delay_not_before() {
        let mut e = engine();
        let (sub, w) = will_setup(&mut e);
        e.connection_lost(1_000, w);
        e.release(1_000, w);
        e.tick(5_999);
        assert!(payloads(&drain(&mut e, sub, V5)).is_empty());
        e.tick(6_000);
        assert_eq!(payloads(&drain(&mut e, sub, V5)), ["gone"]);
        e.tick(100_000);
        assert!(payloads(&drain(&mut e, sub, V5)).is_empty(), "once");
    }

    #[test]
    fn reconnecting_within_the_will_delay_cancels_the_will() {
        let mut e = engine();
        let (sub, w) = will_setup(&mut e);
        e.connection_lost(1_000, w);
        e.release(1_000, w);
        let again = connect_persistent(&mut e, 3_000, "w", 60);
        for now in [6_000, 61_000, 200_000] {
            e.tick(now);
        }
        assert!(payloads(&drain(&mut e, sub, V5)).is_empty());
        assert!(!e.is_ended(again));
    }

    #[test]
    fn expired_credentials_close_the_connection_at_their_expiry_not_before() {
        let mut e = engine();
        let admission = Admission {
            expires_at_ms: Some(5_000),
            ..Admission::default()
        };
        let conn = e.connect_admitted(0, connect_packet(V5, "jwt", true), false, admission);
        drain(&mut e, conn, V5);
        e.tick(4_999);
        assert!(!e.is_ended(conn));
        e.tick(5_000);
        assert!(e.is_ended(conn));
        let out = drain(&mut e, conn, V5);
        assert_eq!(
            disconnect_reason(&out),
            Some(ReasonCode::MaximumConnectTime)
        );
        assert_eq!(e.stats().credentials_expired, 1);
    }

    fn publish_retained(
        e: &mut Engine,
        at_ms: u64,
        conn: ConnId,
        payload: &'static str,
        expiry_s: Option<u32>,
    ) {
        let mut p = Publish::new(
            Str::from_static("r/t"),
            Bytes::from_static(payload.as_bytes()),
        );
        p.retain = true;
        p.properties.message_expiry_interval = expiry_s;
        e.handle_packet(at_ms, conn, Packet::Publish(p));
    }

    #[test]
    fn an_expiring_retained_message_leaves_the_table_at_its_expiry() {
        let mut e = engine();
        let publisher = connect_ka(&mut e, 0, "pub", 0);
        publish_retained(&mut e, 0, publisher, "soon", Some(10));
        e.tick(9_999);
        assert_eq!(e.retained_count(), 1);
        e.tick(10_000);
        assert_eq!(e.retained_count(), 0);
        // A tombstone stays for a while, then goes too.
        assert_eq!(e.retained.len(), 1);
        e.tick(10_000 + RETAINED_TOMBSTONE_MS - 1);
        assert_eq!(e.retained.len(), 1);
        e.tick(10_000 + RETAINED_TOMBSTONE_MS);
        assert_eq!(e.retained.len(), 0);
        assert_eq!(e.timer_count(), 0);
    }

    #[test]
    fn a_newer_retained_message_cancels_the_expiry_of_the_one_it_replaced() {
        let mut e = engine();
        let publisher = connect_ka(&mut e, 0, "pub", 0);
        publish_retained(&mut e, 0, publisher, "old", Some(10));
        publish_retained(&mut e, 5_000, publisher, "new", None);
        e.tick(100_000);
        assert_eq!(e.retained_count(), 1);
        let sub = connect_ka(&mut e, 100_000, "sub", 0);
        let s = Subscribe {
            packet_id: 1,
            properties: Default::default(),
            subscriptions: vec![Subscription {
                filter: Str::from_static("r/#"),
                options: SubscriptionOptions::qos(QoS::AtMostOnce),
            }],
        };
        e.handle_packet(100_000, sub, Packet::Subscribe(s));
        assert_eq!(payloads(&drain(&mut e, sub, V5)), ["new"]);
    }

    #[test]
    fn a_cleared_retained_message_leaves_its_tombstone_for_the_tombstone_time() {
        let mut e = engine();
        let publisher = connect_ka(&mut e, 0, "pub", 0);
        publish_retained(&mut e, 0, publisher, "x", None);
        let mut clear = Publish::new(Str::from_static("r/t"), Bytes::new());
        clear.retain = true;
        e.handle_packet(1_000, publisher, Packet::Publish(clear));
        assert_eq!(e.retained_count(), 0);
        e.tick(1_000 + RETAINED_TOMBSTONE_MS - 1);
        assert_eq!(e.retained.len(), 1, "the tombstone");
        e.tick(1_000 + RETAINED_TOMBSTONE_MS);
        assert_eq!(e.retained.len(), 0);
    }

    #[test]
    fn connection_churn_does_not_grow_the_timer_heaps_without_bound() {
        let mut e = engine();
        // Connections with an hour of keep alive that come and go: each
        // leaves a cancelled entry due in 90 minutes.
        let keep = connect_ka(&mut e, 0, "stays", 3_600);
        for i in 0..(COMPACT_LEN_MIN * 8) {
            let now = i as u64;
            let conn = connect_ka(&mut e, now, &format!("c{i}"), 3_600);
            e.connection_lost(now, conn);
            e.release(now, conn);
            e.tick(now);
        }
        assert!(
            e.timer_count() <= 2 * COMPACT_LEN_MIN + 1,
            "{} entries for one live connection",
            e.timer_count()
        );
        assert!(!e.is_ended(keep));
    }
}
