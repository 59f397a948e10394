//! Bridges on their owner shard: one task per bridge, relaying between the
//! bridge's local session in the engine (a connection without a socket: the
//! task hands it packets with `Engine::handle_packet` and decodes its output)
//! and an MQTT client connection to the remote broker. See [`crate::bridge`]
//! for the design and docs/BRIDGES.md for the user's side.
//!
//! Packet identifiers cross unchanged: the engine's deliveries to the bridge
//! (server-side ids of the local session) are the bridge's publishes on the
//! remote (client-side ids there), and the remote's deliveries are the
//! bridge's publishes into the engine. Every acknowledgement is therefore a
//! relay of the other side's, and the local session's stored in-flight window
//! is the only state: nothing acknowledged is lost when either side restarts.

use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_lite::future::poll_fn;
use tessera_proto::packet::{Connect, Publish, Subscribe, Subscription, Unsubscribe};
use tessera_proto::{
    ConnectProperties, DecodeError, Encode, FrameHeader, Packet, PacketType, ProtocolVersion,
    PublishProperties, QoS, ReasonCode, RetainHandling, Str, SubscribeProperties,
    SubscriptionOptions,
};
use tessera_shard::authz::Admission;
use tessera_shard::hash::shard_for;
use tessera_shard::session::ConnId;
use tracing::{info, warn};

use super::{Shard, now_ms, persist};
use crate::bridge::stream::{CONNECT_TIMEOUT, LinkStream, Target, tls_config};
use crate::bridge::{BridgeHub, BridgeStats, Rule, backoff, jitter_seed, quic};
use crate::config::BridgeConfig;

/// Bytes read from the remote per read call.
const READ_CHUNK: usize = 16 * 1024;

/// Engine output is taken only while less than this waits for the remote:
/// beyond it deliveries stay in the session's queue (memory and disk).
const WRITE_BUFFER_MAX: usize = 256 * 1024;

/// The largest engine output buffer kept for reuse (see `Relay::spare`).
const SPARE_BUFFER_MAX: usize = 4 * WRITE_BUFFER_MAX;

/// Remote publications waiting for the engine's Receive Maximum; reading the
/// remote pauses beyond it (TCP then slows the remote).
const PENDING_IN_MAX: usize = 1024;

/// Deliveries the local session keeps in memory before its disk tail
/// (`Engine::set_queue_head`; other sessions keep 64). A disk tail comes back
/// one load per store commit, at most a head's worth: with 64, a bridge
/// draining a backlog (after an outage, or behind a burst) sent at most ~64
/// messages per commit, 3-6K msg/s on a disk whose commits took 10-20 ms.
/// Every queued message is in the store either way; this costs memory, a
/// few MB per bridge at most.
const QUEUE_HEAD: u16 = 4096;

/// Longest a bridge's local session waits at start for its SUBACK, i.e. for
/// every shard (and in a cluster, the forwarder) to have its routes. Beyond
/// it the bridge starts anyway (a cluster that is not formed yet) and says so.
pub(super) const ROUTES_WAIT: Duration = Duration::from_secs(5);

/// The packet identifier of the bridge's own SUBSCRIBE/UNSUBSCRIBE packets
/// (sent before any relayed publication on that connection).
const OWN_PACKET_ID: u16 = 1;

/// How the bridges of one shard are started and stopped.
pub(super) struct Bridges {
    hub: Arc<BridgeHub>,
    generation: u64,
    running: Vec<Running>,
}

struct Running {
    config: Arc<BridgeConfig>,
    ctl: Rc<Control>,
    stats: Arc<BridgeStats>,
}

/// Tells a bridge task to stop.
#[derive(Default)]
struct Control {
    stop: Cell<bool>,
    /// On stop, end the local session too (the bridge was removed).
    forget: Cell<bool>,
    /// The local session is subscribed (`prime` done).
    primed: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Control {
    fn stop(&self, forget: bool) {
        self.forget.set(forget);
        self.stop.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn register(&self, cx: &Context<'_>) {
        let mut w = self.waker.borrow_mut();
        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *w = Some(cx.waker().clone());
        }
    }

    async fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        while !self.stop.get() {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            glommio::timer::sleep((deadline - now).min(Duration::from_millis(100))).await;
        }
    }
}

impl Bridges {
    pub(super) fn new(hub: Arc<BridgeHub>) -> Bridges {
        Bridges {
            hub,
            generation: 0,
            running: Vec::new(),
        }
    }

    /// At every shard tick: applies a new set of bridges (start, restart,
    /// stop the ones this shard owns) and refreshes the queue gauges.
    pub(super) fn tick(&mut self, shard: &Rc<Shard>) {
        let generation = self.hub.generation();
        if generation != self.generation {
            self.generation = generation;
            let set = self.hub.snapshot();
            self.running.retain(|r| {
                let keep = set.iter().any(|c| **c == *r.config);
                if !keep {
                    let still_used = set.iter().any(|c| c.client_id() == r.config.client_id());
                    info!(bridge = %r.config.name, "bridge configuration changed or removed: stopping it");
                    r.ctl.stop(!still_used);
                }
                keep
            });
            for c in set.iter() {
                let owner = shard_for(c.client_id().as_bytes(), shard.shard_count);
                if owner != shard.id || self.running.iter().any(|r| *r.config == **c) {
                    continue;
                }
                let ctl = Rc::new(Control::default());
                let stats = self.hub.stats(&c.name);
                stats.shard.store(shard.id as u64, Ordering::Relaxed);
                // The task first makes the local session exist with its
                // subscriptions (`prime`); at start-up the shard waits for
                // that (`Bridges::primed`) before it listens.
                glommio::spawn_local(run(shard.clone(), c.clone(), stats.clone(), ctl.clone()))
                    .detach();
                self.running.push(Running {
                    config: c.clone(),
                    ctl,
                    stats,
                });
            }
        }
        if self.running.is_empty() {
            return;
        }
        let engine = shard.engine.borrow();
        for r in &self.running {
            let queued = engine
                .admin_session(now_ms(), &r.config.client_id())
                .map_or(0, |d| d.info.queued);
            r.stats.queued.store(queued as u64, Ordering::Relaxed);
        }
    }

    /// At start-up: waits until every bridge of this shard has its local
    /// session subscribed, every shard having its routes (its SUBACK), so
    /// that what is published once the broker listens is queued for it.
    /// `prime` bounds each wait by [`ROUTES_WAIT`].
    pub(super) async fn primed(&self) {
        while self.running.iter().any(|r| !r.ctl.primed.get()) {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    /// At shutdown: every bridge task ends its links.
    pub(super) fn stop_all(&mut self) {
        for r in self.running.drain(..) {
            r.ctl.stop(false);
        }
    }
}

/// Why a link ended.
struct LinkEnd {
    error: String,
    /// The link had been up (CONNACK received): the back-off starts over.
    was_up: bool,
}

fn fail<T>(error: impl Into<String>) -> Result<T, LinkEnd> {
    Err(LinkEnd {
        error: error.into(),
        was_up: false,
    })
}

async fn run(shard: Rc<Shard>, cfg: Arc<BridgeConfig>, stats: Arc<BridgeStats>, ctl: Rc<Control>) {
    let out_rules: Vec<Rule> = cfg.out_rules.iter().map(Rule::out).collect();
    let in_rules: Vec<Rule> = cfg.in_rules.iter().map(Rule::inward).collect();
    // The local session exists (with its subscriptions routed on every
    // shard) from now on: what is published for the bridge before its first
    // connect is queued.
    if let Err(e) = prime(&shard, &cfg, &out_rules, &ctl).await {
        warn!(bridge = %cfg.name, "bridge's local session: {e}");
        stats.set_error(&e);
    }
    ctl.primed.set(true);
    info!(
        bridge = %cfg.name,
        shard = shard.id,
        remote = %cfg.address,
        transport = %cfg.transport,
        "bridge starting"
    );
    let tls = if cfg.transport().is_tls() {
        let quic = |tls: Arc<rustls::ClientConfig>| {
            let quic = cfg
                .transport()
                .is_quic()
                .then(|| quic::client_config(&cfg, &tls))
                .transpose()?;
            Ok::<_, String>((tls, quic))
        };
        match tls_config(&cfg).and_then(quic) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(bridge = %cfg.name, "bridge cannot start: {e}");
                stats.set_error(&e);
                while !ctl.stop.get() {
                    ctl.sleep(Duration::from_secs(1)).await;
                }
                return;
            }
        }
    } else {
        None
    };
    let mut attempt = 0u32;
    let mut random = jitter_seed();
    while !ctl.stop.get() {
        let r = link(
            &shard,
            &cfg,
            &out_rules,
            &in_rules,
            &stats,
            &ctl,
            tls.as_ref().map(|t| &t.0),
            tls.as_ref().and_then(|t| t.1.as_ref()),
        )
        .await;
        stats.connected.store(false, Ordering::Relaxed);
        stats.in_flight.store(0, Ordering::Relaxed);
        match r {
            Ok(()) => break,
            Err(end) => {
                if end.was_up {
                    attempt = 0;
                }
                stats.set_error(&end.error);
                // The first failure and then every power of two: a remote down
                // for hours does not fill the log.
                if attempt.is_power_of_two() || attempt == 0 {
                    warn!(bridge = %cfg.name, attempt, "bridge link: {}", end.error);
                }
            }
        }
        if ctl.stop.get() {
            break;
        }
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        let delay = backoff(attempt, cfg.reconnect_min_ms, cfg.reconnect_max_ms, random);
        attempt = attempt.saturating_add(1);
        ctl.sleep(delay).await;
    }
    if ctl.forget.get() {
        forget(&shard, &cfg);
    }
    info!(bridge = %cfg.name, "bridge stopped");
}

fn str_of(s: &str) -> Str {
    Str::try_from(s).unwrap_or_else(|_| Str::from_static(""))
}

/// Attaches the bridge's local session (a connection without a socket).
fn attach(
    shard: &Shard,
    cfg: &BridgeConfig,
    clean_start: bool,
    receive_max: u16,
    packet_max: u32,
) -> ConnId {
    let expiry = if clean_start { 0 } else { u32::MAX };
    let connect = Connect {
        version: ProtocolVersion::V5,
        clean_start,
        keep_alive: 0,
        client_id: str_of(&cfg.client_id()),
        will: None,
        username: cfg.local_username.as_deref().map(str_of),
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(expiry),
            receive_maximum: Some(receive_max.max(1)),
            maximum_packet_size: Some(packet_max.max(64)),
            ..ConnectProperties::default()
        },
    };
    let conn = {
        let mut engine = shard.engine.borrow_mut();
        let conn = engine.connect_admitted(now_ms(), connect, false, Admission::default());
        engine.set_queue_head(conn, QUEUE_HEAD);
        // The bridge's window is the remote's (its Receive Maximum or the
        // bridge's `max_inflight`), not `limits.max_inflight`, which caps
        // what this broker sends its clients.
        engine.set_window_max(now_ms(), conn, receive_max);
        conn
    };
    shard.flush_outbox();
    conn
}

fn detach(shard: &Shard, conn: ConnId) {
    {
        let mut engine = shard.engine.borrow_mut();
        engine.connection_lost(now_ms(), conn);
        engine.release(now_ms(), conn);
    }
    shard.flush_outbox();
}

/// Takes and decodes what the engine wrote for the local session.
fn take_local(shard: &Shard, conn: ConnId) -> Vec<Packet> {
    let mut buf = {
        let mut engine = shard.engine.borrow_mut();
        match engine.output(conn) {
            Some(out) => std::mem::take(&mut out.buf),
            None => return Vec::new(),
        }
    };
    let mut packets = Vec::new();
    while let Ok(Some(p)) = tessera_proto::decode(&mut buf, ProtocolVersion::V5, usize::MAX) {
        packets.push(p);
    }
    packets
}

/// Whether `out` deliveries can cross as the engine encodes them for a v5
/// remote: no rule rewrites topics and all treat RETAIN alike, so no
/// delivery needs to name its rule.
fn verbatim_rules(rules: &[Rule]) -> bool {
    rules.iter().all(Rule::keeps_topics)
        && rules
            .windows(2)
            .all(|w| w[0].keep_retain == w[1].keep_retain)
}

fn local_subscribes(rules: &[Rule]) -> Vec<Packet> {
    let name_rules = !verbatim_rules(rules);
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Packet::Subscribe(Subscribe {
                packet_id: OWN_PACKET_ID,
                properties: SubscribeProperties {
                    // The delivery names the rule that matched, when the rule
                    // matters (a client's PUBLISH never carries one, so a
                    // verbatim delivery must not either).
                    subscription_identifier: name_rules.then_some(i as u32 + 1),
                    user_properties: Vec::new(),
                },
                subscriptions: vec![Subscription {
                    filter: str_of(&r.filter),
                    options: SubscriptionOptions {
                        qos: QoS::from_u8(r.qos).unwrap_or(QoS::AtLeastOnce),
                        // What the bridge publishes here (`in`) never goes back out.
                        no_local: true,
                        retain_as_published: r.keep_retain,
                        retain_handling: RetainHandling::SendIfNew,
                    },
                }],
            })
        })
        .collect()
}

/// Makes the local session exist with the `out` rules' subscriptions (and
/// without those of rules removed since), waits for their SUBACK (every
/// shard has the routes; at most [`ROUTES_WAIT`]), then detaches it.
async fn prime(
    shard: &Shard,
    cfg: &BridgeConfig,
    rules: &[Rule],
    ctl: &Control,
) -> Result<(), String> {
    let conn = attach(shard, cfg, false, 1, u32::MAX);
    let refused = take_local(shard, conn).into_iter().find_map(|p| match p {
        Packet::ConnAck(a) if a.reason_code != ReasonCode::Success => Some(a.reason_code),
        _ => None,
    });
    if let Some(rc) = refused {
        detach(shard, conn);
        return Err(format!("the local session was refused: {rc:?}"));
    }
    let stale: Vec<Str> = shard
        .engine
        .borrow()
        .admin_session(now_ms(), &cfg.client_id())
        .map(|d| {
            d.subscriptions
                .into_iter()
                .filter(|s| !rules.iter().any(|r| r.filter == s.filter))
                .map(|s| str_of(&s.filter))
                .collect()
        })
        .unwrap_or_default();
    let mut packets = local_subscribes(rules);
    if !stale.is_empty() {
        packets.push(Packet::Unsubscribe(Unsubscribe {
            packet_id: OWN_PACKET_ID,
            properties: Default::default(),
            filters: stale,
        }));
    }
    let expected = packets.len();
    {
        let mut engine = shard.engine.borrow_mut();
        for p in packets {
            engine.handle_packet(now_ms(), conn, p);
        }
    }
    shard.flush_outbox();
    let deadline = Instant::now() + ROUTES_WAIT;
    let (mut answered, mut result) = (0, Ok(()));
    loop {
        for p in take_local(shard, conn) {
            match p {
                Packet::SubAck(a) => {
                    answered += 1;
                    if let Some(code) = a.reason_codes.iter().find(|c| c.is_error()) {
                        result = Err(format!(
                            "a local subscription of the bridge was refused: {code:?}"
                        ));
                    }
                }
                Packet::UnsubAck(_) => answered += 1,
                _ => {}
            }
        }
        if answered >= expected || ctl.stop.get() {
            break;
        }
        if Instant::now() >= deadline {
            warn!(
                bridge = %cfg.name,
                "the bridge's routes were not acknowledged everywhere within {} s; starting \
                 anyway (a publication elsewhere may miss the bridge until its route arrives)",
                ROUTES_WAIT.as_secs()
            );
            break;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    detach(shard, conn);
    result
}

/// Ends the local session of a removed bridge (what it queued is dropped).
fn forget(shard: &Shard, cfg: &BridgeConfig) {
    let conn = attach(shard, cfg, true, 1, u32::MAX);
    detach(shard, conn);
    info!(bridge = %cfg.name, "removed bridge's local session ended");
}

async fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = address.parse() {
        return Ok(a);
    }
    let a = address.to_owned();
    // Name resolution blocks: off the shard thread.
    glommio::executor()
        .spawn_blocking(move || a.to_socket_addrs().map(|mut i| i.next()))
        .await
        .map_err(|e| format!("cannot resolve {address}: {e}"))?
        .ok_or_else(|| format!("{address} resolves to no address"))
}

async fn write_all(stream: &mut LinkStream, mut data: &[u8]) -> Result<(), String> {
    while !data.is_empty() {
        let n = poll_fn(|cx| stream.poll_write(cx, data))
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the remote stopped reading".into());
        }
        data = &data[n..];
    }
    poll_fn(|cx| stream.poll_flush(cx))
        .await
        .map_err(|e| e.to_string())
}

async fn read_packet(
    stream: &mut LinkStream,
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max: usize,
) -> Result<Packet, String> {
    loop {
        match tessera_proto::decode(buf, version, max) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(format!("malformed packet from the remote: {e}")),
        }
        let start = buf.len();
        buf.resize(start + READ_CHUNK, 0);
        let r = poll_fn(|cx| stream.poll_read(cx, &mut buf[start..])).await;
        let n = *r.as_ref().unwrap_or(&0);
        buf.truncate(start + n);
        match r {
            Ok(0) => return Err("the remote closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading from the remote: {e}")),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn link(
    shard: &Rc<Shard>,
    cfg: &BridgeConfig,
    out_rules: &[Rule],
    in_rules: &[Rule],
    stats: &BridgeStats,
    ctl: &Control,
    tls: Option<&Arc<rustls::ClientConfig>>,
    quic: Option<&quinn::ClientConfig>,
) -> Result<(), LinkEnd> {
    let addr = match resolve(&cfg.address).await {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let mut stream = match LinkStream::connect(cfg, Target { addr, tls, quic }).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let version = if cfg.is_v5() {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V3_1_1
    };
    let (local_receive_max, max_packet) = {
        let engine = shard.engine.borrow();
        (
            engine.limits().receive_maximum,
            engine.limits().packet_size_bytes_max,
        )
    };
    let connect = Connect {
        version,
        clean_start: cfg.clean_start,
        keep_alive: cfg.keep_alive_s,
        client_id: str_of(&cfg.client_id()),
        will: None,
        username: cfg.username.as_deref().map(str_of),
        password: cfg
            .password
            .as_ref()
            .map(|p| Bytes::from(p.clone().into_bytes())),
        properties: if version.is_v5() {
            ConnectProperties {
                session_expiry_interval: Some(cfg.session_expiry_s),
                receive_maximum: Some(local_receive_max),
                maximum_packet_size: Some(max_packet),
                ..ConnectProperties::default()
            }
        } else {
            ConnectProperties::default()
        },
    };
    let mut wbuf = BytesMut::new();
    if let Err(e) = Packet::Connect(Box::new(connect)).encode(version, &mut wbuf) {
        return fail(format!("cannot encode CONNECT: {e}"));
    }
    let mut rbuf = BytesMut::new();
    let handshake = async {
        write_all(&mut stream, &wbuf).await?;
        let ack = match read_packet(&mut stream, &mut rbuf, version, max_packet as usize).await? {
            Packet::ConnAck(a) if a.reason_code == ReasonCode::Success => a,
            Packet::ConnAck(a) => {
                return Err(format!(
                    "the remote refused the connection: {:?}",
                    a.reason_code
                ));
            }
            other => {
                return Err(format!(
                    "expected CONNACK, the remote sent {:?}",
                    other.packet_type()
                ));
            }
        };
        // The `in` subscriptions, answered before any relayed publication uses
        // the packet identifier.
        let mut early = VecDeque::new();
        if !in_rules.is_empty() {
            let sub = Subscribe {
                packet_id: OWN_PACKET_ID,
                properties: SubscribeProperties::default(),
                subscriptions: in_rules
                    .iter()
                    .map(|r| Subscription {
                        filter: str_of(&r.filter),
                        options: SubscriptionOptions {
                            qos: QoS::from_u8(r.qos).unwrap_or(QoS::AtLeastOnce),
                            // MQTT 5: what the bridge publishes there never comes back.
                            no_local: version.is_v5(),
                            retain_as_published: version.is_v5() && r.keep_retain,
                            retain_handling: if version.is_v5() {
                                RetainHandling::SendIfNew
                            } else {
                                RetainHandling::SendAtSubscribe
                            },
                        },
                    })
                    .collect(),
            };
            let mut b = BytesMut::new();
            Packet::Subscribe(sub)
                .encode(version, &mut b)
                .map_err(|e| format!("cannot encode SUBSCRIBE: {e}"))?;
            write_all(&mut stream, &b).await?;
            loop {
                match read_packet(&mut stream, &mut rbuf, version, max_packet as usize).await? {
                    Packet::SubAck(s) if s.packet_id == OWN_PACKET_ID => {
                        for (code, r) in s.reason_codes.iter().zip(in_rules) {
                            if code.is_error() {
                                let e = format!(
                                    "the remote refused the subscription to {:?}: {code:?}",
                                    r.filter
                                );
                                warn!(bridge = %cfg.name, "{e}");
                                stats.set_error(&e);
                            }
                        }
                        break;
                    }
                    // A resumed remote session resends what was in flight.
                    p => early.push_back(p),
                }
                if early.len() > PENDING_IN_MAX {
                    return Err("the remote sent too much before its SUBACK".into());
                }
            }
        }
        Ok((ack, early))
    };
    let (ack, early) = match glommio::timer::timeout(CONNECT_TIMEOUT, async {
        handshake
            .await
            .map_err(|e| glommio::GlommioError::IoError(std::io::Error::other(e)))
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            stream.close();
            return fail(format!("{}: {e}", cfg.address));
        }
    };
    let props = &ack.properties;
    let remote_receive_max = cfg.max_inflight_to(version.is_v5(), props.receive_maximum);
    let remote_packet_max = props.maximum_packet_size.unwrap_or(u32::MAX);
    let retain_available = props.retain_available != Some(false);
    let keep_alive = props.server_keep_alive.unwrap_or(cfg.keep_alive_s);
    let conn = attach(shard, cfg, false, remote_receive_max, remote_packet_max);
    // QoS 0 publishers feeding the bridge are slowed while it is behind
    // (bounded), rather than outrunning the remote into the queue's budget.
    shard
        .engine
        .borrow_mut()
        .set_feed_pace(conn, u64::from(cfg.qos0_pace_ms_max));
    stats.connected.store(true, Ordering::Relaxed);
    BridgeStats::add(&stats.connects, 1);
    info!(
        bridge = %cfg.name,
        remote = %cfg.address,
        session_present = ack.session_present,
        "bridge connected"
    );
    let mut relay = Relay {
        shard: shard.clone(),
        conn,
        stream,
        version,
        rbuf,
        wbuf: BytesMut::new(),
        written: 0,
        taken: None,
        spare: BytesMut::new(),
        to_engine: Vec::new(),
        verbatim: version.is_v5() && verbatim_rules(out_rules),
        pending_in: early,
        in_ids: IdSet::default(),
        local_receive_max: local_receive_max.max(1),
        out_ids: IdSet::default(),
        local_only: HashSet::new(),
        remote_only: HashSet::new(),
        out_rules,
        in_rules,
        stats,
        ctl,
        retain_available,
        max_packet: max_packet as usize,
        keep_alive: Duration::from_secs(u64::from(keep_alive)),
        last_sent: Instant::now(),
        last_received: Instant::now(),
        last_ping: Instant::now(),
        timer: None,
        reading_done: false,
    };
    let r = poll_fn(|cx| relay.poll(cx)).await;
    let mut stream = relay.stream;
    detach(shard, conn);
    match r {
        Ok(()) => {
            // Stopped: tell the remote, best effort.
            let mut b = BytesMut::new();
            let _ = Packet::Disconnect(tessera_proto::Disconnect::new(ReasonCode::Success))
                .encode(version, &mut b);
            let _ = glommio::timer::timeout(Duration::from_millis(500), async {
                let _ = write_all(&mut stream, &b).await;
                Ok(())
            })
            .await;
            stream.close();
            Ok(())
        }
        Err(error) => {
            stream.close();
            Err(LinkEnd {
                error,
                was_up: true,
            })
        }
    }
}

/// A set of packet identifiers: one bit each (8 KiB), so the relay's
/// per-message bookkeeping is a bit flip instead of a hash-set insert and
/// remove (SipHash, ~2 % of the local broker's core at 265K QoS 1 msg/s).
struct IdSet {
    bits: Box<[u64; 1024]>,
    len: usize,
}

impl Default for IdSet {
    fn default() -> IdSet {
        IdSet {
            bits: Box::new([0; 1024]),
            len: 0,
        }
    }
}

impl IdSet {
    fn slot(id: u16) -> (usize, u64) {
        (usize::from(id >> 6), 1 << (id & 63))
    }

    fn contains(&self, id: u16) -> bool {
        let (w, b) = IdSet::slot(id);
        self.bits[w] & b != 0
    }

    /// Adds `id`; false when it was there already.
    fn insert(&mut self, id: u16) -> bool {
        let (w, b) = IdSet::slot(id);
        let new = self.bits[w] & b == 0;
        self.bits[w] |= b;
        self.len += usize::from(new);
        new
    }

    /// Removes `id`; false when it was not there.
    fn remove(&mut self, id: u16) -> bool {
        let (w, b) = IdSet::slot(id);
        let had = self.bits[w] & b != 0;
        self.bits[w] &= !b;
        self.len -= usize::from(had);
        had
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// One link's relay state.
struct Relay<'a> {
    shard: Rc<Shard>,
    conn: ConnId,
    stream: LinkStream,
    version: ProtocolVersion,
    rbuf: BytesMut,
    /// Encoded packets for the remote; `written` of them are written.
    wbuf: BytesMut,
    written: usize,
    /// Engine output taken, waiting for its store epoch (`sync` durability).
    taken: Option<(BytesMut, u64)>,
    /// The buffer the engine writes into next (see `poll_local`).
    spare: BytesMut,
    /// Packets for the engine, kept for their capacity.
    to_engine: Vec<Packet>,
    /// Deliveries cross as the engine encoded them (`out_verbatim`): a v5
    /// remote and `out` rules that leave topics as they are.
    verbatim: bool,
    /// Remote packets waiting for the engine's Receive Maximum, in order.
    pending_in: VecDeque<Packet>,
    /// Ids of `in` QoS 1/2 publications handed to the engine and not completed
    /// (a set: a resent duplicate counts once).
    in_ids: IdSet,
    local_receive_max: u16,
    /// `out` packet ids in flight on the remote.
    out_ids: IdSet,
    /// Local QoS 2 ids the bridge completes itself (the message could not cross).
    local_only: HashSet<u16>,
    /// Remote QoS 2 ids the bridge completes itself (no rule matched).
    remote_only: HashSet<u16>,
    out_rules: &'a [Rule],
    in_rules: &'a [Rule],
    stats: &'a BridgeStats,
    ctl: &'a Control,
    retain_available: bool,
    max_packet: usize,
    keep_alive: Duration,
    last_sent: Instant,
    last_received: Instant,
    /// When the last PINGREQ was written into `wbuf`.
    last_ping: Instant,
    timer: Option<glommio::timer::Timer>,
    reading_done: bool,
}

impl Relay<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        loop {
            if self.ctl.stop.get() {
                return Poll::Ready(Ok(()));
            }
            self.ctl.register(cx);
            let mut progress = false;
            // 1. Write to the remote.
            while self.written < self.wbuf.len() {
                match self.stream.poll_write(cx, &self.wbuf[self.written..]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.written += n;
                        self.last_sent = Instant::now();
                        progress = true;
                    }
                    Poll::Ready(Ok(_)) => {
                        return Poll::Ready(Err("the remote stopped reading".into()));
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(format!("writing to the remote: {e}")));
                    }
                    Poll::Pending => break,
                }
            }
            if self.written > 0 && self.written == self.wbuf.len() {
                match self.stream.poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.wbuf.clear();
                        self.written = 0;
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(format!("writing to the remote: {e}")));
                    }
                    Poll::Pending => {}
                }
            }
            // 2. Engine output: deliveries and acknowledgements for the remote.
            if self.wbuf.len() - self.written < WRITE_BUFFER_MAX {
                match self.poll_local(cx) {
                    Poll::Ready(Ok(true)) => progress = true,
                    Poll::Ready(Ok(false)) | Poll::Pending => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                }
            }
            // 3. Remote publications waiting for the engine's window.
            if self.feed_pending() {
                progress = true;
            }
            // 4. Read from the remote.
            if self.pending_in.len() < PENDING_IN_MAX && !self.reading_done {
                match self.poll_remote(cx) {
                    Poll::Ready(Ok(())) => progress = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            // 5. Keep alive.
            if let Err(e) = self.poll_keep_alive(cx) {
                return Poll::Ready(Err(e));
            }
            if !progress {
                // Here rather than where deliveries are sent: the remote's
                // acknowledgements empty the window too (the gauge kept the
                // last value sent after the queue emptied).
                self.stats
                    .in_flight
                    .store(self.out_ids.len() as u64, Ordering::Relaxed);
                return Poll::Pending;
            }
        }
    }

    fn poll_keep_alive(&mut self, cx: &mut Context<'_>) -> Result<(), String> {
        if self.keep_alive.is_zero() {
            return Ok(());
        }
        let now = Instant::now();
        if now.duration_since(self.last_received) > self.keep_alive * 3 / 2 {
            return Err(format!(
                "nothing from the remote for {} s (keep alive {} s)",
                now.duration_since(self.last_received).as_secs(),
                self.keep_alive.as_secs()
            ));
        }
        // Idle towards the remote, or nothing heard from it (a stream of
        // QoS 0 gets no answer: without a ping now and then, the check above
        // ended a busy link every 1.5 keep alives).
        let idle = now.duration_since(self.last_sent) >= self.keep_alive / 2
            && self.written == self.wbuf.len();
        let unheard = now.duration_since(self.last_received) >= self.keep_alive / 2
            && now.duration_since(self.last_ping) >= self.keep_alive / 2;
        if idle || unheard {
            self.encode_remote(&Packet::PingReq);
            self.last_sent = now;
            self.last_ping = now;
            cx.waker().wake_by_ref();
        }
        let timer = self
            .timer
            .get_or_insert_with(|| glommio::timer::Timer::new(Duration::from_millis(500)));
        if Pin::new(timer).poll(cx).is_ready() {
            self.timer = None;
            cx.waker().wake_by_ref();
        }
        Ok(())
    }

    fn encode_remote(&mut self, p: &Packet) {
        if let Err(e) = p.encode(self.version, &mut self.wbuf) {
            warn!(
                "bridge: cannot encode {:?} for the remote: {e}",
                p.packet_type()
            );
        }
    }

    /// Takes engine output and turns it into packets for the remote.
    fn poll_local(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, String>> {
        if self.taken.is_none() {
            let mut engine = self.shard.engine.borrow_mut();
            let Some(out) = engine.output(self.conn) else {
                return Poll::Ready(Err("the local session ended".into()));
            };
            if out.buf.is_empty() {
                if out.close.is_some() {
                    return Poll::Ready(Err(format!(
                        "the local session ended ({:?}): another client with the bridge's \
                         ClientID, an operator, or a shutdown",
                        out.close
                    )));
                }
                if !out.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    out.waker = Some(cx.waker().clone());
                }
                return Poll::Ready(Ok(false));
            }
            // The engine writes on into the spare buffer (emptied, with its
            // capacity) while this one is relayed: no allocation per batch.
            let buf = std::mem::replace(&mut out.buf, std::mem::take(&mut self.spare));
            self.taken = Some((buf, out.durable_epoch));
        }
        let epoch = self.taken.as_ref().map_or(0, |t| t.1);
        if persist::poll_committed(&self.shard, epoch, cx).is_pending() {
            return Poll::Pending;
        }
        let (mut buf, _) = self.taken.take().expect("taken");
        let mut to_engine = std::mem::take(&mut self.to_engine);
        loop {
            let header = match tessera_proto::check(&buf, usize::MAX) {
                Ok(h) => h,
                Err(DecodeError::Incomplete { .. }) => break,
                Err(e) => return Poll::Ready(Err(format!("local session output: {e}"))),
            };
            if buf.len() < header.frame_len() {
                break;
            }
            if self.verbatim && header.packet_type == PacketType::Publish {
                self.out_verbatim(&buf[..header.frame_len()], &header)?;
                buf.advance(header.frame_len());
                continue;
            }
            match tessera_proto::decode(&mut buf, ProtocolVersion::V5, usize::MAX) {
                Ok(Some(p)) => self.on_local(p, &mut to_engine)?,
                Ok(None) => break,
                Err(e) => return Poll::Ready(Err(format!("local session output: {e}"))),
            }
        }
        buf.clear();
        if buf.capacity() <= SPARE_BUFFER_MAX {
            self.spare = buf;
        }
        {
            let mut engine = self.shard.engine.borrow_mut();
            for p in to_engine.drain(..) {
                engine.handle_packet(now_ms(), self.conn, p);
            }
            engine.flushed(now_ms(), self.conn);
        }
        self.to_engine = to_engine;
        self.shard.flush_outbox();
        Poll::Ready(Ok(true))
    }

    /// A delivery of the local session relayed as the engine encoded it
    /// (`verbatim`): its bytes are the PUBLISH the remote gets (same topic,
    /// packet id, QoS, DUP and v5 properties; no subscription identifier,
    /// no topic alias), so it is copied once into the write buffer instead
    /// of being decoded and encoded again.
    fn out_verbatim(&mut self, frame: &[u8], header: &FrameHeader) -> Result<(), String> {
        let qos = (header.flags >> 1) & 0b11;
        let body = &frame[header.header_len..];
        let id = if qos == 0 {
            None
        } else {
            let topic_len = body
                .get(..2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                .ok_or("local session output: PUBLISH without a topic")?;
            let at = 2 + topic_len;
            let id = body
                .get(at..at + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .ok_or("local session output: PUBLISH without a packet id")?;
            Some(id)
        };
        let start = self.wbuf.len();
        self.wbuf.extend_from_slice(frame);
        // RETAIN as `on_local` sets it: the engine kept it as published
        // (Retain As Published = the rules' `keep_retain`) but sets it on
        // retained messages sent at subscribe time.
        let keep_retain = self.out_rules.first().is_some_and(|r| r.keep_retain);
        if !(keep_retain && self.retain_available) {
            self.wbuf[start] &= !1;
        }
        if let Some(id) = id {
            self.out_ids.insert(id);
        }
        tracing::trace!(?id, qos, "bridge: out PUBLISH (verbatim)");
        BridgeStats::add(&self.stats.sent, 1);
        Ok(())
    }

    /// One packet the engine sent the bridge's local session.
    fn on_local(&mut self, p: Packet, to_engine: &mut Vec<Packet>) -> Result<(), String> {
        match p {
            Packet::Publish(p) => {
                let id = p.packet_id;
                let qos = p.qos;
                let rule = p
                    .properties
                    .subscription_identifiers
                    .iter()
                    .filter_map(|i| self.out_rules.get((*i as usize).wrapping_sub(1)))
                    .next()
                    .or_else(|| self.out_rules.iter().find(|r| r.matches(&p.topic)));
                let topic = rule.and_then(|r| r.map(&p.topic));
                let (Some(rule), Some(topic)) = (rule, topic) else {
                    BridgeStats::add(&self.stats.dropped, 1);
                    match qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => {
                            to_engine.push(Packet::PubAck(tessera_proto::PubAck::new(id)));
                        }
                        QoS::ExactlyOnce => {
                            self.local_only.insert(id);
                            to_engine.push(Packet::PubRec(tessera_proto::PubRec::new(id)));
                        }
                    }
                    return Ok(());
                };
                let properties = if self.version.is_v5() {
                    PublishProperties {
                        subscription_identifiers: Vec::new(),
                        topic_alias: None,
                        ..p.properties
                    }
                } else {
                    PublishProperties::default()
                };
                let out = Publish {
                    dup: p.dup,
                    qos,
                    retain: p.retain && rule.keep_retain && self.retain_available,
                    topic,
                    packet_id: id,
                    properties,
                    payload: p.payload,
                };
                if qos != QoS::AtMostOnce {
                    self.out_ids.insert(id);
                }
                tracing::trace!(id, dup = out.dup, ?qos, topic = %out.topic, "bridge: out PUBLISH");
                BridgeStats::add(&self.stats.sent, 1);
                self.encode_remote(&Packet::Publish(out));
            }
            Packet::PubRel(r) => {
                if self.local_only.remove(&r.packet_id) {
                    to_engine.push(Packet::PubComp(tessera_proto::PubComp::new(r.packet_id)));
                } else {
                    self.encode_remote(&Packet::PubRel(r));
                }
            }
            Packet::PubAck(a) => {
                self.in_done(a.packet_id, a.reason_code);
                self.encode_remote(&Packet::PubAck(a));
            }
            Packet::PubRec(a) => {
                if a.reason_code.is_error() {
                    self.in_done(a.packet_id, a.reason_code);
                }
                self.encode_remote(&Packet::PubRec(a));
            }
            Packet::PubComp(a) => {
                self.in_done(a.packet_id, ReasonCode::Success);
                self.encode_remote(&Packet::PubComp(a));
            }
            Packet::SubAck(s) => {
                if let Some(code) = s.reason_codes.iter().find(|c| c.is_error()) {
                    let e = format!("a local subscription of the bridge was refused: {code:?}");
                    warn!("{e}");
                    self.stats.set_error(&e);
                }
            }
            Packet::ConnAck(a) => {
                if a.reason_code != ReasonCode::Success {
                    return Err(format!(
                        "the local session was refused: {:?}",
                        a.reason_code
                    ));
                }
                if let Some(m) = a.properties.receive_maximum {
                    self.local_receive_max = m.max(1);
                }
                if !a.session_present {
                    // The local session was gone (expired by an operator?):
                    // subscribe again before anything else is relayed.
                    to_engine.extend(local_subscribes(self.out_rules));
                }
            }
            Packet::Disconnect(d) => {
                return Err(format!(
                    "the local session was disconnected: {:?}",
                    d.reason_code
                ));
            }
            _ => {}
        }
        Ok(())
    }

    fn in_done(&mut self, id: u16, code: ReasonCode) {
        self.in_ids.remove(id);
        if code.is_error() {
            BridgeStats::add(&self.stats.dropped, 1);
        }
    }

    /// Hands waiting remote publications to the engine while its window allows.
    fn feed_pending(&mut self) -> bool {
        if self.pending_in.is_empty() {
            return false;
        }
        let now = now_ms();
        let mut fed = false;
        while let Some(p) = self.pending_in.front() {
            if let Packet::Publish(p) = p
                && p.qos != QoS::AtMostOnce
                && self.in_ids.len() >= usize::from(self.local_receive_max)
                && !self.in_ids.contains(p.packet_id)
            {
                break;
            }
            let p = self.pending_in.pop_front().expect("front");
            self.on_remote(now, p, true);
            fed = true;
        }
        if fed {
            self.shard.flush_outbox();
        }
        fed
    }

    fn poll_remote(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        let start = self.rbuf.len();
        self.rbuf.resize(start + READ_CHUNK, 0);
        let r = self.stream.poll_read(cx, &mut self.rbuf[start..]);
        let n = match &r {
            Poll::Ready(Ok(n)) => *n,
            _ => 0,
        };
        self.rbuf.truncate(start + n);
        match r {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0)) => {
                self.reading_done = true;
                return Poll::Ready(Err("the remote closed the connection".into()));
            }
            Poll::Ready(Err(e)) => {
                return Poll::Ready(Err(format!("reading from the remote: {e}")));
            }
            Poll::Ready(Ok(_)) => {}
        }
        self.last_received = Instant::now();
        // One clock read per read, not per packet (a read holds hundreds of
        // PUBACKs at full speed).
        let now = now_ms();
        loop {
            match tessera_proto::decode(&mut self.rbuf, self.version, self.max_packet) {
                Ok(Some(p)) => {
                    if let Some(e) = self.protocol_error(&p) {
                        return Poll::Ready(Err(e));
                    }
                    self.on_remote(now, p, false);
                }
                Ok(None) => break,
                Err(DecodeError::PacketTooLarge { size, max }) => {
                    return Poll::Ready(Err(format!(
                        "the remote sent a packet of {size} bytes, over the maximum {max}"
                    )));
                }
                Err(e) => {
                    return Poll::Ready(Err(format!("malformed packet from the remote: {e}")));
                }
            }
        }
        self.shard.flush_outbox();
        Poll::Ready(Ok(()))
    }

    /// Packets a server never sends a client.
    fn protocol_error(&self, p: &Packet) -> Option<String> {
        match p {
            Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq => Some(format!(
                "protocol error: the remote sent {:?}",
                p.packet_type()
            )),
            Packet::Disconnect(d) => Some(format!("the remote disconnected: {:?}", d.reason_code)),
            _ => None,
        }
    }

    /// One packet from the remote at `now` (broker milliseconds). `queued`:
    /// it comes from `pending_in`.
    fn on_remote(&mut self, now: u64, p: Packet, queued: bool) {
        tracing::trace!(packet = ?p, "bridge: from the remote");
        match p {
            Packet::Publish(p) => {
                if !queued {
                    BridgeStats::add(&self.stats.received, 1);
                }
                // In order: behind publications already waiting.
                let full = p.qos != QoS::AtMostOnce
                    && self.in_ids.len() >= usize::from(self.local_receive_max)
                    && !self.in_ids.contains(p.packet_id);
                if !queued && (full || !self.pending_in.is_empty()) {
                    self.pending_in.push_back(Packet::Publish(p));
                    return;
                }
                let id = p.packet_id;
                let rule = self.in_rules.iter().find(|r| r.matches(&p.topic));
                let Some((rule, topic)) = rule.and_then(|r| r.map(&p.topic).map(|t| (r, t))) else {
                    // Nothing subscribes to this here: acknowledge and drop.
                    BridgeStats::add(&self.stats.dropped, 1);
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => {
                            self.encode_remote(&Packet::PubAck(tessera_proto::PubAck::new(id)));
                        }
                        QoS::ExactlyOnce => {
                            self.remote_only.insert(id);
                            self.encode_remote(&Packet::PubRec(tessera_proto::PubRec::new(id)));
                        }
                    }
                    return;
                };
                let properties = PublishProperties {
                    subscription_identifiers: Vec::new(),
                    topic_alias: None,
                    ..p.properties
                };
                let local = Publish {
                    dup: p.dup,
                    qos: p.qos,
                    retain: p.retain && rule.keep_retain,
                    topic,
                    packet_id: id,
                    properties,
                    payload: p.payload,
                };
                if local.qos != QoS::AtMostOnce {
                    self.in_ids.insert(id);
                }
                self.shard.engine.borrow_mut().handle_packet(
                    now,
                    self.conn,
                    Packet::Publish(local),
                );
            }
            Packet::PubAck(a) => {
                self.out_done(a.packet_id, a.reason_code);
                self.shard
                    .engine
                    .borrow_mut()
                    .handle_packet(now, self.conn, Packet::PubAck(a));
            }
            Packet::PubRec(a) => {
                if a.reason_code.is_error() {
                    self.out_done(a.packet_id, a.reason_code);
                }
                self.shard
                    .engine
                    .borrow_mut()
                    .handle_packet(now, self.conn, Packet::PubRec(a));
            }
            Packet::PubComp(a) => {
                self.out_done(a.packet_id, ReasonCode::Success);
                self.shard
                    .engine
                    .borrow_mut()
                    .handle_packet(now, self.conn, Packet::PubComp(a));
            }
            Packet::PubRel(r) => {
                if self.remote_only.remove(&r.packet_id) {
                    self.encode_remote(&Packet::PubComp(tessera_proto::PubComp::new(r.packet_id)));
                } else {
                    self.shard
                        .engine
                        .borrow_mut()
                        .handle_packet(now, self.conn, Packet::PubRel(r));
                }
            }
            Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp | Packet::Auth(_) => {}
            // Refused by `protocol_error` before.
            _ => {}
        }
    }

    fn out_done(&mut self, id: u16, code: ReasonCode) {
        self.out_ids.remove(id);
        if code.is_error() {
            BridgeStats::add(&self.stats.dropped, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::IdSet;

    #[test]
    fn an_id_set_counts_each_id_once() {
        let mut s = IdSet::default();
        for id in [0, 1, 63, 64, 65_535] {
            assert!(!s.contains(id));
            assert!(s.insert(id));
            assert!(!s.insert(id), "a resent id counts once");
            assert!(s.contains(id));
        }
        assert_eq!(s.len(), 5);
        assert!(s.remove(64));
        assert!(!s.remove(64), "an unknown id does not count down");
        assert!(!s.contains(64) && s.contains(63) && s.contains(65_535));
        assert_eq!(s.len(), 4);
    }
}
