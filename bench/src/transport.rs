//! The byte streams a bench client speaks MQTT over: plain TCP, TLS (rustls,
//! aws-lc-rs provider) or MQTT over QUIC (quinn, one bidirectional stream,
//! ALPN `mqtt`, `--quic`), chosen once per run.
//!
//! - [`Tls`]: the client configuration built once per run from `--tls`, `--ca`,
//!   `--insecure`, `--cert`/`--key`, `--sni` and `--tls-resume`, shared by every
//!   connection (`Arc`).
//! - [`Stream`] for the tokio clients, with [`Stream::split`] into a read half and a
//!   write half that the scenario loops poll from one task, as they did with
//!   `TcpStream::split`.
//! - [`BlockingStream`] for the latency publisher's paced thread.
//!
//! The plain variants hand every call straight to the TCP stream: the enum costs
//! one match per call and nothing is allocated per message. On the TLS path rustls
//! keeps one record buffer per connection and reuses it; our read buffer is the
//! same `BytesMut` as on the plain path.
//!
//! One difference the loops must respect: a TLS write may accept plaintext that
//! rustls could not yet push to the socket, so after the last write of a batch the
//! writer must be flushed. [`WriteHalf::needs_flush`] says when, and
//! [`WriteHalf::write_or_flush`] does either in one future (a `select!` branch).
//!
//! QUIC: every connection has its own quinn endpoint (its own UDP socket, as a
//! TCP client has its own socket) and opens one stream (single-stream mode).
//! With `--quic-0rtt` the client configuration keeps session tickets and a
//! resuming connection sends its CONNECT as 0-RTT early data. The blocking
//! clients (the latency scenario's threads) reach their QUIC stream through
//! [`BlockingQuic`]: the connection stays on the tokio runtime, whose workers
//! drive quinn, and each blocking call waits on it.
//!
//! Not done here: WebSocket, TLS early data.

use std::io;
use std::net::{IpAddr, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// quinn's congestion controllers (`--quic-congestion`), as the broker's
/// `congestion` setting names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QuicCongestion {
    /// CUBIC, quinn's default.
    #[default]
    Cubic,
    /// NewReno.
    NewReno,
    /// BBR (quinn's, experimental).
    Bbr,
}

/// What the TLS flags asked for, before any file is read.
#[derive(Debug, Clone, Default)]
pub struct TlsFlags {
    /// MQTT over QUIC (`--quic`) instead of TLS over TCP: TLS 1.3, ALPN `mqtt`.
    pub quic: bool,
    /// `--quic-0rtt`: resume and send CONNECT as early data.
    pub quic_0rtt: bool,
    /// `--quic-congestion`.
    pub quic_congestion: QuicCongestion,
    /// PEM file of CA certificates to trust (else the CA list is empty and
    /// `insecure` must be set).
    pub ca: Option<PathBuf>,
    /// Skip verification of the broker's certificate chain and name (signatures
    /// on the handshake are still checked).
    pub insecure: bool,
    /// PEM client certificate chain for mutual TLS.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Server name sent as SNI and verified against the certificate; default the
    /// `--host` of each connection.
    pub sni: Option<String>,
    /// Let clients resume TLS sessions (tickets / session ids). Off by default so
    /// every `conn` connection measures a full handshake.
    pub resume: bool,
}

/// The TLS side of a run: one client configuration and the name each broker
/// address is verified against. Built once, shared by every connection.
#[derive(Debug, Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    /// With `--quic`: the quinn client configuration (over `config`).
    quic: Option<quinn::ClientConfig>,
    /// `--quic-0rtt`.
    quic_0rtt: bool,
    /// Server name per `--host` slot (same indexing as `Options::addrs`).
    names: Vec<ServerName<'static>>,
}

impl Tls {
    /// Reads the files and builds the client configuration. `hosts` are the
    /// `--host` values in order; each becomes the server name of its slot unless
    /// `flags.sni` is set. Errors name the flag and the file.
    pub fn new(flags: &TlsFlags, hosts: &[String]) -> anyhow::Result<Tls> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone());
        let builder = if flags.quic {
            builder.with_protocol_versions(&[&rustls::version::TLS13])
        } else {
            builder.with_safe_default_protocol_versions()
        }
        .context("TLS protocol versions")?;
        let builder = if flags.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert {
                    algorithms: provider.signature_verification_algorithms,
                }))
        } else {
            let Some(ca) = &flags.ca else {
                anyhow::bail!("--tls needs --ca FILE (a PEM CA to trust) or --insecure");
            };
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca, "--ca")? {
                roots.add(cert).with_context(|| {
                    format!("--ca {}: not a usable CA certificate", ca.display())
                })?;
            }
            builder.with_root_certificates(roots)
        };
        let mut config = match (&flags.cert, &flags.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "--cert")?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| anyhow::anyhow!("--key {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .context("--cert/--key: the key does not fit the certificate")?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => anyhow::bail!("--cert and --key go together"),
        };
        if !flags.resume && !flags.quic_0rtt {
            config.resumption = Resumption::disabled();
        }
        let quic = if flags.quic {
            config.alpn_protocols = vec![b"mqtt".to_vec()];
            config.enable_early_data = flags.quic_0rtt;
            let crypto =
                quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(config.clone()))
                    .context("QUIC client configuration")?;
            let mut transport = quinn::TransportConfig::default();
            transport.congestion_controller_factory(match flags.quic_congestion {
                QuicCongestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
                QuicCongestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
                QuicCongestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
            });
            let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
            quic.transport_config(Arc::new(transport));
            Some(quic)
        } else {
            None
        };
        let mut names = Vec::with_capacity(hosts.len().max(1));
        for host in hosts {
            let name = flags.sni.as_deref().unwrap_or(host);
            names.push(server_name(name)?);
        }
        if names.is_empty() {
            names.push(server_name(flags.sni.as_deref().unwrap_or("127.0.0.1"))?);
        }
        Ok(Tls {
            config: Arc::new(config),
            quic,
            quic_0rtt: flags.quic_0rtt,
            names,
        })
    }

    /// Whether connections are MQTT over QUIC.
    pub fn is_quic(&self) -> bool {
        self.quic.is_some()
    }

    /// Opens an MQTT-over-QUIC connection for client slot `slot` to `addr`
    /// from `bind` (its own endpoint and UDP socket) and its one stream. With
    /// `--quic-0rtt` and a ticket, the stream is usable before the handshake
    /// completes (what is written first goes as early data).
    pub async fn connect_quic(
        &self,
        slot: usize,
        addr: std::net::SocketAddr,
        bind: Option<IpAddr>,
    ) -> io::Result<Stream> {
        let config = self
            .quic
            .clone()
            .ok_or_else(|| io::Error::other("not a QUIC run"))?;
        let local = match (bind, addr) {
            (Some(ip), _) => std::net::SocketAddr::new(ip, 0),
            (None, std::net::SocketAddr::V4(_)) => "0.0.0.0:0".parse().expect("address"),
            (None, std::net::SocketAddr::V6(_)) => "[::]:0".parse().expect("address"),
        };
        let endpoint = quinn::Endpoint::client(local)?;
        let name = match self.name(slot) {
            ServerName::DnsName(n) => n.as_ref().to_owned(),
            ServerName::IpAddress(ip) => IpAddr::from(ip).to_string(),
            _ => "localhost".to_owned(),
        };
        let connecting = endpoint
            .connect_with(config, addr, &name)
            .map_err(io::Error::other)?;
        let conn = if self.quic_0rtt {
            match connecting.into_0rtt() {
                Ok((conn, _accepted)) => conn,
                Err(connecting) => connecting.await.map_err(io::Error::other)?,
            }
        } else {
            connecting.await.map_err(io::Error::other)?
        };
        let (send, recv) = conn.open_bi().await.map_err(io::Error::other)?;
        Ok(Stream::Quic(Box::new(QuicStream {
            send,
            recv,
            conn,
            endpoint,
        })))
    }

    fn name(&self, slot: usize) -> ServerName<'static> {
        self.names[slot % self.names.len()].clone()
    }

    /// Runs the TLS handshake of client slot `slot` over a connected socket.
    pub async fn connect(&self, slot: usize, tcp: TcpStream) -> io::Result<Stream> {
        let connector = TlsConnector::from(self.config.clone());
        let tls = connector.connect(self.name(slot), tcp).await?;
        Ok(Stream::Tls(Box::new(tls)))
    }

    /// Runs the TLS handshake of client slot `slot` over a blocking socket (whose
    /// read and write timeouts bound it).
    pub fn connect_blocking(
        &self,
        slot: usize,
        mut tcp: StdTcpStream,
    ) -> io::Result<BlockingStream> {
        let mut conn = ClientConnection::new(self.config.clone(), self.name(slot))
            .map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(BlockingStream::Tls(Box::new(rustls::StreamOwned::new(
            conn, tcp,
        ))))
    }
}

fn server_name(name: &str) -> anyhow::Result<ServerName<'static>> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name.to_string())
        .map_err(|_| anyhow::anyhow!("--sni/--host {name:?}: not a valid TLS server name"))
}

fn read_certs(path: &PathBuf, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{flag} {}: no PEM certificate in the file", path.display());
    }
    Ok(certs)
}

/// `--insecure`: accepts any certificate chain and name, but still checks that
/// the broker signed the handshake with the key of the certificate it sent, so
/// the handshake costs what a verified one costs minus the chain validation.
#[derive(Debug)]
struct AcceptAnyCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// One MQTT-over-QUIC connection: its stream, and what keeps it open.
#[derive(Debug)]
pub struct QuicStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
}

/// Longest a client waits for the broker to close a QUIC connection after its
/// DISCONNECT ([`QuicStream::close`]).
const QUIC_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl QuicStream {
    /// Ends the connection as a TCP close would: finishes the stream, waits (at most
    /// [`QUIC_CLOSE_WAIT`]) until the broker, having read everything (the DISCONNECT
    /// included), closes the connection, then closes it from this side and lets the
    /// endpoint send that. quinn sends from its driver task, so a process that exits
    /// right after writing its DISCONNECT (the busy-poll latency run did) sent nothing,
    /// and, with no kernel to send a FIN, the broker kept the session connected and
    /// subscribed until its keep alive ran out: the next run's publisher on the same
    /// topic then had its PUBACKs held by back-pressure for that dead subscriber's full
    /// queue (2 s at a time; a 20 s stall in a 10 s run).
    pub async fn close(&mut self) {
        let _ = self.send.finish();
        let _ = tokio::time::timeout(QUIC_CLOSE_WAIT, self.conn.closed()).await;
        self.conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(QUIC_CLOSE_WAIT, self.endpoint.wait_idle()).await;
    }
}

/// A connected byte stream on tokio.
#[derive(Debug)]
pub enum Stream {
    /// MQTT over QUIC: one bidirectional stream (boxed like TLS).
    Quic(Box<QuicStream>),
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the rustls state is large and idle `conn` clients
    /// should not pay for it on the plain path).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Splits into halves that one task polls together (both borrow `self`).
    /// Plain TCP splits without any lock; TLS shares the session between the
    /// halves through tokio's split.
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Quic(q) => (ReadHalf::Quic(&mut q.recv), WriteHalf::Quic(&mut q.send)),
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (
                    ReadHalf::Tls(r),
                    WriteHalf::Tls {
                        half: w,
                        unflushed: false,
                    },
                )
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Stream::Quic(q) => Pin::new(&mut q.recv).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Stream::Quic(q) => Pin::new(&mut q.send)
                .poll_write(cx, buf)
                .map_err(io::Error::from),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            Stream::Quic(q) => Pin::new(&mut q.send).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            Stream::Quic(q) => Pin::new(&mut q.send).poll_shutdown(cx),
        }
    }
}

/// The read half of a [`Stream`].
#[derive(Debug)]
pub enum ReadHalf<'a> {
    /// Plain TCP.
    Plain(tcp::ReadHalf<'a>),
    /// TLS.
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
    /// QUIC: the stream's receiving side.
    Quic(&'a mut quinn::RecvStream),
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Quic(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

/// The write half of a [`Stream`].
#[derive(Debug)]
pub enum WriteHalf<'a> {
    /// Plain TCP: every accepted byte is in the kernel.
    Plain(tcp::WriteHalf<'a>),
    /// TLS: accepted bytes may wait in rustls until a flush.
    Tls {
        /// The half.
        half: tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>,
        /// Bytes were accepted since the last completed flush.
        unflushed: bool,
    },
    /// QUIC: accepted bytes are in quinn's send buffer, sent without a flush.
    Quic(&'a mut quinn::SendStream),
}

impl WriteHalf<'_> {
    /// Whether bytes accepted by a write may still wait in the TLS session. Never
    /// on plain TCP.
    pub fn needs_flush(&self) -> bool {
        matches!(
            self,
            WriteHalf::Tls {
                unflushed: true,
                ..
            }
        )
    }

    /// Writes some of `buf`, or flushes when `buf` is empty; returns the bytes
    /// of `buf` accepted. For a `select!` branch enabled by
    /// `!buf.is_empty() || needs_flush()`.
    pub async fn write_or_flush(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            self.flush().await?;
            Ok(0)
        } else {
            self.write(buf).await
        }
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Tls { half, unflushed } => {
                let r = Pin::new(half).poll_write(cx, buf);
                if let Poll::Ready(Ok(n)) = &r
                    && *n > 0
                {
                    *unflushed = true;
                }
                r
            }
            WriteHalf::Quic(s) => Pin::new(&mut **s)
                .poll_write(cx, buf)
                .map_err(io::Error::from),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Quic(s) => Pin::new(&mut **s).poll_flush(cx),
            WriteHalf::Tls { half, unflushed } => {
                let r = Pin::new(half).poll_flush(cx);
                if let Poll::Ready(Ok(())) = &r {
                    *unflushed = false;
                }
                r
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Tls { half, .. } => Pin::new(half).poll_shutdown(cx),
            WriteHalf::Quic(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A connected blocking byte stream, for the latency scenario's threads. Every
/// write is followed by a flush at the call site (a no-op on plain TCP).
#[derive(Debug)]
pub enum BlockingStream {
    /// Plain TCP.
    Plain(StdTcpStream),
    /// TLS over TCP.
    Tls(Box<rustls::StreamOwned<ClientConnection, StdTcpStream>>),
    /// MQTT over QUIC.
    Quic(Box<BlockingQuic>),
}

impl BlockingStream {
    /// Non-blocking mode: a read or write that cannot proceed at once fails
    /// with `WouldBlock` instead of waiting (up to the timeout).
    pub fn set_nonblocking(&mut self, on: bool) -> io::Result<()> {
        match self {
            BlockingStream::Plain(s) => s.set_nonblocking(on),
            BlockingStream::Tls(s) => s.sock.set_nonblocking(on),
            BlockingStream::Quic(q) => {
                q.nonblocking = on;
                Ok(())
            }
        }
    }

    /// Ends the write side: a TLS close_notify first, then the TCP FIN; on
    /// QUIC, the stream's FIN.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        let tcp = match self {
            BlockingStream::Plain(s) => s,
            BlockingStream::Tls(s) => {
                s.conn.send_close_notify();
                io::Write::flush(s)?;
                &s.sock
            }
            BlockingStream::Quic(q) => {
                let (handle, stream) = (q.handle.clone(), &mut q.stream);
                handle.block_on(stream.close());
                return Ok(());
            }
        };
        tcp.shutdown(std::net::Shutdown::Write)
    }
}

impl io::Read for BlockingStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BlockingStream::Plain(s) => s.read(buf),
            BlockingStream::Tls(s) => s.read(buf),
            BlockingStream::Quic(q) => q.read(buf),
        }
    }
}

impl io::Write for BlockingStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BlockingStream::Plain(s) => s.write(buf),
            BlockingStream::Tls(s) => s.write(buf),
            BlockingStream::Quic(q) => q.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            BlockingStream::Plain(s) => s.flush(),
            BlockingStream::Tls(s) => s.flush(),
            // quinn sends what it accepted without a flush.
            BlockingStream::Quic(_) => Ok(()),
        }
    }
}

/// An MQTT-over-QUIC stream used from a blocking thread (not a runtime
/// worker): quinn's connection is driven by the runtime's workers, and a
/// blocking read or write waits on the stream through the runtime's handle,
/// for at most `timeout` (a read then fails with `TimedOut`, as a TCP socket's
/// read timeout does). In non-blocking mode a call polls the stream once and
/// fails with `WouldBlock` when it cannot proceed.
#[derive(Debug)]
pub struct BlockingQuic {
    stream: Box<QuicStream>,
    handle: tokio::runtime::Handle,
    timeout: std::time::Duration,
    nonblocking: bool,
}

impl BlockingQuic {
    /// Wraps `stream`, whose runtime `handle` drives it; blocking calls wait
    /// at most `timeout`.
    pub fn new(
        stream: Stream,
        handle: tokio::runtime::Handle,
        timeout: std::time::Duration,
    ) -> io::Result<BlockingQuic> {
        match stream {
            Stream::Quic(stream) => Ok(BlockingQuic {
                stream,
                handle,
                timeout,
                nonblocking: false,
            }),
            _ => Err(io::Error::other("not a QUIC stream")),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let recv = &mut self.stream.recv;
        let mut read = ReadBuf::new(buf);
        let r = if self.nonblocking {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match Pin::new(recv).poll_read(&mut cx, &mut read) {
                Poll::Ready(r) => r,
                Poll::Pending => return Err(io::ErrorKind::WouldBlock.into()),
            }
        } else {
            let wait = std::future::poll_fn(|cx| Pin::new(&mut *recv).poll_read(cx, &mut read));
            self.handle
                .block_on(async { tokio::time::timeout(self.timeout, wait).await })
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
        };
        r.map(|()| read.filled().len())
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let send = &mut self.stream.send;
        if self.nonblocking {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            return match Pin::new(send).poll_write(&mut cx, buf) {
                Poll::Ready(r) => r.map_err(io::Error::from),
                Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
            };
        }
        self.handle
            .block_on(async { tokio::time::timeout(self.timeout, send.write(buf)).await })
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
            .map_err(io::Error::from)
    }
}
