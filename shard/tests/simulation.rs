//! Deterministic simulation of several shards and scripted clients on one thread.
//!
//! Goal: check the delivery guarantees users rely on, across shards and through
//! disconnects, without sockets or real time: QoS 1 at least once, QoS 2 exactly
//! once, order per publisher per topic, retained messages, message expiry, will
//! delay and session expiry with a virtual clock, and
//! shared subscriptions (one member per message, what a departing member
//! leaves going to the others).
//!
//! Method: every shard is an `Engine`; the mesh is one FIFO queue per ordered
//! pair of shards, drained in a random interleaving; clients speak real MQTT
//! bytes through `tessera_proto` and implement the client side of QoS 1/2 the
//! way the specification describes (re-send unacknowledged packets with DUP on
//! reconnect; deliver a QoS 2 message once per packet id until PUBREL). A seeded
//! RNG drives interleaving, acknowledgement delays and abrupt disconnects, which
//! drop whatever bytes were in flight. Every failure message starts with the seed;
//! `SIM_SEED=<n> cargo test -p tessera-shard --test simulation` replays one seed
//! and `SIM_SEEDS=<count>` widens the sweep.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::{Bytes, BytesMut};
use tessera_proto::{
    Connect, ConnectProperties, Encode, Packet, ProtocolVersion, PubAck, PubComp, PubRec, PubRel,
    Publish, PublishProperties, QoS, Str, Subscribe, Subscription, SubscriptionOptions, Will,
    WillProperties,
};
use tessera_shard::engine::{Engine, Limits};
use tessera_shard::hash::shard_for;
use tessera_shard::mesh::{MeshMsg, ShardId};
use tessera_shard::session::ConnId;

/// splitmix64: small, seedable, good enough to pick interleavings.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[derive(Debug)]
enum Role {
    /// Publishes `count` numbered messages at `qos` to `topic`.
    Publisher {
        topic: String,
        qos: QoS,
        count: u32,
        next: u32,
    },
    /// Subscribed to `sim/+/data`.
    Subscriber,
    /// A member of the shared subscription `SHARED_FILTER`; subscribes
    /// whenever it connects without a session.
    Member,
}

/// The shared subscription of `Role::Member` clients.
const SHARED_FILTER: &str = "$share/grp/sh/+/data";

/// Where one of a publisher's messages stands.
#[derive(Debug, Clone)]
struct OutMsg {
    publish: Publish,
    released: bool,
}

#[derive(Debug)]
struct Client {
    id: String,
    version: ProtocolVersion,
    role: Role,
    /// Whether the session outlives a connection (3.1.1 Clean Session 0, 5.0
    /// Session Expiry 3600 s); without, it ends with each connection.
    persistent: bool,
    /// v5 Session Expiry Interval when persistent (default 3600 s).
    expiry_s: u32,
    /// The will sent with each CONNECT.
    will: Option<Will>,
    /// Session Present of the last CONNACK.
    session_present: Option<bool>,
    conn: Option<(usize, ConnId)>,
    inbuf: BytesMut,
    connack_seen: bool,
    suback_seen: bool,
    /// Publisher: unacknowledged messages by packet id, in send order.
    unacked: VecDeque<(u16, OutMsg)>,
    next_packet_id: u16,
    /// Subscriber: QoS 2 packet ids delivered and not yet released.
    qos2_held: HashSet<u16>,
    /// Subscriber: acknowledgements not yet sent (delayed acks).
    pending_acks: VecDeque<Packet>,
    /// Subscriber: delivered application messages (payload text), in order.
    delivered: Vec<String>,
}

impl Client {
    fn new(id: String, version: ProtocolVersion, role: Role) -> Client {
        Client {
            id,
            version,
            role,
            persistent: true,
            expiry_s: 3600,
            will: None,
            session_present: None,
            conn: None,
            inbuf: BytesMut::new(),
            connack_seen: false,
            suback_seen: false,
            unacked: VecDeque::new(),
            next_packet_id: 1,
            qos2_held: HashSet::new(),
            pending_acks: VecDeque::new(),
            delivered: Vec::new(),
        }
    }

    fn connect_packet(&self) -> Connect {
        let mut properties = ConnectProperties::default();
        if self.version.is_v5() {
            properties.session_expiry_interval = self.persistent.then_some(self.expiry_s);
            properties.receive_maximum = Some(8);
        }
        Connect {
            version: self.version,
            clean_start: !self.persistent,
            keep_alive: 60,
            client_id: Str::try_from(self.id.as_str()).unwrap(),
            will: self.will.clone(),
            username: None,
            password: None,
            properties,
        }
    }
}

struct Sim {
    seed: u64,
    rng: Rng,
    now_ms: u64,
    engines: Vec<Engine>,
    /// mesh[from][to]: FIFO of batches.
    mesh: Vec<Vec<VecDeque<MeshMsg>>>,
    clients: Vec<Client>,
    /// Publishers hold back until subscriptions are in place.
    publishing: bool,
}

impl Sim {
    fn new(seed: u64, shards: usize) -> Sim {
        let limits = Limits {
            queued_count_max: 10_000,
            ..Limits::default()
        };
        Sim {
            seed,
            rng: Rng(seed),
            now_ms: 1_000_000,
            engines: (0..shards)
                .map(|i| Engine::new(i as ShardId, shards, limits.clone()))
                .collect(),
            mesh: (0..shards)
                .map(|_| (0..shards).map(|_| VecDeque::new()).collect())
                .collect(),
            clients: Vec::new(),
            publishing: false,
        }
    }

    /// Prints an event when `SIM_TRACE` is set, to replay a failing seed.
    fn trace(&self, what: impl FnOnce() -> String) {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("[{} t={}] {}", self.seed, self.now_ms, what());
        }
    }

    fn fail(&self, what: &str) -> ! {
        panic!("seed {}: {what}", self.seed)
    }

    fn connect(&mut self, c: usize) {
        let client = &mut self.clients[c];
        assert!(client.conn.is_none());
        let shard = shard_for(client.id.as_bytes(), self.engines.len());
        let connect = client.connect_packet();
        client.inbuf.clear();
        client.connack_seen = false;
        let conn = self.engines[shard].connect(self.now_ms, connect, false);
        self.trace(|| {
            format!(
                "{} connects to shard {shard} as conn {conn}",
                self.clients[c].id
            )
        });
        self.clients[c].conn = Some((shard, conn));
        self.collect_outbox(shard);
    }

    /// Drops the connection abruptly: bytes not yet read by either side are lost.
    fn drop_connection(&mut self, c: usize) {
        let Some((shard, conn)) = self.clients[c].conn.take() else {
            return;
        };
        self.trace(|| format!("{} drops conn {conn}", self.clients[c].id));
        self.engines[shard].release(self.now_ms, conn);
        self.collect_outbox(shard);
        let client = &mut self.clients[c];
        client.inbuf.clear();
        client.pending_acks.clear();
    }

    fn send(&mut self, c: usize, packet: Packet) {
        let Some((shard, conn)) = self.clients[c].conn else {
            return;
        };
        // Round-trip through the codec so the engine sees exactly what a socket
        // would carry.
        let version = self.clients[c].version;
        let mut buf = BytesMut::new();
        packet.encode(version, &mut buf).unwrap();
        let decoded = tessera_proto::decode(&mut buf, version, usize::MAX)
            .unwrap()
            .unwrap();
        self.trace(|| format!("{} -> {decoded:?}", self.clients[c].id));
        self.engines[shard].handle_packet(self.now_ms, conn, decoded);
        self.collect_outbox(shard);
    }

    fn collect_outbox(&mut self, shard: usize) {
        let mesh = &mut self.mesh;
        self.engines[shard].drain_outbox(|to, batch| mesh[shard][usize::from(to)].extend(batch));
    }

    /// Moves the engine's output for client `c` into the client's read buffer
    /// and lets the client react. Returns whether anything happened.
    fn client_read(&mut self, c: usize) -> bool {
        let Some((shard, conn)) = self.clients[c].conn else {
            return false;
        };
        let Some(out) = self.engines[shard].output(conn) else {
            return false;
        };
        let bytes = out.buf.split();
        let closing = out.close.is_some();
        let had_bytes = !bytes.is_empty();
        self.clients[c].inbuf.extend_from_slice(&bytes);
        self.engines[shard].flushed(self.now_ms, conn);
        self.collect_outbox(shard);
        let version = self.clients[c].version;
        loop {
            let packet =
                match tessera_proto::decode(&mut self.clients[c].inbuf, version, usize::MAX) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => self.fail(&format!("client {} cannot decode broker output: {e}", c)),
                };
            self.client_handle(c, packet);
        }
        if closing {
            let id = self.clients[c].id.clone();
            self.fail(&format!("broker closed client {id} unexpectedly"));
        }
        had_bytes
    }

    fn client_handle(&mut self, c: usize, packet: Packet) {
        self.trace(|| format!("{} <- {packet:?}", self.clients[c].id));
        match packet {
            Packet::ConnAck(ack) => {
                if ack.reason_code.is_error() {
                    self.fail(&format!("CONNACK refused: {:?}", ack.reason_code));
                }
                self.clients[c].connack_seen = true;
                self.clients[c].session_present = Some(ack.session_present);
                if !ack.session_present {
                    // A new session: QoS 2 state of an old one is gone too.
                    self.clients[c].qos2_held.clear();
                    if matches!(self.clients[c].role, Role::Member) {
                        let sub = Subscribe {
                            packet_id: 1,
                            properties: Default::default(),
                            subscriptions: vec![Subscription {
                                filter: Str::from_static(SHARED_FILTER),
                                options: SubscriptionOptions::qos(QoS::ExactlyOnce),
                            }],
                        };
                        self.send(c, Packet::Subscribe(sub));
                    }
                }
                // Re-send the unacknowledged window (section 4.4).
                let resend: Vec<Packet> = self.clients[c]
                    .unacked
                    .iter()
                    .map(|(pid, m)| {
                        if m.released {
                            Packet::PubRel(PubRel::new(*pid))
                        } else {
                            let mut p = m.publish.clone();
                            p.dup = true;
                            Packet::Publish(p)
                        }
                    })
                    .collect();
                for p in resend {
                    self.send(c, p);
                }
            }
            Packet::SubAck(_) => self.clients[c].suback_seen = true,
            Packet::PubAck(PubAck { packet_id, .. })
            | Packet::PubComp(PubComp { packet_id, .. }) => {
                let client = &mut self.clients[c];
                client.unacked.retain(|(pid, _)| *pid != packet_id);
            }
            Packet::PubRec(PubRec { packet_id, .. }) => {
                if let Some((_, m)) = self.clients[c]
                    .unacked
                    .iter_mut()
                    .find(|(pid, _)| *pid == packet_id)
                {
                    m.released = true;
                }
                self.send(c, Packet::PubRel(PubRel::new(packet_id)));
            }
            Packet::Publish(p) => {
                let text = String::from_utf8(p.payload.to_vec()).unwrap();
                let client = &mut self.clients[c];
                match p.qos {
                    QoS::AtMostOnce => client.delivered.push(text),
                    QoS::AtLeastOnce => {
                        client.delivered.push(text);
                        client
                            .pending_acks
                            .push_back(Packet::PubAck(PubAck::new(p.packet_id)));
                    }
                    QoS::ExactlyOnce => {
                        // Method B of section 4.3.3: deliver on PUBLISH, once per
                        // packet id until PUBREL.
                        if client.qos2_held.insert(p.packet_id) {
                            client.delivered.push(text);
                        }
                        client
                            .pending_acks
                            .push_back(Packet::PubRec(PubRec::new(p.packet_id)));
                    }
                }
            }
            Packet::PubRel(rel) => {
                let client = &mut self.clients[c];
                client.qos2_held.remove(&rel.packet_id);
                client
                    .pending_acks
                    .push_back(Packet::PubComp(PubComp::new(rel.packet_id)));
            }
            other => self.fail(&format!("unexpected packet to client: {other:?}")),
        }
    }

    /// One random step. Returns whether anything happened.
    fn step(&mut self, chaos: bool) -> bool {
        match self.rng.below(10) {
            // Deliver one mesh message of a random non-empty pair queue.
            0..=2 => {
                let n = self.engines.len();
                let start = self.rng.below(n * n);
                for k in 0..n * n {
                    let i = (start + k) % (n * n);
                    let (from, to) = (i / n, i % n);
                    if let Some(msg) = self.mesh[from][to].pop_front() {
                        self.engines[to].handle_mesh(self.now_ms, from as ShardId, msg);
                        self.collect_outbox(to);
                        return true;
                    }
                }
                false
            }
            // A client reads what the broker sent.
            3..=4 => {
                let c = self.rng.below(self.clients.len());
                self.client_read(c)
            }
            // A subscriber sends one delayed acknowledgement.
            5 => {
                let c = self.rng.below(self.clients.len());
                match self.clients[c].pending_acks.pop_front() {
                    Some(p) if self.clients[c].conn.is_some() => {
                        self.send(c, p);
                        true
                    }
                    _ => false,
                }
            }
            // A publisher publishes its next message (window of 4).
            6..=7 => {
                let c = self.rng.below(self.clients.len());
                self.publish_next(c)
            }
            // Chaos: an abrupt disconnect, or a reconnect.
            8 => {
                let c = self.rng.below(self.clients.len());
                if self.clients[c].conn.is_none() {
                    self.connect(c);
                    true
                } else if chaos && self.rng.chance(10) {
                    self.drop_connection(c);
                    true
                } else {
                    false
                }
            }
            // Time passes.
            _ => {
                self.now_ms += self.rng.below(50) as u64;
                if self.rng.chance(5) {
                    for shard in 0..self.engines.len() {
                        self.engines[shard].tick(self.now_ms);
                        self.collect_outbox(shard);
                    }
                }
                false
            }
        }
    }

    fn publish_next(&mut self, c: usize) -> bool {
        let client = &mut self.clients[c];
        if !self.publishing
            || client.conn.is_none()
            || !client.connack_seen
            || client.unacked.len() >= 4
        {
            return false;
        }
        let Role::Publisher {
            topic,
            qos,
            count,
            next,
        } = &mut client.role
        else {
            return false;
        };
        if *next >= *count {
            return false;
        }
        let packet_id = if *qos == QoS::AtMostOnce {
            0
        } else {
            let id = client.next_packet_id;
            client.next_packet_id = client.next_packet_id % 60_000 + 1;
            id
        };
        let publish = Publish {
            dup: false,
            qos: *qos,
            retain: false,
            topic: Str::try_from(topic.as_str()).unwrap(),
            packet_id,
            properties: PublishProperties::default(),
            payload: Bytes::from(format!("{}:{}", client.id, next)),
        };
        *next += 1;
        if *qos != QoS::AtMostOnce {
            client.unacked.push_back((
                packet_id,
                OutMsg {
                    publish: publish.clone(),
                    released: false,
                },
            ));
        }
        self.send(c, Packet::Publish(publish));
        true
    }

    /// Runs without chaos until every client is connected and nothing moves.
    fn settle(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            for c in 0..self.clients.len() {
                if self.clients[c].conn.is_none() {
                    self.connect(c);
                }
            }
            let mut busy = false;
            for _ in 0..64 {
                busy |= self.step(false);
            }
            // Flush everything deterministically to detect quiescence.
            let mut moved = false;
            for c in 0..self.clients.len() {
                moved |= self.client_read(c);
                while let Some(p) = self.clients[c].pending_acks.pop_front() {
                    self.send(c, p);
                    moved = true;
                }
                moved |= self.publish_next(c);
            }
            let mesh_busy = self.mesh.iter().flatten().any(|q| !q.is_empty());
            let unacked = self.clients.iter().any(|c| !c.unacked.is_empty());
            if !busy && !moved && !mesh_busy && !unacked {
                return;
            }
            if !busy && !moved && !mesh_busy && unacked {
                // Only time can help (nothing else moves): advance it.
                self.now_ms += 1000;
            }
        }
        self.fail("the simulation did not settle");
    }
}

fn run_delivery_seed(seed: u64) {
    let mut rng = Rng(seed ^ 0xD1CE);
    let shards = 2 + rng.below(3);
    let mut sim = Sim::new(seed, shards);
    let versions = [ProtocolVersion::V3_1_1, ProtocolVersion::V5];
    let publishers = 1 + rng.below(3);
    let subscribers = 1 + rng.below(3);
    let count = 40;
    for p in 0..publishers {
        let qos = if rng.chance(50) {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        let role = Role::Publisher {
            topic: format!("sim/{p}/data"),
            qos,
            count,
            next: 0,
        };
        let id = format!("pub-{seed}-{p}");
        sim.clients
            .push(Client::new(id, versions[rng.below(2)], role));
    }
    for s in 0..subscribers {
        let id = format!("sub-{seed}-{s}");
        sim.clients
            .push(Client::new(id, versions[rng.below(2)], Role::Subscriber));
    }
    // Phase 1: everyone connects; subscribers subscribe and wait for SUBACK,
    // which the engine sends only once every shard routes the filter.
    for c in 0..sim.clients.len() {
        sim.connect(c);
    }
    for c in publishers..sim.clients.len() {
        sim.client_read(c);
        let sub = Subscribe {
            packet_id: 1,
            properties: Default::default(),
            subscriptions: vec![Subscription {
                filter: Str::from_static("sim/+/data"),
                options: SubscriptionOptions::qos(QoS::ExactlyOnce),
            }],
        };
        sim.send(c, Packet::Subscribe(sub));
    }
    for _ in 0..10_000 {
        if sim.clients[publishers..].iter().all(|c| c.suback_seen) {
            break;
        }
        sim.step(false);
    }
    if !sim.clients[publishers..].iter().all(|c| c.suback_seen) {
        sim.fail("SUBACK never arrived");
    }
    // Phase 2: publish with chaos, then settle.
    sim.publishing = true;
    for _ in 0..20_000 {
        sim.step(true);
    }
    sim.settle(10_000);

    // Invariants.
    for sub in &sim.clients[publishers..] {
        for (p, publisher) in sim.clients[..publishers].iter().enumerate() {
            let Role::Publisher { qos, .. } = publisher.role else {
                unreachable!()
            };
            let prefix = format!("{}:", publisher.id);
            let seqs: Vec<u32> = sub
                .delivered
                .iter()
                .filter_map(|t| t.strip_prefix(&prefix))
                .map(|n| n.parse().unwrap())
                .collect();
            let mut counts = HashMap::new();
            for s in &seqs {
                *counts.entry(*s).or_insert(0u32) += 1;
            }
            for n in 0..count {
                let got = counts.get(&n).copied().unwrap_or(0);
                match qos {
                    QoS::ExactlyOnce if got != 1 => sim.fail(&format!(
                        "{} got publisher {p}'s QoS 2 message {n} {got} times: {seqs:?}",
                        sub.id
                    )),
                    QoS::AtLeastOnce if got == 0 => sim.fail(&format!(
                        "{} never got publisher {p}'s QoS 1 message {n}: {seqs:?}",
                        sub.id
                    )),
                    _ => {}
                }
            }
            // Order per publisher: first deliveries are in publish order.
            let mut seen = HashSet::new();
            let firsts: Vec<u32> = seqs.iter().copied().filter(|s| seen.insert(*s)).collect();
            if firsts.windows(2).any(|w| w[0] > w[1]) {
                sim.fail(&format!(
                    "{} got publisher {p} out of order: {firsts:?}",
                    sub.id
                ));
            }
        }
    }
}

/// Sums a counter over every shard.
fn total(sim: &Sim, f: impl Fn(&tessera_shard::engine::Stats) -> u64) -> u64 {
    sim.engines.iter().map(|e| f(e.stats())).sum()
}

/// Shared subscriptions: a group of 2-5 members spread over 2-4 shards,
/// persistent or not, takes the messages of 1-3 publishers at QoS 1 or 2
/// while members drop their connections at random (a member without a
/// persistent session comes back with a new one and subscribes again).
/// Returns how many deliveries went back to the group from a member that
/// left.
fn run_shared_seed(seed: u64) -> u64 {
    let mut rng = Rng(seed ^ 0x5A4E);
    let shards = 2 + rng.below(3);
    let mut sim = Sim::new(seed, shards);
    let versions = [ProtocolVersion::V3_1_1, ProtocolVersion::V5];
    let publishers = 1 + rng.below(3);
    let members = 2 + rng.below(4);
    // Half the seeds: every member persists, so no QoS 2 message may be lost.
    let all_persistent = rng.chance(50);
    let count = 40;
    for p in 0..publishers {
        let qos = if rng.chance(50) {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        let role = Role::Publisher {
            topic: format!("sh/{p}/data"),
            qos,
            count,
            next: 0,
        };
        let id = format!("spub-{seed}-{p}");
        sim.clients
            .push(Client::new(id, versions[rng.below(2)], role));
    }
    for m in 0..members {
        // Member m lives on shard m % shards.
        let id = (0..)
            .map(|i| format!("smem-{seed}-{m}-{i}"))
            .find(|id| shard_for(id.as_bytes(), shards) == m % shards)
            .unwrap();
        let mut client = Client::new(id, versions[rng.below(2)], Role::Member);
        // Member 0 always persists, so the group never runs out of members.
        client.persistent = all_persistent || m == 0 || rng.chance(50);
        sim.clients.push(client);
    }
    // Phase 1: everyone connects; members subscribe on CONNACK and wait for
    // SUBACK, which comes once every shard routes the share to them.
    for c in 0..sim.clients.len() {
        sim.connect(c);
        sim.client_read(c);
    }
    for _ in 0..10_000 {
        if sim.clients[publishers..].iter().all(|c| c.suback_seen) {
            break;
        }
        sim.step(false);
    }
    if !sim.clients[publishers..].iter().all(|c| c.suback_seen) {
        sim.fail("SUBACK never arrived");
    }
    // Phase 2: publish while connections drop, then settle.
    sim.publishing = true;
    for _ in 0..20_000 {
        sim.step(true);
    }
    sim.settle(10_000);

    // Invariants: every QoS 1 message reached a member; every QoS 2 message
    // reached at most one, and one unless it was in flight to a member whose
    // session ended (MQTT-4.8.2-5 forbids giving it to another).
    let qos2_lost_allowed = total(&sim, |s| s.dropped_shared_qos2_member_ended);
    let no_member = total(&sim, |s| s.dropped_shared_no_member);
    if no_member > 0 {
        sim.fail(&format!("{no_member} shared messages found no member"));
    }
    let mut qos2_missing = Vec::new();
    for publisher in &sim.clients[..publishers] {
        let Role::Publisher { qos, .. } = publisher.role else {
            unreachable!()
        };
        let prefix = format!("{}:", publisher.id);
        let mut counts: HashMap<u32, Vec<&str>> = HashMap::new();
        for member in &sim.clients[publishers..] {
            // Duplicates within one member (QoS 1 re-sent with DUP) count once.
            let mine: HashSet<u32> = member
                .delivered
                .iter()
                .filter_map(|t| t.strip_prefix(&prefix))
                .map(|n| n.parse().unwrap())
                .collect();
            for n in mine {
                counts.entry(n).or_default().push(&member.id);
            }
        }
        for n in 0..count {
            let got = counts.get(&n).map_or(&[][..], |v| &v[..]);
            match qos {
                QoS::ExactlyOnce if got.len() > 1 => sim.fail(&format!(
                    "QoS 2 message {n} of {} reached several members: {got:?}",
                    publisher.id
                )),
                QoS::ExactlyOnce if got.is_empty() => {
                    qos2_missing.push(format!("{prefix}{n}"));
                }
                QoS::AtLeastOnce if got.is_empty() => sim.fail(&format!(
                    "QoS 1 message {n} of {} reached no member",
                    publisher.id
                )),
                _ => {}
            }
        }
    }
    if qos2_missing.len() as u64 > qos2_lost_allowed {
        sim.fail(&format!(
            "QoS 2 messages lost: {qos2_missing:?}, but only {qos2_lost_allowed} were in \
             flight to members whose session ended"
        ));
    }
    total(&sim, |s| s.shared_returned)
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED is a number")];
    }
    let n: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    (1..=n).collect()
}

#[test]
fn qos_guarantees_and_order_hold_across_shards_and_disconnects() {
    for seed in seeds() {
        run_delivery_seed(seed);
    }
}

#[test]
fn shared_subscriptions_deliver_to_one_member_and_survive_members_leaving() {
    let seeds = seeds();
    let returned: u64 = seeds.iter().map(|&seed| run_shared_seed(seed)).sum();
    // The sweep must exercise members leaving with deliveries unfinished.
    if seeds.len() >= 10 {
        assert!(returned > 0, "no seed gave a delivery back to the group");
    }
}

/// Retained messages: the last value set is what a later subscriber gets, on
/// every shard, whichever shard the updates came from; an empty payload clears.
#[test]
fn retained_messages_converge_on_every_shard() {
    for seed in seeds() {
        let mut sim = Sim::new(seed, 3);
        let mut rng = Rng(seed);
        for p in 0..3 {
            let role = Role::Publisher {
                topic: String::new(),
                qos: QoS::AtLeastOnce,
                count: 0,
                next: 0,
            };
            sim.clients.push(Client::new(
                format!("rp-{seed}-{p}"),
                ProtocolVersion::V5,
                role,
            ));
            sim.connect(p);
            sim.client_read(p);
        }
        let mut last = None;
        for value in 0..10u32 {
            let p = rng.below(3);
            let clear = rng.chance(20);
            let payload = if clear {
                Bytes::new()
            } else {
                Bytes::from(format!("v{value}"))
            };
            last = (!clear).then(|| format!("v{value}"));
            let publish = Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: true,
                topic: Str::from_static("sim/retained"),
                packet_id: 0,
                properties: Default::default(),
                payload,
            };
            sim.send(p, Packet::Publish(publish));
            // Interleave some mesh traffic; updates from different shards race.
            for _ in 0..rng.below(4) {
                sim.step(false);
            }
            sim.now_ms += 1;
        }
        sim.settle(1000);
        for shard in 0..3 {
            // A subscriber on each shard (pick ids that hash there).
            let id = (0..)
                .map(|i| format!("rs-{seed}-{shard}-{i}"))
                .find(|id| shard_for(id.as_bytes(), 3) == shard)
                .unwrap();
            let c = sim.clients.len();
            sim.clients
                .push(Client::new(id, ProtocolVersion::V3_1_1, Role::Subscriber));
            sim.connect(c);
            sim.client_read(c);
            let sub = Subscribe {
                packet_id: 1,
                properties: Default::default(),
                subscriptions: vec![Subscription {
                    filter: Str::from_static("sim/#"),
                    options: SubscriptionOptions::qos(QoS::AtLeastOnce),
                }],
            };
            sim.send(c, Packet::Subscribe(sub));
            sim.settle(1000);
            let got: Vec<String> = sim.clients[c].delivered.clone();
            let want: Vec<String> = last.iter().cloned().collect();
            if got != want {
                sim.fail(&format!(
                    "subscriber on shard {shard} got retained {got:?}, want {want:?}"
                ));
            }
        }
    }
}

/// Message expiry: a queued message for an offline session is dropped once its
/// expiry passes; one still alive is delivered with its remaining lifetime.
#[test]
fn message_expiry_applies_to_queued_messages() {
    let mut sim = Sim::new(7, 2);
    let role = Role::Publisher {
        topic: String::new(),
        qos: QoS::AtLeastOnce,
        count: 0,
        next: 0,
    };
    sim.clients
        .push(Client::new("exp-pub".into(), ProtocolVersion::V5, role));
    sim.clients.push(Client::new(
        "exp-sub".into(),
        ProtocolVersion::V5,
        Role::Subscriber,
    ));
    for c in 0..2 {
        sim.connect(c);
        sim.client_read(c);
    }
    let sub = Subscribe {
        packet_id: 1,
        properties: Default::default(),
        subscriptions: vec![Subscription {
            filter: Str::from_static("exp/#"),
            options: SubscriptionOptions::qos(QoS::AtLeastOnce),
        }],
    };
    sim.send(1, Packet::Subscribe(sub));
    sim.settle(1000);
    sim.drop_connection(1);
    for (n, expiry) in [(0, 2u32), (1, 100)] {
        let properties = PublishProperties {
            message_expiry_interval: Some(expiry),
            ..Default::default()
        };
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: Str::from_static("exp/t"),
            packet_id: 10 + n,
            properties,
            payload: Bytes::from(format!("m{n}")),
        };
        sim.send(0, Packet::Publish(publish));
    }
    // Let the forwards reach the subscriber's shard, then let 3 seconds pass.
    while sim.mesh.iter().flatten().any(|q| !q.is_empty()) {
        sim.step(false);
    }
    sim.now_ms += 3_000;
    sim.connect(1);
    sim.client_read(1);
    assert_eq!(sim.clients[1].delivered, vec!["m1".to_string()]);
}

/// Delivers every queued mesh message (and what they cause) in order.
fn drain_mesh(sim: &mut Sim) {
    let n = sim.engines.len();
    loop {
        let mut moved = false;
        for from in 0..n {
            for to in 0..n {
                while let Some(msg) = sim.mesh[from][to].pop_front() {
                    sim.engines[to].handle_mesh(sim.now_ms, from as ShardId, msg);
                    sim.collect_outbox(to);
                    moved = true;
                }
            }
        }
        if !moved {
            return;
        }
    }
}

/// Advances the virtual clock by `ms`, ticks every shard, lets the mesh and
/// the connected clients catch up (acknowledgements included).
fn advance(sim: &mut Sim, ms: u64) {
    sim.now_ms += ms;
    for shard in 0..sim.engines.len() {
        sim.engines[shard].tick(sim.now_ms);
        sim.collect_outbox(shard);
    }
    for _ in 0..4 {
        drain_mesh(sim);
        for c in 0..sim.clients.len() {
            sim.client_read(c);
            while let Some(p) = sim.clients[c].pending_acks.pop_front() {
                sim.send(c, p);
            }
        }
    }
}

/// A client id that hashes to `shard` of `shards`.
fn id_on_shard(prefix: &str, shard: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| shard_for(id.as_bytes(), shards) == shard)
        .unwrap()
}

/// What the will-owning client does after its connection drops.
#[derive(Debug, Clone, Copy)]
enum AfterDrop {
    /// Stays away.
    Nothing,
    /// Resumes its session (Clean Start 0) at this many ms after the drop.
    Resume(u64),
    /// Starts over (Clean Start 1) at this many ms after the drop.
    StartClean(u64),
}

/// Will Delay Interval with a virtual clock, the will's owner and the
/// subscriber on different shards: the will goes out when the delay passes or
/// the session ends, whichever is first; resuming the session within the delay
/// cancels it; a Clean Start reconnect ends the old session and publishes it at
/// once. Time advances in 100 ms steps with a tick per step, so the will must
/// arrive within one step of its due time and never before.
#[test]
fn will_delay_and_session_end_across_shards() {
    const STEP_MS: u64 = 100;
    for seed in seeds() {
        let mut rng = Rng(seed ^ 0x3177);
        let shards = 2 + rng.below(3);
        let mut sim = Sim::new(seed, shards);
        let sub_shard = rng.below(shards);
        let will_shard = (sub_shard + 1 + rng.below(shards - 1)) % shards;
        let delay_s = 1 + rng.below(8) as u32;
        // Session expiry: 0 (ends with the connection), shorter or longer than
        // the delay, or never.
        let expiry_s = match rng.below(4) {
            0 => 0,
            1 => 1 + rng.below(delay_s as usize) as u32,
            2 => delay_s + 1 + rng.below(5) as u32,
            _ => u32::MAX,
        };
        let after = match rng.below(3) {
            0 => AfterDrop::Nothing,
            1 => AfterDrop::Resume(STEP_MS * (1 + rng.below(9) as u64)),
            _ => AfterDrop::StartClean(STEP_MS * (1 + rng.below(9) as u64)),
        };
        let context = format!(
            "shards {shards}, delay {delay_s} s, expiry {expiry_s} s, after drop {after:?}"
        );

        let mut subscriber = Client::new(
            id_on_shard(&format!("wsub-{seed}"), sub_shard, shards),
            ProtocolVersion::V5,
            Role::Subscriber,
        );
        subscriber.expiry_s = u32::MAX;
        sim.clients.push(subscriber);
        let will_id = id_on_shard(&format!("wown-{seed}"), will_shard, shards);
        let mut owner = Client::new(will_id.clone(), ProtocolVersion::V5, Role::Subscriber);
        owner.persistent = expiry_s > 0;
        owner.expiry_s = expiry_s;
        owner.will = Some(Will {
            topic: Str::try_from(format!("will/{will_id}")).unwrap(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: WillProperties {
                will_delay_interval: Some(delay_s),
                ..Default::default()
            },
        });
        sim.clients.push(owner);
        sim.connect(0);
        sim.client_read(0);
        sim.send(
            0,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                properties: Default::default(),
                subscriptions: vec![Subscription {
                    filter: Str::from_static("will/#"),
                    options: SubscriptionOptions::qos(QoS::AtLeastOnce),
                }],
            }),
        );
        sim.connect(1);
        advance(&mut sim, 0);
        assert!(sim.clients[0].suback_seen, "seed {seed}: no SUBACK");

        sim.drop_connection(1);
        let dropped_at = sim.now_ms;
        // When the will must go out, relative to the drop; None: never.
        let due_ms = match after {
            AfterDrop::Nothing => Some(u64::from(delay_s.min(expiry_s)) * 1000),
            AfterDrop::Resume(at) | AfterDrop::StartClean(at)
                if at >= u64::from(delay_s.min(expiry_s)) * 1000 =>
            {
                Some(u64::from(delay_s.min(expiry_s)) * 1000)
            }
            AfterDrop::Resume(_) => None,
            AfterDrop::StartClean(at) => Some(at),
        };
        let mut got_at = None;
        // Follow 15 virtual seconds: past every delay and expiry above.
        while sim.now_ms - dropped_at <= 15_000 {
            let since = sim.now_ms - dropped_at;
            match after {
                AfterDrop::Resume(at) if since == at => {
                    sim.clients[1].will = None;
                    sim.connect(1);
                    sim.client_read(1);
                    let resumed = sim.clients[1].session_present == Some(true);
                    let session_lived = expiry_s > 0 && at < u64::from(expiry_s) * 1000;
                    if resumed != session_lived {
                        sim.fail(&format!(
                            "{context}: session present {resumed} on resuming at {at} ms"
                        ));
                    }
                }
                AfterDrop::StartClean(at) if since == at => {
                    sim.clients[1].will = None;
                    sim.clients[1].persistent = false;
                    sim.connect(1);
                    sim.client_read(1);
                }
                _ => {}
            }
            advance(&mut sim, 0);
            let wills = sim.clients[0]
                .delivered
                .iter()
                .filter(|t| t.as_str() == "gone")
                .count();
            if wills > 1 {
                sim.fail(&format!("{context}: the will arrived {wills} times"));
            }
            if wills == 1 && got_at.is_none() {
                got_at = Some(since);
            }
            advance(&mut sim, STEP_MS);
        }
        match (due_ms, got_at) {
            (None, Some(at)) => sim.fail(&format!(
                "{context}: the will arrived at {at} ms though the session resumed in time"
            )),
            (Some(due), None) => sim.fail(&format!(
                "{context}: the will due at {due} ms never arrived"
            )),
            (Some(due), Some(at)) if at < due || at > due + STEP_MS => sim.fail(&format!(
                "{context}: the will due at {due} ms arrived at {at} ms"
            )),
            _ => {}
        }
    }
}

/// Session expiry across shards: a persistent subscriber on one shard is
/// offline while a publisher on another shard sends QoS 1 messages. Resuming
/// before the expiry gives Session Present and the queued messages; after the
/// expiry the session, its queue and its routes are gone on every shard.
#[test]
fn session_expiry_ends_offline_sessions_and_their_routes_across_shards() {
    for seed in seeds() {
        let mut rng = Rng(seed ^ 0xE1E1);
        let shards = 2 + rng.below(3);
        let mut sim = Sim::new(seed, shards);
        let sub_shard = rng.below(shards);
        let pub_shard = (sub_shard + 1 + rng.below(shards - 1)) % shards;
        let expiry_s = 1 + rng.below(10) as u32;
        let resume_after_ms = 500 * (1 + rng.below(30) as u64);
        let mut sub = Client::new(
            id_on_shard(&format!("esub-{seed}"), sub_shard, shards),
            ProtocolVersion::V5,
            Role::Subscriber,
        );
        sub.expiry_s = expiry_s;
        sim.clients.push(sub);
        let role = Role::Publisher {
            topic: String::new(),
            qos: QoS::AtLeastOnce,
            count: 0,
            next: 0,
        };
        sim.clients.push(Client::new(
            id_on_shard(&format!("epub-{seed}"), pub_shard, shards),
            ProtocolVersion::V5,
            role,
        ));
        for c in 0..2 {
            sim.connect(c);
            sim.client_read(c);
        }
        sim.send(
            0,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                properties: Default::default(),
                subscriptions: vec![Subscription {
                    filter: Str::from_static("exp/+"),
                    options: SubscriptionOptions::qos(QoS::AtLeastOnce),
                }],
            }),
        );
        advance(&mut sim, 0);
        sim.drop_connection(0);
        let dropped_at = sim.now_ms;
        let mut sent = 0u16;
        let publish = |sim: &mut Sim, n: u16| {
            sim.send(
                1,
                Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: Str::from_static("exp/t"),
                    packet_id: n + 1,
                    properties: Default::default(),
                    payload: Bytes::from(format!("m{n}")),
                }),
            );
        };
        while sim.now_ms - dropped_at < resume_after_ms {
            publish(&mut sim, sent);
            sent += 1;
            advance(&mut sim, 250);
        }
        let forwards_before = total(&sim, |s| s.forwards_sent);
        let expired = resume_after_ms >= u64::from(expiry_s) * 1000;
        if expired {
            // Routes to the ended session are withdrawn: later publications
            // are no longer forwarded to its shard.
            publish(&mut sim, sent);
            advance(&mut sim, 0);
            let forwards = total(&sim, |s| s.forwards_sent) - forwards_before;
            if forwards != 0 {
                sim.fail(&format!(
                    "expiry {expiry_s} s: {forwards} forwards to an expired session's shard"
                ));
            }
        }
        sim.clients[0].persistent = true;
        sim.connect(0);
        sim.client_read(0);
        // The queue drains one receive-maximum window per round trip.
        for _ in 0..usize::from(sent) {
            advance(&mut sim, 0);
        }
        let present = sim.clients[0].session_present == Some(true);
        let delivered = sim.clients[0].delivered.len();
        let context = format!(
            "shards {shards}, expiry {expiry_s} s, resumed after {resume_after_ms} ms, sent {sent}"
        );
        if expired && (present || delivered != 0) {
            sim.fail(&format!(
                "{context}: expired session came back (present {present}, {delivered} messages)"
            ));
        }
        if !expired {
            let want: Vec<String> = (0..sent).map(|n| format!("m{n}")).collect();
            if !present || sim.clients[0].delivered != want {
                sim.fail(&format!(
                    "{context}: present {present}, got {:?}",
                    sim.clients[0].delivered
                ));
            }
        }
    }
}
