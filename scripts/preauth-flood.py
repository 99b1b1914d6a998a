#!/usr/bin/env python3
"""Pre-authentication flood: what unauthenticated peers cost a decrypt side (docs/RELIABILITY.md).

Starts an echo backend, a `sealpipe decrypt` (1 shard, the binary under test) in front of it and a
`sealpipe encrypt` in front of that, all on loopback. Then opens --conns connections to the decrypt
side from --sources addresses (127.0.0.2, 127.0.0.3, ...), a third sending nothing, a third one
byte (the version byte) and a third the largest prefix of a hello that still waits for more
(--partial bytes), and holds them all. Meanwhile, and after, a legitimate client does a handshake
and a 64 KiB echo through the encrypt side, --legit times.

Reports (one JSON object on stdout, a table on stderr): the decrypt process's RSS growth per flood
connection, its CPU time per flood connection, how many connections it admitted and rejected (by
reason, from its metrics endpoint), and the legitimate client's round-trip latencies (median, max).

    scripts/preauth-flood.py --bin target/release/sealpipe
    scripts/preauth-flood.py --bin target/release/sealpipe -- --max-handshakes-per-source 500

Arguments after `--` go to the decrypt side (an older build may not know the newer flags).
Everything runs on 127.0.0.0/8 and stops by itself; every wait has a deadline. Needs about
--conns + 200 descriptors in this process (the hard limit is raised to what it allows).
"""

import argparse
import json
import os
import resource
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_listening(port, deadline=20.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"nothing listens on 127.0.0.1:{port} after {deadline} s")


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            b = self.request.recv(65536)
            if not b:
                return
            self.request.sendall(b)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric_sum(text, name, **labels):
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name):]
        if rest.startswith("{"):
            labelset, _, value = rest[1:].partition("} ")
        elif rest.startswith(" "):
            labelset, value = "", rest[1:]
        else:
            continue
        if all(f'{k}="{v}"' in labelset for k, v in labels.items()):
            total += float(value)
    return total


def legit_round_trip(port, size=65536):
    payload = os.urandom(size)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(payload)
        got = bytearray()
        while len(got) < size:
            b = s.recv(size - len(got))
            if not b:
                break
            got += b
    took = time.monotonic() - t0
    if bytes(got) != payload:
        raise RuntimeError(f"legitimate echo returned {len(got)} of {size} bytes, or other bytes")
    return took


def try_round_trip(port):
    """A legitimate round trip's seconds, or None if it failed (refused, reset)."""
    try:
        return legit_round_trip(port)
    except (OSError, RuntimeError) as e:
        print(f"legitimate round trip failed: {e}", file=sys.stderr)
        return None


def settle(pid, quiet=0.5, deadline=60.0):
    """Waits until the process has used no CPU for `quiet` seconds (it has read everything)."""
    end = time.monotonic() + deadline
    last, since = cpu_ticks(pid), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.1)
        now = cpu_ticks(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    print("warning: the decrypt side never went quiet", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, help="the sealpipe binary under test")
    ap.add_argument("--conns", type=int, default=10_000)
    ap.add_argument("--sources", type=int, default=8, help="source addresses 127.0.0.2..")
    ap.add_argument("--partial", type=int, default=105,
                    help="bytes of the 'almost a hello' class: the largest hello minus one (105 in v1)")
    ap.add_argument("--version-byte", type=int, default=1, help="the protocol's version byte")
    ap.add_argument("--legit", type=int, default=20, help="legitimate round trips after the flood")
    ap.add_argument("decrypt_args", nargs="*", help="extra arguments for the decrypt side (after --)")
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < a.conns + 200:
        sys.exit(f"need {a.conns + 200} descriptors, the hard limit is {hard}")

    tmp = tempfile.mkdtemp(prefix="sealpipe-flood-")
    key = os.path.join(tmp, "k.key")
    subprocess.run([a.bin, "keygen", "--out", key], check=True, stdout=subprocess.DEVNULL)

    echo = EchoServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    echo_port = echo.server_address[1]

    dec_port, met_port, enc_port = free_port(), free_port(), free_port()
    common = ["--threads", "1", "--log-level", os.environ.get("FLOOD_LOG", "warn")]
    procs = []
    try:
        dec = subprocess.Popen(
            [a.bin, "decrypt", "--listen", f"127.0.0.1:{dec_port}", "--target", f"127.0.0.1:{echo_port}",
             "--key", key, "--metrics", f"127.0.0.1:{met_port}", "--handshake-timeout", "120",
             "--max-conns", str(a.conns * 2)] + common + a.decrypt_args,
            stderr=open(os.path.join(tmp, "decrypt.log"), "w"))
        procs.append(dec)
        enc = subprocess.Popen(
            [a.bin, "encrypt", "--listen", f"127.0.0.1:{enc_port}", "--target", f"127.0.0.1:{dec_port}",
             "--key", key] + common,
            stderr=open(os.path.join(tmp, "encrypt.log"), "w"))
        procs.append(enc)
        wait_listening(dec_port)
        wait_listening(enc_port)
        wait_listening(met_port)
        # Warm up: a few real sessions, so pools and allocator arenas exist before the baseline.
        for _ in range(5):
            legit_round_trip(enc_port)
        settle(dec.pid)
        rss0, cpu0 = rss_kib(dec.pid), cpu_ticks(dec.pid)

        held, during = [], []
        partial = bytes([a.version_byte, 1]) + b"\0" * max(0, a.partial - 2)
        sends = [b"", bytes([a.version_byte]), partial]
        refused_at_connect = 0
        t_flood = time.monotonic()
        for i in range(a.conns):
            src = f"127.0.0.{2 + i % a.sources}"
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((src, 0))
            try:
                s.connect(("127.0.0.1", dec_port))
                if sends[i % 3]:
                    s.sendall(sends[i % 3])
                held.append(s)
            except OSError:
                # Reset at once by an admission cap (the metrics say which).
                refused_at_connect += 1
                s.close()
            if i % 1000 == 999:
                during.append(try_round_trip(enc_port))
        flood_s = time.monotonic() - t_flood
        settle(dec.pid)
        rss1, cpu1 = rss_kib(dec.pid), cpu_ticks(dec.pid)
        text = scrape(met_port)
        tries = [try_round_trip(enc_port) for _ in range(a.legit)]
        after = [t for t in tries if t is not None] or [float("nan")]
        reasons = {}
        for r in ["max_conns", "max_handshakes", "per_source_handshakes", "per_source_rate"]:
            reasons[r] = metric_sum(text, "sealpipe_connections_rejected_total", reason=r)
        active = metric_sum(text, "sealpipe_connections_active")
        result = {
            "binary": a.bin,
            "decrypt_args": a.decrypt_args,
            "flood_connections": a.conns,
            "sources": a.sources,
            "partial_bytes": a.partial,
            "admitted_and_open": active,
            "rejected": reasons,
            "refused_at_connect": refused_at_connect,
            "rss_before_kib": rss0,
            "rss_after_kib": rss1,
            "rss_growth_bytes_per_flood_conn": round((rss1 - rss0) * 1024 / a.conns, 1),
            "rss_growth_bytes_per_admitted_conn": round((rss1 - rss0) * 1024 / max(active, 1), 1),
            "cpu_seconds": (cpu1 - cpu0) / CLK_TCK,
            "cpu_us_per_flood_conn": round((cpu1 - cpu0) / CLK_TCK / a.conns * 1e6, 1),
            "flood_seconds": round(flood_s, 2),
            "legit_during_ms": [None if x is None else round(x * 1000, 1) for x in during],
            "legit_after_failed": sum(t is None for t in tries),
            "legit_after_median_ms": round(statistics.median(after) * 1000, 2),
            "legit_after_max_ms": round(max(after) * 1000, 2),
        }
        for s in held:
            s.close()
        json.dump(result, sys.stdout, indent=1)
        print()
        print(f"flood {a.conns} conns from {a.sources} sources: admitted {active:.0f}, rejected {reasons}; "
              f"RSS +{result['rss_growth_bytes_per_flood_conn']} B/conn "
              f"(+{result['rss_growth_bytes_per_admitted_conn']} B/admitted conn), "
              f"CPU {result['cpu_us_per_flood_conn']} us/conn; legit 64 KiB echo median "
              f"{result['legit_after_median_ms']} ms", file=sys.stderr)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
        echo.shutdown()


if __name__ == "__main__":
    main()
