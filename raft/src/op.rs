//! The MQTT-aware ops the control plane orders, and how they travel.
//!
//! A node's shards propose [`Op`]s; the node's batcher packs them into one [`Batch`]
//! (one raft log entry, one fsync) stamped with the proposer's id, an idempotency key
//! (`incarnation`, `seq`) and the wall-clock time of proposal. The batch is rkyv-encoded
//! into [`EntryData`]; every node decodes and validates it the same way before applying.
//!
//! Idempotency: the key of op `i` in a batch is `(proposer, incarnation, seq, i)`. A batch
//! is retried whole (the same bytes) after a leader change, so the state machine keeps the
//! results of every batch it applied within [`IDEMPOTENCY_WINDOW_MS`] (entry time) and
//! answers a duplicate with the first results, never applying it twice. `incarnation`
//! grows at every start of the node (it is persisted), so sequence numbers never repeat.
//!
//! Limits are named and checked by [`Op::validate`] both when a shard proposes and when
//! an entry is applied (a lying peer's entry is rejected op by op, deterministically).
//! LMDB keys are at most 511 bytes, which bounds ClientIDs, filters and topics.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::transport::NodeId;
use crate::types::NodeInfo;

/// Longest ClientID a cluster node can claim, bytes (an LMDB key).
pub const CLIENT_ID_BYTES_MAX: usize = 256;
/// Longest topic filter with a route, bytes (part of an LMDB key).
pub const FILTER_BYTES_MAX: usize = 384;
/// Longest shared-subscription group name, bytes.
pub const GROUP_BYTES_MAX: usize = 64;
/// Longest retained topic, bytes (an LMDB key).
pub const TOPIC_BYTES_MAX: usize = 480;
/// Largest retained record carried inline in an entry, bytes. The data plane chooses its
/// own smaller threshold (`cluster.retained_inline_bytes`); this is the hard bound.
pub const RETAINED_INLINE_BYTES_MAX: usize = 64 * 1024;
/// Longest address string in a [`NodeInfo`], bytes.
pub const ADDRESS_BYTES_MAX: usize = 256;
/// Most ops one entry may carry (epochs reserve 20 bits for the position in the entry).
pub const BATCH_OPS_HARD_MAX: usize = 1 << 20;
/// Most route changes one [`Op::RouteDeltas`] carries (a node's aggregated changes; with
/// [`FILTER_BYTES_MAX`] filters this keeps an op under half of the batcher's byte bound).
pub const ROUTE_CHANGES_MAX: usize = 1024;
/// How long (entry time) the state machine remembers a batch's results for duplicates.
/// A proposer stops retrying a batch long before this (`proposal_timeout_ms`).
pub const IDEMPOTENCY_WINDOW_MS: u64 = 120_000;

/// One MQTT-aware operation on the cluster state.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Op {
    /// `node` takes ownership of `client_id`. Always succeeds (a later claim is a
    /// takeover); apply assigns the epoch, a fencing token unique and increasing per
    /// ClientID (in fact cluster-wide): `(entry index << 20) | position in the entry`.
    ClaimSession {
        /// The ClientID.
        client_id: String,
        /// The claiming node.
        node: NodeId,
    },
    /// `node` gives up `client_id`, if it still owns it with `epoch` (else a no-op).
    ReleaseSession {
        /// The ClientID.
        client_id: String,
        /// The releasing node.
        node: NodeId,
        /// The epoch of its claim.
        epoch: u64,
    },
    /// `node` has its first subscriber to `filter` (`add`) or lost its last (`!add`).
    /// One op per node and filter (and shared group), never one per client.
    RouteDelta {
        /// The node.
        node: NodeId,
        /// The topic filter (without a `$share/group/` prefix).
        filter: String,
        /// The shared-subscription group, for a `$share/{group}/{filter}` member.
        group: Option<String>,
        /// Add (first subscriber) or remove (last one gone).
        add: bool,
    },
    /// `node`'s route changes, aggregated: each change is what one [`Op::RouteDelta`]
    /// would do (one per node and filter), applied in order. The broker's forwarder sends
    /// what accumulated while its earlier route proposals were in flight as one of these,
    /// so a storm of first subscribers costs one op, one reply and one task per
    /// aggregate instead of per filter. Valid only whole: one bad change rejects the op.
    RouteDeltas {
        /// The node.
        node: NodeId,
        /// The changes, 1 to [`ROUTE_CHANGES_MAX`].
        changes: Vec<RouteChange>,
    },
    /// Set the retained message of `topic`; the last writer by log index wins everywhere.
    RetainedSet {
        /// The topic.
        topic: String,
        /// The node the PUBLISH arrived on (holds the full message).
        origin: NodeId,
        /// Size of the whole retained message, bytes.
        size: u32,
        /// The message as the data plane encodes it, when small enough to ride inline.
        inline: Option<Vec<u8>>,
    },
    /// Clear the retained message of `topic`.
    RetainedClear {
        /// The topic.
        topic: String,
        /// The node the clearing PUBLISH arrived on.
        origin: NodeId,
    },
    /// What node `id` is: addresses and shard count.
    NodeMeta {
        /// The node.
        id: NodeId,
        /// Its addresses and shape.
        info: NodeInfo,
    },
    /// A [`Op::ClaimSession`] for a CONNECT with Clean Start: the session the claim
    /// serves starts afresh, so its record's `fresh` is the new epoch at once (no
    /// moving copy of an older session may be resumed after it; docs/ARCHITECTURE.md
    /// "Cluster: one live session per ClientID"). Cluster protocol 4.
    ClaimCleanStart {
        /// The ClientID.
        client_id: String,
        /// The claiming node.
        node: NodeId,
    },
    /// `node`, owning `client_id` with `epoch`, serves a session it started afresh (its
    /// takeover found nothing to continue): the record's `fresh` becomes `epoch`, if
    /// `node` still owns it with `epoch` (else a no-op). Cluster protocol 4.
    SessionFresh {
        /// The ClientID.
        client_id: String,
        /// The owning node.
        node: NodeId,
        /// The epoch of its claim.
        epoch: u64,
    },
}

/// One change of a node's routes in an [`Op::RouteDeltas`].
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RouteChange {
    /// The topic filter (without a `$share/group/` prefix).
    pub filter: String,
    /// The shared-subscription group, for a `$share/{group}/{filter}` member.
    pub group: Option<String>,
    /// Add (the node's first subscriber) or remove (its last one gone).
    pub add: bool,
}

impl RouteChange {
    /// Checks the change's bounds (those of [`Op::RouteDelta`]).
    pub fn validate(&self) -> Result<(), Rejection> {
        check_str(&self.filter, FILTER_BYTES_MAX, Field::Filter)?;
        if let Some(g) = &self.group {
            check_str(g, GROUP_BYTES_MAX, Field::Group)?;
        }
        Ok(())
    }

    /// Approximate encoded size, bytes (the batcher's byte bound).
    pub fn approx_bytes(&self) -> usize {
        16 + self.filter.len() + self.group.as_ref().map_or(0, String::len)
    }
}

/// One log entry's worth of ops from one proposer.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Batch {
    /// The proposing node.
    pub proposer: NodeId,
    /// The proposer's start count (persisted, grows at every start).
    pub incarnation: u64,
    /// The batch's number within the incarnation (from 1, increasing).
    pub seq: u64,
    /// Wall-clock ms at proposal; the only time `apply` reads.
    pub time_ms: u64,
    /// The ops, applied in order.
    pub ops: Vec<Op>,
}

/// An owner of a session: the node and the epoch of its claim.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Owner {
    /// The owning node.
    pub node: NodeId,
    /// The claim's epoch (fencing token).
    pub epoch: u64,
}

/// Which string field of an op a [`Rejection`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Field {
    /// `client_id`.
    ClientId,
    /// `filter`.
    Filter,
    /// `group`.
    Group,
    /// `topic`.
    Topic,
    /// `info.cluster_addr`.
    ClusterAddr,
    /// `info.mqtt_addr`.
    MqttAddr,
    /// `info.admin_addr`.
    AdminAddr,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::ClientId => "client id",
            Field::Filter => "topic filter",
            Field::Group => "shared group",
            Field::Topic => "topic",
            Field::ClusterAddr => "cluster address",
            Field::MqttAddr => "mqtt address",
            Field::AdminAddr => "admin address",
        })
    }
}

/// Why an op was refused (deterministically, on every node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// A string is empty or longer than its bound, or contains NUL.
    #[error("{0} is empty, too long or contains NUL")]
    BadString(Field),
    /// Node id 0.
    #[error("node id 0 is not valid")]
    BadNode,
    /// Retained inline record too large or larger than its declared size.
    #[error("retained inline record exceeds its bound")]
    InlineTooLarge,
    /// A `RouteDeltas` op with no change or more than [`ROUTE_CHANGES_MAX`].
    #[error("a route-deltas op carries 0 or more than {ROUTE_CHANGES_MAX} changes")]
    BadRouteCount,
}

/// What applying one op did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// The claim holds with `epoch`; `previous` owned the session before (a takeover
    /// when its node differs).
    Claimed {
        /// The new epoch.
        epoch: u64,
        /// The owner before this claim.
        previous: Option<Owner>,
    },
    /// The release removed the ownership.
    Released,
    /// The release came from a stale owner; nothing changed.
    ReleaseStale {
        /// The owner now.
        current: Option<Owner>,
    },
    /// The route was added (`true`) or was already there (`false`).
    RouteAdded(bool),
    /// The route was removed (`true`) or was not there (`false`).
    RouteRemoved(bool),
    /// Per change of a `RouteDeltas`, in order: whether it changed the table (an add of a
    /// route that was absent, a remove of one that was there).
    RoutesChanged(Vec<bool>),
    /// The retained message is set.
    RetainedSet,
    /// The retained message was cleared (`true`) or there was none (`false`).
    RetainedCleared(bool),
    /// The node's metadata is recorded.
    NodeMetaSet,
    /// The op was refused; nothing changed.
    Rejected(Rejection),
    /// A [`Op::SessionFresh`] marked the owner's session fresh (`true`), or the
    /// ClientID has another owner or epoch now (`false`: nothing changed).
    MarkedFresh(bool),
}

/// The results of one applied entry: its log index and one result per op (empty for
/// blank and membership entries).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult {
    /// The entry's log index.
    pub index: u64,
    /// One result per op, in order.
    pub results: Vec<OpResult>,
    /// `true` when this entry repeated a batch already applied (results are the first's).
    pub duplicate: bool,
}

/// A decode failure of an entry or a stored record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {reason}")]
pub struct DecodeError {
    /// What was being decoded.
    pub what: &'static str,
    /// Why it failed.
    pub reason: String,
}

/// The payload of a normal log entry: an rkyv-encoded [`Batch`].
///
/// Kept as bytes end to end (log, RPCs, apply) so a batch is encoded once by its proposer.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryData(pub Bytes);

impl fmt::Debug for EntryData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryData({} bytes)", self.0.len())
    }
}

impl fmt::Display for EntryData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl EntryData {
    /// Decodes and checks the archive (bytes may come from a peer).
    pub fn decode(&self) -> Result<Batch, DecodeError> {
        decode_rkyv::<Batch>(&self.0, "log entry batch")
    }

    /// Checks the archive and the batch's shape ([`Batch::validate_shape`]) without
    /// deserializing its ops, and returns the proposer: what a leader checks of a
    /// follower's batch before proposing it. The same bytes checked as [`Self::decode`]
    /// checks them (rkyv validates the whole archive either way); only the copy of every
    /// filter and ClientID into a `String`, thrown away at once, is saved.
    pub fn check_shape(&self) -> Result<NodeId, DecodeError> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(self.0.len());
        aligned.extend_from_slice(&self.0);
        let b = rkyv::access::<ArchivedBatch, rkyv::rancor::Error>(&aligned).map_err(|e| {
            DecodeError {
                what: "log entry batch",
                reason: e.to_string(),
            }
        })?;
        let proposer = b.proposer.to_native();
        check_batch_shape(proposer, b.ops.len())?;
        Ok(proposer)
    }
}

fn check_batch_shape(proposer: NodeId, ops: usize) -> Result<(), DecodeError> {
    if proposer == 0 {
        return Err(DecodeError {
            what: "batch",
            reason: "proposer node id 0".into(),
        });
    }
    if ops > BATCH_OPS_HARD_MAX {
        return Err(DecodeError {
            what: "batch",
            reason: format!("{ops} ops exceed {BATCH_OPS_HARD_MAX}"),
        });
    }
    Ok(())
}

impl Batch {
    /// Encodes the batch for a log entry.
    pub fn encode(&self) -> EntryData {
        EntryData(encode_rkyv(self))
    }

    /// Checks the batch's shape (not its ops: those are validated one by one so a bad op
    /// is rejected alone).
    pub fn validate_shape(&self) -> Result<(), DecodeError> {
        check_batch_shape(self.proposer, self.ops.len())
    }
}

fn check_str(s: &str, max: usize, what: Field) -> Result<(), Rejection> {
    if s.is_empty() || s.len() > max || s.as_bytes().contains(&0) {
        return Err(Rejection::BadString(what));
    }
    Ok(())
}

fn check_node(n: NodeId) -> Result<(), Rejection> {
    if n == 0 {
        Err(Rejection::BadNode)
    } else {
        Ok(())
    }
}

impl Op {
    /// Checks every bound of the op. Pure, so every node decides the same.
    pub fn validate(&self) -> Result<(), Rejection> {
        match self {
            Op::ClaimSession { client_id, node } | Op::ClaimCleanStart { client_id, node } => {
                check_str(client_id, CLIENT_ID_BYTES_MAX, Field::ClientId)?;
                check_node(*node)
            }
            Op::ReleaseSession {
                client_id, node, ..
            }
            | Op::SessionFresh {
                client_id, node, ..
            } => {
                check_str(client_id, CLIENT_ID_BYTES_MAX, Field::ClientId)?;
                check_node(*node)
            }
            Op::RouteDelta {
                node,
                filter,
                group,
                ..
            } => {
                check_str(filter, FILTER_BYTES_MAX, Field::Filter)?;
                if let Some(g) = group {
                    check_str(g, GROUP_BYTES_MAX, Field::Group)?;
                }
                check_node(*node)
            }
            Op::RouteDeltas { node, changes } => {
                if changes.is_empty() || changes.len() > ROUTE_CHANGES_MAX {
                    return Err(Rejection::BadRouteCount);
                }
                for c in changes {
                    c.validate()?;
                }
                check_node(*node)
            }
            Op::RetainedSet {
                topic,
                origin,
                size,
                inline,
            } => {
                check_str(topic, TOPIC_BYTES_MAX, Field::Topic)?;
                if let Some(rec) = inline
                    && (rec.len() > RETAINED_INLINE_BYTES_MAX || rec.len() > *size as usize)
                {
                    return Err(Rejection::InlineTooLarge);
                }
                check_node(*origin)
            }
            Op::RetainedClear { topic, origin } => {
                check_str(topic, TOPIC_BYTES_MAX, Field::Topic)?;
                check_node(*origin)
            }
            Op::NodeMeta { id, info } => {
                check_node(*id)?;
                check_str(&info.cluster_addr, ADDRESS_BYTES_MAX, Field::ClusterAddr)?;
                if info.mqtt_addr.len() > ADDRESS_BYTES_MAX {
                    return Err(Rejection::BadString(Field::MqttAddr));
                }
                if info.admin_addr.len() > ADDRESS_BYTES_MAX {
                    return Err(Rejection::BadString(Field::AdminAddr));
                }
                Ok(())
            }
        }
    }

    /// How many deltas the op is: its changes for a `RouteDeltas`, else 1 (benchmarks
    /// and metrics count route deltas, not ops).
    pub fn deltas(&self) -> usize {
        match self {
            Op::RouteDeltas { changes, .. } => changes.len(),
            _ => 1,
        }
    }

    /// Short name, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::ClaimSession { .. } | Op::ClaimCleanStart { .. } => "claim",
            Op::ReleaseSession { .. } => "release",
            Op::SessionFresh { .. } => "session_fresh",
            Op::RouteDelta { .. } => "route",
            Op::RouteDeltas { .. } => "routes",
            Op::RetainedSet { .. } => "retained_set",
            Op::RetainedClear { .. } => "retained_clear",
            Op::NodeMeta { .. } => "node_meta",
        }
    }
}

/// Encodes an rkyv value (infallible for our types: no external resources).
pub(crate) fn encode_rkyv<T>(value: &T) -> Bytes
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Error,
            >,
        >,
{
    match rkyv::to_bytes::<rkyv::rancor::Error>(value) {
        Ok(v) => Bytes::from(v.into_vec()),
        // Serializing plain structs into a growable buffer cannot fail; if it does, the
        // process is out of memory or the rkyv contract broke.
        Err(e) => panic!("rkyv serialization of an in-memory value failed: {e}"),
    }
}

/// Decodes and validates an rkyv archive from any (possibly unaligned, untrusted) bytes.
pub(crate) fn decode_rkyv<T>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<T, rkyv::rancor::Error>(&aligned).map_err(|e| DecodeError {
        what,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(ops: Vec<Op>) -> Batch {
        Batch {
            proposer: 1,
            incarnation: 2,
            seq: 3,
            time_ms: 4,
            ops,
        }
    }

    #[test]
    fn a_batch_round_trips_through_its_entry_bytes() {
        let b = batch(vec![
            Op::ClaimSession {
                client_id: "c1".into(),
                node: 1,
            },
            Op::RouteDelta {
                node: 2,
                filter: "a/+/b".into(),
                group: Some("g".into()),
                add: true,
            },
            Op::RetainedSet {
                topic: "t".into(),
                origin: 3,
                size: 3,
                inline: Some(vec![1, 2, 3]),
            },
            Op::RouteDeltas {
                node: 2,
                changes: vec![
                    RouteChange {
                        filter: "x/#".into(),
                        group: None,
                        add: true,
                    },
                    RouteChange {
                        filter: "y".into(),
                        group: Some("g".into()),
                        add: false,
                    },
                ],
            },
        ]);
        let data = b.encode();
        assert_eq!(data.decode().unwrap(), b);
        // Unaligned input decodes too (bytes from the network are not aligned).
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&data.0);
        let unaligned = EntryData(Bytes::from(shifted).slice(1..));
        assert_eq!(unaligned.decode().unwrap(), b);
    }

    #[test]
    fn garbage_and_truncated_entries_are_errors_not_panics() {
        let data = batch(vec![
            Op::ClaimSession {
                client_id: "c".into(),
                node: 1,
            },
            Op::RouteDeltas {
                node: 1,
                changes: vec![RouteChange {
                    filter: "f/+".into(),
                    group: Some("g".into()),
                    add: true,
                }],
            },
        ])
        .encode();
        // The leader's check of a follower's batch (no deserializing) accepts exactly
        // what decoding and the shape check accept, with the same proposer.
        let agree = |d: &EntryData| {
            let full = d
                .decode()
                .and_then(|b| b.validate_shape().map(|()| b.proposer));
            assert_eq!(d.check_shape().ok(), full.ok());
        };
        agree(&data);
        assert_eq!(data.check_shape(), Ok(1));
        for cut in 0..data.0.len() {
            agree(&EntryData(data.0.slice(..cut)));
        }
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut bytes = data.0.to_vec();
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let i = (rng as usize) % bytes.len();
            bytes[i] ^= (rng >> 32) as u8 | 1;
            agree(&EntryData(Bytes::from(bytes)));
        }
        assert!(EntryData(Bytes::from_static(&[0xff; 7])).decode().is_err());
        let mut anonymous = batch(Vec::new());
        anonymous.proposer = 0;
        assert!(anonymous.encode().check_shape().is_err());
    }

    #[test]
    fn op_bounds_are_enforced() {
        let long = "x".repeat(CLIENT_ID_BYTES_MAX + 1);
        let bad = Op::ClaimSession {
            client_id: long,
            node: 1,
        };
        assert_eq!(bad.validate(), Err(Rejection::BadString(Field::ClientId)));
        let nul = Op::RouteDelta {
            node: 1,
            filter: "a\0b".into(),
            group: None,
            add: true,
        };
        assert_eq!(nul.validate(), Err(Rejection::BadString(Field::Filter)));
        let node0 = Op::ClaimSession {
            client_id: "c".into(),
            node: 0,
        };
        assert_eq!(node0.validate(), Err(Rejection::BadNode));
        let inline = Op::RetainedSet {
            topic: "t".into(),
            origin: 1,
            size: 2,
            inline: Some(vec![0; 3]),
        };
        assert_eq!(inline.validate(), Err(Rejection::InlineTooLarge));
    }
}
