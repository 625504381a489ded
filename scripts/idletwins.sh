#!/usr/bin/env bash
# Whether holding idle keep-alive connections slows a server's other connections, measured
# against a twin: two instances of the same contender (same binary, configuration and keys) on
# the contender's core, one holding $IDLE idle connections, the other none, and wrk alternating
# between them round by round. The idle sockets exist on the machine during both measurements,
# so what the machine does for them (BENCHMARKS "After run J (2)") and the host's drift fall on
# both; what is left is what the holder itself does for its connections. Runs on a directory kept
# by scripts/loadtest.sh (KEEP_WORK=1): its upstream, nginx-keyauth and keygate configurations,
# keys, SQLite file and wrk script; both instances are copies with ports of their own, so the
# kept directory's own instances may be running (scripts/loadtest.sh runs this one at its end
# with IDLE_TWINS=1).
#
#   WORK=/dev/shm/keygate-loadtest.XXXXXX scripts/idletwins.sh
#   WORK=… IDLE=10000 ROUNDS=10 SECS=6 CONTENDERS="keygate nginx-keyauth" scripts/idletwins.sh
#
# Layout as in loadtest.sh: both instances on CPU $PROXY_CPU (0); wrk ($CONNS connections, one
# key, $WORK/one.lua), the upstream and the Python client holding the idle connections on CPU
# $LOAD_CPU (1). Each measurement $SECS s after $WARM s of the same load; the holder first in odd
# rounds, the twin first in even ones. The idle connections each send one request, read its
# answer and stay silent. Output: every measurement's line, then per contender the medians of
# the rounds (p99 µs, req/s, CPU µs per request: the instance's processes' user + system time
# over the measured run), holder against twin, and in how many rounds the holder's p99 was at or
# below its twin's. The copies' files go to $WORK/idletwins-*. KEYGATE_BIN (default
# target/release/keygate) is built when missing. Not part of the test suite.
set -euo pipefail

cd "$(dirname "$0")/.."
# wait_port, port_open, tree_ticks, tree_rss_kb, kept_ports, nginx_port, keygate_port, positive_ints
. scripts/lib/bench.sh
WORK=${WORK:?"WORK=<a directory kept by KEEP_WORK=1 scripts/loadtest.sh>"}
IDLE=${IDLE:-10000}
ROUNDS=${ROUNDS:-8}
CONNS=${CONNS:-64}
SECS=${SECS:-6}
WARM=${WARM:-2}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
CONTENDERS=${CONTENDERS:-"keygate nginx-keyauth"}
KEYGATE_BIN=${KEYGATE_BIN:-target/release/keygate}

for f in keygate.toml keygate.db key1.txt one.lua nginx-keyauth/nginx.conf upstream/nginx.conf; do
  [ -f "$WORK/$f" ] || { echo "idletwins: $WORK/$f is missing: WORK must be a directory kept by KEEP_WORK=1 scripts/loadtest.sh" >&2; exit 2; }
done
for c in $CONTENDERS; do
  case $c in keygate | nginx-keyauth) ;; *) echo "idletwins: unknown contender '$c' (keygate, nginx-keyauth)" >&2; exit 2 ;; esac
done
positive_ints idletwins "IDLE=$IDLE" "ROUNDS=$ROUNDS" "CONNS=$CONNS" "SECS=$SECS" "WARM=$WARM"
[ -n "${CONTENDERS// /}" ] || { echo "idletwins: CONTENDERS must name at least one" >&2; exit 2; }
command -v wrk >/dev/null || { echo "idletwins: wrk is missing (scripts/loadtest.sh installs it)" >&2; exit 2; }
[ -x "$KEYGATE_BIN" ] || cargo build --release --bin keygate

# Both ends of every idle connection are on this machine, and the holder keeps its own.
want=$((IDLE + 1024))
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge "$want" ] || { echo "idletwins: IDLE=$IDLE needs $want open files, the limit is $(ulimit -n)" >&2; exit 2; }

kept_ports idletwins
KEY=$(head -n1 "$WORK/key1.txt")

# Both instances are copies, each with its own ports (every `listen` moved to a free one):
# keygate with a copy of the store (SQLite's backup), nginx-keyauth with its own pid file and temporary
# directories; the originals may still be running (a loadtest.sh run calling this one).
python3 - "$WORK" <<'PY'
import sys
sys.path.insert(0, "scripts/lib")
import kept_copy
work = sys.argv[1]
ng = open(f"{work}/nginx-keyauth/nginx.conf").read()
for role in ("holder", "twin"):
    kept_copy.keygate("idletwins", work, f"{work}/idletwins-keygate-{role}")
    kept_copy.nginx(ng, f"{work}/nginx-keyauth/", f"{work}/idletwins-nginx-keyauth-{role}")
PY

PIDS=()
LINES=$(mktemp)
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$LINES"
}
trap cleanup EXIT

# The upstream of the kept directory, unless it is running already (a loadtest.sh run).
if ! port_open "$UP_PORT"; then
  taskset -c "$LOAD_CPU" nginx -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf" -e "$WORK/upstream/error.log" &
  PIDS+=($!)
  wait_port "$UP_PORT" upstream
fi

# Starts an instance: contender, role (holder or twin). Sets STARTED and STARTED_PORT.
start() {
  local dir=$WORK/idletwins-$1-$2
  if [ "$1" = keygate ]; then
    STARTED_PORT=$(keygate_port "$dir/keygate.toml")
    KEYGATE_ADMIN_KEY=${KEYGATE_ADMIN_KEY:-idletwins-admin-key-0000} taskset -c "$PROXY_CPU" "$KEYGATE_BIN" serve \
      --config "$dir/keygate.toml" >>"$dir/keygate.log" 2>&1 &
  else
    STARTED_PORT=$(nginx_port "$dir/nginx.conf")
    taskset -c "$PROXY_CPU" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" &
  fi
  STARTED=$!
  PIDS+=("$STARTED")
  wait_port "$STARTED_PORT" "$1 ($2)"
}
measure() { # contender, role, pid, port, round
  local t0 t1 out
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${WARM}s" -s "$WORK/one.lua" "http://127.0.0.1:$4/" >/dev/null
  t0=$(tree_ticks "$3")
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -s "$WORK/one.lua" "http://127.0.0.1:$4/")
  t1=$(tree_ticks "$3")
  python3 - "$1" "$2" "$5" "$((t1 - t0))" "$(getconf CLK_TCK)" "$SECS" "$out" <<'PY' | tee -a "$LINES"
import re, sys
c, role, r, ticks, hz, secs, out = sys.argv[1:8]
unit = {"us": 1, "ms": 1e3, "s": 1e6}
p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
bad = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
if not p99 or not rps:
    print(f"{c} {role} round {r}: FAILED: {' '.join(out.split())}")
else:
    us, n = float(p99[1]) * unit[p99[2]], float(rps[1])
    cpu = int(ticks) / int(hz) * 1e6 / (n * int(secs))
    print(f"{c} {role} round {r}: p99 {us:.0f} µs, {n:.0f} req/s, CPU {cpu:.2f} µs/req" + (f" ({bad[0]})" if bad else ""))
PY
}

for c in $CONTENDERS; do
  start "$c" holder
  holder=$STARTED holder_port=$STARTED_PORT
  start "$c" twin
  twin=$STARTED twin_port=$STARTED_PORT
  rm -f "$WORK/idletwins-ready" "$WORK/idletwins-hold"
  mkfifo "$WORK/idletwins-hold"
  taskset -c "$LOAD_CPU" python3 scripts/idle_hold.py "$holder_port" "$IDLE" "$KEY" "$WORK/idletwins-ready" \
    <"$WORK/idletwins-hold" >"$WORK/idletwins-$c-client.txt" 2>&1 &
  hold_pid=$!
  PIDS+=("$hold_pid")
  exec {hold}>"$WORK/idletwins-hold"
  for _ in $(seq 1200); do [ -s "$WORK/idletwins-ready" ] && break; sleep 0.1; done
  [ -s "$WORK/idletwins-ready" ] || { echo "idletwins: the $IDLE idle connections to $c were not all open after 120 s" >&2; exit 1; }
  echo "$c: $(cut -d' ' -f1 "$WORK/idletwins-ready") idle connections held by the holder, RSS holder $(tree_rss_kb "$holder") kB, twin $(tree_rss_kb "$twin") kB"
  for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
      measure "$c" holder "$holder" "$holder_port" "$r"
      measure "$c" twin "$twin" "$twin_port" "$r"
    else
      measure "$c" twin "$twin" "$twin_port" "$r"
      measure "$c" holder "$holder" "$holder_port" "$r"
    fi
  done
  exec {hold}>&-
  wait "$hold_pid" || true
  echo "$c: $(cat "$WORK/idletwins-$c-client.txt")"
  kill "$holder" "$twin"
  wait "$holder" "$twin" 2>/dev/null || true
  rm -f "$WORK/idletwins-hold"
done

echo
python3 - "$LINES" "$IDLE" <<'PY'
import re, statistics, sys
runs, errors = {}, {}
for line in open(sys.argv[1]):
    m = re.match(r"(\S+) (holder|twin) round (\d+): p99 (\d+) µs, (\d+) req/s, CPU ([\d.]+)", line)
    if m:
        runs.setdefault(m[1], {}).setdefault(m[2], {})[int(m[3])] = [float(x) for x in m.groups()[3:]]
        if line.rstrip().endswith(")"):  # wrk counted socket errors or non-2xx answers
            errors.setdefault(m[1], []).append(f"{m[2]} round {m[3]}")
print(f"| contender | rounds | p99 µs, holder of {int(sys.argv[2]):,} idle → twin | req/s | CPU µs/req | holder's p99 ≤ twin's | rounds with errors (in the medians) |")
print("|---|---|---|---|---|---|---|")
for c, v in runs.items():
    h, t = v.get("holder", {}), v.get("twin", {})
    both = sorted(set(h) & set(t))
    if not both:
        continue
    med = lambda d, i: statistics.median(d[r][i] for r in both)
    cells = [f"{med(h, i):,.{2 if i == 2 else 0}f} → {med(t, i):,.{2 if i == 2 else 0}f} ({med(h, i) / med(t, i):.2f}×)" for i in range(3)]
    at_or_below = sum(h[r][0] <= t[r][0] for r in both)
    print(f"| {c} | {len(both)} | " + " | ".join(cells) + f" | {at_or_below} of {len(both)} | {', '.join(errors.get(c, [])) or 'none'} |")
PY
