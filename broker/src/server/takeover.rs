//! Cross-node takeover (issue 15): the session moves from its old owner node to the
//! node whose claim just committed, over the link's Forward channel
//! (`PeerKind::Session`, keyed by the ClientID so the owner shard serves it).
//!
//! The new owner ([`fetch`]), between its committed claim and its CONNACK, asks the old
//! owner for the session with the claim's epoch and whether the CONNECT starts clean.
//! The old owner ([`serve_fetch`]) checks the epoch against its own committed table
//! (waiting until it has applied the claim's entry: the epoch's high bits are its log
//! index), so a stale or forged request is refused; then it ends the live connection
//! (v5 DISCONNECT 0x8E, the will as the spec says for a takeover), and either drops the
//! session (clean start: a delayed will is published now) or exports it and hands the
//! bytes back. The new owner imports it, so the engine answers CONNACK with session
//! present and resumes in-flight deliveries with their packet ids.
//!
//! Request body: `epoch u64 BE | clean_start u8`. Answer: `0` (no session) or `1 |
//! TransferRec` (the store's record format, validated on import). An old owner that
//! does not answer within [`FETCH_TIMEOUT`] costs the session (counted, logged): the
//! claim is committed, and the client is served with a new session rather than refused.

use std::rc::Rc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tessera_proto::Connect;
use tessera_raft::NodeId;
use tracing::{debug, warn};

use super::cluster::ShardCluster;
use super::persist::unix_ms;
use super::{Shard, now_ms};
use crate::cluster::metrics::SessionMetrics;
use crate::cluster::peer::{PeerKind, PeerRequest, encode_envelope};

/// Longest the new owner waits for the old owner's answer.
pub(super) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the old owner waits to apply the claim a request names.
const APPLY_WAIT: Duration = Duration::from_secs(2);
/// How many low bits of an epoch are the op's position in its entry.
const EPOCH_POSITION_BITS: u32 = 20;

/// The wall-clock time at engine time 0, for times that travel between nodes.
fn wall_base_ms() -> u64 {
    unix_ms().saturating_sub(now_ms())
}

/// The new owner's side: fetch the session of `connect`'s ClientID from `old` and take
/// it in (unless the CONNECT starts clean, which only ends it there).
pub(super) async fn fetch(
    shard: &Rc<Shard>,
    cluster: &ShardCluster,
    connect: &Connect,
    epoch: u64,
    old: NodeId,
) {
    let client_id = connect.client_id.as_str();
    let metrics = &cluster.port.sessions;
    let mut body = [0u8; 9];
    body[..8].copy_from_slice(&epoch.to_be_bytes());
    body[8] = u8::from(connect.clean_start);
    let request = encode_envelope(PeerKind::Session, client_id.as_bytes(), &body);
    let answer = match cluster.port.peers.call(old, request) {
        Err(e) => Err(e.to_string()),
        Ok(rx) => {
            let wait = async { Some(rx.recv_async().await) };
            let expire = async {
                glommio::timer::sleep(FETCH_TIMEOUT).await;
                None
            };
            match futures_lite::future::or(wait, expire).await {
                None => Err(format!("no answer within {FETCH_TIMEOUT:?}")),
                Some(Err(_)) => Err("the link dropped the call".into()),
                Some(Ok(Err(e))) => Err(e.to_string()),
                Some(Ok(Ok(bytes))) => Ok(bytes),
            }
        }
    };
    let failed = |why: &dyn std::fmt::Display| {
        SessionMetrics::add(&metrics.takeover_failures);
        warn!(
            shard = shard.id,
            client_id,
            old_owner = old,
            "session not moved from its old owner (the client gets a new session): {why}"
        );
    };
    let bytes = match answer {
        Ok(bytes) => bytes,
        Err(e) => return failed(&e),
    };
    match bytes.first() {
        Some(1) if !connect.clean_start => {
            let imported = shard.engine.borrow_mut().import_session(
                now_ms(),
                client_id,
                &bytes[1..],
                wall_base_ms(),
            );
            match imported {
                Ok(()) => debug!(
                    shard = shard.id,
                    client_id,
                    old_owner = old,
                    "session moved here"
                ),
                Err(e) => failed(&e),
            }
        }
        Some(0 | 1) => {}
        _ => failed(&"malformed answer"),
    }
    shard.flush_outbox();
}

/// The old owner's side: hand the session out to the node whose claim committed.
pub(super) async fn serve_fetch(shard: Rc<Shard>, req: PeerRequest) {
    let answer = hand_out(&shard, &req).await;
    if let Err(e) = &answer {
        debug!(shard = shard.id, from = req.from, client_id = %req.envelope.key, "session request refused: {e}");
    }
    let _ = req.reply.send(answer);
}

async fn hand_out(shard: &Rc<Shard>, req: &PeerRequest) -> Result<Bytes, String> {
    let body = &req.envelope.body;
    let client_id = req.envelope.key.as_str();
    if body.len() != 9 || client_id.is_empty() || body[8] > 1 {
        return Err(format!("malformed session request ({} bytes)", body.len()));
    }
    let epoch = u64::from_be_bytes(body[..8].try_into().map_err(|_| "short epoch")?);
    let clean_start = body[8] == 1;
    let cluster = shard
        .cluster()
        .ok_or_else(|| "this node's cluster is not running yet".to_owned())?;
    // The epoch is a fencing token: only the committed owner may take the session.
    let index = epoch >> EPOCH_POSITION_BITS;
    let deadline = std::time::Instant::now() + APPLY_WAIT;
    while cluster.handle().applied_index() < index {
        if std::time::Instant::now() >= deadline {
            return Err(format!("log index {index} not applied here in time"));
        }
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    let owner = cluster
        .handle()
        .tables()
        .and_then(|t| t.owner(client_id))
        .map_err(|e| format!("cannot read the ownership table: {e}"))?;
    match owner {
        Some(o) if o.node == req.from && o.epoch == epoch => {}
        other => {
            return Err(format!(
                "node {} with epoch {epoch} is not the committed owner ({other:?})",
                req.from
            ));
        }
    }
    cluster.forget_claim(client_id);
    let now = now_ms();
    let mut out = BytesMut::new();
    if clean_start {
        shard.engine.borrow_mut().drop_session(now, client_id);
        out.put_u8(0);
    } else {
        let exported = shard
            .engine
            .borrow_mut()
            .export_session(now, client_id, wall_base_ms());
        match exported {
            Some((bytes, _left_on_disk)) => {
                SessionMetrics::add(&cluster.port.sessions.sessions_exported);
                out.reserve(1 + bytes.len());
                out.put_u8(1);
                out.put_slice(&bytes);
            }
            None => out.put_u8(0),
        }
    }
    shard.flush_outbox();
    Ok(out.freeze())
}
