//! Keeping a master while anything depends on it, and letting it go once nothing does.
//!
//! Local connections only (the files are on this host): a master gets the immutable attribute
//! when virt-clone-cow makes a clone of it ([`hold_master`]), and loses it when nothing depends
//! on it any more ([`release_if_unneeded`], which `gc --yes` and flatten call). Only masters that
//! carry our mark are ever released, so a flag an administrator set stays, and images other
//! tools stack overlays on (Terraform, vagrant-libvirt) are never made immutable behind their back.
//!
//! QEMU opens a backing file read-only, which an immutable file allows. libvirt's DAC driver
//! chowns backing files to QEMU's user at start and tolerates a refusal (EPERM); so that QEMU can
//! still read a master only root could (mode 0600 root), [`hold_master`] first gives it to the
//! user libvirt would (the `dac` base label of the host's capabilities), as libvirt's first start
//! of a clone does anyway (it never gives a backing file back).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vcc_core::protect::{self, Held, Protection};
use vcc_libvirt::Libvirt;

use crate::holds::Holds;

/// What happened to a master's protection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Immutable now (`newly`: by this call).
    Held { newly: bool },
    /// The filesystem has no immutable attribute: only the write bits are cleared.
    ReadOnlyOnly,
    /// Not protected: the connection is remote, or it failed (said in the warning).
    Unprotected(String),
}

/// `uid:gid` of the `dac` base label (`+64055:+64055`) of a capabilities XML.
pub fn dac_label(caps: &str) -> Option<(u32, u32)> {
    let dac = caps.split("<secmodel>").find(|s| s.contains("<model>dac</model>"))?;
    let label = dac.split("<baselabel").nth(1)?.split_once('>')?.1.split_once('<')?.0;
    let (u, g) = label.split_once(':')?;
    Some((u.trim_start_matches('+').parse().ok()?, g.trim_start_matches('+').parse().ok()?))
}

/// Protects a master that is getting (or has) a dependant. Never fails the caller: what could
/// not be done is logged and returned.
pub fn hold_master(lv: &Libvirt, path: &str) -> Outcome {
    if !lv.is_local() {
        return Outcome::Unprotected("the connection is not local".into());
    }
    let p = Path::new(path);
    if protect::is_immutable(p).ok().flatten() != Some(true) {
        give_to_qemu_if_unreadable(lv, p);
    }
    match protect::hold(p) {
        Ok(Held { protection: Protection::Immutable, newly }) => Outcome::Held { newly },
        Ok(_) => {
            tracing::warn!(
                "master {path} is on a filesystem without the immutable attribute: it is only read-only \
                 (chmod a-w), and root or libvirt can still delete it"
            );
            Outcome::ReadOnlyOnly
        }
        Err(e) => {
            let why = vcc_core::error::one_line(&e);
            tracing::warn!("master {path} is only read-only, not immutable: {why}");
            Outcome::Unprotected(why)
        }
    }
}

/// A master only its owner may read (mode without group/other read) goes to QEMU's user and
/// group, as libvirt's DAC driver would give it at the first start of a clone.
fn give_to_qemu_if_unreadable(lv: &Libvirt, p: &Path) {
    let Ok(meta) = std::fs::metadata(p) else { return };
    if meta.mode() & 0o004 != 0 {
        return;
    }
    let Some((uid, gid)) = lv.capabilities().ok().as_deref().and_then(dac_label) else { return };
    if (meta.uid(), meta.gid()) == (uid, gid) || (uid == 0 && gid == 0) {
        return;
    }
    if meta.mode() & 0o440 == 0 {
        return;
    }
    match std::os::unix::fs::chown(p, Some(uid), Some(gid)) {
        Ok(()) => tracing::info!("gave master {} to {uid}:{gid} (QEMU's user) before making it immutable", p.display()),
        Err(e) => tracing::warn!("could not give master {} to QEMU's user {uid}:{gid}: {e}", p.display()),
    }
}

/// Releases each of `paths` that nothing depends on any more (see [`Holds::dependants`]) and we
/// hold; makes one immutable again if something does and it carries our mark. The host's holds
/// are scanned once for all of them. Returns the paths whose flag was cleared. For flatten: call
/// it after the clone's disks no longer have these masters as backing files.
pub fn release_if_unneeded<'a>(
    lv: &Libvirt,
    paths: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, vcc_libvirt::LibvirtError> {
    let volumes = lv.list_volumes()?;
    let holds = crate::holds::scan(lv, &volumes)?;
    let mut released: Vec<String> = Vec::new();
    for path in paths {
        if !released.iter().any(|r| r == path) && sync_one(lv, &holds, path) == Sync::Released {
            released.push(path.to_string());
        }
    }
    Ok(released)
}

/// What [`sync_one`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    Held,
    Released,
    Unchanged,
}

/// Makes a master ours match its dependants: held while it has any, released when not. Ours:
/// it carries our mark, or a clone's metadata names it (a master fetched by pool-helper for
/// clones defined over `--host`, which no local clone run marked).
pub fn sync_one(lv: &Libvirt, holds: &Holds, path: &str) -> Sync {
    let recorded = holds.of(path).iter().any(|h| matches!(h, crate::holds::Holder::Recorded { .. }));
    if !lv.is_local() || (protect::mark(Path::new(path)).is_none() && !recorded) {
        return Sync::Unchanged;
    }
    if holds.dependants(path).is_empty() {
        match protect::release(Path::new(path)) {
            Ok(true) => Sync::Released,
            Ok(false) => Sync::Unchanged,
            Err(e) => {
                tracing::warn!("could not release master {path}: {}", vcc_core::error::one_line(&e));
                Sync::Unchanged
            }
        }
    } else {
        match hold_master(lv, path) {
            Outcome::Held { newly: true } => Sync::Held,
            _ => Sync::Unchanged,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dac_label_is_read_from_the_capabilities() {
        let caps = "<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel>\
            <secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+64055:+994</baselabel>\
            <baselabel type='qemu'>+64055:+994</baselabel></secmodel></host></capabilities>";
        assert_eq!(dac_label(caps), Some((64055, 994)));
        assert_eq!(dac_label("<capabilities/>"), None);
        assert_eq!(dac_label("<secmodel><model>dac</model><baselabel type='kvm'>x:y</baselabel>"), None);
    }
}
