//! The control plane as the broker uses it: three (or four) nodes in one process over the
//! in-memory network, driven only through `ControlPlane` and `ClusterHandle`.
//! Asserts: a leader is elected; claims proposed on any node are applied everywhere with
//! unique, increasing epochs per ClientID and identical tables; a new leader takes claims
//! after the leader stops; a fourth node joins as a voter and leaves; a lagging node is
//! caught up by a snapshot after the log was purged; a full proposal channel answers
//! `Busy`; a restart with another node id or peer list, or a corrupt store, is refused
//! with a message naming the cause, and the data dir is left as it was.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Cluster, claim, fast, three, voters};
use tessera_raft::transport::Channel;
use tessera_raft::{ClusterError, Op, OpResult, StartError};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_from_every_node_apply_everywhere_with_unique_epochs() {
    let c = three(1, |c| {
        fast(c);
        // Real fsync here: the production path (blocking pool, synced commits).
        c.fsync = true;
    })
    .await;
    let leader = c.leader(T).await;
    let sub = c.node(leader).handle().subscribe(100_000);
    let mut pending = Vec::new();
    for round in 0..50 {
        for id in 1..=3u64 {
            let h = c.node(id).handle();
            // The same 10 ClientIDs claimed again and again from different nodes.
            let cid = format!("client-{}", round % 10);
            pending.push((cid.clone(), id, h.propose(claim(&cid, id)).expect("queued")));
        }
    }
    let mut epochs: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    let mut max_index = 0;
    for (cid, _node, p) in pending {
        let a = p.wait().await.expect("applied");
        max_index = max_index.max(a.index);
        match a.result {
            OpResult::Claimed { epoch, .. } => {
                epochs.entry(cid).or_default().push((a.index, epoch))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for (cid, mut list) in epochs {
        list.sort();
        let mut seen = std::collections::BTreeSet::new();
        for w in list.windows(2) {
            assert!(
                w[0].1 < w[1].1,
                "{cid}: epochs not increasing with the log: {list:?}"
            );
        }
        for (_, e) in &list {
            assert!(seen.insert(*e), "{cid}: epoch {e} twice");
        }
    }
    c.applied(max_index, T).await;
    c.assert_tables_equal();
    // The owner of each ClientID on every node is the last claim's node.
    let v = c.node(2).handle().tables().unwrap();
    assert_eq!(v.owner_count().unwrap(), 10);
    // The subscription saw the claims (150) and the node announcements.
    let mut claims = 0;
    while let Ok(ev) = sub.try_recv() {
        if let tessera_raft::AppliedEvent::Entry(e) = ev {
            claims += e
                .changes
                .iter()
                .filter(|(op, _)| matches!(op, Op::ClaimSession { .. }))
                .count();
        }
    }
    assert_eq!(claims, 150);
    let m = c.node(1).metrics();
    assert!(
        m.ops_per_entry.count > 0 && m.commit_latency_us.count >= 50,
        "{m:?}"
    );
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_takes_claims_after_the_leader_stops() {
    let mut c = three(2, fast).await;
    let old = c.leader(T).await;
    c.stop(old).await;
    let other = (1..=3).find(|i| *i != old).unwrap();
    let a = c
        .node(other)
        .handle()
        .propose(claim("after-failover", other))
        .unwrap()
        .wait()
        .await
        .expect("claim after failover");
    assert!(matches!(a.result, OpResult::Claimed { .. }));
    let new = c.leader(T).await;
    assert_ne!(new, old);
    // The stopped node restarts from its data dir, catches up, no manual step.
    c.start(old, &voters([1, 2, 3])).await;
    c.applied(a.index, T).await;
    c.assert_tables_equal();
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_as_voter_and_a_node_leaves() {
    let mut c = three(3, fast).await;
    let leader = c.leader(T).await;
    // Node 4 starts with no initial voters and joins through a follower.
    c.start(4, &BTreeMap::new()).await;
    let via = (1..=3).find(|i| *i != leader).unwrap();
    c.node(4).join(via).await.expect("join");
    let s = c.node(leader).status();
    let four = s.members.iter().find(|m| m.id == 4).expect("member 4");
    assert_ne!(four.role, tessera_raft::Role::Learner, "{s:#?}");
    // Joining again is a no-op; another node claiming id 4 from another address is refused.
    c.node(4).join(via).await.expect("idempotent join");
    let mut imposter = c.config(4, &BTreeMap::new());
    imposter.self_info.cluster_addr = "127.0.0.1:7999".into();
    let r = c
        .node(via)
        .add_learner(4, imposter.self_info.clone())
        .await
        .unwrap_err();
    assert!(r.to_string().contains("already taken"), "{r}");
    // A follower leaves, and the answer is lost on the way back (the leader drops its
    // link to a node as soon as the change that removes it commits): the leave is
    // done, so it reports done.
    let leaver = (1..=3).find(|i| *i != leader && *i != via).unwrap();
    c.net.lose_next_answer(leaver, Channel::Admin);
    c.node(leaver).leave().await.expect("leave");
    let s = c.node(leader).cluster_status().await;
    assert!(s.members.iter().all(|m| m.id != leaver), "{s:#?}");
    let a = c
        .node(4)
        .handle()
        .propose(claim("x", 4))
        .unwrap()
        .wait()
        .await
        .unwrap();
    c.stop(leaver).await;
    c.applied(a.index, T).await;
    c.assert_tables_equal();
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_purged_log_catches_up_by_snapshot() {
    let mut c = three(4, |c| {
        fast(c);
        c.snapshot_logs_since_last = 20;
        c.logs_kept_after_snapshot = 0;
        c.batch_ops_max = 4;
    })
    .await;
    let leader = c.leader(T).await;
    let h = c.node(leader).handle();
    let mut last = 0;
    for i in 0..300 {
        let a = h
            .propose(Op::RouteDelta {
                node: leader,
                filter: format!("t/{i}"),
                group: (i % 3 == 0).then(|| "g".to_string()),
                add: true,
            })
            .unwrap()
            .wait()
            .await
            .unwrap();
        last = a.index;
    }
    c.applied(last, T).await;
    let s = c.node(leader).status();
    assert!(s.purged_index > 0, "log purged behind a snapshot: {s:?}");
    // A new node starts behind the purged log: only a snapshot can bring it up.
    c.start(4, &BTreeMap::new()).await;
    c.node(4).join(leader).await.expect("join");
    c.applied(last, T).await;
    assert!(c.node(4).metrics().snapshots_installed >= 1);
    c.assert_tables_equal();
    assert_eq!(
        c.node(4).handle().tables().unwrap().routes().unwrap().len(),
        300
    );
    // The data dir stays bounded: one snapshot file and its meta.
    let snaps: Vec<_> = std::fs::read_dir(c.dir(4).join("raft/snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("recv-"))
        .collect();
    // (A `recv-*.tmp` may exist: a transfer openraft began and abandoned; the next
    // receive or restart removes it.)
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_proposal_channel_answers_busy_at_once() {
    let c = three(5, |c| {
        fast(c);
        c.batch_ops_max = 1;
        c.proposal_queue_max = 1;
        c.batches_in_flight_max = 1;
    })
    .await;
    c.leader(T).await;
    let h = c.node(1).handle();
    let mut busy = 0;
    let mut pending = Vec::new();
    for i in 0..500 {
        match h.propose(claim(&format!("c{i}"), 1)) {
            Ok(p) => pending.push(p),
            Err(ClusterError::Busy) => busy += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(busy > 0);
    assert_eq!(c.node(1).metrics().proposals_busy, busy);
    for p in pending {
        p.wait().await.expect("queued ones apply");
    }
    c.shutdown_all().await;
}

/// A proposal still in the channel when the control plane stops is answered, so its
/// waiter, which keeps a handle (a shard's claim, the forwarder's route proposal), lets
/// the store go and the node can start again in the same process. Before, it waited
/// forever: the queued proposal lived in the channel every handle keeps (data-plane
/// simulation seed 335: a crashed node could not restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_queued_when_the_control_plane_stops_is_answered() {
    let mut c = Cluster::new(7, |c| {
        fast(c);
        c.batch_ops_max = 1;
        c.batches_in_flight_max = 1;
        c.proposal_timeout_ms = 60_000;
    });
    // Node 1 alone of three voters: no leader, so the first batch waits for one and
    // keeps the only permit, and the second proposal stays in the channel.
    let v = voters([1, 2, 3]);
    c.start(1, &v).await;
    let h = c.node(1).handle();
    let first = h.propose(claim("first", 1)).unwrap();
    let queued = h.propose(claim("queued", 1)).unwrap();
    let waiter = tokio::spawn(async move {
        let r = queued.wait().await;
        drop(h);
        r
    });
    // Waits until nothing holds the store any more.
    c.stop(1).await;
    let r = waiter.await.unwrap();
    assert!(matches!(r, Err(ClusterError::Shutdown(_))), "{r:?}");
    let r = first.wait().await;
    assert!(matches!(r, Err(ClusterError::Shutdown(_))), "{r:?}");
    c.start(1, &v).await;
    let r = c.node(1).handle().propose(claim("again", 1));
    assert!(r.is_ok(), "{r:?}");
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_restart_settings_and_corrupt_stores_are_refused_untouched() {
    let mut c = three(6, fast).await;
    c.leader(T).await;
    c.stop(3).await;
    let files = |c: &Cluster| {
        let mut v: Vec<_> = std::fs::read_dir(c.dir(3).join("raft"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| (e.file_name(), std::fs::read(e.path()).unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = files(&c);
    let mut wrong_id = c.config(3, &voters([1, 2, 3]));
    wrong_id.node_id = 5;
    wrong_id.data_dir = c.dir(3);
    wrong_id.initial_voters = BTreeMap::new();
    let e = c.try_start(wrong_id).await.unwrap_err();
    assert!(
        matches!(
            e,
            StartError::NodeIdMismatch {
                stored: 3,
                configured: 5,
                ..
            }
        ),
        "{e}"
    );
    let wrong_peers = c.config(3, &voters([1, 2, 3, 4]));
    let e = c.try_start(wrong_peers).await.unwrap_err();
    assert!(matches!(e, StartError::PeersMismatch { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003"),
        "{e}"
    );
    let mut bad = c.config(3, &voters([1, 2, 3]));
    bad.heartbeat_interval_ms = 10_000;
    let e = c.try_start(bad).await.unwrap_err();
    assert!(
        e.to_string().starts_with("cluster.heartbeat_interval_ms"),
        "{e}"
    );
    let after = files(&c);
    for ((n1, b1), (n2, b2)) in before.iter().zip(&after) {
        assert_eq!(n1, n2);
        // lock.mdb is LMDB's reader table, rewritten by every open.
        if n1 != "lock.mdb" {
            assert!(b1 == b2, "a refused start changed {n1:?}");
        }
    }

    // A corrupt data file: a clear error naming it, no panic, nothing rewritten.
    let data = c.dir(3).join("raft").join("data.mdb");
    let len = std::fs::metadata(&data).unwrap().len() as usize;
    std::fs::write(&data, vec![0xa5u8; len]).unwrap();
    let garbage = std::fs::read(&data).unwrap();
    let e = c
        .try_start(c.config(3, &voters([1, 2, 3])))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("data.mdb"), "{e}");
    assert_eq!(std::fs::read(&data).unwrap(), garbage);
    c.shutdown_all().await;
}
