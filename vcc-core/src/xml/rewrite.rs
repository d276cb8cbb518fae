//! The streaming rewrite from an original's domain XML to a clone's.
//!
//! Every event is copied from reader to writer as it came, except the few this pass must change:
//! the name, the UUID and the SMBIOS system UUID (dropped: libvirt makes a new one), the VM
//! generation ID (emptied: likewise), MAC addresses, fixed graphics ports, paths of
//! serial/console/channel devices and graphics sockets, the UEFI vars path, the private disks
//! (new source, qcow2 driver, a `<backingStore>` naming the master) and our own metadata element.

use std::collections::{BTreeMap, HashMap};

use quick_xml::escape::escape;
use quick_xml::events::{BytesStart, BytesText, Event};
use quick_xml::Writer;

use super::COW_NAMESPACE as NAMESPACE;
use super::{at, declares_namespace, elem_name, reader, syntax, XmlError};

/// The master a disk's overlay is backed by, as the clone's XML states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingEdit {
    /// Absolute path of the master image.
    pub path: String,
    /// Its format (qcow2 or raw); always stated, never probed.
    pub format: String,
    /// The master has no backing file of its own: close the chain with `<backingStore/>`.
    pub self_contained: bool,
}

/// What a private disk becomes in the clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskEdit {
    /// New `source` attributes: `file` for file disks, `volume` (same pool) for volume disks.
    pub source_attr: (&'static str, String),
    /// A volume disk becomes a file disk (`type='file'`, `<source file=...>`): where the overlay
    /// is made at start by the hook, which libvirt's volume lookup (done before the hook runs)
    /// would not find. `source_attr` is then `file`.
    pub to_file: bool,
    /// A volume disk's overlay is in another pool than its master (`--overlay-pool`): the new
    /// `pool` attribute of its `<source>`.
    pub pool: Option<String>,
    /// A new `name` for the disk's `<driver>`: `qemu` on Xen, where only the qdisk backend
    /// (libxl's driver name `qemu`) opens qcow2 (`phy` and `file` take raw images only).
    pub driver_name: Option<String>,
    pub backing: BackingEdit,
    /// The disk becomes a standalone copy (a reflinked clone) rather than an overlay: its driver
    /// type stays (the copy has the master's format) and its `<backingStore>` becomes an empty
    /// one (no backing file); `backing` is then unused.
    pub copy: bool,
}

/// Everything the rewrite changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainEdits {
    pub name: String,
    /// New MAC for each `<interface>` by position; None keeps what is there.
    pub macs: Vec<Option<String>>,
    /// Edits by disk position (see [`super::Disk::index`]).
    pub disks: BTreeMap<usize, DiskEdit>,
    /// New UEFI vars path, when the original has one.
    pub nvram_path: Option<String>,
    /// The path is in `<nvram><source file=.../></nvram>` rather than the element's text.
    pub nvram_source_form: bool,
    /// Old path -> new path for serial/console/parallel/channel sources and logs.
    pub char_paths: HashMap<String, String>,
    /// Our metadata element (XML text) to put in `<metadata>`, replacing any of ours.
    pub metadata: Option<String>,
}

struct State<'e> {
    edits: &'e DomainEdits,
    stack: Vec<String>,
    /// Depth at which a dropped subtree started.
    skip_from: Option<usize>,
    /// Depth at which element text is being replaced, and the replacement.
    replace_text: Option<(usize, String)>,
    disk_index: usize,
    iface_index: usize,
    /// The disk being rewritten, if any.
    disk: Option<&'e DiskEdit>,
    /// Depth of the current disk's `<source>` start tag, to insert `<backingStore>` after it.
    source_depth: Option<usize>,
    /// Whitespace held back until we know whether the next element is dropped.
    pending_ws: Option<Vec<u8>>,
    /// The indentation before the current disk's `<source>`.
    source_indent: Vec<u8>,
    metadata_written: bool,
    out: Writer<Vec<u8>>,
}

/// Produces a clone's domain XML from the original's.
pub fn rewrite_domain(xml: &str, edits: &DomainEdits) -> Result<String, XmlError> {
    let mut r = reader(xml);
    let mut st = State {
        edits,
        stack: Vec::new(),
        skip_from: None,
        replace_text: None,
        disk_index: 0,
        iface_index: 0,
        disk: None,
        source_depth: None,
        pending_ws: None,
        source_indent: b"\n      ".to_vec(),
        metadata_written: false,
        out: Writer::new(Vec::with_capacity(xml.len() + 1024)),
    };
    loop {
        let ev = r.read_event().map_err(|e| syntax(&r, e))?;
        match ev {
            Event::Eof => break,
            Event::Start(e) => st.start(e, false)?,
            Event::Empty(e) => st.start(e, true)?,
            Event::End(e) => st.end(Event::End(e)),
            Event::Text(t) => {
                if st.skip_from.is_some() || st.replace_text.is_some() {
                    continue;
                }
                if t.iter().all(|b| b.is_ascii_whitespace()) {
                    st.flush_ws();
                    st.pending_ws = Some(t.to_vec());
                } else {
                    st.flush_ws();
                    st.emit(Event::Text(t));
                }
            }
            other => {
                if st.skip_from.is_none() && st.replace_text.is_none() {
                    st.flush_ws();
                    st.emit(other);
                }
            }
        }
    }
    st.flush_ws();
    Ok(String::from_utf8_lossy(&st.out.into_inner()).into_owned())
}

impl<'e> State<'e> {
    fn emit(&mut self, ev: Event<'_>) {
        self.out.write_event(ev).expect("writing to a Vec cannot fail");
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.out.get_mut().extend_from_slice(bytes);
    }

    fn flush_ws(&mut self) {
        if let Some(ws) = self.pending_ws.take() {
            self.raw(&ws);
        }
    }

    fn start(&mut self, e: BytesStart<'_>, empty: bool) -> Result<(), XmlError> {
        let name = elem_name(&e);
        if self.skip_from.is_some() || self.replace_text.is_some() {
            if !empty {
                self.stack.push(name);
            }
            return Ok(());
        }
        self.stack.push(name);
        let depth = self.stack.len();

        // Elements dropped whole, together with the whitespace before them.
        // The SMBIOS system UUID goes with <uuid>: without <uuid> libvirt would adopt it, and the
        // clone would collide with its original.
        let smbios_uuid = depth == 4
            && at(&self.stack[..3], &["domain", "sysinfo", "system"])
            && self.stack[3] == "entry"
            && super::attr(&e, "name")?.as_deref() == Some("uuid");
        let drop = at(&self.stack, &["domain", "uuid"])
            || smbios_uuid
            || (depth == 3 && at(&self.stack[..2], &["domain", "metadata"]) && declares_namespace(&e, NAMESPACE))
            || (self.disk.is_some()
                && depth == 4
                && self.stack[3] == "backingStore"
                && at(&self.stack[..3], &["domain", "devices", "disk"]));
        if drop {
            self.pending_ws = None;
            if empty {
                self.stack.pop();
            } else {
                self.skip_from = Some(depth);
            }
            return Ok(());
        }

        let ws = self.pending_ws.clone();
        self.flush_ws();
        let edited = self.edit_start(&e, depth, ws)?;
        let tag = edited.as_ref().unwrap_or(&e).borrow();

        if at(&self.stack, &["domain", "metadata"]) && empty {
            // <metadata/>: open it to hold ours.
            self.emit(Event::Start(tag));
            self.write_metadata(b"");
            let end = e.to_end().into_owned();
            self.emit(Event::End(end));
            self.stack.pop();
            return Ok(());
        }

        if empty {
            self.emit(Event::Empty(tag));
            self.after_end(depth);
            self.stack.pop();
        } else {
            self.emit(Event::Start(tag));
            // Elements whose text we replace.
            let new_text = if at(&self.stack, &["domain", "name"]) {
                Some(self.edits.name.clone())
            } else if at(&self.stack, &["domain", "genid"]) {
                // The stored VM generation ID: empty makes libvirt generate a new one.
                Some(String::new())
            } else if at(&self.stack, &["domain", "os", "nvram"]) && !self.edits.nvram_source_form {
                self.edits.nvram_path.clone()
            } else {
                None
            };
            if let Some(t) = new_text {
                self.replace_text = Some((depth, t));
            }
        }
        Ok(())
    }

    fn end(&mut self, ev: Event<'_>) {
        let depth = self.stack.len();
        if let Some(from) = self.skip_from {
            self.stack.pop();
            if depth == from {
                self.skip_from = None;
            }
            return;
        }
        if let Some((d, text)) = self.replace_text.take() {
            if d == depth {
                self.pending_ws = None;
                self.emit(Event::Text(BytesText::new(&text)));
            } else {
                self.replace_text = Some((d, text));
                self.stack.pop();
                return;
            }
        }
        if at(&self.stack, &["domain", "metadata"]) {
            let ws = self.pending_ws.take().unwrap_or_default();
            self.write_metadata(&ws);
            self.raw(&ws);
        } else if depth == 1 && !self.metadata_written && self.edits.metadata.is_some() {
            // No <metadata> element: add one at the end of <domain>.
            self.flush_ws();
            let m = self.edits.metadata.clone().unwrap_or_default();
            self.raw(format!("  <metadata>\n    {m}\n  </metadata>\n").as_bytes());
            self.metadata_written = true;
        }
        self.flush_ws();
        self.emit(ev);
        self.after_end(depth);
        self.stack.pop();
    }

    /// Work done when an element closes (Empty or End): the disk's `<backingStore>` goes right
    /// after its `<source>`, and disk/interface counters advance.
    fn after_end(&mut self, depth: usize) {
        if self.source_depth == Some(depth) {
            self.source_depth = None;
            if self.disk.is_some_and(|e| e.copy) {
                // A standalone copy: the chain ends here, nothing to probe.
                let mut s = String::from_utf8_lossy(&self.source_indent).into_owned();
                s.push_str("<backingStore/>");
                self.raw(s.as_bytes());
            } else if let Some(edit) = self.disk {
                let b = &edit.backing;
                let mut s = String::new();
                s.push_str(&String::from_utf8_lossy(&self.source_indent));
                s.push_str("<backingStore type='file'>");
                s.push_str(&format!("<format type='{}'/>", escape(b.format.as_str())));
                s.push_str(&format!("<source file='{}'/>", escape(b.path.as_str())));
                if b.self_contained {
                    s.push_str("<backingStore/>");
                }
                s.push_str("</backingStore>");
                self.raw(s.as_bytes());
            }
        }
        if at(&self.stack, &["domain", "devices", "disk"]) {
            self.disk_index += 1;
            self.disk = None;
        } else if at(&self.stack, &["domain", "devices", "interface"]) {
            self.iface_index += 1;
        }
    }

    fn write_metadata(&mut self, ws_before_end: &[u8]) {
        if self.metadata_written {
            return;
        }
        if let Some(m) = self.edits.metadata.clone() {
            // Indent one level deeper than the closing tag.
            let indent = if ws_before_end.is_empty() {
                b"\n    ".to_vec()
            } else {
                let mut v = ws_before_end.to_vec();
                v.extend_from_slice(b"  ");
                v
            };
            self.raw(&indent);
            self.raw(m.as_bytes());
            if ws_before_end.is_empty() {
                self.raw(b"\n  ");
            }
        }
        self.metadata_written = true;
    }

    /// Returns a changed start tag for elements whose attributes change, else None.
    fn edit_start(
        &mut self,
        e: &BytesStart<'_>,
        depth: usize,
        ws_before: Option<Vec<u8>>,
    ) -> Result<Option<BytesStart<'static>>, XmlError> {
        let s = &self.stack;
        if at(s, &["domain", "devices", "disk"]) {
            self.disk = self.edits.disks.get(&self.disk_index);
            return Ok(match self.disk {
                Some(edit) if edit.to_file => Some(set_attrs(e, &[("type", Some("file"))])?),
                _ => None,
            });
        }
        if at(s, &["domain", "devices", "interface"]) {
            return Ok(None);
        }
        if depth == 4 && at(&s[..3], &["domain", "devices", "disk"]) {
            let Some(edit) = self.disk else { return Ok(None) };
            return Ok(match s[3].as_str() {
                "driver" if edit.copy => None,
                "driver" => match &edit.driver_name {
                    Some(n) => Some(set_attrs(e, &[("name", Some(n.as_str())), ("type", Some("qcow2"))])?),
                    None => Some(set_attrs(e, &[("type", Some("qcow2"))])?),
                },
                "source" => {
                    self.source_depth = Some(depth);
                    if let Some(ws) = ws_before {
                        self.source_indent = ws;
                    }
                    let (k, v) = &edit.source_attr;
                    if edit.to_file {
                        Some(set_attrs(e, &[("pool", None), ("volume", None), ("file", Some(v.as_str()))])?)
                    } else if let Some(pool) = &edit.pool {
                        Some(set_attrs(e, &[("pool", Some(pool.as_str())), (k, Some(v.as_str()))])?)
                    } else {
                        Some(set_attrs(e, &[(k, Some(v.as_str()))])?)
                    }
                }
                _ => None,
            });
        }
        if at(s, &["domain", "devices", "interface", "mac"]) {
            if let Some(Some(mac)) = self.edits.macs.get(self.iface_index) {
                return Ok(Some(set_attrs(e, &[("address", Some(mac.as_str()))])?));
            }
            return Ok(None);
        }
        if at(s, &["domain", "devices", "graphics"]) {
            let autoport = super::attr(e, "autoport")?;
            let port = super::attr(e, "port")?;
            let fixed = autoport.as_deref() != Some("yes") && port.as_deref().is_some_and(|p| p != "-1" && p != "0");
            let ws_fixed = super::attr(e, "websocket")?.is_some_and(|p| p != "-1");
            let socket = super::attr(e, "socket")?.and_then(|old| self.edits.char_paths.get(&old));
            if !fixed && !ws_fixed && socket.is_none() {
                return Ok(None);
            }
            let mut changes: Vec<(&str, Option<&str>)> = Vec::new();
            if let Some(new) = socket {
                changes.push(("socket", Some(new.as_str())));
            }
            if fixed {
                changes.extend([("port", Some("-1")), ("autoport", Some("yes")), ("tlsPort", None)]);
            }
            if ws_fixed {
                changes.push(("websocket", Some("-1")));
            }
            return Ok(Some(set_attrs(e, &changes)?));
        }
        if at(s, &["domain", "devices", "graphics", "listen"]) {
            if let Some(new) = super::attr(e, "socket")?.and_then(|old| self.edits.char_paths.get(&old)) {
                return Ok(Some(set_attrs(e, &[("socket", Some(new.as_str()))])?));
            }
            return Ok(None);
        }
        if at(s, &["domain", "os", "nvram", "source"]) {
            if let Some(p) = &self.edits.nvram_path {
                return Ok(Some(set_attrs(e, &[("file", Some(p.as_str()))])?));
            }
            return Ok(None);
        }
        if depth == 4 && s[1] == "devices" && ["serial", "console", "parallel", "channel"].contains(&s[2].as_str()) {
            let key = match s[3].as_str() {
                "source" => "path",
                "log" => "file",
                _ => return Ok(None),
            };
            if let Some(old) = super::attr(e, key)? {
                if let Some(new) = self.edits.char_paths.get(&old) {
                    return Ok(Some(set_attrs(e, &[(key, Some(new.as_str()))])?));
                }
            }
        }
        Ok(None)
    }
}

/// Rebuilds a start tag with some attributes set (Some) or removed (None), keeping the order and
/// the raw text of the others. Attributes not present are appended. Values use libvirt's quotes.
fn set_attrs(e: &BytesStart<'_>, changes: &[(&str, Option<&str>)]) -> Result<BytesStart<'static>, XmlError> {
    let name = elem_name(e);
    let mut content = name.clone();
    let mut done = vec![false; changes.len()];
    for a in e.attributes().with_checks(false) {
        let a = a.map_err(|source| XmlError::Attribute { element: name.clone(), source })?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        if let Some(i) = changes.iter().position(|(k, _)| *k == key) {
            done[i] = true;
            if let Some(v) = changes[i].1 {
                content.push_str(&format!(" {key}='{}'", escape(v)));
            }
        } else {
            let raw = String::from_utf8_lossy(&a.value);
            let q = if raw.contains('\'') { '"' } else { '\'' };
            content.push_str(&format!(" {key}={q}{raw}{q}"));
        }
    }
    for (i, (k, v)) in changes.iter().enumerate() {
        if let (false, Some(v)) = (done[i], v) {
            content.push_str(&format!(" {k}='{}'", escape(*v)));
        }
    }
    Ok(BytesStart::from_content(content, name.len()))
}
