//! Interop with Debian's third-party BitTorrent clients: aria2c and python3-libtorrent accept our
//! metainfo and download from us; we fetch from them seeding. opentracker is the LAN tracker.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vcc_tests::*;

/// opentracker on 127.0.0.1:port serving only `info_hash` (it refuses to run as root: -u nobody).
fn opentracker(port: u16, info_hash: &str, dir: &Path) -> Bg {
    std::fs::write(dir.join("wl"), format!("{info_hash}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = port.to_string();
    let child = Command::new("opentracker")
        .args(["-i", "127.0.0.1", "-p", &p, "-P", &p, "-u", "nobody", "-d", dir.to_str().unwrap(), "-w", "wl"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "opentracker did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Bg(child)
}

#[test]
fn aria2c_and_libtorrent_download_our_published_master_with_our_torrent() {
    let pa = Pool::new("a");
    // A size that is an exact multiple of the piece length: the case librqbit's own creator gets wrong.
    let size = 16 << 20;
    let src = pa.raw_master("interop.raw", size);
    let tport = free_port();
    let tracker = format!("http://127.0.0.1:{tport}/announce");
    let mut a = Instance::new(&["--tracker", &tracker]);
    let man_path = a.publish(&pa, "interop.raw");
    let man = manifest(&man_path);
    assert_eq!(size as u64 % man["piece_length"].as_u64().unwrap(), 0);
    let torrent = man_path.with_extension("torrent");
    let tdir = tempfile::tempdir().unwrap();
    let _tracker = opentracker(tport, man["info_hash"].as_str().unwrap(), tdir.path());
    a.serve();
    a.wait_seeding("interop.raw");

    // aria2c finds us through the tracker.
    let d1 = tempfile::tempdir().unwrap();
    let aria = aria2c(&[
        "--seed-time=0",
        "--listen-port",
        &free_port().to_string(),
        "-d",
        d1.path().to_str().unwrap(),
        torrent.to_str().unwrap(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let o = wait_output(aria, Duration::from_secs(150));
    assert!(o.status.success(), "aria2c: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(same_file(&src, &d1.path().join("interop.raw")), "aria2c got a byte-identical copy");

    // libtorrent connects to us directly.
    let d2 = tempfile::tempdir().unwrap();
    let lt = Command::new("/usr/bin/python3")
        .args([LT, "download", torrent.to_str().unwrap(), d2.path().to_str().unwrap(), &a.port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_output(lt, Duration::from_secs(170));
    assert!(o.status.success(), "libtorrent: {}", String::from_utf8_lossy(&o.stderr));
    assert!(same_file(&src, &d2.path().join("interop.raw")), "libtorrent got a byte-identical copy");
    let up = a.master_status("interop.raw")["uploaded_bytes"].as_u64().unwrap();
    assert!(up >= 2 * size as u64, "we uploaded both copies ({up})");
}

#[test]
fn we_fetch_from_aria2c_and_libtorrent_seeds() {
    let pa = Pool::new("a");
    let size = 12 << 20;
    let src = pa.qcow2_master("third.qcow2", size);
    let a = Instance::new(&[]); // publishes, never serves: the only seeds are third-party
    let man = a.publish(&pa, "third.qcow2");
    let torrent = man.with_extension("torrent");

    // aria2c seeding a copy.
    let d1 = tempfile::tempdir().unwrap();
    std::fs::copy(&src, d1.path().join("third.qcow2")).unwrap();
    let aport = free_port();
    let _aria = Bg(aria2c(&[
        "-V",
        "--seed-ratio=0.0",
        "--listen-port",
        &aport.to_string(),
        "-d",
        d1.path().to_str().unwrap(),
        torrent.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap());
    std::thread::sleep(Duration::from_secs(2));
    let pb = Pool::new("b");
    let b = Instance::new(&["--peer", &format!("127.0.0.1:{aport}")]);
    b.run_ok(&["fetch", "--pool", &pb.name, man.to_str().unwrap()]);
    assert!(same_file(&src, &pb.path("third.qcow2")), "fetched from aria2c");

    // libtorrent seeding a copy.
    let d2 = tempfile::tempdir().unwrap();
    std::fs::copy(&src, d2.path().join("third.qcow2")).unwrap();
    let lport = free_port();
    let mut lt = Bg(Command::new("/usr/bin/python3")
        .args([LT, "seed", torrent.to_str().unwrap(), d2.path().to_str().unwrap(), &lport.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let mut line = String::new();
    BufReader::new(lt.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "seeding");
    let pc = Pool::new("c");
    let c = Instance::new(&["--peer", &format!("127.0.0.1:{lport}")]);
    c.run_ok(&["fetch", "--pool", &pc.name, man.to_str().unwrap()]);
    assert!(same_file(&src, &pc.path("third.qcow2")), "fetched from libtorrent");
}

#[test]
fn a_master_is_found_through_a_lan_tracker_alone() {
    let pa = Pool::new("a");
    let size = 6 << 20;
    let src = pa.raw_master("tracked.raw", size);
    let tport = free_port();
    let tracker = format!("http://127.0.0.1:{tport}/announce");
    let mut a = Instance::new(&["--tracker", &tracker]);
    let man_path = a.publish(&pa, "tracked.raw");
    let mut m = manifest(&man_path);
    let tdir = tempfile::tempdir().unwrap();
    let _tracker = opentracker(tport, m["info_hash"].as_str().unwrap(), tdir.path());
    a.serve();
    a.wait_seeding("tracked.raw");
    // No peer hints at all: only the tracker knows where the master is.
    m["peers"] = serde_json::json!([]);
    m["magnet"] = format!("magnet:?xt=urn:btih:{}", m["info_hash"].as_str().unwrap()).into();
    let d = tempfile::tempdir().unwrap();
    let bare = d.path().join("tracked.json");
    std::fs::write(&bare, m.to_string()).unwrap();
    let pb = Pool::new("b");
    let b = Instance::new(&[]);
    b.run_ok(&["fetch", "--pool", &pb.name, bare.to_str().unwrap()]);
    assert!(same_file(&src, &pb.path("tracked.raw")));
}
