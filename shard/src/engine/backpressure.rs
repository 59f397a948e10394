//! Per-publisher back-pressure (`impl Engine`): a QoS 1/2 publisher whose
//! messages land in a subscriber queue that is filling up gets its PUBACK /
//! PUBREC late instead of getting it at once and having the message dropped
//! later by the queue's overflow policy.
//!
//! Rule. When a QoS 1/2 delivery enters a *connected* session whose queue
//! holds `Limits::queue_high_water` deliveries or more, the session becomes
//! *congested* and the publication's acknowledgement waits for it: the
//! publication gets a token in `pending_retains` (the held-acknowledgement
//! path retained messages and sync durability already use, which keeps acks
//! in PUBLISH order), and the session records the token as a *waiter*. A
//! congested session releases all its waiters when its queue drops below the
//! low-water mark (half the high-water mark), when its connection ends (an
//! offline session does not throttle anyone), or one by one when a waiter is
//! older than `Limits::backpressure_hold_ms_max` (then the overflow policy
//! applies at the hard limit, as without back-pressure; counted in
//! `Stats::backpressure_hold_timeouts`).
//!
//! The publisher is then stopped by MQTT flow control: its own window (v5:
//! the Receive Maximum we announce; v3: its client's inflight setting) fills
//! with unacknowledged messages. Its connection keeps being read, so the
//! PUBACKs it sends for deliveries to it still free its own queue, and two
//! clients feeding each other's queues cannot lock each other. Only a client
//! with more held acknowledgements than four times the Receive Maximum (a
//! 3.1.1 client with a very large window) stops being read
//! ([`Engine::input_paused`]); that lasts at most the hold bound.
//!
//! A publisher is never throttled by its own session (a client subscribed to
//! what it publishes). QoS 0 is not affected.
//!
//! Across shards: a shard with congested sessions tells every peer
//! (`MeshMsg::Congestion`, sent when the first session becomes congested
//! and one second after the last drained, so rarely). While a peer is congested, QoS 1/2
//! publications forwarded to it go as `PublishDurable` with the publisher's
//! token; the peer delivers, and answers `Ack` when the congested sessions it
//! delivered to drained (or at the hold bound), after its commit under sync
//! durability. With no congested peer the mesh carries nothing extra.
//! Deliveries to shared-subscription members are held the same way: on this
//! shard through the publisher's routing, on another shard through the token
//! a `SharedPublish` carries (`shared`, `Engine::shared_take`).
//!
//! Across nodes: a batch another node forwarded is the publisher
//! (`Publisher::Remote` with the serving shard and the batch's token,
//! `remote`): congested sessions hold the batch's answer, and the sending
//! node holds its publishers' acknowledgements until it arrives. A session
//! that held an acknowledgement the whole bound (`Congested::stuck`) holds no
//! further forwarded batch until it drains: the batch's answer delays the
//! whole stream from that node.

use std::collections::{BTreeMap, HashMap, VecDeque};

use tessera_proto::{ProtocolVersion, QoS};

use super::Engine;
use crate::mesh::{MeshMsg, ShardId};
use crate::session::{ConnId, SessionIdx};

/// A connection with more held acknowledgements than this many times the
/// Receive Maximum stops being read. Not 1: a paused client's PUBACKs for
/// its own deliveries are not read either, so two 3.1.1 clients with windows
/// above the bound feeding each other's queues would wait for the hold
/// bound; 4 keeps common 3.1.1 windows (up to 128 with the default 32)
/// reading, while a client ignoring every window is still stopped.
const HELD_ACKS_PER_RECEIVE_MAXIMUM: usize = 4;

/// How long a shard keeps telling its peers it is congested after its last
/// congested session drained. A queue under sustained overload drains below
/// the low-water mark and refills over and over; withdrawing the announcement
/// each time would let the peers forward unheld (acknowledged at once) until
/// the next announcement arrives, a window a busy shard can make long.
const CONGESTION_LINGER_MS: u64 = 1_000;

/// Who published the message being routed, while it is routed.
#[derive(Debug, Clone, Copy)]
enum Publisher {
    /// A client of this shard: its connection and session.
    Local { conn: ConnId, session: SessionIdx },
    /// A publication another shard forwarded as `PublishDurable`.
    Remote { from: ShardId, ack: u64 },
}

/// The publication being routed and the token its acknowledgement waits on,
/// once it has one.
#[derive(Debug, Clone, Copy)]
struct Routing {
    publisher: Publisher,
    token: Option<u64>,
    /// A publication another node forwarded (held as its batch's answer).
    forwarded: bool,
}

/// A held acknowledgement waiting for a congested session.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    /// When it is released whatever the queue, broker milliseconds.
    deadline_ms: u64,
    /// The token: in `pending_retains` (local publisher) or in
    /// `BackPressure::remote` (a publisher on another shard).
    token: u64,
}

/// A congested local session.
#[derive(Debug, Default)]
struct Congested {
    /// The acknowledgements waiting for it, oldest (earliest deadline) first.
    waiters: VecDeque<Waiter>,
    /// The deadline of its `Due::HoldBound` timer: the front waiter's
    /// deadline, or without waiters one hold bound after the last check.
    timer_due_ms: u64,
    /// Whether an acknowledgement waited for it the whole hold bound since it
    /// became congested (it is not draining): it holds no further forwarded
    /// batch until it drains. A batch's answer delays everything its node
    /// sends this one (one ordered stream per node pair), so a subscriber
    /// that stopped reading must not hold the link one bound per batch.
    stuck: bool,
}

/// Back-pressure state of one shard.
#[derive(Debug)]
pub(super) struct BackPressure {
    /// Congested local sessions with the acknowledgements waiting for them,
    /// oldest first. Ordered so releases are reproducible in the simulation.
    /// Bounded: a publisher has at most its window (or the Receive Maximum,
    /// beyond which it is not read) of held acknowledgements.
    congested: BTreeMap<SessionIdx, Congested>,
    /// Per shard: whether it announced congested sessions.
    peer_congested: Vec<bool>,
    /// Whether this shard announced congested sessions to its peers.
    announced: bool,
    /// When this shard's last congested session drained (broker
    /// milliseconds); the announcement is withdrawn only
    /// `CONGESTION_LINGER_MS` later (`Due::CongestionLinger`).
    congested_at_ms: u64,
    /// The publication being routed (set around `publish_acked` and the
    /// delivery of a `PublishDurable`).
    routing: Option<Routing>,
    /// Tokens of publications from other shards held here: token -> (the
    /// publisher's shard, its token, congested sessions still waited for,
    /// the epoch holding what the delivery stored, 0: nothing).
    remote: HashMap<u64, (ShardId, u64, usize, u64)>,
}

impl BackPressure {
    pub(super) fn new(shard_count: usize) -> BackPressure {
        BackPressure {
            congested: BTreeMap::new(),
            peer_congested: vec![false; shard_count],
            announced: false,
            congested_at_ms: 0,
            routing: None,
            remote: HashMap::new(),
        }
    }
}

impl Engine {
    pub(super) fn bp_on(&self) -> bool {
        self.limits.queue_high_water > 0
    }

    /// Whether shard `to` announced congested sessions.
    pub(super) fn bp_peer_congested(&self, to: ShardId) -> bool {
        self.bp
            .peer_congested
            .get(usize::from(to))
            .copied()
            .unwrap_or(false)
    }

    /// Low-water mark: a congested session below it releases its waiters.
    fn bp_low_water(&self) -> usize {
        self.limits.queue_high_water / 2
    }

    /// A client of this shard publishes: until [`Engine::bp_end_local`],
    /// deliveries into congested sessions hold its acknowledgement. `token`
    /// is the one it already has (retained, sync durability), if any.
    pub(super) fn bp_begin_local(
        &mut self,
        conn: ConnId,
        session: SessionIdx,
        qos: QoS,
        token: Option<u64>,
    ) {
        if self.bp_on() && qos != QoS::AtMostOnce {
            self.bp.routing = Some(Routing {
                publisher: Publisher::Local { conn, session },
                token,
                forwarded: false,
            });
        }
    }

    /// Ends the routing of a local publication: the token its
    /// acknowledgement waits on, if back-pressure gave it one.
    pub(super) fn bp_end_local(&mut self) -> Option<u64> {
        self.bp.routing.take().and_then(|r| r.token)
    }

    /// A `PublishDurable` from `from` is delivered here (`forwarded`: a
    /// publication of a batch another node forwarded, `ack` the batch's).
    /// Also with back-pressure off: a moved session's ghost here holds the `Ack`
    /// the same way while it holds the copy (`moved`, [`Engine::bp_hold_remote`]).
    pub(super) fn bp_begin_remote(&mut self, from: ShardId, ack: u64, qos: QoS, forwarded: bool) {
        if qos != QoS::AtMostOnce {
            self.bp.routing = Some(Routing {
                publisher: Publisher::Remote { from, ack },
                token: None,
                forwarded,
            });
        }
    }

    /// Ends the delivery of a `PublishDurable`: true when congested sessions
    /// hold its `Ack` (sent when they drain), false when the caller answers.
    pub(super) fn bp_end_remote(&mut self) -> bool {
        let Some(token) = self.bp.routing.take().and_then(|r| r.token) else {
            return false;
        };
        // What the delivery stored is in the current epoch: the `Ack`, sent
        // when the sessions drain, waits for its commit too (a drain itself
        // may store nothing).
        let epoch = self.current_durable_epoch();
        if let Some(entry) = self.bp.remote.get_mut(&token) {
            entry.3 = epoch;
        }
        true
    }

    /// The token of the publication being routed, allocated on first use.
    fn bp_token(&mut self) -> Option<u64> {
        let routing = self.bp.routing?;
        if let Some(t) = routing.token {
            return Some(t);
        }
        let t = self.next_token;
        self.next_token += 1;
        match routing.publisher {
            Publisher::Local { conn, .. } => {
                self.pending_retains.insert(t, (conn, 0));
            }
            Publisher::Remote { from, ack } => {
                self.bp.remote.insert(t, (from, ack, 0, 0));
            }
        }
        if let Some(r) = self.bp.routing.as_mut() {
            r.token = Some(t);
        }
        Some(t)
    }

    /// A moved session's ghost holds (or sends on to its new node) the copy of the
    /// `PublishDurable` being delivered: its `Ack` waits until the ghost lets go of
    /// it ([`Engine::bp_release_held_remote`]), as for a congested session. `None`
    /// when no other shard waits for this delivery.
    pub(super) fn bp_hold_remote(&mut self) -> Option<u64> {
        if !matches!(
            self.bp.routing,
            Some(Routing {
                publisher: Publisher::Remote { .. },
                ..
            })
        ) {
            return None;
        }
        let token = self.bp_token()?;
        let (_, _, n, _) = self.bp.remote.get_mut(&token)?;
        *n += 1;
        Some(token)
    }

    /// Whether `token` is one this shard holds another shard's `Ack` with.
    pub(super) fn bp_holds_remote(&self, token: u64) -> bool {
        self.bp.remote.contains_key(&token)
    }

    /// A ghost let go of a copy it held for `token` ([`Engine::bp_hold_remote`]):
    /// delivered to its session taken back here, sent on and accepted by the new
    /// node, or dropped with the ghost. The `Ack` waits for the commit of what is
    /// stored now too. False when `token` is not such a token.
    pub(super) fn bp_release_held_remote(&mut self, token: u64) -> bool {
        let epoch = self.current_durable_epoch();
        let Some(entry) = self.bp.remote.get_mut(&token) else {
            return false;
        };
        entry.3 = entry.3.max(epoch);
        self.bp_release_token(token);
        true
    }

    /// The token a QoS 1/2 publication forwarded to `to` must carry so `to`
    /// can hold its acknowledgement: only while `to` announced congestion.
    pub(super) fn bp_forward_token(&mut self, to: ShardId) -> Option<u64> {
        let local = matches!(
            self.bp.routing,
            Some(Routing {
                publisher: Publisher::Local { .. },
                ..
            })
        );
        if local && self.bp_peer_congested(to) {
            self.bp_token()
        } else {
            None
        }
    }

    /// A QoS 1/2 delivery enters session `idx`: at or over the high-water
    /// mark the session is congested, and the acknowledgement of the
    /// publication being routed (if any: a plain `Publish` from a shard that
    /// did not know yet carries no token) waits for it.
    pub(super) fn bp_on_enqueue(&mut self, now_ms: u64, idx: SessionIdx) {
        if !self.bp_on() {
            return;
        }
        let routing = self.bp.routing;
        if let Some(Routing {
            publisher: Publisher::Local { session, .. },
            ..
        }) = routing
            && session == idx
        {
            return; // never throttled by its own queue
        }
        let s = self.session(idx);
        if s.conn.is_none() || s.queue.len() < self.limits.queue_high_water {
            return;
        }
        // Checked again one hold bound from now even without waiters, in case
        // its queue shrinks by a path `bp_drained` does not see.
        let due = self.bp_next_check(now_ms);
        if let std::collections::btree_map::Entry::Vacant(e) = self.bp.congested.entry(idx) {
            e.insert(Congested {
                waiters: VecDeque::new(),
                timer_due_ms: due,
                stuck: false,
            });
            self.arm_hold_bound(idx, due);
            self.bp_announce(true);
        }
        let Some(routing) = routing else {
            return;
        };
        if routing.forwarded && self.bp.congested.get(&idx).is_some_and(|c| c.stuck) {
            return;
        }
        let Some(token) = self.bp_token() else {
            return;
        };
        match routing.publisher {
            Publisher::Local { .. } => {
                if let Some((_, n)) = self.pending_retains.get_mut(&token) {
                    *n += 1;
                }
            }
            Publisher::Remote { .. } => {
                if let Some((_, _, n, _)) = self.bp.remote.get_mut(&token) {
                    *n += 1;
                }
            }
        }
        let deadline_ms = now_ms.saturating_add(self.limits.backpressure_hold_ms_max);
        let c = self.bp.congested.entry(idx).or_default();
        c.waiters.push_back(Waiter { deadline_ms, token });
        if c.waiters.len() == 1 && c.timer_due_ms > deadline_ms {
            c.timer_due_ms = deadline_ms;
            self.arm_hold_bound(idx, deadline_ms);
        }
        self.stats.backpressure_acks_held += 1;
    }

    /// Session `idx` sent from its queue: below the low-water mark it
    /// releases every acknowledgement waiting for it.
    pub(super) fn bp_drained(&mut self, now_ms: u64, idx: SessionIdx) {
        if self.bp.congested.is_empty() || !self.bp.congested.contains_key(&idx) {
            return;
        }
        if self.session(idx).queue.len() < self.bp_low_water() {
            self.bp_release_session(now_ms, idx);
        }
    }

    /// Session `idx` lost its connection or ended: it throttles no one.
    pub(super) fn bp_session_offline(&mut self, now_ms: u64, idx: SessionIdx) {
        if self.bp.congested.contains_key(&idx) {
            self.bp_release_session(now_ms, idx);
        }
    }

    /// When a congested session with no waiter due earlier is looked at
    /// again: one hold bound from now, and never in the past, so a zero
    /// bound cannot keep one tick busy.
    fn bp_next_check(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(self.limits.backpressure_hold_ms_max.max(1))
    }

    /// The hold-bound timer of congested session `idx`, armed for `due_ms`,
    /// came due (`timers`): releases the acknowledgements held longer than
    /// the bound, or all of them when the session drained or went offline
    /// by a path `bp_drained` does not see, and re-arms for the next waiter.
    pub(super) fn bp_hold_bound(&mut self, now_ms: u64, idx: SessionIdx, due_ms: u64) {
        if !self.bp_hold_armed(idx, due_ms) {
            return; // released (and maybe congested again) since it was armed
        }
        let low = self.bp_low_water();
        let live = self.sessions[idx as usize]
            .as_ref()
            .is_some_and(|s| s.conn.is_some() && s.queue.len() >= low);
        if !live {
            return self.bp_release_session(now_ms, idx);
        }
        while let Some(w) = self.bp.congested.get_mut(&idx).and_then(|c| {
            c.waiters
                .front()
                .is_some_and(|w| w.deadline_ms <= now_ms)
                .then(|| c.waiters.pop_front())
                .flatten()
        }) {
            self.stats.backpressure_hold_timeouts += 1;
            self.bp_release_token(w.token);
            if let Some(c) = self.bp.congested.get_mut(&idx) {
                c.stuck = true;
            }
        }
        let next = self.bp_next_check(now_ms);
        let Some(c) = self.bp.congested.get_mut(&idx) else {
            return;
        };
        let due = c
            .waiters
            .front()
            .map_or(next, |w| w.deadline_ms.max(now_ms + 1));
        c.timer_due_ms = due;
        self.arm_hold_bound(idx, due);
    }

    /// Whether the hold-bound timer of `idx` armed for `due_ms` is current.
    pub(super) fn bp_hold_armed(&self, idx: SessionIdx, due_ms: u64) -> bool {
        self.bp
            .congested
            .get(&idx)
            .is_some_and(|c| c.timer_due_ms == due_ms)
    }

    /// The congestion linger timer came due: withdraws the announcement if
    /// no session was congested since the last one drained.
    pub(super) fn bp_linger_over(&mut self, now_ms: u64) {
        if self.bp.congested.is_empty() && now_ms >= self.bp.congested_at_ms + CONGESTION_LINGER_MS
        {
            self.bp_announce(false);
        }
    }

    /// A persistent queue here went over its byte budget
    /// (`engine::queue_budget`): announce congestion, so peers forward QoS
    /// 1/2 publications with a token this shard can refuse, until
    /// `CONGESTION_LINGER_MS` after the last such event.
    pub(super) fn bp_queue_full(&mut self, now_ms: u64) {
        self.bp.congested_at_ms = self.bp.congested_at_ms.max(now_ms);
        self.bp_announce(true);
    }

    /// A peer announced whether it has congested sessions.
    pub(super) fn bp_on_congestion(&mut self, from: ShardId, congested: bool) {
        self.bp.peer_congested[usize::from(from)] = congested;
    }

    fn bp_release_session(&mut self, now_ms: u64, idx: SessionIdx) {
        let Some(c) = self.bp.congested.remove(&idx) else {
            return;
        };
        for w in c.waiters {
            self.bp_release_token(w.token);
        }
        if self.bp.congested.is_empty() && self.bp.announced {
            self.bp.congested_at_ms = now_ms;
            self.arm_congestion_linger(now_ms + CONGESTION_LINGER_MS);
        }
    }

    /// One congested session no longer holds `token`.
    fn bp_release_token(&mut self, token: u64) {
        if self.pending_retains.contains_key(&token) {
            self.on_retain_ack(token);
        } else if let Some((from, ack, n, epoch)) = self.bp.remote.get_mut(&token) {
            super::count_down(n, &mut self.stats, self.shard, "held remote acks");
            if *n == 0 {
                let (from, ack, epoch) = (*from, *ack, *epoch);
                self.bp.remote.remove(&token);
                self.ack_after_epoch(from, ack, epoch);
            }
        }
    }

    /// Tells the peers when this shard starts having congested sessions, or
    /// (by timer, `CONGESTION_LINGER_MS` after the last drained) stops.
    fn bp_announce(&mut self, congested: bool) {
        if congested == self.bp.announced || self.shard_count == 1 {
            return;
        }
        self.bp.announced = congested;
        for to in 0..self.shard_count {
            if to != usize::from(self.shard) {
                self.outbox[to].push(MeshMsg::Congestion { congested });
            }
        }
    }

    /// Whether the driver should stop decoding and reading `conn`: it has
    /// more acknowledgements held than `HELD_ACKS_PER_RECEIVE_MAXIMUM` times
    /// the Receive Maximum, which a v5 client honouring it cannot reach, nor
    /// a 3.1.1 client with a usual window (rumqttc 100, Paho 10-65535 but
    /// 20 by default). Released acknowledgements wake the connection's output
    /// waker, so the driver looks again then. Also while it is a QoS 0
    /// publisher paused for a bridge's session (`feed_pace`; woken likewise,
    /// and the driver calls `Engine::feed_pace_expire` at
    /// `Engine::feed_pace_deadline`).
    pub fn input_paused(&self, conn: ConnId) -> bool {
        let bound = usize::from(self.limits.receive_maximum) * HELD_ACKS_PER_RECEIVE_MAXIMUM;
        (self.bp_on() && self.slot(conn).is_some_and(|c| c.held_acks.len() > bound))
            || self.feed_paused(conn)
    }

    /// Most inbound QoS 2 publications awaiting PUBREL on a connection of
    /// `version` before it is closed with Receive Maximum exceeded. A v5
    /// client keeps to the Receive Maximum we announce. A 3.1.1 client knows
    /// no such limit, and while back-pressure holds its PUBRECs it cannot
    /// send PUBREL, so its own window (often above our Receive Maximum: the
    /// bench uses 64) fills with unreleased ids: it gets the bound at which it
    /// stops being read, plus the one PUBLISH that reaches it.
    pub(super) fn inbound_qos2_max(&self, version: ProtocolVersion) -> usize {
        let rm = usize::from(self.limits.receive_maximum);
        if version.is_v5() || !self.bp_on() {
            rm
        } else {
            rm * HELD_ACKS_PER_RECEIVE_MAXIMUM + 1
        }
    }

    /// The driver stopped reading a connection ([`Engine::input_paused`]).
    pub fn record_reads_paused(&mut self) {
        self.stats.backpressure_reads_paused += 1;
    }
}

#[cfg(test)]
mod tests {
    //! Goal: a fast QoS 1 publisher into a subscriber that does not read loses
    //! nothing: its acknowledgements are held while the subscriber's queue is
    //! over the high-water mark and released when it drains or at the hold
    //! bound, on one shard and across two. Method: engines exchange their
    //! mesh outboxes until quiet; v5 clients are driven packet by packet and
    //! the tests assert the packets each is sent and the drop counters.

    use bytes::Bytes;
    use tessera_proto::{
        Packet, ProtocolVersion, PubAck, Publish, QoS, Str, Subscribe, Subscription,
        SubscriptionOptions,
    };

    use crate::engine::{Engine, Limits, Stats};
    use crate::session::ConnId;

    const HIGH: usize = 10;
    const HOLD_MS: u64 = 1_000;

    struct Cluster {
        engines: Vec<Engine>,
        now_ms: u64,
    }

    #[derive(Clone, Copy)]
    struct Client {
        shard: usize,
        conn: ConnId,
    }

    impl Cluster {
        fn new(shards: usize, high: usize) -> Cluster {
            let limits = Limits {
                inflight_count_max: 4,
                queued_count_max: 1000,
                queue_high_water: high,
                backpressure_hold_ms_max: HOLD_MS,
                ..Limits::default()
            };
            Cluster {
                engines: crate::engine::testing::engines(shards, &limits),
                now_ms: 1_000,
            }
        }

        fn pump(&mut self) {
            crate::engine::testing::pump_mesh(&mut self.engines, self.now_ms);
        }

        fn connect(&mut self, shard: usize, id: &'static str) -> Client {
            let connect = crate::engine::testing::connect_packet(ProtocolVersion::V5, id, true);
            let conn = self.engines[shard].connect(self.now_ms, connect, false);
            let c = Client { shard, conn };
            assert!(matches!(self.recv(c).first(), Some(Packet::ConnAck(_))));
            c
        }

        fn send(&mut self, c: Client, packet: Packet) {
            self.engines[c.shard].handle_packet(self.now_ms, c.conn, packet);
            self.pump();
        }

        fn subscribe(&mut self, c: Client, filter: &'static str) {
            let sub = Subscribe {
                packet_id: 1,
                properties: Default::default(),
                subscriptions: vec![Subscription {
                    filter: Str::from_static(filter),
                    options: SubscriptionOptions::qos(QoS::AtLeastOnce),
                }],
            };
            self.send(c, Packet::Subscribe(sub));
            assert!(matches!(self.recv(c).first(), Some(Packet::SubAck(_))));
        }

        fn publish(&mut self, c: Client, topic: &'static str, n: u16) {
            let p = Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: Str::from_static(topic),
                packet_id: n,
                properties: Default::default(),
                payload: Bytes::from(n.to_be_bytes().to_vec()),
            };
            self.send(c, Packet::Publish(p));
        }

        /// What `c` was sent since the last call (one write's worth: the
        /// driver's flush, which moves queued deliveries, is `flushed`).
        fn recv(&mut self, c: Client) -> Vec<Packet> {
            let e = &mut self.engines[c.shard];
            let out = crate::engine::testing::drain(e, c.conn, ProtocolVersion::V5);
            e.flushed(self.now_ms, c.conn);
            self.pump();
            out
        }

        fn tick(&mut self, ms: u64) {
            self.now_ms += ms;
            for e in &mut self.engines {
                e.tick(self.now_ms);
            }
            self.pump();
        }

        /// A counter summed over every shard.
        fn stat(&self, counter: impl Fn(&Stats) -> u64) -> u64 {
            self.engines.iter().map(|e| counter(e.stats())).sum()
        }

        fn dropped(&self) -> u64 {
            self.stat(|s| s.dropped_queue_full)
        }
    }

    fn pubacks(packets: &[Packet]) -> Vec<u16> {
        packets
            .iter()
            .filter_map(|p| match p {
                Packet::PubAck(a) => Some(a.packet_id),
                _ => None,
            })
            .collect()
    }

    /// Acknowledges every PUBLISH in `packets`; returns their payload numbers.
    fn ack_all(cl: &mut Cluster, c: Client, packets: &[Packet]) -> Vec<u16> {
        let mut got = Vec::new();
        for p in packets {
            if let Packet::Publish(p) = p {
                got.push(u16::from_be_bytes([p.payload[0], p.payload[1]]));
                cl.send(c, Packet::PubAck(PubAck::new(p.packet_id)));
            }
        }
        got
    }

    /// 60 QoS 1 messages into a subscriber with a window of 4 that reads
    /// nothing: the first 4 are in flight, the next HIGH queue with their
    /// acks sent, the rest wait with their acks held. When the subscriber
    /// reads, everything arrives in order, nothing was dropped, and the held
    /// acks follow in order. `filter`: the subscriber's (a shared one makes it
    /// the group's only member).
    fn fan_in(shards: usize, filter: &'static str) {
        let mut cl = Cluster::new(shards, HIGH);
        let sub = cl.connect(shards - 1, "sub");
        cl.subscribe(sub, filter);
        let publ = cl.connect(0, "pub");
        for n in 1..=60 {
            cl.publish(publ, "t", n);
        }
        let acked = pubacks(&cl.recv(publ));
        // Across shards the delivery that congests the queue arrives before
        // the publisher's shard knows: that one is not held.
        let prompt = (4 + HIGH + shards - 1) as u16;
        assert_eq!(acked, (1..=prompt).collect::<Vec<_>>(), "the rest are held");
        let held = cl.stat(|s| s.backpressure_acks_held);
        assert_eq!(held, 60 - u64::from(prompt));
        let mut got = Vec::new();
        let mut acked = Vec::new();
        for _ in 0..100 {
            let packets = cl.recv(sub);
            got.extend(ack_all(&mut cl, sub, &packets));
            acked.extend(pubacks(&cl.recv(publ)));
            if got.len() == 60 {
                break;
            }
        }
        assert_eq!(got, (1..=60).collect::<Vec<_>>());
        assert_eq!(acked, (prompt + 1..=60).collect::<Vec<_>>());
        assert_eq!(cl.dropped(), 0);
        let timeouts = cl.stat(|s| s.backpressure_hold_timeouts);
        assert_eq!(timeouts, 0);
    }

    #[test]
    fn a_full_queue_holds_the_publishers_acks_until_it_drains() {
        fan_in(1, "t");
    }

    #[test]
    fn a_congested_queue_on_another_shard_holds_the_acks_too() {
        fan_in(2, "t");
    }

    /// A shared-subscription member is held for like a plain subscriber, on
    /// the publisher's shard and on another one. Before, a `SharedPublish` to
    /// another shard never carried a token: every PUBACK went out at once and
    /// the member's queue took all 60 (a queue bound of 20 would have dropped
    /// acknowledged messages).
    #[test]
    fn a_congested_shared_member_holds_the_acks_like_a_subscriber() {
        fan_in(1, "$share/g/t");
        fan_in(2, "$share/g/t");
    }

    /// Round robin passes over a member whose queue is at the high-water mark
    /// while another member reads: the publisher is not held at all, nothing
    /// is dropped, and each message goes to one member. Sticky keeps its
    /// member (the first to join) and holds the publisher instead.
    #[test]
    fn a_shared_group_prefers_a_member_below_the_high_water_mark() {
        for strategy in [
            super::super::shared::SharedStrategy::RoundRobin,
            super::super::shared::SharedStrategy::Sticky,
        ] {
            let mut cl = Cluster::new(1, HIGH);
            for e in &mut cl.engines {
                e.limits.shared_subscription_strategy = strategy;
            }
            let slow = cl.connect(0, "slow");
            cl.subscribe(slow, "$share/g/t");
            let reader = cl.connect(0, "reader");
            cl.subscribe(reader, "$share/g/t");
            let publ = cl.connect(0, "pub");
            let (mut acked, mut got) = (Vec::new(), Vec::new());
            for n in 1..=100 {
                cl.publish(publ, "t", n);
                acked.extend(pubacks(&cl.recv(publ)));
                let packets = cl.recv(reader);
                got.extend(ack_all(&mut cl, reader, &packets));
            }
            let slow_got = cl.recv(slow);
            let slow_got: Vec<_> = slow_got
                .iter()
                .filter(|p| matches!(p, Packet::Publish(_)))
                .collect();
            let e = &cl.engines[0];
            let queued = e.session(e.conn(slow.conn).session).queue.len();
            if strategy == super::super::shared::SharedStrategy::RoundRobin {
                assert_eq!(acked, (1..=100).collect::<Vec<_>>(), "none held");
                assert_eq!(cl.stat(|s| s.backpressure_acks_held), 0);
                // In flight (4) and queued up to the mark (10).
                assert_eq!(slow_got.len() + queued, 4 + HIGH);
                assert_eq!(got.len() + slow_got.len() + queued, 100);
            } else {
                assert!(got.is_empty(), "sticky: the first member takes all");
                assert!(acked.len() < 100, "sticky: held by its member");
                assert!(cl.stat(|s| s.backpressure_acks_held) > 0);
            }
            assert_eq!(cl.dropped(), 0);
        }
    }

    /// The congestion hint: on when the subscriber's shard gets a congested
    /// queue, still on right after it drained (a queue under sustained
    /// overload refills), off a second later; a quiet cluster sends nothing.
    #[test]
    fn the_congestion_hint_lingers_a_second_then_goes_off() {
        let mut cl = Cluster::new(2, HIGH);
        let sub = cl.connect(1, "sub");
        cl.subscribe(sub, "t");
        let publ = cl.connect(0, "pub");
        for n in 1..=30 {
            cl.publish(publ, "t", n);
        }
        assert!(cl.engines[0].bp.peer_congested[1], "announced");
        for _ in 0..100 {
            let packets = cl.recv(sub);
            if ack_all(&mut cl, sub, &packets).is_empty() {
                break;
            }
        }
        assert!(cl.engines[1].bp.congested.is_empty(), "drained");
        assert_eq!(pubacks(&cl.recv(publ)), (1..=30).collect::<Vec<_>>());
        cl.tick(500);
        assert!(
            cl.engines[0].bp.peer_congested[1],
            "still on within a second"
        );
        cl.tick(600);
        assert!(!cl.engines[0].bp.peer_congested[1], "off after a second");
        // Quiet: publications are plain again and nothing else is sent.
        cl.publish(publ, "t", 31);
        assert_eq!(pubacks(&cl.recv(publ)), [31]);
        let mut outbox = 0;
        for e in &mut cl.engines {
            e.tick(cl.now_ms);
            e.drain_outbox(|_, batch| outbox += batch.len());
        }
        assert_eq!(outbox, 0);
    }

    /// Under `sync` durability an acknowledgement that a congested session on
    /// another shard held waits, when released, for the commit of what the
    /// publication stored on that shard (here for a persistent offline
    /// subscriber), even when the release itself stores nothing.
    #[test]
    fn a_held_ack_released_by_a_drain_still_waits_for_its_commit() {
        fn commit_all(cl: &mut Cluster) {
            for _ in 0..4 {
                for e in &mut cl.engines {
                    if let Some(b) = e.take_store_batch() {
                        e.store_committed(b.epoch);
                    }
                }
                cl.pump();
            }
        }
        let mut cl = Cluster::new(2, HIGH);
        for e in &mut cl.engines {
            e.enable_persistence(true);
        }
        let sub = cl.connect(1, "sub");
        cl.subscribe(sub, "t");
        let mut stored = crate::engine::testing::connect_packet(ProtocolVersion::V5, "st", false);
        stored.properties.session_expiry_interval = Some(600);
        let conn = cl.engines[1].connect(cl.now_ms, stored, false);
        let st = Client { shard: 1, conn };
        cl.recv(st);
        cl.subscribe(st, "t");
        cl.engines[1].connection_lost(cl.now_ms, conn);
        cl.engines[1].release(cl.now_ms, conn);
        commit_all(&mut cl);
        let publ = cl.connect(0, "pub");
        for n in 1..=20 {
            cl.publish(publ, "t", n);
            commit_all(&mut cl);
        }
        assert!(cl.engines[0].bp.peer_congested[1], "congested");
        cl.publish(publ, "t", 21);
        let batch = cl.engines[1].take_store_batch().expect("21 stored for st");
        for _ in 0..100 {
            let packets = cl.recv(sub);
            if ack_all(&mut cl, sub, &packets).is_empty() {
                break;
            }
        }
        assert!(cl.engines[1].bp.congested.is_empty(), "drained");
        let acked = pubacks(&cl.recv(publ));
        assert!(!acked.contains(&21), "PUBACK before the commit: {acked:?}");
        cl.engines[1].store_committed(batch.epoch);
        cl.pump();
        assert!(pubacks(&cl.recv(publ)).contains(&21));
    }

    /// A subscriber that never reads: the held acks go out at the hold bound
    /// and the overflow policy applies at the hard limit.
    #[test]
    fn held_acks_are_released_at_the_hold_bound() {
        for shards in [1, 2] {
            let mut cl = Cluster::new(shards, HIGH);
            let sub = cl.connect(shards - 1, "sub");
            cl.subscribe(sub, "t");
            let publ = cl.connect(0, "pub");
            for n in 1..=30 {
                cl.publish(publ, "t", n);
            }
            let prompt = 4 + HIGH + shards - 1;
            assert_eq!(pubacks(&cl.recv(publ)).len(), prompt);
            cl.tick(HOLD_MS / 2);
            assert!(pubacks(&cl.recv(publ)).is_empty(), "held within the bound");
            cl.tick(HOLD_MS / 2);
            assert_eq!(
                pubacks(&cl.recv(publ)),
                (prompt as u16 + 1..=30).collect::<Vec<_>>(),
                "released at the bound ({shards} shards)"
            );
            let timeouts = cl.stat(|s| s.backpressure_hold_timeouts);
            assert_eq!(timeouts, 30 - prompt as u64);
        }
    }

    /// A client subscribed to its own topic is never throttled by its own
    /// queue; back-pressure off (high water 0) never holds anything.
    #[test]
    fn own_queue_and_disabled_back_pressure_hold_nothing() {
        for high in [HIGH, 0] {
            let mut cl = Cluster::new(1, high);
            let me = cl.connect(0, "me");
            cl.subscribe(me, "t");
            if high == 0 {
                let other = cl.connect(0, "other");
                cl.subscribe(other, "t");
            }
            let mut acked = Vec::new();
            for n in 1..=40 {
                cl.publish(me, "t", n);
                acked.extend(pubacks(&cl.recv(me)));
            }
            assert_eq!(acked, (1..=40).collect::<Vec<_>>(), "high water {high}");
        }
    }

    /// A 3.1.1 QoS 2 publisher with a window above the Receive Maximum (64
    /// here) into a congested queue: its PUBRECs are held, so its ids stay
    /// unreleased, and it is not disconnected for exceeding the Receive
    /// Maximum; when the subscriber drains, the PUBRECs follow in order.
    #[test]
    fn a_311_qos2_publisher_with_a_wide_window_is_held_not_disconnected() {
        let mut cl = Cluster::new(1, HIGH);
        let sub = cl.connect(0, "sub");
        cl.subscribe(sub, "t");
        let connect =
            crate::engine::testing::connect_packet(ProtocolVersion::V3_1_1, "pub311", true);
        let conn = cl.engines[0].connect(cl.now_ms, connect, false);
        let publ = Client { shard: 0, conn };
        let window = 64u16;
        for n in 1..=window {
            let mut p = Publish::new(Str::from_static("t"), Bytes::from(n.to_be_bytes().to_vec()));
            p.qos = QoS::ExactlyOnce;
            p.packet_id = n;
            cl.send(publ, Packet::Publish(p));
        }
        assert!(!cl.engines[0].is_ended(conn), "not disconnected");
        let mut got = Vec::new();
        for _ in 0..100 {
            let packets = cl.recv(sub);
            got.extend(ack_all(&mut cl, sub, &packets));
            if got.len() == usize::from(window) {
                break;
            }
        }
        assert_eq!(got, (1..=window).collect::<Vec<_>>());
        let recs: Vec<u16> =
            crate::engine::testing::drain(&mut cl.engines[0], conn, ProtocolVersion::V3_1_1)
                .into_iter()
                .filter_map(|p| match p {
                    Packet::PubRec(r) => Some(r.packet_id),
                    _ => None,
                })
                .collect();
        assert_eq!(recs, (1..=window).collect::<Vec<_>>());
    }

    /// A client with up to four Receive Maximums of held acks is read; one
    /// more and it is paused.
    #[test]
    fn input_pauses_beyond_the_receive_maximum_of_held_acks() {
        let mut cl = Cluster::new(1, HIGH);
        let sub = cl.connect(0, "sub");
        cl.subscribe(sub, "t");
        let publ = cl.connect(0, "pub");
        let rm = cl.engines[0].limits().receive_maximum * 4;
        let prompt = (4 + HIGH) as u16;
        for n in 1..=prompt + rm {
            cl.publish(publ, "t", n);
        }
        assert!(!cl.engines[0].input_paused(publ.conn));
        cl.publish(publ, "t", prompt + rm + 1);
        assert!(cl.engines[0].input_paused(publ.conn));
        // The subscriber drains: the acks go out and the pause ends.
        for _ in 0..100 {
            let packets = cl.recv(sub);
            if ack_all(&mut cl, sub, &packets).is_empty() {
                break;
            }
        }
        assert!(!cl.engines[0].input_paused(publ.conn));
        assert_eq!(cl.dropped(), 0);
    }
}
