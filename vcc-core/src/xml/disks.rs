//! The one walk over a domain's `<disk>` elements that the byte-keeping edits share
//! ([`super::flatten`]: `<backingStore/>`; [`super::repoint`]: a new master): each disk's direct
//! children are reported with their byte ranges in the original text, so an edit splices only
//! the bytes it changes.

use quick_xml::events::{BytesStart, Event};

use super::{at, elem_name, reader, syntax, XmlError};

const DISK: &[&str] = &["domain", "devices", "disk"];

/// A direct child of a `<disk>`, as the walk meets it.
pub(crate) enum Child<'a> {
    /// A start (or empty-element) tag, from byte `start` to byte `end`; `indent` is the
    /// whitespace right before it (empty when something else is).
    Open { name: &'a str, tag: &'a BytesStart<'a>, start: usize, end: usize, empty: bool, indent: String },
    /// An end tag, ending at byte `end`.
    Close { name: &'a str, end: usize },
}

/// Walks every `<domain><devices><disk>` of `xml`, calling `visit` with a fresh `S` per disk for
/// each direct child; returns one `S` per disk, in document order.
pub(crate) fn walk_disks<S: Default>(
    xml: &str,
    mut visit: impl FnMut(&mut S, Child<'_>) -> Result<(), XmlError>,
) -> Result<Vec<S>, XmlError> {
    let mut r = reader(xml);
    let mut stack: Vec<String> = Vec::new();
    let mut spans: Vec<S> = Vec::new();
    let mut current: Option<S> = None;
    let mut last_ws = String::new();
    loop {
        let before = pos(&r);
        let ev = r.read_event().map_err(|e| syntax(&r, e))?;
        let after = pos(&r);
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(ev, Event::Empty(_));
                stack.push(elem_name(e));
                if at(&stack, DISK) {
                    current = Some(S::default());
                } else if let (Some(d), 4) = (current.as_mut(), stack.len()) {
                    let indent = std::mem::take(&mut last_ws);
                    visit(d, Child::Open { name: &stack[3], tag: e, start: before, end: after, empty, indent })?;
                }
                if empty {
                    if at(&stack, DISK) {
                        spans.extend(current.take());
                    }
                    stack.pop();
                }
            }
            Event::End(_) => {
                if let (Some(d), 4) = (current.as_mut(), stack.len()) {
                    visit(d, Child::Close { name: &stack[3], end: after })?;
                }
                if at(&stack, DISK) {
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
    Ok(spans)
}

fn pos(r: &quick_xml::Reader<&[u8]>) -> usize {
    usize::try_from(r.buffer_position()).unwrap_or(usize::MAX)
}
