//! `pool-helper status` and `pool-helper list`

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::CliError;
use crate::config::Config;
use crate::records;
use vcc_core::control::client;
use vcc_core::control::proto::{MasterListEntry, MasterStatus, Masters, Request};

#[derive(Debug, Args, Clone, Default)]
pub struct StatusArgs {
    /// Show it again every SECS seconds [default: 2] until interrupted (on a terminal: redrawn).
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<u64>,
}

/// `status`, once or (`--watch`) every `secs` seconds (at least 1) until interrupted; with
/// `--watch`, a daemon that does not answer is a line in the display, not the end.
pub fn watch(cfg: &Config, json: bool, secs: Option<u64>) -> Result<(), CliError> {
    let Some(secs) = secs else { return run(cfg, json, false) };
    let tty = std::io::stdout().is_terminal() && !json;
    loop {
        if tty {
            // Home and clear: the display is redrawn in place.
            print!("\x1b[H\x1b[2J");
        }
        if let Err(e) = run(cfg, json, false) {
            println!("pool-helper: {}", vcc_core::error::one_line(&e));
        }
        if !json && !tty {
            println!();
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(secs.max(1)));
    }
}

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
