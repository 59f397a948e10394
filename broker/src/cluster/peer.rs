//! The data plane's requests between nodes, over the link's [`Channel::Forward`]
//! stream (issue 15), and how they reach a shard.
//!
//! Shards run on glommio, the link on the control thread's tokio runtime, so both ways go
//! through bounded flume channels:
//! - **Outgoing**: a shard calls [`PeerCalls::call`] (never blocks: a full queue is
//!   `Err(Busy)`, counted, and the caller answers its client). The control thread sends
//!   the request on the link and answers on the returned receiver, within the link's
//!   timeout.
//! - **Incoming**: [`ForwardService`] (registered with `ControlPlane::serve_forward`)
//!   reads the request's envelope and queues it for one shard; the shard answers on the
//!   request's reply channel. A full shard queue answers the peer with an error at once.
//!
//! The envelope: `kind u8 | key_len u16 BE | key | body`. The key picks the shard: a
//! ClientID is served by the shard that owns it (`shard_for`), an empty key by a shard
//! chosen by the sending node's id, so everything one node sends without a key is served
//! in order by one shard. Bytes from a peer are untrusted: a short envelope, an unknown
//! kind or a key that is not UTF-8 is answered with an error, never a panic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use tessera_raft::transport::BoxFuture;
use tessera_raft::{Channel, NodeId, Service, TransportError};

/// Calls queued from the shards to the control thread at most.
pub const PEER_CALLS_QUEUED_MAX: usize = 4096;
/// Requests from peers queued for one shard at most.
pub const PEER_REQUESTS_QUEUED_MAX: usize = 4096;
/// Longest envelope key (a ClientID is at most 65,535 bytes in MQTT).
pub const KEY_BYTES_MAX: usize = u16::MAX as usize;

/// What a request on the Forward channel is about. A node answers a kind it does not
/// serve with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PeerKind {
    /// Session ownership: a takeover's fetch of a session (keyed by ClientID).
    Session = 1,
    /// Forwarded publishes and their acknowledgements.
    Publish = 2,
    /// A retained message too large for the log, fetched from the node that keeps it
    /// (keyed by its topic).
    Retained = 3,
}

impl PeerKind {
    /// The kind of a wire tag, `None` for a tag this version does not know.
    pub fn from_u8(tag: u8) -> Option<PeerKind> {
        match tag {
            1 => Some(PeerKind::Session),
            2 => Some(PeerKind::Publish),
            3 => Some(PeerKind::Retained),
            _ => None,
        }
    }
}

/// Encodes a request envelope.
pub fn encode_envelope(kind: PeerKind, key: &[u8], body: &[u8]) -> Bytes {
    let key = &key[..key.len().min(KEY_BYTES_MAX)];
    let mut out = BytesMut::with_capacity(3 + key.len() + body.len());
    out.put_u8(kind as u8);
    out.put_u16(key.len() as u16);
    out.put_slice(key);
    out.put_slice(body);
    out.freeze()
}

/// A decoded envelope: the kind, the key and the body (slices of the request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// What it is about.
    pub kind: PeerKind,
    /// The routing key (a ClientID, or empty).
    pub key: String,
    /// The kind's own encoding.
    pub body: Bytes,
}

/// Decodes a request envelope from a peer.
pub fn decode_envelope(mut request: Bytes) -> Result<Envelope, String> {
    if request.len() < 3 {
        return Err(format!("envelope of {} bytes is too short", request.len()));
    }
    let kind = PeerKind::from_u8(request[0])
        .ok_or_else(|| format!("unknown forward request kind {}", request[0]))?;
    let key_len = usize::from(u16::from_be_bytes([request[1], request[2]]));
    if request.len() < 3 + key_len {
        return Err(format!(
            "envelope key of {key_len} bytes exceeds the {} bytes sent",
            request.len()
        ));
    }
    let key = std::str::from_utf8(&request[3..3 + key_len])
        .map_err(|_| "envelope key is not UTF-8".to_owned())?
        .to_owned();
    let body = request.split_off(3 + key_len);
    Ok(Envelope { kind, key, body })
}

/// A request from a peer, queued for a shard.
#[derive(Debug)]
pub struct PeerRequest {
    /// The authenticated sender.
    pub from: NodeId,
    /// The request.
    pub envelope: Envelope,
    /// Where the shard answers (the peer gets `Err` as a refused request).
    pub reply: flume::Sender<Result<Bytes, String>>,
}

/// Which shard serves a request: a ClientID's owner shard, else one per sending node.
pub fn shard_of_request(from: NodeId, key: &str, shard_count: usize) -> usize {
    if key.is_empty() {
        (from as usize) % shard_count.max(1)
    } else {
        tessera_shard::hash::shard_for(key.as_bytes(), shard_count)
    }
}

/// The [`Service`] of the Forward channel: queues each request for its shard.
#[derive(Debug)]
pub struct ForwardService {
    shards: Vec<flume::Sender<PeerRequest>>,
    /// Requests refused because the shard's queue was full.
    pub refused_busy: AtomicU64,
}

impl ForwardService {
    /// A service feeding these shard queues (index = shard id).
    pub fn new(shards: Vec<flume::Sender<PeerRequest>>) -> ForwardService {
        ForwardService {
            shards,
            refused_busy: AtomicU64::new(0),
        }
    }
}

impl Service for ForwardService {
    fn serve(
        &self,
        from: NodeId,
        channel: Channel,
        request: Bytes,
    ) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            if channel != Channel::Forward {
                return Err(format!(
                    "the data plane does not serve the {channel} channel"
                ));
            }
            let envelope = decode_envelope(request)?;
            let shard = shard_of_request(from, &envelope.key, self.shards.len());
            let (reply, answer) = flume::bounded(1);
            let req = PeerRequest {
                from,
                envelope,
                reply,
            };
            match self.shards.get(shard).map(|tx| tx.try_send(req)) {
                Some(Ok(())) => {}
                Some(Err(flume::TrySendError::Full(_))) => {
                    self.refused_busy.fetch_add(1, Ordering::Relaxed);
                    return Err(format!("shard {shard} is busy"));
                }
                _ => return Err("the broker is shutting down".into()),
            }
            answer
                .recv_async()
                .await
                .map_err(|_| "the shard dropped the request".to_owned())?
        })
    }
}

/// A call from a shard to another node, for the control thread.
#[derive(Debug)]
pub struct PeerCall {
    /// The node.
    pub to: NodeId,
    /// The request (an envelope).
    pub request: Bytes,
    /// The answer.
    pub reply: flume::Sender<Result<Bytes, TransportError>>,
}

/// The shards' way to call another node: `Clone + Send`, never blocks.
#[derive(Debug, Clone)]
pub struct PeerCalls {
    tx: flume::Sender<PeerCall>,
    busy: Arc<AtomicU64>,
}

/// The call queue was full (the control thread is behind); counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the cluster link's call queue is full")]
pub struct PeerBusy;

impl PeerCalls {
    /// A call queue of `capacity` and its receiving end (for the control thread).
    pub fn new(capacity: usize) -> (PeerCalls, flume::Receiver<PeerCall>) {
        let (tx, rx) = flume::bounded(capacity);
        (
            PeerCalls {
                tx,
                busy: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    /// Queues `request` for node `to`; the receiver gets the answer (or the link's
    /// error) within the link's timeout.
    pub fn call(
        &self,
        to: NodeId,
        request: Bytes,
    ) -> Result<flume::Receiver<Result<Bytes, TransportError>>, PeerBusy> {
        let (reply, answer) = flume::bounded(1);
        match self.tx.try_send(PeerCall { to, request, reply }) {
            Ok(()) => Ok(answer),
            Err(_) => {
                self.busy.fetch_add(1, Ordering::Relaxed);
                Err(PeerBusy)
            }
        }
    }

    /// Calls refused because the queue was full.
    pub fn busy_count(&self) -> u64 {
        self.busy.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_bad_ones_are_errors() {
        let e = encode_envelope(PeerKind::Session, b"client-1", b"body");
        let d = decode_envelope(e).unwrap();
        assert_eq!(d.kind, PeerKind::Session);
        assert_eq!(d.key, "client-1");
        assert_eq!(&d.body[..], b"body");
        let empty = decode_envelope(encode_envelope(PeerKind::Publish, b"", b"")).unwrap();
        assert_eq!((empty.key.as_str(), empty.body.len()), ("", 0));
        assert!(decode_envelope(Bytes::from_static(&[1, 0])).is_err());
        assert!(decode_envelope(Bytes::from_static(&[9, 0, 0])).is_err());
        assert!(decode_envelope(Bytes::from_static(&[1, 0, 5, b'a'])).is_err());
        assert!(decode_envelope(Bytes::from_static(&[1, 0, 1, 0xff])).is_err());
    }

    #[test]
    fn a_client_id_goes_to_its_owner_shard_and_no_key_to_one_shard_per_node() {
        let key = "some-client";
        assert_eq!(
            shard_of_request(7, key, 4),
            tessera_shard::hash::shard_for(key.as_bytes(), 4)
        );
        assert_eq!(shard_of_request(5, "", 4), shard_of_request(5, "", 4));
        assert!(shard_of_request(u64::MAX, "", 3) < 3);
    }
}
