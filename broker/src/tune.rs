//! `brokerctl tune check`: a read-only comparison of a running system with one of the
//! `kernel-tuning/` profiles.
//!
//! What it compares: every sysctl of the profile (read from `<proc-root>/sys/...`), the
//! soft `nofile` and `memlock` limits (of `brokerctl` itself via `getrlimit`, or of a
//! running broker from `<proc-root>/PID/limits`), the kernel version glommio needs, the
//! `kernel.io_uring_disabled` switch, and, on the live system only, whether an
//! `io_uring_setup` call succeeds here.
//!
//! How: the profile files and the comparison rules (`kernel-tuning/profiles/*.conf`) are
//! embedded at build time, so the binary needs no source tree and always agrees with the
//! `apply.sh` of the same commit. [`SystemView::read`] gathers everything from the
//! system; [`evaluate`] is pure (profile + view in, [`Report`] out) and is what the unit
//! tests drive.
//!
//! What it does not do: change anything (that is `kernel-tuning/apply.sh`), or judge
//! settings outside the profile (conntrack, NIC queues, IRQ affinity; see
//! `kernel-tuning/README.md`).

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::ValueEnum;
use serde::Serialize;
use tessera_shard::memlock::MEMLOCK_MIN_BYTES;
use thiserror::Error;

/// The proc mount of the live system; only there is the `io_uring_setup` probe run.
pub const PROC_ROOT_DEFAULT: &str = "/proc";

/// The oldest kernel glommio 0.9 runs on (its README: io_uring features of 5.8).
pub const KERNEL_VERSION_MIN: (u32, u32) = (5, 8);

/// Most fields in one sysctl value we accept (`tcp_rmem` has 3); bounds the parser.
const VALUE_FIELDS_MAX: usize = 8;

const CHECKS_CONF: &str = include_str!("../../kernel-tuning/profiles/checks.conf");

/// A kernel-tuning profile, named by the connection count per node it is sized for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileName {
    /// About 100-250K connections per node.
    Standard,
    /// About 250-500K connections per node.
    Aggressive,
    /// About 0.5-1M+ connections per node.
    Maximum,
}

impl ProfileName {
    /// Every profile, from the least to the most demanding.
    pub const ALL: [ProfileName; 3] = [
        ProfileName::Standard,
        ProfileName::Aggressive,
        ProfileName::Maximum,
    ];

    /// The name used on the command line and in file names.
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileName::Standard => "standard",
            ProfileName::Aggressive => "aggressive",
            ProfileName::Maximum => "maximum",
        }
    }

    /// The connection count per node the profile is sized for.
    pub fn sized_for(self) -> &'static str {
        match self {
            ProfileName::Standard => "about 100-250K connections per node",
            ProfileName::Aggressive => "about 250-500K connections per node",
            ProfileName::Maximum => "about 0.5-1M+ connections per node",
        }
    }

    /// The embedded `<name>.sysctl.conf`.
    pub fn sysctl_conf(self) -> &'static str {
        match self {
            ProfileName::Standard => {
                include_str!("../../kernel-tuning/profiles/standard.sysctl.conf")
            }
            ProfileName::Aggressive => {
                include_str!("../../kernel-tuning/profiles/aggressive.sysctl.conf")
            }
            ProfileName::Maximum => {
                include_str!("../../kernel-tuning/profiles/maximum.sysctl.conf")
            }
        }
    }

    /// The embedded `<name>.limits.conf`.
    pub fn limits_conf(self) -> &'static str {
        match self {
            ProfileName::Standard => {
                include_str!("../../kernel-tuning/profiles/standard.limits.conf")
            }
            ProfileName::Aggressive => {
                include_str!("../../kernel-tuning/profiles/aggressive.limits.conf")
            }
            ProfileName::Maximum => {
                include_str!("../../kernel-tuning/profiles/maximum.limits.conf")
            }
        }
    }
}

impl fmt::Display for ProfileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one field of a running value is compared with the profile's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Met when running >= profile.
    AtLeast,
    /// Met when running <= profile.
    AtMost,
    /// Met only when equal.
    Exact,
}

impl Rule {
    fn parse(s: &str) -> Option<Rule> {
        match s {
            "at-least" => Some(Rule::AtLeast),
            "at-most" => Some(Rule::AtMost),
            "exact" => Some(Rule::Exact),
            _ => None,
        }
    }

    /// The name used in `checks.conf` and in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::AtLeast => "at-least",
            Rule::AtMost => "at-most",
            Rule::Exact => "exact",
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Rule::AtLeast => ">=",
            Rule::AtMost => "<=",
            Rule::Exact => "=",
        }
    }
}

/// A sysctl value: one or more whitespace-separated unsigned integers (a port range
/// and `tcp_rmem` have several).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value(pub Vec<u64>);

impl Value {
    /// Parses `"4096 16384 4194304"` (spaces or tabs, as `/proc/sys` prints it).
    pub fn parse(s: &str) -> Option<Value> {
        let mut fields = Vec::new();
        for field in s.split_whitespace() {
            if fields.len() == VALUE_FIELDS_MAX || !field.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            fields.push(field.parse().ok()?);
        }
        (!fields.is_empty()).then_some(Value(fields))
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

/// `true` for a well-formed sysctl name: at least two dot-separated parts of lowercase
/// ASCII letters, digits, `_` and `-` (`net.ipv4.tcp_rmem`).
pub fn is_valid_sysctl_name(name: &str) -> bool {
    let mut parts = 0;
    for part in name.split('.') {
        let ok = !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return false;
        }
        parts += 1;
    }
    parts >= 2
}

/// A profile file that does not parse: a bug in the embedded files, caught by tests.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{file}:{line}: {message}")]
pub struct ProfileError {
    /// The file, relative to `kernel-tuning/profiles/`.
    pub file: String,
    /// 1-based line number; 0 for the file as a whole.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

fn profile_error(file: &str, line: usize, message: impl Into<String>) -> ProfileError {
    ProfileError {
        file: file.to_owned(),
        line,
        message: message.into(),
    }
}

/// Lines that carry content: 1-based number and trimmed text, comments and blank
/// lines skipped (`#` or `;` first, as sysctl.d allows).
fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
}

/// Parses sysctl.d syntax (`name = value` lines) into `(name, value)` in file order.
/// `file` names the source in errors.
pub fn parse_sysctl_conf(file: &str, text: &str) -> Result<Vec<(String, Value)>, ProfileError> {
    let mut out: Vec<(String, Value)> = Vec::new();
    for (n, line) in content_lines(text) {
        let (name, value) = line
            .split_once('=')
            .ok_or_else(|| profile_error(file, n, "expected `name = value`"))?;
        let name = name.trim();
        if !is_valid_sysctl_name(name) {
            return Err(profile_error(file, n, format!("bad sysctl name `{name}`")));
        }
        let value = Value::parse(value).ok_or_else(|| {
            profile_error(
                file,
                n,
                format!("`{name}`: value must be unsigned integers"),
            )
        })?;
        if out.iter().any(|(k, _)| k == name) {
            return Err(profile_error(file, n, format!("`{name}` is set twice")));
        }
        out.push((name.to_owned(), value));
    }
    Ok(out)
}

/// Parses `checks.conf`: `name rule...` lines.
pub fn parse_checks_conf(text: &str) -> Result<Vec<(String, Vec<Rule>)>, ProfileError> {
    const FILE: &str = "checks.conf";
    let mut out: Vec<(String, Vec<Rule>)> = Vec::new();
    for (n, line) in content_lines(text) {
        let mut words = line.split_whitespace();
        let name = words.next().unwrap_or_default();
        if !is_valid_sysctl_name(name) {
            return Err(profile_error(FILE, n, format!("bad sysctl name `{name}`")));
        }
        let rules = words
            .map(|w| {
                Rule::parse(w).ok_or_else(|| profile_error(FILE, n, format!("bad rule `{w}`")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if rules.is_empty() || rules.len() > VALUE_FIELDS_MAX {
            return Err(profile_error(FILE, n, format!("`{name}`: 1 to 8 rules")));
        }
        if out.iter().any(|(k, _)| k == name) {
            return Err(profile_error(FILE, n, format!("`{name}` is listed twice")));
        }
        out.push((name.to_owned(), rules));
    }
    Ok(out)
}

/// The per-process limits a profile asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open files (`RLIMIT_NOFILE`), soft and hard.
    pub nofile: u64,
    /// Locked memory (`RLIMIT_MEMLOCK`) in bytes; the file gives KiB.
    pub memlock_bytes: u64,
}

/// Parses limits.d syntax (`domain type item value`). Every `nofile` line must give
/// the same value, and every `memlock` line too; both must be present.
pub fn parse_limits_conf(file: &str, text: &str) -> Result<Limits, ProfileError> {
    let mut nofile = None;
    let mut memlock_kib = None;
    for (n, line) in content_lines(text) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [_domain, kind, item, value] = words[..] else {
            return Err(profile_error(file, n, "expected `domain type item value`"));
        };
        if !matches!(kind, "soft" | "hard" | "-") {
            return Err(profile_error(file, n, format!("bad type `{kind}`")));
        }
        let value: u64 = match value {
            "unlimited" | "infinity" => u64::MAX,
            v => v
                .parse()
                .map_err(|_| profile_error(file, n, format!("bad value `{v}`")))?,
        };
        let slot = match item {
            "nofile" => &mut nofile,
            "memlock" => &mut memlock_kib,
            other => return Err(profile_error(file, n, format!("unexpected item `{other}`"))),
        };
        match *slot {
            Some(prev) if prev != value => {
                return Err(profile_error(
                    file,
                    n,
                    format!("`{item}` is {value} here but {prev} above"),
                ));
            }
            _ => *slot = Some(value),
        }
    }
    let nofile = nofile.ok_or_else(|| profile_error(file, 0, "no `nofile` line"))?;
    let memlock_kib = memlock_kib.ok_or_else(|| profile_error(file, 0, "no `memlock` line"))?;
    Ok(Limits {
        nofile,
        memlock_bytes: memlock_kib.saturating_mul(1024),
    })
}

/// One sysctl of a profile with its comparison rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlSpec {
    /// `net.ipv4.tcp_rmem`.
    pub name: String,
    /// The profile's value.
    pub wanted: Value,
    /// One rule per field of `wanted`.
    pub rules: Vec<Rule>,
}

/// A parsed profile: its sysctls in file order and its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Which profile.
    pub name: ProfileName,
    /// Every sysctl it sets.
    pub sysctls: Vec<SysctlSpec>,
    /// The per-process limits it asks for.
    pub limits: Limits,
}

impl Profile {
    /// Parses the embedded files of `name` and joins them with `checks.conf`: every
    /// sysctl needs one rule per value field, and every rule a sysctl.
    pub fn load(name: ProfileName) -> Result<Profile, ProfileError> {
        let sysctl_file = format!("{name}.sysctl.conf");
        let checks = parse_checks_conf(CHECKS_CONF)?;
        let settings = parse_sysctl_conf(&sysctl_file, name.sysctl_conf())?;
        let mut sysctls = Vec::with_capacity(settings.len());
        for (key, wanted) in settings {
            let Some((_, rules)) = checks.iter().find(|(k, _)| *k == key) else {
                return Err(profile_error(
                    &sysctl_file,
                    0,
                    format!("`{key}` has no rule in checks.conf"),
                ));
            };
            if rules.len() != wanted.0.len() {
                return Err(profile_error(
                    &sysctl_file,
                    0,
                    format!(
                        "`{key}` has {} fields but checks.conf gives {} rules",
                        wanted.0.len(),
                        rules.len()
                    ),
                ));
            }
            sysctls.push(SysctlSpec {
                name: key,
                wanted,
                rules: rules.clone(),
            });
        }
        if let Some((key, _)) = checks
            .iter()
            .find(|(k, _)| !sysctls.iter().any(|s| s.name == *k))
        {
            return Err(profile_error(
                &sysctl_file,
                0,
                format!("`{key}` is in checks.conf but not in this profile"),
            ));
        }
        let limits = parse_limits_conf(&format!("{name}.limits.conf"), name.limits_conf())?;
        Ok(Profile {
            name,
            sysctls,
            limits,
        })
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Meets the profile.
    Ok,
    /// Below what the profile asks for.
    Low,
    /// Above what the profile asks for.
    High,
    /// Could not be read (absent on this kernel, hidden in a container, unparsable).
    Missing,
    /// A probe failed (io_uring cannot be set up here).
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Low => "LOW",
            Status::High => "HIGH",
            Status::Missing => "MISSING",
            Status::Fail => "FAIL",
        }
    }
}

/// Compares `current` with `wanted` field by field; the first field that misses its
/// rule decides. A value with another number of fields cannot be compared: `Missing`.
pub fn compare(rules: &[Rule], current: &Value, wanted: &Value) -> Status {
    assert_eq!(rules.len(), wanted.0.len(), "one rule per field");
    if current.0.len() != wanted.0.len() {
        return Status::Missing;
    }
    for ((rule, &cur), &want) in rules.iter().zip(&current.0).zip(&wanted.0) {
        let status = match rule {
            Rule::AtLeast if cur < want => Status::Low,
            Rule::AtMost if cur > want => Status::High,
            Rule::Exact if cur < want => Status::Low,
            Rule::Exact if cur > want => Status::High,
            _ => Status::Ok,
        };
        if status != Status::Ok {
            return status;
        }
    }
    Status::Ok
}

/// The value to run with: per field, the better of `current` and `wanted` (so a value
/// beyond the profile is kept), the profile's for `exact` fields. What `apply.sh` sets.
pub fn merge(rules: &[Rule], current: &Value, wanted: &Value) -> Value {
    assert_eq!(rules.len(), wanted.0.len(), "one rule per field");
    if current.0.len() != wanted.0.len() {
        return wanted.clone();
    }
    let fields = rules
        .iter()
        .zip(&current.0)
        .zip(&wanted.0)
        .map(|((rule, &cur), &want)| match rule {
            Rule::AtLeast => cur.max(want),
            Rule::AtMost => cur.min(want),
            Rule::Exact => want,
        })
        .collect();
    Value(fields)
}

/// A soft and hard resource limit; `u64::MAX` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RLimit {
    /// The limit in force.
    pub soft: u64,
    /// The ceiling the soft limit may be raised to without privileges.
    pub hard: u64,
}

/// Whose limits were read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "pid")]
pub enum LimitsSource {
    /// `brokerctl`'s own, via `getrlimit`: what a broker started from this shell gets.
    Brokerctl,
    /// A running process's, from `<proc-root>/PID/limits`.
    Process(u32),
}

/// Why an `io_uring_setup` probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeError {
    /// The errno.
    pub errno: i32,
}

/// Everything [`evaluate`] needs from the system, read once by [`SystemView::read`]
/// or built by hand in tests. Unreadable items are `Err(reason)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemView {
    /// The proc root it was read from.
    pub proc_root: PathBuf,
    /// Raw text of each sysctl of the profile, by name.
    pub sysctls: Vec<(String, Result<String, String>)>,
    /// `kernel.osrelease`.
    pub osrelease: Result<String, String>,
    /// `kernel.io_uring_disabled`; `Ok(None)` when the file does not exist (kernels
    /// before 6.6 have no such switch).
    pub io_uring_disabled: Result<Option<String>, String>,
    /// Whose limits these are.
    pub limits_source: LimitsSource,
    /// `RLIMIT_NOFILE`.
    pub nofile: Result<RLimit, String>,
    /// `RLIMIT_MEMLOCK`, bytes.
    pub memlock: Result<RLimit, String>,
    /// The `io_uring_setup` probe, when it was run (live system only).
    pub io_uring_probe: Option<Result<(), ProbeError>>,
}

/// Where sysctl `name` lives under `proc_root`: `net.ipv4.tcp_rmem` is
/// `<proc_root>/sys/net/ipv4/tcp_rmem`.
pub fn sysctl_path(proc_root: &Path, name: &str) -> PathBuf {
    let mut path = proc_root.join("sys");
    path.extend(name.split('.'));
    path
}

fn read_text(path: &Path) -> Result<String, String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

impl SystemView {
    /// Reads the sysctls of `profile` under `proc_root`, the limits of `pid` (from
    /// `<proc_root>/PID/limits`) or of this process, and probes io_uring when
    /// `proc_root` is the live [`PROC_ROOT_DEFAULT`].
    pub fn read(profile: &Profile, proc_root: &Path, pid: Option<u32>) -> SystemView {
        let sysctls = profile
            .sysctls
            .iter()
            .map(|s| {
                let text = read_text(&sysctl_path(proc_root, &s.name));
                (s.name.clone(), text)
            })
            .collect();
        let osrelease = read_text(&sysctl_path(proc_root, "kernel.osrelease"));
        let disabled_path = sysctl_path(proc_root, "kernel.io_uring_disabled");
        let io_uring_disabled = match fs::read_to_string(&disabled_path) {
            Ok(s) => Ok(Some(s.trim().to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", disabled_path.display())),
        };
        let (limits_source, nofile, memlock) = match pid {
            Some(pid) => {
                let path = proc_root.join(pid.to_string()).join("limits");
                match fs::read_to_string(&path) {
                    Ok(text) => (
                        LimitsSource::Process(pid),
                        proc_limit(&text, "Max open files"),
                        proc_limit(&text, "Max locked memory"),
                    ),
                    Err(e) => {
                        let e = format!("cannot read {}: {e}", path.display());
                        (LimitsSource::Process(pid), Err(e.clone()), Err(e))
                    }
                }
            }
            None => (
                LimitsSource::Brokerctl,
                getrlimit(Resource::Nofile),
                getrlimit(Resource::Memlock),
            ),
        };
        let io_uring_probe = (proc_root == Path::new(PROC_ROOT_DEFAULT)).then(probe_io_uring);
        SystemView {
            proc_root: proc_root.to_owned(),
            sysctls,
            osrelease,
            io_uring_disabled,
            limits_source,
            nofile,
            memlock,
            io_uring_probe,
        }
    }
}

/// Reads one row of `/proc/PID/limits` (`Max open files  1024  524288  files`).
pub fn proc_limit(text: &str, row: &str) -> Result<RLimit, String> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(row))
        .ok_or_else(|| format!("no `{row}` row in the limits file"))?;
    let mut words = line.split_whitespace();
    let mut next = || -> Result<u64, String> {
        match words.next() {
            Some("unlimited") => Ok(u64::MAX),
            Some(w) => w.parse().map_err(|_| format!("`{row}`: bad value `{w}`")),
            None => Err(format!("`{row}`: missing value")),
        }
    };
    Ok(RLimit {
        soft: next()?,
        hard: next()?,
    })
}

/// The resource limits `tune check` reads.
#[derive(Debug, Clone, Copy)]
enum Resource {
    Nofile,
    Memlock,
}

fn getrlimit(resource: Resource) -> Result<RLimit, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let limit_ptr: *mut libc::rlimit = &mut limit;
    // SAFETY: `limit_ptr` points to a valid, writable `rlimit` for the whole call.
    let rc = unsafe {
        match resource {
            Resource::Nofile => libc::getrlimit(libc::RLIMIT_NOFILE, limit_ptr),
            Resource::Memlock => libc::getrlimit(libc::RLIMIT_MEMLOCK, limit_ptr),
        }
    };
    if rc != 0 {
        return Err(format!("getrlimit: {}", io::Error::last_os_error()));
    }
    // RLIM_INFINITY is all ones, which maps to u64::MAX (unlimited).
    Ok(RLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Sets up (and closes) a one-entry io_uring: the call glommio makes first. Fails
/// with ENOSYS without io_uring, EPERM when `kernel.io_uring_disabled` or a seccomp
/// filter (container runtimes) forbid it, ENOMEM when locked memory is exhausted.
fn probe_io_uring() -> Result<(), ProbeError> {
    // `struct io_uring_params` is 120 bytes; all zero asks for the defaults.
    let mut params = [0u32; 30];
    // SAFETY: io_uring_setup(entries, params) reads and writes `params`, a valid
    // 120-byte buffer that lives for the whole call.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(ProbeError { errno });
    }
    // SAFETY: `fd` is the ring's descriptor, just returned to us and owned by nobody.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// The sysctl name, or `rlimit.nofile`, `rlimit.memlock`, `kernel.osrelease`,
    /// `kernel.io_uring_disabled`, `io_uring_setup`.
    pub setting: String,
    /// The running value, `None` when unreadable.
    pub current: Option<String>,
    /// The profile's value.
    pub wanted: String,
    /// The comparison per field (`at-least`, `at-most`, `exact`).
    pub rule: String,
    /// The outcome.
    pub status: Status,
    /// What to do when `status` is not `ok`: a command or the place to change it.
    pub action: Option<String>,
}

/// The result of `tune check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The profile compared with.
    pub profile: ProfileName,
    /// Where sysctls were read.
    pub proc_root: PathBuf,
    /// Whose limits were read.
    pub limits_source: LimitsSource,
    /// Whether the io_uring probe ran (only on the live `/proc`).
    pub io_uring_probed: bool,
    /// `true` when every check is `ok`.
    pub ok: bool,
    /// One row per setting.
    pub checks: Vec<Check>,
}

fn quoted(value: &str) -> String {
    if value.contains(' ') {
        format!("\"{value}\"")
    } else {
        value.to_owned()
    }
}

fn bytes_human(b: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if b == u64::MAX {
        "unlimited".to_owned()
    } else if b >= MIB && b.is_multiple_of(MIB) {
        format!("{b} ({} MiB)", b / MIB)
    } else if b >= 1024 && b.is_multiple_of(1024) {
        format!("{b} ({} KiB)", b / 1024)
    } else {
        b.to_string()
    }
}

fn count_human(n: u64) -> String {
    if n == u64::MAX {
        "unlimited".to_owned()
    } else {
        n.to_string()
    }
}

/// Compares `view` with `profile`. Pure: no I/O.
pub fn evaluate(profile: &Profile, view: &SystemView) -> Report {
    let mut checks = Vec::new();
    for spec in &profile.sysctls {
        let raw = view
            .sysctls
            .iter()
            .find(|(k, _)| *k == spec.name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| Err("not read".to_owned()));
        checks.push(sysctl_check(spec, raw, &view.proc_root));
    }
    checks.push(kernel_check(&view.osrelease));
    checks.push(io_uring_disabled_check(&view.io_uring_disabled));
    if let Some(probe) = &view.io_uring_probe {
        checks.push(io_uring_probe_check(probe));
    }
    checks.push(nofile_check(
        &view.nofile,
        profile.limits.nofile,
        &view.limits_source,
    ));
    checks.push(memlock_check(
        &view.memlock,
        profile.limits.memlock_bytes,
        &view.limits_source,
    ));
    Report {
        profile: profile.name,
        proc_root: view.proc_root.clone(),
        limits_source: view.limits_source.clone(),
        io_uring_probed: view.io_uring_probe.is_some(),
        ok: checks.iter().all(|c| c.status == Status::Ok),
        checks,
    }
}

fn rules_text(rules: &[Rule]) -> String {
    let words: Vec<&str> = rules.iter().map(|r| r.as_str()).collect();
    words.join(" ")
}

fn sysctl_check(spec: &SysctlSpec, raw: Result<String, String>, proc_root: &Path) -> Check {
    let wanted = spec.wanted.to_string();
    let rule = rules_text(&spec.rules);
    let missing = |current: Option<String>, why: String| Check {
        setting: spec.name.clone(),
        current,
        wanted: wanted.clone(),
        rule: rule.clone(),
        status: Status::Missing,
        action: Some(why),
    };
    let text = match raw {
        Ok(t) => t,
        Err(e) => {
            return missing(
                None,
                format!("{e}; absent on this kernel, or hidden in a container (tune the host)"),
            );
        }
    };
    let Some(current) = Value::parse(&text) else {
        return missing(Some(text), "not a list of unsigned integers".to_owned());
    };
    let status = compare(&spec.rules, &current, &spec.wanted);
    let action = match status {
        Status::Ok => None,
        Status::Missing => Some(format!(
            "{} has {} fields here, the profile {}; check {}",
            spec.name,
            current.0.len(),
            spec.wanted.0.len(),
            sysctl_path(proc_root, &spec.name).display()
        )),
        _ => {
            let merged = merge(&spec.rules, &current, &spec.wanted).to_string();
            Some(format!("sysctl -w {}={}", spec.name, quoted(&merged)))
        }
    };
    Check {
        setting: spec.name.clone(),
        current: Some(current.to_string()),
        wanted,
        rule,
        status,
        action,
    }
}

/// `(major, minor)` from `6.1.0-18-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some((major, minor.parse().ok()?))
}

fn kernel_check(osrelease: &Result<String, String>) -> Check {
    let (min_major, min_minor) = KERNEL_VERSION_MIN;
    let wanted = format!("{min_major}.{min_minor}");
    let mut check = Check {
        setting: "kernel.osrelease".to_owned(),
        current: osrelease.as_ref().ok().cloned(),
        wanted,
        rule: Rule::AtLeast.as_str().to_owned(),
        status: Status::Ok,
        action: None,
    };
    match osrelease.as_ref().map(|r| kernel_version(r)) {
        Ok(Some(v)) if v >= KERNEL_VERSION_MIN => {}
        Ok(Some(_)) => {
            check.status = Status::Low;
            check.action = Some(format!(
                "upgrade to Linux >= {min_major}.{min_minor}: glommio's io_uring needs it"
            ));
        }
        Ok(None) => {
            check.status = Status::Missing;
            check.action = Some("cannot parse the kernel version".to_owned());
        }
        Err(e) => {
            check.status = Status::Missing;
            check.action = Some(e.clone());
        }
    }
    check
}

fn io_uring_disabled_check(value: &Result<Option<String>, String>) -> Check {
    let mut check = Check {
        setting: "kernel.io_uring_disabled".to_owned(),
        current: None,
        wanted: "0".to_owned(),
        rule: Rule::Exact.as_str().to_owned(),
        status: Status::Ok,
        action: None,
    };
    match value {
        // Kernels before 6.6 have no switch: io_uring is always enabled there.
        Ok(None) => check.current = Some("absent (kernel < 6.6: enabled)".to_owned()),
        Ok(Some(v)) => {
            check.current = Some(v.clone());
            match v.as_str() {
                "0" => {}
                "1" => {
                    check.status = Status::High;
                    check.action = Some(
                        "sysctl -w kernel.io_uring_disabled=0; at 1 only CAP_SYS_ADMIN processes \
                         and members of the group in kernel.io_uring_group may use io_uring"
                            .to_owned(),
                    );
                }
                _ => {
                    check.status = Status::High;
                    check.action = Some(
                        "sysctl -w kernel.io_uring_disabled=0: at 2 io_uring is off and the \
                         broker cannot start"
                            .to_owned(),
                    );
                }
            }
        }
        Err(e) => {
            check.status = Status::Missing;
            check.action = Some(e.clone());
        }
    }
    check
}

fn io_uring_probe_check(probe: &Result<(), ProbeError>) -> Check {
    let (current, status, action) = match probe {
        Ok(()) => ("works".to_owned(), Status::Ok, None),
        Err(ProbeError { errno }) => {
            let why = match *errno {
                libc::ENOSYS => {
                    "the kernel has no io_uring (or a seccomp filter answers ENOSYS): \
                     Linux >= 5.8 built with CONFIG_IO_URING"
                }
                libc::EPERM | libc::EACCES => {
                    "forbidden: kernel.io_uring_disabled, or a seccomp profile; Docker and \
                     containerd default profiles block io_uring: run with a profile that \
                     allows io_uring_setup, io_uring_enter and io_uring_register"
                }
                libc::ENOMEM => {
                    "out of locked memory: raise RLIMIT_MEMLOCK (LimitMEMLOCK=8M, ulimit -l 8192)"
                }
                _ => "io_uring_setup failed",
            };
            (
                format!("fails: {}", io::Error::from_raw_os_error(*errno)),
                Status::Fail,
                Some(why.to_owned()),
            )
        }
    };
    Check {
        setting: "io_uring_setup".to_owned(),
        current: Some(current),
        wanted: "works".to_owned(),
        rule: Rule::Exact.as_str().to_owned(),
        status,
        action,
    }
}

fn where_limits_apply(source: &LimitsSource) -> &'static str {
    match source {
        LimitsSource::Brokerctl => {
            "these are brokerctl's own limits, what a broker started from this shell gets; \
             pass --pid to check a running broker"
        }
        LimitsSource::Process(_) => "restart the broker after raising it",
    }
}

fn nofile_check(limit: &Result<RLimit, String>, wanted: u64, source: &LimitsSource) -> Check {
    let mut check = Check {
        setting: "rlimit.nofile".to_owned(),
        current: None,
        wanted: count_human(wanted),
        rule: Rule::AtLeast.as_str().to_owned(),
        status: Status::Ok,
        action: None,
    };
    match limit {
        Ok(l) => {
            check.current = Some(count_human(l.soft));
            if l.soft < wanted {
                check.status = Status::Low;
                check.action = Some(format!(
                    "raise the open-files limit to {wanted}: LimitNOFILE={wanted} (systemd), \
                     ulimit -n {wanted} (shell), --ulimit nofile={wanted}:{wanted} (docker), \
                     or the limits.d file apply.sh writes (new logins); {}",
                    where_limits_apply(source)
                ));
            }
        }
        Err(e) => {
            check.status = Status::Missing;
            check.action = Some(e.clone());
        }
    }
    check
}

fn memlock_check(limit: &Result<RLimit, String>, wanted: u64, source: &LimitsSource) -> Check {
    let mut check = Check {
        setting: "rlimit.memlock".to_owned(),
        current: None,
        wanted: bytes_human(wanted),
        rule: Rule::AtLeast.as_str().to_owned(),
        status: Status::Ok,
        action: None,
    };
    match limit {
        Ok(l) => {
            check.current = Some(bytes_human(l.soft));
            if l.soft < wanted {
                let kib = wanted / 1024;
                let mib = wanted / (1024 * 1024);
                let floor = if l.soft < MEMLOCK_MIN_BYTES {
                    "below 512 KiB the broker refuses to start"
                } else {
                    "the broker starts, but glommio cannot register its I/O buffers"
                };
                check.status = Status::Low;
                check.action = Some(format!(
                    "{floor}; raise the locked-memory limit: LimitMEMLOCK={mib}M (systemd), \
                     ulimit -l {kib} (shell), --ulimit memlock={wanted} (docker), or the \
                     limits.d file apply.sh writes (new logins); {}",
                    where_limits_apply(source)
                ));
            }
        }
        Err(e) => {
            check.status = Status::Missing;
            check.action = Some(e.clone());
        }
    }
    check
}

/// The wanted value with each field's comparison: `<=4096 <=16384 >=4194304`.
/// Non-numeric values (`works`) are shown as they are.
fn wanted_display(check: &Check) -> String {
    let rules: Vec<&str> = check.rule.split(' ').collect();
    let numeric = check.wanted.starts_with(|c: char| c.is_ascii_digit());
    let symbol = |r: &str| Rule::parse(r).map_or("", Rule::symbol);
    if !numeric {
        return check.wanted.clone();
    }
    if rules.len() == 1 {
        return format!("{}{}", symbol(rules[0]), check.wanted);
    }
    let values: Vec<&str> = check.wanted.split(' ').collect();
    if rules.len() != values.len() {
        return check.wanted.clone();
    }
    let parts: Vec<String> = rules
        .iter()
        .zip(&values)
        .map(|(r, v)| format!("{}{v}", symbol(r)))
        .collect();
    parts.join(" ")
}

impl Report {
    /// The human table: setting, current, wanted, status and what to do, then a
    /// summary line.
    pub fn render_table(&self) -> String {
        let headers = ["SETTING", "CURRENT", "WANTED", "STATUS"];
        let rows: Vec<[String; 5]> = self
            .checks
            .iter()
            .map(|c| {
                [
                    c.setting.clone(),
                    c.current.clone().unwrap_or_else(|| "-".to_owned()),
                    wanted_display(c),
                    c.status.as_str().to_owned(),
                    c.action.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let mut widths = headers.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row.iter()) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = format!(
            "Profile {} ({}); sysctls from {}; limits of {}.\n\n",
            self.profile,
            self.profile.sized_for(),
            self.proc_root.join("sys").display(),
            match self.limits_source {
                LimitsSource::Brokerctl =>
                    "this process (pass --pid for a running broker)".to_owned(),
                LimitsSource::Process(pid) => format!("pid {pid}"),
            }
        );
        let line = |cells: [&str; 5]| {
            let mut s = String::new();
            for (i, cell) in cells[..4].iter().enumerate() {
                s.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
            s.push_str(cells[4]);
            s.trim_end().to_owned() + "\n"
        };
        out.push_str(&line([
            headers[0], headers[1], headers[2], headers[3], "ACTION",
        ]));
        for row in &rows {
            out.push_str(&line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
        }
        out.push('\n');
        if !self.io_uring_probed {
            out.push_str("io_uring_setup probe skipped: --proc-root is not the live /proc.\n");
        }
        let failing = self
            .checks
            .iter()
            .filter(|c| c.status != Status::Ok)
            .count();
        if failing == 0 {
            out.push_str(&format!(
                "All {} checks meet profile {}.\n",
                self.checks.len(),
                self.profile
            ));
        } else {
            out.push_str(&format!(
                "{failing} of {} checks do not meet profile {}. To apply every sysctl and the \
                 limits.d file at once: sudo kernel-tuning/apply.sh {} (add --dry-run to preview).\n",
                self.checks.len(),
                self.profile,
                self.profile
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Value {
        Value::parse(s).unwrap()
    }

    #[test]
    fn every_profile_parses_and_joins_with_the_rules() {
        for name in ProfileName::ALL {
            let profile = Profile::load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(profile.name, name);
            assert!(
                profile.sysctls.len() >= 20,
                "{name}: {}",
                profile.sysctls.len()
            );
        }
    }

    fn sysctl<'a>(profile: &'a Profile, name: &str) -> &'a [u64] {
        let spec = profile.sysctls.iter().find(|s| s.name == name);
        &spec
            .unwrap_or_else(|| panic!("{}: no {name}", profile.name))
            .wanted
            .0
    }

    #[test]
    fn profiles_get_more_demanding_in_each_settings_direction() {
        let profiles: Vec<Profile> = ProfileName::ALL
            .iter()
            .map(|&n| Profile::load(n).unwrap())
            .collect();
        for pair in profiles.windows(2) {
            let (lower, higher) = (&pair[0], &pair[1]);
            let names = |p: &Profile| p.sysctls.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
            assert_eq!(
                names(lower),
                names(higher),
                "same settings in the same order"
            );
            for (a, b) in lower.sysctls.iter().zip(&higher.sysctls) {
                for ((rule, x), y) in a.rules.iter().zip(&a.wanted.0).zip(&b.wanted.0) {
                    let ordered = match rule {
                        Rule::AtLeast => x <= y,
                        Rule::AtMost => x >= y,
                        Rule::Exact => x == y,
                    };
                    assert!(
                        ordered,
                        "{}: {} {} then {} {} breaks {}",
                        a.name,
                        lower.name,
                        a.wanted,
                        higher.name,
                        b.wanted,
                        rule.as_str()
                    );
                }
            }
            assert!(lower.limits.nofile <= higher.limits.nofile);
            assert!(lower.limits.memlock_bytes <= higher.limits.memlock_bytes);
        }
    }

    #[test]
    fn each_profile_is_consistent_with_itself_and_the_broker() {
        use tessera_shard::memlock::MEMLOCK_RECOMMENDED_BYTES;
        let config = crate::config::Config::default();
        // Default ports (ARCHITECTURE.md): MQTT, TLS, WebSocket, QUIC, admin, cluster.
        let mut ports = vec![8883, 8083, 14567, 7000];
        ports.extend(config.server.listen.iter().map(|a| u64::from(a.port())));
        ports.push(u64::from(config.server.admin_listen.port()));
        for name in ProfileName::ALL {
            let p = Profile::load(name).unwrap();
            let nofile = p.limits.nofile;
            // The kernel refuses a nofile limit above fs.nr_open.
            assert!(nofile <= sysctl(&p, "fs.nr_open")[0], "{name}");
            assert!(
                sysctl(&p, "fs.nr_open")[0] <= sysctl(&p, "fs.file-max")[0],
                "{name}"
            );
            assert!(
                p.limits.memlock_bytes >= MEMLOCK_RECOMMENDED_BYTES,
                "{name}"
            );
            for key in ["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.ipv4.tcp_mem"] {
                let v = sysctl(&p, key);
                assert!(v.len() == 3 && v[0] <= v[1] && v[1] <= v[2], "{name} {key}");
            }
            let range = sysctl(&p, "net.ipv4.ip_local_port_range");
            assert!(range.len() == 2 && range[0] < range[1] && range[1] <= 65535);
            // Ephemeral ports never collide with a port the broker listens on.
            for port in &ports {
                assert!(*port < range[0], "{name}: port {port} is in {range:?}");
            }
            // Every connection needs an fd: a profile holds at least the upper end of
            // its range (250K, 500K, 1M) with headroom.
            let upper = match name {
                ProfileName::Standard => 250_000,
                ProfileName::Aggressive => 500_000,
                ProfileName::Maximum => 1_000_000,
            };
            assert!(nofile >= upper * 2, "{name}: nofile {nofile}");
        }
    }

    #[test]
    fn values_parse_as_unsigned_integer_lists() {
        assert_eq!(
            v("4096\t131072\t33554432"),
            Value(vec![4096, 131072, 33554432])
        );
        assert_eq!(v(" 20000 65535 "), Value(vec![20000, 65535]));
        assert_eq!(v("9223372036854775807"), Value(vec![i64::MAX as u64]));
        for bad in [
            "",
            "  ",
            "-1",
            "1.5",
            "0x10",
            "1,2",
            "a b",
            "1 2 3 4 5 6 7 8 9",
        ] {
            assert_eq!(Value::parse(bad), None, "{bad:?}");
        }
        assert_eq!(v("4096 16384 4194304").to_string(), "4096 16384 4194304");
    }

    #[test]
    fn sysctl_names_are_checked() {
        for good in [
            "fs.file-max",
            "net.ipv4.tcp_rmem",
            "vm.swappiness",
            "net.core.somaxconn",
        ] {
            assert!(is_valid_sysctl_name(good), "{good}");
        }
        for bad in [
            "",
            "fs",
            "fs.",
            ".fs.x",
            "fs..x",
            "Fs.x",
            "fs.file max",
            "fs/file-max",
        ] {
            assert!(!is_valid_sysctl_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn sysctl_conf_errors_name_the_line() {
        let err = parse_sysctl_conf("t.conf", "# c\n\nfs.file-max = 1\nbad line\n").unwrap_err();
        assert_eq!((err.line, err.file.as_str()), (4, "t.conf"));
        let err = parse_sysctl_conf("t.conf", "fs.file-max = lots\n").unwrap_err();
        assert!(err.message.contains("unsigned integers"), "{err}");
        let err = parse_sysctl_conf("t.conf", "a.b = 1\na.b = 2\n").unwrap_err();
        assert!(err.message.contains("twice"), "{err}");
        let ok = parse_sysctl_conf("t.conf", "; c\n net.ipv4.tcp_rmem=1 2 3 \n").unwrap();
        assert_eq!(ok, vec![("net.ipv4.tcp_rmem".to_owned(), v("1 2 3"))]);
    }

    #[test]
    fn limits_conf_needs_consistent_nofile_and_memlock() {
        let text = "* soft nofile 10\nroot hard nofile 10\n* - memlock 8192\n";
        let limits = parse_limits_conf("l", text).unwrap();
        assert_eq!(
            limits,
            Limits {
                nofile: 10,
                memlock_bytes: 8 * 1024 * 1024
            }
        );
        assert!(
            parse_limits_conf("l", "* soft nofile 10\n* hard nofile 11\n* - memlock 1\n").is_err()
        );
        assert!(parse_limits_conf("l", "* soft nofile 10\n").is_err());
        assert!(parse_limits_conf("l", "* soft nproc 10\n").is_err());
        assert!(parse_limits_conf("l", "* maybe nofile 10\n").is_err());
    }

    #[test]
    fn compare_applies_each_fields_rule_and_the_first_miss_decides() {
        use Rule::*;
        let rmem = [AtMost, AtMost, AtLeast];
        let want = v("4096 16384 4194304");
        assert_eq!(compare(&rmem, &v("4096 16384 4194304"), &want), Status::Ok);
        assert_eq!(compare(&rmem, &v("1024 4096 33554432"), &want), Status::Ok);
        assert_eq!(
            compare(&rmem, &v("4096 131072 33554432"), &want),
            Status::High
        );
        assert_eq!(compare(&rmem, &v("4096 16384 1048576"), &want), Status::Low);
        assert_eq!(compare(&rmem, &v("4096 16384"), &want), Status::Missing);
        assert_eq!(compare(&[Exact], &v("2"), &v("1")), Status::High);
        assert_eq!(compare(&[Exact], &v("0"), &v("1")), Status::Low);
        assert_eq!(
            compare(&[AtLeast], &v("2466183"), &v("2097152")),
            Status::Ok
        );
    }

    #[test]
    fn merge_never_weakens_a_field_beyond_the_profile() {
        use Rule::*;
        let rules = [AtMost, AtMost, AtLeast];
        let merged = merge(&rules, &v("4096 131072 33554432"), &v("4096 16384 4194304"));
        assert_eq!(merged, v("4096 16384 33554432"));
        assert_eq!(merge(&[Exact], &v("2"), &v("1")), v("1"));
        assert_eq!(
            merge(&[AtMost, AtLeast], &v("32768 60999"), &v("20000 65535")),
            v("20000 65535")
        );
        // A merged value always meets the profile.
        for cur in ["1 1 1", "99999999 99999999 99999999", "4096 131072 1"] {
            let m = merge(&rules, &v(cur), &v("4096 16384 4194304"));
            assert_eq!(
                compare(&rules, &m, &v("4096 16384 4194304")),
                Status::Ok,
                "{cur}"
            );
        }
    }

    #[test]
    fn proc_limits_rows_parse() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max open files            20000                1048576              files     \n\
                    Max locked memory         unlimited            unlimited            bytes     \n";
        assert_eq!(
            proc_limit(text, "Max open files").unwrap(),
            RLimit {
                soft: 20000,
                hard: 1_048_576
            }
        );
        assert_eq!(
            proc_limit(text, "Max locked memory").unwrap().soft,
            u64::MAX
        );
        assert!(proc_limit(text, "Max processes").is_err());
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.8.0"), Some((5, 8)));
        assert_eq!(kernel_version("6.18.44-fc-v595"), Some((6, 18)));
        assert_eq!(kernel_version("5.15-rc1"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
        assert!((5, 4) < KERNEL_VERSION_MIN && (5, 10) > KERNEL_VERSION_MIN);
    }

    /// A view that meets `profile` exactly.
    fn matching_view(profile: &Profile) -> SystemView {
        SystemView {
            proc_root: PathBuf::from("/fake"),
            sysctls: profile
                .sysctls
                .iter()
                .map(|s| (s.name.clone(), Ok(s.wanted.to_string())))
                .collect(),
            osrelease: Ok("6.1.0-18-amd64".to_owned()),
            io_uring_disabled: Ok(None),
            limits_source: LimitsSource::Process(1),
            nofile: Ok(RLimit {
                soft: profile.limits.nofile,
                hard: profile.limits.nofile,
            }),
            memlock: Ok(RLimit {
                soft: u64::MAX,
                hard: u64::MAX,
            }),
            io_uring_probe: None,
        }
    }

    fn status_of(report: &Report, setting: &str) -> Status {
        report
            .checks
            .iter()
            .find(|c| c.setting == setting)
            .unwrap_or_else(|| panic!("no {setting} row"))
            .status
    }

    #[test]
    fn a_matching_system_is_ok_everywhere() {
        for name in ProfileName::ALL {
            let profile = Profile::load(name).unwrap();
            let report = evaluate(&profile, &matching_view(&profile));
            assert!(report.ok, "{name}:\n{}", report.render_table());
            assert!(report.checks.iter().all(|c| c.action.is_none()));
            let table = report.render_table();
            assert!(table.contains("checks meet profile"), "{table}");
        }
    }

    #[test]
    fn each_kind_of_miss_is_reported_with_an_action() {
        let profile = Profile::load(ProfileName::Standard).unwrap();
        let mut view = matching_view(&profile);
        let set = |view: &mut SystemView, key: &str, value: Result<String, String>| {
            view.sysctls.iter_mut().find(|(k, _)| k == key).unwrap().1 = value;
        };
        set(&mut view, "net.core.somaxconn", Ok("128".to_owned()));
        set(
            &mut view,
            "net.ipv4.tcp_rmem",
            Ok("4096\t131072\t33554432".to_owned()),
        );
        set(&mut view, "vm.swappiness", Err("cannot read".to_owned()));
        view.osrelease = Ok("5.4.0".to_owned());
        view.io_uring_disabled = Ok(Some("2".to_owned()));
        view.io_uring_probe = Some(Err(ProbeError { errno: libc::EPERM }));
        view.nofile = Ok(RLimit {
            soft: 1024,
            hard: 4096,
        });
        view.memlock = Ok(RLimit {
            soft: 64 * 1024,
            hard: 64 * 1024,
        });
        let report = evaluate(&profile, &view);
        assert!(!report.ok);
        assert_eq!(status_of(&report, "net.core.somaxconn"), Status::Low);
        assert_eq!(status_of(&report, "net.ipv4.tcp_rmem"), Status::High);
        assert_eq!(status_of(&report, "vm.swappiness"), Status::Missing);
        assert_eq!(status_of(&report, "kernel.osrelease"), Status::Low);
        assert_eq!(status_of(&report, "kernel.io_uring_disabled"), Status::High);
        assert_eq!(status_of(&report, "io_uring_setup"), Status::Fail);
        assert_eq!(status_of(&report, "rlimit.nofile"), Status::Low);
        assert_eq!(status_of(&report, "rlimit.memlock"), Status::Low);
        let rmem = report
            .checks
            .iter()
            .find(|c| c.setting == "net.ipv4.tcp_rmem")
            .unwrap();
        assert_eq!(
            rmem.action.as_deref(),
            Some("sysctl -w net.ipv4.tcp_rmem=\"4096 16384 33554432\"")
        );
        assert!(
            report
                .checks
                .iter()
                .all(|c| (c.status == Status::Ok) == c.action.is_none())
        );
        let table = report.render_table();
        for needle in [
            "<=4096 <=16384 >=4194304",
            "LOW",
            "HIGH",
            "MISSING",
            "FAIL",
            "LimitNOFILE=524288",
            "below 512 KiB the broker refuses to start",
            "8 of ",
            "apply.sh standard",
        ] {
            assert!(table.contains(needle), "{needle:?} not in\n{table}");
        }
    }

    #[test]
    fn json_report_has_the_documented_shape() {
        let profile = Profile::load(ProfileName::Maximum).unwrap();
        let report = evaluate(&profile, &matching_view(&profile));
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["profile"], "maximum");
        assert_eq!(json["ok"], true);
        assert_eq!(json["limits_source"]["kind"], "process");
        assert_eq!(json["limits_source"]["pid"], 1);
        let first = &json["checks"][0];
        assert_eq!(first["setting"], "fs.file-max");
        assert_eq!(first["status"], "ok");
        assert_eq!(first["rule"], "at-least");
        assert!(first["action"].is_null());
    }
}
