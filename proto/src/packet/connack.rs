//! CONNACK (MQTT 5 section 3.2, 3.1.1 section 3.2).

use bytes::{BufMut, BytesMut};

use crate::codec::Reader;
use crate::error::{DecodeError, Malformed};
use crate::frame::Body;
use crate::properties::{ConnAckProperties, PropertySet};
use crate::reason::{ReasonCode, ReasonContext};
use crate::types::{PacketType, ProtocolVersion};

/// The server's answer to CONNECT.
///
/// In 3.1/3.1.1 the reason code travels as one of six return codes
/// (`ReasonCode::to_v3_connack`); properties exist only in v5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Whether the server resumed a stored session.
    pub session_present: bool,
    /// Outcome of the connect.
    pub reason_code: ReasonCode,
    /// v5 properties.
    pub properties: ConnAckProperties,
}

impl ConnAck {
    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<ConnAck, DecodeError> {
        let ack_flags = r.u8()?;
        if ack_flags & 0xFE != 0 {
            return Err(DecodeError::Malformed(Malformed::ConnAckReservedFlags));
        }
        let code = r.u8()?;
        let (reason_code, properties) = if version.is_v5() {
            let rc = ReasonCode::from_u8(code)?;
            if !rc.is_valid_for(ReasonContext::ConnAck) {
                return Err(DecodeError::Malformed(Malformed::InvalidReasonCode));
            }
            (rc, ConnAckProperties::decode(r)?)
        } else {
            (ReasonCode::from_v3_connack(code)?, ConnAckProperties::default())
        };
        r.finish()?;
        Ok(ConnAck { session_present: ack_flags & 1 != 0, reason_code, properties })
    }
}

impl Body for ConnAck {
    const TYPE: PacketType = PacketType::ConnAck;

    fn check(&self, _version: ProtocolVersion) -> Result<(), crate::EncodeError> {
        self.properties.check()
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        2 + if version.is_v5() { self.properties.encoded_len() } else { 0 }
    }

    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u8(self.session_present as u8);
        if version.is_v5() {
            buf.put_u8(self.reason_code.as_u8());
            self.properties.encode(buf);
        } else {
            buf.put_u8(self.reason_code.to_v3_connack());
        }
    }
}
