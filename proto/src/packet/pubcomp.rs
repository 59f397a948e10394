//! PUBCOMP (MQTT 5 section 3.7, 3.1.1 section 3.7): completes the QoS 2 exchange.

use bytes::BytesMut;

use crate::codec::Reader;
use crate::error::{DecodeError, EncodeError};
use crate::frame::Body;
use crate::packet::ack;
use crate::properties::AckProperties;
use crate::reason::{ReasonCode, ReasonContext};
use crate::types::{PacketType, ProtocolVersion};

/// Completes the QoS 2 exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubComp {
    /// Identifier of the QoS 2 PUBLISH completed.
    pub packet_id: u16,
    /// Outcome; always `Success` in 3.1.1.
    pub reason_code: ReasonCode,
    /// v5 properties.
    pub properties: AckProperties,
}

impl PubComp {
    /// A successful PUBCOMP without properties.
    pub fn new(packet_id: u16) -> PubComp {
        PubComp { packet_id, reason_code: ReasonCode::Success, properties: AckProperties::default() }
    }

    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<PubComp, DecodeError> {
        let f = ack::decode(r, version, ReasonContext::PubRelComp)?;
        Ok(PubComp { packet_id: f.packet_id, reason_code: f.reason_code, properties: f.properties })
    }
}

impl Body for PubComp {
    const TYPE: PacketType = PacketType::PubComp;

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
