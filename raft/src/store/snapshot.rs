//! Snapshots: the state machine's tables as a stream of rkyv frames in one file.
//!
//! File layout (`data_dir/raft/snapshots/snap-{id}.bin`): the 8-byte magic
//! `TSRSNAP\0`, the format as a little-endian `u16`, then frames `[u32 LE length][rkyv
//! SnapChunk]` where a chunk holds up to [`CHUNK_ROWS_MAX`] rows of one table, and a
//! zero-length frame ends the file. The snapshot's raft meta (last log id, membership) sits
//! beside it in `snap-{id}.meta` (bincode).
//!
//! Building reads one LMDB read transaction (a consistent view at one applied index)
//! and streams it to disk chunk by chunk, so memory stays bounded by a chunk whatever the
//! number of sessions; openraft streams the file to a follower in `snapshot_max_chunk_size`
//! pieces. Installing validates every frame (the bytes came from a peer) inside one write
//! transaction that is dropped, leaving the tables untouched, at the first bad frame.
//! Only the newest snapshot is kept; openraft purges the log behind it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use openraft::{LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership};

use super::{SM_TABLES, Store, blocking, decode_bincode, encode_bincode, read_err, write_err};
use crate::op::{decode_rkyv, encode_rkyv};
use crate::transport::NodeId;
use crate::types::{NodeInfo, TypeConfig};

const MAGIC: &[u8; 8] = b"TSRSNAP\0";
const SNAPSHOT_FORMAT: u16 = 1;
/// Rows per frame.
pub const CHUNK_ROWS_MAX: usize = 4096;
/// Largest frame accepted when installing, bytes (a chunk of 4096 rows of LMDB-bounded
/// keys and values up to an inline retained record each stays far below).
pub const FRAME_BYTES_MAX: u32 = 512 << 20;
/// LMDB's key size bound.
const KEY_BYTES_MAX: usize = 511;

#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct SnapChunk {
    table: u8,
    rows: Vec<(Vec<u8>, Vec<u8>)>,
}

type Meta = SnapshotMeta<NodeId, NodeInfo>;

fn io_err(path: &Path, e: std::io::Error) -> StorageError<NodeId> {
    write_err(format!("{}: {e}", path.display()))
}

/// Removes what an interrupted build, receive or install left behind (never a complete
/// snapshot).
pub(crate) fn remove_partial_files(dir: &Path) -> Result<(), super::StoreError> {
    let rd = std::fs::read_dir(dir).map_err(|source| super::StoreError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

fn write_frame(out: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    out.write_all(&(payload.len() as u32).to_le_bytes())?;
    out.write_all(payload)
}

fn snapshot_id(store: &Store, last: &Option<LogId<NodeId>>) -> String {
    let n = store.counters.snapshots_built.load(Ordering::Relaxed)
        + store.counters.snapshots_installed.load(Ordering::Relaxed);
    match last {
        Some(l) => format!("{}-{}-{n}", l.index, l.leader_id.term),
        None => format!("0-0-{n}"),
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Makes `snap-{id}.bin` and `.meta` current (both written under temporary names first)
/// and removes every other snapshot.
fn publish(
    dir: &Path,
    id: &str,
    data_tmp: &Path,
    meta: &Meta,
) -> Result<PathBuf, StorageError<NodeId>> {
    let bin = dir.join(format!("snap-{id}.bin"));
    let meta_tmp = dir.join(format!("snap-{id}.meta.tmp"));
    let meta_path = dir.join(format!("snap-{id}.meta"));
    let mut f = File::create(&meta_tmp).map_err(|e| io_err(&meta_tmp, e))?;
    f.write_all(&encode_bincode(meta))
        .map_err(|e| io_err(&meta_tmp, e))?;
    f.sync_all().map_err(|e| io_err(&meta_tmp, e))?;
    std::fs::rename(data_tmp, &bin).map_err(|e| io_err(&bin, e))?;
    std::fs::rename(&meta_tmp, &meta_path).map_err(|e| io_err(&meta_path, e))?;
    sync_dir(dir);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let ours = name == format!("snap-{id}.bin") || name == format!("snap-{id}.meta");
            if name.starts_with("snap-") && !ours && !name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(bin)
}

fn build_blocking(store: &Store) -> Result<(Meta, PathBuf), StorageError<NodeId>> {
    let dir = store.snapshot_dir();
    let rtxn = store.sm_env().read_txn().map_err(read_err)?;
    let last_log_id: Option<LogId<NodeId>> = store
        .meta_get_in(&rtxn, store.dbs.sm_meta, "sm_meta", b"applied")
        .map_err(read_err)?;
    let membership: Option<StoredMembership<NodeId, NodeInfo>> = store
        .meta_get_in(&rtxn, store.dbs.sm_meta, "sm_meta", b"membership")
        .map_err(read_err)?;
    let id = snapshot_id(store, &last_log_id);
    let tmp = dir.join(format!("building-{id}.tmp"));
    let file = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let werr = |e| io_err(&tmp, e);
    out.write_all(MAGIC).map_err(werr)?;
    out.write_all(&SNAPSHOT_FORMAT.to_le_bytes())
        .map_err(werr)?;
    for (t, db) in store.dbs.sm_tables().into_iter().enumerate() {
        let mut chunk = SnapChunk {
            table: t as u8,
            rows: Vec::new(),
        };
        for row in db.iter(&rtxn).map_err(read_err)? {
            let (k, v) = row.map_err(read_err)?;
            chunk.rows.push((k.to_vec(), v.to_vec()));
            if chunk.rows.len() >= CHUNK_ROWS_MAX {
                write_frame(&mut out, &encode_rkyv(&chunk)).map_err(werr)?;
                chunk.rows.clear();
            }
        }
        if !chunk.rows.is_empty() {
            write_frame(&mut out, &encode_rkyv(&chunk)).map_err(werr)?;
        }
    }
    write_frame(&mut out, &[]).map_err(werr)?;
    let file = out.into_inner().map_err(|e| io_err(&tmp, e.into_error()))?;
    file.sync_all().map_err(werr)?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    drop(rtxn);
    let meta = Meta {
        last_log_id,
        last_membership: membership.unwrap_or_default(),
        snapshot_id: id.clone(),
    };
    let bin = publish(&dir, &id, &tmp, &meta)?;
    store
        .counters
        .snapshots_built
        .fetch_add(1, Ordering::Relaxed);
    store
        .counters
        .snapshot_last_bytes
        .store(size, Ordering::Relaxed);
    Ok((meta, bin))
}

/// Builds a snapshot of the applied state.
pub(crate) async fn build(
    store: &std::sync::Arc<Store>,
) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
    let s = store.clone();
    let (meta, path) = blocking(store, move || build_blocking(&s)).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| io_err(&path, e))?;
    Ok(Snapshot {
        meta,
        snapshot: Box::new(file),
    })
}

/// A fresh file to receive a snapshot into.
pub(crate) async fn begin_receiving(
    store: &Store,
) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
    // Only one transfer at a time: whatever an abandoned one left goes.
    if let Ok(rd) = std::fs::read_dir(store.snapshot_dir()) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("recv-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let n = store.counters.snapshots_installed.load(Ordering::Relaxed);
    let path = store
        .snapshot_dir()
        .join(format!("recv-{n}-{}.tmp", std::process::id()));
    let f = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .await
        .map_err(|e| io_err(&path, e))?;
    Ok(Box::new(f))
}

fn read_exact_or(
    r: &mut impl Read,
    buf: &mut [u8],
    what: &str,
) -> Result<(), StorageError<NodeId>> {
    r.read_exact(buf)
        .map_err(|e| read_err(format!("snapshot {what}: {e}")))
}

/// Checks one frame of a snapshot (bytes from a peer or a file): it decodes, names a
/// known table, and every key fits LMDB.
fn check_frame(frame: &[u8]) -> Result<SnapChunk, String> {
    let chunk: SnapChunk = decode_rkyv(frame, "snapshot frame").map_err(|e| e.to_string())?;
    let Some(name) = SM_TABLES.get(chunk.table as usize) else {
        return Err(format!("snapshot names unknown table {}", chunk.table));
    };
    if let Some((k, _)) = chunk
        .rows
        .iter()
        .find(|(k, _)| k.is_empty() || k.len() > KEY_BYTES_MAX)
    {
        return Err(format!(
            "snapshot row of table {name} has a key of {} bytes",
            k.len()
        ));
    }
    Ok(chunk)
}

fn check_header(head: &[u8; 10]) -> Result<(), String> {
    if &head[..8] != MAGIC {
        return Err("not a Tessera snapshot (bad magic)".into());
    }
    let format = u16::from_le_bytes([head[8], head[9]]);
    if format != SNAPSHOT_FORMAT {
        return Err(format!(
            "snapshot format {format}; this build reads {SNAPSHOT_FORMAT}"
        ));
    }
    Ok(())
}

/// Checks a snapshot as it streams in from a peer, chunk by chunk, before raft sees the
/// last chunk: a snapshot that does not parse is refused at the transport (the leader
/// retries later) instead of failing the install, which openraft treats as a fatal
/// storage error that stops raft on this node. Memory: at most one frame.
#[derive(Debug)]
pub struct SnapshotCheck {
    id: String,
    next_offset: u64,
    buf: Vec<u8>,
    header_done: bool,
    ended: bool,
}

impl SnapshotCheck {
    /// A check of the stream of snapshot `id`, starting at offset 0.
    pub fn new(id: &str) -> SnapshotCheck {
        SnapshotCheck {
            id: id.to_owned(),
            next_offset: 0,
            buf: Vec::new(),
            header_done: false,
            ended: false,
        }
    }

    /// Whether `(id, offset)` continues this stream.
    pub fn continues(&self, id: &str, offset: u64) -> bool {
        self.id == id && self.next_offset == offset
    }

    /// Feeds the next chunk; an error names what is wrong.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        self.next_offset += data.len() as u64;
        if self.ended {
            return if data.is_empty() {
                Ok(())
            } else {
                Err("bytes after the end frame".into())
            };
        }
        self.buf.extend_from_slice(data);
        if !self.header_done {
            let Some(head) = self.buf.get(..10) else {
                return Ok(());
            };
            let head: [u8; 10] = head.try_into().map_err(|_| "short header".to_string())?;
            check_header(&head)?;
            self.buf.drain(..10);
            self.header_done = true;
        }
        let mut at = 0;
        while let Some(len) = self.buf.get(at..at + 4) {
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
            if len == 0 {
                if self.buf.len() > at + 4 {
                    return Err("bytes after the end frame".into());
                }
                self.ended = true;
                at += 4;
                break;
            }
            if len > FRAME_BYTES_MAX {
                return Err(format!("snapshot frame of {len} bytes exceeds the bound"));
            }
            let Some(frame) = self.buf.get(at + 4..at + 4 + len as usize) else {
                break;
            };
            check_frame(frame)?;
            at += 4 + len as usize;
        }
        self.buf.drain(..at);
        Ok(())
    }

    /// Checks that the stream ended with the end frame.
    pub fn finish(&self) -> Result<(), String> {
        if self.ended {
            Ok(())
        } else {
            Err("the snapshot ends without its end frame".into())
        }
    }
}

/// Replaces the state machine's tables with the snapshot read from `r` (positioned after
/// the header) in the write transaction `w`, copying each frame to `copy` if given.
fn fill_tables(
    store: &Store,
    w: &mut heed::RwTxn<'_>,
    r: &mut impl Read,
    mut copy: Option<&mut dyn Write>,
) -> Result<(), StorageError<NodeId>> {
    let tables = store.dbs.sm_tables();
    for db in tables {
        db.clear(w).map_err(write_err)?;
    }
    let mut frame = Vec::new();
    loop {
        let mut len = [0u8; 4];
        read_exact_or(r, &mut len, "frame length")?;
        let len = u32::from_le_bytes(len);
        if len == 0 {
            break;
        }
        if len > FRAME_BYTES_MAX {
            return Err(read_err(format!(
                "snapshot frame of {len} bytes exceeds the bound"
            )));
        }
        frame.resize(len as usize, 0);
        read_exact_or(r, &mut frame, "frame")?;
        let chunk = check_frame(&frame).map_err(read_err)?;
        let db = tables[chunk.table as usize];
        for (k, v) in &chunk.rows {
            db.put(w, k, v).map_err(write_err)?;
        }
        if let Some(out) = copy.as_mut() {
            write_frame(out, &frame).map_err(read_err)?;
        }
    }
    Ok(())
}

fn install_blocking(
    store: &Store,
    meta: &Meta,
    mut src: File,
) -> Result<u64, StorageError<NodeId>> {
    let dir = store.snapshot_dir();
    src.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mut r = BufReader::with_capacity(1 << 20, src);
    let mut head = [0u8; 10];
    read_exact_or(&mut r, &mut head, "header")?;
    check_header(&head).map_err(read_err)?;
    let id = meta.snapshot_id.replace(['/', '\\'], "_");
    let tmp = dir.join(format!("installing-{id}.tmp"));
    let file = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let werr = |e| io_err(&tmp, e);
    out.write_all(&head).map_err(werr)?;

    let mut w = store.sm_env().write_txn().map_err(write_err)?;
    fill_tables(store, &mut w, &mut r, Some(&mut out))?;
    write_frame(&mut out, &[]).map_err(werr)?;
    let file = out.into_inner().map_err(|e| io_err(&tmp, e.into_error()))?;
    file.sync_all().map_err(werr)?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    set_applied(store, &mut w, meta)?;
    w.commit().map_err(write_err)?;
    publish(&dir, &id, &tmp, meta)?;
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("recv-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(size)
}

/// The snapshot's raft meta is authoritative for what the tables now reflect.
fn set_applied(
    store: &Store,
    w: &mut heed::RwTxn<'_>,
    meta: &Meta,
) -> Result<(), StorageError<NodeId>> {
    let sm_meta = store.dbs.sm_meta;
    match &meta.last_log_id {
        Some(l) => sm_meta
            .put(w, b"applied", &encode_bincode(l))
            .map_err(write_err)?,
        None => {
            sm_meta.delete(w, b"applied").map_err(write_err)?;
        }
    }
    sm_meta
        .put(w, b"membership", &encode_bincode(&meta.last_membership))
        .map_err(write_err)
}

/// Loads the newest local snapshot into an empty state machine (one rebuilt after a
/// machine crash, see the store's header); openraft re-applies the log after it.
pub(crate) fn load_if_empty(store: &Store) -> Result<(), super::StoreError> {
    let corrupt = |reason: String| super::StoreError::Corrupt {
        path: store.snapshot_dir(),
        db: "snapshots",
        key: "newest".into(),
        reason,
    };
    let applied: Option<LogId<NodeId>> = store.sm_meta_get(b"applied")?;
    if applied.is_some() {
        return Ok(());
    }
    let Some((meta, bin)) = newest(store).map_err(|e| corrupt(e.to_string()))? else {
        return Ok(());
    };
    let src = File::open(&bin).map_err(|source| super::StoreError::Io {
        path: bin.clone(),
        source,
    })?;
    let mut r = BufReader::with_capacity(1 << 20, src);
    let mut head = [0u8; 10];
    let mut load = || -> Result<(), StorageError<NodeId>> {
        read_exact_or(&mut r, &mut head, "header")?;
        check_header(&head).map_err(read_err)?;
        let mut w = store.sm_env().write_txn().map_err(write_err)?;
        fill_tables(store, &mut w, &mut r, None)?;
        set_applied(store, &mut w, &meta)?;
        w.commit().map_err(write_err)?;
        store.sm_env().force_sync().map_err(write_err)
    };
    load().map_err(|e| corrupt(format!("{}: {e}", bin.display())))?;
    tracing::info!(
        snapshot = %bin.display(),
        index = meta.last_log_id.map_or(0, |l| l.index),
        "raft state machine loaded from the newest snapshot"
    );
    Ok(())
}

/// Replaces the tables with the snapshot in `src` (received from the leader).
pub(crate) async fn install(
    store: &std::sync::Arc<Store>,
    meta: &Meta,
    src: Box<tokio::fs::File>,
) -> Result<(), StorageError<NodeId>> {
    let src = src.into_std().await;
    let s = store.clone();
    let m = meta.clone();
    let size = blocking(store, move || install_blocking(&s, &m, src)).await?;
    let c = &store.counters;
    c.snapshots_installed.fetch_add(1, Ordering::Relaxed);
    c.snapshot_last_bytes.store(size, Ordering::Relaxed);
    c.applied_index
        .store(meta.last_log_id.map_or(0, |l| l.index), Ordering::Release);
    Ok(())
}

/// The newest complete snapshot's meta and data file, if any.
fn newest(store: &Store) -> Result<Option<(Meta, PathBuf)>, StorageError<NodeId>> {
    let dir = store.snapshot_dir();
    let mut best: Option<(Meta, PathBuf)> = None;
    let rd = std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name
            .strip_prefix("snap-")
            .and_then(|n| n.strip_suffix(".meta"))
        else {
            continue;
        };
        let bytes = std::fs::read(e.path()).map_err(|err| io_err(&e.path(), err))?;
        let meta: Meta = decode_bincode(&bytes).map_err(|reason| {
            read_err(format!(
                "corrupt snapshot meta {}: {reason}",
                e.path().display()
            ))
        })?;
        let bin = dir.join(format!("snap-{id}.bin"));
        if !bin.exists() {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(m, _)| m.last_log_id < meta.last_log_id)
        {
            best = Some((meta, bin));
        }
    }
    Ok(best)
}

/// The newest complete snapshot, if any.
pub(crate) async fn current(
    store: &Store,
) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
    let Some((meta, bin)) = newest(store)? else {
        return Ok(None);
    };
    let file = tokio::fs::File::open(&bin)
        .await
        .map_err(|e| io_err(&bin, e))?;
    Ok(Some(Snapshot {
        meta,
        snapshot: Box::new(file),
    }))
}
