//! Publications on their way while a session moves between nodes (`impl Engine`,
//! issue 15; docs/ARCHITECTURE.md "Cluster: publications around a moving session").
//!
//! A forwarded batch and a session transfer travel in separate calls, so nothing
//! orders them. Two things follow, and this module answers both:
//!
//! - **A copy reaches the old node after the session left** (it was matched there,
//!   by another node or a publisher here, while the session still lived here). The
//!   old owner keeps a *ghost* of the session for [`MOVED_WINDOW_MS`]: its plain
//!   subscriptions stay in this shard's trie under a ghost index (so the shard's and
//!   the node's routes stay too), and a publication that matches the ghost goes to
//!   the node the session moved to as `MeshMsg::Redirect`, for that session. Its
//!   publisher's acknowledgement (or the forwarded batch's answer) waits until that
//!   node accepted it: a PUBACK/PUBCOMP still means "accepted where the session
//!   lives".
//! - **The session already got a copy on its old node** (the publisher's node sent
//!   one copy there and one to the new node, or the session's own publication was
//!   delivered locally and forwarded), and the other copy reaches the new node after
//!   the session. In a cluster every publication has a [`PubId`] from the shard
//!   where it was routed (one sequence per class: QoS 0, 1, 2, and QoS 2 sent after
//!   its publisher's commit), carried by every copy, over the local mesh as to other
//!   nodes. The export carries, per origin shard (of any node, this one included)
//!   and class, the highest id the old owner's shard had handled (each origin's
//!   copies of one class arrive there in id order), its own counts, and the ids the
//!   session got within its own window if it moved before.
//!   For [`MOVED_WINDOW_MS`] the new owner does not deliver to the session a copy
//!   (by the normal path) at or below those marks, nor (by either path) one it
//!   already delivered while the window lasts; a redirected copy of a publication
//!   made here after the session's subscriptions were attached is a copy of one it
//!   got here.
//! - **A stale copy reaches the new node after later ones reached the session**
//!   (sim seed 250): a copy sent to the new node before the session lived there
//!   (for another subscriber, or by a route a crashed node left) waits out a
//!   partition and arrives after the session got later publications of the same
//!   publisher elsewhere. Delivered, it would break the publisher's order (MQTT 5
//!   §4.6) and, if the session had got it too, deliver a QoS 0 message twice. The
//!   marks above skip it: the old owner's mark for its origin and class is at least
//!   the later publication's id (the old owner handled that one). That is why QoS 0
//!   and 1 carry ids too, not only QoS 2.
//!
//! - **An older copy comes redirected after later ones came directly** (sim seed
//!   1508): a copy on its way to the old node when the session left (delayed by a
//!   partition) is redirected late, after later publications of its publisher
//!   reached the session on the new node directly. The old node keeps the session's
//!   filters routed for the ghost, so it gets those later ones too, after the older
//!   one, and redirects them in that order: the new node holds a direct copy until
//!   the redirect of it, or of a later one of its stream, arrives (at most
//!   [`HOLD_MAX_MS`]; see [`Engine::moved_direct`]). A hold that runs out ends the
//!   window's holding (the old node's path is taken as gone) and is counted
//!   (`Stats::moved_order_given_up`): order per topic across the move is kept within
//!   that bound, and what comes later is delivered late and once (sim seeds 1047,
//!   3150).
//! - **A QoS 0 copy that the old node already delivered comes again** after a crash
//!   took the marks that said so (a QoS 0 delivery stores nothing; sim seed 2172): a
//!   QoS 0 copy another node matched before the session's claim here (its routes
//!   index below the claim's log index, [`Engine::window_claim`]) was sent to the
//!   old owner too, so neither this node's path nor the session's ghost here gives
//!   it to the session.
//!
//! Until the new node confirmed, the ghost holds what matches (the session may
//! come back here; with a store, a QoS 1/2 copy is stored with the session's
//! records too, which stay until the confirmation: [`Engine::store_held`]) and
//! filters it with the session's window the same way, so a
//! publication that arrives directly and redirected by an older ghost on a third
//! node is held once; a session taken back keeps that window. After the
//! confirmation the ghost keeps the window's marks: a copy that reaches it by the
//! normal path at or below them is not sent on (the new owner skips such a copy
//! when it comes directly, but cannot tell a redirect's path: sim seed 655). With
//! a store, a QoS 1/2 copy a confirmed ghost sends on stays stored until the new node
//! accepted it ([`Engine::send_on`]): the session's records are gone by then, and the
//! marks that say this node handled the copy are not.
//!
//! Per-origin marks alone cannot tell the two paths apart (a publication can reach
//! the new node directly and redirected, in either order), hence the set; ids alone
//! would need every session to remember what it got, hence the marks. Sessions that
//! do not move pay nothing but an 18-byte id per forwarded record, a count per
//! routed publication and one mark update per copy a shard handles (an indexed
//! store for this node's shards, a short search for other nodes').
//!
//! Several shards per node: the marks are the session's shard's, so they must see
//! every copy that shard handled, whichever shard it came through; hence the id
//! rides the local mesh too (`Publish`, `PublishDurable`, and a forwarded
//! publication's copies for other shards), and a ghost redirects a copy with the id
//! it came with, never a new one (which the direct copy to the new node would not
//! share).
//!
//! Across a restart (with a store): the marks, this shard's own counts and the windows
//! of stored sessions go to the store with the next commit that has ops
//! ([`Engine::moved_store_ops`]), never before what they cover, and come back at the
//! next start as marks of earlier-life origins and the restored sessions' windows
//! ([`Engine::restore_moved`]), so a session restored after a crash exports a window
//! that covers what it got before it (issue 15, cause C). Marks not raised within
//! `store::PUB_MARK_KEEP_MS` before a start are dropped then. A direct copy a window
//! holds for the old owner's redirects is stored in the epoch of the marks that say
//! it was handled, and comes back in its session's queue ([`Engine::restore_held`];
//! sim seeds 70 and 660). That knowledge is the restored sessions': a session that
//! moved in after the start was elsewhere when the earlier life routed a publication
//! whose forward died with it, and the window it leaves with claims no such
//! publication (restored as maybe lacking on other nodes, so its publisher's re-send
//! comes again: sim seed 703); a session that started here since came after it, and
//! claims it (`Session::moved_in`; sim seed 663's shape).
//!
//! A re-sent copy ([`RESENT`]) of a publication this shard handled is skipped here for
//! the sessions it had then, not for one that moved in since without it: each session
//! that moved in with a window keeps, for its life here, what this shard had handled
//! above what its window said it handled ([`Arrival`]: per stream, a range), and
//! such a re-send reaches it once. Not only through the old owner's ghost chain, which
//! ends with the window (issue 15, what seed 703's fix left).
//!
//! Bounded, and said: a copy delayed longer than the window (a partition between
//! the publisher's node and the old owner that outlasts it) finds no ghost and is
//! lost for the session, as before.

use std::collections::{HashMap, HashSet, VecDeque};

use tessera_proto::{QoS, Str, topic};

use super::Engine;
use crate::mesh::{MeshMsg, PubId, ShardId};
use crate::message::{Message, SessionUid};
use crate::session::{Delivery, SessionIdx, SubscriptionEntry};
use crate::store::{RecoveredWindow, RedirectState, StoreOp};

/// How long the old owner keeps a moved session's ghost and the new owner its
/// dedup window: longer than a forwarded batch is normally in flight, retries
/// included.
pub const MOVED_WINDOW_MS: u64 = 30_000;
/// Session indexes from here on are ghosts' (a shard never has 2^31 sessions).
pub(super) const GHOST_BASE: SessionIdx = 1 << 31;
/// Ids one window keeps at most (a session that gets more QoS 2 publications
/// within a window than this keeps only the newest).
const WINDOW_IDS_MAX: usize = 65_536;
/// Ids of re-sent copies ([`RESENT`]) one shard remembers handling (the oldest
/// go first): a second copy of one is skipped, and so is an original that comes
/// after its re-sent copy.
const RESENT_IDS_MAX: usize = 4_096;
/// How long the new owner holds a direct delivery to a moved-in session for the
/// old owner's redirect of it (sim seed 1508, see [`Engine::moved_direct`]). The
/// first one held this long ends the window's holding: the old owner's path is
/// taken as gone (it crashed, or a partition outlasts this), and the session gets
/// its direct copies at once again. It bounds order across a move, not ownership,
/// so it need not follow the session lease (3 s, the lease's default until issue 16
/// made that 2 s): kept at 3 s, the bound the data-plane simulation's sweeps and its
/// order checker (which counts a copy later than this as late, not wrong) were run
/// with. A shorter hold would let a slow path's copies go out of order sooner; the
/// extra second is paid only when the old owner's path is gone.
pub const HOLD_MAX_MS: u64 = 3_000;

#[derive(Debug)]
pub(super) struct Ghost {
    pub(super) client_id: Str,
    /// Its number on this shard ([`Moved::ghost_gen`]): its expiry names it, so an
    /// earlier ghost's expiry ends that ghost only, not a later one of the same
    /// ClientID in the same (reused) slot.
    pub(super) number: u64,
    /// (node, claim epoch) it moved to.
    pub(super) to: (u64, u64),
    pub(super) filters: Vec<Str>,
    /// That node confirmed it stored the session: what matches goes there at once.
    /// Until then it is held here (the session may come back here, or go to a
    /// later claimant), with who waits for it.
    pub(super) confirmed: bool,
    pub(super) held: Vec<Held>,
    /// Its session's records stay in this shard's store until the confirmation
    /// (a stored session, persistence on): a QoS 1/2 copy it holds is stored
    /// there too, as a queued delivery (sim seed 748), with these sequence
    /// numbers.
    pub(super) stores_held: bool,
    pub(super) held_seqs: Vec<u64>,
    /// Parts of its window (`seen`) stored as the session's, with the held copies'
    /// ids (`StoreOp::PutWindow`): a session restored after a crash has the copies
    /// in its queue, and its window says so.
    pub(super) window_parts: u32,
    /// Until confirmed: the session's window as exported, and the ids of what the
    /// ghost held since, so a publication reaching this node twice (directly and
    /// redirected by an older ghost on another node) or one the session already
    /// got is held once at most (seed 160 of the data-plane simulation).
    pub(super) seen: Option<Window>,
    /// A record of it is in the store (`stored_ghost`): its end deletes it.
    pub(super) stored: bool,
    /// The session had a window here when it left (it had moved in, or was taken
    /// back, within `MOVED_WINDOW_MS`): a redirect addressed to it by an older
    /// ghost on another node goes on to its new node. Without one, the session
    /// started afresh here, and such a redirect was for an earlier session of the
    /// ClientID, which ended (sim seed 400).
    pub(super) passes_redirects: bool,
    /// The session had come back here from the node this shard's earlier ghost of it
    /// sent copies on to, and left again within that window: what the earlier ghost
    /// would have sent on (copies sent here for the session before it first left) is
    /// still the session's, whatever the marks it leaves with say (they are the
    /// other node's too; network scenario, CHAOS_SEED=75901).
    pub(super) earlier: Option<GhostPath>,
    /// Besides, the session started here in this life (neither restored nor moved
    /// in: `Session::restored`, `Session::moved_in`): a redirect it held before the
    /// confirmation was for an earlier session of the ClientID, and goes no further
    /// (sim seed 232, [`Engine::ghost_confirmed`]). A restored session without a
    /// window may have lost it with the crash (sync seed 194, harness sync seed 72).
    pub(super) fresh_here: bool,
    /// When the session left (broker ms; `None` for a ghost restored from the store,
    /// or one whose session ended since: [`Engine::drop_older_lineage`]): within
    /// [`MOVED_WINDOW_MS`] of it, every node the session went to since still keeps
    /// its window, so the window it comes back with lists what it got there
    /// ([`Engine::ghost_path`]).
    pub(super) left_ms: Option<u64>,
    /// The claim `to` fetched the session (its moving copy's `fetched`, noted at the
    /// confirmation): a copy the log confirmed for a claim that never fetched it is
    /// of a session that ended, that claim's node started anew without it (sim seed
    /// 250, [`Engine::drop_older_lineage`]).
    pub(super) fetched: bool,
}

/// A publication a ghost holds: the message, its id, who waits for it, and whether
/// it came redirected by another node's ghost (not by the normal path).
pub(super) type Held = (Message, Option<PubId>, Option<u64>, bool);

/// The trie entries of a ghost that went ([`Engine::detach_ghost`]), still routed
/// until [`Engine::release_ghost_routes`].
#[must_use = "the ghost's trie entries stay until release_ghost_routes"]
pub(super) struct GhostRoutes {
    slot: u32,
    filters: Vec<Str>,
}

#[derive(Debug)]
pub(super) struct Window {
    /// The session it is for (a new session of the ClientID has none).
    uid: SessionUid,
    /// Highest id per origin shard the old owner had handled.
    pub(super) marks: Vec<(u64, ShardId, u64)>,
    /// This shard's own counts (per class) when the session's subscriptions were
    /// attached here (`u64::MAX` until then).
    local_mark: [u64; CLASSES],
    /// Publications delivered to the session within the window.
    delivered: HashSet<PubId>,
    order: VecDeque<PubId>,
    /// Its store state (a window of a stored session is stored with it in the
    /// next commit that has ops: `Engine::moved_store_ops`).
    stored: WindowStored,
    /// The session's plain filters as it moved in (its old owner's ghost has the
    /// same): a direct copy matching one also reaches that ghost, which redirects it
    /// here after every older copy of its origin it got (empty: nothing is held).
    filters: Vec<Str>,
    /// Direct deliveries held until the old owner's redirect of them (or of a later
    /// publication of their origin shard and class) arrived, in arrival order.
    held: VecDeque<HeldDirect>,
    /// Whether direct deliveries are held (until one waited [`HOLD_MAX_MS`]).
    holding: bool,
    /// The raft log index of the claim that brought the session here (0: not
    /// known): a QoS 0 copy another node matched before it is not the session's by
    /// the normal path here ([`Engine::window_claim`], sim seed 2172).
    claim_index: u64,
    /// The session came back to this shard while its ghost here lived: what that
    /// ghost would have sent on ([`Engine::import_window`]).
    returned: Option<GhostPath>,
}

/// What the ghost of a session that came back here would have redirected to the
/// node the session was on (harness sync seed 242, see [`Engine::moved_direct`]):
/// a copy matching its filters that this shard had not handled when the session
/// left (above its window's marks then).
#[derive(Debug, Clone)]
pub(super) struct GhostPath {
    marks: Vec<(u64, ShardId, u64)>,
    filters: Vec<Str>,
    /// The path of an earlier ghost of the session here, when it had come back
    /// before this ghost's session left ([`Ghost::earlier`]), at most
    /// [`GHOST_PATHS_MAX`] deep.
    earlier: Option<Box<GhostPath>>,
}

/// How many ghost paths of one session (it came back to a node and left it again
/// within the window, several times) a shard follows: older ones are dropped, and
/// copies they would have sent on are judged by the marks again.
const GHOST_PATHS_MAX: usize = 4;

impl GhostPath {
    /// Whether the ghost would have sent a copy of `id` on `topic` on (or an
    /// earlier ghost of the session here would have).
    fn sends_on(&self, id: PubId, topic: &str) -> bool {
        let id = original(id);
        let mut path = Some(self);
        while let Some(p) = path {
            if !p
                .marks
                .iter()
                .any(|m| covers(m, id.origin, id.shard, id.seq))
                && p.filters.iter().any(|f| topic::matches(f, topic))
            {
                return true;
            }
            path = p.earlier.as_deref();
        }
        false
    }

    /// This path with at most `depth` paths in its chain.
    fn capped(mut self, depth: usize) -> GhostPath {
        if depth <= 1 {
            self.earlier = None;
        } else if let Some(e) = self.earlier.take() {
            self.earlier = Some(Box::new(e.capped(depth - 1)));
        }
        self
    }
}

/// How much of a window the store has (meta `win/` parts, see
/// `StoreOp::PutWindow`).
#[derive(Debug, Default)]
struct WindowStored {
    /// When the window ends (broker ms; 0 for a ghost's, never stored).
    expires_ms: u64,
    /// Parts stored (0: none; part 0 has the marks).
    parts: u32,
    /// Ids in the stored parts.
    ids: usize,
    /// Ids recorded since the last part (the newest of `order`).
    unstored: usize,
    /// In `Moved::windows_unstored`.
    queued: bool,
}

/// A direct delivery a moved-in session's window holds (see [`Engine::moved_direct`]).
#[derive(Debug)]
struct HeldDirect {
    id: PubId,
    /// Its old owner's redirect of it is expected (it matches a ghost filter); a
    /// copy that does not only keeps its place behind held ones of its origin.
    redirected: bool,
    /// When it is released whatever comes.
    due_ms: u64,
    delivery: Delivery,
    /// Who waits for it (a QoS 1/2 delivery): answered once it is in the session's
    /// queue, after the commit of what that stored.
    ack: Option<u64>,
    /// Its number in the store (`StoreOp::PutHeld`; 0: not stored, the session
    /// is not).
    stored: u64,
}

/// Held deliveries let go of, with who waits for each and their number in the
/// store (0: none).
pub(super) type Released = Vec<(Delivery, Option<u64>, u64)>;

/// What the new owner does with a copy for a moved-in session that came by the
/// normal path ([`Engine::moved_direct`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direct {
    Deliver,
    /// The session got it, or a later one of its origin, already.
    Skip,
    /// Held for the old owner's redirects (`true`: its own redirect is expected).
    Hold(bool),
}

/// Who waits for a redirected QoS 1/2 publication.
#[derive(Debug, Clone, Copy)]
pub(super) enum RedirectAck {
    /// A publisher of this shard (`pending_retains`).
    Publisher(u64),
    /// A forwarded batch (`pending_forwards`).
    Batch(u64),
    /// The `Ack` another local shard waits for (a `PublishDurable`, a forwarded
    /// copy or a redirect it sent with its token): held through a back-pressure
    /// remote token (`Engine::bp_hold_remote`), so the publisher's PUBACK/PUBREC or
    /// the batch's answer waits for what the ghost does with the copy.
    Peer,
}

/// The module's state in the engine.
#[derive(Debug, Default)]
pub(super) struct Moved {
    /// This process's origin tag (0: not in a cluster, no ids).
    origin: u64,
    /// Identified publications this shard gave so far, per class (each class is
    /// its own sequence: see [`id_seq`]).
    next_seq: [u64; CLASSES],
    /// Highest id handled here per origin shard of another process and class.
    marks: Vec<(u64, ShardId, u64)>,
    /// Highest id number handled here per shard of this process (the index) and
    /// class: the local mesh's copies, noted without a search.
    local_marks: Vec<[u64; CLASSES]>,
    pub(super) ghosts: Vec<Option<Ghost>>,
    /// The last number a ghost got ([`Ghost::number`]).
    pub(super) ghost_gen: u64,
    pub(super) free: Vec<u32>,
    pub(super) by_client: HashMap<Str, u32>,
    windows: HashMap<Str, Window>,
    /// (expiry, ghost slot and number, or window ClientID and session), in expiry
    /// order (one duration).
    pub(super) expiring: VecDeque<(u64, Expiring)>,
    /// (due, window ClientID and session) per held direct delivery, in due order.
    holds: VecDeque<(u64, Str, SessionUid)>,
    /// The last number a held delivery was stored under (`StoreOp::PutHeld`).
    held_stored: u64,
    /// QoS 1/2 copies confirmed ghosts sent on with a store, kept there until the new
    /// node accepted them (`StoreOp::PutRedirect`): the token the forwarder answers ->
    /// (ClientID, the record's number, who waits for the acceptance).
    redirects_stored: HashMap<u64, (Str, u64, Option<u64>)>,
    /// The last number a redirect was stored under.
    redirect_seq: u64,
    /// While a publication is routed: its id, and who waits for a redirect.
    pub(super) current: Option<PubId>,
    pub(super) ack: Option<RedirectAck>,
    /// While a re-sent QoS 2 PUBLISH is routed in place of its original
    /// (`handed_qos2`): the original's id, which it gets instead of a new one.
    pub(super) again: Option<PubId>,
    /// The id the publication being routed got, if it went to another node.
    pub(super) given: Option<PubId>,
    /// Originals' ids of the re-sent copies ([`RESENT`]) this shard handled, and
    /// of restored publications it has (`Recovered::resent_handled`), oldest first,
    /// at most [`RESENT_IDS_MAX`]. A re-sent copy raises no mark: see [`RESENT`].
    resent: HashSet<PubId>,
    resent_order: VecDeque<PubId>,
    /// What the store has of `marks` (same order: entries are only appended),
    /// `local_marks` and `next_seq` (`Engine::moved_store_ops`).
    marks_stored: Vec<u64>,
    local_marks_stored: Vec<[u64; CLASSES]>,
    next_seq_stored: [u64; CLASSES],
    /// Windows with something the store lacks.
    windows_unstored: Vec<Str>,
    /// The latest time this module saw (broker ms): the stamp of stored marks,
    /// by which they age out.
    clock_ms: u64,
    /// Ids of restored publications whose re-sends may come
    /// (`Recovered::resent_pending`, at most [`RESENT_IDS_MAX`]): a window exported
    /// for a session that came later does not claim them (sim seed 703).
    restored_pending: Vec<PubId>,
    /// Sessions that moved in here with a window, for their life here: the
    /// publications this shard handled before they came that their window did not
    /// say they had handled ([`Arrival`]).
    arrivals: HashMap<Str, Arrival>,
    /// (when, ClientID, session) per [`Arrival`] kept, in arrival order: each goes
    /// [`ARRIVAL_KEEP_MS`] after it came.
    arrivals_order: VecDeque<(u64, Str, SessionUid)>,
    /// The ghost of the session another node's export just brought back here (set
    /// by the import, taken by [`Engine::import_window`] right after it).
    pub(super) returned: Option<(Str, GhostPath)>,
}

/// How long a session that moved in keeps its [`Arrival`]: as long as a node keeps
/// the `PubId` marks of a life that ended (`store::PUB_MARK_KEEP_MS`), the horizon of
/// a re-sent copy's dedup across a restart. A re-send later than that, of a
/// publication this shard handled before the session came, is skipped for it again.
const ARRIVAL_KEEP_MS: u64 = crate::store::PUB_MARK_KEEP_MS;
/// [`Arrival`]s one shard keeps at most (the oldest go first): under a churn of
/// moves, memory stays bounded and the oldest sessions fall back to the shard's
/// skip.
const ARRIVALS_MAX: usize = 16_384;

/// What a session that moved in here (with its old owner's window) did not get
/// here: the publications this shard had handled before it came, above what its
/// window said it handled where it was. This shard's marks cover them, so a
/// re-sent copy of one ([`RESENT`]) is skipped here for the sessions that were
/// here then, but not for this one, which got the original neither here nor (its
/// window says) where it was: its forward there died with its origin, or it was
/// published before the session subscribed. Issue 15, the shard-level skip left
/// by sim seed 703's fix: without this, a re-send that came after the old owner's
/// ghost and this window ended (no ghost chain to carry it) was lost for it.
/// In memory, kept with the session here (a restart of this node forgets it).
#[derive(Debug)]
struct Arrival {
    uid: SessionUid,
    /// Per origin shard and class: (origin, shard, this shard's mark when the
    /// session came, the highest number of that stream its window covered).
    gaps: Vec<(u64, ShardId, u64, u64)>,
    /// Ids within the gaps it got here all the same: through its window (a
    /// redirect of its old owner's ghost, kept when the window ends) or as a
    /// re-sent copy.
    got: HashSet<PubId>,
}

impl Arrival {
    /// Whether publication `id` (an original's) is in a gap: handled here before
    /// the session came, not handled for it where it was.
    fn lacks(&self, id: PubId) -> bool {
        let n = id_number(id.seq);
        self.gaps.iter().any(|&(o, sh, hi, lo)| {
            o == id.origin
                && sh == id.shard
                && id_class(hi) == id_class(id.seq)
                && n > lo
                && n <= id_number(hi)
        }) && !self.got.contains(&id)
    }
}

impl Moved {
    /// The window of `key` recorded an id: the store gets it with the next commit.
    fn window_changed(&mut self, key: Str) {
        if let Some(w) = self.windows.get_mut(&key)
            && !w.stored.queued
        {
            w.stored.queued = true;
            self.windows_unstored.push(key);
        }
    }
}

#[derive(Debug)]
pub(super) enum Expiring {
    /// The ghost in this slot with this number ([`Ghost::number`]).
    Ghost(u32, u64),
    Window(Str, SessionUid),
}

pub(super) fn encode_marks<'a>(
    out: &mut Vec<u8>,
    marks: &[(u64, ShardId, u64)],
    ids: impl ExactSizeIterator<Item = &'a PubId>,
) {
    out.reserve(8 + 18 * (marks.len() + ids.len()));
    out.extend_from_slice(&(marks.len() as u32).to_be_bytes());
    for (o, s, q) in marks {
        out.extend_from_slice(&o.to_be_bytes());
        out.extend_from_slice(&s.to_be_bytes());
        out.extend_from_slice(&q.to_be_bytes());
    }
    out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
    for id in ids {
        out.extend_from_slice(&id.origin.to_be_bytes());
        out.extend_from_slice(&id.shard.to_be_bytes());
        out.extend_from_slice(&id.seq.to_be_bytes());
    }
}

/// Decodes what [`Engine::export_session`] kept as the moved session's window, or
/// a part of a stored window (`StoreOp::PutWindow`). Untrusted: every length is
/// checked.
#[allow(clippy::type_complexity)]
pub(crate) fn decode_marks(b: &[u8]) -> Option<(Vec<(u64, ShardId, u64)>, Vec<PubId>)> {
    fn entry(b: &[u8]) -> (u64, ShardId, u64) {
        let o = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
        let s = ShardId::from_be_bytes(b[8..10].try_into().unwrap_or_default());
        let q = u64::from_be_bytes(b[10..18].try_into().unwrap_or_default());
        (o, s, q)
    }
    let count = |b: &[u8]| -> Option<usize> {
        Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize)
    };
    let n = count(b)?;
    let rest = &b[4..];
    let marks_len = n.checked_mul(18)?;
    let marks: Vec<_> = rest.get(..marks_len)?.chunks_exact(18).map(entry).collect();
    let rest = &rest[marks_len..];
    let m = count(rest)?;
    let rest = &rest[4..];
    let ids_len = m.checked_mul(18)?;
    if rest.len() != ids_len || m > WINDOW_IDS_MAX {
        return None;
    }
    let ids = rest
        .chunks_exact(18)
        .map(entry)
        .map(|(origin, shard, seq)| PubId { origin, shard, seq })
        .collect();
    Some((marks, ids))
}

/// Bits of a [`PubId`]'s `seq` above which its class sits.
const QOS_SHIFT: u32 = 62;
/// Bit 61 of a [`PubId`]'s `seq` (below the class, above any count a shard
/// reaches): the copy is of a QoS 2 PUBLISH its client re-sent, routed again with
/// its original's id because the node that routed the original restarted
/// (`exactly_once::redeliver` there, `handed_qos2` on the node the session moved
/// to). Cause A of the `sync` simulation failures: such a re-send went out with a
/// new id, so a node that got the original delivered it twice.
///
/// A receiving shard skips a re-sent copy when its marks cover the original's id
/// (it handled the original, or a later publication of that origin and class
/// before it) or it handled a re-sent copy of it already ([`Moved::resent`]). It
/// never raises a mark with one: the originals of one origin shard and class
/// arrive in id order, re-sent copies do not (the clients of a dead process
/// re-send in any order, on the restarted node or on the ones their sessions
/// moved to), and a mark raised by a re-sent copy would make a lower id, re-sent
/// later, look handled: acknowledged and lost (the trap of sim seed 1431). The
/// bit travels inside the id (no wire change); a node of an older build reads it
/// as an id above its marks: delivered, at least once, as before.
const RESENT: u64 = 1 << 61;

/// `id` as carried by a re-sent copy of its publication.
pub(super) fn resent(id: PubId) -> PubId {
    PubId {
        seq: id.seq | RESENT,
        ..id
    }
}

/// Whether `id` is a re-sent copy's ([`RESENT`]).
pub(super) fn is_resent(id: PubId) -> bool {
    id.seq & RESENT != 0
}

/// The original publication's id of a copy (re-sent or not).
pub(super) fn original(id: PubId) -> PubId {
    PubId {
        seq: id.seq & !RESENT,
        ..id
    }
}
/// Id classes: QoS 0, 1 and 2 sent at once, and QoS 2 sent after its publisher's
/// commit ([`AFTER_COMMIT`]).
pub(super) const CLASSES: usize = 4;
/// The class of a QoS 2 publication of a stored session under `sync` durability:
/// its copies for other shards and nodes wait for the commit of its publisher's
/// packet id (`Engine::send_after_id_commit`), while other QoS 2 publications of
/// the same shard go at once.
const AFTER_COMMIT: u64 = 3;

/// The `seq` of a shard's `n`th identified publication of class `class`. Each class
/// is its own sequence, and a shard sends the copies of one class to every
/// destination in sequence order: at once (QoS 0, 1 and 2 without a commit to wait
/// for) or, all of them, after their commits in commit order ([`AFTER_COMMIT`]).
/// So the copies of one origin shard and class reach any shard, over the local
/// mesh or through the forwarder, in sequence order (both are FIFO); MQTT orders
/// one publisher's messages per QoS, and a publisher's QoS 2 publications are all
/// of one class (whether its session is stored does not change while it publishes).
fn id_seq(class: u64, n: u64) -> u64 {
    (class << QOS_SHIFT) | n
}

/// The class (sequence) `seq` belongs to.
fn id_class(seq: u64) -> u64 {
    seq >> QOS_SHIFT
}

/// The publication's number within its class (`n` of [`id_seq`]; a re-sent
/// copy's is its original's).
fn id_number(seq: u64) -> u64 {
    seq & (RESENT - 1)
}

/// A mark covers `seq` (a re-sent copy's: its original's): same origin shard and
/// class, not above it.
fn covers(m: &(u64, ShardId, u64), origin: u64, shard: ShardId, seq: u64) -> bool {
    m.0 == origin && m.1 == shard && id_class(m.2) == id_class(seq) && seq & !RESENT <= m.2
}

/// Whether `a` and `b` are of one origin shard and class: one stream, whose copies
/// reach any shard in id order.
fn same_stream(a: PubId, b: PubId) -> bool {
    a.origin == b.origin && a.shard == b.shard && id_class(a.seq) == id_class(b.seq)
}

/// Whether a copy another node matched with its routes applied up to `routes_index`
/// was matched before the claim at raft log index `claim_index` (either 0: not
/// known, no).
fn matched_before(routes_index: u64, claim_index: u64) -> bool {
    routes_index != 0 && routes_index < claim_index
}

fn raise(marks: &mut Vec<(u64, ShardId, u64)>, origin: u64, shard: ShardId, seq: u64) {
    match marks
        .iter_mut()
        .find(|m| m.0 == origin && m.1 == shard && id_class(m.2) == id_class(seq))
    {
        Some(m) => m.2 = m.2.max(seq),
        None => marks.push((origin, shard, seq)),
    }
}

impl Window {
    /// A window for session `uid` with the old owner's `marks`, this shard's
    /// `local_mark` and the `ids` the session already got.
    pub(super) fn new(
        uid: SessionUid,
        marks: Vec<(u64, ShardId, u64)>,
        local_mark: [u64; CLASSES],
        ids: impl IntoIterator<Item = PubId>,
    ) -> Window {
        let mut w = Window {
            uid,
            marks,
            local_mark,
            delivered: HashSet::new(),
            order: VecDeque::new(),
            stored: WindowStored::default(),
            filters: Vec::new(),
            held: VecDeque::new(),
            holding: false,
            claim_index: 0,
            returned: None,
        };
        for id in ids {
            w.seen(id, false);
        }
        w.stored.unstored = 0;
        w
    }

    /// Whether a copy of publication `id` that came by the normal path is at or
    /// below the marks: the session got it on an earlier node, or got a later
    /// publication of the same origin and class there.
    fn handled(&self, id: PubId) -> bool {
        self.marks
            .iter()
            .any(|m| covers(m, id.origin, id.shard, id.seq))
    }

    /// Whether the publication `id` (by the normal path: `direct`) is one the
    /// session already got; records it otherwise.
    fn seen(&mut self, id: PubId, direct: bool) -> bool {
        // A re-sent copy is the same publication as its original.
        let id = original(id);
        if direct && self.handled(id) {
            return true;
        }
        if !self.delivered.insert(id) {
            return true;
        }
        self.order.push_back(id);
        self.stored.unstored += 1;
        if self.order.len() > WINDOW_IDS_MAX
            && let Some(old) = self.order.pop_front()
        {
            self.delivered.remove(&old);
        }
        false
    }

    /// Takes the held deliveries a redirect of `upto` releases (those of its stream
    /// up to it, and after them those of the stream that wait for no redirect, up to
    /// the first that still waits), or all of them (`None`), in the order they came.
    fn release(&mut self, upto: Option<PubId>) -> Released {
        if self.held.is_empty() {
            return Vec::new();
        }
        let Some(r) = upto else {
            return self
                .held
                .drain(..)
                .map(|h| (h.delivery, h.ack, h.stored))
                .collect();
        };
        let mut out = Vec::new();
        let mut blocked = false;
        let mut kept = VecDeque::with_capacity(self.held.len());
        for h in self.held.drain(..) {
            if !same_stream(h.id, r) {
                kept.push_back(h);
            } else if !blocked && (h.id.seq <= r.seq || !h.redirected) {
                out.push((h.delivery, h.ack, h.stored));
            } else {
                blocked = true;
                kept.push_back(h);
            }
        }
        self.held = kept;
        out
    }
}

/// The client log line of a moved-in session whose hold for its old node's redirects
/// ended before they all came (`Stats::moved_order_given_up`): what comes late from
/// the old node may come after later messages of its publisher (the fault tests'
/// history checker reads this line; docs/ADMIN_API.md "Client log lines").
fn order_given_up(node: Option<u64>, shard: ShardId, client_id: &Str) {
    tracing::info!(
        target: super::CLIENTS_LOG_TARGET,
        client_id = client_id.as_str(),
        node,
        shard,
        "client order hold given up"
    );
}

impl Engine {
    /// Gives this shard's publications cluster-wide ids with `origin` (random per
    /// process start, never 0). Called at boot in a cluster.
    pub fn set_origin(&mut self, origin: u64) {
        self.moved.origin = origin;
        self.moved.local_marks = vec![[0; CLASSES]; self.shard_count];
    }

    /// A new id for the publication being routed, at QoS `qos` (none outside a
    /// cluster): a count, no allocation. Its class is [`AFTER_COMMIT`] when its
    /// copies wait for its publisher's commit (`publish_seq` is set exactly then:
    /// `send_durable`, `forward_remote`).
    pub(super) fn new_pub_id(&mut self, qos: QoS) -> Option<PubId> {
        if self.moved.origin == 0 {
            return None;
        }
        if let Some(id) = self.moved.again {
            let id = resent(id);
            self.moved.current = Some(id);
            self.moved.given = Some(id);
            return Some(id);
        }
        let class = if self.publish_seq != 0 {
            AFTER_COMMIT
        } else {
            qos as u64
        };
        let n = &mut self.moved.next_seq[class as usize];
        *n += 1;
        let id = PubId {
            origin: self.moved.origin,
            shard: self.shard,
            seq: id_seq(class, *n),
        };
        self.moved.current = Some(id);
        self.moved.given = Some(id);
        Some(id)
    }

    /// Whether this shard handled the publication `id` already: one of its own, or
    /// a copy from another shard or node at or below its mark for that origin shard
    /// and class (the copies of one origin shard and class arrive in id order, so a
    /// copy at or below the mark is one handled before, or one that was not sent
    /// here).
    pub(super) fn pub_id_handled(&self, id: PubId) -> bool {
        let id = original(id);
        if self.resent_seen(id) {
            return true;
        }
        if id.origin == self.moved.origin {
            let class = id_class(id.seq) as usize;
            let count = if id.shard == self.shard {
                self.moved.next_seq.get(class)
            } else {
                self.moved
                    .local_marks
                    .get(usize::from(id.shard))
                    .and_then(|m| m.get(class))
            };
            return count.is_some_and(|n| id_number(id.seq) <= *n);
        }
        self.moved
            .marks
            .iter()
            .any(|m| covers(m, id.origin, id.shard, id.seq))
    }

    /// Whether a copy with `id` from another shard of this node (or the shard that
    /// served another node's batch) was handled here: a re-sent QoS 2 PUBLISH routed
    /// in place of its original ([`RESENT`]) whose original (or an earlier re-sent
    /// copy) this shard handled, or an original whose re-sent copy came first.
    /// Skipped, as the forwarded batch's shard skips it. Originals of one origin
    /// shard and class come in id order, so they need no look at the marks.
    pub(super) fn rerouted_handled(&self, id: Option<PubId>) -> bool {
        id.is_some_and(|id| {
            if is_resent(id) {
                self.pub_id_handled(id)
            } else {
                self.resent_seen(id)
            }
        })
    }

    /// Whether this shard handled a re-sent copy of publication `id` (an original's),
    /// or has that restored publication.
    fn resent_seen(&self, id: PubId) -> bool {
        !self.moved.resent.is_empty() && self.moved.resent.contains(&id)
    }

    /// This shard handled publication `id` (a re-sent copy's, or a restored one it
    /// has): a later copy with it is skipped. No mark rises (see [`RESENT`]).
    pub(super) fn note_resent_handled(&mut self, id: PubId) {
        let id = original(id);
        if !self.moved.resent.insert(id) {
            return;
        }
        self.moved.resent_order.push_back(id);
        if self.moved.resent_order.len() > RESENT_IDS_MAX
            && let Some(old) = self.moved.resent_order.pop_front()
        {
            self.moved.resent.remove(&old);
        }
    }

    /// A publication with `id` (from another node, or another shard of this one) is
    /// handled here: it is the one being routed, and this shard's mark for its
    /// origin shard and class rises to it; a re-sent copy's id is remembered
    /// instead (see [`RESENT`]).
    pub(super) fn note_pub_id(&mut self, id: Option<PubId>) {
        self.moved.current = id;
        let Some(id) = id else {
            return;
        };
        if is_resent(id) {
            return self.note_resent_handled(id);
        }
        let local = (id.origin == self.moved.origin)
            .then(|| self.moved.local_marks.get_mut(usize::from(id.shard)))
            .flatten()
            .and_then(|m| m.get_mut(id_class(id.seq) as usize));
        match local {
            Some(m) => *m = (*m).max(id_number(id.seq)),
            None => raise(&mut self.moved.marks, id.origin, id.shard, id.seq),
        }
    }

    /// Ghosts and windows live on this shard.
    pub(super) fn has_moved(&self) -> bool {
        !self.moved.by_client.is_empty() || !self.moved.windows.is_empty()
    }

    /// The session `idx` leaves for `to` (node, epoch): its plain subscriptions
    /// stay as a ghost's (call before the session is destroyed, so its routes
    /// stay), and returns its window for the new owner.
    pub(super) fn leave_ghost(&mut self, now_ms: u64, idx: SessionIdx, to: (u64, u64)) -> Vec<u8> {
        let s = self.session(idx);
        let client_id = s.client_id.clone();
        let (uid, s_stored) = (s.uid, s.stored);
        // Restored at this start, or started here since: what this shard knew in
        // its earlier life is its (a session started since came after all of it:
        // sim seed 663). One that moved in since was elsewhere then (seed 703). So
        // was a restored one that has a window of its own: it came (or came back)
        // within the window before the stop, so the earlier life may have routed a
        // publication before it came; what it got since, here or where it was, its
        // window says (its marks and ids, added below). Pending ids routed before it
        // came are not its then (harness sync seed 119: c2 moved to node 3 after
        // node 3 routed c5's QoS 2 5/5, whose copy for c2's old node died with node
        // 3; restored, c2 moved on claiming 5/5 by node 3's restored marks, and the
        // re-sent copy was skipped for it: acknowledged, never delivered).
        let had_window = self
            .moved
            .windows
            .get(&client_id)
            .is_some_and(|w| w.uid == uid);
        let earlier_life_is_its = if s.restored { !had_window } else { !s.moved_in };
        let fresh_here = !had_window && !s.restored && !s.moved_in;
        let subs: Vec<(Str, SubscriptionEntry)> = s
            .subscriptions
            .iter()
            .filter(|(f, _)| !topic::is_shared(f))
            .map(|(f, e)| (f.clone(), *e))
            .collect();
        // The window: what this shard handled (from other processes and from the
        // other shards of this one), its own counts, and what the session got
        // within a window of its own.
        let mut marks = self.shard_marks();
        // What this shard knew in its earlier life is the sessions' it restored: a
        // session that came since was elsewhere when that life routed or got a
        // publication restored as maybe lacking on other nodes, so the window does
        // not say it got one (its re-sent copy is for it: sim seed 703).
        if !earlier_life_is_its {
            for id in &self.moved.restored_pending {
                let below = id_seq(id_class(id.seq), id_number(id.seq).saturating_sub(1));
                for m in marks.iter_mut().filter(|m| {
                    m.0 == id.origin && m.1 == id.shard && id_class(m.2) == id_class(id.seq)
                }) {
                    m.2 = m.2.min(below);
                }
            }
        }
        let mut ids = Vec::new();
        let mut claim_index = 0;
        let mut earlier = None;
        if let Some(mut w) = self.moved.windows.remove(&client_id) {
            if w.uid == uid {
                claim_index = w.claim_index;
                earlier = w.returned.take();
                for &(o, sh, q) in &w.marks {
                    raise(&mut marks, o, sh, q);
                }
                ids.extend(w.order.iter().copied());
            }
            self.window_gone(&client_id, &w);
        }
        // Re-sent copies this shard handled raise no mark: the new owner learns them
        // as ids the session got (or, as a mark says, that did not reach it here).
        let pending = &self.moved.restored_pending;
        ids.extend(
            self.moved
                .resent_order
                .iter()
                .filter(|id| earlier_life_is_its || !pending.contains(id))
                .copied(),
        );
        // What it got here of what this shard had handled before it came (a re-sent
        // copy, or a redirect its window recorded), among them re-sent ids of the
        // earlier life the filter above leaves out: a later re-send is not for it.
        if let Some(a) = self.moved.arrivals.get(&client_id).filter(|a| a.uid == uid) {
            let mut got: Vec<PubId> = a.got.iter().copied().collect();
            got.sort_unstable_by_key(|id| (id.origin, id.shard, id.seq));
            ids.extend(got);
        }
        if ids.len() > WINDOW_IDS_MAX {
            ids.drain(..ids.len() - WINDOW_IDS_MAX);
        }
        let mut out = Vec::new();
        encode_marks(&mut out, &marks, ids.iter());
        let stores_held = s_stored && self.persist.is_some();
        self.drop_ghost(&client_id);
        if self.moved.origin == 0 || subs.is_empty() {
            return out;
        }
        let mut seen = Window::new(uid, marks, [u64::MAX; CLASSES], ids);
        seen.claim_index = claim_index;
        let slot = self.ghost_slot();
        let gidx = GHOST_BASE + slot;
        for (f, e) in &subs {
            self.subscriptions.insert(f, gidx, *e);
        }
        self.moved.ghost_gen += 1;
        self.moved.ghosts[slot as usize] = Some(Ghost {
            client_id: client_id.clone(),
            number: self.moved.ghost_gen,
            to,
            filters: subs.into_iter().map(|(f, _)| f).collect(),
            confirmed: false,
            held: Vec::new(),
            stores_held,
            held_seqs: Vec::new(),
            window_parts: 0,
            seen: Some(seen),
            stored: false,
            passes_redirects: had_window,
            earlier,
            fresh_here,
            left_ms: Some(now_ms),
            fetched: false,
        });
        self.moved.by_client.insert(client_id, slot);
        out
    }

    /// What this shard handled, as marks: of other processes, of the other shards
    /// of this one, and its own counts.
    fn shard_marks(&self) -> Vec<(u64, ShardId, u64)> {
        let mut marks = self.moved.marks.clone();
        for (shard, handled) in self.moved.local_marks.iter().enumerate() {
            for (class, n) in handled.iter().enumerate() {
                if *n > 0 && shard != usize::from(self.shard) {
                    let seq = id_seq(class as u64, *n);
                    raise(&mut marks, self.moved.origin, shard as ShardId, seq);
                }
            }
        }
        for (class, n) in self.moved.next_seq.iter().enumerate() {
            raise(
                &mut marks,
                self.moved.origin,
                self.shard,
                id_seq(class as u64, *n),
            );
        }
        marks
    }

    /// The session `key` (`uid`) moved in here with window marks `had`: what this
    /// shard handled above them is kept as its [`Arrival`] (nothing when there is
    /// none). At the import only; nothing per message.
    fn note_arrival(
        &mut self,
        now_ms: u64,
        key: &Str,
        uid: SessionUid,
        had: &[(u64, ShardId, u64)],
    ) {
        self.expire_arrivals(now_ms);
        let origin = self.moved.origin;
        let gaps: Vec<_> = self
            .shard_marks()
            .into_iter()
            // This process's own publications are forwarded by it, alive: a
            // re-sent copy is of a dead origin's.
            .filter(|m| m.0 != origin)
            .filter_map(|(o, sh, hi)| {
                let lo = had
                    .iter()
                    .filter(|m| m.0 == o && m.1 == sh && id_class(m.2) == id_class(hi))
                    .map(|m| id_number(m.2))
                    .max()
                    .unwrap_or(0);
                (id_number(hi) > lo).then_some((o, sh, hi, lo))
            })
            .collect();
        if gaps.is_empty() {
            self.moved.arrivals.remove(key);
            return;
        }
        let a = Arrival {
            uid,
            gaps,
            got: HashSet::new(),
        };
        self.moved.arrivals.insert(key.clone(), a);
        self.moved
            .arrivals_order
            .push_back((now_ms + ARRIVAL_KEEP_MS, key.clone(), uid));
        while self.moved.arrivals_order.len() > ARRIVALS_MAX {
            let Some((_, key, uid)) = self.moved.arrivals_order.pop_front() else {
                break;
            };
            self.arrival_gone(&key, uid);
        }
    }

    /// [`Arrival`]s older than [`ARRIVAL_KEEP_MS`] go (at an import or a re-sent
    /// copy's skip: no timer of their own).
    fn expire_arrivals(&mut self, now_ms: u64) {
        while let Some((due, _, _)) = self.moved.arrivals_order.front()
            && *due <= now_ms
        {
            let Some((_, key, uid)) = self.moved.arrivals_order.pop_front() else {
                break;
            };
            self.arrival_gone(&key, uid);
        }
    }

    /// The session `key` (`uid`) is gone from here (left, or ended): its
    /// [`Arrival`] goes with it.
    pub(super) fn arrival_gone(&mut self, key: &Str, uid: SessionUid) {
        if !self.moved.arrivals.is_empty()
            && self.moved.arrivals.get(key).is_some_and(|a| a.uid == uid)
        {
            self.moved.arrivals.remove(key);
        }
    }

    /// Window `w` of `key` ends while its session stays here: the ids it recorded
    /// within the session's [`Arrival`] gaps (redirects of publications this shard
    /// handled before the session came) stay known as got.
    fn window_ends_for_arrival(&mut self, key: &Str, w: &Window) {
        let Some(a) = self.moved.arrivals.get_mut(key).filter(|a| a.uid == w.uid) else {
            return;
        };
        for id in &w.order {
            if a.lacks(*id) {
                a.got.insert(*id);
            }
        }
    }

    /// A re-sent copy ([`RESENT`]) `id` of `msg` whose original this shard handled
    /// (so it is skipped for the sessions that were here then) reaches the sessions
    /// that moved in since without having handled it where they were ([`Arrival`]),
    /// each once. Only on that path, and only while such sessions live here.
    pub(super) fn resent_to_arrivals(&mut self, now_ms: u64, msg: &Message, id: Option<PubId>) {
        let Some(id) = id.filter(|id| is_resent(*id)) else {
            return;
        };
        let id = original(id);
        // Not `resent_seen`: that says what the shard has (a restored publication
        // too), not what these sessions got, which `Arrival::got` says.
        if self.moved.arrivals.is_empty() {
            return;
        }
        self.expire_arrivals(now_ms);
        let mut lacking: Vec<(Str, SessionUid)> = self
            .moved
            .arrivals
            .iter()
            .filter(|(_, a)| a.lacks(id))
            .map(|(k, a)| (k.clone(), a.uid))
            .collect();
        // In one order whatever the map's (a simulation seed replays).
        lacking.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut delivered = false;
        for (key, uid) in lacking {
            let Some(&idx) = self.by_client_id.get(&key) else {
                self.moved.arrivals.remove(&key);
                continue;
            };
            if self.session(idx).uid != uid {
                self.moved.arrivals.remove(&key);
                continue;
            }
            // Its window (while it lasts) knows what reached it redirected.
            if let Some(w) = self.moved.windows.get_mut(&key).filter(|w| w.uid == uid) {
                if w.seen(id, true) {
                    continue;
                }
                self.moved.window_changed(key.clone());
            }
            if let Some(a) = self.moved.arrivals.get_mut(&key) {
                a.got.insert(id);
            }
            self.deliver_to_session(now_ms, idx, msg.clone());
            delivered = true;
        }
        if delivered {
            self.note_resent_handled(id);
        }
    }

    /// A free ghost slot (reused, or a new one).
    pub(super) fn ghost_slot(&mut self) -> u32 {
        match self.moved.free.pop() {
            Some(s) => s,
            None => {
                self.moved.ghosts.push(None);
                (self.moved.ghosts.len() - 1) as u32
            }
        }
    }

    /// The node the session went to confirmed it stored it: what the ghost held goes
    /// there now, and the ghost lives [`MOVED_WINDOW_MS`] from now.
    pub(super) fn ghost_confirmed(&mut self, now_ms: u64, client_id: &Str, fetched: bool) {
        let Some(&slot) = self.moved.by_client.get(client_id) else {
            return;
        };
        let Some(Some(g)) = self.moved.ghosts.get_mut(slot as usize) else {
            return;
        };
        if g.confirmed {
            return;
        }
        g.confirmed = true;
        g.fetched = fetched;
        // The new owner's window filters from now on, but it cannot apply the marks
        // to a redirect (see the module), so the ghost keeps them for the copies that
        // reach it by the normal path (sim seed 655); the ids are the new owner's.
        if let Some(w) = g.seen.as_mut() {
            w.delivered = HashSet::new();
            w.order = VecDeque::new();
        }
        let held = std::mem::take(&mut g.held);
        // Stored with the session's records, which go with the confirmation.
        g.held_seqs = Vec::new();
        g.window_parts = 0;
        let (node, epoch) = g.to;
        self.moved
            .expiring
            .push_back((now_ms + MOVED_WINDOW_MS, Expiring::Ghost(slot, g.number)));
        let fresh_here = g.fresh_here;
        let Some(remote) = self.remote else {
            return;
        };
        for (message, id, ack, redirected) in held {
            // A redirect held for a session that started afresh here (in this
            // life: one restored without a window may have lost it with the crash,
            // harness sync seed 72) goes no further, as a confirmed ghost drops one
            // (`redirected`): it was for an earlier session of the ClientID, and
            // the one that went on may have got the publication by the normal
            // path, which its new node cannot tell from a redirect. It was held
            // only in case the session came back here (sim seed 232: node 1's ghost
            // of c0's earlier session, confirmed by the log for node 2's claim,
            // which had started c0 afresh, redirected node 2's hinted batch to node
            // 2; c0 had got those QoS 2 publications on node 2 and was moving on to
            // node 3, whose window does not list them: delivered twice).
            if redirected && fresh_here {
                if let Some(t) = ack {
                    self.release_waiter(t);
                }
                continue;
            }
            self.send_on(remote, client_id.clone(), (node, epoch), message, id, ack);
        }
    }

    /// The confirmed ghost of `client_id`, if `ended` says its session ended (the
    /// ClientID started a new one since, [`Engine::drop_older_lineage`]): no ghost
    /// path for a session taken in here ([`Engine::ghost_path`]).
    pub(super) fn ghost_session_ended(&mut self, client_id: &Str, ended: impl Fn(&Ghost) -> bool) {
        let Some(&slot) = self.moved.by_client.get(client_id) else {
            return;
        };
        if let Some(Some(g)) = self.moved.ghosts.get_mut(slot as usize)
            && g.confirmed
            && ended(g)
        {
            g.left_ms = None;
        }
    }

    /// What the ghost of `client_id` would send on (its session is back here from
    /// another node at `now_ms`): none without a ghost, or one without a window's
    /// marks, or once the session left [`MOVED_WINDOW_MS`] ago or more (or when is not
    /// known): then a node it went to may have delivered copies with no window to list
    /// them, and the imported marks judge as before.
    pub(super) fn ghost_path(&self, now_ms: u64, client_id: &Str) -> Option<GhostPath> {
        let &slot = self.moved.by_client.get(client_id)?;
        let g = self.moved.ghosts.get(slot as usize)?.as_ref()?;
        if g.left_ms.is_none_or(|t| now_ms >= t + MOVED_WINDOW_MS) {
            return None;
        }
        let earlier = g
            .earlier
            .clone()
            .map(|p| Box::new(p.capped(GHOST_PATHS_MAX - 1)));
        Some(GhostPath {
            marks: g.seen.as_ref()?.marks.clone(),
            filters: g.filters.clone(),
            earlier,
        })
    }

    /// What the ghost of `client_id` held (its session is back here), with the
    /// window the ghost filtered it with: the caller delivers it with
    /// [`Engine::deliver_held`].
    pub(super) fn take_ghost_held(&mut self, client_id: &Str) -> (Vec<Held>, Option<Window>) {
        match self.moved.by_client.get(client_id) {
            Some(&slot) => self.moved.ghosts[slot as usize]
                .as_mut()
                .map(|g| {
                    // A confirmed ghost's window is its marks only: the session has
                    // the new owner's.
                    let seen = g.seen.take().filter(|_| !g.confirmed);
                    let seqs = std::mem::take(&mut g.held_seqs);
                    let parts = std::mem::take(&mut g.window_parts);
                    (std::mem::take(&mut g.held), seen, seqs, parts)
                })
                .map(|(held, seen, seqs, parts)| {
                    // Stored as deliveries of the records the session is taken back
                    // with (and their ids as its window): out, before it gets them as
                    // its own again (and keeps the window as its own).
                    if parts > 0 {
                        self.store_op(StoreOp::DelWindow {
                            client_id: client_id.clone(),
                        });
                    }
                    for seq in seqs {
                        self.store_op(StoreOp::DelMsg {
                            client_id: client_id.clone(),
                            seq,
                        });
                    }
                    (held, seen)
                })
                .unwrap_or_default(),
            None => (Vec::new(), None),
        }
    }

    /// Delivers what a ghost held to its session, back here (`idx`), and answers
    /// whoever waited for each. `seen`: the ghost's window (what the session got
    /// and what the ghost held); it stays the session's window for
    /// [`MOVED_WINDOW_MS`], so copies still on their way (redirected by an older
    /// ghost on another node) that it already got are skipped, and the others are
    /// delivered.
    pub(super) fn deliver_held(
        &mut self,
        now_ms: u64,
        idx: SessionIdx,
        held: Vec<Held>,
        seen: Option<Window>,
    ) {
        if let Some(mut w) = seen {
            let s = self.session(idx);
            let key = s.client_id.clone();
            w.uid = s.uid;
            w.local_mark = self.local_mark_for(&key);
            self.keep_window(now_ms, key, w);
        }
        for (message, _, ack, _) in held {
            self.deliver_to_session(now_ms, idx, message);
            if let Some(t) = ack {
                self.release_waiter(t);
            }
        }
    }

    /// What the ghost of session `idx` held while the session's disk tail came (its
    /// node kept the ghost meanwhile: `Engine::import_finish`), delivered after the
    /// tail; the ghost's window (an unconfirmed one's) joins the session's.
    pub(super) fn deliver_held_after_tail(
        &mut self,
        now_ms: u64,
        idx: SessionIdx,
        held: Vec<Held>,
        seen: Option<Window>,
    ) {
        let s = self.session(idx);
        let (key, uid) = (s.client_id.clone(), s.uid);
        let seen = match (seen, self.moved.windows.get_mut(&key)) {
            (Some(old), Some(w)) if w.uid == uid => {
                for &(o, sh, q) in &old.marks {
                    raise(&mut w.marks, o, sh, q);
                }
                for id in &old.order {
                    w.seen(*id, false);
                }
                self.moved.window_changed(key);
                None
            }
            (seen, _) => seen,
        };
        self.deliver_held(now_ms, idx, held, seen);
    }

    /// One answer for `token`, a publisher's or a forwarded batch's.
    fn release_waiter(&mut self, token: u64) {
        if self.pending_forwards.contains_key(&token) {
            self.on_forward_ack(token);
        } else if self.pending_retains.contains_key(&token) {
            self.on_retain_ack(token);
        } else {
            // Another shard's `Ack`: after the commit of what the release stored
            // (a held copy delivered to its session, taken back here).
            self.bp_release_held_remote(token);
        }
    }

    /// The moved session's ghost follows its moving copy to a later claimant.
    pub(super) fn ghost_moves_on(&mut self, client_id: &Str, to: (u64, u64)) {
        if let Some(&slot) = self.moved.by_client.get(client_id)
            && let Some(Some(g)) = self.moved.ghosts.get_mut(slot as usize)
        {
            g.to = to;
        }
    }

    /// The ghost of `client_id` goes (its routes with it when it was the last
    /// subscriber): the session expired, or is here again.
    pub(super) fn drop_ghost(&mut self, client_id: &Str) {
        if let Some(routes) = self.detach_ghost(client_id) {
            self.release_ghost_routes(routes);
        }
    }

    /// The ghost of `client_id` goes as in [`Engine::drop_ghost`], but its entries
    /// in the subscription trie (so the shard's and the node's routes) stay until
    /// [`Engine::release_ghost_routes`]: a session coming back here attaches its
    /// subscriptions in between, and a filter it shares with the ghost never has
    /// no subscriber on this shard.
    ///
    /// Why (fault harness, pause scenario, CHAOS_SEED=140775): a node paused past
    /// its lease parked a subscriber's session for another node's waiting claim,
    /// and took it back when the client came back to it. Dropping the ghost first
    /// left the filter without a subscriber for a moment: the node proposed the
    /// route's removal, then its add again, and publications the other nodes
    /// matched in between had no route to it: acknowledged, never delivered (no
    /// other ghost covers a take-back, unlike a session moving in from another
    /// node, whose old owner's ghost redirects what comes there).
    pub(super) fn detach_ghost(&mut self, client_id: &Str) -> Option<GhostRoutes> {
        let slot = self.moved.by_client.remove(client_id)?;
        let g = self.moved.ghosts[slot as usize].take()?;
        if g.stored {
            self.unstore_ghost(client_id);
        }
        // Nobody takes what it still held: its waiters are answered, not held for
        // ever (said in docs/ARCHITECTURE.md).
        for (_, _, ack, _) in g.held {
            if let Some(t) = ack {
                self.release_waiter(t);
            }
        }
        Some(GhostRoutes {
            slot,
            filters: g.filters,
        })
    }

    /// A detached ghost's trie entries go ([`Engine::detach_ghost`]), and its slot
    /// is free again; a filter's route goes with its last subscriber here.
    pub(super) fn release_ghost_routes(&mut self, routes: GhostRoutes) {
        for f in &routes.filters {
            self.remove_local_subscription(f, GHOST_BASE + routes.slot);
        }
        self.moved.free.push(routes.slot);
    }

    /// The session `client_id` just taken in gets the window its old owner sent
    /// (see the module). Malformed bytes are refused and change nothing.
    pub fn import_window(&mut self, now_ms: u64, client_id: &str, bytes: &[u8]) -> bool {
        let Some((marks, ids)) = decode_marks(bytes) else {
            return false;
        };
        let Some(idx) = Str::try_from(client_id)
            .ok()
            .and_then(|k| self.by_client_id.get(&k).copied())
        else {
            return false;
        };
        let s = self.session(idx);
        let key = s.client_id.clone();
        let mut w = Window::new(s.uid, marks, self.local_mark_for(&key), ids);
        // Its plain filters, attached or waiting for its disk tail: the old owner's
        // ghost has them, so what matches one comes redirected too (`moved_direct`).
        let attached = s.subscriptions.keys();
        let waiting = self.importing.get(&key).into_iter();
        let waiting = waiting.flat_map(|i| i.subscription_filters());
        w.filters = attached
            .chain(waiting)
            .filter(|f| !topic::is_shared(f))
            .cloned()
            .collect();
        // With a store too: a held copy of a stored session is stored with what the
        // batch that brought it stored (`hold_direct`, sim seeds 70 and 660).
        w.holding = !w.filters.is_empty() && self.moved.origin != 0;
        // Back where its ghost lived: what the ghost would have sent on
        // (`moved_direct`).
        w.returned = self
            .moved
            .returned
            .take()
            .filter(|(k, _)| *k == key)
            .map(|(_, p)| p);
        // What a ghost here held for it (delivered as it came back) stays known.
        if let Some(mut old) = self.moved.windows.remove(&key) {
            if old.uid == w.uid {
                let out = old.release(None);
                self.deliver_released(&key, Some((now_ms, idx)), out);
                for &(o, sh, q) in &old.marks {
                    raise(&mut w.marks, o, sh, q);
                }
                for id in &old.order {
                    w.seen(*id, false);
                }
            }
            self.window_gone(&key, &old);
        }
        self.note_arrival(now_ms, &key, w.uid, &w.marks);
        self.keep_window(now_ms, key, w);
        true
    }

    /// The session `client_id` just taken in came with the claim at raft log index
    /// `claim_index` (the log index of its epoch): a QoS 0 copy another node matched
    /// before that index reaches neither the session here by the normal path
    /// (`moved_direct`) nor, once it moved on, its ghost here (`redirect`). Such a
    /// copy was matched while another node owned the session, and was sent there too
    /// (that node routed the session's filters, or the session was not subscribed
    /// yet): the session got it there, or gets it from that node's ghost, or it was
    /// lost with that node, which QoS 0 allows. Why (sim seed 2172): the marks and
    /// window ids that say a QoS 0 copy reached a session go to the store only with
    /// the next commit that has ops, so a node that crashed in between restored the
    /// session with marks below it, and the copy, retried to another node for
    /// seconds, was delivered to the session a second time after it moved on. The
    /// routes index a forwarded record carries needs nothing stored and no commit per
    /// QoS 0 delivery: it dates the copy on the log that orders the claims. Only for
    /// QoS 0 (a QoS 1/2 copy is at least once: the marks, committed with what it
    /// stored, sort it out) and for forwarded copies (a local publication has no
    /// routes index, and was made after the claim here).
    pub fn window_claim(&mut self, client_id: &str, claim_index: u64) {
        if let Some(w) = Str::try_from(client_id)
            .ok()
            .and_then(|k| self.moved.windows.get_mut(&k))
        {
            w.claim_index = claim_index;
        }
    }

    /// This shard's counts as the local mark of `key`'s window: none yet while
    /// its session is still being imported (its subscriptions are attached with
    /// its disk tail, `window_attached`).
    fn local_mark_for(&self, key: &Str) -> [u64; CLASSES] {
        if self.importing.contains_key(key) {
            [u64::MAX; CLASSES]
        } else {
            self.moved.next_seq
        }
    }

    /// Keeps `w` as `key`'s window for [`MOVED_WINDOW_MS`].
    fn keep_window(&mut self, now_ms: u64, key: Str, w: Window) {
        self.moved.clock_ms = self.moved.clock_ms.max(now_ms);
        self.keep_window_until(now_ms + MOVED_WINDOW_MS, key, w);
    }

    /// Keeps `w` as `key`'s window until `expires_ms` (at or after every expiry
    /// queued before: the queue is in expiry order). A window not in the store yet
    /// goes there with the next commit that has ops, if its session is stored.
    fn keep_window_until(&mut self, expires_ms: u64, key: Str, mut w: Window) {
        self.moved
            .expiring
            .push_back((expires_ms, Expiring::Window(key.clone(), w.uid)));
        w.stored.expires_ms = expires_ms;
        if w.stored.parts == 0 {
            w.stored.queued = true;
            self.moved.windows_unstored.push(key.clone());
        }
        if let Some(old) = self.moved.windows.insert(key.clone(), w) {
            self.window_gone(&key, &old);
        }
    }

    /// Window `w` of `key` is no longer kept: its parts leave the store (in the
    /// current epoch, so before any part of a window kept after it).
    fn window_gone(&mut self, key: &Str, w: &Window) {
        if w.stored.parts > 0 {
            self.store_op(StoreOp::DelWindow {
                client_id: key.clone(),
            });
        }
        // Every path releases what a window held before it goes; should one not,
        // what is gone from memory leaves the store too.
        for h in w.held.iter().filter(|h| h.stored != 0) {
            self.store_op(StoreOp::DelHeld {
                client_id: key.clone(),
                seq: h.stored,
            });
        }
    }

    /// The marks and windows the store lacks, appended to `ops`, the batch being
    /// taken (`take_store_batch`: only one that has ops anyway). They ride with
    /// those ops, so a mark is never stored before what the copies it covers stored
    /// here, nor a window's id before the delivery it records. Per commit: a
    /// compare per mark, a put per mark raised since the last one, a part per
    /// window that got ids; nothing per message.
    ///
    /// The marks: every origin shard and class this shard handled copies of, this
    /// node's other shards' and its own counts included, under this process's
    /// origin (`StoreOp::PutPubMark`); a restart brings them back as marks of a
    /// foreign origin (`restore_moved`), so what a restored session got before the
    /// crash is covered by the window it exports (issue 15, cause C).
    pub(super) fn moved_store_ops(&mut self, ops: &mut Vec<StoreOp>) {
        if self.moved.origin == 0 {
            return;
        }
        let m = &mut self.moved;
        let at_ms = m.clock_ms;
        let mut put = |origin, shard, seq| {
            ops.push(StoreOp::PutPubMark {
                origin,
                shard,
                seq,
                at_ms,
            })
        };
        m.marks_stored.resize(m.marks.len(), 0);
        for (&(origin, shard, seq), stored) in m.marks.iter().zip(&mut m.marks_stored) {
            if seq != *stored {
                *stored = seq;
                put(origin, shard, seq);
            }
        }
        m.local_marks_stored
            .resize(m.local_marks.len(), [0; CLASSES]);
        for (shard, (handled, stored)) in m
            .local_marks
            .iter()
            .zip(&mut m.local_marks_stored)
            .enumerate()
        {
            // This shard's own are its counts, below.
            if shard == usize::from(self.shard) {
                continue;
            }
            for class in 0..CLASSES {
                if handled[class] != stored[class] {
                    stored[class] = handled[class];
                    put(
                        m.origin,
                        shard as ShardId,
                        id_seq(class as u64, handled[class]),
                    );
                }
            }
        }
        for class in 0..CLASSES {
            if m.next_seq[class] != m.next_seq_stored[class] {
                m.next_seq_stored[class] = m.next_seq[class];
                put(
                    m.origin,
                    self.shard,
                    id_seq(class as u64, m.next_seq[class]),
                );
            }
        }
        if m.windows_unstored.is_empty() {
            return;
        }
        for key in std::mem::take(&mut self.moved.windows_unstored) {
            let Some(w) = self.moved.windows.get_mut(&key) else {
                continue;
            };
            w.stored.queued = false;
            let uid = w.uid;
            let stored = self
                .by_client_id
                .get(&key)
                .and_then(|&i| self.sessions.get(i as usize))
                .and_then(Option::as_ref)
                .is_some_and(|s| s.stored && s.uid == uid);
            let Some(w) = self.moved.windows.get_mut(&key).filter(|_| stored) else {
                continue;
            };
            let st = &mut w.stored;
            let n = st.unstored.min(w.order.len());
            st.unstored = 0;
            let mut bytes = Vec::new();
            // Part 0 has the marks and every id; later parts the ids recorded since.
            // Rewritten whole once the parts hold twice the ids a window keeps.
            let part = if st.parts == 0 || st.ids + n > 2 * WINDOW_IDS_MAX {
                if st.parts > 0 {
                    ops.push(StoreOp::DelWindow {
                        client_id: key.clone(),
                    });
                }
                encode_marks(&mut bytes, &w.marks, w.order.iter());
                st.parts = 0;
                st.ids = w.order.len();
                0
            } else if n > 0 {
                encode_marks(&mut bytes, &[], w.order.range(w.order.len() - n..));
                st.ids += n;
                st.parts
            } else {
                continue;
            };
            st.parts += 1;
            ops.push(StoreOp::PutWindow {
                client_id: key,
                part,
                expires_ms: st.expires_ms,
                bytes,
            });
        }
    }

    /// Restores what the store kept of this module, after the sessions
    /// (`Engine::restore`, in a cluster: after `set_origin`): the marks of earlier
    /// lives come back as marks of foreign origins (this process's origin is new),
    /// and restored sessions get the windows they had, till their end.
    pub(super) fn restore_moved(
        &mut self,
        now_ms: u64,
        marks: Vec<(u64, ShardId, u64)>,
        mut windows: Vec<RecoveredWindow>,
        mut pending: Vec<PubId>,
    ) {
        self.moved.clock_ms = self.moved.clock_ms.max(now_ms);
        if self.moved.origin == 0 {
            return;
        }
        if pending.len() > RESENT_IDS_MAX {
            pending.drain(..pending.len() - RESENT_IDS_MAX);
        }
        self.moved.restored_pending = pending;
        for (origin, shard, seq) in marks {
            if origin != self.moved.origin {
                raise(&mut self.moved.marks, origin, shard, seq);
            }
        }
        self.moved.marks_stored = self.moved.marks.iter().map(|m| m.2).collect();
        windows.sort_unstable_by_key(|w| w.expires_ms);
        for rw in windows {
            let Some(&idx) = self.by_client_id.get(&rw.client_id) else {
                continue;
            };
            if rw.expires_ms <= now_ms {
                self.store_op(StoreOp::DelWindow {
                    client_id: rw.client_id,
                });
                continue;
            }
            let s = self.session(idx);
            let (key, uid) = (s.client_id.clone(), s.uid);
            let stored_ids = rw.ids.len();
            let mut w = Window::new(uid, rw.marks, self.local_mark_for(&key), rw.ids);
            w.stored.parts = rw.parts;
            w.stored.ids = stored_ids;
            self.keep_window_until(rw.expires_ms, key, w);
        }
    }

    /// Deliveries restored sessions' windows held when the broker stopped
    /// (`Recovered::held`, `Delivery::seq` their number in the store): into their
    /// sessions' queues, in the order they were held, and out of the store. The
    /// window held them for older redirects of the old owner's ghost; one of those
    /// that comes after the restart is delivered after them (the window does not
    /// hold after a restart), as at the bound [`HOLD_MAX_MS`]: order, not loss.
    pub(super) fn restore_held(&mut self, now_ms: u64, held: Vec<(Str, Delivery)>) {
        for (key, mut d) in held {
            self.moved.held_stored = self.moved.held_stored.max(d.seq);
            self.store_op(StoreOp::DelHeld {
                client_id: key.clone(),
                seq: d.seq,
            });
            d.seq = 0;
            if let Some(&idx) = self.by_client_id.get(&key) {
                self.enqueue(now_ms, idx, d);
            }
        }
    }

    /// The session's subscriptions were attached here (its disk tail arrived).
    pub(super) fn window_attached(&mut self, client_id: &Str) {
        let next = self.moved.next_seq;
        if let Some(w) = self.moved.windows.get_mut(client_id) {
            w.local_mark = next;
        }
    }

    /// Ghosts and windows past [`MOVED_WINDOW_MS`] go.
    pub fn expire_moved(&mut self, now_ms: u64) {
        self.moved.clock_ms = self.moved.clock_ms.max(now_ms);
        self.expire_handed(now_ms);
        self.expire_holds(now_ms);
        while let Some((due, _)) = self.moved.expiring.front()
            && *due <= now_ms
        {
            let Some((_, what)) = self.moved.expiring.pop_front() else {
                break;
            };
            match what {
                // Only the ghost it was queued for: the slot may hold a later ghost
                // of the same ClientID, whose session came back here and left again
                // within this one's window (network scenario, CHAOS_SEED=75901).
                Expiring::Ghost(slot, number) => {
                    let client_id = match self.moved.ghosts.get(slot as usize) {
                        Some(Some(g)) if g.number == number => g.client_id.clone(),
                        _ => continue,
                    };
                    if self.moved.by_client.get(&client_id) == Some(&slot) {
                        self.drop_ghost(&client_id);
                    }
                }
                Expiring::Window(client_id, uid) => {
                    if self
                        .moved
                        .windows
                        .get(&client_id)
                        .is_some_and(|w| w.uid == uid)
                    {
                        self.release_held(now_ms, &client_id, None);
                        if let Some(w) = self.moved.windows.remove(&client_id) {
                            self.window_ends_for_arrival(&client_id, &w);
                            self.window_gone(&client_id, &w);
                        }
                    }
                }
            }
        }
    }

    /// How many ghosts this shard keeps.
    pub fn ghost_count(&self) -> usize {
        self.moved.by_client.len()
    }

    /// What becomes of the delivery of the publication being routed (on `topic`) to
    /// session `idx` by the normal path: skipped when the session got it already, or
    /// got a later one of its origin on its old node (see the module); held when the
    /// session moved in with a window and its old owner's ghost will redirect the
    /// same publication here (sim seed 1508).
    ///
    /// Why held: a copy its origin sent to the old owner before this node routed the
    /// session's filters there (or before the session lived here) is redirected by
    /// the old owner's ghost, and when that path is slow (a partition between the
    /// origin and the old owner, the origin's retries) a later publication of the same
    /// publisher reaches the session here directly first, and the older one is
    /// delivered after it (MQTT 5 4.6, ordered topics). Nobody here can tell such a
    /// copy from the gaps of ids that were never meant for the session, but the old
    /// owner keeps the session's filters routed for its ghost, so the origin sends it
    /// every later publication matching them too, after the older ones (the copies of
    /// one origin shard and class arrive in id order), and the ghost redirects them
    /// here in that order. So a direct copy matching one of those filters waits for
    /// the redirect of itself (or of a later one of its stream): what the ghost had
    /// older comes first. A direct copy matching none waits only behind held ones of
    /// its stream. Bounded: [`HOLD_MAX_MS`] (then the window stops holding), and the
    /// window's life; a session that never moved pays nothing (no window). With a
    /// store, a held QoS 1/2 copy of a stored session is stored (`hold_direct`).
    ///
    /// A QoS 0 delivery of a copy its sending node matched before the session's claim
    /// here is skipped ([`Engine::window_claim`]).
    pub(super) fn moved_direct(&mut self, idx: SessionIdx, topic: &str, qos: QoS) -> Direct {
        let Some(id) = self.moved.current else {
            return Direct::Deliver;
        };
        if self.moved.windows.is_empty() {
            return Direct::Deliver;
        }
        let s = self.session(idx);
        let (client_id, uid) = (s.client_id.clone(), s.uid);
        let Some(w) = self.moved.windows.get_mut(&client_id) else {
            return Direct::Deliver;
        };
        if w.uid != uid {
            return Direct::Deliver;
        }
        if qos == QoS::AtMostOnce && matched_before(self.routes_index, w.claim_index) {
            return Direct::Skip;
        }
        // The session came back here from the node this shard's ghost of it sent
        // copies on to: a copy the ghost would have sent on (it matches the ghost's
        // filters, above what this shard had handled when the session left) is one
        // that node would have had as a redirect, judged by the ids the session got
        // only. Its marks say what that node handled of the copies sent there; they
        // do not cover copies sent here for the session before it left, which a
        // partition held up (harness sync seed 242: c4's QoS 2 4/1-4/4 waited out a
        // partition for node 1 while c5 moved 1 -> 2, node 2's hold for node 1's
        // redirects ran out and c5 got 4/5-4/7 there; c5 came back to node 1, and
        // the late batch for node 1 was skipped by node 2's marks: acknowledged,
        // never delivered).
        let direct = !w.returned.as_ref().is_some_and(|r| r.sends_on(id, topic));
        if w.seen(id, direct) {
            return Direct::Skip;
        }
        let direct = if !w.holding {
            Direct::Deliver
        } else if w.filters.iter().any(|f| topic::matches(f, topic)) {
            Direct::Hold(true)
        } else if w.held.iter().any(|h| same_stream(h.id, id)) {
            Direct::Hold(false)
        } else {
            Direct::Deliver
        };
        // It recorded the id (the store keeps a stored session's window).
        self.moved.window_changed(client_id);
        direct
    }

    /// Holds `delivery` (the publication being routed) in session `idx`'s window
    /// ([`Engine::moved_direct`] said so).
    pub(super) fn hold_direct(
        &mut self,
        now_ms: u64,
        idx: SessionIdx,
        delivery: Delivery,
        redirected: bool,
    ) {
        let s = self.session(idx);
        let (key, uid) = (s.client_id.clone(), s.uid);
        let (Some(id), Some(w)) = (self.moved.current, self.moved.windows.get_mut(&key)) else {
            return self.enqueue(now_ms, idx, delivery);
        };
        if w.uid != uid || w.held.len() >= WINDOW_IDS_MAX {
            // Bounded like the window's ids: what is held goes, and holding ends.
            if w.holding && w.uid == uid {
                self.stats.moved_order_given_up += 1;
                order_given_up(self.node_id, self.shard, &key);
            }
            w.holding = false;
            let mut out = w.release(None);
            out.push((delivery, None, 0));
            return self.deliver_released(&key, Some((now_ms, idx)), out);
        }
        // Whoever waits for the publication waits for this delivery too, as for a
        // ghost's redirect: under `sync` durability its publisher is answered once
        // it is stored in the session's queue, not while only this window has it.
        let ack = self.redirect_ack(delivery.qos);
        let stored = self.store_held_delivery(idx, &key, &delivery);
        let due_ms = now_ms + HOLD_MAX_MS;
        if let Some(w) = self.moved.windows.get_mut(&key) {
            w.held.push_back(HeldDirect {
                id,
                redirected,
                due_ms,
                delivery,
                ack,
                stored,
            });
        }
        self.moved.holds.push_back((due_ms, key, uid));
    }

    /// Stores `delivery`, which session `idx` (`key`) holds outside its queue (a
    /// direct copy held for its old owner's redirects, a redirect held until its
    /// disk tail is in), and returns its number in the store (0: not stored). A
    /// stored session's held copy is stored, in the epoch of whatever the copy's
    /// arrival stored (the batch's forward mark, the `PubId` marks, the window's ids:
    /// they say it was handled, and they are committed with it, sim seed 70), and
    /// comes back at a restart in the session's queue (`restore_held`). (A QoS 0
    /// delivery is not stored.)
    fn store_held_delivery(&mut self, idx: SessionIdx, key: &Str, delivery: &Delivery) -> u64 {
        if delivery.qos == QoS::AtMostOnce || self.persist.is_none() || !self.session(idx).stored {
            return 0;
        }
        self.moved.held_stored += 1;
        let seq = self.moved.held_stored;
        self.store_op(StoreOp::PutHeld {
            client_id: key.clone(),
            seq,
            delivery: delivery.clone(),
        });
        seq
    }

    /// Delivers what `key`'s window holds that a redirect of `upto` releases (all of
    /// it for `None`) to its session, if it is still the window's.
    fn release_held(&mut self, now_ms: u64, key: &Str, upto: Option<PubId>) {
        let Some(w) = self.moved.windows.get_mut(key) else {
            return;
        };
        let uid = w.uid;
        let out = w.release(upto);
        if out.is_empty() {
            return;
        }
        let idx = self
            .by_client_id
            .get(key)
            .copied()
            .filter(|&idx| self.session(idx).uid == uid);
        self.deliver_released(key, idx.map(|i| (now_ms, i)), out);
    }

    /// Queues released deliveries of `key` for its session `to` (at that time; none:
    /// it is gone, they are dropped) and answers whoever waited for each, after the
    /// commit of what the queueing stored. A stored one leaves the store in the
    /// epoch that queues it.
    pub(super) fn deliver_released(
        &mut self,
        key: &Str,
        to: Option<(u64, SessionIdx)>,
        out: Released,
    ) {
        for (d, ack, stored) in out {
            if stored != 0 {
                self.store_op(StoreOp::DelHeld {
                    client_id: key.clone(),
                    seq: stored,
                });
            }
            if let Some((now_ms, idx)) = to {
                self.enqueue(now_ms, idx, d);
            }
            match ack {
                Some(t) if self.pending_forwards.contains_key(&t) => {
                    self.ack_after_commit(self.shard, t)
                }
                Some(t) if self.pending_retains.contains_key(&t) => {
                    self.ack_after_commit(self.shard, t)
                }
                Some(t) => {
                    self.bp_release_held_remote(t);
                }
                None => {}
            }
        }
    }

    /// A held delivery waited [`HOLD_MAX_MS`]: its window delivers all it holds and
    /// stops holding (the old owner's path is taken as gone).
    fn expire_holds(&mut self, now_ms: u64) {
        while let Some((due, _, _)) = self.moved.holds.front()
            && *due <= now_ms
        {
            let Some((_, key, uid)) = self.moved.holds.pop_front() else {
                break;
            };
            let Some(w) = self.moved.windows.get_mut(&key) else {
                continue;
            };
            if w.uid == uid && w.held.front().is_some_and(|h| h.due_ms <= now_ms) {
                if w.holding {
                    self.stats.moved_order_given_up += 1;
                    order_given_up(self.node_id, self.shard, &key);
                }
                w.holding = false;
                self.release_held(now_ms, &key, None);
            }
        }
    }

    /// The shard stood still from `since_ms` to `now_ms` (its process was stopped,
    /// SIGSTOP or a frozen VM, or starved): the holds made before it do not count
    /// that time. A hold waits for the old owner's redirects; while this shard stood
    /// still none could be taken, and the peers' calls to it failed, so theirs wait
    /// in their queues (or hint stores) until it answers again. Counted, every hold
    /// older than [`HOLD_MAX_MS`] ran out at the first tick after the resume, before
    /// any of them could come, and the old owner's copies came after the later ones
    /// it had let go (fault harness, pause scenario, CI's CHAOS_SEED=904807: the new
    /// owner SIGSTOPped 10 s). Each such hold keeps what it had left.
    pub fn stood_still(&mut self, since_ms: u64, now_ms: u64) {
        let gap = now_ms.saturating_sub(since_ms);
        if gap == 0 || self.moved.holds.is_empty() {
            return;
        }
        let before = |due: u64| due.saturating_sub(HOLD_MAX_MS) <= since_ms;
        for (due, _, _) in self.moved.holds.iter_mut() {
            if before(*due) {
                *due += gap;
            }
        }
        self.moved
            .holds
            .make_contiguous()
            .sort_by_key(|(due, _, _)| *due);
        for w in self.moved.windows.values_mut() {
            for h in w.held.iter_mut() {
                if before(h.due_ms) {
                    h.due_ms += gap;
                }
            }
        }
    }

    /// Session `idx` leaves this shard: what its window holds goes into its queue
    /// first (it travels with it).
    pub(super) fn release_all_held(&mut self, now_ms: u64, idx: SessionIdx) {
        if self.moved.windows.is_empty() {
            return;
        }
        let key = self.session(idx).client_id.clone();
        self.release_held(now_ms, &key, None);
    }

    /// A publication matched the ghost `gidx` with QoS `qos`: it goes to the node
    /// the session moved to, and whoever waits for the publication waits for that
    /// node too.
    pub(super) fn redirect(&mut self, gidx: SessionIdx, msg: &Message, direct: bool) {
        let Some(remote) = self.remote else {
            return;
        };
        let Some(Some(g)) = self.moved.ghosts.get((gidx - GHOST_BASE) as usize) else {
            return;
        };
        let (client_id, (node, epoch), confirmed) = (g.client_id.clone(), g.to, g.confirmed);
        // A QoS 0 copy matched before the session's claim here was sent to the node
        // that had it then too: not the session's by this path (sim seed 2172).
        if direct
            && msg.qos == QoS::AtMostOnce
            && g.seen
                .as_ref()
                .is_some_and(|w| matched_before(self.routes_index, w.claim_index))
        {
            return;
        }
        let id = match self.moved.current {
            Some(id) => Some(id),
            None => self.new_pub_id(msg.qos),
        };
        if !confirmed {
            let Some(Some(g)) = self.moved.ghosts.get_mut((gidx - GHOST_BASE) as usize) else {
                return;
            };
            // What an earlier ghost of the session here would have sent on is judged
            // by the ids the session got, not by the marks (`Ghost::earlier`).
            let direct = direct
                && !id.is_some_and(|id| {
                    g.earlier
                        .as_ref()
                        .is_some_and(|p| p.sends_on(id, &msg.topic))
                });
            // Held once: a copy the session got before it left, or one the ghost
            // holds already (it came by both paths), is not held again.
            if let (Some(id), Some(w)) = (id, g.seen.as_mut())
                && w.seen(id, direct)
            {
                return;
            }
            let ack = self.redirect_ack(msg.qos);
            let seq = self.store_held(gidx, &client_id, msg);
            if let Some(Some(g)) = self.moved.ghosts.get_mut((gidx - GHOST_BASE) as usize) {
                g.held.push((msg.clone(), id, ack, !direct));
                g.held_seqs.extend(seq);
            }
            if seq.is_some() {
                self.store_held_window(gidx, &client_id, id);
            }
            return;
        }
        // A copy that came here by the normal path at or below the marks the
        // session left with: the new owner would skip it had it gone there
        // directly, but it cannot tell a redirect's path, so it is not sent on.
        // (Sim seed 655: the session got its own QoS 0 publications on node 2 and
        // moved 2 -> 1 -> 3; their copies for node 1 waited out a partition, reached
        // node 1 after the session left it and its ghost sent them on to node 3,
        // where the session got them again.)
        if direct
            && let (Some(id), Some(Some(g))) =
                (id, self.moved.ghosts.get((gidx - GHOST_BASE) as usize))
            && g.seen.as_ref().is_some_and(|w| w.handled(id))
            && !g
                .earlier
                .as_ref()
                .is_some_and(|p| p.sends_on(id, &msg.topic))
        {
            return;
        }
        let ack = self.redirect_ack(msg.qos);
        self.send_on(remote, client_id, (node, epoch), msg.clone(), id, ack);
    }

    /// A confirmed ghost of `client_id` sends `message` on to the session's new node
    /// `to` through the forwarder (`remote`); `waiter` (a publisher's token, a
    /// forwarded batch's, another shard's `Ack`) waits for that node's acceptance.
    ///
    /// With a store, a QoS 1/2 copy is stored ([`StoreOp::PutRedirect`], in the epoch
    /// of whatever its arrival stored here) until that node accepted it, and sent
    /// again after a restart ([`Engine::restore_redirects`]). Why (h154's last "not
    /// covered" case): the confirmation deleted the session's records, while the marks
    /// that say this node handled the copy (the batch's forward mark, the `PubId`
    /// marks) are stored with the next commit; a crash with the redirect in the
    /// forwarder's memory then made the sending node's retry (or the publisher's
    /// re-send) be skipped as handled and answered: acknowledged, never delivered.
    /// The forwarder answers a token of its own, so the record goes when this copy
    /// was accepted, and then the waiter gets its answer. Such a redirect leaves only
    /// after the commit of the epoch that holds its record, with what its arrival or
    /// its publication stored (see [`Engine::send_after_id_commit`]).
    fn send_on(
        &mut self,
        remote: ShardId,
        client_id: Str,
        to: (u64, u64),
        message: Message,
        id: Option<PubId>,
        waiter: Option<u64>,
    ) {
        self.stats.remote_forwards_sent += 1;
        let stored = self.persist.is_some() && message.qos != QoS::AtMostOnce;
        let ack = if stored {
            self.moved.redirect_seq += 1;
            let seq = self.moved.redirect_seq;
            let token = self.next_token;
            self.next_token += 1;
            self.store_op(StoreOp::PutRedirect {
                seq,
                redirect: Box::new(RedirectState {
                    client_id: client_id.clone(),
                    to,
                    message: message.clone(),
                    id,
                }),
            });
            self.moved
                .redirects_stored
                .insert(token, (client_id.clone(), seq, waiter));
            Some(token)
        } else {
            waiter
        };
        // Not before the commit of its record's epoch, which holds a local QoS 2
        // publisher's packet id and the publication's id when it is one of this
        // shard's (as `forward_remote` waits for it). Why (fault harness, kill -9
        // scenario, CHAOS_SEED=131463, QoS 2 twice): a ghost here sent a local
        // publisher's QoS 2 publication on at once, the node was killed before that
        // commit, and the new node delivered it; the publisher, without a PUBREC,
        // sent it again after the restart, where no inbound record said it was a
        // re-send, so it was routed as a new publication and delivered again.
        let msg = MeshMsg::Redirect {
            client_id,
            node: to.0,
            epoch: to.1,
            message,
            id,
            ack,
        };
        self.send_after_id_commit(remote, msg, stored);
    }

    /// Whether `token` is a stored redirect's ([`Engine::send_on`]).
    pub(super) fn is_stored_redirect(&self, token: u64) -> bool {
        self.moved.redirects_stored.contains_key(&token)
    }

    /// The new node accepted the stored redirect of `token`: its record goes, and
    /// whoever waited for it gets its answer.
    pub(super) fn stored_redirect_accepted(&mut self, token: u64) {
        let Some((client_id, seq, waiter)) = self.moved.redirects_stored.remove(&token) else {
            return;
        };
        self.store_op(StoreOp::DelRedirect { client_id, seq });
        if let Some(t) = waiter {
            self.release_waiter(t);
        }
    }

    /// Sends again the redirects the store kept (a crash came before their new
    /// nodes accepted them), in the order they were first sent; nobody waits for
    /// them (their waiters died with the process), and each record goes with its
    /// acceptance. The new node's window skips one it got (by its id); past the
    /// window, or for a session that ended there, it drops it. Outside a cluster
    /// they are deleted.
    pub(super) fn restore_redirects(&mut self, mut redirects: Vec<(u64, RedirectState)>) {
        redirects.sort_unstable_by_key(|r| r.0);
        for (seq, r) in redirects {
            self.moved.redirect_seq = self.moved.redirect_seq.max(seq);
            let Some(remote) = self.remote else {
                self.store_op(StoreOp::DelRedirect {
                    client_id: r.client_id,
                    seq,
                });
                continue;
            };
            tracing::debug!(
                shard = self.shard,
                client_id = %r.client_id,
                to_node = r.to.0,
                "restore: a redirect its new node had not accepted, sent again"
            );
            let token = self.next_token;
            self.next_token += 1;
            self.moved
                .redirects_stored
                .insert(token, (r.client_id.clone(), seq, None));
            self.stats.remote_forwards_sent += 1;
            self.outbox[usize::from(remote)].push(MeshMsg::Redirect {
                client_id: r.client_id,
                node: r.to.0,
                epoch: r.to.1,
                message: r.message,
                id: r.id,
                ack: Some(token),
            });
        }
    }

    /// Stores `msg`, which the unconfirmed ghost `gidx` of `client_id` holds, as a
    /// queued delivery of its session's records (still in the store until the new
    /// node confirms), at the QoS its subscriptions here grant. Returns its
    /// sequence number; `None` for a QoS 0 delivery or a session with no records.
    ///
    /// Why (sim seed 748, `sync`): once a copy is held, this shard counts it as
    /// handled (its `PubId` mark, the batch's forward mark), so a re-sent copy of
    /// it (the publisher's re-send routed with the original's id after the
    /// sending node died) is skipped and acknowledged. Held in memory only, the copy
    /// was gone when this node crashed before the ghost let go: acknowledged and
    /// lost. Stored, it comes back with the session, and every mark that covers it
    /// is true: what the session holds is in the same commit or an earlier one.
    fn store_held(&mut self, gidx: SessionIdx, client_id: &Str, msg: &Message) -> Option<u64> {
        let g = self
            .moved
            .ghosts
            .get((gidx - GHOST_BASE) as usize)?
            .as_ref()?;
        if !g.stores_held || msg.qos == QoS::AtMostOnce {
            return None;
        }
        let mut granted = None;
        let mut retain = false;
        let mut subscription_ids = Vec::new();
        for f in &g.filters {
            if !topic::matches(f, &msg.topic) {
                continue;
            }
            if let Some(e) = self.subscriptions.get(f, gidx) {
                granted = Some(granted.unwrap_or(QoS::AtMostOnce).max(e.options.qos));
                retain |= e.options.retain_as_published && msg.retain;
                subscription_ids.extend(e.subscription_id);
            }
        }
        let qos = msg.qos.min(granted?);
        if qos == QoS::AtMostOnce {
            return None;
        }
        let delivery = Delivery {
            message: msg.clone(),
            qos,
            retain,
            subscription_ids,
            share: None,
            seq: 0,
        };
        self.store_moving_delivery(client_id, delivery)
    }

    /// The ghost `gidx` of `client_id` stored a held copy with `id`: its window
    /// goes to the store as the session's (`StoreOp::PutWindow`; the session's
    /// own left the store at the export), whole with the first such copy, then
    /// one part per id. A crash before the confirmation restores the session with
    /// the copy in its queue and the id in its window, so the copy sent again (a
    /// retried batch, an older ghost's redirect) is not held and stored again when
    /// the session is parked again (sim seed 194 with the held copies stored: QoS 2
    /// twice).
    fn store_held_window(&mut self, gidx: SessionIdx, client_id: &Str, id: Option<PubId>) {
        let expires_ms = self.moved.clock_ms + MOVED_WINDOW_MS;
        let Some(Some(g)) = self.moved.ghosts.get_mut((gidx - GHOST_BASE) as usize) else {
            return;
        };
        let Some(w) = g.seen.as_ref() else {
            return;
        };
        let mut bytes = Vec::new();
        let part = g.window_parts;
        if part == 0 {
            encode_marks(&mut bytes, &w.marks, w.order.iter());
        } else if let Some(id) = id {
            encode_marks(&mut bytes, &[], std::iter::once(&original(id)));
        } else {
            return;
        }
        g.window_parts += 1;
        self.store_op(StoreOp::PutWindow {
            client_id: client_id.clone(),
            part,
            expires_ms,
            bytes,
        });
    }

    /// One more answer the routed QoS 1/2 publication's waiter waits for.
    fn redirect_ack(&mut self, qos: QoS) -> Option<u64> {
        if qos == QoS::AtMostOnce {
            return None;
        }
        match self.moved.ack? {
            RedirectAck::Publisher(t) => {
                let (_, n) = self.pending_retains.get_mut(&t)?;
                *n += 1;
                Some(t)
            }
            RedirectAck::Batch(t) => {
                let n = self.pending_forwards.get_mut(&t)?;
                *n += 1;
                Some(t)
            }
            RedirectAck::Peer => self.bp_hold_remote(),
        }
    }

    /// A publication for the session `client_id` that its old node sent on
    /// (`from` is the remote id), or that the local shard serving the batch
    /// passed here with `ack`.
    pub(super) fn on_redirect(
        &mut self,
        now_ms: u64,
        from: ShardId,
        client_id: Str,
        message: Message,
        id: Option<PubId>,
        ack: Option<u64>,
    ) {
        let from_remote = self.is_remote(from);
        if from_remote {
            self.moved.ack = self.forward_batch.map(RedirectAck::Batch);
        } else if let Some(t) = ack {
            // The shard that sent it waits for this shard's word: a ghost here that
            // holds or sends the copy on holds that word too.
            self.bp_begin_remote(from, t, message.qos, false);
            self.moved.ack = Some(RedirectAck::Peer);
        }
        self.redirected(now_ms, client_id, message, id);
        self.moved.ack = None;
        self.moved.current = None;
        if let Some(t) = ack
            && (from_remote || !self.bp_end_remote())
        {
            self.ack_after_commit(from, t);
        }
    }

    fn redirected(&mut self, now_ms: u64, client_id: Str, message: Message, id: Option<PubId>) {
        self.moved.current = id;
        // It moved on from here too: on it goes, unless it started afresh here and
        // its new node has it, where the redirect was for an earlier session of the
        // ClientID (as the session would drop it had it stayed, below). An
        // unconfirmed ghost holds it either way: the session may come back here
        // (sync sim seed 194: a parked session whose window had not come back with
        // it dropped a redirect for itself, acknowledged QoS 2 lost).
        if let Some(&slot) = self.moved.by_client.get(&client_id) {
            if self.moved.ghosts.get(slot as usize).is_some_and(|g| {
                g.as_ref()
                    .is_some_and(|g| g.confirmed && !g.passes_redirects)
            }) {
                return;
            }
            return self.redirect(GHOST_BASE + slot, &message, false);
        }
        let owner = crate::hash::shard_for(client_id.as_bytes(), self.shard_count) as ShardId;
        if owner != self.shard {
            let ack = self.redirect_ack(message.qos);
            self.outbox[usize::from(owner)].push(MeshMsg::Redirect {
                client_id,
                node: 0,
                epoch: 0,
                message,
                id,
                ack,
            });
            return;
        }
        let Some(&idx) = self.by_client_id.get(&client_id) else {
            return; // the session ended meanwhile
        };
        // Only for the session that moved here with a window: not for a new one
        // (a clean start after it moved) nor past the window.
        let uid = self.session(idx).uid;
        if self
            .moved
            .windows
            .get(&client_id)
            .is_none_or(|w| w.uid != uid)
        {
            return;
        }
        // The old owner got this far in the stream of its origin: what is held of
        // that stream up to it was not overtaken by anything older (`moved_direct`).
        if let Some(id) = id {
            self.release_held(now_ms, &client_id, Some(id));
        }
        let origin = self.moved.origin;
        if let Some(id) = id
            && let Some(w) = self.moved.windows.get_mut(&client_id)
        {
            // A publication of this shard made after the session's subscriptions
            // were attached here reached it here.
            let here = id.origin == origin && id.shard == self.shard;
            let n = id_number(id.seq);
            let attached = w.local_mark.get(id_class(id.seq) as usize);
            if (here && attached.is_some_and(|m| n > *m)) || w.seen(id, false) {
                return;
            }
            self.moved.window_changed(client_id.clone());
        }
        // Still taking its disk tail in: its subscriptions are not attached yet, and
        // the tail's older messages come first.
        if self.importing.contains_key(&client_id) {
            return self.hold_for_tail(idx, client_id, message);
        }
        self.deliver_to_session(now_ms, idx, message);
    }

    /// Delivers `message` to session `idx` as its subscriptions here say (QoS,
    /// subscription ids, retain as published, what the session subscribes to
    /// here decides); nothing when none matches.
    fn deliver_to_session(&mut self, now_ms: u64, idx: SessionIdx, message: Message) {
        let subs = self.session(idx).subscriptions.iter();
        let Some(d) = delivery_for(subs, message) else {
            return; // unsubscribed meanwhile
        };
        self.enqueue(now_ms, idx, d);
    }

    /// A redirect for session `idx` (`key`) that came while the session takes its
    /// old owner's disk tail in (`transfer::Importing`): held until the tail is in
    /// and queued after it ([`Engine::import_finish`]), its waiter answered then, and
    /// stored with the session's records meanwhile like a held direct copy.
    ///
    /// Why (fault harness, kill -9 scenario, CHAOS_SEED=695844, acknowledged QoS 1/2
    /// lost): the session's subscriptions are attached only with its tail, so a
    /// redirect delivered by them then matched nothing and was dropped, answered as
    /// accepted, while the window had recorded its id as delivered: the old owner's
    /// redirect of the same copy, sent on at the confirmation, was then skipped as a
    /// copy the session had got. An older ghost on a third node (the session had
    /// lived there within the window) sends such a redirect whenever a publication
    /// matches it during the import. A ghost of the session this shard keeps while
    /// the tail comes (`take_in`) takes such a redirect first and sends it on to the
    /// tail's node; this hold is for a shard without one.
    fn hold_for_tail(&mut self, idx: SessionIdx, key: Str, message: Message) {
        let Some(imp) = self.importing.get(&key) else {
            return;
        };
        let subs = imp.subscriptions.iter().map(|(f, e)| (f, e));
        let Some(d) = delivery_for(subs, message) else {
            return; // not subscribed to it
        };
        let ack = self.redirect_ack(d.qos);
        let stored = self.store_held_delivery(idx, &key, &d);
        if let Some(imp) = self.importing.get_mut(&key) {
            imp.redirects.push((d, ack, stored));
        }
    }
}

/// The delivery of `message` to a session with subscriptions `subs` (QoS, subscription
/// ids, retain as published, as its plain subscriptions that match say); `None` when
/// none matches.
fn delivery_for<'a>(
    subs: impl Iterator<Item = (&'a Str, &'a SubscriptionEntry)>,
    message: Message,
) -> Option<Delivery> {
    let mut qos = None;
    let mut retain = false;
    let mut subscription_ids = Vec::new();
    for (f, e) in subs {
        if topic::is_shared(f) || !topic::matches(f, &message.topic) {
            continue;
        }
        qos = Some(qos.unwrap_or(QoS::AtMostOnce).max(e.options.qos));
        retain |= e.options.retain_as_published && message.retain;
        subscription_ids.extend(e.subscription_id);
    }
    let qos = message.qos.min(qos?);
    Some(Delivery {
        message,
        qos,
        retain,
        subscription_ids,
        share: None,
        seq: 0,
    })
}

#[cfg(test)]
mod tests {
    //! Goal: a publication that matches a session after it left for another node
    //! follows it there, once that node confirmed it has the session, and its
    //! publisher's acknowledgement waits for that node; the new node does not deliver
    //! to the session again what it got on its old node, whichever path a copy took.

    use bytes::Bytes;
    use tessera_proto::{Packet, ProtocolVersion, PubRec, Publish};

    use super::super::Limits;
    use super::super::testing::{connect_packet, drain, engines, subscribe_packet};
    use super::*;

    const V: ProtocolVersion = ProtocolVersion::V3_1_1;

    fn remote_out(e: &mut Engine) -> Vec<MeshMsg> {
        let r = usize::from(e.remote.expect("remote"));
        std::mem::take(&mut e.outbox[r])
    }

    /// A cluster engine with a persistent session "s" subscribed to "t" at QoS 2.
    fn node(origin: u64) -> (Engine, ShardId, crate::session::ConnId) {
        let mut e = engines(1, &Limits::default()).remove(0);
        let remote = e.enable_remote().expect("room for the remote id");
        e.set_origin(origin);
        let s = e.connect(1, connect_packet(V, "s", false), false);
        e.handle_packet(1, s, subscribe_packet("t", QoS::ExactlyOnce));
        drain(&mut e, s, V);
        remote_out(&mut e);
        (e, remote, s)
    }

    fn message(payload: &'static str) -> Message {
        let mut p = Publish::new(
            Str::from_static("t"),
            Bytes::from_static(payload.as_bytes()),
        );
        p.qos = QoS::ExactlyOnce;
        p.packet_id = 1;
        super::super::message_from_publish(1, p, SessionUid(0), ProtocolVersion::V5)
    }

    fn forwarded(payload: &'static str, seq: u64) -> MeshMsg {
        MeshMsg::Forwarded {
            message: message(payload),
            mark: None,
            ack: None,
            id: Some(PubId {
                origin: 5,
                shard: 0,
                seq,
            }),
            earlier_life: false,
            routes_index: 0,
        }
    }

    /// A copy of publication `seq` (origin 5) redirected to session "s" by its old
    /// node.
    fn redirect(payload: &'static str, seq: u64) -> MeshMsg {
        MeshMsg::Redirect {
            client_id: Str::from_static("s"),
            node: 0,
            epoch: 99,
            message: message(payload),
            id: Some(PubId {
                origin: 5,
                shard: 0,
                seq,
            }),
            ack: None,
        }
    }

    fn payloads(e: &mut Engine, conn: crate::session::ConnId) -> Vec<Bytes> {
        drain(e, conn, V)
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p.payload),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_ghost_holds_what_matches_until_confirmed_and_the_publisher_waits_for_the_new_node() {
        let (mut a, remote, _) = node(7);
        assert!(a.export_session(2, "s", 0, (2, 99)).is_some());
        assert_eq!(a.ghost_count(), 1);
        let p = a.connect(2, connect_packet(V, "p", true), false);
        drain(&mut a, p, V);
        let mut publish = Publish::new(Str::from_static("t"), Bytes::from_static(b"x"));
        publish.qos = QoS::ExactlyOnce;
        publish.packet_id = 5;
        a.handle_packet(3, p, Packet::Publish(publish));
        assert!(
            !remote_out(&mut a)
                .iter()
                .any(|m| matches!(m, MeshMsg::Redirect { .. })),
            "sent on before the new node confirmed it has the session"
        );
        assert!(
            drain(&mut a, p, V).is_empty(),
            "PUBREC while the ghost holds it"
        );
        assert!(a.moving_done(4, "s", (2, 99)));
        let token = match &remote_out(&mut a)[..] {
            [
                MeshMsg::Redirect {
                    client_id,
                    node: 2,
                    epoch: 99,
                    id: Some(_),
                    ack: Some(t),
                    ..
                },
            ] if client_id == "s" => *t,
            other => panic!("expected one redirect to node 2: {other:?}"),
        };
        assert!(
            drain(&mut a, p, V).is_empty(),
            "PUBREC before node 2 took it"
        );
        a.handle_mesh(5, remote, MeshMsg::Ack { token });
        assert_eq!(drain(&mut a, p, V), vec![Packet::PubRec(PubRec::new(5))]);
        // The ghost goes when it expires, and with it the route.
        a.expire_moved(5 + MOVED_WINDOW_MS);
        assert_eq!(a.ghost_count(), 0);
    }

    /// Session "s" moves from `a` to a new node B (origin 8) with its window and
    /// connects there: B, its remote id, the connection, the window's bytes.
    fn moved_to_b(a: &mut Engine) -> (Engine, ShardId, crate::session::ConnId, Vec<u8>) {
        let bytes = a.export_session(2, "s", 0, (2, 99)).expect("exported");
        let window = a.moving_window("s").expect("a window");
        let mut b = engines(1, &Limits::default()).remove(0);
        let remote_b = b.enable_remote().expect("room for the remote id");
        b.set_origin(8);
        b.import_session(3, "s", &bytes, 0).expect("imported");
        assert!(b.import_window(3, "s", &window));
        let s = b.connect(3, connect_packet(V, "s", false), false);
        drain(&mut b, s, V);
        (b, remote_b, s, window)
    }

    #[test]
    fn the_new_node_skips_what_the_session_got_on_its_old_node_by_either_path() {
        let (mut a, remote_a, s) = node(7);
        a.handle_mesh(1, remote_a, forwarded("before", 3));
        assert_eq!(payloads(&mut a, s), vec![Bytes::from_static(b"before")]);
        let (mut b, remote_b, s, window) = moved_to_b(&mut a);
        assert!(!b.import_window(3, "s", &window[..window.len() - 1]));
        // The copy the old node handled comes late: not again.
        b.handle_mesh(4, remote_b, forwarded("before", 3));
        assert!(payloads(&mut b, s).is_empty(), "delivered twice");
        // A later one directly, then redirected by the old node: once.
        b.handle_mesh(4, remote_b, forwarded("direct first", 4));
        b.handle_mesh(4, remote_b, redirect("direct first", 4));
        assert_eq!(
            payloads(&mut b, s),
            vec![Bytes::from_static(b"direct first")]
        );
        // The other order.
        b.handle_mesh(4, remote_b, redirect("redirected first", 5));
        b.handle_mesh(4, remote_b, forwarded("redirected first", 5));
        assert_eq!(
            payloads(&mut b, s),
            vec![Bytes::from_static(b"redirected first")]
        );
    }

    /// Network scenario (CHAOS_SEED=75901, 630 acknowledged messages lost): a
    /// ghost's expiry named its slot and ClientID only. s left node 1 (its ghost
    /// confirmed at 30.5 s of the run), came back at 45.7 s and left again at 56.7 s;
    /// the second ghost got the first one's slot, and the first one's expiry, due at
    /// 60.5 s, ended it 26 s early. What reached node 1 for s after that (another
    /// node's redirects, hinted while a one-way cut kept them from node 1) found
    /// neither a session nor a ghost there: acknowledged, never delivered.
    #[test]
    fn a_ghost_lives_its_whole_window_after_an_earlier_ghost_of_its_client_id_in_its_slot() {
        let (mut a, remote_a, _) = node(7);
        // s leaves for node 2, which confirms: this ghost ends a window later.
        let (mut b, _, s_b, _) = moved_to_b(&mut a);
        assert!(a.moving_done(3, "s", (2, 99)));
        drain(&mut b, s_b, V);
        // s comes back from node 2, then leaves again, for node 3, within that window.
        let back = b
            .export_session(10_000, "s", 0, (1, 100))
            .expect("exported");
        let window = b.moving_window("s").expect("a window");
        a.import_session(10_000, "s", &back, 0).expect("imported");
        assert!(a.import_window(10_000, "s", &window));
        assert_eq!(a.ghost_count(), 0, "s is here again");
        assert!(a.export_session(20_000, "s", 0, (3, 101)).is_some());
        assert!(a.moving_done(20_001, "s", (3, 101)));
        remote_out(&mut a);
        // The first ghost's window ends, not the second one's.
        a.expire_moved(3 + MOVED_WINDOW_MS);
        assert_eq!(
            a.ghost_count(),
            1,
            "the later ghost ended with the earlier one"
        );
        // A copy matched for s while it lived here, late: it follows s to node 3.
        a.handle_mesh(3 + MOVED_WINDOW_MS, remote_a, forwarded("late", 9));
        match &remote_out(&mut a)[..] {
            [
                MeshMsg::Redirect {
                    node: 3, message, ..
                },
            ] => assert_eq!(message.payload, "late"),
            other => panic!("expected the late copy redirected to node 3: {other:?}"),
        }
        a.expire_moved(20_001 + MOVED_WINDOW_MS);
        assert_eq!(a.ghost_count(), 0);
    }

    /// Fault harness, pause scenario (CHAOS_SEED=140775): a node paused past its
    /// lease parked its subscriber's session for another node's waiting claim and
    /// took it back when the client came back to it. The ghost went before the
    /// session's subscriptions came back, so its filter had no subscriber for a
    /// moment: the node proposed the route's removal and its add again, and the
    /// publications other nodes matched in between were acknowledged and never
    /// delivered. The route must not change: neither the cluster (the remote id)
    /// nor the other shards hear of it.
    #[test]
    fn a_session_taken_back_from_its_ghost_keeps_its_routes_throughout() {
        let mut es = engines(2, &Limits::default());
        let remote = es[0].enable_remote().expect("room for the remote id");
        es[1].enable_remote().expect("room for the remote id");
        es[0].set_origin(7);
        let a = &mut es[0];
        let s = a.connect(1, connect_packet(V, "s", false), false);
        a.handle_packet(1, s, subscribe_packet("t", QoS::ExactlyOnce));
        drain(a, s, V);
        let routed = |a: &mut Engine| -> Vec<String> {
            let mut changes = Vec::new();
            for out in &mut a.outbox {
                for m in std::mem::take(out) {
                    match m {
                        MeshMsg::RouteAdd { filter, .. } => changes.push(format!("add {filter}")),
                        MeshMsg::RouteRemove { filter, .. } => {
                            changes.push(format!("remove {filter}"))
                        }
                        _ => {}
                    }
                }
            }
            changes
        };
        assert_eq!(
            routed(a),
            ["add t", "add t"],
            "the first subscriber routes it"
        );
        // Parked for node 2's claim: the ghost keeps the route.
        assert!(a.export_session(2, "s", 0, (2, 99)).is_some());
        assert_eq!(routed(a), Vec::<String>::new(), "parked");
        a.handle_mesh(3, remote, forwarded("held", 4));
        // Node 2 only waited: the client comes back here, and so does its session.
        assert_eq!(a.resume_moving(4, "s", 0).ok(), Some(true));
        assert_eq!(
            routed(a),
            Vec::<String>::new(),
            "the route changed while the session came back"
        );
        assert_eq!(a.ghost_count(), 0);
        let s = a.connect(5, connect_packet(V, "s", false), false);
        assert_eq!(payloads(a, s), vec![Bytes::from_static(b"held")]);
        a.handle_mesh(6, remote, forwarded("after", 5));
        assert_eq!(payloads(a, s), vec![Bytes::from_static(b"after")]);
        // The session's end removes the route as before: the ghost's entries are gone.
        let c = a.connect(7, connect_packet(V, "s", true), false);
        drain(a, c, V);
        a.handle_packet(
            7,
            c,
            Packet::Disconnect(tessera_proto::Disconnect::new(
                tessera_proto::ReasonCode::Success,
            )),
        );
        assert_eq!(routed(a), ["remove t", "remove t"]);
    }

    /// Issue 16, item 3 (`cluster.wait_for_session_owner = false`; the fault harness's
    /// QoS 2 duplicates of seeds 269197, 446833, 682107): A parked s's session for
    /// node 2's claim (epoch 99) and its ghost held "old"; node 2 could not reach A
    /// and started s afresh (the log's mark: 99), and that new session, which may
    /// have had "old" already, is taken in on A before A applied the mark. The older
    /// copy goes first, and its ghost's "old" is not delivered into the new session.
    /// A copy node 2 fetched under the marked claim is the session it continued (the
    /// confirmation lost): what the ghost held is that session's and comes with it.
    #[test]
    fn a_ghost_of_an_older_session_gives_nothing_to_a_new_session_taken_in() {
        for fetched in [false, true] {
            let (mut a, remote, _) = node(7);
            assert!(a.export_session(2, "s", 0, (2, 99)).is_some());
            if fetched {
                a.moving_fetched("s");
            }
            a.handle_mesh(3, remote, forwarded("old", 4));
            let mut b = engines(1, &Limits::default()).remove(0);
            b.enable_remote().expect("room for the remote id");
            b.set_origin(8);
            let sb = b.connect(3, connect_packet(V, "s", false), false);
            b.handle_packet(3, sb, subscribe_packet("t", QoS::ExactlyOnce));
            drain(&mut b, sb, V);
            let bytes = b.export_session(4, "s", 0, (1, 120)).expect("exported");
            assert!(a.drop_older_lineage("s", 100), "older than the mark");
            let (mut a, remote, _) = node(7);
            assert!(a.export_session(2, "s", 0, (2, 99)).is_some());
            if fetched {
                a.moving_fetched("s");
            }
            a.handle_mesh(3, remote, forwarded("old", 4));
            assert!(!a.drop_older_lineage("s", 98), "newer than the mark");
            assert_eq!(
                a.drop_older_lineage("s", 99),
                !fetched,
                "fetched: {fetched}"
            );
            a.import_session(5, "s", &bytes, 0).expect("imported");
            let s = a.connect(5, connect_packet(V, "s", false), false);
            let expected = if fetched {
                vec![Bytes::from_static(b"old")]
            } else {
                Vec::new()
            };
            assert_eq!(payloads(&mut a, s), expected, "fetched: {fetched}");
            assert_eq!(a.moving_count(), 0);
        }
    }

    /// Seed 160 of the data-plane simulation: the session left this node and the
    /// node it went to died before confirming. A publication reached this node both
    /// directly and redirected by the session's older ghost on a third node; the
    /// ghost held both, and the session, taken back here, got it twice.
    #[test]
    fn a_ghost_holds_a_publication_once_whichever_paths_it_took_and_the_session_taken_back_keeps_its_window()
     {
        let (mut a, remote, _) = node(7);
        assert!(a.export_session(2, "s", 0, (2, 99)).is_some());
        a.handle_mesh(3, remote, forwarded("both paths", 4));
        a.handle_mesh(3, remote, redirect("both paths", 4));
        a.handle_mesh(3, remote, redirect("redirected first", 5));
        a.handle_mesh(3, remote, forwarded("redirected first", 5));
        assert!(
            remote_out(&mut a).is_empty(),
            "sent on before a confirmation"
        );
        // Node 2 never confirms: the session comes back here.
        assert_eq!(a.resume_moving(4, "s", 0).ok(), Some(true));
        let s = a.connect(4, connect_packet(V, "s", false), false);
        assert_eq!(
            payloads(&mut a, s),
            vec![
                Bytes::from_static(b"both paths"),
                Bytes::from_static(b"redirected first")
            ]
        );
        // Redirects still on their way from an older ghost: what it got is skipped,
        // the rest delivered.
        a.handle_mesh(5, remote, redirect("both paths", 4));
        a.handle_mesh(5, remote, redirect("new", 6));
        assert_eq!(payloads(&mut a, s), vec![Bytes::from_static(b"new")]);
    }

    /// A forwarded copy at QoS `qos` from origin 5, shard 0, with its `n`th id there.
    fn forwarded_at(payload: &'static str, qos: QoS, n: u64) -> MeshMsg {
        let mut message = message(payload);
        message.qos = qos;
        MeshMsg::Forwarded {
            message,
            mark: None,
            ack: None,
            id: Some(PubId {
                origin: 5,
                shard: 0,
                seq: id_seq(qos as u64, n),
            }),
            earlier_life: false,
            routes_index: 0,
        }
    }

    /// Sim seed 655: the session got a publication on node A and moved A -> B -> C.
    /// A copy of it (sent to B before the session was there, across a partition)
    /// reached B after B's ghost was confirmed: the ghost sent it on to C, where a
    /// redirect is checked against the ids the session got, not the marks, and the
    /// session got it again. A confirmed ghost keeps the marks for what reaches it by
    /// the normal path.
    #[test]
    fn a_confirmed_ghost_does_not_send_on_a_copy_the_session_got_before_it_came() {
        let (mut a, remote_a, s) = node(7);
        a.handle_mesh(1, remote_a, forwarded_at("on A", QoS::AtMostOnce, 3));
        assert_eq!(payloads(&mut a, s), vec![Bytes::from_static(b"on A")]);
        let (mut b, remote_b, _, _) = moved_to_b(&mut a);
        assert!(b.export_session(4, "s", 0, (3, 100)).is_some());
        assert!(b.moving_done(5, "s", (3, 100)));
        remote_out(&mut b);
        // The late copy of what it got on A, and an older one: not sent on.
        b.handle_mesh(6, remote_b, forwarded_at("on A", QoS::AtMostOnce, 3));
        b.handle_mesh(6, remote_b, forwarded_at("older", QoS::AtMostOnce, 2));
        let out = remote_out(&mut b);
        assert!(
            !out.iter().any(|m| matches!(m, MeshMsg::Redirect { .. })),
            "sent on to the session's node: {out:?}"
        );
        // A later one is, and so is a redirect from an older ghost (its path is not
        // known here: the new owner checks it against what the session got).
        b.handle_mesh(6, remote_b, forwarded_at("later", QoS::AtMostOnce, 4));
        b.handle_mesh(6, remote_b, redirect("redirected", 2));
        let sent: Vec<_> = remote_out(&mut b)
            .into_iter()
            .filter_map(|m| match m {
                MeshMsg::Redirect {
                    node: 3,
                    epoch: 100,
                    message,
                    ..
                } => Some(message.payload),
                _ => None,
            })
            .collect();
        assert_eq!(
            sent,
            vec![
                Bytes::from_static(b"later"),
                Bytes::from_static(b"redirected")
            ]
        );
    }

    #[test]
    fn the_new_node_skips_a_stale_copy_older_than_what_the_session_got_at_any_qos() {
        // Sim seed 250: a QoS 0 copy sent to node B before the session was there (a
        // retry across a partition) reached it there after the session had got later
        // publications of the same publisher on node A: out of order. And a QoS 0 copy
        // the session got on A came again on B: twice.
        let (mut a, remote_a, s) = node(7);
        a.handle_mesh(1, remote_a, forwarded_at("a3", QoS::AtMostOnce, 3));
        assert_eq!(payloads(&mut a, s), vec![Bytes::from_static(b"a3")]);
        let (mut b, remote_b, s, _) = moved_to_b(&mut a);
        // Older than what it got on A, and the one it got: neither.
        b.handle_mesh(4, remote_b, forwarded_at("a2", QoS::AtMostOnce, 2));
        b.handle_mesh(4, remote_b, forwarded_at("a3", QoS::AtMostOnce, 3));
        // Later ones at QoS 0, and QoS 1 (its own sequence: not covered by the QoS 0
        // mark): delivered.
        b.handle_mesh(4, remote_b, forwarded_at("a4", QoS::AtMostOnce, 4));
        b.handle_mesh(4, remote_b, forwarded_at("b1", QoS::AtLeastOnce, 1));
        // (Held for A's redirects of them, sim seed 1508; none comes here.)
        assert!(payloads(&mut b, s).is_empty());
        b.expire_moved(4 + HOLD_MAX_MS);
        assert_eq!(
            payloads(&mut b, s),
            vec![Bytes::from_static(b"a4"), Bytes::from_static(b"b1")]
        );
    }

    /// Sim seed 1508: a QoS 2 copy for the session's old node A waited out a
    /// partition there while the session moved to B; later publications of the same
    /// publisher reached B directly, and the late one, redirected by A's ghost, came
    /// after them. B now holds a direct copy until A's redirect of it (A routes the
    /// session's filters for its ghost, so it gets every later one too, after the
    /// older ones), and the older one comes first.
    #[test]
    fn a_late_redirect_of_an_older_publication_is_delivered_before_later_direct_ones() {
        let qos2 = QoS::ExactlyOnce;
        let (mut a, remote_a, s) = node(7);
        a.handle_mesh(1, remote_a, forwarded_at("3", qos2, 3));
        assert_eq!(payloads(&mut a, s), vec![Bytes::from_static(b"3")]);
        let (mut b, remote_b, s_b, _) = moved_to_b(&mut a);
        assert!(a.moving_done(4, "s", (2, 99)));
        // 5 and 6 reach B directly while 4 is still on its way to A.
        b.handle_mesh(5, remote_b, forwarded_at("5", qos2, 5));
        b.handle_mesh(5, remote_b, forwarded_at("6", qos2, 6));
        assert!(
            payloads(&mut b, s_b).is_empty(),
            "delivered before the old node's older ones"
        );
        // A gets 4, 5, 6 (it routes the session's filter for its ghost) and sends
        // them on: 4 is delivered, then 5 and 6, each once.
        for n in [4, 5, 6] {
            let label = ["4", "5", "6"][n as usize - 4];
            a.handle_mesh(6, remote_a, forwarded_at(label, qos2, n));
        }
        let redirects = remote_out(&mut a);
        assert_eq!(redirects.len(), 3, "{redirects:?}");
        let mut got = Vec::new();
        for r in redirects {
            b.handle_mesh(7, remote_b, r);
            got.extend(payloads(&mut b, s_b));
        }
        assert_eq!(
            got,
            vec![
                Bytes::from_static(b"4"),
                Bytes::from_static(b"5"),
                Bytes::from_static(b"6")
            ]
        );
        // The next direct one waits for its redirect too.
        b.handle_mesh(8, remote_b, forwarded_at("7", qos2, 7));
        assert!(payloads(&mut b, s_b).is_empty(), "7 waits for its redirect");
    }

    /// CI's CHAOS_SEED=904807 (pause scenario): the new owner B held a direct copy for
    /// A's redirects and was then stopped (SIGSTOP) for 10 s, past the hold's bound.
    /// Counted, the hold ran out at B's first tick after the resume, before A's
    /// redirects (waiting in A's queue for B to answer again) could come, and the older
    /// one came after the later one. Time B stood still does not count: the hold keeps
    /// what it had left, and the redirects that come then are delivered in order.
    #[test]
    fn time_the_new_owner_stood_still_does_not_run_out_its_hold() {
        let qos1 = QoS::AtLeastOnce;
        let (mut a, remote_a, _) = node(7);
        let (mut b, remote_b, s_b, _) = moved_to_b(&mut a);
        assert!(a.moving_done(4, "s", (2, 99)));
        b.expire_moved(4);
        // 6 reaches B directly while 5 is on its way to A; B is held 1 s later.
        b.handle_mesh(10, remote_b, forwarded_at("6", qos1, 6));
        b.expire_moved(250);
        b.expire_moved(500);
        // Stopped from 500 ms to 10.5 s; its first tick after the resume.
        let resumed = 10_500;
        b.stood_still(500, resumed);
        b.expire_moved(resumed);
        assert!(
            payloads(&mut b, s_b).is_empty(),
            "the hold ran out while B stood still"
        );
        assert_eq!(b.stats().moved_order_given_up, 0);
        // A's redirects of 5 and 6 come after the resume, within what the hold had
        // left: 5, then 6, once each.
        for (label, n) in [("5", 5), ("6", 6)] {
            a.handle_mesh(resumed, remote_a, forwarded_at(label, qos1, n));
        }
        let mut got = Vec::new();
        for r in remote_out(&mut a) {
            b.handle_mesh(resumed + 100, remote_b, r);
            got.extend(payloads(&mut b, s_b));
        }
        assert_eq!(
            got,
            vec![Bytes::from_static(b"5"), Bytes::from_static(b"6")]
        );
        // A hold made after the resume is not lengthened by it.
        b.handle_mesh(resumed + 200, remote_b, forwarded_at("8", qos1, 8));
        b.expire_moved(resumed + 200 + HOLD_MAX_MS);
        assert_eq!(payloads(&mut b, s_b), vec![Bytes::from_static(b"8")]);
    }

    /// A QoS 0 copy from origin 5, shard 0, with its `n`th id there, that its sending
    /// node matched with its routes applied up to `routes_index`.
    fn qos0_matched_at(payload: &'static str, n: u64, routes_index: u64) -> MeshMsg {
        let mut copy = forwarded_at(payload, QoS::AtMostOnce, n);
        if let MeshMsg::Forwarded {
            routes_index: at, ..
        } = &mut copy
        {
            *at = routes_index;
        }
        copy
    }

    /// Sim seed 2172: the session got QoS 0 copies on node A, which crashed before a
    /// commit stored the marks and window ids that said so (a QoS 0 delivery stores
    /// nothing), and moved on A -> B -> C. A copy of one, sent to B before the
    /// session was ever there and retried for seconds, reached B after it left: B's
    /// ghost redirected it to C (its marks, from A's restored ones, did not cover it),
    /// and the session got it twice. A QoS 0 copy matched before the session's claim
    /// on a node (its routes index below the claim's log index) is not the session's
    /// by that node's path, neither while it lives there nor for its ghost.
    #[test]
    fn a_qos0_copy_matched_before_the_sessions_claim_here_is_not_its_by_this_path() {
        let (mut a, _, _) = node(7);
        let (mut b, remote_b, s_b, _) = moved_to_b(&mut a);
        b.window_claim("s", 100);
        // (Nothing of origin 5 is held or covered here: marks stay out of it.)
        b.handle_mesh(4, remote_b, qos0_matched_at("stale", 1, 99));
        assert!(payloads(&mut b, s_b).is_empty(), "matched before the claim");
        b.handle_mesh(4, remote_b, qos0_matched_at("after", 2, 100));
        b.handle_mesh(4, remote_b, qos0_matched_at("unknown", 3, 0));
        b.expire_moved(4 + HOLD_MAX_MS);
        assert_eq!(
            payloads(&mut b, s_b),
            vec![Bytes::from_static(b"after"), Bytes::from_static(b"unknown")]
        );
        // It moves on to C: B's ghost does not send on a stale one either.
        assert!(b.export_session(5, "s", 0, (3, 200 << 20)).is_some());
        assert!(b.moving_done(6, "s", (3, 200 << 20)));
        remote_out(&mut b);
        b.handle_mesh(7, remote_b, qos0_matched_at("stale too", 4, 99));
        assert!(
            !remote_out(&mut b)
                .iter()
                .any(|m| matches!(m, MeshMsg::Redirect { .. })),
            "a copy matched before the claim sent on"
        );
        b.handle_mesh(7, remote_b, qos0_matched_at("later", 5, 150));
        let sent: Vec<_> = remote_out(&mut b)
            .into_iter()
            .filter_map(|m| match m {
                MeshMsg::Redirect { message, .. } => Some(message.payload),
                _ => None,
            })
            .collect();
        assert_eq!(sent, vec![Bytes::from_static(b"later")]);
    }

    /// The hold is bounded: a direct copy whose redirect does not come (the old
    /// node died, or a partition outlasts the bound) is delivered after
    /// [`HOLD_MAX_MS`], and the window holds nothing after that.
    #[test]
    fn a_held_direct_copy_goes_at_the_bound_and_the_window_then_holds_nothing() {
        let qos1 = QoS::AtLeastOnce;
        let (mut a, _, _) = node(7);
        let (mut b, remote_b, s_b, _) = moved_to_b(&mut a);
        b.handle_mesh(10, remote_b, forwarded_at("1", qos1, 1));
        b.handle_mesh(20, remote_b, forwarded_at("2", qos1, 2));
        b.expire_moved(10 + HOLD_MAX_MS - 1);
        assert!(payloads(&mut b, s_b).is_empty());
        b.expire_moved(10 + HOLD_MAX_MS);
        assert_eq!(
            payloads(&mut b, s_b),
            vec![Bytes::from_static(b"1"), Bytes::from_static(b"2")]
        );
        b.handle_mesh(10 + HOLD_MAX_MS, remote_b, forwarded_at("3", qos1, 3));
        assert_eq!(payloads(&mut b, s_b), vec![Bytes::from_static(b"3")]);
    }

    /// A held copy holds its publisher's acknowledgement: a local publisher on the
    /// new node (sim seed 1508's shape: the publisher's node is the new owner) gets
    /// its PUBACK once the copy is in the session's queue, not while only the window
    /// has it.
    #[test]
    fn a_held_copy_of_a_local_publication_holds_its_publishers_puback() {
        let (mut a, _, _) = node(7);
        let (mut b, remote_b, s_b, _) = moved_to_b(&mut a);
        // The old node routes "t" for the session's ghost.
        let add = MeshMsg::RouteAdd {
            filter: Str::from_static("t"),
            shard: remote_b,
            ack: None,
        };
        b.handle_mesh(4, remote_b, add);
        remote_out(&mut b);
        let p = b.connect(4, connect_packet(V, "p", true), false);
        drain(&mut b, p, V);
        let mut publish = Publish::new(Str::from_static("t"), Bytes::from_static(b"y"));
        publish.qos = QoS::AtLeastOnce;
        publish.packet_id = 9;
        b.handle_packet(5, p, Packet::Publish(publish));
        let (message, token, id) = match &remote_out(&mut b)[..] {
            [
                MeshMsg::PublishRemote {
                    message,
                    ack: Some(t),
                    id,
                },
            ] => (message.clone(), *t, *id),
            other => panic!("one copy for the old node: {other:?}"),
        };
        assert!(payloads(&mut b, s_b).is_empty(), "held for the redirect");
        // The old node accepted its copy: still held, no PUBACK.
        b.handle_mesh(6, remote_b, MeshMsg::Ack { token });
        assert!(drain(&mut b, p, V).is_empty(), "PUBACK while only held");
        // Its ghost sends it back: delivered, and the publisher answered.
        let back = MeshMsg::Redirect {
            client_id: Str::from_static("s"),
            node: 0,
            epoch: 0,
            message,
            id,
            ack: None,
        };
        b.handle_mesh(7, remote_b, back);
        assert_eq!(payloads(&mut b, s_b), vec![Bytes::from_static(b"y")]);
        assert_eq!(
            drain(&mut b, p, V),
            vec![Packet::PubAck(tessera_proto::PubAck::new(9))]
        );
    }

    /// What a window holds travels with a session that moves on, in its queue.
    #[test]
    fn a_session_that_moves_on_takes_what_its_window_held() {
        let (mut a, _, _) = node(7);
        let (mut b, remote_b, s_b, _) = moved_to_b(&mut a);
        b.handle_mesh(4, remote_b, forwarded_at("held", QoS::AtLeastOnce, 1));
        assert!(payloads(&mut b, s_b).is_empty());
        let bytes = b.export_session(5, "s", 0, (3, 100)).expect("exported");
        let mut c = engines(1, &Limits::default()).remove(0);
        c.enable_remote().expect("room for the remote id");
        c.set_origin(9);
        c.import_session(6, "s", &bytes, 0).expect("imported");
        let s_c = c.connect(6, connect_packet(V, "s", false), false);
        assert_eq!(payloads(&mut c, s_c), vec![Bytes::from_static(b"held")]);
    }

    #[test]
    fn a_window_skips_what_the_old_owner_handled_and_what_it_delivered_once() {
        let id = |origin, seq| PubId {
            origin,
            shard: 0,
            seq,
        };
        let mut w = Window::new(SessionUid(1), vec![(7, 0, 10)], [0; CLASSES], []);
        // Handled on the old owner: a direct copy is skipped, a redirected one is not
        // (redirects come only for what arrived there after the session left).
        assert!(w.seen(id(7, 10), true));
        assert!(!w.seen(id(7, 11), true));
        // The same publication by the other path, in either order.
        assert!(w.seen(id(7, 11), false));
        assert!(!w.seen(id(8, 1), false));
        assert!(w.seen(id(8, 1), true));
    }

    /// The two shards of a cluster node with origin tag `origin`.
    fn two_shards(origin: u64) -> Vec<Engine> {
        let mut es = engines(2, &Limits::default());
        for e in &mut es {
            e.enable_remote().expect("room for the remote id");
            e.set_origin(origin);
        }
        es
    }

    /// Delivers mesh messages between the shards of one node until none is left;
    /// returns what they sent to the remote id, with the sender.
    fn pump_node(es: &mut [Engine], now_ms: u64) -> Vec<(ShardId, MeshMsg)> {
        let remote = es.len() as ShardId;
        let mut out = Vec::new();
        loop {
            let mut batches = Vec::new();
            for (from, e) in es.iter_mut().enumerate() {
                e.drain_outbox(|to, batch| batches.push((from as ShardId, to, batch)));
            }
            if batches.is_empty() {
                return out;
            }
            for (from, to, batch) in batches {
                for msg in batch {
                    match es.get_mut(usize::from(to)) {
                        Some(e) if to != remote => e.handle_mesh(now_ms, from, msg),
                        _ => out.push((from, msg)),
                    }
                }
            }
        }
    }

    /// A ClientID whose session lives on shard `shard` of two.
    fn client_on(shard: usize, prefix: &str) -> String {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|c| crate::hash::shard_for(c.as_bytes(), 2) == shard)
            .expect("some name hashes there")
    }

    /// A QoS 2 PUBLISH of `payload` on "t".
    fn publish_packet(payload: &'static str, packet_id: u16) -> Packet {
        let mut p = Publish::new(
            Str::from_static("t"),
            Bytes::from_static(payload.as_bytes()),
        );
        p.qos = QoS::ExactlyOnce;
        p.packet_id = packet_id;
        Packet::Publish(p)
    }

    /// The publication a shard handed to the forwarder (its copy for the other nodes)
    /// and the redirects among `out`.
    fn split_remote(out: Vec<(ShardId, MeshMsg)>) -> (Vec<(Message, PubId)>, Vec<MeshMsg>) {
        let mut published = Vec::new();
        let mut redirects = Vec::new();
        for (_, m) in out {
            match m {
                MeshMsg::PublishRemote {
                    message,
                    id: Some(id),
                    ..
                } => published.push((message, id)),
                r @ MeshMsg::Redirect { .. } => redirects.push(r),
                _ => {}
            }
        }
        (published, redirects)
    }

    /// The issue-15 bound "ids and marks are per shard": node A runs two shards, the
    /// session on a1, a publisher on a0. A QoS 2 publication from a0 reached the
    /// session over the local mesh, and its copy for node B (by the forwarder) reached
    /// B after the session moved there: B delivered it again, whichever of B's shards
    /// served A's batch. And after the move, a0's next publication reached B twice with
    /// two ids: directly (a0's id) and redirected by a1's ghost (an id a1 gave it).
    #[test]
    fn a_session_moved_off_a_node_of_several_shards_gets_a_publication_of_another_shard_once() {
        let sub = client_on(1, "s");
        let publisher = client_on(0, "p");
        for b_serves in [0usize, 1] {
            let mut a = two_shards(7);
            let remote: ShardId = 2;
            // Node B routes "t" (another subscriber there): A's shards forward to it.
            for e in &mut a {
                let add = MeshMsg::RouteAdd {
                    filter: Str::from_static("t"),
                    shard: remote,
                    ack: None,
                };
                e.handle_mesh(0, remote, add);
            }
            let s = a[1].connect(1, connect_packet(V, &sub, false), false);
            a[1].handle_packet(1, s, subscribe_packet("t", QoS::ExactlyOnce));
            pump_node(&mut a, 1);
            drain(&mut a[1], s, V);
            let p = a[0].connect(1, connect_packet(V, &publisher, true), false);
            drain(&mut a[0], p, V);

            // "x" from a0: to the session over the local mesh, and to node B.
            a[0].handle_packet(2, p, publish_packet("x", 1));
            let (sent, _) = split_remote(pump_node(&mut a, 2));
            assert_eq!(payloads(&mut a[1], s), vec![Bytes::from_static(b"x")]);
            let [(x, x_id)] = &sent[..] else {
                panic!("one copy of x for node B: {sent:?}");
            };

            // The session moves to node B (origin 8), onto b1.
            let bytes = a[1].export_session(3, &sub, 0, (2, 99)).expect("exported");
            let window = a[1].moving_window(&sub).expect("a window");
            let mut b = two_shards(8);
            b[1].import_session(3, &sub, &bytes, 0).expect("imported");
            assert!(b[1].import_window(3, &sub, &window));
            let s_b = b[1].connect(3, connect_packet(V, &sub, false), false);
            pump_node(&mut b, 3);
            drain(&mut b[1], s_b, V);

            // The copy of "x" for B arrives now, at the shard serving A's batches.
            let copy = |message: &Message, id: PubId| MeshMsg::Forwarded {
                message: message.clone(),
                mark: None,
                ack: None,
                id: Some(id),
                earlier_life: false,
                routes_index: 0,
            };
            b[b_serves].handle_mesh(4, remote, copy(x, *x_id));
            pump_node(&mut b, 4);
            assert!(
                payloads(&mut b[1], s_b).is_empty(),
                "x came again on node B (batch served by b{b_serves})"
            );

            // B confirms; "y" from a0 reaches a1's ghost (redirected) and node B.
            assert!(a[1].moving_done(5, &sub, (2, 99)));
            a[0].handle_packet(5, p, publish_packet("y", 2));
            let (sent, redirects) = split_remote(pump_node(&mut a, 5));
            let [(y, y_id)] = &sent[..] else {
                panic!("one copy of y for node B: {sent:?}");
            };
            let [
                MeshMsg::Redirect {
                    id: redirect_id, ..
                },
            ] = &redirects[..]
            else {
                panic!("one redirect of y: {redirects:?}");
            };
            assert_eq!(*redirect_id, Some(*y_id), "the redirect keeps y's id");
            b[b_serves].handle_mesh(6, remote, copy(y, *y_id));
            for r in redirects {
                b[b_serves].handle_mesh(6, remote, r);
            }
            pump_node(&mut b, 6);
            assert_eq!(
                payloads(&mut b[1], s_b),
                vec![Bytes::from_static(b"y")],
                "batch served by b{b_serves}"
            );
        }
    }

    /// Under `sync` durability a stored publisher's QoS 2 publication goes to other
    /// nodes only after its packet id's commit, while a clean publisher's on the same
    /// shard goes at once: they reach other nodes out of the order of their ids. With
    /// one id sequence for both, the old owner's mark for the later id covered the
    /// earlier one still on its way: the unconfirmed ghost took it for one the session
    /// had got and dropped it, and the new owner skipped its direct copy. Lost.
    #[test]
    fn a_qos2_publication_that_waited_for_its_publishers_commit_reaches_a_moving_session() {
        let mut c = engines(1, &Limits::default()).remove(0);
        let remote_c = c.enable_remote().expect("room for the remote id");
        c.set_origin(5);
        c.enable_persistence(true);
        let add = MeshMsg::RouteAdd {
            filter: Str::from_static("t"),
            shard: remote_c,
            ack: None,
        };
        c.handle_mesh(0, remote_c, add);
        let commit = |c: &mut Engine| {
            while let Some(b) = c.take_store_batch() {
                c.store_committed(b.epoch);
            }
        };
        let stored = c.connect(1, connect_packet(V, "stored", false), false);
        let clean = c.connect(1, connect_packet(V, "clean", true), false);
        commit(&mut c);
        drain(&mut c, stored, V);
        drain(&mut c, clean, V);
        let publish = |payload: &'static str| {
            let mut p = Publish::new(
                Str::from_static("t"),
                Bytes::from_static(payload.as_bytes()),
            );
            p.qos = QoS::ExactlyOnce;
            p.packet_id = 1;
            Packet::Publish(p)
        };
        c.handle_packet(2, stored, publish("after commit"));
        c.handle_packet(2, clean, publish("at once"));
        let mut sent = remote_out(&mut c);
        commit(&mut c);
        sent.extend(remote_out(&mut c));
        let copies: Vec<MeshMsg> = sent
            .into_iter()
            .filter_map(|m| match m {
                MeshMsg::PublishRemote { message, id, .. } => Some(MeshMsg::Forwarded {
                    message,
                    mark: None,
                    ack: None,
                    id,
                    earlier_life: false,
                    routes_index: 0,
                }),
                _ => None,
            })
            .collect();
        let [at_once, after_commit] = &copies[..] else {
            panic!("two publications for other nodes: {copies:?}");
        };

        // Node A's session gets the clean publisher's, then moves to B; the stored
        // publisher's reaches A's ghost, and B directly.
        let (mut a, remote_a, s) = node(7);
        a.handle_mesh(3, remote_a, at_once.clone());
        assert_eq!(payloads(&mut a, s), vec![Bytes::from_static(b"at once")]);
        let (mut b, remote_b, s_b, _) = moved_to_b(&mut a);
        a.handle_mesh(4, remote_a, after_commit.clone());
        assert!(a.moving_done(5, "s", (2, 99)));
        b.handle_mesh(5, remote_b, after_commit.clone());
        for r in remote_out(&mut a) {
            b.handle_mesh(6, remote_b, r);
        }
        assert_eq!(
            payloads(&mut b, s_b),
            vec![Bytes::from_static(b"after commit")]
        );
    }

    /// Sim seed 899's fix with several shards: a re-sent QoS 2 PUBLISH routed with its
    /// original's id (`handed_qos2`) goes from the publisher's shard to the others over
    /// the mesh; a shard that got the original (forwarded from the old node, through
    /// the shard serving its batches) skips it, and one that did not delivers it.
    #[test]
    fn a_local_copy_rerouted_in_place_of_an_original_this_shard_handled_is_skipped() {
        let sub = client_on(1, "s");
        let mut n = two_shards(8);
        let s = n[1].connect(1, connect_packet(V, &sub, false), false);
        n[1].handle_packet(1, s, subscribe_packet("t", QoS::ExactlyOnce));
        pump_node(&mut n, 1);
        drain(&mut n[1], s, V);
        // The original, from node 5's shard 0, through shard 0 (its batches' server).
        let remote: ShardId = 2;
        n[0].handle_mesh(2, remote, forwarded("original", id_seq(2, 7)));
        pump_node(&mut n, 2);
        assert_eq!(
            payloads(&mut n[1], s),
            vec![Bytes::from_static(b"original")]
        );
        let rerouted = |payload, n| MeshMsg::Publish {
            message: message(payload),
            id: Some(resent(PubId {
                origin: 5,
                shard: 0,
                seq: id_seq(2, n),
            })),
        };
        n[1].handle_mesh(3, 0, rerouted("original", 7));
        assert!(payloads(&mut n[1], s).is_empty(), "the original came twice");
        n[1].handle_mesh(3, 0, rerouted("lost with its node", 8));
        assert_eq!(
            payloads(&mut n[1], s),
            vec![Bytes::from_static(b"lost with its node")]
        );
    }

    /// Commits every shard's store batch and exchanges mesh messages until neither
    /// has anything left; returns what went to the remote id.
    fn settle(es: &mut [Engine], now_ms: u64) -> Vec<(ShardId, MeshMsg)> {
        let mut out = Vec::new();
        loop {
            let sent = pump_node(es, now_ms);
            let mut committed = false;
            for e in es.iter_mut() {
                while let Some(b) = e.take_store_batch() {
                    e.store_committed(b.epoch);
                    committed = true;
                }
            }
            let quiet = sent.is_empty() && !committed;
            out.extend(sent);
            if quiet {
                return out;
            }
        }
    }

    /// Sim seed 13 (`sync`): a session parked on shard a1 of node A for another node's
    /// claim held a QoS 1 publication of a0's publisher in its ghost, in memory only,
    /// while a1 answered a0's `PublishDurable` at once: the publisher got its PUBACK,
    /// node A crashed, and the publication was gone. Now the ghost holds a1's `Ack`
    /// until it lets go of the copy: sent on and accepted by the new node, or
    /// delivered to the session taken back here (and committed).
    #[test]
    fn a_ghost_holds_the_acknowledgement_of_another_shards_publisher_until_it_lets_go() {
        let sub = client_on(1, "s");
        let publisher = client_on(0, "p");
        let remote: ShardId = 2;
        let puback = Packet::PubAck(tessera_proto::PubAck::new(1));
        for taken_back in [false, true] {
            let mut a = two_shards(7);
            for e in &mut a {
                e.enable_persistence(true);
            }
            let s = a[1].connect(1, connect_packet(V, &sub, false), false);
            a[1].handle_packet(1, s, subscribe_packet("t", QoS::AtLeastOnce));
            settle(&mut a, 1);
            drain(&mut a[1], s, V);
            let p = a[0].connect(1, connect_packet(V, &publisher, false), false);
            settle(&mut a, 1);
            drain(&mut a[0], p, V);

            // Node 2's claim committed: the session is handed out, its ghost holds.
            assert!(a[1].export_session(2, &sub, 0, (2, 99)).is_some());
            let mut x = Publish::new(Str::from_static("t"), Bytes::from_static(b"x"));
            x.qos = QoS::AtLeastOnce;
            x.packet_id = 1;
            a[0].handle_packet(3, p, Packet::Publish(x));
            settle(&mut a, 3);
            assert!(
                drain(&mut a[0], p, V).is_empty(),
                "PUBACK while only a ghost's memory holds the publication"
            );

            if taken_back {
                // Node 2 never confirmed, and the client came back to node A.
                assert!(a[1].resume_moving(4, &sub, 0).expect("resumed"));
                let s = a[1].connect(4, connect_packet(V, &sub, false), false);
                settle(&mut a, 4);
                assert_eq!(payloads(&mut a[1], s), vec![Bytes::from_static(b"x")]);
                assert_eq!(drain(&mut a[0], p, V), vec![puback.clone()]);
                continue;
            }
            assert!(a[1].moving_done(4, &sub, (2, 99)));
            let token = settle(&mut a, 4)
                .into_iter()
                .find_map(|(_, m)| match m {
                    MeshMsg::Redirect { ack: Some(t), .. } => Some(t),
                    _ => None,
                })
                .expect("x sent on to node 2 with a token");
            assert!(
                drain(&mut a[0], p, V).is_empty(),
                "PUBACK before node 2 accepted it"
            );
            a[1].handle_mesh(5, remote, MeshMsg::Ack { token });
            settle(&mut a, 5);
            assert_eq!(drain(&mut a[0], p, V), vec![puback.clone()]);
        }
    }

    /// Sim seed 400: node 2's copy of c5's session was handed to node 3's claim, but
    /// node 3 never got it and started c5 afresh; the log confirmed node 2's copy, so
    /// its ghost sent what matched the old session on to node 3. The fresh session
    /// would have dropped those redirects (it has no window), but it had moved on to
    /// node 1 with a window of its own, and node 3's ghost passed them on: node 1
    /// delivered them to the new session, which had got them already (QoS 2 twice).
    /// A ghost of a session that started afresh on its node passes no redirect on;
    /// one of a session that had moved in does.
    #[test]
    fn a_ghost_passes_on_redirects_only_for_a_session_that_had_moved_in() {
        // Fresh here: the redirect stops at the ghost.
        let (mut a, remote_a, _) = node(7);
        assert!(a.export_session(2, "s", 0, (2, 99)).is_some());
        assert!(a.moving_done(3, "s", (2, 99)));
        remote_out(&mut a);
        a.handle_mesh(4, remote_a, redirect("for an earlier session", 3));
        assert!(
            !remote_out(&mut a)
                .iter()
                .any(|m| matches!(m, MeshMsg::Redirect { .. })),
            "a redirect for an earlier session sent on"
        );

        // Moved in here with a window, then on again: the redirect follows it.
        let (mut a, _, _) = node(7);
        let (mut b, remote_b, _, _) = moved_to_b(&mut a);
        assert!(b.export_session(4, "s", 0, (3, 100)).is_some());
        assert!(b.moving_done(5, "s", (3, 100)));
        remote_out(&mut b);
        b.handle_mesh(6, remote_b, redirect("for this session", 3));
        assert!(
            remote_out(&mut b)
                .iter()
                .any(|m| matches!(m, MeshMsg::Redirect { node: 3, .. })),
            "a redirect for the session that moved on was not sent on"
        );
    }

    /// Sim seed 232 (`sync`, with hints): the same redirect for an earlier session,
    /// reaching the ghost before its confirmation. An unconfirmed ghost holds it (its
    /// session may come back, sync seed 194), and at the confirmation sent it on:
    /// node 1's ghost of c0's earlier session redirected node 2's hinted batch to
    /// node 2, where the fresh c0 had got those QoS 2 publications and was moving on
    /// to node 3, whose window does not list them (node 3 delivered them again). A
    /// ghost of a session that started afresh on its node lets such a held redirect
    /// go at the confirmation; one of a session that had moved in, or was restored
    /// at this start, sends it on.
    #[test]
    fn a_held_redirect_goes_no_further_only_for_a_session_started_here() {
        // Fresh here: held, then dropped at the confirmation.
        let (mut a, remote_a, _) = node(7);
        assert!(a.export_session(2, "s", 0, (2, 99)).is_some());
        a.handle_mesh(3, remote_a, redirect("for an earlier session", 3));
        assert!(a.moving_done(4, "s", (2, 99)));
        assert!(
            !remote_out(&mut a)
                .iter()
                .any(|m| matches!(m, MeshMsg::Redirect { .. })),
            "a held redirect for an earlier session sent on"
        );

        // Moved in here with a window, then on again: the held redirect follows it.
        let (mut a, _, _) = node(7);
        let (mut b, remote_b, _, _) = moved_to_b(&mut a);
        assert!(b.export_session(4, "s", 0, (3, 100)).is_some());
        b.handle_mesh(5, remote_b, redirect("for this session", 3));
        assert!(b.moving_done(6, "s", (3, 100)));
        assert!(
            remote_out(&mut b)
                .iter()
                .any(|m| matches!(m, MeshMsg::Redirect { node: 3, .. })),
            "a held redirect for the session that moved on was not sent on"
        );

        // Restored at this start without a window (it may have lost it with the
        // crash: sync seed 194, harness sync seed 72, where the first version of this
        // rule dropped such a redirect, acknowledged QoS 2 lost): it follows it too.
        let dir = temp_dir("held-redirect-restored");
        let (mut a, _, env, lock) = boot(&dir, 7);
        let s = a.connect(1, connect_packet(V, "s", false), false);
        a.handle_packet(1, s, subscribe_packet("t", QoS::ExactlyOnce));
        drain(&mut a, s, V);
        commit(&mut a, &env);
        crash(a, env, lock);
        let (mut a, remote_a, env, _lock) = boot(&dir, 8);
        assert!(a.export_session(2, "s", 0, (2, 99)).is_some());
        a.handle_mesh(3, remote_a, redirect("for this session", 3));
        assert!(a.moving_done(4, "s", (2, 99)));
        // A stored redirect leaves with its record's commit.
        commit(&mut a, &env);
        assert!(
            remote_out(&mut a)
                .iter()
                .any(|m| matches!(m, MeshMsg::Redirect { node: 2, .. })),
            "a held redirect for a restored session that moved on was not sent on"
        );
    }

    #[test]
    fn windows_travel_and_malformed_ones_are_refused() {
        let mut out = Vec::new();
        let ids = [PubId {
            origin: 3,
            shard: 1,
            seq: 9,
        }];
        encode_marks(&mut out, &[(5, 2, 40)], ids.iter());
        let (marks, got) = decode_marks(&out).expect("decodes");
        assert_eq!(marks, vec![(5, 2, 40)]);
        assert_eq!(got, ids.to_vec());
        assert!(decode_marks(&out[..out.len() - 1]).is_none());
        assert!(decode_marks(&[0, 0, 0, 9]).is_none());
        let mut long = out.clone();
        long.push(0);
        assert!(decode_marks(&long).is_none());
    }

    /// Cause A's trap (session 15): re-sent copies of one dead origin ([`RESENT`])
    /// come in any order (their clients re-send on the restarted node or on the
    /// nodes their sessions moved to, each when it reconnects), so none may raise
    /// the mark: one that did would make a lower id re-sent later look handled
    /// (acknowledged and lost, as in sim seed 1431). Each is delivered once, a copy
    /// whose original arrived is skipped, and so are a second re-sent copy and an
    /// original that arrives after its re-sent copy.
    #[test]
    fn re_sent_copies_of_one_dead_origin_in_reverse_order_are_each_delivered_once() {
        let (mut e, remote, s) = node(7);
        let id = |n| PubId {
            origin: 5,
            shard: 0,
            seq: id_seq(AFTER_COMMIT, n),
        };
        let copy = |payload, id| MeshMsg::Forwarded {
            message: message(payload),
            mark: None,
            ack: None,
            id: Some(id),
            earlier_life: false,
            routes_index: 0,
        };
        // Original 3 arrived before its node died; 4 and 5 did not.
        e.handle_mesh(1, remote, copy("o3", id(3)));
        assert_eq!(payloads(&mut e, s), [Bytes::from_static(b"o3")]);
        e.handle_mesh(2, remote, copy("r5", resent(id(5))));
        e.handle_mesh(2, remote, copy("r4", resent(id(4))));
        e.handle_mesh(2, remote, copy("r3", resent(id(3))));
        assert_eq!(
            payloads(&mut e, s),
            [Bytes::from_static(b"r5"), Bytes::from_static(b"r4")]
        );
        // Again (another node re-sent them too), and original 4 late off the network.
        e.handle_mesh(3, remote, copy("r4", resent(id(4))));
        e.handle_mesh(3, remote, copy("r5", resent(id(5))));
        e.handle_mesh(3, remote, copy("o4", id(4)));
        assert!(payloads(&mut e, s).is_empty());
        // The mark stayed at the originals': a later original is delivered.
        e.handle_mesh(4, remote, copy("o6", id(6)));
        assert_eq!(payloads(&mut e, s), [Bytes::from_static(b"o6")]);
    }

    /// The same over the local mesh: a re-sent copy the node routing it passes to
    /// its other shards (`Publish`) is skipped where the original arrived, and two
    /// of one dead origin in reverse order are each delivered once.
    #[test]
    fn re_sent_copies_over_the_local_mesh_are_each_delivered_once() {
        let (mut e, remote, s) = node(7);
        let id = |n| PubId {
            origin: 5,
            shard: 0,
            seq: id_seq(2, n),
        };
        e.handle_mesh(1, remote, forwarded("o1", id(1).seq));
        assert_eq!(payloads(&mut e, s), [Bytes::from_static(b"o1")]);
        let local = |payload, id| MeshMsg::Publish {
            message: message(payload),
            id: Some(id),
        };
        // As from another shard of this node (the handler does not ask which).
        for (payload, n) in [("r3", 3), ("r2", 2), ("r1", 1), ("r2", 2)] {
            e.handle_mesh(2, 0, local(payload, resent(id(n))));
        }
        assert_eq!(
            payloads(&mut e, s),
            [Bytes::from_static(b"r3"), Bytes::from_static(b"r2")]
        );
    }

    use super::super::testing::Dir;

    fn temp_dir(name: &str) -> Dir {
        super::super::testing::temp_dir_in("moved", name)
    }

    use super::super::testing::{StoredNode, boot, commit, crash, routed_elsewhere};

    /// A store-backed node (origin 7) whose stored subscriber "s" (`t`, QoS 2) is
    /// parked for node 2's claim: an unconfirmed ghost, its records still in the
    /// store.
    fn parked_subscriber(dir: &Dir) -> StoredNode {
        let (mut a, remote, env, lock) = boot(dir, 7);
        let s = a.connect(1, connect_packet(V, "s", false), false);
        a.handle_packet(1, s, subscribe_packet("t", QoS::ExactlyOnce));
        drain(&mut a, s, V);
        commit(&mut a, &env);
        a.export_session(2, "s", 0, (2, 99)).expect("exported");
        commit(&mut a, &env);
        (a, remote, env, lock)
    }

    /// The publication `e` forwarded to the other nodes, as the receiving node's
    /// forwarder hands it to a shard there.
    fn sent_on_as_forwarded(e: &mut Engine) -> Option<MeshMsg> {
        remote_out(e).into_iter().find_map(|m| match m {
            MeshMsg::PublishRemote {
                message,
                id: Some(id),
                ..
            } => Some(MeshMsg::Forwarded {
                message,
                mark: None,
                ack: None,
                id: Some(id),
                earlier_life: false,
                routes_index: 0,
            }),
            _ => None,
        })
    }

    fn texts(got: Vec<Bytes>) -> Vec<String> {
        got.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    /// Issue 15, cause C (sim seed 264): a shard's `PubId` marks and its own counts
    /// lived in memory, and its counts are under an origin that is new at every
    /// start. A session restored after a crash moved on with a window that covered
    /// nothing it got before the crash, and the new owner delivered the direct
    /// copies of those publications again: one from another node, one published on
    /// the session's own shard (its id of the shard's earlier life).
    #[test]
    fn a_restored_sessions_export_covers_what_its_shard_handled_before_the_crash() {
        let dir = temp_dir("marks");
        let (mut a, remote, env, lock) = boot(&dir, 7);
        // Node B routes "t": A's own publications go there too.
        routed_elsewhere(&mut a, "t");
        let s = a.connect(1, connect_packet(V, "s", false), false);
        a.handle_packet(1, s, subscribe_packet("t", QoS::ExactlyOnce));
        let p = a.connect(1, connect_packet(V, "p", true), false);
        commit(&mut a, &env);
        drain(&mut a, s, V);
        drain(&mut a, p, V);
        a.handle_mesh(2, remote, forwarded("from node 5", 3));
        a.handle_packet(2, p, publish_packet("published on A", 1));
        commit(&mut a, &env);
        assert_eq!(
            texts(payloads(&mut a, s)),
            ["from node 5", "published on A"]
        );
        let own = sent_on_as_forwarded(&mut a).expect("A's publication went to node B");
        crash(a, env, lock);

        // A restarts (a new origin) with "s" from its store; "s" moves to B, and
        // the direct copies of both reach B after it.
        let (mut a, _, _env, _lock) = boot(&dir, 17);
        let (mut b, remote_b, s_b, _) = moved_to_b(&mut a);
        b.handle_mesh(4, remote_b, forwarded("from node 5", 3));
        b.handle_mesh(4, remote_b, own);
        assert!(
            payloads(&mut b, s_b).is_empty(),
            "delivered again what the session got before its node crashed"
        );
        b.handle_mesh(4, remote_b, forwarded("later", 4));
        // (Held for the old node's redirect of it, sim seed 1508: none comes here.)
        b.expire_moved(4 + HOLD_MAX_MS);
        assert_eq!(texts(payloads(&mut b, s_b)), ["later"]);
    }

    /// Issue 15, cause C (sim seeds 4 and 95): a session that moved here knows,
    /// for its window, what it got on its old node (the old owner's marks) and here
    /// (ids, a redirected copy's among them: a redirect raises no mark). The window
    /// lived in memory: after a crash the restored session took the direct copies
    /// of those again, and its export on to another node covered none of them.
    #[test]
    fn a_restored_sessions_window_covers_what_it_got_before_the_crash() {
        let dir = temp_dir("window");
        let (mut a, remote_a, s) = node(7);
        a.handle_mesh(1, remote_a, forwarded("on A", 3));
        assert_eq!(texts(payloads(&mut a, s)), ["on A"]);
        let bytes = a.export_session(2, "s", 0, (2, 99)).expect("exported");
        let window = a.moving_window("s").expect("a window");
        let (mut b, remote_b, env, lock) = boot(&dir, 8);
        b.import_session(3, "s", &bytes, 0).expect("imported");
        assert!(b.import_window(3, "s", &window));
        let s_b = b.connect(3, connect_packet(V, "s", false), false);
        commit(&mut b, &env);
        drain(&mut b, s_b, V);
        b.handle_mesh(4, remote_b, redirect("redirected 4", 4));
        b.handle_mesh(4, remote_b, redirect("redirected 5", 5));
        commit(&mut b, &env);
        assert_eq!(
            texts(payloads(&mut b, s_b)),
            ["redirected 4", "redirected 5"]
        );
        crash(b, env, lock);

        // B restarts: the direct copies reach it; none is the session's again.
        let (mut b, remote_b, env, _lock) = boot(&dir, 18);
        let s_b = b.connect(5, connect_packet(V, "s", false), false);
        commit(&mut b, &env);
        drain(&mut b, s_b, V);
        b.handle_mesh(5, remote_b, forwarded("on A", 3));
        b.handle_mesh(5, remote_b, forwarded("redirected 4", 4));
        commit(&mut b, &env);
        assert!(
            payloads(&mut b, s_b).is_empty(),
            "delivered again after the restart"
        );
        // The session moves on to C, which gets the direct copy of 5 late.
        let bytes = b.export_session(6, "s", 0, (3, 100)).expect("exported");
        let window = b.moving_window("s").expect("a window");
        let mut c = engines(1, &Limits::default()).remove(0);
        let remote_c = c.enable_remote().expect("room for the remote id");
        c.set_origin(9);
        c.import_session(7, "s", &bytes, 0).expect("imported");
        assert!(c.import_window(7, "s", &window));
        let s_c = c.connect(7, connect_packet(V, "s", false), false);
        drain(&mut c, s_c, V);
        c.handle_mesh(8, remote_c, forwarded("redirected 5", 5));
        assert!(
            payloads(&mut c, s_c).is_empty(),
            "the export of the restored window did not cover it"
        );
        c.handle_mesh(8, remote_c, forwarded("later", 6));
        // (Held for the old node's redirect of it, sim seed 1508: none comes here.)
        c.expire_moved(8 + HOLD_MAX_MS);
        assert_eq!(texts(payloads(&mut c, s_c)), ["later"]);
    }

    /// Sim seed 154 (`sync`): an unconfirmed ghost held a QoS 2 copy from another
    /// node (the batch's answer waiting for it) when its node crashed. The shard's
    /// mark for that origin, stored with the next commit after the hold, covered
    /// the copy, so the restarted node skipped the publisher's re-send, routed with
    /// the original's id after the sending node died too: acknowledged, never
    /// delivered. The held copy is stored with the session's records (sim seed 748,
    /// which replaced the first fix, a stored mark capped below what a ghost
    /// holds): the session comes back with it, and the re-send is skipped.
    #[test]
    fn a_copy_an_unconfirmed_ghost_held_at_a_crash_comes_back_with_its_session_once() {
        let dir = temp_dir("held");
        let (mut a, remote, env, lock) = parked_subscriber(&dir);
        let token = a.begin_forward_batch().expect("a ghost opens a token");
        a.handle_mesh(3, remote, forwarded_at("held", QoS::ExactlyOnce, 1));
        a.end_forward_batch(token);
        // Another session's record: a commit with ops, which the marks ride.
        let q = a.connect(3, connect_packet(V, "q", false), false);
        drain(&mut a, q, V);
        commit(&mut a, &env);
        assert!(
            a.take_forwards_done().is_empty(),
            "the batch waits for the held copy"
        );
        crash(a, env, lock);

        // Restarted with the session (node 2 never confirmed): the re-send comes.
        let (mut a, remote, env, _lock) = boot(&dir, 8);
        let s = a.connect(4, connect_packet(V, "s", false), false);
        commit(&mut a, &env);
        assert_eq!(
            texts(payloads(&mut a, s)),
            ["held"],
            "the held copy was in memory only"
        );
        let mut again = forwarded_at("held", QoS::ExactlyOnce, 1);
        if let MeshMsg::Forwarded { id: Some(id), .. } = &mut again {
            *id = resent(*id);
        }
        a.handle_mesh(5, remote, again.clone());
        commit(&mut a, &env);
        a.handle_mesh(5, remote, again);
        assert!(payloads(&mut a, s).is_empty(), "once");
    }

    /// Sim seed 748 (`sync`): while an unconfirmed ghost held a QoS 2 copy from
    /// another node (the batch's answer waiting), the publisher's re-send came,
    /// routed with the original's id (its node had died and its session moved):
    /// the shard's mark covered it, so it was skipped as handled and acknowledged.
    /// Then this node crashed, and the held copy, in memory only, was gone with it:
    /// the session came back without it. The held copy is stored with the
    /// session's records, so "handled" is true of it.
    #[test]
    fn a_resend_skipped_while_an_unconfirmed_ghost_holds_its_original_is_not_lost_at_a_crash() {
        let dir = temp_dir("resent-held");
        let (mut a, remote, env, lock) = parked_subscriber(&dir);
        let token = a.begin_forward_batch().expect("a ghost opens a token");
        a.handle_mesh(3, remote, forwarded_at("held", QoS::ExactlyOnce, 1));
        a.end_forward_batch(token);
        commit(&mut a, &env);
        // The re-send, in a batch of its own: skipped (the mark covers it) and
        // answered once committed, while the ghost still holds the original.
        let mut again = forwarded_at("held", QoS::ExactlyOnce, 1);
        if let MeshMsg::Forwarded { id: Some(id), .. } = &mut again {
            *id = resent(*id);
        }
        let resend = a.begin_forward_batch().expect("a ghost opens a token");
        a.handle_mesh(4, remote, again);
        a.end_forward_batch(resend);
        commit(&mut a, &env);
        assert_eq!(
            a.take_forwards_done(),
            [resend],
            "the re-send is answered, the original's batch waits"
        );
        crash(a, env, lock);

        let (mut a, _remote, env, _lock) = boot(&dir, 8);
        let s = a.connect(5, connect_packet(V, "s", false), false);
        commit(&mut a, &env);
        assert_eq!(
            texts(payloads(&mut a, s)),
            ["held"],
            "acknowledged while only the ghost's memory had it"
        );
    }

    /// The sending node retries its unanswered forwarded batch of `copy` (after this
    /// node restarted): its token, if it waits for anything.
    fn retried_batch(a: &mut Engine, remote: ShardId, copy: MeshMsg) -> Option<u64> {
        let token = a.begin_forward_batch();
        a.handle_mesh(5, remote, copy);
        if let Some(t) = token {
            a.end_forward_batch(t);
        }
        token
    }

    /// One of h154's "not covered" cases (sim seed 154's analysis): the batch's
    /// forward mark, stored with the commit that handled it, made the sending
    /// node's retry of it (the batch was never answered: the ghost held a copy)
    /// skip the copy after this node's restart, while the copy had been in the
    /// ghost's memory only. Stored with the session's records, it is not lost.
    #[test]
    fn a_batch_retried_after_a_crash_finds_the_copy_an_unconfirmed_ghost_held_stored() {
        let dir = temp_dir("retried");
        let (mut a, remote, env, lock) = parked_subscriber(&dir);
        let mut copy = forwarded_at("held", QoS::ExactlyOnce, 1);
        if let MeshMsg::Forwarded { mark, .. } = &mut copy {
            *mark = Some(crate::mesh::ForwardMark {
                node: 5,
                incarnation: 1,
                seq: 1,
                index: 0,
            });
        }
        let token = a.begin_forward_batch().expect("a ghost opens a token");
        a.handle_mesh(3, remote, copy.clone());
        a.end_forward_batch(token);
        // Another session's record: a commit with ops, which the marks ride.
        let q = a.connect(3, connect_packet(V, "q", false), false);
        drain(&mut a, q, V);
        commit(&mut a, &env);
        assert!(a.take_forwards_done().is_empty(), "the batch waits");
        crash(a, env, lock);

        let (mut a, remote, env, _lock) = boot(&dir, 8);
        let s = a.connect(4, connect_packet(V, "s", false), false);
        commit(&mut a, &env);
        // The sending node retries the unanswered batch.
        retried_batch(&mut a, remote, copy);
        commit(&mut a, &env);
        assert_eq!(
            texts(payloads(&mut a, s)),
            ["held"],
            "the forward mark covered a copy only the ghost's memory had"
        );
    }

    /// Sim seed 194 with the held copies stored (before their ids were): the node
    /// crashed while an unconfirmed ghost held a copy, restarted with the session
    /// (the copy in its queue) but without a window saying it had it, parked it
    /// again for the claim, and an older ghost's redirect of the same publication
    /// was held and stored again: the session, taken back, got QoS 2 twice. The
    /// ghost stores its window (the held copies' ids) as the session's.
    #[test]
    fn a_session_restored_with_a_held_copy_knows_it_has_it_when_parked_again() {
        let dir = temp_dir("parked-again");
        let (mut a, remote, env, lock) = parked_subscriber(&dir);
        let token = a.begin_forward_batch().expect("a ghost opens a token");
        a.handle_mesh(3, remote, forwarded_at("held", QoS::ExactlyOnce, 1));
        a.end_forward_batch(token);
        commit(&mut a, &env);
        crash(a, env, lock);

        let (mut a, remote, env, _lock) = boot(&dir, 8);
        // Parked again for a claim, before its client came back.
        a.export_session(4, "s", 0, (2, 100)).expect("exported");
        commit(&mut a, &env);
        // An older ghost on another node redirects the same publication here.
        a.handle_mesh(
            5,
            remote,
            redirect("held", id_seq(QoS::ExactlyOnce as u64, 1)),
        );
        commit(&mut a, &env);
        // The claim never completes: taken back.
        assert!(a.resume_moving(6, "s", 0).expect("taken back"));
        let s = a.connect(6, connect_packet(V, "s", false), false);
        commit(&mut a, &env);
        assert_eq!(texts(payloads(&mut a, s)), ["held"]);
    }

    /// What an unconfirmed ghost stored of what it held leaves the store when the
    /// session is taken back here (and gets it as its own delivery): a crash after
    /// that does not bring it back twice, nor a QoS 0 copy, which is not stored.
    #[test]
    fn a_session_taken_back_from_its_ghost_gets_the_stored_held_copies_once_across_a_crash() {
        let dir = temp_dir("taken-back");
        let (mut a, remote, env, lock) = parked_subscriber(&dir);
        let token = a.begin_forward_batch().expect("a ghost opens a token");
        a.handle_mesh(3, remote, forwarded_at("one", QoS::ExactlyOnce, 1));
        a.handle_mesh(3, remote, forwarded_at("zero", QoS::AtMostOnce, 1));
        a.handle_mesh(3, remote, forwarded_at("two", QoS::ExactlyOnce, 2));
        a.end_forward_batch(token);
        commit(&mut a, &env);
        // Node 2 never confirmed; this node owns the ClientID again.
        assert!(a.resume_moving(4, "s", 0).expect("taken back"));
        commit(&mut a, &env);
        assert_eq!(a.take_forwards_done(), [token]);
        crash(a, env, lock);

        let (mut a, _remote, env, _lock) = boot(&dir, 8);
        let s = a.connect(5, connect_packet(V, "s", false), false);
        commit(&mut a, &env);
        assert_eq!(texts(payloads(&mut a, s)), ["one", "two"]);
    }

    /// Sim seeds 660 and 70 (`sync`): the new owner holds a moved-in session's direct
    /// copies for the old owner's redirects under `sync` durability too (660: a QoS 2
    /// publication delivered after later ones of its publisher), and a held copy
    /// survives a crash. The first hold kept it in memory only while the batch's
    /// forward mark, the `PubId` mark and the window's ids that say it was handled
    /// were stored (70: the node crashed, the restored mark skipped the retried
    /// batch, which was answered: acknowledged, never delivered).
    #[test]
    fn a_copy_held_for_the_old_owners_redirects_is_held_with_a_store_and_survives_a_crash() {
        let qos2 = QoS::ExactlyOnce;
        let dir = temp_dir("held-direct");
        let (mut a, _, _) = node(7);
        let bytes = a.export_session(2, "s", 0, (2, 99)).expect("exported");
        let window = a.moving_window("s").expect("a window");
        let (mut b, remote_b, env, lock) = boot(&dir, 8);
        b.import_session(3, "s", &bytes, 0).expect("imported");
        assert!(b.import_window(3, "s", &window));
        let s = b.connect(3, connect_packet(V, "s", false), false);
        drain(&mut b, s, V);
        commit(&mut b, &env);
        // Node 3's batch brings 5 directly while 4 is still on its way to the old node.
        let batch = |payload| {
            let mut m = forwarded_at(payload, qos2, 5);
            if let MeshMsg::Forwarded { mark, .. } = &mut m {
                *mark = Some(crate::mesh::ForwardMark {
                    node: 3,
                    incarnation: 1,
                    seq: 1,
                    index: 0,
                });
            }
            m
        };
        let token = b.begin_forward_batch().expect("a token");
        b.handle_mesh(4, remote_b, batch("5"));
        b.end_forward_batch(token);
        // Another session's record: a commit with ops, which the marks ride.
        let q = b.connect(4, connect_packet(V, "q", false), false);
        drain(&mut b, q, V);
        commit(&mut b, &env);
        assert!(
            payloads(&mut b, s).is_empty(),
            "delivered before the old owner's older ones"
        );
        assert!(b.take_forwards_done().is_empty(), "the batch waits for it");
        crash(b, env, lock);

        // Restarted: the batch comes again and is skipped as handled (its marks
        // were stored), and the held copy is in the session's queue.
        let (mut b, remote_b, env, lock) = boot(&dir, 9);
        let s = b.connect(5, connect_packet(V, "s", false), false);
        let token = b.begin_forward_batch();
        b.handle_mesh(5, remote_b, batch("5"));
        if let Some(t) = token {
            b.end_forward_batch(t);
        }
        commit(&mut b, &env);
        assert_eq!(
            texts(payloads(&mut b, s)),
            ["5"],
            "held in memory only, while its marks were stored"
        );
        // Its record went with the restart's first commit: not restored twice.
        crash(b, env, lock);
        let (_, _, mut recovered) =
            crate::store::recover(&dir.0, 1, 16 << 20, super::super::testing::WALL_BASE_MS)
                .expect("recovers");
        assert!(recovered.remove(0).held.is_empty());
    }

    /// `m` as a record of node 5's batch `seq` (its forward mark).
    fn with_mark(mut m: MeshMsg, seq: u64) -> MeshMsg {
        if let MeshMsg::Forwarded { mark, .. } = &mut m {
            *mark = Some(crate::mesh::ForwardMark {
                node: 5,
                incarnation: 1,
                seq,
                index: 0,
            });
        }
        m
    }

    /// The redirects `e` handed its forwarder: (payload, (node, epoch), id, token).
    type SentOn = (String, (u64, u64), Option<PubId>, Option<u64>);
    fn redirects_out(e: &mut Engine) -> Vec<SentOn> {
        remote_out(e)
            .into_iter()
            .filter_map(|m| match m {
                MeshMsg::Redirect {
                    node,
                    epoch,
                    message,
                    id,
                    ack,
                    ..
                } => Some((
                    String::from_utf8_lossy(&message.payload).into_owned(),
                    (node, epoch),
                    id,
                    ack,
                )),
                _ => None,
            })
            .collect()
    }

    /// Issue 15, the last of h154's "not covered" places: a confirmed ghost sent a
    /// QoS 2 copy of another node's batch on to the session's new node (the batch's
    /// answer waiting for that node's acceptance), and this node crashed while the
    /// redirect was still in its forwarder's memory. The confirmation had deleted the
    /// session's records, while the batch's forward mark (and the `PubId` mark),
    /// stored with the next commit, covered the copy: the sending node's retry after
    /// the restart was skipped as handled and answered, and the publisher got its
    /// PUBCOMP for a copy nobody had. The redirect is stored until the new node
    /// accepted it, sent again after a restart with its id (the new owner's window
    /// skips it if it had it), and not after its acceptance.
    #[test]
    fn a_confirmed_ghosts_redirect_in_the_forwarder_at_a_crash_is_sent_again_after_the_restart() {
        let dir = temp_dir("redirect-crash");
        let (mut a, remote, env, lock) = parked_subscriber(&dir);
        assert!(a.moving_done(3, "s", (2, 99)));
        commit(&mut a, &env);
        let copy = with_mark(forwarded_at("sent on", QoS::ExactlyOnce, 1), 1);
        let token = a.begin_forward_batch().expect("a ghost opens a token");
        a.handle_mesh(4, remote, copy.clone());
        a.end_forward_batch(token);
        // Another session's record: a commit with ops, which the marks ride.
        let q = a.connect(4, connect_packet(V, "q", false), false);
        drain(&mut a, q, V);
        commit(&mut a, &env);
        assert!(
            a.take_forwards_done().is_empty(),
            "the batch waits for node 2"
        );
        let sent = redirects_out(&mut a);
        assert_eq!(sent.len(), 1);
        let (_, _, id, _) = sent[0].clone();
        assert!(id.is_some());
        // The forwarder has it in memory; node 2 has not accepted it yet.
        crash(a, env, lock);

        let (mut a, remote, env, lock) = boot(&dir, 8);
        // The sending node retries the unanswered batch.
        let token = retried_batch(&mut a, remote, copy);
        commit(&mut a, &env);
        // Skipped as handled (its forward mark is stored) and answered at once: the
        // publisher gets its PUBCOMP, so the copy must be on its way.
        assert_eq!(a.take_forwards_done(), Vec::from_iter(token));
        let again = redirects_out(&mut a);
        assert_eq!(
            again
                .iter()
                .map(|r| (&r.0[..], r.1, r.2))
                .collect::<Vec<_>>(),
            [("sent on", (2, 99), id)],
            "the stored marks covered a copy only the forwarder's memory had"
        );
        // Node 2 accepts it: it leaves the store, and a crash does not send it again.
        let accepted = again[0].3.expect("the redirect waits for node 2");
        a.handle_mesh(6, remote, MeshMsg::Ack { token: accepted });
        commit(&mut a, &env);
        crash(a, env, lock);
        let (mut a, _, _env, _lock) = boot(&dir, 9);
        assert!(redirects_out(&mut a).is_empty(), "sent again once accepted");
    }

    /// Fault harness, kill -9 scenario (CHAOS_SEED=131463: QoS 2 delivered twice to
    /// two subscribers). A confirmed ghost sent a local publisher's QoS 2 publication
    /// on to the session's new node at once, before the commit that holds the
    /// publisher's inbound packet id and the publication's id; the node was killed
    /// in between. The new node had delivered it, the publisher had no PUBREC and
    /// sent it again after the restart, and with no inbound record it was a new
    /// publication: delivered again. The redirect leaves with that commit, as a
    /// forwarded copy does.
    #[test]
    fn a_local_qos2_publication_a_ghost_sends_on_leaves_only_after_its_publishers_commit() {
        let dir = temp_dir("local-qos2-sent-on");
        let (mut a, _, env, _lock) = parked_subscriber(&dir);
        assert!(a.moving_done(3, "s", (2, 99)));
        commit(&mut a, &env);
        let p = a.connect(3, connect_packet(V, "p", false), false);
        commit(&mut a, &env);
        drain(&mut a, p, V);
        a.handle_packet(4, p, publish_packet("x", 5));
        assert!(
            redirects_out(&mut a).is_empty(),
            "sent on before the commit of its publisher's packet id"
        );
        commit(&mut a, &env);
        let sent = redirects_out(&mut a);
        assert_eq!(
            sent.iter().map(|r| (&r.0[..], r.1)).collect::<Vec<_>>(),
            [("x", (2, 99))]
        );
        assert!(
            drain(&mut a, p, V).is_empty(),
            "PUBREC before node 2 took it"
        );
    }

    /// The same crash for what an unconfirmed ghost held: stored as deliveries of the
    /// session's records until the confirmation, whose delete took them while they
    /// went on to the new node from memory.
    #[test]
    fn what_a_ghost_held_sent_on_at_the_confirmation_survives_a_crash_before_its_acceptance() {
        let dir = temp_dir("held-sent-on");
        let (mut a, remote, env, lock) = parked_subscriber(&dir);
        let copy = with_mark(forwarded_at("held", QoS::ExactlyOnce, 1), 1);
        let token = a.begin_forward_batch().expect("a ghost opens a token");
        a.handle_mesh(3, remote, copy.clone());
        a.end_forward_batch(token);
        commit(&mut a, &env);
        assert!(a.moving_done(4, "s", (2, 99)));
        commit(&mut a, &env);
        assert_eq!(
            redirects_out(&mut a).len(),
            1,
            "sent on at the confirmation"
        );
        assert!(
            a.take_forwards_done().is_empty(),
            "the batch waits for node 2"
        );
        crash(a, env, lock);

        let (mut a, remote, env, _lock) = boot(&dir, 8);
        retried_batch(&mut a, remote, copy);
        commit(&mut a, &env);
        assert_eq!(
            redirects_out(&mut a)
                .iter()
                .map(|r| (&r.0[..], r.1))
                .collect::<Vec<_>>(),
            [("held", (2, 99))],
            "the confirmation's delete took the held copy while it was in memory only"
        );
    }

    /// A window's ids go to the store in parts, one per commit that recorded some,
    /// and are rewritten from part 0 once the parts hold twice what a window keeps;
    /// the window leaves the store when it ends.
    #[test]
    fn a_stored_window_grows_by_parts_and_leaves_the_store_when_it_ends() {
        let dir = temp_dir("parts");
        let (mut a, remote_a, s) = node(7);
        a.handle_mesh(1, remote_a, forwarded("on A", 3));
        drain(&mut a, s, V);
        let bytes = a.export_session(2, "s", 0, (2, 99)).expect("exported");
        let window = a.moving_window("s").expect("a window");
        let (mut b, remote_b, env, lock) = boot(&dir, 8);
        b.import_session(3, "s", &bytes, 0).expect("imported");
        assert!(b.import_window(3, "s", &window));
        let parts = |b: &mut Engine| -> Vec<(u32, usize)> {
            let mut got = Vec::new();
            while let Some(batch) = b.take_store_batch() {
                for op in &batch.ops {
                    match op {
                        StoreOp::PutWindow { part, bytes, .. } => {
                            let (_, ids) = decode_marks(bytes).expect("a valid part");
                            got.push((*part, ids.len()));
                        }
                        StoreOp::DelWindow { .. } => got.push((u32::MAX, 0)),
                        _ => {}
                    }
                }
                b.store_committed(batch.epoch);
            }
            got
        };
        assert_eq!(parts(&mut b), [(0, 0)]);
        b.handle_mesh(4, remote_b, redirect("r", 4));
        b.handle_mesh(4, remote_b, redirect("r", 5));
        // With the epoch of their deliveries.
        assert_eq!(parts(&mut b), [(1, 2)]);
        // Past twice the bound: rewritten from part 0.
        if let Some(w) = b.moved.windows.get_mut(&Str::from_static("s")) {
            w.stored.ids = 2 * WINDOW_IDS_MAX;
        }
        b.handle_mesh(5, remote_b, redirect("r", 6));
        assert_eq!(parts(&mut b), [(u32::MAX, 0), (0, 3)]);
        // The window ends: its parts go.
        b.expire_moved(3 + MOVED_WINDOW_MS);
        assert_eq!(parts(&mut b), [(u32::MAX, 0)]);
        crash(b, env, lock);
    }

    /// A one-shard cluster engine with origin `origin` and no session: its remote id.
    fn bare(origin: u64) -> (Engine, ShardId) {
        let mut e = engines(1, &Limits::default()).remove(0);
        let remote = e.enable_remote().expect("room for the remote id");
        e.set_origin(origin);
        (e, remote)
    }

    /// Session `client_id` moves from `from` to `to` with its window, and connects:
    /// the connection, and the payloads it was sent from the session's queue.
    fn move_session(
        from: &mut Engine,
        to: &mut Engine,
        now_ms: u64,
        client_id: &str,
    ) -> (crate::session::ConnId, Vec<String>) {
        let bytes = from
            .export_session(now_ms, client_id, 0, (2, now_ms))
            .expect("exported");
        let window = from.moving_window(client_id).expect("a window");
        to.import_session(now_ms, client_id, &bytes, 0)
            .expect("imported");
        assert!(to.import_window(now_ms, client_id, &window));
        let c = to.connect(now_ms, connect_packet(V, client_id, false), false);
        let queued = texts(payloads(to, c));
        (c, queued)
    }

    /// The same publication as `m` (a `Forwarded`), as its re-sent copy carries it.
    fn as_resent(mut m: MeshMsg) -> MeshMsg {
        if let MeshMsg::Forwarded { id: Some(id), .. } = &mut m {
            *id = resent(*id);
        }
        m
    }

    /// Sim seed 703 (`sync`): c3 published a QoS 2 message on node A, whose forward
    /// to the subscriber's node died in A's crash; A restarted with the packet id as
    /// maybe lacking on other nodes. The subscriber then moved in to A and on to B,
    /// and A's export claimed what A's earlier life knew: its own count covering
    /// the publication, and the restored id among the re-sent ones it has. B skipped
    /// the re-sent copy for the session, which never got the publication:
    /// acknowledged and lost. That knowledge is the restored sessions' only: a
    /// session that got it before the crash still does not get it twice.
    #[test]
    fn a_session_that_came_after_a_restart_gets_a_re_sent_copy_its_earlier_life_routed() {
        let dir = temp_dir("came-after");
        let (mut a, _, env, lock) = boot(&dir, 7);
        // Another node routes "t" (the subscriber's), and "r" here subscribes too.
        routed_elsewhere(&mut a, "t");
        let r = a.connect(1, connect_packet(V, "r", false), false);
        a.handle_packet(1, r, subscribe_packet("t", QoS::ExactlyOnce));
        let p = a.connect(1, connect_packet(V, "p", false), false);
        commit(&mut a, &env);
        drain(&mut a, r, V);
        drain(&mut a, p, V);
        a.handle_packet(2, p, publish_packet("x", 1));
        commit(&mut a, &env);
        let original = sent_on_as_forwarded(&mut a).expect("the forward, which never leaves");
        crash(a, env, lock);

        // A restarts; the subscriber "s" comes from node C, and goes on to B.
        let (mut a, _, env, _lock) = boot(&dir, 17);
        let (mut c, _, _) = node(9);
        let (s_a, _) = move_session(&mut c, &mut a, 3, "s");
        commit(&mut a, &env);
        assert!(payloads(&mut a, s_a).is_empty());
        let (mut b, remote_b) = bare(8);
        let (s_b, _) = move_session(&mut a, &mut b, 4, "s");
        // The publisher's re-send, routed again with the original's id.
        b.handle_mesh(5, remote_b, as_resent(original.clone()));
        // (Held for the old node's redirect of it, sim seed 1508: none comes here.)
        b.expire_moved(5 + HOLD_MAX_MS);
        assert_eq!(
            texts(payloads(&mut b, s_b)),
            ["x"],
            "skipped for a session that came to A after its crash"
        );
        b.handle_mesh(6, remote_b, as_resent(original.clone()));
        b.expire_moved(6 + HOLD_MAX_MS);
        assert!(payloads(&mut b, s_b).is_empty(), "once");

        // "r" got it on A before the crash: its export still says so, also after a
        // claim that never confirmed parked it and A took it back (and the window the
        // take-back kept ended).
        a.export_session(7, "r", 0, (3, 77)).expect("parked");
        assert!(a.resume_moving(7, "r", 0).expect("taken back"));
        let later = 8 + MOVED_WINDOW_MS;
        a.expire_moved(later);
        let (mut d, remote_d) = bare(10);
        let (r_d, queued) = move_session(&mut a, &mut d, later, "r");
        assert_eq!(queued, ["x"], "the restored session's copy, from its queue");
        d.handle_mesh(later, remote_d, as_resent(original));
        d.expire_moved(later + HOLD_MAX_MS);
        assert!(payloads(&mut d, r_d).is_empty(), "delivered twice");
    }

    /// Issue 15, what the fix of sim seed 703 left (its "not covered" (a)): node 5's
    /// QoS 2 publication reached node A, where "r" subscribes, and its forward to node
    /// C, where "s" lived, died with node 5. "s" moved C -> A; the re-send (its
    /// publisher's, routed again with the original's id after node 5's restart) came
    /// to A after C's ghost and A's window had ended, so no ghost chain carried it,
    /// and A's shard skipped it for every session because its marks cover the
    /// original: "s" never got it (acknowledged and lost). A session keeps, for its
    /// life on the shard it moved to, which publications that shard handled before it
    /// came and its window did not say it had handled: a re-sent copy of one of those
    /// reaches it (once), and not "r".
    #[test]
    fn a_re_sent_copy_reaches_a_session_that_moved_in_after_its_original_without_a_ghost_chain() {
        let x = id_seq(AFTER_COMMIT, 4);
        let (mut c, _, _) = node(9);
        let (mut a, remote_a) = bare(8);
        let r = a.connect(1, connect_packet(V, "r", false), false);
        a.handle_packet(1, r, subscribe_packet("t", QoS::ExactlyOnce));
        drain(&mut a, r, V);
        let original = forwarded("x", x);
        a.handle_mesh(2, remote_a, original.clone());
        assert_eq!(texts(payloads(&mut a, r)), ["x"]);
        let (s_a, queued) = move_session(&mut c, &mut a, 3, "s");
        assert!(queued.is_empty());
        // C's ghost and A's window end: nothing carries the re-send to "s" but A's
        // own routing of it.
        drop(c);
        let later = 4 + MOVED_WINDOW_MS;
        a.expire_moved(later);
        a.handle_mesh(later, remote_a, as_resent(original.clone()));
        assert_eq!(
            texts(payloads(&mut a, s_a)),
            ["x"],
            "skipped for a session that came after the original"
        );
        assert!(payloads(&mut a, r).is_empty(), "\"r\" got it twice");
        a.handle_mesh(later + 1, remote_a, as_resent(original));
        assert!(payloads(&mut a, s_a).is_empty(), "once");
        // What "s" kept here goes with it.
        assert_eq!(a.moved.arrivals.len(), 1);
        let (mut b, _) = bare(10);
        move_session(&mut a, &mut b, later + 2, "s");
        assert!(a.moved.arrivals.is_empty());
    }

    /// Node A (origin 7, a store in `dir`): "p" publishes "x" (QoS 2, packet id 1)
    /// for another node's route of "t", and A crashes before that forward leaves:
    /// the forward, which A's next life does not send again.
    fn a_forward_that_died_with_its_node(dir: &Dir) -> MeshMsg {
        let (mut a, _, env, lock) = boot(dir, 7);
        routed_elsewhere(&mut a, "t");
        let p = a.connect(1, connect_packet(V, "p", false), false);
        commit(&mut a, &env);
        drain(&mut a, p, V);
        a.handle_packet(2, p, publish_packet("x", 1));
        commit(&mut a, &env);
        let original = sent_on_as_forwarded(&mut a).expect("the forward, which never leaves");
        crash(a, env, lock);
        original
    }

    /// Harness sim seed 119 (`sync`): the seed-703 case with the session's move before
    /// the crash. "s" moved to node A after A routed a QoS 2 publication whose forward
    /// to "s"'s old node died with A; restored at A's restart (with the window it
    /// came with), it moved on to B, and A's export claimed the publication by A's
    /// restored marks, as for a session that had been on A when it was routed: B
    /// skipped the re-sent copy for it, acknowledged and lost. A restored session with
    /// a window of its own came within the window before the stop: the earlier life's
    /// restored ids are its only as far as its window says. "q", which came before
    /// the publication and got it on A (its window recorded it), still does not get
    /// the re-send a second time.
    #[test]
    fn a_session_that_came_after_a_publication_and_before_the_crash_gets_its_re_send() {
        let dir = temp_dir("came-before-crash");
        let (mut a, _, env, lock) = boot(&dir, 7);
        routed_elsewhere(&mut a, "t");
        let (mut c, _) = bare(9);
        for (now_ms, client_id) in [(1, "q"), (1, "s")] {
            let conn = c.connect(now_ms, connect_packet(V, client_id, false), false);
            c.handle_packet(now_ms, conn, subscribe_packet("t", QoS::ExactlyOnce));
            drain(&mut c, conn, V);
        }
        let (q_a, _) = move_session(&mut c, &mut a, 1, "q");
        let p = a.connect(1, connect_packet(V, "p", false), false);
        commit(&mut a, &env);
        drain(&mut a, p, V);
        a.handle_packet(2, p, publish_packet("x", 1));
        commit(&mut a, &env);
        let original = sent_on_as_forwarded(&mut a).expect("the forward, which never leaves");
        // (Held for C's redirects, sim seed 1508: none comes.)
        let t = 2 + HOLD_MAX_MS;
        a.expire_moved(t);
        commit(&mut a, &env);
        assert_eq!(texts(payloads(&mut a, q_a)), ["x"]);
        let (s_a, _) = move_session(&mut c, &mut a, t, "s");
        commit(&mut a, &env);
        assert!(payloads(&mut a, s_a).is_empty());
        crash(a, env, lock);

        // A restarts with both sessions and their windows; "s" moves on to B, and the
        // publisher's re-send comes there, routed again with the original's id.
        let (mut a, _, _env, _lock) = boot(&dir, 17);
        let (mut b, remote_b) = bare(8);
        let (s_b, queued) = move_session(&mut a, &mut b, t + 1, "s");
        assert!(queued.is_empty());
        b.handle_mesh(t + 2, remote_b, as_resent(original.clone()));
        b.expire_moved(t + 2 + HOLD_MAX_MS);
        assert_eq!(
            texts(payloads(&mut b, s_b)),
            ["x"],
            "skipped for a session that came to A after the original, before A's crash"
        );
        // "q" had it on A: its copy comes with it (in flight), the re-send does not.
        let (mut d, remote_d) = bare(10);
        let later = t + 3 + HOLD_MAX_MS;
        let (q_d, queued) = move_session(&mut a, &mut d, later, "q");
        assert_eq!(queued, ["x"], "the restored session's copy, from its queue");
        d.handle_mesh(later, remote_d, as_resent(original));
        d.expire_moved(later + HOLD_MAX_MS);
        assert!(payloads(&mut d, q_d).is_empty(), "delivered twice");
    }

    /// Harness sim seed 242 (`sync`): c5's session moved from node A to B while a
    /// batch for A with c4's QoS 2 publications for it waited out a partition; B held
    /// c4's later ones for A's redirects, the hold ran out and c5 got them on B; c5
    /// came back to A, and the late batch reached A: A's ghost would have sent it on
    /// to B, where the redirect is judged by the ids the session got, but the session
    /// was back, and A judged the copies as direct ones by B's marks, which cover them
    /// (B handled later ones of that origin): skipped, acknowledged and never
    /// delivered. Back where its ghost lived, the session's window judges what the
    /// ghost would have sent on as a redirect: the late copy is delivered once, and
    /// the later one it got on B is not delivered again.
    #[test]
    fn a_session_back_on_its_old_node_gets_a_late_copy_its_ghost_there_would_have_sent_on() {
        let (x, y) = (id_seq(AFTER_COMMIT, 4), id_seq(AFTER_COMMIT, 5));
        let (mut a, remote_a, _) = node(7);
        let (mut b, remote_b) = bare(8);
        let (s_b, _) = move_session(&mut a, &mut b, 2, "s");
        assert!(a.moving_done(2, "s", (2, 2)));
        remote_out(&mut a);
        // "x" is on its way to A (a partition holds it up); "y", later, reaches B.
        b.handle_mesh(3, remote_b, forwarded("y", y));
        // Held for A's redirects of older ones: none comes.
        b.expire_moved(3 + HOLD_MAX_MS);
        assert_eq!(texts(payloads(&mut b, s_b)), ["y"]);
        // "s" comes back to A (its "y" in flight with it), then A's late batch
        // arrives: "x" for the session, and "y", which it got on B.
        let t = 4 + HOLD_MAX_MS;
        let (s_a, queued) = move_session(&mut b, &mut a, t, "s");
        assert_eq!(queued, ["y"], "in flight, sent again with its packet id");
        a.handle_mesh(t, remote_a, forwarded("x", x));
        a.handle_mesh(t, remote_a, forwarded("y", y));
        a.expire_moved(t + HOLD_MAX_MS);
        assert_eq!(
            texts(payloads(&mut a, s_a)),
            ["x"],
            "the late copy skipped by the marks of the node the session came back from"
        );
    }

    /// The case above, with the session leaving its old node A again before A's late
    /// batch comes (network scenario, CHAOS_SEED=75901: the other nodes resent their
    /// hinted batches for A for up to 35 s after a cut, while the session came back
    /// to A and moved on). A's new ghost kept the marks of the node the session had
    /// come back from, which cover the late copy, and did not send it on: the node
    /// the session went to would skip such a copy had it come there directly, but
    /// this one was sent to A for the session, and only A's ghost carries it.
    #[test]
    fn a_late_copy_for_a_session_that_came_back_and_left_again_follows_it() {
        let (x, y) = (id_seq(AFTER_COMMIT, 4), id_seq(AFTER_COMMIT, 5));
        let (mut a, remote_a, _) = node(7);
        let (mut b, remote_b) = bare(8);
        let (s_b, _) = move_session(&mut a, &mut b, 2, "s");
        assert!(a.moving_done(2, "s", (2, 2)));
        remote_out(&mut a);
        // "x" is on its way to A (a partition holds it up); "y", later, reaches B.
        b.handle_mesh(3, remote_b, forwarded("y", y));
        b.expire_moved(3 + HOLD_MAX_MS);
        assert_eq!(texts(payloads(&mut b, s_b)), ["y"]);
        // "s" comes back to A and leaves it again, for node 3, before "x" comes.
        let t = 4 + HOLD_MAX_MS;
        move_session(&mut b, &mut a, t, "s");
        assert!(a.export_session(t + 1, "s", 0, (3, 7)).is_some());
        assert!(a.moving_done(t + 1, "s", (3, 7)));
        remote_out(&mut a);
        a.handle_mesh(t + 2, remote_a, forwarded("x", x));
        let sent: Vec<String> = remote_out(&mut a)
            .into_iter()
            .filter_map(|m| match m {
                MeshMsg::Redirect {
                    node: 3, message, ..
                } => Some(String::from_utf8_lossy(&message.payload).into_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(
            sent,
            ["x"],
            "the late copy for the session was dropped here"
        );
    }

    /// Sim seed 250 (`sync`): A parked c4's session for node B's claim, which could not
    /// reach A and started c4 anew; the log's mark confirmed A's copy (never fetched),
    /// so A's ghost was of the older session. The new session got "x" on B and came
    /// to A within the ghost's window, and a late direct copy of "x" reached A (the
    /// ghost's routes drew it): A judged it as that ghost's redirect, by the ids of
    /// the new session's window, which do not list "x", and delivered it again. The
    /// ghost path is the same session's only; the copy is judged by B's marks.
    #[test]
    fn a_ghost_of_a_session_that_ended_gives_no_ghost_path_to_a_new_one_taken_in() {
        let x = id_seq(AFTER_COMMIT, 4);
        let (mut a, remote_a, _) = node(7);
        assert!(a.export_session(2, "s", 0, (2, 99)).is_some());
        // Node B started "s" anew under claim 99: the log's mark confirms A's copy.
        assert!(a.moving_done(3, "s", (2, 99)));
        remote_out(&mut a);
        let (mut b, remote_b) = bare(8);
        let sb = b.connect(3, connect_packet(V, "s", false), false);
        b.handle_packet(3, sb, subscribe_packet("t", QoS::ExactlyOnce));
        drain(&mut b, sb, V);
        b.handle_mesh(4, remote_b, forwarded("x", x));
        assert_eq!(texts(payloads(&mut b, sb)), ["x"]);
        // The new session comes to A (the log's mark is 99, as the broker's take-in
        // reads it), with "x" in flight; then A's late copy of "x" arrives.
        assert!(!a.drop_older_lineage("s", 99), "no moving copy left");
        let (s_a, queued) = move_session(&mut b, &mut a, 5, "s");
        assert_eq!(queued, ["x"], "in flight, sent again with its packet id");
        a.handle_mesh(5, remote_a, forwarded("x", x));
        a.expire_moved(5 + HOLD_MAX_MS);
        assert!(
            payloads(&mut a, s_a).is_empty(),
            "delivered again by the ghost path of the session that ended"
        );
    }

    /// The other side of [`Arrival`] (sim seed 663, where giving a re-sent copy to
    /// every session whose window lacked it delivered QoS 2 twice): a session that
    /// started clean on the restarted publisher's node after the originals were
    /// published there, and moved to a node that handled them, is not given their
    /// re-send (its ClientID's earlier session got the original there); nor is one
    /// that got the original where it was (its window's marks say so), nor one that
    /// got it redirected by its old owner's ghost within its window.
    #[test]
    fn a_re_sent_copy_does_not_reach_a_moved_in_session_that_had_it_or_came_after_it() {
        let dir = temp_dir("came-after-clean");
        let original = a_forward_that_died_with_its_node(&dir);

        // Node B: the first session of "s" gets the original there.
        let (mut b, remote_b, s_b) = node(8);
        b.handle_mesh(3, remote_b, original.clone());
        assert_eq!(texts(payloads(&mut b, s_b)), ["x"]);
        // "s" starts clean on A, restarted, and moves to B.
        assert!(b.drop_session(4, "s"));
        let (mut a, _, env, _lock) = boot(&dir, 17);
        // (A new session there: A never had one of "s".)
        let s_a = a.connect(4, connect_packet(V, "s", false), false);
        a.handle_packet(4, s_a, subscribe_packet("t", QoS::ExactlyOnce));
        drain(&mut a, s_a, V);
        commit(&mut a, &env);
        let (s_b, _) = move_session(&mut a, &mut b, 5, "s");
        let later = 6 + MOVED_WINDOW_MS;
        b.expire_moved(later);
        b.handle_mesh(later, remote_b, as_resent(original.clone()));
        assert!(
            payloads(&mut b, s_b).is_empty(),
            "a session that started after the original got its re-send"
        );

        // "u" got the original on C, and moves to B, which had it too.
        let (mut c, remote_c) = bare(9);
        let u_c = c.connect(1, connect_packet(V, "u", false), false);
        c.handle_packet(1, u_c, subscribe_packet("t", QoS::ExactlyOnce));
        drain(&mut c, u_c, V);
        c.handle_mesh(later, remote_c, original.clone());
        assert_eq!(texts(payloads(&mut c, u_c)), ["x"]);
        let (u_b, _) = move_session(&mut c, &mut b, later, "u");
        // "v" comes to B from D, which gets the original after it left: D's ghost
        // redirects it (B's window records it), and the window ends.
        let (mut d, remote_d) = bare(10);
        let v_d = d.connect(1, connect_packet(V, "v", false), false);
        d.handle_packet(1, v_d, subscribe_packet("t", QoS::ExactlyOnce));
        drain(&mut d, v_d, V);
        let (v_b, _) = move_session(&mut d, &mut b, later, "v");
        assert!(d.moving_done(later, "v", (2, later)));
        remote_out(&mut d);
        d.handle_mesh(later, remote_d, original.clone());
        for m in remote_out(&mut d) {
            b.handle_mesh(later, remote_b, m);
        }
        assert_eq!(texts(payloads(&mut b, v_b)), ["x"]);
        let end = later + 1 + MOVED_WINDOW_MS;
        b.expire_moved(end);
        b.handle_mesh(end, remote_b, as_resent(original));
        assert!(payloads(&mut b, u_b).is_empty(), "\"u\" got it twice");
        assert!(payloads(&mut b, v_b).is_empty(), "\"v\" got it twice");
        assert!(payloads(&mut b, s_b).is_empty(), "\"s\" got it at last");
    }

    /// The other half of [`Arrival`] (h703's "not covered" (c), which the ranges would
    /// turn into a duplicate): a session that moved in to the restarted node gets the
    /// re-send there (its window lacked the original, which that node's earlier life
    /// routed before its forward died), and the window it leaves with says so, though
    /// the id is one the earlier life restored as re-sendable (left out of the ids
    /// exported for a session that moved in since): a second re-send (another crash
    /// before PUBCOMP) does not reach it again on its next node.
    #[test]
    fn a_session_that_got_a_re_send_on_the_restarted_node_claims_it_when_it_moves_on() {
        let dir = temp_dir("got-resend");
        let original = a_forward_that_died_with_its_node(&dir);

        let (mut a, _, env, _lock) = boot(&dir, 17);
        let (mut c, _, _) = node(9);
        let (s_a, _) = move_session(&mut c, &mut a, 3, "s");
        commit(&mut a, &env);
        // Its publisher re-sends it on A, after the window there ended.
        let later = 4 + MOVED_WINDOW_MS;
        a.expire_moved(later);
        let p = a.connect(later, connect_packet(V, "p", false), false);
        drain(&mut a, p, V);
        let Packet::Publish(mut again) = publish_packet("x", 1) else {
            unreachable!("a PUBLISH")
        };
        again.dup = true;
        a.handle_packet(later, p, Packet::Publish(again));
        commit(&mut a, &env);
        assert_eq!(
            texts(payloads(&mut a, s_a)),
            ["x"],
            "the re-send skipped on A for a session that came after the original"
        );
        let (mut b, remote_b) = bare(8);
        let (s_b, queued) = move_session(&mut a, &mut b, later + 1, "s");
        assert_eq!(
            queued,
            ["x"],
            "its delivery in flight, sent again with its packet id"
        );
        b.handle_mesh(later + 2, remote_b, as_resent(original));
        b.expire_moved(later + 2 + HOLD_MAX_MS);
        assert!(payloads(&mut b, s_b).is_empty(), "delivered twice");
    }
}
