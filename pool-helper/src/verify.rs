//! Image checks for untrusted masters: our own qcow2 header parser, raw-image sniffing, whole-file
//! SHA-256, and `qemu-img info` as a second opinion (through [`vcc_core::qemu_img`], with a
//! timeout and resource limits); for a raw master also qemu-img's own format probe, confined
//! with Landlock so that it can open no file the image refers to.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use vcc_core::qcow2;
use vcc_core::qemu_img::{ImageInfo, QemuImg, QemuImgError};

pub use vcc_core::qcow2::MAGIC as QCOW2_MAGIC;
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Incompatible feature bits we accept: compression type (3), extended L2 (4).
const INCOMPAT_OK: u64 = INCOMPAT_COMPRESSION | (1 << 4);
/// The compression type feature bit: set exactly when `compression_type` is not zlib.
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// The compression types qemu knows: deflate (zlib) and zstd; nothing else is accepted.
const COMPRESSION_ZLIB: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;

/// qemu-img's second opinion on an untrusted image runs within these: CPU seconds,
pub const QEMU_IMG_CPU_SECONDS: u64 = 30;
/// address space (bytes),
pub const QEMU_IMG_ADDRESS_SPACE: u64 = 2 << 30;
/// and wall-clock time.
pub const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an image failed verification.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read the image")]
    Io(#[source] std::io::Error),
    #[error("cannot read the image: not a regular file")]
    NotRegular,
    #[error("SHA-256 {got} differs from the manifest's {want}")]
    Sha256 { got: String, want: String },
    #[error("file size {got} differs from the manifest's {want}")]
    Size { got: u64, want: u64 },
    #[error("qcow2 header: {0}")]
    Qcow2(Qcow2Problem),
    #[error("declared raw, but the content starts like a {0} image")]
    RawLooksLike(&'static str),
    #[error("declared raw, but QEMU would probe it as {0} by its name")]
    RawNamedLike(&'static str),
    #[error("virtual size {got} differs from the manifest's {want}")]
    VirtualSize { got: u64, want: u64 },
    #[error(
        "virtual size {got} is above the policy maximum {max} (config key max_virtual_size, the same on every host)"
    )]
    TooBig { got: u64, max: u64 },
    #[error("format '{0}' is not accepted")]
    Format(String),
    #[error("qemu-img second opinion failed")]
    QemuImg(#[source] QemuImgError),
    #[error("qemu-img second opinion: format is {0}")]
    QemuImgFormat(String),
    #[error("qemu-img second opinion: image has a backing file")]
    QemuImgBacking,
    #[error("qemu-img second opinion: image has an external data file")]
    QemuImgDataFile,
    #[error("qemu-img second opinion: image is marked corrupt")]
    QemuImgCorrupt,
    #[error("qemu-img second opinion: image is encrypted")]
    QemuImgEncrypted,
    #[error("qemu-img second opinion: virtual size {got} != {want}")]
    QemuImgVirtualSize { got: u64, want: u64 },
    #[error("qemu-img's own probe does not take it for raw")]
    QemuImgProbe(#[source] QemuImgError),
    #[error("qemu-img's own probe does not take it for raw: it says {0}")]
    QemuImgProbeFormat(String),
}

/// What is wrong with a qcow2 header (a description, not a cause: nothing failed to run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qcow2Problem {
    TooShort,
    BadMagic,
    Version(u32),
    BackingFile,
    ClusterBits(u32),
    Encrypted,
    Snapshots,
    L1Outside,
    RefcountOutside,
    TooShortForV3,
    /// A compression type other than zlib (0) and zstd (1).
    CompressionType(u8),
    /// The compression type feature bit (3) disagrees with the compression_type field: set for
    /// zlib or clear for zstd (qemu's `validate_compression_type` refuses both).
    CompressionTypeBit {
        compression_type: u8,
        bit_set: bool,
    },
    IncompatibleFeature {
        bit: u32,
        what: &'static str,
    },
    UnknownIncompatibleFeatures(u64),
    HeaderLength(usize),
    ExtensionsPastCluster,
    ExtensionPastCluster(u32),
    DataFileExtension,
    CryptoExtension,
    BackingFormatExtension,
}

impl fmt::Display for Qcow2Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Qcow2Problem::TooShort => write!(f, "file too short for a qcow2 header"),
            Qcow2Problem::BadMagic => write!(f, "bad magic (not a qcow2 file)"),
            Qcow2Problem::Version(v) => write!(f, "version {v} (want 2 or 3)"),
            Qcow2Problem::BackingFile => write!(f, "it names a backing file"),
            Qcow2Problem::ClusterBits(b) => write!(f, "cluster_bits {b} outside [9, 21]"),
            Qcow2Problem::Encrypted => write!(f, "it is encrypted"),
            Qcow2Problem::Snapshots => write!(f, "it has internal snapshots"),
            Qcow2Problem::L1Outside => write!(f, "L1 table lies outside the file"),
            Qcow2Problem::RefcountOutside => write!(f, "refcount table lies outside the file"),
            Qcow2Problem::TooShortForV3 => write!(f, "file too short for a version 3 header"),
            Qcow2Problem::CompressionType(t) => write!(f, "compression type {t} (want 0 zlib or 1 zstd)"),
            Qcow2Problem::CompressionTypeBit { compression_type, bit_set } => write!(
                f,
                "incompatible feature bit 3 (compression type) is {} but compression_type is {compression_type}",
                if *bit_set { "set" } else { "clear" }
            ),
            Qcow2Problem::IncompatibleFeature { bit, what } => write!(f, "incompatible feature bit {bit} set ({what})"),
            Qcow2Problem::UnknownIncompatibleFeatures(bits) => write!(f, "unknown incompatible feature bits {bits:#x}"),
            Qcow2Problem::HeaderLength(n) => write!(f, "header length {n} is invalid"),
            Qcow2Problem::ExtensionsPastCluster => write!(f, "header extensions run past the first cluster"),
            Qcow2Problem::ExtensionPastCluster(t) => write!(f, "header extension {t:#x} runs past the first cluster"),
            Qcow2Problem::DataFileExtension => write!(f, "header names an external data file"),
            Qcow2Problem::CryptoExtension => write!(f, "header carries an encryption header"),
            Qcow2Problem::BackingFormatExtension => write!(f, "header names a backing file format"),
        }
    }
}

/// What the qcow2 header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    pub version: u32,
    pub cluster_bits: u32,
    pub virtual_size: u64,
    /// L1 table: entries and offset (checked: inside the file, on a cluster).
    pub l1_entries: u64,
    pub l1_offset: u64,
    /// Refcount table: offset and clusters (checked: inside the file, on a cluster).
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u64,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
#[cfg(test)]
fn be64(b: &[u8], o: usize) -> u64 {
    (u64::from(be32(b, o)) << 32) | u64::from(be32(b, o + 4))
}

/// Parses and checks a qcow2 header. `head` is the start of the file (at least the first cluster
/// or the whole file if smaller); `file_size` is the file's length.
pub fn check_qcow2_header(head: &[u8], file_size: u64) -> Result<Qcow2Info, ImageError> {
    use Qcow2Problem as P;
    let bad = |p: Qcow2Problem| Err(ImageError::Qcow2(p));
    let h = match qcow2::Header::parse(head) {
        Ok(h) => h,
        Err(qcow2::NotQcow2::TooShort) => return bad(P::TooShort),
        Err(qcow2::NotQcow2::BadMagic) => return bad(P::BadMagic),
    };
    let version = h.version;
    if version != 2 && version != 3 {
        return bad(P::Version(version));
    }
    if h.backing_file_offset != 0 || h.backing_file_size != 0 {
        return bad(P::BackingFile);
    }
    let cluster_bits = h.cluster_bits;
    if !(9..=21).contains(&cluster_bits) {
        return bad(P::ClusterBits(cluster_bits));
    }
    let cluster = 1u64 << cluster_bits;
    let virtual_size = h.size;
    if h.crypt_method != 0 {
        return bad(P::Encrypted);
    }
    let l1_size = u64::from(h.l1_size);
    let l1_off = h.l1_table_offset;
    let rt_off = h.refcount_table_offset;
    let rt_clusters = u64::from(h.refcount_table_clusters);
    if h.nb_snapshots != 0 {
        return bad(P::Snapshots);
    }
    let inside =
        |off: u64, len: u64| off.is_multiple_of(cluster) && off.checked_add(len).is_some_and(|e| e <= file_size);
    if !inside(l1_off, l1_size.saturating_mul(8)) {
        return bad(P::L1Outside);
    }
    if rt_off == 0 || !inside(rt_off, rt_clusters.saturating_mul(cluster)) {
        return bad(P::RefcountOutside);
    }
    let mut header_len = qcow2::V2_HEADER_LEN;
    if version == 3 {
        let Some(v3) = &h.v3 else {
            return bad(P::TooShortForV3);
        };
        let incompat = v3.incompatible_features;
        for (bit, what) in [(0, "dirty"), (1, "corrupt"), (2, "an external data file")] {
            if incompat & (1 << bit) != 0 {
                return bad(P::IncompatibleFeature { bit, what });
            }
        }
        let unknown = incompat & !INCOMPAT_OK & !0b111;
        if unknown != 0 {
            return bad(P::UnknownIncompatibleFeatures(unknown));
        }
        header_len = v3.header_length as usize;
        if header_len < qcow2::V3_HEADER_LEN || !header_len.is_multiple_of(8) || header_len as u64 > cluster {
            return bad(P::HeaderLength(header_len));
        }
        // compression_type (byte 104) is read only when the header is long enough for it; a
        // shorter header means zlib. Bit 3 must be set exactly when it is not zlib.
        let compression_type = if header_len > qcow2::COMPRESSION_TYPE_OFFSET {
            match v3.compression_type {
                Some(t) => t,
                None => return bad(P::TooShortForV3),
            }
        } else {
            0
        };
        if !matches!(compression_type, COMPRESSION_ZLIB | COMPRESSION_ZSTD) {
            return bad(P::CompressionType(compression_type));
        }
        let bit_set = incompat & INCOMPAT_COMPRESSION != 0;
        if bit_set != (compression_type != COMPRESSION_ZLIB) {
            return bad(P::CompressionTypeBit { compression_type, bit_set });
        }
    }
    // Header extensions, up to the end of the first cluster.
    let limit = (cluster as usize).min(head.len());
    let mut off = header_len;
    loop {
        if off + 8 > limit {
            return bad(P::ExtensionsPastCluster);
        }
        let typ = be32(head, off);
        let len = be32(head, off + 4) as usize;
        let data_end = (off + 8).checked_add(len).filter(|&e| e <= limit);
        let Some(data_end) = data_end else {
            return bad(P::ExtensionPastCluster(typ));
        };
        match typ {
            EXT_END => break,
            EXT_DATA_FILE => return bad(P::DataFileExtension),
            EXT_CRYPTO => return bad(P::CryptoExtension),
            EXT_BACKING_FORMAT => return bad(P::BackingFormatExtension),
            EXT_FEATURE_TABLE | EXT_BITMAPS => {}
            _ => {} // unknown compatible extensions are ignored, as qemu does
        }
        off = data_end.next_multiple_of(8);
    }
    Ok(Qcow2Info {
        version,
        cluster_bits,
        virtual_size,
        l1_entries: l1_size,
        l1_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt_clusters,
    })
}

/// How many bytes QEMU reads for its format probes (`BLOCK_PROBE_BUF_SIZE` in block.c); a
/// shorter file reads as if zero-padded to this.
pub const PROBE_BYTES: usize = 2048;

/// The format QEMU's own probes (the `*_probe` functions of block/*.c, QEMU 7-9) would take a
/// file starting with `head` for, other than raw: each test below is one probe, on the same
/// 2048 zero-padded bytes. Any `QFI\xfb` start and the canonical vmdk descriptor start are
/// refused too, although no probe takes every one of them.
pub fn probe_format(head: &[u8]) -> Option<&'static str> {
    let mut buf = [0u8; PROBE_BYTES];
    let n = head.len().min(PROBE_BYTES);
    buf[..n].copy_from_slice(&head[..n]);
    let b = &buf[..];
    let le32 = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    if b.starts_with(QCOW2_MAGIC) {
        // qcow_probe: version 1; qcow2_probe: version >= 2.
        return Some(if be32(b, 4) == 1 { "qcow" } else { "qcow2" });
    }
    if b.starts_with(b"QED\0") {
        return Some("qed"); // bdrv_qed_probe
    }
    if b.starts_with(b"KDMV") || b.starts_with(b"COWD") || b.starts_with(b"# Disk DescriptorFile") || vmdk_descriptor(b)
    {
        return Some("vmdk"); // vmdk_probe
    }
    if b.starts_with(b"vhdxfile") {
        return Some("vhdx"); // vhdx_probe
    }
    if b.starts_with(b"conectix") {
        return Some("vpc"); // vpc_probe
    }
    if b.starts_with(b"LUKS\xba\xbe") {
        return Some("luks"); // block_crypto_probe_luks (version 1; any version refused here)
    }
    if le32(0x40) == 0xbeda_107f {
        return Some("vdi"); // vdi_probe
    }
    if (b.starts_with(b"WithoutFreeSpace") || b.starts_with(b"WithouFreSpacExt")) && le32(16) == 2 {
        return Some("parallels"); // parallels_probe
    }
    if b.starts_with(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n") {
        return Some("cloop"); // cloop_probe
    }
    // bochs_probe: NUL-terminated magic, type and subtype (strcmp), version 2 or 1.
    let cstr = |o: usize, want: &[u8]| b[o..].starts_with(want) && b[o + want.len()] == 0;
    if cstr(0, b"Bochs Virtual HD Image")
        && cstr(32, b"Redolog")
        && cstr(48, b"Growing")
        && matches!(le32(64), 0x0002_0000 | 0x0001_0000)
    {
        return Some("bochs");
    }
    None
}

/// vmdk_probe's text branch: lines starting with `#` are skipped, so are lines of spaces (then
/// an optional `\r`), and the first other line must be `version=1`, `2` or `3` (`\n` or `\r\n`).
fn vmdk_descriptor(b: &[u8]) -> bool {
    let end = b.len();
    let mut p = 0;
    while p < end {
        if b[p] == b'#' {
            while p < end && b[p] != b'\n' {
                p += 1;
            }
            p += 1;
            continue;
        }
        if b[p] == b' ' {
            while p < end && b[p] == b' ' {
                p += 1;
            }
            if p < end && b[p] == b'\r' {
                p += 1;
            }
            if p == end || b[p] != b'\n' {
                return false;
            }
            p += 1;
            continue;
        }
        let rest = &b[p..];
        return [b'1', b'2', b'3'].iter().any(|v| {
            let line = [b"version=".as_slice(), &[*v]].concat();
            rest.starts_with(&[line.as_slice(), b"\n"].concat())
                || rest.starts_with(&[line.as_slice(), b"\r\n"].concat())
        });
    }
    false
}

/// The format QEMU would probe a file as from its name alone: dmg_probe takes any name ending
/// in `.dmg` (score 2, above raw's 1).
pub fn probed_by_name(name: &str) -> Option<&'static str> {
    (name.len() > 4 && name.ends_with(".dmg")).then_some("dmg")
}

/// Rejects a "raw" image that any of QEMU's probes would take for another format
/// ([`probe_format`]).
pub fn sniff_raw(head: &[u8]) -> Result<(), ImageError> {
    match probe_format(head) {
        Some(k) => Err(ImageError::RawLooksLike(k)),
        None => Ok(()),
    }
}

/// SHA-256 of a whole file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The one image policy: what every master must be beyond its manifest, applied alike by
/// `publish` (so nothing is published that fetchers refuse) and by every fetch and re-check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagePolicy {
    /// The largest virtual size accepted (config `max_virtual_size`).
    pub max_virtual_size: u64,
    /// Run `qemu-img info` as a second opinion (config `qemu_img_check`).
    pub qemu_img: bool,
}

impl ImagePolicy {
    pub fn of(cfg: &crate::config::Config) -> Self {
        ImagePolicy { max_virtual_size: cfg.max_virtual_size, qemu_img: cfg.qemu_img_check }
    }
}

/// What an image must be.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub format: &'a str,
    /// Its file name in the pool (QEMU probes some formats by name).
    pub name: &'a str,
    pub size: u64,
    pub virtual_size: u64,
    pub sha256: &'a str,
    pub policy: ImagePolicy,
}

/// The full check, in order: size, SHA-256, then [`check_content`].
pub fn verify_image(path: &Path, e: &Expect<'_>) -> Result<(), ImageError> {
    let meta = std::fs::symlink_metadata(path).map_err(ImageError::Io)?;
    if !meta.file_type().is_file() {
        return Err(ImageError::NotRegular);
    }
    if meta.len() != e.size {
        return Err(ImageError::Size { got: meta.len(), want: e.size });
    }
    let got = sha256_file(path).map_err(ImageError::Io)?;
    if got != e.sha256 {
        return Err(ImageError::Sha256 { got, want: e.sha256.to_string() });
    }
    check_content(path, e)
}

/// What the content must be, whoever made the image: our own header checks (format, raw
/// sniffing, virtual size, the policy's maximum), then qemu-img's second opinion if the policy
/// asks for it. `publish` runs this on what it publishes, fetches on what they download.
pub fn check_content(path: &Path, e: &Expect<'_>) -> Result<(), ImageError> {
    check_header(path, e)?;
    if e.policy.qemu_img {
        qemu_img_second_opinion(path, e)?;
        if e.format == "raw" {
            second_opinion_raw(path, e.virtual_size)?;
        }
    }
    Ok(())
}

/// Our own header checks (no external program).
pub fn check_header(path: &Path, e: &Expect<'_>) -> Result<(), ImageError> {
    let mut head = Vec::with_capacity(HEAD_BYTES as usize);
    std::fs::File::open(path)
        .map_err(ImageError::Io)?
        .take(HEAD_BYTES)
        .read_to_end(&mut head)
        .map_err(ImageError::Io)?;
    check_head(&head, e)
}

/// How much of the start of an image [`check_head`] looks at: the largest qcow2 cluster.
pub const HEAD_BYTES: u64 = 2 << 20;

/// [`check_header`] on the first [`HEAD_BYTES`] of the image (all of it if smaller): what a lazy
/// master checks before serving any byte.
pub fn check_head(head: &[u8], e: &Expect<'_>) -> Result<(), ImageError> {
    let vsize = match e.format {
        "qcow2" => check_qcow2_header(&head, e.size)?.virtual_size,
        "raw" => {
            sniff_raw(&head)?;
            if let Some(k) = probed_by_name(e.name) {
                return Err(ImageError::RawNamedLike(k));
            }
            e.size
        }
        f => return Err(ImageError::Format(f.into())),
    };
    if vsize != e.virtual_size {
        return Err(ImageError::VirtualSize { got: vsize, want: e.virtual_size });
    }
    if vsize > e.policy.max_virtual_size {
        return Err(ImageError::TooBig { got: vsize, max: e.policy.max_virtual_size });
    }
    Ok(())
}

/// `qemu-img info -f FMT --output=json --force-share FILE` within [`QEMU_IMG_CPU_SECONDS`],
/// [`QEMU_IMG_ADDRESS_SPACE`] and [`QEMU_IMG_TIMEOUT`], then [`second_opinion`] on its answer.
pub fn qemu_img_second_opinion(path: &Path, e: &Expect<'_>) -> Result<(), ImageError> {
    let info = QemuImg::new()
        .force_share(true)
        .timeout(QEMU_IMG_TIMEOUT)
        .cpu_limit(QEMU_IMG_CPU_SECONDS)
        .address_space_limit(QEMU_IMG_ADDRESS_SPACE)
        .info(path, e.format)
        .map_err(ImageError::QemuImg)?;
    second_opinion(&info, e)
}

/// Set once the missing-Landlock warning is logged: once per process, not per image.
static NO_LANDLOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// qemu-img's own format probe on a file that must be raw ([`QemuImg::probe_confined`]: no
/// `-f`, Landlock confinement, the same limits as [`qemu_img_second_opinion`]): passes only when
/// qemu-img opens it, takes it for raw and reports `virtual_size`. A probe that does not even
/// open it (a vmdk descriptor whose extent it may not read) is a refusal naming what qemu-img
/// said. On a kernel without Landlock the probe is skipped with one warning per process (our own
/// reimplementation of the probes, [`sniff_raw`], still applies): qemu-img never probes an
/// untrusted image unconfined.
pub fn second_opinion_raw(path: &Path, virtual_size: u64) -> Result<(), ImageError> {
    let probed = QemuImg::new()
        .force_share(true)
        .timeout(QEMU_IMG_TIMEOUT)
        .cpu_limit(QEMU_IMG_CPU_SECONDS)
        .address_space_limit(QEMU_IMG_ADDRESS_SPACE)
        .probe_confined(path);
    let info = match probed {
        Ok(info) => info,
        Err(e @ QemuImgError::NoConfinement { .. }) => {
            if !NO_LANDLOCK_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "{}; raw masters get our own probe checks only (this warning is shown once)",
                    vcc_core::error::one_line(&e)
                );
            }
            return Ok(());
        }
        Err(e) => return Err(ImageError::QemuImgProbe(e)),
    };
    if info.format != "raw" {
        return Err(ImageError::QemuImgProbeFormat(info.format));
    }
    if info.virtual_size != virtual_size {
        return Err(ImageError::QemuImgVirtualSize { got: info.virtual_size, want: virtual_size });
    }
    Ok(())
}

/// Whether what qemu-img says about an image agrees with what it must be: the stated format, no
/// backing file, no external data file, not corrupt, not encrypted, the manifest's virtual size.
pub fn second_opinion(info: &ImageInfo, e: &Expect<'_>) -> Result<(), ImageError> {
    if info.format != e.format {
        return Err(ImageError::QemuImgFormat(info.format.clone()));
    }
    if info.backing.is_some() {
        return Err(ImageError::QemuImgBacking);
    }
    if info.data_file.is_some() {
        return Err(ImageError::QemuImgDataFile);
    }
    if info.corrupt {
        return Err(ImageError::QemuImgCorrupt);
    }
    if info.encrypted {
        return Err(ImageError::QemuImgEncrypted);
    }
    if info.virtual_size != e.virtual_size {
        return Err(ImageError::QemuImgVirtualSize { got: info.virtual_size, want: e.virtual_size });
    }
    Ok(())
}

/// Reads the virtual size of a local image we are about to publish (trusted: our own pool).
pub fn local_virtual_size(path: &Path, format: &str, size: u64) -> Result<u64, ImageError> {
    let mut head = Vec::new();
    std::fs::File::open(path).map_err(ImageError::Io)?.take(2 << 20).read_to_end(&mut head).map_err(ImageError::Io)?;
    match format {
        "qcow2" => Ok(check_qcow2_header(&head, size)?.virtual_size),
        "raw" => {
            sniff_raw(&head)?;
            Ok(size)
        }
        f => Err(ImageError::Format(f.into())),
    }
}

/// A minimal valid qcow2 v3 image (64 KiB clusters: header, refcount table at cluster 1, L1 at
/// cluster 3; 4 clusters in all) stating `virtual_size`, for this crate's tests.
#[cfg(test)]
pub(crate) fn test_qcow2(virtual_size: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4 * 65536];
    b[0..4].copy_from_slice(QCOW2_MAGIC);
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&16u32.to_be_bytes());
    b[24..32].copy_from_slice(&virtual_size.to_be_bytes());
    b[36..40].copy_from_slice(&2u32.to_be_bytes());
    b[40..48].copy_from_slice(&(3u64 * 65536).to_be_bytes());
    b[48..56].copy_from_slice(&65536u64.to_be_bytes());
    b[56..60].copy_from_slice(&1u32.to_be_bytes());
    b[96..100].copy_from_slice(&4u32.to_be_bytes());
    b[100..104].copy_from_slice(&112u32.to_be_bytes());
    b
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A minimal valid qcow2 v3 image of 1 GiB.
    fn qcow2() -> Vec<u8> {
        super::test_qcow2(1 << 30)
    }

    fn check(b: &[u8]) -> Result<Qcow2Info, ImageError> {
        check_qcow2_header(b, b.len() as u64)
    }

    fn err(b: &[u8]) -> String {
        check(b).unwrap_err().to_string()
    }

    #[test]
    fn mutated_headers_never_panic() {
        let good = qcow2();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut b = good[..4096].to_vec();
            for _ in 0..1 + (x % 6) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % 200;
                b[i] = (x >> 40) as u8;
            }
            let _ = check_qcow2_header(&b, (x >> 20) % (1 << 30));
            let _ = sniff_raw(&b[..(x as usize) % 100]);
        }
    }

    #[test]
    fn crafted_valid_header_passes() {
        let i = check(&qcow2()).unwrap();
        assert_eq!((i.version, i.cluster_bits, i.virtual_size), (3, 16, 1 << 30));
    }

    #[test]
    fn backing_file_is_refused() {
        let mut b = qcow2();
        b[8..16].copy_from_slice(&1024u64.to_be_bytes());
        b[16..20].copy_from_slice(&10u32.to_be_bytes());
        assert!(err(&b).contains("backing file"));
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut b = qcow2();
        b[3] = 0;
        assert!(err(&b).contains("magic"));
    }

    #[test]
    fn dirty_corrupt_data_file_and_unknown_bits_are_refused() {
        for (bit, word) in [(0, "dirty"), (1, "corrupt"), (2, "external data file"), (9, "unknown")] {
            let mut b = qcow2();
            b[72..80].copy_from_slice(&(1u64 << bit).to_be_bytes());
            assert!(err(&b).contains(word), "bit {bit}: {}", err(&b));
        }
    }

    #[test]
    fn extended_l2_bit_is_accepted() {
        let mut b = qcow2();
        b[72..80].copy_from_slice(&(1u64 << 4).to_be_bytes());
        assert!(check(&b).is_ok());
    }

    #[test]
    fn zstd_and_zlib_compression_types_are_accepted_with_the_matching_bit_only() {
        // zstd: compression_type 1 with bit 3, as `qemu-img convert -c -o compression_type=zstd` writes.
        let mut b = qcow2();
        b[104] = COMPRESSION_ZSTD;
        b[72..80].copy_from_slice(&INCOMPAT_COMPRESSION.to_be_bytes());
        assert!(check(&b).is_ok(), "{}", err(&b));
        // zstd with extended L2 too.
        b[72..80].copy_from_slice(&(INCOMPAT_COMPRESSION | (1 << 4)).to_be_bytes());
        assert!(check(&b).is_ok(), "{}", err(&b));
        // zlib (0) with the bit clear is the plain image.
        assert!(check(&qcow2()).is_ok());
        // zstd without the bit, zlib with the bit: refused, as qemu refuses them.
        let mut b = qcow2();
        b[104] = COMPRESSION_ZSTD;
        assert_eq!(problem(&b), Some(Qcow2Problem::CompressionTypeBit { compression_type: 1, bit_set: false }));
        let mut b = qcow2();
        b[72..80].copy_from_slice(&INCOMPAT_COMPRESSION.to_be_bytes());
        assert_eq!(problem(&b), Some(Qcow2Problem::CompressionTypeBit { compression_type: 0, bit_set: true }));
        assert!(err(&b).contains("compression type"), "{}", err(&b));
        // Unknown compression types, with or without the bit.
        for (t, bits) in [(2u8, INCOMPAT_COMPRESSION), (2, 0), (255, INCOMPAT_COMPRESSION)] {
            let mut b = qcow2();
            b[104] = t;
            b[72..80].copy_from_slice(&bits.to_be_bytes());
            assert_eq!(problem(&b), Some(Qcow2Problem::CompressionType(t)), "type {t}");
        }
        // A 104-byte header has no compression_type field: zlib, so the bit must be clear; the
        // byte at 104 is then the first header extension's, not a compression type.
        let mut b = qcow2();
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b[104..112].fill(0);
        assert!(check(&b).is_ok(), "{}", err(&b));
        b[72..80].copy_from_slice(&INCOMPAT_COMPRESSION.to_be_bytes());
        assert_eq!(problem(&b), Some(Qcow2Problem::CompressionTypeBit { compression_type: 0, bit_set: true }));
    }

    #[test]
    fn encryption_is_refused() {
        let mut b = qcow2();
        b[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert!(err(&b).contains("encrypted"));
    }

    #[test]
    fn snapshots_are_refused() {
        let mut b = qcow2();
        b[60..64].copy_from_slice(&1u32.to_be_bytes());
        assert!(err(&b).contains("snapshots"));
    }

    #[test]
    fn data_file_extension_is_refused() {
        let mut b = qcow2();
        b[112..116].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
        b[116..120].copy_from_slice(&9u32.to_be_bytes());
        b[120..129].copy_from_slice(b"/etc/shad");
        assert!(err(&b).contains("external data file"));
    }

    #[test]
    fn extension_running_past_the_cluster_is_refused() {
        let mut b = qcow2();
        b[112..116].copy_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
        b[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(err(&b).contains("past the first cluster"));
    }

    #[test]
    fn insane_cluster_bits_and_tables_outside_the_file_are_refused() {
        let mut b = qcow2();
        b[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert!(err(&b).contains("cluster_bits"));
        let mut b = qcow2();
        b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(err(&b).contains("L1"));
        assert!(check(&qcow2()[..100]).is_err());
    }

    #[test]
    fn raw_that_looks_like_another_format_is_refused() {
        let looks_like = |head: &[u8]| match sniff_raw(head) {
            Err(ImageError::RawLooksLike(k)) => Some(k),
            _ => None,
        };
        assert_eq!(looks_like(&qcow2()), Some("qcow2"));
        assert_eq!(looks_like(b"KDMV\x01\0\0\0"), Some("vmdk"));
        assert_eq!(looks_like(b"vhdxfile...."), Some("vhdx"));
        assert_eq!(looks_like(b"QED\0...."), Some("qed"));
        assert_eq!(looks_like(b"LUKS\xba\xbe\0\x01"), Some("luks"));
        assert!(sniff_raw(&[0u8; 4096]).is_ok());
    }

    fn problem(b: &[u8]) -> Option<Qcow2Problem> {
        match check(b) {
            Err(ImageError::Qcow2(p)) => Some(p),
            _ => None,
        }
    }

    #[test]
    fn header_problems_are_told_apart() {
        let mut b = qcow2();
        b[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(problem(&b), Some(Qcow2Problem::Version(4)));
        let mut b = qcow2();
        b[72..80].copy_from_slice(&1u64.to_be_bytes());
        assert_eq!(problem(&b), Some(Qcow2Problem::IncompatibleFeature { bit: 0, what: "dirty" }));
        let mut b = qcow2();
        b[100..104].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(problem(&b), Some(Qcow2Problem::HeaderLength(100)));
    }

    fn sound_qcow2_info() -> ImageInfo {
        ImageInfo {
            format: "qcow2".into(),
            virtual_size: 64 << 20,
            actual_size: Some(200704),
            backing: None,
            backing_format: None,
            snapshots: 0,
            dirty: false,
            encrypted: false,
            corrupt: false,
            data_file: None,
        }
    }

    fn expect_qcow2() -> Expect<'static> {
        Expect {
            format: "qcow2",
            name: "m.qcow2",
            size: 1,
            virtual_size: 64 << 20,
            sha256: "",
            policy: ImagePolicy { max_virtual_size: 1 << 40, qemu_img: true },
        }
    }

    #[test]
    fn second_opinion_accepts_a_sound_image() {
        assert!(second_opinion(&sound_qcow2_info(), &expect_qcow2()).is_ok());
    }

    #[test]
    fn second_opinion_refuses_what_the_image_must_not_be() {
        let e = expect_qcow2();
        let sound = sound_qcow2_info();
        let refusal = |i: ImageInfo| second_opinion(&i, &e).unwrap_err();
        assert!(
            matches!(refusal(ImageInfo { format: "raw".into(), ..sound.clone() }), ImageError::QemuImgFormat(f) if f == "raw")
        );
        assert!(matches!(
            refusal(ImageInfo { backing: Some("/etc/hostname".into()), ..sound.clone() }),
            ImageError::QemuImgBacking
        ));
        assert!(matches!(
            refusal(ImageInfo { data_file: Some("/dev/sda".into()), ..sound.clone() }),
            ImageError::QemuImgDataFile
        ));
        assert!(matches!(refusal(ImageInfo { corrupt: true, ..sound.clone() }), ImageError::QemuImgCorrupt));
        assert!(matches!(refusal(ImageInfo { encrypted: true, ..sound.clone() }), ImageError::QemuImgEncrypted));
        let small = refusal(ImageInfo { virtual_size: 1 << 20, ..sound });
        assert!(matches!(small, ImageError::QemuImgVirtualSize { got: 1048576, want: 67108864 }), "{small}");
    }

    #[test]
    fn a_missing_file_is_an_io_error_with_its_cause() {
        let e = verify_image(Path::new("/nonexistent/m.qcow2"), &expect_qcow2()).unwrap_err();
        assert!(matches!(&e, ImageError::Io(io) if io.kind() == std::io::ErrorKind::NotFound), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn qemu_img_agrees_with_a_real_image_and_refuses_a_wrong_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.qcow2");
        QemuImg::new().create(&p, "qcow2", 64 << 20).unwrap();
        let size = std::fs::metadata(&p).unwrap().len();
        let sha = sha256_file(&p).unwrap();
        let e = Expect {
            format: "qcow2",
            name: "m.qcow2",
            size,
            virtual_size: 64 << 20,
            sha256: &sha,
            policy: ImagePolicy { max_virtual_size: 1 << 40, qemu_img: true },
        };
        verify_image(&p, &e).unwrap();
        let wrong = Expect { virtual_size: 32 << 20, ..e.clone() };
        assert!(matches!(verify_image(&p, &wrong), Err(ImageError::VirtualSize { .. })));
        let small = Expect { policy: ImagePolicy { max_virtual_size: 1 << 20, qemu_img: true }, ..e.clone() };
        assert!(matches!(verify_image(&p, &small), Err(ImageError::TooBig { .. })));
        let bad_sha = Expect { sha256: &"0".repeat(64), ..e.clone() };
        assert!(matches!(verify_image(&p, &bad_sha), Err(ImageError::Sha256 { .. })));
        // qemu-img alone, past our own header checks: it reads the size the header states.
        let wrong_qemu = Expect { virtual_size: 32 << 20, ..e };
        assert!(matches!(
            qemu_img_second_opinion(&p, &wrong_qemu),
            Err(ImageError::QemuImgVirtualSize { got: 67108864, want: 33554432 })
        ));
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn a_zstd_compressed_master_made_by_qemu_img_passes_every_check() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("m.raw");
        std::fs::write(&plain, b"compressible ".repeat(300_000)).unwrap();
        let vsize = std::fs::metadata(&plain).unwrap().len().next_multiple_of(512);
        std::fs::OpenOptions::new().write(true).open(&plain).unwrap().set_len(vsize).unwrap();
        let p = dir.path().join("m.zst.qcow2");
        QemuImg::new().convert_compressed(&plain, "raw", &p).unwrap();
        let head = std::fs::read(&p).unwrap();
        assert_eq!(head[104], COMPRESSION_ZSTD, "qemu-img wrote zstd");
        assert_ne!(be64(&head, 72) & INCOMPAT_COMPRESSION, 0, "and set bit 3");
        let size = head.len() as u64;
        let sha = sha256_file(&p).unwrap();
        let e = Expect {
            format: "qcow2",
            name: "m.zst.qcow2",
            size,
            virtual_size: vsize,
            sha256: &sha,
            policy: ImagePolicy { max_virtual_size: 1 << 40, qemu_img: true },
        };
        verify_image(&p, &e).unwrap();
        assert!(size < vsize / 4, "compressed: {size} of {vsize}");
    }

    /// A sample for each of QEMU's probes, as the probe reads it (block/*.c).
    fn probe_samples() -> Vec<(&'static str, Vec<u8>)> {
        let with = |parts: &[(usize, &[u8])]| {
            let mut b = vec![0u8; 4096];
            for (o, bytes) in parts {
                b[*o..*o + bytes.len()].copy_from_slice(bytes);
            }
            b
        };
        vec![
            ("qcow2", qcow2()),
            ("qcow", with(&[(0, QCOW2_MAGIC), (4, &1u32.to_be_bytes())])),
            ("qed", with(&[(0, b"QED\0")])),
            ("vmdk", with(&[(0, b"KDMV\x01\0\0\0")])),
            ("vmdk", with(&[(0, b"COWD\x01\0\0\0")])),
            // Text descriptors: comments, lines of spaces (CRLF too), then version=.
            ("vmdk", b"version=1\nRW 8 FLAT \"/etc/passwd\" 0\n".to_vec()),
            ("vmdk", b"# hello\nversion=2\nRW 8 FLAT \"/etc/passwd\" 0\n".to_vec()),
            ("vmdk", b"#!x\n# more\n   \n  \r\nversion=3\r\nRW 8 FLAT \"/etc/shadow\" 0\n".to_vec()),
            ("vmdk", b"# Disk DescriptorFile\nversion=1\n".to_vec()),
            ("vhdx", with(&[(0, b"vhdxfile")])),
            ("vpc", with(&[(0, b"conectix")])),
            ("luks", with(&[(0, b"LUKS\xba\xbe\0\x01")])),
            ("vdi", with(&[(0, b"<<< QEMU VM Virtual Disk Image >>>\n"), (0x40, &0xbeda_107fu32.to_le_bytes())])),
            ("parallels", with(&[(0, b"WithoutFreeSpace"), (16, &2u32.to_le_bytes())])),
            ("parallels", with(&[(0, b"WithouFreSpacExt"), (16, &2u32.to_le_bytes())])),
            (
                "cloop",
                b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n\0\0\x10\0"
                    .to_vec(),
            ),
            (
                "bochs",
                with(&[
                    (0, b"Bochs Virtual HD Image"),
                    (32, b"Redolog"),
                    (48, b"Growing"),
                    (64, &0x0002_0000u32.to_le_bytes()),
                ]),
            ),
            (
                "bochs",
                with(&[
                    (0, b"Bochs Virtual HD Image"),
                    (32, b"Redolog"),
                    (48, b"Growing"),
                    (64, &0x0001_0000u32.to_le_bytes()),
                ]),
            ),
        ]
    }

    #[test]
    fn raw_content_any_qemu_probe_would_claim_is_refused_with_the_format_named() {
        for (format, sample) in probe_samples() {
            assert_eq!(probe_format(&sample), Some(format), "{:?}", String::from_utf8_lossy(&sample[..40]));
            let e = sniff_raw(&sample).unwrap_err().to_string();
            assert_eq!(e, format!("declared raw, but the content starts like a {format} image"));
        }
    }

    #[test]
    fn raw_content_no_probe_claims_is_accepted() {
        let not = [
            vec![0u8; 4096],
            Vec::new(),
            // vmdk_probe: a bare empty line, or any other first line, ends the descriptor search.
            b"# c\n\nversion=1\n".to_vec(),
            b"hello\nversion=1\n".to_vec(),
            b"version=4\n".to_vec(),
            b"version=1".to_vec(),
            b" x\nversion=1\n".to_vec(),
            // A comment longer than the 2048 bytes QEMU reads.
            [vec![b'#'; 3000], b"\nversion=1\n".to_vec()].concat(),
            // parallels with another version; bochs without the NUL after its magic.
            [b"WithoutFreeSpace".as_slice(), &3u32.to_le_bytes()].concat(),
            [b"Bochs Virtual HD ImageX".as_slice(), &[0; 100]].concat(),
            b"conectiX".to_vec(),
        ];
        for b in not {
            assert_eq!(probe_format(&b), None, "{:?}", String::from_utf8_lossy(&b[..b.len().min(40)]));
        }
    }

    #[test]
    fn a_raw_vmdk_descriptor_naming_a_host_file_fails_verification() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.raw");
        let mut b = b"# made by hand\nversion=1\nRW 8 FLAT \"/etc/passwd\" 0\n".to_vec();
        b.resize(65536, 0);
        std::fs::write(&p, &b).unwrap();
        let sha = sha256_file(&p).unwrap();
        let e = Expect {
            format: "raw",
            name: "m.raw",
            size: 65536,
            virtual_size: 65536,
            sha256: &sha,
            policy: ImagePolicy { max_virtual_size: 1 << 40, qemu_img: false },
        };
        assert!(matches!(verify_image(&p, &e), Err(ImageError::RawLooksLike("vmdk"))));
        // A raw master whose name QEMU's dmg probe takes.
        std::fs::write(&p, vec![0u8; 65536]).unwrap();
        let sha = sha256_file(&p).unwrap();
        let e = Expect { sha256: &sha, name: "m.dmg", ..e };
        assert!(matches!(verify_image(&p, &e), Err(ImageError::RawNamedLike("dmg"))));
        verify_image(&p, &Expect { name: "m.raw", ..e }).unwrap();
    }

    fn expect_raw<'a>(name: &'a str, size: u64, sha256: &'a str) -> Expect<'a> {
        Expect {
            format: "raw",
            name,
            size,
            virtual_size: size,
            sha256,
            policy: ImagePolicy { max_virtual_size: 1 << 40, qemu_img: true },
        }
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn a_raw_master_passes_every_check_and_a_qcow2_declared_raw_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.raw");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let sha = sha256_file(&p).unwrap();
        verify_image(&p, &expect_raw("m.raw", 1 << 20, &sha)).unwrap();
        let q = dir.path().join("q.raw");
        QemuImg::new().create(&q, "qcow2", 1 << 20).unwrap();
        let (size, sha) = (std::fs::metadata(&q).unwrap().len(), sha256_file(&q).unwrap());
        assert!(matches!(verify_image(&q, &expect_raw("q.raw", size, &sha)), Err(ImageError::RawLooksLike("qcow2"))));
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn qemu_imgs_own_probe_refuses_what_it_does_not_take_for_raw() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("m.raw");
        std::fs::write(&good, vec![0u8; 1 << 20]).unwrap();
        second_opinion_raw(&good, 1 << 20).unwrap();
        let small = second_opinion_raw(&good, 2 << 20).unwrap_err();
        assert!(matches!(small, ImageError::QemuImgVirtualSize { got: 1048576, want: 2097152 }), "{small}");
        // A qcow2: qemu-img's probe says so (past our own sniff, which would refuse it first).
        let q = dir.path().join("q.raw");
        QemuImg::new().create(&q, "qcow2", 1 << 20).unwrap();
        let e = second_opinion_raw(&q, 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "qemu-img's own probe does not take it for raw: it says qcow2");
        // A vmdk descriptor naming a host file: the confined probe cannot open the extent. The
        // second opinion with `-f raw` (all there was before) takes it for a sound raw image.
        let v = dir.path().join("v.raw");
        let mut b = b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
            createType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/passwd\" 0\n"
            .to_vec();
        b.resize(65536, 0);
        std::fs::write(&v, &b).unwrap();
        qemu_img_second_opinion(&v, &expect_raw("v.raw", 65536, "")).unwrap();
        let e = second_opinion_raw(&v, 65536).unwrap_err();
        let line = vcc_core::error::one_line(&e);
        assert!(line.starts_with("qemu-img's own probe does not take it for raw: qemu-img could not read"), "{line}");
        assert!(line.ends_with("Could not open '/etc/passwd': Permission denied"), "{line}");
    }
}
