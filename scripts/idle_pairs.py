#!/usr/bin/env python3
"""Holds N idle TCP connections on 127.0.0.1 that no server under test touches: a listener of
this process accepts them and never reads, the clients never write. They stay until FLAG (a
file this script writes once all are open, with the counts) is removed.

    taskset -c 1 python3 scripts/idle_pairs.py 9900 /tmp/idle-flag &   # ... rm /tmp/idle-flag

Both ends are in this process: 2 × N descriptors (N up to about half of `ulimit -n`). Not a test.
"""
import os
import socket
import sys
import time

n, flag = int(sys.argv[1]), sys.argv[2]
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
clients, served = [], []
for _ in range(n):
    c = socket.socket()
    c.connect(listener.getsockname())
    clients.append(c)
    served.append(listener.accept()[0])
with open(flag, "w") as f:
    f.write(f"{len(clients)} {len(served)}\n")
while os.path.exists(flag):
    time.sleep(0.2)
