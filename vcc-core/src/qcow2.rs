//! The one qcow2 header reader: the fixed fields of a version 2 or 3 header out of the first bytes
//! of a file, and the backing file name an overlay's header holds, both bounded and panic-free on
//! any bytes. It reads; it judges nothing: pool-helper's `verify::check_qcow2_header` checks an
//! untrusted master's header with it, the hook reads an overlay's backing file name with it
//! (`lazy`), and pool-helper's directory pools tell qcow2 from raw with it.
//!
//! Layout (QEMU's docs/interop/qcow2.txt), big-endian: magic `QFI\xfb` (0), version (4),
//! backing_file_offset (8), backing_file_size (16), cluster_bits (20), size (24), crypt_method
//! (32), l1_size (36), l1_table_offset (40), refcount_table_offset (48),
//! refcount_table_clusters (56), nb_snapshots (60), snapshots_offset (64); version 3 adds
//! incompatible_features (72), compatible_features (80), autoclear_features (88),
//! refcount_order (96), header_length (100) and, in a header longer than 104 bytes,
//! compression_type (104).

use std::path::Path;

/// The first four bytes of every qcow2 file.
pub const MAGIC: &[u8; 4] = b"QFI\xfb";

/// The length of the fixed header of version 2 (and of the part version 3 shares).
pub const V2_HEADER_LEN: usize = 72;

/// The length of the fixed header of version 3.
pub const V3_HEADER_LEN: usize = 104;

/// Where the v3 header's one-byte `compression_type` field is (present when the header length
/// is above this offset).
pub const COMPRESSION_TYPE_OFFSET: usize = 104;

/// The longest backing file name qcow2 allows (QEMU refuses longer ones).
pub const MAX_BACKING_NAME: u32 = 1023;

/// The most bytes of a file read to find its backing file name (QEMU puts it in the first
/// cluster, 2 MiB at the most).
pub const MAX_BACKING_END: u64 = 2 << 20;

/// Why bytes are not a qcow2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotQcow2 {
    /// Fewer bytes than the fixed header of version 2.
    TooShort,
    /// Not the qcow2 magic.
    BadMagic,
}

/// The fixed fields of a qcow2 header, as the bytes say (nothing checked but the magic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    /// 0: no backing file.
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    /// The virtual size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    /// The version 3 fields, when the bytes hold a version 3 header (at least 104 bytes).
    pub v3: Option<V3>,
}

/// The fields version 3 adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V3 {
    pub incompatible_features: u64,
    pub header_length: u32,
    /// The byte at [`COMPRESSION_TYPE_OFFSET`], when the bytes reach it (meaningful only when
    /// `header_length` is above that offset; else the compression type is zlib).
    pub compression_type: Option<u8>,
}

fn be32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(o..o.checked_add(4)?)?.try_into().ok()?))
}

fn be64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(o..o.checked_add(8)?)?.try_into().ok()?))
}

/// Whether `head` starts with the qcow2 magic.
pub fn has_magic(head: &[u8]) -> bool {
    head.starts_with(MAGIC)
}

impl Header {
    /// Reads the fixed header from the start of a file (`head`: its first bytes, any number).
    pub fn parse(head: &[u8]) -> Result<Header, NotQcow2> {
        let fixed = head.get(..V2_HEADER_LEN).ok_or(NotQcow2::TooShort)?;
        if !has_magic(fixed) {
            return Err(NotQcow2::BadMagic);
        }
        let f32 = |o| be32(fixed, o).unwrap_or(0);
        let f64 = |o| be64(fixed, o).unwrap_or(0);
        let version = f32(4);
        let v3 = match (version, head.get(..V3_HEADER_LEN)) {
            (3, Some(h)) => Some(V3 {
                incompatible_features: be64(h, 72).unwrap_or(0),
                header_length: be32(h, 100).unwrap_or(0),
                compression_type: head.get(COMPRESSION_TYPE_OFFSET).copied(),
            }),
            _ => None,
        };
        Ok(Header {
            version,
            backing_file_offset: f64(8),
            backing_file_size: f32(16),
            cluster_bits: f32(20),
            size: f64(24),
            crypt_method: f32(32),
            l1_size: f32(36),
            l1_table_offset: f64(40),
            refcount_table_offset: f64(48),
            refcount_table_clusters: f32(56),
            nb_snapshots: f32(60),
            v3,
        })
    }

    /// Where the backing file name is (offset, length), when the header names one that qcow2
    /// allows and that ends within [`MAX_BACKING_END`].
    pub fn backing_range(&self) -> Option<(u64, u32)> {
        let (off, len) = (self.backing_file_offset, self.backing_file_size);
        let end = off.checked_add(u64::from(len))?;
        (off != 0 && len != 0 && len <= MAX_BACKING_NAME && end <= MAX_BACKING_END).then_some((off, len))
    }
}

/// The backing file name in a qcow2 image's header, read directly (bounded reads, no qemu-img
/// run, symlinks not followed): `None` when the file is not a qcow2 image, names no backing
/// file, or names one the header does not hold sensibly (too long, too far, not UTF-8).
pub fn backing_name(image: &Path) -> Option<String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(image).ok()?;
    let mut head = [0u8; V2_HEADER_LEN];
    f.read_exact_at(&mut head, 0).ok()?;
    let (off, len) = Header::parse(&head).ok()?.backing_range()?;
    let mut name = vec![0u8; len as usize];
    f.read_exact_at(&mut name, off).ok()?;
    String::from_utf8(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A version 3 header of 4096 bytes naming `name` at offset 512.
    fn overlay_header(name: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[0..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[72..80].copy_from_slice(&(1u64 << 3).to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h[104] = 1;
        h[512..512 + name.len()].copy_from_slice(name);
        h
    }

    #[test]
    fn the_fields_are_read_where_qcow2_puts_them() {
        let h = overlay_header(b"base.qcow2");
        let p = Header::parse(&h).unwrap();
        assert_eq!((p.version, p.cluster_bits, p.size), (3, 16, 1 << 30));
        assert_eq!((p.backing_file_offset, p.backing_file_size), (512, 10));
        assert_eq!(p.backing_range(), Some((512, 10)));
        assert_eq!(p.v3, Some(V3 { incompatible_features: 1 << 3, header_length: 112, compression_type: Some(1) }));
        assert_eq!(Header::parse(&h[..V3_HEADER_LEN - 1]).unwrap().v3, None, "too short for v3 fields");
        assert_eq!(Header::parse(&h[..V2_HEADER_LEN - 1]), Err(NotQcow2::TooShort));
        assert_eq!(Header::parse(&[0u8; 100]), Err(NotQcow2::BadMagic));
    }

    #[test]
    fn the_backing_name_is_read_from_the_overlay_header_and_nonsense_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.qcow2");
        let name = b"nbd+unix:///?socket=/run/pool-helper/nbd/x.sock";
        let h = overlay_header(name);
        std::fs::write(&p, &h).unwrap();
        assert_eq!(backing_name(&p).as_deref(), Some(std::str::from_utf8(name).unwrap()));
        let mut long = h.clone();
        long[16..20].copy_from_slice(&1024u32.to_be_bytes());
        std::fs::write(&p, &long).unwrap();
        assert_eq!(backing_name(&p), None, "a name longer than qcow2 allows");
        let mut far = h.clone();
        far[8..16].copy_from_slice(&(u64::MAX - 4).to_be_bytes());
        std::fs::write(&p, &far).unwrap();
        assert_eq!(backing_name(&p), None, "an offset past the bound");
        let mut none = h.clone();
        none[8..20].fill(0);
        std::fs::write(&p, &none).unwrap();
        assert_eq!(backing_name(&p), None);
        std::fs::write(&p, &h[..600]).unwrap();
        assert_eq!(backing_name(&p).as_deref(), Some(std::str::from_utf8(name).unwrap()), "the name within the file");
        std::fs::write(&p, &h[..520]).unwrap();
        assert_eq!(backing_name(&p), None, "a name past the end of the file");
        std::fs::write(&p, b"raw").unwrap();
        assert_eq!(backing_name(&p), None);
        let link = dir.path().join("link.qcow2");
        std::fs::write(&p, &h).unwrap();
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(backing_name(&link), None, "a symlink is not followed");
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_are_refused_without_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            match Header::parse(&b) {
                Ok(h) => {
                    prop_assert!(b.len() >= V2_HEADER_LEN && b.starts_with(MAGIC));
                    prop_assert_eq!(h.v3.is_some(), h.version == 3 && b.len() >= V3_HEADER_LEN);
                    if let Some((off, len)) = h.backing_range() {
                        prop_assert!(off != 0 && len != 0 && len <= MAX_BACKING_NAME);
                        prop_assert!(off + u64::from(len) <= MAX_BACKING_END);
                    }
                }
                Err(NotQcow2::TooShort) => prop_assert!(b.len() < V2_HEADER_LEN),
                Err(NotQcow2::BadMagic) => prop_assert!(!b.starts_with(MAGIC)),
            }
        }

        #[test]
        fn any_bytes_in_a_file_give_a_bounded_backing_name(b in proptest::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
            let mut b = b;
            if magic && b.len() >= 4 {
                b[0..4].copy_from_slice(MAGIC);
            }
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("x");
            std::fs::write(&p, &b).unwrap();
            if let Some(name) = backing_name(&p) {
                prop_assert!(!name.is_empty() && name.len() <= MAX_BACKING_NAME as usize);
            }
        }
    }
}
