//! Goal: a cluster under process and network faults loses nothing it acknowledged
//! (issue 16): real broker processes, each in its own network namespace
//! (`common::netns`), killed with SIGKILL, paused with SIGSTOP, cut off and slowed,
//! under QoS 1 and QoS 2 load with persistent sessions.
//!
//! Method: 3 nodes (`sync` durability, the default), each in a namespace with its own
//! address; the test's clients reach them through the bridge. Load:
//! - publishers: rumqttc v5 clients, persistent sessions (clean start 0, session expiry
//!   600 s), one message in flight each, alternating QoS 1 and QoS 2 on
//!   `chaos/<publisher>/q<qos>` with unique payloads `<publisher>/<seq>`. One in
//!   flight, because rumqttc's events name a publication only by its packet id, which
//!   it reuses (its ids wrap at the broker's receive maximum): with one in flight, the
//!   ack is that message's. "Acked" is a PUBACK (QoS 1) or PUBCOMP (QoS 2) with a
//!   success code;
//! - subscribers: 3.1.1 persistent sessions (clean session 0) subscribed to `chaos/#`
//!   at QoS 2 before anything is published, spoken with `common::RawClient`, because
//!   rumqttc forgets the inbound QoS 2 ids when its connection drops and then fails
//!   the connection on the PUBREL of one of them ("Unsolicited pubrel"). Two of the
//!   three go offline (connection dropped) for 1-4 s every 3-8 s and come back on a
//!   random node;
//! - a client whose connection ends or is refused (its node killed, paused, fenced,
//!   the session's owner unreachable) tries another node after 0.2-0.7 s.
//!
//! The fault schedule is drawn from `CHAOS_SEED` (printed; by default from the
//! clock) and printed as it runs. Short in CI (`CHAOS_SECONDS`, default 30 per
//! scenario), longer with `CHAOS_SECONDS=120` (`just chaos`). At the end every fault
//! is healed, every node runs, the publishers' last messages are answered and the
//! subscribers read until nothing arrives for 5 s; then `common::history::check`
//! with every node process's log: no acked message lost, no session lost (a
//! reconnect of a persistent session answered session present 0), no QoS 2
//! duplicate, no order violation, no ClientID live on two nodes beyond the session
//! lease. On a violation the report (seed, fault schedule, findings) is the panic
//! message and the node logs are written to files it names (with `CHAOS_KEEP_LOGS=1`
//! a clean run's too).
//!
//! Needs root, `ip`, `iptables` and `python3` (the `third-party` feature;
//! `scripts/test-third-party.sh` installs them). Every wait is bounded; every
//! namespace, rule and process is removed at the end, also on failure. A quiet
//! window (/work/coord/win) that stops the nodes mid-run can fail a run: re-run it.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, HOST_MQTT_PORT, NodeHost};
use common::history::{self, Fault, History, NodeLog};
use common::netns::Net;
use common::{Closed, RawClient, connect_packet, subscribe_packet};
use rumqttc::v5::mqttbytes::QoS as RQoS;
use rumqttc::v5::mqttbytes::v5::{Packet as RPacket, PubAckReason, PubCompReason, PubRecReason};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tessera_proto::{Packet, ProtocolVersion, PubAck, PubComp, PubRec, QoS, ReasonCode};

const NODES: u64 = 3;
const PUBLISHERS: usize = 4;
const SUBSCRIBERS: usize = 3;
const FILTER: &str = "chaos/#";
/// Longest the end of a run may take: publishers answered, subscribers drained.
const DRAIN: Duration = Duration::from_secs(60);
/// Subscribers are done once nothing arrived for this long.
const IDLE: Duration = Duration::from_secs(5);
/// How long a ClientID may be live on two nodes: the session lease
/// (`cluster.session_lease_ms`, 2 s by default) and the shard tick that acts on it.
const TWO_NODE_TOLERANCE: Duration = Duration::from_millis(2_000 + 250);
/// Fewer acknowledged publications than this and a run tested nothing.
const ACKED_MIN: usize = 50;

/// xorshift64*, seeded: the fault schedule and each client's choices.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
    /// A node other than `not` (nodes from 1).
    fn other_node(&mut self, not: u64) -> u64 {
        let k = 1 + self.below(NODES - 1);
        (not - 1 + k) % NODES + 1
    }
}

fn seed() -> u64 {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .map(|s| s.parse().expect("CHAOS_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000
        });
    println!("CHAOS_SEED={seed}");
    seed
}

fn chaos_time() -> Duration {
    let secs: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .map(|s| s.parse().expect("CHAOS_SECONDS is a number"))
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// The run phase the clients follow.
const RUNNING: u8 = 0;
/// No more offline periods; publishers finish their last message.
const DRAINING: u8 = 1;
const STOPPED: u8 = 2;

/// What the clients share besides the history: the phase, progress and their
/// connection errors (printed with a failure).
struct Shared {
    h: History,
    t0: Instant,
    phase: AtomicU8,
    subscribed: AtomicUsize,
    last_delivery: Mutex<Instant>,
    errors: Mutex<Vec<String>>,
    /// Each publisher's node and message in flight (printed if one does not finish).
    publishers: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, client: &str, what: String) {
        let t = self.t0.elapsed().as_secs_f64();
        self.errors
            .lock()
            .unwrap()
            .push(format!("{t:8.3} {client}: {what}"));
    }

    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Relaxed)
    }
}

fn mqtt_addr(net: &Net, node: u64) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(net.node(node).ip), HOST_MQTT_PORT)
}

fn publisher_options(id: &str, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    // A takeover from an unreachable node waits out its lease (and a fetch timeout):
    // more than rumqttc's default 5 s.
    o.set_connection_timeout(15);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    o
}

/// One publisher (see the module doc), until the phase is past [`RUNNING`] and its
/// last message is answered or given up.
async fn publisher(i: usize, addrs: Vec<SocketAddr>, sh: Arc<Shared>, seed: u64) {
    let mut rng = Rng::new(seed ^ (0x1000 + i as u64));
    let id = format!("chaos-pub-{i}");
    let mut node = (i as u64 % NODES) + 1;
    let (client, mut events) =
        AsyncClient::new(publisher_options(&id, addrs[node as usize - 1]), 16);
    let mut next = 0u64;
    let mut inflight: Option<u64> = None;
    let mut connected = false;
    loop {
        let p = sh.phase();
        if p == STOPPED || (p == DRAINING && inflight.is_none()) {
            break;
        }
        if connected && inflight.is_none() && p == RUNNING {
            let seq = next;
            next += 1;
            let qos = if seq % 2 == 1 { 2 } else { 1 };
            let topic = format!("chaos/{id}/q{qos}");
            sh.h.sent(&id, &topic, qos, seq);
            let q = if qos == 2 {
                RQoS::ExactlyOnce
            } else {
                RQoS::AtLeastOnce
            };
            client
                .try_publish(topic, q, false, history::payload(&id, seq))
                .expect("the request channel has room for one");
            inflight = Some(seq);
        }
        // Long enough never to cut a connection attempt short (rumqttc's own bound is
        // 15 s): a CONNECT given up after the broker took it leaves a session there,
        // and the next CONNECT is rightly answered "present" with none of the
        // client's state (an artefact that looked like a duplicated QoS 2 message).
        let ev = match tokio::time::timeout(Duration::from_secs(20), events.poll()).await {
            Err(_) => continue,
            Ok(ev) => ev,
        };
        sh.publishers.lock().unwrap()[i] = format!(
            "{id}: @{node}, connected {connected}, in flight {inflight:?}, last event at {:.3}: {ev:?}",
            sh.t0.elapsed().as_secs_f64()
        );
        match ev {
            Ok(Event::Incoming(RPacket::ConnAck(a))) => {
                connected = true;
                sh.h.connack(&id, node, false, a.session_present);
                if let Some(seq) = inflight {
                    if a.session_present {
                        sh.h.resent(&id, seq);
                    } else {
                        // rumqttc drops what it had pending when the session is new:
                        // never acked, given up.
                        inflight = None;
                    }
                }
            }
            Ok(Event::Incoming(RPacket::PubAck(a))) => {
                if let Some(seq) = inflight.take() {
                    if matches!(
                        a.reason,
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                    ) {
                        sh.h.acked(&id, seq);
                    } else {
                        sh.error(&id, format!("{id}/{seq}: PUBACK {:?}", a.reason));
                    }
                }
            }
            Ok(Event::Incoming(RPacket::PubRec(r))) => {
                if !matches!(
                    r.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                ) && let Some(seq) = inflight.take()
                {
                    sh.error(&id, format!("{id}/{seq}: PUBREC {:?}", r.reason));
                }
            }
            Ok(Event::Incoming(RPacket::PubComp(c))) => {
                if let Some(seq) = inflight.take() {
                    if c.reason == PubCompReason::Success {
                        sh.h.acked(&id, seq);
                    } else {
                        sh.error(&id, format!("{id}/{seq}: PUBCOMP {:?}", c.reason));
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                connected = false;
                sh.error(&id, format!("@{node}: {e}"));
                tokio::time::sleep(rng.millis(200, 700)).await;
                node = rng.other_node(node);
                events.options = publisher_options(&id, addrs[node as usize - 1]);
            }
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
}

/// Why a subscriber's connection ended.
enum Next {
    /// Reconnect to another node (the connection failed, was refused or ended).
    Elsewhere,
    /// Went offline on purpose: reconnect to a random node after a while.
    Offline,
    Stop,
}

/// One connection of persistent 3.1.1 subscriber `id` to `node`, and its reading,
/// until it ends.
fn subscriber_session(
    id: &str,
    node: u64,
    addr: SocketAddr,
    sh: &Shared,
    offline_at: Option<Instant>,
) -> Next {
    let mut c = match RawClient::try_open(addr, ProtocolVersion::V3_1_1, Duration::from_secs(3)) {
        Ok(c) => c,
        Err(e) => {
            sh.error(id, format!("@{node}: connect: {e}"));
            return Next::Elsewhere;
        }
    };
    let connect = connect_packet(ProtocolVersion::V3_1_1, id, false, 0);
    if !c.try_send(&Packet::Connect(Box::new(connect))) {
        return Next::Elsewhere;
    }
    let ack = match c.try_recv(Duration::from_secs(15)) {
        Ok(Packet::ConnAck(a)) => a,
        other => {
            sh.error(id, format!("@{node}: CONNACK: {other:?}"));
            return Next::Elsewhere;
        }
    };
    if ack.reason_code != ReasonCode::Success {
        sh.error(id, format!("@{node}: refused {:?}", ack.reason_code));
        return Next::Elsewhere;
    }
    sh.h.connack(id, node, false, ack.session_present);
    // A new session: subscribe (again). The check reports a lost one.
    if !ack.session_present && !c.try_send(&subscribe_packet(1, &[(FILTER, QoS::ExactlyOnce)])) {
        return Next::Elsewhere;
    }
    loop {
        if sh.phase() == STOPPED {
            c.disconnect();
            return Next::Stop;
        }
        if offline_at.is_some_and(|t| Instant::now() >= t) && sh.phase() == RUNNING {
            c.drop_connection();
            return Next::Offline;
        }
        let answer = match c.try_recv(Duration::from_millis(200)) {
            Ok(Packet::SubAck(a)) => {
                let granted = match a.reason_codes.as_slice() {
                    [ReasonCode::GrantedQoS2] => Some(2),
                    [ReasonCode::GrantedQoS1] => Some(1),
                    [ReasonCode::Success] => Some(0),
                    _ => None,
                };
                sh.h.suback(id, FILTER, granted);
                sh.subscribed.fetch_add(1, Ordering::Relaxed);
                None
            }
            Ok(Packet::Publish(p)) => {
                sh.h.delivered(
                    id,
                    p.topic.as_str(),
                    p.qos as u8,
                    p.packet_id,
                    p.dup,
                    &p.payload,
                );
                *sh.last_delivery.lock().unwrap() = Instant::now();
                match p.qos {
                    QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(p.packet_id))),
                    QoS::ExactlyOnce => Some(Packet::PubRec(PubRec::new(p.packet_id))),
                    QoS::AtMostOnce => None,
                }
            }
            Ok(Packet::PubRel(r)) => {
                sh.h.released(id, r.packet_id);
                Some(Packet::PubComp(PubComp::new(r.packet_id)))
            }
            Ok(other) => panic!("{id}: unexpected {other:?}"),
            Err(Closed::Timeout) => None,
            Err(Closed::Eof) => {
                sh.error(id, format!("@{node}: closed"));
                return Next::Elsewhere;
            }
        };
        if let Some(a) = answer
            && !c.try_send(&a)
        {
            sh.error(id, format!("@{node}: write failed"));
            return Next::Elsewhere;
        }
    }
}

fn subscriber(j: usize, addrs: Vec<SocketAddr>, sh: Arc<Shared>, flappy: bool, seed: u64) {
    let mut rng = Rng::new(seed ^ (0x2000 + j as u64));
    let id = format!("chaos-sub-{j}");
    let mut node = ((j as u64 + 1) % NODES) + 1;
    loop {
        let offline_at = flappy.then(|| Instant::now() + rng.millis(3_000, 8_000));
        match subscriber_session(&id, node, addrs[node as usize - 1], &sh, offline_at) {
            Next::Stop => return,
            Next::Elsewhere => {
                if sh.phase() == STOPPED {
                    return;
                }
                std::thread::sleep(rng.millis(200, 700));
                node = rng.other_node(node);
            }
            Next::Offline => {
                std::thread::sleep(rng.millis(1_000, 4_000));
                node = 1 + rng.below(NODES);
            }
        }
    }
}

/// The clients of a scenario; stops them on drop.
struct Load {
    sh: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    publishers: Vec<tokio::task::JoinHandle<()>>,
    subscribers: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Subscribers first (all subscribed, bounded), then publishers.
    fn start(net: &Net, sh: Arc<Shared>, seed: u64) -> Load {
        let addrs: Vec<SocketAddr> = (1..=NODES).map(|id| mqtt_addr(net, id)).collect();
        let mut load = Load {
            sh: sh.clone(),
            runtime: Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap(),
            ),
            publishers: Vec::new(),
            subscribers: Vec::new(),
        };
        for j in 0..SUBSCRIBERS {
            let (addrs, sh) = (addrs.clone(), sh.clone());
            // The last subscriber stays online; the others go offline now and then.
            let flappy = j + 1 < SUBSCRIBERS;
            load.subscribers.push(std::thread::spawn(move || {
                subscriber(j, addrs, sh, flappy, seed)
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while sh.subscribed.load(Ordering::Relaxed) < SUBSCRIBERS {
            assert!(
                Instant::now() < deadline,
                "subscribers not subscribed within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let rt = load.runtime.as_ref().unwrap();
        for i in 0..PUBLISHERS {
            let (addrs, sh) = (addrs.clone(), sh.clone());
            load.publishers
                .push(rt.spawn(publisher(i, addrs, sh, seed)));
        }
        load
    }

    /// Ends the run: the publishers finish their last message, the subscribers read
    /// until idle (all bounded), then the check; on a violation the nodes' logs go to
    /// files, named in the failure, with the clients' history (`history.log`).
    fn finish(mut self, seed: u64, cluster: &Cluster) {
        self.sh.phase.store(DRAINING, Ordering::Relaxed);
        let deadline = Instant::now() + DRAIN;
        let rt = self.runtime.take().unwrap();
        // Bounded waits that do not panic at once: what did not finish is reported with
        // the check and the node logs.
        let mut stuck = Vec::new();
        for p in std::mem::take(&mut self.publishers) {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(r) = rt.block_on(async { tokio::time::timeout(left, p).await }) {
                r.expect("publisher task");
            } else {
                stuck = self.sh.publishers.lock().unwrap().clone();
                break;
            }
        }
        if stuck.is_empty() {
            while self.sh.last_delivery.lock().unwrap().elapsed() < IDLE {
                if Instant::now() >= deadline {
                    stuck.push(format!("subscribers still receiving after {DRAIN:?}"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.sh.phase.store(STOPPED, Ordering::Relaxed);
        for s in std::mem::take(&mut self.subscribers) {
            s.join().expect("subscriber thread");
        }
        rt.shutdown_timeout(Duration::from_secs(2));
        let logs = node_logs(cluster);
        // Without the nodes' client lines the two-node check would pass on nothing.
        assert!(
            logs.iter().any(|l| l.text.contains("client live")),
            "CHAOS_SEED={seed}: no node logged a client going live (log.clients off?)"
        );
        let report = history::check(&self.sh.h, &logs, TWO_NODE_TOLERANCE);
        println!("{report}");
        // CHAOS_KEEP_LOGS=1 keeps a clean run's logs too (to measure from them).
        if std::env::var_os("CHAOS_KEEP_LOGS").is_some() && report.is_clean() {
            println!("node logs kept in {}", dump_logs(&logs, seed));
        }
        if !report.is_clean() || report.counts.acked < ACKED_MIN || !stuck.is_empty() {
            let dir = dump_logs(&logs, seed);
            std::fs::write(format!("{dir}/history.log"), self.sh.h.dump()).expect("write history");
            let errors = self.sh.errors.lock().unwrap();
            let shown: Vec<&String> = errors.iter().take(40).collect();
            panic!(
                "CHAOS_SEED={seed}: {} errors, {} acked (at least {ACKED_MIN} wanted); node logs in {dir}\n\
                 not finished within {DRAIN:?}: {stuck:#?}\n\
                 client connection errors ({}, first 40): {shown:#?}\n{report}",
                report.errors(),
                report.counts.acked,
                errors.len()
            );
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.sh.phase.store(STOPPED, Ordering::Relaxed);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Every node process's log, killed ones included, one [`NodeLog`] per process.
fn node_logs(c: &Cluster) -> Vec<NodeLog> {
    let mut logs = Vec::new();
    for id in 1..=NODES {
        for text in &c.past_logs[id as usize - 1] {
            logs.push(NodeLog {
                node: id,
                text: text.clone(),
            });
        }
        if let Some(n) = &c.nodes[id as usize - 1] {
            logs.push(NodeLog {
                node: id,
                text: n.log(),
            });
        }
    }
    logs
}

/// Writes the logs to `$TMPDIR/tessera-chaos-<seed>-<pid>/node-<id>.<n>.log`;
/// returns the directory.
fn dump_logs(logs: &[NodeLog], seed: u64) -> String {
    let dir = std::env::temp_dir().join(format!("tessera-chaos-{seed}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let mut n = std::collections::HashMap::new();
    for log in logs {
        let k = n.entry(log.node).or_insert(0);
        std::fs::write(dir.join(format!("node-{}.{k}.log", log.node)), &log.text)
            .expect("write log");
        *k += 1;
    }
    dir.display().to_string()
}

/// A 3-node cluster in namespaces, all running with a leader.
fn cluster_in(net: &Net, tag: &str) -> Cluster {
    let hosts = (1..=NODES)
        .map(|id| NodeHost {
            prefix: net.exec_prefix(id),
            ip: IpAddr::V4(net.node(id).ip),
        })
        .collect();
    let mut c = Cluster::on_hosts(
        tag,
        NODES as usize,
        hosts,
        &[
            ("TESSERA_LIMITS__MAX_QUEUED_MESSAGES", "100000"),
            // The client log lines (opt-in) are what the checker reads to find a
            // ClientID live on two nodes at once.
            ("TESSERA_LOG__CLIENTS", "true"),
        ],
    );
    for id in 1..=NODES {
        c.start(id, &[], false);
    }
    c.wait_for_leader();
    c
}

/// The wall clock as `HH:MM:SS.mmm` UTC (the nodes' logs use UTC).
fn wall_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

/// The leader as a running node sees it, if one answers.
fn leader(c: &Cluster) -> Option<u64> {
    c.running()
        .iter()
        .find_map(|id| c.status(*id).and_then(|v| v["leader"].as_u64()))
}

/// Lost sessions are reported as notes, not errors, while this says why (`Some`). With
/// `cluster.wait_for_session_owner` (on by default) a takeover whose old owner is
/// unreachable refuses the CONNECT until that node is back instead of starting a new
/// session, so a lost session is an error (one known bound: a node restarted while it
/// waited, docs/ARCHITECTURE.md "A session on an unreachable node waits for it").
const LOST_SESSIONS_ALLOWED: Option<&str> = None;

/// A scenario's load, cluster and network (fields drop in this order: the load, the
/// nodes, then the namespaces).
struct Scenario {
    seed: u64,
    rng: Rng,
    run_for: Duration,
    sh: Arc<Shared>,
    load: Option<Load>,
    cluster: Cluster,
    net: Net,
}

impl Scenario {
    /// 3 nodes in namespaces with a leader, the load running.
    fn start(tag: &str) -> Scenario {
        let seed = seed();
        let net = Net::new(NODES as usize);
        let cluster = cluster_in(&net, tag);
        let sh = Arc::new(Shared {
            h: History::new(seed),
            t0: Instant::now(),
            phase: AtomicU8::new(RUNNING),
            subscribed: AtomicUsize::new(0),
            last_delivery: Mutex::new(Instant::now()),
            errors: Mutex::new(Vec::new()),
            publishers: Mutex::new(vec![String::new(); PUBLISHERS]),
        });
        let mut s = Scenario {
            seed,
            rng: Rng::new(seed),
            run_for: chaos_time(),
            load: None,
            sh: sh.clone(),
            cluster,
            net,
        };
        if let Some(why) = LOST_SESSIONS_ALLOWED {
            println!("lost sessions are allowed in this run: {why}");
            sh.h.allow_lost_sessions(why);
        }
        s.fault(Fault::Other(format!(
            "{tag}: t0 = {} UTC (for the node logs), leader {:?}",
            wall_now(),
            leader(&s.cluster)
        )));
        s.load = Some(Load::start(&s.net, sh, seed));
        s.fault(Fault::Other("load running".into()));
        s
    }

    /// Records a fault (the history's schedule) and prints it as it happens.
    fn fault(&self, f: Fault) {
        println!("{:8.3} {f}", self.sh.t0.elapsed().as_secs_f64());
        self.sh.h.fault(f);
    }

    /// A node chosen by the seed: the leader one time in three.
    fn victim(&mut self) -> (u64, Option<u64>) {
        let current = leader(&self.cluster);
        let victim = match current {
            Some(l) if self.rng.below(3) == 0 => l,
            _ => 1 + self.rng.below(NODES),
        };
        (victim, current)
    }

    fn kill(&mut self, id: u64) {
        self.fault(Fault::Kill(id));
        self.cluster.kill(id);
    }

    /// Starts every node that is down, then waits for a common leader.
    fn all_up(&mut self) {
        for id in 1..=NODES {
            if self.cluster.nodes[id as usize - 1].is_none() {
                self.cluster.start(id, &[], false);
                self.fault(Fault::Start(id));
            }
        }
        let (l, _) = self.cluster.wait_for_leader();
        self.fault(Fault::Other(format!("all nodes up, leader {l}")));
    }

    /// Heals the network, restarts what is down, then ends the run and checks.
    fn finish(mut self) {
        self.net.heal();
        self.fault(Fault::Other("network healed".into()));
        self.all_up();
        let load = self.load.take().expect("the load runs");
        load.finish(self.seed, &self.cluster);
    }
}

#[test]
#[ignore = "issue 16: its CI loss (CHAOS_SEED=695844) and a QoS 2 duplicate (131463) are fixed (session 20, clean in 36 of 38 runs on the fixed code), and so is CHAOS_SEED=131556's loss of 33 messages queued for chaos-sub-0 when node 3 was killed while node 1 read the session's disk tail (ARCHITECTURE 'Known limits' (4): the take-in is now given up and the client refused until the old owner is back), but once 1 QoS 1 message hinted for a killed node 2 was lost; run it with `just chaos`"]
fn kill_9_any_node_under_load_loses_nothing_acked() {
    let mut s = Scenario::start("chaos-kill");
    let end = Instant::now() + s.run_for;
    loop {
        let wait = s.rng.millis(5_000, 10_000);
        if Instant::now() + wait >= end {
            break;
        }
        std::thread::sleep(wait);
        let (victim, current) = s.victim();
        let down = s.rng.millis(500, 3_000);
        s.fault(Fault::Other(format!(
            "next: kill -9 node {victim} (leader {current:?}), down for {down:?}"
        )));
        s.kill(victim);
        std::thread::sleep(down);
        s.all_up();
    }
    s.finish();
}

/// How long a network fault lasts: 10 s, 30 s in a long run (a minority node
/// isolated for 30 s in the list).
fn fault_time(run_for: Duration) -> Duration {
    if run_for >= Duration::from_secs(120) {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(10)
    }
}

/// A node (the leader at least one time in three) paused with SIGSTOP for 10 s, again
/// and again. Out of CI from ci35 (CHAOS_SEED=140775: 3 acknowledged messages lost when
/// the paused node took a session back, its route briefly removed:
/// `Engine::detach_ghost`) until that fix and the wait for a silent member
/// (CHAOS_SEED=804188: a session lost in a chain of waiting claims) were in.
#[test]
fn a_node_paused_10_s_under_load_loses_nothing_acked() {
    let mut s = Scenario::start("chaos-pause");
    let end = Instant::now() + s.run_for;
    let pause = Duration::from_secs(10);
    loop {
        let wait = s.rng.millis(3_000, 6_000);
        if Instant::now() + wait + pause >= end {
            break;
        }
        std::thread::sleep(wait);
        let (victim, current) = s.victim();
        s.fault(Fault::Other(format!(
            "next: SIGSTOP node {victim} (leader {current:?}) for {pause:?}"
        )));
        s.fault(Fault::Pause(victim));
        s.cluster.node(victim).signal(libc::SIGSTOP);
        std::thread::sleep(pause);
        s.cluster.node(victim).signal(libc::SIGCONT);
        s.fault(Fault::Resume(victim));
        let (l, _) = s.cluster.wait_for_leader();
        s.fault(Fault::Other(format!("leader {l}")));
    }
    s.finish();
}

/// The network faults of the list, one after another in a seeded order, each
/// for [`fault_time`] and then healed: the leader isolated, a minority node isolated,
/// a one-way partition, 200 ms delay with 5% loss on one link. An isolated node stays
/// reachable for the test's clients, so they see it fence them.
#[test]
#[ignore = "issue 16: session 20 fixed its acknowledged losses and lost sessions (a ghost ended early by an older ghost's expiry, a fetched moving copy taken for one kept, a ghost dropped while a returning session's disk tail came, a returning session's late copies dropped by its new ghost; ARCHITECTURE); on main 4f4c8e4 11 of 11 runs had 0 lost sessions, but order violations (2 runs: hint backlogs resent behind newer messages), 20 QoS 2 duplicates once (CHAOS_SEED=16059, logs /tmp/tessera-chaos-16059-22467) and once 1,089 messages counted lost for the two sessions of the isolated leader, whose hints on the other two nodes were not done when the run ended 10 s after the heal (CHAOS_SEED=18042, /tmp/tessera-chaos-18042-24474; replayed with forward debug logs: 876 lost in 1 of 3, /tmp/tessera-chaos-18042-13224, where the new owner's DONE to the healed leader timed out and a third node then recovered the new owner's unconfirmed copy), and one lost session (CHAOS_SEED=14810, /tmp/tessera-chaos-14810-17014: the node that had just taken the session in answered a later claimant `4 | node 1` and the client got a new session); run it with `just chaos`"]
fn network_faults_under_load_lose_nothing_acked() {
    let mut s = Scenario::start("chaos-net");
    let hold = fault_time(s.run_for);
    let mut kinds = [0u64, 1, 2, 3];
    for i in (1..kinds.len()).rev() {
        let j = s.rng.below(i as u64 + 1) as usize;
        kinds.swap(i, j);
    }
    for kind in kinds {
        std::thread::sleep(s.rng.millis(2_000, 4_000));
        let current = leader(&s.cluster).unwrap_or(1);
        let other = s.rng.other_node(current);
        let third = (1..=NODES)
            .find(|n| *n != current && *n != other)
            .expect("3 nodes");
        let what = match kind {
            0 => {
                s.net.isolate(current);
                format!("isolate the leader, node {current}")
            }
            1 => {
                s.net.isolate(other);
                format!("isolate node {other} (leader {current})")
            }
            2 => {
                s.net.drop_one_way(other, third);
                format!(
                    "one-way partition: node {other} -> node {third} dropped (leader {current})"
                )
            }
            _ => {
                s.net.delay(current, other, 200);
                s.net.loss(current, other, 0.05);
                format!("200 ms delay and 5% loss on the link node {current} <-> node {other}")
            }
        };
        s.fault(Fault::Other(format!("{what}, for {hold:?}")));
        std::thread::sleep(hold);
        s.net.heal();
        s.fault(Fault::Other("healed".into()));
        let (l, _) = s.cluster.wait_for_leader();
        s.fault(Fault::Other(format!("leader {l}")));
    }
    s.finish();
}
