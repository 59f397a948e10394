//! The connection task: one task per live connection on its owner shard,
//! reading packets into the engine and writing what the engine produced.
//!
//! One task, not a reader and a writer: a task costs a heap allocation of its
//! future plus glommio's task header, and an idle connection's memory was
//! mostly its tasks. The task waits on a single combined poll (`Io::poll_event`)
//! that tries the pending write, takes new engine output, and reads, so a
//! client that is slow to read still has its acknowledgements read (glommio
//! keeps separate readiness sources for reading and writing on one socket, and
//! both register the same waker here).
//!
//! The stream is a [`Transport`] (plain TCP, TLS, WebSocket or both): output
//! is framed by the transport (`Transport::frame`), written raw and flushed;
//! transport output the read side produced (a WebSocket PONG, TLS records)
//! is sent by the same poll (`Transport::flush_needed`).
//!
//! Lifecycle: [`run`] starts after the CONNECT was handed to the engine; it
//! ends after the engine ended the connection (or the socket failed), the last
//! output was written, the socket was shut down, and the engine slot released.

use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::future::poll_fn;
use tessera_proto::{ProtocolVersion, ReasonCode};
use tessera_shard::engine::{CloseReason, Limit};
use tessera_shard::session::ConnId;
use tracing::debug;

use super::read_budget::Reservation;
use super::{
    CLOSE_LINGER, MESH_BACKLOG_BATCHES_MAX, PROBE_BYTES, READ_CHUNK_BYTES, Shard, claims, now_ms,
    now_us, park, persist,
};
use crate::config::ListenerId;
use crate::transport::Transport;

/// Capacity of a WebSocket connection's frame buffer kept between writes.
const FRAMED_RETAINED_BYTES_MAX: usize = 64 * 1024;

/// How long readers pause when a peer shard's mesh queue is over its bound.
const MESH_BACKOFF: Duration = Duration::from_millis(1);

/// What woke the connection task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// Bytes were read into the input buffer.
    Read(usize),
    /// The peer closed its side, or reading failed.
    ReadEnd,
    /// Writing failed: the peer is gone.
    WriteFailed,
    /// The engine ended the connection and every byte of output was written.
    Closed,
    /// From the callers' timers, or the engine released the held
    /// acknowledgements that paused reading: time to look again.
    Timeout,
    /// Idle for `park::PARK_AFTER_TICKS` with nothing buffered: the
    /// connection may park (see `park`).
    Park,
}

/// How a connection task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The connection is closed and its engine slot released.
    Ended,
    /// The connection waits parked, without a task (see `park`).
    Parked,
}

/// The connection's socket and buffers, polled as one.
struct Io {
    stream: Transport,
    conn: ConnId,
    /// Bytes read and not yet decoded.
    input: BytesMut,
    /// Output taken from the engine, being written.
    output: BytesMut,
    /// `output` framed by the transport, when it frames (WebSocket).
    framed: Vec<u8>,
    use_framed: bool,
    /// Bytes of `output` (or `framed`) written.
    written: usize,
    /// Something was taken for writing and is not yet written and flushed.
    in_flight: bool,
    /// The store epoch that must be committed before `output` is written
    /// (`sync` durability: what the bytes acknowledge is durable first).
    durable_epoch: u64,
    /// The parking epoch of the last read or output.
    last_active: u64,
    /// The parking epoch in which this task last asked the tick to wake it
    /// (`Parking::watch`), so it asks once per epoch.
    watched_epoch: u64,
    /// Reads fill whole chunks: keep the heap read buffer.
    busy: bool,
    probe: [u8; PROBE_BYTES],
    /// What the packet being read holds of the node's read budget.
    reservation: Reservation,
}

impl Io {
    /// Writes what it can, takes the engine's next output when the last is
    /// written, and, when `read` is true, reads. Registers the task's waker
    /// with the socket (both directions) and the engine output.
    /// With `park`, reports `Event::Park` instead of waiting when the
    /// connection has been idle long enough. With `paused` (reading stopped
    /// for back-pressure), reports `Event::Timeout` once the engine no longer
    /// pauses the input: releasing acknowledgements writes them, which wakes
    /// this poll.
    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        shard: &Shard,
        read: bool,
        park: bool,
        paused: bool,
    ) -> Poll<Event> {
        loop {
            let pending = if self.use_framed {
                &self.framed[self.written..]
            } else {
                &self.output[self.written..]
            };
            if !pending.is_empty() {
                if persist::poll_committed(shard, self.durable_epoch, cx).is_pending() {
                    break;
                }
                match self.stream.poll_write_raw(cx, pending) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.written += n;
                        continue;
                    }
                    Poll::Ready(_) => return Poll::Ready(Event::WriteFailed),
                    Poll::Pending => break,
                }
            }
            if self.in_flight {
                match self.stream.poll_flush(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(Event::WriteFailed),
                    Poll::Pending => break,
                }
                self.in_flight = false;
                self.written = 0;
                self.framed.clear();
                if self.framed.capacity() > FRAMED_RETAINED_BYTES_MAX {
                    // One large message must not pin a large frame buffer for
                    // the life of an otherwise quiet WebSocket connection.
                    self.framed = Vec::new();
                }
                if !self.output.is_empty() {
                    // All written: the engine may move queued deliveries into
                    // the freed space. The buffer keeps its capacity for the
                    // next swap.
                    self.output.clear();
                    shard.engine.borrow_mut().flushed(now_ms(), self.conn);
                    shard.flush_outbox();
                }
            }
            let mut engine = shard.engine.borrow_mut();
            let Some(out) = engine.output(self.conn) else {
                return Poll::Ready(Event::Closed);
            };
            if !out.buf.is_empty() || self.stream.flush_needed() {
                std::mem::swap(&mut out.buf, &mut self.output);
                self.durable_epoch = out.durable_epoch;
                drop(engine);
                self.last_active = shard.parking.epoch();
                self.use_framed = self.stream.frame(&self.output, &mut self.framed);
                self.in_flight = true;
                continue;
            }
            if out.close.is_some() {
                return Poll::Ready(Event::Closed);
            }
            if !out.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                out.waker = Some(cx.waker().clone());
            }
            break;
        }
        if paused && !shard.engine.borrow().input_paused(self.conn) {
            return Poll::Ready(Event::Timeout);
        }
        let r = if read {
            self.poll_read(cx)
        } else {
            Poll::Pending
        };
        if r.is_pending() && park && self.input.is_empty() && !self.in_flight && !self.busy {
            let epoch = shard.parking.epoch();
            if epoch >= self.last_active + park::PARK_AFTER_TICKS {
                return Poll::Ready(Event::Park);
            }
            // Not idle long enough yet: the tick wakes this task to look again.
            if self.watched_epoch != epoch {
                self.watched_epoch = epoch;
                shard.parking.watch(cx.waker());
            }
        }
        r
    }

    /// Reads: into the probe when idle, else into the chunk buffer.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let stream = &mut self.stream;
        if self.input.is_empty() && !self.busy {
            // Idle: read into the probe, so an idle connection holds no buffer.
            if self.input.capacity() > 0 {
                self.input = BytesMut::new();
            }
            match stream.poll_read(cx, &mut self.probe) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.input.extend_from_slice(&self.probe[..n]);
                    self.busy = n == PROBE_BYTES;
                    Poll::Ready(Event::Read(n))
                }
                Poll::Ready(_) => Poll::Ready(Event::ReadEnd),
                Poll::Pending => Poll::Pending,
            }
        } else {
            let start = self.input.len();
            self.input.resize(start + READ_CHUNK_BYTES, 0);
            let r = stream.poll_read(cx, &mut self.input[start..]);
            let n = match &r {
                Poll::Ready(Ok(n)) => *n,
                _ => 0,
            };
            self.input.truncate(start + n);
            match r {
                Poll::Ready(Ok(n)) if n > 0 => {
                    // Keep the chunk buffer while reads fill it; fall back to
                    // probing once the connection goes quiet.
                    self.busy = n == READ_CHUNK_BYTES;
                    Poll::Ready(Event::Read(n))
                }
                Poll::Ready(_) => Poll::Ready(Event::ReadEnd),
                Poll::Pending => Poll::Pending,
            }
        }
    }

    /// `poll_event` until it fires or `deadline` passes.
    async fn next_event(
        &mut self,
        shard: &Shard,
        read: bool,
        park: bool,
        paused: bool,
        deadline: Option<Instant>,
    ) -> Event {
        let io = poll_fn(|cx| self.poll_event(cx, shard, read, park, paused));
        match deadline {
            None => io.await,
            Some(at) => {
                let expire = async {
                    glommio::timer::sleep(at.saturating_duration_since(Instant::now())).await;
                    Event::Timeout
                };
                futures_lite::future::or(io, expire).await
            }
        }
    }
}

/// Starts the task of connection `conn` (accepted on `listener`); `input`
/// holds bytes read and not yet decoded. The listener's connection count is
/// released when the connection ends, not when it parks.
pub(super) fn spawn(
    shard: Rc<Shard>,
    stream: Transport,
    input: BytesMut,
    conn: ConnId,
    version: ProtocolVersion,
    listener: ListenerId,
) {
    glommio::spawn_local(async move {
        if run(shard.clone(), stream, input, conn, version, listener).await == Outcome::Ended {
            shard.listener_limits.release(usize::from(listener));
        }
    })
    .detach();
}

/// Serves one connection until it ends or parks.
async fn run(
    shard: Rc<Shard>,
    stream: Transport,
    input: BytesMut,
    conn: ConnId,
    version: ProtocolVersion,
    listener: ListenerId,
) -> Outcome {
    let last_active = shard.parking.epoch();
    let mut io = Io {
        stream,
        conn,
        input,
        output: BytesMut::new(),
        framed: Vec::new(),
        use_framed: false,
        written: 0,
        in_flight: false,
        durable_epoch: 0,
        last_active,
        watched_epoch: u64::MAX,
        busy: false,
        probe: [0; PROBE_BYTES],
        reservation: Reservation::new(shard.read_budget.clone()),
    };
    let mut reading = true;
    let mut was_paused = false;
    let write_failed = loop {
        let had_input = !io.input.is_empty();
        let paused = handle_input(&shard, &mut io.input, &mut io.reservation, conn, version);
        if shard.engine.borrow().is_ended(conn) {
            break false;
        }
        if had_input {
            // Let the connections this input woke run first: a subscriber's
            // delivery goes out before this publisher's PUBACK (as Mosquitto
            // orders them), so the ack's write is not part of the delivery's
            // latency. glommio is cooperative and a read of a busy socket
            // completes at once, so this yield also keeps publishers that keep
            // their sockets full from starving their subscribers' connections.
            futures_lite::future::yield_now().await;
        }
        if paused && !was_paused {
            shard.engine.borrow_mut().record_reads_paused();
        }
        was_paused = paused;
        // Back-pressure: a peer shard or the store writer that falls behind
        // slows publishers here, and so does a client with more held
        // acknowledgements than its window (`Engine::input_paused`).
        let backlog = shard.mesh_backlog() > MESH_BACKLOG_BATCHES_MAX || shard.store_backlogged();
        let mut deadline = backlog.then(|| Instant::now() + MESH_BACKOFF);
        // A QoS 0 publisher paused for a bridge that is behind waits at most
        // the bridge's bound (`Engine::feed_pace_deadline`).
        let feed_bound = paused
            .then(|| shard.engine.borrow().feed_pace_deadline(conn))
            .flatten();
        if let Some(at_ms) = feed_bound {
            let at = Instant::now() + Duration::from_millis(at_ms.saturating_sub(now_ms()));
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
        let park = !backlog && !paused && io.stream.is_plain();
        let read = !backlog && !paused;
        match io.next_event(&shard, read, park, paused, deadline).await {
            Event::Park => match park_conn(&shard, io, version, listener) {
                None => {
                    debug!(%conn, "idle: connection parked");
                    return Outcome::Parked;
                }
                Some(back) => {
                    // Not parked (no fd to spare, or epoll refused): stay.
                    io = back;
                    io.last_active = shard.parking.epoch();
                }
            },
            Event::Read(n) => {
                io.last_active = shard.parking.epoch();
                shard.engine.borrow_mut().record_bytes_received(n);
            }
            Event::Timeout => {
                if feed_bound.is_some() {
                    shard.engine.borrow_mut().feed_pace_expire(now_ms());
                    shard.flush_outbox();
                }
            }
            Event::ReadEnd => {
                reading = false;
                shard.engine.borrow_mut().connection_lost(now_ms(), conn);
                shard.flush_outbox();
                break false;
            }
            Event::WriteFailed => break true,
            Event::Closed => break false,
        }
    };
    let write_failed = write_failed || !close(&shard, &mut io, reading).await;
    if write_failed {
        shard.engine.borrow_mut().connection_lost(now_ms(), conn);
        shard.flush_outbox();
    }
    shutdown(&mut io.stream, Shutdown::Both);
    shard.engine.borrow_mut().release(now_ms(), conn);
    shard.flush_outbox();
    shard.connections.set(shard.connections.get() - 1);
    Outcome::Ended
}

/// Parks an idle plain-TCP connection: its socket waits in the shard's epoll
/// set as a duplicate fd, the engine output's waker unparks it, and the task
/// ends. Gives `io` back when the connection cannot park.
fn park_conn(shard: &Shard, io: Io, version: ProtocolVersion, listener: ListenerId) -> Option<Io> {
    let Some(tcp) = io.stream.tcp() else {
        return Some(io);
    };
    // SAFETY: the fd belongs to `io.stream`, borrowed for this statement.
    let fd = unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) };
    let Ok(fd) = fd.try_clone_to_owned() else {
        return Some(io);
    };
    let parked = park::Parked {
        fd,
        conn: io.conn,
        version,
        listener,
    };
    match shard.parking.park(parked) {
        Ok(waker) => {
            if let Some(out) = shard.engine.borrow_mut().output(io.conn) {
                out.waker = Some(waker);
            }
            // Closes the original fd; the duplicate stays in the epoll set.
            drop(io);
            None
        }
        Err(_) => Some(io),
    }
}

/// Decodes and handles every complete packet in `input`, stopping early
/// while the engine pauses the connection's input (back-pressure: the rest
/// stays in `input`). Returns whether the input is paused.
fn handle_input(
    shard: &Shard,
    input: &mut BytesMut,
    reservation: &mut Reservation,
    conn: ConnId,
    version: ProtocolVersion,
) -> bool {
    let paused = shard.engine.borrow().input_paused(conn);
    if input.is_empty() || paused {
        return paused;
    }
    let now = now_ms();
    // A node stopped past its session lease does not serve what its clients sent
    // meanwhile before it checked the lease (`claims::before_input`).
    claims::before_input(shard, now);
    let paused = {
        let mut engine = shard.engine.borrow_mut();
        engine.set_now_us(now_us());
        while !engine.is_ended(conn) && !engine.input_paused(conn) {
            match tessera_proto::decode(input, version, shard.max_packet) {
                Ok(Some(packet)) => engine.handle_packet(now, conn, packet),
                Ok(None) => break,
                Err(e) => {
                    debug!(%conn, "decode error: {e}");
                    let reason = e.reason_code().unwrap_or(ReasonCode::MalformedPacket);
                    engine.decode_error(now, conn, reason);
                    break;
                }
            }
        }
        // The packet now at the front of the input, if large, must fit the
        // node's read budget before more of it is read.
        if !engine.is_ended(conn) && reservation.track(input, shard.max_packet).is_err() {
            engine.quota_disconnect(now, conn, Limit::ReadBuffers);
        }
        engine.input_paused(conn)
    };
    shard.flush_outbox();
    paused
}

/// The end of a connection the engine ended: writes the rest of the output and
/// a FIN. When the broker ended it (refused CONNECT, protocol error, keep
/// alive, takeover, shutdown), the client may still be sending, and a socket
/// closed with unread input answers with RST, which can destroy the CONNACK or
/// DISCONNECT just written before the client reads it. So the task keeps
/// reading and discarding until the client closes or `CLOSE_LINGER` passes.
/// Returns false when writing failed.
async fn close(shard: &Shard, io: &mut Io, mut reading: bool) -> bool {
    let reason = shard
        .engine
        .borrow_mut()
        .output(io.conn)
        .and_then(|o| o.close);
    let linger = !matches!(
        reason,
        Some(CloseReason::ClientDisconnect | CloseReason::ConnectionLost) | None
    );
    reading &= linger;
    let deadline = Instant::now() + CLOSE_LINGER;
    loop {
        match io
            .next_event(shard, reading, false, false, Some(deadline))
            .await
        {
            Event::Read(_) => io.input.clear(),
            Event::ReadEnd => reading = false,
            Event::WriteFailed => return false,
            Event::Closed => break,
            Event::Timeout => return true,
            Event::Park => unreachable!("closing connections never park"),
        }
    }
    io.stream.close_nowait();
    shutdown(&mut io.stream, Shutdown::Write);
    let mut scratch = [0u8; PROBE_BYTES];
    while reading {
        let read = async { Some(poll_fn(|cx| io.stream.poll_read(cx, &mut scratch)).await) };
        let expire = async {
            glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
            None
        };
        match futures_lite::future::or(read, expire).await {
            Some(Ok(n)) if n > 0 => {}
            _ => reading = false,
        }
    }
    true
}

/// Shuts down one or both directions of the socket at once (no await). A
/// QUIC stream's sending side is finished (the endpoint closes the connection
/// after the last byte); its receiving side ends when the pipe is dropped.
fn shutdown(stream: &mut Transport, how: Shutdown) {
    if let Some(pipe) = stream.quic_pipe() {
        pipe.shutdown_write();
        return;
    }
    let Some(tcp) = stream.tcp() else {
        return;
    };
    // SAFETY: the fd belongs to `stream`, borrowed for this statement.
    let fd = unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) };
    let _ = socket2::SockRef::from(&fd).shutdown(how);
}
