//! Process metrics in the standard Prometheus process-collector names
//! (`process_open_fds`, `process_max_fds`, `process_resident_memory_bytes`,
//! `process_cpu_seconds_total`, `process_start_time_seconds`), read from
//! `/proc/self` at scrape time. Linux only, like glommio.

use std::fs;

/// One reading of the process's resources; `None` when unreadable.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft open-files limit.
    pub max_fds: Option<u64>,
    /// Resident set size, bytes.
    pub resident_memory_bytes: Option<u64>,
    /// User plus system CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads `/proc/self`.
    pub fn read() -> ProcessStats {
        // SAFETY: sysconf has no memory-safety preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let stat = fs::read_to_string("/proc/self/stat").ok();
        // Fields after the command name, which is in parentheses and may hold
        // spaces: field 3 (state) is index 0 here.
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(')'))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let cpu_seconds = match (field(14), field(15)) {
            (Some(u), Some(s)) if ticks > 0.0 => Some((u + s) as f64 / ticks),
            _ => None,
        };
        let start_time_seconds = field(22)
            .zip(boot_time())
            .and_then(|(start, boot)| (ticks > 0.0).then(|| boot as f64 + start as f64 / ticks));
        let open_fds = fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count().saturating_sub(1) as u64); // minus the read_dir fd itself
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit with a valid pointer to a local struct.
        let max_fds = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0)
            .then_some(lim.rlim_cur);
        ProcessStats {
            open_fds,
            max_fds,
            resident_memory_bytes: field(24).map(|pages| pages * page),
            cpu_seconds,
            start_time_seconds,
        }
    }
}

fn boot_time() -> Option<u64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let p = ProcessStats::read();
        assert!(p.open_fds.is_some_and(|n| n >= 3), "{p:?}");
        assert!(p.max_fds.is_some_and(|n| n >= p.open_fds.unwrap()), "{p:?}");
        assert!(
            p.resident_memory_bytes.is_some_and(|n| n > 1 << 20),
            "{p:?}"
        );
        assert!(p.cpu_seconds.is_some_and(|s| s >= 0.0), "{p:?}");
        assert!(p.start_time_seconds.is_some_and(|s| s > 1.6e9), "{p:?}");
    }
}
