//! The LAN catalog between real daemons, each in its own network namespace on one bridge
//! (docs/many-hosts.md section 3): what one host publishes signed, the others list within
//! seconds; what an unlisted key signed, or what was altered after signing, nobody lists or
//! fetches; one name from two signers is a conflict naming both.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pool_helper::announce::{catalog_form, Announcement, GROUP};
use pool_helper::sign::{SigningKey, NAMESPACE};
use vcc_tests::*;

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let k = dir.join(name);
    let o =
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"]).arg(&k).output().unwrap();
    assert!(o.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&o.stderr));
    k
}

fn pubkey(k: &Path) -> String {
    std::fs::read_to_string(k.with_extension("pub")).unwrap().trim().to_string()
}

/// Host `i` of the LAN, with these global flags.
fn host(lan: &Lan, i: usize, flags: &[&str]) -> Instance {
    let mut h = Instance::new(flags);
    h.netns = Some(lan.hosts[i].0.clone());
    h.advertise = lan.hosts[i].1.clone();
    h
}

/// `pool-helper catalog --json` on `h`.
fn catalog(h: &Instance) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&h.run_ok(&["--json", "catalog"])).unwrap();
    v["catalog"].as_array().unwrap().clone()
}

fn named(h: &Instance, name: &str) -> Vec<serde_json::Value> {
    catalog(h).into_iter().filter(|e| e["name"] == name).collect()
}

/// Polls `h`'s catalog until `f` holds; how long that took.
fn until(h: &Instance, what: &str, f: impl Fn(&[serde_json::Value]) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let c = catalog(h);
        if f(&c) {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: {c:?}\n{}", h.daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `datagram` from namespace `ns` to the catalog's group and to `to`, at the catalog port.
fn send_from(ns: &str, datagram: &[u8], to: &[&str]) {
    let script = "import socket,sys\nd=sys.stdin.buffer.read()\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                  s.setsockopt(socket.IPPROTO_IP,socket.IP_MULTICAST_TTL,1)\n\
                  for h in sys.argv[1:]: s.sendto(d,(h,6779))\n";
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", script])
        .arg(GROUP.to_string())
        .args(to)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(c.stdin.as_mut().unwrap(), datagram).unwrap();
    drop(c.stdin.take());
    assert!(c.wait().unwrap().success());
}

#[test]
fn signed_masters_reach_every_catalog_and_unsigned_altered_or_conflicting_ones_do_not_pass_as_trusted() {
    let lan = Lan::new(3);
    let keys = tempfile::tempdir().unwrap();
    let (alice, bob, mallory) =
        (keygen(keys.path(), "alice"), keygen(keys.path(), "bob"), keygen(keys.path(), "mallory"));
    let allowed = keys.path().join("allowed_signers");
    std::fs::write(
        &allowed,
        format!("alice@example.com namespaces=\"{NAMESPACE}\" {}\nbob@example.com {}\n", pubkey(&alice), pubkey(&bob)),
    )
    .unwrap();
    let conf = keys.path().join("config.toml");
    std::fs::write(&conf, "announce_interval = 5\n").unwrap();
    let (conf, allowed) = (conf.to_str().unwrap(), allowed.to_str().unwrap());
    let common = ["--config", conf, "--allowed-signers", allowed];
    let (alice_s, bob_s) = (alice.to_str().unwrap(), bob.to_str().unwrap());
    let (pa, pb, pc) = (Pool::new("a"), Pool::new("b"), Pool::new("c"));
    let mut a = host(&lan, 0, &[&common[..], &["--signing-key", alice_s]].concat());
    let mut b = host(&lan, 1, &common);
    let mut c = host(&lan, 2, &[&common[..], &["--signing-key", bob_s]].concat());
    for h in [&mut a, &mut b, &mut c] {
        h.serve();
    }

    // A publishes; B and C list it within a few seconds, signed by alice, A among its hosts.
    let src = pa.raw_master("cat.raw", 1 << 20);
    let started = Instant::now();
    let man = a.publish(&pa, "cat.raw");
    let published = started.elapsed();
    let a_host = format!("{}:{}", lan.hosts[0].1, a.port);
    for (h, label) in [(&b, "B"), (&c, "C")] {
        until(h, "cat.raw listed", |c| c.iter().any(|e| e["name"] == "cat.raw"));
        println!(
            "catalog latency: publish on A returned after {:.0} ms; listed on {label} {:.0} ms after publish began",
            published.as_secs_f64() * 1e3,
            started.elapsed().as_secs_f64() * 1e3
        );
        let e = &named(h, "cat.raw")[0];
        assert_eq!(e["signer"], "alice@example.com", "{e}");
        assert_eq!(e["sha256"], sha256(&src), "{e}");
        assert!(e["hosts"].as_array().unwrap().contains(&a_host.clone().into()), "{e}");
        assert!(e.get("conflict").is_none(), "{e}");
    }
    let total = started.elapsed();
    assert!(total < Duration::from_secs(10), "listed everywhere within {total:?}");
    // The manifest's signature checks by hand as docs/many-hosts.md shows.
    let sig = PathBuf::from(format!("{}.sig", man.display()));
    let o = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-f", allowed, "-I", "alice@example.com", "-n", NAMESPACE, "-s"])
        .arg(&sig)
        .stdin(std::fs::File::open(&man).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "ssh-keygen -Y verify: {}", String::from_utf8_lossy(&o.stderr));

    // An unlisted key's master and an altered one, sent to everyone from A's namespace.
    let m: pool_helper::manifest::Manifest = serde_json::from_str(&std::fs::read_to_string(&man).unwrap()).unwrap();
    let evil = pool_helper::manifest::Manifest { name: "evil.raw".into(), ..m.clone() };
    let text = catalog_form(&evil);
    let dgram = |text: &[u8], sig: String| {
        let a = Announcement {
            v: 1,
            host: a_host.clone(),
            manifest: String::from_utf8(text.to_vec()).unwrap(),
            signature: sig,
        };
        serde_json::to_vec(&a).unwrap()
    };
    let unlisted = dgram(&text, SigningKey::load(&mallory).unwrap().sign(&text).unwrap());
    let good = catalog_form(&pool_helper::manifest::Manifest { name: "altered.raw".into(), ..m.clone() });
    let alice_sig = SigningKey::load(&alice).unwrap().sign(&good).unwrap();
    let altered_text = String::from_utf8(good).unwrap().replace(&m.sha256, &"0".repeat(64));
    let altered = dgram(altered_text.as_bytes(), alice_sig);
    let (bh, ch) = (lan.hosts[1].1.as_str(), lan.hosts[2].1.as_str());
    for _ in 0..3 {
        send_from(&lan.hosts[0].0, &unlisted, &[bh, ch]);
        send_from(&lan.hosts[0].0, &altered, &[bh, ch]);
        std::thread::sleep(Duration::from_millis(300));
    }

    // Two masters named dup.raw, signed by alice (A) and bob (C): a conflict naming both.
    // (Sizes other than cat.raw's: the test pools' content is seeded by name length and size.)
    let sa = pa.raw_master("dup.raw", (1 << 20) + 8192);
    let sc = pc.raw_master("dup.raw", (1 << 20) + 4096);
    a.publish(&pa, "dup.raw");
    c.publish(&pc, "dup.raw");
    for h in [&a, &b, &c] {
        until(h, "both dup.raw listed", |c| c.iter().filter(|e| e["name"] == "dup.raw").count() == 2);
        let both = named(h, "dup.raw");
        for e in &both {
            let conflict = e["conflict"].as_str().unwrap_or_default();
            for s in ["alice@example.com", "bob@example.com", &sha256(&sa), &sha256(&sc)] {
                assert!(conflict.contains(s), "the conflict names {s}: {e}");
            }
        }
    }
    let text = b.run_ok(&["catalog"]);
    assert!(text.lines().filter(|l| l.starts_with("dup.raw ")).count() == 2, "{text}");
    assert!(text.contains("  conflict: two different masters are published as 'dup.raw'"), "{text}");

    // By now every host heard several rounds: the untrusted ones are listed nowhere, fetched by
    // nobody, and each receiver said why in its log.
    for (h, p) in [(&a, &pa), (&b, &pb), (&c, &pc)] {
        let names: Vec<String> = catalog(h).iter().map(|e| e["name"].as_str().unwrap().to_string()).collect();
        assert!(!names.iter().any(|n| n == "evil.raw" || n == "altered.raw"), "{names:?}");
        assert!(h.status().iter().all(|m| m["name"] != "evil.raw" && m["name"] != "altered.raw"));
        assert!(!p.path("evil.raw").exists() && !p.path("altered.raw").exists());
    }
    for h in [&b, &c] {
        let log = h.daemon_log();
        assert!(log.contains("catalog: ignoring an announcement from"), "{log}");
        assert!(
            log.contains("not in allowed_signers") || log.contains("does not match the manifest"),
            "the reason is logged: {log}"
        );
    }
    assert!(pb.volumes().iter().all(|v| v != "cat.raw"), "listing fetches nothing");

    // A restarted daemon announces again what it published (it hears itself: multicast loop).
    a.kill_daemon();
    a.serve();
    until(&a, "cat.raw announced again after a restart", |c| {
        c.iter().any(|e| {
            e["name"] == "cat.raw" && e["hosts"].as_array().is_some_and(|h| h.contains(&a_host.clone().into()))
        })
    });

    // C fetches cat.raw by name through its catalog, and then announces it too, with A's
    // signature: B lists C among its hosts.
    let (_, fin) = c.request(&serde_json::json!({"op": "ensure", "pool": pc.name, "name": "cat.raw"}));
    assert_eq!(
        (fin["ok"].as_bool(), fin["state"].as_str()),
        (Some(true), Some("fetched")),
        "{fin}\n{}",
        c.daemon_log()
    );
    assert!(same_file(&src, &pc.path("cat.raw")));
    let c_host = format!("{}:{}", lan.hosts[2].1, c.port);
    until(&b, "C announces the master it fetched", |l| {
        l.iter().any(|e| {
            e["name"] == "cat.raw"
                && e["signer"] == "alice@example.com"
                && e["hosts"].as_array().is_some_and(|h| h.contains(&c_host.clone().into()))
        })
    });
}
