//! Goal: no half-alive broker. A panic on one shard, or on the admin thread,
//! ends the whole process with exit code 101 within a bounded time, and the
//! log names the panic and its thread, so systemd's `Restart=on-failure`
//! restarts it; a graceful shutdown still exits 0.
//!
//! Method: the real `broker` binary, built by this package's tests with the
//! test-only `fault-injection` feature (`tessera_broker::fatal::fault`):
//! `FAULT_INJECTION_PANIC_ON_CONNECT=ID` panics the shard that owns ClientID ID
//! when it connects, `FAULT_INJECTION_PANIC_ON_ADMIN_PATH=/P` panics the admin
//! thread serving a request for /P. Before the injection, clients on both
//! shards exchange a message, so the broker was fully up.

mod common;

use std::time::Duration;

use common::{Broker, RawClient, assert_still_serves, connect_packet, id_on_shard};
use tessera_broker::fatal::EXIT_CODE;
use tessera_proto::ProtocolVersion;

/// How long the process may take to end after the panic.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn a_panic_on_one_shard_ends_the_process_with_code_101_and_a_log_line() {
    let doomed = id_on_shard("doomed", 1);
    let mut broker = Broker::start_with(&[], &[("FAULT_INJECTION_PANIC_ON_CONNECT", &doomed)]);
    assert_still_serves(broker.addr(), "before-panic");
    // A client on the other shard stays connected while shard 1 panics.
    let _bystander = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V5, &id_on_shard("bystander", 0), true, 30),
    );

    // The CONNECT reaches shard 1, which panics before it answers.
    let mut victim = RawClient::open(broker.addr(), ProtocolVersion::V5);
    victim.send(&tessera_proto::Packet::Connect(Box::new(connect_packet(
        ProtocolVersion::V5,
        &doomed,
        true,
        30,
    ))));

    let status = broker.wait_exit(EXIT_TIMEOUT);
    let log = broker.log();
    assert_eq!(status.code(), Some(EXIT_CODE), "{status:?}; log:\n{log}");
    assert!(
        log.contains("thread 'shard-1") && log.contains("fault injection: shard 1"),
        "the standard panic message names the thread and the message:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("panic: fault injection: shard 1")
            && l.contains("shard-1")
            && l.contains("src/fatal.rs")),
        "an ERROR log line names the panic, its thread and where:\n{log}"
    );
}

#[test]
fn a_panic_on_the_admin_thread_ends_the_process() {
    let mut broker = Broker::start_with(&[], &[("FAULT_INJECTION_PANIC_ON_ADMIN_PATH", "/boom")]);
    // Other admin requests are served as usual.
    let health = tessera_broker::admin::http::client_request(
        &broker.admin_addr().to_string(),
        "GET",
        "/health",
        None,
        Duration::from_secs(5),
    )
    .expect("GET /health");
    assert_eq!(health.status, 200);
    // The panicking request gets no answer: the process is gone.
    let _ = tessera_broker::admin::http::client_request(
        &broker.admin_addr().to_string(),
        "GET",
        "/boom",
        None,
        Duration::from_secs(5),
    );
    let status = broker.wait_exit(EXIT_TIMEOUT);
    let log = broker.log();
    assert_eq!(status.code(), Some(EXIT_CODE), "{status:?}; log:\n{log}");
    assert!(
        log.contains("panic: fault injection: the admin thread panics"),
        "{log}"
    );
}

#[test]
fn sigterm_still_exits_0_with_the_fault_injection_armed() {
    let doomed = id_on_shard("never-connects", 0);
    let mut broker = Broker::start_with(&[], &[("FAULT_INJECTION_PANIC_ON_CONNECT", &doomed)]);
    assert_still_serves(broker.addr(), "graceful");
    broker.sigterm();
    let status = broker.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(0), "log:\n{}", broker.log());
    assert!(!broker.log().contains("panic"), "{}", broker.log());
}
