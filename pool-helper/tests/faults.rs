//! Faults: a peer sending corrupt pieces, a fetch killed and restarted, a full filesystem, the
//! origin dying mid-transfer.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vcc_tests::*;

#[test]
fn corrupt_pieces_from_a_peer_are_detected_and_the_master_completes_from_honest_peers() {
    let pa = Pool::new("a");
    let size = 8 << 20;
    let src = pa.raw_master("honest.raw", size);
    let mut a = Instance::new(&["--upload-limit", "2000000"]);
    a.serve();
    let man = a.publish(&pa, "honest.raw");
    a.wait_seeding("honest.raw");
    // aria2c seeds a copy with a flipped byte in every piece, claiming it is complete.
    let d = tempfile::tempdir().unwrap();
    let mut bad = std::fs::read(&src).unwrap();
    let pl = manifest(&man)["piece_length"].as_u64().unwrap() as usize;
    for i in (0..bad.len()).step_by(pl) {
        bad[i + 100] ^= 0xff;
    }
    std::fs::write(d.path().join("honest.raw"), &bad).unwrap();
    let liar = free_port();
    let _aria = aria2c_seed_unverified(liar, d.path(), &man.with_extension("torrent"));
    std::thread::sleep(Duration::from_secs(2));
    let pb = Pool::new("b");
    let b = Instance::new(&["--peer", &format!("127.0.0.1:{liar}")]);
    let o = b.run(&["fetch", "--pool", &pb.name, man.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("did not validate"), "librqbit detected the corrupt pieces: {err}");
    assert!(same_file(&src, &pb.path("honest.raw")), "no bad byte published");
}

#[test]
fn a_fetch_killed_midway_resumes_after_restart_and_the_pool_never_shows_partial_data() {
    let pa = Pool::new("a");
    let size = 16 << 20;
    let src = pa.raw_master("resume.raw", size);
    let mut a = Instance::new(&[]);
    a.serve();
    let man = a.publish(&pa, "resume.raw");
    a.wait_seeding("resume.raw");
    let pb = Pool::new("b");
    let b = Instance::new(&["--download-limit", "2000000"]);
    let mut child = b
        .cmd(&["--json", "fetch", "--pool", &pb.name, man.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["event"] == "progress" && v["done_bytes"].as_u64().unwrap() > 4 << 20 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::read_dir(&pb.dir).unwrap().count(), 0, "nothing in the pool after the kill");
    assert!(b.state.path().join("staging").join(&pb.name).join("resume.raw.part").exists());

    let mut b = b;
    b.extra.clear(); // restart without the download limit
    let out = b.run_ok(&["--json", "fetch", "--pool", &pb.name, man.to_str().unwrap()]);
    let started: serde_json::Value = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["event"] == "started")
        .unwrap();
    let have = started["have_bytes"].as_u64().unwrap();
    assert!(have >= 4 << 20, "resumed with the verified pieces kept ({have} bytes)");
    assert!(out.lines().last().unwrap().contains("\"state\":\"fetched\""), "{out}");
    assert!(same_file(&src, &pb.path("resume.raw")));
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_filesystem_is_a_clear_error_with_staging_cleaned_and_nothing_in_the_pool() {
    let pa = Pool::new("a");
    pa.raw_master("big.raw", 16 << 20);
    let a = Instance::new(&[]);
    let man = a.publish(&pa, "big.raw");
    let mnt = Tmpfs(tempfile::Builder::new().prefix("ph-tmpfs-").tempdir_in("/var/tmp").unwrap());
    run_ok("mount", &["-t", "tmpfs", "-o", "size=6m", "tmpfs", mnt.0.path().to_str().unwrap()]);
    let dir = mnt.0.path().join("pool");
    std::fs::create_dir(&dir).unwrap();
    let pb = Pool::at("tiny", dir.clone(), None);
    let b = Instance::new(&[]);
    let o = b.run(&["fetch", "--pool", &pb.name, man.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("disk full"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing in the pool");
    let staging = mnt.0.path().join(".pool-helper-staging").join(&pb.name);
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0, "staging cleaned");
    drop(pb);
}

#[test]
fn the_origin_dying_mid_transfer_does_not_stop_a_fetch_when_another_seed_exists() {
    let size = 16 << 20;
    let pa = Pool::new("a");
    let src = pa.raw_master("survive.raw", size);
    let mut a = Instance::new(&["--upload-limit", "2000000"]);
    a.serve();
    let man = a.publish(&pa, "survive.raw");
    // A second full seed: the same file published on another host gives the same torrent.
    let ps = Pool::new("s");
    std::fs::copy(&src, ps.path("survive.raw")).unwrap();
    ps.refresh();
    let mut s = Instance::new(&["--upload-limit", "2000000"]);
    s.serve();
    let man_s = s.publish(&ps, "survive.raw");
    assert_eq!(manifest(&man)["info_hash"], manifest(&man_s)["info_hash"]);
    a.wait_seeding("survive.raw");
    s.wait_seeding("survive.raw");

    let pb = Pool::new("b");
    let b = Instance::new(&["--peer", &s.addr()]);
    let mut child = b
        .cmd(&["--json", "fetch", "--pool", &pb.name, man.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let start = Instant::now();
    for line in lines.by_ref() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["event"] == "progress" && v["done_bytes"].as_u64().unwrap() > 2 << 20 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
    }
    let from_a = a.master_status("survive.raw")["uploaded_bytes"].as_u64().unwrap();
    a.kill_daemon();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{rest:?}");
    assert!(rest.last().unwrap().contains("\"state\":\"fetched\""), "{rest:?}");
    assert!(from_a > 0, "the origin took part before it died");
    assert!(same_file(&src, &pb.path("survive.raw")));
}

/// A peer (aria2c) seeds `file` under a manifest built for it; returns (manifest path, seeder).
fn hostile_seed(dir: &std::path::Path, file: &str, format: &str, virtual_size: u64) -> (std::path::PathBuf, Bg) {
    let path = dir.join(file);
    let h = pool_helper::metainfo::create(&path, file, 16384, &[]).unwrap();
    std::fs::write(dir.join("t.torrent"), &h.torrent).unwrap();
    let port = free_port();
    let m = serde_json::json!({
        "version": 1, "name": file, "format": format, "size": h.size, "virtual_size": virtual_size,
        "sha256": h.sha256, "info_hash": h.info_hash, "piece_length": 16384,
        "magnet": format!("magnet:?xt=urn:btih:{}", h.info_hash), "peers": [format!("127.0.0.1:{port}")],
        "trackers": [], "torrent_hex": h.torrent.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    });
    let man = dir.join("m.json");
    std::fs::write(&man, m.to_string()).unwrap();
    let seed = aria2c_seed_unverified(port, dir, &dir.join("t.torrent"));
    std::thread::sleep(Duration::from_secs(2));
    (man, seed)
}

fn fetch_must_be_refused(man: &std::path::Path, name: &str, word: &str) {
    let pb = Pool::new("b");
    let b = Instance::new(&[]);
    let o = b.run(&["fetch", "--pool", &pb.name, man.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(word) && err.contains("nothing was put in the pool"), "{err}");
    assert_eq!(std::fs::read_dir(&pb.dir).unwrap().count(), 0, "nothing in the pool");
    let staging = b.state.path().join("staging").join(&pb.name);
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0, "staging cleaned");
    assert!(!pb.volumes().contains(&name.to_string()));
}

#[test]
fn a_downloaded_qcow2_naming_a_backing_file_is_refused_and_never_reaches_the_pool() {
    let d = tempfile::tempdir().unwrap();
    let evil = d.path().join("evil.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", evil.to_str().unwrap(), "1M"],
    );
    let (man, _seed) = hostile_seed(d.path(), "evil.qcow2", "qcow2", 1 << 20);
    fetch_must_be_refused(&man, "evil.qcow2", "backing file");
}

#[test]
fn a_qcow2_declared_raw_is_refused_and_never_reaches_the_pool() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disguised.raw");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    let size = std::fs::metadata(&img).unwrap().len();
    let (man, _seed) = hostile_seed(d.path(), "disguised.raw", "raw", size);
    fetch_must_be_refused(&man, "disguised.raw", "starts like a qcow2");
}
