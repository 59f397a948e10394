//! Goal: the PUBLISH hot path does not touch the heap. Decoding a PUBLISH without
//! user properties from a read buffer that already holds the frame allocates
//! nothing, and encoding one into a buffer with enough capacity allocates nothing.
//!
//! Method: a counting global allocator wraps the system allocator and counts per
//! thread (libtest runs tests on parallel threads; each test counts only its own).
//! A `BytesMut` allocates once when it is first split (it promotes its storage to
//! a shared, reference-counted buffer), so each decode test decodes one frame as a
//! warm-up and then counts the next `FRAMES`. The counts are exact, not timings.
//! A control test checks that the counter does see an allocation the decoder is
//! known to make (a user property list), so a zero is not vacuous.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{Bytes, BytesMut};
use tessera_proto::{
    Encode, PACKET_BYTES_MAX, Packet, ProtocolVersion, Publish, PublishProperties, QoS, Str, decode,
};

/// Frames decoded or encoded while counting.
const FRAMES: usize = 100;

thread_local! {
    /// Allocations (a `realloc` counts as one) made by the current thread.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// The system allocator, counting allocations per thread.
struct Counting;

fn record() {
    // `try_with`: the thread-local may already be gone while a thread exits.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments, so the
// `GlobalAlloc` contract is `System`'s; counting has no effect on the memory, and
// the const-initialized thread-local `Cell` never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record();
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record();
        // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record();
        // SAFETY: forwarded unchanged; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations the current thread makes while `f` runs.
fn allocations_in<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = ALLOCATIONS.with(Cell::get);
    let out = f();
    (ALLOCATIONS.with(Cell::get) - before, out)
}

/// A QoS 1 PUBLISH; in v5 with a topic alias and a message expiry interval.
fn publish(version: ProtocolVersion, payload_bytes: usize) -> Publish {
    let mut p = Publish::new(
        Str::from_static("sensors/building-7/floor-3/temperature"),
        Bytes::from(vec![0x5A; payload_bytes]),
    );
    p.qos = QoS::AtLeastOnce;
    p.packet_id = 17;
    if version.is_v5() {
        p.properties = PublishProperties {
            topic_alias: Some(3),
            message_expiry_interval: Some(120),
            ..Default::default()
        };
    }
    p
}

/// A read buffer holding `count` frames of `p`, as a socket read leaves it.
fn read_buffer(p: &Publish, version: ProtocolVersion, count: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(p.encoded_len(version) * count);
    for _ in 0..count {
        p.encode(version, &mut buf).unwrap();
    }
    buf
}

/// Allocations made decoding `FRAMES` frames of `p` after one warm-up decode.
/// Every decoded packet is compared with `p` and dropped inside the count.
fn decode_allocations(p: &Publish, version: ProtocolVersion) -> u64 {
    let expected = Packet::Publish(p.clone());
    let mut buf = read_buffer(p, version, FRAMES + 1);
    let warm_up = decode(&mut buf, version, PACKET_BYTES_MAX).unwrap();
    assert_eq!(warm_up.as_ref(), Some(&expected));
    let (allocations, ()) = allocations_in(|| {
        for _ in 0..FRAMES {
            let packet = decode(&mut buf, version, PACKET_BYTES_MAX).unwrap();
            assert!(packet.as_ref() == Some(&expected), "decoded {packet:?}");
        }
    });
    assert!(buf.is_empty());
    allocations
}

#[test]
fn decoding_publish_allocates_nothing() {
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        for payload_bytes in [16, 4096] {
            let p = publish(version, payload_bytes);
            assert_eq!(
                decode_allocations(&p, version),
                0,
                "decoding {FRAMES} PUBLISH ({version}, {payload_bytes}-byte payload)"
            );
        }
    }
}

#[test]
fn encoding_publish_into_a_buffer_with_room_allocates_nothing() {
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        for payload_bytes in [16, 4096] {
            let p = publish(version, payload_bytes);
            let len = p.encoded_len(version);
            let mut buf = BytesMut::with_capacity(len);
            let (allocations, ()) = allocations_in(|| {
                for _ in 0..FRAMES {
                    buf.clear();
                    p.encode(version, &mut buf).unwrap();
                }
            });
            assert_eq!(buf.len(), len);
            assert_eq!(
                allocations, 0,
                "encoding {FRAMES} PUBLISH ({version}, {payload_bytes}-byte payload)"
            );
        }
    }
}

#[test]
fn the_counter_sees_the_user_property_list() {
    // One user property: decoding pushes it onto an empty `Vec`, one allocation.
    let mut p = publish(ProtocolVersion::V5, 16);
    p.properties
        .user_properties
        .push((Str::from_static("k"), Str::from_static("v")));
    assert_eq!(decode_allocations(&p, ProtocolVersion::V5), FRAMES as u64);
}
