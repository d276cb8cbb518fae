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
}

pub fn run(cfg: &Config, a: &PublishArgs, json: bool) -> Result<(), CliError> {
    let p = crate::publish::publish(cfg, &a.pool, &a.volume)?;
    match client::connect(&cfg.control_socket)? {
        Some(s) => {
            let req = proto::Request::Seed(proto::MasterRequest {
                pool: a.pool.clone(),
                manifest: None,
                manifest_path: Some(p.manifest_path.display().to_string()),
            });
            let f = client::call(s, &req, |_| {})?;
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
