//! MQTT bridges: what is shared between the shards, the admin thread and the
//! SIGHUP handler. The bridge itself runs on a shard (`server::bridge`).
//!
//! A bridge is a client of two brokers at once. On its ClientID's owner shard
//! it holds a *local* persistent session in the engine, attached through a
//! connection without a socket, and an MQTT client connection to the remote.
//! Packets are relayed between the two with the same packet identifiers, so
//! the local session's stored in-flight window is the bridge's: an `out`
//! message is acknowledged to the local session (and leaves its queue) only
//! when the remote acknowledged it, and is resent with DUP after a link outage
//! or a restart of either side; an `in` message is acknowledged to the remote
//! only when the local engine acknowledged it (after its commit under `sync`
//! durability, and after back-pressure released it). While the link is down
//! the local session is detached, so `out` messages queue in the store like
//! any persistent session's (same budget and refusal policy).
//!
//! [`BridgeHub`] holds the configured bridges (replaced on SIGHUP; each shard
//! notices the new generation at its tick and starts, restarts or stops the
//! bridges it owns) and each bridge's counters ([`BridgeStats`]) for
//! `/metrics`, `/api/v1/bridges` and `brokerctl bridges`. Counters are atomics
//! written by the one shard that runs the bridge; the locks here are taken on
//! reload, on errors and by the admin thread, never per message.

pub mod quic;
pub mod stream;
pub mod ws;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tessera_proto::{Str, topic};

use crate::config::BridgeConfig;
use crate::config::bridge::RuleConfig;

/// The configured bridges and their counters.
#[derive(Debug)]
pub struct BridgeHub {
    generation: AtomicU64,
    configs: Mutex<Arc<[Arc<BridgeConfig>]>>,
    stats: Mutex<Vec<(String, Arc<BridgeStats>)>>,
}

impl BridgeHub {
    /// A hub running `configs` (already validated).
    pub fn new(configs: &[BridgeConfig]) -> Arc<BridgeHub> {
        let hub = BridgeHub {
            generation: AtomicU64::new(1),
            configs: Mutex::new(Arc::from(Vec::new())),
            stats: Mutex::new(Vec::new()),
        };
        hub.set(configs);
        Arc::new(hub)
    }

    fn set(&self, configs: &[BridgeConfig]) {
        let list: Vec<Arc<BridgeConfig>> = configs.iter().cloned().map(Arc::new).collect();
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.retain(|(name, _)| configs.iter().any(|c| &c.name == name));
        for c in configs {
            if !stats.iter().any(|(n, _)| n == &c.name) {
                stats.push((c.name.clone(), Arc::new(BridgeStats::default())));
            }
        }
        *self.configs.lock().unwrap_or_else(|e| e.into_inner()) = Arc::from(list);
    }

    /// Replaces the bridges (SIGHUP). Bridges whose table did not change keep
    /// running; the others restart or stop at the owner shards' next tick.
    pub fn replace(&self, configs: &[BridgeConfig]) {
        self.set(configs);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Changes with every [`BridgeHub::replace`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The bridges in force.
    pub fn snapshot(&self) -> Arc<[Arc<BridgeConfig>]> {
        self.configs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The counters of bridge `name` (created when missing).
    pub fn stats(&self, name: &str) -> Arc<BridgeStats> {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = stats.iter().find(|(n, _)| n == name) {
            return s.clone();
        }
        let s = Arc::new(BridgeStats::default());
        stats.push((name.to_owned(), s.clone()));
        s
    }

    /// Every configured bridge with its counters, in config order.
    pub fn report(&self) -> Vec<(Arc<BridgeConfig>, Arc<BridgeStats>)> {
        self.snapshot()
            .iter()
            .map(|c| (c.clone(), self.stats(&c.name)))
            .collect()
    }

    /// `/api/v1/bridges`.
    pub fn json(&self) -> Value {
        let items: Vec<Value> = self
            .report()
            .iter()
            .map(|(c, s)| {
                json!({
                    "name": c.name,
                    "address": c.address,
                    "transport": c.transport,
                    "version": c.version,
                    "client_id": c.client_id(),
                    "shard": s.shard.load(Ordering::Relaxed),
                    "connected": s.connected.load(Ordering::Relaxed),
                    "queued": s.queued.load(Ordering::Relaxed),
                    "in_flight": s.in_flight.load(Ordering::Relaxed),
                    "sent": s.sent.load(Ordering::Relaxed),
                    "received": s.received.load(Ordering::Relaxed),
                    "dropped": s.dropped.load(Ordering::Relaxed),
                    "connects": s.connects.load(Ordering::Relaxed),
                    "connect_failures": s.failures.load(Ordering::Relaxed),
                    "last_error": s.last_error(),
                    "out_rules": c.out_rules.len(),
                    "in_rules": c.in_rules.len(),
                })
            })
            .collect();
        json!({ "items": items })
    }
}

/// The bridge metrics of `/metrics`, appended to `out` (Prometheus text);
/// nothing without bridges. Names and labels: ops/README.md.
pub fn render_metrics(hub: &BridgeHub, out: &mut String) {
    use std::fmt::Write as _;
    let report = hub.report();
    if report.is_empty() {
        return;
    }
    type Field = fn(&BridgeStats) -> u64;
    let families: [(&str, &str, &str, Field); 8] = [
        (
            "tessera_bridge_up",
            "gauge",
            "1 while the bridge's link to its remote is up.",
            |s| u64::from(s.connected.load(Ordering::Relaxed)),
        ),
        (
            "tessera_bridge_queued_messages",
            "gauge",
            "Messages waiting in the bridge's local session for the remote.",
            |s| s.queued.load(Ordering::Relaxed),
        ),
        (
            "tessera_bridge_inflight_messages",
            "gauge",
            "QoS 1/2 messages sent to the remote and not yet acknowledged.",
            |s| s.in_flight.load(Ordering::Relaxed),
        ),
        (
            "tessera_bridge_messages_sent_total",
            "counter",
            "PUBLISH packets sent to the remote (resends included).",
            |s| s.sent.load(Ordering::Relaxed),
        ),
        (
            "tessera_bridge_messages_received_total",
            "counter",
            "PUBLISH packets received from the remote.",
            |s| s.received.load(Ordering::Relaxed),
        ),
        (
            "tessera_bridge_messages_dropped_total",
            "counter",
            "Messages refused by the remote or the local engine, or matching no rule.",
            |s| s.dropped.load(Ordering::Relaxed),
        ),
        (
            "tessera_bridge_connects_total",
            "counter",
            "Successful connects to the remote.",
            |s| s.connects.load(Ordering::Relaxed),
        ),
        (
            "tessera_bridge_connect_failures_total",
            "counter",
            "Failed connects and lost links.",
            |s| s.failures.load(Ordering::Relaxed),
        ),
    ];
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    for (name, kind, help, field) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (c, s) in &report {
            let _ = writeln!(out, "{name}{{bridge=\"{}\"}} {}", c.name, field(s));
        }
        out.push('\n');
    }
}

/// One bridge's state and counters.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// The shard running it.
    pub shard: AtomicU64,
    /// The link to the remote is up (CONNACK received, local session attached).
    pub connected: AtomicBool,
    /// `out` messages waiting in the local session's queue (memory and disk).
    pub queued: AtomicU64,
    /// `out` QoS 1/2 messages sent to the remote and not yet acknowledged.
    pub in_flight: AtomicU64,
    /// `out` PUBLISH packets sent to the remote (resends included).
    pub sent: AtomicU64,
    /// `in` PUBLISH packets received from the remote.
    pub received: AtomicU64,
    /// Messages that did not cross: refused by the remote (v5 reason code) or
    /// by the local engine (ACL, quota), or matching no rule.
    pub dropped: AtomicU64,
    /// Successful connects to the remote.
    pub connects: AtomicU64,
    /// Failed connects and links lost.
    pub failures: AtomicU64,
    last_error: Mutex<String>,
}

impl BridgeStats {
    /// The last link error ("" before any).
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records a link error.
    pub fn set_error(&self, e: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e.to_owned();
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One compiled rule: messages matching `filter` on the `from` side cross
/// with `from_prefix` replaced by `to_prefix`.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The filter subscribed to on the `from` side.
    pub filter: String,
    from_prefix: String,
    to_prefix: String,
    /// QoS cap.
    pub qos: u8,
    /// RETAIN crosses as published.
    pub keep_retain: bool,
}

impl Rule {
    /// An `out` rule (local to remote).
    pub fn out(r: &RuleConfig) -> Rule {
        Rule {
            filter: r.local_filter(),
            from_prefix: r.local_prefix.clone(),
            to_prefix: r.remote_prefix.clone(),
            qos: r.qos,
            keep_retain: r.keep_retain(),
        }
    }

    /// An `in` rule (remote to local).
    pub fn inward(r: &RuleConfig) -> Rule {
        Rule {
            filter: r.remote_filter(),
            from_prefix: r.remote_prefix.clone(),
            to_prefix: r.local_prefix.clone(),
            qos: r.qos,
            keep_retain: r.keep_retain(),
        }
    }

    /// Whether a topic crosses as it is (no prefix replaced).
    pub fn keeps_topics(&self) -> bool {
        self.from_prefix == self.to_prefix
    }

    /// The topic on the other side; `None` when the topic does not carry the
    /// prefix (cannot happen for a topic the filter matched) or the result is
    /// not a valid MQTT string. Allocates only when the prefixes differ.
    pub fn map(&self, topic: &Str) -> Option<Str> {
        if self.from_prefix == self.to_prefix {
            return Some(topic.clone());
        }
        let rest = topic.as_str().strip_prefix(self.from_prefix.as_str())?;
        let mut s = String::with_capacity(self.to_prefix.len() + rest.len());
        s.push_str(&self.to_prefix);
        s.push_str(rest);
        if s.is_empty() {
            return None;
        }
        Str::try_from(s).ok()
    }

    /// Whether `topic` matches this rule's filter.
    pub fn matches(&self, topic: &str) -> bool {
        topic::matches(&self.filter, topic)
    }
}

/// The delay before reconnect attempt `attempt` (0-based): `min` doubled per
/// attempt, capped at `max`, then between 50 % and 100 % of that at random
/// (jitter spreads the reconnects of many bridges after a remote restart).
pub fn backoff(attempt: u32, min_ms: u32, max_ms: u32, random: u64) -> Duration {
    let base = u64::from(min_ms)
        .saturating_mul(1u64 << attempt.min(20))
        .min(u64::from(max_ms));
    let half = base / 2;
    Duration::from_millis(half + random % (base - half + 1))
}

/// A cheap random number for jitter (not for anything secret).
pub fn jitter_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(topic: &str, local: &str, remote: &str) -> RuleConfig {
        RuleConfig {
            topic: topic.into(),
            local_prefix: local.into(),
            remote_prefix: remote.into(),
            qos: 1,
            retain: "keep".into(),
        }
    }

    #[test]
    fn rules_rewrite_prefixes_both_ways() {
        let r = rule("sensors/#", "site/", "edge1/");
        let out = Rule::out(&r);
        assert_eq!(out.filter, "site/sensors/#");
        assert!(out.matches("site/sensors/t1"));
        let t = Str::try_from("site/sensors/t1").unwrap();
        assert_eq!(out.map(&t).unwrap().as_str(), "edge1/sensors/t1");
        let inward = Rule::inward(&r);
        assert_eq!(inward.filter, "edge1/sensors/#");
        let t = Str::try_from("edge1/sensors/t1").unwrap();
        assert_eq!(inward.map(&t).unwrap().as_str(), "site/sensors/t1");
        // Same prefixes: the topic is shared, not copied.
        let same = Rule::out(&rule("a/#", "", ""));
        let t = Str::try_from("a/b").unwrap();
        assert_eq!(
            same.map(&t).unwrap().as_bytes().as_ptr(),
            t.as_bytes().as_ptr()
        );
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        for random in [0, 1, 12_345, u64::MAX] {
            let d = backoff(0, 500, 30_000, random).as_millis();
            assert!((250..=500).contains(&d), "{d}");
            let d = backoff(3, 500, 30_000, random).as_millis();
            assert!((2_000..=4_000).contains(&d), "{d}");
            let d = backoff(40, 500, 30_000, random).as_millis();
            assert!((15_000..=30_000).contains(&d), "{d}");
        }
    }
}
