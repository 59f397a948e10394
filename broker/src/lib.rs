//! The Tessera broker: what turns the per-core engine (`tessera-shard`) and the codec
//! (`tessera-proto`) into a running server.
//!
//! Modules so far:
//! - [`config`]: the [`config::Config`] settings, their layered loading (defaults, TOML
//!   file, `TESSERA_*` environment variables, flags), validation and the documented
//!   default file.
//! - [`auth`]: password file, JWT, SCRAM-SHA-256, ACL, bans and flapping detection
//!   (docs/SECURITY.md).
//! - [`cli`]: the `broker` command-line flags, a stable interface.
//! - [`server`]: boot and shutdown of the shards on glommio, TCP listeners, the
//!   CONNECT hand-off to the owner shard, and the per-connection tasks.
//! - [`transport`]: TLS (rustls) and WebSocket layers of the `mqtts`, `ws` and `wss`
//!   listeners, the pipe of a `quic` listener's stream, and the transport state a
//!   hand-off carries.
//! - [`quic`]: MQTT over QUIC: N endpoint threads (quinn on tokio) per `quic`
//!   listener on `SO_REUSEPORT` sockets of one port, datagrams steered in the
//!   kernel to the endpoint their connection id names, handing each
//!   connection's MQTT stream to the shards.
//! - [`admin`]: the admin thread: `/metrics` (Prometheus), `/health`, `/ready` and
//!   the JSON API under `/api/v1/`, answered by the shards by message; also the
//!   HTTP client `brokerctl` uses.
//! - [`bridge`]: MQTT bridges to other brokers (`[[bridge]]`, docs/BRIDGES.md): the
//!   configured set and counters shared with the admin thread, the remote link's
//!   TLS and WebSocket client layers and its QUIC client thread; the relay itself
//!   runs on the bridge's owner shard (`server::bridge`).
//! - [`allocator`]: jemalloc's release of freed memory (background purging) and
//!   its figures for `/metrics`.
//! - [`cluster`]: the control thread (a current-thread tokio runtime beside the shards)
//!   running the QUIC link and the raft control plane of `tessera-raft`.
//!   [`cluster::peer`] carries the data plane's requests between nodes (Forward channel);
//!   the shards' side of session ownership (claims at CONNECT, takeover) is in
//!   `server/claims.rs` and `server/takeover.rs`.
//! - [`fatal`]: the panic hook that ends the process on any thread's panic (no
//!   half-alive broker), and the test-only fault injection.
//! - [`tune`]: `brokerctl tune check`, the read-only comparison of a machine with a
//!   `kernel-tuning/` profile (the profiles are embedded).
//!
//! Binaries: `broker` (`src/main.rs`) and `brokerctl` (`src/bin/brokerctl.rs`).

pub mod admin;
pub mod allocator;
pub mod auth;
pub mod bridge;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod fatal;
pub mod forward;
pub mod quic;
pub mod server;
pub mod transport;
pub mod tune;
