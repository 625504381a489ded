#!/usr/bin/env python3
"""Cross-core wakeups and context switches during each wrk run of a load test.

Run beside `scripts/loadtest.sh` (on the load core, e.g. `taskset -c 1`). Each time a `wrk`
process runs, records for its lifetime, per CPU: function-call and rescheduling
inter-processor interrupts (`CAL`, `RES` in /proc/interrupts: a task woken on another core,
e.g. the upstream or wrk woken by a packet the contender sent), local timer interrupts, how
busy the CPU was, and the machine's context switches. A core that never sleeps needs no
wakeup; one that goes idle between packets is woken by an interrupt every time, which costs
both sides (on a VM an exit to the hypervisor).

    taskset -c 1 scripts/wakeups.py SECONDS > wakeups.txt &
    SHIELD=1 CONTENDERS=… scripts/loadtest.sh

One line per wrk run, in the order of the load test's runs (the warm-ups are the short ones):
duration, target URL, CPU busy % [cpu0, cpu1], and each count as [cpu0, cpu1] per second;
`ctxt` is the machine's context switches per second. Divide by the run's req/s (the load
test's log, same order) for the count per request. The load test's report prints the
per-request counts of the load core's interrupts and the context switches itself; this adds
the per-CPU breakdown (each kind of interrupt, both CPUs, timer ticks, busy shares).
"""

import os
import subprocess
import sys
import time


def snapshot():
    r = {}
    with open("/proc/interrupts") as f:
        for line in f:
            w = line.split()
            if w and w[0] in ("RES:", "CAL:", "LOC:"):
                r[w[0][:-1]] = [int(w[1]), int(w[2])]
    with open("/proc/stat") as f:
        for line in f:
            w = line.split()
            if w[0] in ("cpu0", "cpu1"):
                i = int(w[0][3])
                v = [int(x) for x in w[1:]]
                r.setdefault("busy", [0, 0])[i] = sum(v) - v[3] - v[4]
                r.setdefault("all", [0, 0])[i] = sum(v)
            elif w[0] == "ctxt":
                r["ctxt"] = [int(w[1]), 0]
    return r


def running_wrk():
    out = subprocess.run(["pgrep", "-x", "wrk"], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out.split() else None


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    end = time.time() + float(sys.argv[1])
    while time.time() < end:
        pid = running_wrk()
        if pid is None:
            time.sleep(0.05)
            continue
        before, start = snapshot(), time.time()
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                url = [a for a in f.read().split("\0") if a.startswith("http")]
        except OSError:
            url = ["?"]
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        after, took = snapshot(), time.time() - start
        d = {k: [after[k][i] - before[k][i] for i in (0, 1)] for k in before}
        busy = [round(100 * d["busy"][i] / max(d["all"][i], 1)) for i in (0, 1)]
        rate = {k: [round(v / took) for v in d[k]] for k in ("CAL", "RES", "LOC")}
        print(
            f"{took:5.1f}s {url[0] if url else '?'} busy={busy} "
            + " ".join(f"{k}/s={v}" for k, v in rate.items())
            + f" ctxt/s={round(d['ctxt'][0] / took)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
