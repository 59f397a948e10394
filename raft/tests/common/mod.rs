//! Shared harness: N control planes in one process over a `MemNet`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tessera_raft::memnet::MemNet;
use tessera_raft::store::{Store, StoreError, StoreOptions};
use tessera_raft::{ClusterConfig, ControlPlane, NodeId, NodeInfo, Op, Role, StartError};

pub fn addr(id: NodeId) -> String {
    format!("127.0.0.1:{}", 7000 + id)
}

pub fn info(id: NodeId) -> NodeInfo {
    NodeInfo {
        cluster_addr: addr(id),
        mqtt_addr: format!("127.0.0.1:{}", 1882 + id),
        admin_addr: format!("127.0.0.1:{}", 18082 + id),
        shards: 2,
    }
}

pub fn voters(ids: impl IntoIterator<Item = NodeId>) -> BTreeMap<NodeId, NodeInfo> {
    ids.into_iter()
        .map(|id| (id, NodeInfo::with_cluster_addr(addr(id))))
        .collect()
}

pub fn claim(cid: &str, node: u64) -> Op {
    Op::ClaimSession {
        client_id: cid.into(),
        node,
    }
}

/// Nodes 1, 2 and 3 started as the initial voters.
pub async fn three(seed: u64, tweak: fn(&mut ClusterConfig)) -> Cluster {
    let mut c = Cluster::new(seed, tweak);
    let v = voters([1, 2, 3]);
    for id in 1..=3 {
        c.start(id, &v).await;
    }
    c
}

pub struct Cluster {
    pub net: MemNet,
    pub root: tempfile::TempDir,
    pub nodes: BTreeMap<NodeId, ControlPlane>,
    pub tweak: fn(&mut ClusterConfig),
}

pub fn fast(c: &mut ClusterConfig) {
    c.election_timeout_min_ms = 150;
    c.election_timeout_max_ms = 300;
    c.heartbeat_interval_ms = 50;
    c.fsync = false;
}

impl Cluster {
    pub fn new(seed: u64, tweak: fn(&mut ClusterConfig)) -> Cluster {
        Cluster {
            net: MemNet::new(seed),
            root: tempfile::tempdir().expect("tempdir"),
            nodes: BTreeMap::new(),
            tweak,
        }
    }

    pub fn dir(&self, id: NodeId) -> PathBuf {
        self.root.path().join(format!("node{id}"))
    }

    pub fn config(&self, id: NodeId, initial: &BTreeMap<NodeId, NodeInfo>) -> ClusterConfig {
        let mut c = ClusterConfig::new(id, self.dir(id), info(id));
        c.self_info.cluster_addr = addr(id);
        c.initial_voters = initial.clone();
        // Elections drawn from the network's seeded generator: a seed replays them.
        c.election_seed = Some(self.net.random());
        (self.tweak)(&mut c);
        c
    }

    pub async fn try_start(&mut self, config: ClusterConfig) -> Result<(), StartError> {
        let id = config.node_id;
        let (cp, svc) = ControlPlane::start(config, self.net.transport(id)).await?;
        self.net.register(id, svc);
        self.nodes.insert(id, cp);
        Ok(())
    }

    pub async fn start(&mut self, id: NodeId, initial: &BTreeMap<NodeId, NodeInfo>) {
        let c = self.config(id, initial);
        self.try_start(c).await.expect("start node");
    }

    pub async fn stop(&mut self, id: NodeId) {
        self.net.unregister(id);
        if let Some(cp) = self.nodes.remove(&id) {
            cp.shutdown().await;
        }
        self.wait_closed(id).await;
    }

    /// Waits until nothing in this process holds node `id`'s store (in-flight calls
    /// finish shortly after a shutdown), so it can be opened again.
    pub async fn wait_closed(&self, id: NodeId) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let options = StoreOptions {
                map_size_bytes: 64 << 20,
                ..StoreOptions::default()
            };
            match Store::open(&self.dir(id).join("raft"), options) {
                Err(StoreError::Open { source, .. })
                    if source.to_string().contains("already open") => {}
                Err(StoreError::Locked { .. }) => {}
                _ => return,
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {id}'s store stays open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn node(&self, id: NodeId) -> &ControlPlane {
        &self.nodes[&id]
    }

    /// The leader every running node agrees on, waiting up to `within`.
    pub async fn leader(&self, within: Duration) -> NodeId {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let views: Vec<_> = self.nodes.values().map(|n| n.status()).collect();
            if let Some(l) = views
                .iter()
                .find(|s| s.role == Role::Leader)
                .map(|s| s.node_id)
                && views.iter().all(|s| s.leader == Some(l))
            {
                return l;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no agreed leader: {views:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every running node applied at least `index`.
    pub async fn applied(&self, index: u64, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self
                .nodes
                .values()
                .all(|n| n.handle().applied_index() >= index)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not every node applied {index}: {:?}",
                self.nodes
                    .values()
                    .map(|n| (n.node_id(), n.handle().applied_index()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every running node's table rows, asserting they are equal at the same index.
    pub fn assert_tables_equal(&self) {
        let dumps: Vec<_> = self
            .nodes
            .values()
            .map(|n| {
                let v = n.handle().tables().expect("tables");
                (
                    n.node_id(),
                    v.applied_index().expect("index"),
                    v.dump().expect("dump"),
                )
            })
            .collect();
        let (id0, i0, d0) = &dumps[0];
        for (id, i, d) in &dumps[1..] {
            if i == i0 {
                assert!(
                    d == d0,
                    "tables of nodes {id0} and {id} differ at index {i}"
                );
            }
        }
    }

    pub async fn shutdown_all(self) {
        for (_, cp) in self.nodes {
            cp.shutdown().await;
        }
    }
}
