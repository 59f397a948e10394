//! Malformed and rule-breaking input: what the decoder refuses, and what it tells
//! a v5 peer.
//!
//! Goal: every way a peer can break the MQTT 3.1.1 or 5.0 grammar or its protocol
//! rules is refused with one exact `DecodeError`, that error maps to the reason
//! code the specification names (0x81 Malformed Packet, 0x82 Protocol Error, 0x84,
//! 0x90, 0x94, 0x95), and a refusal leaves the codec usable.
//!
//! Method: a table of cases, each a whole frame worked out by hand (a comment
//! names the rule it breaks and, where the bytes are not obvious, each field), the
//! connection's protocol version, the exact error and the exact reason code. For
//! each case the test checks `frame::check` agrees (a framing error there, or a
//! frame of exactly the case's length, so a body error is never a truncation
//! artefact), that `decode` fails with the error, and that a fresh PINGREQ then
//! decodes: the codec keeps no state between calls. A second test checks that a
//! truncated frame is `Ok(None)` from `decode` and `Incomplete` with the exact
//! missing byte count from `check`.

use bytes::BytesMut;
use tessera_proto::{
    DecodeError, Malformed, PACKET_BYTES_MAX, Packet, ProtocolVersion, ProtocolViolation,
    ReasonCode, check, decode,
};

use DecodeError::{Malformed as M, Protocol as P};
use ProtocolVersion::{V3_1_1, V5};
use ReasonCode::{
    MalformedPacket as R81, PacketTooLarge as R95, ProtocolError as R82, TopicAliasInvalid as R94,
    TopicNameInvalid as R90, UnsupportedProtocolVersion as R84,
};

/// One refused input.
struct Case {
    /// What the input gets wrong.
    name: &'static str,
    /// The protocol version of the connection it arrives on.
    version: ProtocolVersion,
    /// The whole input: a complete frame, or only a fixed header for framing errors.
    wire: &'static [u8],
    /// The maximum packet size in force.
    max: usize,
    /// The exact error.
    error: DecodeError,
    /// The reason code a v5 receiver sends for it.
    reason: ReasonCode,
}

const fn case(
    name: &'static str,
    version: ProtocolVersion,
    wire: &'static [u8],
    error: DecodeError,
    reason: ReasonCode,
) -> Case {
    Case {
        name,
        version,
        wire,
        max: PACKET_BYTES_MAX,
        error,
        reason,
    }
}

impl Case {
    const fn max(self, max: usize) -> Case {
        Case { max, ..self }
    }
}

#[rustfmt::skip]
const CASES: &[Case] = &[
    // ---- Fixed header (MQTT 5 section 2.1, table 2-2) ----
    case("reserved packet type 0", V5, &[0x00, 0x00], M(Malformed::ReservedPacketType), R81),
    case("CONNECT flags 0001", V5, &[0x11, 0x00], M(Malformed::InvalidFlags), R81),
    case("CONNACK flags 0001", V5,
        &[0x21, 0x03, 0x00, 0x00, 0x00], M(Malformed::InvalidFlags), R81),
    case("PUBACK flags 0010", V5, &[0x42, 0x02, 0x00, 0x01], M(Malformed::InvalidFlags), R81),
    case("PUBREC flags 0010", V5, &[0x52, 0x02, 0x00, 0x01], M(Malformed::InvalidFlags), R81),
    // PUBREL, SUBSCRIBE and UNSUBSCRIBE must carry 0010 [MQTT-3.6.1-1, 3.8.1-1, 3.10.1-1].
    case("PUBREL flags 0000", V5, &[0x60, 0x02, 0x00, 0x01], M(Malformed::InvalidFlags), R81),
    case("PUBREL flags 0011", V3_1_1, &[0x63, 0x02, 0x00, 0x01], M(Malformed::InvalidFlags), R81),
    case("PUBCOMP flags 1000", V5, &[0x78, 0x02, 0x00, 0x01], M(Malformed::InvalidFlags), R81),
    case("SUBSCRIBE flags 0000", V3_1_1,
        &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00], M(Malformed::InvalidFlags), R81),
    case("SUBACK flags 0010", V5,
        &[0x92, 0x04, 0x00, 0x01, 0x00, 0x00], M(Malformed::InvalidFlags), R81),
    case("UNSUBSCRIBE flags 0000", V3_1_1,
        &[0xA0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], M(Malformed::InvalidFlags), R81),
    case("UNSUBACK flags 0010", V3_1_1, &[0xB2, 0x02, 0x00, 0x01], M(Malformed::InvalidFlags), R81),
    case("PINGREQ flags 0001", V5, &[0xC1, 0x00], M(Malformed::InvalidFlags), R81),
    case("PINGRESP flags 0100", V5, &[0xD4, 0x00], M(Malformed::InvalidFlags), R81),
    case("DISCONNECT flags 0010", V5, &[0xE2, 0x00], M(Malformed::InvalidFlags), R81),
    case("AUTH flags 0001", V5, &[0xF1, 0x00], M(Malformed::InvalidFlags), R81),

    // ---- Remaining length and lengths inside the packet (section 1.5.5) ----
    // Four bytes with the continuation bit, then a fifth.
    case("remaining length of 5 bytes", V5,
        &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], M(Malformed::VarIntTooLong), R81),
    // 0 written as 80 00 [MQTT-1.5.5-1].
    case("non-minimal remaining length", V5,
        &[0xC0, 0x80, 0x00], M(Malformed::VarIntNotMinimal), R81),
    // PUBACK: packet id 1, reason 0x00, property length 0 written as 80 00.
    case("non-minimal property length", V5,
        &[0x40, 0x05, 0x00, 0x01, 0x00, 0x80, 0x00], M(Malformed::VarIntNotMinimal), R81),
    // PUBLISH of remaining length 5 whose topic claims 10 bytes.
    case("topic runs past the remaining length", V3_1_1,
        &[0x30, 0x05, 0x00, 0x0A, b'a', b'/', b'b'], M(Malformed::UnexpectedEnd), R81),
    // CONNECT of remaining length 4: the protocol name claims 4 bytes, 2 are left.
    case("protocol name runs past the remaining length", V5,
        &[0x10, 0x04, 0x00, 0x04, b'M', b'Q'], M(Malformed::UnexpectedEnd), R81),
    case("PINGREQ with a body", V5, &[0xC0, 0x01, 0x00], M(Malformed::TrailingBytes), R81),
    case("3.1.1 DISCONNECT with a body", V3_1_1,
        &[0xE0, 0x01, 0x00], M(Malformed::TrailingBytes), R81),
    case("3.1.1 CONNACK of 3 bytes", V3_1_1,
        &[0x20, 0x03, 0x00, 0x00, 0x00], M(Malformed::TrailingBytes), R81),
    case("3.1.1 PUBACK of 3 bytes", V3_1_1,
        &[0x40, 0x03, 0x00, 0x01, 0x00], M(Malformed::TrailingBytes), R81),
    // v5 DISCONNECT: reason 0x00, property length 0, then a stray byte.
    case("v5 DISCONNECT with bytes after its properties", V5,
        &[0xE0, 0x03, 0x00, 0x00, 0xFF], M(Malformed::TrailingBytes), R81),
    // A 1,027-byte PUBLISH (remaining length 80 08 = 1,024) against a 1,024-byte
    // limit: refused from the fixed header alone, before the body arrives.
    case("packet larger than the maximum", V5, &[0x30, 0x80, 0x08],
        DecodeError::PacketTooLarge { size: 1_027, max: 1_024 }, R95).max(1_024),

    // ---- UTF-8 strings (section 1.5.4) ----
    case("topic is not UTF-8", V3_1_1,
        &[0x30, 0x04, 0x00, 0x02, 0xFF, 0xFE], M(Malformed::InvalidUtf8), R81),
    case("overlong UTF-8 for '/' (C0 AF) in a topic", V3_1_1,
        &[0x30, 0x04, 0x00, 0x02, 0xC0, 0xAF], M(Malformed::InvalidUtf8), R81),
    // SUBSCRIBE id 1, filter U+D800 encoded as ED A0 80 [MQTT-1.5.4-1], options 0.
    case("encoded surrogate in a topic filter", V3_1_1,
        &[0x82, 0x08, 0x00, 0x01, 0x00, 0x03, 0xED, 0xA0, 0x80, 0x00],
        M(Malformed::InvalidUtf8), R81),
    // CONNECT 3.1.1, clean session, keep alive 60, client id "a\0" [MQTT-1.5.4-2].
    case("U+0000 in a client id", V3_1_1,
        &[0x10, 0x0E, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C,
          0x00, 0x02, b'a', 0x00],
        M(Malformed::NullCharacter), R81),

    // ---- PUBLISH (section 3.3) ----
    // Flags 0110: QoS bits 11 [MQTT-3.3.1-4].
    case("PUBLISH QoS 3", V3_1_1,
        &[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01], M(Malformed::InvalidQoS), R81),
    // Flags 1000: DUP on QoS 0 [MQTT-3.3.1-2].
    case("PUBLISH QoS 0 with DUP", V3_1_1,
        &[0x38, 0x03, 0x00, 0x01, b'a'], M(Malformed::DupOnQoS0), R81),
    // Topic "a/+", property length 0 [MQTT-3.3.2-2].
    case("PUBLISH topic with '+'", V5,
        &[0x30, 0x06, 0x00, 0x03, b'a', b'/', b'+', 0x00], DecodeError::TopicNameInvalid, R90),
    case("PUBLISH topic with '#'", V3_1_1,
        &[0x30, 0x05, 0x00, 0x03, b'a', b'/', b'#'], DecodeError::TopicNameInvalid, R90),
    // 3.1.1 section 4.7.3: topic names are at least one character long.
    case("3.1.1 PUBLISH with an empty topic", V3_1_1,
        &[0x30, 0x03, 0x00, 0x00, b'x'], DecodeError::TopicNameInvalid, R90),
    // 5.0 section 3.3.2.1: empty topic, property length 0, payload "x".
    case("v5 PUBLISH with an empty topic and no alias", V5,
        &[0x30, 0x04, 0x00, 0x00, 0x00, b'x'], P(ProtocolViolation::EmptyTopicWithoutAlias), R82),
    // QoS 1, topic "a", packet identifier 0 [MQTT-2.2.1-3].
    case("PUBLISH QoS 1 with packet id 0", V3_1_1,
        &[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00], P(ProtocolViolation::PacketIdZero), R82),
    // Topic "a", property length 3, Topic Alias (0x23) 0 [MQTT-3.3.2-8].
    case("topic alias 0", V5,
        &[0x30, 0x08, 0x00, 0x01, b'a', 0x03, 0x23, 0x00, 0x00, b'x'],
        P(ProtocolViolation::TopicAliasZero), R94),
    // Topic "a", property length 2, Payload Format Indicator (0x01) = 2.
    case("payload format indicator 2", V5,
        &[0x30, 0x06, 0x00, 0x01, b'a', 0x02, 0x01, 0x02],
        P(ProtocolViolation::PropertyValue(0x01)), R82),

    // ---- Packet identifiers of acknowledgments ----
    case("PUBACK with packet id 0", V3_1_1,
        &[0x40, 0x02, 0x00, 0x00], P(ProtocolViolation::PacketIdZero), R82),

    // ---- CONNECT (section 3.1) ----
    // Flags 0x03: clean session and the reserved bit [MQTT-3.1.2-3].
    case("CONNECT reserved flag", V3_1_1,
        &[0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x03, 0x00, 0x3C,
          0x00, 0x01, b'x'],
        M(Malformed::ConnectReservedFlag), R81),
    // Flags 0x0A: will QoS 1 and clean session, will flag 0 [MQTT-3.1.2-11].
    case("will QoS without will flag", V3_1_1,
        &[0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x0A, 0x00, 0x3C,
          0x00, 0x01, b'x'],
        M(Malformed::WillFlagsWithoutWill), R81),
    // Flags 0x22: will retain and clean start, will flag 0 [MQTT-3.1.2-13].
    case("will retain without will flag", V5,
        &[0x10, 0x0E, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x22, 0x00, 0x3C,
          0x00, 0x00, 0x01, b'x'],
        M(Malformed::WillFlagsWithoutWill), R81),
    // Flags 0x1E: will QoS 11, will flag, clean session; then client id "x",
    // will topic "t", empty will message.
    case("will QoS 3", V3_1_1,
        &[0x10, 0x12, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x1E, 0x00, 0x3C,
          0x00, 0x01, b'x', 0x00, 0x01, b't', 0x00, 0x00],
        M(Malformed::InvalidQoS), R81),
    // Flags 0x42: password and clean session, no user name [MQTT-3.1.2-22]; client id
    // "x", password "p".
    case("3.1.1 password without user name", V3_1_1,
        &[0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x42, 0x00, 0x3C,
          0x00, 0x01, b'x', 0x00, 0x01, b'p'],
        M(Malformed::PasswordWithoutUsername), R81),
    case("unknown protocol name", V3_1_1,
        &[0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'X', 0x04, 0x02, 0x00, 0x3C,
          0x00, 0x01, b'x'],
        DecodeError::UnsupportedProtocol { name: *b"MQTX\0\0\0\0", level: 4 }, R84),
    case("protocol level 6", V5,
        &[0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x3C,
          0x00, 0x01, b'x'],
        DecodeError::UnsupportedProtocol { name: *b"MQTT\0\0\0\0", level: 6 }, R84),
    // "MQIsdp" is 3.1's name and goes with level 3 only.
    case("MQIsdp with level 4", V3_1_1,
        &[0x10, 0x0F, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x04, 0x02,
          0x00, 0x3C, 0x00, 0x01, b'x'],
        DecodeError::UnsupportedProtocol { name: *b"MQIsdp\0\0", level: 4 }, R84),

    // ---- SUBSCRIBE and UNSUBSCRIBE (sections 3.8, 3.10) ----
    case("SUBSCRIBE with packet id 0", V3_1_1,
        &[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00], P(ProtocolViolation::PacketIdZero), R82),
    // [MQTT-3.8.3-2]: at least one filter.
    case("3.1.1 SUBSCRIBE without filters", V3_1_1,
        &[0x82, 0x02, 0x00, 0x01], P(ProtocolViolation::EmptyPayload), R82),
    case("v5 SUBSCRIBE without filters", V5,
        &[0x82, 0x03, 0x00, 0x01, 0x00], P(ProtocolViolation::EmptyPayload), R82),
    case("v5 UNSUBSCRIBE without filters", V5,
        &[0xA2, 0x03, 0x00, 0x01, 0x00], P(ProtocolViolation::EmptyPayload), R82),
    // Filter "a", options 0x04: bit 2 is reserved in 3.1.1 [MQTT-3.8.3-4].
    case("3.1.1 options bit 2", V3_1_1,
        &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x04],
        M(Malformed::SubscriptionOptionsReserved), R81),
    // Property length 0, filter "a", options 0x40 then 0x80 [MQTT-3.8.3-5].
    case("v5 options bit 6", V5,
        &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x40],
        M(Malformed::SubscriptionOptionsReserved), R81),
    case("v5 options bit 7", V5,
        &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x80],
        M(Malformed::SubscriptionOptionsReserved), R81),
    case("3.1.1 requested QoS 3", V3_1_1,
        &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03], M(Malformed::InvalidQoS), R81),
    // 5.0 section 3.8.3.1: "a Protocol Error if the Maximum QoS field has the value 3".
    case("v5 maximum QoS 3", V5,
        &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x03],
        P(ProtocolViolation::SubscriptionQoSInvalid), R82),
    // Options 0x30: retain handling 3.
    case("retain handling 3", V5,
        &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x30],
        P(ProtocolViolation::RetainHandlingInvalid), R82),
    // Filter "$share/g/t", options 0x04: no local [MQTT-3.8.3-4].
    case("no local on a shared subscription", V5,
        &[0x82, 0x10, 0x00, 0x01, 0x00, 0x00, 0x0A, b'$', b's', b'h', b'a', b'r', b'e',
          b'/', b'g', b'/', b't', 0x04],
        P(ProtocolViolation::NoLocalOnSharedSubscription), R82),

    // ---- Properties (section 2.2.2) ----
    // CONNECT v5, property length 3: Topic Alias (0x23) 1; client id "x".
    case("topic alias in CONNECT", V5,
        &[0x10, 0x11, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x00,
          0x03, 0x23, 0x00, 0x01, 0x00, 0x01, b'x'],
        M(Malformed::PropertyNotAllowed(0x23)), R81),
    // PUBACK id 1, reason 0x00, property length 2: identifier 0x05 (none such).
    case("unknown property identifier", V5,
        &[0x40, 0x06, 0x00, 0x01, 0x00, 0x02, 0x05, 0x00],
        M(Malformed::PropertyNotAllowed(0x05)), R81),
    // PUBACK id 1, reason 0x80, property length 6: two empty Reason Strings (0x1F).
    case("duplicate reason string", V5,
        &[0x40, 0x0A, 0x00, 0x01, 0x80, 0x06, 0x1F, 0x00, 0x00, 0x1F, 0x00, 0x00],
        P(ProtocolViolation::DuplicateProperty(0x1F)), R82),
    // CONNECT v5, property length 3: Receive Maximum (0x21) 0.
    case("receive maximum 0", V5,
        &[0x10, 0x11, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x00,
          0x03, 0x21, 0x00, 0x00, 0x00, 0x01, b'x'],
        P(ProtocolViolation::PropertyValue(0x21)), R82),
    // CONNACK v5, property length 5: Maximum Packet Size (0x27) 0.
    case("maximum packet size 0", V5,
        &[0x20, 0x08, 0x00, 0x00, 0x05, 0x27, 0x00, 0x00, 0x00, 0x00],
        P(ProtocolViolation::PropertyValue(0x27)), R82),
    // CONNACK v5, property length 2: Maximum QoS (0x24) 2.
    case("maximum QoS 2 in CONNACK", V5,
        &[0x20, 0x05, 0x00, 0x00, 0x02, 0x24, 0x02],
        P(ProtocolViolation::PropertyValue(0x24)), R82),
    // SUBSCRIBE v5, property length 2: Subscription Identifier (0x0B) 0; filter "a".
    case("subscription identifier 0", V5,
        &[0x82, 0x09, 0x00, 0x01, 0x02, 0x0B, 0x00, 0x00, 0x01, b'a', 0x00],
        P(ProtocolViolation::PropertyValue(0x0B)), R82),
    // CONNECT v5, property length 4: Authentication Data (0x16) AA, no method.
    case("authentication data without method", V5,
        &[0x10, 0x12, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x00,
          0x04, 0x16, 0x00, 0x01, 0xAA, 0x00, 0x01, b'x'],
        P(ProtocolViolation::AuthDataWithoutMethod), R82),
    // PUBACK id 1, reason 0x00, property length 9 with 1 byte left.
    case("property length past the end", V5,
        &[0x40, 0x05, 0x00, 0x01, 0x00, 0x09, 0x1F], M(Malformed::PropertyLength), R81),

    // ---- Reason and return codes (section 2.4) ----
    // PUBREL allows 0x00 and 0x92 only.
    case("0x87 in PUBREL", V5,
        &[0x62, 0x03, 0x00, 0x01, 0x87], M(Malformed::InvalidReasonCode), R81),
    case("undefined reason code 0x05 in DISCONNECT", V5,
        &[0xE0, 0x01, 0x05], M(Malformed::InvalidReasonCode), R81),
    // [MQTT-3.9.3-2]: 0x00, 0x01, 0x02 and 0x80 only.
    case("3.1.1 SUBACK return code 0x03", V3_1_1,
        &[0x90, 0x03, 0x00, 0x01, 0x03], M(Malformed::InvalidReasonCode), R81),
    case("3.1.1 CONNACK return code 0x06", V3_1_1,
        &[0x20, 0x02, 0x00, 0x06], M(Malformed::InvalidReasonCode), R81),
    // Acknowledge flags 0x02 and 0x80: bits 7-1 are reserved [MQTT-3.2.2-1].
    case("3.1.1 CONNACK acknowledge flags bit 1", V3_1_1,
        &[0x20, 0x02, 0x02, 0x00], M(Malformed::ConnAckReservedFlags), R81),
    case("v5 CONNACK acknowledge flags bit 7", V5,
        &[0x20, 0x03, 0x80, 0x00, 0x00], M(Malformed::ConnAckReservedFlags), R81),
    // Type 15 is reserved in 3.1.1.
    case("AUTH on a 3.1.1 connection", V3_1_1, &[0xF0, 0x00], P(ProtocolViolation::AuthInV3), R82),
];

/// Decodes a whole PINGREQ from a fresh buffer.
fn pingreq_decodes(version: ProtocolVersion) -> bool {
    let mut buf = BytesMut::from(&[0xC0, 0x00][..]);
    decode(&mut buf, version, PACKET_BYTES_MAX) == Ok(Some(Packet::PingReq)) && buf.is_empty()
}

#[test]
fn corpus_is_large_and_names_are_unique() {
    assert!(CASES.len() >= 40, "{} cases", CASES.len());
    let mut names: Vec<_> = CASES.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), CASES.len(), "duplicate case names");
}

#[test]
fn every_case_is_refused_with_its_error_and_reason_code() {
    for c in CASES {
        // `check` sees only the fixed header: it reports framing errors itself and
        // otherwise measures a frame of exactly the case's bytes.
        match check(c.wire, c.max) {
            Ok(header) => assert_eq!(header.frame_len(), c.wire.len(), "{}: frame length", c.name),
            Err(e) => assert_eq!(e, c.error, "{}: check", c.name),
        }

        let mut buf = BytesMut::from(c.wire);
        let got = decode(&mut buf, c.version, c.max);
        assert_eq!(got, Err(c.error), "{}", c.name);
        assert_eq!(
            c.error.reason_code(),
            Some(c.reason),
            "{}: reason code",
            c.name
        );
        assert!(!c.error.is_incomplete(), "{}", c.name);

        // No hidden state: the same input fails the same way again, and a valid
        // packet decodes right after.
        let mut again = BytesMut::from(c.wire);
        assert_eq!(
            decode(&mut again, c.version, c.max),
            Err(c.error),
            "{}: second time",
            c.name
        );
        assert!(
            pingreq_decodes(c.version),
            "{}: PINGREQ after the error",
            c.name
        );
    }
}

#[test]
fn truncated_frames_are_incomplete_not_errors() {
    // A v5 PUBLISH with a two-byte remaining length: 3 + 200 bytes.
    #[rustfmt::skip]
    let publish: Vec<u8> = [
        &[0x30, 0xC8, 0x01][..],            // PUBLISH QoS 0, remaining length 200
        &[0x00, 0x01, b't', 0x00],          // topic "t", property length 0
        &[0x5A; 196],                       // payload
    ]
    .concat();
    // The 3.1.1 CONNECT of the specification's variable header example (3.1.2.10).
    #[rustfmt::skip]
    let connect: Vec<u8> = [
        &[0x10, 0x23][..],                  // CONNECT, remaining length 35
        &[0x00, 0x04, b'M', b'Q', b'T', b'T'], // protocol name "MQTT"
        &[0x04, 0xCE, 0x00, 0x0A],          // level 4, flags, keep alive 10
        &[0x00, 0x02, b'i', b'd'],          // client id "id"
        &[0x00, 0x03, b'a', b'/', b'b'],    // will topic "a/b"
        &[0x00, 0x02, b'h', b'i'],          // will message "hi"
        &[0x00, 0x04, b'u', b's', b'e', b'r'],
        &[0x00, 0x04, b'p', b'a', b's', b's'],
    ]
    .concat();
    let frames = [(V5, &publish[..], 3), (V3_1_1, &connect[..], 2)];
    for (version, frame, header_len) in frames {
        for n in 0..frame.len() {
            let prefix = &frame[..n];
            let mut buf = BytesMut::from(prefix);
            assert_eq!(
                decode(&mut buf, version, PACKET_BYTES_MAX),
                Ok(None),
                "{n} bytes"
            );
            assert_eq!(
                &buf[..],
                prefix,
                "decode consumed part of an incomplete frame"
            );

            let Err(DecodeError::Incomplete { needed }) = check(prefix, PACKET_BYTES_MAX) else {
                panic!("check of {n} of {} bytes is not Incomplete", frame.len());
            };
            if n >= header_len {
                // The fixed header is whole: the count is exact.
                assert_eq!(needed, frame.len() - n, "{n} bytes");
            } else {
                // Inside the fixed header: a lower bound that never overshoots.
                assert!(
                    needed >= 1 && n + needed <= frame.len(),
                    "{n} bytes: {needed}"
                );
            }
            assert_eq!(DecodeError::Incomplete { needed }.reason_code(), None);
        }
        let mut whole = BytesMut::from(frame);
        assert!(matches!(
            decode(&mut whole, version, PACKET_BYTES_MAX),
            Ok(Some(_))
        ));
        assert!(whole.is_empty());
    }
}
