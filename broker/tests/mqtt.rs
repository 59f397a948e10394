//! Goal: the real broker, over real sockets, keeps the MQTT 3.1.1 and 5.0
//! promises a client relies on: QoS 0/1/2 delivery with the granted QoS,
//! wildcards, retained messages, wills, session takeover, persistent sessions,
//! assigned client ids, keep alive and graceful shutdown; including when
//! publisher and subscriber live on different shards.
//!
//! Method: each test starts its own broker (`--shards 2`) and drives it with
//! rumqttc (`AsyncClient` for 3.1.1, `v5::AsyncClient` for 5.0) or, where the
//! test needs exact bytes or an abrupt close, with the raw client of `common`.
//! Client ids are chosen with the broker's own hash so that each test knows on
//! which shard every client lives. Behaviour shared by both versions is written
//! once against the small [`Client`] trait and run for each. Absence of a
//! delivery is checked without sleeping: the test publishes a sentinel after
//! the message that must not arrive, on a path whose order the broker keeps
//! (same publisher, same subscriber), and asserts the sentinel comes first.
//! Every wait is bounded by `RECV_TIMEOUT`.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Broker, RECV_TIMEOUT, RawClient, connect_packet, id_on_shard, shard_of, will};
use tessera_proto::{Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::time::timeout;

/// A delivery as the tests compare it, whatever the protocol version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Msg {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
}

fn msg(topic: &str, payload: &[u8], qos: u8, retain: bool) -> Msg {
    Msg {
        topic: topic.into(),
        payload: payload.into(),
        qos,
        retain,
    }
}

/// What the shared tests need from a client; QoS is a plain `u8` so both
/// rumqttc flavours fit.
trait Client: Sized {
    /// The protocol tag used in client ids and topics.
    const TAG: &'static str;

    /// Connects; `clean = false` asks for a persistent session (3.1.1 Clean
    /// Session 0, 5.0 Clean Start 0 with a Session Expiry of 60 s). Returns
    /// the client and CONNACK's session present flag.
    async fn connect(addr: SocketAddr, id: &str, clean: bool) -> (Self, bool);

    /// Subscribes one filter; returns the granted QoS, `None` if refused.
    async fn subscribe(&mut self, filter: &str, qos: u8) -> Option<u8>;

    /// Unsubscribes one filter and waits for UNSUBACK.
    async fn unsubscribe(&mut self, filter: &str);

    /// Publishes and waits until the exchange completes (PUBACK / PUBCOMP; for
    /// QoS 0, until the packet is written).
    async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]);

    /// The next delivery.
    async fn recv(&mut self) -> Msg;

    /// Sends DISCONNECT and waits until it is written.
    async fn disconnect(self);

    /// Deliveries up to and including the first one on `topic`.
    async fn recv_until(&mut self, topic: &str) -> Vec<Msg> {
        let mut got = Vec::new();
        loop {
            let m = self.recv().await;
            let last = m.topic == topic;
            got.push(m);
            if last {
                return got;
            }
        }
    }
}

/// rumqttc's MQTT 3.1.1 client, polled only inside test calls (no background
/// task), with deliveries seen while waiting for something else kept in order.
struct V311 {
    id: String,
    client: rumqttc::AsyncClient,
    events: rumqttc::EventLoop,
    inbox: VecDeque<Msg>,
}

fn qos_v311(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        2 => rumqttc::QoS::ExactlyOnce,
        _ => panic!("QoS {q}"),
    }
}

impl V311 {
    fn options(addr: SocketAddr, id: &str) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    fn new(id: &str, options: rumqttc::MqttOptions) -> V311 {
        let (client, events) = rumqttc::AsyncClient::new(options, 16);
        V311 {
            id: id.into(),
            client,
            events,
            inbox: VecDeque::new(),
        }
    }

    /// The next event or connection error, within what is left until `deadline`.
    async fn poll(
        &mut self,
        deadline: Instant,
    ) -> Result<rumqttc::Event, rumqttc::ConnectionError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, self.events.poll()).await {
            Ok(r) => r,
            Err(_) => panic!("{}: nothing within {RECV_TIMEOUT:?}", self.id),
        }
    }

    /// Polls until `f` picks an event, keeping deliveries for `recv`.
    async fn until<T>(&mut self, mut f: impl FnMut(&rumqttc::Event) -> Option<T>) -> T {
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            let ev = match self.poll(deadline).await {
                Ok(ev) => ev,
                Err(e) => panic!("{}: connection error: {e:?}", self.id),
            };
            if let Some(t) = f(&ev) {
                return t;
            }
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
                self.inbox
                    .push_back(msg(&p.topic, &p.payload, p.qos as u8, p.retain));
            }
        }
    }

    /// Polls until the connection fails, and returns why.
    async fn next_error(&mut self) -> rumqttc::ConnectionError {
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            if let Err(e) = self.poll(deadline).await {
                return e;
            }
        }
    }
}

impl Client for V311 {
    const TAG: &'static str = "v311";

    async fn connect(addr: SocketAddr, id: &str, clean: bool) -> (Self, bool) {
        let mut o = V311::options(addr, id);
        o.set_clean_session(clean);
        let mut c = V311::new(id, o);
        let present = c
            .until(|ev| match ev {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)) => Some(a.session_present),
                _ => None,
            })
            .await;
        (c, present)
    }

    async fn subscribe(&mut self, filter: &str, qos: u8) -> Option<u8> {
        self.client
            .subscribe(filter, qos_v311(qos))
            .await
            .expect("subscribe request");
        let code = self
            .until(|ev| match ev {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)) => Some(a.return_codes[0]),
                _ => None,
            })
            .await;
        match code {
            rumqttc::SubscribeReasonCode::Success(q) => Some(q as u8),
            rumqttc::SubscribeReasonCode::Failure => None,
        }
    }

    async fn unsubscribe(&mut self, filter: &str) {
        self.client
            .unsubscribe(filter)
            .await
            .expect("unsubscribe request");
        self.until(|ev| {
            matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::UnsubAck(_))).then_some(())
        })
        .await;
    }

    async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos_v311(qos), retain, payload)
            .await
            .expect("publish request");
        self.until(|ev| {
            use rumqttc::{Event, Outgoing, Packet};
            match (qos, ev) {
                (0, Event::Outgoing(Outgoing::Publish(_)))
                | (1, Event::Incoming(Packet::PubAck(_)))
                | (2, Event::Incoming(Packet::PubComp(_))) => Some(()),
                _ => None,
            }
        })
        .await;
    }

    async fn recv(&mut self) -> Msg {
        if let Some(m) = self.inbox.pop_front() {
            return m;
        }
        self.until(|ev| match ev {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                Some(msg(&p.topic, &p.payload, p.qos as u8, p.retain))
            }
            _ => None,
        })
        .await
    }

    async fn disconnect(mut self) {
        self.client.disconnect().await.expect("disconnect request");
        self.until(|ev| {
            matches!(ev, rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)).then_some(())
        })
        .await;
    }
}

/// rumqttc's MQTT 5 client, used like [`V311`].
struct V5 {
    id: String,
    client: rumqttc::v5::AsyncClient,
    events: rumqttc::v5::EventLoop,
    inbox: VecDeque<Msg>,
}

use rumqttc::v5::mqttbytes::v5 as p5;

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => panic!("QoS {q}"),
    }
}

fn msg_v5(p: &p5::Publish) -> Msg {
    Msg {
        topic: String::from_utf8(p.topic.to_vec()).expect("UTF-8 topic"),
        payload: p.payload.to_vec(),
        qos: p.qos as u8,
        retain: p.retain,
    }
}

impl V5 {
    fn options(addr: SocketAddr, id: &str) -> rumqttc::v5::MqttOptions {
        let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Connects with `options` and returns the CONNACK.
    async fn connect_with(id: &str, options: rumqttc::v5::MqttOptions) -> (V5, p5::ConnAck) {
        let (client, events) = rumqttc::v5::AsyncClient::new(options, 16);
        let mut c = V5 {
            id: id.into(),
            client,
            events,
            inbox: VecDeque::new(),
        };
        let ack = c
            .until(|ev| match ev {
                rumqttc::v5::Event::Incoming(p5::Packet::ConnAck(a)) => Some(a.clone()),
                _ => None,
            })
            .await;
        (c, ack)
    }

    async fn poll(
        &mut self,
        deadline: Instant,
    ) -> Result<rumqttc::v5::Event, rumqttc::v5::ConnectionError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, self.events.poll()).await {
            Ok(r) => r,
            Err(_) => panic!("{}: nothing within {RECV_TIMEOUT:?}", self.id),
        }
    }

    async fn until<T>(&mut self, mut f: impl FnMut(&rumqttc::v5::Event) -> Option<T>) -> T {
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            let ev = match self.poll(deadline).await {
                Ok(ev) => ev,
                Err(e) => panic!("{}: connection error: {e:?}", self.id),
            };
            if let Some(t) = f(&ev) {
                return t;
            }
            if let rumqttc::v5::Event::Incoming(p5::Packet::Publish(p)) = ev {
                self.inbox.push_back(msg_v5(&p));
            }
        }
    }

    async fn next_error(&mut self) -> rumqttc::v5::ConnectionError {
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            if let Err(e) = self.poll(deadline).await {
                return e;
            }
        }
    }
}

impl Client for V5 {
    const TAG: &'static str = "v5";

    async fn connect(addr: SocketAddr, id: &str, clean: bool) -> (Self, bool) {
        let mut o = V5::options(addr, id);
        o.set_clean_start(clean);
        if !clean {
            o.set_session_expiry_interval(Some(60));
        }
        let (c, ack) = V5::connect_with(id, o).await;
        assert_eq!(ack.code, p5::ConnectReturnCode::Success, "{id}: {ack:?}");
        (c, ack.session_present)
    }

    async fn subscribe(&mut self, filter: &str, qos: u8) -> Option<u8> {
        self.client
            .subscribe(filter, qos_v5(qos))
            .await
            .expect("subscribe request");
        let code = self
            .until(|ev| match ev {
                rumqttc::v5::Event::Incoming(p5::Packet::SubAck(a)) => Some(a.return_codes[0]),
                _ => None,
            })
            .await;
        match code {
            p5::SubscribeReasonCode::Success(q) => Some(q as u8),
            _ => None,
        }
    }

    async fn unsubscribe(&mut self, filter: &str) {
        self.client
            .unsubscribe(filter)
            .await
            .expect("unsubscribe request");
        self.until(|ev| {
            matches!(ev, rumqttc::v5::Event::Incoming(p5::Packet::UnsubAck(_))).then_some(())
        })
        .await;
    }

    async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]) {
        let payload = payload.to_vec();
        self.client
            .publish(topic, qos_v5(qos), retain, payload)
            .await
            .expect("publish request");
        self.until(|ev| {
            use rumqttc::Outgoing;
            use rumqttc::v5::Event;
            match (qos, ev) {
                (0, Event::Outgoing(Outgoing::Publish(_)))
                | (1, Event::Incoming(p5::Packet::PubAck(_)))
                | (2, Event::Incoming(p5::Packet::PubComp(_))) => Some(()),
                _ => None,
            }
        })
        .await;
    }

    async fn recv(&mut self) -> Msg {
        if let Some(m) = self.inbox.pop_front() {
            return m;
        }
        self.until(|ev| match ev {
            rumqttc::v5::Event::Incoming(p5::Packet::Publish(p)) => Some(msg_v5(p)),
            _ => None,
        })
        .await
    }

    async fn disconnect(mut self) {
        self.client.disconnect().await.expect("disconnect request");
        self.until(|ev| {
            matches!(
                ev,
                rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)
            )
            .then_some(())
        })
        .await;
    }
}

/// Runs each shared test once per protocol version: `v311::name` and `v5::name`.
macro_rules! for_both_versions {
    ($($name:ident),* $(,)?) => {
        mod v311 {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name::<super::V311>().await;
                }
            )*
        }
        mod v5 {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name::<super::V5>().await;
                }
            )*
        }
    };
}

for_both_versions!(
    qos_levels_and_downgrade_across_shards,
    wildcards_match_per_level_and_multi_level,
    overlapping_subscriptions_deliver_once_at_highest_qos,
    dollar_topics_are_not_matched_by_leading_wildcards,
    unsubscribe_stops_delivery,
    retained_messages_set_deliver_and_clear,
    will_is_published_on_abrupt_close_only,
    persistent_session_keeps_subscriptions_and_queues_messages,
);

/// Ten subscriber/publisher pairs (eight across shards, two on one shard);
/// each subscriber takes one topic at each maximum QoS and receives every
/// publication QoS on each, at min(published, granted) [MQTT-3.8.4-6], exactly
/// once.
async fn qos_levels_and_downgrade_across_shards<C: Client>() {
    let broker = Broker::start();
    for i in 0..10 {
        let sub_shard = i % 2;
        let pub_shard = if i < 8 { 1 - sub_shard } else { sub_shard };
        let sub_id = id_on_shard(&format!("qos-{}-sub{i}", C::TAG), sub_shard);
        let pub_id = id_on_shard(&format!("qos-{}-pub{i}", C::TAG), pub_shard);

        let (mut sub, _) = C::connect(broker.addr(), &sub_id, true).await;
        for q in 0..3u8 {
            let granted = sub.subscribe(&format!("qos/{i}/max{q}"), q).await;
            assert_eq!(granted, Some(q), "{sub_id} subscribing at QoS {q}");
        }
        let (mut publ, _) = C::connect(broker.addr(), &pub_id, true).await;
        let mut expected = Vec::new();
        for granted in 0..3u8 {
            for published in 0..3u8 {
                let topic = format!("qos/{i}/max{granted}");
                let payload = format!("published at {published}");
                publ.publish(&topic, published, false, payload.as_bytes())
                    .await;
                expected.push(msg(
                    &topic,
                    payload.as_bytes(),
                    published.min(granted),
                    false,
                ));
            }
        }
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            got.push(sub.recv().await);
        }
        // A sentinel after everything: a duplicate would arrive before it.
        publ.publish(&format!("qos/{i}/max1"), 1, false, b"end")
            .await;
        assert_eq!(
            sub.recv().await,
            msg(&format!("qos/{i}/max1"), b"end", 1, false)
        );
        got.sort();
        expected.sort();
        assert_eq!(
            got, expected,
            "pair {i}: {sub_id} (shard {sub_shard}) <- {pub_id} (shard {pub_shard})"
        );
        publ.disconnect().await;
        sub.disconnect().await;
    }
}

/// `+` matches exactly one level, `#` the parent level and any number below
/// it [MQTT-4.7.1-2], [MQTT-4.7.1-3].
async fn wildcards_match_per_level_and_multi_level<C: Client>() {
    let broker = Broker::start();
    let (mut sub, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("wild-{}-sub", C::TAG), 0),
        true,
    )
    .await;
    for f in ["w/+/c", "h/#", "+", "end"] {
        assert_eq!(sub.subscribe(f, 1).await, Some(1), "{f}");
    }
    let (mut publ, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("wild-{}-pub", C::TAG), 1),
        true,
    )
    .await;
    let topics = [
        ("w/b/c", true),
        ("w//c", true),
        ("w/b/d", false),
        ("w/b/c/d", false),
        ("w/c", false),
        ("h", true),
        ("h/x", true),
        ("h/x/y", true),
        ("hx", true), // matched by "+" (one level), not by "h/#"
        ("hx/y", false),
        ("/x", false),
    ];
    for (t, _) in topics {
        publ.publish(t, 1, false, t.as_bytes()).await;
    }
    publ.publish("end", 1, false, b"end").await;
    let mut got = sub.recv_until("end").await;
    let mut expected: Vec<Msg> = topics
        .iter()
        .filter(|(_, m)| *m)
        .map(|(t, _)| msg(t, t.as_bytes(), 1, false))
        .collect();
    expected.push(msg("end", b"end", 1, false));
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
}

/// Overlapping subscriptions of one client: one delivery, at the highest
/// granted QoS of the matching subscriptions ([MQTT-3.3.5-1]; 5.0 section
/// 3.3.4).
async fn overlapping_subscriptions_deliver_once_at_highest_qos<C: Client>() {
    let broker = Broker::start();
    let (mut sub, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("ovl-{}-sub", C::TAG), 1),
        true,
    )
    .await;
    for (f, q) in [("ov/#", 0), ("ov/+", 2), ("ov/t", 1), ("end", 1)] {
        assert_eq!(sub.subscribe(f, q).await, Some(q));
    }
    let (mut publ, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("ovl-{}-pub", C::TAG), 0),
        true,
    )
    .await;
    publ.publish("ov/t", 2, false, b"a").await; // ov/#, ov/+, ov/t: QoS 2
    publ.publish("ov/u", 1, false, b"b").await; // ov/#, ov/+: min(1, 2)
    publ.publish("ov/t/x", 2, false, b"c").await; // ov/# only: QoS 0
    publ.publish("end", 1, false, b"end").await;
    let mut got = sub.recv_until("end").await;
    got.sort();
    let mut expected = vec![
        msg("ov/t", b"a", 2, false),
        msg("ov/u", b"b", 1, false),
        msg("ov/t/x", b"c", 0, false),
        msg("end", b"end", 1, false),
    ];
    expected.sort();
    assert_eq!(got, expected);
}

/// Topics starting with `$` are not matched by filters starting with `#` or
/// `+` [MQTT-4.7.2-1], but are by a filter naming them. (`$app`, not `$SYS`:
/// only the broker publishes under `$SYS/`.)
async fn dollar_topics_are_not_matched_by_leading_wildcards<C: Client>() {
    let broker = Broker::start();
    let (mut all, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("sys-{}-all", C::TAG), 0),
        true,
    )
    .await;
    assert_eq!(all.subscribe("#", 1).await, Some(1));
    assert_eq!(all.subscribe("+/x", 1).await, Some(1));
    let (mut sys, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("sys-{}-sys", C::TAG), 1),
        true,
    )
    .await;
    assert_eq!(sys.subscribe("$app/#", 1).await, Some(1));
    let (mut publ, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("sys-{}-pub", C::TAG), 1),
        true,
    )
    .await;
    publ.publish("$app/x", 1, false, b"sys").await;
    publ.publish("end", 1, false, b"end").await;
    assert_eq!(sys.recv().await, msg("$app/x", b"sys", 1, false));
    assert_eq!(all.recv_until("end").await, [msg("end", b"end", 1, false)]);
}

/// After UNSUBACK, the filter no longer delivers (also across shards).
async fn unsubscribe_stops_delivery<C: Client>() {
    let broker = Broker::start();
    let (mut sub, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("uns-{}-sub", C::TAG), 0),
        true,
    )
    .await;
    assert_eq!(sub.subscribe("un/t", 1).await, Some(1));
    assert_eq!(sub.subscribe("un/end", 1).await, Some(1));
    let (mut publ, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("uns-{}-pub", C::TAG), 1),
        true,
    )
    .await;
    publ.publish("un/t", 1, false, b"before").await;
    assert_eq!(sub.recv().await, msg("un/t", b"before", 1, false));
    sub.unsubscribe("un/t").await;
    publ.publish("un/t", 1, false, b"after").await;
    publ.publish("un/end", 1, false, b"end").await;
    assert_eq!(
        sub.recv_until("un/end").await,
        [msg("un/end", b"end", 1, false)]
    );
}

/// Retained messages: stored per topic, sent on subscribe with RETAIN 1 at
/// min(QoS) [MQTT-3.3.1-6], [MQTT-3.3.1-8]; live copies carry RETAIN 0
/// [MQTT-3.3.1-9]; an empty retained payload is delivered live and clears the
/// topic [MQTT-3.3.1-10], [MQTT-3.3.1-11]. Subscribers on both shards.
async fn retained_messages_set_deliver_and_clear<C: Client>() {
    let broker = Broker::start();
    let tag = C::TAG;
    let (mut publ, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("ret-{tag}-pub"), 0),
        true,
    )
    .await;
    // QoS 0 has no acknowledgement, so it goes first: the QoS 1/2 PUBACK /
    // PUBCOMP that follow wait until every shard applied their update, and
    // each shard applies updates from one shard in order. Published last, a
    // subscriber on the other shard could legitimately beat ret/c there.
    publ.publish("ret/c", 0, true, b"c0").await;
    publ.publish("ret/a", 1, true, b"v1").await;
    publ.publish("ret/b", 2, true, b"keep").await;

    // Other shard, wildcard filter: all three, RETAIN 1.
    let (mut remote, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("ret-{tag}-remote"), 1),
        true,
    )
    .await;
    assert_eq!(remote.subscribe("ret/#", 1).await, Some(1));
    let mut got = vec![
        remote.recv().await,
        remote.recv().await,
        remote.recv().await,
    ];
    got.sort();
    assert_eq!(
        got,
        [
            msg("ret/a", b"v1", 1, true),
            msg("ret/b", b"keep", 1, true),
            msg("ret/c", b"c0", 0, true)
        ]
    );

    // Same shard, exact filter, lower QoS.
    let (mut local, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("ret-{tag}-local"), 0),
        true,
    )
    .await;
    assert_eq!(local.subscribe("ret/a", 0).await, Some(0));
    assert_eq!(local.recv().await, msg("ret/a", b"v1", 0, true));

    // Live deliveries of retained publications carry RETAIN 0.
    publ.publish("ret/a", 1, true, b"v2").await;
    assert_eq!(remote.recv().await, msg("ret/a", b"v2", 1, false));
    assert_eq!(local.recv().await, msg("ret/a", b"v2", 0, false));
    publ.publish("ret/a", 1, true, b"").await;
    assert_eq!(remote.recv().await, msg("ret/a", b"", 1, false));
    assert_eq!(local.recv().await, msg("ret/a", b"", 0, false));

    // A new subscriber on the other shard no longer gets ret/a.
    let (mut late, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("ret-{tag}-late"), 1),
        true,
    )
    .await;
    assert_eq!(late.subscribe("ret/#", 2).await, Some(2));
    publ.publish("ret/end", 1, false, b"end").await;
    let mut got = late.recv_until("ret/end").await;
    got.sort();
    assert_eq!(
        got,
        [
            msg("ret/b", b"keep", 2, true),
            msg("ret/c", b"c0", 0, true),
            msg("ret/end", b"end", 1, false)
        ]
    );
}

/// The will is published when the connection drops without DISCONNECT
/// [MQTT-3.1.2-8], and discarded on a normal DISCONNECT [MQTT-3.1.2-10]. The
/// will client (raw socket, same protocol version) is on the other shard.
async fn will_is_published_on_abrupt_close_only<C: Client>() {
    let broker = Broker::start();
    let tag = C::TAG;
    let version = if tag == "v5" {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V3_1_1
    };
    let (mut sub, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("will-{tag}-sub"), 0),
        true,
    )
    .await;
    assert_eq!(sub.subscribe("will/#", 2).await, Some(2));

    // Abrupt close: the will arrives.
    let dropper = id_on_shard(&format!("will-{tag}-drop"), 1);
    let mut c = connect_packet(version, &dropper, true, 30);
    c.will = Some(will(&format!("will/{dropper}"), b"gone", QoS::AtLeastOnce));
    RawClient::connect_ok(broker.addr(), c).drop_connection();
    assert_eq!(
        sub.recv().await,
        msg(&format!("will/{dropper}"), b"gone", 1, false)
    );

    // Normal DISCONNECT: no will. The sentinel comes from the same client id,
    // so from the same shard: a will would have been routed before it.
    let polite = id_on_shard(&format!("will-{tag}-polite"), 1);
    let topic = format!("will/{polite}");
    let mut c = connect_packet(version, &polite, true, 30);
    c.will = Some(will(&topic, b"should not be sent", QoS::AtLeastOnce));
    let mut raw = RawClient::connect_ok(broker.addr(), c);
    raw.disconnect();
    raw.expect_closed(RECV_TIMEOUT);
    let mut raw = RawClient::connect_ok(broker.addr(), connect_packet(version, &polite, true, 30));
    raw.publish(&topic, b"sentinel", QoS::AtLeastOnce, 1);
    assert_eq!(sub.recv().await, msg(&topic, b"sentinel", 1, false));
}

/// A persistent session keeps its subscription while disconnected and queues
/// QoS 1 messages, delivered in order on reconnect with session present
/// ([MQTT-3.1.2-4], [MQTT-3.2.2-2], 4.6 ordering).
async fn persistent_session_keeps_subscriptions_and_queues_messages<C: Client>() {
    let broker = Broker::start();
    let tag = C::TAG;
    let sub_id = id_on_shard(&format!("persist-{tag}-sub"), 0);
    let (mut sub, present) = C::connect(broker.addr(), &sub_id, false).await;
    assert!(!present, "no session existed yet");
    assert_eq!(sub.subscribe("ps/t", 1).await, Some(1));
    sub.disconnect().await;

    let (mut publ, _) = C::connect(
        broker.addr(),
        &id_on_shard(&format!("persist-{tag}-pub"), 1),
        true,
    )
    .await;
    for k in 0..5 {
        publ.publish("ps/t", 1, false, format!("m{k}").as_bytes())
            .await;
    }

    let (mut sub, present) = C::connect(broker.addr(), &sub_id, false).await;
    assert!(present, "session present on reconnect");
    for k in 0..5 {
        assert_eq!(
            sub.recv().await,
            msg("ps/t", format!("m{k}").as_bytes(), 1, false),
            "message {k}"
        );
    }
    // The subscription itself survived too.
    publ.publish("ps/t", 1, false, b"live").await;
    assert_eq!(sub.recv().await, msg("ps/t", b"live", 1, false));
}

/// A second connection with the same client id takes the session over; a v5
/// first connection is told why with DISCONNECT 0x8E [MQTT-3.1.4-3].
///
/// The first client is a raw socket so the test sees the exact packet; the
/// second part checks that rumqttc reads the reason too (it cannot parse the
/// short `E0 01 8E` form that MQTT 5 section 3.14.2.2.1 allows, so the broker
/// always writes the Property Length: `E0 02 8E 00`).
#[tokio::test]
async fn takeover_disconnects_the_first_v5_client_with_0x8e() {
    let broker = Broker::start();
    let id = "takeover-v5";
    let v5 = ProtocolVersion::V5;
    let mut first = RawClient::connect_ok(broker.addr(), connect_packet(v5, id, true, 30));
    assert_eq!(
        first.subscribe(1, &[("to/t", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    let (mut second, present) = <V5 as Client>::connect(broker.addr(), id, true).await;
    assert!(!present, "clean start discards the old session");
    first.expect_disconnect_then_close(ReasonCode::SessionTakenOver);
    // The new connection works, with a fresh session.
    assert_eq!(second.subscribe("to/t", 1).await, Some(1));
    second.publish("to/t", 1, false, b"mine").await;
    assert_eq!(second.recv().await, msg("to/t", b"mine", 1, false));

    // A rumqttc v5 client taken over (by a raw one) loses its connection.
    let (mut old, _) = <V5 as Client>::connect(broker.addr(), "takeover-v5-rumqttc", true).await;
    let _new = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v5, "takeover-v5-rumqttc", true, 30),
    );
    match old.next_error().await {
        rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
            reason_code,
            ..
        }) => assert_eq!(reason_code, p5::DisconnectReasonCode::SessionTakenOver),
        other => panic!("expected the takeover to end the connection, got {other:?}"),
    }
}

/// 3.1.1 has no server DISCONNECT: the first connection is just closed
/// [MQTT-3.1.4-2].
#[tokio::test]
async fn takeover_closes_the_first_v311_client() {
    let broker = Broker::start();
    let id = "takeover-v311";
    let (mut first, _) = <V311 as Client>::connect(broker.addr(), id, true).await;
    let (mut second, _) = <V311 as Client>::connect(broker.addr(), id, true).await;
    let err = first.next_error().await;
    assert!(
        matches!(
            err,
            rumqttc::ConnectionError::Io(_) | rumqttc::ConnectionError::MqttState(_)
        ),
        "expected the connection to close, got {err:?}"
    );
    assert_eq!(second.subscribe("to/t", 1).await, Some(1));
}

/// MQTT 5: an empty client id gets an Assigned Client Identifier in CONNACK
/// [MQTT-3.1.3-7]; the assigned id is usable.
#[tokio::test]
async fn v5_empty_client_id_gets_an_assigned_identifier() {
    let broker = Broker::start();
    let (mut c, ack) = V5::connect_with("(empty)", V5::options(broker.addr(), "")).await;
    assert_eq!(ack.code, p5::ConnectReturnCode::Success);
    let assigned = ack
        .properties
        .as_ref()
        .and_then(|p| p.assigned_client_identifier.clone());
    let assigned = assigned.expect("CONNACK carries an Assigned Client Identifier");
    assert!(!assigned.is_empty());
    assert_eq!(c.subscribe("assigned/t", 1).await, Some(1));
    c.publish("assigned/t", 1, false, b"hi").await;
    assert_eq!(c.recv().await, msg("assigned/t", b"hi", 1, false));

    // Two empty-id clients get different identifiers.
    let (_, ack2) = V5::connect_with("(empty 2)", V5::options(broker.addr(), "")).await;
    let assigned2 = ack2
        .properties
        .and_then(|p| p.assigned_client_identifier)
        .expect("assigned id");
    assert_ne!(assigned, assigned2);
}

/// MQTT 3.1.1: an empty client id needs Clean Session 1; with 0 the CONNACK
/// return code is 0x02 and the connection closes [MQTT-3.1.3-8]. With 1 it is
/// accepted [MQTT-3.1.3-6].
#[test]
fn v311_empty_client_id_needs_clean_session() {
    let broker = Broker::start();
    let v = ProtocolVersion::V3_1_1;
    let (mut c, ack) = RawClient::connect(broker.addr(), connect_packet(v, "", false, 30));
    assert_eq!(
        ack.reason_code,
        ReasonCode::ClientIdentifierNotValid,
        "{ack:?}"
    );
    assert!(!ack.session_present);
    c.expect_closed(RECV_TIMEOUT);

    let (mut c, ack) = RawClient::connect(broker.addr(), connect_packet(v, "", true, 30));
    assert_eq!(ack.reason_code, ReasonCode::Success, "{ack:?}");
    assert_eq!(
        c.subscribe(1, &[("empty/t", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
}

/// Seconds the broker took to close a silent connection with keep alive 1 s:
/// [MQTT-3.1.2-24] allows 1.5 times the keep alive before closing. Also
/// asserts what (if anything) is sent first.
fn silent_connection_close_time(
    version: ProtocolVersion,
    id: &str,
    expect: Option<ReasonCode>,
) -> Duration {
    let broker = Broker::start();
    let mut c = RawClient::connect_ok(broker.addr(), connect_packet(version, id, true, 1));
    let start = Instant::now();
    if let Some(reason) = expect {
        c.expect_disconnect_then_close(reason);
    } else {
        c.expect_closed(Duration::from_secs(4));
    }
    start.elapsed()
}

#[test]
fn keep_alive_timeout_closes_a_silent_v311_connection() {
    let took = silent_connection_close_time(ProtocolVersion::V3_1_1, "keepalive-v311", None);
    assert!(
        took >= Duration::from_millis(1400) && took <= Duration::from_secs(3),
        "closed after {took:?}"
    );
}

#[test]
fn keep_alive_timeout_disconnects_a_silent_v5_connection_with_0x8d() {
    let took = silent_connection_close_time(
        ProtocolVersion::V5,
        "keepalive-v5",
        Some(ReasonCode::KeepAliveTimeout),
    );
    assert!(
        took >= Duration::from_millis(1400) && took <= Duration::from_secs(3),
        "closed after {took:?}"
    );
}

/// PINGREQ within the keep alive keeps the connection open [MQTT-3.12.4-1].
#[test]
fn pings_keep_a_connection_alive() {
    let broker = Broker::start();
    let v = ProtocolVersion::V3_1_1;
    let mut c = RawClient::connect_ok(broker.addr(), connect_packet(v, "keepalive-ping", true, 1));
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        std::thread::sleep(Duration::from_millis(500));
        c.send(&Packet::PingReq);
        assert_eq!(c.recv(), Packet::PingResp);
    }
}

/// SIGTERM: v5 clients get DISCONNECT Server shutting down (0x8B), 3.1.1
/// clients the close, and the broker exits 0 within a few seconds.
#[test]
fn sigterm_disconnects_clients_and_exits_zero() {
    let mut broker = Broker::start();
    let v5_id = id_on_shard("shutdown-v5", 0);
    let v311_id = id_on_shard("shutdown-v311", 1);
    assert_ne!(shard_of(&v5_id), shard_of(&v311_id));
    let mut v5 = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V5, &v5_id, true, 30),
    );
    let mut v311 = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, &v311_id, true, 30),
    );
    let start = Instant::now();
    broker.sigterm();
    v5.expect_disconnect_then_close(ReasonCode::ServerShuttingDown);
    v311.expect_closed(RECV_TIMEOUT);
    let status = broker.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        start.elapsed()
    );
}

/// The PUBLISH a raw client receives next, not acknowledged.
fn recv_publish_unacked(c: &mut RawClient) -> tessera_proto::Publish {
    match c.recv() {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// A QoS 1 delivery left unacknowledged is sent again, with DUP 1 and the
/// same packet id, when the persistent session resumes [MQTT-4.4.0-1],
/// [MQTT-3.3.1-1]: after an abrupt close (3.1.1) and after a takeover (5.0).
#[test]
fn unacknowledged_delivery_is_resent_with_dup_when_the_session_resumes() {
    let broker = Broker::start();
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        let tag = if version.is_v5() { "v5" } else { "v311" };
        let topic = format!("dup/{tag}");
        let sub_id = id_on_shard(&format!("dup-{tag}-sub"), 0);
        let persistent = || {
            let mut c = connect_packet(version, &sub_id, false, 30);
            c.properties.session_expiry_interval = version.is_v5().then_some(60);
            c
        };
        let mut sub = RawClient::connect_ok(broker.addr(), persistent());
        assert_eq!(
            sub.subscribe(1, &[(&topic, QoS::AtLeastOnce)]),
            [ReasonCode::GrantedQoS1]
        );
        let mut publ = RawClient::connect_ok(
            broker.addr(),
            connect_packet(
                version,
                &id_on_shard(&format!("dup-{tag}-pub"), 1),
                true,
                30,
            ),
        );
        publ.publish(&topic, b"m1", QoS::AtLeastOnce, 1);
        let first = recv_publish_unacked(&mut sub);
        assert_eq!(
            (&first.payload[..], first.dup, first.qos),
            (&b"m1"[..], false, QoS::AtLeastOnce)
        );

        let (mut sub2, ack) = if version.is_v5() {
            // Takeover while the first connection is still open.
            let r = RawClient::connect(broker.addr(), persistent());
            sub.expect_disconnect_then_close(ReasonCode::SessionTakenOver);
            r
        } else {
            sub.drop_connection();
            RawClient::connect(broker.addr(), persistent())
        };
        assert_eq!(ack.reason_code, ReasonCode::Success);
        assert!(ack.session_present, "{tag}: session present");
        let again = recv_publish_unacked(&mut sub2);
        assert_eq!(again.packet_id, first.packet_id, "{tag}: same packet id");
        assert!(again.dup, "{tag}: DUP set on the re-delivery");
        assert_eq!(&again.payload[..], b"m1");
        sub2.send(&Packet::PubAck(tessera_proto::PubAck::new(again.packet_id)));
        // Acknowledged now: the next delivery is the next message, not m1 again.
        publ.publish(&topic, b"m2", QoS::AtLeastOnce, 2);
        let next = sub2.recv_publish();
        assert_eq!((&next.payload[..], next.dup), (&b"m2"[..], false), "{tag}");
    }
}

/// A QoS 2 PUBLISH sent again before PUBREL (same packet id, DUP 1) is
/// acknowledged again but delivered once [MQTT-4.3.3-2] (method B).
#[test]
fn qos2_publish_resent_before_pubrel_is_delivered_once() {
    let broker = Broker::start();
    let v = ProtocolVersion::V3_1_1;
    let mut sub = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard("once-sub", 0), true, 30),
    );
    assert_eq!(
        sub.subscribe(1, &[("once/t", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard("once-pub", 1), true, 30),
    );
    publ.send(&common::publish_packet(
        "once/t",
        b"exactly once",
        QoS::ExactlyOnce,
        9,
        false,
    ));
    assert_eq!(publ.recv(), Packet::PubRec(tessera_proto::PubRec::new(9)));
    let mut again = common::publish_packet("once/t", b"exactly once", QoS::ExactlyOnce, 9, false);
    if let Packet::Publish(p) = &mut again {
        p.dup = true;
    }
    publ.send(&again);
    assert_eq!(publ.recv(), Packet::PubRec(tessera_proto::PubRec::new(9)));
    publ.send(&Packet::PubRel(tessera_proto::PubRel::new(9)));
    assert_eq!(publ.recv(), Packet::PubComp(tessera_proto::PubComp::new(9)));
    publ.publish("once/t", b"sentinel", QoS::AtLeastOnce, 10);
    assert_eq!(&sub.recv_publish().payload[..], b"exactly once");
    assert_eq!(&sub.recv_publish().payload[..], b"sentinel");
}

/// Many QoS 1 messages from one publisher reach a subscriber on the other
/// shard complete and in order (ordered topic, MQTT 3.1.1 section 4.6),
/// through the in-flight window and the session queue.
#[test]
fn many_messages_across_shards_arrive_in_order() {
    const COUNT: u16 = 500;
    let broker = Broker::start();
    let v = ProtocolVersion::V3_1_1;
    let mut sub = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard("order-sub", 1), true, 30),
    );
    assert_eq!(
        sub.subscribe(1, &[("order/t", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard("order-pub", 0), true, 30),
    );
    // Pipelined: every PUBLISH first, then the PUBACKs.
    for k in 1..=COUNT {
        publ.send(&common::publish_packet(
            "order/t",
            format!("{k}").as_bytes(),
            QoS::AtLeastOnce,
            k,
            false,
        ));
    }
    for k in 1..=COUNT {
        assert_eq!(publ.recv(), Packet::PubAck(tessera_proto::PubAck::new(k)));
    }
    for k in 1..=COUNT {
        let p = sub.recv_publish();
        assert_eq!(std::str::from_utf8(&p.payload).unwrap(), k.to_string());
    }
}

/// MQTT 5 flow control: the broker never has more unacknowledged QoS 1
/// deliveries outstanding than the client's Receive Maximum [MQTT-3.3.4-9].
#[test]
fn v5_receive_maximum_limits_unacknowledged_deliveries() {
    let broker = Broker::start();
    let v5 = ProtocolVersion::V5;
    let mut c = connect_packet(v5, &id_on_shard("recvmax-sub", 0), true, 30);
    c.properties.receive_maximum = Some(2);
    let mut sub = RawClient::connect_ok(broker.addr(), c);
    assert_eq!(
        sub.subscribe(1, &[("rm/t", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v5, &id_on_shard("recvmax-pub", 1), true, 30),
    );
    for k in 0..5u16 {
        publ.publish("rm/t", format!("m{k}").as_bytes(), QoS::AtLeastOnce, k + 1);
    }
    let mut window: VecDeque<tessera_proto::Publish> = VecDeque::new();
    window.push_back(recv_publish_unacked(&mut sub));
    window.push_back(recv_publish_unacked(&mut sub));
    let mut received = 2;
    while let Some(oldest) = window.pop_front() {
        // With the window full, nothing more may come.
        if window.len() == 1 {
            match sub.try_recv(Duration::from_millis(300)) {
                Err(common::Closed::Timeout) => {}
                other => panic!("a third unacknowledged delivery: {other:?}"),
            }
        }
        sub.send(&Packet::PubAck(tessera_proto::PubAck::new(
            oldest.packet_id,
        )));
        if received < 5 {
            window.push_back(recv_publish_unacked(&mut sub));
            received += 1;
        }
    }
    assert_eq!(received, 5);
}

/// MQTT 5 topic aliases: an alias set with a topic then used with an empty
/// topic stands for that topic (section 3.3.2.3.4); subscribers see the topic.
#[test]
fn v5_topic_alias_stands_for_its_topic() {
    let broker = Broker::start();
    let v5 = ProtocolVersion::V5;
    let mut sub = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v5, &id_on_shard("alias-sub", 1), true, 30),
    );
    assert_eq!(
        sub.subscribe(1, &[("alias/t", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v5, &id_on_shard("alias-pub", 0), true, 30),
    );
    for (k, topic) in [(1u16, "alias/t"), (2, ""), (3, "")] {
        let mut p = common::publish_packet(
            topic,
            format!("m{k}").as_bytes(),
            QoS::AtLeastOnce,
            k,
            false,
        );
        if let Packet::Publish(p) = &mut p {
            p.properties.topic_alias = Some(7);
        }
        publ.send(&p);
        assert_eq!(publ.recv(), Packet::PubAck(tessera_proto::PubAck::new(k)));
    }
    for k in 1..=3 {
        let p = sub.recv_publish();
        assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            ("alias/t", format!("m{k}").as_bytes())
        );
        assert_eq!(
            p.properties.topic_alias, None,
            "the subscriber announced no Topic Alias Maximum"
        );
    }
}

/// A bad filter in SUBSCRIBE fails that filter only (3.1.1 return code 0x80,
/// 5.0 Topic Filter invalid 0x8F) and the connection stays usable
/// (3.1.1 section 3.9.3); `#` must be last [MQTT-4.7.1-2] and `+` a whole
/// level [MQTT-4.7.1-3].
#[test]
fn invalid_filters_are_refused_one_by_one() {
    let broker = Broker::start();
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        let tag = if version.is_v5() { "v5" } else { "v311" };
        let bad = if version.is_v5() {
            ReasonCode::TopicFilterInvalid
        } else {
            ReasonCode::UnspecifiedError
        };
        let mut c = RawClient::connect_ok(
            broker.addr(),
            connect_packet(version, &format!("filters-{tag}"), true, 30),
        );
        let codes = c.subscribe(
            3,
            &[
                ("ok/t", QoS::AtLeastOnce),
                ("a/#/b", QoS::AtLeastOnce),
                ("a+/b", QoS::AtMostOnce),
                ("ok/#", QoS::ExactlyOnce),
            ],
        );
        assert_eq!(
            codes,
            [ReasonCode::GrantedQoS1, bad, bad, ReasonCode::GrantedQoS2],
            "{tag}"
        );
        c.publish("ok/t", b"still connected", QoS::AtLeastOnce, 4);
        let p = c.recv_publish();
        assert_eq!(
            (&p.payload[..], p.qos),
            (&b"still connected"[..], QoS::AtLeastOnce),
            "{tag}"
        );
    }
}

/// MQTT 5: without a Session Expiry Interval the session ends with the
/// connection, even with Clean Start 0 (section 3.1.2.11.2), so the next
/// CONNACK has Session Present 0.
#[test]
fn v5_session_without_expiry_ends_with_the_connection() {
    let broker = Broker::start();
    let v5 = ProtocolVersion::V5;
    let mut c = RawClient::connect_ok(broker.addr(), connect_packet(v5, "no-expiry", false, 30));
    assert_eq!(
        c.subscribe(1, &[("ne/t", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    c.disconnect();
    c.expect_closed(RECV_TIMEOUT);
    let (_c, ack) = RawClient::connect(broker.addr(), connect_packet(v5, "no-expiry", false, 30));
    assert_eq!(ack.reason_code, ReasonCode::Success);
    assert!(!ack.session_present, "the session ended at the close");
}

/// CONNECT and the packets after it in one write: the bytes read with the
/// CONNECT travel with the connection when it is handed to its owner shard.
#[test]
fn packets_sent_with_connect_survive_the_hand_off() {
    use tessera_proto::{Encode, PacketType};
    let broker = Broker::start();
    for shard in [0, 1] {
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let id = id_on_shard(&format!("burst-{}", version.level()), shard);
            let topic = format!("burst/{id}");
            let mut bytes = bytes::BytesMut::new();
            for p in [
                Packet::Connect(Box::new(connect_packet(version, &id, true, 30))),
                common::subscribe_packet(1, &[(&topic, QoS::AtLeastOnce)]),
                common::publish_packet(&topic, b"first", QoS::AtLeastOnce, 2, false),
                Packet::PingReq,
            ] {
                p.encode(version, &mut bytes).expect("encode");
            }
            let mut c = RawClient::open(broker.addr(), version);
            c.send_bytes(&bytes);
            assert!(
                matches!(c.recv(), Packet::ConnAck(a) if a.reason_code == ReasonCode::Success),
                "{id}"
            );
            // The server may send matching PUBLISH packets before the SUBACK
            // (3.1.1 section 3.8.4), so only the set of replies is fixed.
            let mut got: Vec<PacketType> = (0..4).map(|_| c.recv().packet_type()).collect();
            got.sort_by_key(|t| *t as u8);
            let expected = [
                PacketType::Publish,
                PacketType::PubAck,
                PacketType::SubAck,
                PacketType::PingResp,
            ];
            assert_eq!(got, expected, "{id} (shard {shard}, {version})");
        }
    }
}

/// A v5 SUBSCRIBE with options and a Subscription Identifier.
fn subscribe_v5(
    c: &mut RawClient,
    packet_id: u16,
    filter: &str,
    options: tessera_proto::SubscriptionOptions,
    id: Option<u32>,
) -> ReasonCode {
    let mut sub = tessera_proto::Subscribe {
        packet_id,
        properties: Default::default(),
        subscriptions: vec![tessera_proto::Subscription {
            filter: common::s(filter),
            options,
        }],
    };
    sub.properties.subscription_identifier = id;
    c.send(&Packet::Subscribe(sub));
    match c.recv() {
        Packet::SubAck(a) => a.reason_codes[0],
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// MQTT 5 subscription options (section 3.8.3.1) and identifiers (3.8.2.1.2):
/// No Local [MQTT-3.8.3-3], Retain As Published [MQTT-3.3.1-12/13], Retain
/// Handling 1 and 2 [MQTT-3.3.1-10/11], and the Subscription Identifier on
/// every delivery [MQTT-3.3.4-3].
#[test]
fn v5_subscription_options_are_honoured() {
    use tessera_proto::{RetainHandling, SubscriptionOptions};
    let broker = Broker::start();
    let v5 = ProtocolVersion::V5;
    let mut me = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v5, &id_on_shard("opts-me", 0), true, 30),
    );
    let mut other = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v5, &id_on_shard("opts-other", 1), true, 30),
    );
    other.send(&common::publish_packet(
        "opts/r",
        b"retained",
        QoS::AtLeastOnce,
        1,
        true,
    ));
    assert_eq!(other.recv(), Packet::PubAck(tessera_proto::PubAck::new(1)));

    // No Local + Subscription Identifier 7.
    let mut no_local = SubscriptionOptions::qos(QoS::AtLeastOnce);
    no_local.no_local = true;
    assert_eq!(
        subscribe_v5(&mut me, 1, "opts/nl", no_local, Some(7)),
        ReasonCode::GrantedQoS1
    );
    me.publish("opts/nl", b"mine", QoS::AtLeastOnce, 2);
    other.publish("opts/nl", b"theirs", QoS::AtLeastOnce, 2);
    let p = me.recv_publish();
    assert_eq!(
        &p.payload[..],
        b"theirs",
        "own message not delivered with No Local"
    );
    assert_eq!(p.properties.subscription_identifiers, [7]);

    // Retain As Published: the live copy keeps RETAIN 1; the retained copy
    // sent at subscribe has RETAIN 1 in any case.
    let mut rap = SubscriptionOptions::qos(QoS::AtLeastOnce);
    rap.retain_as_published = true;
    assert_eq!(
        subscribe_v5(&mut me, 3, "opts/r", rap, None),
        ReasonCode::GrantedQoS1
    );
    let p = me.recv_publish();
    assert_eq!((&p.payload[..], p.retain), (&b"retained"[..], true));
    assert!(
        p.properties.subscription_identifiers.is_empty(),
        "no identifier on this subscription"
    );
    other.publish_retained("opts/r", b"live", 3);
    let p = me.recv_publish();
    assert_eq!(
        (&p.payload[..], p.retain),
        (&b"live"[..], true),
        "Retain As Published"
    );

    // Retain Handling 1: retained messages only for a new subscription.
    let mut if_new = SubscriptionOptions::qos(QoS::AtLeastOnce);
    if_new.retain_handling = RetainHandling::SendIfNew;
    assert_eq!(
        subscribe_v5(&mut me, 4, "opts/#", if_new, None),
        ReasonCode::GrantedQoS1
    );
    assert_eq!(
        &me.recv_publish().payload[..],
        b"live",
        "new subscription: retained sent"
    );
    assert_eq!(
        subscribe_v5(&mut me, 5, "opts/#", if_new, None),
        ReasonCode::GrantedQoS1
    );
    // Retain Handling 2: never.
    let mut never = SubscriptionOptions::qos(QoS::AtLeastOnce);
    never.retain_handling = RetainHandling::DoNotSend;
    assert_eq!(
        subscribe_v5(&mut me, 6, "opts/+", never, None),
        ReasonCode::GrantedQoS1
    );
    // Neither re-subscription sent a retained copy: the next delivery is live.
    other.publish("opts/end", b"end", QoS::AtLeastOnce, 4);
    let p = me.recv_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("opts/end", &b"end"[..])
    );
}

/// MQTT 5 Message Expiry (section 3.3.2.3.3): a retained message is not sent
/// once expired [MQTT-3.3.2-5], and a live one carries its remaining lifetime
/// [MQTT-3.3.2-6].
#[test]
fn v5_message_expiry_is_enforced_and_forwarded() {
    let broker = Broker::start();
    let v5 = ProtocolVersion::V5;
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v5, &id_on_shard("exp-pub", 0), true, 30),
    );
    for (k, topic, expiry) in [(1u16, "exp/short", 1u32), (2, "exp/long", 100)] {
        let mut p = common::publish_packet(topic, topic.as_bytes(), QoS::AtLeastOnce, k, true);
        if let Packet::Publish(p) = &mut p {
            p.properties.message_expiry_interval = Some(expiry);
        }
        publ.send(&p);
        assert_eq!(publ.recv(), Packet::PubAck(tessera_proto::PubAck::new(k)));
    }
    std::thread::sleep(Duration::from_millis(2100));
    let mut sub = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v5, &id_on_shard("exp-sub", 1), true, 30),
    );
    assert_eq!(
        sub.subscribe(1, &[("exp/#", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    let p = sub.recv_publish();
    assert_eq!(
        p.topic.as_str(),
        "exp/long",
        "the expired retained message is gone"
    );
    let left = p
        .properties
        .message_expiry_interval
        .expect("remaining lifetime forwarded");
    assert!(
        (97..=98).contains(&left),
        "100 s minus the ~2.1 s it waited: {left}"
    );
    publ.publish("exp/end", b"end", QoS::AtLeastOnce, 3);
    assert_eq!(sub.recv_publish().topic.as_str(), "exp/end");
}

/// MQTT 5 Server Keep Alive [MQTT-3.2.2-21]: a keep alive over the broker's
/// maximum is replaced by the maximum in CONNACK, and enforced.
#[test]
fn v5_server_keep_alive_caps_the_keep_alive_and_is_enforced() {
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__MAX_KEEP_ALIVE_S", "1")]);
    let (mut c, ack) = RawClient::connect(
        broker.addr(),
        connect_packet(ProtocolVersion::V5, "server-ka", true, 60),
    );
    assert_eq!(ack.reason_code, ReasonCode::Success);
    assert_eq!(ack.properties.server_keep_alive, Some(1));
    let start = Instant::now();
    c.expect_disconnect_then_close(ReasonCode::KeepAliveTimeout);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took <= Duration::from_secs(3),
        "closed after {took:?}"
    );
}

/// A will with the RETAIN flag is stored as a retained message [MQTT-3.1.2-17].
#[test]
fn retained_will_is_stored() {
    let broker = Broker::start();
    let v = ProtocolVersion::V3_1_1;
    // A live subscriber on shard 1 tells when the will was published; shard 1
    // updates its retained replica before it delivers, so a later subscriber
    // on shard 1 must find the retained copy.
    let mut live = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard("rwill-live", 1), true, 30),
    );
    assert_eq!(
        live.subscribe(1, &[("rwill/#", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    let mut c = connect_packet(v, &id_on_shard("rwill", 0), true, 30);
    let mut w = will("rwill/status", b"offline", QoS::AtLeastOnce);
    w.retain = true;
    c.will = Some(w);
    RawClient::connect_ok(broker.addr(), c).drop_connection();
    let p = live.recv_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain),
        ("rwill/status", &b"offline"[..], false)
    );

    let mut late = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard("rwill-late", 1), true, 30),
    );
    assert_eq!(
        late.subscribe(1, &[("rwill/#", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    let p = late.recv_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain),
        ("rwill/status", &b"offline"[..], true)
    );
}

/// Packets split at every byte (TCP is a byte stream) are reassembled:
/// CONNECT, SUBSCRIBE and PUBLISH sent one byte per write.
#[test]
fn packets_split_into_single_bytes_are_reassembled() {
    use tessera_proto::Encode;
    let broker = Broker::start();
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        let id = format!("bytewise-{}", version.level());
        let topic = format!("bytewise/{id}");
        let mut c = RawClient::open(broker.addr(), version);
        let send_slowly = |c: &mut RawClient, p: Packet| {
            let mut bytes = bytes::BytesMut::new();
            p.encode(version, &mut bytes).expect("encode");
            for b in bytes.iter() {
                c.send_bytes(&[*b]);
                std::thread::sleep(Duration::from_micros(200));
            }
        };
        send_slowly(
            &mut c,
            Packet::Connect(Box::new(connect_packet(version, &id, true, 30))),
        );
        assert!(matches!(c.recv(), Packet::ConnAck(a) if a.reason_code == ReasonCode::Success));
        send_slowly(
            &mut c,
            common::subscribe_packet(1, &[(&topic, QoS::AtLeastOnce)]),
        );
        assert!(matches!(c.recv(), Packet::SubAck(_)));
        send_slowly(
            &mut c,
            common::publish_packet(&topic, b"slow", QoS::AtMostOnce, 0, false),
        );
        assert_eq!(&c.recv_publish().payload[..], b"slow");
    }
}

/// `limits.max_connections` is shared out per shard (2 -> 1 per shard); a
/// connection over it is refused in the client's version (3.1.1 return code
/// 0x03 Server unavailable, 5.0 0x89 Server busy) and the slot is given back
/// when the connection ends.
#[test]
fn connection_limit_refuses_and_releases() {
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__MAX_CONNECTIONS", "2")]);
    let v4 = ProtocolVersion::V3_1_1;
    let v5 = ProtocolVersion::V5;
    let mut holder = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v4, &id_on_shard("limit-a", 0), true, 30),
    );
    for (version, refusal) in [
        (v4, ReasonCode::ServerUnavailable),
        (v5, ReasonCode::ServerBusy),
    ] {
        let (mut c, ack) = RawClient::connect(
            broker.addr(),
            connect_packet(version, &id_on_shard("limit-b", 0), true, 30),
        );
        assert_eq!(ack.reason_code, refusal, "{version}");
        c.expect_closed(RECV_TIMEOUT);
    }
    // The other shard has its own slot.
    let _other = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v5, &id_on_shard("limit-c", 1), true, 30),
    );
    // Once the holder leaves, its slot is free again (released asynchronously).
    holder.disconnect();
    holder.expect_closed(RECV_TIMEOUT);
    let deadline = Instant::now() + RECV_TIMEOUT;
    loop {
        let (_c, ack) = RawClient::connect(
            broker.addr(),
            connect_packet(v4, &id_on_shard("limit-d", 0), true, 30),
        );
        if ack.reason_code == ReasonCode::Success {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot was never released: {ack:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A v5 CONNECT with a session that outlives the connection by
/// `session_expiry_s` and a QoS 1 will on `will/<id>` delayed by `delay_s`.
fn v5_connect_with_delayed_will(
    id: &str,
    clean: bool,
    session_expiry_s: u32,
    delay_s: u32,
) -> tessera_proto::Connect {
    let mut c = connect_packet(ProtocolVersion::V5, id, clean, 30);
    c.properties.session_expiry_interval = Some(session_expiry_s);
    let mut w = will(&format!("will/{id}"), b"gone", QoS::AtLeastOnce);
    w.properties.will_delay_interval = Some(delay_s);
    c.will = Some(w);
    c
}

/// A raw v3.1.1 subscriber to `will/#` on shard 0.
fn will_watcher(broker: &Broker, tag: &str) -> RawClient {
    let v = ProtocolVersion::V3_1_1;
    let mut sub = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard(tag, 0), true, 30),
    );
    assert_eq!(
        sub.subscribe(1, &[("will/#", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    sub
}

/// MQTT 5 Will Delay Interval: the will is published once the delay has
/// passed [MQTT-3.1.3-9], or when the session ends if that comes first
/// (section 3.1.3.2.2), not at the close.
#[test]
fn v5_will_waits_for_the_will_delay_or_the_session_end() {
    let broker = Broker::start();
    let mut sub = will_watcher(&broker, "wdelay-sub");
    // (client, session expiry, will delay): published after ~1 s either way.
    for (tag, expiry, delay) in [("wdelay-delay", 60, 1), ("wdelay-expiry", 1, 30)] {
        let id = id_on_shard(tag, 1);
        let c = RawClient::connect_ok(
            broker.addr(),
            v5_connect_with_delayed_will(&id, true, expiry, delay),
        );
        c.drop_connection();
        let start = Instant::now();
        match sub.try_recv(Duration::from_millis(500)) {
            Err(common::Closed::Timeout) => {}
            other => panic!("{tag}: the will came before its delay: {other:?}"),
        }
        let p = sub.recv_publish();
        assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            (format!("will/{id}").as_str(), &b"gone"[..]),
            "{tag}"
        );
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took <= Duration::from_secs(3),
            "{tag}: after {took:?}"
        );
    }
}

/// MQTT 5: reconnecting to the session (Clean Start 0) within the Will Delay
/// Interval cancels the will [MQTT-3.1.3-9]; reconnecting with Clean Start 1
/// ends the session, which publishes it (section 3.1.3.2.2).
#[test]
fn v5_reconnect_within_the_will_delay_cancels_the_will() {
    let broker = Broker::start();
    let mut sub = will_watcher(&broker, "wcancel-sub");

    let id = id_on_shard("wcancel-resume", 1);
    let topic = format!("will/{id}");
    RawClient::connect_ok(
        broker.addr(),
        v5_connect_with_delayed_will(&id, true, 60, 5),
    )
    .drop_connection();
    let mut resumed = connect_packet(ProtocolVersion::V5, &id, false, 30);
    resumed.properties.session_expiry_interval = Some(60);
    let (mut c, ack) = RawClient::connect(broker.addr(), resumed);
    assert!(ack.session_present);
    c.publish(&topic, b"sentinel", QoS::AtLeastOnce, 1);
    let p = sub.recv_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        (topic.as_str(), &b"sentinel"[..]),
        "will cancelled"
    );

    let id = id_on_shard("wcancel-clean", 1);
    let topic = format!("will/{id}");
    RawClient::connect_ok(
        broker.addr(),
        v5_connect_with_delayed_will(&id, true, 60, 5),
    )
    .drop_connection();
    let mut c = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V5, &id, true, 30),
    );
    c.publish(&topic, b"sentinel", QoS::AtLeastOnce, 1);
    let p = sub.recv_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        (topic.as_str(), &b"gone"[..]),
        "session ended: will sent"
    );
    let p = sub.recv_publish();
    assert_eq!(&p.payload[..], b"sentinel");
}

/// MQTT 5 DISCONNECT with reason 0x04 asks for the will to be published
/// (section 3.14.2.1).
#[test]
fn v5_disconnect_with_will_message_publishes_the_will() {
    let broker = Broker::start();
    let mut sub = will_watcher(&broker, "w04-sub");
    let id = id_on_shard("w04", 1);
    let mut c = connect_packet(ProtocolVersion::V5, &id, true, 30);
    c.will = Some(will(&format!("will/{id}"), b"asked for", QoS::AtLeastOnce));
    let mut c = RawClient::connect_ok(broker.addr(), c);
    c.send(&Packet::Disconnect(tessera_proto::Disconnect::new(
        ReasonCode::DisconnectWithWillMessage,
    )));
    c.expect_closed(RECV_TIMEOUT);
    assert_eq!(&sub.recv_publish().payload[..], b"asked for");
}

/// MQTT 5 Session Expiry Interval: a session is kept while disconnected for
/// its interval, then discarded (section 3.1.2.11.2).
#[test]
fn v5_session_expires_after_its_interval() {
    let broker = Broker::start();
    let v5 = ProtocolVersion::V5;
    let persistent = |id: &str, expiry: u32| {
        let mut c = connect_packet(v5, id, false, 30);
        c.properties.session_expiry_interval = Some(expiry);
        c
    };
    for id in ["expiry-a", "expiry-b"] {
        let mut c = RawClient::connect_ok(broker.addr(), persistent(id, 1));
        c.disconnect();
        c.expect_closed(RECV_TIMEOUT);
    }
    let (_a, ack) = RawClient::connect(broker.addr(), persistent("expiry-a", 1));
    assert!(ack.session_present, "reconnected within the interval");
    std::thread::sleep(Duration::from_millis(1600));
    let (_b, ack) = RawClient::connect(broker.addr(), persistent("expiry-b", 1));
    assert!(!ack.session_present, "the session expired");
}

/// QoS 2 state survives a reconnect of a persistent session ([MQTT-4.4.0-1],
/// 4.3.3): outbound, a delivery whose PUBREC was answered is resumed with
/// PUBREL, not a new PUBLISH; inbound, a PUBLISH sent again after PUBREC is
/// acknowledged but not delivered twice.
#[test]
fn qos2_exchanges_resume_after_reconnect() {
    let broker = Broker::start();
    let v = ProtocolVersion::V3_1_1;
    let sub_id = id_on_shard("qos2-resume-sub", 0);
    let pub_id = id_on_shard("qos2-resume-pub", 1);

    // Outbound: PUBLISH, PUBREC, PUBREL seen, then the connection drops.
    let mut sub = RawClient::connect_ok(broker.addr(), connect_packet(v, &sub_id, false, 30));
    assert_eq!(
        sub.subscribe(1, &[("q2/#", QoS::ExactlyOnce)]),
        [ReasonCode::GrantedQoS2]
    );
    let mut publ = RawClient::connect_ok(broker.addr(), connect_packet(v, &pub_id, false, 30));
    publ.publish("q2/out", b"out", QoS::ExactlyOnce, 1);
    let p = recv_publish_unacked(&mut sub);
    assert_eq!((&p.payload[..], p.qos), (&b"out"[..], QoS::ExactlyOnce));
    sub.send(&Packet::PubRec(tessera_proto::PubRec::new(p.packet_id)));
    assert_eq!(
        sub.recv(),
        Packet::PubRel(tessera_proto::PubRel::new(p.packet_id))
    );
    sub.drop_connection();
    let (mut sub, ack) = RawClient::connect(broker.addr(), connect_packet(v, &sub_id, false, 30));
    assert!(ack.session_present);
    assert_eq!(
        sub.recv(),
        Packet::PubRel(tessera_proto::PubRel::new(p.packet_id)),
        "PUBREL re-sent"
    );
    sub.send(&Packet::PubComp(tessera_proto::PubComp::new(p.packet_id)));

    // Inbound: PUBLISH, PUBREC, then the publisher's connection drops.
    publ.send(&common::publish_packet(
        "q2/in",
        b"in",
        QoS::ExactlyOnce,
        7,
        false,
    ));
    assert_eq!(publ.recv(), Packet::PubRec(tessera_proto::PubRec::new(7)));
    publ.drop_connection();
    let (mut publ, ack) = RawClient::connect(broker.addr(), connect_packet(v, &pub_id, false, 30));
    assert!(ack.session_present);
    let mut again = common::publish_packet("q2/in", b"in", QoS::ExactlyOnce, 7, false);
    if let Packet::Publish(p) = &mut again {
        p.dup = true;
    }
    publ.send(&again);
    assert_eq!(publ.recv(), Packet::PubRec(tessera_proto::PubRec::new(7)));
    publ.send(&Packet::PubRel(tessera_proto::PubRel::new(7)));
    assert_eq!(publ.recv(), Packet::PubComp(tessera_proto::PubComp::new(7)));
    publ.publish("q2/end", b"end", QoS::AtLeastOnce, 8);

    // The subscriber sees "in" once, then "end". The PUBREL for "in" may
    // come before or after the PUBLISH of "end" (different flows).
    let mut payloads = Vec::new();
    let mut releases_missing = 0;
    while payloads.len() < 2 || releases_missing > 0 {
        match sub.recv() {
            Packet::Publish(p) => {
                payloads.push(p.payload.clone());
                if p.qos == QoS::ExactlyOnce {
                    releases_missing += 1;
                    sub.send(&Packet::PubRec(tessera_proto::PubRec::new(p.packet_id)));
                } else {
                    sub.send(&Packet::PubAck(tessera_proto::PubAck::new(p.packet_id)));
                }
            }
            Packet::PubRel(r) => {
                releases_missing -= 1;
                sub.send(&Packet::PubComp(tessera_proto::PubComp::new(r.packet_id)));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(payloads, [&b"in"[..], b"end"]);
}

/// MQTT 5: the broker never sends a packet larger than the client's Maximum
/// Packet Size; such a message is dropped for that client [MQTT-3.1.2-24/25].
#[test]
fn v5_client_maximum_packet_size_is_respected() {
    let broker = Broker::start();
    let v5 = ProtocolVersion::V5;
    let mut c = connect_packet(v5, &id_on_shard("maxpkt-sub", 0), true, 30);
    c.properties.maximum_packet_size = Some(100);
    let mut sub = RawClient::connect_ok(broker.addr(), c);
    assert_eq!(
        sub.subscribe(1, &[("mp/#", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v5, &id_on_shard("maxpkt-pub", 1), true, 30),
    );
    publ.publish("mp/big", &[b'x'; 200], QoS::AtLeastOnce, 1);
    publ.publish("mp/small", b"fits", QoS::AtLeastOnce, 2);
    let p = sub.recv_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("mp/small", &b"fits"[..])
    );
}

/// A SUBACK means the subscription is live on every shard: a message
/// published on another shard right after it is delivered. Here another
/// session's SUBSCRIBE to the same filter, a moment earlier, is still
/// spreading its route to the other shard when the second one is answered.
/// The race is narrow, so the test runs many rounds.
#[test]
fn suback_means_the_subscription_is_live_on_every_shard() {
    const ROUNDS: u16 = 300;
    let broker = Broker::start();
    let v = ProtocolVersion::V3_1_1;
    let mut first = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard("live-first", 0), true, 30),
    );
    let mut second = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard("live-second", 0), true, 30),
    );
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard("live-pub", 1), true, 30),
    );
    let unsubscribe = |packet_id: u16, filter: &str| {
        Packet::Unsubscribe(tessera_proto::Unsubscribe {
            packet_id,
            properties: Default::default(),
            filters: vec![common::s(filter)],
        })
    };
    for k in 1..=ROUNDS {
        let filter = format!("live/{k}");
        // Not waiting for this SUBACK: the route is on its way to shard 1.
        // (The first session's replies are left unread; they are small.)
        first.send(&common::subscribe_packet(k, &[(&filter, QoS::AtMostOnce)]));
        // Let the broker read the first SUBSCRIBE before the second.
        std::thread::sleep(Duration::from_micros(100));
        assert_eq!(
            second.subscribe(k, &[(&filter, QoS::AtLeastOnce)]),
            [ReasonCode::GrantedQoS1]
        );
        publ.publish(&filter, b"published after SUBACK", QoS::AtLeastOnce, k);
        match second.try_recv(RECV_TIMEOUT) {
            Ok(Packet::Publish(p)) => {
                assert_eq!(p.topic.as_str(), filter);
                second.send(&Packet::PubAck(tessera_proto::PubAck::new(p.packet_id)));
            }
            other => panic!("round {k}: the message published after SUBACK was lost: {other:?}"),
        }
        // Stay under the subscriptions a session may hold.
        second.send(&unsubscribe(k, &filter));
        assert!(matches!(second.recv(), Packet::UnsubAck(_)));
        first.send(&unsubscribe(k, &filter));
        // Let both shards go idle: the race shows when they wake up again.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A retained message acknowledged (PUBACK) on one shard is sent to a
/// subscription made right after on the other shard [MQTT-3.3.1-6]. The
/// retained table is replicated to every shard by message, so this checks
/// that the acknowledgement does not run ahead of the replication. Many
/// rounds, shards idle in between (where the race shows).
#[test]
fn retained_message_acknowledged_is_seen_by_the_other_shard() {
    const ROUNDS: u16 = 300;
    let broker = Broker::start();
    let v = ProtocolVersion::V3_1_1;
    let mut publ = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard("rrace-pub", 1), true, 30),
    );
    let mut sub = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard("rrace-sub", 0), true, 30),
    );
    for k in 1..=ROUNDS {
        let topic = format!("rrace/{k}");
        publ.publish_retained(&topic, b"kept", k);
        assert_eq!(
            sub.subscribe(k, &[(&topic, QoS::AtLeastOnce)]),
            [ReasonCode::GrantedQoS1]
        );
        // Retained messages follow the SUBACK within milliseconds; 2 s is ample.
        match sub.try_recv(Duration::from_secs(2)) {
            Ok(Packet::Publish(p)) => {
                assert_eq!((p.topic.as_str(), p.retain), (topic.as_str(), true));
                sub.send(&Packet::PubAck(tessera_proto::PubAck::new(p.packet_id)));
            }
            other => panic!(
                "round {k}: the retained message acknowledged on shard 1 was not sent to a \
                 subscription made after the PUBACK on shard 0 (replication ran behind the \
                 PUBACK): {other:?}"
            ),
        }
        sub.send(&Packet::Unsubscribe(tessera_proto::Unsubscribe {
            packet_id: k,
            properties: Default::default(),
            filters: vec![common::s(&topic)],
        }));
        assert!(matches!(sub.recv(), Packet::UnsubAck(_)));
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// 3.1.1 Clean Session 1 discards a stored session and ends its own at the
/// close [MQTT-3.1.2-6]; CONNACK says Session Present 0 [MQTT-3.2.2-1].
#[test]
fn v311_clean_session_discards_the_stored_session() {
    let broker = Broker::start();
    let v = ProtocolVersion::V3_1_1;
    let id = "clean-discards";
    let mut c = RawClient::connect_ok(broker.addr(), connect_packet(v, id, false, 30));
    assert_eq!(
        c.subscribe(1, &[("cd/t", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    c.disconnect();
    c.expect_closed(RECV_TIMEOUT);
    let (mut c, ack) = RawClient::connect(broker.addr(), connect_packet(v, id, true, 30));
    assert!(!ack.session_present, "Clean Session 1: no session present");
    // The old subscription is gone with the session: the sentinel comes first.
    assert_eq!(
        c.subscribe(2, &[("cd/sentinel", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    c.publish("cd/t", b"nobody", QoS::AtLeastOnce, 3);
    c.publish("cd/sentinel", b"sentinel", QoS::AtLeastOnce, 4);
    assert_eq!(&c.recv_publish().payload[..], b"sentinel");
    c.disconnect();
    c.expect_closed(RECV_TIMEOUT);
    let (mut c, ack) = RawClient::connect(broker.addr(), connect_packet(v, id, false, 30));
    assert!(!ack.session_present, "the clean session ended at the close");
    assert_eq!(
        c.subscribe(2, &[("cd/end", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    c.publish("cd/end", b"end", QoS::AtLeastOnce, 3);
    assert_eq!(
        &c.recv_publish().payload[..],
        b"end",
        "nothing queued from before"
    );
}
