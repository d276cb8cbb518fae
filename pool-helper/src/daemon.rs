//! `pool-helper serve`: seeds every recorded master (re-verified first), resumes pending fetches,
//! and answers the control socket. Several requests for the same master share one download.
//!
//! Nothing wedges a master: every task that requests wait on (a download, a start-up
//! re-verification) runs as a task of its own whose panic becomes a failure with a reason, so its
//! waiters always get a final line and the next request starts afresh. Only a verified master or
//! a live fetch holds a name: a failed one is shown, with why, but does not block another
//! manifest for the name.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::fetch::{self, Ctx, FetchError, Outcome};
use crate::lazy::{LazyExport, LazySource};
use crate::manifest::Manifest;
use crate::nbd::Export;
use crate::records::{self, RecordState};
use crate::resolve;
use crate::torrent::{Handle, Progress, TorrentState};
use crate::waits;
use vcc_core::control::proto::{
    self, Event, Final, FinalState, MasterListEntry, MasterRequest, MasterState, MasterStatus, Masters, PublishRequest,
    Request,
};
use vcc_core::error::one_line;

/// How long a client has to send its request line (docs/control-protocol.md).
pub const REQUEST_LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one answer line may wait for a client that stopped reading.
pub const ANSWER_LINE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("another daemon already listens on '{0}'")]
    Running(String),
    #[error("cannot listen on '{path}'")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a request for a master gets `"ok":false` (the final line's error is its chain).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("bad request")]
    Bad(#[source] serde_json::Error),
    #[error("bad request: the request line is not UTF-8")]
    NotUtf8(#[source] std::str::Utf8Error),
    #[error("bad request: the request line is longer than {max} bytes")]
    TooLong { max: usize },
    #[error("no complete request line within {secs} s; send one JSON object and a newline")]
    Timeout { secs: u64 },
    #[error(transparent)]
    Resolve(#[from] resolve::ResolveError),
    #[error("pool '{pool}' already has a master named '{name}' with another SHA-256 ({sha256})")]
    OtherSha256 { pool: String, name: String, sha256: String },
    #[error("no published master '{name}' in pool '{pool}' on this host")]
    NotPublished { pool: String, name: String },
    #[error("the work on '{name}' in pool '{pool}' ended without an answer; ask again")]
    NoAnswer { pool: String, name: String },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Publish(#[from] crate::publish::PublishError),
    #[error("'{name}' in pool '{pool}' is being fetched or verified; publish it when that ends")]
    Busy { pool: String, name: String },
    #[error("the published manifest could not be written as JSON")]
    ManifestJson(#[source] serde_json::Error),
    #[error("lazy masters are off on this host: set lazy = true in /etc/pool-helper/config.toml or run `pool-helper serve --lazy`")]
    LazyOff,
    #[error("the download of '{name}' did not start within {secs} s; nothing to export yet")]
    ExportTimeout { name: String, secs: u64 },
    #[error("cannot read the download of '{name}'")]
    Reader {
        name: String,
        #[source]
        source: crate::torrent::LibrqbitError,
    },
    #[error(transparent)]
    Lazy(#[from] crate::lazy::LazyError),
}

type Key = (String, String); // (pool, name)

/// How long `forget` waits for the torrent session to drop one torrent.
const FORGET_TIMEOUT: Duration = Duration::from_secs(30);
/// What a request follows: the fetch's progress and its final line.
type Watches = (watch::Receiver<Option<Progress>>, watch::Receiver<Option<Final>>);

struct Entry {
    manifest: Manifest,
    pool: String,
    state: MasterState,
    path: Option<PathBuf>,
    handle: Option<Handle>,
    /// The running download's torrent (a lazy export reads it).
    download: Option<Handle>,
    /// The lazy export of this master, once asked for (docs/lazy.md).
    export: Option<Arc<LazyExport>>,
    error: Option<String>,
    fetches: u32,
    /// The domains whose start waits for this master now ([`crate::waits`]).
    domains: Vec<String>,
    /// Bytes uploaded while this host was still downloading (the download torrent is gone).
    uploaded_base: u64,
    progress: watch::Sender<Option<Progress>>,
    done: watch::Sender<Option<Final>>,
}

impl Entry {
    /// A master in `state`, with no path, torrent or error yet, and fresh watches.
    fn new(manifest: Manifest, pool: String, state: MasterState) -> Entry {
        Entry {
            manifest,
            pool,
            state,
            path: None,
            handle: None,
            download: None,
            export: None,
            error: None,
            fetches: 0,
            domains: Vec::new(),
            uploaded_base: 0,
            progress: watch::channel(None).0,
            done: watch::channel(None).0,
        }
    }

    /// Whether this entry holds its name: a verified master still in the pool, or live work on
    /// one (a fetch, a start-up re-verification). A failed entry does not.
    fn holds_name(&self) -> bool {
        match self.state {
            MasterState::Seeding => self.path.as_ref().is_some_and(|p| p.exists()),
            MasterState::Fetching | MasterState::Verifying => true,
            MasterState::Failed => false,
        }
    }
}

/// Runs `work` as a task of its own: if it panics, the panic becomes
/// [`FetchError::Panicked`] naming `task`, so whoever waits on it still gets an answer.
async fn caught<T: Send + 'static>(
    task: &'static str,
    work: impl std::future::Future<Output = Result<T, FetchError>> + Send + 'static,
) -> Result<T, FetchError> {
    match tokio::spawn(work).await {
        Ok(r) => r,
        Err(e) => {
            let message = match e.try_into_panic() {
                Ok(p) => p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into()),
                Err(e) => e.to_string(),
            };
            tracing::error!("the {task} task panicked: {message}");
            Err(FetchError::Panicked { task, message })
        }
    }
}

/// The daemon's shared state.
pub struct Daemon {
    ctx: Arc<Ctx>,
    /// Announces the signed masters this daemon seeds (set by [`Daemon::start_catalog`]).
    announcer: std::sync::OnceLock<Arc<crate::announce::Announcer>>,
    masters: Mutex<HashMap<Key, Entry>>,
    request_timeout: Duration,
    /// A master's lazy export is set up by one request at a time (others wait, bounded, then
    /// find it); exports of different masters are set up at once.
    exporting: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    #[cfg(test)]
    faults: Mutex<tests::Faults>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

impl Daemon {
    pub fn new(ctx: Arc<Ctx>) -> Arc<Self> {
        Self::with_request_timeout(ctx, REQUEST_LINE_TIMEOUT)
    }

    fn with_request_timeout(ctx: Arc<Ctx>, request_timeout: Duration) -> Arc<Self> {
        Arc::new(Daemon {
            ctx,
            announcer: std::sync::OnceLock::new(),
            masters: Mutex::new(HashMap::new()),
            request_timeout,
            exporting: Mutex::default(),
            #[cfg(test)]
            faults: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.masters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds the control socket (0600), refusing to steal one a live daemon answers on.
    ///
    /// The socket is bound inside a fresh 0700 directory next to `path`, made 0600 there, and
    /// renamed into place: `path` never names a socket with another mode, whatever the umask.
    pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
        Self::bind_probed(path, &mut |_| {})
    }

    /// [`Daemon::bind`]; `probe` sees the socket's path right after `bind(2)` (tests).
    fn bind_probed(path: &Path, probe: &mut dyn FnMut(&Path)) -> Result<UnixListener, DaemonError> {
        let p = path.display().to_string();
        let err = |source| DaemonError::Listen { path: p.clone(), source };
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Running(p));
        }
        let Some(name) = path.file_name() else {
            return Err(err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name")));
        };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(err)?;
        // Short: a socket's path has at most 107 bytes, and this one is only a step.
        let private = dir.join(format!(".{}.{}", name.len(), std::process::id()));
        let tmp = private.join("s");
        // A leftover of a daemon that had our pid and died here.
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_dir(&private);
        std::fs::DirBuilder::new().mode(0o700).create(&private).map_err(err)?;
        let bound = UnixListener::bind(&tmp).and_then(|l| {
            probe(&tmp);
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            // Replaces a stale socket of a dead daemon in one step.
            std::fs::rename(&tmp, path)?;
            Ok(l)
        });
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_dir(&private);
        bound.map_err(err)
    }

    /// Starts the LAN catalog (unless `catalog = false`): announcing the signed masters this
    /// daemon seeds (signed with `signing_key`, or as heard for fetched ones) and, with an
    /// `allowed_signers` file, hearing others'. A signing key or allowed-signers file that cannot
    /// be used, or a port that cannot be bound, is an error: the daemon does not start half-trusted.
    pub fn start_catalog(self: &Arc<Self>) -> Result<(), crate::announce::AnnounceError> {
        use crate::announce;
        let cfg = &self.ctx.cfg;
        if !cfg.catalog {
            tracing::info!("catalog = false: not announcing, not listening");
            return Ok(());
        }
        let key = cfg.signing_key.as_deref().map(crate::sign::SigningKey::load).transpose()?;
        let allowed = cfg.allowed_signers.as_deref().map(crate::sign::AllowedSigners::load).transpose()?;
        let a = announce::Announcer::new(cfg, key)?;
        let _ = self.announcer.set(a.clone());
        tokio::spawn(a.run());
        let interval = Duration::from_secs(cfg.announce_interval);
        match allowed {
            Some(allowed) => {
                let sock = announce::bind_listener(cfg.catalog_port)?;
                tracing::info!(
                    "catalog: listening on UDP port {} ({} trusted key(s))",
                    cfg.catalog_port,
                    allowed.len()
                );
                tokio::spawn(announce::listen(sock, Arc::new(allowed), self.ctx.catalog.clone(), interval));
            }
            None => tracing::info!("catalog: no allowed_signers, so nothing to trust: not listening"),
        }
        Ok(())
    }

    /// Announces a master this daemon seeds: one it published (signed with our key), or a
    /// fetched one the catalog holds signed.
    fn announce(&self, m: &Manifest, published: bool) {
        let Some(a) = self.announcer.get() else { return };
        let r = if published {
            a.add_own(m).map(|_| ())
        } else {
            match self.ctx.catalog.signed(&m.sha256) {
                Some((text, sig)) => a.add_signed(m, text, sig),
                None => Ok(()),
            }
        };
        if let Err(e) = r {
            tracing::warn!("not announcing '{}': {}", m.name, one_line(&e));
        }
    }

    /// Re-verifies and seeds every recorded master; resumes pending fetches. A fetch recorded as
    /// failed (it cannot succeed with its manifest) is shown, with why, and not resumed.
    pub fn start_recorded(self: &Arc<Self>) {
        for r in records::load_all(&self.ctx.cfg) {
            let key = (r.pool.clone(), r.manifest.name.clone());
            match &r.state {
                RecordState::Pending => {
                    tracing::info!(name = %r.manifest.name, "resuming an interrupted fetch");
                    let started = self.start_fetch(key.clone(), r.pool.clone(), r.manifest.clone(), None);
                    if let (true, Ok((_, drx))) = (self.ctx.cfg.lazy, started) {
                        self.reexport(key, r.manifest.clone(), drx);
                    }
                    continue;
                }
                RecordState::Failed { error } => {
                    tracing::info!(
                        "not resuming the fetch of '{}' into pool '{}': it failed ({error})",
                        r.manifest.name,
                        r.pool
                    );
                    let e = Entry { error: Some(error.clone()), ..Entry::new(r.manifest, r.pool, MasterState::Failed) };
                    self.lock().insert(key, e);
                    continue;
                }
                RecordState::Published | RecordState::Fetched => {}
            }
            let e = Entry {
                path: Some(r.path.clone()),
                ..Entry::new(r.manifest.clone(), r.pool.clone(), MasterState::Verifying)
            };
            let dtx = e.done.clone();
            self.lock().insert(key.clone(), e);
            let me = self.clone();
            let (published, m) = (matches!(r.state, RecordState::Published), r.manifest.clone());
            tokio::spawn(async move {
                let work = {
                    let me = me.clone();
                    async move {
                        #[cfg(test)]
                        me.fault_point(tests::Stage::Verify).await;
                        match me.ctx.check_present(&r.manifest, &r.path).await? {
                            Some(p) => {
                                let seeded = me.ctx.seed(&r.manifest, &p).await;
                                Ok((p, seeded))
                            }
                            None => Err(FetchError::Gone { path: r.path.display().to_string() }),
                        }
                    }
                };
                let res = caught("verification", work).await;
                let fin = {
                    let mut g = me.lock();
                    // Only the entry this task verifies (a `seed` request may have replaced it).
                    let e = g.get_mut(&key).filter(|e| e.done.same_channel(&dtx));
                    match res {
                        Ok((p, seeded)) => {
                            if let Some(e) = e {
                                match seeded {
                                    Ok(h) => {
                                        e.state = MasterState::Seeding;
                                        e.handle = Some(h);
                                        me.announce(&m, published);
                                    }
                                    Err(err) => {
                                        tracing::warn!("not seeding {}: {}", key.1, one_line(&err));
                                        e.state = MasterState::Failed;
                                        e.error = Some(format!("seeding: {}", one_line(&err)));
                                    }
                                }
                            }
                            // Verified and in the pool: a success for whoever waits.
                            Final::done(FinalState::Present, &p.display().to_string())
                        }
                        Err(err) => {
                            let msg = one_line(&err);
                            tracing::warn!("not seeding {}: {msg}", key.1);
                            if let Some(e) = e {
                                e.state = MasterState::Failed;
                                e.error = Some(msg.clone());
                            }
                            Final::error(msg)
                        }
                    }
                };
                let _ = dtx.send(Some(fin));
            });
        }
    }

    /// Fetches a master ahead of need (the watcher): true when a new download started, false when
    /// it is already here, being fetched, or cannot be (logged).
    pub fn prefetch(self: &Arc<Self>, pool: &str, m: Manifest) -> bool {
        let key = (pool.to_string(), m.name.clone());
        if let Some(e) = self.lock().get(&key) {
            if e.state != MasterState::Failed {
                return false;
            }
        }
        match self.start_fetch(key, pool.to_string(), m, None) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("prefetch into pool '{pool}': {}", one_line(&e));
                false
            }
        }
    }

    /// [`Daemon::prefetch`] for a master named in any way a request can name it (the watcher:
    /// identities from domains' metadata, plain backing stores by pool and name). Resolving may
    /// ask peers for the torrent (bounded by `stall_timeout`). Err: why it cannot be resolved.
    pub async fn prefetch_request(self: &Arc<Self>, mr: &MasterRequest) -> Result<bool, String> {
        let (pool, m) = self.master_of(mr).await.map_err(|e| one_line(&e))?;
        Ok(self.prefetch(&pool, m))
    }

    /// Starts a fetch for `key` or joins the running one. Returns the watches to follow.
    /// `domain`: the domain whose start waits for it (logged, and listed by `status` until
    /// [`Daemon::stop_waiting`]).
    fn start_fetch(
        self: &Arc<Self>,
        key: Key,
        pool: String,
        m: Manifest,
        domain: Option<&str>,
    ) -> Result<Watches, Refusal> {
        let mut g = self.lock();
        if let Some(e) = g.get_mut(&key).filter(|e| e.holds_name()) {
            if e.manifest.sha256 != m.sha256 {
                return Err(Refusal::OtherSha256 { pool, name: m.name, sha256: e.manifest.sha256.clone() });
            }
            if e.state == MasterState::Seeding {
                let (_, d) = watch::channel(Some(Final::done(
                    FinalState::Present,
                    &e.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                )));
                return Ok((e.progress.subscribe(), d));
            }
            if let Some(d) = domain {
                waits::add(&mut e.domains, d);
                let p = e.progress.borrow().as_ref().map(|p| format!(": {}", p.event())).unwrap_or_default();
                tracing::info!("domain '{d}' waits for '{}' in pool '{pool}', already {}{p}", m.name, e.state);
            }
            return Ok((e.progress.subscribe(), e.done.subscribe()));
        }
        // Nothing holds the name (nothing known, a failure, or a seed whose file vanished from
        // the pool): a fresh fetch, which the pool's own file still guards (a master there that
        // differs from this manifest is refused, never replaced).
        let fetches = g.get(&key).map(|e| e.fetches).unwrap_or(0) + 1;
        // A seed whose file vanished from the pool: drop it before fetching again.
        let stale = g.get_mut(&key).and_then(|e| e.handle.take());
        let mut e = Entry { fetches, ..Entry::new(m.clone(), pool.clone(), MasterState::Fetching) };
        if let Some(d) = domain {
            waits::add(&mut e.domains, d);
        }
        tracing::info!(
            "fetch of '{}' ({}) into pool '{pool}' started{}",
            m.name,
            vcc_core::units::human_bytes(m.size),
            waits::for_domains(&e.domains)
        );
        let (ptx, dtx) = (e.progress.clone(), e.done.clone());
        let (prx, drx) = (ptx.subscribe(), dtx.subscribe());
        g.insert(key.clone(), e);
        drop(g);
        let me = self.clone();
        let last = ptx.subscribe();
        let fetched = m.clone();
        tokio::spawn(async move {
            let work = {
                let (me, key2) = (me.clone(), key.clone());
                async move {
                    #[cfg(test)]
                    me.fault_point(tests::Stage::Download).await;
                    if let Some(h) = stale {
                        me.ctx.torrents.remove(&h).await;
                    }
                    let total = m.size;
                    let every = waits::Every::new(waits::LOG_EVERY);
                    let me2 = me.clone();
                    let on_event = move |ev: fetch::Event| match ev {
                        fetch::Event::Progress(p) => {
                            if every.due(Instant::now()) {
                                let fors =
                                    me2.lock().get(&key2).map(|e| waits::for_domains(&e.domains)).unwrap_or_default();
                                tracing::info!("fetching '{}' into pool '{}'{fors}: {}", key2.1, key2.0, p.event());
                            }
                            let _ = ptx.send(Some(p));
                        }
                        fetch::Event::Started { have_bytes, total_bytes } => {
                            let _ = ptx.send(Some(Progress {
                                state: TorrentState::Live,
                                done_bytes: have_bytes,
                                total_bytes,
                                ..Default::default()
                            }));
                        }
                        fetch::Event::Downloading(h) => {
                            if let Some(e) = me2.lock().get_mut(&key2) {
                                e.download = Some(h);
                            }
                        }
                        fetch::Event::Published(path) => {
                            let export = me2.lock().get_mut(&key2).and_then(|e| {
                                e.download = None;
                                e.path = Some(path.clone());
                                e.export.clone()
                            });
                            // The file is opened with the masters' lock released.
                            if let Some(x) = export {
                                x.published(&path);
                            }
                        }
                        fetch::Event::Verifying => {
                            let up = ptx.borrow().as_ref().map(|p| p.uploaded_bytes).unwrap_or(0);
                            // The finished download still seeds while the whole file is checked.
                            let _ = ptx.send(Some(Progress {
                                state: TorrentState::Live,
                                done_bytes: total,
                                total_bytes: total,
                                uploaded_bytes: up,
                                ..Default::default()
                            }));
                        }
                    };
                    let (outcome, h) = me.ctx.fetch(&pool, &m, &on_event).await?;
                    let seeded = match h {
                        None => me.ctx.seed(&m, outcome.path()).await.map(Some),
                        Some(h) => Ok(Some(h)),
                    };
                    Ok::<(Outcome, Result<Option<Handle>, FetchError>), FetchError>((outcome, seeded))
                }
            };
            let t0 = Instant::now();
            let res = caught("download", work).await;
            let uploaded = last.borrow().as_ref().map(|p| p.uploaded_bytes).unwrap_or(0);
            let fin = {
                let mut g = me.lock();
                // Only the entry of this fetch (a `seed` request may have replaced it).
                let mut e = g.get_mut(&key).filter(|e| e.done.same_channel(&dtx));
                let fors = e.as_ref().map(|e| waits::for_domains(&e.domains)).unwrap_or_default();
                if let Some(e) = e.as_mut() {
                    e.uploaded_base = uploaded;
                    e.download = None;
                }
                let (name, pool) = (&key.1, &key.0);
                match &res {
                    Ok((Outcome::Fetched(_), _)) => {
                        let secs = t0.elapsed().as_secs_f64();
                        tracing::info!("fetched '{name}' into pool '{pool}' in {secs:.1} s{fors}")
                    }
                    Ok((Outcome::Present(_), _)) => {
                        tracing::info!("'{name}' is already in pool '{pool}', verified{fors}")
                    }
                    Err(_) => {}
                }
                match res {
                    Ok((outcome, Ok(h))) => {
                        if let Some(e) = e {
                            e.state = MasterState::Seeding;
                            e.path = Some(outcome.path().to_path_buf());
                            e.handle = h;
                            e.error = None;
                            me.announce(&fetched, false);
                        }
                        Final::done(outcome.state(), &outcome.path().display().to_string())
                    }
                    Ok((outcome, Err(err))) => {
                        // In the pool and verified, but seeding failed: still a success for the caller.
                        if let Some(e) = e {
                            e.state = MasterState::Failed;
                            e.path = Some(outcome.path().to_path_buf());
                            e.error = Some(format!("seeding: {}", one_line(&err)));
                        }
                        Final::done(outcome.state(), &outcome.path().display().to_string())
                    }
                    Err(err) => {
                        let msg = one_line(&err);
                        tracing::warn!("fetch of '{name}' into pool '{pool}' failed{fors}: {msg}");
                        if let Some(e) = e {
                            e.state = MasterState::Failed;
                            e.error = Some(msg.clone());
                            if let Some(x) = e.export.take() {
                                x.stop(&msg);
                            }
                        }
                        Final::error(msg)
                    }
                }
            };
            let _ = dtx.send(Some(fin));
        });
        Ok((prx, drx))
    }

    fn status(&self) -> Vec<MasterStatus> {
        let g = self.lock();
        let mut v: Vec<MasterStatus> = g
            .values()
            .map(|e| {
                let p =
                    e.handle.as_ref().map(|h| h.progress()).or_else(|| e.progress.borrow().clone()).unwrap_or_default();
                MasterStatus {
                    domains: e.domains.clone(),
                    name: e.manifest.name.clone(),
                    pool: e.pool.clone(),
                    sha256: e.manifest.sha256.clone(),
                    state: e.state,
                    path: e.path.as_ref().map(|p| p.display().to_string()),
                    done_bytes: p.done_bytes,
                    total_bytes: if p.total_bytes == 0 { e.manifest.size } else { p.total_bytes },
                    peers: p.peers,
                    up_bps: p.up_bps,
                    down_bps: p.down_bps,
                    uploaded_bytes: e.uploaded_base + p.uploaded_bytes,
                    error: e.error.clone().or(p.error),
                    fetches: e.fetches,
                }
            })
            .collect();
        v.sort_by(|a, b| (&a.pool, &a.name).cmp(&(&b.pool, &b.name)));
        v
    }

    /// The request's pool and the validated manifest of the master it names ([`resolve`]). A
    /// master named by identity that this daemon already holds (seeding it, or fetching it) needs
    /// no catalog or peer to resolve.
    async fn master_of(&self, r: &MasterRequest) -> Result<(String, Manifest), Refusal> {
        if let (Some(pool), Some(id)) = (&r.pool, &r.identity) {
            let key = (pool.clone(), id.name.clone());
            if let Some(e) = self.lock().get(&key).filter(|e| e.holds_name() && e.manifest.sha256 == id.sha256) {
                return Ok((pool.clone(), e.manifest.clone()));
            }
        }
        Ok(resolve::resolve(&self.ctx, r).await?)
    }

    /// Serves connections until the process ends.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.handle(s).await {
                            tracing::debug!("control connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, s: UnixStream) -> std::io::Result<()> {
        let (r, mut w) = s.into_split();
        let req = match self.read_request(r).await? {
            Ok(q) => q,
            Err(e) => return write_final(&mut w, &Final::error(one_line(&e))).await,
        };
        match req {
            Request::Status => write_final(&mut w, &Final::masters(Masters::Status(self.status()))).await,
            Request::List => {
                let l = self
                    .status()
                    .into_iter()
                    .map(|s| MasterListEntry { name: s.name, pool: s.pool, path: s.path, state: s.state })
                    .collect();
                write_final(&mut w, &Final::masters(Masters::List(l))).await
            }
            Request::Seed(mr) => {
                // It runs librqbit's parser: a panic there is an answer too.
                let me = self.clone();
                let f = match caught("seed", async move { Ok(me.seed_published(&mr).await) }).await {
                    Ok(r) => r,
                    Err(e) => Err(e.into()),
                };
                let f = match f {
                    Ok(f) => f,
                    Err(e) => Final::error(one_line(&e)),
                };
                write_final(&mut w, &f).await
            }
            Request::Ensure(mr) => self.ensure(w, mr, false).await,
            Request::Fetch(mr) => self.ensure(w, mr, true).await,
            Request::Export(mr) => {
                let f = match self.export(&mr).await {
                    Ok(f) => f,
                    Err(e) => Final::error(one_line(&e)),
                };
                write_final(&mut w, &f).await
            }
            Request::Publish(pr) => {
                let f = match self.publish(pr).await {
                    Ok(f) => f,
                    Err(e) => Final::error(one_line(&e)),
                };
                write_final(&mut w, &f).await
            }
            Request::Catalog => {
                let f = Final { ok: true, catalog: Some(self.ctx.catalog.entries()), ..Default::default() };
                write_final(&mut w, &f).await
            }
            Request::Forget(fr) => {
                let f = match self.forget(&fr.path).await {
                    Ok(n) => Final { ok: true, forgotten: Some(n), ..Default::default() },
                    Err(e) => Final::error(one_line(&e)),
                };
                write_final(&mut w, &f).await
            }
        }
    }

    /// `forget`: stops seeding the master at `path` (or, when its file is gone, named so by its
    /// record) and drops its records and announcement. A master being fetched or verified is
    /// refused (it is not in the pool yet). Returns how many entries and records went.
    async fn forget(&self, path: &str) -> Result<u32, Refusal> {
        let want = Path::new(path);
        let canon = std::fs::canonicalize(want).ok();
        let same = |p: &Path| {
            p == want || canon.as_deref().is_some_and(|c| std::fs::canonicalize(p).ok().as_deref() == Some(c))
        };
        // The paths are compared (canonicalized) with the masters' lock released; an entry whose
        // path changed meanwhile is left alone.
        let paths: Vec<(Key, PathBuf)> =
            self.lock().iter().filter_map(|(k, e)| e.path.clone().map(|p| (k.clone(), p))).collect();
        let matching: Vec<(Key, PathBuf)> = paths.into_iter().filter(|(_, p)| same(p)).collect();
        let gone: Vec<Entry> = {
            let mut g = self.lock();
            let keys: Vec<Key> = matching
                .into_iter()
                .filter(|(k, p)| g.get(k).is_some_and(|e| e.path.as_ref() == Some(p)))
                .map(|(k, _)| k)
                .collect();
            if let Some(k) =
                keys.iter().find(|k| g.get(*k).is_some_and(|e| e.holds_name() && e.state != MasterState::Seeding))
            {
                return Err(Refusal::Busy { pool: k.0.clone(), name: k.1.clone() });
            }
            keys.iter().filter_map(|k| g.remove(k)).collect()
        };
        let mut recs = 0u32;
        for r in records::load_all(&self.ctx.cfg).into_iter().filter(|r| same(&r.path)) {
            records::remove(&self.ctx.cfg, &r.pool, &r.manifest.name);
            recs += 1;
        }
        let n = recs.max(u32::try_from(gone.len()).unwrap_or(u32::MAX));
        for mut e in gone {
            let still = self.lock().values().any(|o| o.manifest.sha256 == e.manifest.sha256);
            if let (false, Some(a)) = (still, self.announcer.get()) {
                a.remove(&e.manifest.sha256);
            }
            if let Some(h) = e.handle.take() {
                if tokio::time::timeout(FORGET_TIMEOUT, self.ctx.torrents.remove(&h)).await.is_err() {
                    tracing::warn!("removing the torrent of '{}' took over {FORGET_TIMEOUT:?}", e.manifest.name);
                }
            }
            tracing::info!("forgot '{}' in pool '{}': no longer seeded", e.manifest.name, e.pool);
        }
        Ok(n)
    }

    /// The request line: at most [`proto::MAX_REQUEST_BYTES`], within the request timeout.
    /// Err: the connection failed; Ok(Err): what to answer instead.
    async fn read_request(&self, r: tokio::net::unix::OwnedReadHalf) -> std::io::Result<Result<Request, Refusal>> {
        let max = proto::MAX_REQUEST_BYTES;
        let mut r = BufReader::new(r).take(max as u64 + 1);
        let mut line = Vec::new();
        match tokio::time::timeout(self.request_timeout, r.read_until(b'\n', &mut line)).await {
            Err(_) => return Ok(Err(Refusal::Timeout { secs: self.request_timeout.as_secs() })),
            Ok(res) => res?,
        };
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if line.len() > max {
            return Ok(Err(Refusal::TooLong { max }));
        }
        let line = match std::str::from_utf8(&line) {
            Ok(l) => l,
            Err(e) => return Ok(Err(Refusal::NotUtf8(e))),
        };
        Ok(serde_json::from_str(line.trim()).map_err(Refusal::Bad))
    }

    /// `seed`: re-verifies a master this host published and seeds it.
    async fn seed_published(&self, mr: &MasterRequest) -> Result<Final, Refusal> {
        let (pool, m) = self.master_of(mr).await?;
        let rec = records::load_all(&self.ctx.cfg)
            .into_iter()
            .find(|r| {
                r.pool == pool
                    && r.manifest.name == m.name
                    && r.manifest.sha256 == m.sha256
                    && !matches!(r.state, RecordState::Failed { .. })
            })
            .ok_or_else(|| Refusal::NotPublished { pool: pool.clone(), name: m.name.clone() })?;
        let p = match self.ctx.check_present(&m, &rec.path).await? {
            Some(p) => p,
            None => return Err(fetch::FetchError::Gone { path: rec.path.display().to_string() }.into()),
        };
        let h = self.ctx.seed(&m, &p).await?;
        let key = (pool.clone(), m.name.clone());
        let e = Entry { path: Some(p.clone()), handle: Some(h), ..Entry::new(m, pool, MasterState::Seeding) };
        self.lock().insert(key, e);
        Ok(Final::done(FinalState::Seeding, &p.display().to_string()))
    }

    /// `publish`: makes a pool volume a master (as `pool-helper publish` does offline: hashed,
    /// checked as every fetcher will, manifest and torrent written, recorded) and seeds it.
    async fn publish(&self, pr: PublishRequest) -> Result<Final, Refusal> {
        let key = (pr.pool.clone(), pr.volume.clone());
        if let Some(e) = self.lock().get(&key) {
            if matches!(e.state, MasterState::Fetching | MasterState::Verifying) {
                return Err(Refusal::Busy { pool: pr.pool, name: pr.volume });
            }
        }
        let (cfg, pools) = (self.ctx.cfg.clone(), self.ctx.pools.clone());
        let (pool, volume) = (pr.pool.clone(), pr.volume.clone());
        // Hashing reads the whole volume: off the async workers; a panic is an answer too.
        let p = match tokio::task::spawn_blocking(move || crate::publish::publish_in(&cfg, &*pools, &pool, &volume))
            .await
        {
            Ok(r) => r?,
            Err(e) => return Err(FetchError::Task(e).into()),
        };
        let h = self.ctx.seed(&p.manifest, &p.path).await?;
        let old = {
            let mut g = self.lock();
            let e = Entry {
                path: Some(p.path.clone()),
                handle: Some(h),
                ..Entry::new(p.manifest.clone(), pr.pool.clone(), MasterState::Seeding)
            };
            g.insert(key, e).and_then(|mut o| {
                if o.manifest.sha256 != p.manifest.sha256 {
                    if let Some(a) = self.announcer.get() {
                        a.remove(&o.manifest.sha256);
                    }
                }
                o.handle.take().map(|h| (o.manifest.info_hash, h))
            })
        };
        self.announce(&p.manifest, true);
        // A master republished with other content: its old torrent goes.
        if let Some((ih, h)) = old {
            if ih != p.manifest.info_hash {
                self.ctx.torrents.remove(&h).await;
            }
        }
        Ok(Final {
            ok: true,
            state: Some(FinalState::Seeding),
            path: Some(p.path.display().to_string()),
            manifest: Some(serde_json::to_value(&p.manifest).map_err(Refusal::ManifestJson)?),
            manifest_path: Some(p.manifest_path.display().to_string()),
            ..Default::default()
        })
    }

    async fn ensure(
        self: Arc<Self>,
        mut w: tokio::net::unix::OwnedWriteHalf,
        mr: MasterRequest,
        always: bool,
    ) -> std::io::Result<()> {
        let domain = mr.domain.as_deref().and_then(proto::domain_label);
        let started = self.master_of(&mr).await.and_then(|(pool, m)| {
            let key = (pool.clone(), m.name.clone());
            let (size, name) = (m.size, m.name.clone());
            self.start_fetch(key.clone(), pool, m, domain.as_deref()).map(|w| (w, size, name, key))
        });
        let ((prx, drx), size, name, key) = match started {
            Ok(x) => x,
            Err(e) => return write_final(&mut w, &Final::error(one_line(&e))).await,
        };
        let res = self.follow(&mut w, prx, drx, size, &name, &mr, always).await;
        if let Some(d) = &domain {
            self.stop_waiting(&key, d);
        }
        res
    }

    /// `export` (docs/lazy.md): starts or joins the fetch, then answers the export's socket once
    /// the download runs and the image's head passed its checks; or the fetch's own final line
    /// if it ends first (`present` when the master is here already). Bounded by
    /// `lazy_read_timeout` for the download to start, and as much for each read of the checks.
    async fn export(self: &Arc<Self>, mr: &MasterRequest) -> Result<Final, Refusal> {
        if !self.ctx.cfg.lazy {
            return Err(Refusal::LazyOff);
        }
        let domain = mr.domain.as_deref().and_then(proto::domain_label);
        let (pool, m) = self.master_of(mr).await?;
        let key = (pool.clone(), m.name.clone());
        let (_, drx) = self.start_fetch(key.clone(), pool, m.clone(), domain.as_deref())?;
        let res = self.export_of(&key, &m, drx).await;
        if let Some(d) = &domain {
            self.stop_waiting(&key, d);
        }
        res
    }

    async fn export_of(&self, key: &Key, m: &Manifest, drx: watch::Receiver<Option<Final>>) -> Result<Final, Refusal> {
        let bound = Duration::from_secs(self.ctx.cfg.lazy_read_timeout);
        let one = self.exporting.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default().clone();
        let res = match tokio::time::timeout(bound, one.lock()).await {
            Ok(_g) => self.export_once(key, m, drx, bound).await,
            Err(_) => Err(Refusal::ExportTimeout { name: m.name.clone(), secs: bound.as_secs() }),
        };
        {
            // The key's lock goes with its last user.
            let mut ex = self.exporting.lock().unwrap_or_else(|p| p.into_inner());
            if Arc::strong_count(&one) == 2 {
                ex.remove(key);
            }
        }
        res
    }

    async fn export_once(
        &self,
        key: &Key,
        m: &Manifest,
        drx: watch::Receiver<Option<Final>>,
        bound: Duration,
    ) -> Result<Final, Refusal> {
        let exported = |x: &LazyExport| Final::done(FinalState::Exported, &x.socket.display().to_string());
        let t0 = Instant::now();
        let deadline = t0 + bound;
        let mut drx = drx;
        let h = loop {
            if let Some(f) = drx.borrow().clone() {
                return Ok(f);
            }
            if let Some(e) = self.lock().get(key) {
                if let Some(x) = &e.export {
                    return Ok(exported(x));
                }
                if let Some(h) = &e.download {
                    break h.clone();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Refusal::ExportTimeout { name: m.name.clone(), secs: bound.as_secs() });
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), drx.changed()).await;
        };
        let reader = match tokio::time::timeout(bound, h.verified()).await {
            Ok(r) => {
                r.map_err(|e| Refusal::Reader { name: m.name.clone(), source: crate::torrent::LibrqbitError(e) })?
            }
            Err(_) => return Err(Refusal::ExportTimeout { name: m.name.clone(), secs: bound.as_secs() }),
        };
        let ready_ms = t0.elapsed().as_millis();
        let source = LazySource::new(&m.name, reader, bound);
        if let Err(e) = crate::lazy::precheck(&source, &fetch::expect(&self.ctx.cfg, m, false)).await {
            tracing::warn!("no lazy export of '{}' in pool '{}': {}", m.name, key.0, one_line(&e));
            return Err(e.into());
        }
        let socket = vcc_core::control::export_socket(&self.ctx.cfg.control_socket, &m.info_hash);
        let x = Arc::new(LazyExport::start(socket, Export { name: m.name.clone(), size: m.size, source })?);
        let published = match self.lock().get_mut(key).filter(|e| e.state != MasterState::Failed) {
            Some(e) => {
                e.export = Some(x.clone());
                // Published while the checks ran: the pool's file it is.
                if e.download.is_none() {
                    e.path.clone()
                } else {
                    None
                }
            }
            None => {
                x.stop("the fetch failed while the export was set up");
                return Ok(drx.borrow().clone().unwrap_or_else(|| Final::error("the fetch failed")));
            }
        };
        // The file is opened with the masters' lock released.
        if let Some(p) = published {
            x.published(&p);
        }
        tracing::info!(
            "lazy export of '{}' in pool '{}' on {} after {} ms (download's reader ready at {ready_ms} ms)",
            m.name,
            key.0,
            x.socket.display(),
            t0.elapsed().as_millis()
        );
        Ok(exported(&x))
    }

    /// With `lazy` on, a fetch resumed at start-up is exported again (docs/lazy.md): a guest
    /// started over its export before a daemon restart reads it again (QEMU reconnects at its next
    /// read) with nobody asking. As any export: verified pieces only, after the head checks.
    fn reexport(self: &Arc<Self>, key: Key, m: Manifest, drx: watch::Receiver<Option<Final>>) {
        let me = self.clone();
        tokio::spawn(async move {
            match me.export_of(&key, &m, drx).await {
                Ok(f) if f.state == Some(FinalState::Exported) => {}
                Ok(_) => tracing::debug!("'{}' not exported again: its fetch ended first", m.name),
                Err(e) => tracing::warn!("'{}' not exported again after the restart: {}", m.name, one_line(&e)),
            }
        });
    }

    /// `domain` no longer waits for the master of `key` (its request ended, answered or not).
    fn stop_waiting(&self, key: &Key, domain: &str) {
        if let Some(e) = self.lock().get_mut(key) {
            waits::remove(&mut e.domains, domain);
        }
    }

    /// Streams a fetch's progress to the client, then its final line.
    #[allow(clippy::too_many_arguments)]
    async fn follow(
        &self,
        w: &mut tokio::net::unix::OwnedWriteHalf,
        mut prx: watch::Receiver<Option<Progress>>,
        mut drx: watch::Receiver<Option<Final>>,
        size: u64,
        name: &str,
        mr: &MasterRequest,
        always: bool,
    ) -> std::io::Result<()> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent_any = false;
        loop {
            let fin = drx.borrow_and_update().clone();
            if let Some(f) = fin {
                if always && !sent_any {
                    let ev =
                        Event::Progress(proto::Progress { done_bytes: size, total_bytes: size, peers: 0, down_bps: 0 });
                    write_line(w, &ev).await?;
                }
                return write_final(w, &f).await;
            }
            tokio::select! {
                changed = drx.changed() => {
                    if changed.is_err() {
                        // Every sender is gone without a final line (never expected): say so.
                        let (pool, name) = (mr.pool.clone().unwrap_or_default(), name.to_string());
                        return write_final(w, &Final::error(one_line(&Refusal::NoAnswer { pool, name }))).await;
                    }
                }
                _ = tick.tick() => {
                    let p = prx.borrow_and_update().clone();
                    if let Some(p) = p {
                        let ev = Event::Progress(p.event());
                        // A client that went away does not stop the download.
                        write_line(w, &ev).await?;
                        sent_any = true;
                    }
                }
            }
        }
    }
}

/// Writes one line; a client that stopped reading for [`ANSWER_LINE_TIMEOUT`] is dropped (a
/// download it started goes on).
async fn write_line<T: serde::Serialize>(w: &mut tokio::net::unix::OwnedWriteHalf, v: &T) -> std::io::Result<()> {
    let mut s = serde_json::to_string(v).unwrap_or_default();
    s.push('\n');
    match tokio::time::timeout(ANSWER_LINE_TIMEOUT, w.write_all(s.as_bytes())).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")),
    }
}

async fn write_final(w: &mut tokio::net::unix::OwnedWriteHalf, f: &Final) -> std::io::Result<()> {
    write_line(w, f).await?;
    w.shutdown().await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{Config, FileConfig, Overrides};
    use crate::pools::DirPools;
    use crate::publish::publish_in;
    use crate::torrent::Torrents;
    use std::path::Path;
    use tokio::sync::Notify;

    /// Where an injected fault strikes: at the start of a download task or of a start-up
    /// re-verification.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Stage {
        Download,
        Verify,
    }

    /// One fault, taken by the first task that reaches its stage: it waits for `release`, then
    /// panics if `panic` is set.
    #[derive(Debug, Default)]
    pub(super) struct Faults {
        at: Option<Stage>,
        release: Option<Arc<Notify>>,
        panic: bool,
    }

    impl Daemon {
        pub(super) async fn fault_point(&self, stage: Stage) {
            let f = {
                let mut g = self.faults.lock().unwrap();
                if g.at != Some(stage) {
                    return;
                }
                std::mem::take(&mut *g)
            };
            if let Some(n) = f.release {
                n.notified().await;
            }
            if f.panic {
                panic!("injected fault");
            }
        }

        /// Arms a fault; returns what releases it.
        fn inject(&self, at: Stage, panic: bool) -> Arc<Notify> {
            let n = Arc::new(Notify::new());
            *self.faults.lock().unwrap() = Faults { at: Some(at), release: Some(n.clone()), panic };
            n
        }

        /// How many requests wait for the final answer about `name`.
        fn waiters(&self, pool: &str, name: &str) -> usize {
            self.lock().get(&(pool.to_string(), name.to_string())).map(|e| e.done.receiver_count()).unwrap_or(0)
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("[::]:0").unwrap().local_addr().unwrap().port()
    }

    fn config(state: &Path) -> Config {
        let o = Overrides {
            state_dir: Some(state.to_path_buf()),
            listen_port: Some(free_port()),
            advertise: Some("127.0.0.1".into()),
            no_lsd: true,
            ..Default::default()
        };
        let mut c = Config::merge(FileConfig::default(), &o).unwrap();
        c.qemu_img_check = false;
        c.stall_timeout = 30;
        c
    }

    /// `size` bytes that look like no image format (the same on every run).
    fn bytes(size: usize) -> Vec<u8> {
        vcc_tests::random_bytes(size, 2)
    }

    /// A host: its state and pool directories (pool "p"), and its context.
    struct Host {
        _tmp: tempfile::TempDir,
        pool: PathBuf,
        cfg: Config,
    }

    impl Host {
        fn new() -> Host {
            let tmp = tempfile::tempdir().unwrap();
            let pool = tmp.path().join("pool");
            std::fs::create_dir(&pool).unwrap();
            let cfg = config(&tmp.path().join("state"));
            Host { _tmp: tmp, pool, cfg }
        }

        fn pools(&self) -> DirPools {
            DirPools::new().with("p", &self.pool)
        }

        async fn ctx(&self) -> Arc<Ctx> {
            let torrents = Torrents::start(&self.cfg).await.unwrap();
            Arc::new(Ctx { cfg: self.cfg.clone(), torrents, pools: Arc::new(self.pools()), catalog: Arc::default() })
        }

        /// A daemon on this host, serving on a socket in its state directory.
        async fn daemon(&self) -> (Arc<Daemon>, PathBuf) {
            self.daemon_with(REQUEST_LINE_TIMEOUT).await
        }

        async fn daemon_with(&self, request_timeout: Duration) -> (Arc<Daemon>, PathBuf) {
            let d = Daemon::with_request_timeout(self.ctx().await, request_timeout);
            let sock = self.cfg.state_dir.join("control.sock");
            let l = Daemon::bind(&sock).unwrap();
            tokio::spawn(d.clone().serve(l));
            (d, sock)
        }
    }

    /// A seeding host with one published raw master; its manifest.
    async fn origin(h: &Host) -> (Arc<Ctx>, Manifest, Vec<u8>) {
        let data = bytes((2 << 20) + 512);
        std::fs::write(h.pool.join("base.raw"), &data).unwrap();
        let p = publish_in(&h.cfg, &h.pools(), "p", "base.raw").unwrap();
        let ctx = h.ctx().await;
        // The session keeps seeding it; the handle is not needed.
        ctx.seed(&p.manifest, &p.path).await.unwrap();
        (ctx, p.manifest, data)
    }

    /// Sends one request line; returns the final line (events skipped).
    async fn request(sock: PathBuf, req: serde_json::Value) -> serde_json::Value {
        let s = UnixStream::connect(sock).await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(format!("{req}\n").as_bytes()).await.unwrap();
        let mut lines = BufReader::new(r).lines();
        let read = async {
            while let Some(l) = lines.next_line().await.unwrap() {
                let v: serde_json::Value = serde_json::from_str(&l).unwrap();
                if v.get("ok").is_some() {
                    return v;
                }
            }
            panic!("the connection ended without a final line");
        };
        tokio::time::timeout(Duration::from_secs(60), read).await.expect("no final answer within 60 s")
    }

    fn ensure(m: &Manifest) -> serde_json::Value {
        serde_json::json!({"op": "ensure", "pool": "p", "manifest": m})
    }

    async fn status_of(sock: &Path, name: &str) -> serde_json::Value {
        let st = request(sock.to_path_buf(), serde_json::json!({"op": "status"})).await;
        st["masters"].as_array().unwrap().iter().find(|m| m["name"] == name).cloned().unwrap_or_default()
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let start = std::time::Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(30), "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn forget_stops_seeding_a_master_and_drops_its_record_and_answers_ok_when_unknown() {
        let h = Host::new();
        std::fs::write(h.pool.join("base.raw"), bytes((1 << 20) + 512)).unwrap();
        let (_d, sock) = h.daemon().await;
        let fin = request(sock.clone(), serde_json::json!({"op": "publish", "pool": "p", "volume": "base.raw"})).await;
        assert_eq!(fin["ok"], true, "{fin}");
        let path = fin["path"].as_str().unwrap().to_string();
        assert_eq!(status_of(&sock, "base.raw").await["state"], "seeding");
        assert_eq!(records::load_all(&h.cfg).len(), 1);
        // Through a symlinked spelling of the same file, too.
        let link = h._tmp.path().join("link");
        std::os::unix::fs::symlink(&h.pool, &link).unwrap();
        let fin = request(sock.clone(), serde_json::json!({"op": "forget", "path": link.join("base.raw")})).await;
        assert_eq!((fin["ok"].as_bool(), fin["forgotten"].as_u64()), (Some(true), Some(1)), "{fin}");
        assert_eq!(status_of(&sock, "base.raw").await, serde_json::Value::Null, "still listed");
        assert!(records::load_all(&h.cfg).is_empty(), "its record stayed");
        assert!(Path::new(&path).is_file(), "forget removes no file");
        let fin = request(sock.clone(), serde_json::json!({"op": "forget", "path": path})).await;
        assert_eq!((fin["ok"].as_bool(), fin["forgotten"].as_u64()), (Some(true), Some(0)), "{fin}");
        let fin = request(sock, serde_json::json!({"op": "forget", "path": "/nowhere/x.raw"})).await;
        assert_eq!((fin["ok"].as_bool(), fin["forgotten"].as_u64()), (Some(true), Some(0)), "{fin}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_panicking_download_task_answers_every_waiter_and_the_next_ensure_starts_afresh() {
        let a = Host::new();
        let (_a, m, data) = origin(&a).await;
        let b = Host::new();
        let (d, sock) = b.daemon().await;
        let release = d.inject(Stage::Download, true);
        let waiters: Vec<_> = (0..2).map(|_| tokio::spawn(request(sock.clone(), ensure(&m)))).collect();
        until("two requests wait for the download", || d.waiters("p", "base.raw") == 2).await;
        release.notify_one();
        for w in waiters {
            let fin = w.await.unwrap();
            assert_eq!(fin["ok"], false, "{fin}");
            assert_eq!(fin["error"], "the download task panicked: injected fault", "{fin}");
        }
        let st = status_of(&sock, "base.raw").await;
        assert_eq!((st["state"].as_str(), st["fetches"].as_u64()), (Some("failed"), Some(1)), "{st}");
        assert_eq!(st["error"], "the download task panicked: injected fault", "{st}");

        let fin = request(sock.clone(), ensure(&m)).await;
        assert_eq!((fin["ok"].as_bool(), fin["state"].as_str()), (Some(true), Some("fetched")), "{fin}");
        assert!(std::fs::read(b.pool.join("base.raw")).unwrap() == data, "the master is byte-identical");
        let st = status_of(&sock, "base.raw").await;
        assert_eq!((st["state"].as_str(), st["fetches"].as_u64()), (Some("seeding"), Some(2)), "{st}");
    }

    /// A seeding origin uploading at most 256 KiB/s (its 2 MiB master takes seconds to arrive),
    /// and a lazy host that knows it as a peer.
    async fn slow_origin_and_lazy_peer() -> (Host, Arc<Ctx>, Manifest, Vec<u8>, Host) {
        let mut a = Host::new();
        a.cfg.upload_limit = Some(256 << 10);
        let (actx, m, data) = origin(&a).await;
        let mut b = peer_of(&a);
        b.cfg.lazy = true;
        (a, actx, m, data, b)
    }

    fn export(m: &Manifest) -> serde_json::Value {
        serde_json::json!({"op": "export", "pool": "p", "manifest": m})
    }

    /// What QEMU's NBD client reads from the export on `socket` (raw, all of it); Err: its stderr.
    async fn qemu_reads(socket: &str) -> Result<Vec<u8>, String> {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let json = format!(
            r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"unix","path":"{socket}"}}}}}}"#
        );
        let o = out.clone();
        let r = tokio::task::spawn_blocking(move || {
            std::process::Command::new("qemu-img").args(["convert", "-O", "raw", &json]).arg(&o).output().unwrap()
        })
        .await
        .unwrap();
        if !r.status.success() {
            return Err(String::from_utf8_lossy(&r.stderr).into_owned());
        }
        Ok(std::fs::read(&out).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    async fn a_lazy_export_serves_verified_bytes_before_the_master_is_in_the_pool_then_the_pool_file() {
        let (_a, _actx, m, data, b) = slow_origin_and_lazy_peer().await;
        let (_d, sock) = b.daemon().await;
        let fin = request(sock.clone(), export(&m)).await;
        assert_eq!((fin["ok"].as_bool(), fin["state"].as_str()), (Some(true), Some("exported")), "{fin}");
        assert!(!b.pool.join("base.raw").exists(), "nothing partial in the pool while it is served");
        let socket = fin["path"].as_str().unwrap().to_string();
        assert!(qemu_reads(&socket).await.unwrap() == data, "QEMU reads the master's bytes through the export");
        // The read above asked for every piece, so the fetch may have finished and published the
        // master by now ("present"), or be finishing ("fetched" once it has).
        let fin = request(sock.clone(), ensure(&m)).await;
        assert_eq!(fin["ok"].as_bool(), Some(true), "{fin}");
        assert!(matches!(fin["state"].as_str(), Some("fetched" | "present")), "{fin}");
        assert!(std::fs::read(b.pool.join("base.raw")).unwrap() == data, "the published master is byte-identical");
        assert!(qemu_reads(&socket).await.unwrap() == data, "and the pool's file once published");
        let fin = request(sock.clone(), export(&m)).await;
        assert_eq!(fin["state"], "present", "a master already here is not exported: {fin}");
    }

    /// Boot first: pieces a reader waits on are fetched before the background order. An origin
    /// uploading 2 MiB/s seeds 32 MiB; a peer reads four pieces in its second half at once, as
    /// soon as its download starts: they arrive while most of the master is still missing (in
    /// the background's rarest-first random order they would come, on average, with half of it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_readers_pieces_arrive_before_the_background_pieces() {
        let mut a = Host::new();
        a.cfg.upload_limit = Some(2 << 20);
        // A super-seed would offer only the pieces it chooses (docs/lazy.md).
        a.cfg.super_seed = false;
        let data = bytes(32 << 20);
        std::fs::write(a.pool.join("big.raw"), &data).unwrap();
        let p = publish_in(&a.cfg, &a.pools(), "p", "big.raw").unwrap();
        let actx = a.ctx().await;
        actx.seed(&p.manifest, &p.path).await.unwrap();
        let m = p.manifest;
        let b = peer_of(&a);
        let torrents = Torrents::start(&b.cfg).await.unwrap();
        let staged = b.pool.join(".staged");
        std::fs::File::create(&staged).unwrap().set_len(m.size).unwrap();
        let torrent = std::fs::read(&p.torrent_path).unwrap();
        let origin = format!("127.0.0.1:{}", a.cfg.listen_port).parse().unwrap();
        let h = torrents.download(&torrent, &staged, vec![origin], &[]).await.unwrap();
        let v = h.verified().await.unwrap();
        let pl = u64::from(m.piece_length);
        assert!(m.size / pl >= 16, "{} pieces", m.size / pl);
        let at = |k: u64| (m.size / 8 * k) / pl * pl + 100;
        let (mut b1, mut b2, mut b3, mut b4) = (vec![0u8; 4096], vec![0u8; 4096], vec![0u8; 4096], vec![0u8; 4096]);
        let started = Instant::now();
        let reads = async {
            tokio::try_join!(
                v.read_at(at(4), &mut b1),
                v.read_at(at(5), &mut b2),
                v.read_at(at(6), &mut b3),
                v.read_at(at(7), &mut b4)
            )
        };
        tokio::time::timeout(Duration::from_secs(60), reads).await.expect("the reads end").unwrap();
        let done = h.progress().done_bytes;
        eprintln!("4 pieces read in {:?} with {done} of {} bytes here", started.elapsed(), m.size);
        for (k, b) in [(4, &b1), (5, &b2), (6, &b3), (7, &b4)] {
            let o = at(k) as usize;
            assert!(b[..] == data[o..o + 4096], "the bytes of piece {k}/8 are the master's");
        }
        assert!(done < m.size / 3, "the read pieces came first: {done} of {} bytes here", m.size);
        torrents.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    async fn a_corrupt_piece_from_a_peer_is_never_served() {
        let (a, _actx, m, data, mut b) = slow_origin_and_lazy_peer().await;
        // Bounds the read over the corrupt piece, and also the export's 2 MiB head read, which at
        // the origin's 256 KiB/s takes 8 s at best, more behind pieces already requested: 15 s
        // failed under a loaded full test run.
        b.cfg.lazy_read_timeout = 30;
        let pl = m.piece_length;
        assert!((2 << 20) % pl == 0 && m.size > 2 << 20, "the last piece lies past the 2 MiB head");
        // The origin now uploads its last piece corrupted (it checked its file when it started).
        let f = std::fs::OpenOptions::new().write(true).open(a.pool.join("base.raw")).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0x55; 64], m.size - 100).unwrap();
        let (_d, sock) = b.daemon().await;
        let fin = request(sock.clone(), export(&m)).await;
        assert_eq!(fin["state"], "exported", "{fin}");
        let socket = fin["path"].as_str().unwrap().to_string();
        let err = qemu_reads(&socket).await.unwrap_err();
        assert!(err.contains("Input/output error"), "a read over the corrupt piece fails: {err}");
        let head = read_range(&socket, 0, pl).await;
        assert!(head == data[..pl as usize], "verified pieces are served");
        assert!(!b.pool.join("base.raw").exists());
    }

    /// `len` bytes at `offset` of the export on `socket`, as QEMU's NBD client reads them.
    async fn read_range(socket: &str, offset: u64, len: u64) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let json = format!(
            r#"json:{{"driver":"raw","offset":{offset},"size":{len},"file":{{"driver":"nbd","server":{{"type":"unix","path":"{socket}"}}}}}}"#
        );
        let o = out.clone();
        let r = tokio::task::spawn_blocking(move || {
            std::process::Command::new("qemu-img").args(["convert", "-O", "raw", &json]).arg(&o).output().unwrap()
        })
        .await
        .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        std::fs::read(&out).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_lazy_master_failing_its_final_checks_is_never_published_and_its_export_stops() {
        let (_a, _actx, m, _data, b) = slow_origin_and_lazy_peer().await;
        let (_d, sock) = b.daemon().await;
        let wrong = Manifest { sha256: "0".repeat(64), ..m };
        let fin = request(sock.clone(), export(&wrong)).await;
        assert_eq!(fin["state"], "exported", "pieces pass their SHA-1: served until the whole file is checked: {fin}");
        let socket = fin["path"].as_str().unwrap().to_string();
        let fin = request(sock.clone(), ensure(&wrong)).await;
        assert_eq!(fin["ok"], false, "{fin}");
        assert!(fin["error"].as_str().unwrap().contains("SHA-256"), "{fin}");
        assert!(!b.pool.join("base.raw").exists(), "never published");
        assert!(!Path::new(&socket).exists(), "the export's socket is gone");
        let st = status_of(&sock, "base.raw").await;
        assert_eq!(st["state"], "failed", "{st}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_export_is_refused_unless_lazy_is_on() {
        let b = Host::new();
        let (_d, sock) = b.daemon().await;
        let fin = request(sock, serde_json::json!({"op": "export", "pool": "p", "name": "x.qcow2"})).await;
        assert_eq!(fin["ok"], false);
        assert!(fin["error"].as_str().unwrap().starts_with("lazy masters are off on this host"), "{fin}");
    }

    /// A master's identity as a domain's metadata records it.
    fn identity_of(m: &Manifest) -> proto::Identity {
        proto::Identity {
            name: m.name.clone(),
            format: m.format.clone(),
            sha256: m.sha256.clone(),
            info_hash: Some(m.info_hash.clone()),
            virtual_size: Some(m.virtual_size),
        }
    }

    fn ensure_identity(id: &proto::Identity) -> serde_json::Value {
        serde_json::json!({"op": "ensure", "pool": "p", "identity": id})
    }

    /// A host that knows `origin`'s address as a peer (and nothing else about its masters).
    fn peer_of(origin: &Host) -> Host {
        let mut b = Host::new();
        b.cfg.peers = vec![format!("127.0.0.1:{}", origin.cfg.listen_port)];
        b
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_master_named_by_identity_only_is_fetched_by_magnet_and_verified() {
        let a = Host::new();
        let (_a, m, data) = origin(&a).await;
        let b = peer_of(&a);
        let (_d, sock) = b.daemon().await;
        let fin = request(sock.clone(), ensure_identity(&identity_of(&m))).await;
        assert_eq!((fin["ok"].as_bool(), fin["state"].as_str()), (Some(true), Some("fetched")), "{fin}");
        assert!(std::fs::read(b.pool.join("base.raw")).unwrap() == data, "the master is byte-identical");
        // Asked again: it is here, without asking any peer.
        let fin = request(sock.clone(), ensure_identity(&identity_of(&m))).await;
        assert_eq!((fin["ok"].as_bool(), fin["state"].as_str()), (Some(true), Some("present")), "{fin}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn requests_for_one_identity_at_once_share_one_download() {
        let a = Host::new();
        let (_a, m, data) = origin(&a).await;
        let b = peer_of(&a);
        let (_d, sock) = b.daemon().await;
        let asks: Vec<_> =
            (0..4).map(|_| tokio::spawn(request(sock.clone(), ensure_identity(&identity_of(&m))))).collect();
        for ask in asks {
            let fin = ask.await.unwrap();
            assert_eq!(fin["ok"], true, "{fin}");
        }
        assert!(std::fs::read(b.pool.join("base.raw")).unwrap() == data, "the master is byte-identical");
        let st = status_of(&sock, "base.raw").await;
        assert_eq!((st["state"].as_str(), st["fetches"].as_u64()), (Some("seeding"), Some(1)), "{st}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_identity_with_a_wrong_sha256_fails_and_leaves_nothing_in_the_pool() {
        let a = Host::new();
        let (_a, m, _) = origin(&a).await;
        let b = peer_of(&a);
        let (_d, sock) = b.daemon().await;
        let id = proto::Identity { sha256: "0".repeat(64), ..identity_of(&m) };
        let fin = request(sock.clone(), ensure_identity(&id)).await;
        assert_eq!(fin["ok"], false, "{fin}");
        let e = fin["error"].as_str().unwrap();
        assert!(e.starts_with("'base.raw' failed verification (nothing was put in the pool): "), "{e}");
        assert!(e.contains(&"0".repeat(64)), "{e}");
        let left: Vec<_> = std::fs::read_dir(&b.pool).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_identity_whose_torrent_names_another_file_is_refused_before_any_download() {
        let a = Host::new();
        let (_a, m, _) = origin(&a).await;
        let b = peer_of(&a);
        let (_d, sock) = b.daemon().await;
        let id = proto::Identity { name: "renamed.raw".into(), ..identity_of(&m) };
        let fin = request(sock.clone(), ensure_identity(&id)).await;
        assert_eq!(fin["ok"], false, "{fin}");
        let e = fin["error"].as_str().unwrap();
        assert!(e.contains("disagrees with its identity: it names the file 'base.raw'"), "{e}");
        assert_eq!(std::fs::read_dir(&b.pool).unwrap().count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_name_resolves_through_the_trusted_catalog_only() {
        let a = Host::new();
        let (_a, m, data) = origin(&a).await;
        // B knows no peer from its config: the catalog entry's host is the peer.
        let b = Host::new();
        let (d, sock) = b.daemon().await;
        let by_name = serde_json::json!({"op": "ensure", "pool": "p", "name": "base.raw"});
        let fin = request(sock.clone(), by_name.clone()).await;
        assert_eq!(fin["ok"], false, "{fin}");
        assert_eq!(
            fin["error"],
            "no trusted master named 'base.raw' in the LAN catalog (for pool 'p'); publish it on a host of the LAN, \
             or name it by identity"
        );
        let trusted = |m: Manifest, signer: &str, host: String| crate::catalog::Trusted {
            manifest: m,
            signed_text: String::new(),
            signature: String::new(),
            signer: signer.into(),
            host: Some(host),
        };
        d.ctx.catalog.insert_trusted(trusted(m.clone(), "alice", format!("127.0.0.1:{}", a.cfg.listen_port)));
        let fin = request(sock.clone(), by_name.clone()).await;
        assert_eq!((fin["ok"].as_bool(), fin["state"].as_str()), (Some(true), Some("fetched")), "{fin}");
        assert!(std::fs::read(b.pool.join("base.raw")).unwrap() == data, "the master is byte-identical");
        // Another trusted master under the name: a conflict naming both, never resolved.
        let other = Manifest { sha256: "e".repeat(64), ..m };
        d.ctx.catalog.insert_trusted(trusted(other, "mallory", "10.9.9.9:6881".into()));
        let fin = request(sock.clone(), by_name).await;
        let e = fin["error"].as_str().unwrap();
        assert!(e.starts_with("two different masters are published as 'base.raw'"), "{e}");
        assert!(e.contains("alice") && e.contains("mallory") && e.contains("10.9.9.9:6881"), "{e}");
    }

    /// A host whose record says it published `base.raw`, and a daemon that re-verifies it with a
    /// fault armed at the re-verification.
    async fn restarted_with_a_fault(panic: bool) -> (Host, Manifest, Arc<Daemon>, PathBuf, Arc<Notify>) {
        let h = Host::new();
        std::fs::write(h.pool.join("base.raw"), bytes(1 << 20)).unwrap();
        let m = publish_in(&h.cfg, &h.pools(), "p", "base.raw").unwrap().manifest;
        let (d, sock) = h.daemon().await;
        let release = d.inject(Stage::Verify, panic);
        d.start_recorded();
        (h, m, d, sock, release)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_ensure_during_the_start_up_verification_gets_its_answer_when_it_ends() {
        let (h, m, d, sock, release) = restarted_with_a_fault(false).await;
        let waiter = tokio::spawn(request(sock.clone(), ensure(&m)));
        until("the request waits for the verification", || d.waiters("p", "base.raw") == 1).await;
        release.notify_one();
        let fin = waiter.await.unwrap();
        assert_eq!((fin["ok"].as_bool(), fin["state"].as_str()), (Some(true), Some("present")), "{fin}");
        assert_eq!(fin["path"], h.pool.join("base.raw").display().to_string());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_panicking_start_up_verification_answers_its_waiters_and_shows_why() {
        let (_h, m, d, sock, release) = restarted_with_a_fault(true).await;
        let waiter = tokio::spawn(request(sock.clone(), ensure(&m)));
        until("the request waits for the verification", || d.waiters("p", "base.raw") == 1).await;
        release.notify_one();
        let fin = waiter.await.unwrap();
        assert_eq!(fin["ok"], false, "{fin}");
        assert_eq!(fin["error"], "the verification task panicked: injected fault", "{fin}");
        let st = status_of(&sock, "base.raw").await;
        assert_eq!(st["state"], "failed", "{st}");
        assert_eq!(st["error"], "the verification task panicked: injected fault", "{st}");
    }

    /// Writes `bytes` (and keeps the connection open); returns every line the daemon sends
    /// before it closes the connection, and how long that took.
    async fn raw(sock: &Path, bytes: &[u8]) -> (Vec<String>, Duration) {
        let start = std::time::Instant::now();
        let s = UnixStream::connect(sock).await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(bytes).await.unwrap();
        let mut lines = BufReader::new(r).lines();
        let mut out = Vec::new();
        let read = async {
            while let Some(l) = lines.next_line().await.unwrap() {
                out.push(l);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read).await.expect("the daemon kept the connection open");
        drop(w);
        (out, start.elapsed())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_line_that_is_not_utf8_gets_an_answer() {
        let h = Host::new();
        let (_d, sock) = h.daemon().await;
        let (lines, _) = raw(&sock, b"{\"op\":\"st\xffatus\"}\n").await;
        assert_eq!(lines.len(), 1, "{lines:?}");
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["error"].as_str().unwrap().starts_with("bad request: the request line is not UTF-8"), "{v}");
        // Still serving.
        assert_eq!(request(sock.clone(), serde_json::json!({"op": "status"})).await["ok"], true);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_sends_nothing_or_half_a_line_is_answered_and_dropped_after_the_bound() {
        let h = Host::new();
        let (_d, sock) = h.daemon_with(Duration::from_secs(1)).await;
        for sent in [&b""[..], &b"{\"op\":"[..]] {
            let (lines, took) = raw(&sock, sent).await;
            assert_eq!(
                lines,
                [r#"{"ok":false,"error":"no complete request line within 1 s; send one JSON object and a newline"}"#],
                "{sent:?}"
            );
            assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(5), "{took:?}");
        }
        assert_eq!(request(sock.clone(), serde_json::json!({"op": "status"})).await["ok"], true);
    }

    #[test]
    fn the_control_socket_never_appears_with_another_mode_than_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run").join("control.sock");
        let mut seen = Vec::new();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _g = rt.enter();
        let check = |seen: &mut Vec<String>| match std::fs::symlink_metadata(&path) {
            Ok(m) => seen.push(format!("{:o}", m.permissions().mode() & 0o777)),
            Err(e) => seen.push(e.kind().to_string()),
        };
        // Twice: the second replaces the first's (stale) socket.
        for _ in 0..2 {
            let l = Daemon::bind_probed(&path, &mut |bound| {
                check(&mut seen);
                // Where it is bound, nobody else can reach it.
                let dir = bound.parent().unwrap();
                assert_eq!(std::fs::metadata(dir).unwrap().permissions().mode() & 0o777, 0o700);
            })
            .unwrap();
            check(&mut seen);
            assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
            drop(l);
        }
        assert_eq!(seen, ["entity not found", "600", "600", "600"]);
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, ["control.sock"], "nothing else left beside the socket");
    }
}
