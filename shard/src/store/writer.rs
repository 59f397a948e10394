//! The writer thread of one shard store.
//!
//! The shard sends [`Batch`]es through a bounded channel; the thread takes
//! every batch waiting (up to `TXN_OPS_MAX` ops), applies them in one write
//! transaction, commits (LMDB fsyncs here), and sends the highest epoch it
//! committed back on an unbounded channel whose async receive wakes the
//! shard's executor. In `batched` durability it commits at most once per
//! `batch_interval`.
//!
//! Errors never drop data: a full map is grown (doubling) and the transaction
//! retried; any other failure (full disk, I/O error) is logged with the path
//! and the fix and retried every second, and nothing waiting for that commit
//! is acknowledged meanwhile.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use heed::{Env, WithoutTls};
use tracing::{error, warn};

use super::{
    Batch, Committed, Loaded, MixHasher, SharedStoreStats, StoreOp, StoreStats, apply, load_queue,
    open_dbs,
};

/// Ops applied in one transaction at most; more waiting go to the next one.
const TXN_OPS_MAX: usize = 100_000;

/// Batches waiting in the channel to the writer before the shard holds them
/// back (and pauses its readers).
pub const CHANNEL_BATCHES_MAX: usize = 1024;

/// How a store commits.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `sync`: commit as soon as a batch arrives (acknowledgements wait for
    /// it); `batched`: commit every `batch_interval`.
    pub sync: bool,
    /// Commit interval in batched mode.
    pub batch_interval: Duration,
    /// Milliseconds to add to broker time to get wall-clock time.
    pub wall_base_ms: u64,
}

/// The shard's end of its writer thread.
#[derive(Debug)]
pub struct StoreHandle {
    /// Batches to commit.
    pub batches: flume::Sender<Batch>,
    /// Highest epoch committed, sent after each commit with the queue
    /// loads its batches asked for.
    pub committed: flume::Receiver<Committed>,
    /// The store's counters.
    pub stats: SharedStoreStats,
    /// The env directory, for messages.
    pub path: PathBuf,
    /// The commit interval of `batched` durability (the driver takes the
    /// shard's batches at that pace).
    pub batch_interval: Duration,
    /// The thread; joined at shutdown.
    pub thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts the writer thread of shard `shard` on `env`.
pub fn spawn_writer(
    shard: usize,
    env: Env<WithoutTls>,
    path: PathBuf,
    config: StoreConfig,
) -> std::io::Result<StoreHandle> {
    let (batch_tx, batch_rx) = flume::bounded::<Batch>(CHANNEL_BATCHES_MAX);
    let (done_tx, done_rx) = flume::unbounded::<Committed>();
    let stats = Arc::new(StoreStats::default());
    let thread_stats = stats.clone();
    let thread_path = path.clone();
    let batch_interval = config.batch_interval;
    let thread = std::thread::Builder::new()
        .name(format!("store-{shard}"))
        .spawn(move || run(env, thread_path, config, batch_rx, done_tx, thread_stats))?;
    Ok(StoreHandle {
        batches: batch_tx,
        committed: done_rx,
        stats,
        path,
        batch_interval,
        thread: Some(thread),
    })
}

fn run(
    env: Env<WithoutTls>,
    path: PathBuf,
    config: StoreConfig,
    rx: flume::Receiver<Batch>,
    done: flume::Sender<Committed>,
    stats: Arc<StoreStats>,
) {
    let dbs = loop {
        match open_dbs(&env) {
            Ok(dbs) => break dbs,
            Err(e) => {
                error!(path = %path.display(), "store: cannot open databases: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let mut pending: Vec<Batch> = Vec::new();
    let mut last_commit = Instant::now();
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(b) => pending.push(b),
                Err(_) => return, // the shard stopped and everything is committed
            }
        }
        if !config.sync {
            let due = last_commit + config.batch_interval;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let mut ops: usize = pending.iter().map(|b| b.ops.len()).sum();
        while ops < TXN_OPS_MAX {
            match rx.try_recv() {
                Ok(b) => {
                    ops += b.ops.len();
                    pending.push(b);
                }
                Err(_) => break,
            }
        }
        let committed = commit_pending(&env, &dbs, &path, &config, &stats, &pending, ops);
        last_commit = Instant::now();
        pending.clear();
        // The shard may be gone at shutdown; nothing left to tell then.
        let _ = done.send(committed);
    }
}

/// Commits `pending` (`ops` ops; at least one batch) in one transaction, retrying as
/// long as it fails (a full map is grown), then reads the loads the batches ask for.
fn commit_pending(
    env: &Env<WithoutTls>,
    dbs: &super::Dbs<'_>,
    path: &std::path::Path,
    config: &StoreConfig,
    stats: &StoreStats,
    pending: &[Batch],
    ops: usize,
) -> Committed {
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        match commit(env, dbs, pending, config.wall_base_ms) {
            Ok(()) => break,
            Err(heed::Error::Mdb(heed::MdbError::MapFull)) => {
                let size = env.info().map_size;
                let grown = size.saturating_mul(2);
                // SAFETY: the writer (its thread, or `commit_now`'s caller) is
                // the only user of the env once recovery finished, and no
                // transaction is open here.
                match unsafe { env.resize(grown) } {
                    Ok(()) => {
                        stats
                            .map_grown
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        warn!(
                            path = %path.display(),
                            from_bytes = size,
                            to_bytes = grown,
                            "store: map full, grown; raise persistence.map_size_mb to \
                             start larger"
                        );
                    }
                    Err(e) => {
                        stats
                            .commit_errors
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        error!(
                            path = %path.display(),
                            "store: map full and cannot grow to {grown} bytes: {e}. Free \
                             memory or disk space; acknowledgements wait meanwhile"
                        );
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
            Err(e) => {
                attempt += 1;
                stats
                    .commit_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if attempt.is_power_of_two() {
                    error!(
                        path = %path.display(),
                        attempt,
                        "store: commit failed: {e}. If the disk is full, free space on \
                         it; nothing is acknowledged until the commit succeeds (retrying \
                         every second)"
                    );
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    let us = started.elapsed().as_micros() as u64;
    let epoch = pending.last().expect("a batch").epoch;
    stats.record_commit(pending.len() as u64, ops as u64, us);
    // Loads read after the commit, so they see every op before them.
    let loaded = serve_loads(env, dbs, path, pending, config.wall_base_ms);
    Committed { epoch, loaded }
}

/// Commits `batches` on the caller's thread as the writer thread does (one transaction,
/// the same retries, then the loads they ask for). For a driver that orders commits
/// itself: the data-plane simulation (`tessera-broker`, `server::sim`) runs its shards'
/// stores with it, since a thread's commits come in real time, which its paused clock
/// cannot order.
pub fn commit_now(
    env: &Env<WithoutTls>,
    path: &std::path::Path,
    config: &StoreConfig,
    stats: &StoreStats,
    batches: &[Batch],
) -> heed::Result<Committed> {
    if batches.is_empty() {
        return Ok(Committed {
            epoch: 0,
            loaded: Vec::new(),
        });
    }
    let dbs = open_dbs(env)?;
    let ops = batches.iter().map(|b| b.ops.len()).sum();
    Ok(commit_pending(env, &dbs, path, config, stats, batches, ops))
}

/// Reads the deliveries every `StoreOp::LoadQueue` of `batches` asks for.
fn serve_loads(
    env: &Env<WithoutTls>,
    dbs: &super::Dbs<'_>,
    path: &std::path::Path,
    batches: &[Batch],
    wall_base_ms: u64,
) -> Vec<Loaded> {
    let mut out = Vec::new();
    for op in batches.iter().flat_map(|b| &b.ops) {
        let StoreOp::LoadQueue {
            client_id,
            session,
            from_seq,
            count_max,
        } = op
        else {
            continue;
        };
        let (deliveries, err) =
            load_queue(env, dbs, client_id, *from_seq, *count_max, wall_base_ms);
        if let Some(e) = err {
            error!(
                path = %path.display(),
                client_id = %client_id,
                from_seq,
                "store: cannot read a queued delivery back: {e}. The session gets the \
                 deliveries before it; restore the directory from a backup to recover the rest"
            );
        }
        out.push(Loaded {
            client_id: client_id.clone(),
            session: *session,
            deliveries,
        });
    }
    out
}

fn commit(
    env: &Env<WithoutTls>,
    dbs: &super::Dbs<'_>,
    batches: &[Batch],
    wall_base_ms: u64,
) -> heed::Result<()> {
    // Only the last op on a delivery's key decides what the transaction
    // leaves; earlier ones are skipped. In `sync` durability a QoS 1
    // delivery to a connected subscriber is typically stored, sent and
    // acknowledged in different batches of one commit: its put (the
    // expensive part: encoding and a dirty page) is then never made. Range
    // deletes (`ClearMsgs`, `DelSession`) stay in order, which keeps the
    // result the same as applying everything.
    //
    // One batch holds at most one op per delivery between two range deletes
    // (the engine keeps a delivery's latest op until the batch is taken:
    // `engine::persist`, "Pending deliveries"), so the map is built only
    // when several batches meet in one commit. A batch can be empty (its
    // ops cancelled each other; its epoch is still reported committed):
    // then no transaction is opened.
    let ops: usize = batches.iter().map(|b| b.ops.len()).sum();
    if ops == 0 {
        return Ok(());
    }
    let mut last: HashMap<DeliveryKey<'_>, usize, BuildHasherDefault<MixHasher>> =
        HashMap::with_hasher(BuildHasherDefault::default());
    if batches.len() > 1 {
        last.reserve(ops);
        for (i, op) in batches.iter().flat_map(|b| &b.ops).enumerate() {
            if let Some(key) = delivery_key(op) {
                last.insert(key, i);
            }
        }
    }
    let mut txn = env.write_txn()?;
    for (i, op) in batches.iter().flat_map(|b| &b.ops).enumerate() {
        if !last.is_empty() && delivery_key(op).is_some_and(|k| last[&k] != i) {
            continue;
        }
        apply(dbs, &mut txn, op, wall_base_ms)?;
    }
    txn.commit()
}

/// The key of an op on one delivery in `commit`'s last-op map: its
/// session's ClientID and the delivery's sequence number, the ClientID taken
/// by the address and length of its bytes rather than by their content.
/// Every op of a session shares that session's ClientID buffer, so hashing
/// and comparing a key is two integers (hashing ~25 bytes twice per op and
/// comparing them were ~2 % of the broker's core with a bridge relaying
/// QoS 1). It is exact: the batches keep every op's ClientID alive during
/// the commit, so two keys with the same address and length have the same
/// content; and where two ClientID buffers hold the same content (a session
/// ended and started again within one commit), their ops count as different
/// keys and are all applied, in order, which leaves what applying everything
/// leaves.
#[derive(Clone, Copy, PartialEq, Eq)]
struct DeliveryKey<'a> {
    client_id: *const u8,
    len: usize,
    seq: u64,
    _ops: std::marker::PhantomData<&'a StoreOp>,
}

impl std::hash::Hash for DeliveryKey<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.client_id as u64 ^ ((self.len as u64) << 48));
        h.write_u64(self.seq);
    }
}

/// The key of an op on one delivery.
fn delivery_key(op: &StoreOp) -> Option<DeliveryKey<'_>> {
    match op {
        StoreOp::PutMsg { client_id, seq, .. } | StoreOp::DelMsg { client_id, seq } => {
            let bytes = client_id.as_bytes();
            Some(DeliveryKey {
                client_id: bytes.as_ptr(),
                len: bytes.len(),
                seq: *seq,
                _ops: std::marker::PhantomData,
            })
        }
        _ => None,
    }
}
