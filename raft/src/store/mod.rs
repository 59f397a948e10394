//! Raft storage in heed (LMDB) under `data_dir/raft/`: two envs and the snapshot files.
//!
//! - The log env (`data_dir/raft/data.mdb`): every commit is synced (two flushes: data,
//!   then the meta page). Databases (keys big-endian so LMDB's byte order is numeric
//!   order): `raft_meta` (`format`, `vote`, `committed`, `purged`, `bootstrap`,
//!   `incarnation`; bincode values) and `log` (index -> bincode `Entry`).
//! - The state-machine env (`data_dir/raft/sm/data.mdb`): `owners` (ClientID -> owner),
//!   `routes` (filter, group, node -> stamp), `retained` (topic -> record), `nodes` (id ->
//!   [`NodeInfo`]), `idem` and `idem_time` (the idempotency window), `sm_meta` (`applied`,
//!   `membership`, `clock_ms`). Every row records the log index that wrote it, and
//!   `sm_meta/applied` stamps all tables with the index they reflect: they change in the
//!   same write transaction.
//! - `data_dir/raft/snapshots/`: the newest snapshot ([`snapshot`]), synced.
//!
//! Why two envs: applying an entry needs no flush of its own. Everything applied is in
//! the synced log (and the newest snapshot), so the state-machine env commits without
//! fsync (`NO_SYNC`): a process crash (kill -9) loses nothing, the page cache holds every
//! commit. A machine crash can leave an unsynced LMDB env torn, so the state machine is
//! rebuilt from the newest snapshot and the log after one: the file `sm/UNSYNCED` holds
//! the boot id of the kernel under which unsynced commits were made (written and synced
//! before the first one, removed after a final sync at a clean close); a store opened
//! under another boot id discards `sm/`, loads the newest snapshot and lets openraft
//! re-apply the log from there. The log never loses a committed entry that the snapshot
//! does not hold: openraft purges only entries a synced snapshot covers. In one env the
//! apply would have cost two flushes per entry on every node (LMDB cannot mix synced and
//! unsynced commits in one file without risking the synced ones on a machine crash).
//! Where the boot id cannot be read, apply commits are synced.
//!
//! Errors of the world (a corrupt file, an incompatible format, a full disk) are
//! [`StoreError`]s naming the file; nothing here panics on bytes read from disk, and
//! opening never rewrites what it finds.
//!
//! [`NodeInfo`]: crate::types::NodeInfo

// openraft's trait methods return its `StorageError` (224 bytes); our helpers return the
// same type so `?` carries it unchanged. Boxing it would only add a conversion.
#![allow(clippy::result_large_err)]

pub mod log;
pub mod snapshot;
pub mod stm;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use heed::types::Bytes as RawBytes;
use heed::{Database, Env, EnvOpenOptions, RoTxn, WithoutTls};
use openraft::{AnyError, LogId, StorageError, StorageIOError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::transport::NodeId;

/// The storage format this build writes and reads (2: the state machine in its own env
/// under `sm/`).
pub const FORMAT_VERSION: u16 = 2;

/// One database of the env (keys and values are raw bytes; encodings are ours).
pub(crate) type Db = Database<'static, RawBytes, RawBytes>;

/// Names of the log env's databases, in [`Dbs`] order.
const LOG_DB_NAMES: [&str; 2] = ["raft_meta", "log"];

/// The state machine's databases (its env's names), in snapshot order (a snapshot frame
/// names its table by the position here).
pub(crate) const SM_TABLES: [&str; 7] = [
    "owners",
    "routes",
    "retained",
    "nodes",
    "idem",
    "idem_time",
    "sm_meta",
];

/// Handles to every database (`raft_meta` and `log` in the log env, the rest in the
/// state-machine env: use each with a transaction of its own env).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dbs {
    pub raft_meta: Db,
    pub log: Db,
    pub owners: Db,
    pub routes: Db,
    pub retained: Db,
    pub nodes: Db,
    pub idem: Db,
    pub idem_time: Db,
    pub sm_meta: Db,
}

impl Dbs {
    /// The state machine's databases in [`SM_TABLES`] order.
    pub(crate) fn sm_tables(&self) -> [Db; 7] {
        [
            self.owners,
            self.routes,
            self.retained,
            self.nodes,
            self.idem,
            self.idem_time,
            self.sm_meta,
        ]
    }
}

/// Why the store cannot be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// LMDB cannot open the env.
    #[error(
        "cannot open the raft store {path}: {source}. If the disk is full, free space; if the \
         file is corrupt, restore data_dir/raft from a backup, or move it away and rejoin \
         this node to the cluster as a new member"
    )]
    Open {
        /// The data file.
        path: PathBuf,
        /// The cause.
        source: heed::Error,
    },
    /// A file or directory operation failed.
    #[error("raft store {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Written by a different (newer) build.
    #[error(
        "the raft store {path} has storage format {found}; this build reads format \
         {FORMAT_VERSION}. Run the Tessera that wrote it, or move data_dir/raft away and \
         rejoin this node as a new member"
    )]
    Incompatible {
        /// The data file.
        path: PathBuf,
        /// Its format.
        found: u16,
    },
    /// A record does not decode.
    #[error(
        "corrupt record in the raft store {path} (database {db}, key {key}): {reason}. \
         Restore data_dir/raft from a backup, or move it away and rejoin this node as a new \
         member"
    )]
    Corrupt {
        /// The data file.
        path: PathBuf,
        /// The database.
        db: &'static str,
        /// The key, escaped.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Another process (or another control plane in this one) uses the directory.
    #[error(
        "the raft store {path} is locked by another running broker; stop it first or give \
         this one its own data dir"
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The log env's data file is empty or missing while the rest of `data_dir/raft`
    /// shows the node was a member: its vote and log are gone. Starting blank would let it vote a second
    /// time in a term it already voted in, so it is refused.
    #[error(
        "the raft store {path} is empty or missing, but {evidence} shows this node was a cluster \
         member: its vote and log are lost. Restore data_dir/raft from a backup, or rejoin \
         this node as a new member: `brokerctl cluster remove <id>` on a live node, move \
         data_dir/raft away, and start this node with --join <a live node's cluster address>"
    )]
    Emptied {
        /// The empty data file.
        path: PathBuf,
        /// What shows the directory was in use.
        evidence: PathBuf,
    },
    /// LMDB failed while reading or writing.
    #[error("raft store {path}: {source}")]
    Lmdb {
        /// The data file.
        path: PathBuf,
        /// The cause.
        source: heed::Error,
    },
}

/// Counters the store keeps for metrics (read by the control plane).
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// Snapshots built by this node.
    pub snapshots_built: AtomicU64,
    /// Snapshots installed from a leader.
    pub snapshots_installed: AtomicU64,
    /// Size of the last snapshot built or installed, bytes.
    pub snapshot_last_bytes: AtomicU64,
    /// Snapshots from a leader refused because they did not parse.
    pub snapshots_refused: AtomicU64,
    /// Entries applied.
    pub entries_applied: AtomicU64,
    /// Ops applied (duplicates excluded).
    pub ops_applied: AtomicU64,
    /// Duplicate batches answered from the idempotency window.
    pub duplicate_batches: AtomicU64,
    /// Ops rejected by validation at apply.
    pub ops_rejected: AtomicU64,
    /// Last applied log index (0: none).
    pub applied_index: AtomicU64,
    /// Last committed log index this node knows of (0: none).
    pub committed_index: AtomicU64,
    /// Batches applied whose proposer's wall clock was more than [`CLOCK_AHEAD_WARN_MS`]
    /// ahead of this node's (see [`Store::note_batch_time`]).
    pub batches_clock_ahead: AtomicU64,
    /// When each proposer's clock was last reported (one WARN a minute per proposer).
    clock_warned: Mutex<std::collections::BTreeMap<NodeId, std::time::Instant>>,
}

/// A batch whose proposer's wall clock is this far ahead of the applying node's is
/// reported: raft's entry time is the most advanced proposer's clock, and the
/// idempotency window (`IDEMPOTENCY_WINDOW_MS` of entry time) shrinks by the lead.
pub const CLOCK_AHEAD_WARN_MS: u64 = 30_000;
/// At most one clock warning per proposer this often.
const CLOCK_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The opened envs, shared by the log store, the state machine and readers.
pub struct Store {
    _lock: std::fs::File,
    inline_io: bool,
    env: Env<WithoutTls>,
    sm_env: Env<WithoutTls>,
    /// `sm/UNSYNCED` while state-machine commits are not synced (removed at a clean close).
    sm_unsynced_marker: Option<PathBuf>,
    pub(crate) dbs: Dbs,
    dir: PathBuf,
    data_file: PathBuf,
    sm_data_file: PathBuf,
    /// The committed log id openraft last told us (persisted with the next apply).
    pub(crate) committed: Mutex<Option<LogId<NodeId>>>,
    /// Metrics.
    pub counters: StoreCounters,
    /// Subscribers to applied entries.
    pub(crate) applied_subscribers: stm::Subscribers,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

/// Default LMDB map size: virtual address space, not memory (pages are mapped on use).
pub const MAP_SIZE_BYTES_DEFAULT: usize = 64 << 30;

/// How the store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// LMDB map size, bytes.
    pub map_size_bytes: usize,
    /// fsync every commit (`true` in production). `false` keeps what survives a process
    /// crash (the page cache) but not a machine crash: tests and the simulation only.
    pub fsync: bool,
    /// Run LMDB commits on tokio's blocking pool (`true` in production, so an fsync never
    /// stalls the control thread). `false` runs them inline: the deterministic simulation
    /// uses it so a paused clock cannot jump while a commit is in flight.
    pub io_on_blocking_pool: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            map_size_bytes: MAP_SIZE_BYTES_DEFAULT,
            fsync: true,
            io_on_blocking_pool: true,
        }
    }
}

impl Store {
    /// Opens (or creates) the store under `raft_dir` (`data_dir/raft`).
    pub fn open(raft_dir: &Path, options: StoreOptions) -> Result<Arc<Store>, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let sm_dir = raft_dir.join("sm");
        for d in [raft_dir.to_path_buf(), raft_dir.join("snapshots")] {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        let lock_path = raft_dir.join("LOCK");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        if lock_file.try_lock().is_err() {
            return Err(StoreError::Locked { path: lock_path });
        }
        let data_file = raft_dir.join("data.mdb");
        refuse_emptied(&data_file, &sm_dir)?;
        let env = open_env(raft_dir, &data_file, options, !options.fsync)?;
        let log_dbs = open_dbs::<2>(&env, LOG_DB_NAMES).map_err(|source| StoreError::Open {
            path: data_file.clone(),
            source,
        })?;
        // Refuse a store of another format before touching `sm/`.
        check_format(&env, log_dbs[0], log_dbs[1], &data_file)?;

        // The state machine commits unsynced when a machine crash can be told from a
        // process crash (the boot id); see the module header.
        let boot = if options.fsync { boot_id() } else { None };
        let sm_unsynced_marker = boot.as_ref().map(|_| sm_dir.join("UNSYNCED"));
        if let (Some(boot), Some(marker)) = (&boot, &sm_unsynced_marker)
            && let Ok(found) = std::fs::read_to_string(marker)
            && found.trim() != boot
        {
            tracing::warn!(
                dir = %sm_dir.display(),
                "the machine restarted while the raft state machine had unsynced commits: \
                 rebuilding it from the newest snapshot and the log"
            );
            std::fs::remove_dir_all(&sm_dir).map_err(io(&sm_dir))?;
        }
        std::fs::create_dir_all(&sm_dir).map_err(io(&sm_dir))?;
        let sm_data_file = sm_dir.join("data.mdb");
        let sm_env = open_env(
            &sm_dir,
            &sm_data_file,
            options,
            boot.is_some() || !options.fsync,
        )?;
        let sm_dbs = open_dbs::<7>(&sm_env, SM_TABLES).map_err(|source| StoreError::Open {
            path: sm_data_file.clone(),
            source,
        })?;
        let store = Store {
            _lock: lock_file,
            inline_io: !options.io_on_blocking_pool,
            env,
            sm_env,
            sm_unsynced_marker,
            dbs: Dbs {
                raft_meta: log_dbs[0],
                log: log_dbs[1],
                owners: sm_dbs[0],
                routes: sm_dbs[1],
                retained: sm_dbs[2],
                nodes: sm_dbs[3],
                idem: sm_dbs[4],
                idem_time: sm_dbs[5],
                sm_meta: sm_dbs[6],
            },
            dir: raft_dir.to_path_buf(),
            data_file,
            sm_data_file,
            committed: Mutex::new(None),
            counters: StoreCounters::default(),
            applied_subscribers: stm::Subscribers::default(),
        };
        snapshot::remove_partial_files(&store.snapshot_dir())?;
        snapshot::load_if_empty(&store)?;
        if let (Some(boot), Some(marker)) = (&boot, &store.sm_unsynced_marker) {
            write_synced(marker, boot.as_bytes()).map_err(io(marker))?;
        }
        store.load_indexes()?;
        Ok(Arc::new(store))
    }

    /// The directory `data_dir/raft`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The LMDB data file (named in errors).
    pub fn data_file(&self) -> &Path {
        &self.data_file
    }

    pub(crate) fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// The log env (`raft_meta`, `log`).
    pub(crate) fn env(&self) -> &Env<WithoutTls> {
        &self.env
    }

    /// The state machine's env (every table of [`SM_TABLES`]).
    pub(crate) fn sm_env(&self) -> &Env<WithoutTls> {
        &self.sm_env
    }

    /// The state machine's LMDB data file (named in errors).
    pub fn sm_data_file(&self) -> &Path {
        &self.sm_data_file
    }

    fn lmdb(&self, source: heed::Error) -> StoreError {
        StoreError::Lmdb {
            path: self.data_file.clone(),
            source,
        }
    }

    fn sm_lmdb(&self, source: heed::Error) -> StoreError {
        StoreError::Lmdb {
            path: self.sm_data_file.clone(),
            source,
        }
    }

    fn load_indexes(&self) -> Result<(), StoreError> {
        let applied: Option<LogId<NodeId>> = self.sm_meta_get(b"applied")?;
        let committed: Option<LogId<NodeId>> =
            self.meta_get(self.dbs.raft_meta, "raft_meta", b"committed")?;
        self.counters
            .applied_index
            .store(applied.map_or(0, |l| l.index), Ordering::Relaxed);
        self.counters
            .committed_index
            .store(committed.as_ref().map_or(0, |l| l.index), Ordering::Relaxed);
        *lock(&self.committed) = committed;
        Ok(())
    }

    /// Reads a bincode value from the state machine's `sm_meta`.
    pub(crate) fn sm_meta_get<T: DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        let rtxn = self.sm_env.read_txn().map_err(|e| self.sm_lmdb(e))?;
        self.meta_get_in(&rtxn, self.dbs.sm_meta, "sm_meta", key)
    }

    /// Reads a bincode value from the log env's `raft_meta`.
    pub(crate) fn meta_get<T: DeserializeOwned>(
        &self,
        db: Db,
        db_name: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        let rtxn = self.env.read_txn().map_err(|e| self.lmdb(e))?;
        self.meta_get_in(&rtxn, db, db_name, key)
    }

    pub(crate) fn meta_get_in<T: DeserializeOwned>(
        &self,
        rtxn: &RoTxn<'_, WithoutTls>,
        db: Db,
        db_name: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match db.get(rtxn, key).map_err(|e| self.lmdb(e))? {
            None => Ok(None),
            Some(bytes) => decode_bincode(bytes)
                .map(Some)
                .map_err(|reason| StoreError::Corrupt {
                    path: self.data_file.clone(),
                    db: db_name,
                    key: String::from_utf8_lossy(key).into_owned(),
                    reason,
                }),
        }
    }

    /// Writes one bincode value into the log env's `raft_meta`, in its own (synced)
    /// transaction.
    pub(crate) fn meta_put<T: Serialize>(
        &self,
        db: Db,
        key: &[u8],
        value: &T,
    ) -> Result<(), StoreError> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.lmdb(e))?;
        db.put(&mut wtxn, key, &encode_bincode(value))
            .map_err(|e| self.lmdb(e))?;
        wtxn.commit().map_err(|e| self.lmdb(e))
    }

    /// Bumps and returns the proposer incarnation (persisted before it is used, so batch
    /// keys never repeat across restarts).
    pub(crate) fn next_incarnation(&self) -> Result<u64, StoreError> {
        let cur: Option<u64> = self.meta_get(self.dbs.raft_meta, "raft_meta", b"incarnation")?;
        let next = cur.unwrap_or(0) + 1;
        self.meta_put(self.dbs.raft_meta, b"incarnation", &next)?;
        Ok(next)
    }

    /// Reports a batch stamped more than [`CLOCK_AHEAD_WARN_MS`] after this node's wall
    /// clock: one of the two clocks is wrong (a node whose clock is ahead moves the entry
    /// time of the whole cluster forward, and with it the pruning of idempotency records,
    /// docs/ARCHITECTURE.md "Cluster: disks, certificates and clocks"). Apply does not
    /// depend on it (the local clock is read for this report only).
    pub(crate) fn note_batch_time(&self, proposer: NodeId, time_ms: u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let Some(ahead) = time_ms
            .checked_sub(now)
            .filter(|a| *a > CLOCK_AHEAD_WARN_MS)
        else {
            return;
        };
        self.counters
            .batches_clock_ahead
            .fetch_add(1, Ordering::Relaxed);
        let mut warned = lock(&self.counters.clock_warned);
        if warned
            .get(&proposer)
            .is_none_or(|t| t.elapsed() >= CLOCK_WARN_EVERY)
        {
            warned.insert(proposer, std::time::Instant::now());
            tracing::warn!(
                proposer,
                ahead_ms = ahead,
                "node {proposer}'s wall clock is {} s ahead of this node's (its raft batches \
                 carry its time): the cluster's entry time follows the most advanced clock, \
                 so raft's 120 s idempotency window is cut short by that much; fix the time \
                 (NTP) on node {proposer} or on this node",
                ahead / 1000
            );
        }
    }

    /// A consistent read view of the state machine's tables.
    pub fn read(self: &Arc<Self>) -> Result<stm::TablesView, StoreError> {
        stm::TablesView::new(self.clone())
    }
}

fn open_env(
    dir: &Path,
    data_file: &Path,
    options: StoreOptions,
    no_sync: bool,
) -> Result<Env<WithoutTls>, StoreError> {
    let mut opts = EnvOpenOptions::new().read_txn_without_tls();
    opts.map_size(options.map_size_bytes).max_dbs(8);
    if no_sync {
        // SAFETY: NO_SYNC trades machine-crash durability for speed. Asked for by tests
        // and the simulation (`StoreOptions::fsync`), and for the state-machine env, which
        // is rebuilt from the synced log and snapshot after a machine crash (module header).
        unsafe { opts.flags(heed::EnvFlags::NO_SYNC) };
    }
    // SAFETY: the env's files are ours alone (data_dir/raft is not shared with another
    // program, and the LOCK file keeps a second broker out), and no transaction outlives
    // the env: every handle holds an Arc<Store>.
    let env = unsafe { opts.open(dir) }.map_err(|source| StoreError::Open {
        path: data_file.to_path_buf(),
        source,
    })?;
    fill_to_last_page(&env, data_file)?;
    Ok(env)
}

/// Makes the data file at least as long as its meta page says, with zeros.
///
/// LMDB maps the file and reads pages through the map: a page past the end of a
/// truncated file (a copy cut short, a filesystem that lost its end) is a SIGBUS, and
/// the process dies without a word at the first read there. Extended with zeros, such a
/// page reads as a page of no type, which LMDB reports as `MDB_CORRUPTED` and the store
/// as a corrupt store naming the file. A healthy file can be shorter too (LMDB does not
/// write a page it allocated and freed in the same transaction, and it may be the last
/// one); the zeros there are never read. (The shard store does the same:
/// `tessera_shard::store::recover::open_env`.)
fn fill_to_last_page(env: &Env<WithoutTls>, data_file: &Path) -> Result<(), StoreError> {
    let page = env.unnamed_database_stat().page_size as u64;
    let needed = (env.info().last_page_number as u64 + 1).saturating_mul(page);
    let io = |source| StoreError::Io {
        path: data_file.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(data_file).map_err(io)?.len();
    if len < needed {
        tracing::warn!(
            path = %data_file.display(),
            len,
            needed,
            "the raft store's data file ends before its last page: extended with zeros \
             (a truncated store is reported as corrupt below, not a crash)"
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(data_file)
            .and_then(|f| f.set_len(needed))
            .map_err(io)?;
    }
    Ok(())
}

/// Refuses an empty or missing log env in a raft dir whose state machine or snapshots
/// show it was in use (see [`StoreError::Emptied`]). An empty file alone (a crash while
/// LMDB created it, before anything else existed) is a new store, and so is a new dir.
fn refuse_emptied(data_file: &Path, sm_dir: &Path) -> Result<(), StoreError> {
    if std::fs::metadata(data_file).is_ok_and(|m| m.len() > 0) {
        return Ok(());
    }
    let sm_data = sm_dir.join("data.mdb");
    if std::fs::metadata(&sm_data).is_ok_and(|m| m.len() > 0) {
        return Err(StoreError::Emptied {
            path: data_file.to_path_buf(),
            evidence: sm_data,
        });
    }
    let snapshots = data_file.with_file_name("snapshots");
    if std::fs::read_dir(&snapshots).is_ok_and(|mut d| d.next().is_some()) {
        return Err(StoreError::Emptied {
            path: data_file.to_path_buf(),
            evidence: snapshots,
        });
    }
    Ok(())
}

/// Writes the format on a new store; refuses a store of another format.
fn check_format(
    env: &Env<WithoutTls>,
    raft_meta: Db,
    log: Db,
    data_file: &Path,
) -> Result<(), StoreError> {
    let lmdb = |source| StoreError::Lmdb {
        path: data_file.to_path_buf(),
        source,
    };
    let rtxn = env.read_txn().map_err(lmdb)?;
    let found = match raft_meta.get(&rtxn, b"format").map_err(lmdb)? {
        None => None,
        Some(v) => Some(
            decode_bincode::<u16>(v).map_err(|reason| StoreError::Corrupt {
                path: data_file.to_path_buf(),
                db: "raft_meta",
                key: "format".into(),
                reason,
            })?,
        ),
    };
    let log_empty = log.is_empty(&rtxn).map_err(lmdb)?;
    drop(rtxn);
    match found {
        Some(FORMAT_VERSION) => Ok(()),
        Some(found) => Err(StoreError::Incompatible {
            path: data_file.to_path_buf(),
            found,
        }),
        None if !log_empty => Err(StoreError::Corrupt {
            path: data_file.to_path_buf(),
            db: "raft_meta",
            key: "format".into(),
            reason: "missing while the log has entries".into(),
        }),
        None => {
            let mut w = env.write_txn().map_err(lmdb)?;
            raft_meta
                .put(&mut w, b"format", &encode_bincode(&FORMAT_VERSION))
                .map_err(lmdb)?;
            w.commit().map_err(lmdb)
        }
    }
}

/// The running kernel's boot id (Linux), which changes at every boot.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// Writes `bytes` to `path` and syncs the file and its directory.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Store {
    /// A clean close of the state machine: synced, and `sm/UNSYNCED` removed, so the next
    /// open needs no rebuild whatever happens to the machine in between. For after raft
    /// stopped (no apply or snapshot install follows): the broker's shutdown calls it
    /// through `ControlPlane::shutdown`, since shards and the admin API may hold the
    /// store (views, handles) until the process exits, and a process that exits does not
    /// drop them. Dropping the store does it too. Idempotent.
    pub fn close_clean(&self) {
        if let Some(marker) = &self.sm_unsynced_marker
            && marker.exists()
            && self.sm_env.force_sync().is_ok()
            && std::fs::remove_file(marker).is_ok()
            && let Some(dir) = marker.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close_clean();
    }
}

fn open_dbs<const N: usize>(env: &Env<WithoutTls>, names: [&str; N]) -> heed::Result<[Db; N]> {
    let wtxn = env.write_txn()?;
    let dbs = env
        .create_databases_and_commit(wtxn, |opener, wtxn| {
            let mut out = Vec::with_capacity(N);
            for name in names {
                out.push(opener.create_database::<RawBytes, RawBytes>(wtxn, Some(name))?);
            }
            let array: [Database<'_, RawBytes, RawBytes>; N] = match out.try_into() {
                Ok(a) => a,
                Err(_) => unreachable!("one database per name"),
            };
            Ok::<_, heed::Error>(heed::CommitOrAbort::<_, ()>::Commit(array))
        })?
        .unwrap_commit();
    // SAFETY: a `Database` is an (env identity, dbi) pair; its lifetime only ties it to the
    // env it came from. The handles live in `Store` beside that env and are only used
    // with transactions of that env, so extending the lifetime to the store's is sound.
    Ok(dbs.map(|db| unsafe { std::mem::transmute::<Database<'_, RawBytes, RawBytes>, Db>(db) }))
}

/// The bincode options for everything this crate stores or sends: varints, a size limit,
/// and no trailing bytes (a frame is exactly one value).
pub(crate) fn bincode_options() -> impl bincode::Options + Copy {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_limit(crate::network::RPC_BYTES_MAX as u64)
        .reject_trailing_bytes()
}

pub(crate) fn encode_bincode<T: Serialize>(value: &T) -> Vec<u8> {
    use bincode::Options;
    match bincode_options().serialize(value) {
        Ok(v) => v,
        // Our values are plain data below the size limit; failing here is a bug.
        Err(e) => panic!("bincode serialization of an in-memory value failed: {e}"),
    }
}

pub(crate) fn decode_bincode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    use bincode::Options;
    bincode_options()
        .deserialize(bytes)
        .map_err(|e| e.to_string())
}

/// Locks a mutex, recovering from poisoning (the guarded values stay consistent: every
/// critical section is a single assignment).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn any_err(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

pub(crate) fn read_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read(any_err(e)).into()
}

pub(crate) fn write_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write(any_err(e)).into()
}

/// Runs blocking store work (LMDB commits fsync) off the async thread, or inline when
/// the store was opened so (`StoreOptions::io_on_blocking_pool`).
pub(crate) async fn blocking<T, F>(store: &Store, f: F) -> Result<T, StorageError<NodeId>>
where
    F: FnOnce() -> Result<T, StorageError<NodeId>> + Send + 'static,
    T: Send + 'static,
{
    if store.inline_io {
        return f();
    }
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(write_err(format!("storage task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTIONS: StoreOptions = StoreOptions {
        map_size_bytes: 64 << 20,
        fsync: false,
        io_on_blocking_pool: false,
    };

    /// A store with some 60 pages of log rows, closed.
    fn filled(dir: &Path) {
        let store = Store::open(dir, OPTIONS).unwrap();
        let mut w = store.env().write_txn().unwrap();
        for i in 0u64..200 {
            store
                .dbs
                .log
                .put(&mut w, &i.to_be_bytes(), &[i as u8; 1000])
                .unwrap();
        }
        w.commit().unwrap();
        let mut w = store.sm_env.write_txn().unwrap();
        for i in 0u64..200 {
            store
                .dbs
                .owners
                .put(&mut w, &i.to_be_bytes(), &[i as u8; 1000])
                .unwrap();
        }
        w.commit().unwrap();
    }

    /// Reads every row of the log and of `owners`; the first error.
    fn read_all(store: &Store) -> Result<(), heed::Error> {
        let r = store.env().read_txn()?;
        for row in store.dbs.log.iter(&r)? {
            row?;
        }
        let r = store.sm_env.read_txn()?;
        for row in store.dbs.owners.iter(&r)? {
            row?;
        }
        Ok(())
    }

    #[test]
    fn a_truncated_data_file_is_an_error_not_a_sigbus() {
        for file in ["data.mdb", "sm/data.mdb"] {
            let dir = tempfile::tempdir().unwrap();
            filled(dir.path());
            let path = dir.path().join(file);
            assert!(std::fs::metadata(&path).unwrap().len() > 40 * 4096);
            // Three pages left: the two meta pages and one more. Before the fill, LMDB
            // read past the end through its map and the process died of SIGBUS here.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(3 * 4096)
                .unwrap();
            match Store::open(dir.path(), OPTIONS) {
                Err(e) => assert!(e.to_string().contains(file), "{file}: {e}"),
                Ok(store) => {
                    let e = read_all(&store).expect_err("the lost pages read as corrupt");
                    assert!(e.to_string().contains("MDB_CORRUPTED"), "{file}: {e}");
                }
            }
        }
    }

    #[test]
    fn an_emptied_log_env_of_a_member_is_refused_and_a_new_one_opens() {
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path());
        let data = dir.path().join("data.mdb");
        std::fs::write(&data, b"").unwrap();
        let Err(e) = Store::open(dir.path(), OPTIONS) else {
            panic!("an emptied store is refused");
        };
        assert!(matches!(e, StoreError::Emptied { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("data.mdb") && text.contains("sm/data.mdb") && text.contains("--join"),
            "{text}"
        );
        assert_eq!(
            std::fs::metadata(&data).unwrap().len(),
            0,
            "nothing written"
        );
        // Deleted instead of emptied: the same.
        std::fs::remove_file(&data).unwrap();
        let Err(e) = Store::open(dir.path(), OPTIONS) else {
            panic!("a store without its log env is refused");
        };
        assert!(matches!(e, StoreError::Emptied { .. }), "{e}");
        assert!(!data.exists(), "nothing created");

        // An empty file in a directory with nothing else is a new store.
        let fresh = tempfile::tempdir().unwrap();
        std::fs::write(fresh.path().join("data.mdb"), b"").unwrap();
        Store::open(fresh.path(), OPTIONS).expect("a new store");
    }
}
