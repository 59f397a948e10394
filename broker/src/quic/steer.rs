//! The endpoints of one QUIC listener: N UDP sockets on one address
//! (`SO_REUSEPORT`), connection ids that name their endpoint, and a classic
//! BPF program on the reuseport group that steers every datagram to the
//! endpoint its destination connection id names.
//!
//! The kernel picks the socket of a reuseport group by a hash of the 4-tuple.
//! That keeps a client on one socket until its address changes (NAT
//! rebinding, Wi-Fi to mobile); then it would land on a random endpoint that
//! does not know the connection. So the group gets a program
//! (`SO_ATTACH_REUSEPORT_CBPF`; for UDP it sees the UDP payload) that reads
//! the destination connection id instead:
//!
//! - short header (first byte `& 0x80 == 0`): the connection id starts at
//!   byte 1, and it is one this listener issued ([`EndpointCids`]: 8 bytes,
//!   the first is the endpoint's index), so `byte 1 % N` is that endpoint;
//! - long header: the destination connection id starts at byte 6 (flags,
//!   4 bytes of version, its length). A client's first Initials carry the
//!   client's random id, the same in all of them (and in its 0-RTT packets),
//!   so `byte 6 % N` = k is one endpoint for all of them; k answers with
//!   ids of its own, whose first byte is k, and every later packet (Initial,
//!   Handshake, 1-RTT, after a Retry too) carries one of those: `k % N = k`.
//!
//! The program always returns an index below N, so the kernel's fallback to
//! its hash (taken for an index out of range) never happens once all N
//! sockets are bound; [`bind`] binds them all before any datagram is read,
//! and checks by sending one probe datagram per index that index k reaches
//! socket k (the group's order is the order of binding). A datagram too
//! short for the byte the program reads makes it return 0 (garbage, for
//! endpoint 0 to drop).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use quinn::{ConnectionId, ConnectionIdGenerator};

/// Length of the connection ids a listener issues: the endpoint's index and
/// 7 random bytes.
pub const CID_LEN: usize = 8;

/// The most endpoints one listener may have (the index is one byte).
pub const ENDPOINTS_MAX: usize = 64;

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; the `libc` crate has
/// it only for Android).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// How long [`bind`] waits for a probe datagram to arrive.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// Issues the connection ids of endpoint `index`: [`CID_LEN`] bytes, the
/// first is the index, the rest random.
#[derive(Debug, Clone, Copy)]
pub struct EndpointCids {
    index: u8,
}

impl EndpointCids {
    /// The generator of endpoint `index`.
    pub fn new(index: u8) -> EndpointCids {
        EndpointCids { index }
    }
}

impl ConnectionIdGenerator for EndpointCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        bytes[0] = self.index;
        getrandom::getrandom(&mut bytes[1..]).expect("the OS random source works");
        ConnectionId::new(&bytes)
    }

    /// An id that does not name this endpoint was never issued by it: its
    /// packet is dropped without a stateless reset.
    fn validate(&self, cid: &ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.first() == Some(&self.index) {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The steering program for `n` endpoints (see the module doc).
fn program(n: u32) -> [libc::sock_filter; 7] {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    use libc::{
        BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_JA, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_MOD, BPF_RET,
    };
    [
        // 0: A = payload[0]
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 0),
        // 1: long header? -> 2, else -> 4
        op(BPF_JMP | BPF_JSET | BPF_K, 0, 2, 0x80),
        // 2: A = payload[6] (first byte of the destination id)
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 6),
        // 3: -> 5
        op(BPF_JMP | BPF_JA, 0, 0, 1),
        // 4: A = payload[1] (first byte of the destination id)
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 1),
        // 5: A %= n
        op(BPF_ALU | BPF_MOD | BPF_K, 0, 0, n),
        // 6: the socket index
        op(BPF_RET | BPF_A, 0, 0, 0),
    ]
}

/// Sets an `int` socket option.
fn set_int(
    sock: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid socket and a c_int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A UDP socket for `addr` asking for `rcvbuf` bytes of receive buffer.
fn new_socket(addr: SocketAddr, rcvbuf: usize) -> io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let bytes = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
    if set_int(&sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes).is_err() {
        // Without CAP_NET_ADMIN: as much as net.core.rmem_max allows.
        let _ = sock.set_recv_buffer_size(rcvbuf);
    }
    Ok(sock)
}

/// The sockets of one listener and whether they are steered.
#[derive(Debug)]
pub struct Bound {
    /// The sockets, by endpoint index.
    pub sockets: Vec<UdpSocket>,
    /// Why there are fewer than asked for (steering could not be set up),
    /// for the log.
    pub fallback: Option<String>,
}

/// Binds `n` UDP sockets on `addr` (port 0 picks one, the same for all),
/// each asking for `rcvbuf` bytes of receive buffer, with the steering
/// program on their reuseport group, checked with probe datagrams. When
/// steering cannot be set up (an old kernel, a socket of another process in
/// the group), only the first socket is kept, with the reason: one endpoint
/// needs no steering.
pub fn bind(addr: SocketAddr, n: usize, rcvbuf: usize) -> io::Result<Bound> {
    let n = n.clamp(1, ENDPOINTS_MAX);
    // The first socket binds without SO_REUSEPORT, so the port is ours
    // alone: the kernel's port-0 search would hand out a port of another
    // process's (same user's) reuseport group, and an explicit port already
    // in such a group would silently be shared. Once bound it allows reuse,
    // and the others join it.
    let first = new_socket(addr, rcvbuf)?;
    first.bind(&addr.into())?;
    let bound = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an inet address"))?;
    let first: UdpSocket = first.into();
    if n == 1 {
        return Ok(Bound {
            sockets: vec![first],
            fallback: None,
        });
    }
    match group(first.try_clone()?, bound, n, rcvbuf) {
        Ok(sockets) => Ok(Bound {
            sockets,
            fallback: None,
        }),
        Err(e) => Ok(Bound {
            sockets: vec![first],
            fallback: Some(format!(
                "cannot steer datagrams between {n} UDP sockets ({e}): one endpoint"
            )),
        }),
    }
}

/// The reuseport group of `first` (bound on `bound`) and `n - 1` more
/// sockets, steered and checked.
fn group(
    first: UdpSocket,
    bound: SocketAddr,
    n: usize,
    rcvbuf: usize,
) -> io::Result<Vec<UdpSocket>> {
    set_int(&first, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    let mut sockets = vec![first];
    for _ in 1..n {
        let sock = new_socket(bound, rcvbuf)?;
        sock.set_reuse_port(true)?;
        sock.bind(&bound.into())?;
        sockets.push(sock.into());
    }
    let mut code = program(n as u32);
    let prog = libc::sock_fprog {
        len: code.len() as libc::c_ushort,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: a valid socket and a sock_fprog pointing at `code`, which
    // outlives the call (the kernel copies the program).
    let r = unsafe {
        libc::setsockopt(
            sockets[0].as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&raw const prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    probe(&sockets, bound)?;
    Ok(sockets)
}

/// Checks that a datagram naming endpoint k (a short header whose
/// connection id starts with k) reaches socket k, for every k.
fn probe(sockets: &[UdpSocket], bound: SocketAddr) -> io::Result<()> {
    let target = match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let target = SocketAddr::new(target, bound.port());
    let from = UdpSocket::bind(SocketAddr::new(
        match target {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        },
        0,
    ))?;
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce).map_err(|e| io::Error::other(e.to_string()))?;
    let datagram = |k: usize| {
        let mut d = vec![0x40, k as u8];
        d.extend_from_slice(&nonce);
        d
    };
    for k in 0..sockets.len() {
        from.send_to(&datagram(k), target)?;
    }
    let mut buf = [0u8; 64];
    for (k, sock) in sockets.iter().enumerate() {
        let deadline = Instant::now() + PROBE_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::other(format!(
                    "probe for socket {k} did not arrive"
                )));
            }
            sock.set_read_timeout(Some(left))?;
            let len = match sock.recv_from(&mut buf) {
                Ok((len, _)) => len,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let got = &buf[..len];
            if got.len() == 2 + nonce.len() && got[2..] == nonce {
                if usize::from(got[1]) != k {
                    return Err(io::Error::other(format!(
                        "the probe for socket {} arrived at socket {k}",
                        got[1]
                    )));
                }
                break;
            }
            // A client's datagram that came early: it will retransmit.
        }
        sock.set_read_timeout(None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Goal: the kernel delivers each datagram to the socket its destination
    //! connection id names, for short and long headers, whatever the source
    //! port. Method: a real reuseport group on loopback, datagrams from many
    //! source ports.

    use super::*;

    fn recv_any(sockets: &[UdpSocket], expect: &[u8]) -> usize {
        for s in sockets {
            s.set_nonblocking(true).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            for (k, s) in sockets.iter().enumerate() {
                if let Ok((len, _)) = s.recv_from(&mut buf) {
                    assert_eq!(&buf[..len], expect);
                    return k;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("no socket received the datagram");
    }

    #[test]
    fn datagrams_go_to_the_endpoint_their_connection_id_names() {
        let n = 3;
        let b = bind("127.0.0.1:0".parse().unwrap(), n, 1 << 20).unwrap();
        assert!(b.fallback.is_none(), "{:?}", b.fallback);
        assert_eq!(b.sockets.len(), n);
        let addr = b.sockets[0].local_addr().unwrap();
        for s in &b.sockets {
            assert_eq!(s.local_addr().unwrap(), addr);
        }
        let mut cids = EndpointCids::new(2);
        let cid = cids.generate_cid();
        assert_eq!((cid.len(), cid[0]), (CID_LEN, 2));
        assert!(cids.validate(&cid).is_ok());
        assert!(EndpointCids::new(1).validate(&cid).is_err());
        for port_try in 0..12u8 {
            // A new source port each time: the kernel's hash would move it.
            let client = UdpSocket::bind("127.0.0.1:0").unwrap();
            // Short header with an id of endpoint 2 (or 1 = 4 % 3).
            let want = usize::from(port_try % 2) + 1;
            let id = if want == 2 { 2 } else { 4 };
            let mut short = vec![0x40, id];
            short.extend_from_slice(&[port_try; 7]);
            client.send_to(&short, addr).unwrap();
            assert_eq!(
                recv_any(&b.sockets, &short),
                want,
                "short header, try {port_try}"
            );
            // Long header: destination id length 8, first byte 5 (5 % 3 = 2).
            let mut long = vec![0xc0, 0, 0, 0, 1, 8, 5];
            long.extend_from_slice(&[port_try; 20]);
            client.send_to(&long, addr).unwrap();
            assert_eq!(
                recv_any(&b.sockets, &long),
                2,
                "long header, try {port_try}"
            );
        }
        // Too short for the byte the program reads: endpoint 0.
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(&[0xc0, 1], addr).unwrap();
        assert_eq!(recv_any(&b.sockets, &[0xc0, 1]), 0);
    }

    #[test]
    fn a_port_in_use_is_refused_and_one_endpoint_binds_alone() {
        let b = bind("127.0.0.1:0".parse().unwrap(), 2, 1 << 20).unwrap();
        let addr = b.sockets[0].local_addr().unwrap();
        // Another listener (same user, SO_REUSEPORT) on the same port.
        assert!(bind(addr, 2, 1 << 20).is_err());
        let one = bind("127.0.0.1:0".parse().unwrap(), 1, 1 << 20).unwrap();
        assert_eq!(one.sockets.len(), 1);
    }
}
