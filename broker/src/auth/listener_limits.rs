//! Per-listener abuse limits on one shard: connections held and new
//! connections per second, for listeners whose `[[listener]]` table sets
//! `max_connections` or `connect_rate_per_s` (the process-wide `[limits]`
//! apply as well). Like the global limits, each shard enforces its share
//! (the configured value divided by the shard count, rounded up): shards own
//! their counters, so no counter is shared between threads.
//!
//! Lives on one shard (`Shard::listener_limits`), created at boot.

use std::cell::{Cell, RefCell};
use std::time::Instant;

use crate::config::ListenerConfig;

/// A token bucket of `rate` tokens per second with a one-second burst.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        let cap = self.rate.max(1.0);
        self.tokens = (self.tokens + elapsed * self.rate).min(cap);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct Slot {
    held: Cell<usize>,
    held_max: Option<usize>,
    rate: Option<RefCell<Bucket>>,
}

/// The per-listener counters of one shard, by listener id.
#[derive(Debug)]
pub struct ListenerLimits {
    slots: Vec<Slot>,
}

impl ListenerLimits {
    /// This shard's share of every listener's limits.
    pub fn new(listeners: &[ListenerConfig], shard_count: usize) -> ListenerLimits {
        let now = Instant::now();
        let slots = listeners
            .iter()
            .map(|l| Slot {
                held: Cell::new(0),
                held_max: l
                    .max_connections
                    .map(|m| (m as usize).div_ceil(shard_count)),
                rate: l.connect_rate_per_s.filter(|r| *r > 0).map(|r| {
                    let rate = f64::from(r) / shard_count as f64;
                    RefCell::new(Bucket {
                        rate,
                        tokens: rate.max(1.0),
                        at: now,
                    })
                }),
            })
            .collect();
        ListenerLimits { slots }
    }

    /// Whether a new connection on `listener` is within its connect rate.
    pub fn take_connect(&self, listener: usize, now: Instant) -> bool {
        self.slots[listener]
            .rate
            .as_ref()
            .is_none_or(|b| b.borrow_mut().take(now))
    }

    /// Counts a served connection; false (and nothing counted) when the
    /// listener holds its maximum on this shard.
    pub fn hold(&self, listener: usize) -> bool {
        let s = &self.slots[listener];
        if s.held_max.is_some_and(|m| s.held.get() >= m) {
            return false;
        }
        s.held.set(s.held.get() + 1);
        true
    }

    /// Connections held per listener (by listener id), for metrics.
    pub fn held(&self) -> Vec<usize> {
        self.slots.iter().map(|s| s.held.get()).collect()
    }

    /// A connection counted by [`ListenerLimits::hold`] ended.
    pub fn release(&self, listener: usize) {
        let s = &self.slots[listener];
        assert!(s.held.get() > 0, "listener connection count underflow");
        s.held.set(s.held.get() - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ListenerKind;

    #[test]
    fn each_shard_enforces_its_share() {
        let mut l = ListenerConfig::new(ListenerKind::Mqtt, "127.0.0.1:1".parse().unwrap());
        l.max_connections = Some(3);
        l.connect_rate_per_s = Some(4);
        let open = ListenerConfig::new(ListenerKind::Ws, "127.0.0.1:2".parse().unwrap());
        let limits = ListenerLimits::new(&[l, open], 2);
        assert!(
            limits.hold(0) && limits.hold(0),
            "ceil(3 / 2) = 2 per shard"
        );
        assert!(!limits.hold(0));
        limits.release(0);
        assert!(limits.hold(0));
        let t = Instant::now();
        assert!(limits.take_connect(0, t) && limits.take_connect(0, t));
        assert!(
            !limits.take_connect(0, t),
            "4/s over 2 shards: a burst of 2"
        );
        assert!((0..100).all(|_| limits.hold(1) && limits.take_connect(1, t)));
    }
}
