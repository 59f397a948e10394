//! Queues of persistent sessions (`impl Engine`): byte budgets, the disk
//! tail, and refusing the newest message when a queue is full.
//!
//! Rule: an acknowledged QoS 1/2 message is never dropped from a persistent
//! session's queue. Instead:
//! - **Budgets.** A persistent session's queue is bounded in bytes
//!   (`Limits::queue_bytes_max`, counted with `session::delivery_cost`), and
//!   all queues of the shard together by `Limits::queue_bytes_shard_max`.
//!   `queued_count_max` and `queue_overflow` apply to non-persistent sessions
//!   only (their queue ends with their connection anyway).
//! - **Disk tail.** With persistence on, a stored session keeps at most
//!   `Limits::queue_head_count_max` deliveries in memory (the head); newer
//!   ones are written to the store (the `PutMsg` every queued delivery gets
//!   anyway) and only counted (`DeliveryQueue::push_disk`). As the head
//!   drains, `pump` asks for the next deliveries with a `StoreOp::LoadQueue`;
//!   the writer reads them after committing that batch, so it sees every
//!   delivery written before the request, and the driver hands them back
//!   with the commit ([`Engine::queue_loaded`]). Without persistence
//!   (`memory` durability) the whole queue is in memory, and the budgets are
//!   RAM.
//! - **Refusal.** A QoS 1/2 delivery that would take a queue over a budget is
//!   refused when its publisher has not been acknowledged yet: a client of
//!   this shard publishing (`Engine::refusal` is set around the routing), or
//!   a `PublishDurable` from another shard (answered with
//!   `MeshMsg::Refused` before its `Ack`). The publisher then gets PUBACK or
//!   PUBREC 0x97 Quota exceeded (v5; the QoS 2 exchange ends there), or,
//!   being 3.1.1 (no reason codes), no acknowledgement: the ack is held, its
//!   window fills and it stops, and at `backpressure_hold_ms_max` its
//!   connection is closed so that it re-sends the message after
//!   reconnecting (MQTT-4.4.0-1). A refused QoS 2 publication's inbound
//!   packet id is released, so that re-send is taken as new.
//! - **Over budget.** A delivery whose publisher was already acknowledged
//!   (a plain cross-shard `Publish`, a will, a retained message on
//!   subscribe, a shared delivery passed between shards) is queued even
//!   over the budget and counted (`Stats::queue_over_budget`): the budget is
//!   exceeded, an acknowledged message is not lost. To keep that window short
//!   in `batched` and `memory` durability (where cross-shard publications
//!   carry no token), a shard whose queue went over a budget announces
//!   congestion to its peers (`backpressure`), which then send QoS 1/2
//!   publications with a token until it withdraws the announcement.
//! - QoS 0 deliveries beyond a budget, or behind a disk tail (they are not
//!   stored), are dropped and counted in `Stats::dropped_queue_full`.
//!
//! Not covered: a shared delivery in the disk tail of a member whose session
//! ends is deleted with the session rather than given back to its group.

use tessera_proto::{Packet, QoS, ReasonCode};

use super::{CloseReason, Engine};
use crate::session::{ConnId, Delivery, DeliveryQueue, Session, SessionIdx, delivery_cost};
use crate::store::{Loaded, StoreOp};

impl Engine {
    /// Budget bytes of every queue head on this shard (in memory).
    pub fn queue_bytes_memory(&self) -> u64 {
        self.queue_mem_bytes
    }

    /// Budget bytes of every disk tail on this shard (only in the store).
    pub fn queue_bytes_disk(&self) -> u64 {
        self.queue_disk_bytes
    }

    /// Runs `f` on session `idx` and keeps the shard's queue byte totals in
    /// step with what it changed in the session's queue.
    pub(super) fn with_session_queue<R>(
        &mut self,
        idx: SessionIdx,
        f: impl FnOnce(&mut Session) -> R,
    ) -> R {
        let s = self.session_mut(idx);
        let (head, disk) = (s.queue.head_bytes(), s.queue.disk_bytes());
        let r = f(s);
        let s = self.session(idx);
        let (head2, disk2) = (s.queue.head_bytes(), s.queue.disk_bytes());
        self.queue_mem_bytes = self.queue_mem_bytes + head2 - head;
        self.queue_disk_bytes = self.queue_disk_bytes + disk2 - disk;
        r
    }

    /// [`Engine::with_session_queue`] on the queue alone.
    pub(super) fn with_queue<R>(
        &mut self,
        idx: SessionIdx,
        f: impl FnOnce(&mut DeliveryQueue) -> R,
    ) -> R {
        self.with_session_queue(idx, |s| f(&mut s.queue))
    }

    /// Queues a delivery for a persistent session: within the budgets, in
    /// memory or (head full, stored session) in the disk tail; beyond them
    /// refused when the publisher can still be told, else queued anyway.
    pub(super) fn queue_push_persistent(&mut self, now_ms: u64, idx: SessionIdx, d: Delivery) {
        let cost = delivery_cost(&d);
        let s = self.session(idx);
        let over = s.queue.bytes() + cost > self.limits.queue_bytes_max
            || self.queue_mem_bytes + self.queue_disk_bytes + cost
                > self.limits.queue_bytes_shard_max;
        if over {
            // Peers send QoS 1/2 publications with a token for a while, so
            // this shard can refuse them instead of queueing over budget.
            self.bp_queue_full(now_ms);
            if d.qos == QoS::AtMostOnce {
                self.stats.dropped_queue_full += 1;
                return;
            }
            if let Some(refused) = self.refusal.as_mut() {
                *refused = true;
                self.stats.queue_refused += 1;
                let n = self.stats.queue_refused;
                if n.is_power_of_two() {
                    tracing::warn!(
                        shard = self.shard,
                        client_id = %self.session(idx).client_id,
                        refused_total = n,
                        queued_bytes = self.session(idx).queue.bytes(),
                        "persistent session queue full: refusing the new message \
                         (v5 publishers get 0x97)"
                    );
                }
                return;
            }
            self.stats.queue_over_budget += 1;
        }
        let s = self.session(idx);
        let spill = d.seq != 0
            && s.stored
            && self.persist.is_some()
            && (s.queue.disk_len() > 0 || s.queue.head_len() >= self.queue_head_max(s));
        if spill {
            self.persist_queued(idx, &d);
            self.with_queue(idx, |q| q.push_disk(&d));
            self.stats.queue_spilled += 1;
            return;
        }
        if s.queue.disk_len() > 0 {
            // QoS 0 is not stored, and cannot pass the disk tail.
            self.stats.dropped_queue_full += 1;
            return;
        }
        self.persist_queued(idx, &d);
        self.with_queue(idx, |q| q.push_back(d));
    }

    /// Deliveries session `s` keeps in memory before its disk tail.
    fn queue_head_max(&self, s: &Session) -> usize {
        match s.queue.head_max {
            0 => self.limits.queue_head_count_max,
            n => usize::from(n),
        }
    }

    /// Lets the session of `conn` keep `head_max` deliveries in memory
    /// instead of `Limits::queue_head_count_max` (until the session leaves
    /// memory). For a consumer that must drain a long queue fast: a disk
    /// tail is read one load per store commit, at most a head's worth, so a
    /// head of 64 bounds the drain at 64 deliveries per commit (a bridge's
    /// catch-up after an outage, docs/BRIDGES.md). Every queued delivery of
    /// a stored session is written to the store anyway: a larger head costs
    /// memory, not durability.
    pub fn set_queue_head(&mut self, conn: ConnId, head_max: u16) {
        let Some(c) = self.slot(conn) else {
            return;
        };
        let idx = c.session;
        if idx == SessionIdx::MAX {
            return;
        }
        self.session_mut(idx).queue.head_max = head_max;
        self.queue_refill(idx);
    }

    /// Asks the store for the next deliveries of session `idx`'s disk tail
    /// when its head is at most half full and no load is on its way.
    pub(super) fn queue_refill(&mut self, idx: SessionIdx) {
        let s = self.session(idx);
        let head_max = self.queue_head_max(s);
        if s.queue.disk_len() == 0 || s.queue.loading || s.queue.head_len() > head_max / 2 {
            return;
        }
        let op = StoreOp::LoadQueue {
            client_id: s.client_id.clone(),
            session: s.uid.0,
            from_seq: s.queue.disk_from_seq(),
            count_max: head_max - s.queue.head_len(),
        };
        self.session_mut(idx).queue.loading = true;
        self.store_op(op);
    }

    /// The store read deliveries of a disk tail (`StoreOp::LoadQueue`): they
    /// join the head of their session, which sends what its window allows.
    /// Loads for a session that ended meanwhile are ignored.
    pub fn queue_loaded(&mut self, now_ms: u64, loaded: Loaded) {
        let Some(&idx) = self.by_client_id.get(&loaded.client_id) else {
            return;
        };
        if self.session(idx).uid.0 != loaded.session || !self.session(idx).queue.loading {
            return;
        }
        let n = loaded.deliveries.len();
        let moved = self.with_queue(idx, |q| {
            q.loading = false;
            let mut moved = 0u64;
            for d in loaded.deliveries {
                moved += u64::from(q.load(d));
            }
            if n == 0 && q.disk_len() > 0 {
                // Nothing could be read (the writer logged why): do not ask
                // again and again for records that are not there.
                q.forget_disk();
            }
            moved
        });
        if n == 0 && moved == 0 {
            tracing::error!(
                shard = self.shard,
                client_id = %loaded.client_id,
                "the store returned none of a queue's deliveries on disk; the queue \
                 continues without them"
            );
        }
        self.stats.queue_loaded += moved;
        self.pump(now_ms, idx);
    }

    /// Sends the acknowledgement `ack` of a publication a full queue refused:
    /// with 0x97 to a v5 client; to a 3.1.1 client never (see the module
    /// header). A refused QoS 2 publication's inbound id is released.
    pub(super) fn send_refused_ack(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        mut ack: Packet,
        token: Option<u64>,
    ) {
        self.release_refused_inbound(conn, &ack);
        if self.conn(conn).version.is_v5() {
            set_quota_exceeded(&mut ack);
            return self.send_ack(conn, ack, token);
        }
        // A token nothing releases: this acknowledgement and those after it
        // wait until the connection is closed.
        let never = self.next_token;
        self.next_token += 1;
        self.conn_mut(conn).held_acks.push_back((Some(never), ack));
        self.hold_refused(now_ms, conn);
    }

    /// Another shard refused the publication of `token` (`MeshMsg::Refused`):
    /// its held acknowledgement becomes a refusal.
    pub(super) fn on_refused(&mut self, now_ms: u64, token: u64) {
        let Some(&(conn, _)) = self.pending_retains.get(&token) else {
            return;
        };
        let never = self.next_token;
        let Some(c) = self.slot_mut(conn) else {
            return;
        };
        let v5 = c.version.is_v5();
        let Some(pos) = c.held_acks.iter().position(|(t, _)| *t == Some(token)) else {
            return;
        };
        if v5 {
            set_quota_exceeded(&mut c.held_acks[pos].1);
        } else {
            // Detached from the token, so its `Ack` does not release it.
            c.held_acks[pos].0 = Some(never);
        }
        let ack = c.held_acks[pos].1.clone();
        if !v5 {
            self.next_token += 1;
        }
        self.release_refused_inbound(conn, &ack);
        if !v5 {
            self.hold_refused(now_ms, conn);
        }
    }

    /// A 3.1.1 connection holds an acknowledgement for a refused message: it
    /// is closed at `backpressure_hold_ms_max`.
    fn hold_refused(&mut self, now_ms: u64, conn: ConnId) {
        self.stats.queue_refused_acks_held += 1;
        let due = now_ms.saturating_add(self.limits.backpressure_hold_ms_max);
        self.refused_holds.push_back((due, conn));
    }

    /// Closes 3.1.1 connections whose withheld acknowledgement is due.
    pub(super) fn refused_holds_tick(&mut self, now_ms: u64) {
        while let Some(&(due, conn)) = self.refused_holds.front()
            && due <= now_ms
        {
            self.refused_holds.pop_front();
            if self.slot(conn).is_some_and(|c| !c.ended) {
                self.stats.queue_refused_closes += 1;
                tracing::info!(
                    shard = self.shard,
                    conn = %conn,
                    "closing a 3.1.1 publisher whose message a full queue refused; it \
                     re-sends it after reconnecting"
                );
                let reason = CloseReason::ProtocolError(ReasonCode::QuotaExceeded);
                self.end_conn(now_ms, conn, reason);
            }
        }
    }

    /// A refused QoS 2 publication (PUBREC) frees its inbound packet id: the
    /// exchange ended, and a re-send with the same id is a new message.
    fn release_refused_inbound(&mut self, conn: ConnId, ack: &Packet) {
        let Packet::PubRec(rec) = ack else {
            return;
        };
        let idx = self.conn(conn).session;
        let s = self.session_mut(idx);
        if let Some(pos) = s.inbound_position(rec.packet_id) {
            s.inbound_qos2.swap_remove(pos);
            self.persist_inbound(idx, rec.packet_id, None, None);
        }
    }
}

/// Turns a PUBACK or PUBREC into 0x97 Quota exceeded.
fn set_quota_exceeded(ack: &mut Packet) {
    match ack {
        Packet::PubAck(a) => a.reason_code = ReasonCode::QuotaExceeded,
        Packet::PubRec(r) => r.reason_code = ReasonCode::QuotaExceeded,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    //! Goal: a persistent session's queue never loses a message its
    //! publisher was acknowledged for. When its budget is full the newest is
    //! refused (v5: 0x97; 3.1.1: no acknowledgement, then the connection is
    //! closed), on one shard and across two; within the budget a stored
    //! session keeps only its head in memory and gets the rest back from the
    //! store in order. Method: engines driven packet by packet, a store
    //! stand-in that applies ops and answers loads after each "commit", and
    //! assertions on the exact packets each client is sent.

    use bytes::Bytes;
    use tessera_proto::{Packet, ProtocolVersion, PubAck, PubRec, Publish, QoS, ReasonCode, Str};

    use crate::engine::testing::{StoreModel as Store, connect_packet, drain, engines, pump_mesh};
    use crate::engine::{Engine, Limits};
    use crate::hash::shard_for;
    use crate::session::{ConnId, DELIVERY_OVERHEAD_BYTES};

    /// Payloads are 2 bytes on topic "t": each delivery costs this much.
    const COST: u64 = DELIVERY_OVERHEAD_BYTES + 1 + 2;

    fn limits(sessions_bytes: u64) -> Limits {
        Limits {
            queue_bytes_max: sessions_bytes,
            queue_head_count_max: 4,
            queue_high_water: 0,
            ..Limits::default()
        }
    }

    /// A persistent session subscribed to "t" at QoS 2, then offline.
    fn offline_subscriber(e: &mut Engine, id: &str) {
        let mut c = connect_packet(ProtocolVersion::V5, id, false);
        c.properties.session_expiry_interval = Some(600);
        let conn = e.connect(1, c, false);
        let subscribe = crate::engine::testing::subscribe_packet("t", QoS::ExactlyOnce);
        e.handle_packet(1, conn, subscribe);
        e.connection_lost(2, conn);
        e.release(2, conn);
    }

    fn publish(e: &mut Engine, conn: ConnId, n: u16, qos: QoS) {
        let mut p = Publish::new(Str::from_static("t"), Bytes::from(format!("{n:02}")));
        p.qos = qos;
        p.packet_id = n;
        e.handle_packet(3, conn, Packet::Publish(p));
    }

    /// The subscriber reconnects and acknowledges everything until nothing
    /// more comes; returns the payloads in order.
    fn receive_all(e: &mut Engine, id: &str, mut store: Option<&mut Store>) -> Vec<String> {
        let mut c = connect_packet(ProtocolVersion::V5, id, false);
        c.properties.session_expiry_interval = Some(600);
        let conn = e.connect(10, c, false);
        let mut got = Vec::new();
        for _ in 0..1000 {
            if let Some(st) = store.as_deref_mut() {
                st.commit(e, 10);
            }
            let packets = drain(e, conn, ProtocolVersion::V5);
            if packets.is_empty() {
                break;
            }
            for p in packets {
                match p {
                    Packet::Publish(p) => {
                        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
                        let ack = match p.qos {
                            QoS::AtLeastOnce => Packet::PubAck(PubAck::new(p.packet_id)),
                            _ => Packet::PubRec(PubRec::new(p.packet_id)),
                        };
                        e.handle_packet(10, conn, ack);
                    }
                    Packet::PubRel(r) => e.handle_packet(
                        10,
                        conn,
                        Packet::PubComp(tessera_proto::PubComp::new(r.packet_id)),
                    ),
                    _ => {}
                }
            }
        }
        got
    }

    /// The reason codes of the PUBACKs and PUBRECs `conn` was sent.
    fn acks(e: &mut Engine, conn: ConnId, version: ProtocolVersion) -> Vec<(u16, ReasonCode)> {
        drain(e, conn, version)
            .into_iter()
            .filter_map(|p| match p {
                Packet::PubAck(a) => Some((a.packet_id, a.reason_code)),
                Packet::PubRec(r) => Some((r.packet_id, r.reason_code)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_full_queue_refuses_the_newest_with_0x97_and_keeps_every_acknowledged_message() {
        let mut e = Engine::new(0, 1, limits(3 * COST));
        offline_subscriber(&mut e, "sub");
        let p = e.connect(3, connect_packet(ProtocolVersion::V5, "pub", true), false);
        drain(&mut e, p, ProtocolVersion::V5);
        for n in 1..=4 {
            publish(&mut e, p, n, QoS::AtLeastOnce);
        }
        publish(&mut e, p, 5, QoS::ExactlyOnce);
        let ok = ReasonCode::Success;
        let full = ReasonCode::QuotaExceeded;
        assert_eq!(
            acks(&mut e, p, ProtocolVersion::V5),
            [(1, ok), (2, ok), (3, ok), (4, full), (5, full)]
        );
        assert_eq!(e.stats().queue_refused, 2);
        assert_eq!(e.stats().dropped_queue_full, 0);
        // The refused QoS 2 exchange ended: the same id is a new message,
        // not a duplicate to acknowledge without delivering.
        assert_eq!(receive_all(&mut e, "sub", None), ["01", "02", "03"]);
        publish(&mut e, p, 5, QoS::ExactlyOnce);
        assert_eq!(acks(&mut e, p, ProtocolVersion::V5), [(5, ok)]);
    }

    #[test]
    fn a_3_1_1_publisher_gets_no_acknowledgement_for_a_refused_message_and_is_closed_at_the_bound()
    {
        let mut e = Engine::new(0, 1, limits(COST));
        offline_subscriber(&mut e, "sub");
        let v3 = ProtocolVersion::V3_1_1;
        let p = e.connect(3, connect_packet(v3, "pub", false), false);
        drain(&mut e, p, v3);
        publish(&mut e, p, 1, QoS::AtLeastOnce);
        publish(&mut e, p, 2, QoS::ExactlyOnce);
        publish(&mut e, p, 3, QoS::AtMostOnce);
        assert_eq!(acks(&mut e, p, v3), [(1, ReasonCode::Success)]);
        assert_eq!(e.stats().queue_refused_acks_held, 1);
        // The refused QoS 2 id is free again: the re-send after the close is
        // a new message.
        e.tick(3 + 1_999);
        assert!(!e.is_ended(p), "held until the bound");
        e.tick(3 + 2_000);
        assert!(e.is_ended(p), "closed at backpressure_hold_ms_max");
        assert_eq!(e.stats().queue_refused_closes, 1);
        assert_eq!(e.stats().dropped_qos0_offline, 1, "the QoS 0 one");
        assert_eq!(receive_all(&mut e, "sub", None), ["01"]);
        let p = e.connect(5_000, connect_packet(v3, "pub", false), false);
        drain(&mut e, p, v3);
        publish(&mut e, p, 2, QoS::ExactlyOnce);
        assert_eq!(acks(&mut e, p, v3), [(2, ReasonCode::Success)]);
        assert_eq!(receive_all(&mut e, "sub", None), ["02"]);
    }

    /// A stored engine (head of 4) whose offline "sub" has `n` QoS 1
    /// messages queued and committed.
    fn stored_backlog(n: u16) -> (Engine, Store) {
        let mut e = Engine::new(0, 1, limits(1 << 20));
        e.enable_persistence(true);
        let mut store = Store::default();
        offline_subscriber(&mut e, "sub");
        let p = e.connect(3, connect_packet(ProtocolVersion::V5, "pub", true), false);
        for k in 1..=n {
            publish(&mut e, p, k, QoS::AtLeastOnce);
        }
        store.commit(&mut e, 3);
        (e, store)
    }

    #[test]
    fn a_stored_queue_keeps_its_head_in_memory_and_the_rest_comes_back_from_disk_in_order() {
        let (mut e, mut store) = stored_backlog(40);
        assert_eq!(e.queue_bytes_memory(), 4 * COST, "the head: 4 deliveries");
        assert_eq!(e.queue_bytes_disk(), 36 * COST);
        assert_eq!(e.stats().queue_spilled, 36);
        let queued = store.msgs.len();
        assert_eq!(queued, 40, "every delivery is stored");
        let want: Vec<String> = (1..=40).map(|n| format!("{n:02}")).collect();
        assert_eq!(receive_all(&mut e, "sub", Some(&mut store)), want);
        assert_eq!(e.stats().queue_loaded, 36);
        assert_eq!((e.queue_bytes_memory(), e.queue_bytes_disk()), (0, 0));
        assert!(store.msgs.is_empty(), "every delivery acknowledged");
    }

    #[test]
    fn a_larger_head_set_for_a_consumer_loads_its_disk_tail_in_one_commit() {
        let (mut e, mut store) = stored_backlog(40);
        let mut c = connect_packet(ProtocolVersion::V5, "sub", false);
        c.properties.session_expiry_interval = Some(600);
        // One in flight: 3 of the head of 4 wait, more than half a head,
        // so nothing is loaded (and at most 4 would be per commit).
        c.properties.receive_maximum = Some(1);
        let conn = e.connect(10, c, false);
        store.commit(&mut e, 10);
        assert_eq!(e.stats().queue_loaded, 0);
        // With a head of 64 the whole tail comes in the next commit.
        e.set_queue_head(conn, 64);
        store.commit(&mut e, 10);
        assert_eq!(e.stats().queue_loaded, 36, "the rest in one load");
        assert_eq!(e.queue_bytes_disk(), 0);
        // Same messages, same order, none lost (a takeover keeps the head).
        let want: Vec<String> = (1..=40).map(|n| format!("{n:02}")).collect();
        assert_eq!(receive_all(&mut e, "sub", Some(&mut store)), want);
        assert!(store.msgs.is_empty());
    }

    #[test]
    fn new_deliveries_to_a_connected_session_wait_behind_its_disk_tail() {
        let (mut e, mut store) = stored_backlog(10);
        let p = e.connect(3, connect_packet(ProtocolVersion::V5, "pub2", true), false);
        // Reconnect without acknowledging: the window takes the head, a load
        // is asked for, and new messages arrive before it is answered.
        let mut c = connect_packet(ProtocolVersion::V5, "sub", false);
        c.properties.session_expiry_interval = Some(600);
        c.properties.receive_maximum = Some(2);
        let s = e.connect(4, c, false);
        for n in 11..=12 {
            publish(&mut e, p, n, QoS::AtLeastOnce);
        }
        let mut got = Vec::new();
        for _ in 0..100 {
            store.commit(&mut e, 5);
            let packets = drain(&mut e, s, ProtocolVersion::V5);
            if packets.is_empty() {
                break;
            }
            for packet in packets {
                if let Packet::Publish(p) = packet {
                    got.push(String::from_utf8(p.payload.to_vec()).unwrap());
                    e.handle_packet(5, s, Packet::PubAck(PubAck::new(p.packet_id)));
                }
            }
        }
        let want: Vec<String> = (1..=12).map(|n| format!("{n:02}")).collect();
        assert_eq!(got, want);
    }

    /// Across shards in sync durability: the subscriber's shard refuses the
    /// `PublishDurable` and says so before its `Ack`; the publisher's PUBACK,
    /// held for that `Ack`, goes out with 0x97.
    #[test]
    fn a_full_queue_on_another_shard_refuses_with_0x97() {
        let id = |shard: usize| {
            (0..)
                .map(|k| format!("c{k}"))
                .find(|c| shard_for(c.as_bytes(), 2) == shard)
                .unwrap()
        };
        let (pub_id, sub_id) = (id(0), id(1));
        let mut es = engines(2, &limits(2 * COST));
        let mut stores = [Store::default(), Store::default()];
        for e in &mut es {
            e.enable_persistence(true);
        }
        offline_subscriber(&mut es[1], &sub_id);
        let settle = |es: &mut Vec<Engine>, stores: &mut [Store; 2]| {
            for _ in 0..10 {
                pump_mesh(es, 3);
                for (e, st) in es.iter_mut().zip(stores.iter_mut()) {
                    st.commit(e, 3);
                }
            }
        };
        settle(&mut es, &mut stores);
        let p = es[0].connect(3, connect_packet(ProtocolVersion::V5, &pub_id, true), false);
        drain(&mut es[0], p, ProtocolVersion::V5);
        for n in 1..=3 {
            publish(&mut es[0], p, n, QoS::AtLeastOnce);
            settle(&mut es, &mut stores);
        }
        let ok = ReasonCode::Success;
        assert_eq!(
            acks(&mut es[0], p, ProtocolVersion::V5),
            [(1, ok), (2, ok), (3, ReasonCode::QuotaExceeded)]
        );
        assert_eq!(es[1].stats().queue_refused, 1);
        assert_eq!(
            receive_all(&mut es[1], &sub_id, Some(&mut stores[1])),
            ["01", "02"]
        );
    }
}
