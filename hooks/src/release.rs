//! `release end` for disposable clones: the overlay goes, so the next start is fresh. This step
//! can abort nothing and may repeat, so it never fails; it only deletes a file that is a qcow2
//! overlay over the recorded master and that no QEMU holds open (qemu-img's image lock), so a
//! guest migrated away on shared storage keeps its disk.

use std::io::Write;

use virt_clone_cow::metadata::CowMetadata;
use virt_clone_cow::process::run;
use virt_clone_cow::xml::DomainFacts;

pub fn discard_disposable(facts: &DomainFacts, log: &mut dyn Write) {
    let Some(md) = facts.vcc_metadata.as_deref().and_then(|x| CowMetadata::parse(x).ok()) else { return };
    let Some(clone) = md.clone.filter(|c| c.disposable) else { return };
    for d in &clone.disks {
        if std::fs::symlink_metadata(&d.overlay).map(|m| !m.is_file()).unwrap_or(true) {
            continue;
        }
        // Without --force-share: fails if a QEMU still has the image open for writing.
        let info = run("qemu-img", &["info", "-f", "qcow2", "--output=json", &d.overlay]);
        let backing = info.ok().and_then(|o| {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            v["full-backing-filename"].as_str().or(v["backing-filename"].as_str()).map(String::from)
        });
        if backing.as_deref() != Some(d.master.path.as_str()) {
            let _ = writeln!(log, "virt-clone-cow-hook: {}: keeping {} (in use, or not an overlay of {})", facts.name, d.overlay, d.master.path);
            continue;
        }
        match std::fs::remove_file(&d.overlay) {
            Ok(()) => {
                let _ = writeln!(log, "virt-clone-cow-hook: {}: discarded disposable overlay {}", facts.name, d.overlay);
            }
            Err(e) => {
                let _ = writeln!(log, "virt-clone-cow-hook: {}: cannot remove {}: {e}", facts.name, d.overlay);
            }
        }
    }
}
