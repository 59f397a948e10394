//! PUBREL (MQTT 5 section 3.6, 3.1.1 section 3.6): releases a QoS 2 PUBLISH after PUBREC.

use bytes::BytesMut;

use crate::codec::Reader;
use crate::error::{DecodeError, EncodeError};
use crate::frame::Body;
use crate::packet::ack;
use crate::properties::AckProperties;
use crate::reason::{ReasonCode, ReasonContext};
use crate::types::{PacketType, ProtocolVersion};

/// Releases a QoS 2 PUBLISH after PUBREC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubRel {
    /// Identifier of the QoS 2 PUBLISH released.
    pub packet_id: u16,
    /// Outcome; always `Success` in 3.1.1.
    pub reason_code: ReasonCode,
    /// v5 properties.
    pub properties: AckProperties,
}

impl PubRel {
    /// A successful PUBREL without properties.
    pub fn new(packet_id: u16) -> PubRel {
        PubRel { packet_id, reason_code: ReasonCode::Success, properties: AckProperties::default() }
    }

    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<PubRel, DecodeError> {
        let f = ack::decode(r, version, ReasonContext::PubRelComp)?;
        Ok(PubRel { packet_id: f.packet_id, reason_code: f.reason_code, properties: f.properties })
    }
}

impl Body for PubRel {
    const TYPE: PacketType = PacketType::PubRel;

    fn check(&self, _version: ProtocolVersion) -> Result<(), EncodeError> {
        ack::check(self.packet_id, self.reason_code, ReasonContext::PubRelComp)
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        ack::body_len(version, self.reason_code, &self.properties)
    }

    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        ack::put_body(version, self.packet_id, self.reason_code, &self.properties, buf);
    }
}
