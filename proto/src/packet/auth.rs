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
        let mut a = Auth { reason_code: ReasonCode::Success, properties: Default::default() };
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
