#!/usr/bin/env python3
"""The bulk client of the cost scripts (ab-pair-cost.sh, overflow-checks-cost.sh), stdlib only.

usage: bulk_echo_client.py PORT MIB
Connects to 127.0.0.1:PORT (an echo backend behind it), sends MIB MiB and half-closes, reading
the echo back at the same time; fails unless exactly as many bytes came back.
"""
import socket
import sys
import threading

port, total = int(sys.argv[1]), int(sys.argv[2]) << 20
c = socket.create_connection(("127.0.0.1", port), timeout=900)
block = bytes(range(256)) * 256


def send():
    left = total
    while left:
        n = min(left, len(block))
        c.sendall(block[:n])
        left -= n
    c.shutdown(socket.SHUT_WR)


t = threading.Thread(target=send)
t.start()
got = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    got += len(b)
t.join()
assert got == total, f"echoed {got} of {total}"
