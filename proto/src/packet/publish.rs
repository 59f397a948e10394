//! PUBLISH (MQTT 5 section 3.3, 3.1.1 section 3.3): the hot path. Decoding
//! yields topic and payload as slices of the read buffer and allocates nothing
//! unless the packet carries user properties or several subscription ids.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{self, Reader, prefixed_len};
use crate::error::{DecodeError, EncodeError, Malformed, ProtocolViolation};
use crate::frame::Body;
use crate::properties::{PropertySet, PublishProperties};
use crate::types::{PacketType, ProtocolVersion, QoS, Str};

/// An application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Re-delivery flag (QoS 1/2 only).
    pub dup: bool,
    /// QoS of this delivery.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Topic name; may be empty in v5 when a topic alias stands for it.
    pub topic: Str,
    /// Packet identifier: non-zero for QoS 1/2, 0 for QoS 0.
    pub packet_id: u16,
    /// v5 properties; always empty for 3.1 and 3.1.1.
    pub properties: PublishProperties,
    /// Application payload.
    pub payload: Bytes,
}

impl Publish {
    /// A QoS 0 message with no properties.
    pub fn new(topic: Str, payload: Bytes) -> Publish {
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic,
            packet_id: 0,
            properties: PublishProperties::default(),
            payload,
        }
    }

    pub(crate) fn decode(
        flags: u8,
        r: &mut Reader,
        version: ProtocolVersion,
    ) -> Result<Publish, DecodeError> {
        let dup = flags & 0b1000 != 0;
        let qos = QoS::from_u8((flags >> 1) & 0b11)
            .ok_or(DecodeError::Malformed(Malformed::InvalidQoS))?;
        let retain = flags & 0b0001 != 0;
        // [MQTT-3.3.1-2]: DUP must be 0 for QoS 0.
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::Malformed(Malformed::DupOnQoS0));
        }
        let topic = r.string()?;
        // [MQTT-3.3.2-2]: the topic name must not contain wildcard characters.
        if topic.as_bytes().iter().any(|b| *b == b'+' || *b == b'#') {
            return Err(DecodeError::TopicNameInvalid);
        }
        let packet_id = if qos == QoS::AtMostOnce {
            0
        } else {
            r.packet_id()?
        };
        let properties = if version.is_v5() {
            PublishProperties::decode(r)?
        } else {
            Default::default()
        };
        if topic.is_empty() {
            // v5 allows an empty topic only when a topic alias replaces it (3.3.2.1);
            // 3.1.1 requires at least one character [MQTT-4.7.3-1].
            if !version.is_v5() {
                return Err(DecodeError::TopicNameInvalid);
            }
            if properties.topic_alias.is_none() {
                return Err(DecodeError::Protocol(
                    ProtocolViolation::EmptyTopicWithoutAlias,
                ));
            }
        }
        let payload = r.rest();
        Ok(Publish {
            dup,
            qos,
            retain,
            topic,
            packet_id,
            properties,
            payload,
        })
    }
}

impl Body for Publish {
    const TYPE: PacketType = PacketType::Publish;

    fn flags(&self) -> u8 {
        ((self.dup as u8) << 3) | ((self.qos as u8) << 1) | self.retain as u8
    }

    fn check(&self, version: ProtocolVersion) -> Result<(), EncodeError> {
        match (self.qos, self.packet_id) {
            (QoS::AtMostOnce, 0) if !self.dup => {}
            (QoS::AtMostOnce, _) => {
                return Err(EncodeError::Invalid(
                    "QoS 0 PUBLISH with a packet id or DUP",
                ));
            }
            (_, 0) => return Err(EncodeError::Invalid("QoS 1/2 PUBLISH without a packet id")),
            _ => {}
        }
        if self.topic.is_empty() && !(version.is_v5() && self.properties.topic_alias.is_some()) {
            return Err(EncodeError::Invalid("empty topic without a topic alias"));
        }
        if version.is_v5() {
            self.properties.check()
        } else {
            Ok(())
        }
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        prefixed_len(self.topic.len())
            + if self.qos == QoS::AtMostOnce { 0 } else { 2 }
            + if version.is_v5() {
                self.properties.encoded_len()
            } else {
                0
            }
            + self.payload.len()
    }

    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        codec::put_str(buf, &self.topic);
        if self.qos != QoS::AtMostOnce {
            buf.put_u16(self.packet_id);
        }
        if version.is_v5() {
            self.properties.encode(buf);
        }
        buf.put_slice(&self.payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, PACKET_BYTES_MAX};
    use crate::packet::Packet;
    use crate::packet::testing::{assert_vector, s};

    fn publish(qos: QoS, dup: bool, retain: bool, topic: &'static str, packet_id: u16) -> Publish {
        Publish {
            dup,
            qos,
            retain,
            topic: s(topic),
            packet_id,
            properties: PublishProperties::default(),
            payload: Bytes::new(),
        }
    }

    #[test]
    fn v3_1_1_qos0() {
        #[rustfmt::skip]
        let wire = [
            0x30, 0x0A,                     // PUBLISH, QoS 0, no DUP, no RETAIN; length 10
            0x00, 0x03, b'a', b'/', b'b',   // topic "a/b"; no packet identifier at QoS 0
            b'h', b'e', b'l', b'l', b'o',   // payload "hello" (the rest of the packet)
        ];
        let expected = Publish {
            payload: Bytes::from_static(b"hello"),
            ..publish(QoS::AtMostOnce, false, false, "a/b", 0)
        };
        assert_vector(&wire, ProtocolVersion::V3_1_1, expected);
    }

    #[test]
    fn v3_1_1_qos1_retained_spec_example() {
        // 3.1.1 section 3.3.2.3, figure 3.11: topic "a/b", packet identifier 10.
        #[rustfmt::skip]
        let wire = [
            0x33, 0x09,                     // PUBLISH, flags 0011: QoS 1, RETAIN; length 9
            0x00, 0x03, b'a', b'/', b'b',   // topic "a/b"
            0x00, 0x0A,                     // packet identifier 10
            b'h', b'i',                     // payload "hi"
        ];
        let expected = Publish {
            payload: Bytes::from_static(b"hi"),
            ..publish(QoS::AtLeastOnce, false, true, "a/b", 10)
        };
        assert_vector(&wire, ProtocolVersion::V3_1_1, expected);
    }

    #[test]
    fn v3_1_1_qos2_dup_retained_empty_payload() {
        #[rustfmt::skip]
        let wire = [
            0x3D, 0x07,                     // PUBLISH, flags 1101: DUP, QoS 2, RETAIN; length 7
            0x00, 0x03, b'a', b'/', b'b',   // topic "a/b"
            0x12, 0x34,                     // packet identifier 0x1234; empty payload
        ];
        let expected = publish(QoS::ExactlyOnce, true, true, "a/b", 0x1234);
        assert_vector(&wire, ProtocolVersion::V3_1_1, expected);
    }

    #[test]
    fn v3_1_1_qos1_dup_binary_payload() {
        #[rustfmt::skip]
        let wire = [
            0x3A, 0x08,                     // PUBLISH, flags 1010: DUP, QoS 1; length 8
            0x00, 0x01, b'x',               // topic "x"
            0x00, 0x01,                     // packet identifier 1
            0xFF, 0xFE, 0xFD,               // payload: bytes, not UTF-8, and that is fine
        ];
        let expected = Publish {
            payload: Bytes::from_static(&[0xFF, 0xFE, 0xFD]),
            ..publish(QoS::AtLeastOnce, true, false, "x", 1)
        };
        assert_vector(&wire, ProtocolVersion::V3_1_1, expected);
    }

    #[test]
    fn v5_qos1_spec_example() {
        // 5.0 section 3.3.2.3.9, figure 3-9: topic "a/b", packet identifier 10, no properties.
        #[rustfmt::skip]
        let wire = [
            0x32, 0x09,                     // PUBLISH, flags 0010: QoS 1; length 9
            0x00, 0x03, b'a', b'/', b'b',   // topic "a/b"
            0x00, 0x0A,                     // packet identifier 10
            0x00,                           // property length 0
            b'x',                           // payload "x"
        ];
        let expected = Publish {
            payload: Bytes::from_static(b"x"),
            ..publish(QoS::AtLeastOnce, false, false, "a/b", 10)
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn v5_topic_alias_with_empty_topic() {
        #[rustfmt::skip]
        let wire = [
            0x30, 0x07,                     // PUBLISH, QoS 0; length 7
            0x00, 0x00,                     // topic "" (the alias stands for it)
            0x03,                           // property length 3
            0x23, 0x00, 0x07,               // topic alias 7
            b'p',                           // payload "p"
        ];
        let expected = Publish {
            properties: PublishProperties {
                topic_alias: Some(7),
                ..Default::default()
            },
            payload: Bytes::from_static(b"p"),
            ..publish(QoS::AtMostOnce, false, false, "", 0)
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[rustfmt::skip]
    const V5_WITH_PROPERTIES: [u8; 72] = [
        0x34, 0x46,                                   // PUBLISH, flags 0100: QoS 2; length 70
        0x00, 0x03, b's', b'/', b't',                 // topic "s/t"
        0x12, 0x34,                                   // packet identifier 0x1234
        0x3C,                                         // property length 60
        0x01, 0x01,                                   // payload format indicator 1 (UTF-8)
        0x02, 0x00, 0x00, 0x01, 0x2C,                 // message expiry interval 300
        0x08, 0x00, 0x03, b'r', b'/', b'x',           // response topic "r/x"
        0x09, 0x00, 0x03, 0x01, 0x02, 0x03,           // correlation data 01 02 03
        0x26, 0x00, 0x01, b'z', 0x00, 0x01, b'1',     // user property z=1
        0x26, 0x00, 0x01, b'a', 0x00, 0x01, b'2',     // user property a=2 (order kept)
        0x26, 0x00, 0x01, b'z', 0x00, 0x01, b'3',     // user property z=3 (name repeats)
        0x0B, 0x01,                                   // subscription identifier 1
        0x0B, 0xFF, 0xFF, 0xFF, 0x7F,                 // subscription identifier 268,435,455
        0x03, 0x00, 0x0A, b't', b'e', b'x', b't',     // content type "text/plain"
        b'/', b'p', b'l', b'a', b'i', b'n',
        b'{', b'}',                                   // payload "{}"
    ];

    #[test]
    fn v5_with_properties() {
        let expected = Publish {
            properties: PublishProperties {
                payload_format_indicator: Some(true),
                message_expiry_interval: Some(300),
                topic_alias: None,
                response_topic: Some(s("r/x")),
                correlation_data: Some(Bytes::from_static(&[1, 2, 3])),
                user_properties: vec![(s("z"), s("1")), (s("a"), s("2")), (s("z"), s("3"))],
                subscription_identifiers: vec![1, 268_435_455],
                content_type: Some(s("text/plain")),
            },
            payload: Bytes::from_static(b"{}"),
            ..publish(QoS::ExactlyOnce, false, false, "s/t", 0x1234)
        };
        assert_vector(&V5_WITH_PROPERTIES, ProtocolVersion::V5, expected);
    }

    #[test]
    fn v5_two_byte_remaining_length() {
        let payload = [0x5A; 196];
        #[rustfmt::skip]
        let header = [
            0x30, 0xC8, 0x01,               // PUBLISH, QoS 0; length 200 = 0x48 + 1 * 128
            0x00, 0x01, b't',               // topic "t"
            0x00,                           // property length 0
        ];
        let wire = [&header[..], &payload[..]].concat();
        let expected = Publish {
            payload: Bytes::copy_from_slice(&payload),
            ..publish(QoS::AtMostOnce, false, false, "t", 0)
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn decoded_fields_point_into_the_read_buffer() {
        // Zero copy: topic, payload and binary properties are slices of the frame that
        // `decode` split off the read buffer, so they lie inside its allocation.
        let mut buf = BytesMut::from(&V5_WITH_PROPERTIES[..]);
        let source = buf.as_ptr_range();
        let inside = |b: &[u8]| {
            let r = b.as_ptr_range();
            source.start <= r.start && r.end <= source.end
        };
        let Some(Packet::Publish(p)) =
            frame::decode(&mut buf, ProtocolVersion::V5, PACKET_BYTES_MAX).unwrap()
        else {
            panic!("not a PUBLISH");
        };
        assert_eq!(&p.payload[..], b"{}");
        assert!(inside(&p.payload), "payload was copied");
        assert_eq!(
            p.payload.as_ptr(),
            source.end.wrapping_sub(2),
            "payload is the frame's tail"
        );
        assert!(inside(p.topic.as_bytes()), "topic was copied");
        assert!(
            inside(p.properties.correlation_data.as_ref().unwrap()),
            "correlation data"
        );
        assert!(
            inside(p.properties.response_topic.as_ref().unwrap().as_bytes()),
            "response topic"
        );
    }
}
