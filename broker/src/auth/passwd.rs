//! The password file: one `username:hash[:scram]` line per user.
//!
//! - `hash` is `$7$ITERATIONS$SALT$HASH`, PBKDF2-HMAC-SHA512 with a 64-byte
//!   output and base64 salt and hash: the format `mosquitto_passwd` writes, so
//!   files move between Mosquitto and Tessera both ways.
//! - `scram` (optional, written by `brokerctl passwd add --scram`) is
//!   `scram-sha-256$ITERATIONS$SALT$STOREDKEY$SERVERKEY` (RFC 5802/7677), what
//!   the MQTT 5 enhanced authentication `SCRAM-SHA-256` needs. It holds no
//!   password equivalent: a stolen file lets nobody log in without cracking it.
//!
//! Lines starting with `#` and blank lines are ignored. A malformed line is an
//! error naming the file and the line, never a silently skipped user.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

/// Default PBKDF2-SHA512 iterations for new entries: 40-60 ms per check here
/// (measured in docs/SECURITY.md); checks run on the blocking pool and
/// successful ones are cached.
pub const ITERATIONS_DEFAULT: u32 = 100_000;

/// Default iterations of new SCRAM-SHA-256 keys (RFC 7677 asks at least 4096;
/// the client computes them, the server does not).
pub const SCRAM_ITERATIONS_DEFAULT: u32 = 4096;

/// Bounds on iteration counts read from a file: a file asking 2^32 iterations
/// would stall a worker thread for hours.
pub const ITERATIONS_MAX: u32 = 10_000_000;

const SALT_BYTES: usize = 12;
const SCRAM_SALT_BYTES: usize = 16;

/// The SCRAM-SHA-256 keys of one user.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    /// PBKDF2 iterations the client runs.
    pub iterations: u32,
    /// The salt.
    pub salt: Vec<u8>,
    /// H(ClientKey).
    pub stored_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

/// One user's entry.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    iterations: u32,
    salt: Vec<u8>,
    hash: Vec<u8>,
    /// SCRAM keys, when the entry has them.
    pub scram: Option<ScramKeys>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("iterations", &self.iterations)
            .field("scram", &self.scram.is_some())
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// A new entry for `password` with a random salt.
    pub fn new(password: &[u8], iterations: u32, scram_iterations: Option<u32>) -> Entry {
        let salt = random_bytes(SALT_BYTES);
        let hash = pbkdf2_sha512(password, &salt, iterations);
        Entry {
            iterations,
            salt,
            hash,
            scram: scram_iterations.map(|it| ScramKeys::derive(password, it)),
        }
    }

    /// Whether `password` is this entry's password. Slow by design (PBKDF2):
    /// never call it on a shard thread.
    pub fn verify(&self, password: &[u8]) -> bool {
        let hash = pbkdf2_sha512(password, &self.salt, self.iterations);
        hash.ct_eq(&self.hash).into()
    }

    fn to_line(&self, user: &str) -> String {
        let mut line = format!(
            "{user}:$7${}${}${}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(&self.hash)
        );
        if let Some(s) = &self.scram {
            let _ = write!(
                line,
                ":scram-sha-256${}${}${}${}",
                s.iterations,
                B64.encode(&s.salt),
                B64.encode(s.stored_key),
                B64.encode(s.server_key)
            );
        }
        line
    }
}

impl ScramKeys {
    /// The keys for `password` with a random salt.
    pub fn derive(password: &[u8], iterations: u32) -> ScramKeys {
        let salt = random_bytes(SCRAM_SALT_BYTES);
        let salted = scram_salted_password(password, &salt, iterations);
        let client_key = hmac_sha256(&salted, b"Client Key");
        ScramKeys {
            iterations,
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }
}

/// SaltedPassword := Hi(password, salt, i), PBKDF2-HMAC-SHA256 (RFC 5802).
pub fn scram_salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

/// HMAC-SHA-256.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn pbkdf2_sha512(password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut out = vec![0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out);
    out
}

/// Random bytes from the operating system.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::getrandom(&mut v).expect("the OS random source works");
    v
}

/// A malformed password file line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {what}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong (never the hash itself).
    pub what: String,
}

/// The users of a password file, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: BTreeMap<String, Entry>,
}

impl PasswordFile {
    /// Parses the text of a password file.
    pub fn parse(text: &str) -> Result<PasswordFile, ParseError> {
        let mut users = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |what: &str| ParseError {
                line: i + 1,
                what: what.to_owned(),
            };
            let mut fields = line.split(':');
            let user = fields.next().unwrap_or_default();
            let hash = fields.next().ok_or_else(|| err("expected username:hash"))?;
            if user.is_empty() {
                return Err(err("empty user name"));
            }
            let entry = parse_hash(hash).map_err(|w| err(&w))?;
            let scram = match fields.next() {
                Some(s) => Some(parse_scram(s).map_err(|w| err(&w))?),
                None => None,
            };
            if fields.next().is_some() {
                return Err(err("too many ':'-separated fields"));
            }
            if users.contains_key(user) {
                return Err(err(&format!("user {user:?} is listed twice")));
            }
            users.insert(user.to_owned(), Entry { scram, ..entry });
        }
        Ok(PasswordFile { users })
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (user, e) in &self.users {
            out.push_str(&e.to_line(user));
            out.push('\n');
        }
        out
    }

    /// The entry of `user`.
    pub fn get(&self, user: &str) -> Option<&Entry> {
        self.users.get(user)
    }

    /// Adds or replaces a user.
    pub fn set(&mut self, user: &str, entry: Entry) {
        self.users.insert(user.to_owned(), entry);
    }

    /// Removes a user; false if there was none.
    pub fn remove(&mut self, user: &str) -> bool {
        self.users.remove(user).is_some()
    }

    /// User names, sorted, with whether each has SCRAM keys.
    pub fn users(&self) -> impl Iterator<Item = (&str, bool)> {
        self.users
            .iter()
            .map(|(u, e)| (u.as_str(), e.scram.is_some()))
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True without users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn parse_iterations(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=ITERATIONS_MAX).contains(&n) => Ok(n),
        _ => Err(format!("iterations must be 1 to {ITERATIONS_MAX}")),
    }
}

fn parse_hash(h: &str) -> Result<Entry, String> {
    let parts: Vec<&str> = h.split('$').collect();
    match parts.as_slice() {
        ["", "7", it, salt, hash] => {
            let iterations = parse_iterations(it)?;
            let salt = B64.decode(salt).map_err(|_| "salt is not base64")?;
            let hash = B64.decode(hash).map_err(|_| "hash is not base64")?;
            if hash.len() != 64 {
                return Err("hash is not 64 bytes".into());
            }
            Ok(Entry {
                iterations,
                salt,
                hash,
                scram: None,
            })
        }
        ["", "6", ..] => Err(
            "unsupported hash $6$ (SHA512 without PBKDF2, too fast to be \
                              safe): re-create the user with brokerctl passwd add"
                .into(),
        ),
        _ => Err("unknown hash format (expected $7$iterations$salt$hash)".into()),
    }
}

fn parse_scram(s: &str) -> Result<ScramKeys, String> {
    let parts: Vec<&str> = s.split('$').collect();
    let ["scram-sha-256", it, salt, stored, server] = parts.as_slice() else {
        return Err("unknown third field (expected scram-sha-256$...)".into());
    };
    let key = |b: &str| -> Result<[u8; 32], String> {
        B64.decode(b)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| "SCRAM key is not 32 base64 bytes".to_owned())
    };
    Ok(ScramKeys {
        iterations: parse_iterations(it)?,
        salt: B64.decode(salt).map_err(|_| "SCRAM salt is not base64")?,
        stored_key: key(stored)?,
        server_key: key(server)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_round_trips_through_its_line_and_verifies() {
        let mut f = PasswordFile::default();
        f.set("alice", Entry::new(b"secret", 10, Some(10)));
        f.set("bob", Entry::new(b"hunter2", 10, None));
        let text = f.to_text();
        assert!(!text.contains("secret") && !text.contains("hunter2"));
        let back = PasswordFile::parse(&text).unwrap();
        assert_eq!(back, f);
        assert!(back.get("alice").unwrap().verify(b"secret"));
        assert!(!back.get("alice").unwrap().verify(b"secret "));
        assert!(back.get("bob").unwrap().scram.is_none());
    }

    #[test]
    fn reads_what_mosquitto_passwd_writes() {
        // `mosquitto_passwd -b pw alice secret` (Mosquitto 2.0.11).
        let line = "alice:$7$101$cN8MepqcJpo31kda$AICxJhELY9kNUL8pN5oOtW/yUlKsHlRP91/Sg37yaXyaAG\
                    toSHs0Fb3ch6TYVn77C/UJcv9BsgODT0OkUwsMSw==";
        let f = PasswordFile::parse(line).unwrap();
        assert!(f.get("alice").unwrap().verify(b"secret"));
        assert!(!f.get("alice").unwrap().verify(b"Secret"));
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let cases = [
            ("alice", "expected username:hash"),
            ("alice:$7$x$AA$AA", "iterations"),
            ("alice:$7$0$AA$AA", "iterations"),
            ("alice:$7$10$!!$AA", "salt"),
            ("alice:$7$10$AAAA$AAAA", "64 bytes"),
            ("alice:$6$abc$def", "unsupported"),
            ("alice:plain", "unknown hash format"),
            (":$7$10$AA$AA", "empty user"),
        ];
        for (text, what) in cases {
            let e = PasswordFile::parse(&format!("# comment\n\n{text}\n")).unwrap_err();
            assert_eq!(e.line, 3, "{text}");
            assert!(e.what.contains(what), "{text}: {e}");
        }
        let ok = Entry::new(b"x", 1, None).to_line("u");
        let e = PasswordFile::parse(&format!("{ok}\n{ok}\n")).unwrap_err();
        assert!(e.what.contains("twice"), "{e}");
    }
}
