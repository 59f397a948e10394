//! The shard's end of an MQTT-over-QUIC connection: a [`QuicPipe`] carries
//! the MQTT bytes of the connection's stream between the QUIC endpoint thread
//! (`crate::quic`, quinn on tokio) and the shard that serves the connection.
//!
//! A pipe is two bounded channels of byte chunks, so it is `Send` and moves
//! between shards in a hand-off like a socket's fd does. The endpoint thread
//! feeds what the client's stream delivers (`Bytes` chunks straight from
//! quinn, no copy) and writes what the shard sends to the stream. Both
//! channels are bounded: a shard that stops reading stops the endpoint
//! reading the stream, so QUIC flow control holds the client back; a client
//! that stops reading fills the stream's send window, then the channel, and
//! the shard's connection task waits as it would on a full TCP socket.
//!
//! The end of either side is the channel's disconnection: the endpoint drops
//! its sender when the stream ends or the connection is lost (the shard reads
//! end of stream); the shard drops its sender when it ends the connection
//! (the endpoint finishes the stream after the last chunk and closes the QUIC
//! connection with the pipe's close code).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use flume::r#async::{RecvStream, SendFut};
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
    /// Where output goes; `None` once the shard shut its sending side.
    tx: Option<flume::Sender<Bytes>>,
    /// A chunk accepted by [`QuicPipe::poll_write`] that waits for room in the
    /// channel ([`QuicPipe::poll_flush`] sends it).
    pending: Option<SendFut<'static, Bytes>>,
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
            .finish()
    }
}

/// The endpoint's end of a pipe: where it puts what the client sent, where
/// it takes what to send, and the close code the shard chose.
#[derive(Debug)]
pub struct QuicPipeEnd {
    /// Chunks the client sent, for the shard.
    pub to_shard: flume::Sender<Bytes>,
    /// Chunks the shard sends to the client.
    pub from_shard: flume::Receiver<Bytes>,
    /// The close code for the connection once `from_shard` is disconnected.
    pub close: Arc<AtomicU32>,
}

impl QuicPipe {
    /// A pipe for a connection from `peer`, holding at most `chunks` chunks
    /// in each direction.
    pub fn new(peer: SocketAddr, chunks: usize) -> (QuicPipe, QuicPipeEnd) {
        let (to_shard, rx) = flume::bounded(chunks);
        let (tx, from_shard) = flume::bounded(chunks);
        let close = Arc::new(AtomicU32::new(close_code::PROTOCOL_ERROR));
        (
            QuicPipe {
                rx: rx.into_stream(),
                rest: Bytes::new(),
                tx: Some(tx),
                pending: None,
                close: close.clone(),
                peer,
            },
            QuicPipeEnd {
                to_shard,
                from_shard,
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

    /// Accepts `data` for sending (all of it, once the previous chunk went
    /// into the channel); [`QuicPipe::poll_flush`] finishes the send.
    pub fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if let Err(e) = std::task::ready!(self.poll_flush(cx)) {
            return Poll::Ready(Err(e));
        }
        let Some(tx) = &self.tx else {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        };
        match tx.try_send(Bytes::copy_from_slice(data)) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(chunk)) => {
                let mut send = tx.clone().into_send_async(chunk);
                match Pin::new(&mut send).poll(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => {
                        return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                    }
                    Poll::Pending => self.pending = Some(send),
                }
            }
            Err(flume::TrySendError::Disconnected(_)) => {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
        }
        Poll::Ready(Ok(data.len()))
    }

    /// Completes the send of a chunk that waited for room.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(send) = &mut self.pending {
            let r = std::task::ready!(Pin::new(send).poll(cx));
            self.pending = None;
            if r.is_err() {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Whether a chunk waits for room in the channel.
    pub fn flush_needed(&self) -> bool {
        self.pending.is_some()
    }

    /// Marks the connection as ended normally: the endpoint closes it with
    /// [`close_code::DONE`] after the last byte.
    pub fn set_done(&self) {
        self.close.store(close_code::DONE, Ordering::Relaxed);
    }

    /// Shuts the sending side: the endpoint finishes the stream after what
    /// was sent, then closes the connection. A chunk still waiting for room
    /// is sent first if it fits now, else dropped (as a full socket's unsent
    /// bytes are at a shutdown).
    pub fn shutdown_write(&mut self) {
        if let Some(mut send) = self.pending.take() {
            let _ = Pin::new(&mut send).poll(&mut Context::from_waker(std::task::Waker::noop()));
        }
        self.tx = None;
    }
}

#[cfg(test)]
mod tests {
    //! Goal: bytes cross the pipe in order in both directions, a full channel
    //! holds the writer back, and either end's drop is an end of stream.
    //! Method: poll the pipe by hand with a no-op waker.

    use std::task::Waker;

    use super::*;

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn chunks_cross_in_order_and_the_channel_bounds_the_writer() {
        let (mut pipe, end) = QuicPipe::new("127.0.0.1:1".parse().unwrap(), 2);
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

        // Two chunks fill the channel; the third is accepted and waits.
        for chunk in [&b"a"[..], b"b", b"c"] {
            assert!(matches!(
                pipe.poll_write(&mut cx(), chunk),
                Poll::Ready(Ok(1))
            ));
        }
        assert!(pipe.flush_needed());
        assert!(pipe.poll_flush(&mut cx()).is_pending());
        assert!(pipe.poll_write(&mut cx(), b"d").is_pending());
        assert_eq!(end.from_shard.try_recv().unwrap(), &b"a"[..]);
        assert!(pipe.poll_flush(&mut cx()).is_ready());
        assert!(!pipe.flush_needed());
        assert_eq!(
            end.close.load(Ordering::Relaxed),
            close_code::PROTOCOL_ERROR
        );
        pipe.set_done();
        pipe.shutdown_write();
        assert_eq!(end.from_shard.try_recv().unwrap(), &b"b"[..]);
        assert_eq!(end.from_shard.try_recv().unwrap(), &b"c"[..]);
        assert!(end.from_shard.try_recv().is_err());
        assert!(end.from_shard.is_disconnected());
        assert_eq!(end.close.load(Ordering::Relaxed), close_code::DONE);
    }
}
