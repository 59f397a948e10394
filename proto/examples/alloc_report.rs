//! Prints heap allocations per operation for every codec benchmark case, as a
//! Markdown table for `proto/README.md`.
//!
//! Method: a counting global allocator wraps the system allocator. Decode counts
//! `tessera_proto::decode` over a read buffer holding `OPS + 1` frames, after one
//! warm-up decode: the first split of a `BytesMut` promotes it to a shared buffer,
//! one allocation per read buffer, not per packet. Decoded packets are dropped
//! inside the counted region, as a connection drops them. Encode counts
//! `Encode::encode` into a `BytesMut` with enough capacity, cleared between
//! packets. The counts are deterministic.
//!
//! Run: `cargo run --release -p tessera-proto --example alloc_report`.

#[path = "../benches/fixtures/mod.rs"]
mod fixtures;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::BytesMut;
use tessera_proto::{Encode, decode};

use fixtures::{BENCH_PACKET_BYTES_MAX, cases, read_buffer};

/// Operations counted per case.
const OPS: u64 = 1000;

/// The system allocator, counting allocations (a `realloc` counts as one) and the
/// bytes they asked for. The program is single-threaded, so the counts are its own.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

fn record(size: usize) {
    ALLOCATIONS.fetch_add(1, Relaxed);
    ALLOCATED_BYTES.fetch_add(size as u64, Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments, so the
// `GlobalAlloc` contract is `System`'s; counting has no effect on the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
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

/// Allocations and bytes allocated per operation while `f` runs `OPS` operations.
fn per_op(f: impl FnOnce()) -> (f64, f64) {
    let (a0, b0) = (ALLOCATIONS.load(Relaxed), ALLOCATED_BYTES.load(Relaxed));
    f();
    let (a1, b1) = (ALLOCATIONS.load(Relaxed), ALLOCATED_BYTES.load(Relaxed));
    ((a1 - a0) as f64 / OPS as f64, (b1 - b0) as f64 / OPS as f64)
}

fn main() {
    println!("| operation | frame bytes | allocations/op | bytes allocated/op |");
    println!("|---|---:|---:|---:|");
    for case in cases() {
        let frame = case.frame();
        let mut buf = read_buffer(&frame, OPS as usize + 1);
        let warm_up = decode(&mut buf, case.version, BENCH_PACKET_BYTES_MAX);
        assert!(matches!(warm_up, Ok(Some(_))), "{}: {warm_up:?}", case.name);
        drop(warm_up);
        let (allocs, bytes) = per_op(|| {
            for _ in 0..OPS {
                let packet = decode(&mut buf, case.version, BENCH_PACKET_BYTES_MAX);
                assert!(matches!(packet, Ok(Some(_))), "{}: {packet:?}", case.name);
            }
        });
        assert!(buf.is_empty());
        println!(
            "| decode {} | {} | {allocs} | {bytes} |",
            case.name,
            frame.len()
        );
    }
    for case in cases() {
        let len = case.packet.encoded_len(case.version);
        let mut buf = BytesMut::with_capacity(len);
        let (allocs, bytes) = per_op(|| {
            for _ in 0..OPS {
                buf.clear();
                case.packet
                    .encode(case.version, &mut buf)
                    .expect("valid packet");
            }
        });
        println!("| encode {} | {len} | {allocs} | {bytes} |", case.name);
    }
}
