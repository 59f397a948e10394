//! Pacing the QoS 0 publishers of a session that asks for it (`impl Engine`;
//! docs/BRIDGES.md, "QoS 0 publishers are paced").
//!
//! A bridge's local session ([`Engine::set_feed_pace`]) forwards to a remote
//! broker that may take messages slower than the local clients publish them.
//! QoS 1/2 publishers are slowed by back-pressure (their acknowledgements are
//! held, `backpressure`); nothing slowed a QoS 0 publisher, so the session's
//! queue grew to its byte budget (`Limits::queue_bytes_max`) and QoS 0 was
//! dropped there: millions of messages in the bridge benchmark.
//!
//! Rule. When a QoS 0 delivery is queued into a paced session (connected,
//! its output over the bound) whose queue holds `Limits::queue_high_water`
//! deliveries or more ([`FEED_PACE_HIGH_WATER_DEFAULT`] with back-pressure
//! off), the publisher being routed is paused:
//! - a client of this shard: its connection stops being read
//!   ([`Engine::input_paused`], which the driver checks after every packet it
//!   hands over, so the pause takes effect at once, not at the next read);
//!   TCP then slows the publisher;
//! - a publication another shard of this node sent: the driver stops taking
//!   that shard's stream ([`Engine::feed_pace_peer_poll`]); its queue to
//!   this shard fills and its readers pause (`MESH_BACKLOG_BATCHES_MAX`).
//!
//! Paused publishers resume when the session's queue is below half the
//! high-water mark (checked where the queue moves: `pump`), when the
//! session's connection ends (a bridge whose link went down queues nothing
//! of QoS 0), or at the session's bound: when nothing left its queue for
//! `bound_ms` (each delivery that leaves it starts the bound over, so a slow
//! remote that keeps reading paces its publishers for as long as it is
//! behind), the driver calls [`Engine::feed_pace_expire`]; a session still
//! behind then (a remote that stopped reading but is still connected) is not
//! waited for during [`FEED_PACE_SLOW_MS`], and QoS 0 beyond its budget is
//! dropped and counted as before (`Stats::dropped_queue_full`). So a stalled
//! remote costs the publishers feeding it at most one bound per
//! `FEED_PACE_SLOW_MS`.
//!
//! Publications forwarded by another node are paced by `pace` (the
//! forwarded batch waits for the session), not here. Nothing here
//! allocates per message: a publisher is noted once per pause, and the
//! checks on the hot paths are an emptiness test while nothing is paced.

use std::collections::BTreeMap;
use std::task::Waker;

use super::Engine;
use crate::mesh::ShardId;
use crate::session::{ConnId, SessionIdx};

/// How long a paced session that did not catch up within its bound is not
/// waited for: a remote that stopped reading costs its publishers one bound
/// per this period at most.
pub const FEED_PACE_SLOW_MS: u64 = 1_000;

/// The queue length at which QoS 0 publishers are paused when back-pressure
/// is off (`Limits::queue_high_water` 0); its default otherwise.
pub const FEED_PACE_HIGH_WATER_DEFAULT: usize = 250;

/// Who publishes the message being routed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum FeedSource {
    #[default]
    None,
    /// A client of this shard.
    Local(ConnId),
    /// A plain publication another shard of this node sent.
    Peer(ShardId),
}

/// A session whose QoS 0 publishers are paced.
#[derive(Debug)]
struct Paced {
    /// The connection it was set for; another one (or none) ends the pacing.
    conn: ConnId,
    /// Longest wait, milliseconds.
    bound_ms: u64,
    /// While publishers wait for it: when it fell behind, or when a delivery
    /// last left its queue since (the bound counts from there).
    behind_since_ms: Option<u64>,
    /// Not waited for until then (broker milliseconds).
    slow_until_ms: u64,
}

/// The pacing state of one shard.
#[derive(Debug, Default)]
pub(super) struct FeedPace {
    /// Paced sessions (one per bridge of this shard).
    sessions: BTreeMap<SessionIdx, Paced>,
    /// The publisher of the message being routed.
    pub(super) source: FeedSource,
    /// Paused clients of this shard, with the session each waits for.
    paused: Vec<(ConnId, SessionIdx)>,
    /// Peer shards whose stream waits, with the session.
    peers: Vec<(ShardId, SessionIdx)>,
    /// The drivers' tasks receiving those streams.
    peer_wakers: Vec<(ShardId, Waker)>,
}

impl Engine {
    /// Paces the QoS 0 publishers of `conn`'s session (a bridge's local
    /// session) for at most `bound_ms` at a time while its queue is behind;
    /// 0 stops pacing it. Lasts until the connection ends.
    pub fn set_feed_pace(&mut self, conn: ConnId, bound_ms: u64) {
        let Some(c) = self.slot(conn) else {
            return;
        };
        let idx = c.session;
        if idx == SessionIdx::MAX {
            return;
        }
        if bound_ms == 0 {
            self.feed.sessions.remove(&idx);
            self.feed_release(idx);
            return;
        }
        self.feed.sessions.insert(
            idx,
            Paced {
                conn,
                bound_ms,
                behind_since_ms: None,
                slow_until_ms: 0,
            },
        );
    }

    fn feed_high_water(&self) -> usize {
        match self.limits.queue_high_water {
            0 => FEED_PACE_HIGH_WATER_DEFAULT,
            n => n,
        }
    }

    /// Whether any session is paced (the hot paths look no further if not).
    pub(super) fn feed_on(&self) -> bool {
        !self.feed.sessions.is_empty()
    }

    /// A QoS 0 delivery to session `idx` (connection `conn`) was queued: when
    /// the session is paced and behind, the publisher being routed pauses.
    pub(super) fn feed_note(&mut self, now_ms: u64, idx: SessionIdx, conn: ConnId) {
        let high_water = self.feed_high_water();
        let queued = self.session(idx).queue.len();
        let Some(p) = self.feed.sessions.get_mut(&idx) else {
            return;
        };
        if p.conn != conn || now_ms < p.slow_until_ms || queued < high_water {
            return;
        }
        match self.feed.source {
            FeedSource::None => return,
            FeedSource::Local(publisher) => {
                // Never paced by its own session.
                if self.feed.paused.iter().any(|(c, _)| *c == publisher)
                    || self.slot(publisher).is_none_or(|c| c.session == idx)
                {
                    return;
                }
                self.feed.paused.push((publisher, idx));
            }
            FeedSource::Peer(from) => {
                if self.feed.peers.iter().any(|(s, _)| *s == from) {
                    return;
                }
                self.feed.peers.push((from, idx));
            }
        }
        let p = self.feed.sessions.get_mut(&idx).expect("looked up above");
        p.behind_since_ms.get_or_insert(now_ms);
        self.stats.feed_paced += 1;
    }

    /// Whether client `conn` is paused for a paced session.
    pub(super) fn feed_paused(&self, conn: ConnId) -> bool {
        !self.feed.paused.is_empty() && self.feed.paused.iter().any(|(c, _)| *c == conn)
    }

    /// When the wait of paused client `conn` reaches its bound (broker
    /// milliseconds): the driver calls [`Engine::feed_pace_expire`] then.
    pub fn feed_pace_deadline(&self, conn: ConnId) -> Option<u64> {
        let (_, idx) = self.feed.paused.iter().find(|(c, _)| *c == conn)?;
        self.feed_deadline(*idx)
    }

    fn feed_deadline(&self, idx: SessionIdx) -> Option<u64> {
        let p = self.feed.sessions.get(&idx)?;
        Some(p.behind_since_ms?.saturating_add(p.bound_ms))
    }

    /// When the wait of the stream from shard `peer` reaches its bound
    /// (broker milliseconds), or `None` when it may be taken on. At the
    /// bound the driver calls [`Engine::feed_pace_expire`].
    pub fn feed_pace_peer_deadline(&self, peer: ShardId) -> Option<u64> {
        let (_, idx) = self.feed.peers.iter().find(|(s, _)| *s == peer)?;
        // A session no longer paced (its link ended) holds nobody.
        self.feed_deadline(*idx).or(Some(0))
    }

    /// Whether the stream from shard `peer` may be taken on; if not, `waker`
    /// is woken when it may.
    pub fn feed_pace_peer_poll(&mut self, peer: ShardId, waker: &Waker) -> bool {
        if !self.feed.peers.iter().any(|(s, _)| *s == peer) {
            return true;
        }
        match self.feed.peer_wakers.iter_mut().find(|(s, _)| *s == peer) {
            Some((_, w)) if w.will_wake(waker) => {}
            Some((_, w)) => *w = waker.clone(),
            None => self.feed.peer_wakers.push((peer, waker.clone())),
        }
        false
    }

    /// The driver's wait reached a bound: every paced session behind for its
    /// bound or longer releases its publishers, and if it is still behind it
    /// is not waited for during [`FEED_PACE_SLOW_MS`] (counted in
    /// `Stats::feed_pace_timeouts`).
    pub fn feed_pace_expire(&mut self, now_ms: u64) {
        let low_water = self.feed_high_water() / 2;
        let due: Vec<SessionIdx> = self
            .feed
            .sessions
            .iter()
            .filter(|(_, p)| {
                p.behind_since_ms
                    .is_some_and(|t| t.saturating_add(p.bound_ms) <= now_ms)
            })
            .map(|(idx, _)| *idx)
            .collect();
        for idx in due {
            if self.session(idx).queue.len() >= low_water {
                if let Some(p) = self.feed.sessions.get_mut(&idx) {
                    p.slow_until_ms = now_ms.saturating_add(FEED_PACE_SLOW_MS);
                }
                self.stats.feed_pace_timeouts += 1;
            }
            self.feed_release(idx);
        }
        // Waits for sessions that are no longer paced (their link ended).
        let orphans: Vec<SessionIdx> = self
            .feed
            .paused
            .iter()
            .map(|(_, i)| *i)
            .chain(self.feed.peers.iter().map(|(_, i)| *i))
            .filter(|i| !self.feed.sessions.contains_key(i))
            .collect();
        for idx in orphans {
            self.feed_release(idx);
        }
    }

    /// Session `idx`'s queue was looked at (`pump`; `moved`: deliveries
    /// left it): below the low-water mark its publishers resume; above it,
    /// progress starts the bound over, so a slow remote that keeps reading
    /// paces its publishers for as long as it is behind, and only one that
    /// took nothing for a whole bound releases them.
    pub(super) fn feed_drained(&mut self, now_ms: u64, idx: SessionIdx, moved: bool) {
        if self.feed.paused.is_empty() && self.feed.peers.is_empty() {
            return;
        }
        if self.session(idx).queue.len() >= self.feed_high_water() / 2 {
            if moved
                && let Some(p) = self.feed.sessions.get_mut(&idx)
                && p.behind_since_ms.is_some()
            {
                p.behind_since_ms = Some(now_ms);
            }
            return;
        }
        self.feed_release(idx);
    }

    /// Connection `conn` ended: as a paced session's, its publishers resume
    /// and the session is no longer paced; as a paused publisher's, it is
    /// forgotten.
    pub(super) fn feed_conn_ended(&mut self, conn: ConnId, idx: SessionIdx) {
        if !self.feed_on() {
            return;
        }
        self.feed.paused.retain(|(c, _)| *c != conn);
        if self.feed.sessions.get(&idx).is_some_and(|p| p.conn == conn) {
            self.feed.sessions.remove(&idx);
            self.feed_release(idx);
        }
    }

    /// Resumes every publisher waiting for session `idx`.
    fn feed_release(&mut self, idx: SessionIdx) {
        if let Some(p) = self.feed.sessions.get_mut(&idx) {
            p.behind_since_ms = None;
        }
        let mut i = 0;
        while i < self.feed.paused.len() {
            if self.feed.paused[i].1 != idx {
                i += 1;
                continue;
            }
            let (conn, _) = self.feed.paused.swap_remove(i);
            if let Some(w) = self.slot_mut(conn).and_then(|c| c.out.waker.take()) {
                w.wake();
            }
        }
        let mut i = 0;
        while i < self.feed.peers.len() {
            if self.feed.peers[i].1 != idx {
                i += 1;
                continue;
            }
            let (peer, _) = self.feed.peers.swap_remove(i);
            if let Some(at) = self.feed.peer_wakers.iter().position(|(s, _)| *s == peer) {
                let (_, w) = self.feed.peer_wakers.swap_remove(at);
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Goal: a QoS 0 publisher whose messages queue at a paced session (a
    //! bridge's) past the high-water mark stops being read until the queue
    //! is below half of it, a publisher on another shard holds that shard's
    //! stream likewise, the wait ends when nothing left the queue for the
    //! bound (and the session is then not waited for during
    //! `FEED_PACE_SLOW_MS`), an unpaced session paces
    //! nobody, and the end of the session's connection releases everyone.
    //! Method: one engine whose connections are over their write bound after
    //! one delivery; the test plays the driver (output taken, `flushed`).

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use bytes::Bytes;
    use tessera_proto::{Packet, ProtocolVersion, Publish, QoS, Str};

    use super::super::testing::{connect_packet, drain, engines, pump_mesh, subscribe_packet};
    use super::super::{Engine, Limits};
    use super::FEED_PACE_SLOW_MS;
    use crate::mesh::MeshMsg;
    use crate::message::{Message, SessionUid};
    use crate::session::ConnId;

    const V5: ProtocolVersion = ProtocolVersion::V5;
    const HIGH: usize = 4;
    const BOUND_MS: u64 = 50;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The engine of shard 0 of two whose connections are over their write
    /// bound after one delivery, a QoS 0 subscriber `bridge` to `t` there
    /// (paced when `paced`), and a publisher `pub` there.
    fn setup(paced: bool) -> (Engine, ConnId, ConnId) {
        let limits = Limits {
            write_buffer_bytes_max: 1,
            queue_high_water: HIGH,
            queued_count_max: 100,
            ..Limits::default()
        };
        let mut es = engines(2, &limits);
        let b = es[0].connect(1, connect_packet(V5, "bridge", false), false);
        drain(&mut es[0], b, V5);
        es[0].handle_packet(1, b, subscribe_packet("t", QoS::AtMostOnce));
        pump_mesh(&mut es, 1);
        let mut e = es.swap_remove(0);
        assert!(
            drain(&mut e, b, V5)
                .iter()
                .any(|p| matches!(p, Packet::SubAck(_)))
        );
        e.flushed(1, b);
        if paced {
            e.set_feed_pace(b, BOUND_MS);
        }
        let p = e.connect(1, connect_packet(V5, "pub", true), false);
        drain(&mut e, p, V5);
        (e, b, p)
    }

    fn publish(e: &mut Engine, p: ConnId, now_ms: u64, n: usize) {
        for k in 0..n {
            let publish = Publish::new(Str::from_static("t"), Bytes::from(k.to_string()));
            e.handle_packet(now_ms, p, Packet::Publish(publish));
        }
    }

    /// The subscriber's connection writes its output out, `times` times.
    fn write_out(e: &mut Engine, c: ConnId, now_ms: u64, times: usize) -> usize {
        let mut got = 0;
        for _ in 0..times {
            got += drain(e, c, V5)
                .iter()
                .filter(|p| matches!(p, Packet::Publish(_)))
                .count();
            e.flushed(now_ms, c);
        }
        got
    }

    #[test]
    fn a_qos0_publisher_pauses_at_the_high_water_mark_and_resumes_below_half_of_it() {
        let (mut e, b, p) = setup(true);
        // One written, then queued: the one that makes HIGH queued pauses.
        publish(&mut e, p, 10, HIGH);
        assert!(!e.input_paused(p), "below the high-water mark");
        publish(&mut e, p, 10, 1);
        assert!(e.input_paused(p), "paused at the high-water mark");
        assert_eq!(e.feed_pace_deadline(p), Some(10 + BOUND_MS));
        assert_eq!(e.stats().feed_paced, 1);
        // The bridge takes its output: the queue moves up, below half the mark.
        write_out(&mut e, b, 11, 3);
        assert!(!e.input_paused(p), "resumed below half the mark");
        assert_eq!(e.feed_pace_deadline(p), None);
        assert_eq!(write_out(&mut e, b, 11, 10), 2);
        assert_eq!(e.stats().dropped_queue_full, 0);
        assert_eq!(e.stats().feed_pace_timeouts, 0);
    }

    #[test]
    fn a_session_not_paced_pauses_nobody() {
        let (mut e, _b, p) = setup(false);
        publish(&mut e, p, 10, 3 * HIGH);
        assert!(!e.input_paused(p));
        assert_eq!(e.stats().feed_paced, 0);
    }

    #[test]
    fn at_the_bound_publishers_resume_and_the_session_is_not_waited_for_a_while() {
        let (mut e, b, p) = setup(true);
        publish(&mut e, p, 10, HIGH + 1);
        assert!(e.input_paused(p));
        e.feed_pace_expire(10 + BOUND_MS - 1);
        assert!(e.input_paused(p), "before the bound");
        // One delivery leaves the queue at 40 (still behind): the bound
        // counts from there.
        write_out(&mut e, b, 40, 1);
        assert!(e.input_paused(p));
        assert_eq!(e.feed_pace_deadline(p), Some(40 + BOUND_MS));
        e.feed_pace_expire(10 + BOUND_MS);
        assert!(e.input_paused(p), "the remote made progress");
        e.feed_pace_expire(40 + BOUND_MS);
        assert!(!e.input_paused(p), "released at the bound");
        assert_eq!(e.stats().feed_pace_timeouts, 1);
        // Within the slow period it is not waited for.
        publish(&mut e, p, 100, 5);
        assert!(!e.input_paused(p), "paused within the slow period");
        // After it (and caught up), it is again.
        write_out(&mut e, b, 100, 20);
        let later = 40 + BOUND_MS + FEED_PACE_SLOW_MS;
        publish(&mut e, p, later, HIGH + 1);
        assert!(e.input_paused(p), "not paused after the slow period");
    }

    #[test]
    fn the_end_of_the_paced_sessions_connection_releases_its_publishers() {
        let (mut e, b, p) = setup(true);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        publish(&mut e, p, 10, HIGH + 1);
        assert!(e.input_paused(p));
        // The driver of the publisher waits on its output's waker.
        e.output(p).unwrap().waker = Some(Waker::from(count.clone()));
        e.connection_lost(11, b);
        assert!(!e.input_paused(p));
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "woken");
        // Detached: QoS 0 is dropped as for any offline session, nobody waits.
        publish(&mut e, p, 12, HIGH + 1);
        assert!(!e.input_paused(p));
    }

    #[test]
    fn a_publication_from_another_shard_holds_that_shards_stream() {
        let (mut e, b, _p) = setup(true);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let from = 1;
        let message = |k: usize| Message {
            topic: Str::from_static("t"),
            payload: Bytes::from(k.to_string()),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: None,
            expires_at_ms: None,
            origin: Some(SessionUid(99)),
            received_us: 0,
        };
        for k in 0..HIGH {
            e.handle_mesh(
                10,
                from,
                MeshMsg::Publish {
                    message: message(k),
                    id: None,
                },
            );
        }
        assert!(e.feed_pace_peer_poll(from, &waker));
        e.handle_mesh(
            10,
            from,
            MeshMsg::Publish {
                message: message(HIGH),
                id: None,
            },
        );
        assert!(!e.feed_pace_peer_poll(from, &waker), "the stream waits");
        assert_eq!(e.feed_pace_peer_deadline(from), Some(10 + BOUND_MS));
        write_out(&mut e, b, 11, 3);
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "woken");
        assert!(e.feed_pace_peer_poll(from, &waker));
        assert_eq!(e.feed_pace_peer_deadline(from), None);
    }
}
