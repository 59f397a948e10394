//! The `conn` scenario: open `--clients` connections at `--rate` per second
//! (optionally spread over local source addresses), hold them idle for
//! `--duration`, and report connect latency, failures by reason, and with
//! `--broker-pid` the broker's resident memory per connection.
//!
//! One task per connection: it connects, reports the attempt, then stays idle,
//! pinging at half the keep alive and watching for the broker closing it, until
//! the hold ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tessera_proto::{Packet, decode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::mqtt::{self, Failure, PACKET_BYTES_MAX};
use crate::report::Report;
use crate::run::RunConfig;
use crate::stats::{
    LatencySummary, Live, ProgressLabels, latency_histogram, record_ns, spawn_progress,
};
use crate::sys::{CpuMeter, process_rss_bytes};

/// Read buffer of an idle connection: it only ever receives CONNACK and PINGRESP.
const IDLE_READ_BYTES: usize = 256;

/// Pause after the last connect before measuring memory, so the broker has
/// finished setting up every session.
const SETTLE: Duration = Duration::from_secs(1);

/// The `conn` flags.
#[derive(Debug, Clone)]
pub struct ConnPlan {
    /// Connections to open.
    pub clients: u32,
    /// Connections opened per second.
    pub rate: f64,
    /// Failures and drops allowed.
    pub max_failures: u64,
}

/// Connects one client, reports the attempt on `attempts`, and holds the
/// connection until `stop`. Returns why it dropped during the hold, if it did.
async fn hold_one(
    i: u32,
    cfg: Arc<RunConfig>,
    attempts: mpsc::Sender<Result<u64, Failure>>,
    mut stop: watch::Receiver<bool>,
) -> Option<Failure> {
    let id = cfg.client_id("conn", i);
    let started = Instant::now();
    let mut client = match mqtt::connect(&cfg.opts, &id, i as usize, IDLE_READ_BYTES, None).await {
        Ok(c) => c,
        Err(f) => {
            let _ = attempts.send(Err(f)).await;
            return None;
        }
    };
    let _ = attempts.send(Ok(started.elapsed().as_nanos() as u64)).await;
    drop(attempts);

    let version = client.version;
    let ping_every = Duration::from_millis(u64::from(cfg.opts.keep_alive_s) * 500);
    let ping = tokio::time::sleep(ping_every);
    let stopped = stop.changed();
    tokio::pin!(ping, stopped);
    let mut out = BytesMut::new();
    let dropped = loop {
        let (mut rd, mut wr) = client.stream.split();
        tokio::select! {
            biased;
            _ = &mut stopped => break None,
            r = rd.read_buf(&mut client.rbuf) => match r {
                Ok(0) => break Some(Failure::Closed),
                Ok(_) => {}
                Err(e) => break Some(e.into()),
            },
            _ = &mut ping, if !ping_every.is_zero() => {
                out.clear();
                mqtt::put(&Packet::PingReq, version, &mut out);
                if let Err(e) = async { wr.write_all(&out).await?; wr.flush().await }.await {
                    break Some(e.into());
                }
                ping.as_mut().reset(tokio::time::Instant::now() + ping_every);
            }
        }
        match decode(&mut client.rbuf, version, PACKET_BYTES_MAX) {
            Ok(None) | Ok(Some(Packet::PingResp)) => {}
            Ok(Some(Packet::Disconnect(d))) => break Some(Failure::Disconnected(d.reason_code)),
            Ok(Some(p)) => break Some(Failure::Unexpected(p.packet_type())),
            Err(e) => break Some(e.into()),
        }
    };
    if dropped.is_none() {
        client.disconnect().await;
    }
    dropped
}

/// Runs `conn` and reports.
pub async fn run(cfg: RunConfig, plan: ConnPlan) -> anyhow::Result<Report> {
    let cfg = Arc::new(cfg);
    let live = Arc::new(Live::new(0));
    let rss_before = cfg.broker_pid.and_then(process_rss_bytes);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (att_tx, mut att_rx) = mpsc::channel::<Result<u64, Failure>>(plan.clients as usize);
    let progress = spawn_progress("conn", live.clone(), ProgressLabels::Connections);
    let meter = CpuMeter::start(cfg.broker_pid);

    // Attempts are collected while new ones are still being started, so the
    // progress line is live.
    let collector = {
        let live = live.clone();
        let clients = plan.clients;
        tokio::spawn(async move {
            let mut latency = latency_histogram();
            let mut failures: BTreeMap<String, u64> = BTreeMap::new();
            let mut connected = 0u64;
            for _ in 0..clients {
                match att_rx.recv().await {
                    Some(Ok(ns)) => {
                        record_ns(&mut latency, ns);
                        connected += 1;
                        live.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Err(f)) => {
                        *failures.entry(f.to_string()).or_insert(0) += 1;
                        live.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    None => break,
                }
                live.received.fetch_add(1, Ordering::Relaxed);
            }
            (latency, failures, connected)
        })
    };
    let open_start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(plan.clients as usize);
    for i in 0..plan.clients {
        tokio::time::sleep_until(open_start + Duration::from_secs_f64(f64::from(i) / plan.rate))
            .await;
        tasks.push(tokio::spawn(hold_one(
            i,
            cfg.clone(),
            att_tx.clone(),
            stop_rx.clone(),
        )));
    }
    drop(att_tx);
    let (latency, mut failures, connected) = collector.await.expect("the collector does not panic");
    let open_s = open_start.elapsed().as_secs_f64();

    tokio::time::sleep(SETTLE).await;
    let hold_start = Instant::now();
    tokio::time::sleep(Duration::from_nanos(cfg.duration_ns)).await;
    let rss_after = cfg.broker_pid.and_then(process_rss_bytes);
    let cpu = meter.stop();
    let _ = stop_tx.send(true);
    let mut dropped = 0u64;
    for task in tasks {
        if let Some(f) = task.await.expect("connection tasks do not panic") {
            dropped += 1;
            *failures
                .entry(format!("dropped during hold: {f}"))
                .or_insert(0) += 1;
        }
    }
    progress.abort();

    let mut report = cfg.report("conn");
    report.window_s = hold_start.elapsed().as_secs_f64();
    report.clients = Some(plan.clients);
    report.connected_count = Some(connected);
    report.dropped_count = Some(dropped);
    report.connect_per_s = Some((connected as f64 / open_s.max(1e-9)).round());
    report.connect_latency = Some(LatencySummary::of(&latency));
    report.artifacts = Some(Box::new(crate::report::Artifacts {
        latency,
        send_lag: None,
        sent: None,
        received: None,
    }));
    report.failures = failures;
    report.bench_cpu_cores = cpu.bench_cores;
    report.broker_cpu_cores = cpu.broker_cores;
    report.broker_rss_before_bytes = rss_before;
    report.broker_rss_after_bytes = rss_after;
    if let (Some(a), Some(b)) = (rss_before, rss_after)
        && connected > 0
    {
        report.broker_rss_per_connection_bytes =
            Some(((b as f64 - a as f64) / connected as f64).round());
    }
    report.max_loss = None;
    report.judge(Some(plan.max_failures));
    Ok(report)
}
