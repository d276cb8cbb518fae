//! Reading storage volume XML (`virsh vol-dumpxml`).

use quick_xml::events::Event;

use super::{at, attr, reader, syntax, XmlError};

/// What a storage volume's XML says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeFacts {
    pub name: String,
    pub path: String,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Bytes the volume takes on its storage.
    pub allocation: u64,
    /// Image format (`<target><format type=...>`).
    pub format: Option<String>,
    /// `<backingStore>`: path and format of the backing image, if any.
    pub backing: Option<(String, Option<String>)>,
}

impl VolumeFacts {
    pub fn parse(xml: &str) -> Result<Self, XmlError> {
        let mut r = reader(xml);
        let mut v = VolumeFacts::default();
        let mut stack: Vec<String> = Vec::new();
        let mut text = String::new();
        let mut unit = String::from("bytes");
        loop {
            let ev = r.read_event().map_err(|e| syntax(&r, e))?;
            match ev {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    stack.push(super::elem_name(e));
                    text.clear();
                    if at(&stack, &["volume", "capacity"]) || at(&stack, &["volume", "allocation"]) {
                        unit = attr(e, "unit")?.unwrap_or_else(|| "bytes".into());
                    } else if at(&stack, &["volume", "target", "format"]) {
                        v.format = attr(e, "type")?;
                    } else if at(&stack, &["volume", "backingStore", "format"]) {
                        if let Some(b) = v.backing.as_mut() {
                            b.1 = attr(e, "type")?;
                        }
                    } else if at(&stack, &["volume", "backingStore"]) {
                        v.backing = Some((String::new(), None));
                    }
                    if matches!(ev, Event::Empty(_)) {
                        stack.pop();
                    }
                }
                Event::Text(t) => text.push_str(&t.unescape().map_err(|e| syntax(&r, e))?),
                Event::End(_) => {
                    let t = text.trim();
                    if at(&stack, &["volume", "name"]) {
                        v.name = t.to_string();
                    } else if at(&stack, &["volume", "target", "path"]) {
                        v.path = t.to_string();
                    } else if at(&stack, &["volume", "capacity"]) {
                        v.capacity = scaled(t, &unit)?;
                    } else if at(&stack, &["volume", "allocation"]) {
                        v.allocation = scaled(t, &unit)?;
                    } else if at(&stack, &["volume", "backingStore", "path"]) {
                        if let Some(b) = v.backing.as_mut() {
                            b.0 = t.to_string();
                        }
                    }
                    stack.pop();
                    text.clear();
                }
                Event::Eof => break,
                _ => {}
            }
        }
        if v.backing.as_ref().is_some_and(|b| b.0.is_empty()) {
            v.backing = None;
        }
        Ok(v)
    }
}

fn scaled(t: &str, unit: &str) -> Result<u64, XmlError> {
    let n: u64 = t.parse().map_err(|_| XmlError::BadValue {
        element: "capacity",
        value: t.to_string(),
        expected: "a whole number",
    })?;
    let mult = crate::units::unit_bytes(unit).ok_or_else(|| XmlError::BadValue {
        element: "capacity",
        value: unit.into(),
        expected: "a known unit",
    })?;
    n.checked_mul(mult).ok_or(XmlError::BadValue {
        element: "capacity",
        value: t.into(),
        expected: "a size that fits 64 bits",
    })
}

/// `<pool><target><path>` of a storage pool's XML.
pub fn pool_target_path(xml: &str) -> Option<String> {
    pool_text(xml, &["pool", "target", "path"])
}

/// `<pool><name>` of a storage pool's XML.
pub fn pool_name(xml: &str) -> Option<String> {
    pool_text(xml, &["pool", "name"])
}

/// The trimmed text of the first element at `path` (from the root).
fn pool_text(xml: &str, path: &[&str]) -> Option<String> {
    let mut r = reader(xml);
    let mut stack: Vec<String> = Vec::new();
    let mut text = String::new();
    loop {
        match r.read_event().ok()? {
            Event::Start(e) => {
                stack.push(super::elem_name(&e));
                text.clear();
            }
            Event::Text(t) => text.push_str(&t.unescape().ok()?),
            Event::End(_) => {
                if at(&stack, path) {
                    return Some(text.trim().to_string());
                }
                stack.pop();
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

/// The type of a storage pool (`<pool type=...>`), if the XML can be read.
pub fn pool_type(xml: &str) -> Option<String> {
    let mut r = reader(xml);
    loop {
        match r.read_event().ok()? {
            Event::Start(ref e) | Event::Empty(ref e) => {
                return if super::elem_name(e) == "pool" { attr(e, "type").ok()? } else { None };
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

/// The directory of files a storage pool's XML defines: `<pool type='dir'|'fs'|'netfs'>`'s
/// `<target><path>`. `None` for other pool types (their target is a device directory such as
/// `/dev/vg0`, never a place for image files) and for XML that cannot be read.
pub fn pool_file_dir(xml: &str) -> Option<String> {
    let mut r = reader(xml);
    loop {
        match r.read_event().ok()? {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let is_file_pool = super::elem_name(e) == "pool"
                    && matches!(attr(e, "type").ok()?.as_deref(), Some("dir" | "fs" | "netfs"));
                return if is_file_pool { pool_target_path(xml) } else { None };
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pools_of_files_have_a_file_dir() {
        let pool = |kind: &str, path: &str| {
            format!("<pool type='{kind}'><name>p</name><target><path>{path}</path></target></pool>")
        };
        assert_eq!(pool_file_dir(&pool("dir", "/var/lib/p")).as_deref(), Some("/var/lib/p"));
        assert_eq!(pool_file_dir(&pool("netfs", " /srv/nfs ")).as_deref(), Some("/srv/nfs"));
        assert_eq!(pool_file_dir(&pool("logical", "/dev/vg0")), None);
        assert_eq!(pool_file_dir(&pool("disk", "/dev")), None);
        assert_eq!(
            pool_file_dir("<?xml version='1.0'?>\n<!-- x -->\n<pool type='fs'><target><path>/a</path></target></pool>")
                .as_deref(),
            Some("/a")
        );
        assert_eq!(pool_file_dir("<volume type='dir'><target><path>/a</path></target></volume>"), None);
        assert_eq!(pool_file_dir("<pool type='dir'><target><path>/a"), None);
    }
}
