//! Support for the black-box tests: start the real `broker` binary on
//! `127.0.0.1:0`, and speak MQTT to it over a plain `std::net::TcpStream` with
//! the `tessera_proto` codec.
//!
//! Method: [`Broker::start`] spawns the binary built by Cargo with `--listen
//! 127.0.0.1:0 --shards 2`, waits (at most [`READY_TIMEOUT`]) for the
//! `tessera: listening mqtt://ADDR` line on its stdout, and returns a guard that
//! kills the process on drop and prints the broker's log when the test failed.
//! [`RawClient`] encodes and decodes packets itself, so tests can send exactly
//! the bytes they mean (malformed ones included) and assert exactly what comes
//! back. Every wait takes a timeout; nothing here can block a test forever.

// Each test crate (`mqtt`, `malformed`, `cli`) compiles this module and uses a
// different subset of it; the rest would warn as dead code in that crate.
#![allow(dead_code)]

pub mod bridge;
pub mod cluster;
pub mod history;
#[cfg(feature = "third-party")]
pub mod netns;

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tessera_proto::{
    ConnAck, Connect, Disconnect, Encode, PACKET_BYTES_MAX, Packet, ProtocolVersion, Publish, QoS,
    ReasonCode, Str, Subscribe, Subscription, SubscriptionOptions, Will,
};

/// How long the broker may take to print its listening line: a liveness bound, not a
/// timing claim. 10 s was too short on a 2-core machine at load 15 (local CI while four
/// builds ran: `limits` timed out with the broker past its store recovery); a healthy
/// start takes well under a second.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Default bound for one expected packet to arrive.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// The line prefix the broker prints once every shard listens.
const READY_PREFIX: &str = "tessera: listening mqtt://";

/// The line prefix of the admin API address, printed before the ready line.
const ADMIN_PREFIX: &str = "tessera: admin http://";

/// A command for the `broker` binary with `args` and `envs`, and no `TESSERA_*`
/// variable inherited from the test runner's environment (they would change
/// the configuration under test, or fail its loading). The admin API gets a
/// free loopback port unless `args` names one.
pub fn broker_command(args: &[&str], envs: &[(&str, &str)]) -> Command {
    broker_command_via(&[], args, envs)
}

/// [`broker_command`] run through `prefix` (e.g. `ip netns exec NS`, which execs
/// the broker, so the child's pid is the broker's).
pub fn broker_command_via(prefix: &[String], args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(env!("CARGO_BIN_EXE_broker"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_broker")),
    };
    for (name, _) in std::env::vars_os() {
        if name.as_encoded_bytes().starts_with(b"TESSERA_") {
            cmd.env_remove(name);
        }
    }
    cmd.args(args);
    // Tests run in parallel: a broker on the default admin port (18083)
    // would refuse to start next to another one.
    if !args.contains(&"--admin-listen") {
        cmd.args(["--admin-listen", "127.0.0.1:0"]);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the broker to completion with no stdin, killing it after `timeout`.
/// Panics if it had to be killed.
pub fn run_bounded(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Output {
    let mut child = broker_command(args, envs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn broker");
    // Drain both pipes on threads so a chatty child never blocks on a full pipe.
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("broker {args:?} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// A running broker process. Killed on drop.
#[derive(Debug)]
pub struct Broker {
    child: Child,
    /// The data directory made for this broker when the test gave none.
    _data_dir: Option<TestDir>,
    addr: SocketAddr,
    /// The other listeners' URLs (`mqtts://...`, `ws://.../mqtt`), as printed.
    urls: Vec<String>,
    admin: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
    exited: Option<ExitStatus>,
}

impl Broker {
    /// Starts `broker --listen 127.0.0.1:0 --shards 2`.
    pub fn start() -> Broker {
        Broker::start_with(&[], &[])
    }

    /// Starts the broker with extra flags (`--shards` and `--data-dir`
    /// replace the defaults) and environment variables. The admin API gets a
    /// free loopback port unless `extra_args` names one.
    pub fn start_with(extra_args: &[&str], envs: &[(&str, &str)]) -> Broker {
        Broker::start_via(&[], extra_args, envs)
    }

    /// [`Broker::start_with`] through a command `prefix` (see
    /// [`broker_command_via`]); `--listen` in `extra_args` replaces the default.
    pub fn start_via(prefix: &[String], extra_args: &[&str], envs: &[(&str, &str)]) -> Broker {
        let mut args = Vec::new();
        if !extra_args.contains(&"--listen") {
            args.extend(["--listen", "127.0.0.1:0"]);
        }
        if !extra_args.contains(&"--admin-listen") {
            args.extend(["--admin-listen", "127.0.0.1:0"]);
        }
        if !extra_args.contains(&"--shards") {
            args.extend(["--shards", "2"]);
        }
        args.extend_from_slice(extra_args);
        // Each broker gets its own data directory (persistence is on by
        // default), removed when the guard drops.
        let data_dir = (!extra_args.contains(&"--data-dir")).then(|| TestDir::new("data"));
        if let Some(d) = &data_dir {
            args.push("--data-dir");
            args.push(d.path_str());
        }
        let mut child = broker_command_via(prefix, &args, envs)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn broker");

        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });

        // The stdout reader keeps draining after the ready line, so the pipe
        // never fills; lines go to the channel until nobody listens.
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut urls = Vec::new();
        let mut admin = None;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix(ADMIN_PREFIX) {
                        admin = Some(addr.trim().parse().expect("admin address"));
                    }
                    if let Some(addr) = line.strip_prefix(READY_PREFIX) {
                        break addr.trim().parse().expect("listen address");
                    }
                    if let Some(url) = line.strip_prefix("tessera: listening ") {
                        urls.push(url.trim().to_owned());
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let status = child.wait();
                    std::thread::sleep(Duration::from_millis(50));
                    panic!(
                        "broker not ready ({e}), status {status:?}; log:\n{}",
                        log.lock().unwrap()
                    );
                }
            }
        };
        Broker {
            child,
            _data_dir: data_dir,
            addr,
            urls,
            admin,
            log,
            exited: None,
        }
    }

    /// The admin API address (`ADDR:PORT`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("the broker printed its admin address")
    }

    /// The MQTT address the broker listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL of the first non-`mqtt` listener whose URL starts with
    /// `scheme://` (e.g. `"wss"`).
    pub fn url(&self, scheme: &str) -> String {
        let prefix = format!("{scheme}://");
        self.urls
            .iter()
            .find(|u| u.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {scheme} listener in {:?}", self.urls))
            .clone()
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGHUP: reload certificates (and other reloadable files).
    pub fn sighup(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
        assert_eq!(rc, 0, "kill(SIGHUP): {}", std::io::Error::last_os_error());
    }

    /// Waits until the log contains `text`; panics after `timeout`.
    pub fn wait_log(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the broker log within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the broker wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({signal}): {}", std::io::Error::last_os_error());
    }

    /// Sends SIGTERM: the broker's graceful shutdown.
    pub fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM): {}", std::io::Error::last_os_error());
    }

    /// The exit status if the process has ended, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().expect("try_wait")?;
        self.exited = Some(status);
        Some(status)
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            // Captured by the test harness and shown with the failure.
            eprintln!("---- broker log ----\n{}", self.log());
        }
    }
}

/// A directory under the system temp dir, unique per process and call,
/// removed with everything in it on drop.
#[derive(Debug)]
pub struct TestDir {
    path: String,
}

impl TestDir {
    /// A new, empty directory whose name contains `tag`.
    pub fn new(tag: &str) -> TestDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tessera-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test dir");
        TestDir {
            path: path.to_str().expect("UTF-8 temp path").to_owned(),
        }
    }

    /// The path.
    pub fn path_str(&self) -> &str {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What the socket did instead of delivering a packet.
#[derive(Debug)]
pub enum Closed {
    /// The peer closed the connection (EOF or reset).
    Eof,
    /// Nothing arrived in time.
    Timeout,
}

/// A raw MQTT client over a blocking socket, encoding and decoding with
/// `tessera_proto`.
#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    /// PUBLISH packets that arrived while a helper waited for an ack.
    stash: VecDeque<Publish>,
    /// The version used to encode what we send and decode what we receive.
    pub version: ProtocolVersion,
}

impl RawClient {
    /// Opens a TCP connection; nothing is sent yet.
    pub fn open(addr: SocketAddr, version: ProtocolVersion) -> RawClient {
        let stream = TcpStream::connect_timeout(&addr, RECV_TIMEOUT).expect("tcp connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_write_timeout(Some(RECV_TIMEOUT))
            .expect("write timeout");
        RawClient {
            stream,
            buf: BytesMut::new(),
            stash: VecDeque::new(),
            version,
        }
    }

    /// Opens a TCP connection within `timeout`, or says why not.
    pub fn try_open(
        addr: SocketAddr,
        version: ProtocolVersion,
        timeout: Duration,
    ) -> std::io::Result<RawClient> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(RECV_TIMEOUT))?;
        Ok(RawClient {
            stream,
            buf: BytesMut::new(),
            stash: VecDeque::new(),
            version,
        })
    }

    /// Opens a connection, sends `connect` and returns the CONNACK.
    pub fn connect(addr: SocketAddr, connect: Connect) -> (RawClient, ConnAck) {
        let mut c = RawClient::open(addr, connect.version);
        c.send(&Packet::Connect(Box::new(connect)));
        match c.recv() {
            Packet::ConnAck(ack) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects with `connect` and panics unless the CONNACK is a success.
    pub fn connect_ok(addr: SocketAddr, connect: Connect) -> RawClient {
        let id = connect.client_id.to_string();
        let (c, ack) = RawClient::connect(addr, connect);
        assert_eq!(
            ack.reason_code,
            ReasonCode::Success,
            "CONNACK for {id:?}: {ack:?}"
        );
        c
    }

    /// Encodes and sends one packet.
    pub fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        packet.encode(self.version, &mut out).expect("encode");
        self.send_bytes(&out);
    }

    /// Encodes and sends one packet; false when the connection is gone.
    pub fn try_send(&mut self, packet: &Packet) -> bool {
        let mut out = BytesMut::new();
        packet.encode(self.version, &mut out).expect("encode");
        self.stream.write_all(&out).is_ok()
    }

    /// Sends bytes as they are.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to broker");
    }

    /// Sends DISCONNECT (normal disconnection).
    pub fn disconnect(&mut self) {
        self.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    }

    /// Closes the TCP connection without DISCONNECT.
    pub fn drop_connection(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The next packet, or why there is none, within `timeout`.
    pub fn try_recv(&mut self, timeout: Duration) -> Result<Packet, Closed> {
        let deadline = Instant::now() + timeout;
        loop {
            match tessera_proto::decode(&mut self.buf, self.version, PACKET_BYTES_MAX) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => panic!(
                    "the broker sent bytes we cannot decode: {e} ({:02x?})",
                    &self.buf[..]
                ),
            }
            let Some(left) = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            else {
                return Err(Closed::Timeout);
            };
            self.stream
                .set_read_timeout(Some(left))
                .expect("read timeout");
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    assert!(
                        self.buf.is_empty(),
                        "closed inside a packet: {:02x?}",
                        &self.buf[..]
                    );
                    return Err(Closed::Eof);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(Closed::Timeout);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Err(Closed::Eof);
                }
                Err(e) => panic!("read from broker: {e}"),
            }
        }
    }

    /// The next packet; panics on close or after [`RECV_TIMEOUT`].
    pub fn recv(&mut self) -> Packet {
        match self.try_recv(RECV_TIMEOUT) {
            Ok(p) => p,
            Err(why) => panic!("expected a packet, got {why:?}"),
        }
    }

    /// The next packet other than PUBLISH; PUBLISH packets on the way are kept
    /// for [`RawClient::recv_publish`].
    fn recv_reply(&mut self) -> Packet {
        loop {
            match self.recv() {
                Packet::Publish(p) => self.stash.push_back(p),
                other => return other,
            }
        }
    }

    /// Asserts the broker closes the connection within `timeout` without
    /// sending anything more.
    pub fn expect_closed(&mut self, timeout: Duration) {
        match self.try_recv(timeout) {
            Err(Closed::Eof) => {}
            Err(Closed::Timeout) => panic!("connection still open after {timeout:?}"),
            Ok(p) => panic!("expected the connection to close, got {p:?}"),
        }
    }

    /// Asserts the next packet is a DISCONNECT with `reason`, then the close.
    pub fn expect_disconnect_then_close(&mut self, reason: ReasonCode) {
        match self.recv() {
            Packet::Disconnect(d) => assert_eq!(d.reason_code, reason, "DISCONNECT {d:?}"),
            other => panic!("expected DISCONNECT {reason:?}, got {other:?}"),
        }
        self.expect_closed(RECV_TIMEOUT);
    }

    /// Subscribes and returns the SUBACK reason codes.
    pub fn subscribe(&mut self, packet_id: u16, filters: &[(&str, QoS)]) -> Vec<ReasonCode> {
        self.send(&subscribe_packet(packet_id, filters));
        match self.recv_reply() {
            Packet::SubAck(ack) => {
                assert_eq!(ack.packet_id, packet_id);
                ack.reason_codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes and completes the QoS 1 or 2 exchange.
    pub fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, packet_id: u16) {
        self.send(&publish_packet(topic, payload, qos, packet_id, false));
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => match self.recv_reply() {
                Packet::PubAck(a) => assert_eq!(a.packet_id, packet_id),
                other => panic!("expected PUBACK, got {other:?}"),
            },
            QoS::ExactlyOnce => {
                match self.recv_reply() {
                    Packet::PubRec(r) => assert_eq!(r.packet_id, packet_id),
                    other => panic!("expected PUBREC, got {other:?}"),
                }
                self.send(&Packet::PubRel(tessera_proto::PubRel::new(packet_id)));
                match self.recv_reply() {
                    Packet::PubComp(c) => assert_eq!(c.packet_id, packet_id),
                    other => panic!("expected PUBCOMP, got {other:?}"),
                }
            }
        }
    }

    /// Publishes a retained QoS 1 message and waits for PUBACK.
    pub fn publish_retained(&mut self, topic: &str, payload: &[u8], packet_id: u16) {
        self.send(&publish_packet(
            topic,
            payload,
            QoS::AtLeastOnce,
            packet_id,
            true,
        ));
        match self.recv_reply() {
            Packet::PubAck(a) => assert_eq!(a.packet_id, packet_id),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }

    /// The next PUBLISH, acknowledged at QoS 1 (QoS 2 is not handled here).
    pub fn recv_publish(&mut self) -> Publish {
        let next = match self.stash.pop_front() {
            Some(p) => Packet::Publish(p),
            None => self.recv(),
        };
        match next {
            Packet::Publish(p) => {
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => {
                        self.send(&Packet::PubAck(tessera_proto::PubAck::new(p.packet_id)));
                    }
                    QoS::ExactlyOnce => panic!("recv_publish does not do QoS 2: {p:?}"),
                }
                p
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

/// A string for the codec; panics on an invalid one (a test bug).
pub fn s(text: &str) -> Str {
    Str::try_from(text).expect("valid MQTT string")
}

/// A CONNECT without will, credentials or properties.
pub fn connect_packet(
    version: ProtocolVersion,
    client_id: &str,
    clean: bool,
    keep_alive: u16,
) -> Connect {
    Connect {
        version,
        clean_start: clean,
        keep_alive,
        client_id: s(client_id),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    }
}

/// A will message at `qos`, not retained.
pub fn will(topic: &str, payload: &[u8], qos: QoS) -> Will {
    Will {
        topic: s(topic),
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain: false,
        properties: Default::default(),
    }
}

/// A SUBSCRIBE with one maximum QoS per filter.
pub fn subscribe_packet(packet_id: u16, filters: &[(&str, QoS)]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        properties: Default::default(),
        subscriptions: filters
            .iter()
            .map(|(f, qos)| Subscription {
                filter: s(f),
                options: SubscriptionOptions::qos(*qos),
            })
            .collect(),
    })
}

/// A PUBLISH; `packet_id` must be 0 for QoS 0.
pub fn publish_packet(
    topic: &str,
    payload: &[u8],
    qos: QoS,
    packet_id: u16,
    retain: bool,
) -> Packet {
    let mut p = Publish::new(s(topic), Bytes::copy_from_slice(payload));
    p.qos = qos;
    p.packet_id = packet_id;
    p.retain = retain;
    Packet::Publish(p)
}

/// The shard the broker (2 shards) hashes `client_id` to.
pub fn shard_of(client_id: &str) -> usize {
    tessera_shard::hash::shard_for(client_id.as_bytes(), 2)
}

/// A client id starting with `prefix` that the broker places on `shard` (of 2).
pub fn id_on_shard(prefix: &str, shard: usize) -> String {
    (0..1000)
        .map(|k| format!("{prefix}-{k}"))
        .find(|id| shard_of(id) == shard)
        .expect("an id on each shard within 1000 tries")
}

/// Asserts the broker still serves: a fresh subscriber and a fresh publisher
/// (on different shards) exchange a QoS 1 message.
pub fn assert_still_serves(addr: SocketAddr, tag: &str) {
    let v = ProtocolVersion::V3_1_1;
    let topic = format!("alive/{tag}");
    let mut sub = RawClient::connect_ok(
        addr,
        connect_packet(v, &id_on_shard(&format!("{tag}-sub"), 0), true, 30),
    );
    assert_eq!(
        sub.subscribe(1, &[(&topic, QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );
    let mut publ = RawClient::connect_ok(
        addr,
        connect_packet(v, &id_on_shard(&format!("{tag}-pub"), 1), true, 30),
    );
    publ.publish(&topic, b"still here", QoS::AtLeastOnce, 7);
    let p = sub.recv_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        (topic.as_str(), &b"still here"[..])
    );
    sub.disconnect();
    publ.disconnect();
}

/// The Prometheus text of the broker's `/metrics` at admin address `admin`
/// (answered 200 within 5 s).
pub fn metrics_text(admin: SocketAddr) -> String {
    let r = tessera_broker::admin::http::client_request(
        &admin.to_string(),
        "GET",
        "/metrics",
        None,
        Duration::from_secs(5),
    )
    .expect("GET /metrics");
    assert_eq!(r.status, 200, "GET /metrics");
    String::from_utf8(r.body).expect("UTF-8 /metrics")
}

/// Runs `brokerctl ARGS` with `envs` under a timeout.
pub fn brokerctl(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_brokerctl"));
    cmd.env_remove("TESSERA_URL").env_remove("TESSERA_TOKEN");
    cmd.args(args).envs(envs.iter().copied());
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn brokerctl");
    // Collect the output on a thread (draining both pipes, so a long output
    // such as a completion script never blocks the child), bounded in time.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("brokerctl output"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our child, not yet reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("brokerctl {args:?} did not finish");
        }
    }
}

/// `/metrics` of the broker at admin address `admin`, parsed.
pub fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    let body = metrics_text(admin);
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("/metrics parses as Prometheus text")
}

/// Sum of the samples of `name` whose labels include `labels` (histograms:
/// their counts).
pub fn metric_sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

/// Polls `f` every 20 ms until it is true; panics after `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a persistent subscriber received, QoS 2 re-sends removed.
#[derive(Debug, Default)]
pub struct Received {
    /// Payloads (UTF-8) in arrival order.
    pub payloads: Vec<String>,
    /// QoS 2 packet ids received and not yet released by PUBREL.
    pub qos2_open: HashSet<u16>,
}

impl Received {
    /// Records a packet a subscriber got as a receiver must (a QoS 2 PUBLISH
    /// whose id it holds unreleased is a re-send, not a new message) and
    /// returns the answer to send (`None` for QoS 0); panics on a packet a
    /// subscriber never gets.
    pub fn answer(&mut self, p: Packet) -> Option<Packet> {
        match p {
            Packet::Publish(p) if p.qos == QoS::ExactlyOnce => {
                if self.qos2_open.insert(p.packet_id) {
                    self.payloads
                        .push(String::from_utf8(p.payload.to_vec()).expect("UTF-8"));
                }
                Some(Packet::PubRec(tessera_proto::PubRec::new(p.packet_id)))
            }
            Packet::Publish(p) => {
                self.payloads
                    .push(String::from_utf8(p.payload.to_vec()).expect("UTF-8"));
                (p.qos == QoS::AtLeastOnce)
                    .then(|| Packet::PubAck(tessera_proto::PubAck::new(p.packet_id)))
            }
            Packet::PubRel(r) => {
                self.qos2_open.remove(&r.packet_id);
                Some(Packet::PubComp(tessera_proto::PubComp::new(r.packet_id)))
            }
            other => panic!("subscriber got {other:?}"),
        }
    }
}

/// A certificate authority that signs server and client certificates.
pub struct Ca {
    /// The CA certificate, PEM.
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    /// A self-signed CA named `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (SANs) with Common Name `cn`: (cert PEM, key PEM).
    pub fn sign(&self, cn: &str, names: &[&str], client: bool) -> (String, String) {
        self.sign_until(cn, names, client, None)
    }

    /// As [`Ca::sign`], valid until `not_after` (Unix seconds) when given.
    pub fn sign_until(
        &self,
        cn: &str,
        names: &[&str],
        client: bool,
        not_after: Option<u64>,
    ) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if let Some(at) = not_after {
            params.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(at);
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        if client {
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// The CA as a rustls root store.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        let der = <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(self.pem.as_bytes()).unwrap();
        roots.add(der).unwrap();
        roots
    }
}
