//! `pool-helper status` and `pool-helper list`

use super::CliError;
use crate::config::Config;
use crate::records;
use vcc_core::control::{client, proto};

pub fn run(cfg: &Config, json: bool, list: bool) -> Result<(), CliError> {
    let Some(s) = client::connect(&cfg.control_socket)? else {
        if list {
            // Without a daemon, list what this host has recorded.
            let v: Vec<proto::MasterListEntry> = records::load_all(cfg)
                .into_iter()
                .map(|r| proto::MasterListEntry {
                    name: r.manifest.name,
                    pool: r.pool,
                    path: Some(r.path.display().to_string()),
                    state: format!("{} (daemon not running)", r.state),
                })
                .collect();
            return print(json, serde_json::to_value(v).unwrap_or_default(), list);
        }
        return Err(CliError::Failed(format!(
            "no daemon answers on {} (start `pool-helper serve`)",
            cfg.control_socket.display()
        )));
    };
    let f = client::call(s, if list { &proto::Request::List } else { &proto::Request::Status }, |_| {})?;
    if !f.ok {
        return Err(CliError::Failed(f.error.unwrap_or_default()));
    }
    print(json, f.masters.unwrap_or_default(), list)
}

fn print(json: bool, masters: serde_json::Value, list: bool) -> Result<(), CliError> {
    if json {
        println!("{}", serde_json::json!({ "masters": masters }));
        return Ok(());
    }
    let empty = vec![];
    for m in masters.as_array().unwrap_or(&empty) {
        let g = |k: &str| {
            m.get(k).map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())).unwrap_or_default()
        };
        let n = |k: &str| m.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        if list {
            println!("{:<10} {}/{}  {}", g("state"), g("pool"), g("name"), g("path"));
        } else {
            let pct = if n("total_bytes") > 0 { n("done_bytes") * 100 / n("total_bytes") } else { 0 };
            print!(
                "{:<10} {}/{}  {}%  peers {}  down {} B/s  up {} B/s  uploaded {} B",
                g("state"),
                g("pool"),
                g("name"),
                pct,
                n("peers"),
                n("down_bps"),
                n("up_bps"),
                n("uploaded_bytes")
            );
            match m.get("error").and_then(|e| e.as_str()) {
                Some(e) => println!("  error: {e}"),
                None => println!(),
            }
        }
    }
    Ok(())
}
