//! The shard engine: a sans-IO state machine holding everything one shard owns
//! (sessions, connections' protocol state, the local subscription trie) and its
//! replicas of shared read-mostly state (the route table and the retained table).
//!
//! Inputs are method calls with the time as an argument (`connect`,
//! `handle_packet`, `connection_lost`, `handle_mesh`, `tick`, `flushed`);
//! `poll_timeout` says when `tick` next has work.
//! Outputs are bytes appended to each connection's [`ConnOutput`] (whose waker
//! is woken) and messages appended to the per-destination mesh outbox, drained by
//! the driver once per executor tick with [`Engine::drain_outbox`]. The broker's
//! glommio driver and the simulation test are the two drivers.
//!
//! Exists once per shard, created at boot, dropped at shutdown. Does no I/O:
//! what must be durable it records for the shard's store (`persist`), and
//! credentials go to a hook the driver installs (`auth`). Per-publisher
//! back-pressure (`backpressure`), persistent queues with byte budgets and a
//! disk tail (`queue_budget`), shared subscriptions (`shared`), MQTT 5
//! features (`mqtt5`), the quotas on sessions, session expiry and retained
//! messages (`quota`), the admin queries (`admin`), `$SYS` (`sys_probe`) and
//! time-driven work scheduled by deadline (`timers`) are its other parts. In a
//! cluster, the rest of the cluster is one more mesh destination (`remote`),
//! and sessions move between nodes at a takeover (`transfer`: export and
//! import in the store's record format); ownership itself is the driver's
//! (raft claims).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::task::Waker;

use bytes::{Bytes, BytesMut};
use tessera_proto::properties::PublishProperties;
use tessera_proto::topic::{self, TOPIC_LEVELS_MAX};
use tessera_proto::{
    AckProperties, ConnAck, ConnAckProperties, Connect, Disconnect, Encode, Packet,
    ProtocolVersion, PubAck, PubComp, PubRec, PubRel, Publish, QoS, ReasonCode, Str, SubAck,
    Subscribe, UnsubAck, Unsubscribe, Will,
};

use crate::alias::OutboundAliases;
use crate::authz::{Admission, AuthHook};
use crate::mesh::{MeshMsg, ShardId};
use crate::message::{Message, SessionUid};
use crate::probe::Probe;
use crate::session::{
    ConnId, Delivery, InboundQos2, Inflight, InflightState, Session, SessionIdx, ShareKey,
    SubscriptionEntry,
};
use crate::sys::{SysPublisher, SysSettings};
use crate::trie::{ShardSet, Trie, route_match};

mod admin;
mod auth;
mod backpressure;
mod exactly_once;
mod feed_pace;
mod handed_qos2;
mod moved;
mod mqtt5;
mod pace;
mod persist;
mod queue_budget;
mod quota;
mod remote;
mod shared;
mod stored_ghost;
mod sys_probe;
#[cfg(test)]
mod testing;
mod timers;
mod transfer;

pub use feed_pace::{FEED_PACE_HIGH_WATER_DEFAULT, FEED_PACE_SLOW_MS};
pub(crate) use moved::decode_marks as decode_window;
pub use moved::{HOLD_MAX_MS, MOVED_WINDOW_MS};
pub use mqtt5::{Mqtt5Settings, Redirect};
pub use pace::{FORWARD_PACE_SLICE, FORWARD_PACE_SLOW_MS};
pub use quota::{Limit, SessionBudget};
pub use remote::raft_stamp;
pub use shared::SharedStrategy;
pub use transfer::{Imported, TAIL_READ_TAG, TransferError};

/// Named limits of one shard (the broker's `[limits]` config section).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest packet accepted from clients, fixed header included.
    pub packet_size_bytes_max: u32,
    /// Outbound QoS 1/2 deliveries in flight per session (also capped by the
    /// client's Receive Maximum).
    pub inflight_count_max: u16,
    /// Inbound QoS 2 publications awaiting PUBREL per connection: the Receive
    /// Maximum the broker announces.
    pub receive_maximum: u16,
    /// Deliveries queued per session behind the in-flight window.
    pub queued_count_max: usize,
    /// Subscriptions per session; `usize::MAX` for no limit.
    pub subscriptions_count_max: usize,
    /// Levels of a topic name or filter.
    pub topic_levels_max: usize,
    /// Inbound topic aliases per v5 connection (the Topic Alias Maximum announced).
    pub topic_alias_max: u16,
    /// Outbound topic aliases per v5 connection, also capped by the client's
    /// Topic Alias Maximum; 0 sends none.
    pub outbound_topic_alias_max: u16,
    /// MQTT 5 behaviour chosen by the operator (the `[mqtt5]` config section).
    pub mqtt5: Mqtt5Settings,
    /// `$SYS` topics (the `[sys]` config section); off by default here.
    pub sys: SysSettings,
    /// Largest keep alive accepted; v5 clients asking more are told this value.
    pub keep_alive_s_max: u16,
    /// Encoded bytes buffered for one connection before deliveries queue in the
    /// session instead (slow consumers).
    pub write_buffer_bytes_max: usize,
    /// PUBLISH packets per second one connection may send (token bucket with
    /// a one-second burst); beyond it v5 QoS 1/2 get 0x97 and the message is
    /// dropped. 0 = unlimited.
    pub publish_rate_per_s: u32,
    /// PUBLISH payload bytes per second one connection may send, likewise.
    /// 0 = unlimited.
    pub publish_bytes_per_s: u32,
    /// Whether QoS 0 messages are queued for disconnected persistent sessions.
    pub queue_qos0_offline: bool,
    /// What a full session queue does with one more delivery.
    pub queue_overflow: QueueOverflow,
    /// How a shared subscription picks the member for each message.
    pub shared_subscription_strategy: SharedStrategy,
    /// Per-publisher back-pressure (`engine::backpressure`): a QoS 1/2
    /// delivery into a connected session with this many deliveries queued
    /// holds the publisher's PUBACK/PUBREC until the queue drained below half
    /// of it. 0 disables back-pressure; otherwise below `queued_count_max`.
    pub queue_high_water: usize,
    /// Longest a PUBACK/PUBREC is held for back-pressure, milliseconds; then it
    /// is sent and the overflow policy applies at `queued_count_max`. Also how
    /// long a 3.1.1 publisher whose message a full persistent queue refused
    /// keeps its connection (`engine::queue_budget`).
    pub backpressure_hold_ms_max: u64,
    /// Longest the driver waits, before the next slice of a batch another
    /// node forwarded, for a subscriber here that a QoS 0 delivery of it found
    /// behind (`engine::pace`), milliseconds; 0 waits for none.
    pub forward_pace_ms_max: u64,
    // Quotas on state that would otherwise grow without bound (`quota`).
    /// Longest session expiry interval granted, seconds; `u32::MAX` grants
    /// "never" (and keeps 3.1.1 persistent sessions forever).
    pub session_expiry_s_max: u32,
    /// Sessions of the node (the budget `Engine::set_session_budget` shares
    /// is made with it); `usize::MAX` for no limit.
    pub sessions_count_max: usize,
    /// Retained messages; `usize::MAX` for no limit.
    pub retained_count_max: usize,
    /// Bytes of retained topics and payloads; `u64::MAX` for no limit.
    pub retained_bytes_max: u64,
    /// Budget bytes (`session::delivery_cost`) one persistent session may
    /// have queued, in memory and on disk together; a QoS 1/2 delivery beyond
    /// it is refused (`engine::queue_budget`). In `memory` durability it is
    /// all RAM.
    pub queue_bytes_max: u64,
    /// Budget bytes all queues of this shard may hold together; persistent
    /// sessions' deliveries beyond it are refused like beyond
    /// `queue_bytes_max`.
    pub queue_bytes_shard_max: u64,
    /// Deliveries of a stored session's queue kept in memory (the head); the
    /// rest waits in the shard store and is loaded as the head drains.
    pub queue_head_count_max: usize,
}

/// What a full session queue does with one more delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueOverflow {
    /// Drop the oldest queued QoS 0 delivery, or else the oldest delivery.
    #[default]
    DropQos0ThenOldest,
    /// Drop the oldest queued delivery.
    DropOldest,
    /// Drop the new delivery; what is queued stays.
    DropNew,
    /// Disconnect the client (v5: DISCONNECT 0x97 Quota Exceeded); the new
    /// delivery is dropped and the session keeps its queue.
    Disconnect,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            packet_size_bytes_max: 1024 * 1024,
            inflight_count_max: 32,
            receive_maximum: 32,
            queued_count_max: 1000,
            subscriptions_count_max: usize::MAX,
            topic_levels_max: TOPIC_LEVELS_MAX,
            topic_alias_max: 64,
            outbound_topic_alias_max: 16,
            mqtt5: Mqtt5Settings::default(),
            sys: SysSettings::default(),
            keep_alive_s_max: u16::MAX,
            publish_rate_per_s: 0,
            publish_bytes_per_s: 0,
            write_buffer_bytes_max: 256 * 1024,
            queue_qos0_offline: false,
            queue_overflow: QueueOverflow::default(),
            shared_subscription_strategy: SharedStrategy::default(),
            queue_high_water: 250,
            backpressure_hold_ms_max: 2000,
            forward_pace_ms_max: 20,
            session_expiry_s_max: u32::MAX,
            sessions_count_max: usize::MAX,
            retained_count_max: usize::MAX,
            retained_bytes_max: u64::MAX,
            queue_bytes_max: 64 << 20,
            queue_bytes_shard_max: 512 << 20,
            queue_head_count_max: 64,
        }
    }
}

/// Shard-local counters, merged across shards when metrics are scraped.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Connections accepted (CONNACK success).
    pub connects_accepted: u64,
    /// Connections refused at CONNECT.
    pub connects_refused: u64,
    /// PUBLISH packets received from clients.
    pub publishes_received: u64,
    /// PUBLISH packets written to clients.
    pub publishes_sent: u64,
    /// PUBLISH packets refused and not delivered: to `$SYS/...`, or with a
    /// payload that is not the UTF-8 its format indicator announces.
    pub publishes_refused: u64,
    /// Bytes read from clients (counted by the driver).
    pub bytes_received: u64,
    /// Bytes of packets written to clients' output buffers.
    pub bytes_sent: u64,
    /// Publications forwarded to other shards (one per destination shard).
    pub forwards_sent: u64,
    /// Publications handed to the forwarder for other nodes (one per
    /// publication and shard, whatever the number of nodes; `remote`).
    pub remote_forwards_sent: u64,
    /// Publications from other nodes routed by this shard (`remote`).
    pub remote_publishes_received: u64,
    /// Deliveries dropped because a session queue was full.
    pub dropped_queue_full: u64,
    /// QoS 0 deliveries dropped for a disconnected session.
    pub dropped_qos0_offline: u64,
    /// Deliveries dropped because they exceed the client's Maximum Packet Size.
    pub dropped_too_large: u64,
    /// Deliveries dropped because the message expired.
    pub dropped_expired: u64,
    /// Connections closed for a protocol violation.
    pub protocol_errors: u64,
    /// Sessions expired while disconnected.
    pub sessions_expired: u64,
    /// Shared-subscription publications sent to the shard chosen for them.
    pub shared_forwards_sent: u64,
    /// Shared deliveries given back to their group by a member that left.
    pub shared_returned: u64,
    /// Shared-subscription publications no member was left to take.
    pub dropped_shared_no_member: u64,
    /// Shared-subscription publications another node gave this node after
    /// its members left, handed back to the group through the forwarder.
    pub shared_handed_back: u64,
    /// Shared QoS 2 deliveries sent to a member whose session ended before it
    /// answered; they go to no other member [MQTT-4.8.2-5].
    pub dropped_shared_qos2_member_ended: u64,
    /// PUBLISH packets refused because the connection exceeded its publish
    /// rate or bandwidth (v5: 0x97 Quota Exceeded).
    pub publishes_rate_limited: u64,
    /// Re-authentications (AUTH 0x19) that failed and closed the connection.
    pub reauth_failures: u64,
    /// Connections closed because their credentials expired (v5: 0xA0).
    pub credentials_expired: u64,
    /// Deliveries into a session at its queue high-water mark that held the
    /// publisher's PUBACK/PUBREC (counted on the subscriber's shard; one per
    /// congested subscriber a publication reached).
    pub backpressure_acks_held: u64,
    /// Held acknowledgements released by `backpressure_hold_ms_max` rather
    /// than by the subscriber draining its queue.
    pub backpressure_hold_timeouts: u64,
    /// Times a connection stopped being read because it had more held
    /// acknowledgements than the Receive Maximum (counted by the driver).
    pub backpressure_reads_paused: u64,
    /// Slices of forwarded batches that waited for a subscriber here to
    /// catch up (`engine::pace`).
    pub forward_paced: u64,
    /// Such waits that reached `Limits::forward_pace_ms_max`.
    pub forward_pace_timeouts: u64,
    /// Moved-in sessions whose hold for their old node's redirects ran out
    /// (`HOLD_MAX_MS`, or the window's bound of held copies): the old node's path is
    /// taken as gone, and what it still redirects comes after later publications
    /// (`engine` module `moved`: per-publisher order across that move given up).
    pub moved_order_given_up: u64,
    /// QoS 0 publishers (clients, or another shard's stream) paused because
    /// a paced session (a bridge's) was behind (`engine::feed_pace`).
    pub feed_paced: u64,
    /// Paced sessions still behind at their bound: their publishers resumed
    /// and they were not waited for during `FEED_PACE_SLOW_MS`.
    pub feed_pace_timeouts: u64,
    /// Refusals by each configured limit, indexed by [`Limit`] (`quota`).
    pub limit_refusals: [u64; Limit::COUNT],
    /// QoS 1/2 deliveries refused because a persistent session's queue (or
    /// the shard's queues together) reached its byte budget: the publisher
    /// got 0x97 (v5) or no acknowledgement (3.1.1). One per full queue.
    pub queue_refused: u64,
    /// 3.1.1 publishers whose acknowledgement was withheld for a refused
    /// message (each is closed at `backpressure_hold_ms_max`).
    pub queue_refused_acks_held: u64,
    /// 3.1.1 publishers closed because an acknowledgement withheld for a
    /// refused message reached `backpressure_hold_ms_max`.
    pub queue_refused_closes: u64,
    /// Deliveries queued beyond a byte budget because their publisher could
    /// not be told any more (acknowledged before they arrived here: a
    /// cross-shard publication without a token, a will, a retained message
    /// on subscribe). Kept, never dropped.
    pub queue_over_budget: u64,
    /// Deliveries written to a stored session's disk tail instead of memory.
    pub queue_spilled: u64,
    /// Deliveries loaded back from disk tails.
    pub queue_loaded: u64,
    /// Acknowledgements counted down past zero (a route, retained or held
    /// acknowledgement arriving once more than expected): a bug elsewhere,
    /// kept at zero instead of wrapping (see [`count_down`]).
    pub counter_anomalies: u64,
}

/// Counts down `n`, one of the outstanding-acknowledgement counters (route
/// acks of a pending SUBACK, retained and held acknowledgements). Zero stays
/// zero: a wrap would hold the acknowledgement forever, while zero releases
/// it, which is what every waiter wants. Reaching below zero is a programmer's
/// error (an acknowledgement counted twice), but not one worth a panic, which
/// would end the process (`tessera_broker::fatal`) and every client's
/// connection with it: it is counted in `stats.counter_anomalies`
/// (`tessera_ack_underflows_total`) and logged, the first and then every
/// power of two, so a loop cannot flood the log.
pub(crate) fn count_down(n: &mut usize, stats: &mut Stats, shard: ShardId, what: &'static str) {
    if let Some(less) = n.checked_sub(1) {
        *n = less;
        return;
    }
    stats.counter_anomalies += 1;
    if stats.counter_anomalies.is_power_of_two() {
        tracing::warn!(
            shard,
            counter = what,
            anomalies_total = stats.counter_anomalies,
            "an acknowledgement counter went below zero: kept at zero (a bug, please report it)"
        );
    }
}

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT (the will is discarded unless v5 reason 0x04).
    ClientDisconnect,
    /// The socket failed or the peer closed it without DISCONNECT.
    ConnectionLost,
    /// No packet within 1.5 times the keep alive.
    KeepAliveTimeout,
    /// Another connection took over the ClientID.
    TakenOver,
    /// The client broke the protocol; v5 clients are told the reason.
    ProtocolError(ReasonCode),
    /// CONNECT was refused with this CONNACK reason.
    Refused(ReasonCode),
    /// The broker is shutting down.
    ServerShutdown,
    /// An operator kicked the client or expired its session (admin API).
    Administrative,
    /// The node lost touch with its cluster for longer than its session lease
    /// ([`Engine::fence`]); the session stays for a later takeover.
    Fenced,
}

impl CloseReason {
    /// The reason's name in the client log lines (`tessera::clients`).
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::ClientDisconnect => "client_disconnect",
            CloseReason::ConnectionLost => "connection_lost",
            CloseReason::KeepAliveTimeout => "keep_alive_timeout",
            CloseReason::TakenOver => "taken_over",
            CloseReason::ProtocolError(_) => "protocol_error",
            CloseReason::Refused(_) => "refused",
            CloseReason::ServerShutdown => "server_shutdown",
            CloseReason::Administrative => "administrative",
            CloseReason::Fenced => "fenced",
        }
    }

    /// The reason code of a protocol error or a refused CONNECT.
    pub fn code(self) -> Option<ReasonCode> {
        match self {
            CloseReason::ProtocolError(rc) | CloseReason::Refused(rc) => Some(rc),
            _ => None,
        }
    }
}

/// The tracing target of the client log lines: one line when a client's session goes
/// live on this node and one when that connection ends, so an operator (or the fault
/// tests' history checker) can tell which node served a ClientID when. Connect and
/// disconnect only; the broker's filter turns them off unless `log.clients` is set
/// (two synchronous stderr writes per connection slowed a connect storm).
pub const CLIENTS_LOG_TARGET: &str = "tessera::clients";

/// The byte stream the driver writes to one connection's socket.
#[derive(Debug, Default)]
pub struct ConnOutput {
    /// Encoded packets not yet written.
    pub buf: BytesMut,
    /// Set when the connection must close once `buf` is written.
    pub close: Option<CloseReason>,
    /// Woken when `buf` or `close` change.
    pub waker: Option<Waker>,
    /// The store epoch that must be committed before `buf` is written
    /// (`sync` durability; see `engine::persist`). Only ever raised.
    pub durable_epoch: u64,
}

#[derive(Debug)]
struct Conn {
    /// Unique per connection on this shard; detects a reused slot.
    serial: u32,
    session: SessionIdx,
    version: ProtocolVersion,
    keep_alive_s: u16,
    last_packet_ms: u64,
    /// The client's Receive Maximum: outbound in-flight window.
    client_receive_max: u16,
    /// Our cap on that window: `Limits::inflight_count_max`, or what
    /// `Engine::set_window_max` set (a bridge's window is its remote's).
    window_max: u16,
    /// The client's Maximum Packet Size.
    client_packet_size_max: u32,
    /// PUBACK/PUBREC held back, in order: an entry with a token waits until
    /// every shard applied the retained update it acknowledges; entries behind
    /// it wait too, because acknowledgements go out in PUBLISH order
    /// [MQTT-4.6.0-2].
    held_acks: VecDeque<(Option<u64>, Packet)>,
    /// v5 inbound topic aliases, index = alias - 1.
    aliases: Vec<Option<Str>>,
    /// Outbound topic aliases allowed: the client's Topic Alias Maximum capped
    /// by `Limits::outbound_topic_alias_max`; 0 for none.
    out_alias_max: u16,
    /// v5 outbound topic aliases, created on the first aliased delivery.
    out_aliases: Option<Box<OutboundAliases>>,
    /// The client's Request Problem Information: whether acknowledgements may
    /// carry a Reason String and User Properties.
    problem_info: bool,
    /// Enhanced authentication, credential expiry and publish rate limits;
    /// only when the broker has an auth hook or rate limits.
    guard: Option<Box<auth::ConnGuard>>,
    /// Whether the connection ended at the protocol level (driver still flushing).
    ended: bool,
    /// The driver's listener the connection came in on (`Engine::set_listener`),
    /// for the admin listing; the engine gives it no meaning.
    listener: u16,
    out: ConnOutput,
}

/// A SUBACK held until every shard acknowledged the new routes.
#[derive(Debug)]
struct PendingSubAck {
    conn: ConnId,
    acks_missing: usize,
    suback: SubAck,
    retained: Vec<Delivery>,
    /// The SUBSCRIBE's filters, in the order of `suback.reason_codes`.
    filters: Vec<Str>,
    /// For each of `retained`, the index of the filter it was collected for.
    retained_of: Vec<usize>,
    /// Filters whose route the cluster could not commit (`MeshMsg::RouteFailed`),
    /// with the reason code their SUBACK gets.
    failed: Vec<(Str, ReasonCode)>,
}

#[derive(Debug)]
struct RetainedEntry {
    message: Option<Message>,
    stamp: (u64, ShardId),
    /// When a clear was applied; tombstones are dropped after a while.
    cleared_at_ms: u64,
}

/// A v5 will waiting for its Will Delay Interval (section 3.1.3.2.2) while
/// its session lives on without a connection.
#[derive(Debug)]
struct DelayedWill {
    /// When to publish: the delay or the session's end, whichever is first.
    due_ms: u64,
    will: Will,
    origin: SessionUid,
}

/// Tombstones of cleared retained messages are kept this long so a late,
/// older update from another shard cannot resurrect the message.
const RETAINED_TOMBSTONE_MS: u64 = 60_000;

/// The state machine of one shard.
#[derive(Debug)]
pub struct Engine {
    shard: ShardId,
    shard_count: usize,
    limits: Limits,
    /// Boxed sessions: the slab grows by doubling, and slack slots of a boxed
    /// slab cost a pointer, not a whole session.
    sessions: Vec<Option<Box<Session>>>,
    free_sessions: Vec<SessionIdx>,
    by_client_id: HashMap<Str, SessionIdx>,
    session_counter: u64,
    conns: Vec<Option<Conn>>,
    free_conns: Vec<u32>,
    conn_serial: u32,
    /// Local subscriptions: filter -> sessions on this shard.
    subscriptions: Trie<SessionIdx, SubscriptionEntry>,
    /// Route table replica: filter -> shards with subscribers.
    routes: Trie<ShardId, ()>,
    /// Retained table replica: topic -> message, in a trie of topic names
    /// so a wildcard SUBSCRIBE walks only the matching part of it.
    retained: Trie<(), RetainedEntry>,
    retained_clock_ms: u64,
    pending_subacks: HashMap<u64, PendingSubAck>,
    /// Retained publications waiting for every shard: token -> (publisher
    /// connection, acknowledgements missing).
    pending_retains: HashMap<u64, (ConnId, usize)>,
    /// Batches another node forwarded, waiting for the local commits and
    /// shards' `Ack`s of what they delivered: token -> answers missing
    /// (`remote`, "Forwarded batches").
    pending_forwards: HashMap<u64, usize>,
    /// Tokens of forwarded batches whose answer may go out now.
    forwards_done: Vec<u64>,
    /// The forwarded batch being handled, under `sync` durability.
    forward_batch: Option<u64>,
    /// Filters whose route add other shards have not all acknowledged yet, with
    /// the token of the SUBSCRIBE that sent it. Only with several shards.
    routes_unacked: HashMap<Str, u64>,
    /// Pending SUBACKs (tokens) held until another token's routes are acked.
    suback_dependents: HashMap<u64, Vec<u64>>,
    /// Wills of disconnected sessions waiting for their Will Delay Interval;
    /// at most one per session, so bounded by the session count.
    delayed_wills: HashMap<SessionIdx, DelayedWill>,
    /// ClientIDs of sessions destroyed since the driver last took them; `None`
    /// unless the driver asked (`transfer`, a cluster node releases ownership).
    ended_sessions: Option<Vec<Str>>,
    /// The cluster node this engine serves on, for the client log lines
    /// (`CLIENTS_LOG_TARGET`); `None` outside a cluster.
    node_id: Option<u64>,
    /// Sessions handed out to another node and not yet confirmed there (`transfer`).
    moving: HashMap<Str, transfer::Moving>,
    /// Inbound QoS 2 publications of sessions handed to other nodes while their
    /// forward still waited (`handed_qos2`).
    handed: Vec<handed_qos2::Handed>,
    /// Sessions taken in from another node whose disk tail is still arriving.
    importing: HashMap<Str, transfer::Importing>,
    /// Publications around sessions that moved between nodes (`moved`).
    moved: moved::Moved,
    /// Shared subscriptions: the share table replica and local memberships.
    shared: shared::ShareTable,
    next_token: u64,
    outbox: Vec<Vec<MeshMsg>>,
    matches: Vec<(SessionIdx, SubscriptionEntry)>,
    /// The publication being delivered came from another node, which matched it
    /// against routes of this node's earlier life (`MeshMsg::Forwarded`): fresh
    /// subscriptions do not get it. Set around the delivery, like `moved.current`.
    earlier_life: bool,
    /// The routes index of the publication being delivered, when it came from
    /// another node (`MeshMsg::Forwarded::routes_index`; 0: not known). Set around
    /// the delivery, like `earlier_life`.
    routes_index: u64,
    shard_set: ShardSet,
    stats: Stats,
    /// Metrics beyond `stats`: packets by type, CONNECT results, histograms.
    probe: Probe,
    /// The driver's clock in microseconds, set before each batch of input
    /// (`set_now_us`); stamps messages for the publish-to-deliver latency.
    /// Stays 0 under a driver that does not set it (no latency recorded).
    now_us: u64,
    /// When this shard next reports its `$SYS` counters.
    sys_due_ms: u64,
    /// Shard 0 only, with `$SYS` enabled: the reports of every shard.
    sys_publisher: Option<Box<SysPublisher>>,
    /// The broker's authentication and ACL answers; none allows everything.
    auth_hook: Option<std::rc::Rc<dyn AuthHook>>,
    /// The store side, when persistence is on (`persist`).
    persist: Option<Box<persist::PersistState>>,
    /// Per-publisher back-pressure state (`backpressure`).
    bp: backpressure::BackPressure,
    /// Pacing of forwarded batches (`pace`).
    pace: pace::ForwardPace,
    /// Pacing of QoS 0 publishers to a bridge's session (`feed_pace`).
    feed: feed_pace::FeedPace,
    /// The node's session count (`quota`): this engine's own until the
    /// driver shares one with `set_session_budget`.
    session_budget: Arc<SessionBudget>,
    /// Live retained messages of the replica and their bytes (`quota`).
    retained_usage: quota::RetainedUsage,
    /// Budget bytes of every queue head on this shard (memory).
    queue_mem_bytes: u64,
    /// Budget bytes of every disk tail on this shard.
    queue_disk_bytes: u64,
    /// While a publication that can still be refused is routed: whether a
    /// full persistent queue refused it (`queue_budget`).
    refusal: Option<bool>,
    /// While a client's QoS 2 publication is routed: its origin sequence
    /// number (`exactly_once`), 0 for everything else.
    publish_seq: u64,
    /// 3.1.1 connections holding an acknowledgement for a refused message,
    /// with when they are closed, in deadline order (`queue_budget`).
    refused_holds: VecDeque<(u64, ConnId)>,
    /// Deadlines of time-driven work (`timers`).
    timers: timers::Timers,
    /// Connections not ended, kept so counting them is O(1).
    live_conns: usize,
    /// In a cluster, the mesh id of the other nodes (`remote`): `shard_count`.
    remote: Option<ShardId>,
}

fn delivery_qos(published: QoS, granted: QoS) -> QoS {
    published.min(granted)
}

impl Engine {
    /// The engine of shard `shard` of `shard_count`.
    pub fn new(shard: ShardId, shard_count: usize, limits: Limits) -> Engine {
        assert!(
            usize::from(shard) < shard_count,
            "shard {shard} of {shard_count}"
        );
        assert!(limits.inflight_count_max >= 1 && limits.receive_maximum >= 1);
        assert!(
            limits.queue_high_water == 0 || limits.queue_high_water < limits.queued_count_max,
            "queue high water {} not below the queue limit {}",
            limits.queue_high_water,
            limits.queued_count_max
        );
        let limits_sessions_max = limits.sessions_count_max;
        let sys_publisher = (shard == 0 && limits.sys.interval_ms > 0)
            .then(|| Box::new(SysPublisher::new(shard_count)));
        Engine {
            shard,
            shard_count,
            limits,
            sessions: Vec::new(),
            free_sessions: Vec::new(),
            by_client_id: HashMap::new(),
            session_counter: 0,
            conns: Vec::new(),
            free_conns: Vec::new(),
            conn_serial: 0,
            subscriptions: Trie::new(),
            routes: Trie::new(),
            retained: Trie::new(),
            retained_clock_ms: 0,
            pending_subacks: HashMap::new(),
            pending_retains: HashMap::new(),
            pending_forwards: HashMap::new(),
            forwards_done: Vec::new(),
            forward_batch: None,
            routes_unacked: HashMap::new(),
            suback_dependents: HashMap::new(),
            delayed_wills: HashMap::new(),
            ended_sessions: None,
            node_id: None,
            moving: HashMap::new(),
            handed: Vec::new(),
            importing: HashMap::new(),
            moved: moved::Moved::default(),
            shared: shared::ShareTable::new(shard),
            next_token: 1,
            outbox: (0..shard_count).map(|_| Vec::new()).collect(),
            matches: Vec::new(),
            earlier_life: false,
            routes_index: 0,
            shard_set: ShardSet::default(),
            stats: Stats::default(),
            probe: Probe::default(),
            now_us: 0,
            sys_due_ms: 0,
            sys_publisher,
            auth_hook: None,
            persist: None,
            bp: backpressure::BackPressure::new(shard_count),
            pace: pace::ForwardPace::default(),
            feed: feed_pace::FeedPace::default(),
            session_budget: Arc::new(SessionBudget::new(limits_sessions_max)),
            retained_usage: quota::RetainedUsage::default(),
            queue_mem_bytes: 0,
            queue_disk_bytes: 0,
            refusal: None,
            publish_seq: 0,
            refused_holds: VecDeque::new(),
            timers: timers::Timers::default(),
            live_conns: 0,
            remote: None,
        }
    }

    /// This shard's index.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Metrics beyond the counters (see [`crate::probe`]).
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// The probe, for the driver's own events (accepted sockets, CONNECTs it
    /// refused itself, persistence commits).
    pub fn probe_mut(&mut self) -> &mut Probe {
        &mut self.probe
    }

    /// Sets the clock used for publish-to-deliver latency: broker-relative
    /// microseconds from a clock every shard shares. The driver calls it once
    /// per batch of input, not per message; the engine never reads a clock.
    pub fn set_now_us(&mut self, now_us: u64) {
        self.now_us = now_us;
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Connected clients.
    pub fn connection_count(&self) -> usize {
        self.live_conns
    }

    /// Sessions, connected or not.
    pub fn session_count(&self) -> usize {
        self.by_client_id.len()
    }

    /// Subscriptions on this shard, shared ones included.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len() + self.shared.members_len()
    }

    /// Retained messages (this shard's replica).
    pub fn retained_count(&self) -> usize {
        self.retained_usage.count()
    }

    /// The output of a connection, for the driver to write.
    pub fn output(&mut self, conn: ConnId) -> Option<&mut ConnOutput> {
        self.slot_mut(conn).map(|c| &mut c.out)
    }

    /// Takes the mesh messages produced since the last call, per destination.
    pub fn drain_outbox(&mut self, mut f: impl FnMut(ShardId, Vec<MeshMsg>)) {
        for (to, batch) in self.outbox.iter_mut().enumerate() {
            if !batch.is_empty() {
                f(to as ShardId, std::mem::take(batch));
            }
        }
    }

    /// Whether any mesh message waits in the outbox.
    pub fn has_outbox(&self) -> bool {
        self.outbox.iter().any(|b| !b.is_empty())
    }

    // ------------------------------------------------------------------
    // Connection lifecycle

    /// Accepts a decoded CONNECT whose ClientID this shard owns. `assigned` is
    /// true when the ClientID was empty and the driver chose it. Returns the
    /// connection; its output holds the CONNACK, and `close` is set when the
    /// CONNECT was refused.
    pub fn connect(&mut self, now_ms: u64, connect: Connect, assigned: bool) -> ConnId {
        self.connect_admitted(now_ms, connect, assigned, Admission::default())
    }

    /// [`Engine::connect`] for a connection the driver authenticated: the
    /// CONNECT's `username` is the authenticated user, and `admission` says
    /// which enhanced authentication succeeded and when the credentials end.
    pub fn connect_admitted(
        &mut self,
        now_ms: u64,
        connect: Connect,
        assigned: bool,
        admission: Admission,
    ) -> ConnId {
        let conn = self.new_conn(now_ms, &connect);
        let version = connect.version;
        let admission_epoch = admission.claim_epoch;
        self.probe
            .packet_received(tessera_proto::PacketType::Connect);
        let refuse = self
            .connect_refusal(&connect, assigned)
            .or_else(|| self.admission_refusal(&connect, &admission))
            .or_else(|| self.session_refusal(&connect.client_id));
        if let Some(rc) = refuse {
            self.stats.connects_refused += 1;
            self.probe.connect_result(rc);
            let ack = ConnAck {
                session_present: false,
                reason_code: rc,
                properties: self.refusal_properties(rc),
            };
            self.write_packet(conn, &Packet::ConnAck(ack));
            self.end_conn(now_ms, conn, CloseReason::Refused(rc));
            return conn;
        }

        // Takeover and session resumption.
        let existing = self.by_client_id.get(&connect.client_id).copied();
        if let Some(idx) = existing
            && let Some(old) = self.session(idx).conn
        {
            if self.conn(old).version.is_v5() {
                self.write_packet(
                    old,
                    &Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver)),
                );
            }
            self.end_conn(now_ms, old, CloseReason::TakenOver);
        }
        // Ending the old connection may have destroyed a non-persistent session.
        let existing = self.by_client_id.get(&connect.client_id).copied();
        // A delayed will is dropped when the session resumes within the delay
        // [MQTT-3.1.3-9] and published when Clean Start ends the session.
        if let Some(idx) = existing
            && let Some(d) = self.delayed_wills.remove(&idx)
        {
            self.persist_delayed_will(idx, None);
            if connect.clean_start {
                self.publish_will(now_ms, d.will, d.origin);
            }
        }
        let (idx, session_present) = match existing {
            Some(idx) if !connect.clean_start => (idx, true),
            Some(idx) => {
                self.destroy_session(now_ms, idx);
                (self.new_session(&connect), false)
            }
            None => (self.new_session(&connect), false),
        };

        let requested_expiry = if version.is_v5() {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry = self.granted_expiry(requested_expiry);
        let keep_alive_max = self.limits.keep_alive_s_max;
        let server_keep_alive =
            (version.is_v5() && connect.keep_alive > keep_alive_max).then_some(keep_alive_max);
        {
            let c = self.conn_mut(conn);
            c.session = idx;
            if let Some(k) = server_keep_alive {
                c.keep_alive_s = k;
            }
        }
        self.arm_keep_alive(conn);
        let s = self.session_mut(idx);
        s.conn = Some(conn);
        s.version = version;
        s.expiry_interval_s = expiry;
        s.disconnected_at_ms = None;
        s.will = connect.will.as_ref().map(|w| Box::new(compact_will(w)));
        let (auth_method, auth_data) = self.attach_auth(now_ms, conn, idx, &connect, admission);
        // Stored before the CONNACK is written, so the CONNACK waits for it.
        self.persist_session(idx);
        tracing::info!(
            target: CLIENTS_LOG_TARGET,
            client_id = connect.client_id.as_str(),
            node = self.node_id,
            shard = self.shard,
            conn = %conn,
            epoch = admission_epoch,
            session_present,
            "client live"
        );

        let mut props = ConnAckProperties::default();
        if version.is_v5() {
            props.receive_maximum = Some(self.limits.receive_maximum);
            // At the protocol's own maximum the property is left out (absent:
            // no limit beyond the remaining-length encoding, MQTT 5 3.2.2.3.6).
            // Sent as 268,435,460, paho-mqtt 2.x refuses the whole CONNACK as
            // malformed: it checks the value against 268,435,455.
            props.maximum_packet_size = (self.limits.packet_size_bytes_max
                < tessera_proto::PACKET_BYTES_MAX as u32)
                .then_some(
                    self.limits
                        .packet_size_bytes_max
                        .min(tessera_proto::VARINT_MAX),
                );
            props.topic_alias_maximum = Some(self.limits.topic_alias_max);
            props.retain_available = Some(true);
            props.wildcard_subscription_available = Some(true);
            props.subscription_identifiers_available = Some(true);
            props.shared_subscription_available = Some(true);
            props.server_keep_alive = server_keep_alive;
            // A granted expiry below the requested one is sent: the client
            // then uses the server's value (section 3.2.2.3.2).
            props.session_expiry_interval = (expiry != requested_expiry).then_some(expiry);
            if assigned {
                props.assigned_client_identifier = Some(connect.client_id.clone());
            }
            props.response_information = self.response_information(&connect);
            props.authentication_method = auth_method;
            props.authentication_data = auth_data;
        }
        let ack = ConnAck {
            session_present,
            reason_code: ReasonCode::Success,
            properties: props,
        };
        self.write_packet(conn, &Packet::ConnAck(ack));
        self.stats.connects_accepted += 1;
        self.probe.connect_result(ReasonCode::Success);
        self.shared_member_online(idx);
        self.resend_inflight(now_ms, idx);
        self.pump(now_ms, idx);
        conn
    }

    fn connect_refusal(&self, connect: &Connect, assigned: bool) -> Option<ReasonCode> {
        if let Some(rc) = self.redirect_refusal() {
            return Some(rc);
        }
        // [MQTT-3.1.3-8]: 3.1.1 refuses an empty ClientID with Clean Session 0.
        if assigned && !connect.version.is_v5() && !connect.clean_start {
            return Some(ReasonCode::ClientIdentifierNotValid);
        }
        if let Some(w) = &connect.will
            && topic::validate_topic_name(&w.topic, self.limits.topic_levels_max).is_err()
        {
            return Some(ReasonCode::TopicNameInvalid);
        }
        connect.will.as_ref().and_then(mqtt5::will_refusal)
    }

    fn new_conn(&mut self, now_ms: u64, connect: &Connect) -> ConnId {
        self.conn_serial = self.conn_serial.wrapping_add(1);
        let serial = self.conn_serial;
        let conn = Conn {
            serial: self.conn_serial,
            session: SessionIdx::MAX,
            version: connect.version,
            keep_alive_s: connect.keep_alive,
            last_packet_ms: now_ms,
            client_receive_max: connect.properties.receive_maximum.unwrap_or(u16::MAX),
            window_max: self.limits.inflight_count_max,
            client_packet_size_max: connect.properties.maximum_packet_size.unwrap_or(u32::MAX),
            aliases: Vec::new(),
            out_alias_max: connect
                .properties
                .topic_alias_maximum
                .unwrap_or(0)
                .min(self.limits.outbound_topic_alias_max)
                .min(u16::MAX - 1),
            out_aliases: None,
            problem_info: connect.properties.request_problem_information != Some(false),
            held_acks: VecDeque::new(),
            guard: None,
            ended: false,
            listener: 0,
            out: ConnOutput::default(),
        };
        let slot = match self.free_conns.pop() {
            Some(slot) => {
                self.conns[slot as usize] = Some(conn);
                slot
            }
            None => {
                self.conns.push(Some(conn));
                (self.conns.len() - 1) as u32
            }
        };
        self.live_conns += 1;
        ConnId { slot, serial }
    }

    fn new_session(&mut self, connect: &Connect) -> SessionIdx {
        // Compact: the decoded id is a view into the CONNECT frame.
        self.new_session_for(connect.client_id.compact(), connect.version)
    }

    fn new_session_for(&mut self, client_id: Str, version: ProtocolVersion) -> SessionIdx {
        // A copy handed out to another node and never confirmed is superseded: its
        // records go before the new session writes any.
        self.drop_moving(&client_id);
        self.forget_import(&client_id);
        self.drop_ghost(&client_id);
        self.session_counter += 1;
        let uid = SessionUid::new(self.shard, self.session_counter);
        let s = Session::new(client_id.clone(), uid, version);
        let idx = match self.free_sessions.pop() {
            Some(i) => {
                self.sessions[i as usize] = Some(Box::new(s));
                i
            }
            None => {
                self.sessions.push(Some(Box::new(s)));
                (self.sessions.len() - 1) as SessionIdx
            }
        };
        self.by_client_id.insert(client_id, idx);
        self.session_created();
        idx
    }

    fn destroy_session(&mut self, now_ms: u64, idx: SessionIdx) {
        let mut s = self.sessions[idx as usize]
            .take()
            .expect("destroying a live session");
        debug_assert!(s.conn.is_none());
        self.queue_mem_bytes -= s.queue.head_bytes();
        self.queue_disk_bytes -= s.queue.disk_bytes();
        for filter in s.subscriptions.keys() {
            self.remove_local_subscription(filter, idx);
        }
        self.by_client_id.remove(&s.client_id);
        self.arrival_gone(&s.client_id, s.uid);
        if let Some(ended) = &mut self.ended_sessions {
            ended.push(s.client_id.clone());
        }
        self.session_gone();
        self.free_sessions.push(idx);
        self.bp_session_offline(now_ms, idx);
        self.persist_session_destroyed(&s);
        // Last, once its memberships are gone, so no group picks it again.
        self.shared_session_ended(now_ms, &mut s);
    }

    /// The socket of `conn` failed or closed without DISCONNECT.
    pub fn connection_lost(&mut self, now_ms: u64, conn: ConnId) {
        self.end_conn(now_ms, conn, CloseReason::ConnectionLost);
    }

    /// Ends the protocol side of a connection: publishes the will when the end is
    /// abnormal, detaches the session and destroys it when it does not persist.
    /// Idempotent. The driver still flushes the output and then calls `release`.
    fn end_conn(&mut self, now_ms: u64, conn: ConnId, reason: CloseReason) {
        let Some(c) = self.slot_mut(conn) else {
            return;
        };
        if c.ended {
            return;
        }
        c.ended = true;
        self.live_conns -= 1;
        let c = self.slot_mut(conn).expect("checked above");
        if c.out.close.is_none() {
            c.out.close = Some(reason);
        }
        if let Some(w) = c.out.waker.take() {
            w.wake();
        }
        let idx = c.session;
        self.pace_wake();
        self.feed_conn_ended(conn, idx);
        if idx == SessionIdx::MAX {
            return; // refused at CONNECT: no session attached
        }
        let s = self.session_mut(idx);
        if s.conn != Some(conn) {
            return;
        }
        s.conn = None;
        s.disconnected_at_ms = Some(now_ms);
        let s = self.session(idx);
        tracing::info!(
            target: CLIENTS_LOG_TARGET,
            client_id = s.client_id.as_str(),
            node = self.node_id,
            shard = self.shard,
            conn = %conn,
            reason = %reason.name(),
            code = reason.code().map(tracing::field::debug),
            "client ended"
        );
        self.bp_session_offline(now_ms, idx);
        let s = self.session_mut(idx);
        let will = s.will.take().map(|w| *w);
        let persistent = s.is_persistent();
        let (origin, expiry_s) = (s.uid, s.expiry_interval_s);
        let publish_will = !matches!(reason, CloseReason::ClientDisconnect);
        if let (Some(w), true) = (will, publish_will) {
            // A v5 Will Delay Interval defers the will while the session lives:
            // until the delay passes or the session ends, whichever is first.
            let delay_s = w.properties.will_delay_interval.unwrap_or(0).min(expiry_s);
            if persistent && delay_s > 0 {
                let due_ms = now_ms + u64::from(delay_s) * 1000;
                let d = DelayedWill {
                    due_ms,
                    will: w,
                    origin,
                };
                self.persist_delayed_will(idx, Some(&d));
                self.delay_will(idx, d);
            } else {
                self.publish_will(now_ms, w, origin);
            }
        }
        if persistent {
            self.arm_session_expiry(idx);
            self.persist_session(idx);
            self.shared_member_offline(now_ms, idx);
            if self
                .session(idx)
                .subscriptions
                .keys()
                .any(|f| topic::is_shared(f))
            {
                self.persist_rewrite_deliveries(idx);
            }
        } else {
            self.destroy_session(now_ms, idx);
        }
    }

    /// Publishes a will message now.
    fn publish_will(&mut self, now_ms: u64, w: Will, origin: SessionUid) {
        let msg = Message {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            properties: will_properties(&w.properties),
            expires_at_ms: w
                .properties
                .message_expiry_interval
                .map(|s| now_ms + u64::from(s) * 1000),
            origin: Some(origin),
            received_us: self.now_us,
        };
        // A will can be published while a client's publication is routed (a
        // full queue's `disconnect` policy ends a connection): its
        // deliveries are not that publication's to refuse.
        let routing = self.refusal.take();
        self.publish(now_ms, msg);
        self.refusal = routing;
    }

    /// Holds a will for its Will Delay Interval (section 3.1.3.2.2).
    fn delay_will(&mut self, idx: SessionIdx, d: DelayedWill) {
        self.arm_will(idx, d.due_ms);
        self.delayed_wills.insert(idx, d);
    }

    /// Frees the slot of a connection the driver has finished with. Ends it first
    /// if the protocol side is still open (e.g. the socket died).
    pub fn release(&mut self, now_ms: u64, conn: ConnId) {
        self.end_conn(now_ms, conn, CloseReason::ConnectionLost);
        if self.slot(conn).is_some() {
            self.conns[conn.slot as usize] = None;
            self.free_conns.push(conn.slot);
        }
    }

    /// Whether the protocol side of `conn` has ended (the driver should stop
    /// reading and close after flushing).
    pub fn is_ended(&self, conn: ConnId) -> bool {
        self.slot(conn).is_none_or(|c| c.ended)
    }

    /// The protocol version of a connection.
    pub fn version(&self, conn: ConnId) -> Option<ProtocolVersion> {
        self.slot(conn).map(|c| c.version)
    }

    /// The driver wrote the connection's buffer to the socket: move queued
    /// deliveries into the freed space.
    pub fn flushed(&mut self, now_ms: u64, conn: ConnId) {
        let Some(c) = self.slot(conn) else {
            return;
        };
        if !c.ended && c.session != SessionIdx::MAX {
            let idx = c.session;
            self.pump(now_ms, idx);
        }
        self.pace_wake();
    }

    /// Ends every connection for shutdown (v5 clients get DISCONNECT 0x8B).
    pub fn shutdown(&mut self, now_ms: u64) {
        let live: Vec<ConnId> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(slot, c)| {
                let c = c.as_ref().filter(|c| !c.ended)?;
                Some(ConnId {
                    slot: slot as u32,
                    serial: c.serial,
                })
            })
            .collect();
        for conn in live {
            if self.conn(conn).version.is_v5() {
                self.write_packet(
                    conn,
                    &Packet::Disconnect(Disconnect::new(ReasonCode::ServerShuttingDown)),
                );
            }
            // A shutdown is not the client's fault: wills stay unpublished only
            // for a clean DISCONNECT, so treat it like the server closing.
            self.end_conn(now_ms, conn, CloseReason::ServerShutdown);
        }
        // Without persistence, sessions live in memory only, so they all end
        // here: delayed wills are due now (section 3.1.3.2.2). With it, the
        // sessions and their delayed wills outlive the restart.
        if self.wills_survive_shutdown() {
            return;
        }
        let mut delayed: Vec<(SessionIdx, DelayedWill)> = self.delayed_wills.drain().collect();
        delayed.sort_unstable_by_key(|(idx, _)| *idx);
        for (_, d) in delayed {
            self.publish_will(now_ms, d.will, d.origin);
        }
    }

    // ------------------------------------------------------------------
    // Packets from clients

    /// Handles one packet decoded from connection `conn`.
    pub fn handle_packet(&mut self, now_ms: u64, conn: ConnId, packet: Packet) {
        let Some(c) = self.slot_mut(conn) else {
            return;
        };
        if c.ended {
            return;
        }
        c.last_packet_ms = now_ms;
        let idx = c.session;
        self.probe.packet_received(packet.packet_type());
        match packet {
            Packet::Publish(p) => self.on_publish(now_ms, conn, idx, p),
            Packet::PubAck(p) => self.on_puback(now_ms, idx, p.packet_id),
            Packet::PubRec(p) => self.on_pubrec(now_ms, conn, idx, p),
            Packet::PubRel(p) => self.on_pubrel(conn, idx, p.packet_id),
            Packet::PubComp(p) => self.on_pubcomp(now_ms, idx, p.packet_id),
            Packet::Subscribe(s) => self.on_subscribe(now_ms, conn, idx, s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(conn, idx, u),
            Packet::PingReq => self.write_packet(conn, &Packet::PingResp),
            Packet::Disconnect(d) => self.on_disconnect(now_ms, conn, idx, d),
            // A second CONNECT [MQTT-3.1.0-2] or server-only packets.
            Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => self.protocol_error(now_ms, conn, ReasonCode::ProtocolError),
            Packet::Auth(a) => self.on_auth(now_ms, conn, idx, a),
        }
    }

    /// The codec rejected the connection's input: tell a v5 client why and end.
    /// A packet over the size limit is also counted as a limit refusal.
    pub fn decode_error(&mut self, now_ms: u64, conn: ConnId, reason: ReasonCode) {
        if reason == ReasonCode::PacketTooLarge
            && let Some(c) = self.slot(conn)
        {
            let client_id = self
                .sessions
                .get(c.session as usize)
                .and_then(Option::as_ref)
                .map(|s| s.client_id.clone());
            self.limit_refused(Limit::PacketSize, client_id.as_ref());
        }
        self.protocol_error(now_ms, conn, reason);
    }

    fn protocol_error(&mut self, now_ms: u64, conn: ConnId, reason: ReasonCode) {
        self.stats.protocol_errors += 1;
        if self.conn(conn).version.is_v5() {
            self.write_packet(conn, &Packet::Disconnect(Disconnect::new(reason)));
        }
        self.end_conn(now_ms, conn, CloseReason::ProtocolError(reason));
    }

    fn on_publish(&mut self, now_ms: u64, conn: ConnId, idx: SessionIdx, mut p: Publish) {
        self.stats.publishes_received += 1;
        let version = self.conn(conn).version;
        // Resolve v5 topic aliases (section 3.3.2.3.4).
        if let Some(alias) = p.properties.topic_alias.take() {
            let max = self.limits.topic_alias_max;
            if alias > max {
                return self.protocol_error(now_ms, conn, ReasonCode::TopicAliasInvalid);
            }
            let slot = usize::from(alias - 1);
            let c = self.conn_mut(conn);
            if c.aliases.len() <= slot {
                c.aliases.resize(slot + 1, None);
            }
            if p.topic.is_empty() {
                match &c.aliases[slot] {
                    Some(t) => p.topic = t.clone(),
                    None => return self.protocol_error(now_ms, conn, ReasonCode::ProtocolError),
                }
            } else {
                c.aliases[slot] = Some(p.topic.compact()); // not a view pinning the read buffer
            }
        }
        if topic::validate_topic_name(&p.topic, self.limits.topic_levels_max).is_err() {
            return self.protocol_error(now_ms, conn, ReasonCode::TopicNameInvalid);
        }
        if let Some(rc) = mqtt5::publish_refusal(&p, version)
            .or_else(|| self.publish_gate(now_ms, conn, idx, &p))
            .or_else(|| self.retained_publish_refusal(idx, &p, version))
        {
            return self.refuse_publish(now_ms, conn, &p, rc);
        }
        let mut seq = 0;
        // The original's id when this re-sent PUBLISH is routed here in its place
        // (`handed_qos2`).
        let mut again = None;
        // Where the store op of a QoS 2 packet id is, to add the publication's id.
        let mut inbound_op = None;
        if p.qos == QoS::ExactlyOnce {
            let receive_maximum = self.inbound_qos2_max(version);
            let s = self.session_mut(idx);
            if let Some(pos) = s.inbound_position(p.packet_id) {
                match s.inbound_qos2[pos].pending.as_deref() {
                    // The node that held the original forgot it: this copy is
                    // routed from here with the original's id, as a new one.
                    Some(w) if w.lost => {
                        again = Some(w.id);
                        s.inbound_qos2.swap_remove(pos);
                    }
                    // A re-sent PUBLISH before PUBREL: acknowledged, delivered
                    // again only where a crash may have lost it.
                    _ => return self.on_publish_again(now_ms, conn, idx, pos, p),
                }
            }
            if s.inbound_qos2.len() >= receive_maximum {
                return self.protocol_error(now_ms, conn, ReasonCode::ReceiveMaximumExceeded);
            }
            s.inbound_qos2.push(InboundQos2::new(p.packet_id));
            seq = self.origin_seq_for(idx);
            let mark = self.store_mark();
            inbound_op = self.persist_inbound(idx, p.packet_id, Some((seq, None)), None);
            if self.store_mark() != mark {
                // The PUBREC waits for the id's commit, whenever it is written.
                self.hold_output_for_commit(conn);
            }
        }
        let uid = self.session(idx).uid;
        let (qos, packet_id) = (p.qos, p.packet_id);
        self.probe.published(qos);
        let mut msg = message_from_publish(now_ms, p, uid, version);
        msg.received_us = self.now_us;
        // A retained QoS 1/2 publication is acknowledged only once every shard
        // applied it, so a subscriber anywhere sees what the publisher saw
        // acknowledged.
        // Under sync durability, shards this publication is forwarded to
        // acknowledge it after their commit, with the same token.
        // In a cluster, nodes that get it acknowledge it with the token too.
        let token = (qos != QoS::AtMostOnce
            && ((self.shard_count > 1 && (msg.retain || self.durable_forwards()))
                || self.remote.is_some()))
        .then(|| {
            let token = self.next_token;
            self.next_token += 1;
            self.pending_retains.insert(token, (conn, 0));
            token
        });
        let key = shared::client_key(self.session(idx).client_id.as_bytes());
        let mark = self.store_mark();
        // Deliveries into congested queues hold the acknowledgement too.
        self.bp_begin_local(conn, idx, qos, token);
        // A full persistent queue refuses it rather than drop an older one.
        self.refusal = (qos != QoS::AtMostOnce).then_some(false);
        self.publish_seq = seq;
        self.feed.source = feed_pace::FeedSource::Local(conn);
        self.moved.again = again;
        self.moved.given = None;
        self.publish_acked(now_ms, msg, token, key);
        self.moved.again = None;
        let given = self.moved.given.take();
        if let (Some(op), Some(id)) = (inbound_op, given) {
            // Stored with the packet id (same commit): a re-send after a crash
            // goes out with it (`exactly_once`).
            self.persist_inbound_id(op, id);
        }
        self.feed.source = feed_pace::FeedSource::None;
        self.publish_seq = 0;
        let refused = self.refusal.take() == Some(true);
        let token = self.bp_end_local().or(token);
        if self.store_mark() != mark {
            // Something was stored for this publication here: its
            // acknowledgement waits for the commit.
            self.hold_output_for_commit(conn);
        }
        let token = token.filter(|t| {
            let waits = self.pending_retains.get(t).is_some_and(|(_, n)| *n > 0);
            if !waits {
                self.pending_retains.remove(t);
            }
            waits
        });
        if qos == QoS::ExactlyOnce {
            self.note_inbound_wait(idx, packet_id, token, given);
        }
        let ack = match qos {
            QoS::AtMostOnce => return,
            QoS::AtLeastOnce => Packet::PubAck(PubAck::new(packet_id)),
            QoS::ExactlyOnce => Packet::PubRec(PubRec::new(packet_id)),
        };
        if refused {
            self.send_refused_ack(now_ms, conn, ack, token);
        } else {
            self.send_ack(conn, ack, token);
        }
    }

    fn on_puback(&mut self, now_ms: u64, idx: SessionIdx, packet_id: u16) {
        let s = self.session_mut(idx);
        if let Some(pos) = s.inflight_position(packet_id)
            && s.inflight()[pos].state == InflightState::Published
            && s.inflight()[pos].delivery.qos == QoS::AtLeastOnce
        {
            let i = s.remove_inflight(pos).expect("position exists");
            self.persist_delivery_gone(idx, i.delivery.seq);
            self.pump(now_ms, idx);
        }
    }

    fn on_pubrec(&mut self, now_ms: u64, conn: ConnId, idx: SessionIdx, p: PubRec) {
        let s = self.session_mut(idx);
        let Some(pos) = s.inflight_position(p.packet_id) else {
            let mut rel = PubRel::new(p.packet_id);
            rel.reason_code = ReasonCode::PacketIdentifierNotFound;
            return self.write_packet(conn, &Packet::PubRel(rel));
        };
        if p.reason_code.is_error() {
            // v5: the receiver refused the message; the exchange ends here.
            let i = s.remove_inflight(pos).expect("position exists");
            self.persist_delivery_gone(idx, i.delivery.seq);
            return self.pump(now_ms, idx);
        }
        s.set_inflight_state(pos, InflightState::Released);
        if s.inflight()[pos].delivery.seq != 0 {
            let d = s.inflight()[pos].delivery.clone();
            self.persist_released(idx, &d, p.packet_id);
        }
        self.write_packet(conn, &Packet::PubRel(PubRel::new(p.packet_id)));
    }

    fn on_pubrel(&mut self, conn: ConnId, idx: SessionIdx, packet_id: u16) {
        let s = self.session_mut(idx);
        let mut comp = PubComp::new(packet_id);
        match s.inbound_position(packet_id) {
            Some(pos) => {
                s.inbound_qos2.swap_remove(pos);
                self.persist_inbound(idx, packet_id, None, None);
            }
            None => comp.reason_code = ReasonCode::PacketIdentifierNotFound,
        }
        self.write_packet(conn, &Packet::PubComp(comp));
    }

    fn on_pubcomp(&mut self, now_ms: u64, idx: SessionIdx, packet_id: u16) {
        let s = self.session_mut(idx);
        if let Some(pos) = s.inflight_position(packet_id)
            && s.inflight()[pos].state == InflightState::Released
        {
            let i = s.remove_inflight(pos).expect("position exists");
            self.persist_delivery_gone(idx, i.delivery.seq);
            self.pump(now_ms, idx);
        }
    }

    fn on_subscribe(&mut self, now_ms: u64, conn: ConnId, idx: SessionIdx, sub: Subscribe) {
        let version = self.conn(conn).version;
        let sub_id = sub.properties.subscription_identifier;
        let mut reason_codes = Vec::with_capacity(sub.subscriptions.len());
        let mut new_routes = 0usize;
        let mut waits_on: Vec<u64> = Vec::new();
        let token = self.next_token;
        let mut retained = Vec::new();
        let mut retained_of = Vec::new();
        for (i, s) in sub.subscriptions.iter().enumerate() {
            let filter = &s.filter;
            // `$share/{group}/{filter}` (section 4.8.2), for 3.1.1 clients too:
            // the share name is checked, then the filter as any filter.
            let shared = topic::is_shared(filter);
            let plain = match topic::parse_shared(filter) {
                Ok(Some(sf)) => Some(sf.filter),
                Ok(None) => Some(filter.as_str()),
                Err(_) => None,
            };
            let refusal = if plain.is_none_or(|f| {
                topic::validate_topic_filter(f, self.limits.topic_levels_max).is_err()
            }) {
                Some(ReasonCode::TopicFilterInvalid)
            } else if let Some(rc) = self.subscribe_refusal(idx, plain.unwrap_or(filter)) {
                Some(rc)
            } else {
                let sess = self.session(idx);
                let exists = sess.subscriptions.contains_key(filter);
                let over =
                    !exists && sess.subscriptions.len() >= self.limits.subscriptions_count_max;
                if over {
                    let client_id = sess.client_id.clone();
                    self.limit_refused(quota::Limit::Subscriptions, Some(&client_id));
                }
                over.then_some(ReasonCode::QuotaExceeded)
            };
            if let Some(rc) = refusal {
                reason_codes.push(rc);
                continue;
            }
            // Fresh (in a cluster) unless a subscription to the filter on this
            // shard is not: then the filter's route may be one of the node's
            // earlier life (it stays in the raft log), which this SUBSCRIBE does
            // not wait for, so it must get what other nodes match against it.
            let fresh = self.remote.is_some()
                && !shared
                && self.subscriptions.first(filter).is_none_or(|e| e.fresh);
            let entry = SubscriptionEntry {
                options: s.options,
                subscription_id: sub_id,
                fresh,
            };
            let existed = self
                .session_mut(idx)
                .subscriptions
                .insert(filter.compact(), entry)
                .is_some();
            let new_route = if shared {
                self.shared_subscribe(idx, filter, entry, token)
            } else {
                let before = self.subscriptions.filter_len(filter);
                self.subscriptions.insert(filter, idx, entry);
                if before == 0 {
                    self.route_add(filter.clone(), Some(token));
                }
                before == 0
            };
            if new_route {
                new_routes += 1;
                if self.route_peers() > 0 {
                    self.routes_unacked.insert(filter.clone(), token);
                }
            } else if let Some(&earlier) = self.routes_unacked.get(filter)
                && earlier != token
                && !waits_on.contains(&earlier)
            {
                // Another session's SUBSCRIBE added this filter's route and
                // other shards may not know it yet: a message published there
                // after this SUBACK would miss this shard.
                waits_on.push(earlier);
            }
            reason_codes.push(match s.options.qos {
                QoS::AtMostOnce => ReasonCode::Success,
                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
            });
            // Retained messages for the new subscription (section 3.3.1.3),
            // never for a shared one (section 3.8.4).
            let send_retained = !shared
                && match s.options.retain_handling {
                    tessera_proto::RetainHandling::SendAtSubscribe => true,
                    tessera_proto::RetainHandling::SendIfNew => !existed,
                    tessera_proto::RetainHandling::DoNotSend => false,
                };
            if send_retained {
                self.collect_retained(now_ms, filter, entry, &mut retained);
                retained_of.resize(retained.len(), i);
            }
        }
        // The subscriptions are stored before the SUBACK is written. A SUBACK
        // that waits for other shards' route acknowledgements is written
        // later, maybe after this epoch was taken for commit (when the
        // current one has no ops to wait for): the connection's output
        // waits for this epoch from now on.
        let mark = self.store_mark();
        self.persist_session(idx);
        if self.store_mark() != mark {
            self.hold_output_for_commit(conn);
        }
        let suback = SubAck {
            packet_id: sub.packet_id,
            properties: AckProperties::default(),
            reason_codes: reason_codes
                .into_iter()
                .map(|rc| {
                    if version.is_v5() || !rc.is_error() {
                        rc
                    } else {
                        ReasonCode::UnspecifiedError
                    }
                })
                .collect(),
        };
        // New routes and shares are acknowledged by every other shard and, in
        // a cluster, by the forwarder (`remote`).
        let acks_missing = new_routes * self.route_peers() + waits_on.len();
        if acks_missing == 0 {
            self.finish_subscribe(now_ms, conn, idx, suback, retained);
        } else {
            self.next_token += 1;
            for earlier in waits_on {
                self.suback_dependents
                    .entry(earlier)
                    .or_default()
                    .push(token);
            }
            self.pending_subacks.insert(
                token,
                PendingSubAck {
                    conn,
                    acks_missing,
                    suback,
                    retained,
                    filters: sub
                        .subscriptions
                        .iter()
                        .map(|s| s.filter.compact())
                        .collect(),
                    retained_of,
                    failed: Vec::new(),
                },
            );
        }
    }

    fn finish_subscribe(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        idx: SessionIdx,
        suback: SubAck,
        retained: Vec<Delivery>,
    ) {
        self.write_packet(conn, &Packet::SubAck(suback));
        for d in retained {
            self.enqueue(now_ms, idx, d);
        }
    }

    fn on_unsubscribe(&mut self, conn: ConnId, idx: SessionIdx, u: Unsubscribe) {
        let mut reason_codes = Vec::with_capacity(u.filters.len());
        for filter in &u.filters {
            if self.session_mut(idx).subscriptions.remove(filter).is_some() {
                self.remove_local_subscription(filter, idx);
                reason_codes.push(ReasonCode::Success);
            } else {
                reason_codes.push(ReasonCode::NoSubscriptionExisted);
            }
        }
        self.persist_session(idx);
        let ack = UnsubAck {
            packet_id: u.packet_id,
            properties: AckProperties::default(),
            reason_codes,
        };
        self.write_packet(conn, &Packet::UnsubAck(ack));
    }

    fn on_disconnect(&mut self, now_ms: u64, conn: ConnId, idx: SessionIdx, d: Disconnect) {
        if let Some(expiry) = d.properties.session_expiry_interval {
            // [MQTT-3.14.2-2]: a session that expired at close cannot be revived.
            if self.session(idx).expiry_interval_s == 0 && expiry != 0 {
                return self.protocol_error(now_ms, conn, ReasonCode::ProtocolError);
            }
            let expiry = self.granted_expiry(expiry);
            self.session_mut(idx).expiry_interval_s = expiry;
        }
        let reason = if d.reason_code == ReasonCode::DisconnectWithWillMessage {
            CloseReason::ConnectionLost // publish the will, as an abnormal close would
        } else {
            CloseReason::ClientDisconnect
        };
        self.end_conn(now_ms, conn, reason);
        if let Some(c) = self.slot_mut(conn) {
            c.out.close = Some(CloseReason::ClientDisconnect);
        }
    }

    // ------------------------------------------------------------------
    // Routing

    /// Publishes a message from this shard: retained handling, then delivery to
    /// every shard whose routes match (this one included), and to one member
    /// of each matching shared subscription.
    pub fn publish(&mut self, now_ms: u64, msg: Message) {
        let key = shared::origin_key(&msg);
        self.publish_acked(now_ms, msg, None, key);
    }

    /// `publish`, asking every other shard to acknowledge the retained update
    /// with `ack`. `shared_key` is what the hash strategy of shared
    /// subscriptions hashes: the publisher's ClientID when known.
    fn publish_acked(&mut self, now_ms: u64, msg: Message, ack: Option<u64>, shared_key: u64) {
        if msg.retain {
            // A client's (or its will's) new retained message must fit the
            // retained quotas; a clear always goes through (`quota`).
            let refusal = (msg.origin.is_some() && !msg.payload.is_empty())
                .then(|| self.retained_refusal(&msg.topic, quota::retained_size(&msg)))
                .flatten();
            if let Some(limit) = refusal {
                self.limit_refused(limit, None);
            } else {
                // The retained copy outlives the publisher's read buffer: compact it.
                let message = (!msg.payload.is_empty()).then(|| compact_message(&msg));
                self.retain_update(now_ms, msg.topic.clone(), message, ack);
            }
        }
        let mut set = std::mem::take(&mut self.shard_set);
        route_match(&self.routes, &msg.topic, &mut set);
        // In a cluster the publication gets its id here, and every copy carries it,
        // to other local shards as to other nodes: a session that moved between
        // shards of any nodes is not given it twice (`moved`).
        self.new_pub_id(msg.qos);
        self.moved.ack = ack.map(moved::RedirectAck::Publisher);
        for to in set.iter() {
            if to == self.shard {
                continue;
            }
            if self.is_remote(to) {
                self.forward_remote(to, &msg, ack);
                continue;
            }
            self.stats.forwards_sent += 1;
            let durable = ack.filter(|_| self.durable_forwards());
            // A congested peer acknowledges once its queues drained.
            let held = match durable {
                None if msg.qos != QoS::AtMostOnce => self.bp_forward_token(to),
                _ => None,
            };
            self.send_publish(to, &msg, durable.or(held));
        }
        let local = set.contains(self.shard);
        self.shard_set = set;
        // A re-sent PUBLISH routed in place of its original (`handed_qos2`) skips
        // this shard if the original reached it, but for the sessions that moved in
        // since without it (`moved::Arrival`).
        if local && !self.moved.again.is_some_and(|id| self.pub_id_handled(id)) {
            self.deliver_local(now_ms, &msg);
        } else if local {
            self.resent_to_arrivals(now_ms, &msg, self.moved.current);
        }
        if let Some(id) = self.moved.again {
            self.note_resent_handled(id);
        }
        self.moved.current = None;
        self.moved.ack = None;
        // Under sync durability a shared delivery to another shard is
        // acknowledged after its commit there, like `PublishDurable`.
        let shared_ack = ack.filter(|_| self.durable_forwards() || self.remote.is_some());
        self.shared_publish(now_ms, &msg, shared_key, shared_ack);
    }

    /// Sends `msg` to `to`: as `PublishDurable` with `token` when the token's
    /// publisher waits for it (one more acknowledgement to wait for), else as
    /// `Publish`; with the id of the publication being routed.
    fn send_publish(&mut self, to: ShardId, msg: &Message, token: Option<u64>) {
        let id = self.moved.current;
        if let Some(t) = token
            && let Some((_, n)) = self.pending_retains.get_mut(&t)
        {
            *n += 1;
            self.send_durable(to, msg.clone(), t, self.publish_seq, id);
        } else {
            let message = msg.clone();
            self.outbox[usize::from(to)].push(MeshMsg::Publish { message, id });
        }
    }

    /// Sets (or with `None` clears) the retained message of `topic` here and
    /// on every other shard, which acknowledge with `ack` if given.
    fn retain_update(
        &mut self,
        now_ms: u64,
        topic: Str,
        message: Option<Message>,
        ack: Option<u64>,
    ) {
        if self.retain_remote(&topic, &message, ack) {
            return;
        }
        self.retained_clock_ms = self
            .retained_clock_ms
            .max(now_ms)
            .max(self.retained_clock_ms + 1);
        let stamp = (self.retained_clock_ms, self.shard);
        self.apply_retain(now_ms, topic.clone(), message.clone(), stamp);
        self.persist_retained(&topic);
        if let Some(t) = ack
            && let Some((_, n)) = self.pending_retains.get_mut(&t)
        {
            *n += self.shard_count - 1;
        }
        for to in 0..self.shard_count as ShardId {
            if to != self.shard {
                self.outbox[usize::from(to)].push(MeshMsg::Retain {
                    topic: topic.clone(),
                    message: message.clone(),
                    stamp,
                    ack,
                });
            }
        }
    }

    /// Handles one message from shard `from`.
    pub fn handle_mesh(&mut self, now_ms: u64, from: ShardId, msg: MeshMsg) {
        match msg {
            MeshMsg::Publish { message, id } => {
                if self.rerouted_handled(id) {
                    return self.resent_to_arrivals(now_ms, &message, id);
                }
                self.note_pub_id(id);
                self.feed.source = feed_pace::FeedSource::Peer(from);
                self.deliver_local(now_ms, &message);
                self.feed.source = feed_pace::FeedSource::None;
                self.moved.current = None;
            }
            MeshMsg::Forwarded {
                message,
                mark,
                id,
                earlier_life,
                routes_index,
                ..
            } if self.is_remote(from) => {
                self.earlier_life = earlier_life;
                self.routes_index = routes_index;
                self.publish_forwarded(now_ms, message, mark, id);
                self.earlier_life = false;
                self.routes_index = 0;
            }
            MeshMsg::Forwarded {
                message,
                mark,
                ack,
                id,
                earlier_life,
                routes_index,
            } => {
                self.earlier_life = earlier_life;
                self.routes_index = routes_index;
                self.forwarded_copy(now_ms, from, message, mark, ack, id);
                self.earlier_life = false;
                self.routes_index = 0;
            }
            MeshMsg::Redirect {
                client_id,
                message,
                id,
                ack,
                ..
            } => self.on_redirect(now_ms, from, client_id, message, id, ack),
            MeshMsg::PublishRemote { .. } => {
                tracing::warn!(
                    shard = self.shard,
                    from,
                    "a publication for other nodes came to a shard; dropped"
                );
            }
            MeshMsg::PublishDurable {
                message,
                ack,
                seq,
                id,
            } => {
                self.note_origin(from, seq);
                if self.rerouted_handled(id) {
                    self.resent_to_arrivals(now_ms, &message, id);
                    return self.ack_after_commit(from, ack);
                }
                self.note_pub_id(id);
                self.deliver_durable(now_ms, from, &message, ack, false);
                self.moved.current = None;
            }
            MeshMsg::Congestion { congested } => self.bp_on_congestion(from, congested),
            MeshMsg::Refused { token } => self.on_refused(now_ms, token),
            MeshMsg::SysReport(report) => self.on_sys_report(from, report),
            MeshMsg::RouteAdd { filter, shard, ack } => {
                self.routes.insert(&filter, shard, ());
                if let Some(token) = ack {
                    self.outbox[usize::from(from)].push(MeshMsg::Ack { token });
                }
            }
            MeshMsg::RouteRemove { filter, shard } => {
                self.routes.remove(&filter, shard);
            }
            MeshMsg::Ack { token } if self.pending_forwards.contains_key(&token) => {
                self.on_forward_ack(token)
            }
            MeshMsg::Ack { token } if self.pending_retains.contains_key(&token) => {
                self.on_retain_ack(token)
            }
            // A ghost's redirect with a peer's token, accepted by the new node.
            MeshMsg::Ack { token } if self.bp_holds_remote(token) => {
                self.bp_release_held_remote(token);
            }
            // A confirmed ghost's stored redirect, accepted by the new node.
            MeshMsg::Ack { token } if self.is_stored_redirect(token) => {
                self.stored_redirect_accepted(token)
            }
            MeshMsg::Ack { token } => self.on_route_ack(now_ms, token),
            MeshMsg::RouteFailed {
                token,
                filter,
                reason,
            } => {
                if let Some(p) = self.pending_subacks.get_mut(&token) {
                    p.failed.push((filter, reason));
                }
                self.on_route_ack(now_ms, token);
            }
            MeshMsg::Retain {
                topic,
                message,
                stamp,
                ack,
            } => {
                self.retained_clock_ms = self.retained_clock_ms.max(stamp.0);
                self.apply_retain(now_ms, topic.clone(), message, stamp);
                self.persist_retained(&topic);
                if let Some(token) = ack {
                    self.ack_after_commit(from, token);
                }
            }
            MeshMsg::ShareRoute {
                group,
                filter,
                shard,
                connected,
                offline,
                ack,
            } => {
                assert_eq!(shard, from, "only a share's member shard announces it");
                let key = ShareKey { group, filter };
                self.shared_on_route(from, key, (connected, offline), ack);
            }
            MeshMsg::SharedPublish {
                group,
                filter,
                message,
                key,
                tried,
                hops,
                handed_back,
                ack,
            } => {
                let share = ShareKey { group, filter };
                let ack = match ack {
                    Some((origin, token)) => shared::SharedAck::Remote { origin, token },
                    None if self.is_remote(from) => self.forward_batch_share(message.qos),
                    None => shared::SharedAck::None,
                };
                let chain = shared::Chain {
                    tried,
                    hops,
                    handed_back,
                    ack,
                };
                self.shared_on_publish(now_ms, share, message, key, chain);
            }
        }
    }

    /// Delivers a publication shard `from` sent with `ack` here, and answers
    /// `Ack` once what it stored is committed (or congested sessions drained).
    /// `forwarded`: a copy of a publication another node forwarded (`ack`
    /// is its batch's token on `from`).
    fn deliver_durable(
        &mut self,
        now_ms: u64,
        from: ShardId,
        message: &Message,
        ack: u64,
        forwarded: bool,
    ) {
        self.bp_begin_remote(from, ack, message.qos, forwarded);
        self.refusal = (message.qos != QoS::AtMostOnce).then_some(false);
        // A ghost here that holds the copy, or sends it on to the session's new
        // node, holds the `Ack` until it lets go of it (`moved`): under `sync`
        // durability the publisher is answered only once the copy is stored where
        // the session lives, not while it sits in a ghost's memory (sim seed 13).
        self.moved.ack = Some(moved::RedirectAck::Peer);
        self.deliver_local(now_ms, message);
        self.moved.ack = None;
        if self.refusal.take() == Some(true) {
            // Before the `Ack`: the publisher's shard learns it
            // while the acknowledgement is still held.
            self.outbox[usize::from(from)].push(MeshMsg::Refused { token: ack });
        }
        if !self.bp_end_remote() {
            self.ack_after_commit(from, ack);
        }
    }

    /// Another shard applied a retained update: release the publisher's
    /// acknowledgement when it was the last.
    fn on_retain_ack(&mut self, token: u64) {
        let Some((conn, missing)) = self.pending_retains.get_mut(&token) else {
            return;
        };
        count_down(
            missing,
            &mut self.stats,
            self.shard,
            "retained or held acks",
        );
        if *missing > 0 {
            return;
        }
        let conn = *conn;
        self.pending_retains.remove(&token);
        let Some(c) = self.slot_mut(conn) else {
            return; // the publisher left; it re-sends unacknowledged messages
        };
        if let Some(entry) = c.held_acks.iter_mut().find(|(t, _)| *t == Some(token)) {
            entry.0 = None;
        }
        self.release_held_acks(conn);
    }

    /// Sends an acknowledgement, or holds it: while it waits for `token`, or
    /// while an earlier acknowledgement of the connection is held.
    fn send_ack(&mut self, conn: ConnId, ack: Packet, token: Option<u64>) {
        let c = self.conn_mut(conn);
        if token.is_none() && c.held_acks.is_empty() {
            self.write_packet(conn, &ack);
        } else {
            c.held_acks.push_back((token, ack));
        }
    }

    fn release_held_acks(&mut self, conn: ConnId) {
        while let Some(c) = self.slot_mut(conn)
            && c.held_acks.front().is_some_and(|(t, _)| t.is_none())
        {
            let (_, ack) = c.held_acks.pop_front().expect("front exists");
            self.write_packet(conn, &ack);
        }
    }

    fn on_route_ack(&mut self, now_ms: u64, token: u64) {
        // A completed token releases the SUBACKs that waited on its routes:
        // a worklist, not recursion.
        let mut acked = vec![token];
        while let Some(token) = acked.pop() {
            let Some(p) = self.pending_subacks.get_mut(&token) else {
                continue;
            };
            count_down(
                &mut p.acks_missing,
                &mut self.stats,
                self.shard,
                "route acks",
            );
            if p.acks_missing > 0 {
                continue;
            }
            let mut p = self
                .pending_subacks
                .remove(&token)
                .expect("pending SUBACK present");
            self.routes_unacked.retain(|_, t| *t != token);
            let dependents = self.suback_dependents.remove(&token).unwrap_or_default();
            // A SUBSCRIBE that waited on this one's route for the same filter did not
            // get it either.
            for d in &dependents {
                if let Some(dp) = self.pending_subacks.get_mut(d) {
                    for (f, rc) in &p.failed {
                        if dp.filters.contains(f) && !dp.failed.iter().any(|(g, _)| g == f) {
                            dp.failed.push((f.clone(), *rc));
                        }
                    }
                }
            }
            acked.extend(dependents);
            let live = self.slot(p.conn).filter(|c| !c.ended).map(|c| c.session);
            if let Some(idx) = live {
                if !p.failed.is_empty() {
                    self.route_failures(idx, &mut p);
                }
                self.finish_subscribe(now_ms, p.conn, idx, p.suback, p.retained);
            }
        }
    }

    /// The cluster could not commit the routes of `p.failed`: those filters get a
    /// failure in the SUBACK (v5: the reason the forwarder gave; 3.1.1: 0x80), the
    /// session does not keep them, and no retained message is sent for them.
    fn route_failures(&mut self, idx: SessionIdx, p: &mut PendingSubAck) {
        let v5 = self.conn(p.conn).version.is_v5();
        let mut failed_at = Vec::new();
        for (i, filter) in p.filters.iter().enumerate() {
            let Some((_, rc)) = p.failed.iter().find(|(f, _)| f == filter) else {
                continue;
            };
            let Some(code) = p.suback.reason_codes.get_mut(i) else {
                continue;
            };
            if code.is_error() {
                continue;
            }
            *code = if v5 {
                *rc
            } else {
                ReasonCode::UnspecifiedError
            };
            failed_at.push(i);
            if self.session_mut(idx).subscriptions.remove(filter).is_some() {
                self.remove_local_subscription(filter, idx);
            }
        }
        if failed_at.is_empty() {
            return;
        }
        self.persist_session(idx);
        let retained = std::mem::take(&mut p.retained);
        p.retained = retained
            .into_iter()
            .zip(&p.retained_of)
            .filter(|(_, i)| !failed_at.contains(i))
            .map(|(d, _)| d)
            .collect();
        tracing::warn!(
            shard = self.shard,
            client_id = %self.session(idx).client_id,
            filters = ?p.failed.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(),
            "SUBSCRIBE refused for filters whose cluster route could not be committed"
        );
    }

    pub(super) fn route_add(&mut self, filter: Str, ack: Option<u64>) {
        self.routes.insert(&filter, self.shard, ());
        for to in 0..self.shard_count as ShardId + ShardId::from(self.remote.is_some()) {
            if to != self.shard {
                let msg = MeshMsg::RouteAdd {
                    filter: filter.clone(),
                    shard: self.shard,
                    ack,
                };
                self.outbox[usize::from(to)].push(msg);
            }
        }
    }

    fn remove_local_subscription(&mut self, filter: &Str, idx: SessionIdx) {
        if topic::is_shared(filter) {
            return self.shared_unsubscribe(filter, idx);
        }
        self.subscriptions.remove(filter, idx);
        if self.subscriptions.filter_len(filter) == 0 {
            self.routes.remove(filter, self.shard);
            for to in 0..self.shard_count as ShardId + ShardId::from(self.remote.is_some()) {
                if to != self.shard {
                    let msg = MeshMsg::RouteRemove {
                        filter: filter.clone(),
                        shard: self.shard,
                    };
                    self.outbox[usize::from(to)].push(msg);
                }
            }
        }
    }

    fn apply_retain(
        &mut self,
        now_ms: u64,
        topic: Str,
        message: Option<Message>,
        stamp: (u64, ShardId),
    ) {
        match self.retained.get_mut(&topic, ()) {
            Some(e) if e.stamp >= stamp => return,
            Some(e) => {
                let old = e.message.as_ref().map(quota::retained_size);
                let new = message.as_ref().map(quota::retained_size);
                e.message = message;
                e.stamp = stamp;
                e.cleared_at_ms = now_ms;
                self.retained_changed(old, new);
            }
            None => {
                self.retained_changed(None, message.as_ref().map(quota::retained_size));
                self.retained.insert(
                    &topic,
                    (),
                    RetainedEntry {
                        message,
                        stamp,
                        cleared_at_ms: now_ms,
                    },
                );
            }
        }
        self.arm_retained(&topic);
    }

    fn collect_retained(
        &self,
        now_ms: u64,
        filter: &str,
        entry: SubscriptionEntry,
        out: &mut Vec<Delivery>,
    ) {
        let start = out.len();
        let mut push = |m: &Message| {
            if m.is_expired(now_ms) {
                return;
            }
            out.push(Delivery {
                message: m.clone(),
                qos: delivery_qos(m.qos, entry.options.qos),
                // [MQTT-3.3.1-8]: retained messages sent on subscribe carry RETAIN 1.
                retain: true,
                subscription_ids: entry.subscription_id.into_iter().collect(),
                share: None,
                seq: 0,
            });
        };
        if topic::has_wildcards(filter) {
            // Only the matching part of the table is walked; sorted by topic
            // so the order does not depend on the trie's hash maps.
            self.retained.for_each_name_matching(filter, |_, e| {
                if let Some(m) = &e.message {
                    push(m);
                }
            });
            out[start..].sort_unstable_by(|a, b| a.message.topic.cmp(&b.message.topic));
        } else if let Some(m) = self
            .retained
            .get(filter, ())
            .and_then(|e| e.message.as_ref())
        {
            push(m);
        }
    }

    fn deliver_local(&mut self, now_ms: u64, msg: &Message) {
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        self.subscriptions
            .for_each_match(&msg.topic, |idx, entry| matches.push((*idx, *entry)));
        // One delivery per session for overlapping subscriptions: the highest
        // granted QoS, and every matching subscription identifier.
        matches.sort_unstable_by_key(|(idx, _)| *idx);
        let mut i = 0;
        while i < matches.len() {
            let idx = matches[i].0;
            let mut qos = QoS::AtMostOnce;
            let mut retain_as_published = false;
            let mut no_local = false;
            let mut subscription_ids = Vec::new();
            let mut fresh = true;
            while i < matches.len() && matches[i].0 == idx {
                let e = matches[i].1;
                fresh &= e.fresh;
                qos = qos.max(e.options.qos);
                retain_as_published |= e.options.retain_as_published;
                no_local |= e.options.no_local;
                if let Some(id) = e.subscription_id {
                    subscription_ids.push(id);
                }
                i += 1;
            }
            if self.earlier_life && fresh {
                // Another node matched it against routes of this node's earlier life
                // (before its first route add of this life was applied there): meant
                // for sessions of that life, not for one subscribed since (seed 632).
                continue;
            }
            if idx >= moved::GHOST_BASE {
                // A session that moved to another node: the copy follows it.
                self.redirect(idx, msg, true);
                continue;
            }
            if no_local && msg.origin == Some(self.session(idx).uid) {
                continue;
            }
            let qos = delivery_qos(msg.qos, qos);
            let direct = if self.has_moved() {
                self.moved_direct(idx, &msg.topic, qos)
            } else {
                moved::Direct::Deliver
            };
            if direct == moved::Direct::Skip {
                continue; // it got this one on the node it came from
            }
            let d = Delivery {
                message: msg.clone(),
                qos,
                retain: retain_as_published && msg.retain,
                subscription_ids,
                share: None,
                seq: 0,
            };
            match direct {
                // Behind what its old owner redirects (`moved`, sim seed 1508).
                moved::Direct::Hold(redirected) => self.hold_direct(now_ms, idx, d, redirected),
                _ => self.enqueue(now_ms, idx, d),
            }
        }
        self.matches = matches;
    }

    // ------------------------------------------------------------------
    // Outbound delivery

    fn window(&self, conn: ConnId) -> usize {
        let c = self.conn(conn);
        usize::from(c.client_receive_max.min(c.window_max))
    }

    /// Sets our cap on the outbound in-flight window of `conn` (by default
    /// `Limits::inflight_count_max`), still within the client's Receive
    /// Maximum, and fills a larger window from the queue. For a connection
    /// the broker makes itself: a bridge's local session has its remote's
    /// window (docs/BRIDGES.md), which a limit meant for clients would cap.
    pub fn set_window_max(&mut self, now_ms: u64, conn: ConnId, max: u16) {
        let Some(c) = self.slot_mut(conn) else {
            return;
        };
        c.window_max = max.max(1);
        let idx = c.session;
        if idx != SessionIdx::MAX {
            self.pump(now_ms, idx);
        }
    }

    fn writable(&self, conn: ConnId) -> bool {
        let c = self.conn(conn);
        !c.ended && c.out.buf.len() < self.limits.write_buffer_bytes_max
    }

    /// Queues or sends one delivery to a session.
    fn enqueue(&mut self, now_ms: u64, idx: SessionIdx, mut d: Delivery) {
        if d.message.is_expired(now_ms) {
            self.stats.dropped_expired += 1;
            return;
        }
        if d.qos != QoS::AtMostOnce {
            self.bp_on_enqueue(now_ms, idx);
        }
        self.persist_assign_seq(idx, &mut d);
        let s = self.session(idx);
        match s.conn {
            None if d.qos == QoS::AtMostOnce && !self.limits.queue_qos0_offline => {
                self.stats.dropped_qos0_offline += 1;
            }
            Some(conn) if s.queue.is_empty() && self.writable(conn) => {
                if d.qos == QoS::AtMostOnce || s.inflight().len() < self.window(conn) {
                    self.send_delivery(now_ms, conn, idx, d);
                } else {
                    self.queue_push(now_ms, idx, d);
                }
            }
            Some(conn) if d.qos == QoS::AtMostOnce => {
                // Its output is over the bound: a forwarded batch waits for it.
                self.pace_note(now_ms, idx, conn);
                self.queue_push(now_ms, idx, d);
                if self.feed_on() {
                    // A bridge's session behind: its publisher pauses.
                    self.feed_note(now_ms, idx, conn);
                }
            }
            _ => self.queue_push(now_ms, idx, d),
        }
    }

    /// Appends to the session queue; a full queue applies the overflow policy.
    /// Every dropped delivery is counted in `Stats::dropped_queue_full`.
    fn queue_push(&mut self, now_ms: u64, idx: SessionIdx, d: Delivery) {
        if self.session(idx).is_persistent() {
            // Byte budgets and the disk tail (`queue_budget`).
            return self.queue_push_persistent(now_ms, idx, d);
        }
        let max = self.limits.queued_count_max;
        let policy = self.limits.queue_overflow;
        let s = self.session_mut(idx);
        if s.queue.len() < max {
            self.persist_queued(idx, &d);
            self.with_queue(idx, |q| q.push_back(d));
            return;
        }
        self.stats.dropped_queue_full += 1;
        // Until metrics are exported, drops must not be silent: log the first
        // and then every power of two, so a flood cannot flood the log.
        let dropped = self.stats.dropped_queue_full;
        if dropped.is_power_of_two() {
            tracing::warn!(
                shard = self.shard,
                client_id = %self.session(idx).client_id,
                dropped_total = dropped,
                policy = ?policy,
                "session queue full: dropping a delivery"
            );
        }
        let s = self.session_mut(idx);
        match policy {
            QueueOverflow::DropQos0ThenOldest | QueueOverflow::DropOldest => {
                let dropped = self.with_queue(idx, |q| {
                    let old = if policy == QueueOverflow::DropOldest {
                        q.pop_front()
                    } else {
                        q.drop_qos0_or_oldest()
                    };
                    q.push_back(d.clone());
                    old
                });
                if let Some(old) = dropped {
                    self.persist_delivery_gone(idx, old.seq);
                }
                self.persist_queued(idx, &d);
            }
            QueueOverflow::DropNew => {}
            QueueOverflow::Disconnect => {
                if let Some(conn) = s.conn {
                    if self.conn(conn).version.is_v5() {
                        let d = Disconnect::new(ReasonCode::QuotaExceeded);
                        self.write_packet(conn, &Packet::Disconnect(d));
                    }
                    self.end_conn(
                        now_ms,
                        conn,
                        CloseReason::ProtocolError(ReasonCode::QuotaExceeded),
                    );
                }
            }
        }
    }

    /// Moves queued deliveries into the window and the write buffer while both
    /// have room.
    fn pump(&mut self, now_ms: u64, idx: SessionIdx) {
        let Some(conn) = self.session(idx).conn else {
            return;
        };
        let mut moved = false;
        while self.writable(conn) {
            let window = self.window(conn);
            let s = self.session_mut(idx);
            let Some(front) = s.queue.front() else {
                break;
            };
            if front.qos != QoS::AtMostOnce && s.inflight().len() >= window {
                break;
            }
            let d = self
                .with_queue(idx, |q| q.pop_front())
                .expect("front exists");
            moved = true;
            if d.message.is_expired(now_ms) {
                self.stats.dropped_expired += 1;
                self.persist_delivery_gone(idx, d.seq);
                continue;
            }
            self.send_delivery(now_ms, conn, idx, d);
        }
        self.queue_refill(idx);
        self.bp_drained(now_ms, idx);
        self.feed_drained(now_ms, idx, moved);
    }

    fn send_delivery(&mut self, now_ms: u64, conn: ConnId, idx: SessionIdx, d: Delivery) {
        let version = self.conn(conn).version;
        let (qos, received_us) = (d.qos, d.message.received_us);
        let mut publish = publish_for(now_ms, &d, version, 0);
        if d.qos != QoS::AtMostOnce {
            // Size check before a packet id is spent on it.
            publish.packet_id = 1;
        }
        let alias = self.plan_alias(conn, &mut publish);
        if publish.encoded_len(version) > self.conn(conn).client_packet_size_max as usize {
            // [MQTT-3.1.2-25]: never send a packet larger than the client accepts.
            self.stats.dropped_too_large += 1;
            self.persist_delivery_gone(idx, d.seq);
            return;
        }
        if d.qos != QoS::AtMostOnce {
            let packet_id = self.session_mut(idx).allocate_packet_id();
            // Stored with its packet id before the PUBLISH can reach the
            // client (the write waits for the commit in sync mode).
            self.persist_published(idx, &d, packet_id);
            let s = self.session_mut(idx);
            publish.packet_id = packet_id;
            s.push_inflight(Inflight {
                packet_id,
                delivery: d,
                state: InflightState::Published,
            });
        }
        if let Some((topic, plan)) = alias {
            self.commit_alias(conn, &topic, plan);
        }
        self.stats.publishes_sent += 1;
        let latency_us =
            (received_us != 0 && self.now_us != 0).then(|| self.now_us.saturating_sub(received_us));
        self.probe.delivered(qos, latency_us);
        self.write_packet(conn, &Packet::Publish(publish));
    }

    /// Re-sends the in-flight window after a reconnect: unacknowledged PUBLISH
    /// with DUP, and PUBREL for released QoS 2 (section 4.4).
    fn resend_inflight(&mut self, now_ms: u64, idx: SessionIdx) {
        let Some(conn) = self.session(idx).conn else {
            return;
        };
        let version = self.conn(conn).version;
        let packets: Vec<Packet> = self
            .session(idx)
            .inflight()
            .iter()
            .map(|i| match i.state {
                InflightState::Published => {
                    // Expiry is not re-checked: the client already holds an id for it.
                    let mut p = publish_for(now_ms, &i.delivery, version, i.packet_id);
                    p.dup = true;
                    Packet::Publish(p)
                }
                InflightState::Released => Packet::PubRel(PubRel::new(i.packet_id)),
            })
            .collect();
        for p in &packets {
            self.write_packet(conn, p);
        }
    }

    fn write_packet(&mut self, conn: ConnId, packet: &Packet) {
        // Reason strings and Request Problem Information (see `mqtt5`).
        let changed = self.problem_info_for(self.conn(conn), packet);
        let packet = changed.as_ref().unwrap_or(packet);
        let c = self.conn_mut(conn);
        let before = c.out.buf.len();
        if let Err(e) = packet.encode(c.version, &mut c.out.buf) {
            // Our own packets are consistent by construction; an error here is a bug.
            panic!("encoding {:?} failed: {e}", packet.packet_type());
        }
        let written = c.out.buf.len() - before;
        if let Some(w) = c.out.waker.take() {
            w.wake();
        }
        self.stats.bytes_sent += written as u64;
        self.probe.packet_sent(packet.packet_type());
        self.hold_if_stored(conn, packet);
    }

    // ------------------------------------------------------------------
    // Accessors with the invariants they assume

    /// Records the driver's listener `conn` came in on (shown by the admin
    /// listing as [`crate::admin::SessionInfo::listener`]). A no-op for a
    /// connection that already ended.
    pub fn set_listener(&mut self, conn: ConnId, listener: u16) {
        if let Some(c) = self.slot_mut(conn) {
            c.listener = listener;
        }
    }

    /// The connection `conn` names, unless its slot was freed or reused.
    fn slot(&self, conn: ConnId) -> Option<&Conn> {
        self.conns
            .get(conn.slot as usize)?
            .as_ref()
            .filter(|c| c.serial == conn.serial)
    }

    fn slot_mut(&mut self, conn: ConnId) -> Option<&mut Conn> {
        self.conns
            .get_mut(conn.slot as usize)?
            .as_mut()
            .filter(|c| c.serial == conn.serial)
    }

    fn conn(&self, conn: ConnId) -> &Conn {
        self.slot(conn).expect("live connection")
    }

    fn conn_mut(&mut self, conn: ConnId) -> &mut Conn {
        self.slot_mut(conn).expect("live connection")
    }

    fn session(&self, idx: SessionIdx) -> &Session {
        self.sessions[idx as usize].as_ref().expect("live session")
    }

    fn session_mut(&mut self, idx: SessionIdx) -> &mut Session {
        self.sessions[idx as usize].as_mut().expect("live session")
    }
}

/// A will in allocations of its own, not pinning the CONNECT frame.
fn compact_will(w: &Will) -> Will {
    let p = &w.properties;
    Will {
        topic: w.topic.compact(),
        payload: Bytes::copy_from_slice(&w.payload),
        qos: w.qos,
        retain: w.retain,
        properties: tessera_proto::WillProperties {
            will_delay_interval: p.will_delay_interval,
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            content_type: p.content_type.as_ref().map(Str::compact),
            response_topic: p.response_topic.as_ref().map(Str::compact),
            correlation_data: p.correlation_data.as_deref().map(Bytes::copy_from_slice),
            user_properties: p
                .user_properties
                .iter()
                .map(|(k, v)| (k.compact(), v.compact()))
                .collect(),
        },
    }
}

/// A message in allocations of its own, for the retained table. Properties sit
/// behind an `Arc` that already owns its strings' frame views; they are rare on
/// retained messages and kept as they are.
fn compact_message(m: &Message) -> Message {
    Message {
        topic: m.topic.compact(),
        payload: Bytes::copy_from_slice(&m.payload),
        // A retained copy is replayed to later subscribers: its age is not a
        // delivery latency.
        received_us: 0,
        ..m.clone()
    }
}

fn will_properties(p: &tessera_proto::WillProperties) -> Option<Arc<PublishProperties>> {
    let props = PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        ..Default::default()
    };
    (!props.is_empty()).then(|| Arc::new(props))
}

fn message_from_publish(
    now_ms: u64,
    p: Publish,
    origin: SessionUid,
    version: ProtocolVersion,
) -> Message {
    let mut props = p.properties;
    let expires_at_ms = props
        .message_expiry_interval
        .take()
        .map(|s| now_ms + u64::from(s) * 1000);
    props.subscription_identifiers.clear();
    let properties = (version.is_v5() && !props.is_empty()).then(|| Arc::new(props));
    Message {
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        properties,
        expires_at_ms,
        origin: Some(origin),
        received_us: 0,
    }
}

/// The PUBLISH packet for a delivery.
fn publish_for(now_ms: u64, d: &Delivery, version: ProtocolVersion, packet_id: u16) -> Publish {
    let m = &d.message;
    let mut properties = PublishProperties::default();
    if version.is_v5() {
        if let Some(p) = &m.properties {
            properties = PublishProperties::clone(p);
        }
        properties
            .subscription_identifiers
            .clone_from(&d.subscription_ids);
        // The remaining lifetime is forwarded (section 3.3.2.3.3).
        properties.message_expiry_interval = m
            .expires_at_ms
            .map(|t| (t.saturating_sub(now_ms).div_ceil(1000)) as u32);
    }
    Publish {
        dup: false,
        qos: d.qos,
        retain: d.retain,
        topic: m.topic.clone(),
        packet_id,
        properties,
        payload: m.payload.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::testing::drain;
    use super::*;
    use bytes::Bytes;
    use tessera_proto::{Subscription, SubscriptionOptions};

    fn connect_packet(id: &'static str) -> Connect {
        super::testing::connect_packet(ProtocolVersion::V5, id, true)
    }

    /// An acknowledgement counted once more than expected leaves its counter
    /// at zero (never wrapped to usize::MAX, which would hold the waiter
    /// forever) and is counted as an anomaly, each time.
    #[test]
    fn counting_down_past_zero_stays_at_zero_and_is_counted() {
        let mut stats = Stats::default();
        let mut n = 2;
        count_down(&mut n, &mut stats, 0, "test");
        count_down(&mut n, &mut stats, 0, "test");
        assert_eq!((n, stats.counter_anomalies), (0, 0));
        for k in 1..=3 {
            count_down(&mut n, &mut stats, 0, "test");
            assert_eq!((n, stats.counter_anomalies), (0, k));
        }
    }

    /// A task that outlived its connection (a reader waking after the slot was
    /// freed and reused) must not end the slot's new connection.
    #[test]
    fn a_stale_conn_id_does_not_touch_the_connection_reusing_its_slot() {
        let mut e = Engine::new(0, 1, Limits::default());
        let old = e.connect(1, connect_packet("a"), false);
        e.release(2, old);
        let new = e.connect(3, connect_packet("b"), false);
        assert_eq!(old.slot, new.slot, "the slot is reused");
        e.connection_lost(4, old);
        e.handle_packet(4, old, Packet::PingReq);
        e.release(5, old);
        assert!(!e.is_ended(new), "the new connection is untouched");
        assert!(e.is_ended(old));
        let out = e.output(new).expect("new connection alive");
        assert!(out.close.is_none());
        // Only the CONNACK was written: the stale PINGREQ produced nothing.
        let mut buf = out.buf.split();
        let first = tessera_proto::decode(&mut buf, ProtocolVersion::V5, usize::MAX);
        assert!(matches!(first, Ok(Some(Packet::ConnAck(_)))));
        assert!(buf.is_empty());
    }

    /// Queue overflow policies, which apply to the live queues of
    /// non-persistent sessions: a connected subscriber with a window of one
    /// does not acknowledge, its queue (2 deliveries) overflows, and once it
    /// acknowledges it receives what the policy kept.
    fn overflow_case(policy: QueueOverflow, qos: [QoS; 4]) -> Vec<String> {
        let limits = Limits {
            queued_count_max: 2,
            queue_high_water: 0,
            queue_overflow: policy,
            ..Limits::default()
        };
        let mut e = Engine::new(0, 1, limits);
        let mut sub = connect_packet("sub");
        sub.properties.receive_maximum = Some(1);
        let s = e.connect(1, sub, false);
        let subscribe = Subscribe {
            packet_id: 1,
            properties: Default::default(),
            subscriptions: vec![Subscription {
                filter: Str::from_static("t"),
                options: SubscriptionOptions::qos(QoS::AtLeastOnce),
            }],
        };
        e.handle_packet(1, s, Packet::Subscribe(subscribe));
        drain(&mut e, s, ProtocolVersion::V5);
        let p = e.connect(3, connect_packet("pub"), false);
        for (n, q) in qos.iter().enumerate() {
            let mut publish = Publish::new(Str::from_static("t"), Bytes::from(format!("m{n}")));
            publish.qos = *q;
            publish.packet_id = if *q == QoS::AtMostOnce {
                0
            } else {
                n as u16 + 1
            };
            e.handle_packet(4, p, Packet::Publish(publish));
        }
        let mut got = Vec::new();
        for _ in 0..4 {
            for packet in drain(&mut e, s, ProtocolVersion::V5) {
                if let Packet::Publish(p) = packet {
                    got.push(String::from_utf8(p.payload.to_vec()).unwrap());
                    if p.qos != QoS::AtMostOnce && !e.is_ended(s) {
                        e.handle_packet(5, s, Packet::PubAck(PubAck::new(p.packet_id)));
                    }
                }
            }
        }
        got
    }

    #[test]
    fn queue_overflow_policies_keep_what_they_promise() {
        let q1 = [QoS::AtLeastOnce; 4];
        // m0 is in flight; m1 and m2 are queued when m3 arrives.
        let oldest = ["m0", "m2", "m3"];
        assert_eq!(overflow_case(QueueOverflow::DropOldest, q1), oldest);
        assert_eq!(
            overflow_case(QueueOverflow::DropNew, q1),
            ["m0", "m1", "m2"]
        );
        assert_eq!(overflow_case(QueueOverflow::DropQos0ThenOldest, q1), oldest);
        assert_eq!(overflow_case(QueueOverflow::Disconnect, q1), ["m0"]);
        // The QoS 0 delivery goes first, though it is not the oldest.
        let mixed = [
            QoS::AtLeastOnce,
            QoS::AtLeastOnce,
            QoS::AtMostOnce,
            QoS::AtLeastOnce,
        ];
        assert_eq!(
            overflow_case(QueueOverflow::DropQos0ThenOldest, mixed),
            ["m0", "m1", "m3"]
        );
        assert_eq!(overflow_case(QueueOverflow::DropOldest, mixed), oldest);
    }

    /// A wildcard SUBSCRIBE gets the retained messages of the topics it
    /// matches, in topic order; `#` and `+` at the first level do not reach
    /// `$` topics [MQTT-4.7.2-1], and cleared topics send nothing.
    #[test]
    fn a_wildcard_subscribe_gets_the_matching_retained_messages_in_topic_order() {
        let mut e = Engine::new(0, 1, Limits::default());
        let p = e.connect(0, connect_packet("pub"), false);
        let topics = ["b/2", "a/1", "a/2/deep", "$x/1", "a", "gone/1"];
        for t in topics {
            let mut publish = Publish::new(Str::try_from(t).unwrap(), Bytes::from(t.to_string()));
            publish.retain = true;
            e.handle_packet(1, p, Packet::Publish(publish));
        }
        let mut clear = Publish::new(Str::from_static("gone/1"), Bytes::new());
        clear.retain = true;
        e.handle_packet(2, p, Packet::Publish(clear));
        let got = |e: &mut Engine, filter: &'static str| -> Vec<String> {
            let s = e.connect(3, connect_packet("sub"), false);
            let subscribe = Subscribe {
                packet_id: 1,
                properties: Default::default(),
                subscriptions: vec![Subscription {
                    filter: Str::from_static(filter),
                    options: SubscriptionOptions::qos(QoS::AtMostOnce),
                }],
            };
            e.handle_packet(3, s, Packet::Subscribe(subscribe));
            let out = drain(e, s, ProtocolVersion::V5)
                .into_iter()
                .filter_map(|p| match p {
                    Packet::Publish(p) => {
                        assert!(p.retain, "sent on subscribe: RETAIN 1");
                        Some(String::from_utf8(p.payload.to_vec()).unwrap())
                    }
                    _ => None,
                })
                .collect();
            e.connection_lost(4, s);
            e.release(4, s);
            out
        };
        assert_eq!(got(&mut e, "#"), ["a", "a/1", "a/2/deep", "b/2"]);
        assert_eq!(got(&mut e, "a/#"), ["a", "a/1", "a/2/deep"]);
        assert_eq!(got(&mut e, "+/+"), ["a/1", "b/2"]);
        assert_eq!(got(&mut e, "$x/#"), ["$x/1"]);
        assert_eq!(got(&mut e, "+/1"), ["a/1"]);
        assert_eq!(got(&mut e, "b/2"), ["b/2"]);
        assert!(got(&mut e, "gone/#").is_empty());
    }

    #[test]
    fn an_unknown_authentication_method_is_refused_with_0x8c() {
        let mut e = Engine::new(0, 1, Limits::default());
        let mut c = connect_packet("auth");
        c.properties.authentication_method = Some(Str::from_static("SCRAM-SHA-256"));
        c.properties.authentication_data = Some(Bytes::from_static(b"n,,n=user,r=nonce"));
        let conn = e.connect(1, c, false);
        let out = drain(&mut e, conn, ProtocolVersion::V5);
        match out.as_slice() {
            [Packet::ConnAck(ack)] => {
                assert_eq!(ack.reason_code, ReasonCode::BadAuthenticationMethod);
                assert!(!ack.session_present);
            }
            other => panic!("expected one CONNACK, got {other:?}"),
        }
        assert!(e.is_ended(conn));
        assert_eq!(e.session_count(), 0);
    }
}
