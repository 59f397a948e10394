//! Wire primitives: variable byte integers, fixed-width integers, UTF-8 strings and
//! binary data (MQTT 5 section 1.5), read from a frozen frame and written to a
//! `BytesMut`.
//!
//! The reader works on a whole frame that `frame::check` already measured, so
//! running out of bytes inside it is `Malformed::UnexpectedEnd`, never `Incomplete`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError, Malformed, ProtocolViolation};
use crate::types::{STRING_BYTES_MAX, Str};

/// Largest value of a variable byte integer: 4 bytes of 7 bits.
pub const VARINT_MAX: u32 = 268_435_455;

/// Bytes a variable byte integer of value `v` takes on the wire.
pub const fn varint_len(v: u32) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Outcome of parsing a variable byte integer from the start of a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VarInt {
    /// The value and the number of bytes it took.
    Value(u32, usize),
    /// The slice ends inside the integer.
    Incomplete,
}

/// Parses a variable byte integer. Longer than 4 bytes, or not in its shortest
/// form, is malformed (MQTT 5 section 1.5.5: "the minimum number of bytes").
pub(crate) fn parse_varint(bytes: &[u8]) -> Result<VarInt, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&b) = bytes.get(i) else {
            return Ok(VarInt::Incomplete);
        };
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return Err(DecodeError::Malformed(Malformed::VarIntNotMinimal));
            }
            return Ok(VarInt::Value(value, i + 1));
        }
    }
    Err(DecodeError::Malformed(Malformed::VarIntTooLong))
}

/// Reads fields from the body of one frame. Slices share the frame's allocation.
#[derive(Debug)]
pub(crate) struct Reader {
    buf: Bytes,
}

const fn end() -> DecodeError {
    DecodeError::Malformed(Malformed::UnexpectedEnd)
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Reader {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Fails when bytes are left: for packets whose last field ends the packet.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(Malformed::TrailingBytes))
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(end());
        }
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(end());
        }
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(end());
        }
        Ok(self.buf.get_u32())
    }

    /// A non-zero packet identifier.
    pub(crate) fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::Protocol(ProtocolViolation::PacketIdZero)),
            id => Ok(id),
        }
    }

    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        match parse_varint(&self.buf)? {
            VarInt::Value(v, n) => {
                self.buf.advance(n);
                Ok(v)
            }
            VarInt::Incomplete => Err(end()),
        }
    }

    /// The next `n` bytes as a shared slice.
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(end());
        }
        Ok(self.buf.split_to(n))
    }

    /// Everything left, as a shared slice.
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Two-byte length prefixed binary data.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    /// Two-byte length prefixed UTF-8 string, validated.
    pub(crate) fn string(&mut self) -> Result<Str, DecodeError> {
        Str::from_bytes(self.binary()?)
    }
}

/// Writes a variable byte integer. `v` must not exceed `VARINT_MAX`; callers check
/// lengths with `check_remaining_len` first.
pub(crate) fn put_varint(buf: &mut BytesMut, mut v: u32) {
    debug_assert!(v <= VARINT_MAX);
    loop {
        let mut b = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

/// Bytes a two-byte-length-prefixed field takes.
pub(crate) const fn prefixed_len(n: usize) -> usize {
    2 + n
}

/// Writes two-byte length prefixed bytes. Lengths were checked by `check_field`.
pub(crate) fn put_binary(buf: &mut BytesMut, b: &[u8]) {
    debug_assert!(b.len() <= STRING_BYTES_MAX);
    buf.put_u16(b.len() as u16);
    buf.put_slice(b);
}

/// Writes a two-byte length prefixed UTF-8 string.
pub(crate) fn put_str(buf: &mut BytesMut, s: &Str) {
    put_binary(buf, s.as_bytes());
}

/// Fails when a binary field does not fit its two-byte length prefix. `Str` cannot
/// exceed it by construction; binary data (`Bytes`) can.
pub(crate) fn check_field(b: &[u8]) -> Result<(), EncodeError> {
    if b.len() > STRING_BYTES_MAX {
        Err(EncodeError::FieldTooLong)
    } else {
        Ok(())
    }
}

/// Fails when a remaining length cannot be encoded.
pub(crate) fn check_remaining_len(n: usize) -> Result<u32, EncodeError> {
    if n > VARINT_MAX as usize {
        Err(EncodeError::PacketTooLarge(n))
    } else {
        Ok(n as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries_from_the_spec() {
        // MQTT 5 table 1-1: the first and last value of each length.
        let cases: [(u32, &[u8]); 8] = [
            (0, &[0x00]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ];
        for (v, wire) in cases {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, v);
            assert_eq!(&buf[..], wire, "encoding {v}");
            assert_eq!(varint_len(v), wire.len());
            assert_eq!(parse_varint(wire), Ok(VarInt::Value(v, wire.len())));
        }
    }

    #[test]
    fn varint_errors() {
        assert_eq!(
            parse_varint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Err(DecodeError::Malformed(Malformed::VarIntTooLong))
        );
        assert_eq!(parse_varint(&[0xFF, 0xFF]), Ok(VarInt::Incomplete));
        assert_eq!(parse_varint(&[]), Ok(VarInt::Incomplete));
        assert_eq!(
            parse_varint(&[0x80, 0x00]),
            Err(DecodeError::Malformed(Malformed::VarIntNotMinimal))
        );
    }

    #[test]
    fn reader_past_end_is_malformed_not_incomplete() {
        let mut r = Reader::new(Bytes::from_static(&[0x00, 0x05, b'a']));
        assert_eq!(
            r.string(),
            Err(DecodeError::Malformed(Malformed::UnexpectedEnd))
        );
    }

    #[test]
    fn strings_follow_the_spec_rules() {
        let mut ok = Reader::new(Bytes::from_static(&[
            0x00, 0x05, 0x41, 0xF0, 0xAA, 0x9B, 0x94,
        ]));
        assert_eq!(ok.string().unwrap().as_str(), "A\u{2A6D4}");
        // U+0000 is not allowed [MQTT-1.5.4-2].
        let mut nul = Reader::new(Bytes::from_static(&[0x00, 0x01, 0x00]));
        assert_eq!(
            nul.string(),
            Err(DecodeError::Malformed(Malformed::NullCharacter))
        );
        // An encoded surrogate U+D800 (ED A0 80) is not valid UTF-8 [MQTT-1.5.4-1].
        let mut sur = Reader::new(Bytes::from_static(&[0x00, 0x03, 0xED, 0xA0, 0x80]));
        assert_eq!(
            sur.string(),
            Err(DecodeError::Malformed(Malformed::InvalidUtf8))
        );
        // Overlong encoding of '/' (C0 AF).
        let mut over = Reader::new(Bytes::from_static(&[0x00, 0x02, 0xC0, 0xAF]));
        assert_eq!(
            over.string(),
            Err(DecodeError::Malformed(Malformed::InvalidUtf8))
        );
    }
}
