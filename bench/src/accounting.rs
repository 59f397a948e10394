//! Loss, duplicate and order accounting for one subscriber: which sequence numbers of
//! each publisher arrived, how many twice, how many after a later one.
//!
//! Sans-IO: the subscriber feeds it the parsed payload header of each message and,
//! after the run, the number of messages each publisher sent; it answers with a
//! [`Tally`]. Exact, not sampled: one bit per sequence number per publisher, so memory
//! is (messages received) / 8 bytes, grown as sequence numbers grow.

use crate::payload::Header;

/// What one arrival was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next sequence number after the highest seen so far.
    InOrder,
    /// New, but higher than the next expected one: the numbers in between are
    /// missing for now (lost, or still to come out of order).
    AfterGap,
    /// New, but lower than one that already arrived.
    OutOfOrder,
    /// Already seen.
    Duplicate,
    /// From another run on the same broker; ignored.
    Foreign,
    /// Ours, but naming a publisher that does not exist or a sequence number its
    /// publisher has not produced: a corrupted message.
    Corrupt,
}

/// The sequence numbers seen from one publisher.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    /// Bit `seq` is set once `seq` arrived.
    seen: Vec<u64>,
    distinct: u64,
    duplicates: u64,
    out_of_order: u64,
    gaps: u64,
    /// One past the highest sequence number seen.
    next_expected: u64,
}

impl SeqTracker {
    /// Records an arrival of `seq`.
    pub fn record(&mut self, seq: u64) -> Arrival {
        let word = (seq / 64) as usize;
        let mask = 1u64 << (seq % 64);
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & mask != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.seen[word] |= mask;
        self.distinct += 1;
        if seq == self.next_expected {
            self.next_expected += 1;
            Arrival::InOrder
        } else if seq > self.next_expected {
            self.gaps += 1;
            self.next_expected = seq + 1;
            Arrival::AfterGap
        } else {
            self.out_of_order += 1;
            Arrival::OutOfOrder
        }
    }

    /// Distinct sequence numbers below `sent` that arrived.
    fn distinct_below(&self, sent: u64) -> u64 {
        if sent >= self.next_expected {
            return self.distinct;
        }
        let full = (sent / 64) as usize;
        let mut n: u64 = self.seen[..full]
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let rest = sent % 64;
        if rest > 0 {
            n += u64::from((self.seen[full] & ((1u64 << rest) - 1)).count_ones());
        }
        n
    }
}

/// Totals over every publisher one subscriber should have heard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Messages the publishers sent (the expected count).
    pub expected: u64,
    /// Distinct messages that arrived.
    pub distinct: u64,
    /// Expected messages that never arrived.
    pub lost: u64,
    /// Arrivals of a message already seen.
    pub duplicates: u64,
    /// Arrivals after a later message of the same publisher.
    pub out_of_order: u64,
    /// Forward jumps in a publisher's sequence (each is a loss or a reordering).
    pub gaps: u64,
    /// Messages of another run, ignored.
    pub foreign: u64,
    /// Corrupted messages (unknown publisher, or a sequence number not yet sent).
    pub corrupt: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.expected += o.expected;
        self.distinct += o.distinct;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.gaps += o.gaps;
        self.foreign += o.foreign;
        self.corrupt += o.corrupt;
    }
}

/// Highest sequence number an open accounting ([`Accounting::open`]) tracks:
/// its bitmap is at most 32 MiB per publisher.
pub const OPEN_SEQ_MAX: u64 = 1 << 28;

/// Most publishers an open accounting tracks; messages of further ones are
/// counted as foreign.
pub const OPEN_PUBLISHERS_MAX: usize = 100_000;

/// One subscriber's accounting of the publishers it should hear.
///
/// Closed (the subscriber and its publishers are in one run): messages of the
/// run's publishers named in `ids` are tracked, those of another run are foreign,
/// those of a publisher it should not hear are corrupt (misrouted). Open
/// (`bench sub`, publishers elsewhere): every bench payload is tracked per
/// (run id, publisher), and loss can only be judged below the highest sequence
/// number seen.
#[derive(Debug, Clone)]
pub struct Accounting {
    /// `None`: open.
    run_id: Option<u32>,
    /// Closed: the publishers this subscriber should hear, ascending.
    ids: Vec<u32>,
    /// Closed: `trackers[k]` for publisher `ids[k]`.
    trackers: Vec<SeqTracker>,
    /// Open: per (run id, publisher).
    open: std::collections::HashMap<(u32, u32), SeqTracker>,
    foreign: u64,
    corrupt: u64,
}

impl Accounting {
    /// Accounting for the run `run_id` with publishers `0..publishers`, all of
    /// which this subscriber should hear.
    pub fn new(run_id: u32, publishers: u32) -> Accounting {
        Accounting::for_publishers(run_id, (0..publishers).collect())
    }

    /// Accounting for the run `run_id` when this subscriber should hear the
    /// publishers `ids` (ascending, distinct).
    pub fn for_publishers(run_id: u32, ids: Vec<u32>) -> Accounting {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ascending ids");
        Accounting {
            run_id: Some(run_id),
            trackers: vec![SeqTracker::default(); ids.len()],
            ids,
            open: Default::default(),
            foreign: 0,
            corrupt: 0,
        }
    }

    /// Open accounting: publishers of any run, in other processes.
    pub fn open() -> Accounting {
        Accounting {
            run_id: None,
            ids: Vec::new(),
            trackers: Vec::new(),
            open: Default::default(),
            foreign: 0,
            corrupt: 0,
        }
    }

    /// True for open accounting ([`Accounting::open`]).
    pub fn is_open(&self) -> bool {
        self.run_id.is_none()
    }

    fn slot(&self, publisher: u32) -> Option<usize> {
        // Fan-in accounts for every publisher 0..n: index directly.
        match self.ids.get(publisher as usize) {
            Some(&id) if id == publisher => Some(publisher as usize),
            _ => self.ids.binary_search(&publisher).ok(),
        }
    }

    /// Records one arrival. `produced` is how many messages the header's publisher
    /// has produced so far (a bound: a higher sequence number is corrupt, and must
    /// not make the bitmap grow); open accounting ignores it.
    pub fn record(&mut self, h: &Header, produced: u64) -> Arrival {
        let Some(run_id) = self.run_id else {
            return self.record_open(h);
        };
        if h.run_id != run_id {
            self.foreign += 1;
            return Arrival::Foreign;
        }
        match self.slot(h.publisher) {
            Some(k) if h.seq < produced => self.trackers[k].record(h.seq),
            _ => {
                self.corrupt += 1;
                Arrival::Corrupt
            }
        }
    }

    fn record_open(&mut self, h: &Header) -> Arrival {
        if h.seq >= OPEN_SEQ_MAX {
            self.corrupt += 1;
            return Arrival::Corrupt;
        }
        let full = self.open.len() >= OPEN_PUBLISHERS_MAX;
        match self.open.get_mut(&(h.run_id, h.publisher)) {
            Some(t) => t.record(h.seq),
            None if full => {
                self.foreign += 1;
                Arrival::Foreign
            }
            None => {
                let mut t = SeqTracker::default();
                let a = t.record(h.seq);
                self.open.insert((h.run_id, h.publisher), t);
                a
            }
        }
    }

    /// Records a message whose payload is too short to carry a bench header:
    /// corrupt when closed, foreign (someone else's message) when open.
    pub fn record_unparsable(&mut self) -> Arrival {
        if self.run_id.is_none() {
            self.foreign += 1;
            return Arrival::Foreign;
        }
        self.corrupt += 1;
        Arrival::Corrupt
    }

    /// The totals, given how many messages each publisher of the run sent
    /// (`sent[p]` for publisher `p`; only those this subscriber should hear
    /// count). Open accounting ignores `sent` and judges loss below the highest
    /// sequence number seen of each publisher.
    pub fn tally(&self, sent: &[u64]) -> Tally {
        let mut t = Tally {
            foreign: self.foreign,
            corrupt: self.corrupt,
            ..Tally::default()
        };
        let add = |t: &mut Tally, tracker: &SeqTracker, sent: u64| {
            let distinct = tracker.distinct_below(sent);
            t.expected += sent;
            t.distinct += distinct;
            t.lost += sent - distinct;
            t.duplicates += tracker.duplicates;
            t.out_of_order += tracker.out_of_order;
            t.gaps += tracker.gaps;
        };
        if self.run_id.is_none() {
            for tracker in self.open.values() {
                add(&mut t, tracker, tracker.next_expected);
            }
            return t;
        }
        for (tracker, &id) in self.trackers.iter().zip(&self.ids) {
            let sent = *sent.get(id as usize).expect("one count per publisher");
            add(&mut t, tracker, sent);
        }
        t
    }

    /// The accounting of a shared-subscription group from its members' (closed,
    /// same publishers): a message is delivered once when exactly one member got
    /// it once. Copies at several members count as duplicates; out-of-order counts
    /// are the members' own (each member sees its share of a publisher's
    /// sequence); gaps, meaningless across members, are not counted.
    pub fn union(members: &[Accounting]) -> Accounting {
        let first = members.first().expect("a group has members");
        let mut u =
            Accounting::for_publishers(first.run_id.expect("closed accounting"), first.ids.clone());
        for m in members {
            assert_eq!(
                m.ids, u.ids,
                "members of one group hear the same publishers"
            );
            u.foreign += m.foreign;
            u.corrupt += m.corrupt;
            for (ut, mt) in u.trackers.iter_mut().zip(&m.trackers) {
                if ut.seen.len() < mt.seen.len() {
                    ut.seen.resize(mt.seen.len(), 0);
                }
                let mut overlap = 0u64;
                for (a, &b) in ut.seen.iter_mut().zip(&mt.seen) {
                    overlap += u64::from((*a & b).count_ones());
                    *a |= b;
                }
                ut.distinct += mt.distinct - overlap;
                ut.duplicates += mt.duplicates + overlap;
                ut.out_of_order += mt.out_of_order;
                ut.next_expected = ut.next_expected.max(mt.next_expected);
            }
        }
        u
    }

    /// Per publisher: distinct messages and duplicate arrivals, for publishers in
    /// `ids` order. Used to merge subscribers' results across processes.
    pub fn per_publisher(&self) -> impl Iterator<Item = (u32, u64, u64)> + '_ {
        self.ids
            .iter()
            .zip(&self.trackers)
            .map(|(&id, t)| (id, t.distinct, t.duplicates))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_below_counts_bits_across_words() {
        let mut t = SeqTracker::default();
        for seq in [0, 1, 63, 64, 65, 130] {
            t.record(seq);
        }
        assert_eq!(t.distinct_below(0), 0);
        assert_eq!(t.distinct_below(2), 2);
        assert_eq!(t.distinct_below(64), 3);
        assert_eq!(t.distinct_below(66), 5);
        assert_eq!(t.distinct_below(131), 6);
        assert_eq!(t.distinct_below(10_000), 6);
    }

    fn header(publisher: u32, seq: u64) -> Header {
        Header {
            run_id: 7,
            publisher,
            seq,
            intended_ns: 0,
        }
    }

    #[test]
    fn group_union_counts_each_message_once_and_copies_as_duplicates() {
        let mut a = Accounting::for_publishers(7, vec![0, 3]);
        let mut b = Accounting::for_publishers(7, vec![0, 3]);
        for seq in [0, 2, 4] {
            a.record(&header(0, seq), 10);
        }
        for seq in [1, 3, 4] {
            b.record(&header(0, seq), 10);
        }
        b.record(&header(3, 0), 10);
        // Publisher 1 is not one this group hears: misrouted.
        assert_eq!(b.record(&header(1, 0), 10), Arrival::Corrupt);
        let t = Accounting::union(&[a, b]).tally(&[5, 9, 9, 1]);
        assert_eq!(t.expected, 6);
        assert_eq!(t.distinct, 6);
        assert_eq!(t.lost, 0);
        assert_eq!(t.duplicates, 1, "seq 4 reached both members");
        assert_eq!(t.out_of_order, 0);
        assert_eq!(t.corrupt, 1);
    }

    #[test]
    fn open_accounting_tracks_any_run_and_judges_gaps() {
        let mut o = Accounting::open();
        for (run, seq) in [(1, 0), (1, 1), (1, 3), (2, 0), (2, 0)] {
            o.record(
                &Header {
                    run_id: run,
                    publisher: 0,
                    seq,
                    intended_ns: 0,
                },
                0,
            );
        }
        assert_eq!(o.record_unparsable(), Arrival::Foreign);
        let t = o.tally(&[]);
        assert_eq!((t.distinct, t.lost, t.duplicates, t.foreign), (4, 1, 1, 1));
    }
}
