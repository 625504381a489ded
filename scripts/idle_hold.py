#!/usr/bin/env python3
"""Opens N keep-alive connections to a server on 127.0.0.1, sends one request with the key on
each and reads its answer, then holds them idle: never writes again. READY (a file) gets "held
refused" once all are open; the connections stay until standard input ends, then the script
prints how many the server closed meanwhile.

    taskset -c 1 python3 scripts/idle_hold.py PORT 10000 KEY /tmp/ready </tmp/hold-fifo

Used by scripts/loadtest.sh (IDLE) and scripts/idletwins.sh. N descriptors. Not a test.
"""
import socket
import sys

port, n, key, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
req = f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\n\r\n".encode()
conns, bad = [], 0
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(req)
    if not s.recv(65536).startswith(b"HTTP/1.1 200"):
        bad += 1
    conns.append(s)
with open(ready, "w") as f:
    f.write(f"{len(conns)} {bad}\n")
sys.stdin.read()  # held until the caller closes our standard input
closed = 0
for s in conns:
    s.setblocking(False)
    try:
        closed += s.recv(1) == b""
    except BlockingIOError:
        pass
print(f"held {len(conns)}, refused {bad}, closed by the server while held {closed}")
