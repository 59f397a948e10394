//! The checks shared by the codec's fuzz targets.
//!
//! Each target feeds arbitrary bytes to `tessera_proto::decode` the way a
//! connection does (a read buffer holding a stream of frames, decoded until it
//! needs more bytes or fails) and checks properties that must hold for every
//! input:
//! - decoding never panics and never returns `Incomplete` as an error (that is
//!   `Ok(None)`), and every error has a reason code to send;
//! - a decoded frame is never larger than the maximum packet size;
//! - a decoded packet re-encodes in the connection's version to exactly
//!   `encoded_len` bytes, and decoding that gives the same packet back. The first
//!   encoding is not compared with the input: the input may be a non-canonical
//!   form (a v5 PUBACK that spells out reason Success and an empty property
//!   section, properties in another order), but the encoder's own output is
//!   canonical, so encoding the packet decoded from it gives the same bytes;
//! - decoding a stream in two chunks gives what decoding it whole gives.
//!
//! A decoded CONNECT carries its own protocol version and encodes in it whatever
//! the connection's version is; the checks rely on that rather than assume the
//! packet's version is the connection's.
//!
//! What it does not do: no assumptions about which inputs are valid; those are
//! the unit and property tests' job.

use bytes::BytesMut;
use tessera_proto::{
    DecodeError, Encode, EncodeError, PACKET_BYTES_MAX, Packet, ProtocolVersion, decode,
};

/// A small maximum packet size, so that `PacketTooLarge` is reached often.
pub const PACKET_BYTES_SMALL: usize = 64;

/// Every protocol version the codec speaks.
pub const VERSIONS: [ProtocolVersion; 3] = [
    ProtocolVersion::V3_1,
    ProtocolVersion::V3_1_1,
    ProtocolVersion::V5,
];

/// The packets a stream decoded to, in order, and how decoding stopped.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    /// The packets decoded before decoding stopped.
    pub packets: Vec<Packet>,
    /// Why decoding stopped.
    pub end: End,
}

/// How decoding a stream stopped.
#[derive(Debug, PartialEq)]
pub enum End {
    /// `Ok(None)`: these bytes are left, waiting for the rest of a frame.
    NeedMore(Vec<u8>),
    /// The connection would be closed with this error.
    Failed(DecodeError),
}

/// Decodes the next packet from `buf` and checks what must hold for any input.
pub fn decode_checked(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let before = buf.len();
    let result = decode(buf, version, max_packet_size);
    let consumed = before - buf.len();
    match &result {
        Ok(Some(_)) => assert!(
            consumed <= max_packet_size,
            "decoded a {consumed}-byte frame over the {max_packet_size}-byte limit"
        ),
        Ok(None) => assert_eq!(consumed, 0, "Ok(None) consumed bytes"),
        Err(e) => {
            assert!(
                !e.is_incomplete(),
                "decode returned {e:?} instead of Ok(None)"
            );
            assert!(e.reason_code().is_some(), "{e:?} has no reason code");
        }
    }
    result
}

/// Decodes packets from the front of `buf` until it needs more bytes or fails,
/// pushing them onto `packets`. Returns the error, if decoding failed.
pub fn decode_available(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
    packets: &mut Vec<Packet>,
) -> Option<DecodeError> {
    loop {
        match decode_checked(buf, version, max_packet_size) {
            Ok(Some(p)) => packets.push(p),
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

/// Decodes `data` as one stream, whole.
pub fn decode_stream(data: &[u8], version: ProtocolVersion, max_packet_size: usize) -> Outcome {
    let mut buf = BytesMut::from(data);
    let mut packets = Vec::new();
    let end = match decode_available(&mut buf, version, max_packet_size, &mut packets) {
        Some(e) => End::Failed(e),
        None => End::NeedMore(buf.to_vec()),
    };
    Outcome { packets, end }
}

/// Decodes `data` as a connection receiving it in two reads, split at `at`.
pub fn decode_stream_split(
    data: &[u8],
    at: usize,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Outcome {
    let (first, second) = data.split_at(at);
    let mut buf = BytesMut::from(first);
    let mut packets = Vec::new();
    if let Some(e) = decode_available(&mut buf, version, max_packet_size, &mut packets) {
        return Outcome {
            packets,
            end: End::Failed(e),
        };
    }
    buf.extend_from_slice(second);
    let end = match decode_available(&mut buf, version, max_packet_size, &mut packets) {
        Some(e) => End::Failed(e),
        None => End::NeedMore(buf.to_vec()),
    };
    Outcome { packets, end }
}

/// Encodes `packet` in `version`, checking that it writes exactly `encoded_len`
/// bytes, or the encoder's refusal of the packet in this version.
pub fn encode_checked(packet: &Packet, version: ProtocolVersion) -> Result<BytesMut, EncodeError> {
    let len = packet.encoded_len(version);
    let mut buf = BytesMut::new();
    packet.encode(version, &mut buf)?;
    assert_eq!(
        buf.len(),
        len,
        "encoded_len disagrees with encode for {packet:?} in {version}"
    );
    Ok(buf)
}

/// Decodes exactly one whole frame, which must be all of `wire`.
fn decode_one(wire: &BytesMut, version: ProtocolVersion, what: &dyn std::fmt::Debug) -> Packet {
    let mut buf = wire.clone();
    let packet = match decode_checked(&mut buf, version, PACKET_BYTES_MAX) {
        Ok(Some(p)) => p,
        other => panic!("{what:?} encoded in {version} as {wire:02X?} decodes to {other:?}"),
    };
    assert!(
        buf.is_empty(),
        "{what:?} in {version}: {} bytes left after the frame",
        buf.len()
    );
    packet
}

/// Checks that a packet decoded on a `version` connection survives encoding in
/// `version` and decoding again, and that the encoding is canonical.
pub fn assert_roundtrip(packet: &Packet, version: ProtocolVersion) {
    let wire = encode_checked(packet, version)
        .unwrap_or_else(|e| panic!("decoded {packet:?} does not encode in {version}: {e}"));
    let again = decode_one(&wire, version, packet);
    assert_eq!(&again, packet, "decode(encode(p)) != p in {version}");
    let rewire = encode_checked(&again, version).expect("re-encoding a round-tripped packet");
    assert_eq!(
        rewire, wire,
        "the encoding of {packet:?} in {version} is not canonical"
    );
}

/// Checks a packet decoded in one version and sent in another (a broker
/// forwarding a v5 PUBLISH to a 3.1.1 subscriber): the encoder may refuse it,
/// but what it writes must decode in `to` and be canonical there.
pub fn assert_cross_version(packet: &Packet, to: ProtocolVersion) {
    let Ok(wire) = encode_checked(packet, to) else {
        return;
    };
    let converted = decode_one(&wire, to, packet);
    let rewire = encode_checked(&converted, to).expect("re-encoding a converted packet");
    assert_eq!(
        rewire, wire,
        "{packet:?} converted to {to} is not canonical"
    );
}
