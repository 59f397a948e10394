//! Which shard owns a session: `shard_for(client_id, shard_count)`.
//!
//! The owner is the jump consistent hash (Lamping & Veach, 2014, arXiv:1406.2294) of the
//! XXH3-64 hash of the ClientID bytes. Both halves are chosen for stability, because
//! persisted sessions live in the owner shard's store (`data_dir/shard-K/`) and a changed
//! mapping would strand them:
//! - XXH3-64 (seed 0) is a specified, platform-independent hash; std's `DefaultHasher` is
//!   explicitly allowed to change between Rust releases.
//! - Jump hash needs no table, and when the shard count grows from n to n+1 only about
//!   1/(n+1) of the sessions move, all of them to the new shard, which keeps start-up
//!   re-partitioning small.
//!
//! The `known_vectors_never_change` test pins the mapping; if it fails, the change breaks
//! every existing data directory.
//!
//! This is a pure function, usable on every shard and on the boot thread.

use xxhash_rust::xxh3::xxh3_64;

/// The most shards [`shard_for`] accepts; jump hash works on 31-bit bucket counts.
pub const SHARD_COUNT_MAX: usize = i32::MAX as usize;

/// Prefix of server-assigned ClientIDs (MQTT 5 "Assigned Client Identifier").
pub const ASSIGNED_CLIENT_ID_PREFIX: &str = "tessera-";

/// The shard in `0..shard_count` that owns the session of `client_id`.
///
/// # Panics
/// If `shard_count` is 0 or above [`SHARD_COUNT_MAX`]: the shard count is fixed at boot and
/// validated there, so this is a programmer error.
pub fn shard_for(client_id: &[u8], shard_count: usize) -> usize {
    assert!(
        (1..=SHARD_COUNT_MAX).contains(&shard_count),
        "shard_count {shard_count} out of 1..={SHARD_COUNT_MAX}"
    );
    let shard = jump_consistent_hash(xxh3_64(client_id), shard_count);
    assert!(shard < shard_count);
    shard
}

/// Jump consistent hash: maps `key` to a bucket in `0..buckets`.
///
/// A direct transcription of the paper's reference code. The floating-point steps are
/// exactly rounded IEEE 754 operations, so the result is the same on every platform.
fn jump_consistent_hash(mut key: u64, buckets: usize) -> usize {
    let buckets = buckets as i64;
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1_i64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

/// Generates a ClientID for a client that connected with an empty one, chosen so that
/// [`shard_for`] maps it to `shard`, the shard that accepted the connection (no hand-off).
///
/// The id is [`ASSIGNED_CLIENT_ID_PREFIX`] followed by 16 lowercase hex digits from a
/// splitmix64 sequence advanced through `seed`. Each try lands on `shard` with probability
/// 1/`shard_count`, so about `shard_count` tries are expected. Ids from one seed sequence do
/// not repeat before 2^64 calls (splitmix64 is a bijection of its counter), but the caller
/// seeds each shard randomly and must still check that no session with the id exists.
///
/// # Panics
/// If `shard >= shard_count`, or if no id is found in `64 * shard_count` tries (probability
/// below e^-64 for a working hash, so it means the hash is broken).
pub fn assign_client_id(shard: usize, shard_count: usize, seed: &mut u64) -> String {
    assign_client_id_with_tries(shard, shard_count, seed).0
}

/// [`assign_client_id`], also returning how many candidates were tried.
fn assign_client_id_with_tries(
    shard: usize,
    shard_count: usize,
    seed: &mut u64,
) -> (String, usize) {
    assert!(shard < shard_count, "shard {shard} out of 0..{shard_count}");
    let tries_max = shard_count.saturating_mul(64);
    for tries in 1..=tries_max {
        let id = format!("{ASSIGNED_CLIENT_ID_PREFIX}{:016x}", splitmix64(seed));
        if shard_for(id.as_bytes(), shard_count) == shard {
            return (id, tries);
        }
    }
    panic!("no client id for shard {shard} of {shard_count} in {tries_max} tries");
}

/// splitmix64 (Steele, Lea & Flood): advances `state` and returns the next output.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: usize = 100_000;

    fn ids() -> impl Iterator<Item = String> {
        (0..IDS).map(|i| format!("client-{i}"))
    }

    #[test]
    fn one_shard_owns_everything() {
        assert_eq!(shard_for(b"", 1), 0);
        assert_eq!(shard_for(b"anything", 1), 0);
    }

    #[test]
    #[should_panic(expected = "shard_count 0")]
    fn zero_shards_is_a_programmer_error() {
        shard_for(b"x", 0);
    }

    /// Every shard gets within 5% of its fair share; the standard deviation of a share is
    /// at most ~0.6% of it at these sizes, so this cannot flake.
    #[test]
    fn distribution_is_roughly_uniform() {
        for n in 2..=8 {
            let mut counts = vec![0usize; n];
            for id in ids() {
                counts[shard_for(id.as_bytes(), n)] += 1;
            }
            let fair = IDS as f64 / n as f64;
            for (shard, &c) in counts.iter().enumerate() {
                let dev = (c as f64 - fair).abs() / fair;
                assert!(dev < 0.05, "n={n} shard={shard} count={c} fair={fair:.0}");
            }
        }
    }

    /// Growing from n to n+1 shards moves about 1/(n+1) of the ids, all to the new shard.
    #[test]
    fn growing_by_one_shard_moves_few_ids_and_only_to_the_new_shard() {
        for n in 1..=8 {
            let mut moved = 0usize;
            for id in ids() {
                let before = shard_for(id.as_bytes(), n);
                let after = shard_for(id.as_bytes(), n + 1);
                if before != after {
                    assert_eq!(after, n, "{id} moved from {before} to an old shard {after}");
                    moved += 1;
                }
            }
            let fraction = moved as f64 / IDS as f64;
            let expected = 1.0 / (n + 1) as f64;
            assert!(
                (fraction - expected).abs() < 0.01,
                "n={n} moved {fraction:.4}"
            );
        }
    }

    /// Pins the mapping. Persisted sessions depend on it: never update these numbers
    /// without a data-directory migration.
    #[test]
    fn known_vectors_never_change() {
        // XXH3-64 of the empty input, seed 0, from the xxHash specification's test vectors.
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        // (client id, shard count, owner).
        let cases: &[(&[u8], usize, usize)] = &[
            (b"", 2, 0),
            (b"client-1", 2, 0),
            (b"client-1", 8, 0),
            (b"sensor/42", 3, 1),
            (b"client-2", 2, 1),
            (b"client-3", 2, 0),
            (b"client-4", 2, 1),
            (b"tessera-0000000000000000", 16, 10),
            ("\u{00e9}t\u{00e9}".as_bytes(), 5, 1),
            (
                b"a-much-longer-client-identifier-over-sixty-four-bytes-long-0123456789",
                64,
                7,
            ),
        ];
        for &(id, n, want) in cases {
            assert_eq!(
                shard_for(id, n),
                want,
                "id={:?} n={n}",
                String::from_utf8_lossy(id)
            );
        }
        // Jump hash alone, on fixed keys; cross-checked against the paper's C++ reference
        // code compiled with g++.
        assert_eq!(jump_consistent_hash(0, 1), 0);
        assert_eq!(jump_consistent_hash(0, 1000), 0);
        assert_eq!(jump_consistent_hash(u64::MAX, 1000), 313);
        assert_eq!(jump_consistent_hash(0xDEAD_BEEF, 7), 5);
    }

    #[test]
    fn assigned_ids_land_on_the_requested_shard() {
        let mut seed = 0x1234_5678;
        for n in 1..=8 {
            for shard in 0..n {
                for _ in 0..50 {
                    let id = assign_client_id(shard, n, &mut seed);
                    assert_eq!(shard_for(id.as_bytes(), n), shard);
                    assert!(id.starts_with(ASSIGNED_CLIENT_ID_PREFIX));
                    assert_eq!(id.len(), ASSIGNED_CLIENT_ID_PREFIX.len() + 16);
                    assert!(
                        id[ASSIGNED_CLIENT_ID_PREFIX.len()..]
                            .bytes()
                            .all(|b| { b.is_ascii_digit() || (b'a'..=b'f').contains(&b) })
                    );
                }
            }
        }
    }

    /// Tries are geometric with mean n; the mean over 10,000 ids is well under 1.2 n.
    #[test]
    fn expected_number_of_tries_is_about_the_shard_count() {
        let mut seed = 42;
        for n in [2, 4, 8, 16] {
            let mut total = 0usize;
            let mut worst = 0usize;
            for i in 0..10_000 {
                let (_, tries) = assign_client_id_with_tries(i % n, n, &mut seed);
                total += tries;
                worst = worst.max(tries);
            }
            let mean = total as f64 / 10_000.0;
            assert!(mean < 1.2 * n as f64, "n={n} mean tries {mean}");
            assert!(worst < 64 * n, "n={n} worst {worst}");
        }
    }

    #[test]
    fn assigned_ids_do_not_repeat_for_one_seed() {
        let mut seed = 7;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(assign_client_id(0, 2, &mut seed)));
        }
    }

    #[test]
    fn splitmix64_matches_reference_output() {
        // First outputs of splitmix64 seeded with 0 (reference C implementation).
        let mut s = 0;
        assert_eq!(splitmix64(&mut s), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(&mut s), 0x6E78_9E6A_A1B9_65F4);
    }
}
