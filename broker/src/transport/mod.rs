//! Transports: what sits between a TCP socket and the MQTT codec on each
//! listener kind. `mqtt` is the socket itself; `mqtts` adds TLS (rustls,
//! [`tls`]); `ws` adds WebSocket framing ([`ws`]); `wss` both. `quic` has no
//! socket on the shard: its bytes come and go through a [`quic::QuicPipe`] to
//! the QUIC endpoint thread (`crate::quic`), and the pipe travels in a
//! hand-off whole.
//!
//! A [`Transport`] reads and writes MQTT bytes whatever the kind. Its state
//! (the rustls connection, the WebSocket decoder) is `Send` and small enough
//! to travel: when the owner of a ClientID is another shard, the accepting
//! shard hands off the socket *and* the transport state
//! ([`Transport::into_parts`], [`Transport::from_parts`]), so every transport
//! gets the same one-hop hand-off as plain TCP and the owner shard does all
//! of the connection's I/O (docs/ARCHITECTURE.md, "Hand-off for every
//! transport").
//!
//! One task per connection uses its `Transport` (`server::conn`): one poll
//! writes, flushes and reads. Anything a read must send (a WebSocket PONG,
//! TLS records such as a key update answer) is flushed without waiting (a
//! non-blocking `send`) and, if the socket is full, left for the write side
//! of that poll: [`Transport::flush_needed`] tells it.

pub mod quic;
pub mod tls;
pub mod ws;

use std::fmt;
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use futures_lite::future::poll_fn;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};

use crate::config::{CertIdentity, ListenerConfig};
use quic::QuicPipe;
use ws::{Upgrade, WsDecoder};

/// Bytes read per read call while waiting for a WebSocket upgrade request.
const UPGRADE_READ_BYTES: usize = 1024;

/// Why a connection did not get past its transport handshake.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The TLS handshake failed (bad or missing client certificate, no common
    /// protocol version or cipher suite, not TLS at all, ...).
    #[error("TLS handshake failed: {0}")]
    Tls(rustls::Error),
    /// The HTTP request was not a WebSocket upgrade this listener serves.
    #[error("WebSocket upgrade refused: {0}")]
    Upgrade(String),
    /// The client closed the connection during the handshake.
    #[error("closed by the client during the handshake")]
    Eof,
    /// A socket error.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The moving parts of a [`Transport`], without its socket: what a hand-off
/// carries besides the file descriptor.
pub struct TransportState {
    tls: Option<Box<ServerConnection>>,
    ws: Option<Box<WsDecoder>>,
}

/// What carries a connection's bytes: a TCP socket, or the pipe to a QUIC
/// stream on the endpoint thread (`quic`).
enum Lower {
    Tcp(TcpStream),
    Quic(Box<QuicPipe>),
}

impl fmt::Debug for TransportState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportState")
            .field("tls", &self.tls.is_some())
            .field("ws", &self.ws)
            .finish()
    }
}

/// A connection's socket and the layers on it; reads and writes MQTT bytes.
pub struct Transport {
    tcp: Lower,
    tls: Option<Box<ServerConnection>>,
    ws: Option<Box<WsDecoder>>,
    /// Output the reader produced that the writer must send.
    flush_needed: bool,
    /// The WebSocket close code to send when the connection ends.
    ws_close_code: u16,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Transport");
        match &self.tcp {
            Lower::Tcp(tcp) => d.field("fd", &tcp.as_raw_fd()),
            Lower::Quic(pipe) => d.field("quic", pipe),
        }
        .field("tls", &self.tls.is_some())
        .field("ws", &self.ws)
        .finish()
    }
}

/// Wraps a glommio stream and a task context as blocking-style I/O for
/// rustls: `Pending` becomes `WouldBlock` (the waker is registered).
struct PollIo<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl io::Read for PollIo<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_read(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl io::Write for PollIo<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A non-blocking `send` on the socket that registers no waker: for output
/// the reader task produces (see the module doc).
struct NoWait<'a>(&'a TcpStream);

impl io::Write for NoWait<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: send(2) on a socket fd owned by the borrowed stream, with a
        // valid buffer and length.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends what rustls has queued without waiting; stops at a full socket.
fn flush_tls_nowait(tcp: &TcpStream, tls: &mut ServerConnection) {
    while tls.wants_write() {
        match tls.write_tls(&mut NoWait(tcp)) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// Sends what rustls has queued; `Pending` until the socket took all of it.
fn poll_flush_tls(
    tcp: &mut TcpStream,
    tls: &mut ServerConnection,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while tls.wants_write() {
        match tls.write_tls(&mut PollIo { tcp, cx }) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Poll::Ready(Ok(()))
}

/// Runs the server side of a TLS handshake to its end.
async fn tls_handshake(tcp: &mut TcpStream, tls: &mut ServerConnection) -> Result<(), AcceptError> {
    loop {
        poll_fn(|cx| poll_flush_tls(tcp, tls, cx)).await?;
        if !tls.is_handshaking() {
            return Ok(());
        }
        let n = poll_fn(|cx| match tls.read_tls(&mut PollIo { tcp, cx }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            r => Poll::Ready(r),
        })
        .await?;
        if n == 0 {
            return Err(AcceptError::Eof);
        }
        if let Err(e) = tls.process_new_packets() {
            // Tell the client why (rustls queued an alert), without waiting.
            flush_tls_nowait(tcp, tls);
            return Err(AcceptError::Tls(e));
        }
    }
}

impl Transport {
    /// Runs the handshakes of `listener`'s kind on a new connection: TLS with
    /// `tls` (for `mqtts`, `wss`), then the WebSocket upgrade (for `ws`,
    /// `wss`). Returns the transport, the MQTT bytes already received, and
    /// the username the client certificate gives (per
    /// `listener.username_from_cert`). The caller bounds the time it takes.
    pub async fn accept(
        tcp: TcpStream,
        listener: &ListenerConfig,
        tls: Option<Arc<ServerConfig>>,
    ) -> Result<(Transport, BytesMut, Option<String>), AcceptError> {
        let mut t = Transport {
            tcp: Lower::Tcp(tcp),
            tls: None,
            ws: None,
            flush_needed: false,
            ws_close_code: 1000,
        };
        let mut identity = None;
        if let Some(config) = tls {
            let mut conn = Box::new(ServerConnection::new(config).map_err(AcceptError::Tls)?);
            let Lower::Tcp(tcp) = &mut t.tcp else {
                unreachable!("built as TCP above")
            };
            tls_handshake(tcp, &mut conn).await?;
            if listener.username_from_cert != CertIdentity::None {
                identity = conn
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| tls::cert_identity(leaf, listener.username_from_cert));
            }
            t.tls = Some(conn);
        }
        let mut buf = BytesMut::new();
        if listener.kind.is_ws() {
            loop {
                match ws::parse_upgrade(&buf, &listener.path) {
                    Upgrade::Incomplete => {
                        let start = buf.len();
                        buf.resize(start + UPGRADE_READ_BYTES, 0);
                        let n = poll_fn(|cx| t.poll_read_lower(cx, &mut buf[start..])).await?;
                        buf.truncate(start + n);
                        if n == 0 {
                            return Err(AcceptError::Eof);
                        }
                    }
                    Upgrade::Reject { response, reason } => {
                        let _ = t.write_raw_all(&response).await;
                        return Err(AcceptError::Upgrade(reason));
                    }
                    Upgrade::Accept {
                        response, consumed, ..
                    } => {
                        t.write_raw_all(&response).await?;
                        let _ = buf.split_to(consumed);
                        let mut decoder = Box::<WsDecoder>::default();
                        let n = decoder
                            .decode(&mut buf)
                            .map_err(|e| AcceptError::Upgrade(e.to_string()))?;
                        buf.truncate(n);
                        t.flush_needed = decoder.has_pong();
                        t.ws = Some(decoder);
                        break;
                    }
                }
            }
        }
        Ok((t, buf, identity))
    }

    /// Splits off the socket for a hand-off; see [`Transport::from_parts`].
    /// A QUIC transport has no socket: its pipe travels instead (`Err`).
    pub fn into_parts(self) -> Result<(TcpStream, TransportState), Box<QuicPipe>> {
        match self.tcp {
            Lower::Tcp(tcp) => Ok((
                tcp,
                TransportState {
                    tls: self.tls,
                    ws: self.ws,
                },
            )),
            Lower::Quic(pipe) => Err(pipe),
        }
    }

    /// A transport over the pipe of an MQTT-over-QUIC stream.
    pub fn quic(pipe: Box<QuicPipe>) -> Transport {
        Transport {
            tcp: Lower::Quic(pipe),
            tls: None,
            ws: None,
            flush_needed: false,
            ws_close_code: 1000,
        }
    }

    /// Rebuilds a transport on the owner shard from the handed-off socket and state.
    pub fn from_parts(tcp: TcpStream, state: TransportState) -> Transport {
        let flush_needed = state.tls.as_ref().is_some_and(|t| t.wants_write())
            || state.ws.as_ref().is_some_and(|w| w.has_pong());
        Transport {
            tcp: Lower::Tcp(tcp),
            tls: state.tls,
            ws: state.ws,
            flush_needed,
            ws_close_code: 1000,
        }
    }

    /// A plain TCP transport.
    pub fn plain(tcp: TcpStream) -> Transport {
        Transport {
            tcp: Lower::Tcp(tcp),
            tls: None,
            ws: None,
            flush_needed: false,
            ws_close_code: 1000,
        }
    }

    /// Whether this is plain TCP with nothing of its own to send: all its
    /// state is in the kernel, so the connection may wait as a bare fd
    /// (`server::park`).
    pub fn is_plain(&self) -> bool {
        matches!(self.tcp, Lower::Tcp(_))
            && self.tls.is_none()
            && self.ws.is_none()
            && !self.flush_needed
    }

    /// The socket (for socket options and shutdown); `None` for QUIC.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match &self.tcp {
            Lower::Tcp(tcp) => Some(tcp),
            Lower::Quic(_) => None,
        }
    }

    /// The QUIC pipe, for a QUIC transport.
    pub fn quic_pipe(&mut self) -> Option<&mut QuicPipe> {
        match &mut self.tcp {
            Lower::Tcp(_) => None,
            Lower::Quic(pipe) => Some(pipe),
        }
    }

    /// Whether the writer has output of the reader's to send.
    pub fn flush_needed(&self) -> bool {
        self.flush_needed
    }

    /// Reads bytes below the WebSocket layer: plaintext of TLS, or the socket's.
    fn poll_read_lower(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let Transport {
            tcp,
            tls,
            flush_needed,
            ..
        } = self;
        let tcp = match tcp {
            Lower::Tcp(tcp) => tcp,
            Lower::Quic(pipe) => return pipe.poll_read(cx, buf),
        };
        let Some(tls) = tls else {
            return Pin::new(tcp).poll_read(cx, buf);
        };
        loop {
            match tls.reader().read(buf) {
                // 0: the client sent close_notify.
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let n = match tls.read_tls(&mut PollIo { tcp, cx }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            };
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            let state = tls.process_new_packets();
            if tls.wants_write() {
                flush_tls_nowait(tcp, tls);
                *flush_needed |= tls.wants_write();
            }
            if let Err(e) = state {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }

    /// Reads MQTT bytes into `buf`; 0 at the end of the stream (TCP FIN, TLS
    /// close_notify, WebSocket CLOSE).
    pub fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            if self.ws.as_ref().is_some_and(|w| w.is_closed()) {
                return Poll::Ready(Ok(0));
            }
            let n = ready!(self.poll_read_lower(cx, buf))?;
            let Some(ws) = self.ws.as_mut() else {
                return Poll::Ready(Ok(n));
            };
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            let m = match ws.decode(&mut buf[..n]) {
                Ok(m) => m,
                Err(e) => {
                    self.ws_close_code = e.close_code();
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
            };
            if ws.has_pong() {
                self.flush_needed = true;
            }
            if m > 0 {
                return Poll::Ready(Ok(m));
            }
        }
    }

    /// Writes some of `data` below the WebSocket layer (already framed);
    /// with TLS, the bytes are accepted once encrypted and queued, and
    /// [`Transport::poll_flush`] sends them.
    pub fn poll_write_raw(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let Transport { tcp, tls, .. } = self;
        let tcp = match tcp {
            Lower::Tcp(tcp) => tcp,
            Lower::Quic(pipe) => return pipe.poll_write(cx, data),
        };
        let Some(tls) = tls else {
            return Pin::new(tcp).poll_write(cx, data);
        };
        // Keep at most one write's worth of records queued.
        ready!(poll_flush_tls(tcp, tls, cx))?;
        let n = tls.writer().write(data)?;
        Poll::Ready(Ok(n))
    }

    /// Sends everything queued below the WebSocket layer.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Transport { tcp, tls, .. } = self;
        match (tcp, tls) {
            (Lower::Quic(pipe), _) => pipe.poll_flush(cx),
            (Lower::Tcp(tcp), Some(tls)) => poll_flush_tls(tcp, tls, cx),
            (Lower::Tcp(_), None) => Poll::Ready(Ok(())),
        }
    }

    /// Appends to `out` what the writer must send for the transport before
    /// `payload`, then `payload` itself, framed as the transport needs; clears
    /// [`Transport::flush_needed`]. Returns `false` when `payload` can be
    /// written as it is (no framing, nothing before it) and `out` is unused.
    pub fn frame(&mut self, payload: &[u8], out: &mut Vec<u8>) -> bool {
        self.flush_needed = false;
        let Some(ws) = self.ws.as_mut() else {
            return false;
        };
        ws.take_pong(out);
        if !payload.is_empty() {
            let mut header = [0u8; 10];
            let len = ws::binary_header(payload.len(), &mut header);
            out.extend_from_slice(&header[..len]);
            out.extend_from_slice(payload);
        }
        true
    }

    /// Writes `data` (MQTT bytes) completely, framed, and flushes: for the
    /// few packets sent outside the writer task (refusals at accept time).
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        let mut framed = Vec::new();
        if self.frame(data, &mut framed) {
            self.write_raw_all(&framed).await
        } else {
            self.write_raw_all(data).await
        }
    }

    async fn write_raw_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = poll_fn(|cx| self.poll_write_raw(cx, data)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            data = &data[n..];
        }
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Ends the transport's own protocol without waiting: a WebSocket CLOSE
    /// and a TLS close_notify, sent only if the socket has room. Called once,
    /// after the last data, before the TCP FIN.
    pub fn close_nowait(&mut self) {
        let tcp = match &mut self.tcp {
            Lower::Tcp(tcp) => tcp,
            Lower::Quic(pipe) => {
                pipe.set_done();
                return;
            }
        };
        let close = self
            .ws
            .as_ref()
            .map(|_| ws::close_frame(self.ws_close_code));
        match self.tls.as_mut() {
            Some(tls) => {
                if let Some(frame) = close {
                    let _ = tls.writer().write_all(&frame);
                }
                tls.send_close_notify();
                flush_tls_nowait(tcp, tls);
            }
            None => {
                if let Some(frame) = close {
                    let _ = NoWait(tcp).write(&frame);
                }
            }
        }
    }
}
