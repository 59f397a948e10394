//! Goal: the MQTT 5 connection features and the `$SYS` topics behave as
//! documented when the real broker is driven over real sockets: outbound topic
//! aliases, the payload format check, Response Information, reason strings and
//! Request Problem Information, server redirection, `$SYS/broker/...` totals
//! across shards, and the refusal of client publications under `$SYS/`.
//!
//! Method: each test starts its own broker (`--shards 2`, settings through
//! `TESSERA_*` variables) and speaks to it with the raw client of `common`
//! (exact packets and properties) or with rumqttc's v5 client (a real client's
//! view). Client ids are chosen with the broker's hash so publisher and
//! subscriber sit on different shards. Absence of a delivery is checked with a
//! sentinel published after it on the same path. Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::{Broker, RECV_TIMEOUT, RawClient, connect_packet, id_on_shard, publish_packet};
use tessera_proto::{ConnectProperties, Packet, ProtocolVersion, QoS, ReasonCode};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

/// A v5 connection with these CONNECT properties; panics unless accepted.
fn connect_v5(broker: &Broker, id: &str, properties: ConnectProperties) -> RawClient {
    let mut c = connect_packet(V5, id, true, 30);
    c.properties = properties;
    RawClient::connect_ok(broker.addr(), c)
}

fn alias_max(n: u16) -> ConnectProperties {
    ConnectProperties {
        topic_alias_maximum: Some(n),
        ..Default::default()
    }
}

/// (topic as sent, topic alias) of the next `n` deliveries, acknowledged.
fn topics_and_aliases(c: &mut RawClient, n: usize) -> Vec<(String, Option<u16>)> {
    (0..n)
        .map(|_| {
            let p = c.recv_publish();
            (p.topic.to_string(), p.properties.topic_alias)
        })
        .collect()
}

fn ta(topic: &str, alias: Option<u16>) -> (String, Option<u16>) {
    (topic.to_owned(), alias)
}

/// Section 3.3.2.3.4: with a Topic Alias Maximum in CONNECT the broker sends
/// the topic with an alias once, then an empty topic with the alias; a full
/// map rebinds its least recently used alias; a new connection starts over.
#[test]
fn v5_outbound_topic_aliases_replace_repeated_topics() {
    let broker = Broker::start();
    let sub_id = id_on_shard("oalias-sub", 0);
    let mut sub = connect_v5(&broker, &sub_id, alias_max(2));
    assert_eq!(
        sub.subscribe(1, &[("oa/#", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V5, &id_on_shard("oalias-pub", 1), true, 30),
    );
    for (k, t) in ["oa/1", "oa/1", "oa/2", "oa/3", "oa/1"].iter().enumerate() {
        publ.publish(t, b"m", QoS::AtLeastOnce, k as u16 + 1);
    }
    assert_eq!(
        topics_and_aliases(&mut sub, 5),
        [
            ta("oa/1", Some(1)),
            ta("", Some(1)),
            ta("oa/2", Some(2)),
            ta("oa/3", Some(1)),
            ta("oa/1", Some(2)),
        ]
    );
    sub.disconnect();
    sub.expect_closed(RECV_TIMEOUT);

    let mut sub = connect_v5(&broker, &sub_id, alias_max(2));
    assert_eq!(
        sub.subscribe(1, &[("oa/#", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    publ.publish("oa/1", b"m", QoS::AtLeastOnce, 6);
    assert_eq!(
        topics_and_aliases(&mut sub, 1),
        [ta("oa/1", Some(1))],
        "aliases do not survive the connection"
    );
}

/// `limits.max_outbound_topic_alias` caps the client's maximum; 0 turns
/// outbound aliases off.
#[test]
fn v5_outbound_topic_alias_cap_comes_from_the_config() {
    for (cap, expected) in [
        (
            "1",
            [
                ta("oc/1", Some(1)),
                ta("oc/2", Some(1)),
                ta("oc/1", Some(1)),
            ],
        ),
        ("0", [ta("oc/1", None), ta("oc/2", None), ta("oc/1", None)]),
    ] {
        let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__MAX_OUTBOUND_TOPIC_ALIAS", cap)]);
        let mut sub = connect_v5(&broker, &id_on_shard("ocap-sub", 1), alias_max(10));
        sub.subscribe(1, &[("oc/#", QoS::AtMostOnce)]);
        let mut publ = RawClient::connect_ok(
            broker.addr(),
            connect_packet(V5, &id_on_shard("ocap-pub", 0), true, 30),
        );
        for (k, t) in ["oc/1", "oc/2", "oc/1"].iter().enumerate() {
            publ.publish(t, b"m", QoS::AtLeastOnce, k as u16 + 1);
        }
        assert_eq!(topics_and_aliases(&mut sub, 3), expected, "cap {cap}");
    }
}

/// A real v5 client (rumqttc) announcing a Topic Alias Maximum receives its
/// own QoS 0, 1 and 2 publications through one alias (the shape of Paho's
/// `test_server_topic_alias`).
#[tokio::test]
async fn rumqttc_v5_receives_messages_through_broker_topic_aliases() {
    use rumqttc::v5::mqttbytes::QoS as Q;
    use rumqttc::v5::mqttbytes::v5::Packet as P;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let broker = Broker::start();
    let mut o = MqttOptions::new("rumqttc-alias", "127.0.0.1", broker.addr().port());
    o.set_topic_alias_max(Some(1));
    let (client, mut events) = AsyncClient::new(o, 16);
    client.subscribe("ra/t", Q::ExactlyOnce).await.unwrap();
    for q in [Q::AtMostOnce, Q::AtLeastOnce, Q::ExactlyOnce] {
        client.publish("ra/t", q, false, "alias").await.unwrap();
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + RECV_TIMEOUT;
    while got.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, events.poll())
            .await
            .expect("three deliveries in time")
            .expect("connection stays up");
        if let Event::Incoming(P::Publish(p)) = ev {
            let alias = p.properties.as_ref().and_then(|pr| pr.topic_alias);
            got.push((String::from_utf8(p.topic.to_vec()).unwrap(), alias));
        }
    }
    // rumqttc resolves the alias for itself (its event shows the packet as sent)
    // and accepted all three: an unknown alias would have been a protocol error.
    assert_eq!(got, [ta("ra/t", Some(1)), ta("", Some(1)), ta("", Some(1))]);
}

fn utf8_claimed(topic: &str, payload: &[u8], qos: QoS, packet_id: u16) -> Packet {
    let mut p = publish_packet(topic, payload, qos, packet_id, false);
    if let Packet::Publish(p) = &mut p {
        p.properties.payload_format_indicator = Some(true);
    }
    p
}

/// The acknowledgement that answers a PUBLISH: (reason code, reason string).
fn ack(c: &mut RawClient) -> (ReasonCode, Option<String>) {
    match c.recv() {
        Packet::PubAck(a) => (
            a.reason_code,
            a.properties.reason_string.map(|r| r.to_string()),
        ),
        Packet::PubRec(a) => (
            a.reason_code,
            a.properties.reason_string.map(|r| r.to_string()),
        ),
        other => panic!("expected PUBACK or PUBREC, got {other:?}"),
    }
}

/// Section 3.3.2.3.2: a payload that is not UTF-8 although its Payload Format
/// Indicator says so is not delivered; QoS 1/2 get PUBACK/PUBREC 0x99, QoS 0 a
/// DISCONNECT 0x99. A valid one is delivered with its indicator.
#[test]
fn v5_payload_format_invalid_is_refused_with_0x99() {
    let broker = Broker::start();
    let mut sub = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V5, &id_on_shard("pfi-sub", 0), true, 30),
    );
    sub.subscribe(1, &[("pfi/t", QoS::AtLeastOnce)]);
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V5, &id_on_shard("pfi-pub", 1), true, 30),
    );
    let bad = [b'o', b'k', 0xff];
    publ.send(&utf8_claimed("pfi/t", &bad, QoS::AtLeastOnce, 1));
    let (rc, text) = ack(&mut publ);
    assert_eq!(rc, ReasonCode::PayloadFormatInvalid);
    assert!(text.is_some_and(|t| t.contains("UTF-8")));
    publ.send(&utf8_claimed("pfi/t", &bad, QoS::ExactlyOnce, 2));
    assert_eq!(ack(&mut publ).0, ReasonCode::PayloadFormatInvalid);
    publ.send(&utf8_claimed(
        "pfi/t",
        "grüße".as_bytes(),
        QoS::AtLeastOnce,
        3,
    ));
    assert_eq!(ack(&mut publ), (ReasonCode::Success, None));
    let p = sub.recv_publish();
    assert_eq!(
        &p.payload[..],
        "grüße".as_bytes(),
        "only the valid one arrives"
    );
    assert_eq!(p.properties.payload_format_indicator, Some(true));

    publ.send(&utf8_claimed("pfi/t", &bad, QoS::AtMostOnce, 0));
    publ.expect_disconnect_then_close(ReasonCode::PayloadFormatInvalid);
    let mut other = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V5, &id_on_shard("pfi-end", 1), true, 30),
    );
    other.publish("pfi/t", b"end", QoS::AtLeastOnce, 1);
    assert_eq!(&sub.recv_publish().payload[..], b"end");
}

/// Section 3.1.2.11.6: Response Information only when requested; the
/// configured prefix followed by the ClientID; none with an empty prefix.
#[tokio::test]
async fn v5_response_information_is_sent_when_requested() {
    use rumqttc::v5::{AsyncClient, Event, MqttOptions, mqttbytes::v5::Packet as P};

    let broker = Broker::start();
    let connack = |requested: Option<u8>, id: &str| {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.addr().port());
        o.set_request_response_info(requested);
        let (_client, mut events) = AsyncClient::new(o, 4);
        async move {
            let ev = tokio::time::timeout(RECV_TIMEOUT, events.poll())
                .await
                .expect("CONNACK in time")
                .expect("connected");
            match ev {
                Event::Incoming(P::ConnAck(a)) => a.properties.and_then(|p| p.response_information),
                other => panic!("expected CONNACK, got {other:?}"),
            }
        }
    };
    assert_eq!(
        connack(Some(1), "rri-a").await.as_deref(),
        Some("reply/rri-a")
    );
    assert_eq!(connack(Some(0), "rri-b").await, None);
    assert_eq!(connack(None, "rri-c").await, None);

    let broker = Broker::start_with(&[], &[("TESSERA_MQTT5__RESPONSE_INFORMATION_PREFIX", "")]);
    let props = ConnectProperties {
        request_response_information: Some(true),
        ..Default::default()
    };
    let mut c = connect_packet(V5, "rri-d", true, 30);
    c.properties = props;
    let (_c, ack) = RawClient::connect(broker.addr(), c);
    assert_eq!(
        ack.properties.response_information, None,
        "empty prefix: never"
    );
}

/// Reason strings are on by default; a client with Request Problem
/// Information 0 gets none on acknowledgements but still on DISCONNECT
/// [MQTT-3.1.2-29]; `mqtt5.reason_strings = false` turns them off.
#[test]
fn v5_reason_strings_follow_the_setting_and_request_problem_information() {
    let case = |broker: &Broker, id: &str, rpi: Option<bool>| {
        let props = ConnectProperties {
            request_problem_information: rpi,
            ..Default::default()
        };
        let mut c = connect_v5(broker, id, props);
        c.send(&publish_packet(
            "$SYS/forbidden",
            b"x",
            QoS::AtLeastOnce,
            1,
            false,
        ));
        let (rc, on_ack) = ack(&mut c);
        assert_eq!(rc, ReasonCode::NotAuthorized);
        c.send(&utf8_claimed("t", &[0xff], QoS::AtMostOnce, 0));
        let on_disconnect = match c.recv() {
            Packet::Disconnect(d) => d.properties.reason_string.map(|r| r.to_string()),
            other => panic!("expected DISCONNECT, got {other:?}"),
        };
        (on_ack.is_some(), on_disconnect.is_some())
    };
    let broker = Broker::start();
    assert_eq!(case(&broker, "rs-default", None), (true, true));
    assert_eq!(case(&broker, "rs-rpi0", Some(false)), (false, true));
    let quiet = Broker::start_with(&[], &[("TESSERA_MQTT5__REASON_STRINGS", "false")]);
    assert_eq!(case(&quiet, "rs-off", None), (false, false));
}

/// Section 4.11: with a redirect configured, v5 clients are refused with
/// 0x9C or 0x9D and the Server Reference; 3.1.1 clients with return code 3.
#[tokio::test]
async fn redirect_sends_clients_to_the_server_reference() {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;

    for (mode, rc, rumqttc_code) in [
        (
            "use_another_server",
            ReasonCode::UseAnotherServer,
            ConnectReturnCode::UseAnotherServer,
        ),
        (
            "server_moved",
            ReasonCode::ServerMoved,
            ConnectReturnCode::ServerMoved,
        ),
    ] {
        let broker = Broker::start_with(
            &[],
            &[
                ("TESSERA_MQTT5__REDIRECT", mode),
                ("TESSERA_MQTT5__SERVER_REFERENCE", "mqtt2.example.com:1883"),
            ],
        );
        let (mut c, ack) =
            RawClient::connect(broker.addr(), connect_packet(V5, "moved-v5", true, 30));
        assert_eq!(ack.reason_code, rc, "{mode}");
        assert_eq!(
            ack.properties.server_reference.as_ref().map(|r| r.as_str()),
            Some("mqtt2.example.com:1883")
        );
        c.expect_closed(RECV_TIMEOUT);

        let (mut c, ack) =
            RawClient::connect(broker.addr(), connect_packet(V311, "moved-v311", true, 30));
        // The 3.1.1 decoder reads return code 3 as Server unavailable.
        assert_eq!(ack.reason_code, ReasonCode::ServerUnavailable, "{mode}");
        c.expect_closed(RECV_TIMEOUT);

        let o = rumqttc::v5::MqttOptions::new("moved-rumqttc", "127.0.0.1", broker.addr().port());
        let (_client, mut events) = rumqttc::v5::AsyncClient::new(o, 4);
        let err = tokio::time::timeout(RECV_TIMEOUT, events.poll())
            .await
            .expect("an answer in time")
            .expect_err("refused");
        match err {
            rumqttc::v5::ConnectionError::ConnectionRefused(code) => assert_eq!(code, rumqttc_code),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

/// Reads `$SYS/broker/...` deliveries (topic suffix -> latest payload) until
/// `done` holds for them, or panics after `limit`.
fn sys_values_until(
    c: &mut RawClient,
    limit: Duration,
    done: impl Fn(&std::collections::BTreeMap<String, String>) -> bool,
) -> std::collections::BTreeMap<String, String> {
    let mut values = std::collections::BTreeMap::new();
    let deadline = Instant::now() + limit;
    while !done(&values) {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.try_recv(left) {
            Ok(Packet::Publish(p)) => {
                let name = p
                    .topic
                    .as_str()
                    .strip_prefix("$SYS/broker/")
                    .expect("$SYS topic");
                let value = String::from_utf8(p.payload.to_vec()).expect("UTF-8 value");
                values.insert(name.to_owned(), value);
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(why) => panic!("$SYS values not reached ({why:?}): {values:?}"),
        }
    }
    values
}

fn number(values: &std::collections::BTreeMap<String, String>, name: &str) -> Option<f64> {
    values.get(name).and_then(|v| v.parse().ok())
}

/// `$SYS/broker/...` totals cover clients and messages of both shards, are
/// retained QoS 0, and carry the documented topics.
#[test]
fn sys_topics_report_totals_across_shards() {
    let broker = Broker::start_with(&[], &[("TESSERA_SYS__INTERVAL_S", "1")]);
    let mut watcher = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V5, &id_on_shard("sys-watch", 0), true, 30),
    );
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V311, &id_on_shard("sys-pub", 1), true, 30),
    );
    let _idle = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V5, &id_on_shard("sys-idle", 1), true, 30),
    );
    for k in 1..=3 {
        publ.publish("sys/t", b"load", QoS::AtLeastOnce, k);
    }
    watcher.subscribe(1, &[("$SYS/broker/#", QoS::AtLeastOnce)]);
    let values = sys_values_until(&mut watcher, Duration::from_secs(8), |v| {
        number(v, "clients/connected") == Some(3.0)
            && number(v, "messages/received").is_some_and(|n| n >= 3.0)
            && number(v, "subscriptions/count") == Some(1.0)
            // The last topic of a round, so the whole round is in.
            && v.contains_key("load/bytes/sent/15min")
    });
    assert!(values["version"].starts_with("tessera "), "{values:?}");
    assert!(number(&values, "uptime").is_some(), "{values:?}");
    assert!(number(&values, "clients/maximum").is_some_and(|n| n >= 3.0));
    assert!(number(&values, "clients/total").is_some_and(|n| n >= 3.0));
    assert!(number(&values, "bytes/received").is_some_and(|n| n > 0.0));
    assert!(number(&values, "retained messages/count").is_some());
    // Load averages appear together, once every shard has reported.
    for series in [
        "messages/received",
        "messages/sent",
        "bytes/received",
        "bytes/sent",
    ] {
        for window in ["1min", "5min", "15min"] {
            let topic = format!("load/{series}/{window}");
            assert!(number(&values, &topic).is_some(), "{topic}: {values:?}");
        }
    }
    // Retained: a late subscriber on the other shard gets the current values.
    // $SYS updates are QoS 0 and reach the other shard's copy of the retained
    // table asynchronously: a subscriber there can beat the first round and see
    // a live copy (RETAIN 0) first. Once a live copy has arrived the copy is
    // up to date, so a new subscriber then must get it retained.
    let mut retained = None;
    for attempt in 0..5 {
        let mut late = RawClient::connect_ok(
            broker.addr(),
            connect_packet(V5, &id_on_shard(&format!("sys-late{attempt}"), 1), true, 30),
        );
        late.subscribe(1, &[("$SYS/broker/version", QoS::AtLeastOnce)]);
        let p = late.recv_publish();
        if p.retain {
            retained = Some(p);
            break;
        }
    }
    let p = retained.expect("a late subscriber gets $SYS/broker/version with RETAIN 1");
    assert_eq!(p.qos, QoS::AtMostOnce);
    assert_eq!(&p.payload[..], values["version"].as_bytes());
}

/// Only the broker publishes under `$SYS/`: v5 QoS 1 gets PUBACK 0x87 (Not
/// authorized), 3.1.1 a plain PUBACK, and nothing is delivered.
#[test]
fn clients_cannot_publish_under_sys() {
    let broker = Broker::start();
    let mut sub = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V5, &id_on_shard("nosys-sub", 0), true, 30),
    );
    sub.subscribe(
        1,
        &[
            ("$SYS/x", QoS::AtLeastOnce),
            ("nosys/end", QoS::AtLeastOnce),
        ],
    );
    let mut v5 = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V5, &id_on_shard("nosys-v5", 1), true, 30),
    );
    v5.send(&publish_packet(
        "$SYS/x",
        b"fake",
        QoS::AtLeastOnce,
        1,
        false,
    ));
    assert_eq!(ack(&mut v5).0, ReasonCode::NotAuthorized);
    let mut v3 = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V311, &id_on_shard("nosys-v3", 1), true, 30),
    );
    v3.publish("$SYS/x", b"fake", QoS::AtLeastOnce, 1);
    v3.publish("nosys/end", b"end", QoS::AtLeastOnce, 2);
    let p = sub.recv_publish();
    assert_eq!(
        p.topic.as_str(),
        "nosys/end",
        "no $SYS publication got through"
    );
}

/// `sys.interval_s = 0` publishes nothing under `$SYS/`.
#[test]
fn sys_interval_zero_disables_sys_topics() {
    let broker = Broker::start_with(&[], &[("TESSERA_SYS__INTERVAL_S", "0")]);
    // Longer than the first tick (250 ms), when publication would start.
    std::thread::sleep(Duration::from_millis(700));
    let mut sub = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V5, &id_on_shard("sys0-sub", 0), true, 30),
    );
    sub.subscribe(
        1,
        &[("$SYS/#", QoS::AtLeastOnce), ("sys0/end", QoS::AtLeastOnce)],
    );
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V5, &id_on_shard("sys0-pub", 1), true, 30),
    );
    publ.publish("sys0/end", b"end", QoS::AtLeastOnce, 1);
    let p = sub.recv_publish();
    assert_eq!(p.topic.as_str(), "sys0/end", "nothing retained under $SYS/");
}
