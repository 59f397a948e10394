//! Messages shards exchange. Every shard reaches every other only through these;
//! the transport (glommio channels in the broker, queues in the simulation) is
//! FIFO per ordered pair of shards, which the ordering guarantees rely on.

use tessera_proto::Str;

use crate::message::Message;

/// Index of a shard, 0-based.
pub type ShardId = u16;

/// One message from one shard to another.
#[derive(Debug, Clone)]
pub enum MeshMsg {
    /// A publication whose topic matched a route of the destination shard; the
    /// destination matches its own subscription trie.
    Publish(Message),
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
}
