//! Command-line interface: one module per subcommand; shared flags become a validated [`Config`].

pub mod catalog;
pub mod fetch;
pub mod progress;
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
    about = "Publish libvirt master volumes as torrents; fetch missing masters from peers, verified, and seed them on",
    after_help = "Configuration: /etc/pool-helper/config.toml when it exists, or --config FILE; flags override it.\n\
                  BitTorrent flags (--listen-port, --peer, --tracker, ...) are listed under the subcommands that use \
                  them: pool-helper serve --help."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The subcommands' flags given before the subcommand (`pool-helper --listen-port 7000 serve`),
    /// as every version accepted them; hidden here, documented under each subcommand.
    #[command(flatten)]
    pub early: Hidden<ServeArgs>,
    #[command(subcommand)]
    pub cmd: Command,
}

/// Flags `T` accepted by a command but left out of its help (clap's `hide`, for a whole group).
#[derive(Debug, Clone, Default)]
pub struct Hidden<T>(pub T);

impl<T: clap::FromArgMatches> clap::FromArgMatches for Hidden<T> {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches(m).map(Hidden)
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(m)
    }
}

impl<T: Args> Args for Hidden<T> {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        hide_added(cmd, T::augment_args)
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        hide_added(cmd, T::augment_args_for_update)
    }
    fn group_id() -> Option<clap::Id> {
        T::group_id()
    }
}

/// `add(cmd)`, with the arguments `add` added hidden.
fn hide_added(cmd: clap::Command, add: fn(clap::Command) -> clap::Command) -> clap::Command {
    let before: Vec<clap::Id> = cmd.get_arguments().map(|a| a.get_id().clone()).collect();
    add(cmd).mut_args(|a| {
        let new = !before.contains(a.get_id());
        a.hide(new)
    })
}

/// Options every command takes.
#[derive(Debug, Args, Clone, Default)]
pub struct GlobalArgs {
    /// TOML configuration file [default: /etc/pool-helper/config.toml when it exists] (keys: see
    /// docs/pool-helper.md; unknown keys are an error).
    #[arg(long, global = true, env = "POOL_HELPER_CONFIG")]
    pub config: Option<PathBuf>,
    /// State directory (records, published manifests, staging when on the pool's filesystem) [default: /var/lib/pool-helper].
    #[arg(long, global = true, env = "POOL_HELPER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Control socket [default: /run/pool-helper/control.sock, or <state-dir>/control.sock with another --state-dir].
    #[arg(long, global = true)]
    pub control_socket: Option<PathBuf>,
    /// libvirt URI [default: qemu:///system].
    #[arg(long, global = true)]
    pub connect: Option<String>,
    /// ed25519 OpenSSH key signing published manifests.
    #[arg(long, global = true, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// Allowed-signers file: whom the LAN catalog trusts.
    #[arg(long, global = true, value_name = "FILE")]
    pub allowed_signers: Option<PathBuf>,
    /// Machine-readable output (JSON, or JSON Lines for streams).
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging on stderr (-v info, -vv debug, -vvv trace); VIRT_CLONE_COW_LOG overrides
    /// (RUST_LOG still works when it is unset, deprecated).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Where a master is announced: written into the manifests `publish` makes, and used by the
/// BitTorrent session of `serve` and `fetch`.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "BitTorrent")]
pub struct AnnounceArgs {
    /// Fixed BitTorrent listen port (TCP) [default: 6881].
    #[arg(long)]
    pub listen_port: Option<u16>,
    /// Host name or address other hosts reach us at (written into manifests) [default: host name].
    #[arg(long)]
    pub advertise: Option<String>,
    /// A peer HOST:PORT to try for every master (repeatable).
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// A tracker URL, http:// or udp:// (repeatable).
    #[arg(long = "tracker")]
    pub trackers: Vec<String>,
}

/// How the BitTorrent session behaves (`serve`, `fetch`).
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "BitTorrent")]
pub struct SessionArgs {
    /// Upload limit, bytes/s.
    #[arg(long)]
    pub upload_limit: Option<u32>,
    /// Download limit, bytes/s.
    #[arg(long)]
    pub download_limit: Option<u32>,
    /// Enable the DHT (off by default: closed datacenter).
    #[arg(long)]
    pub dht: bool,
    /// Disable local service discovery (BEP 14).
    #[arg(long)]
    pub no_lsd: bool,
    /// Seed every master advertising all pieces at once, instead of super-seeding (BEP 16:
    /// a few pieces offered to each peer at a time, the least spread first).
    #[arg(long)]
    pub no_super_seed: bool,
    /// 16 KiB chunk requests kept outstanding per peer [default: 16]. Every peer's requests
    /// queue at the uploader, so a deep window delays fresh pieces behind old ones; more helps
    /// only a transfer between few peers over a long round trip (window / RTT per peer).
    #[arg(long, value_name = "CHUNKS")]
    pub request_window: Option<usize>,
}

/// `serve`'s own flags.
#[derive(Debug, Args, Clone, Default)]
pub struct WatchArgs {
    /// Seconds between the daemon's looks at libvirt for masters that defined domains need
    /// (prefetched before their first start) and pools holding overlays the hook made (refreshed);
    /// 0 turns it off [default: 10].
    #[arg(long, value_name = "SECS")]
    pub watch_interval: Option<u64>,
    /// Lazy masters: serve a missing master's verified pieces over NBD to a clone that starts
    /// before the master is complete (docs/lazy.md); the config's `lazy = true` does the same.
    #[arg(long)]
    pub lazy: bool,
}

/// `serve`'s flags, which are every subcommand flag: also the set accepted (hidden) before the
/// subcommand.
#[derive(Debug, Args, Clone, Default)]
pub struct ServeArgs {
    #[command(flatten)]
    pub announce: AnnounceArgs,
    #[command(flatten)]
    pub session: SessionArgs,
    #[command(flatten)]
    pub watch: WatchArgs,
}

impl ServeArgs {
    /// These flags, then `later` (given after the subcommand): a later value wins, lists add up.
    fn and(&self, later: &ServeArgs) -> ServeArgs {
        let (a, b) = (&self.announce, &later.announce);
        let (s, t) = (&self.session, &later.session);
        ServeArgs {
            announce: AnnounceArgs {
                listen_port: b.listen_port.or(a.listen_port),
                advertise: b.advertise.clone().or_else(|| a.advertise.clone()),
                peers: a.peers.iter().chain(&b.peers).cloned().collect(),
                trackers: a.trackers.iter().chain(&b.trackers).cloned().collect(),
            },
            session: SessionArgs {
                upload_limit: t.upload_limit.or(s.upload_limit),
                download_limit: t.download_limit.or(s.download_limit),
                dht: s.dht || t.dht,
                no_lsd: s.no_lsd || t.no_lsd,
                no_super_seed: s.no_super_seed || t.no_super_seed,
                request_window: t.request_window.or(s.request_window),
            },
            watch: WatchArgs {
                watch_interval: later.watch.watch_interval.or(self.watch.watch_interval),
                lazy: later.watch.lazy || self.watch.lazy,
            },
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make VOLUME of POOL an immutable master: read-only, hashed, .torrent + manifest; the daemon seeds it.
    Publish(publish::PublishArgs),
    /// Get the master described by MANIFEST into POOL from peers, verified (through the daemon if it runs).
    Fetch(fetch::FetchArgs),
    /// Run the daemon: seed every master, answer the control socket.
    Serve(ServeArgs),
    /// What is seeded, fetching (progress, peers, rates, the domains whose start waits) and failed, and why.
    Status(status::StatusArgs),
    /// Masters known to the daemon: names, paths, states.
    List,
    /// What the LAN offers: signed masters other daemons announce (name, sha256, info-hash, signer, hosts).
    Catalog,
}

impl Command {
    /// The subcommand's own flags, in the shape of [`ServeArgs`].
    fn flags(&self) -> ServeArgs {
        match self {
            Command::Publish(a) => ServeArgs { announce: a.announce.clone(), ..Default::default() },
            Command::Fetch(a) => {
                ServeArgs { announce: a.announce.clone(), session: a.session.clone(), ..Default::default() }
            }
            Command::Serve(a) => a.clone(),
            Command::Status(_) | Command::List | Command::Catalog => ServeArgs::default(),
        }
    }
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
    #[error(transparent)]
    Announce(#[from] crate::announce::AnnounceError),
    #[error("{0}")]
    Failed(String),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

impl Cli {
    /// The subcommand flags given before the subcommand, then after it.
    pub fn flags(&self) -> ServeArgs {
        self.early.0.and(&self.cmd.flags())
    }

    /// The validated configuration: the config file, then the flags.
    pub fn config(&self) -> Result<Config, CliError> {
        let g = &self.global;
        let f = self.flags();
        let o = Overrides {
            config: g.config.clone(),
            state_dir: g.state_dir.clone(),
            control_socket: g.control_socket.clone(),
            listen_port: f.announce.listen_port,
            advertise: f.announce.advertise,
            peers: f.announce.peers,
            trackers: f.announce.trackers,
            upload_limit: f.session.upload_limit,
            download_limit: f.session.download_limit,
            dht: f.session.dht,
            no_lsd: f.session.no_lsd,
            no_super_seed: f.session.no_super_seed,
            request_window: f.session.request_window,
            libvirt_uri: g.connect.clone(),
            watch_interval: f.watch.watch_interval,
            signing_key: g.signing_key.clone(),
            allowed_signers: g.allowed_signers.clone(),
            lazy: f.watch.lazy,
        };
        Ok(Config::load(&o)?)
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(CliError::Runtime)
}

/// At most two glibc malloc arenas, set before the runtime starts its threads. glibc gives a
/// thread that finds the arenas busy a new one (up to 8 per core), each keeping its own freed
/// memory: with tokio's workers and blocking threads passing 16 KiB chunks between them, that is
/// a few MiB of peak RSS per fetch for no speed (issue 14 item 1, docs/benchmarks/pool-helper.md).
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt sets a malloc tunable; it takes no pointers and is safe at any time.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    let cfg = cli.config()?;
    match cli.cmd {
        Command::Publish(a) => publish::run(&cfg, &a, cli.global.json),
        Command::Fetch(a) => fetch::run(&cfg, &a, cli.global.json),
        Command::Serve(_) => serve::run(cfg),
        Command::Status(a) => status::watch(&cfg, cli.global.json, a.watch),
        Command::List => status::run(&cfg, cli.global.json, true),
        Command::Catalog => catalog::run(&cfg, cli.global.json),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("pool-helper").chain(args.iter().copied())).unwrap()
    }

    fn help(args: &[&str]) -> String {
        let e = Cli::try_parse_from(std::iter::once("pool-helper").chain(args.iter().copied())).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        e.to_string()
    }

    #[test]
    fn bittorrent_flags_are_listed_only_under_the_subcommands_that_use_them() {
        Cli::command().debug_assert();
        let status = help(&["status", "--help"]);
        assert!(status.contains("--state-dir") && status.contains("--json"), "{status}");
        // An option's line starts with its flag.
        let lists = |help: &str, flag: &str| help.lines().any(|l| l.trim_start().starts_with(flag));
        for flag in ["--listen-port", "--peer", "--tracker", "--upload-limit", "--dht", "--request-window"] {
            assert!(!lists(&status, flag), "status --help shows {flag}: {status}");
            assert!(!lists(&help(&["--help"]), flag), "the top-level help shows {flag}");
            assert!(lists(&help(&["serve", "--help"]), flag), "serve --help lacks {flag}");
            assert!(lists(&help(&["fetch", "--help"]), flag), "fetch --help lacks {flag}");
        }
        assert!(lists(&help(&["serve", "--help"]), "--watch-interval"));
        let publish = help(&["publish", "--help"]);
        assert!(lists(&publish, "--advertise") && lists(&publish, "--tracker") && !lists(&publish, "--dht"));
        // The global options only (eight of them, two lines each), no BitTorrent ones.
        assert!(status.lines().count() < 30, "{status}");
    }

    #[test]
    fn status_watch_takes_an_optional_period() {
        let watch = |args: &[&str]| match parse(args).cmd {
            Command::Status(a) => a.watch,
            other => panic!("{other:?}"),
        };
        assert_eq!(watch(&["status"]), None);
        assert_eq!(watch(&["status", "--watch"]), Some(2));
        assert_eq!(watch(&["status", "--watch", "5"]), Some(5));
        assert_eq!(watch(&["--json", "status", "--watch"]), Some(2));
    }

    #[test]
    fn flags_before_the_subcommand_still_work_and_add_up_with_those_after_it() {
        // tests/support/pool_helpers.rs, tests/lab/*.py and tests/bench/* put them first.
        let cli = parse(&[
            "--state-dir",
            "/tmp/s",
            "--listen-port",
            "7000",
            "--advertise",
            "127.0.0.1",
            "--no-lsd",
            "--watch-interval",
            "0",
            "--peer",
            "10.0.0.1:1",
            "-v",
            "serve",
            "--peer",
            "10.0.0.2:2",
            "--listen-port",
            "7001",
        ]);
        assert!(matches!(cli.cmd, Command::Serve(_)));
        let f = cli.flags();
        assert_eq!(f.announce.listen_port, Some(7001), "after the subcommand wins");
        assert_eq!(f.announce.peers, ["10.0.0.1:1", "10.0.0.2:2"]);
        assert_eq!(f.announce.advertise.as_deref(), Some("127.0.0.1"));
        assert!(f.session.no_lsd);
        assert_eq!(f.watch.watch_interval, Some(0));
        assert_eq!(cli.global.verbose, 1);
        let cli = parse(&["--listen-port", "7000", "--upload-limit", "5", "--json", "status"]);
        assert_eq!((cli.flags().announce.listen_port, cli.flags().session.upload_limit), (Some(7000), Some(5)));
        assert!(cli.global.json);
        let cli = parse(&["fetch", "--pool", "p", "m.json", "--tracker", "udp://t:1", "--dht", "--json"]);
        assert!(cli.flags().session.dht && cli.global.json);
        assert_eq!(cli.flags().announce.trackers, ["udp://t:1"]);
    }
}
