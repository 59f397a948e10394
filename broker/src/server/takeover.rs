//! Cross-node takeover (issue 15): the session moves from its old owner node to the
//! node whose claim just committed, over the link's Forward channel
//! (`PeerKind::Session`, keyed by the ClientID so the owner shard serves it), in two
//! phases so that no crash in between loses it.
//!
//! The new owner ([`fetch`]), between its committed claim and its CONNACK:
//! 1. asks the old owner for the session (`FETCH`, with the claim's epoch and whether
//!    the CONNECT starts clean). The old owner ([`serve`]) checks the epoch against its
//!    own committed table (waiting until it has applied the claim's entry: the epoch's
//!    high bits are its log index), so a stale or forged request is refused; then it
//!    ends the live connection (v5 DISCONNECT 0x8E, the will as the spec says for a
//!    takeover) and either drops the session (clean start: a delayed will is published
//!    now) or exports it. The export leaves its memory and routes, but its store
//!    records stay and the export is kept as a *moving copy*;
//! 2. takes the export in and reads the old owner's disk tail of the queue in chunks
//!    (`TAIL`, at most [`TAIL_CHUNK_COUNT`] deliveries or about [`TAIL_CHUNK_BYTES`]
//!    each), appending each to the session (beyond its head, onto its own disk). If
//!    the old owner stops answering meanwhile and the claim waits for it
//!    (`cluster.wait_for_session_owner`), the take-in is given up, nothing of it left
//!    here, and the CONNECT refused as below (kill -9 scenario, CHAOS_SEED=131556);
//! 3. waits until its store committed all of it, then confirms (`DONE`): only then
//!    does the old owner delete its copy and records. Then the engine answers CONNACK
//!    with session present.
//!
//! If the new owner dies before confirming, the old owner still has the session. A
//! later claim (by any node, the old owner included) whose fetch from the previous
//! owner fails or finds no session looks for a moving copy: its own first
//! (`Engine::resume_moving`), then on every other member (the same `FETCH`, fenced the
//! same way), and takes it from there. Copies nobody confirms are dropped when the
//! session would have expired (`claims::tick`).
//!
//! A copy handed to a claim at or below the epoch at which the ClientID last started a
//! session afresh (the committed owner record's `fresh`, `claims::settle`) is stale: it
//! is dropped, never resumed or handed out ([`drop_stale_copy`]), since the client was
//! told after it that its session was gone (data-plane simulation, seed 46).
//!
//! Request body: `op u8 | epoch u64 BE | ...`:
//! - `FETCH | clean_start u8`: answer `0` (no session), `1 | TransferRec`, or (cluster
//!   protocol 3) `2 | len u32 BE | TransferRec of len bytes | window`: the window lets
//!   the new owner tell copies of publications the session already got here
//!   (`tessera_shard::engine` module `moved`);
//! - `TAIL | from_seq u64 BE | count_max u32 BE`: answer a `TransferTailRec`;
//! - `DONE`: answer `1` once the copy is deleted.
//! - (cluster protocol 5) `INBOUND | packet_id u16 BE | origin u64 BE | shard u16 BE |
//!   seq u64 BE`: about an inbound QoS 2 publication of the session handed over while
//!   its forward still waited (`tessera_shard::engine` module `handed_qos2`): answer
//!   `1` (its forward is complete), `0` (unknown here: this process never handed it
//!   out, or forgot it long after it was done), or `2` (still waiting, after at most
//!   [`INBOUND_WAIT`]; ask again). The epoch is not checked: the answer is about one
//!   publication, not the session.
//!
//! A `FETCH` answer `4 | node u64 BE` says the session is on that node, not here:
//! this node's claim waited for it there (`cluster.wait_for_session_owner`) when the
//! asker's claim replaced it; the asker fetches from that node instead (harness sim
//! seed 137). An older node answers such a case `0`, and takes `4` for malformed.
//!
//! A `FETCH` answer `3 | len u32 BE | TransferRec | wlen u32 BE | window | pending`
//! (cluster protocol 5) adds the inbound QoS 2 ids whose PUBREC still waits for an
//! original's forward, with the node that holds each: the new owner holds a re-sent
//! PUBLISH's PUBREC until that node answers `INBOUND` (data-plane simulation, seed 899).
//!
//! Everything a peer sends is validated (the engine decodes records like a corrupt
//! store's). An old owner that does not answer within [`FETCH_TIMEOUT`] keeps the
//! session: the claim is committed, and the CONNECT is refused until a later one
//! reaches it (`cluster.wait_for_session_owner`, the default; `claims::take_over`), or,
//! with that setting off, the client is served with a new session after the old
//! owner's lease (counted, logged).

use std::rc::Rc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tessera_proto::Connect;
use tessera_raft::NodeId;
use tessera_shard::engine::Engine;
use tessera_shard::session::delivery_cost;
use tracing::{debug, info, warn};

use super::cluster::ShardCluster;
use super::persist::{all_committed, unix_ms};
use super::{Shard, now_ms, rt};
use crate::cluster::metrics::SessionMetrics;
use crate::cluster::peer::{PeerKind, PeerRequest, encode_envelope};

/// Longest the new owner waits for one answer of the old owner.
pub(super) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the old owner waits to apply the claim a request names.
const APPLY_WAIT: Duration = Duration::from_secs(2);
/// Longest the new owner waits for its store to commit the session before confirming.
const COMMIT_WAIT: Duration = Duration::from_secs(10);
/// Longest a node waits for its store to read a chunk of a disk tail.
const READ_WAIT: Duration = Duration::from_secs(5);
/// Deliveries of a disk tail per chunk at most.
pub(super) const TAIL_CHUNK_COUNT: u32 = 512;
/// About this many budget bytes per chunk (at least one delivery), well below the
/// link's 16 MiB frame bound for the Forward channel.
const TAIL_CHUNK_BYTES: u64 = 4 << 20;
/// How many low bits of an epoch are the op's position in its entry.
const EPOCH_POSITION_BITS: u32 = 20;

/// The log index of the entry whose claim has `epoch`.
pub(super) fn claim_index(epoch: u64) -> u64 {
    epoch >> EPOCH_POSITION_BITS
}

const OP_FETCH: u8 = 0;
const OP_TAIL: u8 = 1;
const OP_DONE: u8 = 2;
const OP_INBOUND: u8 = 3;
/// Longest the old owner holds an `INBOUND` request whose original still waits.
const INBOUND_WAIT: Duration = Duration::from_secs(2);
/// How long the new owner waits before it asks an old owner that did not answer again.
const INBOUND_RETRY: Duration = Duration::from_secs(1);

/// The wall-clock time at engine time 0, for times that travel between nodes.
fn wall_base_ms() -> u64 {
    unix_ms().saturating_sub(now_ms())
}

fn body(op: u8, epoch: u64, rest: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(9 + rest.len());
    b.push(op);
    b.extend_from_slice(&epoch.to_be_bytes());
    b.extend_from_slice(rest);
    b
}

type Answer = flume::Receiver<Result<Bytes, tessera_raft::TransportError>>;

/// Sends a session request for `client_id` to `node`; the answer arrives on the
/// receiver.
fn start_call(
    cluster: &ShardCluster,
    node: NodeId,
    client_id: &str,
    body: &[u8],
) -> Result<Answer, String> {
    let request = encode_envelope(PeerKind::Session, client_id.as_bytes(), body);
    cluster
        .port
        .peers
        .call(node, request)
        .map_err(|e| e.to_string())
}

/// The answer of a call started with [`start_call`], or why not, by `deadline`.
async fn answer_by(rx: Answer, deadline: std::time::Instant) -> Result<Bytes, String> {
    let wait = async { Some(rx.recv_async().await) };
    let expire = async {
        rt::sleep(deadline.saturating_duration_since(rt::now())).await;
        None
    };
    match futures_lite::future::or(wait, expire).await {
        None => Err(format!("no answer within {FETCH_TIMEOUT:?}")),
        Some(Err(_)) => Err("the link dropped the call".into()),
        Some(Ok(Err(e))) => Err(e.to_string()),
        Some(Ok(Ok(bytes))) => Ok(bytes),
    }
}

/// Calls `node` with a session request for `client_id`; the answer or why not.
async fn call(
    cluster: &ShardCluster,
    node: NodeId,
    client_id: &str,
    body: &[u8],
) -> Result<Bytes, String> {
    let rx = start_call(cluster, node, client_id, body)?;
    answer_by(rx, rt::now() + FETCH_TIMEOUT).await
}

/// The members but this node and `except`.
fn other_members(cluster: &ShardCluster, except: NodeId) -> Vec<NodeId> {
    let me = cluster.port.node_id;
    cluster
        .handle()
        .members()
        .into_keys()
        .filter(|n| *n != me && *n != except)
        .collect()
}

/// Asks every member but this node and `except` the same request at once; their
/// answers in member order.
async fn ask_others(
    cluster: &ShardCluster,
    except: NodeId,
    client_id: &str,
    body: &[u8],
) -> Vec<(NodeId, Result<Bytes, String>)> {
    let calls: Vec<(NodeId, Result<Answer, String>)> = other_members(cluster, except)
        .into_iter()
        .map(|n| (n, start_call(cluster, n, client_id, body)))
        .collect();
    let deadline = rt::now() + FETCH_TIMEOUT;
    let mut out = Vec::with_capacity(calls.len());
    for (node, rx) in calls {
        let answer = match rx {
            Ok(rx) => answer_by(rx, deadline).await,
            Err(e) => Err(e),
        };
        out.push((node, answer));
    }
    out
}

/// What a takeover's fetch came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Fetched {
    /// The old owner answered (then its connection of the ClientID has ended).
    pub(super) answered: bool,
    /// A session was taken in here (from the old owner or a moving copy).
    pub(super) session: Option<Settled>,
    /// The node whose answer counted: the old owner, or the node it said it waited for
    /// the session on (answer `4`). A claim that must wait waits for this one.
    pub(super) asked: NodeId,
}

/// Whether every other copy of a session taken in is known gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settled {
    /// The node it came from confirmed it deleted its copy (or it was this node's
    /// own copy).
    Yes,
    /// Not confirmed: the node it came from may still keep a copy.
    No,
}

/// The new owner's side: fetch the session of `connect`'s ClientID from `old` and take
/// it in (unless the CONNECT starts clean, which only ends it there).
pub(super) async fn fetch(
    shard: &Rc<Shard>,
    cluster: &ShardCluster,
    connect: &Connect,
    epoch: u64,
    old: NodeId,
) -> Fetched {
    let client_id = connect.client_id.as_str();
    let request = body(OP_FETCH, epoch, &[u8::from(connect.clean_start)]);
    let mut old = old;
    let mut answer = call(cluster, old, client_id, &request).await;
    // The old owner's claim only waited for the session on another node: ask that one
    // (whose answer, or silence, is what counts).
    if let Ok(a) = &answer
        && let [4, node @ ..] = a.as_ref()
        && let Ok(node) = <[u8; 8]>::try_from(node).map(u64::from_be_bytes)
        && node == cluster.port.node_id
    {
        // It waited for this node, which holds the session (a moving copy parked when
        // the other claim was applied here, say after a pause): nothing to fetch there,
        // this node's own copy is taken back below as after "nothing here".
        answer = Ok(Bytes::from_static(&[0]));
    }
    if let Ok(a) = &answer
        && let [4, node @ ..] = a.as_ref()
        && let Ok(node) = <[u8; 8]>::try_from(node).map(u64::from_be_bytes)
    {
        debug!(
            shard = shard.id,
            client_id,
            old_owner = old,
            holder = node,
            "the old owner waited for the session on another node: asking that one"
        );
        old = node;
        answer = call(cluster, old, client_id, &request).await;
    }
    let mut answered = answer.is_ok();
    let mut session = None;
    if let Err(e) = &answer {
        debug!(
            shard = shard.id,
            client_id,
            old_owner = old,
            "session request failed: {e}"
        );
    }
    match answer.as_deref() {
        Ok(a @ [1..=3, ..]) if !connect.clean_start => match split_export(a) {
            Some(export) => match take_in(shard, cluster, client_id, epoch, old, export).await {
                Ok(s) => session = s,
                // As if `old` had not answered: the claim waits for it.
                Err(TailLost) => answered = false,
            },
            None => failed(shard, cluster, client_id, old, &"malformed answer"),
        },
        Ok([0]) | Err(_) if connect.clean_start => {
            // Clean Start ends the session cluster-wide: a moving copy left by a
            // hand-over nobody confirmed goes too (not waited for).
            let request = body(OP_FETCH, epoch, &[1]);
            for n in other_members(cluster, old) {
                let _ = start_call(cluster, n, client_id, &request);
            }
        }
        Ok([0]) | Err(_) if !connect.clean_start => {
            // The previous owner has nothing (it may have died before it confirmed a
            // move): a copy may still wait on the node the session came from.
            let silent;
            (session, silent) = recover_moving_copy(shard, cluster, client_id, epoch, old).await;
            // Nothing anywhere, but a member did not answer: with
            // `cluster.wait_for_session_owner` the session may be there (a chain of
            // claims that all waited for it, one link of which pointed back at this
            // node: pause scenario CHAOS_SEED=804188), so the claimant waits for that
            // member rather than start a new session.
            if session.is_none()
                && answered
                && let Some(node) = silent.filter(|n| cluster.waits_for(*n))
            {
                debug!(
                    shard = shard.id,
                    client_id,
                    old_owner = old,
                    silent = node,
                    "nothing at the old owner, and a member did not answer: waiting for it"
                );
                answered = false;
                old = node;
            }
            // With `cluster.wait_for_session_owner` the claimant waits for a member that
            // did not answer (`claims::take_over`): no new session, not a failure.
            if session.is_none()
                && !cluster.waits_for(old)
                && let Err(e) = answer
            {
                failed(shard, cluster, client_id, old, &e);
            }
        }
        Ok(_) => failed(shard, cluster, client_id, old, &"malformed answer"),
        Err(e) => failed(shard, cluster, client_id, old, &e),
    }
    shard.flush_outbox();
    Fetched {
        answered,
        session,
        asked: old,
    }
}

/// The epoch at or below which a moving copy of `client_id` is stale: the newest
/// epoch at which a session of it started afresh, as the committed table says (0:
/// none known). A copy handed to a claim of that epoch or an older one belongs to a
/// session the client was told is gone (CONNACK session present 0 after it).
fn fresh_epoch(cluster: &ShardCluster, client_id: &str) -> u64 {
    cluster.owner(client_id).map_or(0, |o| o.fresh)
}

/// Drops this shard's moving copy of `client_id` if it is stale (handed to a claim at
/// or below `fresh`); true when it did.
pub(super) fn drop_stale_copy(shard: &Shard, client_id: &str, fresh: u64) -> bool {
    let mut engine = shard.engine.borrow_mut();
    match engine.moving_to(client_id) {
        Some((_, e)) if e <= fresh && !engine.has_session(client_id) => {
            engine.drop_moving_copy(client_id);
            drop(engine);
            info!(
                shard = shard.id,
                client_id,
                "a moving copy of an older session dropped: the ClientID started a new session since"
            );
            true
        }
        _ => false,
    }
}

fn failed(
    shard: &Shard,
    cluster: &ShardCluster,
    client_id: &str,
    old: NodeId,
    why: &dyn std::fmt::Display,
) {
    SessionMetrics::add(&cluster.port.sessions.takeover_failures);
    warn!(
        shard = shard.id,
        client_id,
        old_owner = old,
        "session not moved from its old owner (the client gets a new session): {why}"
    );
}

/// Looks for a moving copy of `client_id` here, then on every member but `old` and
/// this node; takes the first one found that is not stale. `Some` when a session was
/// recovered (whether its source confirmed); beside it, when none was, the first member
/// that did not answer (or whose disk tail stopped coming: `TailLost`).
pub(super) async fn recover_moving_copy(
    shard: &Rc<Shard>,
    cluster: &ShardCluster,
    client_id: &str,
    epoch: u64,
    old: NodeId,
) -> (Option<Settled>, Option<NodeId>) {
    let metrics = &cluster.port.sessions;
    drop_stale_copy(shard, client_id, fresh_epoch(cluster, client_id));
    let resumed = shard
        .engine
        .borrow_mut()
        .resume_moving(now_ms(), client_id, wall_base_ms());
    match resumed {
        Ok(true) => {
            SessionMetrics::add(&metrics.moving_copies_recovered);
            info!(
                shard = shard.id,
                client_id, "session taken back from this node's unconfirmed moving copy"
            );
            return (Some(Settled::Yes), None);
        }
        Ok(false) => {}
        Err(e) => warn!(shard = shard.id, client_id, "own moving copy unusable: {e}"),
    }
    let request = body(OP_FETCH, epoch, &[0]);
    let mut silent = None;
    for (node, answer) in ask_others(cluster, old, client_id, &request).await {
        if let Some(export) = answer.as_deref().ok().and_then(split_export) {
            SessionMetrics::add(&metrics.moving_copies_recovered);
            info!(
                shard = shard.id,
                client_id,
                from = node,
                "session recovered from a node whose hand-over was never confirmed"
            );
            return match take_in(shard, cluster, client_id, epoch, node, export).await {
                Ok(session) => (session, None),
                // Its tail stopped coming: the claim waits for that node.
                Err(TailLost) => (None, Some(node)),
            };
        }
        if answer.is_err() {
            silent.get_or_insert(node);
        }
    }
    (None, silent)
}

/// The parts of a `FETCH` answer that carries a session.
struct Export<'a> {
    rec: &'a [u8],
    window: Option<&'a [u8]>,
    pending: Option<&'a [u8]>,
}

/// A `len u32 BE`-prefixed part of `b` and what follows it.
fn split_len(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let rest = &b[4..];
    (n <= rest.len()).then(|| rest.split_at(n))
}

/// The export, the window and the pending ids of a `FETCH` answer that carries a
/// session.
fn split_export(answer: &[u8]) -> Option<Export<'_>> {
    match answer {
        [1, rec @ ..] => Some(Export {
            rec,
            window: None,
            pending: None,
        }),
        [2, rest @ ..] => {
            let (rec, window) = split_len(rest)?;
            Some(Export {
                rec,
                window: Some(window),
                pending: None,
            })
        }
        [3, rest @ ..] => {
            let (rec, rest) = split_len(rest)?;
            let (window, pending) = split_len(rest)?;
            Some(Export {
                rec,
                window: Some(window),
                pending: Some(pending),
            })
        }
        _ => None,
    }
}

/// The take-in was given up: `source` stopped answering while its disk tail was read
/// and the claim waits for it (`cluster.wait_for_session_owner`); nothing of the
/// session is left here, and the CONNECT is refused as when `source` does not answer
/// the `FETCH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TailLost;

/// Takes in the export (its record, window and pending ids) from `source`, reads its
/// disk tail from there, waits for this shard's store to commit it all and confirms to
/// `source`. `Ok(None)` when the export could not be taken in.
async fn take_in(
    shard: &Rc<Shard>,
    cluster: &ShardCluster,
    client_id: &str,
    epoch: u64,
    source: NodeId,
    export: Export<'_>,
) -> Result<Option<Settled>, TailLost> {
    let settled = take_in_parts(shard, cluster, client_id, epoch, source, export).await?;
    // Inbound QoS 2 ids whose original was still on its way from an older owner: their
    // PUBREC waits for that node's word (`handed_qos2`), asked for on a task of its own.
    if settled.is_some() && !shard.engine.borrow().pending_inbound(client_id).is_empty() {
        rt::spawn_local(follow_pending(shard.clone(), client_id.to_owned()));
    }
    Ok(settled)
}

/// Asks the holders of `client_id`'s pending inbound QoS 2 originals whether their
/// forward is complete, until none is pending here (answered, or the session left).
async fn follow_pending(shard: Rc<Shard>, client_id: String) {
    loop {
        let next = shard
            .engine
            .borrow()
            .pending_inbound(&client_id)
            .into_iter()
            .next();
        let Some((packet_id, holder, id)) = next else {
            return;
        };
        let Some(cluster) = shard.cluster() else {
            return;
        };
        let answer = if holder == cluster.port.node_id {
            // Carried back here: this shard knows it itself.
            let state = shard.engine.borrow_mut().inbound_forward_state(
                now_ms(),
                &client_id,
                packet_id,
                id,
            );
            match state {
                Some(true) => Ok(Bytes::from_static(&[1])),
                Some(false) => Ok(Bytes::from_static(&[2])),
                None => Ok(Bytes::from_static(&[0])),
            }
        } else {
            let mut rest = Vec::with_capacity(20);
            rest.extend_from_slice(&packet_id.to_be_bytes());
            rest.extend_from_slice(&id.origin.to_be_bytes());
            rest.extend_from_slice(&id.shard.to_be_bytes());
            rest.extend_from_slice(&id.seq.to_be_bytes());
            call(&cluster, holder, &client_id, &body(OP_INBOUND, 0, &rest)).await
        };
        match answer.as_deref() {
            Ok([1]) => {
                shard
                    .engine
                    .borrow_mut()
                    .inbound_forward_done(&client_id, packet_id, id);
                debug!(
                    shard = shard.id,
                    client_id, packet_id, holder, "a moved QoS 2 original arrived: PUBREC"
                );
            }
            Ok([0]) => {
                shard
                    .engine
                    .borrow_mut()
                    .inbound_forward_lost(now_ms(), &client_id, packet_id, id);
                info!(
                    shard = shard.id,
                    client_id,
                    packet_id,
                    holder,
                    "the node holding a moved QoS 2 original forgot it: the re-sent PUBLISH is routed here"
                );
            }
            Ok([2]) if holder != cluster.port.node_id => {}
            _ => rt::sleep(INBOUND_RETRY).await,
        }
        shard.flush_outbox();
    }
}

async fn take_in_parts(
    shard: &Rc<Shard>,
    cluster: &ShardCluster,
    client_id: &str,
    epoch: u64,
    source: NodeId,
    export: Export<'_>,
) -> Result<Option<Settled>, TailLost> {
    let Export {
        rec,
        window,
        pending,
    } = export;
    let metrics = &cluster.port.sessions;
    // A copy kept here of an older session of the ClientID (the log says it started
    // afresh since) goes first: its ghost's held copies are not this session's
    // (issue 16, item 3).
    let fresh = fresh_epoch(cluster, client_id);
    if shard
        .engine
        .borrow_mut()
        .drop_older_lineage(client_id, fresh)
    {
        info!(
            shard = shard.id,
            client_id,
            "a moving copy of an older session dropped before the session was taken in: the ClientID started a new session since"
        );
    }
    let imported =
        shard
            .engine
            .borrow_mut()
            .import_session(now_ms(), client_id, rec, wall_base_ms());
    let imported = match imported {
        Ok(i) => i,
        Err(e) => {
            failed(shard, cluster, client_id, source, &e);
            return Ok(None);
        }
    };
    if let Some(w) = window
        && !shard
            .engine
            .borrow_mut()
            .import_window(now_ms(), client_id, w)
    {
        warn!(
            shard = shard.id,
            client_id,
            old_owner = source,
            "the moved session's window is malformed: QoS 2 copies it got there may come again"
        );
    }
    // A QoS 0 copy another node matched before this claim is not the session's by
    // this node's path (`Engine::window_claim`, sim seed 2172).
    shard
        .engine
        .borrow_mut()
        .window_claim(client_id, claim_index(epoch));
    if let Some(p) = pending
        && !shard.engine.borrow_mut().import_pending(client_id, p)
    {
        warn!(
            shard = shard.id,
            client_id,
            old_owner = source,
            "the moved session's pending QoS 2 ids are malformed: a re-sent PUBLISH is acknowledged at once"
        );
    }
    let (mut from_seq, mut left, mut moved) = (imported.tail_from_seq, imported.tail_count, 0u64);
    while left > 0 {
        let mut rest = [0u8; 12];
        rest[..8].copy_from_slice(&from_seq.to_be_bytes());
        rest[8..].copy_from_slice(&TAIL_CHUNK_COUNT.to_be_bytes());
        let chunk = call(cluster, source, client_id, &body(OP_TAIL, epoch, &rest)).await;
        // The old owner did not answer (or could not read its store): not a chunk
        // this node refused.
        let unanswered = chunk.is_err();
        let appended = chunk.map_err(|e| e.to_string()).and_then(|bytes| {
            shard
                .engine
                .borrow_mut()
                .import_tail(now_ms(), client_id, &bytes, wall_base_ms())
                .map_err(|e| e.to_string())
        });
        match appended {
            Ok((n, more, next)) => {
                moved += n as u64;
                left = left.saturating_sub(n as u64);
                from_seq = next;
                // Each chunk goes to the store as it comes (in `batched`
                // durability too): memory holds one chunk.
                shard.flush_outbox();
                if let Some(store) = &shard.store {
                    store.take_batch_now(&mut shard.engine.borrow_mut());
                }
                if !more || n == 0 {
                    break;
                }
            }
            Err(e) => {
                SessionMetrics::add(&metrics.takeover_failures);
                // The claim waits for the old owner: what arrived goes, and the session
                // stays whole on that node, which keeps its copy for this claim (no
                // confirmation, no `SessionFresh`) until the client's next CONNECT takes
                // it over in full. Serving what arrived lost the rest: the old owner,
                // back, found the claim marked fresh and dropped its copy as stale
                // (kill -9 scenario, CHAOS_SEED=131556, 33 acknowledged QoS 1 lost).
                // (A malformed chunk would come again: then as before.)
                if unanswered
                    && cluster.waits_for(source)
                    && shard
                        .engine
                        .borrow_mut()
                        .abandon_import(now_ms(), client_id)
                {
                    warn!(
                        shard = shard.id,
                        client_id,
                        old_owner = source,
                        moved,
                        left,
                        "the session's disk tail stopped coming: not taken in, it stays on its \
                         old owner and the CONNECT is refused until that node is back: {e}"
                    );
                    shard.flush_outbox();
                    return Err(TailLost);
                }
                // Otherwise (`cluster.wait_for_session_owner` off, or a redirect held
                // for the session that only this node has) what arrived stays; the rest
                // is still on the old owner, which keeps its copy (no confirmation
                // follows).
                warn!(
                    shard = shard.id,
                    client_id,
                    old_owner = source,
                    moved,
                    left,
                    "session moved without the rest of its queue's disk tail: {e}"
                );
                shard.engine.borrow_mut().import_finish(now_ms(), client_id);
                shard.flush_outbox();
                return Ok(Some(Settled::No));
            }
        }
    }
    metrics
        .tail_deliveries_moved
        .fetch_add(moved, std::sync::atomic::Ordering::Relaxed);
    shard.engine.borrow_mut().import_finish(now_ms(), client_id);
    if !all_committed(shard, COMMIT_WAIT).await {
        SessionMetrics::add(&metrics.confirm_failures);
        warn!(
            shard = shard.id,
            client_id,
            old_owner = source,
            "the moved session is not committed here yet: not confirmed, the old owner keeps its copy"
        );
        return Ok(Some(Settled::No));
    }
    match call(cluster, source, client_id, &body(OP_DONE, epoch, &[])).await {
        Ok(a) if a.as_ref() == [1] => {
            debug!(
                shard = shard.id,
                client_id,
                old_owner = source,
                moved_from_disk = moved,
                "session moved here"
            );
            Ok(Some(Settled::Yes))
        }
        other => {
            SessionMetrics::add(&metrics.confirm_failures);
            warn!(
                shard = shard.id,
                client_id,
                old_owner = source,
                "session moved here but not confirmed to the old owner, which keeps its copy \
                 until the session would expire: {other:?}"
            );
            Ok(Some(Settled::No))
        }
    }
}

/// When the cluster attaches after a start: a session this shard restored from its
/// store whose ClientID the committed table gives to another node is not served here.
/// It is the copy of a hand-over this node made before it stopped (the new owner's
/// confirmation or the deletion did not land), so it becomes a moving copy: out of the
/// routes, its will held, handed to a later claimant whose previous owner has nothing,
/// dropped when the session would expire.
pub(super) fn park_sessions_owned_elsewhere(shard: &Shard, cluster: &ShardCluster) {
    let me = cluster.port.node_id;
    let tables = match cluster.handle().tables() {
        Ok(t) => t,
        Err(e) => {
            warn!(
                shard = shard.id,
                "cannot read the ownership table at start: {e}"
            );
            return;
        }
    };
    let ids = shard.engine.borrow().client_ids();
    let mut parked = 0usize;
    for client_id in ids {
        let Ok(Some(owner)) = tables.owner(client_id.as_str()) else {
            continue;
        };
        if owner.node == me || shard.engine.borrow().is_connected(client_id.as_str()) {
            continue;
        }
        if park(shard, client_id.as_str(), (owner.node, owner.epoch)) {
            parked += 1;
            // The owner started a new session afresh since: this one is gone for good.
            drop_stale_copy(shard, client_id.as_str(), owner.fresh);
        }
    }
    if parked > 0 {
        info!(
            shard = shard.id,
            parked,
            "sessions restored here that another node owns are kept as moving copies, not served"
        );
        shard.flush_outbox();
    }
}

/// Another node's claim (`to` = its node and epoch) on `client_id` committed: a session
/// of it here leaves memory and the routes and waits as a moving copy for that node's
/// fetch (or, if that never comes, for a later claimant). Not while it is still being
/// taken in here (the fetch waits for that). True when a session was parked.
pub(super) fn park(shard: &Shard, client_id: &str, to: (u64, u64)) -> bool {
    let mut engine = shard.engine.borrow_mut();
    if !engine.has_session(client_id) || engine.is_importing(client_id) {
        return false;
    }
    engine
        .export_session(now_ms(), client_id, wall_base_ms(), to)
        .is_some()
}

/// This node holds the claim on `client_id` and kept a moving copy of its session (a
/// copy parked at start-up while the table it read was behind): the session is that
/// copy, taken back, not a new one.
pub(super) fn resume_own_copy(shard: &Shard, cluster: &ShardCluster, client_id: &str) {
    if drop_stale_copy(shard, client_id, fresh_epoch(cluster, client_id)) {
        return;
    }
    let mut engine = shard.engine.borrow_mut();
    if engine.has_session(client_id) || engine.moving_to(client_id).is_none() {
        return;
    }
    match engine.resume_moving(now_ms(), client_id, wall_base_ms()) {
        Ok(_) => info!(
            shard = shard.id,
            client_id, "session taken back from this node's moving copy"
        ),
        Err(e) => warn!(shard = shard.id, client_id, "own moving copy unusable: {e}"),
    }
}

/// The old owner's side: a session request from another node.
pub(super) async fn serve(shard: Rc<Shard>, req: PeerRequest) {
    let answer = answer(&shard, &req).await;
    if let Err(e) = &answer {
        debug!(shard = shard.id, from = req.from, client_id = %req.envelope.key, "session request refused: {e}");
    }
    let _ = req.reply.send(answer);
}

async fn answer(shard: &Rc<Shard>, req: &PeerRequest) -> Result<Bytes, String> {
    let body = &req.envelope.body;
    let client_id = req.envelope.key.as_str();
    if body.len() < 9 || client_id.is_empty() {
        return Err(format!("malformed session request ({} bytes)", body.len()));
    }
    let op = body[0];
    let epoch = u64::from_be_bytes(body[1..9].try_into().map_err(|_| "short epoch")?);
    let rest = &body[9..];
    let to = (req.from, epoch);
    match (op, rest) {
        (OP_FETCH, [clean]) if *clean <= 1 => {
            hand_out(shard, req, client_id, epoch, *clean == 1).await
        }
        (OP_TAIL, [..]) if rest.len() == 12 => {
            let from_seq = u64::from_be_bytes(rest[..8].try_into().map_err(|_| "short")?);
            let count = u32::from_be_bytes(rest[8..].try_into().map_err(|_| "short")?);
            read_tail(
                shard,
                client_id,
                to,
                from_seq,
                count.clamp(1, TAIL_CHUNK_COUNT),
            )
            .await
        }
        (OP_INBOUND, [..]) if rest.len() == 20 => {
            let packet_id = u16::from_be_bytes(rest[..2].try_into().map_err(|_| "short")?);
            let id = tessera_shard::mesh::PubId {
                origin: u64::from_be_bytes(rest[2..10].try_into().map_err(|_| "short")?),
                shard: u16::from_be_bytes(rest[10..12].try_into().map_err(|_| "short")?),
                seq: u64::from_be_bytes(rest[12..].try_into().map_err(|_| "short")?),
            };
            Ok(inbound_state(shard, client_id, packet_id, id).await)
        }
        (OP_DONE, []) => {
            let done = shard
                .engine
                .borrow_mut()
                .moving_done(now_ms(), client_id, to);
            shard.flush_outbox();
            if done {
                Ok(Bytes::from_static(&[1]))
            } else {
                Err(format!(
                    "no session of this node handed to node {} with epoch {epoch}",
                    req.from
                ))
            }
        }
        _ => Err(format!(
            "malformed session request (op {op}, {} bytes)",
            body.len()
        )),
    }
}

/// `INBOUND`: whether the forward of a handed-over inbound QoS 2 publication is
/// complete, waiting up to [`INBOUND_WAIT`] for it.
async fn inbound_state(
    shard: &Shard,
    client_id: &str,
    packet_id: u16,
    id: tessera_shard::mesh::PubId,
) -> Bytes {
    let deadline = rt::now() + INBOUND_WAIT;
    loop {
        let state =
            shard
                .engine
                .borrow_mut()
                .inbound_forward_state(now_ms(), client_id, packet_id, id);
        match state {
            Some(true) => return Bytes::from_static(&[1]),
            None => return Bytes::from_static(&[0]),
            Some(false) if rt::now() >= deadline => return Bytes::from_static(&[2]),
            Some(false) => rt::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// `FETCH`: hands the session (live or a moving copy) to the committed owner.
async fn hand_out(
    shard: &Rc<Shard>,
    req: &PeerRequest,
    client_id: &str,
    epoch: u64,
    clean_start: bool,
) -> Result<Bytes, String> {
    let cluster = shard
        .cluster()
        .ok_or_else(|| "this node's cluster is not running yet".to_owned())?;
    // This node holds the claim but the session is still on the node it was taken
    // from (its takeover under way, or waiting: `cluster.wait_for_session_owner`):
    // "nothing here" would let the asker start a new session and leave the
    // acknowledged messages there behind. Once the asker's claim is applied here, this
    // node's claim is replaced and the answer below names that node; so it is waited
    // for first (bounded), not answered with "ask again later".
    if cluster.claims.awaiting_from(client_id).is_some() {
        let _ = cluster.reacted(claim_index(epoch), APPLY_WAIT).await;
    }
    if let Some(from) = cluster.claims.awaiting_from(client_id) {
        return Err(format!(
            "the session is not here yet: its node {from} has not answered this node's takeover"
        ));
    }
    // When the asker's claim replaced such a claim of this node, the session is still on
    // that node: the asker is sent there (sim seed 137, harness faults), unless it left
    // the cluster.
    if let Some(from) = cluster.claims.passed_on_from(client_id, epoch)
        && cluster.handle().members().contains_key(&from)
    {
        let mut answer = vec![4];
        answer.extend_from_slice(&from.to_be_bytes());
        return Ok(Bytes::from(answer));
    }
    // Nothing here (the common answer to a claimant looking for a moving copy): said at
    // once, without waiting to apply the claim.
    {
        let engine = shard.engine.borrow();
        if !engine.has_session(client_id) && engine.moving_to(client_id).is_none() {
            return Ok(Bytes::from_static(&[0]));
        }
    }
    // The epoch is a fencing token: only the committed owner may take the session.
    let index = claim_index(epoch);
    if !cluster.applied(index, APPLY_WAIT).await {
        return Err(format!("log index {index} not applied here in time"));
    }
    let owner = cluster
        .handle()
        .tables()
        .and_then(|t| t.owner(client_id))
        .map_err(|e| format!("cannot read the ownership table: {e}"))?;
    match owner {
        Some(o) if o.node == req.from && o.epoch == epoch => {
            // A copy of a session older than the ClientID's last fresh start is not
            // handed out: the client was told it is gone.
            if drop_stale_copy(shard, client_id, o.fresh) {
                shard.flush_outbox();
                return Ok(Bytes::from_static(&[0]));
            }
        }
        other => {
            return Err(format!(
                "node {} with epoch {epoch} is not the committed owner ({other:?})",
                req.from
            ));
        }
    }
    cluster.forget_claim(client_id);
    // A session still taking in its disk tail here goes once it has all of it.
    let deadline = rt::now() + FETCH_TIMEOUT;
    while shard.engine.borrow().is_importing(client_id) && rt::now() < deadline {
        rt::sleep(Duration::from_millis(5)).await;
    }
    let now = now_ms();
    let to = (req.from, epoch);
    let mut out = BytesMut::new();
    if clean_start {
        shard.engine.borrow_mut().drop_session(now, client_id);
        out.put_u8(0);
    } else {
        let mut engine = shard.engine.borrow_mut();
        let exported = if engine.has_session(client_id) {
            engine.export_session(now, client_id, wall_base_ms(), to)
        } else {
            engine.moving_handout(client_id, to)
        };
        // The claimant has it now (`Engine::drop_older_lineage`).
        engine.moving_fetched(client_id);
        let window = engine.moving_window(client_id).unwrap_or_default();
        let pending = engine
            .moving_pending(client_id, cluster.port.node_id)
            .unwrap_or_default();
        drop(engine);
        match exported {
            Some(bytes) => {
                SessionMetrics::add(&cluster.port.sessions.sessions_exported);
                out.reserve(9 + bytes.len() + window.len() + pending.len());
                out.put_u8(3);
                out.put_u32(u32::try_from(bytes.len()).map_err(|_| "export too large")?);
                out.put_slice(&bytes);
                out.put_u32(u32::try_from(window.len()).map_err(|_| "window too large")?);
                out.put_slice(&window);
                out.put_slice(&pending);
            }
            None => out.put_u8(0),
        }
    }
    shard.flush_outbox();
    Ok(out.freeze())
}

/// `TAIL`: up to `count` deliveries of the moving copy's disk tail from `from_seq` on,
/// read from this shard's store, for the node it was handed to.
async fn read_tail(
    shard: &Rc<Shard>,
    client_id: &str,
    to: (u64, u64),
    from_seq: u64,
    count: u32,
) -> Result<Bytes, String> {
    let store = shard
        .store
        .as_ref()
        .ok_or_else(|| "no store here: no disk tail".to_owned())?;
    let (token, rx) = store.tail_read();
    let asked =
        shard
            .engine
            .borrow_mut()
            .read_moving_tail(client_id, to, token, from_seq, count as usize);
    if !asked {
        store.tail_read_done(token);
        return Err(format!(
            "no session of this node handed to node {} with epoch {}",
            to.0, to.1
        ));
    }
    shard.flush_outbox();
    let wait = async { rx.recv_async().await.ok() };
    let expire = async {
        rt::sleep(READ_WAIT).await;
        None
    };
    let Some(loaded) = futures_lite::future::or(wait, expire).await else {
        store.tail_read_done(token);
        return Err("the store did not read the tail in time".into());
    };
    let read = loaded.deliveries.len();
    let mut deliveries = loaded.deliveries;
    // What the copy's ghost stored after the export is not tail: the store read
    // returns it after the tail, and the new owner would refuse the chunk.
    let cut = shard
        .engine
        .borrow()
        .cut_moving_tail(client_id, &mut deliveries);
    let tail = deliveries.len();
    // At least one delivery, then as many as fit the byte bound.
    let mut bytes = 0u64;
    let fit = deliveries
        .iter()
        .position(|d| {
            bytes += delivery_cost(d);
            bytes > TAIL_CHUNK_BYTES
        })
        .map_or(deliveries.len(), |i| i.max(1));
    deliveries.truncate(fit);
    let more = fit < tail || (!cut && read == count as usize);
    Ok(Bytes::from(Engine::encode_tail(
        &deliveries,
        more,
        wall_base_ms(),
    )))
}
