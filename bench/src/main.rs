//! `bench`: load generator for MQTT brokers. See `bench --help` and
//! `bench/README.md`.
//!
//! Exit status: 0 when every check passed, 1 when a check failed (loss above
//! `--max-loss`, errors, corrupt messages, connection failures), 2 for a usage
//! error, 3 when the run could not be set up (e.g. the broker refused a
//! subscriber).

use std::net::ToSocketAddrs;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tessera_bench::cli::{Cli, Scenario};
use tessera_bench::conn::ConnPlan;
use tessera_bench::mqtt::Options;
use tessera_bench::plan::{Plan, expand};
use tessera_bench::report::Report;
use tessera_bench::run::RunConfig;
use tessera_bench::transport::{Tls, TlsFlags};
use tessera_bench::{clock, conn, latency, output, procs, sys, throughput};
use tessera_proto::topic::{validate_topic_filter, validate_topic_name};

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Err(e) = cli.validate() {
        eprintln!("bench: {e}");
        return ExitCode::from(2);
    }
    if let Some(k) = cli.common.child {
        cli.child_share(k);
    }
    if let Scenario::Compare { .. } = &cli.scenario {
        return match compare(&cli) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("bench: {e:#}");
                ExitCode::from(3)
            }
        };
    }
    match run(&cli) {
        Ok(report) => {
            print!("{}", report.summary());
            if cli.common.json {
                println!("{}", report.json());
            }
            if report.pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::from(3)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<Report> {
    let c = &cli.common;
    if c.procs > 1 && c.child.is_none() {
        let (barrier, max_failures) = match &cli.scenario {
            Scenario::Conn { max_failures, .. } => (false, Some(*max_failures)),
            _ => (true, None),
        };
        let report = tessera_bench::procs::run_parent(c.procs, barrier, max_failures)?;
        write_outputs(cli, &report)?;
        return Ok(report);
    }
    let nofile = sys::raise_nofile_limit().context("raising the open-files limit")?;
    let mut addrs = Vec::with_capacity(c.host.len());
    for host in &c.host {
        addrs.push(
            (host.as_str(), c.port)
                .to_socket_addrs()
                .with_context(|| format!("resolving {host}"))?
                .next()
                .with_context(|| format!("{host} has no address"))?,
        );
    }
    let mut pub_addrs = Vec::with_capacity(c.pub_addr.len());
    for a in &c.pub_addr {
        pub_addrs.push(
            a.to_socket_addrs()
                .with_context(|| format!("resolving --pub-addr {a}"))?
                .next()
                .with_context(|| format!("--pub-addr {a} has no address"))?,
        );
    }
    if let Scenario::Conn { clients, .. } = &cli.scenario
        && u64::from(*clients) + 64 > nofile
    {
        eprintln!(
            "bench conn: {clients} connections need more open files than the limit of {nofile}; expect EMFILE failures"
        );
    }
    let tls = if c.tls || c.quic {
        let flags = TlsFlags {
            quic: c.quic,
            quic_0rtt: c.quic_0rtt,
            quic_congestion: c.quic_congestion.unwrap_or_default(),
            ca: c.ca.clone(),
            insecure: c.insecure,
            cert: c.cert.clone(),
            key: c.key.clone(),
            sni: c.sni.clone(),
            resume: c.tls_resume,
        };
        Some(Arc::new(Tls::new(&flags, &c.host)?))
    } else {
        None
    };
    let run_id = run_id();
    let topic_alias = matches!(
        cli.scenario,
        Scenario::Fanout {
            topic_alias: true,
            ..
        }
    );
    let cfg = RunConfig {
        opts: Options {
            addrs,
            pub_addrs,
            binds: c.bind.clone(),
            version: c.mqtt_version,
            keep_alive_s: c.keep_alive,
            timeout: Duration::from_secs_f64(c.timeout),
            clean_start: !c.persistent,
            session_expiry_s: c.session_expiry,
            username: c.username.clone(),
            password: c.password.clone(),
            topic_alias_max: if topic_alias {
                TOPIC_ALIASES_ACCEPTED
            } else {
                0
            },
            tls,
        },
        qos: cli.qos(),
        size: c.size,
        warmup_ns: clock::secs_ns(c.warmup),
        duration_ns: clock::secs_ns(c.duration),
        count: c.count.unwrap_or(u64::MAX),
        inflight: c.inflight,
        inflight_bytes: c.inflight_bytes,
        sndbuf_bytes: (c.sndbuf > 0).then_some(c.sndbuf),
        drain_ns: clock::secs_ns(c.drain),
        run_id,
        broker_pid: c.broker_pid,
        topic_prefix: c.topic_prefix.clone(),
        max_loss: cli.max_loss(),
        client_id_prefix: c.client_id_prefix.clone().unwrap_or_else(|| match c.child {
            Some(k) => format!("bench-{run_id:08x}-p{k}"),
            None => format!("bench-{run_id:08x}"),
        }),
        child: c.child.is_some(),
        reconnect: c.reconnect,
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = c.threads {
        rt.worker_threads(n);
    }
    let rt = rt
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let report = rt.block_on(async {
        match cli.scenario.clone() {
            Scenario::Latency {
                rate,
                busy_poll,
                busy_poll_lead,
            } => {
                let mode = match (busy_poll, busy_poll_lead) {
                    (false, _) => latency::Mode::Sleeping,
                    (true, None) => latency::Mode::BusyPoll { lead: None },
                    (true, Some(us)) => latency::Mode::BusyPoll {
                        lead: Some(Duration::from_micros(us)),
                    },
                };
                latency::run(cfg, rate, mode).await
            }
            Scenario::Conn {
                clients,
                rate,
                max_failures,
            } => {
                conn::run(
                    cfg,
                    ConnPlan {
                        clients,
                        rate,
                        max_failures,
                    },
                )
                .await
            }
            _ => {
                let plan = message_plan(cli, &cfg)?;
                throughput::run(cfg, plan).await
            }
        }
    })?;
    let mut report = report;
    if c.child.is_some()
        && let Some(a) = &report.artifacts
    {
        let mut h = std::collections::BTreeMap::new();
        h.insert("latency".to_string(), procs::export(&a.latency));
        if let Some(lag) = &a.send_lag {
            h.insert("send_lag".to_string(), procs::export(lag));
        }
        report.histograms = h;
    }
    write_outputs(cli, &report)?;
    Ok(report)
}

/// `bench compare`: exit 0 when every run passed, 1 otherwise.
fn compare(cli: &Cli) -> anyhow::Result<ExitCode> {
    let Scenario::Compare {
        a,
        b,
        a_name,
        b_name,
        a_pid,
        b_pid,
        reps,
        scenarios,
        markdown,
    } = cli.scenario.clone()
    else {
        unreachable!("called for compare only")
    };
    let c = &cli.common;
    let mut common: Vec<String> = vec![
        "--duration".into(),
        c.duration.to_string(),
        "--warmup".into(),
        c.warmup.to_string(),
        "--size".into(),
        c.size.to_string(),
        "--drain".into(),
        c.drain.to_string(),
    ];
    if let Some(t) = c.threads {
        common.extend(["--threads".into(), t.to_string()]);
    }
    let settings = tessera_bench::compare::Settings {
        a: tessera_bench::compare::Side {
            name: a_name,
            addr: a,
            pid: a_pid,
        },
        b: tessera_bench::compare::Side {
            name: b_name,
            addr: b,
            pid: b_pid,
        },
        reps,
        scenarios: if scenarios.is_empty() {
            tessera_bench::compare::DEFAULT_SCENARIOS
                .iter()
                .map(ToString::to_string)
                .collect()
        } else {
            scenarios
        },
        common,
        markdown,
    };
    let rows = tessera_bench::compare::run(&settings)?;
    print!("{}", tessera_bench::compare::text(&settings, &rows));
    if settings.markdown {
        println!();
        print!("{}", tessera_bench::compare::markdown(&settings, &rows));
    }
    if c.json {
        println!("{}", tessera_bench::compare::json(&settings, &rows));
    }
    let all_passed = rows.iter().all(|r| r.failed == (0, 0));
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Topic aliases subscribers accept with `fanout --topic-alias`.
const TOPIC_ALIASES_ACCEPTED: u16 = 64;

/// The plan of a message scenario.
fn message_plan(cli: &Cli, cfg: &RunConfig) -> anyhow::Result<Plan> {
    let prefix = &cfg.topic_prefix;
    let ids = |role: &str, n: u32| -> Vec<(u32, String)> {
        (0..n).map(|i| (i, cfg.client_id(role, i))).collect()
    };
    let expand_all = |role: &str, n: u32, template: &str| -> Vec<String> {
        ids(role, n)
            .into_iter()
            .map(|(i, id)| expand(template, i, &id))
            .collect()
    };
    let plan = match cli.scenario.clone() {
        Scenario::Fanin {
            publishers,
            subscribers,
            rate,
        } => Plan {
            scenario: "fanin",
            pub_topics: expand_all("pub", publishers, &format!("{prefix}/%i")),
            sub_filters: vec![format!("{prefix}/#"); subscribers as usize],
            rate,
            ..Plan::default()
        },
        Scenario::Fanout {
            subscribers,
            rate,
            topic_alias,
        } => Plan {
            scenario: "fanout",
            pub_topics: vec![format!("{prefix}/0")],
            sub_filters: vec![format!("{prefix}/0"); subscribers as usize],
            rate,
            topic_alias,
            ..Plan::default()
        },
        Scenario::Pub {
            clients,
            topic,
            rate,
            retain,
        } => Plan {
            scenario: "pub",
            pub_topics: expand_all(
                "pub",
                clients,
                topic.as_deref().unwrap_or(&format!("{prefix}/%i")),
            ),
            rate,
            retain,
            ..Plan::default()
        },
        Scenario::Sub { clients, topic } => Plan {
            scenario: "sub",
            sub_filters: expand_all(
                "sub",
                clients,
                topic.as_deref().unwrap_or(&format!("{prefix}/#")),
            ),
            open: true,
            ..Plan::default()
        },
        Scenario::Pubsub { clients, rate } => {
            let topics = expand_all("pub", clients, &format!("{prefix}/pair/%i"));
            Plan {
                scenario: "pubsub",
                sub_filters: topics.clone(),
                pub_topics: topics,
                rate,
                ..Plan::default()
            }
        }
        Scenario::Shared {
            publishers,
            groups,
            members,
            filter,
            rate,
        } => {
            let filter = filter.unwrap_or_else(|| format!("{prefix}/#"));
            let mut sub_filters = Vec::new();
            let mut group_members = Vec::new();
            for g in 0..groups {
                group_members.push((g * members..(g + 1) * members).collect());
                for _ in 0..members {
                    sub_filters.push(format!("$share/g{g}/{filter}"));
                }
            }
            Plan {
                scenario: "shared",
                pub_topics: expand_all("pub", publishers, &format!("{prefix}/%i")),
                sub_filters,
                groups: group_members,
                rate,
                ..Plan::default()
            }
        }
        Scenario::Latency { .. } | Scenario::Conn { .. } | Scenario::Compare { .. } => {
            unreachable!("not a message scenario")
        }
    };
    for t in &plan.pub_topics {
        validate_topic_name(t, TOPIC_LEVELS_MAX)
            .map_err(|e| anyhow::anyhow!("publisher topic {t:?}: {e}"))?;
    }
    for f in &plan.sub_filters {
        validate_topic_filter(f, TOPIC_LEVELS_MAX)
            .map_err(|e| anyhow::anyhow!("subscription filter {f:?}: {e}"))?;
    }
    Ok(plan)
}

/// Topic levels the bench accepts in a template's expansion.
const TOPIC_LEVELS_MAX: usize = 128;

/// Writes --hdr-out and --plot.
fn write_outputs(cli: &Cli, report: &Report) -> anyhow::Result<()> {
    let c = &cli.common;
    let empty = tessera_bench::stats::latency_histogram();
    let artifacts = report.artifacts.as_deref();
    if let Some(path) = &c.hdr_out {
        let latency = artifacts.map_or(&empty, |a| &a.latency);
        std::fs::write(path, output::hgrm(latency))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let Some(path) = &c.plot else {
        return Ok(());
    };
    let Some((a, sent, received)) =
        artifacts.and_then(|a| Some((a, a.sent.as_ref()?, a.received.as_ref()?)))
    else {
        eprintln!(
            "bench {}: --plot draws message scenarios of one process; nothing written",
            report.scenario
        );
        return Ok(());
    };
    let title = format!(
        "bench {} against {}, MQTT {}, QoS {}, {} B",
        report.scenario, report.broker, report.mqtt_version, report.qos, report.size_bytes
    );
    let warm_ns = sent.start_ns() + (report.warmup_s * 1e9) as u64;
    std::fs::write(
        path,
        output::svg(&title, &a.latency, sent, received, warm_ns),
    )
    .with_context(|| format!("writing {}", path.display()))
}

/// A run id that differs between runs: process id and wall-clock nanoseconds.
fn run_id() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::process::id().rotate_left(16) ^ nanos
}
