//! Topic trie micro-benchmarks: matching one topic against 10,000 subscriptions, the route
//! table match, subscribe/unsubscribe churn, and the retained lookup of a SUBSCRIBE: a
//! filter walked through 100,000 retained topic names (`retained_lookup_100k`), beside the
//! scan of a hash map that tests every topic, which is what the engine did before.
//!
//! Run with `cargo bench -p tessera-shard --bench trie`. The subscription set mimics a
//! device fleet: 100 sites x 100 devices, one subscription per (site, device) slot, 70%
//! exact filters and 30% wildcards (`+` at the device level, `+` at the site level, and a
//! trailing `#`), spread over 10 keys per wildcard filter so several sessions share them.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tessera_shard::trie::{ShardSet, Trie, route_match};

/// Subscriptions in the matching benchmarks.
const SUBSCRIPTION_COUNT: u32 = 10_000;
/// Shards in the route table benchmark.
const SHARD_COUNT: u32 = 16;

/// The filter of subscription `i`: site `i / 100`, device `i % 100`, and by `i % 10`
/// either an exact filter (7 in 10) or one of three wildcard shapes.
fn filter(i: u32) -> String {
    let (site, device) = (i / 100, i % 100);
    match i % 10 {
        0..=6 => format!("site/{site}/dev/{device}/telemetry"),
        7 => format!("site/{site}/dev/+/telemetry"),
        8 => format!("site/+/dev/{device}/telemetry"),
        _ => format!("site/{site}/dev/{device}/#"),
    }
}

fn subscriptions() -> Trie<u32, u8> {
    let mut trie = Trie::new();
    for i in 0..SUBSCRIPTION_COUNT {
        trie.insert(&filter(i), i, 1);
    }
    trie
}

/// Topics to match: a hit on an exact filter plus wildcards, a topic matched only by
/// wildcards, one that walks four levels deep and misses, and one that misses at the root.
const TOPICS: [(&str, &str); 4] = [
    ("exact_and_wildcards", "site/42/dev/13/telemetry"),
    ("wildcards_only", "site/42/dev/19/telemetry"),
    ("deep_miss", "site/42/dev/13/humidity"),
    ("root_miss", "factory/7/line/3"),
];

fn bench_match(c: &mut Criterion) {
    let trie = subscriptions();
    eprintln!(
        "subscription trie: {} entries under {} distinct filters",
        trie.len(),
        trie.filter_count()
    );
    let mut group = c.benchmark_group("trie_match_10k");
    for (name, topic) in TOPICS {
        let mut hits = 0;
        trie.for_each_match(topic, |_, _| hits += 1);
        eprintln!("{name}: {topic:?} matches {hits} entries");
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut sum = 0u32;
                trie.for_each_match(black_box(topic), |&k, &qos| sum += k + u32::from(qos));
                sum
            })
        });
    }
    group.finish();
}

fn bench_route_match(c: &mut Criterion) {
    let mut routes: Trie<u16, ()> = Trie::new();
    for i in 0..SUBSCRIPTION_COUNT {
        let shard = u16::try_from(i % SHARD_COUNT).expect("fewer than 65536 shards");
        routes.insert(&filter(i), shard, ());
    }
    let mut group = c.benchmark_group("route_match_10k");
    let mut out = ShardSet::new();
    for (name, topic) in TOPICS {
        route_match(&routes, topic, &mut out);
        eprintln!("route {name}: {} shards", out.len());
        group.bench_function(name, |b| {
            b.iter(|| {
                route_match(&routes, black_box(topic), &mut out);
                out.len()
            })
        });
    }
    group.finish();
}

fn bench_churn(c: &mut Criterion) {
    let mut group = c.benchmark_group("trie_churn_10k");
    // A new filter: creates three nodes on insert and prunes them on remove.
    let mut trie = subscriptions();
    group.bench_function("subscribe_unsubscribe_new_filter", |b| {
        b.iter(|| {
            trie.insert(black_box("site/42/dev/new/alerts"), 99_999, 1);
            trie.remove(black_box("site/42/dev/new/alerts"), 99_999)
        })
    });
    // An existing filter's entries are scanned linearly, so cost grows with fan-out.
    for fan_out in [10u32, 1_000, 10_000] {
        let mut trie: Trie<u32, u8> = Trie::new();
        for key in 0..fan_out {
            trie.insert("broadcast/all", key, 1);
        }
        group.bench_function(format!("subscribe_unsubscribe_fan_out_{fan_out}"), |b| {
            b.iter(|| {
                trie.insert(black_box("broadcast/all"), u32::MAX, 1);
                trie.remove(black_box("broadcast/all"), u32::MAX)
            })
        });
    }
    group.finish();
}

/// Retained topics in the lookup benchmark: 1,000 sites x 100 devices.
const RETAINED_SITES: u32 = 1_000;
const RETAINED_DEVICES: u32 = 100;

/// Filters of the retained lookup, from all topics to one.
const RETAINED_FILTERS: [(&str, &str); 5] = [
    ("hash_all", "#"),
    ("site_plus_1000", "site/+/dev/7/state"),
    ("site_subtree_100", "site/42/#"),
    ("device_plus_100", "site/42/dev/+/state"),
    ("exact_1", "site/42/dev/7/state"),
];

fn bench_retained_lookup(c: &mut Criterion) {
    let mut trie: Trie<(), u32> = Trie::new();
    let mut map: HashMap<String, u32> = HashMap::new();
    for site in 0..RETAINED_SITES {
        for device in 0..RETAINED_DEVICES {
            let topic = format!("site/{site}/dev/{device}/state");
            trie.insert(&topic, (), site + device);
            map.insert(topic, site + device);
        }
    }
    let mut group = c.benchmark_group("retained_lookup_100k");
    for (name, filter) in RETAINED_FILTERS {
        let mut hits = 0;
        trie.for_each_name_matching(filter, |_, _| hits += 1);
        eprintln!(
            "retained {name}: {filter:?} matches {hits} of {} topics",
            map.len()
        );
        group.bench_function(format!("{name}/trie_walk"), |b| {
            b.iter(|| {
                let mut sum = 0u32;
                trie.for_each_name_matching(black_box(filter), |_, &v| sum = sum.wrapping_add(v));
                sum
            })
        });
        group.bench_function(format!("{name}/map_scan"), |b| {
            b.iter(|| {
                let mut sum = 0u32;
                for (topic, &v) in &map {
                    if tessera_proto::topic::matches(black_box(filter), topic) {
                        sum = sum.wrapping_add(v);
                    }
                }
                sum
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_match,
    bench_route_match,
    bench_churn,
    bench_retained_lookup
);
criterion_main!(benches);
