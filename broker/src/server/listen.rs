//! The shards' listening sockets, with a listen backlog sized for connect
//! storms.
//!
//! glommio's `TcpListener::bind` listens with a fixed backlog of 1024. In a
//! storm (tens of thousands of connects per second on one shard) a shard that
//! falls behind for a few tens of milliseconds fills that queue; the kernel
//! then drops the handshakes' final ACKs and the clients' first data segment
//! (`ListenOverflows` in `nstat`), and the clients only get in through
//! retransmissions backed off to seconds. A connection the kernel lets in on
//! a retransmitted ACK has lost its CONNECT, which arrives only with the
//! client's next (backed-off) retransmission: the broker sees an accepted
//! socket that stays silent, and closes it on the connect timeout.
//! docs/ARCHITECTURE.md ("Listen backlog and connect storms") has the
//! measurements.
//!
//! So the broker opens the socket itself (`SO_REUSEPORT` as glommio does, one
//! socket per shard) and
//! - sets `TCP_DEFER_ACCEPT` for the connect timeout: the kernel queues a
//!   connection for `accept` only once its first data arrived (every listener
//!   kind is client-speaks-first: CONNECT, a TLS ClientHello, an HTTP
//!   upgrade). A bare ACK no longer makes a silent accepted socket; the
//!   handshake waits in the SYN queue (the kernel retransmits its SYN-ACK)
//!   until the client's retransmitted CONNECT arrives. A client that never
//!   sends is accepted after the defer period and then meets the connect
//!   timeout as before;
//! - asks for a backlog of [`LISTEN_BACKLOG`]; the kernel caps it at
//!   `net.core.somaxconn`, so fewer handshakes overflow in the first place.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::time::Duration;

use glommio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};

/// The listen backlog the broker asks for. Linux silently caps it at
/// `net.core.somaxconn` (4096 by default since 5.4).
pub(super) const LISTEN_BACKLOG: i32 = 65_535;

/// Below this `net.core.somaxconn`, start-up warns: 4096 is the kernel's
/// default since 5.4, about 100 ms of a 40,000/s storm.
pub(super) const BACKLOG_ADVISED: u32 = 4096;

/// Binds and listens on `addr` with [`LISTEN_BACKLOG`], `SO_REUSEPORT` and
/// `TCP_DEFER_ACCEPT` of `defer` (whole seconds, at least 1), as a glommio
/// listener of the calling executor.
pub(super) fn bind(addr: SocketAddr, defer: Duration) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_port(true)?;
    set_defer_accept(&sock, defer)?;
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    // SAFETY: the fd is a bound, listening TCP socket we own and give up here.
    Ok(unsafe { TcpListener::from_raw_fd(sock.into_raw_fd()) })
}

fn set_defer_accept(sock: &Socket, defer: Duration) -> io::Result<()> {
    let secs = libc::c_int::try_from(defer.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket and a c_int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The kernel's cap on listen backlogs (`net.core.somaxconn`), if readable.
pub(super) fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}
