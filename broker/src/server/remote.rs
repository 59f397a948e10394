//! A shard's side of the forwarder (`crate::forward`, issue 15): the engine's outbox
//! for the remote id goes to the forwarder, what the forwarder sends comes back as
//! messages from the remote id, and publications other nodes send are handed to the
//! engine (`MeshMsg::Forwarded`). A batch is complete once the engine reports what it
//! delivered committed on every local shard that stored a copy (`sync` durability) and
//! the congested sessions it reached released it (back-pressure); [`answer_forwarded`]
//! notices that after each flush. A batch complete by the end of its handling is
//! answered *accepted*; one that is not is answered *received* at once, so the next
//! batch of its sender comes in meanwhile, and its sender's *done* request for it is
//! answered once it is complete (`forward::wire`, "Answers in two steps").
//!
//! Only with `[cluster]`: the engine's remote id is enabled at boot and two tasks run
//! (the writer and the reader below); a single node has neither.

use std::cell::RefCell;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use futures_lite::future::poll_fn;
use tessera_shard::engine::FORWARD_PACE_SLICE;
use tessera_shard::mesh::{MeshMsg, ShardId};
use tracing::{debug, warn};

use super::mesh::Envelope;
use super::rt;
use super::{MESH_ENVELOPE_MESSAGES_MAX, Shard, now_ms, now_us};
use crate::cluster::peer::PeerRequest;
use crate::forward::{self, Accepted, BarrierAsk, Clocks, FromShard, Incoming, ShardEnd};

/// The broker's clocks, for the forwarder.
pub(crate) const CLOCKS: Clocks = Clocks { now_ms, now_us };

/// A shard's forwarder state.
#[derive(Debug)]
pub(crate) struct ShardRemote {
    /// The engine's remote id (`shard_count`).
    pub(crate) id: ShardId,
    end: ShardEnd,
    /// Batches accepted per sending node (retries are answered, not delivered again).
    accepted: RefCell<Accepted>,
    /// Batches handed to the engine whose answer waits for commits (`sync`
    /// durability): the engine's token, the sending node and batch, the answer,
    /// and where it goes (a retry that arrived meanwhile waits too).
    waiting: RefCell<Vec<Waiting>>,
}

/// A forwarded batch that is not complete yet: the engine's token, the sending node,
/// its incarnation and the batch's number, the answer (accepted) and who waits for it
/// (the batch's own request until it is answered received, then done requests).
#[derive(Debug)]
struct Waiting {
    token: u64,
    node: u64,
    incarnation: u64,
    seq: u64,
    answer: bytes::Bytes,
    replies: Vec<flume::Sender<Result<bytes::Bytes, String>>>,
}

impl ShardRemote {
    pub(crate) fn new(id: ShardId, end: ShardEnd) -> ShardRemote {
        ShardRemote {
            id,
            end,
            accepted: RefCell::new(Accepted::default()),
            waiting: RefCell::new(Vec::new()),
        }
    }
}

/// Starts the writer and the reader of the shard's remote id.
pub(super) fn spawn(shard: &Rc<Shard>) {
    if shard.remote.is_some() {
        rt::spawn_local(writer(shard.clone()));
        rt::spawn_local(reader(shard.clone()));
    }
}

/// Sends the engine's batches for the remote id to the forwarder, coalesced. A full
/// channel makes this task wait; the batches wait in the shard's queue for it, and the
/// connection readers pause when it grows (as for a slow peer shard).
async fn writer(shard: Rc<Shard>) {
    let Some(remote) = &shard.remote else { return };
    let peer = usize::from(remote.id);
    // First of all, what the restored sessions subscribe to: the forwarder keeps the
    // node's routes in the log that they need and removes the others.
    let filters = shard.engine.borrow().subscribed_filters();
    let report = FromShard::restored(shard.id as ShardId, &filters);
    if remote.end.to_forwarder.send_async(report).await.is_err() {
        debug!(shard = shard.id, "forwarder channel closed");
        return;
    }
    loop {
        let msgs = poll_fn(|cx| {
            let mut out = shard.mesh_out.borrow_mut();
            let mut batch: Vec<MeshMsg> = Vec::new();
            while batch.len() < MESH_ENVELOPE_MESSAGES_MAX
                && let Some(Envelope::Batch(_)) = out[peer].front()
            {
                if let Some(Envelope::Batch(more)) = out[peer].pop_front() {
                    if batch.is_empty() {
                        batch = more;
                    } else {
                        batch.extend(more);
                    }
                }
            }
            if batch.is_empty() {
                shard.mesh_wakers.borrow_mut()[peer] = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(batch)
            }
        })
        .await;
        let msg = FromShard {
            shard: shard.id as ShardId,
            msgs,
            restored: None,
            peer_shares: None,
        };
        if remote.end.to_forwarder.send_async(msg).await.is_err() {
            debug!(shard = shard.id, "forwarder channel closed");
            return;
        }
    }
}

/// Hands what the forwarder sends to the engine, as from the remote id.
async fn reader(shard: Rc<Shard>) {
    let Some(remote) = &shard.remote else { return };
    while let Ok(batch) = remote.end.from_forwarder.recv_async().await {
        let now = now_ms();
        {
            let mut engine = shard.engine.borrow_mut();
            engine.set_now_us(now_us());
            for msg in batch {
                engine.handle_mesh(now, remote.id, msg);
            }
        }
        shard.flush_outbox();
        futures_lite::future::yield_now().await;
    }
}

/// A `Publish` request from another node (`cluster::peer`): a batch of publications to
/// deliver, or a barrier. A batch is handed to the engine in slices, each after the
/// subscribers here that the QoS 0 messages before it found behind caught up (or
/// `cluster.forward_pace_ms_max` passed: [`pace`]).
pub(super) async fn on_request(shard: &Rc<Shard>, req: PeerRequest) {
    let Some(remote) = &shard.remote else {
        let _ = req
            .reply
            .send(Err("this node forwards no publications".into()));
        return;
    };
    let levels = shard.engine.borrow().limits().topic_levels_max;
    let decoded = forward::serve_request(
        &mut remote.accepted.borrow_mut(),
        remote.id,
        req.from,
        req.envelope.body,
        levels,
        CLOCKS,
        &remote.end.metrics,
        remote
            .end
            .own_routes_from
            .load(std::sync::atomic::Ordering::SeqCst),
    );
    match decoded {
        Err(e) => {
            warn!(
                shard = shard.id,
                node = req.from,
                "refused a forwarded batch: {e}"
            );
            let _ = req.reply.send(Err(e.to_string()));
        }
        Ok(Incoming::Duplicate {
            answer,
            incarnation,
            seq,
        }) => {
            let waits = remote
                .waiting
                .borrow()
                .iter()
                .any(|w| w.node == req.from && w.incarnation == incarnation && w.seq == seq);
            let answer = if waits {
                forward::wire::encode_answer(forward::wire::Answer::Received { seq })
            } else {
                answer
            };
            let _ = req.reply.send(Ok(answer));
        }
        Ok(Incoming::Done {
            incarnation,
            seq,
            known,
            answer,
        }) => {
            let mut waiting = remote.waiting.borrow_mut();
            match waiting
                .iter_mut()
                .find(|w| w.node == req.from && w.incarnation == incarnation && w.seq == seq)
            {
                Some(w) => w.replies.push(req.reply),
                None if known => {
                    let _ = req.reply.send(Ok(answer));
                }
                None => {
                    let unknown = forward::wire::Answer::Unknown { seq };
                    let _ = req.reply.send(Ok(forward::wire::encode_answer(unknown)));
                }
            }
        }
        Ok(Incoming::Deliver {
            messages,
            answer,
            incarnation,
            seq,
        }) => {
            let token = shard.engine.borrow_mut().begin_forward_batch();
            let mut messages = messages.into_iter();
            while messages.len() > 0 {
                pace(shard).await;
                {
                    let now = now_ms();
                    let mut engine = shard.engine.borrow_mut();
                    engine.set_now_us(now_us());
                    for m in messages.by_ref().take(FORWARD_PACE_SLICE) {
                        engine.handle_mesh(now, remote.id, m);
                    }
                }
                if messages.len() > 0 {
                    // The subscribers' connections write out this slice, and other
                    // shards get their copies, before the next one.
                    shard.flush_outbox();
                    futures_lite::future::yield_now().await;
                }
            }
            if let Some(t) = token {
                shard.engine.borrow_mut().end_forward_batch(t);
            }
            match token {
                // Answered accepted in `answer_forwarded` once it is complete.
                Some(token) => {
                    remote.waiting.borrow_mut().push(Waiting {
                        token,
                        node: req.from,
                        incarnation,
                        seq,
                        answer,
                        replies: vec![req.reply],
                    });
                    shard.flush_outbox();
                    // Not complete by now (a commit to wait for, a congested
                    // subscriber): received, so the sender goes on with its next batch.
                    let mut waiting = remote.waiting.borrow_mut();
                    if let Some(w) = waiting.iter_mut().find(|w| w.token == token) {
                        let received = forward::wire::Answer::Received { seq };
                        let received = forward::wire::encode_answer(received);
                        for reply in w.replies.drain(..) {
                            let _ = reply.send(Ok(received.clone()));
                        }
                    }
                }
                None => {
                    let _ = req.reply.send(Ok(answer));
                    shard.flush_outbox();
                }
            }
        }
        Ok(Incoming::Shares { counts, answer }) => {
            let msg = FromShard {
                shard: shard.id as ShardId,
                msgs: Vec::new(),
                restored: None,
                peer_shares: Some((req.from, counts)),
            };
            let to_forwarder = remote.end.to_forwarder.clone();
            let peer_reply = req.reply;
            rt::spawn_local(async move {
                let taken = to_forwarder.send_async(msg).await.is_ok();
                let _ = peer_reply.send(if taken {
                    Ok(answer)
                } else {
                    Err("this node's forwarder has stopped".to_owned())
                });
            });
        }
        Ok(Incoming::Barrier { index, answer }) => {
            let (reply, done) = flume::bounded(1);
            let barriers = remote.end.barriers.clone();
            let peer_reply = req.reply;
            let metrics = remote.end.metrics.clone();
            rt::spawn_local(async move {
                let asked = barriers.send_async(BarrierAsk { index, reply }).await;
                let ok = asked.is_ok()
                    && futures_lite::future::or(async { done.recv_async().await.is_ok() }, async {
                        rt::sleep(forward::BARRIER_TIMEOUT).await;
                        false
                    })
                    .await;
                if ok {
                    metrics
                        .barriers
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = peer_reply.send(if ok {
                    Ok(answer)
                } else {
                    Err(format!(
                        "routes up to index {index} not in force here in time"
                    ))
                });
            });
        }
    }
}

/// Waits until every subscriber of this shard that a QoS 0 delivery of a forwarded batch
/// found behind caught up, at most `cluster.forward_pace_ms_max`; one still behind then
/// is not waited for during the next second (`tessera_shard::engine` module `pace`).
async fn pace(shard: &Shard) {
    let bound = shard.engine.borrow().limits().forward_pace_ms_max;
    let mut counted = false;
    let caught_up = poll_fn(|cx| {
        let mut engine = shard.engine.borrow_mut();
        if engine.forward_pace_poll(cx.waker()) {
            return Poll::Ready(true);
        }
        if !counted {
            counted = true;
            engine.record_forward_paced();
        }
        Poll::Pending
    });
    let expired = async {
        rt::sleep(Duration::from_millis(bound)).await;
        false
    };
    if !futures_lite::future::or(caught_up, expired).await {
        shard.engine.borrow_mut().forward_pace_expired(now_ms());
    }
}

/// Answers the forwarded batches whose deliveries the engine reports committed
/// (called after each flush of the outbox: commits and mesh acknowledgements
/// arrive before one).
pub(super) fn answer_forwarded(shard: &Shard) {
    let Some(remote) = &shard.remote else { return };
    let done = {
        let mut engine = shard.engine.borrow_mut();
        if !engine.has_forwards_done() {
            return;
        }
        engine.take_forwards_done()
    };
    let mut waiting = remote.waiting.borrow_mut();
    for token in done {
        if let Some(i) = waiting.iter().position(|w| w.token == token) {
            let w = waiting.swap_remove(i);
            for reply in w.replies {
                let _ = reply.send(Ok(w.answer.clone()));
            }
        }
    }
}

/// Another node fetches a retained message too large for the log that this node keeps
/// (`PeerKind::Retained`, keyed by the topic). Body: `index u64 | size u32 | digest u128`
/// as the log's reference names it; answered with the message as one retained record
/// only if this shard's replica holds that very message (its digest matches).
pub(super) fn on_retained_fetch(shard: &Shard, req: PeerRequest) {
    let answer = retained_answer(shard, &req);
    if let Err(e) = &answer {
        debug!(shard = shard.id, from = req.from, topic = %req.envelope.key, "retained fetch refused: {e}");
    }
    let _ = req.reply.send(answer);
}

fn retained_answer(shard: &Shard, req: &PeerRequest) -> Result<bytes::Bytes, String> {
    let body = &req.envelope.body;
    if body.len() != 28 || req.envelope.key.is_empty() {
        return Err(format!("malformed retained fetch ({} bytes)", body.len()));
    }
    let digest = u128::from_be_bytes(body[12..28].try_into().map_err(|_| "short digest")?);
    let message = shard
        .engine
        .borrow()
        .retained_message(&req.envelope.key)
        .ok_or_else(|| "no retained message for this topic here".to_owned())?;
    if forward::wire::retained_digest(&message) != digest {
        return Err("the retained message here is not the one asked for (it changed)".into());
    }
    let publisher = message.origin.map_or(0, |u| u.0);
    Ok(forward::wire::retained_record(
        now_ms(),
        publisher,
        &message,
    ))
}
