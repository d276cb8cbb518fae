//! `pool-helper fetch --pool POOL MANIFEST`

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use clap::Args;

use super::progress::{Phase, Shower};
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

/// Where the fetch's progress goes: [`Shower`] (bar, JSON Lines), or with `--json` every event.
struct Reporter {
    show: Mutex<Shower>,
}

impl Reporter {
    fn new(json: bool) -> Self {
        let show = Shower::new(json, std::io::stderr().is_terminal(), std::io::stdout().is_terminal());
        Reporter { show: Mutex::new(show) }
    }
    fn show(&self) -> std::sync::MutexGuard<'_, Shower> {
        self.show.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn json(&self) -> bool {
        self.show().json()
    }
    fn progress(&self, p: &proto::Progress) {
        if self.json() {
            self.event(&Event::Progress(p.clone()));
        } else {
            self.show().progress(Phase::Downloading, p);
        }
    }
    fn started(&self, have_bytes: u64, total_bytes: u64) {
        self.event(&Event::Started { have_bytes, total_bytes });
        self.show().started(have_bytes, total_bytes);
    }
    fn verifying(&self, total_bytes: u64) {
        self.event(&Event::Verifying);
        if !self.json() {
            self.show().verifying(total_bytes);
        }
    }
    /// With `--json`, one JSON Lines event.
    fn event(&self, ev: &Event) {
        if self.json() {
            println!("{}", serde_json::to_string(ev).unwrap_or_default());
        }
    }
    fn done(&self, state: FinalState, path: &str) {
        self.show().finish();
        if self.json() {
            println!("{}", serde_json::to_string(&proto::Final::done(state, path)).unwrap_or_default());
        } else {
            println!("{path}");
        }
    }
}

pub fn run(cfg: &Config, a: &FetchArgs, json: bool) -> Result<(), CliError> {
    let m = Manifest::load(&a.manifest)?;
    let rep = Reporter::new(json);
    if !a.in_process {
        // No bound on the wait: the user asked for this download and sees its progress.
        if let Some(c) = client::try_connect(&cfg.control_socket, None)? {
            let path = std::path::absolute(&a.manifest).unwrap_or_else(|_| a.manifest.clone());
            let req =
                proto::Request::Fetch(proto::MasterRequest::by_path(Some(a.pool.clone()), path.display().to_string()));
            let f = c.call(&req, None, |ev| match ev {
                Event::Progress(p) => rep.progress(p),
                Event::Started { have_bytes, total_bytes } => rep.started(*have_bytes, *total_bytes),
                Event::Verifying => rep.verifying(m.size),
                Event::Unknown => {}
            });
            rep.show().finish();
            let f = f?;
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
            fetch::Event::Started { have_bytes, total_bytes } => rep.started(have_bytes, total_bytes),
            fetch::Event::Progress(p) => rep.progress(&p.event()),
            fetch::Event::Verifying => rep.verifying(m.size),
            fetch::Event::Downloading(_) | fetch::Event::Published(_) => {}
        };
        let res = ctx.fetch(&a.pool, &m, &on_event).await;
        ctx.torrents.stop().await;
        match res {
            Ok((o, _)) => {
                rep.done(o.state(), &o.path().display().to_string());
                Ok(())
            }
            Err(e) => {
                rep.show().finish();
                Err(CliError::Fetch(e))
            }
        }
    })
}
