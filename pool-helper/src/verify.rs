//! Image checks for untrusted masters: our own qcow2 header parser, raw-image sniffing, whole-file
//! SHA-256, and `qemu-img info` as a second opinion (argv, timeout, resource limits).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Incompatible feature bits we accept: compression type (3), extended L2 (4).
const INCOMPAT_OK: u64 = (1 << 3) | (1 << 4);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read the image: {0}")]
    Io(String),
    #[error("SHA-256 {got} differs from the manifest's {want}")]
    Sha256 { got: String, want: String },
    #[error("file size {got} differs from the manifest's {want}")]
    Size { got: u64, want: u64 },
    #[error("qcow2 header: {0}")]
    Qcow2(String),
    #[error("declared raw, but the content starts like a {0} image")]
    RawLooksLike(&'static str),
    #[error("virtual size {got} differs from the manifest's {want}")]
    VirtualSize { got: u64, want: u64 },
    #[error("virtual size {got} is above the policy maximum {max}")]
    TooBig { got: u64, max: u64 },
    #[error("format '{0}' is not accepted")]
    Format(String),
    #[error("qemu-img second opinion: {0}")]
    QemuImg(String),
}

/// What the qcow2 header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    pub version: u32,
    pub cluster_bits: u32,
    pub virtual_size: u64,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    (u64::from(be32(b, o)) << 32) | u64::from(be32(b, o + 4))
}

/// Parses and checks a qcow2 header. `head` is the start of the file (at least the first cluster
/// or the whole file if smaller); `file_size` is the file's length.
pub fn check_qcow2_header(head: &[u8], file_size: u64) -> Result<Qcow2Info, ImageError> {
    let bad = |s: String| Err(ImageError::Qcow2(s));
    if head.len() < 72 {
        return bad("file too short for a qcow2 header".into());
    }
    if &head[0..4] != QCOW2_MAGIC {
        return bad("bad magic (not a qcow2 file)".into());
    }
    let version = be32(head, 4);
    if version != 2 && version != 3 {
        return bad(format!("version {version} (want 2 or 3)"));
    }
    if be64(head, 8) != 0 || be32(head, 16) != 0 {
        return bad("it names a backing file".into());
    }
    let cluster_bits = be32(head, 20);
    if !(9..=21).contains(&cluster_bits) {
        return bad(format!("cluster_bits {cluster_bits} outside [9, 21]"));
    }
    let cluster = 1u64 << cluster_bits;
    let virtual_size = be64(head, 24);
    if be32(head, 32) != 0 {
        return bad("it is encrypted".into());
    }
    let l1_size = u64::from(be32(head, 36));
    let l1_off = be64(head, 40);
    let rt_off = be64(head, 48);
    let rt_clusters = u64::from(be32(head, 56));
    if be32(head, 60) != 0 {
        return bad("it has internal snapshots".into());
    }
    let inside = |off: u64, len: u64| off % cluster == 0 && off.checked_add(len).is_some_and(|e| e <= file_size);
    if !inside(l1_off, l1_size.saturating_mul(8)) {
        return bad("L1 table lies outside the file".into());
    }
    if rt_off == 0 || !inside(rt_off, rt_clusters.saturating_mul(cluster)) {
        return bad("refcount table lies outside the file".into());
    }
    let mut header_len = 72usize;
    if version == 3 {
        if head.len() < 104 {
            return bad("file too short for a version 3 header".into());
        }
        let incompat = be64(head, 72);
        for (bit, what) in [(0, "dirty"), (1, "corrupt"), (2, "an external data file")] {
            if incompat & (1 << bit) != 0 {
                return bad(format!("incompatible feature bit {bit} set ({what})"));
            }
        }
        let unknown = incompat & !INCOMPAT_OK & !0b111;
        if unknown != 0 {
            return bad(format!("unknown incompatible feature bits {unknown:#x}"));
        }
        header_len = be32(head, 100) as usize;
        if header_len < 104 || header_len % 8 != 0 || header_len as u64 > cluster {
            return bad(format!("header length {header_len} is invalid"));
        }
    }
    // Header extensions, up to the end of the first cluster.
    let limit = (cluster as usize).min(head.len());
    let mut off = header_len;
    loop {
        if off + 8 > limit {
            return bad("header extensions run past the first cluster".into());
        }
        let typ = be32(head, off);
        let len = be32(head, off + 4) as usize;
        let data_end = (off + 8).checked_add(len).filter(|&e| e <= limit);
        let Some(data_end) = data_end else {
            return bad(format!("header extension {typ:#x} runs past the first cluster"));
        };
        match typ {
            EXT_END => break,
            EXT_DATA_FILE => return bad("header names an external data file".into()),
            EXT_CRYPTO => return bad("header carries an encryption header".into()),
            EXT_BACKING_FORMAT => return bad("header names a backing file format".into()),
            EXT_FEATURE_TABLE | EXT_BITMAPS => {}
            _ => {} // unknown compatible extensions are ignored, as qemu does
        }
        off = data_end.next_multiple_of(8);
    }
    Ok(Qcow2Info { version, cluster_bits, virtual_size })
}

/// Rejects a "raw" image whose first bytes look like another format.
pub fn sniff_raw(head: &[u8]) -> Result<(), ImageError> {
    let starts = |m: &[u8]| head.starts_with(m);
    let kind = if starts(QCOW2_MAGIC) {
        Some("qcow2")
    } else if starts(b"QED\0") {
        Some("qed")
    } else if starts(b"KDMV") || starts(b"# Disk DescriptorFile") || starts(b"COWD") {
        Some("vmdk")
    } else if starts(b"vhdxfile") {
        Some("vhdx")
    } else if starts(b"LUKS\xba\xbe") {
        Some("luks")
    } else if starts(b"conectix") {
        Some("vpc")
    } else if head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
        Some("vdi")
    } else {
        None
    };
    match kind {
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

/// What an image must be.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub format: &'a str,
    pub size: u64,
    pub virtual_size: u64,
    pub sha256: &'a str,
    pub max_virtual_size: u64,
    /// Run `qemu-img info` as a second opinion.
    pub qemu_img: bool,
}

/// The full check, in order: size, SHA-256, own header parse, then qemu-img.
pub fn verify_image(path: &Path, e: &Expect<'_>) -> Result<(), ImageError> {
    let io = |err: std::io::Error| ImageError::Io(err.to_string());
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(ImageError::Io("not a regular file".into()));
    }
    if meta.len() != e.size {
        return Err(ImageError::Size { got: meta.len(), want: e.size });
    }
    let got = sha256_file(path).map_err(io)?;
    if got != e.sha256 {
        return Err(ImageError::Sha256 { got, want: e.sha256.to_string() });
    }
    check_header(path, e)?;
    if e.qemu_img {
        qemu_img_second_opinion(path, e)?;
    }
    Ok(())
}

/// Our own header checks (no external program).
pub fn check_header(path: &Path, e: &Expect<'_>) -> Result<(), ImageError> {
    let io = |err: std::io::Error| ImageError::Io(err.to_string());
    let mut head = Vec::with_capacity(2 << 20);
    std::fs::File::open(path).map_err(io)?.take(2 << 20).read_to_end(&mut head).map_err(io)?;
    let vsize = match e.format {
        "qcow2" => check_qcow2_header(&head, e.size)?.virtual_size,
        "raw" => {
            sniff_raw(&head)?;
            e.size
        }
        f => return Err(ImageError::Format(f.into())),
    };
    if vsize != e.virtual_size {
        return Err(ImageError::VirtualSize { got: vsize, want: e.virtual_size });
    }
    if vsize > e.max_virtual_size {
        return Err(ImageError::TooBig { got: vsize, max: e.max_virtual_size });
    }
    Ok(())
}

/// `qemu-img info -f FMT --output=json --force-share FILE` under `prlimit` (30 s CPU, 2 GiB
/// address space) with a 60 s wall-clock timeout.
pub fn qemu_img_second_opinion(path: &Path, e: &Expect<'_>) -> Result<(), ImageError> {
    let q = |s: String| ImageError::QemuImg(s);
    let mut cmd = Command::new("prlimit");
    cmd.args([
        "--cpu=30",
        "--as=2147483648",
        "--",
        "qemu-img",
        "info",
        "-f",
        e.format,
        "--output=json",
        "--force-share",
    ])
    .arg(path)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|err| q(format!("cannot run prlimit/qemu-img: {err}")))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > Duration::from_secs(60) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(q("timed out after 60 s".into()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(err) => return Err(q(err.to_string())),
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut o) = child.stderr.take() {
        let _ = o.read_to_string(&mut err);
    }
    if !status.success() {
        return Err(q(format!("exited with {status}: {}", err.trim().replace('\n', "; "))));
    }
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|x| q(format!("unreadable output: {x}")))?;
    if v.get("format").and_then(|f| f.as_str()) != Some(e.format) {
        return Err(q(format!("format is {}", v.get("format").unwrap_or(&serde_json::Value::Null))));
    }
    if v.get("backing-filename").is_some() || v.get("full-backing-filename").is_some() {
        return Err(q("image has a backing file".into()));
    }
    let data = v.pointer("/format-specific/data");
    if data.and_then(|d| d.get("data-file")).is_some() {
        return Err(q("image has an external data file".into()));
    }
    if data.and_then(|d| d.get("corrupt")).and_then(|c| c.as_bool()) == Some(true) {
        return Err(q("image is marked corrupt".into()));
    }
    if data.and_then(|d| d.get("encrypt")).is_some() || v.get("encrypted").and_then(|c| c.as_bool()) == Some(true) {
        return Err(q("image is encrypted".into()));
    }
    let vs = v.get("virtual-size").and_then(|s| s.as_u64()).unwrap_or(0);
    if vs != e.virtual_size {
        return Err(q(format!("virtual size {vs} != {}", e.virtual_size)));
    }
    Ok(())
}

/// Reads the virtual size of a local image we are about to publish (trusted: our own pool).
pub fn local_virtual_size(path: &Path, format: &str, size: u64) -> Result<u64, ImageError> {
    let io = |err: std::io::Error| ImageError::Io(err.to_string());
    let mut head = Vec::new();
    std::fs::File::open(path).map_err(io)?.take(2 << 20).read_to_end(&mut head).map_err(io)?;
    match format {
        "qcow2" => Ok(check_qcow2_header(&head, size)?.virtual_size),
        "raw" => {
            sniff_raw(&head)?;
            Ok(size)
        }
        f => Err(ImageError::Format(f.into())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A minimal valid qcow2 v3 image (64 KiB clusters): header, refcount table at cluster 1,
    /// L1 at cluster 3; 4 clusters in all.
    fn qcow2() -> Vec<u8> {
        let mut b = vec![0u8; 4 * 65536];
        b[0..4].copy_from_slice(QCOW2_MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 * 65536).to_be_bytes());
        b[48..56].copy_from_slice(&65536u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
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
        assert_eq!(i, Qcow2Info { version: 3, cluster_bits: 16, virtual_size: 1 << 30 });
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
        assert_eq!(sniff_raw(&qcow2()), Err(ImageError::RawLooksLike("qcow2")));
        assert_eq!(sniff_raw(b"KDMV\x01\0\0\0"), Err(ImageError::RawLooksLike("vmdk")));
        assert_eq!(sniff_raw(b"vhdxfile...."), Err(ImageError::RawLooksLike("vhdx")));
        assert_eq!(sniff_raw(b"QED\0...."), Err(ImageError::RawLooksLike("qed")));
        assert_eq!(sniff_raw(b"LUKS\xba\xbe\0\x01"), Err(ImageError::RawLooksLike("luks")));
        assert_eq!(sniff_raw(&[0u8; 4096]), Ok(()));
    }

    #[test]
    fn qemu_img_agrees_with_a_real_image_and_refuses_a_wrong_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.qcow2");
        vcc_core::process::run("qemu-img", &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"]).unwrap();
        let size = std::fs::metadata(&p).unwrap().len();
        let sha = sha256_file(&p).unwrap();
        let e = Expect {
            format: "qcow2",
            size,
            virtual_size: 64 << 20,
            sha256: &sha,
            max_virtual_size: 1 << 40,
            qemu_img: true,
        };
        verify_image(&p, &e).unwrap();
        let wrong = Expect { virtual_size: 32 << 20, ..e.clone() };
        assert!(matches!(verify_image(&p, &wrong), Err(ImageError::VirtualSize { .. })));
        let small = Expect { max_virtual_size: 1 << 20, ..e.clone() };
        assert!(matches!(verify_image(&p, &small), Err(ImageError::TooBig { .. })));
        let bad_sha = Expect { sha256: &"0".repeat(64), ..e };
        assert!(matches!(verify_image(&p, &bad_sha), Err(ImageError::Sha256 { .. })));
    }
}
