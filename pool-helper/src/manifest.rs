//! The manifest: the trusted description of a master (name, format, sizes, SHA-256, info-hash).
//!
//! A manifest is what an operator or the hook hands to `fetch`/`ensure`. Everything fetched from
//! peers is checked against it. The name becomes the file name in the pool, so it is validated
//! strictly: no `/`, no leading `.`, printable ASCII-ish, at most 200 bytes. The magnet, the
//! peers and the trackers are checked as text (no name is resolved while validating), and a
//! manifest file is read by [`Manifest::load`] only: a regular file, at most
//! [`MAX_MANIFEST_BYTES`], opened non-blocking, within [`MANIFEST_READ_TIMEOUT`].

use serde::{Deserialize, Serialize};
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::metainfo;

pub const MANIFEST_VERSION: u32 = 1;
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;
pub const MAX_NAME_LEN: usize = 200;
/// A manifest file that cannot be read within this is refused (a hung network file system).
pub const MANIFEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest magnet, tracker URL and peer `HOST:PORT` accepted.
pub const MAX_MAGNET_LEN: usize = 64 * 1024;
pub const MAX_TRACKER_LEN: usize = 1024;
pub const MAX_PEER_LEN: usize = 300;
/// At most this many peers and trackers, in the lists and in the magnet each.
pub const MAX_HINTS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// File name of the master in the pool (also the volume name).
    pub name: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// File size in bytes.
    pub size: u64,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// SHA-256 of the whole file, lower-case hex.
    pub sha256: String,
    /// BitTorrent v1 info-hash, lower-case hex.
    pub info_hash: String,
    pub piece_length: u64,
    /// `magnet:?xt=urn:btih:...&x.pe=host:port...`
    pub magnet: String,
    #[serde(default)]
    pub peers: Vec<String>,
    #[serde(default)]
    pub trackers: Vec<String>,
    /// The .torrent itself, hex-encoded (so a fetch does not need metadata from peers). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torrent_hex: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest '{path}'")]
    Read {
        path: String,
        #[source]
        source: ReadError,
    },
    #[error("manifest is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("manifest field '{field}' is refused")]
    Invalid {
        field: &'static str,
        #[source]
        source: InvalidField,
    },
    #[error("manifest's torrent_hex")]
    Torrent(#[source] metainfo::MetainfoError),
}

/// Why a manifest field is refused.
#[derive(Debug, thiserror::Error)]
pub enum InvalidField {
    #[error("version {0} is not supported (want {MANIFEST_VERSION})")]
    Version(u32),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("format '{0}' is not accepted (qcow2 or raw)")]
    Format(String),
    #[error("size is 0")]
    ZeroSize,
    #[error("a raw image has virtual_size {virtual_size} != size {size}")]
    RawSizes { virtual_size: u64, size: u64 },
    #[error("not {0} lower-case hex digits")]
    NotHex(usize),
    #[error("piece_length {0} is not a power of two in [16 KiB, 64 MiB]")]
    PieceLength(u64),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error(transparent)]
    Magnet(#[from] MagnetError),
    #[error("more than {MAX_HINTS} entries")]
    TooMany,
    #[error("a raw master named '{0}' would be probed as dmg by its name (QEMU's dmg probe): rename it")]
    RawDmgName(String),
    #[error("torrent_hex is not hex")]
    TorrentHex,
    #[error("the torrent's piece length {torrent} != piece_length {manifest}")]
    TorrentPieceLength { torrent: u64, manifest: u64 },
}

/// Why a name cannot be a file name in a pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("name '{name}' starts with '{first}'")]
    Leading { name: String, first: char },
    #[error("name '{name}' contains {found:?} (allowed: letters, digits, ._-+@,=~)")]
    Char { name: String, found: char },
}

/// Why a file (a manifest, the config) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(std::io::Error),
    #[error("it is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("it is larger than {0} bytes")]
    TooLarge(u64),
    #[error("reading it took longer than {0} s (a hung file system?)")]
    Timeout(u64),
    #[error("the reading thread ended without an answer")]
    Lost,
}

/// Why a magnet is refused.
#[derive(Debug, thiserror::Error)]
pub enum MagnetError {
    #[error("magnet is longer than {MAX_MAGNET_LEN} bytes")]
    TooLong,
    #[error("'{0}' is not a magnet:? URI")]
    NotMagnet(String),
    #[error("magnet parameter '{0}' is not understood (allowed: xt, dn, tr, x.pe)")]
    Parameter(String),
    #[error("magnet parameter '{0}' is not valid percent-encoded UTF-8")]
    Encoding(&'static str),
    #[error("magnet has no xt=urn:btih:")]
    NoHash,
    #[error("magnet has more than one {0}")]
    Repeated(&'static str),
    #[error("magnet xt '{0}' is not urn:btih: with 40 hex or 32 base32 digits")]
    Hash(String),
    #[error("magnet's info-hash {got} differs from info_hash {want}")]
    OtherHash { got: String, want: String },
    #[error("magnet dn")]
    Name(#[source] NameError),
    #[error("magnet has more than {MAX_HINTS} tr or x.pe parameters")]
    TooMany,
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error(transparent)]
    Peer(#[from] PeerError),
}

/// Why a tracker URL is refused.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("tracker '{0}' is not an http://, https:// or udp:// URL")]
    Scheme(String),
    #[error("tracker URL is longer than {MAX_TRACKER_LEN} bytes")]
    TooLong,
    #[error("tracker '{0}' has no host or a bad one (letters, digits, '-', '.', ':', '[', ']')")]
    Host(String),
    #[error("tracker '{0}' contains a space, a control character or a non-ASCII byte")]
    Char(String),
}

/// Why a peer `HOST:PORT` is refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer '{0}' is not HOST:PORT")]
    NotHostPort(String),
    #[error("peer is longer than {MAX_PEER_LEN} bytes")]
    TooLong,
    #[error("peer '{0}' has a bad port")]
    Port(String),
    #[error("peer '{0}' has a bad host name")]
    Host(String),
    #[error("cannot resolve peer '{peer}'")]
    Resolve {
        peer: String,
        #[source]
        source: std::io::Error,
    },
}

/// Checks a name used as a file name in a pool.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if let Some(first) = name.chars().next().filter(|c| *c == '.' || *c == '-') {
        return Err(NameError::Leading { name: name.escape_debug().to_string(), first });
    }
    if let Some(found) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "._-+@,=~".contains(*c))) {
        return Err(NameError::Char { name: name.escape_debug().to_string(), found });
    }
    Ok(())
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Manifest {
    /// Parses and validates a manifest from JSON text.
    pub fn from_json(text: &str) -> Result<Self, ManifestError> {
        let m: Manifest = serde_json::from_str(text).map_err(ManifestError::Json)?;
        m.validate()?;
        Ok(m)
    }

    pub fn from_value(v: serde_json::Value) -> Result<Self, ManifestError> {
        let m: Manifest = serde_json::from_value(v).map_err(ManifestError::Json)?;
        m.validate()?;
        Ok(m)
    }

    /// Reads and validates a manifest file: see [`read_bounded`]. Blocks for up to
    /// [`MANIFEST_READ_TIMEOUT`]; async code calls [`Manifest::load_off_runtime`].
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let read = |source| ManifestError::Read { path: path.display().to_string(), source };
        let bytes = read_bounded(path, MAX_MANIFEST_BYTES, MANIFEST_READ_TIMEOUT).map_err(read)?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(ManifestError::Json)?;
        m.validate()?;
        Ok(m)
    }

    /// [`Manifest::load`] on tokio's blocking pool, never on an async worker.
    pub async fn load_off_runtime(path: PathBuf) -> Result<Self, ManifestError> {
        let shown = path.display().to_string();
        match tokio::task::spawn_blocking(move || Manifest::load(&path)).await {
            Ok(r) => r,
            Err(_) => Err(ManifestError::Read { path: shown, source: ReadError::Lost }),
        }
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |field: &'static str, source: InvalidField| Err(ManifestError::Invalid { field, source });
        if self.version != MANIFEST_VERSION {
            return bad("version", InvalidField::Version(self.version));
        }
        if let Err(e) = validate_name(&self.name) {
            return bad("name", e.into());
        }
        if self.format != "qcow2" && self.format != "raw" {
            return bad("format", InvalidField::Format(self.format.clone()));
        }
        if self.format == "raw" && crate::verify::probed_by_name(&self.name).is_some() {
            return bad("name", InvalidField::RawDmgName(self.name.clone()));
        }
        if self.size == 0 {
            return bad("size", InvalidField::ZeroSize);
        }
        if self.format == "raw" && self.virtual_size != self.size {
            return bad("virtual_size", InvalidField::RawSizes { virtual_size: self.virtual_size, size: self.size });
        }
        if !is_hex(&self.sha256, 64) {
            return bad("sha256", InvalidField::NotHex(64));
        }
        if !is_hex(&self.info_hash, 40) {
            return bad("info_hash", InvalidField::NotHex(40));
        }
        if !metainfo::piece_length_ok(self.piece_length) {
            return bad("piece_length", InvalidField::PieceLength(self.piece_length));
        }
        if self.peers.len() > MAX_HINTS {
            return bad("peers", InvalidField::TooMany);
        }
        for p in &self.peers {
            if let Err(e) = check_peer(p) {
                return bad("peers", e.into());
            }
        }
        if self.trackers.len() > MAX_HINTS {
            return bad("trackers", InvalidField::TooMany);
        }
        for t in &self.trackers {
            if let Err(e) = check_tracker(t) {
                return bad("trackers", e.into());
            }
        }
        match Magnet::parse(&self.magnet) {
            Ok(mag) if mag.info_hash != self.info_hash => {
                let e = MagnetError::OtherHash { got: mag.info_hash, want: self.info_hash.clone() };
                return bad("magnet", e.into());
            }
            Ok(_) => {}
            Err(e) => return bad("magnet", e.into()),
        }
        if let Some(t) = &self.torrent_hex {
            let Ok(bytes) = hex::decode(t) else { return bad("torrent_hex", InvalidField::TorrentHex) };
            let mi = metainfo::validate(&bytes, Some(self.size)).map_err(ManifestError::Torrent)?;
            if mi.info_hash != self.info_hash {
                return Err(ManifestError::Torrent(metainfo::MetainfoError::InfoHash {
                    got: mi.info_hash,
                    want: self.info_hash.clone(),
                }));
            }
            if mi.piece_length != self.piece_length {
                let source = InvalidField::TorrentPieceLength { torrent: mi.piece_length, manifest: self.piece_length };
                return bad("torrent_hex", source);
            }
        }
        Ok(())
    }

    /// The validated .torrent bytes, if the manifest carries them.
    pub fn torrent_bytes(&self) -> Option<Vec<u8>> {
        self.torrent_hex.as_deref().and_then(|t| hex::decode(t).ok())
    }

    /// Peer hints: the `peers` list and the magnet's `x.pe` parameters.
    pub fn peer_hints(&self) -> Vec<String> {
        let mut out = self.peers.clone();
        if let Ok(m) = Magnet::parse(&self.magnet) {
            for p in m.peers {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        out
    }

    /// The magnet to hand to librqbit: rebuilt by [`magnet`] from what [`Magnet::parse`] read
    /// (so only `xt`, `dn`, `tr` and `x.pe`, every value percent-encoded by us), never the
    /// manifest's own text. librqbit fetches an `http(s)://` "magnet" and reads a local file for
    /// anything else that is not `magnet:`; this is always `magnet:?xt=urn:btih:`.
    pub fn librqbit_magnet(&self) -> String {
        match Magnet::parse(&self.magnet) {
            Ok(m) => magnet_uri(&m.info_hash, m.name.as_deref(), &m.trackers, &m.peers),
            Err(_) => magnet_uri(&self.info_hash, None, &[], &[]),
        }
    }
}

/// A manifest's magnet, read: only the parameters pool-helper writes ([`magnet`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Magnet {
    /// `xt=urn:btih:`, as 40 lower-case hex digits (hex or base32 in the URI).
    pub info_hash: String,
    /// `dn`: a valid master name.
    pub name: Option<String>,
    /// `tr`: tracker URLs, see [`check_tracker`].
    pub trackers: Vec<String>,
    /// `x.pe`: peer hints, see [`check_peer`].
    pub peers: Vec<String>,
}

impl Magnet {
    /// `magnet:?xt=urn:btih:<40 hex | 32 base32>` with optional `dn`, `tr`, `x.pe`; anything
    /// else (another parameter, a second `xt` or `dn`, a bad escape) is refused.
    pub fn parse(s: &str) -> Result<Magnet, MagnetError> {
        if s.len() > MAX_MAGNET_LEN {
            return Err(MagnetError::TooLong);
        }
        let query = s.strip_prefix("magnet:?").ok_or_else(|| MagnetError::NotMagnet(shown(s)))?;
        let mut m = Magnet { info_hash: String::new(), name: None, trackers: vec![], peers: vec![] };
        for kv in query.split('&') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let key: &'static str = match k {
                "xt" => "xt",
                "dn" => "dn",
                "tr" => "tr",
                "x.pe" => "x.pe",
                _ => return Err(MagnetError::Parameter(shown(k))),
            };
            let v = form_decode(v).ok_or(MagnetError::Encoding(key))?;
            match key {
                "xt" => {
                    if !m.info_hash.is_empty() {
                        return Err(MagnetError::Repeated("xt"));
                    }
                    let h = v.strip_prefix("urn:btih:").and_then(btih_hex);
                    m.info_hash = h.ok_or_else(|| MagnetError::Hash(shown(&v)))?;
                }
                "dn" => {
                    if m.name.is_some() {
                        return Err(MagnetError::Repeated("dn"));
                    }
                    validate_name(&v).map_err(MagnetError::Name)?;
                    m.name = Some(v);
                }
                "tr" => {
                    check_tracker(&v)?;
                    m.trackers.push(v);
                }
                _ => {
                    check_peer(&v)?;
                    m.peers.push(v);
                }
            }
        }
        if m.trackers.len() > MAX_HINTS || m.peers.len() > MAX_HINTS {
            return Err(MagnetError::TooMany);
        }
        if m.info_hash.is_empty() {
            return Err(MagnetError::NoHash);
        }
        Ok(m)
    }
}

/// Builds a magnet URI with `dn`, trackers and `x.pe` peer hints.
pub fn magnet(info_hash: &str, name: &str, trackers: &[String], peers: &[String]) -> String {
    magnet_uri(info_hash, Some(name), trackers, peers)
}

fn magnet_uri(info_hash: &str, name: Option<&str>, trackers: &[String], peers: &[String]) -> String {
    let mut s = format!("magnet:?xt=urn:btih:{}", percent_encode(info_hash));
    if let Some(n) = name {
        s.push_str(&format!("&dn={}", percent_encode(n)));
    }
    for t in trackers {
        s.push_str(&format!("&tr={}", percent_encode(t)));
    }
    for p in peers {
        s.push_str(&format!("&x.pe={}", percent_encode(p)));
    }
    s
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A BitTorrent v1 info-hash in a magnet (40 hex digits, either case, or 32 base32 digits) as
/// 40 lower-case hex digits.
fn btih_hex(s: &str) -> Option<String> {
    if s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(s.to_ascii_lowercase());
    }
    if s.len() != 32 {
        return None;
    }
    let mut bits: u64 = 0;
    let mut n = 0;
    let mut out = Vec::with_capacity(20);
    for c in s.bytes() {
        let v = match c.to_ascii_uppercase() {
            c @ b'A'..=b'Z' => c - b'A',
            c @ b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        bits = (bits << 5) | u64::from(v);
        n += 5;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    Some(hex::encode(out))
}

/// A value as `application/x-www-form-urlencoded` decodes it (as librqbit reads a magnet's query):
/// `+` is a space, `%XX` a byte; None for a bad escape or bytes that are not UTF-8.
fn form_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = b.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A user-supplied string for an error message: escaped, at most 100 characters.
fn shown(s: &str) -> String {
    let e: String = s.escape_debug().collect();
    match e.char_indices().nth(100) {
        Some((i, _)) => format!("{}...", &e[..i]),
        None => e,
    }
}

/// Checks a tracker URL as text: `http://`, `https://` or `udp://`, a host of letters, digits,
/// `-.:[]`, printable ASCII without spaces, at most [`MAX_TRACKER_LEN`] bytes.
pub fn check_tracker(t: &str) -> Result<(), TrackerError> {
    if t.len() > MAX_TRACKER_LEN {
        return Err(TrackerError::TooLong);
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TrackerError::Char(shown(t)));
    }
    let rest = ["http://", "https://", "udp://"]
        .iter()
        .find_map(|p| t.strip_prefix(p))
        .ok_or_else(|| TrackerError::Scheme(shown(t)))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)) {
        return Err(TrackerError::Host(shown(t)));
    }
    Ok(())
}

/// Checks a peer `HOST:PORT` (IPv4, `[v6]:port`, or a host name) as text, resolving nothing.
pub fn check_peer(s: &str) -> Result<(), PeerError> {
    if s.len() > MAX_PEER_LEN {
        return Err(PeerError::TooLong);
    }
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| PeerError::NotHostPort(shown(s)))?;
    port.parse::<u16>().map_err(|_| PeerError::Port(shown(s)))?;
    if host.is_empty() || host.len() > 253 || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b)) {
        return Err(PeerError::Host(shown(s)));
    }
    Ok(())
}

/// Checks a peer (see [`check_peer`]) and resolves it into socket addresses: blocking (DNS),
/// so not for async workers.
pub fn parse_peer(s: &str) -> Result<Vec<std::net::SocketAddr>, PeerError> {
    use std::net::ToSocketAddrs;
    check_peer(s)?;
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Ok(vec![a]);
    }
    s.to_socket_addrs().map(|i| i.collect()).map_err(|source| PeerError::Resolve { peer: shown(s), source })
}

/// Reads a file handed in from outside (a request's `manifest_path`, the CLI, a domain's
/// metadata): opened non-blocking (a FIFO without a writer does not block), `fstat`-checked as a
/// regular file (no device, FIFO, socket or directory), at most `cap + 1` bytes read, in a thread
/// of its own that is given up on after `timeout` (it may stay blocked in a hung file system; the
/// caller does not). Symbolic links are followed: a manifest may be one.
pub fn read_bounded(path: &Path, cap: u64, timeout: Duration) -> Result<Vec<u8>, ReadError> {
    let p = path.to_path_buf();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("read-bounded".into())
        .spawn(move || {
            let _ = tx.send(read_regular(&p, cap));
        })
        .map_err(ReadError::Io)?;
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(ReadError::Timeout(timeout.as_secs())),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(ReadError::Lost),
    }
}

/// Ok for a regular file; what it is otherwise.
fn kind(t: &std::fs::FileType) -> Result<(), ReadError> {
    let what = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    };
    Err(ReadError::NotRegular(what))
}

/// [`read_bounded`] without the thread and the timeout.
fn read_regular(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    // Not even opened when it is no regular file now (opening some devices does something);
    // checked again on the open file below, which is what counts.
    kind(&std::fs::metadata(path).map_err(ReadError::Io)?.file_type())?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(ReadError::Io)?;
    let meta = f.metadata().map_err(ReadError::Io)?;
    kind(&meta.file_type())?;
    if meta.len() > cap {
        return Err(ReadError::TooLarge(cap));
    }
    // Nor is fstat's size trusted (0 for /proc files, or growing): at most cap + 1 bytes are read.
    let mut buf = Vec::new();
    f.take(cap.saturating_add(1)).read_to_end(&mut buf).map_err(ReadError::Io)?;
    if buf.len() as u64 > cap {
        return Err(ReadError::TooLarge(cap));
    }
    Ok(buf)
}
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn good() -> Manifest {
        Manifest {
            version: 1,
            name: "debian-12.qcow2".into(),
            format: "qcow2".into(),
            size: 1 << 20,
            virtual_size: 1 << 30,
            sha256: "a".repeat(64),
            info_hash: "b".repeat(40),
            piece_length: 1 << 16,
            magnet: magnet(&"b".repeat(40), "debian-12.qcow2", &[], &["127.0.0.1:6881".into()]),
            peers: vec!["127.0.0.1:6881".into()],
            trackers: vec![],
            torrent_hex: None,
        }
    }

    #[test]
    fn good_manifest_round_trips() {
        let m = good();
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(Manifest::from_json(&j).unwrap(), m);
    }

    #[test]
    fn bad_names_are_refused() {
        for n in ["", "../x", "a/b", ".hidden", "-rf", "a\nb", "a b", &"x".repeat(201), "..", "a\0b"] {
            let m = Manifest { name: n.into(), ..good() };
            let e = m.validate().unwrap_err().to_string();
            assert!(e.contains("name"), "{n:?}: {e}");
        }
    }

    #[test]
    fn bad_fields_are_refused() {
        assert!(Manifest { format: "vmdk".into(), ..good() }.validate().is_err());
        assert!(Manifest { sha256: "A".repeat(64), ..good() }.validate().is_err());
        assert!(Manifest { info_hash: "b".repeat(39), ..good() }.validate().is_err());
        assert!(Manifest { piece_length: 3000, ..good() }.validate().is_err());
        assert!(Manifest { version: 2, ..good() }.validate().is_err());
        assert!(Manifest { size: 0, ..good() }.validate().is_err());
        assert!(Manifest { format: "raw".into(), ..good() }.validate().is_err());
        assert!(Manifest { peers: vec!["nope".into()], ..good() }.validate().is_err());
    }

    #[test]
    fn malformed_json_is_one_clear_error() {
        let e = Manifest::from_json("{\"version\":1,").unwrap_err().to_string();
        assert!(e.starts_with("manifest is not valid JSON"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn a_refused_field_is_named_with_its_reason_once() {
        let e = Manifest { sha256: "A".repeat(64), ..good() }.validate().unwrap_err();
        assert_eq!(vcc_core::error::one_line(&e), "manifest field 'sha256' is refused: not 64 lower-case hex digits");
        let e = Manifest { peers: vec!["nope".into()], ..good() }.validate().unwrap_err();
        assert_eq!(vcc_core::error::one_line(&e), "manifest field 'peers' is refused: peer 'nope' is not HOST:PORT");
    }

    #[test]
    fn odd_magnets_do_not_panic() {
        for mag in ["magnet:?x.pe=%aé:1", "magnet:?x.pe=%", "magnet:?x.pe=%zz&x.pe=é%", "magnet:?&&=&x.pe"] {
            let m = Manifest { peers: vec![], magnet: mag.into(), ..good() };
            assert!(m.peer_hints().is_empty(), "{mag}");
        }
        assert_eq!(form_decode("127.0.0.1%3A7000").unwrap(), "127.0.0.1:7000");
    }

    #[test]
    fn peer_hints_come_from_the_magnet_too() {
        let m =
            Manifest { peers: vec![], magnet: magnet(&"b".repeat(40), "x", &[], &["10.0.0.1:7000".into()]), ..good() };
        assert_eq!(m.peer_hints(), vec!["10.0.0.1:7000".to_string()]);
    }

    fn refusal(m: Manifest) -> String {
        vcc_core::error::one_line(&m.validate().unwrap_err())
    }

    #[test]
    fn a_magnet_that_is_a_url_another_hash_or_has_parameters_we_do_not_write_is_refused() {
        let ih = "b".repeat(40);
        let cases = [
            ("http://127.0.0.1:9/x.torrent".to_string(), "not a magnet"),
            ("https://example.com/x.torrent".to_string(), "not a magnet"),
            ("/etc/passwd".to_string(), "not a magnet"),
            (ih.clone(), "not a magnet"),
            (format!("magnet:?xt=urn:btih:{}", "c".repeat(40)), "differs from info_hash"),
            (format!("magnet:?xt=urn:btih:{ih}&xs=http://127.0.0.1:9/x.torrent"), "'xs' is not understood"),
            (format!("magnet:?xt=urn:btih:{ih}&so=0-99999999999"), "'so' is not understood"),
            (format!("magnet:?xt=urn:btih:{ih}&x%74=urn:btih:{ih}"), "'x%74' is not understood"),
            (format!("magnet:?xt=urn:btih:{ih}&xt=urn:btih:{ih}"), "more than one xt"),
            (format!("magnet:?xt=urn:btmh:1220{}", "d".repeat(64)), "not urn:btih:"),
            (format!("magnet:?xt=urn:btih:{}", "b".repeat(39)), "not urn:btih:"),
            ("magnet:?dn=x".to_string(), "no xt=urn:btih:"),
            (format!("magnet:?xt=urn:btih:{ih}&tr=file%3A%2F%2F%2Fetc%2Fpasswd"), "not an http://"),
            (format!("magnet:?xt=urn:btih:{ih}&tr=http%3A%2F%2Fa%20b%2F"), "a space"),
            (format!("magnet:?xt=urn:btih:{ih}&x.pe=nohost"), "not HOST:PORT"),
            (format!("magnet:?xt=urn:btih:{ih}&dn=..%2Fetc"), "magnet dn"),
            (format!("magnet:?xt=urn:btih:{ih}&dn=%ff"), "percent-encoded UTF-8"),
            (format!("magnet:?xt=urn:btih:{ih}&dn=%4"), "percent-encoded UTF-8"),
            (format!("magnet:?xt=urn:btih:{ih}&dn={}", "x".repeat(MAX_MAGNET_LEN)), "longer than"),
        ];
        for (mag, why) in cases {
            let e = refusal(Manifest { magnet: mag.clone(), ..good() });
            assert!(e.starts_with("manifest field 'magnet' is refused: ") && e.contains(why), "{mag}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn magnets_pool_helper_writes_and_base32_or_upper_case_hashes_are_accepted() {
        let ih = "b".repeat(40);
        let peers = vec!["10.0.0.1:7000".to_string(), "[fe80::1]:6881".into(), "host-a.example:6881".into()];
        let trackers = vec!["udp://tracker.example:6969/announce".to_string(), "https://t.example/a?x=1&y=2".into()];
        let written = magnet(&ih, "debian-12.qcow2", &trackers, &peers);
        let m = Manifest { magnet: written.clone(), peers: vec![], trackers: trackers.clone(), ..good() };
        m.validate().unwrap();
        let parsed = Magnet::parse(&written).unwrap();
        assert_eq!((parsed.trackers, parsed.peers, parsed.name.as_deref()), (trackers, peers, Some("debian-12.qcow2")));
        // The same 20 bytes (0xbb each) in base32, and in upper-case hex.
        let b32 = "XO53XO53XO53XO53XO53XO53XO53XO53";
        for xt in [b32.to_string(), b32.to_lowercase(), ih.to_uppercase()] {
            let mag = format!("magnet:?xt=urn:btih:{xt}");
            assert_eq!(Magnet::parse(&mag).unwrap().info_hash, ih, "{mag}");
            Manifest { magnet: mag, ..good() }.validate().unwrap();
        }
    }

    #[test]
    fn librqbit_is_handed_a_magnet_rebuilt_from_what_was_checked() {
        let ih = "b".repeat(40);
        let m =
            Manifest { magnet: format!("magnet:?xt=urn:btih:{}&tr=udp%3A%2F%2Ft%3A1", ih.to_uppercase()), ..good() };
        m.validate().unwrap();
        assert_eq!(m.librqbit_magnet(), format!("magnet:?xt=urn:btih:{ih}&tr=udp%3A%2F%2Ft%3A1"));
        // A manifest that never passed validation still yields only a magnet, never its URL.
        for bad in ["http://127.0.0.1:9/x.torrent", "/etc/passwd", "magnet:?xt=urn:btih:x&so=0-9"] {
            let m = Manifest { magnet: bad.into(), info_hash: "&so=1".into(), ..good() };
            assert_eq!(m.librqbit_magnet(), "magnet:?xt=urn:btih:%26so%3D1", "{bad}");
        }
    }

    #[test]
    fn trackers_are_checked_and_peers_are_checked_without_resolving_them() {
        let ih = "b".repeat(40);
        for t in ["file:///etc/passwd", "http://", "http:///x", "gopher://x", "http://a b/", "http://u@h/", "udp://h\n"]
        {
            let e = refusal(Manifest { trackers: vec![t.into()], ..good() });
            assert!(e.starts_with("manifest field 'trackers' is refused: tracker"), "{t}: {e}");
        }
        let long = format!("http://h/{}", "a".repeat(MAX_TRACKER_LEN));
        assert!(refusal(Manifest { trackers: vec![long], ..good() }).contains("longer than"));
        let many = vec!["udp://t:1".to_string(); MAX_HINTS + 1];
        assert!(refusal(Manifest { trackers: many, ..good() }).contains("more than 256"));
        let many = vec!["127.0.0.1:1".to_string(); MAX_HINTS + 1];
        assert!(refusal(Manifest { peers: many, ..good() }).contains("more than 256"));
        for p in ["h:0x1", "h:65536", "a_b:1", ":1", "[::1]", &format!("{}:1", "a".repeat(MAX_PEER_LEN))] {
            assert!(refusal(Manifest { peers: vec![p.into()], ..good() }).starts_with("manifest field 'peers'"), "{p}");
        }
        // `.invalid` never resolves (RFC 6761): accepted as text, as a magnet's x.pe too; a fetch
        // resolves peers later, off the manifest's validation.
        let m = Manifest {
            peers: vec!["seed.invalid:6881".into()],
            magnet: magnet(&ih, "x", &[], &["seed2.invalid:6881".into()]),
            ..good()
        };
        m.validate().unwrap();
        assert_eq!(m.peer_hints(), ["seed.invalid:6881", "seed2.invalid:6881"]);
    }

    #[test]
    fn a_raw_master_named_like_a_dmg_image_is_refused() {
        let m = Manifest { format: "raw".into(), name: "disk.dmg".into(), virtual_size: 1 << 20, ..good() };
        assert!(refusal(m).contains("probed as dmg"));
        let m = Manifest { format: "raw".into(), name: "disk.img".into(), virtual_size: 1 << 20, ..good() };
        m.validate().unwrap();
    }

    /// `f` on a thread of its own; its answer if it comes within 5 s (the reads below must not
    /// block: before they were bounded, a FIFO blocked forever and /dev/zero filled memory).
    fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(Duration::from_secs(5)).expect("answered within 5 s")
    }

    fn load_error(path: &Path) -> String {
        let p = path.to_path_buf();
        vcc_core::error::one_line(&within_5s(move || Manifest::load(&p)).unwrap_err())
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_fifo_manifest_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("m.json");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = load_error(&fifo);
        assert_eq!(e, format!("cannot read manifest '{}': it is a FIFO, not a regular file", fifo.display()));
    }

    #[test]
    fn devices_and_directories_are_refused_at_once() {
        let e = load_error(Path::new("/dev/zero"));
        assert_eq!(e, "cannot read manifest '/dev/zero': it is a character device, not a regular file");
        let dir = tempfile::tempdir().unwrap();
        let e = load_error(dir.path());
        assert!(e.ends_with("it is a directory, not a regular file"), "{e}");
        // Through a symbolic link too (links to manifests are followed).
        let link = dir.path().join("m.json");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(load_error(&link).ends_with("it is a character device, not a regular file"));
    }

    #[test]
    fn a_huge_sparse_manifest_is_refused_without_being_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        std::fs::File::create(&p).unwrap().set_len(1 << 40).unwrap();
        let e = load_error(&p);
        assert!(e.ends_with(&format!("it is larger than {MAX_MANIFEST_BYTES} bytes")), "{e}");
    }

    #[test]
    fn a_file_whose_size_says_0_is_still_read_at_most_to_the_cap() {
        // /proc files are regular files of st_size 0 with content.
        let e = within_5s(|| read_bounded(Path::new("/proc/self/maps"), 10, Duration::from_secs(5))).unwrap_err();
        assert!(matches!(e, ReadError::TooLarge(10)), "{e}");
        let ok = within_5s(|| read_bounded(Path::new("/proc/self/maps"), 1 << 20, Duration::from_secs(5))).unwrap();
        assert!(ok.len() > 10);
    }

    #[test]
    fn a_manifest_file_that_is_good_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        std::fs::write(&p, serde_json::to_vec(&good()).unwrap()).unwrap();
        assert_eq!(Manifest::load(&p).unwrap(), good());
        let e = vcc_core::error::one_line(&Manifest::load(&dir.path().join("none.json")).unwrap_err());
        assert!(e.starts_with("cannot read manifest") && e.contains("No such file"), "{e}");
    }

    #[tokio::test]
    async fn loading_off_the_runtime_gives_the_same_answers() {
        assert_eq!(
            vcc_core::error::one_line(&Manifest::load_off_runtime("/dev/zero".into()).await.unwrap_err()),
            "cannot read manifest '/dev/zero': it is a character device, not a regular file"
        );
    }
}
