//! openraft's network over the [`Transport`] seam (the client side of the raft RPCs).
//!
//! Each RPC is one [`Transport::call`]: append-entries and votes on [`Channel::Raft`],
//! snapshot chunks on [`Channel::Snapshot`] (so a large snapshot never delays a
//! heartbeat). Every call is bounded by openraft's hard TTL. Transport failures map to
//! openraft's `Unreachable` (it backs off) or `NetworkError`; an error the peer's raft
//! returned comes back as a `RemoteError`.
//!
//! The server side is [`crate::service::RaftService`].

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::rpc::{self, RaftReply, RaftRequest, SnapshotReply};
use crate::transport::{Channel, NodeId, Transport, TransportError};
use crate::types::{NodeInfo, TypeConfig};

/// Largest RPC message this crate encodes or accepts, bytes. The link must carry
/// messages of this size on every channel (snapshot chunks are much smaller, see
/// `ClusterConfig::snapshot_chunk_bytes`; append-entries are bounded by
/// `max_payload_entries` x the largest batch).
pub const RPC_BYTES_MAX: usize = 64 << 20;

/// Makes one [`Peer`] per target node.
#[derive(Clone)]
pub struct Network {
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").finish_non_exhaustive()
    }
}

impl Network {
    /// The network over `transport`.
    pub fn new(transport: Arc<dyn Transport>) -> Network {
        Network { transport }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> Peer {
        Peer {
            transport: self.transport.clone(),
            target,
        }
    }
}

/// The raft client for one peer.
pub struct Peer {
    transport: Arc<dyn Transport>,
    target: NodeId,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("target", &self.target)
            .finish()
    }
}

/// Why an RPC got no usable answer, before it is typed for openraft.
enum CallError {
    Transport(TransportError),
    Timeout,
    BadReply(String),
}

impl CallError {
    fn into_rpc<E: std::error::Error>(self, target: NodeId) -> RPCError<NodeId, NodeInfo, E> {
        match self {
            CallError::Transport(
                e @ (TransportError::UnknownPeer(_)
                | TransportError::Unreachable { .. }
                | TransportError::Closed),
            ) => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::Transport(e) => RPCError::Network(NetworkError::new(&e)),
            CallError::Timeout => {
                RPCError::Unreachable(Unreachable::new(&TransportError::Timeout(target)))
            }
            CallError::BadReply(reason) => {
                RPCError::Network(NetworkError::new(&TransportError::Remote {
                    node: target,
                    reason,
                }))
            }
        }
    }
}

impl Peer {
    async fn call<R: serde::de::DeserializeOwned>(
        &self,
        channel: Channel,
        request: bytes::Bytes,
        ttl: Duration,
    ) -> Result<R, CallError> {
        let fut = self.transport.call(self.target, channel, request);
        let bytes = match tokio::time::timeout(ttl, fut).await {
            Err(_) => return Err(CallError::Timeout),
            Ok(Err(e)) => return Err(CallError::Transport(e)),
            Ok(Ok(b)) => b,
        };
        rpc::decode(&bytes).map_err(CallError::BadReply)
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let req = rpc::encode(&RaftRequest::Append(rpc));
        let target = self.target;
        match self
            .call::<RaftReply>(Channel::Raft, req, option.hard_ttl())
            .await
        {
            Ok(RaftReply::Append(Ok(r))) => Ok(r),
            Ok(RaftReply::Append(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(target, e)))
            }
            Ok(_) => Err(CallError::BadReply("reply of another kind".into()).into_rpc(target)),
            Err(e) => Err(e.into_rpc(target)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let req = rpc::encode(&rpc);
        let target = self.target;
        match self
            .call::<SnapshotReply>(Channel::Snapshot, req, option.hard_ttl())
            .await
        {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(target, e))),
            Err(e) => Err(e.into_rpc(target)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let req = rpc::encode(&RaftRequest::Vote(rpc));
        let target = self.target;
        match self
            .call::<RaftReply>(Channel::Raft, req, option.hard_ttl())
            .await
        {
            Ok(RaftReply::Vote(Ok(r))) => Ok(r),
            Ok(RaftReply::Vote(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(target, e))),
            Ok(_) => Err(CallError::BadReply("reply of another kind".into()).into_rpc(target)),
            Err(e) => Err(e.into_rpc(target)),
        }
    }
}
