//! A hostile BitTorrent peer for the tests: it speaks the wire protocol (BEP 3, BEP 10, BEP 9)
//! wrongly on purpose, to show that pool-helper (its vendored librqbit) neither panics nor wedges
//! on what a peer sends. Plain std threads and sockets; no BitTorrent library.
//!
//! - [`HostilePeer::listen`]: a peer that a fetching daemon connects to (list its address in the
//!   manifest's `peers`); every connection gets the same [`Act`].
//! - [`attack`]: connects to a seeding daemon and performs an [`Act`] there.
//! - [`misbehaviours`]: every misbehaviour this module knows, one [`Act`] each.
//!
//! How long to run: [`rounds`] reads `VCC_HOSTILE_ROUNDS` (default 1; docs/testing.md).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// librqbit's own id for ut_metadata in the extended handshake it sends (`MY_EXTENDED_UT_METADATA`):
/// messages *to* a librqbit peer carry it.
const THEIR_UT_METADATA: u8 = 3;
/// The id we declare for ut_metadata: messages *from* a librqbit peer to us carry it.
const OUR_UT_METADATA: u8 = 1;

/// What the hostile peer does on a connection, after the 68-byte handshake.
#[derive(Debug, Clone)]
pub enum Act {
    /// Sends these frames (each a whole message, length prefix included), then reads whatever
    /// comes until the other side hangs up or a few seconds pass. With `wrong_info_hash` the
    /// handshake names another torrent.
    Frames { name: &'static str, wrong_info_hash: bool, frames: Vec<Vec<u8>> },
    /// A metadata server (BEP 9) for these bytes, whatever they are: it announces their size and
    /// answers every ut_metadata request; it has no pieces.
    ServeInfo(Vec<u8>),
}

impl Act {
    pub fn name(&self) -> &'static str {
        match self {
            Act::Frames { name, .. } => name,
            Act::ServeInfo(_) => "serves metadata",
        }
    }
}

/// How many rounds the hostile scenarios run: `VCC_HOSTILE_ROUNDS`, default 1.
pub fn rounds() -> usize {
    std::env::var("VCC_HOSTILE_ROUNDS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(1)
}

/// One message: length prefix, id, payload.
pub fn frame(id: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    f.push(id);
    f.extend_from_slice(payload);
    f
}

/// An extended message (id 20) with extension id `ext`.
pub fn ext(ext: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![ext];
    p.extend_from_slice(payload);
    frame(20, &p)
}

fn u32s(id: u8, v: &[u32]) -> Vec<u8> {
    frame(id, &v.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>())
}

/// Our extended handshake: ut_metadata supported, `metadata_size` announced when given.
pub fn extended_handshake(metadata_size: Option<u64>) -> Vec<u8> {
    let size = metadata_size.map(|s| format!("13:metadata_sizei{s}e")).unwrap_or_default();
    ext(0, format!("d1:md11:ut_metadatai{OUR_UT_METADATA}ee{size}e").as_bytes())
}

/// A ut_metadata data message for librqbit.
pub fn metadata_data(piece: u64, total_size: u64, data: &[u8]) -> Vec<u8> {
    let mut p = format!("d8:msg_typei1e5:piecei{piece}e10:total_sizei{total_size}ee").into_bytes();
    p.extend_from_slice(data);
    ext(THEIR_UT_METADATA, &p)
}

/// Every misbehaviour, one act each, for a torrent of `total_pieces` pieces.
pub fn misbehaviours(total_pieces: u32) -> Vec<Act> {
    let n = total_pieces;
    let bf_len = n.div_ceil(8) as usize;
    let hs = || extended_handshake(None);
    let f = |name, frames| Act::Frames { name, wrong_info_hash: false, frames };
    let mut oversized = 0x7fff_ffffu32.to_be_bytes().to_vec();
    oversized.push(20);
    oversized.extend(std::iter::repeat_n(0xa5u8, 40_000));
    let flood: Vec<Vec<u8>> = (0..20_000).map(|i| frame((i % 4) as u8, &[])).collect();
    vec![
        f("ut_metadata data before the extended handshake", vec![metadata_data(0, 5, b"hello")]),
        f("ut_metadata data after a handshake without metadata_size", vec![hs(), metadata_data(0, 5, b"hello")]),
        f("a message of 2 GiB", vec![oversized]),
        f("an extended handshake that is not bencode", vec![ext(0, b"\xff\xfe not bencode")]),
        f("an integer too big for its field", vec![ext(0, b"d4:reqqi99999999999999999999ee")]),
        f("a string length too big for memory", vec![ext(0, b"d99999999999999999999999:xi1ee")]),
        f("metadata_size 0", vec![ext(0, b"d1:md11:ut_metadatai1ee13:metadata_sizei0ee")]),
        f("metadata_size 4 GiB", vec![ext(0, b"d1:md11:ut_metadatai1ee13:metadata_sizei4294967295ee")]),
        f(
            "ut_metadata pieces out of range",
            vec![
                extended_handshake(Some(100)),
                metadata_data(7, 100, &[0; 100]),
                metadata_data(0, 100, &[0; 99]),
                metadata_data(4_294_967_295, 4_294_967_295, &[0; 16]),
            ],
        ),
        f(
            "ut_metadata requests out of range",
            vec![
                hs(),
                ext(THEIR_UT_METADATA, b"d8:msg_typei0e5:piecei4294967295ee"),
                ext(THEIR_UT_METADATA, b"d8:msg_typei0e5:piecei999ee"),
            ],
        ),
        f("an unknown extension id", vec![hs(), ext(250, b"garbage")]),
        f("an unknown message id", vec![hs(), frame(99, b"garbage")]),
        f("a bitfield of the wrong length", vec![hs(), frame(5, &vec![0xff; bf_len + 5])]),
        f("a bitfield with its spare bits set", vec![hs(), frame(5, &vec![0xff; bf_len])]),
        f("an empty bitfield message", vec![hs(), frame(5, &[])]),
        f("HAVE for pieces that do not exist", vec![hs(), u32s(4, &[u32::MAX]), u32s(4, &[n]), u32s(4, &[n + 1])]),
        f("a HAVE of the wrong length", vec![hs(), frame(4, &[1, 2])]),
        f(
            "requests out of range",
            vec![
                hs(),
                frame(2, &[]),
                u32s(6, &[u32::MAX, 0, 16384]),
                u32s(6, &[0, u32::MAX, 16384]),
                u32s(6, &[0, 0, 0]),
                u32s(6, &[0, 0, u32::MAX]),
                u32s(6, &[n, 0, 16384]),
                u32s(6, &[0, 16383, 16384]),
                u32s(8, &[u32::MAX, u32::MAX, u32::MAX]),
            ],
        ),
        f(
            "pieces nobody asked for, out of range",
            vec![
                hs(),
                frame(5, &vec![0xff; bf_len]),
                frame(7, &[&u32::MAX.to_be_bytes()[..], &0u32.to_be_bytes(), &[0; 16]].concat()),
                frame(7, &[&0u32.to_be_bytes()[..], &(u32::MAX - 3).to_be_bytes(), &[0; 16]].concat()),
                frame(7, &[&0u32.to_be_bytes()[..], &0u32.to_be_bytes(), &[0; 1]].concat()),
                frame(7, &[0; 8]),
            ],
        ),
        f("a choke/unchoke/interested flood", [vec![hs()], flood].concat()),
        Act::Frames {
            name: "a handshake for another torrent",
            wrong_info_hash: true,
            frames: vec![hs(), frame(5, &vec![0xff; bf_len])],
        },
    ]
}

fn parse_hex20(s: &str) -> [u8; 20] {
    let mut out = [0u8; 20];
    assert_eq!(s.len(), 40, "an info-hash is 40 hex digits: {s}");
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

fn handshake(info_hash: &[u8; 20]) -> Vec<u8> {
    let mut h = vec![19];
    h.extend_from_slice(b"BitTorrent protocol");
    h.extend_from_slice(&[0, 0, 0, 0, 0, 0x10, 0, 0]); // extension protocol (BEP 10)
    h.extend_from_slice(info_hash);
    h.extend_from_slice(b"-HO0001-hostilepeer!");
    h
}

/// Reads one message (a keep-alive is an empty frame); None at EOF or error.
fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 1 << 20 {
        return None;
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).ok()?;
    Some(buf)
}

/// The `piece` of a ut_metadata request (`d8:msg_typei0e5:piecei{N}ee`).
fn requested_piece(payload: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(payload).ok()?;
    if !s.contains("8:msg_typei0e") {
        return None;
    }
    let rest = &s[s.find("5:piecei")? + 8..];
    rest[..rest.find('e')?].parse().ok()
}

/// Performs `act` on a connected stream: handshake, then the act. Errors (the other side hanging
/// up, as it should) end it quietly.
fn run(mut s: TcpStream, info_hash: [u8; 20], act: &Act) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    let mut hash = info_hash;
    if let Act::Frames { wrong_info_hash: true, .. } = act {
        hash[0] ^= 0xff;
    }
    if s.write_all(&handshake(&hash)).is_err() {
        return;
    }
    let mut theirs = [0u8; 68];
    if s.read_exact(&mut theirs).is_err() {
        return;
    }
    match act {
        Act::Frames { frames, .. } => {
            for f in frames {
                if s.write_all(f).is_err() {
                    return;
                }
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) && read_frame(&mut s).is_some() {}
        }
        Act::ServeInfo(info) => {
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            if s.write_all(&extended_handshake(Some(info.len() as u64))).is_err() {
                return;
            }
            while let Some(m) = read_frame(&mut s) {
                let Some(piece) =
                    (m.len() > 2 && m[0] == 20 && m[1] == OUR_UT_METADATA).then(|| requested_piece(&m[2..])).flatten()
                else {
                    continue;
                };
                let start = (piece as usize).saturating_mul(16384).min(info.len());
                let end = (start + 16384).min(info.len());
                if s.write_all(&metadata_data(piece, info.len() as u64, &info[start..end])).is_err() {
                    return;
                }
            }
        }
    }
}

/// Connects to `target` (a seeding daemon) for the torrent `info_hash` (hex) and performs `act`.
pub fn attack(target: SocketAddr, info_hash: &str, act: &Act) -> std::io::Result<()> {
    let s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    run(s, parse_hex20(info_hash), act);
    Ok(())
}

/// A hostile peer listening on 127.0.0.1: every connection gets `act`. Stops on drop.
#[derive(Debug)]
pub struct HostilePeer {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HostilePeer {
    pub fn listen(info_hash: &str, act: Act) -> HostilePeer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let hash = parse_hex20(info_hash);
        let (connections, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (c, st) = (connections.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let act = Arc::new(act);
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        c.fetch_add(1, Ordering::Relaxed);
                        let _ = s.set_nonblocking(false);
                        let act = act.clone();
                        std::thread::spawn(move || run(s, hash, &act));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        HostilePeer { addr, connections, stop, thread: Some(thread) }
    }

    /// `127.0.0.1:PORT`, as a manifest's `peers` lists it.
    pub fn peer(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for HostilePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_length_and_a_request_names_its_piece() {
        assert_eq!(frame(1, &[]), vec![0, 0, 0, 1, 1]);
        assert_eq!(ext(3, b"x"), vec![0, 0, 0, 3, 20, 3, b'x']);
        assert_eq!(requested_piece(b"d8:msg_typei0e5:piecei12ee"), Some(12));
        assert_eq!(requested_piece(b"d8:msg_typei1e5:piecei12ee"), None);
        assert_eq!(handshake(&[9; 20]).len(), 68);
        assert!(misbehaviours(9).len() > 15);
    }
}
