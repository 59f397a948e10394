//! Goal: every listener kind (MQTT over TLS, WebSocket, WebSocket over TLS)
//! serves real third-party clients, mutual TLS refuses what it must and says
//! why in the log, SIGHUP swaps certificates without dropping connections,
//! and clients of every transport reach each other across shards.
//!
//! Method: the real broker binary (`--shards 2`) with `[[listener]]` tables on
//! port 0 and certificates generated per test with rcgen; clients are rumqttc
//! (its rustls TLS and its async-tungstenite WebSocket transports), tungstenite
//! for WebSocket frames the MQTT client never sends, and raw TCP for refused
//! upgrades. Every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{Broker, Ca, id_on_shard};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use tokio::sync::mpsc;

/// Bound for one client operation (connect, one message).
const STEP: Duration = Duration::from_secs(5);

/// Largest packet the test clients send or accept (rumqttc's default is 10 KiB).
const MESSAGE_BYTES_MAX: usize = 256 * 1024;

/// A fresh directory for one test's files.
fn dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-transport-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

/// The server certificate files for 127.0.0.1 signed by `ca`: (cert path, key path).
fn server_files(d: &Path, ca: &Ca, tag: &str) -> (String, String) {
    let (cert, key) = ca.sign("tessera test server", &["127.0.0.1", "localhost"], false);
    (
        write(&d.join(format!("server-{tag}.pem")), &cert),
        write(&d.join(format!("server-{tag}.key")), &key),
    )
}

fn start(d: &Path, config: &str, extra: &[&str]) -> Broker {
    let path = write(&d.join("tessera.toml"), config);
    let mut args = vec!["--config", path.as_str()];
    args.extend_from_slice(extra);
    let args: Vec<&str> = args.to_vec();
    Broker::start_with(&args, &[])
}

/// rustls client settings trusting `ca`, with a client certificate if given.
fn tls_client(ca: &Ca, cert: Option<&(String, String)>) -> TlsConfiguration {
    let builder = rustls::ClientConfig::builder().with_root_certificates(ca.roots());
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain =
                vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    TlsConfiguration::Rustls(Arc::new(config))
}

/// `host:port` of a URL such as `mqtts://127.0.0.1:4321`.
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").unwrap().1;
    let hostport = rest.split('/').next().unwrap();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    (host.to_owned(), port.parse().unwrap())
}

/// Options for a client of `url` (`mqtt://`, `mqtts://`, `ws://`, `wss://`).
fn options(id: &str, url: &str, tls: Option<TlsConfiguration>) -> MqttOptions {
    let (host, port) = host_port(url);
    let mut o = if url.starts_with("ws") {
        // rumqttc takes the whole URL as the host for WebSockets.
        MqttOptions::new(id, url, port)
    } else {
        MqttOptions::new(id, host, port)
    };
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(MESSAGE_BYTES_MAX, MESSAGE_BYTES_MAX);
    let transport = match (url.split_once("://").unwrap().0, tls) {
        ("mqtt", None) => Transport::Tcp,
        ("mqtts", Some(t)) => Transport::Tls(t),
        ("ws", None) => Transport::Ws,
        ("wss", Some(t)) => Transport::Wss(t),
        (scheme, _) => panic!("no client for {scheme}"),
    };
    o.set_transport(transport);
    o
}

/// A connected client: the handle and a channel of (topic, payload) received.
struct Client {
    id: String,
    client: AsyncClient,
    inbox: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

/// Connects; `Err` with the event loop's error if the connection fails
/// before CONNACK.
async fn connect(opts: MqttOptions) -> Result<Client, String> {
    let id = opts.client_id();
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let first = tokio::time::timeout(STEP, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no CONNACK in time".to_owned())??;
    assert_eq!(first.code, rumqttc::ConnectReturnCode::Success, "{id}");
    let (tx, inbox) = mpsc::unbounded_channel();
    tokio::spawn(drive(eventloop, tx));
    Ok(Client { id, client, inbox })
}

async fn drive(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<(String, Vec<u8>)>) {
    while let Ok(event) = eventloop.poll().await {
        if let Event::Incoming(Packet::Publish(p)) = event {
            let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
        }
    }
}

impl Client {
    async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
    }

    async fn publish(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
    }

    /// The next message, within [`STEP`].
    async fn recv(&mut self) -> (String, Vec<u8>) {
        tokio::time::timeout(STEP, self.inbox.recv())
            .await
            .unwrap_or_else(|_| panic!("{}: no message in time", self.id))
            .unwrap_or_else(|| panic!("{}: connection ended", self.id))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A subscription is in force once a message published after it arrives.
async fn wait_subscribed(c: &mut Client, topic: &str) {
    c.publish(topic, b"probe").await;
    let (t, _) = c.recv().await;
    assert_eq!(t, topic);
}

fn tls_listeners(cert: &str, key: &str) -> String {
    format!(
        "[[listener]]\nkind = \"mqtts\"\nbind = \"127.0.0.1:0\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\n\
         [[listener]]\nkind = \"ws\"\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nkind = \"wss\"\nbind = \"127.0.0.1:0\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n"
    )
}

#[test]
fn clients_of_every_transport_reach_each_other_across_shards() {
    let d = dir("cross");
    let ca = Ca::new("cross CA");
    let (cert, key) = server_files(&d, &ca, "a");
    let broker = start(&d, &tls_listeners(&cert, &key), &[]);
    let urls = [
        format!("mqtt://{}", broker.addr()),
        broker.url("mqtts"),
        broker.url("ws"),
        broker.url("wss"),
    ];
    runtime().block_on(async {
        // Two clients per transport, one owned by each shard: whichever shard
        // accepts a connection, half of them are handed off with their TLS or
        // WebSocket state.
        let mut clients = Vec::new();
        for url in &urls {
            let scheme = url.split_once("://").unwrap().0;
            for shard in 0..2 {
                let id = id_on_shard(&format!("{scheme}-"), shard);
                let tls = matches!(scheme, "mqtts" | "wss").then(|| tls_client(&ca, None));
                let c = connect(options(&id, url, tls))
                    .await
                    .unwrap_or_else(|e| panic!("{id} on {url}: {e}"));
                c.subscribe("all/#").await;
                clients.push(c);
            }
        }
        for c in &mut clients {
            let own = format!("probe/{}", c.id);
            c.subscribe(&own).await;
            wait_subscribed(c, &own).await;
        }
        // Every client publishes; every client gets every message, including
        // ones large enough to span many TLS records and WebSocket reads.
        let big = vec![0x5a; 100_000];
        for c in &clients {
            let payload = if c.id.starts_with("wss") {
                &big[..]
            } else {
                c.id.as_bytes()
            };
            c.publish(&format!("all/{}", c.id), payload).await;
        }
        let ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
        for c in &mut clients {
            let mut got = Vec::new();
            for _ in 0..ids.len() {
                let (topic, payload) = c.recv().await;
                let from = topic.strip_prefix("all/").unwrap().to_owned();
                let expected = if from.starts_with("wss") {
                    big.len()
                } else {
                    from.len()
                };
                assert_eq!(payload.len(), expected, "{} from {from}", c.id);
                got.push(from);
            }
            got.sort();
            let mut want = ids.clone();
            want.sort();
            assert_eq!(got, want, "{}", c.id);
        }
    });
}

#[test]
fn mutual_tls_accepts_ca_signed_clients_and_refuses_others_with_a_log_line() {
    let d = dir("mtls");
    let ca = Ca::new("mtls CA");
    let (cert, key) = server_files(&d, &ca, "a");
    let ca_file = write(&d.join("ca.pem"), &ca.pem);
    let config = format!(
        "[[listener]]\nkind = \"mqtts\"\nbind = \"127.0.0.1:0\"\ncert_file = \"{cert}\"\n\
         key_file = \"{key}\"\nca_file = \"{ca_file}\"\nrequire_client_cert = true\n\
         username_from_cert = \"cn\"\n"
    );
    let broker = start(&d, &config, &["--log-level", "debug"]);
    let url = broker.url("mqtts");
    let alice = ca.sign("alice", &[], true);
    let stranger_ca = Ca::new("someone else");
    let mallory = stranger_ca.sign("mallory", &[], true);
    runtime().block_on(async {
        let mut ok = connect(options(
            "alice-1",
            &url,
            Some(tls_client(&ca, Some(&alice))),
        ))
        .await
        .expect("a client certificate signed by the CA is accepted");
        ok.subscribe("m/t").await;
        wait_subscribed(&mut ok, "m/t").await;

        let none = connect(options("anon-1", &url, Some(tls_client(&ca, None)))).await;
        assert!(none.is_err(), "a client without a certificate is refused");
        let other = connect(options(
            "mallory-1",
            &url,
            Some(tls_client(&ca, Some(&mallory))),
        ))
        .await;
        assert!(other.is_err(), "a certificate from another CA is refused");
    });
    broker.wait_log(
        "connection refused: TLS handshake failed: peer sent no certificates",
        STEP,
    );
    broker.wait_log(
        "connection refused: TLS handshake failed: invalid peer certificate",
        STEP,
    );
    let log = broker.log();
    assert!(
        log.lines()
            .any(|l| l.contains("username from the client certificate") && l.contains("alice")),
        "the CN became the username:\n{log}"
    );
}

#[test]
fn sighup_reload_serves_the_new_certificate_and_keeps_connections() {
    let d = dir("reload");
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let (cert, key) = server_files(&d, &old_ca, "live");
    let config = format!(
        "[[listener]]\nkind = \"mqtts\"\nbind = \"127.0.0.1:0\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n"
    );
    let broker = start(&d, &config, &[]);
    let url = broker.url("mqtts");
    runtime().block_on(async {
        let mut before = connect(options("before", &url, Some(tls_client(&old_ca, None))))
            .await
            .unwrap();
        before.subscribe("r/t").await;
        wait_subscribed(&mut before, "r/t").await;

        // Replace the files, reload.
        let (new_cert, new_key) = new_ca.sign("tessera test server", &["127.0.0.1"], false);
        write(Path::new(&cert), &new_cert);
        write(Path::new(&key), &new_key);
        broker.sighup();
        broker.wait_log("SIGHUP: TLS certificates reloaded", STEP);

        let after = connect(options("after", &url, Some(tls_client(&new_ca, None))))
            .await
            .expect("new handshakes use the new certificate");
        let stale = connect(options("stale", &url, Some(tls_client(&old_ca, None)))).await;
        assert!(stale.is_err(), "the old certificate is no longer served");

        // The connection made before the reload still works both ways.
        after.publish("r/t", b"after reload").await;
        let (_, payload) = before.recv().await;
        assert_eq!(payload, b"after reload");

        // A broken file is refused as a whole; the current certificate stays.
        write(Path::new(&cert), "not a certificate");
        broker.sighup();
        broker.wait_log(
            "SIGHUP: TLS reload failed, keeping the current certificates",
            STEP,
        );
        connect(options("after-bad", &url, Some(tls_client(&new_ca, None))))
            .await
            .expect("still served after a failed reload");
        before.publish("r/t", b"still here").await;
        assert_eq!(before.recv().await.1, b"still here");
    });
}

/// A log line without its ANSI colour sequences.
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... m
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `tessera_certificate_expiry_timestamp_seconds` for the one TLS listener.
fn listener_cert_expiry(broker: &Broker) -> Option<f64> {
    common::scrape(broker.admin_addr())
        .samples
        .into_iter()
        .find(|s| {
            s.metric == "tessera_certificate_expiry_timestamp_seconds"
                && s.labels
                    .get("certificate")
                    .is_some_and(|c| c.starts_with("listener ") && c.contains(" mqtts://"))
        })
        .and_then(|s| match s.value {
            prometheus_parse::Value::Gauge(v) => Some(v),
            _ => None,
        })
}

#[test]
fn a_certificate_near_its_end_is_logged_and_exported_and_a_renewal_clears_it() {
    let d = dir("expiry");
    let ca = Ca::new("expiry CA");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let soon = now + 10 * 86_400;
    let (cert, key) = ca.sign_until("tessera test server", &["127.0.0.1"], false, Some(soon));
    let cert = write(&d.join("server.pem"), &cert);
    let key = write(&d.join("server.key"), &key);
    let config = format!(
        "[[listener]]\nkind = \"mqtts\"\nbind = \"127.0.0.1:0\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n"
    );
    let broker = start(&d, &config, &[]);
    // The operator is told at start, with the listener, the date and what to do.
    broker.wait_log("the certificate expires soon", STEP);
    let line = broker
        .log()
        .lines()
        .find(|l| l.contains("the certificate expires soon"))
        .map(without_colours)
        .unwrap();
    assert!(
        line.contains("days_left=9") || line.contains("days_left=10"),
        "{line}"
    );
    assert!(
        line.contains(" mqtts://127.0.0.1:") && line.contains("SIGHUP"),
        "{line}"
    );
    // Prometheus sees the date (the alerts compare it with time()).
    assert_eq!(listener_cert_expiry(&broker), Some(soon as f64));
    // The certificate still serves until then.
    runtime().block_on(async {
        connect(options(
            "expiring",
            &broker.url("mqtts"),
            Some(tls_client(&ca, None)),
        ))
        .await
        .expect("a certificate near its end still serves");
    });

    // Renewed (rcgen's default validity runs to 4096) and reloaded: the gauge follows,
    // and no new warning is logged.
    let (new_cert, new_key) = ca.sign("tessera test server", &["127.0.0.1"], false);
    write(Path::new(&cert), &new_cert);
    write(Path::new(&key), &new_key);
    broker.sighup();
    broker.wait_log("SIGHUP: TLS certificates reloaded", STEP);
    let renewed = listener_cert_expiry(&broker).expect("the gauge after the reload");
    assert!(renewed > (now + 50 * 365 * 86_400) as f64, "{renewed}");
    assert_eq!(
        broker.log().matches("the certificate expires soon").count(),
        1,
        "{}",
        broker.log()
    );

    // An expired certificate is an error in the log (clients that check it refuse it).
    let (old_cert, old_key) = ca.sign_until(
        "tessera test server",
        &["127.0.0.1"],
        false,
        Some(now - 86_400),
    );
    write(Path::new(&cert), &old_cert);
    write(Path::new(&key), &old_key);
    broker.sighup();
    broker.wait_log("the certificate has expired", STEP);
    assert_eq!(listener_cert_expiry(&broker), Some((now - 86_400) as f64));
}

/// Raw HTTP to a WebSocket listener: the status line of the answer.
fn http_status(addr: &str, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn websocket_upgrades_are_checked_and_frames_follow_rfc_6455() {
    let d = dir("ws");
    let broker = start(
        &d,
        "[[listener]]\nkind = \"ws\"\nbind = \"127.0.0.1:0\"\npath = \"/mqtt\"\n",
        &[],
    );
    let url = broker.url("ws");
    let (host, port) = host_port(&url);
    let addr = format!("{host}:{port}");
    let upgrade = |path: &str, protocol: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
        )
    };
    assert_eq!(
        http_status(&addr, &upgrade("/other", "mqtt")),
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        http_status(&addr, &upgrade("/mqtt", "chat")),
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(
        http_status(&addr, "GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n"),
        "HTTP/1.1 426 Upgrade Required"
    );
    broker.wait_log(
        "connection refused: WebSocket upgrade refused: path \"/other\"",
        STEP,
    );

    // tungstenite: the subprotocol is negotiated, a PING is answered, and a
    // CONNECT split over a fragmented message (with a PING inside it) works.
    use tungstenite::Message;
    use tungstenite::client::IntoClientRequest;
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(STEP)).unwrap();
    let (mut ws, response) = tungstenite::client(request, tcp).unwrap();
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "mqtt"
    );
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    // MQTT 3.1.1 CONNECT, ClientID "ws-raw", clean session, keep alive 30.
    let connect: &[u8] = &[
        0x10, 0x12, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x1e, 0x00, 0x06, b'w',
        b's', b'-', b'r', b'a', b'w',
    ];
    use tungstenite::protocol::frame::{Frame, coding::Data, coding::OpCode};
    let first = Frame::message(connect[..7].to_vec(), OpCode::Data(Data::Binary), false);
    let rest = Frame::message(connect[7..].to_vec(), OpCode::Data(Data::Continue), true);
    ws.write(Message::Frame(first)).unwrap();
    ws.write(Message::Ping(b"mid-message".to_vec().into()))
        .unwrap();
    ws.write(Message::Frame(rest)).unwrap();
    ws.flush().unwrap();
    let mut pongs = Vec::new();
    let connack = loop {
        match ws.read().unwrap() {
            Message::Pong(p) => pongs.push(p.to_vec()),
            Message::Binary(b) => break b.to_vec(),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    // The last PING is answered (RFC 6455 section 5.5.3 lets a PONG answer
    // only the most recent of several PINGs not yet answered).
    while pongs.last().map(Vec::as_slice) != Some(b"mid-message") {
        match ws.read().unwrap() {
            Message::Pong(p) => pongs.push(p.to_vec()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        pongs.len() <= 2
            && pongs
                .iter()
                .all(|p| p == b"are you there" || p == b"mid-message")
    );
    // A text frame is a protocol violation for MQTT: the broker closes with 1003.
    ws.send(Message::Text("hello".into())).unwrap();
    let close = loop {
        match ws.read() {
            Ok(Message::Close(c)) => break c,
            Ok(_) => {}
            Err(e) => panic!("expected a CLOSE frame, got {e}"),
        }
    };
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1003));
}

#[test]
fn wrong_or_silent_clients_on_tls_and_websocket_ports_are_closed_and_logged() {
    let d = dir("wrong");
    let ca = Ca::new("wrong CA");
    let (cert, key) = server_files(&d, &ca, "a");
    let path = write(&d.join("tessera.toml"), &tls_listeners(&cert, &key));
    let broker = Broker::start_with(
        &["--config", path.as_str()],
        &[("TESSERA_LIMITS__CONNECT_TIMEOUT_S", "1")],
    );
    let addr_of = |scheme: &str| {
        let (host, port) = host_port(&broker.url(scheme));
        format!("{host}:{port}")
    };
    // A plain MQTT client on the TLS port: refused, with the reason logged.
    let mut s = std::net::TcpStream::connect(addr_of("mqtts")).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    s.write_all(&[
        0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x1e, 0x00, 0x00,
    ])
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(&[0x20]),
        "no CONNACK over a TLS port: {answer:02x?}"
    );
    broker.wait_log("connection refused: TLS handshake failed", STEP);
    // Silent connections are closed after the connect timeout (1 s here),
    // before or after the handshake.
    for scheme in ["mqtts", "ws", "wss"] {
        let mut s = std::net::TcpStream::connect(addr_of(scheme)).unwrap();
        s.set_read_timeout(Some(STEP)).unwrap();
        let start = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "{scheme}: closed without data");
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{scheme}: closed in time"
        );
    }
    // And the broker still serves every transport.
    runtime().block_on(async {
        for scheme in ["mqtts", "ws", "wss"] {
            let tls = matches!(scheme, "mqtts" | "wss").then(|| tls_client(&ca, None));
            let mut c = connect(options(
                &format!("after-{scheme}"),
                &broker.url(scheme),
                tls,
            ))
            .await
            .unwrap();
            let topic = format!("after/{scheme}");
            c.subscribe(&topic).await;
            wait_subscribed(&mut c, &topic).await;
        }
    });
}

#[test]
fn websocket_over_mutual_tls_takes_the_username_from_the_san() {
    let d = dir("wss-mtls");
    let ca = Ca::new("wss CA");
    let (cert, key) = server_files(&d, &ca, "a");
    let ca_file = write(&d.join("ca.pem"), &ca.pem);
    let config = format!(
        "[[listener]]\nkind = \"wss\"\nbind = \"127.0.0.1:0\"\ncert_file = \"{cert}\"\n\
         key_file = \"{key}\"\nca_file = \"{ca_file}\"\nrequire_client_cert = true\n\
         username_from_cert = \"san\"\n"
    );
    let broker = start(&d, &config, &["--log-level", "debug"]);
    let url = broker.url("wss");
    let device = ca.sign("not the username", &["sensor-42.devices.example"], true);
    runtime().block_on(async {
        let mut c = connect(options(
            "wss-device",
            &url,
            Some(tls_client(&ca, Some(&device))),
        ))
        .await
        .expect("a CA-signed client certificate over wss");
        c.subscribe("d/t").await;
        wait_subscribed(&mut c, "d/t").await;
        let anon = connect(options("wss-anon", &url, Some(tls_client(&ca, None)))).await;
        assert!(anon.is_err(), "no certificate, no WebSocket");
    });
    let log = broker.log();
    assert!(
        log.lines()
            .any(|l| l.contains("username from the client certificate")
                && l.contains("sensor-42.devices.example")),
        "the first DNS SAN became the username:\n{log}"
    );
    broker.wait_log(
        "connection refused: TLS handshake failed: peer sent no certificates",
        STEP,
    );
}
