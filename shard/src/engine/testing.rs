//! What the engine's unit tests share: engines for a cluster, a CONNECT to
//! start from, a mesh that delivers between engines on one thread, and the
//! packets an engine wrote to a connection.

use tessera_proto::{
    Connect, Packet, ProtocolVersion, QoS, Str, Subscribe, Subscription, SubscriptionOptions,
};

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

/// A SUBSCRIBE (packet id 1) to `filter` at `qos`.
pub(super) fn subscribe_packet(filter: &'static str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Default::default(),
        subscriptions: vec![Subscription {
            filter: Str::from_static(filter),
            options: SubscriptionOptions::qos(qos),
        }],
    })
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

/// A stand-in for a shard store's messages and sessions databases, applied batch by
/// batch, answering loads after each "commit".
#[derive(Default)]
pub(super) struct StoreModel {
    pub(super) msgs: std::collections::BTreeMap<(String, u64), (u8, crate::session::Delivery)>,
    /// ClientIDs with a session record.
    pub(super) sessions: std::collections::BTreeSet<String>,
}

impl StoreModel {
    /// Commits every batch of `e`, then answers its loads: a session's own loads go to
    /// the engine, reads of a moving session's disk tail are returned.
    pub(super) fn commit(&mut self, e: &mut Engine, now_ms: u64) -> Vec<crate::store::Loaded> {
        use crate::store::{Loaded, STATE_QUEUED, StoreOp};
        let mut tail_reads = Vec::new();
        while let Some(b) = e.take_store_batch() {
            let mut loads = Vec::new();
            for op in b.ops {
                match op {
                    StoreOp::PutSession(s) => {
                        self.sessions.insert(s.client_id.to_string());
                    }
                    StoreOp::PutMsg {
                        client_id,
                        seq,
                        state,
                        delivery,
                        ..
                    } => {
                        self.msgs
                            .insert((client_id.to_string(), seq), (state, delivery));
                    }
                    StoreOp::DelMsg { client_id, seq } => {
                        self.msgs.remove(&(client_id.to_string(), seq));
                    }
                    StoreOp::DelSession { client_id } => {
                        self.msgs.retain(|(c, _), _| c != client_id.as_str());
                        self.sessions.remove(client_id.as_str());
                    }
                    StoreOp::ClearMsgs {
                        client_id,
                        below_seq,
                    } => {
                        self.msgs
                            .retain(|(c, seq), _| c != client_id.as_str() || *seq >= below_seq);
                    }
                    StoreOp::LoadQueue {
                        client_id,
                        session,
                        from_seq,
                        count_max,
                    } => loads.push((client_id, session, from_seq, count_max)),
                    _ => {}
                }
            }
            e.store_committed(b.epoch);
            for (client_id, session, from_seq, count_max) in loads {
                let deliveries = self
                    .msgs
                    .range((client_id.to_string(), from_seq)..(client_id.to_string(), u64::MAX))
                    .filter(|(_, (state, _))| *state == STATE_QUEUED)
                    .take(count_max)
                    .map(|(_, (_, d))| d.clone())
                    .collect();
                let loaded = Loaded {
                    client_id,
                    session,
                    deliveries,
                };
                if Engine::is_tail_read(&loaded) {
                    tail_reads.push(loaded);
                } else {
                    e.queue_loaded(now_ms, loaded);
                }
            }
        }
        tail_reads
    }
}

/// A data directory of one test (`tessera-{module}-{name}-{pid}` under the system's
/// temp dir, emptied first), removed after it.
pub(super) struct Dir(pub(super) std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn temp_dir_in(module: &str, name: &str) -> Dir {
    let path = std::env::temp_dir().join(format!("tessera-{module}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    Dir(path)
}

/// The wall clock at engine time 0 in the store-backed tests.
pub(super) const WALL_BASE_MS: u64 = 1_700_000_000_000;

/// A store-backed one-shard cluster node: the engine, its remote id, its store and
/// the data directory's lock.
pub(super) type StoredNode = (
    Engine,
    ShardId,
    crate::store::StoreEnv,
    crate::store::DirLock,
);

/// A one-shard node of a cluster on `dir` under `sync` durability, started as the
/// broker starts one: recover, the origin of this process, restore.
pub(super) fn boot(dir: &Dir, origin: u64) -> StoredNode {
    let (lock, mut envs, mut recovered) =
        crate::store::recover(&dir.0, 1, 16 << 20, WALL_BASE_MS).expect("recovers");
    let mut e = engines(1, &Limits::default()).remove(0);
    let remote = e.enable_remote().expect("room for the remote id");
    e.set_origin(origin);
    e.enable_persistence(true);
    e.restore(1, recovered.remove(0));
    (e, remote, envs.remove(0).0, lock)
}

/// Commits what `e` stored, as its writer thread would.
pub(super) fn commit(e: &mut Engine, env: &crate::store::StoreEnv) {
    while let Some(batch) = e.take_store_batch() {
        let dbs = crate::store::open_dbs(env).expect("dbs");
        let mut txn = env.write_txn().expect("txn");
        for op in &batch.ops {
            crate::store::apply(&dbs, &mut txn, op, WALL_BASE_MS).expect("applied");
        }
        txn.commit().expect("committed");
        e.store_committed(batch.epoch);
    }
}

/// `kill -9`: what is not committed is gone.
pub(super) fn crash(e: Engine, env: crate::store::StoreEnv, lock: crate::store::DirLock) {
    drop(e);
    env.prepare_for_closing().wait();
    drop(lock);
}

/// Another node routes `filter`: the forwarder's `RouteAdd` for the remote id, as
/// each shard of a cluster node gets it.
pub(super) fn routed_elsewhere(e: &mut Engine, filter: &'static str) {
    let remote = e.remote_id().expect("a cluster node");
    e.handle_mesh(
        1,
        remote,
        crate::mesh::MeshMsg::RouteAdd {
            filter: Str::from_static(filter),
            shard: remote,
            ack: None,
        },
    );
}
