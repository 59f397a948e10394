//! Session state: what the broker keeps for one ClientID between and during
//! connections. Lives only on the session's owner shard.
//!
//! The outbound side is a window of in-flight QoS 1/2 deliveries (bounded by the
//! client's Receive Maximum and the broker's `inflight_count_max`) and a bounded
//! FIFO queue behind it. The inbound side remembers QoS 2 packet ids awaiting
//! PUBREL so a re-sent PUBLISH is not delivered twice.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use tessera_proto::{ProtocolVersion, Publish, QoS, Str, SubscriptionOptions, Will};

use crate::mesh::PubId;
use crate::message::{Message, SessionUid};
use crate::trie::ShardSet;

/// Index of a session in its shard's session slab.
pub type SessionIdx = u32;

/// A connection on its shard: the slab slot and the serial of the connection
/// holding it. Slots are reused, so an id kept by a task that outlived its
/// connection names a serial that no longer matches, and the engine ignores it
/// instead of acting on the slot's new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// Index in the shard's connection slab.
    pub slot: u32,
    /// Serial of the connection, unique per shard (wrapping after 2^32).
    pub serial: u32,
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.slot, self.serial)
    }
}

/// Who a session's client is, for its ACL checks, and the decisions cached.
#[derive(Debug, Default)]
pub struct SessionAuth {
    /// The authenticated user name of the latest connection (none when
    /// anonymous).
    pub username: Option<Str>,
    /// Publish decisions, per topic.
    pub acl: crate::authz::AclCache,
    /// Rules from the credentials, which replace the hook's when present.
    pub token_acl: Option<std::sync::Arc<crate::authz::TokenAcl>>,
}

/// One subscription of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionEntry {
    /// Options from SUBSCRIBE.
    pub options: SubscriptionOptions,
    /// v5 subscription identifier.
    pub subscription_id: Option<u32>,
    /// Made by a SUBSCRIBE in this life of the node, in a cluster, under a route
    /// this life added (not restored from the store, not brought along by a
    /// session that moved in, not beside such a subscription to the filter on
    /// this shard): it never gets a publication another node matched against
    /// routes of this node's earlier life (`MeshMsg::Forwarded::earlier_life`).
    /// Not stored: what is restored or moved in is not fresh.
    pub fresh: bool,
}

/// A shared subscription `$share/{group}/{filter}` (MQTT 5.0 section 4.8.2),
/// named as every shard names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShareKey {
    /// The ShareName.
    pub group: Str,
    /// The topic filter after `$share/{group}/`.
    pub filter: Str,
}

/// A message on its way to one session, with the per-subscription decisions made.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// QoS of this delivery: the minimum of the published and granted QoS.
    pub qos: QoS,
    /// RETAIN flag to send.
    pub retain: bool,
    /// v5 subscription identifiers of the matching subscriptions.
    pub subscription_ids: Vec<u32>,
    /// The shared subscription this delivery was chosen for, if any: if the
    /// member leaves before it completes, the group gets it back.
    pub share: Option<Arc<ShareKey>>,
    /// Sequence number in its session's store (`shard::store`); 0 when the
    /// delivery is not stored (QoS 0, or a session that does not persist).
    pub seq: u64,
}

/// Where an in-flight outbound QoS 1/2 delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREC received and PUBREL sent; waiting for PUBCOMP.
    Released,
}

/// An inbound QoS 2 packet id awaiting PUBREL (`Session::inbound_qos2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundQos2 {
    /// The packet id.
    pub packet_id: u16,
    /// The held PUBREC's token while other shards have not all acknowledged
    /// the publication: a re-sent PUBLISH's PUBREC waits for it too.
    pub token: Option<u64>,
    /// The store epoch holding the id (0: not stored): a re-sent PUBLISH's
    /// PUBREC waits for its commit too.
    pub epoch: u64,
    /// After a restart: the other shards that may lack the publication
    /// (recovery's answer). The next re-sent PUBLISH is delivered again
    /// there, once; boxed because it is almost always `None`.
    pub redeliver: Option<Box<ShardSet>>,
    /// The publication's cluster-wide id, when it went to another node
    /// (`engine::handed_qos2`: a session that moves while its PUBREC waits).
    pub id: Option<PubId>,
    /// The session came from another node while the original publication was
    /// still on its way from there (`engine::handed_qos2`): the PUBREC of a
    /// re-sent PUBLISH waits until that node says the original arrived. Boxed
    /// because it is almost always `None`.
    pub pending: Option<Box<PendingForward>>,
}

/// An inbound QoS 2 publication whose original is still being forwarded by the
/// node it was published on (see `InboundQos2::pending`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingForward {
    /// The node that holds the original (opaque to the engine).
    pub holder: u64,
    /// The original's id.
    pub id: PubId,
    /// The holder no longer knows the original (it restarted, or forgot it): the
    /// re-sent PUBLISH is routed here, with the original's id.
    pub lost: bool,
    /// The re-sent PUBLISH waiting for the holder's answer, with its connection.
    pub resent: Option<(ConnId, Publish)>,
}

impl InboundQos2 {
    /// A packet id just received.
    pub fn new(packet_id: u16) -> InboundQos2 {
        InboundQos2 {
            packet_id,
            token: None,
            epoch: 0,
            redeliver: None,
            id: None,
            pending: None,
        }
    }

    /// A packet id restored from a store or another node, with the shards
    /// that may lack its publication.
    pub fn restored(packet_id: u16, redeliver: ShardSet, id: Option<PubId>) -> InboundQos2 {
        InboundQos2 {
            redeliver: (!redeliver.is_empty()).then(|| Box::new(redeliver)),
            id,
            ..InboundQos2::new(packet_id)
        }
    }
}

/// One in-flight outbound delivery.
#[derive(Debug, Clone)]
pub struct Inflight {
    /// Packet identifier used on the wire.
    pub packet_id: u16,
    /// The delivery (kept for re-sending with DUP on reconnect).
    pub delivery: Delivery,
    /// Progress of the exchange.
    pub state: InflightState,
}

/// What one queued delivery counts against the queue budgets
/// (`Limits::queue_bytes_max`, `Limits::queue_bytes_shard_max`): its topic and
/// payload plus a fixed overhead for the rest of the record, so a budget also
/// bounds how many empty messages fit.
pub const DELIVERY_OVERHEAD_BYTES: u64 = 64;

/// Bytes a delivery counts against the queue budgets (see
/// [`DELIVERY_OVERHEAD_BYTES`]). The same on the way to the disk and back.
pub fn delivery_cost(d: &Delivery) -> u64 {
    DELIVERY_OVERHEAD_BYTES + d.message.topic.len() as u64 + d.message.payload.len() as u64
}

/// A session's FIFO of deliveries waiting for window space or a connection.
///
/// It has two parts, in order: a *head* in memory and, for a stored session
/// whose head is full, a *disk tail*: deliveries that are only in the shard
/// store (their `PutMsg` was written), counted here by number and bytes.
/// Every delivery on disk is newer than every delivery in the head; the
/// engine loads the tail back into the head as the head drains
/// (`engine::persist`, `StoreOp::LoadQueue`). Non-stored sessions never have a
/// disk tail.
///
/// It counts its QoS 0 entries, so the overflow policy that drops QoS 0 first
/// does not scan a queue that holds none (the common QoS 1 case).
#[derive(Debug, Default)]
pub struct DeliveryQueue {
    items: VecDeque<Delivery>,
    qos0: usize,
    /// `delivery_cost` of `items`.
    head_bytes: u64,
    /// Deliveries in the disk tail.
    disk_count: usize,
    /// `delivery_cost` of the disk tail.
    disk_bytes: u64,
    /// Every delivery of the disk tail has a sequence number at least this.
    disk_from_seq: u64,
    /// A load of the disk tail into the head is on its way.
    pub loading: bool,
    /// Deliveries this queue keeps in memory before spilling to its disk
    /// tail, when not the engine's `Limits::queue_head_count_max` (0).
    /// Set by [`crate::engine::Engine::set_queue_head`]; not stored.
    pub head_max: u16,
}

impl DeliveryQueue {
    /// Deliveries queued, in memory and on disk.
    pub fn len(&self) -> usize {
        self.items.len() + self.disk_count
    }

    /// True when nothing is queued, in memory or on disk.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.disk_count == 0
    }

    /// Deliveries in the head (memory).
    pub fn head_len(&self) -> usize {
        self.items.len()
    }

    /// Deliveries in the disk tail.
    pub fn disk_len(&self) -> usize {
        self.disk_count
    }

    /// Budget bytes of the head (memory).
    pub fn head_bytes(&self) -> u64 {
        self.head_bytes
    }

    /// Budget bytes of the disk tail.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Budget bytes of the whole queue.
    pub fn bytes(&self) -> u64 {
        self.head_bytes + self.disk_bytes
    }

    /// The lowest sequence number the disk tail can hold.
    pub fn disk_from_seq(&self) -> u64 {
        self.disk_from_seq
    }

    /// The oldest delivery in memory.
    pub fn front(&self) -> Option<&Delivery> {
        self.items.front()
    }

    fn add(&mut self, d: &Delivery) {
        self.qos0 += usize::from(d.qos == QoS::AtMostOnce);
        self.head_bytes += delivery_cost(d);
    }

    fn sub(&mut self, d: &Delivery) {
        self.qos0 -= usize::from(d.qos == QoS::AtMostOnce);
        self.head_bytes -= delivery_cost(d);
    }

    /// Appends a delivery to the head; only while nothing is on disk (order).
    pub fn push_back(&mut self, d: Delivery) {
        assert_eq!(self.disk_count, 0, "a delivery behind the disk tail");
        self.add(&d);
        self.items.push_back(d);
    }

    /// Appends a stored delivery to the disk tail: only its cost stays.
    pub fn push_disk(&mut self, d: &Delivery) {
        assert!(d.seq != 0, "only stored deliveries go to disk");
        if self.disk_count == 0 {
            self.disk_from_seq = d.seq;
        }
        assert!(d.seq >= self.disk_from_seq, "disk tail out of order");
        self.disk_count += 1;
        self.disk_bytes += delivery_cost(d);
    }

    /// A delivery loaded back from the disk tail: it moves to the end of the
    /// head. False (and nothing changes) when it is not part of the tail
    /// (older than the tail, or nothing is on disk).
    pub fn load(&mut self, d: Delivery) -> bool {
        if self.disk_count == 0 || d.seq < self.disk_from_seq {
            return false;
        }
        self.disk_count -= 1;
        self.disk_bytes = self.disk_bytes.saturating_sub(delivery_cost(&d));
        if self.disk_count == 0 {
            self.disk_bytes = 0;
        }
        self.disk_from_seq = d.seq + 1;
        self.add(&d);
        self.items.push_back(d);
        true
    }

    /// Declares a disk tail already in the store (a moving session taken back by the
    /// node whose store holds it): `count` deliveries costing `bytes`, every sequence
    /// number at least `from_seq`. Only on a queue without a tail.
    pub fn set_disk(&mut self, count: usize, bytes: u64, from_seq: u64) {
        assert_eq!(self.disk_count, 0, "a queue has one disk tail");
        if count > 0 {
            self.disk_count = count;
            self.disk_bytes = bytes;
            self.disk_from_seq = from_seq;
        }
    }

    /// Forgets the disk tail (its records are gone from the store).
    pub fn forget_disk(&mut self) {
        self.disk_count = 0;
        self.disk_bytes = 0;
    }

    /// Removes the oldest delivery in memory.
    pub fn pop_front(&mut self) -> Option<Delivery> {
        let d = self.items.pop_front()?;
        self.sub(&d);
        Some(d)
    }

    /// Removes the oldest QoS 0 delivery in memory, or else the oldest one.
    pub fn drop_qos0_or_oldest(&mut self) -> Option<Delivery> {
        if self.qos0 == 0 {
            return self.pop_front();
        }
        let pos = self
            .items
            .iter()
            .position(|d| d.qos == QoS::AtMostOnce)
            .expect("counted");
        let d = self.items.remove(pos).expect("position exists");
        self.sub(&d);
        Some(d)
    }

    /// Takes the deliveries in memory that `take` selects, oldest first; the
    /// others and the disk tail stay.
    pub fn take_head_where(&mut self, mut take: impl FnMut(&Delivery) -> bool) -> Vec<Delivery> {
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.items.len());
        for d in std::mem::take(&mut self.items) {
            if take(&d) {
                out.push(d);
            } else {
                kept.push_back(d);
            }
        }
        for d in &out {
            self.sub(d);
        }
        self.items = kept;
        out
    }

    /// The deliveries in memory, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Delivery> {
        self.items.iter()
    }
}

/// A session.
#[derive(Debug)]
pub struct Session {
    /// The ClientID.
    pub client_id: Str,
    /// Process-unique identity, for no-local.
    pub uid: SessionUid,
    /// Protocol version of the latest connection.
    pub version: ProtocolVersion,
    /// The live connection, if any.
    pub conn: Option<ConnId>,
    /// Seconds the session outlives its connection (3.1.1 clean session = 0,
    /// persistent = `u32::MAX`, which never expires).
    pub expiry_interval_s: u32,
    /// When the last connection ended, in broker milliseconds.
    pub disconnected_at_ms: Option<u64>,
    /// Subscriptions by filter, in filter order: the engine walks them to remove a
    /// session's routes, to export and store it, to leave a ghost; a hash map's order
    /// would differ per process (so would the order of route proposals and records,
    /// and a simulation seed would not replay). Not on a message's path (deliveries
    /// match in the shard's trie); a session has few.
    pub subscriptions: BTreeMap<Str, SubscriptionEntry>,
    /// In-flight outbound QoS 1/2 deliveries, in send order (changed only
    /// through the methods below, which keep `inflight_sorted`).
    inflight: VecDeque<Inflight>,
    /// The packet ids of `inflight` increase strictly along it, in wrapping
    /// order from the front's (each one's `wrapping_sub` of the front's is
    /// larger than the one before): an id past the back's is then free without
    /// a scan. True as ids are allocated (in order) and acknowledged (in any
    /// order: a removal keeps it); false only after a push out of that order
    /// (a restore, a window near 65,535), until the window empties.
    inflight_sorted: bool,
    /// Deliveries waiting for window space or a connection.
    pub queue: DeliveryQueue,
    /// QoS 2 packet ids received and not yet released by PUBREL.
    pub inbound_qos2: Vec<InboundQos2>,
    /// The will of the live connection.
    /// Boxed: most sessions have none, and inline it would triple the size of
    /// every session.
    pub will: Option<Box<Will>>,
    /// The authenticated user and the cached ACL decisions; only with an
    /// auth hook, boxed so sessions without one pay a pointer.
    pub auth: Option<Box<SessionAuth>>,
    /// Next outbound packet id to try.
    next_packet_id: u16,
    /// Sequence number of the next stored delivery (starts at 1).
    pub next_seq: u64,
    /// The store generation in which this session last gave out a sequence
    /// number, and the first number it gave out in it: deliveries numbered
    /// from there on in that generation have never reached the store, so an
    /// acknowledgement before the generation ends cancels their put instead
    /// of deleting a record (`engine::persist`, "Pending deliveries").
    pub fresh_from: (u64, u64),
    /// Whether the store holds a record of this session (persistence on and
    /// the session persistent): its deliveries and inbound ids are stored too.
    pub stored: bool,
    /// Restored from this shard's store at this start (and not replaced since; a
    /// take-back of its own moving copy keeps it): what the shard knew in its
    /// earlier life is true for it, not for a session that came later (the engine's
    /// `moved` module, sim seed 703).
    pub restored: bool,
    /// Taken in from another node in this life (`Engine::import_session`; a
    /// take-back of its own moving copy keeps it): it was elsewhere when this
    /// shard's earlier life routed what it restored as maybe lacking on other
    /// nodes. A session neither restored nor moved in started here after those
    /// publications (the engine's `moved` module, sim seeds 703 and 663).
    pub moved_in: bool,
}

impl Session {
    /// Where inbound QoS 2 packet id `packet_id` is in `inbound_qos2`.
    pub fn inbound_position(&self, packet_id: u16) -> Option<usize> {
        self.inbound_qos2
            .iter()
            .position(|i| i.packet_id == packet_id)
    }

    /// A new, empty session.
    pub fn new(client_id: Str, uid: SessionUid, version: ProtocolVersion) -> Session {
        Session {
            client_id,
            uid,
            version,
            conn: None,
            expiry_interval_s: 0,
            disconnected_at_ms: None,
            subscriptions: BTreeMap::new(),
            inflight: VecDeque::new(),
            inflight_sorted: true,
            queue: DeliveryQueue::default(),
            inbound_qos2: Vec::new(),
            will: None,
            auth: None,
            next_packet_id: 1,
            next_seq: 1,
            fresh_from: (0, 0),
            stored: false,
            restored: false,
            moved_in: false,
        }
    }

    /// Allocates an outbound packet id not used by any in-flight delivery.
    /// The caller guarantees the window is below 65,535 entries.
    pub fn allocate_packet_id(&mut self) -> u16 {
        assert!(
            self.inflight.len() < u16::MAX as usize,
            "in-flight window exhausted"
        );
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if self.packet_id_free(id) {
                return id;
            }
        }
    }

    /// Whether no in-flight delivery uses `id`. Usually without a scan: ids
    /// are allocated in order, so the next one is past the window's last
    /// (a scan of a bridge's 256 in-flight entries per send was ~5 % of
    /// the broker's core).
    fn packet_id_free(&self, id: u16) -> bool {
        let (Some(front), Some(back)) = (self.inflight.front(), self.inflight.back()) else {
            return true;
        };
        if self.inflight_sorted
            && id.wrapping_sub(front.packet_id) > back.packet_id.wrapping_sub(front.packet_id)
        {
            return true;
        }
        !self.inflight.iter().any(|i| i.packet_id == id)
    }

    /// The in-flight outbound deliveries, in send order.
    pub fn inflight(&self) -> &VecDeque<Inflight> {
        &self.inflight
    }

    /// Appends an in-flight delivery (its packet id not in use).
    pub fn push_inflight(&mut self, i: Inflight) {
        if let (Some(front), Some(back)) = (self.inflight.front(), self.inflight.back()) {
            let past = i.packet_id.wrapping_sub(front.packet_id);
            self.inflight_sorted &= past > back.packet_id.wrapping_sub(front.packet_id);
        } else {
            self.inflight_sorted = true;
        }
        self.inflight.push_back(i);
    }

    /// Removes the in-flight delivery at `pos`.
    pub fn remove_inflight(&mut self, pos: usize) -> Option<Inflight> {
        self.inflight.remove(pos)
    }

    /// Keeps the in-flight deliveries for which `keep` is true.
    pub fn retain_inflight(&mut self, keep: impl FnMut(&mut Inflight) -> bool) {
        self.inflight.retain_mut(keep);
    }

    /// Sets the state of the in-flight delivery at `pos`.
    pub fn set_inflight_state(&mut self, pos: usize, state: InflightState) {
        self.inflight[pos].state = state;
    }

    /// The next outbound packet id to try (moves with the session to another node).
    pub fn next_packet_id(&self) -> u16 {
        self.next_packet_id
    }

    /// Sets the next outbound packet id to try (0 is taken as 1).
    pub fn set_next_packet_id(&mut self, id: u16) {
        self.next_packet_id = id.max(1);
    }

    /// Position of the in-flight delivery with `packet_id`.
    pub fn inflight_position(&self, packet_id: u16) -> Option<usize> {
        self.inflight.iter().position(|i| i.packet_id == packet_id)
    }

    /// Whether the session outlives a disconnect.
    pub fn is_persistent(&self) -> bool {
        self.expiry_interval_s > 0
    }

    /// When the session expires: its disconnect plus its expiry interval;
    /// `None` while connected or when it never expires (`u32::MAX`).
    pub fn expiry_deadline_ms(&self) -> Option<u64> {
        match self.disconnected_at_ms {
            Some(at) if self.expiry_interval_s != u32::MAX => {
                Some(at.saturating_add(u64::from(self.expiry_interval_s) * 1000))
            }
            _ => None,
        }
    }

    /// Whether the session has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expiry_deadline_ms().is_some_and(|t| now_ms >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session::new(
            Str::from_static("c"),
            SessionUid::new(0, 1),
            ProtocolVersion::V5,
        )
    }

    #[test]
    fn packet_ids_skip_ids_in_flight_and_wrap() {
        let mut s = session();
        s.next_packet_id = u16::MAX;
        let first = s.allocate_packet_id();
        assert_eq!(first, u16::MAX);
        assert_eq!(s.allocate_packet_id(), 1, "wraps to 1, never 0");
    }

    fn in_flight(packet_id: u16) -> Inflight {
        Inflight {
            packet_id,
            delivery: delivery(0, QoS::AtLeastOnce),
            state: InflightState::Published,
        }
    }

    /// Allocation never hands out an id in flight, whatever the window went
    /// through: ids in order, acknowledgements in any order, restored ids
    /// out of order, the wrap past 65,535; and it takes the next id in order
    /// when that one is free (what a client sees).
    #[test]
    fn allocated_ids_are_never_in_flight() {
        let mut random = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random
        };
        for start in [1, 200, u16::MAX - 300, u16::MAX] {
            let mut s = session();
            s.set_next_packet_id(start);
            for step in 0..20_000u32 {
                let r = next();
                match r % 10 {
                    // Acknowledged: the oldest usually, any one sometimes.
                    0..=3 if !s.inflight().is_empty() => {
                        let pos = if r % 3 == 0 {
                            (r >> 8) as usize % s.inflight().len()
                        } else {
                            0
                        };
                        s.remove_inflight(pos);
                    }
                    // Restored out of order (now and then): a free id just
                    // ahead of the allocation, which must skip it later.
                    4 if step % 13 == 0 => {
                        let id = s.next_packet_id.wrapping_add((r >> 16) as u16 % 8).max(1);
                        if !s.inflight().iter().any(|i| i.packet_id == id) {
                            s.push_inflight(in_flight(id));
                        }
                    }
                    _ if s.inflight().len() < 300 => {
                        let expected = {
                            let mut id = s.next_packet_id;
                            while s.inflight().iter().any(|i| i.packet_id == id) {
                                id = if id == u16::MAX { 1 } else { id + 1 };
                            }
                            id
                        };
                        let id = s.allocate_packet_id();
                        assert_eq!(id, expected, "start {start}, step {step}");
                        s.push_inflight(in_flight(id));
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn expiry_counts_from_disconnect() {
        let mut s = session();
        s.expiry_interval_s = 10;
        assert!(!s.is_expired(1_000_000), "connected sessions never expire");
        s.disconnected_at_ms = Some(1_000);
        assert!(!s.is_expired(10_999));
        assert!(s.is_expired(11_000));
        s.expiry_interval_s = u32::MAX;
        assert!(!s.is_expired(u64::MAX));
    }

    fn delivery(n: u8, qos: QoS) -> Delivery {
        Delivery {
            message: Message {
                topic: Str::from_static("t"),
                payload: bytes::Bytes::from(vec![n]),
                qos,
                retain: false,
                properties: None,
                expires_at_ms: None,
                origin: None,
                received_us: 0,
            },
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            share: None,
            seq: 0,
        }
    }

    #[test]
    fn delivery_queue_drops_the_oldest_qos0_first_and_keeps_its_count() {
        let mut q = DeliveryQueue::default();
        for (n, qos) in [
            (0, QoS::AtLeastOnce),
            (1, QoS::AtMostOnce),
            (2, QoS::AtMostOnce),
        ] {
            q.push_back(delivery(n, qos));
        }
        assert_eq!(q.drop_qos0_or_oldest().unwrap().message.payload[0], 1);
        assert_eq!(q.drop_qos0_or_oldest().unwrap().message.payload[0], 2);
        // No QoS 0 left: the oldest goes.
        q.push_back(delivery(3, QoS::ExactlyOnce));
        assert_eq!(q.drop_qos0_or_oldest().unwrap().message.payload[0], 0);
        assert_eq!(q.len(), 1);
        q.push_back(delivery(4, QoS::AtMostOnce));
        assert_eq!(q.take_head_where(|_| true).len(), 2);
        assert!(q.is_empty());
        assert_eq!(q.head_bytes(), 0);
        // The count was reset with the items: a QoS 1 queue drops its oldest.
        q.push_back(delivery(5, QoS::AtLeastOnce));
        q.push_back(delivery(6, QoS::AtLeastOnce));
        assert_eq!(q.drop_qos0_or_oldest().unwrap().message.payload[0], 5);
    }
}
