//! Manifests and images from outside, against a running daemon and the CLI: manifest paths that
//! are no regular file, magnets that are URLs, an image the fetchers' policy refuses.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vcc_tests::*;

/// One request; its final line and how long it took, or None if none came within `limit`.
fn timed_request(sock: &Path, req: &serde_json::Value, limit: Duration) -> (Duration, Option<serde_json::Value>) {
    let start = Instant::now();
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    writeln!(s, "{req}").unwrap();
    for l in BufReader::new(s).lines() {
        let Ok(l) = l else { break };
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        if v.get("ok").is_some() {
            return (start.elapsed(), Some(v));
        }
    }
    (start.elapsed(), None)
}

#[test]
fn manifest_paths_that_are_no_regular_file_are_refused_at_once_and_status_still_answers() {
    let pb = Pool::new("b");
    let mut b = Instance::new(&[]);
    b.serve();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("m.json");
    run_ok("mkfifo", &[fifo.to_str().unwrap()]);
    let cases = [
        (fifo.display().to_string(), "it is a FIFO, not a regular file"),
        ("/dev/zero".to_string(), "it is a character device, not a regular file"),
        (dir.path().display().to_string(), "it is a directory, not a regular file"),
    ];
    // Two requests for each at once: two FIFO requests used to block both runtime workers.
    let threads: Vec<_> = cases
        .iter()
        .flat_map(|c| [c.clone(), c.clone()])
        .map(|(path, why)| {
            let sock = b.socket();
            let req = serde_json::json!({"op": "ensure", "pool": pb.name, "manifest_path": path});
            std::thread::spawn(move || (path, why, timed_request(&sock, &req, Duration::from_secs(20))))
        })
        .collect();
    for t in threads {
        let (path, why, (took, fin)) = t.join().unwrap();
        let fin = fin.unwrap_or_else(|| panic!("{path}: no answer within 20 s\n{}", b.daemon_log()));
        assert_eq!(fin["ok"], false, "{path}: {fin}");
        let e = fin["error"].as_str().unwrap();
        assert_eq!(e, format!("cannot read manifest '{path}': {why}"));
        assert!(took < Duration::from_secs(5), "{path}: answered after {took:?}");
    }
    let (took, fin) = timed_request(&b.socket(), &serde_json::json!({"op": "status"}), Duration::from_secs(5));
    assert_eq!(fin.unwrap()["ok"], true);
    assert!(took < Duration::from_secs(2), "status took {took:?}");
    assert!(b.status().is_empty(), "nothing was started");
    // The CLI reads the same way: one line, at once.
    let o = b.run(&["fetch", "--pool", &pb.name, "/dev/zero"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.trim().ends_with("cannot read manifest '/dev/zero': it is a character device, not a regular file"),
        "{err}"
    );
}

#[test]
fn a_manifest_whose_magnet_is_a_url_is_refused_and_nothing_is_fetched() {
    let pb = Pool::new("b");
    let mut b = Instance::new(&[]);
    b.serve();
    // A web server that would hand out an endless "torrent": it must never be asked.
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    server.set_nonblocking(true).unwrap();
    let url = format!("http://{}/x.torrent", server.local_addr().unwrap());
    let m = serde_json::json!({
        "version": 1, "name": "x.raw", "format": "raw", "size": 65536, "virtual_size": 65536,
        "sha256": "a".repeat(64), "info_hash": "b".repeat(40), "piece_length": 16384,
        "magnet": url, "peers": [], "trackers": []
    });
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), m.to_string()).unwrap();
    let reqs = [
        serde_json::json!({"op": "ensure", "pool": pb.name, "manifest": m}),
        serde_json::json!({"op": "fetch", "pool": pb.name, "manifest_path": file.path()}),
    ];
    for req in reqs {
        let (_, fin) = timed_request(&b.socket(), &req, Duration::from_secs(150));
        let fin = fin.unwrap();
        assert_eq!(fin["ok"], false, "{fin}");
        assert_eq!(fin["error"], format!("manifest field 'magnet' is refused: '{url}' is not a magnet:? URI"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let asked = server.accept();
    assert!(asked.is_err(), "the daemon fetched the manifest's URL: {asked:?}");
    assert!(b.status().is_empty(), "nothing was started");
}

#[test]
fn publish_refuses_a_qcow2_of_1_eib_that_every_fetcher_refuses() {
    let pa = Pool::new("a");
    let p = pa.path("huge.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", p.to_str().unwrap(), "1E"]);
    pa.refresh();
    let a = Instance::new(&[]);
    let o = a.run(&["publish", "--pool", &pa.name, "huge.qcow2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.trim().ends_with(
            "volume 'huge.qcow2' cannot be a master: fetchers would refuse it: virtual size 1152921504606846976 is \
             above the policy maximum 2199023255552 (config key max_virtual_size, the same on every host)"
        ),
        "{err}"
    );
    assert!(!a.state.path().join("published/huge.qcow2.json").exists());
}
