//! The node-level route table: which other nodes have subscribers to a filter, as the
//! raft state machine's `routes` table says, stamped with the applied log index it
//! reflects.
//!
//! One lives on the control thread (the forwarder matches each publication a shard hands
//! it against it, once, and sends it once per matching node). It also tells the
//! forwarder when a filter gets its first other node or loses its last
//! ([`Transition`]): only then do the shards' route tables change (the remote id joins
//! or leaves the filter's shard set), so a filter routed by ten nodes costs each shard
//! one entry.
//!
//! Shared-subscription routes (`group` set) are kept apart; this node's own routes are
//! not in the table (its shards route locally).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tessera_raft::NodeId;
use tessera_shard::trie::Trie;

/// A change of "some other node routes this filter".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The filter's first other node.
    Add(String),
    /// The filter's last other node left.
    Remove(String),
    /// The other nodes with members of `$share/{group}/{filter}` changed: `nodes` now.
    Share {
        /// The group.
        group: String,
        /// The filter.
        filter: String,
        /// Other nodes with members.
        nodes: u32,
    },
}

/// Filter -> other nodes with subscribers.
#[derive(Debug)]
pub struct NodeRoutes {
    me: NodeId,
    /// Plain routes of other nodes.
    trie: Trie<NodeId, ()>,
    /// Other nodes per plain filter (the trie's keys, countable).
    nodes: HashMap<String, BTreeSet<NodeId>>,
    /// Shared-subscription routes: (group, filter) -> nodes with members.
    shared: BTreeMap<(String, String), BTreeSet<NodeId>>,
    /// The log index the table reflects.
    applied: u64,
}

impl NodeRoutes {
    /// An empty table of node `me`.
    pub fn new(me: NodeId) -> NodeRoutes {
        NodeRoutes {
            me,
            trie: Trie::new(),
            nodes: HashMap::new(),
            shared: BTreeMap::new(),
            applied: 0,
        }
    }

    /// The applied index the table reflects.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Stamps the table with `index` (after applying an entry's changes).
    pub fn stamp(&mut self, index: u64) {
        self.applied = self.applied.max(index);
    }

    /// Applies one route change of the log. Returns the transition it makes.
    pub fn apply(
        &mut self,
        node: NodeId,
        filter: &str,
        group: Option<&str>,
        add: bool,
    ) -> Option<Transition> {
        if node == self.me {
            return None;
        }
        if let Some(g) = group {
            let key = (g.to_owned(), filter.to_owned());
            let changed = if add {
                self.shared.entry(key.clone()).or_default().insert(node)
            } else if let Some(set) = self.shared.get_mut(&key) {
                let removed = set.remove(&node);
                if set.is_empty() {
                    self.shared.remove(&key);
                }
                removed
            } else {
                false
            };
            let nodes = self.shared.get(&key).map_or(0, |s| s.len() as u32);
            return changed.then_some(Transition::Share {
                group: key.0,
                filter: key.1,
                nodes,
            });
        }
        if add {
            if self.trie.insert(filter, node, ()).is_some() {
                return None;
            }
            let set = self.nodes.entry(filter.to_owned()).or_default();
            set.insert(node);
            (set.len() == 1).then(|| Transition::Add(filter.to_owned()))
        } else {
            self.trie.remove(filter, node)?;
            let set = self.nodes.get_mut(filter)?;
            set.remove(&node);
            if set.is_empty() {
                self.nodes.remove(filter);
                return Some(Transition::Remove(filter.to_owned()));
            }
            None
        }
    }

    /// Replaces the table with `routes` (after a snapshot was installed) and returns the
    /// transitions from what it held, so the shards can follow.
    pub fn rebuild(
        &mut self,
        routes: impl IntoIterator<Item = (NodeId, String, Option<String>)>,
        index: u64,
    ) -> Vec<Transition> {
        let before: BTreeSet<String> = self.nodes.keys().cloned().collect();
        let shared_before = std::mem::take(&mut self.shared);
        let mut fresh = NodeRoutes::new(self.me);
        for (node, filter, group) in routes {
            fresh.apply(node, &filter, group.as_deref(), true);
        }
        fresh.applied = index;
        *self = fresh;
        let after: BTreeSet<String> = self.nodes.keys().cloned().collect();
        let mut out: Vec<Transition> = after
            .difference(&before)
            .map(|f| Transition::Add(f.clone()))
            .collect();
        out.extend(
            before
                .difference(&after)
                .map(|f| Transition::Remove(f.clone())),
        );
        // Shares whose node count changed (gone ones count 0).
        for (key, set) in &self.shared {
            if shared_before.get(key).map(BTreeSet::len) != Some(set.len()) {
                out.push(Transition::Share {
                    group: key.0.clone(),
                    filter: key.1.clone(),
                    nodes: set.len() as u32,
                });
            }
        }
        for key in shared_before
            .keys()
            .filter(|k| !self.shared.contains_key(*k))
        {
            out.push(Transition::Share {
                group: key.0.clone(),
                filter: key.1.clone(),
                nodes: 0,
            });
        }
        out
    }

    /// The other nodes with subscribers matching `topic`, each once, into `out`
    /// (cleared first). Allocation-free once `out` has grown.
    pub fn match_nodes(&self, topic: &str, out: &mut Vec<NodeId>) {
        out.clear();
        self.trie.for_each_match(topic, |node, ()| {
            if !out.contains(node) {
                out.push(*node);
            }
        });
    }

    /// The other nodes with members of `$share/{group}/{filter}`.
    pub fn shared_nodes(&self, group: &str, filter: &str) -> Option<&BTreeSet<NodeId>> {
        self.shared
            .get(&(group.to_owned(), filter.to_owned()))
            .filter(|s| !s.is_empty())
    }

    /// Filters routed to other nodes (plain routes).
    pub fn filter_count(&self) -> usize {
        self.nodes.len()
    }

    /// Routes of each other node (plain and shared), for the routes-per-node metric.
    pub fn routes_per_node(&self) -> BTreeMap<NodeId, u64> {
        let mut out = BTreeMap::new();
        for set in self.nodes.values().chain(self.shared.values()) {
            for n in set {
                *out.entry(*n).or_insert(0) += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> NodeRoutes {
        NodeRoutes::new(1)
    }

    #[test]
    fn transitions_follow_the_first_and_last_other_node() {
        let mut r = routes();
        assert_eq!(
            r.apply(1, "a/+", None, true),
            None,
            "own routes are not kept"
        );
        assert_eq!(
            r.apply(2, "a/+", None, true),
            Some(Transition::Add("a/+".into()))
        );
        assert_eq!(r.apply(3, "a/+", None, true), None);
        assert_eq!(r.apply(3, "a/+", None, true), None, "a repeated add");
        let mut out = Vec::new();
        r.match_nodes("a/b", &mut out);
        out.sort();
        assert_eq!(out, vec![2, 3]);
        assert_eq!(r.apply(2, "a/+", None, false), None);
        assert_eq!(
            r.apply(3, "a/+", None, false),
            Some(Transition::Remove("a/+".into()))
        );
        assert_eq!(r.apply(3, "a/+", None, false), None, "a repeated remove");
        r.match_nodes("a/b", &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_node_matching_through_several_filters_is_listed_once() {
        let mut r = routes();
        r.apply(2, "a/#", None, true);
        r.apply(2, "a/b", None, true);
        r.apply(2, "+/b", None, true);
        let mut out = Vec::new();
        r.match_nodes("a/b", &mut out);
        assert_eq!(out, vec![2]);
    }

    #[test]
    fn shared_routes_do_not_touch_plain_routing() {
        let mut r = routes();
        let share = |nodes| {
            Some(Transition::Share {
                group: "g".into(),
                filter: "s".into(),
                nodes,
            })
        };
        assert_eq!(r.apply(2, "s", Some("g"), true), share(1));
        assert_eq!(r.apply(3, "s", Some("g"), true), share(2));
        assert_eq!(r.apply(3, "s", Some("g"), true), None, "a repeated add");
        assert_eq!(r.shared_nodes("g", "s").map(|s| s.len()), Some(2));
        assert_eq!(r.apply(3, "s", Some("g"), false), share(1));
        let mut out = Vec::new();
        r.match_nodes("s", &mut out);
        assert!(out.is_empty());
        assert_eq!(r.routes_per_node().get(&2), Some(&1));
    }

    #[test]
    fn a_rebuild_reports_the_difference() {
        let mut r = routes();
        r.apply(2, "x", None, true);
        r.apply(2, "y", None, true);
        let mut t = r.rebuild(
            vec![(3, "y".to_string(), None), (3, "z".to_string(), None)],
            42,
        );
        t.sort_by_key(|t| format!("{t:?}"));
        assert_eq!(
            t,
            vec![Transition::Add("z".into()), Transition::Remove("x".into())]
        );
        assert_eq!(r.applied(), 42);
        let mut out = Vec::new();
        r.match_nodes("y", &mut out);
        assert_eq!(out, vec![3]);
    }
}
