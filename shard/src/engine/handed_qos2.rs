//! An inbound QoS 2 publication whose PUBREC still waits when its session moves to
//! another node (`impl Engine`, issue 15; data-plane simulation seed 899;
//! docs/ARCHITECTURE.md "Cluster: publications around a moving session").
//!
//! A QoS 2 PUBLISH on node A that must reach another node gets its PUBREC only once
//! that node accepted it (the token in `pending_retains`). If the session moves to B
//! meanwhile, the original stays in A's forwarder, and the client re-sends the PUBLISH
//! (DUP) to B. B knows the packet id (the transfer carries it) but, before this module,
//! not that its PUBREC was still owed: it answered at once, the client completed the
//! exchange, and A crashed with the original in its queue: acknowledged, never
//! delivered. Now:
//!
//! - **A says which ids still wait.** The export notes every inbound id whose token
//!   is still pending and whose publication has a cluster-wide id
//!   ([`Engine::export_session`] keeps them here as [`Handed`]); the hand-out sends
//!   them beside the transfer ([`Engine::moving_pending`]), with A as their holder.
//! - **B holds the re-sent PUBLISH's PUBREC** ([`InboundQos2::pending`]) and asks the
//!   holder until it answers ([`Engine::inbound_forward_state`] there): *done* (every
//!   destination accepted the original: the PUBREC goes, [`Engine::inbound_forward_done`])
//!   or *unknown* (the holder restarted, or forgot it long after it was done: then B
//!   routes the re-sent PUBLISH itself, [`Engine::inbound_forward_lost`], with the
//!   original's id, and a shard whose marks show it handled that id skips it, so an
//!   original that did arrive before the holder died is not delivered twice).
//! - A session that moves on from B carries its pending ids on (same holder); one
//!   that A takes back gets its tokens back, so its re-sent PUBLISH waits as on one
//!   node.
//! - **An id A restored after a crash** with other nodes among those that may lack
//!   it (`InboundQos2::redeliver`: its forward died with the process) goes as
//!   pending too, with the original's id from A's store and no [`Handed`] entry: A
//!   answers *unknown* and B routes the re-send as a re-sent copy of the original
//!   (`moved::RESENT`), which a node that got the original skips (sim seeds 25, 71,
//!   and exactly once: 39, 116, 160 under `sync`). A's shards that have it were told
//!   so at restore. An id stored by an older build has no original's id: A gives it
//!   one at the export (at least once), and A's own shard skips the copy that comes
//!   back (its count covers the id).
//!
//! - **What survives a crash.** The pending state lives in memory; B stores a pending
//!   id as "other nodes may lack it" with the original's id (the record recovery
//!   writes after a crash), so B restarting before the holder's word routes the
//!   re-send again as a re-sent copy (sim seeds 1300, 1321 under `sync`), to
//!   every shard of B whose marks do not cover the original, the publisher's own
//!   included (`exactly_once::redeliver`; it used to skip that one, cause B′ of
//!   the `sync` triage), and the word *done* stores it as resolved. A moving copy keeps the redelivery sets of
//!   ids restored after a crash, and a take-back restores them (seed 969): the
//!   export does not carry them.
//!
//! Bounds: a holder that
//! never answers again (dead and never restarted) leaves the id unacknowledged (the
//! client keeps it in flight; nothing is acknowledged that was not delivered); an
//! original still in flight on the network when its holder died and arriving after
//! the re-routed copy is delivered twice. A session taken over while its old owner
//! was down had no export: the client gets a new session (CONNACK session present
//! 0), and a re-send it makes anyway is a new publication there, at least once (the
//! original's id is in the old owner's store only; docs/ARCHITECTURE.md, *A session
//! B took over while A was down*).

use tessera_proto::{Packet, PubRec, Str};

use super::Engine;
use super::moved::MOVED_WINDOW_MS;
use crate::mesh::{PubId, ShardId};
use crate::session::{ConnId, PendingForward, SessionIdx};
use crate::trie::ShardSet;

/// How long the old owner still answers about a handed-over publication after its
/// forward completed: the new owner asks right after it took the session in.
const HANDED_KEEP_MS: u64 = MOVED_WINDOW_MS;
/// Bytes of one pending id on the wire: packet id, holder, origin, shard, seq.
const PENDING_LEN: usize = 2 + 8 + 8 + 2 + 8;
/// Pending ids one transfer may carry (a session has at most 65,535 inbound ids).
const PENDING_MAX: usize = 65_535;

/// An inbound QoS 2 publication of a session this shard handed to another node while
/// its forward still waited.
#[derive(Debug)]
pub(super) struct Handed {
    client_id: Str,
    packet_id: u16,
    id: PubId,
    /// The publisher's token (`pending_retains`) the original's PUBREC waited for.
    token: u64,
    /// When its forward was first seen complete (engine ms), for expiry.
    done_at_ms: Option<u64>,
}

/// A pending id a session carries on: (packet id, holder node, original's id).
pub(super) type Relayed = (u16, u64, PubId);

/// An inbound id restored after a crash with the shards (the remote id among them:
/// other nodes) that may lack its publication, kept with a moving copy so that a
/// take-back restores it: (packet id, shards, original's id).
pub(super) type Redeliver = (u16, ShardSet, Option<PubId>);

/// The holder of a [`Relayed`] id given at the export for an id restored after a
/// crash (see `hand_inbound`): this node, whose number `pending_for` puts in.
const HOLDER_THIS_NODE: u64 = u64::MAX;

/// Encodes `ids` for the transfer: `count u32 | (packet_id u16, holder u64, origin
/// u64, shard u16, seq u64)*`, big-endian.
pub(super) fn encode_pending(ids: &[Relayed]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + ids.len() * PENDING_LEN);
    out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
    for (packet_id, holder, id) in ids {
        out.extend_from_slice(&packet_id.to_be_bytes());
        out.extend_from_slice(&holder.to_be_bytes());
        out.extend_from_slice(&id.origin.to_be_bytes());
        out.extend_from_slice(&id.shard.to_be_bytes());
        out.extend_from_slice(&id.seq.to_be_bytes());
    }
    out
}

/// Decodes [`encode_pending`]; untrusted: every length is checked, packet id 0 and
/// an origin of 0 are refused.
pub(super) fn decode_pending(b: &[u8]) -> Option<Vec<Relayed>> {
    let n = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let rest = &b[4..];
    if n > PENDING_MAX || rest.len() != n.checked_mul(PENDING_LEN)? {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for e in rest.chunks_exact(PENDING_LEN) {
        let packet_id = u16::from_be_bytes(e[..2].try_into().ok()?);
        let holder = u64::from_be_bytes(e[2..10].try_into().ok()?);
        let origin = u64::from_be_bytes(e[10..18].try_into().ok()?);
        let shard = ShardId::from_be_bytes(e[18..20].try_into().ok()?);
        let seq = u64::from_be_bytes(e[20..28].try_into().ok()?);
        if packet_id == 0 || origin == 0 {
            return None;
        }
        out.push((packet_id, holder, PubId { origin, shard, seq }));
    }
    Some(out)
}

impl Engine {
    /// At the export of session `idx`: its inbound ids whose PUBREC still waits for
    /// other nodes are remembered here (the new owner asks about them), and the ones
    /// it carried in from an older owner are returned, to go on with it.
    pub(super) fn hand_inbound(&mut self, idx: SessionIdx) -> Vec<Relayed> {
        let s = self.session(idx);
        let client_id = s.client_id.clone();
        let mut relayed = Vec::new();
        let mut handed = Vec::new();
        let remote = self.remote;
        let mut orphans = Vec::new();
        for e in &s.inbound_qos2 {
            if let Some(p) = &e.pending {
                relayed.push((e.packet_id, p.holder, p.id));
            } else if e.token.is_none()
                && let (Some(set), Some(remote)) = (e.redeliver.as_deref(), remote)
                && set.contains(remote)
            {
                orphans.push((e.packet_id, e.id));
            } else if let (Some(id), Some(token)) = (e.id, e.token)
                && self
                    .pending_retains
                    .get(&token)
                    .is_some_and(|(_, n)| *n > 0)
            {
                handed.push(Handed {
                    client_id: client_id.clone(),
                    packet_id: e.packet_id,
                    id,
                    token,
                    done_at_ms: None,
                });
            }
        }
        // A newer hand-over of the same ids replaces an older one.
        self.handed.retain(|h| {
            h.client_id != client_id || !handed.iter().any(|n| n.packet_id == h.packet_id)
        });
        self.handed.extend(handed);
        // Restored after a crash with other nodes among those that may lack the
        // publication (the forwarder's queue died with the process): the new owner
        // must route the re-send, or the PUBREC it answers acknowledges a message
        // that never left (sim seeds 17, 71, ... under `sync`). This node is their
        // holder and answers *unknown* for them, so the new owner routes the re-sent
        // PUBLISH with the id given here: one of this shard's own, so this shard
        // (which delivered it in the id's commit) skips the copy that comes back.
        // With the original's id when it was stored (cause A of the `sync` failures:
        // a node that got the original before this one crashed skips the re-send,
        // and this node's shards that have it were told so at restore); else one
        // given here, as before: at least once on other nodes.
        for (packet_id, original) in orphans {
            let id = original.or_else(|| {
                let (current, given) = (self.moved.current, self.moved.given);
                let id = self.new_pub_id(tessera_proto::QoS::ExactlyOnce);
                (self.moved.current, self.moved.given) = (current, given);
                id
            });
            if let Some(id) = id {
                relayed.push((packet_id, HOLDER_THIS_NODE, id));
            }
        }
        relayed
    }

    /// The pending ids of `client_id`'s moving copy for the node it is handed to:
    /// this shard's own (holder `me`) while their forward still waits, and those it
    /// carried in.
    pub(super) fn pending_for(&self, client_id: &Str, me: u64, relayed: &[Relayed]) -> Vec<u8> {
        let mut ids: Vec<Relayed> = self
            .handed
            .iter()
            .filter(|h| &h.client_id == client_id && self.pending_retains.contains_key(&h.token))
            .map(|h| (h.packet_id, me, h.id))
            .collect();
        ids.extend(relayed.iter().map(|&(packet_id, holder, id)| {
            let holder = if holder == HOLDER_THIS_NODE {
                me
            } else {
                holder
            };
            (packet_id, holder, id)
        }));
        encode_pending(&ids)
    }

    /// Whether the forward of `client_id`'s inbound publication `packet_id` with id
    /// `id`, handed over from here, is complete: `Some(true)` done, `Some(false)` still
    /// waiting, `None` unknown here (never handed from this process, or forgotten
    /// [`HANDED_KEEP_MS`] after it was done).
    pub fn inbound_forward_state(
        &mut self,
        now_ms: u64,
        client_id: &str,
        packet_id: u16,
        id: PubId,
    ) -> Option<bool> {
        let pending = &self.pending_retains;
        let h = self
            .handed
            .iter_mut()
            .find(|h| h.client_id == client_id && h.packet_id == packet_id && h.id == id)?;
        if pending.contains_key(&h.token) {
            return Some(false);
        }
        h.done_at_ms.get_or_insert(now_ms);
        Some(true)
    }

    /// Forgets handed-over publications done for [`HANDED_KEEP_MS`].
    pub(super) fn expire_handed(&mut self, now_ms: u64) {
        let pending = &self.pending_retains;
        self.handed.retain_mut(|h| {
            if pending.contains_key(&h.token) {
                return true;
            }
            let done = *h.done_at_ms.get_or_insert(now_ms);
            now_ms < done.saturating_add(HANDED_KEEP_MS)
        });
    }

    /// The redelivery sets of session `idx`'s inbound ids (restored after a crash),
    /// for its moving copy: the export does not carry them.
    pub(super) fn redeliver_sets(&self, idx: SessionIdx) -> Vec<Redeliver> {
        self.session(idx)
            .inbound_qos2
            .iter()
            .filter_map(|e| Some((e.packet_id, **e.redeliver.as_ref()?, e.id)))
            .collect()
    }

    /// This shard takes its own moving copy of session `idx` back: the ids it handed
    /// out wait for their tokens again (a re-sent PUBLISH's PUBREC is held as on one
    /// node), those it had carried in from an older owner are pending again, and
    /// those restored after a crash with shards or nodes that may lack them
    /// (`redeliver`) get that set back, in memory and in the store (the take-in
    /// rewrote their records as resolved): their re-sent PUBLISH is routed again
    /// as on a node the session never left. Before, the set did not come back and
    /// the re-send was answered at once: acknowledged, while the forward that the
    /// crash took never left (`sync` sim seed 969).
    pub(super) fn take_back_inbound(
        &mut self,
        idx: SessionIdx,
        relayed: &[Relayed],
        redeliver: Vec<Redeliver>,
    ) {
        let client_id = self.session(idx).client_id.clone();
        let mine: Vec<Handed> = {
            let (mine, rest): (Vec<Handed>, Vec<Handed>) = std::mem::take(&mut self.handed)
                .into_iter()
                .partition(|h| h.client_id == client_id);
            self.handed = rest;
            mine
        };
        for h in mine {
            let live = self.pending_retains.contains_key(&h.token);
            let s = self.session_mut(idx);
            if let Some(pos) = s.inbound_position(h.packet_id) {
                let e = &mut s.inbound_qos2[pos];
                e.id = Some(h.id);
                e.token = live.then_some(h.token);
                // The take-in stored the id as resolved; its forward still waits,
                // and a crash now takes it: stored as maybe lacking, as a pending id.
                if live {
                    self.persist_maybe_lacking(idx, h.packet_id, h.id);
                }
            }
        }
        for (packet_id, set, id) in redeliver {
            let s = self.session_mut(idx);
            let Some(pos) = s.inbound_position(packet_id) else {
                continue;
            };
            let e = &mut s.inbound_qos2[pos];
            e.redeliver = Some(Box::new(set));
            e.id = id.or(e.id);
            self.persist_inbound(idx, packet_id, Some((0, Some(set))), id);
        }
        // Ids restored with a redelivery set this node answers about itself: the set
        // came back above.
        let relayed: Vec<Relayed> = relayed
            .iter()
            .copied()
            .filter(|&(_, holder, _)| holder != HOLDER_THIS_NODE)
            .collect();
        self.set_pending(idx, &relayed);
    }

    /// The pending ids the old owner sent beside the transfer of `client_id`
    /// ([`Engine::moving_pending`]): their re-sent PUBLISH waits for the holder's word.
    /// Malformed bytes are refused and change nothing.
    pub fn import_pending(&mut self, client_id: &str, bytes: &[u8]) -> bool {
        let Some(ids) = decode_pending(bytes) else {
            return false;
        };
        let Some(idx) = self.session_idx(client_id) else {
            return false;
        };
        self.set_pending(idx, &ids);
        true
    }

    /// Ids `ids` of session `idx` wait for their holder's word. Each is stored as
    /// "other nodes may lack it", with the original's id: the word lives in this
    /// process's memory, and a crash here before it came (or before a re-send
    /// this node routed in its place left) would otherwise restore the id as
    /// resolved and answer the next re-send at once, acknowledging a publication
    /// whose forward died with the holder (`sync` sim seeds 1300, 1321). Restored
    /// so, the re-send is routed again as a re-sent copy of the original
    /// (`exactly_once::redeliver`), which a node or shard that got the original
    /// skips. The set names this node's shards too: recovery takes a shard outside
    /// the set for one that has the publication (it delivered it in the id's
    /// commit, on the node that routed it), which is not so here, where the
    /// original was routed by another node; a shard told so passes the id on in
    /// the window of a session that moves off it, and the new owner drops the
    /// session's queued copy of it (seed 842, with the first version of this).
    fn set_pending(&mut self, idx: SessionIdx, ids: &[Relayed]) {
        for &(packet_id, holder, id) in ids {
            let s = self.session_mut(idx);
            let Some(pos) = s.inbound_position(packet_id) else {
                continue;
            };
            let e = &mut s.inbound_qos2[pos];
            e.id = Some(id);
            e.token = None;
            e.pending = Some(Box::new(PendingForward {
                holder,
                id,
                lost: false,
                resent: None,
            }));
            self.persist_maybe_lacking(idx, packet_id, id);
        }
    }

    /// Stores session `idx`'s inbound `packet_id` as maybe lacking on every shard of
    /// this node and on the other nodes, with the original's id `id` (see
    /// [`Engine::set_pending`]): what recovery writes for an id whose forward died
    /// with the process.
    fn persist_maybe_lacking(&mut self, idx: SessionIdx, packet_id: u16, id: PubId) {
        let Some(remote) = self.remote else {
            return;
        };
        let mut set = ShardSet::new();
        for k in 0..self.shard_count {
            set.insert(k as ShardId);
        }
        set.insert(remote);
        self.persist_inbound(idx, packet_id, Some((0, Some(set))), Some(id));
    }

    /// The inbound ids of `client_id` still waiting for their holder's word: (packet
    /// id, holder node, original's id), in the order of the originals' ids. The new
    /// owner asks (and routes what the holder forgot) in that order: a shard skips a
    /// re-routed copy its marks cover, so one routed after a later one of the same
    /// origin and class would be skipped as handled (sim seed 1431). The session's
    /// list is in no order (a completed id is swap-removed).
    pub fn pending_inbound(&self, client_id: &str) -> Vec<(u16, u64, PubId)> {
        let Some(idx) = self.session_idx(client_id) else {
            return Vec::new();
        };
        let mut pending: Vec<(u16, u64, PubId)> = self
            .session(idx)
            .inbound_qos2
            .iter()
            .filter_map(|e| {
                let p = e.pending.as_deref()?;
                (!p.lost).then_some((e.packet_id, p.holder, p.id))
            })
            .collect();
        pending.sort_unstable_by_key(|&(_, _, id)| super::moved::original(id));
        pending
    }

    /// The pending entry of `client_id`'s inbound `packet_id` for the original `id`:
    /// its session's connection and the entry's slot (which holds it).
    fn pending_entry(
        &mut self,
        client_id: &str,
        packet_id: u16,
        id: PubId,
    ) -> Option<(Option<ConnId>, &mut Option<Box<PendingForward>>)> {
        let idx = self.session_idx(client_id)?;
        let conn = self.session(idx).conn;
        let s = self.session_mut(idx);
        let pos = s.inbound_position(packet_id)?;
        let slot = &mut s.inbound_qos2[pos].pending;
        slot.as_deref()
            .is_some_and(|p| p.id == id && !p.lost)
            .then_some((conn, slot))
    }

    /// The holder says the original of `client_id`'s inbound `packet_id` reached
    /// every destination: a re-sent PUBLISH that waits gets its PUBREC, a later one
    /// gets it at once.
    pub fn inbound_forward_done(&mut self, client_id: &str, packet_id: u16, id: PubId) {
        let Some((conn, slot)) = self.pending_entry(client_id, packet_id, id) else {
            return;
        };
        let resent = slot.take().and_then(|p| p.resent);
        // Every destination has it: resolved in the store too (`set_pending`).
        if let Some(idx) = self.session_idx(client_id) {
            self.persist_inbound(idx, packet_id, Some((0, None)), None);
        }
        if let Some((c, _)) = resent
            && conn == Some(c)
        {
            self.send_ack(c, Packet::PubRec(PubRec::new(packet_id)), None);
        }
    }

    /// The holder no longer knows the original of `client_id`'s inbound `packet_id`
    /// (it restarted): the re-sent PUBLISH is routed from here with the original's id
    /// (now, if one waits; else when the client sends it again).
    pub fn inbound_forward_lost(
        &mut self,
        now_ms: u64,
        client_id: &str,
        packet_id: u16,
        id: PubId,
    ) {
        let Some((conn, Some(p))) = self.pending_entry(client_id, packet_id, id) else {
            return;
        };
        p.lost = true;
        if let Some((c, publish)) = p.resent.take()
            && conn == Some(c)
        {
            tracing::debug!(
                shard = self.shard,
                client_id,
                packet_id,
                "the node holding a QoS 2 original forgot it: its re-sent PUBLISH is routed here"
            );
            self.handle_packet(now_ms, c, Packet::Publish(publish));
        }
    }
}

#[cfg(test)]
mod tests {
    //! Goal: a QoS 2 publication whose PUBREC waited for another node when its session
    //! moved is acknowledged on the new node only once the original arrived, or is
    //! routed from the new node with the original's id when the old node forgot it
    //! (and a node that got the original does not deliver it again).

    use bytes::Bytes;
    use tessera_proto::{Packet, ProtocolVersion, PubComp, PubRec, PubRel, Publish, QoS, Str};

    use super::super::testing::{
        Dir, StoredNode, boot, commit, connect_packet, crash, drain, engines, routed_elsewhere,
        subscribe_packet, temp_dir_in,
    };
    use super::super::{Engine, Limits};
    use super::*;
    use crate::mesh::MeshMsg;
    use crate::session::ConnId;

    const V: ProtocolVersion = ProtocolVersion::V3_1_1;

    fn remote_out(e: &mut Engine) -> Vec<MeshMsg> {
        let r = usize::from(e.remote_id().expect("remote"));
        std::mem::take(&mut e.outbox[r])
    }

    /// A cluster engine with origin `origin` to which another node routes "t".
    fn node(origin: u64) -> Engine {
        let mut e = engines(1, &Limits::default()).remove(0);
        e.enable_remote().expect("room for the remote id");
        e.set_origin(origin);
        routed_elsewhere(&mut e, "t");
        e
    }

    fn publish(packet_id: u16, dup: bool) -> Packet {
        let mut p = Publish::new(Str::from_static("t"), Bytes::from_static(b"x"));
        p.qos = QoS::ExactlyOnce;
        p.packet_id = packet_id;
        p.dup = dup;
        Packet::Publish(p)
    }

    /// The publisher's token and the publication's id of the one `PublishRemote` sent.
    fn sent_remote(e: &mut Engine) -> (u64, PubId) {
        match &remote_out(e)[..] {
            [
                MeshMsg::PublishRemote {
                    ack: Some(t),
                    id: Some(id),
                    ..
                },
            ] => (*t, *id),
            other => panic!("expected one PublishRemote, got {other:?}"),
        }
    }

    /// Node A (origin 7, node id 1) takes publisher "p"'s QoS 2 PUBLISH 3, whose
    /// forward waits, and hands the session to node 2: the export, the pending ids,
    /// the publisher's token and the publication's id.
    fn moved_while_waiting(a: &mut Engine) -> (Vec<u8>, Vec<u8>, u64, PubId) {
        let p = a.connect(1, connect_packet(V, "p", false), false);
        drain(a, p, V);
        a.handle_packet(2, p, publish(3, false));
        let (token, id) = sent_remote(a);
        assert!(drain(a, p, V).is_empty(), "PUBREC before the other node");
        let bytes = a.export_session(3, "p", 0, (2, 9)).expect("a session");
        let pending = a.moving_pending("p", 1).expect("a moving copy");
        assert_eq!(decode_pending(&pending), Some(vec![(3, 1, id)]));
        (bytes, pending, token, id)
    }

    /// Node B (origin 8) takes the session in and the client re-sends PUBLISH 3.
    fn resent_on(b: &mut Engine, bytes: &[u8], pending: &[u8]) -> ConnId {
        b.import_session(4, "p", bytes, 0).expect("taken in");
        assert!(b.import_pending("p", pending));
        let c = b.connect(5, connect_packet(V, "p", false), false);
        drain(b, c, V);
        b.handle_packet(5, c, publish(3, true));
        c
    }

    /// Node A (origin 7) after a restart: session "p" with inbound QoS 2 packet id 3
    /// restored as maybe lacking on the other nodes (with its original's id, if the
    /// record kept one). Returns A, its remote id and the session.
    fn restored_maybe_lacking(original: Option<PubId>) -> (Engine, ShardId, SessionIdx) {
        let mut a = node(7);
        let p = a.connect(1, connect_packet(V, "p", false), false);
        drain(&mut a, p, V);
        let remote = a.remote_id().expect("remote");
        let mut lacking = crate::trie::ShardSet::new();
        lacking.insert(remote);
        let idx = a.session_idx("p").expect("the session");
        a.session_mut(idx)
            .inbound_qos2
            .push(crate::session::InboundQos2::restored(3, lacking, original));
        (a, remote, idx)
    }

    /// A node whose subscriber got the original (`original`) skips the copy routed in
    /// its place (`routed`); one that never got it delivers it.
    fn another_node_gets_the_routed_copy_once(original: PubId, routed: PubId) {
        let forwarded = |id| MeshMsg::Forwarded {
            message: super::super::message_from_publish(
                1,
                Publish::new(Str::from_static("t"), Bytes::from_static(b"x")),
                crate::message::SessionUid(0),
                V,
            ),
            mark: None,
            ack: None,
            id: Some(id),
            earlier_life: false,
            routes_index: 0,
        };
        for got_original in [true, false] {
            let mut n = node(9);
            let remote = n.remote_id().expect("remote");
            let s = n.connect(1, connect_packet(V, "s", false), false);
            n.handle_packet(1, s, subscribe_packet("t", QoS::ExactlyOnce));
            drain(&mut n, s, V);
            if got_original {
                n.handle_mesh(2, remote, forwarded(original));
                assert_eq!(drain(&mut n, s, V).len(), 1);
            }
            n.handle_mesh(3, remote, forwarded(routed));
            let again = drain(&mut n, s, V);
            assert_eq!(again.len(), usize::from(!got_original), "{again:?}");
        }
    }

    #[test]
    fn a_re_sent_publish_waits_on_the_new_node_until_the_old_node_delivered_the_original() {
        let mut a = node(7);
        let (bytes, pending, token, id) = moved_while_waiting(&mut a);
        let mut b = node(8);
        let c = resent_on(&mut b, &bytes, &pending);
        assert!(
            drain(&mut b, c, V).is_empty(),
            "PUBREC while the original may still be lost on the old node"
        );
        assert!(remote_out(&mut b).is_empty(), "routed again while A has it");
        assert_eq!(b.pending_inbound("p"), vec![(3, 1, id)]);
        assert_eq!(a.inbound_forward_state(6, "p", 3, id), Some(false));
        // The other node accepted the original.
        let remote = a.remote_id().expect("remote");
        a.handle_mesh(6, remote, MeshMsg::Ack { token });
        assert_eq!(a.inbound_forward_state(6, "p", 3, id), Some(true));
        b.inbound_forward_done("p", 3, id);
        assert_eq!(drain(&mut b, c, V), vec![Packet::PubRec(PubRec::new(3))]);
        assert!(b.pending_inbound("p").is_empty());
        b.handle_packet(7, c, Packet::PubRel(PubRel::new(3)));
        assert_eq!(drain(&mut b, c, V), vec![Packet::PubComp(PubComp::new(3))]);
        // Forgotten once done for the keep time; an unknown id is unknown.
        a.expire_moved(6 + HANDED_KEEP_MS);
        assert_eq!(a.inbound_forward_state(7, "p", 3, id), None);
    }

    /// Sim seeds 25, 71 under `sync` (and the losses of 17, 116, 154, 187, 201, 209,
    /// 252, 272): node A crashed while a QoS 2 publication's forward waited, and
    /// restored the packet id with the other nodes among the shards that may lack it
    /// (the forwarder's queue died with the process). The session then moved to B:
    /// the transfer carried the packet id only, B answered the re-sent PUBLISH at
    /// once, and the publication never left. Now A hands the id over as pending with
    /// itself as the holder (it answers *unknown*) and an id of its own, so B routes
    /// the re-send, and the copy that comes back to A is skipped there (A delivered
    /// it in the id's commit).
    #[test]
    fn an_id_restored_as_maybe_lacking_on_other_nodes_is_routed_by_the_new_owner() {
        let (mut a, remote, idx) = restored_maybe_lacking(None);
        // And one restored with no other node lacking it: answered at once on B.
        a.session_mut(idx)
            .inbound_qos2
            .push(crate::session::InboundQos2::new(4));
        let bytes = a.export_session(3, "p", 0, (2, 9)).expect("a session");
        let pending = a.moving_pending("p", 1).expect("a moving copy");
        let ids = decode_pending(&pending).expect("well-formed");
        let [(3, 1, id)] = ids[..] else {
            panic!("expected packet id 3 held by node 1, got {ids:?}");
        };
        assert_eq!((id.origin, id.shard), (7, a.shard), "one of A's own ids");
        assert_eq!(a.inbound_forward_state(4, "p", 3, id), None, "unknown on A");

        let mut b = node(8);
        let c = resent_on(&mut b, &bytes, &pending);
        assert!(
            drain(&mut b, c, V).is_empty(),
            "PUBREC before the re-send was routed"
        );
        b.inbound_forward_lost(6, "p", 3, id);
        let (token, routed) = sent_remote(&mut b);
        assert_eq!(routed, super::super::moved::resent(id));
        b.handle_mesh(7, remote, MeshMsg::Ack { token });
        assert_eq!(drain(&mut b, c, V), vec![Packet::PubRec(PubRec::new(3))]);
        b.handle_packet(8, c, publish(4, true));
        assert_eq!(drain(&mut b, c, V), vec![Packet::PubRec(PubRec::new(4))]);
        assert!(remote_out(&mut b).is_empty(), "packet id 4 is not routed");
        // The copy B routed reaches A again: A handled it (its own id).
        assert!(a.pub_id_handled(id));
    }

    /// Cause A with a move (session 15; the QoS 2 duplicates of sim seeds 39, 77, 132,
    /// 160, 297 and the former losses of cause B under `sync`): A restored the id with
    /// the original's id from its store, so it hands that id over (not one of its own),
    /// and B routes the re-send as a re-sent copy of it: a node that got the original
    /// before A crashed skips it, one that did not delivers it, and A's shard, told at
    /// restore that it has the publication, skips it too.
    #[test]
    fn an_id_restored_with_its_originals_id_is_routed_by_the_new_owner_with_that_id() {
        use super::super::moved::resent;

        // The original, routed by A's earlier life (origin 6).
        let original = PubId {
            origin: 6,
            shard: 0,
            seq: (3 << 62) | 12,
        };
        let (mut a, remote, _) = restored_maybe_lacking(Some(original));
        a.note_resent_handled(original);
        let bytes = a.export_session(3, "p", 0, (2, 9)).expect("a session");
        let pending = a.moving_pending("p", 1).expect("a moving copy");
        assert_eq!(decode_pending(&pending), Some(vec![(3, 1, original)]));
        assert_eq!(a.inbound_forward_state(4, "p", 3, original), None);

        let mut b = node(8);
        let c = resent_on(&mut b, &bytes, &pending);
        b.inbound_forward_lost(6, "p", 3, original);
        let (token, routed) = sent_remote(&mut b);
        assert_eq!(routed, resent(original), "a re-sent copy of the original");
        b.handle_mesh(7, remote, MeshMsg::Ack { token });
        assert_eq!(drain(&mut b, c, V), vec![Packet::PubRec(PubRec::new(3))]);
        assert!(a.pub_id_handled(routed), "A's shard has it");

        another_node_gets_the_routed_copy_once(original, routed);
    }

    #[test]
    fn a_re_sent_publish_is_routed_with_the_originals_id_when_the_old_node_forgot_it() {
        let mut a = node(7);
        let (bytes, pending, _token, id) = moved_while_waiting(&mut a);
        let mut b = node(8);
        let c = resent_on(&mut b, &bytes, &pending);
        assert!(drain(&mut b, c, V).is_empty());
        // A restarted: it does not know the original any more.
        b.inbound_forward_lost(6, "p", 3, id);
        let (token, routed) = sent_remote(&mut b);
        assert_eq!(
            routed,
            super::super::moved::resent(id),
            "routed with the original's id, as a re-sent copy"
        );
        assert!(
            drain(&mut b, c, V).is_empty(),
            "PUBREC before it is accepted"
        );
        let remote = b.remote_id().expect("remote");
        b.handle_mesh(7, remote, MeshMsg::Ack { token });
        assert_eq!(drain(&mut b, c, V), vec![Packet::PubRec(PubRec::new(3))]);

        // A node whose subscriber got the original before A died skips the re-routed
        // copy; one that never got it delivers it.
        another_node_gets_the_routed_copy_once(id, routed);
    }

    #[test]
    fn pending_ids_are_asked_about_in_the_order_of_their_originals() {
        // Sim seed 1431: the new owner routed re-sent PUBLISHes 4, 6, 5 (its list had
        // swap-removed 4 when it completed); the subscriber's shard, its mark raised by
        // 6, skipped 5 as handled: acknowledged, never delivered.
        let mut a = node(7);
        let p = a.connect(1, connect_packet(V, "p", false), false);
        drain(&mut a, p, V);
        let mut ids = Vec::new();
        for packet_id in [3, 4, 5] {
            a.handle_packet(2, p, publish(packet_id, false));
            ids.push(sent_remote(&mut a).1);
        }
        let bytes = a.export_session(3, "p", 0, (2, 9)).expect("a session");
        let pending = a.moving_pending("p", 1).expect("a moving copy");
        let mut b = node(8);
        b.import_session(4, "p", &bytes, 0).expect("taken in");
        assert!(b.import_pending("p", &pending));
        let c = b.connect(5, connect_packet(V, "p", false), false);
        drain(&mut b, c, V);
        for packet_id in [3, 4, 5] {
            b.handle_packet(5, c, publish(packet_id, true));
        }
        // A forgot the first: routed from B, accepted, and the client completes it.
        b.inbound_forward_lost(6, "p", 3, ids[0]);
        let (token, _) = sent_remote(&mut b);
        let remote = b.remote_id().expect("remote");
        b.handle_mesh(7, remote, MeshMsg::Ack { token });
        assert_eq!(drain(&mut b, c, V), vec![Packet::PubRec(PubRec::new(3))]);
        b.handle_packet(8, c, Packet::PubRel(PubRel::new(3)));
        assert_eq!(drain(&mut b, c, V), vec![Packet::PubComp(PubComp::new(3))]);
        assert_eq!(
            b.pending_inbound("p"),
            vec![(4, 1, ids[1]), (5, 1, ids[2])],
            "the rest in their originals' order"
        );
    }

    #[test]
    fn a_session_taken_back_holds_its_re_sent_publish_for_its_own_token_again() {
        let mut a = node(7);
        let (_, _, token, _) = moved_while_waiting(&mut a);
        assert!(a.resume_moving(4, "p", 0).expect("its own copy"));
        let c = a.connect(5, connect_packet(V, "p", false), false);
        drain(&mut a, c, V);
        a.handle_packet(5, c, publish(3, true));
        assert!(
            drain(&mut a, c, V).is_empty(),
            "PUBREC before the other node"
        );
        let remote = a.remote_id().expect("remote");
        a.handle_mesh(6, remote, MeshMsg::Ack { token });
        assert_eq!(drain(&mut a, c, V), vec![Packet::PubRec(PubRec::new(3))]);
    }

    /// "p"'s session is exported for node 2 and taken back here before the move
    /// was confirmed (its own moving copy resumed), each step committed.
    fn take_back(a: &mut Engine, env: &crate::store::StoreEnv) {
        a.export_session(3, "p", 0, (2, 9)).expect("a session");
        commit(a, env);
        assert!(a.resume_moving(4, "p", 0).expect("its own copy"));
        commit(a, env);
    }

    /// A store-backed node (`testing::boot`, `sync` durability) with origin `origin`
    /// to which another node routes "t".
    fn stored_node(dir: &Dir, origin: u64) -> StoredNode {
        let (mut e, remote, env, lock) = boot(dir, origin);
        routed_elsewhere(&mut e, "t");
        (e, remote, env, lock)
    }

    /// A store-backed node A (origin 6, store on `dir`) whose stored publisher "p"
    /// sent QoS 2 PUBLISH 3, routed to another node that has not answered: A and
    /// the original's id.
    fn published_waiting(dir: &Dir) -> (StoredNode, PubId) {
        let (mut a, remote, env, lock) = stored_node(dir, 6);
        let p = a.connect(1, connect_packet(V, "p", false), false);
        drain(&mut a, p, V);
        a.handle_packet(2, p, publish(3, false));
        commit(&mut a, &env);
        let (_, original) = sent_remote(&mut a);
        assert!(
            drain(&mut a, p, V).is_empty(),
            "PUBREC before the other node"
        );
        ((a, remote, env, lock), original)
    }

    /// Node B (store on `dir`) takes "p" in from A with packet id 3 pending there
    /// (`moved_while_waiting`), hears A's *done* if `done`, crashes and restarts:
    /// B restarted, its store, its lock and the original's id.
    fn pending_on_b_across_a_crash(
        dir: &Dir,
        done: bool,
    ) -> (Engine, crate::store::StoreEnv, crate::store::DirLock, PubId) {
        let mut a = node(7);
        let (bytes, pending, _token, id) = moved_while_waiting(&mut a);
        let (mut b, _, env, lock) = stored_node(dir, 8);
        b.import_session(4, "p", &bytes, 0).expect("taken in");
        assert!(b.import_pending("p", &pending));
        if done {
            b.inbound_forward_done("p", 3, id);
        }
        commit(&mut b, &env);
        crash(b, env, lock);
        let (b, _, env, lock) = stored_node(dir, 9);
        (b, env, lock, id)
    }

    /// The client re-sends PUBLISH 3 on `e` (store on `env`): it is routed to the
    /// other nodes as a re-sent copy of `original`, and its PUBREC waits until they
    /// accepted it.
    fn resend_is_routed_again(e: &mut Engine, env: &crate::store::StoreEnv, original: PubId) {
        let remote = e.remote_id().expect("remote");
        let c = e.connect(5, connect_packet(V, "p", false), false);
        drain(e, c, V);
        e.handle_packet(5, c, publish(3, true));
        commit(e, env);
        assert!(
            drain(e, c, V).is_empty(),
            "PUBREC before the re-send was routed"
        );
        let (token, routed) = sent_remote(e);
        assert_eq!(routed, super::super::moved::resent(original));
        e.handle_mesh(6, remote, MeshMsg::Ack { token });
        commit(e, env);
        assert_eq!(drain(e, c, V), vec![Packet::PubRec(PubRec::new(3))]);
    }

    /// Sim seed 969 under `sync`: node A crashed while a QoS 2 publication's forward
    /// waited; restarted, it parked the session as a moving copy for another node's
    /// claim, which never confirmed, and took it back. The take-back rebuilt the
    /// session from its export, which does not carry the ids' redelivery sets: the
    /// re-sent PUBLISH was answered at once and the publication never left.
    #[test]
    fn a_session_taken_back_after_a_restart_routes_the_re_send_other_nodes_may_lack() {
        let dir = temp_dir_in("handed_qos2", "taken-back");
        let ((a, _, env, lock), original) = published_waiting(&dir);
        crash(a, env, lock);

        let (mut a, _, env, _lock) = stored_node(&dir, 7);
        take_back(&mut a, &env);
        resend_is_routed_again(&mut a, &env, original);
    }

    /// Sim seeds 1300 and 1321 under `sync`: B took the session in while the
    /// original's forward still waited on A (a pending id) and crashed before A's
    /// word; the id was stored as resolved at the import, so after B's restart the
    /// re-sent PUBLISH was answered at once, though A (crashed too) never forwarded
    /// the original. Now the pending id is stored as "other nodes may lack it".
    #[test]
    fn an_id_pending_when_its_new_owner_crashes_is_routed_again_after_the_restart() {
        let dir = temp_dir_in("handed_qos2", "pending-crash");
        let (mut b, env, _lock, id) = pending_on_b_across_a_crash(&dir, false);
        // B's shard never delivered the original (A routed it): it must not count
        // it as handled, or a session moving off B would take that on in its
        // window and its new owner would drop the session's copy (sim seed 842).
        assert!(
            !b.pub_id_handled(id),
            "B's shard does not have the original"
        );
        resend_is_routed_again(&mut b, &env, id);
    }

    /// A take-back of a session whose QoS 2 forward still waits (its token live):
    /// the take-in stored the id as resolved, so a crash before the forward left
    /// made the re-send after the restart look done: answered at once, never
    /// delivered (found by h660 reading the take-back; no seed showed it).
    #[test]
    fn a_taken_back_id_whose_forward_still_waits_is_routed_again_after_a_crash() {
        let dir = temp_dir_in("handed_qos2", "taken-back-live");
        let ((mut a, _, env, lock), original) = published_waiting(&dir);
        take_back(&mut a, &env);
        crash(a, env, lock);

        let (mut a, _, env, _lock) = stored_node(&dir, 7);
        resend_is_routed_again(&mut a, &env, original);
    }

    /// Once the holder said the original reached every destination, the id is
    /// resolved in the store too: after a restart its re-send is answered at once,
    /// not routed again.
    #[test]
    fn an_id_whose_holder_said_done_is_answered_at_once_after_a_restart() {
        let dir = temp_dir_in("handed_qos2", "pending-done");
        let (mut b, env, _lock, _) = pending_on_b_across_a_crash(&dir, true);
        let c = b.connect(5, connect_packet(V, "p", false), false);
        drain(&mut b, c, V);
        b.handle_packet(5, c, publish(3, true));
        commit(&mut b, &env);
        assert_eq!(drain(&mut b, c, V), vec![Packet::PubRec(PubRec::new(3))]);
        assert!(remote_out(&mut b).is_empty(), "not routed again");
    }

    /// A QoS 2 copy of publication `id` ("t", "x") as the forwarder hands it to a
    /// shard of the receiving node.
    fn forwarded_qos2(id: PubId) -> MeshMsg {
        let mut p = Publish::new(Str::from_static("t"), Bytes::from_static(b"x"));
        p.qos = QoS::ExactlyOnce;
        MeshMsg::Forwarded {
            message: super::super::message_from_publish(1, p, crate::message::SessionUid(0), V),
            mark: None,
            ack: None,
            id: Some(id),
            earlier_life: false,
            routes_index: 0,
        }
    }

    /// The PUBLISH packets in `packets`.
    fn publishes(packets: &[Packet]) -> usize {
        packets
            .iter()
            .filter(|p| matches!(p, Packet::Publish(_)))
            .count()
    }

    /// Cause B′ of the `sync` triage, on the new owner: node B took "p" in while
    /// the forward of its QoS 2 PUBLISH 3 still waited on A, and stored the id as
    /// maybe lacking on every shard of B and on the other nodes; B crashed before
    /// A's word. After the restart the client's re-send is delivered again
    /// (`exactly_once::redeliver`) to the other nodes but, before the fix, never
    /// on the publisher's own shard ("its deliveries were in the id's commit",
    /// true where the original was routed, not here): subscriber "s" of that shard,
    /// which the original never reached, lost it, and the publisher had its PUBREC.
    /// Now that shard is in the set like any other: it delivers the re-sent copy
    /// unless its marks cover the original, so one that got the original before
    /// the crash does not get it twice.
    #[test]
    fn a_re_send_routed_again_after_the_new_owners_crash_reaches_its_own_shards_subscriber() {
        for got_original in [false, true] {
            let name = if got_original {
                "own-had"
            } else {
                "own-lacked"
            };
            let dir = temp_dir_in("handed_qos2", name);
            let (mut b, remote, env, lock) = stored_node(&dir, 8);
            let s = b.connect(1, connect_packet(V, "s", false), false);
            b.handle_packet(1, s, subscribe_packet("t", QoS::ExactlyOnce));
            commit(&mut b, &env);
            drain(&mut b, s, V);
            let mut a = node(7);
            let (bytes, pending, _token, id) = moved_while_waiting(&mut a);
            if got_original {
                // A's forward reached B before B crashed (A's answer did not).
                b.handle_mesh(2, remote, forwarded_qos2(id));
                commit(&mut b, &env);
                assert_eq!(publishes(&drain(&mut b, s, V)), 1);
            }
            b.import_session(4, "p", &bytes, 0).expect("taken in");
            assert!(b.import_pending("p", &pending));
            commit(&mut b, &env);
            crash(b, env, lock);

            let (mut b, _, env, _lock) = stored_node(&dir, 9);
            let s = b.connect(5, connect_packet(V, "s", false), false);
            let before = publishes(&drain(&mut b, s, V));
            assert_eq!(before, usize::from(got_original), "what s had, restored");
            remote_out(&mut b); // the restored route, for the forwarder
            resend_is_routed_again(&mut b, &env, id);
            let again = drain(&mut b, s, V);
            assert_eq!(
                publishes(&again),
                usize::from(!got_original),
                "got the original: {got_original}; {again:?}"
            );
        }
    }

    /// The other side of the fix above: a take-back stores the id as maybe lacking
    /// on every shard of A too, the publisher's included, which delivered the
    /// original when it routed it. After a crash the re-send is routed again, and
    /// that shard's restored count covers the original: its subscriber does not
    /// get it twice.
    #[test]
    fn a_taken_back_id_routed_again_after_a_crash_is_not_delivered_twice_on_its_own_shard() {
        let dir = temp_dir_in("handed_qos2", "taken-back-own");
        let (mut a, _, env, lock) = stored_node(&dir, 6);
        let s = a.connect(1, connect_packet(V, "s", false), false);
        a.handle_packet(1, s, subscribe_packet("t", QoS::ExactlyOnce));
        commit(&mut a, &env);
        drain(&mut a, s, V);
        remote_out(&mut a);
        let p = a.connect(2, connect_packet(V, "p", false), false);
        drain(&mut a, p, V);
        a.handle_packet(2, p, publish(3, false));
        commit(&mut a, &env);
        let (_, original) = sent_remote(&mut a);
        assert_eq!(publishes(&drain(&mut a, s, V)), 1, "the original, here");
        take_back(&mut a, &env);
        crash(a, env, lock);

        let (mut a, _, env, _lock) = stored_node(&dir, 7);
        let s = a.connect(5, connect_packet(V, "s", false), false);
        assert_eq!(publishes(&drain(&mut a, s, V)), 1, "restored in flight");
        remote_out(&mut a);
        resend_is_routed_again(&mut a, &env, original);
        let again = drain(&mut a, s, V);
        assert_eq!(publishes(&again), 0, "{again:?}");
    }

    /// A session node B took over while its old owner A was down: no export ran on
    /// A, so B has nothing of it (the client gets a new session, CONNACK session
    /// present 0, which the committed table knows as fresh before the CONNACK:
    /// `claims::mark_fresh`). When A comes back, its store restores the session
    /// with packet id 3 maybe lacking on other nodes (the original's forward died
    /// with A); A parks it for B's claim (`takeover::park_sessions_owned_elsewhere`,
    /// an export) and drops it as stale (`takeover::drop_stale_copy`): nothing of
    /// the publication is routed, and neither the session nor the id comes back
    /// at a later start. The publication was never acknowledged (its PUBREC
    /// waited for the forward).
    #[test]
    fn a_session_lost_to_a_fresh_start_while_its_node_was_down_routes_nothing_when_it_returns() {
        let dir = temp_dir_in("handed_qos2", "lost-while-down");
        let ((a, _, env, lock), _) = published_waiting(&dir);
        crash(a, env, lock);

        let (mut a, _, env, lock) = stored_node(&dir, 7);
        assert!(a.has_session("p"), "restored from the store");
        a.export_session(3, "p", 0, (2, 9))
            .expect("parked for node 2's claim");
        assert!(a.drop_moving_copy("p"), "stale: node 2 started afresh");
        commit(&mut a, &env);
        let routed: Vec<MeshMsg> = remote_out(&mut a)
            .into_iter()
            .filter(|m| matches!(m, MeshMsg::PublishRemote { .. } | MeshMsg::Redirect { .. }))
            .collect();
        assert!(routed.is_empty(), "{routed:?}");
        crash(a, env, lock);

        let (mut a, _, env, _lock) = stored_node(&dir, 8);
        assert!(!a.has_session("p"), "the stale copy's records are gone");
        let c = a.connect(5, connect_packet(V, "p", false), false);
        let connack = drain(&mut a, c, V);
        assert!(
            matches!(&connack[..], [Packet::ConnAck(ack)] if !ack.session_present),
            "{connack:?}"
        );
        commit(&mut a, &env);
    }

    /// The same take-over seen from B: a client that keeps its state against
    /// CONNACK session present 0 (MQTT 3.1.1 lets it go on; MQTT 5 says it must
    /// discard it, [MQTT-3.2.2-5]) re-sends PUBLISH 3 with DUP. For B it is a new
    /// publication of a new session: nothing says which original it repeats (its
    /// id is in A's store), so it is routed with an id of B's and acknowledged once
    /// accepted (nothing acknowledged is lost), and a node whose subscriber got the
    /// original before A died delivers it again: at least once, not exactly once,
    /// for such a client.
    #[test]
    fn a_re_send_on_a_session_started_afresh_is_a_new_publication() {
        let mut a = node(7);
        let (_, _, _, original) = moved_while_waiting(&mut a);
        let mut b = node(8);
        let c = b.connect(5, connect_packet(V, "p", false), false);
        let connack = drain(&mut b, c, V);
        assert!(
            matches!(&connack[..], [Packet::ConnAck(ack)] if !ack.session_present),
            "{connack:?}"
        );
        b.handle_packet(6, c, publish(3, true));
        assert!(
            drain(&mut b, c, V).is_empty(),
            "PUBREC before the other nodes"
        );
        let (token, routed) = sent_remote(&mut b);
        assert!(!super::super::moved::is_resent(routed), "{routed:?}");
        assert_eq!(routed.origin, 8, "an id of B's");
        let remote = b.remote_id().expect("remote");
        b.handle_mesh(7, remote, MeshMsg::Ack { token });
        assert_eq!(drain(&mut b, c, V), vec![Packet::PubRec(PubRec::new(3))]);

        let mut n = node(9);
        let remote = n.remote_id().expect("remote");
        let s = n.connect(1, connect_packet(V, "s", false), false);
        n.handle_packet(1, s, subscribe_packet("t", QoS::ExactlyOnce));
        drain(&mut n, s, V);
        n.handle_mesh(2, remote, forwarded_qos2(original));
        n.handle_mesh(3, remote, forwarded_qos2(routed));
        assert_eq!(publishes(&drain(&mut n, s, V)), 2, "at least once");
    }

    #[test]
    fn malformed_pending_ids_are_refused() {
        let id = PubId {
            origin: 7,
            shard: 0,
            seq: 5,
        };
        let good = encode_pending(&[(3, 1, id)]);
        assert!(decode_pending(&good).is_some());
        assert!(decode_pending(&good[..good.len() - 1]).is_none());
        assert!(decode_pending(&[0, 0, 0]).is_none());
        assert!(decode_pending(&encode_pending(&[(0, 1, id)])).is_none());
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_pending(&huge).is_none());
    }
}
