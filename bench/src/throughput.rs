//! The message scenarios (`fanin`, `fanout`, `pub`, `sub`, `pubsub`, `shared`):
//! max-rate or paced publishers ([`crate::publisher`]) and accounting subscribers
//! ([`crate::subscriber`]), differing only in their [`Plan`]: topics, filters,
//! shared-subscription groups and client counts.
//!
//! Order of a run: connect and subscribe every subscriber, connect every publisher,
//! start all publishers at one instant, measure between the end of the warmup and
//! the end of publishing, then wait (at most `--drain`) for deliveries to arrive,
//! stop the subscribers and account. A shared-subscription group is accounted as
//! one subscriber: the union of its members' deliveries, where a message that
//! reached two members is a duplicate.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use tessera_proto::{QoS, Str};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::accounting::{Accounting, Tally};
use crate::clock;
use crate::mqtt::{self, Client, READ_CHUNK_BYTES};
use crate::plan::Plan;
use crate::publisher::{PublisherPlan, PublisherResult, run_publisher};
use crate::report::Report;
use crate::run::{RunConfig, Timeline, sleep_until_ns, wait_for_deliveries};
use crate::stats::{
    LatencySummary, Live, ProgressLabels, Series, latency_histogram, spawn_progress,
};
use crate::subscriber::{Redial, SubscriberResult, run_subscriber};
use crate::sys::{CpuMeter, process_rss_bytes};

/// Connections set up at once during setup, so a thousand subscribers do not
/// overflow the broker's listen backlog.
pub const SETUP_CONCURRENCY_MAX: usize = 64;

/// How long deliveries may pause before the drain stops waiting for more.
const DRAIN_QUIET: Duration = Duration::from_secs(1);

/// Connects `n` clients with ids [`RunConfig::client_id`]`(role, i)`, at most
/// [`SETUP_CONCURRENCY_MAX`] at a time, client `i` in slot `slot0 + i` (which
/// picks its `--host` and `--bind`); subscribes client `i` to `filters[i]` when
/// given. Returns them in index order, and the lowest QoS granted.
pub async fn connect_all(
    cfg: &Arc<RunConfig>,
    role: &'static str,
    n: u32,
    filters: Option<Arc<Vec<String>>>,
    slot0: usize,
) -> anyhow::Result<(Vec<Client>, QoS)> {
    let mut clients: Vec<Option<Client>> = (0..n).map(|_| None).collect();
    let mut granted = cfg.qos;
    let mut set = JoinSet::new();
    let mut next = 0u32;
    let opts = Arc::new(if role == "pub" {
        cfg.opts.for_publishers()
    } else {
        cfg.opts.clone()
    });
    loop {
        while next < n && set.len() < SETUP_CONCURRENCY_MAX {
            let (cfg, filters, i, opts) = (cfg.clone(), filters.clone(), next, opts.clone());
            set.spawn(async move {
                let id = cfg.client_id(role, i);
                // Only publishers write in bulk; a bounded send buffer keeps what
                // waits in the kernel small, so the send rate tracks what the broker
                // takes instead of how much the kernel would queue.
                let sndbuf = filters.is_none().then_some(cfg.sndbuf_bytes).flatten();
                let slot = slot0 + i as usize;
                let mut c = mqtt::connect(&opts, &id, slot, READ_CHUNK_BYTES, sndbuf).await?;
                let q = match &filters {
                    Some(f) => c.subscribe(&f[i as usize], cfg.qos).await?,
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
            .with_context(|| format!("setting up a {role} at {}", cfg.opts.brokers()))?;
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

/// Runs a message scenario and reports.
pub async fn run(cfg: RunConfig, plan: Plan) -> anyhow::Result<Report> {
    let cfg = Arc::new(cfg);
    let scenario = plan.scenario;
    let publishers = plan.pub_topics.len() as u32;
    let subscribers = plan.sub_filters.len() as u32;
    let hears = plan.hears();
    let group_of = plan.group_of();
    let live = Arc::new(Live::new(publishers));

    let filters = Arc::new(plan.sub_filters.clone());
    let (subs, granted) = connect_all(&cfg, "sub", subscribers, Some(filters), 0).await?;
    if granted < cfg.qos && subscribers > 0 {
        eprintln!(
            "bench {scenario}: the broker granted QoS {} for QoS {} subscriptions",
            granted as u8, cfg.qos as u8
        );
    }
    let (pubs, _) = connect_all(&cfg, "pub", publishers, None, subscribers as usize).await?;

    let t = cfg.timeline().await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .zip(&hears)
        .enumerate()
        .map(|(i, (c, hears))| {
            let accounting = if plan.open {
                Accounting::open()
            } else {
                Accounting::for_publishers(cfg.run_id, hears.clone())
            };
            tokio::spawn(run_subscriber(
                c,
                accounting,
                cfg.clone(),
                t,
                live.clone(),
                stop_rx.clone(),
                cfg.reconnect.then(|| Redial {
                    id: cfg.client_id("sub", i as u32),
                    slot: i,
                    filter: plan.sub_filters[i].clone(),
                }),
            ))
        })
        .collect();
    let pub_tasks: Vec<_> = pubs
        .into_iter()
        .zip(&plan.pub_topics)
        .enumerate()
        .map(|(i, (c, topic))| {
            let pp = PublisherPlan {
                id: i as u32,
                topic: Str::try_from(topic.as_str()).expect("the plan checked topics"),
                rate: plan.rate,
                retain: plan.retain,
                topic_alias: plan.topic_alias,
            };
            tokio::spawn(run_publisher(c, pp, cfg.clone(), t, live.clone()))
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
    if publishers == 0 {
        // `bench sub`: receive until the window ends or every subscriber had
        // --count messages.
        let want = cfg.count.saturating_mul(u64::from(subscribers));
        while clock::now_ns() < t.end_ns && live.received.load(Ordering::Relaxed) < want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let cpu = meter.stop();
    let rss_after = cfg.broker_pid.and_then(process_rss_bytes);

    let sent: Vec<u64> = pub_results.iter().map(|r| r.sent).collect();
    let sent_total: u64 = sent.iter().sum();
    let mut expected = 0u64;
    let mut group_counted = vec![false; plan.groups.len()];
    for (s, h) in hears.iter().enumerate() {
        if let Some(g) = group_of[s]
            && std::mem::replace(&mut group_counted[g as usize], true)
        {
            continue;
        }
        expected += h.iter().map(|&p| sent[p as usize]).sum::<u64>();
    }
    let drain = if publishers == 0 {
        None
    } else {
        Some(
            wait_for_deliveries(
                expected,
                || live.received.load(Ordering::Relaxed),
                DRAIN_QUIET,
                clock::now_ns() + cfg.drain_ns,
            )
            .await,
        )
    };
    let _ = stop_tx.send(true);
    let mut sub_results = Vec::with_capacity(sub_tasks.len());
    for task in sub_tasks {
        sub_results.push(task.await.expect("subscriber tasks do not panic"));
    }
    progress.abort();

    // The window closes when publishing ended: at the planned end, or earlier when
    // every publisher reached --count.
    let window_end_ns = if publishers == 0 {
        clock::now_ns().min(t.end_ns)
    } else if sent.iter().all(|&s| s >= cfg.count) {
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
    report.groups = (!plan.groups.is_empty()).then_some(plan.groups.len() as u32);
    report.granted_qos = (granted < cfg.qos && subscribers > 0).then_some(granted as u8);
    report.sent_count = sent_total;
    let sent_series = pub_series(&pub_results, &t);
    fill_deliveries(
        &mut report,
        &sent,
        &t,
        window_end_ns,
        &sent_series,
        &sub_results,
        &plan.groups,
    );
    if plan.topic_alias {
        report.topic_alias_count = Some(sub_results.iter().map(|s| s.aliased).sum());
    }
    report.drain = drain;
    report.bench_cpu_cores = cpu.bench_cores;
    report.broker_cpu_cores = cpu.broker_cores;
    report.broker_rss_before_bytes = rss_before;
    report.broker_rss_after_bytes = rss_after;
    report.error_count = live.errors.load(Ordering::Relaxed);
    report.errors = live.reasons();
    report.judge(None);
    Ok(report)
}

fn pub_series(results: &[PublisherResult], t: &Timeline) -> Series {
    let mut s = Series::new(t.start_ns, t.series_span_ns());
    for r in results {
        s.merge(&r.series);
    }
    s
}

/// Fills rates, accounting and latency from the publishers' merged series `sent_series`,
/// their counts `sent`, and the subscribers' results; the members of each of
/// `groups` (subscriber indices) are accounted together as one.
pub fn fill_deliveries(
    report: &mut Report,
    sent: &[u64],
    t: &Timeline,
    window_end_ns: u64,
    sent_series: &Series,
    subs: &[SubscriberResult],
    groups: &[Vec<u32>],
) {
    let mut tally = Tally::default();
    let mut latency = latency_histogram();
    let mut received = Series::new(t.start_ns, t.series_span_ns());
    let mut in_group = vec![false; subs.len()];
    for members in groups {
        let accountings: Vec<Accounting> = members
            .iter()
            .map(|&m| {
                in_group[m as usize] = true;
                subs[m as usize].accounting.clone()
            })
            .collect();
        tally += Accounting::union(&accountings).tally(sent);
    }
    for (i, s) in subs.iter().enumerate() {
        if !in_group[i] {
            tally += s.accounting.tally(sent);
        }
        latency.add(&s.latency).expect("histograms of one shape");
        received.merge(&s.series);
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
    if !subs.is_empty() {
        report.latency = Some(LatencySummary::of(&latency));
    }
    report.artifacts = Some(Box::new(crate::report::Artifacts {
        latency,
        send_lag: None,
        sent: Some(sent_series.clone()),
        received: Some(received),
    }));
}
