//! Domain and volume XML: reading the facts a clone needs, and the streaming rewrite that turns an
//! original's XML into a clone's while keeping every byte it does not have to change.
//!
//! Nothing here round-trips a whole domain through a data model: [`rewrite`] is a quick-xml
//! reader-to-writer pass, so elements this crate has never heard of (a `<qemu:commandline>`, a new
//! libvirt feature, another tool's metadata) survive untouched.

mod disks;
pub mod flatten;
pub mod inspect;
pub mod repoint;
pub mod rewrite;
pub mod volume;

use quick_xml::events::BytesStart;

/// The namespace of virt-clone-cow's metadata element in a domain's `<metadata>` (its schema is
/// the metadata module; the reader and the rewrite only find and replace the element by it).
pub const COW_NAMESPACE: &str = "urn:virt-clone-cow:1";

pub use flatten::drop_backing_stores;
pub use inspect::{BackingDecl, Disk, DiskSource, DomainFacts, Nvram};
pub use repoint::{repoint_disks, Repoint};
pub use rewrite::{rewrite_domain, BackingEdit, DiskEdit, DomainEdits};
pub use volume::VolumeFacts;

/// Domain or volume XML that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("malformed XML at byte {position}")]
    Syntax {
        position: u64,
        #[source]
        source: quick_xml::Error,
    },
    #[error("malformed attribute in <{element}>")]
    Attribute {
        element: String,
        #[source]
        source: quick_xml::events::attributes::AttrError,
    },
    #[error("the XML has no <{0}> element")]
    Missing(&'static str),
    #[error("<{element}> holds '{value}', which is not {expected}")]
    BadValue { element: &'static str, value: String, expected: &'static str },
}

/// The (unescaped) value of attribute `key` of a start tag, if present.
pub(crate) fn attr(e: &BytesStart<'_>, key: &str) -> Result<Option<String>, XmlError> {
    for a in e.attributes() {
        let a = a.map_err(|source| XmlError::Attribute { element: elem_name(e), source })?;
        if a.key.as_ref() == key.as_bytes() {
            let v = a.unescape_value().map_err(|source| XmlError::Syntax { position: 0, source })?;
            return Ok(Some(v.into_owned()));
        }
    }
    Ok(None)
}

/// The element name of a start tag as a string (with any prefix).
pub(crate) fn elem_name(e: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(e.name().as_ref()).into_owned()
}

/// Whether the start tag declares `xmlns:*="uri"` or `xmlns="uri"`.
pub(crate) fn declares_namespace(e: &BytesStart<'_>, uri: &str) -> bool {
    e.attributes().flatten().any(|a| {
        let k = a.key.as_ref();
        (k == b"xmlns" || k.starts_with(b"xmlns:")) && a.value.as_ref() == uri.as_bytes()
    })
}

/// Whether a path stack (element names from the root) is exactly `path`.
pub(crate) fn at(stack: &[String], path: &[&str]) -> bool {
    stack.len() == path.len() && stack.iter().zip(path).all(|(a, b)| a == b)
}

pub(crate) fn reader(xml: &str) -> quick_xml::Reader<&[u8]> {
    let mut r = quick_xml::Reader::from_str(xml);
    r.config_mut().trim_text(false);
    r
}

pub(crate) fn syntax(r: &quick_xml::Reader<&[u8]>, source: quick_xml::Error) -> XmlError {
    XmlError::Syntax { position: r.buffer_position(), source }
}
