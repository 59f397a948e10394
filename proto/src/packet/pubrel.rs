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
        PubRel {
            packet_id,
            reason_code: ReasonCode::Success,
            properties: AckProperties::default(),
        }
    }

    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<PubRel, DecodeError> {
        let f = ack::decode(r, version, ReasonContext::PubRelComp)?;
        Ok(PubRel {
            packet_id: f.packet_id,
            reason_code: f.reason_code,
            properties: f.properties,
        })
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
        ack::put_body(
            version,
            self.packet_id,
            self.reason_code,
            &self.properties,
            buf,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::testing::{assert_vector, decode};

    #[test]
    fn v3_1_1() {
        // 62 = PUBREL with its required flags 0010, 02 = remaining length, packet id 5.
        assert_vector(
            &[0x62, 0x02, 0x00, 0x05],
            ProtocolVersion::V3_1_1,
            PubRel::new(5),
        );
    }

    #[test]
    fn v5_short_and_long_success() {
        assert_vector(
            &[0x62, 0x02, 0x00, 0x05],
            ProtocolVersion::V5,
            PubRel::new(5),
        );
        assert_eq!(
            decode(&[0x62, 0x03, 0x00, 0x05, 0x00], ProtocolVersion::V5),
            PubRel::new(5).into()
        );
        assert_eq!(
            decode(&[0x62, 0x04, 0x00, 0x05, 0x00, 0x00], ProtocolVersion::V5),
            PubRel::new(5).into()
        );
    }

    #[test]
    fn v5_packet_identifier_not_found() {
        // 62 03: PUBREL, length 3; packet identifier 5; 0x92 Packet Identifier not found.
        let expected = PubRel {
            reason_code: ReasonCode::PacketIdentifierNotFound,
            ..PubRel::new(5)
        };
        assert_vector(
            &[0x62, 0x03, 0x00, 0x05, 0x92],
            ProtocolVersion::V5,
            expected,
        );
    }
}
