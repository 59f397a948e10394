//! Multi-stream mode (EMQX 5.0.18+) on the endpoint thread, sans-IO: cutting
//! each stream's bytes into whole MQTT packets ([`Framer`]) so packets of
//! several streams can be merged into the one byte stream a shard reads, and
//! sending each packet the shard writes back on the right stream
//! ([`Router`]).
//!
//! The rules (EMQX's): an acknowledgement (PUBACK, PUBREC, PUBCOMP, SUBACK,
//! UNSUBACK) goes back on the stream that carried the packet it answers; a
//! delivery goes on the stream that carried the SUBSCRIBE whose filter it
//! matches, and its PUBREL follows it there; everything else (CONNACK,
//! PINGRESP, DISCONNECT, AUTH, deliveries of filters subscribed on the first
//! stream) goes on the first stream. Only packets of data streams are decoded
//! here; the first stream's packets are only cut at their boundaries, so a
//! single-stream client costs a fixed-header scan per packet and nothing else.
//!
//! Bounds: the maps hold at most one entry per packet identifier (65,535) and
//! one per subscribed filter of a data stream (`FILTERS_MAX`, beyond which
//! the oldest is forgotten and its deliveries go on the first stream).

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use tessera_proto::{DecodeError, PACKET_BYTES_MAX, Packet, PacketType, ProtocolVersion, Str};

/// A stream of one connection: 0 is the first (MQTT) stream.
pub type StreamNo = u64;

/// Filters of data streams remembered for routing deliveries.
const FILTERS_MAX: usize = 1024;

/// Cuts a byte stream into whole MQTT packets.
#[derive(Debug, Default)]
pub struct Framer {
    partial: BytesMut,
}

/// The length of the whole packets at the start of `buf`.
fn whole_len(buf: &[u8]) -> Result<usize, DecodeError> {
    let mut at = 0;
    while at < buf.len() {
        match tessera_proto::check(&buf[at..], PACKET_BYTES_MAX) {
            Ok(h) if at + h.frame_len() <= buf.len() => at += h.frame_len(),
            Ok(_) | Err(DecodeError::Incomplete { .. }) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}

impl Framer {
    /// Takes the next chunk of the stream; returns the whole packets now
    /// complete (several, back to back), keeping the start of an incomplete
    /// one. Without a packet split over chunks nothing is copied.
    pub fn push(&mut self, chunk: Bytes) -> Result<Option<Bytes>, DecodeError> {
        let whole = if self.partial.is_empty() {
            let n = whole_len(&chunk)?;
            let mut chunk = chunk;
            let whole = chunk.split_to(n);
            self.partial.extend_from_slice(&chunk);
            whole
        } else {
            self.partial.extend_from_slice(&chunk);
            let n = whole_len(&self.partial)?;
            self.partial.split_to(n).freeze()
        };
        Ok((!whole.is_empty()).then_some(whole))
    }

    /// Whether part of a packet is waiting for the rest.
    #[cfg(test)]
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }
}

/// Where the packets a shard writes go (see the module doc).
#[derive(Debug)]
pub struct Router {
    version: ProtocolVersion,
    /// The client's packet identifiers in flight -> the data stream that carried them.
    client_ids: HashMap<u16, StreamNo>,
    /// The broker's QoS 2 deliveries in flight -> the stream they went on.
    server_ids: HashMap<u16, StreamNo>,
    /// Filters subscribed on data streams, oldest first.
    filters: Vec<(Str, StreamNo)>,
    /// v5 topic aliases the broker set on deliveries -> their topic.
    aliases: HashMap<u16, Str>,
}

impl Router {
    /// A router for a connection of protocol `version`.
    pub fn new(version: ProtocolVersion) -> Router {
        Router {
            version,
            client_ids: HashMap::new(),
            server_ids: HashMap::new(),
            filters: Vec::new(),
            aliases: HashMap::new(),
        }
    }

    /// Records what the whole packets `frames` that arrived on data stream
    /// `stream` mean for routing. A packet the codec refuses is left for the
    /// shard to refuse (it closes the connection).
    pub fn inbound(&mut self, stream: StreamNo, frames: &Bytes) {
        let mut buf = BytesMut::from(&frames[..]);
        while let Ok(Some(packet)) = tessera_proto::decode(&mut buf, self.version, PACKET_BYTES_MAX)
        {
            match packet {
                Packet::Publish(p) if p.packet_id != 0 => {
                    self.client_ids.insert(p.packet_id, stream);
                }
                Packet::PubRel(r) => {
                    self.client_ids.insert(r.packet_id, stream);
                }
                Packet::Subscribe(s) => {
                    self.client_ids.insert(s.packet_id, stream);
                    for sub in s.subscriptions {
                        self.filters.retain(|(f, _)| *f != sub.filter);
                        if self.filters.len() >= FILTERS_MAX {
                            self.filters.remove(0);
                        }
                        self.filters.push((sub.filter, stream));
                    }
                }
                Packet::Unsubscribe(u) => {
                    self.client_ids.insert(u.packet_id, stream);
                    self.filters.retain(|(f, _)| !u.filters.contains(f));
                }
                _ => {}
            }
        }
    }

    /// Splits whole packets the shard wrote into packets with their stream,
    /// in order (slices of `frames`, no copy).
    pub fn outbound(&mut self, frames: Bytes) -> Vec<(StreamNo, Bytes)> {
        let mut runs: Vec<(StreamNo, Bytes)> = Vec::new();
        let mut rest = frames;
        while !rest.is_empty() {
            let len = match tessera_proto::check(&rest, PACKET_BYTES_MAX) {
                Ok(h) if h.frame_len() <= rest.len() => h.frame_len(),
                // Not whole packets (never from a shard): the first stream.
                _ => rest.len(),
            };
            let frame = rest.split_to(len);
            let stream = self.route(&frame);
            runs.push((stream, frame));
        }
        runs
    }

    fn route(&mut self, frame: &Bytes) -> StreamNo {
        let Ok(h) = tessera_proto::check(frame, PACKET_BYTES_MAX) else {
            return 0;
        };
        let body = &frame[h.header_len..];
        let id = || (body.len() >= 2).then(|| u16::from_be_bytes([body[0], body[1]]));
        match h.packet_type {
            PacketType::PubAck
            | PacketType::PubComp
            | PacketType::SubAck
            | PacketType::UnsubAck => id().and_then(|id| self.client_ids.remove(&id)).unwrap_or(0),
            PacketType::PubRec => id()
                .and_then(|id| self.client_ids.get(&id).copied())
                .unwrap_or(0),
            PacketType::PubRel => id().and_then(|id| self.server_ids.remove(&id)).unwrap_or(0),
            PacketType::Publish => self.route_delivery(frame),
            _ => 0,
        }
    }

    fn route_delivery(&mut self, frame: &Bytes) -> StreamNo {
        if self.filters.is_empty() {
            return 0;
        }
        let mut buf = BytesMut::from(&frame[..]);
        let Ok(Some(Packet::Publish(p))) =
            tessera_proto::decode(&mut buf, self.version, PACKET_BYTES_MAX)
        else {
            return 0;
        };
        let alias = p.properties.topic_alias;
        let topic = match (p.topic.is_empty(), alias) {
            (true, Some(a)) => match self.aliases.get(&a) {
                Some(t) => t.clone(),
                None => return 0,
            },
            (false, Some(a)) => {
                self.aliases.insert(a, p.topic.clone());
                p.topic.clone()
            }
            _ => p.topic.clone(),
        };
        let stream = self
            .filters
            .iter()
            .rev()
            .find(|(f, _)| tessera_proto::topic::matches(f.as_str(), topic.as_str()))
            .map_or(0, |(_, s)| *s);
        if p.qos == tessera_proto::QoS::ExactlyOnce && p.packet_id != 0 {
            self.server_ids.insert(p.packet_id, stream);
        }
        stream
    }
}

/// Reads the protocol version from a CONNECT at the start of `frames`.
pub fn connect_version(frames: &Bytes) -> Option<ProtocolVersion> {
    let mut buf = BytesMut::from(&frames[..]);
    match tessera_proto::decode(&mut buf, ProtocolVersion::V3_1_1, PACKET_BYTES_MAX) {
        Ok(Some(Packet::Connect(c))) => Some(c.version),
        _ => None,
    }
}

/// Whether whole packets `frames` start with a CONNACK.
pub fn starts_with_connack(frames: &[u8]) -> bool {
    frames.first().is_some_and(|b| b >> 4 == 2)
}

#[cfg(test)]
mod tests {
    //! Goal: packets are cut exactly at their boundaries however the bytes
    //! arrive, and each packet the broker writes goes to the stream the rules
    //! name. Method: packets encoded with the codec, fed in pieces.

    use super::*;
    use tessera_proto::{
        Encode, PubAck, PubRel, Publish, QoS, Subscribe, Subscription, SubscriptionOptions,
    };

    fn enc(p: &Packet, v: ProtocolVersion) -> Bytes {
        let mut out = BytesMut::new();
        p.encode(v, &mut out).unwrap();
        out.freeze()
    }

    fn publish(topic: &str, qos: QoS, id: u16) -> Packet {
        let mut p = Publish::new(Str::try_from(topic).unwrap(), Bytes::from_static(b"x"));
        p.qos = qos;
        p.packet_id = id;
        Packet::Publish(p)
    }

    #[test]
    fn framer_cuts_whole_packets_from_any_split() {
        let v = ProtocolVersion::V3_1_1;
        let mut all = BytesMut::new();
        for k in 0..5u16 {
            all.extend_from_slice(&enc(&publish("a/b", QoS::AtLeastOnce, k + 1), v));
            all.extend_from_slice(&enc(&Packet::PingReq, v));
        }
        let all = all.freeze();
        for step in [1, 2, 3, 7, 100] {
            let mut f = Framer::default();
            let mut out = BytesMut::new();
            let mut rest = all.clone();
            while !rest.is_empty() {
                let n = step.min(rest.len());
                let chunk = rest.split_to(n);
                if let Some(whole) = f.push(chunk).unwrap() {
                    assert_eq!(whole_len(&whole).unwrap(), whole.len());
                    out.extend_from_slice(&whole);
                }
            }
            assert_eq!(&out[..], &all[..], "step {step}");
            assert!(!f.has_partial());
        }
        let mut f = Framer::default();
        assert!(f.push(Bytes::from_static(&[0x00, 0x00])).is_err());
    }

    #[test]
    fn acks_and_deliveries_go_to_their_streams() {
        let v = ProtocolVersion::V5;
        let mut r = Router::new(v);
        let sub = Packet::Subscribe(Subscribe {
            packet_id: 3,
            properties: Default::default(),
            subscriptions: vec![Subscription {
                filter: Str::try_from("s/#").unwrap(),
                options: SubscriptionOptions::qos(QoS::ExactlyOnce),
            }],
        });
        r.inbound(2, &enc(&sub, v));
        r.inbound(1, &enc(&publish("p", QoS::AtLeastOnce, 9), v));
        let suback = Packet::SubAck(tessera_proto::SubAck {
            packet_id: 3,
            properties: Default::default(),
            reason_codes: vec![tessera_proto::ReasonCode::GrantedQoS2],
        });
        let mut out = BytesMut::new();
        out.extend_from_slice(&enc(&Packet::PubAck(PubAck::new(9)), v));
        out.extend_from_slice(&enc(&suback, v));
        out.extend_from_slice(&enc(&publish("s/x", QoS::ExactlyOnce, 40), v));
        out.extend_from_slice(&enc(&publish("other", QoS::AtMostOnce, 0), v));
        out.extend_from_slice(&enc(&Packet::PingResp, v));
        let runs = r.outbound(out.freeze());
        let streams: Vec<StreamNo> = runs.iter().map(|(s, _)| *s).collect();
        assert_eq!(streams, [1, 2, 2, 0, 0]);
        // The PUBREL of the QoS 2 delivery follows it to stream 2.
        let runs = r.outbound(enc(&Packet::PubRel(PubRel::new(40)), v));
        assert_eq!(runs[0].0, 2);
        // Answered ids are forgotten: the same id from the first stream later
        // is answered there.
        let runs = r.outbound(enc(&Packet::PubAck(PubAck::new(9)), v));
        assert_eq!(runs[0].0, 0);
        assert!(starts_with_connack(&[0x20, 0x02, 0, 0]));
        let connect = enc(
            &Packet::Connect(Box::new(tessera_proto::Connect {
                version: v,
                clean_start: true,
                keep_alive: 30,
                client_id: Str::try_from("m").unwrap(),
                will: None,
                username: None,
                password: None,
                properties: Default::default(),
            })),
            v,
        );
        assert_eq!(connect_version(&connect), Some(v));
    }
}
