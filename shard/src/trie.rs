//! The topic-filter trie: filter -> entries, matched against a topic name by MQTT rules.
//!
//! Every shard holds three of these, each touched only by its own thread:
//! - the shard-local **subscription trie**: filter -> the sessions on this shard subscribed
//!   to it (key: the session's index on the shard, value: its subscription options);
//! - the **route table**, a replicated read-mostly copy on every shard of "filter -> which
//!   shards have at least one subscriber" (key: shard id, value: `()`), matched once per
//!   PUBLISH by [`route_match`] to learn which shards to forward to;
//! - the **retained table** replica, a trie of topic *names* (no wildcard levels; key `()`,
//!   value: the retained entry), walked the other way round by
//!   [`Trie::for_each_name_matching`]: a SUBSCRIBE's filter finds the names it matches
//!   while visiting only the matching part of the table.
//!
//! A node is one filter level. Nodes live in a `Vec` slab addressed by `u32` indices, with a
//! free list for reuse, and hold their exact-level children in a short list (a map once a
//! node is wide) plus separate `+` and `#` edges; a node's entries are the subscriptions to
//! the filter that ends there. Every walk is an iterative loop bounded by the filter's or
//! topic's depth or by the node count; nothing recurses, because depth is chosen by
//! clients. Matching keeps its explicit stack in a scratch vector inside the trie, sized at
//! construction for the deepest valid topic, so matching does not allocate.
//!
//! What this module does not do:
//! - Validate filters. Callers validate with `tessera_proto::topic::validate_topic_filter`
//!   (and strip `$share/{group}/` with `parse_shared`) before inserting; [`Trie::insert`]
//!   asserts validity because reaching it with an invalid filter is a programmer error.
//! - Shared subscriptions, no-local, QoS downgrade, subscription identifiers or merging a
//!   session's overlapping subscriptions (MQTT 5.0 section 3.3.4): matching reports every
//!   matching (filter, key) entry, and the caller applies the options. A session subscribed
//!   to both `a/b` and `$share/g/a/b` needs a key that tells the two apart, such as
//!   `(session, share_group)`, since a (filter, key) pair holds one value.
//! - Route bookkeeping across shards: [`Trie::filter_len`] exposes the 0 -> 1 and 1 -> 0
//!   transitions that the shard core broadcasts; the broadcast itself lives elsewhere.
//! - Thread sharing: the trie is `Send` but not `Sync` (the scratch stack is a `Cell`). Each
//!   shard owns its tries outright, as the shared-nothing design requires.
//! - Persistence: [`Trie::for_each`] lists the contents for the store and admin listings.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::iter::FusedIterator;

use tessera_proto::topic::{TOPIC_LEVELS_MAX, levels, validate_topic_filter};

/// Index of a node in the slab.
type NodeId = u32;

/// The root: the position before a filter's first level. It is never freed, holds no
/// entries (a valid filter has at least one level) and has no parent.
const ROOT: NodeId = 0;

/// The most nodes a trie can hold, root included: node indices are `u32`. Reaching it
/// would take billions of distinct filter levels, far past any memory budget, so it is an
/// assertion rather than an error.
const NODE_COUNT_MAX: usize = u32::MAX as usize;

/// Below this capacity, vectors and maps that have emptied out keep their memory: shrinking
/// tiny allocations would cost more than it saves.
const SPARSE_CAPACITY_MIN: usize = 8;

/// How a node hangs off its parent, recorded so pruning can cross-check the level it is
/// removing against the edge that actually leads to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChildEdge {
    /// An exact level, stored as a key in the parent's `children`.
    Level,
    /// The parent's `+` edge.
    Plus,
    /// The parent's `#` edge.
    Hash,
}

/// One filter level. A node is live while it is the root, has entries, or has a child;
/// removal prunes nodes that are none of these, so the trie holds no dead branches.
#[derive(Debug)]
struct Node<K, V> {
    /// Exact-level children, keyed by the level's text.
    children: Children,
    /// The child for a `+` level.
    plus: Option<NodeId>,
    /// The child for a `#` level; always a leaf, since `#` ends a valid filter.
    hash: Option<NodeId>,
    /// The entries of the filter that ends at this node, at most one per key, in no
    /// particular order. Usually few, so insert, remove and get scan linearly; a filter
    /// with a very large fan-out makes those O(fan-out) (matching is O(fan-out) anyway).
    entries: Vec<(K, V)>,
    /// The parent and the edge from it; `None` only for the root and for free slots.
    parent: Option<(NodeId, ChildEdge)>,
}

impl<K, V> Node<K, V> {
    /// A node with no children and no entries; allocates nothing.
    fn new(parent: Option<(NodeId, ChildEdge)>) -> Self {
        Node {
            children: Children::new(),
            plus: None,
            hash: None,
            entries: Vec::new(),
            parent,
        }
    }

    /// True if the node carries nothing and, unless it is the root, should be pruned.
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
    }
}

/// A topic-filter trie mapping each (filter, key) pair to a value, matched against topic
/// names by MQTT rules. Three live on every shard for the shard's lifetime: the subscription
/// trie (`Trie<u32, options>`, sessions on this shard), the route table
/// (`Trie<u16, ()>`, shards with a subscriber) and the retained table (`Trie<(), entry>`,
/// topic names). Not `Sync`: it belongs to one shard thread.
///
/// Filters passed in are expected to be valid topic filters (see the module docs); keys are
/// compared with `==` and kept at most once per filter.
pub struct Trie<K, V> {
    /// The slab. Index [`ROOT`] is the root; free slots hold empty nodes.
    nodes: Vec<Node<K, V>>,
    /// Slots of `nodes` that are free for reuse.
    free: Vec<NodeId>,
    /// Total entries over all filters.
    len: usize,
    /// Nodes with at least one entry, i.e. distinct filters in use.
    filter_count: usize,
    /// The match stack, kept between calls so its capacity is reused: taken out at the
    /// start of [`Trie::for_each_match`] and put back at the end. Each frame is a node and
    /// the byte offset in the topic of the next level to consume (past the end once all
    /// levels are consumed).
    scratch: Cell<Vec<(NodeId, usize)>>,
}

impl<K: Copy + Eq, V> Trie<K, V> {
    /// An empty trie: the root node and a match stack sized for the deepest valid topic,
    /// so matching topics of up to [`TOPIC_LEVELS_MAX`] levels never allocates.
    pub fn new() -> Self {
        Trie {
            nodes: vec![Node::new(None)],
            free: Vec::new(),
            len: 0,
            filter_count: 0,
            // Matching pushes at most two frames per node popped and pops depth-first, so
            // the stack holds at most one pending frame per topic level plus one.
            scratch: Cell::new(Vec::with_capacity(TOPIC_LEVELS_MAX + 1)),
        }
    }

    /// Inserts or replaces the entry of `key` under `filter`, creating the filter's nodes
    /// as needed. Returns the previous value if `key` already had one under this filter.
    ///
    /// # Panics
    /// If `filter` is not a valid topic filter of at most [`TOPIC_LEVELS_MAX`] levels: the
    /// caller validates client input first, so this is a programmer error.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        // SUBSCRIBE is not the hot path, and a malformed filter in the trie (a `#` with
        // children, say) would silently break matching, so the second scan is worth it.
        assert!(
            validate_topic_filter(filter, TOPIC_LEVELS_MAX).is_ok(),
            "invalid topic filter reached the trie: {filter:?}"
        );
        let mut node = ROOT;
        // Bounded by the filter's depth, which validation bounded by TOPIC_LEVELS_MAX.
        for level in levels(filter) {
            node = self.child_or_insert(node, level);
        }
        let entries = &mut self.nodes[node as usize].entries;
        if let Some((_, old)) = entries.iter_mut().find(|(k, _)| *k == key) {
            return Some(std::mem::replace(old, value));
        }
        if entries.is_empty() {
            self.filter_count += 1;
        }
        entries.push((key, value));
        self.len += 1;
        None
    }

    /// Removes `key`'s entry under `filter` and returns its value, or `None` if there was
    /// none. If that leaves the filter with no entries, nodes that no longer lead anywhere
    /// are pruned, walking up the parent links one level of `filter` at a time.
    pub fn remove(&mut self, filter: &str, key: K) -> Option<V> {
        let node = self.find(filter)?;
        let entries = &mut self.nodes[node as usize].entries;
        let index = entries.iter().position(|(k, _)| *k == key)?;
        let (_, value) = entries.swap_remove(index);
        shrink_vec_if_sparse(entries);
        let now_empty = entries.is_empty();
        assert!(self.len > 0, "entry count underflow");
        self.len -= 1;
        if now_empty {
            assert!(self.filter_count > 0, "filter count underflow");
            self.filter_count -= 1;
            self.prune(node, filter);
        }
        Some(value)
    }

    /// The value of `key`'s entry under exactly `filter` (no wildcard matching), if any.
    pub fn get(&self, filter: &str, key: K) -> Option<&V> {
        let node = self.find(filter)?;
        self.nodes[node as usize]
            .entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// The value of `key`'s entry under exactly `filter`, mutably.
    pub fn get_mut(&mut self, filter: &str, key: K) -> Option<&mut V> {
        let node = self.find(filter)?;
        self.nodes[node as usize]
            .entries
            .iter_mut()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// The value of some entry under exactly `filter` (the oldest one unless entries
    /// were removed since), if it has any.
    pub fn first(&self, filter: &str) -> Option<&V> {
        let node = self.find(filter)?;
        self.nodes[node as usize].entries.first().map(|(_, v)| v)
    }

    /// The number of entries under exactly `filter`. The shard core compares it before and
    /// after an insert or remove to detect the 0 -> 1 and 1 -> 0 transitions that add or
    /// remove this shard's route for the filter.
    pub fn filter_len(&self, filter: &str) -> usize {
        self.find(filter)
            .map_or(0, |node| self.nodes[node as usize].entries.len())
    }

    /// Calls `f(&key, &value)` for every entry whose filter matches the topic name `topic`
    /// (MQTT 5.0 section 4.7): `+` matches exactly one level, including an empty one; `#`
    /// matches its parent level and any number of levels below; a topic starting with `$`
    /// is not matched by a filter whose first level is `+` or `#`. Agrees with
    /// `tessera_proto::topic::matches` filter by filter, and an empty topic matches nothing.
    ///
    /// Each matching entry is reported exactly once, in no particular order; a key that has
    /// entries under several matching filters is reported once per filter. The walk is an
    /// iterative depth-first search that visits each node at most once and, for topics of
    /// up to [`TOPIC_LEVELS_MAX`] levels, does not allocate. Calling back into this trie
    /// from `f` is allowed, but the nested call allocates its own stack.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&K, &V)) {
        let Some(&first_byte) = topic.as_bytes().first() else {
            return;
        };
        // Section 4.7.2: wildcards at the first level must not reach `$` topics.
        let root_wildcards = first_byte != b'$';
        let mut stack = self.scratch.take();
        stack.clear();
        stack.push((ROOT, 0));
        let mut visited: usize = 0;
        while let Some((id, pos)) = stack.pop() {
            // Each node is reached along its one path at most once, so the loop is bounded
            // by the node count whatever the topic.
            visited += 1;
            assert!(visited <= self.nodes.len(), "trie match revisited a node");
            let node = &self.nodes[id as usize];
            let wildcards = id != ROOT || root_wildcards;
            // A `#` child matches the levels consumed so far plus whatever remains,
            // including nothing: `sport/#` matches `sport`.
            if let Some(hash) = node.hash
                && wildcards
            {
                for (k, v) in &self.nodes[hash as usize].entries {
                    f(k, v);
                }
            }
            if pos > topic.len() {
                // Every level consumed: the filter ending here matches exactly.
                for (k, v) in &node.entries {
                    f(k, v);
                }
                continue;
            }
            let (level, next) = level_at(topic, pos);
            if let Some(plus) = node.plus
                && wildcards
            {
                stack.push((plus, next));
            }
            if let Some(child) = node.children.get(level) {
                stack.push((child, next));
            }
        }
        self.scratch.set(stack);
    }

    /// The reverse of [`Trie::for_each_match`], for a trie of topic *names* (no `+` or `#`
    /// level stored, as in the retained table): calls `f(&key, &value)` for every entry whose
    /// name the topic filter `filter` matches, by the same rules (a `$` name is not matched
    /// by a first-level wildcard). Entries under `+` or `#` edges are never reported.
    ///
    /// The walk visits only the nodes on matching paths: one node per exact level, every
    /// child of a node at a `+` level, and the whole subtree below a `#`. So `#` costs the
    /// size of the table (it matches everything), but `a/b/#` costs the size of `a/b`'s
    /// subtree, not of the table. Iterative, each node at most once; the stack is the
    /// trie's scratch vector and grows only past [`TOPIC_LEVELS_MAX`] pending frames.
    /// `filter` must be a valid filter (callers validate client input); an invalid one
    /// matches what its levels read literally.
    pub fn for_each_name_matching(&self, filter: &str, mut f: impl FnMut(&K, &V)) {
        // A frame whose position is `SUBTREE` reports its node and everything below it.
        const SUBTREE: usize = usize::MAX;
        let mut stack = self.scratch.take();
        stack.clear();
        stack.push((ROOT, 0));
        let mut visited: usize = 0;
        while let Some((id, pos)) = stack.pop() {
            // Every node has one parent and each node pushes each child at most once,
            // so no node is visited twice, whatever the filter.
            visited += 1;
            assert!(
                visited <= self.nodes.len(),
                "trie name walk revisited a node"
            );
            let node = &self.nodes[id as usize];
            if pos == SUBTREE || pos > filter.len() {
                // Under a `#`, or every filter level consumed: the name ending here matches.
                for (k, v) in &node.entries {
                    f(k, v);
                }
                if pos == SUBTREE {
                    for (_, child) in node.children.iter() {
                        stack.push((child, SUBTREE));
                    }
                }
                continue;
            }
            let (level, next) = level_at(filter, pos);
            // Section 4.7.2: wildcards at the first level must not reach `$` names.
            let wildcard_reaches = |name: &str| id != ROOT || !name.starts_with('$');
            match level {
                "#" => {
                    // `sport/#` matches `sport` itself, then everything below it.
                    for (k, v) in &node.entries {
                        f(k, v);
                    }
                    for (name, child) in node.children.iter() {
                        if wildcard_reaches(name) {
                            stack.push((child, SUBTREE));
                        }
                    }
                }
                "+" => {
                    for (name, child) in node.children.iter() {
                        if wildcard_reaches(name) {
                            stack.push((child, next));
                        }
                    }
                }
                _ => {
                    if let Some(child) = node.children.get(level) {
                        stack.push((child, next));
                    }
                }
            }
        }
        self.scratch.set(stack);
    }

    /// Total entries over all filters.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the trie has no entries (only the root node remains).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of distinct filters with at least one entry.
    pub fn filter_count(&self) -> usize {
        self.filter_count
    }

    /// Calls `f(filter, &key, &value)` for every entry, for admin listings and persistence.
    /// Filter strings are rebuilt from the path in one reused buffer; the traversal stack
    /// is allocated per call, so this is not for the hot path. The order is unspecified.
    pub fn for_each(&self, mut f: impl FnMut(&str, &K, &V)) {
        // A frame is a node, the length of its parent's path in `path` (`None` for a child
        // of the root, which has no separator before it) and the level leading to it.
        // Depth-first order guarantees that when a frame is popped, `path` still starts
        // with its parent's path, so truncating and appending rebuilds the node's path.
        let mut stack: Vec<(NodeId, Option<usize>, &str)> = Vec::new();
        let mut path = String::new();
        let root = &self.nodes[ROOT as usize];
        assert!(root.entries.is_empty(), "the root holds no filter");
        push_children(&mut stack, root, None);
        let mut visited: usize = 0;
        while let Some((id, parent_len, level)) = stack.pop() {
            visited += 1;
            assert!(visited < self.nodes.len(), "trie listing revisited a node");
            match parent_len {
                None => path.clear(),
                Some(len) => {
                    path.truncate(len);
                    path.push('/');
                }
            }
            path.push_str(level);
            let node = &self.nodes[id as usize];
            for (k, v) in &node.entries {
                f(&path, k, v);
            }
            push_children(&mut stack, node, Some(path.len()));
        }
    }

    /// The node where `filter` ends, if the trie has one. Walks exact, `+` and `#` edges
    /// literally; an invalid filter finds nothing, because none was ever inserted.
    fn find(&self, filter: &str) -> Option<NodeId> {
        let mut node = ROOT;
        for level in levels(filter) {
            let n = &self.nodes[node as usize];
            node = match level {
                "+" => n.plus?,
                "#" => n.hash?,
                _ => n.children.get(level)?,
            };
        }
        // The empty filter would end at the root, which holds no entries; say so plainly.
        (node != ROOT).then_some(node)
    }

    /// The child of `parent` for `level`, created if missing.
    fn child_or_insert(&mut self, parent: NodeId, level: &str) -> NodeId {
        let n = &self.nodes[parent as usize];
        let (existing, edge) = match level {
            "+" => (n.plus, ChildEdge::Plus),
            "#" => (n.hash, ChildEdge::Hash),
            _ => (n.children.get(level), ChildEdge::Level),
        };
        if let Some(child) = existing {
            return child;
        }
        let child = self.alloc_node(parent, edge);
        let n = &mut self.nodes[parent as usize];
        match edge {
            ChildEdge::Plus => n.plus = Some(child),
            ChildEdge::Hash => n.hash = Some(child),
            ChildEdge::Level => {
                n.children.insert(level, child);
            }
        }
        child
    }

    /// A fresh empty node under `parent`, reusing a free slot when there is one.
    fn alloc_node(&mut self, parent: NodeId, edge: ChildEdge) -> NodeId {
        let node = Node::new(Some((parent, edge)));
        if let Some(id) = self.free.pop() {
            let slot = &mut self.nodes[id as usize];
            assert!(slot.parent.is_none() && slot.is_empty(), "free slot in use");
            *slot = node;
            return id;
        }
        assert!(self.nodes.len() < NODE_COUNT_MAX, "trie node slab full");
        let id = NodeId::try_from(self.nodes.len()).expect("bounded by NODE_COUNT_MAX");
        self.nodes.push(node);
        id
    }

    /// Frees `node` and then each ancestor left empty, stopping at the first node that is
    /// still in use or at the root. `filter` is the filter ending at `node`: its levels,
    /// read from the last, name the edge taken at each step up, which bounds the loop by
    /// the filter's depth and is cross-checked against the recorded edge.
    fn prune(&mut self, mut node: NodeId, filter: &str) {
        for level in filter.rsplit('/') {
            if node == ROOT || !self.nodes[node as usize].is_empty() {
                break;
            }
            let (parent, edge) = self.nodes[node as usize]
                .parent
                .expect("a non-root live node has a parent");
            let p = &mut self.nodes[parent as usize];
            match edge {
                ChildEdge::Plus => {
                    assert_eq!(level, "+", "pruned edge disagrees with the filter");
                    assert_eq!(p.plus.take(), Some(node), "parent's + edge is stale");
                }
                ChildEdge::Hash => {
                    assert_eq!(level, "#", "pruned edge disagrees with the filter");
                    assert_eq!(p.hash.take(), Some(node), "parent's # edge is stale");
                }
                ChildEdge::Level => {
                    assert_eq!(
                        p.children.remove(level),
                        Some(node),
                        "parent's edge is stale"
                    );
                }
            }
            self.nodes[node as usize] = Node::new(None);
            self.free.push(node);
            node = parent;
        }
        // Every level of the filter has been walked back up, so the loop either reached the
        // root or stopped at a node that is still in use.
        assert!(
            node == ROOT || !self.nodes[node as usize].is_empty(),
            "pruning stopped early"
        );
    }
}

impl<K: Copy + Eq, V> Default for Trie<K, V> {
    fn default() -> Self {
        Trie::new()
    }
}

impl<K, V> fmt::Debug for Trie<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trie")
            .field("len", &self.len)
            .field("filter_count", &self.filter_count)
            .field("node_count", &(self.nodes.len() - self.free.len()))
            .field("free_slot_count", &self.free.len())
            .finish_non_exhaustive()
    }
}

/// The level of `s` starting at byte `pos` and the position of the level after it (past
/// the end after the last level).
fn level_at(s: &str, pos: usize) -> (&str, usize) {
    let rest = &s[pos..];
    // A byte search: `str::find('/')` goes through the char searcher, which compares
    // each candidate with a `memcmp` call; it was ~25 % of a shard's time routing
    // publications (perf, cluster fan-in). '/' is ASCII, so the byte position is a
    // char boundary.
    let len = rest
        .as_bytes()
        .iter()
        .position(|&b| b == b'/')
        .unwrap_or(rest.len());
    (&rest[..len], pos + len + 1)
}

/// Pushes one traversal frame per child of `node` for [`Trie::for_each`].
fn push_children<'a, K, V>(
    stack: &mut Vec<(NodeId, Option<usize>, &'a str)>,
    node: &'a Node<K, V>,
    path_len: Option<usize>,
) {
    for (level, child) in node.children.iter() {
        stack.push((child, path_len, level));
    }
    if let Some(plus) = node.plus {
        stack.push((plus, path_len, "+"));
    }
    if let Some(hash) = node.hash {
        stack.push((hash, path_len, "#"));
    }
}

/// Gives memory back once a vector has fallen to a quarter of its capacity, so a filter
/// that once had a large fan-out does not keep that memory. Shrinking to twice the length
/// keeps pushes and removals amortised O(1).
fn shrink_vec_if_sparse<T>(v: &mut Vec<T>) {
    if v.capacity() > SPARSE_CAPACITY_MIN && v.len() * 4 <= v.capacity() {
        v.shrink_to(v.len() * 2);
    }
}

/// A node's exact-level children: a short list while there are few, a hash map beyond.
///
/// Most nodes have one to a few exact children (`dev` under `site/42`, `telemetry` under a
/// device), and comparing a handful of short strings is cheaper than hashing the level,
/// so matching walks those without hashing. Wide nodes (all device ids under `dev`) switch
/// to a map so lookups stay O(1). The map keeps std's default hasher, SipHash with a
/// per-map random key, on purpose: levels are chosen by clients, and with a fast unkeyed
/// hash one client could pile colliding levels into a single bucket and make every lookup
/// on that node linear. Revisit only with a keyed fast hasher.
#[derive(Debug)]
enum Children {
    /// At most [`CHILDREN_LIST_MAX`] children, in no particular order.
    List(Vec<(Box<str>, NodeId)>),
    /// More than [`CHILDREN_LIST_MIN`] children.
    Map(HashMap<Box<str>, NodeId>),
}

/// The most children kept in a [`Children::List`]; one more converts it to a map.
const CHILDREN_LIST_MAX: usize = 8;
/// A [`Children::Map`] that falls to this many children converts back to a list. Half of
/// [`CHILDREN_LIST_MAX`], so a node hovering at the boundary does not convert back and
/// forth on every subscribe and unsubscribe.
const CHILDREN_LIST_MIN: usize = CHILDREN_LIST_MAX / 2;
const _: () = assert!(CHILDREN_LIST_MIN < CHILDREN_LIST_MAX);

impl Children {
    /// No children; allocates nothing.
    fn new() -> Self {
        Children::List(Vec::new())
    }

    fn is_empty(&self) -> bool {
        match self {
            Children::List(list) => list.is_empty(),
            Children::Map(map) => map.is_empty(),
        }
    }

    /// The child for the exact level `level`.
    fn get(&self, level: &str) -> Option<NodeId> {
        match self {
            Children::List(list) => list
                .iter()
                .find(|(l, _)| **l == *level)
                .map(|&(_, child)| child),
            Children::Map(map) => map.get(level).copied(),
        }
    }

    /// Adds `child` for `level`, which must not have a child yet.
    fn insert(&mut self, level: &str, child: NodeId) {
        match self {
            Children::List(list) if list.len() < CHILDREN_LIST_MAX => {
                assert!(
                    list.iter().all(|(l, _)| **l != *level),
                    "child level inserted twice"
                );
                list.push((level.into(), child));
            }
            Children::List(list) => {
                let mut map: HashMap<Box<str>, NodeId> = std::mem::take(list).into_iter().collect();
                assert!(
                    map.insert(level.into(), child).is_none(),
                    "child level inserted twice"
                );
                *self = Children::Map(map);
            }
            Children::Map(map) => {
                assert!(
                    map.insert(level.into(), child).is_none(),
                    "child level inserted twice"
                );
            }
        }
    }

    /// Removes and returns the child for `level`, giving memory back as the node narrows.
    fn remove(&mut self, level: &str) -> Option<NodeId> {
        match self {
            Children::List(list) => {
                let index = list.iter().position(|(l, _)| **l == *level)?;
                let (_, child) = list.swap_remove(index);
                if list.is_empty() {
                    *list = Vec::new();
                }
                Some(child)
            }
            Children::Map(map) => {
                let child = map.remove(level)?;
                if map.len() <= CHILDREN_LIST_MIN {
                    let list: Vec<(Box<str>, NodeId)> = std::mem::take(map).into_iter().collect();
                    *self = Children::List(list);
                } else if map.capacity() > SPARSE_CAPACITY_MIN && map.len() * 4 <= map.capacity() {
                    // Same policy as `shrink_vec_if_sparse`.
                    map.shrink_to(map.len() * 2);
                }
                Some(child)
            }
        }
    }

    /// Every (level, child) pair, in no particular order.
    fn iter(&self) -> impl Iterator<Item = (&str, NodeId)> {
        let (list, map) = match self {
            Children::List(list) => (Some(list), None),
            Children::Map(map) => (None, Some(map)),
        };
        let list = list.into_iter().flatten().map(|(l, c)| (&**l, *c));
        let map = map.into_iter().flatten().map(|(l, c)| (&**l, *c));
        list.chain(map)
    }
}

/// The most shards a [`ShardSet`] can hold, and so the most shards a node can run while
/// routing with the route table: shard ids `0..SHARDS_MAX`. Boot must reject a larger
/// shard count.
pub const SHARDS_MAX: usize = 256;

/// Words of 64 bits in a [`ShardSet`].
const SHARD_SET_WORDS: usize = SHARDS_MAX / 64;

// Shard ids are `u16` in the route table and on the mesh, and the set is whole words.
const _: () = assert!(SHARDS_MAX.is_multiple_of(64) && SHARDS_MAX <= u16::MAX as usize + 1);

/// A fixed-size set of shard ids in `0..SHARDS_MAX`, one bit per shard: the result of
/// matching a PUBLISH against the route table, i.e. the shards to forward it to. A plain
/// `Copy` value (32 bytes) that never allocates; made per publish on any shard.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ShardSet {
    words: [u64; SHARD_SET_WORDS],
}

impl ShardSet {
    /// The empty set.
    pub const fn new() -> Self {
        ShardSet {
            words: [0; SHARD_SET_WORDS],
        }
    }

    /// Adds `shard`; returns true if it was not already present.
    ///
    /// # Panics
    /// If `shard` is not below [`SHARDS_MAX`]: shard ids come from the boot-time shard
    /// count, which is checked against the bound, so this is a programmer error.
    pub fn insert(&mut self, shard: u16) -> bool {
        assert!(
            usize::from(shard) < SHARDS_MAX,
            "shard id {shard} out of 0..{SHARDS_MAX}"
        );
        let (word, bit) = Self::position(shard);
        let added = self.words[word] & bit == 0;
        self.words[word] |= bit;
        added
    }

    /// Removes `shard`; returns true if it was present.
    pub fn remove(&mut self, shard: u16) -> bool {
        if usize::from(shard) >= SHARDS_MAX {
            return false;
        }
        let (word, bit) = Self::position(shard);
        let present = self.words[word] & bit != 0;
        self.words[word] &= !bit;
        present
    }

    /// True if `shard` is in the set; always false for ids at or above [`SHARDS_MAX`].
    pub fn contains(&self, shard: u16) -> bool {
        if usize::from(shard) >= SHARDS_MAX {
            return false;
        }
        let (word, bit) = Self::position(shard);
        self.words[word] & bit != 0
    }

    /// The number of shards in the set.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// True if the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Removes every shard.
    pub fn clear(&mut self) {
        self.words = [0; SHARD_SET_WORDS];
    }

    /// The shards in the set, in ascending order.
    pub fn iter(&self) -> ShardSetIter {
        ShardSetIter {
            words: self.words,
            word: 0,
        }
    }

    /// The word index and bit mask of `shard`, which must be below [`SHARDS_MAX`].
    fn position(shard: u16) -> (usize, u64) {
        let shard = usize::from(shard);
        (shard / 64, 1 << (shard % 64))
    }
}

impl fmt::Debug for ShardSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl IntoIterator for &ShardSet {
    type Item = u16;
    type IntoIter = ShardSetIter;

    fn into_iter(self) -> ShardSetIter {
        self.iter()
    }
}

/// Iterator over the shards of a [`ShardSet`] in ascending order, from
/// [`ShardSet::iter`]. Works on a copy of the set.
#[derive(Debug, Clone)]
pub struct ShardSetIter {
    /// The bits not yet yielded.
    words: [u64; SHARD_SET_WORDS],
    /// The word being drained; every word before it is zero.
    word: usize,
}

impl Iterator for ShardSetIter {
    type Item = u16;

    fn next(&mut self) -> Option<u16> {
        // At most SHARD_SET_WORDS iterations.
        while let Some(w) = self.words.get_mut(self.word) {
            if *w != 0 {
                let bit = w.trailing_zeros() as usize;
                *w &= *w - 1;
                let shard = self.word * 64 + bit;
                return Some(u16::try_from(shard).expect("bounded by SHARDS_MAX"));
            }
            self.word += 1;
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.words.iter().map(|w| w.count_ones() as usize).sum();
        (n, Some(n))
    }
}

impl ExactSizeIterator for ShardSetIter {}

impl FusedIterator for ShardSetIter {}

/// Matches the topic name `topic` against the route table and sets `out` to the shards
/// with at least one matching subscription. `out` is cleared first, so one set can be
/// reused across publishes without carrying shards over. Allocation-free once warm, like
/// [`Trie::for_each_match`].
///
/// # Panics
/// If the route table holds a shard id at or above [`SHARDS_MAX`] (a programmer error).
pub fn route_match(trie: &Trie<u16, ()>, topic: &str, out: &mut ShardSet) {
    out.clear();
    trie.for_each_match(topic, |&shard, ()| {
        out.insert(shard);
    });
}

#[cfg(test)]
mod tests {
    //! Goal: the trie agrees with `tessera_proto::topic::matches`, keeps exact per-(filter,
    //! key) bookkeeping, and leaves no node behind after removals. Method: hand-written
    //! cases for the API and every example of MQTT 5.0 section 4.7, then a model-based
    //! property test that drives random inserts and removals against a `HashMap` model and
    //! compares matching with brute force over every filter, checking the slab's structural
    //! invariants after each step.

    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;
    use tessera_proto::topic::{matches, validate_topic_name};

    use super::*;

    /// Live nodes, root included.
    fn node_count<K, V>(trie: &Trie<K, V>) -> usize {
        trie.nodes.len() - trie.free.len()
    }

    /// Checks every structural invariant of the slab: parent links and child edges agree
    /// both ways, every live node is reachable from the root, no live non-root node is
    /// empty, free slots are empty and unreferenced, keys are unique per node, and the
    /// counters equal what the nodes hold.
    fn check_invariants<K: Copy + Eq, V>(trie: &Trie<K, V>) {
        let free: HashSet<NodeId> = trie.free.iter().copied().collect();
        assert_eq!(free.len(), trie.free.len(), "free list has duplicates");
        assert!(!free.contains(&ROOT), "root freed");
        assert!(trie.nodes[ROOT as usize].parent.is_none());
        assert!(trie.nodes[ROOT as usize].entries.is_empty());
        for &id in &free {
            let n = &trie.nodes[id as usize];
            assert!(
                n.parent.is_none() && n.is_empty(),
                "free slot {id} not empty"
            );
        }
        let mut reached = HashSet::new();
        let mut stack = vec![ROOT];
        let (mut len, mut filter_count) = (0, 0);
        while let Some(id) = stack.pop() {
            assert!(reached.insert(id), "node {id} reachable twice");
            assert!(!free.contains(&id), "free node {id} reachable");
            let n = &trie.nodes[id as usize];
            if id != ROOT {
                assert!(!n.is_empty(), "empty node {id} not pruned");
            }
            for (i, (k, _)) in n.entries.iter().enumerate() {
                assert!(
                    n.entries[..i].iter().all(|(other, _)| other != k),
                    "duplicate key in node {id}"
                );
            }
            len += n.entries.len();
            filter_count += usize::from(!n.entries.is_empty());
            let mut children: Vec<(NodeId, ChildEdge)> = n
                .children
                .iter()
                .map(|(_, c)| (c, ChildEdge::Level))
                .collect();
            match &n.children {
                Children::List(list) => assert!(list.len() <= CHILDREN_LIST_MAX),
                Children::Map(map) => assert!(map.len() > CHILDREN_LIST_MIN),
            }
            children.extend(n.plus.map(|c| (c, ChildEdge::Plus)));
            children.extend(n.hash.map(|c| (c, ChildEdge::Hash)));
            for (child, edge) in children {
                assert_eq!(trie.nodes[child as usize].parent, Some((id, edge)));
                stack.push(child);
            }
            if let Some(hash) = n.hash {
                let h = &trie.nodes[hash as usize];
                assert!(h.children.is_empty() && h.plus.is_none() && h.hash.is_none());
            }
        }
        assert_eq!(reached.len(), node_count(trie), "unreachable live nodes");
        assert_eq!(trie.len(), len);
        assert_eq!(trie.filter_count(), filter_count);
        assert_eq!(trie.is_empty(), len == 0);
    }

    /// The filters matching `topic`, as reported by the trie, sorted.
    fn matched(trie: &Trie<u32, String>, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        trie.for_each_match(topic, |_, filter| out.push(filter.clone()));
        out.sort();
        out
    }

    /// A trie holding each of `filters` once, with its own text as the value.
    fn trie_of(filters: &[&str]) -> Trie<u32, String> {
        let mut trie = Trie::new();
        for (i, f) in filters.iter().enumerate() {
            let key = u32::try_from(i).unwrap();
            assert_eq!(trie.insert(f, key, f.to_string()), None);
        }
        check_invariants(&trie);
        trie
    }

    /// Asserts that `topic` matches exactly `expected` among the trie's filters, and that
    /// brute force over `filters` with `matches` says the same.
    fn assert_matches(trie: &Trie<u32, String>, filters: &[&str], topic: &str, expected: &[&str]) {
        let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        expected.sort();
        let mut brute: Vec<String> = filters
            .iter()
            .filter(|f| matches(f, topic))
            .map(|f| f.to_string())
            .collect();
        brute.sort();
        assert_eq!(brute, expected, "brute force disagrees for topic {topic:?}");
        assert_eq!(
            matched(trie, topic),
            expected,
            "trie disagrees for topic {topic:?}"
        );
    }

    #[test]
    fn insert_get_replace_remove() {
        let mut trie: Trie<u32, u8> = Trie::new();
        assert!(trie.is_empty());
        assert_eq!(trie.insert("a/b", 1, 10), None);
        assert_eq!(trie.insert("a/b", 2, 20), None);
        assert_eq!(trie.insert("a/+", 1, 30), None);
        assert_eq!((trie.len(), trie.filter_count()), (3, 2));
        assert_eq!(trie.get("a/b", 1), Some(&10));
        assert_eq!(trie.get("a/+", 1), Some(&30));
        assert_eq!(trie.get("a/+", 2), None);
        assert_eq!(trie.get("a", 1), None);
        assert_eq!(trie.get("a/b/c", 1), None);
        // Replacing keeps the counts.
        assert_eq!(trie.insert("a/b", 1, 11), Some(10));
        assert_eq!(trie.get("a/b", 1), Some(&11));
        assert_eq!((trie.len(), trie.filter_count()), (3, 2));
        assert_eq!(trie.filter_len("a/b"), 2);
        assert_eq!(trie.filter_len("a/+"), 1);
        assert_eq!(trie.filter_len("a"), 0);
        assert_eq!(trie.filter_len("x/y"), 0);
        check_invariants(&trie);

        assert_eq!(trie.remove("a/b", 3), None);
        assert_eq!(trie.remove("a/c", 1), None);
        assert_eq!(trie.remove("a/b", 1), Some(11));
        assert_eq!(trie.remove("a/b", 1), None);
        assert_eq!(trie.filter_len("a/b"), 1);
        assert_eq!((trie.len(), trie.filter_count()), (2, 2));
        check_invariants(&trie);
        assert_eq!(trie.remove("a/b", 2), Some(20));
        assert_eq!(trie.remove("a/+", 1), Some(30));
        assert!(trie.is_empty());
        assert_eq!(trie.filter_count(), 0);
        check_invariants(&trie);
        assert_eq!(node_count(&trie), 1);
    }

    #[test]
    fn lookups_of_invalid_or_unknown_filters_find_nothing() {
        let mut trie: Trie<u32, ()> = Trie::new();
        trie.insert("a/#", 1, ());
        trie.insert("+", 1, ());
        for f in ["", "a/#/b", "a+", "#/a", "a/+", "a", "++"] {
            assert_eq!(trie.get(f, 1), None, "{f:?}");
            assert_eq!(trie.filter_len(f), 0, "{f:?}");
            assert_eq!(trie.remove(f, 1), None, "{f:?}");
        }
        check_invariants(&trie);
        assert_eq!(trie.len(), 2);
    }

    #[test]
    #[should_panic(expected = "invalid topic filter")]
    fn inserting_an_invalid_filter_is_a_programmer_error() {
        let mut trie: Trie<u32, ()> = Trie::new();
        trie.insert("a/#/b", 1, ());
    }

    #[test]
    fn pruning_removes_every_node_and_slots_are_reused() {
        let filters = [
            "a/b/c",
            "a/b",
            "a/+/c",
            "a/#",
            "+/+",
            "#",
            "/",
            "//",
            "a//b",
            "$SYS/#",
            "a/b/c/d/e",
        ];
        let mut trie = trie_of(&filters);
        let peak = trie.nodes.len();
        // Remove in an order that forces pruning both of leaves and of inner nodes.
        for (i, f) in filters.iter().enumerate().rev() {
            let key = u32::try_from(i).unwrap();
            assert_eq!(trie.remove(f, key).as_deref(), Some(*f));
            check_invariants(&trie);
        }
        assert_eq!(node_count(&trie), 1, "only the root remains");
        assert_eq!(trie.free.len(), peak - 1);
        // Re-inserting reuses the freed slots instead of growing the slab.
        for (i, f) in filters.iter().enumerate() {
            trie.insert(f, u32::try_from(i).unwrap(), f.to_string());
        }
        assert_eq!(trie.nodes.len(), peak);
        check_invariants(&trie);
    }

    #[test]
    fn pruning_stops_at_a_node_still_in_use() {
        let mut trie: Trie<u32, ()> = Trie::new();
        trie.insert("a/b/c/d", 1, ());
        trie.insert("a/b", 1, ());
        trie.insert("a/+/c", 1, ());
        let before = node_count(&trie);
        trie.remove("a/b/c/d", 1);
        // `c` and `d` go; `a/b` still has an entry.
        assert_eq!(node_count(&trie), before - 2);
        check_invariants(&trie);
        trie.remove("a/b", 1);
        // `b` goes, `a` stays for `a/+/c`.
        assert_eq!(node_count(&trie), before - 3);
        check_invariants(&trie);
        trie.remove("a/+/c", 1);
        assert_eq!(node_count(&trie), 1);
    }

    #[test]
    fn large_fan_out_gives_memory_back() {
        let mut trie: Trie<u32, ()> = Trie::new();
        for key in 0..10_000 {
            trie.insert("fan/out", key, ());
            trie.insert(&format!("wide/{key}"), key, ());
        }
        for key in 10..10_000 {
            trie.remove("fan/out", key);
            trie.remove(&format!("wide/{key}"), key);
        }
        check_invariants(&trie);
        let fan = trie.find("fan/out").unwrap();
        assert!(trie.nodes[fan as usize].entries.capacity() <= 40);
        let wide = trie.find("wide/0").unwrap();
        let wide = trie.nodes[wide as usize].parent.unwrap().0;
        let Children::Map(map) = &trie.nodes[wide as usize].children else {
            panic!("ten children are kept in a map");
        };
        assert!(map.capacity() <= 40);
    }

    #[test]
    fn children_switch_between_list_and_map() {
        let is_map = |trie: &Trie<u32, ()>| {
            let w = trie.nodes[ROOT as usize].children.get("w").unwrap();
            matches!(trie.nodes[w as usize].children, Children::Map(_))
        };
        let mut trie: Trie<u32, ()> = Trie::new();
        let count = u32::try_from(CHILDREN_LIST_MAX).unwrap() + 1;
        for i in 0..count {
            trie.insert(&format!("w/{i}"), i, ());
            assert_eq!(is_map(&trie), i >= count - 1, "after {} children", i + 1);
        }
        check_invariants(&trie);
        let min = u32::try_from(CHILDREN_LIST_MIN).unwrap();
        for i in (min..count).rev() {
            // The map holds until the node is down to CHILDREN_LIST_MIN children.
            assert!(is_map(&trie));
            trie.remove(&format!("w/{i}"), i);
            check_invariants(&trie);
        }
        assert!(!is_map(&trie));
        for i in 0..min {
            let mut hits = 0;
            trie.for_each_match(&format!("w/{i}"), |&k, ()| {
                assert_eq!(k, i);
                hits += 1;
            });
            assert_eq!(hits, 1);
        }
    }

    // MQTT 5.0 section 4.7.1.2, the multi-level wildcard.
    #[test]
    fn spec_multi_level_wildcard() {
        let filters = ["sport/tennis/player1/#", "sport/#", "#", "sport/tennis/#"];
        let trie = trie_of(&filters);
        assert_matches(
            &trie,
            &filters,
            "sport/tennis/player1",
            &["sport/tennis/player1/#", "sport/#", "#", "sport/tennis/#"],
        );
        assert_matches(
            &trie,
            &filters,
            "sport/tennis/player1/ranking",
            &["sport/tennis/player1/#", "sport/#", "#", "sport/tennis/#"],
        );
        assert_matches(
            &trie,
            &filters,
            "sport/tennis/player1/score/wimbledon",
            &["sport/tennis/player1/#", "sport/#", "#", "sport/tennis/#"],
        );
        // "sport/#" also matches the singular "sport", since # includes the parent level.
        assert_matches(&trie, &filters, "sport", &["sport/#", "#"]);
        assert_matches(&trie, &filters, "sport/", &["sport/#", "#"]);
        assert_matches(
            &trie,
            &filters,
            "sport/tennis",
            &["sport/#", "#", "sport/tennis/#"],
        );
        // "#" alone matches every topic not starting with `$`.
        assert_matches(&trie, &filters, "finance", &["#"]);
        assert_matches(&trie, &filters, "/", &["#"]);
    }

    // MQTT 5.0 section 4.7.1.3, the single-level wildcard.
    #[test]
    fn spec_single_level_wildcard() {
        let filters = [
            "sport/tennis/+",
            "sport/+",
            "+/+",
            "/+",
            "+",
            "+/tennis/#",
            "sport/+/player1",
        ];
        let trie = trie_of(&filters);
        assert_matches(
            &trie,
            &filters,
            "sport/tennis/player1",
            &["sport/tennis/+", "+/tennis/#", "sport/+/player1"],
        );
        assert_matches(
            &trie,
            &filters,
            "sport/tennis/player2",
            &["sport/tennis/+", "+/tennis/#"],
        );
        assert_matches(
            &trie,
            &filters,
            "sport/tennis/player1/ranking",
            &["+/tennis/#"],
        );
        // "sport/+" does not match "sport" but does match "sport/": `+` matches an empty level.
        assert_matches(&trie, &filters, "sport", &["+"]);
        assert_matches(&trie, &filters, "sport/", &["sport/+", "+/+"]);
        // "+/+" and "/+" match "/finance"; "+" does not.
        assert_matches(&trie, &filters, "/finance", &["+/+", "/+"]);
        assert_matches(&trie, &filters, "/", &["+/+", "/+"]);
        assert_matches(
            &trie,
            &filters,
            "sport/tennis",
            &["sport/+", "+/+", "+/tennis/#"],
        );
    }

    // MQTT 5.0 section 4.7.2, topics beginning with `$`.
    #[test]
    fn spec_dollar_topics() {
        let filters = [
            "#",
            "+/monitor/Clients",
            "$SYS/#",
            "$SYS/monitor/+",
            "+",
            "+/#",
            "$SYS",
        ];
        let trie = trie_of(&filters);
        assert_matches(
            &trie,
            &filters,
            "$SYS/monitor/Clients",
            &["$SYS/#", "$SYS/monitor/+"],
        );
        assert_matches(&trie, &filters, "$SYS", &["$SYS/#", "$SYS"]);
        assert_matches(&trie, &filters, "$other", &[]);
        // The rule applies only to the first level and only to topics starting with `$`.
        assert_matches(
            &trie,
            &filters,
            "x/monitor/Clients",
            &["#", "+/monitor/Clients", "+/#"],
        );
        assert_matches(&trie, &filters, "x$", &["#", "+", "+/#"]);
    }

    // MQTT 5.0 section 4.7.3: case sensitivity, spaces and leading separators.
    #[test]
    fn spec_topic_semantics() {
        let filters = [
            "ACCOUNTS",
            "Accounts",
            "Accounts payable",
            "/finance",
            "finance",
        ];
        let trie = trie_of(&filters);
        assert_matches(&trie, &filters, "ACCOUNTS", &["ACCOUNTS"]);
        assert_matches(&trie, &filters, "Accounts", &["Accounts"]);
        assert_matches(&trie, &filters, "Accounts payable", &["Accounts payable"]);
        assert_matches(&trie, &filters, "/finance", &["/finance"]);
        assert_matches(&trie, &filters, "finance", &["finance"]);
    }

    #[test]
    fn empty_topic_matches_nothing() {
        let trie = trie_of(&["#", "+"]);
        assert_eq!(matched(&trie, ""), Vec::<String>::new());
    }

    #[test]
    fn each_filter_reports_its_keys_once() {
        let mut trie: Trie<u32, &str> = Trie::new();
        trie.insert("a/b", 1, "exact");
        trie.insert("a/+", 1, "plus");
        trie.insert("a/#", 1, "hash");
        trie.insert("a/b", 2, "exact");
        let mut seen = Vec::new();
        trie.for_each_match("a/b", |&k, &v| seen.push((k, v)));
        seen.sort();
        assert_eq!(seen, [(1, "exact"), (1, "hash"), (1, "plus"), (2, "exact")]);
    }

    #[test]
    fn nested_matching_from_the_callback_works() {
        let trie = trie_of(&["a/+", "+/b", "#"]);
        let mut pairs = Vec::new();
        trie.for_each_match("a/b", |_, outer| {
            trie.for_each_match("x/b", |_, inner| pairs.push((outer.clone(), inner.clone())));
        });
        assert_eq!(pairs.len(), 3 * 2);
        // The scratch stack survives and is usable afterwards.
        assert_eq!(matched(&trie, "a/b"), ["#", "+/b", "a/+"]);
    }

    #[test]
    fn scratch_stack_keeps_its_capacity() {
        let deep_filter = vec!["+"; TOPIC_LEVELS_MAX].join("/");
        let deep_topic = vec!["x"; TOPIC_LEVELS_MAX].join("/");
        let mut trie: Trie<u32, ()> = Trie::new();
        trie.insert(&deep_filter, 1, ());
        trie.insert(&deep_topic, 1, ());
        let capacity = {
            let stack = trie.scratch.take();
            let c = stack.capacity();
            trie.scratch.set(stack);
            c
        };
        let mut count = 0;
        trie.for_each_match(&deep_topic, |_, ()| count += 1);
        assert_eq!(count, 2);
        let stack = trie.scratch.take();
        assert_eq!(
            stack.capacity(),
            capacity,
            "matching grew or dropped the stack"
        );
        assert!(capacity > TOPIC_LEVELS_MAX);
    }

    #[test]
    fn for_each_rebuilds_filters() {
        let filters = [
            "a/b", "a/+", "a/#", "#", "+", "/", "//", "a//b", "$SYS/x", "a",
        ];
        let trie = trie_of(&filters);
        let mut listed = Vec::new();
        trie.for_each(|filter, &key, value| {
            assert_eq!(filter, value);
            listed.push((filter.to_string(), key));
        });
        listed.sort();
        let mut expected: Vec<(String, u32)> = filters
            .iter()
            .enumerate()
            .map(|(i, f)| (f.to_string(), u32::try_from(i).unwrap()))
            .collect();
        expected.sort();
        assert_eq!(listed, expected);
        Trie::<u32, ()>::new().for_each(|_, _, _| panic!("empty trie lists nothing"));
    }

    #[test]
    fn shard_set_basics() {
        let mut set = ShardSet::new();
        assert!(set.is_empty());
        assert_eq!(set.len(), 0);
        assert!(set.insert(0));
        assert!(set.insert(63));
        assert!(set.insert(64));
        assert!(set.insert(255));
        assert!(!set.insert(64));
        assert_eq!(set.len(), 4);
        assert!(set.contains(63) && set.contains(255) && !set.contains(1));
        assert!(!set.contains(256) && !set.contains(u16::MAX));
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 63, 64, 255]);
        assert_eq!(set.iter().len(), 4);
        assert_eq!(format!("{set:?}"), "{0, 63, 64, 255}");
        assert!(set.remove(63));
        assert!(!set.remove(63));
        assert!(!set.remove(300));
        assert_eq!((&set).into_iter().collect::<Vec<_>>(), [0, 64, 255]);
        set.clear();
        assert!(set.is_empty());
        assert_eq!(set.iter().next(), None);
    }

    #[test]
    #[should_panic(expected = "out of 0..256")]
    fn shard_set_rejects_out_of_range_ids() {
        ShardSet::new().insert(256);
    }

    #[test]
    fn route_match_collects_shards_and_clears_first() {
        let mut routes: Trie<u16, ()> = Trie::new();
        routes.insert("sensors/+/temp", 3, ());
        routes.insert("sensors/#", 7, ());
        routes.insert("sensors/#", 3, ());
        routes.insert("#", 200, ());
        routes.insert("$SYS/#", 1, ());
        let mut out = ShardSet::new();
        out.insert(99);
        route_match(&routes, "sensors/k1/temp", &mut out);
        assert_eq!(out.iter().collect::<Vec<_>>(), [3, 7, 200]);
        route_match(&routes, "$SYS/uptime", &mut out);
        assert_eq!(out.iter().collect::<Vec<_>>(), [1]);
        route_match(&routes, "$none", &mut out);
        assert!(out.is_empty());
    }

    /// Levels for the deep, narrow configuration: a small alphabet so that filters and
    /// topics collide often, with empty levels and a `$` level for the section 4.7.2 rule.
    const NARROW_LEVELS: &[&str] = &["a", "b", "", "$s"];

    /// Levels for the shallow, wide configuration: enough distinct levels that a node
    /// outgrows [`CHILDREN_LIST_MAX`] and, after removals, shrinks back to a list.
    const WIDE_LEVELS: &[&str] = &[
        "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "", "$s",
    ];

    /// Valid topic names of one to `depth_max` levels drawn from `alphabet`.
    fn topic_name(
        alphabet: &'static [&'static str],
        depth_max: usize,
    ) -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(alphabet), 1..=depth_max)
            .prop_map(|v| v.join("/"))
            .prop_filter("valid topic name", |t| {
                validate_topic_name(t, TOPIC_LEVELS_MAX).is_ok()
            })
    }

    /// Valid topic filters of one to `depth_max` levels drawn from `alphabet` plus `+` and
    /// `#`. A `#` ends the filter; validation then rejects only the empty filter.
    fn topic_filter(
        alphabet: &'static [&'static str],
        depth_max: usize,
    ) -> impl Strategy<Value = String> {
        let mut levels = alphabet.to_vec();
        levels.extend(["+", "#"]);
        prop::collection::vec(prop::sample::select(levels), 1..=depth_max)
            .prop_map(|v| {
                let end = v.iter().position(|l| *l == "#").map_or(v.len(), |i| i + 1);
                v[..end].join("/")
            })
            .prop_filter("valid topic filter", |f| {
                validate_topic_filter(f, TOPIC_LEVELS_MAX).is_ok()
            })
    }

    /// One step of the model-based test; indices pick a filter modulo the filter count.
    #[derive(Debug, Clone)]
    enum Op {
        Insert { filter: usize, key: u8, value: u16 },
        Remove { filter: usize, key: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (any::<usize>(), 0..6u8, any::<u16>())
                .prop_map(|(filter, key, value)| Op::Insert { filter, key, value }),
            1 => (any::<usize>(), 0..6u8).prop_map(|(filter, key)| Op::Remove { filter, key }),
        ]
    }

    /// The model: (filter, key) -> value.
    type Model = HashMap<(String, u8), u16>;

    /// Compares the trie's matches for each topic with brute force over the model.
    fn check_matches(
        trie: &Trie<u8, (String, u16)>,
        model: &Model,
        topics: &[String],
    ) -> Result<(), TestCaseError> {
        for topic in topics {
            let mut got = Vec::new();
            trie.for_each_match(topic, |&k, (f, v)| got.push((f.clone(), k, *v)));
            got.sort();
            let mut want: Vec<(String, u8, u16)> = model
                .iter()
                .filter(|((f, _), _)| matches(f, topic))
                .map(|((f, k), v)| (f.clone(), *k, *v))
                .collect();
            want.sort();
            prop_assert_eq!(got, want, "topic {:?}", topic);
        }
        Ok(())
    }

    /// Compares lookups, counters and the full listing with the model.
    fn check_contents(
        trie: &Trie<u8, (String, u16)>,
        model: &Model,
        filters: &[String],
    ) -> Result<(), TestCaseError> {
        check_invariants(trie);
        prop_assert_eq!(trie.len(), model.len());
        let distinct: HashSet<&String> = model.keys().map(|(f, _)| f).collect();
        prop_assert_eq!(trie.filter_count(), distinct.len());
        for f in filters {
            let n = model.keys().filter(|(mf, _)| mf == f).count();
            prop_assert_eq!(trie.filter_len(f), n);
            for key in 0..6u8 {
                let want = model.get(&(f.clone(), key)).copied();
                prop_assert_eq!(trie.get(f, key).map(|(_, v)| *v), want);
            }
        }
        let mut listed = Vec::new();
        trie.for_each(|f, &k, (stored, v)| {
            assert_eq!(f, stored, "rebuilt filter differs from the inserted one");
            listed.push((f.to_string(), k, *v));
        });
        listed.sort();
        let mut want: Vec<(String, u8, u16)> = model
            .iter()
            .map(|((f, k), v)| (f.clone(), *k, *v))
            .collect();
        want.sort();
        prop_assert_eq!(listed, want);
        Ok(())
    }

    /// The model-based check: applies `ops` to a trie and to the model, comparing every
    /// return value and the structural invariants after each step, then compares contents
    /// and matches over `topics`; removes the entries picked by `removal_mask` and compares
    /// again; removes the rest and checks that only the root is left.
    fn run_model(
        filters: &[String],
        ops: &[Op],
        topics: &[String],
        removal_mask: u64,
    ) -> Result<(), TestCaseError> {
        let mut trie: Trie<u8, (String, u16)> = Trie::new();
        let mut model = Model::new();
        for op in ops {
            match *op {
                Op::Insert { filter, key, value } => {
                    let f = &filters[filter % filters.len()];
                    let old = trie.insert(f, key, (f.clone(), value));
                    let want = model.insert((f.clone(), key), value);
                    prop_assert_eq!(old.map(|(_, v)| v), want);
                }
                Op::Remove { filter, key } => {
                    let f = &filters[filter % filters.len()];
                    let old = trie.remove(f, key);
                    let want = model.remove(&(f.clone(), key));
                    prop_assert_eq!(old.map(|(_, v)| v), want);
                }
            }
            check_invariants(&trie);
        }
        check_contents(&trie, &model, filters)?;
        check_matches(&trie, &model, topics)?;

        // Remove a random subset and compare again.
        let mut entries: Vec<(String, u8)> = model.keys().cloned().collect();
        entries.sort();
        for (i, (f, key)) in entries.iter().enumerate() {
            if removal_mask & (1 << (i % 64)) != 0 {
                prop_assert!(trie.remove(f, *key).is_some());
                model.remove(&(f.clone(), *key));
            }
        }
        check_contents(&trie, &model, filters)?;
        check_matches(&trie, &model, topics)?;

        // Remove the rest: only the root may remain.
        let rest: Vec<(String, u8)> = model.keys().cloned().collect();
        for (f, key) in rest {
            prop_assert!(trie.remove(&f, key).is_some());
        }
        check_invariants(&trie);
        prop_assert!(trie.is_empty());
        prop_assert_eq!(node_count(&trie), 1);
        Ok(())
    }

    /// The names in `trie` (a trie of topic names, value = the name) that `filter` matches,
    /// sorted.
    fn names_matching(trie: &Trie<(), String>, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        trie.for_each_name_matching(filter, |_, name| out.push(name.clone()));
        out.sort();
        out
    }

    fn name_trie(names: &[&str]) -> Trie<(), String> {
        let mut trie = Trie::new();
        for n in names {
            trie.insert(n, (), n.to_string());
        }
        trie
    }

    // MQTT 5.0 section 4.7, from the names' side: what a subscribe finds in a retained table.
    #[test]
    fn filters_find_the_names_they_match() {
        let names = [
            "sport",
            "sport/tennis",
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/",
            "/finance",
            "$SYS/monitor/Clients",
            "$SYS",
        ];
        let trie = name_trie(&names);
        let expect = |filter: &str, want: &[&str]| {
            let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
            want.sort();
            assert_eq!(names_matching(&trie, filter), want, "filter {filter}");
        };
        // `#` finds everything but the `$` names [MQTT-4.7.2-1].
        expect("#", &names[..6]);
        expect("sport/#", &names[..5]);
        expect("sport/tennis/+", &["sport/tennis/player1"]);
        expect("sport/+", &["sport/tennis", "sport/"]);
        expect("+", &["sport"]);
        expect("+/+", &["sport/tennis", "sport/", "/finance"]);
        expect("/+", &["/finance"]);
        expect("+/tennis/#", &names[1..4]);
        expect("+/monitor/Clients", &[]);
        expect("$SYS/#", &["$SYS", "$SYS/monitor/Clients"]);
        expect("$SYS/monitor/+", &["$SYS/monitor/Clients"]);
        expect("sport/tennis/player1", &["sport/tennis/player1"]);
        expect("sport/tennis/player2", &[]);
        expect("nothing/#", &[]);
    }

    proptest! {
        /// `for_each_name_matching` finds exactly the stored names `matches` accepts.
        #[test]
        fn name_matching_agrees_with_brute_force(
            names in prop::collection::vec(topic_name(NARROW_LEVELS, 5), 1..40),
            filters in prop::collection::vec(topic_filter(NARROW_LEVELS, 5), 1..16),
        ) {
            let mut trie = Trie::new();
            for n in &names {
                trie.insert(n, (), n.clone());
            }
            for f in &filters {
                let mut want: Vec<String> =
                    names.iter().filter(|n| matches(f, n)).cloned().collect();
                want.sort();
                want.dedup();
                prop_assert_eq!(names_matching(&trie, f), want, "filter {}", f);
            }
        }

        #[test]
        fn agrees_with_brute_force_matching_deep(
            filters in prop::collection::vec(topic_filter(NARROW_LEVELS, 5), 1..16),
            ops in prop::collection::vec(op(), 1..120),
            topics in prop::collection::vec(topic_name(NARROW_LEVELS, 5), 1..24),
            removal_mask in any::<u64>(),
        ) {
            run_model(&filters, &ops, &topics, removal_mask)?;
        }

        #[test]
        fn agrees_with_brute_force_matching_wide(
            filters in prop::collection::vec(topic_filter(WIDE_LEVELS, 3), 1..48),
            ops in prop::collection::vec(op(), 1..200),
            topics in prop::collection::vec(topic_name(WIDE_LEVELS, 3), 1..24),
            removal_mask in any::<u64>(),
        ) {
            run_model(&filters, &ops, &topics, removal_mask)?;
        }
    }
}
