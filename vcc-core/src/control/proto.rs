//! Control socket protocol (documented in `docs/control-protocol.md`): the one definition of every
//! line on the socket, typed both ways.
//!
//! Unix stream socket, newline-delimited JSON. The client writes ONE request line ([`Request`]);
//! the server writes zero or more event lines ([`Event`], tagged by `event`), then exactly one final
//! line carrying `"ok"` ([`Final`]), then closes.
//!
//! The JSON is byte for byte what the untyped code wrote before these types: the strings of the
//! state enums are today's, and structs whose lines used to go through a `serde_json::Value` (which
//! sorts keys) declare their fields in alphabetical order so that the keys come out in the same
//! order.

use serde::{Deserialize, Serialize};

/// Longest request line the server reads.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// Longest event or final line a client reads (a `status` of many masters stays far below).
pub const MAX_ANSWER_LINE_BYTES: usize = 16 * 1024 * 1024;

/// A request line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Make sure a master is in the pool: answer `present` at once, or fetch it.
    Ensure(MasterRequest),
    /// Like `ensure`, always streaming progress.
    Fetch(MasterRequest),
    /// Seed a master just published on this host (sent by `pool-helper publish`).
    Seed(MasterRequest),
    /// Publish a pool volume as a master: hash it, write its manifest (signed with the daemon's
    /// `signing_key` when it has one), seed it and announce it to the LAN catalog. Answered with
    /// `state: seeding`, the master's `path`, its `manifest` and `manifest_path`.
    Publish(PublishRequest),
    Status,
    List,
    /// What the LAN catalog offers: the final line's `catalog`.
    Catalog,
    /// Stop seeding the master at `path` and forget it on this host (`virt-clone-cow gc --yes`
    /// sends it before removing the file): its torrent leaves the session, it is no longer
    /// announced, and its record goes, so the next start does not seed it again. Answered `ok`
    /// with `forgotten` (how many entries went), 0 when the daemon knows nothing of it.
    Forget(ForgetRequest),
    /// A lazy start (docs/lazy.md): the master's bytes through a read-only NBD export while it
    /// downloads. Answered `exported` with the export's Unix socket as `path` once its head passed
    /// the checks, or like `ensure` (`present`, `fetched`) when the master is already complete.
    /// Refused unless the daemon runs with `lazy = true`.
    Export(MasterRequest),
}

/// `forget`: the master's absolute path in its pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetRequest {
    pub path: String,
}

/// `publish`: which volume of which pool becomes a master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRequest {
    pub pool: String,
    pub volume: String,
}

/// A master named by what identifies it, as a domain's metadata records it: enough for any host
/// to fetch it (the info-hash finds peers and the torrent's metadata; the SHA-256 checks the
/// whole file). `name` is the file name in the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    /// `qcow2` or `raw`.
    pub format: String,
    pub sha256: String,
    /// BitTorrent v1 info-hash, 40 lower-case hex digits. Without it the daemon looks the SHA-256
    /// up in the trusted catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
}

/// One master of the LAN catalog (`catalog`), trusted: signed by a key of `allowed_signers`.
/// Fields in alphabetical order (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Set when another trusted master has the same name: names both publishers. Such a name is
    /// never resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
    pub format: String,
    /// Addresses (`HOST:PORT`) of the hosts that announced it, most recent first.
    pub hosts: Vec<String>,
    pub info_hash: String,
    pub name: String,
    pub sha256: String,
    /// The principal of `allowed_signers` whose key signed the manifest.
    pub signer: String,
    pub size: u64,
    pub virtual_size: u64,
}

/// Which master, in which pool, named in exactly one way: a manifest file (absolute path), a whole
/// manifest inline, an identity, or a name resolved through the trusted LAN catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasterRequest {
    /// Required by the daemon; the hook leaves it out when the domain's metadata names no pool
    /// (and the daemon then refuses the request, saying so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// A whole manifest inline (pool-helper's manifest object, validated by the daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_path: Option<String>,
    /// The master by identity (sha256 + info-hash), as a domain's metadata records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    /// The master by name only (the volume name a plain `<backingStore>` path ends in): resolved
    /// through the trusted LAN catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The domain whose start waits for this master (the hook sends it): named in the daemon's
    /// log and in `status`. A label only: it changes nothing about the fetch, and older daemons
    /// ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// Longest domain name a request's `domain` keeps (longer ones are cut, with `…`).
pub const MAX_DOMAIN_LABEL_CHARS: usize = 128;

/// `domain` as the daemon shows it: control characters become `?`, and it is cut at
/// [`MAX_DOMAIN_LABEL_CHARS`] characters; an empty one is none.
pub fn domain_label(domain: &str) -> Option<String> {
    if domain.is_empty() {
        return None;
    }
    let mut out: String =
        domain.chars().take(MAX_DOMAIN_LABEL_CHARS).map(|c| if c.is_control() { '?' } else { c }).collect();
    if domain.chars().nth(MAX_DOMAIN_LABEL_CHARS).is_some() {
        out.push('…');
    }
    Some(out)
}

impl MasterRequest {
    /// This request, on behalf of the start of `domain`.
    pub fn for_domain(self, domain: impl Into<String>) -> Self {
        MasterRequest { domain: Some(domain.into()), ..self }
    }

    /// A master named by the path of its manifest file.
    pub fn by_path(pool: Option<String>, manifest_path: impl Into<String>) -> Self {
        MasterRequest { pool, manifest_path: Some(manifest_path.into()), ..Self::empty() }
    }

    /// A master described by a whole manifest inline.
    pub fn inline(pool: Option<String>, manifest: serde_json::Value) -> Self {
        MasterRequest { pool, manifest: Some(manifest), ..Self::empty() }
    }

    /// A master by identity.
    pub fn by_identity(pool: Option<String>, identity: Identity) -> Self {
        MasterRequest { pool, identity: Some(identity), ..Self::empty() }
    }

    /// A master by name, through the trusted catalog.
    pub fn by_name(pool: Option<String>, name: impl Into<String>) -> Self {
        MasterRequest { pool, name: Some(name.into()), ..Self::empty() }
    }

    fn empty() -> Self {
        MasterRequest { pool: None, manifest: None, manifest_path: None, identity: None, name: None, domain: None }
    }
}

/// An event line: `{"event":"…",…}`. Over the socket the daemon sends only `progress`;
/// `pool-helper fetch --json` also prints `started` and `verifying` when it fetches in process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// About once a second while a fetch runs.
    Progress(Progress),
    /// The download is running; `have_bytes` were already staged (a resumed fetch).
    Started { have_bytes: u64, total_bytes: u64 },
    /// The whole file is here and being checked.
    Verifying,
    /// An event this client does not know (a newer daemon): skipped, never sent.
    #[serde(other, skip_serializing)]
    Unknown,
}

/// A fetch's progress, as `progress` events carry it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub peers: u32,
    pub down_bps: u64,
}

impl std::fmt::Display for Progress {
    /// `42% of 1.0 GiB, 3 peer(s), 12.0 MiB/s`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = if self.total_bytes > 0 { self.done_bytes as f64 * 100.0 / self.total_bytes as f64 } else { 0.0 };
        write!(
            f,
            "{pct:.0}% of {}, {} peer(s), {}/s",
            crate::units::human_bytes(self.total_bytes),
            self.peers,
            crate::units::human_bytes(self.down_bps)
        )
    }
}

/// What the daemon is doing with a master (`status`, `list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MasterState {
    /// Re-checked at daemon start before it is seeded.
    Verifying,
    Seeding,
    Fetching,
    /// See the entry's `error`.
    Failed,
}

impl MasterState {
    pub fn as_str(self) -> &'static str {
        match self {
            MasterState::Verifying => "verifying",
            MasterState::Seeding => "seeding",
            MasterState::Fetching => "fetching",
            MasterState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for MasterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// How a request for a master ended well (the final line's `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinalState {
    /// Already in the pool and verified.
    Present,
    /// Downloaded, verified and put in the pool.
    Fetched,
    /// Seeded (the answer to `seed`).
    Seeding,
    /// Served, while it downloads, by the NBD export whose Unix socket is `path` (`export`).
    Exported,
}

/// One master as `status` reports it. Fields in alphabetical order (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterStatus {
    /// The domains whose start waits for this master now (requests carrying `domain`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    pub done_bytes: u64,
    pub down_bps: u64,
    pub error: Option<String>,
    /// How many downloads were started for this master by this daemon (coalesced requests share one).
    pub fetches: u32,
    pub name: String,
    pub path: Option<String>,
    pub peers: u32,
    pub pool: String,
    pub sha256: String,
    pub state: MasterState,
    pub total_bytes: u64,
    pub up_bps: u64,
    pub uploaded_bytes: u64,
}

/// One master as `list` reports it. Fields in alphabetical order (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterListEntry {
    pub name: String,
    pub path: Option<String>,
    pub pool: String,
    pub state: MasterState,
}

/// The `masters` of a final line: what `status` or `list` sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Masters {
    Status(Vec<MasterStatus>),
    List(Vec<MasterListEntry>),
}

/// The final line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Final {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<FinalState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masters: Option<Masters>,
    /// `publish`: the manifest written (pool-helper's manifest object) and its file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_path: Option<String>,
    /// `catalog`: what the LAN offers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<Vec<CatalogEntry>>,
    /// `forget`: how many masters (records and seeds) were forgotten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forgotten: Option<u32>,
}

impl Final {
    pub fn error(msg: impl Into<String>) -> Self {
        Final { ok: false, error: Some(newlines_to_semicolons(&msg.into())), ..Default::default() }
    }
    pub fn done(state: FinalState, path: &str) -> Self {
        Final { ok: true, state: Some(state), path: Some(path.into()), ..Default::default() }
    }
    pub fn masters(masters: Masters) -> Self {
        Final { ok: true, masters: Some(masters), ..Default::default() }
    }
}

/// Errors travel as one line: each line break becomes "; ".
pub fn newlines_to_semicolons(s: &str) -> String {
    s.replace(['\n', '\r'], "; ")
}

/// One line of the server's answer: an event, or the final line (the one with `ok`).
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Event(Event),
    Final(Final),
}

impl Answer {
    /// Parses one answer line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Answer, serde_json::Error> {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default)]
            ok: Option<serde::de::IgnoredAny>,
        }
        if serde_json::from_slice::<Probe>(line)?.ok.is_some() {
            Ok(Answer::Final(serde_json::from_slice(line)?))
        } else {
            Ok(Answer::Event(serde_json::from_slice(line)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `line` as `T` and writes it back: the same bytes.
    fn round_trips<T: Serialize + serde::de::DeserializeOwned + std::fmt::Debug>(line: &str) -> T {
        let v: T = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), line, "{v:?}");
        v
    }

    #[test]
    fn requests_round_trip_as_documented() {
        let r: Request = round_trips(r#"{"op":"ensure","pool":"default","manifest_path":"/abs/path/master.json"}"#);
        assert_eq!(r, Request::Ensure(MasterRequest::by_path(Some("default".into()), "/abs/path/master.json")));
        let r: Request = round_trips(r#"{"op":"ensure","pool":"default","manifest":{"name":"m.qcow2"}}"#);
        assert!(matches!(r, Request::Ensure(MasterRequest { manifest: Some(_), manifest_path: None, .. })));
        let r: Request = round_trips(r#"{"op":"seed","pool":"P","manifest_path":"/abs/m.json"}"#);
        assert!(matches!(r, Request::Seed(_)));
        assert_eq!(round_trips::<Request>(r#"{"op":"status"}"#), Request::Status);
        assert_eq!(round_trips::<Request>(r#"{"op":"list"}"#), Request::List);
        let r: Request = round_trips(r#"{"op":"forget","path":"/var/lib/libvirt/images/m.qcow2"}"#);
        assert_eq!(r, Request::Forget(ForgetRequest { path: "/var/lib/libvirt/images/m.qcow2".into() }));
        let f: Final = round_trips(r#"{"ok":true,"forgotten":0}"#);
        assert_eq!(f.forgotten, Some(0));
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        let r: Request = round_trips(r#"{"op":"export","pool":"P","name":"m.qcow2","domain":"vm1"}"#);
        assert_eq!(r, Request::Export(MasterRequest::by_name(Some("P".into()), "m.qcow2").for_domain("vm1")));
        let f: Final = round_trips(r#"{"ok":true,"state":"exported","path":"/run/pool-helper/nbd/ab.sock"}"#);
        assert_eq!(f.state, Some(FinalState::Exported));
    }

    #[test]
    fn a_master_by_identity_or_by_name_is_the_documented_line() {
        let id = Identity {
            name: "base.qcow2".into(),
            format: "qcow2".into(),
            sha256: "ab".repeat(32),
            info_hash: Some("cd".repeat(20)),
            virtual_size: Some(1 << 30),
        };
        let line = format!(
            r#"{{"op":"ensure","pool":"default","identity":{{"name":"base.qcow2","format":"qcow2","sha256":"{}","info_hash":"{}","virtual_size":1073741824}}}}"#,
            "ab".repeat(32),
            "cd".repeat(20)
        );
        let r: Request = round_trips(&line);
        assert_eq!(r, Request::Ensure(MasterRequest::by_identity(Some("default".into()), id.clone())));
        let bare = Identity { info_hash: None, virtual_size: None, ..id };
        let r = Request::Ensure(MasterRequest::by_identity(None, bare));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            format!(
                r#"{{"op":"ensure","identity":{{"name":"base.qcow2","format":"qcow2","sha256":"{}"}}}}"#,
                "ab".repeat(32)
            )
        );
        let r: Request = round_trips(r#"{"op":"ensure","pool":"default","name":"debian-12.qcow2"}"#);
        assert_eq!(r, Request::Ensure(MasterRequest::by_name(Some("default".into()), "debian-12.qcow2")));
    }

    #[test]
    fn events_round_trip_as_documented_and_printed() {
        let e: Event = round_trips(r#"{"event":"progress","done_bytes":5,"total_bytes":10,"peers":2,"down_bps":1}"#);
        assert_eq!(e, Event::Progress(Progress { done_bytes: 5, total_bytes: 10, peers: 2, down_bps: 1 }));
        let e: Event = round_trips(r#"{"event":"started","have_bytes":3,"total_bytes":10}"#);
        assert_eq!(e, Event::Started { have_bytes: 3, total_bytes: 10 });
        assert_eq!(round_trips::<Event>(r#"{"event":"verifying"}"#), Event::Verifying);
    }

    #[test]
    fn an_unknown_event_is_read_as_unknown_and_missing_numbers_as_zero() {
        let e: Event = serde_json::from_str(r#"{"event":"teleporting","eta":3}"#).unwrap();
        assert_eq!(e, Event::Unknown);
        let e: Event = serde_json::from_str(r#"{"event":"progress","done_bytes":7}"#).unwrap();
        assert_eq!(e, Event::Progress(Progress { done_bytes: 7, ..Default::default() }));
    }

    #[test]
    fn final_lines_round_trip_as_documented() {
        let f: Final = round_trips(r#"{"ok":true,"state":"present","path":"/abs/path/in/pool"}"#);
        assert_eq!(f, Final::done(FinalState::Present, "/abs/path/in/pool"));
        let f: Final = round_trips(r#"{"ok":true,"state":"fetched","path":"/abs/path/in/pool"}"#);
        assert_eq!(f.state, Some(FinalState::Fetched));
        let f: Final = round_trips(r#"{"ok":true,"state":"seeding","path":"/p/m"}"#);
        assert_eq!(f.state, Some(FinalState::Seeding));
        let f: Final = round_trips(r#"{"ok":false,"error":"one line: what and why"}"#);
        assert_eq!(f, Final::error("one line: what and why"));
        assert_eq!(serde_json::to_string(&Final::error("a\nb")).unwrap(), r#"{"ok":false,"error":"a; b"}"#);
    }

    #[test]
    fn a_request_may_name_the_domain_that_waits_and_old_requests_still_parse() {
        let r: Request = round_trips(r#"{"op":"ensure","pool":"default","name":"m.raw","domain":"vm1"}"#);
        assert_eq!(r, Request::Ensure(MasterRequest::by_name(Some("default".into()), "m.raw").for_domain("vm1")));
        let r: Request = round_trips(r#"{"op":"ensure","pool":"default","name":"m.raw"}"#);
        assert!(matches!(r, Request::Ensure(MasterRequest { domain: None, .. })));
    }

    #[test]
    fn a_domain_label_has_no_control_characters_and_a_bounded_length() {
        assert_eq!(domain_label("vm-1"), Some("vm-1".into()));
        assert_eq!(domain_label(""), None);
        assert_eq!(domain_label("a\nb\x1b[31m"), Some("a?b?[31m".into()));
        let long = "é".repeat(1000);
        let l = domain_label(&long).unwrap();
        assert_eq!(l.chars().count(), MAX_DOMAIN_LABEL_CHARS + 1);
        assert!(l.ends_with('…'));
    }

    #[test]
    fn status_lists_waiting_domains_only_when_there_are_some() {
        let mut e = status_entry();
        assert!(!serde_json::to_string(&e).unwrap().contains("domains"));
        e.domains = vec!["vm1".into()];
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.starts_with(r#"{"domains":["vm1"],"done_bytes""#), "{line}");
        assert_eq!(round_trips::<MasterStatus>(&line), e);
    }

    fn status_entry() -> MasterStatus {
        MasterStatus {
            name: "debian-12.qcow2".into(),
            pool: "default".into(),
            sha256: "ab".repeat(32),
            state: MasterState::Seeding,
            path: Some("/var/lib/libvirt/images/debian-12.qcow2".into()),
            done_bytes: 10,
            total_bytes: 10,
            peers: 2,
            up_bps: 3,
            down_bps: 0,
            uploaded_bytes: 20,
            error: None,
            fetches: 1,
            domains: Vec::new(),
        }
    }

    #[test]
    fn status_and_list_lines_are_the_bytes_the_untyped_value_wrote() {
        let f = Final::masters(Masters::Status(vec![status_entry()]));
        // Before the types, `masters` went through a serde_json::Value, which sorts keys.
        let untyped = serde_json::to_value(vec![status_entry()]).unwrap().to_string();
        let line = serde_json::to_string(&f).unwrap();
        assert_eq!(line, format!(r#"{{"ok":true,"masters":{untyped}}}"#));
        assert_eq!(round_trips::<Final>(&line), f);

        let l = MasterListEntry { name: "n".into(), pool: "p".into(), path: None, state: MasterState::Failed };
        let line = serde_json::to_string(&Final::masters(Masters::List(vec![l.clone()]))).unwrap();
        assert_eq!(line, r#"{"ok":true,"masters":[{"name":"n","path":null,"pool":"p","state":"failed"}]}"#);
        assert_eq!(round_trips::<Final>(&line).masters, Some(Masters::List(vec![l])));
    }

    #[test]
    fn master_states_are_todays_strings() {
        for (s, text) in [
            (MasterState::Verifying, "verifying"),
            (MasterState::Seeding, "seeding"),
            (MasterState::Fetching, "fetching"),
            (MasterState::Failed, "failed"),
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{text}\""));
            assert_eq!(format!("{s:<10}|"), format!("{text:<10}|"));
        }
    }

    #[test]
    fn answer_lines_are_told_apart_by_ok() {
        let a =
            Answer::parse(br#"{"event":"progress","done_bytes":1,"total_bytes":4,"peers":0,"down_bps":0}"#).unwrap();
        assert!(matches!(a, Answer::Event(Event::Progress(Progress { done_bytes: 1, .. }))));
        let a = Answer::parse(br#"{"ok":false,"error":"no peer has it"}"#).unwrap();
        assert!(matches!(a, Answer::Final(Final { ok: false, .. })));
        assert!(Answer::parse(b"not json").is_err());
        assert!(Answer::parse(br#"{"ok":"yes"}"#).is_err());
    }

    #[test]
    fn progress_reads_as_the_hook_prints_it() {
        let p = Progress { done_bytes: 1 << 29, total_bytes: 1 << 30, peers: 3, down_bps: 0 };
        let s = p.to_string();
        assert!(s.starts_with("50% of ") && s.contains("3 peer(s)"), "{s}");
    }
}
