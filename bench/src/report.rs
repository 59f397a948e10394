//! The result of a run: one [`Report`], printed as a human summary and, with
//! `--json`, as one JSON object on the last line of stdout. Field names carry their
//! unit last (`_count`, `_msg_per_s`, `_us`, `_bytes`, `_cores`, `_s`); the README
//! documents each.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::run::Drain;
use crate::stats::LatencySummary;

/// Everything a run measured, and its verdict.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// `fanin`, `fanout`, `latency` or `conn`.
    pub scenario: &'static str,
    /// Broker address.
    pub broker: String,
    /// `tcp`, `tls` or `quic`.
    pub transport: &'static str,
    /// `3.1.1` or `5.0`.
    pub mqtt_version: String,
    /// QoS requested.
    pub qos: u8,
    /// Lowest QoS the broker granted a subscription, when lower than requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granted_qos: Option<u8>,
    /// Payload bytes per message.
    pub size_bytes: usize,
    /// Publishers (conn: 0).
    pub publishers: u32,
    /// Subscribers (conn: 0), shared-subscription members included.
    pub subscribers: u32,
    /// Shared: subscription groups (each message is expected once per group).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<u32>,
    /// With --topic-alias: deliveries that carried a topic alias.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_alias_count: Option<u64>,
    /// Warmup before the window.
    pub warmup_s: f64,
    /// Length of the measurement window the rates are over (conn: the hold time).
    pub window_s: f64,
    /// Messages published in the whole run, warmup included.
    pub sent_count: u64,
    /// Messages every subscriber should have received, summed over subscribers.
    pub expected_count: u64,
    /// Distinct messages received, summed over subscribers.
    pub received_count: u64,
    /// Publish rate in the window, all publishers.
    pub sent_msg_per_s: f64,
    /// Delivery rate in the window, all subscribers together (fan-out: publish rate
    /// times subscribers).
    pub received_msg_per_s: f64,
    /// How the wait for deliveries after publishing ended: `complete`, `quiet`
    /// (nothing more arrived for a second) or `deadline` (`--drain` ran out while
    /// messages were still arriving, so the loss may include messages still queued
    /// in the broker). Absent for `conn`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain: Option<Drain>,
    /// Expected messages never received.
    pub loss_count: u64,
    /// Messages received more than once (extra copies).
    pub duplicate_count: u64,
    /// Messages received after a later one of the same publisher.
    pub out_of_order_count: u64,
    /// Forward jumps in a publisher's sequence.
    pub gap_count: u64,
    /// Messages from another run on the same topics, ignored.
    pub foreign_count: u64,
    /// Messages whose payload is not a valid bench payload of this run.
    pub corrupt_count: u64,
    /// End-to-end latency from intended send time to arrival, messages sent in the
    /// window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencySummary>,
    /// Latency scenario: how late the paced publisher actually sent (the bench's own
    /// share of `latency`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag: Option<LatencySummary>,
    /// CPU this bench process used in the window, in cores.
    pub bench_cpu_cores: f64,
    /// CPU the broker used in the window, in cores (needs --broker-pid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_cpu_cores: Option<f64>,
    /// Broker resident memory before the run (needs --broker-pid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_before_bytes: Option<u64>,
    /// Broker resident memory at the end of the window / hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_after_bytes: Option<u64>,
    /// Conn: connections asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<u32>,
    /// Conn: connections established (CONNACK success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_count: Option<u64>,
    /// Conn: established connections lost during the hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_count: Option<u64>,
    /// Conn: achieved opening rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_per_s: Option<f64>,
    /// Conn: from starting to connect to CONNACK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_latency: Option<LatencySummary>,
    /// Conn: (RSS after - RSS before) / connections established.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_per_connection_bytes: Option<f64>,
    /// Conn: failed connects and drops during the hold, by reason.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, u64>,
    /// Errors while running (dropped clients, refused or unexpected packets).
    pub error_count: u64,
    /// Errors by reason.
    pub errors: BTreeMap<String, u64>,
    /// The loss allowed (absent: unlimited).
    pub max_loss: Option<u64>,
    /// True when no check failed.
    pub pass: bool,
    /// The checks that failed, in words.
    pub verdict: Vec<String>,
    /// Distributions behind the figures, for --hdr-out and --plot; not in JSON.
    #[serde(skip)]
    pub artifacts: Option<Box<Artifacts>>,
    /// `--procs` children only: the histograms behind `latency`, `send_lag` and
    /// `connect_latency` as (ns, count) pairs, for the parent to merge.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub histograms: BTreeMap<String, Vec<(u64, u64)>>,
}

/// The distributions a scenario measured.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// Latency of messages intended to be sent in the window, ns (conn: connect
    /// latency).
    pub latency: hdrhistogram::Histogram<u64>,
    /// Latency scenario: the paced publisher's lateness, ns.
    pub send_lag: Option<hdrhistogram::Histogram<u64>>,
    /// Messages published over time, all publishers (message scenarios).
    pub sent: Option<crate::stats::Series>,
    /// Messages received over time, all subscribers (message scenarios).
    pub received: Option<crate::stats::Series>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn latency_line(out: &mut String, name: &str, l: &LatencySummary) {
    let _ = writeln!(
        out,
        "  {name:<16} p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  max {:.1} µs  ({} samples)",
        l.p50_us, l.p99_us, l.p999_us, l.max_us, l.count
    );
}

impl Report {
    /// Sets `pass` and `verdict` from the checks every scenario shares.
    pub fn judge(&mut self, max_failures: Option<u64>) {
        let mut v = Vec::new();
        if let Some(max) = self.max_loss
            && self.loss_count > max
        {
            let why = match (self.drain, self.qos) {
                (Some(Drain::Deadline), _) => {
                    "; --drain ran out while deliveries were still arriving"
                }
                // At QoS 1/2 a publisher finishes only once every message it sent
                // is acknowledged, so without errors the broker accepted them all.
                (_, 1 | 2) if self.error_count == 0 => "; every one was acknowledged by the broker",
                _ => "",
            };
            v.push(format!(
                "lost {} of {} messages (--max-loss {max}){why}",
                self.loss_count, self.expected_count
            ));
        }
        if self.qos == 2 && self.duplicate_count > 0 {
            v.push(format!(
                "{} duplicates at QoS 2 (exactly once)",
                self.duplicate_count
            ));
        }
        if self.corrupt_count > 0 {
            v.push(format!("{} corrupt messages", self.corrupt_count));
        }
        if self.error_count > 0 {
            v.push(format!("{} errors during the run", self.error_count));
        }
        if let Some(max) = max_failures {
            let failed: u64 = self.failures.values().sum();
            if failed > max {
                v.push(format!(
                    "{failed} connections failed or dropped (--max-failures {max})"
                ));
            }
        }
        self.pass = v.is_empty();
        self.verdict = v;
    }

    /// The human summary, several lines.
    pub fn summary(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "bench {}: broker {} ({}) MQTT {} QoS {}{}",
            self.scenario,
            self.broker,
            self.transport,
            self.mqtt_version,
            self.qos,
            self.granted_qos
                .map(|q| format!(" (granted {q})"))
                .unwrap_or_default()
        );
        if self.scenario == "conn" {
            let _ = writeln!(
                o,
                "  connections      {} of {} established at {:.0}/s, {} dropped during a {:.1} s hold",
                self.connected_count.unwrap_or(0),
                self.clients.unwrap_or(0),
                self.connect_per_s.unwrap_or(0.0),
                self.dropped_count.unwrap_or(0),
                self.window_s
            );
            if let Some(l) = &self.connect_latency {
                latency_line(&mut o, "connect", l);
            }
            for (reason, n) in &self.failures {
                let _ = writeln!(o, "  failed           {n} x {reason}");
            }
            if let (Some(a), Some(b)) = (self.broker_rss_before_bytes, self.broker_rss_after_bytes)
            {
                let _ = writeln!(
                    o,
                    "  broker RSS       {:.1} MiB -> {:.1} MiB, {:.0} bytes per connection",
                    mib(a),
                    mib(b),
                    self.broker_rss_per_connection_bytes.unwrap_or(0.0)
                );
            }
        } else {
            let _ = writeln!(
                o,
                "  clients          {} publishers, {} subscribers{}, {} B payload, window {:.2} s after {:.1} s warmup",
                self.publishers,
                self.subscribers,
                self.groups
                    .map(|g| format!(" in {g} shared groups"))
                    .unwrap_or_default(),
                self.size_bytes,
                self.window_s,
                self.warmup_s
            );
            let _ = writeln!(
                o,
                "  rate             sent {:.0} msg/s, received {:.0} msg/s",
                self.sent_msg_per_s, self.received_msg_per_s
            );
            let _ = writeln!(
                o,
                "  accounting       sent {}, expected {}, received {}, lost {}, duplicates {}, out of order {}",
                self.sent_count,
                self.expected_count,
                self.received_count,
                self.loss_count,
                self.duplicate_count,
                self.out_of_order_count
            );
            if let Some(n) = self.topic_alias_count {
                let _ = writeln!(o, "  topic aliases    {n} deliveries used a topic alias");
            }
            if self.drain == Some(Drain::Deadline) {
                let _ = writeln!(
                    o,
                    "  drain            --drain ran out while deliveries were still arriving: the loss may include messages still queued in the broker"
                );
            }
            if let Some(l) = &self.latency {
                latency_line(&mut o, "latency", l);
            }
            if let Some(l) = &self.send_lag {
                latency_line(&mut o, "send lag", l);
            }
            if let (Some(a), Some(b)) = (self.broker_rss_before_bytes, self.broker_rss_after_bytes)
            {
                let _ = writeln!(
                    o,
                    "  broker RSS       {:.1} MiB -> {:.1} MiB",
                    mib(a),
                    mib(b)
                );
            }
        }
        let _ = writeln!(
            o,
            "  cpu              bench {:.2} cores{}",
            self.bench_cpu_cores,
            self.broker_cpu_cores
                .map(|c| format!(", broker {c:.2} cores"))
                .unwrap_or_default()
        );
        for (reason, n) in &self.errors {
            let _ = writeln!(o, "  error            {n} x {reason}");
        }
        if self.pass {
            let _ = writeln!(o, "  PASS");
        } else {
            for v in &self.verdict {
                let _ = writeln!(o, "  FAIL: {v}");
            }
        }
        o
    }

    /// The JSON line.
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("a report always serializes")
    }
}
