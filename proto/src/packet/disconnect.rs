//! DISCONNECT (MQTT 5 section 3.14, 3.1.1 section 3.14). In 3.1.1 it has no body;
//! in v5 a remaining length of 0 means Normal disconnection without properties,
//! 1 means a reason code without properties.

use bytes::{BufMut, BytesMut};

use crate::codec::Reader;
use crate::error::{DecodeError, EncodeError, Malformed};
use crate::frame::Body;
use crate::properties::{DisconnectProperties, PropertySet};
use crate::reason::{ReasonCode, ReasonContext};
use crate::types::{PacketType, ProtocolVersion};

/// A notice that the connection is closing, from either side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// Why; `Success` is a normal disconnection (and the only value in 3.1.1).
    pub reason_code: ReasonCode,
    /// v5 properties.
    pub properties: DisconnectProperties,
}

impl Disconnect {
    /// A DISCONNECT with a reason and no properties.
    pub fn new(reason_code: ReasonCode) -> Disconnect {
        Disconnect {
            reason_code,
            properties: DisconnectProperties::default(),
        }
    }

    pub(crate) fn decode(
        r: &mut Reader,
        version: ProtocolVersion,
    ) -> Result<Disconnect, DecodeError> {
        let mut d = Disconnect::new(ReasonCode::Success);
        if version.is_v5() && !r.is_empty() {
            d.reason_code = ReasonCode::from_u8(r.u8()?)?;
            if !d.reason_code.is_valid_for(ReasonContext::Disconnect) {
                return Err(DecodeError::Malformed(Malformed::InvalidReasonCode));
            }
            if !r.is_empty() {
                d.properties = DisconnectProperties::decode(r)?;
            }
        }
        r.finish()?;
        Ok(d)
    }
}

impl Body for Disconnect {
    const TYPE: PacketType = PacketType::Disconnect;

    fn check(&self, _version: ProtocolVersion) -> Result<(), EncodeError> {
        if !self.reason_code.is_valid_for(ReasonContext::Disconnect) {
            return Err(EncodeError::Invalid(
                "reason code not allowed in DISCONNECT",
            ));
        }
        Ok(())
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        if !version.is_v5()
            || (self.properties.is_empty() && self.reason_code == ReasonCode::Success)
        {
            0
        } else {
            // A reason is always followed by the Property Length, even when it
            // is 0: section 3.14.2.2.1 allows omitting it, but common clients
            // (rumqttc 0.25) cannot parse the 1-byte form.
            1 + self.properties.encoded_len()
        }
    }

    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        let len = self.body_len(version);
        if len >= 1 {
            buf.put_u8(self.reason_code.as_u8());
        }
        if len > 1 {
            self.properties.encode(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::testing::{assert_vector, decode, encode, hex, s};

    #[test]
    fn v3_1_1_has_no_body() {
        // E0 = DISCONNECT, 00 = remaining length.
        let normal = Disconnect::new(ReasonCode::Success);
        assert_vector(&[0xE0, 0x00], ProtocolVersion::V3_1_1, normal.clone());
        // A reason cannot be carried in 3.1.1: encode only.
        let busy = Disconnect::new(ReasonCode::ServerBusy);
        assert_eq!(hex(&encode(&busy, ProtocolVersion::V3_1_1)), "E0 00");
    }

    #[test]
    fn v5_short_forms() {
        let normal = Disconnect::new(ReasonCode::Success);
        // 5.0 section 3.14.2.1: remaining length 0 means Normal disconnection; canonical.
        assert_vector(&[0xE0, 0x00], ProtocolVersion::V5, normal.clone());
        // Length 1: an explicit 0x00; length 2: 0x00 and property length 0. Same packet.
        assert_eq!(
            decode(&[0xE0, 0x01, 0x00], ProtocolVersion::V5),
            normal.clone().into()
        );
        assert_eq!(
            decode(&[0xE0, 0x02, 0x00, 0x00], ProtocolVersion::V5),
            normal.into()
        );
        // Length 1: a reason code without properties (0x04 Disconnect with Will
        // Message) decodes; we always encode the Property Length after a reason.
        let with_will = Disconnect::new(ReasonCode::DisconnectWithWillMessage);
        assert_eq!(
            decode(&[0xE0, 0x01, 0x04], ProtocolVersion::V5),
            with_will.clone().into()
        );
        assert_vector(&[0xE0, 0x02, 0x04, 0x00], ProtocolVersion::V5, with_will);
        let taken_over = Disconnect::new(ReasonCode::SessionTakenOver);
        assert_eq!(
            decode(&[0xE0, 0x01, 0x8E], ProtocolVersion::V5),
            taken_over.clone().into()
        );
        assert_vector(&[0xE0, 0x02, 0x8E, 0x00], ProtocolVersion::V5, taken_over);
    }

    #[test]
    fn v5_spec_example_session_expiry() {
        // 5.0 section 3.14.2.2.5, figure 3-24.
        #[rustfmt::skip]
        let wire = [
            0xE0, 0x07,                     // DISCONNECT, remaining length 7
            0x00,                           // reason code Normal disconnection
            0x05,                           // property length 5
            0x11, 0x00, 0x00, 0x00, 0x00,   // session expiry interval 0
        ];
        let expected = Disconnect {
            reason_code: ReasonCode::Success,
            properties: DisconnectProperties {
                session_expiry_interval: Some(0),
                ..DisconnectProperties::default()
            },
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn v5_server_moved_with_reference() {
        #[rustfmt::skip]
        let wire = [
            0xE0, 0x10,                         // DISCONNECT, remaining length 16
            0x9C,                               // reason code Use another server
            0x0E,                               // property length 14
            0x1F, 0x00, 0x04, b'm', b'o', b'v', // reason string "move"
            b'e',
            0x1C, 0x00, 0x04, b's', b'r', b'v', // server reference "srv2"
            b'2',
        ];
        let expected = Disconnect {
            reason_code: ReasonCode::UseAnotherServer,
            properties: DisconnectProperties {
                reason_string: Some(s("move")),
                server_reference: Some(s("srv2")),
                ..DisconnectProperties::default()
            },
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn v5_session_expiry_and_user_properties() {
        #[rustfmt::skip]
        let wire = [
            0xE0, 0x14,                               // DISCONNECT, remaining length 20
            0x04,                                     // Disconnect with Will Message
            0x12,                                     // property length 18
            0x11, 0x00, 0x00, 0x01, 0x00,             // session expiry interval 256
            0x26, 0x00, 0x01, b'b', 0x00, 0x01, b'1', // user property b=1
            0x26, 0x00, 0x01, b'a', 0x00, 0x00,       // user property a="" (order kept)
        ];
        let expected = Disconnect {
            reason_code: ReasonCode::DisconnectWithWillMessage,
            properties: DisconnectProperties {
                session_expiry_interval: Some(256),
                user_properties: vec![(s("b"), s("1")), (s("a"), s(""))],
                ..DisconnectProperties::default()
            },
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }
}
