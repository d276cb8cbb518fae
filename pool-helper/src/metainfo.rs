//! BitTorrent v1 metainfo: a bounded bencode reader, the checks untrusted metainfo must pass before
//! librqbit sees it, and a writer for single-file torrents that other clients accept.
//!
//! librqbit's own `create_torrent` writes one piece hash too many when the file size is an exact
//! multiple of the piece length; libtorrent, Transmission and aria2 reject such files. We write
//! our own: `pieces` is exactly `20 * ceil(length / piece_length)` bytes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use sha1::{Digest as _, Sha1};
use sha2::Sha256;

/// Largest metainfo we read (bytes).
pub const MAX_METAINFO_BYTES: usize = 10 * 1024 * 1024;
/// Deepest bencode nesting we accept.
pub const MAX_DEPTH: usize = 64;
pub const MIN_PIECE_LENGTH: u64 = 16 * 1024;
pub const MAX_PIECE_LENGTH: u64 = 64 * 1024 * 1024;

/// Why metainfo was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetainfoError {
    #[error("metainfo is {0} bytes, more than the {MAX_METAINFO_BYTES} allowed")]
    TooLarge(usize),
    #[error("malformed bencode at byte {0}: {1}")]
    Syntax(usize, &'static str),
    #[error("bencode nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("metainfo has no '{0}' (or it has the wrong type)")]
    Missing(&'static str),
    #[error("piece length {0} is not a power of two in [16 KiB, 64 MiB]")]
    PieceLength(u64),
    #[error("'pieces' is {got} bytes; {length} bytes in pieces of {piece_length} need {want}")]
    PiecesLength { got: usize, want: u64, length: u64, piece_length: u64 },
    #[error("metainfo describes several files; only single-file torrents are accepted")]
    MultiFile,
    #[error("file length {got} differs from the manifest's size {want}")]
    LengthMismatch { got: u64, want: u64 },
    #[error("file length must be positive")]
    EmptyFile,
    #[error("metainfo carries BEP 47 attributes ('{0}'): refused")]
    Attributes(String),
    #[error("info-hash {got} differs from the manifest's {want}")]
    InfoHash { got: String, want: String },
}

/// A bencode value. Dictionaries keep their keys sorted (bencode requires it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Int(i64),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Dict(BTreeMap<Vec<u8>, Value>),
}

impl Value {
    fn get(&self, k: &str) -> Option<&Value> {
        match self {
            Value::Dict(d) => d.get(k.as_bytes()),
            _ => None,
        }
    }
    fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// Canonical bencoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::Int(i) => out.extend_from_slice(format!("i{i}e").as_bytes()),
            Value::Bytes(b) => {
                out.extend_from_slice(format!("{}:", b.len()).as_bytes());
                out.extend_from_slice(b);
            }
            Value::List(l) => {
                out.push(b'l');
                l.iter().for_each(|v| v.encode(out));
                out.push(b'e');
            }
            Value::Dict(d) => {
                out.push(b'd');
                for (k, v) in d {
                    Value::Bytes(k.clone()).encode(out);
                    v.encode(out);
                }
                out.push(b'e');
            }
        }
    }
}

struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Byte range of the top-level `info` value, to hash it as it was sent.
    info_span: Option<(usize, usize)>,
}

impl<'a> Parser<'a> {
    fn err(&self, what: &'static str) -> MetainfoError {
        MetainfoError::Syntax(self.pos, what)
    }

    fn peek(&self) -> Result<u8, MetainfoError> {
        self.buf.get(self.pos).copied().ok_or_else(|| self.err("unexpected end"))
    }

    fn value(&mut self, depth: usize) -> Result<Value, MetainfoError> {
        if depth > MAX_DEPTH {
            return Err(MetainfoError::TooDeep);
        }
        match self.peek()? {
            b'i' => {
                self.pos += 1;
                let end = self.find(b'e')?;
                let s = std::str::from_utf8(&self.buf[self.pos..end]).map_err(|_| self.err("bad integer"))?;
                let digits = s.strip_prefix('-').unwrap_or(s);
                // Canonical only: digits after an optional '-' (Rust's parse would also take a '+').
                if digits.is_empty()
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                    || s == "-0"
                    || (s.len() > 1 && (s.starts_with('0') || s.starts_with("-0")))
                {
                    return Err(self.err("bad integer"));
                }
                let i = s.parse::<i64>().map_err(|_| self.err("bad integer"))?;
                self.pos = end + 1;
                Ok(Value::Int(i))
            }
            b'0'..=b'9' => Ok(Value::Bytes(self.string()?.to_vec())),
            b'l' => {
                self.pos += 1;
                let mut l = Vec::new();
                while self.peek()? != b'e' {
                    l.push(self.value(depth + 1)?);
                }
                self.pos += 1;
                Ok(Value::List(l))
            }
            b'd' => {
                self.pos += 1;
                let mut d = BTreeMap::new();
                let mut last: Option<Vec<u8>> = None;
                while self.peek()? != b'e' {
                    let k = self.string()?.to_vec();
                    if last.as_ref().is_some_and(|l| *l >= k) {
                        return Err(self.err("dictionary keys not sorted or repeated"));
                    }
                    let start = self.pos;
                    let v = self.value(depth + 1)?;
                    if depth == 0 && k == b"info" {
                        self.info_span = Some((start, self.pos));
                    }
                    last = Some(k.clone());
                    d.insert(k, v);
                }
                self.pos += 1;
                Ok(Value::Dict(d))
            }
            _ => Err(self.err("unexpected byte")),
        }
    }

    fn find(&self, b: u8) -> Result<usize, MetainfoError> {
        self.buf[self.pos..].iter().position(|&c| c == b).map(|i| self.pos + i).ok_or_else(|| self.err("unterminated"))
    }

    fn string(&mut self) -> Result<&'a [u8], MetainfoError> {
        let colon = self.find(b':')?;
        let s = std::str::from_utf8(&self.buf[self.pos..colon]).map_err(|_| self.err("bad length"))?;
        if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(self.err("bad length"));
        }
        let n: usize = s.parse().map_err(|_| self.err("bad length"))?;
        let start = colon + 1;
        let end = start.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| self.err("string past end"))?;
        self.pos = end;
        Ok(&self.buf[start..end])
    }
}

/// Decodes one bencoded value that must fill `buf`; returns it and the span of a top-level `info`.
pub fn decode(buf: &[u8]) -> Result<(Value, Option<(usize, usize)>), MetainfoError> {
    if buf.len() > MAX_METAINFO_BYTES {
        return Err(MetainfoError::TooLarge(buf.len()));
    }
    let mut p = Parser { buf, pos: 0, info_span: None };
    let v = p.value(0)?;
    if p.pos != buf.len() {
        return Err(p.err("trailing bytes"));
    }
    Ok((v, p.info_span))
}

/// What we learnt from metainfo that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metainfo {
    /// SHA-1 of the bencoded info dictionary, hex.
    pub info_hash: String,
    pub name: String,
    pub length: u64,
    pub piece_length: u64,
    pub piece_count: u64,
    pub trackers: Vec<String>,
}

pub fn piece_length_ok(pl: u64) -> bool {
    pl.is_power_of_two() && (MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&pl)
}

/// Checks untrusted metainfo (see docs/untrusted-inputs): size and depth caps, one file,
/// piece length, `pieces` length, no BEP 47 attributes, and (when given) the manifest's size.
pub fn validate(buf: &[u8], expected_length: Option<u64>) -> Result<Metainfo, MetainfoError> {
    let (top, span) = decode(buf)?;
    let info = top.get("info").ok_or(MetainfoError::Missing("info"))?;
    let (s, e) = span.ok_or(MetainfoError::Missing("info"))?;
    if !matches!(info, Value::Dict(_)) {
        return Err(MetainfoError::Missing("info"));
    }
    if info.get("files").is_some() {
        return Err(MetainfoError::MultiFile);
    }
    for k in ["attr", "symlink path"] {
        if info.get(k).is_some() {
            return Err(MetainfoError::Attributes(k.into()));
        }
    }
    let pl = info.get("piece length").and_then(Value::int).ok_or(MetainfoError::Missing("piece length"))?;
    let pl = u64::try_from(pl).map_err(|_| MetainfoError::PieceLength(0))?;
    if !piece_length_ok(pl) {
        return Err(MetainfoError::PieceLength(pl));
    }
    let length = info.get("length").and_then(Value::int).ok_or(MetainfoError::Missing("length"))?;
    let length = u64::try_from(length).map_err(|_| MetainfoError::EmptyFile)?;
    if length == 0 {
        return Err(MetainfoError::EmptyFile);
    }
    let pieces = info.get("pieces").and_then(Value::bytes).ok_or(MetainfoError::Missing("pieces"))?;
    let count = length.div_ceil(pl);
    let want = count * 20;
    if pieces.len() as u64 != want {
        return Err(MetainfoError::PiecesLength { got: pieces.len(), want, length, piece_length: pl });
    }
    if let Some(want) = expected_length {
        if length != want {
            return Err(MetainfoError::LengthMismatch { got: length, want });
        }
    }
    let name = info
        .get("name")
        .and_then(Value::bytes)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .ok_or(MetainfoError::Missing("name"))?;
    let mut trackers = Vec::new();
    if let Some(a) = top.get("announce").and_then(Value::bytes) {
        trackers.push(String::from_utf8_lossy(a).into_owned());
    }
    if let Some(Value::List(tiers)) = top.get("announce-list") {
        for t in tiers {
            if let Value::List(urls) = t {
                for u in urls.iter().filter_map(Value::bytes) {
                    let u = String::from_utf8_lossy(u).into_owned();
                    if !trackers.contains(&u) {
                        trackers.push(u);
                    }
                }
            }
        }
    }
    let info_hash = hex::encode(Sha1::digest(&buf[s..e]));
    Ok(Metainfo { info_hash, name, length, piece_length: pl, piece_count: count, trackers })
}

/// A piece length for a file: about 1,000–2,000 pieces, within the accepted range.
pub fn choose_piece_length(size: u64) -> u64 {
    let mut pl = MIN_PIECE_LENGTH;
    while pl < 4 * 1024 * 1024 && size.div_ceil(pl) > 2048 {
        pl *= 2;
    }
    pl
}

/// A freshly hashed file: its torrent and whole-file SHA-256.
#[derive(Debug, Clone)]
pub struct Hashed {
    pub torrent: Vec<u8>,
    pub info_hash: String,
    pub sha256: String,
    pub size: u64,
    pub piece_length: u64,
}

/// Reads `path` once, computing the piece SHA-1s and the whole-file SHA-256, and writes
/// single-file v1 metainfo named `name`.
pub fn create(path: &Path, name: &str, piece_length: u64, trackers: &[String]) -> std::io::Result<Hashed> {
    let mut f = std::fs::File::open(path)?;
    let mut pieces = Vec::new();
    let mut whole = Sha256::new();
    let mut buf = vec![0u8; piece_length as usize];
    let mut size = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        pieces.extend_from_slice(&Sha1::digest(&buf[..filled]));
        whole.update(&buf[..filled]);
        size += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    let torrent = encode_torrent(name, size, piece_length, pieces, trackers);
    let info_hash =
        validate(&torrent, Some(size)).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?.info_hash;
    Ok(Hashed { torrent, info_hash, sha256: hex::encode(whole.finalize()), size, piece_length })
}

/// Bencodes single-file metainfo.
pub fn encode_torrent(name: &str, length: u64, piece_length: u64, pieces: Vec<u8>, trackers: &[String]) -> Vec<u8> {
    let mut info = BTreeMap::new();
    info.insert(b"length".to_vec(), Value::Int(length as i64));
    info.insert(b"name".to_vec(), Value::Bytes(name.as_bytes().to_vec()));
    info.insert(b"piece length".to_vec(), Value::Int(piece_length as i64));
    info.insert(b"pieces".to_vec(), Value::Bytes(pieces));
    let mut top = BTreeMap::new();
    top.insert(b"info".to_vec(), Value::Dict(info));
    top.insert(b"created by".to_vec(), Value::Bytes(b"pool-helper".to_vec()));
    if let Some(first) = trackers.first() {
        top.insert(b"announce".to_vec(), Value::Bytes(first.as_bytes().to_vec()));
        top.insert(
            b"announce-list".to_vec(),
            Value::List(trackers.iter().map(|t| Value::List(vec![Value::Bytes(t.as_bytes().to_vec())])).collect()),
        );
    }
    let mut out = Vec::new();
    Value::Dict(top).encode(&mut out);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn torrent_with(mut f: impl FnMut(&mut BTreeMap<Vec<u8>, Value>)) -> Vec<u8> {
        let len = 100_000u64;
        let pl = 16384u64;
        let mut info = BTreeMap::new();
        info.insert(b"length".to_vec(), Value::Int(len as i64));
        info.insert(b"name".to_vec(), Value::Bytes(b"m.qcow2".to_vec()));
        info.insert(b"piece length".to_vec(), Value::Int(pl as i64));
        info.insert(b"pieces".to_vec(), Value::Bytes(vec![0; (len.div_ceil(pl) * 20) as usize]));
        f(&mut info);
        let mut top = BTreeMap::new();
        top.insert(b"info".to_vec(), Value::Dict(info));
        let mut out = Vec::new();
        Value::Dict(top).encode(&mut out);
        out
    }

    #[test]
    fn well_formed_metainfo_passes() {
        let m = validate(&torrent_with(|_| {}), Some(100_000)).unwrap();
        assert_eq!(m.piece_count, 7);
        assert_eq!(m.info_hash.len(), 40);
    }

    #[test]
    fn piece_length_zero_is_refused() {
        let t = torrent_with(|i| {
            i.insert(b"piece length".to_vec(), Value::Int(0));
        });
        assert_eq!(validate(&t, None).unwrap_err(), MetainfoError::PieceLength(0));
    }

    #[test]
    fn piece_length_not_power_of_two_is_refused() {
        let t = torrent_with(|i| {
            i.insert(b"piece length".to_vec(), Value::Int(20000));
        });
        assert_eq!(validate(&t, None).unwrap_err(), MetainfoError::PieceLength(20000));
        let t = torrent_with(|i| {
            i.insert(b"piece length".to_vec(), Value::Int(8192));
        });
        assert_eq!(validate(&t, None).unwrap_err(), MetainfoError::PieceLength(8192));
        let t = torrent_with(|i| {
            i.insert(b"piece length".to_vec(), Value::Int(128 << 20));
        });
        assert!(matches!(validate(&t, None).unwrap_err(), MetainfoError::PieceLength(_)));
    }

    #[test]
    fn depth_bomb_is_refused_without_overflowing_the_stack() {
        let mut t = b"d4:info".to_vec();
        t.extend(std::iter::repeat(b'l').take(1_000_000));
        t.extend(std::iter::repeat(b'e').take(1_000_000));
        t.push(b'e');
        assert_eq!(validate(&t, None).unwrap_err(), MetainfoError::TooDeep);
    }

    #[test]
    fn wrong_pieces_length_is_refused() {
        let t = torrent_with(|i| {
            i.insert(b"pieces".to_vec(), Value::Bytes(vec![0; 8 * 20]));
        });
        assert!(matches!(validate(&t, None).unwrap_err(), MetainfoError::PiecesLength { got: 160, want: 140, .. }));
    }

    #[test]
    fn multi_file_is_refused() {
        let t = torrent_with(|i| {
            i.insert(b"files".to_vec(), Value::List(vec![]));
        });
        assert_eq!(validate(&t, None).unwrap_err(), MetainfoError::MultiFile);
    }

    #[test]
    fn bep47_attributes_are_refused() {
        let t = torrent_with(|i| {
            i.insert(b"attr".to_vec(), Value::Bytes(b"x".to_vec()));
        });
        assert_eq!(validate(&t, None).unwrap_err(), MetainfoError::Attributes("attr".into()));
        let t = torrent_with(|i| {
            i.insert(b"symlink path".to_vec(), Value::List(vec![Value::Bytes(b"etc".to_vec())]));
        });
        assert!(matches!(validate(&t, None).unwrap_err(), MetainfoError::Attributes(_)));
    }

    #[test]
    fn oversized_metainfo_is_refused() {
        let t = vec![b'0'; MAX_METAINFO_BYTES + 1];
        assert_eq!(validate(&t, None).unwrap_err(), MetainfoError::TooLarge(MAX_METAINFO_BYTES + 1));
    }

    #[test]
    fn length_must_match_the_manifest() {
        let t = torrent_with(|_| {});
        assert_eq!(validate(&t, Some(5)).unwrap_err(), MetainfoError::LengthMismatch { got: 100_000, want: 5 });
    }

    #[test]
    fn mutated_metainfo_never_panics() {
        let good = torrent_with(|_| {});
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut t = good.clone();
            for _ in 0..1 + (x % 4) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % t.len();
                t[i] = (x >> 32) as u8;
                if x % 5 == 0 {
                    t.truncate(i);
                }
                if t.is_empty() {
                    break;
                }
            }
            let _ = validate(&t, Some(100_000));
        }
    }

    #[test]
    fn garbage_is_a_syntax_error_not_a_panic() {
        for t in [&b""[..], b"d", b"i12", b"5:ab", b"d4:infoi1ee", b"le", b"99999999999:x", b"d1:b0:1:a0:e"] {
            assert!(validate(t, None).is_err(), "{t:?}");
        }
    }

    #[test]
    fn writer_makes_exactly_one_hash_per_piece_when_size_is_a_multiple() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 4 * 16384]).unwrap();
        let h = create(&p, "f.raw", 16384, &["http://t:1/announce".into()]).unwrap();
        let m = validate(&h.torrent, Some(4 * 16384)).unwrap();
        assert_eq!(m.piece_count, 4);
        let (v, _) = decode(&h.torrent).unwrap();
        assert_eq!(v.get("info").unwrap().get("pieces").unwrap().bytes().unwrap().len(), 80);
        assert_eq!(m.trackers, vec!["http://t:1/announce".to_string()]);
        assert_eq!(h.info_hash, m.info_hash);
        assert_eq!(h.sha256, hex::encode(Sha256::digest(vec![7u8; 4 * 16384])));
    }

    #[test]
    fn writer_handles_a_short_last_piece() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![1u8; 16384 * 2 + 5]).unwrap();
        let h = create(&p, "f.raw", 16384, &[]).unwrap();
        assert_eq!(validate(&h.torrent, Some(16384 * 2 + 5)).unwrap().piece_count, 3);
    }
}
