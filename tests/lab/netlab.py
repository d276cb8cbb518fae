#!/usr/bin/env python3
"""Test hosts as network namespaces on this machine, joined by veth links to one bridge, each link
shaped with tc (tbf for the rate; netem for delay where the kernel has it; iptables for loss).
Traffic stays inside these namespaces: the bridge lives in a namespace of its own (PREFIX-sw), host
i is namespace PREFIX-hI with eth0 at 10.213.0.(10+I)/24 and a multicast route (for LSD, BEP 14).
The project's one network-namespace harness: the lab imports it (`Lab`), the Rust tests
(tests/support/netns.rs) and tests/bench/swarm-bench use its command line. Needs root.

  netlab.py up --prefix P --hosts N [--rate-mbit 100] [--delay-ms 0] [--loss 0] [--slow I [--slow-factor 10]]
      removes any lab P first, makes a new one, prints one line per host: NAMESPACE ADDRESS
      (--rate-mbit 0: links not shaped)
  netlab.py exec --prefix P HOST -- ARGV...     runs ARGV inside host HOST's namespace
  netlab.py down --prefix P                     kills what runs inside lab P, removes its namespaces

Labs with different prefixes are independent (each has its own switch; addresses repeat safely).
The prefix must not start with another lab's prefix followed by '-' (`down` matches PREFIX-*).
"""
import argparse
import os
import subprocess
import sys

PREFIX = "vcclab"
SUBNET = "10.213.0"


def sh(*argv, check=True, ns=None, capture=True):
    """Runs an argv (never a shell string), optionally inside a namespace."""
    if ns:
        argv = ("ip", "netns", "exec", ns) + tuple(argv)
    p = subprocess.run(argv, capture_output=capture, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {(p.stderr or '').strip()}")
    return p.stdout if capture else ""


class Host:
    def __init__(self, index, rate_mbit, delay_ms, loss_pct, prefix=PREFIX):
        self.index = index
        self.ns = f"{prefix}-h{index}"
        self.ip = f"{SUBNET}.{10 + index}"
        # The switch side of the link; it lives in the lab's own switch namespace, so the same
        # name in two labs does not collide.
        self.peer_dev = f"{PREFIX}v{index}"
        self.rate_mbit = rate_mbit
        self.delay_ms = delay_ms
        self.loss_pct = loss_pct

    def run(self, *argv, **kw):
        return sh(*argv, ns=self.ns, **kw)

    def popen(self, argv, **kw):
        return subprocess.Popen(("ip", "netns", "exec", self.ns) + tuple(argv), **kw)


class Lab:
    """N hosts; host 0 is the origin. `slow` (a host index) gets a link `slow_factor` times slower.
    A rate of 0 leaves the links unshaped. Namespaces are named PREFIX-sw and PREFIX-hI."""

    def __init__(self, n, rate_mbit=100.0, delay_ms=0.0, loss_pct=0.0, slow=None, slow_factor=10.0, prefix=PREFIX):
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self.hosts = []
        for i in range(n):
            r = rate_mbit / slow_factor if slow is not None and i == slow else rate_mbit
            self.hosts.append(Host(i, r, delay_ms, loss_pct, prefix))

    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc):
        teardown(self.prefix)

    def up(self):
        """Removes what is left of a lab with this prefix, then makes this one (or nothing)."""
        teardown(self.prefix)
        try:
            self.setup()
        except BaseException:
            teardown(self.prefix)
            raise

    def setup(self):
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for h in self.hosts:
            sh("ip", "netns", "add", h.ns)
            sh("ip", "link", "add", h.peer_dev, "netns", self.switch, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            sh("ip", "-n", self.switch, "link", "set", h.peer_dev, "master", "br0", "up")
            sh("ip", "-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
            sh("ip", "-n", h.ns, "link", "set", "lo", "up")
            sh("ip", "-n", h.ns, "link", "set", "eth0", "up")
            sh("ip", "-n", h.ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
            self.shape(h)

    def shape(self, h):
        """Host upload = eth0 egress; host download = the switch port's egress, each a token bucket
        at the link rate (none at rate 0). Delay needs the netem qdisc (refused clearly where the
        kernel lacks it); loss is dropped at random on the host's way out (iptables statistic)."""
        burst = max(32 * 1024, int(h.rate_mbit * 1e6 / 8 / 100))
        for ns, dev in ((h.ns, "eth0"), (self.switch, h.peer_dev)):
            if h.delay_ms:
                p = subprocess.run(("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem",
                                    "delay", f"{h.delay_ms}ms", "limit", "100000"), capture_output=True, text=True)
                if p.returncode != 0:
                    raise SystemExit(f"lab: --delay-ms needs the netem qdisc, which this kernel lacks ({p.stderr.strip()})")
                parent = ("parent", "1:1", "handle", "10:")
            else:
                parent = ("root",)
            if h.rate_mbit:
                sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, *parent, "tbf", "rate", f"{h.rate_mbit}mbit",
                   "burst", str(burst), "latency", "200ms")
        if h.loss_pct:
            sh("iptables", "-A", "OUTPUT", "-o", "eth0", "-m", "statistic", "--mode", "random", "--probability",
               str(h.loss_pct / 100.0), "-j", "DROP", ns=h.ns)

    def link(self, h, up):
        """Cuts or restores a host's link (the switch side, so the host sees its peers vanish)."""
        sh("ip", "-n", self.switch, "link", "set", h.peer_dev, "up" if up else "down")

    def sent_by(self, h):
        """Bytes the host has sent into the switch so far (rx on the switch port)."""
        return int(sh("cat", f"/sys/class/net/{h.peer_dev}/statistics/rx_bytes", ns=self.switch).strip())


def teardown(prefix=PREFIX):
    """Removes every namespace of lab `prefix` (and with them their links and processes' sockets)."""
    out = sh("ip", "netns", "list", check=False)
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(prefix + "-"):
            # Kill what still runs inside, then delete.
            pids = sh("ip", "netns", "pids", name, check=False).split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", name, check=False)


def lower_bound(size_bytes, hosts):
    """Kumar & Ross: T_min = max{S/u_seed, S/d_min, N*S/(u_seed + sum u_i)} (rates in Mbit/s)."""
    s_bits = size_bytes * 8
    seed = hosts[0].rate_mbit * 1e6
    receivers = hosts[1:]
    d_min = min(h.rate_mbit for h in receivers) * 1e6
    total_up = seed + sum(h.rate_mbit for h in receivers) * 1e6
    return max(s_bits / seed, s_bits / d_min, len(receivers) * s_bits / total_up)


def main(argv):
    ap = argparse.ArgumentParser(prog="netlab.py", description="Test hosts as network namespaces on one bridge.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="make a lab (any old one of this prefix removed first); prints NAMESPACE ADDRESS per host")
    up.add_argument("--prefix", default=PREFIX, help="namespace names: PREFIX-sw, PREFIX-h0... (default %(default)s)")
    up.add_argument("--hosts", type=int, required=True)
    up.add_argument("--rate-mbit", type=float, default=100.0, help="every link, each way; 0: not shaped")
    up.add_argument("--delay-ms", type=float, default=0.0)
    up.add_argument("--loss", type=float, default=0.0, help="percent of packets a host drops on its way out")
    up.add_argument("--slow", type=int, default=None, help="this host's link is --slow-factor times slower")
    up.add_argument("--slow-factor", type=float, default=10.0)
    ex = sub.add_parser("exec", help="run a program inside one host's namespace")
    ex.add_argument("--prefix", default=PREFIX)
    ex.add_argument("host", type=int)
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...")
    down = sub.add_parser("down", help="kill what runs inside the lab and remove its namespaces")
    down.add_argument("--prefix", default=PREFIX)
    a = ap.parse_args(argv)
    if not a.prefix or any(c.isspace() or c == "/" for c in a.prefix):
        ap.error("--prefix must be a non-empty name without spaces or '/'")
    if a.cmd == "up":
        if a.hosts < 1:
            ap.error("--hosts must be at least 1")
        lab = Lab(a.hosts, a.rate_mbit, a.delay_ms, a.loss, slow=a.slow, slow_factor=a.slow_factor, prefix=a.prefix)
        lab.up()
        for h in lab.hosts:
            print(h.ns, h.ip)
    elif a.cmd == "exec":
        argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
        if not argv:
            ap.error("exec needs a program: exec HOST -- PROGRAM ARGS...")
        ns = f"{a.prefix}-h{a.host}"
        os.execvp("ip", ["ip", "netns", "exec", ns, *argv])
    else:
        teardown(a.prefix)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except RuntimeError as e:
        print(f"netlab.py: {e}", file=sys.stderr)
        sys.exit(1)
