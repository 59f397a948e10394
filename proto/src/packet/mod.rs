//! The fifteen MQTT control packets, one module each (PINGREQ and PINGRESP share
//! `ping`; the four publish acknowledgments share their grammar through `ack`).

mod ack;
pub mod auth;
pub mod connack;
pub mod connect;
pub mod disconnect;
pub mod ping;
pub mod puback;
pub mod pubcomp;
pub mod publish;
pub mod pubrec;
pub mod pubrel;
pub mod suback;
pub mod subscribe;
pub mod unsuback;
pub mod unsubscribe;

use bytes::BytesMut;

use crate::codec::Reader;
use crate::error::{DecodeError, EncodeError, ProtocolViolation};
use crate::frame::Encode;
use crate::types::{PacketType, ProtocolVersion};

pub use auth::Auth;
pub use connack::ConnAck;
pub use connect::{Connect, Will};
pub use disconnect::Disconnect;
pub use puback::PubAck;
pub use pubcomp::PubComp;
pub use publish::Publish;
pub use pubrec::PubRec;
pub use pubrel::PubRel;
pub use suback::SubAck;
pub use subscribe::{Subscribe, Subscription};
pub use unsuback::UnsubAck;
pub use unsubscribe::Unsubscribe;

/// Any MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT.
    Connect(Box<Connect>),
    /// CONNACK.
    ConnAck(ConnAck),
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK.
    PubAck(PubAck),
    /// PUBREC.
    PubRec(PubRec),
    /// PUBREL.
    PubRel(PubRel),
    /// PUBCOMP.
    PubComp(PubComp),
    /// SUBSCRIBE.
    Subscribe(Subscribe),
    /// SUBACK.
    SubAck(SubAck),
    /// UNSUBSCRIBE.
    Unsubscribe(Unsubscribe),
    /// UNSUBACK.
    UnsubAck(UnsubAck),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT.
    Disconnect(Disconnect),
    /// AUTH (MQTT 5.0 only).
    Auth(Auth),
}

impl Packet {
    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }

    pub(crate) fn decode_body(
        packet_type: PacketType,
        flags: u8,
        mut r: Reader,
        version: ProtocolVersion,
    ) -> Result<Packet, DecodeError> {
        let v = version;
        Ok(match packet_type {
            PacketType::Connect => Packet::Connect(Box::new(Connect::decode(&mut r)?)),
            PacketType::ConnAck => Packet::ConnAck(ConnAck::decode(&mut r, v)?),
            PacketType::Publish => Packet::Publish(Publish::decode(flags, &mut r, v)?),
            PacketType::PubAck => Packet::PubAck(PubAck::decode(&mut r, v)?),
            PacketType::PubRec => Packet::PubRec(PubRec::decode(&mut r, v)?),
            PacketType::PubRel => Packet::PubRel(PubRel::decode(&mut r, v)?),
            PacketType::PubComp => Packet::PubComp(PubComp::decode(&mut r, v)?),
            PacketType::Subscribe => Packet::Subscribe(Subscribe::decode(&mut r, v)?),
            PacketType::SubAck => Packet::SubAck(SubAck::decode(&mut r, v)?),
            PacketType::Unsubscribe => Packet::Unsubscribe(Unsubscribe::decode(&mut r, v)?),
            PacketType::UnsubAck => Packet::UnsubAck(UnsubAck::decode(&mut r, v)?),
            PacketType::PingReq => {
                r.finish()?;
                Packet::PingReq
            }
            PacketType::PingResp => {
                r.finish()?;
                Packet::PingResp
            }
            PacketType::Disconnect => Packet::Disconnect(Disconnect::decode(&mut r, v)?),
            PacketType::Auth => {
                if !v.is_v5() {
                    return Err(DecodeError::Protocol(ProtocolViolation::AuthInV3));
                }
                Packet::Auth(Auth::decode(&mut r)?)
            }
        })
    }
}

impl Encode for Packet {
    fn encoded_len(&self, version: ProtocolVersion) -> usize {
        match self {
            Packet::Connect(p) => p.encoded_len(version),
            Packet::ConnAck(p) => p.encoded_len(version),
            Packet::Publish(p) => p.encoded_len(version),
            Packet::PubAck(p) => p.encoded_len(version),
            Packet::PubRec(p) => p.encoded_len(version),
            Packet::PubRel(p) => p.encoded_len(version),
            Packet::PubComp(p) => p.encoded_len(version),
            Packet::Subscribe(p) => p.encoded_len(version),
            Packet::SubAck(p) => p.encoded_len(version),
            Packet::Unsubscribe(p) => p.encoded_len(version),
            Packet::UnsubAck(p) => p.encoded_len(version),
            Packet::PingReq => ping::PingReq.encoded_len(version),
            Packet::PingResp => ping::PingResp.encoded_len(version),
            Packet::Disconnect(p) => p.encoded_len(version),
            Packet::Auth(p) => p.encoded_len(version),
        }
    }

    fn encode(&self, version: ProtocolVersion, buf: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Packet::Connect(p) => p.encode(version, buf),
            Packet::ConnAck(p) => p.encode(version, buf),
            Packet::Publish(p) => p.encode(version, buf),
            Packet::PubAck(p) => p.encode(version, buf),
            Packet::PubRec(p) => p.encode(version, buf),
            Packet::PubRel(p) => p.encode(version, buf),
            Packet::PubComp(p) => p.encode(version, buf),
            Packet::Subscribe(p) => p.encode(version, buf),
            Packet::SubAck(p) => p.encode(version, buf),
            Packet::Unsubscribe(p) => p.encode(version, buf),
            Packet::UnsubAck(p) => p.encode(version, buf),
            Packet::PingReq => ping::PingReq.encode(version, buf),
            Packet::PingResp => ping::PingResp.encode(version, buf),
            Packet::Disconnect(p) => p.encode(version, buf),
            Packet::Auth(p) => p.encode(version, buf),
        }
    }
}

macro_rules! impl_from {
    ($($t:ident),*) => {$(
        impl From<$t> for Packet {
            fn from(p: $t) -> Packet {
                Packet::$t(p)
            }
        }
    )*};
}
impl_from!(
    ConnAck,
    Publish,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth
);

impl From<Connect> for Packet {
    fn from(p: Connect) -> Packet {
        Packet::Connect(Box::new(p))
    }
}

/// Helpers for the spec-vector tests at the bottom of each packet module: a vector
/// is a whole frame worked out by hand from the specification, and a test checks it
/// both ways (decode to the expected struct, encode the struct to the same bytes).
#[cfg(test)]
pub(crate) mod testing {
    use bytes::BytesMut;

    use super::Packet;
    use crate::error::DecodeError;
    use crate::frame::{self, Encode, PACKET_BYTES_MAX};
    use crate::types::{ProtocolVersion, Str};

    /// Bytes as `"10 2A 00 04"`, so a failing comparison shows the wire layout.
    pub(crate) fn hex(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Decodes `wire`, which must hold exactly one whole packet.
    pub(crate) fn decode(wire: &[u8], version: ProtocolVersion) -> Packet {
        let mut buf = BytesMut::from(wire);
        let packet = frame::decode(&mut buf, version, PACKET_BYTES_MAX)
            .unwrap_or_else(|e| panic!("decoding {}: {e}", hex(wire)))
            .expect("the vector is a whole frame");
        assert!(buf.is_empty(), "{} bytes left after the packet", buf.len());
        packet
    }

    /// Decodes `wire`, which must be refused.
    pub(crate) fn decode_err(wire: &[u8], version: ProtocolVersion) -> DecodeError {
        let mut buf = BytesMut::from(wire);
        match frame::decode(&mut buf, version, PACKET_BYTES_MAX) {
            Err(e) => e,
            Ok(p) => panic!("{} decoded to {p:?}", hex(wire)),
        }
    }

    /// Encodes `packet` through `Encode`, checking `encoded_len` against the output.
    pub(crate) fn encode(packet: &impl Encode, version: ProtocolVersion) -> Vec<u8> {
        let mut buf = BytesMut::new();
        packet
            .encode(version, &mut buf)
            .expect("the packet is encodable");
        assert_eq!(
            packet.encoded_len(version),
            buf.len(),
            "encoded_len of {}",
            hex(&buf)
        );
        buf.to_vec()
    }

    /// The canonical vector check: `wire` decodes to `expected`, and `expected`
    /// encodes to exactly `wire`.
    pub(crate) fn assert_vector<T>(wire: &[u8], version: ProtocolVersion, expected: T)
    where
        T: Encode + Clone + Into<Packet> + std::fmt::Debug,
    {
        assert_eq!(
            decode(wire, version),
            expected.clone().into(),
            "decoding {}",
            hex(wire)
        );
        assert_eq!(
            hex(&encode(&expected, version)),
            hex(wire),
            "encoding {expected:?}"
        );
    }

    /// A string literal as a `Str`.
    pub(crate) fn s(v: &'static str) -> Str {
        Str::from_static(v)
    }
}
