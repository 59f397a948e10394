//! Broker configuration: the settings, where they come from, and their checks.
//!
//! Sources, later ones winning, field by field:
//! 1. built-in defaults ([`Config::default`], printed by `--print-default-config`);
//! 2. the TOML file given with `--config FILE`;
//! 3. environment variables `TESSERA_<SECTION>__<KEY>`, e.g.
//!    `TESSERA_LIMITS__MAX_INFLIGHT=64` or
//!    `TESSERA_SERVER__LISTEN=127.0.0.1:1883,0.0.0.0:1884` (lists are comma-separated);
//! 4. command-line flags ([`crate::cli::Cli`]).
//!
//! Typos are errors, never silently ignored: an unknown key in the file and an unknown
//! `TESSERA_` variable both fail the load. Every error names where the bad value came from
//! (file path, variable or flag), the field, and what is accepted.
//!
//! [`FIELDS`] is the one list of settings with their documentation; it drives the
//! documented default file and the environment-variable names, and a test checks that it
//! matches the struct fields exactly.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cli::Cli;

/// The largest MQTT packet: 1 byte of type and flags, a 4-byte Remaining Length, and a
/// Remaining Length of at most 268,435,455 bytes.
pub const MQTT_PACKET_SIZE_BYTES_MAX: u32 = 268_435_460;

/// The smallest `limits.max_packet_size_bytes` accepted: a CONNECT with a short ClientID
/// and no properties must fit.
pub const PACKET_SIZE_BYTES_MIN: u32 = 64;

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "TESSERA_";

/// The whole broker configuration. Built once on the boot thread, validated, then copied
/// read-only to every shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`: listeners, shards and data directory.
    pub server: ServerConfig,
    /// `[limits]`: bounds on clients, packets, queues and rates.
    pub limits: LimitsConfig,
    /// `[persistence]`: when acknowledged messages reach the disk.
    pub persistence: PersistenceConfig,
    /// `[log]`: log verbosity and format.
    pub log: LogConfig,
    /// `[mqtt5]`: MQTT 5 behaviour the operator chooses.
    pub mqtt5: Mqtt5Config,
    /// `[sys]`: the `$SYS/broker/...` statistics topics.
    pub sys: SysConfig,
    /// `[auth]`: authentication, ACL, bans and flapping detection.
    pub auth: AuthConfig,
    /// `[cluster]`: this node's place in a cluster (see [`cluster`]); unset: one node.
    pub cluster: ClusterConfig,
    /// `[[listener]]` tables: listeners of every kind besides `server.listen`
    /// (see [`listener`]). Only from the config file.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listener: Vec<ListenerConfig>,
    /// `[[bridge]]` tables: MQTT bridges to other brokers (see [`bridge`]). Only
    /// from the config file; reloaded on SIGHUP.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bridge: Vec<BridgeConfig>,
}

/// The `[server]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// MQTT over TCP listen addresses.
    pub listen: Vec<SocketAddr>,
    /// Number of shards; `None` means one per CPU this process may use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<usize>,
    /// Directory for persistent state.
    pub data_dir: PathBuf,
    /// Admin HTTP API and /metrics listen address.
    pub admin_listen: SocketAddr,
    /// Bearer token the admin API requires; empty for none (loopback only).
    pub admin_token: String,
    /// Microseconds a shard with nothing to run keeps polling for I/O before it
    /// sleeps; 0 sleeps at once.
    pub idle_poll_us: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 1883))],
            shards: None,
            data_dir: PathBuf::from("./data"),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 18083)),
            admin_token: String::new(),
            idle_poll_us: 0,
        }
    }
}

/// The `[limits]` section. Wire-level values use the width MQTT gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most concurrent client connections, all shards together.
    pub max_connections: u32,
    /// Largest MQTT packet accepted or sent, bytes (MQTT 5 Maximum Packet Size).
    pub max_packet_size_bytes: u32,
    /// Most unacknowledged QoS 1/2 messages per client (MQTT 5 Receive Maximum).
    pub max_inflight: u16,
    /// Most messages queued for one client beyond the inflight window, for sessions that
    /// end with their connection (persistent sessions have `max_queued_bytes`).
    pub max_queued_messages: u32,
    /// Bytes one persistent session may have queued (on disk with persistence, in RAM in
    /// `memory` durability); beyond it new QoS 1/2 messages are refused (v5: 0x97).
    pub max_queued_bytes: u64,
    /// Bytes all queues of the node may hold together (split evenly between shards);
    /// beyond it persistent sessions refuse new QoS 1/2 messages like at `max_queued_bytes`.
    pub max_queued_bytes_total: u64,
    /// Most subscriptions one client may hold; 0 means no limit.
    pub max_subscriptions_per_client: u32,
    /// Most levels (`/`-separated parts) in a topic name or filter.
    pub max_topic_levels: u32,
    /// Most topic aliases per connection (MQTT 5 Topic Alias Maximum); 0 disables them.
    pub max_topic_alias: u16,
    /// Most topic aliases the broker sets per connection when sending (also capped by the
    /// client's Topic Alias Maximum); 0 disables them.
    pub max_outbound_topic_alias: u16,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout_s: u32,
    /// Largest keep-alive granted to clients, seconds (MQTT 5 Server Keep Alive).
    pub max_keep_alive_s: u16,
    /// New connections accepted per second, all shards together; 0 means unlimited.
    pub connect_rate_per_s: u32,
    /// What to do when a client's queue is full.
    pub queue_overflow: QueueOverflow,
    /// Queued messages at which a connected client's queue holds the PUBACK/PUBREC of
    /// QoS 1/2 publishers (back-pressure); 0 disables it. `None`:
    /// `max_queued_messages` / 4.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_high_water: Option<u32>,
    /// Longest a PUBACK/PUBREC is held for back-pressure, milliseconds.
    pub backpressure_hold_ms_max: u32,
    /// How a shared subscription (`$share/{group}/{filter}`) picks the member that gets
    /// each message.
    pub shared_subscription_strategy: SharedStrategy,
    /// PUBLISH packets per second one client may send; 0 means unlimited.
    pub publish_rate_per_s: u32,
    /// PUBLISH payload bytes per second one client may send; 0 means unlimited.
    pub publish_bytes_per_s: u32,
    /// Process resident memory above which new connections are refused; 0 = no limit.
    pub memory_high_water_bytes: u64,
    /// Milliseconds freed memory stays with the allocator before it is returned to the OS.
    pub memory_release_delay_ms: u32,
    // Quotas on state clients could otherwise grow without bound (docs/LIMITS.md).
    /// Longest session expiry interval granted, seconds (v5 and 3.1.1 persistent
    /// sessions); 4294967295 grants "never".
    pub max_session_expiry_s: u32,
    /// Most sessions (connected, and offline persistent ones) on this node; 0 = no limit.
    pub max_sessions: u32,
    /// Most retained messages; 0 = no limit.
    pub max_retained_messages: u32,
    /// Most bytes of retained topics and payloads; 0 = no limit.
    pub max_retained_bytes: u64,
    /// Most bytes of large packets held in read buffers at once, all connections
    /// together; 0 = no limit.
    pub max_read_buffers_bytes: u64,
}

impl LimitsConfig {
    /// The back-pressure high-water mark in force: the setting, or a quarter
    /// of `max_queued_messages` when unset.
    pub fn queue_high_water(&self) -> u32 {
        self.queue_high_water
            .unwrap_or(self.max_queued_messages / 4)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 100_000,
            max_packet_size_bytes: MQTT_PACKET_SIZE_BYTES_MAX,
            max_inflight: 32,
            max_queued_messages: 1000,
            max_queued_bytes: 64 << 20,
            max_queued_bytes_total: 1 << 30,
            max_subscriptions_per_client: 0,
            max_topic_levels: 128,
            max_topic_alias: 64,
            max_outbound_topic_alias: 16,
            connect_timeout_s: 10,
            max_keep_alive_s: 65535,
            connect_rate_per_s: 0,
            queue_overflow: QueueOverflow::DropQos0ThenOldest,
            queue_high_water: None,
            backpressure_hold_ms_max: 2000,
            shared_subscription_strategy: SharedStrategy::RoundRobin,
            publish_rate_per_s: 0,
            publish_bytes_per_s: 0,
            memory_high_water_bytes: 0,
            memory_release_delay_ms: 1000,
            max_session_expiry_s: 86_400,
            max_sessions: 1_000_000,
            max_retained_messages: 1_000_000,
            max_retained_bytes: 1 << 30,
            max_read_buffers_bytes: 1 << 30,
        }
    }
}

/// The `[persistence]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PersistenceConfig {
    /// When a QoS 1/2 message counts as stored.
    pub durability: Durability,
    /// Group-commit interval in `batched` mode, milliseconds.
    pub batch_interval_ms: u32,
    /// Initial LMDB map size per shard, MiB; the map doubles when full.
    pub map_size_mb: u32,
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        PersistenceConfig {
            durability: Durability::Sync,
            batch_interval_ms: 10,
            map_size_mb: 1024,
        }
    }
}

/// The `[log]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Least severe level logged.
    pub level: LogLevel,
    /// Output format.
    pub format: LogFormat,
    /// Whether each client's session start and connection end on this node is logged
    /// (INFO, target `tessera::clients`): which node served a ClientID when. Off by
    /// default: two synchronous stderr writes per connection cost a connect storm
    /// (docs/BENCHMARKS.md); the fault tests turn it on.
    pub clients: bool,
}

/// The `[mqtt5]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mqtt5Config {
    /// Whether error acknowledgements, refused CONNACKs and DISCONNECTs carry a Reason String.
    pub reason_strings: bool,
    /// Response Information for clients that request it: this prefix and the ClientID.
    pub response_information_prefix: String,
    /// Whether CONNECTs are refused with a pointer to another server.
    pub redirect: Redirect,
    /// The server clients are sent to when `redirect` is not `none`.
    pub server_reference: String,
}

impl Default for Mqtt5Config {
    fn default() -> Self {
        Mqtt5Config {
            reason_strings: true,
            response_information_prefix: "reply/".to_owned(),
            redirect: Redirect::None,
            server_reference: String::new(),
        }
    }
}

/// The `[auth]` section (docs/SECURITY.md). Empty paths mean "not used".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether clients without credentials may connect.
    pub allow_anonymous: bool,
    /// Password file (`brokerctl passwd`).
    pub password_file: String,
    /// ACL file.
    pub acl_file: String,
    /// Ban list file (`brokerctl ban`).
    pub ban_file: String,
    /// File holding the HS256 secret for JWT passwords.
    pub jwt_secret_file: String,
    /// PEM file with the RS256 public key for JWT passwords.
    pub jwt_public_key_file: String,
    /// The JWT claim naming the user.
    pub jwt_username_claim: String,
    /// The JWT claim with the client's ACL rules.
    pub jwt_acl_claim: String,
    /// Seconds between checks of the files' modification times; 0 = SIGHUP only.
    pub reload_interval_s: u32,
    /// Connects of one ClientID within `flapping_window_s` that ban it; 0 = off.
    pub flapping_max_connects: u32,
    /// The flapping window, seconds.
    pub flapping_window_s: u32,
    /// How long a flapping ClientID is banned, seconds.
    pub flapping_ban_s: u32,
    /// SUBACK reason code (v5) of a subscription the ACL denies: 135 or 128.
    pub subscribe_denied_code: u8,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: true,
            password_file: String::new(),
            acl_file: String::new(),
            ban_file: String::new(),
            jwt_secret_file: String::new(),
            jwt_public_key_file: String::new(),
            jwt_username_claim: "sub".to_owned(),
            jwt_acl_claim: "acl".to_owned(),
            reload_interval_s: 2,
            flapping_max_connects: 0,
            flapping_window_s: 10,
            flapping_ban_s: 60,
            subscribe_denied_code: 0x87,
        }
    }
}

impl AuthConfig {
    /// Sets one `[auth]` key from its text form.
    fn set(&mut self, key: &str, v: &str) -> Result<(), ()> {
        fn p<T: FromStr>(v: &str) -> Result<T, ()> {
            v.parse().map_err(|_| ())
        }
        match key {
            "allow_anonymous" => self.allow_anonymous = p(v)?,
            "password_file" => self.password_file = v.to_owned(),
            "acl_file" => self.acl_file = v.to_owned(),
            "ban_file" => self.ban_file = v.to_owned(),
            "jwt_secret_file" => self.jwt_secret_file = v.to_owned(),
            "jwt_public_key_file" => self.jwt_public_key_file = v.to_owned(),
            "jwt_username_claim" => self.jwt_username_claim = v.to_owned(),
            "jwt_acl_claim" => self.jwt_acl_claim = v.to_owned(),
            "reload_interval_s" => self.reload_interval_s = p(v)?,
            "flapping_max_connects" => self.flapping_max_connects = p(v)?,
            "flapping_window_s" => self.flapping_window_s = p(v)?,
            "flapping_ban_s" => self.flapping_ban_s = p(v)?,
            "subscribe_denied_code" => self.subscribe_denied_code = p(v)?,
            key => unreachable!("FIELDS entry auth.{key} has no setter"),
        }
        Ok(())
    }
}

/// The `[sys]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SysConfig {
    /// Seconds between two publications of the `$SYS` topics; 0 disables them.
    pub interval_s: u32,
}

impl Default for SysConfig {
    fn default() -> Self {
        SysConfig { interval_s: 10 }
    }
}

/// A config value chosen from a fixed set of names; gives `FromStr`, `Display` and the list
/// of accepted names for error messages from one table.
pub trait ConfigEnum: Sized + Copy + PartialEq + 'static {
    /// Every value with its config name, in documentation order.
    const VALUES: &'static [(&'static str, Self)];

    /// The config name of `self`.
    fn name(self) -> &'static str {
        Self::VALUES
            .iter()
            .find(|(_, v)| *v == self)
            .map(|(n, _)| *n)
            .expect("value in table")
    }

    /// The accepted names, comma-separated, for error messages and docs.
    fn accepted() -> String {
        Self::VALUES
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The value named `s`, matched exactly (names are lowercase).
    fn from_name(s: &str) -> Result<Self, UnknownValue> {
        Self::VALUES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, v)| *v)
            .ok_or_else(|| UnknownValue {
                value: s.to_owned(),
                accepted: Self::accepted(),
            })
    }
}

/// A name that is not one of a [`ConfigEnum`]'s values.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown value {value:?}; accepted values: {accepted}")]
pub struct UnknownValue {
    /// The name given.
    pub value: String,
    /// The accepted names, comma-separated.
    pub accepted: String,
}

macro_rules! config_enum {
    ($ty:ident { $($name:literal => $variant:ident),+ $(,)? }) => {
        impl ConfigEnum for $ty {
            const VALUES: &'static [(&'static str, Self)] = &[$(($name, $ty::$variant)),+];
        }
        impl FromStr for $ty {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                Self::from_name(s)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

pub mod bridge;
pub use bridge::BridgeConfig;
pub mod cluster;
pub use cluster::ClusterConfig;

mod listener;
pub use listener::{
    CertIdentity, LISTENERS_COUNT_MAX, ListenerConfig, ListenerId, ListenerKind, QuicCongestion,
    WS_PATH_DEFAULT,
};

/// What to do when a client's outbound queue is full (`limits.queue_overflow`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueOverflow {
    /// Drop a queued QoS 0 message if there is one, else the oldest message.
    #[default]
    DropQos0ThenOldest,
    /// Drop the oldest queued message.
    DropOldest,
    /// Drop the new message.
    DropNew,
    /// Disconnect the client (a persistent session keeps its queue).
    Disconnect,
}
config_enum!(QueueOverflow {
    "drop_qos0_then_oldest" => DropQos0ThenOldest,
    "drop_oldest" => DropOldest,
    "drop_new" => DropNew,
    "disconnect" => Disconnect,
});

/// How a shared subscription picks the member for each message
/// (`limits.shared_subscription_strategy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedStrategy {
    /// Members in turn.
    #[default]
    RoundRobin,
    /// A member at random.
    Random,
    /// The same member for as long as it stays connected.
    Sticky,
    /// A member chosen by a hash of the publisher's ClientID: one publisher, one member.
    HashClientId,
}
config_enum!(SharedStrategy {
    "round_robin" => RoundRobin,
    "random" => Random,
    "sticky" => Sticky,
    "hash_client_id" => HashClientId,
});

/// When an acknowledged QoS 1/2 message is on disk (`persistence.durability`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Committed and fsynced before the PUBACK/PUBREC: survives `kill -9` and power loss.
    #[default]
    Sync,
    /// Acknowledged at once, committed every `batch_interval_ms`: a crash loses at most
    /// that window.
    Batched,
    /// Never written to disk: sessions and retained messages are lost on restart.
    Memory,
}
config_enum!(Durability { "sync" => Sync, "batched" => Batched, "memory" => Memory });

/// Least severe level logged (`log.level`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Lifecycle events, warnings and errors.
    #[default]
    Info,
    /// Per-connection events too.
    Debug,
    /// Everything, including per-packet events.
    Trace,
}
config_enum!(LogLevel {
    "error" => Error,
    "warn" => Warn,
    "info" => Info,
    "debug" => Debug,
    "trace" => Trace,
});

/// Log output format (`log.format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}
config_enum!(LogFormat { "text" => Text, "json" => Json });

/// Server redirection of MQTT 5 clients (`mqtt5.redirect`, MQTT 5 section 4.11).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Redirect {
    /// Serve clients.
    #[default]
    None,
    /// Refuse every CONNECT with 0x9C Use another server and the server reference.
    UseAnotherServer,
    /// Refuse every CONNECT with 0x9D Server moved and the server reference.
    ServerMoved,
}
config_enum!(Redirect {
    "none" => None,
    "use_another_server" => UseAnotherServer,
    "server_moved" => ServerMoved,
});

/// One setting: where it lives and how it is documented.
#[derive(Debug, Clone, Copy)]
pub struct FieldDoc {
    /// TOML table, e.g. `limits`.
    pub section: &'static str,
    /// Key in that table, e.g. `max_inflight`.
    pub key: &'static str,
    /// What it is and its unit, as one sentence.
    pub doc: &'static str,
    /// The accepted values, as shown in errors and in the default file.
    pub accepted: &'static str,
}

impl FieldDoc {
    /// The dotted path, e.g. `limits.max_inflight`.
    pub fn path(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }

    /// The environment variable that sets it, e.g. `TESSERA_LIMITS__MAX_INFLIGHT`.
    pub fn env_var(&self) -> String {
        format!("{ENV_PREFIX}{}__{}", self.section, self.key).to_ascii_uppercase()
    }
}

/// Every setting, in the order of the documented default file.
pub const FIELDS: &[FieldDoc] = &[
    FieldDoc {
        section: "server",
        key: "listen",
        doc: "MQTT over TCP listen addresses (ADDR:PORT). Every shard listens on each with \
              SO_REUSEPORT.",
        accepted: "a non-empty list of distinct socket addresses, e.g. \
                   [\"0.0.0.0:1883\", \"[::]:1883\"] (in an environment variable: \
                   comma-separated)",
    },
    FieldDoc {
        section: "server",
        key: "shards",
        doc: "Number of shards, one per CPU. Unset: one per CPU this process may run on \
              (its affinity mask, which respects taskset, cgroup cpusets and containers).",
        accepted: "an integer from 1 to the number of allowed CPUs",
    },
    FieldDoc {
        section: "server",
        key: "data_dir",
        doc: "Directory for persistent state: one store per shard (shard-K/) and the \
              cluster log.",
        accepted: "a non-empty directory path",
    },
    FieldDoc {
        section: "server",
        key: "admin_listen",
        doc: "Admin HTTP API and Prometheus /metrics listen address (ADDR:PORT).",
        accepted: "a socket address not used by server.listen",
    },
    FieldDoc {
        section: "server",
        key: "admin_token",
        doc: "Bearer token the admin API and /metrics require (Authorization: Bearer TOKEN); \
              /health and /ready stay open. Required when server.admin_listen is not a \
              loopback address. Prefer the TESSERA_SERVER__ADMIN_TOKEN environment variable \
              to a file others can read.",
        accepted: "empty (no token), or 16 to 256 visible ASCII characters",
    },
    FieldDoc {
        section: "server",
        key: "idle_poll_us",
        doc: "Microseconds a shard that has run out of work keeps polling its sockets \
              before it sleeps in the kernel. 0 (the default) sleeps at once: least CPU. A \
              value above the usual gap between messages (e.g. 2000 at 1,000 msg/s) keeps \
              that shard's CPU busy while traffic flows and cuts the wake-up out of every \
              message's latency (see docs/BENCHMARKS.md); an idle shard still sleeps.",
        accepted: "an integer from 0 to 1000000",
    },
    FieldDoc {
        section: "limits",
        key: "max_connections",
        doc: "Most concurrent client connections, all shards together. Each needs one open \
              file: keep it under the open-files limit (ulimit -n).",
        accepted: "an integer from 1 to 4294967295",
    },
    FieldDoc {
        section: "limits",
        key: "max_packet_size_bytes",
        doc: "Largest MQTT packet accepted from a client, fixed header included, in bytes; \
              announced to MQTT 5 clients as the Maximum Packet Size. A larger packet ends \
              the connection: MQTT 5 DISCONNECT 0x95 Packet too large; a 3.1.1 client's \
              connection is closed (3.1.1 has no code for it), logged and counted. It also \
              bounds what one connection's read buffer holds. The default is the MQTT \
              maximum (256 MiB, as Mosquitto and HiveMQ accept); max_read_buffers_bytes \
              protects the process from many large packets at once.",
        accepted: "an integer from 64 to 268435460",
    },
    FieldDoc {
        section: "limits",
        key: "max_inflight",
        doc: "Most unacknowledged QoS 1/2 messages per client, each direction (MQTT 5 \
              Receive Maximum).",
        accepted: "an integer from 1 to 65535",
    },
    FieldDoc {
        section: "limits",
        key: "max_queued_messages",
        doc: "Most messages queued for one client beyond the inflight window, for sessions \
              that end with their connection (clean start / clean session); see \
              queue_overflow. Persistent sessions are bounded by max_queued_bytes instead.",
        accepted: "an integer from 1 to 4294967295",
    },
    FieldDoc {
        section: "limits",
        key: "max_queued_bytes",
        doc: "Bytes (topic + payload + 64 per message) one persistent session may have \
              queued. With persistence (sync, batched) the queue is on disk and only its \
              first 64 messages are in memory; with durability = memory it is all RAM. When \
              full, a new QoS 1/2 message for it is refused: an MQTT 5 publisher gets \
              PUBACK/PUBREC 0x97 (Quota exceeded), a 3.1.1 publisher no acknowledgement \
              (its connection is closed after backpressure_hold_ms_max and it re-sends). \
              Messages already acknowledged are never dropped. See docs/PERSISTENCE.md.",
        accepted: "an integer from 1024 to 18446744073709551615",
    },
    FieldDoc {
        section: "limits",
        key: "max_queued_bytes_total",
        doc: "Bytes all client queues of the node may hold together, split evenly between \
              the shards; persistent sessions refuse new QoS 1/2 messages beyond it as at \
              max_queued_bytes. On disk with persistence, RAM with durability = memory.",
        accepted: "an integer from 1024 to 18446744073709551615",
    },
    FieldDoc {
        section: "limits",
        key: "max_subscriptions_per_client",
        doc: "Most subscriptions one client may hold; a SUBSCRIBE beyond it gets 0x97 Quota \
              exceeded for the new filters (3.1.1: 0x80). 0 (the default, as in Mosquitto and \
              EMQX): no limit; the memory a client's subscriptions take is bounded by what \
              it can send.",
        accepted: "an integer from 0 to 4294967295",
    },
    FieldDoc {
        section: "limits",
        key: "max_topic_levels",
        doc: "Most levels ('/'-separated parts) in a topic name or filter.",
        accepted: "an integer from 1 to 128",
    },
    FieldDoc {
        section: "limits",
        key: "max_topic_alias",
        doc: "Most topic aliases per connection (MQTT 5 Topic Alias Maximum); 0 disables \
              topic aliases.",
        accepted: "an integer from 0 to 65535",
    },
    FieldDoc {
        section: "limits",
        key: "max_outbound_topic_alias",
        doc: "Most topic aliases the broker sets per MQTT 5 connection when sending; also \
              capped by the client's Topic Alias Maximum. When the map is full the least \
              recently used alias is rebound. 0 disables outbound topic aliases.",
        accepted: "an integer from 0 to 65534",
    },
    FieldDoc {
        section: "limits",
        key: "connect_timeout_s",
        doc: "Seconds a new connection has to send its CONNECT before it is closed.",
        accepted: "an integer from 1 to 3600",
    },
    FieldDoc {
        section: "limits",
        key: "max_keep_alive_s",
        doc: "Largest keep-alive granted to a client, in seconds; a client asking for more \
              (or for 0 = none) gets this (MQTT 5 Server Keep Alive).",
        accepted: "an integer from 1 to 65535",
    },
    FieldDoc {
        section: "limits",
        key: "connect_rate_per_s",
        doc: "New connections accepted per second, all shards together; 0 means unlimited.",
        accepted: "an integer from 0 to 4294967295",
    },
    FieldDoc {
        section: "limits",
        key: "queue_overflow",
        doc: "What to do when the queue of a session that ends with its connection is full \
              (max_queued_messages): drop a queued QoS 0 message (else the oldest), drop the \
              oldest, drop the new message, or disconnect the client. Persistent sessions \
              never drop an acknowledged message: see max_queued_bytes.",
        accepted: "one of drop_qos0_then_oldest, drop_oldest, drop_new, disconnect",
    },
    FieldDoc {
        section: "limits",
        key: "queue_high_water",
        doc: "Back-pressure: when a QoS 1/2 message reaches a connected client whose queue \
              holds this many messages, the publisher's PUBACK/PUBREC waits until that queue \
              drained below half of it (or backpressure_hold_ms_max passed), so publishers \
              are slowed by their inflight window instead of having messages dropped. \
              0 disables back-pressure. Unset: a quarter of max_queued_messages, which \
              leaves room for the messages publishers already sent when it is reached.",
        accepted: "an integer from 0 to max_queued_messages - 1",
    },
    FieldDoc {
        section: "limits",
        key: "backpressure_hold_ms_max",
        doc: "Longest a PUBACK/PUBREC is held for back-pressure, in milliseconds; after it the \
              acknowledgement is sent and queue_overflow applies at max_queued_messages.",
        accepted: "an integer from 1 to 600000",
    },
    FieldDoc {
        section: "limits",
        key: "shared_subscription_strategy",
        doc: "How a shared subscription ($share/GROUP/FILTER) picks the one member that gets \
              each message: round_robin = members in turn; random; sticky = the same member \
              while it stays connected; hash_client_id = by the publisher's ClientID, so one \
              publisher's messages go to one member.",
        accepted: "one of round_robin, random, sticky, hash_client_id",
    },
    FieldDoc {
        section: "limits",
        key: "publish_rate_per_s",
        doc: "PUBLISH packets per second one client connection may send (token bucket, \
              bursts of one second's worth). Beyond it the message is dropped; MQTT 5 \
              QoS 1/2 publishers get 0x97 Quota exceeded. 0: unlimited.",
        accepted: "an integer from 0 to 4294967295",
    },
    FieldDoc {
        section: "limits",
        key: "publish_bytes_per_s",
        doc: "PUBLISH payload bytes per second one client connection may send, handled as \
              publish_rate_per_s. 0: unlimited.",
        accepted: "an integer from 0 to 4294967295",
    },
    FieldDoc {
        section: "limits",
        key: "memory_high_water_bytes",
        doc: "Resident memory of the broker process above which new connections are refused \
              (MQTT 5 0x89 Server busy, 3.1.1 return code 3) until it falls again, so the \
              host sheds load before it swaps. 0: no limit.",
        accepted: "an integer from 0 to 18446744073709551615",
    },
    FieldDoc {
        section: "limits",
        key: "memory_release_delay_ms",
        doc: "Milliseconds memory the broker freed (e.g. after a connect storm) stays with \
              its allocator (jemalloc) for reuse before a background thread returns it to \
              the OS. 0 returns it at once (more madvise calls under churn).",
        accepted: "an integer from 0 to 3600000",
    },
    FieldDoc {
        section: "limits",
        key: "max_session_expiry_s",
        doc: "Longest a disconnected session is kept, in seconds: caps the MQTT 5 Session \
              Expiry Interval (also a request for 'never', 4294967295; the client is told \
              the granted value in CONNACK) and applies to MQTT 3.1.1 Clean Session 0 \
              sessions, which would otherwise never expire. Lowering it applies to stored \
              sessions at the next start. 4294967295: no cap.",
        accepted: "an integer from 0 to 4294967295",
    },
    FieldDoc {
        section: "limits",
        key: "max_sessions",
        doc: "Most sessions on this node, connected and offline persistent ones together. A \
              CONNECT that needs a new session beyond it is refused (MQTT 5 CONNACK 0x97 \
              Quota exceeded, 3.1.1 return code 3 Server unavailable); resuming an existing \
              session always works. 0: no limit.",
        accepted: "an integer from 0 to 4294967295",
    },
    FieldDoc {
        section: "limits",
        key: "max_retained_messages",
        doc: "Most retained messages. A retained PUBLISH on a new topic beyond it is not \
              stored: MQTT 5 QoS 1/2 publishers get PUBACK/PUBREC 0x97 Quota exceeded (the \
              message is not published); QoS 0 and 3.1.1 messages are published to current \
              subscribers but not retained. Replacing or clearing a topic's retained \
              message always works. Every shard holds a copy of the retained table. 0: no \
              limit.",
        accepted: "an integer from 0 to 4294967295",
    },
    FieldDoc {
        section: "limits",
        key: "max_retained_bytes",
        doc: "Most bytes of retained messages (topic and payload), refused as \
              max_retained_messages; a replacement is refused only when it grows the total \
              past the limit. 0: no limit.",
        accepted: "an integer from 0 to 18446744073709551615",
    },
    FieldDoc {
        section: "limits",
        key: "max_read_buffers_bytes",
        doc: "Most bytes of large packets (over 64 KiB) held in read buffers at once, all \
              connections together: a packet is reserved in full when its header arrives, \
              and a connection whose packet does not fit is ended (MQTT 5 DISCONNECT 0x97 \
              Quota exceeded). Small packets are bounded per connection instead. 0: no \
              limit.",
        accepted: "0, or an integer from max_packet_size_bytes to 18446744073709551615",
    },
    FieldDoc {
        section: "persistence",
        key: "durability",
        doc: "When an acknowledged QoS 1/2 message is on disk: sync = fsynced before the \
              ack (survives kill -9); batched = committed every batch_interval_ms (a crash \
              loses at most that window); memory = never written.",
        accepted: "one of sync, batched, memory",
    },
    FieldDoc {
        section: "persistence",
        key: "batch_interval_ms",
        doc: "Group-commit interval in batched mode, in milliseconds.",
        accepted: "an integer from 1 to 1000",
    },
    FieldDoc {
        section: "persistence",
        key: "map_size_mb",
        doc: "Initial size of each shard's store map (LMDB), in MiB. It reserves address \
              space, not disk; when full, the map doubles and the broker logs it.",
        accepted: "an integer from 1 to 1048576",
    },
    FieldDoc {
        section: "log",
        key: "level",
        doc: "Least severe level logged.",
        accepted: "one of error, warn, info, debug, trace",
    },
    FieldDoc {
        section: "log",
        key: "format",
        doc: "Log output: text = human-readable lines, json = one JSON object per line.",
        accepted: "one of text, json",
    },
    FieldDoc {
        section: "log",
        key: "clients",
        doc: "Log each client's session start and connection end on this node (INFO, target \
              tessera::clients: ClientID, node, shard, claim epoch, session present, end \
              reason), to tell which node served a ClientID when. RUST_LOG, when set, \
              replaces the log settings.",
        accepted: "true or false",
    },
    FieldDoc {
        section: "mqtt5",
        key: "reason_strings",
        doc: "Whether error acknowledgements, refused CONNACKs and DISCONNECTs carry a short \
              Reason String. A client with Request Problem Information 0 gets them on \
              CONNACK and DISCONNECT only.",
        accepted: "true or false",
    },
    FieldDoc {
        section: "mqtt5",
        key: "response_information_prefix",
        doc: "Response Information sent in CONNACK to a client that requests it: this prefix \
              followed by the ClientID (e.g. reply/sensor-7), a base for response topics. \
              Empty: never sent.",
        accepted: "a string without '+', '#' or NUL, at most 65535 bytes",
    },
    FieldDoc {
        section: "mqtt5",
        key: "redirect",
        doc: "Send clients to server_reference: every CONNECT is refused, MQTT 5 clients with \
              0x9C Use another server (temporary) or 0x9D Server moved (permanent) and the \
              Server Reference, 3.1.1 clients with return code 3 (server unavailable).",
        accepted: "one of none, use_another_server, server_moved",
    },
    FieldDoc {
        section: "mqtt5",
        key: "server_reference",
        doc: "The Server Reference sent with a redirect, e.g. mqtt2.example.com:1883 (MQTT 5 \
              section 4.11: space-separated references; a client may use host:port).",
        accepted: "a string without NUL of at most 65535 bytes; not empty when redirect is set",
    },
    FieldDoc {
        section: "sys",
        key: "interval_s",
        doc: "Seconds between two publications of the $SYS/broker/... statistics topics \
              (retained, QoS 0; docs/SYS_TOPICS.md); 0 disables them.",
        accepted: "an integer from 0 to 86400",
    },
    FieldDoc {
        section: "auth",
        key: "allow_anonymous",
        doc: "Whether clients that send no password may connect (as anonymous: no user \
              name, so ACL rules for users do not apply to them). false: they get MQTT 5 \
              0x87 Not authorized, 3.1.1 return code 5.",
        accepted: "true or false",
    },
    FieldDoc {
        section: "auth",
        key: "password_file",
        doc: "Password file of user:hash lines (PBKDF2-SHA512, the format of \
              mosquitto_passwd; optional SCRAM-SHA-256 keys), managed with brokerctl passwd. \
              Reloaded on SIGHUP and when it changes. Empty: no password users.",
        accepted: "a file path, or empty",
    },
    FieldDoc {
        section: "auth",
        key: "acl_file",
        doc: "ACL file (docs/SECURITY.md): allow/deny rules for publish and subscribe per \
              user, ClientID or pattern, first match wins. Empty: everything is allowed.",
        accepted: "a file path, or empty",
    },
    FieldDoc {
        section: "auth",
        key: "ban_file",
        doc: "Ban list file of clientid/username/ip lines, managed with brokerctl ban. \
              Banned clients get MQTT 5 0x8A Banned, 3.1.1 return code 5.",
        accepted: "a file path, or empty",
    },
    FieldDoc {
        section: "auth",
        key: "jwt_secret_file",
        doc: "File with the HS256 secret: a password that is a JWT signed with it \
              authenticates the user its jwt_username_claim names, until its exp.",
        accepted: "a file path, or empty",
    },
    FieldDoc {
        section: "auth",
        key: "jwt_public_key_file",
        doc: "PEM file with the RSA public key for RS256-signed JWT passwords.",
        accepted: "a file path, or empty",
    },
    FieldDoc {
        section: "auth",
        key: "jwt_username_claim",
        doc: "The JWT claim whose string value is the user name.",
        accepted: "a non-empty claim name",
    },
    FieldDoc {
        section: "auth",
        key: "jwt_acl_claim",
        doc: "The JWT claim with the client's own ACL, {\"publish\": [TOPIC...], \"subscribe\": \
              [TOPIC...]}; a token that has it is allowed exactly what it lists and the ACL \
              file does not apply to it.",
        accepted: "a non-empty claim name",
    },
    FieldDoc {
        section: "auth",
        key: "reload_interval_s",
        doc: "Seconds between checks of the password, ACL, ban and JWT key files for \
              changes (SIGHUP reloads at once). 0: on SIGHUP only.",
        accepted: "an integer from 0 to 3600",
    },
    FieldDoc {
        section: "auth",
        key: "flapping_max_connects",
        doc: "Flapping detection: a ClientID connecting this many times within \
              flapping_window_s is banned for flapping_ban_s. 0: off.",
        accepted: "an integer from 0 to 4294967295",
    },
    FieldDoc {
        section: "auth",
        key: "flapping_window_s",
        doc: "The flapping detection window, seconds.",
        accepted: "an integer from 1 to 86400",
    },
    FieldDoc {
        section: "auth",
        key: "flapping_ban_s",
        doc: "How long a flapping ClientID is banned, seconds.",
        accepted: "an integer from 1 to 86400",
    },
    FieldDoc {
        section: "auth",
        key: "subscribe_denied_code",
        doc: "SUBACK reason code an MQTT 5 client gets for a subscription the ACL denies: \
              135 (0x87 Not authorized, what the specification suggests) or 128 (0x80 \
              Unspecified error, what the Eclipse Paho 5.0 suite's test_subscribe_failure \
              expects). 3.1.1 clients always get 0x80.",
        accepted: "135 or 128",
    },
];

/// Every setting: [`FIELDS`], then the sections that live in their own modules.
pub fn all_fields() -> impl Iterator<Item = &'static FieldDoc> {
    FIELDS.iter().chain(cluster::FIELDS)
}

/// Looks up a setting by section and key.
fn field_doc(section: &str, key: &str) -> Option<&'static FieldDoc> {
    all_fields().find(|f| f.section == section && f.key == key)
}

/// Where a setting's value came from; named in validation errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The config file at this path.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// This command-line flag.
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the built-in default"),
            Origin::File(p) => write!(f, "config file {}", p.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "command-line flag {flag}"),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The config file is not valid TOML or does not match the settings.
    #[error("invalid config file {}{}: {message}", path.display(), FieldSuffix(field))]
    Parse {
        /// The file.
        path: PathBuf,
        /// The dotted field the error is about, when it could be located.
        field: Option<String>,
        /// toml's message, with line, column and the offending line.
        message: String,
    },
    /// A `TESSERA_` variable names no setting.
    #[error(
        "unknown environment variable {var}: no setting {path}. {hint} \
         (variables are {ENV_PREFIX}<SECTION>__<KEY>)"
    )]
    UnknownEnv {
        /// The variable.
        var: String,
        /// What it would set, as a dotted path.
        path: String,
        /// The known variables of that section, or the known sections.
        hint: String,
    },
    /// A `TESSERA_` variable's value does not parse as its setting's type.
    #[error("environment variable {var}={value:?} is invalid for {field}: expected {accepted}")]
    BadEnv {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// The dotted field it sets.
        field: String,
        /// What is accepted.
        accepted: &'static str,
    },
    /// A `TESSERA_` variable's name or value is not UTF-8.
    #[error("environment variable {var} is not valid UTF-8")]
    NonUtf8Env {
        /// The variable name, lossily converted.
        var: String,
    },
    /// A value is out of its accepted range, or conflicts with another.
    #[error(
        "{field} = {value} is invalid: expected {expected}{}",
        OriginSuffix(origin)
    )]
    Invalid {
        /// The dotted field.
        field: &'static str,
        /// The value, as written in TOML.
        value: String,
        /// What is accepted.
        expected: String,
        /// Where the value came from, when known.
        origin: Option<Origin>,
    },
    /// A `[[bridge]]` table is inconsistent; the message names the bridge and field.
    #[error("invalid [[bridge]] in the config file: {0}")]
    InvalidBridge(String),
    /// A `[[listener]]` table is inconsistent.
    #[error("listener #{number} ({kind} {bind}) in the config file is invalid: {message}")]
    InvalidListener {
        /// 1-based position among the `[[listener]]` tables.
        number: usize,
        /// Its kind.
        kind: ListenerKind,
        /// Its address.
        bind: SocketAddr,
        /// What is wrong and what to change.
        message: String,
    },
}

/// Formats ` (field a.b)` when a field is known.
struct FieldSuffix<'a>(&'a Option<String>);

impl fmt::Display for FieldSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(field) => write!(f, " (field {field})"),
            None => Ok(()),
        }
    }
}

/// Formats ` (set by ...)` when an origin is known.
struct OriginSuffix<'a>(&'a Option<Origin>);

impl fmt::Display for OriginSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(origin) => write!(f, " (set by {origin})"),
            None => Ok(()),
        }
    }
}

impl Config {
    /// Loads the configuration of this process: defaults, the `--config` file, `TESSERA_*`
    /// environment variables, then flags; and validates it.
    pub fn load_from_process(cli: &Cli) -> Result<Config, ConfigError> {
        Config::load(cli, std::env::vars_os())
    }

    /// [`Config::load_from_process`] with the environment passed in, for tests.
    pub fn load(
        cli: &Cli,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Config, ConfigError> {
        let mut origins: HashMap<String, Origin> = HashMap::new();

        let mut config = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let config = Config::from_toml(&text, path)?;
                for (section, key) in keys_present(&text) {
                    origins.insert(format!("{section}.{key}"), Origin::File(path.clone()));
                }
                config
            }
            None => Config::default(),
        };

        // Sorted so that, with several bad variables, the error is deterministic.
        let mut vars: Vec<(OsString, OsString)> = env
            .into_iter()
            .filter(|(name, _)| name.as_encoded_bytes().starts_with(ENV_PREFIX.as_bytes()))
            .collect();
        vars.sort();
        for (name, value) in vars {
            let var = name.into_string().map_err(|n| ConfigError::NonUtf8Env {
                var: n.to_string_lossy().into_owned(),
            })?;
            let value = value
                .into_string()
                .map_err(|_| ConfigError::NonUtf8Env { var: var.clone() })?;
            let field = config.apply_env(&var, &value)?;
            origins.insert(field.path(), Origin::Env(var));
        }

        config.apply_cli(cli, &mut origins);

        config.validate().map_err(|err| match err {
            ConfigError::Invalid {
                field,
                value,
                expected,
                origin: None,
            } => {
                let origin = Some(origins.get(field).cloned().unwrap_or(Origin::Default));
                ConfigError::Invalid {
                    field,
                    value,
                    expected,
                    origin,
                }
            }
            other => other,
        })?;
        Ok(config)
    }

    /// Parses a TOML document; `path` is only used in error messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|err: toml::de::Error| {
            let field = err.span().and_then(|span| field_at(text, span.start));
            let mut message = err.to_string().trim_end().to_owned();
            // toml names the Rust type ("expected u16"); add what the setting accepts.
            let doc = field
                .as_deref()
                .and_then(|f| f.split_once('.'))
                .and_then(|(s, k)| field_doc(s, k));
            if let Some(doc) = doc {
                message.push_str(&format!("\n{} accepts {}", doc.path(), doc.accepted));
            }
            ConfigError::Parse {
                path: path.to_owned(),
                field,
                message,
            }
        })
    }

    /// Applies one `TESSERA_<SECTION>__<KEY>` variable; returns the setting it set.
    fn apply_env(&mut self, var: &str, value: &str) -> Result<&'static FieldDoc, ConfigError> {
        let rest = &var[ENV_PREFIX.len()..];
        let Some((section, key)) = rest.split_once("__") else {
            return Err(unknown_env(var, "", &rest.to_ascii_lowercase()));
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let Some(field) = field_doc(&section, &key) else {
            return Err(unknown_env(var, &section, &key));
        };
        let bad = || ConfigError::BadEnv {
            var: var.to_owned(),
            value: value.to_owned(),
            field: field.path(),
            accepted: field.accepted,
        };
        self.set(field, value.trim()).map_err(|()| bad())?;
        Ok(field)
    }

    /// Sets one field from its text form, parsed by the field's type.
    fn set(&mut self, field: &FieldDoc, v: &str) -> Result<(), ()> {
        fn p<T: FromStr>(v: &str) -> Result<T, ()> {
            v.parse().map_err(|_| ())
        }
        let (s, l, pe, lg, m5) = (
            &mut self.server,
            &mut self.limits,
            &mut self.persistence,
            &mut self.log,
            &mut self.mqtt5,
        );
        match (field.section, field.key) {
            ("server", "listen") => {
                s.listen = v
                    .split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(p)
                    .collect::<Result<_, _>>()?;
            }
            ("server", "shards") => s.shards = Some(p(v)?),
            ("server", "data_dir") => s.data_dir = PathBuf::from(v),
            ("server", "admin_listen") => s.admin_listen = p(v)?,
            ("server", "admin_token") => s.admin_token = v.to_owned(),
            ("server", "idle_poll_us") => s.idle_poll_us = p(v)?,
            ("limits", "max_connections") => l.max_connections = p(v)?,
            ("limits", "max_packet_size_bytes") => l.max_packet_size_bytes = p(v)?,
            ("limits", "max_inflight") => l.max_inflight = p(v)?,
            ("limits", "max_queued_messages") => l.max_queued_messages = p(v)?,
            ("limits", "max_queued_bytes") => l.max_queued_bytes = p(v)?,
            ("limits", "max_queued_bytes_total") => l.max_queued_bytes_total = p(v)?,
            ("limits", "max_subscriptions_per_client") => l.max_subscriptions_per_client = p(v)?,
            ("limits", "max_topic_levels") => l.max_topic_levels = p(v)?,
            ("limits", "max_topic_alias") => l.max_topic_alias = p(v)?,
            ("limits", "max_outbound_topic_alias") => l.max_outbound_topic_alias = p(v)?,
            ("limits", "connect_timeout_s") => l.connect_timeout_s = p(v)?,
            ("limits", "max_keep_alive_s") => l.max_keep_alive_s = p(v)?,
            ("limits", "connect_rate_per_s") => l.connect_rate_per_s = p(v)?,
            ("limits", "queue_overflow") => l.queue_overflow = p(v)?,
            ("limits", "queue_high_water") => l.queue_high_water = Some(p(v)?),
            ("limits", "backpressure_hold_ms_max") => l.backpressure_hold_ms_max = p(v)?,
            ("limits", "shared_subscription_strategy") => {
                l.shared_subscription_strategy = p(v)?;
            }
            ("persistence", "durability") => pe.durability = p(v)?,
            ("persistence", "batch_interval_ms") => pe.batch_interval_ms = p(v)?,
            ("persistence", "map_size_mb") => pe.map_size_mb = p(v)?,
            ("log", "level") => lg.level = p(v)?,
            ("log", "format") => lg.format = p(v)?,
            ("log", "clients") => lg.clients = p(v)?,
            ("mqtt5", "reason_strings") => m5.reason_strings = p(v)?,
            ("mqtt5", "response_information_prefix") => {
                m5.response_information_prefix = v.to_owned();
            }
            ("mqtt5", "redirect") => m5.redirect = p(v)?,
            ("mqtt5", "server_reference") => m5.server_reference = v.to_owned(),
            ("sys", "interval_s") => self.sys.interval_s = p(v)?,
            ("limits", "publish_rate_per_s") => l.publish_rate_per_s = p(v)?,
            ("limits", "publish_bytes_per_s") => l.publish_bytes_per_s = p(v)?,
            ("limits", "memory_high_water_bytes") => l.memory_high_water_bytes = p(v)?,
            ("limits", "memory_release_delay_ms") => l.memory_release_delay_ms = p(v)?,
            ("limits", "max_session_expiry_s") => l.max_session_expiry_s = p(v)?,
            ("limits", "max_sessions") => l.max_sessions = p(v)?,
            ("limits", "max_retained_messages") => l.max_retained_messages = p(v)?,
            ("limits", "max_retained_bytes") => l.max_retained_bytes = p(v)?,
            ("limits", "max_read_buffers_bytes") => l.max_read_buffers_bytes = p(v)?,
            ("auth", key) => self.auth.set(key, v)?,
            ("cluster", key) => self.cluster.set(key, v)?,
            (section, key) => unreachable!("FIELDS entry {section}.{key} has no setter"),
        }
        Ok(())
    }

    /// Applies the flags that were given.
    fn apply_cli(&mut self, cli: &Cli, origins: &mut HashMap<String, Origin>) {
        let mut set = |path: &str, flag: &'static str| {
            origins.insert(path.to_owned(), Origin::Flag(flag));
        };
        if !cli.listen.is_empty() {
            self.server.listen = cli.listen.clone();
            set("server.listen", "--listen");
        }
        if let Some(dir) = &cli.data_dir {
            self.server.data_dir = dir.clone();
            set("server.data_dir", "--data-dir");
        }
        if let Some(n) = cli.shards {
            self.server.shards = Some(n);
            set("server.shards", "--shards");
        }
        if let Some(addr) = cli.admin_listen {
            self.server.admin_listen = addr;
            set("server.admin_listen", "--admin-listen");
        }
        if let Some(level) = cli.log_level {
            self.log.level = level;
            set("log.level", "--log-level");
        }
        let c = &mut self.cluster;
        if let Some(id) = cli.node_id {
            c.node_id = Some(id);
            set("cluster.node_id", "--node-id");
        }
        if let Some(addr) = cli.cluster_listen {
            c.listen = Some(addr);
            set("cluster.listen", "--cluster-listen");
        }
        if !cli.cluster_peers.is_empty() {
            c.peers = cli.cluster_peers.clone();
            set("cluster.peers", "--cluster-peers");
        }
        if let Some(dir) = &cli.cluster_certs {
            c.certs = Some(dir.clone());
            set("cluster.certs", "--cluster-certs");
        }
        if let Some(addr) = cli.join {
            c.join = Some(addr);
            set("cluster.join", "--join");
        }
    }

    /// Checks every value against its accepted range and the relations between values.
    /// Returns the first problem found; its message names the field, the value and what
    /// is accepted.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let l = &self.limits;
        let invalid = |field: &'static str, value: String, expected: String| {
            Err(ConfigError::Invalid {
                field,
                value,
                expected,
                origin: None,
            })
        };
        if s.listen.is_empty() && self.listener.is_empty() {
            return invalid("server.listen", "[]".into(), accepted("server.listen"));
        }
        self.validate_listeners()?;
        bridge::check_all(&self.bridge).map_err(ConfigError::InvalidBridge)?;
        for (i, addr) in s.listen.iter().enumerate() {
            if s.listen[..i].contains(addr) {
                return invalid(
                    "server.listen",
                    list(&s.listen),
                    format!("distinct addresses; {addr} is listed twice"),
                );
            }
        }
        // Port 0 asks the kernel for a free port: distinct ones for each.
        if s.admin_listen.port() != 0 && s.listen.contains(&s.admin_listen) {
            return invalid(
                "server.admin_listen",
                format!("\"{}\"", s.admin_listen),
                format!("an address not in server.listen = {}", list(&s.listen)),
            );
        }
        let token = &s.admin_token;
        if !token.is_empty()
            && (!(16..=256).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            // Never echo the token itself.
            return invalid(
                "server.admin_token",
                format!("<{} bytes, not shown>", token.len()),
                accepted("server.admin_token"),
            );
        }
        if token.is_empty() && !s.admin_listen.ip().is_loopback() {
            return invalid(
                "server.admin_token",
                "\"\"".into(),
                format!(
                    "a token, because server.admin_listen = \"{}\" is not a loopback \
                     address (set TESSERA_SERVER__ADMIN_TOKEN, or bind the admin API to \
                     127.0.0.1)",
                    s.admin_listen
                ),
            );
        }
        if s.shards == Some(0) {
            return invalid("server.shards", "0".into(), accepted("server.shards"));
        }
        if s.data_dir.as_os_str().is_empty() {
            return invalid(
                "server.data_dir",
                "\"\"".into(),
                accepted("server.data_dir"),
            );
        }
        if let Err(e) = self.cluster.validate() {
            return invalid(e.field, e.value, e.expected);
        }
        let a = &self.auth;
        let ranges: [(&'static str, u64, u64, u64); 21] = [
            (
                "auth.reload_interval_s",
                a.reload_interval_s.into(),
                0,
                3600,
            ),
            (
                "auth.flapping_window_s",
                a.flapping_window_s.into(),
                1,
                86_400,
            ),
            ("auth.flapping_ban_s", a.flapping_ban_s.into(), 1, 86_400),
            (
                "limits.max_connections",
                l.max_connections.into(),
                1,
                u32::MAX.into(),
            ),
            (
                "limits.max_packet_size_bytes",
                l.max_packet_size_bytes.into(),
                PACKET_SIZE_BYTES_MIN.into(),
                MQTT_PACKET_SIZE_BYTES_MAX.into(),
            ),
            (
                "limits.max_inflight",
                l.max_inflight.into(),
                1,
                u16::MAX.into(),
            ),
            (
                "limits.max_queued_messages",
                l.max_queued_messages.into(),
                1,
                u32::MAX.into(),
            ),
            (
                "limits.max_queued_bytes",
                l.max_queued_bytes,
                1024,
                u64::MAX,
            ),
            (
                "limits.max_queued_bytes_total",
                l.max_queued_bytes_total,
                1024,
                u64::MAX,
            ),
            // The subscription trie bounds its walk by the codec's TOPIC_LEVELS_MAX;
            // a deeper limit here would accept filters the trie refuses.
            (
                "limits.max_topic_levels",
                l.max_topic_levels.into(),
                1,
                tessera_proto::topic::TOPIC_LEVELS_MAX as u64,
            ),
            (
                "limits.connect_timeout_s",
                l.connect_timeout_s.into(),
                1,
                3600,
            ),
            (
                "limits.max_keep_alive_s",
                l.max_keep_alive_s.into(),
                1,
                u16::MAX.into(),
            ),
            (
                "persistence.batch_interval_ms",
                self.persistence.batch_interval_ms.into(),
                1,
                1000,
            ),
            (
                "persistence.map_size_mb",
                self.persistence.map_size_mb.into(),
                1,
                1_048_576,
            ),
            (
                "limits.connect_rate_per_s",
                l.connect_rate_per_s.into(),
                0,
                u32::MAX.into(),
            ),
            // The outbound alias map marks its list ends with u16::MAX.
            (
                "limits.max_outbound_topic_alias",
                l.max_outbound_topic_alias.into(),
                0,
                u64::from(u16::MAX - 1),
            ),
            ("sys.interval_s", self.sys.interval_s.into(), 0, 86_400),
            (
                "server.idle_poll_us",
                self.server.idle_poll_us.into(),
                0,
                1_000_000,
            ),
            (
                "limits.memory_release_delay_ms",
                l.memory_release_delay_ms.into(),
                0,
                3_600_000,
            ),
            (
                "limits.backpressure_hold_ms_max",
                l.backpressure_hold_ms_max.into(),
                1,
                600_000,
            ),
            (
                "limits.queue_high_water",
                l.queue_high_water().into(),
                0,
                u64::from(l.max_queued_messages).saturating_sub(1),
            ),
        ];
        for (field, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return invalid(field, value.to_string(), accepted(field));
            }
        }
        // A packet the size limit admits must fit the read buffers' budget.
        let read = l.max_read_buffers_bytes;
        if read != 0 && read < u64::from(l.max_packet_size_bytes) {
            return invalid(
                "limits.max_read_buffers_bytes",
                read.to_string(),
                format!(
                    "0, or at least limits.max_packet_size_bytes = {}",
                    l.max_packet_size_bytes
                ),
            );
        }
        self.validate_mqtt5()
    }

    /// Every listener, `server.listen` first (as `mqtt` listeners), then the
    /// `[[listener]]` tables in file order. The index is the listener's id.
    pub fn listeners(&self) -> Vec<ListenerConfig> {
        self.server
            .listen
            .iter()
            .map(|a| ListenerConfig::new(ListenerKind::Mqtt, *a))
            .chain(self.listener.iter().cloned())
            .collect()
    }

    /// Each `[[listener]]` is consistent; no two listeners share an address
    /// (port 0 excepted: each gets its own port); the admin API is elsewhere.
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        for (i, l) in self.listener.iter().enumerate() {
            let fail = |message: String| ConfigError::InvalidListener {
                number: i + 1,
                kind: l.kind,
                bind: l.bind,
                message,
            };
            l.check().map_err(fail)?;
            if self.listeners().len() > LISTENERS_COUNT_MAX {
                return Err(fail(format!(
                    "more than {LISTENERS_COUNT_MAX} listeners in all"
                )));
            }
            // A UDP (QUIC) listener may share its port number with a TCP one.
            let udp = l.kind.is_udp();
            let taken = self.server.listen.iter().filter(|_| !udp).chain(
                self.listener[..i]
                    .iter()
                    .filter(|o| o.kind.is_udp() == udp)
                    .map(|o| &o.bind),
            );
            if l.bind.port() != 0 && taken.clone().any(|a| *a == l.bind) {
                return Err(fail(format!(
                    "address {} is used by another listener",
                    l.bind
                )));
            }
            if l.bind.port() != 0 && !udp && l.bind == self.server.admin_listen {
                return Err(fail(format!("address {} is server.admin_listen", l.bind)));
            }
        }
        Ok(())
    }

    /// The `[mqtt5]` strings go on the wire as MQTT strings (no NUL, at most 65,535
    /// bytes); the prefix starts topic names, so it has no wildcard; a redirect needs a
    /// reference.
    fn validate_mqtt5(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt5;
        let invalid = |field: &'static str, value: &str| {
            Err(ConfigError::Invalid {
                field,
                value: format!("{value:?}"),
                expected: accepted(field),
                origin: None,
            })
        };
        let mqtt_string = |v: &str| tessera_proto::Str::try_from(v).is_ok();
        let prefix = &m.response_information_prefix;
        if !mqtt_string(prefix) || prefix.contains(['+', '#']) {
            return invalid("mqtt5.response_information_prefix", prefix);
        }
        if self.auth.jwt_username_claim.is_empty() {
            return invalid("auth.jwt_username_claim", "");
        }
        if self.auth.jwt_acl_claim.is_empty() {
            return invalid("auth.jwt_acl_claim", "");
        }
        let code = self.auth.subscribe_denied_code;
        if code != 0x80 && code != 0x87 {
            return invalid("auth.subscribe_denied_code", &code.to_string());
        }
        let reference = &m.server_reference;
        if !mqtt_string(reference) || (m.redirect != Redirect::None && reference.is_empty()) {
            return invalid("mqtt5.server_reference", reference);
        }
        Ok(())
    }
}

/// The accepted-values text of a dotted field.
fn accepted(path: &str) -> String {
    let (section, key) = path.split_once('.').expect("dotted path");
    field_doc(section, key)
        .expect("known field")
        .accepted
        .to_owned()
}

/// Formats addresses as a TOML array.
fn list(addrs: &[SocketAddr]) -> String {
    let items: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!("[{}]", items.join(", "))
}

/// The error for a `TESSERA_` variable that names no setting, with the likely candidates.
fn unknown_env(var: &str, section: &str, key: &str) -> ConfigError {
    let in_section: Vec<String> = all_fields()
        .filter(|f| f.section == section)
        .map(FieldDoc::env_var)
        .collect();
    let hint = if in_section.is_empty() {
        let mut sections: Vec<&str> = all_fields().map(|f| f.section).collect();
        sections.dedup();
        format!("Known sections: {}.", sections.join(", "))
    } else {
        format!(
            "Known variables for [{section}]: {}.",
            in_section.join(", ")
        )
    };
    let path = if section.is_empty() {
        key.to_owned()
    } else {
        format!("{section}.{key}")
    };
    ConfigError::UnknownEnv {
        var: var.to_owned(),
        path,
        hint,
    }
}

/// The `(section, key)` pairs assigned in a TOML document that parsed as a [`Config`].
fn keys_present(text: &str) -> Vec<(String, String)> {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    for (section, value) in &table {
        if let Some(inner) = value.as_table() {
            keys.extend(inner.keys().map(|k| (section.clone(), k.clone())));
        }
    }
    keys
}

/// The dotted field at byte `offset` of a TOML document: the key on that line, inside the
/// nearest `[section]` header above it. Best effort, for error messages only.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let header = |l: &str| {
        let l = l.trim();
        (l.starts_with('[') && l.contains(']')).then(|| {
            l.trim_start_matches('[')[..]
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
    };
    if let Some(section) = header(line) {
        return Some(section);
    }
    let key = line.split_once('=')?.0.trim().trim_matches('"').to_owned();
    let section = text[..line_start].lines().rev().find_map(header);
    Some(match section {
        Some(section) => format!("{section}.{key}"),
        None => key,
    })
}

/// The default configuration as a TOML document with a comment above every key saying
/// what it is, its unit and the accepted values. `--print-default-config` prints it.
pub fn default_config_toml() -> String {
    let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
    let mut out = String::from(
        "# Tessera broker configuration (the built-in defaults).\n\
         # Precedence: defaults < this file (--config FILE) < environment variables\n\
         # TESSERA_<SECTION>__<KEY> (e.g. TESSERA_LIMITS__MAX_INFLIGHT=64) < flags.\n\
         # Unknown keys and unknown TESSERA_ variables are errors.\n",
    );
    let mut section = "";
    for field in all_fields() {
        if field.section != section {
            section = field.section;
            out.push_str(&format!("\n[{section}]\n"));
        }
        let comment = format!("{} Accepted: {}.", field.doc, field.accepted);
        push_comment(&mut out, &comment);
        let value = defaults.get(field.section).and_then(|t| t.get(field.key));
        match value {
            Some(value) => out.push_str(&format!("{} = {value}\n", field.key)),
            // No TOML null: an unset optional is shown as a commented-out example.
            None => out.push_str(&format!("# {} = 2\n", field.key)),
        }
    }
    out.push_str(LISTENER_EXAMPLE);
    out
}

/// The `[[listener]]` documentation at the end of the default file.
const LISTENER_EXAMPLE: &str = "
# More listeners, of kinds mqtt (TCP), mqtts (TLS), ws (WebSocket), wss
# (WebSocket over TLS) and quic (MQTT over QUIC, UDP, ALPN mqtt): one
# [[listener]] table each, file only (no environment variables). server.listen
# above declares mqtt listeners; set it to [] to use only these. Fields: kind;
# bind (ADDR:PORT; conventional ports 1883, 8883, 8083, 8084, 14567/udp); path
# (ws, wss; default \"/mqtt\", subprotocol mqtt); for mqtts, wss and quic:
# cert_file and key_file (PEM, reloaded on SIGHUP), ca_file (PEM CAs that
# client certificates must chain to), require_client_cert (true/false),
# username_from_cert (none, cn or san; needs require_client_cert = true); for
# quic: max_streams (streams a client may have open at once, default 10),
# zero_rtt (accept 0-RTT data, default false), endpoints (threads with a UDP
# socket each on the one port, datagrams steered by connection id; default one
# per shard) and congestion (cubic, new_reno or bbr; default cubic; bbr keeps
# throughput on links with random loss).
#
# [[listener]]
# kind = \"mqtts\"
# bind = \"0.0.0.0:8883\"
# cert_file = \"/etc/tessera/server.pem\"
# key_file = \"/etc/tessera/server.key\"
#
# [[listener]]
# kind = \"ws\"
# bind = \"0.0.0.0:8083\"
#
# [[listener]]
# kind = \"quic\"
# bind = \"0.0.0.0:14567\"
# cert_file = \"/etc/tessera/server.pem\"
# key_file = \"/etc/tessera/server.key\"
";

/// Appends `text` as `# ` comment lines wrapped to [`COMMENT_WIDTH_MAX`] columns.
fn push_comment(out: &mut String, text: &str) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > COMMENT_WIDTH_MAX {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

/// Width of the comment lines in [`default_config_toml`], in columns.
const COMMENT_WIDTH_MAX: usize = 88;

#[cfg(test)]
mod tests {
    //! Goal: every source and every error path of the configuration behaves as documented.
    //! Method: files are written to a per-test temporary directory, the environment is
    //! passed in as a list (never the process environment, so tests run in parallel).

    use std::collections::BTreeSet;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    /// Writes `text` to a fresh file named after the test and returns its path.
    fn file(test: &str, text: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tessera-config-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tessera.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn cli_with_file(path: &Path) -> Cli {
        Cli {
            config: Some(path.to_owned()),
            ..Cli::default()
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_are_the_documented_values() {
        let c = Config::load(&Cli::default(), env(&[])).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.server.listen, vec![addr("127.0.0.1:1883")]);
        assert_eq!(c.server.shards, None);
        assert_eq!(c.server.data_dir, PathBuf::from("./data"));
        assert_eq!(c.server.admin_listen, addr("127.0.0.1:18083"));
        assert_eq!(c.limits.max_connections, 100_000);
        assert_eq!(c.limits.max_packet_size_bytes, 268_435_460);
        assert_eq!(c.limits.max_session_expiry_s, 86_400);
        assert_eq!(c.limits.max_sessions, 1_000_000);
        assert_eq!(c.limits.max_retained_messages, 1_000_000);
        assert_eq!(c.limits.max_retained_bytes, 1 << 30);
        assert_eq!(c.limits.max_read_buffers_bytes, 1 << 30);
        assert_eq!(c.limits.max_inflight, 32);
        assert_eq!(c.limits.max_queued_messages, 1000);
        assert_eq!(c.limits.max_subscriptions_per_client, 0);
        assert_eq!(c.limits.max_topic_levels, 128);
        assert_eq!(c.limits.max_topic_alias, 64);
        assert_eq!(c.limits.max_outbound_topic_alias, 16);
        assert_eq!(c.limits.connect_timeout_s, 10);
        assert_eq!(c.limits.max_keep_alive_s, 65535);
        assert_eq!(c.limits.connect_rate_per_s, 0);
        assert_eq!(c.limits.queue_overflow, QueueOverflow::DropQos0ThenOldest);
        assert_eq!(
            c.limits.shared_subscription_strategy,
            SharedStrategy::RoundRobin
        );
        assert_eq!(c.persistence.durability, Durability::Sync);
        assert_eq!(c.persistence.batch_interval_ms, 10);
        assert_eq!(c.log.level, LogLevel::Info);
        assert_eq!(c.log.format, LogFormat::Text);
        assert!(c.mqtt5.reason_strings);
        assert_eq!(c.mqtt5.response_information_prefix, "reply/");
        assert_eq!(c.mqtt5.redirect, Redirect::None);
        assert_eq!(c.mqtt5.server_reference, "");
        assert_eq!(c.sys.interval_s, 10);
    }

    #[test]
    fn default_config_toml_parses_back_to_the_defaults() {
        let text = default_config_toml();
        assert_eq!(
            Config::from_toml(&text, Path::new("default")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn default_config_toml_has_a_comment_above_every_key() {
        let text = default_config_toml();
        let lines: Vec<&str> = text.lines().collect();
        for field in all_fields() {
            let i = lines
                .iter()
                .position(|l| l.starts_with(&format!("{} = ", field.key)))
                .or_else(|| {
                    lines
                        .iter()
                        .position(|l| l.starts_with(&format!("# {} = ", field.key)))
                })
                .unwrap_or_else(|| panic!("{} missing:\n{text}", field.path()));
            let block: Vec<&str> = lines[..i]
                .iter()
                .rev()
                .take_while(|l| l.starts_with("# ") && !is_commented_key(l))
                .copied()
                .collect();
            assert!(!block.is_empty(), "no comment above {}", field.path());
            assert!(
                block.iter().any(|l| l.contains("Accepted:")),
                "{}",
                field.path()
            );
            assert!(
                lines.iter().all(|l| l.len() <= 100),
                "line too long:\n{text}"
            );
        }
    }

    /// A commented-out example such as `# shards = 2`.
    fn is_commented_key(line: &str) -> bool {
        all_fields().any(|f| line.starts_with(&format!("# {} = ", f.key)))
    }

    /// The documentation of every setting reads as prose in the default file: no run of
    /// spaces from a string literal continued without `\` (cluster.forward_pace_ms_max's
    /// had them).
    #[test]
    fn field_docs_have_no_runs_of_spaces() {
        for f in all_fields() {
            for text in [f.doc, f.accepted] {
                assert!(!text.contains("  "), "{}: {text:?}", f.path());
            }
        }
    }

    /// FIELDS, the env setter and the struct must list the same settings.
    #[test]
    fn fields_table_matches_the_struct() {
        let mut full = Config::default();
        full.server.shards = Some(1);
        full.limits.queue_high_water = Some(1);
        full.cluster.node_id = Some(1);
        full.cluster.listen = Some("127.0.0.1:7000".parse().unwrap());
        full.cluster.certs = Some("certs".into());
        full.cluster.join = Some("127.0.0.1:7001".parse().unwrap());
        full.cluster.session_lease_ms = Some(3000);
        let table = toml::Table::try_from(full).unwrap();
        let from_struct: BTreeSet<String> = table
            .iter()
            .flat_map(|(s, t)| {
                t.as_table()
                    .unwrap()
                    .keys()
                    .map(move |k| format!("{s}.{k}"))
            })
            .collect();
        let from_fields: BTreeSet<String> = all_fields().map(FieldDoc::path).collect();
        assert_eq!(from_struct, from_fields);
        assert_eq!(
            from_fields.len(),
            all_fields().count(),
            "duplicate FIELDS entry"
        );
    }

    /// Every setting can be set from its environment variable (the setter covers FIELDS).
    #[test]
    fn every_field_has_an_env_setter() {
        let default_toml = toml::Table::try_from(Config::default()).unwrap();
        // A cluster setting alone is incomplete (it turns the cluster on): set it on top
        // of a complete cluster.
        let cluster_base = [
            ("TESSERA_CLUSTER__NODE_ID", "1"),
            ("TESSERA_CLUSTER__LISTEN", "127.0.0.1:7001"),
            ("TESSERA_CLUSTER__PEERS", "1=127.0.0.1:7001"),
            ("TESSERA_CLUSTER__CERTS", "certs"),
        ];
        for field in all_fields() {
            let value = match default_toml
                .get(field.section)
                .and_then(|t| t.get(field.key))
            {
                Some(toml::Value::String(s)) => s.clone(),
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
                    .join(","),
                Some(other) => other.to_string(),
                None if field.path() == "cluster.join" => "127.0.0.1:7002".to_owned(),
                None if field.path() == "cluster.session_lease_ms" => "3000".to_owned(),
                None => "1".to_owned(),
            };
            let var = field.env_var();
            let mut vars: Vec<(&str, &str)> = Vec::new();
            if field.section == "cluster" {
                vars.extend(cluster_base.iter().filter(|(v, _)| *v != var));
            }
            let value = match cluster_base.iter().find(|(v, _)| *v == var) {
                Some((_, v)) => v.to_string(),
                None => value,
            };
            vars.push((&var, &value));
            Config::load(&Cli::default(), env(&vars))
                .unwrap_or_else(|e| panic!("{var}={value}: {e}"));
        }
    }

    #[test]
    fn config_enum_names_match_serde_names() {
        fn check<T: ConfigEnum + Serialize>() {
            for (name, value) in T::VALUES {
                assert_eq!(toml::Value::try_from(value).unwrap().as_str(), Some(*name));
            }
        }
        check::<QueueOverflow>();
        check::<SharedStrategy>();
        check::<Durability>();
        check::<LogLevel>();
        check::<LogFormat>();
        check::<Redirect>();
    }

    #[test]
    fn file_overrides_defaults_and_keeps_the_rest() {
        let path = file(
            "file_override",
            "[server]\nlisten = [\"0.0.0.0:1883\", \"[::]:1884\"]\nshards = 2\n\n\
             [limits]\nmax_inflight = 100\nqueue_overflow = \"disconnect\"\n\n\
             [persistence]\ndurability = \"batched\"\n",
        );
        let c = Config::load(&cli_with_file(&path), env(&[])).unwrap();
        assert_eq!(
            c.server.listen,
            vec![addr("0.0.0.0:1883"), addr("[::]:1884")]
        );
        assert_eq!(c.server.shards, Some(2));
        assert_eq!(c.limits.max_inflight, 100);
        assert_eq!(c.limits.queue_overflow, QueueOverflow::Disconnect);
        assert_eq!(c.persistence.durability, Durability::Batched);
        assert_eq!(c.limits.max_connections, 100_000);
        assert_eq!(c.log, LogConfig::default());
    }

    #[test]
    fn env_overrides_file() {
        let path = file(
            "env_over_file",
            "[limits]\nmax_inflight = 100\nmax_topic_alias = 5\n",
        );
        let c = Config::load(
            &cli_with_file(&path),
            env(&[
                ("TESSERA_LIMITS__MAX_INFLIGHT", "64"),
                ("TESSERA_SERVER__LISTEN", "127.0.0.1:1883, 0.0.0.0:1884"),
                ("TESSERA_PERSISTENCE__DURABILITY", "memory"),
                ("PATH", "/usr/bin"),
                ("TESSERAX", "not ours: no underscore after the prefix"),
            ]),
        )
        .unwrap();
        assert_eq!(c.limits.max_inflight, 64);
        assert_eq!(c.limits.max_topic_alias, 5);
        assert_eq!(
            c.server.listen,
            vec![addr("127.0.0.1:1883"), addr("0.0.0.0:1884")]
        );
        assert_eq!(c.persistence.durability, Durability::Memory);
    }

    #[test]
    fn cli_overrides_env_and_file() {
        let path = file(
            "cli_over_all",
            "[server]\nshards = 1\ndata_dir = \"/from/file\"\n",
        );
        let cli = Cli {
            config: Some(path),
            listen: vec![addr("127.0.0.1:2883")],
            shards: Some(2),
            data_dir: Some(PathBuf::from("/from/cli")),
            admin_listen: Some(addr("127.0.0.1:28083")),
            log_level: Some(LogLevel::Trace),
            print_default_config: false,
            ..Cli::default()
        };
        let c = Config::load(
            &cli,
            env(&[
                ("TESSERA_SERVER__SHARDS", "1"),
                ("TESSERA_SERVER__LISTEN", "127.0.0.1:3883"),
                ("TESSERA_LOG__LEVEL", "warn"),
                ("TESSERA_LOG__FORMAT", "json"),
                ("TESSERA_LOG__CLIENTS", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen, vec![addr("127.0.0.1:2883")]);
        assert_eq!(c.server.shards, Some(2));
        assert_eq!(c.server.data_dir, PathBuf::from("/from/cli"));
        assert_eq!(c.server.admin_listen, addr("127.0.0.1:28083"));
        assert_eq!(c.log.level, LogLevel::Trace);
        // No flag for the format: the environment wins over the default.
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(c.log.clients);
    }

    #[test]
    fn unknown_field_in_file_names_path_and_field() {
        let path = file(
            "unknown_field",
            "[limits]\nmax_inflight = 10\nmax_infligth = 20\n",
        );
        let err = Config::load(&cli_with_file(&path), env(&[])).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, ConfigError::Parse { field: Some(f), .. } if f == "limits.max_infligth"),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("max_infligth"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("max_inflight"), "expected field list: {msg}");
    }

    #[test]
    fn unknown_section_in_file_is_an_error() {
        let path = file("unknown_section", "[limit]\nmax_inflight = 10\n");
        let msg = Config::load(&cli_with_file(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("limit"), "{msg}");
        assert!(msg.contains("persistence"), "expected section list: {msg}");
    }

    #[test]
    fn wrong_type_in_file_names_the_field() {
        let path = file(
            "wrong_type",
            "[server]\nlisten = [\"127.0.0.1:1883\"]\n\n[limits]\nmax_inflight = \"many\"\n",
        );
        let err = Config::load(&cli_with_file(&path), env(&[])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("(field limits.max_inflight)"), "{msg}");
        assert!(msg.contains("line 5"), "{msg}");
    }

    #[test]
    fn out_of_range_in_file_names_the_field() {
        let path = file("out_of_range_file", "[limits]\nmax_inflight = 70000\n");
        let msg = Config::load(&cli_with_file(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("(field limits.max_inflight)"), "{msg}");
        assert!(
            msg.contains("limits.max_inflight accepts an integer from 1 to 65535"),
            "{msg}"
        );
    }

    #[test]
    fn bad_enum_value_in_file_lists_accepted_values() {
        let path = file("bad_enum_file", "[persistence]\ndurability = \"fsync\"\n");
        let msg = Config::load(&cli_with_file(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("(field persistence.durability)"), "{msg}");
        assert!(msg.contains("fsync"), "{msg}");
        for v in ["sync", "batched", "memory"] {
            assert!(msg.contains(v), "{msg}");
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let cli = cli_with_file(Path::new("/nonexistent/tessera.toml"));
        let msg = Config::load(&cli, env(&[])).unwrap_err().to_string();
        assert!(
            msg.contains("cannot read config file /nonexistent/tessera.toml"),
            "{msg}"
        );
    }

    #[test]
    fn bad_enum_value_in_env_lists_accepted_values() {
        let err = Config::load(
            &Cli::default(),
            env(&[("TESSERA_LIMITS__QUEUE_OVERFLOW", "drop_everything")]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable TESSERA_LIMITS__QUEUE_OVERFLOW=\"drop_everything\" is \
             invalid for limits.queue_overflow: expected one of drop_qos0_then_oldest, \
             drop_oldest, drop_new, disconnect"
        );
    }

    #[test]
    fn shared_subscription_strategy_is_set_by_file_and_env_and_checked() {
        let path = file(
            "shared_strategy",
            "[limits]\nshared_subscription_strategy = \"sticky\"\n",
        );
        let c = Config::load(&cli_with_file(&path), env(&[])).unwrap();
        assert_eq!(
            c.limits.shared_subscription_strategy,
            SharedStrategy::Sticky
        );
        let c = Config::load(
            &cli_with_file(&path),
            env(&[(
                "TESSERA_LIMITS__SHARED_SUBSCRIPTION_STRATEGY",
                "hash_client_id",
            )]),
        )
        .unwrap();
        assert_eq!(
            c.limits.shared_subscription_strategy,
            SharedStrategy::HashClientId
        );
        let err = Config::load(
            &Cli::default(),
            env(&[("TESSERA_LIMITS__SHARED_SUBSCRIPTION_STRATEGY", "least_busy")]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable TESSERA_LIMITS__SHARED_SUBSCRIPTION_STRATEGY=\"least_busy\" \
             is invalid for limits.shared_subscription_strategy: expected one of round_robin, \
             random, sticky, hash_client_id"
        );
        let path = file(
            "shared_strategy_bad",
            "[limits]\nshared_subscription_strategy = \"roundrobin\"\n",
        );
        let msg = Config::load(&cli_with_file(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("(field limits.shared_subscription_strategy)"),
            "{msg}"
        );
        assert!(
            msg.contains("round_robin, random, sticky, hash_client_id"),
            "{msg}"
        );
    }

    #[test]
    fn bad_number_in_env_names_var_field_and_range() {
        for value in ["lots", "-1", "70000", ""] {
            let err = Config::load(
                &Cli::default(),
                env(&[("TESSERA_LIMITS__MAX_INFLIGHT", value)]),
            )
            .unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("TESSERA_LIMITS__MAX_INFLIGHT"), "{msg}");
            assert!(msg.contains("limits.max_inflight"), "{msg}");
            assert!(msg.contains("from 1 to 65535"), "{msg}");
        }
        let msg = Config::load(
            &Cli::default(),
            env(&[("TESSERA_SERVER__LISTEN", "localhost")]),
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("server.listen"), "{msg}");
    }

    #[test]
    fn out_of_range_env_value_names_the_variable() {
        let err = Config::load(
            &Cli::default(),
            env(&[("TESSERA_LIMITS__MAX_INFLIGHT", "0")]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "limits.max_inflight = 0 is invalid: expected an integer from 1 to 65535 \
             (set by environment variable TESSERA_LIMITS__MAX_INFLIGHT)"
        );
    }

    #[test]
    fn unknown_env_var_is_an_error() {
        let msg = Config::load(
            &Cli::default(),
            env(&[("TESSERA_LIMITS__MAX_INFLIGTH", "5")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("unknown environment variable TESSERA_LIMITS__MAX_INFLIGTH"),
            "{msg}"
        );
        assert!(
            msg.contains("TESSERA_LIMITS__MAX_INFLIGHT"),
            "expected candidates: {msg}"
        );

        let msg = Config::load(
            &Cli::default(),
            env(&[("TESSERA_LIMIT__MAX_INFLIGHT", "5")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("Known sections: server, limits, persistence, log"),
            "{msg}"
        );

        // A single underscore between section and key is a typo too.
        assert!(Config::load(&Cli::default(), env(&[("TESSERA_LOG_LEVEL", "info")])).is_err());
    }

    #[test]
    fn env_names_are_case_insensitive_values_are_not() {
        let c = Config::load(&Cli::default(), env(&[("TESSERA_log__Level", "debug")])).unwrap();
        assert_eq!(c.log.level, LogLevel::Debug);
        assert!(Config::load(&Cli::default(), env(&[("TESSERA_LOG__LEVEL", "DEBUG")])).is_err());
    }

    #[test]
    fn non_utf8_env_value_is_an_error() {
        use std::os::unix::ffi::OsStringExt;
        let vars = vec![(
            OsString::from("TESSERA_SERVER__DATA_DIR"),
            OsString::from_vec(vec![0x2f, 0xff, 0xfe]),
        )];
        let msg = Config::load(&Cli::default(), vars).unwrap_err().to_string();
        assert!(
            msg.contains("TESSERA_SERVER__DATA_DIR is not valid UTF-8"),
            "{msg}"
        );
    }

    fn invalid(mutate: impl FnOnce(&mut Config)) -> String {
        let mut c = Config::default();
        mutate(&mut c);
        let err = c.validate().unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
        err.to_string()
    }

    #[test]
    fn validate_rejects_out_of_range_values() {
        assert_eq!(
            invalid(|c| c.limits.max_packet_size_bytes = 63),
            "limits.max_packet_size_bytes = 63 is invalid: expected an integer from 64 to \
             268435460"
        );
        assert!(
            invalid(|c| c.limits.max_packet_size_bytes = MQTT_PACKET_SIZE_BYTES_MAX + 1)
                .contains("from 64 to 268435460")
        );
        assert!(invalid(|c| c.limits.max_inflight = 0).starts_with("limits.max_inflight = 0"));
        assert!(invalid(|c| c.server.shards = Some(0)).starts_with("server.shards = 0"));
        assert!(invalid(|c| c.limits.max_connections = 0).contains("max_connections"));
        assert!(invalid(|c| c.limits.max_queued_messages = 0).contains("max_queued_messages"));
        assert_eq!(
            invalid(|c| c.limits.queue_high_water = Some(1000)),
            "limits.queue_high_water = 1000 is invalid: expected an integer from 0 to \
             max_queued_messages - 1"
        );
        assert!(invalid(|c| c.limits.backpressure_hold_ms_max = 0).contains("from 1 to 600000"));
        assert!(invalid(|c| c.limits.max_topic_levels = 70_000).contains("from 1 to 128"));
        assert!(invalid(|c| c.limits.connect_timeout_s = 0).contains("from 1 to 3600"));
        assert!(invalid(|c| c.limits.max_keep_alive_s = 0).contains("max_keep_alive_s"));
        assert!(invalid(|c| c.persistence.batch_interval_ms = 5000).contains("from 1 to 1000"));
        assert_eq!(
            invalid(|c| c.server.idle_poll_us = 1_000_001),
            "server.idle_poll_us = 1000001 is invalid: expected an integer from 0 to 1000000"
        );
        assert!(invalid(|c| c.server.data_dir = PathBuf::new()).contains("server.data_dir"));
        assert_eq!(
            invalid(|c| c.limits.memory_release_delay_ms = 3_600_001),
            "limits.memory_release_delay_ms = 3600001 is invalid: expected an integer from 0 \
             to 3600000"
        );
        // Boundaries are accepted.
        let mut c = Config::default();
        c.limits.max_packet_size_bytes = MQTT_PACKET_SIZE_BYTES_MAX;
        c.limits.max_inflight = u16::MAX;
        c.limits.max_topic_alias = 0;
        c.limits.memory_release_delay_ms = 0;
        c.server.idle_poll_us = 1_000_000;
        c.server.shards = Some(1);
        c.validate().unwrap();
        c.limits.max_packet_size_bytes = PACKET_SIZE_BYTES_MIN;
        c.validate().unwrap();
    }

    /// The quotas of issue 20: from the file, overridden by the environment,
    /// printed in the default file, and checked against each other.
    #[test]
    fn quota_settings_load_from_file_and_env_and_are_checked() {
        let path = file(
            "quota_settings",
            "[limits]\nmax_session_expiry_s = 4294967295\nmax_sessions = 10\n\
             max_retained_messages = 0\nmax_retained_bytes = 2048\n\
             max_subscriptions_per_client = 5\nmax_packet_size_bytes = 1000\n\
             max_read_buffers_bytes = 1000\n",
        );
        let c = Config::load(
            &cli_with_file(&path),
            env(&[
                ("TESSERA_LIMITS__MAX_SESSIONS", "20"),
                ("TESSERA_LIMITS__MAX_READ_BUFFERS_BYTES", "0"),
            ]),
        )
        .unwrap();
        let l = &c.limits;
        assert_eq!(l.max_session_expiry_s, u32::MAX);
        assert_eq!(l.max_sessions, 20, "the environment wins");
        assert_eq!(l.max_retained_messages, 0);
        assert_eq!(l.max_retained_bytes, 2048);
        assert_eq!(l.max_subscriptions_per_client, 5);
        assert_eq!(l.max_packet_size_bytes, 1000);
        assert_eq!(l.max_read_buffers_bytes, 0);

        let text = default_config_toml();
        for line in [
            "max_session_expiry_s = 86400",
            "max_sessions = 1000000",
            "max_retained_messages = 1000000",
            "max_retained_bytes = 1073741824",
            "max_read_buffers_bytes = 1073741824",
            "max_subscriptions_per_client = 0",
            "max_packet_size_bytes = 268435460",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }

        let err = Config::load(
            &Cli::default(),
            env(&[("TESSERA_LIMITS__MAX_SESSIONS", "-1")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("TESSERA_LIMITS__MAX_SESSIONS") && err.contains("0 to 4294967295"),
            "{err}"
        );
        let err = Config::load(
            &Cli::default(),
            env(&[("TESSERA_LIMITS__MAX_SESSION_EXPIRY_S", "4294967296")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_session_expiry_s"), "{err}");
        assert_eq!(
            invalid(|c| c.limits.max_read_buffers_bytes = 1000),
            "limits.max_read_buffers_bytes = 1000 is invalid: expected 0, or at least \
             limits.max_packet_size_bytes = 268435460 (set by the default)"
                .replace(" (set by the default)", "")
        );
    }

    #[test]
    fn mqtt5_and_sys_sections_load_from_file_and_env() {
        let path = file(
            "mqtt5_sections",
            "[mqtt5]\nreason_strings = false\nredirect = \"server_moved\"\n\
             server_reference = \"mqtt2.example.com:1883\"\n\n[sys]\ninterval_s = 0\n",
        );
        let c = Config::load(
            &cli_with_file(&path),
            env(&[
                ("TESSERA_MQTT5__RESPONSE_INFORMATION_PREFIX", "answers/"),
                ("TESSERA_LIMITS__MAX_OUTBOUND_TOPIC_ALIAS", "0"),
            ]),
        )
        .unwrap();
        assert!(!c.mqtt5.reason_strings);
        assert_eq!(c.mqtt5.redirect, Redirect::ServerMoved);
        assert_eq!(c.mqtt5.server_reference, "mqtt2.example.com:1883");
        assert_eq!(c.mqtt5.response_information_prefix, "answers/");
        assert_eq!(c.limits.max_outbound_topic_alias, 0);
        assert_eq!(c.sys.interval_s, 0);
    }

    #[test]
    fn validate_rejects_bad_mqtt5_and_sys_values() {
        let msg = invalid(|c| c.mqtt5.redirect = Redirect::UseAnotherServer);
        assert!(
            msg.starts_with("mqtt5.server_reference = \"\" is invalid"),
            "{msg}"
        );
        assert!(msg.contains("not empty when redirect is set"), "{msg}");
        let msg = invalid(|c| c.mqtt5.response_information_prefix = "reply/#".into());
        assert!(
            msg.starts_with("mqtt5.response_information_prefix"),
            "{msg}"
        );
        assert!(invalid(|c| c.mqtt5.server_reference = "a\0b".into()).contains("server_reference"));
        assert!(invalid(|c| c.sys.interval_s = 86_401).contains("from 0 to 86400"));
        assert!(
            invalid(|c| c.limits.max_outbound_topic_alias = u16::MAX).contains("from 0 to 65534")
        );
        let mut c = Config::default();
        c.mqtt5.redirect = Redirect::ServerMoved;
        c.mqtt5.server_reference = "mqtt2.example.com".into();
        c.mqtt5.response_information_prefix = String::new();
        c.sys.interval_s = 86_400;
        c.limits.max_outbound_topic_alias = u16::MAX - 1;
        c.validate().unwrap();
        let msg = Config::load(
            &Cli::default(),
            env(&[("TESSERA_MQTT5__REDIRECT", "moved")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("none, use_another_server, server_moved"),
            "{msg}"
        );
    }

    #[test]
    fn validate_rejects_bad_listen_sets() {
        assert!(invalid(|c| c.server.listen.clear()).starts_with("server.listen = []"));
        let msg = invalid(|c| c.server.listen.push(addr("127.0.0.1:1883")));
        assert!(msg.contains("127.0.0.1:1883 is listed twice"), "{msg}");
        let msg = invalid(|c| c.server.admin_listen = addr("127.0.0.1:1883"));
        assert!(
            msg.starts_with("server.admin_listen = \"127.0.0.1:1883\""),
            "{msg}"
        );
    }

    #[test]
    fn validation_error_names_file_or_flag_origin() {
        let path = file("origin_file", "[limits]\nmax_packet_size_bytes = 10\n");
        let msg = Config::load(&cli_with_file(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.ends_with(&format!("(set by config file {})", path.display())),
            "{msg}"
        );

        let cli = Cli {
            shards: Some(0),
            ..Cli::default()
        };
        let msg = Config::load(&cli, env(&[])).unwrap_err().to_string();
        assert!(
            msg.ends_with("(set by command-line flag --shards)"),
            "{msg}"
        );
    }

    fn invalid_listener(mutate: impl FnOnce(&mut Config)) -> String {
        let mut c = Config::default();
        mutate(&mut c);
        let err = c.validate().unwrap_err();
        assert!(
            matches!(err, ConfigError::InvalidListener { .. }),
            "{err:?}"
        );
        err.to_string()
    }

    #[test]
    fn listener_tables_load_and_are_checked() {
        let path = file(
            "listeners",
            "[server]\nlisten = []\n\n[[listener]]\nkind = \"ws\"\nbind = \"127.0.0.1:8083\"\n\n\
             [[listener]]\nkind = \"mqtts\"\nbind = \"127.0.0.1:8883\"\ncert_file = \"c.pem\"\n\
             key_file = \"k.pem\"\n",
        );
        let c = Config::load(&cli_with_file(&path), env(&[])).unwrap();
        let kinds: Vec<ListenerKind> = c.listeners().iter().map(|l| l.kind).collect();
        assert_eq!(kinds, [ListenerKind::Ws, ListenerKind::Mqtts]);
        assert_eq!(c.listeners()[0].path, "/mqtt");
        // --listen adds plain listeners in front; the tables stay.
        let cli = Cli {
            listen: vec![addr("127.0.0.1:1883")],
            ..cli_with_file(&path)
        };
        let c = Config::load(&cli, env(&[])).unwrap();
        assert_eq!(c.listeners().len(), 3);
        assert_eq!(c.listeners()[0].kind, ListenerKind::Mqtt);

        let msg = invalid_listener(|c| {
            c.listener.push(ListenerConfig::new(
                ListenerKind::Mqtts,
                addr("127.0.0.1:8883"),
            ))
        });
        assert!(
            msg.starts_with(
                "listener #1 (mqtts 127.0.0.1:8883) in the config file is invalid: \
                             kind mqtts needs cert_file and key_file"
            ),
            "{msg}"
        );
        let msg = invalid_listener(|c| {
            c.listener.push(ListenerConfig::new(
                ListenerKind::Ws,
                addr("127.0.0.1:1883"),
            ))
        });
        assert!(
            msg.contains("address 127.0.0.1:1883 is used by another listener"),
            "{msg}"
        );
        let msg = invalid_listener(|c| {
            c.listener.push(ListenerConfig::new(
                ListenerKind::Ws,
                addr("127.0.0.1:18083"),
            ))
        });
        assert!(msg.contains("is server.admin_listen"), "{msg}");
        // Port 0 may repeat: each listener gets its own port.
        let mut ok = Config::default();
        ok.server.listen = vec![addr("127.0.0.1:0")];
        ok.listener
            .push(ListenerConfig::new(ListenerKind::Ws, addr("127.0.0.1:0")));
        ok.validate().unwrap();
        let path = file(
            "listener-typo",
            "[[listener]]\nkind = \"ws\"\nbind = \"127.0.0.1:1\"\nport = 2\n",
        );
        let err = Config::load(&cli_with_file(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `port`"), "{err}");
    }

    #[test]
    fn field_at_locates_keys_and_headers() {
        let text = "top = 1\n[server]\nlisten = []\n  [ limits ]\nmax_inflight = 3\n";
        assert_eq!(field_at(text, 0).as_deref(), Some("top"));
        assert_eq!(
            field_at(text, text.find("listen").unwrap()).as_deref(),
            Some("server.listen")
        );
        assert_eq!(
            field_at(text, text.find("limits").unwrap()).as_deref(),
            Some("limits")
        );
        assert_eq!(
            field_at(text, text.find("3").unwrap()).as_deref(),
            Some("limits.max_inflight")
        );
    }
}
