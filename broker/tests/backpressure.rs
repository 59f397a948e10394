//! Goal: QoS 1 fan-in into a slow subscriber is loss-free because the broker
//! slows the publishers (holds their PUBACKs) instead of acknowledging and then
//! dropping; clients that feed their own or each other's queues still finish;
//! a subscriber that never reads holds acknowledgements only for
//! `limits.backpressure_hold_ms_max`.
//!
//! Method: the real `broker` binary on loopback with small queue limits (so a
//! queue fills within a second), real rumqttc 3.1.1 clients on threads, the
//! raw client where exact PUBACK timing matters, and the broker's own
//! counters from `/metrics` (dropped, held, hold timeouts). Every wait is
//! bounded.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{Broker, RawClient, connect_packet, id_on_shard, publish_packet};
use tessera_proto::{Packet, ProtocolVersion, QoS};

/// Bound of every test's traffic phase.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A queue of 1000 with back-pressure from 50 (a queue fills fast). Loss-free needs
/// room above the high-water mark for every publisher's window (the messages
/// already sent when the acknowledgements start being held): 50 + 4 x 100.
const LIMITS: [(&str, &str); 2] = [
    ("TESSERA_LIMITS__MAX_QUEUED_MESSAGES", "1000"),
    ("TESSERA_LIMITS__QUEUE_HIGH_WATER", "50"),
];

/// Sum of the samples of counter `name` on every shard (and label).
fn counter(admin: SocketAddr, name: &str) -> f64 {
    let body = common::metrics_text(admin);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("/metrics parses");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => *v,
            _ => 0.0,
        })
        .sum()
}

fn options(addr: SocketAddr, id: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// Publishes `n` QoS 1 messages `"{tag}:{i}"` to `topic` as fast as rumqttc
/// goes (its default window of 100, beyond our Receive Maximum of 32) and
/// waits for every PUBACK. Also counts PUBLISHes it receives (for clients
/// subscribed to something) and returns when it has `expect` of them too.
/// With `start`, it publishes only once every client sharing the barrier got
/// its SUBACK: a message published before its subscriber subscribed is not
/// for that subscriber.
fn publisher(
    addr: SocketAddr,
    id: String,
    topic: String,
    n: usize,
    subscribe: Option<String>,
    expect: usize,
    start: Option<Arc<Barrier>>,
) -> thread::JoinHandle<Vec<String>> {
    thread::spawn(move || {
        let (client, mut conn) = rumqttc::Client::new(options(addr, &id), 1000);
        if let Some(f) = &subscribe {
            client
                .subscribe(f.as_str(), rumqttc::QoS::AtLeastOnce)
                .expect("subscribe");
            let deadline = Instant::now() + TIMEOUT;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match conn.recv_timeout(left) {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) => break,
                    Ok(Ok(_)) => {}
                    other => panic!("{id}: no SUBACK: {other:?}"),
                }
            }
        }
        if let Some(b) = &start {
            b.wait();
        }
        let sender = {
            let client = client.clone();
            let id = id.clone();
            thread::spawn(move || {
                for i in 0..n {
                    client
                        .publish(
                            topic.as_str(),
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            format!("{id}:{i}"),
                        )
                        .expect("queue publish");
                }
            })
        };
        let (mut acked, mut got) = (0, Vec::new());
        let deadline = Instant::now() + TIMEOUT;
        while acked < n || got.len() < expect {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{id}: {acked} of {n} PUBACKs, {} of {expect} messages",
                got.len()
            );
            match conn.recv_timeout(left) {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                    got.push(String::from_utf8(p.payload.to_vec()).expect("UTF-8"));
                }
                Ok(Ok(_)) => {}
                other => panic!("{id}: {other:?}"),
            }
        }
        sender.join().expect("sender");
        let _ = client.disconnect();
        let _ = conn.recv_timeout(Duration::from_millis(200));
        got
    })
}

/// `publishers` rumqttc clients on shard 0 publish `per` QoS 1 messages each
/// into one rumqttc subscriber on `sub_shard` that pauses 1 ms every 10
/// messages. Every message arrives once, in order per publisher, the
/// broker counted no drop, and it did hold acknowledgements (the queue was
/// congested, so the test exercised what it claims).
fn slow_subscriber_fan_in(sub_shard: usize) {
    let broker = Broker::start_with(&["--shards", "2"], &LIMITS);
    let addr = broker.addr();
    let (publishers, per) = (4, 2000);
    let sub_id = id_on_shard("bp-sub", sub_shard);
    let (client, mut conn) = rumqttc::Client::new(options(addr, &sub_id), 10);
    client
        .subscribe("bp/fanin", rumqttc::QoS::AtLeastOnce)
        .expect("subscribe");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match conn.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("subscriber: no SUBACK: {other:?}"),
        }
    }
    let pubs: Vec<_> = (0..publishers)
        .map(|k| {
            let id = id_on_shard(&format!("bp-pub{k}"), 0);
            publisher(addr, id, "bp/fanin".into(), per, None, 0, None)
        })
        .collect();
    let mut next: HashMap<String, usize> = HashMap::new();
    let mut got = 0;
    while got < publishers * per {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "subscriber got {got} of {}",
            publishers * per
        );
        match conn.recv_timeout(left) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                let text = String::from_utf8(p.payload.to_vec()).expect("UTF-8");
                let (id, i) = text.rsplit_once(':').expect("id:i");
                let i: usize = i.parse().expect("index");
                let expected = next.entry(id.to_owned()).or_insert(0);
                assert_eq!(i, *expected, "out of order or lost from {id}");
                *expected += 1;
                got += 1;
                if got % 10 == 0 {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            Ok(Ok(_)) => {}
            other => panic!("subscriber: {other:?}"),
        }
    }
    for p in pubs {
        p.join().expect("publisher");
    }
    let admin = broker.admin_addr();
    assert_eq!(counter(admin, "tessera_messages_dropped_total"), 0.0);
    assert!(
        counter(admin, "tessera_backpressure_acks_held_total") > 0.0,
        "the subscriber's queue never reached the high-water mark"
    );
}

#[test]
fn slow_subscriber_on_the_publishers_shard_loses_nothing() {
    slow_subscriber_fan_in(0);
}

#[test]
fn slow_subscriber_on_another_shard_loses_nothing() {
    slow_subscriber_fan_in(1);
}

/// Runs `clients` (id prefix, shard, publish topic, subscribe filter), each
/// publishing `n` QoS 1 messages fast; all must get their PUBACKs. With
/// `lossless`, each must also get the `n` messages it subscribed to and the
/// broker must have dropped nothing. (A client's own queue never throttles
/// it, so one feeding itself faster than it reads overflows its own queue.)
fn no_deadlock(clients: &[(&str, usize, &str, &str)], n: usize, lossless: bool) {
    let broker = Broker::start_with(&["--shards", "2"], &LIMITS);
    let addr = broker.addr();
    let started = Instant::now();
    // Every client subscribed before any publishes (each feeds another's filter).
    let start = Arc::new(Barrier::new(clients.len()));
    let handles: Vec<_> = clients
        .iter()
        .map(|(prefix, shard, topic, filter)| {
            publisher(
                addr,
                id_on_shard(prefix, *shard),
                (*topic).into(),
                n,
                Some((*filter).into()),
                if lossless { n } else { 0 },
                Some(start.clone()),
            )
        })
        .collect();
    for h in handles {
        let got = h.join().expect("client").len();
        assert!(got <= n);
        assert!(!lossless || got == n, "{got} of {n}");
    }
    let admin = broker.admin_addr();
    if lossless {
        assert_eq!(counter(admin, "tessera_messages_dropped_total"), 0.0);
    }
    eprintln!(
        "finished in {:?}; acks held {}, hold timeouts {}, reads paused {}",
        started.elapsed(),
        counter(admin, "tessera_backpressure_acks_held_total"),
        counter(admin, "tessera_backpressure_hold_timeouts_total"),
        counter(admin, "tessera_backpressure_reads_paused_total")
    );
}

/// A client subscribed to its own topic publishes fast: never throttled by
/// its own queue.
#[test]
fn a_client_feeding_its_own_queue_does_not_deadlock() {
    no_deadlock(&[("bp-self", 0, "bp/self", "bp/self")], 3000, false);
}

/// Two clients, on different shards, each subscribed to the other's topic,
/// publish fast: both finish.
#[test]
fn clients_feeding_each_others_queues_do_not_deadlock() {
    no_deadlock(
        &[("bp-a", 0, "bp/b", "bp/a"), ("bp-b", 1, "bp/a", "bp/b")],
        3000,
        true,
    );
}

/// A subscriber that never reads: its window (32) and queue up to the
/// high-water mark take the first messages, whose PUBACKs come at once; the
/// rest are acknowledged only after the hold bound (1 s here).
#[test]
fn a_subscriber_that_never_reads_holds_acks_only_for_the_bound() {
    let broker = Broker::start_with(
        &["--shards", "1"],
        &[
            ("TESSERA_LIMITS__QUEUE_HIGH_WATER", "20"),
            ("TESSERA_LIMITS__BACKPRESSURE_HOLD_MS_MAX", "1000"),
        ],
    );
    let v = ProtocolVersion::V5;
    let mut sub = RawClient::connect_ok(broker.addr(), connect_packet(v, "bp-stuck", true, 0));
    sub.subscribe(1, &[("bp/stuck", QoS::AtLeastOnce)]);
    // 3.1.1: no Receive Maximum to keep to; 60 is within the pause bound
    // of 32 held acknowledgements.
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "bp-pub", true, 0),
    );
    let total = 60u16;
    for id in 1..=total {
        publ.send(&publish_packet(
            "bp/stuck",
            b"x",
            QoS::AtLeastOnce,
            id,
            false,
        ));
    }
    let prompt = 32 + 20;
    let start = Instant::now();
    let mut acked = Vec::new();
    while acked.len() < usize::from(total) {
        assert!(start.elapsed() < Duration::from_secs(5), "acked {acked:?}");
        match publ.try_recv(Duration::from_millis(100)) {
            Ok(Packet::PubAck(a)) => acked.push((a.packet_id, start.elapsed())),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(common::Closed::Timeout) => {}
            Err(e) => panic!("publisher connection: {e:?} after {acked:?}"),
        }
    }
    let ids: Vec<u16> = acked.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=total).collect::<Vec<_>>(), "in PUBLISH order");
    let (_, last_prompt) = acked[prompt - 1];
    let (_, first_held) = acked[prompt];
    assert!(last_prompt < Duration::from_millis(500), "{acked:?}");
    assert!(
        first_held >= Duration::from_millis(700),
        "held until the bound: {acked:?}"
    );
    let admin = broker.admin_addr();
    assert_eq!(
        counter(admin, "tessera_backpressure_hold_timeouts_total"),
        f64::from(total) - prompt as f64
    );
    assert_eq!(counter(admin, "tessera_messages_dropped_total"), 0.0);
}

/// A shared-subscription member on another shard than its publisher that does not
/// read holds the publisher's PUBACKs as a plain subscriber does: a rumqttc member of
/// `$share/g/bp/shared` on shard 1 stops polling after its SUBACK, a rumqttc publisher
/// on shard 0 (window 20) queues 300 QoS 1 messages, more than the member's queue bound
/// (100). While the member is paused the publisher may have been acknowledged at most
/// what the broker holds for the member (32 in flight + 100 queued); then the member
/// reads again and gets every message, once, in order, with nothing dropped. Before,
/// a delivery to a shared member on another shard was acknowledged at once: the
/// publisher had all 300 PUBACKs and the member's queue dropped most of them.
#[test]
fn a_shared_member_on_another_shard_that_does_not_read_holds_its_publisher() {
    const N: usize = 300;
    let broker = Broker::start_with(
        &["--shards", "2"],
        &[
            ("TESSERA_LIMITS__MAX_QUEUED_MESSAGES", "100"),
            ("TESSERA_LIMITS__QUEUE_HIGH_WATER", "20"),
            // Far beyond the pause below: nothing is released by the bound.
            ("TESSERA_LIMITS__BACKPRESSURE_HOLD_MS_MAX", "20000"),
        ],
    );
    let (addr, admin) = (broker.addr(), broker.admin_addr());
    let (member, mut member_conn) =
        rumqttc::Client::new(options(addr, &id_on_shard("bp-member", 1)), 10);
    member
        .subscribe("$share/g/bp/shared", rumqttc::QoS::AtLeastOnce)
        .expect("subscribe");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match member_conn.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("member: no SUBACK: {other:?}"),
        }
    }
    // From here nobody polls the member until it resumes.
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publishing = {
        let acked = acked.clone();
        let mut o = options(addr, &id_on_shard("bp-shared-pub", 0));
        o.set_inflight(20);
        thread::spawn(move || {
            let (client, mut conn) = rumqttc::Client::new(o, N + 10);
            for i in 0..N {
                client
                    .publish("bp/shared", rumqttc::QoS::AtLeastOnce, false, i.to_string())
                    .expect("queue publish");
            }
            let deadline = Instant::now() + TIMEOUT;
            while acked.load(std::sync::atomic::Ordering::Relaxed) < N {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "publisher: {acked:?} of {N} PUBACKs");
                match conn.recv_timeout(left) {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => {
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => {}
                    other => panic!("publisher: {other:?}"),
                }
            }
            let _ = client.disconnect();
        })
    };
    // The member's queue reaches the high-water mark and the broker starts holding.
    let held_deadline = Instant::now() + Duration::from_secs(10);
    while counter(admin, "tessera_backpressure_acks_held_total") == 0.0 {
        assert!(
            Instant::now() < held_deadline,
            "no acknowledgement held; the publisher got {} PUBACKs and the broker dropped {}",
            acked.load(std::sync::atomic::Ordering::Relaxed),
            counter(admin, "tessera_messages_dropped_total")
        );
        thread::sleep(Duration::from_millis(20));
    }
    // Give an unheld broker time to acknowledge everything: the PUBACKs stop.
    thread::sleep(Duration::from_millis(700));
    let during_pause = acked.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        during_pause <= 32 + 100,
        "while the shared member was paused its publisher got {during_pause} PUBACKs: more \
         than the broker holds for it (32 in flight + 100 queued)"
    );
    // The member reads again: everything acknowledged arrives, once, in order.
    let mut got = Vec::new();
    while got.len() < N {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "member got {} of {N} (publisher acknowledged {during_pause} while it was paused)",
            got.len()
        );
        match member_conn.recv_timeout(left) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                let n: usize = std::str::from_utf8(&p.payload)
                    .expect("UTF-8")
                    .parse()
                    .expect("a number");
                got.push(n);
            }
            Ok(Ok(_)) => {}
            other => panic!("member: {other:?}"),
        }
    }
    publishing.join().expect("the publisher got every PUBACK");
    assert_eq!(
        got,
        (0..N).collect::<Vec<_>>(),
        "lost, repeated or reordered"
    );
    assert_eq!(counter(admin, "tessera_messages_dropped_total"), 0.0);
    let _ = member.disconnect();
}
