#!/usr/bin/env python3
"""RSS of `sluice serve` holding N connections that each sent one 60 KB burst
of pipelined NOOPs (a full 64 KiB read, 140 KB of replies) and are now idle.

    loadtest/burst-idle-rss.py SLUICE_BIN [N]

Loopback only; the server runs on a temp spool and is killed at the end.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

binary = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
d = tempfile.mkdtemp(prefix="sluice-burst-")
with open(f"{d}/c.toml", "w") as f:
    f.write(f'[server]\nlisten=["127.0.0.1:0"]\nmax_connections=20000\n'
            f'max_connections_per_ip=20000\n[spool]\npath="{d}/spool"\n'
            f'[metrics]\nlisten="127.0.0.1:0"\n')
server = subprocess.Popen([binary, "serve", "--config", f"{d}/c.toml",
                           "--ready-file", f"{d}/ready"], stderr=subprocess.DEVNULL)
try:
    deadline = time.time() + 60
    while not os.path.exists(f"{d}/ready"):
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    host, port = open(f"{d}/ready").read().split()[1].rsplit(":", 1)
    burst = b"NOOP\r\n" * 10000
    want = len(b"250 2.0.0 Ok\r\n") * 10000
    held = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.recv(100)  # greeting
        s.sendall(burst)
        got = 0
        while got < want:
            chunk = s.recv(1 << 20)
            assert chunk, "connection closed"
            got += len(chunk)
        held.append(s)
    time.sleep(0.5)
    rss = next(l.split()[1] for l in open(f"/proc/{server.pid}/status")
               if l.startswith("VmRSS"))
    print(f"{os.path.basename(binary)}: {n} idle connections after one burst each: "
          f"VmRSS {rss} kB")
finally:
    server.kill()
    server.wait()
    shutil.rmtree(d, ignore_errors=True)
