//! The daemon and its control socket, driven like the libvirt hook drives it.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use vcc_tests::*;

#[test]
fn two_concurrent_ensures_share_one_download_and_a_third_finds_it_present() {
    let pa = Pool::new("a");
    let size = 16 << 20;
    let src = pa.raw_master("shared.raw", size);
    let mut a = Instance::new(&["--upload-limit", "6000000"]);
    a.serve();
    let man = a.publish(&pa, "shared.raw");
    a.wait_seeding("shared.raw");
    let pb = Pool::new("b");
    let mut b = Instance::new(&[]);
    b.serve();
    // Inline manifest, as the hook sends it.
    let req = serde_json::json!({"op": "ensure", "pool": pb.name, "manifest": manifest(&man)});
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (s, r) = (b.socket(), req.clone());
            std::thread::spawn(move || request(&s, &r))
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let dest = pb.path("shared.raw");
    for (events, fin) in &results {
        assert_eq!(fin["ok"], true, "{fin}\n{}", b.daemon_log());
        assert_eq!(fin["state"], "fetched");
        assert_eq!(fin["path"], dest.to_str().unwrap());
        assert!(events.iter().all(|e| e["event"] == "progress" && e["total_bytes"] == size as u64), "{events:?}");
    }
    assert!(same_file(&src, &dest));
    let st = b.master_status("shared.raw");
    assert_eq!(st["fetches"], 1, "one download for two requests: {st}");
    assert_eq!(st["state"], "seeding");
    let modes = open_modes(b.daemon.as_ref().unwrap().id(), &dest);
    assert!(!modes.is_empty() && modes.iter().all(|&m| m == 0), "a fetched master is seeded read-only: {modes:?}");
    let up = a.master_status("shared.raw")["uploaded_bytes"].as_u64().unwrap();
    assert!(up < size as u64 * 3 / 2, "the origin sent one copy, not two ({up})");

    let (_, fin) = b.request(&req);
    assert_eq!(fin["state"], "present", "{fin}");
    // `pool-helper fetch` goes through the running daemon.
    let out = b.run_ok(&["--json", "fetch", "--pool", &pb.name, man.to_str().unwrap()]);
    assert!(out.lines().last().unwrap().contains("\"state\":\"present\""), "{out}");
    // status and list from the CLI.
    let out = b.run_ok(&["status"]);
    assert!(out.contains("seeding") && out.contains("shared.raw"), "{out}");
    let out = b.run_ok(&["--json", "list"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["masters"][0]["name"], "shared.raw");

    // Someone deletes the master from the pool: the next ensure fetches it again.
    std::fs::remove_file(&dest).unwrap();
    let (_, fin) = b.request(&req);
    assert_eq!(fin["state"], "fetched", "{fin}\n{}", b.daemon_log());
    assert!(same_file(&src, &dest));
    assert_eq!(b.master_status("shared.raw")["fetches"], 2);
}

#[test]
fn malformed_requests_manifests_and_torrents_are_refused_and_the_daemon_keeps_serving() {
    let pb = Pool::new("b");
    let mut b = Instance::new(&[]);
    b.serve();
    let good = serde_json::json!({
        "version": 1, "name": "x.raw", "format": "raw", "size": 65536, "virtual_size": 65536,
        "sha256": "a".repeat(64), "info_hash": "b".repeat(40), "piece_length": 16384,
        "magnet": format!("magnet:?xt=urn:btih:{}", "b".repeat(40)), "peers": [], "trackers": []
    });
    let mut evil_name = good.clone();
    evil_name["name"] = "../../etc/passwd".into();
    // piece length 0 (librqbit's parser would panic on it).
    let bomb = format!("d4:infod6:lengthi65536e4:name5:x.raw12:piece lengthi0e6:pieces{}:{}ee", 80, "a".repeat(80));
    let mut bad_torrent = good.clone();
    bad_torrent["torrent_hex"] = hex(bomb.as_bytes()).into();
    let mut deep = good.clone();
    deep["torrent_hex"] = hex(format!("d4:info{}{}e", "l".repeat(5000), "e".repeat(5000)).as_bytes()).into();

    let cases = [
        (serde_json::json!({"op": "ensure", "pool": pb.name, "manifest": evil_name}), "name"),
        (serde_json::json!({"op": "ensure", "pool": pb.name, "manifest": bad_torrent}), "piece length"),
        (serde_json::json!({"op": "ensure", "pool": pb.name, "manifest": deep}), "nested"),
        (serde_json::json!({"op": "ensure", "pool": pb.name, "manifest_path": "relative.json"}), "absolute"),
        (serde_json::json!({"op": "ensure", "pool": pb.name, "manifest_path": "/nonexistent/m.json"}), "cannot read"),
        (serde_json::json!({"op": "ensure", "pool": "no-such-pool-xyz", "manifest": good}), "no-such-pool-xyz"),
        (serde_json::json!({"op": "explode"}), "bad request"),
    ];
    for (req, word) in cases {
        let (_, fin) = b.request(&req);
        assert_eq!(fin["ok"], false, "{req}: {fin}");
        let e = fin["error"].as_str().unwrap();
        assert!(e.contains(word) && !e.contains('\n'), "{req}: {e}");
    }
    // Not even JSON.
    let mut s = UnixStream::connect(b.socket()).unwrap();
    s.write_all(b"}{ not json\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":false"), "{line}");
    // Still serving; the one well-formed request that failed shows up as failed, with why.
    let st = b.status();
    assert_eq!(st.len(), 1, "{st:?}");
    assert_eq!(st[0]["state"], "failed");
    assert!(st[0]["error"].as_str().unwrap().contains("no-such-pool-xyz"), "{st:?}");
    assert!(b.daemon.as_mut().unwrap().try_wait().unwrap().is_none(), "daemon still running");
    // The control socket is private.
    assert_eq!(mode(&b.socket()), 0o600);

    // A config file: unknown keys are one clear error; known keys work.
    let cfg = b.state.path().join("bad.toml");
    std::fs::write(&cfg, "colour = 1\n").unwrap();
    let o = b.run(&["--config", cfg.to_str().unwrap(), "status"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("bad.toml") && err.contains("colour") && err.trim().lines().count() == 1, "{err}");
    std::fs::write(&cfg, format!("control_socket = \"{}\"\n", b.socket().display())).unwrap();
    let o = std::process::Command::new(pool_helper_bin())
        .args(["--config", cfg.to_str().unwrap(), "--state-dir", "/nonexistent-state", "--json", "status"])
        .output()
        .unwrap();
    assert!(o.status.success(), "the socket came from the config file: {}", String::from_utf8_lossy(&o.stderr));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_restarted_daemon_resumes_an_interrupted_fetch_and_re_verifies_its_masters() {
    let pa = Pool::new("a");
    let size = 12 << 20;
    let src = pa.raw_master("again.raw", size);
    let mut a = Instance::new(&[]);
    a.serve();
    let man = a.publish(&pa, "again.raw");
    a.wait_seeding("again.raw");
    let pb = Pool::new("b");
    let mut b = Instance::new(&["--download-limit", "2000000"]);
    b.serve();
    let req = serde_json::json!({"op": "ensure", "pool": pb.name, "manifest_path": man.to_str().unwrap()});
    // The client goes away after a few events; the download goes on.
    let mut s = UnixStream::connect(b.socket()).unwrap();
    writeln!(s, "{req}").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    for _ in 0..3 {
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("\"progress\""), "{line}");
    }
    drop(r);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let done = b.master_status("again.raw")["done_bytes"].as_u64().unwrap();
    assert!(done > 0 && done < size as u64, "still fetching after the client left ({done})");
    b.kill_daemon();
    assert_eq!(std::fs::read_dir(&pb.dir).unwrap().count(), 0, "nothing partial in the pool");
    b.extra.clear();
    b.serve();
    b.wait_seeding("again.raw");
    assert!(same_file(&src, &pb.path("again.raw")));
    assert!(pb.volumes().contains(&"again.raw".to_string()), "pool refreshed by the daemon");

    // Masters are re-verified at start: one changed behind our back is not seeded.
    b.kill_daemon();
    let dest = pb.path("again.raw");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&dest).unwrap();
    bytes[12345] ^= 1;
    std::fs::write(&dest, &bytes).unwrap();
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o444)).unwrap();
    b.serve();
    let start = std::time::Instant::now();
    let st = loop {
        let st = b.master_status("again.raw");
        if st["state"] != "verifying" {
            break st;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "{st}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(st["state"], "failed", "{st}");
    assert!(st["error"].as_str().unwrap().contains("SHA-256"), "{st}");
}

/// Item 4 of issue 10 (checklist 15): only a verified master or a live fetch holds a name.
#[test]
fn a_failed_fetch_releases_the_name_and_a_restart_does_not_resume_it() {
    let pa = Pool::new("a");
    let size = 4 << 20;
    let src = pa.raw_master("named.raw", size);
    let mut a = Instance::new(&[]);
    a.serve();
    let man = a.publish(&pa, "named.raw");
    a.wait_seeding("named.raw");
    let right = manifest(&man);
    let mut wrong = right.clone();
    wrong["sha256"] = "0".repeat(64).into();
    let pb = Pool::new("b");
    let mut b = Instance::new(&[]);
    b.serve();
    let ensure = |m: &serde_json::Value| serde_json::json!({"op": "ensure", "pool": pb.name, "manifest": m});

    let (_, fin) = b.request(&ensure(&wrong));
    assert_eq!(fin["ok"], false, "{fin}");
    assert!(fin["error"].as_str().unwrap().contains("SHA-256"), "{fin}");
    let st = b.master_status("named.raw");
    assert_eq!(st["state"], "failed", "{st}");
    assert!(st["error"].as_str().unwrap().contains("SHA-256"), "the failure stays visible with why: {st}");
    assert_eq!(std::fs::read_dir(&pb.dir).unwrap().count(), 0, "nothing in the pool");

    // A restart does not bring the failed fetch back: nothing fetches it, its reason is still shown.
    b.kill_daemon();
    b.serve();
    for _ in 0..2 {
        let st = b.master_status("named.raw");
        assert_eq!((st["state"].as_str(), st["fetches"].as_u64()), (Some("failed"), Some(0)), "not resumed: {st}");
        assert!(st["error"].as_str().unwrap().contains("SHA-256"), "{st}");
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    assert!(b.daemon_log().contains("not resuming"), "{}", b.daemon_log());

    // The wrong manifest fails again; the right one for the same name is accepted and fetched.
    let (_, fin) = b.request(&ensure(&wrong));
    assert_eq!(fin["ok"], false, "{fin}");
    let (_, fin) = b.request(&ensure(&right));
    assert_eq!(fin["ok"], true, "the failed fetch does not hold the name: {fin}\n{}", b.daemon_log());
    assert_eq!(fin["state"], "fetched", "{fin}");
    assert!(same_file(&src, &pb.path("named.raw")));
    let st = b.master_status("named.raw");
    assert_eq!((st["state"].as_str(), st["sha256"].as_str()), (Some("seeding"), right["sha256"].as_str()), "{st}");

    // And a restart now seeds the right master.
    b.kill_daemon();
    b.serve();
    b.wait_seeding("named.raw");
}

#[test]
fn publish_goes_through_the_running_daemon_which_seeds_at_once_and_answers_errors_in_one_line() {
    let pa = Pool::new("a");
    let src = pa.raw_master("pub.raw", 4 << 20);
    let mut a = Instance::new(&[]);
    a.serve();
    // The request itself: the master is seeded when the answer comes.
    let (_, fin) = a.request(&serde_json::json!({"op": "publish", "pool": pa.name, "volume": "pub.raw"}));
    assert_eq!(fin["ok"], true, "{fin}\n{}", a.daemon_log());
    assert_eq!(fin["state"], "seeding", "{fin}");
    assert_eq!(fin["path"], src.to_str().unwrap(), "{fin}");
    let mp = fin["manifest_path"].as_str().unwrap();
    assert_eq!(manifest(std::path::Path::new(mp)), fin["manifest"], "the answer carries the manifest written");
    assert_eq!(fin["manifest"]["sha256"], sha256(&src));
    assert_eq!(a.master_status("pub.raw")["state"], "seeding", "seeded before the answer");
    assert_eq!(mode(&src) & 0o222, 0, "the master is read-only");

    // The CLI goes through the daemon: the manifest has the daemon's address, not the flag's.
    let out = a.run_ok(&["--json", "publish", "--pool", &pa.name, "pub.raw", "--advertise", "10.9.9.9"]);
    let m: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(m["peers"][0], a.addr(), "{m}");
    assert_eq!(m["sha256"], fin["manifest"]["sha256"]);
    // A --signing-key the daemon does not use is not silently dropped.
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("k");
    let kg = std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).output();
    assert!(kg.unwrap().status.success());
    let o = a.run(&["--signing-key", key.to_str().unwrap(), "publish", "--pool", &pa.name, "pub.raw"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("the daemon published 'pub.raw' unsigned"), "{err}");
    let listed: Vec<_> = a.status().into_iter().filter(|m| m["name"] == "pub.raw").collect();
    assert_eq!(listed.len(), 1, "published twice, one master: {listed:?}");

    // Errors reach the client as one line.
    let (_, fin) = a.request(&serde_json::json!({"op": "publish", "pool": pa.name, "volume": "none.raw"}));
    assert_eq!(fin["ok"], false);
    let e = fin["error"].as_str().unwrap();
    assert!(e.contains("volume 'none.raw' not found in pool") && !e.contains('\n'), "{e}");
    let o = a.run(&["publish", "--pool", &pa.name, "../x"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.trim().lines().count() == 1 && err.contains("cannot be a master"), "{err}");
    let (_, fin) = a.request(&serde_json::json!({"op": "publish", "pool": "no-such-pool-xyz", "volume": "pub.raw"}));
    assert_eq!(fin["ok"], false, "{fin}");
    assert!(fin["error"].as_str().unwrap().contains("no-such-pool-xyz"), "{fin}");
}

#[test]
fn serve_refuses_to_start_with_a_signing_key_or_allowed_signers_it_cannot_use() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("allowed_signers");
    std::fs::write(&bad, "alice ssh-rsa AAAAB3NzaC1yc2E\n").unwrap();
    for (flag, file, says) in [
        ("--signing-key", d.path().join("missing_key"), "cannot read signing key"),
        ("--allowed-signers", bad.clone(), "line 1: key type 'ssh-rsa': only ssh-ed25519 keys are supported"),
    ] {
        let h = Instance::new(&[flag, file.to_str().unwrap()]);
        let o = h.run(&["serve"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(last.starts_with("pool-helper: ") && last.contains(says), "{err}");
    }
}
