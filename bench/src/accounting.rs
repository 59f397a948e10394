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

/// One subscriber's accounting of every publisher of a run.
#[derive(Debug, Clone)]
pub struct Accounting {
    run_id: u32,
    publishers: Vec<SeqTracker>,
    foreign: u64,
    corrupt: u64,
}

impl Accounting {
    /// Accounting for the run `run_id` with publishers `0..publishers`.
    pub fn new(run_id: u32, publishers: u32) -> Accounting {
        Accounting {
            run_id,
            publishers: vec![SeqTracker::default(); publishers as usize],
            foreign: 0,
            corrupt: 0,
        }
    }

    /// Records one arrival. `produced` is how many messages the header's publisher
    /// has produced so far (a bound: a higher sequence number is corrupt, and must
    /// not make the bitmap grow).
    pub fn record(&mut self, h: &Header, produced: u64) -> Arrival {
        if h.run_id != self.run_id {
            self.foreign += 1;
            return Arrival::Foreign;
        }
        match self.publishers.get_mut(h.publisher as usize) {
            Some(t) if h.seq < produced => t.record(h.seq),
            _ => {
                self.corrupt += 1;
                Arrival::Corrupt
            }
        }
    }

    /// Records a message whose payload is too short to carry a bench header.
    pub fn record_unparsable(&mut self) -> Arrival {
        self.corrupt += 1;
        Arrival::Corrupt
    }

    /// The totals, given how many messages each publisher sent (`sent[p]` for
    /// publisher `p`).
    pub fn tally(&self, sent: &[u64]) -> Tally {
        assert_eq!(sent.len(), self.publishers.len(), "one count per publisher");
        let mut t = Tally {
            foreign: self.foreign,
            corrupt: self.corrupt,
            ..Tally::default()
        };
        for (tracker, &sent) in self.publishers.iter().zip(sent) {
            let distinct = tracker.distinct_below(sent);
            t.expected += sent;
            t.distinct += distinct;
            t.lost += sent - distinct;
            t.duplicates += tracker.duplicates;
            t.out_of_order += tracker.out_of_order;
            t.gaps += tracker.gaps;
        }
        t
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
}
