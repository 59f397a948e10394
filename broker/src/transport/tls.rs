//! TLS for the `mqtts` and `wss` listeners, with rustls (no OpenSSL): loading
//! PEM certificates and keys, optional client-certificate verification against
//! a CA (mTLS), the client identity used as username, and reloading.
//!
//! Reload: [`TlsStore`] holds the current `rustls::ServerConfig` of every TLS
//! listener behind a generation counter. Shards keep their own copy
//! (`Arc`s) and compare generations on each TLS accept, an atomic load; only
//! after a reload do they take the store's lock once to refresh. A reload
//! builds every listener's configuration first and swaps all of them only if
//! all succeeded, so a bad file never leaves a listener half-updated or
//! without a certificate. Established connections keep the configuration they
//! were accepted with: their session state does not depend on it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::config::{CertIdentity, ListenerConfig, ListenerKind};

/// The ALPN protocol of MQTT over QUIC (EMQX, NanoSDK and RMQTT use exactly this).
pub const QUIC_ALPN: &[u8] = b"mqtt";

/// The files one TLS listener is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates for client certificates, PEM; `None` = no client certificates.
    pub ca: Option<PathBuf>,
    /// Whether a client without a valid certificate is refused.
    pub require_client_cert: bool,
    /// For a `quic` listener: TLS 1.3 only, ALPN `mqtt`, and whether 0-RTT
    /// is offered (`Some(zero_rtt)`); `None` for TLS over TCP.
    pub quic: Option<bool>,
}

impl TlsFiles {
    /// The TLS files of a listener, if it is a TLS kind.
    pub fn of(listener: &ListenerConfig) -> Option<TlsFiles> {
        if !listener.kind.has_certs() {
            return None;
        }
        Some(TlsFiles {
            cert: listener.cert_file.clone().unwrap_or_default(),
            key: listener.key_file.clone().unwrap_or_default(),
            ca: listener.ca_file.clone(),
            require_client_cert: listener.require_client_cert,
            quic: (listener.kind == ListenerKind::Quic).then_some(listener.zero_rtt),
        })
    }
}

/// Why a TLS configuration could not be built; names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{what} {}: {message}", path.display())]
    File {
        /// Which file: "cert_file", "key_file" or "ca_file".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("{0}")]
    Rustls(String),
}

fn file_error(what: &'static str, path: &Path, message: impl ToString) -> TlsSetupError {
    TlsSetupError::File {
        what,
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

/// Builds the rustls configuration of one listener from its files: TLS 1.2 and
/// 1.3 (QUIC: 1.3 only, ALPN `mqtt`, 0-RTT when asked), the certificate chain
/// and key, and, with a CA, client-certificate verification (required or
/// optional).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let certs = load_certs("cert_file", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| file_error("key_file", &files.key, e))?;
    let builder = match files.quic {
        Some(_) => ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13]),
        None => ServerConfig::builder(),
    };
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs("ca_file", ca)? {
                roots.add(cert).map_err(|e| file_error("ca_file", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
            let verifier = if files.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| file_error("ca_file", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsSetupError::Rustls(format!(
            "cert_file {} and key_file {}: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    if let Some(zero_rtt) = files.quic {
        config.alpn_protocols = vec![QUIC_ALPN.to_vec()];
        // QUIC takes 0 (no early data) or u32::MAX (early data, bounded by
        // its own flow control), nothing in between.
        config.max_early_data_size = if zero_rtt { u32::MAX } else { 0 };
    }
    Ok(Arc::new(config))
}

/// The TLS configurations of every listener (indexed by listener id; `None`
/// for listeners without TLS), shared by all shards, replaced on reload.
#[derive(Debug)]
pub struct TlsStore {
    files: Vec<Option<TlsFiles>>,
    generation: AtomicU64,
    current: Mutex<Vec<Option<Arc<ServerConfig>>>>,
    /// When each TLS listener's certificates stop being valid: (its label, Unix seconds).
    expiry: Mutex<Vec<(String, i64)>>,
}

/// How long before a certificate's end the broker logs a warning (at start and at each
/// reload); the gauge `tessera_certificate_expiry_timestamp_seconds` and its alerts say
/// it all along.
pub const CERT_WARN_SECS: i64 = 30 * 86_400;

/// Logs a certificate that has expired (an error) or expires within [`CERT_WARN_SECS`]
/// (a warning), naming it and what to do; returns whether it logged.
pub fn log_cert_expiry(certificate: &str, not_after: (i64, &str), now: i64, renew: &str) -> bool {
    let (at, date) = not_after;
    let left = at - now;
    if left <= 0 {
        tracing::error!(
            certificate,
            not_after = date,
            "the certificate has expired: peers that check it refuse the handshake; {renew}"
        );
    } else if left < CERT_WARN_SECS {
        tracing::warn!(
            certificate,
            not_after = date,
            days_left = left / 86_400,
            "the certificate expires soon: {renew}"
        );
    } else {
        return false;
    }
    true
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Each TLS listener's label and the earliest end of validity among its certificate
/// chain and client CA, logged when it is near or past; listeners whose files cannot be
/// parsed (already refused by `build_all`) are left out.
fn expiries(listeners: &[ListenerConfig], files: &[Option<TlsFiles>]) -> Vec<(String, i64)> {
    let now = unix_now();
    let mut out = Vec::new();
    for (k, (l, f)) in listeners.iter().zip(files).enumerate() {
        let Some(f) = f else { continue };
        let mut certs = load_certs("cert_file", &f.cert).unwrap_or_default();
        if let Some(ca) = &f.ca {
            certs.extend(load_certs("ca_file", ca).unwrap_or_default());
        }
        let Some((at, date)) = tessera_raft::link::tls::earliest_not_after(&certs) else {
            continue;
        };
        let label = format!("listener {k} {}", l.url(l.bind));
        log_cert_expiry(
            &label,
            (at, &date),
            now,
            "renew cert_file (or ca_file) and reload with SIGHUP",
        );
        out.push((label, at));
    }
    out
}

impl TlsStore {
    /// Loads every TLS listener's files; the first failure names its listener.
    pub fn load(listeners: &[ListenerConfig]) -> anyhow::Result<TlsStore> {
        let files: Vec<Option<TlsFiles>> = listeners.iter().map(TlsFiles::of).collect();
        let current = build_all(listeners, &files)?;
        let expiry = expiries(listeners, &files);
        Ok(TlsStore {
            files,
            generation: AtomicU64::new(0),
            current: Mutex::new(current),
            expiry: Mutex::new(expiry),
        })
    }

    /// When each TLS listener's certificates stop being valid: (label, Unix seconds).
    pub fn expiry(&self) -> Vec<(String, i64)> {
        self.expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads every TLS listener's files. All or nothing: on any error the
    /// current configurations stay. Returns the number of TLS listeners.
    pub fn reload(&self, listeners: &[ListenerConfig]) -> anyhow::Result<usize> {
        let fresh = build_all(listeners, &self.files)?;
        let count = fresh.iter().flatten().count();
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        *self.expiry.lock().unwrap_or_else(|e| e.into_inner()) = expiries(listeners, &self.files);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(count)
    }

    /// Increases on every successful reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current configurations (for a shard's cache).
    pub fn snapshot(&self) -> Vec<Option<Arc<ServerConfig>>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn build_all(
    listeners: &[ListenerConfig],
    files: &[Option<TlsFiles>],
) -> anyhow::Result<Vec<Option<Arc<ServerConfig>>>> {
    listeners
        .iter()
        .zip(files)
        .map(|(l, f)| {
            f.as_ref()
                .map(|f| {
                    server_config(f).map_err(|e| {
                        anyhow::anyhow!("listener {} {}: TLS setup failed: {e}", l.kind, l.bind)
                    })
                })
                .transpose()
        })
        .collect()
}

/// The username a client certificate gives, per `identity`: the subject's
/// first Common Name, or the first DNS name, e-mail address or URI of its
/// Subject Alternative Name. `None` if the certificate has none, or cannot be
/// parsed (it was verified by rustls, so this is unexpected).
pub fn cert_identity(cert: &CertificateDer<'_>, identity: CertIdentity) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    match identity {
        CertIdentity::None => None,
        CertIdentity::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        CertIdentity::San => {
            let san = cert.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                    Some((*s).to_owned())
                }
                _ => None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    //! Goal: the identity rules and the file errors an operator sees.
    //! Method: certificates generated with rcgen, files in a temporary directory.

    use super::*;

    fn cert(cn: Option<&str>, sans: &[&str]) -> CertificateDer<'static> {
        let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn identity_is_the_cn_or_the_first_usable_san() {
        let c = cert(Some("alice"), &["device-7.example", "127.0.0.1"]);
        assert_eq!(
            cert_identity(&c, CertIdentity::Cn).as_deref(),
            Some("alice")
        );
        assert_eq!(
            cert_identity(&c, CertIdentity::San).as_deref(),
            Some("device-7.example")
        );
        assert_eq!(cert_identity(&c, CertIdentity::None), None);
        let ip_only = cert(None, &["10.0.0.1"]);
        assert_eq!(cert_identity(&ip_only, CertIdentity::San), None);
        assert_eq!(cert_identity(&ip_only, CertIdentity::Cn), None);
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01, 0xff]);
        assert_eq!(cert_identity(&garbage, CertIdentity::Cn), None);
    }

    #[test]
    fn setup_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("tessera-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        let other_key = rcgen::KeyPair::generate().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let files = TlsFiles {
            cert: write("cert.pem", &pem),
            key: write("key.pem", &key.serialize_pem()),
            ca: None,
            require_client_cert: false,
            quic: None,
        };
        server_config(&files).unwrap();
        let missing = TlsFiles {
            cert: dir.join("nope.pem"),
            ..files.clone()
        };
        let e = server_config(&missing).unwrap_err().to_string();
        assert!(e.starts_with("cert_file ") && e.contains("nope.pem"), "{e}");
        let empty = TlsFiles {
            cert: write("empty.pem", "hello\n"),
            ..files.clone()
        };
        let e = server_config(&empty).unwrap_err().to_string();
        assert!(e.contains("no PEM CERTIFICATE block"), "{e}");
        let mismatched = TlsFiles {
            key: write("other.key", &other_key.serialize_pem()),
            ..files.clone()
        };
        let e = server_config(&mismatched).unwrap_err().to_string();
        assert!(e.contains("key_file"), "{e}");
        let bad_ca = TlsFiles {
            ca: Some(write("ca.pem", "garbage")),
            require_client_cert: true,
            ..files.clone()
        };
        let e = server_config(&bad_ca).unwrap_err().to_string();
        assert!(e.starts_with("ca_file "), "{e}");
    }
}
