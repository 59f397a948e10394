//! Goal: memory the broker frees after a burst (connections that were busy
//! with large messages, then quiet or gone) goes back to the OS on its own,
//! without new traffic, and `/metrics` shows it: the allocator is jemalloc,
//! and `tessera_allocator_released_bytes_total` grows after the burst.
//!
//! Method: the real `broker` binary (one shard, release delay 100 ms), 24 raw
//! clients each publishing a 256 KiB QoS 1 message at once while a rumqttc
//! subscriber receives them all, so the shard's read and write buffers grow
//! to megabytes; then everyone disconnects and nothing else happens. The
//! metric is polled until it grows (bounded wait). No memory figure is
//! asserted: those are benchmarks (docs/BENCHMARKS.md). jemalloc is the
//! default; built with `--no-default-features` the broker uses the system
//! malloc, and this file is empty.

#![cfg(feature = "jemalloc")]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Broker, RawClient, connect_packet};
use tessera_proto::{ProtocolVersion, QoS};

const TIMEOUT: Duration = Duration::from_secs(10);
const PUBLISHERS: usize = 24;
const PAYLOAD_BYTES: usize = 256 * 1024;

/// One sample of `/metrics` (`name` without labels, or with `label`), if present.
fn metric(admin: SocketAddr, name: &str) -> Option<(String, f64)> {
    let body = common::metrics_text(admin);
    body.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let labels = series.strip_prefix(name)?;
        (labels.is_empty() || labels.starts_with('{'))
            .then(|| (labels.to_owned(), value.parse().expect("a number")))
    })
}

#[test]
fn memory_freed_after_a_burst_is_returned_to_the_os() {
    let broker = Broker::start_with(
        &["--shards", "1"],
        &[("TESSERA_LIMITS__MEMORY_RELEASE_DELAY_MS", "100")],
    );
    let admin = broker.admin_addr();
    assert_eq!(
        metric(admin, "tessera_allocator_info"),
        Some(("{allocator=\"jemalloc\"}".to_owned(), 1.0)),
        "the broker runs on jemalloc"
    );

    let mut o = rumqttc::MqttOptions::new("mem-sub", "127.0.0.1", broker.addr().port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1024 * 1024, 1024 * 1024);
    let (sub, mut events) = rumqttc::Client::new(o, 64);
    sub.subscribe("mem/#", rumqttc::QoS::AtMostOnce)
        .expect("queue subscribe");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("rumqttc subscriber before SUBACK: {other:?}"),
        }
    }

    let mut publishers: Vec<RawClient> = (0..PUBLISHERS)
        .map(|i| {
            let id = format!("mem-pub-{i}");
            RawClient::connect_ok(
                broker.addr(),
                connect_packet(ProtocolVersion::V3_1_1, &id, true, 30),
            )
        })
        .collect();
    let released_before = metric(admin, "tessera_allocator_released_bytes_total")
        .expect("the released-bytes counter is exported")
        .1;
    let payload = vec![0x5a; PAYLOAD_BYTES];
    for (i, p) in publishers.iter_mut().enumerate() {
        p.send(&common::publish_packet(
            &format!("mem/{i}"),
            &payload,
            QoS::AtLeastOnce,
            1,
            false,
        ));
    }
    for p in &mut publishers {
        assert!(
            matches!(p.recv(), tessera_proto::Packet::PubAck(_)),
            "PUBACK"
        );
    }
    let mut received = 0;
    while received < PUBLISHERS {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                assert_eq!(p.payload.len(), PAYLOAD_BYTES);
                received += 1;
            }
            Ok(Ok(_)) => {}
            other => panic!("rumqttc subscriber after {received} messages: {other:?}"),
        }
    }
    for mut p in publishers {
        p.disconnect();
    }
    let _ = sub.disconnect();
    let _ = events.recv_timeout(Duration::from_millis(200));

    // Nothing else happens now: the allocator's background thread alone
    // returns what the burst freed.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let released = metric(admin, "tessera_allocator_released_bytes_total")
            .expect("the released-bytes counter is exported")
            .1;
        if released > released_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no memory returned to the OS within {TIMEOUT:?} after the burst \
             (released {released} B, {released_before} B before it)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
