//! Goal: the per-publisher back-pressure of a single node extends across nodes (issue
//! 15, "QoS and durability across nodes"): a QoS 1 publisher on node 1 whose messages
//! fill a subscriber's queue on node 2 gets its PUBACKs late, not at once followed by
//! the subscriber's queue dropping what was acknowledged; once the subscriber reads
//! again, every message the publisher got a PUBACK for arrives, once and in order.
//!
//! Method: 2 real broker processes (`common::cluster`, one shard each) with small queue
//! limits (100 queued, high-water mark 20, hold bound 4 s), real rumqttc 3.1.1 clients:
//! a subscriber on node 2 that stops polling its connection (it neither reads nor
//! acknowledges, so its in-flight window and then its queue fill) and a publisher on
//! node 1 with a window of 20 that queues 300 messages at once. While the subscriber is
//! paused the publisher may have been acknowledged at most what node 2 can hold for it
//! (in flight plus queued); before this change node 2 answered every forwarded batch at
//! once and the publisher had all 300 PUBACKs while node 2 dropped most of them. Then
//! the subscriber polls again and must get 0..300 in order, the publisher all its
//! PUBACKs, and node 2 must have counted held acknowledgements and no drop. Every wait
//! is bounded.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::Cluster;

const TIMEOUT: Duration = Duration::from_secs(30);
const MESSAGES: usize = 300;
/// The subscriber's queue bound and high-water mark on node 2, and the broker's
/// in-flight window per subscriber (the default).
const QUEUED_MAX: usize = 100;
const INFLIGHT_MAX: usize = 32;
const LIMITS: [(&str, &str); 3] = [
    ("TESSERA_LIMITS__MAX_QUEUED_MESSAGES", "100"),
    ("TESSERA_LIMITS__QUEUE_HIGH_WATER", "20"),
    // Longer than the pause below: no acknowledgement is released by the bound.
    ("TESSERA_LIMITS__BACKPRESSURE_HOLD_MS_MAX", "4000"),
];

fn options(addr: SocketAddr, id: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

fn counter(cluster: &Cluster, node: u64, name: &str) -> f64 {
    common::metric_sum(&common::scrape(cluster.node(node).admin_addr()), name, &[])
}

#[test]
fn a_full_queue_on_another_node_holds_the_publishers_acks_and_loses_nothing() {
    let mut cluster = Cluster::new("cluster-bp", 2, 2, &LIMITS);
    for id in 1..=2 {
        cluster.start(id, &[], false);
    }
    cluster.wait_for_leader();

    // The subscriber on node 2.
    let (sub, mut sub_conn) = rumqttc::Client::new(options(cluster.node(2).addr(), "bp-sub"), 10);
    sub.subscribe("bp/x", rumqttc::QoS::AtLeastOnce)
        .expect("subscribe");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match sub_conn.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("subscriber: no SUBACK: {other:?}"),
        }
    }
    // From here the subscriber is paused: nobody polls `sub_conn`.

    // The publisher on node 1: 300 QoS 1 messages, 20 in flight, PUBACKs counted.
    let acked = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let acked = acked.clone();
        let mut o = options(cluster.node(1).addr(), "bp-pub");
        o.set_inflight(20);
        thread::spawn(move || {
            let (client, mut conn) = rumqttc::Client::new(o, MESSAGES + 10);
            for i in 0..MESSAGES {
                client
                    .publish("bp/x", rumqttc::QoS::AtLeastOnce, false, i.to_string())
                    .expect("queue publish");
            }
            let deadline = Instant::now() + TIMEOUT;
            while acked.load(Ordering::Relaxed) < MESSAGES {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(
                    !left.is_zero(),
                    "publisher: {} of {MESSAGES} PUBACKs",
                    acked.load(Ordering::Relaxed)
                );
                match conn.recv_timeout(left) {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => {}
                    other => panic!("publisher: {other:?}"),
                }
            }
            let _ = client.disconnect();
            let _ = conn.recv_timeout(Duration::from_millis(200));
        })
    };

    // Node 2 starts holding the batch answers once the subscriber's queue is congested
    // (asserted below, after the count that shows what an unheld forwarder does).
    let deadline = Instant::now() + Duration::from_secs(3);
    while counter(&cluster, 2, "tessera_backpressure_acks_held_total") == 0.0
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(20));
    }
    // Give an unheld forwarder time to acknowledge everything.
    thread::sleep(Duration::from_millis(700));
    let during_pause = acked.load(Ordering::Relaxed);
    assert!(
        during_pause <= INFLIGHT_MAX + QUEUED_MAX,
        "while node 2's subscriber was paused its publisher on node 1 got {during_pause} \
         PUBACKs: more than node 2 can hold for it ({INFLIGHT_MAX} in flight + {QUEUED_MAX} \
         queued) without dropping acknowledged messages"
    );

    assert!(
        counter(&cluster, 2, "tessera_backpressure_acks_held_total") > 0.0,
        "node 2 never held an acknowledgement for its paused subscriber"
    );

    // The subscriber reads again: everything acknowledged arrives, once, in order.
    let mut got = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while got.len() < MESSAGES {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "subscriber got {} of {MESSAGES} (publisher acknowledged {})",
            got.len(),
            acked.load(Ordering::Relaxed)
        );
        match sub_conn.recv_timeout(left) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                let n: usize = std::str::from_utf8(&p.payload)
                    .expect("UTF-8")
                    .parse()
                    .expect("a number");
                got.push(n);
            }
            Ok(Ok(_)) => {}
            other => panic!("subscriber: {other:?}"),
        }
    }
    publisher.join().expect("publisher got every PUBACK");
    assert_eq!(
        got,
        (0..MESSAGES).collect::<Vec<_>>(),
        "lost, repeated or reordered"
    );
    assert_eq!(
        counter(&cluster, 2, "tessera_messages_dropped_total"),
        0.0,
        "node 2 dropped messages"
    );
    assert_eq!(
        counter(&cluster, 1, "tessera_cluster_forward_dropped_total"),
        0.0
    );
    let _ = sub.disconnect();
}
