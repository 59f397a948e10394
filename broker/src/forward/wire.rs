//! The wire format of the forward channel between two nodes (`Channel::Forward`):
//! batches of publications and route barriers, and their answers.
//!
//! Every request is one link frame body (the link bounds it, 16 MiB):
//!
//! ```text
//! request  = tag u8, then
//!   1 batch   : incarnation u64 | seq u64 | count u32 | record * count
//!   2 barrier : index u64
//!   3 batch   : incarnation u64 | seq u64 | base u64 | count u32 | record * count
//!   4 done    : incarnation u64 | seq u64
//!   5 shares  : count u32 | (group str | filter str | members u32) * count
//! record   = flags u8 (bit 0: expiry follows, bit 1: share follows, bit 2: handed
//!            back, only with bit 1, bit 3: id follows, bit 4: session follows, not
//!            with bit 1, bit 5: routes index follows, not with bit 1 or 4)
//!            | publisher u64
//!            | [expiry_ms u64] | [group str | filter str]
//!            | [origin u64 | shard u16 | seq u64] | [epoch u64 | client_id str]
//!            | [routes u64]
//!            | len u32 | an MQTT 5 PUBLISH frame of len bytes
//! str      = len u16 | UTF-8 bytes
//! answer   = tag u8, then
//!   1 accepted : seq u64
//!   2 applied  : index u64
//!   3 received : seq u64
//!   4 unknown  : seq u64
//!   5 noted    : 0 u64
//! ```
//!
//! Integers are big-endian. The publication travels as an MQTT 5 PUBLISH (QoS and
//! RETAIN as published, packet id 1 when QoS > 0, the properties that travel with a
//! message: payload format, content type, response topic, correlation data, user
//! properties), so the receiving node decodes it with the same validating decoder as a
//! client's bytes, and topic and payload are slices of the received frame: no copy.
//! `expiry_ms` is the remaining lifetime, relative, so clocks of the two nodes need not
//! agree. `publisher` identifies the publishing session on its node (no-local and the
//! hash strategy of shared subscriptions use it; see `SessionUid::remote`).
//!
//! The id (bit 3) is a publication's cluster-wide identity (every QoS)
//! (`tessera_shard::mesh::PubId`); a record for one session (bit 4) is a publication
//! its old node sends on to the node the session moved to (`tessera_shard::engine`
//! module `moved`). Both came with cluster protocol version 3.
//!
//! The routes index (bit 5, cluster protocol version 6) is the raft log index up to
//! which the sender had applied the route table when it matched the publication
//! against the receiver's routes: a plain record always carries it. The receiver
//! gives a publication matched before the sender had applied any route add of the
//! receiver's present life only to subscriptions older than that life (restored from
//! its store, or brought along by a session that moved in), never to one a SUBSCRIBE
//! made since: that publication was matched against routes of sessions the receiver
//! had before it restarted (docs/ARCHITECTURE.md, "Cluster data plane", *copies
//! matched for an earlier life*; seed 632).
//!
//! A shared record (bit 1) is for one member of `$share/{group}/{filter}`; bit 2 says
//! that the sending node got it from another node and had no member left to take it,
//! so it handed it back to the group: the receiver drops rather than hands back what it
//! cannot place.
//!
//! `incarnation` (the sender's boot time in ns) and `seq` (from 1, one per batch) let the
//! receiver drop a batch it already accepted when the sender retries it after a lost
//! link: a retried batch carries the same publications. A sender keeps several batches
//! in flight (tag 3); `base` is the oldest of its batches not yet answered when it sent
//! this one, so a receiver that knows nothing of the sender (it restarted) accepts only
//! a batch whose `base` is its own `seq`, and one that does accepts only the batch after
//! the last it accepted: a batch after a lost one is refused and sent again after it,
//! never delivered before it. Tag 1 (one batch in flight, and the retained records in
//! the raft log) reads as `base = seq`.
//!
//! **Answers in two steps.** A batch whose publications the receiver must still wait
//! for (their commit under `sync` durability, or a congested subscriber holding its
//! publishers' acknowledgements under back-pressure) is answered *received* at once:
//! it is accepted, in order, and the sender may send the next; the sender then asks
//! *done* (tag 4) for it, which the receiver answers *accepted* once the batch is
//! complete, so one held batch never stops the stream between two nodes. A batch
//! with nothing to wait for is answered *accepted* at once. *Unknown* answers a done
//! request for a batch the receiver has no record of (it restarted): the sender sends
//! it again. `base` is the sender's oldest batch that is not done; after a failure the
//! sender sends every batch from there again, in order, and a batch that was done
//! meanwhile goes again with no records, so the numbering stays without gaps.
//!
//! **Shares** (cluster protocol version 7): the sender's whole table of its shared
//! subscriptions' connected members, per (group, filter) with members on it (a share
//! whose members are all offline counts 0), sent to every other member when it changes
//! and again every few seconds. It replaces what the receiver knew of the sender, which
//! weighs the sender by those counts when it gives a shared message to another node, so
//! a member is one member whichever node it is on (docs/ARCHITECTURE.md, "Cluster data
//! plane", shared subscriptions).
//!
//! A retained message too large to ride in the raft log is replaced there by a
//! *reference* ([`RetainedRef`]): `0xA5 | size u32 | digest u128` (the record's size on
//! its origin node and [`retained_digest`] of the message), which no request starts
//! with. Another node fetches the message from the origin with it and keeps it only if
//! its digest matches.
//!
//! Bytes from a peer are untrusted: [`decode_request`] and [`decode_answer`] check every
//! length, bound and field and return an error, never panic.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tessera_proto::{Encode, Packet, ProtocolVersion, Publish, PublishProperties, QoS, Str, topic};
use tessera_shard::mesh::PubId;
use tessera_shard::message::Message;

/// Most publications one batch may carry.
pub const BATCH_MESSAGES_MAX: usize = 1 << 16;
/// Most shares one shares request may list.
pub const SHARES_MAX: usize = 1 << 16;

const REQ_BATCH: u8 = 1;
const REQ_BARRIER: u8 = 2;
const REQ_BATCH_BASE: u8 = 3;
const REQ_DONE: u8 = 4;
const REQ_SHARES: u8 = 5;
const ANS_ACCEPTED: u8 = 1;
const ANS_APPLIED: u8 = 2;
const ANS_RECEIVED: u8 = 3;
const ANS_UNKNOWN: u8 = 4;
const ANS_NOTED: u8 = 5;
const FLAG_EXPIRY: u8 = 1;
const FLAG_SHARE: u8 = 2;
const FLAG_HANDED_BACK: u8 = 4;
const FLAG_ID: u8 = 8;
const FLAG_SESSION: u8 = 16;
const FLAG_ROUTES: u8 = 32;

/// The shared subscription a record is for: one member of `$share/{group}/{filter}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareFor {
    /// The ShareName.
    pub group: Str,
    /// The topic filter after `$share/{group}/`.
    pub filter: Str,
    /// Another node had no member left for it and handed it back to the group (it is
    /// not handed back again).
    pub handed_back: bool,
}

/// One forwarded publication as decoded.
#[derive(Debug, Clone)]
pub struct Record {
    /// The publisher's identity on its node.
    pub publisher: u64,
    /// The remaining lifetime, ms, when the message expires.
    pub expiry_ms: Option<u64>,
    /// For one member of a shared subscription.
    pub share: Option<ShareFor>,
    /// The publication's cluster-wide identity.
    pub id: Option<PubId>,
    /// For one session that moved to the receiver: (ClientID, its claim epoch).
    pub session: Option<(Str, u64)>,
    /// The sender's applied raft log index when it matched the publication against
    /// the receiver's routes (a plain record; see the module).
    pub routes: Option<u64>,
    /// The message (origin and `received_us` unset: the receiver sets them).
    pub message: Message,
}

/// A request on the forward channel.
#[derive(Debug, Clone)]
pub enum Request {
    /// Publications, in the order they were accepted on the sender.
    Batch {
        /// The sender's boot instance.
        incarnation: u64,
        /// The batch's number, from 1.
        seq: u64,
        /// The sender's oldest batch without an answer when it sent this one.
        base: u64,
        /// The publications.
        records: Vec<Record>,
    },
    /// "Answer once every route applied at or below `index` is in force here."
    Barrier {
        /// The raft log index.
        index: u64,
    },
    /// "Answer once batch `seq`, which you answered received, is complete."
    Done {
        /// The sender's boot instance.
        incarnation: u64,
        /// The batch's number.
        seq: u64,
    },
    /// The sender's shared subscriptions and their connected members (all of them:
    /// it replaces what the receiver knew).
    Shares {
        /// One per (group, filter) the sender has members of.
        counts: Vec<ShareCount>,
    },
}

/// One shared subscription of a node and its connected members there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareCount {
    /// The ShareName.
    pub group: Str,
    /// The topic filter after `$share/{group}/`.
    pub filter: Str,
    /// Connected members on the sending node.
    pub members: u32,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The batch `seq` was accepted (or had been: a retry).
    Accepted {
        /// The batch's number.
        seq: u64,
    },
    /// Routes up to `index` are in force on the answering node.
    Applied {
        /// The index asked about.
        index: u64,
    },
    /// The batch `seq` was accepted, in order, and is not complete yet: ask
    /// [`Request::Done`] for it.
    Received {
        /// The batch's number.
        seq: u64,
    },
    /// A done request for batch `seq`, of which the receiver has no record (it
    /// restarted): send it again.
    Unknown {
        /// The batch's number.
        seq: u64,
    },
    /// A shares request was taken.
    Noted,
}

/// Why bytes from a peer were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed forward {what}: {reason}")]
pub struct WireError {
    what: &'static str,
    reason: String,
}

/// A batch that does not come next from its sender (see the module): refused, so the
/// sender sends it again after the one before it.
pub fn out_of_order(reason: String) -> WireError {
    err("batch", reason)
}

fn err(what: &'static str, reason: impl Into<String>) -> WireError {
    WireError {
        what,
        reason: reason.into(),
    }
}

/// What a record carries beside its publication (see the module); the default is a
/// plain record with none of it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tags<'a> {
    /// For one member of this shared subscription.
    pub share: Option<&'a ShareFor>,
    /// The publication's cluster-wide id.
    pub id: Option<PubId>,
    /// For one session that moved to the receiver: (ClientID, claim epoch). Left out
    /// of a shared record.
    pub session: Option<(&'a Str, u64)>,
    /// The sender's applied log index when it matched the publication against the
    /// receiver's routes. Written for a plain record only.
    pub routes: Option<u64>,
}

/// Builds one batch request, record by record, into one buffer.
#[derive(Debug)]
pub struct BatchWriter {
    buf: BytesMut,
    count: u32,
    /// Where the count field is.
    count_at: usize,
}

impl BatchWriter {
    /// A batch `seq` of sender `incarnation`, after `prefix` (the link envelope's
    /// header, written here so the batch is never copied to add it).
    pub fn new(prefix: &[u8], incarnation: u64, seq: u64) -> BatchWriter {
        BatchWriter::start(prefix, incarnation, seq, None)
    }

    /// A batch `seq` sent while the sender's batches from `base` on are unanswered
    /// (tag 3; see the module).
    pub fn with_base(prefix: &[u8], incarnation: u64, seq: u64, base: u64) -> BatchWriter {
        BatchWriter::start(prefix, incarnation, seq, Some(base))
    }

    fn start(prefix: &[u8], incarnation: u64, seq: u64, base: Option<u64>) -> BatchWriter {
        let mut buf = BytesMut::with_capacity(4096);
        buf.put_slice(prefix);
        buf.put_u8(if base.is_some() {
            REQ_BATCH_BASE
        } else {
            REQ_BATCH
        });
        buf.put_u64(incarnation);
        buf.put_u64(seq);
        if let Some(base) = base {
            buf.put_u64(base);
        }
        buf.put_u32(0); // count, set by `finish`
        let count_at = buf.len() - 4;
        BatchWriter {
            buf,
            count: 0,
            count_at,
        }
    }

    /// Publications in the batch so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the batch so far.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Appends `message` published by `publisher`; `now_ms` is the broker clock its
    /// expiry deadline is relative to. A message that cannot be encoded (it came from a
    /// decoded PUBLISH, so only a bug makes one) is skipped and `false` returned.
    /// `share` names the shared subscription the message is for, when it is for one
    /// member of it.
    pub fn push(
        &mut self,
        now_ms: u64,
        publisher: u64,
        message: &Message,
        share: Option<&ShareFor>,
    ) -> bool {
        let tags = Tags {
            share,
            ..Tags::default()
        };
        self.push_tagged(now_ms, publisher, message, tags)
    }

    /// [`BatchWriter::push`] with everything a record may carry ([`Tags`]).
    pub fn push_tagged(
        &mut self,
        now_ms: u64,
        publisher: u64,
        message: &Message,
        tags: Tags<'_>,
    ) -> bool {
        let Tags {
            share,
            id,
            session,
            routes,
        } = tags;
        // Only a plain record is matched against the receiver's routes.
        let routes = routes.filter(|_| share.is_none() && session.is_none());
        if self.len() >= BATCH_MESSAGES_MAX {
            return false;
        }
        let mut p = Publish::new(message.topic.clone(), message.payload.clone());
        p.qos = message.qos;
        p.retain = message.retain;
        p.packet_id = u16::from(message.qos != QoS::AtMostOnce);
        // Properties travel by value in the PUBLISH (as in every delivery's
        // PUBLISH); a message without any (the common case) costs nothing here.
        if let Some(props) = &message.properties {
            p.properties = PublishProperties::clone(props);
        }
        let start = self.buf.len();
        let expiry = message.expires_at_ms.map(|t| t.saturating_sub(now_ms));
        let flags = if expiry.is_some() { FLAG_EXPIRY } else { 0 }
            | match share {
                Some(s) if s.handed_back => FLAG_SHARE | FLAG_HANDED_BACK,
                Some(_) => FLAG_SHARE,
                None => 0,
            }
            | if id.is_some() { FLAG_ID } else { 0 }
            | if session.is_some() && share.is_none() {
                FLAG_SESSION
            } else {
                0
            }
            | if routes.is_some() { FLAG_ROUTES } else { 0 };
        self.buf.put_u8(flags);
        self.buf.put_u64(publisher);
        if let Some(e) = expiry {
            self.buf.put_u64(e);
        }
        if let Some(share) = share {
            for s in [&share.group, &share.filter] {
                // MQTT strings are at most 65,535 bytes.
                self.buf.put_u16(s.len() as u16);
                self.buf.put_slice(s.as_bytes());
            }
        }
        if let Some(id) = id {
            self.buf.put_u64(id.origin);
            self.buf.put_u16(id.shard);
            self.buf.put_u64(id.seq);
        }
        if let (Some((client_id, epoch)), None) = (session, share) {
            self.buf.put_u64(epoch);
            self.buf.put_u16(client_id.len() as u16);
            self.buf.put_slice(client_id.as_bytes());
        }
        if let Some(index) = routes {
            self.buf.put_u64(index);
        }
        let len = p.encoded_len(ProtocolVersion::V5);
        let ok = u32::try_from(len).is_ok_and(|len| {
            self.buf.put_u32(len);
            p.encode(ProtocolVersion::V5, &mut self.buf).is_ok()
        });
        if !ok {
            self.buf.truncate(start);
            return false;
        }
        self.count += 1;
        true
    }

    /// The request bytes.
    pub fn finish(mut self) -> Bytes {
        let at = self.count_at;
        self.buf[at..at + 4].copy_from_slice(&self.count.to_be_bytes());
        self.buf.freeze()
    }
}

/// The batch request `batch` (made by [`BatchWriter::with_base`] after `prefix_len`
/// bytes of prefix) with its `base` set to `base`: a retry after the batches before it
/// were answered. A copy (a retry is rare); `None` if `batch` is not such a request.
pub fn rebase(batch: &Bytes, prefix_len: usize, base: u64) -> Option<Bytes> {
    let at = prefix_len + 1 + 16;
    if batch.get(prefix_len) != Some(&REQ_BATCH_BASE) || batch.len() < at + 8 {
        return None;
    }
    let mut b = BytesMut::from(&batch[..]);
    b[at..at + 8].copy_from_slice(&base.to_be_bytes());
    Some(b.freeze())
}

/// A barrier request, after `prefix`.
pub fn encode_barrier(prefix: &[u8], index: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(prefix.len() + 9);
    b.put_slice(prefix);
    b.put_u8(REQ_BARRIER);
    b.put_u64(index);
    b.freeze()
}

/// A done request, after `prefix`.
pub fn encode_done(prefix: &[u8], incarnation: u64, seq: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(prefix.len() + 17);
    b.put_slice(prefix);
    b.put_u8(REQ_DONE);
    b.put_u64(incarnation);
    b.put_u64(seq);
    b.freeze()
}

/// A shares request, after `prefix`: `(group, filter, connected members)` each.
/// Strings longer than an MQTT string can be are left out (a valid subscription's
/// never are).
pub fn encode_shares<'a>(
    prefix: &[u8],
    counts: impl ExactSizeIterator<Item = (&'a str, &'a str, u32)>,
) -> Bytes {
    let mut b = BytesMut::with_capacity(prefix.len() + 5 + counts.len() * 32);
    b.put_slice(prefix);
    b.put_u8(REQ_SHARES);
    let at = b.len();
    b.put_u32(0);
    let mut n: u32 = 0;
    for (group, filter, members) in counts.take(SHARES_MAX) {
        let (Ok(g), Ok(f)) = (u16::try_from(group.len()), u16::try_from(filter.len())) else {
            continue;
        };
        b.put_u16(g);
        b.put_slice(group.as_bytes());
        b.put_u16(f);
        b.put_slice(filter.as_bytes());
        b.put_u32(members);
        n += 1;
    }
    b[at..at + 4].copy_from_slice(&n.to_be_bytes());
    b.freeze()
}

/// An answer.
pub fn encode_answer(a: Answer) -> Bytes {
    let (tag, v) = match a {
        Answer::Accepted { seq } => (ANS_ACCEPTED, seq),
        Answer::Applied { index } => (ANS_APPLIED, index),
        Answer::Received { seq } => (ANS_RECEIVED, seq),
        Answer::Unknown { seq } => (ANS_UNKNOWN, seq),
        Answer::Noted => (ANS_NOTED, 0),
    };
    let mut b = BytesMut::with_capacity(9);
    b.put_u8(tag);
    b.put_u64(v);
    b.freeze()
}

/// Decodes an answer from a peer.
pub fn decode_answer(mut b: Bytes) -> Result<Answer, WireError> {
    if b.len() != 9 {
        return Err(err("answer", format!("{} bytes, expected 9", b.len())));
    }
    let tag = b.get_u8();
    let v = b.get_u64();
    match tag {
        ANS_ACCEPTED => Ok(Answer::Accepted { seq: v }),
        ANS_APPLIED => Ok(Answer::Applied { index: v }),
        ANS_RECEIVED => Ok(Answer::Received { seq: v }),
        ANS_UNKNOWN => Ok(Answer::Unknown { seq: v }),
        ANS_NOTED if v == 0 => Ok(Answer::Noted),
        t => Err(err("answer", format!("unknown tag {t}"))),
    }
}

fn take_u64(b: &mut Bytes, what: &'static str) -> Result<u64, WireError> {
    if b.remaining() < 8 {
        return Err(err(what, "truncated"));
    }
    Ok(b.get_u64())
}

fn take_str(b: &mut Bytes) -> Result<Str, WireError> {
    if b.remaining() < 2 {
        return Err(err("record", "truncated"));
    }
    let len = usize::from(b.get_u16());
    if len > b.remaining() {
        return Err(err("record", "string longer than the batch"));
    }
    Str::from_bytes(b.split_to(len)).map_err(|e| err("record", e.to_string()))
}

fn take_u32(b: &mut Bytes, what: &'static str) -> Result<u32, WireError> {
    if b.remaining() < 4 {
        return Err(err(what, "truncated"));
    }
    Ok(b.get_u32())
}

/// Decodes a request from a peer. Topic names are checked as a client's would be
/// (`topic_levels_max` levels at most); payloads are slices of `b`.
pub fn decode_request(mut b: Bytes, topic_levels_max: usize) -> Result<Request, WireError> {
    if b.is_empty() {
        return Err(err("request", "empty"));
    }
    match b.get_u8() {
        REQ_BARRIER => {
            let index = take_u64(&mut b, "barrier")?;
            if b.has_remaining() {
                return Err(err("barrier", "trailing bytes"));
            }
            Ok(Request::Barrier { index })
        }
        REQ_SHARES => {
            let count = take_u32(&mut b, "shares")? as usize;
            if count > SHARES_MAX {
                return Err(err("shares", format!("{count} shares exceed the bound")));
            }
            // Each takes at least 8 bytes: never reserve more than the bytes could hold.
            let mut counts = Vec::with_capacity(count.min(b.remaining() / 8));
            for _ in 0..count {
                let group = take_str(&mut b)?;
                let filter = take_str(&mut b)?;
                let members = take_u32(&mut b, "shares")?;
                counts.push(ShareCount {
                    group,
                    filter,
                    members,
                });
            }
            if b.has_remaining() {
                return Err(err("shares", "trailing bytes"));
            }
            Ok(Request::Shares { counts })
        }
        REQ_DONE => {
            let incarnation = take_u64(&mut b, "done")?;
            let seq = take_u64(&mut b, "done")?;
            if b.has_remaining() {
                return Err(err("done", "trailing bytes"));
            }
            Ok(Request::Done { incarnation, seq })
        }
        tag @ (REQ_BATCH | REQ_BATCH_BASE) => {
            let incarnation = take_u64(&mut b, "batch header")?;
            let seq = take_u64(&mut b, "batch header")?;
            let base = if tag == REQ_BATCH_BASE {
                take_u64(&mut b, "batch header")?
            } else {
                seq
            };
            if base > seq {
                return Err(err("batch header", format!("base {base} above seq {seq}")));
            }
            let count = take_u32(&mut b, "batch header")? as usize;
            if count > BATCH_MESSAGES_MAX {
                return Err(err("batch", format!("{count} records exceed the bound")));
            }
            // Each record takes at least 15 bytes: never reserve more than the bytes
            // could hold.
            let mut records = Vec::with_capacity(count.min(b.remaining() / 15));
            for _ in 0..count {
                records.push(decode_record(&mut b, topic_levels_max)?);
            }
            if b.has_remaining() {
                return Err(err("batch", "trailing bytes"));
            }
            Ok(Request::Batch {
                incarnation,
                seq,
                base,
                records,
            })
        }
        t => Err(err("request", format!("unknown tag {t}"))),
    }
}

fn decode_record(b: &mut Bytes, topic_levels_max: usize) -> Result<Record, WireError> {
    if !b.has_remaining() {
        return Err(err("record", "truncated"));
    }
    let flags = b.get_u8();
    if flags & !(FLAG_EXPIRY | FLAG_SHARE | FLAG_HANDED_BACK | FLAG_ID | FLAG_SESSION | FLAG_ROUTES)
        != 0
        || flags & (FLAG_SHARE | FLAG_HANDED_BACK) == FLAG_HANDED_BACK
        || flags & (FLAG_SHARE | FLAG_SESSION) == FLAG_SHARE | FLAG_SESSION
        || flags & FLAG_ROUTES != 0 && flags & (FLAG_SHARE | FLAG_SESSION) != 0
    {
        return Err(err("record", format!("unknown flags {flags:#04x}")));
    }
    let publisher = take_u64(b, "record")?;
    let expiry_ms = if flags & FLAG_EXPIRY != 0 {
        Some(take_u64(b, "record")?)
    } else {
        None
    };
    let share = if flags & FLAG_SHARE != 0 {
        let group = take_str(b)?;
        let filter = take_str(b)?;
        if group.is_empty() || group.contains(['/', '+', '#']) {
            return Err(err("record", "invalid share name"));
        }
        topic::validate_topic_filter(&filter, topic_levels_max)
            .map_err(|e| err("record", format!("shared filter: {e}")))?;
        Some(ShareFor {
            group,
            filter,
            handed_back: flags & FLAG_HANDED_BACK != 0,
        })
    } else {
        None
    };
    let id = if flags & FLAG_ID != 0 {
        let origin = take_u64(b, "record")?;
        if b.remaining() < 2 {
            return Err(err("record", "truncated"));
        }
        let shard = b.get_u16();
        let seq = take_u64(b, "record")?;
        Some(PubId { origin, shard, seq })
    } else {
        None
    };
    let session = if flags & FLAG_SESSION != 0 {
        let epoch = take_u64(b, "record")?;
        let client_id = take_str(b)?;
        if client_id.is_empty() {
            return Err(err("record", "empty ClientID"));
        }
        Some((client_id, epoch))
    } else {
        None
    };
    let routes = if flags & FLAG_ROUTES != 0 {
        Some(take_u64(b, "record")?)
    } else {
        None
    };
    let len = take_u32(b, "record")? as usize;
    if len > b.remaining() {
        return Err(err("record", "PUBLISH longer than the batch"));
    }
    let frame = b.split_to(len);
    let header = tessera_proto::check(&frame, len).map_err(|e| err("record", e.to_string()))?;
    if header.frame_len() != len {
        return Err(err("record", "length disagrees with the PUBLISH frame"));
    }
    let body = frame.slice(header.header_len..);
    let packet = tessera_proto::decode_body(&header, body, ProtocolVersion::V5)
        .map_err(|e| err("record", e.to_string()))?;
    let Packet::Publish(p) = packet else {
        return Err(err("record", "not a PUBLISH"));
    };
    if p.dup
        || p.properties.topic_alias.is_some()
        || !p.properties.subscription_identifiers.is_empty()
        || p.properties.message_expiry_interval.is_some()
    {
        return Err(err(
            "record",
            "DUP, topic alias, subscription ids or expiry interval in a forwarded PUBLISH",
        ));
    }
    topic::validate_topic_name(&p.topic, topic_levels_max)
        .map_err(|e| err("record", format!("topic: {e}")))?;
    let properties = (!p.properties.is_empty()).then(|| Arc::new(p.properties));
    Ok(Record {
        publisher,
        expiry_ms,
        share,
        id,
        session,
        routes,
        message: Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties,
            expires_at_ms: None,
            origin: None,
            received_us: 0,
        },
    })
}

/// First byte of a retained reference (never the first byte of a request).
const RETAINED_REF: u8 = 0xA5;
/// Bytes of an encoded [`RetainedRef`].
pub const RETAINED_REF_BYTES: usize = 21;

/// What the raft log carries for a retained message kept on its origin node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedRef {
    /// The retained record's size on the origin, bytes.
    pub size: u32,
    /// [`retained_digest`] of the message.
    pub digest: u128,
}

impl RetainedRef {
    /// The reference as the log carries it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RETAINED_REF_BYTES);
        out.push(RETAINED_REF);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.digest.to_be_bytes());
        out
    }

    /// The reference in `bytes`, `None` when they are not one (an inline record).
    pub fn decode(bytes: &[u8]) -> Option<RetainedRef> {
        if bytes.len() != RETAINED_REF_BYTES || bytes[0] != RETAINED_REF {
            return None;
        }
        Some(RetainedRef {
            size: u32::from_be_bytes(bytes[1..5].try_into().ok()?),
            digest: u128::from_be_bytes(bytes[5..21].try_into().ok()?),
        })
    }
}

/// The digest of a retained message: its topic, QoS and payload (what a subscriber
/// gets), so a fetched message that is not the version the log names is refused.
pub fn retained_digest(m: &Message) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(m.topic.len() as u32).to_be_bytes());
    h.update(m.topic.as_bytes());
    h.update(&[m.qos as u8]);
    h.update(&m.payload);
    h.digest128()
}

/// Encodes `m` as one retained record (a batch of one publication, `publisher` as
/// given, the remaining expiry relative to `now_ms`): inline in the log, or the answer
/// to a fetch of a large one.
pub fn retained_record(now_ms: u64, publisher: u64, m: &Message) -> Bytes {
    let mut w = BatchWriter::new(&[], 0, 0);
    w.push(now_ms, publisher, m, None);
    w.finish()
}

/// The single publication of a retained record, checked like any request.
pub fn decode_retained_record(bytes: Bytes) -> Result<Record, WireError> {
    match decode_request(bytes, topic::TOPIC_LEVELS_MAX)? {
        Request::Batch { mut records, .. } if records.len() == 1 => {
            Ok(records.pop().expect("one record"))
        }
        _ => Err(err("retained record", "not exactly one publication")),
    }
}

#[cfg(test)]
mod tests {
    //! Round trips of generated batches, and the decoder against every truncation,
    //! random corruption and hand-made lies: an error, never a panic, never an
    //! allocation beyond what arrived.

    use proptest::prelude::*;

    use super::*;

    /// A record's tags without a routes index.
    fn tags<'a>(
        share: Option<&'a ShareFor>,
        id: Option<PubId>,
        session: Option<(&'a Str, u64)>,
    ) -> Tags<'a> {
        Tags {
            share,
            id,
            session,
            routes: None,
        }
    }

    #[test]
    fn retained_references_and_records_are_checked() {
        let m = message("big/a", &[7u8; 4096], 1, true, true);
        let r = RetainedRef {
            size: 4200,
            digest: retained_digest(&m),
        };
        assert_eq!(RetainedRef::decode(&r.encode()), Some(r));
        // An inline record is not a reference, nor is anything of another length.
        let record = retained_record(0, 9, &m);
        assert_eq!(RetainedRef::decode(&record), None);
        assert_eq!(RetainedRef::decode(&r.encode()[..20]), None);
        assert_eq!(RetainedRef::decode(&[]), None);
        // Another payload, topic or QoS is another digest.
        for other in [
            message("big/a", &[8u8; 4096], 1, true, true),
            message("big/b", &[7u8; 4096], 1, true, true),
            message("big/a", &[7u8; 4096], 2, true, true),
        ] {
            assert_ne!(retained_digest(&other), r.digest);
        }
        let back = decode_retained_record(record.clone()).unwrap();
        assert_eq!(retained_digest(&back.message), r.digest);
        assert_eq!(back.publisher, 9);
        // Truncations and a barrier are errors, never a panic.
        for n in 0..record.len() {
            assert!(decode_retained_record(record.slice(..n)).is_err());
        }
        assert!(decode_retained_record(encode_barrier(&[], 5)).is_err());
    }

    fn message(topic: &str, payload: &[u8], qos: u8, retain: bool, props: bool) -> Message {
        let properties = props.then(|| {
            Arc::new(PublishProperties {
                content_type: Some(Str::try_from("text/plain").unwrap()),
                user_properties: vec![(Str::try_from("k").unwrap(), Str::try_from("v").unwrap())],
                correlation_data: Some(Bytes::from_static(b"c")),
                ..Default::default()
            })
        });
        Message {
            topic: Str::try_from(topic).unwrap(),
            payload: Bytes::copy_from_slice(payload),
            qos: QoS::from_u8(qos).unwrap(),
            retain,
            properties,
            expires_at_ms: None,
            origin: None,
            received_us: 0,
        }
    }

    fn batch() -> Bytes {
        let mut w = BatchWriter::new(&[], 7, 3);
        let mut m = message("a/b", b"hello", 1, true, true);
        m.expires_at_ms = Some(5_000);
        assert!(w.push(1_000, 42, &m, None));
        assert!(w.push(1_000, 43, &message("c", b"", 0, false, false), None));
        w.finish()
    }

    #[test]
    fn a_batch_round_trips_with_payloads_sliced_from_the_frame() {
        let bytes = batch();
        let Request::Batch {
            incarnation,
            seq,
            base,
            records,
        } = decode_request(bytes.clone(), 16).unwrap()
        else {
            panic!("not a batch")
        };
        assert_eq!((incarnation, seq, base, records.len()), (7, 3, 3, 2));
        let r = &records[0];
        assert_eq!(r.publisher, 42);
        assert_eq!(r.expiry_ms, Some(4_000));
        assert_eq!(r.message.topic, "a/b");
        assert_eq!(&r.message.payload[..], b"hello");
        assert_eq!(r.message.qos, QoS::AtLeastOnce);
        assert!(r.message.retain);
        let p = r.message.properties.as_ref().unwrap();
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.user_properties.len(), 1);
        // The payload is a view of the request's buffer, not a copy.
        let range = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
        assert!(range.contains(&(r.message.payload.as_ptr() as usize)));
        assert_eq!(records[1].message.qos, QoS::AtMostOnce);
        assert!(records[1].message.properties.is_none());
        assert_eq!(records[1].expiry_ms, None);
    }

    #[test]
    fn ids_and_moved_sessions_round_trip_and_lies_are_refused() {
        let id = PubId {
            origin: u64::MAX - 3,
            shard: 7,
            seq: 1 << 40,
        };
        let c = Str::from_static("c1");
        let mut w = BatchWriter::new(&[], 1, 1);
        let m = message("t", b"p", 2, false, false);
        assert!(w.push_tagged(0, 1, &m, tags(None, Some(id), None)));
        assert!(w.push_tagged(0, 2, &m, tags(None, Some(id), Some((&c, 99)))));
        assert!(w.push_tagged(0, 3, &m, tags(None, None, Some((&c, 5)))));
        let share = ShareFor {
            group: Str::from_static("g"),
            filter: Str::from_static("t"),
            handed_back: false,
        };
        // A shared record is never for one session: the session is left out.
        assert!(w.push_tagged(0, 4, &m, tags(Some(&share), None, Some((&c, 5)))));
        let bytes = w.finish();
        let Ok(Request::Batch { records, .. }) = decode_request(bytes.clone(), 16) else {
            panic!("not a batch")
        };
        let got: Vec<_> = records
            .iter()
            .map(|r| (r.id, r.session.as_ref().map(|(c, e)| (c.to_string(), *e))))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(id), None),
                (Some(id), Some(("c1".into(), 99))),
                (None, Some(("c1".into(), 5))),
                (None, None),
            ]
        );
        for n in 0..bytes.len() {
            assert!(decode_request(bytes.slice(..n), 16).is_err());
        }
        // A record that is both shared and for one session, or for an empty ClientID.
        let mut w = BatchWriter::new(&[], 1, 1);
        assert!(w.push_tagged(0, 1, &m, tags(Some(&share), None, None)));
        let mut lie = BytesMut::from(&w.finish()[..]);
        let flags_at = 1 + 8 + 8 + 4;
        lie[flags_at] |= FLAG_SESSION;
        assert!(decode_request(lie.freeze(), 16).is_err());
        let empty = Str::from_static("");
        let mut w = BatchWriter::new(&[], 1, 1);
        assert!(w.push_tagged(0, 1, &m, tags(None, None, Some((&empty, 1)))));
        assert!(decode_request(w.finish(), 16).is_err());
    }

    #[test]
    fn a_plain_record_carries_its_routes_index_and_lies_are_refused() {
        let m = message("t/1", b"p", 2, false, false);
        let share = ShareFor {
            group: Str::from_static("g"),
            filter: Str::from_static("t/+"),
            handed_back: false,
        };
        let c = Str::from_static("c3");
        let plain = |routes| Tags {
            routes,
            ..Tags::default()
        };
        let mut w = BatchWriter::new(&[], 1, 1);
        assert!(w.push_tagged(0, 1, &m, plain(Some(77))));
        assert!(w.push_tagged(0, 1, &m, plain(Some(u64::MAX))));
        assert!(w.push_tagged(0, 1, &m, plain(None)));
        // Only a plain record is matched against the receiver's routes: a shared or a
        // moved session's record leaves the index out.
        let shared = Tags {
            share: Some(&share),
            routes: Some(5),
            ..Tags::default()
        };
        assert!(w.push_tagged(0, 1, &m, shared));
        let moved = Tags {
            session: Some((&c, 4)),
            routes: Some(5),
            ..Tags::default()
        };
        assert!(w.push_tagged(0, 1, &m, moved));
        let bytes = w.finish();
        let Ok(Request::Batch { records, .. }) = decode_request(bytes.clone(), 16) else {
            panic!("not a batch")
        };
        let got: Vec<_> = records.iter().map(|r| r.routes).collect();
        assert_eq!(got, vec![Some(77), Some(u64::MAX), None, None, None]);
        assert!(records[3].share.is_some() && records[4].session.is_some());
        for n in 0..bytes.len() {
            assert!(decode_request(bytes.slice(..n), 16).is_err(), "cut {n}");
        }
        // The index beside a share or a session is malformed (eight bytes follow
        // where the sender put them, so only the flags lie).
        let flags_at = 1 + 8 + 8 + 4;
        for tags in [
            Tags {
                share: Some(&share),
                ..Tags::default()
            },
            Tags {
                session: Some((&c, 4)),
                ..Tags::default()
            },
        ] {
            let mut w = BatchWriter::new(&[], 1, 1);
            assert!(w.push_tagged(0, 1, &m, tags));
            let mut v = w.finish().to_vec();
            assert!(decode_request(Bytes::from(v.clone()), 16).is_ok());
            v[flags_at] |= FLAG_ROUTES;
            let at = v.len() - m_len(&m);
            v.splice(at - 4..at - 4, 9u64.to_be_bytes());
            assert!(decode_request(Bytes::from(v), 16).is_err());
        }
        // A plain record whose flags hide its index does not decode either.
        let mut w = BatchWriter::new(&[], 1, 1);
        assert!(w.push_tagged(0, 1, &m, plain(Some(3))));
        let mut v = w.finish().to_vec();
        assert_eq!(v[flags_at], FLAG_ROUTES);
        v[flags_at] = 0;
        assert!(decode_request(Bytes::from(v), 16).is_err());
    }

    /// Bytes of `m`'s PUBLISH frame in a record.
    fn m_len(m: &Message) -> usize {
        let mut p = Publish::new(m.topic.clone(), m.payload.clone());
        p.qos = m.qos;
        p.packet_id = u16::from(m.qos != QoS::AtMostOnce);
        p.encoded_len(ProtocolVersion::V5)
    }

    #[test]
    fn a_prefix_goes_in_front_untouched() {
        let mut w = BatchWriter::new(&[2, 0, 0], 1, 1);
        assert!(w.push(0, 1, &message("t", b"p", 0, false, false), None));
        let b = w.finish();
        assert_eq!(&b[..3], &[2, 0, 0]);
        assert!(matches!(
            decode_request(b.slice(3..), 16),
            Ok(Request::Batch { records, .. }) if records.len() == 1
        ));
        assert_eq!(&encode_barrier(&[2, 0, 0], 5)[..4], &[2, 0, 0, REQ_BARRIER]);
    }

    #[test]
    fn a_shared_record_names_its_group_and_filter() {
        let share = |group: &'static str, handed_back| ShareFor {
            group: Str::from_static(group),
            filter: Str::from_static("jobs/+"),
            handed_back,
        };
        for handed_back in [false, true] {
            let s = share("workers", handed_back);
            let mut w = BatchWriter::new(&[], 1, 1);
            assert!(w.push(0, 9, &message("jobs/1", b"j", 1, false, false), Some(&s)));
            assert!(w.push(0, 9, &message("jobs/2", b"j", 1, false, false), None));
            let Ok(Request::Batch { records, .. }) = decode_request(w.finish(), 16) else {
                panic!("not a batch")
            };
            assert_eq!(records[0].share, Some(s));
            assert_eq!(records[1].share, None);
        }
        // A share name with a wildcard is refused.
        let mut w = BatchWriter::new(&[], 1, 1);
        let bad = share("w+", false);
        assert!(w.push(0, 9, &message("jobs/1", b"j", 1, false, false), Some(&bad)));
        assert!(decode_request(w.finish(), 16).is_err());
        // "Handed back" without a share is malformed.
        let mut w = BatchWriter::new(&[], 1, 1);
        assert!(w.push(0, 9, &message("jobs/1", b"j", 1, false, false), None));
        let mut bytes = BytesMut::from(&w.finish()[..]);
        let flags_at = 1 + 8 + 8 + 4;
        assert_eq!(bytes[flags_at], 0, "the record's flags");
        bytes[flags_at] = FLAG_HANDED_BACK;
        assert!(decode_request(bytes.freeze(), 16).is_err());
    }

    #[test]
    fn barriers_and_answers_round_trip() {
        assert!(matches!(
            decode_request(encode_barrier(&[], 99), 16),
            Ok(Request::Barrier { index: 99 })
        ));
        let done = encode_done(&[], 7, 42);
        assert!(matches!(
            decode_request(done.clone(), 16),
            Ok(Request::Done {
                incarnation: 7,
                seq: 42
            })
        ));
        for cut in 0..done.len() {
            assert!(decode_request(done.slice(..cut), 16).is_err(), "cut {cut}");
        }
        let mut long = BytesMut::from(&done[..]);
        long.put_u8(0);
        assert!(decode_request(long.freeze(), 16).is_err());
        for a in [
            Answer::Accepted { seq: 5 },
            Answer::Applied { index: 6 },
            Answer::Received { seq: 7 },
            Answer::Unknown { seq: 8 },
            Answer::Noted,
        ] {
            assert_eq!(decode_answer(encode_answer(a)), Ok(a));
        }
        assert!(decode_answer(Bytes::from_static(&[9; 9])).is_err());
        assert!(decode_answer(Bytes::from_static(&[1; 3])).is_err());
        assert!(decode_answer(Bytes::from_static(&[5, 0, 0, 0, 0, 0, 0, 0, 1])).is_err());
    }

    /// A node's share table round-trips; every truncation, a count above the bound or
    /// beyond the bytes, trailing bytes and a string that is not UTF-8 are errors,
    /// never a panic.
    #[test]
    fn shares_round_trip_and_bad_ones_are_errors() {
        let table = [("workers", "jobs/#", 3u32), ("g", "a/+/b", 0)];
        let shares = encode_shares(&[2, 0, 0], table.iter().copied());
        assert_eq!(&shares[..4], &[2, 0, 0, REQ_SHARES]);
        let shares = shares.slice(3..);
        let Ok(Request::Shares { counts }) = decode_request(shares.clone(), 16) else {
            panic!("not decoded");
        };
        let got: Vec<(&str, &str, u32)> = counts
            .iter()
            .map(|c| (&*c.group, &*c.filter, c.members))
            .collect();
        assert_eq!(got, table);
        assert!(matches!(
            decode_request(encode_shares(&[], std::iter::empty()), 16),
            Ok(Request::Shares { counts }) if counts.is_empty()
        ));
        for cut in 1..shares.len() {
            assert!(
                decode_request(shares.slice(..cut), 16).is_err(),
                "cut {cut}"
            );
        }
        let mut long = BytesMut::from(&shares[..]);
        long.put_u8(0);
        assert!(decode_request(long.freeze(), 16).is_err());
        let mut many = BytesMut::from(&[REQ_SHARES][..]);
        many.put_u32(u32::MAX);
        assert!(decode_request(many.freeze(), 16).is_err());
        let mut beyond = BytesMut::from(&[REQ_SHARES][..]);
        beyond.put_u32(1000);
        assert!(decode_request(beyond.freeze(), 16).is_err());
        let mut bad = BytesMut::from(&[REQ_SHARES][..]);
        bad.put_u32(1);
        bad.put_u16(1);
        bad.put_u8(0xff);
        bad.put_u16(1);
        bad.put_u8(b'a');
        bad.put_u32(1);
        assert!(decode_request(bad.freeze(), 16).is_err());
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_or_a_valid_batch() {
        let bytes = batch();
        for cut in 0..bytes.len() {
            assert!(decode_request(bytes.slice(..cut), 16).is_err(), "cut {cut}");
        }
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut v = bytes.to_vec();
            for _ in 0..1 + (rng % 3) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng as usize) % v.len();
                v[i] ^= (rng >> 32) as u8 | 1;
            }
            if let Ok(Request::Batch { records, .. }) = decode_request(Bytes::from(v), 16) {
                for r in records {
                    assert!(topic::validate_topic_name(&r.message.topic, 16).is_ok());
                }
            }
        }
    }

    #[test]
    fn lies_in_lengths_and_fields_are_refused() {
        // A count far beyond the records present.
        let mut v = batch().to_vec();
        v[17..21].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_request(Bytes::from(v), 16).is_err());
        // A record length beyond the batch.
        let mut v = batch().to_vec();
        let len_at = 21 + 1 + 8 + 8;
        v[len_at..len_at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_request(Bytes::from(v), 16).is_err());
        // Unknown tags and flags.
        assert!(decode_request(Bytes::from_static(&[3, 0, 0]), 16).is_err());
        let mut v = batch().to_vec();
        v[21] |= 0x80;
        assert!(decode_request(Bytes::from(v), 16).is_err());
        // Trailing bytes.
        let mut v = batch().to_vec();
        v.push(0);
        assert!(decode_request(Bytes::from(v), 16).is_err());
        // A wildcard or too deep a topic.
        let mut w = BatchWriter::new(&[], 1, 1);
        assert!(w.push(0, 1, &message("a/b/c/d", b"", 0, false, false), None));
        assert!(decode_request(w.finish(), 3).is_err());
        assert!(decode_request(Bytes::new(), 16).is_err());
    }

    #[test]
    fn a_batch_with_a_base_round_trips_and_is_rebased_for_a_retry() {
        let mut w = BatchWriter::with_base(&[2, 0, 0], 9, 5, 3);
        assert!(w.push(0, 1, &message("a", b"x", 0, false, false), None));
        let bytes = w.finish();
        let header = |b: &Bytes| match decode_request(b.slice(3..), 16) {
            Ok(Request::Batch {
                incarnation,
                seq,
                base,
                records,
            }) => (incarnation, seq, base, records.len()),
            other => panic!("{other:?}"),
        };
        assert_eq!(header(&bytes), (9, 5, 3, 1));
        // A retry once the batches before it were answered.
        assert_eq!(header(&rebase(&bytes, 3, 5).unwrap()), (9, 5, 5, 1));
        // A base above the batch's own number is malformed; a batch of tag 1 (one in
        // flight, retained records) has no base to change and reads as its own.
        assert!(decode_request(rebase(&bytes, 3, 6).unwrap().slice(3..), 16).is_err());
        let plain = BatchWriter::new(&[], 1, 4).finish();
        assert_eq!(rebase(&plain, 0, 1), None);
        assert!(matches!(
            decode_request(plain, 16),
            Ok(Request::Batch {
                seq: 4,
                base: 4,
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn generated_batches_round_trip(
            msgs in proptest::collection::vec(
                ("[a-z]{1,5}(/[a-z0-9]{0,4}){0,3}", proptest::collection::vec(any::<u8>(), 0..64),
                 0u8..3, any::<bool>(), any::<bool>(), any::<u64>(), proptest::option::of(0u64..1_000_000)),
                0..20),
            incarnation in any::<u64>(), seq in any::<u64>(),
        ) {
            let mut w = BatchWriter::new(&[], incarnation, seq);
            let now = 10_000_000u64;
            for (t, p, q, r, props, publisher, exp) in &msgs {
                let mut m = message(t, p, *q, *r, *props);
                m.expires_at_ms = exp.map(|e| now + e);
                prop_assert!(w.push(now, *publisher, &m, None));
            }
            prop_assert_eq!(w.len(), msgs.len());
            let Request::Batch { incarnation: i, seq: s, base: b, records } =
                decode_request(w.finish(), 16).unwrap() else { panic!("not a batch") };
            prop_assert_eq!((i, s, b, records.len()), (incarnation, seq, seq, msgs.len()));
            for (rec, (t, p, q, r, props, publisher, exp)) in records.iter().zip(&msgs) {
                prop_assert_eq!(rec.message.topic.as_str(), t.as_str());
                prop_assert_eq!(&rec.message.payload[..], &p[..]);
                prop_assert_eq!(rec.message.qos as u8, *q);
                prop_assert_eq!(rec.message.retain, *r);
                prop_assert_eq!(rec.message.properties.is_some(), *props);
                prop_assert_eq!(rec.publisher, *publisher);
                prop_assert_eq!(rec.expiry_ms, *exp);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(v in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_request(Bytes::from(v.clone()), 16);
            let _ = decode_answer(Bytes::from(v));
        }
    }
}
