//! `brokerctl`: the Tessera operator tool.
//!
//! Subcommands so far:
//! - `tune check [--profile NAME] [--proc-root DIR] [--pid PID] [--json]`: compare this
//!   machine with a `kernel-tuning/` profile, read-only ([`tessera_broker::tune`]).
//! - `passwd add|delete|list FILE [USER]`: manage a password file (the password is read
//!   from standard input), like `mosquitto_passwd` ([`tessera_broker::auth::ctl`]).
//! - `ban add|delete|list FILE [KIND VALUE]`: manage a ban list file.
//! - `completions SHELL`: print a completion script (bash, zsh, fish, elvish,
//!   powershell), e.g. `brokerctl completions bash > /etc/bash_completion.d/brokerctl`.
//!
//! The subcommands that talk to a running broker over its admin API (`status`,
//! `clients`, `subs`, `retained`, `sessions`, `metrics`) and `cluster` join
//! [`Command`] with the admin API, along with the `--url`/`--token` flags they share.
//!
//! Exit codes, a stable interface for scripts:
//! - 0: success; for `tune check`, every check meets the profile.
//! - 1: the command ran and found a problem; for `tune check`, at least one check is
//!   LOW, HIGH, MISSING or FAIL.
//! - 2: usage error: unknown subcommand, flag or profile, or a `--proc-root` that is
//!   not a directory. Nothing was checked.
//!
//! Later subcommands may add codes above 2 for their own failures (e.g. broker not
//! reachable); 0, 1 and 2 keep these meanings.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use tessera_broker::auth::ctl::{self, BanCommand, PasswdCommand};
use tessera_broker::tune::{PROC_ROOT_DEFAULT, Profile, ProfileName, SystemView, evaluate};

/// Exit code: success, or every check passed.
const EXIT_OK: u8 = 0;
/// Exit code: the command ran and found a problem.
const EXIT_PROBLEM: u8 = 1;
/// Exit code: bad usage; clap uses the same code for the errors it detects.
const EXIT_USAGE: u8 = 2;

/// Command-line interface of `brokerctl`.
#[derive(Debug, Parser)]
#[command(
    name = "brokerctl",
    version,
    about = "Tessera operator tool",
    after_help = "Exit codes: 0 success (all checks pass), 1 a check failed, 2 usage error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands. Admin-API subcommands (status, clients, subs, retained, sessions,
/// metrics) and cluster are added here when the admin API exists.
#[derive(Debug, Subcommand)]
enum Command {
    /// Kernel and process tuning for many connections.
    #[command(subcommand)]
    Tune(TuneCommand),
    /// Manage a password file (the first line of standard input is the password).
    #[command(subcommand)]
    Passwd(PasswdCommand),
    /// Manage a ban list file (clientid, username, ip).
    #[command(subcommand)]
    Ban(BanCommand),
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell to generate for.
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// `brokerctl tune ...`.
#[derive(Debug, Subcommand)]
enum TuneCommand {
    /// Compare this machine with a kernel-tuning profile (read-only).
    ///
    /// Checks the profile's sysctls, the open-files and locked-memory limits, the
    /// kernel version and io_uring availability, and prints each setting's current
    /// and wanted value with what to do. Exit code 0 when everything meets the
    /// profile, 1 otherwise.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The profile to compare with (kernel-tuning/README.md describes them).
    #[arg(long, value_enum, default_value_t = ProfileName::Standard)]
    profile: ProfileName,

    /// Where proc is mounted; sysctls are read from DIR/sys. Anything but /proc skips
    /// the io_uring_setup probe, which can only test the live system.
    #[arg(long, value_name = "DIR", default_value = PROC_ROOT_DEFAULT)]
    proc_root: PathBuf,

    /// Check the limits of this running process (read from DIR/PID/limits, e.g. the
    /// broker's) instead of brokerctl's own.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Tune(TuneCommand::Check(args)) => tune_check(&args),
        Command::Passwd(cmd) => finish(ctl::passwd(&cmd, &mut io::stdin().lock())),
        Command::Ban(cmd) => finish(ctl::ban(&cmd)),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "brokerctl", &mut io::stdout());
            ExitCode::from(EXIT_OK)
        }
    }
}

/// Prints a file subcommand's output, or its error with exit code 1.
fn finish(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::from(EXIT_OK)
        }
        Err(e) => {
            eprintln!("brokerctl: {e}");
            ExitCode::from(EXIT_PROBLEM)
        }
    }
}

fn tune_check(args: &CheckArgs) -> ExitCode {
    if !args.proc_root.is_dir() {
        eprintln!(
            "brokerctl: --proc-root {} is not a directory",
            args.proc_root.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let profile = match Profile::load(args.profile) {
        Ok(p) => p,
        // The profiles are embedded and tested; this is a build defect.
        Err(e) => panic!("embedded profile {} does not parse: {e}", args.profile),
    };
    let view = SystemView::read(&profile, &args.proc_root, args.pid);
    let report = evaluate(&profile, &view);
    let text = if args.json {
        let mut json = serde_json::to_string_pretty(&report).expect("a report serializes");
        json.push('\n');
        json
    } else {
        report.render_table()
    };
    let mut stdout = io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        eprintln!("brokerctl: cannot write the report: {e}");
        return ExitCode::from(EXIT_PROBLEM);
    }
    ExitCode::from(if report.ok { EXIT_OK } else { EXIT_PROBLEM })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
