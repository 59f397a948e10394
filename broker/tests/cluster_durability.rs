//! Goal: QoS across nodes survives a `kill -9` of the receiving node (issue 15). A
//! publisher on node 1 is acknowledged (PUBACK, PUBREC) for a message forwarded to a
//! persistent subscriber's node only once that node committed it, and a batch the
//! sending node retries after the receiver restarted is not delivered twice.
//!
//! Method: 3 real broker processes (`common::cluster`, one shard each, `sync`
//! durability, the default). A persistent 3.1.1 subscriber on node 2 (offline, so
//! everything queues on node 2's disk); a publisher on node 1 streams numbered
//! messages, alternating QoS 1 and QoS 2, with 16 in flight. Node 2 is killed with
//! SIGKILL mid-stream and restarted, twice; the publisher keeps its connection to node
//! 1 throughout (its held acknowledgements are released once node 2 answers again).
//! Then the subscriber reconnects and reads its queue: every message the publisher got
//! PUBACK/PUBREC for arrives, QoS 2 ones exactly once (no QoS 2 message twice at all).
//! Bounded: every wait has a deadline.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{Closed, RawClient, connect_packet, publish_packet};
use tessera_proto::{Packet, ProtocolVersion, PubAck, PubComp, PubRec, PubRel, QoS, ReasonCode};

const V4: ProtocolVersion = ProtocolVersion::V3_1_1;
const WINDOW: usize = 16;
/// Messages per round at most (the subscriber's queue holds them all).
const ROUND_MESSAGES_MAX: u64 = 3_000;
const ROUNDS: usize = 2;
/// The publisher's in-flight messages must be answered within this once node 2 is back.
const DRAIN: Duration = Duration::from_secs(30);
/// The subscriber stops reading after this long without a packet.
const IDLE: Duration = Duration::from_secs(4);

/// What the publisher on node 1 saw acknowledged, by QoS.
#[derive(Default)]
struct Acked {
    qos1: Vec<u64>,
    qos2: Vec<u64>,
}

/// Publishes numbers `from..` (odd: QoS 2 on `dur/2`, even: QoS 1 on `dur/1`) with
/// `WINDOW` in flight until `stop`, then waits (bounded) for every answer. `count`
/// follows the acknowledgements.
fn publish_stream(
    c: &mut RawClient,
    from: u64,
    stop: &AtomicBool,
    count: &AtomicU64,
    acked: &mut Acked,
) -> u64 {
    let mut next = from;
    // packet id -> (number, QoS, PUBREC seen)
    let mut inflight: HashMap<u16, (u64, QoS, bool)> = HashMap::new();
    let mut packet_id = 0u16;
    let mut drain_deadline = None;
    loop {
        let stopping = stop.load(Ordering::Relaxed) || next >= from + ROUND_MESSAGES_MAX;
        if stopping && drain_deadline.is_none() {
            drain_deadline = Some(Instant::now() + DRAIN);
        }
        while !stopping && inflight.len() < WINDOW {
            let n = next;
            next += 1;
            packet_id = packet_id % 60_000 + 1;
            let (qos, topic) = if n % 2 == 1 {
                (QoS::ExactlyOnce, "dur/2")
            } else {
                (QoS::AtLeastOnce, "dur/1")
            };
            inflight.insert(packet_id, (n, qos, false));
            c.send(&publish_packet(
                topic,
                n.to_string().as_bytes(),
                qos,
                packet_id,
                false,
            ));
        }
        if stopping && inflight.is_empty() {
            return next;
        }
        if let Some(d) = drain_deadline {
            assert!(
                Instant::now() < d,
                "the publisher's last {} messages not answered within {DRAIN:?}",
                inflight.len()
            );
        }
        match c.try_recv(Duration::from_millis(50)) {
            Ok(Packet::PubAck(a)) => {
                let (n, qos, _) = inflight.remove(&a.packet_id).expect("PUBACK for a sent id");
                assert_eq!(qos, QoS::AtLeastOnce);
                assert_eq!(a.reason_code, ReasonCode::Success, "PUBACK of {n}");
                acked.qos1.push(n);
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Packet::PubRec(r)) => {
                let entry = inflight
                    .get_mut(&r.packet_id)
                    .expect("PUBREC for a sent id");
                assert_eq!(r.reason_code, ReasonCode::Success, "PUBREC of {}", entry.0);
                if !entry.2 {
                    entry.2 = true;
                    acked.qos2.push(entry.0);
                    count.fetch_add(1, Ordering::Relaxed);
                }
                c.send(&Packet::PubRel(PubRel::new(r.packet_id)));
            }
            Ok(Packet::PubComp(p)) => {
                inflight.remove(&p.packet_id);
            }
            Ok(other) => panic!("unexpected packet for the publisher: {other:?}"),
            Err(Closed::Timeout) => {}
            Err(Closed::Eof) => panic!("node 1 closed the publisher's connection"),
        }
    }
}

/// The persistent subscriber's side, kept across its connections: QoS 2 "method B"
/// (deliver on PUBLISH, remember the packet id until PUBREL).
#[derive(Default)]
struct Receiver {
    awaiting_rel: HashSet<u16>,
    got: Vec<(QoS, u64)>,
}

impl Receiver {
    /// Connects to `c`'s node 2 and reads until nothing arrives for `IDLE`.
    fn read_queue(&mut self, cluster: &Cluster) {
        let (mut c, ack) = RawClient::connect(cluster.node(2).addr(), persistent("dur-sub"));
        assert_eq!(ack.reason_code, ReasonCode::Success);
        assert!(ack.session_present, "the subscriber's session survived");
        loop {
            match c.try_recv(IDLE) {
                Ok(Packet::Publish(p)) => {
                    let n: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                    match p.qos {
                        QoS::AtLeastOnce => {
                            self.got.push((QoS::AtLeastOnce, n));
                            c.send(&Packet::PubAck(PubAck::new(p.packet_id)));
                        }
                        QoS::ExactlyOnce => {
                            if self.awaiting_rel.insert(p.packet_id) {
                                self.got.push((QoS::ExactlyOnce, n));
                            }
                            c.send(&Packet::PubRec(PubRec::new(p.packet_id)));
                        }
                        QoS::AtMostOnce => panic!("QoS 0 delivery: {p:?}"),
                    }
                }
                Ok(Packet::PubRel(r)) => {
                    self.awaiting_rel.remove(&r.packet_id);
                    c.send(&Packet::PubComp(PubComp::new(r.packet_id)));
                }
                Ok(other) => panic!("unexpected packet for the subscriber: {other:?}"),
                Err(Closed::Timeout) => break,
                Err(Closed::Eof) => panic!("node 2 closed the subscriber's connection"),
            }
        }
        c.disconnect();
    }
}

fn persistent(id: &str) -> tessera_proto::Connect {
    connect_packet(V4, id, false, 60)
}

/// A generator seeded from the clock (printed), for the moment of each kill.
fn random() -> impl FnMut(u64) -> u64 {
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {rng}");
    move |below| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % below
    }
}

#[test]
fn a_receiving_node_killed_mid_stream_loses_and_duplicates_nothing_it_answered_for() {
    let mut cluster = Cluster::new(
        "cluster-durability",
        3,
        3,
        &[("TESSERA_LIMITS__MAX_QUEUED_MESSAGES", "20000")],
    );
    for id in 1..=3 {
        cluster.start(id, &[], false);
    }
    cluster.wait_for_leader();
    {
        let mut s = RawClient::connect_ok(cluster.node(2).addr(), persistent("dur-sub"));
        assert_eq!(
            s.subscribe(1, &[("dur/#", QoS::ExactlyOnce)]),
            [ReasonCode::GrantedQoS2]
        );
        s.disconnect();
    }
    let mut publisher = RawClient::connect_ok(
        cluster.node(1).addr(),
        connect_packet(V4, "dur-pub", true, 60),
    );
    let mut random = random();
    let mut acked = Acked::default();
    let mut receiver = Receiver::default();
    let mut next = 1u64;
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let stream = {
            let (stop, count) = (stop.clone(), count.clone());
            let mut acked = std::mem::take(&mut acked);
            std::thread::spawn(move || {
                let next = publish_stream(&mut publisher, next, &stop, &count, &mut acked);
                (publisher, acked, next)
            })
        };
        // Kill node 2 once the stream runs, at a random point.
        let kill_at = 100 + random(400);
        let deadline = Instant::now() + Duration::from_secs(60);
        while count.load(Ordering::Relaxed) < kill_at {
            assert!(
                Instant::now() < deadline && !stream.is_finished(),
                "round {round}: only {} acknowledged",
                count.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        cluster.kill(2);
        let at_kill = count.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
        cluster.start(2, &[], false);
        cluster.wait_until("node 2 ready again", |c| c.ready(2));
        stop.store(true, Ordering::Relaxed);
        let (p, a, n) = stream.join().expect("publisher");
        (publisher, acked, next) = (p, a, n);
        println!(
            "round {round}: killed node 2 after {at_kill} acknowledgements; {} in all",
            acked.qos1.len() + acked.qos2.len()
        );
        receiver.read_queue(&cluster);
    }

    let mut count: HashMap<u64, usize> = HashMap::new();
    for &(qos, n) in &receiver.got {
        let c = count.entry(n).or_default();
        *c += 1;
        if qos == QoS::ExactlyOnce {
            assert_eq!(*c, 1, "QoS 2 message {n} delivered twice");
        }
    }
    let lost1: Vec<u64> = acked
        .qos1
        .iter()
        .copied()
        .filter(|n| !count.contains_key(n))
        .collect();
    let lost2: Vec<u64> = acked
        .qos2
        .iter()
        .copied()
        .filter(|n| !count.contains_key(n))
        .collect();
    assert!(
        lost1.is_empty() && lost2.is_empty(),
        "acknowledged and lost: QoS 1 {lost1:?}, QoS 2 {lost2:?} (of {} and {})",
        acked.qos1.len(),
        acked.qos2.len()
    );
    assert!(
        acked.qos1.len() + acked.qos2.len() >= 200,
        "too few acknowledged to test anything"
    );
}
