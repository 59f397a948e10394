//! Goal: a connection that went idle and was parked (its task and glommio
//! socket given up, the fd waiting in the shard's epoll set; see
//! `server::park`) behaves exactly like an active one: it receives
//! deliveries, answers PINGREQ, times out on keep alive, has its will
//! published when the client vanishes, and gets the shutdown DISCONNECT.
//!
//! Method: a one-shard broker with debug logging, driven by the raw client
//! of `common`. Each step first waits until the broker logged that one more
//! connection parked (a connection parks after two quiet ticks, 0.25–0.5 s),
//! so the step runs against a parked connection. Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::{Broker, RECV_TIMEOUT, RawClient, connect_packet, will};
use tessera_proto::{Packet, ProtocolVersion, QoS, ReasonCode};

/// How long a connection may take to park: two ticks plus a wide margin for
/// a loaded machine.
const PARK_TIMEOUT: Duration = Duration::from_secs(10);

const PARKED: &str = "idle: connection parked";

/// Waits until the broker logged at least `n` parkings.
fn wait_parked(broker: &Broker, n: usize) {
    let deadline = Instant::now() + PARK_TIMEOUT;
    while broker.log().matches(PARKED).count() < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} connections parked within {PARK_TIMEOUT:?}:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start() -> Broker {
    Broker::start_with(&["--shards", "1", "--log-level", "debug"], &[])
}

#[test]
fn a_parked_subscriber_gets_deliveries_and_answers_pings() {
    let broker = start();
    let v5 = ProtocolVersion::V5;
    let mut sub = RawClient::connect_ok(broker.addr(), connect_packet(v5, "park-sub", true, 60));
    assert_eq!(
        sub.subscribe(1, &[("park/#", QoS::AtLeastOnce)]),
        vec![ReasonCode::GrantedQoS1]
    );
    wait_parked(&broker, 1);
    let mut publisher =
        RawClient::connect_ok(broker.addr(), connect_packet(v5, "park-pub", true, 60));
    publisher.publish("park/a", b"first", QoS::AtLeastOnce, 1);
    let p = sub.recv_publish();
    assert_eq!((&p.topic[..], &p.payload[..]), ("park/a", &b"first"[..]));

    // Both parked again: a delivery wakes the subscriber, and the publisher's
    // next PUBLISH (input) wakes the publisher.
    wait_parked(&broker, 3);
    publisher.publish("park/b", b"second", QoS::AtLeastOnce, 2);
    let p = sub.recv_publish();
    assert_eq!((&p.topic[..], &p.payload[..]), ("park/b", &b"second"[..]));

    wait_parked(&broker, 5);
    sub.send(&Packet::PingReq);
    assert!(matches!(sub.recv(), Packet::PingResp), "PINGRESP");
}

#[test]
fn a_parked_connection_times_out_and_its_vanishing_publishes_the_will() {
    let broker = start();
    let v4 = ProtocolVersion::V3_1_1;
    let mut watcher = RawClient::connect_ok(broker.addr(), connect_packet(v4, "watcher", true, 60));
    watcher.subscribe(1, &[("wills/#", QoS::AtMostOnce)]);

    let mut with_will = connect_packet(v4, "vanishing", true, 60);
    with_will.will = Some(will("wills/vanishing", b"gone", QoS::AtMostOnce));
    let vanishing = RawClient::connect_ok(broker.addr(), with_will);
    wait_parked(&broker, 2);
    vanishing.drop_connection();
    let p = watcher.recv_publish();
    assert_eq!(
        (&p.topic[..], &p.payload[..]),
        ("wills/vanishing", &b"gone"[..])
    );

    // Keep alive 1 s: the broker closes it after 1.5 s of silence, parked.
    let mut silent = RawClient::connect_ok(broker.addr(), connect_packet(v4, "silent", true, 1));
    silent.expect_closed(RECV_TIMEOUT);
    assert!(
        broker.log().matches(PARKED).count() >= 3,
        "the silent connection parked before its keep alive ran out:\n{}",
        broker.log()
    );
}

#[test]
fn parked_connections_get_the_shutdown_disconnect() {
    let mut broker = start();
    let v5 = ProtocolVersion::V5;
    let mut a = RawClient::connect_ok(broker.addr(), connect_packet(v5, "parked-a", true, 60));
    let mut b = RawClient::connect_ok(broker.addr(), connect_packet(v5, "parked-b", true, 60));
    wait_parked(&broker, 2);
    broker.sigterm();
    a.expect_disconnect_then_close(ReasonCode::ServerShuttingDown);
    b.expect_disconnect_then_close(ReasonCode::ServerShuttingDown);
    assert!(broker.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn pings_to_a_parked_connection_are_answered_without_waking_it() {
    let broker = start();
    let v4 = ProtocolVersion::V3_1_1;
    // Keep alive 2 s: the broker closes a connection silent for 3 s.
    let mut sub = RawClient::connect_ok(broker.addr(), connect_packet(v4, "pinger", true, 2));
    sub.subscribe(1, &[("pinger/#", QoS::AtLeastOnce)]);
    wait_parked(&broker, 1);

    // Six seconds of pings, one or two per write: each is answered, and they
    // keep the connection alive past its keep alive, but never unpark it (an
    // unparked connection parks again two ticks later and logs it).
    for round in 0..6 {
        let pings = if round % 2 == 0 { 1 } else { 2 };
        sub.send_bytes(&[0xC0, 0x00].repeat(pings));
        for _ in 0..pings {
            assert!(
                matches!(sub.recv(), Packet::PingResp),
                "PINGRESP in round {round}"
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(
        broker.log().matches(PARKED).count(),
        1,
        "a ping woke the parked connection:\n{}",
        broker.log()
    );

    // Still served as a parked connection: a delivery wakes it.
    let mut publisher =
        RawClient::connect_ok(broker.addr(), connect_packet(v4, "pinger-pub", true, 60));
    publisher.publish("pinger/a", b"after pings", QoS::AtLeastOnce, 1);
    let p = sub.recv_publish();
    assert_eq!(&p.payload[..], b"after pings");

    // Anything but whole PINGREQs goes to the connection task: half a PINGREQ
    // (the rest follows later), and a PINGREQ followed by another packet.
    wait_parked(&broker, 3);
    sub.send_bytes(&[0xC0]);
    std::thread::sleep(Duration::from_millis(300));
    sub.send_bytes(&[0x00]);
    assert!(
        matches!(sub.recv(), Packet::PingResp),
        "PINGRESP after a split PINGREQ"
    );
    wait_parked(&broker, 4);
    let mut mixed = vec![0xC0, 0x00];
    mixed.extend_from_slice(&[0xE0, 0x00]); // DISCONNECT (3.1.1)
    sub.send_bytes(&mixed);
    assert!(
        matches!(sub.recv(), Packet::PingResp),
        "PINGRESP before the DISCONNECT"
    );
    sub.expect_closed(RECV_TIMEOUT);
}
