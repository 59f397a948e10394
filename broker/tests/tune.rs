//! Goal: the kernel-tuning tools tell operators the truth. `brokerctl tune check`
//! reports OK for a system that meets a profile and LOW/HIGH/MISSING, with the
//! profile's value and the command to fix it, for one that does not, with exit codes
//! scripts can rely on; `kernel-tuning/apply.sh` previews without changing anything,
//! refuses unknown profiles, applies without ever lowering a value, is a no-op the
//! second time, and leaves a system that `tune check` passes.
//!
//! Method: fake proc trees (`<tmp>/proc/sys/...` and `<tmp>/proc/PID/limits`) built
//! from the embedded profiles, and the real binaries run against them with
//! `--proc-root`/`--pid` (brokerctl) and `--root` (apply.sh). The one run against the
//! live system is `apply.sh --dry-run`, which must leave every sysctl as it was.
//! Every child process runs under a timeout.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tessera_broker::tune::{Profile, ProfileName, sysctl_path};

/// Bound on any one brokerctl or apply.sh run.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// The pid whose limits the fake trees hold.
const FAKE_PID: &str = "4242";

const EXIT_OK: i32 = 0;
const EXIT_PROBLEM: i32 = 1;
const EXIT_USAGE: i32 = 2;

fn apply_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-tuning/apply.sh")
}

/// Runs `cmd` to completion with no stdin, killing it after [`RUN_TIMEOUT`].
fn run(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    // Drain both pipes on threads so a chatty child never blocks on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().expect("stdout thread"),
        stderr: err.join().expect("stderr thread"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the exit code, showing both streams when it is wrong; returns stdout.
fn expect_code(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn brokerctl(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_brokerctl"));
    cmd.args(args);
    run(cmd)
}

fn apply(args: &[&str]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(apply_sh()).args(args);
    run(cmd)
}

/// A temporary directory holding a fake system root, removed on drop.
struct FakeRoot(PathBuf);

impl FakeRoot {
    /// A root whose `proc/` meets `profile` exactly: every sysctl at the profile's
    /// value, a 6.1 kernel with io_uring enabled, and a process [`FAKE_PID`] with the
    /// profile's limits.
    fn matching(test: &str, profile: ProfileName) -> FakeRoot {
        let dir = std::env::temp_dir().join(format!("tessera-tune-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let root = FakeRoot(dir);
        let profile = Profile::load(profile).expect("embedded profile");
        for spec in &profile.sysctls {
            root.set(&spec.name, &spec.wanted.to_string());
        }
        root.set("kernel.osrelease", "6.1.0-18-amd64");
        root.set("kernel.io_uring_disabled", "0");
        root.set_limits(profile.limits.nofile, profile.limits.memlock_bytes);
        root
    }

    fn proc(&self) -> PathBuf {
        self.0.join("proc")
    }

    fn proc_str(&self) -> String {
        self.proc().to_str().expect("UTF-8 temp path").to_owned()
    }

    fn root_str(&self) -> &str {
        self.0.to_str().expect("UTF-8 temp path")
    }

    fn sysctl_file(&self, name: &str) -> PathBuf {
        sysctl_path(&self.proc(), name)
    }

    /// Writes sysctl `name` the way the kernel shows it (tab-separated fields).
    fn set(&self, name: &str, value: &str) {
        let path = self.sysctl_file(name);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, value.replace(' ', "\t") + "\n").expect("write sysctl");
    }

    fn get(&self, name: &str) -> String {
        let raw = fs::read_to_string(self.sysctl_file(name)).expect("read sysctl");
        raw.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    fn set_limits(&self, nofile: u64, memlock_bytes: u64) {
        let dir = self.proc().join(FAKE_PID);
        fs::create_dir_all(&dir).expect("mkdir pid");
        let limits = format!(
            "Limit                     Soft Limit           Hard Limit           Units     \n\
             Max cpu time              unlimited            unlimited            seconds   \n\
             Max open files            {nofile:<20} {nofile:<20} files     \n\
             Max locked memory         {memlock_bytes:<20} {memlock_bytes:<20} bytes     \n"
        );
        fs::write(dir.join("limits"), limits).expect("write limits");
    }

    /// `brokerctl tune check --profile P --proc-root <fake> --pid FAKE_PID [--json]`.
    fn check(&self, profile: &str, json: bool) -> Output {
        let proc_root = self.proc_str();
        let mut args = vec![
            "tune",
            "check",
            "--profile",
            profile,
            "--proc-root",
            &proc_root,
            "--pid",
            FAKE_PID,
        ];
        if json {
            args.push("--json");
        }
        brokerctl(&args)
    }
}

impl Drop for FakeRoot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(&out.stdout)))
}

/// The JSON row of `setting`.
fn row<'a>(report: &'a serde_json::Value, setting: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .find(|c| c["setting"] == setting)
        .unwrap_or_else(|| panic!("no row for {setting} in {report:#}"))
}

#[test]
fn check_passes_a_tree_that_matches_each_profile() {
    for profile in ProfileName::ALL {
        let root = FakeRoot::matching(&format!("ok-{profile}"), profile);
        let out = root.check(profile.as_str(), true);
        expect_code(&out, EXIT_OK);
        let report = json_of(&out);
        assert_eq!(report["profile"], profile.as_str());
        assert_eq!(report["ok"], true);
        assert_eq!(
            report["io_uring_probed"], false,
            "a fake tree is never probed"
        );
        let checks = report["checks"].as_array().expect("checks");
        let loaded = Profile::load(profile).expect("profile");
        // Every sysctl, kernel version, io_uring switch, nofile and memlock.
        assert_eq!(checks.len(), loaded.sysctls.len() + 4, "{report:#}");
        for c in checks {
            assert_eq!(c["status"], "ok", "{c:#}");
            assert!(c["action"].is_null(), "{c:#}");
        }
        let rmem = row(&report, "net.ipv4.tcp_rmem");
        assert_eq!(rmem["rule"], "at-most at-most at-least");

        let table = root.check(profile.as_str(), false);
        let table = expect_code(&table, EXIT_OK);
        assert!(table.contains("checks meet profile"), "{table}");
        assert!(table.contains("io_uring_setup probe skipped"), "{table}");
    }
}

#[test]
fn check_reports_low_high_and_missing_with_the_wanted_value() {
    let root = FakeRoot::matching("below", ProfileName::Standard);
    root.set("fs.file-max", "65536");
    root.set("net.core.somaxconn", "128");
    root.set("net.ipv4.tcp_rmem", "4096 131072 6291456");
    fs::remove_file(root.sysctl_file("vm.max_map_count")).expect("remove");
    root.set_limits(1024, 64 * 1024);

    let out = root.check("standard", true);
    expect_code(&out, EXIT_PROBLEM);
    let report = json_of(&out);
    assert_eq!(report["ok"], false);

    let file_max = row(&report, "fs.file-max");
    assert_eq!(file_max["status"], "low");
    assert_eq!(file_max["current"], "65536");
    assert_eq!(file_max["wanted"], "2097152");
    assert_eq!(file_max["action"], "sysctl -w fs.file-max=2097152");

    let somaxconn = row(&report, "net.core.somaxconn");
    assert_eq!(
        (&somaxconn["status"], &somaxconn["wanted"]),
        (&"low".into(), &"4096".into())
    );

    // tcp_rmem's default is above the profile's; the fix keeps the larger maximum.
    let rmem = row(&report, "net.ipv4.tcp_rmem");
    assert_eq!(rmem["status"], "high");
    assert_eq!(rmem["current"], "4096 131072 6291456");
    assert_eq!(rmem["wanted"], "4096 16384 4194304");
    assert_eq!(
        rmem["action"],
        "sysctl -w net.ipv4.tcp_rmem=\"4096 16384 6291456\""
    );

    assert_eq!(row(&report, "vm.max_map_count")["status"], "missing");
    assert!(row(&report, "vm.max_map_count")["current"].is_null());

    let nofile = row(&report, "rlimit.nofile");
    assert_eq!(
        (&nofile["status"], &nofile["current"]),
        (&"low".into(), &"1024".into())
    );
    assert_eq!(nofile["wanted"], "524288");
    assert!(
        nofile["action"]
            .as_str()
            .unwrap()
            .contains("LimitNOFILE=524288")
    );
    let memlock = row(&report, "rlimit.memlock");
    assert_eq!(memlock["status"], "low");
    assert!(
        memlock["action"]
            .as_str()
            .unwrap()
            .contains("refuses to start")
    );

    // Rows that still meet the profile stay OK.
    assert_eq!(row(&report, "fs.nr_open")["status"], "ok");

    // The table says the same, with the comparison in the WANTED column.
    let table = root.check("standard", false);
    let table = expect_code(&table, EXIT_PROBLEM);
    let line = table
        .lines()
        .find(|l| l.starts_with("fs.file-max"))
        .expect("fs.file-max line");
    for needle in ["65536", ">=2097152", "LOW", "sysctl -w fs.file-max=2097152"] {
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
    }
    assert!(table.contains("6 of "), "{table}");
}

#[test]
fn check_flags_io_uring_switch_and_old_kernels() {
    let root = FakeRoot::matching("io-uring", ProfileName::Standard);
    root.set("kernel.io_uring_disabled", "2");
    root.set("kernel.osrelease", "5.4.0-150-generic");
    let out = root.check("standard", true);
    expect_code(&out, EXIT_PROBLEM);
    let report = json_of(&out);
    assert_eq!(row(&report, "kernel.io_uring_disabled")["status"], "high");
    assert_eq!(row(&report, "kernel.osrelease")["status"], "low");
    assert_eq!(row(&report, "kernel.osrelease")["wanted"], "5.8");

    // Kernels before 6.6 have no switch at all: that is io_uring enabled.
    fs::remove_file(root.sysctl_file("kernel.io_uring_disabled")).expect("remove");
    root.set("kernel.osrelease", "6.1.0");
    let out = root.check("standard", true);
    expect_code(&out, EXIT_OK);
}

#[test]
fn usage_errors_exit_2_and_check_nothing() {
    let out = brokerctl(&["tune", "check", "--profile", "huge"]);
    expect_code(&out, EXIT_USAGE);
    assert!(text(&out.stderr).contains("standard, aggressive, maximum"));
    let out = brokerctl(&["tune", "check", "--proc-root", "/nonexistent/tessera"]);
    expect_code(&out, EXIT_USAGE);
    assert!(text(&out.stderr).contains("not a directory"));
    assert!(out.stdout.is_empty());
    expect_code(&brokerctl(&["tune", "fix"]), EXIT_USAGE);
    expect_code(&brokerctl(&[]), EXIT_USAGE);
    expect_code(&brokerctl(&["completions", "tcsh"]), EXIT_USAGE);
}

#[test]
fn completions_cover_the_subcommands() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = brokerctl(&["completions", shell]);
        let script = expect_code(&out, EXIT_OK);
        for word in ["brokerctl", "tune", "proc-root"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
}

/// The live values of every setting the profile names (absent ones as `None`).
fn live_sysctls(profile: &Profile) -> Vec<(String, Option<String>)> {
    profile
        .sysctls
        .iter()
        .map(|s| {
            let v = fs::read_to_string(sysctl_path(Path::new("/proc"), &s.name)).ok();
            (s.name.clone(), v)
        })
        .collect()
}

#[test]
fn apply_dry_run_on_the_live_system_prints_the_diff_and_changes_nothing() {
    let profile = Profile::load(ProfileName::Standard).expect("profile");
    let before = live_sysctls(&profile);
    let persistent = Path::new("/etc/sysctl.d/90-tessera-standard.conf");
    let existed = persistent.exists();

    let out = apply(&["standard", "--dry-run"]);
    let stdout = expect_code(&out, EXIT_OK);
    assert!(stdout.contains("SETTING"), "{stdout}");
    for spec in &profile.sysctls {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(spec.name.as_str()))
            .unwrap_or_else(|| panic!("no line for {}:\n{stdout}", spec.name));
        assert!(
            line.contains(&spec.wanted.to_string())
                && (line.contains("keep") || line.contains("set") || line.contains("skip")),
            "{line}"
        );
    }
    assert!(stdout.contains("Dry run: nothing was changed."), "{stdout}");
    assert_eq!(live_sysctls(&profile), before, "a dry run changed a sysctl");
    assert_eq!(
        persistent.exists(),
        existed,
        "a dry run wrote {persistent:?}"
    );
}

#[test]
fn apply_refuses_unknown_profiles_and_bad_options() {
    let out = apply(&["turbo", "--dry-run"]);
    expect_code(&out, EXIT_USAGE);
    let err = text(&out.stderr);
    assert!(err.contains("unknown profile 'turbo'"), "{err}");
    assert!(err.contains("standard aggressive maximum"), "{err}");
    expect_code(&apply(&["--dry-run"]), EXIT_USAGE);
    expect_code(&apply(&["standard", "--force"]), EXIT_USAGE);
    expect_code(&apply(&["standard", "maximum", "--dry-run"]), EXIT_USAGE);
}

#[test]
fn apply_keeps_better_values_is_idempotent_and_satisfies_check() {
    // Start from the kernel defaults of a typical host, with fs.file-max already far
    // above the profile (systemd raises it to LONG_MAX) and another profile's file.
    let root = FakeRoot::matching("apply", ProfileName::Standard);
    root.set("fs.file-max", "9223372036854775807");
    root.set("net.core.netdev_max_backlog", "1000");
    root.set("net.ipv4.tcp_rmem", "4096 131072 33554432");
    root.set("net.ipv4.ip_local_port_range", "32768 60999");
    root.set("net.ipv4.tcp_tw_reuse", "2");
    let sysctl_d = root.0.join("etc/sysctl.d");
    fs::create_dir_all(&sysctl_d).expect("mkdir");
    fs::write(
        sysctl_d.join("90-tessera-maximum.conf"),
        "vm.swappiness = 1\n",
    )
    .expect("write");
    let profile_file = sysctl_d.join("90-tessera-standard.conf");
    let limits_file = root.0.join("etc/security/limits.d/90-tessera.conf");

    // A dry run on the fake root changes nothing either.
    let out = apply(&["standard", "--dry-run", "--root", root.root_str()]);
    let stdout = expect_code(&out, EXIT_OK);
    assert!(stdout.contains("4 of 20 settings to change"), "{stdout}");
    assert!(stdout.contains("remove (profile maximum)"), "{stdout}");
    assert_eq!(root.get("net.core.netdev_max_backlog"), "1000");
    assert!(!profile_file.exists() && !limits_file.exists());

    let out = apply(&["standard", "--root", root.root_str()]);
    let stdout = expect_code(&out, EXIT_OK);
    assert!(stdout.contains("Applied profile standard."), "{stdout}");
    assert_eq!(root.get("net.core.netdev_max_backlog"), "4096");
    assert_eq!(root.get("net.ipv4.ip_local_port_range"), "20000 65535");
    assert_eq!(root.get("net.ipv4.tcp_tw_reuse"), "1");
    // Lowered only in the field the profile caps; the larger maximum is kept.
    assert_eq!(root.get("net.ipv4.tcp_rmem"), "4096 16384 33554432");
    assert_eq!(
        root.get("fs.file-max"),
        "9223372036854775807",
        "never lowered"
    );

    let written = fs::read_to_string(&profile_file).expect("sysctl.d file");
    assert!(
        written.contains("fs.file-max = 9223372036854775807\n"),
        "{written}"
    );
    assert!(
        written.contains("net.ipv4.tcp_rmem = 4096 16384 33554432\n"),
        "{written}"
    );
    assert!(
        !sysctl_d.join("90-tessera-maximum.conf").exists(),
        "stale profile kept"
    );
    let limits = fs::read_to_string(&limits_file).expect("limits.d file");
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kernel-tuning/profiles/standard.limits.conf");
    assert_eq!(limits, fs::read_to_string(source).expect("profile limits"));

    // The second run finds nothing to do and rewrites nothing.
    let out = apply(&["standard", "--root", root.root_str()]);
    let stdout = expect_code(&out, EXIT_OK);
    assert!(stdout.contains("0 of 20 settings to change"), "{stdout}");
    assert_eq!(stdout.matches("unchanged").count(), 2, "{stdout}");
    assert_eq!(fs::read_to_string(&profile_file).expect("again"), written);

    // And the result meets the profile by brokerctl's reading of the same rules.
    let out = root.check("standard", true);
    expect_code(&out, EXIT_OK);
}
