#!/usr/bin/env python3
"""Helpers for scripts/e2e-prometheus.sh (stdlib only).

  free-ports N                         print N free loopback TCP ports
  backend PORT                         threaded echo server (runs until killed)
  wait-http URL STATUS DEADLINE_S      poll until GET URL answers STATUS
  traffic ENC_PORT WRONG_PORT FWD_PORT drive traffic through the pair, a wrong-key client and a
                                       max-conns-limited forwarder; verifies echoed bytes
  wait-scrapes PROM JOB N_TARGETS AFTER_UNIX_TS N_SCRAPES DEADLINE_S
                                       wait until every target of JOB is up and has been scraped
                                       N_SCRAPES times after AFTER_UNIX_TS
  eval PROM EXPRS_FILE KIND            evaluate each line via /api/v1/query; KIND=panel: must parse
                                       and return data; KIND=rule: must parse
  rules-health PROM                    every loaded rule evaluated without error
  check-endpoints METRICS_HOSTPORT [EXEMPT,..]
                                       /healthz 200, /readyz 200, unknown path 404, every documented
                                       family present (label values pre-initialised) except EXEMPT
  wait-tcp PORT DEADLINE_S             poll until 127.0.0.1:PORT accepts a connection
  wait-metric HOSTPORT REGEX DEADLINE_S  poll /metrics until a line matches REGEX
"""
import errno
import json
import os
import socket
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

def documented_families():
    """Every family docs/METRICS.md lists in its tables (rows starting with | `name` |)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "METRICS.md")
    names = []
    for line in open(path, encoding="utf-8"):
        if line.startswith("| `sealpipe_") or line.startswith("| `process_"):
            names.append(line.split("`")[1])
    if not names:
        die(f"no metric rows found in {path}")
    return names


def die(msg):
    print(f"e2e: FAIL {msg}", flush=True)
    sys.exit(1)


def http_get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def free_ports(n):
    socks, ports = [], []
    for _ in range(int(n)):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        c = self.request
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                c.sendall(b)
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def backend(port):
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", int(port)), Echo) as srv:
        srv.serve_forever()


def wait_http(url, status, deadline):
    end = time.time() + float(deadline)
    last = None
    while time.time() < end:
        try:
            st, body = http_get(url, timeout=2)
            if st == int(status):
                return
            last = f"{st} {body[:200]!r}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.1)
    die(f"{url} did not answer {status} within {deadline}s (last: {last})")


def echo_roundtrip(port, payload, read_delay=0.0, timeout=20):
    c = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = bytearray()
    err = []

    def writer():
        try:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
        except OSError as e:
            err.append(e)
    t = threading.Thread(target=writer)
    t.start()
    if read_delay:
        time.sleep(read_delay)   # slow reader: lets the proxy's buffers hit their high watermark
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        got += b
    t.join()
    c.close()
    if err:
        raise err[0]
    return bytes(got)


def traffic(enc, wrong, fwd):
    enc, wrong, fwd = int(enc), int(wrong), int(fwd)
    # 1. request/response through the pair, several connections (spread over shards/upstreams)
    for i in range(40):
        p = os.urandom(1024 + 997 * i)
        got = echo_roundtrip(enc, p)
        if got != p:
            die(f"echo through the pair: connection {i} returned {len(got)} of {len(p)} bytes (or different bytes)")
    # 2. concurrent connections
    errs = []

    def one(i):
        try:
            p = os.urandom(200_000)
            got = echo_roundtrip(enc, p)
            if got != p:
                same = next((j for j in range(min(len(got), len(p))) if got[j] != p[j]), min(len(got), len(p)))
                errs.append(f"concurrent {i}: got {len(got)} bytes back of {len(p)}, first difference at {same}")
        except OSError as e:
            errs.append(f"concurrent {i}: {e!r}")
    ts = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    if errs:
        die("; ".join(errs))
    # 3. bulk with a slow reader: flow control must pause and resume, bytes must survive
    p = os.urandom(48 << 20)
    if echo_roundtrip(enc, p, read_delay=1.5, timeout=60) != p:
        die("bulk 48 MiB with a slow reader: data mismatch")
    # 4. wrong key: the handshake must fail and no byte may come back
    for i in range(5):
        try:
            c = socket.create_connection(("127.0.0.1", wrong), timeout=15)
            c.sendall(b"PING\r\n" * 10)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                b = c.recv(65536)
                if not b:
                    break
                got += b
            c.close()
        except (ConnectionResetError, BrokenPipeError):
            got = b""
        except TimeoutError:
            die("wrong-key client: connection neither closed nor answered within 15 s")
        except OSError as e:
            # A reset that came before our shutdown leaves the socket unconnected (ENOTCONN):
            # the handshake failed as it must, and nothing came back.
            if e.errno != errno.ENOTCONN:
                raise
            got = b""
        if got:
            die(f"wrong-key client got {len(got)} bytes back: the decrypt side let it through")
    # 5. max_conns: the forwarder allows 1 connection; hold one, try more
    held = socket.create_connection(("127.0.0.1", fwd), timeout=5)
    held.sendall(b"hold")
    held.recv(16)
    extra = []
    for _ in range(3):
        try:
            s = socket.create_connection(("127.0.0.1", fwd), timeout=2)
            s.settimeout(1.0)
            try:
                s.sendall(b"x")
                s.recv(16)
            except OSError:
                pass
            extra.append(s)
        except OSError:
            pass
    time.sleep(0.5)  # not a sync: gives the forwarder's accept loop a turn with the limit reached
    for s in extra:
        s.close()
    held.close()
    print("e2e: traffic ok (40 sequential + 16 concurrent echoes, 48 MiB slow-reader bulk, 5 wrong-key clients refused, max_conns exercised)", flush=True)


def prom_query(prom, q):
    st, body = http_get(f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q}), timeout=10)
    try:
        return st, json.loads(body)
    except ValueError:
        return st, {"status": "error", "error": body[:300].decode(errors="replace")}


def wait_scrapes(prom, job, n_targets, after, n, deadline):
    end = time.time() + float(deadline)
    need = float(after) + int(n)     # scrape interval is 1 s
    last = None
    while time.time() < end:
        st, r = prom_query(prom, f'count(up{{job="{job}"}} == 1) == {int(n_targets)} and min(timestamp(up{{job="{job}"}})) > {need}')
        if r.get("status") == "success" and r["data"]["result"]:
            return
        last = r
        time.sleep(0.2)
    st, r = prom_query(prom, f'up{{job="{job}"}}')
    die(f"Prometheus did not scrape {n_targets} targets {n} times after traffic within {deadline}s: up={r.get('data')} last={last}")


def eval_exprs(prom, path, kind):
    exprs = [l.strip() for l in open(path) if l.strip()]
    bad = 0
    for e in exprs:
        st, r = prom_query(prom, e)
        if r.get("status") != "success":
            print(f"e2e: FAIL {kind} expr does not evaluate: {r.get('error')}\n    {e}")
            bad += 1
        elif kind in ("panel", "variable") and not r["data"]["result"]:
            print(f"e2e: FAIL {kind} expr returned no data:\n    {e}")
            bad += 1
        else:
            print(f"e2e: ok   {kind} ({len(r['data']['result'])} series) {e[:140]}")
    if bad:
        die(f"{bad} of {len(exprs)} {kind} expressions failed")
    print(f"e2e: all {len(exprs)} {kind} expressions ok")


def rules_health(prom):
    st, body = http_get(f"http://{prom}/api/v1/rules")
    r = json.loads(body)
    n, bad = 0, []
    for g in r["data"]["groups"]:
        for rule in g["rules"]:
            n += 1
            if rule.get("health") != "ok":
                bad.append(f"{rule['name']}: {rule.get('health')} {rule.get('lastError')}")
    if not n:
        die("Prometheus loaded no rules")
    if bad:
        die("rules failing in the server: " + "; ".join(bad))
    print(f"e2e: all {n} loaded rules evaluate in the server without error")


def check_endpoints(hp, exempt=""):
    for path, want in (("/healthz", 200), ("/readyz", 200), ("/no-such-path", 404)):
        st, body = http_get(f"http://{hp}{path}")
        if st != want:
            die(f"GET http://{hp}{path}: {st}, want {want} ({body[:200]!r})")
    st, body = http_get(f"http://{hp}/metrics")
    text = body.decode()
    fams = {l.split()[2] for l in text.splitlines() if l.startswith("# TYPE ")}
    skip = set(filter(None, exempt.split(",")))
    missing = [f for f in documented_families() if f not in fams and f not in skip]
    if missing:
        die(f"http://{hp}/metrics lacks metric families: {' '.join(missing)}")
    print(f"e2e: endpoints ok on {hp} (healthz 200, readyz 200, 404 else; {len(fams)} families, every documented one present{' except ' + exempt if skip else ''})")


def wait_tcp(port, deadline):
    end = time.time() + float(deadline)
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    die(f"nothing listens on 127.0.0.1:{port} after {deadline}s")


def wait_metric(hp, regex, deadline):
    import re
    end = time.time() + float(deadline)
    rx = re.compile(regex, re.M)
    while time.time() < end:
        try:
            st, body = http_get(f"http://{hp}/metrics", timeout=2)
            if st == 200 and rx.search(body.decode()):
                return
        except OSError:
            pass
        time.sleep(0.1)
    die(f"http://{hp}/metrics never matched /{regex}/ within {deadline}s")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"free-ports": free_ports, "backend": backend, "wait-http": wait_http, "traffic": traffic,
     "wait-scrapes": wait_scrapes, "eval": eval_exprs, "rules-health": rules_health,
     "check-endpoints": check_endpoints, "wait-metric": wait_metric, "wait-tcp": wait_tcp}[cmd](*args)


if __name__ == "__main__":
    main()
