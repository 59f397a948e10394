//! The broker's memory allocator: jemalloc (cargo feature `jemalloc`, on by
//! default; `--no-default-features` gives the system malloc) with a background
//! thread that returns freed memory to the OS
//! `limits.memory_release_delay_ms` after it was freed, and the allocator's
//! figures for `/metrics`.
//!
//! Why not the system malloc: when thousands of connections arrive at once (a
//! connect storm after a restart or a network blip), each is briefly active
//! with its task, glommio's readiness source and read buffers before it parks
//! (`server::park`). glibc's malloc places the long-lived per-connection state
//! (session, ClientID, engine slot) between those short-lived blocks in one
//! heap; once they are freed the heap is full of holes smaller than a page
//! that `malloc_trim` cannot return. Measured with 19,000 connections arriving
//! in a storm: 1,400–1,530 B of RSS per idle connection with glibc (3 MB of
//! 14 MB free returned by `malloc_trim(0)`), 650–700 B with jemalloc, which
//! keeps allocations of one size class together and returns whole free pages
//! (docs/BENCHMARKS.md, docs/ARCHITECTURE.md "Memory allocator").
//!
//! Why a background thread: jemalloc returns freed pages lazily ("decay") and,
//! by default, only when the arena that freed them allocates again. A shard
//! whose connections all parked allocates nothing, so without the thread its
//! freed pages would stay resident. The one thread (`max_background_threads
//! = 1`) sleeps until decay is due; it is not on any shard's path.
//!
//! Lifecycle: [`configure`] runs once in `main`, before the shards start, and
//! only in the `broker` binary (the global allocator is declared there; the
//! library, its tests and `brokerctl` use the system malloc). [`stats`] is read
//! by the admin thread per scrape. Without the feature both do nothing.

/// What the allocator holds, for `/metrics` (bytes; the last is a counter).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Bytes in live allocations.
    pub allocated_bytes: u64,
    /// Bytes in pages the allocator holds resident: live data, its metadata,
    /// and freed pages not yet returned.
    pub resident_bytes: u64,
    /// Freed pages waiting for their release delay, in bytes.
    pub dirty_bytes: u64,
    /// Bytes of freed pages returned to the OS since start.
    pub released_bytes_total: u64,
}

/// The allocator's name, as `tessera_allocator_info` shows it.
pub fn name() -> &'static str {
    if imp::configured() {
        "jemalloc"
    } else {
        "system"
    }
}

/// Sets the release delay and starts the background thread. Call once, from
/// the `broker` binary that declares jemalloc as its global allocator.
pub fn configure(release_delay_ms: u32) -> Result<(), String> {
    imp::configure(release_delay_ms)
}

/// The allocator's figures; `None` with the system malloc or before
/// [`configure`].
pub fn stats() -> Option<AllocatorStats> {
    imp::stats()
}

#[cfg(feature = "jemalloc")]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tikv_jemalloc_ctl::{background_thread, epoch, max_background_threads, raw, stats};

    use super::AllocatorStats;

    static CONFIGURED: AtomicBool = AtomicBool::new(false);

    /// `MALLCTL_ARENAS_ALL`: statistics merged over every arena.
    macro_rules! all_arenas {
        ($name:literal) => {
            concat!("stats.arenas.4096.", $name, "\0").as_bytes()
        };
    }

    pub(super) fn configured() -> bool {
        CONFIGURED.load(Ordering::Relaxed)
    }

    pub(super) fn configure(release_delay_ms: u32) -> Result<(), String> {
        let delay = isize::try_from(release_delay_ms)
            .map_err(|_| format!("release delay {release_delay_ms} ms out of range"))?;
        let set = |name: &'static [u8], value: isize| {
            // SAFETY: the names are jemalloc's `ssize_t` settings, NUL-terminated.
            unsafe { raw::write(name, value) }.map_err(|e| {
                let name = String::from_utf8_lossy(&name[..name.len() - 1]).into_owned();
                format!("jemalloc {name} = {value}: {e}")
            })
        };
        // Arenas created from now on (the shards' threads create theirs
        // when they first allocate) ...
        set(b"arenas.dirty_decay_ms\0", delay)?;
        // ... and pages past the dirty stage go back at once: "muzzy" pages
        // (MADV_FREE) still count in RSS until the kernel needs them.
        set(b"arenas.muzzy_decay_ms\0", 0)?;
        // ... and the arenas that exist already (the boot thread's).
        // SAFETY: `arenas.narenas` is an `unsigned`.
        let narenas: u32 = unsafe { raw::read(b"arenas.narenas\0") }
            .map_err(|e| format!("jemalloc arenas.narenas: {e}"))?;
        for i in 0..narenas {
            for (stage, value) in [("dirty", delay), ("muzzy", 0)] {
                let name = format!("arena.{i}.{stage}_decay_ms\0");
                // SAFETY: as above; an arena index jemalloc has not
                // initialised yet answers EFAULT, which is skipped.
                let _ = unsafe { raw::write(name.as_bytes(), value) };
            }
        }
        max_background_threads::write(1)
            .map_err(|e| format!("jemalloc max_background_threads: {e}"))?;
        background_thread::write(true).map_err(|e| format!("jemalloc background_thread: {e}"))?;
        CONFIGURED.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn stats() -> Option<AllocatorStats> {
        if !configured() {
            return None;
        }
        // Statistics are a snapshot taken when the epoch advances.
        epoch::advance().ok()?;
        // SAFETY: the types are those jemalloc documents for these names
        // (`size_t` page counts and size, `uint64_t` purge counters).
        let (page, pdirty, dirty_purged, muzzy_purged) = unsafe {
            (
                raw::read::<usize>(b"arenas.page\0").ok()? as u64,
                raw::read::<usize>(all_arenas!("pdirty")).ok()? as u64,
                raw::read::<u64>(all_arenas!("dirty_purged")).ok()?,
                raw::read::<u64>(all_arenas!("muzzy_purged")).ok()?,
            )
        };
        Some(AllocatorStats {
            allocated_bytes: stats::allocated::read().ok()? as u64,
            resident_bytes: stats::resident::read().ok()? as u64,
            dirty_bytes: pdirty * page,
            released_bytes_total: (dirty_purged + muzzy_purged) * page,
        })
    }
}

#[cfg(not(feature = "jemalloc"))]
mod imp {
    use super::AllocatorStats;

    pub(super) fn configured() -> bool {
        false
    }

    pub(super) fn configure(_release_delay_ms: u32) -> Result<(), String> {
        Ok(())
    }

    pub(super) fn stats() -> Option<AllocatorStats> {
        None
    }
}
