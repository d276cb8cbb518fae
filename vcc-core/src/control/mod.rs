//! The control socket between the hook, the pool-helper CLI and the pool-helper daemon
//! (`docs/control-protocol.md`): the wire types ([`proto`]) and the blocking client ([`client`]).
//! The server lives in pool-helper's daemon.
pub mod client;
pub mod proto;

use std::path::{Path, PathBuf};

/// The directory of the lazy masters' NBD export sockets (docs/lazy.md): `nbd/` next to the
/// control socket. The daemon makes its sockets there; the hook accepts only sockets there.
pub fn export_dir(control_socket: &Path) -> PathBuf {
    let dir = control_socket.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    dir.join("nbd")
}

/// The socket of the export of the master with `info_hash`: `<export_dir>/<info_hash>.sock`.
pub fn export_socket(control_socket: &Path, info_hash: &str) -> PathBuf {
    export_dir(control_socket).join(format!("{info_hash}.sock"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn export_sockets_are_next_to_the_control_socket() {
        let p = super::export_socket(std::path::Path::new("/run/pool-helper/control.sock"), "ab");
        assert_eq!(p, std::path::Path::new("/run/pool-helper/nbd/ab.sock"));
        assert_eq!(super::export_dir(std::path::Path::new("c.sock")), std::path::Path::new("./nbd"));
    }
}
