//! LAN catalog announcements (docs/many-hosts.md section 3): a daemon seeding a signed master
//! says so in one UDP datagram, to the multicast group [`GROUP`] and to each of its `peers` hosts,
//! at `catalog_port`; a daemon that hears one checks it (bounded, parsed, manifest validated,
//! signature verified against `allowed_signers`) and only then puts it in its catalog, with the
//! announcer as a host (a BitTorrent peer for the master's swarm).
//!
//! The datagram is JSON, at most [`MAX_DATAGRAM`] bytes:
//! `{"v":1,"host":"HOST:PORT","manifest":"…","signature":"-----BEGIN SSH SIGNATURE-----…"}`.
//! `manifest` is the master's **catalog form**: its manifest without `torrent_hex` (which alone
//! can be hundreds of KiB), as compact JSON, signed on its own (SSHSIG, the same namespace and key
//! as `NAME.json.sig`). It is a manifest in every other respect: a fetch from it gets the
//! metainfo from peers, checked against the signed info-hash.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use crate::catalog::{Catalog, Trusted};
use crate::config::Config;
use crate::manifest::Manifest;
use crate::sign::{AllowedSigners, SignError, SigningKey, VerifyError};

/// The multicast group of announcements (BEP 14's group, another port).
pub const GROUP: Ipv4Addr = Ipv4Addr::new(239, 192, 152, 143);
/// The largest datagram sent or accepted.
pub const MAX_DATAGRAM: usize = 8 * 1024;
/// The format version of announcements.
pub const VERSION: u32 = 1;
/// Announcements right after a master is added: at 0, 1 and 2 s.
const BURST: u32 = 3;
/// At most one log line per this long about refused announcements.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long resolving a peer's host name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// One announcement as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub v: u32,
    /// The announcer's BitTorrent address.
    pub host: String,
    /// The catalog form of the manifest, exactly the bytes signed.
    pub manifest: String,
    /// The armored SSH signature of `manifest`.
    pub signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("the announcement of '{name}' would be {len} bytes, above the {MAX_DATAGRAM}-byte datagram (fewer peers or trackers in its magnet?)")]
    TooLarge { name: String, len: usize },
    #[error("cannot listen for catalog announcements on UDP port {port}")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open a UDP socket for catalog announcements")]
    Socket(#[source] std::io::Error),
}

/// Why a heard announcement is not trusted (logged, rate-limited; never fetched).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("longer than {MAX_DATAGRAM} bytes")]
    TooLong,
    #[error("not an announcement: {0}")]
    Json(#[source] serde_json::Error),
    #[error("announcement version {0}, this host reads {VERSION}")]
    Version(u32),
    #[error("bad announcer address")]
    Host(#[source] crate::manifest::PeerError),
    #[error("bad manifest")]
    Manifest(#[source] crate::manifest::ManifestError),
    #[error("manifest '{name}' not trusted")]
    Signature {
        name: String,
        #[source]
        source: VerifyError,
    },
}

/// The catalog form of a manifest: without `torrent_hex`, compact JSON (what is signed and sent).
pub fn catalog_form(m: &Manifest) -> Vec<u8> {
    serde_json::to_vec(&Manifest { torrent_hex: None, ..m.clone() }).unwrap_or_default()
}

/// Checks a datagram; the trusted entry it makes.
pub fn check(datagram: &[u8], allowed: &AllowedSigners, now: SystemTime) -> Result<Trusted, Refused> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(Refused::TooLong);
    }
    let a: Announcement = serde_json::from_slice(datagram).map_err(Refused::Json)?;
    if a.v != VERSION {
        return Err(Refused::Version(a.v));
    }
    crate::manifest::check_peer(&a.host).map_err(Refused::Host)?;
    let m: Manifest =
        serde_json::from_str(&a.manifest).map_err(|e| Refused::Manifest(crate::manifest::ManifestError::Json(e)))?;
    m.validate().map_err(Refused::Manifest)?;
    let signer = allowed
        .verify(a.manifest.as_bytes(), &a.signature, now)
        .map_err(|source| Refused::Signature { name: m.name.clone(), source })?;
    Ok(Trusted { manifest: m, signed_text: a.manifest, signature: a.signature, signer, host: Some(a.host) })
}

/// What this daemon announces, and where.
#[derive(Debug)]
pub struct Announcer {
    socket: UdpSocket,
    port: u16,
    /// `peers` of the config: their hosts get every announcement too (at `catalog_port`).
    peers: Vec<String>,
    host: String,
    key: Option<SigningKey>,
    interval: Duration,
    /// SHA-256 -> the datagram.
    own: Mutex<HashMap<String, Vec<u8>>>,
    kick: Notify,
}

impl Announcer {
    /// The sending side (a socket of its own, multicast TTL 1: the LAN only).
    pub fn new(cfg: &Config, key: Option<SigningKey>) -> Result<Arc<Announcer>, AnnounceError> {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(AnnounceError::Socket)?;
        s.set_multicast_ttl_v4(1).map_err(AnnounceError::Socket)?;
        s.set_nonblocking(true).map_err(AnnounceError::Socket)?;
        let socket = UdpSocket::from_std(s).map_err(AnnounceError::Socket)?;
        Ok(Arc::new(Announcer {
            socket,
            port: cfg.catalog_port,
            peers: cfg.peers.clone(),
            host: crate::publish::advertised_peer(cfg),
            key,
            interval: Duration::from_secs(cfg.announce_interval),
            own: Mutex::default(),
            kick: Notify::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.own.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Announces a master this host published: its catalog form signed with our key (nothing
    /// without a key). Ok(false): no key.
    pub fn add_own(&self, m: &Manifest) -> Result<bool, AnnounceError> {
        let Some(k) = &self.key else { return Ok(false) };
        let text = catalog_form(m);
        let sig = k.sign(&text)?;
        self.add_signed(m, String::from_utf8_lossy(&text).into_owned(), sig)?;
        Ok(true)
    }

    /// Announces a master signed by someone trusted (a fetched one, as it was heard).
    pub fn add_signed(&self, m: &Manifest, text: String, signature: String) -> Result<(), AnnounceError> {
        let a = Announcement { v: VERSION, host: self.host.clone(), manifest: text, signature };
        let d = serde_json::to_vec(&a).unwrap_or_default();
        if d.len() > MAX_DATAGRAM {
            return Err(AnnounceError::TooLarge { name: m.name.clone(), len: d.len() });
        }
        self.lock().insert(m.sha256.clone(), d);
        self.kick.notify_one();
        Ok(())
    }

    /// Stops announcing a master (republished with other content).
    pub fn remove(&self, sha256: &str) {
        self.lock().remove(sha256);
    }

    /// Where announcements go: the group, and each peer's host at the catalog port.
    async fn targets(&self) -> Vec<SocketAddr> {
        let mut t = vec![SocketAddr::V4(SocketAddrV4::new(GROUP, self.port))];
        for p in &self.peers {
            let host = match p.rsplit_once(':') {
                Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
                None => continue,
            };
            let found =
                tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(format!("{host}:{}", self.port))).await;
            match found {
                Ok(Ok(addrs)) => {
                    for a in addrs.filter(|a| a.is_ipv4()).take(4) {
                        if !t.contains(&a) {
                            t.push(a);
                        }
                    }
                }
                _ => tracing::debug!("catalog: cannot resolve peer host '{host}'"),
            }
        }
        t
    }

    async fn send_all(&self) {
        let datagrams: Vec<Vec<u8>> = self.lock().values().cloned().collect();
        if datagrams.is_empty() {
            return;
        }
        let targets = self.targets().await;
        for d in &datagrams {
            for t in &targets {
                if let Err(e) = self.socket.send_to(d, t).await {
                    tracing::debug!("catalog: announcing to {t}: {e}");
                }
            }
        }
    }

    /// Announces everything every interval, and three times in the two seconds after a master
    /// is added (at once, then 1 and 2 s later).
    pub async fn run(self: Arc<Self>) {
        let mut burst_left = 0u32;
        loop {
            let wait = if burst_left > 0 { Duration::from_secs(1) } else { self.interval };
            if tokio::time::timeout(wait, self.kick.notified()).await.is_ok() {
                burst_left = BURST;
            }
            burst_left = burst_left.saturating_sub(1);
            self.send_all().await;
        }
    }
}

/// Binds the listening socket: `catalog_port` on every address (shared with other daemons of
/// this host), member of [`GROUP`] when the host can join it.
pub fn bind_listener(port: u16) -> Result<UdpSocket, AnnounceError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| AnnounceError::Listen { port, source };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into()).map_err(err)?;
    // A host without a multicast route still hears its peers' unicast announcements.
    if let Err(e) = s.join_multicast_v4(&GROUP, &Ipv4Addr::UNSPECIFIED) {
        tracing::warn!(
            "catalog: cannot join multicast group {GROUP} ({e}): hearing only announcements sent to this host"
        );
    }
    s.set_nonblocking(true).map_err(err)?;
    UdpSocket::from_std(s.into()).map_err(err)
}

/// Hears announcements until the process ends: trusted ones join `catalog`; refused ones get a
/// log line (at most one per [`REFUSAL_LOG_EVERY`], with how many were not logged). Hosts not
/// heard for three intervals drop out.
pub async fn listen(socket: UdpSocket, allowed: Arc<AllowedSigners>, catalog: Arc<Catalog>, interval: Duration) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut last_log: Option<Instant> = None;
    let mut unlogged = 0u64;
    let mut expire = tokio::time::interval(interval);
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, from) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!("catalog: receiving: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(d) = buf.get(..n) else { continue };
                match check(d, &allowed, SystemTime::now()) {
                    Ok(t) => {
                        let (name, host) = (t.manifest.name.clone(), t.host.clone().unwrap_or_default());
                        if catalog.insert_trusted(t) {
                            tracing::info!("catalog: '{name}' announced by {host} ({from})");
                        }
                    }
                    Err(e) => {
                        if last_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
                            let more = if unlogged > 0 { format!(" ({unlogged} more refused since the last line)") } else { String::new() };
                            tracing::warn!("catalog: ignoring an announcement from {from}: {}{more}", vcc_core::error::one_line(&e));
                            last_log = Some(Instant::now());
                            unlogged = 0;
                        } else {
                            unlogged += 1;
                        }
                    }
                }
            }
            _ = expire.tick() => catalog.expire_after(Instant::now(), interval * 3),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn manifest(name: &str) -> Manifest {
        let mut m = crate::catalog::tests::manifest(name, 'a', 'b');
        m.peers = vec!["10.0.0.1:6881".into()];
        m.torrent_hex = Some("00".repeat(100_000));
        m
    }

    fn datagram(k: &SigningKey, text: &str) -> Vec<u8> {
        let a = Announcement {
            v: 1,
            host: "10.0.0.1:6881".into(),
            manifest: text.into(),
            signature: k.sign(text.as_bytes()).unwrap(),
        };
        serde_json::to_vec(&a).unwrap()
    }

    #[test]
    fn a_signed_catalog_form_is_trusted_with_its_signer_and_announcer() {
        let k = SigningKey::from_seed(&[5; 32]);
        let allowed = AllowedSigners::parse(&format!("alice {}", k.public_line())).unwrap();
        let text = String::from_utf8(catalog_form(&manifest("base.raw"))).unwrap();
        assert!(!text.contains("torrent_hex") && !text.contains('\n'), "{text}");
        let d = datagram(&k, &text);
        assert!(d.len() < 2048, "{}", d.len());
        let t = check(&d, &allowed, SystemTime::now()).unwrap();
        assert_eq!(
            (t.manifest.name.as_str(), t.signer.as_str(), t.host.as_deref()),
            ("base.raw", "alice", Some("10.0.0.1:6881"))
        );
        assert_eq!(t.signed_text, text);
    }

    #[test]
    fn unsigned_wrongly_signed_altered_oversized_and_malformed_announcements_are_refused() {
        let (k, other) = (SigningKey::from_seed(&[5; 32]), SigningKey::from_seed(&[6; 32]));
        let allowed = AllowedSigners::parse(&format!("alice {}", k.public_line())).unwrap();
        let text = String::from_utf8(catalog_form(&manifest("base.raw"))).unwrap();
        let now = SystemTime::now();
        let refused = |d: &[u8]| check(d, &allowed, now).unwrap_err();
        assert!(matches!(
            refused(&datagram(&other, &text)),
            Refused::Signature { source: VerifyError::UnknownKey(_), .. }
        ));
        let mut a: Announcement = serde_json::from_slice(&datagram(&k, &text)).unwrap();
        a.manifest = a.manifest.replace("base.raw", "evil.raw");
        let e = refused(&serde_json::to_vec(&a).unwrap());
        assert!(
            matches!(e, Refused::Signature { source: VerifyError::Mismatch, ref name } if name == "evil.raw"),
            "{e}"
        );
        a.signature = String::new();
        assert!(matches!(refused(&serde_json::to_vec(&a).unwrap()), Refused::Signature { .. }));
        let bad_name = text.replace("base.raw", "../x");
        assert!(matches!(refused(&datagram(&k, &bad_name)), Refused::Manifest(_)));
        let mut a: Announcement = serde_json::from_slice(&datagram(&k, &text)).unwrap();
        a.host = "not a host".into();
        assert!(matches!(refused(&serde_json::to_vec(&a).unwrap()), Refused::Host(_)));
        a.v = 2;
        assert!(matches!(refused(&serde_json::to_vec(&a).unwrap()), Refused::Version(2)));
        assert!(matches!(refused(b"\xff{"), Refused::Json(_)));
        assert!(matches!(refused(&vec![b' '; MAX_DATAGRAM + 1]), Refused::TooLong));
    }

    #[test]
    fn a_catalog_form_too_large_for_a_datagram_is_not_announced() {
        let tmp = tempfile::tempdir().unwrap();
        let o = crate::config::Overrides { state_dir: Some(tmp.path().into()), ..Default::default() };
        let cfg = Config::merge(crate::config::FileConfig::default(), &o).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _g = rt.enter();
        let a = Announcer::new(&cfg, Some(SigningKey::from_seed(&[5; 32]))).unwrap();
        let mut m = manifest("big.raw");
        m.magnet = format!("{}&tr={}", m.magnet, "x".repeat(MAX_DATAGRAM));
        let e = a.add_own(&m).unwrap_err();
        assert!(matches!(e, AnnounceError::TooLarge { .. }), "{e}");
        assert!(a.add_own(&manifest("ok.raw")).unwrap());
        assert_eq!(a.lock().len(), 1);
        let none = Announcer::new(&cfg, None).unwrap();
        assert!(!none.add_own(&manifest("ok.raw")).unwrap(), "no key, nothing announced");
    }

    fn free_udp_port() -> u16 {
        std::net::UdpSocket::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port()
    }

    /// Through real sockets on this host: a master added is announced at once to each peer's
    /// host (here this one), whose listener checks it and puts it in the catalog.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_master_added_reaches_a_peers_listener_within_half_a_second_and_is_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let port = free_udp_port();
        let f: crate::config::FileConfig =
            toml::from_str(&format!("catalog_port = {port}\nannounce_interval = 4\npeers = [\"127.0.0.1:6881\"]"))
                .unwrap();
        let o = crate::config::Overrides {
            state_dir: Some(tmp.path().into()),
            advertise: Some("127.0.0.1".into()),
            ..Default::default()
        };
        let cfg = Config::merge(f, &o).unwrap();
        let k = SigningKey::from_seed(&[7; 32]);
        let allowed = Arc::new(AllowedSigners::parse(&format!("alice {}", k.public_line())).unwrap());
        let catalog = Arc::new(Catalog::new());
        tokio::spawn(listen(bind_listener(port).unwrap(), allowed.clone(), catalog.clone(), Duration::from_secs(4)));
        let a = Announcer::new(&cfg, Some(k)).unwrap();
        tokio::spawn(a.clone().run());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = Instant::now();
        assert!(a.add_own(&manifest("heard.raw")).unwrap());
        let start = Instant::now();
        while catalog.by_name("heard.raw").unwrap().is_none() {
            assert!(start.elapsed() < Duration::from_secs(3), "not heard");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let heard = t0.elapsed();
        assert!(heard < Duration::from_millis(500), "heard after {heard:?}");
        let e = &catalog.entries()[0];
        assert_eq!((e.signer.as_str(), e.hosts.as_slice()), ("alice", &[format!("127.0.0.1:{}", cfg.listen_port)][..]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_burst_is_three_datagrams_in_two_seconds_then_one_per_interval() {
        let tmp = tempfile::tempdir().unwrap();
        // A plain socket at the catalog port of a peer on this host: it counts what arrives.
        let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = sink.local_addr().unwrap().port();
        let f: crate::config::FileConfig =
            toml::from_str(&format!("catalog_port = {port}\nannounce_interval = 4\npeers = [\"127.0.0.1:6881\"]"))
                .unwrap();
        let o = crate::config::Overrides { state_dir: Some(tmp.path().into()), ..Default::default() };
        let a = Announcer::new(&Config::merge(f, &o).unwrap(), Some(SigningKey::from_seed(&[7; 32]))).unwrap();
        tokio::spawn(a.clone().run());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        a.add_own(&manifest("m.raw")).unwrap();
        let mut at = Vec::new();
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        while t0.elapsed() < Duration::from_millis(6500) {
            if let Ok(Ok((n, _))) = tokio::time::timeout(Duration::from_millis(100), sink.recv_from(&mut buf)).await {
                let got: Announcement = serde_json::from_slice(&buf[..n]).unwrap();
                assert!(got.manifest.contains("m.raw"));
                at.push(t0.elapsed().as_millis());
            }
        }
        // 0, 1, 2 s, then 6 s (the interval after the burst's last).
        assert_eq!(at.len(), 4, "{at:?}");
        for (t, want) in at.iter().zip([0u128, 1000, 2000, 6000]) {
            assert!(t.abs_diff(want) < 300, "{at:?}");
        }
    }
}
