//! Bridges to Mosquitto (the reference broker), black-box: a third-party test,
//! compiled only with `--features third-party` (`scripts/test-third-party.sh`
//! installs Mosquitto and runs it), so a missing Mosquitto fails it, never
//! skips it.
//!
//! What a user relies on: a Tessera bridged to a Mosquitto over MQTT 3.1.1
//! and over MQTT 5 carries messages both ways at QoS 0, 1 and 2 with the rules'
//! prefixes and QoS caps (the same checks as tests/bridge.rs with a Tessera
//! remote), and every message acknowledged to a local publisher arrives on the
//! Mosquitto side although Mosquitto is stopped and started again mid-stream
//! (QoS 2 once). Mosquitto is stopped with SIGTERM here, not SIGKILL: it writes
//! its persistence file at exit (and every `autosave_interval`), so after a
//! SIGKILL it forgets messages it had acknowledged, which no bridge can repair;
//! tests/bridge.rs kills a Tessera remote with SIGKILL.

mod common;

use std::cell::RefCell;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestDir;
use common::bridge::{check_both_ways, check_remote_restart, free_port};

/// Where Mosquitto is installed, or a panic that says how to install it.
fn mosquitto_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Debian installs it in /usr/sbin, which a non-root PATH may lack.
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "mosquitto is not installed, and the bridge tests to it need it: install it \
                 with `apt-get install -y mosquitto` (scripts/test-third-party.sh installs it)"
            )
        })
}

/// A Mosquitto on `port` with persistence in `dir`, killed on drop.
struct Mosquitto {
    child: Child,
}

impl Mosquitto {
    fn start(port: u16, dir: &TestDir) -> Mosquitto {
        let d = dir.path_str();
        let conf = format!("{d}/mosquitto.conf");
        // Started as root, Mosquitto becomes user `mosquitto`, which cannot
        // write its persistence file into the test's directory.
        // SAFETY: getuid(2) has no preconditions.
        let user = if unsafe { libc::getuid() } == 0 {
            "user root\n"
        } else {
            ""
        };
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {d}/\nmax_queued_messages 0\nlog_dest file {d}/mosquitto.log\nlog_type all\n{user}"
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Mosquitto { child }
    }

    /// SIGTERM: Mosquitto saves its persistence file and exits.
    fn stop(mut self) {
        // SAFETY: kill(2) on our child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tessera_bridged_to_mosquitto_both_ways_at_every_qos() {
    for version in ["3.1.1", "5"] {
        let dir = TestDir::new("bridge-mosquitto");
        let port = free_port();
        let _m = Mosquitto::start(port, &dir);
        let remote: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        check_both_ways(remote, version);
    }
}

/// Prints the end of Mosquitto's log when the test fails while `dir` lives.
struct MosquittoLog<'a>(&'a TestDir);

impl Drop for MosquittoLog<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(format!("{}/mosquitto.log", self.0.path_str()))
                .unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(200)..];
            eprintln!("---- mosquitto log (last {} lines) ----", tail.len());
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

#[test]
fn mosquitto_restarted_mid_stream_loses_no_acknowledged_message() {
    for version in ["3.1.1", "5"] {
        let dir = TestDir::new("bridge-mosquitto");
        let _log = MosquittoLog(&dir);
        let port = free_port();
        let m = RefCell::new(Some(Mosquitto::start(port, &dir)));
        let remote: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        check_remote_restart(
            remote,
            version,
            &mut || m.borrow_mut().take().expect("running").stop(),
            &mut || *m.borrow_mut() = Some(Mosquitto::start(port, &dir)),
        );
    }
}
