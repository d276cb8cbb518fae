#![allow(clippy::unwrap_used)]
//! The pool-helper daemon's look at libvirt (issue: the hook): a domain defined with a disk whose
//! master is missing on this host gets its master fetched before anyone starts it, and an overlay
//! made in a pool directory behind libvirt's back (as the hook does) gets its pool refreshed.

use std::path::Path;
use std::time::{Duration, Instant};

use vcc_tests::*;

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} did not happen within {limit:?}\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Defines a clone on this host whose disk `vda` is an overlay over `master` (raw), the metadata's
/// master element carrying `how` (the attributes that say how to get it) besides path and format.
fn define_clone(name: &str, overlay: &str, master: &str, how: &str) {
    let md = format!(
        "<vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='no'>\
         <vcc:disk target='vda' overlay='{overlay}'><vcc:master path='{master}' format='raw' {how}/>\
         </vcc:disk></vcc:clone></vcc:cow>"
    );
    let xml = format!(
        "<domain type='{}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><metadata>{md}</metadata>\
         <os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>\
         <driver name='qemu' type='qcow2'/><source file='{overlay}'/><backingStore type='file'><format type='raw'/>\
         <source file='{master}'/></backingStore><target dev='vda' bus='virtio'/></disk></devices></domain>",
        bios_domain_type()
    );
    define_xml(&xml);
}

#[test]
fn the_daemon_prefetches_a_master_a_defined_domain_needs_and_refreshes_pools_with_hook_overlays() {
    let seed_env = TestEnv::new("pfseed");
    let local_env = TestEnv::new("pflocal");
    // Another host publishes the master.
    let seed_master = seed_env.in_pool("base.raw");
    make_raw(&seed_master, 8);
    seed_env.refresh_pool();
    let mut seeder = PoolHelper::new(&seed_env.work_dir.join("state"));
    seeder.serve();
    let manifest = seeder.publish(&seed_env.pool, "base.raw");

    // This host: its daemon watches libvirt every second.
    let mut local = PoolHelper::new(&local_env.work_dir.join("state"));
    local.watch_interval = "1";
    local.serve();
    let master = local_env.in_pool("base.raw");
    let overlay = local_env.in_pool(&format!("{}-vda.qcow2", local_env.name("-vm")));
    let name = local_env.name("-vm");
    define_clone(&name, &overlay, &master, &format!("pool='{}' manifest='{manifest}'", local_env.pool));

    // No start: the master arrives by itself, verified, and the pool lists it.
    wait_until("the prefetch", Duration::from_secs(60), || Path::new(&master).exists(), || local.log());
    assert_eq!(sha256(&master), sha256(&seed_master));
    let vols = virsh_ok(&["vol-list", &local_env.pool]);
    assert!(vols.contains("base.raw"), "{vols}");

    // An overlay made behind libvirt's back in the pool directory (as the hook makes them) is
    // listed after the daemon's next look.
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &master, &overlay]);
    let file = Path::new(&overlay).file_name().unwrap().to_string_lossy().into_owned();
    wait_until(
        "the pool refresh",
        Duration::from_secs(30),
        || virsh_ok(&["vol-list", &local_env.pool]).contains(&file),
        || local.log(),
    );
}

#[test]
fn the_daemon_prefetches_a_master_a_defined_domain_names_by_identity_only() {
    let seed_env = TestEnv::new("pfidseed");
    let local_env = TestEnv::new("pfidlocal");
    let seed_master = seed_env.in_pool("ident.raw");
    make_raw(&seed_master, 6);
    seed_env.refresh_pool();
    let mut seeder = PoolHelper::new(&seed_env.work_dir.join("state"));
    seeder.serve();
    let manifest = seeder.publish(&seed_env.pool, "ident.raw");
    let published: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    std::fs::remove_file(&manifest).unwrap();

    // This host knows the other only as a peer; the domain's metadata has the identity only.
    let mut local = PoolHelper::new(&local_env.work_dir.join("state"));
    local.watch_interval = "1";
    local.peers = vec![format!("127.0.0.1:{}", seeder.port)];
    local.serve();
    let master = local_env.in_pool("ident.raw");
    let overlay = local_env.in_pool(&format!("{}-vda.qcow2", local_env.name("-vm")));
    let name = local_env.name("-vm");
    let how = format!(
        "pool='{}' sha256='{}' info-hash='{}'",
        local_env.pool,
        published["sha256"].as_str().unwrap(),
        published["info_hash"].as_str().unwrap()
    );
    define_clone(&name, &overlay, &master, &how);
    wait_until("the prefetch by identity", Duration::from_secs(60), || Path::new(&master).exists(), || local.log());
    assert_eq!(sha256(&master), sha256(&seed_master));
    assert!(virsh_ok(&["vol-list", &local_env.pool]).contains("ident.raw"));
}

#[test]
fn the_daemon_prefetches_the_master_of_a_plain_backing_store_through_the_signed_catalog() {
    let seed_env = TestEnv::new("pfcatseed");
    let local_env = TestEnv::new("pfcatlocal");
    let (key, allowed) = signer(&seed_env.work_dir, "alice@example.com");
    let conf = seed_env.work_dir.join("pool-helper.toml");
    std::fs::write(&conf, format!("catalog_port = {}\n", free_port())).unwrap();
    let flag = |f: &str, p: &Path| vec![f.to_string(), p.to_string_lossy().into_owned()];
    // This host trusts alice and watches libvirt every second; it knows no peer.
    let mut local = PoolHelper::new(&local_env.work_dir.join("state"));
    local.watch_interval = "1";
    local.extra = [flag("--config", &conf), flag("--allowed-signers", &allowed)].concat();
    local.serve();
    // The other host signs what it publishes and announces it.
    let seed_master = seed_env.in_pool("plain-pf.raw");
    make_raw(&seed_master, 6);
    seed_env.refresh_pool();
    let mut seeder = PoolHelper::new(&seed_env.work_dir.join("state"));
    seeder.extra = [flag("--config", &conf), flag("--signing-key", &key)].concat();
    seeder.peers = vec![format!("127.0.0.1:{}", local.port)];
    seeder.serve();
    seeder.publish(&seed_env.pool, "plain-pf.raw");
    local.wait_listed("plain-pf.raw");

    // A plain domain (no metadata of ours) whose backing store is in this host's pool.
    let master = local_env.in_pool("plain-pf.raw");
    let overlay = local_env.in_pool(&format!("{}-vda.qcow2", local_env.name("-vm")));
    let xml = format!(
        "<domain type='{}'><name>{}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>\
         <driver name='qemu' type='qcow2'/><source file='{overlay}'/><backingStore type='file'><format type='raw'/>\
         <source file='{master}'/></backingStore><target dev='vda' bus='virtio'/></disk></devices></domain>",
        bios_domain_type(),
        local_env.name("-vm")
    );
    define_xml(&xml);
    wait_until("the prefetch by name", Duration::from_secs(60), || Path::new(&master).exists(), || local.log());
    assert_eq!(sha256(&master), sha256(&seed_master));
}

/// Another host: an 8 MiB raw master `file` published by its daemon. Returns the env, the daemon
/// (seeding while it lives) and the manifest's path.
fn seeding_host(test: &str, file: &str) -> (TestEnv, PoolHelper, String) {
    let env = TestEnv::new(test);
    make_raw(env.in_pool(file), 8);
    env.refresh_pool();
    let mut seeder = PoolHelper::new(&env.work_dir.join("state"));
    seeder.serve();
    let manifest = seeder.publish(&env.pool, file);
    (env, seeder, manifest)
}

#[test]
fn a_defined_domain_starts_the_prefetch_at_once_through_libvirts_events_not_the_polling() {
    let (seed_env, _seeder, manifest) = seeding_host("pfevseed", "base.raw");
    let seed_master = seed_env.in_pool("base.raw");
    // This host's daemon polls only every 10 minutes: what it does within seconds comes from the event.
    let local_env = TestEnv::new("pfevlocal");
    let mut local = PoolHelper::new(&local_env.work_dir.join("state"));
    local.watch_interval = "600";
    local.serve();
    wait_until(
        "the daemon's event registration",
        Duration::from_secs(10),
        || local.log().contains("watching libvirt's domain lifecycle events"),
        || local.log(),
    );
    // Its first look (at start) is over by then.
    std::thread::sleep(Duration::from_millis(500));
    let master = local_env.in_pool("base.raw");
    let overlay = local_env.in_pool(&format!("{}-vda.qcow2", local_env.name("-vm")));
    let started = format!("prefetching {master}");
    assert!(!local.log().contains(&started), "nothing to prefetch before the define");

    let t0 = Instant::now();
    define_clone(
        &local_env.name("-vm"),
        &overlay,
        &master,
        &format!("pool='{}' manifest='{manifest}'", local_env.pool),
    );
    // Polled every 10 ms, for the measure.
    while !local.log().contains(&started) {
        assert!(t0.elapsed() < Duration::from_secs(5), "no prefetch 5 s after the define\n{}", local.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let latency = t0.elapsed();
    println!("define -> prefetch started: {:.0} ms (watch_interval 600 s)", latency.as_secs_f64() * 1e3);
    assert!(latency < Duration::from_secs(1), "the prefetch started {latency:?} after the define\n{}", local.log());
    wait_until("the prefetch", Duration::from_secs(60), || Path::new(&master).exists(), || local.log());
    assert_eq!(sha256(&master), sha256(&seed_master));
}

#[test]
fn a_clone_taken_from_the_publishing_host_gets_its_master_by_identity_not_the_manifest_named_there() {
    // The metadata a clone made after `virt-clone-cow publish` carries: the manifest's path is on
    // the publishing host (not here), so the daemon goes by the SHA-256 and info-hash beside it.
    let (seed_env, seeder, manifest) = seeding_host("pfelseed", "far.raw");
    let mf = vcc_tests::manifest(Path::new(&manifest));
    let local_env = TestEnv::new("pfellocal");
    let mut local = PoolHelper::new(&local_env.work_dir.join("state"));
    local.watch_interval = "1";
    local.peers = vec![format!("127.0.0.1:{}", seeder.port)];
    local.serve();
    let master = local_env.in_pool("far.raw");
    let overlay = local_env.in_pool(&format!("{}-vda.qcow2", local_env.name("-vm")));
    let how = format!(
        "pool='{}' sha256='{}' info-hash='{}' manifest='/var/lib/elsewhere/.pool-helper/far.raw.json'",
        local_env.pool,
        mf["sha256"].as_str().unwrap(),
        mf["info_hash"].as_str().unwrap()
    );
    define_clone(&local_env.name("-vm"), &overlay, &master, &how);
    wait_until("the prefetch by identity", Duration::from_secs(60), || Path::new(&master).exists(), || local.log());
    assert_eq!(sha256(&master), sha256(&seed_env.in_pool("far.raw")));
}

#[test]
fn after_libvirtd_restarts_the_daemon_hears_defines_again() {
    // A bed host: its own libvirtd, which this test may stop and start again, and its pool-helper
    // looking at libvirt only every 10 minutes apart from the events.
    let bed = Bed::up_args(1, &["--config", "watch_interval = 600"]);
    let log_path = bed.host_dir(0).join("log/pool-helper.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let heard = |name: &str| log().contains(&format!("domain '{name}' defined"));
    let define = |name: &str, vol: &str| {
        let t0 = Instant::now();
        bed.define_small_guest(0, name, vol);
        while !heard(name) {
            assert!(t0.elapsed() < Duration::from_secs(5), "the define of '{name}' was not heard\n{}", log());
            std::thread::sleep(Duration::from_millis(10));
        }
        t0.elapsed()
    };
    wait_until("the event registration", Duration::from_secs(10), || log().contains("watching libvirt's"), log);
    let before = define("evr-a", "evr-a.qcow2");

    // libvirtd stops (by its pid, inside the host) and starts again.
    let pid = bed.exec_ok(0, &["cat", "/run/libvirt/libvirtd.pid"]).trim().to_string();
    bed.exec_ok(0, &["kill", "-TERM", &pid]);
    wait_until("the lost connection", Duration::from_secs(30), || log().contains("lost libvirt's domain events"), log);
    bed.exec_ok(0, &["/usr/sbin/libvirtd", "-d", "-p", "/run/libvirt/libvirtd.pid"]);
    wait_until("libvirtd back", Duration::from_secs(30), || bed.virsh(0, &["version"]).status.success(), log);
    let registrations = || log().matches("watching libvirt's domain lifecycle events").count();
    wait_until("the reconnection", Duration::from_secs(30), || registrations() >= 2, log);
    let after = define("evr-b", "evr-b.qcow2");
    println!("define -> heard by pool-helper: {before:?} before the restart, {after:?} after");
    assert!(after < Duration::from_secs(1) && before < Duration::from_secs(1), "{before:?} {after:?}");
}
