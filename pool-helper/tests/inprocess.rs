//! Publish -> fetch -> verify between two sessions in this process: temp directories for the
//! state and the pools (plain directories through `DirPools`, no libvirtd), 127.0.0.1, random
//! ports, DHT and LSD off. No root needed.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pool_helper::config::{Config, FileConfig, Overrides};
use pool_helper::fetch::{Ctx, Event, Outcome};
use pool_helper::pools::DirPools;
use pool_helper::publish::publish_in;
use pool_helper::torrent::Torrents;

/// A port free on every address right now (librqbit listens on [::]).
fn free_port() -> u16 {
    std::net::TcpListener::bind("[::]:0").unwrap().local_addr().unwrap().port()
}

fn config(state: &Path, port: u16, peers: &[String], qemu_img: bool) -> Config {
    let o = Overrides {
        state_dir: Some(state.to_path_buf()),
        listen_port: Some(port),
        advertise: Some("127.0.0.1".into()),
        peers: peers.to_vec(),
        no_lsd: true,
        ..Default::default()
    };
    let mut c = Config::merge(FileConfig::default(), &o).unwrap();
    assert!(!c.dht && !c.lsd, "DHT and LSD off");
    c.qemu_img_check = qemu_img;
    c.stall_timeout = 30;
    c
}

async fn publish_fetch_verify(qemu_img: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| {
        let d = tmp.path().join(n);
        std::fs::create_dir(&d).unwrap();
        d
    };
    let (state_a, pool_a, state_b, pool_b) = (dir("state-a"), dir("pool-a"), dir("state-b"), dir("pool-b"));
    // Whole sectors (qemu-img reports a raw image's virtual size rounded up to 512), but not whole
    // pieces: the last piece is short.
    let master = vcc_tests::random_bytes((3 << 20) + 3 * 512, 1);
    std::fs::write(pool_a.join("base.raw"), &master).unwrap();

    // Host A publishes its volume and seeds it.
    let port_a = free_port();
    let cfg_a = config(&state_a, port_a, &[], qemu_img);
    let pools_a = DirPools::new().with("a", &pool_a);
    let published = publish_in(&cfg_a, &pools_a, "a", "base.raw").unwrap();
    let m = published.manifest.clone();
    assert_eq!((m.format.as_str(), m.size), ("raw", master.len() as u64));
    assert_eq!(m.peers, [format!("127.0.0.1:{port_a}")]);
    let a = Ctx {
        cfg: cfg_a.clone(),
        torrents: Torrents::start(&cfg_a).await.unwrap(),
        pools: Arc::new(pools_a),
        catalog: Arc::default(),
    };
    let _seed = a.seed(&m, &published.path).await.unwrap();

    // Host B knows only the manifest (whose peer hint is A) and fetches into its own pool.
    let cfg_b = config(&state_b, free_port(), &[], qemu_img);
    let pools_b = DirPools::new().with("b", &pool_b);
    let b = Ctx {
        cfg: cfg_b.clone(),
        torrents: Torrents::start(&cfg_b).await.unwrap(),
        pools: Arc::new(pools_b),
        catalog: Arc::default(),
    };
    let events = Mutex::new(Vec::new());
    let on_event = |e: Event| {
        events.lock().unwrap().push(match e {
            Event::Started { .. } => "started",
            Event::Progress(_) => "progress",
            Event::Verifying => "verifying",
            Event::Downloading(_) => "downloading",
            Event::Published(_) => "published",
        })
    };
    let (outcome, handle) = b.fetch("b", &m, &on_event).await.unwrap();

    let fetched = pool_b.join("base.raw");
    assert_eq!(outcome, Outcome::Fetched(fetched.clone()));
    assert!(handle.is_some(), "the fetched master is seeded on");
    assert!(std::fs::read(&fetched).unwrap() == master, "the fetched master is byte-identical");
    assert_eq!(std::fs::metadata(&fetched).unwrap().permissions().mode() & 0o777, 0o444, "read-only");
    assert!(events.lock().unwrap().contains(&"verifying"), "verified before it went into the pool");
    let ev = events.lock().unwrap().clone();
    let at = |what: &str| ev.iter().position(|e| *e == what).unwrap_or_else(|| panic!("no {what} event: {ev:?}"));
    assert!(at("downloading") < at("verifying") && at("verifying") < at("published"), "{ev:?}");
    assert_eq!(std::fs::read_dir(&pool_b).unwrap().count(), 1, "nothing else in the pool");
    assert_eq!(std::fs::read_dir(state_b.join("staging/b")).unwrap().count(), 0, "staging emptied");

    // A second fetch finds it present and verified.
    let (again, _) = b.fetch("b", &m, &|_| {}).await.unwrap();
    assert_eq!(again, Outcome::Present(fetched));

    b.torrents.stop().await;
    a.torrents.stop().await;
}

async fn within_a_minute(f: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(60), f).await.expect("publish -> fetch -> verify took over 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_fetch_verify_between_two_sessions_gives_an_identical_read_only_master() {
    within_a_minute(publish_fetch_verify(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
async fn publish_fetch_verify_with_the_qemu_img_second_opinion_gives_an_identical_master() {
    within_a_minute(publish_fetch_verify(true)).await;
}
