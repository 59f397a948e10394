//! `bench`: load generator for MQTT brokers. See `bench --help` and
//! `bench/README.md`.
//!
//! Exit status: 0 when every check passed, 1 when a check failed (loss above
//! `--max-loss`, errors, corrupt messages, connection failures), 2 for a usage
//! error, 3 when the run could not be set up (e.g. the broker refused a
//! subscriber).

use std::net::ToSocketAddrs;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tessera_bench::cli::{Cli, Scenario};
use tessera_bench::conn::ConnPlan;
use tessera_bench::mqtt::Options;
use tessera_bench::report::Report;
use tessera_bench::run::RunConfig;
use tessera_bench::throughput::Shape;
use tessera_bench::{clock, conn, latency, sys, throughput};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.validate() {
        eprintln!("bench: {e}");
        return ExitCode::from(2);
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
    // Start the clock before anything is stamped with it.
    clock::now_ns();
    let nofile = sys::raise_nofile_limit().context("raising the open-files limit")?;
    let addr = (c.host.as_str(), c.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", c.host))?
        .next()
        .with_context(|| format!("{} has no address", c.host))?;
    if let Scenario::Conn { clients, .. } = &cli.scenario
        && u64::from(*clients) + 64 > nofile
    {
        eprintln!(
            "bench conn: {clients} connections need more open files than the limit of {nofile}; expect EMFILE failures"
        );
    }
    let cfg = RunConfig {
        opts: Options {
            addr,
            version: c.mqtt_version,
            keep_alive_s: c.keep_alive,
            timeout: Duration::from_secs_f64(c.timeout),
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
        run_id: run_id(),
        broker_pid: c.broker_pid,
        topic_prefix: c.topic_prefix.clone(),
        max_loss: cli.max_loss(),
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = c.threads {
        rt.worker_threads(n);
    }
    let rt = rt
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        match cli.scenario.clone() {
            Scenario::Fanin {
                publishers,
                subscribers,
                rate,
            } => {
                let shape = Shape::Fanin {
                    publishers,
                    subscribers,
                };
                throughput::run(cfg, shape, rate).await
            }
            Scenario::Fanout { subscribers, rate } => {
                throughput::run(cfg, Shape::Fanout { subscribers }, rate).await
            }
            Scenario::Latency { rate } => latency::run(cfg, rate).await,
            Scenario::Conn {
                clients,
                rate,
                bind,
                max_failures,
            } => {
                conn::run(
                    cfg,
                    ConnPlan {
                        clients,
                        rate,
                        bind,
                        max_failures,
                    },
                )
                .await
            }
        }
    })
}

/// A run id that differs between runs: process id and wall-clock nanoseconds.
fn run_id() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::process::id().rotate_left(16) ^ nanos
}
