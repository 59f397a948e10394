//! Decode and encode errors. Every decode failure but `Incomplete` maps to the
//! MQTT 5 reason code the receiver must send before closing the connection.

use crate::reason::ReasonCode;

/// Why a byte stream could not be decoded into a packet.
///
/// `Incomplete` is not a failure: more bytes are needed. Every other variant is fatal
/// for the connection; `reason_code()` says what a v5 peer is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer does not hold a whole frame yet; at least `needed` more bytes are
    /// required (a lower bound while the fixed header itself is incomplete).
    #[error("incomplete frame: at least {needed} more bytes needed")]
    Incomplete {
        /// Bytes still missing.
        needed: usize,
    },
    /// The bytes do not follow the packet grammar (reason 0x81).
    #[error("malformed packet: {0}")]
    Malformed(Malformed),
    /// The packet parses but breaks a rule of the protocol (reason 0x82 unless the
    /// violation has a reason of its own, e.g. 0x94 for topic alias 0).
    #[error("protocol error: {0}")]
    Protocol(ProtocolViolation),
    /// The frame is larger than the receiver accepts; detected from the fixed header
    /// before the body is buffered (reason 0x95).
    #[error("packet of {size} bytes exceeds the maximum of {max} bytes")]
    PacketTooLarge {
        /// Size of the whole frame as announced by its fixed header.
        size: usize,
        /// The limit in force.
        max: usize,
    },
    /// CONNECT names a protocol or level this codec does not speak (reason 0x84,
    /// 3.1.1 return code 0x01).
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol {
        /// Protocol name bytes, first 8 of them, zero padded.
        name: [u8; 8],
        /// Protocol level byte.
        level: u8,
    },
    /// The topic name of a PUBLISH contains a wildcard or is otherwise not a valid
    /// topic name (reason 0x90).
    #[error("invalid topic name in PUBLISH")]
    TopicNameInvalid,
}

impl DecodeError {
    /// The MQTT 5 reason code for DISCONNECT or CONNACK. `Incomplete` has none.
    pub fn reason_code(&self) -> Option<ReasonCode> {
        Some(match self {
            DecodeError::Incomplete { .. } => return None,
            DecodeError::Malformed(_) => ReasonCode::MalformedPacket,
            DecodeError::Protocol(v) => v.reason_code(),
            DecodeError::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            DecodeError::UnsupportedProtocol { .. } => ReasonCode::UnsupportedProtocolVersion,
            DecodeError::TopicNameInvalid => ReasonCode::TopicNameInvalid,
        })
    }

    /// True when more bytes may complete the frame.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete { .. })
    }
}

/// The grammar rule a malformed packet broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    /// Packet type 0 is reserved.
    #[error("reserved packet type 0")]
    ReservedPacketType,
    /// Fixed header flag bits differ from those table 2-2 requires.
    #[error("invalid fixed header flags")]
    InvalidFlags,
    /// A variable byte integer longer than four bytes.
    #[error("variable byte integer longer than 4 bytes")]
    VarIntTooLong,
    /// A variable byte integer not in its shortest form (e.g. 0x80 0x00).
    #[error("variable byte integer not minimally encoded")]
    VarIntNotMinimal,
    /// A field runs past the end of the packet.
    #[error("field runs past the end of the packet")]
    UnexpectedEnd,
    /// Bytes left over after the last field of a packet that has no payload.
    #[error("trailing bytes after the packet's last field")]
    TrailingBytes,
    /// A UTF-8 string field is not valid UTF-8 (including encoded surrogates).
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A UTF-8 string field contains U+0000.
    #[error("string contains U+0000")]
    NullCharacter,
    /// A string longer than 65,535 bytes (only reachable when encoding user input).
    #[error("string longer than 65535 bytes")]
    StringTooLong,
    /// A QoS field with the value 3.
    #[error("QoS 3 is not a QoS level")]
    InvalidQoS,
    /// A QoS 0 PUBLISH with the DUP flag set.
    #[error("DUP flag set on a QoS 0 PUBLISH")]
    DupOnQoS0,
    /// CONNECT flags with the reserved bit set.
    #[error("CONNECT reserved flag set")]
    ConnectReservedFlag,
    /// CONNECT will QoS or will retain set without the will flag.
    #[error("will QoS or will retain set without the will flag")]
    WillFlagsWithoutWill,
    /// MQTT 3.1/3.1.1 CONNECT with the password flag but no user name flag.
    #[error("password flag set without user name flag")]
    PasswordWithoutUsername,
    /// A property identifier that does not exist or is not allowed in this packet.
    #[error("property 0x{0:02X} is not allowed in this packet")]
    PropertyNotAllowed(u8),
    /// A reason code that does not exist or is not allowed in this packet.
    #[error("invalid reason code")]
    InvalidReasonCode,
    /// A CONNACK acknowledge-flags byte with reserved bits set.
    #[error("CONNACK acknowledge flags reserved bits set")]
    ConnAckReservedFlags,
    /// Subscription options with reserved bits set.
    #[error("subscription options reserved bits set")]
    SubscriptionOptionsReserved,
    /// The property length runs past the end of the packet.
    #[error("property length exceeds the packet")]
    PropertyLength,
    /// A packet other than CONNECT arrived where CONNECT was expected, or the reverse.
    #[error("unexpected packet type for the protocol version")]
    UnexpectedPacket,
}

/// The protocol rule a packet broke although it parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// A property that may appear once appeared twice.
    #[error("property 0x{0:02X} appears more than once")]
    DuplicateProperty(u8),
    /// A property value outside its allowed range (e.g. Receive Maximum 0).
    #[error("property 0x{0:02X} has a value outside its range")]
    PropertyValue(u8),
    /// A Topic Alias property with the value 0 (reason 0x94).
    #[error("topic alias 0")]
    TopicAliasZero,
    /// Packet identifier 0 where a non-zero identifier is required.
    #[error("packet identifier 0")]
    PacketIdZero,
    /// SUBSCRIBE, UNSUBSCRIBE or SUBACK without any entry (at least one is required).
    #[error("SUBSCRIBE, UNSUBSCRIBE or SUBACK without any entry")]
    EmptyPayload,
    /// Retain handling with the value 3.
    #[error("retain handling 3")]
    RetainHandlingInvalid,
    /// A v5 subscription whose Maximum QoS field has the value 3 (in 3.1.1 it is
    /// `Malformed::InvalidQoS` instead).
    #[error("subscription maximum QoS 3")]
    SubscriptionQoSInvalid,
    /// Authentication data without an authentication method.
    #[error("authentication data without authentication method")]
    AuthDataWithoutMethod,
    /// A v5 PUBLISH with an empty topic and no topic alias.
    #[error("empty topic name without a topic alias")]
    EmptyTopicWithoutAlias,
    /// No-local set on a shared subscription.
    #[error("no-local set on a shared subscription")]
    NoLocalOnSharedSubscription,
    /// AUTH received on a MQTT 3.1.1 connection.
    #[error("AUTH packet on a MQTT 3.1.1 connection")]
    AuthInV3,
}

impl ProtocolViolation {
    /// The reason code a v5 receiver sends for this violation.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            ProtocolViolation::TopicAliasZero => ReasonCode::TopicAliasInvalid,
            _ => ReasonCode::ProtocolError,
        }
    }
}

/// Why a packet could not be encoded. These are programmer errors of the caller
/// (an inconsistent packet), or limits of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The remaining length exceeds 268,435,455 bytes, the variable byte integer limit.
    #[error("packet of {0} bytes exceeds the MQTT maximum")]
    PacketTooLarge(usize),
    /// A string or binary field longer than 65,535 bytes.
    #[error("string or binary field longer than 65535 bytes")]
    FieldTooLong,
    /// The packet does not exist in the target version (AUTH in 3.1.1).
    #[error("packet type not available in MQTT {0}")]
    NotInVersion(crate::ProtocolVersion),
    /// Field values contradict each other (e.g. QoS 1 with packet id 0).
    #[error("inconsistent packet: {0}")]
    Invalid(&'static str),
}
