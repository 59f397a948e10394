//! AUTH (MQTT 5 section 3.15): the extended authentication exchange. It does not
//! exist in 3.1.1; decoding it there is a protocol error, encoding it an error.

use bytes::{BufMut, BytesMut};

use crate::codec::Reader;
use crate::error::{DecodeError, EncodeError, Malformed};
use crate::frame::Body;
use crate::properties::{AuthProperties, PropertySet};
use crate::reason::{ReasonCode, ReasonContext};
use crate::types::{PacketType, ProtocolVersion};

/// One step of an extended authentication exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// `Success`, `ContinueAuthentication` or `ReAuthenticate`.
    pub reason_code: ReasonCode,
    /// Method, data, reason string and user properties.
    pub properties: AuthProperties,
}

impl Auth {
    pub(crate) fn decode(r: &mut Reader) -> Result<Auth, DecodeError> {
        // A remaining length of 0 means Success without properties (3.15.2.1).
        let mut a = Auth {
            reason_code: ReasonCode::Success,
            properties: Default::default(),
        };
        if !r.is_empty() {
            a.reason_code = ReasonCode::from_u8(r.u8()?)?;
            if !a.reason_code.is_valid_for(ReasonContext::Auth) {
                return Err(DecodeError::Malformed(Malformed::InvalidReasonCode));
            }
            if !r.is_empty() {
                a.properties = AuthProperties::decode(r)?;
            }
        }
        r.finish()?;
        Ok(a)
    }
}

impl Body for Auth {
    const TYPE: PacketType = PacketType::Auth;

    fn check(&self, version: ProtocolVersion) -> Result<(), EncodeError> {
        if !version.is_v5() {
            return Err(EncodeError::NotInVersion(version));
        }
        if !self.reason_code.is_valid_for(ReasonContext::Auth) {
            return Err(EncodeError::Invalid("reason code not allowed in AUTH"));
        }
        self.properties.check()
    }

    fn body_len(&self, _version: ProtocolVersion) -> usize {
        if self.reason_code == ReasonCode::Success && self.properties.is_empty() {
            0
        } else {
            1 + self.properties.encoded_len()
        }
    }

    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        if self.body_len(version) > 0 {
            buf.put_u8(self.reason_code.as_u8());
            self.properties.encode(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::error::ProtocolViolation;
    use crate::frame::Encode;
    use crate::packet::testing::{assert_vector, decode_err, s};

    fn success() -> Auth {
        Auth {
            reason_code: ReasonCode::Success,
            properties: AuthProperties::default(),
        }
    }

    #[test]
    fn short_form() {
        // 5.0 section 3.15.2.1: Success without properties has remaining length 0.
        assert_vector(&[0xF0, 0x00], ProtocolVersion::V5, success());
    }

    #[test]
    fn continue_authentication_with_method_and_data() {
        #[rustfmt::skip]
        let wire = [
            0xF0, 0x11,                                     // AUTH, remaining length 17
            0x18,                                           // Continue authentication
            0x0F,                                           // property length 15
            0x15, 0x00, 0x05, b'S', b'C', b'R', b'A', b'M', // authentication method "SCRAM"
            0x16, 0x00, 0x04, 0xDE, 0xAD, 0xBE, 0xEF,       // authentication data DE AD BE EF
        ];
        let expected = Auth {
            reason_code: ReasonCode::ContinueAuthentication,
            properties: AuthProperties {
                authentication_method: Some(s("SCRAM")),
                authentication_data: Some(Bytes::from_static(&[0xDE, 0xAD, 0xBE, 0xEF])),
                ..AuthProperties::default()
            },
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn re_authenticate_with_method_only() {
        #[rustfmt::skip]
        let wire = [
            0xF0, 0x0A,                                     // AUTH, remaining length 10
            0x19,                                           // Re-authenticate
            0x08,                                           // property length 8
            0x15, 0x00, 0x05, b'S', b'C', b'R', b'A', b'M', // authentication method "SCRAM"
        ];
        let expected = Auth {
            reason_code: ReasonCode::ReAuthenticate,
            properties: AuthProperties {
                authentication_method: Some(s("SCRAM")),
                ..AuthProperties::default()
            },
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn not_in_v3_1_1() {
        assert_eq!(
            decode_err(&[0xF0, 0x00], ProtocolVersion::V3_1_1),
            DecodeError::Protocol(ProtocolViolation::AuthInV3)
        );
        let mut buf = BytesMut::new();
        assert_eq!(
            success().encode(ProtocolVersion::V3_1_1, &mut buf),
            Err(EncodeError::NotInVersion(ProtocolVersion::V3_1_1))
        );
        assert!(buf.is_empty());
    }
}
