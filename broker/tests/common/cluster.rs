//! A cluster of real broker processes for the black-box tests (`cluster`,
//! `cluster_routing`): certificates, data dirs, cluster UDP ports picked free on
//! 127.0.0.1, and each node's process (killed when the guard drops, also when an
//! assertion fails). Every wait is bounded. With [`Cluster::on_hosts`] each node
//! runs through a command prefix (`ip netns exec NS`, `common::netns`) with all its
//! listeners (MQTT, admin, cluster) on its own address.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_broker::admin::client::AdminClient;
use tessera_raft::link::certs::make_cluster_certs;

use super::{Broker, TestDir};

/// Bound on elections, catch-up and membership changes in these tests.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

pub fn free_udp_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Where a node runs when it is not on loopback: the command prefix that starts a
/// program there and the address its listeners bind.
#[derive(Debug, Clone)]
pub struct NodeHost {
    pub prefix: Vec<String>,
    pub ip: IpAddr,
}

/// The fixed ports of a node on its own address ([`Cluster::on_hosts`]).
pub const HOST_MQTT_PORT: u16 = 1883;
pub const HOST_ADMIN_PORT: u16 = 18083;
pub const HOST_CLUSTER_PORT: u16 = 7946;

/// A test cluster: certificates, data dirs and the nodes' processes (killed on drop).
pub struct Cluster {
    pub dir: TestDir,
    pub certs: PathBuf,
    pub addrs: Vec<SocketAddr>,
    pub nodes: Vec<Option<Broker>>,
    pub envs: Vec<(String, String)>,
    /// Shards per node (1 unless [`Cluster::with_shards`]).
    pub shards: usize,
    /// Per node, where it runs (empty: every node on loopback).
    pub hosts: Vec<NodeHost>,
    /// The logs of the node processes killed so far, per node, oldest first.
    pub past_logs: Vec<Vec<String>>,
    /// The admin API's token ([`Cluster::on_hosts`]: the admin listener is not on
    /// loopback, which requires one).
    pub admin_token: Option<String>,
}

impl Cluster {
    /// Certificates for `certs_for` nodes and cluster addresses for `size` initial voters.
    pub fn new(tag: &str, size: usize, certs_for: u64, envs: &[(&str, &str)]) -> Cluster {
        let dir = TestDir::new(tag);
        let certs = Path::new(dir.path_str()).join("certs");
        make_cluster_certs(&certs, certs_for, &[]).unwrap();
        Cluster {
            certs,
            addrs: (0..certs_for).map(|_| free_udp_addr()).collect(),
            nodes: (0..certs_for).map(|_| None).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir,
            shards: 1,
            hosts: Vec::new(),
            past_logs: (0..certs_for).map(|_| Vec::new()).collect(),
            admin_token: None,
        }
        .with_size(size)
    }

    /// A cluster whose node `i` (from 1) runs on `hosts[i - 1]`, `size` of them initial
    /// voters.
    pub fn on_hosts(
        tag: &str,
        size: usize,
        hosts: Vec<NodeHost>,
        envs: &[(&str, &str)],
    ) -> Cluster {
        let dir = TestDir::new(tag);
        let certs = Path::new(dir.path_str()).join("certs");
        make_cluster_certs(&certs, hosts.len() as u64, &[]).unwrap();
        let token = format!("test-admin-token-{}", std::process::id());
        let mut envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        envs.push(("TESSERA_SERVER__ADMIN_TOKEN".into(), token.clone()));
        Cluster {
            certs,
            addrs: hosts
                .iter()
                .map(|h| SocketAddr::new(h.ip, HOST_CLUSTER_PORT))
                .collect(),
            nodes: hosts.iter().map(|_| None).collect(),
            envs,
            dir,
            shards: 1,
            past_logs: hosts.iter().map(|_| Vec::new()).collect(),
            hosts,
            admin_token: Some(token),
        }
        .with_size(size)
    }

    pub fn with_size(mut self, size: usize) -> Cluster {
        self.envs
            .push(("TESSERA_CLUSTER__PEERS".into(), self.peers(size)));
        self
    }

    /// Nodes started from now on run `shards` shards.
    pub fn with_shards(mut self, shards: usize) -> Cluster {
        self.shards = shards;
        self
    }

    pub fn peers(&self, size: usize) -> String {
        (1..=size)
            .map(|id| format!("{id}={}", self.addrs[id - 1]))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn data_dir(&self, id: u64) -> String {
        Path::new(self.dir.path_str())
            .join(format!("node-{id}"))
            .to_str()
            .unwrap()
            .to_owned()
    }

    pub fn args(&self, id: u64) -> Vec<String> {
        [
            "--shards",
            &self.shards.to_string(),
            "--data-dir",
            &self.data_dir(id),
            "--node-id",
            &id.to_string(),
            "--cluster-listen",
            &self.addrs[id as usize - 1].to_string(),
            "--cluster-certs",
            self.certs.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(self.hosts.get(id as usize - 1).into_iter().flat_map(|h| {
            [
                "--listen".to_owned(),
                SocketAddr::new(h.ip, HOST_MQTT_PORT).to_string(),
                "--admin-listen".to_owned(),
                SocketAddr::new(h.ip, HOST_ADMIN_PORT).to_string(),
            ]
        }))
        .collect()
    }

    /// Starts node `id` (an initial voter, or with `extra` such as `--join`).
    pub fn start(&mut self, id: u64, extra: &[&str], join: bool) {
        let mut args = self.args(id);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = self
            .envs
            .iter()
            .filter(|(k, _)| !(join && k == "TESSERA_CLUSTER__PEERS"))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let prefix = self
            .hosts
            .get(id as usize - 1)
            .map(|h| h.prefix.clone())
            .unwrap_or_default();
        self.nodes[id as usize - 1] = Some(Broker::start_via(&prefix, &args, &envs));
    }

    /// Kills node `id` with SIGKILL (its log kept in [`Cluster::past_logs`]).
    pub fn kill(&mut self, id: u64) {
        if let Some(node) = self.nodes[id as usize - 1].take() {
            let log = node.log();
            drop(node);
            self.past_logs[id as usize - 1].push(log);
        }
    }

    pub fn node(&self, id: u64) -> &Broker {
        self.nodes[id as usize - 1]
            .as_ref()
            .expect("node is running")
    }

    pub fn admin(&self, id: u64) -> AdminClient {
        let url = format!("http://{}", self.node(id).admin_addr());
        AdminClient::new(&url, self.admin_token.clone(), Duration::from_secs(5)).unwrap()
    }

    /// Node `id`'s `/api/v1/cluster`, or `None` while it cannot answer.
    pub fn status(&self, id: u64) -> Option<Value> {
        self.admin(id)
            .json("GET", &["api", "v1", "cluster"], &[])
            .ok()
    }

    pub fn ready(&self, id: u64) -> bool {
        self.admin(id)
            .raw("GET", &["ready"], &[])
            .is_ok_and(|r| r.status == 200)
    }

    pub fn running(&self) -> Vec<u64> {
        (1..=self.nodes.len() as u64)
            .filter(|id| self.nodes[*id as usize - 1].is_some())
            .collect()
    }

    /// Waits until every running node is ready and names the same leader; returns it.
    pub fn wait_for_leader(&self) -> (u64, Value) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let views: Vec<Value> = self
                .running()
                .iter()
                .filter_map(|id| self.status(*id))
                .collect();
            let leaders: Vec<Option<u64>> = views.iter().map(|v| v["leader"].as_u64()).collect();
            if views.len() == self.running().len()
                && leaders.iter().all(|l| l.is_some() && *l == leaders[0])
                && leaders[0].is_some_and(|l| self.running().contains(&l))
                && self.running().iter().all(|id| self.ready(*id))
            {
                let leader = leaders[0].unwrap();
                let view = views
                    .into_iter()
                    .find(|v| v["node_id"] == leader)
                    .expect("the leader runs");
                return (leader, view);
            }
            assert!(
                Instant::now() < deadline,
                "no common leader within {CLUSTER_TIMEOUT:?}: {views:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_until(&self, what: &str, mut done: impl FnMut(&Cluster) -> bool) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {CLUSTER_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
