//! Parked connections: an idle plain-TCP connection gives up its task and its
//! glommio socket, and waits as a bare file descriptor in the shard's epoll
//! set until the client sends something or the engine has output for it.
//!
//! Why: an idle connection's memory was mostly its task (the future and
//! glommio's task header) and glommio's per-socket readiness `Source` (about
//! 0.5 KB each). A parked connection costs one [`Slot`] here (24 bytes) plus
//! the engine's connection and session state; the kernel's epoll entry is not
//! process memory.
//!
//! How it wakes:
//! - Input or a hang-up: one helper thread per shard blocks in `epoll_wait`
//!   (entries are `EPOLLONESHOT`) and writes each ready entry's token to a
//!   socketpair, the doorbell, which the shard reads like any socket. The
//!   thread only ever touches the epoll fd and the doorbell; it holds no shard
//!   state. It ends when the doorbell closes or the broker stops.
//! - Engine output (a delivery, a keep-alive timeout, a takeover, shutdown):
//!   the engine wakes the connection's output waker, which for a parked
//!   connection is a [`park_waker`] carrying the token; waking it queues the
//!   token for the shard's unparker task (shard-local, no allocation).
//!
//! The unparker task takes the entry, removes it from epoll, rebuilds the
//! glommio stream from the fd and starts a connection task again, except when
//! the input is only whole PINGREQs: those it answers in place and re-arms the
//! entry ([`Parking::answer_pings`]), so an idle client's pings cost no task.
//!
//! Lifecycle: one [`Parking`] per shard, created at shard start; parked
//! entries live until unparked (shutdown ends every connection through the
//! engine, which unparks them).

use std::cell::{Cell, RefCell};
use std::io;
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, RawWaker, RawWakerVTable, Waker};

use bytes::BytesMut;
use futures_lite::AsyncRead;
use futures_lite::future::poll_fn;
use glommio::net::{TcpStream, UnixStream};
use tessera_proto::ProtocolVersion;
use tessera_shard::session::ConnId;
use tracing::{debug, warn};

use super::Shard;
use crate::config::ListenerId;
use crate::transport::Transport;

/// Ticks (`server::TICK`) without any traffic after which a connection parks.
pub(super) const PARK_AFTER_TICKS: u64 = 2;

/// Ready entries one `epoll_wait` returns at most.
const EPOLL_EVENTS_MAX: usize = 256;

/// How often the helper thread looks at the stop flag while nothing happens.
const EPOLL_WAIT_MS: i32 = 500;

/// Tokens read from the doorbell per read.
const DOORBELL_TOKENS_MAX: usize = 64;

/// PINGREQs a parked connection may have sent for them to be answered without
/// unparking it (more is not an idle client).
const PINGS_MAX: usize = 8;
/// A PINGREQ and a PINGRESP on the wire (the same in every protocol version).
const PINGREQ: [u8; 2] = [0xC0, 0x00];
/// [`PINGS_MAX`] PINGRESPs.
const PINGRESPS: [u8; PINGS_MAX * 2] = {
    let mut a = [0u8; PINGS_MAX * 2];
    let mut i = 0;
    while i < PINGS_MAX {
        a[2 * i] = 0xD0;
        i += 1;
    }
    a
};

/// What [`Parking::answer_pings`] did.
#[derive(Debug, PartialEq, Eq)]
enum Pings {
    /// The connection is no longer parked under that token.
    Gone,
    /// Only PINGREQs were waiting; they were answered and the entry re-armed
    /// (or the engine took the answers that did not fit and woke it).
    Answered,
    /// Something else is waiting: unpark.
    Unpark,
}

// Tokens travel in a waker's data pointer.
const _: () = assert!(usize::BITS >= u64::BITS);

/// A parked connection.
#[derive(Debug)]
pub(super) struct Parked {
    pub(super) fd: OwnedFd,
    pub(super) conn: ConnId,
    pub(super) version: ProtocolVersion,
    pub(super) listener: ListenerId,
}

/// One entry of the parked table; `generation` makes tokens of earlier
/// occupants stale.
#[derive(Debug)]
struct Slot {
    generation: u32,
    parked: Option<Parked>,
}

/// The shard's parked connections and its epoll set.
#[derive(Debug)]
pub(super) struct Parking {
    epoll: OwnedFd,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// Advanced by the shard's tick; connections compare it with their last
    /// activity to know they are idle.
    epoch: Cell<u64>,
    /// Tasks of connections that may park once the epoch moves on (at most
    /// one entry per task per epoch, see [`Parking::watch`]); the tick wakes
    /// them. Parked and TLS/WebSocket connections are not here, so the tick
    /// costs nothing per idle connection.
    watch: RefCell<Vec<Waker>>,
}

impl Parking {
    /// The epoll set, its helper thread, and the doorbell's read end
    /// (non-blocking; the shard makes it a glommio stream for [`run_unparker`]).
    /// Needs no executor: the simulation's shards, which park nothing, drop the
    /// doorbell, which ends the helper thread.
    pub(super) fn new(
        shard_id: usize,
        stop: Arc<AtomicBool>,
    ) -> io::Result<(Parking, StdUnixStream)> {
        // SAFETY: epoll_create1 with a valid flag; the result is checked.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `epfd` is a new descriptor nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epfd) };
        let thread_epoll = epoll.try_clone()?;
        let (bell_rx, bell_tx) = StdUnixStream::pair()?;
        std::thread::Builder::new()
            .name(format!("park-{shard_id}"))
            .spawn(move || watch(thread_epoll, bell_tx, stop))?;
        bell_rx.set_nonblocking(true)?;
        Ok((
            Parking {
                epoll,
                slots: RefCell::new(Vec::new()),
                free: RefCell::new(Vec::new()),
                epoch: Cell::new(0),
                watch: RefCell::new(Vec::new()),
            },
            bell_rx,
        ))
    }

    /// The current idle epoch.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.get()
    }

    /// Called by the shard's tick: advances the epoch and wakes the tasks
    /// that asked to look again ([`Parking::watch`]), so they can see they
    /// are idle and park.
    pub(super) fn tick(&self) {
        self.epoch.set(self.epoch.get() + 1);
        let watch = std::mem::take(&mut *self.watch.borrow_mut());
        for w in watch {
            w.wake();
        }
    }

    /// A connection task that could park after a few more quiet ticks asks
    /// to be woken by the next tick. It calls this at most once per epoch
    /// (`Io::watched_epoch`), so the list holds at most one entry per
    /// connection that was active in the last ticks.
    pub(super) fn watch(&self, waker: &Waker) {
        self.watch.borrow_mut().push(waker.clone());
    }

    /// Parks a connection: registers `p.fd` for input and returns the waker
    /// to put in the engine's output of `p.conn`. On failure the entry is
    /// given back.
    pub(super) fn park(&self, p: Parked) -> Result<Waker, Parked> {
        let mut slots = self.slots.borrow_mut();
        let index = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                let Ok(i) = u32::try_from(slots.len()) else {
                    return Err(p);
                };
                slots.push(Slot {
                    generation: 0,
                    parked: None,
                });
                i
            }
        };
        let slot = &mut slots[index as usize];
        let token = (u64::from(index) << 32) | u64::from(slot.generation);
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: token,
        };
        // SAFETY: both fds are open and owned by us; `ev` is a valid event.
        let r = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                p.fd.as_raw_fd(),
                &mut ev,
            )
        };
        if r != 0 {
            self.free.borrow_mut().push(index);
            return Err(p);
        }
        slot.parked = Some(p);
        Ok(park_waker(token))
    }

    /// Answers the PINGREQs a parked connection sent without unparking it, when
    /// they are all it sent: a client that only pings (the common idle
    /// client, every Keep Alive / 2 or so) then costs a peek, a read, a write
    /// and a re-arm, not a task, a glommio socket and a park again two ticks
    /// later. Anything else (other bytes, a partial packet, end of stream, an
    /// error) is left in the socket for the connection task: the caller
    /// unparks it. An `EPOLLONESHOT` entry stays disarmed until re-armed
    /// here, so nothing else can look at the socket meanwhile.
    fn answer_pings(&self, token: u64, shard: &Shard) -> Pings {
        let slots = self.slots.borrow();
        let Some(p) = slots
            .get((token >> 32) as usize)
            .filter(|s| s.generation == token as u32)
            .and_then(|s| s.parked.as_ref())
        else {
            return Pings::Gone;
        };
        let fd = p.fd.as_raw_fd();
        let mut buf = [0u8; PINGS_MAX * 2];
        // SAFETY: `fd` is open (the slot owns it); `buf` is valid for its length.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 || n % 2 != 0 || !buf[..n as usize].chunks_exact(2).all(|b| b == PINGREQ) {
            return Pings::Unpark;
        }
        let n = n as usize;
        // SAFETY: as above; this reads exactly the bytes just peeked, which
        // nobody else can take (the entry is disarmed).
        let read = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), n, libc::MSG_DONTWAIT) };
        if read != n as isize {
            return Pings::Unpark;
        }
        let pings = (n / 2) as u32;
        // SAFETY: `fd` is open; `PINGRESPS` holds at least `n` bytes.
        let sent = unsafe {
            libc::send(
                fd,
                PINGRESPS.as_ptr().cast(),
                n,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        let sent = usize::try_from(sent).unwrap_or(0);
        if sent % 2 != 0 {
            // Half a PINGRESP went out (a full send buffer split two bytes):
            // the stream cannot be continued with whole packets from the
            // engine. Practically unreachable; end it as a lost connection
            // (the task sees the shutdown once unparked).
            // SAFETY: `fd` is open.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            return Pings::Unpark;
        }
        let answered = (sent / 2) as u32;
        if !shard
            .engine
            .borrow_mut()
            .pings_answered(super::now_ms(), p.conn, pings, answered)
        {
            return Pings::Unpark;
        }
        if answered < pings {
            // The engine took the rest as output and woke the connection.
            return Pings::Answered;
        }
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: token,
        };
        // SAFETY: both fds are open; `ev` is a valid event.
        let r =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut ev) };
        if r != 0 {
            return Pings::Unpark;
        }
        Pings::Answered
    }

    /// Takes the connection `token` names, if it is still parked there, and
    /// removes it from the epoll set.
    fn take(&self, token: u64) -> Option<Parked> {
        let index = (token >> 32) as usize;
        let generation = token as u32;
        let mut slots = self.slots.borrow_mut();
        let slot = slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        let p = slot.parked.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.borrow_mut().push(index as u32);
        // SAFETY: both fds are open; a null event is allowed for DEL.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                p.fd.as_raw_fd(),
                std::ptr::null_mut(),
            );
        }
        Some(p)
    }
}

/// The helper thread: forwards the tokens of ready entries to the doorbell.
fn watch(epoll: OwnedFd, mut bell: StdUnixStream, stop: Arc<AtomicBool>) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; EPOLL_EVENTS_MAX];
    let mut out = Vec::with_capacity(EPOLL_EVENTS_MAX * 8);
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `events` is a valid buffer of EPOLL_EVENTS_MAX entries.
        let n = unsafe {
            libc::epoll_wait(
                epoll.as_raw_fd(),
                events.as_mut_ptr(),
                EPOLL_EVENTS_MAX as i32,
                EPOLL_WAIT_MS,
            )
        };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!(
                "parked connections: epoll_wait failed: {}",
                io::Error::last_os_error()
            );
            return;
        }
        out.clear();
        for ev in &events[..n as usize] {
            let token = ev.u64;
            out.extend_from_slice(&token.to_ne_bytes());
        }
        if !out.is_empty() && bell.write_all(&out).is_err() {
            return; // the shard is gone
        }
    }
}

thread_local! {
    /// Tokens of parked connections the engine woke, for this shard's unparker.
    static WOKEN: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// The unparker task's waker.
    static UNPARKER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

static PARK_VTABLE: RawWakerVTable =
    RawWakerVTable::new(park_clone, park_wake, park_wake, park_drop);

fn park_clone(data: *const ()) -> RawWaker {
    RawWaker::new(data, &PARK_VTABLE)
}

fn park_wake(data: *const ()) {
    let token = data as usize as u64;
    WOKEN.with(|q| q.borrow_mut().push(token));
    if let Some(w) = UNPARKER.with(|u| u.borrow_mut().take()) {
        w.wake();
    }
}

fn park_drop(_: *const ()) {}

/// A waker that unparks the connection `token` names. It holds no memory:
/// the token is the data pointer. It must be woken on the shard's thread,
/// which holds for the engine's output wakers (the engine never leaves it).
fn park_waker(token: u64) -> Waker {
    // SAFETY: the vtable's functions ignore the pointer except as an integer,
    // and clone returns a waker with the same vtable.
    unsafe { Waker::from_raw(RawWaker::new(token as usize as *const (), &PARK_VTABLE)) }
}

/// The shard's unparker: restarts the connection task of every parked
/// connection that has input (doorbell) or engine output (park wakers).
pub(super) async fn run_unparker(shard: Rc<Shard>, doorbell: UnixStream) {
    let mut doorbell = Some(doorbell);
    let mut bell = [0u8; DOORBELL_TOKENS_MAX * 8];
    let mut have = 0usize;
    // Input (from the doorbell) and engine output (park wakers) separately:
    // input that is only PINGREQs is answered in place.
    let mut tokens = Vec::new();
    let mut woken = Vec::new();
    loop {
        poll_fn(|cx| {
            UNPARKER.with(|u| *u.borrow_mut() = Some(cx.waker().clone()));
            let mut ready = false;
            WOKEN.with(|q| {
                let mut q = q.borrow_mut();
                ready = !q.is_empty();
                woken.append(&mut q);
            });
            if let Some(d) = doorbell.as_mut() {
                match Pin::new(d).poll_read(cx, &mut bell[have..]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        have += n;
                        let whole = have / 8 * 8;
                        for chunk in bell[..whole].chunks_exact(8) {
                            let raw: [u8; 8] = chunk.try_into().expect("8 bytes");
                            tokens.push(u64::from_ne_bytes(raw));
                        }
                        bell.copy_within(whole..have, 0);
                        have -= whole;
                        ready = true;
                    }
                    Poll::Ready(_) => {
                        // The helper thread stopped (the broker is stopping):
                        // engine wakes still unpark.
                        debug!(shard = shard.id, "parked connections: doorbell closed");
                        doorbell = None;
                        ready = true;
                    }
                    Poll::Pending => {}
                }
            }
            if ready {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        for token in woken.drain(..) {
            if let Some(p) = shard.parking.take(token) {
                unpark(&shard, p);
            }
        }
        for token in tokens.drain(..) {
            if shard.parking.answer_pings(token, &shard) == Pings::Unpark
                && let Some(p) = shard.parking.take(token)
            {
                unpark(&shard, p);
            }
        }
    }
}

/// Gives a parked connection its task back.
fn unpark(shard: &Rc<Shard>, p: Parked) {
    // SAFETY: the fd is a connected TCP socket we own and give up here.
    let tcp = unsafe { TcpStream::from_raw_fd(p.fd.into_raw_fd()) };
    super::conn::spawn(
        shard.clone(),
        Transport::plain(tcp),
        BytesMut::new(),
        p.conn,
        p.version,
        p.listener,
    );
}
