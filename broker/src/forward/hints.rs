//! Hints: the batches a node could not forward to a peer that has been unreachable for
//! longer than the session lease, kept on this node's disk so their publishers are
//! answered (issue 16: a dead node must not stall QoS 1/2 publishers cluster-wide).
//! Design and bounds: docs/ARCHITECTURE.md, "Cluster: hints for an unreachable peer".
//!
//! One LMDB env, `data_dir/hints`, one table: key `peer u64 | generation u64 | seq u64`
//! (big-endian, so a peer's batches of one generation are in order), value the batch
//! request exactly as sent on the forward channel (the envelope, then a `wire` batch
//! with base: incarnation, seq, base, records). A *generation* is one life of this
//! node's forwarder (the highest stored one plus one at open), so a batch keeps the
//! incarnation and sequence number its receiver may already know it by: a restarted
//! node sends an earlier life's hints again under that life's incarnation, so the
//! receiver's marks (`tessera_shard::mesh::ForwardMark`, stored with what the batch
//! stored) drop a batch it had already committed, and never numbers a new batch with a
//! number of an earlier life.
//!
//! A write is one transaction (puts and deletes of every batch that came meanwhile)
//! and, outside the simulation, one fsync; the publishers of a batch are answered only
//! once the transaction that holds it is committed, so a PUBACK after hinting survives
//! a `kill -9` of this node.
//!
//! Corrupt content (a key or a value that is not one of ours) is an error naming the
//! file at open, never a panic; a truncated data file is extended first so LMDB reports
//! it as corrupt instead of a SIGBUS (as the raft and shard stores do).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use heed::types::Bytes as Raw;
use heed::{Database, Env, EnvOpenOptions, WithoutTls};
use tessera_raft::NodeId;

/// Bytes of LMDB's map beyond the budget: its pages, free lists and the records'
/// overhead never make a store under budget fail with a full map.
const MAP_SLACK_BYTES: u64 = 64 << 20;
/// Batches of one peer the sender keeps hinted at once, whatever their bytes (each
/// costs a small entry in memory): beyond it the sender waits, as at the byte budget.
pub const HINTED_BATCHES_MAX: usize = 1 << 16;

/// How a hint store's writes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HintIo {
    /// On tokio's blocking pool (the broker: a commit is an fsync, never on the
    /// control thread's runtime).
    Blocking,
    /// On the caller's task after a short pause of its clock (the data-plane
    /// simulation: a paused clock cannot order a thread's real-time commit).
    Inline,
}

/// A hint store that cannot be opened or read.
#[derive(Debug, thiserror::Error)]
#[error("hint store {path}: {reason}")]
pub struct HintError {
    /// The env's data file.
    pub path: PathBuf,
    /// What is wrong, and what to do.
    pub reason: String,
}

/// One batch found at open: (generation, seq) -> its size in bytes.
pub type Stored = BTreeMap<(u64, u64), u64>;

/// The node's hint store.
pub struct HintStore {
    env: Env<WithoutTls>,
    db: Database<'static, Raw, Raw>,
    data_file: PathBuf,
    budget: u64,
    used: AtomicU64,
    generation: u64,
    io: HintIo,
}

impl std::fmt::Debug for HintStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HintStore")
            .field("data_file", &self.data_file)
            .field("budget", &self.budget)
            .field("used", &self.used.load(Ordering::Relaxed))
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

fn key(peer: NodeId, generation: u64, seq: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&peer.to_be_bytes());
    k[8..16].copy_from_slice(&generation.to_be_bytes());
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn split_key(k: &[u8]) -> Option<(NodeId, u64, u64)> {
    let k: &[u8; 24] = k.try_into().ok()?;
    let n = |r: std::ops::Range<usize>| u64::from_be_bytes(k[r].try_into().unwrap_or([0; 8]));
    Some((n(0..8), n(8..16), n(16..24)))
}

/// The incarnation and seq in a stored batch's header (after `prefix_len` bytes of
/// envelope), if it is a batch with base.
pub fn batch_header(batch: &[u8], prefix_len: usize) -> Option<(u64, u64)> {
    let h = batch.get(prefix_len..prefix_len + 25)?;
    if h[0] != 3 {
        return None;
    }
    let inc = u64::from_be_bytes(h[1..9].try_into().ok()?);
    let seq = u64::from_be_bytes(h[9..17].try_into().ok()?);
    Some((inc, seq))
}

impl HintStore {
    /// Opens (creating) the store in `dir` with a budget of `budget` bytes of hinted
    /// batches. `sync`: each commit is an fsync (the broker; the simulation runs
    /// without). Returns the store and, per peer, the batches earlier lives left
    /// (checked: each key is ours and each value a batch with its key's seq).
    pub fn open(
        dir: &Path,
        budget: u64,
        sync: bool,
        io: HintIo,
        prefix_len: usize,
    ) -> Result<(HintStore, BTreeMap<NodeId, Stored>), HintError> {
        let data_file = dir.join("data.mdb");
        let fail = |reason: String| HintError {
            path: data_file.clone(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create: {e}")))?;
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        // A whole number of MiB (LMDB wants a multiple of the page size).
        let map = budget
            .saturating_mul(2)
            .saturating_add(MAP_SLACK_BYTES)
            .div_ceil(1 << 20)
            .saturating_mul(1 << 20);
        opts.map_size(usize::try_from(map).unwrap_or(usize::MAX))
            .max_dbs(1);
        if !sync {
            // SAFETY: asked for by the simulation only, which never loses power.
            unsafe { opts.flags(heed::EnvFlags::NO_SYNC) };
        }
        // SAFETY: data_dir/hints is this node's alone (the data directory's lock keeps
        // other processes out) and no transaction outlives the env.
        let env = unsafe { opts.open(dir) }.map_err(|e| fail(format!("cannot open: {e}")))?;
        fill_to_last_page(&env, &data_file).map_err(&fail)?;
        let corrupt = |what: String| {
            fail(format!(
                "corrupt ({what}); the hinted batches in it cannot be sent. Stop the \
                 node, move {} away (its messages for the peers it names are lost unless \
                 restored) and start again",
                dir.display()
            ))
        };
        let wtxn = env
            .write_txn()
            .map_err(|e| corrupt(format!("no write transaction: {e}")))?;
        let db = env
            .create_databases_and_commit(wtxn, |opener, wtxn| {
                let db = opener.create_database::<Raw, Raw>(wtxn, Some("batches"))?;
                Ok::<_, heed::Error>(heed::CommitOrAbort::<_, ()>::Commit(db))
            })
            .map_err(|e| corrupt(format!("no table: {e}")))?
            .unwrap_commit();
        // SAFETY: a `Database` is an (env identity, dbi) pair; its lifetime only ties it
        // to its env. It lives in `HintStore` beside that env and is only used with that
        // env's transactions (as the raft store's handles).
        let db = unsafe {
            std::mem::transmute::<Database<'_, Raw, Raw>, Database<'static, Raw, Raw>>(db)
        };
        let mut found: BTreeMap<NodeId, Stored> = BTreeMap::new();
        let mut used = 0u64;
        let mut last_generation = 0u64;
        {
            let rtxn = env
                .read_txn()
                .map_err(|e| corrupt(format!("no read transaction: {e}")))?;
            let iter = db
                .iter(&rtxn)
                .map_err(|e| corrupt(format!("unreadable: {e}")))?;
            for entry in iter {
                let (k, v) = entry.map_err(|e| corrupt(format!("unreadable: {e}")))?;
                let Some((peer, generation, seq)) = split_key(k) else {
                    return Err(corrupt(format!("a key of {} bytes", k.len())));
                };
                match batch_header(v, prefix_len) {
                    Some((_, s)) if s == seq => {}
                    _ => {
                        return Err(corrupt(format!(
                            "the value of peer {peer} generation {generation} batch {seq} \
                             is not that batch"
                        )));
                    }
                }
                used += v.len() as u64;
                last_generation = last_generation.max(generation);
                found
                    .entry(peer)
                    .or_default()
                    .insert((generation, seq), v.len() as u64);
            }
        }
        if used > 0 {
            let batches: usize = found.values().map(BTreeMap::len).sum();
            tracing::info!(
                path = %data_file.display(),
                batches,
                bytes = used,
                peers = found.len(),
                "hints of an earlier life found: they are sent to their peers first"
            );
        }
        Ok((
            HintStore {
                env,
                db,
                data_file,
                budget,
                used: AtomicU64::new(used),
                generation: last_generation + 1,
                io,
            },
            found,
        ))
    }

    /// This life's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How writes run.
    pub fn io(&self) -> HintIo {
        self.io
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes of batches stored or being written, all peers.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether the budget has room for another batch.
    pub fn has_room(&self) -> bool {
        self.used() < self.budget
    }

    /// Counts `bytes` of a batch about to be written (one batch may take the store
    /// past its budget: a large message is never stuck).
    pub fn add(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives back what [`Self::add`] counted (a batch deleted, or not written).
    pub fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    /// One transaction: `puts` (peer, generation, seq, batch) then `deletes` (peer,
    /// generation, seq), committed (an fsync unless the store was opened without).
    pub fn write(
        &self,
        puts: &[(NodeId, u64, u64, Bytes)],
        deletes: &[(NodeId, u64, u64)],
    ) -> Result<(), String> {
        let mut wtxn = self.env.write_txn().map_err(|e| e.to_string())?;
        for (peer, generation, seq, bytes) in puts {
            self.db
                .put(&mut wtxn, &key(*peer, *generation, *seq), bytes)
                .map_err(|e| e.to_string())?;
        }
        for (peer, generation, seq) in deletes {
            self.db
                .delete(&mut wtxn, &key(*peer, *generation, *seq))
                .map_err(|e| e.to_string())?;
        }
        wtxn.commit().map_err(|e| e.to_string())
    }

    /// A stored batch (`None` if it is not there).
    pub fn read(&self, peer: NodeId, generation: u64, seq: u64) -> Result<Option<Bytes>, String> {
        let rtxn = self.env.read_txn().map_err(|e| e.to_string())?;
        let v = self
            .db
            .get(&rtxn, &key(peer, generation, seq))
            .map_err(|e| e.to_string())?;
        Ok(v.map(Bytes::copy_from_slice))
    }

    /// The data file, for messages.
    pub fn path(&self) -> &Path {
        &self.data_file
    }
}

/// Makes the data file at least as long as its meta page says (see the raft store's
/// `fill_to_last_page`): a truncated file reads as corrupt, not as a SIGBUS.
fn fill_to_last_page(env: &Env<WithoutTls>, data_file: &Path) -> Result<(), String> {
    let page = env.unnamed_database_stat().page_size as u64;
    let needed = (env.info().last_page_number as u64 + 1).saturating_mul(page);
    let len = std::fs::metadata(data_file)
        .map_err(|e| e.to_string())?
        .len();
    if len < needed {
        tracing::warn!(
            path = %data_file.display(),
            len,
            needed,
            "the hint store's data file ends before its last page: extended with zeros"
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(data_file)
            .and_then(|f| f.set_len(needed))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(inc: u64, seq: u64) -> Bytes {
        super::super::wire::BatchWriter::with_base(&[9, 0, 0], inc, seq, seq).finish()
    }

    #[test]
    fn batches_survive_a_reopen_under_their_generation_and_the_next_life_numbers_on() {
        let dir = tempfile::tempdir().unwrap();
        let (s, found) = HintStore::open(dir.path(), 1 << 20, true, HintIo::Inline, 3).unwrap();
        assert!(found.is_empty());
        assert_eq!(s.generation(), 1);
        s.write(&[(2, 1, 5, batch(77, 5)), (2, 1, 6, batch(77, 6))], &[])
            .unwrap();
        s.write(&[(3, 1, 1, batch(77, 1))], &[(2, 1, 5)]).unwrap();
        drop(s);
        let (s, found) = HintStore::open(dir.path(), 1 << 20, true, HintIo::Inline, 3).unwrap();
        assert_eq!(s.generation(), 2);
        assert_eq!(found.len(), 2);
        assert_eq!(found[&2].keys().copied().collect::<Vec<_>>(), vec![(1, 6)]);
        let b = s.read(2, 1, 6).unwrap().unwrap();
        assert_eq!(batch_header(&b, 3), Some((77, 6)));
        assert_eq!(s.used(), (batch(77, 6).len() + batch(77, 1).len()) as u64);
        s.write(&[], &[(2, 1, 6)]).unwrap();
        assert_eq!(s.read(2, 1, 6).unwrap(), None);
    }

    #[test]
    fn a_value_that_is_not_its_batch_is_a_corrupt_store_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = HintStore::open(dir.path(), 1 << 20, true, HintIo::Inline, 3).unwrap();
        s.write(&[(2, 1, 5, batch(77, 6))], &[]).unwrap();
        drop(s);
        let e = HintStore::open(dir.path(), 1 << 20, true, HintIo::Inline, 3).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
        assert!(e.to_string().contains("data.mdb"), "{e}");
    }

    #[test]
    fn a_truncated_data_file_is_an_error_not_a_sigbus() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = HintStore::open(dir.path(), 1 << 20, true, HintIo::Inline, 3).unwrap();
        let big = Bytes::from(vec![7u8; 300_000]);
        let mut b = batch(1, 1).to_vec();
        b.extend_from_slice(&big);
        s.write(&[(2, 1, 1, Bytes::from(b))], &[]).unwrap();
        drop(s);
        let f = dir.path().join("data.mdb");
        // Only the two meta pages are left: the table's pages are past the end.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(8192)
            .unwrap();
        let e = HintStore::open(dir.path(), 1 << 20, true, HintIo::Inline, 3).unwrap_err();
        assert!(e.to_string().contains("hint store"), "{e}");
    }

    #[test]
    fn the_budget_bounds_what_is_added_after_it_is_reached() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = HintStore::open(dir.path(), 100, false, HintIo::Inline, 3).unwrap();
        assert!(s.has_room());
        s.add(500);
        assert!(!s.has_room());
        s.release(450);
        assert!(s.has_room());
        s.add(50);
        assert!(!s.has_room());
    }
}
