//! The MQTT client side of the bench, on `tessera_proto`: connecting (CONNECT /
//! CONNACK), subscribing (SUBSCRIBE / SUBACK), reading whole packets off a socket,
//! and the [`Failure`] classification that reports use as "failures by reason".
//!
//! Two flavours of the same handshake: async on tokio for every scenario, and
//! blocking on `std::net` for the latency publisher's paced thread
//! ([`crate::latency`]). The scenarios' steady-state loops do their own reading and
//! writing; this module only gets them connected.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tessera_proto::{
    ConnAck, Connect, ConnectProperties, DecodeError, Disconnect, Encode, Packet, PacketType,
    ProtocolVersion, QoS, ReasonCode, Str, Subscribe, Subscription, SubscriptionOptions, decode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::payload::PAYLOAD_BYTES_MAX;
use crate::transport::{BlockingQuic, BlockingStream, Stream, Tls};

/// Largest packet the bench accepts from a broker: a bench payload plus generous
/// room for topic, properties and fixed header.
pub const PACKET_BYTES_MAX: usize = PAYLOAD_BYTES_MAX + 64 * 1024;

/// Bytes reserved in a read buffer before each read.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Bytes of one read of the blocking client, which only reads acknowledgements.
const BLOCKING_READ_BYTES: usize = 4096;

/// How every client of a run connects.
#[derive(Debug, Clone)]
pub struct Options {
    /// Broker addresses; client slot `i` connects to `addrs[i % len]`. Never empty.
    pub addrs: Vec<SocketAddr>,
    /// Where publishers connect instead (`--pub-addr`); empty: `addrs`.
    pub pub_addrs: Vec<SocketAddr>,
    /// Local source addresses; client slot `i` binds `binds[i % len]`. May be empty.
    pub binds: Vec<IpAddr>,
    /// Protocol version spoken.
    pub version: ProtocolVersion,
    /// Keep alive announced in CONNECT; clients that may be idle send PINGREQ at
    /// half this interval. 0 disables keep alive.
    pub keep_alive_s: u16,
    /// Bound on connecting and on each handshake answer.
    pub timeout: Duration,
    /// Clean Session (3.1.1) / Clean Start (5).
    pub clean_start: bool,
    /// MQTT 5 Session Expiry Interval sent in CONNECT (only when not clean).
    pub session_expiry_s: u32,
    /// User name sent in CONNECT.
    pub username: Option<String>,
    /// Password sent in CONNECT.
    pub password: Option<String>,
    /// MQTT 5 Topic Alias Maximum announced in CONNECT: aliases the broker may
    /// use towards us. 0: none.
    pub topic_alias_max: u16,
    /// TLS on every connection (`--tls`) or MQTT over QUIC (`--quic`), else
    /// plain TCP.
    pub tls: Option<Arc<Tls>>,
}

impl Options {
    /// The options publishers connect with: `pub_addrs` when given.
    pub fn for_publishers(&self) -> Options {
        let mut o = self.clone();
        if !o.pub_addrs.is_empty() {
            o.addrs = o.pub_addrs.clone();
        }
        o
    }

    /// The broker address of client slot `slot`.
    pub fn addr(&self, slot: usize) -> SocketAddr {
        self.addrs[slot % self.addrs.len()]
    }

    /// The local address of client slot `slot`, when `--bind` was given.
    pub fn bind(&self, slot: usize) -> Option<IpAddr> {
        (!self.binds.is_empty()).then(|| self.binds[slot % self.binds.len()])
    }

    /// The broker addresses, as the report shows them.
    pub fn brokers(&self) -> String {
        let v: Vec<String> = self.addrs.iter().map(ToString::to_string).collect();
        v.join(",")
    }
}

/// Why a client could not connect, subscribe or stay connected. `Display` is the
/// short reason used as a key in "failures by reason".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// An operating system error, by errno name.
    #[error("{0}")]
    Io(String),
    /// No answer within `Options::timeout`.
    #[error("timeout")]
    Timeout,
    /// The TLS layer failed: handshake (certificate, protocol) or a record.
    #[error("TLS: {0}")]
    Tls(String),
    /// The QUIC connection failed (handshake, refused, closed with a code).
    #[error("QUIC: {0}")]
    Quic(String),
    /// The broker closed the connection.
    #[error("closed by broker")]
    Closed,
    /// CONNACK with a failure code.
    #[error("CONNACK refused: {0:?}")]
    Refused(ReasonCode),
    /// SUBACK with a failure code.
    #[error("SUBACK refused: {0:?}")]
    SubscribeRefused(ReasonCode),
    /// The broker sent bytes our codec refuses.
    #[error("undecodable packet from broker: {0}")]
    Decode(DecodeError),
    /// A packet that has no place at this point of the exchange.
    #[error("unexpected {0:?} from broker")]
    Unexpected(PacketType),
    /// The broker broke a protocol rule the codec cannot see (e.g. an unknown
    /// topic alias).
    #[error("protocol error by broker: {0}")]
    Protocol(String),
    /// The broker sent DISCONNECT (v5 reason code, or Success for 3.1.1).
    #[error("DISCONNECT from broker: {0:?}")]
    Disconnected(ReasonCode),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock {
            return Failure::Timeout;
        }
        if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return Failure::Tls(tls_reason(tls));
        }
        if let Some(quic) = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<quinn::ConnectionError>())
        {
            return Failure::Quic(quic.to_string());
        }
        if let Some(quic) = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<quinn::ConnectError>())
        {
            return Failure::Quic(quic.to_string());
        }
        Failure::Io(errno_name(&e))
    }
}

impl From<DecodeError> for Failure {
    fn from(e: DecodeError) -> Failure {
        Failure::Decode(e)
    }
}

/// A TLS error as a short, bounded reason: the kind, without the details that
/// differ per connection (so "failures by reason" groups them).
fn tls_reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => format!("invalid certificate: {c:?}"),
        rustls::Error::AlertReceived(a) => format!("alert from broker: {a:?}"),
        rustls::Error::NoCertificatesPresented => "no certificate from broker".into(),
        e => e.to_string(),
    }
}

/// The errno name of an I/O error (`ECONNREFUSED`), or its kind when it has none.
pub fn errno_name(e: &std::io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED",
        Some(libc::ECONNRESET) => "ECONNRESET",
        Some(libc::ECONNABORTED) => "ECONNABORTED",
        Some(libc::ETIMEDOUT) => "ETIMEDOUT",
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL",
        Some(libc::EADDRINUSE) => "EADDRINUSE",
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::ENFILE) => "ENFILE",
        Some(libc::ENOBUFS) => "ENOBUFS",
        Some(libc::EPIPE) => "EPIPE",
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH",
        Some(libc::ENETUNREACH) => "ENETUNREACH",
        Some(n) => return format!("errno {n}"),
        None => return format!("{:?}", e.kind()),
    };
    name.to_string()
}

/// Appends `packet` to `buf`. The bench builds only valid packets, so an encoding
/// error is a bug here.
pub fn put(packet: &impl Encode, version: ProtocolVersion, buf: &mut BytesMut) {
    packet
        .encode(version, buf)
        .expect("the bench encodes only valid packets");
}

/// The CONNECT every bench client sends: no will; session, credentials and
/// topic aliases as `opts` says.
pub fn connect_packet(client_id: &str, opts: &Options) -> Connect {
    let mut properties = ConnectProperties::default();
    if opts.version.is_v5() {
        if !opts.clean_start {
            properties.session_expiry_interval = Some(opts.session_expiry_s);
        }
        if opts.topic_alias_max > 0 {
            properties.topic_alias_maximum = Some(opts.topic_alias_max);
        }
    }
    Connect {
        version: opts.version,
        clean_start: opts.clean_start,
        keep_alive: opts.keep_alive_s,
        client_id: Str::try_from(client_id).expect("bench client ids are valid strings"),
        will: None,
        username: opts
            .username
            .as_deref()
            .map(|u| Str::try_from(u).expect("the CLI checked the user name")),
        password: opts
            .password
            .as_ref()
            .map(|p| bytes::Bytes::copy_from_slice(p.as_bytes())),
        properties,
    }
}

/// What the broker's CONNACK granted.
#[derive(Debug, Clone, Copy)]
pub struct Granted {
    /// QoS 1/2 messages the broker accepts in flight from this client (v5 Receive
    /// Maximum; 65,535 when absent or for 3.1.1).
    pub receive_maximum: u16,
    /// Topic aliases the broker accepts from this client (v5 Topic Alias
    /// Maximum; 0 when absent).
    pub topic_alias_maximum: u16,
    /// The broker resumed a session (CONNACK Session Present).
    pub session_present: bool,
}

impl Granted {
    const NONE: Granted = Granted {
        receive_maximum: u16::MAX,
        topic_alias_maximum: 0,
        session_present: false,
    };
}

fn check_connack(ack: &ConnAck) -> Result<Granted, Failure> {
    if ack.reason_code.is_error() {
        return Err(Failure::Refused(ack.reason_code));
    }
    Ok(Granted {
        receive_maximum: ack.properties.receive_maximum.unwrap_or(u16::MAX),
        topic_alias_maximum: ack.properties.topic_alias_maximum.unwrap_or(0),
        session_present: ack.session_present,
    })
}

/// A connected client on tokio: the socket and the bytes read past the last
/// packet consumed.
#[derive(Debug)]
pub struct Client {
    /// The connection.
    pub stream: Stream,
    /// Bytes read but not yet decoded.
    pub rbuf: BytesMut,
    /// Protocol version of the connection.
    pub version: ProtocolVersion,
    /// What CONNACK granted.
    pub granted: Granted,
    timeout: Duration,
}

/// Connects client slot `slot` to its broker address, from its `--bind` address
/// when given, runs the TLS handshake with `--tls`, and completes CONNECT /
/// CONNACK, all within `opts.timeout`.
/// `rbuf_bytes` is the initial read buffer; `sndbuf_bytes` sets `SO_SNDBUF`
/// (the kernel doubles it), else the kernel autotunes it.
pub async fn connect(
    opts: &Options,
    client_id: &str,
    slot: usize,
    rbuf_bytes: usize,
    sndbuf_bytes: Option<u32>,
) -> Result<Client, Failure> {
    let addr = opts.addr(slot);
    let bind = opts.bind(slot);
    let handshake = async {
        if let Some(tls) = opts.tls.as_ref().filter(|t| t.is_quic()) {
            let stream = tls.connect_quic(slot, addr, bind).await?;
            return handshake_over(stream, client_id, opts, rbuf_bytes).await;
        }
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = bind {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        if let Some(bytes) = sndbuf_bytes {
            socket.set_send_buffer_size(bytes)?;
        }
        let tcp = socket.connect(addr).await?;
        tcp.set_nodelay(true)?;
        let stream = match &opts.tls {
            None => Stream::Plain(tcp),
            Some(tls) => tls.connect(slot, tcp).await?,
        };
        handshake_over(stream, client_id, opts, rbuf_bytes).await
    };
    match tokio::time::timeout(opts.timeout, handshake).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Timeout),
    }
}

/// CONNECT / CONNACK over a connected stream.
async fn handshake_over(
    stream: Stream,
    client_id: &str,
    opts: &Options,
    rbuf_bytes: usize,
) -> Result<Client, Failure> {
    let mut client = Client {
        stream,
        rbuf: BytesMut::with_capacity(rbuf_bytes),
        version: opts.version,
        granted: Granted::NONE,
        timeout: opts.timeout,
    };
    let mut out = BytesMut::new();
    put(&connect_packet(client_id, opts), opts.version, &mut out);
    client.stream.write_all(&out).await?;
    client.stream.flush().await?;
    match client.read_packet().await? {
        Packet::ConnAck(ack) => {
            client.granted = check_connack(&ack)?;
            Ok(client)
        }
        p => Err(Failure::Unexpected(p.packet_type())),
    }
}

impl Client {
    /// Reads until one whole packet is decoded. No timeout of its own.
    pub async fn read_packet(&mut self) -> Result<Packet, Failure> {
        loop {
            if let Some(p) = decode(&mut self.rbuf, self.version, PACKET_BYTES_MAX)? {
                return Ok(p);
            }
            self.rbuf.reserve(1024);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(Failure::Closed);
            }
        }
    }

    /// Subscribes to `filter` at `qos` and returns the QoS granted. A 3.1.1 or 3.1
    /// SUBACK failure (0x80) is a refusal.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<QoS, Failure> {
        let mut out = BytesMut::new();
        put(&subscribe_packet(filter, qos), self.version, &mut out);
        let timeout = self.timeout;
        let exchange = async {
            self.stream.write_all(&out).await?;
            self.stream.flush().await?;
            granted_qos(self.read_packet().await?)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// Sends DISCONNECT and closes the write side; errors are ignored because the
    /// run is over either way.
    pub async fn disconnect(mut self) {
        let mut out = BytesMut::new();
        put(
            &Disconnect::new(ReasonCode::Success),
            self.version,
            &mut out,
        );
        let bye = async {
            let _ = self.stream.write_all(&out).await;
            match &mut self.stream {
                crate::transport::Stream::Quic(q) => q.close().await,
                other => {
                    let _ = other.shutdown().await;
                }
            }
        };
        let _ = tokio::time::timeout(self.timeout, bye).await;
    }
}

/// A connected client on a blocking `std` socket, for the paced latency publisher.
#[derive(Debug)]
pub struct BlockingClient {
    /// The connection, in blocking mode; flush after writing (TLS).
    pub stream: BlockingStream,
    /// Bytes read but not yet decoded.
    pub rbuf: BytesMut,
    /// Protocol version of the connection.
    pub version: ProtocolVersion,
    /// What CONNACK granted.
    pub granted: Granted,
}

/// The bench's one SUBSCRIBE: `filter` at `qos`, packet id 1.
fn subscribe_packet(filter: &str, qos: QoS) -> Subscribe {
    Subscribe {
        packet_id: 1,
        properties: Default::default(),
        subscriptions: vec![Subscription {
            filter: Str::try_from(filter).expect("bench topic filters are valid strings"),
            options: SubscriptionOptions::qos(qos),
        }],
    }
}

/// The QoS a SUBACK to [`subscribe_packet`] granted; a 3.1.1 or 3.1 failure
/// (0x80) is a refusal.
fn granted_qos(p: Packet) -> Result<QoS, Failure> {
    match p {
        Packet::SubAck(ack) if ack.packet_id == 1 => match ack.reason_codes.first().copied() {
            Some(ReasonCode::Success) => Ok(QoS::AtMostOnce),
            Some(ReasonCode::GrantedQoS1) => Ok(QoS::AtLeastOnce),
            Some(ReasonCode::GrantedQoS2) => Ok(QoS::ExactlyOnce),
            Some(rc) => Err(Failure::SubscribeRefused(rc)),
            None => Err(Failure::Unexpected(PacketType::SubAck)),
        },
        p => Err(Failure::Unexpected(p.packet_type())),
    }
}

/// The blocking twin of [`connect`], for client slot `slot` (its `--host` and
/// `--bind`).
pub fn connect_blocking(
    opts: &Options,
    client_id: &str,
    slot: usize,
) -> Result<BlockingClient, Failure> {
    let addr = opts.addr(slot);
    let stream = match &opts.tls {
        Some(tls) if tls.is_quic() => {
            // On a blocking thread of the runtime: its workers drive quinn.
            let handle = tokio::runtime::Handle::try_current()
                .map_err(|e| Failure::Io(format!("a QUIC client needs the runtime: {e}")))?;
            let connect = tls.connect_quic(slot, addr, opts.bind(slot));
            let stream = handle
                .block_on(async { tokio::time::timeout(opts.timeout, connect).await })
                .map_err(|_| Failure::Timeout)??;
            BlockingStream::Quic(Box::new(BlockingQuic::new(stream, handle, opts.timeout)?))
        }
        tls => {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            if let Some(ip) = opts.bind(slot) {
                socket.bind(&SocketAddr::new(ip, 0).into())?;
            }
            socket.connect_timeout(&addr.into(), opts.timeout)?;
            let tcp = std::net::TcpStream::from(socket);
            tcp.set_nodelay(true)?;
            tcp.set_read_timeout(Some(opts.timeout))?;
            tcp.set_write_timeout(Some(opts.timeout))?;
            match tls {
                None => BlockingStream::Plain(tcp),
                Some(tls) => tls.connect_blocking(slot, tcp)?,
            }
        }
    };
    let mut client = BlockingClient {
        stream,
        rbuf: BytesMut::with_capacity(READ_CHUNK_BYTES),
        version: opts.version,
        granted: Granted::NONE,
    };
    let mut out = BytesMut::new();
    put(&connect_packet(client_id, opts), opts.version, &mut out);
    client.stream.write_all(&out)?;
    client.stream.flush()?;
    loop {
        if let Some(p) = decode(&mut client.rbuf, client.version, PACKET_BYTES_MAX)? {
            return match p {
                Packet::ConnAck(ack) => {
                    client.granted = check_connack(&ack)?;
                    Ok(client)
                }
                p => Err(Failure::Unexpected(p.packet_type())),
            };
        }
        client.read_some()?;
    }
}

impl BlockingClient {
    /// One blocking read (bounded by the socket's read timeout) into `rbuf`.
    pub fn read_some(&mut self) -> Result<usize, Failure> {
        let start = self.rbuf.len();
        self.rbuf.resize(start + BLOCKING_READ_BYTES, 0);
        let r = self.stream.read(&mut self.rbuf[start..]);
        let n = *r.as_ref().unwrap_or(&0);
        self.rbuf.truncate(start + n);
        match r {
            Ok(0) => Err(Failure::Closed),
            Ok(n) => Ok(n),
            Err(e) => Err(e.into()),
        }
    }

    /// Subscribes to `filter` at `qos` and returns the QoS granted (blocking,
    /// bounded by the socket timeouts).
    pub fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<QoS, Failure> {
        let mut out = BytesMut::new();
        put(&subscribe_packet(filter, qos), self.version, &mut out);
        self.stream.write_all(&out)?;
        self.stream.flush()?;
        loop {
            if let Some(p) = decode(&mut self.rbuf, self.version, PACKET_BYTES_MAX)? {
                return granted_qos(p);
            }
            self.read_some()?;
        }
    }

    /// Reads what is there from a socket already in non-blocking mode; 0 when
    /// nothing is.
    pub fn read_nonblocking(&mut self) -> Result<usize, Failure> {
        match self.read_some() {
            Err(Failure::Timeout) => Ok(0),
            r => r,
        }
    }

    /// Reads whatever is already there without blocking; 0 when nothing is.
    pub fn read_ready(&mut self) -> Result<usize, Failure> {
        self.stream.set_nonblocking(true)?;
        let r = self.read_nonblocking();
        self.stream.set_nonblocking(false)?;
        r
    }
}
