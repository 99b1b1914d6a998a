#!/usr/bin/env python3
"""Measures a live upgrade (--handoff moving established connections, issue 17).

For each connection count N (default 1000, 2000, 4000): a sealpipe pair (encrypt -> decrypt,
2 shards each) in front of a backend in this script; N connections, of which 100 "active" ones
send a ping every 10 ms and time its echo, and the rest are idle (one echo each, then quiet long
enough to hibernate); besides them a paced bulk echo stream and a pub/sub subscriber (one
message every 10 ms). Then each side is upgraded in turn (a new process with --handoff on the
same socket path). Reports, per side and N:

  exit_ms      new process started -> old process exited (it exits once its connections moved)
  rss_fresh    the side's RSS with the connections made fresh (all idle and hibernated)
  rss_moved    the new process's RSS with the same connections moved in (hibernated again)
  moved        sealpipe_handoff_connections_total{result="moved"} of the new process
and, over the whole run: each active connection's longest round trip (its pause: p50, p99 and
max over the active connections), the longest gap between reads of the bulk stream, the
longest pub/sub delay, and whether every connection still echoes afterwards.

These are timings on whatever machine runs it: report them with the machine's load, never
assert them in a test.

  scripts/upgrade-measure.py                       # release build, 1000 2000 4000
  scripts/upgrade-measure.py --bin target/release/sealpipe --counts 1000
"""

import argparse
import json
import os
import re
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The sealpipe processes' logs: $SEALPIPE_MEASURE_LOG (a file), else nowhere.
LOG = open(os.environ["SEALPIPE_MEASURE_LOG"], "ab") if os.environ.get("SEALPIPE_MEASURE_LOG") else subprocess.DEVNULL


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Backend(threading.Thread):
    """Echoes every connection; one whose first bytes are b'SUB\\n' gets `seq t_ns\\n` every
    10 ms instead."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sel = selectors.DefaultSelector()
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.subs = []
        self.pending = {}

    def run(self):
        next_pub = time.monotonic()
        seq = 0
        while True:
            timeout = max(0.0, next_pub - time.monotonic())
            for key, _ in self.sel.select(timeout):
                if key.data is None:
                    while True:
                        try:
                            c, _ = self.lsock.accept()
                        except BlockingIOError:
                            break
                        c.setblocking(False)
                        self.sel.register(c, selectors.EVENT_READ, "new")
                    continue
                c = key.fileobj
                try:
                    data = c.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.sel.unregister(c)
                    c.close()
                    if c in self.subs:
                        self.subs.remove(c)
                    continue
                if key.data == "new" and data.startswith(b"SUB\n"):
                    self.sel.modify(c, selectors.EVENT_READ, "sub")
                    self.subs.append(c)
                    continue
                if key.data == "new":
                    self.sel.modify(c, selectors.EVENT_READ, "echo")
                c.setblocking(True)
                c.sendall(data)
                c.setblocking(False)
            if time.monotonic() >= next_pub:
                msg = b"%d %d\n" % (seq, time.monotonic_ns())
                for s in list(self.subs):
                    try:
                        s.setblocking(True)
                        s.sendall(msg)
                        s.setblocking(False)
                    except OSError:
                        pass
                seq += 1
                next_pub += 0.010


def scrape(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            out = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break
                out += b
        return out.decode()
    except OSError:
        return ""


def metric(text, name, labels=None):
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        rest = line[len(name):]
        if not (rest.startswith("{") or rest.startswith(" ")):
            continue
        if labels and not all(f'{k}="{v}"' in line for k, v in labels.items()):
            continue
        total += float(line.rsplit(" ", 1)[1])
    return total


def wait(what, cond, timeout=120):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Side:
    def __init__(self, binary, mode, listen, target, keys, work):
        self.binary, self.mode, self.listen, self.target, self.keys = binary, mode, listen, target, keys
        self.metrics = free_port()
        self.sock = os.path.join(work, f"{mode}.sock")
        self.proc = None

    def args(self):
        a = [self.binary, self.mode, "--listen", f"127.0.0.1:{self.listen}", "--target",
             f"127.0.0.1:{self.target}", "--threads", "2", "--metrics",
             f"127.0.0.1:{self.metrics}", "--drain-timeout", "120", "--log-level", os.environ.get("SEALPIPE_LOG", "warn"),
             "--max-conns", "20000", "--handoff", self.sock]
        for k in self.keys:
            a += ["--key", k]
        return a

    def start(self):
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=LOG)
        wait(f"{self.mode} metrics", lambda: scrape(self.metrics) != "")
        return self.proc

    def upgrade(self):
        old = self.proc
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=LOG)
        old.wait(timeout=120)
        took = time.monotonic() - t0
        if old.returncode != 0:
            raise SystemExit(f"old {self.mode} exited {old.returncode}")
        return took


def run(binary, n):
    work = tempfile.mkdtemp(prefix="sealpipe-upgrade-measure-")
    key = os.path.join(work, "k.key")
    subprocess.run([binary, "keygen", "--out", key], check=True, stdout=subprocess.DEVNULL)
    backend = Backend()
    backend.start()
    dec = Side(binary, "decrypt", free_port(), backend.port, [key], work)
    enc = Side(binary, "encrypt", free_port(), dec.listen, [key], work)
    dec.start()
    enc.start()
    wait("encrypt listening", lambda: os.path.exists(enc.sock))
    base = {"encrypt": rss_kib(enc.proc.pid), "decrypt": rss_kib(dec.proc.pid)}
    idle = []
    for i in range(n):
        c = socket.create_connection(("127.0.0.1", enc.listen), timeout=30)
        c.sendall(b"hello %d\n" % i)
        want = b"hello %d\n" % i
        got = b""
        while len(got) < len(want):
            got += c.recv(64)
        assert got == want
        idle.append(c)
    stop = threading.Event()
    gaps, delays, errors = [], [], []

    def bulk():
        s = socket.create_connection(("127.0.0.1", enc.listen), timeout=30)
        chunk = bytes(range(256)) * 64  # 16 KiB
        last = time.monotonic()
        sent = 0
        while not stop.is_set():
            try:
                s.sendall(chunk)
                sent += len(chunk)
                got = 0
                while got < len(chunk):
                    got += len(s.recv(65536))
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                time.sleep(0.002)
            except OSError as e:
                errors.append(f"bulk: {e}")
                return

    def sub():
        s = socket.create_connection(("127.0.0.1", enc.listen), timeout=30)
        s.sendall(b"SUB\n")
        f = s.makefile("rb")
        expect = None
        while not stop.is_set():
            line = f.readline()
            if not line:
                errors.append("sub: closed")
                return
            seq, t = map(int, line.split())
            if expect is not None and seq != expect:
                errors.append(f"sub: {seq} where {expect} was due")
                return
            expect = seq + 1
            delays.append((time.monotonic_ns() - t) / 1e9)

    active = idle[:min(100, n)]
    slow = []  # (sent at, connection, round trip) of every ping slower than 2 ms
    windows = []  # (from, to) of each upgrade: its new process's start to 0.5 s after the old exits

    def pinger():
        # One thread for every active connection: a ping each 10 ms, its echo timed.
        sel = selectors.DefaultSelector()
        for i, c in enumerate(active):
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ, i)
        sent = {}
        buf = {i: b"" for i in range(len(active))}
        next_round = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_round:
                for i, c in enumerate(active):
                    if i not in sent:
                        try:
                            c.send(b"p%07d\n" % i)
                            sent[i] = now
                        except OSError as e:
                            errors.append(f"ping: {e}")
                            return
                next_round += 0.010
            for key, _ in sel.select(max(0.0, next_round - time.monotonic())):
                i = key.data
                try:
                    data = key.fileobj.recv(4096)
                except BlockingIOError:
                    continue
                except OSError as e:
                    errors.append(f"ping: {e}")
                    return
                if not data:
                    errors.append("ping: closed")
                    return
                buf[i] += data
                while len(buf[i]) >= 9:
                    msg, buf[i] = buf[i][:9], buf[i][9:]
                    if msg != b"p%07d\n" % i:
                        errors.append(f"ping: {msg!r}")
                        return
                    at = sent.pop(i)
                    rtt = time.monotonic() - at
                    if rtt > 0.002:
                        slow.append((at, i, rtt))
        # The last pings' echoes, so every connection is quiet again for the final check.
        end = time.monotonic() + 10
        while sent and time.monotonic() < end:
            for key, _ in sel.select(0.1):
                i = key.data
                try:
                    buf[i] += key.fileobj.recv(4096)
                except BlockingIOError:
                    continue
                if len(buf[i]) >= 9:
                    buf[i] = buf[i][9:]
                    sent.pop(i, None)
        for c in active:
            sel.unregister(c)
            c.setblocking(True)

    threads = [threading.Thread(target=bulk, daemon=True), threading.Thread(target=sub, daemon=True),
               threading.Thread(target=pinger, daemon=True)]
    for t in threads:
        t.start()
    time.sleep(1)
    out = {"connections": n}
    for side in (enc, dec):
        quiet = n - len(active)
        wait(f"{side.mode} hibernating", lambda: metric(scrape(side.metrics), "sealpipe_connections_hibernating") >= quiet)
        time.sleep(2.5)  # the memory keeper's trim after the burst (at most once a second)
        fresh = rss_kib(side.proc.pid)
        t0 = time.monotonic()
        took = side.upgrade()
        windows.append((t0, time.monotonic() + 0.5))
        wait(f"{side.mode} moved", lambda: metric(scrape(side.metrics), "sealpipe_handoff_connections_total", {"result": "moved"}) >= n + 2)
        wait(f"{side.mode} hibernating again", lambda: metric(scrape(side.metrics), "sealpipe_connections_hibernating") >= quiet)
        time.sleep(2.5)  # the memory keeper's trim after the burst (at most once a second)
        text = scrape(side.metrics)
        out[side.mode] = {
            "exit_ms": round(took * 1000, 1),
            "rss_base_kib": base[side.mode],
            "rss_fresh_kib": fresh,
            "rss_moved_kib": rss_kib(side.proc.pid),
            "moved": metric(text, "sealpipe_handoff_connections_total", {"result": "moved"}),
            "kept": metric(text, "sealpipe_handoff_connections_total", {"result": "kept"}),
            "failed": metric(text, "sealpipe_handoff_connections_total", {"result": "failed"}),
        }
        time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=5)
    bad = 0
    for i, c in enumerate(idle):
        msg = b"again %d\n" % i
        try:
            c.sendall(msg)
            got = b""
            while len(got) < len(msg):
                b = c.recv(64)
                if not b:
                    break
                got += b
            bad += got != msg
        except OSError:
            bad += 1
    gaps.sort()
    delays.sort()
    pct = lambda v, p: v[min(len(v) - 1, int(len(v) * p))] if v else 0.0
    # Each active connection's longest round trip in an upgrade's window, and outside them.
    inside, outside = {i: 0.0 for i in range(len(active))}, {i: 0.0 for i in range(len(active))}
    for at, i, rtt in slow:
        d = inside if any(a <= at <= b for a, b in windows) else outside
        d[i] = max(d[i], rtt)
    pauses = sorted(inside.values())
    quiet_pauses = sorted(outside.values())
    out["quiet_p99_ms"] = round(pct(quiet_pauses, 0.99) * 1000, 1)
    out["active"] = len(pauses)
    out["pause_p50_ms"] = round(pct(pauses, 0.50) * 1000, 1)
    out["pause_p99_ms"] = round(pct(pauses, 0.99) * 1000, 1)
    out["pause_max_ms"] = round((pauses[-1] if pauses else 0) * 1000, 1)
    out["bulk_gap_p99_ms"] = round(pct(gaps, 0.99) * 1000, 1)
    out["bulk_gap_max_ms"] = round((gaps[-1] if gaps else 0) * 1000, 1)
    out["pubsub_delay_p99_ms"] = round(pct(delays, 0.99) * 1000, 1)
    out["pubsub_delay_max_ms"] = round((delays[-1] if delays else 0) * 1000, 1)
    out["idle_not_echoing"] = bad
    out["errors"] = errors
    for side in (enc, dec):
        side.proc.terminate()
    for c in idle:
        c.close()
    for side in (enc, dec):
        side.proc.wait(timeout=60)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/sealpipe"))
    ap.add_argument("--counts", default="1000,2000,4000")
    a = ap.parse_args()
    if not os.path.exists(a.bin):
        subprocess.run(["cargo", "build", "--release", "--bin", "sealpipe"], cwd=ROOT, check=True)
    rows = [run(a.bin, int(n)) for n in a.counts.split(",")]
    print(json.dumps(rows, indent=1))
    print()
    print("| connections | side | new start -> old exit | RSS fresh | RSS moved | moved/kept/failed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for side in ("encrypt", "decrypt"):
            s = r[side]
            print(f"| {r['connections']} | {side} | {s['exit_ms']} ms | {s['rss_fresh_kib'] / 1024:.1f} MiB "
                  f"| {s['rss_moved_kib'] / 1024:.1f} MiB ({(s['rss_moved_kib'] / s['rss_fresh_kib'] - 1) * 100:+.1f}%) "
                  f"| {s['moved']:.0f}/{s['kept']:.0f}/{s['failed']:.0f} |")
    for r in rows:
        print(f"{r['connections']} connections: longest round trip of {r['active']} active connections "
              f"in an upgrade: p50 {r['pause_p50_ms']} ms, p99 {r['pause_p99_ms']} ms, max {r['pause_max_ms']} ms "
              f"(outside the upgrades: p99 {r['quiet_p99_ms']} ms); "
              f"bulk gap p99 {r['bulk_gap_p99_ms']} ms (max {r['bulk_gap_max_ms']}), "
              f"pub/sub delay p99 {r['pubsub_delay_p99_ms']} ms (max {r['pubsub_delay_max_ms']}), "
              f"idle not echoing {r['idle_not_echoing']}, errors {r['errors']}")
    ok = all(not r["errors"] and r["idle_not_echoing"] == 0 for r in rows)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
