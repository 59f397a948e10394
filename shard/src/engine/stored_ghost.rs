//! A moved session's confirmed ghost in the store (`impl Engine`; issue 15, cause E of
//! docs/ARCHITECTURE.md "A store with `sync` durability").
//!
//! When the node a session moved to confirms it stored it, the old owner deletes the
//! session's records (`drop_moving`) and keeps a confirmed ghost (`moved`) for
//! [`MOVED_WINDOW_MS`]: what other nodes matched against this node's routes for the
//! session is sent on to its new owner, and the publisher's acknowledgement waits for
//! that. A ghost in memory only was lost at a crash within the window while the
//! session's delete was committed: the restarted node had neither, its boot route
//! reconciliation removed the session's routes, and copies still held for it by
//! other nodes (matched against its earlier life's routes) matched nothing and were
//! acknowledged: lost (sim seed 212 under `sync`).
//!
//! So the ghost goes to the store in the commit of the session's delete
//! ([`StoreOp::PutGhost`]: ClientID, new owner and claim epoch, plain subscriptions
//! with their options, the confirmation's time, the marks it filters with), and a
//! restart restores it as a confirmed ghost for what is left of its window (its time
//! is stored as wall-clock time, so the downtime counts): its filters are in the
//! trie under `GHOST_BASE` (so in `Engine::subscribed_filters`, which keeps their
//! routes through the boot reconciliation), they are not `fresh` (so copies matched
//! for the earlier life reach them), and what matches is redirected as before, the
//! forwarded batch's answer waiting for the new owner's. Its end (expiry, the
//! session back here, a clean start) deletes the record ([`StoreOp::DelGhost`]),
//! with the next commit that has ops anyway: a record that outlives its ghost is
//! either past its window at the next start (dropped there), or of a ClientID
//! whose session is stored here (dropped there: the session is newer), or of a
//! session that ended (its redirects reach no session with a window at the new
//! owner, which drops them, as it would have).
//!
//! What the ghost held before the confirmation is stored with its session's records
//! (`moved::store_held`), which go with the confirmation; a confirmed ghost holds
//! nothing (it sends at once), and with a store a QoS 1/2 copy it sends on (the held
//! ones at the confirmation among them) is stored until the new owner accepted it and
//! sent again after a restart (`moved::send_on`, `Engine::restore_redirects`): the
//! marks that say this node handled it are stored, so a retry would not bring it
//! again. Bounds: a node restarted outside a cluster drops its ghosts (and deletes
//! their stored redirects).

use tessera_proto::{Str, topic};

use super::Engine;
use super::moved::{
    CLASSES, Expiring, GHOST_BASE, Ghost, MOVED_WINDOW_MS, Window, decode_marks, encode_marks,
};
use crate::message::SessionUid;
use crate::store::{GhostState, StoreOp};

impl Engine {
    /// The ghost of `client_id` was just confirmed at `now_ms`: with persistence on,
    /// its record goes into the current epoch (the one of the session's delete).
    pub(super) fn store_ghost(&mut self, now_ms: u64, client_id: &Str) {
        let Some(p) = self.persist.as_mut() else {
            return;
        };
        // A put replaces the record: an older delete still waiting must not follow it.
        p.ghost_dels.retain(|c| c != client_id);
        let Some(&slot) = self.moved.by_client.get(client_id) else {
            return;
        };
        let Some(Some(g)) = self.moved.ghosts.get_mut(slot as usize) else {
            return;
        };
        if !g.confirmed {
            return;
        }
        g.stored = true;
        let gidx = GHOST_BASE + slot;
        let subscriptions = g
            .filters
            .iter()
            .filter_map(|f| self.subscriptions.get(f, gidx).map(|e| (f.clone(), *e)))
            .collect();
        let mut window = Vec::new();
        let marks = g.seen.as_ref().map_or(&[][..], |w| &w.marks[..]);
        encode_marks(&mut window, marks, [].iter());
        let state = GhostState {
            client_id: g.client_id.clone(),
            to: g.to,
            subscriptions,
            confirmed_ms: now_ms,
            window,
        };
        self.store_op(StoreOp::PutGhost(Box::new(state)));
    }

    /// The stored ghost of `client_id` went: its record is deleted with the next
    /// commit that has ops.
    pub(super) fn unstore_ghost(&mut self, client_id: &Str) {
        if let Some(p) = self.persist.as_mut()
            && !p.ghost_dels.contains(client_id)
        {
            p.ghost_dels.push(client_id.clone());
        }
    }

    /// Restores the ghosts the store kept (after the sessions), each for what is left
    /// of its window; the others' records are deleted.
    pub(super) fn restore_ghosts(&mut self, now_ms: u64, mut ghosts: Vec<GhostState>) {
        // The expiry queue is in due order, and these come first.
        ghosts.sort_by_key(|g| g.confirmed_ms);
        for g in ghosts {
            // A clock that went back does not stretch the window.
            let due = g
                .confirmed_ms
                .saturating_add(MOVED_WINDOW_MS)
                .min(now_ms + MOVED_WINDOW_MS);
            let stale = due <= now_ms
                || self.remote.is_none()
                || self.by_client_id.contains_key(&g.client_id)
                || self.moved.by_client.contains_key(&g.client_id);
            let filters: Vec<_> = g
                .subscriptions
                .into_iter()
                .filter(|(f, _)| !topic::is_shared(f))
                .collect();
            if stale || filters.is_empty() {
                self.unstore_ghost(&g.client_id);
                continue;
            }
            let marks = match decode_marks(&g.window) {
                Some((marks, _)) => marks,
                None => {
                    // Without its marks the ghost may send on a copy the session got
                    // (a duplicate), never drop one: kept, with a warning.
                    tracing::warn!(
                        shard = self.shard,
                        client_id = %g.client_id,
                        "restore: a stored ghost's window does not decode; restored without it"
                    );
                    Vec::new()
                }
            };
            let slot = self.ghost_slot();
            let gidx = GHOST_BASE + slot;
            for (f, e) in &filters {
                // As a restored session's: the other shards restore the route
                // themselves (`recover`), and it is not fresh.
                self.subscriptions.insert(f, gidx, *e);
                self.routes.insert(f, self.shard, ());
            }
            self.moved.ghost_gen += 1;
            let number = self.moved.ghost_gen;
            self.moved.ghosts[slot as usize] = Some(Ghost {
                client_id: g.client_id.clone(),
                number,
                to: g.to,
                filters: filters.into_iter().map(|(f, _)| f).collect(),
                confirmed: true,
                held: Vec::new(),
                stores_held: false,
                held_seqs: Vec::new(),
                window_parts: 0,
                seen: Some(Window::new(SessionUid(0), marks, [u64::MAX; CLASSES], [])),
                stored: true,
                // Not stored: a restored ghost passes redirects on, as before.
                passes_redirects: true,
                earlier: None,
                fresh_here: false,
                left_ms: None,
                fetched: false,
            });
            tracing::debug!(
                shard = self.shard,
                client_id = %g.client_id,
                to_node = g.to.0,
                left_ms = due - now_ms,
                "restore: a moved session's ghost"
            );
            self.moved.by_client.insert(g.client_id.clone(), slot);
            self.moved
                .expiring
                .push_back((due, Expiring::Ghost(slot, number)));
        }
    }
}

#[cfg(test)]
mod tests {
    //! Goal: a confirmed ghost outlives a crash of its node, so a copy another node
    //! matched for the session against this node's earlier life still follows the
    //! session (and the batch's answer waits for the new owner), and its end deletes
    //! its record. Method: one engine on a real store (LMDB in a temporary
    //! directory); the test plays the driver (commits each batch, crashes by
    //! dropping the env, restarts by recovering the directory into a new engine).

    use bytes::Bytes;
    use heed::{Env, WithoutTls};
    use tessera_proto::{ProtocolVersion, QoS, Str};

    use crate::engine::testing::{connect_packet, drain, engines, subscribe_packet};
    use crate::engine::{Engine, Limits};
    use crate::mesh::{MeshMsg, PubId, ShardId};
    use crate::message::{Message, SessionUid};
    use crate::store::{DirLock, META_GHOST_PREFIX, open_dbs, recover};

    const MAP_BYTES: usize = 16 << 20;
    const WALL_BASE_MS: u64 = 1_700_000_000_000;
    const V: ProtocolVersion = ProtocolVersion::V3_1_1;

    use super::super::testing::Dir;

    fn temp_dir(name: &str) -> Dir {
        super::super::testing::temp_dir_in("stored-ghost", name)
    }

    /// A broker of one shard in a cluster on a data directory, driven by hand.
    struct Node {
        e: Engine,
        remote: ShardId,
        env: Env<WithoutTls>,
        _lock: DirLock,
    }

    impl Node {
        /// Starts on `dir` at engine time `now_ms` as the broker does: recover, then
        /// restore (the wall clock at engine time 0 is the same in every life, so
        /// `now_ms` is the wall clock too).
        fn boot(dir: &Dir, now_ms: u64) -> Node {
            let (lock, mut envs, mut recovered) =
                recover(&dir.0, 1, MAP_BYTES, WALL_BASE_MS).unwrap();
            let mut e = engines(1, &Limits::default()).remove(0);
            let remote = e.enable_remote().expect("room for the remote id");
            e.set_origin(7);
            e.enable_persistence(true);
            e.restore(now_ms, recovered.remove(0));
            Node {
                e,
                remote,
                env: envs.remove(0).0,
                _lock: lock,
            }
        }

        /// Commits what the shard stored so far, as its writer thread would.
        fn commit(&mut self) {
            while let Some(batch) = self.e.take_store_batch() {
                let dbs = open_dbs(&self.env).unwrap();
                let mut txn = self.env.write_txn().unwrap();
                for op in &batch.ops {
                    crate::store::apply(&dbs, &mut txn, op, WALL_BASE_MS).unwrap();
                }
                txn.commit().unwrap();
                self.e.store_committed(batch.epoch);
            }
        }

        /// `kill -9`: what is not committed is gone.
        fn crash(self) {
            self.env.prepare_for_closing().wait();
        }

        /// What the shard gave the forwarder since the last call.
        fn forwarder_out(&mut self) -> Vec<MeshMsg> {
            std::mem::take(&mut self.e.outbox[usize::from(self.remote)])
        }

        /// How many ghost records the store holds.
        fn stored_ghosts(&self) -> usize {
            let dbs = open_dbs(&self.env).unwrap();
            let rtxn = self.env.read_txn().unwrap();
            dbs.meta
                .prefix_iter(&rtxn, META_GHOST_PREFIX)
                .unwrap()
                .count()
        }
    }

    /// A persistent session "s" subscribed to "t" moves to node 2 (claim epoch 99) at
    /// engine time 2,000, confirmed at 2,100; everything committed.
    fn moved_off(dir: &Dir) -> Node {
        let mut n = Node::boot(dir, 1_000);
        let s = n.e.connect(1_000, connect_packet(V, "s", false), false);
        n.e.handle_packet(1_000, s, subscribe_packet("t", QoS::ExactlyOnce));
        drain(&mut n.e, s, V);
        n.commit();
        assert!(
            n.e.export_session(2_000, "s", WALL_BASE_MS, (2, 99))
                .is_some()
        );
        n.commit();
        assert!(n.e.moving_done(2_100, "s", (2, 99)));
        n.commit();
        n.forwarder_out();
        n
    }

    /// A QoS 1 copy another node matched against this node's earlier routes.
    fn earlier_copy(payload: &'static str) -> MeshMsg {
        MeshMsg::Forwarded {
            message: Message {
                topic: Str::from_static("t"),
                payload: Bytes::from_static(payload.as_bytes()),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: None,
                expires_at_ms: None,
                origin: Some(SessionUid::remote(3)),
                received_us: 0,
            },
            mark: None,
            ack: None,
            id: Some(PubId {
                origin: 5,
                shard: 0,
                seq: 1 << 62 | 1,
            }),
            earlier_life: true,
            routes_index: 0,
        }
    }

    #[test]
    fn a_confirmed_ghost_survives_a_crash_and_sends_on_what_was_held_for_its_session() {
        let dir = temp_dir("survives");
        let n = moved_off(&dir);
        assert_eq!(n.e.ghost_count(), 1);
        assert_eq!(n.stored_ghosts(), 1, "stored with the session's delete");
        n.crash();

        // Restarted 3 s later, without the session: the ghost is back, its route kept.
        let mut n = Node::boot(&dir, 5_000);
        assert!(
            n.e.client_ids().is_empty(),
            "the session's records are gone"
        );
        assert_eq!(n.e.ghost_count(), 1);
        assert_eq!(n.e.subscribed_filters(), vec![Str::from_static("t")]);

        // A batch held for this node while it was down arrives.
        let token = n.e.begin_forward_batch().expect("a ghost opens a token");
        let remote = n.remote;
        n.e.handle_mesh(5_000, remote, earlier_copy("held"));
        n.e.end_forward_batch(token);
        n.commit();
        let redirects: Vec<_> = n
            .forwarder_out()
            .into_iter()
            .filter_map(|m| match m {
                MeshMsg::Redirect {
                    client_id,
                    node,
                    epoch,
                    message,
                    ack,
                    ..
                } => Some((client_id, node, epoch, message.payload, ack)),
                _ => None,
            })
            .collect();
        // (With a token of its own: the copy is stored until the new owner accepted
        // it, `moved::send_on`.)
        let accepted = redirects.first().and_then(|r| r.4).expect("a token");
        assert_eq!(
            redirects,
            vec![(
                Str::from_static("s"),
                2,
                99,
                Bytes::from_static(b"held"),
                Some(accepted)
            )],
            "sent on to the session's new owner"
        );
        assert!(
            n.e.take_forwards_done().is_empty(),
            "the batch is answered only once the new owner accepted the copy"
        );
        n.e.handle_mesh(5_001, remote, MeshMsg::Ack { token: accepted });
        assert_eq!(n.e.take_forwards_done(), vec![token]);
        // (The stored copy's delete.)
        n.commit();

        // The window ends 30 s after the confirmation: the ghost goes, and its
        // record with the next commit that has ops (none of its own).
        n.e.expire_moved(32_099);
        assert_eq!(n.e.ghost_count(), 1);
        n.e.expire_moved(32_100);
        assert_eq!(n.e.ghost_count(), 0);
        assert!(
            n.e.subscribed_filters().is_empty(),
            "its route goes with it"
        );
        assert!(n.e.take_store_batch().is_none(), "no commit of its own");
        let q = n.e.connect(32_200, connect_packet(V, "q", false), false);
        drain(&mut n.e, q, V);
        n.commit();
        assert_eq!(n.stored_ghosts(), 0, "deleted with the next commit");
    }

    #[test]
    fn a_stored_ghost_past_its_window_or_behind_a_session_is_not_restored() {
        let dir = temp_dir("past");
        let n = moved_off(&dir);
        n.crash();
        // Down for longer than the window: dropped at the start, and its record.
        let mut n = Node::boot(&dir, 32_100);
        assert_eq!(n.e.ghost_count(), 0);
        assert!(n.e.subscribed_filters().is_empty());
        let q = n.e.connect(32_200, connect_packet(V, "q", false), false);
        drain(&mut n.e, q, V);
        n.commit();
        assert_eq!(n.stored_ghosts(), 0);
        n.crash();

        // A record that outlived its ghost (its delete not committed) while the
        // session came back: the session wins.
        let dir = temp_dir("behind");
        let mut n = moved_off(&dir);
        let s = n.e.connect(3_000, connect_packet(V, "s", false), false);
        drain(&mut n.e, s, V);
        n.commit();
        assert_eq!(n.e.ghost_count(), 0);
        let dbs = open_dbs(&n.env).unwrap();
        let mut txn = n.env.write_txn().unwrap();
        let op = crate::store::StoreOp::PutGhost(Box::new(crate::store::GhostState {
            client_id: Str::from_static("s"),
            to: (2, 99),
            subscriptions: vec![(
                Str::from_static("t"),
                crate::session::SubscriptionEntry {
                    options: tessera_proto::SubscriptionOptions::qos(QoS::AtLeastOnce),
                    subscription_id: None,
                    fresh: false,
                },
            )],
            confirmed_ms: 2_100,
            window: Vec::new(),
        }));
        crate::store::apply(&dbs, &mut txn, &op, WALL_BASE_MS).unwrap();
        txn.commit().unwrap();
        n.crash();
        let n = Node::boot(&dir, 4_000);
        assert_eq!(n.e.client_ids(), vec![Str::from_static("s")]);
        assert_eq!(n.e.ghost_count(), 0, "not beside its own session");
    }

    #[test]
    fn a_stored_ghost_follows_its_client_id_when_the_shard_count_changes() {
        let dir = temp_dir("reshard");
        let n = moved_off(&dir);
        n.crash();
        let owner = crate::hash::shard_for(b"s", 3);
        let (_lock, _envs, recovered) = recover(&dir.0, 3, MAP_BYTES, WALL_BASE_MS).unwrap();
        for (k, r) in recovered.iter().enumerate() {
            let ghosts: Vec<_> = r.ghosts.iter().map(|g| g.client_id.clone()).collect();
            let routes: Vec<_> = r.routes.iter().map(|(f, s)| (f.as_str(), *s)).collect();
            if k == owner {
                assert_eq!(ghosts, vec![Str::from_static("s")]);
                assert!(routes.is_empty());
            } else {
                assert!(ghosts.is_empty());
                assert_eq!(routes, vec![("t", owner as ShardId)], "routed to its shard");
            }
        }
    }

    #[test]
    fn a_corrupt_ghost_record_is_skipped_with_a_warning() {
        let dir = temp_dir("corrupt");
        let n = moved_off(&dir);
        let dbs = open_dbs(&n.env).unwrap();
        let mut txn = n.env.write_txn().unwrap();
        let mut key = META_GHOST_PREFIX.to_vec();
        key.extend_from_slice(b"x");
        dbs.meta.put(&mut txn, &key, b"\x01\x00garbage").unwrap();
        txn.commit().unwrap();
        assert_eq!(n.stored_ghosts(), 2);
        n.crash();
        let n = Node::boot(&dir, 5_000);
        assert_eq!(n.e.ghost_count(), 1, "the good one is restored");
        assert_eq!(n.stored_ghosts(), 1, "the corrupt one is deleted");
    }
}
