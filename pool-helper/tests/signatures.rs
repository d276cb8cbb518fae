//! Manifest signatures interoperate with OpenSSH: what pool-helper signs, `ssh-keygen -Y verify`
//! accepts; what `ssh-keygen -Y sign` makes, pool-helper verifies; keys made by `ssh-keygen`.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

use pool_helper::sign::{AllowedSigners, SignError, SigningKey, VerifyError, NAMESPACE};

fn keygen(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let k = dir.join(name);
    let o = Command::new("ssh-keygen").args(args).arg("-q").arg("-C").arg(name).arg("-f").arg(&k).output().unwrap();
    assert!(o.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&o.stderr));
    k
}

fn pubkey(k: &Path) -> String {
    std::fs::read_to_string(k.with_extension("pub")).unwrap().trim().to_string()
}

/// `ssh-keygen -Y verify` of `file` with `sig` for `principal`.
fn ssh_verify(allowed: &Path, principal: &str, file: &Path, sig: &Path) -> Output {
    Command::new("ssh-keygen")
        .args(["-Y", "verify", "-f"])
        .arg(allowed)
        .args(["-I", principal, "-n", NAMESPACE, "-s"])
        .arg(sig)
        .stdin(std::fs::File::open(file).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

const MANIFEST: &str = "{\n  \"version\": 1,\n  \"name\": \"base.qcow2\"\n}\n";

#[test]
fn what_pool_helper_signs_ssh_keygen_verifies_and_an_altered_file_fails() {
    let d = tempfile::tempdir().unwrap();
    let k = keygen(d.path(), "alice", &["-t", "ed25519", "-N", ""]);
    let allowed = d.path().join("allowed_signers");
    std::fs::write(&allowed, format!("alice@example.com namespaces=\"{NAMESPACE}\" {}\n", pubkey(&k))).unwrap();
    let m = d.path().join("base.qcow2.json");
    std::fs::write(&m, MANIFEST).unwrap();
    let sig = SigningKey::load(&k).unwrap().sign(MANIFEST.as_bytes()).unwrap();
    let sigp = d.path().join("base.qcow2.json.sig");
    std::fs::write(&sigp, &sig).unwrap();
    let o = ssh_verify(&allowed, "alice@example.com", &m, &sigp);
    assert!(
        o.status.success(),
        "ssh-keygen -Y verify: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // And ours agrees.
    let a = AllowedSigners::load(&allowed).unwrap();
    assert_eq!(a.verify(MANIFEST.as_bytes(), &sig, SystemTime::now()), Ok("alice@example.com".into()));

    std::fs::write(&m, MANIFEST.replace("base", "bass")).unwrap();
    assert!(!ssh_verify(&allowed, "alice@example.com", &m, &sigp).status.success(), "an altered manifest fails");
}

#[test]
fn what_ssh_keygen_signs_pool_helper_verifies_and_the_namespace_and_key_count() {
    let d = tempfile::tempdir().unwrap();
    let (alice, mallory) = (
        keygen(d.path(), "alice", &["-t", "ed25519", "-N", ""]),
        keygen(d.path(), "mallory", &["-t", "ed25519", "-N", ""]),
    );
    let allowed = d.path().join("allowed_signers");
    std::fs::write(&allowed, format!("# who may publish\nalice,ops@example.com {}\n", pubkey(&alice))).unwrap();
    let a = AllowedSigners::load(&allowed).unwrap();
    let m = d.path().join("m.json");
    std::fs::write(&m, MANIFEST).unwrap();
    let sign = |key: &Path, ns: &str| -> String {
        let o =
            Command::new("ssh-keygen").args(["-Y", "sign", "-f"]).arg(key).args(["-n", ns]).arg(&m).output().unwrap();
        assert!(o.status.success(), "ssh-keygen -Y sign: {}", String::from_utf8_lossy(&o.stderr));
        let sig = std::fs::read_to_string(m.with_extension("json.sig")).unwrap();
        std::fs::remove_file(m.with_extension("json.sig")).unwrap();
        sig
    };
    let now = SystemTime::now();
    let good = sign(&alice, NAMESPACE);
    assert_eq!(a.verify(MANIFEST.as_bytes(), &good, now), Ok("alice,ops@example.com".into()));
    assert_eq!(a.verify(MANIFEST.replace("1", "2").as_bytes(), &good, now), Err(VerifyError::Mismatch));
    assert_eq!(a.verify(MANIFEST.as_bytes(), &sign(&alice, "git"), now), Err(VerifyError::Namespace("git".into())));
    let e = a.verify(MANIFEST.as_bytes(), &sign(&mallory, NAMESPACE), now).unwrap_err();
    assert!(matches!(e, VerifyError::UnknownKey(_)), "{e}");
}

#[test]
fn encrypted_and_non_ed25519_signing_keys_are_refused_with_what_to_do() {
    let d = tempfile::tempdir().unwrap();
    let enc = keygen(d.path(), "enc", &["-t", "ed25519", "-N", "secret"]);
    let e = SigningKey::load(&enc).unwrap_err();
    assert!(matches!(e, SignError::Encrypted { .. }), "{e}");
    assert!(e.to_string().contains("ssh-keygen -p"), "{e}");
    let ecdsa = keygen(d.path(), "ec", &["-t", "ecdsa", "-N", ""]);
    let e = vcc_core::error::one_line(&SigningKey::load(&ecdsa).unwrap_err());
    assert!(e.contains("ed25519"), "{e}");
    let e = vcc_core::error::one_line(&SigningKey::load(&d.path().join("missing")).unwrap_err());
    assert!(e.contains("cannot read signing key") && e.contains("missing"), "{e}");
}
