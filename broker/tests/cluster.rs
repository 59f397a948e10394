//! Goal: what an operator relies on when running Tessera as a cluster: the certificates
//! `brokerctl cluster certs` makes are the ones the cluster links accept.
//!
//! Method: run the real binaries as child processes under timeouts, in directories unique
//! to this process and test.

mod common;

use std::fs;

use common::{TestDir, brokerctl};
use tessera_raft::link::LinkCerts;
use tessera_raft::link::certs::{ca_cert_path, node_cert_path, node_key_path};

fn code(out: &std::process::Output) -> i32 {
    out.status.code().expect("exit code")
}

#[test]
fn brokerctl_cluster_certs_makes_a_ca_and_node_certificates_and_keeps_existing_ones() {
    let dir = TestDir::new("cluster-certs");
    let certs = std::path::Path::new(dir.path_str()).join("certs");
    let certs_arg = certs.to_str().unwrap();
    let out = brokerctl(
        &[
            "cluster",
            "certs",
            "--out",
            certs_arg,
            "--nodes",
            "3",
            "--hosts",
            "127.0.0.1",
        ],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("wrote ").count(), 8, "{stdout}");
    for id in 1..=3 {
        LinkCerts::load_dir(&certs, id).expect("a node certificate the link accepts");
    }
    let ca = fs::read(ca_cert_path(&certs)).unwrap();
    let node1 = fs::read(node_cert_path(&certs, 1)).unwrap();

    // A fourth node joins later: same CA, nothing overwritten.
    let out = brokerctl(
        &["cluster", "certs", "--out", certs_arg, "--nodes", "4"],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("wrote ").count(), 2, "{stdout}");
    assert!(
        stdout.contains(&format!("kept  {}", node_key_path(&certs, 3).display())),
        "{stdout}"
    );
    assert_eq!(fs::read(ca_cert_path(&certs)).unwrap(), ca);
    assert_eq!(fs::read(node_cert_path(&certs, 1)).unwrap(), node1);
    LinkCerts::load_dir(&certs, 4).expect("the new node's certificate is signed by the same CA");

    // Two hosts for three nodes is a usage error; nothing is written.
    let other = std::path::Path::new(dir.path_str()).join("other");
    let out = brokerctl(
        &[
            "cluster",
            "certs",
            "--out",
            other.to_str().unwrap(),
            "--nodes",
            "3",
            "--hosts",
            "a,b",
        ],
        &[],
    );
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("one per node"));
    assert!(!other.exists());

    // A directory that cannot be made: exit 1 with the path.
    let out = brokerctl(
        &[
            "cluster",
            "certs",
            "--out",
            "/proc/tessera-certs",
            "--nodes",
            "1",
        ],
        &[],
    );
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/proc/tessera-certs"));
}
