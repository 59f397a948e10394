//! Goal: what an operator relies on when running Tessera as a cluster of real broker
//! processes on loopback: the certificates `brokerctl cluster certs` makes are the ones
//! the links accept; a leader is elected and every node becomes ready; when the leader
//! is killed with -9 another takes over, and the old one rejoins and catches up from its
//! data dir; a fourth node joins (learner, then voter) and a node leaves; a node with a
//! certificate from another CA is refused (exit code 2); a node that fell behind a purged
//! log gets a snapshot.
//!
//! Method: `broker` processes (one shard each) with the cluster flags, cluster UDP ports
//! picked free on 127.0.0.1, data dirs in a test directory; the cluster is observed only
//! through each node's admin API (`/api/v1/cluster`, `/ready`, `/metrics`) and
//! `brokerctl`. Every wait is bounded; every process is killed when its guard drops, also
//! when an assertion fails.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{CLUSTER_TIMEOUT, Cluster, free_udp_addr};
use common::{TestDir, brokerctl, run_bounded};
use serde_json::Value;
use tessera_raft::link::LinkCerts;
use tessera_raft::link::certs::{ca_cert_path, make_cluster_certs, node_cert_path, node_key_path};

fn member_ids(view: &Value) -> Vec<u64> {
    view["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

fn member(view: &Value, id: u64) -> Option<&Value> {
    view["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
}

fn code(out: &std::process::Output) -> i32 {
    out.status.code().expect("exit code")
}

#[test]
fn brokerctl_cluster_certs_makes_a_ca_and_node_certificates_and_keeps_existing_ones() {
    let dir = TestDir::new("cluster-certs");
    let certs = std::path::Path::new(dir.path_str()).join("certs");
    let certs_arg = certs.to_str().unwrap();
    let out = brokerctl(
        &[
            "cluster",
            "certs",
            "--out",
            certs_arg,
            "--nodes",
            "3",
            "--hosts",
            "127.0.0.1",
        ],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("wrote ").count(), 8, "{stdout}");
    for id in 1..=3 {
        LinkCerts::load_dir(&certs, id).expect("a node certificate the link accepts");
    }
    let ca = fs::read(ca_cert_path(&certs)).unwrap();
    let node1 = fs::read(node_cert_path(&certs, 1)).unwrap();

    // A fourth node joins later: same CA, nothing overwritten.
    let out = brokerctl(
        &["cluster", "certs", "--out", certs_arg, "--nodes", "4"],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("wrote ").count(), 2, "{stdout}");
    assert!(
        stdout.contains(&format!("kept  {}", node_key_path(&certs, 3).display())),
        "{stdout}"
    );
    assert_eq!(fs::read(ca_cert_path(&certs)).unwrap(), ca);
    assert_eq!(fs::read(node_cert_path(&certs, 1)).unwrap(), node1);
    LinkCerts::load_dir(&certs, 4).expect("the new node's certificate is signed by the same CA");

    // Two hosts for three nodes is a usage error; nothing is written.
    let other = std::path::Path::new(dir.path_str()).join("other");
    let out = brokerctl(
        &[
            "cluster",
            "certs",
            "--out",
            other.to_str().unwrap(),
            "--nodes",
            "3",
            "--hosts",
            "a,b",
        ],
        &[],
    );
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("one per node"));
    assert!(!other.exists());

    // A directory that cannot be made: exit 1 with the path.
    let out = brokerctl(
        &[
            "cluster",
            "certs",
            "--out",
            "/proc/tessera-certs",
            "--nodes",
            "1",
        ],
        &[],
    );
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/proc/tessera-certs"));
}

#[test]
fn three_nodes_elect_a_leader_that_is_replaced_when_killed_and_rejoins_after_restart() {
    let mut cluster = Cluster::new("cluster-failover", 3, 3, &[]);
    for id in 1..=3 {
        cluster.start(id, &[], false);
    }
    let (leader, _) = cluster.wait_for_leader();
    // Each node announces its addresses (a NodeMeta op) once it runs; they may apply a
    // moment after the members are ready.
    cluster.wait_until("NodeMeta fills every member's addresses", |c| {
        c.status(leader).is_some_and(|v| {
            (1..=3).all(|id| {
                member(&v, id)
                    .is_some_and(|m| m["mqtt_addr"].as_str().is_some_and(|a| !a.is_empty()))
            })
        })
    });
    let (leader, view) = cluster.wait_for_leader();
    assert_eq!(member_ids(&view), vec![1, 2, 3]);
    for id in 1..=3 {
        let m = member(&view, id).unwrap();
        assert_eq!(m["role"], if id == leader { "leader" } else { "follower" });
        assert_eq!(m["reachable"], true, "{view:#}");
        assert!(
            m["match_index"].as_u64().is_some() && m["lag"].as_u64().is_some(),
            "{view:#}"
        );
        assert!(
            !m["mqtt_addr"].as_str().unwrap().is_empty(),
            "NodeMeta fills the addresses: {view:#}"
        );
    }
    let term = view["term"].as_u64().unwrap();

    // brokerctl shows the same, as a table and as JSON.
    let url = format!("http://{}", cluster.node(1).admin_addr());
    let out = brokerctl(&["cluster", "status", "--url", &url], &[]);
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("ROLE")
            && table.contains("leader")
            && table.matches("follower").count() >= 2,
        "{table}"
    );
    let out = brokerctl(&["cluster", "status", "--json", "--url", &url], &[]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["leader"], leader);

    // Kill -9 the leader: the other two elect one of them in a later term.
    cluster.kill(leader);
    let (new_leader, view) = cluster.wait_for_leader();
    assert_ne!(new_leader, leader);
    assert!(view["term"].as_u64().unwrap() > term, "{view:#}");
    let reported = member(&view, leader).unwrap();
    cluster.wait_until("the dead node is reported unreachable", |c| {
        c.status(new_leader)
            .and_then(|v| member(&v, leader).map(|m| m["reachable"] == false))
            .unwrap_or(false)
    });
    assert_eq!(reported["role"], "follower");

    // Restarted with its data dir and the same flags, the old leader rejoins and catches
    // up with what was committed while it was down.
    cluster.start(leader, &[], false);
    let (_, view) = cluster.wait_for_leader();
    let commit = view["commit_index"].as_u64().unwrap();
    cluster.wait_until("the restarted node catches up", |c| {
        c.status(leader)
            .is_some_and(|v| v["applied_index"].as_u64().unwrap() >= commit)
    });
    let metrics = cluster.admin(leader).raw("GET", &["metrics"], &[]).unwrap();
    let text = String::from_utf8_lossy(&metrics.body);
    // Every cluster name of the ops contract (ops/README.md), which the alerts and the
    // dashboard use.
    let contract: Vec<&str> = include_str!("../../ops/README.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("tessera_cluster_"))
        .collect();
    assert!(contract.len() >= 10, "{contract:?}");
    for name in contract {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics"
        );
    }
    for sample in [
        "tessera_cluster_peer_reachable{peer=",
        "tessera_cluster_peer_rtt_seconds{peer=",
    ] {
        assert!(text.contains(sample), "{sample} missing from /metrics");
    }
}

#[test]
fn a_fourth_node_joins_as_a_voter_and_a_node_leaves() {
    let mut cluster = Cluster::new("cluster-join", 3, 4, &[]);
    for id in 1..=3 {
        cluster.start(id, &[], false);
    }
    cluster.wait_for_leader();
    let seed = cluster.addrs[0].to_string();
    cluster.start(4, &["--join", &seed], true);
    cluster.wait_until("node 4 becomes a voter", |c| {
        c.status(1).is_some_and(|v| {
            member(&v, 4).is_some_and(|m| m["role"] == "follower" || m["role"] == "leader")
        })
    });
    let (_, view) = cluster.wait_for_leader();
    assert_eq!(member_ids(&view), vec![1, 2, 3, 4]);

    // Node 3 leaves through brokerctl; the others carry on with three voters.
    let url = format!("http://{}", cluster.node(3).admin_addr());
    // A membership change is refused (409, exit 4) while the previous one (node 4's
    // promotion) is still being committed: retry as an operator would.
    let deadline = Instant::now() + CLUSTER_TIMEOUT;
    loop {
        let out = brokerctl(&["cluster", "leave", "--url", &url], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // The leader drops its link to node 3 as soon as the change commits, maybe
        // before node 3 hears the answer: node 3 then asks the others, so a leave that
        // is done reports done (exit 0).
        match out.status.code() {
            Some(0) => break,
            Some(4) if Instant::now() < deadline => {
                eprintln!("leave refused, retrying: {stderr}");
                std::thread::sleep(Duration::from_millis(200));
            }
            code => panic!("brokerctl cluster leave: {code:?} {stderr}"),
        }
    }
    cluster.wait_until("node 3 is no longer a member", |c| {
        c.status(1).is_some_and(|v| member(&v, 3).is_none())
    });
    cluster.kill(3);
    let (_, view) = cluster.wait_for_leader();
    assert_eq!(member_ids(&view), vec![1, 2, 4]);
}

#[test]
fn a_node_with_a_certificate_from_another_ca_is_refused() {
    let mut cluster = Cluster::new("cluster-foreign", 1, 1, &[]);
    cluster.start(1, &[], false);
    cluster.wait_for_leader();

    // Node 2's certificate comes from a CA of its own.
    let foreign = Path::new(cluster.dir.path_str()).join("foreign");
    make_cluster_certs(&foreign, 2, &[]).unwrap();
    let data = cluster.data_dir(2);
    let listen = free_udp_addr().to_string();
    let seed = cluster.addrs[0].to_string();
    let out = run_bounded(
        &[
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--data-dir",
            &data,
            "--node-id",
            "2",
            "--cluster-listen",
            &listen,
            "--cluster-certs",
            foreign.to_str().unwrap(),
            "--join",
            &seed,
        ],
        &[],
        CLUSTER_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("not signed by this cluster's CA"),
        "{stderr}"
    );
    cluster
        .node(1)
        .wait_log("refused a cluster connection", Duration::from_secs(5));
    let view = cluster.status(1).unwrap();
    assert_eq!(member_ids(&view), vec![1]);
}

#[test]
fn a_node_behind_a_purged_log_gets_a_snapshot() {
    let envs = [
        ("TESSERA_CLUSTER__SNAPSHOT_LOGS_SINCE_LAST", "2"),
        ("TESSERA_CLUSTER__LOGS_KEPT_AFTER_SNAPSHOT", "0"),
    ];
    let mut cluster = Cluster::new("cluster-snapshot", 3, 3, &envs);
    for id in 1..=3 {
        cluster.start(id, &[], false);
    }
    let (leader, _) = cluster.wait_for_leader();
    let behind = if leader == 3 { 2 } else { 3 };
    cluster.kill(behind);
    let live: Vec<u64> = (1..=3).filter(|id| *id != behind).collect();

    // Every leadership change appends an entry: move it back and forth until the log
    // was snapshotted and purged past where the dead node stopped.
    let mut to = if live[0] == leader { live[1] } else { live[0] };
    let deadline = Instant::now() + CLUSTER_TIMEOUT;
    loop {
        let url = format!("http://{}", cluster.node(to).admin_addr());
        let _ = brokerctl(
            &["cluster", "transfer-leader", &to.to_string(), "--url", &url],
            &[],
        );
        let (now, view) = cluster.wait_for_leader();
        if view["purged_index"].as_u64().unwrap_or(0) >= 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log was never purged: {view:#}"
        );
        to = if now == live[0] { live[1] } else { live[0] };
    }

    cluster.start(behind, &[], false);
    let (_, view) = cluster.wait_for_leader();
    let commit = view["commit_index"].as_u64().unwrap();
    cluster.wait_until("the node that fell behind catches up", |c| {
        c.status(behind)
            .is_some_and(|v| v["applied_index"].as_u64().unwrap() >= commit)
    });
    let metrics = cluster.admin(behind).raw("GET", &["metrics"], &[]).unwrap();
    let text = String::from_utf8_lossy(&metrics.body);
    let installed = text
        .lines()
        .find_map(|l| l.strip_prefix("tessera_cluster_snapshots_installed_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap();
    assert!(installed >= 1, "no snapshot installed on node {behind}");
}
