//! The manifest: the trusted description of a master (name, format, sizes, SHA-256, info-hash).
//!
//! A manifest is what an operator or the hook hands to `fetch`/`ensure`. Everything fetched from
//! peers is checked against it. The name becomes the file name in the pool, so it is validated
//! strictly: no `/`, no leading `.`, printable ASCII-ish, at most 200 bytes.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::metainfo;

pub const MANIFEST_VERSION: u32 = 1;
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;
pub const MAX_NAME_LEN: usize = 200;

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
        source: std::io::Error,
    },
    #[error("manifest '{path}' is larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge { path: String },
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

/// Why a peer `HOST:PORT` is refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer '{0}' is not HOST:PORT")]
    NotHostPort(String),
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

    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let p = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| ManifestError::Read { path: p.clone(), source })?;
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { path: p });
        }
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: p, source })?;
        Self::from_json(&text)
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
        for p in &self.peers {
            if let Err(e) = parse_peer(p) {
                return bad("peers", e.into());
            }
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
        if let Some(q) = self.magnet.split_once('?').map(|(_, q)| q) {
            for kv in q.split('&') {
                if let Some(v) = kv.strip_prefix("x.pe=") {
                    let v = percent_decode(v);
                    if parse_peer(&v).is_ok() && !out.contains(&v) {
                        out.push(v);
                    }
                }
            }
        }
        out
    }
}

/// Builds a magnet URI with `dn`, trackers and `x.pe` peer hints.
pub fn magnet(info_hash: &str, name: &str, trackers: &[String], peers: &[String]) -> String {
    let mut s = format!("magnet:?xt=urn:btih:{info_hash}&dn={}", percent_encode(name));
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

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `host:port` (IPv4, `[v6]:port`, or a host name) into socket addresses.
pub fn parse_peer(s: &str) -> Result<Vec<std::net::SocketAddr>, PeerError> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Ok(vec![a]);
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| PeerError::NotHostPort(s.into()))?;
    let port: u16 = port.parse().map_err(|_| PeerError::Port(s.into()))?;
    if host.is_empty() || host.len() > 253 || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b)) {
        return Err(PeerError::Host(s.into()));
    }
    (host, port).to_socket_addrs().map(|i| i.collect()).map_err(|source| PeerError::Resolve { peer: s.into(), source })
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
        assert_eq!(percent_decode("127.0.0.1%3A7000"), "127.0.0.1:7000");
    }

    #[test]
    fn peer_hints_come_from_the_magnet_too() {
        let m =
            Manifest { peers: vec![], magnet: magnet(&"b".repeat(40), "x", &[], &["10.0.0.1:7000".into()]), ..good() };
        assert_eq!(m.peer_hints(), vec!["10.0.0.1:7000".to_string()]);
    }
}
