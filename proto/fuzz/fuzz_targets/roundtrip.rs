//! Every packet decoded from arbitrary bytes, in each of the three versions,
//! encodes to exactly `encoded_len` bytes, decodes back to itself and encodes
//! canonically. Sent in the other versions (a broker forwarding between a v5
//! and a 3.1.1 client), it either is refused by the encoder or decodes there.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_proto::PACKET_BYTES_MAX;
use tessera_proto_fuzz::{VERSIONS, assert_cross_version, assert_roundtrip, decode_stream};

fuzz_target!(|data: &[u8]| {
    for from in VERSIONS {
        for packet in decode_stream(data, from, PACKET_BYTES_MAX).packets {
            assert_roundtrip(&packet, from);
            for to in VERSIONS.into_iter().filter(|v| *v != from) {
                assert_cross_version(&packet, to);
            }
        }
    }
});
