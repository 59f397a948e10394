//! Start-up recovery, run on the boot thread before any shard starts.
//!
//! 1. Lock `data_dir/LOCK` (`flock`): two brokers on one directory would
//!    corrupt each other's sessions.
//! 2. Open every `shard-K/` present and every one the configured shard count
//!    needs; check the storage format of each (a newer one is refused).
//! 3. Read and validate every record. A record that does not decode stops the
//!    start with its path, database and key: nothing is dropped silently.
//! 4. Re-partition: a session (with its deliveries, inbound ids and delayed
//!    will) or retained message whose owner under the current shard count is
//!    another shard is copied there (one transaction per target, committed)
//!    and only then deleted from its old env. A crash in between leaves the
//!    same records in both, which the next start resolves the same way.
//!    Envs beyond the shard count that end up empty are removed.
//! 5. Return per shard what its engine restores, plus every retained message
//!    and every route (each engine needs the whole route table and retained
//!    replica before listeners open).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use heed::{Env, EnvOpenOptions, WithoutTls};
use tessera_proto::{ProtocolVersion, Str, Will};
use tracing::{info, warn};

use super::record::{self, FORMAT_VERSION};
use super::{DB_NAMES, Dbs, InboundRecord, META_FORMAT, META_ORIGIN_PREFIX, open_dbs};
use crate::hash::shard_for;
use crate::mesh::{PubId, ShardId};
use crate::message::Message;
use crate::session::{Delivery, SubscriptionEntry};
use crate::trie::ShardSet;

/// The exclusive lock on a data directory; held for the life of the process.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Why the store cannot start. Each names the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory cannot be created or read.
    #[error(
        "cannot use data directory {path}: {source}. Check that it exists or can be created \
         and that the broker may write to it (server.data_dir / --data-dir)"
    )]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Another process holds the directory.
    #[error(
        "data directory {path} is in use by another broker process (it holds {path}/LOCK). \
         Stop that broker, or give this one another --data-dir"
    )]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// LMDB cannot open or read an env.
    #[error(
        "cannot open the store at {path}: {source}. If the disk is full, free space; if the \
         store is corrupt, restore it from a backup or move the directory away to start \
         empty (its sessions and retained messages are then lost)"
    )]
    Open {
        /// The env directory.
        path: PathBuf,
        /// The cause.
        source: heed::Error,
    },
    /// Written by a newer build.
    #[error(
        "the store at {path} was written by a newer Tessera (storage format {found}; this \
         build reads formats up to {FORMAT_VERSION}). Run that newer Tessera, or move the \
         directory away to start empty"
    )]
    NewerFormat {
        /// The env directory.
        path: PathBuf,
        /// Its format.
        found: u16,
    },
    /// The env's data file is empty or missing, but the env held data before (its
    /// [`HELD_DATA_MARK`] file is there): emptied behind the broker's back.
    #[error(
        "the store at {path} lost its data: its data.mdb was empty or missing, yet this \
         store held data before ({path}/{HELD_DATA_MARK} says so). Restore the directory from \
         a backup; or, to start this shard empty (its sessions, queued and retained messages \
         are lost), move {path} away"
    )]
    Emptied {
        /// The env directory.
        path: PathBuf,
    },
    /// A record does not decode.
    #[error(
        "corrupt record in the store at {path} (database {db}, key {key}): {reason}. Restore \
         the directory from a backup, or move it away to start empty"
    )]
    Corrupt {
        /// The env directory.
        path: PathBuf,
        /// The database.
        db: &'static str,
        /// The key, escaped.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// A session as stored, in engine types.
#[derive(Debug)]
pub struct RecoveredSession {
    /// The ClientID.
    pub client_id: Str,
    /// Protocol version of its latest connection.
    pub version: ProtocolVersion,
    /// Session Expiry Interval, seconds.
    pub expiry_interval_s: u32,
    /// When its connection ended, broker ms; `None`: it was connected when
    /// the broker stopped (its connection ends at restart).
    pub disconnected_at_ms: Option<u64>,
    /// Subscriptions.
    pub subscriptions: Vec<(Str, SubscriptionEntry)>,
    /// Deliveries in sequence order with state and packet id; `Delivery::seq`
    /// is set.
    pub deliveries: Vec<(u8, u16, Delivery)>,
    /// Inbound QoS 2 packet ids awaiting PUBREL, each with the other shards
    /// that may lack its publication after a crash (a re-sent PUBLISH is
    /// delivered again there; usually none) and, when stored, the
    /// publication's cluster-wide id (the re-send goes out with it).
    pub inbound_qos2: Vec<(u16, ShardSet, Option<PubId>)>,
    /// The will of the connection it had when the broker stopped.
    pub will: Option<Will>,
    /// A will waiting for its delay: due time (broker ms) and the will.
    pub delayed_will: Option<(u64, Will)>,
}

/// What one shard's engine restores.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The shard's sessions.
    pub sessions: Vec<RecoveredSession>,
    /// Every retained message, all shards' slices (each shard keeps a replica).
    pub retained: Vec<Message>,
    /// Routes of the other shards: (filter, shard), one entry per stored
    /// subscription. A `$share/...` filter appears once per member session of
    /// that shard, so the group is routable before listeners open.
    pub routes: Vec<(Str, ShardId)>,
    /// Above every origin sequence number stored anywhere: where the shard's
    /// own numbering starts (`StoreOp::PutOrigin`).
    pub origin_seq_floor: u64,
    /// The highest publication handled here per node that forwarded to this
    /// shard (`StoreOp::PutForwardMark`).
    pub forward_marks: Vec<crate::mesh::ForwardMark>,
    /// Confirmed ghosts of sessions that moved to other nodes (`StoreOp::PutGhost`):
    /// the engine restores those still within their window (`stored_ghost`).
    pub ghosts: Vec<super::GhostState>,
    /// Cluster-wide ids of restored inbound QoS 2 publications (of any shard of
    /// this node) that this shard has, committed, or was not a destination of:
    /// a re-send routed again with that id is skipped here
    /// (`Engine::note_resent_handled`; cause A of the `sync` simulation failures).
    pub resent_handled: Vec<PubId>,
    /// Cluster-wide ids of restored inbound QoS 2 publications (of any shard of
    /// this node) that some shard or node may lack, so their publishers' re-sends
    /// are routed again (`moved::RESENT`). What this node knew of them in its
    /// earlier life (marks, `resent_handled`) is true for the sessions it restored,
    /// not for one that came later: `Engine::leave_ghost` leaves it out of such a
    /// session's window (sim seed 703).
    pub resent_pending: Vec<PubId>,
    /// The `PubId` marks this shard stored in its earlier lives and raised
    /// within [`super::PUB_MARK_KEEP_MS`]: (origin, shard, seq)
    /// (`StoreOp::PutPubMark`).
    pub pub_marks: Vec<(u64, ShardId, u64)>,
    /// The dedup windows of this shard's sessions (`StoreOp::PutWindow`).
    pub windows: Vec<RecoveredWindow>,
    /// Deliveries moved-in sessions' windows held back when the broker stopped
    /// (`StoreOp::PutHeld`): (ClientID, delivery), each session's in the order
    /// they were held; `Delivery::seq` is the hold's number (the engine queues
    /// them and deletes their records).
    pub held: Vec<(Str, Delivery)>,
    /// Redirects confirmed ghosts of this shard sent on that their new nodes had
    /// not accepted (`StoreOp::PutRedirect`): (number, redirect), in number order
    /// (the engine sends them again).
    pub redirects: Vec<(u64, super::RedirectState)>,
}

/// A stored session's dedup window (it moved here shortly before the stop).
#[derive(Debug)]
pub struct RecoveredWindow {
    /// The session's ClientID.
    pub client_id: Str,
    /// When the window ends, broker ms.
    pub expires_ms: u64,
    /// The old owner's marks: (origin, shard, seq).
    pub marks: Vec<(u64, ShardId, u64)>,
    /// The ids the session got within the window, oldest first.
    pub ids: Vec<crate::mesh::PubId>,
    /// Parts stored (the next one appended gets this number).
    pub parts: u32,
}

/// One session's deliveries: (seq, record, raw key, raw value).
type RawMessages = Vec<(u64, record::DeliveryRec, Vec<u8>, Vec<u8>)>;

/// An inbound QoS 2 id: (packet id, raw key, value).
type RawInbound = (u16, Vec<u8>, InboundRecord);

/// A raw record to copy: (database index, key, value).
type RawPut = (usize, Vec<u8>, Vec<u8>);

/// A part of a stored window: part, wall ms it ends, marks, ids, raw key.
type RawWindowPart = (
    u32,
    u64,
    Vec<(u64, ShardId, u64)>,
    Vec<crate::mesh::PubId>,
    Vec<u8>,
);

/// What `recover` returns: the directory lock, each shard's env and path
/// (index = shard), and what each shard restores.
pub type Opened = (DirLock, Vec<(Env<WithoutTls>, PathBuf)>, Vec<Recovered>);

/// Raw records of one env, read at start-up.
#[derive(Default)]
struct Raw {
    /// session key -> (record, raw value)
    sessions: BTreeMap<Vec<u8>, (record::SessionRec, Vec<u8>)>,
    /// session key -> [(seq, record, raw key, raw value)]
    messages: HashMap<Vec<u8>, RawMessages>,
    /// session key -> [(packet id, raw key, value)]
    inbound: HashMap<Vec<u8>, Vec<RawInbound>>,
    /// sending shard -> its origin mark here
    origins: HashMap<ShardId, u64>,
    /// forward marks of the nodes that forwarded here
    forwards: Vec<crate::mesh::ForwardMark>,
    /// ghost key -> (record, raw value)
    ghosts: BTreeMap<Vec<u8>, (record::GhostRec, Vec<u8>)>,
    /// ghost keys whose value does not decode (skipped with a warning, deleted)
    bad_ghosts: Vec<Vec<u8>>,
    /// `PubId` marks: (origin, shard, seq, wall ms raised, raw key)
    pub_marks: Vec<(u64, ShardId, u64, u64, Vec<u8>)>,
    /// session key -> its window's parts
    windows: HashMap<Vec<u8>, Vec<RawWindowPart>>,
    /// session key -> deliveries its window held (`StoreOp::PutHeld`)
    held: HashMap<Vec<u8>, RawMessages>,
    /// Stored redirects: (number, record, raw key, raw value)
    redirects: Vec<(u64, record::RedirectRec, Vec<u8>, Vec<u8>)>,
    /// session key -> (record, raw value)
    wills: HashMap<Vec<u8>, (record::DelayedWillRec, Vec<u8>)>,
    /// topic key -> (record, raw value)
    retained: BTreeMap<Vec<u8>, (record::MessageRec, Vec<u8>)>,
}

fn escape(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

/// Opens (creating if needed) the env at `path`.
fn open_env(path: &Path, map_size_bytes: usize) -> Result<Env<WithoutTls>, StoreError> {
    std::fs::create_dir_all(path).map_err(|source| StoreError::Dir {
        path: path.to_owned(),
        source,
    })?;
    let mut opts = EnvOpenOptions::new().read_txn_without_tls();
    opts.map_size(map_size_bytes).max_dbs(DB_NAMES.len() as u32);
    // SAFETY: each env directory is opened once in this process (the data
    // directory lock keeps other processes out), and its files are only
    // changed through LMDB.
    let env = unsafe { opts.open(path) }.map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    fill_to_last_page(&env, path)?;
    Ok(env)
}

/// Makes the env's data file at least as long as its meta page says, with zeros.
///
/// LMDB reads pages through a map of the file: a page past the end of a truncated
/// file (a copy cut short, a filesystem that lost its end) is a SIGBUS that kills the
/// broker without a word. Extended with zeros, such a page reads as a page of no type,
/// which LMDB reports as `MDB_CORRUPTED`, and the start is refused naming the env. A
/// healthy file can be shorter too (LMDB does not write a page it allocated and freed
/// in the same transaction, and it may be the last one); its zeros are never read. (The
/// raft store does the same: `tessera_raft::store`'s `fill_to_last_page`.)
fn fill_to_last_page(env: &Env<WithoutTls>, path: &Path) -> Result<(), StoreError> {
    let page = env.unnamed_database_stat().page_size as u64;
    let needed = (env.info().last_page_number as u64 + 1).saturating_mul(page);
    let data = path.join("data.mdb");
    let dir_err = |source| StoreError::Dir {
        path: data.clone(),
        source,
    };
    let len = std::fs::metadata(&data).map_err(dir_err)?.len();
    if len < needed {
        tracing::warn!(
            path = %data.display(),
            len,
            needed,
            "the store's data file ends before its last page: extended with zeros (a \
             truncated store is reported as corrupt below, not a crash)"
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .and_then(|f| f.set_len(needed))
            .map_err(dir_err)?;
    }
    Ok(())
}

/// The file beside an env's data file that says the env holds data: made (and synced)
/// once its format is written. LMDB opens an empty or missing `data.mdb` as a new env,
/// so without it a data file emptied behind the broker's back (a copy cut to nothing, a
/// filesystem that lost it) started an empty store and every session was silently
/// gone; with it, the start is refused naming the env. (The raft store refuses the same
/// from its other files: `tessera_raft::store`'s `refuse_emptied`.)
pub const HELD_DATA_MARK: &str = "HELD-DATA";

/// Makes `path`'s [`HELD_DATA_MARK`] if missing, synced with its directory.
fn mark_held(path: &Path) -> Result<(), StoreError> {
    let mark = path.join(HELD_DATA_MARK);
    if mark.exists() {
        return Ok(());
    }
    let dir_err = |source| StoreError::Dir {
        path: mark.clone(),
        source,
    };
    File::create(&mark)
        .and_then(|f| f.sync_all())
        .map_err(dir_err)?;
    File::open(path).and_then(|d| d.sync_all()).map_err(dir_err)
}

/// Checks the format of an env, writing ours into a new one; refuses a new-looking env
/// whose [`HELD_DATA_MARK`] says it held data.
fn check_format(env: &Env<WithoutTls>, dbs: &Dbs<'_>, path: &Path) -> Result<(), StoreError> {
    let open = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let rtxn = env.read_txn().map_err(open)?;
    let found = dbs.meta.get(&rtxn, META_FORMAT).map_err(open)?.map(|v| {
        let mut b = [0u8; 2];
        b.copy_from_slice(&v[..2.min(v.len())]);
        u16::from_le_bytes(b)
    });
    drop(rtxn);
    match found {
        Some(v) if v > FORMAT_VERSION => Err(StoreError::NewerFormat {
            path: path.to_owned(),
            found: v,
        }),
        // Format 1 is the first; a future format bump migrates older
        // versions here, record by record, before anything else reads them.
        // (A store from before the mark gets it now.)
        Some(_) => mark_held(path),
        None if path.join(HELD_DATA_MARK).exists() => Err(StoreError::Emptied {
            path: path.to_owned(),
        }),
        None => {
            let mut w = env.write_txn().map_err(open)?;
            dbs.meta
                .put(&mut w, META_FORMAT, &FORMAT_VERSION.to_le_bytes())
                .map_err(open)?;
            w.commit().map_err(open)?;
            mark_held(path)
        }
    }
}

fn read_raw(env: &Env<WithoutTls>, dbs: &Dbs<'_>, path: &Path) -> Result<Raw, StoreError> {
    let open = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let corrupt = |db: &'static str, key: &[u8], reason: String| StoreError::Corrupt {
        path: path.to_owned(),
        db,
        key: escape(key),
        reason,
    };
    let rtxn = env.read_txn().map_err(open)?;
    let mut raw = Raw::default();
    for item in dbs.sessions.iter(&rtxn).map_err(open)? {
        let (k, v) = item.map_err(open)?;
        let rec = record::decode::<record::SessionRec>(v)
            .map_err(|e| corrupt("sessions", k, e.to_string()))?;
        raw.sessions.insert(k.to_vec(), (rec, v.to_vec()));
    }
    let split = |db: &'static str, k: &[u8], tail: usize| {
        let len = *k
            .first()
            .ok_or_else(|| corrupt(db, k, "empty key".into()))? as usize;
        if k.len() != 1 + len + tail {
            return Err(corrupt(db, k, "bad key length".into()));
        }
        Ok((k[1..1 + len].to_vec(), k[1 + len..].to_vec()))
    };
    for item in dbs.messages.iter(&rtxn).map_err(open)? {
        let (k, v) = item.map_err(open)?;
        let (session, tail) = split("messages", k, 8)?;
        let seq = u64::from_be_bytes(tail[..].try_into().expect("8 bytes"));
        let rec = record::decode::<record::DeliveryRec>(v)
            .map_err(|e| corrupt("messages", k, e.to_string()))?;
        raw.messages
            .entry(session)
            .or_default()
            .push((seq, rec, k.to_vec(), v.to_vec()));
    }
    for item in dbs.inbound.iter(&rtxn).map_err(open)? {
        let (k, v) = item.map_err(open)?;
        let (session, tail) = split("inbound", k, 2)?;
        let pid = u16::from_be_bytes(tail[..].try_into().expect("2 bytes"));
        let rec = InboundRecord::decode(v)
            .ok_or_else(|| corrupt("inbound", k, format!("value of {} bytes", v.len())))?;
        raw.inbound
            .entry(session)
            .or_default()
            .push((pid, k.to_vec(), rec));
    }
    for item in dbs.meta.iter(&rtxn).map_err(open)? {
        let (k, v) = item.map_err(open)?;
        if let Some(from) = k.strip_prefix(META_ORIGIN_PREFIX) {
            let bad = || corrupt("meta", k, "bad origin mark".into());
            let from = ShardId::from_be_bytes(from.try_into().map_err(|_| bad())?);
            let seq = u64::from_le_bytes(v.try_into().map_err(|_| bad())?);
            raw.origins.insert(from, seq);
        } else if let Some(node) = k.strip_prefix(super::META_FORWARD_PREFIX) {
            let mark = super::decode_forward_mark(node, v)
                .ok_or_else(|| corrupt("meta", k, "bad forward mark".into()))?;
            raw.forwards.push(mark);
        } else if k.starts_with(super::META_GHOST_PREFIX) {
            // A ghost is worth its window (30 s) at most: one that does not read is
            // skipped and deleted, with a warning, rather than stopping the start.
            match record::decode::<record::GhostRec>(v) {
                Ok(rec) => {
                    raw.ghosts.insert(k.to_vec(), (rec, v.to_vec()));
                }
                Err(e) => {
                    warn!(
                        path = %path.display(),
                        key = %escape(k),
                        "store: a moved session's ghost does not decode ({e}); skipped and deleted"
                    );
                    raw.bad_ghosts.push(k.to_vec());
                }
            }
        } else if let Some(tail) = k.strip_prefix(super::META_PUB_MARK_PREFIX) {
            let (origin, shard, seq, at) = super::decode_pub_mark(tail, v)
                .ok_or_else(|| corrupt("meta", k, "bad publication id mark".into()))?;
            raw.pub_marks.push((origin, shard, seq, at, k.to_vec()));
        } else if let Some(tail) = k.strip_prefix(super::META_WINDOW_PREFIX) {
            let bad = || corrupt("meta", k, "bad window part".into());
            let (session, part, ends, bytes) = super::split_window_part(tail, v).ok_or_else(bad)?;
            let (marks, ids) = crate::engine::decode_window(bytes).ok_or_else(bad)?;
            raw.windows
                .entry(session)
                .or_default()
                .push((part, ends, marks, ids, k.to_vec()));
        } else if let Some(tail) = k.strip_prefix(super::META_REDIRECT_PREFIX) {
            let (_, seq) = super::split_held_key(tail)
                .ok_or_else(|| corrupt("meta", k, "bad redirect key".into()))?;
            let rec = record::decode::<record::RedirectRec>(v)
                .map_err(|e| corrupt("meta", k, e.to_string()))?;
            raw.redirects.push((seq, rec, k.to_vec(), v.to_vec()));
        } else if let Some(tail) = k.strip_prefix(super::META_HELD_PREFIX) {
            let (session, seq) = super::split_held_key(tail)
                .ok_or_else(|| corrupt("meta", k, "bad held delivery key".into()))?;
            let rec = record::decode::<record::DeliveryRec>(v)
                .map_err(|e| corrupt("meta", k, e.to_string()))?;
            raw.held
                .entry(session)
                .or_default()
                .push((seq, rec, k.to_vec(), v.to_vec()));
        }
    }
    for item in dbs.wills.iter(&rtxn).map_err(open)? {
        let (k, v) = item.map_err(open)?;
        let rec = record::decode::<record::DelayedWillRec>(v)
            .map_err(|e| corrupt("wills", k, e.to_string()))?;
        raw.wills.insert(k.to_vec(), (rec, v.to_vec()));
    }
    for item in dbs.retained.iter(&rtxn).map_err(open)? {
        let (k, v) = item.map_err(open)?;
        let rec = record::decode::<record::MessageRec>(v)
            .map_err(|e| corrupt("retained", k, e.to_string()))?;
        raw.retained.insert(k.to_vec(), (rec, v.to_vec()));
    }
    Ok(raw)
}

/// Writes raw records into env `to` and commits.
fn write_raw(
    env: &Env<WithoutTls>,
    dbs: &Dbs<'_>,
    path: &Path,
    puts: &[RawPut],
) -> Result<(), StoreError> {
    let open = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let all = dbs.all();
    let mut w = env.write_txn().map_err(open)?;
    for (db, k, v) in puts {
        all[*db].1.put(&mut w, k, v).map_err(open)?;
    }
    w.commit().map_err(open)
}

fn delete_raw(
    env: &Env<WithoutTls>,
    dbs: &Dbs<'_>,
    path: &Path,
    dels: &[(usize, Vec<u8>)],
) -> Result<(), StoreError> {
    let open = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let all = dbs.all();
    let mut w = env.write_txn().map_err(open)?;
    for (db, k) in dels {
        all[*db].1.delete(&mut w, k).map_err(open)?;
    }
    w.commit().map_err(open)
}

/// Indexes of the databases in `Dbs::all`.
const META: usize = 0;
const SESSIONS: usize = 1;
const MESSAGES: usize = 2;
const INBOUND: usize = 3;
const RETAINED: usize = 4;
const WILLS: usize = 5;

/// Opens and recovers the store under `dir` for `shard_count` shards. Returns
/// the directory lock, each shard's env and path (index = shard), and what
/// each shard restores. `now_ms` and `wall_base_ms` place stored wall-clock
/// times on the broker's clock.
pub fn recover(
    dir: &Path,
    shard_count: usize,
    map_size_bytes: usize,
    wall_base_ms: u64,
) -> Result<Opened, StoreError> {
    let dir_err = |source| StoreError::Dir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(dir_err)?;
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .map_err(dir_err)?;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(StoreError::Locked {
            path: dir.to_owned(),
        });
    }
    let lock = DirLock { _file: lock_file };

    let mut present = 0usize;
    for entry in std::fs::read_dir(dir).map_err(dir_err)? {
        let entry = entry.map_err(dir_err)?;
        if let Some(k) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("shard-"))
            .and_then(|k| k.parse::<usize>().ok())
        {
            present = present.max(k + 1);
        }
    }
    let total = present.max(shard_count);
    let mut envs = Vec::with_capacity(total);
    for k in 0..total {
        let path = dir.join(format!("shard-{k}"));
        let env = open_env(&path, map_size_bytes)?;
        envs.push((env, path));
    }
    let mut out: Vec<Recovered> = (0..shard_count).map(|_| Recovered::default()).collect();
    let mut retained_all = Vec::new();
    let mut routes_all: Vec<(Str, ShardId)> = Vec::new();
    let mut moved = 0usize;
    // Everything is read before anything moves, so a record moved to a later
    // env is not read twice.
    let mut raws = Vec::with_capacity(total);
    for (env, path) in &envs {
        let dbs = open_dbs(env).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        check_format(env, &dbs, path)?;
        raws.push(read_raw(env, &dbs, path)?);
    }
    let resolved = resolve_inbound(&envs, &mut raws, present, shard_count)?;
    let origin_seq_floor = resolved.origin_seq_floor;
    for (r, ids) in out.iter_mut().zip(resolved.handled) {
        r.resent_handled = ids;
        r.resent_pending = resolved.pending.clone();
    }
    // A crash during an earlier re-partition can leave a record in two envs:
    // it counts once, and the copy outside its owner is deleted.
    let mut seen_sessions = std::collections::HashSet::new();
    let mut seen_retained = std::collections::HashSet::new();
    let mut seen_ghosts = std::collections::HashSet::new();
    let mut seen_redirects = std::collections::HashSet::new();
    // Forward marks stay with their shard; after a change of the shard count
    // they are dropped (a batch retried then is delivered again: at least once).
    let same_shards = present == 0 || present == shard_count;
    for (from, mut raw) in raws.into_iter().enumerate() {
        // So do `PubId` marks and windows (deleted then: they name what other
        // shards handled), and a mark not raised within `PUB_MARK_KEEP_MS`
        // before this start goes.
        let mut dels: Vec<(usize, Vec<u8>)> = Vec::new();
        let keep = same_shards && from < shard_count;
        if keep {
            out[from].forward_marks = std::mem::take(&mut raw.forwards);
        }
        for (origin, shard, seq, at, key) in std::mem::take(&mut raw.pub_marks) {
            if keep && at.saturating_add(super::PUB_MARK_KEEP_MS) >= wall_base_ms {
                out[from].pub_marks.push((origin, shard, seq));
            } else {
                dels.push((META, key));
            }
        }
        let (env, path) = &envs[from];
        let open = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let dbs = open_dbs(env).map_err(open)?;
        let corrupt = |db: &'static str, key: &[u8], e: record::DecodeError| StoreError::Corrupt {
            path: path.clone(),
            db,
            key: escape(key),
            reason: e.to_string(),
        };
        // Moves out of this env, per target shard.
        let mut puts: Vec<Vec<RawPut>> = vec![Vec::new(); shard_count];
        for (key, (rec, value)) in std::mem::take(&mut raw.sessions) {
            let owner = shard_for(rec.client_id.as_bytes(), shard_count);
            let messages = raw.messages.remove(&key).unwrap_or_default();
            let inbound = raw.inbound.remove(&key).unwrap_or_default();
            let will = raw.wills.remove(&key);
            let mut held = raw.held.remove(&key).unwrap_or_default();
            if owner != from {
                moved += 1;
                let p = &mut puts[owner];
                p.push((SESSIONS, key.clone(), value));
                dels.push((SESSIONS, key.clone()));
                for (_, _, k, v) in &messages {
                    p.push((MESSAGES, k.clone(), v.clone()));
                    dels.push((MESSAGES, k.clone()));
                }
                // Held deliveries go with their session (a window does not).
                for (_, _, k, v) in &held {
                    p.push((META, k.clone(), v.clone()));
                    dels.push((META, k.clone()));
                }
                for (_, k, _) in &inbound {
                    // Resolved below the shard count's change: nothing to
                    // deliver again (`resolve_inbound`).
                    p.push((INBOUND, k.clone(), Vec::new()));
                    dels.push((INBOUND, k.clone()));
                }
                if let Some((_, v)) = &will {
                    p.push((WILLS, key.clone(), v.clone()));
                    dels.push((WILLS, key.clone()));
                }
            }
            if !seen_sessions.insert(key.clone()) {
                continue;
            }
            let session = restore_session(rec, messages, inbound, will, wall_base_ms)
                .map_err(|e| corrupt("sessions", &key, e))?;
            held.sort_unstable_by_key(|h| h.0);
            for (seq, rec, k, _) in held {
                let d =
                    record::delivery(rec, seq, wall_base_ms).map_err(|e| corrupt("meta", &k, e))?;
                out[owner].held.push((session.client_id.clone(), d));
            }
            if keep
                && owner == from
                && let Some(parts) = raw.windows.remove(&key)
            {
                out[owner]
                    .windows
                    .push(recovered_window(&session.client_id, parts, wall_base_ms));
            }
            // One entry per subscription: a shared filter's entries count that
            // shard's (offline) members of the group.
            for (filter, _) in &session.subscriptions {
                routes_all.push((filter.clone(), owner as ShardId));
            }
            out[owner].sessions.push(session);
        }
        // A ghost goes with its ClientID's shard, as its session did.
        for key in std::mem::take(&mut raw.bad_ghosts) {
            dels.push((META, key));
        }
        for (key, (rec, value)) in std::mem::take(&mut raw.ghosts) {
            let owner = shard_for(rec.client_id.as_bytes(), shard_count);
            if owner != from {
                moved += 1;
                puts[owner].push((META, key.clone(), value));
                dels.push((META, key.clone()));
            }
            if !seen_ghosts.insert(key.clone()) {
                continue;
            }
            match record::ghost(rec, wall_base_ms) {
                Ok(ghost) => {
                    // Its filters stay routed to its shard, as a session's do.
                    for (filter, _) in &ghost.subscriptions {
                        routes_all.push((filter.clone(), owner as ShardId));
                    }
                    out[owner].ghosts.push(ghost);
                }
                Err(e) => {
                    warn!(
                        path = %path.display(),
                        key = %escape(&key),
                        "store: a moved session's ghost is not valid ({e}); skipped and deleted"
                    );
                    if owner != from {
                        puts[owner].pop();
                    } else {
                        dels.push((META, key));
                    }
                }
            }
        }
        // A redirect goes with its ClientID's shard, as its ghost did (only that
        // shard's ghost makes them, so numbers do not collide there).
        for (seq, rec, key, value) in std::mem::take(&mut raw.redirects) {
            let owner = shard_for(rec.client_id.as_bytes(), shard_count);
            if owner != from {
                moved += 1;
                puts[owner].push((META, key.clone(), value));
                dels.push((META, key.clone()));
            }
            if !seen_redirects.insert(key.clone()) {
                continue;
            }
            let r = record::redirect(rec, wall_base_ms).map_err(|e| corrupt("meta", &key, e))?;
            out[owner].redirects.push((seq, r));
        }
        // Windows of no session here (or not kept) go.
        for (_, _, _, _, key) in raw.windows.into_values().flatten() {
            dels.push((META, key));
        }
        // So do held deliveries of no session (its delete took them along).
        for (_, _, key, _) in raw.held.into_values().flatten() {
            dels.push((META, key));
        }
        for (key, _) in raw.messages.iter().filter(|(_, m)| !m.is_empty()) {
            warn!(
                path = %path.display(),
                session_key = %escape(key),
                "store: deliveries without a session record are left in place"
            );
        }
        for (key, (rec, value)) in std::mem::take(&mut raw.retained) {
            let owner = shard_for(rec.topic.as_bytes(), shard_count);
            if owner != from {
                moved += 1;
                puts[owner].push((RETAINED, key.clone(), value));
                dels.push((RETAINED, key.clone()));
            }
            if seen_retained.insert(key.clone()) {
                let m =
                    record::message(rec, wall_base_ms).map_err(|e| corrupt("retained", &key, e))?;
                retained_all.push(m);
            }
        }
        for (to, p) in puts.iter().enumerate() {
            if !p.is_empty() {
                let (tenv, tpath) = &envs[to];
                let tdbs = open_dbs(tenv).map_err(|source| StoreError::Open {
                    path: tpath.clone(),
                    source,
                })?;
                write_raw(tenv, &tdbs, tpath, p)?;
            }
        }
        if !dels.is_empty() {
            delete_raw(env, &dbs, path, &dels)?;
        }
    }
    if moved > 0 {
        info!(
            records = moved,
            shards = shard_count,
            "store: re-partitioned records for the new shard count"
        );
    }
    // Envs beyond the shard count: closed, and removed once empty.
    let extra = envs.split_off(shard_count);
    for (env, path) in extra {
        let empty = {
            let dbs = open_dbs(&env).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
            let rtxn = env.read_txn().map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
            dbs.all()
                .iter()
                .skip(1)
                .all(|(_, db)| db.is_empty(&rtxn).unwrap_or(false))
        };
        env.prepare_for_closing().wait();
        if empty {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                warn!(path = %path.display(), "store: cannot remove an emptied store: {e}");
            }
        } else {
            warn!(
                path = %path.display(),
                "store: records left in a store beyond the shard count (see the warnings above)"
            );
        }
    }
    for (k, r) in out.iter_mut().enumerate() {
        r.retained = retained_all.clone();
        r.routes = routes_all
            .iter()
            .filter(|(_, s)| usize::from(*s) != k)
            .cloned()
            .collect();
        r.origin_seq_floor = origin_seq_floor;
    }
    Ok((lock, envs, out))
}

/// Decides, for every inbound QoS 2 id with an origin sequence number, which
/// other shards may lack its publication: those whose origin mark for the
/// id's shard is below the number (a shard handles one sender's
/// publications in order and stores its mark with what they stored, so a
/// mark at or above it means the publication is committed there or was
/// never for it). The answer replaces the record, committed before any
/// shard runs, so that marks raised after this start never shrink it;
/// a re-sent PUBLISH is delivered again to those shards only
/// (docs/PERSISTENCE.md, "Cross-shard QoS 2 after a crash"). After a change
/// of the shard count the marks name other shards: nothing is delivered
/// again (a clean stop leaves nothing to deliver again). Returns where the
/// shards' own origin numbering starts: above every number stored, and per
/// shard the cluster-wide ids of the restored publications it has (or was not
/// a destination of): every shard of this node outside an id's set, its
/// publisher's included (it delivered in the id's commit), so a re-send routed
/// again with that id (from the node its session moved to) is skipped there;
/// and the ids a re-send may still come for.
fn resolve_inbound(
    envs: &[(Env<WithoutTls>, PathBuf)],
    raws: &mut [Raw],
    present: usize,
    shard_count: usize,
) -> Result<Resolved, StoreError> {
    let mut handled: Vec<Vec<PubId>> = vec![Vec::new(); shard_count];
    let mut pending: Vec<PubId> = Vec::new();
    let changed = present > 0 && present != shard_count;
    let mut floor = 0u64;
    for raw in raws.iter() {
        floor = floor.max(raw.origins.values().copied().max().unwrap_or(0));
        for (_, _, rec) in raw.inbound.values().flatten() {
            floor = floor.max(rec.seq);
        }
    }
    let marks: Vec<HashMap<ShardId, u64>> = raws.iter().map(|r| r.origins.clone()).collect();
    for (a, raw) in raws.iter_mut().enumerate() {
        let mut rewrites: Vec<RawPut> = Vec::new();
        for (_, key, rec) in raw.inbound.values_mut().flatten() {
            if rec.seq == 0 && (!changed || rec.shards.is_empty()) {
                // Resolved at an earlier start.
                note_handled(&mut handled, rec, changed);
                note_pending(&mut pending, rec);
                continue;
            }
            let mut left = ShardSet::new();
            if !changed {
                for b in rec.shards.iter() {
                    let b_idx = usize::from(b);
                    let mark = marks
                        .get(b_idx)
                        .and_then(|m| m.get(&(a as ShardId)))
                        .copied()
                        .unwrap_or(0);
                    if b_idx != a && b_idx < shard_count && mark < rec.seq {
                        left.insert(b);
                    }
                    // The other nodes of a cluster (the remote id, the shard
                    // count) keep no marks here: a re-send goes to them again
                    // (at least once rather than lost).
                    if b_idx == shard_count {
                        left.insert(b);
                    }
                }
            }
            *rec = InboundRecord {
                seq: 0,
                shards: left,
                id: rec.id,
            };
            note_handled(&mut handled, rec, changed);
            note_pending(&mut pending, rec);
            if left.is_empty() {
                // Nothing to send again: the value is empty, with no id (as stored).
                rec.id = None;
            }
            rewrites.push((
                INBOUND,
                key.clone(),
                InboundRecord::encode(0, Some(&left), rec.id.as_ref()),
            ));
        }
        if !rewrites.is_empty() {
            let (env, path) = &envs[a];
            let dbs = open_dbs(env).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
            write_raw(env, &dbs, path, &rewrites)?;
        }
    }
    Ok(Resolved {
        origin_seq_floor: floor + 1,
        handled,
        pending,
    })
}

/// What [`resolve_inbound`] found.
struct Resolved {
    /// Above every origin number stored: where the shards' own numbering starts.
    origin_seq_floor: u64,
    /// Per shard, the restored publications it has (`Recovered::resent_handled`).
    handled: Vec<Vec<PubId>>,
    /// The restored publications some shard or node may lack
    /// (`Recovered::resent_pending`).
    pending: Vec<PubId>,
}

/// `rec`'s publication may be re-sent (a shard or node may lack it): its id is
/// one of `Recovered::resent_pending`.
fn note_pending(pending: &mut Vec<PubId>, rec: &InboundRecord) {
    if let Some(id) = rec.id
        && !rec.shards.is_empty()
    {
        pending.push(id);
    }
}

/// The shards of this node outside `rec`'s set have its publication (see
/// `resolve_inbound`); after a change of the shard count nothing is delivered
/// again, so every shard counts as having it.
fn note_handled(handled: &mut [Vec<PubId>], rec: &InboundRecord, changed: bool) {
    let Some(id) = rec.id else {
        return;
    };
    for (k, ids) in handled.iter_mut().enumerate() {
        if changed || !rec.shards.contains(k as ShardId) {
            ids.push(id);
        }
    }
}

/// A window from its stored parts: part 0 has the marks, ids come in part order.
fn recovered_window(
    client_id: &Str,
    mut parts: Vec<RawWindowPart>,
    wall_base_ms: u64,
) -> RecoveredWindow {
    parts.sort_unstable_by_key(|p| p.0);
    let mut w = RecoveredWindow {
        client_id: client_id.clone(),
        expires_ms: 0,
        marks: Vec::new(),
        ids: Vec::new(),
        parts: parts.last().map_or(0, |p| p.0.saturating_add(1)),
    };
    for (_, ends, marks, ids, _) in parts {
        w.expires_ms = w.expires_ms.max(record::to_broker(ends, wall_base_ms));
        w.marks.extend(marks);
        w.ids.extend(ids);
    }
    w
}

fn restore_session(
    rec: record::SessionRec,
    mut messages: RawMessages,
    inbound: Vec<RawInbound>,
    will: Option<(record::DelayedWillRec, Vec<u8>)>,
    wall_base_ms: u64,
) -> Result<RecoveredSession, record::DecodeError> {
    messages.sort_unstable_by_key(|m| m.0);
    recovered_session(
        rec,
        messages
            .into_iter()
            .map(|(seq, r, _, _)| (seq, r))
            .collect(),
        inbound
            .into_iter()
            .map(|(pid, _, rec)| (pid, rec.shards, rec.id))
            .collect(),
        will.map(|(w, _)| w),
        wall_base_ms,
    )
}

/// A session in engine types from its records (the store's at start-up, or a peer's
/// at a takeover): deliveries in order with their sequence numbers. Every field is
/// checked; a bad one is an error, never a panic.
pub(crate) fn recovered_session(
    rec: record::SessionRec,
    messages: Vec<(u64, record::DeliveryRec)>,
    inbound_qos2: Vec<(u16, ShardSet, Option<PubId>)>,
    delayed_will: Option<record::DelayedWillRec>,
    wall_base_ms: u64,
) -> Result<RecoveredSession, record::DecodeError> {
    let deliveries = messages
        .into_iter()
        .map(|(seq, r)| {
            let (state, pid) = (r.state, r.packet_id);
            record::delivery(r, seq, wall_base_ms).map(|d| (state, pid, d))
        })
        .collect::<Result<_, _>>()?;
    Ok(RecoveredSession {
        client_id: Str::try_from(rec.client_id)
            .map_err(|e| record::DecodeError::Corrupt(format!("client id: {e:?}")))?,
        version: record::version(rec.level)?,
        expiry_interval_s: rec.expiry_interval_s,
        disconnected_at_ms: rec
            .disconnected_at_wall_ms
            .map(|t| record::to_broker(t, wall_base_ms)),
        subscriptions: rec
            .subscriptions
            .into_iter()
            .map(record::subscription)
            .collect::<Result<_, _>>()?,
        deliveries,
        inbound_qos2,
        will: rec.will.map(record::will).transpose()?,
        delayed_will: delayed_will
            .map(|w| {
                record::will(w.will)
                    .map(|will| (record::to_broker(w.due_wall_ms, wall_base_ms), will))
            })
            .transpose()?,
    })
}
