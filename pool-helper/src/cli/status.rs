//! `pool-helper status` and `pool-helper list`

use serde::Serialize;

use super::CliError;
use crate::config::Config;
use crate::records;
use vcc_core::control::client;
use vcc_core::control::proto::{MasterListEntry, MasterStatus, Masters, Request};

/// `--json` output: `{"masters":[…]}`.
#[derive(Serialize)]
struct Output<'a, T: Serialize> {
    masters: &'a T,
}

/// A master this host recorded, as `list` shows it without a daemon. Fields in alphabetical
/// order, as the untyped object had them.
#[derive(Serialize)]
struct Recorded {
    name: String,
    path: Option<String>,
    pool: String,
    /// `published (daemon not running)`, …
    state: String,
}

pub fn run(cfg: &Config, json: bool, list: bool) -> Result<(), CliError> {
    let Some(c) = client::try_connect(&cfg.control_socket, None)? else {
        if list {
            // Without a daemon, list what this host has recorded.
            let v: Vec<Recorded> = records::load_all(cfg)
                .into_iter()
                .map(|r| Recorded {
                    name: r.manifest.name,
                    pool: r.pool,
                    path: Some(r.path.display().to_string()),
                    state: format!("{} (daemon not running)", r.state),
                })
                .collect();
            if json {
                return print_json(&v);
            }
            for r in &v {
                print_list_line(&r.state, &r.pool, &r.name, r.path.as_deref());
            }
            return Ok(());
        }
        return Err(CliError::Failed(format!(
            "no daemon answers on {} (start `pool-helper serve`)",
            cfg.control_socket.display()
        )));
    };
    let f = c.call(if list { &Request::List } else { &Request::Status }, None, |_| {})?;
    if !f.ok {
        return Err(CliError::Failed(f.error.unwrap_or_default()));
    }
    let masters = f.masters.unwrap_or(Masters::List(Vec::new()));
    if json {
        return print_json(&masters);
    }
    match &masters {
        Masters::List(l) => l.iter().for_each(|m: &MasterListEntry| {
            print_list_line(&m.state, &m.pool, &m.name, m.path.as_deref());
        }),
        Masters::Status(s) if list => s.iter().for_each(|m| {
            print_list_line(&m.state, &m.pool, &m.name, m.path.as_deref());
        }),
        Masters::Status(s) => s.iter().for_each(print_status_line),
    }
    Ok(())
}

fn print_json<T: Serialize>(masters: &T) -> Result<(), CliError> {
    println!("{}", serde_json::to_string(&Output { masters }).unwrap_or_default());
    Ok(())
}

/// A missing path prints as `null`, as it always did.
fn print_list_line(state: &dyn std::fmt::Display, pool: &str, name: &str, path: Option<&str>) {
    println!("{:<10} {pool}/{name}  {}", state.to_string(), path.unwrap_or("null"));
}

fn print_status_line(m: &MasterStatus) {
    let pct = m.done_bytes.saturating_mul(100).checked_div(m.total_bytes).unwrap_or(0);
    print!(
        "{:<10} {}/{}  {}%  peers {}  down {} B/s  up {} B/s  uploaded {} B",
        m.state, m.pool, m.name, pct, m.peers, m.down_bps, m.up_bps, m.uploaded_bytes
    );
    if !m.domains.is_empty() {
        print!("  waiting: {}", m.domains.join(","));
    }
    match &m.error {
        Some(e) => println!("  error: {e}"),
        None => println!(),
    }
}
