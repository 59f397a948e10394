//! Serving a connection on the shard that owns its ClientID: the node's
//! refusals for load (memory, connection limits, flapping), then the engine
//! takes the CONNECT and the connection's task (`conn`) runs.

use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use tessera_proto::{Connect, Encode, ReasonCode};
use tessera_shard::authz::Admission;
use tessera_shard::probe::EarlyRefusal;
use tessera_shard::session::ConnId;
use tracing::warn;

use super::accept::{refuse, refuse_with};
use super::claims::ClaimRefusal;
use super::refusals::Refusal;
use super::{Shard, claims, conn, now_ms, refused_early, warn_refusal};
use crate::config::ListenerId;
use crate::transport::Transport;

/// Serves one connection on its owner shard until it ends.
pub(super) async fn serve(
    shard: Rc<Shard>,
    stream: Transport,
    already_read: Bytes,
    connect: Connect,
    assigned: bool,
    listener: ListenerId,
    admission: Admission,
) {
    let version = connect.version;
    #[cfg(feature = "fault-injection")]
    crate::fatal::fault::on_connect(shard.id, connect.client_id.as_str());
    // Refusals for load: 3.1.1 return code 3, v5 0x89.
    let busy = if version.is_v5() {
        ReasonCode::ServerBusy
    } else {
        ReasonCode::ServerUnavailable
    };
    let high_water = shard.memory_high_water_bytes;
    if high_water > 0 && shard.auth.rss_bytes.get() > high_water {
        if warn_refusal(&shard, Refusal::MemoryHighWater) {
            warn!(
                shard = shard.id,
                rss_bytes = shard.auth.rss_bytes.get(),
                high_water,
                reason = Refusal::MemoryHighWater.name(),
                "memory above limits.memory_high_water_bytes: refusing new connections"
            );
        }
        shard.engine.borrow_mut().probe_mut().connect_result(busy);
        return refuse(stream, version, busy).await;
    }
    // Flapping is counted here, on the owner shard of the ClientID.
    if shard.auth.flapping(now_ms(), &connect.client_id) {
        let banned = ReasonCode::Banned;
        shard.engine.borrow_mut().probe_mut().connect_result(banned);
        return refuse(stream, version, banned).await;
    }
    if shard.connections.get() >= shard.connections_max {
        refused_early(&shard, EarlyRefusal::ConnectionLimit);
        refuse(stream, version, busy).await;
        if warn_refusal(&shard, Refusal::ConnectionLimit) {
            warn!(
                shard = shard.id,
                max = shard.connections_max,
                listener = %shard.listeners[usize::from(listener)].url(shard.listeners[usize::from(listener)].bind),
                reason = Refusal::ConnectionLimit.name(),
                "connection limit reached: refusing"
            );
        }
        return;
    }
    if !shard.listener_limits.hold(usize::from(listener)) {
        if warn_refusal(&shard, Refusal::ListenerConnectionLimit) {
            warn!(
                shard = shard.id,
                listener = %shard.listeners[usize::from(listener)].url(shard.listeners[usize::from(listener)].bind),
                reason = Refusal::ListenerConnectionLimit.name(),
                "listener connection limit reached: refusing"
            );
        }
        return refuse(stream, version, busy).await;
    }
    let bytes_read = connect.encoded_len(version) + already_read.len();
    let conn = match admit(&shard, connect, assigned, listener, admission, bytes_read).await {
        Ok(conn) => conn,
        Err(refusal) => {
            let properties = tessera_proto::ConnAckProperties {
                server_reference: refusal
                    .server_reference
                    .and_then(|a| tessera_proto::Str::try_from(a).ok()),
                ..Default::default()
            };
            return refuse_with(stream, version, refusal.rc, properties).await;
        }
    };
    // The bytes left from the CONNECT read are copied into a right-sized
    // buffer so the accept-time read buffer is freed now.
    let input = BytesMut::from(&already_read[..]);
    drop(already_read);
    conn::spawn(shard, stream, input, conn, version, listener);
}

/// The CONNECT's admission past the node's load checks: in a cluster, this node must
/// hold the ClientID in the committed raft state first (a new claim, and the session
/// fetched from its old owner, or one it holds; nothing is served before the control
/// plane runs: refused as unavailable, counted, never a hang); then the engine takes
/// the CONNECT (its CONNACK is in the connection's output). `bytes_read`: what the
/// accepting shard read (the CONNECT and the bytes after it). The data-plane
/// simulation admits its clients here too.
pub(super) async fn admit(
    shard: &Rc<Shard>,
    connect: Connect,
    assigned: bool,
    listener: ListenerId,
    mut admission: Admission,
    bytes_read: usize,
) -> Result<ConnId, ClaimRefusal> {
    if shard.clustered {
        let claimed = match shard.cluster() {
            Some(cluster) => claims::claim(shard, &cluster, &connect).await,
            None => Err(ReasonCode::ServerUnavailable.into()),
        };
        match claimed {
            // Named in the engine's client log line.
            Ok(epoch) => admission.claim_epoch = Some(epoch),
            Err(refusal) => {
                shard
                    .engine
                    .borrow_mut()
                    .probe_mut()
                    .connect_result(refusal.rc);
                return Err(refusal);
            }
        }
    }
    shard.connections.set(shard.connections.get() + 1);
    let conn = {
        let mut engine = shard.engine.borrow_mut();
        engine.record_bytes_received(bytes_read);
        let conn = engine.connect_admitted(now_ms(), connect, assigned, admission);
        engine.set_listener(conn, listener);
        conn
    };
    shard.flush_outbox();
    Ok(conn)
}
