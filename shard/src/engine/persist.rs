//! Persistence hooks of the engine (`impl Engine`): what each state change of
//! a persistent session writes to the shard store, the epochs that tie output
//! to commits, and restoring a shard from its store at start-up.
//!
//! The engine stays sans-IO: it appends [`StoreOp`]s to the batch of the
//! current *epoch*; the driver takes the batch (`take_store_batch`, which
//! starts the next epoch), a writer thread commits it, and the driver reports
//! the commit (`store_committed`). In `sync` durability, output that depends
//! on uncommitted state waits for its epoch:
//! - bytes written to a connection whose session is stored, while the current
//!   epoch has ops, and the PUBACK/PUBREC of a publication that produced ops,
//!   carry the epoch in [`ConnOutput::durable_epoch`]; the driver writes them
//!   only once that epoch is committed. This covers the publisher's
//!   acknowledgement (its message is stored for local persistent
//!   subscribers), an outbound QoS 2 PUBLISH (its packet id is stored before
//!   the client can see it, so a restart re-sends it with the same id and
//!   the client does not deliver it twice), CONNACK, SUBACK and PUBCOMP;
//! - a publication forwarded to another shard is `PublishDurable`; that
//!   shard answers `Ack` only after committing what it stored, and the
//!   publisher's acknowledgement is held until every such `Ack` arrived (the
//!   held-acknowledgement mechanism of retained messages). A delivery to a
//!   shared subscription member on another shard (`SharedPublish`) carries
//!   the same token; the shard that finally hands it to a member answers
//!   after its commit (see `shared::SharedAck`).
//! - a QoS 2 publication of a stored session leaves for other shards only
//!   once its packet id is committed, numbered, and receivers store a mark
//!   per sender with their ops (`send_durable`, `note_origin`; the protocol
//!   is in `exactly_once`).
//!
//! Sessions with Clean Start and expiry 0 (every non-persistent session)
//! never produce an op. QoS 0 deliveries are not stored.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};

use tessera_proto::{Packet, QoS, Str, topic};

use super::{DelayedWill, Engine};
use crate::hash::shard_for;
use crate::mesh::{ForwardMark, MeshMsg, PubId, ShardId};
use crate::message::Message;
use crate::session::{ConnId, Delivery, InboundQos2, Inflight, InflightState, Session, SessionIdx};
use crate::store::{
    Batch, MixHasher, Recovered, STATE_PUBLISHED, STATE_QUEUED, STATE_RELEASED, SessionState,
    StoreOp,
};
use crate::trie::ShardSet;

/// The most ops a new epoch makes room for before it has any
/// (`take_store_batch`).
const OPS_ROOM_MAX: usize = 1024;

/// The store key of one delivery while its op is pending: its session's
/// ClientID by the address and length of the buffer (the pending entry holds
/// a clone, so the buffer cannot be freed and reused meanwhile, and equal
/// address and length mean equal text) and its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MsgKey {
    client_id: usize,
    len: usize,
    seq: u64,
}

impl MsgKey {
    fn new(client_id: &Str, seq: u64) -> MsgKey {
        let bytes = client_id.as_bytes();
        MsgKey {
            client_id: bytes.as_ptr() as usize,
            len: bytes.len(),
            seq,
        }
    }
}

impl Hash for MsgKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.client_id as u64 ^ ((self.len as u64) << 48));
        h.write_u64(self.seq);
    }
}

/// A delivery's latest op in the current epoch (see "Pending deliveries"
/// on [`PersistState::msgs`]).
#[derive(Debug)]
struct PendingMsg {
    /// The session's ClientID.
    client_id: Str,
    /// Numbered in this store generation: nothing of it was ever handed to
    /// the store, so its delete cancels the entry instead of becoming one.
    fresh: bool,
    /// `Some`: put it in (state, packet id, delivery); `None`: delete it.
    put: Option<(u8, u16, Delivery)>,
}

/// The engine's side of the store.
#[derive(Debug)]
pub(super) struct PersistState {
    /// `sync` durability: output waits for commits.
    sync: bool,
    /// Ops of the current epoch, except deliveries' puts and deletes.
    ops: Vec<StoreOp>,
    /// Pending deliveries: each delivery's latest op of the current epoch,
    /// moved into `ops` when the epoch is taken or before a range delete
    /// (`ClearMsgs`, `DelSession`) of any session. A later put of the same
    /// delivery changes the entry's state and packet id in place (a
    /// delivery's content never changes under its sequence number), so a
    /// delivery queued, then sent, then acknowledged within one epoch costs
    /// one copy of it, and, when it was numbered in this generation (`fresh`),
    /// no op at all: the acknowledgement removes the entry. Deliveries' ops
    /// commute with every other op except those range deletes, which is
    /// what makes holding them back and moving them in any order exact. In
    /// `batched` durability the driver takes an epoch once per commit
    /// interval, so this covers a delivery's whole life between two commits.
    msgs: HashMap<MsgKey, PendingMsg, BuildHasherDefault<MixHasher>>,
    /// The store generation: increased each time `msgs` is moved into `ops`
    /// (`Session::fresh_from`).
    generation: u64,
    /// Ops recorded in this epoch, including those cancelled in `msgs`
    /// (whether a step stored, and whether the epoch must be committed
    /// before output that depends on it).
    recorded: usize,
    /// The current epoch (the one `ops` belong to).
    epoch: u64,
    /// Highest epoch committed.
    committed: u64,
    /// Mesh `Ack`s to send once their epoch is committed: (epoch, to, token).
    deferred_acks: VecDeque<(u64, ShardId, u64)>,
    /// Publications with an origin sequence number, sent once the epoch
    /// holding their publisher's packet id is committed: (epoch, to, message).
    deferred_sends: VecDeque<(u64, ShardId, MeshMsg)>,
    /// The next origin sequence number this shard gives out.
    origin_next: u64,
    /// Per sending shard: the highest origin sequence number handled here,
    /// and the highest stored (`StoreOp::PutOrigin`).
    origin_marks: Vec<(u64, u64)>,
    /// Whether a mark is above its stored value.
    origin_marks_dirty: bool,
    /// Per node that forwarded here: the last publication handled, and
    /// whether that is stored (`StoreOp::PutForwardMark`).
    forward_marks: Vec<(ForwardMark, bool)>,
    /// Whether a forward mark is above its stored value.
    forward_marks_dirty: bool,
    /// Ghost records to delete (`StoreOp::DelGhost`): they ride with the next
    /// commit that has ops anyway (`stored_ghost`).
    pub(super) ghost_dels: Vec<Str>,
}

impl PersistState {
    /// Moves the pending deliveries into `ops` and starts a new store
    /// generation: what was moved will reach the store, so a delivery
    /// numbered before is no longer fresh.
    fn flush_msgs(&mut self) {
        self.generation += 1;
        if self.msgs.is_empty() {
            return;
        }
        self.ops.reserve(self.msgs.len());
        for (key, m) in self.msgs.drain() {
            self.ops.push(match m.put {
                Some((state, packet_id, delivery)) => StoreOp::PutMsg {
                    client_id: m.client_id,
                    seq: key.seq,
                    state,
                    packet_id,
                    delivery,
                },
                None => StoreOp::DelMsg {
                    client_id: m.client_id,
                    seq: key.seq,
                },
            });
        }
    }
}

impl Engine {
    /// Turns persistence on (before `restore` and before any connection).
    /// `sync`: acknowledgements wait for commits; otherwise (`batched`) ops
    /// are stored in the background.
    pub fn enable_persistence(&mut self, sync: bool) {
        self.persist = Some(Box::new(PersistState {
            sync,
            ops: Vec::new(),
            msgs: HashMap::default(),
            generation: 1,
            recorded: 0,
            epoch: 1,
            committed: 0,
            deferred_acks: VecDeque::new(),
            deferred_sends: VecDeque::new(),
            origin_next: 1,
            origin_marks: Vec::new(),
            origin_marks_dirty: false,
            forward_marks: Vec::new(),
            forward_marks_dirty: false,
            ghost_dels: Vec::new(),
        }));
    }

    /// Takes the ops produced since the last call as one batch and starts the
    /// next epoch. `None` when there is nothing to store.
    /// The batch can have no ops when the epoch's ops cancelled each other
    /// (a delivery numbered, sent and acknowledged in it): output may wait
    /// for the epoch all the same, so it is reported committed like any.
    pub fn take_store_batch(&mut self) -> Option<Batch> {
        let p = self.persist.as_mut()?;
        p.flush_msgs();
        if p.recorded == 0 && p.ops.is_empty() {
            return None;
        }
        p.recorded = 0;
        // The origin marks ride with ops that are committed anyway: a mark
        // is stored in the commit of what the publications up to it stored
        // here, or a later one, never an earlier one.
        if p.origin_marks_dirty {
            p.origin_marks_dirty = false;
            for (from, (handled, stored)) in p.origin_marks.iter_mut().enumerate() {
                if *handled > *stored {
                    *stored = *handled;
                    p.ops.push(StoreOp::PutOrigin {
                        from: from as ShardId,
                        seq: *handled,
                    });
                }
            }
        }
        // A ghost's delete needs no commit of its own: until it is committed, the
        // record outlives the ghost only as one a restart drops or finds harmless
        // (`stored_ghost`).
        p.ops.extend(
            p.ghost_dels
                .drain(..)
                .map(|client_id| StoreOp::DelGhost { client_id }),
        );
        if p.forward_marks_dirty {
            p.forward_marks_dirty = false;
            for (mark, stored) in p.forward_marks.iter_mut().filter(|(_, s)| !*s) {
                *stored = true;
                p.ops.push(StoreOp::PutForwardMark(*mark));
            }
        }
        // So do the `PubId` marks and the moved sessions' windows (`moved`).
        let mut ops = std::mem::take(&mut p.ops);
        self.moved_store_ops(&mut ops);
        let p = self.persist.as_mut().expect("persistence is on");
        // The next epoch's ops start with room for as many as this one had
        // (up to a bound): growing from empty reallocated and moved every
        // 216-byte op several times per batch.
        let room = ops.len().min(OPS_ROOM_MAX);
        p.ops = Vec::with_capacity(room);
        let batch = Batch {
            epoch: p.epoch,
            ops,
        };
        p.epoch += 1;
        Some(batch)
    }

    /// Ops waiting to be taken (pending deliveries count one each).
    pub fn store_ops_pending(&self) -> usize {
        self.persist
            .as_ref()
            .map_or(0, |p| p.ops.len() + p.msgs.len())
    }

    /// Whether the current epoch recorded anything (it is taken as a batch,
    /// possibly empty, when it did).
    pub fn store_epoch_recorded(&self) -> bool {
        self.persist
            .as_ref()
            .is_some_and(|p| p.recorded > 0 || !p.ops.is_empty())
    }

    /// The highest epoch committed.
    pub fn store_committed_epoch(&self) -> u64 {
        self.persist.as_ref().map_or(u64::MAX, |p| p.committed)
    }

    /// The store committed every epoch up to `epoch`: mesh acknowledgements
    /// that waited for it go out (the driver wakes connection writers).
    pub fn store_committed(&mut self, epoch: u64) {
        let Some(p) = self.persist.as_mut() else {
            return;
        };
        p.committed = p.committed.max(epoch);
        let committed = p.committed;
        while let Some(p) = self.persist.as_mut()
            && let Some(&(e, to, token)) = p.deferred_acks.front()
            && e <= committed
        {
            p.deferred_acks.pop_front();
            self.ack_now(to, token);
        }
        while let Some(p) = self.persist.as_mut()
            && p.deferred_sends
                .front()
                .is_some_and(|(e, _, _)| *e <= committed)
        {
            let (_, to, msg) = p.deferred_sends.pop_front().expect("front exists");
            self.outbox[usize::from(to)].push(msg);
        }
    }

    /// The origin sequence number of a QoS 2 publication of session `idx`
    /// that may go to other shards (or nodes) under `sync` durability, when
    /// the session is stored; 0 otherwise. See `exactly_once`.
    pub(super) fn origin_seq_for(&mut self, idx: SessionIdx) -> u64 {
        let others = self.shard_count > 1 || self.remote.is_some();
        if !others || !self.durable_forwards() || !self.session(idx).stored {
            return 0;
        }
        let p = self
            .persist
            .as_mut()
            .expect("durable forwards need persistence");
        let seq = p.origin_next;
        p.origin_next += 1;
        seq
    }

    /// Sends a `PublishDurable` to `to`: at once, or, carrying an origin
    /// sequence number, once the current epoch (which holds its publisher's
    /// packet id) is committed, so no other shard ever has a publication
    /// whose packet id this shard could lose in a crash.
    pub(super) fn send_durable(
        &mut self,
        to: ShardId,
        message: Message,
        ack: u64,
        seq: u64,
        id: Option<PubId>,
    ) {
        let msg = MeshMsg::PublishDurable {
            message,
            ack,
            seq,
            id,
        };
        self.send_after_id_commit(to, msg, seq != 0);
    }

    /// Sends `msg` to `to`, after the commit of the current epoch when
    /// `after_commit` (it carries a publication whose packet id that epoch
    /// holds), in order with the others waiting.
    pub(super) fn send_after_id_commit(&mut self, to: ShardId, msg: MeshMsg, after_commit: bool) {
        match self.persist.as_mut() {
            Some(p) if after_commit => p.deferred_sends.push_back((p.epoch, to, msg)),
            _ => self.outbox[usize::from(to)].push(msg),
        }
    }

    /// A `PublishDurable` from shard `from` with origin sequence number `seq`
    /// was handled: its mark goes into the next batch with ops.
    pub(super) fn note_origin(&mut self, from: ShardId, seq: u64) {
        let Some(p) = self.persist.as_mut() else {
            return;
        };
        if seq == 0 || usize::from(from) >= self.shard_count {
            return;
        }
        if p.origin_marks.len() < self.shard_count {
            p.origin_marks.resize(self.shard_count, (0, 0));
        }
        let mark = &mut p.origin_marks[usize::from(from)].0;
        if seq > *mark {
            *mark = seq;
            p.origin_marks_dirty = true;
        }
    }

    /// Whether the publication at `mark` was handled here before (a batch
    /// another node retried after this node restarted); if not, notes it:
    /// the mark goes into the next batch with ops, with what it stores.
    /// Without persistence nothing is noted (nothing survives a restart).
    pub(super) fn forward_seen(&mut self, mark: &ForwardMark) -> bool {
        let Some(p) = self.persist.as_mut() else {
            return false;
        };
        match p
            .forward_marks
            .iter_mut()
            .find(|(m, _)| m.node == mark.node)
        {
            Some((m, stored)) => {
                if mark.handled_by(m) {
                    return true;
                }
                *m = *mark;
                *stored = false;
            }
            None => p.forward_marks.push((*mark, false)),
        }
        p.forward_marks_dirty = true;
        false
    }

    /// Output of `conn` waits for the commit of `epoch` (0: nothing).
    pub(super) fn hold_output_for_epoch(&mut self, conn: ConnId, epoch: u64) {
        let sync = self
            .persist
            .as_ref()
            .is_some_and(|p| p.sync && p.committed < epoch);
        if sync && let Some(c) = self.slot_mut(conn) {
            c.out.durable_epoch = c.out.durable_epoch.max(epoch);
        }
    }

    /// The current epoch when it has ops (what output written now waits for
    /// under `sync`), else 0.
    pub(super) fn current_durable_epoch(&self) -> u64 {
        self.durable_epoch().unwrap_or(0)
    }

    /// Answers `Ack { token }` to shard `to`. A shared delivery can end on
    /// the publisher's own shard after passing through others; that shard
    /// answers itself without the mesh.
    pub(super) fn ack_now(&mut self, to: ShardId, token: u64) {
        if to == self.shard && self.pending_forwards.contains_key(&token) {
            self.on_forward_ack(token);
        } else if to == self.shard {
            self.on_retain_ack(token);
        } else {
            self.outbox[usize::from(to)].push(MeshMsg::Ack { token });
        }
    }

    /// Whether publications forwarded to other shards must be acknowledged
    /// after their commit there.
    pub(super) fn durable_forwards(&self) -> bool {
        self.persist.as_ref().is_some_and(|p| p.sync)
    }

    /// The epoch output must wait for when it depends on what was just
    /// stored: the current one, in sync mode, when it has ops.
    fn durable_epoch(&self) -> Option<u64> {
        let p = self.persist.as_ref()?;
        (p.sync && p.recorded > 0).then_some(p.epoch)
    }

    /// Ops recorded so far in this epoch (to tell whether a step stored).
    pub(super) fn store_mark(&self) -> usize {
        self.persist.as_ref().map_or(0, |p| p.recorded)
    }

    /// Output of `conn` written from now on waits for the current epoch.
    pub(super) fn hold_output_for_commit(&mut self, conn: ConnId) {
        if let Some(e) = self.durable_epoch()
            && let Some(c) = self.slot_mut(conn)
        {
            c.out.durable_epoch = c.out.durable_epoch.max(e);
        }
    }

    /// Called for every packet written: a stored session's output waits for
    /// the epoch holding the state it reflects. QoS 0 and QoS 1 PUBLISH do
    /// not wait: re-sent after a crash with another packet id, they are
    /// still delivered at least once, which is all they promise. Everything
    /// else does: QoS 2 PUBLISH and PUBREL (their packet id and state must
    /// survive, or the client would take a re-send for a new message),
    /// PUBCOMP (a released inbound id must not come back), CONNACK, SUBACK
    /// and UNSUBACK (the session as the client was told it is).
    pub(super) fn hold_if_stored(&mut self, conn: ConnId, packet: &Packet) {
        if self.durable_epoch().is_none() {
            return;
        }
        if let Packet::Publish(p) = packet
            && p.qos != QoS::ExactlyOnce
        {
            return;
        }
        let Some(c) = self.slot(conn) else {
            return;
        };
        let idx = c.session;
        if idx != SessionIdx::MAX
            && self.sessions[idx as usize]
                .as_ref()
                .is_some_and(|s| s.stored)
        {
            self.hold_output_for_commit(conn);
        }
    }

    /// Sends `Ack { token }` to `to` once what this shard stored so far is
    /// committed (at once when nothing waits).
    pub(super) fn ack_after_commit(&mut self, to: ShardId, token: u64) {
        self.ack_after_epoch(to, token, 0);
    }

    /// `ack_after_commit`, waiting for the commit of `epoch` too (what an
    /// earlier step stored for the acknowledged publication; 0: nothing).
    pub(super) fn ack_after_epoch(&mut self, to: ShardId, token: u64, epoch: u64) {
        let e = self.durable_epoch().unwrap_or(0).max(epoch);
        match self.persist.as_mut() {
            // Behind a later epoch it waits a little longer, never less.
            Some(p) if p.sync && e > p.committed => p.deferred_acks.push_back((e, to, token)),
            _ => self.ack_now(to, token),
        }
    }

    /// Appends `op` to the current epoch. A delivery's put or delete goes
    /// through `store_msg` instead; one that comes here (and every range
    /// delete) first moves the pending deliveries into the ops, so the ops
    /// stay in the order they were made.
    pub(super) fn store_op(&mut self, op: StoreOp) {
        if let Some(p) = self.persist.as_mut() {
            if matches!(
                op,
                StoreOp::ClearMsgs { .. }
                    | StoreOp::DelSession { .. }
                    | StoreOp::PutMsg { .. }
                    | StoreOp::DelMsg { .. }
            ) {
                p.flush_msgs();
            }
            p.recorded += 1;
            p.ops.push(op);
        }
    }

    /// Records a put (`Some((state, packet id, delivery))`) or the delete
    /// (`None`) of delivery `seq` of stored session `idx` as the delivery's
    /// pending op (see [`PersistState::msgs`]).
    fn store_msg(&mut self, idx: SessionIdx, seq: u64, put: Option<(u8, u16, &Delivery)>) {
        let Some(p) = self.persist.as_deref_mut() else {
            return;
        };
        let s = self.sessions[idx as usize]
            .as_ref()
            .expect("a stored delivery's session exists");
        p.recorded += 1;
        match p.msgs.entry(MsgKey::new(&s.client_id, seq)) {
            Entry::Occupied(mut e) => {
                let m = e.get_mut();
                match put {
                    Some((state, packet_id, d)) => match &mut m.put {
                        Some(pending) => {
                            pending.0 = state;
                            pending.1 = packet_id;
                        }
                        None => m.put = Some((state, packet_id, d.clone())),
                    },
                    None if m.fresh => drop(e.remove()),
                    None => m.put = None,
                }
            }
            Entry::Vacant(e) => {
                let fresh = s.fresh_from.0 == p.generation && seq >= s.fresh_from.1;
                // A fresh delivery deleted before any put never reached the
                // store: nothing to do.
                if put.is_some() || !fresh {
                    e.insert(PendingMsg {
                        client_id: s.client_id.clone(),
                        fresh,
                        put: put.map(|(state, packet_id, d)| (state, packet_id, d.clone())),
                    });
                }
            }
        }
    }

    /// Writes the session record of `idx` when it persists, or deletes the
    /// record of a stored session that no longer persists.
    pub(super) fn persist_session(&mut self, idx: SessionIdx) {
        if self.persist.is_none() {
            return;
        }
        let s = self.session(idx);
        if s.is_persistent() {
            let state = session_state(s);
            self.session_mut(idx).stored = true;
            self.store_op(StoreOp::PutSession(Box::new(state)));
        } else if s.stored {
            let client_id = s.client_id.clone();
            self.session_mut(idx).stored = false;
            self.store_op(StoreOp::DelSession { client_id });
        }
    }

    /// The session was destroyed: delete its record.
    pub(super) fn persist_session_destroyed(&mut self, s: &Session) {
        if s.stored {
            self.store_op(StoreOp::DelSession {
                client_id: s.client_id.clone(),
            });
        }
    }

    /// Gives a QoS 1/2 delivery to a stored session its sequence number.
    pub(super) fn persist_assign_seq(&mut self, idx: SessionIdx, d: &mut Delivery) {
        if d.qos == QoS::AtMostOnce || d.seq != 0 {
            return;
        }
        let Some(generation) = self.persist.as_ref().map(|p| p.generation) else {
            return;
        };
        let s = self.session_mut(idx);
        if s.stored {
            if s.fresh_from.0 != generation {
                s.fresh_from = (generation, s.next_seq);
            }
            d.seq = s.next_seq;
            s.next_seq += 1;
        }
    }

    /// Stores a delivery of session `idx` in `state`.
    pub(super) fn persist_delivery(
        &mut self,
        idx: SessionIdx,
        d: &Delivery,
        state: u8,
        packet_id: u16,
    ) {
        if d.seq == 0 || self.persist.is_none() {
            return;
        }
        if self.session(idx).stored {
            self.store_msg(idx, d.seq, Some((state, packet_id, d)));
        }
    }

    /// Stores a queued delivery.
    pub(super) fn persist_queued(&mut self, idx: SessionIdx, d: &Delivery) {
        self.persist_delivery(idx, d, STATE_QUEUED, 0);
    }

    /// Stores a delivery sent with `packet_id`.
    pub(super) fn persist_published(&mut self, idx: SessionIdx, d: &Delivery, packet_id: u16) {
        self.persist_delivery(idx, d, STATE_PUBLISHED, packet_id);
    }

    /// Stores a QoS 2 delivery released with PUBREL.
    pub(super) fn persist_released(&mut self, idx: SessionIdx, d: &Delivery, packet_id: u16) {
        self.persist_delivery(idx, d, STATE_RELEASED, packet_id);
    }

    /// A delivery left its session (acknowledged, dropped or expired).
    pub(super) fn persist_delivery_gone(&mut self, idx: SessionIdx, seq: u64) {
        if seq == 0 || self.persist.is_none() {
            return;
        }
        if self.session(idx).stored {
            self.store_msg(idx, seq, None);
        }
    }

    /// Rewrites every delivery of a stored session held in memory (after
    /// shared deliveries went back to their groups, which removes some from
    /// the middle). The disk tail stays as it is.
    pub(super) fn persist_rewrite_deliveries(&mut self, idx: SessionIdx) {
        if self.persist.is_none() || !self.session(idx).stored {
            return;
        }
        let s = self.session(idx);
        let client_id = s.client_id.clone();
        let below_seq = if s.queue.disk_len() > 0 {
            s.queue.disk_from_seq()
        } else {
            u64::MAX
        };
        let mut ops = vec![StoreOp::ClearMsgs {
            client_id: client_id.clone(),
            below_seq,
        }];
        for i in s.inflight() {
            if i.delivery.seq != 0 {
                let state = match i.state {
                    InflightState::Published => STATE_PUBLISHED,
                    InflightState::Released => STATE_RELEASED,
                };
                ops.push(StoreOp::PutMsg {
                    client_id: client_id.clone(),
                    seq: i.delivery.seq,
                    state,
                    packet_id: i.packet_id,
                    delivery: i.delivery.clone(),
                });
            }
        }
        for d in s.queue.iter().filter(|d| d.seq != 0) {
            ops.push(StoreOp::PutMsg {
                client_id: client_id.clone(),
                seq: d.seq,
                state: STATE_QUEUED,
                packet_id: 0,
                delivery: d.clone(),
            });
        }
        for op in ops {
            self.store_op(op);
        }
    }

    /// An inbound QoS 2 packet id of session `idx` awaits PUBREL
    /// (`awaiting`: its origin sequence number, and for a re-delivery the
    /// shards it was for; see `StoreOp::PutInbound`; `id`: the publication's
    /// cluster-wide id) or was released (`None`). Returns where the op is in
    /// the current epoch's batch, for [`Engine::persist_inbound_id`].
    pub(super) fn persist_inbound(
        &mut self,
        idx: SessionIdx,
        packet_id: u16,
        awaiting: Option<(u64, Option<ShardSet>)>,
        id: Option<PubId>,
    ) -> Option<usize> {
        if self.persist.is_none() || !self.session(idx).stored {
            return None;
        }
        let client_id = self.session(idx).client_id.clone();
        self.store_op(match awaiting {
            Some((seq, redeliver)) => StoreOp::PutInbound {
                client_id,
                packet_id,
                seq,
                redeliver,
                id: id.map(super::moved::original),
            },
            None => StoreOp::DelInbound {
                client_id,
                packet_id,
            },
        });
        self.persist.as_ref().map(|p| p.ops.len() - 1)
    }

    /// The publication whose packet id op `op` (of the current epoch, from
    /// [`Engine::persist_inbound`]) stores got cluster-wide id `id` when it was
    /// routed: stored with it, in the same commit.
    pub(super) fn persist_inbound_id(&mut self, op: usize, id: PubId) {
        if let Some(StoreOp::PutInbound { id: slot, .. }) =
            self.persist.as_mut().and_then(|p| p.ops.get_mut(op))
        {
            *slot = Some(super::moved::original(id));
        }
    }

    /// The retained message of `topic` changed on this shard's replica; the
    /// shard owning the topic stores it.
    pub(super) fn persist_retained(&mut self, topic: &tessera_proto::Str) {
        // `$SYS/` topics are regenerated by the running broker, not stored.
        if self.persist.is_none()
            || topic.starts_with("$SYS/")
            || shard_for(topic.as_bytes(), self.shard_count) != usize::from(self.shard)
        {
            return;
        }
        let op = match self.retained.get(topic, ()).and_then(|e| e.message.clone()) {
            Some(m) => StoreOp::PutRetained(m),
            None => StoreOp::DelRetained(topic.clone()),
        };
        self.store_op(op);
    }

    /// A delayed will of session `idx` was set (`Some`) or removed.
    pub(super) fn persist_delayed_will(&mut self, idx: SessionIdx, set: Option<&DelayedWill>) {
        if self.persist.is_none() || !self.session(idx).stored {
            return;
        }
        let client_id = self.session(idx).client_id.clone();
        self.store_op(match set {
            Some(d) => StoreOp::PutWill {
                client_id,
                due_ms: d.due_ms,
                will: Box::new(d.will.clone()),
            },
            None => StoreOp::DelWill { client_id },
        });
    }

    /// Whether delayed wills stay stored across a shutdown (they are published
    /// after the restart when due) rather than being published at shutdown.
    pub(super) fn wills_survive_shutdown(&self) -> bool {
        self.persist.is_some()
    }

    /// Restores what the store held, before any connection: sessions with
    /// their subscriptions, queues, in-flight deliveries, inbound QoS 2 ids and
    /// delayed wills; every retained message; the other shards' routes.
    /// Sessions that had a connection when the broker stopped lost it now: the
    /// will of such a connection is published (or delayed) as for any
    /// connection that ends without DISCONNECT, and its session expiry counts
    /// from now.
    pub fn restore(&mut self, now_ms: u64, mut r: Recovered) {
        assert!(self.persist.is_some(), "restore needs persistence on");
        assert!(
            self.by_client_id.is_empty(),
            "restore runs before any session"
        );
        if let Some(p) = self.persist.as_mut() {
            p.origin_next = p.origin_next.max(r.origin_seq_floor);
            p.forward_marks = r.forward_marks.iter().map(|m| (*m, true)).collect();
        }
        let ghosts = std::mem::take(&mut r.ghosts);
        for id in std::mem::take(&mut r.resent_handled) {
            self.note_resent_handled(id);
        }
        // Shared groups with members on other shards are routable at once, as
        // offline members; each shard announces its real counts once it runs.
        let mut shared_members: Vec<(&str, ShardId)> = Vec::new();
        for (filter, shard) in &r.routes {
            assert_ne!(usize::from(*shard), usize::from(self.shard));
            if topic::is_shared(filter) {
                shared_members.push((filter.as_str(), *shard));
            } else {
                self.routes.insert(filter, *shard, ());
            }
        }
        shared_members.sort_unstable();
        for run in shared_members.chunk_by(|a, b| a == b) {
            let (filter, shard) = run[0];
            self.shared_restore_remote(filter, shard, run.len() as u32);
        }
        for m in r.retained {
            // The retained trie holds topic names only; a stored record that is
            // not one (a corrupt or foreign store) is skipped, not a panic.
            if topic::validate_topic_name(&m.topic, topic::TOPIC_LEVELS_MAX).is_err() {
                tracing::warn!(shard = self.shard, topic = %m.topic, "restore: stored retained message with an invalid topic skipped");
                continue;
            }
            let topic = m.topic.clone();
            // Stamp (0, 0): any update made after the restart wins.
            self.apply_retain(now_ms, topic, Some(m), (0, 0));
        }
        let mut wills_now = Vec::new();
        for mut rs in r.sessions {
            assert_eq!(
                shard_for(rs.client_id.as_bytes(), self.shard_count),
                usize::from(self.shard),
                "recovery gives each shard its own sessions"
            );
            let was_connected = rs.disconnected_at_ms.is_none();
            let will = rs.will.take();
            let idx = self.restore_one(now_ms, rs, true);
            self.session_mut(idx).restored = true;
            if was_connected {
                if let Some(w) = will {
                    let uid = self.session(idx).uid;
                    wills_now.push((idx, w, uid));
                }
                // Record the disconnect time and that the will is gone.
                self.persist_session(idx);
            }
        }
        // The `PubId` marks of earlier lives, and the windows of sessions that
        // moved here shortly before the stop.
        self.restore_moved(now_ms, r.pub_marks, r.windows, r.resent_pending);
        // What their windows held, into their queues.
        self.restore_held(now_ms, std::mem::take(&mut r.held));
        // Wills of connections the stop ended, as `end_conn` would.
        for (idx, w, origin) in wills_now {
            let expiry_s = self.session(idx).expiry_interval_s;
            let delay_s = w.properties.will_delay_interval.unwrap_or(0).min(expiry_s);
            if delay_s > 0 {
                let d = DelayedWill {
                    due_ms: now_ms + u64::from(delay_s) * 1000,
                    will: w,
                    origin,
                };
                self.persist_delayed_will(idx, Some(&d));
                self.delay_will(idx, d);
            } else {
                self.publish_will(now_ms, w, origin);
            }
        }
        // After the sessions: a ghost of a ClientID with a session here is stale.
        self.restore_ghosts(now_ms, ghosts);
        // What confirmed ghosts sent on and their new nodes had not accepted.
        self.restore_redirects(std::mem::take(&mut r.redirects));
    }

    /// Creates session `rs` on this shard as stored (`stored`: its deliveries are in
    /// this shard's store, so a queue beyond the head stays on disk) or as moved here
    /// from another node (`!stored`: everything in memory; the caller stores it).
    /// Its will (of a connection that ended elsewhere) is the caller's.
    pub(super) fn restore_one(
        &mut self,
        now_ms: u64,
        rs: crate::store::RecoveredSession,
        stored: bool,
    ) -> SessionIdx {
        let head_max = self.limits.queue_head_count_max;
        let idx = self.new_session_for(rs.client_id.clone(), rs.version);
        let uid = self.session(idx).uid;
        let expiry_s_max = self.limits.session_expiry_s_max;
        {
            let s = self.session_mut(idx);
            // A lowered `session_expiry_s_max` applies to stored sessions too.
            s.expiry_interval_s = rs.expiry_interval_s.min(expiry_s_max);
            s.disconnected_at_ms = Some(rs.disconnected_at_ms.unwrap_or(now_ms));
            s.stored = stored;
            s.inbound_qos2 = rs
                .inbound_qos2
                .into_iter()
                .map(|(packet_id, redeliver, id)| InboundQos2::restored(packet_id, redeliver, id))
                .collect();
            let mut max_seq = 0;
            for (state, packet_id, d) in rs.deliveries {
                max_seq = max_seq.max(d.seq);
                match state {
                    // The head in memory, the rest stays on disk.
                    STATE_QUEUED
                        if !stored
                            || (s.queue.disk_len() == 0 && s.queue.head_len() < head_max) =>
                    {
                        s.queue.push_back(d)
                    }
                    STATE_QUEUED => s.queue.push_disk(&d),
                    STATE_RELEASED => s.push_inflight(Inflight {
                        packet_id,
                        delivery: d,
                        state: InflightState::Released,
                    }),
                    _ => s.push_inflight(Inflight {
                        packet_id,
                        delivery: d,
                        state: InflightState::Published,
                    }),
                }
            }
            s.next_seq = max_seq + 1;
            let (head, disk) = (s.queue.head_bytes(), s.queue.disk_bytes());
            self.queue_mem_bytes += head;
            self.queue_disk_bytes += disk;
        }
        for (filter, entry) in rs.subscriptions {
            self.attach_subscription(idx, filter, entry, stored);
        }
        self.arm_session_expiry(idx);
        if let Some((due_ms, will)) = rs.delayed_will {
            self.delay_will(
                idx,
                DelayedWill {
                    due_ms,
                    will,
                    origin: uid,
                },
            );
        }
        idx
    }

    /// Gives session `idx` a subscription it brings along (restored at start-up when
    /// `at_boot`, or moved here at runtime).
    pub(super) fn attach_subscription(
        &mut self,
        idx: SessionIdx,
        filter: tessera_proto::Str,
        entry: crate::session::SubscriptionEntry,
        at_boot: bool,
    ) {
        // It existed before (in this node's earlier life, or on another node): it gets
        // what other nodes matched against this node's earlier routes too.
        let entry = crate::session::SubscriptionEntry {
            fresh: false,
            ..entry
        };
        self.session_mut(idx)
            .subscriptions
            .insert(filter.clone(), entry);
        if topic::is_shared(&filter) {
            let token = self.next_token;
            self.next_token += 1;
            self.shared_subscribe(idx, &filter, entry, token);
        } else if at_boot {
            // At start-up the other shards restore this shard's routes themselves.
            self.subscriptions.insert(&filter, idx, entry);
            self.routes.insert(&filter, self.shard, ());
        } else {
            // Moved here at runtime: a first subscriber announces the route to the
            // other shards and the cluster, as a SUBSCRIBE would.
            let first = self.subscriptions.filter_len(&filter) == 0;
            self.subscriptions.insert(&filter, idx, entry);
            if first {
                self.route_add(filter, None);
            }
        }
    }
}

/// The stored form of a session's state.
pub(super) fn session_state(s: &Session) -> SessionState {
    SessionState {
        client_id: s.client_id.clone(),
        version: s.version,
        expiry_interval_s: s.expiry_interval_s,
        disconnected_at_ms: if s.conn.is_some() {
            None
        } else {
            s.disconnected_at_ms
        },
        subscriptions: s
            .subscriptions
            .iter()
            .map(|(f, e)| (f.clone(), *e))
            .collect(),
        will: s.will.as_deref().cloned(),
    }
}

#[cfg(test)]
mod tests {
    //! Goal: a delivery's puts and deletes between two takes of the store
    //! batch leave one op per delivery (none for one numbered, sent and
    //! acknowledged in between), with the same result on disk as every op
    //! applied in order, and output that waited for such an epoch still
    //! waits for its commit in `sync` durability. Method: one engine, a
    //! persistent 3.1.1 subscriber and a publisher driven packet by packet,
    //! assertions on the ops of each batch.

    use bytes::Bytes;
    use tessera_proto::{Packet, ProtocolVersion, PubAck, PubRec, Publish, QoS, Str};

    use crate::engine::testing::{connect_packet, drain, subscribe_packet};
    use crate::engine::{Engine, Limits};
    use crate::session::ConnId;
    use crate::store::{Batch, STATE_PUBLISHED, STATE_QUEUED, STATE_RELEASED, StoreOp};

    const V4: ProtocolVersion = ProtocolVersion::V3_1_1;

    /// An engine with persistence (`sync` or `batched`), a persistent
    /// subscriber to "t" at `qos` and a publisher; the setup's batches taken.
    fn setup(sync: bool, qos: QoS) -> (Engine, ConnId, ConnId) {
        let mut e = Engine::new(0, 1, Limits::default());
        e.enable_persistence(sync);
        let sub = e.connect(1, connect_packet(V4, "sub", false), false);
        e.handle_packet(1, sub, subscribe_packet("t", qos));
        let publ = e.connect(1, connect_packet(V4, "pub", true), false);
        while let Some(b) = e.take_store_batch() {
            e.store_committed(b.epoch);
        }
        drain(&mut e, sub, V4);
        (e, sub, publ)
    }

    fn publish(e: &mut Engine, publ: ConnId, n: u16, qos: QoS) {
        let mut p = Publish::new(Str::from_static("t"), Bytes::from(format!("m{n}")));
        p.qos = qos;
        p.packet_id = n;
        e.handle_packet(2, publ, Packet::Publish(p));
    }

    /// The packet ids of the PUBLISHes `sub` was sent.
    fn sent_ids(e: &mut Engine, sub: ConnId) -> Vec<u16> {
        drain(e, sub, V4)
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p.packet_id),
                _ => None,
            })
            .collect()
    }

    /// The delivery ops of a batch: (seq, `Some(state, packet id)` for a
    /// put, `None` for a delete).
    fn delivery_ops(b: &Batch) -> Vec<(u64, Option<(u8, u16)>)> {
        let mut ops: Vec<_> = b
            .ops
            .iter()
            .filter_map(|op| match op {
                StoreOp::PutMsg {
                    seq,
                    state,
                    packet_id,
                    ..
                } => Some((*seq, Some((*state, *packet_id)))),
                StoreOp::DelMsg { seq, .. } => Some((*seq, None)),
                _ => None,
            })
            .collect();
        ops.sort_unstable();
        ops
    }

    #[test]
    fn a_delivery_numbered_sent_and_acknowledged_in_one_epoch_stores_nothing() {
        for sync in [false, true] {
            let (mut e, sub, publ) = setup(sync, QoS::AtLeastOnce);
            for n in 1..=3 {
                publish(&mut e, publ, n, QoS::AtLeastOnce);
            }
            let ids = sent_ids(&mut e, sub);
            assert_eq!(ids.len(), 3);
            for id in ids {
                e.handle_packet(3, sub, Packet::PubAck(PubAck::new(id)));
            }
            assert_eq!(e.store_ops_pending(), 0, "cancelled, sync={sync}");
            // The epoch recorded ops, so it is still a batch: in `sync` the
            // publisher's PUBACKs wait for it.
            let b = e.take_store_batch().expect("an epoch that recorded ops");
            assert_eq!(delivery_ops(&b), [], "sync={sync}");
            let held = e.output(publ).expect("publisher").durable_epoch;
            assert_eq!(held, if sync { b.epoch } else { 0 }, "sync={sync}");
            e.store_committed(b.epoch);
            assert!(e.take_store_batch().is_none());
        }
    }

    #[test]
    fn an_acknowledgement_after_the_take_deletes_the_stored_delivery() {
        let (mut e, sub, publ) = setup(false, QoS::AtLeastOnce);
        publish(&mut e, publ, 1, QoS::AtLeastOnce);
        let ids = sent_ids(&mut e, sub);
        let b = e.take_store_batch().expect("the put");
        assert_eq!(delivery_ops(&b), [(1, Some((STATE_PUBLISHED, ids[0])))]);
        e.store_committed(b.epoch);
        e.handle_packet(3, sub, Packet::PubAck(PubAck::new(ids[0])));
        let b = e.take_store_batch().expect("the delete");
        assert_eq!(delivery_ops(&b), [(1, None)]);
    }

    #[test]
    fn a_queued_delivery_sent_in_the_same_epoch_is_one_put_in_its_last_state() {
        let (mut e, sub, publ) = setup(false, QoS::ExactlyOnce);
        e.connection_lost(2, sub);
        e.release(2, sub);
        for n in 1..=2 {
            publish(&mut e, publ, n, QoS::AtLeastOnce);
        }
        let b = e.take_store_batch().expect("queued");
        assert_eq!(
            delivery_ops(&b),
            [(1, Some((STATE_QUEUED, 0))), (2, Some((STATE_QUEUED, 0)))]
        );
        e.store_committed(b.epoch);
        // Queued, then in the same epoch sent (and, for a QoS 2 one,
        // released): one put each, in its last state.
        publish(&mut e, publ, 3, QoS::ExactlyOnce);
        let sub = e.connect(4, connect_packet(V4, "sub", false), false);
        let ids = sent_ids(&mut e, sub);
        assert_eq!(ids.len(), 3);
        e.handle_packet(5, sub, Packet::PubRec(PubRec::new(ids[2])));
        let b = e.take_store_batch().expect("sent");
        assert_eq!(
            delivery_ops(&b),
            [
                (1, Some((STATE_PUBLISHED, ids[0]))),
                (2, Some((STATE_PUBLISHED, ids[1]))),
                (3, Some((STATE_RELEASED, ids[2]))),
            ]
        );
    }
}
