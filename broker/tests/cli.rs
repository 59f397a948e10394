//! Goal: the `broker` command line behaves as its operators are promised: the
//! printed default configuration is valid TOML and a usable config file, and
//! every bad setting (file, environment, flag) stops the broker before it
//! listens, with a distinct exit code and a message naming what to fix.
//!
//! Method: run the real binary (bounded by a timeout, killed if it hangs) and
//! assert its exit code, stdout and stderr. Config files go to the system
//! temporary directory under names unique to this process and test.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use common::{Broker, run_bounded};
use tessera_shard::placement::{CpuList, allowed_cpus};

/// Time a broker that refuses to start may take to say so.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit code of a configuration error (`main.rs`).
const EXIT_CONFIG_ERROR: i32 = 2;

/// A config file with `text`, removed on drop.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(test: &str, text: &str) -> TempConfig {
        let path =
            std::env::temp_dir().join(format!("tessera-cli-{}-{test}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write config file");
        TempConfig(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("UTF-8 temp path")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the broker refused to start with `code` and never listened.
fn assert_refused(out: &Output, code: i32) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "status {:?}, stderr:\n{err}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("tessera: listening"),
        "it listened: {stdout}"
    );
    err
}

#[test]
fn print_default_config_is_toml_and_a_usable_config_file() {
    let out = run_bounded(&["--print-default-config"], &[], EXIT_TIMEOUT);
    assert!(
        out.status.success(),
        "status {:?}, stderr:\n{}",
        out.status,
        stderr(&out)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 config");
    let table: toml::Table = toml::from_str(&text).expect("the printed config parses as TOML");
    for section in ["server", "limits", "persistence", "log"] {
        assert!(
            table.get(section).is_some_and(toml::Value::is_table),
            "section [{section}] in:\n{text}"
        );
    }
    assert!(
        table["limits"]
            .get("max_packet_size_bytes")
            .is_some_and(toml::Value::is_integer)
    );

    // Fed back as --config, it starts a broker (the flags only move the port).
    let file = TempConfig::new("defaults", &text);
    let broker = Broker::start_with(&["--config", file.path()], &[]);
    assert_ne!(broker.addr().port(), 0);
}

#[test]
fn unknown_field_in_config_file_exits_2_naming_the_field() {
    let file = TempConfig::new(
        "unknown-field",
        "[limits]\nmax_inflight = 8\nmax_infligth = 3\n",
    );
    let out = run_bounded(
        &["--listen", "127.0.0.1:0", "--config", file.path()],
        &[],
        EXIT_TIMEOUT,
    );
    let err = assert_refused(&out, EXIT_CONFIG_ERROR);
    assert!(
        err.contains("limits.max_infligth"),
        "names the field: {err}"
    );
    assert!(err.contains(file.path()), "names the file: {err}");
}

#[test]
fn more_shards_than_allowed_cpus_fails_naming_the_cpus() {
    let allowed = allowed_cpus().expect("affinity mask");
    let too_many = (allowed.len() + 97).to_string();
    let out = run_bounded(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--shards",
            &too_many,
        ],
        &[],
        EXIT_TIMEOUT,
    );
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "started with {too_many} shards: {err}"
    );
    assert!(
        err.contains(&format!("shards = {too_many}")),
        "names the request: {err}"
    );
    let cpus = format!("CPUs {}", CpuList(&allowed));
    assert!(err.contains(&cpus), "names the allowed {cpus}: {err}");
}

#[test]
fn bad_environment_variables_exit_2_naming_the_variable() {
    let cases = [
        // Not a number.
        ("TESSERA_LIMITS__MAX_INFLIGHT", "lots"),
        // A number out of range (validated after loading).
        ("TESSERA_LIMITS__MAX_PACKET_SIZE_BYTES", "10"),
        // A misspelled setting.
        ("TESSERA_LIMITS__MAX_INFLIGTH", "8"),
        // An unknown enum value.
        ("TESSERA_LOG__LEVEL", "loud"),
    ];
    for (var, value) in cases {
        let out = run_bounded(&["--listen", "127.0.0.1:0"], &[(var, value)], EXIT_TIMEOUT);
        let err = assert_refused(&out, EXIT_CONFIG_ERROR);
        assert!(
            err.contains(var),
            "{var}={value}: the message names the variable: {err}"
        );
    }
}
