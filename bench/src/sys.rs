//! What the bench asks of the operating system: the open-files limit, its own CPU
//! time, the broker's CPU time and resident memory (from `/proc`), and precise
//! sleeping for paced senders.

use std::time::{Duration, Instant};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit with cur <= max.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// CPU seconds (user + system) this process has used.
pub fn own_cpu_s() -> f64 {
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds (user + system) process `pid` has used, from `/proc/PID/stat`.
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces; the
    // fields after its closing parenthesis start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 11 and 12 after field 2.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some((utime + stime) as f64 / ticks.max(1) as f64)
}

/// Resident set size of process `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn process_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU used by this process and, when known, the broker, between two readings.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    at: Instant,
    own_s: f64,
    broker_s: Option<f64>,
    broker_pid: Option<u32>,
}

/// CPU use over an interval, in cores (1.0 = one core busy all the time).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// This bench process.
    pub bench_cores: f64,
    /// The broker, when `--broker-pid` was given.
    pub broker_cores: Option<f64>,
}

impl CpuMeter {
    /// Starts an interval now.
    pub fn start(broker_pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            at: Instant::now(),
            own_s: own_cpu_s(),
            broker_s: broker_pid.and_then(process_cpu_s),
            broker_pid,
        }
    }

    /// CPU used since `start`.
    pub fn stop(&self) -> CpuUse {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let broker = match (self.broker_s, self.broker_pid.and_then(process_cpu_s)) {
            (Some(a), Some(b)) => Some((b - a) / wall),
            _ => None,
        };
        CpuUse {
            bench_cores: (own_cpu_s() - self.own_s) / wall,
            broker_cores: broker,
        }
    }
}

/// Time before a deadline that [`sleep_until_precise`] spends spinning instead of
/// sleeping: covers the kernel's wake-up latency.
const SPIN_BEFORE_DEADLINE: Duration = Duration::from_micros(60);

/// Sets this thread's timer slack to 1 ns so `nanosleep` wakes on time instead of
/// up to 50 µs late (the default slack). Best effort.
pub fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and affects this thread only.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Blocks the calling thread until `deadline`: sleeps, then spins the last
/// [`SPIN_BEFORE_DEADLINE`]. For a blocking thread only, never a tokio worker.
pub fn sleep_until_precise(deadline: Instant) {
    let now = Instant::now();
    if deadline <= now {
        return;
    }
    let left = deadline - now;
    if left > SPIN_BEFORE_DEADLINE {
        std::thread::sleep(left - SPIN_BEFORE_DEADLINE);
    }
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_proc_entries() {
        let pid = std::process::id();
        assert!(process_rss_bytes(pid).unwrap() > 0);
        assert!(process_cpu_s(pid).is_some());
        assert!(own_cpu_s() >= 0.0);
        assert!(raise_nofile_limit().unwrap() > 0);
    }
}
