//! Helpers of the bridge tests (tests/bridge.rs with a Tessera remote,
//! tests/bridge_mosquitto.rs with Mosquitto): brokers from a config file,
//! rumqttc clients, a raw persistent subscriber that survives its broker's
//! restart, a publisher that knows what was acknowledged, bridge metrics.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tessera_proto::{Packet, ProtocolVersion, QoS, ReasonCode};

use super::{
    Broker, Closed, RawClient, Received, TestDir, connect_packet, eventually, metric_sum,
    publish_packet, scrape,
};

pub const WAIT: Duration = Duration::from_secs(20);

/// A port free right now on 127.0.0.1 (for a remote that restarts on it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Starts a broker with `config` as its config file and `dir` as its data dir.
pub fn start(dir: &TestDir, config: &str, extra: &[&str]) -> Broker {
    let path = format!("{}/tessera.toml", dir.path_str());
    std::fs::write(&path, config).expect("write config");
    let data = format!("{}/data", dir.path_str());
    let mut args = vec!["--config", path.as_str(), "--data-dir", data.as_str()];
    args.extend_from_slice(extra);
    Broker::start_with(&args, &[])
}

pub fn bridge_value(b: &Broker, name: &str, metric: &str) -> f64 {
    metric_sum(&scrape(b.admin_addr()), metric, &[("bridge", name)])
}

pub fn wait_connected(b: &Broker, name: &str) {
    eventually(&format!("bridge {name} connected"), WAIT, || {
        bridge_value(b, name, "tessera_bridge_up") == 1.0
    });
}

/// A rumqttc v5 subscriber; what it receives comes out of the channel as
/// (topic, payload, qos, retain).
pub fn subscriber(
    addr: SocketAddr,
    id: &str,
    filters: &[(&str, u8)],
) -> (
    rumqttc::v5::Client,
    mpsc::Receiver<(String, String, u8, bool)>,
) {
    use rumqttc::v5::mqttbytes::QoS as Q;
    use rumqttc::v5::mqttbytes::v5::Packet as P;
    let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = rumqttc::v5::Client::new(o, 1000);
    let (tx, rx) = mpsc::channel();
    let (subacked_tx, subacked) = mpsc::channel();
    thread::spawn(move || {
        for event in conn.iter() {
            match event {
                Ok(rumqttc::v5::Event::Incoming(P::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let payload = String::from_utf8_lossy(&p.payload).into_owned();
                    if tx.send((topic, payload, p.qos as u8, p.retain)).is_err() {
                        return;
                    }
                }
                Ok(rumqttc::v5::Event::Incoming(P::SubAck(_))) => {
                    let _ = subacked_tx.send(());
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    for (f, q) in filters {
        let q = match q {
            0 => Q::AtMostOnce,
            1 => Q::AtLeastOnce,
            _ => Q::ExactlyOnce,
        };
        client.subscribe(*f, q).expect("subscribe");
        subacked.recv_timeout(WAIT).expect("SUBACK");
    }
    (client, rx)
}

/// A rumqttc v5 publisher whose event loop runs on a thread.
pub fn publisher(addr: SocketAddr, id: &str) -> rumqttc::v5::Client {
    let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = rumqttc::v5::Client::new(o, 1000);
    thread::spawn(move || {
        for event in conn.iter() {
            if event.is_err() {
                return;
            }
        }
    });
    client
}

pub fn qos(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// Collects `n` messages (or fewer after `timeout`).
pub fn collect(
    rx: &mpsc::Receiver<(String, String, u8, bool)>,
    n: usize,
    timeout: Duration,
) -> Vec<(String, String, u8, bool)> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(m) => got.push(m),
            Err(_) => break,
        }
    }
    got
}

pub fn bridge_toml(name: &str, remote: SocketAddr, version: &str, rules: &str) -> String {
    bridge_toml_with(name, remote, version, "", rules)
}

/// A bridge table with `extra` lines (transport, TLS files) before the rules.
pub fn bridge_toml_with(
    name: &str,
    remote: SocketAddr,
    version: &str,
    extra: &str,
    rules: &str,
) -> String {
    format!(
        "[[bridge]]\nname = \"{name}\"\naddress = \"{remote}\"\nversion = \"{version}\"\n\
         keep_alive_s = 5\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n{extra}{rules}"
    )
}

/// How the bridge reaches the remote, when not over plain TCP at the
/// address the test's clients use.
#[derive(Debug, Clone, Copy, Default)]
pub struct Via<'a> {
    /// The bridge's `address` (default: the clients' address).
    pub address: Option<SocketAddr>,
    /// Lines of the bridge table (transport, TLS files).
    pub extra: &'a str,
}

impl Via<'_> {
    /// Bridge `name`'s table to the remote whose clients use `remote`.
    pub fn toml(&self, name: &str, remote: SocketAddr, version: &str, rules: &str) -> String {
        let address = self.address.unwrap_or(remote);
        bridge_toml_with(name, address, version, self.extra, rules)
    }
}

/// A persistent-session subscriber (3.1.1, clean session 0) on the raw client
/// that reconnects when its broker dies, until stopped. Not rumqttc: after a
/// reconnect rumqttc 0.25 answers the PUBREL a broker re-sends for a released
/// QoS 2 delivery with a connection error (see tests/queue_budget.rs).
pub struct Subscriber {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Subscriber {
    pub fn start(
        addr: SocketAddr,
        id: &str,
        filter: &str,
        log: Arc<Mutex<Received>>,
    ) -> Subscriber {
        let v = ProtocolVersion::V3_1_1;
        let mut c = RawClient::connect_ok(addr, connect_packet(v, id, false, 0));
        c.subscribe(1, &[(filter, QoS::ExactlyOnce)]);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let id = id.to_owned();
        let thread = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut c = Some(c);
            while Instant::now() < deadline && !stopping.load(Ordering::Relaxed) {
                let Some(client) = c.as_mut() else {
                    thread::sleep(Duration::from_millis(100));
                    if let Ok(s) =
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    {
                        drop(s);
                        let (client, ack) =
                            RawClient::connect(addr, connect_packet(v, &id, false, 0));
                        if ack.reason_code == ReasonCode::Success {
                            c = Some(client);
                        }
                    }
                    continue;
                };
                let reply = match client.try_recv(Duration::from_millis(50)) {
                    Ok(p) => match log.lock().unwrap().answer(p) {
                        Some(reply) => reply,
                        None => continue,
                    },
                    Err(Closed::Timeout) => continue,
                    Err(Closed::Eof) => {
                        c = None;
                        continue;
                    }
                };
                if !client.try_send(&reply) {
                    c = None;
                }
            }
            if let Some(mut client) = c {
                client.try_send(&Packet::Disconnect(tessera_proto::Disconnect::new(
                    ReasonCode::Success,
                )));
            }
        });
        Subscriber { stop, thread }
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("subscriber thread");
    }
}

/// Publishes one message at a time on the raw client (so the test knows
/// which were acknowledged); returns the acknowledged payloads.
pub fn publish_acked(
    addr: SocketAddr,
    id: &str,
    qos: QoS,
    topic: &str,
    payloads: &[String],
) -> Vec<String> {
    let v = ProtocolVersion::V5;
    let mut c = RawClient::connect_ok(addr, connect_packet(v, id, true, 0));
    let mut acked = Vec::new();
    for (k, payload) in payloads.iter().enumerate() {
        let pid = (k % 60_000) as u16 + 1;
        c.send(&publish_packet(topic, payload.as_bytes(), qos, pid, false));
        loop {
            match c.try_recv(WAIT) {
                Ok(Packet::PubAck(a)) if a.packet_id == pid => {
                    if !a.reason_code.is_error() {
                        acked.push(payload.clone());
                    }
                    break;
                }
                Ok(Packet::PubRec(r)) if r.packet_id == pid => {
                    if !r.reason_code.is_error() {
                        acked.push(payload.clone());
                    }
                    c.send(&Packet::PubRel(tessera_proto::PubRel::new(pid)));
                }
                Ok(Packet::PubComp(x)) if x.packet_id == pid => break,
                Ok(other) => panic!("publisher got {other:?}"),
                Err(e) => panic!("publisher: no acknowledgement for {payload} ({e:?})"),
            }
        }
    }
    c.disconnect();
    acked
}

pub fn assert_all_arrived(log: &Mutex<Received>, acked: &[String], exactly_once: &HashSet<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: HashSet<String> = log.lock().unwrap().payloads.iter().cloned().collect();
        let missing: Vec<&String> = acked.iter().filter(|p| !got.contains(*p)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} acknowledged messages did not arrive within 60 s, e.g. {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(10)]
        );
        thread::sleep(Duration::from_millis(20));
    }
    let log = log.lock().unwrap();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for p in &log.payloads {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    for p in exactly_once {
        assert!(
            counts.get(p.as_str()).copied().unwrap_or(0) <= 1,
            "QoS 2 message {p} arrived {} times",
            counts[p.as_str()]
        );
    }
}

/// Both directions at QoS 0, 1 and 2 through a bridge to the broker at
/// `remote` speaking `version`: prefixes rewritten, the rule's QoS cap, each
/// message once, and the bridge's counters. Returns the local broker.
pub fn check_both_ways(remote: SocketAddr, version: &str) -> Broker {
    check_both_ways_via(remote, Via::default(), version)
}

/// [`check_both_ways`] with the bridge reaching the remote `via`.
pub fn check_both_ways_via(remote: SocketAddr, via: Via<'_>, version: &str) -> Broker {
    {
        let (_rsub, rrx) = subscriber(
            remote,
            "remote-sub",
            &[("edge/up/#", 2), ("edge/capped/#", 2)],
        );
        let rules = "[[bridge.out]]\ntopic = \"up/#\"\nremote_prefix = \"edge/\"\nqos = 2\n\
                 [[bridge.out]]\ntopic = \"capped/#\"\nremote_prefix = \"edge/\"\nqos = 1\n\
                 [[bridge.in]]\ntopic = \"down/#\"\nremote_prefix = \"cloud/\"\nlocal_prefix = \"from-cloud/\"\nqos = 2\n";
        let ldir = TestDir::new("bridge-local");
        let local = start(&ldir, &via.toml("cloud", remote, version, rules), &[]);
        wait_connected(&local, "cloud");
        let (_lsub, lrx) = subscriber(local.addr(), "local-sub", &[("from-cloud/#", 2)]);

        // Out: local up/qN -> remote edge/up/qN at the published QoS.
        let lpub = publisher(local.addr(), "local-pub");
        for q in 0..3u8 {
            for k in 0..20 {
                lpub.publish(format!("up/q{q}"), qos(q), false, format!("{q}-{k}"))
                    .expect("publish");
            }
        }
        lpub.publish("capped/x", qos(2), false, "capped")
            .expect("publish");
        let got = collect(&rrx, 61, WAIT);
        let mut by_payload: HashMap<String, Vec<(String, u8)>> = HashMap::new();
        for (t, p, q, _) in &got {
            by_payload
                .entry(p.clone())
                .or_default()
                .push((t.clone(), *q));
        }
        for q in 0..3u8 {
            for k in 0..20 {
                let seen = by_payload
                    .get(&format!("{q}-{k}"))
                    .cloned()
                    .unwrap_or_default();
                assert_eq!(
                    seen,
                    vec![(format!("edge/up/q{q}"), q)],
                    "v{version}: message {q}-{k} on the remote (topic, qos), once"
                );
            }
        }
        // The rule's QoS cap: published at 2, forwarded at 1.
        assert_eq!(
            by_payload.get("capped"),
            Some(&vec![("edge/capped/x".to_owned(), 1)]),
            "v{version}"
        );

        // In: remote cloud/down/x -> local from-cloud/down/x.
        let rpub = publisher(remote, "remote-pub");
        for q in 0..3u8 {
            for k in 0..10 {
                rpub.publish(
                    format!("cloud/down/q{q}"),
                    qos(q),
                    false,
                    format!("in-{q}-{k}"),
                )
                .expect("publish");
            }
        }
        let got = collect(&lrx, 30, WAIT);
        let mut seen: Vec<(String, String, u8)> = got
            .iter()
            .map(|(t, p, q, _)| (t.clone(), p.clone(), *q))
            .collect();
        seen.sort();
        let mut want: Vec<(String, String, u8)> = (0..3u8)
            .flat_map(|q| {
                (0..10).map(move |k| (format!("from-cloud/down/q{q}"), format!("in-{q}-{k}"), q))
            })
            .collect();
        want.sort();
        assert_eq!(seen, want, "v{version}: remote to local");
        // Nothing more (no duplicates) arrives.
        assert!(collect(&lrx, 1, Duration::from_millis(300)).is_empty());

        // The counters say the same.
        let s = scrape(local.admin_addr());
        let v = |m: &str| metric_sum(&s, m, &[("bridge", "cloud")]);
        assert_eq!(v("tessera_bridge_messages_sent_total"), 61.0, "v{version}");
        assert_eq!(
            v("tessera_bridge_messages_received_total"),
            30.0,
            "v{version}"
        );
        assert_eq!(
            v("tessera_bridge_messages_dropped_total"),
            0.0,
            "v{version}"
        );
        assert_eq!(v("tessera_bridge_up"), 1.0);
        local
    }
}

/// Publishes at QoS 1 and 2 through a bridge to `remote_addr` (speaking
/// `version`) while the remote is stopped (`stop`) and started again
/// (`restart`) on the same port; asserts every acknowledged message arrives
/// on the remote, QoS 2 ones once, and that the bridge reconnected.
pub fn check_remote_restart(
    remote_addr: SocketAddr,
    version: &str,
    stop: &mut dyn FnMut(),
    restart: &mut dyn FnMut(),
) {
    check_remote_restart_via(remote_addr, Via::default(), version, stop, restart);
}

/// [`check_remote_restart`] with the bridge reaching the remote `via`.
pub fn check_remote_restart_via(
    remote_addr: SocketAddr,
    via: Via<'_>,
    version: &str,
    stop: &mut dyn FnMut(),
    restart: &mut dyn FnMut(),
) {
    let log = Arc::new(Mutex::new(Received::default()));
    // The subscriber's session on the other shard than the bridge's ClientID
    // (a Tessera remote with 2 shards), so every message crosses shards on
    // the remote: a remote killed between its two shards' commits must still
    // deliver the bridge's re-sent QoS 2 PUBLISH exactly once
    // (docs/PERSISTENCE.md, "Cross-shard QoS 2 after a crash").
    let sub_id = super::id_on_shard("remote-sub", 1 - super::shard_of("tessera-bridge-up"));
    let sub = Subscriber::start(remote_addr, &sub_id, "s/#", log.clone());

    let rules = "[[bridge.out]]\ntopic = \"s/#\"\nqos = 2\n";
    let ldir = TestDir::new("bridge-local");
    let local = start(&ldir, &via.toml("up", remote_addr, version, rules), &[]);
    wait_connected(&local, "up");

    // Two publishers (QoS 1 and QoS 2) publish while the remote is stopped
    // and restarted on the same port.
    let addr = local.addr();
    let publishers: Vec<_> = [QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .map(|q| {
            thread::spawn(move || {
                let payloads: Vec<String> = (0..400).map(|k| format!("{q:?}-{k}")).collect();
                let mut acked = Vec::new();
                for chunk in payloads.chunks(20) {
                    acked.extend(publish_acked(addr, &format!("pub-{q:?}"), q, "s/x", chunk));
                    thread::sleep(Duration::from_millis(10));
                }
                (q, acked)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    stop();
    eventually("the bridge sees the link down", WAIT, || {
        bridge_value(&local, "up", "tessera_bridge_up") == 0.0
    });
    thread::sleep(Duration::from_millis(500));
    restart();
    let mut acked = Vec::new();
    let mut qos2 = HashSet::new();
    for p in publishers {
        let (q, got) = p.join().expect("publisher");
        assert_eq!(
            got.len(),
            400,
            "the local broker acknowledges while the remote is down"
        );
        if q == QoS::ExactlyOnce {
            qos2.extend(got.iter().cloned());
        }
        acked.extend(got);
    }
    let state = || {
        let s = scrape(local.admin_addr());
        [
            "queued_messages",
            "inflight_messages",
            "messages_sent_total",
            "up",
        ]
        .map(|m| {
            (
                m,
                metric_sum(&s, &format!("tessera_bridge_{m}"), &[("bridge", "up")]),
            )
        })
    };
    let guard = Diagnose(&state);
    assert_all_arrived(&log, &acked, &qos2);
    std::mem::forget(guard);
    assert!(bridge_value(&local, "up", "tessera_bridge_connects_total") >= 2.0);
    sub.stop();
}

/// Prints the bridge's state when a test fails while it is alive.
struct Diagnose<'a, F: Fn() -> [(&'static str, f64); 4]>(&'a F);

impl<F: Fn() -> [(&'static str, f64); 4]> Drop for Diagnose<'_, F> {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("bridge state at the failure: {:?}", (self.0)());
        }
    }
}
