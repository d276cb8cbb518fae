//! Discovery on a LAN of network namespaces (the project's own test hosts on one bridge).
#![allow(clippy::unwrap_used)]

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
