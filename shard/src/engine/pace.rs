//! Pacing a forwarded batch to the subscribers that read it (`impl Engine`;
//! docs/ARCHITECTURE.md "Cluster data plane", "QoS 0 across nodes is paced").
//!
//! Within one node a publisher's input is read a chunk at a time, and the
//! connection task yields after each chunk, so its subscribers' connections
//! write out what it delivered before the next chunk: deliveries are made at
//! the pace the subscribers take them. A batch another node forwarded carries
//! up to thousands of publications; handed to the engine at once it lands in
//! a subscriber's write buffer (`Limits::write_buffer_bytes_max`) and queue
//! (`Limits::queued_count_max`) faster than any reader can take it, and QoS 0
//! overflows: about 9 % of a QoS 0 fan-in across nodes was dropped there.
//!
//! So the driver hands a forwarded batch over in slices
//! ([`FORWARD_PACE_SLICE`]), yielding in between, and before each slice asks
//! [`Engine::forward_pace_poll`] whether a subscriber that a QoS 0 delivery
//! of this node's batches found *behind* (its connection's output over the
//! bound, so the delivery queued) has caught up (its queue empty again). It
//! waits until every one has, or at most `Limits::forward_pace_ms_max`; a
//! session still behind then does not read fast enough (or at all) and is
//! not waited for during [`FORWARD_PACE_SLOW_MS`], so its queue overflows by
//! its policy as a local one does. The wait holds the batch's answer and so
//! the ordered stream from the sending node (other subscribers' messages,
//! route barriers, hand-overs): that is why it is short and why a subscriber
//! that does not keep up stops being waited for. The sending node then stops
//! taking its publishers' messages at its queue's high-water mark, so
//! publishers are slowed through TCP, as a local subscriber's pace slows a
//! local publisher.
//!
//! Only sessions of the shard serving the batch are waited for; copies for
//! other local shards (`MeshMsg::Forwarded` to them) are not paced.
//! Nothing here allocates per message: a session is noted once per time its
//! queue goes from empty to not empty.

use std::collections::BTreeMap;
use std::task::Waker;

use super::Engine;
use crate::session::{ConnId, SessionIdx};

/// Publications of a forwarded batch the driver hands to the engine between
/// two looks at [`Engine::forward_pace_poll`]: well under the default queue
/// bound (1,000), so a subscriber that caught up before a slice cannot
/// overflow during it.
pub const FORWARD_PACE_SLICE: usize = 256;

/// How long a session that did not catch up within the bound is not waited
/// for: a subscriber slower than the link then costs the stream one bound
/// per this period at most.
pub const FORWARD_PACE_SLOW_MS: u64 = 1_000;

/// The pacing state of one shard.
#[derive(Debug, Default)]
pub(super) struct ForwardPace {
    /// Whether the deliveries being made are of a forwarded batch served here.
    pub(super) active: bool,
    /// Sessions a forwarded QoS 0 delivery found behind, with the connection
    /// it found (a session noted twice is looked at twice, harmlessly).
    behind: Vec<(SessionIdx, ConnId)>,
    /// Sessions not waited for until the time (broker milliseconds).
    slow: BTreeMap<SessionIdx, u64>,
    /// The driver's task waiting for the sessions behind.
    waker: Option<Waker>,
}

impl Engine {
    /// A QoS 0 delivery to session `idx` (connection `conn`) is being queued
    /// instead of written: when it is one of a forwarded batch and the queue
    /// was empty, the session is behind and the next slice waits for it.
    pub(super) fn pace_note(&mut self, now_ms: u64, idx: SessionIdx, conn: ConnId) {
        if !self.pace.active
            || self.limits.forward_pace_ms_max == 0
            || !self.session(idx).queue.is_empty()
        {
            return;
        }
        if let Some(until) = self.pace.slow.get(&idx) {
            if *until > now_ms {
                return;
            }
            self.pace.slow.remove(&idx);
        }
        self.pace.behind.push((idx, conn));
    }

    /// Whether session `idx` (noted with `conn`) caught up: its queue is
    /// empty, or it is gone or no longer connected there (nothing to wait
    /// for).
    fn pace_caught_up(&self, idx: SessionIdx, conn: ConnId) -> bool {
        let live = self.sessions.get(idx as usize).and_then(Option::as_ref);
        match live {
            Some(s) if s.conn == Some(conn) && !self.is_ended(conn) => s.queue.is_empty(),
            _ => true,
        }
    }

    /// Whether the next slice of a forwarded batch may be handed over: every
    /// session a QoS 0 delivery found behind caught up. If not, `waker` is
    /// woken when one may have (its connection wrote its output out, or it
    /// ended); the driver waits at most `Limits::forward_pace_ms_max`, then
    /// calls [`Engine::forward_pace_expired`].
    pub fn forward_pace_poll(&mut self, waker: &Waker) -> bool {
        let mut behind = std::mem::take(&mut self.pace.behind);
        behind.retain(|&(idx, conn)| !self.pace_caught_up(idx, conn));
        self.pace.behind = behind;
        if self.pace.behind.is_empty() {
            self.pace.waker = None;
            return true;
        }
        if !self.pace.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.pace.waker = Some(waker.clone());
        }
        false
    }

    /// The wait for the sessions behind reached its bound: they do not keep
    /// up, and are not waited for during [`FORWARD_PACE_SLOW_MS`].
    pub fn forward_pace_expired(&mut self, now_ms: u64) {
        let behind = std::mem::take(&mut self.pace.behind);
        for (idx, conn) in behind {
            if !self.pace_caught_up(idx, conn) {
                self.pace
                    .slow
                    .insert(idx, now_ms.saturating_add(FORWARD_PACE_SLOW_MS));
            }
        }
        self.pace.waker = None;
        self.stats.forward_pace_timeouts += 1;
        // Entries of sessions that caught up long ago.
        self.pace.slow.retain(|_, until| *until > now_ms);
    }

    /// The driver waited for sessions behind before a slice (counted).
    pub fn record_forward_paced(&mut self) {
        self.stats.forward_paced += 1;
    }

    /// A connection wrote its output out or ended: the driver waiting for
    /// sessions behind looks again.
    pub(super) fn pace_wake(&mut self) {
        if !self.pace.behind.is_empty()
            && let Some(w) = self.pace.waker.take()
        {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    //! Goal: a QoS 0 publication of a forwarded batch that finds a subscriber
    //! behind makes the driver wait before the next slice until that
    //! subscriber caught up (woken when its connection wrote its output out),
    //! a subscriber that did not catch up within the bound is not waited for
    //! during `FORWARD_PACE_SLOW_MS`, and local publishers never make anyone
    //! wait. Method: one engine in a cluster whose connections take one
    //! delivery before they are over their write bound; the test plays the
    //! driver (output taken, `flushed`, `forward_pace_poll` with a counting
    //! waker).

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use bytes::Bytes;
    use tessera_proto::{Packet, ProtocolVersion, Publish, QoS, Str};

    use super::super::testing::{connect_packet, drain, engines, subscribe_packet};
    use super::super::{Engine, Limits};
    use super::FORWARD_PACE_SLOW_MS;
    use crate::mesh::{MeshMsg, ShardId};
    use crate::message::{Message, SessionUid};
    use crate::session::ConnId;

    const V5: ProtocolVersion = ProtocolVersion::V5;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A one-shard engine in a cluster whose connections are over their write
    /// bound after one delivery, a QoS 0 subscriber to `t` (SUBACK taken), and
    /// the remote id.
    fn setup() -> (Engine, ShardId, ConnId) {
        let limits = Limits {
            write_buffer_bytes_max: 1,
            ..Limits::default()
        };
        let mut e = engines(1, &limits).remove(0);
        let remote = e.enable_remote().expect("room for the remote id");
        let c = e.connect(1, connect_packet(V5, "sub", true), false);
        drain(&mut e, c, V5); // CONNACK
        e.handle_packet(1, c, subscribe_packet("t", QoS::AtMostOnce));
        let mut acks = Vec::new();
        e.drain_outbox(|_, batch| {
            for m in batch {
                if let MeshMsg::RouteAdd { ack: Some(t), .. } = m {
                    acks.push(t);
                }
            }
        });
        for token in acks {
            e.handle_mesh(1, remote, MeshMsg::Ack { token });
        }
        drain(&mut e, c, V5); // SUBACK
        (e, remote, c)
    }

    fn forwarded(e: &mut Engine, remote: ShardId, now_ms: u64, n: u32) {
        let message = Message {
            topic: Str::from_static("t"),
            payload: Bytes::from(n.to_string()),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: None,
            expires_at_ms: None,
            origin: Some(SessionUid::remote(7)),
            received_us: 0,
        };
        let mark = None;
        e.handle_mesh(
            now_ms,
            remote,
            MeshMsg::Forwarded {
                message,
                mark,
                ack: None,
                id: None,
                earlier_life: false,
                routes_index: 0,
            },
        );
    }

    /// The connection writes its output out: the payloads it had.
    fn write_out(e: &mut Engine, c: ConnId, now_ms: u64) -> Vec<String> {
        let got = drain(e, c, V5)
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(String::from_utf8(p.payload.to_vec()).unwrap()),
                _ => None,
            })
            .collect();
        e.flushed(now_ms, c);
        got
    }

    #[test]
    fn a_forwarded_qos0_delivery_that_queues_makes_the_next_slice_wait_until_it_caught_up() {
        let (mut e, remote, c) = setup();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        forwarded(&mut e, remote, 10, 0); // written
        assert!(e.forward_pace_poll(&waker), "nothing is behind yet");
        forwarded(&mut e, remote, 10, 1); // over the bound: queued
        forwarded(&mut e, remote, 10, 2);
        assert!(!e.forward_pace_poll(&waker), "the subscriber is behind");
        // It writes its output out: the queue moves up, the waiting driver is
        // woken, and once the queue is empty the next slice may go.
        assert_eq!(write_out(&mut e, c, 11), ["0"]);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(!e.forward_pace_poll(&waker), "one still queued");
        assert_eq!(write_out(&mut e, c, 11), ["1"]);
        assert!(e.forward_pace_poll(&waker), "caught up");
        assert_eq!(write_out(&mut e, c, 11), ["2"]);
        assert_eq!(e.stats().dropped_queue_full, 0);
        assert_eq!(e.stats().forward_pace_timeouts, 0);
    }

    #[test]
    fn a_subscriber_that_did_not_catch_up_in_time_is_not_waited_for_during_the_slow_period() {
        let (mut e, remote, c) = setup();
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        forwarded(&mut e, remote, 10, 0);
        forwarded(&mut e, remote, 10, 1);
        assert!(!e.forward_pace_poll(&waker));
        // The driver's bound passed: the session is slow.
        e.forward_pace_expired(30);
        assert_eq!(e.stats().forward_pace_timeouts, 1);
        assert!(
            e.forward_pace_poll(&waker),
            "nothing waited for after the bound"
        );
        // It catches up, and falls behind again within the slow period: not
        // waited for.
        write_out(&mut e, c, 31);
        write_out(&mut e, c, 31);
        forwarded(&mut e, remote, 40, 2);
        forwarded(&mut e, remote, 40, 3);
        assert!(
            e.forward_pace_poll(&waker),
            "waited for within the slow period"
        );
        write_out(&mut e, c, 41);
        write_out(&mut e, c, 41);
        // After it, it is waited for again.
        let later = 30 + FORWARD_PACE_SLOW_MS;
        forwarded(&mut e, remote, later, 4);
        forwarded(&mut e, remote, later, 5);
        assert!(
            !e.forward_pace_poll(&waker),
            "not waited for after the slow period"
        );
    }

    #[test]
    fn local_publishers_and_a_connection_that_ended_make_nobody_wait() {
        let (mut e, remote, c) = setup();
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let p = e.connect(1, connect_packet(V5, "pub", true), false);
        drain(&mut e, p, V5);
        for n in 0..3 {
            let publish = Publish::new(Str::from_static("t"), Bytes::from(n.to_string()));
            e.handle_packet(10, p, Packet::Publish(publish));
        }
        assert!(e.forward_pace_poll(&waker), "a local publisher paced");
        write_out(&mut e, c, 11);
        write_out(&mut e, c, 11);
        write_out(&mut e, c, 11);
        // Behind on a forwarded message, then the connection ends.
        forwarded(&mut e, remote, 20, 3);
        forwarded(&mut e, remote, 20, 4);
        assert!(!e.forward_pace_poll(&waker));
        e.connection_lost(21, c);
        assert!(e.forward_pace_poll(&waker), "waits for an ended connection");
    }
}
