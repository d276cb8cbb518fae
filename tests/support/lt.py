"""python3-libtorrent as a third-party peer for the interop tests.

  lt.py download TORRENT SAVE_DIR PEER_PORT   connect to 127.0.0.1:PEER_PORT, exit 0 when complete
  lt.py seed TORRENT SAVE_DIR LISTEN_PORT     check the file, print 'seeding', seed until killed
"""
import sys
import time

import libtorrent as lt

mode, torrent, save, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
listen = port if mode == "seed" else 0
ses = lt.session({
    "listen_interfaces": "127.0.0.1:%d" % listen,
    "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
    "allow_multiple_connections_per_ip": True,
    # librqbit listens on TCP only here; libtorrent would try uTP first.
    "enable_outgoing_utp": False, "enable_incoming_utp": False,
})
h = ses.add_torrent({"ti": lt.torrent_info(torrent), "save_path": save})
deadline = time.time() + 150
announced = False
while time.time() < deadline:
    s = h.status()
    if mode == "download":
        h.connect_peer(("127.0.0.1", port))
        if s.is_seeding:
            print("complete", s.total_done, flush=True)
            sys.exit(0)
    elif s.is_seeding and not announced:
        print("seeding", flush=True)
        announced = True
    time.sleep(0.5)
print("timeout: state %s, %d bytes, error %r" % (h.status().state, h.status().total_done, h.status().errc.message()), file=sys.stderr)
sys.exit(1)
