//! Goal: `--tls` works end to end: fan-in and conn over TLS against the real
//! Tessera broker (server certificate verified with `--ca`, and with `--insecure`),
//! mutual TLS with a client certificate (and a clear failure without one), and
//! Mosquitto's TLS listener; and `--quic` (with `--quic-0rtt`) against Tessera's
//! `quic` listener: fan-in at QoS 1 without loss (QoS 0: at least 99 %), conn, and the latency
//! scenario's blocking clients.
//!
//! Method: certificates are generated per test with rcgen (a CA, a server
//! certificate for 127.0.0.1/localhost, a client certificate). The workspace's
//! `broker` binary runs with `[[listener]]` tables of kind `mqtts` on port 0 and
//! prints the port it bound; Mosquitto runs with `listener PORT 127.0.0.1`,
//! `certfile`, `keyfile`. The bench binary runs 2-second scenarios with `--json`,
//! and the JSON line is checked. Every process is killed on drop. The Mosquitto
//! test is a third-party test, compiled only with `--features third-party`
//! (`scripts/test-third-party.sh`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{BenchRun, assert_clean_run, bench, broker_binary};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// A certificate authority that signs server and client certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for the SANs `names` with Common Name `cn`: (cert, key) PEM.
    fn sign(&self, cn: &str, names: &[&str], client: bool) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if client {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// One test's files: CA, server and client certificates.
struct Pki {
    dir: PathBuf,
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

impl Pki {
    fn new(test: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("tessera-bench-tls-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new("bench test CA");
        let (sc, sk) = ca.sign("bench test server", &["127.0.0.1", "localhost"], false);
        let (cc, ck) = ca.sign("bench-client", &["bench-client"], true);
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        Pki {
            ca: write("ca.pem", &ca.pem),
            server_cert: write("server.pem", &sc),
            server_key: write("server.key", &sk),
            client_cert: write("client.pem", &cc),
            client_key: write("client.key", &ck),
            dir,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process killed on drop.
/// A broker process (killed when dropped) and its admin address, when known.
struct Running(Child, Option<String>);

impl Running {
    /// The broker's connections now (`tessera_connections_current` over the shards),
    /// from `/metrics` over a plain HTTP/1.0 request.
    fn connections(&self) -> u64 {
        use std::io::{Read, Write};
        let admin = self
            .1
            .as_deref()
            .expect("the broker printed its admin address");
        let mut s = std::net::TcpStream::connect(admin).expect("admin API");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .filter(|l| l.starts_with("tessera_connections_current{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts Tessera (2 shards) with one `mqtts` listener on port 0, with client
/// certificates required when `mtls`, and returns it with the TLS port.
fn tessera_tls(pki: &Pki, mtls: bool) -> (Running, u16) {
    let mut extra = String::new();
    if mtls {
        extra = format!("ca_file = \"{}\"\nrequire_client_cert = true\n", pki.ca);
    }
    tessera_listener(pki, "mqtts", &extra)
}

/// Starts Tessera (2 shards) with one listener of `kind` (`mqtts`, `quic`) on
/// port 0 with the test's server certificate and `extra` lines; returns it
/// with the listener's port.
fn tessera_listener(pki: &Pki, kind: &str, extra: &str) -> (Running, u16) {
    let config = format!(
        "[[listener]]\nkind = \"{kind}\"\nbind = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n{extra}",
        pki.server_cert, pki.server_key
    );
    let conf = pki.dir.join("tessera.toml");
    std::fs::write(&conf, config).unwrap();
    let mut cmd = Command::new(broker_binary());
    for (name, _) in std::env::vars_os() {
        if name.as_encoded_bytes().starts_with(b"TESSERA_") {
            cmd.env_remove(name);
        }
    }
    let mut child = cmd
        // The admin API on a free port too: tests run in parallel.
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--shards", "2", "--config"])
        .arg(&conf)
        .arg("--data-dir")
        .arg(pki.dir.join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(pki.dir.join("broker.err")).unwrap())
        .spawn()
        .expect("starting the broker");
    let stdout = child.stdout.take().expect("stdout");
    let running = Running(child, None);
    let (tx, rx) = mpsc::channel();
    let prefix = format!("tessera: listening {kind}://");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix(&prefix) {
                let _ = tx.send(addr.to_string());
            }
            if let Some(addr) = line.strip_prefix("tessera: admin http://") {
                let _ = tx.send(format!("admin {addr}"));
            }
        }
    });
    let mut admin = None;
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "the broker did not print its {kind} listening line within 30 s; stderr:\n{}",
                    std::fs::read_to_string(pki.dir.join("broker.err")).unwrap_or_default()
                )
            });
        match line.strip_prefix("admin ") {
            Some(a) => admin = Some(a.to_owned()),
            None => break line,
        }
    };
    if admin.is_none() {
        admin = rx
            .recv_timeout(Duration::from_secs(30))
            .ok()
            .and_then(|l| l.strip_prefix("admin ").map(str::to_owned));
    }
    let mut running = running;
    running.1 = admin;
    let port = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    (running, port)
}

const SHORT: [&str; 4] = ["--duration", "2", "--warmup", "0.5"];

fn with<'a>(scenario: &[&'a str], tls: &[&'a str]) -> Vec<&'a str> {
    let mut v = scenario.to_vec();
    v.extend(SHORT);
    v.extend(tls);
    v
}

fn assert_clean_fanin(run: &BenchRun) {
    assert_clean_run(
        run,
        &[
            "loss_count",
            "duplicate_count",
            "corrupt_count",
            "error_count",
        ],
        100,
    );
}

fn assert_conn(run: &BenchRun, clients: u64) {
    assert_eq!(run.code, 0, "exit code\n{}", run.output);
    assert_eq!(run.u("connected_count"), clients, "{}", run.output);
    assert_eq!(run.u("dropped_count"), 0, "{}", run.output);
    let lat = &run.json["connect_latency"];
    assert_eq!(lat["count"].as_u64(), Some(clients), "{}", run.output);
    assert!(lat["p50_us"].as_f64().unwrap() > 0.0, "{}", run.output);
    assert!(
        run.json["connect_per_s"].as_f64().unwrap() > 0.0,
        "{}",
        run.output
    );
}

#[test]
fn fanin_and_conn_over_tls_against_tessera() {
    let pki = Pki::new("tessera");
    let (_broker, port) = tessera_tls(&pki, false);
    let verified = ["--tls", "--ca", pki.ca.as_str()];
    for qos in ["0", "1"] {
        // Paced, as in tests/tessera.rs: at full speed a clean-session
        // subscriber's bounded queue overflows by design (loss, not a TLS fault).
        let run = bench(
            port,
            &with(
                &["fanin", "--publishers", "4", "--qos", qos, "--rate", "1000"],
                &verified,
            ),
        );
        assert_clean_fanin(&run);
        assert_eq!(run.json["transport"], "tls", "{}", run.output);
    }
    let run = bench(
        port,
        &with(
            &["conn", "--clients", "50", "--rate", "500"],
            &["--tls", "--insecure"],
        ),
    );
    assert_conn(&run, 50);
    assert_eq!(run.json["transport"], "tls", "{}", run.output);
    // A latency run over TLS: the paced blocking publisher has its own TLS path.
    let run = bench(
        port,
        &with(&["latency", "--rate", "200", "--qos", "1"], &verified),
    );
    assert_eq!(run.code, 0, "{}", run.output);
    assert!(run.u("received_count") > 100, "{}", run.output);
}

#[test]
fn fanin_and_conn_over_quic_against_tessera() {
    let pki = Pki::new("quic");
    let (broker, port) = tessera_listener(&pki, "quic", "zero_rtt = true\n");
    let verified = ["--quic", "--ca", pki.ca.as_str()];
    for qos in ["0", "1"] {
        let run = bench(
            port,
            &with(
                &["fanin", "--publishers", "4", "--qos", qos, "--rate", "1000"],
                &verified,
            ),
        );
        if qos == "1" {
            assert_clean_fanin(&run);
        } else {
            // QoS 0 is at most once. The shard -> endpoint-thread pipe now holds
            // 1 MiB (a TCP send buffer's worth), yet a `.ci/run` still lost 1 of
            // 9,998 here (cause not found: not the pipe at 4,000 msg/s). What QoS 0
            // promises holds: no duplicate, corruption or error, and the messages
            // flow.
            assert_eq!(run.code, 0, "{}", run.output);
            for key in ["duplicate_count", "corrupt_count", "error_count"] {
                assert_eq!(run.u(key), 0, "{key}\n{}", run.output);
            }
            let (got, want) = (run.u("received_count"), run.u("expected_count"));
            assert!(want > 1000 && got * 100 >= want * 99, "{}", run.output);
        }
        assert_eq!(run.json["transport"], "quic", "{}", run.output);
    }
    for zero_rtt in [false, true] {
        let mut flags = verified.to_vec();
        if zero_rtt {
            flags.push("--quic-0rtt");
        }
        let run = bench(
            port,
            &with(&["conn", "--clients", "20", "--rate", "100"], &flags),
        );
        assert_conn(&run, 20);
        assert_eq!(run.json["transport"], "quic", "{}", run.output);
    }
    // The latency scenario's blocking clients over QUIC, sleeping and
    // busy-polling: every message arrives and has a latency.
    // `--drain 30`: this checks accounting over QUIC, not timing; a loaded
    // .ci/run once saw the acknowledgements stall ~5 s (all 481 messages then
    // arrived, 0 lost) and the default 5 s drain turned that into an error. The
    // stall was an earlier client that had not closed its QUIC connection (see
    // `QuicStream::close` in bench/src/transport.rs); the margin stays for a
    // loaded machine.
    for mode in [&[][..], &["--busy-poll", "--busy-poll-lead", "200"]] {
        let mut scenario = vec!["latency", "--rate", "200", "--qos", "1", "--drain", "30"];
        scenario.extend(mode);
        let run = bench(port, &with(&scenario, &verified));
        assert_eq!(run.code, 0, "{}", run.output);
        assert_eq!(run.json["transport"], "quic", "{}", run.output);
        assert_eq!(run.u("loss_count"), 0, "{}", run.output);
        assert!(run.u("received_count") > 100, "{}", run.output);
        let lat = &run.json["latency"];
        assert!(lat["count"].as_u64().unwrap() > 100, "{}", run.output);
        assert!(lat["p99_us"].as_f64().unwrap() > 0.0, "{}", run.output);
        // The bench's clients closed their QUIC connections before it exited: no
        // connection lingers (a QUIC peer that just exits sends nothing, and a
        // lingering subscriber of the same topic held the next run's PUBACKs by
        // back-pressure). Bounded: the broker drops them as it reads the close.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while broker.connections() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} connections left after a QUIC latency run ({mode:?})",
                broker.connections()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn tls_verification_failures_are_counted_not_hidden() {
    let pki = Pki::new("wrongname");
    let (_broker, port) = tessera_tls(&pki, false);
    // The certificate names 127.0.0.1 and localhost, not this.
    let run = bench(
        port,
        &with(
            &["conn", "--clients", "3", "--rate", "100"],
            &["--tls", "--ca", pki.ca.as_str(), "--sni", "broker.example"],
        ),
    );
    assert_eq!(run.code, 1, "{}", run.output);
    assert_eq!(run.u("connected_count"), 0, "{}", run.output);
    let failures = run.json["failures"].to_string();
    assert!(
        failures.contains("certificate"),
        "{failures}\n{}",
        run.output
    );
}

#[test]
fn mutual_tls_with_a_client_certificate() {
    let pki = Pki::new("mtls");
    let (_broker, port) = tessera_tls(&pki, true);
    let mtls = [
        "--tls",
        "--ca",
        pki.ca.as_str(),
        "--cert",
        pki.client_cert.as_str(),
        "--key",
        pki.client_key.as_str(),
    ];
    assert_clean_fanin(&bench(
        port,
        &with(
            &["fanin", "--publishers", "2", "--qos", "1", "--rate", "1000"],
            &mtls,
        ),
    ));
    assert_conn(
        &bench(
            port,
            &with(&["conn", "--clients", "20", "--rate", "200"], &mtls),
        ),
        20,
    );
    // Without a client certificate the broker refuses every handshake.
    let run = bench(
        port,
        &with(
            &["conn", "--clients", "3", "--rate", "100"],
            &["--tls", "--ca", pki.ca.as_str()],
        ),
    );
    assert_eq!(run.code, 1, "{}", run.output);
    assert_eq!(run.u("connected_count"), 0, "{}", run.output);
}

/// The usage errors name the flag.
#[test]
fn tls_flags_are_checked() {
    let pki = Pki::new("flags");
    let cases: [(&[&str], &str); 6] = [
        (&["--tls"], "--ca"),
        (&["--quic"], "--quic needs --ca"),
        (&["--quic-0rtt"], "only with --quic"),
        (&["--quic", "--tls", "--insecure"], "choose one"),
        (&["--ca", pki.ca.as_str()], "only with --tls"),
        (
            &["--tls", "--insecure", "--cert", pki.client_cert.as_str()],
            "--cert and --key",
        ),
    ];
    for (flags, needle) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_bench"))
            .args(["conn", "--clients", "1"])
            .args(flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
}

/// Mosquitto's TLS listener: a third-party test.
#[cfg(feature = "third-party")]
mod mosquitto {
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    use super::*;

    /// Starts Mosquitto with one TLS listener and waits until it accepts TCP.
    fn mosquitto_tls(pki: &Pki) -> (Running, u16) {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let binary = std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin")])
            .map(|d| d.join("mosquitto"))
            .find(|p| p.is_file())
            .expect("mosquitto is installed (apt-get install -y mosquitto; scripts/test-third-party.sh installs it)");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let conf = pki.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\ncertfile {}\nkeyfile {}\n",
                pki.server_cert, pki.server_key
            ),
        )
        .unwrap();
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting mosquitto");
        let running = Running(child, None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen within 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (running, port)
    }

    #[test]
    fn fanin_and_conn_over_tls_against_mosquitto() {
        let pki = Pki::new("mosquitto");
        let (_m, port) = mosquitto_tls(&pki);
        let verified = ["--tls", "--ca", pki.ca.as_str()];
        // Paced: at full speed Mosquitto drops QoS 1 beyond max_queued_messages.
        let run = bench(
            port,
            &with(
                &["fanin", "--publishers", "4", "--qos", "1", "--rate", "500"],
                &verified,
            ),
        );
        assert_clean_fanin(&run);
        assert_conn(
            &bench(
                port,
                &with(&["conn", "--clients", "50", "--rate", "500"], &verified),
            ),
            50,
        );
    }
}
