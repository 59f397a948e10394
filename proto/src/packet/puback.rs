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
        PubAck {
            packet_id,
            reason_code: ReasonCode::Success,
            properties: AckProperties::default(),
        }
    }

    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<PubAck, DecodeError> {
        let f = ack::decode(r, version, ReasonContext::PubAckRec)?;
        Ok(PubAck {
            packet_id: f.packet_id,
            reason_code: f.reason_code,
            properties: f.properties,
        })
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
        // 40 = PUBACK, 02 = remaining length, then packet identifier 1.
        assert_vector(
            &[0x40, 0x02, 0x00, 0x01],
            ProtocolVersion::V3_1_1,
            PubAck::new(1),
        );
    }

    #[test]
    fn v5_success_without_properties_is_the_short_form() {
        // 5.0 section 3.4.2.1: reason code and property length may be omitted for
        // Success without properties (remaining length 2); that is the canonical form.
        assert_vector(
            &[0x40, 0x02, 0x00, 0x01],
            ProtocolVersion::V5,
            PubAck::new(1),
        );
        // Remaining length 3: an explicit Success reason code, no property length.
        assert_eq!(
            decode(&[0x40, 0x03, 0x00, 0x01, 0x00], ProtocolVersion::V5),
            PubAck::new(1).into()
        );
        // Remaining length 4: Success and an empty property section.
        assert_eq!(
            decode(&[0x40, 0x04, 0x00, 0x01, 0x00, 0x00], ProtocolVersion::V5),
            PubAck::new(1).into()
        );
    }

    #[test]
    fn v5_reason_code_without_properties() {
        // 40 03: PUBACK, length 3; packet identifier 2; 0x10 No matching subscribers.
        let expected = PubAck {
            reason_code: ReasonCode::NoMatchingSubscribers,
            ..PubAck::new(2)
        };
        assert_vector(
            &[0x40, 0x03, 0x00, 0x02, 0x10],
            ProtocolVersion::V5,
            expected,
        );
    }

    #[test]
    fn v5_reason_code_with_properties() {
        #[rustfmt::skip]
        let wire = [
            0x40, 0x0A,                         // PUBACK, remaining length 10
            0x00, 0x03,                         // packet identifier 3
            0x87,                               // reason code Not authorized
            0x06,                               // property length 6
            0x1F, 0x00, 0x03, b'n', b'o', b'p', // reason string "nop"
        ];
        let expected = PubAck {
            packet_id: 3,
            reason_code: ReasonCode::NotAuthorized,
            properties: AckProperties {
                reason_string: Some(s("nop")),
                user_properties: vec![],
            },
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }
}
