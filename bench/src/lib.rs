//! `tessera-bench`: the load generator behind the `bench` binary. It speaks MQTT
//! 3.1.1 or 5.0 through `tessera_proto` over TCP or TLS to any broker, and measures
//! what the broker does with the load: delivery rates, end-to-end latency, loss,
//! duplicates and order, connect latency, and the broker's CPU and memory.
//!
//! Modules:
//! - [`cli`]: the command line (stable flags) and its validation.
//! - [`run`]: settings and timeline shared by every scenario.
//! - [`plan`]: who publishes where and subscribes to what in a message scenario
//!   (topic templates, shared-subscription groups, who should hear whom).
//! - [`throughput`]: the message scenarios (`fanin`, `fanout`, `pub`, `sub`,
//!   `pubsub`, `shared`), built from [`publisher`] (max-rate or paced, bounded
//!   by bytes or by an in-flight window) and [`subscriber`] (acknowledges and
//!   accounts for every message).
//! - [`latency`]: the `latency` scenario, with a paced publisher thread, or with
//!   `--busy-poll` one thread that publishes and reads without sleeping.
//! - [`conn`]: the `conn` scenario, many idle connections.
//! - [`compare`]: `bench compare`, a scenario matrix against two brokers.
//! - [`mqtt`]: connecting and subscribing, blocking and async; failure reasons.
//! - [`transport`]: plain TCP or TLS (rustls) streams, chosen once per connection.
//! - [`window`]: the QoS 1/2 in-flight window (sans-IO).
//! - [`accounting`]: loss, duplicate and order accounting (sans-IO).
//! - [`payload`]: the bench header every message carries.
//! - [`stats`]: live counters, progress line, time series, latency summaries.
//! - [`report`]: the result, as text and JSON, and the pass/fail verdict.
//! - [`output`]: `--hdr-out` percentile files and `--plot` SVGs.
//! - [`procs`]: `--procs N`, the run split over N processes, reports merged.
//! - [`sys`]: open-files limit, CPU and RSS from `/proc`, precise sleep.
//! - [`clock`]: the process-wide monotonic clock payloads are stamped with.
//!
//! What it does not do: WebSockets, wills, or reconnecting publishers. A client
//! that loses its connection counts an error and stops; the run goes on and
//! fails at the end. With `--reconnect` a subscriber connects again instead (a
//! broker restarted mid-run, `bench/scripts/bridge.sh`).

pub mod accounting;
pub mod cli;
pub mod clock;
pub mod compare;
pub mod conn;
pub mod latency;
pub mod mqtt;
pub mod output;
pub mod payload;
pub mod plan;
pub mod procs;
pub mod publisher;
pub mod report;
pub mod run;
pub mod stats;
pub mod subscriber;
pub mod sys;
pub mod throughput;
pub mod transport;
pub mod window;
