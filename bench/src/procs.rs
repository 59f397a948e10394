//! `--procs N`: the run split over N bench processes, for when one process's
//! open-files limit (20,000 here) caps the connections, or one process's CPU the
//! load. The parent re-executes this binary N times with the same arguments
//! plus `--child K` (and `--json`); child K runs the same scenario with its share
//! of every client count (`share`), on its own topic subtree `PREFIX/pK` and
//! client-id prefix, so each child's accounting is self-contained. The parent
//! merges the children's JSON reports into one: counts and rates add up, latency
//! histograms are merged exactly (children include them as (ns, count) pairs),
//! broker CPU and memory are taken once (every child measured the same broker).
//!
//! What changes with the split: a scenario with one publisher (`fanout`,
//! `latency`) gets one publisher per child, so `fanout --subscribers 100 --procs
//! 2` is two fan-outs of 50 and publishes twice the messages.
//!
//! Message scenarios start together: each child connects and subscribes, prints
//! [`CHILD_READY`] on stdout and waits for a start time on stdin; the parent
//! sends one start time to all once every child is ready. Children share the
//! host's monotonic clock ([`crate::clock`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde_json::Value;

use crate::clock;
use crate::report::Report;
use crate::run::{Drain, START_DELAY_NS};
use crate::stats::{LatencySummary, latency_histogram};

/// Most processes `--procs` starts.
pub const PROCS_MAX: u32 = 64;

/// The line a child prints when its clients are set up.
pub const CHILD_READY: &str = "bench-child: ready";

/// How long the parent waits for every child to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// Child `k` of `procs`'s share of `n` clients: `n / procs`, one more for the
/// first `n % procs` children.
pub fn share(n: u32, k: u32, procs: u32) -> u32 {
    n / procs + u32::from(k < n % procs)
}

/// In a child: says it is ready and returns the start time its parent sends.
pub fn child_ready_wait_start() -> anyhow::Result<u64> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{CHILD_READY}").context("telling the parent we are ready")?;
    out.flush().context("telling the parent we are ready")?;
    drop(out);
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the start time from the parent")?;
    line.trim()
        .parse()
        .with_context(|| format!("start time from the parent: {line:?}"))
}

/// This process's arguments plus `--child K` and `--json`, without the files
/// only the parent writes (`--hdr-out`, `--plot`).
fn child_args(k: u32) -> Vec<OsString> {
    let mut args = Vec::new();
    let mut skip_next = false;
    for a in std::env::args_os().skip(1) {
        if skip_next {
            skip_next = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--hdr-out" || s == "--plot" {
            skip_next = true;
            continue;
        }
        if s.starts_with("--hdr-out=") || s.starts_with("--plot=") || s == "--json" {
            continue;
        }
        args.push(a);
    }
    args.extend(["--child".into(), k.to_string().into(), "--json".into()]);
    args
}

/// Runs `procs` children and merges their reports. `barrier`: the scenario
/// waits for a common start (message scenarios and latency).
pub fn run_parent(procs: u32, barrier: bool, max_failures: Option<u64>) -> anyhow::Result<Report> {
    let exe = std::env::current_exe().context("finding the bench binary")?;
    let mut children = Vec::new();
    let (ready_tx, ready_rx) = mpsc::channel::<(u32, Result<(), String>)>();
    let mut readers = Vec::new();
    for k in 0..procs {
        let mut child = Command::new(&exe)
            .args(child_args(k))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting child {k}"))?;
        let stdout = child.stdout.take().expect("piped");
        let tx = ready_tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut last = String::new();
            let mut said_ready = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == CHILD_READY {
                    said_ready = true;
                    let _ = tx.send((k, Ok(())));
                } else {
                    last = line;
                }
            }
            if !said_ready {
                let _ = tx.send((k, Err("exited before it was ready".into())));
            }
            last
        }));
        children.push(child);
    }
    drop(ready_tx);
    if barrier {
        let mut ready = 0;
        while ready < procs {
            match ready_rx.recv_timeout(READY_TIMEOUT) {
                Ok((_, Ok(()))) => ready += 1,
                Ok((k, Err(e))) => {
                    kill_all(&mut children);
                    bail!("--procs child {k} {e} (its errors are above)");
                }
                Err(_) => {
                    kill_all(&mut children);
                    bail!("--procs children not ready after {READY_TIMEOUT:?}");
                }
            }
        }
        let start = clock::now_ns() + START_DELAY_NS;
        for c in &mut children {
            let stdin = c.stdin.as_mut().expect("piped");
            let _ = writeln!(stdin, "{start}");
            let _ = stdin.flush();
        }
    }
    let mut reports = Vec::new();
    for (k, (mut c, reader)) in children.into_iter().zip(readers).enumerate() {
        drop(c.stdin.take());
        let status = c.wait().with_context(|| format!("waiting for child {k}"))?;
        let last = reader.join().expect("reader threads do not panic");
        let json: Value = serde_json::from_str(&last).with_context(|| {
            format!("child {k} ended ({status}) without a JSON report (its errors are above)")
        })?;
        reports.push(json);
    }
    merge(&reports, max_failures)
}

fn kill_all(children: &mut [std::process::Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The scenario names a report may carry (a report holds a `&'static str`).
fn scenario_name(s: &str) -> &'static str {
    [
        "fanin", "fanout", "latency", "conn", "pub", "sub", "pubsub", "shared",
    ]
    .into_iter()
    .find(|n| *n == s)
    .unwrap_or("unknown")
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

fn opt_u(vs: &[Value], k: &str) -> Option<u64> {
    let present: Vec<u64> = vs.iter().filter_map(|v| v.get(k)?.as_u64()).collect();
    (!present.is_empty()).then(|| present.iter().sum())
}

/// The histogram `name` of every child, merged.
fn merged_histogram(vs: &[Value], name: &str) -> Option<Histogram<u64>> {
    let mut h = latency_histogram();
    let mut any = false;
    for v in vs {
        let Some(pairs) = v
            .pointer(&format!("/histograms/{name}"))
            .and_then(Value::as_array)
        else {
            continue;
        };
        any = true;
        for p in pairs {
            let (Some(ns), Some(n)) = (p[0].as_u64(), p[1].as_u64()) else {
                continue;
            };
            h.saturating_record_n(ns.max(1), n);
        }
    }
    any.then_some(h)
}

/// A histogram as (ns, count) pairs of its distinct recorded values.
pub fn export(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Merges the children's JSON reports into one report; `max_failures` is
/// `conn`'s limit for the whole run.
pub fn merge(vs: &[Value], max_failures: Option<u64>) -> anyhow::Result<Report> {
    let first = vs.first().context("no child reports")?;
    let sum_u = |k: &str| vs.iter().map(|v| u(v, k)).sum::<u64>();
    let sum_f = |k: &str| vs.iter().map(|v| f(v, k)).sum::<f64>();
    let max_f = |k: &str| vs.iter().map(|v| f(v, k)).fold(0.0, f64::max);
    let mut r = Report {
        scenario: scenario_name(first["scenario"].as_str().unwrap_or_default()),
        broker: first["broker"].as_str().unwrap_or_default().to_string(),
        transport: match first["transport"].as_str() {
            Some("tls") => "tls",
            Some("quic") => "quic",
            _ => "tcp",
        },
        mqtt_version: first["mqtt_version"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        qos: u(first, "qos") as u8,
        granted_qos: vs
            .iter()
            .filter_map(|v| v.get("granted_qos")?.as_u64())
            .min()
            .map(|q| q as u8),
        size_bytes: u(first, "size_bytes") as usize,
        publishers: sum_u("publishers") as u32,
        subscribers: sum_u("subscribers") as u32,
        groups: opt_u(vs, "groups").map(|g| g as u32),
        topic_alias_count: opt_u(vs, "topic_alias_count"),
        warmup_s: f(first, "warmup_s"),
        window_s: max_f("window_s"),
        sent_count: sum_u("sent_count"),
        expected_count: sum_u("expected_count"),
        received_count: sum_u("received_count"),
        sent_msg_per_s: sum_f("sent_msg_per_s"),
        received_msg_per_s: sum_f("received_msg_per_s"),
        loss_count: sum_u("loss_count"),
        duplicate_count: sum_u("duplicate_count"),
        out_of_order_count: sum_u("out_of_order_count"),
        gap_count: sum_u("gap_count"),
        foreign_count: sum_u("foreign_count"),
        corrupt_count: sum_u("corrupt_count"),
        bench_cpu_cores: sum_f("bench_cpu_cores"),
        // Every child measured the same broker over about the same interval.
        broker_cpu_cores: vs
            .iter()
            .filter_map(|v| v.get("broker_cpu_cores")?.as_f64())
            .reduce(f64::max),
        broker_rss_before_bytes: vs
            .iter()
            .filter_map(|v| v.get("broker_rss_before_bytes")?.as_u64())
            .min(),
        broker_rss_after_bytes: vs
            .iter()
            .filter_map(|v| v.get("broker_rss_after_bytes")?.as_u64())
            .max(),
        clients: opt_u(vs, "clients").map(|c| c as u32),
        connected_count: opt_u(vs, "connected_count"),
        dropped_count: opt_u(vs, "dropped_count"),
        connect_per_s: vs
            .iter()
            .any(|v| v.get("connect_per_s").is_some())
            .then(|| sum_f("connect_per_s")),
        error_count: sum_u("error_count"),
        max_loss: first.get("max_loss").and_then(Value::as_u64),
        ..Report::default()
    };
    r.drain = vs
        .iter()
        .filter_map(|v| match v.get("drain")?.as_str()? {
            "complete" => Some(Drain::Complete),
            "quiet" => Some(Drain::Quiet),
            _ => Some(Drain::Deadline),
        })
        .max_by_key(|d| match d {
            Drain::Complete => 0,
            Drain::Quiet => 1,
            Drain::Deadline => 2,
        });
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    for v in vs {
        for (map, key) in [(&mut errors, "errors"), (&mut failures, "failures")] {
            if let Some(o) = v.get(key).and_then(Value::as_object) {
                for (reason, n) in o {
                    *map.entry(reason.clone()).or_insert(0) += n.as_u64().unwrap_or(0);
                }
            }
        }
    }
    r.errors = errors;
    r.failures = failures;
    let lat = merged_histogram(vs, "latency");
    if r.scenario == "conn" {
        r.connect_latency = lat.as_ref().map(LatencySummary::of);
        if let (Some(a), Some(b), Some(n)) = (
            r.broker_rss_before_bytes,
            r.broker_rss_after_bytes,
            r.connected_count,
        ) && n > 0
        {
            r.broker_rss_per_connection_bytes = Some(((b as f64 - a as f64) / n as f64).round());
        }
        r.max_loss = None;
    } else if vs.iter().any(|v| v.get("latency").is_some()) {
        r.latency = lat.as_ref().map(LatencySummary::of);
    }
    let lag = merged_histogram(vs, "send_lag");
    r.send_lag = lag.as_ref().map(LatencySummary::of);
    if let Some(latency) = lat {
        r.artifacts = Some(Box::new(crate::report::Artifacts {
            latency,
            send_lag: lag,
            sent: None,
            received: None,
        }));
    }
    r.judge(max_failures);
    // A child that failed for a reason the merged counts do not show.
    for (k, v) in vs.iter().enumerate() {
        if v["pass"] == false && r.pass {
            r.pass = false;
            r.verdict
                .push(format!("child {k} failed: {}", v["verdict"]));
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::record_ns;

    #[test]
    fn shares_add_up() {
        for (n, p) in [(10, 3), (1, 4), (19_000, 2), (7, 7)] {
            assert_eq!((0..p).map(|k| share(n, k, p)).sum::<u32>(), n);
        }
        assert_eq!(share(10, 0, 3), 4);
        assert_eq!(share(10, 2, 3), 3);
    }

    #[test]
    fn merge_sums_counts_and_merges_histograms_exactly() {
        let mut a = latency_histogram();
        let mut b = latency_histogram();
        for us in 1..=50u64 {
            // Recorded twice: counts above one survive the export.
            record_ns(&mut a, us * 1000);
            record_ns(&mut a, us * 1000);
        }
        for us in 51..=100u64 {
            record_ns(&mut b, us * 1000);
        }
        let child = |sent: u64, lost: u64, h: &Histogram<u64>| {
            serde_json::json!({
                "scenario": "fanin", "broker": "x", "mqtt_version": "3.1.1", "qos": 1,
                "size_bytes": 64, "publishers": 4, "subscribers": 1, "warmup_s": 1.0,
                "window_s": 2.0, "sent_count": sent, "expected_count": sent,
                "received_count": sent - lost, "sent_msg_per_s": 100.0,
                "received_msg_per_s": 90.0, "drain": "complete", "loss_count": lost,
                "duplicate_count": 0, "out_of_order_count": 0, "gap_count": 0,
                "foreign_count": 0, "corrupt_count": 0, "latency": {},
                "bench_cpu_cores": 0.25, "broker_cpu_cores": 0.5, "error_count": 0,
                "errors": {}, "max_loss": 0, "pass": lost == 0, "verdict": [],
                "histograms": {"latency": export(h)},
            })
        };
        let r = merge(&[child(1000, 0, &a), child(500, 2, &b)], None).unwrap();
        assert_eq!(r.publishers, 8);
        assert_eq!(r.sent_count, 1500);
        assert_eq!(r.loss_count, 2);
        assert_eq!(r.sent_msg_per_s, 200.0);
        assert_eq!(r.broker_cpu_cores, Some(0.5));
        assert!((r.bench_cpu_cores - 0.5).abs() < 1e-9);
        let l = r.latency.unwrap();
        assert_eq!(l.count, 150);
        assert!((l.p50_us - 38.0).abs() < 0.1, "{l:?}");
        assert!((l.max_us - 100.0).abs() < 0.1, "{l:?}");
        assert!(!r.pass, "the loss fails the merged run at --max-loss 0");
    }
}
