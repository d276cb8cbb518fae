"""One lab host's libtorrent-rasterbar session (Debian's python3-libtorrent), for the lab's `lt`
method. Run with the system Python that has the bindings, inside the host's namespace:

  lt_host.py seed TORRENT SAVE_DIR LISTEN_IP TRACKER_URL       the file is in SAVE_DIR: check it,
                                                               super-seed, print 'seeding', run until killed
  lt_host.py fetch TORRENT SAVE_DIR LISTEN_IP TRACKER_URL      download; print 'complete' the moment
                                                               every piece is in and checked, then keep
                                                               seeding until killed (as our daemons do)

TCP only (the other methods use TCP; uTP would change the congestion control), no DHT, LSD, UPnP or
NAT-PMP: peers meet through the lab's tracker and peer exchange, as in the other BitTorrent methods.
Any other setting is libtorrent's default. VCC_LAB_LT_SUPER_SEED=0: the origin seeds normally.
"""
import os
import sys
import time

import libtorrent as lt

PORT = 6881


def main(argv):
    if len(argv) != 5 or argv[0] not in ("seed", "fetch"):
        sys.exit(__doc__)
    mode, torrent, save, ip, tracker = argv
    ses = lt.session({
        "listen_interfaces": f"{ip}:{PORT}",
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
        "enable_outgoing_utp": False, "enable_incoming_utp": False,
        "alert_mask": 0,
    })
    params = {"ti": lt.torrent_info(torrent), "save_path": save, "trackers": [tracker]}
    if mode == "seed" and os.environ.get("VCC_LAB_LT_SUPER_SEED", "1") != "0":
        params["flags"] = lt.torrent_flags.super_seeding | lt.torrent_flags.auto_managed
    h = ses.add_torrent(params)
    said = False
    last = 0.0
    while True:
        s = h.status()
        if time.time() - last >= 1.0:  # progress into the host's log (stderr)
            last = time.time()
            print(f"{time.strftime('%H:%M:%S')} {s.state} {s.total_done} bytes, peers {s.num_peers} "
                  f"(seeds {s.num_seeds}), down {s.download_payload_rate} up {s.upload_payload_rate} B/s",
                  file=sys.stderr, flush=True)
        if s.errc.value():
            sys.exit(f"lt_host: {s.errc.message()}")
        if s.is_seeding and not said:
            print("seeding" if mode == "seed" else "complete", flush=True)
            said = True
        time.sleep(0.05 if not said else 1.0)


if __name__ == "__main__":
    main(sys.argv[1:])
