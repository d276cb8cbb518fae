//! `pool-helper publish --pool POOL VOLUME`

use clap::Args;

use super::CliError;
use crate::config::Config;
use vcc_core::control::{client, proto};

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Storage pool holding the volume.
    #[arg(long)]
    pub pool: String,
    /// Volume name (becomes the master's name everywhere).
    pub volume: String,
    #[command(flatten)]
    pub announce: super::AnnounceArgs,
}

pub fn run(cfg: &Config, a: &PublishArgs, json: bool) -> Result<(), CliError> {
    let p = crate::publish::publish(cfg, &a.pool, &a.volume)?;
    match client::try_connect(&cfg.control_socket, None)? {
        Some(c) => {
            let req = proto::Request::Seed(proto::MasterRequest::by_path(
                Some(a.pool.clone()),
                p.manifest_path.display().to_string(),
            ));
            let f = c.call(&req, None, |_| {})?;
            if !f.ok {
                return Err(CliError::Failed(format!(
                    "published, but the daemon does not seed it: {}",
                    f.error.unwrap_or_default()
                )));
            }
        }
        None => tracing::warn!(
            "no daemon on {}: `pool-helper serve` will seed '{}' when it starts",
            cfg.control_socket.display(),
            a.volume
        ),
    }
    if json {
        println!("{}", serde_json::to_string(&p.manifest).unwrap_or_default());
    } else {
        println!("{}", p.manifest_path.display());
    }
    Ok(())
}
