//! Sessions moving between nodes (`impl Engine`, issue 15): the runtime counterpart of
//! `restore`. When another node's claim on a ClientID commits, the old owner's shard
//! ends the live connection ([`Engine::session_taken_over`], v5 DISCONNECT 0x8E, the
//! will as for a local takeover), then hands the whole session out
//! ([`Engine::export_session`]) or drops it when the new connection starts clean
//! ([`Engine::drop_session`]); the new owner's shard takes it in
//! ([`Engine::import_session`]) before its CONNECT is accepted, so the CONNACK says
//! session present and in-flight deliveries resume with their packet ids.
//!
//! **Two phases.** The old owner does not delete what it handed out: the session
//! leaves its memory and its routes, but its store records stay, and the export is kept
//! as a *moving copy* ([`Moving`]) until the new owner confirms that it stored the
//! session ([`Engine::moving_done`]). If the new owner dies first, the copy is still
//! here: a later claimant gets it ([`Engine::moving_handout`]), or this node takes it
//! back itself ([`Engine::resume_moving`]). A copy nobody confirms is dropped when the
//! session would have expired ([`Engine::expire_moving`]), and any new session for its
//! ClientID on this shard supersedes it.
//!
//! **The disk tail moves too, in chunks.** The export carries the in-memory part (in
//! flight, the queue head) and says how much of the queue is on disk; the new owner
//! reads that tail from the old owner's store in bounded chunks
//! ([`Engine::read_moving_tail`], [`Engine::encode_tail`]) and appends each one
//! ([`Engine::import_tail`]), spilling to its own disk tail as the head fills. The
//! session's subscriptions are attached only when the tail is complete
//! ([`Engine::import_finish`]), so no new message can get ahead of the old ones.
//! Sequence numbers travel with the deliveries, so a session keeps one sequence space
//! wherever it moves.
//!
//! The wire format is the store's ([`TransferRec`], [`TransferTailRec`]: versioned rkyv
//! records, checked on decode); bytes from another node are decoded and validated like
//! a corrupt store's, never trusted. Times travel as wall-clock milliseconds.
//!
//! Not moved: shared-subscription deliveries a group handed back when the member went
//! offline.

use tessera_proto::{Disconnect, Packet, ReasonCode, Str, topic};

use super::{CloseReason, Engine};
use crate::session::{Delivery, InflightState, SessionIdx, SubscriptionEntry};
use crate::store::record::{
    self, DelayedWillRec, STATE_PUBLISHED, STATE_QUEUED, STATE_RELEASED, TransferRec,
    TransferTailRec,
};
use crate::store::recover::recovered_session;
use crate::store::{Loaded, StoreOp};
use crate::trie::ShardSet;

/// Tag on `StoreOp::LoadQueue::session` of a read of a moving session's disk tail: the
/// driver hands such a load to the request that asked for it (the rest of the value is
/// its token), not to a session.
pub const TAIL_READ_TAG: u64 = 1 << 63;

/// A session handed out to another node, kept until that node confirms it stored it.
#[derive(Debug)]
pub(super) struct Moving {
    /// Who it was handed to: (node, claim epoch), opaque to the engine.
    to: (u64, u64),
    /// The export, handed out again if a later claimant asks for it.
    bytes: Vec<u8>,
    /// When it is dropped unconfirmed (the session's expiry), engine ms.
    expires_at_ms: Option<u64>,
    /// Its records are in this shard's store.
    stored: bool,
    /// What the new owner needs to tell copies the session already got
    /// (`moved`), sent beside the export.
    window: Vec<u8>,
    /// Inbound QoS 2 ids it carried in still waiting for an older owner's word
    /// (`handed_qos2`).
    relayed: Vec<super::handed_qos2::Relayed>,
    /// Inbound QoS 2 ids restored after a crash with the shards (and the remote
    /// id: other nodes) that may lack their publication, for a take-back
    /// (`handed_qos2::take_back_inbound`): (packet id, set, original's id).
    redeliver: Vec<super::handed_qos2::Redeliver>,
    /// The sequence number of the next copy its unconfirmed ghost holds and
    /// stores as a queued delivery of these records (`moved`, sim seed 748):
    /// after the export's.
    next_seq: u64,
    /// The export's next sequence number: its disk tail is below it, and what the
    /// ghost stored since is at or above it ([`Engine::cut_moving_tail`]).
    tail_end: u64,
    /// The session was restored at this start (`Session::restored`), and is again
    /// when taken back.
    restored: bool,
    /// The session had moved in from another node (`Session::moved_in`), and has
    /// again when taken back.
    moved_in: bool,
    /// It went out in a `FETCH` answer to the claimant it is kept for (not only
    /// parked when that claim was applied): if the log then says that claim
    /// started the session afresh, that node took it in without the confirmation
    /// and continued it, rather than starting anew without it
    /// ([`Engine::drop_older_lineage`]).
    fetched: bool,
}

/// A session taken in whose disk tail is still arriving from its old owner.
#[derive(Debug)]
pub(super) struct Importing {
    /// The lowest sequence number the next tail delivery may have.
    next_min_seq: u64,
    /// Tail deliveries have sequence numbers below this.
    seq_end: u64,
    /// Attached when the tail is complete ([`Engine::import_finish`]).
    pub(super) subscriptions: Vec<(Str, SubscriptionEntry)>,
    /// Redirects for the session that came meanwhile (`moved`), in arrival order,
    /// with who waits for each and their number in the store: queued after the tail.
    pub(super) redirects: super::moved::Released,
}

impl Importing {
    /// The filters it waits to attach.
    pub(super) fn subscription_filters(&self) -> impl Iterator<Item = &Str> {
        self.subscriptions.iter().map(|(f, _)| f)
    }
}

/// What a session just taken in still needs from its old owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// Deliveries of the old owner's disk tail still to read (0: none; the session is
    /// complete).
    pub tail_count: u64,
    /// The tail's lowest sequence number.
    pub tail_from_seq: u64,
}

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
    /// No session of that ClientID is being taken in here.
    #[error("no session of that ClientID is being taken in")]
    NotImporting,
}

fn malformed(e: record::DecodeError) -> TransferError {
    TransferError::Malformed(e.to_string())
}

impl Engine {
    /// This engine serves on cluster node `node`: its client log lines
    /// (`CLIENTS_LOG_TARGET`) name it.
    pub fn set_node_id(&mut self, node: u64) {
        self.node_id = Some(node);
    }

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

    /// Whether this shard keeps `client_id`'s session for a claim of its own node to
    /// continue: the session itself, or a moving copy no claimant fetched (parked for a
    /// claim whose node only waited for this one) that is not of a session older than
    /// the ClientID's last fresh start (`fresh`, read only when a copy is kept). A copy
    /// a claimant fetched is that node's session now, taken in there (or still being
    /// taken in), whether or not its confirmation came yet: a claim of this node that
    /// replaces that claimant's must fetch it from there (network scenario,
    /// CHAOS_SEED=75901: this node took it for its own, the confirmation deleted the
    /// copy, and the client got a new session here).
    pub fn keeps_session(&self, client_id: &str, fresh: impl FnOnce() -> u64) -> bool {
        if self.has_session(client_id) {
            return true;
        }
        Str::try_from(client_id)
            .ok()
            .and_then(|k| self.moving.get(&k))
            .is_some_and(|m| !m.fetched && m.to.1 > fresh())
    }

    /// Whether `client_id` has a live connection here.
    pub fn is_connected(&self, client_id: &str) -> bool {
        self.session_idx(client_id)
            .is_some_and(|idx| self.session(idx).conn.is_some())
    }

    pub(super) fn session_idx(&self, client_id: &str) -> Option<SessionIdx> {
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

    /// This node lost touch with its cluster for longer than its session lease: the
    /// rest of the cluster may have given these ClientIDs to another node, so every
    /// live connection for which `pred(client_id)` holds ends (v5: DISCONNECT 0x9C Use
    /// another server, for a while: 0x88 is not a DISCONNECT code), as at a shutdown: the will follows the usual rules and the
    /// session stays here (a later takeover moves it). Returns how many ended.
    pub fn fence(&mut self, now_ms: u64, mut pred: impl FnMut(&str) -> bool) -> usize {
        self.end_conns_where(
            now_ms,
            ReasonCode::UseAnotherServer,
            CloseReason::Fenced,
            |client_id, _| pred(client_id),
        )
    }

    /// The new owner connected with Clean Start: the session ends here (a moving copy
    /// too). A delayed will is published now, as the end of a session requires
    /// [MQTT-3.1.3-9].
    pub fn drop_session(&mut self, now_ms: u64, client_id: &str) -> bool {
        self.session_taken_over(now_ms, client_id);
        let dropped_copy = self.drop_moving(client_id);
        // Ended cluster-wide: nothing follows it any more (`moved`).
        if let Ok(key) = Str::try_from(client_id) {
            self.drop_ghost(&key);
        }
        let Some(idx) = self.session_idx(client_id) else {
            return dropped_copy;
        };
        if let Some(d) = self.delayed_wills.remove(&idx) {
            self.publish_will(now_ms, d.will, d.origin);
        }
        self.destroy_session(now_ms, idx);
        true
    }

    /// Hands the session of `client_id` out to another node, `to` = (node, claim
    /// epoch): ends its connection (as [`Engine::session_taken_over`]), encodes
    /// subscriptions, expiry, in-flight deliveries with packet ids and states, the
    /// queue head in order, inbound QoS 2 ids, a delayed will, the sequence numbers
    /// and the size of the queue's disk tail. The session leaves memory and the routes
    /// here; its store records stay, and the export is kept as a moving copy until
    /// [`Engine::moving_done`]. `None` when there is no session (or it ended with its
    /// connection). `wall_base_ms`: the wall-clock time at engine time 0.
    pub fn export_session(
        &mut self,
        now_ms: u64,
        client_id: &str,
        wall_base_ms: u64,
        to: (u64, u64),
    ) -> Option<Vec<u8>> {
        self.session_taken_over(now_ms, client_id);
        let idx = self.session_idx(client_id)?;
        // What its window held for its old owner's redirects goes with it, in order.
        self.release_all_held(now_ms, idx);
        // A session still taking in its own tail goes as far as it got.
        self.import_finish(now_ms, client_id);
        let delayed = self.delayed_wills.remove(&idx);
        let s = self.session(idx);
        let mut deliveries = Vec::with_capacity(s.inflight().len() + s.queue.head_len());
        let mut seqs = Vec::with_capacity(deliveries.capacity());
        for i in s.inflight() {
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
            seqs.push(i.delivery.seq);
        }
        for d in s.queue.iter() {
            deliveries.push(record::delivery_rec(d, STATE_QUEUED, 0, wall_base_ms));
            seqs.push(d.seq);
        }
        let rec = TransferRec {
            session: record::session_rec(&super::persist::session_state(s), wall_base_ms),
            deliveries,
            inbound_qos2: s.inbound_qos2.iter().map(|i| i.packet_id).collect(),
            delayed_will: delayed.map(|d| DelayedWillRec {
                client_id: client_id.to_owned(),
                due_wall_ms: record::to_wall(d.due_ms, wall_base_ms),
                will: record::will_rec(&d.will),
            }),
            next_packet_id: s.next_packet_id(),
            seqs,
            next_seq: s.next_seq,
            disk_count: s.queue.disk_len() as u64,
            disk_bytes: s.queue.disk_bytes(),
            disk_from_seq: s.queue.disk_from_seq(),
        };
        let bytes = record::encode(&rec);
        let (expires_at_ms, stored, next_seq, restored, moved_in) = (
            s.expiry_deadline_ms(),
            s.stored,
            s.next_seq,
            s.restored,
            s.moved_in,
        );
        // Before it leaves the routes: what still comes for it here follows it.
        let window = self.leave_ghost(now_ms, idx, to);
        // Inbound QoS 2 ids whose PUBREC still waits: the new owner holds it too.
        let relayed = self.hand_inbound(idx);
        let redeliver = self.redeliver_sets(idx);
        let moving = Moving {
            to,
            bytes: bytes.clone(),
            expires_at_ms,
            stored,
            window,
            relayed,
            redeliver,
            next_seq,
            tail_end: next_seq,
            restored,
            moved_in,
            fetched: false,
        };
        let key = self.session(idx).client_id.clone();
        // Out of memory and the routes, not out of the store.
        self.session_mut(idx).stored = false;
        self.destroy_session(now_ms, idx);
        self.moving.insert(key, moving);
        Some(bytes)
    }

    /// The ClientIDs of this shard's sessions, sorted: the caller acts on each in turn
    /// (parking at start), and an order that is the map's would differ per process, so a
    /// simulation seed would not replay.
    pub fn client_ids(&self) -> Vec<Str> {
        let mut ids: Vec<Str> = self.by_client_id.keys().cloned().collect();
        ids.sort_unstable();
        ids
    }

    /// Whether a session of `client_id` is being taken in (its disk tail still
    /// arriving).
    pub fn is_importing(&self, client_id: &str) -> bool {
        Str::try_from(client_id).is_ok_and(|k| self.importing.contains_key(&k))
    }

    /// Whom the moving copy of `client_id` was handed to, if this shard keeps one.
    pub fn moving_to(&self, client_id: &str) -> Option<(u64, u64)> {
        let key = Str::try_from(client_id).ok()?;
        self.moving.get(&key).map(|m| m.to)
    }

    /// Stores `delivery` as a queued delivery of the moving copy of `client_id`
    /// (what its unconfirmed ghost holds, `moved`): the copy's records are in the
    /// store until the confirmation, so a crash brings the session back with it.
    /// Returns its sequence number; `None` when the copy has no records here (or
    /// persistence is off).
    pub(super) fn store_moving_delivery(
        &mut self,
        client_id: &Str,
        mut delivery: Delivery,
    ) -> Option<u64> {
        self.persist.as_ref()?;
        let m = self.moving.get_mut(client_id).filter(|m| m.stored)?;
        let seq = m.next_seq;
        m.next_seq += 1;
        delivery.seq = seq;
        self.store_op(StoreOp::PutMsg {
            client_id: client_id.clone(),
            seq,
            state: STATE_QUEUED,
            packet_id: 0,
            delivery,
        });
        Some(seq)
    }

    /// How many moving copies this shard keeps.
    pub fn moving_count(&self) -> usize {
        self.moving.len()
    }

    /// Hands the moving copy of `client_id` to a later claimant `to` (the node it went
    /// to did not confirm): the same bytes, now fenced by the new claim.
    pub fn moving_handout(&mut self, client_id: &str, to: (u64, u64)) -> Option<Vec<u8>> {
        let key = Str::try_from(client_id).ok()?;
        let m = self.moving.get_mut(&key)?;
        m.to = to;
        m.fetched = true;
        let bytes = m.bytes.clone();
        self.ghost_moves_on(&key, to);
        Some(bytes)
    }

    /// The moving copy of `client_id` just went out in a `FETCH` answer to the
    /// claimant it is kept for ([`Engine::export_session`] made it for that request).
    pub fn moving_fetched(&mut self, client_id: &str) {
        if let Some(m) = Str::try_from(client_id)
            .ok()
            .and_then(|k| self.moving.get_mut(&k))
        {
            m.fetched = true;
        }
    }

    /// Drops the moving copy of `client_id` (with its ghost, whose waiters are
    /// answered) when the log's mark `fresh` (the newest claim under which a session
    /// of the ClientID started afresh) says it is of an older session: handed to an
    /// older claim, or parked for exactly that claim and never fetched by it (that
    /// claim's node could not reach this one and started anew without it). A copy
    /// the marked claim fetched is the session it continued (its confirmation was
    /// lost) and stays. True when it dropped one.
    ///
    /// Called before a session of the ClientID is taken in here (issue 16, item 3:
    /// `take_in` delivered what the ghost of such an older copy held into the
    /// session taken in, the new one, which could have had those publications
    /// already: QoS 2 twice, seen by the fault harness with
    /// `cluster.wait_for_session_owner = false`). The log's own handling of the mark
    /// (`claims::on_applied`) may not have reached this shard yet.
    ///
    /// A confirmed ghost (no moving copy left) of such an older session stays until
    /// the import, which takes its routes over, but what it would have sent on is not
    /// the session taken in: the import judges its direct copies by the marks it
    /// brings, not as the ghost's redirects (`moved::GhostPath`; sim seed 250: node
    /// 2's ghost of c4's older session, confirmed by the log for node 1's claim,
    /// which had started c4 anew; that new session came to node 2 by node 3, and
    /// node 2 delivered again the late direct copies it had got from its queue on
    /// node 3, which its window's ids do not list).
    pub fn drop_older_lineage(&mut self, client_id: &str, fresh: u64) -> bool {
        let Ok(key) = Str::try_from(client_id) else {
            return false;
        };
        let older = |to: (u64, u64), fetched: bool| to.1 < fresh || (to.1 == fresh && !fetched);
        match self.moving.get(&key) {
            Some(m) => older(m.to, m.fetched) && self.drop_moving_copy(client_id),
            None => {
                self.ghost_session_ended(&key, |g| older(g.to, g.fetched));
                false
            }
        }
    }

    /// The window of the moving copy of `client_id` (see `moved`), for the node
    /// it is handed to beside the export.
    pub fn moving_window(&self, client_id: &str) -> Option<Vec<u8>> {
        let key = Str::try_from(client_id).ok()?;
        self.moving.get(&key).map(|m| m.window.clone())
    }

    /// The inbound QoS 2 ids of the moving copy of `client_id` whose PUBREC still
    /// waits for an original's forward (see `handed_qos2`), for the node it is handed
    /// to beside the export; `me` is this node (the holder of this shard's own).
    pub fn moving_pending(&self, client_id: &str, me: u64) -> Option<Vec<u8>> {
        let key = Str::try_from(client_id).ok()?;
        let m = self.moving.get(&key)?;
        Some(self.pending_for(&key, me, &m.relayed))
    }

    /// Asks the store for up to `count_max` deliveries of the moving copy's disk tail
    /// from `from_seq` on, for `to` (who must be the one it was handed to). The load
    /// comes back with the commit, as [`Loaded`] with `session` = `TAIL_READ_TAG |
    /// token`. False (nothing asked) for anyone else, or without a stored copy.
    pub fn read_moving_tail(
        &mut self,
        client_id: &str,
        to: (u64, u64),
        token: u64,
        from_seq: u64,
        count_max: usize,
    ) -> bool {
        let Ok(key) = Str::try_from(client_id) else {
            return false;
        };
        match self.moving.get(&key) {
            Some(m) if m.to == to && m.stored && self.persist.is_some() => {}
            _ => return false,
        }
        self.store_op(StoreOp::LoadQueue {
            client_id: key,
            session: TAIL_READ_TAG | token,
            from_seq,
            count_max,
        });
        true
    }

    /// Cuts `deliveries`, read from the store for the disk tail of the moving copy of
    /// `client_id` ([`Engine::read_moving_tail`]), at the export's sequence numbers;
    /// true when it cut something (the tail ends in this chunk).
    ///
    /// Why (found by the process fault test `cluster_faults`, a subscriber's session
    /// moving under load, no crash): the copy's unconfirmed ghost stores what it holds
    /// as queued deliveries of the same records (sim seed 748), numbered from the
    /// export's next sequence number, so the store read returns them after the tail.
    /// The new owner refuses a tail delivery beyond the export's numbers, so the whole
    /// chunk was refused and the session moved without its tail: acknowledged
    /// messages lost. They are not tail: what the ghost holds follows the session once
    /// the new owner confirms (`moved`).
    pub fn cut_moving_tail(&self, client_id: &str, deliveries: &mut Vec<Delivery>) -> bool {
        let Some(end) = Str::try_from(client_id)
            .ok()
            .and_then(|k| self.moving.get(&k))
            .map(|m| m.tail_end)
        else {
            return false;
        };
        let keep = deliveries.partition_point(|d| d.seq < end);
        let cut = keep < deliveries.len();
        deliveries.truncate(keep);
        cut
    }

    /// Encodes deliveries read from a disk tail for the node taking the session.
    pub fn encode_tail(deliveries: &[Delivery], more: bool, wall_base_ms: u64) -> Vec<u8> {
        record::encode(&TransferTailRec {
            seqs: deliveries.iter().map(|d| d.seq).collect(),
            deliveries: deliveries
                .iter()
                .map(|d| record::delivery_rec(d, STATE_QUEUED, 0, wall_base_ms))
                .collect(),
            more,
        })
    }

    /// The node the session was handed to (`to`) stored it: the copy and its records
    /// go. False when the copy is not `to`'s (a later claimant's, or none).
    pub fn moving_done(&mut self, now_ms: u64, client_id: &str, to: (u64, u64)) -> bool {
        match self.moving_to(client_id) {
            Some(t) if t == to => {
                // What came for it meanwhile follows it now (`moved`).
                if let Ok(key) = Str::try_from(client_id) {
                    let fetched = self.moving.get(&key).is_some_and(|m| m.fetched);
                    self.ghost_confirmed(now_ms, &key, fetched);
                    // In the commit of the session's delete below: a crash keeps
                    // the ghost whenever it loses the session (`stored_ghost`).
                    self.store_ghost(now_ms, &key);
                }
                self.drop_moving(client_id)
            }
            _ => false,
        }
    }

    /// The moving copy of `client_id` is of a session that ended cluster-wide (its
    /// ClientID started afresh since it was handed out): it goes with its store records
    /// and its ghost (whoever waited for what the ghost held is answered). False when
    /// there is no copy.
    pub fn drop_moving_copy(&mut self, client_id: &str) -> bool {
        let dropped = self.drop_moving(client_id);
        if let Ok(key) = Str::try_from(client_id) {
            self.drop_ghost(&key);
        }
        dropped
    }

    /// Drops the moving copy of `client_id` with its store records.
    pub(super) fn drop_moving(&mut self, client_id: &str) -> bool {
        let Ok(key) = Str::try_from(client_id) else {
            return false;
        };
        let Some(m) = self.moving.remove(&key) else {
            return false;
        };
        if m.stored {
            self.store_op(StoreOp::DelSession { client_id: key });
        }
        true
    }

    /// Drops moving copies whose session would have expired by `now_ms`; returns
    /// their ClientIDs.
    pub fn expire_moving(&mut self, now_ms: u64) -> Vec<Str> {
        let mut due: Vec<Str> = self
            .moving
            .iter()
            .filter(|(_, m)| m.expires_at_ms.is_some_and(|t| t <= now_ms))
            .map(|(c, _)| c.clone())
            .collect();
        // In ClientID order, not the map's (which differs per process): each drop
        // writes to the store and its ghost's copies go on, in this order.
        due.sort_unstable();
        for c in &due {
            self.drop_moving(c);
            // What its ghost held goes with it (`moved`).
            self.drop_ghost(c);
        }
        due
    }

    /// This shard takes its own moving copy of `client_id` back (the node it was
    /// handed to never confirmed, and this node owns the ClientID again): the session
    /// is as it was exported, its disk tail still in this shard's store. False when
    /// there is no copy.
    pub fn resume_moving(
        &mut self,
        now_ms: u64,
        client_id: &str,
        wall_base_ms: u64,
    ) -> Result<bool, TransferError> {
        let Ok(key) = Str::try_from(client_id) else {
            return Ok(false);
        };
        let Some(m) = self.moving.remove(&key) else {
            return Ok(false);
        };
        self.take_in(now_ms, client_id, &m.bytes, wall_base_ms, Some(m.stored))?;
        if let Some(idx) = self.session_idx(client_id) {
            self.take_back_inbound(idx, &m.relayed, m.redeliver);
            let s = self.session_mut(idx);
            s.restored = m.restored;
            s.moved_in = m.moved_in;
        }
        Ok(true)
    }

    /// Takes in a session exported by another node ([`Engine::export_session`]) for
    /// `client_id`, replacing any session (or moving copy) this shard still has for
    /// it, and stores it (persistence on). When the old owner's queue had a disk
    /// tail, the session waits for it ([`Engine::import_tail`]) and gets its
    /// subscriptions at [`Engine::import_finish`]; otherwise it is complete. The next
    /// CONNECT without Clean Start resumes it (session present, in-flight deliveries
    /// re-sent with their packet ids). Malformed bytes are an error and change nothing.
    pub fn import_session(
        &mut self,
        now_ms: u64,
        client_id: &str,
        bytes: &[u8],
        wall_base_ms: u64,
    ) -> Result<Imported, TransferError> {
        let imported = self.take_in(now_ms, client_id, bytes, wall_base_ms, None)?;
        if let Some(idx) = self.session_idx(client_id) {
            self.session_mut(idx).moved_in = true;
        }
        Ok(imported)
    }

    /// `local`: `Some(stored)` when the bytes are this shard's own moving copy (its
    /// disk tail, if stored, is still in this store); `None` for another node's.
    fn take_in(
        &mut self,
        now_ms: u64,
        client_id: &str,
        bytes: &[u8],
        wall_base_ms: u64,
        local: Option<bool>,
    ) -> Result<Imported, TransferError> {
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
        let seqs = checked_seqs(&rec)?;
        let tail = Imported {
            tail_count: rec.disk_count,
            tail_from_seq: rec.disk_from_seq,
        };
        let (next_packet_id, next_seq, disk_bytes) =
            (rec.next_packet_id, rec.next_seq, rec.disk_bytes);
        let deliveries = seqs.into_iter().zip(rec.deliveries).collect();
        let mut rs = recovered_session(
            rec.session,
            deliveries,
            // Another node's shards are not this node's: nothing to deliver
            // again here (docs/PERSISTENCE.md, "Cross-shard QoS 2 after a crash").
            rec.inbound_qos2
                .into_iter()
                .map(|pid| (pid, ShardSet::new(), None))
                .collect(),
            rec.delayed_will,
            wall_base_ms,
        )
        .map_err(malformed)?;
        for (filter, _) in &rs.subscriptions {
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
        let subscriptions = std::mem::take(&mut rs.subscriptions);
        let waits_for_tail = local.is_none() && tail.tail_count > 0;
        // It is here again: its ghost goes (`moved`), what the ghost held is
        // delivered to it below. The ghost's routes go only once the session's
        // subscriptions are attached (`Engine::detach_ghost`: a take-back left the
        // filters unrouted for a moment, CHAOS_SEED=140775). While its disk tail
        // comes, its subscriptions are not attached: the ghost stays until then
        // ([`Engine::import_finish`]), so a copy that comes here for it meanwhile
        // (matched while it lived here, say a hinted batch) goes to the node the tail
        // comes from, whose ghost sends it back after the confirmation; without the
        // ghost it matched nothing and was answered (network scenario,
        // CHAOS_SEED=75901).
        let (held, seen, ghost_routes) = match Str::try_from(client_id) {
            Ok(key) => {
                // From another node: the window it brings learns what the ghost
                // would have sent there (`Engine::import_window`).
                self.moved.returned = local
                    .is_none()
                    .then(|| self.ghost_path(now_ms, &key))
                    .flatten()
                    .map(|p| (key.clone(), p));
                if waits_for_tail {
                    (Vec::new(), None, None)
                } else {
                    let (held, seen) = self.take_ghost_held(&key);
                    (held, seen, self.detach_ghost(&key))
                }
            }
            Err(_) => (Vec::new(), None, None),
        };
        // A stale copy of the session here (from an earlier ownership) is replaced.
        if let Some(idx) = self.session_idx(client_id) {
            self.session_taken_over(now_ms, client_id);
            if self.session_idx(client_id) == Some(idx) {
                self.delayed_wills.remove(&idx);
                self.destroy_session(now_ms, idx);
            }
        }
        // The ghost kept while the tail comes is not this session's predecessor for
        // `new_session_for` to drop.
        let kept = Str::try_from(client_id)
            .ok()
            .filter(|_| waits_for_tail)
            .and_then(|k| self.moved.by_client.remove(&k).map(|slot| (k, slot)));
        let idx = self.restore_one(now_ms, rs, false);
        if let Some((key, slot)) = kept {
            self.moved.by_client.insert(key, slot);
        }
        {
            let s = self.session_mut(idx);
            s.set_next_packet_id(next_packet_id);
            s.next_seq = s.next_seq.max(next_seq);
        }
        if local == Some(true) && tail.tail_count > 0 {
            // Taken back where the tail is: it stays on disk and loads as the head
            // drains.
            self.session_mut(idx).stored = true;
            let count = usize::try_from(tail.tail_count).unwrap_or(usize::MAX);
            self.with_queue(idx, |q| q.set_disk(count, disk_bytes, tail.tail_from_seq));
        }
        if waits_for_tail {
            let key = self.session(idx).client_id.clone();
            self.importing.insert(
                key,
                Importing {
                    next_min_seq: tail.tail_from_seq,
                    seq_end: next_seq,
                    subscriptions,
                    redirects: Vec::new(),
                },
            );
        } else {
            for (filter, entry) in subscriptions {
                self.attach_subscription(idx, filter, entry, false);
            }
        }
        if let Some(routes) = ghost_routes {
            self.release_ghost_routes(routes);
        }
        // Into this shard's store: the session, its deliveries, inbound ids, delayed
        // will (each a no-op without persistence or for a non-persistent session).
        self.persist_session(idx);
        self.persist_rewrite_deliveries(idx);
        let inbound: Vec<u16> = self
            .session(idx)
            .inbound_qos2
            .iter()
            .map(|i| i.packet_id)
            .collect();
        for packet_id in inbound {
            self.persist_inbound(idx, packet_id, Some((0, None)), None);
        }
        if let Some(d) = self.delayed_wills.remove(&idx) {
            self.persist_delayed_will(idx, Some(&d));
            self.delayed_wills.insert(idx, d);
        }
        self.deliver_held(now_ms, idx, held, seen);
        Ok(if waits_for_tail {
            tail
        } else {
            Imported {
                tail_count: 0,
                tail_from_seq: 0,
            }
        })
    }

    /// Appends a chunk of the old owner's disk tail ([`Engine::encode_tail`]) to the
    /// session being taken in: validated whole first (queued QoS 1/2 deliveries with
    /// messages, sequence numbers increasing within the tail's range), then queued in
    /// order, beyond the head on this shard's own disk tail. Returns how many were
    /// appended, whether the old owner has more, and the sequence number to ask from.
    pub fn import_tail(
        &mut self,
        now_ms: u64,
        client_id: &str,
        bytes: &[u8],
        wall_base_ms: u64,
    ) -> Result<(usize, bool, u64), TransferError> {
        let key = Str::try_from(client_id).map_err(|_| TransferError::NotImporting)?;
        let (Some(imp), Some(idx)) = (self.importing.get(&key), self.session_idx(client_id)) else {
            return Err(TransferError::NotImporting);
        };
        let rec: TransferTailRec = record::decode(bytes).map_err(malformed)?;
        if rec.seqs.len() != rec.deliveries.len() {
            return Err(TransferError::Malformed(format!(
                "{} sequence numbers for {} deliveries",
                rec.seqs.len(),
                rec.deliveries.len()
            )));
        }
        let mut min = imp.next_min_seq;
        for (seq, d) in rec.seqs.iter().zip(&rec.deliveries) {
            if *seq < min || *seq >= imp.seq_end {
                return Err(TransferError::Malformed(format!(
                    "tail delivery {seq} outside {min}..{}",
                    imp.seq_end
                )));
            }
            if d.state != STATE_QUEUED || d.packet_id != 0 || d.message.is_none() {
                return Err(TransferError::Malformed(
                    "a tail delivery must be queued, with its message".into(),
                ));
            }
            if !matches!(d.qos, 1 | 2) {
                return Err(TransferError::Malformed(format!(
                    "a tail delivery of QoS {}",
                    d.qos
                )));
            }
            min = seq + 1;
        }
        let deliveries: Vec<Delivery> = rec
            .seqs
            .into_iter()
            .zip(rec.deliveries)
            .map(|(seq, d)| record::delivery(d, seq, wall_base_ms))
            .collect::<Result<_, _>>()
            .map_err(malformed)?;
        let n = deliveries.len();
        for d in deliveries {
            // Already acknowledged to their publishers: queued even over a budget.
            self.queue_push_persistent(now_ms, idx, d);
        }
        if let Some(imp) = self.importing.get_mut(&key) {
            imp.next_min_seq = min;
        }
        Ok((n, rec.more, min))
    }

    /// The session taken in is complete (or as complete as it will get): it gets its
    /// subscriptions, and its record is stored with them; what its ghost here held
    /// (`take_in` kept it while the tail came) and what was redirected to it meanwhile
    /// are queued after the tail. False when no import of `client_id` was waiting.
    pub fn import_finish(&mut self, now_ms: u64, client_id: &str) -> bool {
        let Ok(key) = Str::try_from(client_id) else {
            return false;
        };
        let Some(imp) = self.importing.remove(&key) else {
            return false;
        };
        let Some(idx) = self.session_idx(client_id) else {
            self.deliver_released(&key, None, imp.redirects);
            return false;
        };
        // Back on a node that kept its ghost while the tail came (`take_in`): the
        // ghost goes now, its routes once the subscriptions are attached.
        let (held, seen) = self.take_ghost_held(&key);
        let ghost_routes = self.detach_ghost(&key);
        for (filter, entry) in imp.subscriptions {
            self.attach_subscription(idx, filter, entry, false);
        }
        if let Some(routes) = ghost_routes {
            self.release_ghost_routes(routes);
        }
        self.window_attached(&key);
        self.persist_session(idx);
        self.deliver_held_after_tail(now_ms, idx, held, seen);
        self.deliver_released(&key, Some((now_ms, idx)), imp.redirects);
        true
    }

    /// The import of `client_id` is given up before its disk tail is all in (the
    /// tail's node went away and the claim waits for it: `cluster.wait_for_session_owner`):
    /// the partial session leaves memory and this shard's store, its delayed will with
    /// it (not published: the old owner's copy keeps it), and is not reported as ended
    /// (its claim stays). The old owner's copy stays the only one, and the client's next
    /// CONNECT takes it over in full. Not when something only this shard holds would go
    /// with it: a redirect that came for the session meanwhile (its publisher is
    /// acknowledged once it is delivered) or a ghost of the session kept here while the
    /// tail comes (the store deletes its held copies with the session's records); then
    /// false, and the caller finishes the import as it is. False too when no import of
    /// `client_id` was under way.
    pub fn abandon_import(&mut self, now_ms: u64, client_id: &str) -> bool {
        let Ok(key) = Str::try_from(client_id) else {
            return false;
        };
        match self.importing.get(&key) {
            Some(imp) if imp.redirects.is_empty() && !self.moved.by_client.contains_key(&key) => {}
            _ => return false,
        }
        let Some(idx) = self.session_idx(client_id) else {
            return false;
        };
        self.importing.remove(&key);
        self.delayed_wills.remove(&idx);
        let ended = self.ended_sessions.take();
        self.destroy_session(now_ms, idx);
        self.ended_sessions = ended;
        true
    }

    /// The import of `client_id` ends unfinished (a new session of the ClientID
    /// replaces it): what it held for the session goes, and whoever waited for it
    /// is answered, not held for ever (as a ghost's held copies, `Engine::detach_ghost`).
    pub(super) fn forget_import(&mut self, client_id: &Str) {
        if let Some(imp) = self.importing.remove(client_id) {
            self.deliver_released(client_id, None, imp.redirects);
        }
    }

    /// Hands a tail read to its waiter: true when `loaded` is one
    /// ([`Engine::read_moving_tail`]) rather than a session's own load.
    pub fn is_tail_read(loaded: &Loaded) -> bool {
        loaded.session & TAIL_READ_TAG != 0
    }
}

/// The sequence numbers the deliveries of `rec` keep here: as exported when they are
/// consistent (increasing, below the disk tail and the next one, every stored delivery
/// numbered); otherwise, when there is no disk tail to line up with, numbered afresh in
/// order. A tail with inconsistent numbers is refused.
fn checked_seqs(rec: &TransferRec) -> Result<Vec<u64>, TransferError> {
    let n = rec.deliveries.len();
    let mut consistent = rec.seqs.len() == n;
    let mut last = 0u64;
    if consistent {
        for (seq, d) in rec.seqs.iter().zip(&rec.deliveries) {
            if *seq == 0 {
                // Only QoS 0 deliveries go unstored.
                if d.qos != 0 {
                    consistent = false;
                    break;
                }
                continue;
            }
            if *seq <= last || *seq >= rec.next_seq {
                consistent = false;
                break;
            }
            last = *seq;
        }
    }
    if rec.disk_count > 0 {
        let ok = consistent && rec.disk_from_seq > last && rec.disk_from_seq < rec.next_seq;
        if !ok {
            return Err(TransferError::Malformed(format!(
                "a disk tail from {} with deliveries up to {last} and the next at {}",
                rec.disk_from_seq, rec.next_seq
            )));
        }
    }
    if consistent {
        Ok(rec.seqs.clone())
    } else {
        Ok((1..=n as u64).collect())
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

    /// Network scenario (CHAOS_SEED=75901, a lost session): node 2 kept chaos-sub-1's
    /// session when node 1's claim parked it; node 1 fetched the copy and was still
    /// taking it in when node 2's own late claim (its CONNECT had given up) was
    /// applied. Node 2 took the copy for one it keeps, so its claim awaited nothing;
    /// node 1's confirmation deleted the copy, and the client, back on node 2, got a
    /// new session (session present 0). A copy its claimant fetched is not kept here.
    #[test]
    fn a_moving_copy_its_claimant_fetched_is_no_longer_this_shards_to_continue() {
        let mut e = Engine::new(0, 1, Limits::default());
        subscriber(&mut e, "s");
        assert_eq!(e.fence(1, |_| true), 1);
        assert!(e.keeps_session("s", || 0), "the session itself");
        // Parked for node 2's claim (epoch 99), which only waits for this node.
        assert!(e.export_session(2, "s", 0, (2, 99)).is_some());
        assert!(!e.has_session("s"));
        assert!(e.keeps_session("s", || 0), "a parked copy nobody fetched");
        assert!(!e.keeps_session("s", || 99), "a copy of an older session");
        // Node 2's FETCH takes it: the session is node 2's now.
        e.moving_fetched("s");
        assert!(!e.keeps_session("s", || 0), "a copy its claimant fetched");
        // Handed on to a later claimant, too.
        assert!(e.moving_handout("s", (3, 120)).is_some());
        assert!(!e.keeps_session("s", || 0));
    }

    #[test]
    fn the_lease_fences_the_held_client_ids_and_says_so_as_its_close_reason() {
        let mut e = Engine::new(0, 1, Limits::default());
        let held = subscriber(&mut e, "held");
        let other = e.connect(
            1,
            connect_packet(ProtocolVersion::V3_1_1, "other", false),
            false,
        );
        drain(&mut e, other, ProtocolVersion::V3_1_1);
        assert_eq!(e.fence(5, |client_id| client_id == "held"), 1);
        assert!(e.is_ended(held));
        assert!(!e.is_ended(other));
        // The reason the client log line names (`fenced`), not a shutdown.
        let close = e.output(held).and_then(|o| o.close);
        assert_eq!(close, Some(super::super::CloseReason::Fenced));
        assert_eq!(close.map(|c| c.name()), Some("fenced"));
        let sent = drain(&mut e, held, ProtocolVersion::V5);
        assert!(
            matches!(&sent[..], [Packet::Disconnect(d)] if d.reason_code == ReasonCode::UseAnotherServer),
            "{sent:?}"
        );
        // The session stays for a later takeover.
        assert!(e.has_session("held"));
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

        let bytes = a
            .export_session(5, "mover", WALL_A, (2, 7))
            .expect("a session");
        assert_eq!(a.moving_to("mover"), Some((2, 7)));
        let kicked = drain(&mut a, sub, ProtocolVersion::V5);
        assert!(
            kicked.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.reason_code == ReasonCode::SessionTakenOver)),
            "{kicked:?}"
        );
        assert!(
            !a.has_session("mover"),
            "the old node keeps no live session"
        );

        let mut b = Engine::new(0, 1, limits);
        assert!(b.import_session(9, "other", &bytes, WALL_B).is_err());
        assert!(
            b.import_session(9, "mover", &bytes[..bytes.len() / 2], WALL_B)
                .is_err()
        );
        let imported = b.import_session(9, "mover", &bytes, WALL_B).unwrap();
        assert_eq!(imported.tail_count, 0);
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
        assert!(a.export_session(2, "c", WALL_A, (2, 1)).is_none());
        assert_eq!(a.moving_count(), 0);
        assert!(a.is_ended(conn));
        let mut b = Engine::new(0, 1, Limits::default());
        for junk in [&b""[..], &[1, 0][..], &[1, 0, 0xff, 0xff, 0xff][..]] {
            assert!(b.import_session(3, "c", junk, WALL_B).is_err());
        }
        assert!(!b.has_session("c"));
    }

    // ------------------------------------------------------------------
    // Two-phase hand-over and the disk tail, with a store stand-in per node.

    use super::super::testing::StoreModel;
    use tessera_proto::PubAck;

    /// A node's shard with persistence (sync) and a queue head of 4 in memory.
    fn stored_node() -> (Engine, StoreModel) {
        let limits = Limits {
            queue_head_count_max: 4,
            ..Limits::default()
        };
        let mut e = Engine::new(0, 1, limits);
        e.enable_persistence(true);
        (e, StoreModel::default())
    }

    /// A persistent v5 session "mover" subscribed to "t" at QoS 1, offline, with `n`
    /// QoS 1 messages queued ("m0".."m{n-1}"): 4 in memory, the rest on disk.
    fn offline_with_queue(e: &mut Engine, st: &mut StoreModel, n: usize) {
        let mut c = connect_packet(ProtocolVersion::V5, "mover", false);
        c.properties.session_expiry_interval = Some(600);
        let conn = e.connect(1, c, false);
        e.handle_packet(
            1,
            conn,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                properties: Default::default(),
                subscriptions: vec![Subscription {
                    filter: Str::from_static("t"),
                    options: SubscriptionOptions::qos(QoS::AtLeastOnce),
                }],
            }),
        );
        e.connection_lost(2, conn);
        e.release(2, conn);
        let pubc = e.connect(2, connect_packet(ProtocolVersion::V5, "pub", true), false);
        for i in 0..n {
            publish(e, pubc, &format!("m{i}"), QoS::AtLeastOnce, i as u16 + 1);
            st.commit(e, 3);
        }
    }

    /// "mover" connects to `e`; returns the payloads it is sent (each acknowledged)
    /// until nothing more comes, and whether the CONNACK said session present.
    fn receive_all(e: &mut Engine, st: &mut StoreModel, now: u64) -> (bool, Vec<String>) {
        let mut c = connect_packet(ProtocolVersion::V5, "mover", false);
        c.properties.session_expiry_interval = Some(600);
        let conn = e.connect(now, c, false);
        let mut present = None;
        let mut got = Vec::new();
        for _ in 0..1000 {
            st.commit(e, now);
            let packets = drain(e, conn, ProtocolVersion::V5);
            if packets.is_empty() {
                break;
            }
            for p in packets {
                match p {
                    Packet::ConnAck(a) => present = Some(a.session_present),
                    Packet::Publish(p) => {
                        got.push(String::from_utf8_lossy(&p.payload).into_owned());
                        e.handle_packet(now, conn, Packet::PubAck(PubAck::new(p.packet_id)));
                    }
                    _ => {}
                }
            }
        }
        (present.expect("a CONNACK"), got)
    }

    /// Moves the disk tail of the moving copy on `from` (handed to `who`) into the
    /// session being taken in on `to`, 3 deliveries per chunk.
    fn move_tail(
        from: (&mut Engine, &mut StoreModel),
        to: (&mut Engine, &mut StoreModel),
        who: (u64, u64),
        from_seq: u64,
    ) -> usize {
        let (a, ast) = from;
        let (b, bst) = to;
        let (mut from_seq, mut more, mut moved) = (from_seq, true, 0);
        while more {
            assert!(a.read_moving_tail("mover", who, 1, from_seq, 3));
            let reads = ast.commit(a, 20);
            assert_eq!(reads.len(), 1);
            let chunk = &reads[0].deliveries;
            let bytes = Engine::encode_tail(chunk, chunk.len() == 3, WALL_A);
            let (n, m, next) = b.import_tail(21, "mover", &bytes, WALL_B).unwrap();
            (from_seq, more, moved) = (next, m, moved + n);
            bst.commit(b, 21);
        }
        assert!(b.import_finish(21, "mover"));
        bst.commit(b, 21);
        moved
    }

    fn expected(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m{i}")).collect()
    }

    fn stored_msgs(st: &StoreModel) -> usize {
        st.msgs.keys().filter(|(c, _)| c == "mover").count()
    }

    /// A copy of another node's QoS 1 publication on "t" (origin 5, number `n`),
    /// redirected to "mover" by a ghost of it on another node.
    fn redirect_to_mover(payload: &'static str, n: u64) -> crate::mesh::MeshMsg {
        let mut p = Publish::new(
            Str::from_static("t"),
            Bytes::from_static(payload.as_bytes()),
        );
        p.qos = QoS::AtLeastOnce;
        p.packet_id = 1;
        let message = super::super::message_from_publish(
            1,
            p,
            crate::message::SessionUid(0),
            ProtocolVersion::V5,
        );
        crate::mesh::MeshMsg::Redirect {
            client_id: Str::from_static("mover"),
            node: 2,
            epoch: 5,
            message,
            id: Some(crate::mesh::PubId {
                origin: 5,
                shard: 0,
                seq: n,
            }),
            ack: None,
        }
    }

    /// Fault harness, kill -9 scenario (CHAOS_SEED=695844, CI ci42 and replays:
    /// acknowledged QoS 1 and 2 lost). A session moving in with a disk tail gets its
    /// subscriptions only once the tail is in. A ghost of it on a third node (the
    /// session had lived there within the window) redirected a publication to it
    /// meanwhile: delivered by the session's subscriptions, not attached yet, it was
    /// dropped and its batch answered, while the window had taken its id as
    /// delivered, so the old owner's redirect of the same publication at the
    /// confirmation was skipped. Now it is held until the tail is in, queued after
    /// it, and its batch answered only then; the second redirect is skipped.
    #[test]
    fn a_redirect_that_comes_while_the_disk_tail_moves_is_delivered_once_after_the_tail() {
        const N: usize = 7;
        let (mut a, mut ast) = stored_node();
        a.enable_remote().expect("room for the remote id");
        a.set_origin(7);
        offline_with_queue(&mut a, &mut ast, N);
        let bytes = a.export_session(10, "mover", WALL_A, (2, 5)).unwrap();
        let window = a.moving_window("mover").expect("a window");
        ast.commit(&mut a, 10);

        let (mut b, mut bst) = stored_node();
        let remote_b = b.enable_remote().expect("room for the remote id");
        b.set_origin(8);
        let imported = b.import_session(11, "mover", &bytes, WALL_B).unwrap();
        assert_eq!(imported.tail_count, (N - 4) as u64);
        assert!(b.import_window(11, "mover", &window));
        bst.commit(&mut b, 11);

        // The third node's redirect, in a forwarded batch, while the tail moves.
        let batch = b
            .begin_forward_batch()
            .expect("sync: the batch answer waits");
        b.handle_mesh(12, remote_b, redirect_to_mover("late", 3));
        b.end_forward_batch(batch);
        bst.commit(&mut b, 12);
        assert!(
            b.take_forwards_done().is_empty(),
            "the batch answered while its redirect is not in the session's queue"
        );
        let moved = move_tail(
            (&mut a, &mut ast),
            (&mut b, &mut bst),
            (2, 5),
            imported.tail_from_seq,
        );
        assert_eq!(moved, N - 4);
        assert_eq!(b.take_forwards_done(), [batch]);
        // The old owner's ghost sends the same publication on at its confirmation.
        b.handle_mesh(22, remote_b, redirect_to_mover("late", 3));
        bst.commit(&mut b, 22);

        let (present, got) = receive_all(&mut b, &mut bst, 30);
        assert!(present);
        let mut want = expected(N);
        want.push("late".to_owned());
        assert_eq!(got, want, "once, after the tail");
    }

    /// Fault harness, kill -9 scenario (CHAOS_SEED=131556: 33 acknowledged QoS 1
    /// lost): the old owner died while the new owner read the disk tail, and the new
    /// owner served the session with what had arrived; the old owner, restarted,
    /// dropped its copy as stale. Now (`cluster.wait_for_session_owner`) the take-in is
    /// given up: the partial session leaves the new node's memory and store without
    /// being reported ended, and a later take-in of the old owner's copy gets it whole.
    /// A redirect held for the session meanwhile keeps the partial session (it would
    /// be lost with it).
    #[test]
    fn a_take_in_given_up_mid_tail_leaves_nothing_and_a_later_one_gets_the_whole_session() {
        const N: usize = 11;
        let (mut a, mut ast) = stored_node();
        offline_with_queue(&mut a, &mut ast, N);
        let bytes = a.export_session(10, "mover", WALL_A, (2, 5)).unwrap();
        ast.commit(&mut a, 10);

        let (mut b, mut bst) = stored_node();
        b.track_session_ends();
        let imported = b.import_session(11, "mover", &bytes, WALL_B).unwrap();
        assert_eq!(imported.tail_count, (N - 4) as u64);
        bst.commit(&mut b, 11);
        // One chunk of the tail arrives, then the old owner dies.
        assert!(a.read_moving_tail("mover", (2, 5), 1, imported.tail_from_seq, 3));
        let reads = ast.commit(&mut a, 12);
        let chunk = Engine::encode_tail(&reads[0].deliveries, true, WALL_A);
        let (n, more, _) = b.import_tail(12, "mover", &chunk, WALL_B).unwrap();
        assert_eq!((n, more), (3, true));
        bst.commit(&mut b, 12);
        assert!(stored_msgs(&bst) > 0);

        assert!(b.abandon_import(13, "mover"));
        bst.commit(&mut b, 13);
        assert!(!b.has_session("mover") && !b.is_importing("mover"));
        assert_eq!(stored_msgs(&bst), 0, "the partial copy left the store");
        assert!(!bst.sessions.contains("mover"));
        assert!(b.take_ended_sessions().is_empty(), "its claim stays");
        assert!(!b.abandon_import(13, "mover"), "nothing under way any more");

        // The old owner is back: the next take-in gets all of it.
        let imported = b.import_session(20, "mover", &bytes, WALL_B).unwrap();
        bst.commit(&mut b, 20);
        let moved = move_tail(
            (&mut a, &mut ast),
            (&mut b, &mut bst),
            (2, 5),
            imported.tail_from_seq,
        );
        assert_eq!(moved, N - 4);
        let (present, got) = receive_all(&mut b, &mut bst, 30);
        assert!(present);
        assert_eq!(got, expected(N));

        // A redirect held while the tail comes is only here: not given up.
        let (mut a, mut ast) = stored_node();
        a.enable_remote().expect("room for the remote id");
        a.set_origin(7);
        offline_with_queue(&mut a, &mut ast, N);
        let bytes = a.export_session(10, "mover", WALL_A, (2, 5)).unwrap();
        let window = a.moving_window("mover").expect("a window");
        let (mut c, mut cst) = stored_node();
        let remote_c = c.enable_remote().expect("room for the remote id");
        c.set_origin(8);
        let imported = c.import_session(11, "mover", &bytes, WALL_B).unwrap();
        assert!(imported.tail_count > 0);
        assert!(c.import_window(11, "mover", &window));
        cst.commit(&mut c, 11);
        c.handle_mesh(12, remote_c, redirect_to_mover("late", 3));
        cst.commit(&mut c, 12);
        assert!(!c.abandon_import(13, "mover"));
        assert!(c.has_session("mover") && c.is_importing("mover"));
    }

    #[test]
    fn a_handed_out_session_stays_until_confirmed_and_a_later_claimant_gets_it_with_its_disk_tail()
    {
        const N: usize = 11;
        let (mut a, mut ast) = stored_node();
        offline_with_queue(&mut a, &mut ast, N);
        assert_eq!(stored_msgs(&ast), N);

        // Handed to node 2 (epoch 5): gone from memory, still in the store.
        let bytes = a.export_session(10, "mover", WALL_A, (2, 5)).unwrap();
        ast.commit(&mut a, 10);
        assert!(!a.has_session("mover"));
        assert_eq!(stored_msgs(&ast), N, "the records stay until confirmed");
        assert!(ast.sessions.contains("mover"));

        // Node 2 takes the head in and dies before the tail and the confirmation.
        {
            let (mut b, mut bst) = stored_node();
            let imported = b.import_session(11, "mover", &bytes, WALL_B).unwrap();
            assert_eq!(imported.tail_count, (N - 4) as u64);
            bst.commit(&mut b, 11);
        }

        // A later claim by node 3 (epoch 9) gets the same copy; node 2's epoch no
        // longer reads the tail nor confirms.
        let bytes = a.moving_handout("mover", (3, 9)).unwrap();
        assert!(!a.read_moving_tail("mover", (2, 5), 1, 0, 3));
        assert!(!a.moving_done(9, "mover", (2, 5)));
        let (mut c, mut cst) = stored_node();
        let imported = c.import_session(12, "mover", &bytes, WALL_B).unwrap();
        let moved = move_tail(
            (&mut a, &mut ast),
            (&mut c, &mut cst),
            (3, 9),
            imported.tail_from_seq,
        );
        assert_eq!(moved, N - 4);
        // Node 3 stored it (its own head of 4, the rest on its disk): confirmed, the
        // old node deletes its records.
        assert_eq!(stored_msgs(&cst), N);
        assert!(a.moving_done(9, "mover", (3, 9)));
        ast.commit(&mut a, 22);
        assert_eq!(stored_msgs(&ast), 0);
        assert!(!ast.sessions.contains("mover"));
        assert_eq!(a.moving_count(), 0);

        // Every message once, in order, on node 3.
        let (present, got) = receive_all(&mut c, &mut cst, 30);
        assert!(present);
        assert_eq!(got, expected(N));
        // The subscription came along once the tail was in.
        let pubc = c.connect(31, connect_packet(ProtocolVersion::V5, "p3", true), false);
        publish(&mut c, pubc, "late", QoS::AtLeastOnce, 1);
        cst.commit(&mut c, 31);
        let (_, got) = receive_all(&mut c, &mut cst, 32);
        assert_eq!(got, ["late"]);
    }

    #[test]
    fn a_node_takes_its_unconfirmed_moving_copy_back_with_the_tail_still_on_its_disk() {
        const N: usize = 9;
        let (mut a, mut ast) = stored_node();
        offline_with_queue(&mut a, &mut ast, N);
        a.export_session(10, "mover", WALL_A, (2, 5)).unwrap();
        ast.commit(&mut a, 10);
        assert!(a.resume_moving(11, "mover", WALL_A).unwrap());
        assert_eq!(a.moving_count(), 0);
        ast.commit(&mut a, 11);
        assert_eq!(stored_msgs(&ast), N, "nothing of the tail was deleted");
        let (present, got) = receive_all(&mut a, &mut ast, 12);
        assert!(present);
        assert_eq!(got, expected(N));
        assert_eq!(stored_msgs(&ast), 0, "all acknowledged");
    }

    #[test]
    fn a_moving_copy_is_superseded_by_a_new_session_and_dropped_at_its_expiry() {
        let (mut a, mut ast) = stored_node();
        offline_with_queue(&mut a, &mut ast, 6);
        a.export_session(10, "mover", WALL_A, (2, 5)).unwrap();
        // Nothing expires before the session would have (expiry 600 s).
        assert!(a.expire_moving(10 + 599_000).is_empty());
        assert_eq!(a.expire_moving(10 + 600_000).len(), 1);
        ast.commit(&mut a, 10);
        assert_eq!(stored_msgs(&ast), 0);

        let (mut a, mut ast) = stored_node();
        offline_with_queue(&mut a, &mut ast, 6);
        a.export_session(10, "mover", WALL_A, (2, 5)).unwrap();
        // A clean session of the same ClientID here: the copy and its records go first.
        let conn = a.connect(
            11,
            connect_packet(ProtocolVersion::V5, "mover", true),
            false,
        );
        ast.commit(&mut a, 11);
        assert_eq!(a.moving_count(), 0);
        assert_eq!(stored_msgs(&ast), 0);
        assert!(!a.is_ended(conn));
    }

    /// Found by the process fault test (`cluster_faults`: a subscriber's session moved
    /// under load, no crash; the new node logged "tail delivery 993 outside
    /// 993..993" and served the session without its 20 queued messages): a
    /// publication for the session after the export is held by its ghost and stored
    /// with the copy's records, numbered from the export's next sequence number, so
    /// the store's tail read returns it after the tail and the new owner refused the
    /// whole chunk. The old owner cuts the chunk at the export's numbers.
    #[test]
    fn a_tail_read_leaves_out_what_the_ghost_stored_after_the_export() {
        const N: usize = 8;
        let (mut a, mut ast) = stored_node();
        // A cluster node's shard: the exported session leaves a ghost here.
        a.enable_remote().expect("room for the remote id");
        a.set_origin(7);
        offline_with_queue(&mut a, &mut ast, N);
        let bytes = a.export_session(10, "mover", WALL_A, (2, 5)).unwrap();
        ast.commit(&mut a, 10);
        let pubc = a.connect(11, connect_packet(ProtocolVersion::V5, "pub2", true), false);
        publish(&mut a, pubc, "late", QoS::AtLeastOnce, 1);
        ast.commit(&mut a, 11);
        assert_eq!(
            stored_msgs(&ast),
            N + 1,
            "the ghost stored the copy it holds"
        );

        let (mut b, mut bst) = stored_node();
        let imported = b.import_session(12, "mover", &bytes, WALL_B).unwrap();
        assert_eq!(imported.tail_count, (N - 4) as u64);
        assert!(a.read_moving_tail("mover", (2, 5), 1, imported.tail_from_seq, 64));
        let mut chunk = ast.commit(&mut a, 13).remove(0).deliveries;
        assert_eq!(
            chunk.len(),
            N - 4 + 1,
            "the store read returns the held copy too"
        );
        let uncut = Engine::encode_tail(&chunk, false, WALL_A);
        assert!(
            b.import_tail(13, "mover", &uncut, WALL_B).is_err(),
            "uncut, the new owner refuses the chunk (and so the whole tail)"
        );
        assert!(a.cut_moving_tail("mover", &mut chunk));
        assert_eq!(chunk.len(), N - 4);
        let bytes = Engine::encode_tail(&chunk, false, WALL_A);
        let (n, more, _) = b.import_tail(13, "mover", &bytes, WALL_B).unwrap();
        assert_eq!((n, more), (N - 4, false));
        assert!(b.import_finish(21, "mover"));
        bst.commit(&mut b, 13);
        let (present, got) = receive_all(&mut b, &mut bst, 14);
        assert!(present);
        assert_eq!(got, expected(N), "the whole tail, in order");
        // A chunk with nothing of the copy's beyond the tail is not cut.
        let mut tail_only = chunk.clone();
        assert!(!a.cut_moving_tail("mover", &mut tail_only));
        assert_eq!(tail_only.len(), N - 4);
    }

    #[test]
    fn a_lying_tail_chunk_is_refused_and_appends_nothing() {
        let (mut a, mut ast) = stored_node();
        offline_with_queue(&mut a, &mut ast, 8);
        let bytes = a.export_session(10, "mover", WALL_A, (2, 5)).unwrap();
        ast.commit(&mut a, 10);
        let (mut b, mut bst) = stored_node();
        let imported = b.import_session(11, "mover", &bytes, WALL_B).unwrap();
        assert!(a.read_moving_tail("mover", (2, 5), 1, imported.tail_from_seq, 8));
        let mut chunk = ast.commit(&mut a, 12).remove(0).deliveries;
        assert_eq!(chunk.len(), 4);
        // Out of order, below the tail, beyond the session's sequence numbers, QoS 0.
        let mut swapped = chunk.clone();
        swapped.swap(0, 1);
        let mut below = chunk.clone();
        below[0].seq = imported.tail_from_seq - 1;
        let mut beyond = chunk.clone();
        beyond[3].seq = u64::MAX - 1;
        let mut qos0 = chunk.clone();
        qos0[2].qos = QoS::AtMostOnce;
        for bad in [swapped, below, beyond, qos0] {
            let bytes = Engine::encode_tail(&bad, false, WALL_A);
            assert!(b.import_tail(12, "mover", &bytes, WALL_B).is_err());
        }
        for junk in [&b""[..], &[1, 0, 9, 9][..]] {
            assert!(b.import_tail(12, "mover", junk, WALL_B).is_err());
        }
        assert!(
            b.import_tail(
                12,
                "other",
                &Engine::encode_tail(&chunk, false, WALL_A),
                WALL_B
            )
            .is_err()
        );
        // The honest chunk still goes in after all that.
        chunk.truncate(4);
        let bytes = Engine::encode_tail(&chunk, false, WALL_A);
        assert_eq!(b.import_tail(12, "mover", &bytes, WALL_B).unwrap().0, 4);
        assert!(b.import_finish(21, "mover"));
        let (_, got) = receive_all(&mut b, &mut bst, 13);
        assert_eq!(got, expected(8));
    }

    /// Network scenario (CHAOS_SEED=75901, acknowledged messages lost): chaos-sub-2
    /// moved 1 -> 2 and back 2 -> 1 with a disk tail on node 2, while the other nodes
    /// still sent node 1 (from their hint stores) copies matched for it when it lived
    /// there. Node 1 dropped its ghost of the session at the import, while the
    /// session's subscriptions wait for the tail: such a copy arriving meanwhile matched
    /// nothing, and its batch was answered. The ghost now stays until the tail is in:
    /// the copy goes to node 2, whose ghost sends it back after the confirmation.
    #[test]
    fn a_copy_reaching_a_sessions_old_node_while_it_comes_back_with_a_disk_tail_follows_it() {
        use crate::mesh::{MeshMsg, PubId, ShardId};
        fn clustered(origin: u64) -> (Engine, StoreModel, ShardId) {
            let (mut e, st) = stored_node();
            let remote = e.enable_remote().expect("room for the remote id");
            e.set_origin(origin);
            (e, st, remote)
        }
        fn remote_out(e: &mut Engine, remote: ShardId) -> Vec<MeshMsg> {
            std::mem::take(&mut e.outbox[usize::from(remote)])
        }
        let (mut a, mut ast, ra) = clustered(7);
        offline_with_queue(&mut a, &mut ast, 2);
        // To node 2 (epoch 5), confirmed: node 1 keeps a ghost of it.
        let bytes = a.export_session(10, "mover", WALL_A, (2, 5)).unwrap();
        let window = a.moving_window("mover").unwrap();
        ast.commit(&mut a, 10);
        let (mut b, mut bst, rb) = clustered(8);
        b.import_session(11, "mover", &bytes, WALL_B).unwrap();
        assert!(b.import_window(11, "mover", &window));
        bst.commit(&mut b, 11);
        assert!(a.moving_done(12, "mover", (2, 5)));
        ast.commit(&mut a, 12);
        remote_out(&mut a, ra);
        // Node 2 queues more than its head holds, and hands the session back (epoch 9).
        let pubc = b.connect(13, connect_packet(ProtocolVersion::V5, "pb", true), false);
        for i in 2..13 {
            publish(&mut b, pubc, &format!("m{i}"), QoS::AtLeastOnce, i as u16);
            bst.commit(&mut b, 13);
        }
        remote_out(&mut b, rb);
        let back = b.export_session(14, "mover", WALL_B, (1, 9)).unwrap();
        let window = b.moving_window("mover").unwrap();
        bst.commit(&mut b, 14);
        let imported = a.import_session(15, "mover", &back, WALL_A).unwrap();
        assert!(imported.tail_count > 0);
        assert!(a.import_window(15, "mover", &window));
        ast.commit(&mut a, 15);
        // While the tail comes, a copy matched for the session while it lived here.
        let mut late = Publish::new(Str::from_static("t"), Bytes::from_static(b"late"));
        late.qos = QoS::AtLeastOnce;
        late.packet_id = 1;
        let message = super::super::message_from_publish(
            1,
            late,
            crate::message::SessionUid(0),
            ProtocolVersion::V5,
        );
        let id = PubId {
            origin: 5,
            shard: 0,
            seq: 1,
        };
        a.handle_mesh(
            16,
            ra,
            MeshMsg::Forwarded {
                message,
                mark: None,
                ack: None,
                id: Some(id),
                earlier_life: false,
                routes_index: 0,
            },
        );
        ast.commit(&mut a, 16);
        let to_b: Vec<MeshMsg> = remote_out(&mut a, ra)
            .into_iter()
            .filter(|m| matches!(m, MeshMsg::Redirect { node: 2, .. }))
            .collect();
        assert_eq!(
            to_b.len(),
            1,
            "the copy matched nothing here: answered, lost"
        );
        move_tail(
            (&mut b, &mut bst),
            (&mut a, &mut ast),
            (1, 9),
            imported.tail_from_seq,
        );
        // Node 2's ghost holds it until node 1 confirms, then sends it back.
        for m in to_b {
            b.handle_mesh(22, rb, m);
        }
        bst.commit(&mut b, 22);
        assert!(b.moving_done(23, "mover", (1, 9)));
        bst.commit(&mut b, 23);
        for m in remote_out(&mut b, rb) {
            if matches!(m, MeshMsg::Redirect { node: 1, .. }) {
                a.handle_mesh(24, ra, m);
            }
        }
        ast.commit(&mut a, 24);
        let (present, got) = receive_all(&mut a, &mut ast, 30);
        assert!(present);
        let mut want = expected(13);
        want.push("late".into());
        assert_eq!(got, want);
    }
}
