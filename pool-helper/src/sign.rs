//! Manifest signatures: OpenSSH signatures (`SSHSIG`, what `ssh-keygen -Y sign` makes) over the
//! exact bytes of a manifest file, in the namespace [`NAMESPACE`], made with an OpenSSH ed25519
//! private key (`signing_key`) and checked against an allowed-signers file in ssh-keygen's format
//! (`allowed_signers`, ssh-keygen(1) ALLOWED SIGNERS). docs/many-hosts.md section 3.
//!
//! The allowed-signers parser is strict and bounded: a line it does not understand makes the
//! whole file an error naming the line (a key silently skipped would be a trust decision taken
//! behind the administrator's back). Supported: principals (a comma-separated list, optionally
//! quoted), the options `namespaces="…"` (honoured: patterns with `*`, `?` and `!` negation, as
//! ssh-keygen matches them), `valid-after="…"` and `valid-before="…"` (UTC, ending in `Z`),
//! `ssh-ed25519` keys. `cert-authority`, other key types and local times are refused.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ssh_key::{HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

use crate::manifest::{read_bounded, ReadError, MANIFEST_READ_TIMEOUT};

/// The SSHSIG namespace of manifest signatures.
pub const NAMESPACE: &str = "virt-clone-cow-manifest";
/// The longest private key file read.
pub const MAX_KEY_BYTES: u64 = 64 << 10;
/// The longest armored signature accepted (an ed25519 one is about 300 bytes).
pub const MAX_SIGNATURE_BYTES: usize = 4 << 10;
/// The longest allowed-signers file read.
pub const MAX_ALLOWED_SIGNERS_BYTES: u64 = 1 << 20;
/// The longest line of an allowed-signers file.
pub const MAX_LINE_BYTES: usize = 8 << 10;
/// At most this many keys in an allowed-signers file.
pub const MAX_SIGNERS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot read signing key '{path}'")]
    ReadKey {
        path: String,
        #[source]
        source: ReadError,
    },
    #[error("signing key '{path}' is not an unencrypted OpenSSH ed25519 private key (ssh-keygen -t ed25519)")]
    ParseKey {
        path: String,
        #[source]
        source: ssh_key::Error,
    },
    #[error("signing key '{path}' is encrypted: pool-helper needs a key without a passphrase (ssh-keygen -p -N '')")]
    Encrypted { path: String },
    #[error("signing key '{path}' is {algorithm}: only ed25519 keys sign manifests (ssh-keygen -t ed25519)")]
    NotEd25519 { path: String, algorithm: String },
    #[error("cannot sign")]
    Sign(#[source] ssh_key::Error),
    #[error("cannot read allowed signers file '{path}'")]
    ReadSigners {
        path: String,
        #[source]
        source: ReadError,
    },
    #[error("allowed signers file '{path}' line {line}: {why}")]
    Signers { path: String, line: usize, why: String },
}

/// Why a signature is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the signature is longer than {MAX_SIGNATURE_BYTES} bytes")]
    TooLong,
    #[error("the signature is not an armored SSH signature: {0}")]
    Malformed(String),
    #[error("the signature is for namespace '{0}', not '{NAMESPACE}'")]
    Namespace(String),
    #[error("the signing key ({0}) is not in allowed_signers for namespace '{NAMESPACE}' at this time")]
    UnknownKey(String),
    #[error("the signature does not match the manifest (altered after signing?)")]
    Mismatch,
}

/// An ed25519 private key that signs manifests.
#[derive(Debug)]
pub struct SigningKey {
    key: PrivateKey,
}

impl SigningKey {
    /// Reads an OpenSSH private key file (bounded), unencrypted, ed25519.
    pub fn load(path: &Path) -> Result<SigningKey, SignError> {
        let p = path.display().to_string();
        let bytes = read_bounded(path, MAX_KEY_BYTES, MANIFEST_READ_TIMEOUT)
            .map_err(|source| SignError::ReadKey { path: p.clone(), source })?;
        let key = PrivateKey::from_openssh(&bytes).map_err(|source| SignError::ParseKey { path: p.clone(), source })?;
        Self::from_key(key, &p)
    }

    fn from_key(key: PrivateKey, path: &str) -> Result<SigningKey, SignError> {
        if key.is_encrypted() {
            return Err(SignError::Encrypted { path: path.into() });
        }
        if key.algorithm() != ssh_key::Algorithm::Ed25519 {
            return Err(SignError::NotEd25519 { path: path.into(), algorithm: key.algorithm().to_string() });
        }
        Ok(SigningKey { key })
    }

    /// A key from a 32-byte seed (tests).
    pub fn from_seed(seed: &[u8; 32]) -> SigningKey {
        let kp = ssh_key::private::Ed25519Keypair::from_seed(seed);
        SigningKey { key: PrivateKey::from(kp) }
    }

    /// The armored signature (`-----BEGIN SSH SIGNATURE-----`…) of `msg`, as `ssh-keygen -Y sign
    /// -n virt-clone-cow-manifest` writes it (SHA-512).
    pub fn sign(&self, msg: &[u8]) -> Result<String, SignError> {
        let sig = self.key.sign(NAMESPACE, HashAlg::Sha512, msg).map_err(SignError::Sign)?;
        sig.to_pem(LineEnding::LF).map_err(SignError::Sign)
    }

    /// The private key as an OpenSSH private key file (tests).
    pub fn openssh_private(&self) -> String {
        self.key.to_openssh(LineEnding::LF).map(|s| s.to_string()).unwrap_or_default()
    }

    /// The public key, one line as in an allowed-signers file (`ssh-ed25519 AAAA…`).
    pub fn public_line(&self) -> String {
        let mut pk = self.key.public_key().clone();
        pk.set_comment("");
        pk.to_openssh().unwrap_or_default()
    }
}

/// One line of an allowed-signers file.
#[derive(Debug, Clone)]
struct Signer {
    principals: String,
    namespaces: Option<String>,
    /// Seconds since the epoch, UTC.
    valid_after: Option<u64>,
    valid_before: Option<u64>,
    key: ssh_key::public::KeyData,
}

/// The trusted keys: an allowed-signers file.
#[derive(Debug, Clone, Default)]
pub struct AllowedSigners {
    signers: Vec<Signer>,
}

impl AllowedSigners {
    /// Reads and parses an allowed-signers file (bounded; any line not understood is an error).
    pub fn load(path: &Path) -> Result<AllowedSigners, SignError> {
        let p = path.display().to_string();
        let bytes = read_bounded(path, MAX_ALLOWED_SIGNERS_BYTES, MANIFEST_READ_TIMEOUT)
            .map_err(|source| SignError::ReadSigners { path: p.clone(), source })?;
        let text = String::from_utf8(bytes).map_err(|_| SignError::Signers {
            path: p.clone(),
            line: 0,
            why: "not UTF-8".into(),
        })?;
        Self::parse(&text).map_err(|(line, why)| SignError::Signers { path: p, line, why })
    }

    /// Parses the text of an allowed-signers file; Err: (line number, why).
    pub fn parse(text: &str) -> Result<AllowedSigners, (usize, String)> {
        let mut signers = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.len() > MAX_LINE_BYTES {
                return Err((n, format!("longer than {MAX_LINE_BYTES} bytes")));
            }
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            if signers.len() >= MAX_SIGNERS {
                return Err((n, format!("more than {MAX_SIGNERS} keys")));
            }
            signers.push(parse_line(l).map_err(|why| (n, why))?);
        }
        Ok(AllowedSigners { signers })
    }

    /// How many keys the file lists.
    pub fn len(&self) -> usize {
        self.signers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.signers.is_empty()
    }

    /// Checks `armored` (a `.sig` file's text) over exactly `msg`: a good signature in
    /// [`NAMESPACE`] by a key listed for that namespace and valid at `now`. Returns the
    /// principals of the key's line.
    pub fn verify(&self, msg: &[u8], armored: &str, now: SystemTime) -> Result<String, VerifyError> {
        if armored.len() > MAX_SIGNATURE_BYTES {
            return Err(VerifyError::TooLong);
        }
        let sig = SshSig::from_pem(armored.trim().as_bytes()).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        if sig.namespace() != NAMESPACE {
            return Err(VerifyError::Namespace(sig.namespace().chars().take(64).collect()));
        }
        let now = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let signer = self
            .signers
            .iter()
            .find(|s| {
                &s.key == sig.public_key()
                    && s.namespaces.as_deref().is_none_or(|ns| match_pattern_list(NAMESPACE, ns))
                    && s.valid_after.is_none_or(|t| now >= t)
                    && s.valid_before.is_none_or(|t| now <= t)
            })
            .ok_or_else(|| VerifyError::UnknownKey(fingerprint(sig.public_key())))?;
        let pk = PublicKey::from(signer.key.clone());
        pk.verify(NAMESPACE, msg, &sig).map_err(|_| VerifyError::Mismatch)?;
        Ok(signer.principals.clone())
    }
}

fn fingerprint(k: &ssh_key::public::KeyData) -> String {
    k.fingerprint(HashAlg::Sha256).to_string()
}

/// `principals [options] keytype base64 [comment]`
fn parse_line(l: &str) -> Result<Signer, String> {
    let (principals, rest) = take_field(l)?;
    let principals = principals.trim_matches('"').to_string();
    if principals.is_empty() {
        return Err("no principals".into());
    }
    let rest = rest.trim_start();
    let (options, key) = if is_key_type(rest) {
        ("", rest)
    } else {
        let (o, r) = take_field(rest)?;
        (o, r.trim_start())
    };
    let mut s = Signer { principals, namespaces: None, valid_after: None, valid_before: None, key: parse_key(key)? };
    for opt in split_options(options)? {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(unquote(v)?)),
            None => (opt, None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("namespaces", Some(v)) => s.namespaces = Some(v.to_string()),
            ("valid-after", Some(v)) => s.valid_after = Some(parse_time(v)?),
            ("valid-before", Some(v)) => s.valid_before = Some(parse_time(v)?),
            ("cert-authority", _) => return Err("cert-authority keys are not supported".into()),
            (other, _) => return Err(format!("unknown or malformed option '{other}'")),
        }
    }
    Ok(s)
}

fn is_key_type(s: &str) -> bool {
    ["ssh-", "ecdsa-", "sk-"].iter().any(|p| s.starts_with(p))
}

fn parse_key(s: &str) -> Result<ssh_key::public::KeyData, String> {
    if !s.starts_with("ssh-ed25519 ") {
        let t: String = s.split_whitespace().next().unwrap_or("").chars().take(40).collect();
        return Err(format!("key type '{t}': only ssh-ed25519 keys are supported"));
    }
    let pk = PublicKey::from_openssh(s).map_err(|e| format!("bad key: {e}"))?;
    Ok(pk.key_data().clone())
}

/// The first whitespace-delimited field (double quotes keep whitespace in); the rest.
fn take_field(s: &str) -> Result<(&str, &str), String> {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => return Ok((&s[..i], &s[i..])),
            _ => {}
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    Err("no key".into())
}

/// Options separated by commas outside quotes.
fn split_options(s: &str) -> Result<Vec<&str>, String> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    let (mut out, mut start, mut quoted) = (Vec::new(), 0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err("unterminated quote in options".into());
    }
    out.push(&s[start..]);
    if out.iter().any(|o| o.is_empty()) {
        return Err("empty option".into());
    }
    Ok(out)
}

fn unquote(v: &str) -> Result<&str, String> {
    match v.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) if !inner.contains('"') => Ok(inner),
        _ => Err(format!("option value {v} is not in double quotes")),
    }
}

/// `YYYYMMDD[HHMM[SS]]Z` as seconds since the epoch (UTC only: a local time is refused).
fn parse_time(v: &str) -> Result<u64, String> {
    let bad = || format!("time '{v}': give YYYYMMDD[HHMM[SS]]Z (UTC, with the Z)");
    let d = v.strip_suffix('Z').or_else(|| v.strip_suffix('z')).ok_or_else(bad)?;
    if !matches!(d.len(), 8 | 12 | 14) || !d.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| d.get(r).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    let (y, m, day) = (num(0..4), num(4..6), num(6..8));
    let (h, min, s) = (num(8..10), num(10..12), num(12..14));
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || s > 59 || y < 1970 {
        return Err(bad());
    }
    Ok(days_from_civil(y, m, day) * 86400 + h * 3600 + min * 60 + s)
}

/// Days since 1970-01-01 of a (proleptic Gregorian) date, year >= 1970.
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// OpenSSH's `match_pattern_list`: comma-separated patterns with `*` and `?`; one matching
/// negated (`!`) pattern refuses, else any matching pattern accepts.
fn match_pattern_list(s: &str, list: &str) -> bool {
    let mut yes = false;
    for p in list.split(',') {
        let p = p.trim();
        if let Some(neg) = p.strip_prefix('!') {
            if glob(s.as_bytes(), neg.as_bytes()) {
                return false;
            }
        } else if glob(s.as_bytes(), p.as_bytes()) {
            yes = true;
        }
    }
    yes
}

/// `*` and `?` wildcards (iterative, linear in practice, no recursion).
fn glob(s: &[u8], p: &[u8]) -> bool {
    let (mut si, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                si += 1;
                pi += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed(&[n; 32])
    }

    fn signers(lines: &str) -> AllowedSigners {
        AllowedSigners::parse(lines).unwrap()
    }

    const MSG: &[u8] = b"{\"name\":\"base.qcow2\"}\n";

    #[test]
    fn a_signature_verifies_with_its_key_listed_and_names_the_principals() {
        let k = key(1);
        let sig = k.sign(MSG).unwrap();
        assert!(sig.starts_with("-----BEGIN SSH SIGNATURE-----\n"), "{sig}");
        let a = signers(&format!("# team\n\nalice@example.com,ops {}\n", k.public_line()));
        assert_eq!(a.verify(MSG, &sig, SystemTime::now()), Ok("alice@example.com,ops".into()));
    }

    #[test]
    fn an_altered_manifest_an_unlisted_key_and_another_namespace_are_refused() {
        let (k, other) = (key(1), key(2));
        let a = signers(&format!("alice {}\n", k.public_line()));
        let sig = k.sign(MSG).unwrap();
        let mut altered = MSG.to_vec();
        altered[3] ^= 1;
        assert_eq!(a.verify(&altered, &sig, SystemTime::now()), Err(VerifyError::Mismatch));
        let e = a.verify(MSG, &other.sign(MSG).unwrap(), SystemTime::now()).unwrap_err();
        assert!(matches!(e, VerifyError::UnknownKey(ref f) if f.starts_with("SHA256:")), "{e}");
        let git = k.key.sign("git", HashAlg::Sha512, MSG).unwrap().to_pem(LineEnding::LF).unwrap();
        assert_eq!(a.verify(MSG, &git, SystemTime::now()), Err(VerifyError::Namespace("git".into())));
        assert!(matches!(a.verify(MSG, "garbage", SystemTime::now()), Err(VerifyError::Malformed(_))));
        assert_eq!(a.verify(MSG, &"x".repeat(MAX_SIGNATURE_BYTES + 1), SystemTime::now()), Err(VerifyError::TooLong));
    }

    #[test]
    fn namespaces_and_validity_options_are_honoured() {
        let k = key(3);
        let sig = k.sign(MSG).unwrap();
        let now = SystemTime::now();
        for (opts, ok) in [
            ("namespaces=\"virt-clone-cow-manifest\"", true),
            ("namespaces=\"git,virt-clone-*\"", true),
            ("namespaces=\"git\"", false),
            ("namespaces=\"*,!virt-clone-cow-manifest\"", false),
            ("valid-after=\"20200101Z\"", true),
            ("valid-after=\"29990101Z\"", false),
            ("valid-before=\"20200101120000Z\",namespaces=\"*\"", false),
            ("namespaces=\"*\",valid-before=\"29991231Z\"", true),
        ] {
            let a = signers(&format!("\"bob smith\" {opts} {}\n", k.public_line()));
            assert_eq!(a.verify(MSG, &sig, now).is_ok(), ok, "{opts}");
        }
        assert_eq!(parse_time("19700102Z"), Ok(86400));
        assert_eq!(parse_time("20000301000000Z"), Ok(951868800));
    }

    #[test]
    fn the_parser_refuses_what_it_does_not_understand_naming_the_line() {
        let k = key(4).public_line();
        for (text, why) in [
            (format!("a cert-authority {k}"), "cert-authority"),
            (format!("a frobnicate {k}"), "unknown or malformed option 'frobnicate'"),
            (format!("a valid-after=\"20200101\" {k}"), "UTC"),
            (format!("a namespaces=git {k}"), "double quotes"),
            ("a ssh-rsa AAAAB3NzaC1yc2E".to_string(), "only ssh-ed25519"),
            ("a ssh-ed25519 AAAA!!".to_string(), "bad key"),
            ("lonely".to_string(), "no key"),
            (format!("\"a {k}"), "unterminated quote"),
            (format!("a namespaces=\"x\",,valid-after=\"20200101Z\" {k}"), "empty option"),
        ] {
            let (line, e) = AllowedSigners::parse(&format!("# c\n{text}\n")).unwrap_err();
            assert_eq!(line, 2, "{text}");
            assert!(e.contains(why), "{text}: {e}");
        }
        let long = format!("a {k} {}", "c".repeat(MAX_LINE_BYTES));
        assert!(AllowedSigners::parse(&long).unwrap_err().1.contains("longer than"));
    }

    #[test]
    fn patterns_match_as_openssh_matches_them() {
        assert!(glob(b"abc", b"a*c") && glob(b"abc", b"*") && glob(b"abc", b"a?c") && glob(b"", b"*"));
        assert!(!glob(b"abc", b"a*d") && !glob(b"ab", b"a?c") && !glob(b"abc", b""));
        assert!(glob(b"aaa-b", b"*a-b") && glob(b"x.y.z", b"*.*.z"));
        assert!(match_pattern_list("git", "file,git") && !match_pattern_list("git", "g*,!git"));
    }
}
