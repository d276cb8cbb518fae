//! Creating qcow2 overlays over masters, and reading image facts (through [`crate::qemu_img`]).
//!
//! Overlays are always created with the master's format stated (`-F`), compat 1.1, and the
//! cluster layout asked for ([`OverlayLayout`]: QEMU's default unless the operator chose another,
//! docs/overlay-layout.md). A qemu-img too old for extended L2 entries (before QEMU 5.2) gets
//! QEMU's default layout instead. An existing file is never overwritten.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::Path;
use std::sync::OnceLock;

use quick_xml::escape::escape;

pub use crate::layout::OverlayLayout;
pub use crate::qemu_img::{BackingSpec, ImageInfo};
use crate::qemu_img::{QemuImg, QemuImgError};

/// Formats a master may have. Anything else cannot be a backing file we create overlays over.
pub const MASTER_FORMATS: [&str; 2] = ["qcow2", "raw"];

/// Errors creating an overlay or inspecting an image.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("'{0}' exists already; refusing to overwrite it")]
    Exists(String),
    #[error("cannot create '{path}'")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the overlay '{path}'")]
    QemuImg {
        path: String,
        #[source]
        source: QemuImgError,
    },
    /// qemu-img could not read an image (the cause names it).
    #[error(transparent)]
    Info(QemuImgError),
    #[error("'{0}' can be written by other users (group/other-writable, not sticky, or not owned by root); refusing to create overlays there")]
    UnsafeDir(String),
    #[error("'{0}' is not a regular file; a master must be one")]
    NotRegular(String),
}

/// How overlays are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayOptions {
    /// Cluster size and subclusters.
    pub layout: OverlayLayout,
    /// Wall-clock limit for one qemu-img run (the hook runs while libvirt holds the domain).
    pub timeout: std::time::Duration,
}

impl OverlayOptions {
    /// The default layout ([`OverlayLayout::DEFAULT`]), for file overlays: [`create_file_overlay`]
    /// falls back by itself when qemu-img does not know extended L2 entries, so no probe is
    /// needed (the hook saves a qemu-img run per overlay).
    pub fn preferred() -> Self {
        OverlayOptions { layout: OverlayLayout::DEFAULT, timeout: crate::process::DEFAULT_TIMEOUT }
    }

    /// The default layout as far as the installed qemu-img supports it (asks qemu-img once per
    /// process when the layout needs extended L2 entries).
    pub fn detect() -> Self {
        OverlayOptions::preferred().supported()
    }

    /// The same options with another layout.
    pub fn with_layout(self, layout: OverlayLayout) -> Self {
        OverlayOptions { layout, ..self }
    }

    /// This layout, or QEMU's default if it needs extended L2 entries and qemu-img has none.
    pub fn supported(self) -> Self {
        if self.layout.extended_l2 && !qemu_img_supports_extended_l2() {
            self.plain()
        } else {
            self
        }
    }

    /// The same layout with another qemu-img time limit.
    pub fn with_timeout(self, timeout: std::time::Duration) -> Self {
        OverlayOptions { timeout, ..self }
    }

    /// QEMU's default layout (64 KiB clusters, no subclusters).
    pub fn plain(self) -> Self {
        OverlayOptions { layout: OverlayLayout::QEMU_DEFAULT, ..self }
    }
}

/// Whether `qemu-img create -f qcow2` knows `extended_l2` (QEMU 5.2 and later). Asked once.
pub fn qemu_img_supports_extended_l2() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| QemuImg::new().supports_extended_l2())
}

/// Creates the overlay file `overlay` over `backing` with qemu-img, never overwriting anything:
///
/// * the directory must be one only root (or we) can write to, or a sticky one, so nobody can swap
///   files under us while qemu-img runs as root;
/// * qemu-img writes a hidden temporary file created exclusively beside the overlay, which is then
///   hard-linked to the overlay's name (this fails if the name exists) and removed, so the name
///   appears only when the overlay is complete, and a crash leaves no half-made overlay under it;
/// * the master must be a regular file (a FIFO or a device would block or mislead qemu-img).
pub fn create_file_overlay(
    overlay: &Path,
    backing: &BackingSpec<'_>,
    opts: OverlayOptions,
) -> Result<(), OverlayError> {
    let (dir, file) = split(overlay, true, "not an absolute file path")?;
    check_private_dir(dir)?;
    ensure_regular(backing.path)?;
    create_overlay_in(overlay, dir, &file, backing, opts)
}

/// [`create_file_overlay`] over a lazy master's NBD export (docs/lazy.md): `backing.path` is an
/// `nbd+unix:///?socket=PATH` URL, which QEMU and libvirt open as a network backing store.
pub fn create_overlay_over_export(
    overlay: &Path,
    backing: &BackingSpec<'_>,
    opts: OverlayOptions,
) -> Result<(), OverlayError> {
    let nbd = backing.path.starts_with("nbd+unix:///?socket=/");
    let (dir, file) = split(overlay, nbd, "not an absolute file path over an nbd+unix:// export")?;
    check_private_dir(dir)?;
    create_overlay_in(overlay, dir, &file, backing, opts)
}

/// The overlay's directory and file name, when it is an absolute file path and `ok`.
fn split<'a>(overlay: &'a Path, ok: bool, why: &str) -> Result<(&'a Path, String), OverlayError> {
    match (overlay.parent(), overlay.file_name()) {
        (Some(d), Some(f)) if overlay.is_absolute() && ok => Ok((d, f.to_string_lossy().into_owned())),
        _ => Err(OverlayError::Create {
            path: overlay.display().to_string(),
            source: std::io::Error::other(why.to_string()),
        }),
    }
}

fn create_overlay_in(
    overlay: &Path,
    dir: &Path,
    file: &str,
    backing: &BackingSpec<'_>,
    opts: OverlayOptions,
) -> Result<(), OverlayError> {
    let shown = overlay.display().to_string();
    if overlay.symlink_metadata().is_ok() {
        return Err(OverlayError::Exists(shown));
    }
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let tmp = dir.join(format!(".{file}.vcc-{}-{nanos}.tmp", std::process::id()));
    match OpenOptions::new().write(true).create_new(true).open(&tmp) {
        Ok(_) => {}
        Err(source) => return Err(OverlayError::Create { path: tmp.display().to_string(), source }),
    }
    let result = QemuImg::new()
        .timeout(opts.timeout)
        .create_overlay(&tmp, backing, opts.layout)
        .map_err(|source| OverlayError::QemuImg { path: shown.clone(), source });
    let linked = result.and_then(|()| match std::fs::hard_link(&tmp, overlay) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(OverlayError::Exists(shown.clone())),
        Err(source) => Err(OverlayError::Create { path: shown.clone(), source }),
    });
    let _ = std::fs::remove_file(&tmp);
    linked
}

/// Refuses directories someone other than root (or us) could write to without the sticky bit.
fn check_private_dir(dir: &Path) -> Result<(), OverlayError> {
    use std::os::unix::fs::MetadataExt;
    let shown = dir.display().to_string();
    let m = std::fs::metadata(dir).map_err(|source| OverlayError::Create { path: shown.clone(), source })?;
    // Our effective uid without unsafe code: the owner of /proc/self.
    let me = std::fs::metadata("/proc/self").map(|p| p.uid()).unwrap_or(0);
    let owner_ok = m.uid() == 0 || m.uid() == me;
    let others_cannot_swap = m.mode() & 0o022 == 0 || m.mode() & 0o1000 != 0;
    if !m.is_dir() || !owner_ok || !others_cannot_swap {
        return Err(OverlayError::UnsafeDir(shown));
    }
    Ok(())
}

/// The master must be a regular file (symlinks to one are fine).
fn ensure_regular(path: &str) -> Result<(), OverlayError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(OverlayError::NotRegular(path.to_string())),
        Err(source) => Err(OverlayError::Create { path: path.to_string(), source }),
    }
}

/// Storage-volume XML for an overlay volume named `name` over `backing` (for `virStorageVolCreateXML`).
pub fn overlay_volume_xml(name: &str, backing: &BackingSpec<'_>, opts: OverlayOptions) -> String {
    let features = opts.layout.volume_xml();
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>{}</capacity>\
         <target><format type='qcow2'/><compat>1.1</compat>{features}</target>\
         <backingStore><path>{}</path><format type='{}'/></backingStore></volume>",
        escape(name),
        backing.virtual_size,
        escape(backing.path),
        escape(backing.format),
    )
}

/// `qemu-img info -f FORMAT --output=json --force-share PATH` of a regular file: the format is
/// always stated, so a raw image is never probed as something else.
pub fn image_info(path: &str, format: &str) -> Result<ImageInfo, OverlayError> {
    ensure_regular(path)?;
    QemuImg::new().force_share(true).info(Path::new(path), format).map_err(OverlayError::Info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_xml_states_backing_format_and_layout() {
        let b = BackingSpec { path: "/p/base & co.raw", format: "raw", virtual_size: 1 << 30 };
        let x = overlay_volume_xml("c-vda.qcow2", &b, OverlayOptions::preferred().with_layout(OverlayLayout::L2_128K));
        assert!(x.contains("<path>/p/base &amp; co.raw</path><format type='raw'/>"), "{x}");
        assert!(x.contains("<compat>1.1</compat>"), "{x}");
        assert!(x.contains("<clusterSize unit='KiB'>128</clusterSize><features><extended_l2/></features>"), "{x}");
        assert!(x.contains("<capacity unit='bytes'>1073741824</capacity>"), "{x}");
        let plain = overlay_volume_xml("c", &b, OverlayOptions::preferred().plain());
        assert!(!plain.contains("extended_l2"), "{plain}");
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn file_overlay_over_raw_master_has_stated_format_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let master = dir.path().join("m.raw");
        std::fs::write(&master, vec![0u8; 1 << 20]).unwrap();
        let m = master.to_str().unwrap();
        let ov = dir.path().join("o v.qcow2");
        let b = BackingSpec { path: m, format: "raw", virtual_size: 1 << 20 };
        create_file_overlay(&ov, &b, OverlayOptions::detect()).unwrap();
        let info = image_info(ov.to_str().unwrap(), "qcow2").unwrap();
        assert_eq!(info.backing.as_deref(), Some(m));
        assert_eq!(info.backing_format.as_deref(), Some("raw"));
        assert_eq!(info.virtual_size, 1 << 20);
        let err = create_file_overlay(&ov, &b, OverlayOptions::detect()).unwrap_err();
        assert!(matches!(err, OverlayError::Exists(_)), "{err}");
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn failed_qemu_img_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let master = dir.path().join("m.raw");
        std::fs::write(&master, vec![0u8; 4096]).unwrap();
        let ov = dir.path().join("o.qcow2");
        // No image can be this large: qemu-img refuses after we created the file.
        let b = BackingSpec { path: master.to_str().unwrap(), format: "raw", virtual_size: u64::MAX };
        let err = create_file_overlay(&ov, &b, OverlayOptions::detect()).unwrap_err();
        assert!(matches!(err, OverlayError::QemuImg { .. }), "{err}");
        assert!(!ov.exists(), "the half-made overlay must be removed");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 1, "only the master is left: {left:?}");
    }

    #[test]
    fn overlays_are_not_made_in_directories_others_can_write() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let master = dir.path().join("m.raw");
        std::fs::write(&master, vec![0u8; 4096]).unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let b = BackingSpec { path: master.to_str().unwrap(), format: "raw", virtual_size: 4096 };
        let err = create_file_overlay(&open.join("o.qcow2"), &b, OverlayOptions::preferred()).unwrap_err();
        assert!(matches!(err, OverlayError::UnsafeDir(_)), "{err}");
        assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0, "nothing made there");
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn overlays_are_made_in_sticky_directories_like_tmp() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let master = dir.path().join("m.raw");
        std::fs::write(&master, vec![0u8; 4096]).unwrap();
        let sticky = dir.path().join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        // Sticky, like /tmp: nobody can swap our files there.
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let b = BackingSpec { path: master.to_str().unwrap(), format: "raw", virtual_size: 4096 };
        create_file_overlay(&sticky.join("o.qcow2"), &b, OverlayOptions::preferred()).unwrap();
        assert!(sticky.join("o.qcow2").is_file());
    }

    #[test]
    fn a_special_file_is_not_a_master() {
        // A Unix socket stands in for a FIFO or a device (made without an external program):
        // qemu-img would block on a FIFO, so it is never run on anything but a regular file.
        let dir = tempfile::tempdir().unwrap();
        let special = dir.path().join("s");
        let _listener = std::os::unix::net::UnixListener::bind(&special).unwrap();
        let b = BackingSpec { path: special.to_str().unwrap(), format: "raw", virtual_size: 4096 };
        let err = create_file_overlay(&dir.path().join("o.qcow2"), &b, OverlayOptions::preferred()).unwrap_err();
        assert!(matches!(err, OverlayError::NotRegular(_)), "{err}");
        assert!(matches!(image_info(special.to_str().unwrap(), "raw").unwrap_err(), OverlayError::NotRegular(_)));
        assert!(!dir.path().join("o.qcow2").exists());
    }
}
