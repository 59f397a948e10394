//! Goal: matching a publish against the subscription trie or the route table allocates
//! nothing, from the first call on, so the hot path costs no allocator traffic.
//!
//! Method: a counting `#[global_allocator]` that counts, per thread, every allocation and
//! reallocation made while a flag is set. Tries are built first (building allocates);
//! then matches run with counting on, including the deepest valid topic against a filter
//! of `+` at every level, which makes the match stack as deep as it can get. Counting is
//! per thread so the test harness's own threads cannot disturb the figure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use tessera_proto::topic::TOPIC_LEVELS_MAX;
use tessera_shard::trie::{ShardSet, Trie, route_match};

/// Forwards to the system allocator, counting allocations on threads that asked for it.
struct CountingAllocator;

thread_local! {
    /// Whether this thread is counting. Const-initialised with no destructor, so using it
    /// inside the allocator cannot itself allocate or recurse.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    /// Allocations and reallocations seen on this thread while counting.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    // `try_with` because the allocator may run during thread teardown.
    let counting = COUNTING.try_with(Cell::get).unwrap_or(false);
    if counting {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract holds exactly as it does for `System`; counting touches only
// const-initialised thread-locals and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded from our caller, who upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: `ptr` and `layout` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Allocations made on this thread while running `f`.
fn allocations_during(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn matching_does_not_allocate() {
    let deep_plus = vec!["+"; TOPIC_LEVELS_MAX].join("/");
    let deep_topic = vec!["x"; TOPIC_LEVELS_MAX].join("/");
    let mut subscriptions: Trie<u32, u8> = Trie::new();
    let mut routes: Trie<u16, ()> = Trie::new();
    for i in 0..2_000u32 {
        let filter = match i % 4 {
            0 => format!("site/{}/dev/{}/telemetry", i % 50, i),
            1 => format!("site/{}/dev/+/telemetry", i % 50),
            2 => format!("site/+/dev/{i}/#"),
            _ => format!("+/{}/#", i % 50),
        };
        subscriptions.insert(&filter, i, 1);
        routes.insert(&filter, u16::try_from(i % 64).unwrap(), ());
    }
    for filter in ["#", "$SYS/#", deep_plus.as_str(), deep_topic.as_str()] {
        subscriptions.insert(filter, 1, 0);
        routes.insert(filter, 1, ());
    }
    let topics = [
        "site/7/dev/107/telemetry",
        "site/7/dev/9999/telemetry",
        "site/7/dev/107/a/b/c/d",
        "$SYS/uptime",
        "nothing/here",
        "/",
        deep_topic.as_str(),
    ];

    let mut matched = 0u64;
    let mut out = ShardSet::new();
    let allocations = allocations_during(|| {
        // The first calls count too: the match stack is sized at construction.
        for _ in 0..1_000 {
            for topic in topics {
                subscriptions.for_each_match(topic, |&k, &qos| {
                    matched += u64::from(k) + u64::from(qos);
                });
                route_match(&routes, topic, &mut out);
                matched += out.len() as u64;
            }
        }
    });
    assert_eq!(allocations, 0, "matching allocated {allocations} times");
    assert!(matched > 0, "the topics matched something");

    // The counter does see allocations, so zero above is meaningful.
    let control = allocations_during(|| {
        std::hint::black_box(Vec::<u8>::with_capacity(16));
    });
    assert_eq!(control, 1);
}
