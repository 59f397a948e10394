//! `/metrics`: the shards' snapshots merged into Prometheus text.
//!
//! Counters and gauges go through `metrics` into a local (not global)
//! `metrics-exporter-prometheus` recorder, which renders them with their
//! HELP and TYPE lines; the recorder's upkeep runs on every scrape. The three
//! histograms are rendered here from the shards' HDR bucket counts, because
//! the exporter's histograms take samples one at a time (`record_many` pushes
//! `count` copies): replaying a shard's millions of latencies per scrape would
//! cost memory in proportion to traffic. The names, types and labels are the
//! contract in `ops/README.md`.
//!
//! Exists once, on the admin thread. A shard that does not answer a scrape
//! keeps its last values (counters never go backwards) and reports
//! `tessera_shard_up 0`.

use std::fmt::Write as _;
use std::sync::Mutex;

use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use std::sync::atomic::Ordering::Relaxed;

use tessera_shard::probe::{BucketCounts, LATENCY_BUCKETS_S};
use tessera_shard::store::{SharedStoreStats, StoreStats};

use super::process::ProcessStats;
use super::shard_call::{Answer, Query, ShardLinks, ShardSnapshot};
use crate::server::ReadBudget;
use std::sync::Arc;

/// Drop reasons exported by `tessera_messages_dropped_total`, with the
/// counter each reads. A new reason (e.g. `not_authorized` from ACLs,
/// `shard_unavailable`) is one more line here and a counter in `Stats`.
const DROP_REASONS: [(&str, StatsField); 5] = [
    ("queue_full", |s| s.dropped_queue_full),
    ("expired", |s| s.dropped_expired),
    ("packet_too_large", |s| s.dropped_too_large),
    ("shared_no_member", |s| s.dropped_shared_no_member),
    ("shared_qos2_member_ended", |s| {
        s.dropped_shared_qos2_member_ended
    }),
];

/// Reads one counter of a shard's `Stats`.
type StatsField = fn(&tessera_shard::engine::Stats) -> u64;

/// The exporter and the last snapshot of every shard.
#[derive(Debug)]
pub struct Exporter {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Last snapshot per shard; also serializes scrapes.
    last: Mutex<Vec<Option<ShardSnapshot>>>,
    connections_max: u64,
    /// Each shard's store counters, written by its writer thread (empty with
    /// `durability = "memory"`).
    store_stats: Vec<SharedStoreStats>,
    /// The node's read-buffer budget (`limits.max_read_buffers_bytes`).
    read_budget: Arc<ReadBudget>,
    /// Every listener's transport (kind) and URL, by listener id.
    listeners: Vec<(String, String)>,
    /// Each QUIC listener's URL and endpoint gauges.
    quic: Vec<(String, Arc<crate::quic::QuicCounters>)>,
    /// The TLS listeners' certificate expiries (they change on reload).
    tls: Option<Arc<crate::transport::tls::TlsStore>>,
    /// When the cluster link's certificates expire, Unix s.
    cluster_cert_not_after: Option<i64>,
}

impl Exporter {
    /// An exporter for `shard_count` shards serving at most `connections_max`
    /// connections in all, with their stores' counters (indexed by shard).
    pub fn new(
        shard_count: usize,
        connections_max: u64,
        store_stats: Vec<SharedStoreStats>,
        read_budget: Arc<ReadBudget>,
    ) -> Exporter {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, describe_all);
        Exporter {
            recorder,
            handle,
            last: Mutex::new(vec![None; shard_count]),
            connections_max,
            store_stats,
            read_budget,
            listeners: Vec::new(),
            quic: Vec::new(),
            tls: None,
            cluster_cert_not_after: None,
        }
    }

    /// Exports when each certificate stops being valid: the TLS listeners' (read again at
    /// each reload) and the cluster link's.
    pub fn with_certificates(
        mut self,
        tls: Arc<crate::transport::tls::TlsStore>,
        cluster: Option<i64>,
    ) -> Exporter {
        self.tls = Some(tls);
        self.cluster_cert_not_after = cluster;
        self
    }

    /// Exports each QUIC endpoint's connections and handshakes in progress.
    pub fn with_quic(mut self, quic: Vec<(String, Arc<crate::quic::QuicCounters>)>) -> Exporter {
        self.quic = quic;
        self
    }

    /// Labels `tessera_listener_connections` with each listener's transport
    /// (its kind: mqtt, mqtts, ws, wss, quic) and URL, by listener id.
    pub fn with_listeners(
        mut self,
        listeners: &[(crate::config::ListenerKind, String)],
    ) -> Exporter {
        self.listeners = listeners
            .iter()
            .map(|(kind, url)| (kind.to_string(), url.clone()))
            .collect();
        self
    }

    /// Asks every shard for a snapshot and keeps the answers; returns which
    /// shards answered.
    pub fn refresh(&self, links: &ShardLinks) -> Vec<bool> {
        let answers = links.call_all(&Query::Snapshot);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        answers
            .into_iter()
            .enumerate()
            .map(|(k, a)| match a {
                Ok(Answer::Snapshot(s)) => {
                    last[k] = Some(*s);
                    true
                }
                _ => false,
            })
            .collect()
    }

    /// The last snapshots, for `/api/v1/status`.
    pub fn snapshots(&self) -> Vec<Option<ShardSnapshot>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Scrapes the shards and renders the Prometheus text format.
    pub fn render(&self, links: &ShardLinks) -> String {
        let answered = self.refresh(links);
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let process = ProcessStats::read();
        metrics::with_local_recorder(&self.recorder, || {
            gauge!("tessera_connections_max").set(self.connections_max as f64);
            gauge!("tessera_read_buffers_bytes").set(self.read_budget.used() as f64);
            gauge!("tessera_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            for (k, snap) in last.iter().enumerate() {
                let up =
                    answered[k] && links.status[k].up.load(std::sync::atomic::Ordering::SeqCst);
                gauge!("tessera_shard_up", "shard" => k.to_string()).set(f64::from(u8::from(up)));
                if let Some(s) = snap {
                    record_shard(&k.to_string(), s);
                    for ((transport, url), n) in self.listeners.iter().zip(&s.listener_connections)
                    {
                        gauge!(
                            "tessera_listener_connections",
                            "shard" => k.to_string(),
                            "transport" => transport.clone(),
                            "listener" => url.clone()
                        )
                        .set(*n as f64);
                    }
                }
            }
            for (url, c) in &self.quic {
                use std::sync::atomic::Ordering::Relaxed;
                gauge!("tessera_quic_connections", "listener" => url.clone())
                    .set(c.live.load(Relaxed) as f64);
                gauge!("tessera_quic_handshakes", "listener" => url.clone())
                    .set(c.handshaking.load(Relaxed) as f64);
                gauge!("tessera_quic_endpoints", "listener" => url.clone())
                    .set(c.endpoints.load(Relaxed) as f64);
            }
            for (certificate, at) in self.tls.iter().flat_map(|t| t.expiry()) {
                gauge!("tessera_certificate_expiry_timestamp_seconds", "certificate" => certificate)
                    .set(at as f64);
            }
            if let Some(at) = self.cluster_cert_not_after {
                gauge!("tessera_certificate_expiry_timestamp_seconds", "certificate" => "cluster")
                    .set(at as f64);
            }
            for (k, stats) in self.store_stats.iter().enumerate() {
                counter!("tessera_persistence_commit_errors_total", "shard" => k.to_string())
                    .absolute(stats.commit_errors.load(Relaxed));
            }
            record_process(&process);
            record_allocator();
        });
        self.handle.run_upkeep();
        let mut out = self.handle.render();
        if let Some(cpu) = process.cpu_seconds {
            // The exporter's counters are integers and CPU time is not: this
            // one counter is written here.
            if !out.is_empty() && !out.ends_with("\n\n") {
                out.push('\n');
            }
            let _ = writeln!(
                out,
                "# HELP process_cpu_seconds_total User and system CPU time."
            );
            let _ = writeln!(out, "# TYPE process_cpu_seconds_total counter");
            let _ = writeln!(out, "process_cpu_seconds_total {cpu}\n");
        }
        let mut latency = BucketCounts::default();
        for s in last.iter().flatten() {
            latency.merge(&s.probe.publish_to_deliver);
        }
        histogram(
            &mut out,
            "tessera_publish_to_deliver_seconds",
            "Time from decoding a PUBLISH to handing the message to a subscriber's \
             connection writer.",
            &[(None, &latency)],
            &LATENCY_BUCKETS_S,
            1e-6,
        );
        // The stores count in power-of-two buckets: bucket i holds values
        // below 2^i, so the cumulative count up to it is exact at le = 2^i - 1.
        let log2_bounds: Vec<f64> = (0..LOG2_BUCKETS_EXPORTED)
            .map(|i| ((1u64 << i) - 1) as f64)
            .collect();
        let seconds_bounds: Vec<f64> = log2_bounds.iter().map(|b| b * 1e-6).collect();
        let shard_labels: Vec<String> =
            (0..self.store_stats.len()).map(|k| k.to_string()).collect();
        let commits: Vec<(BucketCounts, BucketCounts)> =
            self.store_stats.iter().map(|s| store_buckets(s)).collect();
        let series = |pick: fn(&(BucketCounts, BucketCounts)) -> &BucketCounts| {
            commits
                .iter()
                .zip(&shard_labels)
                .map(|(c, k)| (Some(k.as_str()), pick(c)))
                .collect::<Vec<_>>()
        };
        histogram(
            &mut out,
            "tessera_persistence_commit_seconds",
            "Duration of one persistence write transaction (a group commit: apply and commit).",
            &series(|c| &c.0),
            &seconds_bounds,
            1e-6,
        );
        histogram(
            &mut out,
            "tessera_persistence_commit_records",
            "Records (store operations) written per persistence commit (the batch size).",
            &series(|c| &c.1),
            &log2_bounds,
            1.0,
        );
        out
    }
}

/// Power-of-two buckets exported (of the stores' 24; the last one is
/// open-ended and only counts in +Inf): up to 2^22 - 1 µs, about 4.2 s.
const LOG2_BUCKETS_EXPORTED: usize = 23;

/// One store's commit latency (µs) and records-per-commit histograms.
fn store_buckets(s: &StoreStats) -> (BucketCounts, BucketCounts) {
    let cumulative = |buckets: &[std::sync::atomic::AtomicU64; 24]| {
        let mut acc = 0;
        buckets[..LOG2_BUCKETS_EXPORTED]
            .iter()
            .map(|b| {
                acc += b.load(Relaxed);
                acc
            })
            .collect::<Vec<u64>>()
    };
    // The writer thread updates these one by one: keep +Inf at least the
    // buckets' counts, so a scrape never shows a bucket above +Inf.
    let latency = cumulative(&s.commit_us_log2);
    let records = cumulative(&s.ops_log2);
    let count = s.commits.load(Relaxed);
    let inf = count
        .max(*latency.last().unwrap_or(&0))
        .max(*records.last().unwrap_or(&0));
    (
        BucketCounts {
            cumulative: latency,
            count: inf,
            sum: s.commit_us_total.load(Relaxed),
        },
        BucketCounts {
            cumulative: records,
            count: inf,
            sum: s.ops.load(Relaxed),
        },
    )
}

fn describe_all() {
    describe_counter!(
        "tessera_persistence_commit_errors_total",
        "Persistence commits that failed (a full disk or map, an I/O error) and are retried \
         every second; acknowledgements that wait for them wait meanwhile."
    );
    describe_gauge!(
        "tessera_certificate_expiry_timestamp_seconds",
        "When a certificate stops being valid (the earliest notAfter of a TLS listener's \
         chain and client CA, or of the cluster link's chain and CA), Unix seconds."
    );
    describe_gauge!(
        "tessera_shard_up",
        "1 while the shard's executor runs and answers, 0 otherwise."
    );
    describe_gauge!(
        "tessera_connections_current",
        "Open client TCP connections on the shard, including those not yet past CONNECT."
    );
    describe_gauge!(
        "tessera_listener_connections",
        "Client connections served on the shard (past CONNECT), per listener; transport is the listener kind (mqtt, mqtts, ws, wss, quic)."
    );
    describe_gauge!(
        "tessera_quic_connections",
        "QUIC connections the listener's endpoints hold, handshaking ones included."
    );
    describe_gauge!(
        "tessera_quic_handshakes",
        "QUIC connections of the listener before their MQTT stream (bounded by 4096, all endpoints together)."
    );
    describe_gauge!(
        "tessera_quic_endpoints",
        "Endpoint threads (UDP sockets on the listener's port, datagrams steered by connection id) of the QUIC listener."
    );
    describe_gauge!(
        "tessera_connections_max",
        "The connection limit in force (limits.max_connections, capped by the open-files limit)."
    );
    describe_gauge!(
        "tessera_build_info",
        "Always 1; the version label names the build."
    );
    describe_counter!("tessera_connections_total", "TCP connections accepted.");
    describe_counter!(
        "tessera_backpressure_acks_held_total",
        "Deliveries into a queue at its high-water mark that held the publisher's PUBACK/PUBREC."
    );
    describe_counter!(
        "tessera_backpressure_hold_timeouts_total",
        "Held PUBACK/PUBREC released by limits.backpressure_hold_ms_max, not by the queue draining."
    );
    describe_counter!(
        "tessera_cluster_forward_paced_total",
        "Slices of batches another node forwarded that waited for a subscriber here to catch up \
         (cluster.forward_pace_ms_max)."
    );
    describe_counter!(
        "tessera_cluster_forward_pace_timeouts_total",
        "Such waits that reached cluster.forward_pace_ms_max (a subscriber that did not keep up)."
    );
    describe_counter!(
        "tessera_cluster_move_order_given_up_total",
        "Sessions moved in from another node whose hold for the old node's redirects ran out: \
         what that node still sends on comes after later publications (order, not loss)."
    );
    describe_counter!(
        "tessera_bridge_publishers_paced_total",
        "QoS 0 publishers (a client, or another shard's stream) paused because a bridge's queue \
         was behind (bridge qos0_pace_ms_max)."
    );
    describe_counter!(
        "tessera_bridge_pace_timeouts_total",
        "Bridges still behind at qos0_pace_ms_max: their publishers resumed and they were not \
         waited for during the next second."
    );
    describe_counter!(
        "tessera_backpressure_reads_paused_total",
        "Times a connection stopped being read: more held acknowledgements than the Receive Maximum."
    );
    describe_counter!(
        "tessera_queue_refused_total",
        "QoS 1/2 deliveries a full persistent queue refused (limits.max_queued_bytes or \
         max_queued_bytes_total): the publisher got 0x97 (v5) or no acknowledgement (3.1.1)."
    );
    describe_counter!(
        "tessera_queue_refused_acks_held_total",
        "3.1.1 publishers whose acknowledgement was withheld for a refused message."
    );
    describe_counter!(
        "tessera_queue_refused_closes_total",
        "3.1.1 publishers closed at limits.backpressure_hold_ms_max holding a refused message's \
         acknowledgement (they re-send it after reconnecting)."
    );
    describe_counter!(
        "tessera_queue_over_budget_total",
        "Deliveries queued beyond a byte budget because their publisher was already \
         acknowledged (kept, never dropped)."
    );
    describe_counter!(
        "tessera_queue_spilled_total",
        "Deliveries of persistent sessions written to the queue's disk tail instead of memory."
    );
    describe_counter!(
        "tessera_queue_loaded_total",
        "Deliveries loaded back from disk tails into memory."
    );
    describe_gauge!(
        "tessera_queue_bytes",
        "Budget bytes (topic + payload + 64 each) of queued deliveries, by location: memory \
         (queue heads) or disk (tails only in the store)."
    );
    describe_counter!(
        "tessera_ack_underflows_total",
        "Acknowledgement counters counted down past zero and kept at zero (a bug; should stay 0)."
    );
    describe_counter!(
        "tessera_connects_total",
        "CONNECTs handled, by result: success or the refusal reason."
    );
    describe_counter!(
        "tessera_packets_received_total",
        "MQTT packets received, by type."
    );
    describe_counter!("tessera_packets_sent_total", "MQTT packets sent, by type.");
    describe_counter!(
        "tessera_received_bytes_total",
        Unit::Bytes,
        "Bytes read from client sockets."
    );
    describe_counter!(
        "tessera_sent_bytes_total",
        Unit::Bytes,
        "Bytes written to client connections."
    );
    describe_counter!(
        "tessera_messages_published_total",
        "PUBLISH messages accepted from clients, by QoS."
    );
    describe_counter!(
        "tessera_messages_delivered_total",
        "Messages sent to subscribers, by delivery QoS."
    );
    describe_counter!(
        "tessera_messages_dropped_total",
        "Messages not delivered to a subscriber that should have had them, by reason."
    );
    describe_counter!(
        "tessera_messages_refused_total",
        "PUBLISH packets refused (to $SYS/, or a payload not matching its format indicator)."
    );
    describe_counter!(
        "tessera_messages_offline_qos0_skipped_total",
        "QoS 0 messages not queued for disconnected sessions (by design unless \
         queue_qos0_offline)."
    );
    describe_counter!(
        "tessera_cross_shard_forwards_total",
        "Messages forwarded from this shard to another over the mesh."
    );
    describe_counter!(
        "tessera_cluster_publishes_routed_total",
        "Publications this shard handed to the forwarder for other nodes (one per \
         publication, whatever the number of nodes); 0 outside a cluster."
    );
    describe_counter!(
        "tessera_cluster_publishes_received_total",
        "Publications from other nodes this shard routed; 0 outside a cluster."
    );
    describe_counter!(
        "tessera_protocol_errors_total",
        "Connections closed for a protocol violation."
    );
    describe_counter!(
        "tessera_sessions_expired_total",
        "Sessions ended by their expiry interval or by an operator."
    );
    describe_gauge!(
        "tessera_read_buffers_bytes",
        Unit::Bytes,
        "Bytes of large packets held in read buffers now, all shards (limits.max_read_buffers_bytes)."
    );
    describe_counter!(
        "tessera_limit_refusals_total",
        "Things a configured limit refused, by limit (docs/LIMITS.md): sessions, \
         subscriptions_per_client, retained_messages, retained_bytes, packet_size, read_buffers."
    );
    describe_gauge!(
        "tessera_queue_depth",
        "Messages waiting in session queues behind the inflight windows."
    );
    describe_gauge!(
        "tessera_inflight_messages",
        "QoS 1/2 messages sent and not yet acknowledged."
    );
    describe_gauge!("tessera_sessions", "Sessions by state: online or offline.");
    describe_gauge!(
        "tessera_subscriptions",
        "Subscriptions held by the shard's sessions."
    );
    describe_gauge!(
        "tessera_retained_messages",
        "Retained messages in the shard's replica."
    );
    describe_gauge!(
        "tessera_route_index_filters",
        "Filters in the shard's copy of the route index."
    );
    describe_gauge!(
        "tessera_allocator_info",
        "Always 1; the allocator label names the memory allocator (jemalloc or system)."
    );
    describe_gauge!(
        "tessera_allocator_allocated_bytes",
        Unit::Bytes,
        "Bytes in live allocations (jemalloc)."
    );
    describe_gauge!(
        "tessera_allocator_resident_bytes",
        Unit::Bytes,
        "Bytes of resident pages the allocator holds: live data, metadata and freed pages \
         not yet returned (jemalloc)."
    );
    describe_gauge!(
        "tessera_allocator_dirty_bytes",
        Unit::Bytes,
        "Freed pages waiting for limits.memory_release_delay_ms before they are returned \
         to the OS (jemalloc)."
    );
    describe_counter!(
        "tessera_allocator_released_bytes_total",
        Unit::Bytes,
        "Bytes of freed pages returned to the OS since start (jemalloc)."
    );
    describe_gauge!("process_open_fds", "Open file descriptors.");
    describe_gauge!("process_max_fds", "The soft open-files limit.");
    describe_gauge!(
        "process_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory size."
    );
    describe_gauge!(
        "process_start_time_seconds",
        Unit::Seconds,
        "Start time of the process since the Unix epoch."
    );
}

fn record_shard(shard: &str, s: &ShardSnapshot) {
    let st = &s.stats;
    let p = &s.probe;
    let g = &s.gauges;
    let sh = || shard.to_owned();
    gauge!("tessera_connections_current", "shard" => sh()).set(s.connections_current as f64);
    counter!("tessera_connections_total", "shard" => sh()).absolute(p.connections_accepted);
    for (result, n) in &p.connects {
        counter!("tessera_connects_total", "shard" => sh(), "result" => result.clone())
            .absolute(*n);
    }
    for (t, n) in &p.packets_received {
        counter!("tessera_packets_received_total", "shard" => sh(), "type" => *t).absolute(*n);
    }
    for (t, n) in &p.packets_sent {
        counter!("tessera_packets_sent_total", "shard" => sh(), "type" => *t).absolute(*n);
    }
    counter!("tessera_received_bytes_total", "shard" => sh()).absolute(st.bytes_received);
    counter!("tessera_sent_bytes_total", "shard" => sh()).absolute(st.bytes_sent);
    for (qos, label) in ["0", "1", "2"].iter().enumerate() {
        counter!("tessera_messages_published_total", "shard" => sh(), "qos" => *label)
            .absolute(p.published[qos]);
        counter!("tessera_messages_delivered_total", "shard" => sh(), "qos" => *label)
            .absolute(p.delivered[qos]);
    }
    for (reason, get) in DROP_REASONS {
        counter!("tessera_messages_dropped_total", "shard" => sh(), "reason" => reason)
            .absolute(get(st));
    }
    counter!("tessera_messages_refused_total", "shard" => sh()).absolute(st.publishes_refused);
    counter!("tessera_messages_offline_qos0_skipped_total", "shard" => sh())
        .absolute(st.dropped_qos0_offline);
    counter!("tessera_cross_shard_forwards_total", "shard" => sh())
        .absolute(st.forwards_sent + st.shared_forwards_sent);
    counter!("tessera_cluster_publishes_routed_total", "shard" => sh())
        .absolute(st.remote_forwards_sent);
    counter!("tessera_cluster_publishes_received_total", "shard" => sh())
        .absolute(st.remote_publishes_received);
    counter!("tessera_protocol_errors_total", "shard" => sh()).absolute(st.protocol_errors);
    counter!("tessera_sessions_expired_total", "shard" => sh()).absolute(st.sessions_expired);
    for limit in tessera_shard::engine::Limit::ALL {
        counter!("tessera_limit_refusals_total", "shard" => sh(), "limit" => limit.name())
            .absolute(st.limit_refusals[limit.index()]);
    }
    counter!("tessera_backpressure_acks_held_total", "shard" => sh())
        .absolute(st.backpressure_acks_held);
    counter!("tessera_backpressure_hold_timeouts_total", "shard" => sh())
        .absolute(st.backpressure_hold_timeouts);
    counter!("tessera_backpressure_reads_paused_total", "shard" => sh())
        .absolute(st.backpressure_reads_paused);
    counter!("tessera_cluster_forward_paced_total", "shard" => sh()).absolute(st.forward_paced);
    counter!("tessera_cluster_forward_pace_timeouts_total", "shard" => sh())
        .absolute(st.forward_pace_timeouts);
    counter!("tessera_cluster_move_order_given_up_total", "shard" => sh())
        .absolute(st.moved_order_given_up);
    counter!("tessera_bridge_publishers_paced_total", "shard" => sh()).absolute(st.feed_paced);
    counter!("tessera_bridge_pace_timeouts_total", "shard" => sh()).absolute(st.feed_pace_timeouts);
    counter!("tessera_queue_refused_total", "shard" => sh()).absolute(st.queue_refused);
    counter!("tessera_queue_refused_acks_held_total", "shard" => sh())
        .absolute(st.queue_refused_acks_held);
    counter!("tessera_queue_refused_closes_total", "shard" => sh())
        .absolute(st.queue_refused_closes);
    counter!("tessera_queue_over_budget_total", "shard" => sh()).absolute(st.queue_over_budget);
    counter!("tessera_queue_spilled_total", "shard" => sh()).absolute(st.queue_spilled);
    counter!("tessera_queue_loaded_total", "shard" => sh()).absolute(st.queue_loaded);
    gauge!("tessera_queue_bytes", "shard" => sh(), "location" => "memory")
        .set(g.queue_bytes_memory as f64);
    gauge!("tessera_queue_bytes", "shard" => sh(), "location" => "disk")
        .set(g.queue_bytes_disk as f64);
    counter!("tessera_ack_underflows_total", "shard" => sh()).absolute(st.counter_anomalies);
    gauge!("tessera_queue_depth", "shard" => sh()).set(g.queued as f64);
    gauge!("tessera_inflight_messages", "shard" => sh()).set(g.inflight as f64);
    gauge!("tessera_sessions", "shard" => sh(), "state" => "online").set(g.sessions_online as f64);
    gauge!("tessera_sessions", "shard" => sh(), "state" => "offline")
        .set(g.sessions_offline as f64);
    gauge!("tessera_subscriptions", "shard" => sh()).set(g.subscriptions as f64);
    gauge!("tessera_retained_messages", "shard" => sh()).set(g.retained as f64);
    gauge!("tessera_route_index_filters", "shard" => sh()).set(g.route_filters as f64);
}

/// The allocator's figures (`crate::allocator`); with the system malloc only
/// the info series, naming it.
fn record_allocator() {
    gauge!("tessera_allocator_info", "allocator" => crate::allocator::name()).set(1.0);
    if let Some(a) = crate::allocator::stats() {
        gauge!("tessera_allocator_allocated_bytes").set(a.allocated_bytes as f64);
        gauge!("tessera_allocator_resident_bytes").set(a.resident_bytes as f64);
        gauge!("tessera_allocator_dirty_bytes").set(a.dirty_bytes as f64);
        counter!("tessera_allocator_released_bytes_total").absolute(a.released_bytes_total);
    }
}

fn record_process(p: &ProcessStats) {
    if let Some(v) = p.open_fds {
        gauge!("process_open_fds").set(v as f64);
    }
    if let Some(v) = p.max_fds {
        gauge!("process_max_fds").set(v as f64);
    }
    if let Some(v) = p.resident_memory_bytes {
        gauge!("process_resident_memory_bytes").set(v as f64);
    }
    if let Some(v) = p.start_time_seconds {
        gauge!("process_start_time_seconds").set(v);
    }
}

/// Appends one histogram family: `series` are (shard label, counts);
/// `scale` converts the recorded unit to the exported one (µs -> s).
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    series: &[(Option<&str>, &BucketCounts)],
    bounds: &[f64],
    scale: f64,
) {
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push('\n');
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (shard, counts) in series {
        let labels = |extra: &str| match (shard, extra.is_empty()) {
            (Some(k), true) => format!("{{shard=\"{k}\"}}"),
            (Some(k), false) => format!("{{shard=\"{k}\",{extra}}}"),
            (None, true) => String::new(),
            (None, false) => format!("{{{extra}}}"),
        };
        for (i, b) in bounds.iter().enumerate() {
            let n = counts.cumulative.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{} {n}", labels(&format!("le=\"{b}\"")));
        }
        let _ = writeln!(
            out,
            "{name}_bucket{} {}",
            labels("le=\"+Inf\""),
            counts.count
        );
        let _ = writeln!(
            out,
            "{name}_sum{} {}",
            labels(""),
            counts.sum as f64 * scale
        );
        let _ = writeln!(out, "{name}_count{} {}", labels(""), counts.count);
    }
    out.push('\n');
}
