//! Goal: a node with a bad disk, bad certificates or a wrong clock (issue 16) gives a
//! clear error and stops serving or refuses to start, and the rest of the cluster is not
//! affected: it keeps a leader and keeps serving QoS 1 without losing an acknowledged
//! message. docs/ARCHITECTURE.md "Cluster: disks, certificates and clocks" is the
//! operator's side of these tests.
//!
//! Method: 3 real broker processes (`common::cluster`, one shard each) under a little
//! QoS 1 load (`Load`: a rumqttc publisher on one node, one message in flight, and a
//! persistent rumqttc subscriber on another; every PUBACKed number must arrive). The
//! faults: node 3's raft store overwritten, truncated, emptied or replaced by a file of
//! another kind, then the way back (remove the node, move its raft dir away, --join);
//! node 3 with a certificate from another CA, node 3 with an expired certificate, node 2
//! with node 3's certificate; node 3's data dir filled to ENOSPC; node 3's wall clock an
//! hour ahead, then stepped back. The disk-full and clock tests need root (a tmpfs) or
//! libfaketime and run with `--features third-party` (`scripts/test-third-party.sh`):
//! `third_party` below. Every wait is bounded; processes, mounts and directories are
//! removed by guards, also when an assertion fails.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::cluster::{CLUSTER_TIMEOUT, Cluster};
use common::{brokerctl, run_bounded};
use serde_json::Value;
use tessera_raft::link::certs::{ca_cert_path, ca_key_path, make_cluster_certs, node_cert_path};

/// The longest a load client waits for one answer while its nodes are healthy.
const ANSWER: Duration = Duration::from_secs(10);

fn options(addr: SocketAddr, id: &str, clean: bool) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(clean);
    o
}

/// A QoS 1 stream across two nodes: a publisher at `from` sends the numbers `0..` to
/// `topic`, each after the previous one's PUBACK, until stopped; a persistent subscriber
/// at `to` (subscribed before the first message) records what arrives.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<u64>>>,
    received: Arc<Mutex<BTreeSet<u64>>>,
    publisher: Option<JoinHandle<()>>,
    subscriber: Option<JoinHandle<()>>,
    sub_stop: Arc<AtomicBool>,
}

impl Load {
    /// `strict`: every message is acknowledged within `ANSWER` (both nodes healthy).
    fn start(tag: &str, from: SocketAddr, to: SocketAddr, strict: bool) -> Load {
        let topic = format!("load/{tag}");
        let stop = Arc::new(AtomicBool::new(false));
        let sub_stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(BTreeSet::new()));
        let (sub, mut sub_conn) =
            rumqttc::Client::new(options(to, &format!("{tag}-sub"), false), 100);
        sub.subscribe(&topic, rumqttc::QoS::AtLeastOnce)
            .expect("subscribe");
        let deadline = Instant::now() + ANSWER;
        loop {
            match sub_conn.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("{tag}: no SUBACK: {other:?}"),
            }
        }
        let subscriber = {
            let (received, sub_stop) = (received.clone(), sub_stop.clone());
            thread::spawn(move || {
                let _keep = sub;
                while !sub_stop.load(Ordering::Relaxed) {
                    // Long enough for a reconnect (a `recv_timeout` that ends while
                    // rumqttc connects drops that connection).
                    match sub_conn.recv_timeout(Duration::from_secs(2)) {
                        Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                            if let Ok(n) = std::str::from_utf8(&p.payload).unwrap().parse() {
                                received.lock().unwrap().insert(n);
                            }
                        }
                        Ok(Ok(_)) | Err(_) => {}
                        // A connection error: rumqttc reconnects on the next poll.
                        Ok(Err(_)) => thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
        };
        let publisher = {
            let (acked, stop) = (acked.clone(), stop.clone());
            let id = format!("{tag}-pub");
            thread::spawn(move || {
                let mut o = options(from, &id, true);
                o.set_inflight(1);
                let (client, mut conn) = rumqttc::Client::new(o, 10);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    client
                        .publish(&topic, rumqttc::QoS::AtLeastOnce, false, n.to_string())
                        .expect("queue publish");
                    // Waits for the PUBACK, at most `ANSWER` when `strict`, else until
                    // stopped (a stream into a node that ended waits for it to come
                    // back). Not in short slices: a `recv_timeout` that ends while
                    // rumqttc connects drops that connection, and a CONNECT that
                    // waits for a claim takes longer than a slice.
                    let acked_now = loop {
                        match conn.recv_timeout(ANSWER) {
                            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => {
                                break true;
                            }
                            Ok(Ok(_)) => {}
                            Err(rumqttc::RecvTimeoutError::Timeout) => {
                                assert!(!strict, "{id}: no PUBACK for {n} within {ANSWER:?}");
                                if stop.load(Ordering::Relaxed) {
                                    break false;
                                }
                            }
                            other => panic!("{id}: {other:?}"),
                        }
                    };
                    if !acked_now {
                        break;
                    }
                    acked.lock().unwrap().push(n);
                    n += 1;
                    thread::sleep(Duration::from_millis(5));
                }
                let _ = client.disconnect();
                let _ = conn.recv_timeout(Duration::from_millis(200));
            })
        };
        Load {
            stop,
            acked,
            received,
            publisher: Some(publisher),
            subscriber: Some(subscriber),
            sub_stop,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` further messages were acknowledged (the load goes on).
    fn wait_progress(&self, more: usize, what: &str) {
        let want = self.acked() + more;
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        while self.acked() < want {
            assert!(
                Instant::now() < deadline,
                "{what}: the load stalled at {} PUBACKs",
                self.acked()
            );
            assert!(
                !self.publisher.as_ref().unwrap().is_finished(),
                "{what}: the publisher failed"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the publisher and checks that every acknowledged message arrived.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.publisher
            .take()
            .unwrap()
            .join()
            .expect("the publisher failed");
        let acked: Vec<u64> = self.acked.lock().unwrap().clone();
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let missing: Vec<u64> = {
                let got = self.received.lock().unwrap();
                acked.iter().filter(|n| !got.contains(n)).copied().collect()
            };
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} acknowledged messages never arrived: {:?}",
                missing.len(),
                acked.len(),
                &missing[..missing.len().min(20)]
            );
            thread::sleep(Duration::from_millis(100));
        }
        acked.len()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.sub_stop.store(true, Ordering::Relaxed);
        for t in [self.publisher.take(), self.subscriber.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
    }
}

/// A 3-node cluster with a leader, under load from node 1 to node 2.
fn three(tag: &str, envs: &[(&str, &str)]) -> (Cluster, Load) {
    let mut cluster = Cluster::new(tag, 3, 3, envs);
    for id in 1..=3 {
        cluster.start(id, &[], false);
    }
    cluster.wait_for_leader();
    let load = Load::start(tag, cluster.node(1).addr(), cluster.node(2).addr(), true);
    load.wait_progress(20, "before the fault");
    (cluster, load)
}

/// Node `id` started as a process that must refuse to start: its output.
fn start_refused(cluster: &Cluster, id: u64) -> Output {
    let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
    args.extend(cluster.args(id));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let envs: Vec<(&str, &str)> = cluster
        .envs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    run_bounded(&args, &envs, CLUSTER_TIMEOUT)
}

/// The start was refused with exit code 2 and a message containing every one of
/// `expected`, with no panic and no signal.
fn assert_refused(out: &Output, expected: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    for text in expected {
        assert!(stderr.contains(text), "no {text:?} in: {stderr}");
    }
    stderr
}

/// The two healthy nodes still have a leader among them and are ready.
fn assert_others_serve(cluster: &Cluster, load: &Load, what: &str) {
    let (leader, _) = cluster.wait_for_leader();
    assert!(leader != 3, "{what}: node 3 leads");
    load.wait_progress(20, what);
}

fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

#[test]
fn a_corrupt_raft_store_refuses_the_start_and_the_node_rejoins_as_a_new_member() {
    let (mut cluster, load) = three("corrupt", &[]);
    cluster.kill(3);
    let raft = Path::new(&cluster.data_dir(3)).join("raft");
    let data = raft.join("data.mdb");
    let good = std::fs::read(&data).unwrap();
    let path = data.to_str().unwrap().to_owned();
    let restore = || std::fs::write(&data, &good).unwrap();

    // Pages after the meta pages zeroed (sectors lost).
    overwrite(&data, 2 * 4096, &vec![0; good.len() - 2 * 4096]);
    assert_refused(
        &start_refused(&cluster, 3),
        &[&path, "move it away and rejoin"],
    );
    // Random bytes (a stray write): LMDB follows the page numbers and sizes it finds,
    // and a garbage size may reach past the end of the file, a SIGBUS that was a death
    // without a word; either way now a refused start that names the place.
    restore();
    overwrite(&data, 2 * 4096, &vec![0xa5; good.len() - 2 * 4096]);
    let stderr = assert_refused(&start_refused(&cluster, 3), &[]);
    assert!(
        stderr.contains(&path) || stderr.contains(&cluster.data_dir(3)),
        "{stderr}"
    );
    assert_others_serve(&cluster, &load, "after an overwritten raft store");
    // Cut short after its meta pages: was a SIGBUS (exit 135) without a word.
    restore();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(3 * 4096)
        .unwrap();
    assert_refused(&start_refused(&cluster, 3), &[&path]);
    // A file of another kind.
    std::fs::write(&data, b"not an LMDB file\n").unwrap();
    assert_refused(&start_refused(&cluster, 3), &[&path, "not an LMDB file"]);
    // Emptied: was started as a blank member that had lost its vote.
    std::fs::write(&data, b"").unwrap();
    assert_refused(&start_refused(&cluster, 3), &[&path, "is empty", "--join"]);
    assert_others_serve(&cluster, &load, "after node 3's refused starts");

    // The way back the messages name: remove node 3, move its raft dir away, --join.
    let url = format!("http://{}", cluster.node(1).admin_addr());
    let deadline = Instant::now() + CLUSTER_TIMEOUT;
    loop {
        let out = brokerctl(&["cluster", "remove", "3", "--url", &url], &[]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "brokerctl cluster remove 3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        thread::sleep(Duration::from_millis(200));
    }
    std::fs::rename(&raft, raft.with_file_name("raft.corrupt")).unwrap();
    let seed = cluster.addrs[0].to_string();
    cluster.start(3, &["--join", &seed], true);
    cluster.wait_until("node 3 is a voter again", |c| {
        c.status(1).is_some_and(|v| {
            v["members"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["id"] == 3 && (m["role"] == "follower" || m["role"] == "leader"))
        })
    });
    cluster.wait_for_leader();
    load.wait_progress(20, "after node 3 rejoined");
    load.finish();
}

/// A SIGBUS (what a read past the end of a mapped store file is) ends the broker with
/// exit code 2 and a line naming the data dir, not a death without a word. Sent with
/// kill(2) here: the handler is the same for a fault.
#[test]
fn a_sigbus_names_the_data_dir_and_exits_2() {
    let mut broker = common::Broker::start_with(&["--shards", "1"], &[]);
    let pid = libc::pid_t::try_from(broker.pid()).unwrap();
    // SAFETY: kill(2) with the pid of the child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGBUS) }, 0);
    let status = broker.wait_exit(CLUSTER_TIMEOUT);
    assert_eq!(status.code(), Some(2), "{status:?}");
    let log = broker.log();
    assert!(
        log.contains("failed (SIGBUS): a store file there is corrupt"),
        "{log}"
    );
}

#[test]
fn a_node_stopped_with_sigterm_leaves_its_raft_state_machine_clean() {
    // The state machine commits unsynced and marks it (`raft/sm/UNSYNCED`); a clean stop
    // syncs it and removes the mark, or the next start after a machine reboot rebuilds
    // it from the snapshot and the log. The shards and the admin API hold the store until
    // the process exits, so the stop must close it explicitly.
    let mut cluster = Cluster::new("sigterm", 1, 1, &[]);
    cluster.start(1, &[], false);
    cluster.wait_for_leader();
    let marker = Path::new(&cluster.data_dir(1)).join("raft/sm/UNSYNCED");
    assert!(
        marker.exists(),
        "no {} while the node runs",
        marker.display()
    );
    let node = cluster.nodes[0].as_mut().unwrap();
    node.sigterm();
    let status = node.wait_exit(CLUSTER_TIMEOUT);
    assert!(status.success(), "{status:?}:\n{}", node.log());
    assert!(
        !marker.exists(),
        "{} left after SIGTERM:\n{}",
        marker.display(),
        node.log()
    );
}

/// Makes `dir` a certificate directory whose `node-<id>` certificate is signed by
/// `ca_dir`'s CA but expired (valid in 2020 only).
fn expired_cert(ca_dir: &Path, id: u64, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ca_pem = std::fs::read_to_string(ca_cert_path(ca_dir)).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_key_path(ca_dir)).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let name = format!("node-{id}");
    let mut params = rcgen::CertificateParams::new(vec![name.clone()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name.clone());
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(node_cert_path(dir, id), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

#[test]
fn wrong_certificates_are_refused_with_a_clear_error_and_the_others_serve() {
    let mut cluster = Cluster::new("certs", 3, 3, &[]);
    for id in 1..=2 {
        cluster.start(id, &[], false);
    }
    cluster.wait_for_leader();
    let load = Load::start(
        "certs",
        cluster.node(1).addr(),
        cluster.node(2).addr(),
        true,
    );
    load.wait_progress(20, "two of three nodes");
    let root = Path::new(cluster.dir.path_str()).to_path_buf();

    // An expired certificate from the right CA: refused at start, saying so.
    let expired = root.join("expired");
    expired_cert(&cluster.certs, 3, &expired);
    let with = |certs: &Path, id: u64| {
        let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
        args.extend(cluster.args(id));
        let at = args.iter().position(|a| a == "--cluster-certs").unwrap();
        args[at + 1] = certs.to_str().unwrap().to_owned();
        let at = args.iter().position(|a| a == "--data-dir").unwrap();
        args[at + 1] = root
            .join(format!("other-{id}"))
            .to_str()
            .unwrap()
            .to_owned();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = cluster
            .envs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        run_bounded(&args, &envs, CLUSTER_TIMEOUT)
    };
    let out = with(&expired, 3);
    assert_refused(&out, &["node-3.pem", "expired"]);

    // Node 3's certificate and key under node 2's name: refused, naming whose it is.
    let swapped = root.join("swapped");
    std::fs::create_dir_all(&swapped).unwrap();
    std::fs::copy(ca_cert_path(&cluster.certs), ca_cert_path(&swapped)).unwrap();
    std::fs::copy(
        node_cert_path(&cluster.certs, 3),
        node_cert_path(&swapped, 2),
    )
    .unwrap();
    std::fs::copy(cluster.certs.join("node-3.key"), swapped.join("node-2.key")).unwrap();
    let out = with(&swapped, 2);
    assert_refused(&out, &["node 3's, not node 2's"]);
    assert_others_serve(&cluster, &load, "after refused starts");

    // Node 3 with a whole certificate directory of another CA (its own files agree, so
    // it starts): both sides refuse the link, the cluster does not count it.
    let foreign = root.join("foreign");
    make_cluster_certs(&foreign, 3, &[]).unwrap();
    let mut args = cluster.args(3);
    let at = args.iter().position(|a| a == "--cluster-certs").unwrap();
    args[at + 1] = foreign.to_str().unwrap().to_owned();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let envs: Vec<(&str, &str)> = cluster
        .envs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    cluster.nodes[2] = Some(common::Broker::start_with(&args, &envs));
    let refused = "the peer's certificate is not signed by this cluster's CA";
    cluster.node(3).wait_log(refused, CLUSTER_TIMEOUT);
    for id in 1..=2 {
        cluster.node(id).wait_log(refused, CLUSTER_TIMEOUT);
    }
    let (leader, view) = {
        // wait_for_leader would wait for node 3 too: it never becomes ready.
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let views: Vec<Value> = (1..=2).filter_map(|id| cluster.status(id)).collect();
            if views.len() == 2
                && views[0]["leader"] == views[1]["leader"]
                && views[0]["leader"].as_u64().is_some_and(|l| l != 3)
            {
                break (views[0]["leader"].as_u64().unwrap(), views[0].clone());
            }
            assert!(Instant::now() < deadline, "no leader: {views:#?}");
            thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(leader == 1 || leader == 2, "{view:#}");
    load.wait_progress(50, "with node 3 of another CA");
    let view3 = cluster.status(3).expect("node 3's admin API answers");
    assert_eq!(view3["ready"], false, "{view3:#}");
    assert!(view3["leader"].is_null(), "{view3:#}");
    assert!(!cluster.ready(3));
    load.finish();
}

/// Tests that need root (a tmpfs) or libfaketime: `scripts/test-third-party.sh`.
#[cfg(feature = "third-party")]
mod third_party {
    use super::*;

    /// A tmpfs of `size` mounted at `at` (root), unmounted on drop, also on failure.
    /// Mounts left by runs that died are swept first (their directory names carry the
    /// pid of a process that is gone).
    struct Tmpfs(String);

    impl Tmpfs {
        fn mount(at: &str, size: &str) -> Tmpfs {
            sweep_dead_mounts();
            std::fs::create_dir_all(at).unwrap();
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", at])
                .output()
                .expect("mount(8)");
            assert!(
                out.status.success(),
                "mount tmpfs at {at} (needs root): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Tmpfs(at.to_owned())
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .args(["-l", &self.0])
                .status();
        }
    }

    /// Unmounts tmpfs mounts of these tests whose process is gone.
    fn sweep_dead_mounts() {
        let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
            return;
        };
        for line in mounts.lines() {
            let Some(at) = line.split(' ').nth(1) else {
                continue;
            };
            let Some(pid) = at
                .split("tessera-test-")
                .nth(1)
                .filter(|_| at.contains("-diskfull-"))
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::process::Command::new("umount")
                    .args(["-l", at])
                    .status();
            }
        }
    }

    /// Fills the filesystem of `dir` with a file until ENOSPC.
    fn fill(dir: &Path) -> std::path::PathBuf {
        use std::io::Write;
        let path = dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 << 10];
        // Bounded by the tmpfs size; the last writes may be short.
        for _ in 0..100_000 {
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        path
    }

    #[test]
    fn a_node_whose_disk_fills_exits_clearly_loses_nothing_acked_and_rejoins() {
        // Retained messages up to 60 KB travel inline in the raft log: they make every
        // node's raft store grow, so node 3's must write to its full disk.
        let envs = [("TESSERA_CLUSTER__RETAINED_INLINE_BYTES", "60000")];
        let mut cluster = Cluster::new("diskfull", 3, 3, &envs);
        let _tmpfs = Tmpfs::mount(&cluster.data_dir(3), "24m");
        for id in 1..=3 {
            cluster.start(id, &[], false);
        }
        cluster.wait_for_leader();
        // Load between the healthy nodes, and a stream from node 1 into a persistent
        // session on node 3 (offline after its SUBACK, so it queues on node 3's disk).
        let load = Load::start("df", cluster.node(1).addr(), cluster.node(2).addr(), true);
        let into3 = Load::start("df3", cluster.node(1).addr(), cluster.node(3).addr(), false);
        into3.sub_stop.store(true, Ordering::Relaxed);
        load.wait_progress(20, "before the disk fills");

        let filler = fill(Path::new(&cluster.data_dir(3)));
        // The stream into node 3 stalls (nothing is acknowledged that node 3 could not
        // store) or node 3 ends; retained messages make the raft log grow everywhere.
        let mut retainer = common::RawClient::connect_ok(
            cluster.node(1).addr(),
            common::connect_packet(tessera_proto::ProtocolVersion::V5, "df-retainer", true, 60),
        );
        let payload = vec![b'r'; 50_000];
        let started = Instant::now();
        let mut n = 0;
        let status = loop {
            let node = cluster.nodes[2].as_mut().unwrap();
            if let Some(status) = node.try_exit() {
                break status;
            }
            assert!(
                started.elapsed() < CLUSTER_TIMEOUT,
                "node 3 still runs on a full disk:\n{}",
                node.log()
            );
            if n < 200 {
                retainer.send(&common::publish_packet(
                    &format!("big/{n}"),
                    &payload,
                    tessera_proto::QoS::AtMostOnce,
                    0,
                    true,
                ));
                n += 1;
            }
            thread::sleep(Duration::from_millis(50));
        };
        drop(retainer);
        let log = cluster.node(3).log();
        assert_eq!(status.code(), Some(3), "{status:?}:\n{log}");
        // LMDB reports a short write as EIO, a failed one as ENOSPC.
        assert!(
            log.contains("No space left on device") || log.contains("Input/output error"),
            "no write error in node 3's log:\n{log}"
        );
        for text in [
            "raft stopped on this node",
            &format!("{}/raft", cluster.data_dir(3)),
            "free space",
        ] {
            assert!(log.contains(text), "no {text:?} in node 3's log:\n{log}");
        }
        assert!(!log.contains("panicked"), "{log}");
        for line in log
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        {
            eprintln!("node 3: {line}");
        }
        eprintln!(
            "{} messages into node 3 acknowledged before it ended",
            into3.acked()
        );
        cluster.nodes[2] = None;
        assert_others_serve(&cluster, &load, "with node 3 gone");

        // Space freed, node 3 started again: it rejoins and its persistent session has
        // every message its publisher was acknowledged.
        std::fs::remove_file(filler).unwrap();
        cluster.start(3, &[], false);
        cluster.wait_for_leader();
        // What the subscriber got before it went offline counts as delivered.
        let got = into3.received.lock().unwrap().clone();
        into3.stop.store(true, Ordering::Relaxed);
        let acked3 = into3.acked.lock().unwrap().clone();
        drop(into3);
        receive_the_rest(cluster.node(3).addr(), "df3-sub", &acked3, got, "node 3");
        load.wait_progress(20, "after node 3 rejoined");
        load.finish();
    }

    #[test]
    fn a_single_node_whose_disk_fills_withholds_acks_counts_the_errors_and_recovers() {
        // One broker, its data dir on a small tmpfs: QoS 1 into a persistent session
        // whose client stopped reading, so every message is queued on the disk.
        let dir = common::TestDir::new("diskfull");
        let _tmpfs = Tmpfs::mount(dir.path_str(), "12m");
        let broker =
            common::Broker::start_with(&["--shards", "1", "--data-dir", dir.path_str()], &[]);
        let load = Load::start("sdf", broker.addr(), broker.addr(), false);
        load.sub_stop.store(true, Ordering::Relaxed);
        load.wait_progress(20, "before the disk fills");

        let filler = fill(Path::new(dir.path_str()));
        // The store's next commit that needs a page fails: counted, logged with what
        // to do, retried; the broker neither exits nor panics.
        let errors = || {
            common::metric_sum(
                &common::scrape(broker.admin_addr()),
                "tessera_persistence_commit_errors_total",
                &[("shard", "0")],
            )
        };
        common::eventually("a failed commit is counted", CLUSTER_TIMEOUT, || {
            errors() > 0.0
        });
        let log = broker.log();
        assert!(log.contains("store: commit failed"), "{log}");
        assert!(log.contains("free space"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
        common::assert_still_serves(broker.addr(), "sdf-probe");
        // Nothing is acknowledged that the store could not commit: the publisher (one
        // message in flight) gets no PUBACK while the commits fail.
        let stalled_at = load.acked();
        common::eventually(
            "more failed commits (retried each second)",
            CLUSTER_TIMEOUT,
            || errors() >= 3.0,
        );
        assert!(
            load.acked() <= stalled_at + 1,
            "PUBACKs went on while the store's commits failed: {stalled_at} -> {}",
            load.acked()
        );
        eprintln!(
            "{} PUBACKs before the disk filled up, {} commit errors",
            load.acked(),
            errors()
        );

        // Space freed: the retried commit succeeds, PUBACKs flow again, and the
        // persistent session has every message its publisher was acknowledged.
        std::fs::remove_file(filler).unwrap();
        load.wait_progress(20, "after space was freed");
        let acked: Vec<u64> = load.acked.lock().unwrap().clone();
        let got = load.received.lock().unwrap().clone();
        load.stop.store(true, Ordering::Relaxed);
        drop(load);
        receive_the_rest(broker.addr(), "sdf-sub", &acked, got, "the full disk");
    }

    /// Reconnects the persistent subscriber `id` at `addr` and receives until every
    /// number in `acked` arrived (`got`: what it received before), or fails naming
    /// `after` as where the acknowledged messages were lost.
    fn receive_the_rest(
        addr: SocketAddr,
        id: &str,
        acked: &[u64],
        mut got: BTreeSet<u64>,
        after: &str,
    ) {
        let (sub, mut conn) = rumqttc::Client::new(options(addr, id, false), 100);
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        while !acked.iter().all(|n| got.contains(n)) {
            assert!(
                Instant::now() < deadline,
                "acknowledged messages lost after {after}: {} acked, {} of them received",
                acked.len(),
                acked.iter().filter(|n| got.contains(n)).count()
            );
            if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) =
                conn.recv_timeout(Duration::from_millis(200))
            {
                got.insert(
                    std::str::from_utf8(&p.payload)
                        .unwrap()
                        .parse::<u64>()
                        .unwrap(),
                );
            }
        }
        drop(sub);
    }

    /// libfaketime's preload library (installed by scripts/test-third-party.sh).
    fn libfaketime() -> String {
        for p in [
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/faketime/libfaketime.so.1",
        ] {
            if Path::new(p).exists() {
                return p.to_owned();
            }
        }
        panic!("libfaketime not found: apt-get install faketime (scripts/test-third-party.sh)");
    }

    /// Minutes of the day of the last log line's timestamp (`...THH:MM:SS...Z`), the
    /// process's wall clock when it wrote it.
    fn last_log_minute(log: &str) -> i64 {
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains('Z'))
            .expect("a log line");
        let b = line.as_bytes();
        let at = (0..b.len().saturating_sub(6))
            .find(|&i| {
                b[i] == b'T'
                    && b[i + 1].is_ascii_digit()
                    && b[i + 2].is_ascii_digit()
                    && b[i + 3] == b':'
            })
            .expect("a timestamp");
        let num = |i: usize| i64::from(b[i] - b'0') * 10 + i64::from(b[i + 1] - b'0');
        num(at + 1) * 60 + num(at + 4)
    }

    /// How far node 3's wall clock is from node 1's, in minutes (-720..720), from their
    /// last log lines (both nodes log at least once a second here: the load).
    fn skew_minutes(cluster: &Cluster) -> i64 {
        let d = last_log_minute(&cluster.node(3).log()) - last_log_minute(&cluster.node(1).log());
        (d + 720).rem_euclid(1440) - 720
    }

    #[test]
    fn a_node_whose_wall_clock_is_an_hour_ahead_and_jumps_back_is_not_fenced() {
        let mut cluster = Cluster::new("clock", 3, 3, &[]);
        let jump = Path::new(cluster.dir.path_str()).join("faketime");
        std::fs::write(&jump, "+1h\n").unwrap();
        for id in 1..=2 {
            cluster.start(id, &[], false);
        }
        // Node 3's wall clock (CLOCK_REALTIME) is an hour ahead, read from a file that
        // the test rewrites; its monotonic clock is the machine's, as when NTP steps.
        let lib = libfaketime();
        let jump_path = jump.to_str().unwrap().to_owned();
        cluster.envs.extend([
            ("LD_PRELOAD".to_owned(), lib),
            ("FAKETIME_TIMESTAMP_FILE".to_owned(), jump_path),
            ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
            ("FAKETIME_CACHE_DURATION".to_owned(), "1".to_owned()),
        ]);
        cluster.start(3, &[], false);
        cluster.wait_for_leader();
        // Node 3 leads, so its entries carry its time.
        let url = format!("http://{}", cluster.node(3).admin_addr());
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        while cluster.wait_for_leader().0 != 3 {
            let _ = brokerctl(&["cluster", "transfer-leader", "3", "--url", &url], &[]);
            assert!(Instant::now() < deadline, "node 3 never led");
        }
        let load = Load::start("clk", cluster.node(1).addr(), cluster.node(3).addr(), true);
        let back = Load::start("clkb", cluster.node(3).addr(), cluster.node(2).addr(), true);
        load.wait_progress(50, "node 3 an hour ahead");
        back.wait_progress(50, "node 3 an hour ahead");
        let skew = skew_minutes(&cluster);
        assert!(
            (58..=62).contains(&skew),
            "node 3's clock is {skew} min off, not +60"
        );
        // The others say whose clock is off (node 3's batches carry its time).
        cluster
            .node(1)
            .wait_log("node 3's wall clock is 3", CLUSTER_TIMEOUT);
        // The jump: node 3's wall clock goes back by an hour and a half, to 30 min behind.
        std::fs::write(&jump, "-30m\n").unwrap();
        thread::sleep(Duration::from_secs(5));
        load.wait_progress(50, "after node 3's clock jumped back");
        back.wait_progress(50, "after node 3's clock jumped back");
        // Leadership back to node 1: an election with the jumped clock, and log lines
        // written after the jump on every node.
        let url = format!("http://{}", cluster.node(1).admin_addr());
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        while cluster.wait_for_leader().0 != 1 {
            let _ = brokerctl(&["cluster", "transfer-leader", "1", "--url", &url], &[]);
            assert!(Instant::now() < deadline, "node 1 never led again");
        }
        load.wait_progress(50, "after node 1 took the lead");
        back.wait_progress(50, "after node 1 took the lead");
        let skew = skew_minutes(&cluster);
        assert!(
            (-32..=-28).contains(&skew),
            "node 3's clock is {skew} min off, not -30"
        );
        let (_, view) = cluster.wait_for_leader();
        assert_eq!(view["members"].as_array().unwrap().len(), 3, "{view:#}");
        let fenced = common::metric_sum(
            &common::scrape(cluster.node(3).admin_addr()),
            "tessera_cluster_sessions_fenced_total",
            &[],
        );
        assert_eq!(
            fenced, 0.0,
            "node 3 fenced its sessions after a wall-clock jump"
        );
        load.finish();
        back.finish();
    }
}
