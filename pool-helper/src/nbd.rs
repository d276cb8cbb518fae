//! A small read-only NBD server (the server side of the fixed newstyle handshake and the simple
//! reply transmission phase): what QEMU's `nbd` block driver needs to read a lazy master
//! (docs/lazy.md). Everything a client sends is untrusted: every length is bounded before
//! anything is allocated or read, the handshake has a deadline, and no input panics.
//!
//! Supported: `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST`,
//! `NBD_OPT_ABORT`; `NBD_CMD_READ`, `NBD_CMD_DISC`, `NBD_CMD_FLUSH` (a no-op). Anything else is
//! refused (`NBD_REP_ERR_UNSUP`, `EPERM` for writes, `EINVAL` for unknown commands). No
//! structured replies, no TLS (the socket is a Unix socket readable by root only).

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags: HAS_FLAGS, READ_ONLY, CAN_MULTI_CONN (every connection sees the same
/// bytes: the export never changes).
pub const TRANSMISSION_FLAGS: u16 = 1 | 2 | (1 << 8);

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ESHUTDOWN: u32 = 108;

/// The largest option payload read (a name is at most 4096 bytes by the protocol).
pub const MAX_OPTION_LEN: u32 = 8 << 10;
/// The largest read or (refused) write payload accepted: QEMU's own limit.
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
/// How many options a client may send before choosing an export.
pub const MAX_OPTIONS: usize = 32;
/// The whole handshake must end within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD connection I/O")]
    Io(#[from] std::io::Error),
    #[error("NBD client flags {0:#x} are not supported")]
    ClientFlags(u32),
    #[error("NBD option magic {0:#x} is wrong")]
    OptionMagic(u64),
    #[error("NBD option {option} is {len} bytes (at most {MAX_OPTION_LEN})")]
    OptionTooLong { option: u32, len: u32 },
    #[error("NBD client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("NBD client asked for export '{0}', which is not served here")]
    UnknownExport(String),
    #[error("NBD client aborted the handshake")]
    Aborted,
    #[error("NBD handshake took more than {} s", HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout,
    #[error("NBD request magic {0:#x} is wrong")]
    RequestMagic(u32),
    #[error("NBD write of {0} bytes is too long to skip")]
    WriteTooLong(u32),
}

/// Where an export's bytes come from. `read_at` fills `buf` whole or fails; it must bound its
/// own waits (a lazy master's read waits for verified pieces, up to a timeout).
pub trait Source: Send + Sync {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// One export: its name (clients may also ask for ""), size and bytes.
#[derive(Debug)]
pub struct Export<S> {
    pub name: String,
    pub size: u64,
    pub source: S,
}

impl<S> Export<S> {
    fn matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }
}

/// A transmission-phase request, as parsed from its 28 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn parse(b: &[u8; 28]) -> Result<Request, NbdError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(NbdError::RequestMagic(magic));
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_be_bytes(a)
        };
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64_at(8),
            offset: u64_at(16),
            len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }
}

/// What to do with a request, decided before any byte is read: a pure function of the request
/// and the export size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read `len` bytes at `offset`.
    Read { offset: u64, len: u32 },
    /// Answer with this error (after skipping `skip` payload bytes).
    Error { errno: u32, skip: u32 },
    /// Answer success with no data.
    Ok,
    /// The client leaves.
    Disconnect,
}

pub fn plan(r: &Request, size: u64) -> Action {
    match r.kind {
        CMD_READ => {
            let in_range = r.offset.checked_add(u64::from(r.len)).is_some_and(|end| end <= size);
            if r.len > MAX_REQUEST_LEN || !in_range {
                Action::Error { errno: EINVAL, skip: 0 }
            } else if r.len == 0 {
                Action::Ok
            } else {
                Action::Read { offset: r.offset, len: r.len }
            }
        }
        CMD_WRITE => Action::Error { errno: EPERM, skip: r.len },
        CMD_DISC => Action::Disconnect,
        CMD_FLUSH => Action::Ok,
        _ => Action::Error { errno: EINVAL, skip: 0 },
    }
}

/// The export name of an `NBD_OPT_GO`/`NBD_OPT_INFO` payload (u32 length, name, u16 count,
/// count × u16 info requests). `None`: malformed.
pub fn parse_go(data: &[u8]) -> Option<String> {
    let n = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(n)?)?;
    let rest = &data[4 + n..];
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    if rest.len() != 2 + 2 * count {
        return None;
    }
    String::from_utf8(name.to_vec()).ok()
}

async fn option_reply<W: AsyncWrite + Unpin>(w: &mut W, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await
}

async fn export_info<W: AsyncWrite + Unpin>(w: &mut W, option: u32, size: u64) -> std::io::Result<()> {
    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&size.to_be_bytes());
    info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    option_reply(w, option, REP_INFO, &info).await?;
    let mut bs = Vec::with_capacity(14);
    bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    bs.extend_from_slice(&1u32.to_be_bytes());
    bs.extend_from_slice(&4096u32.to_be_bytes());
    bs.extend_from_slice(&MAX_REQUEST_LEN.to_be_bytes());
    option_reply(w, option, REP_INFO, &bs).await?;
    option_reply(w, option, REP_ACK, &[]).await
}

/// The handshake: Ok when the client chose this export and transmission begins.
pub async fn handshake<IO, S>(io: &mut IO, export: &Export<S>) -> Result<(), NbdError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&hello).await?;
    io.flush().await?;
    let cflags = io.read_u32().await?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 || cflags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::ClientFlags(cflags));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    for _ in 0..MAX_OPTIONS {
        let magic = io.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(NbdError::OptionMagic(magic));
        }
        let option = io.read_u32().await?;
        let len = io.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(NbdError::OptionTooLong { option, len });
        }
        let mut data = vec![0u8; len as usize];
        io.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if !export.matches(&name) {
                    return Err(NbdError::UnknownExport(name));
                }
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&export.size.to_be_bytes());
                b.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                io.write_all(&b).await?;
                io.flush().await?;
                return Ok(());
            }
            OPT_ABORT => {
                let _ = option_reply(io, option, REP_ACK, &[]).await;
                let _ = io.flush().await;
                return Err(NbdError::Aborted);
            }
            OPT_LIST => {
                if data.is_empty() {
                    let mut d = Vec::with_capacity(4 + export.name.len());
                    d.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(export.name.as_bytes());
                    option_reply(io, option, REP_SERVER, &d).await?;
                    option_reply(io, option, REP_ACK, &[]).await?;
                } else {
                    option_reply(io, option, REP_ERR_INVALID, &[]).await?;
                }
            }
            OPT_GO | OPT_INFO => match parse_go(&data) {
                None => option_reply(io, option, REP_ERR_INVALID, &[]).await?,
                Some(name) if !export.matches(&name) => option_reply(io, option, REP_ERR_UNKNOWN, &[]).await?,
                Some(_) => {
                    export_info(io, option, export.size).await?;
                    if option == OPT_GO {
                        io.flush().await?;
                        return Ok(());
                    }
                }
            },
            // TLS is refused by policy (a root-only Unix socket); anything else is not supported.
            5 => option_reply(io, option, REP_ERR_POLICY, &[]).await?,
            _ => option_reply(io, option, REP_ERR_UNSUP, &[]).await?,
        }
        io.flush().await?;
    }
    Err(NbdError::TooManyOptions)
}

async fn simple_reply<W: AsyncWrite + Unpin>(w: &mut W, errno: u32, cookie: u64, data: &[u8]) -> std::io::Result<()> {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&errno.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    w.write_all(&h).await?;
    if !data.is_empty() {
        w.write_all(data).await?;
    }
    w.flush().await
}

/// Statistics of one connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub reads: u64,
    pub bytes: u64,
    pub errors: u64,
}

/// How many requests of one connection are served at once (more wait to be read off the socket).
pub const MAX_IN_FLIGHT: usize = 16;
/// How many bytes the reads in flight on one connection may hold at once (a read waits for its
/// share before its buffer is allocated).
pub const MAX_IN_FLIGHT_BYTES: u32 = 64 << 20;

type Writer<IO> = std::sync::Arc<tokio::sync::Mutex<tokio::io::WriteHalf<IO>>>;

/// Writes one reply whole (the writer's lock is held only while this reply is written). A
/// failed write is recorded: the connection is broken, the reader side ends it.
async fn reply<IO: AsyncWrite>(w: &Writer<IO>, errno: u32, cookie: u64, data: &[u8]) -> bool {
    let mut w = w.lock().await;
    simple_reply(&mut *w, errno, cookie, data).await.is_ok()
}

/// Serves one connection: the handshake (bounded by [`HANDSHAKE_TIMEOUT`]), then requests until
/// the client disconnects. Reads run concurrently (at most [`MAX_IN_FLIGHT`] and
/// [`MAX_IN_FLIGHT_BYTES`] at once) and are answered as each completes, in any order (NBD
/// matches replies to requests by cookie); a disconnect waits for the reads in flight. A read the
/// source fails is answered `EIO` and the connection goes on (the client decides; QEMU reports
/// an I/O error to the guest).
pub async fn serve<IO, S>(mut io: IO, export: std::sync::Arc<Export<S>>) -> Result<Served, NbdError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: Source + 'static,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut io, &export))
        .await
        .map_err(|_| NbdError::HandshakeTimeout)??;
    let (mut rd, wr) = tokio::io::split(io);
    let wr: Writer<IO> = std::sync::Arc::new(tokio::sync::Mutex::new(wr));
    let served = std::sync::Arc::new(std::sync::Mutex::new(Served::default()));
    let count = {
        let served = served.clone();
        move |f: &dyn Fn(&mut Served)| f(&mut served.lock().unwrap_or_else(|p| p.into_inner()))
    };
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let bytes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT_BYTES as usize));
    let mut reads = tokio::task::JoinSet::new();
    let res = loop {
        // Reap finished reads (their results are in `served`; a panic is not expected).
        while reads.try_join_next().is_some() {}
        let mut hdr = [0u8; 28];
        match rd.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let r = match Request::parse(&hdr) {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        match plan(&r, export.size) {
            Action::Disconnect => break Ok(()),
            Action::Ok => {
                if !reply(&wr, 0, r.cookie, &[]).await {
                    break Ok(());
                }
            }
            Action::Error { errno, skip } => {
                if skip > MAX_REQUEST_LEN {
                    break Err(NbdError::WriteTooLong(skip));
                }
                match tokio::io::copy(&mut (&mut rd).take(u64::from(skip)), &mut tokio::io::sink()).await {
                    Ok(n) if n == u64::from(skip) => {}
                    Ok(_) => break Ok(()),
                    Err(e) => break Err(e.into()),
                }
                count(&|s| s.errors += 1);
                if !reply(&wr, errno, r.cookie, &[]).await {
                    break Ok(());
                }
            }
            Action::Read { offset, len } => {
                // Both bounds are taken before the buffer exists; they are released when the
                // reply is written.
                let Ok(slot) = slots.clone().acquire_owned().await else { break Ok(()) };
                let Ok(share) = bytes.clone().acquire_many_owned(len).await else { break Ok(()) };
                let (export, wr, count) = (export.clone(), wr.clone(), count.clone());
                reads.spawn(async move {
                    let _held = (slot, share);
                    let mut buf = vec![0u8; len as usize];
                    match export.source.read_at(offset, &mut buf).await {
                        Ok(()) => {
                            count(&|s| {
                                s.reads += 1;
                                s.bytes += u64::from(len);
                            });
                            reply(&wr, 0, r.cookie, &buf).await;
                        }
                        Err(e) => {
                            tracing::warn!("NBD read of {len} bytes at {offset} of '{}' failed: {e}", export.name);
                            count(&|s| s.errors += 1);
                            reply(&wr, EIO, r.cookie, &[]).await;
                        }
                    }
                });
            }
        }
    };
    // The reads in flight are answered before the connection ends (NBD_CMD_DISC asks for it).
    while reads.join_next().await.is_some() {}
    let s = *served.lock().unwrap_or_else(|p| p.into_inner());
    res.map(|()| s)
}

/// A [`Source`] over a plain file (tests, and a master already complete).
#[derive(Debug)]
pub struct FileSource(pub std::sync::Arc<std::fs::File>);

impl Source for FileSource {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let f = self.0.clone();
        let len = buf.len();
        let data = tokio::task::spawn_blocking(move || {
            let mut b = vec![0u8; len];
            f.read_exact_at(&mut b, offset).map(|_| b)
        })
        .await
        .map_err(std::io::Error::other)??;
        buf.copy_from_slice(&data);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    struct Pattern;
    impl Source for Pattern {
        async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
    }

    struct Failing;
    impl Source for Failing {
        async fn read_at(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
            Err(std::io::Error::other("piece not verified in time"))
        }
    }

    fn export<S>(source: S) -> Arc<Export<S>> {
        Arc::new(Export { name: "m.qcow2".into(), size: 1 << 20, source })
    }

    fn req(kind: u16, offset: u64, len: u32) -> Request {
        Request { flags: 0, kind, cookie: 7, offset, len }
    }

    fn req_bytes(r: &Request) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&r.flags.to_be_bytes());
        b.extend_from_slice(&r.kind.to_be_bytes());
        b.extend_from_slice(&r.cookie.to_be_bytes());
        b.extend_from_slice(&r.offset.to_be_bytes());
        b.extend_from_slice(&r.len.to_be_bytes());
        b
    }

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        option(OPT_GO, &d)
    }

    /// Runs the server on `input` (the client's bytes, then EOF) and returns what it wrote.
    async fn run<S: Source + 'static>(input: Vec<u8>, export: &Arc<Export<S>>) -> (Result<Served, NbdError>, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64 << 20);
        let (r, out) = tokio::join!(serve(server, export.clone()), async move {
            client.write_all(&input).await.unwrap();
            client.shutdown().await.unwrap();
            let mut out = Vec::new();
            client.read_to_end(&mut out).await.unwrap();
            out
        });
        (r, out)
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn requests_parse_and_a_bad_magic_is_refused() {
        let r = req(CMD_READ, 4096, 512);
        let b: [u8; 28] = req_bytes(&r).try_into().unwrap();
        assert_eq!(Request::parse(&b).unwrap(), r);
        let mut bad = b;
        bad[0] ^= 1;
        assert!(matches!(Request::parse(&bad), Err(NbdError::RequestMagic(_))));
    }

    #[test]
    fn reads_outside_the_export_or_too_long_are_refused_and_writes_are_skipped() {
        let size = 1 << 20;
        assert_eq!(plan(&req(CMD_READ, 0, 512), size), Action::Read { offset: 0, len: 512 });
        assert_eq!(plan(&req(CMD_READ, size - 512, 512), size), Action::Read { offset: size - 512, len: 512 });
        assert_eq!(plan(&req(CMD_READ, size - 511, 512), size), Action::Error { errno: EINVAL, skip: 0 });
        assert_eq!(plan(&req(CMD_READ, u64::MAX, 512), size), Action::Error { errno: EINVAL, skip: 0 });
        assert_eq!(plan(&req(CMD_READ, 0, MAX_REQUEST_LEN + 1), u64::MAX), Action::Error { errno: EINVAL, skip: 0 });
        assert_eq!(plan(&req(CMD_READ, 0, 0), size), Action::Ok);
        assert_eq!(plan(&req(CMD_WRITE, 0, 4096), size), Action::Error { errno: EPERM, skip: 4096 });
        assert_eq!(plan(&req(CMD_DISC, 0, 0), size), Action::Disconnect);
        assert_eq!(plan(&req(CMD_FLUSH, 0, 0), size), Action::Ok);
        assert_eq!(plan(&req(99, 0, 0), size), Action::Error { errno: EINVAL, skip: 0 });
    }

    #[test]
    fn go_payloads_parse_only_when_well_formed() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_go(&d).as_deref(), Some("abc"));
        assert_eq!(parse_go(&d[..d.len() - 1]), None);
        assert_eq!(parse_go(&u32::MAX.to_be_bytes()), None);
        assert_eq!(parse_go(&[]), None);
    }

    #[test]
    fn a_client_negotiates_with_go_and_reads_the_source_bytes() {
        let e = export(Pattern);
        let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
        input.extend(option(8, &[])); // structured replies: refused, the client goes on
        input.extend(go("m.qcow2"));
        input.extend(req_bytes(&req(CMD_READ, 1000, 300)));
        input.extend(req_bytes(&Request { cookie: 8, ..req(CMD_WRITE, 0, 10) }));
        input.extend([0u8; 10]);
        input.extend(req_bytes(&req(CMD_DISC, 0, 0)));
        let (r, out) = rt().block_on(run(input, &e));
        assert_eq!(r.unwrap(), Served { reads: 1, bytes: 300, errors: 1 });
        // hello (18), unsup reply (20), info export (20+12), info block size (20+14), ack (20)
        let t = 18 + 20 + 32 + 34 + 20;
        assert_eq!(&out[18 + 8..18 + 16], &[0, 0, 0, 8, 0x80, 0, 0, 1]);
        let got = replies(&out[t..], &[(7, 300), (8, 0)].into_iter().collect());
        assert_eq!(got.len(), 2, "the read and the write are answered, once each");
        for (errno, cookie, data) in got {
            if cookie == 7 {
                assert_eq!(errno, 0);
                assert_eq!(data.len(), 300);
                assert!(data.iter().enumerate().all(|(i, &b)| b == ((1000 + i) % 251) as u8));
            } else {
                assert_eq!((errno, cookie), (EPERM, 8));
            }
        }
    }

    #[test]
    fn an_old_style_export_name_gets_the_size_and_a_failed_read_is_eio_not_data() {
        let e = export(Failing);
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(option(OPT_EXPORT_NAME, b""));
        input.extend(req_bytes(&req(CMD_READ, 0, 4096)));
        let (r, out) = rt().block_on(run(input, &e));
        assert_eq!(r.unwrap(), Served { reads: 0, bytes: 0, errors: 1 });
        assert_eq!(&out[18..26], &(1u64 << 20).to_be_bytes());
        let t = 18 + 10 + 124;
        assert_eq!(&out[t + 4..t + 8], &EIO.to_be_bytes());
        assert_eq!(out.len(), t + 16, "no data follows a failed read");
    }

    #[test]
    fn an_unknown_export_is_refused() {
        let e = export(Pattern);
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(go("other"));
        let (r, out) = rt().block_on(run(input, &e));
        assert!(r.is_err());
        assert_eq!(&out[18 + 12..18 + 16], &REP_ERR_UNKNOWN.to_be_bytes());
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(option(OPT_EXPORT_NAME, b"other"));
        assert!(matches!(rt().block_on(run(input, &e)).0, Err(NbdError::UnknownExport(_))));
    }

    #[test]
    fn a_huge_option_is_refused_before_it_is_read() {
        let e = export(Pattern);
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(IHAVEOPT.to_be_bytes());
        input.extend(OPT_GO.to_be_bytes());
        input.extend(u32::MAX.to_be_bytes());
        assert!(matches!(rt().block_on(run(input, &e)).0, Err(NbdError::OptionTooLong { .. })));
    }

    /// The pattern source, each read delayed by its offset's low bits (milliseconds), or held
    /// until released for the offset `gate`.
    struct Slow {
        gate: u64,
        open: tokio::sync::Notify,
        in_flight: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }
    impl Slow {
        fn new(gate: u64) -> Self {
            Slow { gate, open: tokio::sync::Notify::new(), in_flight: 0.into(), most: 0.into() }
        }
    }
    impl Source for Slow {
        async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            use std::sync::atomic::Ordering::SeqCst;
            let n = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(n, SeqCst);
            if offset == self.gate {
                self.open.notified().await;
            } else {
                tokio::time::sleep(Duration::from_millis(offset % 7)).await;
                if Some(offset) == self.gate.checked_add(4096) {
                    self.open.notify_one();
                }
            }
            self.in_flight.fetch_sub(1, SeqCst);
            Pattern.read_at(offset, buf).await
        }
    }

    /// Splits a server's transmission output into (errno, cookie, data) replies; `lens` maps a
    /// cookie to the length its read returns.
    fn replies(mut out: &[u8], lens: &std::collections::HashMap<u64, usize>) -> Vec<(u32, u64, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(&out[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
            let errno = u32::from_be_bytes(out[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(out[8..16].try_into().unwrap());
            let n = if errno == 0 { lens[&cookie] } else { 0 };
            v.push((errno, cookie, out[16..16 + n].to_vec()));
            out = &out[16 + n..];
        }
        v
    }

    fn go_prefix() -> (Vec<u8>, usize) {
        let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
        input.extend(go(""));
        (input, 18 + 32 + 34 + 20)
    }

    #[test]
    fn a_read_waiting_for_its_pieces_does_not_hold_up_the_reads_behind_it() {
        // The first read waits until the second one is served: one at a time, this never ends.
        let e = export(Slow::new(8192));
        let (mut input, t) = go_prefix();
        let mut lens = std::collections::HashMap::new();
        for (cookie, offset) in [(1u64, 8192u64), (2, 8192 + 4096)] {
            input.extend(req_bytes(&Request { flags: 0, kind: CMD_READ, cookie, offset, len: 512 }));
            lens.insert(cookie, 512);
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (r, out) = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), run(input, &e)).await })
            .expect("the second read is served while the first waits");
        assert_eq!(r.unwrap(), Served { reads: 2, bytes: 1024, errors: 0 });
        let got = replies(&out[t..], &lens);
        assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>(), [2, 1], "replies in completion order");
        for (errno, cookie, data) in got {
            let offset = if cookie == 1 { 8192 } else { 8192 + 4096 };
            assert_eq!(errno, 0);
            assert!(data.iter().enumerate().all(|(i, &b)| b == ((offset + i) % 251) as u8));
        }
        assert_eq!(e.source.most.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn reads_in_flight_are_bounded() {
        let (mut input, t) = go_prefix();
        let mut lens = std::collections::HashMap::new();
        for cookie in 0..(3 * MAX_IN_FLIGHT as u64) {
            input.extend(req_bytes(&Request { flags: 0, kind: CMD_READ, cookie, offset: cookie * 4096, len: 4096 }));
            lens.insert(cookie, 4096);
        }
        // Three reads of 32 MiB: only two fit in MAX_IN_FLIGHT_BYTES at once.
        for cookie in 1000..1003u64 {
            input.extend(req_bytes(&Request { flags: 0, kind: CMD_READ, cookie, offset: 0, len: MAX_REQUEST_LEN }));
            lens.insert(cookie, MAX_REQUEST_LEN as usize);
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let e2 = Arc::new(Export { name: "big".into(), size: 1 << 30, source: Slow::new(u64::MAX) });
        let (r, out) = rt.block_on(run(input, &e2));
        let r = r.unwrap();
        assert_eq!(r.reads, 3 * MAX_IN_FLIGHT as u64 + 3);
        assert_eq!(replies(&out[t..], &lens).len(), 3 * MAX_IN_FLIGHT + 3);
        let most = e2.source.most.load(std::sync::atomic::Ordering::SeqCst);
        assert!(most > 1 && most <= MAX_IN_FLIGHT, "{most} reads at once");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Any mix of reads (delayed differently), writes, flushes and bad reads: every request
        /// gets exactly one reply, under its own cookie, with its own bytes.
        #[test]
        fn concurrent_replies_match_their_requests(
            reqs in proptest::collection::vec((0u16..4, 0u64..(1 << 20) + 8, 1u32..20_000), 1..40)
        ) {
            let e = export(Slow::new(u64::MAX));
            let (mut input, t) = go_prefix();
            let mut lens = std::collections::HashMap::new();
            let mut expect = std::collections::HashMap::new();
            for (i, &(kind, offset, len)) in reqs.iter().enumerate() {
                let cookie = i as u64;
                let kind = [CMD_READ, CMD_READ, CMD_WRITE, CMD_FLUSH][kind as usize];
                let r = Request { flags: 0, kind, cookie, offset, len };
                input.extend(req_bytes(&r));
                if kind == CMD_WRITE {
                    input.extend(vec![0u8; len as usize]);
                }
                let p = plan(&r, e.size);
                lens.insert(cookie, if let Action::Read { len, .. } = p { len as usize } else { 0 });
                expect.insert(cookie, p);
            }
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let (r, out) = rt.block_on(run(input, &e));
            r.unwrap();
            let got = replies(&out[t..], &lens);
            prop_assert_eq!(got.len(), reqs.len());
            let mut seen = std::collections::HashSet::new();
            for (errno, cookie, data) in got {
                prop_assert!(seen.insert(cookie), "cookie {} answered twice", cookie);
                match expect[&cookie] {
                    Action::Read { offset, .. } => {
                        prop_assert_eq!(errno, 0);
                        prop_assert!(data.iter().enumerate().all(|(i, &b)| b == ((offset + i as u64) % 251) as u8));
                    }
                    Action::Error { errno: want, .. } => prop_assert_eq!(errno, want),
                    Action::Ok => prop_assert_eq!(errno, 0),
                    Action::Disconnect => prop_assert!(false),
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn no_bytes_from_a_client_panic_the_server(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let e = export(Pattern);
            let _ = rt().block_on(run(bytes, &e));
        }

        #[test]
        fn no_bytes_after_a_good_handshake_panic_the_server(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let e = export(Pattern);
            let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            input.extend(go(""));
            input.extend(bytes);
            let _ = rt().block_on(run(input, &e));
        }

        #[test]
        fn any_request_header_parses_or_is_refused(b in proptest::array::uniform28(any::<u8>())) {
            if let Ok(r) = Request::parse(&b) {
                let _ = plan(&r, 1 << 30);
            }
        }
    }

    /// QEMU's own NBD client (qemu-img) reads an image through the server: the bytes and the
    /// format it sees are the file's.
    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img and qemu-io")]
    fn qemu_img_reads_an_image_through_the_server() {
        let Ok(out) = std::process::Command::new("qemu-img").arg("--version").output() else {
            panic!("qemu-img is needed (apt-get install qemu-utils)");
        };
        assert!(out.status.success());
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("m.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("64M")
            .status()
            .unwrap();
        assert!(st.success());
        let st = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0xab 1M 64k"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let f = std::fs::File::open(&img).unwrap();
        let size = f.metadata().unwrap().len();
        let e = std::sync::Arc::new(Export { name: "m.qcow2".into(), size, source: FileSource(f.into()) });
        let sock = dir.path().join("nbd.sock");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = rt.block_on(async { tokio::net::UnixListener::bind(&sock) }).unwrap();
        let e2 = e.clone();
        rt.spawn(async move {
            loop {
                let (c, _) = listener.accept().await.unwrap();
                let e3 = e2.clone();
                tokio::spawn(async move { serve(c, e3).await });
            }
        });
        let json = format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"nbd","server":{{"type":"unix","path":"{}"}},"export":"m.qcow2"}}}}"#,
            sock.display()
        );
        let out = std::process::Command::new("qemu-io")
            .args(["-r", "-c", "read -P 0xab 1M 64k", "-c", "read -P 0 0 1M"])
            .arg(&json)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.contains("Pattern verification failed"), "{text}");
        let out = std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(&json).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("\"virtual-size\": 67108864"), "{text} {}", String::from_utf8_lossy(&out.stderr));
    }
}
