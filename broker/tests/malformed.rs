//! Goal: a client that breaks the protocol gets exactly the response the MQTT
//! specification asks for (nothing, a CONNACK return code, or a v5 DISCONNECT
//! with the right reason code), then the close; and the broker keeps serving
//! everyone else.
//!
//! Method: each test starts the real broker (2 shards), sends hand-made bytes
//! over a raw socket, asserts the decoded response and the end of stream, then
//! checks that a fresh subscriber and publisher on different shards still
//! exchange a message.

mod common;

use std::time::Duration;

use common::{Broker, RawClient, assert_still_serves, connect_packet, publish_packet};
use tessera_proto::{Packet, ProtocolVersion, QoS, ReasonCode};

const V4: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// How long the broker may take to close after a violation.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A frame: the first byte, the remaining length, then `body`.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A CONNECT body: protocol name and level, connect flags, keep alive 30,
/// (v5: empty properties), then the client id.
fn connect_body(name: &str, level: u8, flags: u8, client_id: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u16).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&[level, flags, 0, 30]);
    if level == 5 {
        b.push(0);
    }
    b.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    b.extend_from_slice(client_id.as_bytes());
    b
}

/// A v5 client connected with `client_id`.
fn v5_client(broker: &Broker, client_id: &str) -> RawClient {
    RawClient::connect_ok(broker.addr(), connect_packet(V5, client_id, true, 30))
}

fn v4_client(broker: &Broker, client_id: &str) -> RawClient {
    RawClient::connect_ok(broker.addr(), connect_packet(V4, client_id, true, 30))
}

#[test]
fn first_packet_other_than_connect_is_closed_without_response() {
    // [MQTT-3.1.0-1]: the first packet from the client must be CONNECT.
    let broker = Broker::start();
    let firsts: [(&str, Vec<u8>); 3] = [
        ("pingreq", vec![0xC0, 0x00]),
        ("publish", frame(0x30, b"\x00\x03a/bhello")),
        ("subscribe", frame(0x82, b"\x00\x01\x00\x03a/b\x00")),
    ];
    for (name, bytes) in firsts {
        let mut c = RawClient::open(broker.addr(), V4);
        c.send_bytes(&bytes);
        c.expect_closed(CLOSE_TIMEOUT);
        assert_still_serves(broker.addr(), &format!("first-{name}"));
    }
}

#[test]
fn connect_with_reserved_flag_is_closed_without_response() {
    // [MQTT-3.1.2-3]: the reserved connect flag must be 0, else malformed
    // (both versions); the server closes the connection.
    let broker = Broker::start();
    for (level, id) in [(4, "reserved-v4"), (5, "reserved-v5")] {
        let mut c = RawClient::open(broker.addr(), V4);
        c.send_bytes(&frame(0x10, &connect_body("MQTT", level, 0x03, id)));
        c.expect_closed(CLOSE_TIMEOUT);
        assert_still_serves(broker.addr(), id);
    }
}

#[test]
fn unsupported_protocol_level_gets_connack_0x01_then_close() {
    // [MQTT-3.1.2-2]: an unsupported level gets CONNACK return code 0x01
    // (Unacceptable protocol version), then the close.
    let broker = Broker::start();
    let mut c = RawClient::open(broker.addr(), V4);
    c.send_bytes(&frame(0x10, &connect_body("MQTT", 6, 0x02, "level-6")));
    match c.recv() {
        Packet::ConnAck(ack) => {
            assert!(!ack.session_present);
            assert_eq!(
                ack.reason_code,
                ReasonCode::UnsupportedProtocolVersion,
                "{ack:?}"
            );
        }
        other => panic!("expected CONNACK 0x01, got {other:?}"),
    }
    c.expect_closed(CLOSE_TIMEOUT);
    assert_still_serves(broker.addr(), "level-6");
}

#[test]
fn v5_publish_with_qos_3_gets_disconnect_0x81() {
    // MQTT 5 section 3.3.1.2: QoS 3 is a Malformed Packet (0x81).
    let broker = Broker::start();
    let mut c = v5_client(&broker, "qos3-v5");
    c.send_bytes(&frame(0x36, b"\x00\x03a/b\x00\x01\x00hello"));
    c.expect_disconnect_then_close(ReasonCode::MalformedPacket);
    assert_still_serves(broker.addr(), "qos3-v5");
}

#[test]
fn v5_publish_with_topic_alias_0_gets_disconnect_0x94() {
    // MQTT 5 section 3.3.2.3.4 [MQTT-3.3.2-8]: Topic Alias 0 is not allowed;
    // the close uses Topic Alias invalid (0x94).
    let broker = Broker::start();
    let mut c = v5_client(&broker, "alias0-v5");
    // Topic "a/b", properties: length 3, Topic Alias (0x23) = 0, payload "x".
    c.send_bytes(&frame(0x30, b"\x00\x03a/b\x03\x23\x00\x00x"));
    c.expect_disconnect_then_close(ReasonCode::TopicAliasInvalid);
    assert_still_serves(broker.addr(), "alias0-v5");
}

#[test]
fn v5_publish_topic_with_wildcard_gets_disconnect_0x90() {
    // [MQTT-3.3.2-2]: a topic name must not contain wildcards; MQTT 5 closes
    // with Topic Name invalid (0x90).
    let broker = Broker::start();
    for (topic, id) in [("a/#", "hash-v5"), ("a/+/b", "plus-v5")] {
        let mut c = v5_client(&broker, id);
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(b"\x00payload");
        c.send_bytes(&frame(0x30, &body));
        c.expect_disconnect_then_close(ReasonCode::TopicNameInvalid);
        assert_still_serves(broker.addr(), id);
    }
}

#[test]
fn packet_over_maximum_packet_size_is_refused() {
    // MQTT 5 section 3.1.2.11.4 / 4.13: a packet over the server's Maximum
    // Packet Size closes the connection with Packet too large (0x95); a 3.1.1
    // client is just disconnected.
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__MAX_PACKET_SIZE_BYTES", "1024")]);
    let big = vec![b'x'; 1500];

    let (mut c, ack) = RawClient::connect(broker.addr(), connect_packet(V5, "big-v5", true, 30));
    assert_eq!(ack.reason_code, ReasonCode::Success);
    assert_eq!(
        ack.properties.maximum_packet_size,
        Some(1024),
        "CONNACK announces the limit"
    );
    c.send(&publish_packet("big/v5", &big, QoS::AtMostOnce, 0, false));
    c.expect_disconnect_then_close(ReasonCode::PacketTooLarge);
    assert_still_serves(broker.addr(), "big-v5");

    let mut c = v4_client(&broker, "big-v4");
    c.send(&publish_packet("big/v4", &big, QoS::AtMostOnce, 0, false));
    c.expect_closed(CLOSE_TIMEOUT);
    assert_still_serves(broker.addr(), "big-v4");

    // A packet just under the limit still passes.
    let mut sub = v4_client(&broker, "big-sub");
    assert_eq!(
        sub.subscribe(1, &[("big/ok", QoS::AtMostOnce)]),
        [ReasonCode::Success]
    );
    let mut c = v5_client(&broker, "big-ok");
    let ok = vec![b'y'; 900];
    c.send(&publish_packet("big/ok", &ok, QoS::AtMostOnce, 0, false));
    assert_eq!(sub.recv_publish().payload.len(), 900);
}

#[test]
fn v311_malformed_packets_are_closed_without_response() {
    // MQTT 3.1.1 section 4.8: on a protocol violation the server closes the
    // connection; 3.1.1 has no DISCONNECT from the server.
    let broker = Broker::start();
    let cases: [(&str, Vec<u8>); 4] = [
        // QoS 3 [MQTT-3.3.1-4].
        ("qos3", frame(0x36, b"\x00\x03a/b\x00\x01hello")),
        // SUBSCRIBE with flags 0000 instead of 0010 [MQTT-3.8.1-1].
        ("subflags", frame(0x80, b"\x00\x01\x00\x03a/b\x00")),
        // Wildcard in a topic name [MQTT-3.3.2-2].
        ("wildcard", frame(0x30, b"\x00\x03a/#hello")),
        // A remaining length that is not minimal (0x80 0x00).
        ("varint", vec![0xC0, 0x80, 0x00]),
    ];
    for (name, bytes) in cases {
        let id = format!("v311-{name}");
        let mut c = v4_client(&broker, &id);
        c.send_bytes(&bytes);
        c.expect_closed(CLOSE_TIMEOUT);
        assert_still_serves(broker.addr(), &id);
    }
}

#[test]
fn second_connect_is_a_protocol_error() {
    // [MQTT-3.1.0-2]: a second CONNECT is a protocol violation: 3.1.1 closes,
    // MQTT 5 sends DISCONNECT Protocol Error (0x82) first.
    let broker = Broker::start();

    let mut c = v4_client(&broker, "again-v4");
    c.send(&Packet::Connect(Box::new(connect_packet(
        V4, "again-v4", true, 30,
    ))));
    c.expect_closed(CLOSE_TIMEOUT);
    assert_still_serves(broker.addr(), "again-v4");

    let mut c = v5_client(&broker, "again-v5");
    c.send(&Packet::Connect(Box::new(connect_packet(
        V5, "again-v5", true, 30,
    ))));
    c.expect_disconnect_then_close(ReasonCode::ProtocolError);
    assert_still_serves(broker.addr(), "again-v5");
}

#[test]
fn garbage_bytes_are_closed() {
    let broker = Broker::start();
    // (name, bytes, whether CONNACK 0x01 comes before the close).
    let cases: [(&str, &[u8], bool); 4] = [
        // Packet type 0 is reserved.
        ("zero", b"\x00\x00\x00\x00", false),
        // Not MQTT at all: 'G' reads as a PUBACK, which cannot come first.
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false),
        // A remaining length longer than four bytes.
        ("varint", b"\x10\xff\xff\xff\xff\x01", false),
        // A CONNECT whose protocol name is not MQTT: the broker treats it as an
        // unsupported protocol, which [MQTT-3.1.2-1] and [MQTT-3.1.2-2] allow.
        (
            "name",
            b"\x10\x0d\x00\x04HTTP\x04\x02\x00\x1e\x00\x01x",
            true,
        ),
    ];
    for (name, bytes, connack) in cases {
        let mut c = RawClient::open(broker.addr(), V4);
        c.send_bytes(bytes);
        if connack {
            match c.recv() {
                Packet::ConnAck(ack) => {
                    assert_eq!(
                        ack.reason_code,
                        ReasonCode::UnsupportedProtocolVersion,
                        "{name}"
                    )
                }
                other => panic!("{name}: expected CONNACK 0x01, got {other:?}"),
            }
        }
        c.expect_closed(CLOSE_TIMEOUT);
        assert_still_serves(broker.addr(), &format!("garbage-{name}"));
    }
}

#[test]
fn v5_receive_maximum_exceeded_disconnect_reaches_a_client_still_acking() {
    // MQTT 5 sections 3.3.4 and 4.13: more unreleased QoS 2 PUBLISH than the
    // Receive Maximum closes with DISCONNECT 0x93. The client is still
    // answering the PUBRECs written before it; those PUBRELs must not turn the
    // close into a TCP reset (RFC 1122 section 4.2.2.13) that loses the rest
    // (the Paho interoperability test `test_flow_control2`).
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__MAX_INFLIGHT", "2")]);
    let mut c = v5_client(&broker, "recvmax-v5");
    for id in 1..=3u16 {
        c.send(&publish_packet(
            "recvmax/v5",
            b"m",
            QoS::ExactlyOnce,
            id,
            false,
        ));
    }
    for id in 1..=2u16 {
        match c.recv() {
            Packet::PubRec(r) => assert_eq!(r.packet_id, id),
            other => panic!("expected PUBREC {id}, got {other:?}"),
        }
        c.send(&Packet::PubRel(tessera_proto::PubRel::new(id)));
        // Time for a reset, if the broker answers with one, to arrive.
        std::thread::sleep(Duration::from_millis(100));
    }
    c.expect_disconnect_then_close(ReasonCode::ReceiveMaximumExceeded);
    assert_still_serves(broker.addr(), "recvmax-v5");
}

#[test]
fn connection_without_connect_is_closed_after_the_connect_timeout() {
    // A client that never completes CONNECT must not hold a connection
    // forever (MQTT 3.1.1 section 3.1.4: the server should close a connection
    // without CONNECT after a reasonable time).
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__CONNECT_TIMEOUT_S", "1")]);
    let partial = frame(0x10, &connect_body("MQTT", 4, 0x02, "half"));
    for (name, bytes) in [("silent", &[][..]), ("partial", &partial[..5])] {
        let mut c = RawClient::open(broker.addr(), V4);
        c.send_bytes(bytes);
        // A silent socket first waits in the kernel (TCP_DEFER_ACCEPT, set to
        // the connect timeout and rounded up to the SYN-ACK retransmission
        // schedule: 1 s, then 2 s more) before the broker's own timeout runs;
        // a partial CONNECT is in the broker at once. The upper bounds say
        // "closed, not held forever", with room for a loaded machine.
        let most = Duration::from_secs(if bytes.is_empty() { 8 } else { 4 });
        let start = std::time::Instant::now();
        c.expect_closed(most);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(800) && took <= most,
            "{name}: {took:?}"
        );
        assert_still_serves(broker.addr(), &format!("timeout-{name}"));
    }
}

#[test]
fn v5_topic_alias_misuse_gets_disconnect() {
    // Section 3.3.2.3.4: an alias above the Topic Alias Maximum the server
    // announced is Topic Alias invalid (0x94) [MQTT-3.3.2-9]; an empty topic
    // with an alias never set is a Protocol Error (0x82).
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__MAX_TOPIC_ALIAS", "4")]);
    let (mut c, ack) = RawClient::connect(broker.addr(), connect_packet(V5, "alias-max", true, 30));
    assert_eq!(ack.properties.topic_alias_maximum, Some(4));
    // Topic "a/b", properties: Topic Alias (0x23) = 5.
    c.send_bytes(&frame(0x30, b"\x00\x03a/b\x03\x23\x00\x05x"));
    c.expect_disconnect_then_close(ReasonCode::TopicAliasInvalid);
    assert_still_serves(broker.addr(), "alias-max");

    let mut c = v5_client(&broker, "alias-unset");
    // Empty topic, Topic Alias = 1, never mapped on this connection.
    c.send_bytes(&frame(0x30, b"\x00\x00\x03\x23\x00\x01x"));
    c.expect_disconnect_then_close(ReasonCode::ProtocolError);
    assert_still_serves(broker.addr(), "alias-unset");
}

#[test]
fn v5_more_unreleased_qos2_than_receive_maximum_gets_disconnect_0x93() {
    // [MQTT-3.3.4-7]: a client must not have more QoS 2 publications awaiting
    // PUBCOMP than the server's Receive Maximum; the server closes with
    // Receive Maximum exceeded (0x93) (section 3.3.4).
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__MAX_INFLIGHT", "2")]);
    let (mut c, ack) =
        RawClient::connect(broker.addr(), connect_packet(V5, "recvmax-in", true, 30));
    assert_eq!(ack.properties.receive_maximum, Some(2));
    for id in 1..=2u16 {
        c.send(&publish_packet("rm/in", b"x", QoS::ExactlyOnce, id, false));
        assert_eq!(c.recv(), Packet::PubRec(tessera_proto::PubRec::new(id)));
    }
    c.send(&publish_packet("rm/in", b"x", QoS::ExactlyOnce, 3, false));
    c.expect_disconnect_then_close(ReasonCode::ReceiveMaximumExceeded);
    assert_still_serves(broker.addr(), "recvmax-in");
}

#[test]
fn v5_disconnect_reviving_an_ended_session_is_a_protocol_error() {
    // MQTT 5 section 3.14.2.2.2: a DISCONNECT may not set a non-zero Session
    // Expiry Interval when CONNECT had zero; the server answers DISCONNECT 0x82.
    let broker = Broker::start();
    let mut c = v5_client(&broker, "revive");
    let mut d = tessera_proto::Disconnect::new(ReasonCode::Success);
    d.properties.session_expiry_interval = Some(60);
    c.send(&Packet::Disconnect(d));
    c.expect_disconnect_then_close(ReasonCode::ProtocolError);
    assert_still_serves(broker.addr(), "revive");
}

#[test]
fn subscribe_without_filters_is_refused() {
    // [MQTT-3.8.3-3] (3.1.1) / [MQTT-3.8.3-2] (5.0): SUBSCRIBE needs at least
    // one filter; 5.0 calls it a Protocol Error (0x82).
    let broker = Broker::start();
    let mut c = v4_client(&broker, "nofilter-v4");
    c.send_bytes(&frame(0x82, b"\x00\x01"));
    c.expect_closed(CLOSE_TIMEOUT);
    assert_still_serves(broker.addr(), "nofilter-v4");

    let mut c = v5_client(&broker, "nofilter-v5");
    c.send_bytes(&frame(0x82, b"\x00\x01\x00"));
    c.expect_disconnect_then_close(ReasonCode::ProtocolError);
    assert_still_serves(broker.addr(), "nofilter-v5");
}

#[test]
fn v5_auth_without_authentication_method_is_a_protocol_error() {
    // MQTT 5 sections 3.15 and 4.12: AUTH is only valid when CONNECT carried
    // an Authentication Method; otherwise it is a Protocol Error (0x82).
    let broker = Broker::start();
    let mut c = v5_client(&broker, "auth");
    c.send_bytes(&[0xF0, 0x00]);
    c.expect_disconnect_then_close(ReasonCode::ProtocolError);
    assert_still_serves(broker.addr(), "auth");
}
