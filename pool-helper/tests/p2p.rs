//! Real librqbit peers on 127.0.0.1, real libvirt dir pools.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vcc_tests::*;

/// Polls `pool` until `stop`: every file seen must be the complete, read-only master.
fn watch_pool(
    dir: std::path::PathBuf,
    size: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u32, Vec<String>)> {
    std::thread::spawn(move || {
        let mut seen = 0;
        let mut bad = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let Ok(md) = std::fs::symlink_metadata(e.path()) else { continue };
                seen += 1;
                use std::os::unix::fs::PermissionsExt;
                if md.len() != size || md.permissions().mode() & 0o222 != 0 || !md.is_file() {
                    bad.push(format!("{:?} len {} mode {:o}", e.file_name(), md.len(), md.permissions().mode()));
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (seen, bad)
    })
}

#[test]
fn publish_then_fetch_into_another_pool_is_identical_read_only_and_never_partial() {
    let pa = Pool::new("a");
    let pb = Pool::new("b");
    let size = 24 << 20;
    let src = pa.qcow2_master("base.qcow2", size);
    let mut a = Instance::new(&[]);
    a.serve();
    let man = a.publish(&pa, "base.qcow2");
    assert_eq!(mode(&src), 0o444, "publish makes the master read-only");
    a.wait_seeding("base.qcow2");
    let modes = open_modes(a.daemon.as_ref().unwrap().id(), &src);
    assert!(!modes.is_empty() && modes.iter().all(|&m| m == 0), "the seeder holds the master read-only: {modes:?}");
    let m = manifest(&man);
    assert_eq!(m["format"], "qcow2");
    assert_eq!(m["virtual_size"], size as u64);
    assert_eq!(m["peers"][0], a.addr());

    let b = Instance::new(&["--download-limit", "8000000"]);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_pool(pb.dir.clone(), m["size"].as_u64().unwrap(), stop.clone());
    let out = b.run_ok(&["--json", "fetch", "--pool", &pb.name, man.to_str().unwrap()]);
    stop.store(true, Ordering::SeqCst);
    let (seen, bad) = watcher.join().unwrap();
    assert!(bad.is_empty(), "partial or writable file seen in the pool: {bad:?}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["ok"], true);
    assert_eq!(last["state"], "fetched");
    let dest = pb.path("base.qcow2");
    assert_eq!(last["path"], dest.to_str().unwrap());
    assert!(seen > 0, "the watcher saw the master arrive");
    assert!(out.lines().filter(|l| l.contains("\"progress\"")).count() >= 2, "progress events: {out}");
    assert!(same_file(&src, &dest), "byte-identical");
    assert_eq!(mode(&dest), 0o444);
    assert!(pb.volumes().contains(&"base.qcow2".to_string()));
    let staging = b.state.path().join("staging").join(&pb.name);
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0, "staging is empty afterwards");

    // A second fetch finds it present and verified.
    let out = b.run_ok(&["--json", "fetch", "--pool", &pb.name, man.to_str().unwrap()]);
    assert!(out.contains("\"state\":\"present\""), "{out}");
}

#[test]
fn swarm_two_leechers_get_identical_copies_and_exchange_pieces() {
    let pa = Pool::new("a");
    let (pb, pc) = (Pool::new("b"), Pool::new("c"));
    let size = 32 << 20;
    let src = pa.raw_master("swarm.raw", size);
    // The origin uploads slowly, so the leechers must serve each other.
    let mut a = Instance::new(&["--upload-limit", "3000000"]);
    a.serve();
    let man = a.publish(&pa, "swarm.raw");
    a.wait_seeding("swarm.raw");
    let mut b = Instance::new(&[]);
    let mut c = Instance::new(&[]);
    let (bp, cp) = (b.addr(), c.addr());
    b.extra.extend(["--peer".to_string(), cp]);
    c.extra.extend(["--peer".to_string(), bp]);
    b.serve();
    c.serve();
    let req = |pool: &str| serde_json::json!({"op": "ensure", "pool": pool, "manifest_path": man.to_str().unwrap()});
    let (rb, rc) = (req(&pb.name), req(&pc.name));
    let (sb, sc) = (b.socket(), c.socket());
    // C starts a second after B. (Stock librqbit picks pieces in order, so two leechers started
    // together want the same pieces and trade nothing; the vendored patch picks them at random.)
    let tb = std::thread::spawn(move || request(&sb, &rb));
    std::thread::sleep(Duration::from_secs(1));
    let tc = std::thread::spawn(move || request(&sc, &rc));
    let (eb, fb) = tb.join().unwrap();
    let (_, fc) = tc.join().unwrap();
    assert_eq!(fb["ok"], true, "{fb}\n{}", b.daemon_log());
    assert_eq!(fc["ok"], true, "{fc}\n{}", c.daemon_log());
    assert!(!eb.is_empty() && eb[0]["event"] == "progress", "{eb:?}");
    assert!(same_file(&src, &pb.path("swarm.raw")));
    assert!(same_file(&src, &pc.path("swarm.raw")));
    let up_b = b.master_status("swarm.raw")["uploaded_bytes"].as_u64().unwrap();
    let up_c = c.master_status("swarm.raw")["uploaded_bytes"].as_u64().unwrap();
    let up_a = a.master_status("swarm.raw")["uploaded_bytes"].as_u64().unwrap();
    eprintln!("uploaded: origin {up_a}, b {up_b}, c {up_c} (size {size})");
    assert!(up_b > 0 && up_c > 0, "the leechers served each other, both ways (b {up_b}, c {up_c})");
    assert!(up_a < 2 * size as u64, "origin uploaded less than two copies ({up_a})");
    assert_eq!(b.master_status("swarm.raw")["state"], "seeding");
}

#[test]
fn a_manifest_without_metainfo_is_fetched_by_magnet_with_metadata_from_the_peer() {
    let pa = Pool::new("a");
    let size = 4 << 20;
    let src = pa.raw_master("magnet.raw", size);
    let mut a = Instance::new(&[]);
    a.serve();
    let man = a.publish(&pa, "magnet.raw");
    a.wait_seeding("magnet.raw");
    let mut m = manifest(&man);
    m.as_object_mut().unwrap().remove("torrent_hex");
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("magnet.json");
    std::fs::write(&bare, m.to_string()).unwrap();
    let pb = Pool::new("b");
    let b = Instance::new(&[]);
    let out = b.run_ok(&["--json", "fetch", "--pool", &pb.name, bare.to_str().unwrap()]);
    assert!(out.lines().last().unwrap().contains("\"state\":\"fetched\""), "{out}");
    assert!(same_file(&src, &pb.path("magnet.raw")));
}
