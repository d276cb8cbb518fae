"""Fault scenarios for the BitTorrent distribution (pool-helper), each asserting its outcome:

  origin-killed   the origin's daemon is killed when the receivers hold about half on average; they
                  finish from each other if together they hold every piece, else they wait and
                  finish once the origin is restarted (after --restart-after seconds)
  origin-late     the same, killed as soon as the receivers together hold every piece (checked by
                  hashing their staging files against the torrent): they must finish without it
  link            one receiver's link goes down at 30 % for --down-s seconds and comes back: it
                  resumes and finishes
  corrupt         an extra peer (aria2c) seeds a copy with a flipped byte in every piece: every
                  receiver still ends with the exact master, and the bad pieces were rejected

In every scenario: every receiver's copy has the master's SHA-256, and a watcher polling every pool
directory every 10 ms never sees any file other than the complete master (no partial file, no
temporary name, no wrong size)."""
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time

import methods
import netlab


def bdecode(b, i=0):
    c = b[i:i + 1]
    if c == b"i":
        j = b.index(b"e", i)
        return int(b[i + 1:j]), j + 1
    if c == b"l":
        i, out = i + 1, []
        while b[i:i + 1] != b"e":
            v, i = bdecode(b, i)
            out.append(v)
        return out, i + 1
    if c == b"d":
        i, out = i + 1, {}
        while b[i:i + 1] != b"e":
            k, i = bdecode(b, i)
            v, i = bdecode(b, i)
            out[k] = v
        return out, i + 1
    j = b.index(b":", i)
    n = int(b[i:j])
    return b[j + 1:j + 1 + n], j + 1 + n


class Swarm:
    """pool-helper on the lab's hosts (host 0 publishes), every receiver fetching with --json so its
    progress is known, and a watcher on every receiver's pool directory."""

    def __init__(self, lab, work, binary, master, expected, receivers, extra=()):
        self.lab, self.work, self.master, self.expected = lab, work, master, expected
        self.name = os.path.basename(master)
        self.size = os.path.getsize(master)
        self.receivers = receivers
        self.origin = lab.hosts[0]
        tracker_url = f"http://{self.origin.ip}:6969/announce"
        self.ph = methods.PoolHelpers(lab, work, binary, ["--tracker", tracker_url, *extra],
                                      hosts=[self.origin] + receivers)
        self.done = {h.index: 0 for h in receivers}
        self.last = {}
        self.violations = []
        self.stop = threading.Event()
        self.procs = {}

    def __enter__(self):
        self.ph.__enter__()
        try:
            self.manifest = self.ph.publish(self.master)
            with open(self.manifest) as f:
                m = json.load(f)
            self.torrent = bytes.fromhex(m["torrent_hex"])
            info = bdecode(self.torrent)[0][b"info"]
            self.piece_len = info[b"piece length"]
            p = info[b"pieces"]
            self.hashes = [p[i:i + 20] for i in range(0, len(p), 20)]
            self.tracker = methods.opentracker(self.origin, m["info_hash"], self.work)
        except Exception:
            self.ph.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        self.tracker.kill()
        self.tracker.wait()
        self.ph.__exit__(*exc)

    def watch(self):
        def work():
            while not self.stop.is_set():
                for h in self.receivers:
                    d = self.ph.pool_dir(h)
                    try:
                        names = os.listdir(d)
                    except FileNotFoundError:
                        continue
                    for n in names:
                        if n != self.name:
                            self.violations.append(f"h{h.index}: {n} appeared in the pool")
                        else:
                            try:
                                s = os.path.getsize(os.path.join(d, n))
                            except FileNotFoundError:
                                continue
                            if s != self.size:
                                self.violations.append(f"h{h.index}: {n} with {s} bytes in the pool")
                time.sleep(0.01)
        threading.Thread(target=work, daemon=True).start()

    def start(self, timeout):
        self.watch()
        self.t0 = time.time()
        self.waiter = methods.Waiter(self.expected, self.t0)
        self.threads = []
        for h in self.receivers:
            p = h.popen(self.ph.args(h) + ["--json", "fetch", "--pool", self.ph.pool(h), self.manifest],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.procs[h.index] = p
            threading.Thread(target=self._read, args=(h.index, p), daemon=True).start()
            dest = os.path.join(self.ph.pool_dir(h), self.name)
            self.threads.append(self.waiter.verify_when_present(h.index, dest, lambda p=p: p.poll() is not None,
                                                                self.t0 + timeout))

    def _read(self, i, p):
        for line in p.stdout:
            try:
                v = json.loads(line)
            except ValueError:
                continue
            self.last[i] = v
            if v.get("event") == "progress":
                self.done[i] = v.get("done_bytes", 0)
            if v.get("ok") is not None or v.get("state") == "fetched":
                self.done[i] = self.size

    def mean_fraction(self):
        return sum(self.done.values()) / len(self.done) / self.size

    def wait_until(self, cond, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return True
            time.sleep(0.05)
        return False

    def join(self):
        for t in self.threads:
            t.join()

    def pieces_held(self, h):
        """Indexes of the pieces whose bytes are on this receiver's disk (staging file or master),
        hashed against the torrent."""
        path = os.path.join(self.ph.pool_dir(h), self.name)
        if not os.path.exists(path):
            path = os.path.join(self.ph.state(h), "staging", self.ph.pool(h), self.name + ".part")
        held = set()
        if not os.path.exists(path):
            return held
        with open(path, "rb") as f:
            for k, want in enumerate(self.hashes):
                if hashlib.sha1(f.read(self.piece_len)).digest() == want:
                    held.add(k)
        return held

    def final_checks(self):
        """Every receiver: exact copy, and only the master in its pool."""
        fails = []
        for h in self.receivers:
            d = self.ph.pool_dir(h)
            names = sorted(os.listdir(d))
            if names != [self.name]:
                fails.append(f"h{h.index}: pool holds {names}")
                continue
            got = methods.sha256(os.path.join(d, self.name))
            if got != self.expected:
                fails.append(f"h{h.index}: sha256 {got[:16]}... differs from the master")
        return fails + self.violations[:5]


class Checks:
    def __init__(self, scenario):
        self.scenario = scenario
        self.lines = []
        self.ok = True

    def check(self, cond, what):
        self.ok &= bool(cond)
        line = f"{'PASS' if cond else 'FAIL'} {self.scenario}: {what}"
        self.lines.append(line)
        print(line, flush=True)

    def note(self, what):
        line = f"     {self.scenario}: {what}"
        self.lines.append(line)
        print(line, flush=True)


def _common(c, sw, receivers_expected):
    fails = sw.final_checks()
    c.check(all(h.index in sw.waiter.times for h in receivers_expected),
            f"every receiver finished ({len(sw.waiter.times)}/{len(receivers_expected)}; "
            f"last at {max(sw.waiter.times.values(), default=0):.1f} s)")
    c.check(not fails, "every copy has the master's sha256 and no other file ever appeared in a pool"
            + (f" ({'; '.join(fails)})" if fails else ""))


def _begin(args, name):
    """A scenario's checks and its work directory, emptied."""
    work = os.path.join(args.work, name)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    return Checks(name), work


def origin_killed(args, n, kill_at, name):
    c, work = _begin(args, name)
    with netlab.Lab(n, args.rate_mbit) as lab:
        with Swarm(lab, work, args.pool_helper, args.master, args.sha, lab.hosts[1:]) as sw:
            sw.start(args.timeout)
            if kill_at == "union":
                def union_complete():
                    u = set()
                    for h in sw.receivers:
                        u |= sw.pieces_held(h)
                    return len(u) == len(sw.hashes)
                reached = sw.wait_until(union_complete, 60)
                c.check(reached, f"the receivers together held every piece before the kill "
                                 f"({sw.mean_fraction():.0%} each on average)")
            else:
                reached = sw.wait_until(lambda: sw.mean_fraction() >= kill_at, 60)
                c.check(reached, f"receivers reached {kill_at:.0%} on average before the kill "
                                 f"({sw.mean_fraction():.0%})")
            sw.ph.kill(sw.origin)
            t_kill = time.time() - sw.t0
            time.sleep(1.0)
            union = set()
            for h in sw.receivers:
                union |= sw.pieces_held(h)
            complete = len(union) == len(sw.hashes)
            done_at_kill = len(sw.waiter.times)
            c.note(f"origin killed at {t_kill:.1f} s with {sw.mean_fraction():.0%} held on average; "
                   f"together the receivers hold {len(union)}/{len(sw.hashes)} pieces")
            if complete:
                fin = sw.wait_until(lambda: len(sw.waiter.times) == len(sw.receivers), args.restart_after * 4)
                c.check(fin, f"all finished from each other without the origin "
                             f"(last at {max(sw.waiter.times.values(), default=0):.1f} s)")
                if not fin:
                    sw.ph.start(sw.origin)
                    c.note("origin restarted after all (they had not finished)")
            else:
                time.sleep(args.restart_after)
                stuck = [h.index for h in sw.receivers if h.index not in sw.waiter.times]
                c.check(stuck, f"with pieces missing from every receiver, {len(stuck)} receivers waited "
                               f"({len(sw.waiter.times) - done_at_kill} finished meanwhile, which is only "
                               f"possible for one that held every piece)")
                c.check(not any(sw.procs[i].poll() is not None and i not in sw.waiter.times for i in stuck),
                        "no fetch gave up while the origin was away")
                sw.ph.start(sw.origin)
                t_restart = time.time() - sw.t0
                c.note(f"origin restarted at {t_restart:.1f} s")
            sw.join()
            _common(c, sw, sw.receivers)
    return c


def link_down(args, n, name="link"):
    c, work = _begin(args, name)
    with netlab.Lab(n, args.rate_mbit) as lab:
        victim = lab.hosts[-1]
        with Swarm(lab, work, args.pool_helper, args.master, args.sha, lab.hosts[1:]) as sw:
            sw.start(args.timeout)
            reached = sw.wait_until(lambda: sw.done[victim.index] >= 0.3 * sw.size, 60)
            c.check(reached, f"h{victim.index} reached 30 % before the cut")
            lab.link(victim, False)
            t_cut = time.time() - sw.t0
            held_cut = len(sw.pieces_held(victim))
            time.sleep(args.down_s)
            held_back = len(sw.pieces_held(victim))
            lab.link(victim, True)
            t_up = time.time() - sw.t0
            c.note(f"h{victim.index} cut at {t_cut:.1f} s holding {held_cut}/{len(sw.hashes)} pieces, "
                   f"back at {t_up:.1f} s holding {held_back}")
            c.check(held_back - held_cut <= 4, "the cut was real (at most the pieces in flight arrived)")
            c.check(victim.index not in sw.waiter.times, f"h{victim.index} had not finished while cut off")
            sw.join()
            t = sw.waiter.times.get(victim.index)
            c.check(t is not None, f"h{victim.index} resumed and finished"
                    + (f" at {t:.1f} s ({t - t_up:.1f} s after the link came back)" if t else ""))
            _common(c, sw, sw.receivers)
    return c


def corrupt_peer(args, n, name="corrupt"):
    c, work = _begin(args, name)
    with netlab.Lab(n + 1, args.rate_mbit) as lab:
        liar = lab.hosts[-1]
        receivers = lab.hosts[1:-1]
        with Swarm(lab, work, args.pool_helper, args.master, args.sha, receivers,
                   extra=["--peer", f"{liar.ip}:6881"]) as sw:
            d = os.path.join(work, "liar")
            os.makedirs(d)
            bad = bytearray(open(args.master, "rb").read())
            for i in range(0, len(bad), sw.piece_len):
                bad[min(i + 100, len(bad) - 1)] ^= 0xFF
            with open(os.path.join(d, sw.name), "wb") as f:
                f.write(bad)
            tfile = os.path.join(work, "master.torrent")
            with open(tfile, "wb") as f:
                f.write(sw.torrent)
            alog = open(os.path.join(work, "aria2c.log"), "wb")
            aria = liar.popen(["aria2c", "--enable-dht=false", "--bt-enable-lpd=false", "--bt-seed-unverified=true",
                               "--check-integrity=false", "--seed-ratio=0.0", "--disable-ipv6=true",
                               "--listen-port=6881", "--bt-tracker-connect-timeout=5",
                               "--bt-tracker", f"http://{sw.origin.ip}:6969/announce",
                               "-d", d, tfile], stdin=subprocess.DEVNULL, stdout=alog, stderr=alog)
            try:
                time.sleep(2.0)
                c.check(aria.poll() is None, "aria2c seeds the corrupt copy")
                sw.start(args.timeout)
                sw.join()
            finally:
                aria.kill()
                aria.wait()
            rejected = []
            for h in receivers:
                with open(os.path.join(work, f"daemon-h{h.index}.log"), errors="replace") as f:
                    k = f.read().count("did not validate")
                if k:
                    rejected.append(f"h{h.index}:{k}")
            c.check(rejected, f"corrupt pieces from the liar were received and rejected "
                              f"({', '.join(rejected) or 'none: the liar was never used'})")
            _common(c, sw, receivers)
    return c


SCENARIOS = {
    "origin-killed": lambda a: origin_killed(a, a.hosts, 0.5, "origin-killed"),
    "origin-late": lambda a: origin_killed(a, a.hosts, "union", "origin-late"),
    "link": lambda a: link_down(a, a.hosts),
    "corrupt": lambda a: corrupt_peer(a, a.hosts),
}
