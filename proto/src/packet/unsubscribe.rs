//! UNSUBSCRIBE (MQTT 5 section 3.10, 3.1.1 section 3.10).

use bytes::{BufMut, BytesMut};

use crate::codec::{self, Reader, prefixed_len};
use crate::error::{DecodeError, EncodeError, ProtocolViolation};
use crate::frame::Body;
use crate::properties::{PropertySet, UnsubscribeProperties};
use crate::types::{PacketType, ProtocolVersion, Str};

/// A request to remove one or more subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// v5 properties.
    pub properties: UnsubscribeProperties,
    /// The filters to remove, in order; at least one.
    pub filters: Vec<Str>,
}

impl Unsubscribe {
    pub(crate) fn decode(
        r: &mut Reader,
        version: ProtocolVersion,
    ) -> Result<Unsubscribe, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = if version.is_v5() {
            UnsubscribeProperties::decode(r)?
        } else {
            Default::default()
        };
        let mut filters = Vec::new();
        while !r.is_empty() {
            filters.push(r.string()?);
        }
        // [MQTT-3.10.3-2]: at least one topic filter.
        if filters.is_empty() {
            return Err(DecodeError::Protocol(ProtocolViolation::EmptyPayload));
        }
        Ok(Unsubscribe {
            packet_id,
            properties,
            filters,
        })
    }
}

impl Body for Unsubscribe {
    const TYPE: PacketType = PacketType::Unsubscribe;

    fn check(&self, _version: ProtocolVersion) -> Result<(), EncodeError> {
        if self.packet_id == 0 {
            return Err(EncodeError::Invalid("UNSUBSCRIBE with packet id 0"));
        }
        if self.filters.is_empty() {
            return Err(EncodeError::Invalid("UNSUBSCRIBE without a topic filter"));
        }
        Ok(())
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        2 + if version.is_v5() {
            self.properties.encoded_len()
        } else {
            0
        } + self
            .filters
            .iter()
            .map(|f| prefixed_len(f.len()))
            .sum::<usize>()
    }

    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id);
        if version.is_v5() {
            self.properties.encode(buf);
        }
        for f in &self.filters {
            codec::put_str(buf, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::testing::{assert_vector, s};

    #[test]
    fn v3_1_1_spec_example() {
        // 3.1.1 section 3.10.3, figure 3.30: packet identifier 10, filters "a/b", "c/d".
        #[rustfmt::skip]
        let wire = [
            0xA2, 0x0C,                     // UNSUBSCRIBE with required flags 0010; length 12
            0x00, 0x0A,                     // packet identifier 10
            0x00, 0x03, b'a', b'/', b'b',   // topic filter "a/b"
            0x00, 0x03, b'c', b'/', b'd',   // topic filter "c/d"
        ];
        let expected = Unsubscribe {
            packet_id: 10,
            properties: UnsubscribeProperties::default(),
            filters: vec![s("a/b"), s("c/d")],
        };
        assert_vector(&wire, ProtocolVersion::V3_1_1, expected);
    }

    #[test]
    fn v5_with_user_property() {
        #[rustfmt::skip]
        let wire = [
            0xA2, 0x0F,                               // UNSUBSCRIBE, flags 0010; length 15
            0x00, 0x0B,                               // packet identifier 11
            0x07,                                     // property length 7
            0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v', // user property k=v
            0x00, 0x03, b'a', b'/', b'b',             // topic filter "a/b"
        ];
        let expected = Unsubscribe {
            packet_id: 11,
            properties: UnsubscribeProperties {
                user_properties: vec![(s("k"), s("v"))],
            },
            filters: vec![s("a/b")],
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }
}
