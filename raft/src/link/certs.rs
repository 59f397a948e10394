//! The cluster's certificates: one CA, one certificate per node, made with rcgen.
//!
//! A node's certificate names it: its subject alternative names hold the DNS name
//! `node-<id>` (see [`node_name`]), which is how a peer learns the node's id (never from
//! anything the node says), plus any host names or addresses the operator gives. Node
//! certificates are valid for both TLS server and client authentication, since every node
//! both accepts and dials connections.
//!
//! Files in a certificate directory (what `brokerctl cluster certs` writes and
//! `--cluster-certs` reads): `ca.pem`, `ca.key` (kept to make certificates for nodes that
//! join later; a node does not need it), `node-<id>.pem` and `node-<id>.key`. Existing files
//! are never overwritten: running the command again with more nodes adds the new nodes'
//! certificates signed by the existing CA.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::transport::NodeId;

/// The DNS name a node's certificate carries and a dialer verifies: `node-<id>`.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}")
}

/// The node id a certificate name stands for, if it is of the form `node-<id>` with
/// `id > 0`.
pub fn node_id_from_name(name: &str) -> Option<NodeId> {
    let digits = name.strip_prefix("node-")?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|id| *id > 0)
}

/// The CA certificate file in a certificate directory.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

/// The CA key file in a certificate directory.
pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}

/// A node's certificate file in a certificate directory.
pub fn node_cert_path(dir: &Path, id: NodeId) -> PathBuf {
    dir.join(format!("{}.pem", node_name(id)))
}

/// A node's key file in a certificate directory.
pub fn node_key_path(dir: &Path, id: NodeId) -> PathBuf {
    dir.join(format!("{}.key", node_name(id)))
}

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertGenError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// rcgen refused (e.g. the existing CA files do not parse).
    #[error("{what}: {source}")]
    Rcgen {
        /// What was being made or read.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// Only one of a node's certificate and key exists.
    #[error("{} exists without {}: restore the missing file or delete both to make new ones", present.display(), missing.display())]
    HalfNode {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// Only one of `ca.pem` and `ca.key` exists.
    #[error("{} exists without {}: restore the missing file or use a new directory", present.display(), missing.display())]
    HalfCa {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
}

/// What [`make_cluster_certs`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CertReport {
    /// Files written (new).
    pub written: Vec<PathBuf>,
    /// Files that existed and were kept as they are.
    pub kept: Vec<PathBuf>,
}

/// The cluster CA: signs every node's certificate.
pub struct ClusterCa {
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new self-signed CA.
    pub fn generate() -> Result<ClusterCa, CertGenError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error("CA"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Tessera cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_after = rcgen::date_time_ymd(2125, 1, 1);
        let key = KeyPair::generate().map_err(rcgen_error("CA key"))?;
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_error("CA certificate"))?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// An existing CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, CertGenError> {
        let key = KeyPair::from_pem(key_pem).map_err(rcgen_error("reading ca.key"))?;
        // Check that the certificate parses as an issuer now rather than at first use.
        Issuer::from_ca_cert_pem(cert_pem, &key).map_err(rcgen_error("reading ca.pem"))?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    /// The CA certificate (PEM), what every node trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key (PEM), needed only to make more node certificates.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate and key (both PEM) for node `id`, signed by this CA, naming
    /// `node-<id>` and, if given, `host` (an IP address becomes an IP SAN, anything else a
    /// DNS SAN).
    pub fn node_cert(
        &self,
        id: NodeId,
        host: Option<&str>,
    ) -> Result<(String, String), CertGenError> {
        let what = node_name(id);
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .map_err(rcgen_error("reading ca.pem"))?;
        let mut params = CertificateParams::new(vec![node_name(id)]).map_err(rcgen_error(&what))?;
        if let Some(host) = host.filter(|h| !h.is_empty()) {
            let san = match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.try_into().map_err(rcgen_error(&what))?),
            };
            params.subject_alt_names.push(san);
        }
        params
            .distinguished_name
            .push(DnType::CommonName, node_name(id));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_after = rcgen::date_time_ymd(2125, 1, 1);
        let key = KeyPair::generate().map_err(rcgen_error(&what))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(rcgen_error(&what))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Makes (or completes) a certificate directory for nodes `1..=nodes`: a CA unless one is
/// there, and each node's certificate and key unless they are there. `hosts` adds subject
/// alternative names: `hosts[i]` to node `i + 1`, or a single host to every node. Keys are
/// written mode 0600. Nothing that exists is overwritten.
pub fn make_cluster_certs(
    dir: &Path,
    nodes: NodeId,
    hosts: &[String],
) -> Result<CertReport, CertGenError> {
    fs::create_dir_all(dir).map_err(|source| CertGenError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut report = CertReport::default();
    let ca = ensure_ca(dir, &mut report)?;
    for id in 1..=nodes {
        let cert_path = node_cert_path(dir, id);
        let key_path = node_key_path(dir, id);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                report.kept.push(cert_path);
                report.kept.push(key_path);
                continue;
            }
            (true, false) => {
                return Err(CertGenError::HalfNode {
                    present: cert_path,
                    missing: key_path,
                });
            }
            (false, true) => {
                return Err(CertGenError::HalfNode {
                    present: key_path,
                    missing: cert_path,
                });
            }
            (false, false) => {}
        }
        let host = match hosts.len() {
            0 => None,
            1 => Some(hosts[0].as_str()),
            _ => hosts.get(id as usize - 1).map(String::as_str),
        };
        let (cert, key) = ca.node_cert(id, host)?;
        write_new(&cert_path, cert.as_bytes(), false)?;
        write_new(&key_path, key.as_bytes(), true)?;
        report.written.push(cert_path);
        report.written.push(key_path);
    }
    Ok(report)
}

fn ensure_ca(dir: &Path, report: &mut CertReport) -> Result<ClusterCa, CertGenError> {
    let cert_path = ca_cert_path(dir);
    let key_path = ca_key_path(dir);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let ca = ClusterCa::from_pem(&read(&cert_path)?, &read(&key_path)?)?;
            report.kept.push(cert_path);
            report.kept.push(key_path);
            Ok(ca)
        }
        (true, false) => Err(CertGenError::HalfCa {
            present: cert_path,
            missing: key_path,
        }),
        (false, true) => Err(CertGenError::HalfCa {
            present: key_path,
            missing: cert_path,
        }),
        (false, false) => {
            let ca = ClusterCa::generate()?;
            write_new(&cert_path, ca.cert_pem().as_bytes(), false)?;
            write_new(&key_path, ca.key_pem().as_bytes(), true)?;
            report.written.push(cert_path);
            report.written.push(key_path);
            Ok(ca)
        }
    }
}

fn rcgen_error(what: &str) -> impl FnOnce(rcgen::Error) -> CertGenError + '_ {
    move |source| CertGenError::Rcgen {
        what: what.to_owned(),
        source,
    }
}

fn read(path: &Path) -> Result<String, CertGenError> {
    fs::read_to_string(path).map_err(|source| CertGenError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a file that must not exist yet (never overwrites), mode 0600 for keys.
fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<(), CertGenError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(|source| CertGenError::Io {
        path: path.to_owned(),
        source,
    })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| CertGenError::Io {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::tls::LinkCerts;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tessera-certs-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_certificate_directory_is_made_then_completed_never_overwritten() {
        let dir = scratch_dir("complete");
        let first = make_cluster_certs(&dir, 3, &["127.0.0.1".into()]).unwrap();
        assert_eq!(first.written.len(), 2 + 3 * 2);
        assert!(first.kept.is_empty());
        for id in 1..=3 {
            // Valid until 2125: what the node's expiry gauge and warning read.
            let (at, text) = LinkCerts::load_dir(&dir, id).unwrap().not_after().unwrap();
            assert_eq!(at, 4_891_363_200, "{text}");
            assert!(text.contains("2125"), "{text}");
        }
        let ca_before = fs::read(ca_cert_path(&dir)).unwrap();
        let node1_before = fs::read(node_cert_path(&dir, 1)).unwrap();

        // One more node: signed by the same CA, the others untouched.
        let second = make_cluster_certs(&dir, 4, &[]).unwrap();
        assert_eq!(
            second.written,
            vec![node_cert_path(&dir, 4), node_key_path(&dir, 4)]
        );
        assert_eq!(fs::read(ca_cert_path(&dir)).unwrap(), ca_before);
        assert_eq!(fs::read(node_cert_path(&dir, 1)).unwrap(), node1_before);
        LinkCerts::load_dir(&dir, 4).unwrap();

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(node_key_path(&dir, 2))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "node keys are private");
        }

        // Node 2's certificate does not pass as node 3's.
        fs::copy(node_cert_path(&dir, 2), node_cert_path(&dir, 3)).unwrap();
        fs::copy(node_key_path(&dir, 2), node_key_path(&dir, 3)).unwrap();
        let err = LinkCerts::load_dir(&dir, 3).unwrap_err().to_string();
        assert!(err.contains("node 2's, not node 3's"), "{err}");

        // Half a CA or half a node is an error, not a silent new CA.
        fs::remove_file(node_key_path(&dir, 4)).unwrap();
        assert!(matches!(
            make_cluster_certs(&dir, 4, &[]),
            Err(CertGenError::HalfNode { .. })
        ));
        fs::remove_file(ca_key_path(&dir)).unwrap();
        assert!(matches!(
            make_cluster_certs(&dir, 4, &[]),
            Err(CertGenError::HalfCa { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_certificate_from_another_ca_fails_the_identity_check() {
        let ours = ClusterCa::generate().unwrap();
        let theirs = ClusterCa::generate().unwrap();
        let (cert, key) = theirs.node_cert(1, None).unwrap();
        let certs =
            LinkCerts::from_pem(ours.cert_pem().as_bytes(), cert.as_bytes(), key.as_bytes())
                .unwrap();
        let err = certs.check_identity(1).unwrap_err().to_string();
        assert!(err.contains("not signed by the cluster CA"), "{err}");
    }

    #[test]
    fn missing_files_name_the_file_and_the_command() {
        let dir = scratch_dir("missing");
        let err = LinkCerts::load_dir(&dir, 1).unwrap_err().to_string();
        assert!(
            err.contains("ca.pem") && err.contains("brokerctl cluster certs"),
            "{err}"
        );
    }

    #[test]
    fn node_names_round_trip_and_junk_is_refused() {
        assert_eq!(node_id_from_name(&node_name(42)), Some(42));
        for junk in [
            "node-",
            "node-0",
            "node--1",
            "node-1a",
            "nodes-1",
            "node-99999999999999999999999",
        ] {
            assert_eq!(node_id_from_name(junk), None, "{junk}");
        }
    }
}
