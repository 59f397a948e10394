//! Goal: the defaults do not surprise (many subscriptions, large payloads),
//! and every quota that keeps clients from growing the node's state without
//! bound refuses with the reason code MQTT gives it, and is counted: packet
//! size, read buffers, sessions, session expiry, retained count and bytes,
//! subscriptions per client (docs/LIMITS.md).
//!
//! Method: each test starts the real broker (`--shards 2`, quotas set through
//! `TESSERA_LIMITS__*` variables, small enough to reach), speaks to it with
//! rumqttc (v4 = MQTT 3.1.1, v5) where a real client shows the outcome, and
//! with the raw client of `common` where rumqttc cannot show the reason code
//! (SUBACK codes of v5, PUBACK/PUBREC codes, CONNACK properties, a packet sent
//! in parts). Refusals are read back from `/metrics`
//! (`tessera_limit_refusals_total{limit=...}`). Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{
    Broker, RECV_TIMEOUT, RawClient, connect_packet, id_on_shard, metric_sum, publish_packet,
    scrape,
};
use tessera_proto::{ConnectProperties, Encode, Packet, ProtocolVersion, QoS, ReasonCode};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

/// `tessera_limit_refusals_total{limit="<limit>"}` summed over the shards
/// (every limit when `limit` is empty).
fn refusals(broker: &Broker, limit: &str) -> u64 {
    let labels: &[(&str, &str)] = if limit.is_empty() {
        &[]
    } else {
        &[("limit", limit)]
    };
    metric_sum(
        &scrape(broker.admin_addr()),
        "tessera_limit_refusals_total",
        labels,
    ) as u64
}

/// Waits until `f` holds, at most [`RECV_TIMEOUT`].
fn wait_until(what: &str, f: impl FnMut() -> bool) {
    common::eventually(what, RECV_TIMEOUT, f);
}

fn expiry(s: u32) -> ConnectProperties {
    ConnectProperties {
        session_expiry_interval: Some(s),
        ..Default::default()
    }
}

/// Mosquitto and EMQX have no default subscription limit, and neither has
/// Tessera: a real 3.1.1 client subscribing to 10,000 filters gets 10,000
/// success codes, and the last one routes.
#[tokio::test]
async fn ten_thousand_subscriptions_of_one_client_all_succeed_by_default() {
    use rumqttc::mqttbytes::v4::SubscribeReasonCode;
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet as P, QoS as Q, SubscribeFilter};

    let broker = Broker::start();
    let o = MqttOptions::new("many-subs", "127.0.0.1", broker.addr().port());
    let (client, mut events) = AsyncClient::new(o, 256);
    let sender = client.clone();
    tokio::spawn(async move {
        for chunk in 0..100 {
            let filters =
                (0..100).map(|i| SubscribeFilter::new(format!("many/{chunk}/{i}"), Q::AtLeastOnce));
            sender
                .subscribe_many(filters)
                .await
                .expect("subscribe queued");
        }
    });
    let (mut granted, mut refused) = (0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(60);
    while granted + refused < 10_000 {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, events.poll())
            .await
            .expect("10,000 SUBACK codes in time")
            .expect("the connection stays up");
        if let Event::Incoming(P::SubAck(ack)) = ev {
            for code in ack.return_codes {
                match code {
                    SubscribeReasonCode::Success(Q::AtLeastOnce) => granted += 1,
                    _ => refused += 1,
                }
            }
        }
    }
    assert_eq!((granted, refused), (10_000, 0));
    client
        .publish("many/99/99", Q::AtLeastOnce, false, "last")
        .await
        .unwrap();
    loop {
        let ev = tokio::time::timeout(RECV_TIMEOUT, events.poll())
            .await
            .expect("the delivery in time")
            .expect("the connection stays up");
        if let Event::Incoming(P::Publish(p)) = ev {
            assert_eq!(&p.topic, "many/99/99");
            break;
        }
    }
    assert_eq!(refusals(&broker, "subscriptions_per_client"), 0);
}

/// A configured subscription limit answers the filters over it with 0x97
/// Quota exceeded (3.1.1: 0x80 Failure); re-subscribing an existing filter
/// is not a new subscription.
#[test]
fn a_configured_subscription_limit_answers_0x97() {
    let broker = Broker::start_with(
        &[],
        &[("TESSERA_LIMITS__MAX_SUBSCRIPTIONS_PER_CLIENT", "3")],
    );
    let q1 = QoS::AtLeastOnce;
    let mut c = RawClient::connect_ok(broker.addr(), connect_packet(V5, "sublim-5", true, 30));
    let codes = c.subscribe(1, &[("a", q1), ("b", q1), ("c", q1), ("d", q1), ("a", q1)]);
    let ok = ReasonCode::GrantedQoS1;
    assert_eq!(codes, [ok, ok, ok, ReasonCode::QuotaExceeded, ok]);
    let mut c = RawClient::connect_ok(broker.addr(), connect_packet(V311, "sublim-3", true, 30));
    let codes = c.subscribe(1, &[("a", q1), ("b", q1), ("c", q1), ("d", q1)]);
    assert_eq!(codes, [ok, ok, ok, ReasonCode::UnspecifiedError]);
    assert_eq!(refusals(&broker, "subscriptions_per_client"), 2);
}

/// The default accepts payloads far beyond the old 1 MiB limit (Mosquitto
/// accepts up to 256 MB): real 3.1.1 clients pass 1 MiB and 16 MiB messages,
/// and MQTT 5 clients get no Maximum Packet Size (absent: the protocol's own
/// maximum; the value 268,435,460 made paho-mqtt 2.x refuse the CONNACK).
#[tokio::test]
async fn large_payloads_pass_by_default() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet as P, QoS as Q};

    let broker = Broker::start();
    let (_c, ack) = RawClient::connect(broker.addr(), connect_packet(V5, "big-props", true, 30));
    assert_eq!(ack.properties.maximum_packet_size, None);

    let client = |id: &str| {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.addr().port());
        o.set_max_packet_size(32 << 20, 32 << 20);
        AsyncClient::new(o, 16)
    };
    let (sub, mut sub_events) = client(&id_on_shard("big-sub", 0));
    let (publ, mut pub_events) = client(&id_on_shard("big-pub", 1));
    sub.subscribe("big/#", Q::AtLeastOnce).await.unwrap();
    loop {
        let ev = tokio::time::timeout(RECV_TIMEOUT, sub_events.poll()).await;
        if let Ok(Ok(Event::Incoming(P::SubAck(_)))) = ev {
            break;
        }
        ev.expect("SUBACK in time").expect("subscriber up");
    }
    tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });
    for size in [1 << 20, 16 << 20] {
        let payload = vec![b'p'; size];
        publ.publish("big/t", Q::AtLeastOnce, false, payload)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = tokio::time::timeout(left, sub_events.poll())
                .await
                .expect("the large delivery in time")
                .expect("subscriber up");
            if let Event::Incoming(P::Publish(p)) = ev {
                assert_eq!(p.payload.len(), size);
                break;
            }
        }
    }
    assert_eq!(refusals(&broker, ""), 0, "nothing refused");
}

/// A packet over a configured `max_packet_size_bytes`: v5 gets DISCONNECT
/// 0x95, a 3.1.1 client's connection is closed; both are counted and logged
/// with the setting's name.
#[test]
fn a_packet_over_the_size_limit_is_counted_and_logged() {
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__MAX_PACKET_SIZE_BYTES", "1024")]);
    let big = vec![b'x'; 1500];
    let mut c = RawClient::connect_ok(broker.addr(), connect_packet(V5, "size-5", true, 30));
    c.send(&publish_packet("size/t", &big, QoS::AtMostOnce, 0, false));
    c.expect_disconnect_then_close(ReasonCode::PacketTooLarge);
    let mut c = RawClient::connect_ok(broker.addr(), connect_packet(V311, "size-3", true, 30));
    c.send(&publish_packet("size/t", &big, QoS::AtLeastOnce, 1, false));
    c.expect_closed(RECV_TIMEOUT);
    assert_eq!(refusals(&broker, "packet_size"), 2);
    broker.wait_log("limits.max_packet_size_bytes", RECV_TIMEOUT);
}

/// The encoded bytes of `packet` in `version`.
fn encoded(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    packet.encode(version, &mut out).expect("encode");
    out.to_vec()
}

/// Large packets draw on the node's read-buffer budget when their header
/// arrives: one that does not fit ends its connection (v5: DISCONNECT 0x97
/// Quota exceeded; 3.1.1: closed; a CONNECT: CONNACK 0x97 / 0x03), counted; the packet that
/// holds the budget completes, and the budget is free again afterwards.
#[test]
fn the_read_buffer_budget_refuses_a_large_packet_it_cannot_hold() {
    let broker = Broker::start_with(
        &[],
        &[
            ("TESSERA_LIMITS__MAX_PACKET_SIZE_BYTES", "1000000"),
            ("TESSERA_LIMITS__MAX_READ_BUFFERS_BYTES", "1000000"),
        ],
    );
    let held = || {
        metric_sum(
            &scrape(broker.admin_addr()),
            "tessera_read_buffers_bytes",
            &[],
        ) as u64
    };
    let mut sub = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V311, &id_on_shard("rb-sub", 0), true, 30),
    );
    sub.subscribe(1, &[("rb/t", QoS::AtMostOnce)]);

    // A holds 900,000 bytes: its header and a first part are in.
    let mut a = RawClient::connect_ok(
        broker.addr(),
        connect_packet(V5, &id_on_shard("rb-a", 1), true, 30),
    );
    let big = encoded(
        &publish_packet("rb/t", &vec![b'a'; 899_000], QoS::AtMostOnce, 0, false),
        V5,
    );
    a.send_bytes(&big[..1000]);
    wait_until("A's packet reserved", || held() >= big.len() as u64);

    // B (v5) and C (3.1.1) start 200,000-byte packets: no room.
    let part = encoded(
        &publish_packet("rb/t", &vec![b'b'; 200_000], QoS::AtMostOnce, 0, false),
        V5,
    );
    let mut b = RawClient::connect_ok(broker.addr(), connect_packet(V5, "rb-b", true, 30));
    b.send_bytes(&part[..1000]);
    b.expect_disconnect_then_close(ReasonCode::QuotaExceeded);
    let mut c = RawClient::connect_ok(broker.addr(), connect_packet(V311, "rb-c", true, 30));
    c.send_bytes(&part[..1000]);
    c.expect_closed(RECV_TIMEOUT);
    // A large CONNECT (a will and a password of 60,000 bytes each) draws on
    // the same budget.
    let mut will_connect = connect_packet(V5, "rb-d", true, 30);
    will_connect.will = Some(common::will("rb/will", &[b'w'; 60_000], QoS::AtMostOnce));
    will_connect.username = Some(common::s("u"));
    will_connect.password = Some(bytes::Bytes::from(vec![b'p'; 60_000]));
    let connect = encoded(&Packet::Connect(Box::new(will_connect)), V5);
    let mut d = RawClient::open(broker.addr(), V5);
    d.send_bytes(&connect[..1000]);
    match d.recv() {
        Packet::ConnAck(ack) => assert_eq!(ack.reason_code, ReasonCode::QuotaExceeded),
        other => panic!("a CONNACK 0x97 for the over-budget v5 CONNECT, got {other:?}"),
    }
    d.expect_closed(RECV_TIMEOUT);
    // The same CONNECT in 3.1.1: return code 0x03 (Server unavailable).
    let mut will_connect = connect_packet(V311, "rb-e", true, 30);
    will_connect.will = Some(common::will("rb/will", &[b'w'; 60_000], QoS::AtMostOnce));
    will_connect.username = Some(common::s("u"));
    will_connect.password = Some(bytes::Bytes::from(vec![b'p'; 60_000]));
    let connect = encoded(&Packet::Connect(Box::new(will_connect)), V311);
    let mut e = RawClient::open(broker.addr(), V311);
    e.send_bytes(&connect[..1000]);
    match e.recv() {
        Packet::ConnAck(ack) => assert_eq!(ack.reason_code, ReasonCode::ServerUnavailable),
        other => panic!("a CONNACK 0x03 for the over-budget 3.1.1 CONNECT, got {other:?}"),
    }
    e.expect_closed(RECV_TIMEOUT);
    assert_eq!(refusals(&broker, "read_buffers"), 4);

    // A completes: delivered, and the budget is free again.
    a.send_bytes(&big[1000..]);
    assert_eq!(sub.recv_publish().payload.len(), 899_000);
    wait_until("the budget released", || held() == 0);
    let mut b = RawClient::connect_ok(broker.addr(), connect_packet(V5, "rb-b2", true, 30));
    b.send_bytes(&part);
    assert_eq!(sub.recv_publish().payload.len(), 200_000);
}

/// A CONNECT that needs a new session while the node holds
/// `max_sessions` (live and offline persistent together, across shards) is
/// refused: v5 CONNACK 0x97, 3.1.1 return code 3; resuming a session is
/// never refused, and an ended session frees its place.
#[tokio::test]
async fn a_connect_over_the_session_limit_is_refused_with_0x97() {
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__MAX_SESSIONS", "3")]);
    let addr = broker.addr();
    let mut offline = connect_packet(V5, &id_on_shard("sess-off", 0), false, 30);
    offline.properties = expiry(600);
    let mut c = RawClient::connect_ok(addr, offline.clone());
    c.disconnect();
    let _v3 = RawClient::connect_ok(
        addr,
        connect_packet(V311, &id_on_shard("sess-3", 1), false, 30),
    );
    let mut clean = RawClient::connect_ok(
        addr,
        connect_packet(V5, &id_on_shard("sess-c", 0), true, 30),
    );

    let (mut c, ack) = RawClient::connect(addr, connect_packet(V5, "sess-over-5", true, 30));
    assert_eq!(ack.reason_code, ReasonCode::QuotaExceeded);
    c.expect_closed(RECV_TIMEOUT);
    let (mut c, ack) = RawClient::connect(addr, connect_packet(V311, "sess-over-3", true, 30));
    // The 3.1.1 decoder reads return code 3 as Server unavailable.
    assert_eq!(ack.reason_code, ReasonCode::ServerUnavailable);
    c.expect_closed(RECV_TIMEOUT);
    let o = rumqttc::v5::MqttOptions::new("sess-over-rumqttc", "127.0.0.1", addr.port());
    let (_client, mut events) = rumqttc::v5::AsyncClient::new(o, 4);
    let err = tokio::time::timeout(RECV_TIMEOUT, events.poll())
        .await
        .expect("an answer in time")
        .expect_err("refused");
    match err {
        rumqttc::v5::ConnectionError::ConnectionRefused(code) => {
            assert_eq!(
                code,
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::QuotaExceeded
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Resuming the offline session needs no new one.
    let (_c, ack) = RawClient::connect(addr, offline);
    assert_eq!(ack.reason_code, ReasonCode::Success);
    assert!(ack.session_present);
    // A clean session's end frees a place.
    clean.disconnect();
    clean.expect_closed(RECV_TIMEOUT);
    wait_until("the freed place taken", || {
        let (mut c, ack) = RawClient::connect(addr, connect_packet(V5, "sess-later", true, 30));
        let ok = ack.reason_code == ReasonCode::Success;
        if ok {
            c.disconnect();
        }
        ok
    });
    assert!(refusals(&broker, "sessions") >= 3);
}

/// `max_session_expiry_s` caps what v5 clients ask for, "never" included, and
/// tells them the granted value in CONNACK; MQTT 3.1.1 Clean Session 0
/// sessions expire after it too instead of living forever.
#[tokio::test]
async fn session_expiry_is_capped_for_v5_and_applies_to_3_1_1_sessions() {
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__MAX_SESSION_EXPIRY_S", "1")]);
    let addr = broker.addr();
    let mut never = connect_packet(V5, "exp-never", false, 30);
    never.properties = expiry(u32::MAX);
    let (mut c, ack) = RawClient::connect(addr, never.clone());
    assert_eq!(ack.reason_code, ReasonCode::Success);
    assert_eq!(
        ack.properties.session_expiry_interval,
        Some(1),
        "granted and told"
    );
    c.subscribe(1, &[("exp/t", QoS::AtLeastOnce)]);
    c.disconnect();

    // A real v5 client sees the granted value too.
    let mut o = rumqttc::v5::MqttOptions::new("exp-rumqttc", "127.0.0.1", addr.port());
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(3600));
    let (_client, mut events) = rumqttc::v5::AsyncClient::new(o, 4);
    let ev = tokio::time::timeout(RECV_TIMEOUT, events.poll())
        .await
        .expect("CONNACK in time")
        .expect("accepted");
    match ev {
        rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(ack)) => {
            let granted = ack.properties.and_then(|p| p.session_expiry_interval);
            assert_eq!(granted, Some(1));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }

    let v3 = connect_packet(V311, "exp-v3", false, 30);
    let mut c = RawClient::connect_ok(addr, v3.clone());
    c.subscribe(1, &[("exp/t", QoS::AtLeastOnce)]);
    c.disconnect();
    c.expect_closed(RECV_TIMEOUT);

    // Both expire about a second after their disconnect.
    std::thread::sleep(Duration::from_millis(2500));
    let (_c, ack) = RawClient::connect(addr, never);
    assert!(!ack.session_present, "the v5 'never' session expired");
    let (_c, ack) = RawClient::connect(addr, v3);
    assert!(!ack.session_present, "the 3.1.1 persistent session expired");
}

/// The acknowledgement that answers a PUBLISH: its reason code.
fn ack_code(c: &mut RawClient) -> ReasonCode {
    match c.recv() {
        Packet::PubAck(a) => a.reason_code,
        Packet::PubRec(a) => a.reason_code,
        other => panic!("expected PUBACK or PUBREC, got {other:?}"),
    }
}

fn retained(c: &mut RawClient, topic: &str, payload: &[u8], qos: QoS, id: u16) -> ReasonCode {
    c.send(&publish_packet(topic, payload, qos, id, true));
    ack_code(c)
}

/// Retained count and byte caps: a v5 QoS 1/2 retained PUBLISH over either
/// gets 0x97 and is not published; replacing (without growing past the byte
/// cap) and clearing always work; QoS 0 and 3.1.1 publications over the cap
/// are delivered to current subscribers but not stored; all are counted.
#[test]
fn retained_caps_answer_0x97_and_never_block_a_replacement_or_a_clear() {
    let broker = Broker::start_with(
        &[],
        &[
            ("TESSERA_LIMITS__MAX_RETAINED_MESSAGES", "3"),
            ("TESSERA_LIMITS__MAX_RETAINED_BYTES", "100"),
        ],
    );
    let addr = broker.addr();
    let (q0, q1, q2) = (QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce);
    let mut watcher = RawClient::connect_ok(
        addr,
        connect_packet(V311, &id_on_shard("ret-w", 0), true, 30),
    );
    watcher.subscribe(1, &[("r/#", q0)]);
    let mut p = RawClient::connect_ok(addr, connect_packet(V5, &id_on_shard("ret-p", 1), true, 30));
    let ok = ReasonCode::Success;
    let quota = ReasonCode::QuotaExceeded;
    // Bytes count topic and payload: "r/a" + 10 = 13.
    assert_eq!(retained(&mut p, "r/a", &[b'a'; 10], q1, 1), ok);
    assert_eq!(retained(&mut p, "r/b", &[b'b'; 10], q1, 2), ok); // 26
    assert_eq!(retained(&mut p, "r/c", &[b'c'; 90], q1, 3), quota, "bytes");
    assert_eq!(retained(&mut p, "r/c", &[b'c'; 10], q1, 4), ok); // 39, 3 topics
    assert_eq!(retained(&mut p, "r/d", b"d", q1, 5), quota, "count");
    assert_eq!(retained(&mut p, "r/d", b"d", q2, 6), quota, "count, QoS 2");
    assert_eq!(retained(&mut p, "r/a", &[b'A'; 20], q1, 7), ok, "replaced"); // 49
    assert_eq!(
        retained(&mut p, "r/a", &[b'A'; 90], q1, 8),
        quota,
        "grows past"
    );
    assert_eq!(retained(&mut p, "r/b", b"", q1, 9), ok, "cleared");
    assert_eq!(retained(&mut p, "r/d", b"d", q1, 10), ok, "room again");
    // The watcher saw exactly the accepted ones, in order.
    let seen: Vec<(String, usize)> = (0..6)
        .map(|_| {
            let m = watcher.recv_publish();
            (m.topic.to_string(), m.payload.len())
        })
        .collect();
    let t = |s: &str, n: usize| (s.to_owned(), n);
    assert_eq!(
        seen,
        [
            t("r/a", 10),
            t("r/b", 10),
            t("r/c", 10),
            t("r/a", 20),
            t("r/b", 0),
            t("r/d", 1)
        ]
    );

    // Over the count at QoS 0 (v5) and from a 3.1.1 client: published, not stored.
    p.send(&publish_packet("r/e", b"e0", q0, 0, true));
    let mut p3 = RawClient::connect_ok(
        addr,
        connect_packet(V311, &id_on_shard("ret-p3", 1), true, 30),
    );
    assert_eq!(
        retained(&mut p3, "r/f", b"f3", q1, 1),
        ok,
        "3.1.1 has no code"
    );
    assert_eq!(&watcher.recv_publish().payload[..], b"e0");
    assert_eq!(&watcher.recv_publish().payload[..], b"f3");

    // A new subscriber gets the three stored ones, then the sentinel.
    let mut late = RawClient::connect_ok(addr, connect_packet(V311, "ret-late", true, 30));
    late.subscribe(1, &[("r/#", q0)]);
    let mut topics: Vec<String> = (0..3)
        .map(|_| late.recv_publish().topic.to_string())
        .collect();
    topics.sort();
    assert_eq!(topics, ["r/a", "r/c", "r/d"]);
    p.send(&publish_packet("r/sentinel", b"s", q0, 0, false));
    assert_eq!(
        late.recv_publish().topic.as_str(),
        "r/sentinel",
        "nothing else stored"
    );
    assert_eq!(refusals(&broker, "retained_messages"), 4);
    assert_eq!(refusals(&broker, "retained_bytes"), 2);
}
