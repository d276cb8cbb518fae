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

/// Another host: an 8 MiB raw master `base.raw` published by its daemon. Returns the env, the
/// daemon (seeding while it lives) and the manifest's path.
fn seeding_host(test: &str) -> (TestEnv, PoolHelper, String) {
    let env = TestEnv::new(test);
    make_raw(env.in_pool("base.raw"), 8);
    env.refresh_pool();
    let mut seeder = PoolHelper::new(&env.work_dir.join("state"));
    seeder.serve();
    let manifest = seeder.publish(&env.pool, "base.raw");
    (env, seeder, manifest)
}

/// This host: a daemon that looks at libvirt every `watch_interval` seconds and knows `peers`.
fn watching_host(test: &str, watch_interval: &'static str, peers: &[String]) -> (TestEnv, PoolHelper) {
    let env = TestEnv::new(test);
    let mut local = PoolHelper::new(&env.work_dir.join("state"));
    local.watch_interval = watch_interval;
    local.peers = peers.to_vec();
    local.serve();
    (env, local)
}

/// A domain whose vda is an overlay (not made yet) over `master`, a raw master missing on this host
/// that its metadata says to fetch with `manifest` into the env's pool.
fn needing_domain(env: &TestEnv, name: &str, master: &str, overlay: &str, manifest: &str) -> String {
    needing_domain_with(env, name, master, overlay, &format!("manifest='{manifest}'"))
}

/// [`needing_domain`] with the master element's attributes that say how to get it given whole.
fn needing_domain_with(env: &TestEnv, name: &str, master: &str, overlay: &str, how: &str) -> String {
    let md = format!(
        "<vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='no'>\
         <vcc:disk target='vda' overlay='{overlay}'><vcc:master path='{master}' format='raw' pool='{}' {how}/>\
         </vcc:disk></vcc:clone></vcc:cow>",
        env.pool
    );
    format!(
        "<domain type='{}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><metadata>{md}</metadata>\
         <os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>\
         <driver name='qemu' type='qcow2'/><source file='{overlay}'/><backingStore type='file'><format type='raw'/>\
         <source file='{master}'/></backingStore><target dev='vda' bus='virtio'/></disk></devices></domain>",
        bios_domain_type()
    )
}

#[test]
fn the_daemon_prefetches_a_master_a_defined_domain_needs_and_refreshes_pools_with_hook_overlays() {
    // Another host publishes the master; this host's daemon watches libvirt every second.
    let (seed_env, _seeder, manifest) = seeding_host("pfseed");
    let seed_master = seed_env.in_pool("base.raw");
    let (local_env, local) = watching_host("pflocal", "1", &[]);
    let master = local_env.in_pool("base.raw");
    let overlay = local_env.in_pool(&format!("{}-vda.qcow2", local_env.name("-vm")));
    define_xml(&needing_domain(&local_env, &local_env.name("-vm"), &master, &overlay, &manifest));

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
fn a_defined_domain_starts_the_prefetch_at_once_through_libvirts_events_not_the_polling() {
    let (seed_env, _seeder, manifest) = seeding_host("pfevseed");
    let seed_master = seed_env.in_pool("base.raw");
    // This host's daemon polls only every 10 minutes: what it does within seconds comes from the event.
    let (local_env, local) = watching_host("pfevlocal", "600", &[]);
    // Its first look (at start) and the event registration are over once the log says so.
    wait_until(
        "the daemon's event registration",
        Duration::from_secs(10),
        || local.log().contains("watching libvirt's domain lifecycle events"),
        || local.log(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let master = local_env.in_pool("base.raw");
    let overlay = local_env.in_pool(&format!("{}-vda.qcow2", local_env.name("-vm")));
    let xml = needing_domain(&local_env, &local_env.name("-vm"), &master, &overlay, &manifest);
    let started = format!("prefetching {master}");
    assert!(!local.log().contains(&started), "nothing to prefetch before the define");

    let t0 = Instant::now();
    define_xml(&xml);
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
fn a_clone_taken_from_the_publishing_host_gets_its_master_by_identity() {
    // The metadata a clone made after `virt-clone-cow publish` carries: the manifest's path is on
    // the publishing host (not here), so the daemon goes by the SHA-256 and info-hash, and finds the
    // torrent's metadata and the data on its peer.
    let (seed_env, seeder, manifest) = seeding_host("pfidseed");
    let seed_master = seed_env.in_pool("base.raw");
    let mf = vcc_tests::manifest(Path::new(&manifest));
    let (sha, ih) = (mf["sha256"].as_str().unwrap().to_string(), mf["info_hash"].as_str().unwrap().to_string());
    let (local_env, local) = watching_host("pfidlocal", "600", &[format!("127.0.0.1:{}", seeder.port)]);
    let master = local_env.in_pool("base.raw");
    let overlay = local_env.in_pool(&format!("{}-vda.qcow2", local_env.name("-vm")));
    let how = format!(
        "virtual-size='{}' sha256='{sha}' info-hash='{ih}' manifest='/var/lib/elsewhere/.pool-helper/base.raw.json'",
        8 << 20
    );
    define_xml(&needing_domain_with(&local_env, &local_env.name("-vm"), &master, &overlay, &how));
    wait_until("the prefetch by identity", Duration::from_secs(60), || Path::new(&master).exists(), || local.log());
    assert_eq!(sha256(&master), sha256(&seed_master));
    assert!(local.log().contains("(by identity)"), "{}", local.log());
}
