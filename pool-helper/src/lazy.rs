//! Lazy masters (docs/lazy.md): while a master downloads, a read-only NBD export on a Unix socket
//! serves its bytes to QEMU, piece by piece, and only pieces that passed their SHA-1 against the
//! trusted info-hash. A read waits (at most `lazy_read_timeout`) for the pieces it covers, and
//! librqbit fetches the pieces after the reader's position first. Before the export serves any
//! byte, the image's head is checked as the full check would ([`verify::check_head`]: for qcow2
//! the header rules, for raw the format sniffing), and for qcow2 its L1 and refcount tables are
//! fetched and the L1 entries checked to point inside the file. When the master is published the
//! export reads the pool's file instead; when the fetch fails (final checks included) the export
//! stops: every read fails (the guest sees an I/O error, never data) and the socket goes.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::nbd::{self, Export, FileSource, Source};
use crate::torrent::VerifiedRead;
use crate::verify::{self, Expect, ImageError};

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("reading the head of '{name}' for its checks")]
    Head {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("'{name}' failed the checks made before a lazy start (nothing was served)")]
    Image {
        name: String,
        #[source]
        source: ImageError,
    },
    #[error("'{name}': qcow2 {what} refused before a lazy start (nothing was served)")]
    Tables { name: String, what: String },
    #[error("cannot listen on the NBD socket '{path}'")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where an export's bytes come from now.
#[derive(Clone)]
enum Backing {
    /// The download: verified pieces only, read positionally (many reads at once).
    Pieces(Arc<dyn VerifiedRead>),
    /// The published master (complete, fully verified).
    File(Arc<std::fs::File>),
    /// Stopped: every read fails with this reason.
    Failed(String),
}

/// Upper bounds (exclusive) of the read-time buckets of [`ReadStats`], in microseconds; the
/// last bucket holds the rest.
const BUCKETS_US: [u64; 5] = [1_000, 10_000, 100_000, 1_000_000, 10_000_000];

/// How long an export's reads took (waiting for pieces included): counts, total, max and a
/// histogram, for the log (docs/lazy.md "Where the time goes").
#[derive(Debug, Default)]
pub struct ReadStats {
    reads: AtomicU64,
    bytes: AtomicU64,
    total_us: AtomicU64,
    max_us: AtomicU64,
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
}

impl ReadStats {
    fn add(&self, len: usize, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.total_us.fetch_add(us, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
        let b = BUCKETS_US.iter().position(|&u| us < u).unwrap_or(BUCKETS_US.len());
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
    }

    /// How many reads so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// One line: `reads N (B bytes), avg A ms, max M ms, <1ms/<10ms/<100ms/<1s/<10s/more: a/b/c/d/e/f`.
    pub fn summary(&self) -> String {
        let n = self.reads();
        let total = self.total_us.load(Ordering::Relaxed);
        let avg = if n == 0 { 0.0 } else { total as f64 / n as f64 / 1000.0 };
        let h: Vec<String> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed).to_string()).collect();
        format!(
            "reads {n} ({} bytes), avg {avg:.1} ms, max {:.1} ms, <1ms/<10ms/<100ms/<1s/<10s/more: {}",
            self.bytes.load(Ordering::Relaxed),
            self.max_us.load(Ordering::Relaxed) as f64 / 1000.0,
            h.join("/")
        )
    }
}

/// An export's bytes: see the module docs.
pub struct LazySource {
    name: String,
    backing: Mutex<Backing>,
    read_timeout: Duration,
    /// Reads answered from verified pieces (the download), and from the published file.
    pub from_pieces: ReadStats,
    pub from_file: ReadStats,
}

impl std::fmt::Debug for LazySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazySource").field("name", &self.name).finish()
    }
}

fn timed_out(secs: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the pieces were not downloaded and verified within {secs} s"),
    )
}

impl LazySource {
    pub fn new(name: &str, pieces: Arc<dyn VerifiedRead>, read_timeout: Duration) -> Self {
        LazySource {
            name: name.into(),
            backing: Mutex::new(Backing::Pieces(pieces)),
            read_timeout,
            from_pieces: ReadStats::default(),
            from_file: ReadStats::default(),
        }
    }

    fn backing(&self) -> Backing {
        self.backing.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, b: Backing) {
        *self.backing.lock().unwrap_or_else(|p| p.into_inner()) = b;
    }

    /// The master is published at `path`: reads go to that file from now on.
    pub fn published(&self, path: &Path) -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)?;
        self.set(Backing::File(Arc::new(f)));
        Ok(())
    }

    /// The master failed: every read from now on fails with `reason`.
    pub fn fail(&self, reason: &str) {
        self.set(Backing::Failed(reason.into()));
    }
}

impl Source for LazySource {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let t = Instant::now();
        match self.backing() {
            Backing::Failed(why) => Err(std::io::Error::other(why)),
            Backing::File(f) => {
                FileSource(f).read_at(offset, buf).await?;
                self.from_file.add(buf.len(), t.elapsed());
                Ok(())
            }
            Backing::Pieces(r) => {
                let read = r.read_at(offset, buf);
                let secs = self.read_timeout.as_secs();
                let res = tokio::time::timeout(self.read_timeout, read).await.unwrap_or_else(|_| Err(timed_out(secs)));
                match (res, self.backing()) {
                    (Ok(()), _) => {
                        self.from_pieces.add(buf.len(), t.elapsed());
                        Ok(())
                    }
                    // Published meanwhile (the download's torrent is gone): the file has the bytes.
                    (Err(_), Backing::File(f)) => FileSource(f).read_at(offset, buf).await,
                    (Err(e), _) => Err(e),
                }
            }
        }
    }
}

/// The most table bytes read before a lazy start (L1 plus refcount table).
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

/// The L1 entry bits that must be zero (reserved: 1-8 and 56-62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;
const L1_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;

/// Checks a qcow2 L1 table: every entry reserved-bits-clear, and its L2 table (when allocated)
/// a whole cluster inside the file.
pub fn check_l1(l1: &[u8], cluster: u64, file_size: u64) -> Result<(), String> {
    for (i, e) in l1.chunks_exact(8).map(|c| c.try_into().map_or(0, u64::from_be_bytes)).enumerate() {
        if e & L1_RESERVED != 0 {
            return Err(format!("L1 entry {i} has reserved bits set ({e:#x})"));
        }
        let off = e & L1_OFFSET;
        if off != 0 && (!off.is_multiple_of(cluster) || off.checked_add(cluster).is_none_or(|end| end > file_size)) {
            return Err(format!("L1 entry {i} points outside the file or off a cluster ({off:#x})"));
        }
    }
    Ok(())
}

/// What is checked before serving any byte (module docs). `size` is the file's length from the
/// trusted manifest.
pub async fn precheck<S: Source>(src: &S, e: &Expect<'_>) -> Result<(), LazyError> {
    let name = e.name.to_string();
    let t = Instant::now();
    let io = |source| LazyError::Head { name: name.clone(), source };
    let mut head = vec![0u8; verify::HEAD_BYTES.min(e.size) as usize];
    src.read_at(0, &mut head).await.map_err(io)?;
    let head_ms = t.elapsed().as_millis();
    verify::check_head(&head, e).map_err(|source| LazyError::Image { name: name.clone(), source })?;
    if e.format != "qcow2" {
        return Ok(());
    }
    // The same parse check_head made: the tables lie inside the file, on clusters.
    let q =
        verify::check_qcow2_header(&head, e.size).map_err(|source| LazyError::Image { name: name.clone(), source })?;
    let cluster = 1u64 << q.cluster_bits;
    let (l1_off, l1_len) = (q.l1_offset, q.l1_entries * 8);
    let (rt_off, rt_len) = (q.refcount_table_offset, q.refcount_table_clusters * cluster);
    let tables = |what: String| LazyError::Tables { name: name.clone(), what };
    if l1_len.saturating_add(rt_len) > MAX_TABLE_BYTES {
        return Err(tables(format!("tables of {} bytes (more than {MAX_TABLE_BYTES})", l1_len + rt_len)));
    }
    let mut l1 = vec![0u8; l1_len as usize];
    read_chunked(src, l1_off, &mut l1).await.map_err(io)?;
    let l1_ms = t.elapsed().as_millis();
    check_l1(&l1, cluster, e.size).map_err(tables)?;
    // The refcount table is only fetched (verified pieces, read first): QEMU reads it at open.
    let mut rt = vec![0u8; rt_len as usize];
    read_chunked(src, rt_off, &mut rt).await.map_err(io)?;
    tracing::info!(
        "checks of '{name}' before its export: head read at {head_ms} ms, L1 ({l1_len} bytes) at {l1_ms} ms, refcount table ({rt_len} bytes) at {} ms",
        t.elapsed().as_millis()
    );
    Ok(())
}

async fn read_chunked<S: Source>(src: &S, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    for (i, c) in buf.chunks_mut(nbd::MAX_REQUEST_LEN as usize).enumerate() {
        src.read_at(offset + (i as u64) * u64::from(nbd::MAX_REQUEST_LEN), c).await?;
    }
    Ok(())
}

/// One master's NBD export: its socket and the task accepting on it.
#[derive(Debug)]
pub struct LazyExport {
    pub socket: PathBuf,
    export: Arc<Export<LazySource>>,
    accept: tokio::task::JoinHandle<()>,
    stats: tokio::task::JoinHandle<()>,
}

/// How often an export's read times are logged while reads come.
const STATS_EVERY: Duration = Duration::from_secs(5);

impl LazyExport {
    /// Listens on `socket` (a stale one is replaced; mode 0666 so that QEMU, whatever its user,
    /// can connect: the bytes are those of a master, which is 0444 in its pool anyway).
    pub fn start(socket: PathBuf, export: Export<LazySource>) -> Result<LazyExport, LazyError> {
        let err = |source| LazyError::Listen { path: socket.display().to_string(), source };
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).map_err(err)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
        let export = Arc::new(export);
        let e = export.clone();
        let accept = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((c, _)) => {
                        let e = e.clone();
                        tokio::spawn(async move {
                            match nbd::serve(c, e.clone()).await {
                                Ok(s) => tracing::debug!("NBD client of '{}' left: {s:?}", e.name),
                                Err(err) => {
                                    tracing::info!("NBD client of '{}': {}", e.name, vcc_core::error::one_line(&err))
                                }
                            }
                        });
                    }
                    Err(err) => {
                        tracing::warn!("NBD accept for '{}': {err}", e.name);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        let weak = Arc::downgrade(&export);
        let stats = tokio::spawn(async move {
            // Where the time goes (docs/lazy.md): the reads' times, every 5 s while they change.
            let mut seen = 0;
            loop {
                tokio::time::sleep(STATS_EVERY).await;
                let Some(e) = weak.upgrade() else { break };
                let n = e.source.from_pieces.reads() + e.source.from_file.reads();
                if n != seen {
                    seen = n;
                    tracing::info!(
                        "export of '{}': from pieces: {}; from the file: {}",
                        e.name,
                        e.source.from_pieces.summary(),
                        e.source.from_file.summary()
                    );
                }
            }
        });
        Ok(LazyExport { socket, export, accept, stats })
    }

    /// The master is in the pool at `path`: serve that file.
    pub fn published(&self, path: &Path) {
        tracing::info!(
            "export of '{}' reads the pool's file from now on; from pieces: {}",
            self.export.name,
            self.export.source.from_pieces.summary()
        );
        if let Err(e) = self.export.source.published(path) {
            self.stop(&format!("cannot open the published master '{}': {e}", path.display()));
        }
    }

    /// Stops the export: reads fail with `reason` (also on connections already open), no new
    /// connection is accepted, the socket goes.
    pub fn stop(&self, reason: &str) {
        tracing::warn!("lazy export of '{}' stopped: {reason}", self.export.name);
        self.export.source.fail(reason);
        self.accept.abort();
        self.stats.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn qcow2_with_l1(entry: u64) -> Vec<u8> {
        let mut img = verify::test_qcow2(1 << 20);
        let l1_off = u64::from_be_bytes(img[40..48].try_into().unwrap()) as usize;
        let need = l1_off + 8;
        if img.len() < need {
            img.resize(need, 0);
        }
        img[l1_off..l1_off + 8].copy_from_slice(&entry.to_be_bytes());
        img
    }

    struct Bytes(Vec<u8>);
    impl Source for Bytes {
        async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let o = offset as usize;
            let s = self.0.get(o..o + buf.len()).ok_or_else(|| std::io::Error::other("past the end"))?;
            buf.copy_from_slice(s);
            Ok(())
        }
    }

    fn expect(format: &'static str, size: u64, virtual_size: u64) -> Expect<'static> {
        Expect {
            format,
            name: "m",
            size,
            virtual_size,
            sha256: "",
            policy: verify::ImagePolicy { max_virtual_size: 1 << 40, qemu_img: false },
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn read_stats_count_sum_max_and_bucket_each_read() {
        let s = ReadStats::default();
        s.add(4096, Duration::from_micros(500));
        s.add(4096, Duration::from_millis(50));
        s.add(512, Duration::from_secs(2));
        assert_eq!(s.reads(), 3);
        let line = s.summary();
        assert!(line.starts_with("reads 3 (8704 bytes), avg 683.5 ms, max 2000.0 ms"), "{line}");
        assert!(line.ends_with(": 1/0/1/0/1/0"), "{line}");
    }

    #[test]
    fn l1_entries_must_point_at_whole_clusters_inside_the_file() {
        let c = 65536;
        let e = |v: u64| v.to_be_bytes().to_vec();
        check_l1(&[e(0), e(c), e((1 << 63) | (2 * c))].concat(), c, 3 * c).unwrap();
        assert!(check_l1(&e(3 * c), c, 3 * c).unwrap_err().contains("outside"));
        assert!(check_l1(&e(c + 512), c, 3 * c).unwrap_err().contains("off a cluster"));
        assert!(check_l1(&e(c | 2), c, 3 * c).unwrap_err().contains("reserved"));
    }

    #[test]
    fn a_sound_qcow2_head_passes_and_a_backing_file_or_bad_l1_is_refused_before_serving() {
        let img = qcow2_with_l1(0);
        let size = img.len() as u64;
        rt().block_on(precheck(&Bytes(img.clone()), &expect("qcow2", size, 1 << 20))).unwrap();
        let mut backing = img.clone();
        backing[8..16].copy_from_slice(&512u64.to_be_bytes());
        let err = rt().block_on(precheck(&Bytes(backing), &expect("qcow2", size, 1 << 20))).unwrap_err();
        assert!(matches!(err, LazyError::Image { .. }), "{err:?}");
        let bad = qcow2_with_l1(1 << 40);
        let size = bad.len() as u64;
        let err = rt().block_on(precheck(&Bytes(bad), &expect("qcow2", size, 1 << 20))).unwrap_err();
        assert!(matches!(err, LazyError::Tables { .. }), "{err:?}");
    }

    #[test]
    fn a_raw_head_that_sniffs_as_qcow2_is_refused_and_plain_raw_passes() {
        let img = verify::test_qcow2(1 << 20);
        let size = img.len() as u64;
        let err = rt().block_on(precheck(&Bytes(img), &expect("raw", size, size))).unwrap_err();
        assert!(matches!(err, LazyError::Image { .. }));
        rt().block_on(precheck(&Bytes(vec![0u8; 8192]), &expect("raw", 8192, 8192))).unwrap();
    }

    #[test]
    fn a_failed_export_answers_every_read_with_its_reason() {
        struct Never;
        impl VerifiedRead for Never {
            fn read_at<'a>(&'a self, _: u64, _: &'a mut [u8]) -> crate::torrent::ReadAt<'a> {
                Box::pin(std::future::pending())
            }
        }
        let s = LazySource::new("m", Arc::new(Never), Duration::from_millis(200));
        let mut b = [0u8; 16];
        let e = rt().block_on(s.read_at(0, &mut b)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "a piece that never comes is a bounded wait");
        s.fail("final check failed: SHA-256 differs");
        let e = rt().block_on(s.read_at(0, &mut b)).unwrap_err();
        assert!(e.to_string().contains("SHA-256"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        std::fs::write(&p, [7u8; 64]).unwrap();
        s.published(&p).unwrap();
        rt().block_on(s.read_at(8, &mut b)).unwrap();
        assert_eq!(b, [7u8; 16]);
    }
}
