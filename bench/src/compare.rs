//! `bench compare`: one scenario matrix against two brokers, interleaved (for
//! each scenario and repetition: A then B), each figure the median of the
//! repetitions, printed with the ratio B/A, optionally as a Markdown table.
//!
//! Each run is this binary re-executed with the scenario's arguments, `--host`,
//! `--port`, `--json` and the broker's `--broker-pid`, so a compare run measures
//! exactly what the same command line would. Interleaving spreads a disturbance
//! on a shared machine (compiles, other benchmarks) over both brokers instead of
//! charging it to whichever ran at the time; the median of 3 or more repetitions
//! then discards one disturbed run per broker. The brokers are not started here:
//! start them pinned (`taskset`) and name their pids, as
//! `bench/scripts/compare-all.sh` does.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;

use anyhow::Context as _;

/// One entry of the matrix: a name and the bench arguments.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Name, e.g. `fanin-q1`.
    pub name: &'static str,
    /// Scenario and its flags.
    pub args: &'static [&'static str],
    /// The figures reported for it.
    pub figures: &'static [Figure],
}

/// A figure taken from a run's JSON report.
#[derive(Debug, Clone, Copy)]
pub struct Figure {
    /// Shown name.
    pub label: &'static str,
    /// JSON pointer into the report, e.g. `/latency/p99_us`.
    pub pointer: &'static str,
    /// Whether a higher value is better (throughput) or lower (latency, memory).
    pub higher_is_better: bool,
}

const RECEIVED: Figure = Figure {
    label: "received msg/s",
    pointer: "/received_msg_per_s",
    higher_is_better: true,
};
const SENT: Figure = Figure {
    label: "sent msg/s",
    pointer: "/sent_msg_per_s",
    higher_is_better: true,
};
const P50: Figure = Figure {
    label: "latency p50 µs",
    pointer: "/latency/p50_us",
    higher_is_better: false,
};
const P99: Figure = Figure {
    label: "latency p99 µs",
    pointer: "/latency/p99_us",
    higher_is_better: false,
};
const BROKER_CPU: Figure = Figure {
    label: "broker cores",
    pointer: "/broker_cpu_cores",
    higher_is_better: false,
};
const CONNECT_RATE: Figure = Figure {
    label: "connects/s",
    pointer: "/connect_per_s",
    higher_is_better: true,
};
const RSS_PER_CONN: Figure = Figure {
    label: "broker bytes/conn",
    pointer: "/broker_rss_per_connection_bytes",
    higher_is_better: false,
};

/// The matrix. `fanout-alias` and `shared-q1` are issue 4's "fan-out with topic
/// aliases" and "shared-subscription fan-in" rows.
pub const MATRIX: &[Entry] = &[
    Entry {
        name: "fanin-q0",
        args: &["fanin", "--publishers", "8", "--qos", "0"],
        figures: &[RECEIVED, SENT, P99, BROKER_CPU],
    },
    Entry {
        name: "fanin-q1",
        args: &["fanin", "--publishers", "8", "--qos", "1"],
        figures: &[RECEIVED, SENT, P99, BROKER_CPU],
    },
    Entry {
        name: "fanout-q0",
        args: &["fanout", "--subscribers", "100", "--qos", "0"],
        figures: &[RECEIVED, SENT, P99, BROKER_CPU],
    },
    Entry {
        name: "fanout-alias",
        args: &[
            "fanout",
            "--subscribers",
            "100",
            "--qos",
            "0",
            "--protocol",
            "5",
            "--topic-alias",
        ],
        figures: &[RECEIVED, SENT, P99, BROKER_CPU],
    },
    Entry {
        name: "shared-q1",
        args: &[
            "shared",
            "--publishers",
            "8",
            "--groups",
            "1",
            "--members",
            "4",
            "--qos",
            "1",
            "--protocol",
            "5",
        ],
        figures: &[RECEIVED, SENT, P99, BROKER_CPU],
    },
    Entry {
        name: "pubsub-q1",
        args: &["pubsub", "--clients", "50", "--qos", "1"],
        figures: &[RECEIVED, P99, BROKER_CPU],
    },
    Entry {
        name: "latency-q0",
        args: &["latency", "--rate", "1000", "--qos", "0"],
        figures: &[P50, P99, BROKER_CPU],
    },
    Entry {
        name: "latency-q1",
        args: &["latency", "--rate", "1000", "--qos", "1"],
        figures: &[P50, P99, BROKER_CPU],
    },
    Entry {
        name: "conn-5k",
        args: &[
            "conn",
            "--clients",
            "5000",
            "--rate",
            "2000",
            "--bind",
            "127.0.0.2,127.0.0.3",
        ],
        figures: &[CONNECT_RATE, RSS_PER_CONN],
    },
];

/// The matrix entries run when `--scenarios` is not given (every one but conn,
/// whose hold makes it slow and whose figure `conn` measures better alone).
pub const DEFAULT_SCENARIOS: &[&str] = &[
    "fanin-q0",
    "fanin-q1",
    "fanout-q0",
    "fanout-alias",
    "shared-q1",
    "pubsub-q1",
    "latency-q0",
    "latency-q1",
];

/// One broker of a comparison.
#[derive(Debug, Clone)]
pub struct Side {
    /// Shown name.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its process id, for CPU and memory figures.
    pub pid: Option<u32>,
}

/// Settings of a comparison.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The two brokers.
    pub a: Side,
    /// The two brokers.
    pub b: Side,
    /// Repetitions per scenario and broker.
    pub reps: u32,
    /// Names of the matrix entries to run.
    pub scenarios: Vec<String>,
    /// Arguments every run gets (duration, warmup, size, threads...).
    pub common: Vec<String>,
    /// Print a Markdown table as well.
    pub markdown: bool,
}

/// The result of one run.
#[derive(Debug, Clone)]
struct Run {
    json: Option<serde_json::Value>,
    code: i32,
}

/// Results of one matrix entry.
#[derive(Debug, Clone)]
pub struct Row {
    /// The entry.
    pub entry: Entry,
    /// Per figure: median of A, median of B (`None` when no run reported it).
    pub figures: Vec<(Figure, Option<f64>, Option<f64>)>,
    /// Runs of A and B that failed a check or could not run, of `reps` each.
    pub failed: (u32, u32),
    /// Loss summed over the repetitions, A and B.
    pub loss: (u64, u64),
}

fn run_once(
    exe: &std::path::Path,
    entry: &Entry,
    side: &Side,
    common: &[String],
) -> anyhow::Result<Run> {
    let mut cmd = Command::new(exe);
    cmd.args(entry.args)
        .args(common)
        .args(["--host", &side.addr.ip().to_string()])
        .args(["--port", &side.addr.port().to_string(), "--json"]);
    if let Some(pid) = side.pid {
        cmd.args(["--broker-pid", &pid.to_string()]);
    }
    let out = cmd
        .stderr(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok());
    Ok(Run {
        json,
        code: out.status.code().unwrap_or(-1),
    })
}

/// The median of `v` (mean of the middle two for an even count); `None` if empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Runs the comparison, printing progress on stderr; returns the rows.
pub fn run(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let exe = std::env::current_exe().context("finding the bench binary")?;
    let mut rows = Vec::new();
    for name in &s.scenarios {
        let entry = MATRIX
            .iter()
            .find(|e| e.name == name)
            .with_context(|| format!("no scenario {name:?} in the compare matrix"))?
            .clone();
        let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
        for rep in 0..s.reps {
            for (k, side) in [&s.a, &s.b].into_iter().enumerate() {
                eprintln!(
                    "bench compare: {name} rep {}/{} on {} ({})",
                    rep + 1,
                    s.reps,
                    side.name,
                    side.addr
                );
                runs[k].push(run_once(&exe, &entry, side, &s.common)?);
            }
        }
        let pick = |runs: &[Run], f: &Figure| {
            median(
                runs.iter()
                    .filter_map(|r| r.json.as_ref()?.pointer(f.pointer)?.as_f64())
                    .collect(),
            )
        };
        let failed = |runs: &[Run]| runs.iter().filter(|r| r.code != 0).count() as u32;
        let loss = |runs: &[Run]| {
            runs.iter()
                .filter_map(|r| r.json.as_ref()?.get("loss_count")?.as_u64())
                .sum()
        };
        rows.push(Row {
            figures: entry
                .figures
                .iter()
                .map(|f| (*f, pick(&runs[0], f), pick(&runs[1], f)))
                .collect(),
            failed: (failed(&runs[0]), failed(&runs[1])),
            loss: (loss(&runs[0]), loss(&runs[1])),
            entry,
        });
    }
    Ok(rows)
}

fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// B/A, and whether B is better.
fn ratio(a: Option<f64>, b: Option<f64>, f: &Figure) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => {
            let r = b / a;
            let better = if f.higher_is_better { r > 1.0 } else { r < 1.0 };
            format!("{r:.2}{}", if better { " (B better)" } else { "" })
        }
        _ => "-".into(),
    }
}

/// The rows as aligned text.
pub fn text(s: &Settings, rows: &[Row]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "bench compare: A = {} ({}), B = {} ({}), median of {} interleaved runs each",
        s.a.name, s.a.addr, s.b.name, s.b.addr, s.reps
    );
    let _ = writeln!(
        o,
        "{:<14} {:<18} {:>12} {:>12} {:>16}",
        "scenario", "figure", s.a.name, s.b.name, "B/A"
    );
    for r in rows {
        for (f, a, b) in &r.figures {
            let _ = writeln!(
                o,
                "{:<14} {:<18} {:>12} {:>12} {:>16}",
                r.entry.name,
                f.label,
                fmt_value(*a),
                fmt_value(*b),
                ratio(*a, *b, f)
            );
        }
        if r.failed != (0, 0) || r.loss != (0, 0) {
            let _ = writeln!(
                o,
                "{:<14} {:<18} {:>12} {:>12}   (failed runs: {} / {})",
                r.entry.name, "loss (all runs)", r.loss.0, r.loss.1, r.failed.0, r.failed.1
            );
        }
    }
    o
}

/// The rows as a Markdown table.
pub fn markdown(s: &Settings, rows: &[Row]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| scenario | figure | {} | {} | {} / {} | loss {} / {} | failed runs |",
        s.a.name, s.b.name, s.b.name, s.a.name, s.a.name, s.b.name
    );
    let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|");
    for r in rows {
        for (i, (f, a, b)) in r.figures.iter().enumerate() {
            let (loss, failed) = if i == 0 {
                (
                    format!("{} / {}", r.loss.0, r.loss.1),
                    format!("{} / {}", r.failed.0, r.failed.1),
                )
            } else {
                (String::new(), String::new())
            };
            let args = if i == 0 {
                format!("`{}` `{}`", r.entry.name, r.entry.args.join(" "))
            } else {
                String::new()
            };
            let _ = writeln!(
                o,
                "| {args} | {} | {} | {} | {} | {loss} | {failed} |",
                f.label,
                fmt_value(*a),
                fmt_value(*b),
                ratio(*a, *b, f)
            );
        }
    }
    o
}

/// The rows as one JSON object.
pub fn json(s: &Settings, rows: &[Row]) -> String {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "scenario": r.entry.name,
                "args": r.entry.args,
                "figures": r.figures.iter().map(|(f, a, b)| serde_json::json!({
                    "figure": f.label,
                    "a": a,
                    "b": b,
                    "b_over_a": match (a, b) { (Some(a), Some(b)) if *a > 0.0 => Some(b / a), _ => None },
                })).collect::<Vec<_>>(),
                "loss_a": r.loss.0,
                "loss_b": r.loss.1,
                "failed_a": r.failed.0,
                "failed_b": r.failed.1,
            })
        })
        .collect();
    serde_json::json!({
        "scenario": "compare",
        "a": {"name": s.a.name, "addr": s.a.addr.to_string()},
        "b": {"name": s.b.name, "addr": s.b.addr.to_string()},
        "reps": s.reps,
        "common_args": s.common,
        "rows": rows,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn every_default_scenario_is_in_the_matrix() {
        for name in DEFAULT_SCENARIOS {
            assert!(MATRIX.iter().any(|e| e.name == *name), "{name}");
        }
    }

    #[test]
    fn ratio_says_which_side_is_better() {
        assert_eq!(
            ratio(Some(100.0), Some(200.0), &RECEIVED),
            "2.00 (B better)"
        );
        assert_eq!(ratio(Some(100.0), Some(200.0), &P99), "2.00");
        assert_eq!(ratio(Some(0.0), Some(1.0), &P99), "-");
    }
}
