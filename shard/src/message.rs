//! The application message as it travels inside the broker: between shards,
//! into session queues and out to subscribers.
//!
//! Cloning a `Message` never copies the topic or payload: both are `Bytes`
//! views of the publisher's read buffer, and v5 properties sit behind one `Arc`
//! shared by every subscriber on every shard.

use std::sync::Arc;

use bytes::Bytes;
use tessera_proto::{PublishProperties, QoS, Str};

/// Identity of the session that published a message: the owner shard and a
/// per-shard counter. Unique for the life of the process; used for no-local.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionUid(pub u64);

impl SessionUid {
    /// Builds the uid of the `counter`-th session created on `shard`.
    pub fn new(shard: u16, counter: u64) -> SessionUid {
        debug_assert!(counter < (1 << 48));
        SessionUid(((shard as u64) << 48) | counter)
    }

    /// The origin of a publication from another node of the cluster: a uid no
    /// local session has (the shard part is `u16::MAX`, above every shard
    /// id), derived from the publisher's identity on its own node (`key`), so
    /// no-local never matches it here and shared subscriptions' hash strategy
    /// still tells publishers apart.
    pub fn remote(key: u64) -> SessionUid {
        SessionUid((u64::from(u16::MAX) << 48) | (key & ((1 << 48) - 1)))
    }
}

/// A published application message.
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic name (never empty: topic aliases are resolved on receipt).
    pub topic: Str,
    /// The payload, shared.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// RETAIN flag as published.
    pub retain: bool,
    /// v5 properties to forward (payload format, content type, response topic,
    /// correlation data, user properties); `None` when there are none. Topic
    /// alias and subscription identifiers are per-connection and never stored.
    pub properties: Option<Arc<PublishProperties>>,
    /// Message expiry deadline in broker milliseconds, from the v5 Message
    /// Expiry Interval.
    pub expires_at_ms: Option<u64>,
    /// The publishing session, for no-local.
    pub origin: Option<SessionUid>,
    /// When the PUBLISH was decoded, broker microseconds (the driver's clock,
    /// see `Engine::set_now_us`); 0 when unknown or not meaningful (a
    /// retained copy), so no publish-to-deliver latency is recorded for it.
    pub received_us: u64,
}

impl Message {
    /// True when the message expired at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|t| now_ms >= t)
    }
}
