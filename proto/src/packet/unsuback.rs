//! UNSUBACK (MQTT 5 section 3.11, 3.1.1 section 3.11).

use bytes::{BufMut, BytesMut};

use crate::codec::Reader;
use crate::error::{DecodeError, EncodeError, Malformed, ProtocolViolation};
use crate::frame::Body;
use crate::properties::{AckProperties, PropertySet};
use crate::reason::{ReasonCode, ReasonContext};
use crate::types::{PacketType, ProtocolVersion};

/// The answer to UNSUBSCRIBE. In v5 it carries one reason code per filter; in
/// 3.1.1 only the packet identifier (`reason_codes` is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Identifier of the UNSUBSCRIBE acknowledged.
    pub packet_id: u16,
    /// v5 properties.
    pub properties: AckProperties,
    /// v5: one code per filter, in order.
    pub reason_codes: Vec<ReasonCode>,
}

impl UnsubAck {
    pub(crate) fn decode(
        r: &mut Reader,
        version: ProtocolVersion,
    ) -> Result<UnsubAck, DecodeError> {
        let packet_id = r.packet_id()?;
        if !version.is_v5() {
            r.finish()?;
            return Ok(UnsubAck {
                packet_id,
                properties: Default::default(),
                reason_codes: vec![],
            });
        }
        let properties = AckProperties::decode(r)?;
        let mut reason_codes = Vec::with_capacity(r.remaining());
        while !r.is_empty() {
            let rc = ReasonCode::from_u8(r.u8()?)?;
            if !rc.is_valid_for(ReasonContext::UnsubAck) {
                return Err(DecodeError::Malformed(Malformed::InvalidReasonCode));
            }
            reason_codes.push(rc);
        }
        if reason_codes.is_empty() {
            return Err(DecodeError::Protocol(ProtocolViolation::EmptyPayload));
        }
        Ok(UnsubAck {
            packet_id,
            properties,
            reason_codes,
        })
    }
}

impl Body for UnsubAck {
    const TYPE: PacketType = PacketType::UnsubAck;

    fn check(&self, version: ProtocolVersion) -> Result<(), EncodeError> {
        if self.packet_id == 0 {
            return Err(EncodeError::Invalid("UNSUBACK with packet id 0"));
        }
        if version.is_v5() {
            if self.reason_codes.is_empty() {
                return Err(EncodeError::Invalid("v5 UNSUBACK without a reason code"));
            }
            if !self
                .reason_codes
                .iter()
                .all(|rc| rc.is_valid_for(ReasonContext::UnsubAck))
            {
                return Err(EncodeError::Invalid("reason code not allowed in UNSUBACK"));
            }
        }
        Ok(())
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        if version.is_v5() {
            2 + self.properties.encoded_len() + self.reason_codes.len()
        } else {
            2
        }
    }

    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id);
        if version.is_v5() {
            self.properties.encode(buf);
            for rc in &self.reason_codes {
                buf.put_u8(rc.as_u8());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::testing::{assert_vector, encode, hex, s};

    fn unsuback(packet_id: u16, reason_codes: Vec<ReasonCode>) -> UnsubAck {
        UnsubAck {
            packet_id,
            properties: AckProperties::default(),
            reason_codes,
        }
    }

    #[test]
    fn v3_1_1_has_no_payload() {
        // B0 = UNSUBACK, 02 = remaining length, packet identifier 10, and nothing else.
        assert_vector(
            &[0xB0, 0x02, 0x00, 0x0A],
            ProtocolVersion::V3_1_1,
            unsuback(10, vec![]),
        );
    }

    #[test]
    fn v5_has_one_reason_code_per_filter() {
        #[rustfmt::skip]
        let wire = [
            0xB0, 0x06,                     // UNSUBACK, remaining length 6
            0x00, 0x0A,                     // packet identifier 10
            0x00,                           // property length 0
            0x00,                           // Success
            0x11,                           // No subscription existed
            0x87,                           // Not authorized
        ];
        let expected = unsuback(
            10,
            vec![
                ReasonCode::Success,
                ReasonCode::NoSubscriptionExisted,
                ReasonCode::NotAuthorized,
            ],
        );
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn v5_with_reason_string() {
        #[rustfmt::skip]
        let wire = [
            0xB0, 0x08,                     // UNSUBACK, remaining length 8
            0x00, 0x0B,                     // packet identifier 11
            0x04,                           // property length 4
            0x1F, 0x00, 0x01, b'x',         // reason string "x"
            0x8F,                           // Topic Filter invalid
        ];
        let expected = UnsubAck {
            properties: AckProperties {
                reason_string: Some(s("x")),
                user_properties: vec![],
            },
            ..unsuback(11, vec![ReasonCode::TopicFilterInvalid])
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn v3_1_1_encoding_drops_the_reason_codes() {
        let v5 = unsuback(
            10,
            vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted],
        );
        assert_eq!(hex(&encode(&v5, ProtocolVersion::V3_1_1)), "B0 02 00 0A");
    }
}
