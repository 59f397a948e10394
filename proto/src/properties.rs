//! MQTT 5.0 properties (section 2.2.2): one typed set per packet, decoded by one
//! loop that enforces which identifiers each packet allows, rejects duplicates
//! (User Property, and Subscription Identifier in PUBLISH, may repeat) and checks
//! value ranges.
//!
//! Rules (MQTT 5 section 2.2.2.2 and the per-packet sections): an identifier not
//! allowed in the packet is a Malformed Packet; a duplicate or out-of-range value is
//! a Protocol Error.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{self, Reader, varint_len};
use crate::error::{DecodeError, EncodeError, Malformed, ProtocolViolation};
use crate::types::{QoS, Str};

/// Property identifiers (MQTT 5 table 2-4).
#[allow(missing_docs)] // The names are the specification's.
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// The wire type of a property value (MQTT 5 section 1.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Byte,
    U16,
    U32,
    VarInt,
    Str,
    Binary,
    Pair,
}

fn kind_of(pid: u8) -> Option<Kind> {
    use id::*;
    Some(match pid {
        PAYLOAD_FORMAT_INDICATOR
        | REQUEST_PROBLEM_INFORMATION
        | REQUEST_RESPONSE_INFORMATION
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => Kind::Byte,
        SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => Kind::U16,
        MESSAGE_EXPIRY_INTERVAL
        | SESSION_EXPIRY_INTERVAL
        | WILL_DELAY_INTERVAL
        | MAXIMUM_PACKET_SIZE => Kind::U32,
        SUBSCRIPTION_IDENTIFIER => Kind::VarInt,
        CONTENT_TYPE
        | RESPONSE_TOPIC
        | ASSIGNED_CLIENT_IDENTIFIER
        | AUTHENTICATION_METHOD
        | RESPONSE_INFORMATION
        | SERVER_REFERENCE
        | REASON_STRING => Kind::Str,
        CORRELATION_DATA | AUTHENTICATION_DATA => Kind::Binary,
        USER_PROPERTY => Kind::Pair,
        _ => return None,
    })
}

/// A decoded property value, handed to the packet's property set.
#[derive(Debug)]
pub(crate) enum Value {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(u32),
    Str(Str),
    Binary(Bytes),
    Pair(Str, Str),
}

const fn bit(pid: u8) -> u64 {
    1u64 << pid
}

/// Decodes a property section: the length, then properties until it ends.
/// `allowed` and `repeatable` are bitmasks of identifiers.
fn decode_section(
    r: &mut Reader,
    allowed: u64,
    repeatable: u64,
    mut apply: impl FnMut(u8, Value),
) -> Result<(), DecodeError> {
    let len = r.varint()? as usize;
    if len > r.remaining() {
        return Err(DecodeError::Malformed(Malformed::PropertyLength));
    }
    let mut p = Reader::new(r.take(len)?);
    let mut seen: u64 = 0;
    while !p.is_empty() {
        // Identifiers are variable byte integers; all defined ones fit one byte.
        let raw = p.varint()?;
        let pid = u8::try_from(raw)
            .map_err(|_| DecodeError::Malformed(Malformed::PropertyNotAllowed(0xFF)))?;
        let kind =
            kind_of(pid).ok_or(DecodeError::Malformed(Malformed::PropertyNotAllowed(pid)))?;
        if pid >= 64 || allowed & bit(pid) == 0 {
            return Err(DecodeError::Malformed(Malformed::PropertyNotAllowed(pid)));
        }
        if seen & bit(pid) != 0 && repeatable & bit(pid) == 0 {
            return Err(DecodeError::Protocol(ProtocolViolation::DuplicateProperty(
                pid,
            )));
        }
        seen |= bit(pid);
        let value = match kind {
            Kind::Byte => Value::Byte(p.u8()?),
            Kind::U16 => Value::U16(p.u16()?),
            Kind::U32 => Value::U32(p.u32()?),
            Kind::VarInt => Value::VarInt(p.varint()?),
            Kind::Str => Value::Str(p.string()?),
            Kind::Binary => Value::Binary(p.binary()?),
            Kind::Pair => Value::Pair(p.string()?, p.string()?),
        };
        check_range(pid, &value)?;
        apply(pid, value);
    }
    Ok(())
}

/// Value ranges the specification sets (each a Protocol Error when broken).
fn check_range(pid: u8, v: &Value) -> Result<(), DecodeError> {
    use id::*;
    let bad = || DecodeError::Protocol(ProtocolViolation::PropertyValue(pid));
    match (pid, v) {
        (TOPIC_ALIAS, Value::U16(0)) => {
            Err(DecodeError::Protocol(ProtocolViolation::TopicAliasZero))
        }
        (RECEIVE_MAXIMUM, Value::U16(0))
        | (MAXIMUM_PACKET_SIZE, Value::U32(0))
        | (SUBSCRIPTION_IDENTIFIER, Value::VarInt(0)) => Err(bad()),
        (_, Value::Byte(b)) if *b > 1 => Err(bad()),
        _ => Ok(()),
    }
}

fn byte_bool(v: u8) -> bool {
    v == 1
}

// ---------------------------------------------------------------------------
// Encoding helpers: the length of each property kind and its writer. `None`
// writes nothing.

fn len_byte<T>(v: &Option<T>) -> usize {
    if v.is_some() { 2 } else { 0 }
}

fn len_u16(v: &Option<u16>) -> usize {
    if v.is_some() { 3 } else { 0 }
}

fn len_u32(v: &Option<u32>) -> usize {
    if v.is_some() { 5 } else { 0 }
}

fn len_str(v: &Option<Str>) -> usize {
    v.as_ref().map_or(0, |s| 1 + codec::prefixed_len(s.len()))
}

fn len_bin(v: &Option<Bytes>) -> usize {
    v.as_ref().map_or(0, |b| 1 + codec::prefixed_len(b.len()))
}

fn len_pairs(v: &[(Str, Str)]) -> usize {
    v.iter()
        .map(|(k, val)| 1 + codec::prefixed_len(k.len()) + codec::prefixed_len(val.len()))
        .sum()
}

fn put_bool(buf: &mut BytesMut, pid: u8, v: Option<bool>) {
    if let Some(v) = v {
        buf.put_u8(pid);
        buf.put_u8(v as u8);
    }
}

fn put_u16(buf: &mut BytesMut, pid: u8, v: Option<u16>) {
    if let Some(v) = v {
        buf.put_u8(pid);
        buf.put_u16(v);
    }
}

fn put_u32(buf: &mut BytesMut, pid: u8, v: Option<u32>) {
    if let Some(v) = v {
        buf.put_u8(pid);
        buf.put_u32(v);
    }
}

fn put_str(buf: &mut BytesMut, pid: u8, v: &Option<Str>) {
    if let Some(s) = v {
        buf.put_u8(pid);
        codec::put_str(buf, s);
    }
}

fn put_bin(buf: &mut BytesMut, pid: u8, v: &Option<Bytes>) {
    if let Some(b) = v {
        buf.put_u8(pid);
        codec::put_binary(buf, b);
    }
}

fn put_pairs(buf: &mut BytesMut, v: &[(Str, Str)]) {
    for (k, val) in v {
        buf.put_u8(id::USER_PROPERTY);
        codec::put_str(buf, k);
        codec::put_str(buf, val);
    }
}

fn check_bin(v: &Option<Bytes>) -> Result<(), EncodeError> {
    v.as_ref().map_or(Ok(()), |b| codec::check_field(b))
}

/// A packet's property set: decoded by the shared loop, encoded by itself.
pub(crate) trait PropertySet: Default {
    /// Identifiers allowed in this packet.
    const ALLOWED: u64;
    /// Identifiers that may appear more than once.
    const REPEATABLE: u64 = bit(id::USER_PROPERTY);

    /// Stores one decoded, allowed, range-checked property.
    fn set(&mut self, pid: u8, v: Value);

    /// Checks combinations of properties after the whole set is read.
    fn validate(&self) -> Result<(), DecodeError> {
        Ok(())
    }

    /// Bytes of the properties, without the length prefix.
    fn body_len(&self) -> usize;

    /// Writes the properties, without the length prefix.
    fn put(&self, buf: &mut BytesMut);

    /// Checks fields whose length is not bounded by their type.
    fn check(&self) -> Result<(), EncodeError> {
        Ok(())
    }

    /// Decodes the property section at the reader's position.
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut set = Self::default();
        decode_section(r, Self::ALLOWED, Self::REPEATABLE, |pid, v| set.set(pid, v))?;
        set.validate()?;
        Ok(set)
    }

    /// Bytes of the whole section: length prefix and properties.
    fn encoded_len(&self) -> usize {
        let n = self.body_len();
        varint_len(n as u32) + n
    }

    /// Writes the whole section: length prefix and properties.
    fn encode(&self, buf: &mut BytesMut) {
        codec::put_varint(buf, self.body_len() as u32);
        self.put(buf);
    }
}

fn auth_data_needs_method(method: &Option<Str>, data: &Option<Bytes>) -> Result<(), DecodeError> {
    if data.is_some() && method.is_none() {
        Err(DecodeError::Protocol(
            ProtocolViolation::AuthDataWithoutMethod,
        ))
    } else {
        Ok(())
    }
}

/// CONNECT properties (section 3.1.2.11).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectProperties {
    /// Seconds the session outlives the connection; absent means 0.
    pub session_expiry_interval: Option<u32>,
    /// QoS 1/2 publications the client processes concurrently; absent means 65,535.
    pub receive_maximum: Option<u16>,
    /// Largest packet the client accepts; absent means no limit.
    pub maximum_packet_size: Option<u32>,
    /// Highest topic alias the client accepts from the server; absent means 0.
    pub topic_alias_maximum: Option<u16>,
    /// Whether the client wants Response Information in CONNACK.
    pub request_response_information: Option<bool>,
    /// Whether the server may send reason strings and user properties on failures.
    pub request_problem_information: Option<bool>,
    /// Name of the extended authentication method.
    pub authentication_method: Option<Str>,
    /// Authentication data of the method.
    pub authentication_data: Option<Bytes>,
    /// User properties, in order.
    pub user_properties: Vec<(Str, Str)>,
}

impl PropertySet for ConnectProperties {
    const ALLOWED: u64 = bit(id::SESSION_EXPIRY_INTERVAL)
        | bit(id::RECEIVE_MAXIMUM)
        | bit(id::MAXIMUM_PACKET_SIZE)
        | bit(id::TOPIC_ALIAS_MAXIMUM)
        | bit(id::REQUEST_RESPONSE_INFORMATION)
        | bit(id::REQUEST_PROBLEM_INFORMATION)
        | bit(id::AUTHENTICATION_METHOD)
        | bit(id::AUTHENTICATION_DATA)
        | bit(id::USER_PROPERTY);

    fn set(&mut self, pid: u8, v: Value) {
        match (pid, v) {
            (id::SESSION_EXPIRY_INTERVAL, Value::U32(x)) => self.session_expiry_interval = Some(x),
            (id::RECEIVE_MAXIMUM, Value::U16(x)) => self.receive_maximum = Some(x),
            (id::MAXIMUM_PACKET_SIZE, Value::U32(x)) => self.maximum_packet_size = Some(x),
            (id::TOPIC_ALIAS_MAXIMUM, Value::U16(x)) => self.topic_alias_maximum = Some(x),
            (id::REQUEST_RESPONSE_INFORMATION, Value::Byte(x)) => {
                self.request_response_information = Some(byte_bool(x))
            }
            (id::REQUEST_PROBLEM_INFORMATION, Value::Byte(x)) => {
                self.request_problem_information = Some(byte_bool(x))
            }
            (id::AUTHENTICATION_METHOD, Value::Str(x)) => self.authentication_method = Some(x),
            (id::AUTHENTICATION_DATA, Value::Binary(x)) => self.authentication_data = Some(x),
            (_, Value::Pair(k, v)) => self.user_properties.push((k, v)),
            (pid, _) => debug_assert!(false, "property 0x{pid:02X} passed the allowed mask"),
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        auth_data_needs_method(&self.authentication_method, &self.authentication_data)
    }

    fn body_len(&self) -> usize {
        len_u32(&self.session_expiry_interval)
            + len_u16(&self.receive_maximum)
            + len_u32(&self.maximum_packet_size)
            + len_u16(&self.topic_alias_maximum)
            + len_byte(&self.request_response_information)
            + len_byte(&self.request_problem_information)
            + len_str(&self.authentication_method)
            + len_bin(&self.authentication_data)
            + len_pairs(&self.user_properties)
    }

    fn put(&self, buf: &mut BytesMut) {
        put_u32(
            buf,
            id::SESSION_EXPIRY_INTERVAL,
            self.session_expiry_interval,
        );
        put_u16(buf, id::RECEIVE_MAXIMUM, self.receive_maximum);
        put_u32(buf, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        put_u16(buf, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        put_bool(
            buf,
            id::REQUEST_RESPONSE_INFORMATION,
            self.request_response_information,
        );
        put_bool(
            buf,
            id::REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information,
        );
        put_str(buf, id::AUTHENTICATION_METHOD, &self.authentication_method);
        put_bin(buf, id::AUTHENTICATION_DATA, &self.authentication_data);
        put_pairs(buf, &self.user_properties);
    }

    fn check(&self) -> Result<(), EncodeError> {
        check_bin(&self.authentication_data)
    }
}

/// Will properties of CONNECT (section 3.1.3.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WillProperties {
    /// Seconds the server waits before publishing the will.
    pub will_delay_interval: Option<u32>,
    /// `Some(true)`: the payload is UTF-8 text.
    pub payload_format_indicator: Option<bool>,
    /// Lifetime of the will message in seconds.
    pub message_expiry_interval: Option<u32>,
    /// MIME type of the payload.
    pub content_type: Option<Str>,
    /// Topic for a response.
    pub response_topic: Option<Str>,
    /// Data to correlate a response with its request.
    pub correlation_data: Option<Bytes>,
    /// User properties, in order.
    pub user_properties: Vec<(Str, Str)>,
}

impl PropertySet for WillProperties {
    const ALLOWED: u64 = bit(id::WILL_DELAY_INTERVAL)
        | bit(id::PAYLOAD_FORMAT_INDICATOR)
        | bit(id::MESSAGE_EXPIRY_INTERVAL)
        | bit(id::CONTENT_TYPE)
        | bit(id::RESPONSE_TOPIC)
        | bit(id::CORRELATION_DATA)
        | bit(id::USER_PROPERTY);

    fn set(&mut self, pid: u8, v: Value) {
        match (pid, v) {
            (id::WILL_DELAY_INTERVAL, Value::U32(x)) => self.will_delay_interval = Some(x),
            (id::PAYLOAD_FORMAT_INDICATOR, Value::Byte(x)) => {
                self.payload_format_indicator = Some(byte_bool(x))
            }
            (id::MESSAGE_EXPIRY_INTERVAL, Value::U32(x)) => self.message_expiry_interval = Some(x),
            (id::CONTENT_TYPE, Value::Str(x)) => self.content_type = Some(x),
            (id::RESPONSE_TOPIC, Value::Str(x)) => self.response_topic = Some(x),
            (id::CORRELATION_DATA, Value::Binary(x)) => self.correlation_data = Some(x),
            (_, Value::Pair(k, v)) => self.user_properties.push((k, v)),
            (pid, _) => debug_assert!(false, "property 0x{pid:02X} passed the allowed mask"),
        }
    }

    fn body_len(&self) -> usize {
        len_u32(&self.will_delay_interval)
            + len_byte(&self.payload_format_indicator)
            + len_u32(&self.message_expiry_interval)
            + len_str(&self.content_type)
            + len_str(&self.response_topic)
            + len_bin(&self.correlation_data)
            + len_pairs(&self.user_properties)
    }

    fn put(&self, buf: &mut BytesMut) {
        put_u32(buf, id::WILL_DELAY_INTERVAL, self.will_delay_interval);
        put_bool(
            buf,
            id::PAYLOAD_FORMAT_INDICATOR,
            self.payload_format_indicator,
        );
        put_u32(
            buf,
            id::MESSAGE_EXPIRY_INTERVAL,
            self.message_expiry_interval,
        );
        put_str(buf, id::CONTENT_TYPE, &self.content_type);
        put_str(buf, id::RESPONSE_TOPIC, &self.response_topic);
        put_bin(buf, id::CORRELATION_DATA, &self.correlation_data);
        put_pairs(buf, &self.user_properties);
    }

    fn check(&self) -> Result<(), EncodeError> {
        check_bin(&self.correlation_data)
    }
}

/// CONNACK properties (section 3.2.2.3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAckProperties {
    /// Session expiry the server uses, when it differs from the client's request.
    pub session_expiry_interval: Option<u32>,
    /// QoS 1/2 publications the server processes concurrently.
    pub receive_maximum: Option<u16>,
    /// Highest QoS the server supports: 0 or 1 (absent means 2).
    pub maximum_qos: Option<QoS>,
    /// Whether the server supports retained messages.
    pub retain_available: Option<bool>,
    /// Largest packet the server accepts.
    pub maximum_packet_size: Option<u32>,
    /// Client identifier assigned by the server.
    pub assigned_client_identifier: Option<Str>,
    /// Highest topic alias the server accepts.
    pub topic_alias_maximum: Option<u16>,
    /// Human-readable diagnostic.
    pub reason_string: Option<Str>,
    /// User properties, in order.
    pub user_properties: Vec<(Str, Str)>,
    /// Whether wildcard subscriptions are supported.
    pub wildcard_subscription_available: Option<bool>,
    /// Whether subscription identifiers are supported.
    pub subscription_identifiers_available: Option<bool>,
    /// Whether shared subscriptions are supported.
    pub shared_subscription_available: Option<bool>,
    /// Keep alive the server imposes, in seconds.
    pub server_keep_alive: Option<u16>,
    /// Basis for response topics.
    pub response_information: Option<Str>,
    /// Another server to use.
    pub server_reference: Option<Str>,
    /// Extended authentication method.
    pub authentication_method: Option<Str>,
    /// Extended authentication data.
    pub authentication_data: Option<Bytes>,
}

impl PropertySet for ConnAckProperties {
    const ALLOWED: u64 = bit(id::SESSION_EXPIRY_INTERVAL)
        | bit(id::RECEIVE_MAXIMUM)
        | bit(id::MAXIMUM_QOS)
        | bit(id::RETAIN_AVAILABLE)
        | bit(id::MAXIMUM_PACKET_SIZE)
        | bit(id::ASSIGNED_CLIENT_IDENTIFIER)
        | bit(id::TOPIC_ALIAS_MAXIMUM)
        | bit(id::REASON_STRING)
        | bit(id::USER_PROPERTY)
        | bit(id::WILDCARD_SUBSCRIPTION_AVAILABLE)
        | bit(id::SUBSCRIPTION_IDENTIFIER_AVAILABLE)
        | bit(id::SHARED_SUBSCRIPTION_AVAILABLE)
        | bit(id::SERVER_KEEP_ALIVE)
        | bit(id::RESPONSE_INFORMATION)
        | bit(id::SERVER_REFERENCE)
        | bit(id::AUTHENTICATION_METHOD)
        | bit(id::AUTHENTICATION_DATA);

    fn set(&mut self, pid: u8, v: Value) {
        match (pid, v) {
            (id::SESSION_EXPIRY_INTERVAL, Value::U32(x)) => self.session_expiry_interval = Some(x),
            (id::RECEIVE_MAXIMUM, Value::U16(x)) => self.receive_maximum = Some(x),
            // check_range limited the byte to 0 or 1.
            (id::MAXIMUM_QOS, Value::Byte(x)) => self.maximum_qos = QoS::from_u8(x),
            (id::RETAIN_AVAILABLE, Value::Byte(x)) => self.retain_available = Some(byte_bool(x)),
            (id::MAXIMUM_PACKET_SIZE, Value::U32(x)) => self.maximum_packet_size = Some(x),
            (id::ASSIGNED_CLIENT_IDENTIFIER, Value::Str(x)) => {
                self.assigned_client_identifier = Some(x)
            }
            (id::TOPIC_ALIAS_MAXIMUM, Value::U16(x)) => self.topic_alias_maximum = Some(x),
            (id::REASON_STRING, Value::Str(x)) => self.reason_string = Some(x),
            (id::WILDCARD_SUBSCRIPTION_AVAILABLE, Value::Byte(x)) => {
                self.wildcard_subscription_available = Some(byte_bool(x))
            }
            (id::SUBSCRIPTION_IDENTIFIER_AVAILABLE, Value::Byte(x)) => {
                self.subscription_identifiers_available = Some(byte_bool(x))
            }
            (id::SHARED_SUBSCRIPTION_AVAILABLE, Value::Byte(x)) => {
                self.shared_subscription_available = Some(byte_bool(x))
            }
            (id::SERVER_KEEP_ALIVE, Value::U16(x)) => self.server_keep_alive = Some(x),
            (id::RESPONSE_INFORMATION, Value::Str(x)) => self.response_information = Some(x),
            (id::SERVER_REFERENCE, Value::Str(x)) => self.server_reference = Some(x),
            (id::AUTHENTICATION_METHOD, Value::Str(x)) => self.authentication_method = Some(x),
            (id::AUTHENTICATION_DATA, Value::Binary(x)) => self.authentication_data = Some(x),
            (_, Value::Pair(k, v)) => self.user_properties.push((k, v)),
            (pid, _) => debug_assert!(false, "property 0x{pid:02X} passed the allowed mask"),
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        auth_data_needs_method(&self.authentication_method, &self.authentication_data)
    }

    fn body_len(&self) -> usize {
        len_u32(&self.session_expiry_interval)
            + len_u16(&self.receive_maximum)
            + len_byte(&self.maximum_qos)
            + len_byte(&self.retain_available)
            + len_u32(&self.maximum_packet_size)
            + len_str(&self.assigned_client_identifier)
            + len_u16(&self.topic_alias_maximum)
            + len_str(&self.reason_string)
            + len_pairs(&self.user_properties)
            + len_byte(&self.wildcard_subscription_available)
            + len_byte(&self.subscription_identifiers_available)
            + len_byte(&self.shared_subscription_available)
            + len_u16(&self.server_keep_alive)
            + len_str(&self.response_information)
            + len_str(&self.server_reference)
            + len_str(&self.authentication_method)
            + len_bin(&self.authentication_data)
    }

    fn put(&self, buf: &mut BytesMut) {
        put_u32(
            buf,
            id::SESSION_EXPIRY_INTERVAL,
            self.session_expiry_interval,
        );
        put_u16(buf, id::RECEIVE_MAXIMUM, self.receive_maximum);
        if let Some(q) = self.maximum_qos {
            buf.put_u8(id::MAXIMUM_QOS);
            buf.put_u8(q as u8);
        }
        put_bool(buf, id::RETAIN_AVAILABLE, self.retain_available);
        put_u32(buf, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        put_str(
            buf,
            id::ASSIGNED_CLIENT_IDENTIFIER,
            &self.assigned_client_identifier,
        );
        put_u16(buf, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        put_str(buf, id::REASON_STRING, &self.reason_string);
        put_pairs(buf, &self.user_properties);
        put_bool(
            buf,
            id::WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
        );
        put_bool(
            buf,
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifiers_available,
        );
        put_bool(
            buf,
            id::SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
        );
        put_u16(buf, id::SERVER_KEEP_ALIVE, self.server_keep_alive);
        put_str(buf, id::RESPONSE_INFORMATION, &self.response_information);
        put_str(buf, id::SERVER_REFERENCE, &self.server_reference);
        put_str(buf, id::AUTHENTICATION_METHOD, &self.authentication_method);
        put_bin(buf, id::AUTHENTICATION_DATA, &self.authentication_data);
    }

    fn check(&self) -> Result<(), EncodeError> {
        if self.maximum_qos == Some(QoS::ExactlyOnce) {
            return Err(EncodeError::Invalid("CONNACK Maximum QoS must be 0 or 1"));
        }
        check_bin(&self.authentication_data)
    }
}

/// PUBLISH properties (section 3.3.2.3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublishProperties {
    /// `Some(true)`: the payload is UTF-8 text.
    pub payload_format_indicator: Option<bool>,
    /// Remaining lifetime of the message in seconds.
    pub message_expiry_interval: Option<u32>,
    /// Topic alias (never 0).
    pub topic_alias: Option<u16>,
    /// Topic for a response.
    pub response_topic: Option<Str>,
    /// Data to correlate a response with its request.
    pub correlation_data: Option<Bytes>,
    /// User properties, in order.
    pub user_properties: Vec<(Str, Str)>,
    /// Identifiers of the subscriptions that matched (server to client; may repeat).
    pub subscription_identifiers: Vec<u32>,
    /// MIME type of the payload.
    pub content_type: Option<Str>,
}

impl PropertySet for PublishProperties {
    const ALLOWED: u64 = bit(id::PAYLOAD_FORMAT_INDICATOR)
        | bit(id::MESSAGE_EXPIRY_INTERVAL)
        | bit(id::TOPIC_ALIAS)
        | bit(id::RESPONSE_TOPIC)
        | bit(id::CORRELATION_DATA)
        | bit(id::USER_PROPERTY)
        | bit(id::SUBSCRIPTION_IDENTIFIER)
        | bit(id::CONTENT_TYPE);
    const REPEATABLE: u64 = bit(id::USER_PROPERTY) | bit(id::SUBSCRIPTION_IDENTIFIER);

    fn set(&mut self, pid: u8, v: Value) {
        match (pid, v) {
            (id::PAYLOAD_FORMAT_INDICATOR, Value::Byte(x)) => {
                self.payload_format_indicator = Some(byte_bool(x))
            }
            (id::MESSAGE_EXPIRY_INTERVAL, Value::U32(x)) => self.message_expiry_interval = Some(x),
            (id::TOPIC_ALIAS, Value::U16(x)) => self.topic_alias = Some(x),
            (id::RESPONSE_TOPIC, Value::Str(x)) => self.response_topic = Some(x),
            (id::CORRELATION_DATA, Value::Binary(x)) => self.correlation_data = Some(x),
            (id::SUBSCRIPTION_IDENTIFIER, Value::VarInt(x)) => {
                self.subscription_identifiers.push(x)
            }
            (id::CONTENT_TYPE, Value::Str(x)) => self.content_type = Some(x),
            (_, Value::Pair(k, v)) => self.user_properties.push((k, v)),
            (pid, _) => debug_assert!(false, "property 0x{pid:02X} passed the allowed mask"),
        }
    }

    fn body_len(&self) -> usize {
        len_byte(&self.payload_format_indicator)
            + len_u32(&self.message_expiry_interval)
            + len_u16(&self.topic_alias)
            + len_str(&self.response_topic)
            + len_bin(&self.correlation_data)
            + len_pairs(&self.user_properties)
            + self
                .subscription_identifiers
                .iter()
                .map(|s| 1 + varint_len(*s))
                .sum::<usize>()
            + len_str(&self.content_type)
    }

    fn put(&self, buf: &mut BytesMut) {
        put_bool(
            buf,
            id::PAYLOAD_FORMAT_INDICATOR,
            self.payload_format_indicator,
        );
        put_u32(
            buf,
            id::MESSAGE_EXPIRY_INTERVAL,
            self.message_expiry_interval,
        );
        put_u16(buf, id::TOPIC_ALIAS, self.topic_alias);
        put_str(buf, id::RESPONSE_TOPIC, &self.response_topic);
        put_bin(buf, id::CORRELATION_DATA, &self.correlation_data);
        put_pairs(buf, &self.user_properties);
        for s in &self.subscription_identifiers {
            buf.put_u8(id::SUBSCRIPTION_IDENTIFIER);
            codec::put_varint(buf, *s);
        }
        put_str(buf, id::CONTENT_TYPE, &self.content_type);
    }

    fn check(&self) -> Result<(), EncodeError> {
        if self.topic_alias == Some(0) {
            return Err(EncodeError::Invalid("topic alias 0"));
        }
        if self
            .subscription_identifiers
            .iter()
            .any(|s| *s == 0 || *s > codec::VARINT_MAX)
        {
            return Err(EncodeError::Invalid("subscription identifier out of range"));
        }
        check_bin(&self.correlation_data)
    }
}

impl PublishProperties {
    /// True when no property is set: the section encodes as one zero byte.
    pub fn is_empty(&self) -> bool {
        self.body_len() == 0
    }
}

/// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK: a reason
/// string and user properties (sections 3.4.2.2, 3.5.2.2, 3.6.2.2, 3.7.2.2,
/// 3.9.2.1, 3.11.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckProperties {
    /// Human-readable diagnostic.
    pub reason_string: Option<Str>,
    /// User properties, in order.
    pub user_properties: Vec<(Str, Str)>,
}

impl AckProperties {
    /// True when no property is set.
    pub fn is_empty(&self) -> bool {
        self.reason_string.is_none() && self.user_properties.is_empty()
    }
}

impl PropertySet for AckProperties {
    const ALLOWED: u64 = bit(id::REASON_STRING) | bit(id::USER_PROPERTY);

    fn set(&mut self, pid: u8, v: Value) {
        match (pid, v) {
            (id::REASON_STRING, Value::Str(x)) => self.reason_string = Some(x),
            (_, Value::Pair(k, v)) => self.user_properties.push((k, v)),
            (pid, _) => debug_assert!(false, "property 0x{pid:02X} passed the allowed mask"),
        }
    }

    fn body_len(&self) -> usize {
        len_str(&self.reason_string) + len_pairs(&self.user_properties)
    }

    fn put(&self, buf: &mut BytesMut) {
        put_str(buf, id::REASON_STRING, &self.reason_string);
        put_pairs(buf, &self.user_properties);
    }
}

/// SUBSCRIBE properties (section 3.8.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscribeProperties {
    /// Identifier attached to every message delivered through these subscriptions.
    pub subscription_identifier: Option<u32>,
    /// User properties, in order.
    pub user_properties: Vec<(Str, Str)>,
}

impl PropertySet for SubscribeProperties {
    const ALLOWED: u64 = bit(id::SUBSCRIPTION_IDENTIFIER) | bit(id::USER_PROPERTY);

    fn set(&mut self, pid: u8, v: Value) {
        match (pid, v) {
            (id::SUBSCRIPTION_IDENTIFIER, Value::VarInt(x)) => {
                self.subscription_identifier = Some(x)
            }
            (_, Value::Pair(k, v)) => self.user_properties.push((k, v)),
            (pid, _) => debug_assert!(false, "property 0x{pid:02X} passed the allowed mask"),
        }
    }

    fn body_len(&self) -> usize {
        self.subscription_identifier
            .map_or(0, |s| 1 + varint_len(s))
            + len_pairs(&self.user_properties)
    }

    fn put(&self, buf: &mut BytesMut) {
        if let Some(s) = self.subscription_identifier {
            buf.put_u8(id::SUBSCRIPTION_IDENTIFIER);
            codec::put_varint(buf, s);
        }
        put_pairs(buf, &self.user_properties);
    }

    fn check(&self) -> Result<(), EncodeError> {
        match self.subscription_identifier {
            Some(s) if s == 0 || s > codec::VARINT_MAX => {
                Err(EncodeError::Invalid("subscription identifier out of range"))
            }
            _ => Ok(()),
        }
    }
}

/// UNSUBSCRIBE properties (section 3.10.2.1): user properties only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnsubscribeProperties {
    /// User properties, in order.
    pub user_properties: Vec<(Str, Str)>,
}

impl PropertySet for UnsubscribeProperties {
    const ALLOWED: u64 = bit(id::USER_PROPERTY);

    fn set(&mut self, pid: u8, v: Value) {
        match (pid, v) {
            (_, Value::Pair(k, v)) => self.user_properties.push((k, v)),
            (pid, _) => debug_assert!(false, "property 0x{pid:02X} passed the allowed mask"),
        }
    }

    fn body_len(&self) -> usize {
        len_pairs(&self.user_properties)
    }

    fn put(&self, buf: &mut BytesMut) {
        put_pairs(buf, &self.user_properties);
    }
}

/// DISCONNECT properties (section 3.14.2.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DisconnectProperties {
    /// New session expiry interval (client to server only).
    pub session_expiry_interval: Option<u32>,
    /// Human-readable diagnostic.
    pub reason_string: Option<Str>,
    /// User properties, in order.
    pub user_properties: Vec<(Str, Str)>,
    /// Another server to use (with reasons 0x9C/0x9D).
    pub server_reference: Option<Str>,
}

impl DisconnectProperties {
    /// True when no property is set.
    pub fn is_empty(&self) -> bool {
        self.body_len() == 0
    }
}

impl PropertySet for DisconnectProperties {
    const ALLOWED: u64 = bit(id::SESSION_EXPIRY_INTERVAL)
        | bit(id::REASON_STRING)
        | bit(id::USER_PROPERTY)
        | bit(id::SERVER_REFERENCE);

    fn set(&mut self, pid: u8, v: Value) {
        match (pid, v) {
            (id::SESSION_EXPIRY_INTERVAL, Value::U32(x)) => self.session_expiry_interval = Some(x),
            (id::REASON_STRING, Value::Str(x)) => self.reason_string = Some(x),
            (id::SERVER_REFERENCE, Value::Str(x)) => self.server_reference = Some(x),
            (_, Value::Pair(k, v)) => self.user_properties.push((k, v)),
            (pid, _) => debug_assert!(false, "property 0x{pid:02X} passed the allowed mask"),
        }
    }

    fn body_len(&self) -> usize {
        len_u32(&self.session_expiry_interval)
            + len_str(&self.reason_string)
            + len_pairs(&self.user_properties)
            + len_str(&self.server_reference)
    }

    fn put(&self, buf: &mut BytesMut) {
        put_u32(
            buf,
            id::SESSION_EXPIRY_INTERVAL,
            self.session_expiry_interval,
        );
        put_str(buf, id::REASON_STRING, &self.reason_string);
        put_pairs(buf, &self.user_properties);
        put_str(buf, id::SERVER_REFERENCE, &self.server_reference);
    }
}

/// AUTH properties (section 3.15.2.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthProperties {
    /// Extended authentication method.
    pub authentication_method: Option<Str>,
    /// Extended authentication data.
    pub authentication_data: Option<Bytes>,
    /// Human-readable diagnostic.
    pub reason_string: Option<Str>,
    /// User properties, in order.
    pub user_properties: Vec<(Str, Str)>,
}

impl AuthProperties {
    /// True when no property is set.
    pub fn is_empty(&self) -> bool {
        self.body_len() == 0
    }
}

impl PropertySet for AuthProperties {
    const ALLOWED: u64 = bit(id::AUTHENTICATION_METHOD)
        | bit(id::AUTHENTICATION_DATA)
        | bit(id::REASON_STRING)
        | bit(id::USER_PROPERTY);

    fn set(&mut self, pid: u8, v: Value) {
        match (pid, v) {
            (id::AUTHENTICATION_METHOD, Value::Str(x)) => self.authentication_method = Some(x),
            (id::AUTHENTICATION_DATA, Value::Binary(x)) => self.authentication_data = Some(x),
            (id::REASON_STRING, Value::Str(x)) => self.reason_string = Some(x),
            (_, Value::Pair(k, v)) => self.user_properties.push((k, v)),
            (pid, _) => debug_assert!(false, "property 0x{pid:02X} passed the allowed mask"),
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        auth_data_needs_method(&self.authentication_method, &self.authentication_data)
    }

    fn body_len(&self) -> usize {
        len_str(&self.authentication_method)
            + len_bin(&self.authentication_data)
            + len_str(&self.reason_string)
            + len_pairs(&self.user_properties)
    }

    fn put(&self, buf: &mut BytesMut) {
        put_str(buf, id::AUTHENTICATION_METHOD, &self.authentication_method);
        put_bin(buf, id::AUTHENTICATION_DATA, &self.authentication_data);
        put_str(buf, id::REASON_STRING, &self.reason_string);
        put_pairs(buf, &self.user_properties);
    }

    fn check(&self) -> Result<(), EncodeError> {
        check_bin(&self.authentication_data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode<P: PropertySet>(bytes: &'static [u8]) -> Result<P, DecodeError> {
        P::decode(&mut Reader::new(Bytes::from_static(bytes)))
    }

    #[test]
    fn publish_properties_decode_and_reencode() {
        // Length 15: PFI=1 (2), topic alias 7 (3), subscription ids 1 (2) and 300 (3),
        // MEI 60 (5).
        let wire: &[u8] = &[
            15, 0x01, 1, 0x23, 0, 7, 0x0B, 1, 0x0B, 0xAC, 0x02, 0x02, 0, 0, 0, 60,
        ];
        let p: PublishProperties = decode(wire).unwrap();
        assert_eq!(p.payload_format_indicator, Some(true));
        assert_eq!(p.topic_alias, Some(7));
        assert_eq!(p.subscription_identifiers, vec![1, 300]);
        assert_eq!(p.message_expiry_interval, Some(60));
        assert_eq!(p.encoded_len(), wire.len());
    }

    #[test]
    fn property_not_allowed_in_packet_is_malformed() {
        // Topic Alias (0x23) is not a CONNECT property.
        assert_eq!(
            decode::<ConnectProperties>(&[3, 0x23, 0, 1]),
            Err(DecodeError::Malformed(Malformed::PropertyNotAllowed(0x23)))
        );
        // 0x05 is not a property identifier at all.
        assert_eq!(
            decode::<ConnectProperties>(&[2, 0x05, 0]),
            Err(DecodeError::Malformed(Malformed::PropertyNotAllowed(0x05)))
        );
    }

    #[test]
    fn duplicates_are_protocol_errors_except_repeatable_ones() {
        assert_eq!(
            decode::<ConnectProperties>(&[6, 0x21, 0, 1, 0x21, 0, 2]),
            Err(DecodeError::Protocol(ProtocolViolation::DuplicateProperty(
                0x21
            )))
        );
        // Subscription Identifier may repeat in PUBLISH but not in SUBSCRIBE.
        assert!(decode::<PublishProperties>(&[4, 0x0B, 1, 0x0B, 2]).is_ok());
        assert_eq!(
            decode::<SubscribeProperties>(&[4, 0x0B, 1, 0x0B, 2]),
            Err(DecodeError::Protocol(ProtocolViolation::DuplicateProperty(
                0x0B
            )))
        );
        let up: AckProperties =
            decode(&[12, 0x26, 0, 1, b'a', 0, 0, 0x26, 0, 1, b'a', 0, 0]).unwrap();
        assert_eq!(up.user_properties.len(), 2);
    }

    #[test]
    fn value_ranges() {
        let pe = |pid| DecodeError::Protocol(ProtocolViolation::PropertyValue(pid));
        assert_eq!(
            decode::<ConnectProperties>(&[3, 0x21, 0, 0]).unwrap_err(),
            pe(0x21)
        );
        assert_eq!(
            decode::<ConnectProperties>(&[5, 0x27, 0, 0, 0, 0]).unwrap_err(),
            pe(0x27)
        );
        assert_eq!(
            decode::<ConnectProperties>(&[2, 0x17, 2]).unwrap_err(),
            pe(0x17)
        );
        assert_eq!(
            decode::<ConnAckProperties>(&[2, 0x24, 2]).unwrap_err(),
            pe(0x24)
        );
        assert_eq!(
            decode::<SubscribeProperties>(&[2, 0x0B, 0]).unwrap_err(),
            pe(0x0B)
        );
        assert_eq!(
            decode::<PublishProperties>(&[2, 0x01, 2]).unwrap_err(),
            pe(0x01)
        );
        assert_eq!(
            decode::<PublishProperties>(&[3, 0x23, 0, 0]),
            Err(DecodeError::Protocol(ProtocolViolation::TopicAliasZero))
        );
        assert_eq!(
            decode::<AuthProperties>(&[3, 0x16, 0, 0]),
            Err(DecodeError::Protocol(
                ProtocolViolation::AuthDataWithoutMethod
            ))
        );
    }

    #[test]
    fn property_length_past_packet_end_is_malformed() {
        assert_eq!(
            decode::<AckProperties>(&[9, 0x1F, 0, 1]),
            Err(DecodeError::Malformed(Malformed::PropertyLength))
        );
        // A property running past the section's own length.
        assert_eq!(
            decode::<AckProperties>(&[2, 0x1F, 0, 1, b'x']),
            Err(DecodeError::Malformed(Malformed::UnexpectedEnd))
        );
    }
}
