//! Model types shared by every packet: protocol version, QoS, packet type, the
//! validated UTF-8 string type and subscription options.

use std::fmt;

use bytes::Bytes;

use crate::error::{DecodeError, Malformed, ProtocolViolation};

/// The protocol level a connection speaks, fixed by its CONNECT packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1: protocol name "MQIsdp", level 3.
    V3_1,
    /// MQTT 3.1.1: protocol name "MQTT", level 4.
    V3_1_1,
    /// MQTT 5.0: protocol name "MQTT", level 5.
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte of CONNECT.
    pub const fn level(self) -> u8 {
        match self {
            ProtocolVersion::V3_1 => 3,
            ProtocolVersion::V3_1_1 => 4,
            ProtocolVersion::V5 => 5,
        }
    }

    /// The protocol name CONNECT carries for this level.
    pub const fn protocol_name(self) -> &'static str {
        match self {
            ProtocolVersion::V3_1 => "MQIsdp",
            ProtocolVersion::V3_1_1 | ProtocolVersion::V5 => "MQTT",
        }
    }

    /// True for MQTT 5.0, the only version with properties and reason codes.
    pub const fn is_v5(self) -> bool {
        matches!(self, ProtocolVersion::V5)
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProtocolVersion::V3_1 => "3.1",
            ProtocolVersion::V3_1_1 => "3.1.1",
            ProtocolVersion::V5 => "5.0",
        })
    }
}

/// Quality of service of a message or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum QoS {
    /// QoS 0: at most once.
    #[default]
    AtMostOnce = 0,
    /// QoS 1: at least once.
    AtLeastOnce = 1,
    /// QoS 2: exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// Parses the two QoS bits; 3 is not a QoS level.
    pub const fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The 4-bit packet type of the fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    /// Client request to connect.
    Connect = 1,
    /// Connect acknowledgment.
    ConnAck = 2,
    /// Publish message.
    Publish = 3,
    /// Publish acknowledgment (QoS 1).
    PubAck = 4,
    /// Publish received (QoS 2, part 1).
    PubRec = 5,
    /// Publish release (QoS 2, part 2).
    PubRel = 6,
    /// Publish complete (QoS 2, part 3).
    PubComp = 7,
    /// Subscribe request.
    Subscribe = 8,
    /// Subscribe acknowledgment.
    SubAck = 9,
    /// Unsubscribe request.
    Unsubscribe = 10,
    /// Unsubscribe acknowledgment.
    UnsubAck = 11,
    /// Ping request.
    PingReq = 12,
    /// Ping response.
    PingResp = 13,
    /// Disconnect notification.
    Disconnect = 14,
    /// Authentication exchange (MQTT 5.0 only).
    Auth = 15,
}

impl PacketType {
    /// Parses the high nibble of the first byte; 0 is reserved.
    pub const fn from_nibble(v: u8) -> Option<PacketType> {
        Some(match v {
            1 => PacketType::Connect,
            2 => PacketType::ConnAck,
            3 => PacketType::Publish,
            4 => PacketType::PubAck,
            5 => PacketType::PubRec,
            6 => PacketType::PubRel,
            7 => PacketType::PubComp,
            8 => PacketType::Subscribe,
            9 => PacketType::SubAck,
            10 => PacketType::Unsubscribe,
            11 => PacketType::UnsubAck,
            12 => PacketType::PingReq,
            13 => PacketType::PingResp,
            14 => PacketType::Disconnect,
            15 => PacketType::Auth,
            _ => return None,
        })
    }

    /// The flag nibble every packet but PUBLISH must carry (MQTT 5 table 2-2).
    pub const fn required_flags(self) -> Option<u8> {
        match self {
            PacketType::Publish => None,
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => Some(0b0010),
            _ => Some(0),
        }
    }
}

/// A UTF-8 encoded string as the MQTT specification defines it (section 1.5.4):
/// valid UTF-8 (so no surrogates), no U+0000, at most 65,535 bytes.
///
/// It is a view into a shared `Bytes` buffer, so decoding a topic or client id does
/// not copy it, and cloning it is a reference-count increment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Str(Bytes);

/// The length limit of every MQTT UTF-8 string and binary field: a two-byte prefix.
pub const STRING_BYTES_MAX: usize = u16::MAX as usize;

impl Str {
    /// The empty string.
    pub const fn new() -> Str {
        Str(Bytes::new())
    }

    /// Wraps a static string, checking the MQTT rules.
    ///
    /// # Panics
    /// When `s` breaks the rules; static strings are programmer input.
    pub fn from_static(s: &'static str) -> Str {
        assert!(
            check_str(s.as_bytes()).is_ok(),
            "invalid MQTT string literal {s:?}"
        );
        Str(Bytes::from_static(s.as_bytes()))
    }

    /// Validates `bytes` as an MQTT UTF-8 string without copying it.
    pub fn from_bytes(bytes: Bytes) -> Result<Str, DecodeError> {
        check_str(&bytes)?;
        Ok(Str(bytes))
    }

    /// The string slice.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor validated the bytes as UTF-8 (`check_str`).
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The underlying shared bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Consumes the string, returning its shared bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// A copy in an allocation of its own. A decoded string is a view into its
    /// frame, and keeping it keeps the whole frame (often a read buffer) alive;
    /// state that outlives the packet (session ids, subscriptions) stores this.
    pub fn compact(&self) -> Str {
        Str(Bytes::copy_from_slice(&self.0))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the string has no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Checks the MQTT UTF-8 string rules (section 1.5.4): well-formed UTF-8 (which
/// excludes the surrogates U+D800..U+DFFF), no U+0000, fits a two-byte length.
pub(crate) fn check_str(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.len() > STRING_BYTES_MAX {
        return Err(DecodeError::Malformed(Malformed::StringTooLong));
    }
    // ASCII fast path: topics and client ids are nearly always ASCII.
    if bytes.is_ascii() {
        if bytes.contains(&0) {
            return Err(DecodeError::Malformed(Malformed::NullCharacter));
        }
        return Ok(());
    }
    match std::str::from_utf8(bytes) {
        Ok(s) if s.contains('\0') => Err(DecodeError::Malformed(Malformed::NullCharacter)),
        Ok(_) => Ok(()),
        Err(_) => Err(DecodeError::Malformed(Malformed::InvalidUtf8)),
    }
}

impl TryFrom<String> for Str {
    type Error = DecodeError;

    fn try_from(s: String) -> Result<Str, DecodeError> {
        check_str(s.as_bytes())?;
        Ok(Str(Bytes::from(s)))
    }
}

impl TryFrom<&str> for Str {
    type Error = DecodeError;

    fn try_from(s: &str) -> Result<Str, DecodeError> {
        check_str(s.as_bytes())?;
        Ok(Str(Bytes::copy_from_slice(s.as_bytes())))
    }
}

impl std::ops::Deref for Str {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// Lets maps keyed by `Str` be queried with `&[u8]` (`str::as_bytes`): `Str`
/// hashes and compares exactly like its bytes.
impl std::borrow::Borrow<[u8]> for Str {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<str> for Str {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for Str {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Str {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// MQTT 5 retain handling of a subscription (section 3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// 1: send retained messages only if the subscription did not exist.
    SendIfNew = 1,
    /// 2: never send retained messages for this subscription.
    DoNotSend = 2,
}

/// The options byte of one SUBSCRIBE topic filter. MQTT 3.1.1 uses only `qos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS the subscriber accepts.
    pub qos: QoS,
    /// v5: do not deliver the client's own publications.
    pub no_local: bool,
    /// v5: keep the RETAIN flag of forwarded messages as published.
    pub retain_as_published: bool,
    /// v5: when to send retained messages.
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// Options with just a maximum QoS, as MQTT 3.1.1 has them.
    pub const fn qos(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
        }
    }

    /// Parses the options byte. In 3.1.1 the six upper bits are reserved; in 5.0 the
    /// two upper bits are. Reserved bits set, QoS 3 or retain handling 3 are errors.
    ///
    /// QoS 3 is malformed in 3.1.1 [MQTT-3-8.3-4] but a Protocol Error in 5.0
    /// (section 3.8.3.1: "It is a Protocol Error if the Maximum QoS field has the
    /// value 3"), so a v5 peer is told 0x82, not 0x81.
    pub(crate) fn from_byte(b: u8, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let reserved = if version.is_v5() {
            0b1100_0000
        } else {
            0b1111_1100
        };
        if b & reserved != 0 {
            return Err(DecodeError::Malformed(
                Malformed::SubscriptionOptionsReserved,
            ));
        }
        let qos = match QoS::from_u8(b & 0b11) {
            Some(qos) => qos,
            None if version.is_v5() => {
                return Err(DecodeError::Protocol(
                    ProtocolViolation::SubscriptionQoSInvalid,
                ));
            }
            None => return Err(DecodeError::Malformed(Malformed::InvalidQoS)),
        };
        let retain_handling = match (b >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => {
                return Err(DecodeError::Protocol(
                    ProtocolViolation::RetainHandlingInvalid,
                ));
            }
        };
        Ok(SubscriptionOptions {
            qos,
            no_local: b & 0b0100 != 0,
            retain_as_published: b & 0b1000 != 0,
            retain_handling,
        })
    }

    /// The options byte for `version` (3.1.1 carries only the QoS).
    pub(crate) fn to_byte(self, version: ProtocolVersion) -> u8 {
        let mut b = self.qos as u8;
        if version.is_v5() {
            b |= (self.no_local as u8) << 2;
            b |= (self.retain_as_published as u8) << 3;
            b |= (self.retain_handling as u8) << 4;
        }
        b
    }
}
