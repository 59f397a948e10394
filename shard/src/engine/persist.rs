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

use std::collections::VecDeque;

use tessera_proto::{Packet, QoS, topic};

use super::{DelayedWill, Engine};
use crate::hash::shard_for;
use crate::mesh::{ForwardMark, MeshMsg, ShardId};
use crate::message::Message;
use crate::session::{ConnId, Delivery, InboundQos2, Inflight, InflightState, Session, SessionIdx};
use crate::store::{
    Batch, Recovered, STATE_PUBLISHED, STATE_QUEUED, STATE_RELEASED, SessionState, StoreOp,
};
use crate::trie::ShardSet;

/// The most ops a new epoch makes room for before it has any
/// (`take_store_batch`).
const OPS_ROOM_MAX: usize = 1024;

/// The engine's side of the store.
#[derive(Debug)]
pub(super) struct PersistState {
    /// `sync` durability: output waits for commits.
    sync: bool,
    /// Ops of the current epoch.
    ops: Vec<StoreOp>,
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
}

impl Engine {
    /// Turns persistence on (before `restore` and before any connection).
    /// `sync`: acknowledgements wait for commits; otherwise (`batched`) ops
    /// are stored in the background.
    pub fn enable_persistence(&mut self, sync: bool) {
        self.persist = Some(Box::new(PersistState {
            sync,
            ops: Vec::new(),
            epoch: 1,
            committed: 0,
            deferred_acks: VecDeque::new(),
            deferred_sends: VecDeque::new(),
            origin_next: 1,
            origin_marks: Vec::new(),
            origin_marks_dirty: false,
            forward_marks: Vec::new(),
            forward_marks_dirty: false,
        }));
    }

    /// Takes the ops produced since the last call as one batch and starts the
    /// next epoch. `None` when there is nothing to store.
    pub fn take_store_batch(&mut self) -> Option<Batch> {
        let p = self.persist.as_mut()?;
        if p.ops.is_empty() {
            return None;
        }
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
        if p.forward_marks_dirty {
            p.forward_marks_dirty = false;
            for (mark, stored) in p.forward_marks.iter_mut().filter(|(_, s)| !*s) {
                *stored = true;
                p.ops.push(StoreOp::PutForwardMark(*mark));
            }
        }
        // The next epoch's ops start with room for as many as this one had
        // (up to a bound): growing from empty reallocated and moved every
        // 216-byte op several times per batch.
        let room = p.ops.len().min(OPS_ROOM_MAX);
        let batch = Batch {
            epoch: p.epoch,
            ops: std::mem::replace(&mut p.ops, Vec::with_capacity(room)),
        };
        p.epoch += 1;
        Some(batch)
    }

    /// Ops waiting to be taken.
    pub fn store_ops_pending(&self) -> usize {
        self.persist.as_ref().map_or(0, |p| p.ops.len())
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
    pub(super) fn send_durable(&mut self, to: ShardId, message: Message, ack: u64, seq: u64) {
        let msg = MeshMsg::PublishDurable { message, ack, seq };
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
        (p.sync && !p.ops.is_empty()).then_some(p.epoch)
    }

    /// Ops produced so far in this epoch (to tell whether a step stored).
    pub(super) fn store_mark(&self) -> usize {
        self.persist.as_ref().map_or(0, |p| p.ops.len())
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

    pub(super) fn store_op(&mut self, op: StoreOp) {
        if let Some(p) = self.persist.as_mut() {
            p.ops.push(op);
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
        let s = self.session_mut(idx);
        if s.stored {
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
        let s = self.session(idx);
        if !s.stored {
            return;
        }
        let client_id = s.client_id.clone();
        self.store_op(StoreOp::PutMsg {
            client_id,
            seq: d.seq,
            state,
            packet_id,
            delivery: d.clone(),
        });
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
        let s = self.session(idx);
        if s.stored {
            let client_id = s.client_id.clone();
            self.store_op(StoreOp::DelMsg { client_id, seq });
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
    /// shards it was for; see `StoreOp::PutInbound`) or was released
    /// (`None`).
    pub(super) fn persist_inbound(
        &mut self,
        idx: SessionIdx,
        packet_id: u16,
        awaiting: Option<(u64, Option<ShardSet>)>,
    ) {
        if self.persist.is_none() || !self.session(idx).stored {
            return;
        }
        let client_id = self.session(idx).client_id.clone();
        self.store_op(match awaiting {
            Some((seq, redeliver)) => StoreOp::PutInbound {
                client_id,
                packet_id,
                seq,
                redeliver,
            },
            None => StoreOp::DelInbound {
                client_id,
                packet_id,
            },
        });
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
    pub fn restore(&mut self, now_ms: u64, r: Recovered) {
        assert!(self.persist.is_some(), "restore needs persistence on");
        assert!(
            self.by_client_id.is_empty(),
            "restore runs before any session"
        );
        if let Some(p) = self.persist.as_mut() {
            p.origin_next = p.origin_next.max(r.origin_seq_floor);
            p.forward_marks = r.forward_marks.iter().map(|m| (*m, true)).collect();
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
            if was_connected {
                if let Some(w) = will {
                    let uid = self.session(idx).uid;
                    wills_now.push((idx, w, uid));
                }
                // Record the disconnect time and that the will is gone.
                self.persist_session(idx);
            }
        }
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
                .map(|(packet_id, redeliver)| InboundQos2::restored(packet_id, redeliver))
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
