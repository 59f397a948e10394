//! The `[cluster]` section: this node's place in a cluster (issue 14). Its own home, as
//! issue 15 asks: the struct, its documented fields ([`FIELDS`], chained after the
//! other sections' in the default file and the environment-variable names), its setter
//! from text and its checks.
//!
//! Without `node_id` (and every other cluster setting unset) the broker is a single node,
//! exactly as before. With it, `listen`, `certs` and either `peers` or `join` are
//! required. Flags: `--node-id`, `--cluster-listen`, `--cluster-peers`, `--cluster-certs`,
//! `--join` ([`crate::cli::Cli`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::FieldDoc;

/// The largest `retained_inline_bytes`: the record (payload plus topic, properties and
/// framing) must stay within raft's 64 KiB bound for an inline retained record.
pub const RETAINED_INLINE_BYTES_MAX: usize = 60_000;

/// The largest `forward_pace_ms_max`: a wait holds the whole stream from another node.
pub const FORWARD_PACE_MS_MAX: u64 = 1_000;

/// The session lease when `session_lease_ms` is unset and the election timeouts are
/// the defaults or shorter ([`ClusterConfig::session_lease`]), ms. Issue 16 asks for a
/// default of at most 2 s.
pub const SESSION_LEASE_DEFAULT_MS: u64 = 2_000;

/// The `[cluster]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id; unset: no cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    /// The UDP address the cluster link listens on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// The initial voters, `ID=ADDR:PORT` each, the same list on every initial node.
    pub peers: Vec<String>,
    /// The directory with `ca.pem`, `node-<id>.pem` and `node-<id>.key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certs: Option<PathBuf>,
    /// The cluster address of a running member to join through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<SocketAddr>,
    /// Lower bound of the raft election timeout, ms.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the raft election timeout, ms.
    pub election_timeout_max_ms: u64,
    /// Leader heartbeat interval, ms.
    pub heartbeat_interval_ms: u64,
    /// Take a raft snapshot (and purge the log) after this many entries.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log behind a snapshot, for slow followers.
    pub logs_kept_after_snapshot: u64,
    /// MQTT 5 clients whose session another node holds are redirected there.
    pub redirect_to_owner: bool,
    /// A takeover whose old owner cannot be reached refuses the CONNECT until that
    /// node is back (or removed from the cluster), instead of starting a new session
    /// that would leave the acknowledged messages kept there behind.
    pub wait_for_session_owner: bool,
    /// Retained payloads up to this many bytes ride in the raft entry; larger ones stay
    /// on the node they were published on and the entry carries a reference.
    pub retained_inline_bytes: usize,
    /// Longest a forwarded batch waits, before its next slice, for a subscriber here
    /// that its QoS 0 messages found behind, ms; 0: never waits.
    pub forward_pace_ms_max: u64,
    /// How long this node keeps serving the ClientIDs it holds without contact with
    /// its cluster (its leader, or as leader a quorum), ms. Unset: see
    /// [`ClusterConfig::session_lease`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_lease_ms: Option<u64>,
    /// Bytes of batches for unreachable peers this node keeps on disk
    /// (`data_dir/hints`) so their publishers are answered; 0: none (publishers wait
    /// for the peer).
    pub hint_budget_bytes: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: None,
            listen: None,
            peers: Vec::new(),
            certs: None,
            join: None,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            heartbeat_interval_ms: 100,
            snapshot_logs_since_last: 20_000,
            logs_kept_after_snapshot: 2_000,
            redirect_to_owner: false,
            wait_for_session_owner: true,
            retained_inline_bytes: 1024,
            forward_pace_ms_max: 20,
            session_lease_ms: None,
            hint_budget_bytes: HINT_BUDGET_DEFAULT_BYTES,
        }
    }
}

/// `cluster.hint_budget_bytes` unless set: 1 GiB.
pub const HINT_BUDGET_DEFAULT_BYTES: u64 = 1 << 30;
/// The largest `cluster.hint_budget_bytes`: 1 TiB.
pub const HINT_BUDGET_MAX_BYTES: u64 = 1 << 40;

/// The `[cluster]` settings, in the order of the documented default file.
pub const FIELDS: &[FieldDoc] = &[
    FieldDoc {
        section: "cluster",
        key: "node_id",
        doc: "This node's id in the cluster (flag --node-id). Unset: a single node, no \
              cluster. Stored in data_dir/raft at first start; a later start with another \
              id is refused.",
        accepted: "an integer from 1 to 18446744073709551615",
    },
    FieldDoc {
        section: "cluster",
        key: "listen",
        doc: "UDP address of the cluster link (QUIC with mutual TLS) (flag \
              --cluster-listen); other nodes reach this node here. Default port 7000.",
        accepted: "a socket address, e.g. \"10.0.0.1:7000\"",
    },
    FieldDoc {
        section: "cluster",
        key: "peers",
        doc: "The initial voters (flag --cluster-peers), the same list on every initial \
              node, as etcd's --initial-cluster. Empty for a node that joins a running \
              cluster. Later changes go through `brokerctl cluster join/remove`.",
        accepted: "a list of ID=ADDR:PORT, e.g. [\"1=10.0.0.1:7000\", \"2=10.0.0.2:7000\"] \
                   (in an environment variable: comma-separated)",
    },
    FieldDoc {
        section: "cluster",
        key: "certs",
        doc: "Directory with the cluster CA (ca.pem) and this node's certificate and key \
              (node-<id>.pem, node-<id>.key), made by `brokerctl cluster certs` (flag \
              --cluster-certs).",
        accepted: "a directory path",
    },
    FieldDoc {
        section: "cluster",
        key: "join",
        doc: "Cluster address of a running member (flag --join): this node joins as a \
              learner, catches up, then becomes a voter.",
        accepted: "a socket address",
    },
    FieldDoc {
        section: "cluster",
        key: "election_timeout_min_ms",
        doc: "Lower bound of the randomized raft election timeout, ms. The link's \
              keep-alive is a quarter of it.",
        accepted: "an integer from 10 to 60000, below election_timeout_max_ms",
    },
    FieldDoc {
        section: "cluster",
        key: "election_timeout_max_ms",
        doc: "Upper bound of the raft election timeout, ms; also how long a silent peer \
              takes to be declared unreachable.",
        accepted: "an integer from 20 to 120000",
    },
    FieldDoc {
        section: "cluster",
        key: "heartbeat_interval_ms",
        doc: "Interval of the leader's heartbeats, ms.",
        accepted: "an integer from 1 to half of election_timeout_min_ms",
    },
    FieldDoc {
        section: "cluster",
        key: "snapshot_logs_since_last",
        doc: "Entries after which raft snapshots its state machine and purges the log, so \
              data_dir/raft stays bounded.",
        accepted: "an integer from 1 to 100000000",
    },
    FieldDoc {
        section: "cluster",
        key: "logs_kept_after_snapshot",
        doc: "Entries kept in the log behind a snapshot, so a follower slightly behind \
              catches up from the log instead of a snapshot.",
        accepted: "an integer from 0 to 100000000",
    },
    FieldDoc {
        section: "cluster",
        key: "redirect_to_owner",
        doc: "An MQTT 5 client that connects to this node while another node holds its \
              session is refused with CONNACK 0x9C (use another server) naming that node's \
              MQTT address (Server Reference), instead of the session moving here. Off: the \
              session moves to the node the client chose (a takeover).",
        accepted: "true or false",
    },
    FieldDoc {
        section: "cluster",
        key: "wait_for_session_owner",
        doc: "A client that reconnects without Clean Start to this node while the node \
              holding its session cannot be reached (killed, cut off) is refused with \
              CONNACK 0x88 / return code 3 (server unavailable) until that node is back or \
              removed from the cluster, and then gets its session (session present 1) \
              with every message acknowledged for it: nothing acknowledged is left behind. \
              Off: after that node's session lease the client gets a new, empty session \
              here (availability first), and what the unreachable node kept for it is \
              dropped when it returns.",
        accepted: "true or false",
    },
    FieldDoc {
        section: "cluster",
        key: "retained_inline_bytes",
        doc: "Retained messages whose payload is at most this many bytes are replicated \
              inside the raft entry that sets them. Larger ones stay on the node they were \
              published on: the entry carries a reference (node, log index, size, digest) \
              and every other node fetches the message from there once, checks its digest \
              and keeps it (served as cleared, with an ERROR line, if the origin cannot \
              give it).",
        accepted: "an integer from 0 to 60000",
    },
    FieldDoc {
        section: "cluster",
        key: "forward_pace_ms_max",
        doc: "A batch of messages another node forwarded is delivered here in slices; before \
              each slice, a subscriber that the QoS 0 messages before it found behind (its \
              connection's output over its bound) is waited for, at most this long, so a \
              subscriber that reads gets them instead of its queue overflowing. The wait \
              holds everything that node sends this one (other subscribers' messages, route \
              barriers, session hand-overs), so it is short, and a subscriber that did not \
              catch up in time is not waited for during the next second (its queue overflows \
              by its policy). 0: never wait.",
        accepted: "an integer from 0 to 1000",
    },
    FieldDoc {
        section: "cluster",
        key: "session_lease_ms",
        doc: "How long this node keeps serving its clients without contact with its \
              cluster (no word from the leader; as leader, no answer from a quorum), ms. \
              Then the rest of the cluster may have given their ClientIDs to other nodes, \
              so their connections end (v5 DISCONNECT 0x9C, use another server) and reconnects here are \
              refused until contact is back. A node that takes a ClientID over from an \
              unreachable node waits this long before its CONNACK, so two live \
              connections of one ClientID never overlap. Longer than a leader failover \
              (with one split vote), so an election does not end connections.",
        accepted: "an integer from three times election_timeout_max_ms plus \
                   heartbeat_interval_ms to 600000; unset: 2000 or that floor, whichever \
                   is larger",
    },
    FieldDoc {
        section: "cluster",
        key: "hint_budget_bytes",
        doc: "Hints: once another node has not answered for longer than the session lease, \
              the QoS 1/2 messages this node forwards to it are written to data_dir/hints \
              (one fsync per batch) and their publishers answered, so a dead node does not \
              stall publishers on the others; they are sent when it is back, and deleted \
              once delivered. At this many bytes of hints (all peers) publishers wait for \
              the node again. Watch tessera_cluster_forward_hinted_bytes. 0: no hints.",
        accepted: "an integer from 0 to 1099511627776",
    },
];

/// A `[cluster]` value that cannot work: the field (dotted), the value and what is
/// accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The dotted field.
    pub field: &'static str,
    /// The value as written in TOML.
    pub value: String,
    /// What is accepted.
    pub expected: String,
}

impl ClusterConfig {
    /// Whether any cluster setting is given (then the node runs in a cluster).
    pub fn enabled(&self) -> bool {
        self.node_id.is_some()
            || self.listen.is_some()
            || !self.peers.is_empty()
            || self.certs.is_some()
            || self.join.is_some()
    }

    /// The session lease: `session_lease_ms`, or [`SESSION_LEASE_DEFAULT_MS`] or three
    /// longest election timeouts plus a heartbeat, whichever is longer. The lease must
    /// outlast the silence a follower sees in a failover, or an election fences healthy
    /// nodes: the old leader's last heartbeat (up to one interval before it died), the
    /// leader lease a follower waits (`election_timeout_max`), its own timeout (at most
    /// `election_timeout_max`), and, if two voters split the vote, one more timeout;
    /// then the vote and the new leader's first append (milliseconds). With the defaults
    /// 100 + 600 + 600 + 600 = 1.9 s, under the 2 s (measured failovers 0.9-1.2 s,
    /// `raft_bench --kind failover`, BENCHMARKS).
    pub fn session_lease(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.session_lease_ms.unwrap_or(
                SESSION_LEASE_DEFAULT_MS
                    .max(3 * self.election_timeout_max_ms + self.heartbeat_interval_ms),
            ),
        )
    }

    /// Sets one `[cluster]` key from its text form.
    pub(super) fn set(&mut self, key: &str, v: &str) -> Result<(), ()> {
        fn p<T: FromStr>(v: &str) -> Result<T, ()> {
            v.parse().map_err(|_| ())
        }
        match key {
            "node_id" => self.node_id = Some(p(v)?),
            "listen" => self.listen = Some(p(v)?),
            "peers" => {
                self.peers = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "certs" => self.certs = Some(PathBuf::from(v)),
            "join" => self.join = Some(p(v)?),
            "election_timeout_min_ms" => self.election_timeout_min_ms = p(v)?,
            "election_timeout_max_ms" => self.election_timeout_max_ms = p(v)?,
            "heartbeat_interval_ms" => self.heartbeat_interval_ms = p(v)?,
            "snapshot_logs_since_last" => self.snapshot_logs_since_last = p(v)?,
            "logs_kept_after_snapshot" => self.logs_kept_after_snapshot = p(v)?,
            "redirect_to_owner" => self.redirect_to_owner = p(v)?,
            "wait_for_session_owner" => self.wait_for_session_owner = p(v)?,
            "retained_inline_bytes" => self.retained_inline_bytes = p(v)?,
            "forward_pace_ms_max" => self.forward_pace_ms_max = p(v)?,
            "session_lease_ms" => self.session_lease_ms = Some(p(v)?),
            "hint_budget_bytes" => self.hint_budget_bytes = p(v)?,
            key => unreachable!("FIELDS entry cluster.{key} has no setter"),
        }
        Ok(())
    }

    /// The initial voters, parsed: `ID=ADDR:PORT` each, ids distinct and above 0.
    pub fn peer_map(&self) -> Result<BTreeMap<u64, SocketAddr>, Invalid> {
        let mut map = BTreeMap::new();
        for entry in &self.peers {
            let bad = |why: String| Invalid {
                field: "cluster.peers",
                value: format!("{:?}", self.peers),
                expected: format!("ID=ADDR:PORT entries ({why})"),
            };
            let (id, addr) = entry
                .split_once('=')
                .ok_or_else(|| bad(format!("{entry:?} has no '='")))?;
            let id: u64 = id
                .trim()
                .parse()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| bad(format!("{entry:?}: the id must be an integer above 0")))?;
            let addr: SocketAddr = addr
                .trim()
                .parse()
                .map_err(|_| bad(format!("{entry:?}: not a socket address")))?;
            if map.insert(id, addr).is_some() {
                return Err(bad(format!("node {id} is listed twice")));
            }
        }
        Ok(map)
    }

    /// Checks the section: nothing when no cluster setting is given; otherwise a node id,
    /// a listen address, a certificate directory, and peers or a join address that fit.
    pub fn validate(&self) -> Result<(), Invalid> {
        if !self.enabled() {
            return Ok(());
        }
        let invalid = |field: &'static str, value: String, expected: &str| {
            Err(Invalid {
                field,
                value,
                expected: expected.to_owned(),
            })
        };
        let Some(node_id) = self.node_id else {
            return invalid(
                "cluster.node_id",
                "unset".into(),
                "a node id (--node-id N) whenever another cluster setting is given",
            );
        };
        if node_id == 0 {
            return invalid("cluster.node_id", "0".into(), "an integer from 1");
        }
        if self.forward_pace_ms_max > FORWARD_PACE_MS_MAX {
            return invalid(
                "cluster.forward_pace_ms_max",
                self.forward_pace_ms_max.to_string(),
                "an integer from 0 to 1000",
            );
        }
        if self.retained_inline_bytes > RETAINED_INLINE_BYTES_MAX {
            return invalid(
                "cluster.retained_inline_bytes",
                self.retained_inline_bytes.to_string(),
                "an integer from 0 to 60000",
            );
        }
        let Some(listen) = self.listen else {
            return invalid(
                "cluster.listen",
                "unset".into(),
                "the cluster link's UDP address (--cluster-listen ADDR:PORT)",
            );
        };
        if self.certs.is_none() {
            return invalid(
                "cluster.certs",
                "unset".into(),
                "the certificate directory (--cluster-certs DIR, made by `brokerctl cluster \
                 certs`)",
            );
        }
        let peers = self.peer_map()?;
        if peers.is_empty() && self.join.is_none() {
            return invalid(
                "cluster.peers",
                "[]".into(),
                "the initial voters (--cluster-peers 1=ADDR:PORT,...), or --join ADDR:PORT \
                 to join a running cluster",
            );
        }
        if let Some(mine) = peers.get(&node_id)
            && *mine != listen
        {
            return Err(Invalid {
                field: "cluster.peers",
                value: format!("{:?}", self.peers),
                expected: format!(
                    "node {node_id} at its cluster.listen address {listen} (the list says {mine})"
                ),
            });
        }
        if self.join.is_some() && listen.ip().is_unspecified() {
            return invalid(
                "cluster.listen",
                format!("\"{listen}\""),
                "a specific address when joining (the cluster dials this node there)",
            );
        }
        let (min, max, hb) = (
            self.election_timeout_min_ms,
            self.election_timeout_max_ms,
            self.heartbeat_interval_ms,
        );
        if !(10..=60_000).contains(&min) || min >= max {
            return invalid(
                "cluster.election_timeout_min_ms",
                min.to_string(),
                "an integer from 10 to 60000, below cluster.election_timeout_max_ms",
            );
        }
        if max > 120_000 {
            return invalid(
                "cluster.election_timeout_max_ms",
                max.to_string(),
                "an integer up to 120000",
            );
        }
        if hb == 0 || hb * 2 > min {
            return invalid(
                "cluster.heartbeat_interval_ms",
                hb.to_string(),
                "an integer from 1 to half of cluster.election_timeout_min_ms",
            );
        }
        // The floor is the failover's silence with one split vote (`session_lease`): a
        // lease between two election timeouts (the floor before) and that silence ended
        // every connection of a healthy node whenever an election took a second round.
        if let Some(lease) = self.session_lease_ms
            && (lease < 3 * max + hb || lease > 600_000)
        {
            return invalid(
                "cluster.session_lease_ms",
                lease.to_string(),
                "an integer from three times cluster.election_timeout_max_ms plus \
                 cluster.heartbeat_interval_ms to 600000 (a lease shorter than a failover \
                 would end every connection at each election)",
            );
        }
        if self.hint_budget_bytes > HINT_BUDGET_MAX_BYTES {
            return invalid(
                "cluster.hint_budget_bytes",
                self.hint_budget_bytes.to_string(),
                "an integer from 0 to 1099511627776",
            );
        }
        if !(1..=100_000_000).contains(&self.snapshot_logs_since_last) {
            return invalid(
                "cluster.snapshot_logs_since_last",
                self.snapshot_logs_since_last.to_string(),
                "an integer from 1 to 100000000",
            );
        }
        if self.logs_kept_after_snapshot > 100_000_000 {
            return invalid(
                "cluster.logs_kept_after_snapshot",
                self.logs_kept_after_snapshot.to_string(),
                "an integer from 0 to 100000000",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64) -> ClusterConfig {
        ClusterConfig {
            node_id: Some(id),
            listen: Some(format!("127.0.0.1:700{id}").parse().unwrap()),
            peers: vec!["1=127.0.0.1:7001".into(), "2=127.0.0.1:7002".into()],
            certs: Some("/tmp/certs".into()),
            ..ClusterConfig::default()
        }
    }

    #[test]
    fn no_cluster_settings_is_a_single_node() {
        assert!(!ClusterConfig::default().enabled());
        ClusterConfig::default().validate().unwrap();
    }

    #[test]
    fn a_complete_node_validates() {
        node(1).validate().unwrap();
        let mut joiner = node(3);
        joiner.peers.clear();
        joiner.join = Some("127.0.0.1:7001".parse().unwrap());
        joiner.validate().unwrap();
    }

    #[test]
    fn the_session_lease_outlasts_a_failover_by_default() {
        let mut c = node(1);
        // Issue 16: at most 2 s with the default election timeouts.
        assert_eq!(c.session_lease(), std::time::Duration::from_secs(2));
        // Longer timeouts stretch a failover (its silence: a heartbeat, the leader
        // lease, a timeout, one split vote's timeout) and the lease with it.
        c.election_timeout_max_ms = 2500;
        c.election_timeout_min_ms = 1000;
        assert_eq!(c.session_lease(), std::time::Duration::from_millis(7600));
        c.session_lease_ms = Some(8000);
        assert_eq!(c.session_lease(), std::time::Duration::from_secs(8));
        assert!(c.validate().is_ok());
        // The shortest lease accepted is a failover's silence with one split vote.
        let mut c = node(1);
        c.session_lease_ms = Some(3 * c.election_timeout_max_ms + c.heartbeat_interval_ms);
        assert!(c.validate().is_ok());
        c.session_lease_ms = Some(3 * c.election_timeout_max_ms + c.heartbeat_interval_ms - 1);
        assert_eq!(c.validate().unwrap_err().field, "cluster.session_lease_ms");
    }

    #[test]
    fn each_missing_or_contradicting_setting_names_its_field() {
        type Change = fn(&mut ClusterConfig);
        let cases: [(Change, &str); 10] = [
            (|c| c.node_id = None, "cluster.node_id"),
            (|c| c.listen = None, "cluster.listen"),
            (|c| c.certs = None, "cluster.certs"),
            (|c| c.peers.clear(), "cluster.peers"),
            (|c| c.peers.push("1=127.0.0.1:9".into()), "cluster.peers"),
            (|c| c.peers[0] = "1=127.0.0.1:7999".into(), "cluster.peers"),
            (
                |c| c.heartbeat_interval_ms = 300,
                "cluster.heartbeat_interval_ms",
            ),
            // A lease shorter than a failover with one split vote (three election
            // timeouts and a heartbeat: 1.9 s with the defaults) would fence healthy
            // nodes at such an election; 1.2 s passed the old floor (two timeouts).
            (
                |c| c.session_lease_ms = Some(1000),
                "cluster.session_lease_ms",
            ),
            (
                |c| c.session_lease_ms = Some(1200),
                "cluster.session_lease_ms",
            ),
            (
                |c| c.session_lease_ms = Some(600_001),
                "cluster.session_lease_ms",
            ),
        ];
        for (change, field) in cases {
            let mut c = node(1);
            change(&mut c);
            assert_eq!(c.validate().unwrap_err().field, field, "{c:?}");
        }
        for junk in ["x", "0=127.0.0.1:1", "1=nowhere", "1"] {
            let mut c = node(1);
            c.peers = vec![junk.into()];
            assert_eq!(c.validate().unwrap_err().field, "cluster.peers", "{junk}");
        }
    }
}
