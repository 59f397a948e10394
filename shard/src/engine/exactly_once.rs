//! QoS 2 exactly once across shards and crashes (`impl Engine`;
//! docs/PERSISTENCE.md, "Cross-shard QoS 2 after a crash").
//!
//! A QoS 2 publication stores its packet id on the publisher's shard and its
//! deliveries on each subscriber's shard: separate LMDB envs, separate
//! commits, no transaction across them. Before this module a `kill -9`
//! between the two commits lost the message (id committed, delivery not: the
//! re-sent PUBLISH was taken for a duplicate and only acknowledged) or
//! duplicated it (delivery committed, id not: the re-send was new). The
//! protocol:
//!
//! 1. **The id first.** A QoS 2 publication of a stored session that goes to
//!    other shards (or nodes) under `sync` durability gets an *origin
//!    sequence number* from its shard, stored with the packet id
//!    (`StoreOp::PutInbound`), and its `PublishDurable` copies leave the
//!    shard only once that epoch is committed (`send_durable`). No other
//!    shard ever holds a publication whose id a crash could still take away,
//!    so a re-send the publisher's shard does not know is new everywhere.
//!    Cost: the cross-shard delivery starts one commit later (commits stay
//!    batched; nothing else waits).
//! 2. **Marks, not per-message records, on the receivers.** A shard handles
//!    one sender's publications in order (the mesh is FIFO per pair, and the
//!    deferred copies leave in sequence order), so "everything up to `seq`
//!    from shard A was handled here" is one number per sender. It rides in
//!    the next batch that has ops anyway (`StoreOp::PutOrigin`), so it is
//!    committed with what those publications stored, never before; it adds
//!    no commit and no write per message.
//! 3. **Recovery decides, once.** At start-up every env is read before any
//!    shard runs: an id with number `seq` may lack its deliveries exactly on
//!    the shards whose mark for its shard is below `seq` (a shard at or above
//!    it committed it, or was not a destination). That set replaces the
//!    record, committed before the shards start, so marks raised later
//!    cannot hide an old loss.
//! 4. **The re-send.** The first re-sent PUBLISH of such an id after the
//!    restart is delivered again to those shards only (those whose routes
//!    match it now), with a new number and the set stored again, so another
//!    crash during it is resolved the same way; its PUBREC waits for their
//!    commits like a first delivery's. Nothing is delivered again on the
//!    publisher's shard when it routed the original (its deliveries were in
//!    the id's commit, and recovery leaves it out of the set); an id a node
//!    took in with its session while the original's forward still waited
//!    elsewhere (`handed_qos2`) names that node's every shard, the
//!    publisher's too, which delivers it unless its marks cover the
//!    original (cause B′ of the `sync` triage). Other
//!    nodes of a cluster keep no marks here: a re-send matching their
//!    routes is forwarded to them again, never lost; with the original's
//!    cluster-wide id, stored with the packet id, as a re-sent copy of it
//!    (`moved::RESENT`), so a node that got the original skips it (its marks
//!    are in memory: once, unless that node restarted too).
//!
//! A re-sent PUBLISH while the first delivery still waits for other shards
//! (the client reconnected meanwhile) is acknowledged when that delivery is,
//! not at once: a PUBREC means every copy is committed.

use tessera_proto::{Packet, PubRec, Publish};

use super::{Engine, message_from_publish};
use crate::session::{ConnId, SessionIdx};
use crate::trie::{ShardSet, route_match};

impl Engine {
    /// Remembers what the PUBREC of inbound QoS 2 id `packet_id` waits for:
    /// `token` (other shards) and the current epoch (the id's commit).
    pub(super) fn note_inbound_wait(
        &mut self,
        idx: SessionIdx,
        packet_id: u16,
        token: Option<u64>,
        id: Option<crate::mesh::PubId>,
    ) {
        let epoch = if self.session(idx).stored {
            self.current_durable_epoch()
        } else {
            0
        };
        let s = self.session_mut(idx);
        if let Some(pos) = s.inbound_position(packet_id) {
            let entry = &mut s.inbound_qos2[pos];
            entry.token = token;
            entry.epoch = epoch;
            entry.id = id.map(super::moved::original).or(entry.id);
        }
    }

    /// A PUBLISH whose QoS 2 packet id (`inbound_qos2[pos]`) awaits PUBREL.
    pub(super) fn on_publish_again(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        idx: SessionIdx,
        pos: usize,
        p: Publish,
    ) {
        let durable = self.durable_forwards();
        let entry = &mut self.session_mut(idx).inbound_qos2[pos];
        if let Some(waiting) = entry.pending.as_deref_mut() {
            // The original is still on its way from the node the session came from
            // (`handed_qos2`): the PUBREC waits for that node's word.
            waiting.resent = Some((conn, p));
            return;
        }
        if let Some(shards) = entry.redeliver.take()
            && durable
        {
            let original = entry.id;
            return self.redeliver(now_ms, conn, idx, p, *shards, original);
        }
        let (token, epoch) = (entry.token, entry.epoch);
        let ack = Packet::PubRec(PubRec::new(p.packet_id));
        self.hold_output_for_epoch(conn, epoch);
        let token = token.filter(|t| self.pending_retains.contains_key(t));
        if let Some(t) = token {
            if self
                .slot(conn)
                .is_some_and(|c| c.held_acks.iter().any(|(h, _)| *h == Some(t)))
            {
                return; // this connection's PUBREC is already held for it
            }
            if let Some((c, _)) = self.pending_retains.get_mut(&t) {
                *c = conn;
            }
        }
        self.send_ack(conn, ack, token);
    }

    /// Delivers a re-sent PUBLISH again to the shards in `shards` that route
    /// its topic (this one only if the original's id is known and not covered
    /// here; see the module), and acknowledges it once they committed it. With the `original` publication's cluster-wide id when it
    /// was stored: a re-sent copy of it (`moved::RESENT`), which another node
    /// that got the original skips.
    fn redeliver(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        idx: SessionIdx,
        p: Publish,
        shards: ShardSet,
        original: Option<crate::mesh::PubId>,
    ) {
        let packet_id = p.packet_id;
        let (uid, version) = (self.session(idx).uid, self.session(idx).version);
        let mut msg = message_from_publish(now_ms, p, uid, version);
        msg.received_us = self.now_us;
        let seq = self.origin_seq_for(idx);
        self.persist_inbound(idx, packet_id, Some((seq, Some(shards))), original);
        self.hold_output_for_commit(conn);
        let token = self.next_token;
        self.next_token += 1;
        self.pending_retains.insert(token, (conn, 0));
        let mut set = std::mem::take(&mut self.shard_set);
        route_match(&self.routes, &msg.topic, &mut set);
        self.publish_seq = seq;
        // The original's id, as a re-sent copy's: a node (or a shard) that got the
        // original skips it. Without one (stored by an older build) a new id: at
        // least once on other nodes.
        self.moved.again = original;
        self.new_pub_id(msg.qos);
        self.moved.again = None;
        let mut sent = 0u32;
        // This shard only when the set names it and its marks do not cover the
        // original: recovery leaves the publisher's shard out (it delivered the
        // publication in the id's commit), but an id stored as pending on a node
        // that took the session in (`handed_qos2`) names every shard of that node,
        // whose shard never routed the original (cause B′).
        let local = set.contains(self.shard)
            && shards.contains(self.shard)
            && original.is_some_and(|id| !self.pub_id_handled(id));
        for to in set.iter() {
            if to == self.shard || !shards.contains(to) {
                continue;
            }
            if self.is_remote(to) {
                // The other nodes' marks are in memory: one that did not restart
                // and got the original skips the re-sent copy.
                self.forward_remote(to, &msg, Some(token));
            } else {
                self.stats.forwards_sent += 1;
                self.send_publish(to, &msg, Some(token));
            }
            sent += 1;
        }
        self.publish_seq = 0;
        let here = set.contains(self.shard);
        self.shard_set = set;
        if local {
            // A ghost's redirect of it holds the PUBREC as a forward does.
            self.moved.ack = Some(super::moved::RedirectAck::Publisher(token));
            self.deliver_local(now_ms, &msg);
            self.moved.ack = None;
            if let Some(id) = original {
                self.note_resent_handled(id);
            }
            sent += 1;
        } else if here {
            // This shard delivered the original (or the recovery says it has it),
            // but not to a session that moved in since without it
            // (`moved::Arrival`).
            self.resent_to_arrivals(now_ms, &msg, self.moved.current);
        }
        self.moved.current = None;
        tracing::debug!(
            shard = self.shard,
            packet_id,
            shards = sent,
            "re-sent QoS 2 PUBLISH delivered again to shards that may have lost it in a crash"
        );
        let waits = self
            .pending_retains
            .get(&token)
            .is_some_and(|(_, n)| *n > 0);
        if !waits {
            self.pending_retains.remove(&token);
        }
        let token = waits.then_some(token);
        self.note_inbound_wait(idx, packet_id, token, original);
        self.send_ack(conn, Packet::PubRec(PubRec::new(packet_id)), token);
    }
}

#[cfg(test)]
mod tests {
    //! Goal: a QoS 2 publication from a persistent session to a persistent
    //! subscriber on another shard is delivered exactly once whatever point a
    //! `kill -9` cuts the two shards' commits at, when the client re-sends the
    //! PUBLISH (DUP) after the restart. Method: two engines on a real store
    //! (LMDB in a temporary directory); the test plays the driver: it takes
    //! each shard's batch and commits it (or drops it: the crash), restarts
    //! by recovering the directory into new engines, and counts what the
    //! subscriber gets when it finally connects.

    use bytes::Bytes;
    use heed::{Env, WithoutTls};
    use tessera_proto::{Packet, ProtocolVersion, PubRel, Publish, QoS, Str};

    use crate::engine::{Engine, Limits};
    use crate::hash::shard_for;
    use crate::mesh::{ForwardMark, MeshMsg, ShardId};
    use crate::session::ConnId;
    use crate::store::{DirLock, open_dbs, recover};

    const MAP_BYTES: usize = 16 << 20;
    const WALL_BASE_MS: u64 = 1_700_000_000_000;
    const V: ProtocolVersion = ProtocolVersion::V3_1_1;

    /// A broker of two shards on a data directory, driven by hand.
    struct Node {
        engines: Vec<Engine>,
        envs: Vec<Env<WithoutTls>>,
        _lock: DirLock,
        now_ms: u64,
        /// What the shards gave the forwarder, except route changes: (from, msg).
        to_forwarder: Vec<(usize, MeshMsg)>,
    }

    use super::super::testing::{Dir, routed_elsewhere};

    fn temp_dir(name: &str) -> Dir {
        super::super::testing::temp_dir_in("exactly-once", name)
    }

    /// A ClientID starting with `prefix` that shard `shard` of two owns.
    fn id_on(shard: usize, prefix: &str) -> &'static str {
        (0..)
            .map(|n| format!("{prefix}-{n}"))
            .find(|id| shard_for(id.as_bytes(), 2) == shard)
            .map(|id| &*Box::leak(id.into_boxed_str()))
            .expect("some id hashes to each shard")
    }

    impl Node {
        /// Starts on `dir` as the broker does: recover, then restore each engine.
        fn boot(dir: &Dir) -> Node {
            Node::boot_with(dir, false)
        }

        /// `boot` as a node of a cluster (the engines' remote id enabled; the
        /// forwarder answers route adds at once and keeps the rest in
        /// `to_forwarder`).
        fn boot_with(dir: &Dir, cluster: bool) -> Node {
            Self::boot_as(dir, cluster, 0)
        }

        /// `boot_with`; a cluster node with `origin` as its process's origin tag
        /// (0: none), as the broker sets it before the restore.
        fn boot_as(dir: &Dir, cluster: bool, origin: u64) -> Node {
            let (lock, envs, recovered) = recover(&dir.0, 2, MAP_BYTES, WALL_BASE_MS).unwrap();
            let limits = Limits::default();
            let mut engines = crate::engine::testing::engines(2, &limits);
            let now_ms = 1_000;
            for (e, r) in engines.iter_mut().zip(recovered) {
                if cluster {
                    e.enable_remote().expect("room for the remote id");
                    if origin != 0 {
                        e.set_origin(origin);
                    }
                }
                e.enable_persistence(true);
                e.restore(now_ms, r);
            }
            let mut node = Node {
                engines,
                envs: envs.into_iter().map(|(env, _)| env).collect(),
                _lock: lock,
                now_ms,
                to_forwarder: Vec::new(),
            };
            node.settle();
            node
        }

        /// `kill -9`: what is not committed is gone.
        fn crash(self) {
            for env in self.envs {
                env.prepare_for_closing().wait();
            }
        }

        fn pump(&mut self) {
            let n = self.engines.len();
            loop {
                let mut batches = Vec::new();
                for (from, e) in self.engines.iter_mut().enumerate() {
                    e.drain_outbox(|to, batch| batches.push((from, to, batch)));
                }
                if batches.is_empty() {
                    return;
                }
                for (from, to, batch) in batches {
                    for msg in batch {
                        if usize::from(to) < n {
                            self.engines[usize::from(to)].handle_mesh(
                                self.now_ms,
                                from as ShardId,
                                msg,
                            );
                        } else if let MeshMsg::RouteAdd {
                            ack: Some(token), ..
                        }
                        | MeshMsg::ShareRoute {
                            ack: Some(token), ..
                        } = msg
                        {
                            // The forwarder: the route (or share) is in force everywhere.
                            self.engines[from].handle_mesh(self.now_ms, to, MeshMsg::Ack { token });
                        } else if !matches!(
                            msg,
                            MeshMsg::RouteAdd { .. }
                                | MeshMsg::RouteRemove { .. }
                                | MeshMsg::ShareRoute { .. }
                        ) {
                            self.to_forwarder.push((from, msg));
                        }
                    }
                }
            }
        }

        /// Commits what shard `k` stored so far, as its writer thread would.
        fn commit(&mut self, k: usize) {
            let Some(batch) = self.engines[k].take_store_batch() else {
                return;
            };
            let env = &self.envs[k];
            let dbs = open_dbs(env).unwrap();
            let mut txn = env.write_txn().unwrap();
            for op in &batch.ops {
                crate::store::apply(&dbs, &mut txn, op, WALL_BASE_MS).unwrap();
            }
            txn.commit().unwrap();
            self.engines[k].store_committed(batch.epoch);
        }

        /// Loses what shard `k` stored since its last commit (its writer
        /// never got it).
        fn lose(&mut self, k: usize) {
            let _ = self.engines[k].take_store_batch();
        }

        /// Commits and exchanges mesh messages until both shards are quiet.
        fn settle(&mut self) {
            for _ in 0..16 {
                self.pump();
                self.commit(0);
                self.commit(1);
            }
            self.pump();
            assert_eq!(self.engines[0].store_ops_pending(), 0, "settled");
            assert_eq!(self.engines[1].store_ops_pending(), 0, "settled");
        }

        /// A persistent 3.1.1 session of `id` connects; its CONNACK is read.
        fn connect(&mut self, id: &'static str) -> (usize, ConnId) {
            self.connect_and_read(id).0
        }

        /// `connect`, returning what followed the CONNACK in the same write.
        fn connect_and_read(&mut self, id: &'static str) -> ((usize, ConnId), Vec<Packet>) {
            let shard = shard_for(id.as_bytes(), 2);
            let connect = crate::engine::testing::connect_packet(V, id, false);
            let conn = self.engines[shard].connect(self.now_ms, connect, false);
            self.settle();
            let mut got = self.recv((shard, conn)).into_iter();
            let first = got.next();
            assert!(matches!(first, Some(Packet::ConnAck(_))), "{first:?}");
            ((shard, conn), got.collect())
        }

        fn send(&mut self, (shard, conn): (usize, ConnId), packet: Packet) {
            self.engines[shard].handle_packet(self.now_ms, conn, packet);
        }

        fn recv(&mut self, (shard, conn): (usize, ConnId)) -> Vec<Packet> {
            let e = &mut self.engines[shard];
            let out = crate::engine::testing::drain(e, conn, V);
            e.flushed(self.now_ms, conn);
            out
        }

        fn disconnect(&mut self, (shard, conn): (usize, ConnId)) {
            self.engines[shard].connection_lost(self.now_ms, conn);
            self.settle();
        }
    }

    fn publish(packet_id: u16, dup: bool) -> Packet {
        Packet::Publish(Publish {
            dup,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: Str::from_static("t"),
            packet_id,
            properties: Default::default(),
            payload: Bytes::from(format!("m{packet_id}")),
        })
    }

    /// A subscriber on shard 1 and a publisher on shard 0, both persistent,
    /// both disconnected; returns their ClientIDs.
    fn set_up(dir: &Dir) -> (&'static str, &'static str) {
        set_up_with(dir, "t")
    }

    /// `set_up` with the subscriber on `filter`.
    fn set_up_with(dir: &Dir, filter: &'static str) -> (&'static str, &'static str) {
        set_up_on(dir, filter, false)
    }

    /// `set_up_with`, as a node of a cluster when `cluster`.
    fn set_up_on(dir: &Dir, filter: &'static str, cluster: bool) -> (&'static str, &'static str) {
        let (sub, publisher) = (id_on(1, "sub"), id_on(0, "pub"));
        let mut node = Node::boot_with(dir, cluster);
        let s = node.connect(sub);
        let subscribe = crate::engine::testing::subscribe_packet(filter, QoS::ExactlyOnce);
        node.send(s, subscribe);
        node.settle();
        assert!(matches!(node.recv(s)[..], [Packet::SubAck(_)]));
        node.disconnect(s);
        node.crash();
        (sub, publisher)
    }

    /// The publisher reconnects, re-sends `packet_id` with DUP and completes
    /// the exchange; returns what it was answered.
    fn resend_and_complete(node: &mut Node, publisher: &'static str, packet_id: u16) {
        let p = node.connect(publisher);
        node.send(p, publish(packet_id, true));
        node.settle();
        let got = node.recv(p);
        assert!(
            matches!(got[..], [Packet::PubRec(ref r)] if r.packet_id == packet_id),
            "PUBREC for the re-sent PUBLISH: {got:?}"
        );
        node.send(p, Packet::PubRel(PubRel::new(packet_id)));
        node.settle();
        assert!(matches!(node.recv(p)[..], [Packet::PubComp(_)]));
        node.disconnect(p);
    }

    /// Publishes `packet_id` and crashes after the publisher's shard
    /// committed, before the subscriber's shard did.
    fn publish_and_crash_between_commits(dir: &Dir, publisher: &'static str, packet_id: u16) {
        let mut node = Node::boot(dir);
        let p = node.connect(publisher);
        node.send(p, publish(packet_id, false));
        node.pump();
        node.commit(0);
        node.pump();
        node.lose(1);
        assert!(node.recv(p).is_empty(), "no PUBREC before both commits");
        node.crash();
    }

    /// Restarts, lets the publisher re-send `packet_id`, and returns what the
    /// subscriber gets.
    fn restart_and_resend(
        dir: &Dir,
        publisher: &'static str,
        sub: &'static str,
        packet_id: u16,
    ) -> Vec<Bytes> {
        let mut node = Node::boot(dir);
        resend_and_complete(&mut node, publisher, packet_id);
        let mut got = delivered(&mut node, sub);
        node.crash();
        got.sort();
        got
    }

    /// Payloads the subscriber is sent when it connects (its whole queue).
    fn delivered(node: &mut Node, sub: &'static str) -> Vec<Bytes> {
        let (s, mut got) = node.connect_and_read(sub);
        let mut payloads = Vec::new();
        for _ in 0..8 {
            if got.is_empty() {
                break;
            }
            for p in got {
                if let Packet::Publish(p) = p {
                    payloads.push(p.payload.clone());
                    node.send(s, Packet::PubRec(tessera_proto::PubRec::new(p.packet_id)));
                } else if let Packet::PubRel(r) = p {
                    node.send(s, Packet::PubComp(tessera_proto::PubComp::new(r.packet_id)));
                }
            }
            node.settle();
            got = node.recv(s);
        }
        payloads
    }

    /// The crash the bridge test found: the publisher's shard committed the
    /// inbound packet id, the subscriber's shard had not committed the
    /// delivery. The re-sent PUBLISH is delivered, once.
    #[test]
    fn a_resend_after_a_crash_between_the_shards_commits_is_delivered_once() {
        let dir = temp_dir("between");
        let (sub, publisher) = set_up(&dir);
        publish_and_crash_between_commits(&dir, publisher, 7);
        assert_eq!(restart_and_resend(&dir, publisher, sub, 7), ["m7"]);
    }

    /// Both shards committed, the PUBREC did not reach the client: the
    /// re-sent PUBLISH is not delivered a second time.
    #[test]
    fn a_resend_after_both_commits_is_not_delivered_again() {
        let dir = temp_dir("both");
        let (sub, publisher) = set_up(&dir);
        let mut node = Node::boot(&dir);
        let p = node.connect(publisher);
        node.send(p, publish(7, false));
        node.settle();
        node.crash();
        assert_eq!(restart_and_resend(&dir, publisher, sub, 7), ["m7"]);
    }

    /// The subscriber's shard committed first and the publisher's shard lost
    /// the packet id: the re-sent PUBLISH is a new one for the broker, and the
    /// subscriber still gets the message once.
    #[test]
    fn a_resend_after_only_the_subscribers_shard_committed_is_delivered_once() {
        let dir = temp_dir("receiver-first");
        let (sub, publisher) = set_up(&dir);
        let mut node = Node::boot(&dir);
        let p = node.connect(publisher);
        node.send(p, publish(7, false));
        for _ in 0..4 {
            node.pump();
            node.commit(1);
        }
        node.lose(0);
        node.crash();
        assert_eq!(restart_and_resend(&dir, publisher, sub, 7), ["m7"]);
    }

    /// The same for the only member of a shared subscription on the other
    /// shard: its copy also leaves only after the packet id's commit, so a
    /// re-send the publisher's shard forgot is not a second copy for the
    /// group.
    #[test]
    fn a_shared_member_on_another_shard_gets_a_forgotten_resend_once() {
        let dir = temp_dir("shared-receiver-first");
        let (sub, publisher) = set_up_with(&dir, "$share/g/t");
        let mut node = Node::boot(&dir);
        let p = node.connect(publisher);
        node.send(p, publish(7, false));
        for _ in 0..4 {
            node.pump();
            node.commit(1);
        }
        node.lose(0);
        node.crash();
        assert_eq!(restart_and_resend(&dir, publisher, sub, 7), ["m7"]);
    }

    /// The publisher reconnects and re-sends while the subscriber's shard has
    /// not committed the first delivery: the PUBREC waits for that commit (a
    /// PUBREC means every copy is on disk), and nothing is delivered twice.
    #[test]
    fn a_resend_while_the_first_delivery_waits_is_acknowledged_after_it() {
        let dir = temp_dir("waits");
        let (sub, publisher) = set_up(&dir);
        let mut node = Node::boot(&dir);
        let p = node.connect(publisher);
        node.send(p, publish(7, false));
        node.pump();
        node.commit(0);
        node.pump();
        assert!(node.recv(p).is_empty(), "no PUBREC before both commits");
        node.engines[0].connection_lost(node.now_ms, p.1);
        node.pump();
        node.commit(0);
        let connect = crate::engine::testing::connect_packet(V, publisher, false);
        let p = (0, node.engines[0].connect(node.now_ms, connect, false));
        node.pump();
        node.commit(0);
        assert!(matches!(node.recv(p)[..], [Packet::ConnAck(_)]));
        node.send(p, publish(7, true));
        node.pump();
        node.commit(0);
        node.pump();
        assert!(
            node.recv(p).is_empty(),
            "PUBREC before the subscriber's commit"
        );
        node.commit(1);
        node.pump();
        let got = node.recv(p);
        assert!(matches!(got[..], [Packet::PubRec(_)]), "{got:?}");
        node.send(p, Packet::PubRel(PubRel::new(7)));
        node.settle();
        assert!(matches!(node.recv(p)[..], [Packet::PubComp(_)]));
        node.disconnect(p);
        assert_eq!(delivered(&mut node, sub), ["m7"]);
        node.crash();
    }

    /// In a cluster the other nodes keep no marks: after a restart a re-sent
    /// PUBLISH whose topic other nodes route is forwarded to them again (once
    /// its number is committed), and its PUBREC waits for the forwarder's
    /// answer; a later re-send is only acknowledged.
    #[test]
    fn a_resend_after_a_restart_goes_to_the_other_nodes_again() {
        use crate::mesh::MeshMsg;
        use crate::store::{Recovered, RecoveredSession};
        use crate::trie::ShardSet;

        let mut es = crate::engine::testing::engines(1, &Limits::default());
        let e = &mut es[0];
        let remote = e.enable_remote().expect("room for the remote id");
        e.set_origin(1);
        e.enable_persistence(true);
        let mut lacking = ShardSet::new();
        lacking.insert(remote);
        let session = RecoveredSession {
            client_id: Str::from_static("p"),
            version: V,
            expiry_interval_s: u32::MAX,
            disconnected_at_ms: Some(0),
            subscriptions: Vec::new(),
            deliveries: Vec::new(),
            inbound_qos2: vec![(7, lacking, None)],
            will: None,
            delayed_will: None,
        };
        let recovered = Recovered {
            sessions: vec![session],
            origin_seq_floor: 40,
            ..Default::default()
        };
        e.restore(1, recovered);
        let route = MeshMsg::RouteAdd {
            filter: Str::from_static("t"),
            shard: remote,
            ack: None,
        };
        e.handle_mesh(1, remote, route);
        let to_remote = |e: &mut Engine| {
            let mut sent = Vec::new();
            e.drain_outbox(|to, batch| {
                if to == remote {
                    sent.extend(batch);
                }
            });
            sent
        };
        let conn = e.connect(
            1,
            crate::engine::testing::connect_packet(V, "p", false),
            false,
        );
        let _ = crate::engine::testing::drain(e, conn, V);
        e.handle_packet(1, conn, publish(7, true));
        assert!(to_remote(e).is_empty(), "sent before its number's commit");
        let batch = e.take_store_batch().expect("the number is stored");
        e.store_committed(batch.epoch);
        let sent = to_remote(e);
        // Again with the cluster-wide id of a QoS 2 publication (`moved`).
        let [
            MeshMsg::PublishRemote {
                ack: Some(ack),
                id: Some(_),
                ..
            },
        ] = &sent[..]
        else {
            panic!("expected the message to the forwarder again: {sent:?}");
        };
        assert!(
            crate::engine::testing::drain(e, conn, V).is_empty(),
            "PUBREC before the forwarder's answer"
        );
        e.handle_mesh(1, remote, MeshMsg::Ack { token: *ack });
        let got = crate::engine::testing::drain(e, conn, V);
        assert!(matches!(got[..], [Packet::PubRec(_)]), "{got:?}");
        // Once is enough.
        e.handle_packet(1, conn, publish(7, true));
        assert!(to_remote(e).is_empty());
        let got = crate::engine::testing::drain(e, conn, V);
        assert!(matches!(got[..], [Packet::PubRec(_)]), "{got:?}");
    }

    /// The cluster's other nodes for `node`'s engines: origin `origin` (a new one
    /// per process start) and another node routing "t".
    fn in_cluster(node: &mut Node, origin: u64) {
        for e in &mut node.engines {
            e.set_origin(origin);
            routed_elsewhere(e, "t");
        }
    }

    /// The one publication shard 0 gave the forwarder: its token and id.
    fn forwarded_by_0(node: &mut Node) -> (u64, crate::mesh::PubId) {
        let sent = std::mem::take(&mut node.to_forwarder);
        match &sent[..] {
            [
                (
                    0,
                    MeshMsg::PublishRemote {
                        ack: Some(token),
                        id: Some(id),
                        ..
                    },
                ),
            ] => (*token, *id),
            other => panic!("expected one PublishRemote from shard 0: {other:?}"),
        }
    }

    /// Another node of the cluster (origin 9) with a subscriber on "t": how many
    /// publications it is given when a copy with `id` reaches it.
    fn other_node_gets(other: &mut (Engine, ConnId), id: crate::mesh::PubId) -> usize {
        let (e, s) = other;
        let remote = e.remote_id().expect("a cluster node");
        let message = crate::message::Message {
            topic: Str::from_static("t"),
            payload: Bytes::from_static(b"m7"),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: None,
            expires_at_ms: None,
            origin: Some(crate::message::SessionUid::remote(1)),
            received_us: 0,
        };
        e.handle_mesh(
            1,
            remote,
            MeshMsg::Forwarded {
                message,
                mark: None,
                ack: None,
                id: Some(id),
                earlier_life: false,
                routes_index: 0,
            },
        );
        crate::engine::testing::drain(e, *s, V)
            .iter()
            .filter(|p| matches!(p, Packet::Publish(_)))
            .count()
    }

    fn other_node() -> (Engine, ConnId) {
        let mut e = crate::engine::testing::engines(1, &Limits::default()).remove(0);
        e.enable_remote().expect("room for the remote id");
        e.set_origin(9);
        let s = e.connect(
            1,
            crate::engine::testing::connect_packet(V, "s", false),
            false,
        );
        e.handle_packet(
            1,
            s,
            crate::engine::testing::subscribe_packet("t", QoS::ExactlyOnce),
        );
        let _ = crate::engine::testing::drain(&mut e, s, V);
        (e, s)
    }

    /// Cause A of the `sync` simulation failures (seeds 28, 119, 141, 253, 282,
    /// ...): the copy of a QoS 2 publication reached another node, and the
    /// publisher's node crashed before that node's answer, so its PUBREC never
    /// went. After the restart the re-sent PUBLISH is forwarded again (recovery
    /// counts the other nodes as "may lack it"), and it went with a new id, so the
    /// node that had the original delivered it twice. Now the inbound record keeps
    /// the original's id and the re-send goes out as a re-sent copy of it, which
    /// that node skips (one that never got the original delivers it); the local
    /// shards that have it (the publisher's, the subscriber's that committed it)
    /// are told so at restore.
    #[test]
    fn a_resend_after_a_restart_goes_to_the_other_nodes_with_the_originals_id() {
        use super::super::moved::resent;

        let dir = temp_dir("original-id");
        let (sub, publisher) = set_up_on(&dir, "t", true);
        let mut node = Node::boot_with(&dir, true);
        in_cluster(&mut node, 1);
        let p = node.connect(publisher);
        node.send(p, publish(7, false));
        node.settle();
        let (_, original) = forwarded_by_0(&mut node);
        assert!(
            node.recv(p).is_empty(),
            "PUBREC before the other node's answer"
        );
        let mut got_it = other_node();
        assert_eq!(other_node_gets(&mut got_it, original), 1);
        node.crash();

        let mut node = Node::boot_with(&dir, true);
        in_cluster(&mut node, 2);
        for k in 0..2 {
            assert!(
                node.engines[k].pub_id_handled(resent(original)),
                "shard {k} has the publication"
            );
        }
        let p = node.connect(publisher);
        node.send(p, publish(7, true));
        node.settle();
        let (token, again) = forwarded_by_0(&mut node);
        assert_eq!(again, resent(original), "re-sent with the original's id");
        let remote = node.engines[0].remote_id().expect("a cluster node");
        node.engines[0].handle_mesh(node.now_ms, remote, MeshMsg::Ack { token });
        node.settle();
        assert!(matches!(node.recv(p)[..], [Packet::PubRec(_)]));
        node.send(p, Packet::PubRel(PubRel::new(7)));
        node.settle();
        assert!(matches!(node.recv(p)[..], [Packet::PubComp(_)]));
        node.disconnect(p);
        assert_eq!(other_node_gets(&mut got_it, again), 0, "delivered twice");
        assert_eq!(other_node_gets(&mut other_node(), again), 1);
        assert_eq!(delivered(&mut node, sub), ["m7"]);
        node.crash();
    }

    /// A second crash while the re-sent PUBLISH is being delivered again,
    /// after newer publications reached the subscriber's shard: the next
    /// re-send still delivers it, once.
    #[test]
    fn a_second_crash_during_the_redelivery_loses_nothing() {
        let dir = temp_dir("twice");
        let (sub, publisher) = set_up(&dir);
        publish_and_crash_between_commits(&dir, publisher, 7);

        // Restarted: a newer publication goes through first, then the
        // re-send of 7, which the crash cuts before any commit.
        let mut node = Node::boot(&dir);
        let p = node.connect(publisher);
        node.send(p, publish(8, false));
        node.settle();
        assert!(matches!(node.recv(p)[..], [Packet::PubRec(_)]));
        node.send(p, Packet::PubRel(PubRel::new(8)));
        node.settle();
        assert!(matches!(node.recv(p)[..], [Packet::PubComp(_)]));
        node.send(p, publish(7, true));
        node.pump();
        node.lose(0);
        node.lose(1);
        node.crash();
        assert_eq!(restart_and_resend(&dir, publisher, sub, 7), ["m7", "m8"]);
    }

    /// A batch another node forwarded, served by shard 0 for a persistent
    /// subscriber on shard 1 (`MeshMsg::Forwarded` from the remote id).
    fn forward_batch(node: &mut Node, seq: u64, payloads: &[&'static str]) -> Option<u64> {
        forward_batch_from(node, seq, payloads, None)
    }

    /// `forward_batch`, each record with its publication's id (QoS 2 class, number
    /// `seq * 100 + index + 1` of shard 0 of `origin`) when `origin` is given, as a
    /// cluster's forwarder sends them.
    fn forward_batch_from(
        node: &mut Node,
        seq: u64,
        payloads: &[&'static str],
        origin: Option<u64>,
    ) -> Option<u64> {
        let remote = node.engines[0].remote_id().expect("a cluster node");
        let token = node.engines[0].begin_forward_batch();
        for (index, payload) in payloads.iter().enumerate() {
            let message = crate::message::Message {
                topic: Str::from_static("t"),
                payload: Bytes::from_static(payload.as_bytes()),
                qos: QoS::ExactlyOnce,
                retain: false,
                properties: None,
                expires_at_ms: None,
                origin: Some(crate::message::SessionUid::remote(1)),
                received_us: 0,
            };
            let mark = ForwardMark {
                node: 9,
                incarnation: 5,
                seq,
                index: index as u32,
            };
            node.engines[0].handle_mesh(
                node.now_ms,
                remote,
                MeshMsg::Forwarded {
                    message,
                    mark: Some(mark),
                    ack: None,
                    id: origin.map(|origin| crate::mesh::PubId {
                        origin,
                        shard: 0,
                        seq: (2 << 62) | (seq * 100 + index as u64 + 1),
                    }),
                    earlier_life: false,
                    routes_index: 0,
                },
            );
        }
        if let Some(t) = token {
            node.engines[0].end_forward_batch(t);
        }
        token
    }

    /// A forwarded batch's copies reach both shards; shard 0 commits them, shard 1's
    /// commit is cut by a crash: the batch was not answered before that.
    fn crash_before_shard_1_commits(mut node: Node) {
        node.pump();
        node.commit(0);
        node.pump();
        assert!(
            !node.engines[0].has_forwards_done(),
            "answered before shard 1 committed the copies"
        );
        node.lose(1);
        node.crash();
    }

    /// A receiving node answers a forwarded batch only once the shard that
    /// stored its copies for a persistent session committed them, and a batch
    /// retried after a restart (the answer was lost, or never sent) is
    /// delivered once: the forward mark is committed with the copies.
    #[test]
    fn a_forwarded_batch_is_answered_after_the_commits_and_a_retry_after_a_restart_is_delivered_once()
     {
        // Cut before shard 1's commit: the batch was not answered, and its retry
        // after the restart delivers it.
        let dir = temp_dir("forward-lost");
        let (sub, _) = set_up_on(&dir, "t", true);
        let mut node = Node::boot_with(&dir, true);
        forward_batch(&mut node, 1, &["a", "b"]).expect("sync durability waits");
        crash_before_shard_1_commits(node);
        let mut node = Node::boot_with(&dir, true);
        forward_batch(&mut node, 1, &["a", "b"]);
        node.settle();
        assert_eq!(node.engines[0].take_forwards_done().len(), 1);
        assert_eq!(delivered(&mut node, sub), ["a", "b"]);
        node.crash();

        // Cut after the answer: the retry after the restart is answered and not
        // delivered again; the next batch is.
        let dir = temp_dir("forward-answered");
        let (sub, _) = set_up_on(&dir, "t", true);
        let mut node = Node::boot_with(&dir, true);
        let token = forward_batch(&mut node, 1, &["a", "b"]).expect("sync durability waits");
        node.pump();
        assert!(!node.engines[0].has_forwards_done());
        node.commit(1);
        node.pump();
        assert_eq!(node.engines[0].take_forwards_done(), [token]);
        node.crash();
        let mut node = Node::boot_with(&dir, true);
        forward_batch(&mut node, 1, &["a", "b"]);
        forward_batch(&mut node, 2, &["c"]);
        node.settle();
        assert_eq!(node.engines[0].take_forwards_done().len(), 2);
        assert_eq!(delivered(&mut node, sub), ["a", "b", "c"]);
        node.crash();
    }

    /// The same as a cluster runs it: the node has an origin (its shards store
    /// `PubId` marks), every record carries its publication's id, and a session on
    /// the serving shard gets the batch too, so that shard's mark for the sending
    /// origin, which covers the copies it passed on to shard 1, is stored with its
    /// own commit. Cut between the two shards' commits, the retry after the restart
    /// was skipped whole on the serving shard by that mark, and the batch answered:
    /// shard 1's session never got the copies. Each shard's forward mark decides.
    #[test]
    fn a_batch_retried_after_a_crash_between_the_shards_commits_reaches_the_shard_that_lost_it() {
        let dir = temp_dir("forward-ids-lost");
        let (sub, _) = set_up_on(&dir, "t", true);
        let here = id_on(0, "here");
        let mut node = Node::boot_as(&dir, true, 7);
        let h = node.connect(here);
        let subscribe = crate::engine::testing::subscribe_packet("t", QoS::ExactlyOnce);
        node.send(h, subscribe);
        node.settle();
        assert!(matches!(node.recv(h)[..], [Packet::SubAck(_)]));
        node.disconnect(h);
        forward_batch_from(&mut node, 1, &["a", "b"], Some(5)).expect("sync durability waits");
        crash_before_shard_1_commits(node);
        let mut node = Node::boot_as(&dir, true, 8);
        forward_batch_from(&mut node, 1, &["a", "b"], Some(5));
        node.settle();
        assert_eq!(node.engines[0].take_forwards_done().len(), 1);
        assert_eq!(
            delivered(&mut node, sub),
            ["a", "b"],
            "the retry was skipped"
        );
        assert_eq!(
            delivered(&mut node, here),
            ["a", "b"],
            "once on the serving shard"
        );
        node.crash();
    }

    /// A QoS 1 record for one member of `$share/g/t`, as the forwarder hands it
    /// to the serving shard from another node (`remote`).
    fn shared_record(remote: ShardId, handed_back: bool) -> MeshMsg {
        let mut tried = crate::trie::ShardSet::new();
        tried.insert(remote);
        MeshMsg::SharedPublish {
            group: Str::from_static("g"),
            filter: Str::from_static("t"),
            message: crate::message::Message {
                topic: Str::from_static("t"),
                payload: Bytes::from_static(b"s"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: None,
                expires_at_ms: None,
                origin: Some(crate::message::SessionUid::remote(1)),
                received_us: 0,
            },
            key: 1,
            tried,
            hops: 0,
            handed_back,
            ack: None,
        }
    }

    /// A shared record of a forwarded batch whose member is on another shard
    /// of the receiving node: the batch is answered only once that shard
    /// committed the delivery (a QoS 1/2 shared delivery acknowledged to the
    /// publisher on the other node is on disk).
    #[test]
    fn a_forwarded_shared_record_is_answered_after_the_members_commit() {
        let dir = temp_dir("forward-shared");
        let (sub, _) = set_up_on(&dir, "$share/g/t", true);
        let mut node = Node::boot_with(&dir, true);
        let remote = node.engines[0].remote_id().expect("a cluster node");
        let token = node.engines[0]
            .begin_forward_batch()
            .expect("sync durability waits");
        node.engines[0].handle_mesh(node.now_ms, remote, shared_record(remote, false));
        node.engines[0].end_forward_batch(token);
        node.pump();
        node.commit(0);
        node.pump();
        assert!(
            !node.engines[0].has_forwards_done(),
            "answered before the member's shard committed the delivery"
        );
        node.commit(1);
        node.pump();
        assert_eq!(node.engines[0].take_forwards_done(), [token]);
        node.crash();
        let mut node = Node::boot_with(&dir, true);
        assert_eq!(delivered(&mut node, sub), ["s"]);
        node.crash();
    }

    /// A shared record another node chose this node for, arriving after the
    /// group's members here left: it goes back to the forwarder marked handed
    /// back, and the batch's answer waits for the forwarder's `Ack` (the node
    /// that finally takes it). A handed-back record this node cannot place
    /// either is dropped, not handed back again, and the batch answered.
    #[test]
    fn a_forwarded_shared_record_without_a_member_here_is_handed_back_once() {
        let dir = temp_dir("forward-shared-back");
        let mut node = Node::boot_with(&dir, true);
        let remote = node.engines[0].remote_id().expect("a cluster node");
        let record = |handed_back| shared_record(remote, handed_back);
        let token = node.engines[0]
            .begin_forward_batch()
            .expect("sync durability waits");
        node.engines[0].handle_mesh(node.now_ms, remote, record(false));
        node.engines[0].end_forward_batch(token);
        node.settle();
        let back: Vec<_> = std::mem::take(&mut node.to_forwarder);
        let [
            (
                0,
                MeshMsg::SharedPublish {
                    handed_back: true,
                    ack: Some((0, t)),
                    group,
                    ..
                },
            ),
        ] = &back[..]
        else {
            panic!("not handed back: {back:?}");
        };
        assert_eq!((*t, &**group), (token, "g"));
        assert_eq!(node.engines[0].stats().shared_handed_back, 1);
        assert_eq!(node.engines[0].stats().dropped_shared_no_member, 0);
        assert!(
            !node.engines[0].has_forwards_done(),
            "answered before the node that took it answered"
        );
        node.engines[0].handle_mesh(node.now_ms, remote, MeshMsg::Ack { token });
        node.settle();
        assert_eq!(node.engines[0].take_forwards_done(), [token]);

        // Handed back already: dropped here, the batch answered without waiting.
        let token = node.engines[0].begin_forward_batch().expect("waits");
        node.engines[0].handle_mesh(node.now_ms, remote, record(true));
        node.engines[0].end_forward_batch(token);
        node.settle();
        assert!(node.to_forwarder.is_empty(), "{:?}", node.to_forwarder);
        assert_eq!(node.engines[0].stats().dropped_shared_no_member, 1);
        assert_eq!(node.engines[0].take_forwards_done(), [token]);
        node.crash();
    }
}
