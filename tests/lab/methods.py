"""The ways a master reaches every host: BitTorrent (pool-helper), one central HTTP server (nginx),
multicast (uftp), and two other BitTorrent engines on the same .torrent, tracker and links:
libtorrent-rasterbar (`lt`) and aria2c. Each returns, per receiving host, the seconds until it held a
verified copy."""
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


class Waiter:
    """Waits for each host's client to finish, records that moment, then checks the copy's SHA-256
    (an exactness check, not timed: hashing every copy at once on this machine's few cores would
    charge the lab's own work to methods whose hosts finish together). pool-helper's moment already
    includes its own verification (whole-file SHA-256, qemu-img check, fsync, rename); curl's and
    uftp's include none.

    With `defer`, nothing is hashed until `finish()`, called once every host is done: the lab's own
    hashing then takes no CPU from the hosts still transferring (the lab's runs use it)."""

    def __init__(self, expected_sha, t0, defer=False):
        self.expected = expected_sha
        self.t0 = t0
        self.times = {}
        self.bad = {}
        self.lock = threading.Lock()
        self.defer = defer
        self.pending = []

    def _check(self, index, path, done_at):
        got = sha256(path)
        with self.lock:
            if got == self.expected:
                self.times[index] = done_at - self.t0
            else:
                self.bad[index] = got

    def finish(self):
        """Hashes what `defer` left (one copy at a time); returns self."""
        for index, path, done_at in self.pending:
            self._check(index, path, done_at)
        self.pending = []
        return self

    def verify_when_present(self, index, path, done_check, deadline):
        def work():
            while time.time() < deadline:
                if done_check():
                    done_at = time.time()
                    if not os.path.exists(path):
                        return  # never arrived: not done (and not corrupt either)
                    if self.defer:
                        with self.lock:
                            self.pending.append((index, path, done_at))
                    else:
                        self._check(index, path, done_at)
                    return
                time.sleep(0.05)
        t = threading.Thread(target=work, daemon=True)
        t.start()
        return t


def http(lab, master, expected_sha, work, timeout):
    """Every host downloads from nginx on the origin at once (the central-server model)."""
    origin = lab.hosts[0]
    root = os.path.dirname(master)
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  server {{ listen {origin.ip}:8080; root {root}; }}
}}
""")
    server = origin.popen(["nginx", "-c", conf, "-p", work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://{origin.ip}:8080/{os.path.basename(master)}"
        deadline = time.time() + 10
        while subprocess.run(("ip", "netns", "exec", lab.hosts[1].ns, "curl", "-sf", "-o", "/dev/null", "-r", "0-0", url),
                             capture_output=True).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError("nginx did not come up")
            time.sleep(0.1)
        t0 = time.time()
        waiter = Waiter(expected_sha, t0, defer=True)
        threads, procs = [], []
        for h in lab.hosts[1:]:
            dest = os.path.join(work, f"http-h{h.index}.img")
            p = h.popen(["curl", "-sS", "-o", dest, url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            procs.append(p)
            threads.append(waiter.verify_when_present(h.index, dest, lambda p=p: p.poll() is not None, t0 + timeout))
        for t in threads:
            t.join()
        for p in procs:
            if p.poll() is None:
                p.kill()
        return waiter.finish()
    finally:
        server.terminate()
        server.wait(timeout=10)


def multicast(lab, master, expected_sha, work, timeout, rate_mbit):
    """uftp: one multicast sender, every host receives the same packets; the sender keeps one pace
    for all (TFMCC congestion control: the slowest receiver sets it)."""
    origin = lab.hosts[0]
    name = os.path.basename(master)
    clients = []
    t0 = None
    try:
        for h in lab.hosts[1:]:
            dest = os.path.join(work, f"uftp-h{h.index}")
            tmp = os.path.join(work, f"uftp-h{h.index}.tmp")
            os.makedirs(dest, exist_ok=True)
            os.makedirs(tmp, exist_ok=True)
            log = open(os.path.join(work, f"uftpd-h{h.index}.log"), "wb")
            clients.append(h.popen(["uftpd", "-d", "-I", "eth0", "-D", dest, "-T", tmp, "-x", os.environ.get("VCCLAB_UFTP_X", "2")],
                                   stdout=log, stderr=log))
        time.sleep(2.0)
        for c in clients:
            if c.poll() is not None:
                raise RuntimeError("a uftpd client exited at start")
        t0 = time.time()
        waiter = Waiter(expected_sha, t0, defer=True)
        server = origin.popen(["uftp", "-I", "eth0", "-C", "tfmcc", "-R", str(int(rate_mbit * 1000)),
                               "-x", os.environ.get("VCCLAB_UFTP_X", "2"), "-L", os.path.join(work, "uftp-server.log"), master],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ended = []

        def over(d):
            # The file appears in the dest dir only once complete (uftpd receives into -T and moves
            # it). Once the server has exited, give the clients 5 s to move it, then stop waiting.
            if os.path.exists(d):
                return True
            if server.poll() is not None:
                if not ended:
                    ended.append(time.time())
                return time.time() > ended[0] + 5
            return False

        threads = []
        for h in lab.hosts[1:]:
            dest = os.path.join(work, f"uftp-h{h.index}", name)
            threads.append(waiter.verify_when_present(h.index, dest, lambda d=dest: over(d), t0 + timeout))
        for t in threads:
            t.join()
        if server.poll() is None:
            server.kill()
        if True:  # keep the logs of the last multicast run for a look afterwards
            keep = os.path.join(os.path.dirname(work), "last-uftp")
            shutil.rmtree(keep, ignore_errors=True)
            os.makedirs(keep)
            for f in os.listdir(work):
                if f.endswith(".log"):
                    shutil.copy(os.path.join(work, f), keep)
        return waiter.finish()
    finally:
        for c in clients:
            c.kill()
            c.wait()


class PoolHelpers:
    """One pool-helper daemon per host, each with its own libvirt dir pool, state dir and fixed
    port, reachable at the host's lab address. The origin publishes the master from its pool."""

    PORT = 6881

    def __init__(self, lab, work, binary, extra_args=(), hosts=None):
        self.lab, self.work, self.bin, self.extra = lab, work, binary, list(extra_args)
        self.hosts = list(hosts) if hosts is not None else list(lab.hosts)
        self.daemons = {}

    def state(self, h):
        return os.path.join(self.work, f"h{h.index}", "state")

    def pool(self, h):
        return f"{self.lab.prefix}-pool-h{h.index}"

    def pool_dir(self, h):
        return os.path.join(self.work, f"h{h.index}", "pool")

    def args(self, h):
        return [self.bin, "--state-dir", self.state(h), "--listen-port", str(self.PORT), "--advertise", h.ip,
                *self.extra]

    def __enter__(self):
        try:
            self._setup()
        except BaseException:
            self.__exit__(None, None, None)  # no daemon or libvirt pool left behind
            raise
        return self

    def _setup(self):
        for h in self.hosts:
            os.makedirs(self.pool_dir(h), exist_ok=True)
            os.makedirs(self.state(h), exist_ok=True)
            subprocess.run(("virsh", "-q", "pool-destroy", self.pool(h)), capture_output=True)
            subprocess.run(("virsh", "-q", "pool-undefine", self.pool(h)), capture_output=True)
            subprocess.run(("virsh", "-q", "pool-define-as", self.pool(h), "dir", "--target", self.pool_dir(h)),
                           check=True, capture_output=True)
            subprocess.run(("virsh", "-q", "pool-start", self.pool(h)), check=True, capture_output=True)
            self.start(h)

    def start(self, h):
        log = open(os.path.join(self.work, f"daemon-h{h.index}.log"), "ab")
        self.daemons[h.index] = h.popen(self.args(h) + ["serve"], stdout=log, stderr=log)
        sock = os.path.join(self.state(h), "control.sock")
        deadline = time.time() + 30
        while not os.path.exists(sock):
            if self.daemons[h.index].poll() is not None or time.time() > deadline:
                raise RuntimeError(f"pool-helper on {h.ns} did not start (see {log.name})")
            time.sleep(0.05)

    def kill(self, h):
        p = self.daemons.pop(h.index, None)
        if p:
            p.kill()
            p.wait()

    def __exit__(self, *exc):
        for i in list(self.daemons):
            self.kill(self.lab.hosts[i])
        for h in self.hosts:
            subprocess.run(("virsh", "-q", "pool-destroy", self.pool(h)), capture_output=True)
            subprocess.run(("virsh", "-q", "pool-undefine", self.pool(h)), capture_output=True)

    def publish(self, master):
        origin = self.lab.hosts[0]
        name = os.path.basename(master)
        shutil.copyfile(master, os.path.join(self.pool_dir(origin), name))
        subprocess.run(("virsh", "-q", "pool-refresh", self.pool(origin)), check=True, capture_output=True)
        out = origin.run(*self.args(origin), "publish", "--pool", self.pool(origin), name)
        return out.strip().splitlines()[-1]

    def fetch(self, h, manifest):
        return h.popen(self.args(h) + ["fetch", "--pool", self.pool(h), manifest],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def opentracker(host, info_hash, work):
    """Debian's opentracker on a lab host, serving only this info-hash (it refuses to run as root)."""
    d = os.path.join(work, "tracker")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)
    with open(os.path.join(d, "wl"), "w") as f:
        f.write(info_hash + "\n")
    p = host.popen(["opentracker", "-i", host.ip, "-p", "6969", "-P", "6969", "-u", "nobody", "-d", d, "-w", "wl"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    if p.poll() is not None:
        raise RuntimeError("opentracker did not start")
    return p


def bittorrent(lab, master, expected_sha, work, timeout, pool_helper, faults=None):
    """pool-helper on every host: the origin publishes, every other host fetches at the same moment
    from whoever has pieces; peers find each other through a LAN tracker on the origin (and the
    manifest's peer hints). `faults(lab, helpers, t0)` runs alongside, for the fault scenarios."""
    origin = lab.hosts[0]
    tracker_url = f"http://{origin.ip}:6969/announce"
    with PoolHelpers(lab, work, pool_helper, ["--tracker", tracker_url]) as ph:
        manifest = ph.publish(master)
        with open(manifest) as f:
            info_hash = json.load(f)["info_hash"]
        tracker = opentracker(origin, info_hash, work)
        t0 = time.time()
        waiter = Waiter(expected_sha, t0, defer=not faults)
        threads = []
        for h in lab.hosts[1:]:
            dest = os.path.join(ph.pool_dir(h), os.path.basename(master))
            p = ph.fetch(h, manifest)
            threads.append(waiter.verify_when_present(h.index, dest, lambda p=p: p.poll() is not None,
                                                      t0 + timeout))
        if faults:
            faults(lab, ph, t0)
        for t in threads:
            t.join()
        tracker.kill()
        tracker.wait()
        return waiter.finish()


def torrent_of(lab, master, work, pool_helper):
    """The .torrent pool-helper makes for this master (published from a pool on the origin, the
    daemon and pool gone again), so every BitTorrent engine moves the same pieces. Returns
    (path of the .torrent, info-hash)."""
    d = os.path.join(work, "publish")
    with PoolHelpers(lab, d, pool_helper, hosts=[lab.hosts[0]]) as ph:
        manifest = ph.publish(master)
        with open(manifest) as f:
            m = json.load(f)
    shutil.rmtree(d, ignore_errors=True)
    path = os.path.join(work, "master.torrent")
    with open(path, "wb") as f:
        f.write(bytes.fromhex(m["torrent_hex"]))
    return path, m["info_hash"]


class Engines:
    """A third-party BitTorrent client on every host: the origin seeds a copy of the master from its
    own directory, every other host starts at the same moment into an empty one and keeps seeding
    once complete (as our daemons do). `start(h, seed)` returns (process, completed?)."""

    def __init__(self, lab, master, expected_sha, work, timeout, pool_helper):
        self.lab, self.master, self.expected, self.work, self.timeout = lab, master, expected_sha, work, timeout
        self.name = os.path.basename(master)
        self.torrent, self.info_hash = torrent_of(lab, master, work, pool_helper)
        self.tracker_url = f"http://{lab.hosts[0].ip}:6969/announce"
        self.procs = []

    def dir(self, h):
        d = os.path.join(self.work, f"h{h.index}")
        os.makedirs(d, exist_ok=True)
        return d

    def log(self, h):
        return open(os.path.join(self.work, f"{type(self).__name__.lower()}-h{h.index}.log"), "ab")

    def run(self):
        origin = self.lab.hosts[0]
        shutil.copyfile(self.master, os.path.join(self.dir(origin), self.name))
        tracker = opentracker(origin, self.info_hash, self.work)
        try:
            p, ready = self.start(origin, seed=True)
            deadline = time.time() + 120
            while not ready():
                if p.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{type(self).__name__} did not start seeding on the origin (logs in {self.work})")
                time.sleep(0.05)
            t0 = time.time()
            waiter = Waiter(self.expected, t0, defer=True)
            threads = []
            for h in self.lab.hosts[1:]:
                p, complete = self.start(h, seed=False)
                dest = os.path.join(self.dir(h), self.name)
                threads.append(waiter.verify_when_present(
                    h.index, dest, lambda p=p, c=complete: c() or p.poll() is not None, t0 + self.timeout))
            for t in threads:
                t.join()
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            tracker.kill()
            tracker.wait()
        return waiter.finish()


class Lt(Engines):
    """libtorrent-rasterbar 2.0 (python3-libtorrent, tests/lab/lt_host.py), the origin super-seeding."""

    PYTHON = os.environ.get("VCC_LAB_LT_PYTHON", "/usr/bin/python3")
    SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lt_host.py")

    def start(self, h, seed):
        p = h.popen([self.PYTHON, self.SCRIPT, "seed" if seed else "fetch", self.torrent, self.dir(h), h.ip,
                     self.tracker_url], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log(h))
        self.procs.append(p)
        flag = threading.Event()

        def read():
            for line in p.stdout:
                if line.strip() in (b"seeding", b"complete"):
                    flag.set()
        threading.Thread(target=read, daemon=True).start()
        return p, flag.is_set


class Aria2c(Engines):
    """aria2c 1.36 on every host: the origin seeds its copy unverified with --seed-ratio=0 (for
    ever), the others keep seeding the same way once complete; a host's moment is aria2c's
    --on-bt-download-complete hook (every piece in and SHA-1-checked)."""

    def start(self, h, seed):
        d = self.dir(h)
        hook = os.path.join(self.work, "complete-hook")
        if not os.path.exists(hook):
            with open(hook, "w") as f:
                f.write('#!/bin/sh\n# aria2c: GID FILES PATH\n: > "$3.complete"\n')
            os.chmod(hook, 0o755)
        argv = ["aria2c", "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false", "--disable-ipv6=true",
                "--summary-interval=0", "--console-log-level=warn", "--file-allocation=falloc",
                "--listen-port=6881", "--bt-tracker", self.tracker_url, "--seed-ratio=0.0",
                "--on-bt-download-complete", hook, "-d", d, self.torrent]
        if seed:
            argv[1:1] = ["--bt-seed-unverified=true", "--check-integrity=false"]
        p = h.popen(argv, stdin=subprocess.DEVNULL, stdout=self.log(h), stderr=subprocess.STDOUT)
        self.procs.append(p)
        if seed:
            # Seeding once it listens (it seeds unverified: nothing to check first).
            return p, lambda: ":6881" in h.run("ss", "-Hltn", "sport = :6881", check=False)
        marker = os.path.join(d, self.name + ".complete")
        return p, lambda: os.path.exists(marker)


def libtorrent(lab, master, expected_sha, work, timeout, pool_helper):
    return Lt(lab, master, expected_sha, work, timeout, pool_helper).run()


def aria2c(lab, master, expected_sha, work, timeout, pool_helper):
    return Aria2c(lab, master, expected_sha, work, timeout, pool_helper).run()
