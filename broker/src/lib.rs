//! The Tessera broker: what turns the per-core engine (`tessera-shard`) and the codec
//! (`tessera-proto`) into a running server.
//!
//! Modules so far:
//! - [`config`]: the [`config::Config`] settings, their layered loading (defaults, TOML
//!   file, `TESSERA_*` environment variables, flags), validation and the documented
//!   default file.
//! - [`cli`]: the `broker` command-line flags, a stable interface.
//! - [`server`]: boot and shutdown of the shards on glommio, TCP listeners, the
//!   CONNECT hand-off to the owner shard, and the per-connection tasks.
//!
//! Not here yet: `brokerctl`, TLS/WebSocket/QUIC listeners, persistence, the admin
//! API, metrics export, and authentication/ACLs.

pub mod cli;
pub mod config;
pub mod server;
