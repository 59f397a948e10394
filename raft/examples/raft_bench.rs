//! Control-plane throughput and latency: N nodes in this process with real fsync (heed
//! stores on disk) over the in-memory transport, proposers on every node keeping
//! `--in-flight` ops outstanding, as shards do at a connect storm.
//!
//! ```text
//! cargo run --release -p tessera-raft --example raft_bench -- --kind claim --ops 200000
//! cargo run --release -p tessera-raft --example raft_bench -- --kind route --ops 400000
//! ```
//!
//! Prints ops/s (route deltas/s for `--kind route`), proposal-to-applied p50/p99 (µs,
//! measured per op by the proposer, counted once per delta), and the mean ops and deltas
//! per log entry (each entry is one synced append on each node). Options:
//! `--nodes 3 --in-flight 8192 --batch-ops 1024 --window-us 500 --batches-in-flight 4
//! --rate OPS_PER_S --dir PATH` (a directory on the disk to measure; default under `target/`).
//!
//! `--kind route --deltas-per-op 1024` (the default): each proposal is one
//! `Op::RouteDeltas` of 1,024 filters, as the broker's forwarder sends the route changes
//! that accumulated while its earlier route proposals were in flight (a subscribe storm:
//! at most `ROUTE_PROPOSALS_IN_FLIGHT_MAX` = 8 of them per node, so `--in-flight 24576`
//! is three nodes' forwarders in a storm); every filter counts as one delta.
//! `--deltas-per-op 1` proposes one `Op::RouteDelta` per filter (the forwarder's shape
//! when changes arrive one at a time). `--in-flight` counts deltas. The ops are built
//! before the clock starts (the forwarder gets its filters from the shards).
//!
//! `--net quic`: the nodes talk over the real QUIC link (`tessera_raft::link`, mutual TLS
//! with an in-memory cluster CA, UDP on 127.0.0.1 ports 21701..) instead of the in-memory
//! transport: the same code path as three broker processes, in one process.
//!
//! `--kind failover --rounds 10`: the leader crashes (cut from the network, then stopped
//! like kill -9 and restarted from its data dir); prints, per round and as p50/max, how
//! long after the crash a claim proposed on a surviving node at the moment of the crash
//! was applied: when a new leader accepts claims.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tessera_raft::link::certs::ClusterCa;
use tessera_raft::link::{Link, LinkCerts, LinkConfig};
use tessera_raft::memnet::MemNet;
use tessera_raft::{ClusterConfig, ClusterError, ControlPlane, NodeInfo, Op, Role, RouteChange};

struct Args {
    kind: String,
    ops: u64,
    nodes: u64,
    in_flight: usize,
    batch_ops: usize,
    window_us: u64,
    rate: Option<u64>,
    batches_in_flight: usize,
    rounds: u32,
    deltas_per_op: usize,
    net: String,
    dir: std::path::PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        kind: "claim".into(),
        ops: 200_000,
        nodes: 3,
        in_flight: 8192,
        batch_ops: 1024,
        window_us: 500,
        rate: None,
        batches_in_flight: 4,
        rounds: 10,
        deltas_per_op: 1024,
        net: "mem".into(),
        dir: std::path::PathBuf::from("target/raft-bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--kind" => a.kind = v,
            "--ops" => a.ops = v.parse().expect("--ops"),
            "--nodes" => a.nodes = v.parse().expect("--nodes"),
            "--in-flight" => a.in_flight = v.parse().expect("--in-flight"),
            "--batch-ops" => a.batch_ops = v.parse().expect("--batch-ops"),
            "--window-us" => a.window_us = v.parse().expect("--window-us"),
            "--rate" => a.rate = Some(v.parse().expect("--rate")),
            "--batches-in-flight" => a.batches_in_flight = v.parse().expect("--batches-in-flight"),
            "--rounds" => a.rounds = v.parse().expect("--rounds"),
            "--deltas-per-op" => a.deltas_per_op = v.parse().expect("--deltas-per-op"),
            "--net" => a.net = v,
            "--dir" => a.dir = v.into(),
            other => panic!("unknown option {other}"),
        }
    }
    a
}

/// The op starting at delta `i` (`n` deltas: a `RouteDeltas` of `n` changes for
/// `--kind route` with `--deltas-per-op` above 1, else one op per delta).
fn op_of(kind: &str, i: u64, n: u64, node: u64) -> Op {
    if kind != "route" || n == 1 {
        return op(kind, i, node);
    }
    Op::RouteDeltas {
        node,
        changes: (i..i + n)
            .map(|j| RouteChange {
                filter: route_filter(j),
                group: None,
                add: true,
            })
            .collect(),
    }
}

fn route_filter(i: u64) -> String {
    format!("sensors/{}/{}/#", i % 100_000, i / 100_000)
}

fn op(kind: &str, i: u64, node: u64) -> Op {
    match kind {
        "claim" => Op::ClaimSession {
            client_id: format!("client-{i:010}"),
            node,
        },
        "route" => Op::RouteDelta {
            node,
            filter: route_filter(i),
            group: None,
            add: true,
        },
        other => panic!("--kind claim|route, not {other}"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let _ = std::fs::remove_dir_all(&a.dir);
    let net = MemNet::new(1);
    let voters: BTreeMap<u64, NodeInfo> = (1..=a.nodes)
        .map(|id| {
            (
                id,
                NodeInfo::with_cluster_addr(format!("127.0.0.1:{}", 7000 + id)),
            )
        })
        .collect();
    let links: Vec<Arc<Link>> = if a.net == "quic" {
        assert!(a.kind != "failover", "--kind failover runs on --net mem");
        quic_links(a.nodes)
    } else {
        Vec::new()
    };
    let mut nodes = Vec::new();
    let mut configs = Vec::new();
    for id in 1..=a.nodes {
        let mut c = ClusterConfig::new(id, a.dir.join(format!("node{id}")), voters[&id].clone());
        c.initial_voters = voters.clone();
        c.batch_ops_max = a.batch_ops;
        c.batch_window_us = a.window_us;
        c.proposal_queue_max = (a.in_flight * 2).max(c.batch_ops_max);
        c.batches_in_flight_max = a.batches_in_flight;
        c.snapshot_logs_since_last = 100_000;
        configs.push(c.clone());
        let (cp, svc) = match a.net.as_str() {
            "mem" => {
                let (cp, svc) = ControlPlane::start(c, net.transport(id))
                    .await
                    .expect("start");
                net.register(id, svc.clone());
                (cp, svc)
            }
            "quic" => {
                let link = links[(id - 1) as usize].clone();
                let (cp, svc) = ControlPlane::start(c, link.clone()).await.expect("start");
                link.set_service(svc.clone());
                (cp, svc)
            }
            other => panic!("--net mem|quic, not {other}"),
        };
        let _ = svc;
        nodes.push(cp);
    }
    leader_of(&nodes).await;
    if a.kind == "failover" {
        return failover(&a, &net, nodes, configs).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let handles: Vec<_> = nodes.iter().map(|n| n.handle()).collect();
    let before: Vec<_> = nodes.iter().map(|n| n.metrics()).collect();
    let permits = Arc::new(tokio::sync::Semaphore::new(a.in_flight));
    let hist = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
    ));
    let busy = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let per_op = if a.kind == "route" {
        a.deltas_per_op
            .clamp(1, tessera_raft::op::ROUTE_CHANGES_MAX) as u64
    } else {
        1
    };
    let mut prepared = std::collections::VecDeque::new();
    let mut i = 0u64;
    while i < a.ops {
        let n = per_op.min(a.ops - i);
        let node = (prepared.len() as u64 % a.nodes) as usize;
        prepared.push_back((i, n, node, op_of(&a.kind, i, n, node as u64 + 1)));
        i += n;
    }
    let start = Instant::now();
    while let Some((i, n, node, o)) = prepared.pop_front() {
        if let Some(rate) = a.rate {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        // Permits count deltas: `--in-flight` deltas outstanding, whatever the op size.
        let permit = permits
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .expect("semaphore");
        let h = handles[node].clone();
        let hist = hist.clone();
        let busy = busy.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            loop {
                match h.propose(o.clone()) {
                    Ok(p) => {
                        p.wait().await.expect("applied");
                        break;
                    }
                    Err(ClusterError::Busy) => {
                        busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            // Every delta of the op waited as long as the op.
            hist.lock()
                .expect("histogram")
                .saturating_record_n(t.elapsed().as_micros() as u64, n);
            drop(permit);
        });
    }
    // Every task holds a permit until its op is applied: all permits back = all done.
    let _all = permits
        .acquire_many(a.in_flight as u32)
        .await
        .expect("semaphore");
    let secs = start.elapsed().as_secs_f64();
    let (p50, p99, max) = {
        let h = hist.lock().expect("histogram");
        (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max())
    };
    let (mut entries, mut ops) = (0u64, 0u64);
    for (n, b) in nodes.iter().zip(&before) {
        let m = n.metrics();
        entries += m.ops_per_entry.count - b.ops_per_entry.count;
        ops += m.ops_per_entry.sum - b.ops_per_entry.sum;
    }
    // `ops` counts the ops of committed entries; each op of this run carried `per_op`
    // deltas (the last one perhaps fewer).
    println!(
        "kind={} nodes={} ops={} deltas_per_op={} in_flight={} rate={} : {:.0} {}/s, p50 {} us, p99 {} us, max {} us, {:.1} ops/entry, {:.0} deltas/entry ({} entries), busy retries {}",
        a.kind,
        a.nodes,
        a.ops,
        per_op,
        a.in_flight,
        a.rate.map_or("max".to_string(), |r| r.to_string()),
        a.ops as f64 / secs,
        if a.kind == "route" { "deltas" } else { "ops" },
        p50,
        p99,
        max,
        ops as f64 / entries.max(1) as f64,
        a.ops as f64 / entries.max(1) as f64,
        entries,
        busy.load(std::sync::atomic::Ordering::Relaxed),
    );
    for n in nodes {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&a.dir);
}

/// The leader every node agrees on (waits up to 30 s).
async fn leader_of(nodes: &[ControlPlane]) -> u64 {
    let t0 = Instant::now();
    loop {
        let views: Vec<_> = nodes.iter().map(|n| n.status()).collect();
        if let Some(l) = views.iter().find(|s| s.role == Role::Leader)
            && views.iter().all(|s| s.leader == Some(l.node_id))
        {
            return l.node_id;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no leader");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Crashes the leader `a.rounds` times; measures when a claim proposed on a survivor at
/// the crash is applied.
async fn failover(
    a: &Args,
    net: &MemNet,
    mut nodes: Vec<ControlPlane>,
    configs: Vec<ClusterConfig>,
) {
    let mut took = Vec::new();
    for round in 0..a.rounds {
        let leader = leader_of(&nodes).await;
        let li = (leader - 1) as usize;
        let survivor = nodes
            .iter()
            .find(|n| n.node_id() != leader)
            .expect("a survivor")
            .handle();
        // Warm: the survivor's proposals reach the leader.
        survivor
            .propose(op("claim", u64::from(round), survivor.node_id()))
            .expect("propose")
            .wait()
            .await
            .expect("claim before the crash");
        let t0 = Instant::now();
        net.unregister(leader);
        let claim = Op::ClaimSession {
            client_id: format!("failover-{round}"),
            node: survivor.node_id(),
        };
        let applied = survivor.propose(claim).expect("propose").wait().await;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        let applied = applied.expect("claim after the crash");
        let new_leader = survivor.leader().unwrap_or(0);
        println!(
            "round {round}: leader {leader} crashed; node {new_leader} leads; a claim proposed on node {} at the crash was applied after {ms:.0} ms (index {})",
            survivor.node_id(),
            applied.index
        );
        took.push(ms);
        // The crashed node stops (its process is gone) and restarts from its data dir.
        let old = nodes.remove(li);
        old.shutdown().await;
        let restart = Instant::now();
        let (cp, svc) = loop {
            match ControlPlane::start(configs[li].clone(), net.transport(leader)).await {
                Ok(r) => break r,
                // The store is still held by calls in flight at the shutdown.
                Err(e) if restart.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("restart of node {leader}: {e}"),
            }
        };
        net.register(leader, svc);
        nodes.insert(li, cp);
        let target = applied.index;
        while nodes.iter().any(|n| n.handle().applied_index() < target) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    took.sort_by(f64::total_cmp);
    println!(
        "failover rounds={} : claim accepted after the leader crash p50 {:.0} ms, max {:.0} ms (election timeout {}-{} ms, heartbeat {} ms)",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1],
        configs[0].election_timeout_min_ms,
        configs[0].election_timeout_max_ms,
        configs[0].heartbeat_interval_ms,
    );
    for n in nodes {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&a.dir);
}

/// One QUIC link per node on 127.0.0.1:21700+id, certificates from an in-memory CA.
fn quic_links(n: u64) -> Vec<Arc<Link>> {
    let ca = ClusterCa::generate().expect("cluster CA");
    let addr = |id: u64| -> std::net::SocketAddr {
        format!("127.0.0.1:{}", 21700 + id)
            .parse()
            .expect("address")
    };
    (1..=n)
        .map(|id| {
            let (cert, key) = ca.node_cert(id, Some("127.0.0.1")).expect("node cert");
            let certs =
                LinkCerts::from_pem(ca.cert_pem().as_bytes(), cert.as_bytes(), key.as_bytes())
                    .expect("certs");
            let mut c = LinkConfig::new(id, addr(id), certs)
                .tuned_for_election(Duration::from_millis(400), Duration::from_millis(800));
            c.peers = (1..=n).filter(|p| *p != id).map(|p| (p, addr(p))).collect();
            Arc::new(Link::start(c).expect("link"))
        })
        .collect()
}
