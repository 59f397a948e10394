//! Framing: the cheap "is a whole frame here?" check on the fixed header, the
//! decode entry point that splits a frame off the read buffer, and the encoder
//! shared by every packet.
//!
//! The maximum packet size is enforced from the fixed header alone, so an
//! oversized packet is refused before its body is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec::{self, Reader, VarInt, parse_varint, varint_len};
use crate::error::{DecodeError, EncodeError, Malformed};
use crate::packet::Packet;
use crate::types::{PacketType, ProtocolVersion};

/// The largest frame MQTT can express: 1 type byte, 4 length bytes, 268,435,455
/// bytes of body.
pub const PACKET_BYTES_MAX: usize = 1 + 4 + codec::VARINT_MAX as usize;

/// What the fixed header of a complete frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The packet type (high nibble of byte 0).
    pub packet_type: PacketType,
    /// The flag bits (low nibble of byte 0), already checked for this type.
    pub flags: u8,
    /// Bytes of the fixed header: the type byte plus the remaining-length bytes.
    pub header_len: usize,
    /// The remaining length: bytes after the fixed header.
    pub remaining_len: usize,
}

impl FrameHeader {
    /// Bytes of the whole frame.
    pub const fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// Checks whether `buf` starts with a whole frame of at most `max_packet_size`
/// bytes, without parsing the body.
///
/// Returns `Incomplete` with a lower bound of missing bytes while the frame is not
/// whole, `PacketTooLarge` as soon as the fixed header announces a frame over the
/// limit, and `Malformed` for a reserved type, wrong flags or a bad length.
pub fn check(buf: &[u8], max_packet_size: usize) -> Result<FrameHeader, DecodeError> {
    let Some(&first) = buf.first() else {
        return Err(DecodeError::Incomplete { needed: 2 });
    };
    let packet_type = PacketType::from_nibble(first >> 4)
        .ok_or(DecodeError::Malformed(Malformed::ReservedPacketType))?;
    let flags = first & 0x0F;
    if let Some(required) = packet_type.required_flags()
        && flags != required
    {
        return Err(DecodeError::Malformed(Malformed::InvalidFlags));
    }
    let (remaining_len, len_bytes) = match parse_varint(&buf[1..])? {
        VarInt::Value(v, n) => (v as usize, n),
        VarInt::Incomplete => return Err(DecodeError::Incomplete { needed: 1 }),
    };
    let header = FrameHeader {
        packet_type,
        flags,
        header_len: 1 + len_bytes,
        remaining_len,
    };
    let size = header.frame_len();
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buf.len() < size {
        return Err(DecodeError::Incomplete {
            needed: size - buf.len(),
        });
    }
    Ok(header)
}

/// Decodes the next packet from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not hold a whole frame yet (nothing is
/// consumed), or the packet, whose strings and payload are slices of the frame it
/// split off `buf` (no copy). `version` is the connection's protocol version; a
/// CONNECT packet carries its own and ignores it.
///
/// On `Err` the connection must be closed; `DecodeError::reason_code` says what
/// to tell a v5 peer.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let header = match check(buf, max_packet_size) {
        Ok(h) => h,
        Err(DecodeError::Incomplete { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut frame = buf.split_to(header.frame_len()).freeze();
    frame.advance(header.header_len);
    decode_body(&header, frame, version).map(Some)
}

/// Decodes the body of a frame whose header `check` returned. `body` is exactly
/// `header.remaining_len` bytes.
pub fn decode_body(
    header: &FrameHeader,
    body: Bytes,
    version: ProtocolVersion,
) -> Result<Packet, DecodeError> {
    debug_assert_eq!(body.len(), header.remaining_len);
    Packet::decode_body(header.packet_type, header.flags, Reader::new(body), version)
}

/// A packet body: how one packet type encodes. The framing around it is shared.
pub(crate) trait Body {
    /// The packet type nibble.
    const TYPE: PacketType;

    /// Flag bits of the fixed header.
    fn flags(&self) -> u8 {
        Self::TYPE.required_flags().unwrap_or(0)
    }

    /// Rejects packets whose fields contradict each other or the version.
    fn check(&self, _version: ProtocolVersion) -> Result<(), EncodeError> {
        Ok(())
    }

    /// The remaining length for `version`.
    fn body_len(&self, version: ProtocolVersion) -> usize;

    /// Writes the body for `version`.
    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut);
}

/// Encoding into a `BytesMut`, with the exact size known before writing.
pub trait Encode {
    /// Bytes the encoded packet takes, fixed header included.
    fn encoded_len(&self, version: ProtocolVersion) -> usize;

    /// Appends the packet to `buf`, reserving `encoded_len` bytes once.
    fn encode(&self, version: ProtocolVersion, buf: &mut BytesMut) -> Result<(), EncodeError>;
}

impl<T: Body> Encode for T {
    fn encoded_len(&self, version: ProtocolVersion) -> usize {
        let n = self.body_len(version);
        1 + varint_len(n.min(codec::VARINT_MAX as usize) as u32) + n
    }

    fn encode(&self, version: ProtocolVersion, buf: &mut BytesMut) -> Result<(), EncodeError> {
        self.check(version)?;
        let n = self.body_len(version);
        let rem = codec::check_remaining_len(n)?;
        let total = 1 + varint_len(rem) + n;
        buf.reserve(total);
        let start = buf.len();
        buf.put_u8(((T::TYPE as u8) << 4) | self.flags());
        codec::put_varint(buf, rem);
        self.put_body(version, buf);
        debug_assert_eq!(
            buf.len() - start,
            total,
            "{:?} body_len disagrees with put_body",
            T::TYPE
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_reports_incomplete_with_a_lower_bound() {
        assert_eq!(check(&[], 100), Err(DecodeError::Incomplete { needed: 2 }));
        assert_eq!(
            check(&[0xC0], 100),
            Err(DecodeError::Incomplete { needed: 1 })
        );
        assert_eq!(
            check(&[0x30, 0x80], 100),
            Err(DecodeError::Incomplete { needed: 1 })
        );
        assert_eq!(
            check(&[0x30, 0x05, 0, 1], 100),
            Err(DecodeError::Incomplete { needed: 3 })
        );
    }

    #[test]
    fn oversize_is_refused_from_the_fixed_header_alone() {
        // A PUBLISH announcing 1,000,000 body bytes with only its header present.
        let header = [0x30, 0xC0, 0x84, 0x3D];
        assert_eq!(
            check(&header, 65_536),
            Err(DecodeError::PacketTooLarge {
                size: 1_000_004,
                max: 65_536
            })
        );
    }

    #[test]
    fn reserved_type_and_flags_are_malformed() {
        assert_eq!(
            check(&[0x00, 0x00], 100),
            Err(DecodeError::Malformed(Malformed::ReservedPacketType))
        );
        // PINGREQ with a flag bit set.
        assert_eq!(
            check(&[0xC1, 0x00], 100),
            Err(DecodeError::Malformed(Malformed::InvalidFlags))
        );
        // SUBSCRIBE must carry 0b0010.
        assert_eq!(
            check(&[0x80, 0x00], 100),
            Err(DecodeError::Malformed(Malformed::InvalidFlags))
        );
    }

    #[test]
    fn decode_leaves_following_bytes_in_the_buffer() {
        let mut buf = BytesMut::from(&[0xC0, 0x00, 0xD0, 0x00, 0xC0][..]);
        assert_eq!(
            decode(&mut buf, ProtocolVersion::V3_1_1, 100),
            Ok(Some(Packet::PingReq))
        );
        assert_eq!(
            decode(&mut buf, ProtocolVersion::V3_1_1, 100),
            Ok(Some(Packet::PingResp))
        );
        assert_eq!(decode(&mut buf, ProtocolVersion::V3_1_1, 100), Ok(None));
        assert_eq!(&buf[..], &[0xC0]);
    }
}
