//! Listeners: `[[listener]]` tables of the config file, one per address, of
//! five kinds: `mqtt` (TCP), `mqtts` (TLS), `ws` (WebSocket), `wss`
//! (WebSocket over TLS) and `quic` (MQTT over QUIC, UDP). `server.listen` (and `--listen`) keep declaring plain
//! `mqtt` listeners; [`super::Config::listeners`] gives the full list, and a
//! listener's index in it is its id ([`ListenerId`]), which every connection
//! carries to the shard that serves it.
//!
//! Per-listener policy (anonymous access, connection limits and rates) belongs
//! in [`ListenerConfig`] too, next to the transport fields.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{ConfigEnum, UnknownValue};

/// A listener's index in [`super::Config::listeners`].
pub type ListenerId = u16;

/// Most listeners, all kinds together (each costs one socket per shard).
pub const LISTENERS_COUNT_MAX: usize = 64;

/// The default WebSocket path.
pub const WS_PATH_DEFAULT: &str = "/mqtt";

/// What a listener speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    /// MQTT over TCP (default port 1883).
    #[default]
    Mqtt,
    /// MQTT over TLS (default port 8883).
    Mqtts,
    /// MQTT over WebSocket (default port 8083, path /mqtt).
    Ws,
    /// MQTT over WebSocket over TLS (default port 8084).
    Wss,
    /// MQTT over QUIC (UDP, default port 14567, ALPN `mqtt`).
    Quic,
}
config_enum!(ListenerKind {
    "mqtt" => Mqtt,
    "mqtts" => Mqtts,
    "ws" => Ws,
    "wss" => Wss,
    "quic" => Quic,
});

impl ListenerKind {
    /// Whether connections start with a TLS handshake over TCP.
    pub fn is_tls(self) -> bool {
        matches!(self, ListenerKind::Mqtts | ListenerKind::Wss)
    }

    /// Whether the listener needs a certificate and key: the TLS kinds and
    /// QUIC (whose handshake is TLS 1.3).
    pub fn has_certs(self) -> bool {
        self.is_tls() || self == ListenerKind::Quic
    }

    /// Whether the listener is a UDP socket (QUIC) rather than TCP.
    pub fn is_udp(self) -> bool {
        self == ListenerKind::Quic
    }

    /// Whether MQTT travels in WebSocket frames.
    pub fn is_ws(self) -> bool {
        matches!(self, ListenerKind::Ws | ListenerKind::Wss)
    }

    /// The conventional port.
    pub fn default_port(self) -> u16 {
        match self {
            ListenerKind::Mqtt => 1883,
            ListenerKind::Mqtts => 8883,
            ListenerKind::Ws => 8083,
            ListenerKind::Wss => 8084,
            ListenerKind::Quic => 14567,
        }
    }
}

/// Which part of a verified client certificate becomes the MQTT username.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertIdentity {
    /// The username is the one in CONNECT.
    #[default]
    None,
    /// The subject's Common Name.
    Cn,
    /// The first DNS name, e-mail address or URI of the Subject Alternative Name.
    San,
}
config_enum!(CertIdentity {
    "none" => None,
    "cn" => Cn,
    "san" => San,
});

/// The congestion controller of a `quic` listener's connections (quinn's):
/// what decides how fast the broker sends to a client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuicCongestion {
    /// CUBIC (RFC 9438), quinn's default: backs off on every loss, as Linux
    /// TCP does by default.
    #[default]
    Cubic,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
    /// BBR (model-based: paces to the measured bottleneck rate and does not
    /// treat random loss as congestion). On a link with 5 % random loss it
    /// carried 4-5x CUBIC's QoS 1 throughput (docs/BENCHMARKS.md); quinn calls
    /// its implementation experimental, so it is not the default.
    Bbr,
}
config_enum!(QuicCongestion {
    "cubic" => Cubic,
    "new_reno" => NewReno,
    "bbr" => Bbr,
});

/// One `[[listener]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// What it speaks.
    pub kind: ListenerKind,
    /// Address and port; port 0 picks a free port (printed at start).
    pub bind: SocketAddr,
    /// WebSocket path (`ws`, `wss`).
    #[serde(default = "ws_path_default")]
    pub path: String,
    /// Certificate chain, PEM (`mqtts`, `wss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Private key, PEM (`mqtts`, `wss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// CA certificates, PEM, that client certificates are verified against;
    /// unset: clients are not asked for certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate signed by `ca_file`.
    #[serde(default)]
    pub require_client_cert: bool,
    /// Use the client certificate's identity as the username.
    #[serde(default)]
    pub username_from_cert: CertIdentity,
    /// Whether clients without credentials may connect here; unset: the
    /// `auth.allow_anonymous` setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
    /// Most concurrent connections on this listener, all shards together
    /// (`limits.max_connections` applies too); unset: no per-listener limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// New connections per second on this listener, all shards together
    /// (`limits.connect_rate_per_s` applies too); unset or 0: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_rate_per_s: Option<u32>,
    /// `quic`: most bidirectional streams a client may have open at once
    /// (the MQTT stream and, in multi-stream mode, data streams).
    #[serde(default = "quic_max_streams_default")]
    pub max_streams: u32,
    /// `quic`: accept 0-RTT data from resuming clients. What arrives in
    /// 0-RTT is not acted on before the handshake is confirmed (replay).
    #[serde(default)]
    pub zero_rtt: bool,
    /// `quic`: endpoint threads (UDP sockets on the one port, datagrams
    /// steered by connection id); unset: one per shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<u32>,
    /// `quic`: the congestion controller of the listener's connections.
    #[serde(default)]
    pub congestion: QuicCongestion,
}

fn ws_path_default() -> String {
    WS_PATH_DEFAULT.to_owned()
}

/// The default of `max_streams` (EMQX's limit).
pub const QUIC_MAX_STREAMS_DEFAULT: u32 = 10;

/// The most `max_streams` allowed: each open stream costs buffers.
pub const QUIC_MAX_STREAMS_MAX: u32 = 1000;

/// The most `endpoints` a QUIC listener may have (`quic::ENDPOINTS_MAX`:
/// a connection id names its endpoint in one byte).
pub const QUIC_ENDPOINTS_MAX: u32 = 64;

fn quic_max_streams_default() -> u32 {
    QUIC_MAX_STREAMS_DEFAULT
}

impl ListenerConfig {
    /// A listener of `kind` on `bind` with every other field at its default.
    pub fn new(kind: ListenerKind, bind: SocketAddr) -> ListenerConfig {
        ListenerConfig {
            kind,
            bind,
            path: ws_path_default(),
            cert_file: None,
            key_file: None,
            ca_file: None,
            require_client_cert: false,
            username_from_cert: CertIdentity::None,
            allow_anonymous: None,
            max_connections: None,
            connect_rate_per_s: None,
            max_streams: QUIC_MAX_STREAMS_DEFAULT,
            zero_rtt: false,
            endpoints: None,
            congestion: QuicCongestion::Cubic,
        }
    }

    /// The URL clients use, e.g. `mqtts://127.0.0.1:8883` or `ws://[::1]:8083/mqtt`.
    pub fn url(&self, bound: SocketAddr) -> String {
        if self.kind.is_ws() {
            format!("{}://{bound}{}", self.kind, self.path)
        } else {
            format!("{}://{bound}", self.kind)
        }
    }

    /// Checks the fields against the kind; the message says what to change.
    pub fn check(&self) -> Result<(), String> {
        let tls = self.kind.has_certs();
        if tls && (self.cert_file.is_none() || self.key_file.is_none()) {
            return Err(format!("kind {} needs cert_file and key_file", self.kind));
        }
        let quic = self.kind == ListenerKind::Quic;
        if !quic
            && (self.zero_rtt
                || self.max_streams != QUIC_MAX_STREAMS_DEFAULT
                || self.endpoints.is_some()
                || self.congestion != QuicCongestion::Cubic)
        {
            let field = if self.zero_rtt {
                "zero_rtt"
            } else if self.endpoints.is_some() {
                "endpoints"
            } else if self.congestion != QuicCongestion::Cubic {
                "congestion"
            } else {
                "max_streams"
            };
            return Err(format!(
                "{field} applies to QUIC listeners (quic), not {}",
                self.kind
            ));
        }
        if quic && !(1..=QUIC_MAX_STREAMS_MAX).contains(&self.max_streams) {
            return Err(format!(
                "max_streams must be 1 to {QUIC_MAX_STREAMS_MAX}, not {}",
                self.max_streams
            ));
        }
        if let Some(n) = self.endpoints
            && !(1..=QUIC_ENDPOINTS_MAX).contains(&n)
        {
            return Err(format!(
                "endpoints must be 1 to {QUIC_ENDPOINTS_MAX}, not {n}"
            ));
        }
        let tls_only = [
            ("cert_file", self.cert_file.is_some()),
            ("key_file", self.key_file.is_some()),
            ("ca_file", self.ca_file.is_some()),
            ("require_client_cert", self.require_client_cert),
            (
                "username_from_cert",
                self.username_from_cert != CertIdentity::None,
            ),
        ];
        if let Some((field, _)) = tls_only.iter().find(|(_, set)| !tls && *set) {
            return Err(format!(
                "{field} applies to TLS listeners (mqtts, wss, quic), not {}",
                self.kind
            ));
        }
        if self.require_client_cert && self.ca_file.is_none() {
            return Err(
                "require_client_cert needs ca_file (the CA client certificates are \
                        verified against)"
                    .to_owned(),
            );
        }
        if self.username_from_cert != CertIdentity::None && !self.require_client_cert {
            return Err(
                "username_from_cert needs require_client_cert = true (otherwise a \
                        client without a certificate could choose its username)"
                    .to_owned(),
            );
        }
        if self.max_connections == Some(0) {
            return Err("max_connections must be at least 1 (omit it for no limit)".to_owned());
        }
        if self.kind.is_ws() {
            if !self.path.starts_with('/') || self.path.contains(['?', '#', ' ']) {
                return Err(format!(
                    "path {:?} must start with '/' and have no '?', '#' or space",
                    self.path
                ));
            }
        } else if self.path != WS_PATH_DEFAULT {
            return Err(format!(
                "path applies to WebSocket listeners (ws, wss), not {}",
                self.kind
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(text: &str) -> Result<ListenerConfig, String> {
        let l: ListenerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        l.check().map(|()| l)
    }

    #[test]
    fn kinds_have_their_defaults_and_checks() {
        let ws = listener("kind = \"ws\"\nbind = \"127.0.0.1:8083\"").unwrap();
        assert_eq!(ws.path, "/mqtt");
        assert_eq!(
            ws.url("127.0.0.1:8083".parse().unwrap()),
            "ws://127.0.0.1:8083/mqtt"
        );
        let e = listener("kind = \"mqtts\"\nbind = \"127.0.0.1:8883\"").unwrap_err();
        assert!(e.contains("needs cert_file and key_file"), "{e}");
        let e = listener("kind = \"mqtt\"\nbind = \"127.0.0.1:1\"\nca_file = \"x\"").unwrap_err();
        assert!(e.contains("ca_file applies to TLS listeners"), "{e}");
        let e = listener("kind = \"mqtt\"\nbind = \"127.0.0.1:1\"\npath = \"/x\"").unwrap_err();
        assert!(e.contains("path applies to WebSocket"), "{e}");
        let e = listener("kind = \"ws\"\nbind = \"127.0.0.1:1\"\npath = \"mqtt\"").unwrap_err();
        assert!(e.contains("must start with '/'"), "{e}");
        let tls = "kind = \"wss\"\nbind = \"127.0.0.1:1\"\ncert_file = \"c\"\nkey_file = \"k\"\n";
        assert!(listener(tls).is_ok());
        let e = listener(&format!("{tls}require_client_cert = true")).unwrap_err();
        assert!(e.contains("needs ca_file"), "{e}");
        let e = listener(&format!(
            "{tls}ca_file = \"ca\"\nusername_from_cert = \"cn\""
        ))
        .unwrap_err();
        assert!(e.contains("needs require_client_cert"), "{e}");
        let ok = format!(
            "{tls}ca_file = \"ca\"\nrequire_client_cert = true\nusername_from_cert = \"san\""
        );
        assert_eq!(listener(&ok).unwrap().username_from_cert, CertIdentity::San);
        let e = listener("kind = \"quic\"\nbind = \"127.0.0.1:1\"").unwrap_err();
        assert!(e.contains("kind quic needs cert_file and key_file"), "{e}");
        let quic = "kind = \"quic\"\nbind = \"127.0.0.1:1\"\ncert_file = \"c\"\nkey_file = \"k\"\n";
        let q = listener(quic).unwrap();
        assert_eq!((q.max_streams, q.zero_rtt), (10, false));
        assert_eq!(
            q.url("127.0.0.1:14567".parse().unwrap()),
            "quic://127.0.0.1:14567"
        );
        let q = listener(&format!("{quic}max_streams = 1\nzero_rtt = true")).unwrap();
        assert_eq!((q.max_streams, q.zero_rtt), (1, true));
        let e = listener(&format!("{quic}max_streams = 0")).unwrap_err();
        assert!(e.contains("max_streams must be 1 to 1000"), "{e}");
        assert_eq!(q.endpoints, None);
        let q = listener(&format!("{quic}endpoints = 4")).unwrap();
        assert_eq!(q.endpoints, Some(4));
        let q = listener(&format!("{quic}congestion = \"bbr\"")).unwrap();
        assert_eq!(q.congestion, QuicCongestion::Bbr);
        assert_eq!(listener(quic).unwrap().congestion, QuicCongestion::Cubic);
        let e = listener(&format!("{quic}congestion = \"vegas\"")).unwrap_err();
        assert!(e.contains("vegas"), "{e}");
        let e =
            listener("kind = \"mqtt\"\nbind = \"127.0.0.1:1\"\ncongestion = \"bbr\"").unwrap_err();
        assert!(e.contains("congestion applies to QUIC listeners"), "{e}");
        let e = listener(&format!("{quic}endpoints = 0")).unwrap_err();
        assert!(e.contains("endpoints must be 1 to 64"), "{e}");
        let e = listener(&format!("{quic}endpoints = 65")).unwrap_err();
        assert!(e.contains("endpoints must be 1 to 64"), "{e}");
        let e = listener("kind = \"mqtts\"\nbind = \"127.0.0.1:1\"\ncert_file = \"c\"\nkey_file = \"k\"\nendpoints = 2").unwrap_err();
        assert!(e.contains("endpoints applies to QUIC listeners"), "{e}");
        let e = listener("kind = \"mqtt\"\nbind = \"127.0.0.1:1\"\nzero_rtt = true").unwrap_err();
        assert!(e.contains("zero_rtt applies to QUIC listeners"), "{e}");
        let e = listener("kind = \"ws\"\nbind = \"127.0.0.1:1\"\nallow = 1").unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn enum_names_match_serde_names() {
        for (name, kind) in ListenerKind::VALUES {
            assert_eq!(toml::Value::try_from(kind).unwrap().as_str(), Some(*name));
            assert_eq!(ListenerKind::from_str(name), Ok(*kind));
        }
        for (name, id) in CertIdentity::VALUES {
            assert_eq!(toml::Value::try_from(id).unwrap().as_str(), Some(*name));
        }
        let _: Result<ListenerKind, UnknownValue> = "x".parse();
        assert_eq!(fmt::format(format_args!("{}", ListenerKind::Wss)), "wss");
    }
}
