//! `pool-helper publish --pool POOL VOLUME`: through the daemon when one answers (it hashes,
//! writes the manifest, signs it with its `signing_key`, seeds and announces it); without a
//! daemon, in this process (the next `pool-helper serve` seeds it).

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
    let (manifest, manifest_path) = match client::try_connect(&cfg.control_socket, None)? {
        Some(c) => {
            let req = proto::Request::Publish(proto::PublishRequest { pool: a.pool.clone(), volume: a.volume.clone() });
            let f = c.call(&req, None, |_| {})?;
            if !f.ok {
                return Err(CliError::Failed(f.error.unwrap_or_default()));
            }
            let (Some(m), Some(p)) = (f.manifest, f.manifest_path) else {
                return Err(CliError::Failed("the daemon's answer to publish lacks the manifest".into()));
            };
            // The daemon signs with its own `signing_key`: say so when ours was not used.
            if cfg.signing_key.is_some() && !std::path::Path::new(&format!("{p}.sig")).exists() {
                tracing::warn!(
                    "the daemon published '{}' unsigned: it has no signing_key (set it in its config; --signing-key \
                     applies only when no daemon runs)",
                    a.volume
                );
            }
            // Printed as the manifest file has it (a Value would sort the keys).
            (crate::manifest::Manifest::from_value(m)?, p)
        }
        None => {
            let p = crate::publish::publish(cfg, &a.pool, &a.volume)?;
            tracing::warn!(
                "no daemon on {}: `pool-helper serve` will seed '{}' when it starts",
                cfg.control_socket.display(),
                a.volume
            );
            (p.manifest, p.manifest_path.display().to_string())
        }
    };
    if json {
        println!("{}", serde_json::to_string(&manifest).unwrap_or_default());
    } else {
        println!("{manifest_path}");
    }
    Ok(())
}
