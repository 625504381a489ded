#!/usr/bin/env python3
"""How long, each time, keygate's request thread was kept off its core while it was ready.

Records the scheduler's context switches on one CPU with perf for SECONDS, then, for the main
thread of the process whose executable path ends with SUFFIX (the current-thread runtime that
serves every request), takes every switch away from it while it was still runnable (preempted)
and measures how long until it ran again, and who ran first in that gap. A preemption of 2 ms
holds up every request in flight on that thread by 2 ms: the length of these gaps, not only
their sum, is what reaches the latency tail.

    scripts/preemptions.py SECONDS SUFFIX [CPU]      (CPU defaults to 0; needs root and perf)

Prints the number of gaps, their sum, and their length at the 50th, 90th, 99th percentiles and
the longest; then the same per thread name that took the core first; then the longest gaps
(1 ms or more) with every thread that ran in them.
"""

import os
import re
import subprocess
import sys
import tempfile

# Preemptions at least this long are listed with every thread that ran in them.
LONG_US = 1000

SWITCH = re.compile(
    r"\s(\d+\.\d+):\s+sched:sched_switch:\s+prev_comm=(.*?) prev_pid=(\d+) prev_prio=\d+ "
    r"prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)"
)


def find_pid(suffix):
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            exe = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode()
        except OSError:
            continue
        if exe.endswith(suffix):
            return int(pid)
    sys.exit(f"no process whose executable ends with {suffix}")


def pct(v, p):
    return v[min(len(v) - 1, int(len(v) * p))]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    seconds, suffix = sys.argv[1], sys.argv[2]
    cpu = sys.argv[3] if len(sys.argv) > 3 else "0"
    main_pid = find_pid(suffix)
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "perf.data")
        subprocess.run(
            ["perf", "record", "-q", "-m", "4096", "-e", "sched:sched_switch", "-C", cpu, "-o", data,
             "--", "sleep", seconds],
            check=True, stderr=subprocess.DEVNULL,
        )
        out = subprocess.run(
            ["perf", "script", "-i", data], check=True, capture_output=True, text=True
        ).stdout
    gaps, by, long, dropped = [], {}, [], 0
    start, first, ran, since = None, None, {}, None
    for line in out.splitlines():
        m = SWITCH.search(line)
        if not m:
            continue
        t, prev_comm, prev_pid, state, next_comm, next_pid = m.groups()
        t = float(t)
        if start is not None and since is not None:
            # Who had the core in the gap, and for how long.
            ran[prev_comm] = ran.get(prev_comm, 0) + (t - since) * 1e6
        since = t
        if int(prev_pid) == main_pid:
            # A gap still open means its end went unrecorded (perf lost events): dropped.
            dropped += start is not None
            start, first, ran = (t, next_comm, {}) if state.startswith("R") else (None, None, {})
        elif int(next_pid) == main_pid and start is not None:
            gap = (t - start) * 1e6
            gaps.append(gap)
            by.setdefault(first, []).append(gap)
            if gap >= LONG_US:
                long.append((gap, ran))
            start = None
        elif int(next_pid) == main_pid:
            start = None
    if not gaps:
        sys.exit("the main thread was never preempted")

    def line(name, v):
        v = sorted(v)
        print(
            f"{name}: {len(v)} preemptions, {sum(v) / 1000:.1f} ms in all; µs p50 {pct(v, .5):.0f} "
            f"p90 {pct(v, .9):.0f} p99 {pct(v, .99):.0f} max {v[-1]:.0f}"
        )

    line("all", gaps)
    if dropped:
        print(f"  ({dropped} gaps dropped: their end was not recorded)")
    for name, v in sorted(by.items(), key=lambda kv: -sum(kv[1])):
        line(f"  first {name}", v)
    print(f"preemptions of {LONG_US} µs or more, and who ran in them (µs):")
    for gap, ran in sorted(long, key=lambda g: -g[0])[:20]:
        who = ", ".join(f"{c} {us:.0f}" for c, us in sorted(ran.items(), key=lambda kv: -kv[1]))
        print(f"  {gap:.0f}: {who}")


if __name__ == "__main__":
    main()
