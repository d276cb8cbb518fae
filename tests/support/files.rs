//! Files and images: hashes, modes, images made with qemu-img, pseudo-random data, manifests.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::process::run_ok;

/// SHA-256 of a file, by `sha256sum`.
pub fn sha256(path: impl AsRef<Path>) -> String {
    let p = path.as_ref();
    let out = run_ok("sha256sum", &[p.as_os_str()]);
    out.split_whitespace().next().unwrap_or_default().to_string()
}

/// The permission bits of a file.
pub fn mode(path: impl AsRef<Path>) -> u32 {
    std::fs::metadata(path.as_ref())
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.as_ref().display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `qemu-img info --output=json -f FORMAT --force-share PATH`.
pub fn qemu_img_info(path: impl AsRef<Path>, format: &str) -> serde_json::Value {
    let p = path.as_ref();
    let out = run_ok(
        "qemu-img",
        &[
            OsStr::new("info"),
            "--output=json".as_ref(),
            "-f".as_ref(),
            format.as_ref(),
            "--force-share".as_ref(),
            p.as_os_str(),
        ],
    );
    serde_json::from_str(&out).unwrap()
}

/// A qcow2 image of `size_mib` MiB with its first MiB written with 0xab (so hashes mean something).
pub fn make_qcow2(path: impl AsRef<Path>, size_mib: u64) {
    let p = path.as_ref();
    let size = format!("{size_mib}M");
    run_ok(
        "qemu-img",
        &[OsStr::new("create"), "-q".as_ref(), "-f".as_ref(), "qcow2".as_ref(), p.as_os_str(), size.as_ref()],
    );
    run_ok(
        "qemu-io",
        &[OsStr::new("-f"), "qcow2".as_ref(), "-c".as_ref(), "write -P 0xab 0 1M".as_ref(), p.as_os_str()],
    );
}

/// A raw image of `size_mib` MiB: a pattern in the first MiB, the rest sparse.
pub fn make_raw(path: impl AsRef<Path>, size_mib: u64) {
    let p = path.as_ref();
    let mut data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    data.truncate((size_mib << 20).min(1 << 20) as usize);
    std::fs::write(p, &data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.set_len(size_mib << 20).unwrap();
}

/// An image in another format (vmdk, vdi...) made by qemu-img.
pub fn make_image(path: impl AsRef<Path>, format: &str, size_mib: u64) {
    let p = path.as_ref();
    let size = format!("{size_mib}M");
    run_ok(
        "qemu-img",
        &[OsStr::new("create"), "-q".as_ref(), "-f".as_ref(), format.as_ref(), p.as_os_str(), size.as_ref()],
    );
}

/// Writes `block` `times` over into a new file at `path` and syncs it (a big file quickly).
pub fn write_repeated(path: impl AsRef<Path>, block: &[u8], times: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path.as_ref()).unwrap());
    for _ in 0..times {
        f.write_all(block).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
}

/// virt-clone-cow's staging files (`vcc_core::staging`) for the files of `dir` (under `key`: its
/// pool's name, or `files`) whose names contain `prefix`: what a convert is writing, or left.
pub fn staged_files(dir: impl AsRef<Path>, key: &str, prefix: &str) -> Vec<String> {
    let sdir = vcc_core::staging::vcc_staging_dir(dir.as_ref(), key).unwrap();
    list_dir(sdir).into_iter().filter(|f| f.contains(prefix)).collect()
}

/// The names in a directory, sorted (empty when it does not exist).
pub fn list_dir(dir: impl AsRef<Path>) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir.as_ref()) {
        Ok(rd) => rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// `n` pseudo-random bytes from `seed` (xorshift: reruns are reproducible).
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Whether two files have the same content.
pub fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// A pool-helper manifest (or any JSON file), parsed.
pub fn manifest(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The access modes (O_RDONLY=0, O_WRONLY=1, O_RDWR=2) with which process `pid` holds `path` open.
pub fn open_modes(pid: u32, path: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let want = std::fs::canonicalize(path).unwrap();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if std::fs::read_link(e.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy())).unwrap();
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
        out.push(u32::from_str_radix(flags, 8).unwrap() & 0o3);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_are_reproducible_and_differ_by_seed() {
        assert_eq!(random_bytes(1000, 7), random_bytes(1000, 7));
        assert_ne!(random_bytes(1000, 7), random_bytes(1000, 8));
        assert_eq!(random_bytes(13, 1).len(), 13);
    }
}
