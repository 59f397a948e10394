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
        Disconnect { reason_code, properties: DisconnectProperties::default() }
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
            return Err(EncodeError::Invalid("reason code not allowed in DISCONNECT"));
        }
        Ok(())
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        if !version.is_v5() {
            0
        } else if !self.properties.is_empty() {
            1 + self.properties.encoded_len()
        } else if self.reason_code != ReasonCode::Success {
            1
        } else {
            0
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
