//! The transport seam: how one node asks another for something and gets an answer.
//!
//! Everything raft sends between nodes is a request with one response: append-entries,
//! vote, snapshot chunks, and (in the data plane) batches of forwarded publishes. The
//! bytes are opaque here; each [`Channel`] has its own encoding owned by its user. Keeping
//! the seam this small lets the same raft code run over the QUIC link between processes
//! and over the in-memory network of the deterministic simulation.
//!
//! Bytes that arrive from a peer are untrusted input: a [`Service`] decodes and validates
//! them as it would a client's, and answers a malformed request with an error, never a
//! panic.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

/// A node's id in the cluster. Stable for the node's lifetime (it names the node's data
/// directory and certificate); `0` is not a valid id.
pub type NodeId = u64;

/// Which kind of traffic a request belongs to. Each channel maps to its own QUIC stream(s)
/// on the link between two nodes, so a large snapshot never delays a heartbeat and a burst
/// of forwarded publishes never delays a vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// Raft append-entries and vote RPCs, and small control requests.
    Raft = 1,
    /// Snapshot transfer (large, streamed in chunks).
    Snapshot = 2,
    /// Forwarded publishes and their acknowledgements (the data plane).
    Forward = 3,
    /// Operator requests forwarded to another node (e.g. to the leader).
    Admin = 4,
}

impl Channel {
    /// Every channel, in wire-tag order.
    pub const ALL: [Channel; 4] = [
        Channel::Raft,
        Channel::Snapshot,
        Channel::Forward,
        Channel::Admin,
    ];

    /// The channel for a wire tag, or `None` for a tag this version does not know.
    pub fn from_u8(tag: u8) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| *c as u8 == tag)
    }
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The peer is not known to this node (no address for it).
    #[error("node {0} is not a known peer")]
    UnknownPeer(NodeId),
    /// No connection to the peer could be made or kept (refused, unreachable, TLS failed).
    #[error("node {node} is unreachable: {reason}")]
    Unreachable { node: NodeId, reason: String },
    /// The peer did not answer in time.
    #[error("request to node {0} timed out")]
    Timeout(NodeId),
    /// The peer answered with an error (it could not decode or serve the request).
    #[error("node {node} refused the request: {reason}")]
    Remote { node: NodeId, reason: String },
    /// The request or response exceeded the channel's size bound.
    #[error("message of {0} bytes exceeds the channel's bound")]
    TooLarge(usize),
    /// This node's transport is shutting down.
    #[error("transport is shut down")]
    Closed,
}

/// A boxed future, as the [`Service`] trait returns (it must be object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The client side: send `request` on `channel` to node `to` and wait for its answer.
///
/// Implemented by the QUIC link (real processes) and by the simulation's network.
/// Implementations bound the time and the size of every exchange.
pub trait Transport: Send + Sync + 'static {
    /// One request, one response.
    fn call(
        &self,
        to: NodeId,
        channel: Channel,
        request: Bytes,
    ) -> BoxFuture<'_, Result<Bytes, TransportError>>;
}

/// The server side: what a node does with a request that arrived from node `from`.
///
/// `from` is the authenticated peer id (on the QUIC link it comes from the peer's
/// certificate, not from anything the peer says). An `Err` is sent back to the caller as
/// [`TransportError::Remote`].
pub trait Service: Send + Sync + 'static {
    /// Serve one request.
    fn serve(
        &self,
        from: NodeId,
        channel: Channel,
        request: Bytes,
    ) -> BoxFuture<'_, Result<Bytes, String>>;
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Channel::Raft => "raft",
            Channel::Snapshot => "snapshot",
            Channel::Forward => "forward",
            Channel::Admin => "admin",
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_tags_round_trip_and_unknown_tags_are_refused() {
        for c in Channel::ALL {
            assert_eq!(Channel::from_u8(c as u8), Some(c));
        }
        assert_eq!(Channel::from_u8(0), None);
        assert_eq!(Channel::from_u8(200), None);
    }
}
