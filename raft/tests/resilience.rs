//! What the control plane does when nodes die, lag or lie, beyond the basic failover of
//! `cluster.rs`: three nodes in one process over the in-memory network.
//!
//! Asserts: `transfer_leader` moves leadership to the named voter (asked through any
//! node) and claims go through the new leader, and refuses a node that is not a voter;
//! while a voter is down the leader keeps purging its log behind snapshots (the log stays
//! bounded), and the voter, back, catches up by a snapshot to identical tables; a corrupt
//! snapshot sent by the leader is refused with an error while raft keeps running on the
//! receiver (it still applies claims), counted in `snapshots_refused`; a follower stops
//! being ready (`/ready`) within a few heartbeats of its leader's death, before the
//! election that follows, and a leader cut off from its followers stops being ready
//! within a few heartbeats, before it steps down; a state machine torn by a machine crash (its unsynced-commit
//! marker from another boot) is rebuilt from the newest snapshot and the log.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{claim, fast, three, voters};
use openraft::raft::InstallSnapshotRequest;
use openraft::{CommittedLeaderId, LogId, SnapshotMeta};
use tessera_raft::transport::Channel;
use tessera_raft::types::TypeConfig;
use tessera_raft::{ClusterError, Op, OpResult, Role};

const T: Duration = Duration::from_secs(20);

/// A node that becomes leader stays in contact (the session lease, `in_contact`) through
/// the change: before its first quorum acknowledgement as leader is known, the contact
/// it had as a follower counts. It did not: a broker shard tick in that window ended
/// every connection of the new leader as if it had been cut off (seen as `fenced` right
/// after a leader transfer in `broker/tests/cluster_failures.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_stays_in_contact_through_the_change() {
    let lease = Duration::from_secs(2);
    let c = three(23, fast).await;
    // 10-20 ms each way: the new leader's first quorum acknowledgement comes some 30 ms
    // after its election, a window a shard tick can fall into.
    c.net.set_faults(tessera_raft::memnet::Faults {
        delay_min_us: 10_000,
        delay_max_us: 20_000,
        ..Default::default()
    });
    for round in 0..3 {
        let old = c.leader(T).await;
        let to = (1..=3).find(|i| *i != old).unwrap();
        let handle = c.node(to).handle();
        assert!(handle.in_contact(lease), "round {round}: node {to} before");
        // The old leader has led for longer than the lease, so the contact it had as a
        // follower is older than that: stepping down, it must not count as cut off
        // until the new leader's first append arrives (a shard tick there ended every
        // connection of the old leader: cluster_failures' clock test in CI).
        tokio::time::sleep(lease + Duration::from_millis(300)).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sample = |handle: tessera_raft::ClusterHandle| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut lost = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if !handle.in_contact(lease) {
                        lost += 1;
                    }
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                lost
            })
        };
        let sampler = sample(handle);
        let old_sampler = sample(c.node(old).handle());
        // A transfer over the slow network may time out: asked again, bounded.
        let mut tries = 0;
        while let Err(e) = c.node(old).transfer_leader(to).await {
            tries += 1;
            assert!(tries < 5, "round {round}: transfer to {to}: {e}");
        }
        assert_eq!(c.leader(T).await, to);
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let lost = sampler.await.unwrap();
        assert_eq!(
            lost, 0,
            "round {round}: node {to} out of contact {lost} times"
        );
        let lost = old_sampler.await.unwrap();
        assert_eq!(
            lost, 0,
            "round {round}: node {old} (the old leader) out of contact {lost} times"
        );
    }
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_leader_moves_leadership_to_the_named_voter() {
    let c = three(21, fast).await;
    let old = c.leader(T).await;
    let to = (1..=3).find(|i| *i != old).unwrap();
    let via = (1..=3).find(|i| *i != old && *i != to).unwrap();
    // Asked on a follower that is not the target: it forwards to the leader.
    c.node(via).transfer_leader(to).await.expect("transfer");
    assert_eq!(c.leader(T).await, to);
    let a = c
        .node(old)
        .handle()
        .propose(claim("after-transfer", old))
        .unwrap()
        .wait()
        .await
        .expect("claim through the new leader");
    assert!(matches!(a.result, OpResult::Claimed { .. }));
    // Transferring to the leader itself is a no-op; to a stranger, refused.
    c.node(to).transfer_leader(to).await.expect("no-op");
    assert_eq!(c.leader(T).await, to);
    let e = c.node(old).transfer_leader(9).await.unwrap_err();
    assert!(
        matches!(&e, ClusterError::Refused(m) if m.contains("not a voter")),
        "{e}"
    );
    assert_eq!(c.leader(T).await, to);
    c.applied(a.index, T).await;
    c.assert_tables_equal();
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_stays_bounded_while_a_voter_is_down_and_it_returns_by_snapshot() {
    let mut c = three(22, |c| {
        fast(c);
        c.snapshot_logs_since_last = 20;
        c.logs_kept_after_snapshot = 0;
        c.batch_ops_max = 4;
    })
    .await;
    let leader = c.leader(T).await;
    let down = (1..=3).find(|i| *i != leader).unwrap();
    c.stop(down).await;
    let h = c.node(leader).handle();
    let mut last = 0;
    for i in 0..300 {
        let a = h
            .propose(Op::RouteDelta {
                node: leader,
                filter: format!("t/{i}"),
                group: None,
                add: true,
            })
            .unwrap()
            .wait()
            .await
            .unwrap();
        last = a.index;
    }
    c.applied(last, T).await;
    // Purging is asynchronous to apply: wait until the leader purged behind its latest
    // snapshot, then check what it keeps is bounded by the snapshot policy, not by the
    // ~300 entries the down voter missed.
    let deadline = Instant::now() + T;
    let s = loop {
        let s = c.node(leader).status();
        if s.last_log_index - s.purged_index <= 60 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the leader keeps {} entries while node {down} is down: {s:?}",
            s.last_log_index - s.purged_index
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(s.purged_index > 200, "{s:?}");
    // The voter comes back behind the purged log: only a snapshot can bring it up.
    c.start(down, &voters([1, 2, 3])).await;
    c.applied(last, T).await;
    assert!(c.node(down).metrics().snapshots_installed >= 1);
    c.assert_tables_equal();
    assert_eq!(
        c.node(down)
            .handle()
            .tables()
            .unwrap()
            .routes()
            .unwrap()
            .len(),
        300
    );
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_from_the_leader_is_refused_and_raft_keeps_running() {
    let c = three(23, fast).await;
    let leader = c.leader(T).await;
    let target = (1..=3).find(|i| *i != leader).unwrap();
    let a = c
        .node(target)
        .handle()
        .propose(claim("before", target))
        .unwrap()
        .wait()
        .await
        .unwrap();
    c.applied(a.index, T).await;
    let m = c.node(leader).raft().metrics().borrow().clone();
    let meta = SnapshotMeta {
        last_log_id: Some(LogId::new(
            CommittedLeaderId::new(m.vote.leader_id.term, leader),
            a.index + 1000,
        )),
        last_membership: (*m.membership_config).clone(),
        snapshot_id: "evil".into(),
    };
    // Sent from the leader's id with the leader's vote: what a buggy or compromised
    // leader could send. Garbage, then a valid header with a truncated frame, then a
    // stream split over chunks whose second chunk does not continue the first.
    let mut header_then_junk = b"TSRSNAP\0".to_vec();
    header_then_junk.extend_from_slice(&1u16.to_le_bytes());
    header_then_junk.extend_from_slice(&64u32.to_le_bytes());
    header_then_junk.extend_from_slice(&[7u8; 10]);
    let transport = c.net.transport(leader);
    for (offset, data, done) in [
        (0u64, vec![0x5au8; 300], true),
        (0, header_then_junk.clone(), true),
        (0, header_then_junk[..10].to_vec(), false),
        (999, vec![0u8; 4], true),
    ] {
        let req = InstallSnapshotRequest::<TypeConfig> {
            vote: m.vote,
            meta: meta.clone(),
            offset,
            data,
            done,
        };
        let r = transport
            .call(target, Channel::Snapshot, tessera_raft::rpc::encode(&req))
            .await;
        if done {
            let e = r.expect_err("a corrupt snapshot is refused");
            assert!(e.to_string().contains("refused"), "{e}");
        }
    }
    assert!(c.node(target).metrics().snapshots_refused >= 3);
    // Raft still runs on the target: it serves, applies claims and is not shut down.
    let s = c.node(target).status();
    assert_ne!(s.role, Role::Shutdown, "{s:?}");
    assert_eq!(s.error, None);
    let b = c
        .node(target)
        .handle()
        .propose(claim("after", target))
        .unwrap()
        .wait()
        .await
        .expect("claims still apply on the node that got the bad snapshot");
    c.applied(b.index, T).await;
    c.assert_tables_equal();
    let v = c.node(target).handle().tables().unwrap();
    assert!(v.owner("before").unwrap().is_some() && v.owner("after").unwrap().is_some());
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_stop_being_ready_soon_after_the_leader_dies() {
    // Long election timeouts: the window between the leader's death and the next
    // election (lease 3 s + a timeout of 1.5-3 s) is wide, and /ready must turn false
    // inside it, while the followers still name the dead leader.
    let mut c = three(24, |c| {
        fast(c);
        c.election_timeout_min_ms = 1500;
        c.election_timeout_max_ms = 3000;
        c.heartbeat_interval_ms = 50;
    })
    .await;
    let old = c.leader(T).await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    // Everyone is ready while the leader lives.
    let deadline = Instant::now() + T;
    while !c.nodes.values().all(|n| n.status().ready) {
        assert!(Instant::now() < deadline, "not every node became ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.net.unregister(old);
    let mut unready_with_old_leader: BTreeMap<u64, bool> = BTreeMap::new();
    let deadline = Instant::now() + T;
    while unready_with_old_leader.len() < followers.len() {
        for id in &followers {
            let s = c.node(*id).status();
            if s.leader != Some(old) {
                // A new leader was elected before this follower turned unready.
                assert!(
                    unready_with_old_leader.contains_key(id),
                    "node {id} stayed ready until the next election: {s:?}"
                );
            } else if !s.ready {
                unready_with_old_leader.insert(*id, true);
            }
        }
        assert!(Instant::now() < deadline, "followers stayed ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // And ready again once a new leader leads them.
    c.stop(old).await;
    let new = c.leader(T).await;
    assert_ne!(new, old);
    let deadline = Instant::now() + T;
    while !c.nodes.values().all(|n| n.status().ready) {
        assert!(Instant::now() < deadline, "not ready under the new leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_followers_stops_being_ready_before_it_steps_down() {
    // Long election timeouts: a partitioned leader keeps its role for its lease plus an
    // election timeout (seconds), and cannot commit anything meanwhile; /ready (what a
    // load balancer routes CONNECTs by) must turn false within a few heartbeats.
    let c = three(26, |c| {
        fast(c);
        c.election_timeout_min_ms = 1500;
        c.election_timeout_max_ms = 3000;
        c.heartbeat_interval_ms = 50;
    })
    .await;
    let old = c.leader(T).await;
    let deadline = Instant::now() + T;
    while !c.nodes.values().all(|n| n.status().ready) {
        assert!(Instant::now() < deadline, "not every node became ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A leader with its followers stays ready (no false alarm between heartbeats).
    for _ in 0..50 {
        assert!(c.node(old).status().ready, "{:?}", c.node(old).status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.net.isolate(old, (1..=3).filter(|i| *i != old));
    let cut = Instant::now();
    loop {
        let s = c.node(old).status();
        if !s.ready {
            assert_eq!(
                s.role,
                Role::Leader,
                "it turned unready only by stepping down"
            );
            break;
        }
        assert!(cut.elapsed() < T, "the cut-off leader stayed ready: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Healed, it (or whoever leads then) is ready again.
    c.net.heal();
    let deadline = Instant::now() + T;
    while !c.nodes.values().all(|n| n.status().ready) {
        assert!(Instant::now() < deadline, "not ready after the heal");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_machine_torn_by_a_machine_crash_is_rebuilt_from_snapshot_and_log() {
    let mut c = three(25, |c| {
        fast(c);
        // The production path: synced log, unsynced state machine with its marker.
        c.fsync = true;
        c.snapshot_logs_since_last = 20;
        c.logs_kept_after_snapshot = 0;
        c.batch_ops_max = 4;
    })
    .await;
    let leader = c.leader(T).await;
    let h = c.node(leader).handle();
    let mut last = 0;
    for i in 0..120 {
        last = h
            .propose(claim(&format!("c{i}"), leader))
            .unwrap()
            .wait()
            .await
            .unwrap()
            .index;
    }
    let victim = (1..=3).find(|i| *i != leader).unwrap();
    c.applied(last, T).await;
    let sm = c.dir(victim).join("raft/sm");
    assert!(sm.join("UNSYNCED").exists(), "marker while running");
    let snapshots_before =
        c.node(victim).metrics().snapshots_built + c.node(victim).metrics().snapshots_installed;
    assert!(
        snapshots_before > 0,
        "the victim has a snapshot to rebuild from"
    );
    c.stop(victim).await;
    assert!(
        !sm.join("UNSYNCED").exists(),
        "a clean close syncs and removes it"
    );
    // What a machine crash leaves: the marker of another boot and a torn env.
    std::fs::write(sm.join("UNSYNCED"), "another-boot").unwrap();
    let len = std::fs::metadata(sm.join("data.mdb")).unwrap().len() as usize;
    std::fs::write(sm.join("data.mdb"), vec![0x5au8; len]).unwrap();
    c.start(victim, &voters([1, 2, 3])).await;
    c.applied(last, T).await;
    c.assert_tables_equal();
    assert_eq!(
        c.node(victim)
            .handle()
            .tables()
            .unwrap()
            .owner_count()
            .unwrap(),
        120
    );
    c.shutdown_all().await;
}
