//! Shared subscriptions `$share/{group}/{filter}` (MQTT 5.0 section 4.8.2)
//! across shards: the replicated share table, the choice of one member per
//! message, and giving a departed member's unfinished deliveries back to its
//! group.
//!
//! Every shard keeps a [`ShareTable`] (a `*_table`: a replica on every shard,
//! created with the engine, dropped with it). Per share it holds, for each
//! shard with members, how many are connected and how many are disconnected
//! persistent sessions, as that shard last announced with
//! `MeshMsg::ShareRoute`; and, on the members' own shard only, the members.
//! A publication is matched against the table on the publishing shard, which
//! picks one shard per matching share by the configured [`SharedStrategy`],
//! weighted by member counts, and sends it `MeshMsg::SharedPublish` (or keeps
//! it). The chosen shard hands it to one of its members. A shard that finds no
//! member any more (a race with a member leaving) passes the message on; after
//! `2 * shard_count` hops, or with no member left anywhere, it is dropped and
//! counted in `Stats::dropped_shared_no_member`.
//! Under `sync` durability a QoS 1/2 message that leaves the publisher's
//! shard carries the publisher's acknowledgement token ([`SharedAck`]); the
//! shard that finally hands it to a member answers after committing what
//! that stored, a shard that drops it answers at once (docs/PERSISTENCE.md).
//! In a cluster it always carries one, and otherwise while the chosen shard
//! announced congestion: a member whose queue the message makes congested
//! holds the answer until it drained (per-publisher back-pressure, as for a
//! plain subscriber). Round robin and random prefer a member below the
//! high-water mark (`Engine::shared_pick_member`).
//!
//! What a member leaves unfinished goes back to the group (MQTT 5.0 section
//! 4.8.2): every delivery it was not yet sent, and every QoS 1 delivery it did
//! not acknowledge, when its connection ends (persistent session) or its
//! session ends. A QoS 2 delivery already sent stays with a persistent member,
//! which completes it on reconnect [MQTT-4.8.2-4], and is dropped when the
//! session ends, because it must not go to another member [MQTT-4.8.2-5]
//! (`Stats::dropped_shared_qos2_member_ended`).
//!
//! Not here: SUBSCRIBE and UNSUBSCRIBE packet handling (the engine calls in
//! with a validated filter), persistence of memberships.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tessera_proto::{QoS, Str, topic};
use xxhash_rust::xxh3::xxh3_64;

use super::{Engine, delivery_qos};
use crate::mesh::{MeshMsg, ShardId};
use crate::message::Message;
use crate::session::{Delivery, Session, SessionIdx, ShareKey, SubscriptionEntry};
use crate::trie::{ShardSet, Trie};

/// How a shared subscription picks the member that gets a message
/// (`limits.shared_subscription_strategy`). Each strategy picks twice: a shard
/// on the publishing shard, weighted by its member count, then a member on
/// that shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SharedStrategy {
    /// Members in turn: each publishing shard cycles over member slots, each
    /// member shard over its members.
    #[default]
    RoundRobin,
    /// A member at random (a seeded generator: runs are reproducible).
    Random,
    /// The same member while it stays connected: the earliest to join on the
    /// lowest shard with members, so every publishing shard agrees on it.
    Sticky,
    /// A member chosen by a hash of the publisher's ClientID, so one
    /// publisher's messages go to one member while the group is unchanged.
    /// Wills and messages given back by a departed member hash the
    /// publishing session's identity instead.
    HashClientId,
}

/// Index of a share in its shard's share slab; local to the shard.
type ShareId = u32;

/// Members of one share on one shard, as that shard last announced them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ShardMembers {
    shard: ShardId,
    /// Members with a live connection.
    connected: u32,
    /// Disconnected members whose session persists: they can only queue.
    offline: u32,
}

/// One shared subscription as this shard knows it.
#[derive(Debug)]
struct Share {
    /// Group and filter, shared with the deliveries made for it.
    key: Arc<ShareKey>,
    /// Shards with members, ascending by shard id; no entry has both counts 0.
    /// This shard's own entry is what it last announced.
    shards: Vec<ShardMembers>,
    /// This shard's members in join order (sticky takes the first it can).
    members: Vec<(SessionIdx, SubscriptionEntry)>,
    /// Round robin over all shards' member slots, on the publishing side.
    shard_cursor: u64,
    /// Round robin over `members`.
    member_cursor: usize,
}

/// Who answers for a shared delivery that the publisher's PUBACK/PUBREC waits
/// for under `sync` durability (persistence, `pending_retains`).
#[derive(Debug, Clone, Copy)]
pub(super) enum SharedAck {
    /// Nothing waits: QoS 0, no `sync` durability, a message given back by a
    /// departed member, or a single shard.
    None,
    /// The publisher is on this shard and holds its acknowledgement with this
    /// token; the message has not left the shard. What this shard stores is
    /// covered by the publisher's own commit wait.
    Local(u64),
    /// The publisher's shard `origin` waits for `Ack { token }` from the
    /// shard that finally hands the message to a member (after committing
    /// what that stored) or drops it.
    Remote {
        /// The publisher's shard.
        origin: ShardId,
        /// The token to answer.
        token: u64,
    },
}

/// Where a shared delivery is on its way between shards.
#[derive(Debug, Clone, Copy)]
pub(super) struct Chain {
    /// Shards that found no connected member for it.
    pub(super) tried: ShardSet,
    /// Forwards so far; bounded by twice the shard count.
    pub(super) hops: u16,
    /// Another node handed it back to the group already (see
    /// [`Engine::shared_unplaced`]).
    pub(super) handed_back: bool,
    /// Who waits for it.
    pub(super) ack: SharedAck,
}

/// Which members may take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    /// Connected members, which get it now.
    Connected,
    /// Disconnected members with a persistent session, which queue it: used
    /// only when no member of the share is connected.
    Offline,
}

/// A message given back by a member that left, waiting to go to its group
/// again.
type Returned = (Arc<ShareKey>, Message);

/// The shared-subscription state of one shard: the share table replica and
/// this shard's memberships. Exists once per engine, for the engine's life.
/// Bounded by the subscriptions: a share exists while some shard has a
/// member, and each membership is a subscription of a session.
#[derive(Debug)]
pub(super) struct ShareTable {
    /// The slab; `None` slots are free and listed in `free`.
    shares: Vec<Option<Share>>,
    free: Vec<ShareId>,
    by_key: HashMap<ShareKey, ShareId>,
    /// filter -> the shares with that filter, matched once per publication.
    routes: Trie<ShareId, ()>,
    /// Scratch for matching, kept for its capacity.
    matches: Vec<ShareId>,
    /// Memberships of this shard's sessions, all shares together.
    members_len: usize,
    /// Messages given back by departed members, drained by one loop so that
    /// members leaving while others leave never recurse. Bounded by what
    /// session queues and windows held.
    returned: VecDeque<Returned>,
    draining: bool,
    /// splitmix64 state of the random strategy, seeded per shard.
    rng: u64,
}

impl ShareTable {
    pub(super) fn new(shard: ShardId) -> ShareTable {
        ShareTable {
            shares: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            routes: Trie::new(),
            matches: Vec::new(),
            members_len: 0,
            returned: VecDeque::new(),
            draining: false,
            rng: 0x5EED_0000_0000_0000 ^ u64::from(shard),
        }
    }

    /// Memberships of this shard's sessions.
    pub(super) fn members_len(&self) -> usize {
        self.members_len
    }

    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.rng)
    }

    fn share(&self, id: ShareId) -> &Share {
        self.shares[id as usize].as_ref().expect("live share")
    }

    fn share_mut(&mut self, id: ShareId) -> &mut Share {
        self.shares[id as usize].as_mut().expect("live share")
    }

    fn get_or_insert(&mut self, key: ShareKey) -> ShareId {
        if let Some(&id) = self.by_key.get(&key) {
            return id;
        }
        let key = Arc::new(key);
        let share = Share {
            key: key.clone(),
            shards: Vec::new(),
            members: Vec::new(),
            shard_cursor: 0,
            member_cursor: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                assert!(self.shares[id as usize].is_none(), "free share slot in use");
                self.shares[id as usize] = Some(share);
                id
            }
            None => {
                self.shares.push(Some(share));
                ShareId::try_from(self.shares.len() - 1).expect("shares bounded by subscriptions")
            }
        };
        self.routes.insert(&key.filter, id, ());
        self.by_key.insert(ShareKey::clone(&key), id);
        id
    }

    /// Sets what `shard` has of share `id`.
    fn set_counts(&mut self, id: ShareId, counts: ShardMembers) {
        let shards = &mut self.share_mut(id).shards;
        let pos = shards.binary_search_by_key(&counts.shard, |m| m.shard);
        match pos {
            Ok(i) if counts.connected == 0 && counts.offline == 0 => {
                shards.remove(i);
            }
            Ok(i) => shards[i] = counts,
            Err(_) if counts.connected == 0 && counts.offline == 0 => {}
            Err(i) => shards.insert(i, counts),
        }
    }

    /// Frees share `id` once no shard has members.
    fn drop_if_unused(&mut self, id: ShareId) {
        let share = self.share(id);
        if !share.shards.is_empty() || !share.members.is_empty() {
            return;
        }
        let share = self.shares[id as usize].take().expect("live share");
        let removed = self.routes.remove(&share.key.filter, id);
        assert!(removed.is_some(), "share route missing");
        self.by_key.remove(&*share.key);
        self.free.push(id);
    }
}

/// The group and filter of a validated `$share/{group}/{filter}`.
fn share_key(filter: &str) -> ShareKey {
    let sf = topic::parse_shared(filter)
        .ok()
        .flatten()
        .expect("shared filter validated at SUBSCRIBE");
    ShareKey {
        group: Str::try_from(sf.group).expect("a part of a valid string"),
        filter: Str::try_from(sf.filter).expect("a part of a valid string"),
    }
}

/// splitmix64's finaliser: spreads any input over all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The hash-strategy key of a publisher's ClientID.
pub(super) fn client_key(client_id: &[u8]) -> u64 {
    xxh3_64(client_id)
}

/// The hash-strategy key of a message whose publisher's ClientID is not at
/// hand (wills, messages given back): its publishing session.
pub(super) fn origin_key(msg: &Message) -> u64 {
    msg.origin.map_or(0, |uid| mix(uid.0))
}

/// Takes from `s` what goes back to the groups: every shared delivery not yet
/// sent, and every shared QoS 1 delivery not acknowledged, oldest first.
/// Shared QoS 2 deliveries already sent stay. Returns the deliveries and how
/// many QoS 2 deliveries stayed awaiting their PUBREC.
fn take_shared(s: &mut Session) -> (Vec<Returned>, u64) {
    let mut out = Vec::new();
    let mut qos2_unanswered = 0;
    s.retain_inflight(|i| {
        let Some(key) = &i.delivery.share else {
            return true;
        };
        match i.delivery.qos {
            QoS::AtLeastOnce => {
                out.push((key.clone(), i.delivery.message.clone()));
                false
            }
            _ => {
                if i.state == crate::session::InflightState::Published {
                    qos2_unanswered += 1;
                }
                true
            }
        }
    });
    // Shared deliveries in the disk tail stay with the member (see
    // docs/PERSISTENCE.md, "Offline queues on disk").
    for d in s.queue.take_head_where(|d| d.share.is_some()) {
        out.push((d.share.expect("selected shared"), d.message));
    }
    (out, qos2_unanswered)
}

impl Engine {
    /// Session `idx` subscribes to the validated shared filter `filter`, or
    /// replaces its options. Returns true when it is this shard's first member
    /// of the share: every other shard is told with acknowledgement token
    /// `token`, and the SUBACK waits for them.
    pub(super) fn shared_subscribe(
        &mut self,
        idx: SessionIdx,
        filter: &str,
        entry: SubscriptionEntry,
        token: u64,
    ) -> bool {
        let id = self.shared.get_or_insert(share_key(filter));
        let share = self.shared.share_mut(id);
        let first = share.members.is_empty();
        match share.members.iter_mut().find(|(i, _)| *i == idx) {
            Some(member) => member.1 = entry,
            None => {
                share.members.push((idx, entry));
                self.shared.members_len += 1;
            }
        }
        self.shared_announce(id, first.then_some(token));
        first
    }

    /// At restore: shard `from` stored `offline` member sessions of the
    /// validated shared filter `filter`.
    pub(super) fn shared_restore_remote(&mut self, filter: &str, from: ShardId, offline: u32) {
        self.shared_on_route(from, share_key(filter), (0, offline), None);
    }

    /// Session `idx` leaves the share of the validated shared filter `filter`.
    /// Deliveries already made to it stay (section 3.10.4).
    pub(super) fn shared_unsubscribe(&mut self, filter: &str, idx: SessionIdx) {
        let Some(&id) = self.shared.by_key.get(&share_key(filter)) else {
            return;
        };
        let members = &mut self.shared.share_mut(id).members;
        if let Some(pos) = members.iter().position(|(i, _)| *i == idx) {
            members.remove(pos);
            self.shared.members_len -= 1;
            self.shared_announce(id, None);
        }
    }

    /// The connection of session `idx` ended and the session persists: its
    /// memberships count as offline, and what it has not been sent or not
    /// acknowledged at QoS 1 goes back to the groups.
    pub(super) fn shared_member_offline(&mut self, now_ms: u64, idx: SessionIdx) {
        if !self.shared_announce_session(idx) {
            return;
        }
        let (returned, _) = self.with_session_queue(idx, take_shared);
        self.shared_return(now_ms, returned);
    }

    /// Session `idx` has a connection again: its memberships count as
    /// connected.
    pub(super) fn shared_member_online(&mut self, idx: SessionIdx) {
        self.shared_announce_session(idx);
    }

    /// Session `s` ended and its memberships are gone: what it was not sent or
    /// did not acknowledge at QoS 1 goes back to the groups. QoS 2 deliveries
    /// it was sent and did not answer with PUBREC go nowhere [MQTT-4.8.2-5].
    pub(super) fn shared_session_ended(&mut self, now_ms: u64, s: &mut Session) {
        let (returned, lost) = take_shared(s);
        self.stats.dropped_shared_qos2_member_ended += lost;
        self.shared_return(now_ms, returned);
    }

    /// Re-announces the shares session `idx` is a member of; false when none.
    fn shared_announce_session(&mut self, idx: SessionIdx) -> bool {
        if self.shared.members_len == 0 {
            return false;
        }
        let ids: Vec<ShareId> = self
            .session(idx)
            .subscriptions
            .keys()
            .filter(|f| topic::is_shared(f))
            .filter_map(|f| self.shared.by_key.get(&share_key(f)).copied())
            .collect();
        for &id in &ids {
            self.shared_announce(id, None);
        }
        !ids.is_empty()
    }

    /// Sends a publication of this shard to one member of each share whose
    /// filter matches its topic. `key` is the publisher's ClientID hash.
    /// `ack` is the publisher's acknowledgement token under `sync` durability
    /// (see [`SharedAck`]).
    pub(super) fn shared_publish(
        &mut self,
        now_ms: u64,
        msg: &Message,
        key: u64,
        ack: Option<u64>,
    ) {
        let ack = match ack {
            Some(token) if msg.qos != QoS::AtMostOnce => SharedAck::Local(token),
            _ => SharedAck::None,
        };
        if self.shared.routes.is_empty() {
            return;
        }
        let mut ids = std::mem::take(&mut self.shared.matches);
        ids.clear();
        self.shared
            .routes
            .for_each_match(&msg.topic, |id, ()| ids.push(*id));
        for &id in &ids {
            // A will published while delivering may have ended a share.
            if self.shared.shares[id as usize].is_some() {
                self.shared_send(now_ms, id, msg.clone(), key, ack);
            }
        }
        self.shared.matches = ids;
    }

    /// A `MeshMsg::ShareRoute` from `from`.
    pub(super) fn shared_on_route(
        &mut self,
        from: ShardId,
        key: ShareKey,
        counts: (u32, u32),
        ack: Option<u64>,
    ) {
        assert!(from != self.shard, "a shard announces to the others only");
        let (connected, offline) = counts;
        let id = match self.shared.by_key.get(&key) {
            Some(&id) => Some(id),
            None if connected > 0 || offline > 0 => Some(self.shared.get_or_insert(key)),
            None => None,
        };
        if let Some(id) = id {
            let counts = ShardMembers {
                shard: from,
                connected,
                offline,
            };
            self.shared.set_counts(id, counts);
            self.shared.drop_if_unused(id);
        }
        if let Some(token) = ack {
            self.outbox[usize::from(from)].push(MeshMsg::Ack { token });
        }
    }

    /// A `MeshMsg::SharedPublish`: this shard was chosen for `msg`.
    pub(super) fn shared_on_publish(
        &mut self,
        now_ms: u64,
        key: ShareKey,
        msg: Message,
        hash: u64,
        chain: Chain,
    ) {
        match self.shared.by_key.get(&key) {
            Some(&id) => self.shared_arrive(now_ms, id, msg, hash, chain),
            None => {
                let mark = self.store_mark();
                self.shared_unplaced(key, msg, hash, chain, mark);
            }
        }
    }

    /// This shard is the last of a delivery's chain (it handed the message to
    /// a member or dropped it): a publisher on another shard waiting for it
    /// gets its `Ack`, at once when the delivery stored nothing since `mark`
    /// (a non-persistent member, QoS 0 granted, a drop), else after the
    /// commit of what it stored.
    fn shared_answer(&mut self, ack: SharedAck, mark: usize) {
        let SharedAck::Remote { origin, token } = ack else {
            return;
        };
        if self.store_mark() == mark {
            self.ack_now(origin, token);
        } else {
            self.ack_after_commit(origin, token);
        }
    }

    /// Announces this shard's member counts of share `id` to every other shard
    /// when they changed, or when `ack` asks for an acknowledgement.
    fn shared_announce(&mut self, id: ShareId, ack: Option<u64>) {
        let (mut connected, mut offline) = (0u32, 0u32);
        for (idx, _) in &self.shared.share(id).members {
            let s = self.session(*idx);
            if s.conn.is_some() {
                connected += 1;
            } else if s.is_persistent() {
                offline += 1;
            }
        }
        let counts = ShardMembers {
            shard: self.shard,
            connected,
            offline,
        };
        let share = self.shared.share(id);
        let before = share
            .shards
            .iter()
            .find(|m| m.shard == self.shard)
            .map_or((0, 0), |m| (m.connected, m.offline));
        if before == (connected, offline) && ack.is_none() {
            return;
        }
        let key = share.key.clone();
        self.shared.set_counts(id, counts);
        // In a cluster the forwarder (the remote id) learns them too: it routes
        // the share to this node (`engine::remote`).
        for to in 0..self.shard_count as ShardId + ShardId::from(self.remote.is_some()) {
            if to != self.shard {
                self.outbox[usize::from(to)].push(MeshMsg::ShareRoute {
                    group: key.group.clone(),
                    filter: key.filter.clone(),
                    shard: self.shard,
                    connected,
                    offline,
                    ack,
                });
            }
        }
        self.shared.drop_if_unused(id);
    }

    /// Sends `msg` to the group again, in order, without recursing when
    /// sending makes further members leave.
    fn shared_return(&mut self, now_ms: u64, returned: Vec<Returned>) {
        self.stats.shared_returned += returned.len() as u64;
        self.shared.returned.extend(returned);
        if self.shared.draining {
            return;
        }
        self.shared.draining = true;
        while let Some((key, msg)) = self.shared.returned.pop_front() {
            match self.shared.by_key.get(&*key) {
                Some(&id) => {
                    let hash = origin_key(&msg);
                    self.shared_send(now_ms, id, msg, hash, SharedAck::None);
                }
                None => self.stats.dropped_shared_no_member += 1,
            }
        }
        self.shared.draining = false;
    }

    /// The publishing side: picks a shard for `msg` by strategy, preferring
    /// shards with connected members.
    fn shared_send(&mut self, now_ms: u64, id: ShareId, msg: Message, hash: u64, ack: SharedAck) {
        let none = ShardSet::new();
        let to = self
            .shared_pick_shard(id, hash, Tier::Connected, &none)
            .or_else(|| self.shared_pick_shard(id, hash, Tier::Offline, &none));
        let chain = Chain {
            tried: none,
            hops: 0,
            handed_back: false,
            ack,
        };
        match to {
            Some(to) if to == self.shard => self.shared_arrive(now_ms, id, msg, hash, chain),
            Some(to) => self.shared_forward(to, id, msg, hash, chain),
            None => self.stats.dropped_shared_no_member += 1,
        }
    }

    /// The chosen shard's side: a connected local member, else a connected
    /// member on a shard not tried yet, else an offline local member, else an
    /// offline member elsewhere; else the message is dropped.
    fn shared_arrive(
        &mut self,
        now_ms: u64,
        id: ShareId,
        msg: Message,
        hash: u64,
        mut chain: Chain,
    ) {
        let mark = self.store_mark();
        if let Some(member) = self.shared_pick_member(id, hash, Tier::Connected) {
            return self.shared_take(now_ms, id, member, msg, &chain, mark);
        }
        chain.tried.insert(self.shard);
        // Each forward adds a shard to `tried` for connected members, so those
        // end within shard_count hops; offline ones are bounded by the count.
        let hops_left = usize::from(chain.hops) < 2 * self.shard_count;
        if hops_left
            && let Some(to) = self.shared_pick_shard(id, hash, Tier::Connected, &chain.tried)
        {
            return self.shared_forward(to, id, msg, hash, chain);
        }
        if let Some(member) = self.shared_pick_member(id, hash, Tier::Offline) {
            return self.shared_take(now_ms, id, member, msg, &chain, mark);
        }
        let mut others = ShardSet::new();
        others.insert(self.shard);
        if hops_left && let Some(to) = self.shared_pick_shard(id, hash, Tier::Offline, &others) {
            return self.shared_forward(to, id, msg, hash, chain);
        }
        let key = ShareKey::clone(&self.shared.share(id).key);
        self.shared_unplaced(key, msg, hash, chain, mark);
    }

    /// Hands `msg` to `member`, this shard being the last of its chain, and
    /// answers whoever waits for it on another shard (`SharedAck::Remote`):
    /// when the delivery made the member congested (back-pressure), once the
    /// member drained or at the hold bound, as a `PublishDurable` for a plain
    /// subscriber is answered; else as [`Engine::shared_answer`] says. A
    /// publisher on this shard (`SharedAck::Local`) is held by the routing
    /// `bp_begin_local` started already.
    fn shared_take(
        &mut self,
        now_ms: u64,
        id: ShareId,
        member: (SessionIdx, SubscriptionEntry),
        msg: Message,
        chain: &Chain,
        mark: usize,
    ) {
        let SharedAck::Remote { origin, token } = chain.ack else {
            self.shared_deliver(now_ms, id, member, msg);
            return self.shared_answer(chain.ack, mark);
        };
        // A record another node forwarded: a member that held a batch the
        // whole bound holds no further batch until it drains, as for plain
        // subscribers (`backpressure`, `Congested::stuck`).
        let forwarded = self.remote.is_some_and(|r| chain.tried.contains(r));
        self.bp_begin_remote(origin, token, msg.qos, forwarded);
        self.shared_deliver(now_ms, id, member, msg);
        if !self.bp_end_remote() {
            self.shared_answer(chain.ack, mark);
        }
    }

    /// No member on this node takes `msg` (its members left after the
    /// sender chose this node, or none is left on the shards it could try).
    /// A message another node gave this node goes back to the group through
    /// the forwarder, which gives it to another node with members of the
    /// share (once: a node that cannot place a handed-back message drops it,
    /// so two nodes whose tables are both stale cannot pass it to and fro);
    /// whoever waits for it (the batch that brought it, under `sync`
    /// durability) now waits for that node's answer. Anything else is
    /// dropped and counted, and its waiter answered.
    fn shared_unplaced(
        &mut self,
        key: ShareKey,
        msg: Message,
        hash: u64,
        chain: Chain,
        mark: usize,
    ) {
        let from_node = self.remote.filter(|r| chain.tried.contains(*r));
        let ack = match chain.ack {
            SharedAck::None => Some(None),
            SharedAck::Remote { origin, token } => Some(Some((origin, token))),
            // A publisher on this shard: the message never came from a node.
            SharedAck::Local(_) => None,
        };
        if let (Some(remote), Some(ack), false) = (from_node, ack, chain.handed_back) {
            self.stats.shared_handed_back += 1;
            let msg = MeshMsg::SharedPublish {
                group: key.group,
                filter: key.filter,
                message: msg,
                key: hash,
                tried: chain.tried,
                hops: chain.hops.saturating_add(1),
                handed_back: true,
                ack,
            };
            self.outbox[usize::from(remote)].push(msg);
            return;
        }
        self.stats.dropped_shared_no_member += 1;
        self.shared_answer(chain.ack, mark);
    }

    /// Passes `message` on to shard `to`, one hop further. A publisher on
    /// this shard waiting for it (`SharedAck::Local`) now waits for one more
    /// `Ack`, from the shard that finally takes the message.
    fn shared_forward(
        &mut self,
        to: ShardId,
        id: ShareId,
        message: Message,
        key: u64,
        chain: Chain,
    ) {
        // The publisher's own QoS 2 publication with a number leaves after
        // its packet id's commit, like `PublishDurable` (`exactly_once`).
        let after_commit = self.publish_seq != 0 && matches!(chain.ack, SharedAck::Local(_));
        // A QoS 1/2 publication of a client of this shard that carries no token
        // yet (no `sync` durability, no cluster) gets one while `to` announced
        // congested sessions, so `to` can hold the acknowledgement if the
        // member is one of them, as for a plain subscriber (`backpressure`).
        let chain_ack = match chain.ack {
            SharedAck::None if message.qos != QoS::AtMostOnce => self
                .bp_forward_token(to)
                .map_or(SharedAck::None, SharedAck::Local),
            ack => ack,
        };
        let ack = match chain_ack {
            SharedAck::None => None,
            SharedAck::Local(token) => {
                let (_, missing) = self
                    .pending_retains
                    .get_mut(&token)
                    .expect("a held acknowledgement has its token");
                *missing += 1;
                Some((self.shard, token))
            }
            SharedAck::Remote { origin, token } => Some((origin, token)),
        };
        let share = &self.shared.share(id).key;
        let msg = MeshMsg::SharedPublish {
            group: share.group.clone(),
            filter: share.filter.clone(),
            message,
            key,
            tried: chain.tried,
            hops: chain.hops + 1,
            handed_back: chain.handed_back,
            ack,
        };
        self.stats.shared_forwards_sent += 1;
        self.send_after_id_commit(to, msg, after_commit);
    }

    /// Hands `msg` to one member with that member's subscription options:
    /// granted QoS, retain as published, subscription identifier.
    fn shared_deliver(
        &mut self,
        now_ms: u64,
        id: ShareId,
        (idx, entry): (SessionIdx, SubscriptionEntry),
        msg: Message,
    ) {
        let d = Delivery {
            qos: delivery_qos(msg.qos, entry.options.qos),
            retain: entry.options.retain_as_published && msg.retain,
            subscription_ids: entry.subscription_id.into_iter().collect(),
            share: Some(self.shared.share(id).key.clone()),
            message: msg,
            seq: 0,
        };
        self.enqueue(now_ms, idx, d);
    }

    /// A shard with members of `tier`, not in `skip`, weighted by their count.
    fn shared_pick_shard(
        &mut self,
        id: ShareId,
        hash: u64,
        tier: Tier,
        skip: &ShardSet,
    ) -> Option<ShardId> {
        let strategy = self.limits.shared_subscription_strategy;
        let random = match strategy {
            SharedStrategy::Random => self.shared.next_random(),
            _ => 0,
        };
        let share = self.shared.share_mut(id);
        let weight = |m: &ShardMembers| {
            if skip.contains(m.shard) {
                return 0;
            }
            u64::from(match tier {
                Tier::Connected => m.connected,
                Tier::Offline => m.offline,
            })
        };
        let total: u64 = share.shards.iter().map(weight).sum();
        if total == 0 {
            return None;
        }
        let mut slot = match strategy {
            SharedStrategy::RoundRobin => {
                let slot = share.shard_cursor % total;
                share.shard_cursor = share.shard_cursor.wrapping_add(1);
                slot
            }
            SharedStrategy::Random => random % total,
            SharedStrategy::Sticky => 0,
            SharedStrategy::HashClientId => hash % total,
        };
        for m in &share.shards {
            let w = weight(m);
            if slot < w {
                return Some(m.shard);
            }
            slot -= w;
        }
        unreachable!("slot below the total weight");
    }

    /// A local member of `tier`, by strategy: the scan starts where the
    /// strategy says and takes the first member that qualifies, so it is
    /// O(1) while most members are connected. Round robin and random pass
    /// over connected members whose queue is at the high-water mark (a
    /// QoS 1/2 delivery would make them congested and hold its publisher,
    /// `backpressure`) while another connected member here is below it, so
    /// a slow member does not hold publishers a reading one could serve;
    /// only when every connected member here is at the mark does the
    /// strategy's own pick take one (and hold the publisher). Sticky and
    /// hash keep their member: they promise the same member for the group
    /// or the publisher, and the order that gives.
    fn shared_pick_member(
        &mut self,
        id: ShareId,
        hash: u64,
        tier: Tier,
    ) -> Option<(SessionIdx, SubscriptionEntry)> {
        let strategy = self.limits.shared_subscription_strategy;
        let random = match strategy {
            SharedStrategy::Random => self.shared.next_random(),
            _ => 0,
        };
        // While back-pressure is on, a pass over the connected members that
        // a delivery would not make congested comes first.
        let full = match tier {
            Tier::Connected
                if self.bp_on()
                    && matches!(
                        strategy,
                        SharedStrategy::RoundRobin | SharedStrategy::Random
                    ) =>
            {
                self.limits.queue_high_water
            }
            _ => usize::MAX,
        };
        let sessions = &self.sessions;
        let share = self.shared.shares[id as usize].as_mut()?;
        let n = share.members.len();
        if n == 0 {
            return None;
        }
        let start = match strategy {
            SharedStrategy::RoundRobin => share.member_cursor % n,
            SharedStrategy::Random => (random % n as u64) as usize,
            SharedStrategy::Sticky => 0,
            // Remixed: the shard pick already used `hash % total`.
            SharedStrategy::HashClientId => (mix(hash) % n as u64) as usize,
        };
        for pass in 0..1 + usize::from(full != usize::MAX) {
            let bound = if pass == 0 { full } else { usize::MAX };
            for k in 0..n {
                let i = (start + k) % n;
                let (idx, entry) = share.members[i];
                let s = sessions[idx as usize]
                    .as_ref()
                    .expect("members are live sessions");
                let qualifies = match tier {
                    Tier::Connected => s.conn.is_some(),
                    Tier::Offline => s.conn.is_none() && s.is_persistent(),
                };
                if qualifies && s.queue.len() < bound {
                    share.member_cursor = i + 1;
                    return Some((idx, entry));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    //! Goal: one member per message and group, across shards, with every
    //! strategy; what a departing member leaves goes back to the group as the
    //! module docs say; retained messages and refusals per the spec. Method:
    //! engines of a small cluster exchange their mesh outboxes until quiet;
    //! clients are v5 connections placed on a chosen shard, and the tests
    //! assert the packets each one is sent.

    use std::collections::HashMap;

    use bytes::Bytes;
    use tessera_proto::{
        ConnectProperties, Packet, ProtocolVersion, Publish, QoS, ReasonCode, Str, Subscribe,
        SubscribeProperties, Subscription, SubscriptionOptions, Unsubscribe,
    };

    use super::SharedStrategy;
    use crate::engine::{Engine, Limits};
    use crate::session::ConnId;

    struct Cluster {
        engines: Vec<Engine>,
        now_ms: u64,
        /// Packets read for a client and not yet asked for.
        inbox: HashMap<(usize, ConnId), Vec<Packet>>,
    }

    /// A client: its shard and connection.
    #[derive(Clone, Copy)]
    struct Client {
        shard: usize,
        conn: ConnId,
    }

    impl Cluster {
        fn new(shards: usize, strategy: SharedStrategy) -> Cluster {
            let limits = Limits {
                shared_subscription_strategy: strategy,
                ..Limits::default()
            };
            Cluster {
                engines: crate::engine::testing::engines(shards, &limits),
                now_ms: 1_000,
                inbox: HashMap::new(),
            }
        }

        /// Delivers mesh messages until none is left.
        fn pump(&mut self) {
            crate::engine::testing::pump_mesh(&mut self.engines, self.now_ms);
        }

        /// Connects `id` on `shard`; a persistent session lives 60 s.
        fn connect(&mut self, shard: usize, id: &str, persistent: bool) -> Client {
            let mut connect =
                crate::engine::testing::connect_packet(ProtocolVersion::V5, id, !persistent);
            connect.properties = ConnectProperties {
                session_expiry_interval: persistent.then_some(60),
                ..Default::default()
            };
            let conn = self.engines[shard].connect(self.now_ms, connect, false);
            let c = Client { shard, conn };
            let mut packets = self.recv(c);
            match packets.first() {
                Some(Packet::ConnAck(ack)) => {
                    assert_eq!(ack.reason_code, ReasonCode::Success);
                    assert_eq!(ack.properties.shared_subscription_available, Some(true));
                }
                other => panic!("expected CONNACK, got {other:?}"),
            }
            packets.remove(0);
            self.inbox.insert((shard, conn), packets);
            c
        }

        fn send(&mut self, c: Client, packet: Packet) {
            self.engines[c.shard].handle_packet(self.now_ms, c.conn, packet);
            self.pump();
        }

        /// Everything sent to `c` so far.
        fn recv(&mut self, c: Client) -> Vec<Packet> {
            let e = &mut self.engines[c.shard];
            let mut out = self.inbox.remove(&(c.shard, c.conn)).unwrap_or_default();
            // Writing frees room: queued deliveries follow until none is left.
            loop {
                let packets = crate::engine::testing::drain(e, c.conn, ProtocolVersion::V5);
                if packets.is_empty() {
                    return out;
                }
                e.flushed(self.now_ms, c.conn);
                out.extend(packets);
            }
        }

        /// Subscribes and returns the SUBACK reason codes.
        fn subscribe(
            &mut self,
            c: Client,
            filter: &str,
            qos: QoS,
            id: Option<u32>,
        ) -> Vec<ReasonCode> {
            let sub = Subscribe {
                packet_id: 1,
                properties: SubscribeProperties {
                    subscription_identifier: id,
                    ..Default::default()
                },
                subscriptions: vec![Subscription {
                    filter: Str::try_from(filter).unwrap(),
                    options: SubscriptionOptions::qos(qos),
                }],
            };
            self.send(c, Packet::Subscribe(sub));
            match &self.recv(c)[..] {
                [Packet::SubAck(ack)] => ack.reason_codes.clone(),
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }

        fn publish(&mut self, c: Client, topic: &str, payload: &str, qos: QoS, retain: bool) {
            let mut p = Publish::new(
                Str::try_from(topic).unwrap(),
                Bytes::from(payload.to_owned()),
            );
            p.qos = qos;
            p.retain = retain;
            p.packet_id = if qos == QoS::AtMostOnce { 0 } else { 1 };
            self.send(c, Packet::Publish(p));
            // The publisher's acknowledgement; QoS 2 is released at once.
            let acks = self.recv(c);
            if qos == QoS::ExactlyOnce {
                assert!(matches!(acks[..], [Packet::PubRec(_)]), "{acks:?}");
                self.send(c, Packet::PubRel(tessera_proto::PubRel::new(1)));
                self.recv(c);
            }
        }

        /// Payloads of the PUBLISH packets sent to `c`, unacknowledged.
        fn payloads(&mut self, c: Client) -> Vec<String> {
            self.publishes(c)
                .into_iter()
                .map(|p| String::from_utf8(p.payload.to_vec()).unwrap())
                .collect()
        }

        /// Payloads sent to `c`, acknowledging QoS 1 ones, until no more come.
        fn payloads_acked(&mut self, c: Client) -> Vec<String> {
            let mut all = Vec::new();
            loop {
                let got = self.publishes(c);
                if got.is_empty() {
                    return all;
                }
                for p in got {
                    if p.qos == QoS::AtLeastOnce {
                        let ack = tessera_proto::PubAck::new(p.packet_id);
                        self.send(c, Packet::PubAck(ack));
                    }
                    all.push(String::from_utf8(p.payload.to_vec()).unwrap());
                }
            }
        }

        fn publishes(&mut self, c: Client) -> Vec<Publish> {
            self.recv(c)
                .into_iter()
                .filter_map(|p| match p {
                    Packet::Publish(p) => Some(p),
                    _ => None,
                })
                .collect()
        }

        fn drop_connection(&mut self, c: Client) {
            self.engines[c.shard].connection_lost(self.now_ms, c.conn);
            self.engines[c.shard].release(self.now_ms, c.conn);
            self.pump();
        }
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    fn numbered(n: usize) -> Vec<String> {
        sorted((0..n).map(|k| format!("m{k}")).collect())
    }

    #[test]
    fn share_names_are_checked_and_a_valid_share_is_granted() {
        let mut cl = Cluster::new(1, SharedStrategy::RoundRobin);
        let a = cl.connect(0, "a", false);
        for bad in [
            "$share//t",
            "$share/g+/t",
            "$share/g#/t",
            "$share/g",
            "$share/g/",
            "$share/g/a/#/b",
        ] {
            assert_eq!(
                cl.subscribe(a, bad, QoS::AtLeastOnce, None),
                [ReasonCode::TopicFilterInvalid],
                "{bad}"
            );
        }
        for good in ["$share/g/#", "$share/g/+/x", "$share/g//x"] {
            assert_eq!(
                cl.subscribe(a, good, QoS::ExactlyOnce, None),
                [ReasonCode::GrantedQoS2],
                "{good}"
            );
        }
        assert_eq!(cl.engines[0].subscription_count(), 3);
    }

    /// Members on two shards, publishers on both: each message goes to exactly
    /// one member, all of them get some, and a normal subscriber gets all.
    #[test]
    fn each_message_goes_to_one_member_across_shards() {
        for strategy in [
            SharedStrategy::RoundRobin,
            SharedStrategy::Random,
            SharedStrategy::Sticky,
            SharedStrategy::HashClientId,
        ] {
            let mut cl = Cluster::new(2, strategy);
            let members: Vec<Client> = (0..4)
                .map(|k| cl.connect(k % 2, &format!("m{k}"), false))
                .collect();
            for &m in &members {
                assert_eq!(
                    cl.subscribe(m, "$share/g/t/+", QoS::AtMostOnce, None),
                    [ReasonCode::Success]
                );
            }
            let plain = cl.connect(1, "plain", false);
            cl.subscribe(plain, "t/+", QoS::AtMostOnce, None);
            let publishers = [cl.connect(0, "p0", false), cl.connect(1, "p1", false)];
            for k in 0..40 {
                cl.publish(
                    publishers[k % 2],
                    "t/x",
                    &format!("m{k}"),
                    QoS::AtMostOnce,
                    false,
                );
            }
            let got: Vec<Vec<String>> = members.iter().map(|&m| cl.payloads(m)).collect();
            let all = sorted(got.concat());
            assert_eq!(all, numbered(40), "{strategy:?}: {got:?}");
            assert_eq!(sorted(cl.payloads(plain)), numbered(40));
            match strategy {
                SharedStrategy::RoundRobin => {
                    assert!(got.iter().all(|g| g.len() == 10), "{strategy:?}: {got:?}")
                }
                SharedStrategy::Random => assert!(got.iter().all(|g| !g.is_empty()), "{got:?}"),
                // The earliest member on the lowest shard takes everything.
                SharedStrategy::Sticky => assert_eq!(got[0].len(), 40, "{got:?}"),
                // One member per publisher (p0 sent the even ones).
                SharedStrategy::HashClientId => {
                    for parity in [0, 1] {
                        let of_publisher =
                            |m: &String| m[1..].parse::<u32>().unwrap() % 2 == parity;
                        let takers = got.iter().filter(|g| g.iter().any(of_publisher));
                        assert_eq!(takers.count(), 1, "{got:?}");
                    }
                }
            }
        }
    }

    /// Each member's own options apply: its granted QoS and its subscription
    /// identifier. Two groups on one filter each get one copy.
    #[test]
    fn member_options_apply_and_groups_are_independent() {
        let mut cl = Cluster::new(2, SharedStrategy::Sticky);
        let a = cl.connect(0, "a", false);
        let b = cl.connect(1, "b", false);
        cl.subscribe(a, "$share/g1/q", QoS::AtMostOnce, Some(7));
        cl.subscribe(b, "$share/g2/q", QoS::AtLeastOnce, Some(9));
        let p = cl.connect(1, "p", false);
        cl.publish(p, "q", "x", QoS::ExactlyOnce, false);
        let pa = cl.publishes(a);
        let pb = cl.publishes(b);
        assert_eq!((pa.len(), pb.len()), (1, 1));
        assert_eq!(pa[0].qos, QoS::AtMostOnce);
        assert_eq!(pa[0].properties.subscription_identifiers, [7]);
        assert_eq!(pb[0].qos, QoS::AtLeastOnce);
        assert_eq!(pb[0].properties.subscription_identifiers, [9]);
    }

    /// Section 3.8.4: no retained message on a shared subscribe; later
    /// retained publications are delivered like any other.
    #[test]
    fn retained_messages_are_not_sent_on_shared_subscribe() {
        let mut cl = Cluster::new(2, SharedStrategy::RoundRobin);
        let p = cl.connect(0, "p", false);
        cl.publish(p, "r/t", "old", QoS::AtLeastOnce, true);
        let a = cl.connect(1, "a", false);
        cl.subscribe(a, "$share/g/r/#", QoS::AtLeastOnce, None);
        assert!(cl.payloads(a).is_empty());
        cl.publish(p, "r/t", "new", QoS::AtLeastOnce, true);
        let got = cl.publishes(a);
        assert_eq!(got.len(), 1);
        assert!(!got[0].retain, "RETAIN is 0 without retain-as-published");
    }

    #[test]
    fn unsubscribe_ends_the_membership() {
        let mut cl = Cluster::new(2, SharedStrategy::RoundRobin);
        let a = cl.connect(0, "a", false);
        let b = cl.connect(1, "b", false);
        cl.subscribe(a, "$share/g/u", QoS::AtMostOnce, None);
        cl.subscribe(b, "$share/g/u", QoS::AtMostOnce, None);
        let unsub = Unsubscribe {
            packet_id: 2,
            properties: Default::default(),
            filters: vec![Str::from_static("$share/g/u")],
        };
        cl.send(a, Packet::Unsubscribe(unsub));
        assert_eq!(cl.engines[0].subscription_count(), 0);
        let p = cl.connect(0, "p", false);
        for k in 0..6 {
            cl.publish(p, "u", &format!("m{k}"), QoS::AtMostOnce, false);
        }
        assert!(cl.payloads(a).is_empty());
        assert_eq!(sorted(cl.payloads(b)), numbered(6));
    }

    /// A member without a persistent session drops its connection with QoS 1
    /// deliveries unacknowledged and queued: the other member gets them all.
    #[test]
    fn a_leaving_members_qos1_deliveries_go_to_another_member() {
        let mut cl = Cluster::new(2, SharedStrategy::Sticky);
        let a = cl.connect(0, "a", false);
        let b = cl.connect(1, "b", false);
        cl.subscribe(a, "$share/g/w", QoS::AtLeastOnce, None);
        cl.subscribe(b, "$share/g/w", QoS::AtLeastOnce, None);
        let p = cl.connect(1, "p", false);
        // Sticky: `a` gets everything; 40 exceed its window of 32, so some queue.
        for k in 0..40 {
            cl.publish(p, "w", &format!("m{k}"), QoS::AtLeastOnce, false);
        }
        assert_eq!(cl.payloads(a).len(), 32);
        cl.drop_connection(a);
        assert_eq!(sorted(cl.payloads_acked(b)), numbered(40));
        assert_eq!(cl.engines[0].stats().shared_returned, 40);
    }

    /// A persistent member: QoS 1 not acknowledged and everything queued go
    /// to the group when the connection drops; a QoS 2 delivery already sent
    /// stays and is completed on reconnect [MQTT-4.8.2-4].
    #[test]
    fn a_persistent_member_keeps_sent_qos2_and_gives_back_the_rest() {
        let mut cl = Cluster::new(2, SharedStrategy::Sticky);
        let a = cl.connect(0, "a", true);
        cl.subscribe(a, "$share/g/w", QoS::ExactlyOnce, None);
        let b = cl.connect(1, "b", false);
        cl.subscribe(b, "$share/g/w", QoS::ExactlyOnce, None);
        let p = cl.connect(1, "p", false);
        cl.publish(p, "w", "q2", QoS::ExactlyOnce, false);
        cl.publish(p, "w", "q1", QoS::AtLeastOnce, false);
        assert_eq!(cl.payloads(a), ["q2", "q1"]);
        cl.drop_connection(a);
        assert_eq!(cl.payloads(b), ["q1"]);
        // Offline, `a` is not chosen while `b` is connected.
        cl.publish(p, "w", "later", QoS::AtLeastOnce, false);
        assert_eq!(cl.payloads(b), ["later"]);
        let a = cl.connect(0, "a", true);
        let again = cl.publishes(a);
        assert_eq!(again.len(), 1);
        assert!(again[0].dup && &again[0].payload[..] == b"q2", "{again:?}");
    }

    /// A QoS 2 delivery sent to a member whose session then ends goes to no
    /// one [MQTT-4.8.2-5], and is counted.
    #[test]
    fn sent_qos2_is_dropped_when_the_members_session_ends() {
        let mut cl = Cluster::new(1, SharedStrategy::Sticky);
        let a = cl.connect(0, "a", false);
        let b = cl.connect(0, "b", false);
        cl.subscribe(a, "$share/g/w", QoS::ExactlyOnce, None);
        cl.subscribe(b, "$share/g/w", QoS::ExactlyOnce, None);
        let p = cl.connect(0, "p", false);
        cl.publish(p, "w", "q2", QoS::ExactlyOnce, false);
        assert_eq!(cl.payloads(a), ["q2"]);
        cl.drop_connection(a);
        assert!(cl.payloads(b).is_empty());
        assert_eq!(cl.engines[0].stats().dropped_shared_qos2_member_ended, 1);
    }

    /// With no member connected, a persistent member queues the messages
    /// and gets them when it reconnects.
    #[test]
    fn offline_persistent_members_queue_when_no_member_is_connected() {
        let mut cl = Cluster::new(2, SharedStrategy::RoundRobin);
        let a = cl.connect(0, "a", true);
        cl.subscribe(a, "$share/g/o", QoS::AtLeastOnce, None);
        cl.drop_connection(a);
        let p = cl.connect(1, "p", false);
        for k in 0..3 {
            cl.publish(p, "o", &format!("m{k}"), QoS::AtLeastOnce, false);
        }
        let a = cl.connect(0, "a", true);
        assert_eq!(cl.payloads(a), ["m0", "m1", "m2"]);
    }

    /// What an offline member queued while no member was connected goes to
    /// the group when its session expires.
    #[test]
    fn an_expired_members_queue_goes_back_to_the_group() {
        let mut cl = Cluster::new(2, SharedStrategy::RoundRobin);
        let a = cl.connect(0, "a", true);
        cl.subscribe(a, "$share/g/x", QoS::AtLeastOnce, None);
        cl.drop_connection(a);
        let p = cl.connect(1, "p", false);
        for k in 0..3 {
            cl.publish(p, "x", &format!("m{k}"), QoS::AtLeastOnce, false);
        }
        let b = cl.connect(1, "b", false);
        cl.subscribe(b, "$share/g/x", QoS::AtLeastOnce, None);
        assert!(cl.payloads(b).is_empty(), "queued for `a`, not moved yet");
        cl.now_ms += 61_000;
        cl.engines[0].tick(cl.now_ms);
        cl.pump();
        assert_eq!(cl.payloads(b), ["m0", "m1", "m2"]);
        assert_eq!(cl.engines[0].stats().sessions_expired, 1);
    }

    /// The chosen shard's member left before the message arrived: it goes to
    /// a member elsewhere, or, with none left, is dropped and counted.
    #[test]
    fn a_shard_that_lost_its_member_passes_the_message_on() {
        let mut cl = Cluster::new(2, SharedStrategy::RoundRobin);
        let y = cl.connect(0, "y", false);
        let x = cl.connect(1, "x", false);
        cl.subscribe(y, "$share/g/r", QoS::AtMostOnce, None);
        cl.subscribe(x, "$share/g/r", QoS::AtMostOnce, None);
        let p = cl.connect(0, "p", false);
        // Round robin: slot 0 is shard 0 (local), slot 1 shard 1 (forwarded).
        for k in 0..2 {
            let mut publish = Publish::new(Str::from_static("r"), Bytes::from(format!("m{k}")));
            publish.qos = QoS::AtMostOnce;
            cl.engines[0].handle_packet(cl.now_ms, p.conn, Packet::Publish(publish));
        }
        // `x` leaves while the forward is on its way.
        cl.engines[1].connection_lost(cl.now_ms, x.conn);
        cl.pump();
        assert_eq!(cl.payloads(y), ["m0", "m1"]);
        assert_eq!(cl.engines[1].stats().dropped_shared_no_member, 0);

        // Now `y` is the only member and leaves likewise: nobody is left.
        let y2 = cl.connect(1, "y2", false);
        cl.drop_connection(y);
        cl.subscribe(y2, "$share/g/r", QoS::AtMostOnce, None);
        let publish = Publish::new(Str::from_static("r"), Bytes::from_static(b"lost"));
        cl.engines[0].handle_packet(cl.now_ms, p.conn, Packet::Publish(publish));
        cl.engines[1].connection_lost(cl.now_ms, y2.conn);
        cl.pump();
        assert_eq!(cl.engines[1].stats().dropped_shared_no_member, 1);
    }

    /// Commits everything every shard stored so far, as the store writer
    /// would, and delivers what the commits release.
    fn commit_all(cl: &mut Cluster) {
        for e in &mut cl.engines {
            if let Some(batch) = e.take_store_batch() {
                e.store_committed(batch.epoch);
            }
        }
        cl.pump();
    }

    /// The PUBACK of a QoS 1 message for member `member_persistent` of a
    /// share whose only member is on shard 1, published on shard 0 under
    /// `sync` durability: whether it is written before shard 1 commits, and
    /// whether after.
    fn shared_puback_waits(member_persistent: bool) -> (bool, bool) {
        let mut cl = Cluster::new(2, SharedStrategy::RoundRobin);
        for e in &mut cl.engines {
            e.enable_persistence(true);
        }
        let m = cl.connect(1, "m", member_persistent);
        cl.subscribe(m, "$share/g/t", QoS::AtLeastOnce, None);
        if member_persistent {
            cl.drop_connection(m); // offline: the message is queued and stored
        }
        commit_all(&mut cl);
        let p = cl.connect(0, "p", false);
        let mut publish = Publish::new(Str::from_static("t"), Bytes::from_static(b"x"));
        publish.qos = QoS::AtLeastOnce;
        publish.packet_id = 7;
        cl.send(p, Packet::Publish(publish));
        let puback = |cl: &mut Cluster| {
            cl.recv(p)
                .iter()
                .any(|x| matches!(x, Packet::PubAck(a) if a.packet_id == 7))
        };
        let before = puback(&mut cl);
        let stored = cl.engines[1].store_ops_pending() > 0;
        assert_eq!(stored, member_persistent, "what shard 1 stored");
        commit_all(&mut cl);
        let after = before || puback(&mut cl);
        (before, after)
    }

    /// Under `sync` durability the publisher's PUBACK for a message handed
    /// to a persistent member on another shard waits for that shard's
    /// commit; for a non-persistent member it waits for nothing but the
    /// mesh answer.
    #[test]
    fn a_cross_shard_shared_delivery_is_acknowledged_after_its_commit() {
        assert_eq!(shared_puback_waits(true), (false, true));
        assert_eq!(shared_puback_waits(false), (true, true));
    }

    /// A SUBACK that waits for other shards' acknowledgements is written
    /// after the epoch holding the subscription was taken for commit; it
    /// still waits for that commit.
    #[test]
    fn a_suback_released_by_other_shards_waits_for_its_commit() {
        let mut cl = Cluster::new(2, SharedStrategy::RoundRobin);
        for e in &mut cl.engines {
            e.enable_persistence(true);
        }
        let m = cl.connect(1, "m", true);
        commit_all(&mut cl);
        let sub = Subscribe {
            packet_id: 1,
            properties: SubscribeProperties::default(),
            subscriptions: vec![Subscription {
                filter: Str::from_static("$share/g/t"),
                options: SubscriptionOptions::qos(QoS::AtLeastOnce),
            }],
        };
        cl.engines[1].handle_packet(cl.now_ms, m.conn, Packet::Subscribe(sub));
        let batch = cl.engines[1]
            .take_store_batch()
            .expect("subscription stored");
        cl.pump(); // shard 0 acknowledges the share route: the SUBACK is written
        assert!(matches!(cl.recv(m)[..], [Packet::SubAck(_)]));
        let out = cl.engines[1].output(m.conn).expect("connected");
        assert!(out.durable_epoch >= batch.epoch, "SUBACK before its commit");
    }

    /// After a restart, a group whose only members are stored sessions of
    /// another shard takes messages before that shard announces them (the
    /// listeners open before the mesh has carried any announcement).
    #[test]
    fn restored_members_on_other_shards_are_routable_before_they_announce() {
        let mut cl = Cluster::new(2, SharedStrategy::RoundRobin);
        cl.engines[0].enable_persistence(true);
        let recovered = crate::store::Recovered {
            routes: vec![
                (Str::from_static("$share/g/t"), 1),
                (Str::from_static("$share/g/t"), 1),
            ],
            ..Default::default()
        };
        cl.engines[0].restore(cl.now_ms, recovered);
        let p = cl.connect(0, "p", false);
        let mut publish = Publish::new(Str::from_static("t"), Bytes::from_static(b"x"));
        publish.qos = QoS::AtLeastOnce;
        publish.packet_id = 1;
        cl.engines[0].handle_packet(cl.now_ms, p.conn, Packet::Publish(publish));
        let mut to_member_shard = 0;
        cl.engines[0].drain_outbox(|to, batch| {
            if to == 1 {
                to_member_shard += batch
                    .iter()
                    .filter(|m| matches!(m, crate::mesh::MeshMsg::SharedPublish { .. }))
                    .count();
            }
        });
        assert_eq!(to_member_shard, 1, "the message goes to the members' shard");
        assert_eq!(cl.engines[0].stats().dropped_shared_no_member, 0);
    }

    /// A share disappears from every shard's table with its last member.
    #[test]
    fn the_share_table_forgets_a_share_without_members() {
        let mut cl = Cluster::new(3, SharedStrategy::RoundRobin);
        let a = cl.connect(2, "a", false);
        cl.subscribe(a, "$share/g/f/#", QoS::AtMostOnce, None);
        for e in &cl.engines {
            assert_eq!(e.shared.by_key.len(), 1);
        }
        cl.drop_connection(a);
        for e in &cl.engines {
            assert!(e.shared.by_key.is_empty() && e.shared.routes.is_empty());
            assert_eq!(e.shared.shares.iter().flatten().count(), 0);
        }
    }
}
