//! The driver's side of persistence (`tessera_shard::store`): recovery and
//! writer threads at boot, batches from the engine to the shard's writer
//! thread, commits back to the engine, and connection writers waiting for the
//! commit their bytes depend on.
//!
//! Per shard: one writer thread (it blocks in LMDB commits, so the shard never
//! does), a bounded channel to it, and an unbounded channel of committed
//! epochs back whose async receive wakes the shard's executor. Batches the
//! channel cannot take wait in a local queue; when that queue holds more
//! than `BACKLOG_OPS_MAX` ops the shard's readers pause, which pushes back on
//! publishers through TCP.
//!
//! When batches are taken from the engine: in `sync` durability after every
//! step (`Shard::flush_outbox`), since acknowledgements wait for their commit;
//! in `batched` durability once per commit interval, when the writer has
//! committed the batch before ([`feed_writer`]): nothing waits for those
//! commits, and an epoch that spans the interval lets the engine keep one op
//! per delivery for it (a delivery queued, sent and acknowledged within it
//! costs no op at all; `engine::persist`, "Pending deliveries"). A change is
//! then on disk at most one interval plus one commit after it was made, as
//! when the writer slept through the interval with the batches waiting in its
//! channel.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use anyhow::anyhow;
use futures_lite::future::poll_fn;
use tessera_shard::engine::Engine;
use tessera_shard::store::{
    self, Batch, DirLock, Recovered, SharedStoreStats, StoreConfig, StoreHandle,
};
use tracing::{error, info, warn};

use super::{Shard, rt};
use crate::config::{Config, Durability};

/// Ops waiting for the writer's channel before this shard's readers pause
/// (about 150 bytes each plus the payloads they share with the queues). The
/// bound is in ops, not batches: a batch is whatever one step produced, often
/// a single op, and pausing early would also stop reading the PUBACKs that
/// free subscribers' windows.
const BACKLOG_OPS_MAX: usize = 200_000;

/// One shard's store and what it restores, until the shard takes it.
pub(super) type StoreSlot = Option<(StoreHandle, Recovered, bool)>;

/// Every shard's slot, taken by shard id (the mesh id, known after joining).
pub(super) type StoreBoot = Arc<Mutex<Vec<StoreSlot>>>;

/// Wall-clock milliseconds since the Unix epoch (`rt::unix_ms`: simulated in the
/// simulation).
pub(super) fn unix_ms() -> u64 {
    super::rt::unix_ms()
}

/// Recovers the data directory and starts one writer thread per shard, unless
/// durability is `memory`.
pub(super) fn boot(
    config: &Config,
    shard_count: usize,
    now_ms: u64,
) -> anyhow::Result<(Option<DirLock>, StoreBoot, Vec<SharedStoreStats>)> {
    let p = &config.persistence;
    if p.durability == Durability::Memory {
        return Ok((None, Arc::new(Mutex::new(Vec::new())), Vec::new()));
    }
    let store_config = StoreConfig {
        sync: p.durability == Durability::Sync,
        batch_interval: Duration::from_millis(u64::from(p.batch_interval_ms)),
        wall_base_ms: unix_ms().saturating_sub(now_ms),
    };
    let map_size = (p.map_size_mb as usize) << 20;
    let (lock, slots, stats) = open(
        &config.server.data_dir,
        shard_count,
        map_size,
        &store_config,
        store::spawn_writer,
    )?;
    Ok((Some(lock), slots, stats))
}

/// Recovers `dir` for `shard_count` shards and starts each shard's writer with `writer`
/// (the writer thread; the data-plane simulation's writer task, `sim`).
pub(super) fn open(
    dir: &std::path::Path,
    shard_count: usize,
    map_size: usize,
    config: &StoreConfig,
    mut writer: impl FnMut(
        usize,
        store::StoreEnv,
        std::path::PathBuf,
        StoreConfig,
    ) -> std::io::Result<StoreHandle>,
) -> anyhow::Result<(DirLock, StoreBoot, Vec<SharedStoreStats>)> {
    let (lock, envs, recovered) = store::recover(dir, shard_count, map_size, config.wall_base_ms)
        .map_err(|e| anyhow!("persistence: {e}"))?;
    let sessions: usize = recovered.iter().map(|r| r.sessions.len()).sum();
    let retained = recovered.first().map_or(0, |r| r.retained.len());
    info!(
        data_dir = %dir.display(),
        sessions,
        retained,
        durability = if config.sync { "sync" } else { "batched" },
        "store recovered"
    );
    let mut slots = Vec::with_capacity(shard_count);
    let mut stats = Vec::with_capacity(shard_count);
    for (k, ((env, path), rec)) in envs.into_iter().zip(recovered).enumerate() {
        let handle = writer(k, env, path.clone(), config.clone())
            .map_err(|e| anyhow!("cannot start the store writer of {}: {e}", path.display()))?;
        stats.push(handle.stats.clone());
        slots.push(Some((handle, rec, config.sync)));
    }
    Ok((lock, Arc::new(Mutex::new(slots)), stats))
}

/// A shard's store, owned by its executor.
pub(super) struct ShardStore {
    handle: StoreHandle,
    /// Batches not yet accepted by the writer's channel, oldest first.
    backlog: RefCell<VecDeque<Batch>>,
    /// Ops in `backlog`.
    backlog_ops: Cell<usize>,
    feeder: RefCell<Option<Waker>>,
    /// Highest epoch committed.
    committed: Cell<u64>,
    /// Highest epoch handed to the writer side.
    submitted: Cell<u64>,
    /// `sync` durability: batches are taken after every step; otherwise
    /// (`batched`) by the feeder, once per `interval`.
    sync: bool,
    /// The commit interval of `batched` durability.
    interval: Duration,
    /// Connection writers waiting for a commit.
    waiters: RefCell<Vec<Waker>>,
    /// Reads of a moving session's disk tail waiting for their load, by token
    /// (`takeover`).
    tail_reads: RefCell<std::collections::HashMap<u64, flume::Sender<store::Loaded>>>,
    next_tail_read: Cell<u64>,
}

impl ShardStore {
    /// After a step: in `sync` durability moves the engine's current batch,
    /// if any, to the writer's queue; in `batched` wakes the feeder, which
    /// takes it when the interval is over.
    pub(super) fn take_batch(&self, engine: &mut Engine) {
        if self.sync {
            self.take_batch_now(engine);
        } else if engine.store_epoch_recorded()
            && let Some(w) = self.feeder.borrow_mut().take()
        {
            w.wake();
        }
    }

    /// Moves the engine's current batch, if any, to the writer's queue now.
    pub(super) fn take_batch_now(&self, engine: &mut Engine) {
        if let Some(b) = engine.take_store_batch() {
            self.submitted.set(b.epoch);
            self.backlog_ops.set(self.backlog_ops.get() + b.ops.len());
            self.backlog.borrow_mut().push_back(b);
            if let Some(w) = self.feeder.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// Whether the writer is behind: more than `BACKLOG_OPS_MAX` ops wait
    /// for its channel, or (`batched`) in the engine's epoch.
    pub(super) fn backlogged(&self, engine: &Engine) -> bool {
        self.backlog_ops.get() > BACKLOG_OPS_MAX
            || (!self.sync && engine.store_ops_pending() > BACKLOG_OPS_MAX)
    }

    /// The highest epoch committed.
    #[cfg(test)]
    pub(super) fn committed(&self) -> u64 {
        self.committed.get()
    }

    /// The highest epoch handed to the writer side.
    pub(super) fn submitted(&self) -> u64 {
        self.submitted.get()
    }

    /// A token for a disk tail read and where its load arrives.
    pub(super) fn tail_read(&self) -> (u64, flume::Receiver<store::Loaded>) {
        let token = self.next_tail_read.get() + 1;
        self.next_tail_read.set(token);
        let (tx, rx) = flume::bounded(1);
        self.tail_reads.borrow_mut().insert(token, tx);
        (token, rx)
    }

    /// Forgets a tail read that is no longer waited for.
    pub(super) fn tail_read_done(&self, token: u64) {
        self.tail_reads.borrow_mut().remove(&token);
    }
}

/// Takes shard `id`'s store and restores its engine from it. `None` with
/// `durability = "memory"`.
pub(super) fn attach(
    stores: &StoreBoot,
    id: usize,
    engine: &mut Engine,
    now_ms: u64,
) -> Option<ShardStore> {
    let (handle, recovered, sync) = stores
        .lock()
        .expect("store slots")
        .get_mut(id)
        .and_then(Option::take)?;
    let interval = handle.batch_interval;
    engine.enable_persistence(sync);
    engine.restore(now_ms, recovered);
    Some(ShardStore {
        handle,
        backlog: RefCell::new(VecDeque::new()),
        backlog_ops: Cell::new(0),
        feeder: RefCell::new(None),
        committed: Cell::new(0),
        submitted: Cell::new(0),
        sync,
        interval,
        waiters: RefCell::new(Vec::new()),
        tail_reads: RefCell::new(std::collections::HashMap::new()),
        next_tail_read: Cell::new(0),
    })
}

/// Hands batches to the writer thread, in order, waiting while its channel is
/// full. In `batched` durability it also takes them from the engine: once
/// the engine's epoch recorded something, at most once per commit interval
/// and only when the writer committed the batch before, so the epoch spans
/// the interval (and a slow commit) instead of one step.
pub(super) async fn feed_writer(shard: Rc<Shard>) {
    let store = shard.store.as_ref().expect("store on");
    let mut last_sent = rt::now();
    loop {
        if !store.sync {
            poll_fn(|cx| {
                if !store.backlog.borrow().is_empty()
                    || shard.engine.borrow().store_epoch_recorded()
                {
                    Poll::Ready(())
                } else {
                    *store.feeder.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            if store.backlog.borrow().is_empty() {
                let due = last_sent + store.interval;
                let now = rt::now();
                if due > now {
                    rt::sleep(due - now).await;
                }
                let submitted = store.submitted();
                poll_fn(|cx| poll_committed(&shard, submitted, cx)).await;
                store.take_batch_now(&mut shard.engine.borrow_mut());
            }
        }
        let batch = poll_fn(|cx| match store.backlog.borrow_mut().pop_front() {
            Some(b) => {
                store.backlog_ops.set(store.backlog_ops.get() - b.ops.len());
                Poll::Ready(b)
            }
            None => {
                *store.feeder.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        last_sent = rt::now();
        if store.handle.batches.send_async(batch).await.is_err() {
            error!(
                shard = shard.id,
                path = %store.handle.path.display(),
                "store writer thread is gone; nothing more is committed"
            );
            return;
        }
    }
}

/// Applies commits reported by the writer thread: the engine releases mesh
/// acknowledgements, and connection writers waiting for them resume.
pub(super) async fn receive_commits(shard: Rc<Shard>) {
    let store = shard.store.as_ref().expect("store on");
    while let Ok(first) = store.handle.committed.recv_async().await {
        let mut epoch = first.epoch;
        let mut loaded = first.loaded;
        while let Ok(more) = store.handle.committed.try_recv() {
            epoch = epoch.max(more.epoch);
            loaded.extend(more.loaded);
        }
        store.committed.set(epoch);
        {
            let mut engine = shard.engine.borrow_mut();
            engine.store_committed(epoch);
            // Disk tails read back: their sessions send what their windows allow.
            let now = super::now_ms();
            for l in loaded {
                if Engine::is_tail_read(&l) {
                    let token = l.session & !tessera_shard::engine::TAIL_READ_TAG;
                    if let Some(tx) = store.tail_reads.borrow_mut().remove(&token) {
                        let _ = tx.try_send(l);
                    }
                } else {
                    engine.queue_loaded(now, l);
                }
            }
        }
        shard.flush_outbox();
        for w in store.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

/// Ready once `epoch` is committed (at once without a store); otherwise
/// registers the task to be woken at the next commit. A poll, not a future,
/// because the connection task waits on it together with its socket.
pub(super) fn poll_committed(shard: &Shard, epoch: u64, cx: &mut Context<'_>) -> Poll<()> {
    let Some(store) = &shard.store else {
        return Poll::Ready(());
    };
    if store.committed.get() >= epoch {
        Poll::Ready(())
    } else {
        // A busy connection is polled again on every read before the commit
        // arrives; one waker per task is enough.
        let mut waiters = store.waiters.borrow_mut();
        if !waiters.last().is_some_and(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Waits until everything this shard submitted so far is committed (at once without a
/// store); false after `timeout`.
pub(super) async fn all_committed(shard: &Shard, timeout: Duration) -> bool {
    let Some(store) = &shard.store else {
        return true;
    };
    shard.flush_outbox();
    store.take_batch_now(&mut shard.engine.borrow_mut());
    let epoch = store.submitted();
    let wait = async {
        poll_fn(|cx| poll_committed(shard, epoch, cx)).await;
        true
    };
    let expire = async {
        rt::sleep(timeout).await;
        false
    };
    futures_lite::future::or(wait, expire).await
}

/// At shutdown: submits the last batch and waits (at most `timeout`) until
/// everything submitted is committed; then the writer thread stops when the
/// shard's channel closes.
pub(super) async fn drain(shard: &Shard, timeout: Duration) {
    let Some(store) = &shard.store else {
        return;
    };
    shard.flush_outbox();
    store.take_batch_now(&mut shard.engine.borrow_mut());
    let deadline = rt::now() + timeout;
    while store.committed.get() < store.submitted.get() {
        if rt::now() >= deadline {
            warn!(
                shard = shard.id,
                path = %store.handle.path.display(),
                "store: shutdown before the last commit finished"
            );
            return;
        }
        rt::sleep(Duration::from_millis(5)).await;
    }
}
