//! Goal: the bench catches a broker that loses, duplicates or reorders messages,
//! end to end: the JSON report counts each fault exactly and the run exits 1.
//!
//! Method: a scripted fake broker (threads, blocking sockets, our codec) accepts
//! the bench's clients, acknowledges QoS 1 publications, and forwards each one to
//! the subscriber at QoS 0, except that it drops sequence number 20, sends 10
//! twice, and swaps 30 and 31. The bench publishes exactly 100 messages
//! (`--count 100`) at QoS 1, so the expected tally is known. The same fake broker
//! ignores `$share/`: it forwards every message to every member of a group, which
//! the `shared` scenario must count as duplicates. A port nobody listens on
//! makes every connect of `conn` fail, counted by errno.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tessera_proto::{
    ConnAck, Encode, Packet, ProtocolVersion, PubAck, Publish, QoS, ReasonCode, SubAck, decode,
};

use common::bench;

const DROPPED: u64 = 20;
const DUPLICATED: u64 = 10;
const SWAPPED: u64 = 30;

type Subscribers = Arc<Mutex<Vec<TcpStream>>>;

fn send(stream: &mut TcpStream, packet: &impl Encode) {
    let mut buf = BytesMut::new();
    packet
        .encode(ProtocolVersion::V3_1_1, &mut buf)
        .expect("valid packet");
    let _ = stream.write_all(&buf);
}

/// The sequence number in a bench payload (bytes 8..16, see `payload`).
fn seq_of(p: &Publish) -> u64 {
    (&p.payload[8..16]).get_u64()
}

/// Serves one client until it disconnects. `held` keeps the first of the two
/// swapped messages until the second has gone out.
fn serve(mut stream: TcpStream, subscribers: Subscribers) {
    let mut buf = BytesMut::new();
    let mut held: Option<Publish> = None;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(packet) =
            decode(&mut buf, ProtocolVersion::V3_1_1, 1 << 20).expect("the bench sends valid MQTT")
        {
            match packet {
                Packet::Connect(_) => send(
                    &mut stream,
                    &ConnAck {
                        session_present: false,
                        reason_code: ReasonCode::Success,
                        properties: Default::default(),
                    },
                ),
                Packet::Subscribe(s) => {
                    send(
                        &mut stream,
                        &SubAck {
                            packet_id: s.packet_id,
                            properties: Default::default(),
                            reason_codes: vec![ReasonCode::GrantedQoS1],
                        },
                    );
                    let copy = stream.try_clone().expect("clone socket");
                    subscribers.lock().unwrap().push(copy);
                }
                Packet::Publish(p) => {
                    if p.qos == QoS::AtLeastOnce {
                        send(&mut stream, &PubAck::new(p.packet_id));
                    }
                    let seq = seq_of(&p);
                    let forward = Publish::new(p.topic.clone(), p.payload.clone());
                    let copies: Vec<Publish> = match seq {
                        DROPPED => vec![],
                        DUPLICATED => vec![forward.clone(), forward],
                        SWAPPED => {
                            held = Some(forward);
                            vec![]
                        }
                        s if s == SWAPPED + 1 => {
                            vec![forward, held.take().expect("30 came first")]
                        }
                        _ => vec![forward],
                    };
                    for sub in subscribers.lock().unwrap().iter_mut() {
                        for c in &copies {
                            send(sub, c);
                        }
                    }
                }
                Packet::PingReq => send(&mut stream, &Packet::PingResp),
                Packet::Disconnect(_) => return,
                other => panic!("the fake broker does not expect {other:?}"),
            }
        }
    }
}

/// Starts the fake broker; returns its port. Its threads end with the test process.
fn fake_broker() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let subscribers: Subscribers = Arc::default();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let subs = subscribers.clone();
            std::thread::spawn(move || serve(stream, subs));
        }
    });
    port
}

#[test]
fn injected_loss_duplicate_and_reorder_are_reported_and_fail_the_run() {
    let port = fake_broker();
    let run = bench(
        port,
        &[
            "fanin",
            "--publishers",
            "1",
            "--qos",
            "1",
            "--count",
            "100",
            "--warmup",
            "0",
            "--duration",
            "10",
            "--drain",
            "2",
        ],
    );
    let o = &run.output;
    assert_eq!(run.u("sent_count"), 100, "{o}");
    assert_eq!(run.u("expected_count"), 100, "{o}");
    assert_eq!(run.u("received_count"), 99, "{o}");
    assert_eq!(run.u("loss_count"), 1, "{o}");
    assert_eq!(run.u("duplicate_count"), 1, "{o}");
    assert_eq!(run.u("out_of_order_count"), 1, "{o}");
    // 19 -> 21 (the loss) and 29 -> 31 (the swap).
    assert_eq!(run.u("gap_count"), 2, "{o}");
    assert_eq!(run.u("error_count"), 0, "{o}");
    assert_eq!(run.json["pass"], false, "{o}");
    let verdict = run.json["verdict"][0].as_str().unwrap_or_default();
    assert!(verdict.starts_with("lost 1 of 100 messages"), "{o}");
    assert_eq!(run.code, 1, "QoS 1 loss must fail the run\n{o}");
}

#[test]
fn a_broker_that_delivers_to_every_group_member_is_caught() {
    let port = fake_broker();
    let run = bench(
        port,
        &[
            "shared",
            "--publishers",
            "1",
            "--groups",
            "1",
            "--members",
            "2",
            "--qos",
            "1",
            "--count",
            "100",
            "--warmup",
            "0",
            "--duration",
            "10",
            "--drain",
            "2",
        ],
    );
    let o = &run.output;
    assert_eq!(run.u("sent_count"), 100, "{o}");
    // Once per group, not once per member.
    assert_eq!(run.u("expected_count"), 100, "{o}");
    assert_eq!(run.u("received_count"), 99, "{o}");
    assert_eq!(run.u("loss_count"), 1, "{o}");
    // Both members got the 99 forwarded messages (99 copies too many), and each
    // got the injected duplicate once more. The drain waits for arrivals to
    // settle once the expected count is reached, so the late copies are counted.
    assert_eq!(run.u("duplicate_count"), 99 + 2, "{o}");
    assert_eq!(
        run.json["drain"], "quiet",
        "more arrivals than expected\n{o}"
    );
    assert_eq!(run.json["pass"], false, "{o}");
    assert_eq!(run.code, 1, "{o}");
}

#[test]
fn conn_failures_are_counted_by_reason() {
    // Nothing listens on this port: every connect is refused, and the run fails.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let run = bench(
        port,
        &[
            "conn",
            "--clients",
            "5",
            "--rate",
            "100",
            "--duration",
            "0.1",
        ],
    );
    assert_eq!(run.code, 1, "{}", run.output);
    assert_eq!(run.u("connected_count"), 0, "{}", run.output);
    assert_eq!(run.json["failures"]["ECONNREFUSED"], 5, "{}", run.output);
}
