//! The link's wire format, sans-IO: stream headers and length-prefixed frames.
//!
//! Every QUIC stream between two nodes starts with a 6-byte header: the magic `TSLK`, the
//! format version and a tag saying what the stream carries (`0` = the hello exchanged once
//! per connection, otherwise a [`Channel`]'s wire tag). After the header a channel stream
//! carries frames, each `len: u32 BE | request id: u64 BE | kind: u8 | body`, where `len`
//! counts everything after itself. Requests and their responses share the id, so a caller
//! can have many requests in flight on one stream and match the answers.
//!
//! Everything here decodes untrusted bytes: a bad magic, an unknown version, tag or kind,
//! or a frame over its channel's bound is an error value, never a panic.

use bytes::{BufMut, Bytes, BytesMut};

use crate::transport::Channel;

/// The first bytes of every stream.
pub const MAGIC: [u8; 4] = *b"TSLK";
/// The wire format version this build speaks.
pub const VERSION: u8 = 1;
/// Bytes in a stream header.
pub const STREAM_HEADER_LEN: usize = 6;
/// Bytes in a frame header (`len`, request id, kind).
pub const FRAME_HEADER_LEN: usize = 13;
/// Bytes of a frame's `len` field counted in `len` itself besides the body: id and kind.
const LEN_OVERHEAD: usize = 9;
/// Bytes in the hello body: the sender's instance id.
pub const HELLO_LEN: usize = 8;

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// The once-per-connection hello: each side's instance id.
    Hello,
    /// Requests and responses of one channel.
    Channel(Channel),
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A request (caller to server).
    Request = 0,
    /// A successful response; the body is the service's answer.
    Response = 1,
    /// The service refused the request; the body is a UTF-8 reason.
    Error = 2,
    /// The server has no service yet (it is still starting).
    NotReady = 3,
}

impl FrameKind {
    fn from_u8(tag: u8) -> Option<FrameKind> {
        match tag {
            0 => Some(FrameKind::Request),
            1 => Some(FrameKind::Response),
            2 => Some(FrameKind::Error),
            3 => Some(FrameKind::NotReady),
            _ => None,
        }
    }
}

/// Why bytes from a peer were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The stream does not start with [`MAGIC`].
    #[error("stream does not start with the link's magic bytes")]
    BadMagic,
    /// The peer speaks another version of the format.
    #[error("peer speaks link format version {0}, this node speaks {VERSION}")]
    Version(u8),
    /// A stream tag this version does not know.
    #[error("unknown stream tag {0}")]
    UnknownStream(u8),
    /// A frame kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame's length is below the header's or above the channel's bound.
    #[error("frame body of {len} bytes is outside the bound of {max} bytes")]
    Length {
        /// The body length the frame announced.
        len: u64,
        /// The channel's bound.
        max: usize,
    },
}

/// Encodes a stream header.
pub fn stream_header(kind: StreamKind) -> [u8; STREAM_HEADER_LEN] {
    let tag = match kind {
        StreamKind::Hello => 0,
        StreamKind::Channel(channel) => channel as u8,
    };
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], VERSION, tag]
}

/// Decodes a stream header.
pub fn parse_stream_header(bytes: &[u8; STREAM_HEADER_LEN]) -> Result<StreamKind, FrameError> {
    if bytes[..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(FrameError::Version(bytes[4]));
    }
    match bytes[5] {
        0 => Ok(StreamKind::Hello),
        tag => Channel::from_u8(tag)
            .map(StreamKind::Channel)
            .ok_or(FrameError::UnknownStream(tag)),
    }
}

/// A decoded frame header: the body of `body_len` bytes follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The request id the frame belongs to.
    pub id: u64,
    /// What the frame is.
    pub kind: FrameKind,
    /// Bytes of body after the header.
    pub body_len: usize,
}

/// Encodes a frame header for a body of `body_len` bytes. The caller has checked the body
/// against its channel's bound, which is far below `u32::MAX`.
pub fn frame_header(id: u64, kind: FrameKind, body_len: usize) -> Bytes {
    let len =
        u32::try_from(body_len + LEN_OVERHEAD).expect("frame bodies are bounded far below 4 GiB");
    let mut header = BytesMut::with_capacity(FRAME_HEADER_LEN);
    header.put_u32(len);
    header.put_u64(id);
    header.put_u8(kind as u8);
    header.freeze()
}

/// Decodes a frame header, refusing a body longer than `body_bytes_max`.
pub fn parse_frame_header(
    bytes: &[u8; FRAME_HEADER_LEN],
    body_bytes_max: usize,
) -> Result<FrameHeader, FrameError> {
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let Some(body_len) = len.checked_sub(LEN_OVERHEAD) else {
        return Err(FrameError::Length {
            len: len as u64,
            max: body_bytes_max,
        });
    };
    if body_len > body_bytes_max {
        return Err(FrameError::Length {
            len: body_len as u64,
            max: body_bytes_max,
        });
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[4..12]);
    let kind = FrameKind::from_u8(bytes[12]).ok_or(FrameError::UnknownKind(bytes[12]))?;
    Ok(FrameHeader {
        id: u64::from_be_bytes(id),
        kind,
        body_len,
    })
}

/// A reason string as it goes on the wire: at most `REASON_BYTES_MAX` bytes, cut at a
/// character boundary.
pub fn reason_body(reason: &str) -> Bytes {
    Bytes::copy_from_slice(truncate(reason, REASON_BYTES_MAX).as_bytes())
}

/// A reason string read from the wire (lossy UTF-8, bounded).
pub fn reason_from_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(REASON_BYTES_MAX)]);
    text.into_owned()
}

/// Bytes of an error reason carried in a frame.
pub const REASON_BYTES_MAX: usize = 1024;

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_headers_round_trip() {
        assert_eq!(
            parse_stream_header(&stream_header(StreamKind::Hello)),
            Ok(StreamKind::Hello)
        );
        for channel in Channel::ALL {
            let kind = StreamKind::Channel(channel);
            assert_eq!(parse_stream_header(&stream_header(kind)), Ok(kind));
        }
    }

    #[test]
    fn bad_stream_headers_are_errors() {
        assert_eq!(parse_stream_header(b"HTTP/1"), Err(FrameError::BadMagic));
        assert_eq!(
            parse_stream_header(b"TSLK\x02\x01"),
            Err(FrameError::Version(2))
        );
        assert_eq!(
            parse_stream_header(b"TSLK\x01\x63"),
            Err(FrameError::UnknownStream(0x63))
        );
    }

    #[test]
    fn frame_headers_round_trip_and_bounds_hold() {
        let header = frame_header(7, FrameKind::Response, 100);
        let bytes: [u8; FRAME_HEADER_LEN] = header[..].try_into().unwrap();
        let parsed = parse_frame_header(&bytes, 100).unwrap();
        assert_eq!(
            parsed,
            FrameHeader {
                id: 7,
                kind: FrameKind::Response,
                body_len: 100
            }
        );
        assert_eq!(
            parse_frame_header(&bytes, 99),
            Err(FrameError::Length { len: 100, max: 99 })
        );
    }

    #[test]
    fn hostile_frame_headers_are_errors() {
        // A length below the header's own size.
        let mut bytes = [0u8; FRAME_HEADER_LEN];
        bytes[3] = 3;
        assert!(matches!(
            parse_frame_header(&bytes, 1 << 20),
            Err(FrameError::Length { .. })
        ));
        // The largest length a u32 can say.
        bytes[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_frame_header(&bytes, 1 << 20),
            Err(FrameError::Length { .. })
        ));
        // An unknown kind.
        let header = frame_header(1, FrameKind::Request, 0);
        let mut bytes: [u8; FRAME_HEADER_LEN] = header[..].try_into().unwrap();
        bytes[12] = 9;
        assert_eq!(
            parse_frame_header(&bytes, 10),
            Err(FrameError::UnknownKind(9))
        );
    }

    #[test]
    fn reasons_are_bounded_at_a_char_boundary() {
        let long = "é".repeat(REASON_BYTES_MAX);
        let body = reason_body(&long);
        assert!(body.len() <= REASON_BYTES_MAX);
        assert!(std::str::from_utf8(&body).is_ok());
        assert_eq!(reason_from_body(b"\xff ok"), "\u{fffd} ok");
    }
}
