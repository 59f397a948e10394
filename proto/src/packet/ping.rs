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
