//! Authentication, authorization and abuse protection (docs/SECURITY.md).
//!
//! - [`passwd`]: the password file (PBKDF2-SHA512, `mosquitto_passwd`'s
//!   format, optional SCRAM-SHA-256 keys) behind `brokerctl passwd`.
//! - [`acl`]: the ACL file and its matching rules.
//! - [`bans`]: the ban list file behind `brokerctl ban`.
//! - [`ctl`]: the `brokerctl passwd` and `brokerctl ban` subcommands.
//! - [`jwt`]: JWT passwords (HS256/RS256).
//! - [`listener_limits`]: per-listener connection limits and connect rates.
//! - [`scram`]: SCRAM-SHA-256 for MQTT 5 enhanced authentication.
//!
//! Lifecycle and placement: one [`AuthHub`] per process (`Arc`), created at
//! boot from `[auth]`, holds the parsed files as an immutable [`Snapshot`]
//! and replaces it on reload (SIGHUP, or a changed modification time, checked
//! every `reload_interval_s` by a thread of its own). Each shard has a
//! [`ShardAuth`] (`Rc`, shard thread only) with its own copy of the current
//! snapshot's `Arc`: the shard compares generations once per tick (one atomic
//! load) and takes the new snapshot when it changed, so no lock is ever taken
//! on a packet. `ShardAuth` is the engine's [`AuthHook`] (ACL, re-auth) and
//! authenticates CONNECTs on the accepting shard before the hand-off
//! ([`ShardAuth::authenticate`]); slow password hashes run on glommio's
//! blocking thread pool, never on the shard thread, and successes are cached.

pub mod acl;
pub mod bans;
pub mod ctl;
pub mod jwt;
pub mod listener_limits;
pub mod passwd;
pub mod scram;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use tessera_proto::{Connect, ReasonCode, Str};
use tessera_shard::authz::{Action, AuthHook, AuthStep, TokenAcl};
use tracing::{info, warn};

use crate::config::AuthConfig;
use acl::Acl;
use bans::BanList;
use jwt::{JwtError, JwtVerifier};
use passwd::PasswordFile;

/// Successful password checks one shard remembers (then it starts over).
pub const VERIFIED_CACHE_MAX: usize = 10_000;

/// ClientIDs one shard tracks for flapping detection; beyond it the oldest
/// windows are dropped at the next tick.
pub const FLAPPING_TRACKED_MAX: usize = 100_000;

/// The parsed security files at one moment. Immutable; replaced whole.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases with every successful reload.
    pub generation: u64,
    passwords: Option<PasswordFile>,
    acl: Option<Acl>,
    bans: BanList,
    jwt: Option<JwtVerifier>,
}

impl Snapshot {
    /// Whether any SCRAM user exists (else the method is refused with 0x8C).
    fn scram_enabled(&self) -> bool {
        self.passwords
            .as_ref()
            .is_some_and(|p| p.users().any(|(_, s)| s))
    }
}

/// The files of `[auth]`, their modification times and the current snapshot;
/// shared by every shard and the reload thread.
#[derive(Debug)]
pub struct AuthHub {
    config: AuthConfig,
    /// A listener refuses anonymous clients even if `[auth]` allows them.
    listener_closed: bool,
    current: Mutex<(Arc<Snapshot>, Vec<Option<SystemTime>>)>,
    generation: AtomicU64,
    /// Per-process random key: fake SCRAM salts and the verified-password
    /// cache keys, so neither can be predicted from outside.
    secret: [u8; 32],
}

/// What [`ShardAuth::authenticate`] decided about a CONNECT.
#[derive(Debug)]
pub enum Verdict {
    /// Accepted: the CONNECT's `username` now holds the authenticated user
    /// (or nothing, anonymous) and its password is gone.
    Accept {
        /// When the credentials end (a JWT's `exp`), Unix seconds.
        expires_unix_s: Option<u64>,
        /// ACL rules the credentials carry (a JWT claim).
        token_acl: Option<Arc<TokenAcl>>,
    },
    /// The CONNECT needs an enhanced authentication exchange: send the
    /// client AUTH 0x18 with `data`, then call [`ShardAuth::continue_auth`]
    /// with its answer.
    Continue {
        /// Server data for the client.
        data: bytes::Bytes,
        /// The exchange's state.
        state: bytes::Bytes,
    },
    /// Refused with this CONNACK reason (v5; 3.1.1 gets the nearest code).
    Refuse(ReasonCode),
}

fn files(c: &AuthConfig) -> [&str; 5] {
    [
        &c.password_file,
        &c.acl_file,
        &c.ban_file,
        &c.jwt_secret_file,
        &c.jwt_public_key_file,
    ]
}

fn mtime(path: &str) -> Option<SystemTime> {
    if path.is_empty() {
        return None;
    }
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read(path: &str) -> anyhow::Result<Option<String>> {
    if path.is_empty() {
        return Ok(None);
    }
    std::fs::read_to_string(path)
        .map(Some)
        .with_context(|| format!("cannot read {path}"))
}

impl AuthHub {
    /// Loads every configured file; an error names the file and line.
    /// `listener_closed`: some listener sets `allow_anonymous = false`.
    pub fn load(config: &AuthConfig, listener_closed: bool) -> anyhow::Result<Arc<AuthHub>> {
        let secret: [u8; 32] = passwd::random_bytes(32).try_into().expect("32 bytes");
        let snap = Self::parse(config, 1)?;
        let stamps = files(config).iter().map(|p| mtime(p)).collect();
        Ok(Arc::new(AuthHub {
            config: config.clone(),
            listener_closed,
            current: Mutex::new((Arc::new(snap), stamps)),
            generation: AtomicU64::new(1),
            secret,
        }))
    }

    fn parse(c: &AuthConfig, generation: u64) -> anyhow::Result<Snapshot> {
        let passwords = read(&c.password_file)?
            .map(|t| PasswordFile::parse(&t))
            .transpose()
            .with_context(|| format!("invalid password file {}", c.password_file))?;
        let acl = read(&c.acl_file)?
            .map(|t| Acl::parse(&t))
            .transpose()
            .with_context(|| format!("invalid ACL file {}", c.acl_file))?;
        // A ban file that does not exist yet is an empty list: the first
        // `brokerctl ban add` or admin API ban creates it.
        let ban_text = match std::fs::metadata(&c.ban_file) {
            Err(e) if !c.ban_file.is_empty() && e.kind() == std::io::ErrorKind::NotFound => None,
            _ => read(&c.ban_file)?,
        };
        let bans = ban_text
            .map(|t| BanList::parse(&t))
            .transpose()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("invalid ban file {}", c.ban_file))?
            .unwrap_or_default();
        let secret = read(&c.jwt_secret_file)?;
        let public = read(&c.jwt_public_key_file)?;
        let jwt = if secret.is_some() || public.is_some() {
            let v = JwtVerifier::new(
                secret
                    .as_deref()
                    .map(|s| s.trim_end_matches(['\n', '\r']).as_bytes()),
                public.as_deref().map(str::as_bytes),
                &c.jwt_username_claim,
                &c.jwt_acl_claim,
            )
            .map_err(anyhow::Error::msg)
            .context("invalid JWT key file")?;
            Some(v)
        } else {
            None
        };
        Ok(Snapshot {
            generation,
            passwords,
            acl,
            bans,
            jwt,
        })
    }

    /// Whether anything in `[auth]` asks the broker to check clients; without
    /// it no hook is installed and the broker is open, as before.
    pub fn enabled(&self) -> bool {
        !self.config.allow_anonymous
            || self.listener_closed
            || files(&self.config).iter().any(|p| !p.is_empty())
            || self.config.flapping_max_connects > 0
    }

    /// The `[auth]` settings.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// The current snapshot's generation (one atomic load).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.lock().expect("auth lock").0.clone()
    }

    /// Re-reads every file now. A file that fails to parse keeps the old
    /// snapshot in force and logs why (file and line, never a secret).
    pub fn reload(&self) {
        let mut cur = self.current.lock().expect("auth lock");
        let stamps: Vec<_> = files(&self.config).iter().map(|p| mtime(p)).collect();
        let generation = cur.0.generation + 1;
        match Self::parse(&self.config, generation) {
            Ok(snap) => {
                *cur = (Arc::new(snap), stamps);
                self.generation.store(generation, Ordering::Release);
                info!(generation, "security files reloaded");
            }
            Err(e) => {
                // Do not retry the same broken file every interval.
                cur.1 = stamps;
                warn!("security files not reloaded, the previous ones stay in force: {e:#}");
            }
        }
    }

    /// The bans in force.
    pub fn bans(&self) -> BanList {
        self.current().bans.clone()
    }

    /// Adds (`add`) or removes a ban: rewrites the ban file (atomically, so
    /// the file stays the one source of truth and survives restarts) and
    /// reloads. Returns whether the list changed; an error when no
    /// `auth.ban_file` is configured or the file cannot be read or written.
    pub fn edit_ban(&self, ban: bans::Ban, add: bool) -> Result<bool, String> {
        let path = &self.config.ban_file;
        if path.is_empty() {
            return Err("no ban file: set auth.ban_file to manage bans".to_owned());
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("cannot read {path}: {e}")),
        };
        let mut list = BanList::parse(&text).map_err(|e| format!("{path}: {e}"))?;
        let changed = if add {
            list.add(ban)
        } else {
            list.remove(&ban)
        };
        if changed {
            write_private(Path::new(path), &list.to_text())
                .map_err(|e| format!("cannot write {path}: {e}"))?;
            self.reload();
        }
        Ok(changed)
    }

    /// Reloads when a file's modification time changed.
    pub fn reload_if_changed(&self) {
        let changed = {
            let cur = self.current.lock().expect("auth lock");
            files(&self.config)
                .iter()
                .zip(&cur.1)
                .any(|(p, old)| mtime(p) != *old)
        };
        if changed {
            self.reload();
        }
    }
}

/// A shard's view of the security state; see the module doc.
#[derive(Debug)]
pub struct ShardAuth {
    hub: Arc<AuthHub>,
    snap: RefCell<Arc<Snapshot>>,
    /// Keys of (user, password) pairs that verified under a generation.
    verified: RefCell<HashMap<[u8; 32], u64>>,
    /// ClientID -> (window start ms, connects in the window, banned until ms).
    flapping: RefCell<HashMap<Str, (u64, u32, u64)>>,
    /// Resident memory at the last tick, bytes.
    pub rss_bytes: Cell<u64>,
}

impl ShardAuth {
    /// The shard's view, starting from the hub's current snapshot.
    pub fn new(hub: Arc<AuthHub>) -> ShardAuth {
        let snap = hub.current();
        ShardAuth {
            hub,
            snap: RefCell::new(snap),
            verified: RefCell::new(HashMap::new()),
            flapping: RefCell::new(HashMap::new()),
            rss_bytes: Cell::new(0),
        }
    }

    /// Whether the broker checks clients at all.
    pub fn enabled(&self) -> bool {
        self.hub.enabled()
    }

    /// Once per tick: take a reloaded snapshot, prune flapping state, sample
    /// the process's resident memory. Returns true when a new snapshot was
    /// taken (the caller then disconnects clients it bans).
    pub fn tick(&self, now_ms: u64, sample_rss: bool) -> bool {
        let reloaded = self.hub.generation() != self.snap.borrow().generation;
        if reloaded {
            *self.snap.borrow_mut() = self.hub.current();
        }
        let c = self.hub.config();
        if c.flapping_max_connects > 0 {
            let window = u64::from(c.flapping_window_s) * 1000;
            let mut f = self.flapping.borrow_mut();
            f.retain(|_, (start, _, until)| now_ms < *start + window || now_ms < *until);
            if f.len() > FLAPPING_TRACKED_MAX {
                f.clear();
            }
        }
        if sample_rss {
            self.rss_bytes.set(resident_bytes());
        }
        reloaded
    }

    /// Whether the ClientID or user name is banned now.
    pub fn client_banned(&self, client_id: &str, username: Option<&str>) -> bool {
        self.snap.borrow().bans.client_banned(client_id, username)
    }

    /// Whether connections from `ip` are banned.
    pub fn ip_banned(&self, ip: IpAddr) -> bool {
        self.snap.borrow().bans.ip_banned(ip)
    }

    /// Counts a connect of `client_id` (on its owner shard); true when it is
    /// banned for flapping.
    pub fn flapping(&self, now_ms: u64, client_id: &Str) -> bool {
        let c = self.hub.config();
        if c.flapping_max_connects == 0 {
            return false;
        }
        let mut f = self.flapping.borrow_mut();
        let e = f.entry(client_id.compact()).or_insert((now_ms, 0, 0));
        if now_ms < e.2 {
            return true;
        }
        if now_ms >= e.0 + u64::from(c.flapping_window_s) * 1000 {
            *e = (now_ms, 0, 0);
        }
        e.1 += 1;
        if e.1 >= c.flapping_max_connects {
            e.2 = now_ms + u64::from(c.flapping_ban_s) * 1000;
            warn!(
                client_id = client_id.as_str(),
                connects = e.1,
                ban_s = c.flapping_ban_s,
                "client id is flapping: banned"
            );
            *e = (now_ms, 0, e.2);
            return true;
        }
        false
    }

    /// Authenticates a CONNECT. On [`Verdict::Accept`] the CONNECT's
    /// `username` is the authenticated user (none for anonymous) and its
    /// password has been dropped; so it is after a refusal too.
    /// `cert_identity`: the listener set the user name from a verified client
    /// certificate, which authenticates it (bans still apply).
    /// `allow_anonymous`: the listener's setting, if it has one.
    pub async fn authenticate(
        &self,
        connect: &mut Connect,
        cert_identity: bool,
        allow_anonymous: Option<bool>,
    ) -> Verdict {
        let password = connect.password.take();
        let snap = self.snap.borrow().clone();
        let user = connect.username.as_ref().map(Str::as_str);
        if snap.bans.client_banned(connect.client_id.as_str(), user) {
            return Verdict::Refuse(ReasonCode::Banned);
        }
        if cert_identity && connect.username.is_some() {
            return Verdict::Accept {
                expires_unix_s: None,
                token_acl: None,
            };
        }
        if let Some(method) = &connect.properties.authentication_method {
            if method.as_str() != scram::METHOD || !snap.scram_enabled() {
                return Verdict::Refuse(ReasonCode::BadAuthenticationMethod);
            }
            let data = connect.properties.authentication_data.take();
            return self.scram_verdict(connect, None, &data.unwrap_or_default());
        }
        let Some(password) = password else {
            connect.username = None;
            return if allow_anonymous.unwrap_or(self.hub.config().allow_anonymous) {
                Verdict::Accept {
                    expires_unix_s: None,
                    token_acl: None,
                }
            } else {
                Verdict::Refuse(ReasonCode::NotAuthorized)
            };
        };
        if let Some(jwt) = &snap.jwt
            && JwtVerifier::looks_like_token(&password)
        {
            let token = std::str::from_utf8(&password).unwrap_or_default();
            return match jwt.verify(token) {
                Ok(claims) => match Str::try_from(claims.username) {
                    Ok(u) => {
                        connect.username = Some(u);
                        Verdict::Accept {
                            expires_unix_s: Some(claims.expires_unix_s),
                            token_acl: claims.acl.map(Arc::new),
                        }
                    }
                    Err(_) => Verdict::Refuse(ReasonCode::BadUserNameOrPassword),
                },
                Err(e) => {
                    let level_expired = matches!(e, JwtError::Expired);
                    info!(
                        client_id = connect.client_id.as_str(),
                        expired = level_expired,
                        "JWT refused: {e}"
                    );
                    Verdict::Refuse(ReasonCode::BadUserNameOrPassword)
                }
            };
        }
        let (Some(file), Some(user)) = (&snap.passwords, connect.username.clone()) else {
            return Verdict::Refuse(ReasonCode::BadUserNameOrPassword);
        };
        let Some(entry) = file.get(user.as_str()).cloned() else {
            info!(
                client_id = connect.client_id.as_str(),
                "login refused: unknown user"
            );
            return Verdict::Refuse(ReasonCode::BadUserNameOrPassword);
        };
        let key = self.cache_key(user.as_str(), &password);
        if self.verified.borrow().get(&key) == Some(&snap.generation) {
            return Verdict::Accept {
                expires_unix_s: None,
                token_acl: None,
            };
        }
        // PBKDF2 takes tens of milliseconds: off the shard thread.
        let ok = glommio::executor()
            .spawn_blocking(move || entry.verify(&password))
            .await;
        if !ok {
            info!(
                client_id = connect.client_id.as_str(),
                user = user.as_str(),
                "login refused: wrong password"
            );
            return Verdict::Refuse(ReasonCode::BadUserNameOrPassword);
        }
        let mut cache = self.verified.borrow_mut();
        if cache.len() >= VERIFIED_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, snap.generation);
        Verdict::Accept {
            expires_unix_s: None,
            token_acl: None,
        }
    }

    /// The next step of a CONNECT-time SCRAM exchange.
    pub fn continue_auth(&self, connect: &mut Connect, state: &[u8], data: &[u8]) -> Verdict {
        self.scram_verdict(connect, Some(state), data)
    }

    fn scram_verdict(&self, connect: &mut Connect, state: Option<&[u8]>, data: &[u8]) -> Verdict {
        let snap = self.snap.borrow().clone();
        let empty = PasswordFile::default();
        let users = snap.passwords.as_ref().unwrap_or(&empty);
        match scram::step(users, &self.hub.secret, state, data) {
            AuthStep::Continue { data, state } => Verdict::Continue { data, state },
            AuthStep::Success { data, username } => {
                if snap
                    .bans
                    .client_banned(connect.client_id.as_str(), Some(username.as_str()))
                {
                    return Verdict::Refuse(ReasonCode::Banned);
                }
                connect.username = Some(username);
                connect.properties.authentication_data = data;
                Verdict::Accept {
                    expires_unix_s: None,
                    token_acl: None,
                }
            }
            AuthStep::Failure(rc) => {
                info!(
                    client_id = connect.client_id.as_str(),
                    "SCRAM authentication failed"
                );
                Verdict::Refuse(rc)
            }
        }
    }

    fn cache_key(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.hub.secret);
        h.update((user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password);
        h.finalize().into()
    }
}

impl AuthHook for ShardAuth {
    fn generation(&self) -> u64 {
        self.snap.borrow().generation
    }

    fn allowed(
        &self,
        client_id: &str,
        username: Option<&str>,
        action: Action,
        topic: &str,
    ) -> bool {
        match &self.snap.borrow().acl {
            Some(acl) => acl.allowed(client_id, username, action, topic),
            None => true,
        }
    }

    fn subscribe_denied(&self) -> ReasonCode {
        match self.hub.config().subscribe_denied_code {
            0x80 => ReasonCode::UnspecifiedError,
            _ => ReasonCode::NotAuthorized,
        }
    }

    fn auth_step(&self, method: &str, state: Option<&[u8]>, data: &[u8]) -> AuthStep {
        let snap = self.snap.borrow().clone();
        if method != scram::METHOD || !snap.scram_enabled() {
            return AuthStep::Failure(ReasonCode::BadAuthenticationMethod);
        }
        let empty = PasswordFile::default();
        let users = snap.passwords.as_ref().unwrap_or(&empty);
        scram::step(users, &self.hub.secret, state, data)
    }
}

/// The process's resident set size in bytes (`/proc/self/statm`), 0 if unknown.
pub fn resident_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    text.split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// Writes `text` to `path` atomically (a temporary file in the same
/// directory, then rename), keeping the file private (mode 0600).
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp: PathBuf = dir
        .unwrap_or(Path::new("."))
        .join(format!(".{name}.tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_edited_through_the_hub_reach_the_file_and_the_snapshot() {
        let dir = std::env::temp_dir().join(format!("tessera-hub-bans-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bans");
        let _ = std::fs::remove_file(&file);
        let config = AuthConfig {
            ban_file: file.to_str().unwrap().to_owned(),
            ..AuthConfig::default()
        };
        let hub = AuthHub::load(&config, false).unwrap();
        let ban: bans::Ban = "clientid evil".parse().unwrap();
        assert_eq!(hub.edit_ban(ban.clone(), true), Ok(true));
        assert_eq!(hub.edit_ban(ban.clone(), true), Ok(false));
        assert!(hub.current().bans.client_banned("evil", None));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "clientid evil\n");
        assert_eq!(hub.edit_ban(ban.clone(), false), Ok(true));
        assert!(!hub.bans().client_banned("evil", None));
        let none = AuthHub::load(&AuthConfig::default(), false).unwrap();
        assert!(
            none.edit_ban(ban, true)
                .unwrap_err()
                .contains("auth.ban_file")
        );
    }
}
