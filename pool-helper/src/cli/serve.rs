//! `pool-helper serve`

use std::sync::Arc;

use super::{runtime, CliError};
use crate::config::Config;
use crate::daemon::Daemon;
use crate::fetch::Ctx;
use crate::torrent::Torrents;

pub fn run(cfg: Config) -> Result<(), CliError> {
    runtime()?.block_on(async move {
        let listener = Daemon::bind(&cfg.control_socket)?;
        let torrents = Torrents::start(&cfg).await?;
        tracing::info!(
            "serving: control socket {}, BitTorrent on {:?}",
            cfg.control_socket.display(),
            torrents.listen_addr()
        );
        let (uri, every) = (cfg.libvirt_uri.clone(), cfg.watch_interval);
        let d = Daemon::new(Arc::new(Ctx::new(cfg, torrents)));
        // A signing key, allowed-signers file or catalog port that cannot be used stops the
        // daemon here, before systemd hears it is ready.
        d.start_catalog()?;
        // The control socket is bound, the torrent session and the catalog up: tell systemd
        // (Type=notify).
        if let Err(e) = crate::notify::ready() {
            tracing::warn!("{}", vcc_core::error::one_line(&e));
        }
        d.start_recorded();
        if every > 0 {
            crate::watcher::spawn(d.clone(), uri, std::time::Duration::from_secs(every));
        }
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(CliError::Runtime)?;
        tokio::select! {
            _ = d.serve(listener) => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}
