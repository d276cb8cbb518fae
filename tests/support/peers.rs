//! Third-party BitTorrent clients as peers: aria2c, and python3-libtorrent through `lt.py`.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::process::Bg;

/// `lt.py` (python3-libtorrent as a peer): `python3 LT download|seed TORRENT DIR PORT`.
pub const LT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/support/lt.py");

/// aria2c on loopback only: no DHT, LSD or PEX, quiet.
pub fn aria2c(args: &[&str]) -> Command {
    let mut c = Command::new("aria2c");
    c.args([
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=false",
        "--summary-interval=0",
        "--console-log-level=warn",
        "--disable-ipv6=true",
    ]);
    c.args(args).stdin(Stdio::null());
    c
}

/// aria2c seeding `torrent` from the data in `dir` on `port`, trusting that data as it is
/// (`--bt-seed-unverified`: how a peer serving a corrupt copy is made), until killed.
pub fn aria2c_seed_unverified(port: u16, dir: &Path, torrent: &Path) -> Bg {
    Bg(aria2c(&[
        "--bt-seed-unverified=true",
        "--seed-ratio=0.0",
        "--listen-port",
        &port.to_string(),
        "-d",
        dir.to_str().unwrap(),
        torrent.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap())
}
