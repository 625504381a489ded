#!/usr/bin/env bash
# What the load generator's core pays per new TLS connection against keygate and against
# nginx-keyauth: wrk's own CPU time per connection and its CPU profile, with a new connection
# per request (the *-tls-new variants of scripts/loadtest.sh, where wrk's core is the bound, so
# what a server costs the client decides the rate). Runs on a directory kept by
# scripts/loadtest.sh (KEEP_WORK=1) whose run had the TLS variants: its upstream, its TLS
# keygate (`tls/`), nginx-keyauth's TLS listener, the certificate and wrk's
# `tls-one-close.lua` (nginx-keyauth's: `one-close.lua`). They are started here on the ports
# the kept configurations name, so none of them may be running.
#
#   WORK=/dev/shm/keygate-loadtest.XXXXXX scripts/clientprofile.sh
#   WORK=… ROUNDS=3 CONNS=256 BUSY=1 COALESCE_US=50 scripts/clientprofile.sh
#
# Layout as in loadtest.sh: the server on CPU $PROXY_CPU (0), wrk (one thread, $CONNS
# connections) and the upstream on CPU $LOAD_CPU (1). Per round, keygate then nginx-keyauth (the
# order turned in even rounds), with COALESCE_US=N then keygate with `[server]
# event_coalesce_us = N`, with BUSY=1 then keygate with `[server] busy_polling = true` (stopped
# except while measured), both copies with ports and a store of their own: $WARM s of load,
# then $DURATION s measured, `perf record -g` on wrk from half a second in, for $DURATION − 2 s.
# Output ($OUTDIR, default target/clientprofile/): per
# measurement wrk's req/s, its user + system CPU µs per connection, the interrupts its core
# received per connection (by kind), the machine's context switches and wrk's `read`, `write`
# and `epoll_wait` calls per connection (`perf stat` on their tracepoints); per contender, from the
# profile of its last round, wrk's samples by object and the kernel entries by self time, and
# the shares that are wakeups: wrk's sends that wake the server's thread or listener (the
# callers of `_raw_spin_unlock_irqrestore`, by system call) and the interrupts and task switches
# wrk is charged for (`irqentry_exit_to_user_mode`, `finish_task_switch`). KEYGATE_BIN (default
# target/release/keygate) is built when missing. Not part of the test suite.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
# free_port, wait_port, port_open, nginx_port, keygate_port, positive_ints
. scripts/lib/bench.sh
WORK=${WORK:?"WORK=<a directory kept by KEEP_WORK=1 scripts/loadtest.sh with the TLS variants>"}
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-64}
DURATION=${DURATION:-10}
WARM=${WARM:-3}
BUSY=${BUSY:-0}
COALESCE_US=${COALESCE_US:-}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
KEYGATE_BIN=${KEYGATE_BIN:-target/release/keygate}
OUTDIR=${OUTDIR:-$ROOT/target/clientprofile}

for f in tls/keygate.toml tls.crt tls.key tls-one-close.lua one-close.lua nginx-keyauth/nginx.conf upstream/nginx.conf; do
  [ -f "$WORK/$f" ] || { echo "clientprofile: $WORK/$f is missing: WORK must be a directory kept by KEEP_WORK=1 scripts/loadtest.sh with the TLS variants" >&2; exit 2; }
done
positive_ints clientprofile "ROUNDS=$ROUNDS" "CONNS=$CONNS" "DURATION=$DURATION" "WARM=$WARM"
[ "$DURATION" -ge 3 ] || { echo "clientprofile: DURATION=$DURATION: at least 3" >&2; exit 2; }
case $BUSY in 0 | 1) ;; *) echo "clientprofile: BUSY=$BUSY: 0 or 1" >&2; exit 2 ;; esac
[ -z "$COALESCE_US" ] || positive_ints clientprofile "COALESCE_US=$COALESCE_US"
for t in wrk perf; do command -v "$t" >/dev/null || { echo "clientprofile: $t is missing (scripts/loadtest.sh and scripts/profile.sh install wrk and linux-perf)" >&2; exit 2; }; done
[ -x "$KEYGATE_BIN" ] || cargo build --release --bin keygate

UP_PORT=$(nginx_port "$WORK/upstream/nginx.conf")
KG_PORT=$(keygate_port "$WORK/tls/keygate.toml")
NG_PORT=$(grep -m1 -oE 'listen 127\.0\.0\.1:[0-9]+ ssl' "$WORK/nginx-keyauth/nginx.conf" | grep -oE ':[0-9]+' | tr -d ':')
[ -n "$UP_PORT" ] && [ -n "$KG_PORT" ] && [ -n "$NG_PORT" ] || { echo "clientprofile: cannot find the ports in $WORK's configurations" >&2; exit 2; }
for p in "$UP_PORT" "$KG_PORT" "$NG_PORT"; do
  if port_open "$p"; then echo "clientprofile: port $p is in use: stop the kept directory's instances first" >&2; exit 2; fi
done

mkdir -p "$OUTDIR"
PIDS=()
BUSY_PID=
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # A stopped process handles its SIGTERM once it runs again.
  [ -z "$BUSY_PID" ] || kill -CONT "$BUSY_PID" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

taskset -c "$LOAD_CPU" nginx -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf" -e "$WORK/upstream/error.log" &
PIDS+=($!)
wait_port "$UP_PORT" upstream
start_keygate() { # config
  KEYGATE_ADMIN_KEY=clientprofile-admin-key-0000 KEYGATE_TLS_CERT=$WORK/tls.crt KEYGATE_TLS_KEY=$WORK/tls.key \
    taskset -c "$PROXY_CPU" "$KEYGATE_BIN" serve --config "$1" >>"$OUTDIR/keygate.log" 2>&1 &
  PIDS+=($!)
}
start_keygate "$WORK/tls/keygate.toml"
wait_port "$KG_PORT" keygate
taskset -c "$PROXY_CPU" nginx -p "$WORK/nginx-keyauth" -c "$WORK/nginx-keyauth/nginx.conf" -e "$WORK/nginx-keyauth/error.log" &
PIDS+=($!)
wait_port "$NG_PORT" nginx-keyauth
TARGETS="keygate:$KG_PORT nginx-keyauth:$NG_PORT"
# A copy of the TLS keygate (its configuration on free ports, its store copied) in
# $OUTDIR/keygate-$1, with sed program $2 applied to the configuration.
variant() { # name, sed program
  python3 - "$WORK" "$OUTDIR/keygate-$1" <<'PY'
import sys
sys.path.insert(0, "scripts/lib")
import kept_copy
kept_copy.keygate("clientprofile", sys.argv[1], sys.argv[2], instance="tls")
PY
  sed -i -e "$2" "$OUTDIR/keygate-$1/keygate.toml"
}
if [ -n "$COALESCE_US" ]; then
  # The same instance pausing before it waits for events (it sleeps while idle, so it can run
  # beside the others).
  variant coalesce "/^event_coalesce_us *=/d; /^\[server\]/a event_coalesce_us = $COALESCE_US"
  COALESCE_PORT=$(keygate_port "$OUTDIR/keygate-coalesce/keygate.toml")
  start_keygate "$OUTDIR/keygate-coalesce/keygate.toml"
  wait_port "$COALESCE_PORT" keygate-coalesce
  TARGETS="$TARGETS keygate-coalesce:$COALESCE_PORT"
fi
if [ "$BUSY" = 1 ]; then
  # The same instance with its event loop never sleeping, on a port of its own, stopped except
  # while it is measured (it would take the core from the others).
  variant busy 's/^busy_polling = .*/busy_polling = true/; /^event_coalesce_us *=/d'
  grep -q '^busy_polling = true' "$OUTDIR/keygate-busy/keygate.toml" || { echo "clientprofile: $WORK/tls/keygate.toml has no busy_polling line to turn on" >&2; exit 2; }
  BUSY_PORT=$(keygate_port "$OUTDIR/keygate-busy/keygate.toml")
  start_keygate "$OUTDIR/keygate-busy/keygate.toml"
  BUSY_PID=${PIDS[-1]}
  wait_port "$BUSY_PORT" keygate-busy
  kill -STOP "$BUSY_PID"
  TARGETS="$TARGETS keygate-busy:$BUSY_PORT"
fi

: >"$OUTDIR/lines.txt"
# The load core's rescheduling, function-call, TLB-shootdown and timer interrupts, then the
# machine's context switches, comma-separated.
irqs() {
  local col=$((LOAD_CPU + 2))
  echo "$(awk -v c=$col '$1 == "RES:" {r = $c} $1 == "CAL:" {f = $c} $1 == "TLB:" {t = $c} $1 == "LOC:" {l = $c} END {print r "," f "," t "," l}' /proc/interrupts),$(awk '$1 == "ctxt" {print $2}' /proc/stat)"
}
measure() { # contender, port, round
  local wpid wjob spid t0 t1 i0 i1 w0 w1 hz lua=$WORK/tls-one-close.lua
  # nginx-keyauth knows the keys of the kept directory's main instance, keygate's TLS instance
  # its own (as in loadtest.sh).
  [ "$1" != nginx-keyauth ] || lua=$WORK/one-close.lua
  [ "$1" != keygate-busy ] || kill -CONT "$BUSY_PID"
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${WARM}s" -s "$lua" "https://127.0.0.1:$2/" >/dev/null
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$lua" "https://127.0.0.1:$2/" \
    >"$OUTDIR/wrk-$1-$3.txt" 2>&1 &
  wjob=$!
  sleep 0.5
  wpid=$(pgrep -n -x wrk)
  t0=$(awk '{print $14 + $15}' "/proc/$wpid/stat")
  i0=$(irqs)
  w0=$(date +%s%N)
  # wrk's system calls over the same window: what the server makes it read, write and wait for.
  perf stat -x, -e syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_epoll_wait \
    -p "$wpid" -o "$OUTDIR/calls-$1-$3.txt" -- sleep "$((DURATION - 2))" 2>/dev/null &
  spid=$!
  perf record -F 2999 -g -p "$wpid" -o "$OUTDIR/perf-$1.data" -- sleep "$((DURATION - 2))" 2>/dev/null
  wait "$spid" || true
  t1=$(awk '{print $14 + $15}' "/proc/$wpid/stat")
  i1=$(irqs)
  w1=$(date +%s%N)
  wait "$wjob"
  [ "$1" != keygate-busy ] || kill -STOP "$BUSY_PID"
  hz=$(getconf CLK_TCK)
  python3 - "$1" "$3" "$((t1 - t0))" "$hz" "$((w1 - w0))" "$OUTDIR/wrk-$1-$3.txt" "$i0" "$i1" "$OUTDIR/calls-$1-$3.txt" <<'PY' | tee -a "$OUTDIR/lines.txt"
import re, sys
c, r, ticks, hz, ns, path, i0, i1, calls_path = sys.argv[1:10]
out = open(path).read()
rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
bad = re.search(r"Non-2xx or 3xx responses: \d+|Socket errors: .*", out)
if not rps or bad:
    print(f"{c} round {r}: FAILED: {' '.join(out.split())}")
else:
    n = float(rps[1]) * int(ns) / 1e9  # connections while measured (wrk's rate over the window)
    counts = " ".join(f"{k} {(int(b) - int(a)) / n:.3f}" for k, a, b in
                      zip(("RES", "CAL", "TLB", "LOC", "ctxt"), i0.split(","), i1.split(",")))
    calls = {}
    for line in open(calls_path):
        f = line.strip().split(",")
        if len(f) > 2 and f[0].isdigit() and f[2].startswith("syscalls:sys_enter_"):
            calls[f[2].removeprefix("syscalls:sys_enter_")] = int(f[0]) / n
    wrk_calls = ", ".join(f"{k} {v:.2f}" for k, v in calls.items()) or "not counted"
    print(f"{c} round {r}: {float(rps[1]):,.0f} connections/s, wrk {int(ticks) / int(hz) * 1e6 / n:.1f} µs CPU per connection; "
          f"per connection, received by the load core: {counts} (ctxt: the machine's context switches); "
          f"wrk's system calls per connection: {wrk_calls}")
PY
}

for r in $(seq "$ROUNDS"); do
  order=$TARGETS
  [ $((r % 2)) = 1 ] || order=$(echo "$TARGETS" | tr ' ' '\n' | tac | tr '\n' ' ')
  for t in $order; do measure "${t%%:*}" "${t##*:}" "$r"; done
done

{
  echo
  echo "wrk's profile per contender (its last round; $CONNS connections, a new TLS connection per request):"
  for t in $TARGETS; do
    c=${t%%:*}
    echo
    echo "## $c"
    perf report -i "$OUTDIR/perf-$c.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep '%' | head -6
    perf report -i "$OUTDIR/perf-$c.data" --no-children --sort sym --stdio -g none 2>/dev/null | grep '%' >"$OUTDIR/self-$c.txt" || true
    perf report -i "$OUTDIR/perf-$c.data" --no-children --stdio -S _raw_spin_unlock_irqrestore -G \
      2>/dev/null >"$OUTDIR/wakes-$c.txt" || true
    python3 - "$OUTDIR/self-$c.txt" "$OUTDIR/wakes-$c.txt" <<'PY'
import re, sys
self = {}
for line in open(sys.argv[1]):
    m = re.match(r"\s*([\d.]+)%\s+\[(.)\]\s+(\S+)", line)
    if m:
        self[m[3]] = self.get(m[3], 0) + float(m[1])
kernel = sorted(((v, k) for k, v in self.items() if not k.startswith("0x")), reverse=True)
share = lambda prefix: sum(v for k, v in self.items() if k.startswith(prefix))
print(f"wakeups and interrupts: _raw_spin_unlock_irqrestore {share('_raw_spin_unlock_irqrestore'):.2f} %, "
      f"irqentry_exit_to_user_mode {share('irqentry_exit_to_user_mode'):.2f} %, finish_task_switch {share('finish_task_switch'):.2f} %")
# Which system call the wakeups came from: the first libc frame under each branch.
calls = {}
text = open(sys.argv[2]).read()
for m in re.finditer(r"--([\d.]+)%--(__GI___libc_\w+|__libc_\w+|__GI_\w+)", text):
    name = m[2].replace("__GI___libc_", "").replace("__libc_", "").replace("__GI_", "")
    calls[name] = calls.get(name, 0) + float(m[1])
if calls:
    print("  of which from: " + ", ".join(f"{k} {v:.2f} %" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])))
print("top entries by self time: " + ", ".join(f"{k} {v:.2f} %" for v, k in sorted(((v, k) for k, v in self.items()), reverse=True)[:12]))
PY
  done
} | tee "$OUTDIR/summary.md"
