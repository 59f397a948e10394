//! Outbound topic aliases (MQTT 5 section 3.3.2.3.4, broker to client): a bounded
//! per-connection map from topic to alias, least recently used alias reused first.
//!
//! Exists per v5 connection whose CONNECT announced a Topic Alias Maximum above 0,
//! created on its first delivery, dropped with the connection (aliases never
//! survive a reconnect). Lives on the connection's owner shard only.
//!
//! The map is planned and committed in two steps: the engine plans the alias of a
//! delivery, checks the resulting packet against the client's Maximum Packet
//! Size, and commits only when the packet is written, so the map never names an
//! alias the client has not seen.

use std::collections::HashMap;

use tessera_proto::Str;

/// Marks the ends of the recency list.
const NONE: u16 = u16::MAX;

/// What a delivery does with its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasPlan {
    /// The client knows the topic by this alias: send an empty topic and the alias.
    Known(u16),
    /// Send the topic and this alias, which the client then binds to the topic
    /// (a fresh alias, or the least recently used one, rebound).
    Bind(u16),
}

impl AliasPlan {
    /// The alias to put in the PUBLISH.
    pub fn alias(self) -> u16 {
        match self {
            AliasPlan::Known(a) | AliasPlan::Bind(a) => a,
        }
    }
}

#[derive(Debug)]
struct Slot {
    topic: Str,
    /// Neighbours in the recency list (slot indexes; `NONE` at the ends).
    newer: u16,
    older: u16,
}

/// Topic aliases one connection has bound, at most `alias_max` of them.
#[derive(Debug)]
pub struct OutboundAliases {
    alias_max: u16,
    by_topic: HashMap<Str, u16>,
    /// Slot `i` holds alias `i + 1`.
    slots: Vec<Slot>,
    /// Most and least recently used slots.
    newest: u16,
    oldest: u16,
}

impl OutboundAliases {
    /// An empty map of at most `alias_max` aliases (1 to 65,534: the recency
    /// list keeps `u16::MAX` as its end marker).
    pub fn new(alias_max: u16) -> OutboundAliases {
        assert!(
            (1..NONE).contains(&alias_max),
            "alias maximum {alias_max} out of range"
        );
        OutboundAliases {
            alias_max,
            by_topic: HashMap::new(),
            slots: Vec::new(),
            newest: NONE,
            oldest: NONE,
        }
    }

    /// Aliases bound so far.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True before the first alias is bound.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// What sending `topic` would do; changes nothing.
    pub fn plan(&self, topic: &Str) -> AliasPlan {
        if let Some(&alias) = self.by_topic.get(topic) {
            return AliasPlan::Known(alias);
        }
        if self.slots.len() < usize::from(self.alias_max) {
            AliasPlan::Bind(self.slots.len() as u16 + 1)
        } else {
            AliasPlan::Bind(self.oldest + 1)
        }
    }

    /// Records that a PUBLISH carrying `plan` for `topic` was written.
    pub fn commit(&mut self, topic: &Str, plan: AliasPlan) {
        let slot = plan.alias() - 1;
        match plan {
            AliasPlan::Known(_) => {
                assert!(self.slots[usize::from(slot)].topic == *topic, "stale plan");
                self.unlink(slot);
            }
            AliasPlan::Bind(_) if usize::from(slot) == self.slots.len() => {
                assert!(slot < self.alias_max, "alias beyond the maximum");
                // The topic may be a view into a publisher's read buffer: keep a copy.
                let topic = topic.compact();
                self.by_topic.insert(topic.clone(), slot + 1);
                self.slots.push(Slot {
                    topic,
                    newer: NONE,
                    older: NONE,
                });
            }
            AliasPlan::Bind(_) => {
                assert!(slot == self.oldest, "stale plan");
                self.unlink(slot);
                let topic = topic.compact();
                let old =
                    std::mem::replace(&mut self.slots[usize::from(slot)].topic, topic.clone());
                self.by_topic.remove(&old);
                self.by_topic.insert(topic, slot + 1);
            }
        }
        self.push_newest(slot);
        debug_assert_eq!(self.by_topic.len(), self.slots.len());
    }

    fn unlink(&mut self, slot: u16) {
        let Slot { newer, older, .. } = self.slots[usize::from(slot)];
        match newer {
            NONE => self.newest = older,
            n => self.slots[usize::from(n)].older = older,
        }
        match older {
            NONE => self.oldest = newer,
            o => self.slots[usize::from(o)].newer = newer,
        }
    }

    fn push_newest(&mut self, slot: u16) {
        let s = &mut self.slots[usize::from(slot)];
        s.newer = NONE;
        s.older = self.newest;
        match self.newest {
            NONE => self.oldest = slot,
            n => self.slots[usize::from(n)].newer = slot,
        }
        self.newest = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(m: &mut OutboundAliases, topic: &'static str) -> AliasPlan {
        let topic = Str::from_static(topic);
        let plan = m.plan(&topic);
        m.commit(&topic, plan);
        plan
    }

    #[test]
    fn binds_fresh_aliases_then_reuses_the_least_recently_used() {
        let mut m = OutboundAliases::new(2);
        assert!(m.is_empty());
        assert_eq!(send(&mut m, "a"), AliasPlan::Bind(1));
        assert_eq!(send(&mut m, "b"), AliasPlan::Bind(2));
        assert_eq!(send(&mut m, "a"), AliasPlan::Known(1));
        // Full: "b" is the least recently used, so its alias is rebound.
        assert_eq!(send(&mut m, "c"), AliasPlan::Bind(2));
        assert_eq!(send(&mut m, "c"), AliasPlan::Known(2));
        assert_eq!(send(&mut m, "b"), AliasPlan::Bind(1));
        assert_eq!(send(&mut m, "c"), AliasPlan::Known(2));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn a_plan_not_committed_changes_nothing() {
        let mut m = OutboundAliases::new(1);
        let t = Str::from_static("t");
        assert_eq!(m.plan(&t), AliasPlan::Bind(1));
        assert_eq!(m.plan(&t), AliasPlan::Bind(1), "not bound before commit");
        assert!(m.is_empty());
        assert_eq!(send(&mut m, "u"), AliasPlan::Bind(1));
        assert_eq!(m.plan(&t), AliasPlan::Bind(1), "rebinding the only alias");
        assert_eq!(send(&mut m, "u"), AliasPlan::Known(1));
    }

    /// The recency list stays consistent under a long mixed workload: every
    /// alias in use maps back to its topic, and the oldest is the one rebound.
    #[test]
    fn recency_order_matches_a_reference_model() {
        let topics: Vec<Str> = (0..7)
            .map(|i| Str::try_from(format!("t/{i}")).unwrap())
            .collect();
        let mut m = OutboundAliases::new(4);
        // Reference: topics by recency, most recent last, with their alias.
        let mut model: Vec<(usize, u16)> = Vec::new();
        let mut x: u64 = 12345;
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let t = (x >> 33) as usize % topics.len();
            let plan = m.plan(&topics[t]);
            let expected = match model.iter().position(|(mt, _)| *mt == t) {
                Some(i) => AliasPlan::Known(model.remove(i).1),
                None if model.len() < 4 => AliasPlan::Bind(model.len() as u16 + 1),
                None => AliasPlan::Bind(model.remove(0).1),
            };
            assert_eq!(plan, expected);
            model.push((t, plan.alias()));
            m.commit(&topics[t], plan);
        }
    }
}
