//! No half-alive broker: a panic on any thread ends the process.
//!
//! A panic is a programmer's error (docs/ARCHITECTURE.md "Panics end the
//! process"). Left alone it would kill only its thread: a dead shard whose
//! peers fill their channels to it and pause their readers, a dead store
//! writer whose shard waits for commits forever, while the process, and so
//! systemd's view of it, stays up. [`install`] sets a panic hook that logs
//! which thread panicked where, with what message, and then ends the process
//! with [`EXIT_CODE`] at once, without unwinding or running destructors: the
//! same state as after `kill -9`, which persistence is built for (nothing
//! acknowledged is lost). The unit's `Restart=on-failure` restarts it.
//!
//! Tests inject panics through [`fault`], which exists only in builds with
//! the `fault-injection` cargo feature (the broker's own integration tests
//! enable it; release builds never have it).

use std::panic::PanicHookInfo;

/// The exit code after a panic (Rust's own code for a panicking `main`).
pub const EXIT_CODE: i32 = 101;

/// The exit code of a cluster node whose raft stopped on a storage error (a full disk,
/// an I/O error): `crate::cluster` ends the process with it, as a panic would, and the
/// unit's `Restart=on-failure` starts it again (docs/ARCHITECTURE.md "Cluster: disks,
/// certificates and clocks").
pub const RAFT_STOPPED_EXIT_CODE: i32 = 3;

/// Ends the process at once with `code`: no unwinding, no destructors, no waiting for
/// a store commit that may never succeed (a full disk). The state of a `kill -9`, which
/// persistence is built for.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process at once; it touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// The exit code after a SIGBUS: a read of a memory-mapped store file that is shorter
/// than LMDB believes (a store truncated or corrupt), the exit code of a refused start.
pub const SIGBUS_EXIT_CODE: i32 = 2;

/// Makes a SIGBUS print one line naming the data directory and end the process with
/// [`SIGBUS_EXIT_CODE`], instead of dying of the signal without a word. LMDB reads its
/// pages through a map of the file and trusts the page numbers and sizes it finds: a
/// corrupt value size can reach past the end of the file, which is a SIGBUS, not an
/// error the store could return (truncated files are reported as corrupt before that:
/// the stores extend a short file to its last page). The handler only writes the line
/// prepared here and calls `_exit`, both async-signal-safe. Call once, before the
/// stores are opened.
pub fn install_sigbus_message(data_dir: &std::path::Path) {
    static MESSAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let _ = MESSAGE.set(
        format!(
            "broker: a read of a store file under {} failed (SIGBUS): a store file there \
             is corrupt or was truncated. Restore the data directory from a backup; in a \
             cluster, a corrupt raft store can be moved away and the node rejoined as a new \
             member (docs/ARCHITECTURE.md \"Cluster: disks, certificates and clocks\"); \
             exit code {SIGBUS_EXIT_CODE}\n",
            data_dir.display()
        )
        .into_bytes(),
    );
    extern "C" fn on_sigbus(_: libc::c_int) {
        if let Some(m) = MESSAGE.get() {
            // SAFETY: write(2) of a buffer that lives for the whole process.
            unsafe { libc::write(2, m.as_ptr().cast(), m.len()) };
        }
        exit_now(SIGBUS_EXIT_CODE)
    }
    // SAFETY: a zeroed sigaction with an empty mask and a plain handler (no SA_SIGINFO)
    // is a valid argument; the handler is async-signal-safe (above).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

/// Makes any panic, on any thread, log and end the process with
/// [`EXIT_CODE`]. Call once, after logging is set up and before any thread
/// starts.
pub fn install() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // The standard message first (and a backtrace with RUST_BACKTRACE=1).
        default(info);
        let thread = std::thread::current();
        let (thread, location, message) = describe(thread.name(), info);
        tracing::error!(
            thread,
            location,
            "panic: {message}; ending the process (exit code {EXIT_CODE}) so that its \
             supervisor restarts it"
        );
        exit_now(EXIT_CODE)
    }));
}

/// The panicking thread's name, the source location and the message.
fn describe<'a>(
    thread: Option<&'a str>,
    info: &'a PanicHookInfo<'_>,
) -> (&'a str, String, &'a str) {
    let location = info
        .location()
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_else(|| "unknown".to_owned());
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a non-string panic payload)");
    (thread.unwrap_or("unnamed"), location, message)
}

/// Panics on demand, for the tests of this module's promise. Compiled only
/// with the `fault-injection` feature; even then nothing happens unless its
/// environment variables are set.
#[cfg(feature = "fault-injection")]
pub mod fault {
    use std::sync::OnceLock;

    /// A CONNECT with this ClientID panics its owner shard.
    pub const PANIC_ON_CONNECT_ENV: &str = "FAULT_INJECTION_PANIC_ON_CONNECT";
    /// An admin request for this path panics its admin thread.
    pub const PANIC_ON_ADMIN_PATH_ENV: &str = "FAULT_INJECTION_PANIC_ON_ADMIN_PATH";

    fn env(name: &'static str, cell: &'static OnceLock<Option<String>>) -> Option<&'static str> {
        cell.get_or_init(|| std::env::var(name).ok().filter(|v| !v.is_empty()))
            .as_deref()
    }

    /// Called by the owner shard for each CONNECT it admits.
    pub fn on_connect(shard: usize, client_id: &str) {
        static WANTED: OnceLock<Option<String>> = OnceLock::new();
        if env(PANIC_ON_CONNECT_ENV, &WANTED) == Some(client_id) {
            panic!("fault injection: shard {shard} panics on the CONNECT of {client_id:?}");
        }
    }

    /// Called by the admin request thread for each request.
    pub fn on_admin_request(path: &str) {
        static WANTED: OnceLock<Option<String>> = OnceLock::new();
        if env(PANIC_ON_ADMIN_PATH_ENV, &WANTED) == Some(path) {
            panic!("fault injection: the admin thread panics on a request for {path:?}");
        }
    }
}
