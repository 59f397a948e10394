//! The `fanin` and `fanout` scenarios: max-rate publishers ([`crate::publisher`])
//! and accounting subscribers ([`crate::subscriber`]), differing only in topics and
//! client counts.
//!
//! Order of a run: connect and subscribe every subscriber, connect every publisher,
//! start all publishers at one instant, measure between the end of the warmup and
//! the end of publishing, then wait (at most `--drain`) for deliveries to arrive,
//! stop the subscribers and account.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use tessera_proto::{QoS, Str};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::accounting::Tally;
use crate::clock;
use crate::mqtt::{self, Client, READ_CHUNK_BYTES};
use crate::publisher::{PublisherPlan, run_publisher};
use crate::report::Report;
use crate::run::{RunConfig, Timeline, sleep_until_ns, wait_for_deliveries};
use crate::stats::{
    LatencySummary, Live, ProgressLabels, Series, latency_histogram, spawn_progress,
};
use crate::subscriber::{SubscriberResult, run_subscriber};
use crate::sys::{CpuMeter, process_rss_bytes};

/// Connections set up at once during setup, so a thousand subscribers do not
/// overflow the broker's listen backlog.
pub const SETUP_CONCURRENCY_MAX: usize = 64;

/// How long deliveries may pause before the drain stops waiting for more.
const DRAIN_QUIET: Duration = Duration::from_secs(1);

/// Which scenario, and its client counts.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// `publishers` on PREFIX/i to `subscribers` on PREFIX/#.
    Fanin {
        /// Publishers.
        publishers: u32,
        /// Subscribers.
        subscribers: u32,
    },
    /// One publisher on PREFIX/0 to `subscribers` on PREFIX/0.
    Fanout {
        /// Subscribers.
        subscribers: u32,
    },
}

/// Connects `n` clients named `bench-RUN-ROLE-i`, at most
/// [`SETUP_CONCURRENCY_MAX`] at a time; subscribes each to `filter` when given.
/// Returns them in index order, and the lowest QoS granted.
pub async fn connect_all(
    cfg: &Arc<RunConfig>,
    role: &'static str,
    n: u32,
    filter: Option<String>,
) -> anyhow::Result<(Vec<Client>, QoS)> {
    let mut clients: Vec<Option<Client>> = (0..n).map(|_| None).collect();
    let mut granted = cfg.qos;
    let mut set = JoinSet::new();
    let mut next = 0u32;
    loop {
        while next < n && set.len() < SETUP_CONCURRENCY_MAX {
            let (cfg, filter, i) = (cfg.clone(), filter.clone(), next);
            set.spawn(async move {
                let id = format!("bench-{:08x}-{role}-{i}", cfg.run_id);
                // Only publishers write in bulk; a bounded send buffer keeps what
                // waits in the kernel small, so the send rate tracks what the broker
                // takes instead of how much the kernel would queue.
                let sndbuf = filter.is_none().then_some(cfg.sndbuf_bytes).flatten();
                let mut c = mqtt::connect(&cfg.opts, &id, None, READ_CHUNK_BYTES, sndbuf).await?;
                let q = match &filter {
                    Some(f) => c.subscribe(f, cfg.qos).await?,
                    None => cfg.qos,
                };
                Ok::<_, mqtt::Failure>((i, c, q))
            });
            next += 1;
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        let (i, c, q) = done
            .expect("setup tasks do not panic")
            .with_context(|| format!("setting up a {role} at {}", cfg.opts.addr))?;
        granted = granted.min(q);
        clients[i as usize] = Some(c);
    }
    Ok((
        clients
            .into_iter()
            .map(|c| c.expect("every index joined"))
            .collect(),
        granted,
    ))
}

/// Runs `fanin` or `fanout` and reports. `rate` paces each publisher (messages
/// per second); without it they publish as fast as allowed.
pub async fn run(cfg: RunConfig, shape: Shape, rate: Option<f64>) -> anyhow::Result<Report> {
    let cfg = Arc::new(cfg);
    let prefix = cfg.topic_prefix.clone();
    let (scenario, publishers, subscribers, filter) = match shape {
        Shape::Fanin {
            publishers,
            subscribers,
        } => ("fanin", publishers, subscribers, format!("{prefix}/#")),
        Shape::Fanout { subscribers } => ("fanout", 1, subscribers, format!("{prefix}/0")),
    };
    let live = Arc::new(Live::new(publishers));

    let (subs, granted) = connect_all(&cfg, "sub", subscribers, Some(filter)).await?;
    if granted < cfg.qos {
        eprintln!(
            "bench {scenario}: the broker granted QoS {} for QoS {} subscriptions",
            granted as u8, cfg.qos as u8
        );
    }
    let (pubs, _) = connect_all(&cfg, "pub", publishers, None).await?;

    let t = cfg.timeline();
    let (stop_tx, stop_rx) = watch::channel(false);
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .map(|c| {
            tokio::spawn(run_subscriber(
                c,
                publishers,
                cfg.clone(),
                t,
                live.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    let pub_tasks: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let plan = PublisherPlan {
                id: i as u32,
                topic: Str::try_from(format!("{prefix}/{i}")).expect("valid topic"),
                rate,
            };
            tokio::spawn(run_publisher(c, plan, cfg.clone(), t, live.clone()))
        })
        .collect();
    let progress = spawn_progress(scenario, live.clone(), ProgressLabels::Messages);

    let rss_before = cfg.broker_pid.and_then(process_rss_bytes);
    sleep_until_ns(t.warm_ns).await;
    let meter = CpuMeter::start(cfg.broker_pid);
    let mut pub_results = Vec::with_capacity(pub_tasks.len());
    for task in pub_tasks {
        pub_results.push(task.await.expect("publisher tasks do not panic"));
    }
    let cpu = meter.stop();
    let rss_after = cfg.broker_pid.and_then(process_rss_bytes);

    let sent: Vec<u64> = pub_results.iter().map(|r| r.sent).collect();
    let sent_total: u64 = sent.iter().sum();
    let drain = wait_for_deliveries(
        sent_total * u64::from(subscribers),
        || live.received.load(Ordering::Relaxed),
        DRAIN_QUIET,
        clock::now_ns() + cfg.drain_ns,
    )
    .await;
    let _ = stop_tx.send(true);
    let mut sub_results = Vec::with_capacity(sub_tasks.len());
    for task in sub_tasks {
        sub_results.push(task.await.expect("subscriber tasks do not panic"));
    }
    progress.abort();

    // The window closes when publishing ended: at the planned end, or earlier when
    // every publisher reached --count.
    let window_end_ns = if sent.iter().all(|&s| s >= cfg.count) {
        pub_results
            .iter()
            .map(|r| r.last_ns + 1)
            .max()
            .unwrap_or(t.end_ns)
    } else {
        t.end_ns
    };
    let mut report = cfg.report(scenario);
    report.publishers = publishers;
    report.subscribers = subscribers;
    report.granted_qos = (granted < cfg.qos).then_some(granted as u8);
    report.sent_count = sent_total;
    fill_deliveries(
        &mut report,
        &sent,
        &t,
        window_end_ns,
        &pub_series(&pub_results),
        &sub_results,
    );
    report.drain = Some(drain);
    report.bench_cpu_cores = cpu.bench_cores;
    report.broker_cpu_cores = cpu.broker_cores;
    report.broker_rss_before_bytes = rss_before;
    report.broker_rss_after_bytes = rss_after;
    report.error_count = live.errors.load(Ordering::Relaxed);
    report.errors = live.reasons();
    report.judge(None);
    Ok(report)
}

fn pub_series(results: &[crate::publisher::PublisherResult]) -> Series {
    let mut s = results[0].series.clone();
    for r in &results[1..] {
        s.merge(&r.series);
    }
    s
}

/// Fills rates, accounting and latency from the publishers' merged series `sent_series`,
/// their counts `sent`, and the subscribers' results.
pub fn fill_deliveries(
    report: &mut Report,
    sent: &[u64],
    t: &Timeline,
    window_end_ns: u64,
    sent_series: &Series,
    subs: &[SubscriberResult],
) {
    let mut tally = Tally::default();
    let mut latency = latency_histogram();
    let mut received = subs[0].series.clone();
    for (i, s) in subs.iter().enumerate() {
        tally += s.accounting.tally(sent);
        latency.add(&s.latency).expect("histograms of one shape");
        if i > 0 {
            received.merge(&s.series);
        }
    }
    let (sent_in_window, window_ns) = sent_series.window(t.warm_ns, window_end_ns);
    let (received_in_window, _) = received.window(t.warm_ns, window_end_ns);
    if window_ns == 0 {
        eprintln!(
            "bench: the measurement window is empty (--count was reached during the warmup); rates are 0, try --warmup 0"
        );
    }
    let per_s = |n: u64| {
        if window_ns == 0 {
            0.0
        } else {
            (n as f64 * 1e9 / window_ns as f64).round()
        }
    };
    report.window_s = window_ns as f64 / 1e9;
    report.sent_msg_per_s = per_s(sent_in_window);
    report.received_msg_per_s = per_s(received_in_window);
    report.expected_count = tally.expected;
    report.received_count = tally.distinct;
    report.loss_count = tally.lost;
    report.duplicate_count = tally.duplicates;
    report.out_of_order_count = tally.out_of_order;
    report.gap_count = tally.gaps;
    report.foreign_count = tally.foreign;
    report.corrupt_count = tally.corrupt;
    report.latency = Some(LatencySummary::of(&latency));
}
