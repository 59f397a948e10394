//! `tessera-raft`: the cluster control plane.
//!
//! Modules:
//! - [`transport`]: the seam between raft and the wire. Raft RPCs (and, later, forwarded
//!   publishes) are request/response byte exchanges on a named [`transport::Channel`]
//!   between two node ids. The QUIC link between nodes implements it for real processes;
//!   the deterministic simulation implements it in memory with partitions, delays and
//!   drops.
//! - [`link`]: the QUIC link between nodes (quinn, mutual TLS with the cluster CA): one
//!   connection per peer, a stream per channel, framed requests with ids, timeouts,
//!   reconnects with back-off, peer statistics; and the cluster certificates
//!   ([`link::certs`]).
//! - [`types`]: openraft's type configuration and [`types::NodeInfo`].
//! - [`op`]: the MQTT-aware ops, batches (one batch = one log entry), results.
//! - [`store`]: heed storage: log, vote, committed index, the state machine's tables and
//!   snapshots under `data_dir/raft/`.
//! - [`network`]: openraft's network over the transport, and the RPC service.
//!
//! What it does not do: it never touches a glommio shard's state. Shards reach the control
//! plane only through bounded channels and receive applied results the same way.

pub mod link;
pub mod network;
pub mod op;
pub mod store;
pub mod transport;
pub mod types;
