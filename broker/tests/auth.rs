//! Authentication, authorization and abuse limits, black-box: the real broker
//! with `[auth]` settings from environment variables, files written by the
//! real `brokerctl` (or by hand where the format is the point), and clients
//! over real sockets: rumqttc where a real client suffices, `RawClient` where
//! exact reason codes matter, and a hand-written SCRAM-SHA-256 client (RFC
//! 5802) over `RawClient` for MQTT 5 enhanced authentication, which rumqttc
//! does not speak. Reloads are waited for with bounded polls; every wait has
//! a timeout.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use common::{Broker, RECV_TIMEOUT, RawClient, connect_packet, publish_packet, s};
use sha2::{Digest, Sha256};
use tessera_broker::auth::passwd::{hmac_sha256, scram_salted_password};
use tessera_proto::{
    Auth, AuthProperties, ConnAck, Connect, Packet, ProtocolVersion, QoS, ReasonCode,
};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

/// A fresh directory for one test's files.
fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-auth-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `brokerctl ARGS` with `stdin`; returns (exit code, stdout, stderr).
fn brokerctl(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_brokerctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn brokerctl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn add_user(file: &Path, user: &str, password: &str, scram: bool) {
    let f = file.to_str().unwrap();
    let mut args = vec!["passwd", "add", f, user, "--iterations", "1000"];
    if scram {
        args.extend(["--scram", "4096"]);
    }
    let (code, _, err) = brokerctl(&args, &format!("{password}\n"));
    assert_eq!(code, 0, "brokerctl passwd add: {err}");
}

fn login(
    version: ProtocolVersion,
    id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> Connect {
    let mut c = connect_packet(version, id, true, 30);
    c.username = user.map(s);
    c.password = password.map(|p| Bytes::copy_from_slice(p.as_bytes()));
    c
}

fn connack(broker: &Broker, c: Connect) -> (RawClient, ConnAck) {
    RawClient::connect(broker.addr(), c)
}

/// Polls `f` until it is true; panics after 5 s.
fn eventually(what: &str, f: impl FnMut() -> bool) {
    common::eventually(what, Duration::from_secs(5), f);
}

#[test]
fn brokerctl_passwd_round_trip_and_password_logins_in_both_versions() {
    let dir = temp_dir("passwd");
    let file = dir.join("passwd");
    let f = file.to_str().unwrap();
    add_user(&file, "alice", "wonderland", false);
    add_user(&file, "bob", "builder", true);
    let (code, out, _) = brokerctl(&["passwd", "list", f], "");
    assert_eq!((code, out.as_str()), (0, "alice\nbob scram\n"));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("wonderland") && text.contains("alice:$7$1000$"));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the password file is private");
    let (code, _, err) = brokerctl(&["passwd", "delete", f, "nobody"], "");
    assert_eq!(code, 1);
    assert!(err.contains("no user \"nobody\""), "{err}");
    let (code, _, err) = brokerctl(&["passwd", "add", f, "carol"], "\n");
    assert_eq!(code, 1, "empty password refused: {err}");

    let broker = Broker::start_with(
        &[],
        &[
            ("TESSERA_AUTH__PASSWORD_FILE", f),
            ("TESSERA_AUTH__ALLOW_ANONYMOUS", "false"),
            ("TESSERA_AUTH__RELOAD_INTERVAL_S", "1"),
        ],
    );
    for v in [V311, V5] {
        let mut ok = RawClient::connect_ok(
            broker.addr(),
            login(v, "a1", Some("alice"), Some("wonderland")),
        );
        ok.disconnect();
        let (_, ack) = connack(&broker, login(v, "a2", Some("alice"), Some("wonderland!")));
        assert_eq!(ack.reason_code, ReasonCode::BadUserNameOrPassword, "{v:?}");
        let (_, ack) = connack(&broker, login(v, "a3", Some("mallory"), Some("x")));
        assert_eq!(ack.reason_code, ReasonCode::BadUserNameOrPassword, "{v:?}");
        let (_, ack) = connack(&broker, login(v, "a4", None, None));
        assert_eq!(ack.reason_code, ReasonCode::NotAuthorized, "{v:?}");
    }

    // A real client logs in with the same credentials.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet as P};
        let mut o = MqttOptions::new("rumqttc-bob", "127.0.0.1", broker.addr().port());
        o.set_credentials("bob", "builder");
        let (_client, mut events) = AsyncClient::new(o, 8);
        let ev = tokio::time::timeout(RECV_TIMEOUT, events.poll())
            .await
            .unwrap();
        match ev {
            Ok(Event::Incoming(P::ConnAck(a))) => assert_eq!(a.code, ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    });

    // Deleting the user takes effect without a restart (modification time).
    let (code, _, err) = brokerctl(&["passwd", "delete", f, "alice"], "");
    assert_eq!(code, 0, "{err}");
    eventually("alice's deletion is reloaded", || {
        let (_, ack) = connack(&broker, login(V5, "a5", Some("alice"), Some("wonderland")));
        ack.reason_code == ReasonCode::BadUserNameOrPassword
    });
    let (code, out, _) = brokerctl(&["passwd", "list", f], "");
    assert_eq!((code, out.as_str()), (0, "bob scram\n"));
}

/// Passwords never reach the log, at the most verbose level, whether the
/// login fails or succeeds.
#[test]
fn a_failed_login_never_logs_the_password() {
    let dir = temp_dir("nolog");
    let file = dir.join("passwd");
    add_user(&file, "alice", "s3cr3t-right", false);
    let broker = Broker::start_with(
        &["--log-level", "trace"],
        &[("TESSERA_AUTH__PASSWORD_FILE", file.to_str().unwrap())],
    );
    let (_, ack) = connack(
        &broker,
        login(V5, "n1", Some("alice"), Some("Wr0ng-P4ssw0rd")),
    );
    assert_eq!(ack.reason_code, ReasonCode::BadUserNameOrPassword);
    let (_, ack) = connack(
        &broker,
        login(V311, "n2", Some("alice"), Some("Wr0ng-P4ssw0rd")),
    );
    assert_eq!(ack.reason_code, ReasonCode::BadUserNameOrPassword);
    let mut ok = RawClient::connect_ok(
        broker.addr(),
        login(V5, "n3", Some("alice"), Some("s3cr3t-right")),
    );
    ok.disconnect();
    // The failure is logged (so the capture works), the password is not.
    eventually("the refusal is logged", || {
        broker.log().contains("wrong password")
    });
    let log = broker.log();
    assert!(
        !log.contains("Wr0ng-P4ssw0rd"),
        "password in the log:\n{log}"
    );
    assert!(!log.contains("s3cr3t-right"), "password in the log:\n{log}");
}

const ACL: &str = "\
# test ACL
default allow
deny subscribe test/nosubscribe
user alice
allow all alice/#
deny all private/#
any
allow all clients/%c/#
deny publish private/#
deny subscribe private/#
";

#[test]
fn acl_allows_and_denies_in_both_versions_and_reloads() {
    let dir = temp_dir("acl");
    let (pw, acl) = (dir.join("passwd"), dir.join("acl"));
    add_user(&pw, "alice", "pw", false);
    std::fs::write(&acl, ACL).unwrap();
    let broker = Broker::start_with(
        &[],
        &[
            ("TESSERA_AUTH__PASSWORD_FILE", pw.to_str().unwrap()),
            ("TESSERA_AUTH__ACL_FILE", acl.to_str().unwrap()),
            ("TESSERA_AUTH__RELOAD_INTERVAL_S", "1"),
        ],
    );
    let mut watcher = RawClient::connect_ok(
        broker.addr(),
        login(V5, "watcher", Some("alice"), Some("pw")),
    );
    assert_eq!(
        watcher.subscribe(
            1,
            &[
                ("private/#", QoS::AtLeastOnce),
                ("alice/#", QoS::AtLeastOnce)
            ]
        ),
        [ReasonCode::NotAuthorized, ReasonCode::GrantedQoS1],
        "alice's own deny applies before the 'any' rules"
    );
    for v in [V5, V311] {
        let id = format!("anon-{v:?}");
        let mut c = RawClient::connect_ok(broker.addr(), login(v, &id, None, None));
        let denied = if v == V5 {
            ReasonCode::NotAuthorized
        } else {
            ReasonCode::UnspecifiedError // 3.1.1: 0x80
        };
        assert_eq!(
            c.subscribe(
                2,
                &[
                    ("test/nosubscribe", QoS::AtLeastOnce),
                    ("test/other", QoS::AtMostOnce),
                    (&format!("clients/{id}/+"), QoS::AtLeastOnce),
                    ("private/x", QoS::AtLeastOnce),
                ]
            ),
            [denied, ReasonCode::Success, ReasonCode::GrantedQoS1, denied],
            "{v:?}"
        );
        // A denied QoS 1 PUBLISH: v5 PUBACK 0x87, 3.1.1 a plain PUBACK; never delivered.
        c.send(&publish_packet(
            "private/p",
            b"no",
            QoS::AtLeastOnce,
            9,
            false,
        ));
        match c.recv() {
            Packet::PubAck(a) => {
                let want = if v == V5 {
                    ReasonCode::NotAuthorized
                } else {
                    ReasonCode::Success
                };
                assert_eq!((a.packet_id, a.reason_code), (9, want), "{v:?}");
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
        c.send(&publish_packet(
            "private/p",
            b"no0",
            QoS::AtMostOnce,
            0,
            false,
        ));
        c.publish(
            "alice/sentinel",
            format!("{v:?}").as_bytes(),
            QoS::AtLeastOnce,
            10,
        );
        let p = watcher.recv_publish();
        assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            ("alice/sentinel", format!("{v:?}").as_bytes()),
            "the denied publications were dropped"
        );
        c.disconnect();
    }

    // A reload changes decisions a session had cached.
    let mut c = RawClient::connect_ok(broker.addr(), login(V5, "cached", None, None));
    c.publish("open/t", b"1", QoS::AtLeastOnce, 1);
    std::fs::write(&acl, format!("{ACL}deny publish open/#\n")).unwrap();
    eventually("the new ACL applies to a cached topic", || {
        c.send(&publish_packet("open/t", b"2", QoS::AtLeastOnce, 2, false));
        match c.recv() {
            Packet::PubAck(a) => a.reason_code == ReasonCode::NotAuthorized,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    });
    // A broken file keeps the previous rules and says why.
    std::fs::write(&acl, "allow sometimes x\n").unwrap();
    eventually("the parse error is logged", || {
        broker.log().contains("not reloaded")
    });
    c.send(&publish_packet("open/t", b"3", QoS::AtLeastOnce, 3, false));
    match c.recv() {
        Packet::PubAck(a) => assert_eq!(a.reason_code, ReasonCode::NotAuthorized),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

fn jwt(secret: &[u8], claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn jwt_passwords_are_accepted_until_they_expire() {
    let dir = temp_dir("jwt");
    let secret = b"an HS256 secret of at least 32 bytes!";
    let (key, acl) = (dir.join("jwt.key"), dir.join("acl"));
    std::fs::write(&key, secret).unwrap();
    std::fs::write(&acl, "default deny\nallow all users/%u/#\n").unwrap();
    let broker = Broker::start_with(
        &[],
        &[
            ("TESSERA_AUTH__JWT_SECRET_FILE", key.to_str().unwrap()),
            ("TESSERA_AUTH__ACL_FILE", acl.to_str().unwrap()),
            ("TESSERA_AUTH__ALLOW_ANONYMOUS", "false"),
        ],
    );
    let long = jwt(
        secret,
        serde_json::json!({"sub": "ann", "exp": unix_now() + 3600}),
    );
    let mut c = RawClient::connect_ok(
        broker.addr(),
        login(V311, "j1", Some("ignored"), Some(&long)),
    );
    assert_eq!(
        c.subscribe(
            1,
            &[
                ("users/ann/#", QoS::AtMostOnce),
                ("users/ignored/#", QoS::AtMostOnce)
            ]
        ),
        [ReasonCode::Success, ReasonCode::UnspecifiedError],
        "the user is the token's sub, not the CONNECT's user name"
    );
    let expired = jwt(
        secret,
        serde_json::json!({"sub": "ann", "exp": unix_now() - 10}),
    );
    let forged = jwt(
        &[1u8; 40],
        serde_json::json!({"sub": "ann", "exp": unix_now() + 60}),
    );
    for token in [&expired, &forged] {
        let (_, ack) = connack(&broker, login(V5, "j2", None, Some(token)));
        assert_eq!(ack.reason_code, ReasonCode::BadUserNameOrPassword);
    }
    // A token with an ACL claim: the claim alone decides for its client.
    let scoped = jwt(
        secret,
        serde_json::json!({"sub": "ann", "exp": unix_now() + 3600,
            "acl": {"publish": ["up/#"], "subscribe": ["down/#"]}}),
    );
    let mut c = RawClient::connect_ok(broker.addr(), login(V5, "j4", None, Some(&scoped)));
    assert_eq!(
        c.subscribe(
            1,
            &[
                ("down/x", QoS::AtMostOnce),
                ("users/ann/#", QoS::AtMostOnce)
            ]
        ),
        [ReasonCode::Success, ReasonCode::NotAuthorized]
    );
    for (topic, want) in [
        ("up/a", ReasonCode::Success),
        ("users/ann/x", ReasonCode::NotAuthorized),
    ] {
        c.send(&publish_packet(topic, b"t", QoS::AtLeastOnce, 5, false));
        match c.recv() {
            Packet::PubAck(a) => assert_eq!(a.reason_code, want, "{topic}"),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    // A token expiring in 2 s: the v5 connection is closed with 0xA0 then.
    let short = jwt(
        secret,
        serde_json::json!({"sub": "ann", "exp": unix_now() + 2}),
    );
    let mut c = RawClient::connect_ok(broker.addr(), login(V5, "j3", None, Some(&short)));
    let start = Instant::now();
    match c.try_recv(Duration::from_secs(5)) {
        Ok(Packet::Disconnect(d)) => assert_eq!(d.reason_code, ReasonCode::MaximumConnectTime),
        other => panic!("expected DISCONNECT 0xA0, got {other:?}"),
    }
    assert!(
        start.elapsed() <= Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    c.expect_closed(RECV_TIMEOUT);
}

/// The client side of SCRAM-SHA-256, from RFC 5802.
struct ScramClient {
    password: String,
    first_bare: String,
    auth_message: String,
    salted: [u8; 32],
}

impl ScramClient {
    fn new(user: &str, password: &str) -> ScramClient {
        ScramClient {
            password: password.to_owned(),
            first_bare: format!("n={user},r=rOprNGfwEbeRWgbNEkqO"),
            auth_message: String::new(),
            salted: [0; 32],
        }
    }

    fn first(&self) -> Bytes {
        Bytes::from(format!("n,,{}", self.first_bare))
    }

    fn final_message(&mut self, server_first: &[u8]) -> Bytes {
        let server_first = std::str::from_utf8(server_first).unwrap();
        let mut f = server_first.split(',');
        let nonce = f.next().unwrap().strip_prefix("r=").unwrap();
        assert!(nonce.starts_with("rOprNGfwEbeRWgbNEkqO") && nonce.len() > 20);
        let salt = B64
            .decode(f.next().unwrap().strip_prefix("s=").unwrap())
            .unwrap();
        let it: u32 = f
            .next()
            .unwrap()
            .strip_prefix("i=")
            .unwrap()
            .parse()
            .unwrap();
        self.salted = scram_salted_password(self.password.as_bytes(), &salt, it);
        let client_key = hmac_sha256(&self.salted, b"Client Key");
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let without = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{server_first},{without}", self.first_bare);
        let sig = hmac_sha256(&stored, self.auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
        Bytes::from(format!("{without},p={}", B64.encode(proof)))
    }

    /// Checks the server's proof (server-final `v=...`).
    fn verify_server(&self, server_final: &[u8]) {
        let server_key = hmac_sha256(&self.salted, b"Server Key");
        let sig = hmac_sha256(&server_key, self.auth_message.as_bytes());
        assert_eq!(server_final, format!("v={}", B64.encode(sig)).as_bytes());
    }
}

fn auth_packet(rc: ReasonCode, data: Bytes) -> Packet {
    Packet::Auth(Auth {
        reason_code: rc,
        properties: AuthProperties {
            authentication_method: Some(s("SCRAM-SHA-256")),
            authentication_data: Some(data),
            ..Default::default()
        },
    })
}

/// CONNECT with SCRAM; returns the client and the CONNACK.
fn scram_connect(
    broker: &Broker,
    id: &str,
    user: &str,
    password: &str,
) -> (RawClient, ConnAck, ScramClient) {
    let mut scram = ScramClient::new(user, password);
    let mut c = connect_packet(V5, id, true, 30);
    c.properties.authentication_method = Some(s("SCRAM-SHA-256"));
    c.properties.authentication_data = Some(scram.first());
    let mut raw = RawClient::open(broker.addr(), V5);
    raw.send(&Packet::Connect(Box::new(c)));
    let server_first = match raw.recv() {
        Packet::Auth(a) => {
            assert_eq!(a.reason_code, ReasonCode::ContinueAuthentication);
            a.properties.authentication_data.unwrap()
        }
        other => panic!("expected AUTH 0x18, got {other:?}"),
    };
    raw.send(&auth_packet(
        ReasonCode::ContinueAuthentication,
        scram.final_message(&server_first),
    ));
    match raw.recv() {
        Packet::ConnAck(ack) => (raw, ack, scram),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[test]
fn scram_sha_256_enhanced_authentication_and_reauthentication() {
    let dir = temp_dir("scram");
    let pw = dir.join("passwd");
    add_user(&pw, "sam", "pencil", true);
    add_user(&pw, "noscram", "pencil", false);
    let broker = Broker::start_with(
        &[],
        &[
            ("TESSERA_AUTH__PASSWORD_FILE", pw.to_str().unwrap()),
            ("TESSERA_AUTH__ALLOW_ANONYMOUS", "false"),
        ],
    );
    let (mut c, ack, scram) = scram_connect(&broker, "s1", "sam", "pencil");
    assert_eq!(ack.reason_code, ReasonCode::Success);
    assert_eq!(
        ack.properties.authentication_method.as_deref(),
        Some("SCRAM-SHA-256")
    );
    scram.verify_server(ack.properties.authentication_data.as_deref().unwrap());
    c.publish("s/t", b"authenticated", QoS::AtLeastOnce, 1);

    // Re-authentication on the live connection (AUTH 0x19).
    let mut again = ScramClient::new("sam", "pencil");
    c.send(&auth_packet(ReasonCode::ReAuthenticate, again.first()));
    let server_first = match c.recv() {
        Packet::Auth(a) => a.properties.authentication_data.unwrap(),
        other => panic!("expected AUTH 0x18, got {other:?}"),
    };
    c.send(&auth_packet(
        ReasonCode::ContinueAuthentication,
        again.final_message(&server_first),
    ));
    match c.recv() {
        Packet::Auth(a) => {
            assert_eq!(a.reason_code, ReasonCode::Success);
            again.verify_server(a.properties.authentication_data.as_deref().unwrap());
        }
        other => panic!("expected AUTH 0x00, got {other:?}"),
    }
    c.publish("s/t", b"still", QoS::AtLeastOnce, 2);

    // A failed re-authentication ends the connection.
    let mut wrong = ScramClient::new("sam", "eraser");
    c.send(&auth_packet(ReasonCode::ReAuthenticate, wrong.first()));
    let server_first = match c.recv() {
        Packet::Auth(a) => a.properties.authentication_data.unwrap(),
        other => panic!("expected AUTH 0x18, got {other:?}"),
    };
    c.send(&auth_packet(
        ReasonCode::ContinueAuthentication,
        wrong.final_message(&server_first),
    ));
    c.expect_disconnect_then_close(ReasonCode::NotAuthorized);

    // Wrong password, unknown user and a user without SCRAM keys: 0x86.
    for (user, password) in [
        ("sam", "eraser"),
        ("ghost", "pencil"),
        ("noscram", "pencil"),
    ] {
        let (_, ack, _) = scram_connect(&broker, "s2", user, password);
        assert_eq!(ack.reason_code, ReasonCode::BadUserNameOrPassword, "{user}");
    }
    // An unknown method: 0x8C.
    let mut c = connect_packet(V5, "s3", true, 30);
    c.properties.authentication_method = Some(s("KERBEROS"));
    let (_, ack) = connack(&broker, c);
    assert_eq!(ack.reason_code, ReasonCode::BadAuthenticationMethod);
    // AUTH on a connection that did not authenticate with a method: protocol error.
    let (mut pwc, ack) = connack(&broker, login(V5, "s4", Some("noscram"), Some("pencil")));
    assert_eq!(ack.reason_code, ReasonCode::Success);
    pwc.send(&auth_packet(
        ReasonCode::ReAuthenticate,
        Bytes::from_static(b"n,,n=sam,r=x"),
    ));
    pwc.expect_disconnect_then_close(ReasonCode::ProtocolError);
}

#[test]
fn publish_rate_limit_answers_quota_exceeded() {
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__PUBLISH_RATE_PER_S", "5")]);
    let mut c = RawClient::connect_ok(broker.addr(), connect_packet(V5, "rate", true, 30));
    for id in 1..=20u16 {
        c.send(&publish_packet("rate/t", b"x", QoS::AtLeastOnce, id, false));
    }
    let mut codes = Vec::new();
    for _ in 0..20 {
        match c.recv() {
            Packet::PubAck(a) => codes.push(a.reason_code),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    let accepted = codes.iter().filter(|r| **r == ReasonCode::Success).count();
    let refused = codes
        .iter()
        .filter(|r| **r == ReasonCode::QuotaExceeded)
        .count();
    assert_eq!(accepted + refused, 20, "{codes:?}");
    assert!(
        (5..=8).contains(&accepted),
        "a burst of 5 plus refill: {codes:?}"
    );
}

#[test]
fn a_flapping_client_id_is_banned_for_a_while() {
    let broker = Broker::start_with(
        &[],
        &[
            ("TESSERA_AUTH__FLAPPING_MAX_CONNECTS", "3"),
            ("TESSERA_AUTH__FLAPPING_WINDOW_S", "10"),
            ("TESSERA_AUTH__FLAPPING_BAN_S", "1"),
        ],
    );
    for _ in 0..2 {
        let mut c = RawClient::connect_ok(broker.addr(), connect_packet(V5, "flappy", true, 30));
        c.disconnect();
    }
    let (_, ack) = connack(&broker, connect_packet(V5, "flappy", true, 30));
    assert_eq!(ack.reason_code, ReasonCode::Banned);
    let (_, ack) = connack(&broker, connect_packet(V311, "flappy", true, 30));
    assert_eq!(
        ack.reason_code,
        ReasonCode::NotAuthorized,
        "3.1.1 return code 5"
    );
    RawClient::connect_ok(broker.addr(), connect_packet(V5, "steady", true, 30));
    std::thread::sleep(Duration::from_millis(1100));
    RawClient::connect_ok(broker.addr(), connect_packet(V5, "flappy", true, 30));
}

#[test]
fn bans_by_client_id_user_name_and_address() {
    let dir = temp_dir("bans");
    let (bans, pw) = (dir.join("bans"), dir.join("passwd"));
    let b = bans.to_str().unwrap();
    add_user(&pw, "mallory", "pw", false);
    for (kind, value) in [("clientid", "evil"), ("username", "mallory")] {
        let (code, _, err) = brokerctl(&["ban", "add", b, kind, value], "");
        assert_eq!(code, 0, "{err}");
    }
    let (code, _, err) = brokerctl(&["ban", "add", b, "ip", "10.0.0.0/33"], "");
    assert_eq!(code, 1, "a bad prefix is refused: {err}");
    let (code, out, _) = brokerctl(&["ban", "list", b], "");
    assert_eq!(
        (code, out.as_str()),
        (0, "clientid evil\nusername mallory\n")
    );
    let broker = Broker::start_with(
        &[],
        &[
            ("TESSERA_AUTH__BAN_FILE", b),
            ("TESSERA_AUTH__PASSWORD_FILE", pw.to_str().unwrap()),
            ("TESSERA_AUTH__RELOAD_INTERVAL_S", "1"),
        ],
    );
    let (_, ack) = connack(&broker, connect_packet(V5, "evil", true, 30));
    assert_eq!(ack.reason_code, ReasonCode::Banned);
    let (_, ack) = connack(&broker, login(V311, "m", Some("mallory"), Some("pw")));
    assert_eq!(ack.reason_code, ReasonCode::NotAuthorized);
    RawClient::connect_ok(broker.addr(), connect_packet(V5, "good", true, 30));

    // Banning the loopback address closes new connections before CONNECT is
    // read: no CONNACK. (The CONNECT is sent: the listener defers accepting
    // a connection until its first data, `server/listen.rs`.)
    let (code, _, err) = brokerctl(&["ban", "add", b, "ip", "127.0.0.0/8"], "");
    assert_eq!(code, 0, "{err}");
    eventually("the address ban is reloaded", || {
        let mut c = RawClient::open(broker.addr(), V5);
        c.send(&Packet::Connect(Box::new(connect_packet(
            V5, "banned", true, 30,
        ))));
        matches!(
            c.try_recv(Duration::from_millis(500)),
            Err(common::Closed::Eof)
        )
    });
    let (code, _, err) = brokerctl(&["ban", "delete", b, "ip", "127.0.0.0/8"], "");
    assert_eq!(code, 0, "{err}");
    eventually("the address ban is lifted", || {
        let mut c = RawClient::open(broker.addr(), V5);
        c.send(&Packet::Connect(Box::new(connect_packet(
            V5, "back", true, 30,
        ))));
        matches!(c.try_recv(Duration::from_millis(500)), Ok(Packet::ConnAck(a)) if a.reason_code == ReasonCode::Success)
    });
}

#[test]
fn above_the_memory_high_water_mark_new_connections_are_refused() {
    // 1 byte: the broker is always above it.
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__MEMORY_HIGH_WATER_BYTES", "1")]);
    let (_, ack) = connack(&broker, connect_packet(V5, "m5", true, 30));
    assert_eq!(ack.reason_code, ReasonCode::ServerBusy);
    let (_, ack) = connack(&broker, connect_packet(V311, "m3", true, 30));
    assert_eq!(ack.reason_code, ReasonCode::ServerUnavailable);
    assert!(
        broker
            .log()
            .contains("memory above limits.memory_high_water_bytes")
    );
}

/// A broker started from a config file; killed on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the broker with `config` and returns it with its mqtt:// addresses
/// in listener order (`--listen` first, then the `[[listener]]` tables).
fn start_with_config(
    dir: &Path,
    config: &str,
    mqtt_count: usize,
) -> (Proc, Vec<std::net::SocketAddr>) {
    use std::io::{BufRead, BufReader};
    let path = dir.join("tessera.toml");
    std::fs::write(&path, config).unwrap();
    let data = dir.join("data");
    let mut child = common::broker_command(
        &[
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "2",
            "--config",
            path.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn broker");
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut addrs = Vec::new();
    while addrs.len() < mqtt_count {
        let line = rx
            .recv_timeout(common::READY_TIMEOUT)
            .expect("listening lines");
        if let Some(a) = line.strip_prefix("tessera: listening mqtt://") {
            addrs.push(a.trim().parse().unwrap());
        }
    }
    (proc, addrs)
}

/// `allow_anonymous` and `max_connections` of a `[[listener]]` apply to it
/// alone; the other listener keeps the global settings.
#[test]
fn per_listener_anonymous_access_and_connection_limit() {
    let dir = temp_dir("listener");
    let pw = dir.join("passwd");
    add_user(&pw, "alice", "pw", false);
    let config = format!(
        "[auth]\npassword_file = {:?}\n\n[[listener]]\nkind = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
         allow_anonymous = false\nmax_connections = 2\n",
        pw.to_str().unwrap()
    );
    let (_broker, addrs) = start_with_config(&dir, &config, 2);
    let (open, closed) = (addrs[0], addrs[1]);
    RawClient::connect_ok(open, connect_packet(V5, "anon-open", true, 30));
    let (_, ack) = RawClient::connect(closed, connect_packet(V5, "anon-closed", true, 30));
    assert_eq!(ack.reason_code, ReasonCode::NotAuthorized);
    let (_, ack) = RawClient::connect(closed, connect_packet(V311, "anon-closed3", true, 30));
    assert_eq!(ack.reason_code, ReasonCode::NotAuthorized);
    // max_connections = 2 over 2 shards: one connection per owner shard.
    let on = |k| common::id_on_shard("lim", k);
    let _a = RawClient::connect_ok(closed, login(V5, &on(0), Some("alice"), Some("pw")));
    let _b = RawClient::connect_ok(closed, login(V5, &on(1), Some("alice"), Some("pw")));
    let third = format!("{}-x", on(0));
    let third = (0..100)
        .map(|k| format!("{third}{k}"))
        .find(|id| common::shard_of(id) == 0)
        .unwrap();
    let (_, ack) = RawClient::connect(closed, login(V5, &third, Some("alice"), Some("pw")));
    assert_eq!(ack.reason_code, ReasonCode::ServerBusy);
    // The open listener is not limited by the other's maximum.
    RawClient::connect_ok(open, connect_packet(V5, &third, true, 30));
}

/// SIGHUP reloads at once, with the modification-time check turned off.
#[test]
fn sighup_reloads_the_security_files() {
    let dir = temp_dir("sighup");
    let bans = dir.join("bans");
    std::fs::write(&bans, "").unwrap();
    let broker = Broker::start_with(
        &[],
        &[
            ("TESSERA_AUTH__BAN_FILE", bans.to_str().unwrap()),
            ("TESSERA_AUTH__RELOAD_INTERVAL_S", "0"),
        ],
    );
    RawClient::connect_ok(broker.addr(), connect_packet(V5, "hup", true, 30));
    let mut live = RawClient::connect_ok(broker.addr(), connect_packet(V5, "live", true, 30));
    std::fs::write(&bans, "clientid hup\nclientid live\n").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    RawClient::connect_ok(broker.addr(), connect_packet(V5, "hup", true, 30));
    broker.sighup();
    eventually("the ban applies after SIGHUP", || {
        let (_, ack) = connack(&broker, connect_packet(V5, "hup", true, 30));
        ack.reason_code == ReasonCode::Banned
    });
    // A connected client the reload bans is disconnected (0x98 Administrative action).
    live.expect_disconnect_then_close(ReasonCode::AdministrativeAction);
}

#[test]
fn publish_bandwidth_limit_answers_quota_exceeded() {
    let broker = Broker::start_with(&[], &[("TESSERA_LIMITS__PUBLISH_BYTES_PER_S", "1000")]);
    let mut c = RawClient::connect_ok(broker.addr(), connect_packet(V5, "bytes", true, 30));
    let payload = [7u8; 400];
    for id in 1..=10u16 {
        c.send(&publish_packet(
            "bytes/t",
            &payload,
            QoS::AtLeastOnce,
            id,
            false,
        ));
    }
    let mut accepted = 0;
    for _ in 0..10 {
        match c.recv() {
            Packet::PubAck(a) if a.reason_code == ReasonCode::Success => accepted += 1,
            Packet::PubAck(a) => assert_eq!(a.reason_code, ReasonCode::QuotaExceeded),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    // A burst of 1000 bytes holds two 400-byte payloads; refill during the
    // exchange may add one more.
    assert!((2..=3).contains(&accepted), "{accepted} accepted");
}

/// The admin API's ban endpoints edit the ban file, and the broker applies
/// the result: new connections are refused, a connected client is
/// disconnected (0x98), and lifting the ban lets it back in.
#[test]
fn bans_through_the_admin_api() {
    use tessera_broker::admin::http::client_request;
    let dir = temp_dir("admin-bans");
    let bans = dir.join("bans");
    let broker = Broker::start_with(&[], &[("TESSERA_AUTH__BAN_FILE", bans.to_str().unwrap())]);
    let admin = broker.admin_addr().to_string();
    let call = |method: &str, target: &str| {
        let r = client_request(&admin, method, target, None, RECV_TIMEOUT)
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"));
        (r.status, String::from_utf8(r.body).unwrap())
    };
    let mut live = RawClient::connect_ok(broker.addr(), connect_packet(V5, "api-evil", true, 30));
    assert_eq!(
        call("POST", "/api/v1/bans?kind=clientid&value=api-evil").0,
        201
    );
    assert_eq!(
        call("POST", "/api/v1/bans?kind=clientid&value=api-evil").0,
        200
    );
    let (status, body) = call("POST", "/api/v1/bans?kind=ip&value=10.0.0.0%2F33");
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        call("POST", "/api/v1/bans?kind=ip&value=10.9.0.0%2F16").0,
        201
    );
    let (status, body) = call("GET", "/api/v1/bans");
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        list["bans"],
        serde_json::json!([
            {"kind": "clientid", "value": "api-evil"},
            {"kind": "ip", "value": "10.9.0.0/16"}
        ])
    );
    assert!(
        std::fs::read_to_string(&bans)
            .unwrap()
            .contains("clientid api-evil")
    );
    live.expect_disconnect_then_close(ReasonCode::AdministrativeAction);
    // The ban file is reloaded at once, and each shard takes the new snapshot at its next
    // tick (ShardAuth::tick); a new connection may be accepted by either shard. So the ban
    // is in force once several connections in a row, spread over the shards by
    // SO_REUSEPORT, are all refused; a client never sees anything but Banned or Success.
    eventually("every shard refuses the banned ClientID", || {
        (0..6).all(|_| {
            let (_, ack) = connack(&broker, connect_packet(V5, "api-evil", true, 30));
            assert!(
                matches!(ack.reason_code, ReasonCode::Banned | ReasonCode::Success),
                "{:?}",
                ack.reason_code
            );
            ack.reason_code == ReasonCode::Banned
        })
    });
    assert_eq!(
        call("DELETE", "/api/v1/bans?kind=clientid&value=api-evil").0,
        200
    );
    assert_eq!(
        call("DELETE", "/api/v1/bans?kind=clientid&value=api-evil").0,
        404
    );
    eventually("the lifted ban lets the client back", || {
        let (_, ack) = connack(&broker, connect_packet(V5, "api-evil", true, 30));
        ack.reason_code == ReasonCode::Success
    });
}
