//! Printing results (stdout) and errors (stderr).

use std::io::Write;

use virt_clone_cow::cmd::clone::CloneReport;

/// A closed pipe (`| head`) is not an error.
pub fn print<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) -> Result<(), super::Failure> {
    let mut out = std::io::stdout().lock();
    let body = if json {
        let mut s = serde_json::to_string_pretty(value)?;
        s.push('\n');
        s
    } else {
        text()
    };
    match out.write_all(body.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

pub fn render_clone_report(r: &CloneReport) -> String {
    let mut s = String::new();
    let reflinked = r.clones.iter().flat_map(|c| &c.disks).any(|d| d.reflinked);
    if r.dry_run {
        s.push_str(&format!(
            "Dry run: would make {} {} clone(s) of '{}' (nothing changed):\n",
            r.clones.len(),
            if reflinked { "reflinked" } else { "linked" },
            r.original
        ));
    } else if reflinked {
        s.push_str(&format!(
            "Made {} reflinked clone(s) of '{}' in {:.0} ms (full copies sharing extents; '{}' stays an ordinary domain).\n",
            r.clones.len(),
            r.original,
            r.elapsed_ms,
            r.original
        ));
    } else {
        s.push_str(&format!(
            "Made {} linked clone(s) of '{}' in {:.0} ms; '{}' is now a template (masters read-only).\n",
            r.clones.len(),
            r.original,
            r.elapsed_ms,
            r.original
        ));
    }
    if let Some(layout) = &r.overlay_layout {
        s.push_str(&format!("  overlay layout: {layout} (docs/overlay-layout.md)\n"));
    }
    for c in &r.clones {
        let state = if c.started { "  started" } else { "" };
        s.push_str(&format!(
            "  {}{}{}\n",
            c.name,
            c.uuid.as_ref().map(|u| format!("  uuid {u}")).unwrap_or_default(),
            state
        ));
        for d in &c.disks {
            if d.reflinked {
                s.push_str(&format!(
                    "    {}  {}  reflinked copy of {} ({})\n",
                    d.target, d.overlay, d.backing, d.format
                ));
            } else {
                s.push_str(&format!("    {}  {}  -> {} ({})\n", d.target, d.overlay, d.backing, d.backing_format));
            }
        }
        if !c.macs.is_empty() {
            s.push_str(&format!("    mac  {}\n", c.macs.join(", ")));
        }
        if let Some(nv) = &c.nvram {
            s.push_str(&format!("    uefi vars  {nv}\n"));
        }
        if let Some(sp) = &c.sysprep {
            s.push_str(&format!(
                "    sysprep  hostname {}, machine-id {} ({:.1} s)\n",
                sp.hostname,
                sp.machine_id,
                sp.ms / 1e3
            ));
        }
    }
    s
}
