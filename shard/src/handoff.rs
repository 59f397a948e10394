//! Moving an accepted TCP connection from the shard that accepted it to the owner shard.
//!
//! Every listener uses `SO_REUSEPORT`, so a connection lands on any shard. That shard reads
//! until it has the CONNECT, computes the owner with [`crate::hash::shard_for`], and if the
//! owner is another shard, hands the socket over: [`Handoff::detach`] turns the glommio
//! stream into an owned file descriptor plus the bytes already read, the [`Handoff`] travels
//! over a cross-executor channel ([`handoff_channel`]), and [`Handoff::into_stream`]
//! rebuilds a glommio stream on the owner's executor.
//!
//! Why a duplicate fd: glommio 0.9's `TcpStream` implements `AsRawFd` and `FromRawFd` but
//! not `IntoRawFd`, and dropping it closes its fd. So `detach` duplicates the fd
//! (`fcntl(F_DUPFD_CLOEXEC)`, i.e. `dup` that keeps close-on-exec like glommio's own
//! accepted sockets), then drops the stream. The duplicate refers to the same open socket,
//! so the connection stays up and no byte is lost: glommio reads are readiness-based
//! (poll, then a non-blocking `recv` into the caller's buffer), so nothing is buffered
//! inside a non-buffered `TcpStream`.
//!
//! No fd leaks: from `detach` until `into_stream` the descriptor is a [`std::os::fd::OwnedFd`]
//! inside the `Handoff`, which closes it when dropped, whether the message is dropped by the
//! sender, refused by a closed channel (`ConnectedSender::send` returns it, and dropping
//! it closes the connection), left in a channel whose executor stopped (glommio's channel
//! buffer drops its remaining items), or dropped by the receiver.
//!
//! A `Handoff` is created on the accepting shard and consumed on the owner shard; it exists
//! on no shard in between.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use bytes::Bytes;
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::net::TcpStream;

/// Default bound of one shard-to-shard hand-off channel, in messages.
///
/// A full channel makes the accepting shard wait (back-pressure on accepts), which is
/// what we want when the owner is overloaded.
pub const HANDOFF_CHANNEL_CAPACITY: usize = 1024;

/// An accepted connection in transit from the accepting shard to its owner shard.
///
/// `M` carries what the accepting shard already decoded (the CONNECT packet, once the codec
/// exists), so the owner does not parse it again.
pub struct Handoff<M = ()> {
    socket: OwnedFd,
    already_read: Bytes,
    owner_shard: usize,
    meta: M,
}

impl<M: fmt::Debug> fmt::Debug for Handoff<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handoff")
            .field("fd", &self.socket.as_raw_fd())
            .field("already_read_bytes", &self.already_read.len())
            .field("owner_shard", &self.owner_shard)
            .field("meta", &self.meta)
            .finish()
    }
}

/// [`Handoff::detach`] could not duplicate the socket; the stream is returned untouched so
/// the caller can still answer the client (e.g. CONNACK "server unavailable") and close it.
#[derive(Debug, thiserror::Error)]
#[error("cannot detach connection for hand-off (fcntl F_DUPFD_CLOEXEC): {source}")]
pub struct DetachError {
    /// The OS error, typically `EMFILE` (open-file limit reached).
    #[source]
    pub source: io::Error,
    /// The stream, still open and usable on this shard (boxed: this path is rare and the
    /// stream is large).
    pub stream: Box<TcpStream>,
}

impl<M> Handoff<M> {
    /// Detaches `stream` from this executor for delivery to `owner_shard`.
    ///
    /// `already_read` holds every byte read from the socket so far (the owner must parse
    /// them before reading more). Takes a non-buffered `TcpStream` only: a buffered stream
    /// may hold read-ahead bytes that would be lost.
    ///
    /// Briefly uses one extra fd per connection (the duplicate exists before the original
    /// is closed), so it fails with `EMFILE` at the open-file limit; see [`DetachError`].
    pub fn detach(
        stream: TcpStream,
        already_read: Bytes,
        owner_shard: usize,
        meta: M,
    ) -> Result<Self, DetachError> {
        // SAFETY: `stream` owns this fd and outlives the borrow, which ends in this statement.
        let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        let socket = match borrowed.try_clone_to_owned() {
            Ok(socket) => socket,
            Err(source) => {
                return Err(DetachError {
                    source,
                    stream: Box::new(stream),
                });
            }
        };
        // Closes the original fd only; the socket stays open through `socket`.
        drop(stream);
        Ok(Handoff {
            socket,
            already_read,
            owner_shard,
            meta,
        })
    }

    /// The shard this connection is addressed to.
    pub fn owner_shard(&self) -> usize {
        self.owner_shard
    }

    /// The bytes the accepting shard read before handing off.
    pub fn already_read(&self) -> &Bytes {
        &self.already_read
    }

    /// What the accepting shard decoded.
    pub fn meta(&self) -> &M {
        &self.meta
    }

    /// Rebuilds the connection on the owner shard: returns the stream, the bytes already
    /// read (to be parsed before reading more) and the metadata.
    ///
    /// # Panics
    /// If `this_shard` is not the owner shard (a routing bug), or if called outside a
    /// glommio executor (glommio registers the stream with the current reactor). In the
    /// latter case the fd is closed during unwinding, not leaked.
    pub fn into_stream(self, this_shard: usize) -> (TcpStream, Bytes, M) {
        assert_eq!(
            self.owner_shard, this_shard,
            "hand-off for shard {} delivered to shard {this_shard}",
            self.owner_shard
        );
        let fd = self.socket.into_raw_fd();
        // SAFETY: `fd` is an open TCP socket that we own exclusively (it came from
        // `OwnedFd::into_raw_fd`); `TcpStream` takes over closing it.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        (stream, self.already_read, self.meta)
    }
}

/// Creates a bounded single-producer, single-consumer channel for hand-offs between two
/// executors. Move each end to its executor and call `connect().await` there before use.
///
/// Caution (glommio 0.9): `ConnectedSender::send().await` on a full channel whose receiver
/// is gone never returns. Use `try_send`, or bound `send` with `glommio::timer::timeout`
/// (a hand-off dropped with the timed-out future closes its connection). See
/// `docs/NOTES-glommio.md`.
pub fn handoff_channel<M: Send + 'static>(
    capacity: usize,
) -> (SharedSender<Handoff<M>>, SharedReceiver<Handoff<M>>) {
    assert!(
        capacity > 0,
        "a hand-off channel needs room for at least one connection"
    );
    shared_channel::new_bounded(capacity)
}

#[cfg(test)]
mod tests {
    //! Goal: a connection moves between two real glommio executors with no byte lost and
    //! no fd leaked. Method: a std client talks to a glommio listener on 127.0.0.1:0;
    //! executor 0 accepts and reads a prefix, executor 1 receives the hand-off and finishes
    //! the exchange. Every wait has a timeout so a bug fails the test instead of hanging it.

    use std::io::{Read, Write};
    use std::net::SocketAddr;
    use std::sync::mpsc;
    use std::time::Duration;

    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use glommio::net::TcpListener;
    use glommio::timer::timeout;
    use glommio::{LocalExecutorBuilder, Placement};

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// Runs `fut` on a new unpinned executor thread, failing if it takes longer than WAIT.
    fn spawn_executor<F, Fut>(name: &str, fut: F) -> glommio::ExecutorJoinHandle<()>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        LocalExecutorBuilder::new(Placement::Unbound)
            .name(name)
            .spawn(move || async move {
                timeout(WAIT, async move {
                    fut().await;
                    Ok(())
                })
                .await
                .expect("executor task timed out");
            })
            .expect("start executor")
    }

    /// Connects a std client with bounded read and write waits.
    fn client(addr: SocketAddr) -> std::net::TcpStream {
        let c = std::net::TcpStream::connect_timeout(&addr, WAIT).expect("connect");
        c.set_read_timeout(Some(WAIT)).unwrap();
        c.set_write_timeout(Some(WAIT)).unwrap();
        c
    }

    #[test]
    fn connection_moves_to_owner_with_already_read_bytes() {
        let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
        let (tx, rx) = handoff_channel::<&'static str>(HANDOFF_CHANNEL_CAPACITY);

        let acceptor = spawn_executor("shard-0", move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let tx = tx.connect().await;
            let mut stream = listener.accept().await.unwrap();
            let mut prefix = [0u8; 5];
            stream.read_exact(&mut prefix).await.unwrap();
            assert_eq!(&prefix, b"hello");
            let handoff =
                Handoff::detach(stream, Bytes::copy_from_slice(&prefix), 1, "connect").unwrap();
            tx.send(handoff).await.expect("owner shard gone");
        });

        let owner = spawn_executor("shard-1", move || async move {
            let rx = rx.connect().await;
            let handoff = rx.recv().await.expect("acceptor closed the channel");
            assert_eq!(handoff.owner_shard(), 1);
            let (mut stream, already_read, meta) = handoff.into_stream(1);
            assert_eq!(&already_read[..], b"hello");
            assert_eq!(meta, "connect");
            let mut rest = [0u8; 6];
            stream.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b" world");
            stream.write_all(b"owner 1 got: hello world").await.unwrap();
            stream.close().await.unwrap();
        });

        let addr = addr_rx.recv_timeout(WAIT).expect("listener address");
        let mut c = client(addr);
        c.write_all(b"hello world").unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).expect("reply before timeout");
        assert_eq!(reply, "owner 1 got: hello world");

        acceptor.join().unwrap();
        owner.join().unwrap();
    }

    /// A hand-off refused by a closed channel comes back to the sender; dropping it must
    /// close the connection (the client sees EOF), not leak the fd.
    #[test]
    fn refused_or_dropped_handoff_closes_the_connection() {
        let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
        let (tx, rx) = handoff_channel::<()>(1);
        // The owner's end goes away before anything is sent.
        drop(rx);

        let acceptor = spawn_executor("shard-0", move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let tx = tx.connect().await;
            for _ in 0..2 {
                let mut stream = listener.accept().await.unwrap();
                let mut prefix = [0u8; 1];
                stream.read_exact(&mut prefix).await.unwrap();
                let handoff =
                    Handoff::detach(stream, Bytes::copy_from_slice(&prefix), 1, ()).unwrap();
                if prefix[0] == b's' {
                    let refused = tx.send(handoff).await.expect_err("receiver is gone");
                    drop(refused);
                } else {
                    drop(handoff);
                }
            }
        });

        let addr = addr_rx.recv_timeout(WAIT).expect("listener address");
        for first in [b's', b'd'] {
            let mut c = client(addr);
            c.write_all(&[first]).unwrap();
            let mut buf = Vec::new();
            let n = c.read_to_end(&mut buf).expect("EOF before timeout");
            assert_eq!(n, 0, "server closed without writing");
        }
        acceptor.join().unwrap();
    }

    /// Hand-offs still queued when the receiving side is dropped are closed by the channel.
    #[test]
    fn handoffs_left_in_a_channel_are_closed() {
        let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
        let (tx, rx) = handoff_channel::<()>(4);
        let (sent_tx, sent_rx) = mpsc::channel::<()>();

        let acceptor = spawn_executor("shard-0", move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let tx = tx.connect().await;
            let stream = listener.accept().await.unwrap();
            let handoff = Handoff::detach(stream, Bytes::new(), 1, ()).unwrap();
            tx.send(handoff).await.unwrap();
            sent_tx.send(()).unwrap();
        });
        // The receiving executor stays connected until the hand-off is queued, then exits
        // without ever calling recv(). (Blocking this executor's thread is fine here: it
        // has nothing else to run.)
        let owner = spawn_executor("shard-1", move || async move {
            let rx = rx.connect().await;
            sent_rx.recv_timeout(WAIT).expect("hand-off queued");
            drop(rx);
        });

        let addr = addr_rx.recv_timeout(WAIT).expect("listener address");
        let mut c = client(addr);
        acceptor.join().unwrap();
        owner.join().unwrap();
        let mut buf = Vec::new();
        assert_eq!(c.read_to_end(&mut buf).expect("EOF before timeout"), 0);
    }

    #[test]
    #[should_panic(expected = "hand-off for shard 1 delivered to shard 0")]
    fn delivery_to_the_wrong_shard_is_caught() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let handoff = Handoff {
            socket: OwnedFd::from(accepted),
            already_read: Bytes::new(),
            owner_shard: 1,
            meta: (),
        };
        handoff.into_stream(0);
    }
}
