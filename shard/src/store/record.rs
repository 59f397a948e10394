//! The on-disk records of a shard store and their conversion from and to the
//! engine's types.
//!
//! Every value is `[FORMAT_VERSION as u16 LE][rkyv archive]`. The version is
//! checked before the archive is validated (`rkyv` with `bytecheck`), so a
//! value written by a newer build is refused with a clear error instead of
//! being misread. Times are absolute wall-clock milliseconds since the Unix
//! epoch, so expiries count the downtime across a restart.

use std::sync::Arc;

use bytes::Bytes;
use rkyv::{Archive, Deserialize, Serialize};
use tessera_proto::{
    ProtocolVersion, PublishProperties, QoS, RetainHandling, Str, SubscriptionOptions, Will,
    WillProperties,
};

use crate::message::Message;
use crate::session::{Delivery, ShareKey, SubscriptionEntry};

/// The storage format this build writes. Bump it with a migration in
/// `recover::migrate` when a record changes shape.
pub const FORMAT_VERSION: u16 = 1;

/// v5 properties of a stored message or will (those a broker forwards).
#[derive(Archive, Serialize, Deserialize, Debug, Default, PartialEq)]
pub struct PropsRec {
    pub payload_format_indicator: Option<bool>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
}

/// An application message.
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub struct MessageRec {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub properties: Option<PropsRec>,
    pub expires_at_wall_ms: Option<u64>,
}

/// A will, with its own properties.
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub struct WillRec {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub will_delay_interval: Option<u32>,
    pub message_expiry_interval: Option<u32>,
    pub properties: PropsRec,
}

/// One subscription of a session.
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub struct SubRec {
    pub filter: String,
    /// QoS in bits 0-1, no local bit 2, retain as published bit 3, retain
    /// handling bits 4-5 (the MQTT 5 options byte).
    pub options: u8,
    pub subscription_id: Option<u32>,
}

/// A session record (`sessions` database, key: the ClientID key).
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub struct SessionRec {
    pub client_id: String,
    /// Protocol level of the latest connection (3, 4 or 5).
    pub level: u8,
    pub expiry_interval_s: u32,
    /// `None`: the session had a connection when this was written.
    pub disconnected_at_wall_ms: Option<u64>,
    pub subscriptions: Vec<SubRec>,
    /// The will of the connection the session had when this was written.
    pub will: Option<WillRec>,
}

/// Where a stored delivery stands.
pub const STATE_QUEUED: u8 = 0;
/// PUBLISH sent with `packet_id`, no PUBACK/PUBREC yet.
pub const STATE_PUBLISHED: u8 = 1;
/// QoS 2: PUBREC received, PUBREL sent, no PUBCOMP yet.
pub const STATE_RELEASED: u8 = 2;

/// A delivery of a persistent session (`messages` database, key: ClientID key
/// + sequence number).
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub struct DeliveryRec {
    pub state: u8,
    pub packet_id: u16,
    pub qos: u8,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// `(group, filter)` of the shared subscription it was chosen for.
    pub share: Option<(String, String)>,
    /// Absent for released QoS 2 deliveries: only the packet id matters then.
    pub message: Option<MessageRec>,
}

/// A delayed will waiting for its delay (`wills` database).
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub struct DelayedWillRec {
    pub client_id: String,
    pub due_wall_ms: u64,
    pub will: WillRec,
}

/// A whole session as it moves to another node at a cross-node takeover (issue 15):
/// the store's records, so the wire format is the storage format (versioned, checked).
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub struct TransferRec {
    /// Subscriptions, expiry, protocol level (its `will` is always `None`: the
    /// connection ended before the export).
    pub session: SessionRec,
    /// In-flight deliveries in send order (`STATE_PUBLISHED` / `STATE_RELEASED` with
    /// their packet ids), then the queue in order (`STATE_QUEUED`).
    pub deliveries: Vec<DeliveryRec>,
    /// Inbound QoS 2 packet ids awaiting PUBREL.
    pub inbound_qos2: Vec<u16>,
    /// A will waiting for its delay.
    pub delayed_will: Option<DelayedWillRec>,
    /// The next outbound packet id the session would use.
    pub next_packet_id: u16,
    /// Each delivery's sequence number in its session (0: not stored, QoS 0), so the
    /// session keeps one sequence space wherever it moves.
    pub seqs: Vec<u64>,
    /// The sequence number the session gives its next stored delivery.
    pub next_seq: u64,
    /// Deliveries of the queue's disk tail, not in `deliveries`: the new owner reads
    /// them from the old owner's store in chunks ([`TransferTailRec`]).
    pub disk_count: u64,
    /// Their `delivery_cost` in total.
    pub disk_bytes: u64,
    /// Every delivery of the disk tail has a sequence number at least this.
    pub disk_from_seq: u64,
}

/// A chunk of a moving session's disk tail, in sequence order (all `STATE_QUEUED`).
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub struct TransferTailRec {
    /// Each delivery's sequence number.
    pub seqs: Vec<u64>,
    /// The deliveries.
    pub deliveries: Vec<DeliveryRec>,
    /// Whether more of the tail follows this chunk.
    pub more: bool,
}

/// A moved session's confirmed ghost (`meta` database, key `ghost/` + the ClientID
/// key; issue 15, cause E): what the old owner needs after a crash to send on what
/// was matched for the session while it lived here (`engine::stored_ghost`).
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub struct GhostRec {
    pub client_id: String,
    /// The node the session moved to, and its claim epoch.
    pub to_node: u64,
    pub to_epoch: u64,
    /// The session's plain subscriptions as they were when it left.
    pub subscriptions: Vec<SubRec>,
    /// When the new owner confirmed it stored the session (wall clock): the ghost
    /// lives `MOVED_WINDOW_MS` from then.
    pub confirmed_wall_ms: u64,
    /// The window the ghost filters with (`moved::encode_marks`: marks, no ids).
    pub window: Vec<u8>,
}

/// A publication a moved session's confirmed ghost sent on to the session's new node,
/// not yet accepted there (`meta` database, key `redir/` + the session prefix + its
/// number; issue 15, `engine::moved`): sent again after a crash.
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub struct RedirectRec {
    pub client_id: String,
    /// The node the session moved to, and its claim epoch.
    pub to_node: u64,
    pub to_epoch: u64,
    pub message: MessageRec,
    /// Its cluster-wide id: origin, origin shard, class and count.
    pub id: Option<(u64, u16, u64)>,
}

/// Why a stored value could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Written by a newer format.
    #[error("written by storage format {found}; this build reads formats up to {FORMAT_VERSION}")]
    NewerFormat { found: u16 },
    /// Not a valid record.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// Encodes a record with its format version.
pub fn encode<T>(rec: &T) -> Vec<u8>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    let body = rkyv::to_bytes::<rkyv::rancor::Error>(rec).expect("serializing to memory");
    let mut out = Vec::with_capacity(2 + body.len());
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes and validates a record.
pub fn decode<T>(bytes: &[u8]) -> Result<T, DecodeError>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let Some((version, body)) = bytes.split_first_chunk::<2>() else {
        return Err(DecodeError::Corrupt("shorter than its version".into()));
    };
    let version = u16::from_le_bytes(*version);
    if version > FORMAT_VERSION {
        return Err(DecodeError::NewerFormat { found: version });
    }
    if version == 0 {
        return Err(DecodeError::Corrupt("format version 0".into()));
    }
    // LMDB values are not aligned for the archive: copy once (start-up only).
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    rkyv::from_bytes::<T, rkyv::rancor::Error>(&aligned)
        .map_err(|e| DecodeError::Corrupt(e.to_string()))
}

// ----------------------------------------------------------------------
// Conversions

fn string(s: &Str) -> String {
    s.as_str().to_owned()
}

fn to_str(s: String) -> Result<Str, DecodeError> {
    Str::try_from(s).map_err(|e| DecodeError::Corrupt(format!("bad string: {e:?}")))
}

fn qos(v: u8) -> Result<QoS, DecodeError> {
    QoS::from_u8(v).ok_or_else(|| DecodeError::Corrupt(format!("bad QoS {v}")))
}

/// Milliseconds to add to a broker-relative time to get wall-clock time.
/// Broker times before the epoch base saturate at 0.
pub fn to_wall(broker_ms: u64, wall_base_ms: u64) -> u64 {
    broker_ms.saturating_add(wall_base_ms)
}

/// Broker-relative time of a wall-clock time; times before the broker started
/// map to 0 (already past).
pub fn to_broker(wall_ms: u64, wall_base_ms: u64) -> u64 {
    wall_ms.saturating_sub(wall_base_ms)
}

fn props_rec(
    pfi: Option<bool>,
    ct: &Option<Str>,
    rt: &Option<Str>,
    cd: &Option<Bytes>,
    up: &[(Str, Str)],
) -> PropsRec {
    PropsRec {
        payload_format_indicator: pfi,
        content_type: ct.as_ref().map(string),
        response_topic: rt.as_ref().map(string),
        correlation_data: cd.as_ref().map(|b| b.to_vec()),
        user_properties: up.iter().map(|(k, v)| (string(k), string(v))).collect(),
    }
}

type PropsParts = (
    Option<bool>,
    Option<Str>,
    Option<Str>,
    Option<Bytes>,
    Vec<(Str, Str)>,
);

fn props_parts(p: PropsRec) -> Result<PropsParts, DecodeError> {
    Ok((
        p.payload_format_indicator,
        p.content_type.map(to_str).transpose()?,
        p.response_topic.map(to_str).transpose()?,
        p.correlation_data.map(Bytes::from),
        p.user_properties
            .into_iter()
            .map(|(k, v)| Ok((to_str(k)?, to_str(v)?)))
            .collect::<Result<_, DecodeError>>()?,
    ))
}

/// The record of a message.
pub fn message_rec(m: &Message, wall_base_ms: u64) -> MessageRec {
    MessageRec {
        topic: string(&m.topic),
        payload: m.payload.to_vec(),
        qos: m.qos as u8,
        retain: m.retain,
        properties: m.properties.as_ref().map(|p| {
            props_rec(
                p.payload_format_indicator,
                &p.content_type,
                &p.response_topic,
                &p.correlation_data,
                &p.user_properties,
            )
        }),
        expires_at_wall_ms: m.expires_at_ms.map(|t| to_wall(t, wall_base_ms)),
    }
}

/// The message of a record. Its origin is unknown after a restart (no-local
/// was applied when the delivery was made).
pub fn message(r: MessageRec, wall_base_ms: u64) -> Result<Message, DecodeError> {
    let properties = match r.properties {
        None => None,
        Some(p) => {
            let (pfi, ct, rt, cd, up) = props_parts(p)?;
            Some(Arc::new(PublishProperties {
                payload_format_indicator: pfi,
                content_type: ct,
                response_topic: rt,
                correlation_data: cd,
                user_properties: up,
                ..Default::default()
            }))
        }
    };
    Ok(Message {
        topic: to_str(r.topic)?,
        payload: Bytes::from(r.payload),
        qos: qos(r.qos)?,
        retain: r.retain,
        properties,
        expires_at_ms: r.expires_at_wall_ms.map(|t| to_broker(t, wall_base_ms)),
        origin: None,
        // Restored from disk: its age spans a restart, not a delivery.
        received_us: 0,
    })
}

/// The record of a will.
pub fn will_rec(w: &Will) -> WillRec {
    let p = &w.properties;
    WillRec {
        topic: string(&w.topic),
        payload: w.payload.to_vec(),
        qos: w.qos as u8,
        retain: w.retain,
        will_delay_interval: p.will_delay_interval,
        message_expiry_interval: p.message_expiry_interval,
        properties: props_rec(
            p.payload_format_indicator,
            &p.content_type,
            &p.response_topic,
            &p.correlation_data,
            &p.user_properties,
        ),
    }
}

/// The will of a record.
pub fn will(r: WillRec) -> Result<Will, DecodeError> {
    let (pfi, ct, rt, cd, up) = props_parts(r.properties)?;
    Ok(Will {
        topic: to_str(r.topic)?,
        payload: Bytes::from(r.payload),
        qos: qos(r.qos)?,
        retain: r.retain,
        properties: WillProperties {
            will_delay_interval: r.will_delay_interval,
            payload_format_indicator: pfi,
            message_expiry_interval: r.message_expiry_interval,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
        },
    })
}

/// The options byte of a subscription (MQTT 5 layout).
/// The stored form of a session's state.
pub fn session_rec(s: &crate::store::SessionState, wall_base_ms: u64) -> SessionRec {
    SessionRec {
        client_id: s.client_id.as_str().to_owned(),
        level: s.version.level(),
        expiry_interval_s: s.expiry_interval_s,
        disconnected_at_wall_ms: s.disconnected_at_ms.map(|t| to_wall(t, wall_base_ms)),
        subscriptions: s
            .subscriptions
            .iter()
            .map(|(f, e)| SubRec {
                filter: f.as_str().to_owned(),
                options: options_byte(e.options),
                subscription_id: e.subscription_id,
            })
            .collect(),
        will: s.will.as_ref().map(will_rec),
    }
}

/// The stored form of a ghost.
pub fn ghost_rec(g: &crate::store::GhostState, wall_base_ms: u64) -> GhostRec {
    GhostRec {
        client_id: string(&g.client_id),
        to_node: g.to.0,
        to_epoch: g.to.1,
        subscriptions: g
            .subscriptions
            .iter()
            .map(|(f, e)| SubRec {
                filter: string(f),
                options: options_byte(e.options),
                subscription_id: e.subscription_id,
            })
            .collect(),
        confirmed_wall_ms: to_wall(g.confirmed_ms, wall_base_ms),
        window: g.window.clone(),
    }
}

/// The ghost of a record (its confirmation on the broker's clock).
pub fn ghost(r: GhostRec, wall_base_ms: u64) -> Result<crate::store::GhostState, DecodeError> {
    Ok(crate::store::GhostState {
        client_id: to_str(r.client_id)?,
        to: (r.to_node, r.to_epoch),
        subscriptions: r
            .subscriptions
            .into_iter()
            .map(subscription)
            .collect::<Result<_, _>>()?,
        confirmed_ms: to_broker(r.confirmed_wall_ms, wall_base_ms),
        window: r.window,
    })
}

/// The stored form of a redirect.
pub fn redirect_rec(r: &crate::store::RedirectState, wall_base_ms: u64) -> RedirectRec {
    RedirectRec {
        client_id: string(&r.client_id),
        to_node: r.to.0,
        to_epoch: r.to.1,
        message: message_rec(&r.message, wall_base_ms),
        id: r.id.map(|id| (id.origin, id.shard, id.seq)),
    }
}

/// The redirect of a record.
pub fn redirect(
    r: RedirectRec,
    wall_base_ms: u64,
) -> Result<crate::store::RedirectState, DecodeError> {
    Ok(crate::store::RedirectState {
        client_id: to_str(r.client_id)?,
        to: (r.to_node, r.to_epoch),
        message: message(r.message, wall_base_ms)?,
        id: r
            .id
            .map(|(origin, shard, seq)| crate::mesh::PubId { origin, shard, seq }),
    })
}

pub fn options_byte(o: SubscriptionOptions) -> u8 {
    (o.qos as u8)
        | (u8::from(o.no_local) << 2)
        | (u8::from(o.retain_as_published) << 3)
        | ((o.retain_handling as u8) << 4)
}

/// The subscription options of a stored options byte.
pub fn options(b: u8) -> Result<SubscriptionOptions, DecodeError> {
    Ok(SubscriptionOptions {
        qos: qos(b & 0b11)?,
        no_local: b & 0b100 != 0,
        retain_as_published: b & 0b1000 != 0,
        retain_handling: match (b >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(DecodeError::Corrupt(format!("bad options byte {b}"))),
        },
    })
}

/// The subscription of a record.
pub fn subscription(r: SubRec) -> Result<(Str, SubscriptionEntry), DecodeError> {
    Ok((
        to_str(r.filter)?,
        SubscriptionEntry {
            options: options(r.options)?,
            subscription_id: r.subscription_id,
            // Restored or moved in: it existed before this life of the node.
            fresh: false,
        },
    ))
}

/// The protocol version of a stored level.
pub fn version(level: u8) -> Result<ProtocolVersion, DecodeError> {
    match level {
        3 => Ok(ProtocolVersion::V3_1),
        4 => Ok(ProtocolVersion::V3_1_1),
        5 => Ok(ProtocolVersion::V5),
        _ => Err(DecodeError::Corrupt(format!("bad protocol level {level}"))),
    }
}

/// The record of a delivery in `state` with `packet_id`.
pub fn delivery_rec(d: &Delivery, state: u8, packet_id: u16, wall_base_ms: u64) -> DeliveryRec {
    DeliveryRec {
        state,
        packet_id,
        qos: d.qos as u8,
        retain: d.retain,
        subscription_ids: d.subscription_ids.clone(),
        share: d
            .share
            .as_ref()
            .map(|k| (string(&k.group), string(&k.filter))),
        message: (state != STATE_RELEASED).then(|| message_rec(&d.message, wall_base_ms)),
    }
}

/// The delivery of a record, with its sequence number.
pub fn delivery(r: DeliveryRec, seq: u64, wall_base_ms: u64) -> Result<Delivery, DecodeError> {
    let message = match r.message {
        Some(m) => message(m, wall_base_ms)?,
        // A released QoS 2 delivery is re-sent as PUBREL only.
        None => Message {
            topic: Str::from_static("-"),
            payload: Bytes::new(),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: None,
            expires_at_ms: None,
            origin: None,
            received_us: 0,
        },
    };
    Ok(Delivery {
        message,
        qos: qos(r.qos)?,
        retain: r.retain,
        subscription_ids: r.subscription_ids,
        share: r
            .share
            .map(|(g, f)| {
                Ok::<_, DecodeError>(Arc::new(ShareKey {
                    group: to_str(g)?,
                    filter: to_str(f)?,
                }))
            })
            .transpose()?,
        seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_newer_formats_are_refused() {
        let rec = SessionRec {
            client_id: "c".into(),
            level: 5,
            expiry_interval_s: 60,
            disconnected_at_wall_ms: Some(7),
            subscriptions: vec![SubRec {
                filter: "a/+".into(),
                options: 0b10_1101,
                subscription_id: Some(3),
            }],
            will: None,
        };
        let bytes = encode(&rec);
        assert_eq!(decode::<SessionRec>(&bytes).unwrap(), rec);
        let mut newer = bytes.clone();
        newer[..2].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert!(matches!(
            decode::<SessionRec>(&newer),
            Err(DecodeError::NewerFormat { .. })
        ));
        assert!(matches!(
            decode::<SessionRec>(&bytes[..bytes.len() / 2]),
            Err(DecodeError::Corrupt(_))
        ));
        let o = options(0b10_1101).unwrap();
        assert_eq!(options_byte(o), 0b10_1101);
    }
}
