//! Goal: shared subscriptions `$share/{group}/{filter}` (MQTT 5.0 section
//! 4.8.2) work in the real broker across shards: each message goes to one
//! member of the group, members on different shards split the stream, a
//! member that leaves leaves its messages to the others, retained messages
//! are not sent on a shared subscribe, share names are checked, and the
//! configured strategy is used.
//!
//! Method: each test starts its own broker (`--shards 2`) and places every
//! client on a known shard with the broker's own hash. Members are rumqttc
//! v5 clients whose event loop runs on a thread of its own (so several
//! members make progress at once) and report what they receive on a
//! channel; a member that must leave abruptly or hold acknowledgements back
//! is the raw client of `common`. Completeness is checked without sleeping:
//! members also hold an ordinary subscription to a sentinel topic that the
//! publisher sends last, and the broker keeps one publisher's messages in
//! order towards one subscriber whichever subscription they match. Every
//! wait is bounded by `RECV_TIMEOUT`.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use common::{Broker, RECV_TIMEOUT, RawClient, connect_packet, id_on_shard, subscribe_packet};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5 as p5;
use tessera_proto::{Packet, ProtocolVersion, QoS, ReasonCode, Str};

/// What a member's event-loop thread reports.
#[derive(Debug)]
enum Event {
    ConnAck(p5::ConnAck),
    SubAck(Vec<p5::SubscribeReasonCode>),
    /// A delivery: topic and payload.
    Publish(String, String),
    /// The connection ended.
    Closed,
}

/// A rumqttc v5 client driven by its own thread.
struct Member {
    id: String,
    client: rumqttc::v5::Client,
    events: mpsc::Receiver<Event>,
}

impl Member {
    /// Connects with Clean Start and no session expiry; panics unless the
    /// CONNACK is a success announcing shared subscriptions.
    fn connect(addr: SocketAddr, id: &str) -> Member {
        let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut connection) = rumqttc::v5::Client::new(o, 64);
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            use rumqttc::v5::Event as E;
            for ev in connection.iter() {
                let report = match ev {
                    Ok(E::Incoming(p5::Packet::ConnAck(a))) => Event::ConnAck(a),
                    Ok(E::Incoming(p5::Packet::SubAck(a))) => Event::SubAck(a.return_codes),
                    Ok(E::Incoming(p5::Packet::Publish(p))) => Event::Publish(
                        String::from_utf8(p.topic.to_vec()).expect("UTF-8 topic"),
                        String::from_utf8(p.payload.to_vec()).expect("UTF-8 payload"),
                    ),
                    Ok(_) => continue,
                    Err(_) => {
                        let _ = tx.send(Event::Closed);
                        return;
                    }
                };
                if tx.send(report).is_err() {
                    return; // the test is done with this member
                }
            }
        });
        let mut m = Member {
            id: id.into(),
            client,
            events,
        };
        match m.next() {
            Event::ConnAck(a) => {
                assert_eq!(a.code, p5::ConnectReturnCode::Success, "{id}: {a:?}");
                let props = a.properties.expect("v5 CONNACK properties");
                assert_eq!(props.shared_subscription_available, Some(1), "{id}");
            }
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        }
        m
    }

    fn next(&mut self) -> Event {
        match self.events.recv_timeout(RECV_TIMEOUT) {
            Ok(ev) => ev,
            Err(e) => panic!("{}: nothing within {RECV_TIMEOUT:?} ({e})", self.id),
        }
    }

    /// Subscribes one filter at QoS 1 and waits for the SUBACK.
    fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS5::AtLeastOnce)
            .expect("subscribe request");
        match self.next() {
            Event::SubAck(codes) => assert_eq!(
                codes,
                [p5::SubscribeReasonCode::Success(QoS5::AtLeastOnce)],
                "{}: {filter}",
                self.id
            ),
            other => panic!("{}: expected SUBACK, got {other:?}", self.id),
        }
    }

    /// Payloads received up to the first delivery on `sentinel`, excluded.
    fn recv_until(&mut self, sentinel: &str) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            match self.next() {
                Event::Publish(topic, _) if topic == sentinel => return got,
                Event::Publish(_, payload) => got.push(payload),
                other => panic!("{}: expected PUBLISH, got {other:?}", self.id),
            }
        }
    }

    /// Payloads received until `want` distinct ones arrived.
    fn recv_distinct(&mut self, want: usize) -> BTreeSet<String> {
        let mut got = BTreeSet::new();
        while got.len() < want {
            match self.next() {
                Event::Publish(_, payload) => {
                    got.insert(payload);
                }
                other => panic!("{}: expected PUBLISH, got {other:?}", self.id),
            }
        }
        got
    }
}

/// A v5 raw client on `shard`, clean start, no session expiry.
fn raw_v5(broker: &Broker, prefix: &str, shard: usize) -> RawClient {
    let id = id_on_shard(prefix, shard);
    RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V5, &id, true, 30),
    )
}

fn payloads(prefix: &str, range: std::ops::Range<usize>) -> BTreeSet<String> {
    range.map(|k| format!("{prefix}{k}")).collect()
}

/// Two members on different shards and a publisher on each shard: every
/// message reaches exactly one member, and both members get some.
#[test]
fn members_on_two_shards_split_the_messages() {
    let broker = Broker::start();
    let mut members: Vec<Member> = (0..2)
        .map(|shard| Member::connect(broker.addr(), &id_on_shard("split-m", shard)))
        .collect();
    for m in &mut members {
        m.subscribe("$share/workers/jobs/+");
        m.subscribe("jobs-done");
    }
    let mut publishers: Vec<RawClient> = (0..2).map(|s| raw_v5(&broker, "split-p", s)).collect();
    for k in 0..40 {
        let p = &mut publishers[k % 2];
        p.publish(
            "jobs/a",
            format!("j{k}").as_bytes(),
            QoS::AtLeastOnce,
            k as u16 + 1,
        );
    }
    // Each publisher's sentinel follows its jobs on every path.
    for (n, p) in publishers.iter_mut().enumerate() {
        p.publish("jobs-done", b"", QoS::AtLeastOnce, 100 + n as u16);
    }
    let mut got: Vec<Vec<String>> = Vec::new();
    for m in &mut members {
        let mut mine = m.recv_until("jobs-done");
        mine.extend(m.recv_until("jobs-done"));
        got.push(mine);
    }
    let all: Vec<String> = got.concat();
    let distinct: BTreeSet<String> = all.iter().cloned().collect();
    assert_eq!(all.len(), 40, "each message exactly once: {got:?}");
    assert_eq!(distinct, payloads("j", 0..40));
    assert!(got.iter().all(|g| !g.is_empty()), "round robin: {got:?}");
}

/// Section 3.8.4: a shared subscription gets no retained message when it is
/// made; the sentinel is the first delivery.
#[test]
fn retained_messages_are_not_sent_on_shared_subscribe() {
    let broker = Broker::start();
    let mut publisher = raw_v5(&broker, "ret-p", 0);
    publisher.publish_retained("ret/t", b"kept", 1);
    let mut m = Member::connect(broker.addr(), &id_on_shard("ret-m", 1));
    m.subscribe("$share/g/ret/#");
    m.subscribe("ret-done");
    publisher.publish("ret-done", b"", QoS::AtLeastOnce, 2);
    assert_eq!(m.recv_until("ret-done"), Vec::<String>::new());
    // Later publications to the topic are delivered as usual.
    publisher.publish("ret/t", b"new", QoS::AtLeastOnce, 3);
    publisher.publish("ret-done", b"", QoS::AtLeastOnce, 4);
    assert_eq!(m.recv_until("ret-done"), ["new"]);
}

/// A member without a persistent session receives its share and drops the
/// connection without acknowledging it: the other member, on the other
/// shard, gets everything, the messages the first held included.
#[test]
fn a_member_that_leaves_leaves_its_messages_to_the_others() {
    let broker = Broker::start();
    let mut leaver = raw_v5(&broker, "leave-a", 0);
    assert_eq!(
        leaver.subscribe(
            1,
            &[
                ("$share/g/lv/t", QoS::AtLeastOnce),
                ("lv-done", QoS::AtMostOnce)
            ]
        ),
        [ReasonCode::GrantedQoS1, ReasonCode::Success]
    );
    let mut stayer = Member::connect(broker.addr(), &id_on_shard("leave-b", 1));
    stayer.subscribe("$share/g/lv/t");
    let mut publisher = raw_v5(&broker, "leave-p", 1);
    for k in 0..10 {
        publisher.publish("lv/t", format!("a{k}").as_bytes(), QoS::AtLeastOnce, k + 1);
    }
    publisher.publish("lv-done", b"", QoS::AtMostOnce, 0);
    // The leaver reads its share and acknowledges nothing.
    let mut held = Vec::new();
    loop {
        match leaver.recv() {
            Packet::Publish(p) if p.topic.as_str() == "lv-done" => break,
            Packet::Publish(p) => held.push(String::from_utf8(p.payload.to_vec()).unwrap()),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert!(!held.is_empty(), "round robin gives the leaver some");
    leaver.drop_connection();
    for k in 10..20 {
        publisher.publish("lv/t", format!("a{k}").as_bytes(), QoS::AtLeastOnce, k + 1);
    }
    assert_eq!(
        stayer.recv_distinct(20),
        payloads("a", 0..20),
        "held: {held:?}"
    );
}

/// The strategy comes from the configuration: `sticky` keeps every message on
/// one member while it stays connected, then moves to the other.
#[test]
fn the_configured_sticky_strategy_keeps_one_member() {
    let broker = Broker::start_with(
        &[],
        &[("TESSERA_LIMITS__SHARED_SUBSCRIPTION_STRATEGY", "sticky")],
    );
    let mut members: Vec<Member> = (0..2)
        .map(|shard| Member::connect(broker.addr(), &id_on_shard("sticky-m", shard)))
        .collect();
    for m in &mut members {
        m.subscribe("$share/g/st");
        m.subscribe("st-done");
    }
    let mut publisher = raw_v5(&broker, "sticky-p", 1);
    for k in 0..10 {
        publisher.publish("st", format!("s{k}").as_bytes(), QoS::AtLeastOnce, k + 1);
    }
    publisher.publish("st-done", b"", QoS::AtLeastOnce, 20);
    let mut got: Vec<Vec<String>> = members
        .iter_mut()
        .map(|m| m.recv_until("st-done"))
        .collect();
    got.sort_by_key(Vec::len);
    assert_eq!(got[0], Vec::<String>::new());
    assert_eq!(
        got[1].iter().cloned().collect::<BTreeSet<_>>(),
        payloads("s", 0..10)
    );
}

/// MQTT 3.1.1 clients may share too (as Mosquitto and EMQX allow).
#[test]
fn v311_clients_share_a_subscription() {
    let broker = Broker::start();
    let v3 = ProtocolVersion::V3_1_1;
    let mut members: Vec<RawClient> = (0..2)
        .map(|shard| {
            let id = id_on_shard("v3-m", shard);
            let mut c = RawClient::connect_ok(broker.addr(), connect_packet(v3, &id, true, 30));
            assert_eq!(
                c.subscribe(
                    1,
                    &[
                        ("$share/g/v3", QoS::AtLeastOnce),
                        ("v3-done", QoS::AtLeastOnce)
                    ]
                ),
                [ReasonCode::GrantedQoS1, ReasonCode::GrantedQoS1]
            );
            c
        })
        .collect();
    let id = id_on_shard("v3-p", 0);
    let mut publisher = RawClient::connect_ok(broker.addr(), connect_packet(v3, &id, true, 30));
    for k in 0..10 {
        publisher.publish("v3", format!("v{k}").as_bytes(), QoS::AtLeastOnce, k + 1);
    }
    publisher.publish("v3-done", b"", QoS::AtLeastOnce, 20);
    let mut all = Vec::new();
    for m in &mut members {
        loop {
            let p = m.recv_publish();
            if p.topic.as_str() == "v3-done" {
                break;
            }
            all.push(String::from_utf8(p.payload.to_vec()).unwrap());
        }
    }
    assert_eq!(all.len(), 10, "{all:?}");
    assert_eq!(
        all.into_iter().collect::<BTreeSet<_>>(),
        payloads("v", 0..10)
    );
}

/// Bad share names fail their filter with 0x8F [MQTT-4.8.2-1, -2];
/// UNSUBSCRIBE ends the membership; No Local on a shared subscription is a
/// protocol error [MQTT-3.8.3-4].
#[test]
fn share_names_are_checked_and_unsubscribe_ends_membership() {
    let broker = Broker::start();
    let mut c = raw_v5(&broker, "names", 0);
    let codes = c.subscribe(
        1,
        &[
            ("$share//t", QoS::AtLeastOnce),
            ("$share/g+/t", QoS::AtLeastOnce),
            ("$share/g", QoS::AtLeastOnce),
            ("$share/g/a/#/b", QoS::AtLeastOnce),
            ("$share/g/#", QoS::AtLeastOnce),
            ("names-done", QoS::AtLeastOnce),
        ],
    );
    let bad = ReasonCode::TopicFilterInvalid;
    assert_eq!(
        codes,
        [
            bad,
            bad,
            bad,
            bad,
            ReasonCode::GrantedQoS1,
            ReasonCode::GrantedQoS1
        ]
    );
    c.send(&Packet::Unsubscribe(tessera_proto::Unsubscribe {
        packet_id: 2,
        properties: Default::default(),
        filters: vec![Str::from_static("$share/g/#")],
    }));
    match c.recv() {
        Packet::UnsubAck(a) => assert_eq!(a.reason_codes, [ReasonCode::Success]),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    c.publish("names/t", b"not for me", QoS::AtLeastOnce, 3);
    c.publish("names-done", b"done", QoS::AtLeastOnce, 4);
    assert_eq!(c.recv_publish().topic.as_str(), "names-done");

    let Packet::Subscribe(mut sub) = subscribe_packet(5, &[("$share/g/nl", QoS::AtLeastOnce)])
    else {
        unreachable!()
    };
    sub.subscriptions[0].options.no_local = true;
    c.send(&Packet::Subscribe(sub));
    c.expect_disconnect_then_close(ReasonCode::ProtocolError);
}
