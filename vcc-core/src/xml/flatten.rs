//! The XML side of flattening a clone: its disks' `<backingStore>` says the chain ends at the
//! overlay (`<backingStore/>`), every other byte of the domain XML kept as it was.

use super::disks::{walk_disks, Child};
use super::{attr, XmlError};

/// One `<disk>` as found by the scan: byte ranges in the original text.
#[derive(Debug, Default)]
struct DiskSpan {
    target: Option<String>,
    /// The disk's first `<backingStore>` child (start and end offsets).
    backing: Option<(usize, usize)>,
    /// Where that `<backingStore>` starts, until its end tag is met.
    backing_start: Option<usize>,
    /// Where its `<source>` element ends.
    source_end: Option<usize>,
    /// The whitespace before `<source>`, to indent an inserted element the same way.
    source_indent: String,
}

/// Domain XML in which each disk whose target is in `targets` has `<backingStore/>` (no backing
/// image) in place of its `<backingStore>` (or, having none, right after its `<source>`).
/// Returns the XML and the targets found; every byte outside those elements is unchanged.
pub fn drop_backing_stores(xml: &str, targets: &[&str]) -> Result<(String, Vec<String>), XmlError> {
    let spans = walk_disks(xml, |d: &mut DiskSpan, c| {
        match c {
            Child::Open { name: "target", tag, .. } => d.target = attr(tag, "dev")?,
            Child::Open { name: "source", end, empty, indent, .. } => {
                d.source_indent = indent;
                if empty {
                    d.source_end = Some(end);
                }
            }
            Child::Open { name: "backingStore", start, end, empty, .. } if d.backing.is_none() => {
                if empty {
                    d.backing = Some((start, end));
                } else {
                    d.backing_start = Some(start);
                }
            }
            Child::Close { name: "source", end } => d.source_end = Some(end),
            Child::Close { name: "backingStore", end } => {
                if let Some(start) = d.backing_start.take() {
                    d.backing = Some((start, end));
                }
            }
            _ => {}
        }
        Ok(())
    })?;

    // Splice from the end so earlier offsets stay valid.
    let mut out = xml.to_string();
    let mut found = Vec::new();
    for d in spans.iter().rev() {
        let Some(t) = d.target.as_deref().filter(|t| targets.contains(t)) else { continue };
        match (d.backing, d.source_end) {
            (Some((s, e)), _) => out.replace_range(s..e, "<backingStore/>"),
            (None, Some(e)) => out.insert_str(e, &format!("{}<backingStore/>", d.source_indent)),
            (None, None) => continue,
        }
        found.push(t.to_string());
    }
    found.reverse();
    Ok((out, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'>\n  <name>c</name>\n  <devices>\n    \
        <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
        <source file='/p/c-vda.qcow2'/>\n      <backingStore type='file'><format type='qcow2'/>\
        <source file='/p/base.qcow2'/><backingStore/></backingStore>\n      \
        <target dev='vda' bus='virtio'/>\n    </disk>\n    \
        <disk type=\"volume\" device=\"disk\">\n      <driver name=\"qemu\" type=\"qcow2\"/>\n      \
        <source pool=\"p\" volume=\"c-vdb.qcow2\"></source>\n      <target dev=\"vdb\" bus=\"virtio\"/>\n    </disk>\n    \
        <disk type='file' device='cdrom'><source file='/p/x.iso'/><target dev='sda'/><readonly/></disk>\n  \
        </devices>\n</domain>\n";

    #[test]
    fn the_named_disks_lose_their_backing_store_and_nothing_else_changes() {
        let (out, found) = drop_backing_stores(XML, &["vda", "vdb"]).unwrap();
        assert_eq!(found, ["vda", "vdb"]);
        let want = XML
            .replace(
                "<backingStore type='file'><format type='qcow2'/><source file='/p/base.qcow2'/><backingStore/></backingStore>",
                "<backingStore/>",
            )
            .replace("volume=\"c-vdb.qcow2\"></source>", "volume=\"c-vdb.qcow2\"></source>\n      <backingStore/>");
        assert_eq!(out, want);
        let facts = crate::xml::DomainFacts::parse(&out).unwrap();
        assert!(facts.disks[..2].iter().all(|d| d.backing == crate::xml::BackingDecl::None));
    }

    #[test]
    fn other_disks_are_left_alone_and_the_edit_is_idempotent() {
        let (out, found) = drop_backing_stores(XML, &["vdb"]).unwrap();
        assert_eq!(found, ["vdb"]);
        assert!(out.contains("<source file='/p/base.qcow2'/>"), "vda keeps its master");
        let (again, _) = drop_backing_stores(&out, &["vdb"]).unwrap();
        assert_eq!(again, out);
        let (none, found) = drop_backing_stores(XML, &["vdz"]).unwrap();
        assert_eq!((none.as_str(), found.len()), (XML, 0));
        // Cut anywhere, the XML gives an answer or an error, never a panic.
        for k in 0..XML.len() {
            let _ = drop_backing_stores(&XML[..k], &["vda", "vdb"]);
        }
    }
}
