//! Goal: the operator surface tells the truth and does what it says. `/metrics`
//! is valid Prometheus text (checked by an independent parser) carrying every
//! name of the `ops/README.md` contract with values that follow real traffic;
//! the JSON API lists, pages, shows, kicks, expires and deletes as documented,
//! with 404 for unknown things, 400 for bad parameters and 401 for a bad
//! token; `brokerctl` prints the same and exits with the documented codes.
//!
//! Method: the real `broker` binary on loopback (common::Broker, admin API on
//! a free port), real MQTT clients (rumqttc, and the raw client where the
//! exact packet matters, e.g. DISCONNECT 0x98), HTTP over a plain socket, and
//! the `brokerctl` binary run as a child process under a timeout.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{
    Broker, RawClient, brokerctl, connect_packet, metric_sum as sum, run_bounded, scrape,
};
use serde_json::Value;
use tessera_broker::admin::http::{client_request, percent_encode};
use tessera_proto::{ProtocolVersion, QoS, ReasonCode};

const TIMEOUT: Duration = Duration::from_secs(10);

/// The contract of `ops/README.md`: every name the alerts and dashboard use.
/// The metric contract of a single node (a cluster node adds the `tessera_cluster_*`
/// names, checked in `tests/cluster.rs`; a node with bridges the `tessera_bridge_*`
/// names, checked in `tests/bridge.rs`).
fn contract() -> BTreeSet<String> {
    let readme = include_str!("../../ops/README.md");
    readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("tessera_") || n.starts_with("process_"))
        // Cluster and bridge names need a cluster or a bridge; a certificate's expiry needs
        // a TLS listener (transport.rs checks it) or a cluster link.
        .filter(|n| {
            !n.starts_with("tessera_cluster_")
                && !n.starts_with("tessera_bridge_")
                && !n.starts_with("tessera_certificate_")
        })
        .map(str::to_owned)
        .collect()
}

/// GET/DELETE on the admin API; returns (status, body).
fn http(admin: SocketAddr, method: &str, target: &str, token: Option<&str>) -> (u16, String) {
    let r = client_request(&admin.to_string(), method, target, token, TIMEOUT)
        .unwrap_or_else(|e| panic!("{method} {target}: {e}"));
    (r.status, String::from_utf8(r.body).expect("UTF-8 body"))
}

fn get_json(admin: SocketAddr, target: &str) -> Value {
    let (status, body) = http(admin, "GET", target, None);
    assert_eq!(status, 200, "GET {target}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {target}: {e}: {body}"))
}

/// Polls `f` until it returns true or `TIMEOUT` passes.
fn eventually(what: &str, f: impl FnMut() -> bool) {
    common::eventually(what, TIMEOUT, f);
}

/// rumqttc's synchronous 3.1.1 client: publishes `n` QoS 1 messages to
/// `topic` and waits for every PUBACK.
fn rumqttc_publish(addr: SocketAddr, id: &str, topic: &str, n: usize) {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = rumqttc::Client::new(o, 64);
    for i in 0..n {
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, format!("m{i}"))
            .expect("queue publish");
    }
    let mut acked = 0;
    let deadline = Instant::now() + TIMEOUT;
    while acked < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "only {acked} of {n} PUBACKs");
        match conn.recv_timeout(left) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            other => panic!("rumqttc publisher: {other:?}"),
        }
    }
    let _ = client.disconnect();
    let _ = conn.recv_timeout(Duration::from_millis(200));
}

#[test]
fn metrics_parse_cover_the_contract_and_follow_traffic() {
    let broker = Broker::start();
    let admin = broker.admin_addr();
    let before = scrape(admin);
    let exported: BTreeSet<String> = before
        .docs
        .keys()
        .cloned()
        .chain(before.samples.iter().map(|s| s.metric.clone()))
        .collect();
    let missing: Vec<_> = contract()
        .into_iter()
        .filter(|n| !exported.contains(n))
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:?}");
    assert_eq!(
        contract().len(),
        29,
        "the contract table changed: update this test"
    );
    for shard in ["0", "1"] {
        assert_eq!(sum(&before, "tessera_shard_up", &[("shard", shard)]), 1.0);
    }

    // Traffic: a subscriber on each shard, a rumqttc publisher, 10 QoS 1.
    let mut subs: Vec<RawClient> = (0..2)
        .map(|k| {
            let id = common::id_on_shard("metrics-sub", k);
            let mut c = RawClient::connect_ok(
                broker.addr(),
                connect_packet(ProtocolVersion::V3_1_1, &id, true, 30),
            );
            c.subscribe(1, &[("metrics/#", QoS::AtLeastOnce)]);
            c
        })
        .collect();
    rumqttc_publish(broker.addr(), "metrics-pub", "metrics/t", 10);
    for c in &mut subs {
        for _ in 0..10 {
            c.recv_publish();
        }
    }
    // The publisher's DISCONNECT and socket close reach the broker a moment
    // after rumqttc returns.
    eventually("the publisher's connection to close", || {
        sum(&scrape(admin), "tessera_connections_current", &[]) == 2.0
    });
    let after = scrape(admin);
    let published = sum(&after, "tessera_messages_published_total", &[("qos", "1")]);
    assert_eq!(published, 10.0);
    let delivered = sum(&after, "tessera_messages_delivered_total", &[("qos", "1")]);
    assert_eq!(delivered, 20.0);
    assert!(sum(&after, "tessera_cross_shard_forwards_total", &[]) >= 10.0);
    assert_eq!(sum(&after, "tessera_connections_current", &[]), 2.0);
    assert!(sum(&after, "tessera_connects_total", &[("result", "success")]) >= 3.0);
    assert!(
        sum(
            &after,
            "tessera_packets_received_total",
            &[("type", "puback")]
        ) >= 20.0
    );
    assert!(sum(&after, "tessera_packets_sent_total", &[("type", "suback")]) >= 2.0);
    assert_eq!(sum(&after, "tessera_subscriptions", &[]), 2.0);
    assert_eq!(sum(&after, "tessera_sessions", &[("state", "online")]), 2.0);
    assert!(sum(&after, "tessera_received_bytes_total", &[]) > 0.0);
    assert!(sum(&after, "tessera_sent_bytes_total", &[]) > 0.0);
    assert!(sum(&after, "process_open_fds", &[]) > 0.0);
    assert!(sum(&after, "process_resident_memory_bytes", &[]) > 1e6);
    // The latency histogram counted every delivery, and its buckets are
    // cumulative up to +Inf.
    let hist = after
        .samples
        .iter()
        .find(|s| s.metric == "tessera_publish_to_deliver_seconds")
        .expect("latency histogram");
    let prometheus_parse::Value::Histogram(buckets) = &hist.value else {
        panic!("not a histogram: {hist:?}");
    };
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
    assert_eq!(buckets.last().unwrap().count, 20.0);
    assert!(buckets.last().unwrap().less_than.is_infinite());
    // A persistent session's subscription is committed to its shard's store:
    // the commit histograms count it, with cumulative buckets.
    let mut persistent = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "metrics-persistent", false, 30),
    );
    persistent.subscribe(1, &[("metrics/p", QoS::AtLeastOnce)]);
    eventually("a persistence commit in /metrics", || {
        sum(&scrape(admin), "tessera_persistence_commit_seconds", &[]) >= 1.0
    });
    let stored = scrape(admin);
    for name in [
        "tessera_persistence_commit_seconds",
        "tessera_persistence_commit_records",
    ] {
        for s in stored.samples.iter().filter(|s| s.metric == name) {
            let prometheus_parse::Value::Histogram(b) = &s.value else {
                panic!("{name} is not a histogram: {s:?}");
            };
            assert!(b.windows(2).all(|w| w[0].count <= w[1].count), "{name}");
            assert!(s.labels.get("shard").is_some(), "{name} has a shard label");
        }
    }
    assert!(sum(&stored, "tessera_persistence_commit_records", &[]) >= 1.0);
    // Counters never go backwards between scrapes.
    for s in &before.samples {
        if let prometheus_parse::Value::Counter(v) = s.value {
            let now = sum(
                &after,
                &s.metric,
                &s.labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect::<Vec<_>>(),
            );
            assert!(
                now >= v,
                "{} {:?} went from {v} to {now}",
                s.metric,
                s.labels
            );
        }
    }
}

#[test]
fn health_ready_and_status() {
    let broker = Broker::start();
    let admin = broker.admin_addr();
    assert_eq!(get_json(admin, "/health")["status"], "ok");
    let ready = get_json(admin, "/ready");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["shards"].as_array().unwrap().len(), 2);
    let _c = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V5, "status-client", true, 30),
    );
    let status = get_json(admin, "/api/v1/status");
    assert_eq!(status["shard_count"], 2);
    assert_eq!(status["shards_up"], 2);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["connections"], 1);
    assert_eq!(status["sessions_online"], 1);
}

#[test]
fn clients_page_by_cursor_without_gaps_or_duplicates() {
    let broker = Broker::start();
    let admin = broker.admin_addr();
    let mut clients = Vec::new();
    let mut want = BTreeSet::new();
    for i in 0..7 {
        let id = format!("page-{i:02}");
        clients.push(RawClient::connect_ok(
            broker.addr(),
            connect_packet(ProtocolVersion::V3_1_1, &id, true, 30),
        ));
        want.insert(id);
    }
    let _other = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "zz-other", true, 30),
    );
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let mut target = "/api/v1/clients?prefix=page-&limit=3".to_owned();
        if let Some(a) = &after {
            target.push_str(&format!("&after={}", percent_encode(a)));
        }
        let page = get_json(admin, &target);
        assert_eq!(page["total"], 7, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(
            items
                .iter()
                .map(|i| i["client_id"].as_str().unwrap().to_owned()),
        );
        match &page["next"] {
            Value::String(n) => after = Some(n.clone()),
            Value::Null => break,
            other => panic!("next: {other}"),
        }
    }
    assert_eq!(
        seen,
        want.into_iter().collect::<Vec<_>>(),
        "in order, once each"
    );
    for bad in ["limit=0", "limit=1001", "limit=many"] {
        let (status, body) = http(admin, "GET", &format!("/api/v1/clients?{bad}"), None);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("limit"), "{body}");
    }
    let (status, _) = http(admin, "GET", "/api/v1/sessions?connected=maybe", None);
    assert_eq!(status, 400);
}

#[test]
fn kick_sends_v5_clients_administrative_action_and_unknown_clients_are_404() {
    let broker = Broker::start();
    let admin = broker.admin_addr();
    let mut v5 = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V5, "kick-me", true, 30),
    );
    let shown = get_json(admin, "/api/v1/clients/kick-me");
    assert_eq!(shown["connected"], true);
    assert_eq!(shown["protocol"], "5.0");
    let (status, body) = http(
        admin,
        "DELETE",
        "/api/v1/clients/kick-me?reason=planned%20maintenance",
        None,
    );
    assert_eq!(status, 200, "{body}");
    match v5.recv() {
        tessera_proto::Packet::Disconnect(d) => {
            assert_eq!(d.reason_code, ReasonCode::AdministrativeAction);
            assert_eq!(
                d.properties.reason_string.as_ref().map(|s| s.as_str()),
                Some("planned maintenance")
            );
        }
        other => panic!("expected DISCONNECT 0x98, got {other:?}"),
    }
    v5.expect_closed(TIMEOUT);
    // A 3.1.1 client is simply disconnected.
    let mut v3 = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "kick-v3", true, 30),
    );
    assert_eq!(
        http(admin, "DELETE", "/api/v1/clients/kick-v3", None).0,
        200
    );
    v3.expect_closed(TIMEOUT);
    for (method, target) in [
        ("DELETE", "/api/v1/clients/nobody"),
        ("GET", "/api/v1/clients/nobody"),
        ("GET", "/api/v1/sessions/nobody"),
        ("DELETE", "/api/v1/sessions/nobody"),
        ("GET", "/api/v1/subscriptions/nobody"),
        ("GET", "/api/v1/nothing-here"),
    ] {
        let (status, body) = http(admin, method, target, None);
        assert_eq!(status, 404, "{method} {target}: {body}");
        let v: Value = serde_json::from_str(&body).expect("JSON error body");
        assert_eq!(v["error"], "not_found");
    }
    assert_eq!(http(admin, "POST", "/api/v1/clients", None).0, 405);
    assert_still_serves(&broker);
}

fn assert_still_serves(broker: &Broker) {
    common::assert_still_serves(broker.addr(), "after admin calls");
}

#[test]
fn sessions_subscriptions_and_retained() {
    let broker = Broker::start();
    let admin = broker.admin_addr();
    // A persistent session that goes offline, with two subscriptions.
    let mut c = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "persist-1", false, 30),
    );
    c.subscribe(1, &[("a/+", QoS::AtLeastOnce), ("b/#", QoS::AtMostOnce)]);
    c.disconnect();
    eventually("the session to go offline", || {
        let v = get_json(admin, "/api/v1/sessions?connected=false");
        v["total"] == 1
    });
    let s = get_json(admin, "/api/v1/sessions/persist-1");
    assert_eq!(s["connected"], false);
    assert_eq!(s["subscriptions"], 2);
    let subs = get_json(admin, "/api/v1/subscriptions?client_id=persist-1");
    let filters: Vec<_> = subs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["filter"].as_str().unwrap(), i["qos"].as_u64().unwrap()))
        .collect();
    assert_eq!(filters, [("a/+", 1), ("b/#", 0)]);
    let one_page = get_json(admin, "/api/v1/subscriptions?limit=1");
    assert_eq!(one_page["items"].as_array().unwrap().len(), 1);
    let next = one_page["next"].as_str().expect("a second page").to_owned();
    let second = get_json(
        admin,
        &format!(
            "/api/v1/subscriptions?limit=1&after={}",
            percent_encode(&next)
        ),
    );
    assert_eq!(second["items"][0]["filter"], "b/#");
    assert_eq!(
        get_json(admin, "/api/v1/subscriptions/persist-1")["total"],
        2
    );

    // Expire it: gone, and its client reconnects to a fresh session.
    assert_eq!(
        http(admin, "DELETE", "/api/v1/sessions/persist-1", None).0,
        200
    );
    assert_eq!(
        http(admin, "GET", "/api/v1/sessions/persist-1", None).0,
        404
    );
    let mut again = RawClient::open(broker.addr(), ProtocolVersion::V3_1_1);
    again.send(&tessera_proto::Packet::Connect(Box::new(connect_packet(
        ProtocolVersion::V3_1_1,
        "persist-1",
        false,
        30,
    ))));
    match again.recv() {
        tessera_proto::Packet::ConnAck(a) => assert!(!a.session_present),
        other => panic!("{other:?}"),
    }

    // Retained: list by filter, get (a topic with a slash and a space),
    // delete; subscribers are not sent anything by a delete.
    let mut p = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "retainer", true, 30),
    );
    p.publish_retained("site/room 1/temp", b"21.5", 1);
    p.publish_retained("other/x", &[0xff, 0x00], 2);
    let topic = percent_encode("site/room 1/temp");
    eventually("the retained message on shard 0", || {
        http(admin, "GET", &format!("/api/v1/retained/{topic}"), None).0 == 200
    });
    let r = get_json(admin, &format!("/api/v1/retained/{topic}"));
    assert_eq!(r["payload"], "21.5");
    assert_eq!(r["payload_base64"], "MjEuNQ==");
    let list = get_json(
        admin,
        &format!("/api/v1/retained?filter={}", percent_encode("site/#")),
    );
    assert_eq!(list["total"], 1);
    let bin = get_json(admin, "/api/v1/retained/other%2Fx");
    assert_eq!(bin["payload"], Value::Null);
    assert_eq!(bin["payload_base64"], "/wA=");
    let (status, _) = http(admin, "GET", "/api/v1/retained?filter=a%2F%23%2Fb", None);
    assert_eq!(status, 400, "an invalid filter");
    assert_eq!(
        http(admin, "DELETE", &format!("/api/v1/retained/{topic}"), None).0,
        200
    );
    assert_eq!(
        http(admin, "GET", &format!("/api/v1/retained/{topic}"), None).0,
        404
    );
    assert_eq!(
        http(admin, "DELETE", &format!("/api/v1/retained/{topic}"), None).0,
        404
    );
    // Deleted on every shard: a new subscriber on either shard gets nothing.
    for k in 0..2 {
        let id = common::id_on_shard("after-delete", k);
        let mut s = RawClient::connect_ok(
            broker.addr(),
            connect_packet(ProtocolVersion::V3_1_1, &id, true, 30),
        );
        s.subscribe(1, &[("site/#", QoS::AtMostOnce)]);
        assert!(
            s.try_recv(Duration::from_millis(300)).is_err(),
            "shard {k} still had the retained message"
        );
    }
}

#[test]
fn bad_requests_get_clear_errors_and_the_broker_keeps_serving() {
    let broker = Broker::start();
    let admin = broker.admin_addr();
    let raw = |bytes: &[u8]| -> String {
        let mut s = TcpStream::connect_timeout(&admin, TIMEOUT).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(raw(b"garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(raw(b"GET /health SPDY/3\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(raw(b"GET /api/v1/clients/%zz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400"));
    let mut huge = b"GET /health HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    huge.extend(b"\r\n\r\n");
    assert!(raw(&huge).starts_with("HTTP/1.1 413"));
    // A client that connects and says nothing does not hold the port.
    let _silent = TcpStream::connect(admin).unwrap();
    assert_eq!(get_json(admin, "/health")["status"], "ok");
    assert_still_serves(&broker);
}

const TOKEN: &str = "test-token-0123456789abcdef";

#[test]
fn token_is_required_compared_and_never_logged() {
    let broker = Broker::start_with(&[], &[("TESSERA_SERVER__ADMIN_TOKEN", TOKEN)]);
    let admin = broker.admin_addr();
    for target in ["/metrics", "/api/v1/status", "/api/v1/clients"] {
        let (status, body) = http(admin, "GET", target, None);
        assert_eq!(status, 401, "{target} without a token: {body}");
        assert_eq!(
            http(admin, "GET", target, Some("test-token-0123456789abcdeF")).0,
            401
        );
        assert_eq!(http(admin, "GET", target, Some("test-token")).0, 401);
        assert_eq!(http(admin, "GET", target, Some(TOKEN)).0, 200, "{target}");
    }
    // Probes stay open.
    assert_eq!(http(admin, "GET", "/health", None).0, 200);
    assert_eq!(http(admin, "GET", "/ready", None).0, 200);
    assert!(!broker.log().contains(TOKEN), "the token is in the log");
}

#[test]
fn admin_beyond_loopback_without_a_token_refuses_to_start() {
    let out = run_bounded(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
            "--shards",
            "1",
        ],
        &[],
        TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.admin_token"), "{err}");
    let out = run_bounded(
        &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        &[("TESSERA_SERVER__ADMIN_TOKEN", "short")],
        TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.admin_token") && !err.contains("short\""),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// brokerctl

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

#[test]
fn brokerctl_drives_the_admin_api_with_documented_exit_codes() {
    let broker = Broker::start_with(&[], &[("TESSERA_SERVER__ADMIN_TOKEN", TOKEN)]);
    let url = format!("http://{}", broker.admin_addr());
    let env = [("TESSERA_URL", url.as_str()), ("TESSERA_TOKEN", TOKEN)];
    let mut persistent = connect_packet(ProtocolVersion::V5, "ctl-client", false, 30);
    persistent.properties.session_expiry_interval = Some(600);
    let mut v5 = RawClient::connect_ok(broker.addr(), persistent);
    v5.subscribe(1, &[("ctl/#", QoS::AtLeastOnce)]);
    let mut p = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "ctl-pub", true, 30),
    );
    p.publish_retained("ctl/state", b"on", 1);
    let _ = v5.recv_publish();

    let o = brokerctl(&["status"], &env);
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(out(&o).contains("shards 2/2 up"), "{}", out(&o));
    let o = brokerctl(&["status", "--json"], &env);
    let v: Value = serde_json::from_str(&out(&o)).expect("status --json is JSON");
    assert_eq!(v["connections"], 2);

    let o = brokerctl(&["clients", "list"], &env);
    assert_eq!(code(&o), 0);
    assert!(out(&o).starts_with("CLIENT ID"), "{}", out(&o));
    assert!(out(&o).contains("ctl-client") && out(&o).contains("2 shown, 2 in total"));
    let o = brokerctl(
        &["clients", "list", "--limit", "1", "--all", "--json"],
        &env,
    );
    let v: Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(
        v["items"].as_array().unwrap().len(),
        2,
        "--all follows pages"
    );
    let o = brokerctl(&["clients", "list", "--limit", "1"], &env);
    assert!(
        out(&o).contains("more with --after ctl-client"),
        "{}",
        out(&o)
    );

    let o = brokerctl(&["clients", "show", "ctl-client"], &env);
    assert_eq!(code(&o), 0);
    assert!(out(&o).contains("ctl/#"), "{}", out(&o));
    let o = brokerctl(&["subs", "list", "--client", "ctl-client"], &env);
    assert!(out(&o).contains("ctl/#"), "{}", out(&o));
    let o = brokerctl(&["retained", "get", "ctl/state"], &env);
    assert!(out(&o).contains("payload: on"), "{}", out(&o));
    let o = brokerctl(&["retained", "list", "--filter", "ctl/#", "--json"], &env);
    let v: Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["total"], 1);

    let o = brokerctl(
        &["clients", "kick", "ctl-client", "--reason", "ctl test"],
        &env,
    );
    assert_eq!(code(&o), 0, "{o:?}");
    match v5.recv() {
        tessera_proto::Packet::Disconnect(d) => {
            assert_eq!(d.reason_code, ReasonCode::AdministrativeAction)
        }
        other => panic!("{other:?}"),
    }
    let o = brokerctl(&["sessions", "list", "--connected", "false"], &env);
    assert!(out(&o).contains("ctl-client"), "{}", out(&o));
    let o = brokerctl(&["sessions", "expire", "ctl-client"], &env);
    assert_eq!(code(&o), 0, "{o:?}");
    let o = brokerctl(&["retained", "delete", "ctl/state"], &env);
    assert_eq!(code(&o), 0, "{o:?}");

    // 1: not found.
    for args in [
        &["clients", "kick", "ctl-client"][..],
        &["clients", "show", "nobody"],
        &["sessions", "expire", "ctl-client"],
        &["retained", "get", "ctl/state"],
        &["retained", "delete", "ctl/state"],
    ] {
        let o = brokerctl(args, &env);
        assert_eq!(code(&o), 1, "{args:?}: {o:?}");
        assert!(!String::from_utf8_lossy(&o.stderr).is_empty());
    }
    // 3: bad token or unreachable.
    let o = brokerctl(
        &[
            "status",
            "--url",
            &url,
            "--token",
            "wrong-token-wrong-token",
        ],
        &[],
    );
    assert_eq!(code(&o), 3, "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("401"));
    let o = brokerctl(&["status", "--url", &url], &[]);
    assert_eq!(code(&o), 3, "no token: {o:?}");
    let o = brokerctl(
        &["status", "--url", "http://127.0.0.1:1", "--timeout", "2"],
        &[],
    );
    assert_eq!(code(&o), 3, "{o:?}");
    // 2: usage.
    let o = brokerctl(&["status", "--url", "https://127.0.0.1:1"], &[]);
    assert_eq!(code(&o), 2, "{o:?}");
    let o = brokerctl(&["clients", "frobnicate"], &env);
    assert_eq!(code(&o), 2, "{o:?}");
    // 4: the broker refused the request.
    let o = brokerctl(&["clients", "list", "--limit", "5000"], &env);
    assert_eq!(code(&o), 4, "{o:?}");

    // metrics: raw text once, or a bounded watch.
    let o = brokerctl(&["metrics"], &env);
    assert_eq!(code(&o), 0);
    assert!(out(&o).contains("# TYPE tessera_connections_current gauge"));
    let o = brokerctl(&["metrics", "--watch", "1", "--count", "2", "--json"], &env);
    assert_eq!(code(&o), 0, "{o:?}");
    let rows: Vec<HashMap<String, Value>> = out(&o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(rows[1].contains_key("published_per_s"));

    // Completions cover the admin subcommands.
    let o = brokerctl(&["completions", "bash"], &[]);
    assert_eq!(code(&o), 0);
    for word in ["clients", "retained", "sessions", "metrics", "tune"] {
        assert!(out(&o).contains(word), "completion lacks {word}");
    }
}

#[test]
fn expired_sessions_and_deleted_retained_messages_stay_gone_after_a_restart() {
    let dir = common::TestDir::new("admin-restart");
    let args = ["--data-dir", dir.path_str()];
    let mut broker = Broker::start_with(&args, &[]);
    let admin = broker.admin_addr();
    for id in ["keep-me", "expire-me"] {
        let mut c = RawClient::connect_ok(
            broker.addr(),
            connect_packet(ProtocolVersion::V3_1_1, id, false, 30),
        );
        c.subscribe(1, &[("restart/#", QoS::AtLeastOnce)]);
        c.disconnect();
    }
    let mut p = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "restart-pub", true, 30),
    );
    p.publish_retained("restart/keep", b"k", 1);
    p.publish_retained("restart/drop", b"d", 2);
    p.disconnect();
    eventually("both sessions offline", || {
        get_json(admin, "/api/v1/sessions?connected=false")["total"] == 2
    });
    assert_eq!(
        http(admin, "DELETE", "/api/v1/sessions/expire-me", None).0,
        200
    );
    assert_eq!(
        http(admin, "DELETE", "/api/v1/retained/restart%2Fdrop", None).0,
        200
    );
    broker.sigterm();
    assert!(broker.wait_exit(TIMEOUT).success(), "clean shutdown");

    let broker = Broker::start_with(&args, &[]);
    let admin = broker.admin_addr();
    assert_eq!(http(admin, "GET", "/api/v1/sessions/keep-me", None).0, 200);
    assert_eq!(
        http(admin, "GET", "/api/v1/sessions/expire-me", None).0,
        404
    );
    assert_eq!(
        http(admin, "GET", "/api/v1/retained/restart%2Fkeep", None).0,
        200
    );
    assert_eq!(
        http(admin, "GET", "/api/v1/retained/restart%2Fdrop", None).0,
        404
    );
}

#[test]
fn refused_connects_are_counted_by_result() {
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__CONNECT_TIMEOUT_S", "1")]);
    let admin = broker.admin_addr();
    // Silent until the connect timeout.
    let silent = TcpStream::connect(broker.addr()).unwrap();
    // A first packet that is not CONNECT.
    let mut garbage = TcpStream::connect(broker.addr()).unwrap();
    garbage.write_all(&[0xC0, 0x00]).unwrap(); // PINGREQ
    // A protocol level the broker does not speak (MQTT "level 9").
    let mut level9 = TcpStream::connect(broker.addr()).unwrap();
    level9
        .write_all(&[0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 30, 0, 0])
        .unwrap();
    // A 3.1.1 CONNECT refused by the engine: empty ClientID, Clean Session 0.
    let (_c, ack) = RawClient::connect(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "", false, 30),
    );
    assert_ne!(ack.reason_code, ReasonCode::Success);
    let result =
        |m: &prometheus_parse::Scrape, r: &str| sum(m, "tessera_connects_total", &[("result", r)]);
    eventually("every refusal counted", || {
        let m = scrape(admin);
        result(&m, "connect_timeout") >= 1.0
            && result(&m, "malformed") >= 1.0
            && result(&m, "unsupported_protocol_version") >= 1.0
            && result(&m, "client_identifier_not_valid") >= 1.0
    });
    let m = scrape(admin);
    assert_eq!(result(&m, "success"), 0.0);
    assert!(sum(&m, "tessera_connections_total", &[]) >= 4.0);
    drop((silent, garbage, level9));
}
