//! Sessions moving between nodes (`impl Engine`, issue 15): the runtime counterpart of
//! `restore`. When another node's claim on a ClientID commits, the old owner's shard
//! ends the live connection ([`Engine::session_taken_over`], v5 DISCONNECT 0x8E, the
//! will as for a local takeover), then hands the whole session out
//! ([`Engine::export_session`]) or drops it when the new connection starts clean
//! ([`Engine::drop_session`]); the new owner's shard takes it in
//! ([`Engine::import_session`]) before its CONNECT is accepted, so the CONNACK says
//! session present and in-flight deliveries resume with their packet ids.
//!
//! The wire format is the store's ([`TransferRec`]: versioned rkyv records, checked on
//! decode); bytes from another node are decoded and validated like a corrupt store's,
//! never trusted. Times travel as wall-clock milliseconds.
//!
//! Not moved: deliveries in a queue's disk tail (only the head in memory is exported;
//! the count left behind is logged and returned), and shared-subscription deliveries
//! a group handed back when the member went offline.

use tessera_proto::{Disconnect, Packet, ReasonCode, Str};

use super::{CloseReason, Engine};
use crate::session::{InflightState, SessionIdx};
use crate::store::record::{
    self, DelayedWillRec, STATE_PUBLISHED, STATE_QUEUED, STATE_RELEASED, TransferRec,
};
use crate::store::recover::recovered_session;

/// Why a session from another node was not taken in.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The bytes are not a valid transfer record.
    #[error("malformed session transfer: {0}")]
    Malformed(String),
    /// The record is for another ClientID than the one asked for.
    #[error("session transfer for {found:?}, expected {expected:?}")]
    WrongClient {
        /// The ClientID asked for.
        expected: String,
        /// The one in the record.
        found: String,
    },
}

impl Engine {
    /// Keeps the ClientIDs of sessions destroyed from now on, for
    /// [`Engine::take_ended_sessions`] (a cluster node releases their ownership).
    pub fn track_session_ends(&mut self) {
        self.ended_sessions.get_or_insert_with(Vec::new);
    }

    /// The ClientIDs of sessions destroyed since the last call.
    pub fn take_ended_sessions(&mut self) -> Vec<Str> {
        self.ended_sessions
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Whether this shard holds a session for `client_id`.
    pub fn has_session(&self, client_id: &str) -> bool {
        self.session_idx(client_id).is_some()
    }

    /// Whether `client_id` has a live connection here.
    pub fn is_connected(&self, client_id: &str) -> bool {
        self.session_idx(client_id)
            .is_some_and(|idx| self.session(idx).conn.is_some())
    }

    fn session_idx(&self, client_id: &str) -> Option<SessionIdx> {
        let key = Str::try_from(client_id).ok()?;
        self.by_client_id.get(&key).copied()
    }

    /// Another node now owns `client_id`: its live connection here ends (v5:
    /// DISCONNECT 0x8E "session taken over"; the will is published or delayed as for
    /// any takeover). The session itself stays for [`Engine::export_session`] or
    /// [`Engine::drop_session`] (a non-persistent one ends with its connection).
    /// Returns whether a connection was ended.
    pub fn session_taken_over(&mut self, now_ms: u64, client_id: &str) -> bool {
        let Some(idx) = self.session_idx(client_id) else {
            return false;
        };
        let Some(conn) = self.session(idx).conn else {
            return false;
        };
        if self.conn(conn).version.is_v5() {
            self.write_packet(
                conn,
                &Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver)),
            );
        }
        self.end_conn(now_ms, conn, CloseReason::TakenOver);
        true
    }

    /// The new owner connected with Clean Start: the session ends here. A delayed will
    /// is published now, as the end of a session requires [MQTT-3.1.3-9].
    pub fn drop_session(&mut self, now_ms: u64, client_id: &str) -> bool {
        self.session_taken_over(now_ms, client_id);
        let Some(idx) = self.session_idx(client_id) else {
            return false;
        };
        if let Some(d) = self.delayed_wills.remove(&idx) {
            self.publish_will(now_ms, d.will, d.origin);
        }
        self.destroy_session(now_ms, idx);
        true
    }

    /// Moves the session of `client_id` out of this shard for another node: ends its
    /// connection (as [`Engine::session_taken_over`]), encodes subscriptions, expiry,
    /// in-flight deliveries with packet ids and states, the queue head in order,
    /// inbound QoS 2 ids and a delayed will, then destroys it here (its store record
    /// too). `None` when there is no session (or it ended with its connection).
    /// `wall_base_ms`: the wall-clock time at engine time 0. Also returns how many
    /// queued deliveries were left on disk (not moved).
    pub fn export_session(
        &mut self,
        now_ms: u64,
        client_id: &str,
        wall_base_ms: u64,
    ) -> Option<(Vec<u8>, usize)> {
        self.session_taken_over(now_ms, client_id);
        let idx = self.session_idx(client_id)?;
        let delayed = self.delayed_wills.remove(&idx);
        let s = self.session(idx);
        let mut deliveries = Vec::with_capacity(s.inflight.len() + s.queue.head_len());
        for i in &s.inflight {
            let state = match i.state {
                InflightState::Published => STATE_PUBLISHED,
                InflightState::Released => STATE_RELEASED,
            };
            deliveries.push(record::delivery_rec(
                &i.delivery,
                state,
                i.packet_id,
                wall_base_ms,
            ));
        }
        for d in s.queue.iter() {
            deliveries.push(record::delivery_rec(d, STATE_QUEUED, 0, wall_base_ms));
        }
        let left_on_disk = s.queue.disk_len();
        let rec = TransferRec {
            session: record::session_rec(&super::persist::session_state(s), wall_base_ms),
            deliveries,
            inbound_qos2: s.inbound_qos2.clone(),
            delayed_will: delayed.map(|d| DelayedWillRec {
                client_id: client_id.to_owned(),
                due_wall_ms: record::to_wall(d.due_ms, wall_base_ms),
                will: record::will_rec(&d.will),
            }),
            next_packet_id: s.next_packet_id(),
        };
        if left_on_disk > 0 {
            tracing::warn!(
                shard = self.shard,
                client_id,
                left_on_disk,
                "session moved to another node without the deliveries of its queue's disk tail"
            );
        }
        self.destroy_session(now_ms, idx);
        Some((record::encode(&rec), left_on_disk))
    }

    /// Takes in a session exported by another node ([`Engine::export_session`]) for
    /// `client_id`, replacing any session this shard still has for it, and stores it
    /// (persistence on). The next CONNECT without Clean Start resumes it (session
    /// present, in-flight deliveries re-sent with their packet ids). Malformed bytes
    /// are an error and change nothing.
    pub fn import_session(
        &mut self,
        now_ms: u64,
        client_id: &str,
        bytes: &[u8],
        wall_base_ms: u64,
    ) -> Result<(), TransferError> {
        let malformed = |e: record::DecodeError| TransferError::Malformed(e.to_string());
        let rec: TransferRec = record::decode(bytes).map_err(malformed)?;
        if rec.session.client_id != client_id {
            return Err(TransferError::WrongClient {
                expected: client_id.to_owned(),
                found: rec.session.client_id,
            });
        }
        for d in &rec.deliveries {
            let in_flight = d.state == STATE_PUBLISHED || d.state == STATE_RELEASED;
            if d.state > STATE_RELEASED || in_flight == (d.packet_id == 0) {
                return Err(TransferError::Malformed(format!(
                    "delivery in state {} with packet id {}",
                    d.state, d.packet_id
                )));
            }
            if d.state != STATE_RELEASED && d.message.is_none() {
                return Err(TransferError::Malformed(
                    "delivery without a message".into(),
                ));
            }
        }
        let next_packet_id = rec.next_packet_id;
        let deliveries = rec
            .deliveries
            .into_iter()
            .enumerate()
            .map(|(i, d)| (i as u64 + 1, d))
            .collect();
        let mut rs = recovered_session(
            rec.session,
            deliveries,
            rec.inbound_qos2,
            rec.delayed_will,
            wall_base_ms,
        )
        .map_err(malformed)?;
        for (filter, _) in &rs.subscriptions {
            use tessera_proto::topic;
            let levels = self.limits.topic_levels_max;
            let valid = match topic::parse_shared(filter) {
                Ok(Some(shared)) => topic::validate_topic_filter(shared.filter, levels).is_ok(),
                Ok(None) => topic::validate_topic_filter(filter, levels).is_ok(),
                Err(_) => false,
            };
            if !valid {
                return Err(TransferError::Malformed(format!(
                    "invalid topic filter {filter:?}"
                )));
            }
        }
        // The connection ended on the old node before the export.
        rs.will = None;
        if rs.disconnected_at_ms.is_none() {
            rs.disconnected_at_ms = Some(now_ms);
        }
        // A stale copy of the session here (from an earlier ownership) is replaced.
        if let Some(idx) = self.session_idx(client_id) {
            self.session_taken_over(now_ms, client_id);
            if self.session_idx(client_id) == Some(idx) {
                self.delayed_wills.remove(&idx);
                self.destroy_session(now_ms, idx);
            }
        }
        let idx = self.restore_one(now_ms, rs, false);
        self.session_mut(idx).set_next_packet_id(next_packet_id);
        // Into this shard's store: the session, its deliveries, inbound ids, delayed
        // will (each a no-op without persistence or for a non-persistent session).
        self.persist_session(idx);
        self.persist_rewrite_deliveries(idx);
        let inbound = self.session(idx).inbound_qos2.clone();
        for packet_id in inbound {
            self.persist_inbound(idx, packet_id, true);
        }
        if let Some(d) = self.delayed_wills.remove(&idx) {
            self.persist_delayed_will(idx, Some(&d));
            self.delayed_wills.insert(idx, d);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tessera_proto::{
        Packet, ProtocolVersion, PubRec, Publish, QoS, ReasonCode, Str, Subscribe, Subscription,
        SubscriptionOptions,
    };

    use super::super::testing::{connect_packet, drain};
    use super::super::{Engine, Limits};

    const WALL_A: u64 = 1_700_000_000_000;
    const WALL_B: u64 = 1_700_000_500_000;

    fn publish(e: &mut Engine, conn: crate::session::ConnId, payload: &str, qos: QoS, id: u16) {
        let mut p = Publish::new(Str::from_static("t"), Bytes::from(payload.to_owned()));
        p.qos = qos;
        p.packet_id = id;
        e.handle_packet(3, conn, Packet::Publish(p));
    }

    /// A v5 persistent session subscribed to "t" (QoS 2, subscription id 7) on `e`;
    /// returns its connection.
    fn subscriber(e: &mut Engine, id: &str) -> crate::session::ConnId {
        let mut c = connect_packet(ProtocolVersion::V5, id, false);
        c.properties.session_expiry_interval = Some(600);
        c.properties.receive_maximum = Some(2);
        let conn = e.connect(1, c, false);
        let props = tessera_proto::properties::SubscribeProperties {
            subscription_identifier: Some(7),
            ..Default::default()
        };
        e.handle_packet(
            1,
            conn,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                properties: props,
                subscriptions: vec![Subscription {
                    filter: Str::from_static("t"),
                    options: SubscriptionOptions::qos(QoS::ExactlyOnce),
                }],
            }),
        );
        drain(e, conn, ProtocolVersion::V5);
        conn
    }

    #[test]
    fn a_session_moves_with_its_in_flight_ids_states_queue_and_subscriptions() {
        let limits = Limits::default();
        let mut a = Engine::new(0, 1, limits.clone());
        let sub = subscriber(&mut a, "mover");
        let pubc = a.connect(1, connect_packet(ProtocolVersion::V5, "pub", true), false);
        for (i, qos) in [
            QoS::ExactlyOnce,
            QoS::AtLeastOnce,
            QoS::ExactlyOnce,
            QoS::AtLeastOnce,
        ]
        .into_iter()
        .enumerate()
        {
            publish(&mut a, pubc, &format!("m{i}"), qos, i as u16 + 1);
        }
        // Receive Maximum 2: m0 (QoS 2) and m1 are in flight, m2 and m3 queued; PUBREC
        // m0 so it is released (PUBREL sent).
        let sent = drain(&mut a, sub, ProtocolVersion::V5);
        let ids: Vec<u16> = sent
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p.packet_id),
                _ => None,
            })
            .collect();
        assert_eq!(ids.len(), 2, "{sent:?}");
        a.handle_packet(4, sub, Packet::PubRec(PubRec::new(ids[0])));
        drain(&mut a, sub, ProtocolVersion::V5);

        let (bytes, left) = a.export_session(5, "mover", WALL_A).expect("a session");
        assert_eq!(left, 0);
        let kicked = drain(&mut a, sub, ProtocolVersion::V5);
        assert!(
            kicked.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.reason_code == ReasonCode::SessionTakenOver)),
            "{kicked:?}"
        );
        assert!(!a.has_session("mover"), "the old node keeps nothing");

        let mut b = Engine::new(0, 1, limits);
        assert!(b.import_session(9, "other", &bytes, WALL_B).is_err());
        assert!(
            b.import_session(9, "mover", &bytes[..bytes.len() / 2], WALL_B)
                .is_err()
        );
        b.import_session(9, "mover", &bytes, WALL_B).unwrap();
        let mut c = connect_packet(ProtocolVersion::V5, "mover", false);
        c.properties.session_expiry_interval = Some(600);
        c.properties.receive_maximum = Some(10);
        let conn = b.connect(10, c, false);
        let out = drain(&mut b, conn, ProtocolVersion::V5);
        let Packet::ConnAck(ack) = &out[0] else {
            panic!("{out:?}")
        };
        assert!(ack.session_present);
        // PUBREL for m0 with its id, m1 re-sent with DUP and its id, then m2, m3.
        assert!(
            matches!(&out[1], Packet::PubRel(r) if r.packet_id == ids[0]),
            "{out:?}"
        );
        let publishes: Vec<(String, u16, bool, Vec<u32>)> = out[2..]
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some((
                    String::from_utf8_lossy(&p.payload).into_owned(),
                    p.packet_id,
                    p.dup,
                    p.properties.subscription_identifiers.clone(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(publishes.len(), 3, "{out:?}");
        assert_eq!(publishes[0].0, "m1");
        assert_eq!((publishes[0].1, publishes[0].2), (ids[1], true));
        assert_eq!(publishes[1].0, "m2");
        assert_eq!(publishes[2].0, "m3");
        assert!(publishes.iter().all(|p| p.3 == vec![7]), "{publishes:?}");
        // The subscription moved: a new publish on b reaches the session.
        let p2 = b.connect(11, connect_packet(ProtocolVersion::V5, "pub2", true), false);
        publish(&mut b, p2, "m4", QoS::AtLeastOnce, 1);
        let more = drain(&mut b, conn, ProtocolVersion::V5);
        assert!(
            more.iter()
                .any(|p| matches!(p, Packet::Publish(p) if &p.payload[..] == b"m4")),
            "{more:?}"
        );
    }

    #[test]
    fn a_non_persistent_session_is_not_exported_and_garbage_is_refused() {
        let mut a = Engine::new(0, 1, Limits::default());
        let conn = a.connect(1, connect_packet(ProtocolVersion::V3_1_1, "c", true), false);
        assert!(a.export_session(2, "c", WALL_A).is_none());
        assert!(a.is_ended(conn));
        let mut b = Engine::new(0, 1, Limits::default());
        for junk in [&b""[..], &[1, 0][..], &[1, 0, 0xff, 0xff, 0xff][..]] {
            assert!(b.import_session(3, "c", junk, WALL_B).is_err());
        }
        assert!(!b.has_session("c"));
    }
}
