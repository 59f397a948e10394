//! The bridge's connection to the remote broker: TCP, optionally TLS
//! (rustls client: the remote's certificate verified against `ca_file`, a
//! client certificate when configured, SNI), optionally WebSocket frames
//! (binary frames, masked as a client must; [`ws`]); or a QUIC stream, whose
//! connection runs on the bridges' QUIC thread ([`super::quic`]) and reaches
//! the shard through a pipe. Poll-based, so the bridge task waits on reading,
//! writing and the engine in one poll.

use std::io::{self, Read as _, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_lite::future::poll_fn;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::ws::{WsClient, upgrade_request};
use crate::config::BridgeConfig;
use crate::transport::quic::QuicPipe;

/// Ciphertext read per TLS read call.
const TLS_READ_BYTES: usize = 16 * 1024;

/// How long the TCP connect, TLS handshake and WebSocket upgrade may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS client settings of a bridge, built once per bridge start.
pub fn tls_config(c: &BridgeConfig) -> Result<Arc<ClientConfig>, String> {
    let Some(ca) = &c.ca_file else {
        return Err("ca_file is required for TLS".into());
    };
    let certs = |field: &str, path: &std::path::Path| {
        CertificateDer::pem_file_iter(path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{field} {}: {e}", path.display()))
    };
    let mut roots = RootCertStore::empty();
    for cert in certs("ca_file", ca)? {
        roots
            .add(cert)
            .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let config = match (&c.cert_file, &c.key_file) {
        (Some(cert), Some(key)) => {
            let chain = certs("cert_file", cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("key_file {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("cert_file/key_file: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// What carries the bytes: a TCP socket, or the pipe to a QUIC stream.
enum Socket {
    Tcp(TcpStream),
    Quic(Box<QuicPipe>),
}

impl Socket {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Quic(p) => p.poll_read(cx, buf),
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, data),
            Socket::Quic(p) => p.poll_write(cx, data),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Quic(p) => p.poll_flush(cx),
        }
    }
}

/// Where the remote is, resolved, and the TLS settings of its transport.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The remote's address.
    pub addr: std::net::SocketAddr,
    /// TLS over TCP (`mqtts`, `wss`).
    pub tls: Option<&'a Arc<ClientConfig>>,
    /// QUIC (`quic`): the quinn client settings, TLS included.
    pub quic: Option<&'a quinn::ClientConfig>,
}

/// A connection to the remote.
pub struct LinkStream {
    socket: Socket,
    tls: Option<Box<ClientConnection>>,
    /// TLS records waiting to be written to the socket.
    tls_out: Vec<u8>,
    tls_out_pos: usize,
    ws: Option<WsClient>,
    /// WebSocket frames of the MQTT bytes accepted by `poll_write`, waiting.
    ws_out: Vec<u8>,
    ws_out_pos: usize,
}

impl std::fmt::Debug for LinkStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkStream")
            .field("quic", &matches!(self.socket, Socket::Quic(_)))
            .field("tls", &self.tls.is_some())
            .field("ws", &self.ws.is_some())
            .finish()
    }
}

impl LinkStream {
    /// Connects to the remote and runs the TLS handshake and WebSocket
    /// upgrade, or the QUIC handshake and opens the MQTT stream.
    pub async fn connect(c: &BridgeConfig, target: Target<'_>) -> Result<LinkStream, String> {
        let Target { addr, tls, quic } = target;
        let name = c.sni.clone().unwrap_or_else(|| c.host().to_owned());
        let socket = match quic {
            Some(config) => {
                // Checked here as for TLS over TCP: the QUIC thread's error
                // would say less.
                ServerName::try_from(name.clone())
                    .map_err(|e| format!("sni {name:?} is not a valid server name: {e}"))?;
                let pipe =
                    super::quic::connect(addr, name.clone(), config.clone(), CONNECT_TIMEOUT)
                        .await?;
                Socket::Quic(Box::new(pipe))
            }
            None => {
                let tcp = glommio::timer::timeout(CONNECT_TIMEOUT, async {
                    TcpStream::connect(addr).await.map_err(|e| {
                        glommio::GlommioError::IoError(io::Error::other(e.to_string()))
                    })
                })
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
                let _ = tcp.set_nodelay(true);
                Socket::Tcp(tcp)
            }
        };
        let mut s = LinkStream {
            socket,
            tls: None,
            tls_out: Vec::new(),
            tls_out_pos: 0,
            ws: None,
            ws_out: Vec::new(),
            ws_out_pos: 0,
        };
        if let Some(config) = tls.filter(|_| quic.is_none()) {
            let server_name = ServerName::try_from(name.clone())
                .map_err(|e| format!("sni {name:?} is not a valid server name: {e}"))?;
            let conn = ClientConnection::new(config.clone(), server_name)
                .map_err(|e| format!("TLS setup: {e}"))?;
            s.tls = Some(Box::new(conn));
            glommio::timer::timeout(CONNECT_TIMEOUT, async {
                s.handshake()
                    .await
                    .map_err(|e| glommio::GlommioError::IoError(io::Error::other(e)))
            })
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        }
        if c.transport().is_ws() {
            let (request, key) = upgrade_request(c.host(), &c.ws_path);
            glommio::timer::timeout(CONNECT_TIMEOUT, async {
                s.upgrade(&request, &key)
                    .await
                    .map_err(|e| glommio::GlommioError::IoError(io::Error::other(e)))
            })
            .await
            .map_err(|e| format!("WebSocket upgrade with {addr}: {e}"))?;
        }
        Ok(s)
    }

    async fn handshake(&mut self) -> Result<(), String> {
        loop {
            let tls = self.tls.as_mut().expect("TLS");
            if tls.wants_write() {
                tls.write_tls(&mut self.tls_out)
                    .map_err(|e| e.to_string())?;
            }
            poll_fn(|cx| self.poll_flush_tls(cx))
                .await
                .map_err(|e| e.to_string())?;
            let tls = self.tls.as_mut().expect("TLS");
            if !tls.is_handshaking() {
                return Ok(());
            }
            if tls.wants_read() {
                let mut buf = vec![0u8; TLS_READ_BYTES];
                let n = poll_fn(|cx| self.socket.poll_read(cx, &mut buf))
                    .await
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("closed by the remote during the handshake".into());
                }
                let tls = self.tls.as_mut().expect("TLS");
                tls.read_tls(&mut &buf[..n]).map_err(|e| e.to_string())?;
                tls.process_new_packets().map_err(|e| e.to_string())?;
            }
        }
    }

    async fn upgrade(&mut self, request: &[u8], key: &str) -> Result<(), String> {
        let mut data = request;
        while !data.is_empty() {
            let n = poll_fn(|cx| self.poll_write_lower(cx, data))
                .await
                .map_err(|e| e.to_string())?;
            data = &data[n..];
        }
        poll_fn(|cx| self.poll_flush(cx))
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = poll_fn(|cx| self.poll_read_lower(cx, &mut buf))
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed by the remote during the upgrade".into());
            }
            response.extend_from_slice(&buf[..n]);
            if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                let mut ws = WsClient::check_response(&response[..end + 4], key)?;
                // Frames the server sent right after its response.
                ws.push_input(&response[end + 4..]);
                self.ws = Some(ws);
                return Ok(());
            }
            if response.len() > 16 * 1024 {
                return Err("upgrade response over 16 KiB".into());
            }
        }
    }

    fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tls_out_pos < self.tls_out.len() {
            let n = ready!(
                self.socket
                    .poll_write(cx, &self.tls_out[self.tls_out_pos..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tls_out_pos += n;
        }
        self.tls_out.clear();
        self.tls_out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads bytes below the WebSocket layer (plain or decrypted).
    fn poll_read_lower(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            let Some(tls) = self.tls.as_mut() else {
                return self.socket.poll_read(cx, buf);
            };
            match tls.reader().read(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let mut cipher = [0u8; TLS_READ_BYTES];
            let n = ready!(self.socket.poll_read(cx, &mut cipher))?;
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            let tls = self.tls.as_mut().expect("TLS");
            tls.read_tls(&mut &cipher[..n])?;
            tls.process_new_packets().map_err(io::Error::other)?;
            while tls.wants_write() {
                tls.write_tls(&mut self.tls_out)?;
            }
            // Best effort now (a key update answer); the write side flushes the rest.
            let _ = self.poll_flush_tls(cx)?;
        }
    }

    /// Writes bytes below the WebSocket layer.
    fn poll_write_lower(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.tls.is_none() {
            return self.socket.poll_write(cx, data);
        }
        ready!(self.poll_flush_tls(cx))?;
        let tls = self.tls.as_mut().expect("TLS");
        let n = tls.writer().write(data)?;
        while tls.wants_write() {
            tls.write_tls(&mut self.tls_out)?;
        }
        // The records are queued; flushing continues in `poll_flush`.
        let _ = self.poll_flush_tls(cx)?;
        Poll::Ready(Ok(n))
    }

    /// Reads MQTT bytes; `Ok(0)` when the remote closed.
    pub fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if self.ws.is_none() {
            return self.poll_read_lower(cx, buf);
        }
        loop {
            let ws = self.ws.as_mut().expect("WebSocket");
            match ws.take_payload(buf) {
                Ok(Some(n)) => return Poll::Ready(Ok(n)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(io::Error::other(e))),
            }
            if ws.closed() {
                return Poll::Ready(Ok(0));
            }
            let mut raw = [0u8; 4096];
            let n = ready!(self.poll_read_lower(cx, &mut raw))?;
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            let ws = self.ws.as_mut().expect("WebSocket");
            ws.push_input(&raw[..n]);
            if let Some(pong) = ws.take_control_reply() {
                self.ws_out.extend_from_slice(&pong);
            }
        }
    }

    /// Writes MQTT bytes; all of `data` is accepted or none.
    pub fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.ws.is_none() {
            return self.poll_write_lower(cx, data);
        }
        ready!(self.poll_flush_ws(cx))?;
        let ws = self.ws.as_mut().expect("WebSocket");
        ws.frame(data, &mut self.ws_out);
        let _ = self.poll_flush_ws(cx)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush_ws(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.ws_out_pos < self.ws_out.len() {
            let out = std::mem::take(&mut self.ws_out);
            let r = self.poll_write_lower(cx, &out[self.ws_out_pos..]);
            self.ws_out = out;
            let n = ready!(r)?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.ws_out_pos += n;
        }
        self.ws_out.clear();
        self.ws_out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes out whatever the layers buffered.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_flush_ws(cx))?;
        if self.tls.is_some() {
            ready!(self.poll_flush_tls(cx))?;
        }
        self.socket.poll_flush(cx)
    }

    /// Shuts the socket down without waiting (the fd closes on drop); a
    /// QUIC stream is finished after what was written, and its connection
    /// closed.
    pub fn close(&mut self) {
        use std::os::fd::AsRawFd as _;
        match &mut self.socket {
            // SAFETY: shutdown(2) on the fd this stream owns and keeps open.
            Socket::Tcp(tcp) => unsafe {
                libc::shutdown(tcp.as_raw_fd(), libc::SHUT_RDWR);
            },
            Socket::Quic(pipe) => {
                pipe.set_done();
                pipe.shutdown_write();
            }
        }
    }
}
