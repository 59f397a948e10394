//! `brokerctl`: the Tessera operator tool.
//!
//! Subcommands:
//! - `status`, `clients list|show|kick`, `subs list`, `retained list|get|delete`,
//!   `sessions list|show|expire`, `metrics [--watch]`: talk to a running broker
//!   over its admin API (`docs/ADMIN_API.md`), with `--url` (`TESSERA_URL`,
//!   default `http://127.0.0.1:18083`) and `--token` (`TESSERA_TOKEN`). Human
//!   tables by default, the API's JSON with `--json`. In a cluster the listings ask
//!   every member (found through `/api/v1/cluster`) and add a NODE column, or one
//!   member with `--node N`.
//! - `passwd add|delete|list FILE [USER]`: manage a password file (the password is read
//!   from standard input), like `mosquitto_passwd` ([`tessera_broker::auth::ctl`]).
//! - `ban add|delete|list FILE [KIND VALUE]`: manage a ban list file.
//! - `tune check [--profile NAME] [--proc-root DIR] [--pid PID] [--json]`: compare this
//!   machine with a `kernel-tuning/` profile, read-only ([`tessera_broker::tune`]).
//! - `cluster status|join|leave|remove|transfer-leader`: the cluster through the admin
//!   API of any member (`/api/v1/cluster`).
//! - `cluster certs --out DIR --nodes N [--hosts h1,h2,...]`: make the cluster CA and the
//!   node certificates the cluster links use ([`tessera_raft::link::certs`]).
//! - `completions SHELL`: print a completion script (bash, zsh, fish, elvish,
//!   powershell), e.g. `brokerctl completions bash > /etc/bash_completion.d/brokerctl`.
//!
//! Adding a subcommand: a variant (with its args) in [`Command`] or a nested
//! enum, and an arm in `run_admin` calling the API through [`AdminClient`].
//!
//! Exit codes, a stable interface for scripts:
//! - 0: success; for `tune check`, every check meets the profile.
//! - 1: the command ran and found a problem: the client, session or retained
//!   message does not exist (HTTP 404); for `tune check`, at least one check is
//!   LOW, HIGH, MISSING or FAIL.
//! - 2: usage error: unknown subcommand, flag or profile, a bad `--url`, or a
//!   `--proc-root` that is not a directory. Nothing was sent or checked.
//! - 3: the broker could not be reached, or refused the token (HTTP 401).
//! - 4: the broker answered with an error (e.g. 503: a shard did not answer).

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use serde_json::Value;
use tessera_broker::admin::client::{AdminClient, ClientError, URL_DEFAULT};
use tessera_broker::auth::ctl::{self, BanCommand, PasswdCommand};
use tessera_broker::tune::{PROC_ROOT_DEFAULT, Profile, ProfileName, SystemView, evaluate};

/// Exit code: success, or every check passed.
const EXIT_OK: u8 = 0;
/// Exit code: the command ran and found a problem (not found, check failed).
const EXIT_PROBLEM: u8 = 1;
/// Exit code: bad usage; clap uses the same code for the errors it detects.
const EXIT_USAGE: u8 = 2;
/// Exit code: the broker is unreachable or refused the token.
const EXIT_CONNECTION: u8 = 3;
/// Exit code: the broker answered with an error.
const EXIT_SERVER: u8 = 4;

/// Pages `--all` follows at most (each up to 1000 items).
const PAGES_MAX: usize = 10_000;

/// Command-line interface of `brokerctl`.
#[derive(Debug, Parser)]
#[command(
    name = "brokerctl",
    version,
    about = "Tessera operator tool",
    after_help = "Exit codes: 0 success, 1 not found or a check failed, 2 usage error, \
                  3 broker unreachable or token refused, 4 the broker answered with an error."
)]
struct Cli {
    /// Admin API URL (http://HOST:PORT).
    #[arg(long, global = true, env = "TESSERA_URL", default_value = URL_DEFAULT)]
    url: String,

    /// Bearer token for the admin API (required when the broker has one).
    #[arg(long, global = true, env = "TESSERA_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Seconds to wait for the broker per request.
    #[arg(long, global = true, default_value_t = 10, value_name = "SECONDS")]
    timeout: u64,

    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Broker version, uptime, shards and counts.
    Status,
    /// Connected clients.
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Subscriptions.
    #[command(subcommand)]
    Subs(SubsCommand),
    /// Retained messages.
    #[command(subcommand)]
    Retained(RetainedCommand),
    /// Sessions, connected or not.
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Bridges: remote, shard, connected, queued, in flight, sent, received,
    /// dropped and the last error.
    Bridges,
    /// Prometheus metrics: the raw text, or a summary refreshed with --watch.
    Metrics(MetricsArgs),
    /// Manage a password file (the first line of standard input is the password).
    #[command(subcommand)]
    Passwd(PasswdCommand),
    /// Manage a ban list file (clientid, username, ip).
    #[command(subcommand)]
    Ban(BanCommand),
    /// Kernel and process tuning for many connections.
    #[command(subcommand)]
    Tune(TuneCommand),
    /// The cluster: status, membership, leadership, certificates.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell to generate for.
        #[arg(value_enum)]
        shell: Shell,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Members (id, addresses, role, reachable, match index, lag), term, commit, applied
    /// and leader, as the node at --url sees them.
    Status,
    /// Add a node to the cluster (learner, catch up, then voter), through any member.
    Join {
        /// The new node's id (its certificate must name it).
        #[arg(long)]
        id: u64,
        /// The new node's cluster address (ADDR:PORT, UDP).
        #[arg(long)]
        addr: String,
    },
    /// The node at --url leaves the cluster.
    Leave,
    /// Remove a node from the cluster.
    Remove {
        /// The node's id.
        id: u64,
    },
    /// Move leadership to another voter.
    TransferLeader {
        /// The voter to lead.
        id: u64,
    },
    /// Make the cluster CA and a certificate per node in DIR (existing files are kept:
    /// run it again with a larger --nodes to add nodes signed by the same CA).
    Certs {
        /// The directory to write (`ca.pem`, `ca.key`, `node-<id>.pem`, `node-<id>.key`).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Make certificates for nodes 1 to N.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1000))]
        nodes: u64,
        /// Host names or IP addresses added to the certificates: one for every node, or one
        /// per node in id order.
        #[arg(long, value_delimiter = ',', value_name = "h1,h2,...")]
        hosts: Vec<String>,
    },
}

/// Paging flags shared by the listings.
#[derive(Debug, Args)]
struct PageArgs {
    /// Items per page (1 to 1000).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Start after this cursor (the `next` of a previous page).
    #[arg(long)]
    after: Option<String>,
    /// Follow the pages to the end.
    #[arg(long)]
    all: bool,
    /// In a cluster: only this node (through its admin address from the cluster's
    /// membership). Without it, every member is listed, with a NODE column (retained
    /// messages, the same on every node: the node at --url).
    #[arg(long, value_name = "N")]
    node: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum ClientsCommand {
    /// List connected clients.
    List {
        /// Only ClientIDs starting with this.
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one client (or disconnected session) with its subscriptions.
    Show {
        /// The ClientID.
        client_id: String,
    },
    /// Disconnect a client (MQTT 5 clients get DISCONNECT 0x98, Administrative action).
    Kick {
        /// The ClientID.
        client_id: String,
        /// Reason sent to MQTT 5 clients and logged.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SubsCommand {
    /// List subscriptions.
    List {
        /// Only this client's.
        #[arg(long)]
        client: Option<String>,
        /// Only filters containing this text.
        #[arg(long)]
        filter: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
}

#[derive(Debug, Subcommand)]
enum RetainedCommand {
    /// List retained messages.
    List {
        /// Only topics matching this MQTT filter (e.g. 'sensors/#').
        #[arg(long)]
        filter: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show the retained message of a topic.
    Get {
        /// The topic.
        topic: String,
    },
    /// Delete the retained message of a topic.
    Delete {
        /// The topic.
        topic: String,
    },
}

#[derive(Debug, Subcommand)]
enum SessionsCommand {
    /// List sessions.
    List {
        /// Only ClientIDs starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Only connected (true) or disconnected (false) sessions.
        #[arg(long)]
        connected: Option<bool>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one session with its subscriptions.
    Show {
        /// The ClientID.
        client_id: String,
    },
    /// End a session now, as its expiry would (a connected client is disconnected).
    Expire {
        /// The ClientID.
        client_id: String,
    },
}

#[derive(Debug, Args)]
struct MetricsArgs {
    /// Print a summary every SECONDS (default 2) instead of the raw text once.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<u64>,
    /// With --watch: stop after this many summaries.
    #[arg(long, requires = "watch")]
    count: Option<u64>,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Tune(TuneCommand::Check(args)) => tune_check(args, cli.json),
        Command::Passwd(cmd) => finish(ctl::passwd(cmd, &mut io::stdin().lock())),
        Command::Ban(cmd) => finish(ctl::ban(cmd)),
        Command::Cluster(ClusterCommand::Certs { out, nodes, hosts }) => {
            cluster_certs(out, *nodes, hosts)
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "brokerctl", &mut io::stdout());
            ExitCode::from(EXIT_OK)
        }
        _ => {
            let client = AdminClient::new(
                &cli.url,
                cli.token.clone(),
                Duration::from_secs(cli.timeout.max(1)),
            );
            let result = client.and_then(|c| run_admin(&c, &cli));
            match result {
                Ok(()) => ExitCode::from(EXIT_OK),
                Err(e) => {
                    eprintln!("brokerctl: {e}");
                    ExitCode::from(match e {
                        ClientError::Usage(_) => EXIT_USAGE,
                        ClientError::NotFound(_) => EXIT_PROBLEM,
                        ClientError::Connection(_) => EXIT_CONNECTION,
                        ClientError::Server(_) => EXIT_SERVER,
                    })
                }
            }
        }
    }
}

/// `cluster certs`: makes or completes a certificate directory; a usage error (exit 2) when
/// `--hosts` names neither one host nor one per node, exit 1 when a file cannot be written.
fn cluster_certs(out: &std::path::Path, nodes: u64, hosts: &[String]) -> ExitCode {
    if hosts.len() > 1 && hosts.len() as u64 != nodes {
        eprintln!(
            "brokerctl: --hosts names {} hosts for {nodes} nodes: give one for all or one per node",
            hosts.len()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let result = tessera_raft::link::certs::make_cluster_certs(out, nodes, hosts)
        .map(|report| {
            let mut text = String::new();
            for path in &report.written {
                text.push_str(&format!("wrote {}\n", path.display()));
            }
            for path in &report.kept {
                text.push_str(&format!("kept  {}\n", path.display()));
            }
            text
        })
        .map_err(|e| e.to_string());
    finish(result)
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

fn print(text: &str) -> Result<(), ClientError> {
    let mut out = io::stdout().lock();
    // A closed pipe (`brokerctl ... | head`) is not an error worth reporting.
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    Ok(())
}

fn print_json(v: &Value) -> Result<(), ClientError> {
    print(&format!(
        "{}\n",
        serde_json::to_string_pretty(v).expect("JSON values serialize")
    ))
}

fn run_admin(c: &AdminClient, cli: &Cli) -> Result<(), ClientError> {
    let json = cli.json;
    match &cli.command {
        Command::Status => {
            let v = c.json("GET", &["api", "v1", "status"], &[])?;
            if json {
                return print_json(&v);
            }
            print(&render_status(&v))
        }
        Command::Bridges => {
            let v = c.json("GET", &["api", "v1", "bridges"], &[])?;
            if json {
                return print_json(&v);
            }
            let empty = Vec::new();
            let items = v["items"].as_array().unwrap_or(&empty);
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|i| BRIDGE_COLUMNS.iter().map(|(_, f)| cell(&i[*f])).collect())
                .collect();
            let headers: Vec<&str> = BRIDGE_COLUMNS.iter().map(|(h, _)| *h).collect();
            let mut text = table(&headers, &rows);
            for i in items {
                if let Some(e) = i["last_error"].as_str().filter(|e| !e.is_empty()) {
                    text.push_str(&format!("{}: last error: {e}\n", cell(&i["name"])));
                }
            }
            text.push_str(&format!("{} bridges\n", items.len()));
            print(&text)
        }
        Command::Clients(ClientsCommand::List { prefix, page }) => {
            let mut q = Vec::new();
            opt(&mut q, "prefix", prefix);
            let to = Listing::Every;
            list(
                c,
                cli,
                to,
                &["api", "v1", "clients"],
                q,
                page,
                &CLIENT_COLUMNS,
            )
        }
        Command::Clients(ClientsCommand::Show { client_id })
        | Command::Sessions(SessionsCommand::Show { client_id }) => {
            let v = c.json("GET", &["api", "v1", "sessions", client_id], &[])?;
            if json {
                return print_json(&v);
            }
            print(&render_session(&v))
        }
        Command::Clients(ClientsCommand::Kick { client_id, reason }) => {
            let mut q = Vec::new();
            opt(&mut q, "reason", reason);
            let v = c.json("DELETE", &["api", "v1", "clients", client_id], &q)?;
            if json {
                return print_json(&v);
            }
            print(&format!("kicked {client_id}\n"))
        }
        Command::Subs(SubsCommand::List {
            client,
            filter,
            page,
        }) => {
            let mut q = Vec::new();
            opt(&mut q, "client_id", client);
            opt(&mut q, "filter", filter);
            let to = Listing::Every;
            list(
                c,
                cli,
                to,
                &["api", "v1", "subscriptions"],
                q,
                page,
                &SUB_COLUMNS,
            )
        }
        Command::Retained(RetainedCommand::List { filter, page }) => {
            let mut q = Vec::new();
            opt(&mut q, "filter", filter);
            let to = Listing::Replicated;
            list(
                c,
                cli,
                to,
                &["api", "v1", "retained"],
                q,
                page,
                &RETAINED_COLUMNS,
            )
        }
        Command::Retained(RetainedCommand::Get { topic }) => {
            let v = c.json("GET", &["api", "v1", "retained", topic], &[])?;
            if json {
                return print_json(&v);
            }
            let payload = match v["payload"].as_str() {
                Some(text) => text.to_owned(),
                None => format!("(binary, base64) {}", cell(&v["payload_base64"])),
            };
            print(&format!(
                "topic: {}\nqos: {}\nbytes: {}\nexpires in (s): {}\npayload: {payload}\n",
                cell(&v["topic"]),
                cell(&v["qos"]),
                cell(&v["payload_bytes"]),
                cell(&v["expires_in_s"]),
            ))
        }
        Command::Retained(RetainedCommand::Delete { topic }) => {
            let v = c.json("DELETE", &["api", "v1", "retained", topic], &[])?;
            if json {
                return print_json(&v);
            }
            print(&format!("deleted the retained message of {topic}\n"))
        }
        Command::Sessions(SessionsCommand::List {
            prefix,
            connected,
            page,
        }) => {
            let mut q = Vec::new();
            opt(&mut q, "prefix", prefix);
            if let Some(b) = connected {
                q.push(("connected", b.to_string()));
            }
            let to = Listing::Every;
            list(
                c,
                cli,
                to,
                &["api", "v1", "sessions"],
                q,
                page,
                &SESSION_COLUMNS,
            )
        }
        Command::Sessions(SessionsCommand::Expire { client_id }) => {
            let v = c.json("DELETE", &["api", "v1", "sessions", client_id], &[])?;
            if json {
                return print_json(&v);
            }
            print(&format!("expired the session of {client_id}\n"))
        }
        Command::Metrics(m) => metrics(c, m, json),
        Command::Cluster(ClusterCommand::Status) => {
            let v = c.json("GET", &["api", "v1", "cluster"], &[])?;
            if json {
                return print_json(&v);
            }
            print(&render_cluster(&v))
        }
        Command::Cluster(ClusterCommand::Join { id, addr }) => {
            let q = [("id", id.to_string()), ("addr", addr.clone())];
            let v = c.json("POST", &["api", "v1", "cluster", "members"], &q)?;
            if json {
                return print_json(&v);
            }
            print(&format!(
                "node {id} joined the cluster as a voter (index {})\n",
                cell(&v["index"])
            ))
        }
        Command::Cluster(ClusterCommand::Leave) => {
            let v = c.json("POST", &["api", "v1", "cluster", "leave"], &[])?;
            if json {
                return print_json(&v);
            }
            print(&format!(
                "the node left the cluster (index {})\n",
                cell(&v["index"])
            ))
        }
        Command::Cluster(ClusterCommand::Remove { id }) => {
            let v = c.json(
                "DELETE",
                &["api", "v1", "cluster", "members", &id.to_string()],
                &[],
            )?;
            if json {
                return print_json(&v);
            }
            print(&format!(
                "node {id} removed (index {})\n",
                cell(&v["index"])
            ))
        }
        Command::Cluster(ClusterCommand::TransferLeader { id }) => {
            let q = [("to", id.to_string())];
            let v = c.json("POST", &["api", "v1", "cluster", "leader"], &q)?;
            if json {
                return print_json(&v);
            }
            print(&format!("leadership moved to node {id}\n"))
        }
        Command::Tune(_)
        | Command::Passwd(_)
        | Command::Ban(_)
        | Command::Cluster(ClusterCommand::Certs { .. })
        | Command::Completions { .. } => {
            unreachable!("handled in main")
        }
    }
}

fn opt<'a>(q: &mut Vec<(&'a str, String)>, name: &'a str, v: &Option<String>) {
    if let Some(v) = v {
        q.push((name, v.clone()));
    }
}

/// A table column: header and JSON field.
type Column = (&'static str, &'static str);

const BRIDGE_COLUMNS: [Column; 10] = [
    ("NAME", "name"),
    ("REMOTE", "address"),
    ("SHARD", "shard"),
    ("CONNECTED", "connected"),
    ("QUEUED", "queued"),
    ("INFLIGHT", "in_flight"),
    ("SENT", "sent"),
    ("RECEIVED", "received"),
    ("DROPPED", "dropped"),
    ("FAILURES", "connect_failures"),
];

const CLIENT_COLUMNS: [Column; 7] = [
    ("CLIENT ID", "client_id"),
    ("SHARD", "shard"),
    ("PROTO", "protocol"),
    ("KEEPALIVE", "keep_alive_s"),
    ("SUBS", "subscriptions"),
    ("INFLIGHT", "inflight"),
    ("QUEUED", "queued"),
];

const SESSION_COLUMNS: [Column; 8] = [
    ("CLIENT ID", "client_id"),
    ("SHARD", "shard"),
    ("CONNECTED", "connected"),
    ("PROTO", "protocol"),
    ("EXPIRY(S)", "session_expiry_interval_s"),
    ("EXPIRES IN(S)", "expires_in_s"),
    ("SUBS", "subscriptions"),
    ("QUEUED", "queued"),
];

const SUB_COLUMNS: [Column; 5] = [
    ("CLIENT ID", "client_id"),
    ("FILTER", "filter"),
    ("QOS", "qos"),
    ("NO LOCAL", "no_local"),
    ("SUB ID", "subscription_id"),
];

const RETAINED_COLUMNS: [Column; 4] = [
    ("TOPIC", "topic"),
    ("QOS", "qos"),
    ("BYTES", "payload_bytes"),
    ("PAYLOAD", "payload"),
];

/// Which nodes of a cluster a listing asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listing {
    /// Every member (sessions, clients, subscriptions live on one node each).
    Every,
    /// The node at --url (retained messages are the same on every node).
    Replicated,
}

/// The admin APIs a listing asks, each with its node id (`None`: a single node, no
/// cluster). `--node N` picks member N through its admin address.
fn listing_targets(
    c: &AdminClient,
    cli: &Cli,
    to: Listing,
    node: Option<u64>,
) -> Result<Vec<(Option<u64>, AdminClient)>, ClientError> {
    let view = match c.json("GET", &["api", "v1", "cluster"], &[]) {
        Ok(v) => v,
        Err(ClientError::NotFound(_)) => {
            if let Some(n) = node {
                return Err(ClientError::Usage(format!(
                    "--node {n}: the broker at --url runs as a single node"
                )));
            }
            return Ok(vec![(None, c.clone())]);
        }
        Err(e) => return Err(e),
    };
    let me = view["node_id"].as_u64();
    let empty = Vec::new();
    let members: Vec<(u64, String)> = view["members"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter_map(|m| Some((m["id"].as_u64()?, m["admin_addr"].as_str()?.to_owned())))
        .collect();
    let client_of = |id: u64, addr: &str| -> Result<(Option<u64>, AdminClient), ClientError> {
        if Some(id) == me {
            return Ok((Some(id), c.clone()));
        }
        if addr.is_empty() {
            return Err(ClientError::Connection(format!(
                "node {id} has no admin address in the cluster's membership"
            )));
        }
        let url = format!("http://{addr}");
        let client = AdminClient::new(&url, cli.token.clone(), Duration::from_secs(cli.timeout))?;
        Ok((Some(id), client))
    };
    match (node, to) {
        (Some(n), _) => {
            let addr = members
                .iter()
                .find(|(id, _)| *id == n)
                .map(|(_, a)| a.as_str())
                .ok_or_else(|| ClientError::NotFound(format!("node {n} is not a member")))?;
            Ok(vec![client_of(n, addr)?])
        }
        (None, Listing::Replicated) => Ok(vec![(me, c.clone())]),
        (None, Listing::Every) => {
            let mut out = Vec::with_capacity(members.len());
            for (id, addr) in &members {
                match client_of(*id, addr) {
                    Ok(t) => out.push(t),
                    Err(e) => eprintln!("node {id}: {e}"),
                }
            }
            Ok(out)
        }
    }
}

/// One node's pages of a listing: its items, total and next cursor.
fn list_node(
    c: &AdminClient,
    path: &[&str],
    query: &[(&str, String)],
    page: &PageArgs,
) -> Result<(Vec<Value>, Value, Value), ClientError> {
    let mut after = page.after.clone();
    let mut items: Vec<Value> = Vec::new();
    let mut total = Value::Null;
    let mut next = Value::Null;
    for _ in 0..PAGES_MAX {
        let mut q = query.to_vec();
        q.push(("limit", page.limit.to_string()));
        if let Some(a) = &after {
            q.push(("after", a.clone()));
        }
        let v = c.json("GET", path, &q)?;
        if let Some(page_items) = v["items"].as_array() {
            items.extend(page_items.iter().cloned());
        }
        total = v["total"].clone();
        next = v["next"].clone();
        match (&next, page.all) {
            (Value::String(n), true) => after = Some(n.clone()),
            _ => break,
        }
    }
    Ok((items, total, next))
}

/// Fetches one page, or all of them with `--all`, and prints them; in a cluster, of
/// every member (a NODE column, totals summed) or of `--node N`.
fn list(
    c: &AdminClient,
    cli: &Cli,
    to: Listing,
    path: &[&str],
    query: Vec<(&str, String)>,
    page: &PageArgs,
    columns: &[Column],
) -> Result<(), ClientError> {
    let targets = listing_targets(c, cli, to, page.node)?;
    let clustered = targets.iter().any(|(n, _)| n.is_some());
    if page.after.is_some() && targets.len() > 1 {
        return Err(ClientError::Usage(
            "--after is a cursor of one node: give --node N with it".into(),
        ));
    }
    let mut items: Vec<Value> = Vec::new();
    let mut total: u64 = 0;
    let mut nodes: Vec<Value> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let single = targets.len() == 1;
    let mut last_next = Value::Null;
    let mut last_total = Value::Null;
    for (node, client) in &targets {
        match list_node(client, path, &query, page) {
            Ok((mut got, t, next)) => {
                if let Some(n) = node {
                    for i in &mut got {
                        if let Value::Object(o) = i {
                            o.insert("node".into(), Value::from(*n));
                        }
                    }
                }
                total += t.as_u64().unwrap_or(0);
                nodes.push(serde_json::json!({ "node": node, "total": t, "next": next }));
                items.extend(got);
                last_next = next;
                last_total = t;
            }
            Err(e) if single => return Err(e),
            Err(e) => {
                nodes.push(serde_json::json!({ "node": node, "error": e.to_string() }));
                failed.push(format!("node {}: {e}", node.map_or(0, |n| n)));
            }
        }
    }
    if cli.json {
        let doc = if clustered {
            serde_json::json!({ "items": items, "total": total, "nodes": nodes })
        } else {
            serde_json::json!({ "items": items, "total": last_total, "next": last_next })
        };
        print_json(&doc)?;
    } else {
        let mut columns: Vec<Column> = columns.to_vec();
        if clustered {
            columns.insert(0, ("NODE", "node"));
        }
        let rows: Vec<Vec<String>> = items
            .iter()
            .map(|i| columns.iter().map(|(_, f)| cell(&i[*f])).collect())
            .collect();
        let headers: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
        let mut text = table(&headers, &rows);
        let total = if clustered {
            total.to_string()
        } else {
            cell(&last_total)
        };
        text.push_str(&format!("{} shown, {total} in total", items.len()));
        for n in &nodes {
            if let Value::String(next) = &n["next"] {
                match n["node"].as_u64() {
                    Some(id) => text.push_str(&format!(
                        "; more on node {id} with --node {id} --after {}",
                        shell_quote(next)
                    )),
                    None => text.push_str(&format!("; more with --after {}", shell_quote(next))),
                }
            }
        }
        text.push('\n');
        print(&text)?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(ClientError::Server(format!(
            "not every node answered: {}",
            failed.join("; ")
        )))
    }
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''").replace('\0', "\\0"))
    }
}

/// A JSON value as a table cell.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s
            .chars()
            .map(|c| if c.is_control() { '.' } else { c })
            .collect(),
        other => other.to_string(),
    }
}

/// Left-aligned columns separated by two spaces; long cells are cut.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    const CELL_CHARS_MAX: usize = 60;
    let cut = |s: &str| -> String {
        if s.chars().count() > CELL_CHARS_MAX {
            let mut t: String = s.chars().take(CELL_CHARS_MAX - 1).collect();
            t.push('…');
            t
        } else {
            s.to_owned()
        }
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| cut(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for r in &rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

fn render_status(v: &Value) -> String {
    let mut out = format!(
        "tessera {}  up {}s  shards {}/{} up\n\
         connections {}  sessions {} online, {} offline  subscriptions {}  retained {}\n\
         queued {}  inflight {}  messages published {}, delivered {}, dropped {}  \
         publish-to-deliver p99 {} µs\n\n",
        cell(&v["version"]),
        cell(&v["uptime_s"]),
        cell(&v["shards_up"]),
        cell(&v["shard_count"]),
        cell(&v["connections"]),
        cell(&v["sessions_online"]),
        cell(&v["sessions_offline"]),
        cell(&v["subscriptions"]),
        cell(&v["retained"]),
        cell(&v["queued"]),
        cell(&v["inflight"]),
        cell(&v["messages_published"]),
        cell(&v["messages_delivered"]),
        cell(&v["messages_dropped"]),
        cell(&v["publish_to_deliver_p99_us"]),
    );
    let cols: [Column; 8] = [
        ("SHARD", "shard"),
        ("UP", "up"),
        ("CONNS", "connections"),
        ("ONLINE", "sessions_online"),
        ("OFFLINE", "sessions_offline"),
        ("SUBS", "subscriptions"),
        ("QUEUED", "queued"),
        ("P99(µs)", "publish_to_deliver_p99_us"),
    ];
    let rows: Vec<Vec<String>> = v["shards"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| cols.iter().map(|(_, f)| cell(&s[*f])).collect())
                .collect()
        })
        .unwrap_or_default();
    let headers: Vec<&str> = cols.iter().map(|(h, _)| *h).collect();
    out.push_str(&table(&headers, &rows));
    out
}

fn render_cluster(v: &Value) -> String {
    let mut out = format!(
        "node {} ({})  term {}  leader {}  commit {}  applied {}  ready {}\n\n",
        cell(&v["node_id"]),
        cell(&v["role"]),
        cell(&v["term"]),
        cell(&v["leader"]),
        cell(&v["commit_index"]),
        cell(&v["applied_index"]),
        cell(&v["ready"]),
    );
    let rows: Vec<Vec<String>> = v["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .map(|m| {
                    [
                        "id",
                        "role",
                        "cluster_addr",
                        "mqtt_addr",
                        "admin_addr",
                        "reachable",
                        "match_index",
                        "lag",
                    ]
                    .iter()
                    .map(|k| cell(&m[*k]))
                    .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&table(
        &[
            "ID",
            "ROLE",
            "CLUSTER",
            "MQTT",
            "ADMIN",
            "REACHABLE",
            "MATCH",
            "LAG",
        ],
        &rows,
    ));
    out
}

fn render_session(v: &Value) -> String {
    let mut out = String::new();
    for (label, field) in [
        ("client id", "client_id"),
        ("shard", "shard"),
        ("connected", "connected"),
        ("protocol", "protocol"),
        ("keep alive (s)", "keep_alive_s"),
        ("session expiry (s)", "session_expiry_interval_s"),
        ("disconnected for (s)", "disconnected_for_s"),
        ("expires in (s)", "expires_in_s"),
        ("inflight", "inflight"),
        ("queued", "queued"),
        ("will", "has_will"),
    ] {
        out.push_str(&format!("{label:<21} {}\n", cell(&v[field])));
    }
    let subs = v["subscription_list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    out.push_str(&format!("subscriptions ({})\n", subs.len()));
    let rows: Vec<Vec<String>> = subs
        .iter()
        .map(|s| SUB_COLUMNS[1..].iter().map(|(_, f)| cell(&s[*f])).collect())
        .collect();
    let headers: Vec<&str> = SUB_COLUMNS[1..].iter().map(|(h, _)| *h).collect();
    if !rows.is_empty() {
        out.push_str(&table(&headers, &rows));
    }
    out
}

/// Sums of the samples of each metric name in Prometheus text.
fn metric_sums(text: &str) -> std::collections::HashMap<String, f64> {
    let mut sums = std::collections::HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        *sums.entry(line[..name_end].to_owned()).or_insert(0.0) += value;
    }
    sums
}

fn metrics(c: &AdminClient, m: &MetricsArgs, json: bool) -> Result<(), ClientError> {
    let fetch = || {
        c.raw("GET", &["metrics"], &[])
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
    };
    let Some(every) = m.watch else {
        let text = fetch()?;
        if json {
            let sums = metric_sums(&text);
            let mut keys: Vec<_> = sums.keys().collect();
            keys.sort();
            let map: serde_json::Map<String, Value> = keys
                .into_iter()
                .map(|k| (k.clone(), sums[k].into()))
                .collect();
            return print_json(&Value::Object(map));
        }
        return print(&text);
    };
    let every = Duration::from_secs(every.max(1));
    let mut prev: Option<(Instant, std::collections::HashMap<String, f64>)> = None;
    let mut n = 0u64;
    if !json {
        print(&format!(
            "{:>8}  {:>11}  {:>9}  {:>10}  {:>10}  {:>9}  {:>9}  {:>8}\n",
            "TIME(s)",
            "CONNECTIONS",
            "SESSIONS",
            "IN msg/s",
            "OUT msg/s",
            "DROP/s",
            "QUEUED",
            "INFLIGHT"
        ))?;
    }
    let start = Instant::now();
    loop {
        let text = fetch()?;
        let now = Instant::now();
        let s = metric_sums(&text);
        let get = |k: &str| s.get(k).copied().unwrap_or(0.0);
        let rate = |k: &str| match &prev {
            Some((t, p)) => {
                let dt = now.duration_since(*t).as_secs_f64().max(1e-3);
                (get(k) - p.get(k).copied().unwrap_or(0.0)).max(0.0) / dt
            }
            None => 0.0,
        };
        let row = serde_json::json!({
            "time_s": start.elapsed().as_secs(),
            "connections": get("tessera_connections_current"),
            "sessions": get("tessera_sessions"),
            "published_per_s": rate("tessera_messages_published_total"),
            "delivered_per_s": rate("tessera_messages_delivered_total"),
            "dropped_per_s": rate("tessera_messages_dropped_total"),
            "queued": get("tessera_queue_depth"),
            "inflight": get("tessera_inflight_messages"),
        });
        if json {
            print(&format!("{row}\n"))?;
        } else {
            print(&format!(
                "{:>8}  {:>11}  {:>9}  {:>10.1}  {:>10.1}  {:>9.1}  {:>9}  {:>8}\n",
                start.elapsed().as_secs(),
                get("tessera_connections_current"),
                get("tessera_sessions"),
                rate("tessera_messages_published_total"),
                rate("tessera_messages_delivered_total"),
                rate("tessera_messages_dropped_total"),
                get("tessera_queue_depth"),
                get("tessera_inflight_messages"),
            ))?;
        }
        prev = Some((now, s));
        n += 1;
        if m.count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        std::thread::sleep(every);
    }
}

fn tune_check(args: &CheckArgs, json: bool) -> ExitCode {
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
    let text = if json {
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

    #[test]
    fn tables_align_and_sum_metrics() {
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
        let s = metric_sums("# TYPE x counter\nx{a=\"1\"} 2\nx{a=\"2\"} 3.5\ny 1\n");
        assert_eq!(s["x"], 5.5);
        assert_eq!(s["y"], 1.0);
    }
}
