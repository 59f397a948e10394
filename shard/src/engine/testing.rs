//! What the engine's unit tests share: a CONNECT to start from and a mesh
//! that delivers between engines on one thread.

use tessera_proto::{Connect, ProtocolVersion, Str};

use super::Engine;
use crate::mesh::ShardId;

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
