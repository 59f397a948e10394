//! `broker`: the Tessera MQTT server. Starts with zero configuration (MQTT on
//! 127.0.0.1:1883), or with `--config tessera.toml`; see `--help`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tessera_broker::admin::api::AdminState;
use tessera_broker::admin::metrics::Exporter;
use tessera_broker::cli::Cli;
use tessera_broker::cluster::{ClusterNode, ClusterStartError, NodeAddrs};
use tessera_broker::config::{Config, ListenerKind, LogFormat, default_config_toml};
use tessera_broker::server::Server;

/// jemalloc returns the memory of connect storms to the OS; glibc's malloc
/// keeps it fragmented (see `tessera_broker::allocator`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", default_config_toml());
        return ExitCode::SUCCESS;
    }
    let config = match Config::load_from_process(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("broker: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    // Before any thread starts: a panic anywhere ends the process.
    tessera_broker::fatal::install();
    // Before any store is opened: a SIGBUS from a corrupt store file says so.
    tessera_broker::fatal::install_sigbus_message(&config.server.data_dir);
    #[cfg(feature = "jemalloc")]
    if let Err(e) = tessera_broker::allocator::configure(config.limits.memory_release_delay_ms) {
        // The broker works without it; freed memory is then returned later.
        tracing::warn!("cannot configure the allocator: {e}");
    }
    match run(&config, &cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A wrong cluster setting or data dir (another node's id, a peer list that
        // disagrees with the stored one, certificates from another CA): a configuration
        // error, like the ones above.
        Err(e) if e.downcast_ref::<ClusterStartError>().is_some() => {
            eprintln!("broker: configuration error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // rustls warns per connection about client quirks it tolerates
        // (e.g. an IP address sent as SNI by mosquitto clients); refused
        // handshakes are logged by the broker itself.
        // The client lines (`tessera::clients`) only when `log.clients` asks for them.
        let clients = if config.log.clients {
            ""
        } else {
            ",tessera::clients=off"
        };
        tracing_subscriber::EnvFilter::new(format!("{},rustls=error{clients}", config.log.level))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(config: &Config, cli: &Cli) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let started = std::time::Instant::now();
    // Bound before the shards boot, so a busy admin port fails start-up at once.
    let admin_addr = config.server.admin_listen;
    let admin_listener = std::net::TcpListener::bind(admin_addr).with_context(|| {
        format!(
            "cannot listen on server.admin_listen = {admin_addr} (the admin API and \
             /metrics); choose another address with --admin-listen"
        )
    })?;
    let server = Server::start(config)?;
    let cluster = if config.cluster.enabled() {
        let addrs = NodeAddrs {
            mqtt: server.mqtt_addrs.first().copied(),
            admin: admin_listener.local_addr()?,
            shards: server.shards(),
        };
        match ClusterNode::start(
            &config.cluster,
            &config.server.data_dir,
            addrs,
            server.peer_request_queues(),
            std::time::Duration::from_millis(u64::from(config.limits.backpressure_hold_ms_max)),
        ) {
            Ok(node) => {
                server.attach_cluster(&node.port());
                if let Some((mut ends, remote, clocks)) = server.take_forwarder()
                    && let Err(e) = {
                        // A route barrier waits out an unreachable member's lease; so
                        // does a peer's sender before it hints its batches.
                        ends.set_unanswered_wait(config.cluster.session_lease());
                        let budget = config.cluster.hint_budget_bytes;
                        match (budget > 0)
                            .then(|| {
                                tessera_broker::forward::open_hints(&config.server.data_dir, budget)
                            })
                            .transpose()
                        {
                            Ok(hints) => {
                                if let Some((store, earlier)) = hints {
                                    ends.set_hints(store, earlier);
                                }
                                node.start_forwarder(ends, remote, clocks)
                            }
                            Err(e) => Err(e.to_string()),
                        }
                    }
                {
                    server.stop();
                    let _ = server.join();
                    node.stop();
                    anyhow::bail!("cluster: cannot start the forwarder: {e}");
                }
                Some(std::sync::Arc::new(node))
            }
            Err(e) => {
                server.stop();
                let _ = server.join();
                return Err(e.into());
            }
        }
    } else {
        None
    };
    let token = config.server.admin_token.clone();
    let state = AdminState {
        exporter: Exporter::new(
            server.shards(),
            server.connections_max as u64,
            server.store_stats.clone(),
            server.read_budget.clone(),
        )
        .with_listeners(&server.urls)
        .with_quic(server.quic_counters())
        .with_certificates(
            server.tls_store(),
            cluster.as_ref().and_then(|c| c.cert_not_after()),
        ),
        links: server.admin_links.clone(),
        token: (!token.is_empty()).then_some(token),
        started,
        auth: Some(server.auth_hub()),
        cluster: cluster.clone(),
        bridges: Some(server.bridges.clone()),
        listeners: server.urls.clone(),
    };
    let admin_addr = tessera_broker::admin::spawn(admin_listener, state)?;
    // Scripts and tests wait for these lines; keep their shape. The admin
    // line comes first: the listening line means everything is up.
    println!("tessera: admin http://{admin_addr}");
    // The other kinds first: scripts and tests read up to the first mqtt:// line.
    for (kind, url) in &server.urls {
        if *kind != ListenerKind::Mqtt {
            println!("tessera: listening {url}");
        }
    }
    for addr in &server.mqtt_addrs {
        println!("tessera: listening mqtt://{addr}");
    }
    tracing::info!(shards = server.shards(), "broker ready");
    for sig in signals.forever() {
        if sig == SIGHUP {
            // Reload what can change without a restart; a bad file is logged
            // and the running configuration stays.
            match server.reload_tls() {
                Ok(n) => tracing::info!(tls_listeners = n, "SIGHUP: TLS certificates reloaded"),
                Err(e) => tracing::error!(
                    "SIGHUP: TLS reload failed, keeping the current certificates: {e:#}"
                ),
            }
            // And the password, ACL, ban and JWT key files.
            server.reload_auth();
            // And the [[bridge]] tables of the config file (other settings
            // need a restart).
            match Config::load_from_process(cli) {
                Ok(c) => {
                    server.bridges.replace(&c.bridge);
                    tracing::info!(bridges = c.bridge.len(), "SIGHUP: bridges reloaded");
                }
                Err(e) => tracing::error!(
                    "SIGHUP: the config file is invalid, keeping the current bridges: {e}"
                ),
            }
            continue;
        }
        tracing::info!(signal = sig, "shutting down");
        break;
    }
    if let Some(cluster) = &cluster {
        cluster.stop();
    }
    server.stop();
    server.join()
}
