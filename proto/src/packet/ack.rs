//! The grammar PUBACK, PUBREC, PUBREL and PUBCOMP share (MQTT 5 sections 3.4-3.7):
//! a packet identifier, then in v5 an optional reason code and optional
//! properties. A v5 sender omits what is default: remaining length 2 means
//! Success without properties, 3 means a reason code without properties.

use bytes::{BufMut, BytesMut};

use crate::codec::Reader;
use crate::error::{DecodeError, Malformed};
use crate::properties::{AckProperties, PropertySet};
use crate::reason::{ReasonCode, ReasonContext};
use crate::types::ProtocolVersion;

/// The decoded fields of one publish acknowledgment.
pub(crate) struct AckFields {
    pub(crate) packet_id: u16,
    pub(crate) reason_code: ReasonCode,
    pub(crate) properties: AckProperties,
}

pub(crate) fn decode(
    r: &mut Reader,
    version: ProtocolVersion,
    ctx: ReasonContext,
) -> Result<AckFields, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut fields = AckFields {
        packet_id,
        reason_code: ReasonCode::Success,
        properties: Default::default(),
    };
    if version.is_v5() && !r.is_empty() {
        fields.reason_code = ReasonCode::from_u8(r.u8()?)?;
        if !fields.reason_code.is_valid_for(ctx) {
            return Err(DecodeError::Malformed(Malformed::InvalidReasonCode));
        }
        if !r.is_empty() {
            fields.properties = AckProperties::decode(r)?;
        }
    }
    r.finish()?;
    Ok(fields)
}

pub(crate) fn body_len(
    version: ProtocolVersion,
    reason_code: ReasonCode,
    properties: &AckProperties,
) -> usize {
    if !version.is_v5() {
        2
    } else if !properties.is_empty() {
        3 + properties.encoded_len()
    } else if reason_code != ReasonCode::Success {
        3
    } else {
        2
    }
}

pub(crate) fn put_body(
    version: ProtocolVersion,
    packet_id: u16,
    reason_code: ReasonCode,
    properties: &AckProperties,
    buf: &mut BytesMut,
) {
    buf.put_u16(packet_id);
    let len = body_len(version, reason_code, properties);
    if len >= 3 {
        buf.put_u8(reason_code.as_u8());
    }
    if len > 3 {
        properties.encode(buf);
    }
}

pub(crate) fn check(
    packet_id: u16,
    reason_code: ReasonCode,
    ctx: ReasonContext,
) -> Result<(), crate::EncodeError> {
    if packet_id == 0 {
        return Err(crate::EncodeError::Invalid(
            "acknowledgment with packet id 0",
        ));
    }
    if !reason_code.is_valid_for(ctx) {
        return Err(crate::EncodeError::Invalid(
            "reason code not allowed in this packet",
        ));
    }
    Ok(())
}
