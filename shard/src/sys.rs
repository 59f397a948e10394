//! `$SYS/broker/...` statistics: what each shard reports, and how shard 0 turns the
//! reports into retained messages (docs/SYS_TOPICS.md lists every topic).
//!
//! Every `interval_ms`, each shard sends shard 0 a [`SysReport`] of its own counters
//! over the mesh (shard 0 reports to itself). Shard 0 keeps the latest report of
//! each shard in a [`SysPublisher`] and, at its own interval, publishes the totals
//! through the normal publish path as retained QoS 0 messages. Only values that
//! changed since the previous round are published again. Totals therefore lag the
//! shards by at most one interval.
//!
//! Pure: no clock (times are arguments), no I/O. The engine owns the timing.

use bytes::Bytes;
use tessera_proto::Str;

use crate::mesh::ShardId;

/// How `$SYS` topics are produced (the broker's `[sys]` config section).
#[derive(Debug, Clone, Default)]
pub struct SysSettings {
    /// Milliseconds between two rounds of reports and publications; 0 disables
    /// `$SYS` topics.
    pub interval_ms: u64,
    /// The text of `$SYS/broker/version`.
    pub version: String,
}

/// One shard's counters, sent to shard 0 every interval. Counters are totals
/// since the shard started; gauges are the value at the time of the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SysReport {
    /// Gauge: connections with a live session.
    pub clients_connected: u64,
    /// Gauge: sessions, connected or not.
    pub sessions: u64,
    /// Gauge: subscriptions held by the shard's sessions.
    pub subscriptions: u64,
    /// Counter: PUBLISH packets received from clients.
    pub messages_received: u64,
    /// Counter: PUBLISH packets written to clients.
    pub messages_sent: u64,
    /// Counter: bytes received from clients.
    pub bytes_received: u64,
    /// Counter: bytes of packets written to clients.
    pub bytes_sent: u64,
    /// Counter: publications handed to the forwarder for other nodes (a cluster).
    pub cluster_forwarded: u64,
    /// Counter: publications received from other nodes (a cluster).
    pub cluster_received: u64,
}

impl SysReport {
    fn add(&mut self, o: &SysReport) {
        self.clients_connected += o.clients_connected;
        self.sessions += o.sessions;
        self.subscriptions += o.subscriptions;
        self.messages_received += o.messages_received;
        self.messages_sent += o.messages_sent;
        self.bytes_received += o.bytes_received;
        self.bytes_sent += o.bytes_sent;
        self.cluster_forwarded += o.cluster_forwarded;
        self.cluster_received += o.cluster_received;
    }
}

/// What a node of a cluster publishes about the cluster under `$SYS/broker/cluster/`,
/// set on shard 0 by the broker's cluster glue (the engine knows nothing of raft).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SysCluster {
    /// This node's id.
    pub node_id: u64,
    /// The leader this node knows, if any.
    pub leader: Option<u64>,
    /// Members of the cluster (voters and learners) in this node's view.
    pub members: u64,
}

/// Windows of the load averages, in seconds.
const LOAD_WINDOWS_S: [f64; 3] = [60.0, 300.0, 900.0];

/// Topics of the load averages: `[series][window]`, series as in [`load_value`].
const LOAD_TOPICS: [[&str; LOAD_WINDOWS_S.len()]; 4] = [
    [
        "load/messages/received/1min",
        "load/messages/received/5min",
        "load/messages/received/15min",
    ],
    [
        "load/messages/sent/1min",
        "load/messages/sent/5min",
        "load/messages/sent/15min",
    ],
    [
        "load/bytes/received/1min",
        "load/bytes/received/5min",
        "load/bytes/received/15min",
    ],
    [
        "load/bytes/sent/1min",
        "load/bytes/sent/5min",
        "load/bytes/sent/15min",
    ],
];

/// The counter of load series `series`.
fn load_value(r: &SysReport, series: usize) -> u64 {
    match series {
        0 => r.messages_received,
        1 => r.messages_sent,
        2 => r.bytes_received,
        _ => r.bytes_sent,
    }
}

/// Topics published, bounded: 12 values and 4 series of 3 load averages.
pub const SYS_TOPICS_MAX: usize = 12 + CLUSTER_TOPICS + LOAD_TOPICS.len() * LOAD_WINDOWS_S.len();

/// Topics under `cluster/`, published once the node is in a cluster.
const CLUSTER_TOPICS: usize = 5;

/// Shard 0's aggregation of the reports into `$SYS` messages. Exists on shard 0
/// only, when `$SYS` topics are enabled; created with the engine.
#[derive(Debug)]
pub struct SysPublisher {
    /// The latest report of each shard.
    reports: Vec<Option<SysReport>>,
    /// Highest connected total seen at a publication.
    clients_max: u64,
    /// Totals and time of the previous round with every shard reported, for rates.
    previous: Option<(u64, SysReport)>,
    /// Exponentially weighted per-second rates: `[series][window]`.
    loads: [[f64; LOAD_WINDOWS_S.len()]; LOAD_TOPICS.len()],
    /// The payload last published on each topic, in publication order.
    published: Vec<(Str, Bytes)>,
    /// The cluster's view, once the node runs in a cluster.
    cluster: Option<SysCluster>,
}

impl SysPublisher {
    /// Aggregates the reports of `shard_count` shards.
    pub fn new(shard_count: usize) -> SysPublisher {
        SysPublisher {
            reports: vec![None; shard_count],
            clients_max: 0,
            previous: None,
            loads: Default::default(),
            published: Vec::with_capacity(SYS_TOPICS_MAX),
            cluster: None,
        }
    }

    /// The node's cluster view: from the next round on, `cluster/...` topics too.
    pub fn set_cluster(&mut self, cluster: SysCluster) {
        self.cluster = Some(cluster);
    }

    /// Records the latest report of `shard`.
    pub fn report(&mut self, shard: ShardId, report: SysReport) {
        self.reports[usize::from(shard)] = Some(report);
    }

    /// The messages of one round at `now_ms`: the topics whose value changed since
    /// the previous round (every topic on the first). `retained` is the retained
    /// message count (a replicated table: shard 0's own count, not a sum).
    pub fn round(&mut self, now_ms: u64, retained: u64, version: &str) -> Vec<(Str, Bytes)> {
        let mut total = SysReport::default();
        for r in self.reports.iter().flatten() {
            total.add(r);
        }
        let complete = self.reports.iter().all(Option::is_some);
        self.clients_max = self.clients_max.max(total.clients_connected);
        let mut values: Vec<(&str, String)> = vec![
            ("version", version.to_owned()),
            ("uptime", (now_ms / 1000).to_string()),
            ("clients/connected", total.clients_connected.to_string()),
            (
                "clients/disconnected",
                (total.sessions.saturating_sub(total.clients_connected)).to_string(),
            ),
            ("clients/total", total.sessions.to_string()),
            ("clients/maximum", self.clients_max.to_string()),
            ("messages/received", total.messages_received.to_string()),
            ("messages/sent", total.messages_sent.to_string()),
            ("bytes/received", total.bytes_received.to_string()),
            ("bytes/sent", total.bytes_sent.to_string()),
            ("subscriptions/count", total.subscriptions.to_string()),
            ("retained messages/count", retained.to_string()),
        ];
        if let Some(c) = self.cluster {
            let leader = c
                .leader
                .map_or_else(|| "none".to_owned(), |l| l.to_string());
            values.extend([
                ("cluster/node_id", c.node_id.to_string()),
                ("cluster/leader", leader),
                ("cluster/members", c.members.to_string()),
                (
                    "cluster/messages/forwarded",
                    total.cluster_forwarded.to_string(),
                ),
                (
                    "cluster/messages/received",
                    total.cluster_received.to_string(),
                ),
            ]);
        }
        // Rates only from rounds where every shard had reported: a shard's
        // first report would otherwise look like a burst.
        if complete {
            if let Some((then_ms, before)) = self.previous
                && now_ms > then_ms
            {
                let dt_s = (now_ms - then_ms) as f64 / 1000.0;
                for (s, loads) in self.loads.iter_mut().enumerate() {
                    let delta = load_value(&total, s).saturating_sub(load_value(&before, s));
                    let rate = delta as f64 / dt_s;
                    for (w, window_s) in LOAD_WINDOWS_S.iter().enumerate() {
                        let alpha = 1.0 - (-dt_s / window_s).exp();
                        loads[w] += alpha * (rate - loads[w]);
                    }
                }
            }
            self.previous = Some((now_ms, total));
            for (topics, loads) in LOAD_TOPICS.iter().zip(&self.loads) {
                for (topic, load) in topics.iter().zip(loads) {
                    values.push((topic, format!("{load:.2}")));
                }
            }
        }
        assert!(values.len() <= SYS_TOPICS_MAX);
        let mut out = Vec::new();
        for (name, value) in values {
            let topic = Str::try_from(format!("$SYS/broker/{name}")).expect("ASCII topic");
            let payload = Bytes::from(value);
            match self.published.iter_mut().find(|(t, _)| *t == topic) {
                Some((_, last)) if *last == payload => continue,
                Some((_, last)) => *last = payload.clone(),
                None => self.published.push((topic.clone(), payload.clone())),
            }
            out.push((topic, payload));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value<'a>(round: &'a [(Str, Bytes)], name: &str) -> Option<&'a str> {
        let topic = format!("$SYS/broker/{name}");
        round
            .iter()
            .find(|(t, _)| t.as_str() == topic)
            .map(|(_, p)| std::str::from_utf8(p).unwrap())
    }

    fn report(connected: u64, received: u64) -> SysReport {
        SysReport {
            clients_connected: connected,
            sessions: connected + 1,
            subscriptions: 2,
            messages_received: received,
            messages_sent: 2 * received,
            bytes_received: 100 * received,
            bytes_sent: 200 * received,
            cluster_forwarded: 3 * received,
            cluster_received: 4 * received,
        }
    }

    #[test]
    fn totals_sum_the_latest_report_of_every_shard() {
        let mut p = SysPublisher::new(2);
        p.report(0, report(3, 10));
        let first = p.round(5_000, 4, "tessera 1");
        assert_eq!(value(&first, "version"), Some("tessera 1"));
        assert_eq!(value(&first, "uptime"), Some("5"));
        assert_eq!(value(&first, "clients/connected"), Some("3"));
        assert_eq!(value(&first, "retained messages/count"), Some("4"));
        assert_eq!(
            value(&first, "load/messages/received/1min"),
            None,
            "no rates until every shard reported"
        );
        p.report(1, report(2, 5));
        p.report(0, report(1, 12));
        let second = p.round(6_000, 4, "tessera 1");
        assert_eq!(
            value(&second, "clients/connected"),
            None,
            "unchanged: 1 + 2"
        );
        assert_eq!(value(&second, "clients/total"), Some("5"));
        assert_eq!(value(&second, "clients/disconnected"), Some("2"));
        assert_eq!(value(&second, "messages/received"), Some("17"));
        assert_eq!(value(&second, "messages/sent"), Some("34"));
        assert_eq!(value(&second, "bytes/sent"), Some("3400"));
        assert_eq!(value(&second, "subscriptions/count"), Some("4"));
        assert_eq!(value(&second, "clients/maximum"), None, "unchanged: 3");
        assert_eq!(value(&second, "version"), None, "unchanged");
        assert_eq!(value(&second, "load/messages/received/1min"), Some("0.00"));
        p.report(1, report(9, 5));
        let third = p.round(7_000, 4, "tessera 1");
        assert_eq!(value(&third, "clients/maximum"), Some("10"));
    }

    /// A steady rate r per second moves each average toward r by
    /// 1 - exp(-dt / window) per round.
    #[test]
    fn load_averages_are_exponentially_weighted_rates() {
        let mut p = SysPublisher::new(1);
        p.report(0, report(0, 0));
        p.round(0, 0, "v");
        let mut received = 0;
        for k in 1..=60u64 {
            received += 100; // 10 per second over 10 s
            p.report(0, report(0, received));
            p.round(k * 10_000, 0, "v");
        }
        // Each round publishes only what changed: read the latest values.
        let last = p.published.clone();
        let get = |w: &str| -> f64 {
            value(&last, &format!("load/messages/received/{w}"))
                .unwrap()
                .parse()
                .unwrap()
        };
        // After 600 s at 10/s: 1 - e^-10, 1 - e^-2 and 1 - e^-(2/3) of the way.
        assert!((get("1min") - 10.0).abs() < 0.01, "{}", get("1min"));
        assert!((get("5min") - 10.0 * (1.0 - (-2.0f64).exp())).abs() < 0.01);
        assert!((get("15min") - 10.0 * (1.0 - (-2.0f64 / 3.0).exp())).abs() < 0.01);
        let sent: f64 = value(&last, "load/messages/sent/1min")
            .unwrap()
            .parse()
            .unwrap();
        assert!((sent - 20.0).abs() < 0.01);
    }

    #[test]
    fn a_node_of_a_cluster_publishes_its_view_and_the_traffic_between_nodes() {
        let mut p = SysPublisher::new(2);
        p.report(0, report(1, 10));
        p.report(1, report(1, 5));
        let single = p.round(1000, 0, "v");
        assert_eq!(value(&single, "cluster/node_id"), None, "not in a cluster");
        p.set_cluster(SysCluster {
            node_id: 2,
            leader: None,
            members: 3,
        });
        let first = p.round(2000, 0, "v");
        assert_eq!(value(&first, "cluster/node_id"), Some("2"));
        assert_eq!(value(&first, "cluster/leader"), Some("none"));
        assert_eq!(value(&first, "cluster/members"), Some("3"));
        assert_eq!(value(&first, "cluster/messages/forwarded"), Some("45"));
        assert_eq!(value(&first, "cluster/messages/received"), Some("60"));
        p.set_cluster(SysCluster {
            node_id: 2,
            leader: Some(1),
            members: 3,
        });
        let next = p.round(3000, 0, "v");
        assert_eq!(value(&next, "cluster/leader"), Some("1"));
        assert_eq!(value(&next, "cluster/members"), None, "unchanged");
    }

    #[test]
    fn every_topic_fits_the_bound() {
        let mut p = SysPublisher::new(1);
        p.set_cluster(SysCluster::default());
        p.report(0, report(1, 1));
        p.round(0, 0, "v");
        p.report(0, report(2, 2));
        let all = p.round(1000, 1, "v");
        assert!(all.len() <= SYS_TOPICS_MAX);
        assert_eq!(p.published.len(), SYS_TOPICS_MAX);
    }
}
