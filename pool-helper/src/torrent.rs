//! The librqbit wrapper: the only module that uses librqbit.
//!
//! * One session per process, listening on the configured fixed port, DHT off unless asked,
//!   fastresume and persistence off (pieces are always re-hashed at start).
//! * Every torrent gets its own [`SingleFileStorage`]: the exact path comes from the trusted
//!   manifest (never from the torrent's name), staging files are opened read-write without
//!   following symlinks, and seeded masters are opened **read-only** (librqbit's filesystem
//!   storage opens files for writing even when seeding).

use std::fs::File;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use librqbit::limits::LimitsConfig;
use librqbit::storage::{BoxStorageFactory, StorageFactory, StorageFactoryExt, TorrentStorage};
use librqbit::{
    AddTorrent, AddTorrentOptions, AddTorrentResponse, ListenerMode, ListenerOptions, ManagedTorrentShared, Session,
    SessionOptions, TorrentMetadata, TorrentStatsState,
};
use serde::Serialize;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TorrentError {
    #[error("cannot start the BitTorrent session on port {port}: {msg}")]
    Session { port: u16, msg: String },
    #[error("librqbit refused the torrent: {0}")]
    Add(String),
    #[error("resolving metadata for {info_hash} from peers failed: {msg}")]
    Magnet { info_hash: String, msg: String },
}

/// Storage for a single-file torrent at a path we choose.
#[derive(Debug, Clone)]
pub struct SingleFileStorageFactory {
    pub path: PathBuf,
    pub writable: bool,
}

impl StorageFactory for SingleFileStorageFactory {
    type Storage = SingleFileStorage;

    fn create(&self, _shared: &ManagedTorrentShared, metadata: &TorrentMetadata) -> anyhow::Result<SingleFileStorage> {
        anyhow::ensure!(metadata.file_infos.len() == 1, "only single-file torrents are stored");
        Ok(SingleFileStorage { path: self.path.clone(), writable: self.writable, file: None })
    }

    fn clone_box(&self) -> BoxStorageFactory {
        self.clone().boxed()
    }
}

/// One open file; writes are refused when it is a seeded (read-only) master.
#[derive(Debug)]
pub struct SingleFileStorage {
    path: PathBuf,
    writable: bool,
    file: Option<Arc<File>>,
}

impl SingleFileStorage {
    fn file(&self, file_id: usize) -> anyhow::Result<&File> {
        anyhow::ensure!(file_id == 0, "no file {file_id}");
        self.file.as_deref().context("storage not initialized")
    }
}

impl TorrentStorage for SingleFileStorage {
    fn init(&mut self, _shared: &ManagedTorrentShared, _metadata: &TorrentMetadata) -> anyhow::Result<()> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(self.writable)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        anyhow::ensure!(f.metadata()?.file_type().is_file(), "{} is not a regular file", self.path.display());
        self.file = Some(Arc::new(f));
        Ok(())
    }

    fn pread_exact(&self, file_id: usize, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        Ok(self.file(file_id)?.read_exact_at(buf, offset)?)
    }

    fn pwrite_all(&self, file_id: usize, offset: u64, buf: &[u8]) -> anyhow::Result<()> {
        anyhow::ensure!(self.writable, "{} is a read-only master", self.path.display());
        Ok(self.file(file_id)?.write_all_at(buf, offset)?)
    }

    fn remove_file(&self, _file_id: usize, _filename: &Path) -> anyhow::Result<()> {
        Ok(()) // files are ours to manage, never librqbit's
    }

    fn remove_directory_if_empty(&self, _path: &Path) -> anyhow::Result<()> {
        Ok(())
    }

    fn ensure_file_length(&self, file_id: usize, length: u64) -> anyhow::Result<()> {
        let f = self.file(file_id)?;
        if f.metadata()?.len() == length {
            return Ok(());
        }
        anyhow::ensure!(self.writable, "{} has the wrong length and is read-only", self.path.display());
        Ok(crate::staging::allocate(f, length)?)
    }

    fn take(&self) -> anyhow::Result<Box<dyn TorrentStorage>> {
        Ok(Box::new(SingleFileStorage { path: self.path.clone(), writable: self.writable, file: self.file.clone() }))
    }
}

/// Where librqbit is with a torrent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TorrentState {
    /// Checking the pieces already on disk.
    #[default]
    Initializing,
    Live,
    Paused,
    /// See [`Progress::error`].
    Error,
}

/// A torrent as we report it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub state: TorrentState,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub peers: u32,
    pub up_bps: u64,
    pub down_bps: u64,
    pub uploaded_bytes: u64,
    pub finished: bool,
    pub error: Option<String>,
}

impl Progress {
    /// The part a `progress` event carries.
    pub fn event(&self) -> vcc_core::control::proto::Progress {
        vcc_core::control::proto::Progress {
            done_bytes: self.done_bytes,
            total_bytes: self.total_bytes,
            peers: self.peers,
            down_bps: self.down_bps,
        }
    }
}

/// A torrent in the session.
#[derive(Clone)]
pub struct Handle {
    inner: Arc<librqbit::ManagedTorrent>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("info_hash", &self.inner.info_hash().as_string()).finish()
    }
}

impl Handle {
    pub fn progress(&self) -> Progress {
        let s = self.inner.stats();
        let state = match s.state {
            TorrentStatsState::Initializing { .. } => TorrentState::Initializing,
            TorrentStatsState::Live => TorrentState::Live,
            TorrentStatsState::Paused => TorrentState::Paused,
            TorrentStatsState::Error => TorrentState::Error,
        };
        let (peers, up, down) = match &s.live {
            Some(l) => (
                l.snapshot.peer_stats.live,
                (l.upload_speed.mbps * 1048576.0) as u64,
                (l.download_speed.mbps * 1048576.0) as u64,
            ),
            None => (0, 0, 0),
        };
        Progress {
            state,
            done_bytes: s.progress_bytes,
            total_bytes: s.total_bytes,
            peers,
            up_bps: up,
            down_bps: down,
            uploaded_bytes: s.uploaded_bytes,
            finished: s.finished,
            error: s.error,
        }
    }

    /// Resolves when librqbit reports the download complete. It can miss the moment or never
    /// resolve if the torrent fails (librqbit trap 6), so callers bound it and check
    /// [`Handle::progress`] themselves.
    pub async fn completed(&self) {
        let _ = self.inner.wait_until_completed().await;
    }
}

/// The process's BitTorrent session.
pub struct Torrents {
    session: Arc<Session>,
    trackers: Vec<String>,
    /// Seed complete masters in super-seeding mode (BEP 16; the vendored librqbit's patch).
    super_seed: bool,
    /// Chunk requests (16 KiB) kept outstanding per peer.
    request_window: usize,
}

impl std::fmt::Debug for Torrents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Torrents").field("listen", &self.session.listen_addr()).finish()
    }
}

fn nz(v: Option<u32>) -> Option<NonZeroU32> {
    v.and_then(NonZeroU32::new)
}

impl Torrents {
    pub async fn start(cfg: &Config) -> Result<Self, TorrentError> {
        let port = cfg.listen_port;
        let err = |msg: String| TorrentError::Session { port, msg };
        let work = cfg.state_dir.join("librqbit");
        std::fs::create_dir_all(&work).map_err(|e| err(format!("creating {}: {e}", work.display())))?;
        let opts = SessionOptions {
            dht: if cfg.dht { Some(Default::default()) } else { None },
            fastresume: false,
            persistence: None,
            listen: Some(ListenerOptions {
                mode: ListenerMode::TcpOnly,
                listen_addr: (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
                enable_upnp_port_forwarding: false,
                ..Default::default()
            }),
            ratelimits: LimitsConfig { upload_bps: nz(cfg.upload_limit), download_bps: nz(cfg.download_limit) },
            disable_local_service_discovery: !cfg.lsd,
            ..Default::default()
        };
        let session = Session::new_with_opts(work, opts).await.map_err(|e| err(format!("{e:#}")))?;
        if session.listen_addr().is_none() {
            return Err(err("no listener".into()));
        }
        Ok(Torrents {
            session,
            trackers: cfg.trackers.clone(),
            super_seed: cfg.super_seed,
            request_window: cfg.request_window,
        })
    }

    fn options(&self, path: &Path, writable: bool, peers: Vec<SocketAddr>, trackers: &[String]) -> AddTorrentOptions {
        let mut all = self.trackers.clone();
        all.extend(trackers.iter().filter(|t| !self.trackers.contains(t)).cloned());
        AddTorrentOptions {
            overwrite: true,
            output_folder: path.parent().map(|p| p.display().to_string()),
            initial_peers: Some(peers),
            trackers: Some(all),
            storage_factory: Some(SingleFileStorageFactory { path: path.to_path_buf(), writable }.boxed()),
            peer_opts: Some(librqbit::PeerConnectionOptions {
                max_request_window: Some(self.request_window),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn add(&self, torrent: &[u8], opts: AddTorrentOptions) -> Result<Handle, TorrentError> {
        let resp = self
            .session
            .add_torrent(AddTorrent::from_bytes(torrent.to_vec()), Some(opts))
            .await
            .map_err(|e| TorrentError::Add(format!("{e:#}")))?;
        match resp {
            AddTorrentResponse::Added(_, h) | AddTorrentResponse::AlreadyManaged(_, h) => Ok(Handle { inner: h }),
            AddTorrentResponse::ListOnly(_) => Err(TorrentError::Add("unexpected list-only answer".into())),
        }
    }

    /// Seeds a verified master, opened read-only. librqbit re-hashes it first.
    /// `torrent` must have passed [`crate::metainfo::validate`].
    pub async fn seed(
        &self,
        torrent: &[u8],
        path: &Path,
        peers: Vec<SocketAddr>,
        trackers: &[String],
    ) -> Result<Handle, TorrentError> {
        let opts = AddTorrentOptions { super_seed: self.super_seed, ..self.options(path, false, peers, trackers) };
        self.add(torrent, opts).await
    }

    /// Downloads into an existing staging file (pieces already there are re-hashed and kept).
    /// `torrent` must have passed [`crate::metainfo::validate`].
    pub async fn download(
        &self,
        torrent: &[u8],
        staged: &Path,
        peers: Vec<SocketAddr>,
        trackers: &[String],
    ) -> Result<Handle, TorrentError> {
        let resp = self
            .session
            .add_torrent(AddTorrent::from_bytes(torrent.to_vec()), Some(self.options(staged, true, peers, trackers)))
            .await
            .map_err(|e| TorrentError::Add(format!("{e:#}")))?;
        match resp {
            AddTorrentResponse::Added(_, h) => Ok(Handle { inner: h }),
            // The same torrent is already seeded here (from another pool): it is not ours to take.
            AddTorrentResponse::AlreadyManaged(..) => Err(TorrentError::Add(
                "this master is already seeded from another pool on this host; copy it from there".into(),
            )),
            AddTorrentResponse::ListOnly(_) => Err(TorrentError::Add("unexpected list-only answer".into())),
        }
    }

    /// Gets metainfo from peers for a magnet (librqbit checks its SHA-1 against the info-hash
    /// before parsing it). The caller validates the bytes before using them.
    pub async fn resolve_magnet(
        &self,
        magnet: &str,
        info_hash: &str,
        peers: Vec<SocketAddr>,
        trackers: &[String],
    ) -> Result<Vec<u8>, TorrentError> {
        let opts = AddTorrentOptions {
            list_only: true,
            initial_peers: Some(peers),
            trackers: Some(trackers.to_vec()),
            ..Default::default()
        };
        let err = |msg: String| TorrentError::Magnet { info_hash: info_hash.into(), msg };
        let resp = tokio::time::timeout(
            std::time::Duration::from_secs(120),
            self.session.add_torrent(AddTorrent::from_url(magnet.to_string()), Some(opts)),
        )
        .await
        .map_err(|_| err("no peer sent it within 120 s".into()))?
        .map_err(|e| err(format!("{e:#}")))?;
        match resp {
            AddTorrentResponse::ListOnly(l) => Ok(l.torrent_bytes.to_vec()),
            _ => Err(err("unexpected answer".into())),
        }
    }

    /// Removes a torrent from the session; files are left alone.
    pub async fn remove(&self, h: &Handle) {
        if let Err(e) = self.session.delete(librqbit::api::TorrentIdOrHash::Id(h.inner.id()), false).await {
            tracing::debug!("removing torrent: {e:#}");
        }
    }

    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.session.listen_addr()
    }

    pub async fn stop(&self) {
        self.session.stop().await;
    }
}
