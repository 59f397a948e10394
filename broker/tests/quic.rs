//! Goal: the `quic` listener serves MQTT 3.1.1 and 5.0 over QUIC with the
//! same engine behaviour as TCP (connect, subscribe, QoS 0/1/2 both ways,
//! retained messages, wills of dropped connections, takeover between a QUIC
//! and a TCP connection of the same ClientID), on the ClientID's owner shard
//! whichever shard the endpoint gave the connection to; mutual TLS with the
//! certificate's CN as username and SIGHUP reload as for `mqtts`; a client
//! that changes its UDP port keeps its connection and session; 0-RTT only
//! when configured; multi-stream mode on bidirectional data streams (answers
//! on the packet's stream) and unidirectional ones (answers on the first
//! stream); and a hostile QUIC
//! peer (garbage datagrams, a first packet that is not CONNECT, too many
//! streams, garbage on a data stream, a flood of handshakes that never open
//! a stream) gets a clear
//! close, costs bounded memory and never stops the broker.
//!
//! Method: the real broker binary (`--shards 2`) with a `[[listener]] kind =
//! "quic"` on port 0 and a certificate from a CA generated per test (rcgen).
//! The QUIC client is quinn (the test drives it from its own tokio runtime)
//! carrying packets encoded with `tessera_proto`, so the test asserts exact
//! packets and QUIC close codes; the TCP side is the raw test client and
//! rumqttc. ClientIDs are chosen on both shards so hand-offs are exercised.
//! Every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{
    Broker, Ca, RawClient, connect_packet, id_on_shard, publish_packet, subscribe_packet,
};
use quinn::crypto::rustls::QuicClientConfig;
use tessera_proto::{
    ConnAck, Connect, Disconnect, Encode, PACKET_BYTES_MAX, Packet, ProtocolVersion, PubAck,
    PubComp, PubRec, PubRel, QoS, ReasonCode, Str, Will,
};

/// Bound for one expected packet or close.
const STEP: Duration = Duration::from_secs(5);

/// The application close codes of the broker (`transport::quic::close_code`).
const CLOSE_DONE: u32 = 0;
const CLOSE_PROTOCOL_ERROR: u32 = 1;
const CLOSE_NO_STREAM: u32 = 3;

/// The tokio runtime the QUIC clients run on.
fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A fresh directory for one test's files.
fn dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-quic-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

/// A broker with a QUIC listener (and the default TCP one) whose certificate
/// `ca` signed; `extra` goes into the listener table, `tables` after it.
fn start(test: &str, ca: &Ca, extra: &str, tables: &str) -> (Broker, SocketAddr) {
    start_with(test, ca, extra, tables, &[])
}

/// [`start`] with extra broker flags.
fn start_with(
    test: &str,
    ca: &Ca,
    extra: &str,
    tables: &str,
    args: &[&str],
) -> (Broker, SocketAddr) {
    let d = dir(test);
    let (cert, key) = ca.sign("tessera test server", &["127.0.0.1", "localhost"], false);
    let cert = write(&d.join("server.pem"), &cert);
    let key = write(&d.join("server.key"), &key);
    let config = format!(
        "[[listener]]\nkind = \"quic\"\nbind = \"127.0.0.1:0\"\ncert_file = \"{cert}\"\n\
         key_file = \"{key}\"\n{extra}\n{tables}\n"
    );
    let path = write(&d.join("tessera.toml"), &config);
    let mut all = vec!["--config", path.as_str()];
    all.extend_from_slice(args);
    let broker = Broker::start_with(&all, &[]);
    let url = broker.url("quic");
    let addr = url.strip_prefix("quic://").unwrap().parse().unwrap();
    (broker, addr)
}

/// How a QUIC client's connection ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The broker closed it with this application code.
    ByBroker(u32),
    /// The stream ended (FIN) with the connection still open.
    StreamEnd,
    /// Anything else (idle timeout, reset).
    Other(String),
    /// Nothing within the wait.
    Timeout,
}

/// An MQTT client over one QUIC stream (single-stream mode).
struct QuicClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
    version: ProtocolVersion,
}

/// A quinn client configuration trusting `ca`, with ALPN `mqtt` and, if
/// given, a client certificate (PEM cert, PEM key).
fn client_config(ca: &Ca, cert: Option<&(String, String)>) -> quinn::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let builder = rustls::ClientConfig::builder().with_root_certificates(ca.roots());
    let mut tls = match cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    tls.alpn_protocols = vec![b"mqtt".to_vec()];
    quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()))
}

impl QuicClient {
    /// Completes a QUIC handshake with the broker at `addr`; no stream yet.
    fn handshake(addr: SocketAddr, ca: &Ca) -> (quinn::Endpoint, quinn::Connection) {
        QuicClient::try_handshake(addr, client_config(ca, None)).expect("QUIC handshake")
    }

    /// A QUIC handshake with `config`, or why it failed.
    fn try_handshake(
        addr: SocketAddr,
        config: quinn::ClientConfig,
    ) -> Result<(quinn::Endpoint, quinn::Connection), String> {
        rt().block_on(async {
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(config);
            let conn = tokio::time::timeout(STEP, endpoint.connect(addr, "localhost").unwrap())
                .await
                .map_err(|_| "no handshake within the step".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok((endpoint, conn))
        })
    }

    /// A QUIC connection with its MQTT stream open; nothing sent yet.
    fn open(addr: SocketAddr, ca: &Ca, version: ProtocolVersion) -> QuicClient {
        QuicClient::open_with(addr, client_config(ca, None), version)
    }

    /// [`QuicClient::open`] with a client configuration of the test's.
    fn open_with(
        addr: SocketAddr,
        config: quinn::ClientConfig,
        version: ProtocolVersion,
    ) -> QuicClient {
        let (endpoint, conn) = QuicClient::try_handshake(addr, config).expect("QUIC handshake");
        let (send, recv) = rt().block_on(conn.open_bi()).expect("open stream");
        QuicClient {
            endpoint,
            conn,
            send,
            recv,
            buf: BytesMut::new(),
            version,
        }
    }

    /// Opens a connection, sends `connect` and returns the CONNACK.
    fn connect(addr: SocketAddr, ca: &Ca, connect: Connect) -> (QuicClient, ConnAck) {
        let mut c = QuicClient::open(addr, ca, connect.version);
        c.send(&Packet::Connect(Box::new(connect)));
        match c.recv() {
            Packet::ConnAck(ack) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn connect_ok(addr: SocketAddr, ca: &Ca, connect: Connect) -> QuicClient {
        let id = connect.client_id.to_string();
        let (c, ack) = QuicClient::connect(addr, ca, connect);
        assert_eq!(ack.reason_code, ReasonCode::Success, "CONNACK for {id}");
        c
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        rt().block_on(self.send.write_all(bytes))
            .expect("write to the broker");
    }

    fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        packet.encode(self.version, &mut out).unwrap();
        self.send_bytes(&out);
    }

    /// The next packet, or how the connection ended, within `wait`.
    fn try_recv(&mut self, wait: Duration) -> Result<Packet, Ended> {
        let deadline = Instant::now() + wait;
        loop {
            match tessera_proto::decode(&mut self.buf, self.version, PACKET_BYTES_MAX) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => panic!("undecodable bytes from the broker: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let read = rt().block_on(async {
                tokio::time::timeout(left, self.recv.read_chunk(64 * 1024, true)).await
            });
            match read {
                Err(_) => return Err(Ended::Timeout),
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(Ok(None)) => {
                    // The broker finished the stream: the close follows.
                    return Err(self.closed(deadline.saturating_duration_since(Instant::now())));
                }
                Ok(Err(_)) => return Err(self.closed(Duration::from_millis(10))),
            }
        }
    }

    fn recv(&mut self) -> Packet {
        self.try_recv(STEP)
            .unwrap_or_else(|e| panic!("expected a packet, got {e:?}"))
    }

    /// How the connection closed, waiting at most `wait` for it.
    fn closed(&self, wait: Duration) -> Ended {
        let conn = self.conn.clone();
        rt().block_on(async move {
            match tokio::time::timeout(wait.max(Duration::from_millis(10)), conn.closed()).await {
                Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
                    Ended::ByBroker(c.error_code.into_inner() as u32)
                }
                Ok(other) => Ended::Other(other.to_string()),
                Err(_) => Ended::StreamEnd,
            }
        })
    }

    /// Waits for the end of the connection (after reading what is left).
    fn expect_end(&mut self) -> Ended {
        loop {
            match self.try_recv(STEP) {
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    }

    /// Drops the connection without DISCONNECT (the application vanished).
    fn drop_connection(self) {
        self.conn.close(0x99u32.into(), b"gone");
        let endpoint = self.endpoint.clone();
        rt().block_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        });
    }
}

fn s(text: &str) -> Str {
    Str::try_from(text).unwrap()
}

/// Expects a PUBLISH on `topic` with `payload`; returns it.
fn expect_publish(p: Packet, topic: &str, payload: &[u8]) -> tessera_proto::Publish {
    match p {
        Packet::Publish(p) => {
            assert_eq!(p.topic.as_str(), topic);
            assert_eq!(&p.payload[..], payload);
            p
        }
        other => panic!("expected PUBLISH {topic}, got {other:?}"),
    }
}

fn pid(p: &tessera_proto::Publish) -> u16 {
    p.packet_id
}

/// The MQTT exchange of the goal, in `version`: QUIC and TCP clients on both
/// shards subscribe and publish to each other at every QoS.
fn exchange(addr: SocketAddr, tcp: SocketAddr, ca: &Ca, version: ProtocolVersion, tag: &str) {
    let topic = format!("quic/{tag}");
    // The QUIC subscriber on shard 1, the TCP publisher on shard 0.
    let mut sub = QuicClient::connect_ok(
        addr,
        ca,
        connect_packet(version, &id_on_shard(&format!("{tag}-qs"), 1), true, 30),
    );
    sub.send(&subscribe_packet(1, &[(&topic, QoS::ExactlyOnce)]));
    assert!(matches!(sub.recv(), Packet::SubAck(_)));
    let mut tpub = RawClient::connect_ok(
        tcp,
        connect_packet(version, &id_on_shard(&format!("{tag}-tp"), 0), true, 30),
    );
    // TCP -> QUIC at QoS 0, 1, 2.
    tpub.send(&publish_packet(&topic, b"t0", QoS::AtMostOnce, 0, false));
    expect_publish(sub.recv(), &topic, b"t0");
    tpub.send(&publish_packet(&topic, b"t1", QoS::AtLeastOnce, 1, false));
    assert!(matches!(tpub.recv(), Packet::PubAck(_)));
    let p = expect_publish(sub.recv(), &topic, b"t1");
    sub.send(&Packet::PubAck(PubAck::new(pid(&p))));
    tpub.send(&publish_packet(&topic, b"t2", QoS::ExactlyOnce, 2, false));
    assert!(matches!(tpub.recv(), Packet::PubRec(_)));
    tpub.send(&Packet::PubRel(PubRel::new(2)));
    assert!(matches!(tpub.recv(), Packet::PubComp(_)));
    let p = expect_publish(sub.recv(), &topic, b"t2");
    assert_eq!(p.qos, QoS::ExactlyOnce);
    sub.send(&Packet::PubRec(PubRec::new(pid(&p))));
    assert!(matches!(sub.recv(), Packet::PubRel(_)));
    sub.send(&Packet::PubComp(PubComp::new(pid(&p))));

    // QUIC -> TCP at QoS 0, 1, 2: a TCP subscriber on shard 1, the QUIC
    // publisher on shard 0.
    let mut tsub = RawClient::connect_ok(
        tcp,
        connect_packet(version, &id_on_shard(&format!("{tag}-ts"), 1), true, 30),
    );
    let back = format!("{topic}/back");
    tsub.send(&subscribe_packet(1, &[(&back, QoS::ExactlyOnce)]));
    assert!(matches!(tsub.recv(), Packet::SubAck(_)));
    let mut qpub = QuicClient::connect_ok(
        addr,
        ca,
        connect_packet(version, &id_on_shard(&format!("{tag}-qp"), 0), true, 30),
    );
    qpub.send(&publish_packet(&back, b"q0", QoS::AtMostOnce, 0, false));
    expect_publish(tsub.recv(), &back, b"q0");
    qpub.send(&publish_packet(&back, b"q1", QoS::AtLeastOnce, 7, false));
    assert_eq!(qpub.recv(), Packet::PubAck(PubAck::new(7)));
    let p = expect_publish(tsub.recv(), &back, b"q1");
    tsub.send(&Packet::PubAck(PubAck::new(pid(&p))));
    qpub.send(&publish_packet(&back, b"q2", QoS::ExactlyOnce, 8, false));
    assert_eq!(qpub.recv(), Packet::PubRec(PubRec::new(8)));
    qpub.send(&Packet::PubRel(PubRel::new(8)));
    assert_eq!(qpub.recv(), Packet::PubComp(PubComp::new(8)));
    let p = expect_publish(tsub.recv(), &back, b"q2");
    tsub.send(&Packet::PubRec(PubRec::new(pid(&p))));
    assert!(matches!(tsub.recv(), Packet::PubRel(_)));
    tsub.send(&Packet::PubComp(PubComp::new(pid(&p))));

    // Retained: set over QUIC, read by a new QUIC subscriber.
    let retained = format!("{topic}/retained");
    qpub.send(&publish_packet(
        &retained,
        b"kept",
        QoS::AtLeastOnce,
        9,
        true,
    ));
    assert_eq!(qpub.recv(), Packet::PubAck(PubAck::new(9)));
    let mut late = QuicClient::connect_ok(
        addr,
        ca,
        connect_packet(version, &id_on_shard(&format!("{tag}-late"), 1), true, 30),
    );
    late.send(&subscribe_packet(1, &[(&retained, QoS::AtMostOnce)]));
    assert!(matches!(late.recv(), Packet::SubAck(_)));
    let p = expect_publish(late.recv(), &retained, b"kept");
    assert!(p.retain, "a retained message arrives with the retain flag");

    // A will of a QUIC connection that vanished, published to the TCP side.
    let will_topic = format!("{topic}/will");
    tsub.send(&subscribe_packet(2, &[(&will_topic, QoS::AtLeastOnce)]));
    assert!(matches!(tsub.recv(), Packet::SubAck(_)));
    let mut c = connect_packet(version, &id_on_shard(&format!("{tag}-will"), 0), true, 30);
    c.will = Some(Will {
        topic: s(&will_topic),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    let willing = QuicClient::connect_ok(addr, ca, c);
    willing.drop_connection();
    expect_publish(tsub.recv(), &will_topic, b"gone");

    // A clean end: DISCONNECT closes the connection with code 0, no will.
    qpub.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    assert_eq!(qpub.expect_end(), Ended::ByBroker(CLOSE_DONE));
    sub.send(&Packet::PingReq);
    assert_eq!(sub.recv(), Packet::PingResp);
}

#[test]
fn quic_serves_mqtt_3_1_1_and_5_like_tcp() {
    let ca = Ca::new("tessera quic test CA");
    let (broker, addr) = start("exchange", &ca, "", "");
    exchange(addr, broker.addr(), &ca, ProtocolVersion::V3_1_1, "v4");
    exchange(addr, broker.addr(), &ca, ProtocolVersion::V5, "v5");
}

#[test]
fn each_congestion_controller_serves_the_exchange() {
    let ca = Ca::new("tessera quic test CA");
    for congestion in ["bbr", "new_reno"] {
        let (broker, addr) = start(
            &format!("congestion-{congestion}"),
            &ca,
            &format!("congestion = \"{congestion}\""),
            "",
        );
        exchange(addr, broker.addr(), &ca, ProtocolVersion::V5, congestion);
    }
}

/// rumqttc over TCP with ClientID `id`, clean session off; returns its client
/// and a channel of its events' outcome (connected, or the error that ended it).
fn rumqttc_client(
    tcp: SocketAddr,
    id: &str,
) -> (
    rumqttc::Client,
    std::sync::mpsc::Receiver<Result<(), String>>,
) {
    let mut opts = rumqttc::MqttOptions::new(id, tcp.ip().to_string(), tcp.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(false);
    let (client, mut connection) = rumqttc::Client::new(opts, 10);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    let _ = tx.send(Ok(()));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    (client, rx)
}

#[test]
fn takeover_between_quic_and_tcp_keeps_the_session() {
    let ca = Ca::new("tessera quic test CA");
    let (broker, addr) = start("takeover", &ca, "", "");
    for (version, shard) in [(ProtocolVersion::V3_1_1, 0), (ProtocolVersion::V5, 1)] {
        let id = id_on_shard(&format!("takeover-{version:?}"), shard);
        let topic = format!("takeover/{version:?}");
        // A persistent QUIC session subscribes.
        let mut first = QuicClient::connect_ok(addr, &ca, connect_packet(version, &id, false, 30));
        if version.is_v5() {
            // v5: a session that outlives the connection needs an expiry.
            first.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
            first.expect_end();
            let mut c = connect_packet(version, &id, true, 30);
            c.properties.session_expiry_interval = Some(300);
            first = QuicClient::connect_ok(addr, &ca, c);
        }
        first.send(&subscribe_packet(1, &[(&topic, QoS::AtLeastOnce)]));
        assert!(matches!(first.recv(), Packet::SubAck(_)));

        // rumqttc over TCP with the same ClientID takes over (3.1.1, clean
        // session off): the QUIC connection ends, v5 with DISCONNECT 0x8E.
        let (tcp_client, events) = rumqttc_client(broker.addr(), &id);
        assert_eq!(events.recv_timeout(STEP), Ok(Ok(())), "rumqttc connected");
        match first.try_recv(STEP) {
            Ok(Packet::Disconnect(d)) => {
                assert!(version.is_v5());
                assert_eq!(d.reason_code, ReasonCode::SessionTakenOver);
                assert_eq!(first.expect_end(), Ended::ByBroker(CLOSE_DONE));
            }
            Err(Ended::ByBroker(code)) => {
                assert!(!version.is_v5(), "v5 gets a DISCONNECT first");
                assert_eq!(code, CLOSE_DONE);
            }
            other => panic!("expected the end of the taken-over connection, got {other:?}"),
        }

        // The session (its subscription) went to TCP: a message arrives there.
        let mut publisher = RawClient::connect_ok(
            broker.addr(),
            connect_packet(version, &id_on_shard("takeover-pub", 1 - shard), true, 30),
        );
        publisher.send(&publish_packet(
            &topic,
            b"to tcp",
            QoS::AtLeastOnce,
            1,
            false,
        ));
        assert!(matches!(publisher.recv(), Packet::PubAck(_)));

        // And back: QUIC takes over from rumqttc, with the session present.
        let mut c = connect_packet(version, &id, false, 30);
        if version.is_v5() {
            c.properties.session_expiry_interval = Some(300);
        }
        let (mut back, ack) = QuicClient::connect(addr, &ca, c);
        assert_eq!(ack.reason_code, ReasonCode::Success);
        assert!(ack.session_present, "the session survived both takeovers");
        let ended = events
            .recv_timeout(STEP)
            .expect("rumqttc saw its connection end");
        assert!(
            ended.is_err(),
            "rumqttc's connection was taken over: {ended:?}"
        );
        drop(tcp_client);
        publisher.send(&publish_packet(
            &topic,
            b"to quic",
            QoS::AtLeastOnce,
            2,
            false,
        ));
        assert!(matches!(publisher.recv(), Packet::PubAck(_)));
        // What was queued while rumqttc held the session may come first.
        let p = loop {
            let p = match back.recv() {
                Packet::Publish(p) => p,
                other => panic!("expected PUBLISH, got {other:?}"),
            };
            back.send(&Packet::PubAck(PubAck::new(pid(&p))));
            if &p.payload[..] == b"to quic" {
                break p;
            }
        };
        assert_eq!(p.topic.as_str(), topic);
        back.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
        back.expect_end();
    }
}

#[test]
fn a_hostile_quic_peer_is_closed_and_the_broker_serves_on() {
    let ca = Ca::new("tessera quic test CA");
    let (broker, addr) = start(
        "hostile",
        &ca,
        "max_streams = 3",
        "[limits]\nconnect_timeout_s = 1",
    );
    let tcp = broker.addr();
    let rss_before = rss_kib(broker.pid());

    // Garbage datagrams of every size: dropped, nothing answered that a
    // client could mistake, the broker unharmed.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for n in 0..2000usize {
        let len = [1, 20, 1200, 1500, 65_000][n % 5];
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = sock.send_to(&bytes, addr);
    }

    // A first packet that is not CONNECT: closed as a protocol error.
    let mut c = QuicClient::open(addr, &ca, ProtocolVersion::V3_1_1);
    c.send(&Packet::PingReq);
    assert_eq!(c.expect_end(), Ended::ByBroker(CLOSE_PROTOCOL_ERROR));
    // Bytes that are not MQTT at all: the same.
    let mut c = QuicClient::open(addr, &ca, ProtocolVersion::V3_1_1);
    c.send_bytes(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(c.expect_end(), Ended::ByBroker(CLOSE_PROTOCOL_ERROR));

    // Too many streams: max_streams = 3 holds the MQTT stream and two data
    // streams; a fourth stream gets no credit while they are open.
    let mut c = QuicClient::connect_ok(
        addr,
        &ca,
        connect_packet(ProtocolVersion::V5, "hostile-streams", true, 30),
    );
    let conn = c.conn.clone();
    let (held, fourth_waits) = rt().block_on(async move {
        let mut held = Vec::new();
        for _ in 0..2 {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            // PINGREQ: the stream exists at the broker once data arrives.
            send.write_all(&[0xC0, 0x00]).await.unwrap();
            held.push((send, recv));
        }
        let fourth = tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await;
        (held, fourth.is_err())
    });
    assert!(
        fourth_waits,
        "a stream beyond max_streams must wait for credit"
    );
    // The PINGREQs of the data streams were answered (on the first stream).
    assert_eq!(c.recv(), Packet::PingResp);
    assert_eq!(c.recv(), Packet::PingResp);
    drop(held);
    // A data stream with bytes that are not MQTT: the connection is closed as
    // a protocol error.
    let conn = c.conn.clone();
    rt().block_on(async move {
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(b"GET / HTTP/1.1\r\n\r\n").await.ok();
        std::mem::forget(_recv);
    });
    assert_eq!(c.expect_end(), Ended::ByBroker(CLOSE_PROTOCOL_ERROR));

    // A handshake that never opens a stream: closed after the connect
    // timeout (1 s) with the "no stream" code.
    let (_idle_endpoint, idle) = QuicClient::handshake(addr, &ca);
    let why = rt().block_on(async { tokio::time::timeout(STEP, idle.closed()).await });
    match why {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code.into_inner(), u64::from(CLOSE_NO_STREAM));
        }
        other => panic!("expected a close with code 3, got {other:?}"),
    }

    // A flood of such handshakes: the broker keeps none of them past the
    // connect timeout. What each client sees depends on how far its handshake
    // got in time on this shared CPU: the close with code 3; the same close
    // before the client confirmed the handshake, which QUIC turns into a bare
    // APPLICATION_ERROR ("aborted by peer", RFC 9000 10.2.3); a handshake
    // the broker dropped unfinished ("timed out"), or, for a client whose
    // handshake the broker dropped before the client completed it, nothing
    // at all ("still open" until the client's own idle timeout). What must
    // hold is on the broker's side: its endpoint holds none of them once the
    // connect timeout passed (`tessera_quic_connections` back to 0).
    let (endpoint, _) = QuicClient::handshake(addr, &ca);
    let flood = 300;
    let started = Instant::now();
    let outcomes = rt().block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..flood {
            let connecting = endpoint.connect(addr, "localhost").unwrap();
            tasks.push(tokio::spawn(async move {
                let conn = match tokio::time::timeout(Duration::from_secs(20), connecting).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => return format!("handshake: {e}"),
                    Err(_) => return "handshake: no end".to_owned(),
                };
                let end = match tokio::time::timeout(Duration::from_secs(8), conn.closed()).await {
                    Ok(end) => end,
                    Err(_) => {
                        // Still open as far as the client knows: probe.
                        if let Ok(Ok((mut send, _recv))) =
                            tokio::time::timeout(STEP, conn.open_bi()).await
                        {
                            let _ = send.write_all(&[0xC0, 0x00]).await;
                        }
                        match tokio::time::timeout(STEP, conn.closed()).await {
                            Ok(end) => end,
                            Err(_) => return "still open".to_owned(),
                        }
                    }
                };
                match end {
                    quinn::ConnectionError::ApplicationClosed(c) => {
                        format!("closed {}", c.error_code)
                    }
                    other => format!("ended: {other}"),
                }
            }));
        }
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        outcomes
    });
    let elapsed = started.elapsed();
    let no_stream = format!("closed {CLOSE_NO_STREAM}");
    let odd: Vec<&String> = outcomes
        .iter()
        .filter(|o| {
            **o != no_stream
                && !o.contains("timed out")
                && !o.contains("aborted by peer")
                && !o.contains("reset by peer")
                && o.as_str() != "still open"
        })
        .collect();
    assert!(odd.is_empty(), "flood outcomes: {odd:?}");
    assert!(
        elapsed < Duration::from_secs(40),
        "the flood took {elapsed:?}"
    );
    let held = |name: &str| quic_gauge(&broker, name);
    let deadline = Instant::now() + Duration::from_secs(10);
    while held("tessera_quic_connections") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the broker still holds {} QUIC connections and {} handshakes after the flood",
            held("tessera_quic_connections"),
            held("tessera_quic_handshakes")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Still serving, over QUIC and TCP, with bounded memory.
    let mut q = QuicClient::connect_ok(
        addr,
        &ca,
        connect_packet(ProtocolVersion::V3_1_1, "hostile-after", true, 30),
    );
    q.send(&Packet::PingReq);
    assert_eq!(q.recv(), Packet::PingResp);
    common::assert_still_serves(tcp, "quic-hostile");
    let rss_after = rss_kib(broker.pid());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

/// The resident set of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[test]
fn mutual_tls_names_the_user_and_sighup_swaps_the_certificate() {
    let ca = Ca::new("tessera quic mTLS CA");
    let d = dir("mtls");
    let ca_file = write(&d.join("ca.pem"), &ca.pem);
    let (broker, addr) = start_with(
        "mtls",
        &ca,
        &format!(
            "ca_file = \"{ca_file}\"\nrequire_client_cert = true\nusername_from_cert = \"cn\""
        ),
        "",
        &["--log-level", "debug"],
    );
    let alice = ca.sign("alice", &[], true);
    let v = ProtocolVersion::V5;
    let mut ok = QuicClient::open_with(addr, client_config(&ca, Some(&alice)), v);
    ok.send(&Packet::Connect(Box::new(connect_packet(
        v, "alice-1", true, 30,
    ))));
    assert!(matches!(ok.recv(), Packet::ConnAck(a) if a.reason_code == ReasonCode::Success));
    ok.send(&subscribe_packet(1, &[("m/t", QoS::AtLeastOnce)]));
    assert!(matches!(ok.recv(), Packet::SubAck(_)));
    let none = QuicClient::try_handshake(addr, client_config(&ca, None));
    let mallory = Ca::new("someone else").sign("mallory", &[], true);
    let other = QuicClient::try_handshake(addr, client_config(&ca, Some(&mallory)));
    // A QUIC client may finish its side of the handshake before the server
    // refuses its certificate: then the connection is closed at once.
    for (who, attempt) in [("no certificate", none), ("another CA", other)] {
        if let Ok((_, conn)) = attempt {
            let why = rt().block_on(async { tokio::time::timeout(STEP, conn.closed()).await });
            assert!(why.is_ok(), "{who}: the broker closes the connection");
        }
    }
    broker.wait_log("connection refused: QUIC handshake failed", STEP);
    broker.wait_log("username from the client certificate", STEP);
    assert!(
        broker
            .log()
            .lines()
            .any(|l| l.contains("username from the client certificate") && l.contains("alice")),
        "the CN became the username"
    );

    // SIGHUP: new handshakes get the new certificate, the live connection stays.
    let new_ca = Ca::new("tessera quic new CA");
    let (cert, key) = new_ca.sign("tessera test server", &["127.0.0.1", "localhost"], false);
    write(&d.join("server.pem"), &cert);
    write(&d.join("server.key"), &key);
    // Client certificates stay verified against the same ca_file.
    broker.sighup();
    // Each endpoint (one per shard: 2) takes the new configuration itself.
    let deadline = Instant::now() + STEP;
    while broker
        .log()
        .matches("QUIC listener: TLS configuration reloaded")
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "both endpoints reload:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Each new connection lands on the endpoint its random connection id
    // picks: several handshakes reach both.
    for _ in 0..10 {
        let fresh = QuicClient::try_handshake(addr, client_config(&new_ca, Some(&alice)));
        assert!(
            fresh.is_ok(),
            "the new certificate is served: {:?}",
            fresh.err()
        );
        let stale = QuicClient::try_handshake(addr, client_config(&ca, Some(&alice)));
        assert!(stale.is_err(), "the old certificate is no longer served");
    }
    ok.send(&Packet::PingReq);
    assert_eq!(ok.recv(), Packet::PingResp);
}

/// One gauge of the QUIC listener from `/metrics`.
fn quic_gauge(broker: &Broker, name: &str) -> f64 {
    common::metrics_text(broker.admin_addr())
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

/// Rebinds of the migration test: with 4 endpoints the kernel's 4-tuple
/// hash alone would keep the client on its endpoint each time with
/// probability 1/4, so all rebinds would pass by luck with 1/4^6 = 1/4096.
const REBINDS: u16 = 6;

#[test]
fn a_client_that_changes_its_udp_port_keeps_its_connection_and_session() {
    let ca = Ca::new("tessera quic migration CA");
    // Four endpoint threads with their UDP sockets on the listener's port: a
    // new client port lands at another socket unless the listener steers
    // datagrams by connection id to the endpoint that holds the connection.
    let (broker, addr) = start("migration", &ca, "endpoints = 4", "");
    assert_eq!(quic_gauge(&broker, "tessera_quic_endpoints"), 4.0);
    let v = ProtocolVersion::V5;
    let mut mobile = QuicClient::connect_ok(
        addr,
        &ca,
        connect_packet(v, &id_on_shard("mobile", 1), true, 30),
    );
    mobile.send(&subscribe_packet(1, &[("m/down", QoS::AtLeastOnce)]));
    assert!(matches!(mobile.recv(), Packet::SubAck(_)));
    let mut tcp = RawClient::connect_ok(
        broker.addr(),
        connect_packet(v, &id_on_shard("fixed", 0), true, 30),
    );
    tcp.send(&subscribe_packet(1, &[("m/up", QoS::AtLeastOnce)]));
    assert!(matches!(tcp.recv(), Packet::SubAck(_)));
    let connection = mobile.conn.stable_id();
    for round in 0..REBINDS {
        // NAT rebinding / Wi-Fi to mobile: a new local UDP port.
        let before = mobile.endpoint.local_addr().unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let _guard = rt().enter();
        mobile.endpoint.rebind(socket).expect("rebind");
        let after = mobile.endpoint.local_addr().unwrap();
        assert_ne!(before.port(), after.port());
        // Publishing and receiving go on with no reconnect.
        let up = format!("up {round}");
        mobile.send(&publish_packet(
            "m/up",
            up.as_bytes(),
            QoS::AtLeastOnce,
            10 + round,
            false,
        ));
        assert_eq!(mobile.recv(), Packet::PubAck(PubAck::new(10 + round)));
        let p = expect_publish(tcp.recv(), "m/up", up.as_bytes());
        tcp.send(&Packet::PubAck(PubAck::new(pid(&p))));
        let down = format!("down {round}");
        tcp.send(&publish_packet(
            "m/down",
            down.as_bytes(),
            QoS::AtLeastOnce,
            20 + round,
            false,
        ));
        assert!(matches!(tcp.recv(), Packet::PubAck(_)));
        let p = expect_publish(mobile.recv(), "m/down", down.as_bytes());
        mobile.send(&Packet::PubAck(PubAck::new(pid(&p))));
        assert_eq!(
            mobile.conn.stable_id(),
            connection,
            "the same QUIC connection"
        );
        assert_eq!(mobile.conn.remote_address(), addr);
    }
}

/// Connects twice to `addr` with one client configuration (so the second
/// resumes), the second time sending CONNECT as 0-RTT early data: whether the
/// broker accepted the early data, and the packet that answered the CONNECT;
/// `None` when the broker's ticket does not allow early data at all.
fn early_connect(addr: SocketAddr, ca: &Ca, id: &str) -> Option<(bool, Packet)> {
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"mqtt".to_vec()];
    tls.enable_early_data = true;
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let v = ProtocolVersion::V3_1_1;
    let mut first = QuicClient::open_with(addr, config.clone(), v);
    first.send(&Packet::Connect(Box::new(connect_packet(v, id, true, 30))));
    assert!(matches!(first.recv(), Packet::ConnAck(a) if a.reason_code == ReasonCode::Success));
    first.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    assert_eq!(first.expect_end(), Ended::ByBroker(CLOSE_DONE));
    let endpoint = first.endpoint.clone();
    let id = id.to_owned();
    rt().block_on(async move {
        let connecting = endpoint.connect_with(config, addr, "localhost").unwrap();
        let Ok((conn, accepted)) = connecting.into_0rtt() else {
            return None;
        };
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut out = BytesMut::new();
        Packet::Connect(Box::new(connect_packet(v, &id, true, 30)))
            .encode(v, &mut out)
            .unwrap();
        // Written before the handshake completes: early data (resent in
        // 1-RTT by quinn if the broker refuses it).
        send.write_all(&out).await.unwrap();
        let accepted = tokio::time::timeout(STEP, accepted).await.unwrap();
        let mut buf = BytesMut::new();
        let packet = loop {
            if let Some(p) = tessera_proto::decode(&mut buf, v, PACKET_BYTES_MAX).unwrap() {
                break p;
            }
            let chunk = tokio::time::timeout(STEP, recv.read_chunk(4096, true))
                .await
                .unwrap()
                .unwrap()
                .expect("a CONNACK before the end");
            buf.extend_from_slice(&chunk.bytes);
        };
        Some((accepted, packet))
    })
}

#[test]
fn zero_rtt_only_when_configured_and_a_connect_in_early_data_is_served() {
    let ca = Ca::new("tessera quic 0-RTT CA");
    let (_broker, addr) = start("zero-rtt", &ca, "zero_rtt = true", "");
    let (accepted, packet) =
        early_connect(addr, &ca, "early-1").expect("a ticket that allows early data");
    assert!(accepted, "zero_rtt = true: the broker accepts early data");
    assert!(
        matches!(&packet, Packet::ConnAck(a) if a.reason_code == ReasonCode::Success),
        "the CONNECT sent as early data was served (after the handshake): {packet:?}"
    );
    let (_plain, addr) = start("no-zero-rtt", &ca, "", "");
    assert!(
        early_connect(addr, &ca, "early-2").is_none(),
        "by default the broker's tickets allow no early data"
    );
}

#[test]
fn metrics_and_the_admin_api_show_quic_connections_with_their_transport() {
    let ca = Ca::new("tessera quic admin CA");
    let (broker, addr) = start("admin", &ca, "", "");
    let url = broker.url("quic");
    let v = ProtocolVersion::V5;
    // Connections of both endpoints (one per shard) count in the listener's
    // gauges.
    assert_eq!(quic_gauge(&broker, "tessera_quic_endpoints"), 2.0);
    let more: Vec<QuicClient> = (0..6)
        .map(|k| {
            QuicClient::connect_ok(addr, &ca, connect_packet(v, &format!("more-{k}"), true, 30))
        })
        .collect();
    assert_eq!(quic_gauge(&broker, "tessera_quic_connections"), 6.0);
    assert_eq!(quic_gauge(&broker, "tessera_quic_handshakes"), 0.0);
    drop(more);
    let mut q = QuicClient::connect_ok(addr, &ca, connect_packet(v, "listed-quic", true, 30));
    let mut t = RawClient::connect_ok(broker.addr(), connect_packet(v, "listed-tcp", true, 30));
    q.send(&Packet::PingReq);
    assert_eq!(q.recv(), Packet::PingResp);
    t.send(&Packet::PingReq);
    assert_eq!(t.recv(), Packet::PingResp);

    let text = common::metrics_text(broker.admin_addr());
    let served = |transport: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("tessera_listener_connections{")
                    && l.contains(&format!("transport=\"{transport}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!(served("quic"), 1.0, "{text}");
    assert_eq!(served("mqtt"), 1.0, "{text}");
    assert!(
        text.contains(&format!("listener=\"{url}\"")),
        "the QUIC listener's URL labels its gauge:\n{text}"
    );

    let admin = tessera_broker::admin::client::AdminClient::new(
        &format!("http://{}", broker.admin_addr()),
        None,
        STEP,
    )
    .unwrap();
    for (id, transport, listener) in [
        ("listed-quic", "quic", url.clone()),
        ("listed-tcp", "mqtt", format!("mqtt://{}", broker.addr())),
    ] {
        let c = admin
            .json("GET", &["api", "v1", "clients", id], &[])
            .unwrap();
        assert_eq!(c["transport"], transport, "{c}");
        assert_eq!(c["listener"], listener.as_str(), "{c}");
    }
    q.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    q.expect_end();
}

#[test]
fn a_stopping_broker_disconnects_quic_clients_and_exits() {
    let ca = Ca::new("tessera quic shutdown CA");
    let (mut broker, addr) = start("shutdown", &ca, "", "");
    let v = ProtocolVersion::V5;
    let mut q = QuicClient::connect_ok(addr, &ca, connect_packet(v, "stopping-quic", true, 30));
    q.send(&Packet::PingReq);
    assert_eq!(q.recv(), Packet::PingResp);
    broker.sigterm();
    match q.try_recv(STEP) {
        Ok(Packet::Disconnect(d)) => assert_eq!(d.reason_code, ReasonCode::ServerShuttingDown),
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    assert_eq!(q.expect_end(), Ended::ByBroker(CLOSE_DONE));
    assert!(broker.wait_exit(Duration::from_secs(15)).success());
}

/// Reads the next packet of a data stream's receiving side.
async fn recv_on(recv: &mut quinn::RecvStream, buf: &mut BytesMut, v: ProtocolVersion) -> Packet {
    loop {
        if let Some(p) = tessera_proto::decode(buf, v, PACKET_BYTES_MAX).unwrap() {
            return p;
        }
        let chunk = tokio::time::timeout(STEP, recv.read_chunk(4096, true))
            .await
            .expect("a packet on the data stream within the step")
            .unwrap()
            .expect("the data stream is open");
        buf.extend_from_slice(&chunk.bytes);
    }
}

fn encoded(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    p.encode(v, &mut out).unwrap();
    out.to_vec()
}

#[test]
fn multi_stream_mode_answers_on_the_stream_of_the_packet() {
    let ca = Ca::new("tessera quic multi-stream CA");
    let (broker, addr) = start("multi", &ca, "", "");
    for v in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        let id = id_on_shard(&format!("multi-{v:?}"), 1);
        let mut c = QuicClient::open(addr, &ca, v);
        let conn = c.conn.clone();
        // A data stream opened and used before CONNECT: it waits for the
        // CONNACK.
        let (mut sub_send, mut sub_recv) = rt().block_on(async {
            let (mut s, r) = conn.open_bi().await.unwrap();
            s.write_all(&encoded(
                &subscribe_packet(3, &[("ms/#", QoS::ExactlyOnce)]),
                v,
            ))
            .await
            .unwrap();
            (s, r)
        });
        c.send(&Packet::Connect(Box::new(connect_packet(v, &id, true, 30))));
        assert!(matches!(c.recv(), Packet::ConnAck(a) if a.reason_code == ReasonCode::Success));
        let conn = c.conn.clone();
        let mut tcp = RawClient::connect_ok(
            broker.addr(),
            connect_packet(v, &id_on_shard("multi-tcp", 0), true, 30),
        );
        rt().block_on(async {
            let mut sub_buf = BytesMut::new();
            assert!(
                matches!(recv_on(&mut sub_recv, &mut sub_buf, v).await, Packet::SubAck(a) if a.packet_id == 3),
                "the SUBACK on the SUBSCRIBE's stream"
            );
            // A second data stream publishes QoS 1 and 2: acks on it.
            let (mut pub_send, mut pub_recv) = conn.open_bi().await.unwrap();
            let mut pub_buf = BytesMut::new();
            pub_send
                .write_all(&encoded(&publish_packet("ms/1", b"one", QoS::AtLeastOnce, 5, false), v))
                .await
                .unwrap();
            assert_eq!(recv_on(&mut pub_recv, &mut pub_buf, v).await, Packet::PubAck(PubAck::new(5)));
            pub_send
                .write_all(&encoded(&publish_packet("other", b"two", QoS::ExactlyOnce, 6, false), v))
                .await
                .unwrap();
            assert_eq!(recv_on(&mut pub_recv, &mut pub_buf, v).await, Packet::PubRec(PubRec::new(6)));
            pub_send.write_all(&encoded(&Packet::PubRel(PubRel::new(6)), v)).await.unwrap();
            assert_eq!(recv_on(&mut pub_recv, &mut pub_buf, v).await, Packet::PubComp(PubComp::new(6)));
            // The delivery of ms/1 goes on the SUBSCRIBE's stream.
            let p = match recv_on(&mut sub_recv, &mut sub_buf, v).await {
                Packet::Publish(p) => p,
                other => panic!("expected the delivery, got {other:?}"),
            };
            assert_eq!((p.topic.as_str(), &p.payload[..]), ("ms/1", &b"one"[..]));
            sub_send.write_all(&encoded(&Packet::PubAck(PubAck::new(p.packet_id)), v)).await.unwrap();
        });
        // A QoS 2 delivery from TCP: PUBLISH and PUBREL on the SUBSCRIBE's stream.
        tcp.send(&publish_packet(
            "ms/2",
            b"three",
            QoS::ExactlyOnce,
            1,
            false,
        ));
        assert!(matches!(tcp.recv(), Packet::PubRec(_)));
        tcp.send(&Packet::PubRel(PubRel::new(1)));
        assert!(matches!(tcp.recv(), Packet::PubComp(_)));
        rt().block_on(async {
            let mut sub_buf = BytesMut::new();
            let p = match recv_on(&mut sub_recv, &mut sub_buf, v).await {
                Packet::Publish(p) => p,
                other => panic!("expected the QoS 2 delivery, got {other:?}"),
            };
            assert_eq!(p.topic.as_str(), "ms/2");
            sub_send
                .write_all(&encoded(&Packet::PubRec(PubRec::new(p.packet_id)), v))
                .await
                .unwrap();
            assert_eq!(
                recv_on(&mut sub_recv, &mut sub_buf, v).await,
                Packet::PubRel(PubRel::new(p.packet_id))
            );
            sub_send
                .write_all(&encoded(&Packet::PubComp(PubComp::new(p.packet_id)), v))
                .await
                .unwrap();
        });
        // A unidirectional data stream (mqtt-lib's multi-stream mode): its
        // packets are served, and their answers go on the first stream.
        rt().block_on(async {
            let mut uni = conn.open_uni().await.unwrap();
            let publish = publish_packet("uni/1", b"four", QoS::AtLeastOnce, 7, false);
            uni.write_all(&encoded(&publish, v)).await.unwrap();
            let subscribe = subscribe_packet(8, &[("uni-sub/#", QoS::AtMostOnce)]);
            uni.write_all(&encoded(&subscribe, v)).await.unwrap();
        });
        assert_eq!(c.recv(), Packet::PubAck(PubAck::new(7)));
        assert!(matches!(c.recv(), Packet::SubAck(a) if a.packet_id == 8));
        // The first stream still answers PINGREQ.
        c.send(&Packet::PingReq);
        assert_eq!(c.recv(), Packet::PingResp);
        c.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
        assert_eq!(c.expect_end(), Ended::ByBroker(CLOSE_DONE));
    }
}
