//! Codec micro-benchmarks: decode and encode of the packets in `fixtures`.
//!
//! Decode measures the path a connection takes: a `BytesMut` read buffer holding
//! many frames back to back, decoded one after another with `tessera_proto::decode`
//! (the "whole frame?" check, the split off the buffer, the parse, and dropping the
//! packet). The buffer is refilled outside the timed region, so one iteration is
//! one packet. Encode writes into a reused `BytesMut` with enough capacity,
//! cleared between iterations. Throughput is frame bytes per second.
//!
//! Run: `cargo bench -p tessera-proto --bench codec` (or `just bench-proto`, which
//! also prints allocations per operation).

mod fixtures;

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tessera_proto::{Encode, decode};

use fixtures::{BENCH_PACKET_BYTES_MAX, cases, read_buffer};

/// Bytes of frames a decode benchmark puts in its read buffer per refill (at
/// least 16 frames): large enough that the one allocation of the buffer's first
/// split is spread over many packets, as on a busy connection.
const FILL_BYTES: usize = 256 * 1024;

fn decode_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for case in cases() {
        let frame = case.frame();
        let per_fill = (FILL_BYTES / frame.len()).max(16) as u64;
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(case.name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(per_fill);
                    let mut buf = read_buffer(&frame, n as usize);
                    let start = Instant::now();
                    for _ in 0..n {
                        let packet = decode(&mut buf, case.version, BENCH_PACKET_BYTES_MAX);
                        black_box(packet.expect("valid frame").expect("whole frame"));
                    }
                    timed += start.elapsed();
                    left -= n;
                }
                timed
            });
        });
    }
    group.finish();
}

fn encode_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for case in cases() {
        let len = case.packet.encoded_len(case.version);
        let mut buf = BytesMut::with_capacity(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(case.name, |b| {
            b.iter(|| {
                buf.clear();
                case.packet
                    .encode(case.version, &mut buf)
                    .expect("valid packet");
                black_box(&mut buf);
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the whole suite must finish in under three minutes on CI-sized
    // machines; the codec operations are tens to hundreds of nanoseconds.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = decode_benches, encode_benches
}
criterion_main!(benches);
