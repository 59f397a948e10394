//! Messages shards exchange. Every shard reaches every other only through these;
//! the transport (glommio channels in the broker, queues in the simulation) is
//! FIFO per ordered pair of shards, which the ordering guarantees rely on.

use tessera_proto::Str;

use crate::message::Message;
use crate::sys::SysReport;
use crate::trie::ShardSet;

/// Index of a shard, 0-based.
pub type ShardId = u16;

/// A publication's identity across the cluster, given once where it entered it
/// (the publisher's shard, to every publication it routes in a cluster): the
/// process's origin tag (random per process start, so a restarted node never
/// reuses one), the shard and that shard's count of publications of its class
/// (in the top two bits of `seq`: QoS 0, 1 and 2, and 3 for a QoS 2 publication
/// sent only after its publisher's commit under `sync` durability; each class is
/// its own sequence, sent in order to every destination). It travels with every
/// copy, to other local shards as to other nodes, so the shard a session moved to
/// can tell a copy the session already got on its old shard, or one older than a
/// publication it got there (`engine::moved`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PubId {
    /// The origin process's tag.
    pub origin: u64,
    /// The publisher's shard there.
    pub shard: ShardId,
    /// The class (bits 62-63: the QoS, or 3) and the shard's count of
    /// publications of that class (from 1).
    pub seq: u64,
}

/// The place of a publication in the batches another node forwarded: node,
/// incarnation of its forwarder, batch sequence number, index in the batch.
/// A shard stores the highest it handled per node with what the publications
/// stored (`StoreOp::PutForwardMark`), so a batch retried after a restart is
/// not delivered twice (docs/PERSISTENCE.md, "Forwarded batches").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardMark {
    /// The sending node.
    pub node: u64,
    /// Its forwarder's incarnation (a restarted sender numbers from 1 again).
    pub incarnation: u64,
    /// The batch sequence number.
    pub seq: u64,
    /// The publication's index in the batch.
    pub index: u32,
}

impl ForwardMark {
    /// Whether `self` comes at or before `other` (same node), in one
    /// incarnation of the sender.
    pub fn handled_by(&self, other: &ForwardMark) -> bool {
        self.incarnation == other.incarnation && (self.seq, self.index) <= (other.seq, other.index)
    }
}

/// One message from one shard to another.
#[derive(Debug, Clone)]
pub enum MeshMsg {
    /// A publication whose topic matched a route of the destination shard; the
    /// destination matches its own subscription trie.
    Publish {
        /// The message.
        message: Message,
        /// The publication's identity (`None` outside a cluster).
        id: Option<PubId>,
    },
    /// A publication from another node of the cluster. From the forwarder
    /// (the remote id, `engine::remote`): the receiver delivers it to its
    /// subscribers and to the other local shards that route its topic, never
    /// to another node. From another local shard: a copy to deliver here,
    /// answered `Ack { token: ack }` after the commit of what it stored when
    /// `ack` is set (as `PublishDurable`).
    Forwarded {
        /// The message.
        message: Message,
        /// Where it was in the sending node's batches (`None`: not numbered).
        mark: Option<ForwardMark>,
        /// Token to echo in `Ack` (a copy from the shard serving the batch).
        ack: Option<u64>,
        /// The publication's identity, when it has one.
        id: Option<PubId>,
        /// The sending node matched it before it had applied any route add of
        /// this node's present life: against routes of sessions this node had
        /// before it restarted. Delivered only to subscriptions older than this
        /// life (restored, or brought along by a session that moved in), never
        /// to one a SUBSCRIBE made since (`SubscriptionEntry::fresh`; seed 632).
        earlier_life: bool,
        /// The raft log index up to which the sending node had applied its route
        /// table when it matched the publication (0: not known, e.g. a shared
        /// record): a QoS 0 copy matched before a moved-in session's claim here is
        /// not delivered to it by this path (`moved`, sim seed 2172).
        routes_index: u64,
    },
    /// A publication for other nodes (to the remote id only): as
    /// `PublishDurable`, with its identity (`None` outside a cluster), and `ack`
    /// unset when no publisher waits for it (always at QoS 0).
    PublishRemote {
        /// The message.
        message: Message,
        /// Token to echo in `Ack`.
        ack: Option<u64>,
        /// The publication's identity.
        id: Option<PubId>,
    },
    /// A publication for one session that moved to another node
    /// (`engine::moved`). To the remote id: a publication that matched the
    /// session's subscriptions here after it left, for `node`, which holds it
    /// on claim `epoch`; the forwarder answers `Ack { token: ack }` once that
    /// node accepted it. From the remote id (`node` is 0): such a publication
    /// another node sent on, for the session here. From another local shard:
    /// one passed to the session's shard, answered `Ack` as `Forwarded` is.
    Redirect {
        /// The session's ClientID.
        client_id: Str,
        /// The node it moved to.
        node: u64,
        /// Its claim epoch there.
        epoch: u64,
        /// The message.
        message: Message,
        /// The publication's identity, when it has one.
        id: Option<PubId>,
        /// Token to echo in `Ack`.
        ack: Option<u64>,
    },
    /// A QoS 1/2 publication under `sync` durability: as `Publish`, and the
    /// receiver answers `Ack { token: ack }` once what it stored for the
    /// message is committed, so the publisher's PUBACK/PUBREC waits for every
    /// shard that had subscribers.
    PublishDurable {
        /// The message.
        message: Message,
        /// Token to echo in `Ack`.
        ack: u64,
        /// The publication's origin sequence number on the sending shard
        /// (0: none): a QoS 2 publication of a stored session. Sent only
        /// after the sender committed the publisher's packet id with it, in
        /// increasing order; the receiver stores the highest it handled
        /// with what it stored (`StoreOp::PutOrigin`).
        seq: u64,
        /// The publication's identity (`None` outside a cluster).
        id: Option<PubId>,
    },
    /// `shard` gained its first subscriber on `filter`. When `ack` is set, the
    /// receiver answers `Ack` so the subscriber's SUBACK can wait until
    /// every shard routes the filter.
    RouteAdd {
        /// The filter now routed to `shard`.
        filter: Str,
        /// The shard with subscribers.
        shard: ShardId,
        /// Token to echo in `Ack`.
        ack: Option<u64>,
    },
    /// `shard` lost its last subscriber on `filter`.
    RouteRemove {
        /// The filter no longer routed to `shard`.
        filter: Str,
        /// The shard without subscribers.
        shard: ShardId,
    },
    /// The receiver applied the `RouteAdd` or `Retain` carrying this token.
    Ack {
        /// The token of the acknowledged message.
        token: u64,
    },
    /// In place of the `Ack` of a route add (from the cluster's forwarder): the
    /// route of `filter` could not be committed (no quorum, timeout, or a filter
    /// the cluster cannot hold), so the SUBSCRIBE that waits for `token` answers
    /// `reason` for it instead of success.
    RouteFailed {
        /// The token of the route add.
        token: u64,
        /// The filter as subscribed (`$share/{group}/{filter}` for a share).
        filter: Str,
        /// The reason code for that filter in a v5 SUBACK.
        reason: tessera_proto::ReasonCode,
    },
    /// A full persistent queue on the sender refused the `PublishDurable`
    /// carrying this token (`engine::queue_budget`); its `Ack` follows. The
    /// publisher gets 0x97 (v5) or no acknowledgement (3.1.1).
    Refused {
        /// The token of the refused publication.
        token: u64,
    },
    /// The sender has sessions whose queues reached the high-water mark
    /// (`congested`), or no longer has any. While a peer is congested,
    /// QoS 1/2 publications forwarded to it go as `PublishDurable`, so it can
    /// hold the publisher's acknowledgement (`engine::backpressure`).
    Congestion {
        /// Whether the sender has congested sessions.
        congested: bool,
    },
    /// The sender's counters for `$SYS` topics, sent to shard 0 once per `$SYS`
    /// interval.
    SysReport(SysReport),
    /// Set (`message` is `Some`) or clear the retained message of `topic`.
    /// `stamp` orders concurrent updates: the highest stamp wins on every shard.
    Retain {
        /// The topic.
        topic: Str,
        /// The new retained message, or `None` to clear.
        message: Option<Message>,
        /// (milliseconds, shard) hybrid timestamp of the update.
        stamp: (u64, ShardId),
        /// Token to echo in `Ack`: the publisher's PUBACK/PUBREC waits until
        /// every shard applied the update.
        ack: Option<u64>,
    },
    /// `shard` has these members of the shared subscription
    /// `$share/{group}/{filter}`; replaces what the receiver knew of `shard`
    /// (both counts 0: none left). Sent by the members' shard whenever its
    /// counts change. When `ack` is set the receiver answers `Ack`: the SUBACK
    /// of the shard's first member waits until every shard routes to it.
    ShareRoute {
        /// The ShareName.
        group: Str,
        /// The topic filter after `$share/{group}/`.
        filter: Str,
        /// The shard with the members (always the sender).
        shard: ShardId,
        /// Members with a live connection.
        connected: u32,
        /// Disconnected members whose session persists.
        offline: u32,
        /// Token to echo in `Ack`.
        ack: Option<u64>,
    },
    /// A publication for one member of `$share/{group}/{filter}`: the sender
    /// chose the receiver, which hands it to a local member or, having none
    /// any more, passes it on.
    SharedPublish {
        /// The ShareName.
        group: Str,
        /// The topic filter after `$share/{group}/`.
        filter: Str,
        /// The message.
        message: Message,
        /// What the hash strategy hashes (the publisher's ClientID hash).
        key: u64,
        /// Shards that found no connected member for it.
        tried: ShardSet,
        /// Forwards so far; bounded by twice the shard count.
        hops: u16,
        /// The message came from another node that had no member left to take
        /// it and handed it back to the group: a node that cannot place it
        /// either drops it instead of handing it back again.
        handed_back: bool,
        /// Under `sync` durability, for a QoS 1/2 publication: the
        /// publisher's shard and the token its PUBACK/PUBREC waits on. The
        /// shard that finally hands the message to a member answers
        /// `Ack { token }` to that shard after committing what it stored (at
        /// once when it stored nothing); a shard that drops it answers at
        /// once; a shard that passes it on passes this on.
        ack: Option<(ShardId, u64)>,
    },
}
