//! `shard_probe`: the metrics one shard keeps about itself, beyond the plain
//! [`crate::engine::Stats`] counters: packets by type, CONNECT results, messages
//! by QoS, and an HDR histogram of publish-to-deliver latency. (Persistence
//! commits are timed by each store's writer thread: `store::StoreStats`.)
//!
//! Exists once per shard inside its [`crate::engine::Engine`]; only that
//! shard's thread touches it (plain integers, no atomics, no locks). The admin
//! thread gets a [`ProbeSnapshot`] by message when Prometheus scrapes, and
//! merges the shards' snapshots there, so recording costs an add or an HDR
//! bucket increment on the hot path and nothing else.
//!
//! Histograms are HDR (`hdrhistogram`) in microseconds (or records), never
//! reset: a snapshot carries cumulative counts at fixed bucket bounds, which is
//! what a Prometheus histogram is. The bounds are [`LATENCY_BUCKETS_S`].

use hdrhistogram::Histogram;
use tessera_proto::{PacketType, QoS, ReasonCode};

/// Upper bounds, in seconds, of the latency histogram buckets exported to
/// Prometheus: 100 µs to 10 s (the alerts and dashboard use 100 µs to 1 s).
pub const LATENCY_BUCKETS_S: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Largest latency an HDR latency histogram resolves, microseconds (one
/// minute); longer values are recorded as this.
const LATENCY_US_MAX: u64 = 60_000_000;

/// A CONNECT the driver refused before the engine saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyRefusal {
    /// The first packet was not a well-formed CONNECT.
    Malformed,
    /// The CONNECT named a protocol level the broker does not speak.
    UnsupportedProtocolVersion,
    /// No complete CONNECT within `limits.connect_timeout_s`.
    ConnectTimeout,
    /// The shard already held its share of `limits.max_connections`.
    ConnectionLimit,
    /// Over `limits.connect_rate_per_s`: closed before reading.
    ConnectionRateExceeded,
}

impl EarlyRefusal {
    /// Every variant, in index order.
    pub const ALL: [EarlyRefusal; 5] = [
        EarlyRefusal::Malformed,
        EarlyRefusal::UnsupportedProtocolVersion,
        EarlyRefusal::ConnectTimeout,
        EarlyRefusal::ConnectionLimit,
        EarlyRefusal::ConnectionRateExceeded,
    ];

    /// The `result` label value.
    pub fn name(self) -> &'static str {
        match self {
            EarlyRefusal::Malformed => "malformed",
            EarlyRefusal::UnsupportedProtocolVersion => "unsupported_protocol_version",
            EarlyRefusal::ConnectTimeout => "connect_timeout",
            EarlyRefusal::ConnectionLimit => "connection_limit",
            EarlyRefusal::ConnectionRateExceeded => "connection_rate_exceeded",
        }
    }
}

/// An HDR histogram with the exact sum Prometheus wants next to it.
#[derive(Debug, Clone)]
pub struct HdrSeries {
    hdr: Histogram<u64>,
    sum: u64,
}

impl HdrSeries {
    fn new(max: u64) -> HdrSeries {
        HdrSeries {
            // Two significant digits: 1 % resolution in about 40 KiB per series.
            hdr: Histogram::new_with_bounds(1, max, 2).expect("valid HDR bounds"),
            sum: 0,
        }
    }

    /// Records one value (clamped to the histogram's range).
    pub fn record(&mut self, value: u64) {
        self.hdr.saturating_record(value.max(1));
        self.sum = self.sum.saturating_add(value);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.hdr.len()
    }

    /// The value at quantile `q` (0.0..=1.0); 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.hdr.is_empty() {
            0
        } else {
            self.hdr.value_at_quantile(q)
        }
    }

    /// Cumulative counts at `bounds` (values <= bound, `scale` units per
    /// bound unit), plus the count and sum: a Prometheus histogram.
    fn buckets(&self, bounds: &[f64], scale: f64) -> BucketCounts {
        let mut cumulative = Vec::with_capacity(bounds.len());
        for b in bounds {
            let limit = (b * scale).round() as u64;
            cumulative.push(self.hdr.count_between(0, limit));
        }
        BucketCounts {
            cumulative,
            count: self.hdr.len(),
            sum: self.sum,
        }
    }
}

/// One histogram as Prometheus exports it: cumulative counts per bound, the
/// total count and the sum (in the recorded unit: microseconds or records).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BucketCounts {
    /// Values <= each bound, in the order of the bounds.
    pub cumulative: Vec<u64>,
    /// Values recorded.
    pub count: u64,
    /// Sum of the values recorded.
    pub sum: u64,
}

impl BucketCounts {
    /// Adds another shard's counts (same bounds).
    pub fn merge(&mut self, other: &BucketCounts) {
        if self.cumulative.is_empty() {
            self.cumulative = vec![0; other.cumulative.len()];
        }
        for (a, b) in self.cumulative.iter_mut().zip(&other.cumulative) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
    }
}

/// The shard-local metrics (see the module doc).
#[derive(Debug, Clone)]
pub struct Probe {
    packets_received: [u64; 16],
    packets_sent: [u64; 16],
    /// CONNECTs the engine answered, by CONNACK reason code (0 = success).
    connects: [u64; 256],
    connects_early: [u64; EarlyRefusal::ALL.len()],
    published: [u64; 3],
    delivered: [u64; 3],
    connections_accepted: u64,
    publish_to_deliver_us: HdrSeries,
}

impl Default for Probe {
    fn default() -> Probe {
        Probe {
            packets_received: [0; 16],
            packets_sent: [0; 16],
            connects: [0; 256],
            connects_early: [0; EarlyRefusal::ALL.len()],
            published: [0; 3],
            delivered: [0; 3],
            connections_accepted: 0,
            publish_to_deliver_us: HdrSeries::new(LATENCY_US_MAX),
        }
    }
}

impl Probe {
    /// A packet decoded from a client.
    pub fn packet_received(&mut self, t: PacketType) {
        self.packets_received[t as usize] += 1;
    }

    /// A packet written to a client's output.
    pub fn packet_sent(&mut self, t: PacketType) {
        self.packets_sent[t as usize] += 1;
    }

    /// A CONNECT answered by the engine with this CONNACK reason.
    pub fn connect_result(&mut self, rc: ReasonCode) {
        self.connects[rc as u8 as usize] += 1;
    }

    /// A CONNECT the driver refused before the engine.
    pub fn connect_refused_early(&mut self, why: EarlyRefusal) {
        self.connects_early[why as usize] += 1;
    }

    /// A TCP connection accepted by the driver.
    pub fn connection_accepted(&mut self) {
        self.connections_accepted += 1;
    }

    /// A PUBLISH accepted from a client.
    pub fn published(&mut self, qos: QoS) {
        self.published[qos as usize] += 1;
    }

    /// A delivery handed to a subscriber's connection, `latency_us` after its
    /// PUBLISH was decoded (`None` when unknown: no clock, retained replay).
    pub fn delivered(&mut self, qos: QoS, latency_us: Option<u64>) {
        self.delivered[qos as usize] += 1;
        if let Some(us) = latency_us {
            self.publish_to_deliver_us.record(us);
        }
    }

    /// The publish-to-deliver latency histogram, for quantiles.
    pub fn publish_to_deliver(&self) -> &HdrSeries {
        &self.publish_to_deliver_us
    }

    /// What the admin thread exports; allocates a few small vectors, so it
    /// is for scrapes, not for the hot path.
    pub fn snapshot(&self) -> ProbeSnapshot {
        let by_type = |counts: &[u64; 16]| {
            (1u8..=15)
                .filter_map(|t| {
                    let pt = PacketType::from_nibble(t)?;
                    Some((packet_type_name(pt), counts[usize::from(t)]))
                })
                .collect()
        };
        let mut connects: Vec<(String, u64)> = self
            .connects
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .filter_map(|(rc, n)| {
                let rc = ReasonCode::from_u8(rc as u8).ok()?;
                Some((connect_result_name(rc), *n))
            })
            .collect();
        if !connects.iter().any(|(name, _)| name == "success") {
            connects.push(("success".to_owned(), 0));
        }
        for why in EarlyRefusal::ALL {
            let n = self.connects_early[why as usize];
            match connects.iter_mut().find(|(name, _)| name == why.name()) {
                Some(entry) => entry.1 += n,
                None => connects.push((why.name().to_owned(), n)),
            }
        }
        ProbeSnapshot {
            packets_received: by_type(&self.packets_received),
            packets_sent: by_type(&self.packets_sent),
            connects,
            published: self.published,
            delivered: self.delivered,
            connections_accepted: self.connections_accepted,
            publish_to_deliver: self.publish_to_deliver_us.buckets(&LATENCY_BUCKETS_S, 1e6),
            publish_to_deliver_p50_us: self.publish_to_deliver_us.quantile(0.5),
            publish_to_deliver_p99_us: self.publish_to_deliver_us.quantile(0.99),
        }
    }
}

/// A copy of a shard's probe, made for one scrape.
#[derive(Debug, Clone, Default)]
pub struct ProbeSnapshot {
    /// Packets received by lower-case type name.
    pub packets_received: Vec<(&'static str, u64)>,
    /// Packets sent by lower-case type name.
    pub packets_sent: Vec<(&'static str, u64)>,
    /// CONNECT results: `success` or the refusal in snake case.
    pub connects: Vec<(String, u64)>,
    /// PUBLISH accepted from clients, by QoS.
    pub published: [u64; 3],
    /// Deliveries to subscribers, by QoS.
    pub delivered: [u64; 3],
    /// TCP connections accepted.
    pub connections_accepted: u64,
    /// Publish-to-deliver latency, microseconds, at [`LATENCY_BUCKETS_S`].
    pub publish_to_deliver: BucketCounts,
    /// Median publish-to-deliver latency on this shard, microseconds.
    pub publish_to_deliver_p50_us: u64,
    /// 99th percentile publish-to-deliver latency on this shard, microseconds.
    pub publish_to_deliver_p99_us: u64,
}

/// The lower-case name of a packet type, as the `type` label.
pub fn packet_type_name(t: PacketType) -> &'static str {
    match t {
        PacketType::Connect => "connect",
        PacketType::ConnAck => "connack",
        PacketType::Publish => "publish",
        PacketType::PubAck => "puback",
        PacketType::PubRec => "pubrec",
        PacketType::PubRel => "pubrel",
        PacketType::PubComp => "pubcomp",
        PacketType::Subscribe => "subscribe",
        PacketType::SubAck => "suback",
        PacketType::Unsubscribe => "unsubscribe",
        PacketType::UnsubAck => "unsuback",
        PacketType::PingReq => "pingreq",
        PacketType::PingResp => "pingresp",
        PacketType::Disconnect => "disconnect",
        PacketType::Auth => "auth",
    }
}

/// `success`, or a CONNACK refusal reason in snake case
/// (`ClientIdentifierNotValid` -> `client_identifier_not_valid`).
pub fn connect_result_name(rc: ReasonCode) -> String {
    if rc == ReasonCode::Success {
        return "success".to_owned();
    }
    snake_case(&format!("{rc:?}"))
}

fn snake_case(camel: &str) -> String {
    // "QoS" is one word in the specification's names (`QoSNotSupported`).
    let camel = camel.replace("QoS", "Qos");
    let mut out = String::with_capacity(camel.len() + 8);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_are_snake_case() {
        let name = |rc| connect_result_name(rc);
        assert_eq!(name(ReasonCode::Success), "success");
        assert_eq!(
            name(ReasonCode::ClientIdentifierNotValid),
            "client_identifier_not_valid"
        );
        assert_eq!(name(ReasonCode::NotAuthorized), "not_authorized");
        assert_eq!(
            name(ReasonCode::BadUserNameOrPassword),
            "bad_user_name_or_password"
        );
        assert_eq!(name(ReasonCode::ServerBusy), "server_busy");
        assert_eq!(
            name(ReasonCode::UnsupportedProtocolVersion),
            "unsupported_protocol_version"
        );
        assert_eq!(name(ReasonCode::QoSNotSupported), "qos_not_supported");
    }

    #[test]
    fn buckets_are_cumulative_and_merge() {
        let mut p = Probe::default();
        for us in [50, 80, 400, 2_000, 700_000, 90_000_000] {
            p.delivered(QoS::AtLeastOnce, Some(us));
        }
        p.delivered(QoS::AtMostOnce, None);
        let s = p.snapshot();
        assert_eq!(s.delivered, [1, 6, 0]);
        let b = &s.publish_to_deliver;
        assert_eq!(b.count, 6);
        assert_eq!(b.sum, 50 + 80 + 400 + 2_000 + 700_000 + 90_000_000);
        // <= 100 µs: 2; <= 500 µs: 3; <= 2.5 ms: 4; <= 1 s: 5; <= 10 s: 5.
        assert_eq!(b.cumulative[0], 2);
        assert_eq!(b.cumulative[2], 3);
        assert_eq!(b.cumulative[4], 4);
        assert_eq!(b.cumulative[12], 5);
        assert_eq!(*b.cumulative.last().unwrap(), 5);
        assert!(b.cumulative.windows(2).all(|w| w[0] <= w[1]));
        let mut merged = BucketCounts::default();
        merged.merge(b);
        merged.merge(b);
        assert_eq!(merged.count, 12);
        assert_eq!(merged.cumulative[0], 4);
    }

    #[test]
    fn connect_results_merge_early_refusals_and_always_list_success() {
        let mut p = Probe::default();
        p.connect_refused_early(EarlyRefusal::ConnectTimeout);
        p.connect_result(ReasonCode::ClientIdentifierNotValid);
        let s = p.snapshot();
        let get = |n: &str| s.connects.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
        assert_eq!(get("success"), Some(0));
        assert_eq!(get("connect_timeout"), Some(1));
        assert_eq!(get("client_identifier_not_valid"), Some(1));
        assert_eq!(get("malformed"), Some(0));
        let types: Vec<_> = s.packets_received.iter().map(|(t, _)| *t).collect();
        assert_eq!(types.len(), 15);
        assert!(types.contains(&"pingreq") && types.contains(&"auth"));
    }
}
