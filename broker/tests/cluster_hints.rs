//! Hints (issue 16, "the others keep serving"; docs/ARCHITECTURE.md "Cluster: hints
//! for an unreachable peer"): with real broker processes, a node killed (-9) that holds
//! a subscriber's session does not stall QoS 1/2 publishers on the other nodes once it
//! has been unreachable for the session lease: the publishing node keeps the batches
//! for it on disk (`data_dir/hints`) and answers their publishers, and sends them when
//! the node is back; a publishing node killed while it holds hints sends them after its
//! restart. Every acknowledged message arrives, QoS 2 once.
//!
//! Bounds here are liveness deadlines (the lease, 2 s, plus a failed call, plus
//! slack), never timings.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{RECV_TIMEOUT, RawClient, connect_packet, metric_sum, scrape};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tessera_proto::{Packet as P, ProtocolVersion, PubAck, PubComp, PubRec, ReasonCode};
use tokio::time::timeout;

/// How long the first acknowledgement after the subscriber's node died may take: its
/// lease (2 s) after the first call to it failed (a forward call gives up after 7 s),
/// with slack for a loaded machine. Without hints it never comes.
const FIRST_ACK_AFTER_KILL: Duration = Duration::from_secs(45);
/// Messages published after the kill.
const AFTER_KILL: usize = 12;

fn three_nodes(tag: &str) -> Cluster {
    let mut c = Cluster::new(tag, 3, 3, &[]);
    for id in 1..=3 {
        c.start(id, &[], false);
    }
    c.wait_for_leader();
    c
}

fn options(c: &Cluster, node: u64, id: &str) -> MqttOptions {
    let addr = c.node(node).addr();
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_connection_timeout(RECV_TIMEOUT.as_secs() * 2);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    o
}

/// Polls `events` until `f` picks an event, within `within`; panics otherwise.
async fn until<T>(
    events: &mut EventLoop,
    what: &str,
    within: Duration,
    mut f: impl FnMut(&Event) -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = match timeout(left, events.poll()).await {
            Ok(Ok(ev)) => ev,
            Ok(Err(e)) => panic!("{what}: connection error {e:?}"),
            Err(_) => panic!("{what}: nothing within {within:?}"),
        };
        if let Some(t) = f(&ev) {
            return t;
        }
    }
}

async fn connect(o: MqttOptions, what: &str) -> (AsyncClient, EventLoop) {
    let (client, mut events) = AsyncClient::new(o, 64);
    until(&mut events, what, RECV_TIMEOUT * 2, |ev| match ev {
        Event::Incoming(Packet::ConnAck(a)) => {
            assert_eq!(a.code, ConnectReturnCode::Success, "{what}: {a:?}");
            Some(())
        }
        _ => None,
    })
    .await;
    (client, events)
}

/// `id` subscribes to `filter` at QoS 2 with a persistent session on `node` and goes
/// offline: its messages are stored there.
async fn subscribe_then_go_offline(c: &Cluster, node: u64, id: &str, filter: &str) {
    let (sub, mut se) = connect(options(c, node, id), id).await;
    sub.subscribe(filter, QoS::ExactlyOnce).await.unwrap();
    until(&mut se, "SUBACK", RECV_TIMEOUT * 2, |ev| match ev {
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

/// The message `i`'s QoS: 1 and 2 in turn.
fn qos_of(i: usize) -> QoS {
    if i.is_multiple_of(2) {
        QoS::ExactlyOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Publishes `payload` and waits for its PUBACK / PUBCOMP within `within`.
async fn publish_acked(
    client: &AsyncClient,
    events: &mut EventLoop,
    topic: &str,
    i: usize,
    within: Duration,
) {
    client
        .publish(topic, qos_of(i), false, format!("m{i}"))
        .await
        .unwrap();
    until(events, &format!("the ack of m{i}"), within, |ev| match ev {
        Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)) => Some(()),
        _ => None,
    })
    .await;
}

fn metric(c: &Cluster, node: u64, name: &str, peer: &str) -> f64 {
    metric_sum(&scrape(c.node(node).admin_addr()), name, &[("peer", peer)])
}

/// Connects the subscriber's session on `node` once it is served again (a takeover
/// waits for an unreachable owner: refused 0x88 until then), session present.
fn reconnect_subscriber(c: &Cluster, node: u64, id: &str) -> RawClient {
    let mut connect = connect_packet(ProtocolVersion::V5, id, false, 30);
    connect.properties.session_expiry_interval = Some(600);
    let deadline = Instant::now() + RECV_TIMEOUT * 6;
    loop {
        let (client, ack) = RawClient::connect(c.node(node).addr(), connect.clone());
        if ack.reason_code == ReasonCode::Success {
            assert!(ack.session_present, "the session came back: {ack:?}");
            return client;
        }
        assert_eq!(ack.reason_code, ReasonCode::ServerUnavailable, "{ack:?}");
        assert!(Instant::now() < deadline, "the node is back, yet refused");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Receives until every one of `acked` arrived (answering as a client must), then
/// a little longer for duplicates; asserts QoS 2 ones once.
fn receive_all(client: &mut RawClient, acked: &[usize]) {
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + RECV_TIMEOUT * 8;
    let want: Vec<String> = acked.iter().map(|i| format!("m{i}")).collect();
    let mut quiet_until: Option<Instant> = None;
    loop {
        let all = want.iter().all(|m| got.contains_key(m));
        if all && quiet_until.is_none() {
            quiet_until = Some(Instant::now() + Duration::from_secs(2));
        }
        if quiet_until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every acknowledged message arrived: missing {:?}",
            want.iter()
                .filter(|m| !got.contains_key(*m))
                .collect::<Vec<_>>()
        );
        match client.try_recv(Duration::from_millis(500)) {
            Ok(P::Publish(p)) => {
                *got.entry(String::from_utf8_lossy(&p.payload).into_owned())
                    .or_default() += 1;
                match p.qos {
                    tessera_proto::QoS::ExactlyOnce => {
                        client.send(&P::PubRec(PubRec::new(p.packet_id)))
                    }
                    tessera_proto::QoS::AtLeastOnce => {
                        client.send(&P::PubAck(PubAck::new(p.packet_id)))
                    }
                    tessera_proto::QoS::AtMostOnce => {}
                }
            }
            Ok(P::PubRel(r)) => client.send(&P::PubComp(PubComp::new(r.packet_id))),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(common::Closed::Timeout) => {}
            Err(common::Closed::Eof) => panic!("the subscriber's connection closed"),
        }
    }
    for i in acked {
        if qos_of(*i) == QoS::ExactlyOnce {
            assert_eq!(got[&format!("m{i}")], 1, "QoS 2 m{i} exactly once: {got:?}");
        }
    }
}

/// Node 3 holds an offline subscriber's session; node 1 publishes to it at QoS 1 and
/// 2. Node 3 killed: after its lease node 1 hints, PUBACKs / PUBCOMPs resume; node 3
/// restarted on its disk gets every acknowledged message, and node 1's hints are
/// deleted. Without hints no acknowledgement comes while node 3 is down.
#[tokio::test(flavor = "current_thread")]
async fn publishers_are_answered_while_a_subscribers_node_is_dead_and_it_gets_everything_back() {
    let mut c = three_nodes("hints-dead");
    subscribe_then_go_offline(&c, 3, "hint-sub", "hint/t").await;
    let (publ, mut pe) = connect(options(&c, 1, "hint-pub"), "hint-pub").await;
    let mut acked = Vec::new();
    for i in 0..4 {
        publish_acked(&publ, &mut pe, "hint/t", i, RECV_TIMEOUT * 2).await;
        acked.push(i);
    }

    c.kill(3);
    // The first acknowledgement after the kill: once node 3 has been unreachable for
    // the lease. Then each in turn (each is a hint write).
    for i in 4..4 + AFTER_KILL {
        let within = if i == 4 {
            FIRST_ACK_AFTER_KILL
        } else {
            RECV_TIMEOUT * 2
        };
        publish_acked(&publ, &mut pe, "hint/t", i, within).await;
        acked.push(i);
    }
    assert!(
        metric(&c, 1, "tessera_cluster_forward_hints_written_total", "3") >= 1.0,
        "node 1 answered its publisher through hints"
    );
    assert!(metric(&c, 1, "tessera_cluster_forward_hinted_batches", "3") >= 1.0);

    c.start(3, &[], false);
    c.wait_for_leader();
    let mut sub = reconnect_subscriber(&c, 3, "hint-sub");
    receive_all(&mut sub, &acked);
    c.wait_until("node 1's hints for node 3 deleted once delivered", |c| {
        metric(c, 1, "tessera_cluster_forward_hinted_batches", "3") == 0.0
            && metric(c, 1, "tessera_cluster_forward_hinted_bytes", "3") == 0.0
    });
}

/// As above, and node 1 is killed (-9) while it holds hints for node 3, then
/// restarted (node 3 still down: node 1 finds its earlier life's hints), then node 3:
/// every message node 1 acknowledged arrives, QoS 2 once.
#[tokio::test(flavor = "current_thread")]
async fn a_node_killed_while_it_holds_hints_sends_them_after_its_restart() {
    let mut c = three_nodes("hints-sender-killed");
    subscribe_then_go_offline(&c, 3, "hint-sub2", "hint2/t").await;
    let (publ, mut pe) = connect(options(&c, 1, "hint-pub2"), "hint-pub2").await;
    let mut acked = Vec::new();
    for i in 0..2 {
        publish_acked(&publ, &mut pe, "hint2/t", i, RECV_TIMEOUT * 2).await;
        acked.push(i);
    }
    c.kill(3);
    for i in 2..2 + AFTER_KILL {
        let within = if i == 2 {
            FIRST_ACK_AFTER_KILL
        } else {
            RECV_TIMEOUT * 2
        };
        publish_acked(&publ, &mut pe, "hint2/t", i, within).await;
        acked.push(i);
    }
    let hinted = metric(&c, 1, "tessera_cluster_forward_hinted_batches", "3");
    assert!(hinted >= 1.0, "node 1 holds hints for node 3");
    drop(publ);
    drop(pe);

    c.kill(1);
    c.start(1, &[], false);
    c.wait_for_leader();
    c.wait_until("node 1 restarted with its earlier hints", |c| {
        metric(c, 1, "tessera_cluster_forward_hinted_batches", "3") >= 1.0
    });

    c.start(3, &[], false);
    c.wait_for_leader();
    let mut sub = reconnect_subscriber(&c, 3, "hint-sub2");
    receive_all(&mut sub, &acked);
    c.wait_until("node 1's earlier hints deleted once delivered", |c| {
        metric(c, 1, "tessera_cluster_forward_hinted_batches", "3") == 0.0
    });
}
