//! What the engine's unit tests share: engines for a cluster, a CONNECT to
//! start from, a mesh that delivers between engines on one thread, and the
//! packets an engine wrote to a connection.

use tessera_proto::{Connect, Packet, ProtocolVersion, Str};

use super::{Engine, Limits};
use crate::mesh::ShardId;
use crate::session::ConnId;

/// One engine per shard of a `shards`-shard cluster, all with `limits`.
pub(super) fn engines(shards: usize, limits: &Limits) -> Vec<Engine> {
    (0..shards)
        .map(|i| Engine::new(i as ShardId, shards, limits.clone()))
        .collect()
}

/// A CONNECT of `version` for `id`: no keep alive, will, credentials or
/// properties; tests change the fields they care about.
pub(super) fn connect_packet(version: ProtocolVersion, id: &str, clean_start: bool) -> Connect {
    Connect {
        version,
        clean_start,
        keep_alive: 0,
        client_id: Str::try_from(id).expect("test client ids are valid"),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    }
}

/// Delivers mesh messages between `engines` (index = shard id) until no
/// engine has any left.
pub(super) fn pump_mesh(engines: &mut [Engine], now_ms: u64) {
    loop {
        let mut batches = Vec::new();
        for (from, e) in engines.iter_mut().enumerate() {
            e.drain_outbox(|to, batch| batches.push((from as ShardId, to, batch)));
        }
        if batches.is_empty() {
            return;
        }
        for (from, to, batch) in batches {
            for msg in batch {
                engines[usize::from(to)].handle_mesh(now_ms, from, msg);
            }
        }
    }
}

/// Takes what the engine wrote to `conn` since the last call (one write's
/// worth) and decodes it as `version`.
pub(super) fn drain(e: &mut Engine, conn: ConnId, version: ProtocolVersion) -> Vec<Packet> {
    let mut buf = e.output(conn).map(|o| o.buf.split()).unwrap_or_default();
    let mut out = Vec::new();
    while let Ok(Some(p)) = tessera_proto::decode(&mut buf, version, usize::MAX) {
        out.push(p);
    }
    out
}
