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
    #[error("cannot create the BitTorrent work directory '{path}'")]
    WorkDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the BitTorrent session on port {port}")]
    Session {
        port: u16,
        #[source]
        source: LibrqbitError,
    },
    #[error("the BitTorrent session on port {port} has no listener")]
    NoListener { port: u16 },
    #[error("librqbit refused the torrent")]
    Add(#[source] LibrqbitError),
    #[error("librqbit refused the torrent: this master is already seeded from another pool on this host; copy it from there")]
    AlreadySeeded,
    #[error("librqbit gave an unexpected answer to {0}")]
    Unexpected(&'static str),
    #[error("resolving metadata for {info_hash} from peers failed")]
    Magnet {
        info_hash: String,
        #[source]
        source: LibrqbitError,
    },
    #[error("resolving metadata for {info_hash} from peers failed: no peer sent it within {secs} s")]
    MagnetTimeout { info_hash: String, secs: u64 },
}

/// An error from librqbit (an `anyhow::Error`): its outermost message, its causes as `source()`.
#[derive(Debug)]
pub struct LibrqbitError(pub anyhow::Error);

impl std::fmt::Display for LibrqbitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for LibrqbitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Why librqbit stopped a torrent, as its statistics report it (only the message is kept there).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Stopped(pub String);

/// Why a torrent stopped ([`Handle::failure`]).
#[derive(Debug)]
pub enum Failure {
    /// A write or an allocation found the disk full.
    DiskFull(std::io::Error),
    /// Anything else librqbit stopped on.
    Stopped(Stopped),
}

/// Whether an I/O error is a full disk.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC)
}

/// Where a torrent's storage notes that the disk filled up: librqbit keeps only the message of a
/// failed write, so the storage, which sees the `io::Error` itself, records it here.
#[derive(Debug, Default)]
pub struct DiskFull(std::sync::Mutex<Option<std::io::Error>>);

impl DiskFull {
    /// Records `e` if it is a full disk (the first one is kept).
    pub fn note(&self, e: &std::io::Error) {
        if is_disk_full(e) {
            let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if g.is_none() {
                *g = Some(match e.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::from(e.kind()),
                });
            }
        }
    }

    /// The full-disk error recorded, if any.
    pub fn take(&self) -> Option<std::io::Error> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Storage for a single-file torrent at a path we choose.
#[derive(Debug, Clone)]
pub struct SingleFileStorageFactory {
    pub path: PathBuf,
    pub writable: bool,
    pub disk_full: Arc<DiskFull>,
}

impl StorageFactory for SingleFileStorageFactory {
    type Storage = SingleFileStorage;

    fn create(&self, _shared: &ManagedTorrentShared, metadata: &TorrentMetadata) -> anyhow::Result<SingleFileStorage> {
        anyhow::ensure!(metadata.file_infos.len() == 1, "only single-file torrents are stored");
        Ok(SingleFileStorage {
            path: self.path.clone(),
            writable: self.writable,
            file: None,
            disk_full: self.disk_full.clone(),
        })
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
    disk_full: Arc<DiskFull>,
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
        self.file(file_id)?.write_all_at(buf, offset).inspect_err(|e| self.disk_full.note(e))?;
        Ok(())
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
        crate::staging::allocate(f, length).inspect_err(|e| self.disk_full.note(e))?;
        Ok(())
    }

    fn take(&self) -> anyhow::Result<Box<dyn TorrentStorage>> {
        Ok(Box::new(SingleFileStorage {
            path: self.path.clone(),
            writable: self.writable,
            file: self.file.clone(),
            disk_full: self.disk_full.clone(),
        }))
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
    disk_full: Arc<DiskFull>,
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

    /// The torrent's one file, read positionally once the pieces read are verified: see
    /// [`VerifiedRead`]. Waits for librqbit's check of existing data first (not bounded: bound it).
    pub async fn verified(&self) -> anyhow::Result<Arc<dyn VerifiedRead>> {
        self.inner.wait_until_initialized().await?;
        Ok(Arc::new(Verified(self.inner.clone())))
    }

    /// Why the torrent stopped, once its state is `error`: a full disk (recognised by its
    /// `io::ErrorKind` where the storage saw it), or librqbit's message.
    pub fn failure(&self) -> Failure {
        match self.disk_full.take() {
            Some(e) => Failure::DiskFull(e),
            None => Failure::Stopped(Stopped(self.progress().error.unwrap_or_else(|| "unknown error".into()))),
        }
    }
}

/// What [`VerifiedRead::read_at`] returns.
pub type ReadAt<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send + 'a>>;

/// Positional reads of a download's file that return only verified bytes: `read_at` waits until
/// every piece the range lies in is downloaded and passed its SHA-1 against the info-hash (marked
/// "have" by librqbit, which happens after the hash check), and while it waits those pieces are
/// fetched before any other (pool-helper's librqbit patch `read_verified_at`). Any number of
/// reads may wait at once, each on its own pieces, with no lock held. Not bounded: callers bound.
pub trait VerifiedRead: Send + Sync {
    fn read_at<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> ReadAt<'a>;
}

struct Verified(Arc<librqbit::ManagedTorrent>);

impl VerifiedRead for Verified {
    fn read_at<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> ReadAt<'a> {
        Box::pin(async move { self.0.read_verified_at(0, offset, buf).await.map_err(std::io::Error::other) })
    }
}

/// Our metainfo checks ([`crate::metainfo::validate`]) on an info dict that peers sent for a
/// magnet, before librqbit parses it: size and depth caps, one file, piece length, `pieces`.
pub fn check_info_from_peers(info: &[u8]) -> Result<(), crate::metainfo::MetainfoError> {
    let mut torrent = Vec::with_capacity(info.len() + 8);
    torrent.extend_from_slice(b"d4:info");
    torrent.extend_from_slice(info);
    torrent.push(b'e');
    crate::metainfo::validate(&torrent, None).map(|_| ())
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
        let work = cfg.state_dir.join("librqbit");
        std::fs::create_dir_all(&work)
            .map_err(|source| TorrentError::WorkDir { path: work.display().to_string(), source })?;
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
        let session = Session::new_with_opts(work, opts)
            .await
            .map_err(|e| TorrentError::Session { port, source: LibrqbitError(e) })?;
        if session.listen_addr().is_none() {
            return Err(TorrentError::NoListener { port });
        }
        Ok(Torrents {
            session,
            trackers: cfg.trackers.clone(),
            super_seed: cfg.super_seed,
            request_window: cfg.request_window,
        })
    }

    fn options(
        &self,
        path: &Path,
        writable: bool,
        disk_full: &Arc<DiskFull>,
        peers: Vec<SocketAddr>,
        trackers: &[String],
    ) -> AddTorrentOptions {
        let mut all = self.trackers.clone();
        all.extend(trackers.iter().filter(|t| !self.trackers.contains(t)).cloned());
        AddTorrentOptions {
            overwrite: true,
            output_folder: path.parent().map(|p| p.display().to_string()),
            initial_peers: Some(peers),
            trackers: Some(all),
            storage_factory: Some(
                SingleFileStorageFactory { path: path.to_path_buf(), writable, disk_full: disk_full.clone() }.boxed(),
            ),
            peer_opts: Some(librqbit::PeerConnectionOptions {
                max_request_window: Some(self.request_window),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn add(
        &self,
        torrent: &[u8],
        opts: AddTorrentOptions,
        disk_full: Arc<DiskFull>,
    ) -> Result<Handle, TorrentError> {
        let resp = self
            .session
            .add_torrent(AddTorrent::from_bytes(torrent.to_vec()), Some(opts))
            .await
            .map_err(|e| TorrentError::Add(LibrqbitError(e)))?;
        match resp {
            AddTorrentResponse::Added(_, h) | AddTorrentResponse::AlreadyManaged(_, h) => {
                Ok(Handle { inner: h, disk_full })
            }
            AddTorrentResponse::ListOnly(_) => Err(TorrentError::Unexpected("adding a torrent (list only)")),
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
        let disk_full = Arc::default();
        let opts =
            AddTorrentOptions { super_seed: self.super_seed, ..self.options(path, false, &disk_full, peers, trackers) };
        self.add(torrent, opts, disk_full).await
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
        let disk_full = Arc::default();
        let opts = self.options(staged, true, &disk_full, peers, trackers);
        let resp = self
            .session
            .add_torrent(AddTorrent::from_bytes(torrent.to_vec()), Some(opts))
            .await
            .map_err(|e| TorrentError::Add(LibrqbitError(e)))?;
        match resp {
            AddTorrentResponse::Added(_, h) => Ok(Handle { inner: h, disk_full }),
            // The same torrent is already seeded here (from another pool): it is not ours to take.
            AddTorrentResponse::AlreadyManaged(..) => Err(TorrentError::AlreadySeeded),
            AddTorrentResponse::ListOnly(_) => Err(TorrentError::Unexpected("adding a download (list only)")),
        }
    }

    /// Gets metainfo from peers for a magnet. librqbit checks its SHA-1 against the info-hash,
    /// then hands the info dict to [`check_info_from_peers`] (the vendored librqbit's
    /// `info_validator`) before it parses anything: a refusal ends the resolution with the reason.
    /// The caller validates the whole torrent again (with the manifest's size) before using it.
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
            info_validator: Some(Arc::new(|info: &[u8]| Ok(check_info_from_peers(info)?))),
            ..Default::default()
        };
        const SECS: u64 = 120;
        let resp = tokio::time::timeout(
            std::time::Duration::from_secs(SECS),
            self.session.add_torrent(AddTorrent::from_url(magnet.to_string()), Some(opts)),
        )
        .await
        .map_err(|_| TorrentError::MagnetTimeout { info_hash: info_hash.into(), secs: SECS })?
        .map_err(|e| TorrentError::Magnet { info_hash: info_hash.into(), source: LibrqbitError(e) })?;
        match resp {
            AddTorrentResponse::ListOnly(l) => Ok(l.torrent_bytes.to_vec()),
            _ => Err(TorrentError::Unexpected("a metadata request")),
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_a_full_disk_is_noted_as_one() {
        let d = DiskFull::default();
        d.note(&std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        d.note(&std::io::Error::from_raw_os_error(libc::EIO));
        assert!(d.take().is_none());
        d.note(&std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(d.take().unwrap().kind(), std::io::ErrorKind::StorageFull);
        d.note(&std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert_eq!(d.take().unwrap().kind(), std::io::ErrorKind::StorageFull);
        assert!(d.take().is_none(), "taken once");
    }

    #[test]
    fn a_write_to_a_full_disk_is_recorded_by_the_storage() {
        // /dev/full answers every write with ENOSPC.
        let f = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let disk_full = Arc::new(DiskFull::default());
        let s = SingleFileStorage {
            path: "/dev/full".into(),
            writable: true,
            file: Some(Arc::new(f)),
            disk_full: disk_full.clone(),
        };
        assert!(s.pwrite_all(0, 0, &[0u8; 512]).is_err());
        assert_eq!(disk_full.take().unwrap().kind(), std::io::ErrorKind::StorageFull);
    }

    #[test]
    fn an_info_dict_from_peers_gets_our_metainfo_checks() {
        use crate::metainfo::MetainfoError;
        let info = |pl: u64, len: u64, pieces: usize| {
            let mut b = format!("d6:lengthi{len}e4:name1:x12:piece lengthi{pl}e6:pieces{pieces}:").into_bytes();
            b.extend(std::iter::repeat_n(b'a', pieces));
            b.push(b'e');
            b
        };
        check_info_from_peers(&info(16384, 65536, 80)).unwrap();
        assert_eq!(check_info_from_peers(&info(0, 65536, 80)), Err(MetainfoError::PieceLength(0)));
        assert_eq!(check_info_from_peers(&info(1 << 40, 65536, 20)), Err(MetainfoError::PieceLength(1 << 40)));
        assert!(matches!(check_info_from_peers(&info(16384, 1 << 50, 20)), Err(MetainfoError::PiecesLength { .. })));
        let deep = [vec![b'l'; 10_000], vec![b'e'; 10_000]].concat();
        assert_eq!(check_info_from_peers(&deep), Err(MetainfoError::TooDeep));
        let two_files =
            b"d5:filesld6:lengthi1e4:pathl1:aeee4:name1:x12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaae";
        assert_eq!(check_info_from_peers(two_files), Err(MetainfoError::MultiFile));
    }

    #[test]
    fn librqbit_errors_show_their_context_and_keep_the_cause_as_source() {
        let e = LibrqbitError(anyhow::Error::new(std::io::Error::other("refused")).context("adding torrent"));
        assert_eq!(e.to_string(), "adding torrent");
        assert_eq!(vcc_core::error::one_line(&e), "adding torrent: refused");
    }
}
