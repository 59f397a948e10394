//! The history checker of the fault tests (issue 16): test clients record what they
//! sent, what was acknowledged and what they got, with timestamps; the nodes' own
//! client log lines (`tessera::clients`: "client live" / "client ended") say which
//! node served a ClientID when; [`check`] reads both and reports what MQTT forbids.
//!
//! Recording: [`History::new`] (the run's seed), cloned into every client thread (an
//! `Arc`, cheap to clone; every record takes one mutex). A client records through its
//! [`Recorder`] (`history.client(id, clean_start)`, clone-able too, for a rumqttc
//! `Client` in one thread and its `Connection` in another): [`Recorder::publish`]
//! before each publish (it returns the payload, `"<publisher>/<seq>"`),
//! [`Recorder::subscribing`] before each subscribe, [`Recorder::at_node`] when it
//! (re)connects to a node, and every event of its rumqttc event loop through
//! [`Recorder::on_v4`] / [`Recorder::on_v5`], which turn CONNACK, SUBACK, PUBLISH,
//! PUBREL, PUBACK, PUBCOMP and outgoing PUBLISH / SUBSCRIBE into records (packet ids
//! are mapped back to sequence numbers and filters). The lower-level `History`
//! methods take the same facts directly. Faults go in with [`History::fault`] when
//! they happen (kills, restarts and pauses are also used by the checks).
//!
//! What [`check`] reports (each with a count; the seed and the fault schedule head
//! the report):
//! - **acked but lost**: a QoS 1/2 publication acknowledged to its publisher (PUBACK,
//!   PUBCOMP) that never reached a subscriber whose session held a matching
//!   subscription (SUBACK with QoS 1/2 received before the publish was sent) and was
//!   never lost (every later CONNACK had session present = 1). Shared subscriptions
//!   (`$share/...`) are not checked this way (one member gets each message), nor are
//!   unsubscribes recorded: a scenario that unsubscribes does not use this check.
//! - **lost sessions**: a CONNACK with session present = 0 for a client that asked to
//!   keep its session (Clean Start 0) and had one; an error unless the scenario said
//!   it may happen ([`History::allow_lost_sessions`]).
//! - **QoS 2 duplicates**: one session of a subscriber got one QoS 2 publication
//!   twice, DUP flag or not. A re-send of a packet id the client has not seen PUBREL
//!   for is one delivery (the receiver must not pass it on twice, MQTT-4.3.3-9; the
//!   checker does what such a client does, rumqttc does not).
//! - **QoS 0 duplicates**: a QoS 0 publication twice to one session.
//! - **order violations**: first deliveries to one subscriber session of one
//!   publisher connection's messages of one topic and QoS out of their publication
//!   order (MQTT 4.6), with the data-plane simulation's rules (`check` in
//!   `broker/src/server/sim.rs`): publications the publisher sent again after a
//!   reconnect are left out, and an inversion is late (counted and printed, not an
//!   error) when the subscriber was served by two nodes and either the late copy came
//!   more than the new owner's hold ([`HOLD_MAX`]) after the first later one, or its
//!   node was killed in between, or its node logged that the client's hold ran out
//!   ("client order hold given up") during the client's present stay there (since the
//!   first of its last CONNACKs in a row from that node: the hold is the session's,
//!   not a connection's, and lasts across reconnects to the same node).
//! - **two nodes**: a ClientID live on two nodes at once (from the node logs) for
//!   longer than the tolerance given to [`check`] (the session lease); a node's live
//!   intervals end at its kill ([`Fault::Kill`]) when its log has no end line, and
//!   time a node spent paused ([`Fault::Pause`] .. [`Fault::Resume`]) does not count.
//!   Shorter overlaps are counted with their maximum (the lease bound observed).
//!   The nodes must run with `log.clients = true`: node logs without any client line
//!   while clients connected are an error, not a pass.
//! - deliveries of a `<publisher>/<seq>` payload nobody recorded sending.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a node that took a session in holds direct copies for the old node's
/// redirects (`tessera_shard::engine::HOLD_MAX_MS`): order across a move is kept
/// within it.
pub const HOLD_MAX: Duration = Duration::from_millis(3_000);

/// The client log lines' tracing target (`tessera_shard::engine::CLIENTS_LOG_TARGET`).
pub const CLIENTS_TARGET: &str = "tessera::clients";

/// Lines of each kind of finding printed in a report (all are counted).
const PRINTED_MAX: usize = 20;

/// A fault the scenario injected, recorded when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of a node: its live connections end here.
    Kill(u64),
    /// A node (re)started.
    Start(u64),
    /// SIGSTOP: the node serves nothing until [`Fault::Resume`].
    Pause(u64),
    /// SIGCONT.
    Resume(u64),
    /// Anything else (a partition, a delay, its healing), as text.
    Other(String),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Kill(n) => write!(f, "kill -9 node {n}"),
            Fault::Start(n) => write!(f, "start node {n}"),
            Fault::Pause(n) => write!(f, "SIGSTOP node {n}"),
            Fault::Resume(n) => write!(f, "SIGCONT node {n}"),
            Fault::Other(s) => f.write_str(s),
        }
    }
}

/// One recorded fact.
#[derive(Debug, Clone)]
enum What {
    ConnAck {
        client: String,
        node: u64,
        clean_start: bool,
        session_present: bool,
    },
    SubAck {
        client: String,
        filter: String,
        /// The granted QoS; `None`: refused.
        granted: Option<u8>,
    },
    Sent {
        client: String,
        topic: String,
        qos: u8,
        seq: u64,
    },
    Resent {
        client: String,
        seq: u64,
    },
    Acked {
        client: String,
        seq: u64,
    },
    Delivered {
        client: String,
        topic: String,
        qos: u8,
        pkid: u16,
        dup: bool,
        payload: String,
    },
    Released {
        client: String,
        pkid: u16,
    },
    Fault(Fault),
}

#[derive(Debug, Clone)]
struct Rec {
    /// Microseconds since the Unix epoch (monotonic within a history).
    at_us: u64,
    what: What,
}

struct Inner {
    seed: u64,
    start: Instant,
    start_unix_us: u64,
    log: Mutex<Log>,
}

#[derive(Default)]
struct Log {
    recs: Vec<Rec>,
    lost_sessions_allowed: Option<String>,
}

/// The record of one run; clone it into every thread (a shared handle).
#[derive(Clone)]
pub struct History {
    inner: Arc<Inner>,
}

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl History {
    /// An empty history of the run with `seed` (printed in the report).
    pub fn new(seed: u64) -> History {
        History {
            inner: Arc::new(Inner {
                seed,
                start: Instant::now(),
                start_unix_us: unix_us(SystemTime::now()),
                log: Mutex::new(Log::default()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        // A client thread that panicked while recording leaves a usable log.
        self.inner.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Now, in the history's clock: Unix microseconds, never going back.
    fn now_us(&self) -> u64 {
        let since = u64::try_from(self.inner.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.inner.start_unix_us.saturating_add(since)
    }

    fn push(&self, what: What) {
        let mut log = self.lock();
        // Stamped under the lock: the records' order is their time order.
        let at_us = self.now_us();
        log.recs.push(Rec { at_us, what });
    }

    fn push_at(&self, at_us: u64, what: What) {
        self.lock().recs.push(Rec { at_us, what });
    }

    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// The scenario may lose sessions (`why` is printed): lost sessions are then
    /// reported as notes, not errors.
    pub fn allow_lost_sessions(&self, why: &str) {
        self.lock().lost_sessions_allowed = Some(why.to_owned());
    }

    /// A per-client recorder for `client`, which connects with `clean_start`.
    pub fn client(&self, client: &str, clean_start: bool) -> Recorder {
        Recorder {
            history: self.clone(),
            client: Arc::from(client),
            clean_start,
            state: Arc::new(Mutex::new(ClientState::default())),
        }
    }

    /// `client` got a CONNACK (success) from `node`.
    pub fn connack(&self, client: &str, node: u64, clean_start: bool, session_present: bool) {
        self.push(What::ConnAck {
            client: client.to_owned(),
            node,
            clean_start,
            session_present,
        });
    }

    /// `client` got a SUBACK for `filter`: the granted QoS, or `None` (refused).
    pub fn suback(&self, client: &str, filter: &str, granted: Option<u8>) {
        self.push(What::SubAck {
            client: client.to_owned(),
            filter: filter.to_owned(),
            granted,
        });
    }

    /// `client` sends (hands to its MQTT client) publication `seq` on `topic` at `qos`,
    /// with the payload [`payload`]`(client, seq)`.
    pub fn sent(&self, client: &str, topic: &str, qos: u8, seq: u64) {
        self.push(What::Sent {
            client: client.to_owned(),
            topic: topic.to_owned(),
            qos,
            seq,
        });
    }

    /// `client` sent publication `seq` again (after a reconnect).
    pub fn resent(&self, client: &str, seq: u64) {
        self.push(What::Resent {
            client: client.to_owned(),
            seq,
        });
    }

    /// Publication `seq` of `client` was acknowledged (PUBACK, or PUBCOMP for QoS 2).
    pub fn acked(&self, client: &str, seq: u64) {
        self.push(What::Acked {
            client: client.to_owned(),
            seq,
        });
    }

    /// `client` got a PUBLISH.
    pub fn delivered(
        &self,
        client: &str,
        topic: &str,
        qos: u8,
        pkid: u16,
        dup: bool,
        payload: &[u8],
    ) {
        self.push(What::Delivered {
            client: client.to_owned(),
            topic: topic.to_owned(),
            qos,
            pkid,
            dup,
            payload: String::from_utf8_lossy(payload).into_owned(),
        });
    }

    /// `client` got the PUBREL of the QoS 2 delivery with packet id `pkid`.
    pub fn released(&self, client: &str, pkid: u16) {
        self.push(What::Released {
            client: client.to_owned(),
            pkid,
        });
    }

    /// A fault happened now.
    pub fn fault(&self, fault: Fault) {
        self.push(What::Fault(fault));
    }

    /// Every record, one line each in time order (UTC time, then the fact), for a
    /// failed run's files beside the node logs: which copies a subscriber got in
    /// which order, with packet ids and DUP flags, is what a triage reads first.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for r in &self.lock().recs {
            let t = synthetic::rfc3339(r.at_us);
            let line = match &r.what {
                What::Delivered {
                    client,
                    topic,
                    qos,
                    pkid,
                    dup,
                    payload,
                } => format!("{client} got {payload} q{qos} {topic} pkid {pkid} dup {dup}"),
                other => format!("{other:?}"),
            };
            out.push_str(&t);
            out.push(' ');
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// The recorded faults: (Unix µs, fault).
    pub fn faults(&self) -> Vec<(u64, Fault)> {
        self.lock()
            .recs
            .iter()
            .filter_map(|r| match &r.what {
                What::Fault(f) => Some((r.at_us, f.clone())),
                _ => None,
            })
            .collect()
    }
}

/// The payload of publication `seq` of `publisher`.
pub fn payload(publisher: &str, seq: u64) -> String {
    format!("{publisher}/{seq}")
}

/// (publisher, seq) of a payload made by [`payload`].
fn parse_payload(p: &str) -> Option<(&str, u64)> {
    let (publisher, seq) = p.rsplit_once('/')?;
    Some((publisher, seq.parse().ok()?))
}

#[derive(Default)]
struct ClientState {
    node: u64,
    next_seq: u64,
    /// Publications handed to the client and not yet given a packet id, in order.
    unsent: VecDeque<u64>,
    /// Packet id -> publication not yet acknowledged.
    inflight: HashMap<u16, u64>,
    /// Subscribes handed to the client, in order, and by packet id once sent.
    subscribing: VecDeque<Vec<String>>,
    suback_due: HashMap<u16, Vec<String>>,
}

/// One client's recording handle: clone it into the thread that publishes and the
/// one that polls the event loop.
#[derive(Clone)]
pub struct Recorder {
    history: History,
    client: Arc<str>,
    clean_start: bool,
    state: Arc<Mutex<ClientState>>,
}

impl Recorder {
    fn state(&self) -> MutexGuard<'_, ClientState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ClientID.
    pub fn id(&self) -> &str {
        &self.client
    }

    /// The client (re)connects to `node`: its next CONNACK is that node's.
    pub fn at_node(&self, node: u64) {
        self.state().node = node;
    }

    /// Records the next publication (QoS 0, 1 or 2) on `topic` and returns its payload;
    /// hand it to the MQTT client next, before any other publish of this client (the
    /// packet ids the event loop reports are matched in this order).
    pub fn publish(&self, topic: &str, qos: u8) -> String {
        let mut st = self.state();
        st.next_seq += 1;
        let seq = st.next_seq;
        st.unsent.push_back(seq);
        self.history.sent(&self.client, topic, qos, seq);
        payload(&self.client, seq)
    }

    /// Records a SUBSCRIBE of `filters` about to be handed to the MQTT client (one
    /// SUBSCRIBE packet; its SUBACK is matched by packet id).
    pub fn subscribing(&self, filters: &[&str]) {
        self.state()
            .subscribing
            .push_back(filters.iter().map(|f| (*f).to_owned()).collect());
    }

    fn outgoing(&self, o: &rumqttc::Outgoing) {
        let mut st = self.state();
        match o {
            rumqttc::Outgoing::Publish(pkid) => {
                if *pkid != 0
                    && let Some(&seq) = st.inflight.get(pkid)
                {
                    // rumqttc sends what was in flight again after a reconnect.
                    drop(st);
                    self.history.resent(&self.client, seq);
                    return;
                }
                let Some(seq) = st.unsent.pop_front() else {
                    return;
                };
                if *pkid != 0 {
                    st.inflight.insert(*pkid, seq);
                }
            }
            rumqttc::Outgoing::Subscribe(pkid) => {
                if let Some(filters) = st.subscribing.pop_front() {
                    st.suback_due.insert(*pkid, filters);
                }
            }
            _ => {}
        }
    }

    fn ack(&self, pkid: u16) {
        let seq = self.state().inflight.remove(&pkid);
        if let Some(seq) = seq {
            self.history.acked(&self.client, seq);
        }
    }

    fn connack(&self, session_present: bool) {
        let node = self.state().node;
        self.history
            .connack(&self.client, node, self.clean_start, session_present);
    }

    fn suback(&self, pkid: u16, granted: impl Iterator<Item = Option<u8>>) {
        let filters = self.state().suback_due.remove(&pkid).unwrap_or_default();
        for (filter, granted) in filters.iter().zip(granted) {
            self.history.suback(&self.client, filter, granted);
        }
    }

    /// Records what an MQTT 3.1.1 rumqttc event says.
    pub fn on_v4(&self, event: &rumqttc::Event) {
        use rumqttc::{Event, Packet, SubscribeReasonCode};
        match event {
            Event::Outgoing(o) => self.outgoing(o),
            Event::Incoming(Packet::ConnAck(a)) => {
                if a.code == rumqttc::ConnectReturnCode::Success {
                    self.connack(a.session_present);
                }
            }
            Event::Incoming(Packet::SubAck(s)) => self.suback(
                s.pkid,
                s.return_codes.iter().map(|c| match c {
                    SubscribeReasonCode::Success(q) => Some(*q as u8),
                    SubscribeReasonCode::Failure => None,
                }),
            ),
            Event::Incoming(Packet::Publish(p)) => self.history.delivered(
                &self.client,
                &p.topic,
                p.qos as u8,
                p.pkid,
                p.dup,
                &p.payload,
            ),
            Event::Incoming(Packet::PubRel(r)) => self.history.released(&self.client, r.pkid),
            Event::Incoming(Packet::PubAck(a)) => self.ack(a.pkid),
            Event::Incoming(Packet::PubComp(c)) => self.ack(c.pkid),
            Event::Incoming(_) => {}
        }
    }

    /// Records what an MQTT 5 rumqttc event says (acknowledgements with an error
    /// reason code are not acknowledgements).
    pub fn on_v5(&self, event: &rumqttc::v5::Event) {
        use rumqttc::v5::Event;
        use rumqttc::v5::mqttbytes::v5::{
            ConnectReturnCode, Packet, PubAckReason, PubCompReason, SubscribeReasonCode,
        };
        match event {
            Event::Outgoing(o) => self.outgoing(o),
            Event::Incoming(Packet::ConnAck(a)) => {
                if a.code == ConnectReturnCode::Success {
                    self.connack(a.session_present);
                }
            }
            Event::Incoming(Packet::SubAck(s)) => self.suback(
                s.pkid,
                s.return_codes.iter().map(|c| match c {
                    SubscribeReasonCode::Success(q) => Some(*q as u8),
                    _ => None,
                }),
            ),
            Event::Incoming(Packet::Publish(p)) => self.history.delivered(
                &self.client,
                &String::from_utf8_lossy(&p.topic),
                p.qos as u8,
                p.pkid,
                p.dup,
                &p.payload,
            ),
            Event::Incoming(Packet::PubRel(r)) => self.history.released(&self.client, r.pkid),
            Event::Incoming(Packet::PubAck(a)) => {
                if matches!(
                    a.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                ) {
                    self.ack(a.pkid);
                } else {
                    self.state().inflight.remove(&a.pkid);
                }
            }
            Event::Incoming(Packet::PubComp(c)) => {
                if c.reason == PubCompReason::Success {
                    self.ack(c.pkid);
                } else {
                    self.state().inflight.remove(&c.pkid);
                }
            }
            Event::Incoming(_) => {}
        }
    }
}

// ----------------------------------------------------------------------------
// Node logs

/// What one node process wrote (its stderr), for the two-node check: the node's
/// "client live" / "client ended" lines (`tessera::clients`). Give one per process
/// lifetime, or one per node with its lifetimes concatenated.
#[derive(Debug, Clone)]
pub struct NodeLog {
    pub node: u64,
    pub text: String,
}

/// What a client log line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// "client live": the session went live on the node.
    Live,
    /// "client ended": that connection ended.
    Ended,
    /// "client order hold given up": a moved-in session's hold for its old node's
    /// redirects ended before they all came (late copies may follow).
    OrderGivenUp,
}

/// One client log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLine {
    /// Unix microseconds.
    pub at_us: u64,
    pub kind: LineKind,
    pub client_id: String,
    /// The `node` field (absent outside a cluster).
    pub node: Option<u64>,
    pub shard: u64,
    /// The connection (`slot#serial`); empty for [`LineKind::OrderGivenUp`].
    pub conn: String,
    pub epoch: Option<u64>,
    pub session_present: Option<bool>,
    /// The end's reason (`taken_over`, `fenced`, ...).
    pub reason: Option<String>,
}

/// Removes ANSI escape sequences (`ESC [ ... letter`): the broker's text logs are
/// coloured unless `NO_COLOR` is set, also into a pipe.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Unix microseconds of an RFC 3339 UTC timestamp as tracing prints it
/// (`2026-12-07T16:05:01.123456Z`).
fn parse_timestamp(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<u64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let digits: String = frac.chars().take(6).collect();
    let us = digits.parse::<u64>().ok()? * 10u64.pow(6 - digits.len() as u32);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(((days * 24 + hh) * 60 + mm) * 60_000_000 + ss * 1_000_000 + us)
}

/// `key=value` fields after the message; values may be quoted (`"..."`, Rust `Debug`
/// escapes).
fn parse_fields(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ' ' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            continue;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some('t') => value.push('\t'),
                        Some('r') => value.push('\r'),
                        Some('0') => value.push('\0'),
                        Some(c) => value.push(c),
                        None => break,
                    },
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key, value);
    }
    out
}

/// A client log line in the JSON log format (`log.format = "json"`).
fn json_line(line: &str) -> Option<ClientLine> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v["target"] != CLIENTS_TARGET {
        return None;
    }
    let f = &v["fields"];
    let kind = match f["message"].as_str()? {
        "client live" => LineKind::Live,
        "client ended" => LineKind::Ended,
        "client order hold given up" => LineKind::OrderGivenUp,
        _ => return None,
    };
    Some(ClientLine {
        at_us: parse_timestamp(v["timestamp"].as_str()?)?,
        kind,
        client_id: f["client_id"].as_str()?.to_owned(),
        node: f["node"].as_u64(),
        shard: f["shard"].as_u64()?,
        conn: match kind {
            LineKind::OrderGivenUp => String::new(),
            _ => f["conn"].as_str()?.to_owned(),
        },
        epoch: f["epoch"].as_u64(),
        session_present: f["session_present"].as_bool(),
        reason: f["reason"].as_str().map(str::to_owned),
    })
}

/// The client log lines of a node's log text (the text or the JSON format), in order.
pub fn client_lines(text: &str) -> Vec<ClientLine> {
    let marker = format!("{CLIENTS_TARGET}: ");
    text.lines()
        .filter_map(|raw| {
            if raw.starts_with('{') {
                return json_line(raw);
            }
            let line = strip_ansi(raw);
            let (head, rest) = line.split_once(&marker)?;
            let at_us = parse_timestamp(head.split_whitespace().next()?)?;
            let (kind, fields) = if let Some(f) = rest.strip_prefix("client live") {
                (LineKind::Live, f)
            } else if let Some(f) = rest.strip_prefix("client ended") {
                (LineKind::Ended, f)
            } else if let Some(f) = rest.strip_prefix("client order hold given up") {
                (LineKind::OrderGivenUp, f)
            } else {
                return None;
            };
            let f = parse_fields(fields);
            let conn = match kind {
                LineKind::OrderGivenUp => String::new(),
                _ => f.get("conn")?.clone(),
            };
            Some(ClientLine {
                at_us,
                kind,
                client_id: f.get("client_id")?.clone(),
                node: f.get("node").and_then(|v| v.parse().ok()),
                shard: f.get("shard")?.parse().ok()?,
                conn,
                epoch: f.get("epoch").and_then(|v| v.parse().ok()),
                session_present: f.get("session_present").and_then(|v| v.parse().ok()),
                reason: f.get("reason").cloned(),
            })
        })
        .collect()
}

/// A span of time a ClientID was live on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub client_id: String,
    pub node: u64,
    pub from_us: u64,
    pub to_us: u64,
    /// How it ended: the reason of its end line, `killed`, or `open` (still live at
    /// the end of the history).
    pub end: String,
}

/// The live spans in the node logs: a span without an end line ends at its node's
/// next kill after it started, or else at `end_us`.
pub fn live_spans(logs: &[NodeLog], faults: &[(u64, Fault)], end_us: u64) -> Vec<Live> {
    let mut out = Vec::new();
    for log in logs {
        let node = log.node;
        let killed_after = |t: u64| {
            faults
                .iter()
                .filter(|(at, f)| *f == Fault::Kill(node) && *at >= t)
                .map(|(at, _)| *at)
                .min()
        };
        // (shard, conn) -> (client, since)
        let mut open: BTreeMap<(u64, String), (String, u64)> = BTreeMap::new();
        for l in client_lines(&log.text) {
            let key = (l.shard, l.conn.clone());
            if l.kind == LineKind::OrderGivenUp {
                continue;
            }
            if l.kind == LineKind::Live {
                if let Some((client_id, from_us)) = open.remove(&key) {
                    // The same connection id again: a restarted process (a log of
                    // several lifetimes); the earlier one ended with its process.
                    let to_us = killed_after(from_us).unwrap_or(l.at_us).min(l.at_us);
                    out.push(Live {
                        client_id,
                        node,
                        from_us,
                        to_us,
                        end: "killed".into(),
                    });
                }
                open.insert(key, (l.client_id, l.at_us));
            } else if let Some((client_id, from_us)) = open.remove(&key) {
                out.push(Live {
                    client_id,
                    node,
                    from_us,
                    to_us: l.at_us,
                    end: l.reason.unwrap_or_default(),
                });
            }
        }
        for (_, (client_id, from_us)) in open {
            let (to_us, end) = match killed_after(from_us) {
                Some(t) => (t, "killed"),
                None => (end_us.max(from_us), "open"),
            };
            out.push(Live {
                client_id,
                node,
                from_us,
                to_us,
                end: end.into(),
            });
        }
    }
    out
}

/// The paused windows of `node`: (from, to) Unix µs.
fn paused(faults: &[(u64, Fault)], node: u64, end_us: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut since = None;
    for (at, f) in faults {
        match f {
            Fault::Pause(n) if *n == node => since = since.or(Some(*at)),
            Fault::Resume(n) | Fault::Kill(n) if *n == node => {
                if let Some(s) = since.take() {
                    out.push((s, *at));
                }
            }
            _ => {}
        }
    }
    if let Some(s) = since {
        out.push((s, end_us));
    }
    out
}

/// The length of `[lo, hi)` outside the union of `windows`.
fn outside(lo: u64, hi: u64, windows: &[(u64, u64)]) -> u64 {
    let mut cut: Vec<(u64, u64)> = windows
        .iter()
        .map(|&(a, b)| (a.max(lo), b.min(hi)))
        .filter(|(a, b)| a < b)
        .collect();
    cut.sort_unstable();
    let mut covered = 0;
    let mut reach = lo;
    for (a, b) in cut {
        let a = a.max(reach);
        if b > a {
            covered += b - a;
            reach = b;
        }
    }
    (hi - lo).saturating_sub(covered)
}

// ----------------------------------------------------------------------------
// The check

/// Counts of what the history held and what was checked.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub publications: usize,
    pub acked: usize,
    pub deliveries: usize,
    /// QoS 2 re-sends of an unreleased packet id, counted as one delivery.
    pub qos2_resends: usize,
    pub subacks: usize,
    pub connacks: usize,
    /// (subscriber, acknowledged publication) pairs the subscribe-then-publish rule
    /// checked.
    pub expected: usize,
    /// Live spans read from the node logs.
    pub live_spans: usize,
    /// Spans on two nodes that overlapped at all (within the tolerance or not).
    pub overlaps: usize,
    /// The longest such overlap.
    pub overlap_max: Duration,
    /// How the live spans ended: reason (`taken_over`, `fenced`, ..., `killed`,
    /// `open`) -> count.
    pub span_ends: BTreeMap<String, usize>,
    /// "client order hold given up" lines in the node logs.
    pub holds_given_up: usize,
    /// Deliveries whose payload is not `<publisher>/<seq>` (wills, retained from
    /// elsewhere): ignored.
    pub foreign: usize,
}

/// What [`check`] found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub seed: u64,
    /// The faults, in order: (seconds since the history started, fault).
    pub faults: Vec<(f64, Fault)>,
    pub tolerance: Duration,
    pub counts: Counts,
    pub acked_lost: Vec<String>,
    pub lost_sessions: Vec<String>,
    /// Why lost sessions are allowed, if they are.
    pub lost_sessions_allowed: Option<String>,
    pub qos2_duplicates: Vec<String>,
    pub qos0_duplicates: Vec<String>,
    pub order: Vec<String>,
    /// Inversions past a move's hold: not errors.
    pub late: Vec<String>,
    pub two_nodes: Vec<String>,
    pub unknown: Vec<String>,
}

impl Report {
    /// Whether nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.errors() == 0
    }

    /// The number of errors of every kind.
    pub fn errors(&self) -> usize {
        let lost = if self.lost_sessions_allowed.is_some() {
            0
        } else {
            self.lost_sessions.len()
        };
        self.acked_lost.len()
            + lost
            + self.qos2_duplicates.len()
            + self.qos0_duplicates.len()
            + self.order.len()
            + self.two_nodes.len()
            + self.unknown.len()
    }

    /// Panics with the report unless it is clean.
    #[track_caller]
    pub fn assert_clean(&self) {
        assert!(
            self.is_clean(),
            "the history checker found {} errors:\n{self}",
            self.errors()
        );
    }
}

fn section(f: &mut fmt::Formatter<'_>, title: &str, lines: &[String]) -> fmt::Result {
    writeln!(f, "{title}: {}", lines.len())?;
    for l in lines.iter().take(PRINTED_MAX) {
        writeln!(f, "  {l}")?;
    }
    if lines.len() > PRINTED_MAX {
        writeln!(f, "  ... {} more", lines.len() - PRINTED_MAX)?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(f, "seed {}", self.seed)?;
        writeln!(f, "fault schedule ({} faults):", self.faults.len())?;
        for (at, fault) in &self.faults {
            writeln!(f, "  +{at:.3}s {fault}")?;
        }
        writeln!(
            f,
            "{} publications ({} acknowledged at QoS 1/2), {} deliveries ({} QoS 2 re-sends \
             of an unreleased packet id, {} foreign payloads ignored), {} SUBACKs, {} CONNACKs, \
             {} subscribe-then-publish deliveries checked",
            c.publications,
            c.acked,
            c.deliveries,
            c.qos2_resends,
            c.foreign,
            c.subacks,
            c.connacks,
            c.expected
        )?;
        writeln!(
            f,
            "{} live spans in the node logs; {} overlaps on two nodes, longest {:?} \
             (tolerance {:?}); {} moved-in sessions' holds given up",
            c.live_spans, c.overlaps, c.overlap_max, self.tolerance, c.holds_given_up
        )?;
        if !c.span_ends.is_empty() {
            let ends: Vec<String> = c
                .span_ends
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            writeln!(f, "live spans ended: {}", ends.join(", "))?;
        }
        section(f, "acknowledged but lost", &self.acked_lost)?;
        match &self.lost_sessions_allowed {
            Some(why) => section(
                f,
                &format!("lost sessions (allowed: {why})"),
                &self.lost_sessions,
            )?,
            None => section(f, "lost sessions", &self.lost_sessions)?,
        }
        section(f, "QoS 2 duplicates", &self.qos2_duplicates)?;
        section(f, "QoS 0 duplicates", &self.qos0_duplicates)?;
        section(f, "order violations", &self.order)?;
        section(f, "late past a move's hold (not errors)", &self.late)?;
        section(f, "live on two nodes beyond the tolerance", &self.two_nodes)?;
        section(f, "delivered but never published", &self.unknown)
    }
}

/// Whether `filter` matches `topic` (MQTT wildcards; `$` topics only by filters
/// starting with `$`).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && !filter.starts_with('$') {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A publication as its publisher recorded it.
#[derive(Debug)]
struct Pub {
    topic: String,
    qos: u8,
    sent_us: u64,
    /// The publisher's CONNACKs before it was sent (its connection generation).
    generation: u64,
    acked_us: Option<u64>,
    resent: bool,
}

/// A delivery, attributed to the subscriber's session and node at the time.
#[derive(Debug)]
struct Got<'a> {
    client: &'a str,
    session: u64,
    node: u64,
    at_us: u64,
    qos: u8,
    dup: bool,
    pkid: u16,
    key: (&'a str, u64),
}

/// Per-client session bookkeeping while reading the history in order.
#[derive(Default)]
struct Sess {
    connacks: u64,
    session: u64,
    node: u64,
    /// Whether the last CONNECT asked to keep the session (Clean Start 0).
    keeps: bool,
    /// QoS 2 packet ids delivered and not yet released, with their payload.
    unreleased: HashMap<u16, String>,
}

/// Checks `history` and the nodes' client log lines; `tolerance` is how long a
/// ClientID may be live on two nodes at once (the session lease).
pub fn check(history: &History, logs: &[NodeLog], tolerance: Duration) -> Report {
    let end_us = history.now_us();
    let log = history.lock();
    let recs = log.recs.clone();
    let allowed = log.lost_sessions_allowed.clone();
    drop(log);
    check_recs(history, &recs, allowed, logs, tolerance, end_us)
}

fn secs(history: &History, at_us: u64) -> f64 {
    at_us.saturating_sub(history.inner.start_unix_us) as f64 / 1e6
}

fn check_recs(
    history: &History,
    recs: &[Rec],
    lost_sessions_allowed: Option<String>,
    logs: &[NodeLog],
    tolerance: Duration,
    end_us: u64,
) -> Report {
    let t = |at_us: u64| format!("+{:.3}s", secs(history, at_us));
    let mut r = Report {
        seed: history.seed(),
        tolerance,
        lost_sessions_allowed,
        ..Report::default()
    };
    let faults: Vec<(u64, Fault)> = recs
        .iter()
        .filter_map(|x| match &x.what {
            What::Fault(f) => Some((x.at_us, f.clone())),
            _ => None,
        })
        .collect();
    r.faults = faults
        .iter()
        .map(|(at, f)| (secs(history, *at), f.clone()))
        .collect();

    // One pass in time order: sessions, publications, deliveries, grants.
    let mut sess: HashMap<&str, Sess> = HashMap::new();
    let mut pubs: HashMap<(&str, u64), Pub> = HashMap::new();
    let mut got: Vec<Got> = Vec::new();
    // (client, session, filter) -> earliest grant at QoS 1/2.
    let mut grants: BTreeMap<(&str, u64, &str), u64> = BTreeMap::new();
    for x in recs {
        match &x.what {
            What::ConnAck {
                client,
                node,
                clean_start,
                session_present,
            } => {
                r.counts.connacks += 1;
                let s = sess.entry(client.as_str()).or_default();
                if !session_present {
                    if !clean_start && s.keeps && s.connacks > 0 {
                        r.lost_sessions.push(format!(
                            "{client}: session present = 0 from node {node} at {} (it had a \
                             session, Clean Start 0)",
                            t(x.at_us)
                        ));
                    }
                    s.session += 1;
                    s.unreleased.clear();
                }
                s.connacks += 1;
                s.node = *node;
                s.keeps = !clean_start;
            }
            What::SubAck {
                client,
                filter,
                granted,
            } => {
                r.counts.subacks += 1;
                let s = sess.entry(client.as_str()).or_default();
                if granted.is_some_and(|q| q > 0) && !filter.starts_with("$share/") {
                    grants
                        .entry((client.as_str(), s.session, filter.as_str()))
                        .or_insert(x.at_us);
                }
            }
            What::Sent {
                client,
                topic,
                qos,
                seq,
            } => {
                let generation = sess.get(client.as_str()).map_or(0, |s| s.connacks);
                pubs.insert(
                    (client.as_str(), *seq),
                    Pub {
                        topic: topic.clone(),
                        qos: *qos,
                        sent_us: x.at_us,
                        generation,
                        acked_us: None,
                        resent: false,
                    },
                );
            }
            What::Resent { client, seq } => {
                if let Some(p) = pubs.get_mut(&(client.as_str(), *seq)) {
                    p.resent = true;
                }
            }
            What::Acked { client, seq } => {
                if let Some(p) = pubs.get_mut(&(client.as_str(), *seq)) {
                    p.acked_us.get_or_insert(x.at_us);
                }
            }
            What::Delivered {
                client,
                topic: _,
                qos,
                pkid,
                dup,
                payload,
            } => {
                let s = sess.entry(client.as_str()).or_default();
                if *qos == 2 {
                    if s.unreleased.get(pkid) == Some(payload) {
                        r.counts.qos2_resends += 1;
                        continue;
                    }
                    s.unreleased.insert(*pkid, payload.clone());
                }
                r.counts.deliveries += 1;
                let Some(key) = parse_payload(payload) else {
                    r.counts.foreign += 1;
                    continue;
                };
                got.push(Got {
                    client: client.as_str(),
                    session: s.session,
                    node: s.node,
                    at_us: x.at_us,
                    qos: *qos,
                    dup: *dup,
                    pkid: *pkid,
                    key,
                });
            }
            What::Released { client, pkid } => {
                if let Some(s) = sess.get_mut(client.as_str()) {
                    s.unreleased.remove(pkid);
                }
            }
            What::Fault(_) => {}
        }
    }
    r.counts.publications = pubs.len();
    r.counts.acked = pubs
        .values()
        .filter(|p| p.qos > 0 && p.acked_us.is_some())
        .count();

    // Delivered but never published.
    let known_publishers: BTreeSet<&str> = pubs.keys().map(|(c, _)| *c).collect();
    for d in &got {
        if !pubs.contains_key(&d.key) {
            if known_publishers.contains(d.key.0) {
                r.unknown.push(format!(
                    "{}: {}/{} at {} (never sent)",
                    d.client,
                    d.key.0,
                    d.key.1,
                    t(d.at_us)
                ));
            } else {
                r.counts.foreign += 1;
            }
        }
    }

    // Deliveries per (subscriber, publication).
    let mut by_pub: HashMap<(&str, (&str, u64)), Vec<&Got>> = HashMap::new();
    for d in &got {
        by_pub.entry((d.client, d.key)).or_default().push(d);
    }
    let mut keys: Vec<_> = by_pub.keys().copied().collect();
    keys.sort_unstable();
    for k in &keys {
        let ds = &by_pub[k];
        let (client, (publisher, seq)) = *k;
        let Some(p) = pubs.get(&(publisher, seq)) else {
            continue;
        };
        let mut per_session: BTreeMap<u64, Vec<&Got>> = BTreeMap::new();
        for d in ds {
            per_session.entry(d.session).or_default().push(d);
        }
        for (session, ds) in per_session {
            let how = || {
                ds.iter()
                    .map(|d| {
                        format!(
                            "{} node {} pkid {} dup {} QoS {}",
                            t(d.at_us),
                            d.node,
                            d.pkid,
                            d.dup,
                            d.qos
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            let twice = ds.iter().filter(|d| d.qos == 2).count();
            if twice > 1 {
                r.qos2_duplicates.push(format!(
                    "{client} (session {session}): {publisher}/{seq} on {} delivered {twice} \
                     times: {}",
                    p.topic,
                    how()
                ));
            }
            if p.qos == 0 && ds.len() > 1 {
                r.qos0_duplicates.push(format!(
                    "{client} (session {session}): QoS 0 {publisher}/{seq} on {} delivered {} \
                     times: {}",
                    p.topic,
                    ds.len(),
                    how()
                ));
            }
        }
    }

    // Subscribe, then publish: acknowledged QoS 1/2 publications reach every session
    // that held a matching subscription before the publish and was never lost.
    let final_session: HashMap<&str, u64> = sess.iter().map(|(c, s)| (*c, s.session)).collect();
    let mut pub_keys: Vec<&(&str, u64)> = pubs.keys().collect();
    pub_keys.sort_unstable();
    for key in pub_keys {
        let p = &pubs[key];
        let Some(acked_us) = p.acked_us.filter(|_| p.qos > 0) else {
            continue;
        };
        let mut subscribers: BTreeMap<&str, (&str, u64)> = BTreeMap::new();
        for (&(client, session, filter), &granted_us) in &grants {
            if granted_us < p.sent_us
                && final_session.get(client) == Some(&session)
                && matches(filter, &p.topic)
            {
                subscribers.entry(client).or_insert((filter, granted_us));
            }
        }
        for (client, (filter, granted_us)) in subscribers {
            r.counts.expected += 1;
            let session = final_session[client];
            let reached = by_pub
                .get(&(client, *key))
                .is_some_and(|ds| ds.iter().any(|d| d.session == session));
            if !reached {
                r.acked_lost.push(format!(
                    "{client}: QoS {} {}/{} on {} sent {} acknowledged {} never arrived \
                     (SUBACK for {filter} at {})",
                    p.qos,
                    key.0,
                    key.1,
                    p.topic,
                    t(p.sent_us),
                    t(acked_us),
                    t(granted_us)
                ));
            }
        }
    }

    // Order: first deliveries per (subscriber, session, publisher connection, topic,
    // QoS) in publication order, as the simulation checks it. A node's word that a
    // client's hold ran out: (node, client, when).
    let given_up: Vec<(u64, String, u64)> = logs
        .iter()
        .flat_map(|log| {
            client_lines(&log.text)
                .into_iter()
                .filter(|l| l.kind == LineKind::OrderGivenUp)
                .map(move |l| (log.node, l.client_id, l.at_us))
        })
        .collect();
    r.counts.holds_given_up = given_up.len();
    // Each client's CONNACKs: (when, node), in time order.
    let mut connacks: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for x in recs {
        if let What::ConnAck { client, node, .. } = &x.what {
            connacks.entry(client).or_default().push((x.at_us, *node));
        }
    }
    type Stream<'a> = (&'a str, u64, &'a str, u64, &'a str, u8);
    // Per stream: the highest sequence number delivered, and the deliveries.
    type Delivered<'a, 'b> = (u64, Vec<(u64, &'b Got<'a>)>);
    let mut streams: HashMap<Stream, Delivered> = HashMap::new();
    let mut seen: BTreeSet<(&str, u64, (&str, u64))> = BTreeSet::new();
    for d in &got {
        if !seen.insert((d.client, d.session, d.key)) {
            continue;
        }
        let Some(p) = pubs.get(&d.key).filter(|p| !p.resent) else {
            continue;
        };
        let (publisher, seq) = d.key;
        let k = (
            d.client,
            d.session,
            publisher,
            p.generation,
            p.topic.as_str(),
            p.qos,
        );
        let (max, before) = streams.entry(k).or_default();
        if *max > seq
            && let Some(&(_, first_later)) = before.iter().find(|(s, _)| *s > seq)
        {
            let max = *max;
            // The subscriber's CONNACKs before this delivery.
            let came: &[(u64, u64)] = connacks.get(d.client).map_or(&[], |c| {
                let n = c.partition_point(|(at, _)| *at <= d.at_us);
                &c[..n]
            });
            // It was served by two nodes.
            let moved = came.iter().any(|(_, n)| *n != came[0].1);
            let waited = d.at_us.saturating_sub(first_later.at_us) > HOLD_MAX.as_micros() as u64;
            let killed = faults.iter().any(|(at, f)| {
                *f == Fault::Kill(d.node) && *at >= first_later.at_us && *at < d.at_us
            });
            // Its node said the client's hold ran out during the client's present stay
            // there: since the first of its last CONNACKs in a row from that node. A
            // moved-in session's window, and a hold it gave up, last for the session's
            // stay on the node, across the client's reconnects to it: the copies the
            // window released at the give-up, and the old owner's late ones behind
            // them, wait in the session's queue for the next connection. Anchored on
            // the last CONNACK instead, a hold given up while the client was away
            // (offline, or its connection cut by a pause of the node) made the
            // inversions its reconnect received errors: CI's CHAOS_SEED=904807.
            let arrived = came
                .iter()
                .rev()
                .take_while(|(_, n)| *n == d.node)
                .last()
                .map(|(at, _)| *at);
            let gave_up = arrived.is_some_and(|from| {
                given_up.iter().any(|(n, c, at)| {
                    *n == d.node && c == d.client && *at >= from && *at <= d.at_us
                })
            });
            let text = format!(
                "{} (session {}): {publisher}/{seq} (QoS {}, {}) at {} after {publisher}/{max} \
                 ({} ms after {publisher}/{} at {})",
                d.client,
                d.session,
                p.qos,
                p.topic,
                t(d.at_us),
                d.at_us.saturating_sub(first_later.at_us) / 1000,
                first_later.key.1,
                t(first_later.at_us)
            );
            if moved && (waited || killed || gave_up) {
                let why = if killed {
                    "its node was killed between"
                } else if waited {
                    "past the hold's bound"
                } else {
                    "after its node gave up the hold"
                };
                r.late.push(format!("{text}: {why}"));
            } else {
                r.order.push(text);
            }
        }
        *max = (*max).max(seq);
        before.push((seq, d));
    }

    // Two nodes at once, from the node logs.
    let spans = live_spans(logs, &faults, end_us);
    r.counts.live_spans = spans.len();
    if !logs.is_empty() && spans.is_empty() && r.counts.holds_given_up == 0 && r.counts.connacks > 0
    {
        // Nothing to check is not a pass: the nodes ran without `log.clients`.
        r.two_nodes.push(format!(
            "{} node logs but no client lines in them while clients connected {} times: \
             start the nodes with log.clients = true (TESSERA_LOG__CLIENTS=true)",
            logs.len(),
            r.counts.connacks
        ));
    }
    for s in &spans {
        *r.counts.span_ends.entry(s.end.clone()).or_default() += 1;
    }
    let mut by_client: BTreeMap<&str, Vec<&Live>> = BTreeMap::new();
    for s in &spans {
        by_client.entry(&s.client_id).or_default().push(s);
    }
    for (client, ss) in by_client {
        for (i, a) in ss.iter().enumerate() {
            for b in &ss[i + 1..] {
                if a.node == b.node {
                    continue;
                }
                let lo = a.from_us.max(b.from_us);
                let hi = a.to_us.min(b.to_us);
                if hi <= lo {
                    continue;
                }
                let mut windows = paused(&faults, a.node, end_us);
                windows.extend(paused(&faults, b.node, end_us));
                let both = outside(lo, hi, &windows);
                if both == 0 {
                    continue;
                }
                r.counts.overlaps += 1;
                let both = Duration::from_micros(both);
                r.counts.overlap_max = r.counts.overlap_max.max(both);
                if both > tolerance {
                    r.two_nodes.push(format!(
                        "{client}: live on node {} ({} .. {}, {}) and node {} ({} .. {}, {}) \
                         for {both:?}",
                        a.node,
                        t(a.from_us),
                        t(a.to_us),
                        a.end,
                        b.node,
                        t(b.from_us),
                        t(b.to_us),
                        b.end
                    ));
                }
            }
        }
    }
    r
}

pub mod synthetic {
    //! Helpers for the checker's own tests: records at chosen times.
    use super::*;

    /// Records at `t0 + ms` milliseconds.
    pub struct At {
        pub h: History,
        pub t0: u64,
    }

    impl At {
        pub fn new() -> At {
            let h = History::new(7);
            let t0 = h.inner.start_unix_us;
            At { h, t0 }
        }

        fn at(&self, ms: u64, what: What) {
            self.h.push_at(self.t0 + ms * 1000, what);
        }

        pub fn connack(&self, ms: u64, client: &str, node: u64, present: bool) {
            self.at(
                ms,
                What::ConnAck {
                    client: client.into(),
                    node,
                    clean_start: false,
                    session_present: present,
                },
            );
        }

        pub fn suback(&self, ms: u64, client: &str, filter: &str, qos: u8) {
            self.at(
                ms,
                What::SubAck {
                    client: client.into(),
                    filter: filter.into(),
                    granted: Some(qos),
                },
            );
        }

        pub fn sent(&self, ms: u64, client: &str, topic: &str, qos: u8, seq: u64) {
            self.at(
                ms,
                What::Sent {
                    client: client.into(),
                    topic: topic.into(),
                    qos,
                    seq,
                },
            );
        }

        pub fn resent(&self, ms: u64, client: &str, seq: u64) {
            self.at(
                ms,
                What::Resent {
                    client: client.into(),
                    seq,
                },
            );
        }

        pub fn acked(&self, ms: u64, client: &str, seq: u64) {
            self.at(
                ms,
                What::Acked {
                    client: client.into(),
                    seq,
                },
            );
        }

        #[allow(clippy::too_many_arguments)]
        pub fn delivered(
            &self,
            ms: u64,
            client: &str,
            topic: &str,
            qos: u8,
            pkid: u16,
            dup: bool,
            publisher: &str,
            seq: u64,
        ) {
            self.at(
                ms,
                What::Delivered {
                    client: client.into(),
                    topic: topic.into(),
                    qos,
                    pkid,
                    dup,
                    payload: payload(publisher, seq),
                },
            );
        }

        pub fn released(&self, ms: u64, client: &str, pkid: u16) {
            self.at(
                ms,
                What::Released {
                    client: client.into(),
                    pkid,
                },
            );
        }

        pub fn fault(&self, ms: u64, f: Fault) {
            self.at(ms, What::Fault(f));
        }

        /// A tracing text line of `node`'s client log at `ms`.
        pub fn line(&self, ms: u64, rest: &str) -> String {
            let us = self.t0 + ms * 1000;
            format!("{}  INFO {CLIENTS_TARGET}: {rest}\n", rfc3339(us))
        }

        /// Checks what was recorded, with the history ending at `end_ms`.
        pub fn check(&self, logs: &[NodeLog], tolerance: Duration, end_ms: u64) -> Report {
            let log = self.h.lock();
            let mut recs = log.recs.clone();
            let allowed = log.lost_sessions_allowed.clone();
            drop(log);
            recs.sort_by_key(|r| r.at_us);
            check_recs(
                &self.h,
                &recs,
                allowed,
                logs,
                tolerance,
                self.t0 + end_ms * 1000,
            )
        }
    }

    /// Unix µs as tracing prints them.
    pub fn rfc3339(us: u64) -> String {
        let secs = us / 1_000_000;
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        // Civil date from days (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
            rem / 3600,
            rem / 60 % 60,
            rem % 60,
            us % 1_000_000
        )
    }
}
