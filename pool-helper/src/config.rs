//! Configuration: one TOML file, overridden by flags. The file is `--config FILE` (or
//! `$POOL_HELPER_CONFIG`), else [`DEFAULT_CONFIG`] when it exists. Every key is documented in
//! `docs/pool-helper.md` and, commented out, in the packaged default file
//! (`packaging/config.toml`).

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Read when no `--config` is given and the file exists (the package installs it, every key
/// commented out).
pub const DEFAULT_CONFIG: &str = "/etc/pool-helper/config.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pool-helper";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/pool-helper/control.sock";
pub const DEFAULT_LISTEN_PORT: u16 = 6881;
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 2 << 40;
/// UDP port of the LAN catalog's announcements (multicast group [`crate::announce::GROUP`]).
pub const DEFAULT_CATALOG_PORT: u16 = 6779;
/// Seconds between a daemon's announcements of the signed masters it seeds.
pub const DEFAULT_ANNOUNCE_INTERVAL: u64 = 30;
/// A config file is read only if it is a regular file of at most this many bytes.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The TOML file, every key optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub state_dir: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub listen_port: Option<u16>,
    /// Address other hosts reach us at (written into manifests as a peer hint).
    pub advertise: Option<String>,
    #[serde(default)]
    pub peers: Vec<String>,
    #[serde(default)]
    pub trackers: Vec<String>,
    pub upload_limit: Option<u32>,
    pub download_limit: Option<u32>,
    pub dht: Option<bool>,
    pub lsd: Option<bool>,
    pub super_seed: Option<bool>,
    pub request_window: Option<usize>,
    pub libvirt_uri: Option<String>,
    pub max_virtual_size: Option<u64>,
    pub qemu_img_check: Option<bool>,
    /// Seconds without progress before a fetch is declared stalled.
    pub stall_timeout: Option<u64>,
    /// Seconds between looks at libvirt for masters defined domains need (0: never look).
    pub watch_interval: Option<u64>,
    /// OpenSSH ed25519 private key that signs the manifests this host publishes.
    pub signing_key: Option<PathBuf>,
    /// ssh-keygen allowed-signers file: whose signed manifests the LAN catalog trusts.
    pub allowed_signers: Option<PathBuf>,
    /// Announce signed masters to the LAN and listen for others' announcements.
    pub catalog: Option<bool>,
    pub catalog_port: Option<u16>,
    pub announce_interval: Option<u64>,
    /// Serve a missing master's verified pieces over NBD while it arrives (docs/lazy.md).
    pub lazy: Option<bool>,
    /// Seconds a lazy read waits for its pieces before the guest gets an I/O error.
    pub lazy_read_timeout: Option<u64>,
}

impl FileConfig {
    /// Reads a config file as any file handed in: regular files only, at most
    /// [`MAX_CONFIG_BYTES`], never blocking on a FIFO (`manifest::read_bounded`).
    pub fn read(p: &Path) -> Result<FileConfig, ConfigError> {
        let read = |source| ConfigError::Read { path: p.display().to_string(), source };
        let bytes =
            crate::manifest::read_bounded(p, MAX_CONFIG_BYTES, crate::manifest::MANIFEST_READ_TIMEOUT).map_err(read)?;
        let text = String::from_utf8(bytes)
            .map_err(|e| read(crate::manifest::ReadError::Io(std::io::Error::other(e.utf8_error()))))?;
        toml::from_str::<FileConfig>(&text)
            .map_err(|e| ConfigError::Parse { path: p.display().to_string(), source: TomlError(e) })
    }
}

/// Flags shared by every command (`None`: not given).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub listen_port: Option<u16>,
    pub advertise: Option<String>,
    pub peers: Vec<String>,
    pub trackers: Vec<String>,
    pub upload_limit: Option<u32>,
    pub download_limit: Option<u32>,
    pub dht: bool,
    pub no_lsd: bool,
    pub no_super_seed: bool,
    pub request_window: Option<usize>,
    pub libvirt_uri: Option<String>,
    pub watch_interval: Option<u64>,
    pub signing_key: Option<PathBuf>,
    pub allowed_signers: Option<PathBuf>,
    /// `--lazy`: lazy masters on (the config's `lazy = true`).
    pub lazy: bool,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub listen_port: u16,
    pub advertise: Option<String>,
    pub peers: Vec<String>,
    pub trackers: Vec<String>,
    pub upload_limit: Option<u32>,
    pub download_limit: Option<u32>,
    pub dht: bool,
    pub lsd: bool,
    /// Seed in super-seeding mode (BEP 16). Default: on, off when `lazy` is on.
    pub super_seed: bool,
    /// 16 KiB chunk requests kept outstanding per peer (1-1024).
    pub request_window: usize,
    pub libvirt_uri: Option<String>,
    pub max_virtual_size: u64,
    pub qemu_img_check: bool,
    pub stall_timeout: u64,
    /// Seconds between looks at libvirt (prefetch, pool refresh); 0 turns it off.
    pub watch_interval: u64,
    /// Signs published manifests (`NAME.json.sig`) when set.
    pub signing_key: Option<PathBuf>,
    /// The keys the LAN catalog trusts; without it nothing is trusted (and nothing heard).
    pub allowed_signers: Option<PathBuf>,
    /// Announcing and listening on the LAN (docs/many-hosts.md section 3).
    pub catalog: bool,
    pub catalog_port: u16,
    /// Seconds between announcements (after the three of the first two seconds).
    pub announce_interval: u64,
    /// Lazy masters: `export` requests are served (docs/lazy.md). Off by default.
    pub lazy: bool,
    /// Seconds a lazy read waits for its pieces (1-600).
    pub lazy_read_timeout: u64,
}

/// How long a lazy read waits for its pieces by default.
pub const DEFAULT_LAZY_READ_TIMEOUT: u64 = 60;

/// 16 KiB requests outstanding per peer. librqbit's own default, 128, queued 2 MiB per peer at
/// every uploader; in the lab (8 hosts, 256 MiB, 100 Mbit/s) 16 took 24.8 s against 27.0-28.0 s,
/// and at 25 Mbit/s 24.8 s against 34.1 s (docs/lab/README.md).
pub const DEFAULT_REQUEST_WINDOW: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file '{path}'")]
    Read {
        path: String,
        #[source]
        source: crate::manifest::ReadError,
    },
    #[error("config file '{path}'")]
    Parse {
        path: String,
        #[source]
        source: TomlError,
    },
    #[error(transparent)]
    Peer(#[from] crate::manifest::PeerError),
    #[error("{0}")]
    Invalid(String),
}

/// A TOML parse error shown as its one-line message (its own `Display` adds a multi-line excerpt
/// of the file).
#[derive(Debug)]
pub struct TomlError(pub toml::de::Error);

impl std::fmt::Display for TomlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.message())
    }
}

impl std::error::Error for TomlError {}

impl Config {
    pub fn load(o: &Overrides) -> Result<Config, ConfigError> {
        Self::load_with_default(o, Path::new(DEFAULT_CONFIG))
    }

    /// [`Config::load`] with another default file (tests). `--config` replaces the default file;
    /// a missing default file is no error, a missing `--config` file is.
    pub fn load_with_default(o: &Overrides, default: &Path) -> Result<Config, ConfigError> {
        let file = match &o.config {
            Some(p) => FileConfig::read(p)?,
            None => match std::fs::symlink_metadata(default) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileConfig::default(),
                _ => FileConfig::read(default)?,
            },
        };
        Self::merge(file, o)
    }

    pub fn merge(f: FileConfig, o: &Overrides) -> Result<Config, ConfigError> {
        let state_dir = o.state_dir.clone().or(f.state_dir).unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let control_socket = o.control_socket.clone().or(f.control_socket).unwrap_or_else(|| {
            if state_dir == Path::new(DEFAULT_STATE_DIR) {
                DEFAULT_CONTROL_SOCKET.into()
            } else {
                state_dir.join("control.sock")
            }
        });
        let mut peers = f.peers;
        peers.extend(o.peers.iter().cloned());
        let mut trackers = f.trackers;
        trackers.extend(o.trackers.iter().cloned());
        for p in &peers {
            crate::manifest::parse_peer(p)?;
        }
        for t in &trackers {
            if !(t.starts_with("http://") || t.starts_with("https://") || t.starts_with("udp://")) {
                return Err(ConfigError::Invalid(format!("tracker '{t}' is not an http(s):// or udp:// URL")));
            }
        }
        let listen_port = o.listen_port.or(f.listen_port).unwrap_or(DEFAULT_LISTEN_PORT);
        if listen_port == 0 {
            return Err(ConfigError::Invalid("listen port 0: a seeder needs a fixed port".into()));
        }
        let request_window = o.request_window.or(f.request_window).unwrap_or(DEFAULT_REQUEST_WINDOW);
        if !(1..=1024).contains(&request_window) {
            return Err(ConfigError::Invalid(format!(
                "request window {request_window}: give 1 to 1024 chunks (the default is {DEFAULT_REQUEST_WINDOW})"
            )));
        }
        let catalog_port = f.catalog_port.unwrap_or(DEFAULT_CATALOG_PORT);
        if catalog_port == 0 {
            return Err(ConfigError::Invalid("catalog_port 0: announcements need a fixed port".into()));
        }
        let announce_interval = f.announce_interval.unwrap_or(DEFAULT_ANNOUNCE_INTERVAL);
        if !(1..=3600).contains(&announce_interval) {
            return Err(ConfigError::Invalid(format!(
                "announce_interval {announce_interval}: give 1 to 3600 seconds (the default is {DEFAULT_ANNOUNCE_INTERVAL})"
            )));
        }
        let lazy_read_timeout = f.lazy_read_timeout.unwrap_or(DEFAULT_LAZY_READ_TIMEOUT);
        if !(1..=600).contains(&lazy_read_timeout) {
            return Err(ConfigError::Invalid(format!(
                "lazy_read_timeout {lazy_read_timeout}: give 1 to 600 seconds (the default is {DEFAULT_LAZY_READ_TIMEOUT})"
            )));
        }
        let lazy = o.lazy || f.lazy.unwrap_or(false);
        Ok(Config {
            state_dir,
            control_socket,
            listen_port,
            advertise: o.advertise.clone().or(f.advertise),
            peers,
            trackers,
            upload_limit: o.upload_limit.or(f.upload_limit).filter(|&v| v > 0),
            download_limit: o.download_limit.or(f.download_limit).filter(|&v| v > 0),
            dht: o.dht || f.dht.unwrap_or(false),
            lsd: !o.no_lsd && f.lsd.unwrap_or(true),
            // A host that starts clones lazily serves lazy peers: a super-seed would offer them only
            // the pieces it chooses, never those a booting guest waits on (docs/lazy.md).
            super_seed: !o.no_super_seed && f.super_seed.unwrap_or(!lazy),
            request_window,
            libvirt_uri: o.libvirt_uri.clone().or(f.libvirt_uri),
            max_virtual_size: f.max_virtual_size.unwrap_or(DEFAULT_MAX_VIRTUAL_SIZE),
            qemu_img_check: f.qemu_img_check.unwrap_or(true),
            stall_timeout: f.stall_timeout.unwrap_or(120),
            watch_interval: o.watch_interval.or(f.watch_interval).unwrap_or(10),
            signing_key: o.signing_key.clone().or(f.signing_key),
            allowed_signers: o.allowed_signers.clone().or(f.allowed_signers),
            catalog: f.catalog.unwrap_or(true),
            catalog_port,
            announce_interval,
            lazy,
            lazy_read_timeout,
        })
    }

    /// Where records of published and fetched masters live.
    pub fn masters_dir(&self) -> PathBuf {
        self.state_dir.join("masters")
    }
    /// Where `publish` writes .torrent and manifest files.
    pub fn published_dir(&self) -> PathBuf {
        self.state_dir.join("published")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn another_state_dir_gets_its_own_socket() {
        let o = Overrides { state_dir: Some("/tmp/x".into()), ..Default::default() };
        let c = Config::merge(FileConfig::default(), &o).unwrap();
        assert_eq!(c.control_socket, PathBuf::from("/tmp/x/control.sock"));
        let c = Config::merge(FileConfig::default(), &Overrides::default()).unwrap();
        assert_eq!(c.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert!(!c.dht);
    }

    #[test]
    fn flags_override_the_file_and_peers_add_up() {
        let f: FileConfig = toml::from_str("listen_port = 7000\npeers = [\"127.0.0.1:1\"]\nupload_limit = 5").unwrap();
        let o = Overrides { listen_port: Some(7001), peers: vec!["127.0.0.1:2".into()], ..Default::default() };
        let c = Config::merge(f, &o).unwrap();
        assert_eq!(c.listen_port, 7001);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.upload_limit, Some(5));
    }

    #[test]
    fn unknown_keys_and_bad_trackers_are_errors() {
        assert!(toml::from_str::<FileConfig>("colour = 1").is_err());
        let o = Overrides { trackers: vec!["ftp://x".into()], ..Default::default() };
        assert!(Config::merge(FileConfig::default(), &o).is_err());
    }

    #[test]
    fn request_window_defaults_overrides_and_bounds() {
        let c = Config::merge(FileConfig::default(), &Overrides::default()).expect("defaults");
        assert_eq!((c.request_window, c.super_seed), (DEFAULT_REQUEST_WINDOW, true));
        let f: FileConfig = toml::from_str("request_window = 64\nsuper_seed = false").expect("toml");
        let c = Config::merge(f, &Overrides::default()).expect("file");
        assert_eq!((c.request_window, c.super_seed), (64, false));
        let o = Overrides { request_window: Some(8), no_super_seed: true, ..Default::default() };
        let f: FileConfig = toml::from_str("request_window = 64").expect("toml");
        assert_eq!(Config::merge(f, &o).expect("flag wins").request_window, 8);
        let f: FileConfig = toml::from_str("lazy = true").expect("toml");
        assert!(!Config::merge(f, &Overrides::default()).expect("lazy").super_seed, "lazy hosts do not super-seed");
        let f: FileConfig = toml::from_str("lazy = true\nsuper_seed = true").expect("toml");
        assert!(Config::merge(f, &Overrides::default()).expect("lazy").super_seed, "unless told to");
        for bad in [0, 1025] {
            let o = Overrides { request_window: Some(bad), ..Default::default() };
            let e = Config::merge(FileConfig::default(), &o).expect_err("out of range").to_string();
            assert!(e.contains("request window") && e.contains("1 to 1024"), "{e}");
        }
    }

    /// Every key `FileConfig` knows, from serde's own "expected one of" list.
    fn known_keys() -> Vec<String> {
        let e = toml::from_str::<FileConfig>("no_such_key = 1").expect_err("unknown key").to_string();
        let list = &e[e.find("expected one of").expect("a list of keys")..];
        list.split('`').skip(1).step_by(2).map(str::to_string).collect()
    }

    #[test]
    fn the_default_file_is_read_when_present_and_config_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("config.toml");
        let c = Config::load_with_default(&Overrides::default(), &default).expect("a missing default is fine");
        assert_eq!(c.listen_port, DEFAULT_LISTEN_PORT);
        std::fs::write(&default, "listen_port = 7100\nwatch_interval = 0\n").unwrap();
        let c = Config::load_with_default(&Overrides::default(), &default).expect("default file");
        assert_eq!((c.listen_port, c.watch_interval), (7100, 0));
        let o = Overrides { listen_port: Some(7101), ..Default::default() };
        assert_eq!(Config::load_with_default(&o, &default).unwrap().listen_port, 7101, "a flag beats the file");
        let other = dir.path().join("other.toml");
        std::fs::write(&other, "upload_limit = 9\n").unwrap();
        let o = Overrides { config: Some(other), ..Default::default() };
        let c = Config::load_with_default(&o, &default).expect("--config");
        assert_eq!((c.listen_port, c.upload_limit), (DEFAULT_LISTEN_PORT, Some(9)), "--config replaces the default");
        let o = Overrides { config: Some(dir.path().join("missing.toml")), ..Default::default() };
        let e = vcc_core::error::one_line(&Config::load_with_default(&o, &default).unwrap_err());
        assert!(e.contains("missing.toml"), "a missing --config file is an error: {e}");
        std::fs::write(&default, "listen_prot = 1\n").unwrap();
        let e = vcc_core::error::one_line(&Config::load_with_default(&Overrides::default(), &default).unwrap_err());
        assert!(e.contains(&default.display().to_string()) && e.contains("listen_prot"), "{e}");
    }

    #[test]
    fn the_packaged_default_file_documents_every_key_and_sets_nothing() {
        let text = include_str!("../../packaging/pool-helper/config.toml");
        let f: FileConfig = toml::from_str(text).expect("all commented out");
        assert_eq!(format!("{f:?}"), format!("{:?}", FileConfig::default()));
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix('#').filter(|r| r.starts_with(|c: char| c.is_ascii_lowercase())))
            .map(|l| format!("{l}\n"))
            .collect();
        let keys: Vec<String> = uncommented.lines().filter_map(|l| l.split(" = ").next()).map(str::to_string).collect();
        let mut known = known_keys();
        assert!(known.len() > 10, "{known:?}");
        known.sort();
        let mut documented = keys.clone();
        documented.sort();
        assert_eq!(documented, known, "every key, once, in packaging/pool-helper/config.toml");
        let f: FileConfig = toml::from_str(&uncommented).expect("the documented values parse");
        let c = Config::merge(f, &Overrides::default()).expect("and validate");
        assert_eq!((c.listen_port, c.request_window, c.watch_interval), (DEFAULT_LISTEN_PORT, 16, 10));
        assert_eq!(c.max_virtual_size, DEFAULT_MAX_VIRTUAL_SIZE);
        assert_eq!((c.catalog, c.catalog_port, c.announce_interval), (true, 6779, 30));
    }

    #[test]
    fn signing_flags_override_the_file_and_catalog_keys_are_bounded() {
        let f: FileConfig =
            toml::from_str("signing_key = \"/k\"\nallowed_signers = \"/a\"\ncatalog = false\ncatalog_port = 7000")
                .unwrap();
        let o = Overrides { signing_key: Some("/k2".into()), ..Default::default() };
        let c = Config::merge(f, &o).unwrap();
        assert_eq!(c.signing_key, Some(PathBuf::from("/k2")), "the flag wins");
        assert_eq!(c.allowed_signers, Some(PathBuf::from("/a")));
        assert_eq!((c.catalog, c.catalog_port), (false, 7000));
        for bad in ["catalog_port = 0", "announce_interval = 0", "announce_interval = 3601"] {
            let f: FileConfig = toml::from_str(bad).unwrap();
            assert!(Config::merge(f, &Overrides::default()).is_err(), "{bad}");
        }
    }
}
