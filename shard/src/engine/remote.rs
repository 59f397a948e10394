//! The other nodes of a cluster as one more mesh destination (`impl Engine`;
//! docs/ARCHITECTURE.md "Cluster data plane").
//!
//! In a cluster the driver calls [`Engine::enable_remote`] at boot. The
//! engine then treats the rest of the cluster as a pseudo-shard with id
//! `shard_count` (the *remote* id), served by the node's forwarder on the
//! control thread:
//!
//! - **Routes.** A shard's first subscriber to a filter sends `RouteAdd` (with
//!   the SUBSCRIBE's token) to the remote id as to every local shard, and the
//!   SUBACK waits for its `Ack` too: the forwarder answers once the node's
//!   route is applied on every node of the cluster. Its last subscriber sends
//!   `RouteRemove`. The forwarder sends `RouteAdd`/`RouteRemove` with
//!   `shard: remote` when the first other node routes a filter or the last
//!   one stops, so `route_match` yields the remote id beside local shards.
//! - **Publishes** matching the remote id go to the forwarder once per shard
//!   (it sends them once per matching node): QoS 0 as `Publish`, QoS 1/2 as
//!   `PublishDurable` with the publisher's token, so the PUBACK/PUBREC waits
//!   for the forwarder's `Ack` (every destination node accepted it).
//! - **Publishes from other nodes** arrive as `MeshMsg::Forwarded`: delivered
//!   to this shard's subscribers and passed to the other local shards that
//!   route the topic, never back to the remote id (a message crosses the
//!   cluster link at most once). Their origin is a [`SessionUid`] no local
//!   session has ([`SessionUid::remote`]), so no-local never suppresses them
//!   by mistake. Under `sync` durability the driver wraps a batch in
//!   [`Engine::begin_forward_batch`] / [`Engine::end_forward_batch`]: QoS 1/2
//!   copies for other local shards carry the batch's token and are answered
//!   after their commit there, and the batch completes
//!   ([`Engine::take_forwards_done`]) once this shard's commit and every such
//!   answer are in; the node answers the sending node only then. Each
//!   publication carries a [`ForwardMark`]; every shard stores the last one
//!   it handled per sending node with its commits and skips what is at or
//!   below it, so a batch retried after a restart is delivered once
//!   (docs/PERSISTENCE.md, "Forwarded batches"). With back-pressure on, the
//!   batch also waits for the congested sessions its QoS 1/2 publications
//!   reached (`backpressure`): a full subscriber queue here holds the
//!   publishers' acknowledgements on the sending node, with the same bound
//!   as a local publisher's.
//! - **Retained updates** go to the forwarder only (the raft log orders them);
//!   they come back to every shard of every node as `Retain` from the remote
//!   id, stamped with [`raft_stamp`] of their log index.
//! - **Copies matched for an earlier life.** A publication another node
//!   matched before it had applied any route add of this node's present life
//!   (`Forwarded::earlier_life`, decided by the driver from the record's
//!   routes index) was meant for this node's sessions of before its restart:
//!   it reaches only subscriptions that are not `fresh` (restored from the
//!   store, brought along by a session that moved in), on this shard and on
//!   the others its copies go to. A subscription a SUBSCRIBE made since waited
//!   for a route add of this life, which every other node applied before the
//!   SUBACK, so what is published after the SUBACK is never such a copy.

use tessera_proto::QoS;

use super::Engine;

/// The stamp of a retained update the raft log applied at `index`: above
/// every stamp a node makes itself (milliseconds), ordered by the index.
pub fn raft_stamp(index: u64) -> (u64, ShardId) {
    ((1 << 62) | index, 0)
}
use crate::mesh::{ForwardMark, MeshMsg, PubId, ShardId};
use crate::message::Message;
use crate::trie::{SHARDS_MAX, route_match};

impl Engine {
    /// Makes the rest of the cluster a mesh destination with id
    /// `shard_count` (see the module). Call once at boot, before any
    /// connection; returns that id, or `None` when the shard count leaves no
    /// room for it in a `ShardSet`.
    pub fn enable_remote(&mut self) -> Option<ShardId> {
        if let Some(id) = self.remote {
            return Some(id);
        }
        if self.shard_count >= SHARDS_MAX {
            return None;
        }
        let id = ShardId::try_from(self.shard_count).ok()?;
        self.remote = Some(id);
        self.outbox.push(Vec::new());
        Some(id)
    }

    /// The filters this shard routes for its own subscriptions, each once
    /// (shared ones as subscribed, `$share/{group}/{filter}`): at boot, what the
    /// restored sessions need routed. Plain filters come from the subscription
    /// trie, so a subscription a session left there under a ghost index
    /// (`moved`: a restored session parked for another node's committed claim)
    /// counts too: its route must stay while the ghost holds and redirects
    /// copies. The driver hands this to the forwarder before anything else the
    /// shard sends it, which keeps the node's routes in the log that these need
    /// and removes the others (docs/ARCHITECTURE.md, "Cluster data plane", *a
    /// node's own routes at boot*).
    pub fn subscribed_filters(&self) -> Vec<tessera_proto::Str> {
        let mut out: std::collections::BTreeSet<String> = Default::default();
        self.subscriptions.for_each(|filter, _, _| {
            if !out.contains(filter) {
                out.insert(filter.to_owned());
            }
        });
        for s in self.sessions.iter().flatten() {
            for f in s.subscriptions.keys() {
                if tessera_proto::topic::is_shared(f) {
                    out.insert(f.to_string());
                }
            }
        }
        out.into_iter()
            .filter_map(|f| tessera_proto::Str::try_from(f).ok())
            .collect()
    }

    /// The remote id, when the engine is part of a cluster.
    pub fn remote_id(&self) -> Option<ShardId> {
        self.remote
    }

    /// Destinations that acknowledge a new route: the other local shards and
    /// the forwarder.
    pub(super) fn route_peers(&self) -> usize {
        self.shard_count - 1 + usize::from(self.remote.is_some())
    }

    /// Whether `to` is the remote id.
    pub(super) fn is_remote(&self, to: ShardId) -> bool {
        self.remote == Some(to)
    }

    /// Hands `msg` to the forwarder: QoS 1/2 with the publisher's token (one
    /// more acknowledgement its PUBACK/PUBREC waits for), QoS 0 without.
    /// With the publication's cluster-wide id, given where it was routed
    /// (`moved`: a session that moved is not given a copy again, nor one older
    /// than a publication of the same publisher it already got).
    pub(super) fn forward_remote(&mut self, to: ShardId, msg: &Message, ack: Option<u64>) {
        self.stats.remote_forwards_sent += 1;
        let id = match self.moved.current {
            Some(id) => Some(id),
            None => self.new_pub_id(msg.qos),
        };
        if msg.qos == QoS::AtMostOnce {
            let msg = MeshMsg::PublishRemote {
                message: msg.clone(),
                ack: None,
                id,
            };
            self.outbox[usize::from(to)].push(msg);
            return;
        }
        let token = ack.filter(|t| {
            self.pending_retains
                .get_mut(t)
                .map(|(_, n)| *n += 1)
                .is_some()
        });
        let msg = MeshMsg::PublishRemote {
            message: msg.clone(),
            ack: token,
            id,
        };
        let after_commit = token.is_some() && self.publish_seq != 0;
        self.send_after_id_commit(to, msg, after_commit);
    }

    /// In a cluster, a retained update goes to the forwarder only: the raft log
    /// orders it, and every shard of every node applies it when it is applied
    /// (stamped with [`raft_stamp`] of its index), so the last writer by log
    /// index wins everywhere. The publisher's acknowledgement waits for it.
    /// `$SYS/` topics stay per node. Returns whether it was handed over.
    pub(super) fn retain_remote(
        &mut self,
        topic: &tessera_proto::Str,
        message: &Option<Message>,
        ack: Option<u64>,
    ) -> bool {
        let Some(to) = self.remote else {
            return false;
        };
        if topic.starts_with("$SYS/") {
            return false;
        }
        if let Some(t) = ack
            && let Some((_, n)) = self.pending_retains.get_mut(&t)
        {
            *n += 1;
        }
        self.outbox[usize::from(to)].push(MeshMsg::Retain {
            topic: topic.clone(),
            message: message.clone(),
            stamp: (0, self.shard),
            ack,
        });
        true
    }

    /// A publication from another node: this shard's subscribers and the
    /// other local shards that route it, never the remote id.
    /// The retained message of `topic` in this shard's replica (another node fetches a
    /// retained message too large to ride in the log from the node that keeps it).
    pub fn retained_message(&self, topic: &str) -> Option<Message> {
        self.retained.get(topic, ())?.message.clone()
    }

    pub(super) fn publish_forwarded(
        &mut self,
        now_ms: u64,
        msg: Message,
        mark: Option<ForwardMark>,
        id: Option<PubId>,
    ) {
        self.stats.remote_publishes_received += 1;
        let handled = if mark.is_some() {
            // An original of a numbered batch is not skipped by this shard's `PubId`
            // marks: they cover the copies it passed on to other shards too, stored
            // with this shard's commit, so a batch retried after a crash between this
            // shard's commit and theirs was skipped whole here and answered, and the
            // sessions there never got it. Each shard's forward mark sorts out a
            // retried batch (`forward_seen`); re-sent copies are checked as before.
            self.rerouted_handled(id)
        } else {
            id.is_some_and(|id| self.pub_id_handled(id))
        };
        if handled {
            // A copy of a publication handled here already: a QoS 2 PUBLISH re-sent
            // after the node that routed its original died, routed again with the
            // original's id (`moved::RESENT`: by that node restarted, or by the node
            // its session moved to), whose original (or an earlier re-sent copy)
            // reached this shard; or an original after its re-sent copy. Originals
            // of one origin never come out of order otherwise. A session that moved
            // in here since, without it, still gets it (`moved::Arrival`).
            return self.resent_to_arrivals(now_ms, &msg, id);
        }
        self.note_pub_id(id);
        self.moved.ack = self.forward_batch.map(super::moved::RedirectAck::Batch);
        let mut set = std::mem::take(&mut self.shard_set);
        route_match(&self.routes, &msg.topic, &mut set);
        // In a batch whose answer waits, a QoS 1/2 copy for another shard is
        // answered by it after its commit (sync durability) or once the
        // congested sessions it reached there drained, like `PublishDurable`.
        let token = self.forward_batch.filter(|_| msg.qos != QoS::AtMostOnce);
        for to in set.iter() {
            if to == self.shard || self.is_remote(to) {
                continue;
            }
            self.stats.forwards_sent += 1;
            let ack = token.filter(|_| self.durable_forwards() || self.bp_peer_congested(to));
            if let Some(t) = ack
                && let Some(n) = self.pending_forwards.get_mut(&t)
            {
                *n += 1;
            }
            self.outbox[usize::from(to)].push(MeshMsg::Forwarded {
                message: msg.clone(),
                mark,
                ack,
                id,
                earlier_life: self.earlier_life,
                routes_index: self.routes_index,
            });
        }
        let local = set.contains(self.shard);
        self.shard_set = set;
        if local && !mark.is_some_and(|m| self.forward_seen(&m)) {
            // A congested session here holds the batch's answer, as it holds a
            // local publisher's acknowledgement (`backpressure`): the sending
            // node holds the publisher's PUBACK/PUBREC until then.
            if let Some(t) = token {
                self.bp_begin_remote(self.shard, t, msg.qos, true);
            }
            // A QoS 0 delivery that finds a subscriber behind makes the driver
            // wait for it before the next slice (`pace`).
            self.pace.active = true;
            self.deliver_local(now_ms, &msg);
            self.pace.active = false;
            if token.is_some()
                && self.bp_end_remote()
                && let Some(n) = token.and_then(|t| self.pending_forwards.get_mut(&t))
            {
                *n += 1;
            }
        }
        self.moved.current = None;
        self.moved.ack = None;
    }

    /// A copy of a forwarded publication from the local shard that served its
    /// batch: delivered unless this shard handled it before a restart, and
    /// answered after the commit of what it stored when `ack` is set. Its id
    /// is noted here as on the serving shard (`moved`: the session it reaches
    /// here may have moved, and may move on).
    pub(super) fn forwarded_copy(
        &mut self,
        now_ms: u64,
        from: ShardId,
        message: Message,
        mark: Option<ForwardMark>,
        ack: Option<u64>,
        id: Option<PubId>,
    ) {
        // A re-sent copy (`moved::RESENT`) this shard handled the original of: the
        // serving shard's marks are its own (another node's batches may be served by
        // another shard than the original's were), so this shard looks at its own.
        if self.rerouted_handled(id) {
            // Not for the sessions that moved in after the original came
            // (`moved::Arrival`).
            self.resent_to_arrivals(now_ms, &message, id);
            if let Some(token) = ack {
                self.ack_after_commit(from, token);
            }
            return;
        }
        self.note_pub_id(id);
        let seen = mark.is_some_and(|m| self.forward_seen(&m));
        match ack {
            Some(token) if seen => self.ack_after_commit(from, token),
            Some(token) => self.deliver_durable(now_ms, from, &message, token, true),
            None if seen => {}
            None => self.deliver_local(now_ms, &message),
        }
        self.moved.current = None;
    }

    /// Starts handling a batch of publications another node forwarded (as
    /// `Forwarded` from the remote id). Returns the token whose completion
    /// ([`Engine::take_forwards_done`]) says the batch may be answered: under
    /// `sync` durability once every copy stored for a persistent session here
    /// or on another local shard is committed, and with back-pressure on once
    /// every congested session a QoS 1/2 publication of the batch reached
    /// (here or on another local shard) drained below its low-water mark or
    /// held it `backpressure_hold_ms_max`, so the sending node holds the
    /// publishers' PUBACK/PUBREC as a local publisher's would be. `None`:
    /// answer at once (neither applies).
    /// Also while this shard keeps a moved session's ghost: a publication of the
    /// batch redirected to the session's new node holds the answer until that node
    /// accepted it (`moved`).
    pub fn begin_forward_batch(&mut self) -> Option<u64> {
        if !self.durable_forwards() && !self.bp_on() && self.ghost_count() == 0 {
            return None;
        }
        let token = self.next_token;
        self.next_token += 1;
        // One answer for this shard's own commit (`end_forward_batch`).
        self.pending_forwards.insert(token, 1);
        self.forward_batch = Some(token);
        Some(token)
    }

    /// A shared record of the forwarded batch being handled: a QoS 1/2 one is
    /// one more answer the batch waits for, from the shard that finally hands
    /// it to a member or drops it, as for a publisher's shard within a node:
    /// under `sync` durability after its commit, and with back-pressure on
    /// once the member it made congested drained (or at the hold bound), so
    /// the sending node holds the publisher's PUBACK/PUBREC as for a plain
    /// subscriber's congestion (`backpressure`).
    pub(super) fn forward_batch_share(&mut self, qos: QoS) -> super::shared::SharedAck {
        match self.forward_batch {
            Some(token) if qos != QoS::AtMostOnce && (self.durable_forwards() || self.bp_on()) => {
                if let Some(n) = self.pending_forwards.get_mut(&token) {
                    *n += 1;
                }
                super::shared::SharedAck::Remote {
                    origin: self.shard,
                    token,
                }
            }
            _ => super::shared::SharedAck::None,
        }
    }

    /// Ends the batch begun with `token`: its own part completes with the
    /// commit of what this shard stored for it.
    pub fn end_forward_batch(&mut self, token: u64) {
        self.forward_batch = None;
        self.ack_after_commit(self.shard, token);
    }

    /// One answer of a forwarded batch arrived (a shard's `Ack`, or this
    /// shard's commit).
    pub(super) fn on_forward_ack(&mut self, token: u64) {
        let Some(missing) = self.pending_forwards.get_mut(&token) else {
            return;
        };
        *missing = missing.saturating_sub(1);
        if *missing == 0 {
            self.pending_forwards.remove(&token);
            self.forwards_done.push(token);
        }
    }

    /// Whether forwarded batches completed since the last
    /// [`Engine::take_forwards_done`].
    pub fn has_forwards_done(&self) -> bool {
        !self.forwards_done.is_empty()
    }

    /// Tokens of forwarded batches whose answers may go out now.
    pub fn take_forwards_done(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.forwards_done)
    }
}

#[cfg(test)]
mod tests {
    //! The remote pseudo-shard through the engine's own mesh: a SUBACK waits
    //! for the forwarder, a QoS 1 PUBACK waits for the forwarder's `Ack`, and
    //! a forwarded publication reaches subscribers on every local shard and
    //! never goes back to the forwarder.

    use bytes::Bytes;
    use tessera_proto::{
        Packet, ProtocolVersion, PubAck, Publish, QoS, Str, Subscribe, SubscribeProperties,
        Subscription, SubscriptionOptions,
    };

    use super::super::testing::{connect_packet, drain, engines, routed_elsewhere};
    use super::super::{Engine, Limits};
    use crate::mesh::{MeshMsg, ShardId};
    use crate::message::{Message, SessionUid};
    use crate::session::ConnId;

    const V5: ProtocolVersion = ProtocolVersion::V5;

    /// Two shards in a cluster; returns the engines and the remote id.
    fn cluster() -> (Vec<Engine>, ShardId) {
        let mut es = engines(2, &Limits::default());
        let r = es[0].enable_remote().expect("room for the remote id");
        assert_eq!(es[1].enable_remote(), Some(r));
        (es, r)
    }

    /// Moves mesh messages between local shards until none is left; returns
    /// what the shards sent to the remote id, with the sending shard.
    fn pump(es: &mut [Engine], remote: ShardId) -> Vec<(ShardId, MeshMsg)> {
        let mut to_remote = Vec::new();
        loop {
            let mut batches = Vec::new();
            for (from, e) in es.iter_mut().enumerate() {
                e.drain_outbox(|to, b| batches.push((from as ShardId, to, b)));
            }
            if batches.is_empty() {
                return to_remote;
            }
            for (from, to, batch) in batches {
                for m in batch {
                    if to == remote {
                        to_remote.push((from, m));
                    } else {
                        es[usize::from(to)].handle_mesh(1, from, m);
                    }
                }
            }
        }
    }

    /// Pumps the mesh, and answers as the forwarder does every route add and
    /// shared-group route the shards sent it (the rest of what they sent it is
    /// dropped).
    fn ack_route_adds(es: &mut [Engine], remote: ShardId) {
        for (from, m) in pump(es, remote) {
            if let MeshMsg::RouteAdd {
                ack: Some(token), ..
            }
            | MeshMsg::ShareRoute {
                ack: Some(token), ..
            } = m
            {
                es[usize::from(from)].handle_mesh(1, remote, MeshMsg::Ack { token });
            }
        }
    }

    fn subscribe(e: &mut Engine, conn: ConnId, filter: &'static str, qos: QoS) {
        let sub = Subscribe {
            packet_id: 1,
            properties: SubscribeProperties::default(),
            subscriptions: vec![Subscription {
                filter: Str::from_static(filter),
                options: SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            }],
        };
        e.handle_packet(1, conn, Packet::Subscribe(sub));
    }

    fn client(e: &mut Engine, id: &str) -> ConnId {
        let c = e.connect(1, connect_packet(V5, id, true), false);
        drain(e, c, V5); // CONNACK
        c
    }

    #[test]
    fn the_suback_of_a_new_route_waits_for_the_forwarder() {
        let (mut es, remote) = cluster();
        let c = client(&mut es[0], "s");
        subscribe(&mut es[0], c, "a/+", QoS::AtLeastOnce);
        let sent = pump(&mut es, remote);
        // Shard 1 acknowledged at once; the forwarder has not yet.
        assert!(
            drain(&mut es[0], c, V5).is_empty(),
            "SUBACK before the forwarder's ack"
        );
        let token = match &sent[..] {
            [
                (
                    0,
                    MeshMsg::RouteAdd {
                        filter,
                        shard: 0,
                        ack: Some(t),
                    },
                ),
            ] if filter == "a/+" => *t,
            other => panic!("expected one RouteAdd to the forwarder, got {other:?}"),
        };
        es[0].handle_mesh(1, remote, MeshMsg::Ack { token });
        let packets = drain(&mut es[0], c, V5);
        assert!(matches!(packets[..], [Packet::SubAck(_)]), "{packets:?}");
        // A second subscriber to the routed filter answers at once.
        let c2 = client(&mut es[0], "s2");
        subscribe(&mut es[0], c2, "a/+", QoS::AtMostOnce);
        assert!(pump(&mut es, remote).is_empty());
        assert!(matches!(drain(&mut es[0], c2, V5)[..], [Packet::SubAck(_)]));
    }

    #[test]
    fn a_route_the_cluster_could_not_commit_fails_the_subscribes_that_waited_for_it() {
        let (mut es, remote) = cluster();
        let c = client(&mut es[0], "s");
        subscribe(&mut es[0], c, "a/+", QoS::AtLeastOnce);
        let sent = pump(&mut es, remote);
        let [
            (
                0,
                MeshMsg::RouteAdd {
                    ack: Some(token), ..
                },
            ),
        ] = &sent[..]
        else {
            panic!("expected one RouteAdd to the forwarder, got {sent:?}");
        };
        let token = *token;
        // A second session subscribes the same filter while the route is pending: its
        // SUBACK waits on the first one's route.
        let c2 = client(&mut es[0], "s2");
        subscribe(&mut es[0], c2, "a/+", QoS::AtLeastOnce);
        assert!(pump(&mut es, remote).is_empty());
        es[0].handle_mesh(
            1,
            remote,
            MeshMsg::RouteFailed {
                token,
                filter: Str::from_static("a/+"),
                reason: tessera_proto::ReasonCode::UnspecifiedError,
            },
        );
        for conn in [c, c2] {
            let packets = drain(&mut es[0], conn, V5);
            let [Packet::SubAck(ack)] = &packets[..] else {
                panic!("{packets:?}");
            };
            assert_eq!(
                ack.reason_codes,
                [tessera_proto::ReasonCode::UnspecifiedError]
            );
        }
        // Neither session keeps the filter: the route goes away everywhere, and a
        // publication does not reach them.
        let sent = pump(&mut es, remote);
        assert!(
            sent.iter()
                .any(|(_, m)| matches!(m, MeshMsg::RouteRemove { filter, .. } if filter == "a/+")),
            "{sent:?}"
        );
        let p = es[1].connect(1, connect_packet(V5, "p", true), false);
        drain(&mut es[1], p, V5);
        let mut publish = Publish::new(Str::from_static("a/x"), Bytes::from_static(b"x"));
        publish.qos = QoS::AtMostOnce;
        es[1].handle_packet(1, p, Packet::Publish(publish));
        pump(&mut es, remote);
        assert!(drain(&mut es[0], c, V5).is_empty());
        assert!(drain(&mut es[0], c2, V5).is_empty());
    }

    #[test]
    fn a_qos1_publish_to_another_node_is_acked_after_the_forwarder() {
        let (mut es, remote) = cluster();
        // Another node routes "t": the forwarder tells every shard.
        for e in es.iter_mut() {
            routed_elsewhere(e, "t");
        }
        let p = client(&mut es[1], "p");
        let mut publish = Publish::new(Str::from_static("t"), Bytes::from_static(b"x"));
        publish.qos = QoS::AtLeastOnce;
        publish.packet_id = 7;
        es[1].handle_packet(1, p, Packet::Publish(publish));
        let sent = pump(&mut es, remote);
        let token = match &sent[..] {
            [
                (
                    1,
                    MeshMsg::PublishRemote {
                        message,
                        ack: Some(ack),
                        id: None,
                    },
                ),
            ] if message.topic == "t" => *ack,
            other => panic!("expected one PublishRemote to the forwarder, got {other:?}"),
        };
        assert!(
            drain(&mut es[1], p, V5).is_empty(),
            "PUBACK before the forwarder's ack"
        );
        es[1].handle_mesh(1, remote, MeshMsg::Ack { token });
        assert_eq!(
            drain(&mut es[1], p, V5),
            vec![Packet::PubAck(PubAck::new(7))]
        );
        // QoS 0 goes without a token and is not held.
        es[1].handle_packet(
            1,
            p,
            Packet::Publish(Publish::new(Str::from_static("t"), Bytes::new())),
        );
        let sent = pump(&mut es, remote);
        assert!(
            matches!(sent[..], [(1, MeshMsg::PublishRemote { ack: None, .. })]),
            "{sent:?}"
        );
    }

    #[test]
    fn a_forwarded_publish_reaches_every_local_shard_and_never_goes_back() {
        let (mut es, remote) = cluster();
        // Subscribers on both shards, one with No Local.
        let a = client(&mut es[0], "a");
        subscribe(&mut es[0], a, "f/#", QoS::AtMostOnce);
        let b = client(&mut es[1], "b");
        let sub = Subscribe {
            packet_id: 2,
            properties: SubscribeProperties::default(),
            subscriptions: vec![Subscription {
                filter: Str::from_static("f/#"),
                options: SubscriptionOptions {
                    no_local: true,
                    ..Default::default()
                },
            }],
        };
        es[1].handle_packet(1, b, Packet::Subscribe(sub));
        // Ack the route adds the forwarder got.
        ack_route_adds(&mut es, remote);
        drain(&mut es[0], a, V5);
        drain(&mut es[1], b, V5);
        // Other nodes route f/# too.
        for e in es.iter_mut() {
            routed_elsewhere(e, "f/#");
        }
        let msg = Message {
            topic: Str::from_static("f/1"),
            payload: Bytes::from_static(b"hi"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: None,
            expires_at_ms: None,
            // The same bits as a session of shard 1 would have: no-local must
            // not mistake it for one.
            origin: Some(SessionUid::remote(SessionUid::new(1, 1).0)),
            received_us: 0,
        };
        es[0].handle_mesh(
            1,
            remote,
            MeshMsg::Forwarded {
                message: msg,
                mark: None,
                ack: None,
                id: None,
                earlier_life: false,
                routes_index: 0,
            },
        );
        let sent = pump(&mut es, remote);
        assert!(sent.is_empty(), "sent back to the forwarder: {sent:?}");
        for (e, c) in [(0, a), (1, b)] {
            let got = drain(&mut es[e], c, V5);
            assert!(
                matches!(&got[..], [Packet::Publish(p)] if p.topic == "f/1"),
                "shard {e}: {got:?}"
            );
        }
    }

    /// Seed 632: another node matched publications against this node's routes of
    /// its earlier life (they stay in the log) and held them while this node was
    /// down. Such a copy (`earlier_life`) reaches the subscriptions kept from that
    /// life (restored from the store) and one beside them on their filter, but not
    /// one a SUBSCRIBE made since under a route of this life, on this shard or on
    /// another it goes to; a copy matched in this life reaches all of them.
    #[test]
    fn a_copy_matched_for_the_earlier_life_reaches_only_subscriptions_kept_from_it() {
        use crate::session::SubscriptionEntry;
        use crate::store::{Recovered, RecoveredSession};

        let (mut es, remote) = cluster();
        es[0].enable_persistence(false);
        let kept = SubscriptionEntry {
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
            subscription_id: None,
            // Whatever a restored entry says: it existed before this life.
            fresh: true,
        };
        // A ClientID whose sessions live on shard 0 (recovery gives each shard its own).
        let old_id = [
            "old", "old1", "old2", "old3", "old4", "old5", "old6", "old7",
        ]
        .into_iter()
        .find(|c| crate::hash::shard_for(c.as_bytes(), 2) == 0)
        .expect("one of them hashes to shard 0");
        let restored = RecoveredSession {
            client_id: Str::from_static(old_id),
            version: V5,
            expiry_interval_s: u32::MAX,
            disconnected_at_ms: Some(0),
            subscriptions: vec![(Str::from_static("t/1"), kept)],
            deliveries: Vec::new(),
            inbound_qos2: Vec::new(),
            will: None,
            delayed_will: None,
        };
        let recovered = Recovered {
            sessions: vec![restored],
            ..Default::default()
        };
        es[0].restore(1, recovered);
        let old = es[0].connect(1, connect_packet(V5, old_id, false), false);
        drain(&mut es[0], old, V5); // CONNACK, session present
        let new = client(&mut es[0], "new");
        subscribe(&mut es[0], new, "t/#", QoS::AtLeastOnce);
        let beside = client(&mut es[0], "beside");
        subscribe(&mut es[0], beside, "t/1", QoS::AtLeastOnce);
        let other = client(&mut es[1], "other");
        subscribe(&mut es[1], other, "t/+", QoS::AtLeastOnce);
        // The forwarder answers this life's route adds.
        ack_route_adds(&mut es, remote);
        assert!(pump(&mut es, remote).is_empty());
        for (e, c) in [(0, new), (0, beside), (1, other)] {
            let got = drain(&mut es[e], c, V5);
            assert!(matches!(got[..], [Packet::SubAck(_)]), "{got:?}");
        }
        let copy = |payload: &'static str, earlier_life| MeshMsg::Forwarded {
            message: Message {
                topic: Str::from_static("t/1"),
                payload: Bytes::from_static(payload.as_bytes()),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: None,
                expires_at_ms: None,
                origin: Some(SessionUid::remote(7)),
                received_us: 0,
            },
            mark: None,
            ack: None,
            id: None,
            earlier_life,
            routes_index: 0,
        };
        es[0].handle_mesh(1, remote, copy("earlier", true));
        es[0].handle_mesh(1, remote, copy("this", false));
        assert!(pump(&mut es, remote).is_empty());
        let got = |e: &mut Engine, c| {
            drain(e, c, V5)
                .into_iter()
                .filter_map(|p| match p {
                    Packet::Publish(p) => Some(String::from_utf8_lossy(&p.payload).into_owned()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(got(&mut es[0], old), ["earlier", "this"]);
        assert_eq!(got(&mut es[0], beside), ["earlier", "this"]);
        assert_eq!(got(&mut es[0], new), ["this"]);
        assert_eq!(got(&mut es[1], other), ["this"]);
    }

    /// A QoS 1 publication forwarded from another node to `e`, as the driver
    /// hands a batch's records to the engine.
    fn forwarded(e: &mut Engine, remote: ShardId, n: u32) {
        let msg = Message {
            topic: Str::from_static("t"),
            payload: Bytes::from(n.to_string()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
            expires_at_ms: None,
            origin: Some(SessionUid::remote(7)),
            received_us: 0,
        };
        e.handle_mesh(
            1,
            remote,
            MeshMsg::Forwarded {
                message: msg,
                mark: None,
                ack: None,
                id: None,
                earlier_life: false,
                routes_index: 0,
            },
        );
    }

    /// A batch of publications `ns` another node forwarded, served by `e`: its
    /// token.
    fn batch(e: &mut Engine, remote: ShardId, ns: std::ops::Range<u32>) -> u64 {
        let t = e.begin_forward_batch().expect("back-pressure is on");
        for n in ns {
            forwarded(e, remote, n);
        }
        e.end_forward_batch(t);
        t
    }

    /// A batch of QoS 1 records `ns` for the only member of `$share/g/t` another
    /// node forwarded, served by `e` (as the forwarder hands them over): its token.
    fn shared_batch(e: &mut Engine, remote: ShardId, ns: std::ops::Range<u32>) -> u64 {
        let t = e.begin_forward_batch().expect("back-pressure is on");
        for n in ns {
            let mut tried = crate::trie::ShardSet::new();
            tried.insert(remote);
            let record = MeshMsg::SharedPublish {
                group: Str::from_static("g"),
                filter: Str::from_static("t"),
                message: Message {
                    topic: Str::from_static("t"),
                    payload: Bytes::from(n.to_string()),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    properties: None,
                    expires_at_ms: None,
                    origin: Some(SessionUid::remote(7)),
                    received_us: 0,
                },
                key: 7,
                tried,
                hops: 0,
                handed_back: false,
                ack: None,
            };
            e.handle_mesh(1, remote, record);
        }
        e.end_forward_batch(t);
        t
    }

    /// `shards` engines in a cluster with a small queue (in flight 1, high-water
    /// mark 4) and a QoS 1 subscriber to `t` on shard `on` whose route the
    /// forwarder acknowledged: the engines, the remote id and the subscriber.
    fn congestible(shards: usize, on: usize, hold_ms: u64) -> (Vec<Engine>, ShardId, ConnId) {
        congestible_on(shards, on, hold_ms, "t")
    }

    /// `congestible` with the subscriber's filter `filter` (a shared one makes
    /// it the group's only member).
    fn congestible_on(
        shards: usize,
        on: usize,
        hold_ms: u64,
        filter: &'static str,
    ) -> (Vec<Engine>, ShardId, ConnId) {
        let limits = Limits {
            inflight_count_max: 1,
            queued_count_max: 100,
            queue_high_water: 4,
            backpressure_hold_ms_max: hold_ms,
            ..Limits::default()
        };
        let mut es = super::super::testing::engines(shards, &limits);
        let remote = es[0].enable_remote().expect("room for the remote id");
        for e in es.iter_mut().skip(1) {
            assert_eq!(e.enable_remote(), Some(remote));
        }
        let c = client(&mut es[on], "s");
        subscribe(&mut es[on], c, filter, QoS::AtLeastOnce);
        ack_route_adds(&mut es, remote);
        pump(&mut es, remote);
        let suback = drain(&mut es[on], c, V5);
        assert!(matches!(suback[..], [Packet::SubAck(_)]), "{suback:?}");
        (es, remote, c)
    }

    /// The subscriber on shard `on` reads and acknowledges whatever it is sent,
    /// 20 rounds (the engines exchanging their mesh messages between them);
    /// returns the payloads.
    fn read_all(es: &mut [Engine], remote: ShardId, on: usize, c: ConnId) -> Vec<String> {
        let mut got = Vec::new();
        for _ in 0..20 {
            for p in drain(&mut es[on], c, V5) {
                if let Packet::Publish(p) = p {
                    got.push(String::from_utf8(p.payload.to_vec()).unwrap());
                    es[on].handle_packet(1_001, c, Packet::PubAck(PubAck::new(p.packet_id)));
                }
            }
            pump(es, remote);
        }
        got
    }

    fn numbers(ns: std::ops::Range<u32>) -> Vec<String> {
        ns.map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_congested_subscriber_holds_the_answer_of_a_forwarded_batch_until_it_drains() {
        let (mut es, remote, c) = congestible(1, 0, 2_000);
        // A batch into a queue below the high-water mark is answered at once.
        let t1 = batch(&mut es[0], remote, 0..3);
        assert_eq!(es[0].take_forwards_done(), vec![t1]);
        // The next one fills the queue past the mark: its answer waits (the sending
        // node holds the publishers' acknowledgements meanwhile).
        let t2 = batch(&mut es[0], remote, 3..8);
        assert!(
            !es[0].has_forwards_done(),
            "answered while the queue is congested"
        );
        // The subscriber reads and acknowledges: below the low-water mark the
        // batch is answered, and nothing was dropped.
        assert_eq!(read_all(&mut es, remote, 0, c), numbers(0..8));
        assert_eq!(es[0].take_forwards_done(), vec![t2]);
        assert_eq!(es[0].stats().dropped_queue_full, 0);
    }

    #[test]
    fn a_subscriber_that_held_a_batch_for_the_whole_bound_holds_no_more_batches() {
        let (mut es, remote, c) = congestible(1, 0, 1_000);
        // The subscriber does not read: the batch that congested it is held for
        // the bound, then answered.
        let t1 = batch(&mut es[0], remote, 0..8);
        assert!(!es[0].has_forwards_done());
        es[0].tick(1 + 999);
        assert!(!es[0].has_forwards_done(), "released before the bound");
        es[0].tick(1 + 1_000);
        assert_eq!(es[0].take_forwards_done(), vec![t1]);
        // It is not draining: the next batch is answered at once, so the stream
        // from the other node is not held one bound per batch.
        let t2 = batch(&mut es[0], remote, 8..10);
        assert_eq!(es[0].take_forwards_done(), vec![t2]);
        // Once it drained, a new congestion holds batches again.
        assert_eq!(read_all(&mut es, remote, 0, c), numbers(0..10));
        let t3 = batch(&mut es[0], remote, 10..18);
        assert!(
            !es[0].has_forwards_done(),
            "a new congestion holds the batch"
        );
        assert_eq!(read_all(&mut es, remote, 0, c), numbers(10..18));
        assert_eq!(es[0].take_forwards_done(), vec![t3]);
    }

    #[test]
    fn a_congested_subscriber_on_another_local_shard_holds_the_batch_answer_too() {
        // The subscriber is on shard 1; shard 0 serves the other node's batches.
        let (mut es, remote, c) = congestible(2, 1, 2_000);
        // The first batch congests the queue on shard 1 before shard 0 knows: it is
        // answered at once (the margin above the high-water mark absorbs it, as
        // within a node), and shard 1 announces its congestion.
        let t1 = batch(&mut es[0], remote, 0..6);
        assert!(pump(&mut es, remote).is_empty());
        assert_eq!(es[0].take_forwards_done(), vec![t1]);
        // The next batch's copies carry its token: shard 1 holds it.
        let t2 = batch(&mut es[0], remote, 6..8);
        assert!(pump(&mut es, remote).is_empty());
        assert!(
            !es[0].has_forwards_done(),
            "answered while shard 1's queue is congested"
        );
        // The subscriber reads: the batch is answered, nothing was dropped.
        assert_eq!(read_all(&mut es, remote, 1, c), numbers(0..8));
        assert_eq!(es[0].take_forwards_done(), vec![t2]);
        assert_eq!(es[1].stats().dropped_queue_full, 0);
    }

    /// A shared-subscription member is held for like a plain subscriber when
    /// another node forwards to it, on the serving shard and on another local
    /// shard: the batch whose record made it congested is answered once it
    /// drained (the sending node holds the publisher's PUBACK meanwhile), and
    /// nothing is dropped. Before, a shared record waited for nothing outside
    /// `sync` durability: the batch was answered at once and the member's queue
    /// overflowed with acknowledged messages.
    #[test]
    fn a_congested_shared_member_holds_the_answer_of_a_forwarded_batch() {
        for (shards, on) in [(1, 0), (2, 1)] {
            let (mut es, remote, c) = congestible_on(shards, on, 2_000, "$share/g/t");
            // Below the high-water mark: answered once the member's shard took it.
            let t1 = shared_batch(&mut es[0], remote, 0..3);
            assert!(pump(&mut es, remote).is_empty());
            assert_eq!(es[0].take_forwards_done(), vec![t1]);
            // Past the mark: the answer waits for the member to drain.
            let t2 = shared_batch(&mut es[0], remote, 3..8);
            assert!(pump(&mut es, remote).is_empty());
            assert!(
                !es[0].has_forwards_done(),
                "answered while the member is congested ({shards} shards)"
            );
            assert_eq!(read_all(&mut es, remote, on, c), numbers(0..8));
            assert_eq!(es[0].take_forwards_done(), vec![t2]);
            for e in &es {
                assert_eq!(e.stats().dropped_queue_full, 0);
            }
            let held: u64 = es.iter().map(|e| e.stats().backpressure_acks_held).sum();
            assert!(held > 0, "the member never held an answer");
        }
    }

    #[test]
    fn unsubscribing_the_last_subscriber_removes_the_route_everywhere() {
        let (mut es, remote) = cluster();
        let c = client(&mut es[0], "s");
        subscribe(&mut es[0], c, "x", QoS::AtMostOnce);
        ack_route_adds(&mut es, remote);
        let u = tessera_proto::Unsubscribe {
            packet_id: 3,
            properties: Default::default(),
            filters: vec![Str::from_static("x")],
        };
        es[0].handle_packet(1, c, Packet::Unsubscribe(u));
        let sent = pump(&mut es, remote);
        assert!(
            matches!(&sent[..], [(0, MeshMsg::RouteRemove { filter, shard: 0 })] if filter == "x"),
            "{sent:?}"
        );
    }
}
