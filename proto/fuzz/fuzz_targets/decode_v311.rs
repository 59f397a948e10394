//! Arbitrary bytes as the stream of a MQTT 3.1.1 connection: decoded until the
//! decoder needs more bytes or fails, under a small and the largest maximum packet
//! size; every decoded packet must round-trip (see `tessera_proto_fuzz`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_proto::{PACKET_BYTES_MAX, ProtocolVersion};
use tessera_proto_fuzz::{PACKET_BYTES_SMALL, assert_roundtrip, decode_stream};

const VERSION: ProtocolVersion = ProtocolVersion::V3_1_1;

fuzz_target!(|data: &[u8]| {
    for max in [PACKET_BYTES_SMALL, PACKET_BYTES_MAX] {
        for packet in decode_stream(data, VERSION, max).packets {
            assert_roundtrip(&packet, VERSION);
        }
    }
});
