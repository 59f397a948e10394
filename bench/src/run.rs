//! What every scenario shares: the settings of a run ([`RunConfig`], from the CLI),
//! its timeline ([`Timeline`]), and the report fields common to all scenarios.

use std::time::Duration;

use tessera_proto::QoS;

use crate::clock;
use crate::mqtt::Options;
use crate::report::Report;

/// Delay between the end of setup (of every `--procs` child) and the first message, so every publisher task
/// is parked on its start time when it comes.
pub const START_DELAY_NS: u64 = 50_000_000;

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// How clients connect.
    pub opts: Options,
    /// QoS of publications and subscriptions.
    pub qos: QoS,
    /// Payload bytes.
    pub size: usize,
    /// Warmup before the measurement window.
    pub warmup_ns: u64,
    /// Measurement window (conn: hold time).
    pub duration_ns: u64,
    /// Messages per publisher at most (`u64::MAX` without `--count`).
    pub count: u64,
    /// QoS 1/2 window per publisher.
    pub inflight: u16,
    /// Bytes a publisher holds that the kernel has not accepted.
    pub inflight_bytes: usize,
    /// `SO_SNDBUF` of max-rate publishers; `None` leaves it to the kernel.
    pub sndbuf_bytes: Option<u32>,
    /// Time allowed after the publishers stop.
    pub drain_ns: u64,
    /// Tells this run's messages from another run's.
    pub run_id: u32,
    /// The broker's pid, for CPU and RSS.
    pub broker_pid: Option<u32>,
    /// First level of every topic.
    pub topic_prefix: String,
    /// Loss allowed before the run fails.
    pub max_loss: Option<u64>,
    /// Client ids are `PREFIX-ROLE-INDEX`.
    pub client_id_prefix: String,
    /// A `--procs` child: start at its parent's signal.
    pub child: bool,
    /// `--reconnect`: subscribers connect again after a lost connection.
    pub reconnect: bool,
}

impl RunConfig {
    /// The report fields every scenario fills the same way.
    pub fn report(&self, scenario: &'static str) -> Report {
        Report {
            scenario,
            broker: self.opts.brokers(),
            transport: match &self.opts.tls {
                Some(t) if t.is_quic() => "quic",
                Some(_) => "tls",
                None => "tcp",
            },
            mqtt_version: self.opts.version.to_string(),
            qos: self.qos as u8,
            size_bytes: self.size,
            warmup_s: self.warmup_ns as f64 / 1e9,
            max_loss: self.max_loss,
            ..Report::default()
        }
    }

    /// The client id of client `index` of `role` (`pub`, `sub`, `conn`).
    pub fn client_id(&self, role: &str, index: u32) -> String {
        format!("{}-{role}-{index}", self.client_id_prefix)
    }

    /// The timeline of a run whose setup is done now. A `--procs` child first
    /// tells its parent it is ready and takes the common start time from it.
    pub async fn timeline(&self) -> anyhow::Result<Timeline> {
        let start_ns = if self.child {
            tokio::task::spawn_blocking(crate::procs::child_ready_wait_start)
                .await
                .expect("the barrier thread does not panic")?
        } else {
            clock::now_ns() + START_DELAY_NS
        };
        let warm_ns = start_ns + self.warmup_ns;
        let end_ns = warm_ns + self.duration_ns;
        Ok(Timeline {
            start_ns,
            warm_ns,
            end_ns,
            drain_end_ns: end_ns + self.drain_ns,
        })
    }

    /// The publish packet identifier window, clamped to what the broker accepts.
    pub fn window(&self, receive_maximum: u16) -> usize {
        usize::from(self.inflight.min(receive_maximum).max(1))
    }
}

/// When a run's phases begin, on the bench clock ([`clock::now_ns`]).
#[derive(Debug, Clone, Copy)]
pub struct Timeline {
    /// The first message.
    pub start_ns: u64,
    /// The measurement window opens.
    pub warm_ns: u64,
    /// Publishers stop (unless `--count` stops them earlier).
    pub end_ns: u64,
    /// Acknowledgements and deliveries are no longer waited for.
    pub drain_end_ns: u64,
}

impl Timeline {
    /// The span a [`crate::stats::Series`] of this run covers.
    pub fn series_span_ns(&self) -> u64 {
        self.drain_end_ns - self.start_ns + 1_000_000_000
    }
}

/// Sleeps (on tokio) until the bench clock reads `ns`.
pub async fn sleep_until_ns(ns: u64) {
    tokio::time::sleep_until(clock::instant_at(ns).into()).await;
}

/// How the wait for deliveries after publishing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Drain {
    /// Every expected delivery arrived.
    Complete,
    /// Deliveries stopped arriving: what is missing is lost.
    Quiet,
    /// `--drain` ran out while deliveries were still arriving: some of the loss
    /// may be messages still queued in the broker.
    Deadline,
}

/// How long arrivals must pause, once as many arrived as expected, before the
/// drain ends: a broker that delivers copies (to two members of a shared group,
/// say) reaches the expected count before every distinct message arrived, and
/// stopping right then would count the late ones as lost.
pub const SETTLE_AFTER_EXPECTED: Duration = Duration::from_millis(100);

/// Waits until `received()` reaches `expected` and then stays still for
/// [`SETTLE_AFTER_EXPECTED`], no progress was made for `quiet`, or the clock
/// passes `deadline_ns`, whichever comes first.
pub async fn wait_for_deliveries(
    expected: u64,
    received: impl Fn() -> u64,
    quiet: Duration,
    deadline_ns: u64,
) -> Drain {
    let poll = Duration::from_millis(10);
    let mut last = received();
    let mut last_change = tokio::time::Instant::now();
    loop {
        if last >= expected && last_change.elapsed() >= SETTLE_AFTER_EXPECTED.min(quiet) {
            // More arrivals than expected are copies: the run goes on to count
            // them, and the drain is complete only without them.
            return if last == expected {
                Drain::Complete
            } else {
                Drain::Quiet
            };
        }
        if last_change.elapsed() >= quiet {
            return Drain::Quiet;
        }
        if clock::now_ns() >= deadline_ns {
            return Drain::Deadline;
        }
        tokio::time::sleep(poll).await;
        let now = received();
        if now != last {
            last = now;
            last_change = tokio::time::Instant::now();
        }
    }
}
