//! PUBLISH (MQTT 5 section 3.3, 3.1.1 section 3.3): the hot path. Decoding
//! yields topic and payload as slices of the read buffer and allocates nothing
//! unless the packet carries user properties or several subscription ids.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{self, Reader, prefixed_len};
use crate::error::{DecodeError, EncodeError, Malformed, ProtocolViolation};
use crate::frame::Body;
use crate::properties::{PropertySet, PublishProperties};
use crate::types::{PacketType, ProtocolVersion, QoS, Str};

/// An application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Re-delivery flag (QoS 1/2 only).
    pub dup: bool,
    /// QoS of this delivery.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Topic name; may be empty in v5 when a topic alias stands for it.
    pub topic: Str,
    /// Packet identifier: non-zero for QoS 1/2, 0 for QoS 0.
    pub packet_id: u16,
    /// v5 properties; always empty for 3.1 and 3.1.1.
    pub properties: PublishProperties,
    /// Application payload.
    pub payload: Bytes,
}

impl Publish {
    /// A QoS 0 message with no properties.
    pub fn new(topic: Str, payload: Bytes) -> Publish {
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic,
            packet_id: 0,
            properties: PublishProperties::default(),
            payload,
        }
    }

    pub(crate) fn decode(
        flags: u8,
        r: &mut Reader,
        version: ProtocolVersion,
    ) -> Result<Publish, DecodeError> {
        let dup = flags & 0b1000 != 0;
        let qos = QoS::from_u8((flags >> 1) & 0b11)
            .ok_or(DecodeError::Malformed(Malformed::InvalidQoS))?;
        let retain = flags & 0b0001 != 0;
        // [MQTT-3.3.1-2]: DUP must be 0 for QoS 0.
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::Malformed(Malformed::DupOnQoS0));
        }
        let topic = r.string()?;
        // [MQTT-3.3.2-2]: the topic name must not contain wildcard characters.
        if topic.as_bytes().iter().any(|b| *b == b'+' || *b == b'#') {
            return Err(DecodeError::TopicNameInvalid);
        }
        let packet_id = if qos == QoS::AtMostOnce { 0 } else { r.packet_id()? };
        let properties =
            if version.is_v5() { PublishProperties::decode(r)? } else { Default::default() };
        if topic.is_empty() {
            // v5 allows an empty topic only when a topic alias replaces it (3.3.2.1);
            // 3.1.1 requires at least one character [MQTT-4.7.3-1].
            if !version.is_v5() {
                return Err(DecodeError::TopicNameInvalid);
            }
            if properties.topic_alias.is_none() {
                return Err(DecodeError::Protocol(ProtocolViolation::EmptyTopicWithoutAlias));
            }
        }
        let payload = r.rest();
        Ok(Publish { dup, qos, retain, topic, packet_id, properties, payload })
    }
}

impl Body for Publish {
    const TYPE: PacketType = PacketType::Publish;

    fn flags(&self) -> u8 {
        ((self.dup as u8) << 3) | ((self.qos as u8) << 1) | self.retain as u8
    }

    fn check(&self, version: ProtocolVersion) -> Result<(), EncodeError> {
        match (self.qos, self.packet_id) {
            (QoS::AtMostOnce, 0) if !self.dup => {}
            (QoS::AtMostOnce, _) => {
                return Err(EncodeError::Invalid("QoS 0 PUBLISH with a packet id or DUP"));
            }
            (_, 0) => return Err(EncodeError::Invalid("QoS 1/2 PUBLISH without a packet id")),
            _ => {}
        }
        if self.topic.is_empty() && !(version.is_v5() && self.properties.topic_alias.is_some()) {
            return Err(EncodeError::Invalid("empty topic without a topic alias"));
        }
        if version.is_v5() { self.properties.check() } else { Ok(()) }
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        prefixed_len(self.topic.len())
            + if self.qos == QoS::AtMostOnce { 0 } else { 2 }
            + if version.is_v5() { self.properties.encoded_len() } else { 0 }
            + self.payload.len()
    }

    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        codec::put_str(buf, &self.topic);
        if self.qos != QoS::AtMostOnce {
            buf.put_u16(self.packet_id);
        }
        if version.is_v5() {
            self.properties.encode(buf);
        }
        buf.put_slice(&self.payload);
    }
}
