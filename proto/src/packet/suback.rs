//! SUBACK (MQTT 5 section 3.9, 3.1.1 section 3.9).

use bytes::{BufMut, BytesMut};

use crate::codec::Reader;
use crate::error::{DecodeError, EncodeError, Malformed, ProtocolViolation};
use crate::frame::Body;
use crate::properties::{AckProperties, PropertySet};
use crate::reason::{ReasonCode, ReasonContext};
use crate::types::{PacketType, ProtocolVersion};

/// The answer to SUBSCRIBE: one reason code per requested filter, in order.
///
/// In 3.1.1 the codes are return codes: granted QoS 0/1/2 or 0x80 failure; any v5
/// failure code is sent as 0x80 and decodes back as `UnspecifiedError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Identifier of the SUBSCRIBE acknowledged.
    pub packet_id: u16,
    /// v5 properties.
    pub properties: AckProperties,
    /// One code per filter: `Success` (granted QoS 0), `GrantedQoS1`, `GrantedQoS2`
    /// or a failure.
    pub reason_codes: Vec<ReasonCode>,
}

fn v3_code(rc: ReasonCode) -> u8 {
    match rc {
        ReasonCode::Success => 0x00,
        ReasonCode::GrantedQoS1 => 0x01,
        ReasonCode::GrantedQoS2 => 0x02,
        _ => 0x80,
    }
}

impl SubAck {
    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<SubAck, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = if version.is_v5() {
            AckProperties::decode(r)?
        } else {
            Default::default()
        };
        let mut reason_codes = Vec::with_capacity(r.remaining());
        while !r.is_empty() {
            let b = r.u8()?;
            let rc = if version.is_v5() {
                let rc = ReasonCode::from_u8(b)?;
                if !rc.is_valid_for(ReasonContext::SubAck) {
                    return Err(DecodeError::Malformed(Malformed::InvalidReasonCode));
                }
                rc
            } else {
                match b {
                    0x00 => ReasonCode::Success,
                    0x01 => ReasonCode::GrantedQoS1,
                    0x02 => ReasonCode::GrantedQoS2,
                    0x80 => ReasonCode::UnspecifiedError,
                    _ => return Err(DecodeError::Malformed(Malformed::InvalidReasonCode)),
                }
            };
            reason_codes.push(rc);
        }
        if reason_codes.is_empty() {
            return Err(DecodeError::Protocol(ProtocolViolation::EmptyPayload));
        }
        Ok(SubAck {
            packet_id,
            properties,
            reason_codes,
        })
    }
}

impl Body for SubAck {
    const TYPE: PacketType = PacketType::SubAck;

    fn check(&self, _version: ProtocolVersion) -> Result<(), EncodeError> {
        if self.packet_id == 0 {
            return Err(EncodeError::Invalid("SUBACK with packet id 0"));
        }
        if self.reason_codes.is_empty() {
            return Err(EncodeError::Invalid("SUBACK without a reason code"));
        }
        if !self
            .reason_codes
            .iter()
            .all(|rc| rc.is_valid_for(ReasonContext::SubAck))
        {
            return Err(EncodeError::Invalid("reason code not allowed in SUBACK"));
        }
        Ok(())
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        2 + if version.is_v5() {
            self.properties.encoded_len()
        } else {
            0
        } + self.reason_codes.len()
    }

    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id);
        if version.is_v5() {
            self.properties.encode(buf);
            for rc in &self.reason_codes {
                buf.put_u8(rc.as_u8());
            }
        } else {
            for rc in &self.reason_codes {
                buf.put_u8(v3_code(*rc));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::testing::{assert_vector, decode, encode, hex, s};

    fn suback(packet_id: u16, reason_codes: Vec<ReasonCode>) -> SubAck {
        SubAck {
            packet_id,
            properties: AckProperties::default(),
            reason_codes,
        }
    }

    #[test]
    fn v3_1_1_granted_qos_and_failure() {
        #[rustfmt::skip]
        let wire = [
            0x90, 0x06,                     // SUBACK, remaining length 6
            0x00, 0x0A,                     // packet identifier 10
            0x00, 0x01, 0x02,               // granted QoS 0, 1, 2
            0x80,                           // failure
        ];
        let expected = suback(
            10,
            vec![
                ReasonCode::Success,
                ReasonCode::GrantedQoS1,
                ReasonCode::GrantedQoS2,
                ReasonCode::UnspecifiedError,
            ],
        );
        assert_vector(&wire, ProtocolVersion::V3_1_1, expected);
    }

    #[test]
    fn v5_granted_qos_and_failures() {
        #[rustfmt::skip]
        let wire = [
            0x90, 0x08,                     // SUBACK, remaining length 8
            0x00, 0x0A,                     // packet identifier 10
            0x00,                           // property length 0
            0x00, 0x01, 0x02,               // granted QoS 0, 1, 2
            0x87,                           // Not authorized
            0xA2,                           // Wildcard Subscriptions not supported
        ];
        let expected = suback(
            10,
            vec![
                ReasonCode::Success,
                ReasonCode::GrantedQoS1,
                ReasonCode::GrantedQoS2,
                ReasonCode::NotAuthorized,
                ReasonCode::WildcardSubscriptionsNotSupported,
            ],
        );
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn v5_with_reason_string() {
        #[rustfmt::skip]
        let wire = [
            0x90, 0x09,                     // SUBACK, remaining length 9
            0x00, 0x0B,                     // packet identifier 11
            0x05,                           // property length 5
            0x1F, 0x00, 0x02, b'n', b'o',   // reason string "no"
            0x8F,                           // Topic Filter invalid
        ];
        let expected = SubAck {
            properties: AckProperties {
                reason_string: Some(s("no")),
                user_properties: vec![],
            },
            ..suback(11, vec![ReasonCode::TopicFilterInvalid])
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn v3_1_1_sends_every_v5_failure_as_0x80() {
        let v5 = suback(10, vec![ReasonCode::NotAuthorized, ReasonCode::GrantedQoS1]);
        // 90 04: SUBACK, length 4; packet identifier 10; 0x80 failure; granted QoS 1.
        assert_eq!(
            hex(&encode(&v5, ProtocolVersion::V3_1_1)),
            "90 04 00 0A 80 01"
        );
        assert_eq!(
            decode(
                &[0x90, 0x04, 0x00, 0x0A, 0x80, 0x01],
                ProtocolVersion::V3_1_1
            ),
            suback(
                10,
                vec![ReasonCode::UnspecifiedError, ReasonCode::GrantedQoS1]
            )
            .into()
        );
    }
}
