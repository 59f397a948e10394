//! What the admin API asks one shard, and what the shard answers: listings of
//! its sessions, subscriptions and retained messages (filtered and paged), and
//! the operator's actions (kick, expire a session, delete a retained message).
//!
//! The queries are answered by `Engine` methods (in `engine/admin.rs`) on the
//! shard's own thread, when the broker's admin thread asks by message; the
//! answers are plain owned data (`Send`), made off the hot path.
//!
//! Paging is by cursor, not offset: a listing returns the first `limit` items
//! whose key sorts after `after`, in key order. Every shard selects its own
//! first `limit` with a bounded heap (O(n log limit), memory O(limit)), and the
//! admin thread merges the shards' pages, so a page costs the same however
//! deep it is and stays consistent while sessions come and go.

use std::collections::BinaryHeap;

use bytes::Bytes;

/// Most items one listing returns.
pub const PAGE_LIMIT_MAX: usize = 1000;

/// A page of one shard's matching items, in key order.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The first `limit` matching items after the cursor.
    pub items: Vec<T>,
    /// Items matching the filter on this shard, cursor ignored.
    pub total: usize,
}

/// Which sessions a listing wants.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    /// Only ClientIDs starting with this.
    pub prefix: Option<String>,
    /// Only connected (`true`) or only disconnected (`false`) sessions.
    pub connected: Option<bool>,
    /// Cursor: only ClientIDs sorting after this one.
    pub after: Option<String>,
    /// Most items (capped at [`PAGE_LIMIT_MAX`]).
    pub limit: usize,
}

/// One session, and its connection if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The ClientID.
    pub client_id: String,
    /// The owner shard.
    pub shard: u16,
    /// Whether a client is connected.
    pub connected: bool,
    /// `"3.1"`, `"3.1.1"` or `"5.0"`: the version of the last CONNECT.
    pub protocol: &'static str,
    /// The keep alive in force, when connected.
    pub keep_alive_s: Option<u16>,
    /// The driver's listener of the connection, when connected
    /// (`Engine::set_listener`).
    pub listener: Option<u16>,
    /// Session Expiry Interval (`u32::MAX`: never; 0: ends with the connection).
    pub expiry_interval_s: u32,
    /// Seconds since the client disconnected, when it is not connected.
    pub disconnected_for_s: Option<u64>,
    /// Seconds until the session expires, when disconnected and it can expire.
    pub expires_in_s: Option<u64>,
    /// Subscriptions held.
    pub subscriptions: usize,
    /// QoS 1/2 deliveries sent and not yet acknowledged.
    pub inflight: usize,
    /// Deliveries waiting behind the in-flight window.
    pub queued: usize,
}

/// One session in detail: the listing fields and its subscriptions.
#[derive(Debug, Clone)]
pub struct SessionDetail {
    /// The listing fields.
    pub info: SessionInfo,
    /// Its subscriptions, ordered by filter.
    pub subscriptions: Vec<SubscriptionInfo>,
    /// Whether a will is held (v5: maybe waiting for its delay).
    pub has_will: bool,
}

/// Which subscriptions a listing wants.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionFilter {
    /// Only this client's.
    pub client_id: Option<String>,
    /// Only filters containing this text.
    pub filter_contains: Option<String>,
    /// Cursor: only (ClientID, filter) pairs sorting after this one.
    pub after: Option<(String, String)>,
    /// Most items (capped at [`PAGE_LIMIT_MAX`]).
    pub limit: usize,
}

/// One subscription.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SubscriptionInfo {
    /// The subscriber.
    pub client_id: String,
    /// The filter as subscribed (`$share/{group}/...` for shared ones).
    pub filter: String,
    /// Granted maximum QoS.
    pub qos: u8,
    /// v5 No Local.
    pub no_local: bool,
    /// v5 Retain As Published.
    pub retain_as_published: bool,
    /// v5 Retain Handling (0, 1 or 2).
    pub retain_handling: u8,
    /// v5 Subscription Identifier.
    pub subscription_id: Option<u32>,
}

/// Which retained messages a listing wants.
#[derive(Debug, Clone, Default)]
pub struct RetainedFilter {
    /// Only topics matching this MQTT topic filter (e.g. `sensors/#`).
    pub topic_filter: Option<String>,
    /// Cursor: only topics sorting after this one.
    pub after: Option<String>,
    /// Most items (capped at [`PAGE_LIMIT_MAX`]).
    pub limit: usize,
}

/// One retained message.
#[derive(Debug, Clone)]
pub struct RetainedInfo {
    /// The topic.
    pub topic: String,
    /// The payload (shared, not copied).
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: u8,
    /// Seconds until its Message Expiry Interval ends, if it has one.
    pub expires_in_s: Option<u64>,
}

/// Counts and gauges of one shard at one instant, for `/metrics` and
/// `/api/v1/status`.
#[derive(Debug, Clone, Default)]
pub struct ShardGauges {
    /// Sessions with a connected client.
    pub sessions_online: usize,
    /// Sessions without one (persistent, waiting for their client).
    pub sessions_offline: usize,
    /// Subscriptions held by the shard's sessions (shared ones included).
    pub subscriptions: usize,
    /// Retained messages in the shard's replica.
    pub retained: usize,
    /// Filters in the shard's route table replica.
    pub route_filters: usize,
    /// Deliveries queued in sessions behind their in-flight windows.
    pub queued: usize,
    /// QoS 1/2 deliveries in flight.
    pub inflight: usize,
    /// Budget bytes of queued deliveries held in memory (queue heads).
    pub queue_bytes_memory: u64,
    /// Budget bytes of queued deliveries only in the store (disk tails).
    pub queue_bytes_disk: u64,
}

/// Keeps the `limit` smallest items with keys after a cursor, in key order;
/// counts every item offered. Memory O(limit) whatever the input size.
#[derive(Debug)]
pub struct PageSelector<K: Ord, T> {
    heap: BinaryHeap<Keyed<K, T>>,
    limit: usize,
    total: usize,
}

#[derive(Debug)]
struct Keyed<K, T>(K, T);

impl<K: Ord, T> PartialEq for Keyed<K, T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl<K: Ord, T> Eq for Keyed<K, T> {}
impl<K: Ord, T> PartialOrd for Keyed<K, T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K: Ord, T> Ord for Keyed<K, T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl<K: Ord, T> PageSelector<K, T> {
    /// A selector of at most `limit` (capped at [`PAGE_LIMIT_MAX`]) items.
    pub fn new(limit: usize) -> PageSelector<K, T> {
        let limit = limit.min(PAGE_LIMIT_MAX);
        PageSelector {
            heap: BinaryHeap::with_capacity(limit + 1),
            limit,
            total: 0,
        }
    }

    /// Offers a matching item; `after_cursor` says whether its key sorts
    /// after the cursor. `make` builds the item only if it is kept.
    pub fn offer(&mut self, key: K, after_cursor: bool, make: impl FnOnce() -> T) {
        self.total += 1;
        if !after_cursor || self.limit == 0 {
            return;
        }
        if self.heap.len() == self.limit {
            if self.heap.peek().is_some_and(|top| top.0 <= key) {
                return;
            }
            self.heap.pop();
        }
        self.heap.push(Keyed(key, make()));
    }

    /// The page, in key order.
    pub fn finish(self) -> Page<T> {
        let items = self
            .heap
            .into_sorted_vec()
            .into_iter()
            .map(|k| k.1)
            .collect();
        Page {
            items,
            total: self.total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_keeps_the_first_items_after_the_cursor_in_order() {
        let mut sel = PageSelector::new(3);
        for k in [9, 4, 7, 1, 8, 2, 6, 3, 5] {
            sel.offer(k, k > 2, || k * 10);
        }
        let page = sel.finish();
        assert_eq!(page.items, vec![30, 40, 50]);
        assert_eq!(page.total, 9);
    }

    #[test]
    fn selector_caps_the_limit() {
        let mut sel = PageSelector::new(usize::MAX);
        for k in 0..PAGE_LIMIT_MAX + 10 {
            sel.offer(k, true, || k);
        }
        assert_eq!(sel.finish().items.len(), PAGE_LIMIT_MAX);
    }
}
