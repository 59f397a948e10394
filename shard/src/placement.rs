//! Which CPUs the shards run on.
//!
//! A shard is one glommio executor pinned to one CPU. The CPUs we may use are the ones in
//! this process's affinity mask (`sched_getaffinity`), not the machine's CPU count: the mask
//! already reflects `taskset`, cgroup cpusets and container CPU limits such as
//! `docker --cpuset-cpus`, so pinning only to CPUs in it never fails and never oversubscribes
//! CPUs that belong to someone else.
//!
//! [`plan`] turns the operator's `shards` setting into one CPU id per shard. It exists on
//! the boot thread only, before any executor starts.

use std::fmt;
use std::io;

use thiserror::Error;

/// Why a shard placement could not be planned.
#[derive(Debug, Error)]
pub enum PlacementError {
    /// `sched_getaffinity` itself failed.
    #[error("cannot read this process's CPU affinity (sched_getaffinity): {0}")]
    Affinity(#[source] io::Error),
    /// The affinity mask is empty; the kernel never reports that for a running thread, so
    /// this only happens with a broken mask passed to [`plan_for`].
    #[error("this process may run on no CPU at all (empty affinity mask)")]
    NoCpus,
    /// `shards = 0` was requested.
    #[error(
        "shards = 0 is not allowed: at least one shard is needed. This process may run on \
         CPUs {allowed} ({count} CPUs). Fix: set `server.shards` (or `--shards`) to a value \
         from 1 to {count}, or omit it to run one shard per allowed CPU",
        allowed = CpuList(.allowed),
        count = .allowed.len()
    )]
    ZeroShards {
        /// The CPUs this process may run on.
        allowed: Vec<usize>,
    },
    /// More shards were requested than there are CPUs to pin them to.
    #[error(
        "shards = {requested} is more than the {count} CPUs this process may run on \
         (CPUs {allowed}, from sched_getaffinity, which reflects taskset, cgroup cpusets and \
         container limits). Fix: set `server.shards` (or `--shards`) to at most {count}, omit \
         it to run one shard per allowed CPU, or allow more CPUs (e.g. `taskset -c`, \
         `docker run --cpuset-cpus`)",
        allowed = CpuList(.allowed),
        count = .allowed.len()
    )]
    TooManyShards {
        /// The number of shards asked for.
        requested: usize,
        /// The CPUs this process may run on.
        allowed: Vec<usize>,
    },
}

/// The CPU ids the calling thread may run on, ascending.
///
/// For the boot thread that is the process's mask, inherited by every thread it spawns.
/// Limited to `CPU_SETSIZE` (1024) CPUs, the size of glibc's fixed `cpu_set_t`.
pub fn allowed_cpus() -> Result<Vec<usize>, PlacementError> {
    // SAFETY: `cpu_set_t` is a plain bit array for which all-zero is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable `cpu_set_t` and we pass its exact size; pid 0 means
    // the calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(PlacementError::Affinity(io::Error::last_os_error()));
    }
    let cpu_count_max = 8 * size_of::<libc::cpu_set_t>();
    // SAFETY: `CPU_ISSET` only reads `set`, and `cpu < CPU_SETSIZE` keeps it in bounds.
    let cpus = (0..cpu_count_max)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    Ok(cpus)
}

/// Plans one CPU per shard from this process's affinity mask.
///
/// `shards = None` means one shard per allowed CPU. Asking for 0 shards or for more shards
/// than allowed CPUs is an error whose message lists the allowed CPUs and the fix. Returns
/// the CPU id for shard 0, 1, ... in order.
pub fn plan(shards: Option<usize>) -> Result<Vec<usize>, PlacementError> {
    plan_for(&allowed_cpus()?, shards)
}

/// [`plan`] with the allowed CPU list passed in, so the rules are testable on any machine.
pub fn plan_for(allowed: &[usize], shards: Option<usize>) -> Result<Vec<usize>, PlacementError> {
    if allowed.is_empty() {
        return Err(PlacementError::NoCpus);
    }
    let count = match shards {
        // The route table's shard sets hold at most SHARDS_MAX shards; bigger
        // machines run that many by default.
        None => allowed.len().min(crate::trie::SHARDS_MAX),
        Some(0) => {
            return Err(PlacementError::ZeroShards {
                allowed: allowed.to_vec(),
            });
        }
        Some(n) if n > allowed.len() || n > crate::trie::SHARDS_MAX => {
            return Err(PlacementError::TooManyShards {
                requested: n,
                allowed: allowed.to_vec(),
            });
        }
        Some(n) => n,
    };
    let cpus = allowed[..count].to_vec();
    assert!(
        cpus.windows(2).all(|w| w[0] < w[1]),
        "allowed CPUs must be ascending and unique"
    );
    Ok(cpus)
}

/// Formats CPU ids the way `taskset -c` and `/sys/.../cpulist` write them: `0-3,6,8-9`.
#[derive(Debug, Clone, Copy)]
pub struct CpuList<'a>(pub &'a [usize]);

impl fmt::Display for CpuList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_cpus_is_non_empty_ascending_and_unique() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn default_plan_is_one_shard_per_allowed_cpu() {
        assert_eq!(plan(None).unwrap(), allowed_cpus().unwrap());
        assert_eq!(plan_for(&[2, 3, 7], None).unwrap(), vec![2, 3, 7]);
    }

    #[test]
    fn explicit_shard_count_takes_the_first_allowed_cpus() {
        assert_eq!(plan_for(&[2, 3, 7], Some(2)).unwrap(), vec![2, 3]);
        assert_eq!(plan_for(&[2, 3, 7], Some(3)).unwrap(), vec![2, 3, 7]);
    }

    #[test]
    fn zero_shards_is_an_error_naming_cpus_and_fix() {
        let err = plan_for(&[0, 1, 2, 3], Some(0)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PlacementError::ZeroShards { .. }));
        assert!(msg.contains("CPUs 0-3 (4 CPUs)"), "{msg}");
        assert!(msg.contains("--shards"), "{msg}");
    }

    #[test]
    fn too_many_shards_is_an_error_naming_cpus_and_fix() {
        let err = plan_for(&[0, 1, 4], Some(8)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(
            err,
            PlacementError::TooManyShards { requested: 8, .. }
        ));
        assert!(msg.contains("shards = 8"), "{msg}");
        assert!(msg.contains("CPUs 0-1,4"), "{msg}");
        assert!(msg.contains("at most 3"), "{msg}");
        assert!(msg.contains("taskset"), "{msg}");
    }

    #[test]
    fn empty_mask_is_an_error() {
        assert!(matches!(plan_for(&[], None), Err(PlacementError::NoCpus)));
    }

    #[test]
    fn cpu_list_formats_ranges() {
        assert_eq!(CpuList(&[]).to_string(), "");
        assert_eq!(CpuList(&[5]).to_string(), "5");
        assert_eq!(CpuList(&[0, 1, 2, 3]).to_string(), "0-3");
        assert_eq!(CpuList(&[0, 2, 3, 4, 7, 9, 10]).to_string(), "0,2-4,7,9-10");
    }

    /// Restricts a child thread to one CPU with `sched_setaffinity` (pid 0 = that thread
    /// only, so the test process is unaffected) and checks that the planner sees only it.
    #[test]
    fn restricted_affinity_mask_is_respected() {
        let all = allowed_cpus().unwrap();
        let only = *all.last().unwrap();
        let seen = std::thread::spawn(move || {
            // SAFETY: all-zero is a valid empty `cpu_set_t`; CPU_SET writes in bounds.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            unsafe { libc::CPU_SET(only, &mut set) };
            // SAFETY: `set` is a valid `cpu_set_t` of the size passed.
            let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
            assert_eq!(rc, 0, "sched_setaffinity: {}", io::Error::last_os_error());
            let planned = plan(None).unwrap();
            let too_many = plan(Some(2)).unwrap_err();
            (allowed_cpus().unwrap(), planned, too_many.to_string())
        })
        .join()
        .unwrap();
        assert_eq!(seen.0, vec![only]);
        assert_eq!(seen.1, vec![only]);
        assert!(seen.2.contains(&format!("CPUs {only}")), "{}", seen.2);
        // The parent thread's mask is untouched.
        assert_eq!(allowed_cpus().unwrap(), all);
    }
}
