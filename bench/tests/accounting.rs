//! Goal: the loss / duplicate / order accounting catches each kind of fault on its
//! own. Method: feed `Accounting` a scripted arrival sequence with one injected
//! fault (a duplicate, a gap, a reordering, a stray message) and check the exact
//! `Tally`.

use tessera_bench::accounting::{Accounting, Arrival, Tally};
use tessera_bench::payload::Header;

const RUN: u32 = 0xB3_4C_11;

fn header(publisher: u32, seq: u64) -> Header {
    Header {
        run_id: RUN,
        publisher,
        seq,
        intended_ns: 0,
    }
}

/// Records `seqs` of publisher 0 (each already produced) and returns the arrivals.
fn feed(acc: &mut Accounting, publisher: u32, seqs: &[u64]) -> Vec<Arrival> {
    seqs.iter()
        .map(|&s| acc.record(&header(publisher, s), u64::MAX))
        .collect()
}

#[test]
fn clean_sequence_tallies_nothing_wrong() {
    let mut acc = Accounting::new(RUN, 1);
    let seqs: Vec<u64> = (0..1000).collect();
    assert!(
        feed(&mut acc, 0, &seqs)
            .iter()
            .all(|a| *a == Arrival::InOrder)
    );
    assert_eq!(
        acc.tally(&[1000]),
        Tally {
            expected: 1000,
            distinct: 1000,
            ..Tally::default()
        }
    );
}

#[test]
fn injected_duplicate_is_counted_and_not_mistaken_for_delivery() {
    let mut acc = Accounting::new(RUN, 1);
    let arrivals = feed(&mut acc, 0, &[0, 1, 2, 2, 3]);
    assert_eq!(arrivals[3], Arrival::Duplicate);
    let t = acc.tally(&[4]);
    assert_eq!((t.duplicates, t.lost, t.distinct), (1, 0, 4));
    assert_eq!((t.out_of_order, t.gaps), (0, 0));
}

#[test]
fn injected_gap_is_a_loss_when_never_filled() {
    let mut acc = Accounting::new(RUN, 1);
    let arrivals = feed(&mut acc, 0, &[0, 1, 3, 4]);
    assert_eq!(arrivals[2], Arrival::AfterGap);
    let t = acc.tally(&[5]);
    assert_eq!((t.lost, t.gaps, t.duplicates, t.out_of_order), (1, 1, 0, 0));
}

#[test]
fn lost_tail_is_counted_from_the_sent_count() {
    // The last two messages never arrive: no gap is ever seen, only the count
    // of what was sent reveals them.
    let mut acc = Accounting::new(RUN, 1);
    feed(&mut acc, 0, &[0, 1, 2]);
    let t = acc.tally(&[5]);
    assert_eq!((t.lost, t.gaps), (2, 0));
}

#[test]
fn reordering_is_out_of_order_not_loss() {
    let mut acc = Accounting::new(RUN, 1);
    let arrivals = feed(&mut acc, 0, &[0, 2, 1, 3]);
    assert_eq!(
        arrivals,
        [
            Arrival::InOrder,
            Arrival::AfterGap,
            Arrival::OutOfOrder,
            Arrival::InOrder
        ]
    );
    let t = acc.tally(&[4]);
    assert_eq!((t.lost, t.out_of_order, t.gaps), (0, 1, 1));
}

#[test]
fn publishers_are_accounted_separately() {
    // Publisher 1's gap does not hide behind publisher 0's complete sequence.
    let mut acc = Accounting::new(RUN, 2);
    feed(&mut acc, 0, &[0, 1, 2]);
    feed(&mut acc, 1, &[0, 2]);
    let t = acc.tally(&[3, 3]);
    assert_eq!((t.expected, t.distinct, t.lost), (6, 5, 1));
}

#[test]
fn foreign_and_corrupt_messages_are_set_apart() {
    let mut acc = Accounting::new(RUN, 1);
    let other_run = Header {
        run_id: RUN + 1,
        ..header(0, 0)
    };
    assert_eq!(acc.record(&other_run, 10), Arrival::Foreign);
    // An unknown publisher, and a sequence number not yet produced.
    assert_eq!(acc.record(&header(7, 0), 10), Arrival::Corrupt);
    assert_eq!(acc.record(&header(0, 10), 10), Arrival::Corrupt);
    assert_eq!(acc.record_unparsable(), Arrival::Corrupt);
    let t = acc.tally(&[0]);
    assert_eq!((t.foreign, t.corrupt, t.distinct), (1, 3, 0));
}
