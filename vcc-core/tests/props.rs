//! Property and mutation tests over every parser of untrusted text in vcc-core: the control
//! protocol, domain XML (inspect and rewrite) and our metadata. Hermetic and bounded: 256 cases per
//! property unless `PROPTEST_CASES` says otherwise (docs/testing.md has the long run).
//!
//! The properties: nothing panics on any input; what is accepted is consistent (parses again to
//! the same thing); valid inputs round-trip; mutated valid inputs are either accepted and
//! consistent, or refused with an error.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::Config;

use vcc_core::control::proto::{Answer, Identity, MasterRequest, Request};
use vcc_core::metadata::{CloneDisk, CloneInfo, CowMetadata, MasterRef, ReflinkDisk, TemplateInfo};
use vcc_core::xml::{rewrite_domain, DomainEdits, DomainFacts};

/// Cases per property: `PROPTEST_CASES`, else 256.
fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    Config { cases, failure_persistence: None, ..Config::default() }
}

/// Real `virsh dumpxml` captures (virt-clone-cow/tests/data).
const CAPTURES: [&str; 7] = [
    include_str!("../../virt-clone-cow/tests/data/empty-metadata-fixed-vnc.xml"),
    include_str!("../../virt-clone-cow/tests/data/every-disk-kind-uefi.xml"),
    include_str!("../../virt-clone-cow/tests/data/genid.xml"),
    include_str!("../../virt-clone-cow/tests/data/graphics-unix-socket.xml"),
    include_str!("../../virt-clone-cow/tests/data/nvram-source-form-backing-chain.xml"),
    include_str!("../../virt-clone-cow/tests/data/odd-name-all-disk-kinds.xml"),
    include_str!("../../virt-clone-cow/tests/data/sysinfo-system-uuid.xml"),
];

/// One edit of a byte string: overwrite, insert or delete at a position (taken modulo the length).
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1usize..32).prop_map(|(i, n)| Mutation::Delete(i, n)),
    ]
}

fn mutate(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let len = b.len().max(1);
        match m {
            Mutation::Set(i, v) if !b.is_empty() => b[i % len] = *v,
            Mutation::Set(..) => {}
            Mutation::Insert(i, v) => {
                let at = i % (b.len() + 1);
                b.splice(at..at, v.iter().copied());
            }
            Mutation::Delete(i, n) if !b.is_empty() => {
                let at = i % len;
                let end = (at + n).min(b.len());
                b.drain(at..end);
            }
            Mutation::Delete(..) => {}
        }
    }
    b
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..6)
}

// ---------------------------------------------------------------------------------------------
// The control protocol

fn opt_string() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(any::<String>())
}

fn master_request() -> impl Strategy<Value = MasterRequest> {
    let identity =
        (any::<String>(), opt_string(), any::<String>(), any::<String>(), proptest::option::of(any::<u64>())).prop_map(
            |(format, info_hash, name, sha256, virtual_size)| Identity {
                format,
                info_hash,
                name,
                sha256,
                virtual_size,
            },
        );
    prop_oneof![
        (opt_string(), any::<String>()).prop_map(|(pool, path)| MasterRequest::by_path(pool, path)),
        (opt_string(), identity).prop_map(|(pool, id)| MasterRequest::by_identity(pool, id)),
        (opt_string(), any::<String>()).prop_map(|(pool, name)| MasterRequest::by_name(pool, name)),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        master_request().prop_map(Request::Ensure),
        master_request().prop_map(Request::Fetch),
        master_request().prop_map(Request::Export),
        master_request().prop_map(Request::Seed),
        Just(Request::Status),
        Just(Request::List),
    ]
}

/// Valid answer lines, as docs/control-protocol.md shows them.
const ANSWERS: [&str; 5] = [
    r#"{"event":"progress","done_bytes":1048576,"total_bytes":8388608,"peers":2,"down_bps":5000000}"#,
    r#"{"ok":true,"state":"fetched","path":"/var/lib/libvirt/images/base.qcow2"}"#,
    r#"{"ok":false,"error":"the pool 'x' is not defined"}"#,
    r#"{"ok":true,"masters":[{"name":"m.raw","pool":"p","state":"seeding"}]}"#,
    r#"{"event":"started","have_bytes":0,"total_bytes":10}"#,
];

/// Whatever a request line is, parsing it answers (never panics); what is accepted re-encodes to
/// one line that parses to the same request.
fn request_line_is_refused_or_consistent(line: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<Request>(line) {
        let again = serde_json::to_string(&r).unwrap();
        assert!(!again.contains('\n'), "{again}");
        assert_eq!(serde_json::from_str::<Request>(&again).unwrap(), r);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_as_a_request_or_answer_line_never_panic(line in proptest::collection::vec(any::<u8>(), 0..512)) {
        request_line_is_refused_or_consistent(&line);
        let _ = Answer::parse(&line);
    }

    #[test]
    fn valid_requests_round_trip_on_one_line(r in request()) {
        let line = serde_json::to_string(&r).unwrap();
        prop_assert!(!line.contains('\n'));
        let back: Request = serde_json::from_str(&line).unwrap();
        // The hook's inline manifest comes back as the object the daemon validates itself.
        prop_assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&r).unwrap());
        prop_assert_eq!(serde_json::to_string(&back).unwrap(), line);
    }

    #[test]
    fn mutated_requests_are_refused_or_consistent(r in request(), ms in mutations()) {
        let line = mutate(serde_json::to_vec(&r).unwrap(), &ms);
        request_line_is_refused_or_consistent(&line);
    }

    #[test]
    fn mutated_answers_never_panic(i in 0..ANSWERS.len(), ms in mutations()) {
        let line = mutate(ANSWERS[i].as_bytes().to_vec(), &ms);
        if let Ok(a) = Answer::parse(&line) {
            // Accepted: the same answer when written back (unknown events are never written).
            if let Answer::Final(f) = a {
                let again = serde_json::to_vec(&f).unwrap();
                prop_assert_eq!(Answer::parse(&again).unwrap(), Answer::Final(f));
            }
        }
    }
}

#[test]
fn deeply_nested_request_lines_are_refused_without_overflowing_the_stack() {
    for depth in [129, 10_000, 1_000_000] {
        let line = format!(r#"{{"op":"ensure","manifest":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
        assert!(serde_json::from_str::<Request>(&line).is_err(), "depth {depth}");
        let line = format!(r#"{{"ok":true,"path":{}}}"#, "{\"a\":".repeat(depth));
        assert!(Answer::parse(line.as_bytes()).is_err(), "depth {depth}");
    }
}

// ---------------------------------------------------------------------------------------------
// Domain XML and our metadata

fn edits(name: &str) -> DomainEdits {
    DomainEdits { name: name.into(), ..Default::default() }
}

/// XML-escapes text for an attribute or element content.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// Characters XML 1.0 allows (libvirt's parser refuses the others).
fn xml_text() -> impl Strategy<Value = String> {
    use proptest::char::range;
    let c = prop_oneof![
        Just('\t'),
        Just('\n'),
        range('\u{20}', '\u{7E}'),
        range('\u{7F}', '\u{D7FF}'),
        range('\u{E000}', '\u{FFFD}'),
        range('\u{10000}', '\u{10FFFF}'),
    ];
    proptest::collection::vec(c, 0..40).prop_map(|v| v.into_iter().collect())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_text_as_domain_xml_or_metadata_never_panics(s in any::<String>()) {
        let _ = DomainFacts::parse(&s);
        let _ = rewrite_domain(&s, &edits("c"));
        let _ = CowMetadata::parse(&s);
    }

    /// A capture mutated at the byte level: refused, or parsed and rewritten into XML that parses
    /// again, with the new name.
    #[test]
    fn mutated_captures_are_refused_or_rewritten_consistently(i in 0..CAPTURES.len(), ms in mutations()) {
        let bytes = mutate(CAPTURES[i].as_bytes().to_vec(), &ms);
        let xml = String::from_utf8_lossy(&bytes);
        let _ = CowMetadata::parse(&xml);
        if let Ok(facts) = DomainFacts::parse(&xml) {
            if let Ok(out) = rewrite_domain(&xml, &edits("clone-of-it")) {
                let again = DomainFacts::parse(&out);
                prop_assert!(again.is_ok(), "the rewrite of accepted XML does not parse: {:?}\n{out}", again.err());
                let again = again.unwrap();
                if !facts.name.is_empty() {
                    prop_assert_eq!(again.name, "clone-of-it");
                }
                prop_assert_eq!(again.disks.len(), facts.disks.len());
            }
        }
    }

    /// Elements the rewrite has never heard of, placed anywhere it does not edit, come out byte for
    /// byte, with any (escaped) text in them.
    #[test]
    fn the_rewrite_keeps_unknown_elements_byte_for_byte(
        i in 0..CAPTURES.len(),
        anchor in 0..4usize,
        attr in xml_text(),
        text in xml_text(),
    ) {
        let xml = CAPTURES[i];
        let fragment = format!("<t:keep xmlns:t='urn:vcc-props' a='{}'>{}<!-- {} --></t:keep>", esc(&attr), esc(&text), text.replace('-', "_"));
        let at = match anchor {
            0 => xml.find('>').unwrap() + 1,
            1 => xml.rfind("</domain>").unwrap(),
            2 => xml.rfind("</devices>").unwrap(),
            _ => xml.find("</os>").unwrap(),
        };
        let with = format!("{}{fragment}{}", &xml[..at], &xml[at..]);
        let out = rewrite_domain(&with, &edits("c")).unwrap();
        prop_assert!(out.contains(&fragment), "lost {fragment}");
        // And nothing else changed because of it.
        let plain = rewrite_domain(xml, &edits("c")).unwrap();
        prop_assert_eq!(out.replacen(&fragment, "", 1), plain);
    }

    #[test]
    fn metadata_round_trips_through_its_xml(md in metadata()) {
        prop_assert_eq!(CowMetadata::parse(&md.to_xml()).unwrap(), md.clone());
        // Bare (as libvirt is given it) reads back the same.
        prop_assert_eq!(CowMetadata::parse(&md.to_bare_xml()).unwrap(), md);
    }

    #[test]
    fn mutated_metadata_is_refused_or_read(md in metadata(), ms in mutations()) {
        let bytes = mutate(md.to_xml().into_bytes(), &ms);
        let _ = CowMetadata::parse(&String::from_utf8_lossy(&bytes));
    }
}

fn master_ref() -> impl Strategy<Value = MasterRef> {
    let opt = || proptest::option::of(xml_text());
    ((opt(), xml_text(), xml_text(), proptest::option::of(any::<u64>())), (opt(), opt(), opt(), opt(), opt())).prop_map(
        |((target, path, format, virtual_size), (pool, volume, sha256, info_hash, manifest))| MasterRef {
            target,
            path,
            format,
            virtual_size,
            pool,
            volume,
            sha256,
            info_hash,
            manifest,
        },
    )
}

fn metadata() -> impl Strategy<Value = CowMetadata> {
    let disk = (xml_text(), xml_text(), master_ref()).prop_map(|(target, overlay, master)| CloneDisk {
        target,
        overlay,
        master,
    });
    let reflink =
        (xml_text(), xml_text(), master_ref()).prop_map(|(target, path, from)| ReflinkDisk { target, path, from });
    let clone =
        (xml_text(), any::<bool>(), proptest::collection::vec(disk, 0..3), proptest::collection::vec(reflink, 0..3))
            .prop_map(|(original, disposable, disks, reflinks)| CloneInfo { original, disposable, disks, reflinks });
    let template = proptest::collection::vec(master_ref(), 0..3).prop_map(|masters| TemplateInfo { masters });
    (proptest::option::of(template), proptest::option::of(clone))
        .prop_map(|(template, clone)| CowMetadata { template, clone })
}

#[test]
fn the_captures_used_here_are_valid_and_distinct() {
    let names: BTreeMap<String, usize> =
        CAPTURES.iter().enumerate().map(|(i, x)| (DomainFacts::parse(x).unwrap().name, i)).collect();
    assert_eq!(names.len(), CAPTURES.len());
}
