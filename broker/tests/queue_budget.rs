//! Persistent queues, black-box: "acknowledged means delivered", also when a
//! subscriber is offline for a while, the broker is killed with SIGKILL
//! (`durability = "sync"`, the default) and its queue fills.
//!
//! Goal: every message a publisher was acknowledged for reaches the
//! persistent subscriber (QoS 1 at least once, QoS 2 exactly once) across
//! offline intervals and `kill -9` restarts, with the offline queue longer
//! than the part kept in memory (so it goes through the disk tail); and when
//! a queue's byte budget is full the newest message is refused (a v5
//! publisher sees 0x97 on PUBACK and PUBREC, a 3.1.1 publisher no
//! acknowledgement and then a closed connection) while no acknowledged
//! message vanishes.
//!
//! Method: the real broker binary (2 shards, publishers on shard 0, the
//! subscriber on shard 1, so publications cross the mesh), rumqttc as the
//! v5 publisher that must see 0x97, and the raw test client where the test
//! must know exactly which message each acknowledgement was for and for the
//! crash-loop subscriber (see `Subscriber` for why not rumqttc there). The
//! subscriber removes QoS 2 re-sends itself as a receiver must (a PUBLISH
//! whose packet id it holds unreleased). Every loop is bounded in count and
//! time.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Broker, Closed, RawClient, Received, TestDir, connect_packet, id_on_shard, publish_packet,
};
use tessera_proto::{Packet, ProtocolVersion, PubRel, QoS, ReasonCode};

const V4: ProtocolVersion = ProtocolVersion::V3_1_1;
const WAIT: Duration = Duration::from_secs(10);

fn start(dir: &TestDir, envs: &[(&str, &str)]) -> Broker {
    Broker::start_with(&["--data-dir", dir.path_str(), "--shards", "2"], envs)
}

/// A subscriber session (3.1.1, clean session 0) connected until `stop`,
/// on the raw client: rumqttc 0.25 cannot be this subscriber, because after
/// a reconnect it answers the PUBREL the broker re-sends for a released QoS 2
/// delivery (MQTT-4.4.0-1) with a connection error (`StateError::Unsolicited`:
/// it forgets its incoming QoS 2 ids when it reconnects).
struct Subscriber {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Subscriber {
    fn connect(addr: SocketAddr, id: &str, subscribe: bool, log: Arc<Mutex<Received>>) -> Self {
        let mut c = RawClient::connect_ok(addr, connect_packet(V4, id, false, 0));
        if subscribe {
            c.subscribe(1, &[("qb/#", QoS::ExactlyOnce)]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && !stopping.load(Ordering::Relaxed) {
                let reply = match c.try_recv(Duration::from_millis(50)) {
                    Ok(p) => match log.lock().unwrap().answer(p) {
                        Some(reply) => reply,
                        None => continue,
                    },
                    Err(Closed::Timeout) => continue,
                    Err(Closed::Eof) => return, // the broker died
                };
                if !c.try_send(&reply) {
                    return;
                }
            }
            c.try_send(&Packet::Disconnect(tessera_proto::Disconnect::new(
                ReasonCode::Success,
            )));
        });
        Subscriber { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("subscriber thread");
    }
}

/// A publisher over the raw client: one message at a time, so the test
/// knows what each acknowledgement was for.
struct Publisher {
    c: RawClient,
    qos: QoS,
    next_id: u16,
}

impl Publisher {
    fn connect(addr: SocketAddr, id: &str, version: ProtocolVersion, qos: QoS) -> Self {
        let c = RawClient::connect_ok(addr, connect_packet(version, id, true, 0));
        Publisher { c, qos, next_id: 1 }
    }

    /// Publishes; the reason code of the PUBACK or PUBREC, or why none came.
    fn publish(&mut self, topic: &str, payload: &str) -> Result<ReasonCode, Closed> {
        let id = self.next_id;
        self.next_id = self.next_id % 60_000 + 1;
        let p = publish_packet(topic, payload.as_bytes(), self.qos, id, false);
        self.c.send(&p);
        let rc = match self.c.try_recv(WAIT)? {
            Packet::PubAck(a) if a.packet_id == id => a.reason_code,
            Packet::PubRec(r) if r.packet_id == id => r.reason_code,
            other => panic!("expected the acknowledgement of {id}, got {other:?}"),
        };
        if self.qos == QoS::ExactlyOnce && !rc.is_error() {
            self.c.send(&Packet::PubRel(PubRel::new(id)));
            match self.c.try_recv(WAIT)? {
                Packet::PubComp(c) => assert_eq!(c.packet_id, id),
                other => panic!("expected PUBCOMP {id}, got {other:?}"),
            }
        }
        Ok(rc)
    }
}

fn counter(broker: &Broker, name: &str) -> f64 {
    let body = common::metrics_text(broker.admin_addr());
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Publishes `n` messages from each publisher, "{tag}-{k}", recording what
/// was acknowledged. Stops early (false) when the broker is gone.
fn publish_round(
    pubs: &mut [(Publisher, &str)],
    tag: &str,
    n: usize,
    acked: &mut HashMap<String, QoS>,
) {
    for k in 0..n {
        for (p, topic) in pubs.iter_mut() {
            let payload = format!("{}-{tag}-{k}", *topic);
            let rc = p.publish(topic, &payload).expect("broker alive");
            assert_eq!(rc, ReasonCode::Success, "{payload}");
            acked.insert(payload, p.qos);
        }
    }
}

#[test]
fn every_acknowledged_message_arrives_across_offline_intervals_and_kill_9() {
    let dir = TestDir::new("queue-crash");
    let sub_id = id_on_shard("qb-sub", 1);
    let (q1_id, q2_id) = (id_on_shard("qb-p1", 0), id_on_shard("qb-p2", 0));
    let log = Arc::new(Mutex::new(Received::default()));
    let mut acked: HashMap<String, QoS> = HashMap::new();
    let mut spilled = 0.0;
    for round in 0..3 {
        let broker = start(&dir, &[]);
        let addr = broker.addr();
        let mut pubs = [
            (
                Publisher::connect(addr, &q1_id, V4, QoS::AtLeastOnce),
                "qb/1",
            ),
            (
                Publisher::connect(addr, &q2_id, V4, QoS::ExactlyOnce),
                "qb/2",
            ),
        ];
        // Online: what the broker re-sends after the restart, and more.
        let sub = Subscriber::connect(addr, &sub_id, round == 0, log.clone());
        if round == 0 {
            // The SUBACK is in before anything is published.
            thread::sleep(Duration::from_millis(300));
        }
        publish_round(&mut pubs, &format!("r{round}-on"), 50, &mut acked);
        // Offline: longer than the 64 deliveries kept in memory.
        sub.stop();
        publish_round(&mut pubs, &format!("r{round}-off"), 150, &mut acked);
        // Back online, and killed while the backlog is on its way.
        let sub = Subscriber::connect(addr, &sub_id, false, log.clone());
        publish_round(&mut pubs, &format!("r{round}-back"), 20, &mut acked);
        spilled += counter(&broker, "tessera_queue_spilled_total");
        assert_eq!(counter(&broker, "tessera_queue_refused_total"), 0.0);
        drop(broker); // SIGKILL
        sub.stop();
    }
    assert!(
        spilled > 0.0,
        "the offline queues went through the disk tail"
    );
    // Last start: everything acknowledged arrives.
    let broker = start(&dir, &[]);
    let sub = Subscriber::connect(broker.addr(), &sub_id, false, log.clone());
    let deadline = Instant::now() + Duration::from_secs(15);
    let missing = loop {
        let got: HashSet<String> = log.lock().unwrap().payloads.iter().cloned().collect();
        let mut missing: Vec<&String> = acked.keys().filter(|p| !got.contains(*p)).collect();
        if missing.is_empty() || Instant::now() >= deadline {
            missing.sort();
            break missing;
        }
        thread::sleep(Duration::from_millis(100));
    };
    sub.stop();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages not delivered: {:?}",
        missing.len(),
        &missing[..missing.len().min(40)]
    );
    let received = log.lock().unwrap();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for p in &received.payloads {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    for (payload, n) in &counts {
        if payload.starts_with("qb/2") {
            assert_eq!(*n, 1, "QoS 2 {payload} delivered {n} times");
        }
    }
    assert_eq!(acked.len(), 3 * 220 * 2);
}

/// A rumqttc v5 client, its event loop on a thread; acknowledgements come
/// back as (packet id, reason) on a channel.
fn v5_publisher(
    addr: SocketAddr,
    id: &str,
) -> (
    rumqttc::v5::Client,
    std::sync::mpsc::Receiver<(u16, String)>,
) {
    let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = rumqttc::v5::Client::new(o, 100);
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        use rumqttc::v5::mqttbytes::v5::Packet as P;
        for event in conn.iter().take(10_000) {
            let sent = match event {
                Ok(rumqttc::v5::Event::Incoming(P::PubAck(a))) => {
                    tx.send((a.pkid, format!("{:?}", a.reason)))
                }
                Ok(rumqttc::v5::Event::Incoming(P::PubRec(r))) => {
                    tx.send((r.pkid, format!("{:?}", r.reason)))
                }
                Ok(_) => Ok(()),
                Err(_) => return,
            };
            if sent.is_err() {
                return;
            }
        }
    });
    (client, rx)
}

#[test]
fn a_full_queue_refuses_the_newest_message_and_loses_no_acknowledged_one() {
    let dir = TestDir::new("queue-full");
    // 4 KiB: about 30 messages of 60 bytes on "qf/t" (64 bytes overhead each).
    let broker = start(
        &dir,
        &[
            ("TESSERA_LIMITS__MAX_QUEUED_BYTES", "4096"),
            ("TESSERA_LIMITS__BACKPRESSURE_HOLD_MS_MAX", "500"),
        ],
    );
    let addr = broker.addr();
    let sub_id = id_on_shard("qf-sub", 1);
    let mut sub = RawClient::connect_ok(addr, connect_packet(V4, &sub_id, false, 0));
    sub.subscribe(1, &[("qf/t", QoS::ExactlyOnce)]);
    sub.disconnect();
    drop(sub);

    // rumqttc v5: QoS 1 until a PUBACK says 0x97, one message at a time.
    let (client, acks) = v5_publisher(addr, &id_on_shard("qf-p5", 0));
    let mut acked = Vec::new();
    let mut refused = None;
    for k in 0..200 {
        let payload = format!("{k:060}");
        client
            .publish(
                "qf/t",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .expect("publish");
        let (_, reason) = acks.recv_timeout(WAIT).expect("PUBACK");
        if reason == "Success" {
            acked.push(payload);
        } else {
            refused = Some(reason);
            break;
        }
    }
    assert_eq!(
        refused.as_deref(),
        Some("QuotaExceeded"),
        "after {}",
        acked.len()
    );
    assert!(
        acked.len() >= 20,
        "the budget held {} messages",
        acked.len()
    );
    // QoS 2 too: PUBREC 0x97 ends the exchange.
    client
        .publish(
            "qf/t",
            rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
            false,
            "q2",
        )
        .expect("publish");
    let (_, reason) = acks.recv_timeout(WAIT).expect("PUBREC");
    assert_eq!(reason, "QuotaExceeded");
    let _ = client.disconnect();

    // 3.1.1 has no reason codes: no acknowledgement, then the connection
    // closes at the hold bound (the client re-sends after reconnecting).
    let mut v4 = Publisher::connect(addr, &id_on_shard("qf-p4", 0), V4, QoS::AtLeastOnce);
    match v4.publish("qf/t", "from 3.1.1") {
        Err(Closed::Eof) => {}
        other => panic!("expected the connection closed without PUBACK, got {other:?}"),
    }
    assert!(counter(&broker, "tessera_queue_refused_total") >= 3.0);
    assert_eq!(counter(&broker, "tessera_queue_refused_closes_total"), 1.0);

    // Every acknowledged message is there, in order, after a kill -9 too.
    drop(broker);
    let broker = start(&dir, &[]);
    let mut sub = RawClient::connect_ok(broker.addr(), connect_packet(V4, &sub_id, false, 0));
    let mut got = Vec::new();
    while got.len() < acked.len() {
        match sub.try_recv(WAIT) {
            Ok(Packet::Publish(p)) => {
                assert_eq!(p.qos, QoS::AtLeastOnce);
                sub.send(&Packet::PubAck(tessera_proto::PubAck::new(p.packet_id)));
                got.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
            Ok(_) => {}
            Err(why) => panic!("{} of {} delivered: {why:?}", got.len(), acked.len()),
        }
    }
    assert_eq!(got, acked);
    assert!(matches!(
        sub.try_recv(Duration::from_millis(300)),
        Err(Closed::Timeout)
    ));
}
