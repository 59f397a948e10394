//! Accepting a connection on the shard its socket landed on: the transport
//! handshakes (TLS, WebSocket), reading the CONNECT within the connect
//! timeout, authentication ([`admit`], with MQTT 5 enhanced authentication),
//! then serving it here or handing it to the shard that owns its ClientID.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::time::Instant;

use bytes::BytesMut;
use futures_lite::future::poll_fn;
use glommio::net::TcpStream;
use tessera_proto::{
    ConnAck, ConnAckProperties, Connect, DecodeError, Encode, Packet, PacketType, ProtocolVersion,
    ReasonCode, Str,
};
use tessera_shard::authz::Admission;
use tessera_shard::engine::Limit;
use tessera_shard::handoff::Handoff;
use tessera_shard::hash::{assign_client_id, shard_for};
use tessera_shard::probe::EarlyRefusal;
use tracing::{debug, warn};

use super::mesh::Envelope;
use super::read_budget;
use super::refusals::Refusal;
use super::serve::serve;
use super::{Accepted, PROBE_BYTES, READ_CHUNK_BYTES, Shard, now_ms, refused_early, warn_refusal};
use crate::auth::Verdict;
use crate::config::ListenerId;
use crate::transport::{AcceptError, Transport};

/// Counts a socket reading its CONNECT on this shard while alive.
pub(super) struct PendingConnect(Rc<Shard>);

impl PendingConnect {
    pub(super) fn new(shard: &Rc<Shard>) -> PendingConnect {
        shard.pending_connects.set(shard.pending_connects.get() + 1);
        PendingConnect(shard.clone())
    }
}

impl Drop for PendingConnect {
    fn drop(&mut self) {
        self.0
            .pending_connects
            .set(self.0.pending_connects.get() - 1);
    }
}

/// Runs the transport handshakes of a new connection (TLS, WebSocket) and
/// reads its CONNECT, all within the connect timeout, then serves it here or
/// hands it to the shard owning its ClientID.
pub(super) async fn accept_connection(shard: Rc<Shard>, listener: ListenerId, stream: TcpStream) {
    let pending = PendingConnect::new(&shard);
    let _ = stream.set_nodelay(true);
    // TCP keepalive catches peers that vanished without a FIN when the client
    // asked for MQTT keep alive 0 (no broker-side timeout then).
    // SAFETY: the fd belongs to `stream`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let _ = socket2::SockRef::from(&fd).set_keepalive(true);
    let deadline = Instant::now() + shard.connect_timeout;
    let spec = &shard.listeners[usize::from(listener)];
    let peer = stream.peer_addr().ok();
    let handshake =
        async { Some(Transport::accept(stream, spec, shard.tls_config(listener)).await) };
    let expire = async {
        glommio::timer::sleep(shard.connect_timeout).await;
        None
    };
    let (stream, buf, identity) = match futures_lite::future::or(handshake, expire).await {
        Some(Ok(accepted)) => accepted,
        Some(Err(e @ (AcceptError::Tls(_) | AcceptError::Upgrade(_)))) => {
            // Operators need to see refused certificates and upgrades; the
            // client's address says who.
            if warn_refusal(&shard, Refusal::Handshake) {
                warn!(
                    listener = %spec.url(spec.bind),
                    peer = ?peer,
                    reason = Refusal::Handshake.name(),
                    "connection refused: {e}"
                );
            }
            return;
        }
        Some(Err(e)) => {
            // A client (or a port scanner) that went away mid-handshake.
            debug!(listener = %spec.url(spec.bind), peer = ?peer, "handshake ended: {e}");
            return;
        }
        None => {
            debug!(listener = %spec.url(spec.bind), "no handshake within the connect timeout: closing");
            return;
        }
    };
    read_connect(
        shard, listener, stream, buf, identity, peer, pending, deadline,
    )
    .await;
}

/// Accepts an MQTT-over-QUIC stream that the endpoint thread gave this shard
/// (the QUIC handshake is done; `identity` is the username its client
/// certificate gives, per the listener's `username_from_cert`): reads the
/// CONNECT within the connect timeout, then serves it here or hands it to the
/// shard owning its ClientID, like a TCP connection.
pub(super) async fn accept_quic(
    shard: Rc<Shard>,
    listener: ListenerId,
    pipe: crate::transport::quic::QuicPipe,
    identity: Option<String>,
) {
    let pending = PendingConnect::new(&shard);
    let deadline = Instant::now() + shard.connect_timeout;
    let peer = Some(pipe.peer());
    let stream = Transport::quic(Box::new(pipe));
    read_connect(
        shard,
        listener,
        stream,
        BytesMut::new(),
        identity,
        peer,
        pending,
        deadline,
    )
    .await;
}

/// After the transport handshakes: reads and authenticates the CONNECT, then
/// serves the connection here or hands it to its owner shard.
#[allow(clippy::too_many_arguments)]
async fn read_connect(
    shard: Rc<Shard>,
    listener: ListenerId,
    mut stream: Transport,
    mut buf: BytesMut,
    identity: Option<String>,
    peer: Option<std::net::SocketAddr>,
    pending: PendingConnect,
    deadline: Instant,
) {
    let spec = &shard.listeners[usize::from(listener)];
    // A CONNECT may carry a large will: it draws on the read budget too.
    let mut reservation = read_budget::Reservation::new(shard.read_budget.clone());
    let connect = loop {
        match tessera_proto::check(&buf, shard.max_packet) {
            Ok(h) if h.packet_type != PacketType::Connect => {
                debug!("first packet is {:?}, not CONNECT: closing", h.packet_type);
                refused_early(&shard, EarlyRefusal::Malformed);
                return;
            }
            Ok(_) => {
                match tessera_proto::decode(&mut buf, ProtocolVersion::V3_1_1, shard.max_packet) {
                    Ok(Some(Packet::Connect(c))) => break *c,
                    Err(DecodeError::UnsupportedProtocol { level, .. }) => {
                        // [MQTT-3.1.2-2]: answer an unsupported level with return code
                        // 0x01 (3.1.1 format, which every version can parse) and close.
                        debug!(level, "unsupported protocol level: refusing");
                        refused_early(&shard, EarlyRefusal::UnsupportedProtocolVersion);
                        let _ = stream.send(&[0x20, 0x02, 0x00, 0x01]).await;
                        return;
                    }
                    other => {
                        debug!("bad CONNECT: {other:?}: closing");
                        refused_early(&shard, EarlyRefusal::Malformed);
                        return;
                    }
                }
            }
            Err(DecodeError::Incomplete { .. }) => {
                if reservation.track(&mut buf, shard.max_packet).is_err() {
                    // Counted and logged; answered with a CONNACK when the
                    // protocol level has arrived (v5: 0x97 Quota exceeded,
                    // 3.1/3.1.1: 0x03 Server unavailable), then closed.
                    shard
                        .engine
                        .borrow_mut()
                        .limit_refused(Limit::ReadBuffers, None);
                    if let Some(connack) = over_budget_connack(&buf) {
                        let _ = stream.send(connack).await;
                    }
                    return;
                }
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    debug!("no CONNECT within the connect timeout: closing");
                    refused_early(&shard, EarlyRefusal::ConnectTimeout);
                    return;
                };
                // Dropping a pending read loses nothing: glommio's unbuffered
                // read waits for readiness, then copies straight into `buf`.
                let read = async { Some(read_more(&mut stream, &mut buf).await) };
                let expire = async {
                    glommio::timer::sleep(left).await;
                    None
                };
                match futures_lite::future::or(read, expire).await {
                    Some(Ok(n)) if n > 0 => {}
                    None => {
                        debug!("no CONNECT within the connect timeout: closing");
                        refused_early(&shard, EarlyRefusal::ConnectTimeout);
                        return;
                    }
                    _ => return,
                }
            }
            Err(e) => {
                debug!("bad first packet: {e}: closing");
                if matches!(e, DecodeError::PacketTooLarge { .. }) {
                    shard
                        .engine
                        .borrow_mut()
                        .limit_refused(Limit::PacketSize, None);
                }
                refused_early(&shard, EarlyRefusal::Malformed);
                return;
            }
        }
    };
    let mut connect = connect;
    if let Some(name) = identity {
        match Str::try_from(name) {
            Ok(name) => {
                debug!(listener = %spec.url(spec.bind), username = %name.as_str(), "username from the client certificate");
                connect.username = Some(name);
            }
            Err(e) => {
                if warn_refusal(&shard, Refusal::CertificateIdentity) {
                    warn!(listener = %spec.url(spec.bind), peer = ?peer, reason = Refusal::CertificateIdentity.name(), "client certificate identity is not a valid MQTT username ({e:?}): closing");
                }
                return;
            }
        }
    } else if spec.username_from_cert != crate::config::CertIdentity::None {
        if warn_refusal(&shard, Refusal::CertificateIdentity) {
            warn!(
                listener = %spec.url(spec.bind),
                peer = ?peer,
                reason = Refusal::CertificateIdentity.name(),
                "client certificate has no {} to use as username: closing",
                spec.username_from_cert
            );
        }
        return;
    }
    let Some(admission) = admit(
        &shard,
        &mut stream,
        &mut buf,
        &mut connect,
        spec.username_from_cert != crate::config::CertIdentity::None,
        spec.allow_anonymous,
        deadline,
    )
    .await
    else {
        return;
    };
    let mut assigned = false;
    if connect.client_id.is_empty() {
        // An assigned id hashes to this shard, so the connection never hops.
        let mut seed = shard.id_seed.get();
        let id = assign_client_id(shard.id, shard.shard_count, &mut seed);
        shard.id_seed.set(seed);
        connect.client_id = Str::try_from(id).expect("assigned ids are ASCII");
        assigned = true;
    }
    let owner = shard_for(connect.client_id.as_bytes(), shard.shard_count);
    // From here the connection counts in `connections` (of this shard or the
    // owner): no longer pending.
    drop(pending);
    if owner == shard.id {
        glommio::spawn_local(serve(
            shard,
            stream,
            buf.freeze(),
            connect,
            assigned,
            listener,
            admission,
        ))
        .detach();
    } else {
        match stream.into_parts() {
            Ok((stream, transport)) => {
                let accepted = Accepted {
                    connect,
                    assigned,
                    listener,
                    transport,
                    admission,
                };
                match Handoff::detach(stream, buf.freeze(), owner, accepted) {
                    Ok(h) => shard.send_envelope(owner, Envelope::Handoff(Box::new(h))),
                    Err(e) => warn!("hand-off to shard {owner} failed: {e}"),
                }
            }
            // QUIC: the pipe to the endpoint thread moves whole.
            Err(pipe) => shard.send_envelope(
                owner,
                Envelope::Moved(Box::new(Moved {
                    pipe,
                    already_read: buf.freeze(),
                    connect,
                    assigned,
                    listener,
                    admission,
                })),
            ),
        }
    }
}

/// A connection without a socket of its own (QUIC) moving to its owner shard.
#[derive(Debug)]
pub(super) struct Moved {
    pub(super) pipe: Box<crate::transport::quic::QuicPipe>,
    pub(super) already_read: bytes::Bytes,
    pub(super) connect: Connect,
    pub(super) assigned: bool,
    pub(super) listener: ListenerId,
    pub(super) admission: Admission,
}

/// Writes a refusing CONNACK in the client's version and closes.
pub(super) async fn refuse(mut stream: Transport, version: ProtocolVersion, rc: ReasonCode) {
    let _ = send_connack(&mut stream, version, rc).await;
}

async fn send_connack(
    stream: &mut Transport,
    version: ProtocolVersion,
    rc: ReasonCode,
) -> std::io::Result<()> {
    send_connack_with(stream, version, rc, Default::default()).await
}

/// A refusing CONNACK with properties (v5: e.g. a Server Reference), then close.
pub(super) async fn refuse_with(
    mut stream: Transport,
    version: ProtocolVersion,
    rc: ReasonCode,
    properties: ConnAckProperties,
) {
    let _ = send_connack_with(&mut stream, version, rc, properties).await;
}

async fn send_connack_with(
    stream: &mut Transport,
    version: ProtocolVersion,
    rc: ReasonCode,
    properties: ConnAckProperties,
) -> std::io::Result<()> {
    let ack = ConnAck {
        session_present: false,
        reason_code: rc,
        properties,
    };
    let mut out = BytesMut::new();
    if ack.encode(version, &mut out).is_ok() {
        stream.send(&out).await?;
    }
    // QUIC: the CONNACK says why; the connection then closes as done.
    if let Some(pipe) = stream.quic_pipe() {
        pipe.set_done();
    }
    Ok(())
}

/// Authenticates a decoded CONNECT on the accepting shard (so a refused
/// client never costs a hand-off), running an MQTT 5 enhanced authentication
/// exchange (AUTH 0x18 both ways) within the connect deadline. Returns what
/// the engine needs, or `None` after refusing the client (CONNACK written).
/// Either way the CONNECT no longer holds its password. `cert_identity`: the
/// listener took the user name from a verified client certificate.
async fn admit(
    shard: &Shard,
    stream: &mut Transport,
    buf: &mut BytesMut,
    connect: &mut Connect,
    cert_identity: bool,
    allow_anonymous: Option<bool>,
    deadline: Instant,
) -> Option<Admission> {
    if !shard.auth.enabled() {
        connect.password = None;
        return Some(Admission::default());
    }
    let version = connect.version;
    let method = connect.properties.authentication_method.clone();
    let mut verdict = shard
        .auth
        .authenticate(connect, cert_identity, allow_anonymous)
        .await;
    let mut exchanges = 0;
    loop {
        match verdict {
            Verdict::Accept {
                expires_unix_s,
                token_acl,
            } => {
                return Some(Admission {
                    auth_data: connect.properties.authentication_data.take(),
                    auth_method: method,
                    expires_at_ms: expires_unix_s.map(engine_ms_of_unix),
                    token_acl,
                    claim_epoch: None,
                });
            }
            Verdict::Refuse(rc) => {
                shard.engine.borrow_mut().probe_mut().connect_result(rc);
                let _ = send_connack(stream, version, rc).await;
                debug!(reason = ?rc, "CONNECT refused");
                return None;
            }
            Verdict::Continue { data, state } => {
                // SCRAM needs one round trip; a bound keeps a client from
                // holding the exchange open.
                exchanges += 1;
                let method = method.clone()?;
                let auth = tessera_proto::Auth {
                    reason_code: ReasonCode::ContinueAuthentication,
                    properties: tessera_proto::AuthProperties {
                        authentication_method: Some(method.clone()),
                        authentication_data: Some(data),
                        ..Default::default()
                    },
                };
                let mut out = BytesMut::new();
                Packet::Auth(auth).encode(version, &mut out).ok()?;
                stream.send(&out).await.ok()?;
                let answer = read_packet(stream, buf, version, shard.max_packet, deadline).await?;
                verdict = match answer {
                    Packet::Auth(a)
                        if exchanges <= 2
                            && a.reason_code == ReasonCode::ContinueAuthentication
                            && a.properties.authentication_method.as_ref() == Some(&method) =>
                    {
                        let data = a.properties.authentication_data.unwrap_or_default();
                        shard.auth.continue_auth(connect, &state, &data)
                    }
                    _ => Verdict::Refuse(ReasonCode::ProtocolError),
                };
            }
        }
    }
}

/// The engine clock's value at a Unix time in seconds.
fn engine_ms_of_unix(unix_s: u64) -> u64 {
    let now_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (now_ms() + unix_s.saturating_mul(1000)).saturating_sub(now_unix_ms)
}

/// Reads one packet before `deadline`; `None` on timeout, close or a decode
/// error.
async fn read_packet(
    stream: &mut Transport,
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet: usize,
    deadline: Instant,
) -> Option<Packet> {
    loop {
        match tessera_proto::decode(buf, version, max_packet) {
            Ok(Some(p)) => return Some(p),
            Ok(None) => {}
            Err(e) => {
                debug!("bad packet during authentication: {e}");
                return None;
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        let read = async { Some(read_more(stream, buf).await) };
        let expire = async {
            glommio::timer::sleep(left).await;
            None
        };
        match futures_lite::future::or(read, expire).await {
            Some(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

/// Reads once into `buf`; returns the bytes read (0 at end of stream).
async fn read_more(stream: &mut Transport, buf: &mut BytesMut) -> std::io::Result<usize> {
    let start = buf.len();
    // The first read is small: a CONNECT usually fits, and a burst of
    // thousands of new connections then holds thousands of small buffers, not
    // 4 KiB ones that leave the heap fragmented once freed.
    let chunk = if start == 0 {
        PROBE_BYTES
    } else {
        READ_CHUNK_BYTES
    };
    buf.resize(start + chunk, 0);
    let r = poll_fn(|cx| stream.poll_read(cx, &mut buf[start..])).await;
    let n = *r.as_ref().unwrap_or(&0);
    buf.truncate(start + n);
    r
}

/// The CONNACK that refuses a CONNECT the node's read budget cannot hold, in
/// the CONNECT's protocol version, read from its first bytes (fixed header,
/// protocol name, level); `None` while the level has not arrived or the bytes
/// are not a CONNECT's start (then the connection is only closed).
fn over_budget_connack(buf: &[u8]) -> Option<&'static [u8]> {
    // The remaining length: 1-4 bytes after the packet type.
    let mut at = 1;
    loop {
        let b = *buf.get(at)?;
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return None;
        }
    }
    let name_len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    let name = buf.get(at + 2..at + 2 + name_len)?;
    if name != b"MQTT" && name != b"MQIsdp" {
        return None;
    }
    match *buf.get(at + 2 + name_len)? {
        // Session present 0, reason 0x97, no properties.
        5 => Some(&[0x20, 0x03, 0x00, 0x97, 0x00]),
        3 | 4 => Some(&[0x20, 0x02, 0x00, 0x03]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::over_budget_connack;

    #[test]
    fn an_over_budget_connect_is_answered_in_its_version_once_the_level_is_in() {
        // CONNECT, remaining length 200,000 (3 bytes), "MQTT", level.
        let head = [0x10, 0xC0, 0x9A, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T'];
        let with = |level: u8| [&head[..], &[level, 0x02]].concat();
        assert_eq!(
            over_budget_connack(&with(5)),
            Some(&[0x20, 0x03, 0x00, 0x97, 0x00][..])
        );
        assert_eq!(
            over_budget_connack(&with(4)),
            Some(&[0x20, 0x02, 0x00, 0x03][..])
        );
        let v31 = [
            0x10, 0xC0, 0x9A, 0x0C, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 3,
        ];
        assert_eq!(
            over_budget_connack(&v31),
            Some(&[0x20, 0x02, 0x00, 0x03][..])
        );
        // Not yet the level, an unknown level, a name that is not MQTT's, or a
        // remaining length longer than 4 bytes: no CONNACK.
        assert_eq!(over_budget_connack(&head), None);
        assert_eq!(over_budget_connack(&with(9)), None);
        let mut other = with(5);
        other[6] = b'X';
        assert_eq!(over_budget_connack(&other), None);
        assert_eq!(
            over_budget_connack(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            None
        );
    }
}
