//! Helper for the black-box tests: run the `bench` binary and read the JSON object
//! on the last line of its stdout.

use std::path::PathBuf;
use std::process::Command;

/// What one bench run printed and how it ended.
#[derive(Debug)]
pub struct BenchRun {
    /// Exit code.
    pub code: i32,
    /// The JSON object on the last line of stdout.
    pub json: serde_json::Value,
    /// All of stdout and stderr, for failure messages.
    pub output: String,
}

impl BenchRun {
    /// An unsigned field of the JSON report.
    pub fn u(&self, key: &str) -> u64 {
        self.json[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no unsigned {key:?} in the report:\n{}", self.output))
    }
}

/// Runs `bench ARGS --json` against `port` and parses its last stdout line.
pub fn bench(port: u16, args: &[&str]) -> BenchRun {
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .args(["--port", &port.to_string(), "--json"])
        .output()
        .expect("the bench binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let output = format!(
        "$ bench {} --port {port} --json\n--- stdout\n{stdout}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}):\n{output}"));
    BenchRun {
        code: out.status.code().unwrap_or(-1),
        json,
        output,
    }
}

/// The checks a clean run passes: exit code 0, `pass`, each of `zero` is 0,
/// more than `sent_above` messages sent, and every expected message received.
#[allow(dead_code)] // not every test binary checks runs
pub fn assert_clean_run(run: &BenchRun, zero: &[&str], sent_above: u64) {
    assert_eq!(run.code, 0, "exit code\n{}", run.output);
    assert_eq!(run.json["pass"], true, "{}", run.output);
    for key in zero {
        assert_eq!(run.u(key), 0, "{key}\n{}", run.output);
    }
    assert!(run.u("sent_count") > sent_above, "{}", run.output);
    assert_eq!(
        run.u("received_count"),
        run.u("expected_count"),
        "{}",
        run.output
    );
}

/// The broker binary: next to `bench` in Cargo's target directory, built if absent.
#[allow(dead_code)] // only the tests that start Tessera
pub fn broker_binary() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_bench"));
    let path = bench.with_file_name("broker");
    if !path.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "tessera-broker", "--bin", "broker"]);
        if bench.parent().and_then(|d| d.file_name()) == Some("release".as_ref()) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for the broker");
        assert!(status.success(), "cargo build -p tessera-broker failed");
    }
    assert!(path.is_file(), "no broker binary at {}", path.display());
    path
}
