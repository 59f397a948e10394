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
    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<Subscribe, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties =
            if version.is_v5() { SubscribeProperties::decode(r)? } else { Default::default() };
        let mut subscriptions = Vec::new();
        while !r.is_empty() {
            let filter = r.string()?;
            let options = SubscriptionOptions::from_byte(r.u8()?, version)?;
            // [MQTT-3.8.3-4]: no-local on a shared subscription is a protocol error.
            if options.no_local && filter.starts_with("$share/") {
                return Err(DecodeError::Protocol(ProtocolViolation::NoLocalOnSharedSubscription));
            }
            subscriptions.push(Subscription { filter, options });
        }
        // [MQTT-3.8.3-2]: at least one topic filter.
        if subscriptions.is_empty() {
            return Err(DecodeError::Protocol(ProtocolViolation::EmptyPayload));
        }
        Ok(Subscribe { packet_id, properties, subscriptions })
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
        if version.is_v5() { self.properties.check() } else { Ok(()) }
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        2 + if version.is_v5() { self.properties.encoded_len() } else { 0 }
            + self.subscriptions.iter().map(|s| prefixed_len(s.filter.len()) + 1).sum::<usize>()
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
