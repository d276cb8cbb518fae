//! Discovery on a LAN of network namespaces (the project's own test hosts on one bridge).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use vcc_tests::*;

#[test]
fn a_master_is_found_by_local_service_discovery_alone() {
    let lan = Lan::new(2);
    let pa = Pool::new("a");
    let src = pa.raw_master("lsd.raw", 4 << 20);
    let mut a = Instance::new(&[]);
    a.netns = Some(lan.hosts[0].0.clone());
    a.advertise = lan.hosts[0].1.clone();
    a.lsd = true;
    let man = a.publish(&pa, "lsd.raw");
    a.serve();
    a.wait_seeding("lsd.raw");
    // No peer hints, no tracker: only BEP 14 multicast can tell B where the master is.
    let mut m = manifest(&man);
    m["peers"] = serde_json::json!([]);
    m["magnet"] = format!("magnet:?xt=urn:btih:{}", m["info_hash"].as_str().unwrap()).into();
    let d = tempfile::tempdir().unwrap();
    let bare = d.path().join("lsd.json");
    std::fs::write(&bare, m.to_string()).unwrap();
    let pb = Pool::new("b");
    let mut b = Instance::new(&[]);
    b.netns = Some(lan.hosts[1].0.clone());
    b.advertise = lan.hosts[1].1.clone();
    b.lsd = true;
    b.run_ok(&["fetch", "--pool", &pb.name, bare.to_str().unwrap()]);
    assert!(same_file(&src, &pb.path("lsd.raw")));
    let up = a.master_status("lsd.raw")["uploaded_bytes"].as_u64().unwrap();
    assert!(up >= 4 << 20, "the origin in the other namespace sent it ({up})");
}

/// Host A (one namespace) publishes and seeds; host B (another), whose config names A as a peer
/// and which has no manifest file, is asked for the master by identity only.
fn a_publishes_b_knows_a_as_peer(tag: &str, qcow2: bool) -> (Lan, Instance, Pool, Instance, Pool, PathBuf) {
    let lan = Lan::new(2);
    let pa = Pool::new(&format!("{tag}a"));
    let name = if qcow2 { "id.qcow2" } else { "id.raw" };
    if qcow2 {
        pa.qcow2_master(name, 3 << 20);
    } else {
        pa.raw_master(name, 5 << 20);
    }
    let mut a = Instance::new(&[]);
    a.netns = Some(lan.hosts[0].0.clone());
    a.advertise = lan.hosts[0].1.clone();
    let man = a.publish(&pa, name);
    a.serve();
    a.wait_seeding(name);
    let pb = Pool::new(&format!("{tag}b"));
    let peer = format!("{}:{}", lan.hosts[0].1, a.port);
    let mut b = Instance::new(&["--peer", &peer]);
    b.netns = Some(lan.hosts[1].0.clone());
    b.advertise = lan.hosts[1].1.clone();
    b.serve();
    (lan, a, pa, b, pb, man)
}

/// The identity a domain's metadata records for the master of manifest `man`.
fn identity(man: &Path) -> serde_json::Value {
    let m = manifest(man);
    serde_json::json!({
        "name": m["name"], "format": m["format"], "sha256": m["sha256"],
        "info_hash": m["info_hash"], "virtual_size": m["virtual_size"],
    })
}

#[test]
fn a_master_named_by_identity_only_comes_from_another_host_by_magnet_verified() {
    for qcow2 in [false, true] {
        let (_lan, a, pa, b, pb, man) = a_publishes_b_knows_a_as_peer("idok", qcow2);
        let id = identity(&man);
        let name = id["name"].as_str().unwrap().to_string();
        let (_, fin) = b.request(&serde_json::json!({"op": "ensure", "pool": pb.name, "identity": id}));
        assert_eq!(fin["ok"], true, "{fin}\n{}", b.daemon_log());
        assert_eq!(fin["state"], "fetched", "{fin}");
        assert_eq!(fin["path"], pb.path(&name).display().to_string());
        assert!(same_file(&pa.path(&name), &pb.path(&name)), "byte-identical");
        assert!(pb.volumes().contains(&name), "the pool lists it");
        let up = a.master_status(&name)["uploaded_bytes"].as_u64().unwrap();
        assert!(up >= std::fs::metadata(pa.path(&name)).unwrap().len(), "A sent it ({up})");
        // B seeds it on, and answers the next request at once.
        let (_, fin) = b.request(&serde_json::json!({"op": "ensure", "pool": pb.name, "identity": id}));
        assert_eq!(fin["state"], "present", "{fin}");
    }
}

#[test]
fn an_identity_with_a_wrong_sha256_fails_with_one_clear_line_and_nothing_in_the_pool() {
    let (_lan, _a, _pa, b, pb, man) = a_publishes_b_knows_a_as_peer("idbad", false);
    let mut id = identity(&man);
    id["sha256"] = "0".repeat(64).into();
    let (_, fin) = b.request(&serde_json::json!({"op": "ensure", "pool": pb.name, "identity": id}));
    assert_eq!(fin["ok"], false, "{fin}");
    let e = fin["error"].as_str().unwrap();
    assert!(e.starts_with("'id.raw' failed verification (nothing was put in the pool): "), "{e}");
    assert!(e.contains(&"0".repeat(64)) && !e.contains('\n'), "{e}");
    let left: Vec<_> = std::fs::read_dir(&pb.dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "nothing in the pool: {left:?}");
    assert!(pb.volumes().is_empty());
    // A name the trusted catalog does not know (nobody announced one): refused, saying so.
    let (_, fin) = b.request(&serde_json::json!({"op": "ensure", "pool": pb.name, "name": "id.raw"}));
    let e = fin["error"].as_str().unwrap();
    assert!(e.starts_with("no trusted master named 'id.raw' in the LAN catalog"), "{e}");
}

#[test]
fn a_name_resolves_through_the_signed_catalog_and_the_master_comes_from_its_announcer() {
    let lan = Lan::new(2);
    let keys = tempfile::tempdir().unwrap();
    let (alice, allowed) = signer(keys.path(), "alice@example.com");
    let allowed = allowed.to_str().unwrap();
    // A signs what it publishes; B trusts alice and has no peer, tracker or manifest: the catalog
    // (A's announcement) is all it knows.
    let pa = Pool::new("cna");
    let src = pa.raw_master("named.raw", 3 << 20);
    let mut a = Instance::new(&["--allowed-signers", allowed, "--signing-key", alice.to_str().unwrap()]);
    a.netns = Some(lan.hosts[0].0.clone());
    a.advertise = lan.hosts[0].1.clone();
    a.serve();
    let pb = Pool::new("cnb");
    let mut b = Instance::new(&["--allowed-signers", allowed]);
    b.netns = Some(lan.hosts[1].0.clone());
    b.advertise = lan.hosts[1].1.clone();
    b.serve();
    let by_name = serde_json::json!({"op": "ensure", "pool": pb.name, "name": "named.raw"});
    let (_, fin) = b.request(&by_name);
    assert!(fin["error"].as_str().unwrap().starts_with("no trusted master named 'named.raw'"), "{fin}");

    let man = a.publish(&pa, "named.raw");
    let start = std::time::Instant::now();
    loop {
        let (_, c) = b.request(&serde_json::json!({"op": "catalog"}));
        if c["catalog"].as_array().is_some_and(|l| l.iter().any(|e| e["name"] == "named.raw")) {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "not in B's catalog: {c}\n{}", b.daemon_log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (_, fin) = b.request(&by_name);
    assert_eq!(
        (fin["ok"].as_bool(), fin["state"].as_str()),
        (Some(true), Some("fetched")),
        "{fin}\n{}",
        b.daemon_log()
    );
    assert!(same_file(&src, &pb.path("named.raw")), "byte-identical");
    // By identity without an info-hash: the catalog's entry, already here.
    let m = manifest(&man);
    let id = serde_json::json!({"name": "named.raw", "format": "raw", "sha256": m["sha256"]});
    let (_, fin) = b.request(&serde_json::json!({"op": "ensure", "pool": pb.name, "identity": id}));
    assert_eq!(fin["state"], "present", "{fin}");
}
