//! Property and mutation tests over pool-helper's parsers of untrusted bytes: bencode and
//! metainfo, manifests, the qcow2 header parser and raw sniffing. Hermetic (no network, no
//! external program) and bounded: 256 cases per property unless `PROPTEST_CASES` says otherwise
//! (docs/testing.md has the long run).
//!
//! The properties: nothing panics on any input; what is accepted is consistent; valid inputs
//! round-trip; mutated valid inputs are either accepted and consistent, or refused.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::Config;
use sha1::{Digest as _, Sha1};

use pool_helper::manifest::{magnet, validate_name, Manifest};
use pool_helper::metainfo::{self, decode, encode_torrent, piece_length_ok, validate, Value};
use pool_helper::verify::{check_qcow2_header, sniff_raw, QCOW2_MAGIC};

/// Cases per property: `PROPTEST_CASES`, else 256.
fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    Config { cases, failure_persistence: None, ..Config::default() }
}

/// One edit of a byte string: overwrite, insert or delete at a position (taken modulo the length).
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
}

/// Any byte, and often one that means something in bencode or JSON.
fn byte() -> impl Strategy<Value = u8> {
    prop_oneof![any::<u8>(), proptest::sample::select(b"ilde0123456789:-+.eE\"{}[],".to_vec())]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), byte()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), proptest::collection::vec(byte(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1usize..32).prop_map(|(i, n)| Mutation::Delete(i, n)),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..6)
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

// ---------------------------------------------------------------------------------------------
// Bencode and metainfo

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::Int),
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(Value::Bytes),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
            proptest::collection::btree_map(proptest::collection::vec(any::<u8>(), 0..8), inner, 0..6)
                .prop_map(Value::Dict),
        ]
    })
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    v.encode(&mut out);
    out
}

/// Bencode-shaped bytes whose numbers (integers, string lengths) are written in every odd way:
/// signs, leading zeros, blanks. Where the corner cases of the grammar live.
fn bencodeish() -> impl Strategy<Value = Vec<u8>> {
    let int = "[-+0 ]?[0-9]{0,3}".prop_map(|n| format!("i{n}e").into_bytes());
    let bytes = ("[-+0 ]?[0-9]{1,2}", proptest::collection::vec(any::<u8>(), 0..12)).prop_map(|(n, data)| {
        let mut b = format!("{n}:").into_bytes();
        b.extend(data);
        b
    });
    prop_oneof![int, bytes].prop_recursive(4, 32, 4, |inner| {
        (proptest::sample::select(vec![b'l', b'd']), proptest::collection::vec(inner, 0..4)).prop_map(|(k, items)| {
            let mut b = vec![k];
            items.into_iter().for_each(|i| b.extend(i));
            b.push(b'e');
            b
        })
    })
}

/// Accepted bencode is canonical: it encodes back to exactly the bytes it came from (the
/// info-hash is taken over the bytes as sent, and every other client hashes the canonical form).
fn decoded_is_canonical(b: &[u8]) -> Result<(), TestCaseError> {
    if let Ok((v, span)) = decode(b) {
        prop_assert_eq!(encode(&v), b.to_vec(), "accepted non-canonical bencode {:?}", String::from_utf8_lossy(b));
        if let (Value::Dict(d), Some((s, e))) = (&v, span) {
            prop_assert_eq!(encode(&d[&b"info".to_vec()]), b[s..e].to_vec());
        }
    }
    Ok(())
}

/// A single-file torrent as pool-helper writes it, with its length.
fn torrent() -> impl Strategy<Value = (Vec<u8>, u64, u64)> {
    (14u32..=26, 1u64..(4 << 20), "[a-z0-9][a-z0-9._-]{0,20}", proptest::collection::vec("[ -~]{0,30}", 0..3))
        .prop_flat_map(|(bits, length, name, trackers)| {
            let pl = 1u64 << bits;
            let n = length.div_ceil(pl) as usize * 20;
            proptest::collection::vec(any::<u8>(), n..=n)
                .prop_map(move |pieces| (encode_torrent(&name, length, pl, pieces, &trackers), length, pl))
        })
}

/// Metainfo that passed validation says what its bytes say.
fn accepted_metainfo_is_consistent(b: &[u8], expected: Option<u64>) -> Result<(), TestCaseError> {
    if let Ok(mi) = validate(b, expected) {
        let (top, span) = decode(b).unwrap();
        let (s, e) = span.unwrap();
        prop_assert_eq!(&mi.info_hash, &hex::encode(Sha1::digest(&b[s..e])));
        prop_assert!(piece_length_ok(mi.piece_length));
        prop_assert!(mi.length > 0);
        prop_assert_eq!(mi.piece_count, mi.length.div_ceil(mi.piece_length));
        if let Some(want) = expected {
            prop_assert_eq!(mi.length, want);
        }
        let Value::Dict(top) = top else { return Err(TestCaseError::fail("top is not a dictionary")) };
        let Some(Value::Dict(info)) = top.get(&b"info".to_vec()) else {
            return Err(TestCaseError::fail("no info dictionary"));
        };
        prop_assert!(!info.contains_key(&b"files".to_vec()));
        let Some(Value::Bytes(pieces)) = info.get(&b"pieces".to_vec()) else {
            return Err(TestCaseError::fail("no pieces"));
        };
        prop_assert_eq!(pieces.len() as u64, mi.piece_count * 20);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn bencode_values_round_trip(v in value()) {
        let b = encode(&v);
        prop_assert_eq!(decode(&b).unwrap().0, v);
    }

    #[test]
    fn any_bytes_as_bencode_or_metainfo_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
        decoded_is_canonical(&b)?;
        accepted_metainfo_is_consistent(&b, None)?;
    }

    #[test]
    fn accepted_bencode_is_canonical(b in bencodeish()) {
        decoded_is_canonical(&b)?;
    }

    #[test]
    fn mutated_bencode_is_refused_or_canonical(v in value(), ms in mutations()) {
        decoded_is_canonical(&mutate(encode(&v), &ms))?;
    }

    #[test]
    fn torrents_we_write_pass_validation((t, length, pl) in torrent()) {
        let mi = validate(&t, Some(length)).unwrap();
        prop_assert_eq!(mi.length, length);
        prop_assert_eq!(mi.piece_length, pl);
        accepted_metainfo_is_consistent(&t, Some(length))?;
    }

    #[test]
    fn mutated_torrents_are_refused_or_consistent((t, length, _pl) in torrent(), ms in mutations()) {
        let b = mutate(t, &ms);
        decoded_is_canonical(&b)?;
        accepted_metainfo_is_consistent(&b, Some(length))?;
        accepted_metainfo_is_consistent(&b, None)?;
    }
}

#[test]
fn deep_or_huge_bencode_is_refused_without_panicking() {
    for depth in [metainfo::MAX_DEPTH + 2, 100_000] {
        let b = format!("{}{}", "l".repeat(depth), "e".repeat(depth));
        assert_eq!(decode(b.as_bytes()).unwrap_err(), metainfo::MetainfoError::TooDeep);
    }
    assert!(decode(b"99999999999:x").is_err());
    // Only canonical numbers: Rust's integer parsing alone would take a '+' (found by
    // accepted_bencode_is_canonical).
    for b in [&b"i+5e"[..], b"li+0ee", b"d+1:a1:be", b"+1:a", b"i 5e", b"i5 e"] {
        assert!(decode(b).is_err(), "{}", String::from_utf8_lossy(b));
    }
    assert!(decode(b"i99999999999999999999e").is_err());
    let big = vec![b'0'; metainfo::MAX_METAINFO_BYTES + 1];
    assert!(matches!(decode(&big), Err(metainfo::MetainfoError::TooLarge(_))));
}

// ---------------------------------------------------------------------------------------------
// Manifests

/// Peers are IP literals here: a host name would make validation resolve it (no network here).
fn peer() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| std::net::SocketAddr::from((ip, port)).to_string()),
        (any::<[u16; 8]>(), any::<u16>()).prop_map(|(ip, port)| std::net::SocketAddr::from((ip, port)).to_string()),
    ]
}

/// Trackers as manifests may name them: http(s) or udp URLs of a plain host.
fn tracker() -> impl Strategy<Value = String> {
    "(http|https|udp)://[a-z0-9][a-z0-9.-]{0,20}(:[0-9]{1,5})?(/[a-zA-Z0-9._~/-]{0,15})?"
}

fn manifest() -> impl Strategy<Value = Manifest> {
    (
        "[a-zA-Z0-9][a-zA-Z0-9._+-]{0,40}",
        any::<bool>(),
        1u64..u64::MAX,
        any::<u64>(),
        "[0-9a-f]{64}",
        "[0-9a-f]{40}",
        14u32..=26,
        proptest::collection::vec(peer(), 0..3),
        proptest::collection::vec(tracker(), 0..3),
    )
        .prop_map(|(name, qcow2, size, vsize, sha256, info_hash, bits, peers, trackers)| {
            let format = if qcow2 { "qcow2" } else { "raw" };
            Manifest {
                version: 1,
                magnet: magnet(&info_hash, &name, &trackers, &peers),
                name,
                format: format.into(),
                size,
                virtual_size: if qcow2 { vsize } else { size },
                sha256,
                info_hash,
                piece_length: 1 << bits,
                peers,
                trackers,
                torrent_hex: None,
            }
        })
}

/// A manifest that carries its torrent.
fn manifest_with_torrent() -> impl Strategy<Value = Manifest> {
    (manifest(), torrent()).prop_map(|(m, (t, length, pl))| {
        let info_hash = validate(&t, Some(length)).unwrap().info_hash;
        Manifest {
            size: length,
            virtual_size: length,
            format: "raw".into(),
            piece_length: pl,
            magnet: magnet(&info_hash, &m.name, &m.trackers, &m.peers),
            info_hash,
            torrent_hex: Some(hex::encode(t)),
            ..m
        }
    })
}

/// A manifest that parsed is one that validates, whose name is safe as a file name, and which
/// writes back to itself; a torrent it carries is for it.
fn accepted_manifest_is_consistent(text: &str) -> Result<(), TestCaseError> {
    if let Ok(m) = Manifest::from_json(text) {
        prop_assert!(m.validate().is_ok());
        prop_assert!(validate_name(&m.name).is_ok());
        prop_assert!(!m.name.contains('/') && !m.name.starts_with('.'));
        prop_assert!(m.format == "qcow2" || m.format == "raw");
        prop_assert!(piece_length_ok(m.piece_length));
        if let Some(t) = m.torrent_bytes() {
            let mi = validate(&t, Some(m.size)).unwrap();
            prop_assert_eq!(&mi.info_hash, &m.info_hash);
            prop_assert_eq!(mi.piece_length, m.piece_length);
        }
        let again = serde_json::to_string(&m).unwrap();
        prop_assert_eq!(Manifest::from_json(&again).unwrap(), m);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn valid_manifests_round_trip(m in prop_oneof![manifest(), manifest_with_torrent()]) {
        let text = serde_json::to_string(&m).unwrap();
        prop_assert_eq!(Manifest::from_json(&text).unwrap(), m);
    }

    #[test]
    fn a_magnet_naming_another_info_hash_is_refused(m in manifest(), other in "[0-9a-f]{40}") {
        prop_assume!(other != m.info_hash);
        let bad = Manifest { magnet: magnet(&other, &m.name, &m.trackers, &m.peers), ..m };
        prop_assert!(Manifest::from_json(&serde_json::to_string(&bad).unwrap()).is_err());
    }

    #[test]
    fn any_text_as_a_manifest_never_panics(s in any::<String>()) {
        accepted_manifest_is_consistent(&s)?;
    }

    /// Mutated without peers (a mutated IP literal could become a host name to resolve).
    #[test]
    fn mutated_manifests_are_refused_or_consistent(
        m in prop_oneof![manifest(), manifest_with_torrent()],
        ms in mutations(),
    ) {
        let m = Manifest { peers: Vec::new(), ..m };
        let text = mutate(serde_json::to_vec(&m).unwrap(), &ms);
        accepted_manifest_is_consistent(&String::from_utf8_lossy(&text))?;
    }

    /// Every field replaced by a value of any JSON type: refused or consistent.
    #[test]
    fn manifests_with_a_field_of_any_value_are_refused_or_consistent(
        m in manifest(),
        field in proptest::sample::select(vec![
            "version", "name", "format", "size", "virtual_size", "sha256", "info_hash",
            "piece_length", "magnet", "trackers", "torrent_hex", "extra",
        ]),
        v in json_value(),
    ) {
        let mut obj = serde_json::to_value(Manifest { peers: Vec::new(), ..m }).unwrap();
        obj[field] = v;
        accepted_manifest_is_consistent(&obj.to_string())?;
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
        "[0-9a-f]{0,80}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m: BTreeMap<String, serde_json::Value>| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// The qcow2 header and raw sniffing

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// A sound qcow2 header (version 2 or 3) and the file size it describes: refcount table in
/// cluster 1, L1 table in cluster 3, four clusters.
fn qcow2() -> impl Strategy<Value = (Vec<u8>, u64)> {
    (any::<bool>(), 9u32..=21, any::<u64>(), 0u32..=8, proptest::sample::select(vec![0u64, 1 << 3, 1 << 4, 0b11 << 3]))
        .prop_map(|(v3, bits, vsize, l1_size, incompat)| {
            let cluster = 1u64 << bits;
            let head_len = cluster.min(4096) as usize;
            let mut h = vec![0u8; head_len];
            h[0..4].copy_from_slice(QCOW2_MAGIC);
            h[4..8].copy_from_slice(&(if v3 { 3u32 } else { 2 }).to_be_bytes());
            h[20..24].copy_from_slice(&bits.to_be_bytes());
            h[24..32].copy_from_slice(&vsize.to_be_bytes());
            h[36..40].copy_from_slice(&l1_size.to_be_bytes());
            h[40..48].copy_from_slice(&(3 * cluster).to_be_bytes());
            h[48..56].copy_from_slice(&cluster.to_be_bytes());
            h[56..60].copy_from_slice(&1u32.to_be_bytes());
            if v3 {
                h[72..80].copy_from_slice(&incompat.to_be_bytes());
                h[96..100].copy_from_slice(&4u32.to_be_bytes());
                // Bit 3 (compression type) comes with the compression_type field set to zstd.
                let zstd = incompat & (1 << 3) != 0;
                h[100..104].copy_from_slice(&(if zstd { 112u32 } else { 104 }).to_be_bytes());
                h[104] = u8::from(zstd);
            }
            (h, 4 * cluster)
        })
}

/// What an accepted header must say, read independently of the parser.
fn accepted_header_is_sound(head: &[u8], file_size: u64) -> Result<(), TestCaseError> {
    if let Ok(info) = check_qcow2_header(head, file_size) {
        prop_assert_eq!(&head[0..4], QCOW2_MAGIC);
        let version = be32(head, 4);
        prop_assert!(version == 2 || version == 3);
        prop_assert_eq!(info.version, version);
        prop_assert_eq!(be64(head, 8), 0, "a backing file offset");
        prop_assert!((9..=21).contains(&be32(head, 20)));
        prop_assert_eq!(info.cluster_bits, be32(head, 20));
        prop_assert_eq!(info.virtual_size, be64(head, 24));
        prop_assert_eq!(be32(head, 32), 0, "encrypted");
        prop_assert_eq!(be32(head, 60), 0, "internal snapshots");
        let cluster = 1u64 << info.cluster_bits;
        let l1_end = be64(head, 40).checked_add(u64::from(be32(head, 36)) * 8);
        prop_assert!(l1_end.is_some_and(|e| e <= file_size));
        prop_assert!(be64(head, 48) != 0 && be64(head, 48).is_multiple_of(cluster));
        if version == 3 {
            prop_assert_eq!(be64(head, 72) & !((1 << 3) | (1 << 4)), 0, "an incompatible feature");
            // Bit 3 exactly when the compression type (present past a 104-byte header) is zstd.
            let compression = if be32(head, 100) > 104 { head[104] } else { 0 };
            prop_assert!(compression <= 1, "compression type {}", compression);
            prop_assert_eq!(be64(head, 72) & (1 << 3) != 0, compression == 1, "bit 3 and the compression type");
        }
    }
    Ok(())
}

/// The first bytes of every format QEMU probes that a raw master must not look like.
const MAGICS: [&[u8]; 6] = [b"QFI\xfb", b"QED\0", b"KDMV", b"# Disk DescriptorFile", b"vhdxfile", b"LUKS\xba\xbe"];

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sound_qcow2_headers_pass((h, size) in qcow2()) {
        let info = check_qcow2_header(&h, size).unwrap();
        prop_assert_eq!(info.virtual_size, be64(&h, 24));
        accepted_header_is_sound(&h, size)?;
    }

    #[test]
    fn any_bytes_as_a_qcow2_header_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256), size in any::<u64>()) {
        accepted_header_is_sound(&b, size)?;
        let _ = sniff_raw(&b);
    }

    #[test]
    fn mutated_qcow2_headers_are_refused_or_sound((h, size) in qcow2(), ms in mutations(), size_delta in -4096i64..4096) {
        let h = mutate(h, &ms);
        accepted_header_is_sound(&h, size)?;
        accepted_header_is_sound(&h, size.saturating_add_signed(size_delta))?;
        accepted_header_is_sound(&h, u64::MAX)?;
    }

    /// Field values of every width at every field offset: refused or sound.
    #[test]
    fn qcow2_headers_with_any_field_value_are_refused_or_sound((h, size) in qcow2(), off in 0usize..120, v in any::<u64>()) {
        let mut h = h;
        let end = (off + 8).min(h.len());
        h[off..end].copy_from_slice(&v.to_be_bytes()[..end - off]);
        accepted_header_is_sound(&h, size)?;
    }

    #[test]
    fn raw_masters_that_start_like_another_format_are_refused(i in 0..MAGICS.len(), rest in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut b = MAGICS[i].to_vec();
        b.extend_from_slice(&rest);
        prop_assert!(sniff_raw(&b).is_err());
        // A qcow2 header is refused as raw whatever follows, and a raw disk of zeros is fine.
        prop_assert!(sniff_raw(&vec![0u8; rest.len()]).is_ok());
    }
}
