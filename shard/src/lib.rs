//! Tessera's per-core engine. A shard is one glommio `LocalExecutor` pinned to one CPU that
//! owns its sessions, topic trie and store; other shards reach it only by message.
//!
//! Modules:
//! - [`placement`]: the CPUs this process may use (`sched_getaffinity`) and the plan of one
//!   CPU per shard.
//! - [`memlock`]: the `RLIMIT_MEMLOCK` check glommio needs, with an actionable error.
//! - [`hash`]: `shard_for(client_id, shard_count)`, the stable owner mapping, and
//!   server-assigned ClientIDs that map to the accepting shard.
//! - [`handoff`]: moving an accepted TCP connection (fd + bytes already read) to the owner
//!   shard over a cross-executor channel.
//! - [`engine`]: the sans-IO state machine of one shard: sessions, QoS flows,
//!   subscriptions, the route table and retained replicas, shared
//!   subscriptions across shards, mesh outboxes.
//! - [`session`], [`message`], [`mesh`]: the data the engine owns and exchanges.
//! - [`trie`]: the topic-filter trie behind local subscriptions and routes.
//! - [`authz`]: the hooks the broker's authentication and ACL code answers for the
//!   engine, and the per-session ACL cache.
//! - [`alias`]: the bounded per-connection map of outbound MQTT 5 topic aliases.
//! - [`sys`]: `$SYS/broker/...` statistics, reported by every shard and
//!   published by shard 0.
//! - [`store`]: persistence: one heed (LMDB) env per shard, its writer
//!   thread (group commit), and start-up recovery with re-partitioning.
//! - [`probe`]: shard-local metrics (packets by type, CONNECT results, HDR
//!   histograms) merged by the broker's admin thread when scraped.
//! - [`admin`]: what the admin API asks a shard and what it answers (client,
//!   subscription, retained and session listings; kick; expire).
//!
//! Not here: sockets and executors (the broker's driver runs the engine on
//! glommio), authentication. Packet bytes are
//! `tessera-proto`'s job.

pub mod admin;
pub mod alias;
pub mod authz;
pub mod engine;
pub mod handoff;
pub mod hash;
pub mod memlock;
pub mod mesh;
pub mod message;
pub mod placement;
pub mod probe;
pub mod session;
pub mod store;
pub mod sys;
pub mod trie;
