//! The `bench` command line. The flags named in the README's "Stable flags" list are
//! an interface scripts rely on: rename or remove one only with a deprecation.
//!
//! Common flags are global: they may come before or after the subcommand.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tessera_proto::{ProtocolVersion, QoS};

use crate::payload::{HEADER_BYTES, PAYLOAD_BYTES_MAX};

/// Most publishers or subscribers one run creates.
pub const CLIENTS_PER_ROLE_MAX: u32 = 10_000;

/// Most connections the `conn` scenario opens.
pub const CONN_CLIENTS_MAX: u32 = 1_000_000;

/// Longest `--duration` or `--warmup`, seconds: every run is bounded.
pub const DURATION_S_MAX: f64 = 24.0 * 3600.0;

/// Command-line flags of the `bench` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "bench",
    version,
    about = "MQTT load generator: fan-in, fan-out, latency and connection scenarios"
)]
pub struct Cli {
    /// Flags every scenario takes.
    #[command(flatten)]
    pub common: Common,
    /// The scenario to run.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Flags every scenario takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Broker hosts (IP addresses or names), comma separated; clients are
    /// spread over them round robin.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1",
        value_delimiter = ','
    )]
    pub host: Vec<String>,

    /// Broker port.
    #[arg(long, global = true, default_value_t = 1883)]
    pub port: u16,

    /// Where publishers connect instead, as HOST:PORT, comma separated, round robin
    /// (e.g. another node of a cluster than the subscribers' `--host`/`--port`).
    #[arg(long, global = true, value_delimiter = ',')]
    pub pub_addr: Vec<String>,

    /// QoS of publications and subscriptions.
    #[arg(long, global = true, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,

    /// Payload bytes per message (at least the 24-byte bench header).
    #[arg(long, global = true, default_value_t = 64)]
    pub size: usize,

    /// Seconds measured after the warmup (conn: seconds the connections are held).
    #[arg(long, global = true, default_value_t = 10.0)]
    pub duration: f64,

    /// Messages per publisher; the run ends at --count or --duration, whichever
    /// comes first.
    #[arg(long, global = true)]
    pub count: Option<u64>,

    /// Seconds of load before the measurement window opens. Warmup messages are
    /// checked for loss but not counted in rates or latencies.
    #[arg(long, global = true, default_value_t = 1.0)]
    pub warmup: f64,

    /// Print one JSON object as the last line of stdout.
    #[arg(long, global = true)]
    pub json: bool,

    /// MQTT protocol version: 3.1, 3.1.1 (or 3, 4) or 5.
    #[arg(long, global = true, visible_alias = "protocol", default_value = "3.1.1", value_parser = parse_version)]
    pub mqtt_version: ProtocolVersion,

    /// Local source addresses to spread connections over, comma separated, round
    /// robin (loopback has all of 127.0.0.0/8, so each adds ~28,000 ports).
    #[arg(long, global = true, value_delimiter = ',')]
    pub bind: Vec<IpAddr>,

    /// Persistent sessions: CONNECT with Clean Session (3.1.1) / Clean Start (5)
    /// unset; with MQTT 5 the session outlives the connection by --session-expiry.
    #[arg(long, global = true)]
    pub persistent: bool,

    /// MQTT 5 Session Expiry Interval of --persistent sessions, seconds.
    #[arg(long, global = true, default_value_t = 300)]
    pub session_expiry: u32,

    /// Prefix of every client id (default `bench-RUNID`, which differs per run;
    /// set it to resume --persistent sessions across runs). Ids are
    /// PREFIX-ROLE-INDEX.
    #[arg(long, global = true)]
    pub client_id_prefix: Option<String>,

    /// User name sent in every CONNECT.
    #[arg(long, global = true)]
    pub username: Option<String>,

    /// Password sent in every CONNECT.
    #[arg(long, global = true)]
    pub password: Option<String>,

    /// Write the latency distribution as an HdrHistogram percentile file
    /// (.hgrm text, values in microseconds).
    #[arg(long, global = true)]
    pub hdr_out: Option<PathBuf>,

    /// Write an SVG plot of the latency percentiles and of the rates over time.
    #[arg(long, global = true)]
    pub plot: Option<PathBuf>,

    /// Exit non-zero when more messages than this are lost. Default: 0 for QoS 1
    /// and 2, unlimited for QoS 0.
    #[arg(long, global = true)]
    pub max_loss: Option<u64>,

    /// QoS 1/2: unacknowledged messages per publisher (capped by a v5 broker's
    /// Receive Maximum).
    #[arg(long, global = true, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,

    /// Encoded bytes a publisher holds that the kernel has not yet accepted. QoS 0
    /// publishers are paced by TCP back-pressure through this bound.
    #[arg(long, global = true, default_value_t = 64 * 1024)]
    pub inflight_bytes: usize,

    /// SO_SNDBUF of fanin/fanout publishers, bytes (the kernel doubles it); 0
    /// leaves it to kernel autotuning, which can queue megabytes per connection
    /// that count as sent long before the broker reads them.
    #[arg(long, global = true, default_value_t = 64 * 1024)]
    pub sndbuf: u32,

    /// Subscribers whose connection is lost (the broker restarted) connect
    /// again every 200 ms until the run ends, subscribe again and go on with
    /// the same accounting; with --persistent they resume their session and
    /// get what was queued meanwhile. Without it a lost connection ends the
    /// subscriber.
    #[arg(long, global = true)]
    pub reconnect: bool,

    /// Keep alive announced in CONNECT, seconds; idle clients ping at half of it.
    #[arg(long, global = true, default_value_t = 60)]
    pub keep_alive: u16,

    /// Seconds allowed for connecting and for each handshake answer.
    #[arg(long, global = true, default_value_t = 10.0)]
    pub timeout: f64,

    /// Seconds allowed after the publishers stop for acknowledgements and
    /// deliveries to arrive.
    #[arg(long, global = true, default_value_t = 5.0)]
    pub drain: f64,

    /// The broker's process id: report its CPU use and resident memory.
    #[arg(long, global = true)]
    pub broker_pid: Option<u32>,

    /// Connect over TLS (rustls): needs --ca FILE or --insecure.
    #[arg(long, global = true)]
    pub tls: bool,

    /// Connect with MQTT over QUIC (UDP, one stream per connection, ALPN
    /// mqtt): needs --ca FILE or --insecure, like --tls.
    #[arg(long, global = true)]
    pub quic: bool,

    /// --quic: resume sessions and send CONNECT as 0-RTT early data (the
    /// broker's listener needs zero_rtt = true).
    #[arg(long = "quic-0rtt", global = true)]
    pub quic_0rtt: bool,

    /// --quic: the congestion controller of the client's connections (the
    /// broker's side is the listener's `congestion`).
    #[arg(long = "quic-congestion", global = true, value_enum)]
    pub quic_congestion: Option<crate::transport::QuicCongestion>,

    /// --tls: PEM file of the CA certificates that verify the broker.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,

    /// --tls: do not verify the broker's certificate chain or name (the
    /// handshake signature is still checked).
    #[arg(long, global = true)]
    pub insecure: bool,

    /// --tls: PEM client certificate chain for mutual TLS (with --key).
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,

    /// --tls: PEM private key of --cert.
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,

    /// --tls: server name sent (SNI) and verified; default each --host.
    #[arg(long, global = true)]
    pub sni: Option<String>,

    /// --tls: let clients resume TLS sessions; by default every connection
    /// makes a full handshake.
    #[arg(long, global = true)]
    pub tls_resume: bool,

    /// Tokio worker threads; default: the CPUs this process may run on.
    #[arg(long, global = true)]
    pub threads: Option<usize>,

    /// Split the clients over N bench processes (this binary re-executed), and
    /// merge their reports: for more connections than one process's open-files
    /// limit allows, or more load than one process drives.
    #[arg(long, global = true, default_value_t = 1)]
    pub procs: u32,

    /// Internal: this process is child K of a --procs run.
    #[arg(long, global = true, hide = true)]
    pub child: Option<u32>,

    /// First topic level of every bench topic.
    #[arg(long, global = true, default_value = "bench")]
    pub topic_prefix: String,
}

/// The scenarios.
#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// N publishers on PREFIX/i, as fast as allowed, to subscribers on PREFIX/#.
    Fanin {
        /// Publishers.
        #[arg(long, default_value_t = 8)]
        publishers: u32,
        /// Subscribers, each receiving every message.
        #[arg(long, default_value_t = 1)]
        subscribers: u32,
        /// Messages per second per publisher; default: as fast as allowed.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// One publisher on PREFIX/0, as fast as allowed, to N subscribers of PREFIX/0.
    Fanout {
        /// Subscribers, each receiving every message.
        #[arg(long, default_value_t = 100)]
        subscribers: u32,
        /// Messages per second; default: as fast as allowed.
        #[arg(long)]
        rate: Option<f64>,
        /// MQTT 5 topic aliases: subscribers announce a Topic Alias Maximum so the
        /// broker may replace the topic by an alias, and the publisher uses one.
        #[arg(long)]
        topic_alias: bool,
    },
    /// C publishers on a topic template (%i client index, %c client id), and no
    /// subscriber: the publish rate and, at QoS 1/2, the acknowledgements.
    Pub {
        /// Publishers.
        #[arg(long, default_value_t = 1)]
        clients: u32,
        /// Topic template; default PREFIX/%i.
        #[arg(long)]
        topic: Option<String>,
        /// Messages per second per publisher; default: as fast as allowed.
        #[arg(long)]
        rate: Option<f64>,
        /// Publish with the retain flag.
        #[arg(long)]
        retain: bool,
    },
    /// C subscribers on a filter template (%i, %c), for messages published by
    /// another process (`bench pub`, any client). Bench payloads are accounted
    /// per publisher (duplicates, order, gaps); others are only counted.
    Sub {
        /// Subscribers.
        #[arg(long, default_value_t = 1)]
        clients: u32,
        /// Topic filter template; default PREFIX/#.
        #[arg(long)]
        topic: Option<String>,
    },
    /// C publisher/subscriber pairs: publisher i on PREFIX/pair/i, subscriber i
    /// on the same topic.
    Pubsub {
        /// Pairs.
        #[arg(long, default_value_t = 10)]
        clients: u32,
        /// Messages per second per publisher; default: as fast as allowed.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// N publishers on PREFIX/i to G shared-subscription groups
    /// `$share/gJ/FILTER` of M members each: every message must reach exactly one
    /// member of every group.
    Shared {
        /// Publishers.
        #[arg(long, default_value_t = 8)]
        publishers: u32,
        /// Groups.
        #[arg(long, default_value_t = 1)]
        groups: u32,
        /// Members per group.
        #[arg(long, default_value_t = 4)]
        members: u32,
        /// Filter the groups share; default PREFIX/#.
        #[arg(long)]
        filter: Option<String>,
        /// Messages per second per publisher; default: as fast as allowed.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// One publisher at a fixed rate, one subscriber; latency from each message's
    /// intended send time (coordinated-omission aware).
    Latency {
        /// Messages per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Publish and read deliveries from one thread that polls both sockets
        /// without ever sleeping, so the bench's own wake-up is not counted
        /// against the broker. Costs one busy core.
        #[arg(long)]
        busy_poll: bool,
        /// With --busy-poll: once every message sent so far was delivered,
        /// sleep until this many microseconds before the next send is
        /// due, then poll again. Deliveries are still read while polling, but the
        /// bench's core is idle between messages: on a small virtual machine two
        /// always-busy vCPUs stall each other, which would land in the figure of
        /// a broker that polls its own core.
        #[arg(long, requires = "busy_poll", value_name = "MICROSECONDS")]
        busy_poll_lead: Option<u64>,
    },
    /// Run a scenario matrix against two brokers, interleaved (A, B, A, B...),
    /// and print each figure's median with the ratio B/A. Common flags
    /// (--duration, --warmup, --size, --drain, --threads) apply to every run.
    Compare {
        /// Broker A, HOST:PORT (an IP address).
        #[arg(long)]
        a: std::net::SocketAddr,
        /// Broker B, HOST:PORT (an IP address).
        #[arg(long)]
        b: std::net::SocketAddr,
        /// Name of broker A in the output.
        #[arg(long, default_value = "a")]
        a_name: String,
        /// Name of broker B in the output.
        #[arg(long, default_value = "b")]
        b_name: String,
        /// Process id of broker A (CPU and memory figures).
        #[arg(long)]
        a_pid: Option<u32>,
        /// Process id of broker B.
        #[arg(long)]
        b_pid: Option<u32>,
        /// Runs per scenario and broker; each figure is their median.
        #[arg(long, default_value_t = 3)]
        reps: u32,
        /// Matrix entries to run, comma separated (default: all but conn-5k):
        /// fanin-q0, fanin-q1, fanout-q0, fanout-alias, shared-q1, pubsub-q1,
        /// latency-q0, latency-q1, conn-5k.
        #[arg(long, value_delimiter = ',')]
        scenarios: Vec<String>,
        /// Also print the results as a Markdown table.
        #[arg(long)]
        markdown: bool,
    },
    /// Open C connections at R per second, hold them for --duration, report
    /// connect latency, failures and (with --broker-pid) broker memory per
    /// connection.
    Conn {
        /// Connections to open.
        #[arg(long, default_value_t = 1000)]
        clients: u32,
        /// Connections opened per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Exit non-zero when more connections than this fail or drop.
        #[arg(long, default_value_t = 0)]
        max_failures: u64,
    },
}

fn parse_version(s: &str) -> Result<ProtocolVersion, String> {
    match s {
        "3.1" => Ok(ProtocolVersion::V3_1),
        "3" | "3.1.1" | "4" => Ok(ProtocolVersion::V3_1_1),
        "5" | "5.0" => Ok(ProtocolVersion::V5),
        _ => Err(format!("{s:?}: expected 3.1, 3.1.1 (or 3, 4) or 5")),
    }
}

impl Cli {
    /// The QoS as the codec's type.
    pub fn qos(&self) -> QoS {
        QoS::from_u8(self.common.qos).expect("clap checked the range")
    }

    /// Checks relations clap cannot express; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        let c = &self.common;
        if !(HEADER_BYTES..=PAYLOAD_BYTES_MAX).contains(&c.size) {
            return Err(format!(
                "--size {}: must be {HEADER_BYTES}..={PAYLOAD_BYTES_MAX} bytes (the bench header takes {HEADER_BYTES})",
                c.size
            ));
        }
        for (name, v) in [
            ("--duration", c.duration),
            ("--timeout", c.timeout),
            ("--drain", c.drain),
        ] {
            if !(v > 0.0 && v <= DURATION_S_MAX) {
                return Err(format!("{name} {v}: must be in (0, {DURATION_S_MAX}]"));
            }
        }
        if !(0.0..=DURATION_S_MAX).contains(&c.warmup) {
            return Err(format!(
                "--warmup {}: must be in [0, {DURATION_S_MAX}]",
                c.warmup
            ));
        }
        if !(1..=crate::procs::PROCS_MAX).contains(&c.procs) {
            return Err(format!(
                "--procs {}: must be 1..={}",
                c.procs,
                crate::procs::PROCS_MAX
            ));
        }
        if let Some(k) = c.child
            && k >= c.procs
        {
            return Err(format!("--child {k}: must be below --procs {}", c.procs));
        }
        let tls_only = [
            ("--ca", c.ca.is_some()),
            ("--insecure", c.insecure),
            ("--cert", c.cert.is_some()),
            ("--key", c.key.is_some()),
            ("--sni", c.sni.is_some()),
            ("--tls-resume", c.tls_resume),
        ];
        if !c.tls
            && !c.quic
            && let Some((name, _)) = tls_only.iter().find(|(_, set)| *set)
        {
            return Err(format!("{name}: only with --tls or --quic"));
        }
        if c.tls && c.quic {
            return Err("--tls and --quic: choose one".into());
        }
        if c.quic_0rtt && !c.quic {
            return Err("--quic-0rtt: only with --quic".into());
        }
        if c.quic_congestion.is_some() && !c.quic {
            return Err("--quic-congestion: only with --quic".into());
        }
        if c.quic && c.ca.is_none() && !c.insecure {
            return Err("--quic needs --ca FILE (a PEM CA to trust) or --insecure".into());
        }
        if c.cert.is_some() != c.key.is_some() {
            return Err("--cert and --key go together".into());
        }
        if c.tls && c.ca.is_none() && !c.insecure {
            return Err("--tls needs --ca FILE (a PEM CA to trust) or --insecure".into());
        }
        if c.count == Some(0) {
            return Err("--count 0: must be at least 1".into());
        }
        if c.inflight_bytes == 0 {
            return Err("--inflight-bytes 0: must be at least 1".into());
        }
        if c.threads == Some(0) {
            return Err("--threads 0: must be at least 1".into());
        }
        if c.topic_prefix.is_empty() || c.topic_prefix.contains(['#', '+']) {
            return Err(format!(
                "--topic-prefix {:?}: must be a non-empty topic name",
                c.topic_prefix
            ));
        }
        let role = |name: &str, n: u32| {
            if (1..=CLIENTS_PER_ROLE_MAX).contains(&n) {
                Ok(())
            } else {
                Err(format!("--{name} {n}: must be 1..={CLIENTS_PER_ROLE_MAX}"))
            }
        };
        let rate = |r: f64| {
            if r > 0.0 && r.is_finite() {
                Ok(())
            } else {
                Err(format!("--rate {r}: must be positive"))
            }
        };
        match &self.scenario {
            Scenario::Fanin {
                publishers,
                subscribers,
                rate: r,
            } => {
                role("publishers", *publishers)?;
                role("subscribers", *subscribers)?;
                r.map_or(Ok(()), rate)
            }
            Scenario::Fanout {
                subscribers,
                rate: r,
                topic_alias,
            } => {
                role("subscribers", *subscribers)?;
                if *topic_alias && c.mqtt_version != ProtocolVersion::V5 {
                    return Err("--topic-alias needs --protocol 5".into());
                }
                r.map_or(Ok(()), rate)
            }
            Scenario::Pub {
                clients,
                topic,
                rate: r,
                ..
            } => {
                role("clients", *clients)?;
                if let Some(t) = topic
                    && (t.is_empty() || t.contains(['#', '+']))
                {
                    return Err(format!(
                        "--topic {t:?}: a publisher's topic has no wildcards"
                    ));
                }
                r.map_or(Ok(()), rate)
            }
            Scenario::Sub { clients, topic } => {
                role("clients", *clients)?;
                match topic {
                    Some(t) if t.is_empty() => Err("--topic: must not be empty".into()),
                    _ => Ok(()),
                }
            }
            Scenario::Pubsub { clients, rate: r } => {
                role("clients", *clients)?;
                r.map_or(Ok(()), rate)
            }
            Scenario::Shared {
                publishers,
                groups,
                members,
                filter,
                rate: r,
            } => {
                role("publishers", *publishers)?;
                role("groups", *groups)?;
                role("members", *members)?;
                if u64::from(*groups) * u64::from(*members) > u64::from(CLIENTS_PER_ROLE_MAX) {
                    return Err(format!(
                        "--groups {groups} x --members {members}: at most {CLIENTS_PER_ROLE_MAX} subscribers"
                    ));
                }
                if let Some(f) = filter
                    && (f.is_empty() || f.starts_with("$share/"))
                {
                    return Err(format!(
                        "--filter {f:?}: a plain topic filter (the bench adds $share/GROUP/)"
                    ));
                }
                r.map_or(Ok(()), rate)
            }
            Scenario::Latency { rate: r, .. } => rate(*r),
            Scenario::Compare {
                reps, scenarios, ..
            } => {
                if !(1..=100).contains(reps) {
                    return Err(format!("--reps {reps}: must be 1..=100"));
                }
                for name in scenarios {
                    if !crate::compare::MATRIX.iter().any(|e| e.name == name) {
                        return Err(format!("--scenarios: no scenario {name:?} in the matrix"));
                    }
                }
                Ok(())
            }
            Scenario::Conn {
                clients, rate: r, ..
            } => {
                if c.count.is_some() {
                    return Err("conn: --count does not apply; use --clients".into());
                }
                if !(1..=CONN_CLIENTS_MAX).contains(clients) {
                    return Err(format!(
                        "--clients {clients}: must be 1..={CONN_CLIENTS_MAX}"
                    ));
                }
                rate(*r)
            }
        }
    }

    /// For child `k` of a `--procs` run: the same scenario with its share of
    /// every client count (at least one of each role) and of the `conn` rate,
    /// on its own topic subtree and client ids.
    pub fn child_share(&mut self, k: u32) {
        use crate::procs::share;
        let p = self.common.procs;
        let part = |n: &mut u32| *n = share(*n, k, p).max(1);
        match &mut self.scenario {
            Scenario::Fanin {
                publishers,
                subscribers,
                ..
            } => {
                part(publishers);
                part(subscribers);
            }
            Scenario::Fanout { subscribers, .. } => part(subscribers),
            Scenario::Pub { clients, .. }
            | Scenario::Sub { clients, .. }
            | Scenario::Pubsub { clients, .. } => part(clients),
            Scenario::Shared {
                publishers,
                members,
                ..
            } => {
                part(publishers);
                part(members);
            }
            Scenario::Conn { clients, rate, .. } => {
                *clients = share(*clients, k, p);
                *rate /= f64::from(p);
            }
            Scenario::Latency { .. } | Scenario::Compare { .. } => {}
        }
        self.common.topic_prefix = format!("{}/p{k}", self.common.topic_prefix);
        self.common.client_id_prefix = self
            .common
            .client_id_prefix
            .as_ref()
            .map(|c| format!("{c}-p{k}"));
    }

    /// The loss above which the run fails.
    pub fn max_loss(&self) -> Option<u64> {
        match (self.common.max_loss, self.common.qos) {
            (Some(m), _) => Some(m),
            (None, 0) => None,
            (None, _) => Some(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn common_flags_go_before_or_after_the_subcommand() {
        let a = Cli::try_parse_from(["bench", "--qos", "1", "fanin", "--publishers", "4"]).unwrap();
        let b = Cli::try_parse_from(["bench", "fanin", "--publishers", "4", "--qos", "1"]).unwrap();
        assert_eq!(a.common.qos, 1);
        assert_eq!(b.common.qos, 1);
        assert!(matches!(
            b.scenario,
            Scenario::Fanin {
                publishers: 4,
                subscribers: 1,
                rate: None
            }
        ));
    }

    #[test]
    fn max_loss_defaults_by_qos() {
        let q0 = Cli::try_parse_from(["bench", "fanout"]).unwrap();
        let q1 = Cli::try_parse_from(["bench", "fanout", "--qos", "1"]).unwrap();
        let set = Cli::try_parse_from(["bench", "fanout", "--max-loss", "5"]).unwrap();
        assert_eq!(q0.max_loss(), None);
        assert_eq!(q1.max_loss(), Some(0));
        assert_eq!(set.max_loss(), Some(5));
    }

    #[test]
    fn bind_list_and_versions_parse() {
        let c = Cli::try_parse_from([
            "bench",
            "conn",
            "--bind",
            "127.0.0.2,127.0.0.3",
            "--mqtt-version",
            "5",
        ])
        .unwrap();
        assert_eq!(c.common.mqtt_version, ProtocolVersion::V5);
        assert_eq!(c.common.bind.len(), 2);
        assert!(Cli::try_parse_from(["bench", "conn", "--mqtt-version", "4.2"]).is_err());
        let p = Cli::try_parse_from(["bench", "pub", "--protocol", "3.1"]).unwrap();
        assert_eq!(p.common.mqtt_version, ProtocolVersion::V3_1);
        let h = Cli::try_parse_from(["bench", "--host", "a,b", "sub"]).unwrap();
        assert_eq!(h.common.host, ["a", "b"]);
    }

    #[test]
    fn validation_names_the_flag() {
        let small = Cli::try_parse_from(["bench", "fanin", "--size", "8"]).unwrap();
        assert!(small.validate().unwrap_err().contains("--size"));
        let none = Cli::try_parse_from(["bench", "fanin", "--publishers", "0"]).unwrap();
        assert!(none.validate().unwrap_err().contains("--publishers"));
        let ok = Cli::try_parse_from(["bench", "latency", "--rate", "500"]).unwrap();
        assert_eq!(ok.validate(), Ok(()));
        let alias = Cli::try_parse_from(["bench", "fanout", "--topic-alias"]).unwrap();
        assert!(alias.validate().unwrap_err().contains("--protocol 5"));
        let wild = Cli::try_parse_from(["bench", "pub", "--topic", "a/#"]).unwrap();
        assert!(wild.validate().unwrap_err().contains("--topic"));
        let big = Cli::try_parse_from(["bench", "shared", "--groups", "200", "--members", "100"])
            .unwrap();
        assert!(big.validate().unwrap_err().contains("--members"));
    }
}
