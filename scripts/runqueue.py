#!/usr/bin/env python3
"""How long keygate's request thread waited for its CPU while it was busy.

Samples /proc/PID/task/TID/schedstat (time on the CPU, time runnable but waiting on the run
queue) of every process whose executable path ends with one of the given suffixes, once a
second, for SECONDS. Run it beside scripts/loadtest.sh (e.g. KEYGATE_BIN=A BASELINE=B with
the "keygate-rot base-rot" contenders): the instance under load at a given second is the one
whose main thread (the current-thread runtime that serves every request) was on the CPU for
more than BUSY_MS of it. Other work on the same core (the usage flush, store lookups, kernel
threads) shows as run-queue wait of that thread.

    scripts/runqueue.py SECONDS TAG=SUFFIX [TAG=SUFFIX ...]

Prints one line per second and thread that did something, then per tag: the busy seconds,
the main thread's CPU time and run-queue wait, and the wait per second of CPU.
"""

import os
import sys
import time

BUSY_MS = 600


def snapshot(suffixes):
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            exe = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode()
        except OSError:
            continue
        tag = next((t for t, s in suffixes if exe.endswith(s)), None)
        if tag is None:
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                run, wait, _ = map(int, open(f"/proc/{pid}/task/{tid}/schedstat").read().split())
            except (OSError, ValueError):
                continue
            name = "main" if tid == pid else comm
            out[(tag, pid, tid, name)] = (run, wait)
    return out


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    seconds = float(sys.argv[1])
    suffixes = [tuple(a.split("=", 1)) for a in sys.argv[2:]]
    prev = snapshot(suffixes)
    total = {}
    start = time.time()
    while time.time() - start < seconds:
        time.sleep(1)
        cur = snapshot(suffixes)
        rows = []
        for k, (run, wait) in cur.items():
            p_run, p_wait = prev.get(k, (run, wait))
            d_run, d_wait = (run - p_run) / 1e6, (wait - p_wait) / 1e6
            if d_run >= 5 or d_wait >= 1:
                rows.append(f"{k[0]}:{k[3]}:{k[2]} cpu {d_run:.0f} ms wait {d_wait:.1f} ms")
            if k[3] == "main" and d_run > BUSY_MS:
                t = total.setdefault(k[0], [0, 0.0, 0.0])
                t[0] += 1
                t[1] += d_run
                t[2] += d_wait
        if rows:
            print(f"{time.time() - start:5.0f} s  " + " | ".join(sorted(rows)), flush=True)
        prev = cur
    print()
    for tag, (n, run, wait) in sorted(total.items()):
        print(
            f"{tag}: {n} busy seconds, main thread on the CPU {run:.0f} ms, waiting for it "
            f"{wait:.0f} ms: {wait / run * 1000:.1f} ms per second of CPU"
        )


if __name__ == "__main__":
    main()
