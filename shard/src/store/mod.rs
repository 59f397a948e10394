//! The shard store: one heed (LMDB) environment per shard under
//! `data_dir/shard-K/`, written by a dedicated writer thread per shard.
//!
//! - [`StoreOp`]: what the engine asks to be stored, in engine types and
//!   broker-relative times. The engine appends ops to the batch of the current
//!   *epoch*; the driver hands each batch to the shard's writer thread.
//! - [`writer`]: the writer thread. It drains every batch waiting (group
//!   commit: one write transaction and one commit for all of them), commits,
//!   and reports the highest committed epoch back to the shard, which then
//!   releases what waited for it (PUBACK/PUBREC, outbound PUBLISH, mesh acks).
//!   LMDB commits block, so they never run on the shard thread.
//! - [`recover`]: start-up, before any listener opens: locks the data
//!   directory, opens every `shard-K/`, refuses newer formats, re-partitions
//!   records when the shard count changed, and returns what each shard's
//!   engine restores.
//! - [`record`]: the rkyv records, versioned, and their conversions.
//!
//! Lifecycle: created by the broker at boot (one env and one writer thread per
//! shard), dropped at shutdown after the last batch is committed. Not here:
//! deciding what to store (the engine's `persist` module does).

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use heed::types::Bytes as RawBytes;
use heed::{Database, RwTxn};
use tessera_proto::{ProtocolVersion, Str, Will};
use xxhash_rust::xxh3::xxh3_128;

use crate::mesh::ShardId;
use crate::message::Message;
use crate::session::{Delivery, SubscriptionEntry};
use crate::trie::{SHARDS_MAX, ShardSet};

pub mod record;
pub mod recover;
pub mod writer;

pub use recover::{DirLock, Recovered, RecoveredSession, RecoveredWindow, StoreError, recover};
pub use writer::{StoreConfig, StoreHandle, commit_now, spawn_writer};

/// One shard's LMDB env, as `recover` opens it and a writer commits to it.
pub type StoreEnv = heed::Env<heed::WithoutTls>;

/// A stored delivery's state: waiting in the queue.
pub use record::{STATE_PUBLISHED, STATE_QUEUED, STATE_RELEASED};

/// The session part of a persistent session: rewritten whole when it changes
/// (connect, disconnect, subscribe, unsubscribe), which is rare next to
/// messages.
#[derive(Debug, Clone)]
pub struct SessionState {
    /// The ClientID.
    pub client_id: Str,
    /// Protocol version of the latest connection.
    pub version: ProtocolVersion,
    /// Session Expiry Interval in seconds (`u32::MAX`: never).
    pub expiry_interval_s: u32,
    /// When the connection ended (broker ms); `None` while connected.
    pub disconnected_at_ms: Option<u64>,
    /// Subscriptions with their options.
    pub subscriptions: Vec<(Str, SubscriptionEntry)>,
    /// The will of the live connection.
    pub will: Option<Will>,
}

/// A moved session's confirmed ghost as stored ([`StoreOp::PutGhost`]).
#[derive(Debug, Clone)]
pub struct GhostState {
    /// The ClientID.
    pub client_id: Str,
    /// The node the session moved to, and its claim epoch.
    pub to: (u64, u64),
    /// Its plain subscriptions with their options.
    pub subscriptions: Vec<(Str, SubscriptionEntry)>,
    /// When the new owner confirmed (broker ms; stored as wall-clock time).
    pub confirmed_ms: u64,
    /// The window the ghost filters with, encoded (`moved`).
    pub window: Vec<u8>,
}

/// A publication a moved session's confirmed ghost sent on to the session's new node,
/// as stored until that node accepted it ([`StoreOp::PutRedirect`]).
#[derive(Debug, Clone)]
pub struct RedirectState {
    /// The session's ClientID.
    pub client_id: Str,
    /// The node the session moved to, and its claim epoch.
    pub to: (u64, u64),
    /// The publication.
    pub message: Message,
    /// Its cluster-wide id (the new owner's window skips a copy it got).
    pub id: Option<crate::mesh::PubId>,
}

/// One change to a shard's store. Times are broker-relative milliseconds; the
/// writer converts them to wall-clock time.
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// Create or replace a session record.
    PutSession(Box<SessionState>),
    /// Delete a session with its deliveries, inbound QoS 2 ids and delayed will.
    DelSession {
        /// The ClientID.
        client_id: Str,
    },
    /// Create or replace one delivery of a session.
    PutMsg {
        /// The session's ClientID.
        client_id: Str,
        /// The delivery's sequence number in its session.
        seq: u64,
        /// `STATE_QUEUED`, `STATE_PUBLISHED` or `STATE_RELEASED`.
        state: u8,
        /// Packet id when published or released.
        packet_id: u16,
        /// The delivery.
        delivery: Delivery,
    },
    /// Delete every delivery of a session below a sequence number (before
    /// they are written again; a disk tail from `below_seq` on stays).
    ClearMsgs {
        /// The session's ClientID.
        client_id: Str,
        /// Deliveries from this sequence number on are kept.
        below_seq: u64,
    },
    /// After the commit of this op's batch, read up to `count_max` queued
    /// deliveries of a session with a sequence number from `from_seq` on and
    /// hand them back with the commit ([`Loaded`]); a no-op in the
    /// transaction. How a disk tail gets back into memory.
    LoadQueue {
        /// The session's ClientID.
        client_id: Str,
        /// The session's process-unique id, returned as is, so a load for a
        /// session that ended meanwhile is recognised.
        session: u64,
        /// The lowest sequence number wanted.
        from_seq: u64,
        /// Most deliveries returned.
        count_max: usize,
    },
    /// Delete one delivery of a session.
    DelMsg {
        /// The session's ClientID.
        client_id: Str,
        /// The delivery's sequence number.
        seq: u64,
    },
    /// An inbound QoS 2 packet id now awaits PUBREL (or, again, for a
    /// re-sent PUBLISH delivered again after a restart).
    PutInbound {
        /// The session's ClientID.
        client_id: Str,
        /// The packet id.
        packet_id: u16,
        /// The publication's origin sequence number on this shard (0: none,
        /// it went to no other shard under `sync` durability); recovery
        /// compares it with the other shards' [`StoreOp::PutOrigin`] marks.
        seq: u64,
        /// For a re-delivery: the shards it was for (`None`: a first
        /// delivery, which was for every shard).
        redeliver: Option<ShardSet>,
        /// In a cluster, the publication's cluster-wide id (its first routing's):
        /// a re-send after a crash goes out with it, so a node that got the
        /// original skips it (docs/ARCHITECTURE.md, "A store with `sync`
        /// durability", cause A). Stored only with an origin sequence number or a
        /// redelivery set (nothing is sent again otherwise).
        id: Option<crate::mesh::PubId>,
    },
    /// Every publication another shard sent with an origin sequence number
    /// up to `seq` was handled here, and what it stored is in this commit or
    /// an earlier one (see `InboundRecord`).
    PutOrigin {
        /// The sending shard.
        from: ShardId,
        /// Its highest origin sequence number handled here.
        seq: u64,
    },
    /// Every publication node `mark.node` forwarded up to `mark` was handled
    /// here, and what it stored is in this commit or an earlier one (the
    /// batch dedup of a receiving node across a restart).
    PutForwardMark(crate::mesh::ForwardMark),
    /// Every publication of origin shard (`origin`, `shard`) of `seq`'s class
    /// (its top bits) up to `seq` was handled here (a `PubId` mark: the engine's
    /// `moved` module), and what those publications stored here is in this commit
    /// or an earlier one. Restored at start-up as a mark of an earlier life; one
    /// not raised for [`PUB_MARK_KEEP_MS`] is dropped then.
    PutPubMark {
        /// The origin process's tag.
        origin: u64,
        /// The publisher's shard there.
        shard: ShardId,
        /// Class and count (`PubId::seq`).
        seq: u64,
        /// When it was raised (broker ms; stored as wall-clock time).
        at_ms: u64,
    },
    /// One part of the dedup window of a session that moved here (the ids it got
    /// within the window, and for part 0 the old owner's marks): parts are
    /// appended as ids come, and rewritten from part 0 when they grow large.
    PutWindow {
        /// The session's ClientID.
        client_id: Str,
        /// The part's number.
        part: u32,
        /// When the window ends (broker ms; stored as wall-clock time).
        expires_ms: u64,
        /// The marks and ids, as a window travels (`moved::encode_marks`).
        bytes: Vec<u8>,
    },
    /// Delete every part of a session's window (it ended, or is rewritten).
    DelWindow {
        /// The session's ClientID.
        client_id: Str,
    },
    /// A direct delivery a moved-in session's window holds back for its old
    /// owner's redirects (the engine's `moved`, sim seeds 1508 and 660): stored with
    /// what the batch that brought it stored (its forward mark, the `PubId` marks,
    /// the window's ids), so a crash cannot lose it while those say it was handled.
    /// Restored into its session's queue; deleted when it goes into that queue.
    PutHeld {
        /// The session's ClientID.
        client_id: Str,
        /// The hold's number on its shard (not a queue sequence number).
        seq: u64,
        /// The delivery.
        delivery: Delivery,
    },
    /// A held delivery went into its session's queue (or was dropped with it).
    DelHeld {
        /// The session's ClientID.
        client_id: Str,
        /// The hold's number.
        seq: u64,
    },
    /// PUBREL received for an inbound QoS 2 packet id.
    DelInbound {
        /// The session's ClientID.
        client_id: Str,
        /// The packet id.
        packet_id: u16,
    },
    /// Set the retained message of its topic (this shard owns the topic).
    PutRetained(Message),
    /// Clear the retained message of a topic.
    DelRetained(Str),
    /// A will now waits for its delay.
    PutWill {
        /// The session's ClientID.
        client_id: Str,
        /// When it is due (broker ms).
        due_ms: u64,
        /// The will.
        /// The will (boxed: the op is rare, and inline it made every
        /// `StoreOp`, a delivery's too, 40 bytes larger).
        will: Box<Will>,
    },
    /// A delayed will was published or dropped.
    DelWill {
        /// The session's ClientID.
        client_id: Str,
    },
    /// A session that moved to another node left a confirmed ghost here (in the
    /// commit of the session's delete: a crash cannot lose one without the other).
    PutGhost(Box<GhostState>),
    /// The ghost of a ClientID went (expired, dropped, or its session is back).
    DelGhost {
        /// The ClientID.
        client_id: Str,
    },
    /// A moved session's confirmed ghost sent a QoS 1/2 publication on to the
    /// session's new node (the engine's `moved`): stored in the epoch of what says it
    /// was handled here (the batch's forward mark, the `PubId` marks), until that
    /// node accepted it, so a crash of this node in between cannot lose it (the
    /// session's own records went with the confirmation). Restored as a redirect to
    /// send again.
    PutRedirect {
        /// Its number on its shard.
        seq: u64,
        /// The redirect.
        redirect: Box<RedirectState>,
    },
    /// The new node accepted a stored redirect.
    DelRedirect {
        /// The session's ClientID.
        client_id: Str,
        /// Its number.
        seq: u64,
    },
}

/// Deliveries read for a `StoreOp::LoadQueue`, in sequence order.
#[derive(Debug)]
pub struct Loaded {
    /// The session's ClientID.
    pub client_id: Str,
    /// The session id the op carried.
    pub session: u64,
    /// Queued deliveries, `Delivery::seq` set.
    pub deliveries: Vec<Delivery>,
}

/// What the writer reports after a commit.
#[derive(Debug)]
pub struct Committed {
    /// Highest epoch committed.
    pub epoch: u64,
    /// Loads requested by the committed batches.
    pub loaded: Vec<Loaded>,
}

/// A batch of ops: everything one shard produced in one epoch.
#[derive(Debug)]
pub struct Batch {
    /// The epoch; strictly increasing per shard.
    pub epoch: u64,
    /// The ops, applied in order.
    pub ops: Vec<StoreOp>,
}

/// Counters of one shard's store, written by its writer thread and read by
/// metrics (per commit, not per message, so atomics cost nothing that matters).
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Write transactions committed (each is one LMDB commit: fdatasync of the
    /// data and of the meta page).
    pub commits: AtomicU64,
    /// Batches (shard epochs) committed; `batches / commits` is the group
    /// commit factor.
    pub batches: AtomicU64,
    /// Ops applied.
    pub ops: AtomicU64,
    /// Sum of commit latencies (apply + commit), microseconds.
    pub commit_us_total: AtomicU64,
    /// Largest commit latency seen, microseconds.
    pub commit_us_max: AtomicU64,
    /// Commit latency histogram: bucket `i` counts commits that took less than
    /// `2^i` microseconds (the last bucket: everything longer).
    pub commit_us_log2: [AtomicU64; 24],
    /// Ops per commit histogram, buckets as `commit_us_log2` (the batch size
    /// behind `tessera_persistence_commit_records`).
    pub ops_log2: [AtomicU64; 24],
    /// Times the map was grown because it was full.
    pub map_grown: AtomicU64,
    /// Failed commit attempts (retried; nothing is acknowledged meanwhile).
    pub commit_errors: AtomicU64,
}

impl StoreStats {
    fn record_commit(&self, batches: u64, ops: u64, us: u64) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.batches.fetch_add(batches, Ordering::Relaxed);
        self.ops.fetch_add(ops, Ordering::Relaxed);
        self.commit_us_total.fetch_add(us, Ordering::Relaxed);
        self.commit_us_max.fetch_max(us, Ordering::Relaxed);
        let bucket = (64 - us.leading_zeros() as usize).min(self.commit_us_log2.len() - 1);
        self.commit_us_log2[bucket].fetch_add(1, Ordering::Relaxed);
        let bucket = (64 - ops.leading_zeros() as usize).min(self.ops_log2.len() - 1);
        self.ops_log2[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

/// Shared handle to a shard store's counters.
pub type SharedStoreStats = Arc<StoreStats>;

/// Mixes keys made of a few integers (a delivery's ClientID buffer address
/// and length and its sequence number: the store writer's last-op map, the
/// engine's pending deliveries) for hashbrown, which uses the high bits.
#[derive(Default)]
pub(crate) struct MixHasher(u64);

impl std::hash::Hasher for MixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        // Every bit of the state reaches the high bits hashbrown uses.
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x ^ (x >> 33)
    }
}

// ----------------------------------------------------------------------
// Keys

/// ClientIDs and topics longer than this are keyed by their 128-bit hash
/// (LMDB keys are at most 511 bytes); the record still holds the full text.
const KEY_INLINE_BYTES_MAX: usize = 250;

/// The key of a ClientID or topic. Hashed keys start with 0xFF, a byte UTF-8
/// never contains, so they cannot collide with inline ones.
pub(crate) fn text_key(text: &[u8]) -> Vec<u8> {
    if text.len() <= KEY_INLINE_BYTES_MAX {
        return text.to_vec();
    }
    let mut k = vec![0xFF];
    k.extend_from_slice(&xxh3_128(text).to_be_bytes());
    k
}

/// The prefix of every per-session key (deliveries, inbound ids): the
/// ClientID key with its length first, so one session's prefix is never the
/// prefix of another's.
pub(crate) fn session_prefix(client_id: &[u8]) -> Vec<u8> {
    let k = text_key(client_id);
    let mut p = Vec::with_capacity(1 + k.len() + 8);
    p.push(k.len() as u8);
    p.extend_from_slice(&k);
    p
}

fn msg_key(client_id: &[u8], seq: u64) -> Vec<u8> {
    let mut k = session_prefix(client_id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn inbound_key(client_id: &[u8], packet_id: u16) -> Vec<u8> {
    let mut k = session_prefix(client_id);
    k.extend_from_slice(&packet_id.to_be_bytes());
    k
}

/// The `meta` key of the origin mark of shard `from` (`StoreOp::PutOrigin`).
fn origin_key(from: ShardId) -> Vec<u8> {
    let mut k = META_ORIGIN_PREFIX.to_vec();
    k.extend_from_slice(&from.to_be_bytes());
    k
}

/// The `meta` key of the forward mark of node `node` (`StoreOp::PutForwardMark`).
fn forward_mark_key(node: u64) -> Vec<u8> {
    let mut k = META_FORWARD_PREFIX.to_vec();
    k.extend_from_slice(&node.to_be_bytes());
    k
}

/// The `meta` key of the ghost of `client_id` (`StoreOp::PutGhost`).
fn ghost_key(client_id: &[u8]) -> Vec<u8> {
    let mut k = META_GHOST_PREFIX.to_vec();
    k.extend_from_slice(&text_key(client_id));
    k
}

/// The `meta` key of the `PubId` mark of origin shard (`origin`, `shard`) and
/// class `class` (`StoreOp::PutPubMark`).
fn pub_mark_key(origin: u64, shard: ShardId, class: u8) -> Vec<u8> {
    let mut k = META_PUB_MARK_PREFIX.to_vec();
    k.extend_from_slice(&origin.to_be_bytes());
    k.extend_from_slice(&shard.to_be_bytes());
    k.push(class);
    k
}

/// The class of a `PubId` seq (its top two bits).
fn pub_class(seq: u64) -> u8 {
    (seq >> 62) as u8
}

/// A `PubId` mark of `meta` (key without its prefix, value): (origin, shard,
/// seq, wall-clock ms it was raised). `None` when malformed.
pub(crate) fn decode_pub_mark(key: &[u8], v: &[u8]) -> Option<(u64, ShardId, u64, u64)> {
    if key.len() != 11 || v.len() != 16 {
        return None;
    }
    let origin = u64::from_be_bytes(key[..8].try_into().ok()?);
    let shard = ShardId::from_be_bytes(key[8..10].try_into().ok()?);
    let seq = u64::from_le_bytes(v[..8].try_into().ok()?);
    let at = u64::from_le_bytes(v[8..].try_into().ok()?);
    (pub_class(seq) == key[10]).then_some((origin, shard, seq, at))
}

/// The `meta` key prefix of every part of `client_id`'s window.
fn window_prefix(client_id: &[u8]) -> Vec<u8> {
    let mut k = META_WINDOW_PREFIX.to_vec();
    k.extend_from_slice(&session_prefix(client_id));
    k
}

/// The `meta` key prefix of every delivery `client_id`'s window holds.
fn held_prefix(client_id: &[u8]) -> Vec<u8> {
    let mut k = META_HELD_PREFIX.to_vec();
    k.extend_from_slice(&session_prefix(client_id));
    k
}

/// The `meta` key of held delivery `seq` of `client_id` (`StoreOp::PutHeld`).
fn held_key(client_id: &[u8], seq: u64) -> Vec<u8> {
    let mut k = held_prefix(client_id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The `meta` key of stored redirect `seq` of `client_id` (`StoreOp::PutRedirect`).
fn redirect_key(client_id: &[u8], seq: u64) -> Vec<u8> {
    let mut k = META_REDIRECT_PREFIX.to_vec();
    k.extend_from_slice(&session_prefix(client_id));
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A held delivery's (or stored redirect's) key without its prefix: (session key,
/// number). `None` when malformed.
pub(crate) fn split_held_key(key: &[u8]) -> Option<(Vec<u8>, u64)> {
    let len = usize::from(*key.first()?);
    if key.len() != 1 + len + 8 {
        return None;
    }
    let seq = u64::from_be_bytes(key[1 + len..].try_into().ok()?);
    Some((key[1..1 + len].to_vec(), seq))
}

/// A window part of `meta` (key without its prefix, value): (session key,
/// part, wall-clock ms the window ends, the part's bytes). `None` when
/// malformed (the bytes are checked by the caller).
pub(crate) fn split_window_part<'v>(
    key: &[u8],
    v: &'v [u8],
) -> Option<(Vec<u8>, u32, u64, &'v [u8])> {
    let len = usize::from(*key.first()?);
    if key.len() != 1 + len + 4 || v.len() < 8 {
        return None;
    }
    let part = u32::from_be_bytes(key[1 + len..].try_into().ok()?);
    let ends = u64::from_le_bytes(v[..8].try_into().ok()?);
    Some((key[1..1 + len].to_vec(), part, ends, &v[8..]))
}

/// The value of a forward mark: incarnation, seq (u64 little-endian), index
/// (u32 little-endian).
fn forward_mark_value(m: &crate::mesh::ForwardMark) -> [u8; 20] {
    let mut v = [0u8; 20];
    v[..8].copy_from_slice(&m.incarnation.to_le_bytes());
    v[8..16].copy_from_slice(&m.seq.to_le_bytes());
    v[16..].copy_from_slice(&m.index.to_le_bytes());
    v
}

/// Decodes a forward mark of `meta` (key without its prefix, value).
pub(crate) fn decode_forward_mark(node: &[u8], v: &[u8]) -> Option<crate::mesh::ForwardMark> {
    if v.len() != 20 {
        return None;
    }
    Some(crate::mesh::ForwardMark {
        node: u64::from_be_bytes(node.try_into().ok()?),
        incarnation: u64::from_le_bytes(v[..8].try_into().ok()?),
        seq: u64::from_le_bytes(v[8..16].try_into().ok()?),
        index: u32::from_le_bytes(v[16..].try_into().ok()?),
    })
}

/// The value of an inbound QoS 2 id: what recovery needs to tell which
/// shards may lack the publication after a crash (docs/PERSISTENCE.md,
/// "Cross-shard QoS 2 after a crash").
///
/// Encoded as nothing (written before origin sequence numbers: nothing to
/// deliver again), 8 bytes (the sequence number, little-endian: a first
/// delivery, for every shard) or 8 + 32 bytes (the sequence number and the
/// shards it was for, one bit per shard); either of the last two followed by
/// 18 bytes of the publication's cluster-wide id (origin u64, shard u16, seq
/// u64, little-endian; session 15: 26 or 58 bytes). A value of an older build
/// decodes with no id, so its re-send goes out with a new one, as before
/// (at least once on other nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundRecord {
    /// The origin sequence number (0: none).
    pub seq: u64,
    /// The shards the publication was for.
    pub shards: ShardSet,
    /// The publication's cluster-wide id, when it had one and it was stored.
    pub id: Option<crate::mesh::PubId>,
}

const SHARD_SET_BYTES: usize = SHARDS_MAX / 8;
/// Bytes of a stored publication id.
const PUB_ID_BYTES: usize = 8 + 2 + 8;

fn encode_pub_id(v: &mut Vec<u8>, id: &crate::mesh::PubId) {
    v.extend_from_slice(&id.origin.to_le_bytes());
    v.extend_from_slice(&id.shard.to_le_bytes());
    v.extend_from_slice(&id.seq.to_le_bytes());
}

fn decode_pub_id(v: &[u8]) -> Option<crate::mesh::PubId> {
    if v.len() != PUB_ID_BYTES {
        return None;
    }
    let origin = u64::from_le_bytes(v[..8].try_into().ok()?);
    let shard = ShardId::from_le_bytes(v[8..10].try_into().ok()?);
    let seq = u64::from_le_bytes(v[10..].try_into().ok()?);
    // Origin tags are never 0 (`Engine::set_origin`).
    (origin != 0).then_some(crate::mesh::PubId { origin, shard, seq })
}

impl InboundRecord {
    /// A first delivery with origin sequence number `seq` (for every shard).
    pub fn first(seq: u64) -> InboundRecord {
        let mut shards = ShardSet::new();
        if seq != 0 {
            for k in 0..SHARDS_MAX as u16 {
                shards.insert(k);
            }
        }
        InboundRecord {
            seq,
            shards,
            id: None,
        }
    }

    pub(crate) fn encode(
        seq: u64,
        redeliver: Option<&ShardSet>,
        id: Option<&crate::mesh::PubId>,
    ) -> Vec<u8> {
        if seq == 0 && redeliver.is_none_or(ShardSet::is_empty) {
            return Vec::new();
        }
        let mut v = Vec::with_capacity(8 + SHARD_SET_BYTES + PUB_ID_BYTES);
        v.extend_from_slice(&seq.to_le_bytes());
        if let Some(set) = redeliver {
            let mut bits = [0u8; SHARD_SET_BYTES];
            for k in set.iter() {
                bits[usize::from(k) / 8] |= 1 << (k % 8);
            }
            v.extend_from_slice(&bits);
        }
        if let Some(id) = id {
            encode_pub_id(&mut v, id);
        }
        v
    }

    pub(crate) fn decode(v: &[u8]) -> Option<InboundRecord> {
        let (body, id) = match v.len() {
            n if n == 8 + PUB_ID_BYTES || n == 8 + SHARD_SET_BYTES + PUB_ID_BYTES => {
                let (body, id) = v.split_at(n - PUB_ID_BYTES);
                (body, Some(decode_pub_id(id)?))
            }
            _ => (v, None),
        };
        let rec = match body.len() {
            0 => InboundRecord::first(0),
            8 => InboundRecord::first(u64::from_le_bytes(body.try_into().ok()?)),
            n if n == 8 + SHARD_SET_BYTES => {
                let seq = u64::from_le_bytes(body[..8].try_into().ok()?);
                let mut shards = ShardSet::new();
                for (i, byte) in body[8..].iter().enumerate() {
                    for bit in 0..8 {
                        if byte & (1 << bit) != 0 {
                            shards.insert((i * 8 + bit) as u16);
                        }
                    }
                }
                InboundRecord {
                    seq,
                    shards,
                    id: None,
                }
            }
            _ => return None,
        };
        Some(InboundRecord { id, ..rec })
    }
}

/// The smallest key greater than every key starting with `prefix`, if any.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

// ----------------------------------------------------------------------
// Databases

/// Database names, in `Dbs` order.
const DB_NAMES: [&str; 6] = [
    "meta", "sessions", "messages", "inbound", "retained", "wills",
];

/// The key of the format version in `meta`.
const META_FORMAT: &[u8] = b"format";

/// The prefix of origin marks in `meta`, followed by the sending shard (u16
/// big-endian); the value is the sequence number (u64 little-endian).
const META_ORIGIN_PREFIX: &[u8] = b"origin/";

/// The prefix of forward marks in `meta`, followed by the sending node (u64
/// big-endian); the value is [`forward_mark_value`].
pub(crate) const META_FORWARD_PREFIX: &[u8] = b"fwd/";

/// The prefix of moved sessions' ghosts in `meta`, followed by the ClientID key; the
/// value is a [`record::GhostRec`]. In `meta` rather than a database of its own, so a
/// data directory keeps its databases (and an older build reads it, skipping these).
pub(crate) const META_GHOST_PREFIX: &[u8] = b"ghost/";

/// The prefix of `PubId` marks in `meta`, followed by the origin (u64
/// big-endian), its shard (u16 big-endian) and the class (u8); the value is
/// the seq and the wall-clock ms it was stored at (u64 little-endian each).
pub(crate) const META_PUB_MARK_PREFIX: &[u8] = b"pid/";

/// The prefix of windows' parts in `meta`, followed by the session prefix
/// (`session_prefix`) and the part (u32 big-endian); the value is the
/// wall-clock ms the window ends (u64 little-endian) and its marks and ids.
pub(crate) const META_WINDOW_PREFIX: &[u8] = b"win/";

/// The prefix of deliveries held by moved-in sessions' windows in `meta`
/// (`StoreOp::PutHeld`), followed by the session prefix (`session_prefix`) and
/// the hold's number (u64 big-endian); the value is a queued delivery's record.
/// In `meta`, not `messages`, so a session's queue reads never meet one; an
/// older build skips these.
pub(crate) const META_HELD_PREFIX: &[u8] = b"held/";

/// The prefix of redirects a confirmed ghost sent on and the new node has not
/// accepted yet, in `meta` (`StoreOp::PutRedirect`), followed by the session prefix
/// (`session_prefix`) and the redirect's number on its shard (u64 big-endian); the
/// value is a [`record::RedirectRec`]. An older build skips these.
pub(crate) const META_REDIRECT_PREFIX: &[u8] = b"redir/";

/// How long a stored `PubId` mark is kept after it was last raised: at
/// start-up older ones are dropped (an origin that sent nothing here for so
/// long is a process that ended, or one whose copies no longer come by way of
/// this shard; a copy of it older still, a re-sent QoS 2 PUBLISH of a client
/// that stayed away longer, is delivered again: at least once).
pub const PUB_MARK_KEEP_MS: u64 = 10 * 60 * 1000;

type Db<'e> = Database<'e, RawBytes, RawBytes>;

/// The databases of one env.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dbs<'e> {
    pub(crate) meta: Db<'e>,
    sessions: Db<'e>,
    messages: Db<'e>,
    inbound: Db<'e>,
    retained: Db<'e>,
    wills: Db<'e>,
}

impl<'e> Dbs<'e> {
    fn from_array(a: [Db<'e>; 6]) -> Dbs<'e> {
        let [meta, sessions, messages, inbound, retained, wills] = a;
        Dbs {
            meta,
            sessions,
            messages,
            inbound,
            retained,
            wills,
        }
    }

    fn all(&self) -> [(&'static str, Db<'e>); 6] {
        [
            (DB_NAMES[0], self.meta),
            (DB_NAMES[1], self.sessions),
            (DB_NAMES[2], self.messages),
            (DB_NAMES[3], self.inbound),
            (DB_NAMES[4], self.retained),
            (DB_NAMES[5], self.wills),
        ]
    }
}

/// Creates (or opens) the databases of `env`.
pub(crate) fn open_dbs(env: &heed::Env<heed::WithoutTls>) -> heed::Result<Dbs<'_>> {
    let wtxn = env.write_txn()?;
    let dbs = env
        .create_databases_and_commit(wtxn, |opener, wtxn| {
            let mut out = Vec::with_capacity(DB_NAMES.len());
            for name in DB_NAMES {
                out.push(opener.create_database::<RawBytes, RawBytes>(wtxn, Some(name))?);
            }
            let array: [Db<'_>; 6] = out.try_into().expect("six databases");
            Ok::<_, heed::Error>(heed::CommitOrAbort::<_, ()>::Commit(array))
        })?
        .unwrap_commit();
    Ok(Dbs::from_array(dbs))
}

/// Applies one op inside a write transaction.
pub(crate) fn apply(
    dbs: &Dbs<'_>,
    txn: &mut RwTxn<'_>,
    op: &StoreOp,
    wall_base_ms: u64,
) -> heed::Result<()> {
    use record::*;
    match op {
        StoreOp::PutSession(s) => {
            let rec = session_rec(s, wall_base_ms);
            dbs.sessions
                .put(txn, &text_key(s.client_id.as_bytes()), &encode(&rec))
        }
        StoreOp::DelSession { client_id } => {
            let cid = client_id.as_bytes();
            dbs.sessions.delete(txn, &text_key(cid))?;
            dbs.wills.delete(txn, &text_key(cid))?;
            let prefix = session_prefix(cid);
            let end = prefix_end(&prefix);
            let range: (Bound<&[u8]>, Bound<&[u8]>) = (
                Bound::Included(&prefix[..]),
                end.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
            );
            dbs.messages.delete_range(txn, &range)?;
            dbs.inbound.delete_range(txn, &range)?;
            delete_window(dbs, txn, cid)?;
            delete_held(dbs, txn, cid)
        }
        StoreOp::PutMsg {
            client_id,
            seq,
            state,
            packet_id,
            delivery,
        } => {
            let rec = delivery_rec(delivery, *state, *packet_id, wall_base_ms);
            dbs.messages
                .put(txn, &msg_key(client_id.as_bytes(), *seq), &encode(&rec))
        }
        StoreOp::ClearMsgs {
            client_id,
            below_seq,
        } => {
            let prefix = session_prefix(client_id.as_bytes());
            let end = msg_key(client_id.as_bytes(), *below_seq);
            let range: (Bound<&[u8]>, Bound<&[u8]>) =
                (Bound::Included(&prefix[..]), Bound::Excluded(&end[..]));
            dbs.messages.delete_range(txn, &range).map(drop)
        }
        StoreOp::LoadQueue { .. } => Ok(()),
        StoreOp::DelMsg { client_id, seq } => dbs
            .messages
            .delete(txn, &msg_key(client_id.as_bytes(), *seq))
            .map(drop),
        StoreOp::PutInbound {
            client_id,
            packet_id,
            seq,
            redeliver,
            id,
        } => dbs.inbound.put(
            txn,
            &inbound_key(client_id.as_bytes(), *packet_id),
            &InboundRecord::encode(*seq, redeliver.as_ref(), id.as_ref()),
        ),
        StoreOp::PutOrigin { from, seq } => {
            dbs.meta.put(txn, &origin_key(*from), &seq.to_le_bytes())
        }
        StoreOp::PutForwardMark(m) => {
            dbs.meta
                .put(txn, &forward_mark_key(m.node), &forward_mark_value(m))
        }
        StoreOp::PutPubMark {
            origin,
            shard,
            seq,
            at_ms,
        } => {
            let mut v = [0u8; 16];
            v[..8].copy_from_slice(&seq.to_le_bytes());
            v[8..].copy_from_slice(&to_wall(*at_ms, wall_base_ms).to_le_bytes());
            dbs.meta
                .put(txn, &pub_mark_key(*origin, *shard, pub_class(*seq)), &v)
        }
        StoreOp::PutWindow {
            client_id,
            part,
            expires_ms,
            bytes,
        } => {
            let mut k = window_prefix(client_id.as_bytes());
            k.extend_from_slice(&part.to_be_bytes());
            let mut v = Vec::with_capacity(8 + bytes.len());
            v.extend_from_slice(&to_wall(*expires_ms, wall_base_ms).to_le_bytes());
            v.extend_from_slice(bytes);
            dbs.meta.put(txn, &k, &v)
        }
        StoreOp::DelWindow { client_id } => delete_window(dbs, txn, client_id.as_bytes()),
        StoreOp::PutHeld {
            client_id,
            seq,
            delivery,
        } => {
            let rec = delivery_rec(delivery, STATE_QUEUED, 0, wall_base_ms);
            dbs.meta
                .put(txn, &held_key(client_id.as_bytes(), *seq), &encode(&rec))
        }
        StoreOp::DelHeld { client_id, seq } => dbs
            .meta
            .delete(txn, &held_key(client_id.as_bytes(), *seq))
            .map(drop),
        StoreOp::DelInbound {
            client_id,
            packet_id,
        } => dbs
            .inbound
            .delete(txn, &inbound_key(client_id.as_bytes(), *packet_id))
            .map(drop),
        StoreOp::PutRetained(m) => dbs.retained.put(
            txn,
            &text_key(m.topic.as_bytes()),
            &encode(&message_rec(m, wall_base_ms)),
        ),
        StoreOp::DelRetained(topic) => dbs
            .retained
            .delete(txn, &text_key(topic.as_bytes()))
            .map(drop),
        StoreOp::PutWill {
            client_id,
            due_ms,
            will,
        } => {
            let rec = DelayedWillRec {
                client_id: client_id.as_str().to_owned(),
                due_wall_ms: to_wall(*due_ms, wall_base_ms),
                will: will_rec(will),
            };
            dbs.wills
                .put(txn, &text_key(client_id.as_bytes()), &encode(&rec))
        }
        StoreOp::DelWill { client_id } => dbs
            .wills
            .delete(txn, &text_key(client_id.as_bytes()))
            .map(drop),
        StoreOp::PutGhost(g) => dbs.meta.put(
            txn,
            &ghost_key(g.client_id.as_bytes()),
            &encode(&ghost_rec(g, wall_base_ms)),
        ),
        StoreOp::DelGhost { client_id } => dbs
            .meta
            .delete(txn, &ghost_key(client_id.as_bytes()))
            .map(drop),
        StoreOp::PutRedirect { seq, redirect } => dbs.meta.put(
            txn,
            &redirect_key(redirect.client_id.as_bytes(), *seq),
            &encode(&redirect_rec(redirect, wall_base_ms)),
        ),
        StoreOp::DelRedirect { client_id, seq } => dbs
            .meta
            .delete(txn, &redirect_key(client_id.as_bytes(), *seq))
            .map(drop),
    }
}

/// Deletes every part of `client_id`'s window.
fn delete_window(dbs: &Dbs<'_>, txn: &mut RwTxn<'_>, client_id: &[u8]) -> heed::Result<()> {
    let prefix = window_prefix(client_id);
    let end = prefix_end(&prefix);
    let range: (Bound<&[u8]>, Bound<&[u8]>) = (
        Bound::Included(&prefix[..]),
        end.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
    );
    dbs.meta.delete_range(txn, &range).map(drop)
}

/// Deletes every delivery `client_id`'s window held.
fn delete_held(dbs: &Dbs<'_>, txn: &mut RwTxn<'_>, client_id: &[u8]) -> heed::Result<()> {
    let prefix = held_prefix(client_id);
    let end = prefix_end(&prefix);
    let range: (Bound<&[u8]>, Bound<&[u8]>) = (
        Bound::Included(&prefix[..]),
        end.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
    );
    dbs.meta.delete_range(txn, &range).map(drop)
}

/// Reads what a `StoreOp::LoadQueue` asks for: queued deliveries of
/// `client_id` from `from_seq` on, at most `count_max`. Deliveries in flight
/// are skipped (they are in memory). A record that does not decode ends the
/// read there; the error is returned with what was read before it.
pub(crate) fn load_queue(
    env: &heed::Env<heed::WithoutTls>,
    dbs: &Dbs<'_>,
    client_id: &Str,
    from_seq: u64,
    count_max: usize,
    wall_base_ms: u64,
) -> (Vec<Delivery>, Option<String>) {
    let mut out = Vec::new();
    let rtxn = match env.read_txn() {
        Ok(t) => t,
        Err(e) => return (out, Some(e.to_string())),
    };
    let cid = client_id.as_bytes();
    let start = msg_key(cid, from_seq);
    let prefix = session_prefix(cid);
    let end = prefix_end(&prefix);
    let range: (Bound<&[u8]>, Bound<&[u8]>) = (
        Bound::Included(&start[..]),
        end.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
    );
    let iter = match dbs.messages.range(&rtxn, &range) {
        Ok(i) => i,
        Err(e) => return (out, Some(e.to_string())),
    };
    for item in iter {
        if out.len() >= count_max {
            break;
        }
        let decoded = item.map_err(|e| e.to_string()).and_then(|(k, v)| {
            let seq_bytes: [u8; 8] = k[prefix.len()..]
                .try_into()
                .map_err(|_| "bad key length".to_owned())?;
            let seq = u64::from_be_bytes(seq_bytes);
            let rec = record::decode::<record::DeliveryRec>(v).map_err(|e| e.to_string())?;
            if rec.state != record::STATE_QUEUED {
                return Ok(None);
            }
            record::delivery(rec, seq, wall_base_ms)
                .map(Some)
                .map_err(|e| e.to_string())
        });
        match decoded {
            Ok(Some(d)) => out.push(d),
            Ok(None) => {}
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_long_texts_are_hashed_and_prefixes_do_not_nest() {
        assert_eq!(text_key(b"abc"), b"abc");
        let long = vec![b'x'; 1000];
        assert_eq!(text_key(&long).len(), 17);
        assert_eq!(text_key(&long)[0], 0xFF);
        // "a" and "ab" share bytes but not prefixes: the length comes first.
        assert!(!session_prefix(b"ab").starts_with(&session_prefix(b"a")));
        assert_eq!(prefix_end(&[1, 2, 0xFF]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[0xFF, 0xFF]), None);
    }

    /// Inbound values of older builds (empty) mean nothing to deliver again;
    /// a first delivery is for every shard; a re-delivery keeps its set.
    #[test]
    fn inbound_values_round_trip() {
        assert_eq!(InboundRecord::encode(0, None, None), b"");
        assert_eq!(InboundRecord::decode(b""), Some(InboundRecord::first(0)));
        assert!(InboundRecord::first(0).shards.is_empty());
        let first = InboundRecord::decode(&InboundRecord::encode(9, None, None)).unwrap();
        assert_eq!((first.seq, first.shards.len()), (9, SHARDS_MAX));
        let mut set = ShardSet::new();
        set.insert(1);
        set.insert(200);
        let again = InboundRecord::decode(&InboundRecord::encode(10, Some(&set), None)).unwrap();
        assert_eq!(
            again,
            InboundRecord {
                seq: 10,
                shards: set,
                id: None,
            }
        );
        assert_eq!(InboundRecord::encode(0, Some(&ShardSet::new()), None), b"");
        assert_eq!(InboundRecord::decode(&[0; 5]), None, "a corrupt value");
    }

    /// Cause A of the `sync` simulation failures: the inbound record keeps the
    /// publication's cluster-wide id, so a re-send after a crash goes out with it.
    /// Values written by the build before it (8 and 40 bytes, literal here) still
    /// decode, with no id; a value that only an id would explain is refused when
    /// the id is malformed (origin 0).
    #[test]
    fn inbound_values_keep_the_publications_id_and_older_values_still_decode() {
        let id = crate::mesh::PubId {
            origin: 0x0102_0304_0506_0708,
            shard: 3,
            seq: (2 << 62) | 41,
        };
        let first = InboundRecord::encode(9, None, Some(&id));
        assert_eq!(first.len(), 26);
        let first = InboundRecord::decode(&first).unwrap();
        assert_eq!(
            (first.seq, first.shards.len(), first.id),
            (9, SHARDS_MAX, Some(id))
        );
        let mut set = ShardSet::new();
        set.insert(2);
        let again = InboundRecord::encode(0, Some(&set), Some(&id));
        assert_eq!(again.len(), 58);
        assert_eq!(
            InboundRecord::decode(&again),
            Some(InboundRecord {
                seq: 0,
                shards: set,
                id: Some(id),
            })
        );
        // Nothing to send again: no id stored either.
        assert_eq!(InboundRecord::encode(0, None, Some(&id)), b"");

        // The previous build's values, byte for byte.
        let old_first = 9u64.to_le_bytes();
        let old = InboundRecord::decode(&old_first).unwrap();
        assert_eq!((old.seq, old.shards.len(), old.id), (9, SHARDS_MAX, None));
        let mut old_again = 0u64.to_le_bytes().to_vec();
        let mut bits = [0u8; SHARD_SET_BYTES];
        bits[0] = 1 << 2;
        old_again.extend_from_slice(&bits);
        assert_eq!(old_again.len(), 40);
        assert_eq!(
            InboundRecord::decode(&old_again),
            Some(InboundRecord {
                seq: 0,
                shards: set,
                id: None,
            })
        );

        let mut bad = InboundRecord::encode(9, None, Some(&id));
        bad[8..16].fill(0);
        assert_eq!(InboundRecord::decode(&bad), None, "an id with origin 0");
    }
}
