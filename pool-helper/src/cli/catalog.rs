//! `pool-helper catalog [--json]`: what the LAN offers, as the daemon heard it (signed by a key of
//! `allowed_signers`).

use serde::Serialize;

use super::CliError;
use crate::config::Config;
use vcc_core::control::client;
use vcc_core::control::proto::{CatalogEntry, Request};

/// `--json` output: `{"catalog":[…]}`.
#[derive(Serialize)]
struct Output<'a> {
    catalog: &'a [CatalogEntry],
}

pub fn run(cfg: &Config, json: bool) -> Result<(), CliError> {
    let Some(c) = client::try_connect(&cfg.control_socket, None)? else {
        return Err(CliError::Failed(format!(
            "no daemon answers on {} (start `pool-helper serve`): the catalog is what it hears",
            cfg.control_socket.display()
        )));
    };
    let f = c.call(&Request::Catalog, None, |_| {})?;
    if !f.ok {
        return Err(CliError::Failed(f.error.unwrap_or_default()));
    }
    let entries = f.catalog.unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string(&Output { catalog: &entries }).unwrap_or_default());
    } else {
        print!("{}", table(&entries));
    }
    Ok(())
}

/// One line per master (name, SHA-256 shortened, info-hash, signer, hosts), and under a master
/// whose name another trusted master also has, a `conflict:` line naming both.
pub fn table(entries: &[CatalogEntry]) -> String {
    let w = entries.iter().map(|e| e.name.len()).max().unwrap_or(0).max(4);
    let sw = entries.iter().map(|e| e.signer.len()).max().unwrap_or(0).max(6);
    let mut out = format!("{:<w$}  {:<12}  {:<40}  {:<sw$}  HOSTS\n", "NAME", "SHA256", "INFO-HASH", "SIGNER");
    for e in entries {
        let hosts = if e.hosts.is_empty() { "-".to_string() } else { e.hosts.join(",") };
        let sha: String = e.sha256.chars().take(12).collect();
        out += &format!("{:<w$}  {sha:<12}  {:<40}  {:<sw$}  {hosts}\n", e.name, e.info_hash, e.signer);
        if let Some(c) = &e.conflict {
            out += &format!("  conflict: {c}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_each_master_and_its_conflict() {
        let e = |name: &str, sha: char, conflict: Option<&str>| CatalogEntry {
            conflict: conflict.map(str::to_string),
            format: "raw".into(),
            hosts: vec!["10.0.0.1:6881".into(), "10.0.0.2:6881".into()],
            info_hash: "b".repeat(40),
            name: name.into(),
            sha256: std::iter::repeat_n(sha, 64).collect(),
            signer: "alice".into(),
            size: 1,
            virtual_size: 1,
        };
        let t = table(&[e("base.qcow2", 'a', None), e("x.raw", 'c', Some("two masters"))]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("NAME        SHA256"), "{t}");
        assert_eq!(
            lines[1],
            format!("base.qcow2  aaaaaaaaaaaa  {}  alice   10.0.0.1:6881,10.0.0.2:6881", "b".repeat(40))
        );
        assert_eq!(lines[3], "  conflict: two masters");
    }
}
