//! The XML side of flattening a clone: its disks' `<backingStore>` says the chain ends at the
//! overlay (`<backingStore/>`), every other byte of the domain XML kept as it was.

use quick_xml::events::Event;

use super::{at, attr, reader, syntax, XmlError};

/// One `<disk>` as found by the scan: byte ranges in the original text.
#[derive(Debug, Default)]
struct DiskSpan {
    target: Option<String>,
    /// The disk's first `<backingStore>` child (start and end offsets).
    backing: Option<(usize, usize)>,
    /// Where its `<source>` element ends.
    source_end: Option<usize>,
    /// The whitespace before `<source>`, to indent an inserted element the same way.
    source_indent: String,
}

/// Domain XML in which each disk whose target is in `targets` has `<backingStore/>` (no backing
/// image) in place of its `<backingStore>` (or, having none, right after its `<source>`).
/// Returns the XML and the targets found; every byte outside those elements is unchanged.
pub fn drop_backing_stores(xml: &str, targets: &[&str]) -> Result<(String, Vec<String>), XmlError> {
    let mut r = reader(xml);
    let mut stack: Vec<String> = Vec::new();
    let mut spans: Vec<DiskSpan> = Vec::new();
    let mut current: Option<DiskSpan> = None;
    let mut backing_start = None;
    let mut last_ws = String::new();
    loop {
        let before = pos(&r);
        let ev = r.read_event().map_err(|e| syntax(&r, e))?;
        let after = pos(&r);
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(ev, Event::Empty(_));
                stack.push(super::elem_name(e));
                if at(&stack, &["domain", "devices", "disk"]) {
                    current = Some(DiskSpan::default());
                } else if let (Some(d), 4) = (current.as_mut(), stack.len()) {
                    match stack[3].as_str() {
                        "target" => d.target = attr(e, "dev")?,
                        "source" => {
                            d.source_indent = std::mem::take(&mut last_ws);
                            if empty {
                                d.source_end = Some(after);
                            }
                        }
                        "backingStore" if d.backing.is_none() => {
                            if empty {
                                d.backing = Some((before, after));
                            } else {
                                backing_start = Some(before);
                            }
                        }
                        _ => {}
                    }
                }
                if empty {
                    if at(&stack, &["domain", "devices", "disk"]) {
                        spans.extend(current.take());
                    }
                    stack.pop();
                }
            }
            Event::End(_) => {
                if let (Some(d), 4) = (current.as_mut(), stack.len()) {
                    match stack[3].as_str() {
                        "source" => d.source_end = Some(after),
                        "backingStore" => {
                            if let Some(start) = backing_start.take() {
                                d.backing = Some((start, after));
                            }
                        }
                        _ => {}
                    }
                }
                if at(&stack, &["domain", "devices", "disk"]) {
                    spans.extend(current.take());
                }
                stack.pop();
            }
            Event::Text(t) => {
                let t = String::from_utf8_lossy(&t);
                last_ws = if t.trim().is_empty() { t.into_owned() } else { String::new() };
                continue;
            }
            Event::Eof => break,
            _ => {}
        }
        last_ws.clear();
    }

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

fn pos(r: &quick_xml::Reader<&[u8]>) -> usize {
    usize::try_from(r.buffer_position()).unwrap_or(usize::MAX)
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
