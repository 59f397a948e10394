//! The bench message payload: a fixed header that lets the receiving side attribute
//! every message to its run and publisher, place it in that publisher's sequence, and
//! measure its latency from the time it was meant to be sent, followed by zero
//! padding up to `--size`.
//!
//! Layout, big-endian, [`HEADER_BYTES`] bytes:
//!
//! | offset | field         | type | meaning                                         |
//! |--------|---------------|------|-------------------------------------------------|
//! | 0      | `run_id`      | u32  | differs between runs, so a stray message from   |
//! |        |               |      | another run on the same broker is not counted   |
//! | 4      | `publisher`   | u32  | index of the publisher in this run              |
//! | 8      | `seq`         | u64  | 0, 1, 2, ... per publisher                      |
//! | 16     | `intended_ns` | u64  | intended send time, ns since the run's clock    |
//! |        |               |      | epoch ([`crate::clock`])                        |

use bytes::{Buf, BufMut, BytesMut};

/// Bytes of the header; `--size` may not be smaller.
pub const HEADER_BYTES: usize = 24;

/// Largest payload `--size` accepts. Both brokers' default packet limits are larger
/// than this plus the topic and fixed header.
pub const PAYLOAD_BYTES_MAX: usize = 256 * 1024;

/// What the header of one message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Identifies the run (see the module docs).
    pub run_id: u32,
    /// Index of the publisher within the run.
    pub publisher: u32,
    /// Position in the publisher's sequence, from 0.
    pub seq: u64,
    /// When the message was meant to be sent, ns since the clock epoch.
    pub intended_ns: u64,
}

impl Header {
    /// Appends this header and zero padding: `size` bytes in all. `size` must be at
    /// least [`HEADER_BYTES`]; the CLI checks it.
    pub fn put(&self, size: usize, buf: &mut BytesMut) {
        assert!(size >= HEADER_BYTES, "payload size {size} below the header");
        buf.put_u32(self.run_id);
        buf.put_u32(self.publisher);
        buf.put_u64(self.seq);
        buf.put_u64(self.intended_ns);
        buf.put_bytes(0, size - HEADER_BYTES);
    }

    /// Reads the header at the start of a payload; `None` when the payload is too
    /// short to be one of ours.
    pub fn parse(mut payload: &[u8]) -> Option<Header> {
        if payload.len() < HEADER_BYTES {
            return None;
        }
        Some(Header {
            run_id: payload.get_u32(),
            publisher: payload.get_u32(),
            seq: payload.get_u64(),
            intended_ns: payload.get_u64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_pads() {
        let h = Header {
            run_id: 0xDEAD_BEEF,
            publisher: 7,
            seq: 1 << 40,
            intended_ns: 123_456_789,
        };
        let mut buf = BytesMut::new();
        h.put(64, &mut buf);
        assert_eq!(buf.len(), 64);
        assert!(buf[HEADER_BYTES..].iter().all(|&b| b == 0));
        assert_eq!(Header::parse(&buf), Some(h));
        assert_eq!(Header::parse(&buf[..HEADER_BYTES - 1]), None);
    }
}
