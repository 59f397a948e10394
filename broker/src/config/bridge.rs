//! Bridges: `[[bridge]]` tables of the config file, one per remote broker, each
//! with `[[bridge.out]]` rules (local filter to remote topic) and `[[bridge.in]]`
//! rules (remote filter to local topic). How a bridge runs is in
//! [`crate::bridge`] and docs/BRIDGES.md.
//!
//! A rule maps topics the way Mosquitto's `topic` lines do, so its users know
//! it: `topic` is a filter pattern; the local side of the rule is
//! `local_prefix + topic`, the remote side `remote_prefix + topic`; a message
//! crosses with its local prefix replaced by the remote one (or the reverse).
//!
//! Every check names the field: `bridge "cloud": out[1].topic: ...`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tessera_proto::topic;

use super::QuicCongestion;

/// Most bridges in one config file.
pub const BRIDGES_COUNT_MAX: usize = 64;

/// Most rules per direction of one bridge.
pub const RULES_COUNT_MAX: usize = 256;

/// One `[[bridge]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// The bridge's name: letters, digits, `-` and `_` (in logs, metrics, the API).
    pub name: String,
    /// The remote broker, `host:port`.
    pub address: String,
    /// `mqtt`, `mqtts`, `ws`, `wss` or `quic` (MQTT over QUIC, TLS 1.3, ALPN
    /// `mqtt`: a `quic` listener of another Tessera, EMQX, NanoMQ).
    #[serde(default = "transport_default")]
    pub transport: String,
    /// MQTT version spoken to the remote: `"3.1.1"` or `"5"`.
    #[serde(default = "version_default")]
    pub version: String,
    /// The ClientID on the remote, and of the bridge's session here (its owner
    /// shard runs the bridge); default `tessera-bridge-<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Username sent to the remote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password sent to the remote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Username the bridge's local session acts as: the ACL applies to it like
    /// to a client that authenticated with it. Unset: anonymous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_username: Option<String>,
    /// Keep alive with the remote, seconds (0: none).
    #[serde(default = "keep_alive_default")]
    pub keep_alive_s: u16,
    /// Clean start on the remote at each connect (the remote session and what it
    /// queued for the bridge are dropped).
    #[serde(default)]
    pub clean_start: bool,
    /// Session expiry asked of a v5 remote, seconds (3.1.1: the session persists
    /// unless `clean_start`).
    #[serde(default = "session_expiry_default")]
    pub session_expiry_s: u32,
    /// First reconnect delay, ms; doubles per failure up to `reconnect_max_ms`,
    /// with up to 50 % random jitter.
    #[serde(default = "reconnect_min_default")]
    pub reconnect_min_ms: u32,
    /// Longest reconnect delay, ms.
    #[serde(default = "reconnect_max_default")]
    pub reconnect_max_ms: u32,
    /// QoS 1 and 2 messages in flight to the remote at once. A v5 remote's
    /// Receive Maximum lowers it further. Unset: that Receive Maximum (v5), or
    /// [`V311_MAX_INFLIGHT_DEFAULT`] for a 3.1.1 remote, which advertises no
    /// limit although it has one (Mosquitto's is 20: over it, it drops the
    /// message yet answers a 3.1.1 PUBREC, and closes the connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<u16>,
    /// Longest a QoS 0 publisher feeding this bridge is paused, ms, while
    /// the bridge's queue is behind (`queue_high_water` deliveries, until
    /// half of it): its connection is not read, so TCP slows it. A bridge
    /// still behind at the bound (a remote that stopped reading) is not
    /// waited for during the next second, and QoS 0 beyond its queue's
    /// budget is dropped and counted. 0: never paused (QoS 0 is dropped at
    /// the budget, as before).
    #[serde(default = "qos0_pace_ms_max_default")]
    pub qos0_pace_ms_max: u32,
    /// CA certificates (PEM) the remote's certificate is verified against
    /// (`mqtts`, `wss`, `quic`); unset: the system's roots are not used, so it
    /// is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) presented to the remote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The server name checked against the remote's certificate (and sent as
    /// SNI); default: the host of `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// WebSocket path (`ws`, `wss`).
    #[serde(default = "ws_path_default")]
    pub ws_path: String,
    /// `quic`: the congestion controller of the connection to the remote
    /// (`cubic`, `new_reno` or `bbr`, as a `quic` listener's `congestion`).
    #[serde(default)]
    pub congestion: QuicCongestion,
    /// Local to remote rules.
    #[serde(default, rename = "out", skip_serializing_if = "Vec::is_empty")]
    pub out_rules: Vec<RuleConfig>,
    /// Remote to local rules.
    #[serde(default, rename = "in", skip_serializing_if = "Vec::is_empty")]
    pub in_rules: Vec<RuleConfig>,
}

/// One `[[bridge.out]]` or `[[bridge.in]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The filter pattern, after the prefixes (`sensors/#`).
    pub topic: String,
    /// Prefix on the local side (`""`: none).
    #[serde(default)]
    pub local_prefix: String,
    /// Prefix on the remote side (`""`: none).
    #[serde(default)]
    pub remote_prefix: String,
    /// Highest QoS the rule forwards with (a cap: messages keep a lower one).
    #[serde(default = "qos_default")]
    pub qos: u8,
    /// `"keep"`: the RETAIN flag crosses as published; `"clear"`: never retained
    /// on the other side.
    #[serde(default = "retain_default")]
    pub retain: String,
}

fn transport_default() -> String {
    "mqtt".into()
}
fn version_default() -> String {
    "5".into()
}
fn keep_alive_default() -> u16 {
    60
}
fn session_expiry_default() -> u32 {
    86_400
}
/// In flight to a 3.1.1 remote when `max_inflight` is unset: Mosquitto's
/// default incoming limit (`max_inflight_messages`, 20), and below EMQX's (32).
pub const V311_MAX_INFLIGHT_DEFAULT: u16 = 20;

fn reconnect_min_default() -> u32 {
    500
}
fn reconnect_max_default() -> u32 {
    30_000
}
fn qos0_pace_ms_max_default() -> u32 {
    QOS0_PACE_MS_MAX_DEFAULT
}
/// `qos0_pace_ms_max` when unset: a remote that stopped reading (until its
/// keep alive ends the link) costs its QoS 0 publishers at most a tenth of a
/// second per second.
pub const QOS0_PACE_MS_MAX_DEFAULT: u32 = 100;
/// The largest `qos0_pace_ms_max` accepted.
pub const QOS0_PACE_MS_MAX_LIMIT: u32 = 60_000;
fn ws_path_default() -> String {
    "/mqtt".into()
}
fn qos_default() -> u8 {
    1
}
fn retain_default() -> String {
    "keep".into()
}

/// The transport to the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeTransport {
    /// TCP.
    Mqtt,
    /// TLS.
    Mqtts,
    /// WebSocket.
    Ws,
    /// WebSocket over TLS.
    Wss,
    /// MQTT over QUIC (one bidirectional stream; TLS 1.3 inside QUIC).
    Quic,
}

impl BridgeTransport {
    /// Whether the transport is encrypted with TLS, so takes the TLS fields
    /// (`ca_file`, `cert_file`, `key_file`, `sni`): over TCP, or QUIC's.
    pub fn is_tls(self) -> bool {
        matches!(
            self,
            BridgeTransport::Mqtts | BridgeTransport::Wss | BridgeTransport::Quic
        )
    }

    /// Whether MQTT travels over QUIC (UDP) instead of TCP.
    pub fn is_quic(self) -> bool {
        self == BridgeTransport::Quic
    }

    /// Whether MQTT travels in WebSocket frames.
    pub fn is_ws(self) -> bool {
        matches!(self, BridgeTransport::Ws | BridgeTransport::Wss)
    }
}

/// A rule's direction, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `[[bridge.out]]`.
    Out,
    /// `[[bridge.in]]`.
    In,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }
}

impl RuleConfig {
    /// The filter on the local side.
    pub fn local_filter(&self) -> String {
        format!("{}{}", self.local_prefix, self.topic)
    }

    /// The filter on the remote side.
    pub fn remote_filter(&self) -> String {
        format!("{}{}", self.remote_prefix, self.topic)
    }

    /// Whether the RETAIN flag crosses as published.
    pub fn keep_retain(&self) -> bool {
        self.retain == "keep"
    }

    fn check(&self, dir: Direction, i: usize) -> Result<(), (String, String)> {
        let field = |f: &str| format!("{}[{i}].{f}", dir.name());
        for (name, prefix) in [
            ("local_prefix", &self.local_prefix),
            ("remote_prefix", &self.remote_prefix),
        ] {
            if prefix.contains(['+', '#', '\0']) {
                return Err((
                    field(name),
                    format!("{prefix:?} must not contain '+', '#' or NUL"),
                ));
            }
        }
        for (side, filter) in [
            ("local", self.local_filter()),
            ("remote", self.remote_filter()),
        ] {
            if topic::validate_topic_filter(&filter, 128).is_err() || topic::is_shared(&filter) {
                return Err((
                    field("topic"),
                    format!(
                        "the {side} filter {filter:?} (prefix + topic) is not a valid, \
                         non-shared topic filter"
                    ),
                ));
            }
        }
        if self.qos > 2 {
            return Err((field("qos"), format!("{} is not 0, 1 or 2", self.qos)));
        }
        if self.retain != "keep" && self.retain != "clear" {
            return Err((
                field("retain"),
                format!("{:?}: expected \"keep\" or \"clear\"", self.retain),
            ));
        }
        Ok(())
    }
}

impl BridgeConfig {
    /// QoS 1 and 2 messages the bridge keeps in flight to a remote that speaks
    /// v5 (`v5`) and advertised `receive_maximum` in its CONNACK.
    pub fn max_inflight_to(&self, v5: bool, receive_maximum: Option<u16>) -> u16 {
        let own = self.max_inflight.unwrap_or(if v5 {
            u16::MAX
        } else {
            V311_MAX_INFLIGHT_DEFAULT
        });
        // A v5 CONNACK without Receive Maximum means 65,535 [MQTT-3.2.2.3.3].
        own.min(receive_maximum.unwrap_or(u16::MAX)).max(1)
    }

    /// The ClientID on the remote and of the local session.
    pub fn client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("tessera-bridge-{}", self.name))
    }

    /// Whether the remote speaks MQTT 5.
    pub fn is_v5(&self) -> bool {
        self.version == "5"
    }

    /// The transport; `check` refused anything else.
    pub fn transport(&self) -> BridgeTransport {
        match self.transport.as_str() {
            "mqtts" => BridgeTransport::Mqtts,
            "ws" => BridgeTransport::Ws,
            "wss" => BridgeTransport::Wss,
            "quic" => BridgeTransport::Quic,
            _ => BridgeTransport::Mqtt,
        }
    }

    /// The host part of `address` (without brackets for IPv6).
    pub fn host(&self) -> &str {
        let host = self
            .address
            .rsplit_once(':')
            .map_or(self.address.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    /// Checks one bridge; the error is `(field, message)`.
    pub fn check(&self) -> Result<(), (String, String)> {
        let err = |f: &str, m: String| Err((f.to_owned(), m));
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return err(
                "name",
                format!("{:?}: 1 to 64 letters, digits, '-' or '_'", self.name),
            );
        }
        match self.address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => {
                return err(
                    "address",
                    format!(
                        "{:?}: expected host:port (e.g. \"cloud.example.com:1883\")",
                        self.address
                    ),
                );
            }
        }
        match self.transport.as_str() {
            "mqtt" | "mqtts" | "ws" | "wss" | "quic" => {}
            other => {
                return err(
                    "transport",
                    format!("{other:?}: expected \"mqtt\", \"mqtts\", \"ws\", \"wss\" or \"quic\""),
                );
            }
        }
        if self.version != "5" && self.version != "3.1.1" {
            return err(
                "version",
                format!("{:?}: expected \"3.1.1\" or \"5\"", self.version),
            );
        }
        let client_id = self.client_id();
        if client_id.is_empty() || client_id.len() > 65_535 || client_id.contains('\0') {
            return err(
                "client_id",
                format!("{client_id:?}: a non-empty MQTT string without NUL"),
            );
        }
        if self.password.is_some() && self.username.is_none() && !self.is_v5() {
            return err(
                "password",
                "MQTT 3.1.1 sends a password only with a username: set username too".into(),
            );
        }
        let tls = self.transport().is_tls();
        if tls && self.ca_file.is_none() {
            return err(
                "ca_file",
                format!(
                    "transport {} needs ca_file (the CA the remote's certificate is verified against)",
                    self.transport
                ),
            );
        }
        for (name, set) in [
            ("ca_file", self.ca_file.is_some()),
            ("cert_file", self.cert_file.is_some()),
            ("key_file", self.key_file.is_some()),
            ("sni", self.sni.is_some()),
        ] {
            if set && !tls {
                return err(
                    name,
                    format!(
                        "applies to TLS transports (mqtts, wss, quic), not {}",
                        self.transport
                    ),
                );
            }
        }
        if self.congestion != QuicCongestion::Cubic && !self.transport().is_quic() {
            return err(
                "congestion",
                format!("applies to transport quic, not {}", self.transport),
            );
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return err(
                if self.cert_file.is_some() {
                    "key_file"
                } else {
                    "cert_file"
                },
                "a client certificate needs both cert_file and key_file".into(),
            );
        }
        if !self.ws_path.starts_with('/') || self.ws_path.contains([' ', '\r', '\n']) {
            return err(
                "ws_path",
                format!("{:?} must start with '/' and have no space", self.ws_path),
            );
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return err(
                "reconnect_min_ms",
                format!(
                    "{}: at least 1 and at most reconnect_max_ms ({})",
                    self.reconnect_min_ms, self.reconnect_max_ms
                ),
            );
        }
        if self.max_inflight == Some(0) {
            return err("max_inflight", "0: at least 1".into());
        }
        if self.qos0_pace_ms_max > QOS0_PACE_MS_MAX_LIMIT {
            return err(
                "qos0_pace_ms_max",
                format!(
                    "{}: at most {QOS0_PACE_MS_MAX_LIMIT}",
                    self.qos0_pace_ms_max
                ),
            );
        }
        if self.out_rules.is_empty() && self.in_rules.is_empty() {
            return err(
                "out",
                "a bridge needs at least one [[bridge.out]] or [[bridge.in]] rule".into(),
            );
        }
        for (dir, rules) in [
            (Direction::Out, &self.out_rules),
            (Direction::In, &self.in_rules),
        ] {
            if rules.len() > RULES_COUNT_MAX {
                return err(
                    dir.name(),
                    format!("{} rules: at most {RULES_COUNT_MAX}", rules.len()),
                );
            }
            for (i, r) in rules.iter().enumerate() {
                r.check(dir, i)?;
                // One subscription per filter on the subscribing side: a second
                // rule with the same filter would replace the first.
                let side = |r: &RuleConfig| match dir {
                    Direction::Out => r.local_filter(),
                    Direction::In => r.remote_filter(),
                };
                if let Some(j) = rules[..i].iter().position(|o| side(o) == side(r)) {
                    return err(
                        &format!("{}[{i}].topic", dir.name()),
                        format!(
                            "subscribes to {:?} like {}[{j}]: merge the two rules",
                            side(r),
                            dir.name()
                        ),
                    );
                }
            }
        }
        if !self.is_v5() {
            // MQTT 3.1.1 has no No Local: what the bridge publishes on the remote
            // would come back to it through an `in` rule that covers it. The rule:
            // the remote topics of `out` rules and the remote filters of `in` rules
            // must not overlap (give them different remote prefixes).
            for (i, r) in self.in_rules.iter().enumerate() {
                if let Some(j) = self
                    .out_rules
                    .iter()
                    .position(|o| filters_overlap(&o.remote_filter(), &r.remote_filter()))
                {
                    return err(
                        &format!("in[{i}].topic"),
                        format!(
                            "the remote filter {:?} overlaps out[{j}]'s remote topics {:?}: \
                             MQTT 3.1.1 has no No Local, so what the bridge sends would come \
                             back; give the two rules different remote prefixes (or use \
                             version = \"5\")",
                            r.remote_filter(),
                            self.out_rules[j].remote_filter()
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

/// Whether some topic name matches both filters.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let mut la = topic::levels(a);
    let mut lb = topic::levels(b);
    loop {
        match (la.next(), lb.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(x), Some(y)) if x == "+" || y == "+" || x == y => {}
            _ => return false,
        }
    }
}

/// Checks every bridge and their names' uniqueness; the error is the message.
pub fn check_all(bridges: &[BridgeConfig]) -> Result<(), String> {
    if bridges.len() > BRIDGES_COUNT_MAX {
        return Err(format!(
            "{} [[bridge]] tables: at most {BRIDGES_COUNT_MAX}",
            bridges.len()
        ));
    }
    for (i, b) in bridges.iter().enumerate() {
        b.check()
            .map_err(|(field, m)| format!("bridge {:?} (#{}): {field}: {m}", b.name, i + 1))?;
        if let Some(o) = bridges[..i].iter().find(|o| o.name == b.name) {
            return Err(format!(
                "bridge {:?} (#{}): name: used by another bridge",
                o.name,
                i + 1
            ));
        }
        if let Some(o) = bridges[..i].iter().find(|o| o.client_id() == b.client_id()) {
            return Err(format!(
                "bridge {:?} (#{}): client_id: {:?} is bridge {:?}'s too",
                b.name,
                i + 1,
                b.client_id(),
                o.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridges(text: &str) -> Result<Vec<BridgeConfig>, String> {
        #[derive(Deserialize)]
        struct Doc {
            bridge: Vec<BridgeConfig>,
        }
        let d: Doc = toml::from_str(text).map_err(|e| e.to_string())?;
        check_all(&d.bridge).map(|()| d.bridge)
    }

    const BASE: &str = "[[bridge]]\nname = \"cloud\"\naddress = \"127.0.0.1:1883\"\n";
    const OUT: &str = "[[bridge.out]]\ntopic = \"a/#\"\nremote_prefix = \"edge/\"\n";

    #[test]
    fn defaults_and_rules_parse() {
        let b = &bridges(&format!("{BASE}{OUT}[[bridge.in]]\ntopic = \"cmd/#\"\n")).unwrap()[0];
        assert_eq!(b.client_id(), "tessera-bridge-cloud");
        assert!(b.is_v5());
        assert_eq!(b.transport(), BridgeTransport::Mqtt);
        assert_eq!(b.out_rules[0].remote_filter(), "edge/a/#");
        assert_eq!(b.out_rules[0].local_filter(), "a/#");
        assert_eq!(b.out_rules[0].qos, 1);
        assert!(b.out_rules[0].keep_retain());
        assert_eq!(b.host(), "127.0.0.1");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                format!("{BASE}transport = \"quic\"\n{OUT}"),
                "ca_file: transport quic needs ca_file",
            ),
            (
                format!("{BASE}transport = \"tcp\"\n{OUT}"),
                "transport: \"tcp\"",
            ),
            (format!("{BASE}version = \"4\"\n{OUT}"), "version: \"4\""),
            (BASE.to_owned(), "out: a bridge needs at least one"),
            (
                format!("{BASE}transport = \"mqtts\"\n{OUT}"),
                "ca_file: transport mqtts needs ca_file",
            ),
            (format!("{BASE}sni = \"x\"\n{OUT}"), "sni: applies to TLS"),
            (
                format!("{BASE}congestion = \"bbr\"\n{OUT}"),
                "congestion: applies to transport quic, not mqtt",
            ),
            (
                format!("{BASE}[[bridge.out]]\ntopic = \"a/#/b\"\n"),
                "out[0].topic",
            ),
            (
                format!("{BASE}[[bridge.out]]\ntopic = \"a\"\nqos = 3\n"),
                "out[0].qos",
            ),
            (
                format!("{BASE}[[bridge.out]]\ntopic = \"a\"\nretain = \"no\"\n"),
                "out[0].retain",
            ),
            (
                format!("{BASE}[[bridge.out]]\ntopic = \"a\"\nlocal_prefix = \"x/+/\"\n"),
                "out[0].local_prefix",
            ),
            (
                format!("{BASE}{OUT}{OUT}"),
                "out[1].topic: subscribes to \"a/#\" like out[0]",
            ),
            (
                format!("[[bridge]]\nname = \"cloud\"\naddress = \"nohost\"\n{OUT}"),
                "address: \"nohost\"",
            ),
            (
                format!("{BASE}{OUT}{BASE}{OUT}"),
                "name: used by another bridge",
            ),
            (
                format!("{BASE}reconnect_min_ms = 0\n{OUT}"),
                "reconnect_min_ms",
            ),
            (
                format!("{BASE}max_inflight = 0\n{OUT}"),
                "max_inflight: 0: at least 1",
            ),
            (
                format!("{BASE}qos0_pace_ms_max = 60001\n{OUT}"),
                "qos0_pace_ms_max: 60001: at most 60000",
            ),
        ];
        for (text, want) in cases {
            let e = bridges(&text).unwrap_err();
            assert!(e.contains(want), "{text}\n=> {e}\nwanted {want}");
            assert!(e.contains("bridge \"cloud\""), "{e}");
        }
        let e = bridges(&format!("{BASE}adress = \"x\"\n{OUT}")).unwrap_err();
        assert!(e.contains("unknown field `adress`"), "{e}");
    }

    #[test]
    fn quic_takes_the_tls_fields() {
        let b = &bridges(&format!(
            "{BASE}transport = \"quic\"\nca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\n\
             key_file = \"/c.key\"\nsni = \"cloud\"\n{OUT}"
        ))
        .unwrap()[0];
        assert_eq!(b.transport(), BridgeTransport::Quic);
        assert!(b.transport().is_tls() && b.transport().is_quic());
        assert_eq!(b.congestion, QuicCongestion::Cubic);
        assert!(!b.transport().is_ws());
        let b = &bridges(&format!(
            "{BASE}transport = \"quic\"\nca_file = \"/ca.pem\"\ncongestion = \"bbr\"\n{OUT}"
        ))
        .unwrap()[0];
        assert_eq!(b.congestion, QuicCongestion::Bbr);
    }

    #[test]
    fn max_inflight_defaults_to_a_limit_for_311_remotes() {
        let cfg = |extra: &str| bridges(&format!("{BASE}{extra}{OUT}")).unwrap().remove(0);
        let unset = cfg("");
        // 3.1.1 advertises no limit: Mosquitto's default applies.
        assert_eq!(
            unset.max_inflight_to(false, None),
            V311_MAX_INFLIGHT_DEFAULT
        );
        // v5: the remote's Receive Maximum, 65,535 when absent.
        assert_eq!(unset.max_inflight_to(true, Some(10)), 10);
        assert_eq!(unset.max_inflight_to(true, None), u16::MAX);
        let set = cfg("max_inflight = 100\n");
        assert_eq!(set.max_inflight_to(false, None), 100);
        assert_eq!(set.max_inflight_to(true, Some(10)), 10);
        assert_eq!(set.max_inflight_to(true, Some(500)), 100);
    }

    #[test]
    fn v311_refuses_rules_that_would_loop() {
        // Out to edge/a/#, in from edge/#: what goes out comes back in.
        let looping = format!(
            "{BASE}version = \"3.1.1\"\n{OUT}[[bridge.in]]\ntopic = \"#\"\nremote_prefix = \"edge/\"\n"
        );
        let e = bridges(&looping).unwrap_err();
        assert!(e.contains("in[0].topic") && e.contains("No Local"), "{e}");
        // The same rules over MQTT 5 are fine (No Local on the remote subscription).
        assert!(bridges(&looping.replace("3.1.1", "5")).is_ok());
        // Distinct remote prefixes are fine over 3.1.1.
        let ok = format!(
            "{BASE}version = \"3.1.1\"\n{OUT}[[bridge.in]]\ntopic = \"#\"\nremote_prefix = \"cloud/\"\n"
        );
        assert!(bridges(&ok).is_ok());
    }

    #[test]
    fn overlap_of_filters() {
        assert!(filters_overlap("a/#", "a/b"));
        assert!(filters_overlap("a/+/c", "a/b/+"));
        assert!(filters_overlap("#", "x"));
        assert!(!filters_overlap("a/b", "a/c"));
        assert!(!filters_overlap("a/+", "a/b/c"));
        assert!(filters_overlap("a/+", "a/#"));
        assert!(!filters_overlap("edge/a/#", "cloud/#"));
    }
}
