//! Quotas (`impl Engine`): the limits that keep clients (anonymous ones by
//! default) from growing a node's state without bound, how each one refuses,
//! and the counters of refusals. docs/LIMITS.md is the operator's view.
//!
//! - Sessions per node (`Limits::sessions_count_max`): counted in one
//!   [`SessionBudget`] the node's shards share, touched only when a session is
//!   created or destroyed, never per message. A CONNECT that needs a new
//!   session while the node holds the maximum is refused (v5 CONNACK 0x97
//!   Quota exceeded, 3.1.1 return code 0x03 Server unavailable); resuming or
//!   taking over an existing session always works. CONNECTs racing on
//!   different shards may each pass the check, so the count can exceed the
//!   maximum by at most one per shard.
//! - Session expiry (`Limits::session_expiry_s_max`): every session's expiry
//!   interval is capped, v5 "never" (0xFFFFFFFF) and MQTT 3.1.1 Clean Session
//!   0 sessions included; a v5 client is told the granted value in CONNACK.
//! - Retained messages (`Limits::retained_count_max`,
//!   `Limits::retained_bytes_max`): checked by the publisher's shard against
//!   its replica of the retained table (every shard holds the whole table, so
//!   no cross-shard call is needed; updates racing on several shards may pass
//!   the check together, by at most one per shard). A clear always works, and
//!   so does replacing a topic's message when the count is full; the byte
//!   budget refuses only the growth of a replacement. A refused retained
//!   PUBLISH from a v5 client at QoS 1/2 gets PUBACK/PUBREC 0x97 and is not
//!   published; at QoS 0, and from 3.1.1 clients (no code to send), it is
//!   published to current subscribers but not stored, counted and logged.
//! - Subscriptions per client (`Limits::subscriptions_count_max`): SUBACK
//!   0x97 (3.1.1: 0x80) for the filters over it (`on_subscribe`).
//! - Packet size and read buffers: the driver refuses those; the engine counts
//!   them ([`Engine::decode_error`], [`Engine::quota_disconnect`]).
//!
//! Each refusal counts in `Stats::limit_refusals` by [`Limit`] and is logged
//! as a warning for the first refusal and then every power of two of each
//! limit, so a client hammering a full quota cannot flood the log.

use std::sync::atomic::{AtomicUsize, Ordering};

use tessera_proto::{Disconnect, Packet, ProtocolVersion, Publish, QoS, ReasonCode, Str};

use super::{CloseReason, Engine};
use crate::message::Message;
use crate::session::{ConnId, SessionIdx};

/// A configured limit that refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `limits.max_subscriptions_per_client`: a SUBSCRIBE filter.
    Subscriptions,
    /// `limits.max_sessions`: a CONNECT that needed a new session.
    Sessions,
    /// `limits.max_retained_messages`: a retained PUBLISH on a new topic.
    RetainedCount,
    /// `limits.max_retained_bytes`: a retained PUBLISH.
    RetainedBytes,
    /// `limits.max_packet_size_bytes`: a packet from a client.
    PacketSize,
    /// `limits.max_read_buffers_bytes`: a packet the node's read buffers had
    /// no room for.
    ReadBuffers,
}

impl Limit {
    /// Number of limits.
    pub const COUNT: usize = 6;

    /// Every limit, in index order.
    pub const ALL: [Limit; Limit::COUNT] = [
        Limit::Subscriptions,
        Limit::Sessions,
        Limit::RetainedCount,
        Limit::RetainedBytes,
        Limit::PacketSize,
        Limit::ReadBuffers,
    ];

    /// The `limit` label of `tessera_limit_refusals_total`.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Subscriptions => "subscriptions_per_client",
            Limit::Sessions => "sessions",
            Limit::RetainedCount => "retained_messages",
            Limit::RetainedBytes => "retained_bytes",
            Limit::PacketSize => "packet_size",
            Limit::ReadBuffers => "read_buffers",
        }
    }

    /// The configuration key, for log lines.
    pub fn setting(self) -> &'static str {
        match self {
            Limit::Subscriptions => "limits.max_subscriptions_per_client",
            Limit::Sessions => "limits.max_sessions",
            Limit::RetainedCount => "limits.max_retained_messages",
            Limit::RetainedBytes => "limits.max_retained_bytes",
            Limit::PacketSize => "limits.max_packet_size_bytes",
            Limit::ReadBuffers => "limits.max_read_buffers_bytes",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The sessions of a node, counted across its shards: created with the
/// node's `sessions_count_max` and shared by every shard's engine
/// ([`Engine::set_session_budget`]). Lives as long as the node.
#[derive(Debug)]
pub struct SessionBudget {
    count: AtomicUsize,
    max: usize,
}

impl SessionBudget {
    /// A budget of `max` sessions (`usize::MAX`: no limit).
    pub fn new(max: usize) -> SessionBudget {
        SessionBudget {
            count: AtomicUsize::new(0),
            max,
        }
    }

    /// Sessions now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether one more session would exceed the maximum.
    fn full(&self) -> bool {
        self.count() >= self.max
    }

    fn add(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn remove(&self) {
        let before = self.count.fetch_sub(1, Ordering::Relaxed);
        assert!(before > 0, "session budget released more than acquired");
    }
}

/// The live retained messages of this shard's replica and their bytes
/// (topic and payload), kept as the table changes.
#[derive(Debug, Default)]
pub(super) struct RetainedUsage {
    count: usize,
    bytes: u64,
}

impl RetainedUsage {
    /// Live retained messages (tombstones not included).
    pub(super) fn count(&self) -> usize {
        self.count
    }
}

/// What a retained message costs the byte budget.
pub(super) fn retained_size(m: &Message) -> u64 {
    (m.topic.len() + m.payload.len()) as u64
}

impl Engine {
    /// Shares `budget` as this shard's count of the node's sessions. Call
    /// before recovery and before any CONNECT; the sessions the engine already
    /// has move to it.
    pub fn set_session_budget(&mut self, budget: std::sync::Arc<SessionBudget>) {
        for _ in 0..self.by_client_id.len() {
            self.session_budget.remove();
            budget.add();
        }
        self.session_budget = budget;
    }

    /// Counts one refusal by `limit` and logs the first and then every power
    /// of two of them.
    pub fn limit_refused(&mut self, limit: Limit, client_id: Option<&Str>) {
        let n = &mut self.stats.limit_refusals[limit.index()];
        *n += 1;
        let n = *n;
        if n.is_power_of_two() {
            tracing::warn!(
                shard = self.shard,
                client_id = client_id.map(Str::as_str),
                refused_total = n,
                setting = limit.setting(),
                "refused by a configured limit (logged at powers of two of this count)"
            );
        }
    }

    /// Ends a connection a budget refused (v5: DISCONNECT 0x97 Quota
    /// exceeded first); counted under `limit`.
    pub fn quota_disconnect(&mut self, now_ms: u64, conn: ConnId, limit: Limit) {
        let Some(c) = self.slot(conn).filter(|c| !c.ended) else {
            return;
        };
        let (v5, idx) = (c.version.is_v5(), c.session);
        let client_id = self
            .sessions
            .get(idx as usize)
            .and_then(Option::as_ref)
            .map(|s| s.client_id.clone());
        self.limit_refused(limit, client_id.as_ref());
        let rc = ReasonCode::QuotaExceeded;
        if v5 {
            self.write_packet(conn, &Packet::Disconnect(Disconnect::new(rc)));
        }
        self.end_conn(now_ms, conn, CloseReason::ProtocolError(rc));
    }

    /// The refusal of a CONNECT for `client_id` that would need a new
    /// session while the node holds `sessions_count_max`.
    pub(super) fn session_refusal(&mut self, client_id: &Str) -> Option<ReasonCode> {
        if self.by_client_id.contains_key(client_id) || !self.session_budget.full() {
            return None;
        }
        self.limit_refused(Limit::Sessions, Some(client_id));
        Some(ReasonCode::QuotaExceeded)
    }

    /// A session was created: count it in the node's budget.
    pub(super) fn session_created(&mut self) {
        self.session_budget.add();
    }

    /// A session was destroyed.
    pub(super) fn session_gone(&mut self) {
        self.session_budget.remove();
    }

    /// The session expiry interval granted for `requested` seconds.
    pub(super) fn granted_expiry(&self, requested_s: u32) -> u32 {
        requested_s.min(self.limits.session_expiry_s_max)
    }

    /// Which retained limit refuses setting `topic` to a message of `size`
    /// bytes, if one does. A replacement never needs a new slot, and only its
    /// growth counts against the byte budget.
    pub(super) fn retained_refusal(&self, topic: &str, size: u64) -> Option<Limit> {
        let old = self
            .retained
            .get(topic, ())
            .and_then(|e| e.message.as_ref())
            .map(retained_size);
        let u = &self.retained_usage;
        if old.is_none() && u.count >= self.limits.retained_count_max {
            return Some(Limit::RetainedCount);
        }
        let old = old.unwrap_or(0);
        let bytes_max = self.limits.retained_bytes_max;
        (size > old && u.bytes - old + size > bytes_max).then_some(Limit::RetainedBytes)
    }

    /// Keeps the usage counters in step with one retained entry changing from
    /// a message of `old` bytes to one of `new` bytes (none: no message).
    pub(super) fn retained_changed(&mut self, old: Option<u64>, new: Option<u64>) {
        let u = &mut self.retained_usage;
        if let Some(size) = old {
            u.count -= 1;
            u.bytes -= size;
        }
        if let Some(size) = new {
            u.count += 1;
            u.bytes += size;
        }
    }

    /// The refusal of a v5 QoS 1/2 retained PUBLISH the retained quotas do
    /// not admit: 0x97, and the message is not published. Others over a quota
    /// are published without being stored (`publish_acked`).
    pub(super) fn retained_publish_refusal(
        &mut self,
        idx: SessionIdx,
        p: &Publish,
        version: ProtocolVersion,
    ) -> Option<ReasonCode> {
        if !p.retain || p.payload.is_empty() || !version.is_v5() || p.qos == QoS::AtMostOnce {
            return None;
        }
        let limit = self.retained_refusal(&p.topic, (p.topic.len() + p.payload.len()) as u64)?;
        let client_id = self.session(idx).client_id.clone();
        self.limit_refused(limit, Some(&client_id));
        Some(ReasonCode::QuotaExceeded)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tessera_proto::{ConnectProperties, PubAck, Subscribe, Subscription, SubscriptionOptions};

    use super::super::testing::{connect_packet, drain};
    use super::super::{Engine, Limits};
    use super::*;

    fn connack(e: &mut Engine, conn: ConnId, v: ProtocolVersion) -> tessera_proto::ConnAck {
        match drain(e, conn, v).into_iter().next() {
            Some(Packet::ConnAck(a)) => a,
            other => panic!("expected a CONNACK, got {other:?}"),
        }
    }

    #[test]
    fn a_connect_needing_a_session_over_the_node_budget_is_refused_and_a_resume_is_not() {
        let limits = Limits {
            sessions_count_max: 2,
            ..Limits::default()
        };
        // Two shards share one budget, as in the broker.
        let budget = std::sync::Arc::new(SessionBudget::new(2));
        let mut a = Engine::new(0, 2, limits.clone());
        let mut b = Engine::new(1, 2, limits);
        a.set_session_budget(budget.clone());
        b.set_session_budget(budget.clone());
        let v5 = ProtocolVersion::V5;
        let mut persistent = connect_packet(v5, "p", false);
        persistent.properties.session_expiry_interval = Some(60);
        let p = a.connect(1, persistent.clone(), false);
        assert_eq!(connack(&mut a, p, v5).reason_code, ReasonCode::Success);
        a.release(2, p); // offline, still a session
        let c = b.connect(3, connect_packet(v5, "c", true), false);
        assert_eq!(connack(&mut b, c, v5).reason_code, ReasonCode::Success);
        assert_eq!(budget.count(), 2);

        let over = b.connect(4, connect_packet(v5, "over", true), false);
        assert_eq!(
            connack(&mut b, over, v5).reason_code,
            ReasonCode::QuotaExceeded
        );
        assert!(b.is_ended(over));
        let v3 = ProtocolVersion::V3_1_1;
        let over3 = a.connect(4, connect_packet(v3, "over3", true), false);
        let ack = connack(&mut a, over3, v3);
        assert_eq!(ack.reason_code.to_v3_connack(), 0x03);
        assert_eq!(
            a.stats().limit_refusals[Limit::Sessions.index()]
                + b.stats().limit_refusals[Limit::Sessions.index()],
            2
        );

        // Resuming the offline session needs no new one.
        let p = a.connect(5, persistent, false);
        let ack = connack(&mut a, p, v5);
        assert_eq!(ack.reason_code, ReasonCode::Success);
        assert!(ack.session_present);
        // A clean session's end frees its place.
        b.handle_packet(
            6,
            c,
            Packet::Disconnect(Disconnect::new(ReasonCode::Success)),
        );
        b.release(6, c);
        assert_eq!(budget.count(), 1);
        let again = b.connect(7, connect_packet(v5, "over", true), false);
        assert_eq!(connack(&mut b, again, v5).reason_code, ReasonCode::Success);
    }

    #[test]
    fn session_expiry_is_capped_and_a_v5_client_is_told_the_granted_value() {
        let limits = Limits {
            session_expiry_s_max: 100,
            ..Limits::default()
        };
        let mut e = Engine::new(0, 1, limits);
        let v5 = ProtocolVersion::V5;
        for (requested, told) in [(u32::MAX, Some(100)), (1000, Some(100)), (50, None)] {
            let mut c = connect_packet(v5, "x", true);
            c.properties = ConnectProperties {
                session_expiry_interval: Some(requested),
                ..Default::default()
            };
            let conn = e.connect(1, c, false);
            let ack = connack(&mut e, conn, v5);
            assert_eq!(ack.properties.session_expiry_interval, told, "{requested}");
            e.release(2, conn);
            // Expired after the granted interval, not the requested one.
            let granted = told.unwrap_or(requested);
            e.tick(2 + u64::from(granted) * 1000 - 1);
            assert_eq!(e.session_count(), 1, "{requested}: alive before expiry");
            e.tick(2 + u64::from(granted) * 1000);
            assert_eq!(e.session_count(), 0, "{requested}: gone at expiry");
        }
        // MQTT 3.1.1 Clean Session 0 sessions no longer live forever.
        let v3 = ProtocolVersion::V3_1_1;
        let conn = e.connect(1_000_000, connect_packet(v3, "old", false), false);
        e.release(1_000_000, conn);
        e.tick(1_099_999);
        assert_eq!(e.session_count(), 1);
        e.tick(1_100_000);
        assert_eq!(e.session_count(), 0);
    }

    /// A retained will is a client's retained message like any other: over
    /// the count it is published but not stored, and counted.
    #[test]
    fn a_retained_will_over_the_count_is_not_stored() {
        let limits = Limits {
            retained_count_max: 0,
            ..Limits::default()
        };
        let mut e = Engine::new(0, 1, limits);
        let v5 = ProtocolVersion::V5;
        let mut c = connect_packet(v5, "w", true);
        c.will = Some(tessera_proto::Will {
            topic: Str::from_static("wills/w"),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
        });
        let conn = e.connect(1, c, false);
        e.connection_lost(2, conn);
        assert!(e.admin_retained_get(2, "wills/w").is_none());
        assert_eq!(e.stats().limit_refusals[Limit::RetainedCount.index()], 1);
    }

    fn publish(topic: &'static str, payload: &'static [u8], qos: QoS, id: u16) -> Packet {
        let mut p = Publish::new(Str::from_static(topic), Bytes::from_static(payload));
        p.retain = true;
        p.qos = qos;
        p.packet_id = id;
        Packet::Publish(p)
    }

    fn puback_code(e: &mut Engine, conn: ConnId, v: ProtocolVersion) -> ReasonCode {
        match drain(e, conn, v).as_slice() {
            [Packet::PubAck(PubAck { reason_code, .. })] => *reason_code,
            other => panic!("expected one PUBACK, got {other:?}"),
        }
    }

    #[test]
    fn retained_caps_refuse_new_topics_but_never_a_clear_or_a_replacement() {
        let limits = Limits {
            retained_count_max: 2,
            retained_bytes_max: 20,
            ..Limits::default()
        };
        let mut e = Engine::new(0, 1, limits);
        let v5 = ProtocolVersion::V5;
        let c = e.connect(1, connect_packet(v5, "pub", true), false);
        drain(&mut e, c, v5);
        let q1 = QoS::AtLeastOnce;
        e.handle_packet(2, c, publish("a", b"12345", q1, 1)); // 6 bytes
        assert_eq!(puback_code(&mut e, c, v5), ReasonCode::Success);
        e.handle_packet(2, c, publish("b", b"12345", q1, 2)); // 12 bytes
        assert_eq!(puback_code(&mut e, c, v5), ReasonCode::Success);
        // Count full: a third topic is refused, a replacement is not.
        e.handle_packet(3, c, publish("c", b"1", q1, 3));
        assert_eq!(puback_code(&mut e, c, v5), ReasonCode::QuotaExceeded);
        e.handle_packet(3, c, publish("a", b"123456789", q1, 4)); // 10: 16 bytes
        assert_eq!(puback_code(&mut e, c, v5), ReasonCode::Success);
        // Growth beyond the byte budget is refused; shrinking always works.
        e.handle_packet(4, c, publish("b", b"1234567890", q1, 5)); // would be 21
        assert_eq!(puback_code(&mut e, c, v5), ReasonCode::QuotaExceeded);
        e.handle_packet(4, c, publish("b", b"1", q1, 6));
        assert_eq!(puback_code(&mut e, c, v5), ReasonCode::Success);
        assert_eq!(e.retained_usage.bytes, 12);
        // A clear frees a slot for a new topic.
        e.handle_packet(5, c, publish("b", b"", q1, 7));
        assert_eq!(puback_code(&mut e, c, v5), ReasonCode::Success);
        e.handle_packet(5, c, publish("c", b"1", q1, 8));
        assert_eq!(puback_code(&mut e, c, v5), ReasonCode::Success);
        assert_eq!(e.retained_count(), 2);
        let refused = |e: &Engine, l: Limit| e.stats().limit_refusals[l.index()];
        assert_eq!(refused(&e, Limit::RetainedCount), 1);
        assert_eq!(refused(&e, Limit::RetainedBytes), 1);

        // QoS 0 over the cap: delivered to subscribers, not stored, counted.
        let s = e.connect(6, connect_packet(v5, "sub", true), false);
        let sub = Subscribe {
            packet_id: 1,
            properties: Default::default(),
            subscriptions: vec![Subscription {
                filter: Str::from_static("d"),
                options: SubscriptionOptions::qos(QoS::AtMostOnce),
            }],
        };
        e.handle_packet(6, s, Packet::Subscribe(sub));
        drain(&mut e, s, v5);
        e.handle_packet(7, c, publish("d", b"x", QoS::AtMostOnce, 0));
        assert!(drain(&mut e, c, v5).is_empty());
        let got = drain(&mut e, s, v5);
        assert!(matches!(got.as_slice(), [Packet::Publish(p)] if p.topic.as_str() == "d"));
        assert!(e.admin_retained_get(7, "d").is_none());
        assert_eq!(refused(&e, Limit::RetainedCount), 2);
    }
}
