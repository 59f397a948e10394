//! The fault tests' history checker (`common::history`, issue 16) and the node log
//! lines it reads:
//! - the checker on synthetic histories: each kind of violation is found (acked but
//!   lost, a lost session, QoS 2 and QoS 0 duplicates, order, a ClientID live on two
//!   nodes), a clean history passes, a publication sent before the SUBACK is not
//!   expected, a QoS 2 re-send of an unreleased packet id is one delivery, an inversion
//!   past a move's hold is late, not wrong, and a paused or killed node's span is cut;
//! - the broker's client log lines (`tessera::clients`): a connect, a takeover on one
//!   node and a clean disconnect, a takeover across two cluster nodes, and a node out
//!   of contact fencing its client, each with the fields the checker reads; and the
//!   recorder on real rumqttc event loops
//!   (publishers and a subscriber at QoS 1 and 2), whose history checks clean.
//!
//! Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::history::synthetic::{At, rfc3339};
use common::history::{self, ClientLine, Fault, History, LineKind, NodeLog, Recorder};
use common::{Broker, RECV_TIMEOUT};

const LEASE: Duration = Duration::from_secs(2);

/// The client log lines are off by default (`log.clients`).
const CLIENT_LOG: &[(&str, &str)] = &[("TESSERA_LOG__CLIENTS", "true")];

// ----------------------------------------------------------------------------
// The checker on synthetic histories

/// A subscriber `s` (QoS 1 on `t/#` at 10 ms) and a publisher `p`, both on node 1.
fn base() -> At {
    let a = At::new();
    a.connack(0, "s", 1, false);
    a.connack(1, "p", 1, false);
    a.suback(10, "s", "t/#", 1);
    a
}

#[test]
fn a_clean_history_passes() {
    let a = base();
    a.sent(20, "p", "t/a", 1, 1);
    a.delivered(25, "s", "t/a", 1, 1, false, "p", 1);
    a.acked(26, "p", 1);
    a.sent(30, "p", "t/a", 2, 2);
    a.delivered(35, "s", "t/a", 1, 2, false, "p", 2);
    a.acked(36, "p", 2);
    // QoS 1 may come twice.
    a.delivered(37, "s", "t/a", 1, 3, true, "p", 2);
    let r = a.check(&[], LEASE, 100);
    r.assert_clean();
    assert_eq!(r.counts.expected, 2, "{r}");
    assert_eq!(r.counts.acked, 2, "{r}");
    assert!(r.to_string().contains("seed 7"), "{r}");
}

#[test]
fn an_acknowledged_publication_that_never_arrives_is_lost() {
    let a = base();
    a.sent(20, "p", "t/a", 1, 1);
    a.acked(26, "p", 1);
    a.sent(30, "p", "t/b", 2, 2);
    a.acked(36, "p", 2);
    // Not acknowledged: no promise.
    a.sent(40, "p", "t/c", 1, 3);
    // Not matching.
    a.sent(50, "p", "u/a", 1, 4);
    a.acked(56, "p", 4);
    let r = a.check(&[], LEASE, 100);
    assert_eq!(r.acked_lost.len(), 2, "{r}");
    assert!(r.acked_lost[0].contains("p/1"), "{r}");
    assert!(r.acked_lost[1].contains("p/2"), "{r}");
    assert!(!r.is_clean());
    let text = std::panic::catch_unwind(|| r.assert_clean())
        .expect_err("assert_clean panics")
        .downcast::<String>()
        .expect("a formatted message");
    assert!(text.contains("acknowledged but lost: 2"), "{text}");
}

#[test]
fn only_publications_sent_after_the_suback_are_expected() {
    let a = At::new();
    a.connack(0, "s", 1, false);
    a.connack(1, "p", 1, false);
    a.sent(5, "p", "t/a", 1, 1);
    a.acked(8, "p", 1);
    a.suback(10, "s", "t/#", 1);
    a.sent(10, "p", "t/a", 1, 2); // at the SUBACK's time: not after it
    a.acked(12, "p", 2);
    a.sent(11, "p", "t/a", 1, 3);
    a.acked(13, "p", 3);
    let r = a.check(&[], LEASE, 100);
    assert_eq!(r.counts.expected, 1, "{r}");
    assert_eq!(r.acked_lost.len(), 1, "{r}");
    assert!(r.acked_lost[0].contains("p/3"), "{r}");
    // A QoS 0 grant promises nothing either.
    let a = At::new();
    a.connack(0, "s", 1, false);
    a.suback(10, "s", "t/#", 0);
    a.sent(20, "p", "t/a", 1, 1);
    a.acked(26, "p", 1);
    a.check(&[], LEASE, 100).assert_clean();
}

#[test]
fn a_lost_session_is_its_own_error_and_voids_its_subscriptions() {
    let a = base();
    a.sent(20, "p", "t/a", 1, 1);
    a.acked(26, "p", 1);
    // The subscriber comes back to a fresh session: p/1 is not reported lost, the
    // session is.
    a.connack(40, "s", 2, false);
    let r = a.check(&[], LEASE, 100);
    assert_eq!(r.lost_sessions.len(), 1, "{r}");
    assert!(r.lost_sessions[0].contains("node 2"), "{r}");
    assert!(r.acked_lost.is_empty(), "{r}");
    assert!(!r.is_clean());
    a.h.allow_lost_sessions("the scenario expires sessions");
    let r = a.check(&[], LEASE, 100);
    r.assert_clean();
    assert!(r.to_string().contains("allowed: the scenario"), "{r}");
    // A session kept (present = 1) keeps its subscriptions.
    let a = base();
    a.connack(15, "s", 2, true);
    a.sent(20, "p", "t/a", 1, 1);
    a.acked(26, "p", 1);
    let r = a.check(&[], LEASE, 100);
    assert_eq!(r.acked_lost.len(), 1, "{r}");
    assert!(r.lost_sessions.is_empty(), "{r}");
}

#[test]
fn a_qos2_message_twice_is_a_duplicate_unless_its_packet_id_was_not_released() {
    let a = At::new();
    a.connack(0, "s", 1, false);
    a.suback(10, "s", "t/#", 2);
    a.sent(20, "p", "t/a", 2, 1);
    a.acked(30, "p", 1);
    a.delivered(21, "s", "t/a", 2, 7, false, "p", 1);
    // The broker re-sends before the client saw PUBREL: the same message.
    a.delivered(22, "s", "t/a", 2, 7, true, "p", 1);
    a.released(23, "s", 7);
    let r = a.check(&[], LEASE, 100);
    r.assert_clean();
    assert_eq!(r.counts.qos2_resends, 1, "{r}");
    // After PUBREL, or with another packet id, it is a duplicate (DUP or not).
    a.delivered(40, "s", "t/a", 2, 7, true, "p", 1);
    a.delivered(41, "s", "t/a", 2, 8, false, "p", 1);
    let r = a.check(&[], LEASE, 100);
    assert_eq!(r.qos2_duplicates.len(), 1, "{r}");
    assert!(r.qos2_duplicates[0].contains("3 times"), "{r}");
}

#[test]
fn a_qos0_message_twice_to_one_session_is_a_duplicate() {
    let a = base();
    a.sent(20, "p", "t/a", 0, 1);
    a.delivered(21, "s", "t/a", 0, 0, false, "p", 1);
    a.check(&[], LEASE, 100).assert_clean();
    a.delivered(22, "s", "t/a", 0, 0, false, "p", 1);
    let r = a.check(&[], LEASE, 100);
    assert_eq!(r.qos0_duplicates.len(), 1, "{r}");
}

#[test]
fn first_deliveries_out_of_publication_order_are_violations() {
    let a = base();
    for seq in 1..=3 {
        a.sent(20 + seq, "p", "t/a", 1, seq);
    }
    a.delivered(30, "s", "t/a", 1, 1, false, "p", 1);
    a.delivered(31, "s", "t/a", 1, 2, false, "p", 3);
    a.delivered(32, "s", "t/a", 1, 3, false, "p", 2);
    // A second copy of an earlier message is not a first delivery.
    a.delivered(33, "s", "t/a", 1, 4, true, "p", 1);
    let r = a.check(&[], LEASE, 100);
    assert_eq!(r.order.len(), 1, "{r}");
    assert!(
        r.order[0].contains("p/2") && r.order[0].contains("after p/3"),
        "{r}"
    );
    // Other topics, QoS and publisher connections are other streams.
    let a = base();
    a.sent(21, "p", "t/a", 1, 1);
    a.sent(22, "p", "t/b", 1, 2);
    a.sent(23, "p", "t/a", 2, 3);
    a.connack(24, "p", 1, true);
    a.sent(25, "p", "t/a", 1, 4);
    a.sent(26, "p", "t/a", 1, 5);
    a.delivered(30, "s", "t/a", 1, 1, false, "p", 5);
    a.delivered(31, "s", "t/a", 1, 2, false, "p", 3);
    a.delivered(32, "s", "t/b", 1, 3, false, "p", 2);
    a.delivered(33, "s", "t/a", 1, 4, false, "p", 1);
    a.delivered(34, "s", "t/a", 1, 5, false, "p", 4);
    let r = a.check(&[], LEASE, 100);
    assert_eq!(r.order.len(), 1, "only p/4 after p/5: {r}");
    assert!(r.order[0].contains("p/4"), "{r}");
}

#[test]
fn order_ignores_resent_publications_and_allows_late_copies_past_a_moves_hold() {
    let a = base();
    a.sent(21, "p", "t/a", 1, 1);
    a.sent(22, "p", "t/a", 1, 2);
    a.resent(23, "p", 1);
    a.delivered(30, "s", "t/a", 1, 1, false, "p", 2);
    a.delivered(31, "s", "t/a", 1, 2, false, "p", 1);
    a.check(&[], LEASE, 100).assert_clean();
    // The subscriber moved to node 2; p/1 came 3.5 s after p/2: past the hold.
    let a = base();
    a.sent(21, "p", "t/a", 1, 1);
    a.sent(22, "p", "t/a", 1, 2);
    a.connack(25, "s", 2, true);
    a.delivered(30, "s", "t/a", 1, 1, false, "p", 2);
    a.delivered(3_531, "s", "t/a", 1, 2, false, "p", 1);
    let r = a.check(&[], LEASE, 4_000);
    r.assert_clean();
    assert_eq!(r.late.len(), 1, "{r}");
    // Within the hold it is an error, and so is any inversion without a move.
    let a = base();
    a.sent(21, "p", "t/a", 1, 1);
    a.sent(22, "p", "t/a", 1, 2);
    a.connack(25, "s", 2, true);
    a.delivered(30, "s", "t/a", 1, 1, false, "p", 2);
    a.delivered(1_030, "s", "t/a", 1, 2, false, "p", 1);
    assert_eq!(a.check(&[], LEASE, 4_000).order.len(), 1);
    // Its node gave the client's hold up (logged) after its CONNACK there: late.
    let a = base();
    a.sent(21, "p", "t/a", 1, 1);
    a.sent(22, "p", "t/a", 1, 2);
    a.connack(25, "s", 2, true);
    a.delivered(30, "s", "t/a", 1, 1, false, "p", 2);
    a.delivered(1_030, "s", "t/a", 1, 2, false, "p", 1);
    let gave_up = |ms: u64, node: u64| NodeLog {
        node,
        text: a.line(
            ms,
            &format!("client order hold given up client_id=\"s\" node={node} shard=0"),
        ),
    };
    let r = a.check(&[gave_up(1_000, 2)], LEASE, 4_000);
    r.assert_clean();
    assert_eq!((r.late.len(), r.counts.holds_given_up), (1, 1), "{r}");
    // Another node's, or before the client came: an error.
    assert_eq!(a.check(&[gave_up(1_000, 1)], LEASE, 4_000).order.len(), 1);
    assert_eq!(a.check(&[gave_up(20, 2)], LEASE, 4_000).order.len(), 1);
    // Given up while the client was away from the node its session stayed on, and
    // delivered once it reconnected there (CHAOS_SEED=904807: the node paused past
    // the hold, the client back after its resume): late. The hold is the session's.
    let away = |back_via: Option<u64>| {
        let a = base();
        a.sent(21, "p", "t/a", 1, 1);
        a.sent(22, "p", "t/a", 1, 2);
        a.connack(25, "s", 2, true);
        a.delivered(30, "s", "t/a", 1, 1, false, "p", 2);
        if let Some(node) = back_via {
            a.connack(1_005, "s", node, true);
        }
        a.connack(1_010, "s", 2, true);
        a.delivered(1_030, "s", "t/a", 1, 2, false, "p", 1);
        let log = NodeLog {
            node: 2,
            text: a.line(
                1_000,
                "client order hold given up client_id=\"s\" node=2 shard=0",
            ),
        };
        a.check(&[log], LEASE, 4_000)
    };
    let r = away(None);
    r.assert_clean();
    assert_eq!(r.late.len(), 1, "{r}");
    // A stay elsewhere between: the session came back with a new window, whose hold
    // held: an error.
    assert_eq!(away(Some(1)).order.len(), 1);
    // Its node killed between: late.
    let a = base();
    a.sent(21, "p", "t/a", 1, 1);
    a.sent(22, "p", "t/a", 1, 2);
    a.connack(25, "s", 2, true);
    a.delivered(30, "s", "t/a", 1, 1, false, "p", 2);
    a.fault(40, Fault::Kill(2));
    a.fault(50, Fault::Start(2));
    a.delivered(1_030, "s", "t/a", 1, 2, false, "p", 1);
    let r = a.check(&[], LEASE, 4_000);
    r.assert_clean();
    assert_eq!(r.late.len(), 1, "{r}");
}

fn live(a: &At, ms: u64, client: &str, node: u64, conn: &str) -> String {
    a.line(
        ms,
        &format!(
            "client live client_id=\"{client}\" node={node} shard=0 conn={conn} epoch=3 \
             session_present=false"
        ),
    )
}

fn ended(a: &At, ms: u64, client: &str, node: u64, conn: &str, reason: &str) -> String {
    a.line(
        ms,
        &format!(
            "client ended client_id=\"{client}\" node={node} shard=0 conn={conn} \
             reason={reason}"
        ),
    )
}

#[test]
fn a_client_live_on_two_nodes_beyond_the_tolerance_is_reported() {
    let a = At::new();
    let logs = [
        NodeLog {
            node: 1,
            text: live(&a, 0, "c", 1, "0#1") + &ended(&a, 5_000, "c", 1, "0#1", "fenced"),
        },
        NodeLog {
            node: 2,
            text: live(&a, 1_000, "c", 2, "0#1"),
        },
    ];
    let r = a.check(&logs, LEASE, 10_000);
    assert_eq!(r.two_nodes.len(), 1, "{r}");
    assert!(r.two_nodes[0].contains("4s"), "{r}");
    assert_eq!(r.counts.live_spans, 2, "{r}");
    // Within the tolerance: counted, not an error.
    let r = a.check(&logs, Duration::from_secs(5), 10_000);
    r.assert_clean();
    assert_eq!(r.counts.overlaps, 1, "{r}");
    assert_eq!(r.counts.overlap_max, Duration::from_secs(4), "{r}");
}

#[test]
fn a_takeover_with_the_old_end_first_does_not_overlap() {
    let a = At::new();
    let logs = [
        NodeLog {
            node: 1,
            text: live(&a, 0, "c", 1, "0#1")
                + &ended(&a, 1_000, "c", 1, "0#1", "taken_over")
                + &live(&a, 3_000, "c", 1, "0#2"),
        },
        NodeLog {
            node: 2,
            text: live(&a, 1_001, "c", 2, "1#1") + &ended(&a, 2_999, "c", 2, "1#1", "taken_over"),
        },
    ];
    let r = a.check(&logs, Duration::ZERO, 10_000);
    r.assert_clean();
    assert_eq!(r.counts.live_spans, 3, "{r}");
    assert_eq!(r.counts.overlaps, 0, "{r}");
    assert!(
        r.to_string()
            .contains("live spans ended: open 1, taken_over 2"),
        "{r}"
    );
}

#[test]
fn a_killed_node_ends_its_spans_and_a_paused_one_serves_nothing() {
    let a = At::new();
    // Node 1 was killed at 500 ms with c live (no end line); c went live on node 2
    // at 600 ms; node 1 restarted and its log goes on (the same conn id again).
    a.fault(500, Fault::Kill(1));
    a.fault(4_000, Fault::Start(1));
    let logs = [
        NodeLog {
            node: 1,
            text: live(&a, 0, "c", 1, "0#1") + &live(&a, 9_000, "d", 1, "0#1"),
        },
        NodeLog {
            node: 2,
            text: live(&a, 600, "c", 2, "0#1"),
        },
    ];
    let r = a.check(&logs, Duration::ZERO, 10_000);
    r.assert_clean();
    assert_eq!(r.counts.live_spans, 3, "{r}");
    // Node 3 paused from 100 ms to 10 s with e live; e live on node 4 from 3 s; node 3
    // fences e 50 ms after it resumed: 50 ms on two nodes.
    let a = At::new();
    a.fault(100, Fault::Pause(3));
    a.fault(10_000, Fault::Resume(3));
    let logs = [
        NodeLog {
            node: 3,
            text: live(&a, 0, "e", 3, "0#1") + &ended(&a, 10_050, "e", 3, "0#1", "fenced"),
        },
        NodeLog {
            node: 4,
            text: live(&a, 3_000, "e", 4, "0#1"),
        },
    ];
    let r = a.check(&logs, Duration::from_millis(40), 20_000);
    assert_eq!(r.two_nodes.len(), 1, "{r}");
    assert!(r.two_nodes[0].contains("50ms"), "{r}");
    let r = a.check(&logs, Duration::from_millis(60), 20_000);
    r.assert_clean();
    assert_eq!(r.counts.overlap_max, Duration::from_millis(50), "{r}");
}

#[test]
fn node_logs_without_client_lines_are_an_error_not_a_pass() {
    let a = base();
    let quiet = [NodeLog {
        node: 1,
        text: a.line(5, "something else") + "plain text\n",
    }];
    let r = a.check(&quiet, LEASE, 100);
    assert_eq!(r.two_nodes.len(), 1, "{r}");
    assert!(r.two_nodes[0].contains("log.clients = true"), "{r}");
    // No logs given: the caller checks the history alone.
    a.check(&[], LEASE, 100).assert_clean();
}

#[test]
fn a_delivery_nobody_sent_is_reported() {
    let a = base();
    a.sent(20, "p", "t/a", 1, 1);
    a.delivered(21, "s", "t/a", 1, 1, false, "p", 1);
    a.delivered(22, "s", "t/a", 1, 2, false, "p", 9);
    // A will or anything not of the form <publisher>/<seq> of a known publisher.
    a.delivered(23, "s", "t/a", 1, 3, false, "someone-else", 1);
    let r = a.check(&[], LEASE, 100);
    assert_eq!(r.unknown.len(), 1, "{r}");
    assert!(r.unknown[0].contains("p/9"), "{r}");
    assert_eq!(r.counts.foreign, 1, "{r}");
}

#[test]
fn the_report_prints_the_seed_and_the_fault_schedule() {
    let a = base();
    a.fault(1_500, Fault::Kill(2));
    a.fault(2_500, Fault::Other("partition {1} | {2, 3}".into()));
    let text = a.check(&[], LEASE, 3_000).to_string();
    assert!(
        text.starts_with("seed 7\nfault schedule (2 faults):\n"),
        "{text}"
    );
    assert!(text.contains("+1.500s kill -9 node 2"), "{text}");
    assert!(text.contains("+2.500s partition {1} | {2, 3}"), "{text}");
}

#[test]
fn client_lines_are_read_from_coloured_text_logs() {
    let us = 1_796_659_200_123_456; // 2026-12-07T16:00:00.123456Z
    assert_eq!(rfc3339(us), "2026-12-07T16:00:00.123456Z");
    let text = format!(
        "\u{1b}[2m{}\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mtessera::clients\u{1b}[0m\u{1b}[2m:\u{1b}[0m \
         client live \u{1b}[3mclient_id\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"a b\\\"c\" \u{1b}[3mnode\u{1b}[0m\u{1b}[2m=\u{1b}[0m2 \
         \u{1b}[3mshard\u{1b}[0m\u{1b}[2m=\u{1b}[0m1 \u{1b}[3mconn\u{1b}[0m\u{1b}[2m=\u{1b}[0m4#9 \
         \u{1b}[3mepoch\u{1b}[0m\u{1b}[2m=\u{1b}[0m12 \u{1b}[3msession_present\u{1b}[0m\u{1b}[2m=\u{1b}[0mtrue\n\
         {}  INFO tessera::server: something else\n",
        rfc3339(us),
        rfc3339(us + 1)
    );
    let lines = history::client_lines(&text);
    assert_eq!(
        lines,
        [ClientLine {
            at_us: us,
            kind: LineKind::Live,
            client_id: "a b\"c".into(),
            node: Some(2),
            shard: 1,
            conn: "4#9".into(),
            epoch: Some(12),
            session_present: Some(true),
            reason: None,
        }]
    );
}

#[test]
fn client_lines_are_read_from_json_logs() {
    let text = "{\"timestamp\":\"2026-12-07T16:15:04.051432Z\",\"level\":\"INFO\",\"fields\":{\"message\":\"client ended\",\"client_id\":\"x y\",\"node\":3,\"shard\":1,\"conn\":\"0#1\",\"reason\":\"fenced\"},\"target\":\"tessera::clients\"}\n\
                {\"timestamp\":\"2026-12-07T16:15:04.051433Z\",\"level\":\"INFO\",\"fields\":{\"message\":\"client ended\"},\"target\":\"broker\"}\n";
    assert_eq!(
        history::client_lines(text),
        [ClientLine {
            at_us: 1_796_660_104_051_432,
            kind: LineKind::Ended,
            client_id: "x y".into(),
            node: Some(3),
            shard: 1,
            conn: "0#1".into(),
            epoch: None,
            session_present: None,
            reason: Some("fenced".into()),
        }]
    );
}

// ----------------------------------------------------------------------------
// The broker's client log lines, and the recorder on real clients

fn lines_of(broker: &Broker, client: &str) -> Vec<ClientLine> {
    history::client_lines(&broker.log())
        .into_iter()
        .filter(|l| l.client_id == client)
        .collect()
}

/// Waits until `broker`'s log has `n` client lines of `client`.
fn wait_lines(broker: &Broker, client: &str, n: usize) -> Vec<ClientLine> {
    let deadline = Instant::now() + RECV_TIMEOUT;
    loop {
        let lines = lines_of(broker, client);
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{n} client lines of {client} not within {RECV_TIMEOUT:?}:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn options4(addr: std::net::SocketAddr, id: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false);
    o
}

/// Polls until the CONNACK; returns session present.
async fn connected(events: &mut rumqttc::EventLoop, rec: Option<&Recorder>) -> bool {
    let deadline = Instant::now() + RECV_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, events.poll())
            .await
            .expect("a CONNACK in time")
            .expect("no connection error");
        if let Some(rec) = rec {
            rec.on_v4(&ev);
        }
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)) = ev {
            return a.session_present;
        }
    }
}

/// Polls until the connection ends (the broker closed it).
async fn closed(events: &mut rumqttc::EventLoop) {
    closed_within(events, RECV_TIMEOUT).await;
}

async fn closed_within(events: &mut rumqttc::EventLoop, bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.poll()).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            Err(_) => panic!("still connected after {bound:?}"),
        }
    }
}

/// Sends SIGCONT to a stopped process when dropped (also when the test fails).
struct Resume(libc::pid_t);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: kill(2) with the pid of a broker this test spawned and still holds.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_connect_a_takeover_and_a_disconnect_are_logged_with_their_reasons() {
    let broker = Broker::start_with(&[], CLIENT_LOG);
    let (c1, mut e1) = rumqttc::AsyncClient::new(options4(broker.addr(), "logged"), 10);
    assert!(!connected(&mut e1, None).await);
    let lines = wait_lines(&broker, "logged", 1);
    assert_eq!(lines[0].kind, LineKind::Live, "{lines:?}");
    assert_eq!(lines[0].session_present, Some(false), "{lines:?}");
    assert_eq!(lines[0].node, None, "one node: no node id");
    assert_eq!(lines[0].epoch, None, "one node: no claim");
    // The same ClientID again: the first connection is taken over.
    let (c2, mut e2) = rumqttc::AsyncClient::new(options4(broker.addr(), "logged"), 10);
    assert!(connected(&mut e2, None).await);
    closed(&mut e1).await;
    let lines = wait_lines(&broker, "logged", 3);
    assert_eq!(lines[1].kind, LineKind::Ended, "{lines:?}");
    assert_eq!(lines[1].conn, lines[0].conn, "{lines:?}");
    assert_eq!(lines[1].reason.as_deref(), Some("taken_over"), "{lines:?}");
    assert_eq!(lines[2].kind, LineKind::Live, "{lines:?}");
    assert_eq!(lines[2].session_present, Some(true), "{lines:?}");
    assert_ne!(lines[2].conn, lines[0].conn, "{lines:?}");
    // A clean disconnect.
    c2.disconnect().await.unwrap();
    closed(&mut e2).await;
    let lines = wait_lines(&broker, "logged", 4);
    assert_eq!(lines[3].kind, LineKind::Ended, "{lines:?}");
    assert_eq!(lines[3].conn, lines[2].conn, "{lines:?}");
    assert_eq!(
        lines[3].reason.as_deref(),
        Some("client_disconnect"),
        "{lines:?}"
    );
    drop(c1);
    let spans = history::live_spans(
        &[NodeLog {
            node: 1,
            text: broker.log(),
        }],
        &[],
        u64::MAX,
    );
    assert_eq!(spans.len(), 2, "{spans:?}");
    assert!(spans[0].to_us <= spans[1].from_us, "{spans:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn the_client_lines_are_off_by_default() {
    let mut broker = Broker::start();
    let (c, mut e) = rumqttc::AsyncClient::new(options4(broker.addr(), "quiet"), 10);
    assert!(!connected(&mut e, None).await);
    c.disconnect().await.unwrap();
    closed(&mut e).await;
    // Everything the broker logged, up to its exit.
    broker.sigterm();
    broker.wait_exit(RECV_TIMEOUT);
    let log = broker.log();
    assert!(log.contains("shutting down"), "{log}");
    assert!(!log.contains(history::CLIENTS_TARGET), "{log}");
}

#[tokio::test(flavor = "current_thread")]
async fn the_json_log_format_gives_the_same_lines() {
    let broker = Broker::start_with(
        &[],
        &[
            ("TESSERA_LOG__CLIENTS", "true"),
            ("TESSERA_LOG__FORMAT", "json"),
        ],
    );
    let (c, mut e) = rumqttc::AsyncClient::new(options4(broker.addr(), "a \"json\" id"), 10);
    assert!(!connected(&mut e, None).await);
    c.disconnect().await.unwrap();
    closed(&mut e).await;
    let lines = wait_lines(&broker, "a \"json\" id", 2);
    assert_eq!(lines[0].kind, LineKind::Live, "{lines:?}");
    assert_eq!(lines[0].session_present, Some(false), "{lines:?}");
    assert_eq!(lines[1].kind, LineKind::Ended, "{lines:?}");
    assert_eq!(lines[1].conn, lines[0].conn, "{lines:?}");
    assert_eq!(
        lines[1].reason.as_deref(),
        Some("client_disconnect"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_takeover_across_nodes_is_logged_on_both_with_node_and_epoch() {
    let mut c = Cluster::new("client-log", 2, 2, CLIENT_LOG);
    for id in 1..=2 {
        c.start(id, &[], false);
    }
    c.wait_for_leader();
    let (_c1, mut e1) = rumqttc::AsyncClient::new(options4(c.node(1).addr(), "moving"), 10);
    assert!(!connected(&mut e1, None).await);
    let (_c2, mut e2) = rumqttc::AsyncClient::new(options4(c.node(2).addr(), "moving"), 10);
    // A takeover may wait for the old node (bounded by the session lease).
    let mut n = e2.network_options();
    n.set_connection_timeout(RECV_TIMEOUT.as_secs() * 2);
    e2.set_network_options(n);
    assert!(connected(&mut e2, None).await);
    closed(&mut e1).await;
    let on1 = wait_lines(c.node(1), "moving", 2);
    let on2 = wait_lines(c.node(2), "moving", 1);
    assert_eq!(on1[0].kind, LineKind::Live, "{on1:?}");
    assert_eq!(on1[1].kind, LineKind::Ended, "{on1:?}");
    assert_eq!(on1[0].node, Some(1), "{on1:?}");
    assert_eq!(on1[1].reason.as_deref(), Some("taken_over"), "{on1:?}");
    assert_eq!(on2[0].kind, LineKind::Live, "{on2:?}");
    assert_eq!(on2[0].node, Some(2), "{on2:?}");
    assert_eq!(on2[0].session_present, Some(true), "{on2:?}");
    let (e1, e2) = (
        on1[0].epoch.expect("an epoch"),
        on2[0].epoch.expect("an epoch"),
    );
    assert!(e2 > e1, "a takeover claims a newer epoch: {on1:?} {on2:?}");
    // The checker reads the same lines: one span per node, none at the same time.
    let h = History::new(0);
    let logs: Vec<NodeLog> = (1..=2)
        .map(|n| NodeLog {
            node: n,
            text: c.node(n).log(),
        })
        .collect();
    let r = history::check(&h, &logs, Duration::ZERO);
    r.assert_clean();
    assert_eq!(r.counts.live_spans, 2, "{r}");
    assert_eq!(r.counts.overlaps, 0, "{r}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_out_of_contact_logs_the_clients_it_fenced() {
    let mut c = Cluster::new("client-fence", 2, 2, CLIENT_LOG);
    for id in 1..=2 {
        c.start(id, &[], false);
    }
    c.wait_for_leader();
    let (_c1, mut e1) = rumqttc::AsyncClient::new(options4(c.node(1).addr(), "fenced"), 10);
    assert!(!connected(&mut e1, None).await);
    // Node 1 alone is no majority: out of contact for the session lease (2 s), it
    // ends the connection.
    let pid = libc::pid_t::try_from(c.node(2).pid()).expect("pid fits pid_t");
    // SAFETY: kill(2) with the pid of a broker this test spawned and still holds.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let resume = Resume(pid);
    closed_within(&mut e1, RECV_TIMEOUT * 2).await;
    let lines = wait_lines(c.node(1), "fenced", 2);
    assert_eq!(lines[1].kind, LineKind::Ended, "{lines:?}");
    assert_eq!(lines[1].conn, lines[0].conn, "{lines:?}");
    assert_eq!(lines[1].reason.as_deref(), Some("fenced"), "{lines:?}");
    drop(resume);
}

/// Runs a rumqttc v4 client's event loop on its own thread, recording every event,
/// until `stop` says so; returns the client.
fn run_client(
    rt: &tokio::runtime::Runtime,
    o: rumqttc::MqttOptions,
    rec: Recorder,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> rumqttc::AsyncClient {
    let (client, mut events) = rumqttc::AsyncClient::new(o, 100);
    rt.spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(100), events.poll()).await {
                Ok(Ok(ev)) => rec.on_v4(&ev),
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(_) => {}
            }
        }
    });
    client
}

#[test]
fn the_recorder_on_real_clients_gives_a_clean_history() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let broker = Broker::start_with(&[], CLIENT_LOG);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let h = History::new(42);
    let stop = Arc::new(AtomicBool::new(false));
    let sub = h.client("rec-sub", false);
    sub.at_node(1);
    let s = run_client(
        &rt,
        options4(broker.addr(), "rec-sub"),
        sub.clone(),
        stop.clone(),
    );
    sub.subscribing(&["rec/#"]);
    rt.block_on(s.subscribe("rec/#", rumqttc::QoS::ExactlyOnce))
        .unwrap();
    let deadline = Instant::now() + RECV_TIMEOUT;
    // The SUBACK first: what is published after it must arrive.
    while history::check(&h, &[], LEASE).counts.subacks == 0 {
        assert!(Instant::now() < deadline, "no SUBACK");
        std::thread::sleep(Duration::from_millis(10));
    }
    const EACH: u64 = 20;
    let publishers: Vec<_> = (1..=2u8)
        .map(|qos| {
            let id = format!("rec-pub{qos}");
            let rec = h.client(&id, false);
            rec.at_node(1);
            let client = run_client(&rt, options4(broker.addr(), &id), rec.clone(), stop.clone());
            (qos, rec, client)
        })
        .collect();
    for (qos, rec, client) in &publishers {
        let q = if *qos == 1 {
            rumqttc::QoS::AtLeastOnce
        } else {
            rumqttc::QoS::ExactlyOnce
        };
        for _ in 0..EACH {
            let topic = format!("rec/{qos}");
            let payload = rec.publish(&topic, *qos);
            rt.block_on(client.publish(topic, q, false, payload))
                .unwrap();
        }
    }
    // Every publication acknowledged and delivered, bounded.
    let deadline = Instant::now() + RECV_TIMEOUT * 2;
    let r = loop {
        let r = history::check(&h, &[], LEASE);
        if r.counts.acked == 2 * EACH as usize && r.is_clean() || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let logs = [NodeLog {
        node: 1,
        text: broker.log(),
    }];
    let r2 = history::check(&h, &logs, LEASE);
    r2.assert_clean();
    assert_eq!(r.counts.acked, 2 * EACH as usize, "{r}");
    assert_eq!(r2.counts.expected, 2 * EACH as usize, "{r2}");
    assert_eq!(r2.counts.deliveries, 2 * EACH as usize, "{r2}");
    assert_eq!(r2.counts.connacks, 3, "{r2}");
    assert_eq!(r2.counts.live_spans, 3, "{r2}");
    assert!(r2.to_string().starts_with("seed 42\n"), "{r2}");
}
