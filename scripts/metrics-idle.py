#!/usr/bin/env python3
"""Idle connections against the metrics endpoint (docs/RELIABILITY.md).

Starts `sealpipe forward` (1 shard, the binary under test) with a metrics endpoint on loopback,
opens --conns connections to the endpoint that never send a byte, then after each of a few
check points reports how many the endpoint has closed, whether a real scrape is answered
meanwhile, and the process's descriptor count and the metrics thread's CPU time.

    scripts/metrics-idle.py --bin target/release/sealpipe --conns 1000 --watch 10

Everything runs on 127.0.0.1 and stops by itself.
"""

import argparse
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def thread_ticks(pid, name="sealpipe-metric"):
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            if f.read().strip() != name:
                continue
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])
    return 0


def closed_count(socks):
    n = 0
    for s in socks:
        r, _, _ = select.select([s], [], [], 0)
        if r:
            try:
                if s.recv(1) == b"":
                    n += 1
            except OSError:
                n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--watch", type=float, default=10.0, help="seconds to watch the idle connections")
    a = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    listen, met = free_port(), free_port()
    p = subprocess.Popen([a.bin, "forward", "--threads", "1", "--listen", f"127.0.0.1:{listen}",
                          "--target", "127.0.0.1:9", "--metrics", f"127.0.0.1:{met}", "--log-level", "error"])
    try:
        end = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", met), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > end:
                    sys.exit("metrics endpoint never came up")
                time.sleep(0.02)
        fds0 = len(os.listdir(f"/proc/{p.pid}/fd"))
        socks = [socket.create_connection(("127.0.0.1", met), timeout=5) for _ in range(a.conns)]
        t0, cpu0 = time.monotonic(), thread_ticks(p.pid)
        most_fds = 0
        points = []
        for at in [1, 3, 6, a.watch]:
            while time.monotonic() - t0 < at:
                most_fds = max(most_fds, len(os.listdir(f"/proc/{p.pid}/fd")))
                time.sleep(0.05)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{met}/metrics", timeout=10) as r:
                    scrape = r.status
            except OSError as e:
                scrape = f"failed: {e}"
            points.append({"after_s": at, "closed_by_endpoint": closed_count(socks), "scrape": scrape})
        result = {
            "binary": a.bin,
            "idle_conns": a.conns,
            "points": points,
            "process_fds_before": fds0,
            "process_fds_most": most_fds,
            "metrics_thread_cpu_s": (thread_ticks(p.pid) - cpu0) / CLK_TCK,
        }
        json.dump(result, sys.stdout, indent=1)
        print()
        for s in socks:
            s.close()
    finally:
        p.terminate()
        p.wait(timeout=40)


if __name__ == "__main__":
    main()
