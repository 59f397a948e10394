//! Session takeover latency: a persistent MQTT 5 session (one subscription) connects
//! alternately to node A and node B of a cluster while its previous connection is still
//! open, so every CONNECT is a cross-node takeover (claim, fetch, import); the same
//! rounds against one node are the same-node takeover beside it. Reports CONNECT-to-
//! CONNACK p50/p99/max for both, and checks that every CONNACK after the first has
//! session present.
//!
//! usage: cargo run --release -p tessera-bench --example takeover -- A_ADDR B_ADDR ROUNDS
//! (e.g. 127.0.0.1:22001 127.0.0.1:22002 500)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tessera_proto::{
    Connect, ConnectProperties, Encode, Packet, ProtocolVersion, QoS, ReasonCode, Str, Subscribe,
    Subscription, SubscriptionOptions,
};

const V5: ProtocolVersion = ProtocolVersion::V5;

fn send(s: &mut TcpStream, p: &Packet) {
    let mut out = BytesMut::new();
    p.encode(V5, &mut out).expect("valid packet");
    s.write_all(&out).expect("write");
}

fn recv(s: &mut TcpStream, buf: &mut BytesMut) -> Packet {
    loop {
        if let Some(p) = tessera_proto::decode(buf, V5, 1 << 20).expect("valid packet") {
            return p;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "connection closed before the answer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connects `id` to `addr` (no clean start, 600 s expiry); returns the stream, the
/// time to CONNACK and whether a session was present.
fn connect(addr: SocketAddr, id: &str) -> (TcpStream, Duration, bool) {
    let mut s = TcpStream::connect(addr).expect("tcp connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let c = Connect {
        version: V5,
        clean_start: false,
        keep_alive: 60,
        client_id: Str::try_from(id).unwrap(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(600),
            ..Default::default()
        },
    };
    let started = Instant::now();
    send(&mut s, &Packet::Connect(Box::new(c)));
    let mut buf = BytesMut::new();
    match recv(&mut s, &mut buf) {
        Packet::ConnAck(a) => {
            assert_eq!(a.reason_code, ReasonCode::Success, "{a:?}");
            (s, started.elapsed(), a.session_present)
        }
        p => panic!("expected CONNACK, got {p:?}"),
    }
}

fn run(first: SocketAddr, second: SocketAddr, rounds: usize, id: &str) -> Vec<Duration> {
    let (mut s, _, _) = connect(first, id);
    send(
        &mut s,
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: Default::default(),
            subscriptions: vec![Subscription {
                filter: Str::try_from(format!("tk/{id}")).unwrap(),
                options: SubscriptionOptions::qos(QoS::AtLeastOnce),
            }],
        }),
    );
    let mut buf = BytesMut::new();
    assert!(matches!(recv(&mut s, &mut buf), Packet::SubAck(_)));
    let mut old = s;
    let mut took = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let to = if r % 2 == 0 { second } else { first };
        let (s, t, present) = connect(to, id);
        assert!(present, "round {r}: session not present");
        took.push(t);
        drop(std::mem::replace(&mut old, s));
    }
    took
}

fn pct(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn report(what: &str, mut t: Vec<Duration>) -> f64 {
    t.sort();
    let p99 = pct(&t, 0.99);
    println!(
        "{what}: n={} p50={:.2} ms p99={:.2} ms max={:.2} ms",
        t.len(),
        pct(&t, 0.5),
        p99,
        t.last().unwrap().as_secs_f64() * 1e3
    );
    p99
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 3 {
        eprintln!("usage: takeover A_ADDR B_ADDR ROUNDS");
        std::process::exit(2);
    }
    let a: SocketAddr = args[0].parse().expect("A_ADDR");
    let b: SocketAddr = args[1].parse().expect("B_ADDR");
    let rounds: usize = args[2].parse().expect("ROUNDS");
    let tag = std::process::id();
    let same = run(a, a, rounds, &format!("tk-same-{tag}"));
    let cross = run(a, b, rounds, &format!("tk-cross-{tag}"));
    let p_same = report("same-node takeover ", same);
    let p_cross = report("cross-node takeover", cross);
    println!("p99 cross/same = {:.2}", p_cross / p_same);
}
