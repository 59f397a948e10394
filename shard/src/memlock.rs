//! The locked-memory limit glommio needs before any executor can start.
//!
//! glommio 0.9 refuses to build a reactor when the soft `RLIMIT_MEMLOCK` is below 512 KiB
//! (its io_uring rings are locked memory) and reports only `MemLockLimit(current, min)`.
//! The boot thread calls [`check_memlock`] first so the operator gets an error that says
//! what to change, in each of the places it is usually set. Above the minimum glommio
//! still runs, and only logs a warning if it cannot register its I/O buffers.

use std::fmt;
use std::io;

use thiserror::Error;

/// glommio 0.9's minimum soft `RLIMIT_MEMLOCK` (`MIN_MEMLOCK_LIMIT` in `sys/uring.rs`).
pub const MEMLOCK_MIN_BYTES: u64 = 512 * 1024;

/// The limit recommended in error messages: 8 MiB, what glommio's default buffers fit in.
pub const MEMLOCK_RECOMMENDED_BYTES: u64 = 8 * 1024 * 1024;

/// The locked-memory limit is unreadable or too low for glommio.
#[derive(Debug, Error)]
pub enum MemlockError {
    /// `getrlimit(RLIMIT_MEMLOCK)` failed.
    #[error("cannot read the locked-memory limit (getrlimit RLIMIT_MEMLOCK): {0}")]
    Unreadable(#[source] io::Error),
    /// The soft limit is below [`MEMLOCK_MIN_BYTES`].
    #[error(
        "the locked-memory limit (RLIMIT_MEMLOCK) is {current}, below the {min} the io_uring \
         runtime needs (8 MiB recommended). Raise it: in a shell, `ulimit -l 8192` before \
         starting; in a systemd unit, `LimitMEMLOCK=8M`; for a container, \
         `docker run --ulimit memlock=8388608`; for login sessions, a `memlock` line in \
         /etc/security/limits.conf (e.g. `* - memlock 8192`)",
        current = Bytes(*.current_bytes),
        min = Bytes(MEMLOCK_MIN_BYTES)
    )]
    TooLow {
        /// The current soft limit in bytes.
        current_bytes: u64,
    },
}

/// Reads the soft `RLIMIT_MEMLOCK` and checks it against glommio's minimum.
///
/// Returns the limit in bytes (`u64::MAX` for unlimited).
pub fn check_memlock() -> Result<u64, MemlockError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable `rlimit`.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    if rc != 0 {
        return Err(MemlockError::Unreadable(io::Error::last_os_error()));
    }
    // RLIM_INFINITY is all ones, so it maps to u64::MAX, which passes the check.
    check_memlock_limit(limit.rlim_cur)
}

/// The threshold rule of [`check_memlock`], for a limit passed in (bytes).
pub fn check_memlock_limit(current_bytes: u64) -> Result<u64, MemlockError> {
    if current_bytes < MEMLOCK_MIN_BYTES {
        return Err(MemlockError::TooLow { current_bytes });
    }
    Ok(current_bytes)
}

/// Human-readable byte count for error messages: `65536 bytes (64 KiB)`.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1024 * 1024 && b.is_multiple_of(1024 * 1024) {
            write!(f, "{b} bytes ({} MiB)", b / (1024 * 1024))
        } else if b >= 1024 && b.is_multiple_of(1024) {
            write!(f, "{b} bytes ({} KiB)", b / 1024)
        } else {
            write!(f, "{b} bytes")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_is_inclusive_at_the_minimum() {
        assert!(check_memlock_limit(0).is_err());
        assert!(check_memlock_limit(MEMLOCK_MIN_BYTES - 1).is_err());
        assert_eq!(
            check_memlock_limit(MEMLOCK_MIN_BYTES).unwrap(),
            MEMLOCK_MIN_BYTES
        );
        assert_eq!(check_memlock_limit(u64::MAX).unwrap(), u64::MAX);
    }

    #[test]
    fn error_names_current_limit_minimum_and_every_fix() {
        let msg = check_memlock_limit(64 * 1024).unwrap_err().to_string();
        assert!(msg.contains("is 65536 bytes (64 KiB)"), "{msg}");
        assert!(msg.contains("524288 bytes (512 KiB)"), "{msg}");
        assert!(msg.contains("ulimit -l 8192"), "{msg}");
        assert!(msg.contains("LimitMEMLOCK=8M"), "{msg}");
        assert!(msg.contains("--ulimit memlock=8388608"), "{msg}");
        assert!(msg.contains("/etc/security/limits.conf"), "{msg}");
    }

    #[test]
    fn odd_byte_counts_are_printed_exactly() {
        let msg = check_memlock_limit(1000).unwrap_err().to_string();
        assert!(msg.contains("is 1000 bytes,"), "{msg}");
    }

    #[test]
    fn this_machine_passes() {
        // The dependency notes record 8 MiB here; glommio-based tests need it anyway.
        assert!(check_memlock().unwrap() >= MEMLOCK_MIN_BYTES);
    }

    #[test]
    fn recommended_is_what_the_fixes_set() {
        assert_eq!(MEMLOCK_RECOMMENDED_BYTES, 8192 * 1024);
        assert_eq!(MEMLOCK_RECOMMENDED_BYTES, 8_388_608);
    }
}
