//! PUBREC (MQTT 5 section 3.5, 3.1.1 section 3.5): the first acknowledgment of a QoS 2 PUBLISH.

use bytes::BytesMut;

use crate::codec::Reader;
use crate::error::{DecodeError, EncodeError};
use crate::frame::Body;
use crate::packet::ack;
use crate::properties::AckProperties;
use crate::reason::{ReasonCode, ReasonContext};
use crate::types::{PacketType, ProtocolVersion};

/// The first acknowledgment of a QoS 2 PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubRec {
    /// Identifier of the QoS 2 PUBLISH received.
    pub packet_id: u16,
    /// Outcome; always `Success` in 3.1.1.
    pub reason_code: ReasonCode,
    /// v5 properties.
    pub properties: AckProperties,
}

impl PubRec {
    /// A successful PUBREC without properties.
    pub fn new(packet_id: u16) -> PubRec {
        PubRec {
            packet_id,
            reason_code: ReasonCode::Success,
            properties: AckProperties::default(),
        }
    }

    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<PubRec, DecodeError> {
        let f = ack::decode(r, version, ReasonContext::PubAckRec)?;
        Ok(PubRec {
            packet_id: f.packet_id,
            reason_code: f.reason_code,
            properties: f.properties,
        })
    }
}

impl Body for PubRec {
    const TYPE: PacketType = PacketType::PubRec;

    fn check(&self, _version: ProtocolVersion) -> Result<(), EncodeError> {
        ack::check(self.packet_id, self.reason_code, ReasonContext::PubAckRec)
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
        // 50 = PUBREC, 02 = remaining length, then packet identifier 0x1234.
        assert_vector(
            &[0x50, 0x02, 0x12, 0x34],
            ProtocolVersion::V3_1_1,
            PubRec::new(0x1234),
        );
    }

    #[test]
    fn v5_short_and_long_success() {
        assert_vector(
            &[0x50, 0x02, 0x12, 0x34],
            ProtocolVersion::V5,
            PubRec::new(0x1234),
        );
        // Length 4: Success and property length 0 decode to the same packet.
        assert_eq!(
            decode(&[0x50, 0x04, 0x12, 0x34, 0x00, 0x00], ProtocolVersion::V5),
            PubRec::new(0x1234).into()
        );
    }

    #[test]
    fn v5_failure_with_user_property() {
        #[rustfmt::skip]
        let wire = [
            0x50, 0x0B,                               // PUBREC, remaining length 11
            0x00, 0x05,                               // packet identifier 5
            0x91,                                     // reason code Packet Identifier in use
            0x07,                                     // property length 7
            0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v', // user property k=v
        ];
        let expected = PubRec {
            packet_id: 5,
            reason_code: ReasonCode::PacketIdentifierInUse,
            properties: AckProperties {
                reason_string: None,
                user_properties: vec![(s("k"), s("v"))],
            },
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }
}
