//! Disposable clones (`virt-clone-cow --disposable`): every start is fresh.
//!
//! The overlay is discarded at `prepare begin`, so a start after a host crash (when libvirt never
//! ran `release`) is fresh too, except when the start resumes saved state:
//!
//! * a managed-save image exists (`virsh managedsave`, then `virsh start` restores it), or
//! * `restore begin` or `migrate begin` ran just before (`virsh restore`, an incoming migration):
//!   they leave a note in the state directory that the following `prepare` takes.
//!
//! `release end` also discards, to free the space early, but only when libvirt (10.5 and later)
//! says the guest was shut down, destroyed or crashed; libvirt 9 passes `-`, which could be a
//! save or a migration, so nothing is discarded then.
//!
//! A file is only deleted when it is the disk's current source and the overlay our metadata
//! records, a regular file (not a symlink), a qcow2 image whose backing file is the recorded
//! master, without internal snapshots, and not held open by any QEMU (qemu-img info without
//! `--force-share` fails on an image a QEMU has open for writing, also on another host sharing
//! the storage).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vcc_core::managed::{LinkedDisks, ManagedDisk};
use vcc_core::xml::DomainFacts;

use crate::config::Config;
use crate::places::{PlaceError, Places};
use crate::prepare::qemu_img;
use vcc_core::qemu_img::QemuImgError;

/// How long a note from `migrate`/`restore begin` counts for the `prepare` that follows it.
pub const INCOMING_NOTE_VALID: Duration = Duration::from_secs(300);

/// Shut-off reasons (the 4th argument of `release end` since libvirt 10.5) after which the
/// guest's disk state is not needed again.
pub fn release_may_discard(reason: &str) -> bool {
    matches!(reason, "shutdown" | "destroyed" | "crashed")
}

/// Whether libvirt keeps a managed-save image for `name`: then the next start resumes it, onto
/// this overlay. A name that cannot be a file name counts as having one (keep, to be safe).
pub fn has_managed_save(cfg: &Config, name: &str) -> bool {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return true;
    }
    cfg.managed_save_dir.join(format!("{name}.save")).symlink_metadata().is_ok()
}

/// The note's file: by UUID (the name can change on migration), else by the hex of the name.
fn note_path(cfg: &Config, facts: &DomainFacts) -> PathBuf {
    let key = match &facts.uuid {
        Some(u) if !u.is_empty() && u.len() <= 64 && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-') => {
            u.to_ascii_lowercase()
        }
        _ => format!("name-{}", facts.name.bytes().map(|b| format!("{b:02x}")).collect::<String>()),
    };
    cfg.state_dir.join(format!("incoming-{key}"))
}

/// `migrate begin` / `restore begin`: tells the `prepare begin` that follows that this start
/// resumes a guest whose overlay must be kept.
pub fn note_incoming(cfg: &Config, facts: &DomainFacts) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&cfg.state_dir)?;
    let p = note_path(cfg, facts);
    let _ = std::fs::remove_file(&p);
    std::fs::OpenOptions::new().write(true).create_new(true).open(&p).map(drop)
}

/// Takes the note, if any: whether it was left within [`INCOMING_NOTE_VALID`].
fn take_incoming(cfg: &Config, facts: &DomainFacts) -> bool {
    let p = note_path(cfg, facts);
    let Ok(m) = p.symlink_metadata() else { return false };
    let fresh =
        m.is_file() && m.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age < INCOMING_NOTE_VALID);
    let _ = std::fs::remove_file(&p);
    fresh
}

/// `prepare begin`: discards the recorded overlays of a disposable clone unless the start
/// resumes saved state. Never fails: a file that cannot be proven to be a discardable overlay is
/// kept, with a line saying why.
pub fn fresh_start(facts: &DomainFacts, plan: &LinkedDisks, cfg: &Config, log: &mut dyn Write) {
    if !plan.disposable {
        return;
    }
    let name = &facts.name;
    if is_xen(facts) {
        let _ = writeln!(log, "virt-clone-cow-hook: {name}: keeping the disposable overlays: a Xen (libxl) domain, whose restores run `prepare` with no `restore` hook before it, so a fresh start cannot be told from a restored guest");
        return;
    }
    // Always used up here, whatever else decides (libvirt also runs `restore begin` when a start
    // resumes a managed save): a note left behind would keep the next plain start from being fresh.
    let incoming = take_incoming(cfg, facts);
    if has_managed_save(cfg, name) {
        let _ = writeln!(log, "virt-clone-cow-hook: {name}: keeping the disposable overlays: a managed-save image exists, and this start resumes it");
        return;
    }
    if incoming {
        let _ = writeln!(log, "virt-clone-cow-hook: {name}: keeping the disposable overlays: this start resumes a restored or migrated guest");
        return;
    }
    discard_all(name, plan, cfg, log);
}

/// A domain of libvirt's libxl driver (`<domain type='xen'>`): its hooks have no `restore` step,
/// so disposable overlays are never discarded there (virt-clone-cow makes no disposable Xen
/// clones; one marked by hand is kept).
pub fn is_xen(facts: &DomainFacts) -> bool {
    facts.domain_type == "xen"
}

/// `release end` with libvirt's shut-off `reason` (`-` before libvirt 10.5).
pub fn release(facts: &DomainFacts, plan: &LinkedDisks, reason: &str, cfg: &Config, log: &mut dyn Write) {
    if !plan.disposable || is_xen(facts) || !release_may_discard(reason) || has_managed_save(cfg, &facts.name) {
        return;
    }
    discard_all(&facts.name, plan, cfg, log);
}

fn discard_all(name: &str, plan: &LinkedDisks, cfg: &Config, log: &mut dyn Write) {
    let places = Places::load(cfg);
    for d in &plan.disks {
        match discard(d, &places) {
            Ok(true) => {
                let _ =
                    writeln!(log, "virt-clone-cow-hook: {name}: discarded disposable overlay {}", d.overlay.display());
            }
            Ok(false) => {}
            Err(why) => {
                let why = vcc_core::error::one_line(&why);
                let _ = writeln!(log, "virt-clone-cow-hook: {name}: keeping {}: {why}", d.overlay.display());
            }
        }
    }
}

/// Why a disposable overlay is kept rather than discarded.
#[derive(Debug, thiserror::Error)]
pub enum KeepReason {
    #[error("it is not the overlay over the master our metadata records for this disk")]
    NotRecorded,
    #[error("it is outside the directories the hook may write in")]
    Outside(#[source] PlaceError),
    #[error("the path is not UTF-8")]
    NotUtf8,
    #[error("cannot look at it")]
    Stat(#[source] std::io::Error),
    #[error("not a regular file")]
    NotRegular,
    #[error("a QEMU has it open, or it is not a qcow2 image")]
    NotReadable(#[source] QemuImgError),
    #[error("its backing file is {found}, not the recorded master {master}")]
    OtherBacking { found: String, master: String },
    #[error("it holds {0} internal snapshot(s)")]
    Snapshots(usize),
    #[error("it changed while being checked")]
    Changed,
    #[error("cannot remove it")]
    Remove(#[source] std::io::Error),
}

/// Deletes the disk's overlay if it is provably a disposable overlay nobody uses. `Ok(false)`:
/// there was nothing to delete; `Err`: kept, and why.
/// Only inside the allowed `places` (its directory resolved, which is the path used).
pub fn discard(d: &ManagedDisk, places: &Places) -> Result<bool, KeepReason> {
    use std::os::unix::fs::MetadataExt;
    if !d.recorded {
        return Err(KeepReason::NotRecorded);
    }
    let _ = d.overlay.to_str().ok_or(KeepReason::NotUtf8)?;
    let resolved = match places.overlay(&d.overlay) {
        Ok(p) => p,
        Err(PlaceError::Resolve { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(KeepReason::Outside(e)),
    };
    let path = resolved.to_str().ok_or(KeepReason::NotUtf8)?;
    let before = match Path::new(path).symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(KeepReason::Stat(e)),
    };
    if !before.file_type().is_file() {
        return Err(KeepReason::NotRegular);
    }
    let info = qemu_img().info(Path::new(path), "qcow2").map_err(KeepReason::NotReadable)?;
    if info.backing.as_deref() != Some(d.master.path.as_str()) {
        return Err(KeepReason::OtherBacking {
            found: info.backing.unwrap_or_else(|| "(none)".into()),
            master: d.master.path.clone(),
        });
    }
    if info.snapshots > 0 {
        return Err(KeepReason::Snapshots(info.snapshots));
    }
    // The file we looked at, still (not replaced while qemu-img ran).
    match Path::new(path).symlink_metadata() {
        Ok(now) if now.file_type().is_file() && now.dev() == before.dev() && now.ino() == before.ino() => {}
        _ => return Err(KeepReason::Changed),
    }
    std::fs::remove_file(path).map(|()| true).map_err(KeepReason::Remove)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcc_core::metadata::MasterRef;
    use vcc_core::qemu_img::{BackingSpec, QemuImg};

    struct Fixture {
        dir: tempfile::TempDir,
        master: String,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let master = dir.path().join("m.raw").to_string_lossy().into_owned();
            std::fs::write(&master, vec![0u8; 1 << 20]).unwrap();
            Fixture { dir, master }
        }

        fn overlay(&self, name: &str, backing: &str) -> String {
            let p = self.dir.path().join(name).to_string_lossy().into_owned();
            let virtual_size = std::fs::metadata(backing).unwrap().len();
            let b = BackingSpec { path: backing, format: "raw", virtual_size };
            QemuImg::new().create_overlay(Path::new(&p), &b, vcc_core::layout::OverlayLayout::QEMU_DEFAULT).unwrap();
            p
        }

        fn disk(&self, overlay: &str, recorded: bool) -> ManagedDisk {
            ManagedDisk {
                target: "vda".into(),
                overlay: PathBuf::from(overlay),
                master: MasterRef { path: self.master.clone(), format: "raw".into(), ..Default::default() },
                recorded,
                master_in_xml: true,
            }
        }

        fn cfg(&self) -> Config {
            Config {
                managed_save_dir: self.dir.path().join("save"),
                state_dir: self.dir.path().join("state"),
                allowed_dirs: vec![self.dir.path().to_path_buf()],
                ..Config::default()
            }
        }

        fn places(&self) -> Places {
            Places::load(&self.cfg())
        }
    }

    fn facts(name: &str, uuid: Option<&str>) -> DomainFacts {
        DomainFacts { name: name.into(), uuid: uuid.map(String::from), ..Default::default() }
    }

    #[test]
    fn an_overlay_outside_the_allowed_directories_is_never_deleted() {
        let f = Fixture::new();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("data.qcow2");
        std::fs::write(&victim, b"someone's disk").unwrap();
        // Directly, and through a directory symlink inside the allowed directory.
        let door = f.dir.path().join("door");
        std::os::unix::fs::symlink(outside.path(), &door).unwrap();
        for path in [victim.clone(), door.join("data.qcow2")] {
            let e = discard(&f.disk(path.to_str().unwrap(), true), &f.places()).unwrap_err();
            let msg = vcc_core::error::one_line(&e);
            assert!(matches!(e, KeepReason::Outside(_)), "{msg}");
            assert!(msg.contains("to `allowed_dirs` in "), "{msg}");
        }
        let mut log = Vec::new();
        let plan =
            LinkedDisks { disposable: true, disks: vec![f.disk(victim.to_str().unwrap(), true)], ..Default::default() };
        fresh_start(&facts("vm", None), &plan, &f.cfg(), &mut log);
        assert!(victim.exists());
        let log = String::from_utf8(log).unwrap();
        assert!(log.contains("keeping") && log.contains("outside the directories the hook may write in"), "{log}");
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn an_overlay_of_the_recorded_master_is_discarded() {
        let f = Fixture::new();
        let o = f.overlay("o.qcow2", &f.master);
        assert!(discard(&f.disk(&o, true), &f.places()).unwrap());
        assert!(!Path::new(&o).exists());
        assert!(!discard(&f.disk(&o, true), &f.places()).unwrap(), "nothing left to discard");
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn anything_that_is_not_provably_our_overlay_is_kept() {
        let f = Fixture::new();
        let o = f.overlay("o.qcow2", &f.master);
        // Not the recorded overlay of this disk (N1).
        assert!(discard(&f.disk(&o, false), &f.places()).unwrap_err().to_string().contains("not the overlay"));
        // A symlink to it.
        let link = f.dir.path().join("link.qcow2").to_string_lossy().into_owned();
        std::os::unix::fs::symlink(&o, &link).unwrap();
        assert!(discard(&f.disk(&link, true), &f.places()).unwrap_err().to_string().contains("not a regular file"));
        // Another backing file.
        let other = f.dir.path().join("other.raw").to_string_lossy().into_owned();
        std::fs::write(&other, vec![0u8; 4096]).unwrap();
        let o2 = f.overlay("o2.qcow2", &other);
        assert!(discard(&f.disk(&o2, true), &f.places()).unwrap_err().to_string().contains("not the recorded master"));
        // Not a qcow2 image at all.
        let raw = f.dir.path().join("data.img").to_string_lossy().into_owned();
        std::fs::write(&raw, b"user data").unwrap();
        assert!(discard(&f.disk(&raw, true), &f.places()).is_err());
        // Holding an internal snapshot.
        let o3 = f.overlay("o3.qcow2", &f.master);
        QemuImg::new().snapshot_create(Path::new(&o3), "s1").unwrap();
        assert!(discard(&f.disk(&o3, true), &f.places()).unwrap_err().to_string().contains("internal snapshot"));
        for p in [&o, &link, &o2, &raw, &o3] {
            assert!(Path::new(p).symlink_metadata().is_ok(), "{p} was deleted");
        }
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img and qemu-io")]
    fn an_overlay_a_qemu_holds_open_is_kept() {
        let f = Fixture::new();
        let o = f.overlay("o.qcow2", &f.master);
        // qemu-io holds the image open for writing until its stdin closes. Polling with qemu-img
        // info meanwhile would race with its open (and make it fail): ask qemu-io for a command's
        // answer instead, which it gives once the image is open.
        use std::io::{BufRead, Write as _};
        let mut holder = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", &o])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        holder.stdin.as_mut().unwrap().write_all(b"length\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("MiB") || line.contains("KiB"), "qemu-io: {line}");
        let r = discard(&f.disk(&o, true), &f.places());
        drop(holder.stdin.take());
        let _ = holder.wait();
        assert!(r.unwrap_err().to_string().contains("a QEMU has it open"));
        assert!(Path::new(&o).exists());
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn a_managed_save_image_or_a_note_from_restore_keeps_the_overlay_at_prepare() {
        let f = Fixture::new();
        let cfg = f.cfg();
        let plan = |o: &str| LinkedDisks { disposable: true, disks: vec![f.disk(o, true)], ..Default::default() };
        let vm = facts("vm", Some("0F0E0D0C-0b0a-0908-0706-050403020100"));

        // Managed save image: kept.
        let o = f.overlay("o.qcow2", &f.master);
        std::fs::create_dir_all(&cfg.managed_save_dir).unwrap();
        std::fs::write(cfg.managed_save_dir.join("vm.save"), b"x").unwrap();
        let mut log = Vec::new();
        fresh_start(&vm, &plan(&o), &cfg, &mut log);
        assert!(Path::new(&o).exists());
        assert!(String::from_utf8_lossy(&log).contains("managed-save image"));
        std::fs::remove_file(cfg.managed_save_dir.join("vm.save")).unwrap();

        // A managed save resumed after `restore begin` left a note: the note is used up too.
        std::fs::write(cfg.managed_save_dir.join("vm.save"), b"x").unwrap();
        note_incoming(&cfg, &vm).unwrap();
        fresh_start(&vm, &plan(&o), &cfg, &mut Vec::new());
        assert!(Path::new(&o).exists());
        std::fs::remove_file(cfg.managed_save_dir.join("vm.save")).unwrap();
        fresh_start(&vm, &plan(&o), &cfg, &mut Vec::new());
        assert!(
            !Path::new(&o).exists(),
            "a note left by a managed-save start kept the next plain start from being fresh"
        );
        let o = f.overlay("o.qcow2", &f.master);

        // restore/migrate begin left a note: kept once, and the note is used up.
        note_incoming(&cfg, &vm).unwrap();
        fresh_start(&vm, &plan(&o), &cfg, &mut Vec::new());
        assert!(Path::new(&o).exists());
        // A plain start: fresh.
        fresh_start(&vm, &plan(&o), &cfg, &mut Vec::new());
        assert!(!Path::new(&o).exists());

        // A note for another domain does not count.
        let o = f.overlay("o.qcow2", &f.master);
        note_incoming(&cfg, &facts("other", None)).unwrap();
        fresh_start(&vm, &plan(&o), &cfg, &mut Vec::new());
        assert!(!Path::new(&o).exists());

        // Not disposable: never touched.
        let o = f.overlay("o.qcow2", &f.master);
        fresh_start(&vm, &LinkedDisks { disposable: false, ..plan(&o) }, &cfg, &mut Vec::new());
        assert!(Path::new(&o).exists());
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn release_discards_only_after_a_shutdown_destroy_or_crash() {
        let f = Fixture::new();
        let cfg = f.cfg();
        let vm = facts("vm", None);
        for reason in ["-", "saved", "migrated", "from-snapshot", "failed", "daemon", "unknown", ""] {
            let o = f.overlay("o.qcow2", &f.master);
            let plan = LinkedDisks { disposable: true, disks: vec![f.disk(&o, true)], ..Default::default() };
            release(&vm, &plan, reason, &cfg, &mut Vec::new());
            assert!(Path::new(&o).exists(), "discarded after reason {reason:?}");
            std::fs::remove_file(&o).unwrap();
        }
        for reason in ["shutdown", "destroyed", "crashed"] {
            let o = f.overlay("o.qcow2", &f.master);
            let plan = LinkedDisks { disposable: true, disks: vec![f.disk(&o, true)], ..Default::default() };
            release(&vm, &plan, reason, &cfg, &mut Vec::new());
            assert!(!Path::new(&o).exists(), "kept after reason {reason:?}");
        }
    }

    #[test]
    fn a_xen_domains_disposable_overlay_is_never_discarded() {
        let f = Fixture::new();
        let o = f.dir.path().join("o.qcow2").to_string_lossy().into_owned();
        std::fs::write(&o, b"a restored Xen guest's disk").unwrap();
        let plan = LinkedDisks { disposable: true, disks: vec![f.disk(&o, true)], ..Default::default() };
        let xen = DomainFacts { domain_type: "xen".into(), ..facts("xg", None) };
        let mut log = Vec::new();
        fresh_start(&xen, &plan, &f.cfg(), &mut log);
        release(&xen, &plan, "destroyed", &f.cfg(), &mut log);
        assert!(Path::new(&o).exists());
        let log = String::from_utf8(log).unwrap();
        assert!(log.contains("keeping the disposable overlays: a Xen (libxl) domain"), "{log}");
    }

    #[test]
    fn a_name_that_cannot_be_a_file_counts_as_saved() {
        let cfg = Fixture::new().cfg();
        assert!(has_managed_save(&cfg, "a/b"));
        assert!(has_managed_save(&cfg, ".."));
        assert!(!has_managed_save(&cfg, "vm"));
    }
}
