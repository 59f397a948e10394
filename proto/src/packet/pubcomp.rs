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
        PubComp {
            packet_id,
            reason_code: ReasonCode::Success,
            properties: AckProperties::default(),
        }
    }

    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<PubComp, DecodeError> {
        let f = ack::decode(r, version, ReasonContext::PubRelComp)?;
        Ok(PubComp {
            packet_id: f.packet_id,
            reason_code: f.reason_code,
            properties: f.properties,
        })
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
    use crate::packet::testing::{assert_vector, decode, s};

    #[test]
    fn v3_1_1() {
        // 70 = PUBCOMP, 02 = remaining length, then packet identifier 0xFFFF.
        assert_vector(
            &[0x70, 0x02, 0xFF, 0xFF],
            ProtocolVersion::V3_1_1,
            PubComp::new(0xFFFF),
        );
    }

    #[test]
    fn v5_short_and_long_success() {
        assert_vector(
            &[0x70, 0x02, 0xFF, 0xFF],
            ProtocolVersion::V5,
            PubComp::new(0xFFFF),
        );
        assert_eq!(
            decode(&[0x70, 0x04, 0xFF, 0xFF, 0x00, 0x00], ProtocolVersion::V5),
            PubComp::new(0xFFFF).into()
        );
    }

    #[test]
    fn v5_packet_identifier_not_found_with_reason_string() {
        #[rustfmt::skip]
        let wire = [
            0x70, 0x09,                         // PUBCOMP, remaining length 9
            0x00, 0x07,                         // packet identifier 7
            0x92,                               // reason code Packet Identifier not found
            0x05,                               // property length 5
            0x1F, 0x00, 0x02, b'?', b'!',       // reason string "?!"
        ];
        let expected = PubComp {
            packet_id: 7,
            reason_code: ReasonCode::PacketIdentifierNotFound,
            properties: AckProperties {
                reason_string: Some(s("?!")),
                user_properties: vec![],
            },
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }
}
