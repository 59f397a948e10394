//! The mesh transport between the shards of this node: what travels
//! ([`Envelope`]: engine message batches and connection hand-offs), the
//! per-peer queues a shard fills from its engine's outbox
//! ([`Shard::flush_outbox`]), the writer task per peer that coalesces batches,
//! and what a shard does with what it receives.

use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use futures_lite::future::poll_fn;
use tessera_shard::handoff::Handoff;
use tessera_shard::mesh::{MeshMsg, ShardId};
use tracing::debug;

use super::rt;
use super::serve::serve;
use super::{Accepted, MESH_ENVELOPE_MESSAGES_MAX, Shard, now_ms, now_us};
use crate::transport::Transport;

/// What travels between shards.
#[derive(Debug)]
pub(super) enum Envelope {
    /// Engine messages, in order.
    Batch(Vec<MeshMsg>),
    /// A connection whose ClientID the receiver owns. Boxed: a CONNECT is
    /// large, and every batch would otherwise take its size.
    Handoff(Box<Handoff<Accepted>>),
    /// A connection without a socket (QUIC: its pipe to the endpoint thread)
    /// whose ClientID the receiver owns.
    Moved(Box<super::accept::Moved>),
}

impl Shard {
    /// Moves what the engine produced for other shards into the peer queues,
    /// and what it produced for the store into the writer's queue.
    pub(super) fn flush_outbox(&self) {
        if let Some(store) = &self.store {
            store.take_batch(&mut self.engine.borrow_mut());
        }
        if self.remote.is_some() {
            super::remote::answer_forwarded(self);
        }
        let mut engine = self.engine.borrow_mut();
        if !engine.has_outbox() {
            return;
        }
        let mut out = self.mesh_out.borrow_mut();
        let mut wakers = self.mesh_wakers.borrow_mut();
        engine.drain_outbox(|to, batch| {
            let to = usize::from(to);
            out[to].push_back(Envelope::Batch(batch));
            if let Some(w) = wakers[to].take() {
                w.wake();
            }
        });
    }

    pub(super) fn send_envelope(&self, to: usize, env: Envelope) {
        self.mesh_out.borrow_mut()[to].push_back(env);
        if let Some(w) = self.mesh_wakers.borrow_mut()[to].take() {
            w.wake();
        }
    }
}

fn on_envelope(shard: &Rc<Shard>, from: usize, env: Envelope) {
    match env {
        Envelope::Batch(batch) => {
            let now = now_ms();
            {
                let mut engine = shard.engine.borrow_mut();
                engine.set_now_us(now_us());
                for msg in batch {
                    engine.handle_mesh(now, from as ShardId, msg);
                }
            }
            shard.flush_outbox();
        }
        Envelope::Handoff(h) => {
            let (stream, already_read, accepted) = h.into_stream(shard.id);
            let transport = Transport::from_parts(stream, accepted.transport);
            glommio::spawn_local(serve(
                shard.clone(),
                transport,
                already_read,
                accepted.connect,
                accepted.assigned,
                accepted.listener,
                accepted.admission,
            ))
            .detach();
        }
        Envelope::Moved(m) => {
            glommio::spawn_local(serve(
                shard.clone(),
                Transport::quic(m.pipe),
                m.already_read,
                m.connect,
                m.assigned,
                m.listener,
                m.admission,
            ))
            .detach();
        }
    }
}

/// While a QoS 0 publication `peer` sent is queued at a bridge's session that
/// is behind, waits until the session caught up or its bound passed
/// (`tessera_shard::engine` module `feed_pace`): the peer's queue to this
/// shard then fills and its readers pause, which slows its publishers.
pub(super) async fn feed_pace(shard: &Shard, peer: usize) {
    let peer_id = peer as ShardId;
    loop {
        let Some(at_ms) = shard.engine.borrow().feed_pace_peer_deadline(peer_id) else {
            return;
        };
        let released = poll_fn(|cx| {
            if shard
                .engine
                .borrow_mut()
                .feed_pace_peer_poll(peer_id, cx.waker())
            {
                Poll::Ready(true)
            } else {
                Poll::Pending
            }
        });
        let expired = async {
            rt::sleep(Duration::from_millis(at_ms.saturating_sub(now_ms()))).await;
            false
        };
        if !futures_lite::future::or(released, expired).await {
            shard.engine.borrow_mut().feed_pace_expire(now_ms());
            shard.flush_outbox();
        }
    }
}

/// Sends this shard's queued envelopes to `peer`, coalescing batches.
pub(super) async fn mesh_writer(shard: Rc<Shard>, peer: usize) {
    loop {
        let env = next_envelope(&shard, peer).await;
        let Some(senders) = &shard.senders else {
            return;
        };
        if senders.send_to(peer, env).await.is_err() {
            debug!(shard = shard.id, peer, "peer channel closed");
            return;
        }
    }
}

/// The next envelope of this shard's queue for `peer`, consecutive batches coalesced up
/// to `MESH_ENVELOPE_MESSAGES_MAX` messages (waits while the queue is empty). The
/// writer's half that knows nothing of the channel: the data-plane simulation's shard
/// mesh (`sim`) takes its envelopes here too.
pub(super) async fn next_envelope(shard: &Shard, peer: usize) -> Envelope {
    poll_fn(|cx| {
        let mut out = shard.mesh_out.borrow_mut();
        let Some(first) = out[peer].pop_front() else {
            shard.mesh_wakers.borrow_mut()[peer] = Some(cx.waker().clone());
            return Poll::Pending;
        };
        let Envelope::Batch(mut batch) = first else {
            return Poll::Ready(first);
        };
        while batch.len() < MESH_ENVELOPE_MESSAGES_MAX
            && let Some(Envelope::Batch(_)) = out[peer].front()
        {
            if let Some(Envelope::Batch(more)) = out[peer].pop_front() {
                batch.extend(more);
            }
        }
        Poll::Ready(Envelope::Batch(batch))
    })
    .await
}

/// What a shard does with each envelope its stream from `peer` brings, in order, before
/// it takes the next one (the receive loop of `shard_main`; the simulation's too).
pub(super) async fn received(shard: &Rc<Shard>, peer: usize, env: Envelope) {
    on_envelope(shard, peer, env);
    // A QoS 0 publication of this peer found a bridge behind: its stream waits
    // (bounded), so its readers pause.
    feed_pace(shard, peer).await;
    // As in `conn::run`: a receive from a busy peer completes at once, and without
    // yielding, the writers of the subscribers these batches feed would starve (and
    // their queues overflow).
    futures_lite::future::yield_now().await;
}
