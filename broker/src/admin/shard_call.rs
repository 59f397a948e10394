//! The admin thread's messages to the shards (`*_frontend` side: callable from
//! the admin thread, answered by the owner shard) and the shard-side handler.
//!
//! Each shard has one bounded flume channel of [`ShardCall`]s
//! ([`SHARD_QUEUE_MAX`]); a glommio task on the shard awaits it with
//! `recv_async` (flume wakes glommio from another thread), answers between
//! packets with the engine's admin methods, and sends the [`Answer`] back on
//! the call's own one-slot channel. The admin thread never touches shard state
//! and waits at most [`CALL_TIMEOUT`] per call, so a stuck or dead shard costs
//! a 503, never a hung request. Nothing here runs on the hot path.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tessera_shard::admin::{
    Page, RetainedFilter, RetainedInfo, SessionDetail, SessionFilter, SessionInfo, ShardGauges,
    SubscriptionFilter, SubscriptionInfo,
};
use tessera_shard::engine::{Engine, Stats};
use tessera_shard::probe::ProbeSnapshot;

/// Calls queued per shard; the admin thread waits (up to the timeout) when
/// a shard's queue is full.
pub const SHARD_QUEUE_MAX: usize = 16;

/// How long the admin thread waits for a shard to take and answer one call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// What the admin thread asks a shard.
#[derive(Debug, Clone)]
pub enum Query {
    /// Counters, probe and gauges, for `/metrics` and `/api/v1/status`.
    Snapshot,
    /// A page of sessions.
    Sessions(SessionFilter),
    /// One session in detail.
    Session(String),
    /// Disconnect a client, with an optional reason text.
    Kick {
        /// The ClientID.
        client_id: String,
        /// Sent to v5 clients as the DISCONNECT Reason String.
        reason: Option<String>,
    },
    /// End a session now.
    Expire(String),
    /// A page of subscriptions.
    Subscriptions(SubscriptionFilter),
    /// A page of retained messages.
    Retained(RetainedFilter),
    /// One retained message.
    RetainedGet(String),
    /// Clear one retained message on every shard.
    RetainedDelete(String),
}

/// A shard's answer.
#[derive(Debug)]
pub enum Answer {
    /// For [`Query::Snapshot`].
    Snapshot(Box<ShardSnapshot>),
    /// For [`Query::Sessions`].
    Sessions(Page<SessionInfo>),
    /// For [`Query::Session`].
    Session(Option<Box<SessionDetail>>),
    /// For the actions: whether the target existed.
    Done(bool),
    /// For [`Query::Subscriptions`].
    Subscriptions(Page<SubscriptionInfo>),
    /// For [`Query::Retained`].
    Retained(Page<RetainedInfo>),
    /// For [`Query::RetainedGet`].
    RetainedOne(Option<RetainedInfo>),
}

/// One shard's metrics at one instant.
#[derive(Debug, Clone, Default)]
pub struct ShardSnapshot {
    /// The engine's counters.
    pub stats: Stats,
    /// The probe's counters and histogram buckets.
    pub probe: ProbeSnapshot,
    /// Gauges walked from the shard's state.
    pub gauges: ShardGauges,
    /// Open client sockets on the shard, those before CONNECT included.
    pub connections_current: usize,
    /// Connections served on the shard per listener (by listener id).
    pub listener_connections: Vec<usize>,
}

/// A query and where to answer it.
#[derive(Debug)]
pub struct ShardCall {
    /// The query.
    pub query: Query,
    /// Where the answer goes (a one-slot channel the admin thread waits on).
    pub reply: flume::Sender<Answer>,
}

/// What the driver knows about a shard that the engine does not.
#[derive(Debug, Clone)]
pub struct DriverView {
    /// Open client sockets, those before CONNECT included.
    pub connections_current: usize,
    /// Connections served per listener (by listener id).
    pub listener_connections: Vec<usize>,
}

impl ShardCall {
    /// Answers the call on the shard's thread. The caller flushes the
    /// engine's mesh outbox afterwards (kicks and deletes produce messages).
    pub fn answer(self, engine: &mut Engine, now_ms: u64, view: DriverView) {
        let answer = match self.query {
            Query::Snapshot => Answer::Snapshot(Box::new(ShardSnapshot {
                stats: engine.stats().clone(),
                probe: engine.probe().snapshot(),
                gauges: engine.gauges(),
                connections_current: view.connections_current,
                listener_connections: view.listener_connections,
            })),
            Query::Sessions(f) => Answer::Sessions(engine.admin_sessions(now_ms, &f)),
            Query::Session(id) => Answer::Session(engine.admin_session(now_ms, &id).map(Box::new)),
            Query::Kick { client_id, reason } => {
                Answer::Done(engine.admin_kick(now_ms, &client_id, reason.as_deref()))
            }
            Query::Expire(id) => Answer::Done(engine.admin_expire_session(now_ms, &id)),
            Query::Subscriptions(f) => Answer::Subscriptions(engine.admin_subscriptions(&f)),
            Query::Retained(f) => Answer::Retained(engine.admin_retained(now_ms, &f)),
            Query::RetainedGet(t) => Answer::RetainedOne(engine.admin_retained_get(now_ms, &t)),
            Query::RetainedDelete(t) => Answer::Done(engine.admin_retained_delete(now_ms, &t)),
        };
        // The admin thread may have given up waiting: nothing to do then.
        let _ = self.reply.send(answer);
    }
}

/// Liveness of one shard, written by the shard's thread at start and exit,
/// read by the admin thread (not on the hot path).
#[derive(Debug, Default)]
pub struct ShardStatus {
    /// The shard's executor runs and serves.
    pub up: AtomicBool,
    /// The shard finished recovering its state and listens. Persistence
    /// (recovery from the shard's store) sets it when recovery completes;
    /// until then `/ready` answers 503.
    pub recovered: AtomicBool,
}

/// Clears a shard's `up` flag when dropped: at the end of `shard_main`, and
/// while unwinding if the shard panics, so `/ready` and `tessera_shard_up`
/// see a dead shard.
#[derive(Debug)]
pub struct ShardUpGuard(pub Arc<ShardStatus>);

impl Drop for ShardUpGuard {
    fn drop(&mut self) {
        self.0.up.store(false, Ordering::SeqCst);
    }
}

/// The admin thread's ends of the shard channels, indexed by shard id.
#[derive(Debug, Clone)]
pub struct ShardLinks {
    /// Senders to each shard's admin task.
    pub senders: Vec<flume::Sender<ShardCall>>,
    /// Each shard's liveness.
    pub status: Vec<Arc<ShardStatus>>,
}

/// The shards' ends: each shard takes the receiver of its own id.
#[derive(Debug, Clone)]
pub struct ShardEnds {
    /// Receivers, indexed by shard id.
    pub receivers: Vec<flume::Receiver<ShardCall>>,
    /// Each shard's liveness.
    pub status: Vec<Arc<ShardStatus>>,
}

/// Channels and status flags for `shard_count` shards.
pub fn links(shard_count: usize) -> (ShardLinks, ShardEnds) {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shard_count)
        .map(|_| flume::bounded(SHARD_QUEUE_MAX))
        .unzip();
    let status: Vec<Arc<ShardStatus>> = (0..shard_count)
        .map(|_| Arc::new(ShardStatus::default()))
        .collect();
    (
        ShardLinks {
            senders,
            status: status.clone(),
        },
        ShardEnds { receivers, status },
    )
}

/// Why a shard did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The shard's executor is gone.
    #[error("shard {0} is not running")]
    ShardDown(usize),
    /// No answer within [`CALL_TIMEOUT`].
    #[error("shard {0} did not answer within {timeout:?}", timeout = CALL_TIMEOUT)]
    Timeout(usize),
}

impl ShardLinks {
    /// Shards.
    pub fn shard_count(&self) -> usize {
        self.senders.len()
    }

    /// Sends `query` to `shard` and returns the receiver of its answer.
    fn send(&self, shard: usize, query: Query) -> Result<flume::Receiver<Answer>, CallError> {
        let (tx, rx) = flume::bounded(1);
        let call = ShardCall { query, reply: tx };
        match self.senders[shard].send_timeout(call, CALL_TIMEOUT) {
            Ok(()) => Ok(rx),
            Err(flume::SendTimeoutError::Timeout(_)) => Err(CallError::Timeout(shard)),
            Err(flume::SendTimeoutError::Disconnected(_)) => Err(CallError::ShardDown(shard)),
        }
    }

    fn wait(shard: usize, rx: &flume::Receiver<Answer>) -> Result<Answer, CallError> {
        rx.recv_timeout(CALL_TIMEOUT).map_err(|e| match e {
            flume::RecvTimeoutError::Timeout => CallError::Timeout(shard),
            flume::RecvTimeoutError::Disconnected => CallError::ShardDown(shard),
        })
    }

    /// Asks one shard and waits for its answer.
    pub fn call(&self, shard: usize, query: Query) -> Result<Answer, CallError> {
        let rx = self.send(shard, query)?;
        Self::wait(shard, &rx)
    }

    /// Asks every shard at once, then collects the answers in shard order.
    pub fn call_all(&self, query: &Query) -> Vec<Result<Answer, CallError>> {
        let pending: Vec<_> = (0..self.shard_count())
            .map(|k| self.send(k, query.clone()))
            .collect();
        pending
            .into_iter()
            .enumerate()
            .map(|(k, rx)| rx.and_then(|rx| Self::wait(k, &rx)))
            .collect()
    }
}
