//! Test hosts as network namespaces on one bridge. The namespaces are made and removed by
//! `tests/lab/netlab.py` (the one harness; the lab and swarm-bench use it too). Needs root.

use crate::process::{repo_root, run, run_ok, seq};

/// `tests/lab/netlab.py`.
pub fn netlab() -> String {
    repo_root().join("tests/lab/netlab.py").to_string_lossy().into_owned()
}

/// A lab of `netlab.py` with unshaped links: host i is namespace `<prefix>-h<i>` at
/// 10.213.0.(10+i) (its own addresses: other labs are other namespaces). Removed on drop, with
/// whatever still runs inside.
#[derive(Debug)]
pub struct Lan {
    /// The namespaces' common prefix (`netlab.py --prefix`).
    pub prefix: String,
    /// (namespace, address) of each host.
    pub hosts: Vec<(String, String)>,
}

impl Lan {
    pub fn new(n: usize) -> Lan {
        // Made before the namespaces: dropped on a failed `up`, it removes what was made.
        let mut lan = Lan { prefix: format!("vccnet{}x{}", std::process::id(), seq()), hosts: Vec::new() };
        let (netlab, n_hosts) = (netlab(), n.to_string());
        let args = [netlab.as_str(), "up", "--prefix", &lan.prefix, "--hosts", &n_hosts, "--rate-mbit", "0"];
        let out = run_ok("python3", &args);
        lan.hosts = parse_hosts(&out);
        assert_eq!(lan.hosts.len(), n, "netlab.py up printed:\n{out}");
        lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = run("python3", &[netlab().as_str(), "down", "--prefix", &self.prefix]);
    }
}

/// `netlab.py up`'s output: one `NAMESPACE ADDRESS` line per host.
fn parse_hosts(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlab_up_output_gives_each_hosts_namespace_and_address() {
        let hosts = parse_hosts("p-h0 10.213.0.10\np-h1 10.213.0.11\n\n");
        assert_eq!(
            hosts,
            [("p-h0".to_string(), "10.213.0.10".to_string()), ("p-h1".to_string(), "10.213.0.11".to_string())]
        );
    }
}
