//! Goal: the bench measures a correct broker as correct. Against Mosquitto, the
//! reference broker, short bounded runs of every scenario (2-3 s each) must report
//! no loss at QoS 1 and 2, no duplicates at QoS 2, no errors, and sensible rates,
//! latencies and connection figures, and exit 0.
//!
//! Method: each test starts its own Mosquitto (`listener PORT 127.0.0.1`,
//! `allow_anonymous true`) on a free port, runs the `bench` binary with `--json`,
//! and checks the JSON line. Publishers are paced (`--rate`) well below what
//! Mosquitto sustains on a loaded 2-core machine: at full speed Mosquitto drops
//! QoS 1 messages beyond its `max_queued_messages` (1000) by design, which would
//! test Mosquitto's configuration, not the bench. Mosquitto is required: a missing
//! one fails the test with the install command.
//!
//! A third-party test: compiled only with `--features third-party`
//! (`scripts/test-third-party.sh` installs Mosquitto and runs it), so the
//! README's `cargo test --workspace` needs nothing beyond Rust and a C toolchain.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BenchRun, assert_clean_run, bench};

/// A Mosquitto broker on a free loopback port, killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    child: Child,
    dir: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

/// Where Mosquitto is installed, or a panic that says how to install it.
fn mosquitto_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Debian installs it in /usr/sbin, which a non-root PATH may lack.
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "mosquitto is not installed, and these tests need it as the reference broker: \
                 install it with `apt-get install -y mosquitto` (scripts/test-third-party.sh installs it)"
            )
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Mosquitto {
    /// Starts Mosquitto with the minimal config and waits until it accepts
    /// connections. Retries on another port if the chosen one was taken.
    pub fn start() -> Mosquitto {
        let binary = mosquitto_binary();
        let mut last_log = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!(
                "tessera-bench-mosquitto-{}-{port}-{attempt}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let conf = dir.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
            )
            .expect("write config");
            let mut child = Command::new(&binary)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Mosquitto { child, dir, port };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log.clear();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut last_log);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        panic!("mosquitto did not start listening within 5 s (3 tries); its log:\n{last_log}");
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The checks every clean run passes.
fn assert_clean(run: &BenchRun) {
    assert_clean_run(
        run,
        &[
            "loss_count",
            "corrupt_count",
            "foreign_count",
            "error_count",
        ],
        0,
    );
    assert_eq!(run.json["drain"], "complete", "{}", run.output);
}

/// `received_msg_per_s` is at least a quarter of `target` (pacing on a loaded
/// machine may lag, but a rate of the wrong order means a broken window).
fn assert_rate_near(run: &BenchRun, target: f64) {
    let rate = run.json["received_msg_per_s"].as_f64().unwrap_or_default();
    assert!(
        rate >= target / 4.0 && rate <= target * 1.5,
        "received {rate} msg/s, target {target}\n{}",
        run.output
    );
}

#[test]
fn fanin_qos1_loses_nothing() {
    let m = Mosquitto::start();
    let run = bench(
        m.port,
        &[
            "fanin",
            "--publishers",
            "4",
            "--qos",
            "1",
            "--rate",
            "2000",
            "--duration",
            "2",
            "--warmup",
            "0.5",
        ],
    );
    assert_clean(&run);
    assert_rate_near(&run, 8000.0);
    assert!(
        run.json["latency"]["count"].as_u64().unwrap_or_default() > 0,
        "{}",
        run.output
    );
}

#[test]
fn fanin_qos2_v5_neither_loses_nor_duplicates() {
    let m = Mosquitto::start();
    let run = bench(
        m.port,
        &[
            "fanin",
            "--publishers",
            "2",
            "--qos",
            "2",
            "--mqtt-version",
            "5",
            "--rate",
            "1000",
            "--duration",
            "2",
            "--warmup",
            "0.5",
        ],
    );
    assert_clean(&run);
    assert_eq!(run.u("duplicate_count"), 0, "{}", run.output);
    assert_eq!(run.json["mqtt_version"], "5.0");
}

#[test]
fn fanout_qos1_reaches_every_subscriber() {
    let m = Mosquitto::start();
    let run = bench(
        m.port,
        &[
            "fanout",
            "--subscribers",
            "10",
            "--qos",
            "1",
            "--rate",
            "500",
            "--duration",
            "2",
            "--warmup",
            "0.5",
        ],
    );
    assert_clean(&run);
    assert_eq!(
        run.u("expected_count"),
        10 * run.u("sent_count"),
        "{}",
        run.output
    );
    assert_rate_near(&run, 5000.0);
}

#[test]
fn qos0_at_full_speed_ends_and_delivers() {
    // QoS 0 at full speed: loss is allowed (and reported), the run must still end
    // on time, pass, and deliver.
    let m = Mosquitto::start();
    let run = bench(
        m.port,
        &[
            "fanin",
            "--publishers",
            "2",
            "--duration",
            "2",
            "--warmup",
            "0.5",
        ],
    );
    assert_eq!(run.code, 0, "{}", run.output);
    assert!(run.json["max_loss"].is_null(), "{}", run.output);
    assert!(run.u("received_count") > 0, "{}", run.output);
    assert!(run.json["received_msg_per_s"].as_f64().unwrap_or_default() > 0.0);
}

#[test]
fn latency_reports_percentiles_from_intended_send_times() {
    let m = Mosquitto::start();
    let run = bench(
        m.port,
        &[
            "latency",
            "--rate",
            "500",
            "--qos",
            "1",
            "--duration",
            "2",
            "--warmup",
            "0.5",
        ],
    );
    assert_clean(&run);
    assert_rate_near(&run, 500.0);
    let l = &run.json["latency"];
    let (p50, p99, max) = (
        l["p50_us"].as_f64().unwrap_or_default(),
        l["p99_us"].as_f64().unwrap_or_default(),
        l["max_us"].as_f64().unwrap_or_default(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{}", run.output);
    // About 2 s x 500 msg/s sent in the window.
    let count = l["count"].as_u64().unwrap_or_default();
    assert!(
        (500..=1100).contains(&count),
        "{count} samples\n{}",
        run.output
    );
    assert!(run.json["send_lag"]["count"].as_u64().unwrap_or_default() > 0);
}

#[test]
fn shared_group_of_mosquitto_gets_each_message_once() {
    let m = Mosquitto::start();
    let run = bench(
        m.port,
        &[
            "shared",
            "--publishers",
            "2",
            "--groups",
            "2",
            "--members",
            "2",
            "--qos",
            "1",
            "--protocol",
            "5",
            "--rate",
            "300",
            "--duration",
            "2",
            "--warmup",
            "0.5",
        ],
    );
    assert_clean(&run);
    assert_eq!(run.u("duplicate_count"), 0, "{}", run.output);
    assert_eq!(
        run.u("expected_count"),
        2 * run.u("sent_count"),
        "{}",
        run.output
    );
}

#[test]
fn conn_opens_holds_and_measures_broker_memory() {
    let m = Mosquitto::start();
    let pid = m.pid().to_string();
    let run = bench(
        m.port,
        &[
            "conn",
            "--clients",
            "200",
            "--rate",
            "1000",
            "--duration",
            "1",
            "--bind",
            "127.0.0.2,127.0.0.3",
            "--broker-pid",
            &pid,
        ],
    );
    assert_eq!(run.code, 0, "{}", run.output);
    assert_eq!(run.u("connected_count"), 200, "{}", run.output);
    assert_eq!(run.u("dropped_count"), 0, "{}", run.output);
    assert!(run.u("broker_rss_after_bytes") > 0, "{}", run.output);
    assert!(
        run.json["broker_rss_per_connection_bytes"].is_number(),
        "{}",
        run.output
    );
    assert!(
        run.json["connect_latency"]["p50_us"]
            .as_f64()
            .unwrap_or_default()
            > 0.0
    );
}

#[test]
fn procs_split_the_clients_and_merge_the_reports() {
    let m = Mosquitto::start();
    let run = bench(
        m.port,
        &[
            "fanin",
            "--publishers",
            "4",
            "--qos",
            "1",
            "--rate",
            "300",
            "--procs",
            "2",
            "--duration",
            "1.5",
            "--warmup",
            "0.3",
        ],
    );
    assert_clean(&run);
    // Two children of 2 publishers and 1 subscriber each, merged.
    assert_eq!(run.u("publishers"), 4, "{}", run.output);
    assert_eq!(run.u("subscribers"), 2, "{}", run.output);
    assert_eq!(
        run.u("expected_count"),
        run.u("sent_count"),
        "{}",
        run.output
    );
    assert_rate_near(&run, 1200.0);
    assert!(
        run.json["latency"]["count"].as_u64().unwrap_or_default() > 1000,
        "{}",
        run.output
    );

    let pid = m.pid().to_string();
    let conn = bench(
        m.port,
        &[
            "conn",
            "--clients",
            "301",
            "--rate",
            "1000",
            "--procs",
            "3",
            "--duration",
            "0.5",
            "--broker-pid",
            &pid,
        ],
    );
    assert_eq!(conn.code, 0, "{}", conn.output);
    assert_eq!(conn.u("connected_count"), 301, "{}", conn.output);
    assert_eq!(conn.u("clients"), 301, "{}", conn.output);
    assert_eq!(
        conn.json["connect_latency"]["count"].as_u64(),
        Some(301),
        "{}",
        conn.output
    );
    assert!(
        conn.json["broker_rss_per_connection_bytes"].is_number(),
        "{}",
        conn.output
    );
}
