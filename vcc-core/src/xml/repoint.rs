//! The XML side of giving a template a new master: the `<source>` of the named disks names
//! another image (its `file`, or its `volume` in the same pool) and their `<driver>` states its
//! format; every other byte of the domain XML is kept as it was.

use quick_xml::events::{BytesStart, Event};

use super::disks::{walk_disks, Child};
use super::{attr, XmlError};

/// What one disk's master becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repoint {
    /// The disk's `<target dev=...>`.
    pub target: String,
    /// The new image's path (file disks).
    pub file: String,
    /// The new image's volume name (volume disks, same pool).
    pub volume: String,
    /// The new image's format (`<driver type=...>`).
    pub format: String,
}

#[derive(Debug, Default)]
struct DiskSpan {
    target: Option<String>,
    /// `<source>` start tag: range, the tag itself, whether empty.
    source: Option<(usize, usize, BytesStart<'static>, bool)>,
    driver: Option<(usize, usize, BytesStart<'static>, bool)>,
}

/// Domain XML in which each disk named by a [`Repoint`] reads its new image. Returns the XML
/// and the targets changed; a disk with no `<source>` or no `<driver>` is left out (and so
/// missing from the list, which the caller checks).
pub fn repoint_disks(xml: &str, edits: &[Repoint]) -> Result<(String, Vec<String>), XmlError> {
    let spans = walk_disks(xml, |d: &mut DiskSpan, c| {
        if let Child::Open { name, tag, start, end, empty, .. } = c {
            let span = Some((start, end, tag.clone().into_owned(), empty));
            match name {
                "target" => d.target = attr(tag, "dev")?,
                "source" if d.source.is_none() => d.source = span,
                "driver" if d.driver.is_none() => d.driver = span,
                _ => {}
            }
        }
        Ok(())
    })?;

    // Splice from the end so earlier offsets stay valid.
    let mut out = xml.to_string();
    let mut found = Vec::new();
    for d in spans.iter().rev() {
        let Some(edit) = edits.iter().find(|e| d.target.as_deref() == Some(e.target.as_str())) else { continue };
        let (Some(src), Some(drv)) = (&d.source, &d.driver) else { continue };
        let key = if attr(&src.2, "file")?.is_some() {
            "file"
        } else if attr(&src.2, "volume")?.is_some() {
            "volume"
        } else {
            continue;
        };
        let value = if key == "file" { edit.file.as_str() } else { edit.volume.as_str() };
        let mut tags = [(src, key, value), (drv, "type", edit.format.as_str())];
        tags.sort_by_key(|((s, ..), ..)| std::cmp::Reverse(*s));
        for ((s, e, tag, empty), key, value) in tags {
            out.replace_range(*s..*e, &with_attr(tag, key, value, *empty)?);
        }
        found.push(edit.target.clone());
    }
    found.reverse();
    Ok((out, found))
}

/// The start tag with attribute `key` set to `value` (replaced in place, or added at the end).
fn with_attr(tag: &BytesStart<'_>, key: &str, value: &str, empty: bool) -> Result<String, XmlError> {
    let name = super::elem_name(tag);
    let mut new = BytesStart::new(name.clone());
    let mut seen = false;
    for a in tag.attributes() {
        let a = a.map_err(|source| XmlError::Attribute { element: name.clone(), source })?;
        if a.key.as_ref() == key.as_bytes() {
            new.push_attribute((key, value));
            seen = true;
        } else {
            new.push_attribute(a);
        }
    }
    if !seen {
        new.push_attribute((key, value));
    }
    let mut w = quick_xml::Writer::new(Vec::new());
    let ev = if empty { Event::Empty(new) } else { Event::Start(new) };
    w.write_event(ev).map_err(|e| XmlError::Syntax { position: 0, source: e.into() })?;
    Ok(String::from_utf8_lossy(&w.into_inner()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'>\n  <name>t</name>\n  <devices>\n    \
        <disk type='file' device='disk'>\n      <driver name='qemu' type='raw' cache='none'/>\n      \
        <source file='/p/base.raw' index='1'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n    \
        <disk type='volume' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
        <source pool='p' volume='data.qcow2'>\n        <seclabel relabel='no'/>\n      </source>\n      \
        <target dev='vdb' bus='virtio'/>\n    </disk>\n    \
        <disk type='file' device='cdrom'>\n      <driver name='qemu' type='raw'/>\n      \
        <source file='/p/x.iso'/>\n      <target dev='sda' bus='sata'/>\n      <readonly/>\n    </disk>\n  \
        </devices>\n</domain>\n";

    fn edit(t: &str, file: &str, volume: &str) -> Repoint {
        Repoint { target: t.into(), file: file.into(), volume: volume.into(), format: "qcow2".into() }
    }

    #[test]
    fn the_named_disks_read_the_new_image_and_every_other_byte_stays() {
        let edits = [edit("vda", "/p/base.zst.qcow2", "base.zst.qcow2"), edit("vdb", "/p/d.zst.qcow2", "d.zst.qcow2")];
        let (out, found) = repoint_disks(XML, &edits).unwrap();
        assert_eq!(found, ["vda", "vdb"]);
        let want = XML
            .replace(
                "<driver name='qemu' type='raw' cache='none'/>",
                "<driver name=\"qemu\" type=\"qcow2\" cache=\"none\"/>",
            )
            .replace("<driver name='qemu' type='qcow2'/>", "<driver name=\"qemu\" type=\"qcow2\"/>")
            .replace("<source file='/p/base.raw' index='1'/>", "<source file=\"/p/base.zst.qcow2\" index=\"1\"/>")
            .replace("<source pool='p' volume='data.qcow2'>", "<source pool=\"p\" volume=\"d.zst.qcow2\">");
        assert_eq!(out, want);
        let facts = crate::xml::DomainFacts::parse(&out).unwrap();
        assert_eq!(facts.disks[0].source, crate::xml::DiskSource::File("/p/base.zst.qcow2".into()));
        assert_eq!(facts.disks[0].format.as_deref(), Some("qcow2"));
        assert_eq!(
            facts.disks[1].source,
            crate::xml::DiskSource::Volume { pool: "p".into(), volume: "d.zst.qcow2".into() }
        );
        assert_eq!(facts.disks[2].source, crate::xml::DiskSource::File("/p/x.iso".into()), "the cdrom is kept");
    }

    #[test]
    fn a_target_not_in_the_domain_is_not_reported_and_names_are_escaped() {
        let (out, found) = repoint_disks(XML, &[edit("vdz", "/p/z", "z")]).unwrap();
        assert!(found.is_empty());
        assert_eq!(out, XML);
        let (out, _) = repoint_disks(XML, &[edit("vda", "/p/a&b'.qcow2", "")]).unwrap();
        let facts = crate::xml::DomainFacts::parse(&out).unwrap();
        assert_eq!(facts.disks[0].source, crate::xml::DiskSource::File("/p/a&b'.qcow2".into()));
    }
}
