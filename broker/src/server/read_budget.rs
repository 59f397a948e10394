//! The node's budget of bytes in read buffers (`limits.max_read_buffers_bytes`).
//!
//! A connection's read buffer holds at most one packet it has not finished
//! reading plus a read chunk, and `limits.max_packet_size_bytes` bounds that
//! packet: the per-connection bound. With the MQTT maximum (256 MiB) as that
//! limit, a few hundred clients each sending one large packet could still take
//! all memory, so large packets also draw on one budget for the whole node.
//!
//! One budget for the node, not one per shard: a per-shard share would refuse a
//! large packet on a busy shard while another shard's share sits idle, and
//! which shard serves a client is a hash of its ClientID, not something it
//! chooses. The shared counter is an atomic, touched only by packets larger
//! than [`RESERVE_ABOVE_BYTES`] (twice per packet: reserve and release), never
//! by the small packets of the hot path, whose bytes are bounded per
//! connection by the read chunk size.
//!
//! A packet is reserved in full when its fixed header has arrived (the header
//! says its length), before its body is read, so the buffer is sized once, and
//! released when the packet is decoded (its payload then belongs to the
//! messages and queues made from it) or the connection ends. A packet that
//! does not fit ends its connection (the caller tells an MQTT 5 client 0x97).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;

/// Packets larger than this draw on the node's budget; smaller ones are
/// bounded per connection.
pub(super) const RESERVE_ABOVE_BYTES: usize = 64 * 1024;

/// The node's read-buffer budget, shared by every shard.
#[derive(Debug)]
pub struct ReadBudget {
    used: AtomicU64,
    /// `u64::MAX`: no limit.
    max: u64,
}

impl ReadBudget {
    /// A budget of `max` bytes; 0 means no limit.
    pub fn new(max: u64) -> Arc<ReadBudget> {
        Arc::new(ReadBudget {
            used: AtomicU64::new(0),
            max: if max == 0 { u64::MAX } else { max },
        })
    }

    /// Bytes reserved now (the `tessera_read_buffers_bytes` gauge).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn try_reserve(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.max)
            })
            .is_ok()
    }

    fn release(&self, bytes: u64) {
        let before = self.used.fetch_sub(bytes, Ordering::Relaxed);
        assert!(before >= bytes, "read budget released more than reserved");
    }
}

/// What one connection holds of the budget: the packet at the front of its
/// read buffer, when that packet is large. Releases it when dropped.
#[derive(Debug)]
pub(super) struct Reservation {
    budget: Arc<ReadBudget>,
    bytes: u64,
}

/// The budget has no room for the packet at the front of a read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OverBudget;

impl Reservation {
    pub(super) fn new(budget: Arc<ReadBudget>) -> Reservation {
        Reservation { budget, bytes: 0 }
    }

    /// Makes the reservation match the packet at the front of `input`
    /// (`max_packet` bounds it; a larger one is the decoder's error): the
    /// whole packet when it is large and not yet decoded, else nothing. On
    /// success the buffer has room for the whole packet.
    pub(super) fn track(
        &mut self,
        input: &mut BytesMut,
        max_packet: usize,
    ) -> Result<(), OverBudget> {
        let frame = match tessera_proto::check(input, max_packet) {
            Ok(h) => h.frame_len(),
            Err(tessera_proto::DecodeError::Incomplete { needed }) => input.len() + needed,
            Err(_) => 0,
        };
        let wanted = if frame > RESERVE_ABOVE_BYTES {
            frame as u64
        } else {
            0
        };
        if wanted == self.bytes {
            return Ok(());
        }
        self.clear();
        if wanted > 0 {
            if !self.budget.try_reserve(wanted) {
                return Err(OverBudget);
            }
            self.bytes = wanted;
            input.reserve(frame.saturating_sub(input.len()));
        }
        Ok(())
    }

    /// Gives back what is reserved.
    pub(super) fn clear(&mut self) {
        if self.bytes > 0 {
            self.budget.release(self.bytes);
            self.bytes = 0;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed header of a PUBLISH frame of `frame` bytes in all (a
    /// 3-byte remaining length, which every size here needs), and the first
    /// body bytes.
    fn header(frame: usize) -> BytesMut {
        let mut remaining = frame - 4;
        assert!((16_384..2_097_152).contains(&remaining), "3 length bytes");
        let mut b = BytesMut::from(&[0x30u8][..]);
        while remaining > 0 {
            let mut byte = (remaining % 128) as u8;
            remaining /= 128;
            if remaining > 0 {
                byte |= 0x80;
            }
            b.extend_from_slice(&[byte]);
        }
        b.extend_from_slice(&[0, 1, b't']);
        b
    }

    #[test]
    fn large_packets_reserve_in_full_small_ones_never_and_drops_release() {
        let budget = ReadBudget::new(300_000);
        let mut a = Reservation::new(budget.clone());
        let mut b = Reservation::new(budget.clone());
        let mut small = header(20_000);
        a.track(&mut small, usize::MAX).unwrap();
        assert_eq!(budget.used(), 0, "small packets are bounded per connection");

        let mut big = header(200_000);
        a.track(&mut big, usize::MAX).unwrap();
        assert_eq!(budget.used(), 200_000);
        assert!(big.capacity() >= 200_000, "the buffer is sized once");
        a.track(&mut big, usize::MAX).unwrap();
        assert_eq!(
            budget.used(),
            200_000,
            "tracking the same packet again is free"
        );

        let mut other = header(150_000);
        assert_eq!(b.track(&mut other, usize::MAX), Err(OverBudget));
        assert_eq!(budget.used(), 200_000, "a refusal reserves nothing");

        // The large packet was decoded: the buffer is empty again.
        a.track(&mut BytesMut::new(), usize::MAX).unwrap();
        assert_eq!(budget.used(), 0);
        b.track(&mut other, usize::MAX).unwrap();
        assert_eq!(budget.used(), 150_000);
        drop(b);
        assert_eq!(budget.used(), 0, "a connection's end releases its packet");
    }

    #[test]
    fn zero_means_no_limit() {
        let budget = ReadBudget::new(0);
        let mut r = Reservation::new(budget.clone());
        r.track(&mut header(2_000_000), usize::MAX).unwrap();
        assert_eq!(budget.used(), 2_000_000);
    }
}
