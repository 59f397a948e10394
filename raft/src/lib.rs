//! `tessera-raft`: the cluster control plane (docs/ARCHITECTURE.md "Cluster").
//!
//! One raft group (openraft 0.9, storage v2) orders MQTT-aware ops: session claims with
//! fencing epochs, per-node routes (with shared-group membership; a node's aggregated
//! route changes travel as one `RouteDeltas` op), the retained index and
//! node metadata. Ops from every shard are batched into one log entry per window (one
//! fsync), applied deterministically into LMDB tables that every node holds identically,
//! and broadcast to the shards' replica tables.
//!
//! # API (for the broker and the QUIC link)
//!
//! ```text
//! // On the control thread (a tokio runtime the broker owns; quinn runs there too):
//! let mut cfg = ClusterConfig::new(node_id, data_dir, NodeInfo { cluster_addr, mqtt_addr,
//!                                  admin_addr, shards });
//! cfg.initial_voters = peers;                    // --cluster-peers (empty when joining)
//! cfg.validate()?;                               // ConfigError names `cluster.<field>`
//! let (cp, service) = ControlPlane::start(cfg, transport).await?;  // StartError: exit 2
//! link.serve_with(service);                      // incoming requests -> Service::serve
//! if joining { cp.join(seed_node_id).await?; }   // learner, catch up, voter
//!
//! // On every glommio shard (ClusterHandle: Clone + Send + Sync, never blocks):
//! let h = cp.handle();
//! let pending = h.propose(Op::ClaimSession { client_id, node })?; // Err(Busy): counted
//! let Applied { index, result } = pending.wait().await?;  // a oneshot: any executor
//! let events = h.subscribe(4096);        // AppliedEvent::{Entry, SnapshotInstalled}
//! let view = h.tables()?;                // LMDB read view: owner(), routes(), retained()
//! h.applied_index();                     // what this node's tables reflect
//!
//! // Operator surface (admin API, brokerctl):
//! cp.status(); cp.cluster_status().await; cp.metrics();
//! cp.add_learner(id, info).await; cp.promote(id).await; cp.remove(id).await;
//! cp.transfer_leader(id).await; cp.leave().await; cp.shutdown().await;
//! ```
//!
//! - [`ControlPlane::start`] validates the config, opens `data_dir/raft/` and refuses,
//!   changing nothing, a data dir of another node id ([`StartError::NodeIdMismatch`]), a
//!   peer list that differs from the one the cluster was created with
//!   ([`StartError::PeersMismatch`]), a corrupt or incompatible store, or one locked by
//!   another process. A fresh node listed in `initial_voters` initializes the cluster
//!   (every initial node does; raft makes it one membership); a restarted node resumes.
//! - The link implements [`Transport`] (client) and dispatches to the returned
//!   [`Service`] (server) with the peer id taken from its certificate. The link's
//!   address book: `initial_voters`, then [`ClusterHandle::members`] for nodes added
//!   later. Messages are at most [`network::RPC_BYTES_MAX`] bytes. `--join ADDR` knows an
//!   address, not an id: connect, read the peer's id from its certificate, then call
//!   [`ControlPlane::join`] with that id. [`Channel::Forward`] requests go to whatever
//!   the data plane registers with [`ControlPlane::serve_forward`].
//! - [`ClusterHandle::propose`] returns at once; a [`PendingOp`] is answered within
//!   `proposal_timeout_ms` (retries across leader changes reuse the batch's idempotency
//!   key, so an op is never applied twice). A [`ClusterError::Unavailable`] is the
//!   "no quorum" answer (CONNACK 0x88 / 0x03).
//! - [`ClusterStatus::ready`] is `/ready`: a voter that knows a leader, heard from it
//!   within three heartbeats (the leader itself: always), and has applied everything it
//!   knows committed.
//!
//! # Modules
//! - [`transport`]: the seam between raft and the wire (request/response on named
//!   channels between node ids); [`memnet`]: an in-memory implementation with seeded
//!   faults (tests, simulation, benchmarks).
//! - [`link`]: the QUIC link between nodes (quinn, mutual TLS with the cluster CA): one
//!   connection per peer, a stream per channel, framed requests with ids, timeouts,
//!   reconnects with back-off, peer statistics; and the cluster certificates
//!   ([`link::certs`]).
//! - [`types`]: openraft's type configuration and [`NodeInfo`].
//! - [`op`]: the ops, batches (one batch = one log entry), results, limits.
//! - [`store`]: heed storage: log, vote, committed index, the state machine's tables
//!   ([`store::stm`]) and chunked rkyv snapshots, under `data_dir/raft/`.
//! - [`network`] (openraft's client side over the transport), [`service`] (the server
//!   side), [`rpc`] (the messages and their validated decoding).
//! - [`control`]: [`ControlPlane`], [`ClusterHandle`], the batcher, membership.
//! - [`config`], [`status`], [`metrics`]: settings, status and metric values.
//!
//! What it does not do: it never touches a glommio shard's state (shards reach it only
//! through bounded channels); it does not forward publishes (the data plane's
//! [`Channel::Forward`]); the QUIC link ([`link`]) is the [`Transport`] between processes.

pub mod config;
pub mod control;
pub mod link;
pub mod memnet;
pub mod metrics;
pub mod network;
pub mod op;
pub mod rpc;
pub mod service;
pub mod status;
pub mod store;
pub mod transport;
pub mod types;

pub use config::{ClusterConfig, ConfigError};
pub use control::{Applied, ClusterError, ClusterHandle, ControlPlane, PendingOp, StartError};
pub use metrics::{ClusterMetrics, HistogramSnapshot};
pub use op::{Op, OpResult, Owner, RouteChange};
pub use status::{ClusterStatus, MemberStatus, Role};
pub use store::stm::{AppliedEntry, AppliedEvent, TablesView};
pub use transport::{Channel, NodeId, Service, Transport, TransportError};
pub use types::NodeInfo;
