//! Command-line interface: one module per subcommand; shared flags become a validated [`Config`].

pub mod fetch;
pub mod publish;
pub mod serve;
pub mod status;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Overrides};

#[derive(Debug, Parser)]
#[command(
    name = "pool-helper",
    version,
    about = "Publish libvirt master volumes as torrents; fetch missing masters from peers, verified, and seed them on"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub cmd: Command,
}

/// Options every command takes.
#[derive(Debug, Args, Clone, Default)]
pub struct GlobalArgs {
    /// TOML configuration file (keys: see docs/pool-helper.md).
    #[arg(long, global = true, env = "POOL_HELPER_CONFIG")]
    pub config: Option<PathBuf>,
    /// State directory (records, published manifests, staging when on the pool's filesystem) [default: /var/lib/pool-helper].
    #[arg(long, global = true, env = "POOL_HELPER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Control socket [default: /run/pool-helper/control.sock, or <state-dir>/control.sock with another --state-dir].
    #[arg(long, global = true)]
    pub control_socket: Option<PathBuf>,
    /// Fixed BitTorrent listen port (TCP) [default: 6881].
    #[arg(long, global = true)]
    pub listen_port: Option<u16>,
    /// Host name or address other hosts reach us at (written into manifests) [default: host name].
    #[arg(long, global = true)]
    pub advertise: Option<String>,
    /// A peer HOST:PORT to try for every master (repeatable).
    #[arg(long = "peer", global = true)]
    pub peers: Vec<String>,
    /// A tracker URL, http:// or udp:// (repeatable).
    #[arg(long = "tracker", global = true)]
    pub trackers: Vec<String>,
    /// Upload limit, bytes/s.
    #[arg(long, global = true)]
    pub upload_limit: Option<u32>,
    /// Download limit, bytes/s.
    #[arg(long, global = true)]
    pub download_limit: Option<u32>,
    /// Enable the DHT (off by default: closed datacenter).
    #[arg(long, global = true)]
    pub dht: bool,
    /// Disable local service discovery (BEP 14).
    #[arg(long, global = true)]
    pub no_lsd: bool,
    /// Seed every master advertising all pieces at once, instead of super-seeding (BEP 16:
    /// a few pieces offered to each peer at a time, the least spread first).
    #[arg(long, global = true)]
    pub no_super_seed: bool,
    /// 16 KiB chunk requests kept outstanding per peer [default: 16]. Every peer's requests
    /// queue at the uploader, so a deep window delays fresh pieces behind old ones; more helps
    /// only a transfer between few peers over a long round trip (window / RTT per peer).
    #[arg(long, global = true, value_name = "CHUNKS")]
    pub request_window: Option<usize>,
    /// Seconds between the daemon's looks at libvirt for masters that defined domains need
    /// (prefetched before their first start) and pools holding overlays the hook made (refreshed);
    /// 0 turns it off [default: 10].
    #[arg(long, global = true, value_name = "SECS")]
    pub watch_interval: Option<u64>,
    /// libvirt URI [default: qemu:///system].
    #[arg(long, global = true)]
    pub connect: Option<String>,
    /// Machine-readable output (JSON, or JSON Lines for streams).
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging on stderr (-v info, -vv debug, -vvv trace); VIRT_CLONE_COW_LOG overrides
    /// (RUST_LOG still works when it is unset, deprecated).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make VOLUME of POOL an immutable master: read-only, hashed, .torrent + manifest; the daemon seeds it.
    Publish(publish::PublishArgs),
    /// Get the master described by MANIFEST into POOL from peers, verified (through the daemon if it runs).
    Fetch(fetch::FetchArgs),
    /// Run the daemon: seed every master, answer the control socket.
    Serve,
    /// What is seeded, fetching (progress, peers, rates) and failed, and why.
    Status,
    /// Masters known to the daemon: names, paths, states.
    List,
}

/// Errors the CLI reports (one line, chain included) and their exit codes.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Publish(#[from] crate::publish::PublishError),
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error(transparent)]
    Client(#[from] vcc_core::control::client::ClientError),
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    #[error(transparent)]
    Torrent(#[from] crate::torrent::TorrentError),
    #[error("{0}")]
    Failed(String),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

impl GlobalArgs {
    pub fn config(&self) -> Result<Config, CliError> {
        let o = Overrides {
            config: self.config.clone(),
            state_dir: self.state_dir.clone(),
            control_socket: self.control_socket.clone(),
            listen_port: self.listen_port,
            advertise: self.advertise.clone(),
            peers: self.peers.clone(),
            trackers: self.trackers.clone(),
            upload_limit: self.upload_limit,
            download_limit: self.download_limit,
            dht: self.dht,
            no_lsd: self.no_lsd,
            no_super_seed: self.no_super_seed,
            request_window: self.request_window,
            libvirt_uri: self.connect.clone(),
            watch_interval: self.watch_interval,
        };
        Ok(Config::load(&o)?)
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(CliError::Runtime)
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    let cfg = cli.global.config()?;
    match cli.cmd {
        Command::Publish(a) => publish::run(&cfg, &a, cli.global.json),
        Command::Fetch(a) => fetch::run(&cfg, &a, cli.global.json),
        Command::Serve => serve::run(cfg),
        Command::Status => status::run(&cfg, cli.global.json, false),
        Command::List => status::run(&cfg, cli.global.json, true),
    }
}
