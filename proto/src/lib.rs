//! `tessera-proto`: a sans-IO codec for MQTT 3.1, 3.1.1 and 5.0.
//!
//! Modules:
//! - [`frame`]: the "is a whole frame here?" check ([`check`]), the decode entry
//!   point ([`decode`]) and the [`Encode`] trait every packet implements.
//! - [`packet`]: the fifteen control packets, one module each, and [`Packet`].
//! - [`properties`]: MQTT 5 properties, one typed set per packet, validated
//!   (allowed identifiers, duplicates, value ranges).
//! - [`types`]: protocol version, QoS, the validated string type [`Str`],
//!   subscription options.
//! - [`reason`]: MQTT 5 reason codes and their 3.1.1 return-code mapping.
//! - [`error`]: decode errors, each mapped to the reason code to send.
//! - [`topic`]: topic name and filter validation, shared subscriptions, matching.
//!
//! Decoding takes a `BytesMut` read buffer, splits a whole frame off it and yields
//! strings and payloads as `Bytes` slices of that frame: no copy, and no
//! allocation for a PUBLISH without user properties. Encoding knows its size
//! (`Encode::encoded_len`) before it writes and reserves once.
//!
//! What it does not do: no sockets, no async, no clock, no session state. It does
//! not judge topic filter syntax inside SUBSCRIBE (the broker does, per filter,
//! with [`topic`]), nor decide policy such as empty client ids or allowed QoS.

#![warn(missing_docs)]

mod codec;
pub mod error;
pub mod frame;
pub mod packet;
pub mod properties;
pub mod reason;
pub mod topic;
pub mod types;

#[cfg(feature = "arbitrary")]
pub mod arbitrary;

pub use codec::{VARINT_MAX, varint_len};
pub use error::{DecodeError, EncodeError, Malformed, ProtocolViolation};
pub use frame::{Encode, FrameHeader, PACKET_BYTES_MAX, check, decode, decode_body};
pub use packet::{
    Auth, ConnAck, Connect, Disconnect, Packet, PubAck, PubComp, PubRec, PubRel, Publish, SubAck,
    Subscribe, Subscription, UnsubAck, Unsubscribe, Will,
};
pub use properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, SubscribeProperties, UnsubscribeProperties, WillProperties,
};
pub use reason::ReasonCode;
pub use types::{PacketType, ProtocolVersion, QoS, RetainHandling, Str, SubscriptionOptions};
