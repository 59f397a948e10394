//! The shard's end of an MQTT-over-QUIC connection: a [`QuicPipe`] carries
//! the MQTT bytes of the connection's stream between the QUIC endpoint thread
//! (`crate::quic`, quinn on tokio) and the shard that serves the connection.
//!
//! A pipe is two channels of byte chunks, so it is `Send` and moves between
//! shards in a hand-off like a socket's fd does. The endpoint thread feeds
//! what the client's stream delivers (`Bytes` chunks straight from quinn, no
//! copy) and writes what the shard sends to the stream. Both directions are
//! bounded, so nothing buffers without limit:
//! - client to shard: at most `chunks` chunks (the endpoint reads at most 64
//!   KiB at a time); a shard that stops reading stops the endpoint reading
//!   the stream, and QUIC flow control holds the client back.
//! - shard to client: at most `out_bytes_max` bytes taken from the shard and
//!   not yet handed to quinn ([`OutGate`]). This direction plays the part of a
//!   TCP socket's send buffer: a write takes what fits, like `send(2)`, and
//!   waits only when the pipe is full. A bound in bytes, not chunks, keeps
//!   the room independent of how the connection task happened to cut its
//!   writes: eight small writes once filled a pipe of eight chunks, so a
//!   QUIC subscriber whose endpoint thread was briefly off the CPU looked
//!   like a full socket and lost QoS 0 messages to the overflow policy.
//!
//! The end of either side is the channel's disconnection: the endpoint drops
//! its sender when the stream ends or the connection is lost (the shard reads
//! end of stream), and its receiver when it stops writing (the shard's next
//! write fails); the shard drops its sender when it ends the connection (the
//! endpoint finishes the stream after the last chunk and closes the QUIC
//! connection with the pipe's close code).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use flume::r#async::RecvStream;
use futures_lite::Stream;

/// Application close codes of the QUIC connection (`CONNECTION_CLOSE` of
/// type 0x1d), which say why the broker closed it.
pub mod close_code {
    /// The MQTT connection ended normally (DISCONNECT, or the broker's
    /// CONNACK or DISCONNECT with a reason was written before the close).
    pub const DONE: u32 = 0;
    /// The stream did not carry a valid MQTT connection (first packet not a
    /// CONNECT, malformed bytes, a refused handshake): nothing more to say.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The broker could not take the connection now (shards busy, too many
    /// handshakes, shutting down).
    pub const BUSY: u32 = 2;
    /// No MQTT stream was opened within the connect timeout.
    pub const NO_STREAM: u32 = 3;
}

/// The shard's end of one MQTT-over-QUIC stream (see the module doc).
pub struct QuicPipe {
    /// Chunks the client sent, in order; disconnected at the end of the stream.
    rx: RecvStream<'static, Bytes>,
    /// The unread part of the last chunk received.
    rest: Bytes,
    /// Where output goes; `None` once the shard shut its sending side. The
    /// channel itself is unbounded: `out` bounds what is in it.
    tx: Option<flume::Sender<Bytes>>,
    /// The bytes of output in flight to the endpoint, and the room left.
    out: Arc<OutGate>,
    /// Most bytes of output in flight.
    out_bytes_max: usize,
    /// The close code the endpoint uses when the shard's side ends.
    close: Arc<AtomicU32>,
    peer: SocketAddr,
}

impl fmt::Debug for QuicPipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicPipe")
            .field("peer", &self.peer)
            .field("rest", &self.rest.len())
            .field("open", &self.tx.is_some())
            .field("out_bytes", &self.out.queued.load(Ordering::Relaxed))
            .finish()
    }
}

/// The bound of the shard-to-client direction, shared by both ends: the
/// bytes the shard wrote that the endpoint has not yet handed to quinn. One
/// writer (the shard's connection task) adds, one reader (the endpoint's
/// writer) subtracts; no lock, no allocation per write beyond the chunk.
#[derive(Debug, Default)]
pub struct OutGate {
    /// Bytes in flight.
    queued: AtomicUsize,
    /// The endpoint stopped taking output (connection lost or ended).
    closed: AtomicBool,
    /// The shard's connection task, when it waits for room.
    room: AtomicWaker,
}

/// The endpoint's side of the shard-to-client direction: chunks to write to
/// the stream; [`OutReceiver::written`] gives their room back.
#[derive(Debug)]
pub struct OutReceiver {
    rx: flume::Receiver<Bytes>,
    gate: Arc<OutGate>,
}

impl OutReceiver {
    /// The next chunk the shard sent; `None` once the shard shut its side
    /// and every chunk was taken.
    pub async fn recv(&self) -> Option<Bytes> {
        self.rx.recv_async().await.ok()
    }

    /// `bytes` of output were handed to quinn (or dropped with the stream):
    /// their room goes back to the shard, which is woken if it waited.
    pub fn written(&self, bytes: usize) {
        self.gate.queued.fetch_sub(bytes, Ordering::AcqRel);
        self.gate.room.wake();
    }
}

impl Drop for OutReceiver {
    fn drop(&mut self) {
        // A shard waiting for room would otherwise wait for ever.
        self.gate.closed.store(true, Ordering::Release);
        self.gate.room.wake();
    }
}

/// The endpoint's end of a pipe: where it puts what the client sent, where
/// it takes what to send, and the close code the shard chose.
#[derive(Debug)]
pub struct QuicPipeEnd {
    /// Chunks the client sent, for the shard.
    pub to_shard: flume::Sender<Bytes>,
    /// Chunks the shard sends to the client.
    pub from_shard: OutReceiver,
    /// The close code for the connection once `from_shard` is disconnected.
    pub close: Arc<AtomicU32>,
}

impl QuicPipe {
    /// A pipe for a connection from `peer`, holding at most `chunks` chunks
    /// from the client and `out_bytes_max` bytes (at least 1) for it.
    pub fn new(peer: SocketAddr, chunks: usize, out_bytes_max: usize) -> (QuicPipe, QuicPipeEnd) {
        let (to_shard, rx) = flume::bounded(chunks);
        let (tx, from_shard) = flume::unbounded();
        let close = Arc::new(AtomicU32::new(close_code::PROTOCOL_ERROR));
        let out = Arc::new(OutGate::default());
        (
            QuicPipe {
                rx: rx.into_stream(),
                rest: Bytes::new(),
                tx: Some(tx),
                out: out.clone(),
                out_bytes_max: out_bytes_max.max(1),
                close: close.clone(),
                peer,
            },
            QuicPipeEnd {
                to_shard,
                from_shard: OutReceiver {
                    rx: from_shard,
                    gate: out,
                },
                close,
            },
        )
    }

    /// The client's address when the connection was accepted.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Reads MQTT bytes into `buf`; 0 at the end of the stream.
    pub fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        while self.rest.is_empty() {
            match Pin::new(&mut self.rx).poll_next(cx) {
                Poll::Ready(Some(chunk)) => self.rest = chunk,
                Poll::Ready(None) => return Poll::Ready(Ok(0)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = buf.len().min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        let _ = self.rest.split_to(n);
        Poll::Ready(Ok(n))
    }

    /// Takes as much of `data` for sending as the pipe has room for (as
    /// `send(2)` on a socket does); `Pending` only when it is full.
    pub fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let broken = || Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        let Some(tx) = &self.tx else {
            return broken();
        };
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let gate = &self.out;
        let mut queued = gate.queued.load(Ordering::Acquire);
        if queued >= self.out_bytes_max {
            gate.room.register(cx.waker());
            // The endpoint may have made room (or gone) before the register.
            queued = gate.queued.load(Ordering::Acquire);
            if queued >= self.out_bytes_max && !gate.closed.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        if gate.closed.load(Ordering::Acquire) {
            return broken();
        }
        // Only this side adds, so the room does not shrink under us.
        let n = data.len().min(self.out_bytes_max - queued);
        gate.queued.fetch_add(n, Ordering::AcqRel);
        if tx.send(Bytes::copy_from_slice(&data[..n])).is_err() {
            return broken();
        }
        Poll::Ready(Ok(n))
    }

    /// Nothing waits on the shard's side: what [`QuicPipe::poll_write`] took
    /// is with the endpoint (as a socket's accepted bytes are with the kernel).
    pub fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Marks the connection as ended normally: the endpoint closes it with
    /// [`close_code::DONE`] after the last byte.
    pub fn set_done(&self) {
        self.close.store(close_code::DONE, Ordering::Relaxed);
    }

    /// Shuts the sending side: the endpoint finishes the stream after what
    /// was sent, then closes the connection.
    pub fn shutdown_write(&mut self) {
        self.tx = None;
    }
}

#[cfg(test)]
mod tests {
    //! Goal: bytes cross the pipe in order in both directions, a full pipe
    //! holds the writer back (by bytes, not by how the writes were cut), and
    //! either end's drop is an end of stream (or a failed write).
    //! Method: poll the pipe by hand with a no-op waker.

    use std::task::Waker;

    use super::*;

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn chunks_cross_in_order_and_the_byte_bound_holds_the_writer() {
        let (mut pipe, end) = QuicPipe::new("127.0.0.1:1".parse().unwrap(), 2, 4);
        end.to_shard
            .try_send(Bytes::from_static(b"hello "))
            .unwrap();
        end.to_shard.try_send(Bytes::from_static(b"world")).unwrap();
        let mut buf = [0u8; 4];
        let mut got = Vec::new();
        while got.len() < 11 {
            match pipe.poll_read(&mut cx(), &mut buf) {
                Poll::Ready(Ok(n)) => got.extend_from_slice(&buf[..n]),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, b"hello world");
        assert!(pipe.poll_read(&mut cx(), &mut buf).is_pending());
        drop(end.to_shard);
        assert!(matches!(
            pipe.poll_read(&mut cx(), &mut buf),
            Poll::Ready(Ok(0))
        ));

        // Four bytes of room: a write takes what fits, then the writer waits
        // however its writes were cut.
        assert!(matches!(
            pipe.poll_write(&mut cx(), b"a"),
            Poll::Ready(Ok(1))
        ));
        assert!(matches!(
            pipe.poll_write(&mut cx(), b"bcdef"),
            Poll::Ready(Ok(3))
        ));
        assert!(pipe.poll_write(&mut cx(), b"e").is_pending());
        assert!(pipe.poll_flush(&mut cx()).is_ready());
        let out = &end.from_shard;
        assert_eq!(out.rx.try_recv().unwrap(), &b"a"[..]);
        assert!(pipe.poll_write(&mut cx(), b"e").is_pending());
        out.written(1);
        assert!(matches!(
            pipe.poll_write(&mut cx(), b"ef"),
            Poll::Ready(Ok(1))
        ));
        assert_eq!(
            end.close.load(Ordering::Relaxed),
            close_code::PROTOCOL_ERROR
        );
        pipe.set_done();
        pipe.shutdown_write();
        assert_eq!(out.rx.try_recv().unwrap(), &b"bcd"[..]);
        assert_eq!(out.rx.try_recv().unwrap(), &b"e"[..]);
        assert!(out.rx.try_recv().is_err());
        assert!(out.rx.is_disconnected());
        assert_eq!(end.close.load(Ordering::Relaxed), close_code::DONE);
        assert!(pipe.poll_write(&mut cx(), b"x").is_ready());
    }

    #[test]
    fn a_full_pipe_fails_the_writer_once_the_endpoint_is_gone() {
        let (mut pipe, end) = QuicPipe::new("127.0.0.1:1".parse().unwrap(), 2, 2);
        assert!(matches!(
            pipe.poll_write(&mut cx(), b"ab"),
            Poll::Ready(Ok(2))
        ));
        assert!(pipe.poll_write(&mut cx(), b"c").is_pending());
        drop(end);
        assert!(matches!(
            pipe.poll_write(&mut cx(), b"c"),
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe
        ));
    }
}
