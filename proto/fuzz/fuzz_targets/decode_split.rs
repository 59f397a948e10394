//! Decoding a stream that arrives in two reads gives what decoding it whole
//! gives: the same packets, the same error or the same bytes left over. The first
//! input byte picks the split point, the rest is the stream; both versions and
//! both maximum packet sizes are tried.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_proto::{PACKET_BYTES_MAX, ProtocolVersion};
use tessera_proto_fuzz::{PACKET_BYTES_SMALL, decode_stream, decode_stream_split};

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let at = usize::from(split) % (stream.len() + 1);
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        for max in [PACKET_BYTES_SMALL, PACKET_BYTES_MAX] {
            let whole = decode_stream(stream, version, max);
            let split = decode_stream_split(stream, at, version, max);
            assert_eq!(split, whole, "split at {at} differs ({version}, max {max})");
        }
    }
});
