//! Goal: one live session per ClientID across a cluster of real broker processes (issue
//! 15, guarantee 1), as real MQTT clients (rumqttc v5 and v4) see it:
//! - a ClientID connected to a second node ends its connection on the first (v5:
//!   DISCONNECT 0x8E), so exactly one connection stays live; a reconnect to the node
//!   that owns the session costs no raft write;
//! - a persistent session with messages in flight and queued at QoS 1 and 2 on node 1 is
//!   taken over from node 2: CONNACK session present, every message exactly once in
//!   order, the in-flight ones re-sent with their packet ids;
//! - without a quorum (2 of 3 nodes killed) a CONNECT that needs a claim is refused
//!   with 0x88 (v5) / return code 3 (3.1.1) within a bound, never left hanging;
//! - a node cut off from its cluster for longer than its session lease ends the
//!   connections of the ClientIDs it holds (v5: DISCONNECT 0x9C) and refuses their
//!   reconnects, since the majority may have given them to other nodes; a killed
//!   leader ends no connection on the surviving nodes (a failover is shorter than the
//!   default lease).
//! - a node that cannot reach the ClientID's last owner does not resume its own older
//!   copy of the session as "session present" when that owner had started a new
//!   session afresh (the log says so).
//! - with two shards per node, a QoS 2 subscriber whose session moved to another node
//!   gets each publication of a publisher on the other shard of its old node once
//!   (its old shard redirects them, and the new node gets them directly too).
//!
//! Method: three `broker` processes (one shard each unless said) started by the shared harness
//! (`common::cluster`); clients are rumqttc's async clients on a tokio runtime; the
//! node's `/metrics` shows claims. Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{RECV_TIMEOUT, metric_sum, scrape};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, DisconnectReasonCode, Packet, Publish};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError};
use tokio::time::timeout;

/// A 3-node cluster with an elected leader.
fn three_nodes(tag: &str) -> Cluster {
    three_nodes_with(tag, &[])
}

/// A 3-node cluster with an elected leader, with these settings.
fn three_nodes_with(tag: &str, envs: &[(&str, &str)]) -> Cluster {
    let mut c = Cluster::new(tag, 3, 3, envs);
    for id in 1..=3 {
        c.start(id, &[], false);
    }
    c.wait_for_leader();
    c
}

fn options(c: &Cluster, node: u64, id: &str, clean: bool) -> MqttOptions {
    let addr = c.node(node).addr();
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    // rumqttc's default of 5 s to CONNACK is thinner than what a takeover from a dead
    // node takes by design: a new raft leader, then the session lease of the
    // unreachable old owner waited out (`cluster.session_lease_ms`, 2 s by default); a
    // loaded .ci/run once took longer ("parked @2: connection error Timeout").
    o.set_connection_timeout(RECV_TIMEOUT.as_secs() * 2);
    o.set_clean_start(clean);
    if !clean {
        o.set_session_expiry_interval(Some(600));
    }
    o
}

/// Polls an event loop (rumqttc v5 or v4) until `f` picks an event; panics on a
/// connection error or after the timeout.
macro_rules! poll_until {
    ($events:expr, $what:expr, $f:expr) => {{
        let deadline = Instant::now() + RECV_TIMEOUT * 2;
        let mut f = $f;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = match timeout(left, $events.poll()).await {
                Ok(Ok(ev)) => ev,
                Ok(Err(e)) => panic!("{}: connection error {e:?}", $what),
                Err(_) => panic!("{}: nothing within {:?}", $what, RECV_TIMEOUT * 2),
            };
            if let Some(t) = f(&ev) {
                break t;
            }
        }
    }};
}

async fn until<T>(events: &mut EventLoop, what: &str, f: impl FnMut(&Event) -> Option<T>) -> T {
    poll_until!(events, what, f)
}

async fn poll4<T>(
    events: &mut rumqttc::EventLoop,
    what: &str,
    f: impl FnMut(&rumqttc::Event) -> Option<T>,
) -> T {
    poll_until!(events, what, f)
}

/// Connects and returns the client, its event loop and whether a session was present.
async fn connect(o: MqttOptions, what: &str) -> (AsyncClient, EventLoop, bool) {
    let (client, mut events) = AsyncClient::new(o, 64);
    let present = until(&mut events, what, |ev| match ev {
        Event::Incoming(Packet::ConnAck(a)) => {
            assert_eq!(a.code, ConnectReturnCode::Success, "{what}: {a:?}");
            Some(a.session_present)
        }
        _ => None,
    })
    .await;
    (client, events, present)
}

/// Polls until the connection ends; returns the DISCONNECT reason the broker sent, if
/// any.
async fn ended(events: &mut EventLoop, what: &str) -> Option<DisconnectReasonCode> {
    let deadline = Instant::now() + RECV_TIMEOUT * 2;
    let mut reason = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Disconnect(d)))) => reason = Some(d.reason_code),
            Ok(Ok(_)) => {}
            // rumqttc reports a DISCONNECT from the broker as this error.
            Ok(Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                reason_code,
                ..
            }))) => return Some(reason_code),
            Ok(Err(_)) => return reason,
            Err(_) => panic!("{what}: still connected after {:?}", RECV_TIMEOUT * 2),
        }
    }
}

/// Whether the connection stays up (answers a round trip) for a while.
async fn alive(client: &AsyncClient, events: &mut EventLoop, topic: &str, what: &str) {
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    client
        .publish(topic, QoS::AtLeastOnce, false, "ping")
        .await
        .unwrap();
    until(events, what, |ev| match ev {
        Event::Incoming(Packet::Publish(p)) if p.payload.as_ref() == b"ping" => Some(()),
        _ => None,
    })
    .await;
}

/// `id` connects to `node` with a persistent session, subscribes to `filter` and
/// disconnects: its session stays there, offline.
async fn subscribe_then_go_offline(c: &Cluster, node: u64, id: &str, filter: &str, qos: QoS) {
    let (sub, mut se, _) = connect(options(c, node, id, false), id).await;
    sub.subscribe(filter, qos).await.unwrap();
    until(&mut se, &format!("{id} SUBACK"), |ev| match ev {
        Event::Incoming(Packet::SubAck(_)) => Some(()),
        _ => None,
    })
    .await;
    sub.disconnect().await.unwrap();
    let _ = timeout(Duration::from_secs(2), async {
        while se.poll().await.is_ok() {}
    })
    .await;
}

/// Connects `connect` to `node` until it is no longer refused for a session whose node
/// was unreachable (0x88), within a bound; the session must be present.
fn connect_once_its_node_is_back(
    c: &Cluster,
    node: u64,
    connect: &tessera_proto::Connect,
) -> common::RawClient {
    use tessera_proto::ReasonCode;
    let deadline = Instant::now() + RECV_TIMEOUT * 4;
    loop {
        let (client, ack) = common::RawClient::connect(c.node(node).addr(), connect.clone());
        if ack.reason_code == ReasonCode::Success {
            assert!(ack.session_present, "the session came back: {ack:?}");
            return client;
        }
        assert_eq!(ack.reason_code, ReasonCode::ServerUnavailable, "{ack:?}");
        assert!(
            Instant::now() < deadline,
            "the session's node is back, yet still refused"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn claims(c: &Cluster, node: u64, name: &str) -> f64 {
    metric_sum(&scrape(c.node(node).admin_addr()), name, &[])
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_id_connected_to_two_nodes_at_once_ends_with_one_live_connection() {
    let c = three_nodes("sessions-dup");

    // v5: node 1, then node 2; node 1's connection gets DISCONNECT 0x8E.
    let (_c1, mut e1, _) = connect(options(&c, 1, "dup-v5", true), "dup-v5 @1").await;
    let (c2, mut e2, _) = connect(options(&c, 2, "dup-v5", true), "dup-v5 @2").await;
    assert_eq!(
        ended(&mut e1, "dup-v5 @1").await,
        Some(DisconnectReasonCode::SessionTakenOver),
        "the first connection is told its session was taken over"
    );
    drop(e1);
    alive(&c2, &mut e2, "dup/v5", "dup-v5 @2").await;

    // 3.1.1 (rumqttc v4): node 3 takes the ClientID from node 2; node 2 closes.
    let o4 = |node: u64| {
        let addr = c.node(node).addr();
        let mut o = rumqttc::MqttOptions::new("dup-v4", addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    };
    let (_a, mut ea) = rumqttc::AsyncClient::new(o4(2), 16);
    let ack = |ev: &rumqttc::Event| match ev {
        rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)) => Some(a.code),
        _ => None,
    };
    let code = poll4(&mut ea, "dup-v4 @2", ack).await;
    assert_eq!(code, rumqttc::ConnectReturnCode::Success);
    let (b, mut eb) = rumqttc::AsyncClient::new(o4(3), 16);
    let code = poll4(&mut eb, "dup-v4 @3", ack).await;
    assert_eq!(code, rumqttc::ConnectReturnCode::Success);
    let deadline = Instant::now() + RECV_TIMEOUT * 2;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, ea.poll()).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            Err(_) => panic!("dup-v4 @2 still connected after node 3 took the ClientID"),
        }
    }
    drop(ea);
    b.subscribe("dup/v4", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    b.publish("dup/v4", rumqttc::QoS::AtLeastOnce, false, "ping")
        .await
        .unwrap();
    poll4(&mut eb, "dup-v4 @3 round trip", |ev| match ev {
        rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => Some(p.payload.clone()),
        _ => None,
    })
    .await;

    // A reconnect to the node that owns the session costs no raft write.
    let claims_before = claims(&c, 2, "tessera_cluster_session_claims_total");
    let held_before = claims(&c, 2, "tessera_cluster_session_claims_held_total");
    c2.disconnect().await.unwrap();
    let _ = ended(&mut e2, "dup-v5 @2 disconnect").await;
    drop(e2);
    let (_c2b, _e2b, _) = connect(options(&c, 2, "dup-v5", true), "dup-v5 @2 again").await;
    assert_eq!(
        claims(&c, 2, "tessera_cluster_session_claims_total"),
        claims_before,
        "no new claim for a ClientID the node holds"
    );
    assert_eq!(
        claims(&c, 2, "tessera_cluster_session_claims_held_total"),
        held_before + 1.0
    );
}

/// What a subscriber saw of one PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Got {
    payload: String,
    qos: QoS,
    pkid: u16,
    dup: bool,
}

fn got(p: &Publish) -> Got {
    Got {
        payload: String::from_utf8_lossy(&p.payload).into_owned(),
        qos: p.qos,
        pkid: p.pkid,
        dup: p.dup,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_persistent_session_with_queued_qos1_and_qos2_messages_moves_to_another_node() {
    let c = three_nodes("sessions-move");
    const N: usize = 10;
    let qos_of = |i: usize| {
        if i.is_multiple_of(2) {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        }
    };

    // The subscriber on node 1: persistent, QoS 2, a receive maximum of 2, acks by hand.
    let mut o = options(&c, 1, "mover", false);
    o.set_manual_acks(true);
    o.set_receive_maximum(Some(2));
    let (sub, mut se, present) = connect(o, "mover @1").await;
    assert!(!present);
    sub.subscribe("mv/t", QoS::ExactlyOnce).await.unwrap();
    until(&mut se, "mover SUBACK", |ev| match ev {
        Event::Incoming(Packet::SubAck(_)) => Some(()),
        _ => None,
    })
    .await;

    // A publisher on node 1 publishes N messages, alternating QoS 2 and 1, each
    // acknowledged (stored in the subscriber's session) before the next.
    let (publ, mut pe, _) = connect(options(&c, 1, "mv-pub", true), "mv-pub").await;
    for i in 0..N {
        publ.publish("mv/t", qos_of(i), false, format!("m{i}"))
            .await
            .unwrap();
        until(&mut pe, "mv-pub ack", |ev| match ev {
            Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)) => Some(()),
            _ => None,
        })
        .await;
    }
    // Two are in flight on node 1 (receive maximum 2), unacknowledged; the rest queued.
    let mut first = Vec::new();
    while first.len() < 2 {
        let p = until(&mut se, "mover @1 deliveries", |ev| match ev {
            Event::Incoming(Packet::Publish(p)) => Some(got(p)),
            _ => None,
        })
        .await;
        first.push(p);
    }
    assert_eq!(
        first.iter().map(|g| g.payload.as_str()).collect::<Vec<_>>(),
        ["m0", "m1"]
    );

    // The same ClientID connects to node 2 without Clean Start: node 1's connection
    // ends (0x8E) and node 2 resumes the session.
    let mut o = options(&c, 2, "mover", false);
    o.set_receive_maximum(Some(20));
    let (_sub2, mut se2, present) = connect(o, "mover @2").await;
    assert!(present, "CONNACK session present after the move");
    assert_eq!(
        ended(&mut se, "mover @1").await,
        Some(DisconnectReasonCode::SessionTakenOver)
    );
    drop(se);

    let mut after = Vec::new();
    let deadline = Instant::now() + RECV_TIMEOUT * 2;
    while after.len() < N {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, se2.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => after.push(got(&p)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("mover @2: {e:?} after {after:?}"),
            Err(_) => panic!("mover @2: only {after:?}"),
        }
    }
    // Every message once, in order; the two in flight re-sent as duplicates with their
    // packet ids; nothing more comes.
    let payloads: Vec<&str> = after.iter().map(|g| g.payload.as_str()).collect();
    let expected: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads, expected);
    for (i, g) in after.iter().enumerate() {
        assert_eq!(g.qos, qos_of(i), "{g:?}");
    }
    for k in 0..2 {
        assert_eq!((after[k].pkid, after[k].dup), (first[k].pkid, true));
    }
    let extra = timeout(Duration::from_millis(500), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = se2.poll().await {
                return got(&p);
            }
        }
    })
    .await;
    assert!(extra.is_err(), "a message came twice: {extra:?}");
    assert!(claims(&c, 2, "tessera_cluster_session_takeovers_total") >= 1.0);

    // The subscription moved with the session: publications from node 3 reach it on
    // node 2 once its route is applied there (the move announces it; no SUBACK waits
    // for it, so the publisher retries with new payloads until one arrives).
    let (p3, mut pe3, _) = connect(options(&c, 3, "mv-pub3", true), "mv-pub3").await;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    for k in 0.. {
        assert!(
            Instant::now() < deadline,
            "nothing from node 3 reached node 2"
        );
        p3.publish("mv/t", QoS::AtLeastOnce, false, format!("late{k}"))
            .await
            .unwrap();
        until(&mut pe3, "mv-pub3 ack", |ev| match ev {
            Event::Incoming(Packet::PubAck(_)) => Some(()),
            _ => None,
        })
        .await;
        let wait = timeout(Duration::from_millis(300), async {
            loop {
                if let Ok(Event::Incoming(Packet::Publish(p))) = se2.poll().await {
                    return got(&p);
                }
            }
        })
        .await;
        if let Ok(g) = wait {
            seen.push(g.payload);
            break;
        }
    }
    assert_eq!(seen.len(), 1);
    assert!(seen[0].starts_with("late"), "{seen:?}");
}

/// Node `id`'s session document for `client_id`, `None` when it has none (404).
fn session_doc(c: &Cluster, id: u64, client_id: &str) -> Option<serde_json::Value> {
    match c
        .admin(id)
        .json("GET", &["api", "v1", "sessions", client_id], &[])
    {
        Ok(v) => Some(v),
        Err(tessera_broker::admin::client::ClientError::NotFound(_)) => None,
        Err(e) => panic!("node {id}: sessions/{client_id}: {e}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_persistent_session_with_a_queue_on_disk_moves_whole_and_the_old_node_keeps_nothing() {
    // 64 queued deliveries stay in memory per session (`queue_head_count_max`), the
    // rest only on disk: 200 puts 136 in the disk tail, which must move too.
    const N: usize = 200;
    let mut c = three_nodes("sessions-tail");
    subscribe_then_go_offline(&c, 1, "deep", "deep/t", QoS::AtLeastOnce).await;

    let (publ, mut pe, _) = connect(options(&c, 1, "deep-pub", true), "deep-pub").await;
    for i in 0..N {
        publ.publish("deep/t", QoS::AtLeastOnce, false, format!("d{i}"))
            .await
            .unwrap();
        until(&mut pe, "deep-pub PUBACK", |ev| match ev {
            Event::Incoming(Packet::PubAck(_)) => Some(()),
            _ => None,
        })
        .await;
    }
    let doc = session_doc(&c, 1, "deep").expect("the session is on node 1");
    assert_eq!(doc["queued"], N, "{doc}");

    // The session moves to node 2: every message once, in order.
    let (_sub2, mut se2, present) = connect(options(&c, 2, "deep", false), "deep @2").await;
    assert!(present, "CONNACK session present after the move");
    let mut got = Vec::new();
    let deadline = Instant::now() + RECV_TIMEOUT * 4;
    while got.len() < N {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, se2.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                got.push(String::from_utf8_lossy(&p.payload).into_owned())
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("deep @2: {e:?} after {} messages", got.len()),
            Err(_) => panic!("deep @2: only {} of {N}: {:?}", got.len(), got.last()),
        }
    }
    let expected: Vec<String> = (0..N).map(|i| format!("d{i}")).collect();
    assert_eq!(got, expected);
    let extra = timeout(Duration::from_millis(500), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = se2.poll().await {
                return p.payload;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "a message came twice: {extra:?}");
    assert_eq!(
        claims(&c, 2, "tessera_cluster_session_tail_deliveries_moved_total"),
        (N - 64) as f64
    );
    assert_eq!(
        claims(&c, 2, "tessera_cluster_session_confirm_failures_total"),
        0.0
    );

    // Node 2 confirmed, so node 1 deleted its copy: not even a restart of node 1 brings
    // the session back there (its store records are gone, not just its memory).
    assert!(session_doc(&c, 1, "deep").is_none());
    c.kill(1);
    c.start(1, &[], false);
    c.wait_for_leader();
    assert!(
        session_doc(&c, 1, "deep").is_none(),
        "node 1 restored a session it had handed out and that was confirmed"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn without_a_quorum_a_connect_that_needs_a_claim_is_refused_in_bounded_time() {
    let mut c = three_nodes("sessions-quorum");
    c.kill(2);
    c.kill(3);
    let bound = Duration::from_secs(10);

    let started = Instant::now();
    let (_c, mut e) = AsyncClient::new(options(&c, 1, "nq-v5", true), 4);
    let err = match timeout(bound, e.poll()).await {
        Ok(Err(err)) => err,
        other => panic!("v5: expected a refusal within {bound:?}, got {other:?}"),
    };
    assert!(
        matches!(
            err,
            ConnectionError::ConnectionRefused(ConnectReturnCode::ServerUnavailable)
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < bound);

    let addr = c.node(1).addr();
    let o4 = rumqttc::MqttOptions::new("nq-v4", addr.ip().to_string(), addr.port());
    let (_c4, mut e4) = rumqttc::AsyncClient::new(o4, 4);
    let err = match timeout(bound, e4.poll()).await {
        Ok(Err(err)) => err,
        other => panic!("3.1.1: expected a refusal within {bound:?}, got {other:?}"),
    };
    assert!(
        matches!(
            err,
            rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::ServiceUnavailable
            )
        ),
        "{err:?}"
    );
    assert!(claims(&c, 1, "tessera_cluster_session_claims_refused_total") >= 2.0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_cut_off_from_its_cluster_ends_its_clients_connections_after_the_lease() {
    // Node 3 holds two ClientIDs; nodes 1 and 2 (a majority) die, so the rest of a real
    // cluster could give those ClientIDs to other nodes. After its session lease (2 s by
    // default) node 3 must stop serving them: the connections end (v5: DISCONNECT 0x9C)
    // and a reconnect there is refused instead of served from the claim it held.
    let mut c = three_nodes("sessions-fence");
    let (c5, mut e5, _) = connect(options(&c, 3, "fence-v5", false), "fence-v5 @3").await;
    alive(&c5, &mut e5, "fence/v5", "fence-v5 @3").await;
    let addr = c.node(3).addr();
    let mut o4 = rumqttc::MqttOptions::new("fence-v4", addr.ip().to_string(), addr.port());
    o4.set_keep_alive(Duration::from_secs(30));
    let (_c4, mut e4) = rumqttc::AsyncClient::new(o4.clone(), 16);
    let ack = |ev: &rumqttc::Event| match ev {
        rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)) => Some(a.code),
        _ => None,
    };
    assert_eq!(
        poll4(&mut e4, "fence-v4 @3", ack).await,
        rumqttc::ConnectReturnCode::Success
    );

    c.kill(1);
    c.kill(2);
    assert_eq!(
        ended(&mut e5, "fence-v5 @3").await,
        Some(DisconnectReasonCode::UseAnotherServer),
        "the v5 client is told to use another server"
    );
    let deadline = Instant::now() + RECV_TIMEOUT * 2;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, e4.poll()).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            Err(_) => panic!("fence-v4 @3: still connected after {:?}", RECV_TIMEOUT * 2),
        }
    }
    assert_eq!(claims(&c, 3, "tessera_cluster_sessions_fenced_total"), 2.0);

    // The claim node 3 held is not trusted without contact: the reconnect is refused.
    let (_c, mut e) = AsyncClient::new(options(&c, 3, "fence-v5", false), 4);
    let err = match timeout(RECV_TIMEOUT * 2, e.poll()).await {
        Ok(Err(err)) => err,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(
        matches!(
            err,
            ConnectionError::ConnectionRefused(ConnectReturnCode::ServerUnavailable)
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_killed_leader_ends_no_connection_on_the_surviving_nodes() {
    // Issue 16: the silence a survivor sees while the leader is replaced (the leader
    // lease, a random timeout, the vote; 0.9-1.3 s with the defaults) is shorter than
    // the default session lease (2 s), so an election fences nobody: the survivors'
    // clients stay connected and are served on the claims their nodes held.
    let mut c = three_nodes("sessions-leader-killed");
    let (leader, _) = c.wait_for_leader();
    let mut clients = Vec::new();
    for id in (1..=3).filter(|id| *id != leader) {
        let what = format!("lk-{id} @{id}");
        let (client, mut events, _) =
            connect(options(&c, id, &format!("lk-{id}"), false), &what).await;
        alive(&client, &mut events, &format!("lk/{id}/a"), &what).await;
        clients.push((id, what, client, events));
    }
    c.kill(leader);
    // Past the lease and a shard tick after the kill: a fence would have come by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (new_leader, _) = c.wait_for_leader();
    assert_ne!(new_leader, leader);
    for (id, what, client, events) in &mut clients {
        // A DISCONNECT the node sent meanwhile fails this round trip.
        alive(client, events, &format!("lk/{id}/b"), what).await;
        assert_eq!(
            claims(&c, *id, "tessera_cluster_sessions_fenced_total"),
            0.0,
            "{what}"
        );
    }
}

#[test]
fn with_redirect_to_owner_a_v5_client_is_sent_to_the_node_holding_its_session() {
    use common::{RawClient, connect_packet};
    use tessera_proto::{ProtocolVersion, ReasonCode};

    let mut c = Cluster::new(
        "sessions-redirect",
        3,
        3,
        &[("TESSERA_CLUSTER__REDIRECT_TO_OWNER", "true")],
    );
    for id in 1..=3 {
        c.start(id, &[], false);
    }
    c.wait_for_leader();
    let mut connect = connect_packet(ProtocolVersion::V5, "redirected", false, 30);
    connect.properties.session_expiry_interval = Some(600);
    let _held = RawClient::connect_ok(c.node(1).addr(), connect.clone());
    // Node 1 answered CONNACK once it applied its claim; node 2 redirects only once it
    // applied it too (before, it would claim for itself: a takeover, not a redirect).
    let claimed = c.status(1).expect("node 1 answers")["applied_index"]
        .as_u64()
        .expect("applied_index");
    c.wait_until("node 2 applies node 1's claim", |c| {
        c.status(2)
            .and_then(|v| v["applied_index"].as_u64())
            .is_some_and(|i| i >= claimed)
    });
    let (_c2, ack) = RawClient::connect(c.node(2).addr(), connect.clone());
    assert_eq!(ack.reason_code, ReasonCode::UseAnotherServer, "{ack:?}");
    assert_eq!(
        ack.properties.server_reference.as_deref(),
        Some(c.node(1).addr().to_string().as_str()),
        "the Server Reference names the owner's MQTT address"
    );
    assert_eq!(
        claims(&c, 2, "tessera_cluster_session_redirects_total"),
        1.0
    );
    // 3.1.1 has no redirect: its session moves as without the setting.
    let c311 = connect_packet(ProtocolVersion::V3_1_1, "redirected", false, 30);
    let _moved = RawClient::connect_ok(c.node(3).addr(), c311);
}

/// `brokerctl clients|sessions|subs|retained list` against any member lists the whole
/// cluster with a NODE column (each session on the node that holds it), or one node
/// with `--node N`.
#[test]
fn brokerctl_lists_clients_sessions_and_subscriptions_cluster_wide_or_per_node() {
    use common::{RawClient, brokerctl, connect_packet};
    use tessera_proto::{ProtocolVersion, QoS as PQoS};

    let c = three_nodes("sessions-listing");
    let mut held = Vec::new();
    for node in 1..=3u64 {
        let mut connect = connect_packet(ProtocolVersion::V5, &format!("lister-{node}"), false, 60);
        connect.properties.session_expiry_interval = Some(600);
        let mut client = RawClient::connect_ok(c.node(node).addr(), connect);
        client.subscribe(1, &[(&format!("list/{node}/#"), PQoS::AtLeastOnce)]);
        held.push(client);
    }
    let mut on2 = RawClient::connect_ok(
        c.node(2).addr(),
        connect_packet(ProtocolVersion::V5, "lister-pub", true, 60),
    );
    on2.publish_retained("list/r", b"kept", 1);
    drop(on2);

    let url = format!("http://{}", c.node(1).admin_addr());
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--url", url.as_str(), "--json"];
        all.extend_from_slice(args);
        let out = brokerctl(&all, &[]);
        assert!(
            out.status.success(),
            "brokerctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // (node, ClientID) of the listed items that belong to this test.
    let listed = |v: &serde_json::Value| -> Vec<(u64, String)> {
        let mut got: Vec<(u64, String)> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| {
                i["client_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("lister-") && id != "lister-pub")
            })
            .map(|i| {
                (
                    i["node"].as_u64().unwrap(),
                    i["client_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        got.sort();
        got
    };
    let everyone: Vec<(u64, String)> = (1..=3).map(|n| (n, format!("lister-{n}"))).collect();

    assert_eq!(listed(&json(&["clients", "list"])), everyone);
    assert_eq!(listed(&json(&["sessions", "list"])), everyone);
    assert_eq!(
        listed(&json(&["sessions", "list", "--node", "3"])),
        vec![(3, "lister-3".to_owned())]
    );
    let subs = json(&["subs", "list"]);
    assert_eq!(listed(&subs), everyone);
    for i in subs["items"].as_array().unwrap() {
        if let (Some(n), Some(f)) = (i["node"].as_u64(), i["filter"].as_str())
            && f.starts_with("list/")
        {
            assert_eq!(f, format!("list/{n}/#"), "{i}");
        }
    }
    assert_eq!(
        listed(&json(&["clients", "list", "--node", "2"])),
        vec![(2, "lister-2".to_owned())]
    );
    // Retained messages are the same on every node: one node's replica, with its id.
    let retained = json(&["retained", "list", "--node", "3"]);
    let items = retained["items"].as_array().unwrap();
    assert!(
        items
            .iter()
            .any(|i| i["topic"] == "list/r" && i["node"] == 3),
        "{retained}"
    );

    // Each node's own admin API names itself in what it lists.
    let own = c
        .admin(2)
        .json("GET", &["api", "v1", "sessions"], &[])
        .unwrap();
    assert_eq!(listed(&own), vec![(2, "lister-2".to_owned())]);

    // The table has the NODE column; a node that is not a member is an error.
    let out = brokerctl(&["--url", &url, "clients", "list"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.starts_with("NODE"), "{text}");
    assert!(text.contains("lister-3"), "{text}");
    let out = brokerctl(&["--url", &url, "clients", "list", "--node", "9"], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    drop(held);
}

/// A node that restarts with a session in its store that another node took over while
/// it was down does not serve that stale copy: it is parked (not listed, not routed) and
/// the next CONNECT there takes the owner's session over as usual.
/// Availability first (`cluster.wait_for_session_owner = false`): a takeover whose old
/// owner is down gives the client a new session after the lease.
const NEW_SESSION_IF_OWNER_DOWN: &[(&str, &str)] =
    &[("TESSERA_CLUSTER__WAIT_FOR_SESSION_OWNER", "false")];

/// Issue 16, "node killed and restarted with its disk", with the default
/// `cluster.wait_for_session_owner`: a persistent session with acknowledged QoS 1 and
/// QoS 2 messages queued on node 1, which is killed. Its client, reconnecting to node 2
/// while node 1 is down, is refused (0x88 Server unavailable: a new session there
/// would leave the messages on node 1's disk behind, and node 1 would drop them as
/// stale when it came back); so is a CONNECT to node 3, whose claim replaces node 2's
/// waiting one (node 2 sends it to node 1 rather than answering "nothing here", which
/// gave the client a new session: data-plane simulation, harness seed 137); once node
/// 1 is back, the next CONNECT to node 3 gets the session (present 1) with every
/// message, once and in order.
#[tokio::test(flavor = "current_thread")]
async fn a_session_on_a_killed_node_waits_for_it_and_keeps_every_acknowledged_message() {
    use common::{RawClient, connect_packet};
    use tessera_proto::{Packet as P, ProtocolVersion, PubAck, PubComp, PubRec, ReasonCode};

    let mut c = three_nodes("sessions-wait");
    const N: usize = 6;
    subscribe_then_go_offline(&c, 1, "waiter", "wait/t", QoS::ExactlyOnce).await;

    // Published on node 3, acknowledged once node 1 stored them for the offline session.
    let (publ, mut pe, _) = connect(options(&c, 3, "wait-pub", true), "wait-pub").await;
    for i in 0..N {
        let qos = if i % 2 == 0 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        };
        publ.publish("wait/t", qos, false, format!("w{i}"))
            .await
            .unwrap();
        until(&mut pe, "wait-pub ack", |ev| match ev {
            Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)) => Some(()),
            _ => None,
        })
        .await;
    }
    c.kill(1);
    c.wait_for_leader();

    let mut connect = connect_packet(ProtocolVersion::V5, "waiter", false, 30);
    connect.properties.session_expiry_interval = Some(600);
    // The takeover cannot reach node 1: refused, not a new session (bounded tries: a
    // refusal comes within the fetch timeout).
    let (_refused, ack) = RawClient::connect(c.node(2).addr(), connect.clone());
    assert_eq!(ack.reason_code, ReasonCode::ServerUnavailable, "{ack:?}");
    let (_refused, ack) = RawClient::connect(c.node(2).addr(), connect.clone());
    assert_eq!(ack.reason_code, ReasonCode::ServerUnavailable, "{ack:?}");
    assert!(claims(&c, 2, "tessera_cluster_session_owner_waits_total") >= 2.0);
    // Another node's claim replaces node 2's: it waits for node 1 too.
    let (_refused, ack) = RawClient::connect(c.node(3).addr(), connect.clone());
    assert_eq!(ack.reason_code, ReasonCode::ServerUnavailable, "{ack:?}");
    assert!(claims(&c, 3, "tessera_cluster_session_owner_waits_total") >= 1.0);

    c.start(1, &[], false);
    c.wait_for_leader();
    let mut client = connect_once_its_node_is_back(&c, 3, &connect);
    let mut got = Vec::new();
    while got.len() < N {
        match client.recv() {
            P::Publish(p) => {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
                if p.qos == tessera_proto::QoS::ExactlyOnce {
                    client.send(&P::PubRec(PubRec::new(p.packet_id)));
                } else {
                    client.send(&P::PubAck(PubAck::new(p.packet_id)));
                }
            }
            P::PubRel(r) => client.send(&P::PubComp(PubComp::new(r.packet_id))),
            other => panic!("unexpected {other:?}"),
        }
    }
    let expected: Vec<String> = (0..N).map(|i| format!("w{i}")).collect();
    assert_eq!(got, expected, "every acknowledged message, once, in order");
}

/// A session's node paused (SIGSTOP) while its client reconnects to node 2, which
/// claims the ClientID and waits for the session (refused 0x88); node 1 resumes (it
/// applies node 2's claim and parks its copy), and the client comes back to node 1:
/// node 1's claim replaces node 2's waiting one, node 2 answers "it waited for node 1",
/// and node 1 takes its own copy back (session present 1, the queued message there).
/// Found by the fault harness's pause scenario (CHAOS_SEED=387486): node 1 read that
/// answer as malformed and gave the client a new session.
#[tokio::test(flavor = "current_thread")]
async fn a_session_whose_node_was_paused_comes_back_on_it_after_another_node_waited_for_it() {
    use common::{RawClient, connect_packet};
    use tessera_proto::{Packet as P, ProtocolVersion, ReasonCode};

    let c = three_nodes("sessions-paused");
    subscribe_then_go_offline(&c, 1, "napper", "nap/t", QoS::AtLeastOnce).await;
    let (publ, mut pe, _) = connect(options(&c, 3, "nap-pub", true), "nap-pub").await;
    publ.publish("nap/t", QoS::AtLeastOnce, false, "queued")
        .await
        .unwrap();
    until(&mut pe, "nap-pub PUBACK", |ev| match ev {
        Event::Incoming(Packet::PubAck(_)) => Some(()),
        _ => None,
    })
    .await;
    drop(publ);
    drop(pe);

    c.node(1).signal(libc::SIGSTOP);
    let mut connect = connect_packet(ProtocolVersion::V5, "napper", false, 30);
    connect.properties.session_expiry_interval = Some(600);
    // Node 2 claims and cannot reach node 1: refused, waiting for it (a leader may
    // first have to be elected if node 1 led: refused then too, for want of a claim).
    let (_refused, ack) = RawClient::connect(c.node(2).addr(), connect.clone());
    assert_eq!(ack.reason_code, ReasonCode::ServerUnavailable, "{ack:?}");
    let deadline = Instant::now() + RECV_TIMEOUT * 2;
    while claims(&c, 2, "tessera_cluster_session_owner_waits_total") < 1.0 {
        assert!(Instant::now() < deadline, "node 2 never waited for node 1");
        let (_refused, ack) = RawClient::connect(c.node(2).addr(), connect.clone());
        assert_eq!(ack.reason_code, ReasonCode::ServerUnavailable, "{ack:?}");
    }
    // Paused past its lease (2 s): resumed, node 1 applies node 2's claim and parks its
    // copy before it serves the ClientID again.
    std::thread::sleep(Duration::from_secs(3));
    c.node(1).signal(libc::SIGCONT);
    let claimed = c.status(2).expect("node 2 answers")["applied_index"]
        .as_u64()
        .expect("applied_index");
    c.wait_until("node 1 applies node 2's claim", |c| {
        c.status(1)
            .and_then(|v| v["applied_index"].as_u64())
            .is_some_and(|i| i >= claimed)
    });

    let mut client = connect_once_its_node_is_back(&c, 1, &connect);
    // Publications on another node right after the take-back reach the session: its
    // filter stays routed to node 1 throughout (CHAOS_SEED=140775: the take-back
    // dropped the parked copy's ghost, and with it node 1's route, before the
    // session's subscriptions came back; what node 3 matched in between was
    // acknowledged and never delivered).
    let publisher = publish_for(&c, 3, "nap-burst", "nap/t", Duration::from_secs(1));
    match client.recv() {
        P::Publish(p) => {
            assert_eq!(p.payload.as_ref(), b"queued");
            client.send(&P::PubAck(tessera_proto::PubAck::new(p.packet_id)));
        }
        other => panic!("expected the queued message, got {other:?}"),
    }
    let acked = publisher.join().expect("the publisher");
    assert!(!acked.is_empty(), "nothing acknowledged");
    let mut missing: std::collections::BTreeSet<String> = acked.into_iter().collect();
    let deadline = Instant::now() + RECV_TIMEOUT;
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.try_recv(left) {
            Ok(P::Publish(p)) => {
                client.send(&P::PubAck(tessera_proto::PubAck::new(p.packet_id)));
                missing.remove(std::str::from_utf8(&p.payload).expect("utf-8"));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged, never delivered: {missing:?}"
    );
}

/// Publishes QoS 1 messages `0`, `1`, ... to `topic` on `node` as `id`, each after the
/// previous one's PUBACK, for `period` (at most 5000); returns those acknowledged.
fn publish_for(
    c: &Cluster,
    node: u64,
    id: &str,
    topic: &str,
    period: Duration,
) -> std::thread::JoinHandle<Vec<String>> {
    use tessera_proto::ProtocolVersion;
    let connect = common::connect_packet(ProtocolVersion::V3_1_1, id, true, 30);
    let mut publ = common::RawClient::connect_ok(c.node(node).addr(), connect);
    let topic = topic.to_owned();
    std::thread::spawn(move || {
        let end = Instant::now() + period;
        let mut acked = Vec::new();
        for n in 0..5000u16 {
            if Instant::now() >= end {
                break;
            }
            let payload = n.to_string();
            publ.publish(
                &topic,
                payload.as_bytes(),
                tessera_proto::QoS::AtLeastOnce,
                n + 1,
            );
            acked.push(payload);
        }
        publ.disconnect();
        acked
    })
}

/// `id` subscribes to `old` with a persistent session on node 1; node 1 dies, so node 2
/// cannot fetch the session and gives the client a new one, which subscribes to `new`
/// and disconnects; node 1 comes back with the old session in its store and does not
/// serve it.
async fn new_session_on_node_2_while_node_1_was_down(
    c: &mut Cluster,
    id: &str,
    old: &str,
    new: &str,
) {
    let (sub, mut se, _) = connect(options(c, 1, id, false), "@1").await;
    sub.subscribe(old, QoS::AtLeastOnce).await.unwrap();
    until(&mut se, "SUBACK @1", |ev| match ev {
        Event::Incoming(Packet::SubAck(_)) => Some(()),
        _ => None,
    })
    .await;
    drop(sub);
    drop(se);
    assert!(session_doc(c, 1, id).is_some());

    c.kill(1);
    let (sub2, mut se2, present) = connect(options(c, 2, id, false), "@2").await;
    assert!(!present, "node 1 is down: nothing to move");
    sub2.subscribe(new, QoS::AtLeastOnce).await.unwrap();
    until(&mut se2, "SUBACK @2", |ev| match ev {
        Event::Incoming(Packet::SubAck(_)) => Some(()),
        _ => None,
    })
    .await;
    sub2.disconnect().await.unwrap();
    let _ = timeout(Duration::from_secs(2), async {
        while se2.poll().await.is_ok() {}
    })
    .await;
    drop(se2);

    c.start(1, &[], false);
    c.wait_for_leader();
    c.wait_until("node 1 does not serve its old copy", |c| {
        session_doc(c, 1, id).is_none()
    });
}

#[tokio::test(flavor = "current_thread")]
async fn a_restarted_node_does_not_serve_a_session_another_node_took_over_meanwhile() {
    let mut c = three_nodes_with("sessions-park", NEW_SESSION_IF_OWNER_DOWN);
    new_session_on_node_2_while_node_1_was_down(&mut c, "parked", "park/t", "park/new").await;
    assert!(session_doc(&c, 2, "parked").is_some());

    // Connecting to node 1 moves node 2's session there (its subscription, not the old
    // one's).
    let (_sub1, _se1, present) = connect(options(&c, 1, "parked", false), "parked @1 again").await;
    assert!(present);
    let doc = session_doc(&c, 1, "parked").expect("the session is on node 1 now");
    let subs = c
        .admin(1)
        .json("GET", &["api", "v1", "subscriptions", "parked"], &[])
        .unwrap()
        .to_string();
    assert!(
        subs.contains("park/new") && !subs.contains("park/t"),
        "{doc} {subs}"
    );
}

/// Seed 46 of the data-plane simulation with real processes: a node must not resume its
/// own copy of a session as "session present" when the ClientID has had a newer session
/// that started afresh on another node since, even when that node is dead and cannot be
/// asked. The client would get its old subscriptions back and miss what its newer
/// session subscribed to.
#[tokio::test(flavor = "current_thread")]
async fn a_node_does_not_resume_an_older_session_after_a_newer_fresh_one_elsewhere() {
    let mut c = three_nodes_with("sessions-stale", NEW_SESSION_IF_OWNER_DOWN);
    // Node 1 comes back with the old session in its store; then node 2 dies with the
    // new one.
    new_session_on_node_2_while_node_1_was_down(&mut c, "stale", "stale/old", "stale/new").await;
    c.kill(2);
    c.wait_for_leader();

    // Node 1 cannot ask node 2; its own copy is older than the session node 2 started
    // afresh, so the client is told its session is gone.
    let (_sub1, _se1, present) = connect(options(&c, 1, "stale", false), "stale @1 again").await;
    assert!(
        !present,
        "node 1 resumed a session older than the client's last one"
    );
    let subs = c
        .admin(1)
        .json("GET", &["api", "v1", "subscriptions", "stale"], &[])
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(!subs.contains("stale/old"), "{subs}");
}

/// A ClientID starting with `prefix` whose session lives on shard `shard` of two.
fn client_on(shard: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|c| tessera_shard::hash::shard_for(c.as_bytes(), 2) == shard)
        .expect("some name hashes to each shard")
}

/// Issue 15's bound "ids and marks are per shard": node 1 runs two shards, the
/// subscriber's session on one, a publisher on the other. After the session moved to
/// node 2, its old shard's ghost redirected each publication to it with an id of its
/// own while node 2 (which routes the topic) also got it directly with the
/// publisher's shard's id: every QoS 2 message came twice.
#[tokio::test(flavor = "current_thread")]
async fn a_session_that_moved_off_a_node_of_two_shards_gets_the_other_shards_publications_once() {
    let mut c = Cluster::new("sessions-shards", 3, 3, &[]).with_shards(2);
    for id in 1..=3 {
        c.start(id, &[], false);
    }
    c.wait_for_leader();
    let (sub_id, pub_id) = (client_on(1, "mover"), client_on(0, "pub"));
    const N: usize = 10;

    // Node 2 routes the topic (another subscriber there), so node 1 sends it there.
    let (other, mut oe, _) = connect(options(&c, 2, "other", true), "other @2").await;
    other.subscribe("sh/t", QoS::ExactlyOnce).await.unwrap();
    until(&mut oe, "other SUBACK", |ev| match ev {
        Event::Incoming(Packet::SubAck(_)) => Some(()),
        _ => None,
    })
    .await;
    // Keep the other subscriber's connection served.
    let other_task = tokio::spawn(async move { while oe.poll().await.is_ok() {} });

    let (sub, mut se, _) = connect(options(&c, 1, &sub_id, false), "mover @1").await;
    sub.subscribe("sh/t", QoS::ExactlyOnce).await.unwrap();
    until(&mut se, "mover SUBACK", |ev| match ev {
        Event::Incoming(Packet::SubAck(_)) => Some(()),
        _ => None,
    })
    .await;
    let (publ, mut pe, _) = connect(options(&c, 1, &pub_id, true), "pub @1").await;
    let publish_all = async |prefix: &str, pe: &mut EventLoop| {
        for i in 0..N {
            publ.publish("sh/t", QoS::ExactlyOnce, false, format!("{prefix}{i}"))
                .await
                .unwrap();
            until(pe, "pub PUBCOMP", |ev| match ev {
                Event::Incoming(Packet::PubComp(_)) => Some(()),
                _ => None,
            })
            .await;
        }
    };
    publish_all("before", &mut pe).await;
    // Each delivered and its exchange complete (PUBCOMP sent): nothing in flight
    // moves with the session (a new rumqttc client would not know a PUBREL for it).
    let (mut delivered, mut completed) = (0, 0);
    while completed < N {
        let complete = until(&mut se, "mover @1 deliveries", |ev| match ev {
            Event::Incoming(Packet::Publish(_)) => Some(false),
            Event::Outgoing(Outgoing::PubComp(_)) => Some(true),
            _ => None,
        })
        .await;
        if complete {
            completed += 1;
        } else {
            delivered += 1;
        }
    }
    assert_eq!(delivered, N);
    // A round trip after the last PUBCOMP: node 1 has taken them all.
    sub.unsubscribe("sh/none").await.unwrap();
    until(&mut se, "mover UNSUBACK", |ev| match ev {
        Event::Incoming(Packet::UnsubAck(_)) => Some(()),
        _ => None,
    })
    .await;

    // The session moves to node 2.
    let (_sub2, mut se2, present) = connect(options(&c, 2, &sub_id, false), "mover @2").await;
    assert!(present, "CONNACK session present after the move");
    assert_eq!(
        ended(&mut se, "mover @1").await,
        Some(DisconnectReasonCode::SessionTakenOver)
    );
    drop(se);

    // The publisher on node 1's other shard goes on.
    let publishing = publish_all("after", &mut pe);
    let mut after = Vec::new();
    let receiving = async {
        let deadline = Instant::now() + RECV_TIMEOUT * 2;
        // Every message, then a pause: a copy would come within it.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = if after.len() >= N {
                Duration::from_millis(1_000)
            } else {
                left
            };
            match timeout(wait, se2.poll()).await {
                // A "before" one still in flight at the move is re-sent (DUP): fine.
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.payload.starts_with(b"after") => {
                    after.push(got(&p).payload)
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("mover @2: {e:?} after {after:?}"),
                Err(_) if after.len() >= N => break,
                Err(_) => panic!("mover @2: only {after:?}"),
            }
        }
    };
    tokio::join!(publishing, receiving);
    let expected: Vec<String> = (0..N).map(|i| format!("after{i}")).collect();
    assert_eq!(after, expected, "each once, in order");
    other_task.abort();
}

/// A node stopped (SIGSTOP) past its session lease does not acknowledge, at its resume,
/// what its clients sent meanwhile on the routes it had before the stop. While node 3
/// is stopped, a client subscribes on node 1 (the route barrier waits out node 3's
/// lease, then the SUBACK goes), and then node 3's publisher sends a QoS 1 PUBLISH,
/// which waits in node 3's socket buffer (node 3 here: a follower; node 1: the leader). Found by the data-plane simulation (harness
/// sync seed 307): at resume the shard read it before its tick checked the lease,
/// matched it against routes without the new subscriber's and acknowledged it, and the
/// subscriber never got it. Now the message reaches the subscriber, or the publisher
/// gets no PUBACK (its connection is fenced: it sends the message again elsewhere).
#[tokio::test(flavor = "current_thread")]
async fn a_node_stopped_past_its_lease_does_not_acknowledge_what_waited_on_stale_routes() {
    use common::{RawClient, connect_packet, publish_packet};
    use tessera_proto::{Packet as P, ProtocolVersion, QoS as Q};

    let c = three_nodes("sessions-stale-routes");
    // A follower stops (the others keep their leader, so the SUBSCRIBE needs no
    // election).
    let (leader, _) = c.wait_for_leader();
    let stopped = if leader == 3 { 2 } else { 3 };
    let v5 = ProtocolVersion::V5;
    let mut publisher = RawClient::connect_ok(
        c.node(stopped).addr(),
        connect_packet(v5, "stale-pub", true, 30),
    );
    c.node(stopped).signal(libc::SIGSTOP);
    let mut subscriber = RawClient::connect_ok(
        c.node(leader).addr(),
        connect_packet(v5, "stale-sub", true, 30),
    );
    let granted = subscriber.subscribe(1, &[("stale/t", Q::AtLeastOnce)]);
    assert_eq!(granted, [tessera_proto::ReasonCode::GrantedQoS1]);
    // After the SUBACK: into the stopped node's socket buffer.
    publisher.send(&publish_packet(
        "stale/t",
        b"after the SUBACK",
        Q::AtLeastOnce,
        1,
        false,
    ));
    std::thread::sleep(Duration::from_millis(200));
    c.node(stopped).signal(libc::SIGCONT);
    let acked = loop {
        match publisher.try_recv(RECV_TIMEOUT) {
            Ok(P::PubAck(a)) => {
                assert_eq!(a.packet_id, 1);
                break true;
            }
            Ok(P::Disconnect(_)) | Err(_) => break false,
            Ok(_) => {}
        }
    };
    if acked {
        match subscriber.try_recv(RECV_TIMEOUT) {
            Ok(P::Publish(p)) => assert_eq!(p.payload.as_ref(), b"after the SUBACK"),
            other => panic!("acknowledged by the stopped node, never delivered: {other:?}"),
        }
    }
}
