//! Reading what a clone needs to know out of a domain's XML.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Writer;

use super::COW_NAMESPACE as NAMESPACE;
use super::{at, attr, declares_namespace, reader, syntax, XmlError};

/// Where a disk's data comes from, as `<source>` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// No `<source>` (an empty cdrom drive, for example).
    None,
    /// `<disk type='file'>`: `<source file=...>`.
    File(String),
    /// `<disk type='block'>`: `<source dev=...>`.
    Block(String),
    /// `<disk type='volume'>`: `<source pool=... volume=...>`.
    Volume { pool: String, volume: String },
    /// Anything else (network, dir, nvme, vhostuser): described for messages only.
    Other(String),
}

/// A disk's first `<backingStore>` as written in the domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingDecl {
    /// No `<backingStore>` element: libvirt reads the chain from the image.
    Absent,
    /// `<backingStore/>`: the image has no backing file.
    None,
    /// A backing image named in the XML.
    Store { kind: String, format: Option<String>, path: Option<String> },
}

/// One `<disk>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Position among the domain's `<disk>` elements (0-based), which the rewrite uses.
    pub index: usize,
    /// `type` attribute: file, block, volume, network, dir, ...
    pub disk_type: String,
    /// `device` attribute: disk (the default), cdrom, floppy, lun.
    pub device: String,
    /// `<driver type=...>`: the image format.
    pub format: Option<String>,
    pub source: DiskSource,
    /// `<target dev=...>`.
    pub target: Option<String>,
    pub readonly: bool,
    pub shareable: bool,
    pub transient: bool,
    pub backing: BackingDecl,
}

impl Disk {
    /// A disk the guest can change and that only this domain uses: the kind that a clone gets an
    /// overlay for. cdroms, floppies, read-only, shareable and transient disks stay shared.
    pub fn is_private_writable(&self) -> bool {
        matches!(self.device.as_str(), "disk" | "lun")
            && !self.readonly
            && !self.shareable
            && !self.transient
            && self.source != DiskSource::None
    }

    /// The target name for messages (`vda`), or the position when the XML has none.
    pub fn label(&self) -> String {
        self.target.clone().unwrap_or_else(|| format!("disk #{}", self.index))
    }
}

/// `<os><nvram>`: per-domain UEFI variable store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nvram {
    /// The vars file, when libvirt has assigned one (it does at first start, or when written).
    pub path: Option<String>,
    /// The template the vars were made from.
    pub template: Option<String>,
    /// Newer libvirt form `<nvram type='file'><source file=.../></nvram>`.
    pub source_form: bool,
}

/// The facts about a domain that cloning needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainFacts {
    pub name: String,
    pub uuid: Option<String>,
    /// `type` attribute of `<domain>` (kvm, qemu).
    pub domain_type: String,
    pub disks: Vec<Disk>,
    /// MAC address of each `<interface>`, in order (None: libvirt will make one).
    pub macs: Vec<Option<String>>,
    pub nvram: Option<Nvram>,
    /// Files and sockets named by serial/console/parallel/channel devices (`source@path`,
    /// `log@file`) and graphics unix sockets (`graphics@socket`, `graphics/listen@socket`).
    pub char_paths: Vec<String>,
    /// Our metadata element (`urn:virt-clone-cow:1`) as XML text, if the domain has one.
    pub vcc_metadata: Option<String>,
}

const CHAR_DEVICES: [&str; 4] = ["serial", "console", "parallel", "channel"];

impl DomainFacts {
    /// Reads the facts out of domain XML (as `virsh dumpxml --inactive` prints it).
    pub fn parse(xml: &str) -> Result<Self, XmlError> {
        let mut r = reader(xml);
        let mut facts = DomainFacts::default();
        let mut stack: Vec<String> = Vec::new();
        let mut text = String::new();
        let mut disk: Option<Disk> = None;
        // Depth of the disk's first <backingStore> while inside it.
        let mut backing_depth: Option<usize> = None;
        let mut seen_name = false;
        // `type` of the serial/console/parallel/channel device being read.
        let mut char_type: Option<String> = None;

        loop {
            let ev = r.read_event().map_err(|e| syntax(&r, e))?;
            match ev {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    let empty = matches!(ev, Event::Empty(_));
                    let name = super::elem_name(e);
                    // Our metadata element: capture it whole.
                    if at(&stack, &["domain", "metadata"]) && declares_namespace(e, NAMESPACE) {
                        facts.vcc_metadata = Some(capture_element(&mut r, e, empty)?);
                        continue;
                    }
                    stack.push(name);
                    if stack.len() == 3 && stack[1] == "devices" && CHAR_DEVICES.contains(&stack[2].as_str()) {
                        char_type = attr(e, "type")?;
                    }
                    on_element(&mut facts, &stack, e, &mut disk, &mut backing_depth, char_type.as_deref())?;
                    text.clear();
                    if empty {
                        on_end(&mut facts, &stack, &mut disk, &mut backing_depth, &text, &mut seen_name)?;
                        stack.pop();
                    }
                }
                Event::Text(t) => {
                    let t = t.unescape().map_err(|e| syntax(&r, e))?;
                    text.push_str(&t);
                }
                Event::CData(t) => text.push_str(&String::from_utf8_lossy(&t)),
                Event::End(_) => {
                    on_end(&mut facts, &stack, &mut disk, &mut backing_depth, &text, &mut seen_name)?;
                    stack.pop();
                    text.clear();
                }
                Event::Eof => break,
                _ => {}
            }
        }
        if !seen_name {
            return Err(XmlError::Missing("name"));
        }
        Ok(facts)
    }

    /// The disks that a clone gets an overlay for.
    pub fn private_disks(&self) -> impl Iterator<Item = &Disk> {
        self.disks.iter().filter(|d| d.is_private_writable())
    }
}

fn on_element(
    facts: &mut DomainFacts,
    stack: &[String],
    e: &BytesStart<'_>,
    disk: &mut Option<Disk>,
    backing_depth: &mut Option<usize>,
    char_type: Option<&str>,
) -> Result<(), XmlError> {
    let n = stack.len();
    if n == 1 && stack[0] == "domain" {
        facts.domain_type = attr(e, "type")?.unwrap_or_default();
    } else if at(stack, &["domain", "devices", "disk"]) {
        *disk = Some(Disk {
            index: facts.disks.len(),
            disk_type: attr(e, "type")?.unwrap_or_else(|| "file".into()),
            device: attr(e, "device")?.unwrap_or_else(|| "disk".into()),
            format: None,
            source: DiskSource::None,
            target: None,
            readonly: false,
            shareable: false,
            transient: false,
            backing: BackingDecl::Absent,
        });
    } else if let Some(d) = disk.as_mut() {
        let inner = &stack[3..];
        match (inner.len(), inner.first().map(String::as_str)) {
            (1, Some("driver")) => d.format = attr(e, "type")?,
            (1, Some("source")) => d.source = disk_source(&d.disk_type, e)?,
            (1, Some("target")) => d.target = attr(e, "dev")?,
            (1, Some("readonly")) => d.readonly = true,
            (1, Some("shareable")) => d.shareable = true,
            (1, Some("transient")) => d.transient = true,
            (1, Some("backingStore")) if d.backing == BackingDecl::Absent => {
                *backing_depth = Some(n);
                d.backing = match attr(e, "type")? {
                    Some(kind) => BackingDecl::Store { kind, format: None, path: None },
                    None => BackingDecl::None,
                };
            }
            _ => {
                if *backing_depth == Some(n - 1) {
                    if let BackingDecl::Store { format, path, .. } = &mut d.backing {
                        match stack[n - 1].as_str() {
                            "format" => *format = attr(e, "type")?,
                            "source" => *path = attr(e, "file")?.or(attr(e, "dev")?),
                            _ => {}
                        }
                    }
                }
            }
        }
    } else if at(stack, &["domain", "devices", "interface", "mac"]) {
        if let Some(last) = facts.macs.last_mut() {
            *last = attr(e, "address")?;
        }
    } else if at(stack, &["domain", "devices", "interface"]) {
        facts.macs.push(None);
    } else if at(stack, &["domain", "os", "nvram"]) {
        facts.nvram = Some(Nvram { path: None, template: attr(e, "template")?, source_form: false });
    } else if at(stack, &["domain", "os", "nvram", "source"]) {
        if let Some(nv) = facts.nvram.as_mut() {
            nv.path = attr(e, "file")?;
            nv.source_form = true;
        }
    } else if at(stack, &["domain", "devices", "graphics"]) || at(stack, &["domain", "devices", "graphics", "listen"]) {
        if let Some(p) = attr(e, "socket")? {
            if !facts.char_paths.contains(&p) {
                facts.char_paths.push(p);
            }
        }
    } else if n == 4 && stack[1] == "devices" && CHAR_DEVICES.contains(&stack[2].as_str()) {
        // Only paths that belong to this domain: files it writes, sockets it creates (unix
        // mode='bind') and logs. Host devices (type='dev'), pipes and sockets it connects to are
        // shared things and stay as they are.
        let key = match (stack[3].as_str(), char_type) {
            ("source", Some("file")) => "path",
            ("source", Some("unix")) if attr(e, "mode")?.as_deref() == Some("bind") => "path",
            ("log", _) => "file",
            _ => return Ok(()),
        };
        if let Some(p) = attr(e, key)? {
            if !facts.char_paths.contains(&p) {
                facts.char_paths.push(p);
            }
        }
    }
    Ok(())
}

fn on_end(
    facts: &mut DomainFacts,
    stack: &[String],
    disk: &mut Option<Disk>,
    backing_depth: &mut Option<usize>,
    text: &str,
    seen_name: &mut bool,
) -> Result<(), XmlError> {
    if at(stack, &["domain", "name"]) {
        facts.name = text.to_string();
        *seen_name = true;
    } else if at(stack, &["domain", "uuid"]) {
        facts.uuid = Some(text.trim().to_string());
    } else if at(stack, &["domain", "os", "nvram"]) {
        if let Some(nv) = facts.nvram.as_mut() {
            if nv.path.is_none() && !text.trim().is_empty() {
                nv.path = Some(text.trim().to_string());
            }
        }
    } else if at(stack, &["domain", "devices", "disk"]) {
        if let Some(d) = disk.take() {
            facts.disks.push(d);
        }
    } else if *backing_depth == Some(stack.len()) {
        *backing_depth = None;
    }
    Ok(())
}

fn disk_source(disk_type: &str, e: &BytesStart<'_>) -> Result<DiskSource, XmlError> {
    Ok(match disk_type {
        "file" => attr(e, "file")?.map_or(DiskSource::None, DiskSource::File),
        "block" => attr(e, "dev")?.map_or(DiskSource::None, DiskSource::Block),
        "volume" => match (attr(e, "pool")?, attr(e, "volume")?) {
            (Some(pool), Some(volume)) => DiskSource::Volume { pool, volume },
            _ => DiskSource::None,
        },
        other => {
            let what = attr(e, "name")?.or(attr(e, "dir")?).unwrap_or_default();
            DiskSource::Other(format!("{other} {what}").trim().to_string())
        }
    })
}

/// Copies an element (start already read) and its subtree verbatim into a string.
pub(crate) fn capture_element(
    r: &mut quick_xml::Reader<&[u8]>,
    start: &BytesStart<'_>,
    empty: bool,
) -> Result<String, XmlError> {
    let mut w = Writer::new(Vec::new());
    let write = |w: &mut Writer<Vec<u8>>, ev: Event<'_>| {
        w.write_event(ev).expect("writing to a Vec cannot fail");
    };
    if empty {
        write(&mut w, Event::Empty(start.borrow()));
    } else {
        write(&mut w, Event::Start(start.borrow()));
        let mut depth = 1usize;
        while depth > 0 {
            let ev = r.read_event().map_err(|e| syntax(r, e))?;
            match &ev {
                Event::Start(_) => depth += 1,
                Event::End(_) => depth -= 1,
                Event::Eof => return Err(XmlError::Missing("end of metadata element")),
                _ => {}
            }
            write(&mut w, ev);
        }
    }
    Ok(String::from_utf8_lossy(&w.into_inner()).into_owned())
}
