//! MQTT bridges, black-box: a Tessera bridged to another Tessera, both real
//! processes, with rumqttc (and, where a test must know exactly what each
//! acknowledgement was for or must survive the remote's `kill -9`, the raw
//! test client) as the clients.
//!
//! What a user relies on: messages cross in both directions at QoS 0, 1 and 2
//! with the topic rewritten by the rule's prefixes and the QoS capped by the
//! rule; every message acknowledged to a local publisher arrives on the remote
//! although the remote is killed and restarted mid-stream (QoS 2 exactly
//! once), and although the local broker restarts while messages wait for the
//! bridge; a two-way bridge with overlapping rules does not loop; a wrong
//! bridge table is refused with the field named; a remote that lies never
//! takes the broker down; the bridge's state is in `/metrics`, the admin API
//! and `brokerctl bridges`; SIGHUP adds and removes bridges; QoS 0
//! publishers faster than the remote are slowed, not dropped; a steady QoS 0
//! stream keeps the link up (the bridge pings).

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::bridge::*;
use common::{Ca, Received, TestDir, eventually, metric_sum, run_bounded, scrape};
use tessera_proto::QoS;

#[test]
fn messages_cross_both_ways_at_every_qos_with_prefixes_and_caps() {
    for version in ["5", "3.1.1"] {
        let rdir = TestDir::new("bridge-remote");
        let remote = start(&rdir, "", &[]);
        let local = check_both_ways(remote.addr(), version);
        let s = scrape(local.admin_addr());
        // Every bridge name of the ops contract (ops/README.md) is exported.
        let contract: Vec<&str> = include_str!("../../ops/README.md")
            .lines()
            .filter_map(|l| l.strip_prefix("| `tessera_bridge_"))
            .filter_map(|l| l.split('`').next())
            .collect();
        assert_eq!(contract.len(), 10);
        for name in contract {
            let name = format!("tessera_bridge_{name}");
            assert!(
                s.samples.iter().any(|x| x.metric == name),
                "{name} not exported"
            );
        }
    }
}

#[test]
fn retain_is_kept_or_cleared_by_rule() {
    let rdir = TestDir::new("bridge-remote");
    let remote = start(&rdir, "", &[]);
    let rules = "[[bridge.out]]\ntopic = \"keep/#\"\nqos = 1\n\
                 [[bridge.out]]\ntopic = \"clear/#\"\nqos = 1\nretain = \"clear\"\n";
    let ldir = TestDir::new("bridge-local");
    let local = start(&ldir, &bridge_toml("r", remote.addr(), "5", rules), &[]);
    wait_connected(&local, "r");
    let lpub = publisher(local.addr(), "local-pub");
    lpub.publish("keep/a", qos(1), true, "kept")
        .expect("publish");
    lpub.publish("clear/a", qos(1), true, "cleared")
        .expect("publish");
    eventually("both crossed", WAIT, || {
        bridge_value(&local, "r", "tessera_bridge_messages_sent_total") == 2.0
    });
    // A late subscriber on the remote gets only the retained one.
    let (_sub, rx) = subscriber(remote.addr(), "late", &[("keep/#", 1), ("clear/#", 1)]);
    let got = collect(&rx, 2, Duration::from_secs(2));
    assert_eq!(
        got,
        vec![("keep/a".to_owned(), "kept".to_owned(), 1, true)],
        "retain = keep crosses retained, retain = clear does not"
    );
}

#[test]
fn remote_killed_mid_stream_loses_no_acknowledged_message() {
    let port = free_port();
    let remote_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listen = remote_addr.to_string();
    let rdir = TestDir::new("bridge-remote");
    let remote = std::cell::RefCell::new(Some(start(&rdir, "", &["--listen", &listen])));
    check_remote_restart(
        remote_addr,
        "5",
        &mut || {
            // kill -9: what the remote acknowledged is on its disk (sync durability).
            let mut r = remote.borrow_mut().take().expect("running");
            unsafe { libc::kill(r.pid() as i32, libc::SIGKILL) };
            r.wait_exit(WAIT);
        },
        &mut || *remote.borrow_mut() = Some(start(&rdir, "", &["--listen", &listen])),
    );
    drop(remote);
}

#[test]
fn messages_queued_for_the_bridge_are_sent_after_a_local_restart() {
    let port = free_port();
    let remote_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let rules = "[[bridge.out]]\ntopic = \"q/#\"\nqos = 1\n";
    let config = bridge_toml("later", remote_addr, "5", rules);
    let ldir = TestDir::new("bridge-local");
    // The remote is not there yet: the messages wait in the bridge's session.
    // Published as soon as the broker accepts connections, by a client on
    // each shard: no shard listens before the bridge's routes are on every
    // shard (at a first start they cross the mesh), so none misses it.
    let mut local = start(&ldir, &config, &[]);
    let mut acked = Vec::new();
    for shard in 0..2 {
        let payloads: Vec<String> = (0..100).map(|k| format!("queued-{shard}-{k}")).collect();
        let id = common::id_on_shard("pub", shard);
        acked.extend(publish_acked(
            local.addr(),
            &id,
            QoS::AtLeastOnce,
            "q/a",
            &payloads,
        ));
    }
    assert_eq!(acked.len(), 200);
    eventually("the queue gauge shows them", WAIT, || {
        bridge_value(&local, "later", "tessera_bridge_queued_messages") >= 200.0
    });
    assert_eq!(bridge_value(&local, "later", "tessera_bridge_up"), 0.0);
    // kill -9 the local broker with everything queued.
    unsafe { libc::kill(local.pid() as i32, libc::SIGKILL) };
    local.wait_exit(WAIT);

    let rdir = TestDir::new("bridge-remote");
    let listen = remote_addr.to_string();
    let remote = start(&rdir, "", &["--listen", &listen]);
    let log = Arc::new(Mutex::new(Received::default()));
    let sub = Subscriber::start(remote_addr, "remote-sub", "q/#", log.clone());
    let local = start(&ldir, &config, &[]);
    assert_all_arrived(&log, &acked, &HashSet::new());
    eventually("the queue drains", WAIT, || {
        bridge_value(&local, "later", "tessera_bridge_queued_messages") == 0.0
    });
    // Every one acknowledged by the remote: nothing is in flight any more
    // (the gauge kept the window of the last batch sent before).
    eventually("the in-flight gauge drops to 0", WAIT, || {
        bridge_value(&local, "later", "tessera_bridge_inflight_messages") == 0.0
    });
    sub.stop();
    drop(remote);
}

#[test]
fn two_way_bridges_with_overlapping_rules_do_not_loop() {
    // v5: the same topics both ways (No Local stops the echo). 3.1.1: the
    // documented rule, distinct remote prefixes for the two directions.
    let cases = [
        (
            "5",
            "[[bridge.out]]\ntopic = \"t/#\"\nqos = 1\n[[bridge.in]]\ntopic = \"t/#\"\nqos = 1\n",
            "t/#",
        ),
        (
            "3.1.1",
            "[[bridge.out]]\ntopic = \"t/#\"\nremote_prefix = \"edge/\"\nqos = 1\n\
             [[bridge.in]]\ntopic = \"t/#\"\nremote_prefix = \"cloud/\"\nqos = 1\n",
            "#",
        ),
    ];
    for (version, rules, remote_filter) in cases {
        let rdir = TestDir::new("bridge-remote");
        let remote = start(&rdir, "", &[]);
        let ldir = TestDir::new("bridge-local");
        let local = start(
            &ldir,
            &bridge_toml("both", remote.addr(), version, rules),
            &[],
        );
        wait_connected(&local, "both");
        let (_ls, lrx) = subscriber(local.addr(), "lsub", &[("t/#", 1)]);
        let (_rs, rrx) = subscriber(remote.addr(), "rsub", &[(remote_filter, 1)]);
        let lpub = publisher(local.addr(), "lpub");
        lpub.publish("t/from-local", qos(1), false, "L")
            .expect("publish");
        let rpub = publisher(remote.addr(), "rpub");
        let remote_topic = if version == "5" {
            "t/from-remote"
        } else {
            "cloud/t/from-remote"
        };
        rpub.publish(remote_topic, qos(1), false, "R")
            .expect("publish");
        // Long enough for a loop to show many copies.
        thread::sleep(Duration::from_secs(2));
        let mut l: Vec<String> = collect(&lrx, 100, Duration::from_millis(200))
            .into_iter()
            .map(|m| m.1)
            .collect();
        let mut r: Vec<String> = collect(&rrx, 100, Duration::from_millis(200))
            .into_iter()
            .map(|m| m.1)
            .collect();
        l.sort();
        r.sort();
        assert_eq!(
            l,
            ["L", "R"],
            "v{version}: local subscriber, each message once"
        );
        assert_eq!(
            r,
            ["L", "R"],
            "v{version}: remote subscriber, each message once"
        );
        let s = scrape(local.admin_addr());
        let v = |m: &str| metric_sum(&s, m, &[("bridge", "both")]);
        assert_eq!(v("tessera_bridge_messages_sent_total"), 1.0, "v{version}");
        assert_eq!(
            v("tessera_bridge_messages_received_total"),
            1.0,
            "v{version}"
        );
    }
}

#[test]
fn a_wrong_bridge_table_is_refused_with_the_field_named() {
    let dir = TestDir::new("bridge-bad");
    let cases = [
        (
            "[[bridge]]\nname = \"c\"\naddress = \"127.0.0.1:1883\"\ntransport = \"quic\"\n[[bridge.out]]\ntopic = \"a\"\n",
            "bridge \"c\" (#1): ca_file: transport quic needs ca_file",
        ),
        (
            "[[bridge]]\nname = \"c\"\naddress = \"127.0.0.1:1883\"\nversion = \"3.1.1\"\n\
             [[bridge.out]]\ntopic = \"a/#\"\n[[bridge.in]]\ntopic = \"#\"\n",
            "bridge \"c\" (#1): in[0].topic: the remote filter \"#\" overlaps out[0]",
        ),
        (
            "[[bridge]]\nname = \"c\"\naddress = \"127.0.0.1:1883\"\ntransport = \"udp\"\n[[bridge.out]]\ntopic = \"a\"\n",
            "transport: \"udp\": expected \"mqtt\", \"mqtts\", \"ws\", \"wss\" or \"quic\"",
        ),
        (
            "[[bridge]]\nname = \"c\"\naddress = \"127.0.0.1\"\n[[bridge.out]]\ntopic = \"a\"\n",
            "bridge \"c\" (#1): address",
        ),
        (
            "[[bridge]]\nname = \"c\"\naddress = \"127.0.0.1:1\"\n[[bridge.out]]\ntopic = \"a\"\nqos = 7\n",
            "out[0].qos",
        ),
    ];
    for (text, want) in cases {
        let path = format!("{}/bad.toml", dir.path_str());
        std::fs::write(&path, text).unwrap();
        let out = run_bounded(&["--config", &path], &[], WAIT);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "wanted {want:?} in:\n{err}");
    }
}

#[test]
fn a_lying_remote_never_takes_the_broker_down() {
    // A "remote" that answers CONNECT with garbage, then with a CONNACK and
    // a malformed PUBLISH, then with a CONNACK and a packet a server never sends.
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_addr = fake.local_addr().unwrap();
    let answers: Vec<Vec<u8>> = vec![
        vec![0xFF; 64],
        vec![0x20, 0x03, 0x00, 0x00, 0x00, 0x30, 0x05, 0x00, 0x09, b'a'],
        vec![0x20, 0x03, 0x00, 0x00, 0x00, 0x10, 0x00],
        vec![
            0x20, 0x03, 0x00, 0x00, 0x00, 0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F,
        ],
    ];
    let served = Arc::new(Mutex::new(0usize));
    let count = served.clone();
    thread::spawn(move || {
        for (stream, answer) in fake.incoming().zip(answers.into_iter().cycle()) {
            let Ok(mut s) = stream else { return };
            let mut buf = [0u8; 256];
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.read(&mut buf);
            let _ = s.write_all(&answer);
            *count.lock().unwrap() += 1;
            thread::sleep(Duration::from_millis(50));
        }
    });
    let rules = "[[bridge.out]]\ntopic = \"x/#\"\n[[bridge.in]]\ntopic = \"y/#\"\n";
    let dir = TestDir::new("bridge-liar");
    let local = start(&dir, &bridge_toml("liar", fake_addr, "5", rules), &[]);
    eventually("several lies told", WAIT, || *served.lock().unwrap() >= 6);
    common::assert_still_serves(local.addr(), "bridge-liar");
    let failures = bridge_value(&local, "liar", "tessera_bridge_connect_failures_total");
    assert!(failures >= 4.0, "{failures}");
    // The admin API and brokerctl show the last error.
    let url = format!("http://{}", local.admin_addr());
    let out = common::brokerctl(&["--url", &url, "bridges"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("liar") && text.contains("last error:"),
        "{text}"
    );
    assert!(text.contains(&fake_addr.to_string()), "{text}");
}

/// A fake remote: answers the first connection's CONNECT with a v5 CONNACK
/// announcing Receive Maximum `receive_max`, then counts the QoS 1 PUBLISH
/// packets it gets and acknowledges none.
fn silent_remote(receive_max: u16) -> (SocketAddr, Arc<Mutex<usize>>) {
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap();
    let count = Arc::new(Mutex::new(0usize));
    let counted = count.clone();
    thread::spawn(move || {
        let Ok((mut s, _)) = fake.accept() else {
            return;
        };
        let mut buf = bytes::BytesMut::new();
        let mut chunk = [0u8; 16 * 1024];
        let mut connected = false;
        loop {
            loop {
                match tessera_proto::decode(&mut buf, tessera_proto::ProtocolVersion::V5, 1 << 20) {
                    Ok(Some(tessera_proto::Packet::Connect(_))) if !connected => {
                        connected = true;
                        let ack = tessera_proto::ConnAck {
                            session_present: false,
                            reason_code: tessera_proto::ReasonCode::Success,
                            properties: tessera_proto::ConnAckProperties {
                                receive_maximum: Some(receive_max),
                                ..Default::default()
                            },
                        };
                        let mut out = bytes::BytesMut::new();
                        tessera_proto::Encode::encode(
                            &tessera_proto::Packet::ConnAck(ack),
                            tessera_proto::ProtocolVersion::V5,
                            &mut out,
                        )
                        .unwrap();
                        if s.write_all(&out).is_err() {
                            return;
                        }
                    }
                    Ok(Some(tessera_proto::Packet::Publish(p))) if p.qos == QoS::AtLeastOnce => {
                        *counted.lock().unwrap() += 1;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    });
    (addr, count)
}

#[test]
fn the_bridge_keeps_the_remotes_window_in_flight_not_the_local_client_limit() {
    // The remote lets 100 be in flight and acknowledges nothing. The local
    // broker's limits.max_inflight (32 by default) is what it lets its own
    // clients have; the bridge's window is the remote's: 100, no more.
    let (remote, got) = silent_remote(100);
    let rules = "[[bridge.out]]\ntopic = \"w/#\"\nqos = 1\n";
    let dir = TestDir::new("bridge-window");
    let local = start(&dir, &bridge_toml("window", remote, "5", rules), &[]);
    wait_connected(&local, "window");
    let payloads: Vec<String> = (0..150).map(|k| format!("w-{k}")).collect();
    let acked = publish_acked(local.addr(), "pub", QoS::AtLeastOnce, "w/a", &payloads);
    assert_eq!(acked.len(), 150, "queued for the bridge, so acknowledged");
    eventually("the remote got the bridge's window", WAIT, || {
        *got.lock().unwrap() >= 100
    });
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        *got.lock().unwrap(),
        100,
        "no more than its Receive Maximum"
    );
    eventually("the gauge shows them in flight", WAIT, || {
        bridge_value(&local, "window", "tessera_bridge_inflight_messages") == 100.0
    });
    assert_eq!(
        bridge_value(&local, "window", "tessera_bridge_queued_messages"),
        50.0,
        "the rest waits in the bridge's queue"
    );
}

/// What a fake remote received, in order.
type Payloads = Arc<Mutex<Vec<Vec<u8>>>>;

/// A fake v5 remote that reads at most 8 KiB per `pause` (2 ms: about
/// 4 MB/s, slower than the local clients publish). Answers CONNACK and
/// PINGREQ (counted), records the payloads of the PUBLISH packets it gets,
/// in order.
fn fake_remote(pause: Duration) -> (SocketAddr, Payloads, Arc<Mutex<usize>>) {
    use tessera_proto::{Encode, Packet, ProtocolVersion};
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let log = got.clone();
    let pings = Arc::new(Mutex::new(0));
    let pinged = pings.clone();
    thread::spawn(move || {
        let Ok((mut s, _)) = fake.accept() else {
            return;
        };
        let mut buf = bytes::BytesMut::new();
        let mut chunk = [0u8; 8 * 1024];
        loop {
            loop {
                let reply = match tessera_proto::decode(&mut buf, ProtocolVersion::V5, 1 << 20) {
                    Ok(Some(Packet::Connect(_))) => Packet::ConnAck(tessera_proto::ConnAck {
                        session_present: false,
                        reason_code: tessera_proto::ReasonCode::Success,
                        properties: Default::default(),
                    }),
                    Ok(Some(Packet::PingReq)) => {
                        *pinged.lock().unwrap() += 1;
                        Packet::PingResp
                    }
                    Ok(Some(Packet::Publish(p))) => {
                        log.lock().unwrap().push(p.payload.to_vec());
                        continue;
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => return,
                };
                let mut out = bytes::BytesMut::new();
                reply.encode(ProtocolVersion::V5, &mut out).unwrap();
                if s.write_all(&out).is_err() {
                    return;
                }
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            thread::sleep(pause);
        }
    });
    (addr, got, pings)
}

/// Publishes `n` QoS 0 messages of `size` bytes (`"{id}:{k}:"` then
/// padding) to `topic` with rumqttc as fast as it goes, then disconnects.
fn qos0_flood(addr: SocketAddr, id: String, topic: &'static str, n: usize, size: usize) {
    let mut o = rumqttc::MqttOptions::new(&id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    let (client, mut conn) = rumqttc::Client::new(o, 100);
    let sender = thread::spawn(move || {
        for k in 0..n {
            let mut payload = format!("{id}:{k}:").into_bytes();
            payload.resize(size, b'.');
            client
                .publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
                .expect("queue publish");
        }
        client.disconnect().expect("queue disconnect");
    });
    for event in conn.iter() {
        match event {
            Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => panic!("QoS 0 publisher: {e}"),
        }
    }
    sender.join().expect("sender");
}

#[test]
fn qos0_publishers_are_slowed_to_a_remote_that_reads_slower_not_dropped() {
    // Four rumqttc publishers (two on the bridge's shard, two on the other,
    // whose publications reach the bridge through the mesh) flood QoS 0 at
    // a remote reading ~4 MB/s. The bridge's queue budget is 1 MiB, a
    // quarter of what they send: without pacing, QoS 0 beyond it is dropped.
    // With it, the publishers are not read while the bridge is behind, and
    // everything arrives, in each publisher's order. The bound (10 s here)
    // only ends waits for a remote that takes nothing at all.
    const PUBLISHERS: usize = 4;
    const MESSAGES: usize = 4_000;
    const SIZE: usize = 1024;
    let (remote, got, _) = fake_remote(Duration::from_millis(2));
    let config = format!(
        "[limits]\nmax_queued_bytes = 1048576\n\n\
         [[bridge]]\nname = \"paced\"\naddress = \"{remote}\"\nversion = \"5\"\n\
         keep_alive_s = 30\nqos0_pace_ms_max = 10000\n\
         [[bridge.out]]\ntopic = \"paced/#\"\nqos = 0\n"
    );
    let dir = TestDir::new("bridge-paced");
    let local = start(&dir, &config, &[]);
    wait_connected(&local, "paced");
    let bridge_shard = common::shard_of("tessera-bridge-paced");
    let ids: Vec<String> = (0..PUBLISHERS)
        .map(|k| {
            let shard = if k % 2 == 0 {
                bridge_shard
            } else {
                1 - bridge_shard
            };
            common::id_on_shard(&format!("flood{k}"), shard)
        })
        .collect();
    let floods: Vec<_> = ids
        .iter()
        .map(|id| {
            let (addr, id) = (local.addr(), id.clone());
            thread::spawn(move || qos0_flood(addr, id, "paced/x", MESSAGES, SIZE))
        })
        .collect();
    for f in floods {
        f.join().expect("publisher");
    }
    let total = PUBLISHERS * MESSAGES;
    let dropped = || {
        metric_sum(
            &scrape(local.admin_addr()),
            "tessera_messages_dropped_total",
            &[],
        )
    };
    eventually(
        "every message reaches the remote",
        Duration::from_secs(90),
        || {
            let n = got.lock().unwrap().len();
            assert!(n <= total, "{n} messages for {total} sent");
            assert_eq!(dropped(), 0.0, "dropped with {n} of {total} at the remote");
            n == total
        },
    );
    let got = got.lock().unwrap();
    for id in &ids {
        let seq: Vec<usize> = got
            .iter()
            .filter_map(|p| {
                let text = std::str::from_utf8(&p[..p.len().min(64)]).ok()?;
                let mut parts = text.split(':');
                (parts.next()? == id).then(|| parts.next()?.parse().ok())?
            })
            .collect();
        assert_eq!(
            seq,
            (0..MESSAGES).collect::<Vec<_>>(),
            "{id}: lost or reordered"
        );
    }
    let paced = metric_sum(
        &scrape(local.admin_addr()),
        "tessera_bridge_publishers_paced_total",
        &[],
    );
    assert!(paced > 0.0, "the publishers were never paced");
    assert_eq!(
        bridge_value(&local, "paced", "tessera_bridge_connects_total"),
        1.0
    );
}

#[test]
fn a_bridge_streaming_qos0_pings_the_remote_and_keeps_its_link() {
    // QoS 0 out gets no answer from the remote. With a keep alive of 2 s the
    // bridge must hear from it within 3 s, so it pings although it writes
    // all the time (before, it pinged only when idle, and a steady stream
    // ended the link every 1.5 keep alives: "nothing from the remote").
    let (remote, got, pings) = fake_remote(Duration::ZERO);
    let config = format!(
        "[[bridge]]\nname = \"steady\"\naddress = \"{remote}\"\nversion = \"5\"\n\
         keep_alive_s = 2\n[[bridge.out]]\ntopic = \"steady/#\"\nqos = 0\n"
    );
    let dir = TestDir::new("bridge-steady");
    let local = start(&dir, &config, &[]);
    wait_connected(&local, "steady");
    let mut o = rumqttc::MqttOptions::new("steady-pub", "127.0.0.1", local.addr().port());
    o.set_keep_alive(Duration::from_secs(60));
    let (client, mut conn) = rumqttc::Client::new(o, 100);
    let events = thread::spawn(move || for _ in conn.iter().take_while(Result::is_ok) {});
    // A message every millisecond or so for 5 s: more than 1.5 keep alives
    // without a pause of half of one.
    let start_at = std::time::Instant::now();
    let mut sent = 0;
    while start_at.elapsed() < Duration::from_secs(5) {
        client
            .publish("steady/x", rumqttc::QoS::AtMostOnce, false, vec![b'x'; 64])
            .expect("publish");
        sent += 1;
        thread::sleep(Duration::from_millis(1));
    }
    eventually("the remote got the stream", WAIT, || {
        got.lock().unwrap().len() == sent
    });
    assert!(*pings.lock().unwrap() > 0, "the bridge never pinged");
    assert_eq!(
        bridge_value(&local, "steady", "tessera_bridge_connects_total"),
        1.0,
        "the link ended during the stream"
    );
    client.disconnect().expect("disconnect");
    events.join().expect("events");
}

#[test]
fn sighup_adds_and_removes_bridges() {
    let rdir = TestDir::new("bridge-remote");
    let remote = start(&rdir, "", &[]);
    let ldir = TestDir::new("bridge-local");
    let local = start(&ldir, "", &[]);
    assert_eq!(bridge_value(&local, "late", "tessera_bridge_up"), 0.0);
    let rules = "[[bridge.out]]\ntopic = \"h/#\"\nqos = 1\n";
    std::fs::write(
        format!("{}/tessera.toml", ldir.path_str()),
        bridge_toml("late", remote.addr(), "5", rules),
    )
    .unwrap();
    local.sighup();
    wait_connected(&local, "late");
    let (_s, rx) = subscriber(remote.addr(), "rsub", &[("h/#", 1)]);
    publisher(local.addr(), "lpub")
        .publish("h/1", qos(1), false, "hup")
        .expect("publish");
    assert_eq!(collect(&rx, 1, WAIT).len(), 1);
    // An invalid file keeps the bridge; an empty one removes it.
    std::fs::write(
        format!("{}/tessera.toml", ldir.path_str()),
        "[[bridge]]\nname = 1\n",
    )
    .unwrap();
    local.sighup();
    local.wait_log("keeping the current bridges", WAIT);
    assert_eq!(bridge_value(&local, "late", "tessera_bridge_up"), 1.0);
    std::fs::write(format!("{}/tessera.toml", ldir.path_str()), "").unwrap();
    local.sighup();
    eventually("the bridge is gone", WAIT, || {
        !common::metrics_text(local.admin_addr()).contains("tessera_bridge_up")
    });
    local.wait_log("removed bridge's local session ended", WAIT);
}

/// Writes into `d` a test CA (ca.pem), the remote's certificate for
/// 127.0.0.1 and localhost (server.pem, server.key) and the bridge's client
/// certificate (client.pem, client.key).
fn write_certificates(d: &str) {
    let ca = Ca::new("bridge test CA");
    let (cert, key) = ca.sign("remote", &["127.0.0.1", "localhost"], false);
    let (ccert, ckey) = ca.sign("edge", &["edge"], true);
    for (name, text) in [
        ("ca.pem", &ca.pem),
        ("server.pem", &cert),
        ("server.key", &key),
        ("client.pem", &ccert),
        ("client.key", &ckey),
    ] {
        std::fs::write(format!("{d}/{name}"), text).unwrap();
    }
}

#[test]
fn bridges_reach_the_remote_over_tls_with_a_client_certificate_and_over_websocket() {
    let rdir = TestDir::new("bridge-remote-tls");
    let d = rdir.path_str();
    write_certificates(d);
    let listeners = format!(
        "[[listener]]\nkind = \"mqtts\"\nbind = \"127.0.0.1:0\"\ncert_file = \"{d}/server.pem\"\n\
         key_file = \"{d}/server.key\"\nca_file = \"{d}/ca.pem\"\nrequire_client_cert = true\n\
         [[listener]]\nkind = \"ws\"\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nkind = \"wss\"\nbind = \"127.0.0.1:0\"\ncert_file = \"{d}/server.pem\"\n\
         key_file = \"{d}/server.key\"\nca_file = \"{d}/ca.pem\"\nrequire_client_cert = true\n"
    );
    let remote = start(&rdir, &listeners, &[]);
    let (_sub, rx) = subscriber(remote.addr(), "rsub", &[("tx/#", 1)]);
    let hostport = |url: &str| {
        let rest = url.split_once("://").unwrap().1;
        rest.split('/').next().unwrap().to_owned()
    };
    let tls = format!(
        "ca_file = \"{d}/ca.pem\"\ncert_file = \"{d}/client.pem\"\nkey_file = \"{d}/client.key\"\nsni = \"localhost\"\n"
    );
    let mut config = String::new();
    for transport in ["mqtts", "ws", "wss"] {
        let addr = hostport(&remote.url(transport));
        let extra = if transport == "ws" { "" } else { tls.as_str() };
        config.push_str(&format!(
            "[[bridge]]\nname = \"via-{transport}\"\naddress = \"{addr}\"\ntransport = \"{transport}\"\n\
             reconnect_min_ms = 100\nreconnect_max_ms = 1000\n{extra}\
             [[bridge.out]]\ntopic = \"{transport}/#\"\nremote_prefix = \"tx/\"\nqos = 1\n"
        ));
    }
    let ldir = TestDir::new("bridge-local");
    let local = start(&ldir, &config, &[]);
    let lpub = publisher(local.addr(), "lpub");
    for transport in ["mqtts", "ws", "wss"] {
        wait_connected(&local, &format!("via-{transport}"));
        lpub.publish(
            format!("{transport}/m"),
            qos(1),
            false,
            transport.to_owned(),
        )
        .expect("publish");
    }
    let mut got: Vec<(String, String)> = collect(&rx, 3, WAIT)
        .into_iter()
        .map(|m| (m.0, m.1))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("tx/mqtts/m".to_owned(), "mqtts".to_owned()),
            ("tx/ws/m".to_owned(), "ws".to_owned()),
            ("tx/wss/m".to_owned(), "wss".to_owned()),
        ]
    );
    // A bridge whose CA does not sign the remote's certificate never connects.
    let other = Ca::new("another CA");
    std::fs::write(format!("{d}/other.pem"), &other.pem).unwrap();
    let addr = hostport(&remote.url("mqtts"));
    let bad = format!(
        "[[bridge]]\nname = \"wrong-ca\"\naddress = \"{addr}\"\ntransport = \"mqtts\"\n\
         ca_file = \"{d}/other.pem\"\nsni = \"localhost\"\n[[bridge.out]]\ntopic = \"x\"\n"
    );
    let bdir = TestDir::new("bridge-bad-ca");
    let badb = start(&bdir, &bad, &[]);
    eventually("the TLS failure is recorded", WAIT, || {
        bridge_value(&badb, "wrong-ca", "tessera_bridge_connect_failures_total") >= 1.0
    });
    assert_eq!(bridge_value(&badb, "wrong-ca", "tessera_bridge_up"), 0.0);
}

/// A UDP port free right now on 127.0.0.1 (for a QUIC listener that restarts
/// on it).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[test]
fn bridges_cross_over_quic_both_ways_and_survive_the_remote_killed() {
    // The remote: TCP for the test's clients, a QUIC listener (fixed ports,
    // it restarts on them) that wants a client certificate.
    let rdir = TestDir::new("bridge-remote-quic");
    let d = rdir.path_str();
    write_certificates(d);
    let tcp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let quic: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let listeners = format!(
        "[[listener]]\nkind = \"quic\"\nbind = \"{quic}\"\ncert_file = \"{d}/server.pem\"\n\
         key_file = \"{d}/server.key\"\nca_file = \"{d}/ca.pem\"\nrequire_client_cert = true\n"
    );
    let listen = tcp.to_string();
    let remote = std::cell::RefCell::new(Some(start(&rdir, &listeners, &["--listen", &listen])));
    assert_eq!(
        remote.borrow().as_ref().unwrap().url("quic"),
        format!("quic://{quic}")
    );
    let extra = format!(
        "transport = \"quic\"\nca_file = \"{d}/ca.pem\"\ncert_file = \"{d}/client.pem\"\n\
         key_file = \"{d}/client.key\"\nsni = \"localhost\"\n"
    );
    let via = Via {
        address: Some(quic),
        extra: &extra,
    };

    // Both directions at QoS 0, 1 and 2, over MQTT 5 and 3.1.1; the 3.1.1
    // bridge's connection runs BBR (`congestion`), the listener's CUBIC.
    let extra_bbr = format!("{extra}congestion = \"bbr\"\n");
    for (version, extra) in [("5", &extra), ("3.1.1", &extra_bbr)] {
        let via = Via {
            address: Some(quic),
            extra,
        };
        let local = check_both_ways_via(tcp, via, version);
        // Over QUIC indeed: the remote holds the bridge's QUIC connection.
        let s = scrape(remote.borrow().as_ref().unwrap().admin_addr());
        assert!(metric_sum(&s, "tessera_quic_connections", &[]) >= 1.0);
        drop(local);
    }

    // kill -9 the remote mid-stream: no close reaches the bridge (QUIC has no
    // RST), its idle timeout ends the link; every acknowledged message
    // arrives after the restart, QoS 2 once.
    check_remote_restart_via(
        tcp,
        via,
        "5",
        &mut || {
            let mut r = remote.borrow_mut().take().expect("running");
            unsafe { libc::kill(r.pid() as i32, libc::SIGKILL) };
            r.wait_exit(WAIT);
        },
        &mut || {
            *remote.borrow_mut() = Some(start(&rdir, &listeners, &["--listen", &listen]));
        },
    );

    // A bridge whose CA does not sign the remote's certificate never connects.
    let other = Ca::new("another CA");
    std::fs::write(format!("{d}/other.pem"), &other.pem).unwrap();
    let bad = format!(
        "[[bridge]]\nname = \"wrong-ca\"\naddress = \"{quic}\"\ntransport = \"quic\"\n\
         ca_file = \"{d}/other.pem\"\nsni = \"localhost\"\n[[bridge.out]]\ntopic = \"x\"\n"
    );
    let bdir = TestDir::new("bridge-bad-ca-quic");
    let badb = start(&bdir, &bad, &[]);
    eventually("the QUIC handshake failure is recorded", WAIT, || {
        bridge_value(&badb, "wrong-ca", "tessera_bridge_connect_failures_total") >= 1.0
    });
    assert_eq!(bridge_value(&badb, "wrong-ca", "tessera_bridge_up"), 0.0);
    drop(remote);
}
