//! PINGREQ and PINGRESP (MQTT 5 sections 3.12-3.13): a fixed header and nothing
//! else; a non-zero remaining length is malformed.

use bytes::BytesMut;

use crate::frame::Body;
use crate::types::{PacketType, ProtocolVersion};

/// PINGREQ, for encoding; decoded as `Packet::PingReq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingReq;

/// PINGRESP, for encoding; decoded as `Packet::PingResp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingResp;

impl Body for PingReq {
    const TYPE: PacketType = PacketType::PingReq;

    fn body_len(&self, _version: ProtocolVersion) -> usize {
        0
    }

    fn put_body(&self, _version: ProtocolVersion, _buf: &mut BytesMut) {}
}

impl Body for PingResp {
    const TYPE: PacketType = PacketType::PingResp;

    fn body_len(&self, _version: ProtocolVersion) -> usize {
        0
    }

    fn put_body(&self, _version: ProtocolVersion, _buf: &mut BytesMut) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Packet;
    use crate::packet::testing::{decode, encode, hex};

    #[test]
    fn pingreq_and_pingresp_in_every_version() {
        for version in [
            ProtocolVersion::V3_1,
            ProtocolVersion::V3_1_1,
            ProtocolVersion::V5,
        ] {
            // C0 = PINGREQ, D0 = PINGRESP; remaining length 0.
            assert_eq!(decode(&[0xC0, 0x00], version), Packet::PingReq);
            assert_eq!(hex(&encode(&PingReq, version)), "C0 00");
            assert_eq!(hex(&encode(&Packet::PingReq, version)), "C0 00");
            assert_eq!(decode(&[0xD0, 0x00], version), Packet::PingResp);
            assert_eq!(hex(&encode(&PingResp, version)), "D0 00");
            assert_eq!(hex(&encode(&Packet::PingResp, version)), "D0 00");
        }
    }
}
