//! `brokerctl passwd` and `brokerctl ban`: edit the password and ban files
//! the broker reads (it picks changes up by itself within
//! `auth.reload_interval_s`, or at once on SIGHUP).
//!
//! Passwords are read from standard input (its first line), never from the
//! command line, where `ps` and shell histories would show them. Files are
//! rewritten atomically with mode 0600.
//!
//! Exit codes follow brokerctl's: 0 done, 1 the command ran and failed
//! (unreadable or malformed file, unknown user or ban), 2 usage.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::bans::{Ban, BanList};
use super::passwd::{Entry, ITERATIONS_DEFAULT, ITERATIONS_MAX, PasswordFile};
use super::write_private;

/// `brokerctl passwd ...`.
#[derive(Debug, Subcommand)]
pub enum PasswdCommand {
    /// Add a user or change its password; the password is the first line of
    /// standard input. Creates the file if needed.
    Add(PasswdAdd),
    /// Remove a user.
    Delete {
        /// The password file.
        file: PathBuf,
        /// The user name.
        user: String,
    },
    /// List the users (names only), one per line, with `scram` after those
    /// that can use SCRAM-SHA-256.
    List {
        /// The password file.
        file: PathBuf,
    },
}

/// `brokerctl passwd add`.
#[derive(Debug, Args)]
pub struct PasswdAdd {
    /// The password file.
    pub file: PathBuf,
    /// The user name (no ':').
    pub user: String,
    /// PBKDF2-SHA512 iterations.
    #[arg(long, default_value_t = ITERATIONS_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(ITERATIONS_MAX)))]
    pub iterations: u32,
    /// Also store SCRAM-SHA-256 keys with this many iterations, so the user
    /// can log in with MQTT 5 enhanced authentication (RFC 7677 asks for at
    /// least 4096).
    #[arg(long, value_name = "ITERATIONS",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(ITERATIONS_MAX)))]
    pub scram: Option<u32>,
}

/// `brokerctl ban ...`. KIND is `clientid`, `username` or `ip` (an address
/// or a CIDR block).
#[derive(Debug, Subcommand)]
pub enum BanCommand {
    /// Add a ban. Creates the file if needed.
    Add {
        /// The ban file.
        file: PathBuf,
        /// clientid, username or ip.
        kind: String,
        /// The ClientID, user name, address or block.
        value: String,
    },
    /// Remove a ban.
    Delete {
        /// The ban file.
        file: PathBuf,
        /// clientid, username or ip.
        kind: String,
        /// The ClientID, user name, address or block.
        value: String,
    },
    /// List the bans, one per line.
    List {
        /// The ban file.
        file: PathBuf,
    },
}

/// Runs a passwd subcommand; `Err` is the message for standard error.
pub fn passwd(cmd: &PasswdCommand, stdin: &mut dyn BufRead) -> Result<String, String> {
    match cmd {
        PasswdCommand::Add(a) => {
            if a.user.is_empty() || a.user.contains([':', '\n']) {
                return Err("a user name must be non-empty and without ':'".into());
            }
            let mut f = load_passwd(&a.file, true)?;
            let mut line = String::new();
            stdin
                .read_line(&mut line)
                .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
            let password = line.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                return Err("empty password (give it on standard input)".into());
            }
            f.set(
                &a.user,
                Entry::new(password.as_bytes(), a.iterations, a.scram),
            );
            save(&a.file, &f.to_text())?;
            Ok(String::new())
        }
        PasswdCommand::Delete { file, user } => {
            let mut f = load_passwd(file, false)?;
            if !f.remove(user) {
                return Err(format!("no user {user:?} in {}", file.display()));
            }
            save(file, &f.to_text())?;
            Ok(String::new())
        }
        PasswdCommand::List { file } => {
            let f = load_passwd(file, false)?;
            Ok(f.users()
                .map(|(u, scram)| {
                    if scram {
                        format!("{u} scram\n")
                    } else {
                        format!("{u}\n")
                    }
                })
                .collect())
        }
    }
}

/// Runs a ban subcommand.
pub fn ban(cmd: &BanCommand) -> Result<String, String> {
    match cmd {
        BanCommand::Add { file, kind, value } => {
            let ban: Ban = format!("{kind} {value}").parse()?;
            let mut list = load_bans(file, true)?;
            list.add(ban);
            save(file, &list.to_text())?;
            Ok(String::new())
        }
        BanCommand::Delete { file, kind, value } => {
            let ban: Ban = format!("{kind} {value}").parse()?;
            let mut list = load_bans(file, false)?;
            if !list.remove(&ban) {
                return Err(format!("no ban {ban} in {}", file.display()));
            }
            save(file, &list.to_text())?;
            Ok(String::new())
        }
        BanCommand::List { file } => Ok(load_bans(file, false)?.to_text()),
    }
}

fn read_text(file: &Path, create: bool) -> Result<String, String> {
    match std::fs::read_to_string(file) {
        Ok(t) => Ok(t),
        Err(e) if create && e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(format!("cannot read {}: {e}", file.display())),
    }
}

fn load_passwd(file: &Path, create: bool) -> Result<PasswordFile, String> {
    PasswordFile::parse(&read_text(file, create)?).map_err(|e| format!("{}: {e}", file.display()))
}

fn load_bans(file: &Path, create: bool) -> Result<BanList, String> {
    BanList::parse(&read_text(file, create)?).map_err(|e| format!("{}: {e}", file.display()))
}

fn save(file: &Path, text: &str) -> Result<(), String> {
    write_private(file, text).map_err(|e| format!("cannot write {}: {e}", file.display()))
}
