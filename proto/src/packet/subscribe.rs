//! SUBSCRIBE (MQTT 5 section 3.8, 3.1.1 section 3.8).
//!
//! The codec checks the grammar (UTF-8, options byte, at least one filter, no-local
//! on shared subscriptions); filter syntax is the broker's to judge with
//! `topic::validate_topic_filter`, so a v5 broker can refuse one filter (0x8F) and
//! grant the others.

use bytes::{BufMut, BytesMut};

use crate::codec::{self, Reader, prefixed_len};
use crate::error::{DecodeError, EncodeError, ProtocolViolation};
use crate::frame::Body;
use crate::properties::{PropertySet, SubscribeProperties};
use crate::types::{PacketType, ProtocolVersion, Str, SubscriptionOptions};

/// A request to subscribe to one or more topic filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// v5 properties.
    pub properties: SubscribeProperties,
    /// The filters with their options, in order; at least one.
    pub subscriptions: Vec<Subscription>,
}

/// One topic filter of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Topic filter, possibly `$share/{group}/{filter}`.
    pub filter: Str,
    /// Subscription options.
    pub options: SubscriptionOptions,
}

impl Subscribe {
    pub(crate) fn decode(
        r: &mut Reader,
        version: ProtocolVersion,
    ) -> Result<Subscribe, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = if version.is_v5() {
            SubscribeProperties::decode(r)?
        } else {
            Default::default()
        };
        let mut subscriptions = Vec::new();
        while !r.is_empty() {
            let filter = r.string()?;
            let options = SubscriptionOptions::from_byte(r.u8()?, version)?;
            // [MQTT-3.8.3-4]: no-local on a shared subscription is a protocol error.
            if options.no_local && filter.starts_with("$share/") {
                return Err(DecodeError::Protocol(
                    ProtocolViolation::NoLocalOnSharedSubscription,
                ));
            }
            subscriptions.push(Subscription { filter, options });
        }
        // [MQTT-3.8.3-2]: at least one topic filter.
        if subscriptions.is_empty() {
            return Err(DecodeError::Protocol(ProtocolViolation::EmptyPayload));
        }
        Ok(Subscribe {
            packet_id,
            properties,
            subscriptions,
        })
    }
}

impl Body for Subscribe {
    const TYPE: PacketType = PacketType::Subscribe;

    fn check(&self, version: ProtocolVersion) -> Result<(), EncodeError> {
        if self.packet_id == 0 {
            return Err(EncodeError::Invalid("SUBSCRIBE with packet id 0"));
        }
        if self.subscriptions.is_empty() {
            return Err(EncodeError::Invalid("SUBSCRIBE without a topic filter"));
        }
        if version.is_v5() {
            self.properties.check()
        } else {
            Ok(())
        }
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        2 + if version.is_v5() {
            self.properties.encoded_len()
        } else {
            0
        } + self
            .subscriptions
            .iter()
            .map(|s| prefixed_len(s.filter.len()) + 1)
            .sum::<usize>()
    }

    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id);
        if version.is_v5() {
            self.properties.encode(buf);
        }
        for s in &self.subscriptions {
            codec::put_str(buf, &s.filter);
            buf.put_u8(s.options.to_byte(version));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::testing::{assert_vector, encode, hex, s};
    use crate::types::{QoS, RetainHandling};

    fn sub(filter: &'static str, options: SubscriptionOptions) -> Subscription {
        Subscription {
            filter: s(filter),
            options,
        }
    }

    #[test]
    fn v3_1_1_spec_example() {
        // 3.1.1 section 3.8.2 figure 3.21 (packet identifier 10) and section 3.8.3
        // figure 3.23 (payload "a/b" QoS 1, "c/d" QoS 2).
        #[rustfmt::skip]
        let wire = [
            0x82, 0x0E,                     // SUBSCRIBE with required flags 0010; length 14
            0x00, 0x0A,                     // packet identifier 10
            0x00, 0x03, b'a', b'/', b'b',   // topic filter "a/b"
            0x01,                           // requested QoS 1
            0x00, 0x03, b'c', b'/', b'd',   // topic filter "c/d"
            0x02,                           // requested QoS 2
        ];
        let expected = Subscribe {
            packet_id: 10,
            properties: SubscribeProperties::default(),
            subscriptions: vec![
                sub("a/b", SubscriptionOptions::qos(QoS::AtLeastOnce)),
                sub("c/d", SubscriptionOptions::qos(QoS::ExactlyOnce)),
            ],
        };
        assert_vector(&wire, ProtocolVersion::V3_1_1, expected);
    }

    fn v5_subscribe() -> Subscribe {
        Subscribe {
            packet_id: 10,
            properties: SubscribeProperties {
                subscription_identifier: Some(5),
                user_properties: vec![(s("k"), s("v"))],
            },
            subscriptions: vec![
                sub(
                    "a/b",
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::DoNotSend,
                    },
                ),
                sub(
                    "$share/g/c/d",
                    SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        retain_handling: RetainHandling::SendIfNew,
                        ..SubscriptionOptions::default()
                    },
                ),
                sub(
                    "e/#",
                    SubscriptionOptions {
                        retain_as_published: true,
                        ..SubscriptionOptions::default()
                    },
                ),
            ],
        }
    }

    #[test]
    fn v5_with_options_and_properties() {
        #[rustfmt::skip]
        let wire = [
            0x82, 0x27,                               // SUBSCRIBE, flags 0010; length 39
            0x00, 0x0A,                               // packet identifier 10
            0x09,                                     // property length 9
            0x0B, 0x05,                               // subscription identifier 5
            0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v', // user property k=v
            0x00, 0x03, b'a', b'/', b'b',             // topic filter "a/b"
            0x2D,                                     // options 00 10 1 1 01: retain handling 2,
                                                      // retain as published, no local, QoS 1
            0x00, 0x0C, b'$', b's', b'h', b'a', b'r', // topic filter "$share/g/c/d"
            b'e', b'/', b'g', b'/', b'c', b'/', b'd',
            0x12,                                     // options 00 01 0 0 10: retain handling 1,
                                                      // QoS 2 (no local is forbidden here)
            0x00, 0x03, b'e', b'/', b'#',             // topic filter "e/#"
            0x08,                                     // options 00 00 1 0 00: retain as
                                                      // published, QoS 0
        ];
        assert_vector(&wire, ProtocolVersion::V5, v5_subscribe());
    }

    #[test]
    fn v3_1_1_encoding_keeps_only_the_qos_bits() {
        // Not canonical (the v5 options are lost): encode only.
        #[rustfmt::skip]
        let expected = [
            0x82, 0x1D,                               // SUBSCRIBE, flags 0010; length 29
            0x00, 0x0A,                               // packet identifier 10; no properties
            0x00, 0x03, b'a', b'/', b'b', 0x01,       // "a/b" QoS 1
            0x00, 0x0C, b'$', b's', b'h', b'a', b'r', // "$share/g/c/d" QoS 2
            b'e', b'/', b'g', b'/', b'c', b'/', b'd', 0x02,
            0x00, 0x03, b'e', b'/', b'#', 0x00,       // "e/#" QoS 0
        ];
        assert_eq!(
            hex(&encode(&v5_subscribe(), ProtocolVersion::V3_1_1)),
            hex(&expected)
        );
    }
}
