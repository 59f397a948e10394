//! The `latency` scenario: one publisher at a fixed rate, one subscriber, and the
//! latency of each message measured from its *intended* send time, so a stall of
//! the broker (or of the bench) shows up in every message it delays, not just the
//! one that met it (coordinated omission).
//!
//! The publisher is a blocking thread, not a tokio task: tokio's timer has 1 ms
//! resolution, which at 1,000 msg/s would add up to a whole period of jitter to
//! every message. The thread sleeps with a 1 ns timer slack and spins the last
//! tens of microseconds ([`crate::sys::sleep_until_precise`]), and the report
//! gives its actual lateness (`send_lag`) so the bench's own share is visible.
//! The subscriber is the same tokio task as in the throughput scenarios.
//!
//! [`Mode::BusyPoll`] (`--busy-poll`) instead runs the publisher and the
//! subscriber on one thread that polls both sockets, so the bench's own
//! wake-up is not counted against the broker; with a lead
//! (`--busy-poll-lead`) that thread sleeps once every message sent was
//! delivered, until the lead before the next send.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use bytes::BytesMut;
use hdrhistogram::Histogram;
use tessera_proto::{ProtocolVersion, Publish, QoS, Str, decode};
use tokio::sync::watch;

use crate::accounting::Accounting;
use crate::clock;
use crate::mqtt::{self, BlockingClient, Failure, PACKET_BYTES_MAX};
use crate::payload::Header;
use crate::publisher::on_publisher_packet;
use crate::report::Report;
use crate::run::{
    Drain, RunConfig, SETTLE_AFTER_EXPECTED, Timeline, sleep_until_ns, wait_for_deliveries,
};
use crate::stats::{
    LatencySummary, Live, ProgressLabels, Series, latency_histogram, record_ns, spawn_progress,
};
use crate::subscriber::{Deliveries, SubscriberResult, run_subscriber};
use crate::sys::{self, CpuMeter, CpuUse, process_rss_bytes};
use crate::throughput::{connect_all, fill_deliveries};
use crate::window::Window;

/// How long deliveries may pause before the drain stops waiting for more.
const DRAIN_QUIET: Duration = Duration::from_secs(1);

/// What the paced publisher did.
#[derive(Debug)]
struct PacedResult {
    sent: u64,
    last_ns: u64,
    series: Series,
    /// Actual send time minus intended send time, ns, for messages in the window.
    lag: Histogram<u64>,
}

impl PacedResult {
    /// Nothing sent yet.
    fn new(t: &Timeline) -> PacedResult {
        PacedResult {
            sent: 0,
            last_ns: t.start_ns,
            series: Series::new(t.start_ns, t.series_span_ns()),
            lag: latency_histogram(),
        }
    }

    /// Encodes the next message, due at `intended_ns`, into `out` (cleared
    /// first), taking a packet id from `window` (which must have room).
    fn encode_next(
        &self,
        cfg: &RunConfig,
        topic: &Str,
        intended_ns: u64,
        window: &mut Option<Window>,
        version: ProtocolVersion,
        out: &mut BytesMut,
    ) {
        let mut payload = BytesMut::with_capacity(cfg.size);
        Header {
            run_id: cfg.run_id,
            publisher: 0,
            seq: self.sent,
            intended_ns,
        }
        .put(cfg.size, &mut payload);
        let packet_id = window
            .as_mut()
            .map_or(0, |w| w.allocate().expect("room was checked"));
        let publish = Publish {
            qos: cfg.qos,
            packet_id,
            ..Publish::new(topic.clone(), payload.freeze())
        };
        out.clear();
        mqtt::put(&publish, version, out);
    }

    /// Accounts for the message due at `intended_ns`, written just now.
    fn record_sent(&mut self, intended_ns: u64, t: &Timeline, live: &Live) {
        let sent_ns = clock::now_ns();
        if intended_ns >= t.warm_ns {
            record_ns(&mut self.lag, sent_ns.saturating_sub(intended_ns));
        }
        self.series.add(intended_ns, 1);
        self.sent += 1;
        self.last_ns = intended_ns;
        live.sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// How the bench waits for deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A publisher thread and a tokio subscriber that sleep between messages.
    Sleeping,
    /// One thread that polls both sockets. With `lead`, it sleeps once every
    /// message sent so far was delivered, until `lead` before the
    /// next send is due.
    BusyPoll { lead: Option<Duration> },
}

/// Runs `latency` at `rate` messages per second and reports.
pub async fn run(cfg: RunConfig, rate: f64, mode: Mode) -> anyhow::Result<Report> {
    if let Mode::BusyPoll { lead } = mode {
        return run_busy_poll(cfg, rate, lead).await;
    }
    let cfg = Arc::new(cfg);
    let live = Arc::new(Live::new(1));
    let topic = format!("{}/0", cfg.topic_prefix);
    let filters = Arc::new(vec![topic.clone()]);
    let (mut subs, granted) = connect_all(&cfg, "sub", 1, Some(filters), 0).await?;
    let (opts, id) = (cfg.opts.for_publishers(), cfg.client_id("pub", 0));
    // Slot 1: the subscriber took slot 0, so two --host or --bind entries
    // spread the pair.
    let publisher = tokio::task::spawn_blocking(move || mqtt::connect_blocking(&opts, &id, 1))
        .await
        .expect("the connect thread does not panic")
        .with_context(|| format!("setting up the publisher at {}", cfg.opts.addr(1)))?;

    let t = cfg.timeline().await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let sub_task = tokio::spawn(run_subscriber(
        subs.pop().expect("one subscriber"),
        Accounting::new(cfg.run_id, 1),
        cfg.clone(),
        t,
        live.clone(),
        stop_rx,
        None,
    ));
    let pub_task = {
        let (cfg, live) = (cfg.clone(), live.clone());
        let topic = Str::try_from(topic).expect("valid topic");
        tokio::task::spawn_blocking(move || paced_publisher(publisher, topic, rate, &cfg, t, &live))
    };
    let progress = spawn_progress("latency", live.clone(), ProgressLabels::Messages);

    let rss_before = cfg.broker_pid.and_then(process_rss_bytes);
    sleep_until_ns(t.warm_ns).await;
    let meter = CpuMeter::start(cfg.broker_pid);
    let paced = pub_task.await.expect("the publisher thread does not panic");
    let cpu = meter.stop();
    let rss_after = cfg.broker_pid.and_then(process_rss_bytes);
    let drain = wait_for_deliveries(
        paced.sent,
        || live.received.load(Ordering::Relaxed),
        DRAIN_QUIET,
        clock::now_ns() + cfg.drain_ns,
    )
    .await;
    let _ = stop_tx.send(true);
    let sub = sub_task.await.expect("subscriber tasks do not panic");
    progress.abort();

    Ok(finish(
        &cfg, &t, paced, sub, granted, drain, cpu, rss_before, rss_after, &live,
    ))
}

/// The report of a latency run.
#[allow(clippy::too_many_arguments)]
fn finish(
    cfg: &RunConfig,
    t: &Timeline,
    paced: PacedResult,
    sub: SubscriberResult,
    granted: QoS,
    drain: Drain,
    cpu: CpuUse,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
    live: &Live,
) -> Report {
    let window_end_ns = if paced.sent >= cfg.count {
        paced.last_ns + 1
    } else {
        t.end_ns
    };
    let mut report = cfg.report("latency");
    report.publishers = 1;
    report.subscribers = 1;
    report.granted_qos = (granted < cfg.qos).then_some(granted as u8);
    report.sent_count = paced.sent;
    fill_deliveries(
        &mut report,
        &[paced.sent],
        t,
        window_end_ns,
        &paced.series,
        std::slice::from_ref(&sub),
        &[],
    );
    report.send_lag = Some(LatencySummary::of(&paced.lag));
    if let Some(a) = report.artifacts.as_mut() {
        a.send_lag = Some(paced.lag.clone());
    }
    report.drain = Some(drain);
    report.bench_cpu_cores = cpu.bench_cores;
    report.broker_cpu_cores = cpu.broker_cores;
    report.broker_rss_before_bytes = rss_before;
    report.broker_rss_after_bytes = rss_after;
    report.error_count = live.errors.load(Ordering::Relaxed);
    report.errors = live.reasons();
    report.judge(None);
    report
}

/// `--busy-poll`: the publisher and the subscriber are one thread that never
/// sleeps. Sends are due as in [`paced_publisher`], and between them the
/// thread polls both sockets without blocking, so a delivery is read the moment
/// it arrives instead of after the bench's own wake-up (a sleeping thread on a
/// virtual machine can take tens of microseconds to run again, and that time
/// would be counted against the broker). It costs the bench one busy core,
/// unless `lead` lets it rest between messages.
async fn run_busy_poll(
    cfg: RunConfig,
    rate: f64,
    lead: Option<Duration>,
) -> anyhow::Result<Report> {
    let cfg = Arc::new(cfg);
    let live = Arc::new(Live::new(1));
    let topic = format!("{}/0", cfg.topic_prefix);
    let (sub, granted, publisher) = {
        let (cfg, topic) = (cfg.clone(), topic.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let id = cfg.client_id("sub", 0);
            let mut sub = mqtt::connect_blocking(&cfg.opts, &id, 0)
                .with_context(|| format!("setting up the subscriber at {}", cfg.opts.addr(0)))?;
            let granted = sub
                .subscribe(&topic, cfg.qos)
                .with_context(|| format!("subscribing to {topic}"))?;
            let id = cfg.client_id("pub", 0);
            let publisher = mqtt::connect_blocking(&cfg.opts, &id, 1)
                .with_context(|| format!("setting up the publisher at {}", cfg.opts.addr(1)))?;
            Ok((sub, granted, publisher))
        })
        .await
        .expect("the connect thread does not panic")?
    };
    let t = cfg.timeline().await?;
    let pair = {
        let (cfg, live) = (cfg.clone(), live.clone());
        let topic = Str::try_from(topic).expect("valid topic");
        tokio::task::spawn_blocking(move || {
            busy_pair(publisher, sub, topic, rate, lead, &cfg, t, &live)
        })
    };
    let progress = spawn_progress("latency", live.clone(), ProgressLabels::Messages);
    let rss_before = cfg.broker_pid.and_then(process_rss_bytes);
    sleep_until_ns(t.warm_ns).await;
    let meter = CpuMeter::start(cfg.broker_pid);
    let (paced, sub) = pair.await.expect("the busy-poll thread does not panic");
    let cpu = meter.stop();
    let rss_after = cfg.broker_pid.and_then(process_rss_bytes);
    // The thread drained already; this only classifies what it saw.
    let drain = wait_for_deliveries(
        paced.sent,
        || live.received.load(Ordering::Relaxed),
        Duration::ZERO,
        clock::now_ns(),
    )
    .await;
    progress.abort();
    Ok(finish(
        &cfg, &t, paced, sub, granted, drain, cpu, rss_before, rss_after, &live,
    ))
}

/// The busy-polling thread of `--busy-poll`: publishes on schedule, reads and
/// acknowledges deliveries, and drains them after the last send. With `lead`
/// it sleeps while nothing is outstanding, until `lead` before the next send.
#[allow(clippy::too_many_arguments)]
fn busy_pair(
    mut c: BlockingClient,
    mut s: BlockingClient,
    topic: Str,
    rate: f64,
    lead: Option<Duration>,
    cfg: &RunConfig,
    t: Timeline,
    live: &Live,
) -> (PacedResult, SubscriberResult) {
    let version = c.version;
    let mut window = publisher_window(cfg, &c);
    let period_ns = 1e9 / rate;
    let mut r = PacedResult::new(&t);
    let mut deliveries = Deliveries::new(Accounting::new(cfg.run_id, 1), cfg, t);
    let (mut out, mut acks, mut sub_out) = (BytesMut::new(), BytesMut::new(), BytesMut::new());
    let ping_every_ns = u64::from(cfg.opts.keep_alive_s) * 500_000_000;
    let mut run = || -> Result<(), Failure> {
        c.stream.set_nonblocking(true)?;
        s.stream.set_nonblocking(true)?;
        let mut next_ping_ns = clock::now_ns() + ping_every_ns;
        let mut publishing = true;
        let mut settled_since: Option<u64> = None;
        let mut last_arrival_ns = clock::now_ns();
        loop {
            let now_ns = clock::now_ns();
            if publishing {
                let intended_ns = t.start_ns + (r.sent as f64 * period_ns) as u64;
                if intended_ns >= t.end_ns || r.sent >= cfg.count {
                    publishing = false;
                    last_arrival_ns = now_ns;
                } else if now_ns >= intended_ns && window.as_ref().is_none_or(|w| w.room() > 0) {
                    r.encode_next(cfg, &topic, intended_ns, &mut window, version, &mut out);
                    live.set_produced(0, r.sent + 1);
                    write_spinning(&mut c, &out)?;
                    r.record_sent(intended_ns, &t, live);
                }
            }
            if s.read_nonblocking()? > 0 {
                let arrival_ns = clock::now_ns();
                last_arrival_ns = arrival_ns;
                deliveries.take(
                    &mut s.rbuf,
                    version,
                    arrival_ns,
                    cfg,
                    &t,
                    live,
                    &mut sub_out,
                )?;
                if !sub_out.is_empty() {
                    write_spinning(&mut s, &sub_out)?;
                    sub_out.clear();
                }
            }
            if c.read_nonblocking()? > 0 {
                process_acks(&mut c, &mut window, &mut acks, live, write_spinning)?;
            }
            if now_ns >= next_ping_ns {
                for client in [&mut c, &mut s] {
                    acks.clear();
                    mqtt::put(&tessera_proto::Packet::PingReq, version, &mut acks);
                    write_spinning(client, &acks)?;
                }
                acks.clear();
                next_ping_ns = now_ns + ping_every_ns;
            }
            if let Some(lead) = lead
                && publishing
            {
                // Rest only when every message sent so far has arrived: a
                // delivery is never waited for while asleep. The publisher's
                // acknowledgements may come later (Mosquitto's PUBACK waits for
                // Nagle's algorithm, so one is outstanding most of the time);
                // they are read on waking, and the window has room for that.
                let settled = live.received.load(Ordering::Relaxed) >= r.sent;
                let next_ns = t.start_ns + (r.sent as f64 * period_ns) as u64;
                let wake_ns = next_ns.saturating_sub(lead.as_nanos() as u64);
                let now_ns = clock::now_ns();
                if settled && wake_ns > now_ns {
                    std::thread::sleep(Duration::from_nanos(wake_ns - now_ns));
                    continue;
                }
            }
            if !publishing {
                // Drained: every message arrived and nothing more came for a
                // while (more would be duplicates, which are counted), the
                // deliveries went quiet, or the drain deadline passed.
                let acked = window.as_ref().is_none_or(|w| w.in_flight() == 0);
                let received = live.received.load(Ordering::Relaxed);
                settled_since = match settled_since {
                    None if received >= r.sent && acked => Some(now_ns),
                    s => s,
                };
                let settled = settled_since.is_some_and(|at| {
                    now_ns.saturating_sub(at) >= SETTLE_AFTER_EXPECTED.as_nanos() as u64
                });
                let quiet = now_ns.saturating_sub(last_arrival_ns) >= DRAIN_QUIET.as_nanos() as u64;
                if settled || quiet {
                    return Ok(());
                }
                if now_ns > t.drain_end_ns {
                    return Err(Failure::Timeout);
                }
            }
            std::hint::spin_loop();
        }
    };
    let failure = run().err();
    let _ = c.stream.set_nonblocking(false);
    let _ = s.stream.set_nonblocking(false);
    if let Some(f) = &failure {
        live.error(format!("busy-poll: {f}"));
    }
    let mut bye = BytesMut::new();
    mqtt::put(
        &tessera_proto::Disconnect::new(tessera_proto::ReasonCode::Success),
        version,
        &mut bye,
    );
    for client in [&mut c, &mut s] {
        use std::io::Write as _;
        let _ = client
            .stream
            .write_all(&bye)
            .and_then(|()| client.stream.flush());
        let _ = client.stream.shutdown_write();
    }
    (r, deliveries.finish(failure))
}

/// Writes all of `bytes` to a non-blocking socket, spinning while it is full.
fn write_spinning(c: &mut BlockingClient, bytes: &[u8]) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut rest = bytes;
    while !rest.is_empty() {
        match c.stream.write(rest) {
            Ok(0) => return Err(Failure::Closed),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e.into()),
        }
    }
    loop {
        match c.stream.flush() {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Decodes what the broker sent the publisher and writes any PUBREL it calls
/// for with `write` ([`write_blocking`] or [`write_spinning`]).
fn process_acks(
    c: &mut BlockingClient,
    window: &mut Option<Window>,
    out: &mut BytesMut,
    live: &Live,
    write: fn(&mut BlockingClient, &[u8]) -> Result<(), Failure>,
) -> Result<(), Failure> {
    while let Some(p) = decode(&mut c.rbuf, c.version, PACKET_BYTES_MAX)? {
        on_publisher_packet(p, window, c.version, out, live)?;
    }
    if !out.is_empty() {
        write(c, out)?;
        out.clear();
    }
    Ok(())
}

/// The paced publisher's window of unacknowledged messages (none at QoS 0).
fn publisher_window(cfg: &RunConfig, c: &BlockingClient) -> Option<Window> {
    match cfg.qos {
        QoS::AtMostOnce => None,
        qos => Some(Window::new(qos, cfg.window(c.granted.receive_maximum))),
    }
}

/// Writes all of `bytes` to a blocking socket (bounded by its write timeout).
fn write_blocking(c: &mut BlockingClient, bytes: &[u8]) -> Result<(), Failure> {
    use std::io::Write as _;
    c.stream.write_all(bytes)?;
    c.stream.flush()?;
    Ok(())
}

/// The paced publisher thread: message `i` is due at `start + i / rate`.
fn paced_publisher(
    mut c: BlockingClient,
    topic: Str,
    rate: f64,
    cfg: &RunConfig,
    t: Timeline,
    live: &Live,
) -> PacedResult {
    use std::io::Write as _;
    sys::tighten_timer_slack();
    let version = c.version;
    let mut window = publisher_window(cfg, &c);
    let period_ns = 1e9 / rate;
    let mut r = PacedResult::new(&t);
    let mut out = BytesMut::new();
    let mut acks = BytesMut::new();
    let mut run = || -> Result<(), Failure> {
        loop {
            let intended_ns = t.start_ns + (r.sent as f64 * period_ns) as u64;
            if intended_ns >= t.end_ns || r.sent >= cfg.count {
                break;
            }
            while window.as_ref().is_some_and(|w| w.room() == 0) {
                if clock::now_ns() > t.drain_end_ns {
                    return Err(Failure::Timeout);
                }
                c.read_some()?;
                process_acks(&mut c, &mut window, &mut acks, live, write_blocking)?;
            }
            r.encode_next(cfg, &topic, intended_ns, &mut window, version, &mut out);
            live.set_produced(0, r.sent + 1);
            sys::sleep_until_precise(clock::instant_at(intended_ns));
            c.stream.write_all(&out)?;
            c.stream.flush()?;
            r.record_sent(intended_ns, &t, live);
            // Acknowledgements, and a DISCONNECT at QoS 0, are read between sends.
            c.read_ready()?;
            process_acks(&mut c, &mut window, &mut acks, live, write_blocking)?;
        }
        while window.as_ref().is_some_and(|w| w.in_flight() > 0) {
            if clock::now_ns() > t.drain_end_ns {
                return Err(Failure::Timeout);
            }
            c.read_some()?;
            process_acks(&mut c, &mut window, &mut acks, live, write_blocking)?;
        }
        Ok(())
    };
    match run() {
        Ok(()) => {
            let mut bye = BytesMut::new();
            mqtt::put(
                &tessera_proto::Disconnect::new(tessera_proto::ReasonCode::Success),
                version,
                &mut bye,
            );
            let _ = c.stream.write_all(&bye).and_then(|()| c.stream.flush());
            let _ = c.stream.shutdown_write();
        }
        Err(f) => live.error(format!("publisher: {f}")),
    }
    r
}
