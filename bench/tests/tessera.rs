//! Goal: every message scenario measures the real Tessera broker correctly:
//! nothing lost at QoS 1 and 2, a shared-subscription group gets each message
//! exactly once, topic aliases are used and resolved, a `bench sub` in one
//! process accounts for a `bench pub` in another, sessions and credentials reach
//! the broker, `--hdr-out` / `--plot` write valid files, `bench compare`
//! interleaves its runs on two brokers and prints their ratios, and a
//! `--reconnect` subscriber whose connection is cut mid-run resumes its
//! persistent session and accounts for every message (without `--reconnect`
//! the cut fails the run).
//!
//! Method: each test starts the workspace's `broker` binary on `127.0.0.1:0`
//! (two shards, so shared groups and pairs cross shards), reads the address from
//! its `tessera: listening mqtt://ADDR` line, runs the `bench` binary for 1-3 s
//! with `--json`, and checks the JSON line. The broker binary is the one Cargo
//! built next to `bench` (`cargo test --workspace` builds it); when it is missing
//! the test builds it with `cargo build -p tessera-broker --bin broker`. Runs are
//! paced (`--rate`) so the loaded CI machine carries them.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::{BenchRun, assert_clean_run, bench, broker_binary};

/// The Tessera broker on a free loopback port, killed on drop.
struct Tessera {
    child: Child,
    dir: PathBuf,
    port: u16,
    /// The admin API's address.
    admin: String,
}

impl Tessera {
    fn start() -> Tessera {
        Tessera::start_with("")
    }

    /// With `config` as its config file (`config` may name `{dir}`, the
    /// broker's directory).
    fn start_with(config: &str) -> Tessera {
        // One directory per broker: a test may run two.
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tessera-bench-broker-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = config.replace("{dir}", &dir.display().to_string());
        std::fs::write(dir.join("tessera.toml"), config).expect("config file");
        // An empty ban list, for a config that names `{dir}/bans`.
        std::fs::write(dir.join("bans"), "").expect("ban file");
        let mut cmd = Command::new(broker_binary());
        // A TESSERA_* variable of the test runner would change the broker's
        // configuration.
        for (name, _) in std::env::vars_os() {
            if name.as_encoded_bytes().starts_with(b"TESSERA_") {
                cmd.env_remove(name);
            }
        }
        let mut child = cmd
            // The admin API on a free port too: tests run in parallel.
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--shards", "2", "--data-dir"])
            .arg(dir.join("data"))
            .arg("--config")
            .arg(dir.join("tessera.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the broker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let (admin_tx, admin_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("tessera: listening mqtt://") {
                    let _ = tx.send(addr.to_string());
                } else if let Some(addr) = line.strip_prefix("tessera: admin http://") {
                    let _ = admin_tx.send(addr.to_string());
                }
            }
        });
        let lines = rx
            .recv_timeout(Duration::from_secs(10))
            .and_then(|a| Ok((a, admin_rx.recv_timeout(Duration::from_secs(1))?)));
        let (addr, admin) = match lines {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the broker did not print its listening and admin lines within 10 s");
            }
        };
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {addr:?}"));
        Tessera {
            child,
            dir,
            port,
            admin,
        }
    }

    /// One admin API request; the status code.
    fn admin(&self, method: &str, path: &str) -> u16 {
        let mut s = TcpStream::connect(&self.admin).expect("admin API");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        )
        .expect("admin request");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in the admin API's answer {answer:?}"))
    }

    /// Waits (10 s at most) until client `id` is connected.
    fn wait_connected(&self, id: &str) {
        for _ in 0..200 {
            if self.admin("GET", &format!("/api/v1/clients/{id}")) == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{id} did not connect within 10 s");
    }

    /// Its process id.
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Tessera {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The checks every clean run with publishers and subscribers passes.
fn assert_clean(run: &BenchRun) {
    assert_clean_run(
        run,
        &[
            "loss_count",
            "duplicate_count",
            "corrupt_count",
            "foreign_count",
            "error_count",
        ],
        0,
    );
    assert_eq!(run.json["drain"], "complete", "{}", run.output);
}

const SHORT: [&str; 4] = ["--duration", "2", "--warmup", "0.5"];

fn args<'a>(scenario: &[&'a str]) -> Vec<&'a str> {
    let mut v = scenario.to_vec();
    v.extend(SHORT);
    v
}

#[test]
fn shared_groups_get_each_message_exactly_once() {
    let b = Tessera::start();
    let run = bench(
        b.port,
        &args(&[
            "shared",
            "--publishers",
            "4",
            "--groups",
            "2",
            "--members",
            "3",
            "--qos",
            "1",
            "--protocol",
            "5",
            "--rate",
            "300",
        ]),
    );
    assert_clean(&run);
    assert_eq!(run.u("groups"), 2, "{}", run.output);
    assert_eq!(run.u("subscribers"), 6, "{}", run.output);
    // Once per group: twice the messages sent, not six times.
    assert_eq!(
        run.u("expected_count"),
        2 * run.u("sent_count"),
        "{}",
        run.output
    );
}

#[test]
fn fanout_with_topic_aliases_uses_and_resolves_them() {
    let b = Tessera::start();
    let run = bench(
        b.port,
        &args(&[
            "fanout",
            "--subscribers",
            "5",
            "--topic-alias",
            "--protocol",
            "5",
            "--qos",
            "1",
            "--rate",
            "300",
        ]),
    );
    assert_clean(&run);
    // Every subscriber announced aliases, so the broker may alias every delivery;
    // it must alias some (it sends the topic once per subscriber at least).
    let aliased = run.u("topic_alias_count");
    assert!(aliased > 0, "{}", run.output);
    assert!(aliased <= run.u("received_count"), "{}", run.output);
}

#[test]
fn pubsub_pairs_qos2_lose_and_duplicate_nothing() {
    let b = Tessera::start();
    let run = bench(
        b.port,
        &args(&["pubsub", "--clients", "20", "--qos", "2", "--rate", "50"]),
    );
    assert_clean(&run);
    // Pair i hears only publisher i.
    assert_eq!(
        run.u("expected_count"),
        run.u("sent_count"),
        "{}",
        run.output
    );
}

/// The ban file of a broker started with [`BANS`].
const BANS: &str = "[auth]\nban_file = \"{dir}/bans\"\n";

/// A 3 s QoS 1 fan-in (2 x 300 msg/s, persistent sessions) whose subscriber
/// `{prefix}-sub-0` is disconnected mid-run and kept out for about a second:
/// banned through the admin API (which disconnects it and refuses its
/// reconnection attempts), then let in again.
fn fanin_with_subscriber_kept_out(b: &Tessera, prefix: &str, reconnect: bool) -> BenchRun {
    let port = b.port;
    let mut a = vec![
        "fanin",
        "--publishers",
        "2",
        "--subscribers",
        "1",
        "--qos",
        "1",
        "--rate",
        "300",
        "--persistent",
        "--protocol",
        "5",
        "--client-id-prefix",
        prefix,
        "--duration",
        "3",
        "--warmup",
        "0",
    ];
    if reconnect {
        a.push("--reconnect");
    }
    let a: Vec<String> = a.into_iter().map(String::from).collect();
    let run = std::thread::spawn(move || {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        bench(port, &a)
    });
    let sub = format!("{prefix}-sub-0");
    b.wait_connected(&sub);
    std::thread::sleep(Duration::from_millis(500));
    let ban = format!("/api/v1/bans?kind=clientid&value={sub}");
    assert_eq!(b.admin("POST", &ban), 201, "ban {sub}");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(b.admin("DELETE", &ban), 200, "lift the ban of {sub}");
    run.join().expect("the bench thread")
}

#[test]
fn reconnect_subscriber_resumes_its_session_and_accounts_every_message() {
    let b = Tessera::start_with(BANS);
    let run = fanin_with_subscriber_kept_out(&b, "reconnect", true);
    // Messages published while it was kept out (about 600) were queued in its
    // session and arrived after it connected again: nothing lost, the run
    // passes. (QoS 1 allows duplicates: a delivery whose PUBACK the
    // disconnection cut off comes again.)
    assert_clean_run(
        &run,
        &[
            "loss_count",
            "corrupt_count",
            "foreign_count",
            "error_count",
        ],
        0,
    );
    // "quiet" rather than "complete" when there were such duplicates.
    assert_ne!(run.json["drain"], "deadline", "{}", run.output);
    assert_eq!(
        run.output
            .matches("reconnect-sub-0: connected again")
            .count(),
        1,
        "{}",
        run.output
    );
    // The publishers kept going while it was out.
    assert!(run.u("sent_count") >= 1500, "{}", run.output);
}

#[test]
fn without_reconnect_a_lost_subscriber_fails_the_run() {
    let b = Tessera::start_with(BANS);
    let run = fanin_with_subscriber_kept_out(&b, "noreconnect", false);
    assert_ne!(run.code, 0, "{}", run.output);
    assert_eq!(run.json["pass"], false, "{}", run.output);
    assert!(run.u("error_count") > 0, "{}", run.output);
    assert!(run.u("loss_count") > 0, "{}", run.output);
    assert!(!run.output.contains("connected again"), "{}", run.output);
}

#[test]
fn persistent_sessions_with_credentials_and_two_hosts_qos1_fanin() {
    let b = Tessera::start();
    let run = bench(
        b.port,
        &args(&[
            "fanin",
            "--publishers",
            "3",
            "--subscribers",
            "2",
            "--qos",
            "1",
            "--rate",
            "300",
            "--persistent",
            "--protocol",
            "5",
            "--username",
            "bench",
            "--password",
            "secret",
            "--host",
            "127.0.0.1,localhost",
            "--bind",
            "127.0.0.2,127.0.0.3",
            "--keep-alive",
            "5",
        ]),
    );
    assert_clean(&run);
    assert_eq!(
        run.u("expected_count"),
        2 * run.u("sent_count"),
        "{}",
        run.output
    );
    assert!(
        run.json["broker"].as_str().is_some_and(|b| b.contains(',')),
        "{}",
        run.output
    );
}

#[test]
fn sub_in_one_process_accounts_for_pub_in_another() {
    let b = Tessera::start();
    let port = b.port.to_string();
    // The subscriber runs 3 s; the publisher starts once it is subscribed.
    let sub = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "sub",
            "--clients",
            "2",
            "--topic",
            "cross/%i/#",
            "--qos",
            "1",
            "--duration",
            "3",
            "--warmup",
            "0",
            "--json",
            "--port",
            &port,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bench sub");
    std::thread::sleep(Duration::from_millis(700));
    let publ = bench(
        b.port,
        &[
            "pub",
            "--clients",
            "2",
            "--topic",
            "cross/%i/%c",
            "--qos",
            "1",
            "--count",
            "150",
            "--rate",
            "300",
            "--warmup",
            "0",
            "--duration",
            "2",
        ],
    );
    assert_eq!(publ.code, 0, "{}", publ.output);
    assert_eq!(publ.u("sent_count"), 300, "{}", publ.output);
    let out = sub.wait_with_output().expect("bench sub ends");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect(&text);
    assert_eq!(out.status.code(), Some(0), "{text}");
    // Subscriber i hears publisher i only: 150 each, none lost or duplicated.
    assert_eq!(json["received_count"], 300, "{text}");
    assert_eq!(json["loss_count"], 0, "{text}");
    assert_eq!(json["duplicate_count"], 0, "{text}");
    assert!(json["latency"]["count"].as_u64().unwrap_or(0) > 0, "{text}");
}

#[test]
fn hdr_out_and_plot_write_valid_files() {
    let b = Tessera::start();
    let dir = std::env::temp_dir().join(format!("tessera-bench-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (hgrm, svg) = (dir.join("lat.hgrm"), dir.join("run.svg"));
    let run = bench(
        b.port,
        &[
            "latency",
            "--rate",
            "500",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            // The paced publisher (a blocking socket) binds too.
            "--bind",
            "127.0.0.2,127.0.0.3",
            "--hdr-out",
            hgrm.to_str().expect("utf-8 path"),
            "--plot",
            svg.to_str().expect("utf-8 path"),
        ],
    );
    assert_eq!(run.code, 0, "{}", run.output);
    let text = std::fs::read_to_string(&hgrm).expect("the .hgrm file");
    let rows: Vec<Vec<f64>> = text
        .lines()
        .skip(2)
        .take_while(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(|x| x.parse().expect(l)).collect())
        .collect();
    assert!(rows.len() > 10, "{text}");
    assert!(
        rows.windows(2)
            .all(|w| w[0][0] <= w[1][0] && w[0][1] <= w[1][1])
    );
    let last = rows.last().expect("rows");
    assert_eq!(last[1], 1.0, "{text}");
    assert_eq!(
        last[2] as u64,
        run.json["latency"]["count"].as_u64().unwrap(),
        "{text}"
    );
    assert!(text.contains("#[Max     ="), "{text}");
    let svg_text = std::fs::read_to_string(&svg).expect("the svg file");
    assert!(svg_text.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg_text.trim_end().ends_with("</svg>"));
    assert_eq!(
        svg_text.matches("<polyline").count(),
        3,
        "latency, sent, received"
    );
    assert!(!svg_text.contains("NaN") && !svg_text.contains("inf"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn conn_split_over_processes_holds_every_connection() {
    let b = Tessera::start();
    let pid = b.child.id().to_string();
    let run = bench(
        b.port,
        &[
            "conn",
            "--clients",
            "400",
            "--rate",
            "2000",
            "--procs",
            "2",
            "--duration",
            "0.5",
            "--bind",
            "127.0.0.2,127.0.0.3",
            "--broker-pid",
            &pid,
        ],
    );
    assert_eq!(run.code, 0, "{}", run.output);
    assert_eq!(run.u("connected_count"), 400, "{}", run.output);
    assert_eq!(run.u("dropped_count"), 0, "{}", run.output);
    assert!(
        run.u("broker_rss_after_bytes") > run.u("broker_rss_before_bytes"),
        "{}",
        run.output
    );
}

#[test]
fn busy_poll_latency_accounts_every_message_at_qos_1_and_2() {
    let b = Tessera::start();
    for qos in ["1", "2"] {
        let run = bench(
            b.port,
            &[
                "latency",
                "--busy-poll",
                "--rate",
                "400",
                "--qos",
                qos,
                "--duration",
                "1",
                "--warmup",
                "0.2",
            ],
        );
        assert_clean_run(&run, &["loss_count", "duplicate_count", "error_count"], 300);
        // Every message sent in the window has a latency, from the one thread
        // that both published and read it.
        let l = &run.json["latency"];
        assert!(l["count"].as_u64().unwrap_or(0) >= 300, "{}", run.output);
        assert!(l["p50_us"].as_f64().unwrap_or(0.0) > 0.0, "{}", run.output);
        assert_eq!(run.json["drain"], "complete", "{}", run.output);
    }
}

#[test]
fn busy_poll_with_a_lead_rests_between_messages_and_still_accounts_every_one() {
    let b = Tessera::start();
    let run = bench(
        b.port,
        &[
            "latency",
            "--busy-poll",
            "--busy-poll-lead",
            "300",
            "--rate",
            "400",
            "--qos",
            "1",
            "--duration",
            "1",
            "--warmup",
            "0.2",
        ],
    );
    assert_clean_run(&run, &["loss_count", "duplicate_count", "error_count"], 300);
    assert!(
        run.json["latency"]["count"].as_u64().unwrap_or(0) >= 300,
        "{}",
        run.output
    );
    assert_eq!(run.json["drain"], "complete", "{}", run.output);
    // At 400 msg/s a period is 2.5 ms and the thread polls for about 0.3 ms of
    // it; without the rest it would use a whole core.
    let cpu = run.json["bench_cpu_cores"]
        .as_f64()
        .expect("bench_cpu_cores");
    assert!(
        cpu < 0.75,
        "the bench used {cpu:.2} cores: it never rested\n{}",
        run.output
    );
}

#[test]
fn compare_runs_both_brokers_and_prints_ratios() {
    // Two brokers of the same build: the matrix machinery, not the brokers,
    // is under test.
    let (a, b) = (Tessera::start(), Tessera::start());
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "compare",
            "--a",
            &format!("127.0.0.1:{}", a.port),
            "--a-name",
            "first",
            "--a-pid",
            &a.pid().to_string(),
            "--b",
            &format!("127.0.0.1:{}", b.port),
            "--b-name",
            "second",
            "--reps",
            "2",
            "--scenarios",
            "latency-q1,shared-q1",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--markdown",
            "--json",
        ])
        .output()
        .expect("bench compare runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.code().is_some(), "{text}");
    // Four interleaved runs per scenario: first, second, first, second.
    let order: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("rep ") && l.contains("latency-q1"))
        .map(|l| if l.contains("on first") { "a" } else { "b" })
        .collect();
    assert_eq!(order, ["a", "b", "a", "b"], "{text}");
    assert!(
        text.contains("| scenario | figure | first | second | second / first |"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect(&text);
    let rows = json["rows"].as_array().expect(&text);
    assert_eq!(rows.len(), 2, "{text}");
    for row in rows {
        for f in row["figures"].as_array().expect(&text) {
            // Figures B has no pid for (its CPU) are absent; the rest have ratios.
            if f["figure"] == "broker cores" {
                assert!(f["a"].is_number() && f["b"].is_null(), "{text}");
            } else {
                assert!(
                    f["b_over_a"].as_f64().is_some_and(|r| r > 0.0),
                    "{f}\n{text}"
                );
            }
        }
    }
}
