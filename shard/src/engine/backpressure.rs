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
//! with more held acknowledgements than the Receive Maximum (a v3 client
//! with a larger window) stops being read ([`Engine::input_paused`]); that
//! lasts at most the hold bound.
//!
//! A publisher is never throttled by its own session (a client subscribed to
//! what it publishes). QoS 0 is not affected.
//!
//! Across shards: a shard with congested sessions tells every peer
//! (`MeshMsg::Congestion`, sent when the first session becomes congested
//! and when the last drains, so rarely). While a peer is congested, QoS 1/2
//! publications forwarded to it go as `PublishDurable` with the publisher's
//! token; the peer delivers, and answers `Ack` when the congested sessions it
//! delivered to drained (or at the hold bound), after its commit under sync
//! durability. With no congested peer the mesh carries nothing extra.
//! Deliveries to shared-subscription members on other shards are not held.

use std::collections::{BTreeMap, HashMap, VecDeque};

use tessera_proto::QoS;

use super::Engine;
use crate::mesh::{MeshMsg, ShardId};
use crate::session::{ConnId, SessionIdx};

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

/// Back-pressure state of one shard.
#[derive(Debug)]
pub(super) struct BackPressure {
    /// Congested local sessions with the acknowledgements waiting for them,
    /// oldest first. Ordered so releases are reproducible in the simulation.
    /// Bounded: a publisher has at most its window (or the Receive Maximum,
    /// beyond which it is not read) of held acknowledgements.
    congested: BTreeMap<SessionIdx, VecDeque<Waiter>>,
    /// Per shard: whether it announced congested sessions.
    peer_congested: Vec<bool>,
    /// Whether this shard announced congested sessions to its peers.
    announced: bool,
    /// The publication being routed (set around `publish_acked` and the
    /// delivery of a `PublishDurable`).
    routing: Option<Routing>,
    /// Tokens of publications from other shards held here: token -> (the
    /// publisher's shard, its token, congested sessions still waited for).
    remote: HashMap<u64, (ShardId, u64, usize)>,
}

impl BackPressure {
    pub(super) fn new(shard_count: usize) -> BackPressure {
        BackPressure {
            congested: BTreeMap::new(),
            peer_congested: vec![false; shard_count],
            announced: false,
            routing: None,
            remote: HashMap::new(),
        }
    }
}

impl Engine {
    fn bp_on(&self) -> bool {
        self.limits.queue_high_water > 0
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
            });
        }
    }

    /// Ends the routing of a local publication: the token its
    /// acknowledgement waits on, if back-pressure gave it one.
    pub(super) fn bp_end_local(&mut self) -> Option<u64> {
        self.bp.routing.take().and_then(|r| r.token)
    }

    /// A `PublishDurable` from `from` is delivered here.
    pub(super) fn bp_begin_remote(&mut self, from: ShardId, ack: u64, qos: QoS) {
        if self.bp_on() && qos != QoS::AtMostOnce {
            self.bp.routing = Some(Routing {
                publisher: Publisher::Remote { from, ack },
                token: None,
            });
        }
    }

    /// Ends the delivery of a `PublishDurable`: true when congested sessions
    /// hold its `Ack` (sent when they drain), false when the caller answers.
    pub(super) fn bp_end_remote(&mut self) -> bool {
        self.bp
            .routing
            .take()
            .is_some_and(|r| r.token.is_some())
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
                self.bp.remote.insert(t, (from, ack, 0));
            }
        }
        if let Some(r) = self.bp.routing.as_mut() {
            r.token = Some(t);
        }
        self.stats.backpressure_acks_held += 1;
        Some(t)
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
        if local && self.bp.peer_congested[usize::from(to)] {
            self.bp_token()
        } else {
            None
        }
    }

    /// A QoS 1/2 delivery of the publication being routed enters session
    /// `idx`: at or over the high-water mark, its acknowledgement waits.
    pub(super) fn bp_on_enqueue(&mut self, now_ms: u64, idx: SessionIdx) {
        let Some(routing) = self.bp.routing else {
            return;
        };
        if matches!(routing.publisher, Publisher::Local { session, .. } if session == idx) {
            return; // never throttled by its own queue
        }
        let s = self.session(idx);
        if s.conn.is_none() || s.queue.len() < self.limits.queue_high_water {
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
                if let Some((_, _, n)) = self.bp.remote.get_mut(&token) {
                    *n += 1;
                }
            }
        }
        let deadline_ms = now_ms.saturating_add(self.limits.backpressure_hold_ms_max);
        self.bp
            .congested
            .entry(idx)
            .or_default()
            .push_back(Waiter { deadline_ms, token });
        self.bp_announce();
    }

    /// Session `idx` sent from its queue: below the low-water mark it
    /// releases every acknowledgement waiting for it.
    pub(super) fn bp_drained(&mut self, idx: SessionIdx) {
        if self.bp.congested.is_empty() || !self.bp.congested.contains_key(&idx) {
            return;
        }
        if self.session(idx).queue.len() < self.bp_low_water() {
            self.bp_release_session(idx);
        }
    }

    /// Session `idx` lost its connection or ended: it throttles no one.
    pub(super) fn bp_session_offline(&mut self, idx: SessionIdx) {
        if self.bp.congested.contains_key(&idx) {
            self.bp_release_session(idx);
        }
    }

    /// Releases acknowledgements held longer than the bound, and sessions
    /// that drained or went offline by a path `bp_drained` does not see.
    pub(super) fn bp_tick(&mut self, now_ms: u64) {
        if self.bp.congested.is_empty() {
            return;
        }
        let low = self.bp_low_water();
        let sessions: Vec<SessionIdx> = self.bp.congested.keys().copied().collect();
        for idx in sessions {
            let live = self.sessions[idx as usize]
                .as_ref()
                .is_some_and(|s| s.conn.is_some() && s.queue.len() >= low);
            if !live {
                self.bp_release_session(idx);
                continue;
            }
            while let Some(w) = self.bp.congested.get_mut(&idx).and_then(|q| {
                q.front()
                    .is_some_and(|w| w.deadline_ms <= now_ms)
                    .then(|| q.pop_front())
                    .flatten()
            }) {
                self.stats.backpressure_hold_timeouts += 1;
                self.bp_release_token(w.token);
            }
        }
    }

    /// A peer announced whether it has congested sessions.
    pub(super) fn bp_on_congestion(&mut self, from: ShardId, congested: bool) {
        self.bp.peer_congested[usize::from(from)] = congested;
    }

    fn bp_release_session(&mut self, idx: SessionIdx) {
        let Some(waiters) = self.bp.congested.remove(&idx) else {
            return;
        };
        for w in waiters {
            self.bp_release_token(w.token);
        }
        self.bp_announce();
    }

    /// One congested session no longer holds `token`.
    fn bp_release_token(&mut self, token: u64) {
        if self.pending_retains.contains_key(&token) {
            self.on_retain_ack(token);
        } else if let Some((from, ack, n)) = self.bp.remote.get_mut(&token) {
            *n -= 1;
            if *n == 0 {
                let (from, ack) = (*from, *ack);
                self.bp.remote.remove(&token);
                self.ack_after_commit(from, ack);
            }
        }
    }

    /// Tells the peers when this shard starts or stops having congested
    /// sessions.
    fn bp_announce(&mut self) {
        let congested = !self.bp.congested.is_empty();
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
    /// more acknowledgements held than the Receive Maximum, which a client
    /// honouring it cannot reach. Released acknowledgements wake the
    /// connection's output waker, so the driver looks again then.
    pub fn input_paused(&self, conn: ConnId) -> bool {
        self.bp_on()
            && self
                .slot(conn)
                .is_some_and(|c| c.held_acks.len() > usize::from(self.limits.receive_maximum))
    }

    /// The driver stopped reading a connection ([`Engine::input_paused`]).
    pub fn record_reads_paused(&mut self) {
        self.stats.backpressure_reads_paused += 1;
    }
}
