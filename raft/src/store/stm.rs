//! The MQTT-aware state machine (`*_stm`): ownership, routes, retained index, nodes and
//! the idempotency window, as LMDB tables stamped with the applied log index.
//!
//! `apply` is deterministic: it reads only the entries (their index and the time stamped
//! at proposal), never the local clock, randomness or anything outside the env, so every
//! node that applies the same log holds byte-identical tables. One `apply` call is one
//! write transaction for however many entries openraft hands over, committed without a
//! flush of its own (the state-machine env, see the store's header: the log holds every
//! committed entry, synced).
//!
//! After commit, the changes are broadcast to subscribers (the shards' replica tables)
//! through bounded channels: a subscriber that does not keep up is dropped (its channel
//! closes) and must resync from a [`TablesView`], never stalling apply.

use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use heed::types::Bytes as RawBytes;
use heed::{RoTxn, RwTxn, WithoutTls};
use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StoredMembership,
};

use super::{
    Db, Store, StoreError, blocking, decode_bincode, encode_bincode, lock, read_err, snapshot,
    write_err,
};
use crate::op::{
    Batch, BatchResult, DecodeError, IDEMPOTENCY_WINDOW_MS, Op, OpResult, Owner, RouteChange,
    decode_rkyv, encode_rkyv,
};
use crate::transport::NodeId;
use crate::types::{NodeInfo, TypeConfig};

/// Most idempotency records pruned per applied entry (bounds the work of one apply; the
/// window drains over the following entries).
const IDEM_PRUNE_PER_ENTRY_MAX: usize = 4096;

/// The ownership of one ClientID, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct OwnerRecord {
    /// The owning node.
    pub node: NodeId,
    /// The claim's epoch.
    pub epoch: u64,
    /// Entry time of the claim, ms.
    pub time_ms: u64,
    /// The newest epoch at which a session of this ClientID started afresh (a claim
    /// for Clean Start, the first claim of a ClientID nobody owned, or an owner's
    /// [`Op::SessionFresh`]): a moving copy of an older session, handed to a claim of
    /// this epoch or an older one, is stale and is never resumed. 0: none known (also
    /// every record stored before this field existed).
    pub fresh: u64,
}

/// Bytes of an owner record stored before `fresh` existed (read as `fresh` 0).
const OWNER_RECORD_V1_BYTES: usize = 24;
/// Bytes of an owner record.
const OWNER_RECORD_BYTES: usize = 32;

impl OwnerRecord {
    /// The record as stored: exactly the bytes `encode_rkyv` makes of it (rkyv's archive
    /// of four `u64`s is the four in field order, little-endian; a test pins the
    /// equality), built on the stack. Every claim writes one on every node, and rkyv's
    /// serializer (a thread-local arena, an aligned vector, its copy into `Bytes`) was
    /// ~5 % of the CPU of `raft_bench --kind claim` at half the top rate.
    fn encode(&self) -> [u8; OWNER_RECORD_BYTES] {
        let mut b = [0u8; OWNER_RECORD_BYTES];
        b[..8].copy_from_slice(&self.node.to_le_bytes());
        b[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..24].copy_from_slice(&self.time_ms.to_le_bytes());
        b[24..].copy_from_slice(&self.fresh.to_le_bytes());
        b
    }

    /// A stored record: this build's 32 bytes, or the 24 of a store written before
    /// `fresh` existed (`fresh` 0, as if no fresh start were known). Anything else is
    /// malformed.
    pub fn decode(b: &[u8]) -> Result<OwnerRecord, DecodeError> {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        match b.len() {
            OWNER_RECORD_BYTES | OWNER_RECORD_V1_BYTES => Ok(OwnerRecord {
                node: word(0),
                epoch: word(1),
                time_ms: word(2),
                fresh: if b.len() == OWNER_RECORD_BYTES {
                    word(3)
                } else {
                    0
                },
            }),
            n => Err(DecodeError {
                what: "owner record",
                reason: format!(
                    "{n} bytes, expected {OWNER_RECORD_BYTES} or {OWNER_RECORD_V1_BYTES}"
                ),
            }),
        }
    }
}

/// One route: `node` has subscribers to `filter` (in `group` for a shared subscription).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The filter.
    pub filter: String,
    /// The shared group.
    pub group: Option<String>,
    /// The node.
    pub node: NodeId,
    /// The log index that added it.
    pub index: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct RouteStamp {
    index: u64,
    time_ms: u64,
}

/// A retained message's index entry.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RetainedRecord {
    /// The node holding the full message.
    pub origin: NodeId,
    /// Its size, bytes.
    pub size: u32,
    /// The log index that set it (the last writer).
    pub index: u64,
    /// Entry time, ms.
    pub time_ms: u64,
    /// The record inline, when small.
    pub inline: Option<Vec<u8>>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct IdemRecord {
    time_ms: u64,
    index: u64,
    results: Vec<OpResult>,
}

/// One applied entry's effective changes, as broadcast to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedEntry {
    /// The entry's log index: a replica table that applied this is stamped with it.
    pub index: u64,
    /// The entry's time (stamped at proposal), ms.
    pub time_ms: u64,
    /// The proposing node.
    pub proposer: NodeId,
    /// The ops that changed state, with what they did (duplicates and no-ops left out).
    pub changes: Vec<(Op, OpResult)>,
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum AppliedEvent {
    /// An entry was applied.
    Entry(Arc<AppliedEntry>),
    /// A snapshot replaced the tables up to `index`: rebuild from a [`TablesView`].
    SnapshotInstalled {
        /// The snapshot's last index.
        index: u64,
    },
}

/// Subscribers to applied entries.
#[derive(Debug, Default)]
pub(crate) struct Subscribers {
    list: Mutex<Vec<flume::Sender<AppliedEvent>>>,
    /// Subscribers dropped because their channel was full.
    pub(crate) lagged: std::sync::atomic::AtomicU64,
}

impl Subscribers {
    pub(crate) fn add(&self, capacity: usize) -> flume::Receiver<AppliedEvent> {
        let (tx, rx) = flume::bounded(capacity);
        lock(&self.list).push(tx);
        rx
    }

    fn publish(&self, ev: &AppliedEvent) {
        let mut list = lock(&self.list);
        list.retain(|tx| match tx.try_send(ev.clone()) {
            Ok(()) => true,
            Err(flume::TrySendError::Full(_)) => {
                self.lagged.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(flume::TrySendError::Disconnected(_)) => false,
        });
    }
}

/// The state machine, in the shared store.
#[derive(Debug, Clone)]
pub struct StateMachine {
    store: Arc<Store>,
}

impl StateMachine {
    /// The state machine of `store`.
    pub fn new(store: Arc<Store>) -> StateMachine {
        StateMachine { store }
    }
}

fn route_key(filter: &str, group: Option<&str>, node: NodeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(filter.len() + group.map_or(0, str::len) + 10);
    push_route_key(&mut k, filter, group, node);
    k
}

/// Appends the LMDB key of a route to `k`: `filter \0 group \0 node(be)`.
fn push_route_key(k: &mut Vec<u8>, filter: &str, group: Option<&str>, node: NodeId) {
    k.extend_from_slice(filter.as_bytes());
    k.push(0);
    k.extend_from_slice(group.unwrap_or("").as_bytes());
    k.push(0);
    k.extend_from_slice(&node.to_be_bytes());
}

fn parse_route_key(k: &[u8]) -> Option<(String, Option<String>, NodeId)> {
    if k.len() < 10 {
        return None;
    }
    let (rest, node) = k.split_at(k.len() - 8);
    let node = u64::from_be_bytes(node.try_into().ok()?);
    let rest = rest.strip_suffix(&[0])?;
    let mut parts = rest.splitn(2, |b| *b == 0);
    let filter = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let group = std::str::from_utf8(parts.next()?).ok()?;
    let group = (!group.is_empty()).then(|| group.to_owned());
    Some((filter, group, node))
}

fn idem_key(b: &Batch) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&b.proposer.to_be_bytes());
    k[8..16].copy_from_slice(&b.incarnation.to_be_bytes());
    k[16..].copy_from_slice(&b.seq.to_be_bytes());
    k
}

/// The epoch of the claim at `position` in the entry at `index`: unique cluster-wide and
/// increasing with the log, so a later claim always carries a greater fencing token.
pub fn claim_epoch(index: u64, position: usize) -> u64 {
    (index << 20) | position as u64
}

struct Applier<'a> {
    store: &'a Store,
    w: RwTxn<'a>,
    /// The route stamp of the entry being applied (one encoding per entry, not per op).
    stamp: Vec<u8>,
    /// Keys of a `RouteDeltas` op being applied, back to back (reused across ops).
    keys: Vec<u8>,
    /// Per change of that op: (key start, key end, position in the op).
    order: Vec<(usize, usize, usize)>,
}

type SResult<T> = Result<T, StorageError<NodeId>>;

impl Applier<'_> {
    fn get(&self, db: Db, key: &[u8]) -> SResult<Option<Vec<u8>>> {
        Ok(db.get(&self.w, key).map_err(read_err)?.map(<[u8]>::to_vec))
    }

    fn owner(&self, cid: &str) -> SResult<Option<OwnerRecord>> {
        match self.get(self.store.dbs.owners, cid.as_bytes())? {
            None => Ok(None),
            Some(v) => OwnerRecord::decode(&v).map(Some).map_err(read_err),
        }
    }

    fn apply_op(
        &mut self,
        op: &Op,
        index: u64,
        pos: usize,
        time_ms: u64,
    ) -> SResult<(OpResult, bool)> {
        let dbs = self.store.dbs;
        Ok(match op {
            Op::ClaimSession { client_id, node } | Op::ClaimCleanStart { client_id, node } => {
                let epoch = claim_epoch(index, pos);
                // A ClientID nobody owns, or a Clean Start, starts a session afresh.
                let mut rec = OwnerRecord {
                    node: *node,
                    epoch,
                    time_ms,
                    fresh: epoch,
                };
                let clean = matches!(op, Op::ClaimCleanStart { .. });
                // One B-tree walk for a ClientID never claimed (a connect storm's case):
                // insert if absent, else read the owner and overwrite it.
                let key = client_id.as_bytes();
                let previous = match dbs
                    .owners
                    .get_or_put(&mut self.w, key, &rec.encode())
                    .map_err(write_err)?
                {
                    None => None,
                    Some(old) => {
                        let o = OwnerRecord::decode(old).map_err(read_err)?;
                        // A takeover continues the session (if it finds it): only what
                        // was known fresh before stays so.
                        if !clean {
                            rec.fresh = o.fresh;
                        }
                        dbs.owners
                            .put(&mut self.w, key, &rec.encode())
                            .map_err(write_err)?;
                        Some(Owner {
                            node: o.node,
                            epoch: o.epoch,
                        })
                    }
                };
                // Paired with the assignment: epochs only grow for a ClientID.
                assert!(
                    previous.is_none_or(|p| p.epoch < epoch),
                    "epoch went backwards"
                );
                (OpResult::Claimed { epoch, previous }, true)
            }
            Op::ReleaseSession {
                client_id,
                node,
                epoch,
            } => match self.owner(client_id)? {
                Some(o) if o.node == *node && o.epoch == *epoch => {
                    dbs.owners
                        .delete(&mut self.w, client_id.as_bytes())
                        .map_err(write_err)?;
                    (OpResult::Released, true)
                }
                cur => (
                    OpResult::ReleaseStale {
                        current: cur.map(|o| Owner {
                            node: o.node,
                            epoch: o.epoch,
                        }),
                    },
                    false,
                ),
            },
            Op::SessionFresh {
                client_id,
                node,
                epoch,
            } => match self.owner(client_id)? {
                Some(mut o) if o.node == *node && o.epoch == *epoch => {
                    let changed = o.fresh != *epoch;
                    o.fresh = *epoch;
                    dbs.owners
                        .put(&mut self.w, client_id.as_bytes(), &o.encode())
                        .map_err(write_err)?;
                    (OpResult::MarkedFresh(true), changed)
                }
                _ => (OpResult::MarkedFresh(false), false),
            },
            Op::RouteDelta {
                node,
                filter,
                group,
                add,
            } => {
                let key = route_key(filter, group.as_deref(), *node);
                let changed = self.route(&key, *add)?;
                let r = if *add {
                    OpResult::RouteAdded(changed)
                } else {
                    OpResult::RouteRemoved(changed)
                };
                (r, changed)
            }
            Op::RouteDeltas { node, changes } => {
                let changed = self.routes(*node, changes)?;
                let any = changed.contains(&true);
                (OpResult::RoutesChanged(changed), any)
            }
            Op::RetainedSet {
                topic,
                origin,
                size,
                inline,
            } => {
                let rec = RetainedRecord {
                    origin: *origin,
                    size: *size,
                    index,
                    time_ms,
                    inline: inline.clone(),
                };
                dbs.retained
                    .put(&mut self.w, topic.as_bytes(), &encode_rkyv(&rec))
                    .map_err(write_err)?;
                (OpResult::RetainedSet, true)
            }
            Op::RetainedClear { topic, .. } => {
                let existed = dbs
                    .retained
                    .delete(&mut self.w, topic.as_bytes())
                    .map_err(write_err)?;
                (OpResult::RetainedCleared(existed), existed)
            }
            Op::NodeMeta { id, info } => {
                dbs.nodes
                    .put(&mut self.w, &id.to_be_bytes(), &encode_rkyv(info))
                    .map_err(write_err)?;
                (OpResult::NodeMetaSet, true)
            }
        })
    }

    /// Adds (if absent) or removes (if present) the route `key`; whether it changed.
    /// One B-tree walk per change.
    fn route(&mut self, key: &[u8], add: bool) -> SResult<bool> {
        let routes = self.store.dbs.routes;
        if add {
            Ok(routes
                .get_or_put(&mut self.w, key, &self.stamp)
                .map_err(write_err)?
                .is_none())
        } else {
            routes.delete(&mut self.w, key).map_err(write_err)
        }
    }

    /// Applies `node`'s route changes in key order (the sort is stable, so changes to one
    /// key keep their order and the result is the one of applying them in the op's
    /// order). Returns, per change in the op's order, whether it changed the table.
    ///
    /// A run of adds goes through one LMDB cursor ([`insert_sorted`]): an insert whose key
    /// falls inside the leaf page the cursor is on skips the root-to-leaf descent, which
    /// was a quarter of apply's CPU with one `get_or_put` per change. Removes are plain
    /// deletes (heed has no positioned delete); they end a run.
    fn routes(&mut self, node: NodeId, changes: &[RouteChange]) -> SResult<Vec<bool>> {
        self.keys.clear();
        self.order.clear();
        for (pos, c) in changes.iter().enumerate() {
            let start = self.keys.len();
            push_route_key(&mut self.keys, &c.filter, c.group.as_deref(), node);
            self.order.push((start, self.keys.len(), pos));
        }
        let keys = std::mem::take(&mut self.keys);
        let mut order = std::mem::take(&mut self.order);
        order.sort_by(|a, b| keys[a.0..a.1].cmp(&keys[b.0..b.1]));
        let mut changed = vec![false; changes.len()];
        let mut result = Ok(());
        let mut rest = &order[..];
        while let Some(&(start, end, pos)) = rest.first() {
            if changes[pos].add {
                let run = rest
                    .iter()
                    .position(|o| !changes[o.2].add)
                    .unwrap_or(rest.len());
                let routes = self.store.dbs.routes;
                let adds = rest[..run]
                    .iter()
                    .map(|&(start, end, pos)| (&keys[start..end], pos));
                if let Err(e) = insert_sorted(routes, &mut self.w, adds, &self.stamp, |pos| {
                    changed[pos] = true
                }) {
                    result = Err(e);
                    break;
                }
                rest = &rest[run..];
            } else {
                match self.route(&keys[start..end], false) {
                    Ok(c) => changed[pos] = c,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
                rest = &rest[1..];
            }
        }
        self.keys = keys;
        self.order = order;
        result.map(|()| changed)
    }

    /// Forgets idempotency records older than the window (entry time).
    fn prune_idem(&mut self, clock_ms: u64) -> SResult<()> {
        let Some(cutoff) = clock_ms.checked_sub(IDEMPOTENCY_WINDOW_MS) else {
            return Ok(());
        };
        let dbs = self.store.dbs;
        let hi = cutoff.to_be_bytes();
        let range = (Bound::Unbounded, Bound::Excluded(&hi[..]));
        let mut old: Vec<Vec<u8>> = Vec::new();
        for row in dbs.idem_time.range(&self.w, &range).map_err(read_err)? {
            let (k, _) = row.map_err(read_err)?;
            old.push(k.to_vec());
            if old.len() >= IDEM_PRUNE_PER_ENTRY_MAX {
                break;
            }
        }
        for k in old {
            dbs.idem_time.delete(&mut self.w, &k).map_err(write_err)?;
            if k.len() == 32 {
                dbs.idem.delete(&mut self.w, &k[8..]).map_err(write_err)?;
            }
        }
        Ok(())
    }

    fn apply_batch(
        &mut self,
        index: u64,
        batch: Batch,
        clock: &mut u64,
    ) -> SResult<(BatchResult, Option<AppliedEntry>)> {
        let dbs = self.store.dbs;
        let key = idem_key(&batch);
        if let Some(v) = self.get(dbs.idem, &key)? {
            let rec: IdemRecord = decode_bincode(&v).map_err(read_err)?;
            self.store
                .counters
                .duplicate_batches
                .fetch_add(1, Ordering::Relaxed);
            return Ok((
                BatchResult {
                    index: rec.index,
                    results: rec.results,
                    duplicate: true,
                },
                None,
            ));
        }
        self.store.note_batch_time(batch.proposer, batch.time_ms);
        *clock = (*clock).max(batch.time_ms);
        self.stamp.clear();
        self.stamp.extend_from_slice(&encode_rkyv(&RouteStamp {
            index,
            time_ms: *clock,
        }));
        let n = batch.ops.len();
        let mut results = Vec::with_capacity(n);
        let mut changes = Vec::with_capacity(n);
        // The decoded ops move into the broadcast: no copy of their strings.
        for (pos, op) in batch.ops.into_iter().enumerate() {
            let (r, changed) = match op.validate() {
                Err(rej) => {
                    self.store
                        .counters
                        .ops_rejected
                        .fetch_add(1, Ordering::Relaxed);
                    (OpResult::Rejected(rej), false)
                }
                Ok(()) => self.apply_op(&op, index, pos, *clock)?,
            };
            if changed {
                changes.push(effective(op, &r));
            }
            results.push(r);
        }
        self.store
            .counters
            .ops_applied
            .fetch_add(n as u64, Ordering::Relaxed);
        let rec = IdemRecord {
            time_ms: *clock,
            index,
            results,
        };
        dbs.idem
            .put(&mut self.w, &key, &encode_bincode(&rec))
            .map_err(write_err)?;
        let mut tkey = Vec::with_capacity(32);
        tkey.extend_from_slice(&clock.to_be_bytes());
        tkey.extend_from_slice(&key);
        dbs.idem_time
            .put(&mut self.w, &tkey, &[])
            .map_err(write_err)?;
        let entry = (!changes.is_empty()).then_some(AppliedEntry {
            index,
            time_ms: *clock,
            proposer: batch.proposer,
            changes,
        });
        Ok((
            BatchResult {
                index,
                results: rec.results,
                duplicate: false,
            },
            entry,
        ))
    }
}

/// Inserts each `(key, tag)` of `adds`, in ascending key order, with the value `value`
/// where the key is absent (a present key keeps its value); calls `inserted(tag)` for
/// each key it inserted.
///
/// One cursor for the whole run: LMDB's `mdb_cursor_put` on a positioned cursor first
/// checks whether the key falls between the first and last key of the leaf page the
/// cursor is on (`mdb_cursor_set`'s fast path) and then searches only that page; the
/// cursor ends on the inserted (or found) key, so the next, greater key of a sorted run
/// usually finds its page without a descent from the root. The result is exactly that of
/// `get_or_put` per key (`MDB_NOOVERWRITE` is the same flag); only the search is shorter.
/// Keys out of order stay correct (the fast path falls back to a full search), only
/// slower.
fn insert_sorted<'k>(
    db: Db,
    w: &mut RwTxn<'_>,
    adds: impl Iterator<Item = (&'k [u8], usize)>,
    value: &[u8],
    mut inserted: impl FnMut(usize),
) -> SResult<()> {
    // The cursor is never moved by iteration: it yields no references into the map.
    let mut cursor = db.iter_mut(w).map_err(write_err)?;
    for (key, tag) in adds {
        // SAFETY: heed marks cursor writes unsafe because a value read through the
        // cursor would dangle after the write. Nothing is read here: `key` and `value`
        // are our own buffers, never borrowed from the map, and the iterator is never
        // advanced, so no reference into the database is held across a write. The flag
        // is `NO_OVERWRITE` (not `CURRENT`), so LMDB positions the cursor on `key` itself
        // (`mdb_cursor_put` -> `mdb_cursor_set`) and never overwrites another row.
        let put = unsafe {
            cursor.put_current_with_options::<RawBytes>(heed::PutFlags::NO_OVERWRITE, key, value)
        };
        match put {
            Ok(()) => inserted(tag),
            Err(heed::Error::Mdb(heed::MdbError::KeyExist)) => {}
            Err(e) => return Err(write_err(e)),
        }
    }
    Ok(())
}

/// What a changed op broadcasts: the op and its result, a `RouteDeltas` cut down to the
/// changes that changed the table (subscribers see only effective route changes).
fn effective(op: Op, r: &OpResult) -> (Op, OpResult) {
    match (op, r) {
        (Op::RouteDeltas { node, changes }, OpResult::RoutesChanged(changed)) => {
            let changes: Vec<RouteChange> = changes
                .into_iter()
                .zip(changed)
                .filter_map(|(c, yes)| yes.then_some(c))
                .collect();
            let r = OpResult::RoutesChanged(vec![true; changes.len()]);
            (Op::RouteDeltas { node, changes }, r)
        }
        (op, r) => (op, r.clone()),
    }
}

fn decode_batch(data: &crate::op::EntryData) -> Result<Batch, DecodeError> {
    let b = data.decode()?;
    b.validate_shape()?;
    Ok(b)
}

/// Applies `entries` in one write transaction; returns one result per entry and the
/// changes to broadcast.
fn apply_entries(
    store: &Store,
    entries: Vec<Entry<TypeConfig>>,
) -> SResult<(Vec<BatchResult>, Vec<AppliedEntry>)> {
    let dbs = store.dbs;
    let w = store.sm_env().write_txn().map_err(write_err)?;
    let mut a = Applier {
        store,
        w,
        stamp: Vec::new(),
        keys: Vec::new(),
        order: Vec::new(),
    };
    let mut clock: u64 = match a.get(dbs.sm_meta, b"clock_ms")? {
        Some(v) => decode_bincode(&v).map_err(read_err)?,
        None => 0,
    };
    let mut out = Vec::with_capacity(entries.len());
    let mut applied = Vec::new();
    let mut last: Option<LogId<NodeId>> = None;
    for e in &entries {
        let index = e.log_id.index;
        match &e.payload {
            EntryPayload::Blank => out.push(BatchResult {
                index,
                ..BatchResult::default()
            }),
            EntryPayload::Membership(m) => {
                let sm = StoredMembership::new(Some(e.log_id), m.clone());
                dbs.sm_meta
                    .put(&mut a.w, b"membership", &encode_bincode(&sm))
                    .map_err(write_err)?;
                out.push(BatchResult {
                    index,
                    ..BatchResult::default()
                });
            }
            EntryPayload::Normal(data) => match decode_batch(data) {
                Err(err) => {
                    tracing::warn!(index, %err, "raft entry does not decode; applied as empty");
                    out.push(BatchResult {
                        index,
                        ..BatchResult::default()
                    });
                }
                Ok(batch) => {
                    let (r, entry) = a.apply_batch(index, batch, &mut clock)?;
                    out.push(r);
                    applied.extend(entry);
                }
            },
        }
        a.prune_idem(clock)?;
        last = Some(e.log_id);
    }
    let Some(last) = last else {
        return Ok((out, applied));
    };
    dbs.sm_meta
        .put(&mut a.w, b"applied", &encode_bincode(&last))
        .map_err(write_err)?;
    dbs.sm_meta
        .put(&mut a.w, b"clock_ms", &encode_bincode(&clock))
        .map_err(write_err)?;
    a.w.commit().map_err(write_err)?;
    store
        .counters
        .entries_applied
        .fetch_add(entries.len() as u64, Ordering::Relaxed);
    store
        .counters
        .applied_index
        .store(last.index, Ordering::Release);
    Ok((out, applied))
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), StorageError<NodeId>>
    {
        let s = &self.store;
        let applied: Option<LogId<NodeId>> = s.sm_meta_get(b"applied").map_err(read_err)?;
        let membership: Option<StoredMembership<NodeId, NodeInfo>> =
            s.sm_meta_get(b"membership").map_err(read_err)?;
        Ok((applied, membership.unwrap_or_default()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let store = self.store.clone();
        let (results, applied) =
            blocking(&self.store, move || apply_entries(&store, entries)).await?;
        for entry in applied {
            self.store
                .applied_subscribers
                .publish(&AppliedEvent::Entry(Arc::new(entry)));
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        snapshot::begin_receiving(&self.store).await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        snapshot::install(&self.store, meta, snapshot).await?;
        let index = meta.last_log_id.map_or(0, |l| l.index);
        self.store
            .applied_subscribers
            .publish(&AppliedEvent::SnapshotInstalled { index });
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        snapshot::current(&self.store).await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        snapshot::build(&self.store).await
    }
}

/// One raw row of a state-machine table: (table name, key, value).
pub type TableRow = (&'static str, Vec<u8>, Vec<u8>);

/// A consistent, read-only view of the state machine's tables at one applied index.
///
/// Cheap to open (an LMDB read transaction); callable from any thread, including glommio
/// shards. Hold it briefly: a long-lived view keeps old pages from being reused.
pub struct TablesView {
    // Declared before `store` so the transaction ends before the env can close.
    txn: RoTxn<'static, WithoutTls>,
    store: Arc<Store>,
}

impl std::fmt::Debug for TablesView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TablesView").finish_non_exhaustive()
    }
}

fn corrupt(store: &Store, db: &'static str, key: &[u8], reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        path: store.sm_data_file().to_path_buf(),
        db,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

impl TablesView {
    pub(crate) fn new(store: Arc<Store>) -> Result<TablesView, StoreError> {
        let txn = store
            .sm_env()
            .clone()
            .static_read_txn()
            .map_err(|source| StoreError::Lmdb {
                path: store.sm_data_file().to_path_buf(),
                source,
            })?;
        Ok(TablesView { txn, store })
    }

    fn lmdb(&self, source: heed::Error) -> StoreError {
        StoreError::Lmdb {
            path: self.store.sm_data_file().to_path_buf(),
            source,
        }
    }

    /// The log index every table of this view reflects (0: nothing applied).
    pub fn applied_index(&self) -> Result<u64, StoreError> {
        let l: Option<LogId<NodeId>> =
            self.store
                .meta_get_in(&self.txn, self.store.dbs.sm_meta, "sm_meta", b"applied")?;
        Ok(l.map_or(0, |l| l.index))
    }

    /// The owner of `client_id`.
    pub fn owner(&self, client_id: &str) -> Result<Option<OwnerRecord>, StoreError> {
        let k = client_id.as_bytes();
        match self
            .store
            .dbs
            .owners
            .get(&self.txn, k)
            .map_err(|e| self.lmdb(e))?
        {
            None => Ok(None),
            Some(v) => OwnerRecord::decode(v)
                .map(Some)
                .map_err(|e| corrupt(&self.store, "owners", k, e)),
        }
    }

    /// How many sessions are owned cluster-wide.
    pub fn owner_count(&self) -> Result<u64, StoreError> {
        self.store
            .dbs
            .owners
            .len(&self.txn)
            .map_err(|e| self.lmdb(e))
    }

    /// Every route (for building a replica table).
    pub fn routes(&self) -> Result<Vec<Route>, StoreError> {
        let mut out = Vec::new();
        for row in self
            .store
            .dbs
            .routes
            .iter(&self.txn)
            .map_err(|e| self.lmdb(e))?
        {
            let (k, v) = row.map_err(|e| self.lmdb(e))?;
            let (filter, group, node) =
                parse_route_key(k).ok_or_else(|| corrupt(&self.store, "routes", k, "bad key"))?;
            let stamp: RouteStamp =
                decode_rkyv(v, "route stamp").map_err(|e| corrupt(&self.store, "routes", k, e))?;
            out.push(Route {
                filter,
                group,
                node,
                index: stamp.index,
            });
        }
        Ok(out)
    }

    /// The retained index entry of `topic`.
    pub fn retained(&self, topic: &str) -> Result<Option<RetainedRecord>, StoreError> {
        let k = topic.as_bytes();
        match self
            .store
            .dbs
            .retained
            .get(&self.txn, k)
            .map_err(|e| self.lmdb(e))?
        {
            None => Ok(None),
            Some(v) => decode_rkyv(v, "retained record")
                .map(Some)
                .map_err(|e| corrupt(&self.store, "retained", k, e)),
        }
    }

    /// Every retained topic with its record.
    pub fn retained_all(&self) -> Result<Vec<(String, RetainedRecord)>, StoreError> {
        let mut out = Vec::new();
        for row in self
            .store
            .dbs
            .retained
            .iter(&self.txn)
            .map_err(|e| self.lmdb(e))?
        {
            let (k, v) = row.map_err(|e| self.lmdb(e))?;
            let rec = decode_rkyv(v, "retained record")
                .map_err(|e| corrupt(&self.store, "retained", k, e))?;
            out.push((String::from_utf8_lossy(k).into_owned(), rec));
        }
        Ok(out)
    }

    /// Every node's metadata (from `NodeMeta` ops).
    pub fn nodes(&self) -> Result<Vec<(NodeId, NodeInfo)>, StoreError> {
        let mut out = Vec::new();
        for row in self
            .store
            .dbs
            .nodes
            .iter(&self.txn)
            .map_err(|e| self.lmdb(e))?
        {
            let (k, v) = row.map_err(|e| self.lmdb(e))?;
            let id = <[u8; 8]>::try_from(k)
                .map(u64::from_be_bytes)
                .map_err(|_| corrupt(&self.store, "nodes", k, "bad key"))?;
            let info =
                decode_rkyv(v, "node info").map_err(|e| corrupt(&self.store, "nodes", k, e))?;
            out.push((id, info));
        }
        Ok(out)
    }

    /// Every row of every state-machine table, in order (for comparing replicas).
    pub fn dump(&self) -> Result<Vec<TableRow>, StoreError> {
        let mut out = Vec::new();
        for (name, db) in super::SM_TABLES.iter().zip(self.store.dbs.sm_tables()) {
            for row in db.iter(&self.txn).map_err(|e| self.lmdb(e))? {
                let (k, v) = row.map_err(|e| self.lmdb(e))?;
                out.push((*name, k.to_vec(), v.to_vec()));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_keys_round_trip() {
        let k = route_key("a/+/#", Some("g1"), 7);
        assert_eq!(
            parse_route_key(&k),
            Some(("a/+/#".into(), Some("g1".into()), 7))
        );
        let k = route_key("x", None, 1);
        assert_eq!(parse_route_key(&k), Some(("x".into(), None, 1)));
        assert_eq!(parse_route_key(b"short"), None);
    }

    /// The owner rows written by apply are rkyv's archive, so stores written before
    /// the stack encoding, snapshots and `TablesView::owner` read them alike.
    #[test]
    fn owner_records_are_stored_as_rkyv_encodes_them() {
        for (node, epoch, time_ms) in [
            (1, 0, 0),
            (3, claim_epoch(7, 5), 1_765_000_000_123),
            (u64::MAX, u64::MAX - 1, 1 << 63),
            (
                0x0102_0304_0506_0708,
                0x1112_1314_1516_1718,
                0x2122_2324_2526_2728,
            ),
        ] {
            let rec = OwnerRecord {
                node,
                epoch,
                time_ms,
                fresh: epoch ^ time_ms,
            };
            assert_eq!(rec.encode()[..], encode_rkyv(&rec)[..], "{rec:?}");
            assert_eq!(
                decode_rkyv::<OwnerRecord>(&rec.encode(), "owner").unwrap(),
                rec
            );
            assert_eq!(OwnerRecord::decode(&rec.encode()).unwrap(), rec);
            // A record of a store written before `fresh` existed: its first 24 bytes.
            assert_eq!(
                OwnerRecord::decode(&rec.encode()[..24]).unwrap(),
                OwnerRecord { fresh: 0, ..rec }
            );
            assert!(OwnerRecord::decode(&rec.encode()[..23]).is_err());
            assert!(OwnerRecord::decode(&[0; 40]).is_err());
        }
    }

    use crate::op::{EntryData, ROUTE_CHANGES_MAX, Rejection};
    use crate::store::StoreOptions;
    use openraft::CommittedLeaderId;

    fn store(dir: &std::path::Path) -> Arc<Store> {
        Store::open(
            dir,
            StoreOptions {
                map_size_bytes: 64 << 20,
                fsync: false,
                io_on_blocking_pool: false,
            },
        )
        .unwrap()
    }

    fn entry(index: u64, data: EntryData) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(data),
        }
    }

    fn batch(seq: u64, ops: Vec<Op>) -> Batch {
        Batch {
            proposer: 2,
            incarnation: 1,
            seq,
            time_ms: 1_000 + seq,
            ops,
        }
    }

    fn change(filter: &str, group: Option<&str>, add: bool) -> RouteChange {
        RouteChange {
            filter: filter.into(),
            group: group.map(Into::into),
            add,
        }
    }

    /// `c` as a single `RouteDelta` of node 2.
    fn single_delta(c: &RouteChange) -> Op {
        Op::RouteDelta {
            node: 2,
            filter: c.filter.clone(),
            group: c.group.clone(),
            add: c.add,
        }
    }

    /// Per single `RouteDelta` op of `r`: did it change the table.
    fn single_changed(r: &BatchResult) -> Vec<bool> {
        r.results
            .iter()
            .map(|r| matches!(r, OpResult::RouteAdded(true) | OpResult::RouteRemoved(true)))
            .collect()
    }

    fn route_rows(s: &Arc<Store>) -> Vec<TableRow> {
        let v = TablesView::new(s.clone()).unwrap();
        v.dump()
            .unwrap()
            .into_iter()
            .filter(|r| r.0 == "routes")
            .collect()
    }

    /// A batch stamped an hour after this node's clock is counted (and logged); one
    /// stamped now, or long ago (a log being caught up), is not.
    #[test]
    fn a_batch_from_a_clock_ahead_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let op = |n: &str| Op::RouteDelta {
            node: 2,
            filter: n.into(),
            group: None,
            add: true,
        };
        let stamped = |seq: u64, time_ms: u64| Batch {
            time_ms,
            ..batch(seq, vec![op(&seq.to_string())])
        };
        for (index, b) in [stamped(1, 1_000), stamped(2, now)].into_iter().enumerate() {
            apply_entries(&s, vec![entry(index as u64 + 1, b.encode())]).unwrap();
        }
        assert_eq!(s.counters.batches_clock_ahead.load(Ordering::Relaxed), 0);
        let ahead = stamped(3, now + 3_600_000);
        apply_entries(&s, vec![entry(3, ahead.encode())]).unwrap();
        assert_eq!(s.counters.batches_clock_ahead.load(Ordering::Relaxed), 1);
    }

    /// A `RouteDeltas` op does exactly what its changes do as single `RouteDelta` ops in
    /// the same order (same tables, same per-change outcome), even with several changes
    /// to one key in one op, and broadcasts only the changes that changed the table.
    #[test]
    fn route_deltas_apply_like_the_same_single_deltas_in_order() {
        let changes = vec![
            change("z/#", None, true),
            change("a/+", Some("g"), true),
            change("z/#", None, true),
            change("m", None, true),
            change("z/#", None, false),
            change("gone", None, false),
            change("z/#", None, true),
            change("a/+", None, true),
        ];
        let multi = tempfile::tempdir().unwrap();
        let single = tempfile::tempdir().unwrap();
        let (sm, ss) = (store(multi.path()), store(single.path()));
        // One route existed before: its add is no change.
        let pre = Op::RouteDelta {
            node: 2,
            filter: "m".into(),
            group: None,
            add: true,
        };
        for s in [&sm, &ss] {
            apply_entries(s, vec![entry(1, batch(1, vec![pre.clone()]).encode())]).unwrap();
        }
        let op = Op::RouteDeltas {
            node: 2,
            changes: changes.clone(),
        };
        let (res, applied) =
            apply_entries(&sm, vec![entry(2, batch(2, vec![op]).encode())]).unwrap();
        let expected = vec![true, true, false, false, true, false, true, true];
        assert_eq!(
            res[0].results,
            vec![OpResult::RoutesChanged(expected.clone())]
        );
        let singles: Vec<Op> = changes.iter().map(single_delta).collect();
        let (sres, _) = apply_entries(&ss, vec![entry(2, batch(2, singles).encode())]).unwrap();
        let single_changed = single_changed(&sres[0]);
        assert_eq!(single_changed, expected);
        assert_eq!(route_rows(&sm), route_rows(&ss));
        assert_eq!(route_rows(&sm).len(), 4, "z/#, a/+ in g, a/+, m");
        // Broadcast: the effective changes, in the op's order.
        assert_eq!(applied.len(), 1);
        let effective: Vec<RouteChange> = changes
            .iter()
            .zip(&expected)
            .filter(|(_, yes)| **yes)
            .map(|(c, _)| c.clone())
            .collect();
        assert_eq!(
            applied[0].changes,
            vec![(
                Op::RouteDeltas {
                    node: 2,
                    changes: effective
                },
                OpResult::RoutesChanged(vec![true; 5])
            )]
        );
    }

    /// Big ops through the one-cursor insert path: thousands of rows already in the table
    /// (so inserts land between existing rows and split pages), adds of present and absent
    /// keys, removes in between and changes to one key several times, in a scrambled
    /// order. Every table ends as with the same changes applied one `RouteDelta` at a
    /// time, with the same per-change outcome.
    #[test]
    fn big_route_deltas_ops_apply_like_single_deltas() {
        let multi = tempfile::tempdir().unwrap();
        let single = tempfile::tempdir().unwrap();
        let (sm, ss) = (store(multi.path()), store(single.path()));
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let filter = |i: u64| format!("s/{}/{}/#", i % 3000, i / 3000);
        // The table before: 6,000 routes of node 2 (some of them touched below).
        let pre: Vec<Op> = (0..6)
            .map(|k| Op::RouteDeltas {
                node: 2,
                changes: (k * 1000..(k + 1) * 1000)
                    .map(|i| change(&filter(i * 2), None, true))
                    .collect(),
            })
            .collect();
        for s in [&sm, &ss] {
            apply_entries(s, vec![entry(1, batch(1, pre.clone()).encode())]).unwrap();
        }
        for round in 0..3u64 {
            let ops: Vec<Vec<RouteChange>> = (0..4)
                .map(|_| {
                    (0..ROUTE_CHANGES_MAX)
                        .map(|_| {
                            let r = next();
                            let group = (r % 7 == 0).then_some("g");
                            change(&filter((r >> 8) % 15_000), group, r % 5 != 0)
                        })
                        .collect()
                })
                .collect();
            let index = round + 2;
            let multi_ops: Vec<Op> = ops
                .iter()
                .map(|c| Op::RouteDeltas {
                    node: 2,
                    changes: c.clone(),
                })
                .collect();
            let single_ops: Vec<Op> = ops.iter().flatten().map(single_delta).collect();
            let (mres, _) =
                apply_entries(&sm, vec![entry(index, batch(index, multi_ops).encode())]).unwrap();
            let (sres, _) =
                apply_entries(&ss, vec![entry(index, batch(index, single_ops).encode())]).unwrap();
            let multi_changed: Vec<bool> = mres[0]
                .results
                .iter()
                .flat_map(|r| match r {
                    OpResult::RoutesChanged(c) => c.clone(),
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
            assert_eq!(multi_changed, single_changed(&sres[0]), "round {round}");
            assert!(multi_changed.contains(&true) && multi_changed.contains(&false));
            assert_eq!(route_rows(&sm), route_rows(&ss), "round {round}");
        }
        assert!(route_rows(&sm).len() > 6000);
    }

    /// A lying (or buggy) peer's entry with a bad `RouteDeltas` is rejected op by op: the
    /// bad op changes nothing, the good ops of the same entry apply, nothing panics.
    #[test]
    fn a_bad_route_deltas_op_is_rejected_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let good = Op::RouteDeltas {
            node: 3,
            changes: vec![change("ok/1", None, true)],
        };
        let bad = [
            (
                Op::RouteDeltas {
                    node: 3,
                    changes: vec![change("ok/2", None, true), change("a\0b", None, true)],
                },
                Rejection::BadString(crate::op::Field::Filter),
            ),
            (
                Op::RouteDeltas {
                    node: 3,
                    changes: vec![change("ok/3", Some(""), true)],
                },
                Rejection::BadString(crate::op::Field::Group),
            ),
            (
                Op::RouteDeltas {
                    node: 0,
                    changes: vec![change("ok/4", None, true)],
                },
                Rejection::BadNode,
            ),
            (
                Op::RouteDeltas {
                    node: 3,
                    changes: Vec::new(),
                },
                Rejection::BadRouteCount,
            ),
            (
                Op::RouteDeltas {
                    node: 3,
                    changes: (0..=ROUTE_CHANGES_MAX)
                        .map(|i| change(&format!("f/{i}"), None, true))
                        .collect(),
                },
                Rejection::BadRouteCount,
            ),
        ];
        let mut ops = vec![good.clone()];
        ops.extend(bad.iter().map(|(op, _)| op.clone()));
        ops.push(good);
        let (res, applied) = apply_entries(&s, vec![entry(1, batch(1, ops).encode())]).unwrap();
        let r = &res[0].results;
        assert_eq!(r[0], OpResult::RoutesChanged(vec![true]));
        for (i, (_, why)) in bad.iter().enumerate() {
            assert_eq!(r[i + 1], OpResult::Rejected(*why), "op {}", i + 1);
        }
        assert_eq!(r[bad.len() + 1], OpResult::RoutesChanged(vec![false]));
        let rows = route_rows(&s);
        assert_eq!(rows.len(), 1, "only ok/1: {rows:?}");
        assert_eq!(applied[0].changes.len(), 1);
        assert_eq!(s.counters.ops_rejected.load(Ordering::Relaxed), 5);
    }

    /// A batch retried after a leader change (the same bytes, a later index) is answered
    /// with the first results and applies nothing twice: a remove in between stays.
    #[test]
    fn a_retried_route_deltas_batch_applies_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data = batch(
            7,
            vec![Op::RouteDeltas {
                node: 2,
                changes: vec![change("r/1", None, true), change("r/2", None, true)],
            }],
        )
        .encode();
        let (first, _) = apply_entries(&s, vec![entry(1, data.clone())]).unwrap();
        let remove = Op::RouteDelta {
            node: 2,
            filter: "r/1".into(),
            group: None,
            add: false,
        };
        apply_entries(&s, vec![entry(2, batch(8, vec![remove]).encode())]).unwrap();
        let (again, applied) = apply_entries(&s, vec![entry(3, data)]).unwrap();
        assert!(again[0].duplicate);
        assert_eq!(again[0].index, 1);
        assert_eq!(again[0].results, first[0].results);
        assert!(applied.is_empty(), "a duplicate broadcasts nothing");
        let rows = route_rows(&s);
        assert_eq!(rows.len(), 1, "r/1 stays removed: {rows:?}");
        assert_eq!(s.counters.duplicate_batches.load(Ordering::Relaxed), 1);
    }

    /// A claim answers the owner it displaced (node and epoch), within one entry and
    /// across entries; the table holds the last claim; a release with an old epoch is
    /// stale and changes nothing.
    #[test]
    fn a_claim_returns_the_owner_it_displaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let claim = |cid: &str, node| Op::ClaimSession {
            client_id: cid.into(),
            node,
        };
        let (r, _) = apply_entries(
            &s,
            vec![entry(
                3,
                batch(1, vec![claim("c", 1), claim("d", 1), claim("c", 2)]).encode(),
            )],
        )
        .unwrap();
        let (e0, e2) = (claim_epoch(3, 0), claim_epoch(3, 2));
        assert_eq!(
            r[0].results,
            vec![
                OpResult::Claimed {
                    epoch: e0,
                    previous: None
                },
                OpResult::Claimed {
                    epoch: claim_epoch(3, 1),
                    previous: None
                },
                OpResult::Claimed {
                    epoch: e2,
                    previous: Some(Owner { node: 1, epoch: e0 })
                },
            ]
        );
        let (r, _) = apply_entries(
            &s,
            vec![entry(
                4,
                batch(
                    2,
                    vec![
                        claim("c", 3),
                        Op::ReleaseSession {
                            client_id: "c".into(),
                            node: 2,
                            epoch: e2,
                        },
                    ],
                )
                .encode(),
            )],
        )
        .unwrap();
        let e3 = claim_epoch(4, 0);
        assert_eq!(
            r[0].results,
            vec![
                OpResult::Claimed {
                    epoch: e3,
                    previous: Some(Owner { node: 2, epoch: e2 })
                },
                OpResult::ReleaseStale {
                    current: Some(Owner { node: 3, epoch: e3 })
                },
            ]
        );
        let v = TablesView::new(s.clone()).unwrap();
        let o = v.owner("c").unwrap().unwrap();
        assert_eq!((o.node, o.epoch), (3, e3));
        assert_eq!(v.owner_count().unwrap(), 2);
    }

    /// Which session a claim serves is in the record: a ClientID nobody owned and a
    /// Clean Start start afresh (`fresh` = the claim's epoch), a takeover keeps what
    /// was known before until its owner marks its session fresh, and a mark of an
    /// owner or epoch that is no longer the committed one changes nothing.
    #[test]
    fn claims_and_marks_record_which_epoch_started_a_session_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let claim = |node| Op::ClaimSession {
            client_id: "c".into(),
            node,
        };
        let fresh = |node, epoch| Op::SessionFresh {
            client_id: "c".into(),
            node,
            epoch,
        };
        let owner = || {
            let v = TablesView::new(s.clone()).unwrap();
            let o = v.owner("c").unwrap().unwrap();
            (o.node, o.epoch, o.fresh)
        };
        apply_entries(&s, vec![entry(3, batch(1, vec![claim(1)]).encode())]).unwrap();
        let e1 = claim_epoch(3, 0);
        assert_eq!(owner(), (1, e1, e1), "nobody owned it: a fresh session");
        apply_entries(&s, vec![entry(4, batch(2, vec![claim(2)]).encode())]).unwrap();
        let e2 = claim_epoch(4, 0);
        assert_eq!(owner(), (2, e2, e1), "a takeover continues, unknown yet");
        let (r, applied) = apply_entries(
            &s,
            vec![entry(
                5,
                batch(3, vec![fresh(1, e1), fresh(2, e2)]).encode(),
            )],
        )
        .unwrap();
        assert_eq!(
            r[0].results,
            vec![OpResult::MarkedFresh(false), OpResult::MarkedFresh(true)]
        );
        assert_eq!(owner(), (2, e2, e2));
        assert_eq!(
            applied[0].changes,
            vec![(fresh(2, e2), OpResult::MarkedFresh(true))],
            "only the mark that changed the table is broadcast"
        );
        apply_entries(&s, vec![entry(6, batch(4, vec![claim(3)]).encode())]).unwrap();
        let e3 = claim_epoch(6, 0);
        assert_eq!(owner(), (3, e3, e2));
        let clean = Op::ClaimCleanStart {
            client_id: "c".into(),
            node: 1,
        };
        let (r, _) = apply_entries(&s, vec![entry(7, batch(5, vec![clean]).encode())]).unwrap();
        let e4 = claim_epoch(7, 0);
        assert_eq!(
            r[0].results,
            vec![OpResult::Claimed {
                epoch: e4,
                previous: Some(Owner { node: 3, epoch: e3 })
            }]
        );
        assert_eq!(owner(), (1, e4, e4), "a Clean Start is fresh at once");
    }

    #[test]
    fn epochs_grow_with_the_log_and_the_position() {
        assert!(claim_epoch(5, 0) < claim_epoch(5, 1));
        assert!(claim_epoch(5, (1 << 20) - 1) < claim_epoch(6, 0));
    }
}
