//! Round-trip and streaming properties of the codec, for MQTT 3.1, 3.1.1 and 5.0.
//!
//! Goal: every valid packet survives encode then decode unchanged, decoding does
//! not depend on how the byte stream is cut into reads, and no input, valid or
//! not, makes the decoder panic.
//!
//! Method: proptest, with the valid-packet strategies of `tessera_proto::arbitrary`
//! and each property run once per protocol version (the `version_suite!` macro):
//! - every packet type: `decode(encode(p)) == p`, the whole encoding is consumed,
//!   and `encoded_len` equals the bytes written;
//! - a sequence of valid packets, concatenated and fed in chunks cut at arbitrary
//!   points (and one byte at a time), decodes to the same packets as the whole
//!   buffer at once;
//! - arbitrary bytes, bytes behind a valid fixed header (so the body parsers run),
//!   and valid encodings with flipped or truncated bodies: decoding never panics,
//!   gives the same packets and the same first error whole or chunked, and any
//!   packet it accepts re-encodes to something that decodes to the same packet;
//! - a maximum packet size one byte below the encoding is refused with
//!   `PacketTooLarge` from the fixed header alone; exactly the encoding's size is
//!   accepted;
//! - PUBLISH packets sized so the remaining length straddles each boundary of
//!   the variable byte integer (up to 2 MiB) frame, round-trip and stream like
//!   small ones; the other strategies keep packets under a kilobyte.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use tessera_proto::arbitrary;
use tessera_proto::{
    DecodeError, Encode, PACKET_BYTES_MAX, Packet, ProtocolVersion, check, decode, varint_len,
};

/// Appends `p` encoded in `version` to `buf`, checking that `encoded_len`
/// announced exactly the bytes written.
fn encode_into(
    p: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), TestCaseError> {
    let before = buf.len();
    p.encode(version, buf)
        .map_err(|e| TestCaseError::fail(format!("valid packet failed to encode: {e}")))?;
    prop_assert_eq!(
        buf.len() - before,
        p.encoded_len(version),
        "encoded_len of {:?}",
        p
    );
    Ok(())
}

fn encode(p: &Packet, version: ProtocolVersion) -> Result<BytesMut, TestCaseError> {
    let mut buf = BytesMut::new();
    encode_into(p, version, &mut buf)?;
    Ok(buf)
}

/// `decode(encode(p)) == p`, consuming the whole encoding.
fn assert_roundtrip(p: Packet, version: ProtocolVersion) -> Result<(), TestCaseError> {
    let mut buf = encode(&p, version)?;
    let wire = buf.clone().freeze();
    let decoded = decode(&mut buf, version, PACKET_BYTES_MAX);
    prop_assert_eq!(decoded, Ok(Some(p)), "wire {:02X?}", &wire[..]);
    prop_assert!(buf.is_empty(), "{} bytes left after the packet", buf.len());
    Ok(())
}

/// What decoding a byte stream yields: the packets in order, then either the
/// first error or the bytes left over that do not make a whole frame yet.
#[derive(Debug, PartialEq)]
struct Outcome {
    packets: Vec<Packet>,
    end: End,
}

#[derive(Debug, PartialEq)]
enum End {
    /// Decoding stopped at this error; the connection would be closed.
    Error(DecodeError),
    /// No error; these bytes wait for more input.
    Pending(Bytes),
}

/// Decodes from `buf` until it holds no whole frame or an error occurs.
/// Returns the error, if any.
fn drain(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max: usize,
    packets: &mut Vec<Packet>,
) -> Option<DecodeError> {
    loop {
        match decode(buf, version, max) {
            Ok(Some(p)) => packets.push(p),
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

/// Decodes `bytes` held in one buffer.
fn decode_whole(bytes: &[u8], version: ProtocolVersion, max: usize) -> Outcome {
    decode_chunked(bytes, &[], version, max)
}

/// Decodes `bytes` as they would arrive in reads ending at `cuts` (sorted
/// offsets into `bytes`): append a chunk, decode until `Ok(None)`, repeat.
fn decode_chunked(bytes: &[u8], cuts: &[usize], version: ProtocolVersion, max: usize) -> Outcome {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        buf.extend_from_slice(&bytes[start..end]);
        start = end;
        if let Some(e) = drain(&mut buf, version, max, &mut packets) {
            return Outcome {
                packets,
                end: End::Error(e),
            };
        }
    }
    Outcome {
        packets,
        end: End::Pending(buf.freeze()),
    }
}

/// Sorted cut offsets into a buffer of `len` bytes.
fn cut_points(len: usize, cuts: &[Index]) -> Vec<usize> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
    points.sort_unstable();
    points
}

/// Every offset: the stream arrives one byte at a time.
fn every_byte(len: usize) -> Vec<usize> {
    (0..len).collect()
}

/// Random cut points: up to 7 reads.
fn cuts() -> impl Strategy<Value = Vec<Index>> {
    vec(any::<Index>(), 0..8)
}

/// A maximum packet size: usually none to speak of, sometimes small enough to
/// refuse some of the frames in a 512-byte input.
fn max_packet_size() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(PACKET_BYTES_MAX), 1 => 2usize..600]
}

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let byte = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A frame with a valid fixed header (any type, the flags the type requires,
/// any flags for PUBLISH, the true remaining length) and a random body, followed
/// by a few random bytes.
fn framed_random_body() -> impl Strategy<Value = Vec<u8>> {
    (
        1u8..=15,
        0u8..16,
        vec(any::<u8>(), 0..256),
        vec(any::<u8>(), 0..8),
    )
        .prop_map(|(packet_type, publish_flags, body, trailing)| {
            let flags = match packet_type {
                3 => publish_flags,
                6 | 8 | 10 => 0b0010,
                _ => 0,
            };
            let mut out = vec![(packet_type << 4) | flags];
            put_varint(&mut out, body.len());
            out.extend_from_slice(&body);
            out.extend_from_slice(&trailing);
            out
        })
}

/// A valid encoding whose body is truncated at a random point (the remaining
/// length rewritten to match) and has a few bytes flipped: inputs that get deep
/// into the body parsers before they go wrong.
fn damaged_encoding(version: ProtocolVersion) -> impl Strategy<Value = Vec<u8>> {
    (
        arbitrary::packet(version),
        proptest::option::of(any::<Index>()),
        vec((any::<Index>(), 1u8..=255), 0..4),
    )
        .prop_map(move |(p, truncate, flips)| {
            let mut wire = BytesMut::new();
            p.encode(version, &mut wire).expect("valid packets encode");
            let header = check(&wire, PACKET_BYTES_MAX).expect("a whole valid frame");
            let mut body = wire[header.header_len..].to_vec();
            if let Some(at) = truncate {
                body.truncate(at.index(body.len() + 1));
            }
            if !body.is_empty() {
                for (at, mask) in flips {
                    let i = at.index(body.len());
                    body[i] ^= mask;
                }
            }
            let mut out = vec![wire[0]];
            put_varint(&mut out, body.len());
            out.extend_from_slice(&body);
            out
        })
}

/// With a maximum packet size one byte below `p`'s encoding, its fixed header
/// alone is refused with `PacketTooLarge`; at exactly its size the header alone
/// waits for the body (if there is one) and the whole frame decodes.
fn assert_oversize_refused(p: Packet, version: ProtocolVersion) -> Result<(), TestCaseError> {
    let wire = encode(&p, version)?;
    let size = wire.len();
    let header_len = check(&wire, PACKET_BYTES_MAX)
        .map_err(|e| TestCaseError::fail(format!("valid frame refused: {e}")))?
        .header_len;
    let mut header_only = BytesMut::from(&wire[..header_len]);
    prop_assert_eq!(
        decode(&mut header_only, version, size - 1),
        Err(DecodeError::PacketTooLarge {
            size,
            max: size - 1
        })
    );
    if header_len < size {
        let mut header_only = BytesMut::from(&wire[..header_len]);
        prop_assert_eq!(decode(&mut header_only, version, size), Ok(None));
        prop_assert_eq!(header_only.len(), header_len);
    }
    let mut whole = wire;
    prop_assert_eq!(decode(&mut whole, version, size), Ok(Some(p)));
    prop_assert!(whole.is_empty());
    Ok(())
}

/// Remaining lengths on either side of each boundary of the variable byte
/// integer (1 to 2, 2 to 3 and 3 to 4 bytes).
fn remaining_len_near_boundary() -> impl Strategy<Value = usize> {
    prop_oneof![
        126usize..=129,
        16_382usize..=16_385,
        2_097_150usize..=2_097_153
    ]
}

/// A PUBLISH whose payload is sized so the remaining length is `target` (or as
/// close as the topic and properties allow). The payload is one repeated byte:
/// drawing two megabytes byte by byte would make the test slow, and the payload
/// bytes are opaque to the codec anyway.
fn publish_with_remaining_len(version: ProtocolVersion) -> impl Strategy<Value = (Packet, usize)> {
    (
        arbitrary::publish(version),
        remaining_len_near_boundary(),
        any::<u8>(),
    )
        .prop_map(move |(mut p, target, fill)| {
            p.payload = Bytes::new();
            let mut bare = BytesMut::new();
            p.encode(version, &mut bare).expect("valid packets encode");
            let bare_body = check(&bare, PACKET_BYTES_MAX)
                .expect("a whole valid frame")
                .remaining_len;
            p.payload = Bytes::from(vec![fill; target.saturating_sub(bare_body)]);
            let body = bare_body.max(target);
            (Packet::Publish(p), body)
        })
}

/// The properties every input must have: whole and chunked decoding agree (also
/// one byte at a time), and every packet accepted re-encodes to an equal packet.
fn assert_decodes_consistently(
    bytes: &[u8],
    cuts: &[Index],
    version: ProtocolVersion,
    max: usize,
) -> Result<(), TestCaseError> {
    let whole = decode_whole(bytes, version, max);
    let chunked = decode_chunked(bytes, &cut_points(bytes.len(), cuts), version, max);
    prop_assert_eq!(&chunked, &whole, "chunked vs whole, input {:02X?}", bytes);
    let bytewise = decode_chunked(bytes, &every_byte(bytes.len()), version, max);
    prop_assert_eq!(
        &bytewise,
        &whole,
        "byte at a time vs whole, input {:02X?}",
        bytes
    );
    for p in whole.packets {
        assert_roundtrip(p, version)?;
    }
    Ok(())
}

macro_rules! version_suite {
    ($module:ident, $version:expr) => {
        mod $module {
            use super::*;

            const V: ProtocolVersion = $version;

            proptest! {
                #[test]
                fn connect_roundtrips(p in arbitrary::connect(V)) {
                    assert_roundtrip(p.into(), V)?;
                }

                #[test]
                fn connack_roundtrips(p in arbitrary::connack(V)) {
                    assert_roundtrip(p.into(), V)?;
                }

                #[test]
                fn publish_roundtrips(p in arbitrary::publish(V)) {
                    assert_roundtrip(p.into(), V)?;
                }

                #[test]
                fn puback_roundtrips(p in arbitrary::puback(V)) {
                    assert_roundtrip(p.into(), V)?;
                }

                #[test]
                fn pubrec_roundtrips(p in arbitrary::pubrec(V)) {
                    assert_roundtrip(p.into(), V)?;
                }

                #[test]
                fn pubrel_roundtrips(p in arbitrary::pubrel(V)) {
                    assert_roundtrip(p.into(), V)?;
                }

                #[test]
                fn pubcomp_roundtrips(p in arbitrary::pubcomp(V)) {
                    assert_roundtrip(p.into(), V)?;
                }

                #[test]
                fn subscribe_roundtrips(p in arbitrary::subscribe(V)) {
                    assert_roundtrip(p.into(), V)?;
                }

                #[test]
                fn suback_roundtrips(p in arbitrary::suback(V)) {
                    assert_roundtrip(p.into(), V)?;
                }

                #[test]
                fn unsubscribe_roundtrips(p in arbitrary::unsubscribe(V)) {
                    assert_roundtrip(p.into(), V)?;
                }

                #[test]
                fn unsuback_roundtrips(p in arbitrary::unsuback(V)) {
                    assert_roundtrip(p.into(), V)?;
                }

                #[test]
                fn disconnect_roundtrips(p in arbitrary::disconnect(V)) {
                    assert_roundtrip(p.into(), V)?;
                }

                #[test]
                fn any_packet_roundtrips(p in arbitrary::packet(V)) {
                    assert_roundtrip(p, V)?;
                }

                #[test]
                fn streamed_packets_decode_as_when_whole(
                    packets in vec(arbitrary::packet(V), 1..8),
                    cuts in cuts(),
                ) {
                    let mut wire = BytesMut::new();
                    for p in &packets {
                        encode_into(p, V, &mut wire)?;
                    }
                    let whole = decode_whole(&wire, V, PACKET_BYTES_MAX);
                    prop_assert_eq!(
                        &whole,
                        &Outcome { packets, end: End::Pending(Bytes::new()) }
                    );
                    let chunked =
                        decode_chunked(&wire, &cut_points(wire.len(), &cuts), V, PACKET_BYTES_MAX);
                    prop_assert_eq!(&chunked, &whole);
                    let bytewise =
                        decode_chunked(&wire, &every_byte(wire.len()), V, PACKET_BYTES_MAX);
                    prop_assert_eq!(&bytewise, &whole);
                }

                #[test]
                fn oversize_is_refused_from_the_fixed_header(p in arbitrary::packet(V)) {
                    assert_oversize_refused(p, V)?;
                }

                #[test]
                fn arbitrary_bytes_decode_consistently(
                    bytes in vec(any::<u8>(), 0..512),
                    cuts in cuts(),
                    max in max_packet_size(),
                ) {
                    assert_decodes_consistently(&bytes, &cuts, V, max)?;
                }

                #[test]
                fn random_bodies_decode_consistently(
                    frames in vec(framed_random_body(), 1..4),
                    cuts in cuts(),
                    max in max_packet_size(),
                ) {
                    assert_decodes_consistently(&frames.concat(), &cuts, V, max)?;
                }

                #[test]
                fn damaged_encodings_decode_consistently(
                    frames in vec(damaged_encoding(V), 1..4),
                    cuts in cuts(),
                ) {
                    assert_decodes_consistently(&frames.concat(), &cuts, V, PACKET_BYTES_MAX)?;
                }
            }

            proptest! {
                // Up to 2 MiB per case: fewer cases keep the file fast in debug.
                #![proptest_config(ProptestConfig::with_cases(24))]

                #[test]
                fn large_publish_frames_like_small_ones(
                    (p, body_len) in publish_with_remaining_len(V),
                    cuts in cuts(),
                ) {
                    let wire = encode(&p, V)?;
                    let expected_header_len = 1 + varint_len(body_len as u32);
                    prop_assert_eq!(wire.len(), expected_header_len + body_len);
                    assert_roundtrip(p.clone(), V)?;
                    assert_oversize_refused(p.clone(), V)?;
                    let chunked =
                        decode_chunked(&wire, &cut_points(wire.len(), &cuts), V, PACKET_BYTES_MAX);
                    prop_assert!(
                        chunked == Outcome { packets: vec![p], end: End::Pending(Bytes::new()) },
                        "chunked decoding of a {}-byte PUBLISH differs", wire.len()
                    );
                }
            }
        }
    };
}

version_suite!(v3_1, ProtocolVersion::V3_1);
version_suite!(v3_1_1, ProtocolVersion::V3_1_1);
version_suite!(v5, ProtocolVersion::V5);

proptest! {
    #[test]
    fn auth_roundtrips_in_v5(p in arbitrary::auth()) {
        assert_roundtrip(p.into(), ProtocolVersion::V5)?;
    }

    /// A CONNECT carries its own version; decoding it does not depend on the
    /// version the connection assumed before it arrived.
    #[test]
    fn connect_decodes_whatever_the_connection_version(
        connect in arbitrary::protocol_version().prop_flat_map(arbitrary::connect),
        assumed in arbitrary::protocol_version(),
    ) {
        let own = connect.version;
        let p = Packet::from(connect);
        let mut buf = encode(&p, own)?;
        prop_assert_eq!(decode(&mut buf, assumed, PACKET_BYTES_MAX), Ok(Some(p)));
    }
}
