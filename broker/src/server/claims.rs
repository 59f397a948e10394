//! One live session per ClientID, cluster-wide (issue 15, guarantee 1): a shard's
//! claims on the ClientIDs it owns, taken at CONNECT, released lazily, and given up when
//! another node's claim commits.
//!
//! - **At CONNECT** ([`claim`]), on the ClientID's owner shard, before the engine sees
//!   the CONNECT: a ClientID this node already holds (and is not releasing, and which its
//!   committed table still gives to this node with that epoch: a local read) costs no
//!   raft write, as long as this node knows a leader; otherwise `ClaimSession` is proposed
//!   (the node's batcher puts every shard's claims into one entry) and the CONNECT waits
//!   for it to be applied here, at most [`CLAIM_TIMEOUT`]. No leader, a full proposal
//!   queue or the timeout: CONNACK 0x88 (v5) / 0x03 (3.1.1), never a hang. A claim whose
//!   previous owner is another node is a takeover (`takeover::fetch`).
//! - **Waiting for an unreachable owner** ([`take_over`], issue 16): when the node that
//!   holds the session cannot be reached and `cluster.wait_for_session_owner` is on (the
//!   default), the claim stays, the CONNECT is refused (0x88 / 3) and `Claims::awaiting`
//!   names the node whose answer counts; later CONNECTs ask again, and a claim that
//!   replaces a waiting one is sent to that node (`Claims::passed_on`, FETCH answer `4`).
//!   `awaiting` is set when a claim of this node is applied ([`on_applied`]), so a
//!   claim committed after its CONNECT gave up still takes the session over at the next
//!   CONNECT, and the claim path reads it once its shard has handled the claim's entry
//!   (`ShardCluster::reacted`).
//! - **Fresh starts** ([`settle`], [`mark_fresh`]): the committed owner record says which
//!   epoch last started a session of the ClientID afresh (a Clean Start's claim, a first
//!   claim, or `Op::SessionFresh` proposed before the CONNACK when a session starts here
//!   with nothing to continue), so no node ever resumes a moving copy of an older
//!   session as "session present" (data-plane simulation, seed 46).
//! - **Applied claims** ([`on_applied`]): every node applies every claim; the owner
//!   shard of the ClientID on the old owner's node ends the live connection there (v5
//!   DISCONNECT 0x8E) at once, whether or not the new owner's fetch ever comes.
//! - **Release** ([`tick`]): a session that ended here (the engine reports it) is
//!   released after [`RELEASE_LINGER_MS`] without a new session, so a client that
//!   reconnects soon costs no raft write. The release carries the claim's epoch and is
//!   a no-op in the state machine if a newer claim exists. While a release is on its
//!   way, a CONNECT claims again instead of trusting the old claim.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use tessera_proto::{Connect, ReasonCode};
use tessera_raft::{AppliedEntry, ClusterError, NodeId, Op, OpResult};
use tracing::{debug, info, warn};

use super::cluster::ShardCluster;
use super::{Shard, now_ms, rt, takeover};
use crate::cluster::metrics::SessionMetrics;

/// Longest a CONNECT waits for its claim to be applied before 0x88 / 0x03.
pub(super) const CLAIM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a claim outlives its session before it is released.
pub(super) const RELEASE_LINGER_MS: u64 = 5_000;

/// Where the release of a claim stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// The session ended; released at this engine time unless a session comes back.
    Due(u64),
    /// Proposed; the claim is not trusted until a new claim replaces it.
    Proposed,
}

/// The claims of one shard (on ClientIDs it owns by hash).
#[derive(Debug, Default)]
pub(crate) struct Claims {
    /// ClientID -> epoch of this node's committed claim.
    held: RefCell<HashMap<String, u64>>,
    /// Claims on their way out.
    releasing: RefCell<HashMap<String, Release>>,
    /// ClientID -> epoch of a held claim whose session came from another node that
    /// confirmed it deleted its copy: no copy of an older session is left anywhere, so
    /// a new session under this claim needs no [`Op::SessionFresh`].
    settled: RefCell<HashMap<String, u64>>,
    /// ClientID -> epoch of a held claim whose session was taken in without its
    /// source's confirmation and is not yet recorded in the log as served here (the
    /// mark failed): the next CONNECT that continues it marks it first (seed 876).
    unconfirmed: RefCell<HashMap<String, u64>>,
    /// ClientID -> (epoch of a held claim, the node its session is still on): set when
    /// the claim is applied with another node as the previous owner (or replaces this
    /// node's own claim that still waited), cleared once a takeover took the session
    /// in or found none; a takeover that could not reach that node
    /// (`cluster.wait_for_session_owner`) names the node whose answer counts. The
    /// session and its acknowledged messages are still there, so a CONNECT under this
    /// claim fetches it first (or is refused until it can), and a member asking this
    /// node for the session is told to ask again later rather than "nothing here".
    /// Recorded at apply time, not only when a takeover gave up: a claim committed after
    /// its CONNECT gave up (its proposal still retried, then the client came back) was
    /// served as if the session were here and marked fresh, and a middle node still in
    /// its first fetch answered "nothing here" (network scenario, CHAOS_SEED=671040).
    awaiting: RefCell<HashMap<String, (u64, NodeId)>>,
    /// ClientID -> (epoch of the other node's claim that replaced an `awaiting` one
    /// here, the node the session is still on): that claimant's fetch is told the
    /// session is not here yet, not "nothing here", which would give the client a new
    /// session and leave the one on that node behind (sim seed 137, harness faults).
    passed_on: RefCell<HashMap<String, (u64, NodeId)>>,
    /// When [`fence`] last checked the lease (broker ms; 0: never).
    lease_checked_ms: Cell<u64>,
}

impl Claims {
    /// The epoch of this node's claim, if it holds one it can serve a CONNECT with. A
    /// release not yet proposed is called off; one proposed makes the claim unusable.
    fn usable(&self, client_id: &str) -> Option<u64> {
        let mut releasing = self.releasing.borrow_mut();
        match releasing.get(client_id) {
            Some(Release::Proposed) => return None,
            Some(Release::Due(_)) => {
                releasing.remove(client_id);
            }
            None => {}
        }
        self.held.borrow().get(client_id).copied()
    }

    /// Records this node's committed claim (the newest epoch wins).
    fn hold(&self, client_id: &str, epoch: u64) {
        let mut held = self.held.borrow_mut();
        let e = held.entry(client_id.to_owned()).or_insert(epoch);
        *e = (*e).max(epoch);
        drop(held);
        self.releasing.borrow_mut().remove(client_id);
        self.passed_on.borrow_mut().remove(client_id);
    }

    /// The claim is gone (another node's claim, or our release, committed).
    pub(super) fn forget(&self, client_id: &str) {
        self.held.borrow_mut().remove(client_id);
        self.releasing.borrow_mut().remove(client_id);
        self.settled.borrow_mut().remove(client_id);
        self.unconfirmed.borrow_mut().remove(client_id);
        self.awaiting.borrow_mut().remove(client_id);
    }

    /// The node this shard still waits to fetch `client_id`'s session from, under its
    /// held claim (`awaiting`).
    pub(super) fn awaiting_from(&self, client_id: &str) -> Option<NodeId> {
        self.awaiting.borrow().get(client_id).map(|(_, node)| *node)
    }

    /// The node the session under this node's claim of `epoch` is still on (`awaiting`).
    fn awaiting_for(&self, client_id: &str, epoch: u64) -> Option<NodeId> {
        self.awaiting
            .borrow()
            .get(client_id)
            .filter(|(e, _)| *e == epoch)
            .map(|(_, node)| *node)
    }

    /// This node's claim of `epoch` was applied, replacing `previous`: where its session
    /// is still to be fetched from (`awaiting`). A Clean Start continues nothing; nor is
    /// anything awaited when this shard keeps the session or a moving copy of it that
    /// is not stale and that no claimant fetched (`here`, `Engine::keeps_session`):
    /// the other claims all waited for this node, the session is its own to take back,
    /// and a claimant that replaces this claim is handed it, not sent to a node that
    /// only waited (network scenario, CHAOS_SEED=671040). A copy a claimant fetched is
    /// that node's session (CHAOS_SEED=75901): this claim waits for it there. A claim
    /// that replaced this node's own claim takes over what that one still waited for.
    fn claimed_here(
        &self,
        client_id: &str,
        epoch: u64,
        previous: Option<tessera_raft::Owner>,
        me: NodeId,
        clean_start_or_here: bool,
    ) {
        let mut awaiting = self.awaiting.borrow_mut();
        let on = match previous {
            _ if clean_start_or_here => None,
            Some(p) if p.node != me => Some(p.node),
            Some(_) => awaiting.get(client_id).map(|(_, node)| *node),
            None => None,
        };
        match on {
            Some(node) => awaiting.insert(client_id.to_owned(), (epoch, node)),
            None => awaiting.remove(client_id),
        };
    }

    /// Another node's claim of `epoch` replaced this node's: if this node still waited
    /// for the session from another node, that claimant must wait for it too. Not when
    /// the session is here after all (`here`: taken in, or still being taken in, by
    /// this node's takeover, whose `awaiting` is cleared only at its end): the claimant
    /// is handed it here; sending it to the node it came from, which handed it out and
    /// deletes its copy at `DONE`, gave the client a new session (network scenario,
    /// CHAOS_SEED=796681).
    fn passed_to(&self, client_id: &str, epoch: u64, here: bool) {
        let awaited = self.awaiting_from(client_id).filter(|_| !here);
        self.forget(client_id);
        let mut passed = self.passed_on.borrow_mut();
        match awaited {
            Some(node) => passed.insert(client_id.to_owned(), (epoch, node)),
            None => passed.remove(client_id),
        };
    }

    /// The node a session is still on when the claim of `epoch` replaced this node's
    /// claim while it waited for it there (`passed_on`).
    pub(super) fn passed_on_from(&self, client_id: &str, epoch: u64) -> Option<NodeId> {
        self.passed_on
            .borrow()
            .get(client_id)
            .filter(|(e, _)| *e == epoch)
            .map(|(_, node)| *node)
    }

    /// No other copy of the session under the claim of `epoch` is left (see
    /// `settled`).
    fn settle(&self, client_id: &str, epoch: u64) {
        self.settled
            .borrow_mut()
            .insert(client_id.to_owned(), epoch);
    }

    /// How many ClientIDs this shard holds claims on.
    #[allow(dead_code)] // for the admin listing
    pub(crate) fn count(&self) -> usize {
        self.held.borrow().len()
    }
}

/// The refusal for "no claim": 0x88 in v5, return code 3 in 3.1.1 (the encoder maps
/// `ServerUnavailable` to the version's code).
const UNAVAILABLE: ReasonCode = ReasonCode::ServerUnavailable;

/// Why a CONNECT gets no claim: the CONNACK code, and for a redirect the owner node's
/// MQTT address (v5 Server Reference).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ClaimRefusal {
    pub(super) rc: ReasonCode,
    pub(super) server_reference: Option<String>,
}

impl From<ReasonCode> for ClaimRefusal {
    fn from(rc: ReasonCode) -> ClaimRefusal {
        ClaimRefusal {
            rc,
            server_reference: None,
        }
    }
}

/// Makes sure this node holds `connect`'s ClientID in the committed raft state before
/// the engine accepts the CONNECT; imports the session from its old owner when another
/// node held it. With `cluster.redirect_to_owner`, an MQTT 5 client whose session
/// another node holds is sent there instead (0x9C with a Server Reference).
pub(super) async fn claim(
    shard: &Rc<Shard>,
    cluster: &ShardCluster,
    connect: &Connect,
) -> Result<u64, ClaimRefusal> {
    let client_id = connect.client_id.as_str();
    let me = cluster.port.node_id;
    let metrics = &cluster.port.sessions;
    let lease = cluster.port.session_lease;
    // What this shard derived from the claims in the table (held, awaiting, parked
    // copies) is read with the table below: a claim of this node applied to the table
    // but not yet handled here would be served as if its session were here.
    if let Some(o) = cluster.owner(client_id)
        && !cluster
            .reacted(takeover::claim_index(o.epoch), CLAIM_TIMEOUT)
            .await
    {
        return Err(refused_by(
            shard,
            cluster,
            client_id,
            &"the ClientID's last claim is not applied on this shard in time",
        ));
    }
    let in_contact = cluster.handle().leader().is_some() && cluster.handle().in_contact(lease);
    // The claim this shard holds must still be the committed one: another node's claim
    // may be applied to the table already while this shard has not seen its applied
    // event yet (`on_applied`, which forgets ours). Serving then would CONNACK on an
    // older epoch than one committed (the same race as at the end of this function).
    let committed = |epoch: u64| {
        cluster
            .owner(client_id)
            .is_some_and(|o| o.node == me && o.epoch == epoch)
    };
    if in_contact && let Some(epoch) = cluster.claims.usable(client_id).filter(|e| committed(*e)) {
        SessionMetrics::add(&metrics.claims_held);
        let awaited = cluster.claims.awaiting.borrow().get(client_id).copied();
        if connect.clean_start {
            // A new session: the one kept on the unreachable node is stale once this
            // claim is marked fresh (`settle`), and dropped where it is kept.
            cluster.claims.awaiting.borrow_mut().remove(client_id);
        } else if let Some((e, old)) = awaited
            && e == epoch
        {
            // The session is still on the node this claim took it from: ask again.
            take_over(shard, cluster, connect, epoch, old).await?;
            return if committed(epoch) {
                Ok(epoch)
            } else {
                Err(refused_by(
                    shard,
                    cluster,
                    client_id,
                    &"another node claimed the ClientID meanwhile",
                ))
            };
        }
        takeover::resume_own_copy(shard, cluster, client_id);
        return settle(shard, cluster, connect, epoch).await.map(|()| epoch);
    }
    let releasing = cluster.claims.releasing.borrow().contains_key(client_id);
    let owner = if releasing {
        None
    } else {
        cluster.owner(client_id)
    };
    // After a restart, the committed table knows what this node held.
    if let Some(owner) = owner
        && owner.node == me
        && in_contact
    {
        cluster.claims.hold(client_id, owner.epoch);
        SessionMetrics::add(&metrics.claims_held);
        takeover::resume_own_copy(shard, cluster, client_id);
        return settle(shard, cluster, connect, owner.epoch)
            .await
            .map(|()| owner.epoch);
    }
    if cluster.port.redirect_to_owner
        && connect.version.is_v5()
        && let Some(owner) = owner
        && owner.node != me
        && let Some(addr) = mqtt_address(cluster, owner.node)
    {
        SessionMetrics::add(&metrics.redirects);
        return Err(ClaimRefusal {
            rc: ReasonCode::UseAnotherServer,
            server_reference: Some(addr),
        });
    }
    let refused = |why: &dyn std::fmt::Display| refused_by(shard, cluster, client_id, why).rc;
    // A Clean Start says in the claim itself that the session starts afresh.
    let op = if connect.clean_start {
        Op::ClaimCleanStart {
            client_id: client_id.to_owned(),
            node: me,
        }
    } else {
        Op::ClaimSession {
            client_id: client_id.to_owned(),
            node: me,
        }
    };
    let pending = cluster
        .handle()
        .propose(op)
        .map_err(|e| ClaimRefusal::from(refused(&e)))?;
    let wait = async { Some(pending.wait().await) };
    let expire = async {
        rt::sleep(CLAIM_TIMEOUT).await;
        None
    };
    let applied = match futures_lite::future::or(wait, expire).await {
        None => return Err(refused(&"no answer within the claim timeout").into()),
        Some(Err(e)) => return Err(refused(&e).into()),
        Some(Ok(applied)) => applied,
    };
    let index = applied.index;
    let OpResult::Claimed { epoch, previous } = applied.result else {
        return Err(refused(&ClusterError::Refused(format!(
            "unexpected claim result {:?}",
            applied.result
        )))
        .into());
    };
    SessionMetrics::add(&metrics.claims);
    cluster.claims.hold(client_id, epoch);
    // The answer may come from the leader before this node applied the entry: the table
    // is read (for a moving copy's staleness, and below) once this shard has handled
    // it and every entry before it (a session parked here for another node's claim,
    // where the session is: `awaiting`), bounded like the claim.
    if !cluster.reacted(index, CLAIM_TIMEOUT).await {
        return Err(refused(&"the claim is not applied on this node in time").into());
    }
    // The session is on another node: the previous owner, or, when this claim replaced
    // this node's own, the node that one still waited for (its claim committed after
    // its CONNECT gave up, say: network scenario, CHAOS_SEED=671040).
    let on = match previous {
        Some(p) if p.node != me => Some(p.node),
        _ => cluster.claims.awaiting_for(client_id, epoch),
    };
    if let Some(old) = on {
        take_over(shard, cluster, connect, epoch, old).await?;
    } else {
        // This claim replaced this node's own (one committed after its CONNECT gave up,
        // say), whose session another node's claim parked here meanwhile: it is taken
        // back, as under a held claim, not started afresh (network scenario,
        // CHAOS_SEED=671040).
        if !connect.clean_start {
            takeover::resume_own_copy(shard, cluster, client_id);
        }
        settle(shard, cluster, connect, epoch).await?;
    }
    // A later claim of another node may have been applied here before this one's answer
    // arrived (the answer comes after the apply, and other entries may follow it): then
    // this claim is no longer the committed one and the CONNECT must not go live on it
    // (found by the data-plane simulation, seed 2). The client retries.
    if !committed(epoch) {
        return Err(refused(&"another node claimed the ClientID meanwhile").into());
    }
    Ok(epoch)
}

/// Refuses a CONNECT (0x88 / 3): counted and logged with why.
fn refused_by(
    shard: &Shard,
    cluster: &ShardCluster,
    client_id: &str,
    why: &dyn std::fmt::Display,
) -> ClaimRefusal {
    SessionMetrics::add(&cluster.port.sessions.claims_refused);
    debug!(shard = shard.id, client_id, "claim refused: {why}");
    UNAVAILABLE.into()
}

/// Moves `connect`'s session here from `old`, which held it before this node's claim
/// of `epoch`. When `old` cannot be reached and `cluster.wait_for_session_owner` is on
/// (the default) and `old` is still a member, the CONNECT is refused and the claim
/// remembers `old` (`Claims::awaiting`): the session and the messages acknowledged for
/// it stay on `old`'s disk until it is back (then the next CONNECT moves them here,
/// session present 1) or an operator removes it from the cluster. Otherwise, after
/// `old`'s lease, the client gets a new session here.
async fn take_over(
    shard: &Rc<Shard>,
    cluster: &ShardCluster,
    connect: &Connect,
    epoch: u64,
    old: NodeId,
) -> Result<(), ClaimRefusal> {
    let client_id = connect.client_id.as_str();
    let metrics = &cluster.port.sessions;
    let lease = cluster.port.session_lease;
    let refused = |why: &dyn std::fmt::Display| refused_by(shard, cluster, client_id, why).rc;
    SessionMetrics::add(&metrics.takeovers);
    let started = rt::now();
    let fetched = takeover::fetch(shard, cluster, connect, epoch, old).await;
    metrics.takeover_took(rt::now().saturating_duration_since(started).as_micros() as u64);
    if !fetched.answered && fetched.session.is_none() && !connect.clean_start {
        // The node it waits for is the one whose answer counted (the old owner, or
        // the node that owner itself waited for), so a claim that replaces this one
        // is sent there (`passed_on`).
        let old = fetched.asked;
        if cluster.waits_for(old) {
            // The session, with what was acknowledged for it, is on `old`'s disk or in
            // its memory: a new session here would leave that behind for good (the copy
            // is stale once this claim is marked fresh). The claim stays; the client
            // is refused until `old` answers. (Not when another node's claim replaced
            // this one meanwhile: that claimant was told where the session is.)
            if cluster.claims.held.borrow().get(client_id) == Some(&epoch) {
                cluster
                    .claims
                    .awaiting
                    .borrow_mut()
                    .insert(client_id.to_owned(), (epoch, old));
            }
            SessionMetrics::add(&metrics.owner_waits);
            info!(
                shard = shard.id,
                client_id,
                old_owner = old,
                "session's node unreachable: CONNECT refused until it is back"
            );
            return Err(UNAVAILABLE.into());
        }
    }
    if !fetched.answered {
        // The old owner did not answer: cut off from this node, it may still serve
        // the ClientID until its own lease runs out and it ends the connection
        // (`tick`). This connection goes live only after that.
        let until = started + lease + super::TICK;
        let now = rt::now();
        if until > now {
            debug!(
                shard = shard.id,
                client_id,
                old_owner = old,
                "old owner unreachable: waiting out its session lease"
            );
            rt::sleep(until - now).await;
        }
    }
    // Another node's claim may have committed while the session moved: then this
    // CONNECT lost the ClientID and must not go live here (the client retries).
    if cluster.claims.held.borrow().get(client_id) != Some(&epoch) {
        return Err(refused(&"another node claimed the ClientID during the takeover").into());
    }
    cluster.claims.awaiting.borrow_mut().remove(client_id);
    match fetched.session {
        Some(takeover::Settled::Yes) => cluster.claims.settle(client_id, epoch),
        // Taken in, but the node it came from may still keep its copy (its
        // confirmation did not arrive): before the CONNACK, the log records that
        // this claim serves the session, so that copy is never resumed after the
        // client got newer state here (seed 876; `mark_fresh`).
        Some(takeover::Settled::No) => {
            cluster
                .claims
                .unconfirmed
                .borrow_mut()
                .insert(client_id.to_owned(), epoch);
            mark_fresh(shard, cluster, client_id, epoch).await?;
        }
        // Nothing to continue: the client gets a new session, which the log must
        // know before the CONNACK says so (seed 46, `mark_fresh`). A Clean Start's
        // claim said it already.
        None if !connect.clean_start => mark_fresh(shard, cluster, client_id, epoch).await?,
        None => {}
    }
    Ok(())
}

/// This node serves `connect` under its committed claim of `epoch` without a takeover
/// (a claim it held, or one with no other previous owner): makes sure that a new
/// session started here is known as fresh in the committed table before the CONNACK,
/// unless it already is. Costs nothing when the session continues here, when the claim
/// is known fresh (a Clean Start's, or a ClientID nobody owned) or when the session
/// came from a node that confirmed it deleted its copy; otherwise (this node restarted
/// without the session, or a session taken in unconfirmed ends with a Clean Start) the
/// new session is marked fresh (`mark_fresh`).
async fn settle(
    shard: &Rc<Shard>,
    cluster: &ShardCluster,
    connect: &Connect,
    epoch: u64,
) -> Result<(), ClaimRefusal> {
    let client_id = connect.client_id.as_str();
    if !connect.clean_start && shard.engine.borrow().has_session(client_id) {
        // A session taken in unconfirmed whose mark failed is marked now (seed 876).
        if cluster.claims.unconfirmed.borrow().get(client_id) == Some(&epoch) {
            return mark_fresh(shard, cluster, client_id, epoch).await;
        }
        return Ok(());
    }
    if cluster.claims.settled.borrow().get(client_id) == Some(&epoch) {
        return Ok(());
    }
    let fresh = cluster.owner(client_id).map_or(0, |o| o.fresh);
    if fresh >= epoch {
        return Ok(());
    }
    // No moving copy is taken from another member here: one kept for an older claim
    // may be older than the session this claim continued and handed on before this
    // node lost it (a confirmation lost, then this node restarted: seed 444).
    mark_fresh(shard, cluster, client_id, epoch).await
}

/// Records in the committed table that this node's session of `client_id` under its
/// claim of `epoch` starts afresh (`Op::SessionFresh`), and waits until it is applied
/// here: from then on no node resumes a moving copy of an older session of it (such a
/// copy was handed to this claim or an older one), which would answer CONNACK session
/// present 1 with state older than the session the client last had (data-plane
/// simulation, seed 46). Proposed only when a session starts here without one to
/// continue under a claim not known fresh, or when a takeover took the session in
/// without the old owner's confirmation (then a copy that owner keeps for this claim is
/// confirmed by the entry, and no older copy is ever resumed after this node served the
/// client: seed 876), so it is batched with the node's claims and costs nothing on a
/// reconnect that continues a session.
async fn mark_fresh(
    shard: &Shard,
    cluster: &ShardCluster,
    client_id: &str,
    epoch: u64,
) -> Result<(), ClaimRefusal> {
    let refused = |why: &dyn std::fmt::Display| {
        SessionMetrics::add(&cluster.port.sessions.claims_refused);
        debug!(
            shard = shard.id,
            client_id, "new session not recorded: {why}"
        );
        ClaimRefusal::from(UNAVAILABLE)
    };
    let pending = cluster
        .handle()
        .propose(Op::SessionFresh {
            client_id: client_id.to_owned(),
            node: cluster.port.node_id,
            epoch,
        })
        .map_err(|e| refused(&e))?;
    let wait = async { Some(pending.wait().await) };
    let expire = async {
        rt::sleep(CLAIM_TIMEOUT).await;
        None
    };
    let applied = match futures_lite::future::or(wait, expire).await {
        None => return Err(refused(&"no answer within the claim timeout")),
        Some(Err(e)) => return Err(refused(&e)),
        Some(Ok(applied)) => applied,
    };
    if applied.result != OpResult::MarkedFresh(true) {
        return Err(refused(&"another node claimed the ClientID meanwhile"));
    }
    if !cluster.applied(applied.index, CLAIM_TIMEOUT).await {
        return Err(refused(&"the mark is not applied on this node in time"));
    }
    cluster.claims.settle(client_id, epoch);
    cluster.claims.unconfirmed.borrow_mut().remove(client_id);
    debug!(
        shard = shard.id,
        client_id, epoch, "the session this claim serves recorded in the log"
    );
    Ok(())
}

/// A committed entry's claims and releases, on the owner shard of each ClientID.
pub(super) fn on_applied(shard: &Shard, cluster: &ShardCluster, entry: &AppliedEntry) {
    let me = cluster.port.node_id;
    for (op, result) in &entry.changes {
        match (op, result) {
            (
                Op::ClaimSession { client_id, node } | Op::ClaimCleanStart { client_id, node },
                OpResult::Claimed { epoch, previous },
            ) => {
                if !owns(shard, client_id) {
                    continue;
                }
                if *node == me {
                    cluster.claims.hold(client_id, *epoch);
                    let clean = matches!(op, Op::ClaimCleanStart { .. });
                    // (The table is read only when a moving copy is kept: a connect
                    // storm's claims cost no extra read.) A copy another claimant
                    // fetched is not here: that node has the session.
                    let here = shard.engine.borrow().keeps_session(client_id, || {
                        cluster.owner(client_id).map_or(0, |o| o.fresh)
                    });
                    cluster
                        .claims
                        .claimed_here(client_id, *epoch, *previous, me, clean || here);
                } else {
                    let here = {
                        let engine = shard.engine.borrow();
                        engine.has_session(client_id) || engine.is_importing(client_id)
                    };
                    cluster.claims.passed_to(client_id, *epoch, here);
                    let ended = shard
                        .engine
                        .borrow_mut()
                        .session_taken_over(now_ms(), client_id);
                    if matches!(op, Op::ClaimCleanStart { .. })
                        && !shard.engine.borrow().is_importing(client_id)
                    {
                        // A Clean Start ends the session cluster-wide: nothing to keep
                        // for the new owner, also when its request never comes (a
                        // delayed will is published now, as at any session's end).
                        shard.engine.borrow_mut().drop_session(now_ms(), client_id);
                    } else {
                        // Kept for the new owner's fetch as a moving copy, also when
                        // that fetch came while this node was down (it restarted with
                        // the session in its store).
                        takeover::park(shard, client_id, (*node, *epoch));
                    }
                    if ended {
                        SessionMetrics::add(&cluster.port.sessions.taken_over_here);
                        debug!(
                            shard = shard.id,
                            client_id,
                            new_owner = node,
                            "session taken over by another node: connection ended"
                        );
                    }
                }
            }
            (
                Op::ReleaseSession {
                    client_id,
                    node,
                    epoch,
                },
                OpResult::Released,
            ) if *node == me
                && owns(shard, client_id)
                && cluster.claims.held.borrow().get(client_id) == Some(epoch) =>
            {
                cluster.claims.forget(client_id);
            }
            // The owner serves the ClientID under this claim, a session started afresh
            // or one taken in without the old owner's confirmation: a moving copy kept
            // here is never resumed. The copy handed to exactly this claim is
            // confirmed by the log (what its ghost held goes to the owner, as after
            // `DONE`; a fresh session there ignores it, having no window); an older
            // one is stale and goes.
            (
                Op::SessionFresh {
                    client_id,
                    node,
                    epoch,
                },
                OpResult::MarkedFresh(true),
            ) if owns(shard, client_id) => {
                let to = (*node, *epoch);
                let mut engine = shard.engine.borrow_mut();
                if engine.moving_to(client_id) == Some(to) && !engine.has_session(client_id) {
                    engine.moving_done(now_ms(), client_id, to);
                    drop(engine);
                    shard.flush_outbox();
                    debug!(
                        shard = shard.id,
                        client_id,
                        owner = node,
                        "a moving copy confirmed by the log: its owner serves the session"
                    );
                } else {
                    drop(engine);
                    takeover::drop_stale_copy(shard, client_id, *epoch);
                }
            }
            _ => {}
        }
    }
}

/// The MQTT address of member `node` (from its `NodeMeta`), if it has one.
fn mqtt_address(cluster: &ShardCluster, node: tessera_raft::NodeId) -> Option<String> {
    if !cluster.handle().members().contains_key(&node) {
        return None;
    }
    let nodes = cluster.handle().tables().and_then(|t| t.nodes()).ok()?;
    nodes
        .into_iter()
        .find(|(id, _)| *id == node)
        .map(|(_, info)| info.mqtt_addr)
        .filter(|a| !a.is_empty())
}

fn owns(shard: &Shard, client_id: &str) -> bool {
    tessera_shard::hash::shard_for(client_id.as_bytes(), shard.shard_count) == shard.id
}

/// Releases the claims of sessions that ended here and stayed gone for
/// [`RELEASE_LINGER_MS`], and ends the connections of held ClientIDs when the node has
/// been out of touch with its cluster for longer than its session lease. Called every
/// shard tick.
pub(super) fn tick(shard: &Shard, cluster: &ShardCluster) {
    let now = now_ms();
    fence(shard, cluster, now);
    // Sessions handed out and never confirmed are kept only as long as they would have
    // lived here.
    // Ghosts and dedup windows of sessions that moved (`engine` module `moved`).
    shard.engine.borrow_mut().expire_moved(now);
    for client_id in shard.engine.borrow_mut().expire_moving(now) {
        warn!(
            shard = shard.id,
            client_id = %client_id,
            "a session handed to another node was never confirmed there and has expired here"
        );
    }
    let ended = shard.engine.borrow_mut().take_ended_sessions();
    let claims = &cluster.claims;
    for client_id in ended {
        if claims.held.borrow().contains_key(client_id.as_str()) {
            claims.releasing.borrow_mut().insert(
                client_id.as_str().to_owned(),
                Release::Due(now + RELEASE_LINGER_MS),
            );
        }
    }
    let mut due: Vec<String> = claims
        .releasing
        .borrow()
        .iter()
        .filter(|(_, r)| matches!(r, Release::Due(t) if *t <= now))
        .map(|(c, _)| c.clone())
        .collect();
    // Released in ClientID order, not the map's (which differs per process, and the
    // releases are proposals in this order).
    due.sort_unstable();
    for client_id in due {
        if shard.engine.borrow().has_session(&client_id) {
            // A session came back (a reconnect here): the claim stays.
            claims.releasing.borrow_mut().remove(&client_id);
            continue;
        }
        let Some(epoch) = claims.held.borrow().get(&client_id).copied() else {
            claims.releasing.borrow_mut().remove(&client_id);
            continue;
        };
        let op = Op::ReleaseSession {
            client_id: client_id.clone(),
            node: cluster.port.node_id,
            epoch,
        };
        match cluster.handle().propose(op) {
            // The answer is not awaited: the applied entry clears the claim
            // (`on_applied`); until then the claim is not trusted.
            Ok(_) => {
                SessionMetrics::add(&cluster.port.sessions.releases);
                claims
                    .releasing
                    .borrow_mut()
                    .insert(client_id, Release::Proposed);
            }
            Err(e) => {
                warn!(
                    shard = shard.id,
                    client_id, "release not proposed, retrying later: {e}"
                );
                claims
                    .releasing
                    .borrow_mut()
                    .insert(client_id, Release::Due(now + RELEASE_LINGER_MS));
            }
        }
    }
}

/// Client input is about to be handled (per read, `conn::handle_input`; per packet in
/// the simulation): when the lease check of the shard tick is overdue (it last ran
/// more than two ticks ago: the process was stopped, SIGSTOP or a frozen VM, or
/// starved), it runs first. A node stopped past its lease resumes with the route
/// table and claims it had, while the cluster has given its ClientIDs to others and
/// acknowledged SUBSCRIBEs it never heard of (a route barrier waits out an unreachable
/// member's lease, taking it as fenced by then); what its clients sent meanwhile,
/// read before its tick, was served on those: matched against stale routes and
/// acknowledged (harness sync seed 307: node 3 paused 8 s, c5 subscribed `t/#` on node
/// 1 meanwhile, and at resume c1's queued QoS 2 publications on node 3 were
/// acknowledged and never forwarded to node 1). Now such a node ends its held
/// ClientIDs' connections first (out of contact, or stopped for longer than the lease:
/// [`fence`]), and what they sent is not handled (a QoS 1/2 publication is sent again
/// by its client after a reconnect, which the claim serves only in contact). Costs a
/// compare per read; the check itself (a `watch` borrow) only when overdue.
pub(super) fn before_input(shard: &Shard, now: u64) {
    let Some(cluster) = shard.cluster() else {
        return;
    };
    let tick = super::TICK.as_millis() as u64;
    if now.saturating_sub(cluster.claims.lease_checked_ms.get()) > 2 * tick {
        fence(shard, &cluster, now);
    }
}

/// The session lease ran out: this node has not heard from its cluster for
/// `cluster.session_lease_ms`, so the majority may have given its ClientIDs to other
/// nodes (whose takeovers wait out this lease when this node does not answer). The
/// connections of the ClientIDs it holds end (v5: DISCONNECT 0x9C), and CONNECTs here are
/// refused until contact is back (`claim`). Their sessions stay for a later takeover.
fn fence(shard: &Shard, cluster: &ShardCluster, now: u64) {
    let lease = cluster.port.session_lease;
    // The shard stood still for longer than the lease since the last check (a stopped
    // process): whatever its contact says now (the control thread may have heard from
    // the leader already), the cluster may have given its ClientIDs away and passed
    // it over in route barriers meanwhile, and the route changes for its engine may
    // still wait in its channel. So it fences as if out of contact.
    let last = cluster.claims.lease_checked_ms.replace(now);
    // Stood still past two ticks: the holds of moved-in sessions' windows do not count
    // that time (`Engine::stood_still`).
    if last != 0 && now.saturating_sub(last) > 2 * super::TICK.as_millis() as u64 {
        shard.engine.borrow_mut().stood_still(last, now);
    }
    let stalled = last != 0 && now.saturating_sub(last) > lease.as_millis() as u64;
    if !stalled && cluster.handle().in_contact(lease) {
        return;
    }
    let held = cluster.claims.held.borrow();
    if held.is_empty() {
        return;
    }
    let ended = shard
        .engine
        .borrow_mut()
        .fence(now, |client_id| held.contains_key(client_id));
    if ended > 0 {
        SessionMetrics::add_n(&cluster.port.sessions.fenced, ended as u64);
        warn!(
            shard = shard.id,
            connections = ended,
            "no contact with the cluster for longer than the session lease ({lease:?}): \
             connections ended, their ClientIDs may be given to other nodes"
        );
    }
}
