//! Mutual TLS for the link: the cluster CA is the only trust root, both ends present a
//! node certificate, and a peer's node id is read from its verified certificate.
//!
//! A dialer verifies the server's certificate for the name `node-<id>` of the node it means
//! to reach, so a certificate of another node (or another CA) fails the handshake. An
//! acceptor requires a client certificate chaining to the CA and reads the id from the
//! certificate's `node-<id>` DNS name. Nothing a peer says after the handshake can change
//! who it is.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;

use super::certs::{self, node_id_from_name, node_name};
use crate::transport::NodeId;

/// The cluster protocol version: what every node of a cluster must speak alike (the raft
/// ops and state-machine tables, the link's channels, the forward wire). A cluster runs
/// one Tessera version; nodes of two versions could misread each other's entries and
/// batches (a node without `RouteDeltas` would apply one as empty and its routes table
/// would diverge), so the version is the link's ALPN and a node of another version fails
/// the handshake, both ways, with a reason that says so. Bump it with any incompatible
/// change of those formats.
///
/// - 1: the first cluster (sessions 6-8).
/// - 2: `RouteDeltas` ops (8df49cf), forward batches with a base (tag 3, d25b824),
///   shared records handed back (flag bit 2, fc424d6).
/// - 3: forward records with a publication id (flag bit 3) or for one moved session
///   (flag bit 4), and session transfers with a dedup window (`FETCH` answer 2).
///   Forward answers in two steps (answers *received* and *unknown*, the *done*
///   request) and the forward channel's answers out of order.
/// - 4: ops `ClaimCleanStart` and `SessionFresh`, and owner records with `fresh`
///   (which epoch started a session afresh, so a stale moving copy is never resumed).
/// - 5: session transfers that say which inbound QoS 2 ids still wait for their
///   original's forward (`FETCH` answer 3) and the `INBOUND` session request (the new
///   owner holds a re-sent PUBLISH's PUBREC until the old owner's word).
/// - 6: plain forward records carry the sender's applied log index when it matched
///   them (flag bit 5), so a restarted node gives a copy matched for its earlier life
///   only to the subscriptions it kept from it (seed 632).
/// - 7: the forward channel's *shares* request (tag 5, answer *noted*): each node tells
///   the others how many connected members its shared subscriptions have, so a node
///   weighs as many members as it has in a shared group.
pub const PROTOCOL_VERSION: u32 = 7;

/// ALPN protocol of the link: `tessera-cluster/` and [`PROTOCOL_VERSION`]. It also keeps
/// a link endpoint from being mistaken for MQTT over QUIC.
pub const ALPN: &[u8] = b"tessera-cluster/7";

/// A node's TLS material: the CA that signs every node, this node's chain and key.
#[derive(Debug)]
pub struct LinkCerts {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for LinkCerts {
    fn clone(&self) -> Self {
        LinkCerts {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Why the link's TLS setup failed; says which file and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable or holds no PEM item of the right kind.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The node's own certificate does not fit (another CA, another node's name, expired,
    /// key mismatch).
    #[error("{0}")]
    Identity(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl LinkCerts {
    /// Reads `ca.pem`, `node-<id>.pem` and `node-<id>.key` from a certificate directory
    /// (as `brokerctl cluster certs` writes it) and checks that the certificate is node
    /// `id`'s and signed by the CA.
    pub fn load_dir(dir: &Path, id: NodeId) -> Result<LinkCerts, TlsError> {
        let ca = std::fs::read(certs::ca_cert_path(dir));
        let chain = std::fs::read(certs::node_cert_path(dir, id));
        let key = std::fs::read(certs::node_key_path(dir, id));
        let file_error = |path: std::path::PathBuf, e: std::io::Error| TlsError::File {
            path: path.display().to_string(),
            message: format!(
                "{e} (make the cluster's certificates with `brokerctl cluster certs --out {} --nodes N`)",
                dir.display()
            ),
        };
        let ca = ca.map_err(|e| file_error(certs::ca_cert_path(dir), e))?;
        let chain = chain.map_err(|e| file_error(certs::node_cert_path(dir, id), e))?;
        let key = key.map_err(|e| file_error(certs::node_key_path(dir, id), e))?;
        let loaded = LinkCerts::from_pem(&ca, &chain, &key).map_err(|e| match e {
            TlsError::File { path, message } => {
                let file = match path.as_str() {
                    "ca" => certs::ca_cert_path(dir),
                    "cert" => certs::node_cert_path(dir, id),
                    _ => certs::node_key_path(dir, id),
                };
                TlsError::File {
                    path: file.display().to_string(),
                    message,
                }
            }
            other => other,
        })?;
        loaded.check_identity(id).map_err(|e| match e {
            TlsError::Identity(message) => TlsError::Identity(format!(
                "{}: {message}",
                certs::node_cert_path(dir, id).display()
            )),
            other => other,
        })?;
        Ok(loaded)
    }

    /// TLS material from PEM bytes: the CA certificate(s), this node's chain (leaf first)
    /// and its private key. File errors name `ca`, `cert` or `key`.
    pub fn from_pem(ca: &[u8], chain: &[u8], key: &[u8]) -> Result<LinkCerts, TlsError> {
        let parse_certs = |what: &str, pem: &[u8]| {
            let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
            match certs {
                Ok(certs) if !certs.is_empty() => Ok(certs),
                Ok(_) => Err(TlsError::File {
                    path: what.into(),
                    message: "no PEM certificate in the file".into(),
                }),
                Err(e) => Err(TlsError::File {
                    path: what.into(),
                    message: e.to_string(),
                }),
            }
        };
        let ca = parse_certs("ca", ca)?;
        let chain = parse_certs("cert", chain)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::File {
            path: "key".into(),
            message: e.to_string(),
        })?;
        Ok(LinkCerts { ca, chain, key })
    }

    /// When the first of these certificates (this node's chain and the CA) stops being
    /// valid: after that the node's links fail their handshakes.
    pub fn not_after(&self) -> Option<(i64, String)> {
        earliest_not_after(self.chain.iter().chain(&self.ca))
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in &self.ca {
            roots
                .add(cert.clone())
                .map_err(|e| TlsError::Identity(format!("the CA certificate is unusable: {e}")))?;
        }
        Ok(Arc::new(roots))
    }

    /// Checks that the node certificate is signed by the CA, names node `id` and matches
    /// the key, so a node with the wrong files stops at start with a clear message instead of
    /// failing every handshake later.
    pub fn check_identity(&self, id: NodeId) -> Result<(), TlsError> {
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .map_err(|e| TlsError::Identity(format!("the CA certificate is unusable: {e}")))?;
        let name =
            ServerName::try_from(node_name(id)).map_err(|e| TlsError::Identity(e.to_string()))?;
        let (leaf, intermediates) = self
            .chain
            .split_first()
            .expect("from_pem refuses an empty chain");
        if let Err(e) =
            verifier.verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
        {
            let named = peer_node_id(leaf);
            let message = match (&e, named) {
                (
                    rustls::Error::InvalidCertificate(
                        rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. },
                    ),
                    Some(other),
                ) => {
                    format!("the certificate is node {other}'s, not node {id}'s")
                }
                (rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer), _)
                | (rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature), _) => {
                    "the certificate is not signed by the cluster CA in ca.pem".to_owned()
                }
                _ => format!("the certificate does not fit node {id}: {e}"),
            };
            return Err(TlsError::Identity(message));
        }
        // The key must belong to the certificate: building a config checks it.
        self.server_config().map(drop)
    }

    /// The rustls server configuration: requires a client certificate from the CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .build()
            .map_err(|e| TlsError::Identity(format!("the CA certificate is unusable: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Identity(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| {
                TlsError::Identity(format!("the key does not fit the certificate: {e}"))
            })?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The rustls client configuration: trusts only the CA, presents this node's certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Identity(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| {
                TlsError::Identity(format!("the key does not fit the certificate: {e}"))
            })?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// A client configuration for dialing an address whose node id is not known yet
    /// (`--join ADDR`): the server must still present a certificate from the CA naming
    /// some `node-<id>`, and that id is then read from it.
    pub fn any_node_client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .map_err(|e| TlsError::Identity(format!("the CA certificate is unusable: {e}")))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Identity(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyNodeVerifier { inner }))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| {
                TlsError::Identity(format!("the key does not fit the certificate: {e}"))
            })?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// Verifies a server certificate against the CA for whatever `node-<id>` it names.
#[derive(Debug)]
struct AnyNodeVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyNodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let id = peer_node_id(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        ))?;
        let name = ServerName::try_from(node_name(id))
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// When a certificate stops being valid (its `notAfter`): seconds since the Unix epoch and
/// the date as text. `None` when it cannot be parsed.
pub fn cert_not_after(cert: &CertificateDer<'_>) -> Option<(i64, String)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let at = parsed.validity().not_after;
    Some((at.timestamp(), at.to_string()))
}

/// The earliest `notAfter` among `certs` (see [`cert_not_after`]).
pub fn earliest_not_after<'a>(
    certs: impl IntoIterator<Item = &'a CertificateDer<'a>>,
) -> Option<(i64, String)> {
    certs
        .into_iter()
        .filter_map(|c| cert_not_after(c))
        .min_by_key(|(at, _)| *at)
}

/// The node id a (verified) peer certificate names: its first `node-<id>` DNS name, the
/// same name a dialer verifies. `None` when it names no node.
pub fn peer_node_id(cert: &CertificateDer<'_>) -> Option<NodeId> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => node_id_from_name(dns),
        _ => None,
    })
}
