//! Hostile peers (`vcc_tests::hostile_peer`) against a fetching and a seeding daemon: a peer that
//! speaks the wire protocol wrongly in every way the module knows must not panic, kill or wedge
//! pool-helper. `VCC_HOSTILE_ROUNDS` repeats the scenarios (docs/testing.md).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use sha1::{Digest as _, Sha1};
use vcc_tests::*;

/// A manifest for fetching by magnet only: no `torrent_hex`, a bare magnet (no `x.pe` hints),
/// exactly `peers`.
fn magnet_only(m: &serde_json::Value, peers: &[String]) -> serde_json::Value {
    let mut m = m.clone();
    m.as_object_mut().unwrap().remove("torrent_hex");
    m["magnet"] = format!("magnet:?xt=urn:btih:{}", m["info_hash"].as_str().unwrap()).into();
    m["peers"] = serde_json::json!(peers);
    m["trackers"] = serde_json::json!([]);
    m
}

fn ensure(b: &Instance, pool: &Pool, m: &serde_json::Value) -> (serde_json::Value, Duration) {
    let start = Instant::now();
    let (_, fin) = b.request(&serde_json::json!({"op": "ensure", "pool": pool.name, "manifest": m}));
    (fin, start.elapsed())
}

fn assert_alive(b: &mut Instance) {
    assert!(b.daemon.as_mut().unwrap().try_wait().unwrap().is_none(), "daemon died: {}", b.daemon_log());
    assert!(!b.daemon_log().contains("panicked"), "a task panicked: {}", b.daemon_log());
}

#[test]
fn a_magnet_fetch_from_hostile_peers_only_fails_with_an_answer_and_a_good_seed_then_completes_it() {
    let pa = Pool::new("a");
    let size = 4 << 20;
    let src = pa.raw_master("hostile.raw", size);
    let mut a = Instance::new(&[]);
    a.serve();
    let man = a.publish(&pa, "hostile.raw");
    a.wait_seeding("hostile.raw");
    let m = manifest(&man);
    let hash = m["info_hash"].as_str().unwrap().to_string();
    let pieces = (size as u64).div_ceil(m["piece_length"].as_u64().unwrap()) as u32;
    let mut acts = misbehaviours(pieces);
    // Metadata that does not match the info-hash.
    acts.push(Act::ServeInfo(b"d6:lengthi1e4:name1:x12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaae".to_vec()));
    let hostile: Vec<HostilePeer> = acts.into_iter().map(|act| HostilePeer::listen(&hash, act)).collect();
    let peers: Vec<String> = hostile.iter().map(HostilePeer::peer).collect();

    let pb = Pool::new("b");
    let mut b = Instance::new(&[]);
    b.serve();
    for round in 0..rounds() {
        let (fin, took) = ensure(&b, &pb, &magnet_only(&m, &peers));
        assert_eq!(fin["ok"], false, "round {round}: {fin}\n{}", b.daemon_log());
        assert!(took < Duration::from_secs(150), "round {round}: a final answer, not forever 'fetching' ({took:?})");
        let e = fin["error"].as_str().unwrap();
        assert!(e.contains(&hash) && !e.contains('\n'), "round {round}: {e}");
        assert_alive(&mut b);
        assert_eq!(b.master_status("hostile.raw")["state"], "failed", "status answers");
    }
    for (p, act) in hostile.iter().zip(misbehaviours(pieces).iter().map(Act::name).chain(["serves metadata"])) {
        assert!(p.connections() > 0, "the daemon met the peer that does '{act}'");
    }
    assert_eq!(std::fs::read_dir(&pb.dir).unwrap().count(), 0, "nothing in the pool");

    // A good seed among the same hostile peers: the fetch completes.
    let mut with_seed = peers.clone();
    with_seed.push(a.addr());
    // The hostile peers take part again: in the metadata phase and, once the metadata came from
    // the seed, in the download (bitfields, HAVEs, requests, pieces; 2 more connections each seen).
    let (fin, _) = ensure(&b, &pb, &magnet_only(&m, &with_seed));
    assert_eq!(fin["ok"], true, "{fin}\n{}", b.daemon_log());
    assert_eq!(fin["state"], "fetched", "{fin}");
    assert!(same_file(&src, &pb.path("hostile.raw")));
    assert_alive(&mut b);
    assert_alive(&mut a);
}

/// A single-file info dict as bencode and its info-hash (hex).
fn info_dict(length: u64, piece_length: u64, pieces: usize) -> (Vec<u8>, String) {
    let mut b =
        format!("d6:lengthi{length}e4:name7:bad.raw12:piece lengthi{piece_length}e6:pieces{pieces}:").into_bytes();
    b.extend(std::iter::repeat_n(b'a', pieces));
    b.push(b'e');
    let hash = Sha1::digest(&b).iter().map(|x| format!("{x:02x}")).collect();
    (b, hash)
}

#[test]
fn an_info_dict_with_bad_arithmetic_from_peers_is_refused_with_its_reason_and_the_daemon_lives_on() {
    let pb = Pool::new("b");
    let mut b = Instance::new(&[]);
    b.serve();
    let cases = [
        ("piece length 0", info_dict(65536, 0, 80), "piece length 0"),
        ("piece length 2^40", info_dict(65536, 1 << 40, 20), "piece length 1099511627776"),
        ("length 2^50", info_dict(1 << 50, 16384, 20), "'pieces' is 20 bytes"),
        ("length 2^50, piece length 64 MiB", info_dict(1 << 50, 1 << 26, 20), "'pieces' is 20 bytes"),
    ];
    for _ in 0..rounds() {
        for (what, (info, hash), word) in &cases {
            let peer = HostilePeer::listen(hash, Act::ServeInfo(info.clone()));
            let m = serde_json::json!({
                "version": 1, "name": "bad.raw", "format": "raw", "size": 65536, "virtual_size": 65536,
                "sha256": "a".repeat(64), "info_hash": hash, "piece_length": 16384,
                "magnet": format!("magnet:?xt=urn:btih:{hash}"), "peers": [peer.peer()], "trackers": [],
            });
            let (fin, took) = ensure(&b, &pb, &m);
            assert_eq!(fin["ok"], false, "{what}: {fin}\n{}", b.daemon_log());
            let e = fin["error"].as_str().unwrap();
            assert!(e.contains("refused") && e.contains(word) && !e.contains('\n'), "{what}: {e}");
            assert!(took < Duration::from_secs(60), "{what}: refused at once, not after the magnet timeout ({took:?})");
            assert!(peer.connections() > 0, "{what}: the daemon asked the peer");
            assert_alive(&mut b);
            assert_eq!(b.master_status("bad.raw")["state"], "failed", "{what}");
        }
    }
}

#[test]
fn a_seeding_daemon_survives_every_misbehaviour_and_keeps_seeding_for_good_peers() {
    let pa = Pool::new("a");
    let size = 4 << 20;
    let src = pa.raw_master("target.raw", size);
    let mut a = Instance::new(&[]);
    a.serve();
    let man = a.publish(&pa, "target.raw");
    a.wait_seeding("target.raw");
    let m = manifest(&man);
    let hash = m["info_hash"].as_str().unwrap();
    let pieces = (size as u64).div_ceil(m["piece_length"].as_u64().unwrap()) as u32;
    let target = a.addr().parse().unwrap();
    for _ in 0..rounds() {
        for act in misbehaviours(pieces) {
            attack(target, hash, &act).unwrap_or_else(|e| panic!("'{}': cannot connect: {e}", act.name()));
            assert_alive(&mut a);
        }
    }
    assert_eq!(a.master_status("target.raw")["state"], "seeding", "{}", a.daemon_log());

    let pb = Pool::new("b");
    let b = Instance::new(&["--peer", &a.addr()]);
    let o = b.run(&["fetch", "--pool", &pb.name, man.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(same_file(&src, &pb.path("target.raw")));
    assert_alive(&mut a);
}
