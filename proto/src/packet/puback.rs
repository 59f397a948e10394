//! PUBACK (MQTT 5 section 3.4, 3.1.1 section 3.4): acknowledges a QoS 1 PUBLISH.

use bytes::BytesMut;

use crate::codec::Reader;
use crate::error::{DecodeError, EncodeError};
use crate::frame::Body;
use crate::packet::ack;
use crate::properties::AckProperties;
use crate::reason::{ReasonCode, ReasonContext};
use crate::types::{PacketType, ProtocolVersion};

/// Acknowledges a QoS 1 PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubAck {
    /// Identifier of the QoS 1 PUBLISH acknowledged.
    pub packet_id: u16,
    /// Outcome; always `Success` in 3.1.1.
    pub reason_code: ReasonCode,
    /// v5 properties.
    pub properties: AckProperties,
}

impl PubAck {
    /// A successful PUBACK without properties.
    pub fn new(packet_id: u16) -> PubAck {
        PubAck { packet_id, reason_code: ReasonCode::Success, properties: AckProperties::default() }
    }

    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<PubAck, DecodeError> {
        let f = ack::decode(r, version, ReasonContext::PubAckRec)?;
        Ok(PubAck { packet_id: f.packet_id, reason_code: f.reason_code, properties: f.properties })
    }
}

impl Body for PubAck {
    const TYPE: PacketType = PacketType::PubAck;

    fn check(&self, _version: ProtocolVersion) -> Result<(), EncodeError> {
        ack::check(self.packet_id, self.reason_code, ReasonContext::PubAckRec)
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        ack::body_len(version, self.reason_code, &self.properties)
    }

    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        ack::put_body(version, self.packet_id, self.reason_code, &self.properties, buf);
    }
}
