//! `pool-helper fetch --pool POOL MANIFEST`

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;

use super::{runtime, CliError};
use crate::config::Config;
use crate::fetch::{self, Ctx};
use crate::manifest::Manifest;
use crate::torrent::Torrents;
use vcc_core::control::client;
use vcc_core::control::proto::{self, Event, FinalState};

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
    #[command(flatten)]
    pub announce: super::AnnounceArgs,
    /// Used when the download runs in this process (no daemon, or --in-process).
    #[command(flatten)]
    pub session: super::SessionArgs,
}

struct Reporter {
    json: bool,
    tty: bool,
}

impl Reporter {
    fn progress(&self, p: &proto::Progress) {
        if self.json {
            self.event(&Event::Progress(p.clone()));
        } else if self.tty {
            let pct = (p.done_bytes * 100).checked_div(p.total_bytes).unwrap_or(0);
            let bar = "#".repeat((pct / 4) as usize);
            eprint!(
                "\r[{bar:<25}] {pct:>3}%  {:.1}/{:.1} MiB  {} peers  {:.1} MiB/s ",
                p.done_bytes as f64 / 1048576.0,
                p.total_bytes as f64 / 1048576.0,
                p.peers,
                p.down_bps as f64 / 1048576.0
            );
            let _ = std::io::stderr().flush();
        }
    }
    /// With `--json`, one JSON Lines event.
    fn event(&self, ev: &Event) {
        if self.json {
            println!("{}", serde_json::to_string(ev).unwrap_or_default());
        }
    }
    fn done(&self, state: FinalState, path: &str) {
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
        // No bound on the wait: the user asked for this download and sees its progress.
        if let Some(c) = client::try_connect(&cfg.control_socket, None)? {
            let path = std::path::absolute(&a.manifest).unwrap_or_else(|_| a.manifest.clone());
            let req =
                proto::Request::Fetch(proto::MasterRequest::by_path(Some(a.pool.clone()), path.display().to_string()));
            let f = c.call(&req, None, |ev| match ev {
                Event::Progress(p) => rep.progress(p),
                Event::Unknown => {}
                other => rep.event(other),
            })?;
            if !f.ok {
                return Err(CliError::Failed(f.error.unwrap_or_else(|| "the daemon reported a failure".into())));
            }
            rep.done(f.state.unwrap_or(FinalState::Fetched), f.path.as_deref().unwrap_or_default());
            return Ok(());
        }
    }
    runtime()?.block_on(async {
        let torrents = Torrents::start(cfg).await?;
        let ctx = Ctx::new(cfg.clone(), torrents);
        let on_event = |ev: fetch::Event| match ev {
            fetch::Event::Started { have_bytes, total_bytes } => rep.event(&Event::Started { have_bytes, total_bytes }),
            fetch::Event::Progress(p) => rep.progress(&p.event()),
            fetch::Event::Verifying => rep.event(&Event::Verifying),
        };
        let res = ctx.fetch(&a.pool, &m, &on_event).await;
        ctx.torrents.stop().await;
        match res {
            Ok((o, _)) => {
                rep.done(o.state(), &o.path().display().to_string());
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
