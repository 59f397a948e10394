//! The `broker` command line. These flags are a stable interface: scripts, systemd units
//! and container images depend on them, so rename or remove one only with a deprecation.
//!
//! Flags override the config file and `TESSERA_*` environment variables (see
//! [`crate::config`] for the full precedence order).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::config::LogLevel;

/// Command-line flags of the `broker` binary.
#[derive(Debug, Clone, Default, PartialEq, Parser)]
#[command(name = "broker", version, about = "Tessera MQTT broker")]
pub struct Cli {
    /// MQTT over TCP listen address; repeat for several. Replaces `server.listen`.
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,

    /// Directory for persistent state (one store per shard). Sets `server.data_dir`.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Number of shards (one per CPU); default one per CPU this process may use.
    /// Sets `server.shards`.
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,

    /// Admin HTTP API and /metrics listen address. Sets `server.admin_listen`.
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin_listen: Option<SocketAddr>,

    /// TOML configuration file. Without it, built-in defaults are used.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the default configuration as documented TOML and exit.
    #[arg(long)]
    pub print_default_config: bool,

    /// Log level: error, warn, info, debug or trace. Sets `log.level`.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,

    /// This node's id in a cluster. Sets `cluster.node_id`.
    #[arg(long, value_name = "N")]
    pub node_id: Option<u64>,

    /// UDP address of the cluster link (QUIC). Sets `cluster.listen`.
    #[arg(long, value_name = "ADDR:PORT")]
    pub cluster_listen: Option<SocketAddr>,

    /// The initial voters, the same list on every initial node. Sets `cluster.peers`.
    #[arg(
        long,
        value_name = "1=ADDR:PORT,2=ADDR:PORT,...",
        value_delimiter = ','
    )]
    pub cluster_peers: Vec<String>,

    /// Directory with the cluster CA and this node's certificate. Sets `cluster.certs`.
    #[arg(long, value_name = "DIR")]
    pub cluster_certs: Option<PathBuf>,

    /// Join the running cluster that has a member at this cluster address. Sets
    /// `cluster.join`.
    #[arg(long, value_name = "ADDR:PORT")]
    pub join: Option<SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_every_flag() {
        let cli = Cli::try_parse_from([
            "broker",
            "--listen",
            "127.0.0.1:1883",
            "--listen",
            "[::1]:1884",
            "--data-dir",
            "/var/lib/tessera",
            "--shards",
            "2",
            "--admin-listen",
            "0.0.0.0:18083",
            "--config",
            "/etc/tessera.toml",
            "--print-default-config",
            "--log-level",
            "debug",
            "--node-id",
            "2",
            "--cluster-listen",
            "127.0.0.1:7001",
            "--cluster-peers",
            "1=127.0.0.1:7000,2=127.0.0.1:7001",
            "--cluster-certs",
            "/etc/tessera/certs",
            "--join",
            "127.0.0.1:7000",
        ])
        .unwrap();
        assert_eq!(
            cli.listen,
            vec![
                "127.0.0.1:1883".parse::<std::net::SocketAddr>().unwrap(),
                "[::1]:1884".parse::<std::net::SocketAddr>().unwrap()
            ]
        );
        assert_eq!(cli.data_dir, Some(PathBuf::from("/var/lib/tessera")));
        assert_eq!(cli.shards, Some(2));
        assert_eq!(
            cli.admin_listen,
            Some("0.0.0.0:18083".parse::<std::net::SocketAddr>().unwrap())
        );
        assert_eq!(cli.config, Some(PathBuf::from("/etc/tessera.toml")));
        assert!(cli.print_default_config);
        assert_eq!(cli.log_level, Some(LogLevel::Debug));
        assert_eq!(cli.node_id, Some(2));
        assert_eq!(
            cli.cluster_peers,
            vec!["1=127.0.0.1:7000", "2=127.0.0.1:7001"]
        );
        assert_eq!(cli.cluster_certs, Some(PathBuf::from("/etc/tessera/certs")));
        assert_eq!(
            cli.join,
            Some("127.0.0.1:7000".parse::<std::net::SocketAddr>().unwrap())
        );
    }

    #[test]
    fn no_flags_means_nothing_overridden() {
        assert_eq!(Cli::try_parse_from(["broker"]).unwrap(), Cli::default());
    }

    #[test]
    fn bad_flag_values_are_rejected_with_accepted_values() {
        let err = Cli::try_parse_from(["broker", "--log-level", "loud"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("error, warn, info, debug, trace"), "{msg}");
        assert!(Cli::try_parse_from(["broker", "--listen", "localhost"]).is_err());
        assert!(Cli::try_parse_from(["broker", "--shards", "-1"]).is_err());
    }
}
