//! openraft's `RaftLogStorage` over the store's `log` and `raft_meta` databases.
//!
//! One `append` call is one LMDB write transaction and one fsync, whatever the number of
//! entries openraft hands over (it groups queued writes), and each entry is one batch of
//! ops: that is how the control plane turns thousands of proposals into one fsync.
//! The fsync runs on tokio's blocking pool so the control thread keeps serving RPCs.
//!
//! The committed log id is kept in memory and persisted by the next append transaction,
//! which saves an fsync per commit; after a crash openraft re-applies from the last
//! persisted one, which is never ahead of the truth.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, LogId, LogState, RaftLogReader, StorageError, Vote};

use super::{Store, blocking, decode_bincode, encode_bincode, lock, read_err, write_err};
use crate::transport::NodeId;
use crate::types::TypeConfig;

/// The raft log and vote, in the shared store.
#[derive(Debug, Clone)]
pub struct LogStore {
    store: Arc<Store>,
}

impl LogStore {
    /// The log store of `store`.
    pub fn new(store: Arc<Store>) -> LogStore {
        LogStore { store }
    }

    fn meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &'static [u8],
    ) -> Result<Option<T>, StorageError<NodeId>> {
        self.store
            .meta_get(self.store.dbs.raft_meta, "raft_meta", key)
            .map_err(read_err)
    }

    fn read_range(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let store = &self.store;
        let rtxn = store.env().read_txn().map_err(read_err)?;
        let lo = start.to_be_bytes();
        let hi;
        let upper = match end {
            Some(e) => {
                hi = e.to_be_bytes();
                Bound::Excluded(&hi[..])
            }
            None => Bound::Unbounded,
        };
        let range = (Bound::Included(&lo[..]), upper);
        let iter = store.dbs.log.range(&rtxn, &range).map_err(read_err)?;
        let mut out = Vec::new();
        for row in iter {
            let (k, v) = row.map_err(read_err)?;
            let entry: Entry<TypeConfig> = decode_bincode(v).map_err(|reason| {
                read_err(format!(
                    "corrupt log entry in {} (key {:?}): {reason}",
                    store.data_file().display(),
                    k
                ))
            })?;
            // Paired check: the key we stored it under is the index inside it.
            if k != entry.log_id.index.to_be_bytes() {
                return Err(read_err(format!(
                    "corrupt log in {}: entry {} stored under another key",
                    store.data_file().display(),
                    entry.log_id
                )));
            }
            out.push(entry);
        }
        Ok(out)
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e.checked_add(1),
        Bound::Excluded(e) => Some(*e),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let (start, end) = bounds(&range);
        if end.is_some_and(|e| e <= start) {
            return Ok(Vec::new());
        }
        self.read_range(start, end)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let purged: Option<LogId<NodeId>> = self.meta(b"purged")?;
        let last = {
            let rtxn = self.store.env().read_txn().map_err(read_err)?;
            match self.store.dbs.log.last(&rtxn).map_err(read_err)? {
                None => None,
                Some((_, v)) => {
                    let e: Entry<TypeConfig> = decode_bincode(v).map_err(|reason| {
                        read_err(format!(
                            "corrupt last log entry in {}: {reason}",
                            self.store.data_file().display()
                        ))
                    })?;
                    Some(e.log_id)
                }
            }
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let store = self.store.clone();
        let bytes = encode_bincode(vote);
        blocking(&self.store, move || {
            let mut w = store.env().write_txn().map_err(write_err)?;
            store
                .dbs
                .raft_meta
                .put(&mut w, b"vote", &bytes)
                .map_err(write_err)?;
            w.commit().map_err(write_err)
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.meta(b"vote")
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        if let Some(c) = &committed {
            self.store
                .counters
                .committed_index
                .store(c.index, Ordering::Relaxed);
        }
        *lock(&self.store.committed) = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(*lock(&self.store.committed))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let rows: Vec<([u8; 8], Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index.to_be_bytes(), encode_bincode(&e)))
            .collect();
        let committed = *lock(&self.store.committed);
        let store = self.store.clone();
        let result = blocking(&self.store, move || {
            let mut w = store.env().write_txn().map_err(write_err)?;
            for (k, v) in &rows {
                store.dbs.log.put(&mut w, k, v).map_err(write_err)?;
            }
            if let Some(c) = committed {
                store
                    .dbs
                    .raft_meta
                    .put(&mut w, b"committed", &encode_bincode(&c))
                    .map_err(write_err)?;
            }
            w.commit().map_err(write_err)
        })
        .await;
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let store = self.store.clone();
        blocking(&self.store, move || {
            let mut w = store.env().write_txn().map_err(write_err)?;
            let lo = log_id.index.to_be_bytes();
            let range = (Bound::Included(&lo[..]), Bound::Unbounded);
            store
                .dbs
                .log
                .delete_range(&mut w, &range)
                .map_err(write_err)?;
            w.commit().map_err(write_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let store = self.store.clone();
        blocking(&self.store, move || {
            let mut w = store.env().write_txn().map_err(write_err)?;
            store
                .dbs
                .raft_meta
                .put(&mut w, b"purged", &encode_bincode(&log_id))
                .map_err(write_err)?;
            let hi = log_id.index.to_be_bytes();
            let range = (Bound::Unbounded, Bound::Included(&hi[..]));
            store
                .dbs
                .log
                .delete_range(&mut w, &range)
                .map_err(write_err)?;
            w.commit().map_err(write_err)
        })
        .await
    }
}
