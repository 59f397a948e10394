//! The shard store without a broker: records written by the writer thread
//! come back from `recover`, and follow a change of the shard count
//! (2 -> 1 -> 3) to the shard that owns them, with nothing lost or doubled.
//!
//! Method: write sessions with deliveries, inbound QoS 2 ids and delayed
//! wills, and retained messages, through `spawn_writer` on a 2-shard
//! directory; recover it with 1 and then 3 shards and compare.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use tessera_proto::{ProtocolVersion, QoS, Str, SubscriptionOptions, Will};
use tessera_shard::hash::shard_for;
use tessera_shard::mesh::PubId;
use tessera_shard::message::Message;
use tessera_shard::session::{Delivery, SubscriptionEntry};
use tessera_shard::store::{
    Batch, Recovered, RedirectState, STATE_PUBLISHED, STATE_QUEUED, SessionState, StoreConfig,
    StoreOp, recover, spawn_writer,
};
use tessera_shard::trie::ShardSet;

const MAP_BYTES: usize = 16 << 20;
const WALL_BASE_MS: u64 = 1_700_000_000_000;
/// The cluster-wide id of the stored QoS 2 publication (kept with its packet id).
const PUB_ID: tessera_shard::mesh::PubId = tessera_shard::mesh::PubId {
    origin: 77,
    shard: 0,
    seq: (3 << 62) | 3,
};

fn s(text: &str) -> Str {
    Str::try_from(text).unwrap()
}

/// A persistent v5 session `id` (expiry 600 s) that went offline at 1,000 ms.
fn offline_session(id: &str) -> StoreOp {
    StoreOp::PutSession(Box::new(SessionState {
        client_id: s(id),
        version: ProtocolVersion::V5,
        expiry_interval_s: 600,
        disconnected_at_ms: Some(1_000),
        subscriptions: Vec::new(),
        will: None,
    }))
}

fn message(topic: &str, payload: &str) -> Message {
    Message {
        topic: s(topic),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: None,
        expires_at_ms: Some(3_600_000),
        origin: None,
        received_us: 0,
    }
}

fn delivery(payload: &str, seq: u64) -> Delivery {
    Delivery {
        message: message("t", payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        subscription_ids: vec![7],
        share: None,
        seq,
    }
}

/// A `sync` writer thread for shard `k` on `env`.
fn sync_writer(
    k: usize,
    env: &heed::Env<heed::WithoutTls>,
    path: PathBuf,
) -> tessera_shard::store::StoreHandle {
    let config = StoreConfig {
        sync: true,
        batch_interval: Duration::from_millis(1),
        wall_base_ms: WALL_BASE_MS,
    };
    spawn_writer(k, env.clone(), path, config).unwrap()
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Recovers `dir` for `shards` shards and closes everything again.
fn recover_closed(dir: &Dir, shards: usize) -> Vec<Recovered> {
    let (lock, envs, recovered) = recover(&dir.0, shards, MAP_BYTES, WALL_BASE_MS).unwrap();
    for (env, _) in envs {
        env.prepare_for_closing().wait();
    }
    drop(lock);
    recovered
}

fn ids() -> Vec<String> {
    (0..20).map(|k| format!("client-{k}")).collect()
}

/// Writes the fixture through each shard's writer thread.
fn write_fixture(dir: &Dir, shards: usize) {
    let (lock, envs, _) = recover(&dir.0, shards, MAP_BYTES, WALL_BASE_MS).unwrap();
    let mut per_shard: Vec<Vec<StoreOp>> = vec![Vec::new(); shards];
    for id in ids() {
        let ops = &mut per_shard[shard_for(id.as_bytes(), shards)];
        ops.push(StoreOp::PutSession(Box::new(SessionState {
            client_id: s(&id),
            version: ProtocolVersion::V5,
            expiry_interval_s: 600,
            disconnected_at_ms: Some(1_000),
            subscriptions: vec![(
                s("t"),
                SubscriptionEntry {
                    options: SubscriptionOptions::qos(QoS::ExactlyOnce),
                    subscription_id: Some(7),
                    fresh: false,
                },
            )],
            will: None,
        })));
        ops.push(StoreOp::PutMsg {
            client_id: s(&id),
            seq: 1,
            state: STATE_PUBLISHED,
            packet_id: 11,
            delivery: delivery(&format!("{id}/1"), 1),
        });
        ops.push(StoreOp::PutMsg {
            client_id: s(&id),
            seq: 2,
            state: STATE_QUEUED,
            packet_id: 0,
            delivery: delivery(&format!("{id}/2"), 2),
        });
        ops.push(StoreOp::PutInbound {
            client_id: s(&id),
            packet_id: 5,
            seq: 3,
            redeliver: None,
            id: Some(PUB_ID),
        });
        ops.push(StoreOp::PutWill {
            client_id: s(&id),
            due_ms: 9_000,
            will: Box::new(Will {
                topic: s("will"),
                payload: Bytes::from_static(b"w"),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: Default::default(),
            }),
        });
    }
    for k in 0..10 {
        let topic = format!("r/{k}");
        let mut m = message(&topic, &format!("r{k}"));
        m.retain = true;
        per_shard[shard_for(topic.as_bytes(), shards)].push(StoreOp::PutRetained(m));
    }
    for (k, ((env, path), ops)) in envs.into_iter().zip(per_shard).enumerate() {
        let mut h = sync_writer(k, &env, path);
        h.batches.send(Batch { epoch: 1, ops }).unwrap();
        assert_eq!(
            h.committed
                .recv_timeout(Duration::from_secs(10))
                .unwrap()
                .epoch,
            1
        );
        let thread = h.thread.take().unwrap();
        drop(h);
        thread.join().unwrap();
        env.prepare_for_closing().wait();
    }
    drop(lock);
}

/// `redeliver`: whether the inbound QoS 2 id (written with origin sequence
/// number 3 and no origin marks anywhere) is to be delivered again to the
/// other shard: at the first start with the count it was written with; after
/// a change of the count, never.
fn check(recovered: &[Recovered], redeliver: bool) {
    let shards = recovered.len();
    let mut seen = Vec::new();
    for (k, r) in recovered.iter().enumerate() {
        assert_eq!(
            r.retained.len(),
            10,
            "every shard gets every retained message"
        );
        for rs in &r.sessions {
            let id = rs.client_id.to_string();
            assert_eq!(shard_for(id.as_bytes(), shards), k, "{id} on its owner");
            assert_eq!(rs.expiry_interval_s, 600);
            assert_eq!(rs.disconnected_at_ms, Some(1_000));
            assert_eq!(rs.subscriptions.len(), 1);
            assert_eq!(rs.subscriptions[0].1.options.qos, QoS::ExactlyOnce);
            let got: Vec<(u8, u16, u64, String)> = rs
                .deliveries
                .iter()
                .map(|(st, pid, d)| {
                    (
                        *st,
                        *pid,
                        d.seq,
                        String::from_utf8(d.message.payload.to_vec()).unwrap(),
                    )
                })
                .collect();
            assert_eq!(
                got,
                [
                    (STATE_PUBLISHED, 11, 1, format!("{id}/1")),
                    (STATE_QUEUED, 0, 2, format!("{id}/2"))
                ]
            );
            assert_eq!(rs.deliveries[0].2.message.expires_at_ms, Some(3_600_000));
            assert_eq!(rs.deliveries[0].2.subscription_ids, [7]);
            let mut others = ShardSet::new();
            if redeliver {
                others.insert(1 - k as u16);
                others.insert(2); // the other nodes of a cluster (the remote id)
            }
            // The publication's id stays with what may be delivered again.
            let pub_id = redeliver.then_some(PUB_ID);
            assert_eq!(rs.inbound_qos2, [(5, others, pub_id)]);
            assert_eq!(rs.delayed_will.as_ref().map(|w| w.0), Some(9_000));
            seen.push(id);
        }
        // Routes name the other shards only.
        assert!(r.routes.iter().all(|(_, s)| usize::from(*s) != k));
    }
    seen.sort();
    let mut want = ids();
    want.sort();
    assert_eq!(seen, want, "every session exactly once");
}

#[test]
fn records_follow_the_shard_count_2_to_1_to_3() {
    let dir = Dir(std::env::temp_dir().join(format!("tessera-store-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    write_fixture(&dir, 2);
    check(&recover_closed(&dir, 2), true);
    check(&recover_closed(&dir, 1), false);
    assert!(
        !dir.0.join("shard-1").exists(),
        "the emptied store is removed"
    );
    check(&recover_closed(&dir, 3), false);
    for k in 0..3 {
        assert!(dir.0.join(format!("shard-{k}")).exists());
    }
    // And once more: a start with the same count moves nothing.
    check(&recover_closed(&dir, 3), false);
}

/// A truncated env (a copy cut short) stops the start with an error naming it. Before,
/// LMDB read the missing pages through its map and the process died of SIGBUS.
#[test]
fn a_truncated_store_is_refused_naming_it_not_a_sigbus() {
    let dir = Dir(std::env::temp_dir().join(format!("tessera-store-cut-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    write_fixture(&dir, 1);
    let data = dir.0.join("shard-0").join("data.mdb");
    let len = std::fs::metadata(&data).unwrap().len();
    assert!(len > 4 * 4096, "{len}");
    // The two meta pages and one more remain.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(3 * 4096)
        .unwrap();
    let Err(e) = recover(&dir.0, 1, MAP_BYTES, WALL_BASE_MS) else {
        panic!("a truncated store is refused");
    };
    let text = e.to_string();
    assert!(text.contains("shard-0"), "{text}");
}

/// In one transaction only the last op on a delivery counts: a delivery
/// stored and deleted in the same commit is never written, one deleted and
/// written again under a new session (same ClientID, same sequence number)
/// after `DelSession` is kept; ops whose ClientIDs share a buffer (as the
/// engine's do) and ops with their own copy of it end the same.
#[test]
fn the_last_op_on_a_delivery_in_a_transaction_wins() {
    let dir = Dir(std::env::temp_dir().join(format!("tessera-store-last-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let (lock, mut envs, _) = recover(&dir.0, 1, MAP_BYTES, WALL_BASE_MS).unwrap();
    let (env, path) = envs.pop().unwrap();
    let session = |id: &str| {
        StoreOp::PutSession(Box::new(SessionState {
            client_id: s(id),
            version: ProtocolVersion::V5,
            expiry_interval_s: 600,
            disconnected_at_ms: None,
            subscriptions: Vec::new(),
            will: None,
        }))
    };
    let put = |id: &str, seq: u64, text: &str| StoreOp::PutMsg {
        client_id: s(id),
        seq,
        state: STATE_QUEUED,
        packet_id: 0,
        delivery: delivery(text, seq),
    };
    let del = |id: &str, seq: u64| StoreOp::DelMsg {
        client_id: s(id),
        seq,
    };
    // The engine's ops of one session share its ClientID's buffer (the
    // writer keys them by it); other ops here each have their own.
    let c = s("c");
    let put_c = |seq: u64, text: &str| StoreOp::PutMsg {
        client_id: c.clone(),
        seq,
        state: STATE_QUEUED,
        packet_id: 0,
        delivery: delivery(text, seq),
    };
    let ops = vec![
        session("c"),
        put_c(1, "c: acked in the same commit"),
        put_c(2, "c: deleted by a copy of the ClientID"),
        put_c(3, "c: replaced by a copy of the ClientID"),
        StoreOp::DelMsg {
            client_id: c.clone(),
            seq: 1,
        },
        del("c", 2),
        put_c(2, "c: written again"),
        put("c", 3, "c: last"),
        session("a"),
        put("a", 1, "acked in the same commit"),
        put("a", 2, "kept"),
        del("a", 1),
        session("b"),
        put("b", 1, "old session"),
        del("b", 1),
        StoreOp::DelSession { client_id: s("b") },
        session("b"),
        put("b", 1, "new session"),
    ];
    let mut h = sync_writer(0, &env, path);
    h.batches.send(Batch { epoch: 1, ops }).unwrap();
    assert_eq!(
        h.committed
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .epoch,
        1
    );
    let thread = h.thread.take().unwrap();
    drop(h);
    thread.join().unwrap();
    env.prepare_for_closing().wait();
    drop(lock);
    let r = recover_closed(&dir, 1);
    let mut got: Vec<(String, Vec<String>)> = r[0]
        .sessions
        .iter()
        .map(|rs| {
            let texts = rs
                .deliveries
                .iter()
                .map(|(_, _, d)| String::from_utf8(d.message.payload.to_vec()).unwrap())
                .collect();
            (rs.client_id.to_string(), texts)
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("a".to_owned(), vec!["kept".to_owned()]),
            ("b".to_owned(), vec!["new session".to_owned()]),
            (
                "c".to_owned(),
                vec!["c: written again".to_owned(), "c: last".to_owned()]
            )
        ]
    );
}

/// A disk tail comes back in order: `LoadQueue` reads, after its batch's
/// commit, the queued deliveries of one session from a sequence number on,
/// at most the count asked, skipping deliveries in flight and other
/// sessions' records; `ClearMsgs` below a sequence number keeps the tail.
#[test]
fn a_queue_load_returns_the_disk_tail_in_order_after_its_commit() {
    let dir = Dir(std::env::temp_dir().join(format!("tessera-store-load-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let (lock, mut envs, _) = recover(&dir.0, 1, MAP_BYTES, WALL_BASE_MS).unwrap();
    let (env, path) = envs.pop().unwrap();
    let put = |id: &str, seq: u64, state: u8| StoreOp::PutMsg {
        client_id: s(id),
        seq,
        state,
        packet_id: if state == STATE_QUEUED { 0 } else { 9 },
        delivery: delivery(&format!("{id}/{seq}"), seq),
    };
    let load = |from_seq: u64, count_max: usize| StoreOp::LoadQueue {
        client_id: s("a"),
        session: 42,
        from_seq,
        count_max,
    };
    let mut ops = vec![put("a", 1, STATE_PUBLISHED)];
    ops.extend((2..=6).map(|seq| put("a", seq, STATE_QUEUED)));
    // "ab" sorts right after "a" without the length prefix.
    ops.push(put("ab", 3, STATE_QUEUED));
    ops.push(load(1, 3));
    ops.push(StoreOp::ClearMsgs {
        client_id: s("a"),
        below_seq: 5,
    });
    let mut h = sync_writer(0, &env, path);
    h.batches.send(Batch { epoch: 1, ops }).unwrap();
    let c = h.committed.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(c.epoch, 1);
    // Read after the commit of the whole batch, the ClearMsgs after the
    // load included: what is left from seq 1 on is 5 and 6.
    let texts = |c: &tessera_shard::store::Committed| -> Vec<Vec<String>> {
        c.loaded
            .iter()
            .map(|l| {
                assert_eq!((l.client_id.as_str(), l.session), ("a", 42));
                l.deliveries
                    .iter()
                    .map(|d| String::from_utf8(d.message.payload.to_vec()).unwrap())
                    .collect()
            })
            .collect()
    };
    assert_eq!(texts(&c), [["a/5", "a/6"]]);
    h.batches
        .send(Batch {
            epoch: 2,
            ops: vec![
                put("a", 7, STATE_QUEUED),
                put("a", 8, STATE_QUEUED),
                load(6, 2),
            ],
        })
        .unwrap();
    let c = h.committed.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(texts(&c), [["a/6", "a/7"]], "from seq 6, two of three");
    let seqs: Vec<u64> = c.loaded[0].deliveries.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, [6, 7]);
    let thread = h.thread.take().unwrap();
    drop(h);
    thread.join().unwrap();
    env.prepare_for_closing().wait();
    drop(lock);
}

/// The bytes of a window part as the engine stores it: marks, then ids, each
/// (origin, shard, seq) big-endian, each list after its u32 count.
fn window_part(marks: &[(u64, u16, u64)], ids: &[(u64, u16, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for list in [marks, ids] {
        out.extend_from_slice(&(list.len() as u32).to_be_bytes());
        for (o, sh, q) in list {
            out.extend_from_slice(&o.to_be_bytes());
            out.extend_from_slice(&sh.to_be_bytes());
            out.extend_from_slice(&q.to_be_bytes());
        }
    }
    out
}

/// Commits `ops` as shard 0's batch 1 in the one-shard store at `dir`.
fn commit_ops(dir: &Dir, ops: Vec<StoreOp>) {
    let (lock, mut envs, _) = recover(&dir.0, 1, MAP_BYTES, WALL_BASE_MS).unwrap();
    let (env, path) = envs.pop().unwrap();
    let mut h = sync_writer(0, &env, path);
    h.batches.send(Batch { epoch: 1, ops }).unwrap();
    let committed = h.committed.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(committed.epoch, 1);
    let thread = h.thread.take().unwrap();
    drop(h);
    thread.join().unwrap();
    env.prepare_for_closing().wait();
    drop(lock);
}

/// Puts `value` under `key` in shard 0's `meta` as is (without `recover`,
/// which refuses a corrupt store).
fn put_raw_meta(dir: &Dir, key: &[u8], value: &[u8]) {
    let mut opts = heed::EnvOpenOptions::new().read_txn_without_tls();
    opts.map_size(MAP_BYTES).max_dbs(6);
    // SAFETY: the test's own store, opened once at a time.
    let env = unsafe { opts.open(dir.0.join("shard-0")) }.unwrap();
    let w = env.write_txn().unwrap();
    env.create_databases_and_commit(w, |opener, w| {
        let meta =
            opener.create_database::<heed::types::Bytes, heed::types::Bytes>(w, Some("meta"))?;
        meta.put(w, key, value)?;
        Ok::<_, heed::Error>(heed::CommitOrAbort::<_, ()>::Commit(()))
    })
    .unwrap();
    env.prepare_for_closing().wait();
}

/// Issue 15, cause C: the `PubId` marks a shard handled and the windows of
/// sessions that moved to it come back from its store (a mark of the same
/// origin shard and class replaces the one before; window parts in order).
/// A mark not raised within `PUB_MARK_KEEP_MS` before the start, a window
/// whose session is gone, and all of them after a change of the shard count
/// are dropped and deleted. A corrupt value stops the start with its key.
#[test]
fn publication_marks_and_windows_come_back_and_age_out() {
    use tessera_shard::mesh::PubId;
    use tessera_shard::store::PUB_MARK_KEEP_MS;

    let dir = Dir(std::env::temp_dir().join(format!("tessera-store-pid-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let session = |id: &str| offline_session(id);
    let mark = |origin: u64, shard: u16, seq: u64, at_ms: u64| StoreOp::PutPubMark {
        origin,
        shard,
        seq,
        at_ms,
    };
    let part = |id: &str, part: u32, bytes: Vec<u8>| StoreOp::PutWindow {
        client_id: s(id),
        part,
        expires_ms: 40_000,
        bytes,
    };
    let qos2 = |n: u64| (2 << 62) | n;
    commit_ops(
        &dir,
        vec![
            session("s"),
            session("gone"),
            session("ended"),
            mark(7, 0, qos2(5), 1_000),
            mark(7, 0, qos2(9), 2_000),
            mark(7, 1, 3, 1_000),
            part("s", 0, window_part(&[(5, 0, 3)], &[(5, 0, 4)])),
            part("s", 1, window_part(&[], &[(5, 0, 6)])),
            part("gone", 0, window_part(&[], &[(5, 0, 7)])),
            StoreOp::DelSession {
                client_id: s("gone"),
            },
            part("ended", 0, window_part(&[], &[(5, 0, 8)])),
            StoreOp::DelWindow {
                client_id: s("ended"),
            },
            part("nobody", 0, window_part(&[], &[(5, 0, 9)])),
        ],
    );
    let r = recover_closed(&dir, 1);
    let mut marks = r[0].pub_marks.clone();
    marks.sort();
    assert_eq!(marks, [(7, 0, qos2(9)), (7, 1, 3)]);
    let [w] = &r[0].windows[..] else {
        panic!("one window: {:?}", r[0].windows);
    };
    assert_eq!(w.client_id, s("s"));
    assert_eq!((w.expires_ms, w.parts), (40_000, 2));
    assert_eq!(w.marks, [(5, 0, 3)]);
    let id = |seq| PubId {
        origin: 5,
        shard: 0,
        seq,
    };
    assert_eq!(w.ids, [id(4), id(6)]);

    // Started later: a mark raised at 1 000 is older than the bound; the one
    // raised at 2 000 is not yet. The one dropped is deleted.
    let later = WALL_BASE_MS + PUB_MARK_KEEP_MS + 1_500;
    let (lock, envs, r) = recover(&dir.0, 1, MAP_BYTES, later).unwrap();
    assert_eq!(r[0].pub_marks, [(7, 0, qos2(9))]);
    for (env, _) in envs {
        env.prepare_for_closing().wait();
    }
    drop(lock);
    assert_eq!(recover_closed(&dir, 1)[0].pub_marks, [(7, 0, qos2(9))]);

    // Corrupt values: an error naming the key, no panic.
    let mut key = b"pid/".to_vec();
    key.extend_from_slice(&7u64.to_be_bytes());
    key.extend_from_slice(&0u16.to_be_bytes());
    key.push(2);
    put_raw_meta(&dir, &key, &[1, 2, 3]);
    let err = recover(&dir.0, 1, MAP_BYTES, WALL_BASE_MS).unwrap_err();
    assert!(err.to_string().contains("publication id mark"), "{err}");
    let mut value = qos2(9).to_le_bytes().to_vec();
    value.extend_from_slice(&WALL_BASE_MS.to_le_bytes());
    put_raw_meta(&dir, &key, &value);
    let mut key = b"win/".to_vec();
    key.push(1);
    key.push(b's');
    key.extend_from_slice(&1u32.to_be_bytes());
    let mut truncated = 0u64.to_le_bytes().to_vec();
    truncated.extend_from_slice(&window_part(&[], &[(5, 0, 6)])[..20]);
    put_raw_meta(&dir, &key, &truncated);
    let err = recover(&dir.0, 1, MAP_BYTES, WALL_BASE_MS).unwrap_err();
    assert!(err.to_string().contains("window part"), "{err}");
    let mut fixed = 0u64.to_le_bytes().to_vec();
    fixed.extend_from_slice(&window_part(&[], &[(5, 0, 6)]));
    put_raw_meta(&dir, &key, &fixed);
    assert_eq!(recover_closed(&dir, 1)[0].windows.len(), 1);

    // Another shard count: they name what other shards handled; gone for good.
    let r = recover_closed(&dir, 2);
    assert!(
        r.iter()
            .all(|r| r.pub_marks.is_empty() && r.windows.is_empty())
    );
    let r = recover_closed(&dir, 1);
    assert!(r[0].pub_marks.is_empty() && r[0].windows.is_empty());
}

/// Sim seeds 70 and 660 (`sync`): the deliveries a moved-in session's window held
/// back for its old owner's redirects come back with their session, in the order
/// they were held, and follow it to another shard after a change of the shard
/// count. One released (`DelHeld`) or whose session was deleted does not come back;
/// one of no session is deleted.
#[test]
fn held_deliveries_come_back_with_their_session_and_follow_it() {
    let dir = Dir(std::env::temp_dir().join(format!("tessera-store-held-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let session = |id: &str| offline_session(id);
    let held = |id: &str, seq: u64, payload: &str| StoreOp::PutHeld {
        client_id: s(id),
        seq,
        delivery: delivery(payload, 0),
    };
    commit_ops(
        &dir,
        vec![
            session("s"),
            session("gone"),
            held("s", 2, "second"),
            held("s", 1, "first"),
            held("s", 3, "released"),
            StoreOp::DelHeld {
                client_id: s("s"),
                seq: 3,
            },
            held("gone", 4, "of a deleted session"),
            StoreOp::DelSession {
                client_id: s("gone"),
            },
            held("nobody", 5, "of no session"),
        ],
    );
    let got = |r: &Recovered| -> Vec<(String, u64, String)> {
        r.held
            .iter()
            .map(|(c, d)| {
                let text = String::from_utf8_lossy(&d.message.payload).into_owned();
                (c.to_string(), d.seq, text)
            })
            .collect()
    };
    let want = [
        ("s".to_owned(), 1, "first".to_owned()),
        ("s".to_owned(), 2, "second".to_owned()),
    ];
    assert_eq!(got(&recover_closed(&dir, 1)[0]), want);
    // With their session on whichever shard owns it now.
    for shards in [3, 1] {
        let r = recover_closed(&dir, shards);
        let owner = r
            .iter()
            .position(|r| r.sessions.iter().any(|x| x.client_id == s("s")))
            .expect("the session");
        for (k, r) in r.iter().enumerate() {
            if k == owner {
                assert_eq!(got(r), want, "{shards} shards");
            } else {
                assert!(r.held.is_empty(), "{shards} shards, shard {k}");
            }
        }
    }
    // The one of no session was deleted at the first start: a session of that
    // ClientID made since does not get it.
    commit_ops(&dir, vec![session("nobody")]);
    assert_eq!(got(&recover_closed(&dir, 1)[0]), want);
}

/// Issue 15 (h154's last "not covered" case): what a moved session's confirmed ghost
/// sent on and its new node had not accepted comes back in the order it was sent,
/// with its destination and id, whatever became of the session's records (their
/// delete does not take it), and goes to the shard that owns its ClientID after a
/// change of the shard count. One accepted (`DelRedirect`) does not come back.
#[test]
fn stored_redirects_come_back_in_order_and_follow_their_client_id() {
    let dir =
        Dir(std::env::temp_dir().join(format!("tessera-store-redirects-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let id = |n: u64| PubId {
        origin: 5,
        shard: 1,
        seq: 2 << 62 | n,
    };
    let redirect = |seq: u64, payload: &str| StoreOp::PutRedirect {
        seq,
        redirect: Box::new(RedirectState {
            client_id: s("s"),
            to: (2, 99),
            message: message("t", payload),
            id: Some(id(seq)),
        }),
    };
    commit_ops(
        &dir,
        vec![
            offline_session("s"),
            redirect(2, "second"),
            redirect(1, "first"),
            redirect(3, "accepted"),
            StoreOp::DelRedirect {
                client_id: s("s"),
                seq: 3,
            },
            StoreOp::DelSession { client_id: s("s") },
        ],
    );
    type Sent = (u64, String, (u64, u64), Option<PubId>);
    let got = |r: &Recovered| -> Vec<Sent> {
        let mut v: Vec<_> = r
            .redirects
            .iter()
            .map(|(seq, r)| {
                let text = String::from_utf8_lossy(&r.message.payload).into_owned();
                assert_eq!(r.client_id, s("s"));
                (*seq, text, r.to, r.id)
            })
            .collect();
        v.sort_by_key(|r| r.0);
        v
    };
    let want = vec![
        (1, "first".to_owned(), (2, 99), Some(id(1))),
        (2, "second".to_owned(), (2, 99), Some(id(2))),
    ];
    assert_eq!(got(&recover_closed(&dir, 1)[0]), want);
    for shards in [3, 1] {
        let r = recover_closed(&dir, shards);
        let owner = shard_for(b"s", shards);
        for (k, r) in r.iter().enumerate() {
            if k == owner {
                assert_eq!(got(r), want, "{shards} shards");
            } else {
                assert!(r.redirects.is_empty(), "{shards} shards, shard {k}");
            }
        }
    }
}
