//! `pool-helper fetch --pool POOL MANIFEST`

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;

use super::{runtime, CliError};
use crate::config::Config;
use crate::fetch::{Ctx, Event, Outcome};
use crate::manifest::Manifest;
use crate::torrent::Torrents;
use vcc_core::control::{client, proto};

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Storage pool to put the master in.
    #[arg(long)]
    pub pool: String,
    /// Run the download in this process even if a daemon runs.
    #[arg(long)]
    pub in_process: bool,
    /// Manifest JSON file (from `pool-helper publish`).
    pub manifest: PathBuf,
}

struct Reporter {
    json: bool,
    tty: bool,
}

impl Reporter {
    fn progress(&self, done: u64, total: u64, peers: u32, down: u64) {
        if self.json {
            let ev = proto::ProgressEvent {
                event: "progress".into(),
                done_bytes: done,
                total_bytes: total,
                peers,
                down_bps: down,
            };
            println!("{}", serde_json::to_string(&ev).unwrap_or_default());
        } else if self.tty {
            let pct = (done * 100).checked_div(total).unwrap_or(0);
            let bar = "#".repeat((pct / 4) as usize);
            eprint!(
                "\r[{bar:<25}] {pct:>3}%  {:.1}/{:.1} MiB  {peers} peers  {:.1} MiB/s ",
                done as f64 / 1048576.0,
                total as f64 / 1048576.0,
                down as f64 / 1048576.0
            );
            let _ = std::io::stderr().flush();
        }
    }
    fn event(&self, v: serde_json::Value) {
        if self.json {
            println!("{v}");
        }
    }
    fn done(&self, state: &str, path: &str) {
        if self.tty && !self.json {
            eprintln!();
        }
        if self.json {
            println!("{}", serde_json::to_string(&proto::Final::done(state, path)).unwrap_or_default());
        } else {
            println!("{path}");
        }
    }
}

pub fn run(cfg: &Config, a: &FetchArgs, json: bool) -> Result<(), CliError> {
    let m = Manifest::load(&a.manifest)?;
    let rep = Reporter { json, tty: std::io::stderr().is_terminal() };
    if !a.in_process {
        if let Some(s) = client::connect(&cfg.control_socket)? {
            let path = std::path::absolute(&a.manifest).unwrap_or_else(|_| a.manifest.clone());
            let req = proto::Request::Fetch(proto::MasterRequest {
                pool: a.pool.clone(),
                manifest: None,
                manifest_path: Some(path.display().to_string()),
            });
            let f = client::call(s, &req, |ev| {
                let n = |k: &str| ev.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                rep.progress(n("done_bytes"), n("total_bytes"), n("peers") as u32, n("down_bps"));
            })?;
            if !f.ok {
                return Err(CliError::Failed(f.error.unwrap_or_else(|| "the daemon reported a failure".into())));
            }
            rep.done(f.state.as_deref().unwrap_or("fetched"), f.path.as_deref().unwrap_or_default());
            return Ok(());
        }
    }
    runtime()?.block_on(async {
        let torrents = Torrents::start(cfg).await?;
        let ctx = Ctx::new(cfg.clone(), torrents);
        let on_event = |ev: Event| match ev {
            Event::Started { have_bytes, total_bytes } => {
                rep.event(serde_json::json!({"event":"started","have_bytes":have_bytes,"total_bytes":total_bytes}))
            }
            Event::Progress(p) => rep.progress(p.done_bytes, p.total_bytes, p.peers, p.down_bps),
            Event::Verifying => rep.event(serde_json::json!({"event":"verifying"})),
        };
        let res = ctx.fetch(&a.pool, &m, &on_event).await;
        ctx.torrents.stop().await;
        match res {
            Ok((o, _)) => {
                let state = if matches!(o, Outcome::Present(_)) { "present" } else { "fetched" };
                rep.done(state, &o.path().display().to_string());
                Ok(())
            }
            Err(e) => {
                if rep.tty && !json {
                    eprintln!();
                }
                Err(CliError::Fetch(e))
            }
        }
    })
}
