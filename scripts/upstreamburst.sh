#!/usr/bin/env bash
# How keygate meets a burst of requests beyond its idle upstream connections: two keygate
# binaries, A and B, alternated round by round (A first in odd rounds, B first in even ones),
# each round on a freshly started process that holds no upstream connection yet, h2load
# opening $CONNS connections × $STREAMS streams at once for $SECS s ($WARM s of the same load
# first, unmeasured; none by default). The upstream is a copy of the kept directory's nginx
# with an accept backlog of $BACKLOG (64 by default, nginx's own is 511): the burst of connects
# a cold gateway opens overflows its accept queue as it would a busy upstream's, and the kernel
# drops SYNs (sent again a second later). Runs on a directory kept by scripts/loadtest.sh
# (KEEP_WORK=1): keygate's configuration, keys and SQLite file, the upstream's configuration;
# keygate and the upstream are copies with ports of their own, so the kept directory's own
# instances may be running.
#
#   WORK=/dev/shm/keygate-loadtest.XXXXXX scripts/upstreamburst.sh BIN_A BIN_B
#   WORK=… ROUNDS=8 SECS=5 CONNS=256 STREAMS=10 BACKLOG=64 WARM=0 scripts/upstreamburst.sh A B
#
# Layout as in loadtest.sh: keygate on CPU $PROXY_CPU (0), h2load and the upstream on CPU
# $LOAD_CPU (1). Per round and binary: req/s; keygate's CPU µs per request; the TCP connects
# opened on the machine during the measured run less h2load's own ($CONNS), i.e. keygate's to
# the upstream when nothing else runs; answers other than 2xx and requests that got none;
# p50/p99/p99.9/max from h2load's request log, and the requests slower than 900 ms. Then the
# medians per binary. The copies' files go to $WORK/upstreamburst. Not part of the test suite.
set -euo pipefail

cd "$(dirname "$0")/.."
# wait_port, tree_ticks, nginx_port, keygate_port, positive_ints
. scripts/lib/bench.sh
WORK=${WORK:?"WORK=<a directory kept by KEEP_WORK=1 scripts/loadtest.sh>"}
ROUNDS=${ROUNDS:-6}
SECS=${SECS:-5}
CONNS=${CONNS:-256}
STREAMS=${STREAMS:-10}
BACKLOG=${BACKLOG:-64}
WARM=${WARM:-0}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

[ $# = 2 ] || { echo "usage: WORK=<kept directory> $0 KEYGATE_BIN_A KEYGATE_BIN_B" >&2; exit 2; }
for b in "$@"; do
  [ -f "$b" ] && [ -x "$b" ] || { echo "upstreamburst: $b is not an executable file" >&2; exit 2; }
done
for f in keygate.toml keygate.db key1.txt upstream/nginx.conf; do
  [ -f "$WORK/$f" ] || { echo "upstreamburst: $WORK/$f is missing: WORK must be a directory kept by KEEP_WORK=1 scripts/loadtest.sh" >&2; exit 2; }
done
positive_ints upstreamburst "ROUNDS=$ROUNDS" "SECS=$SECS" "CONNS=$CONNS" "STREAMS=$STREAMS" "BACKLOG=$BACKLOG"
case $WARM in '' | *[!0-9]*) echo "upstreamburst: WARM=$WARM: a whole number of seconds (0: none)" >&2; exit 2 ;; esac
command -v h2load >/dev/null || { echo "upstreamburst: h2load is missing (nghttp2-client; scripts/loadtest.sh installs it)" >&2; exit 2; }
command -v nstat >/dev/null || { echo "upstreamburst: nstat is missing (iproute2)" >&2; exit 2; }
ulimit -n 65536 2>/dev/null || true

D=$WORK/upstreamburst
KEY=$(head -n1 "$WORK/key1.txt")
# The copies: keygate's configuration with ports of its own and a copy of the store (SQLite's
# backup: consistent even while the kept directory's keygate writes to it), the upstream with
# its own port, backlog, pid file and temporary directories.
python3 - "$WORK" "$D" "$BACKLOG" <<'PY'
import re, sys
sys.path.insert(0, "scripts/lib")
import kept_copy
work, d, backlog = sys.argv[1:4]
port = kept_copy.free_port()
up = open(f"{work}/upstream/nginx.conf").read()
if not re.search(r"listen 127\.0\.0\.1:\d+;", up):
    sys.exit(f"upstreamburst: no `listen 127.0.0.1:PORT;` in {work}/upstream/nginx.conf")
kept_copy.nginx(up, f"{work}/upstream/", f"{d}/upstream", lambda m: f"listen 127.0.0.1:{port} backlog={backlog}")
kept_copy.keygate("upstreamburst", work, d, upstream_port=port)
PY
UP_PORT=$(nginx_port "$D/upstream/nginx.conf")
KG_PORT=$(keygate_port "$D/keygate.toml")

PIDS=()
LINES=$(mktemp)
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$LINES"
}
trap cleanup EXIT

taskset -c "$LOAD_CPU" nginx -p "$D/upstream" -c "$D/upstream/nginx.conf" -e "$D/upstream/error.log" &
PIDS+=($!)
wait_port "$UP_PORT" upstream

opens() { nstat -az TcpActiveOpens | awk '$1 == "TcpActiveOpens" {print $2}'; }

measure() { # label, binary, round
  local kg t0 t1 o0 o1 out
  KEYGATE_ADMIN_KEY=${KEYGATE_ADMIN_KEY:-upstreamburst-admin-key-000} taskset -c "$PROXY_CPU" "$2" serve \
    --config "$D/keygate.toml" >>"$D/keygate-$1.log" 2>&1 &
  kg=$!
  PIDS+=("$kg")
  wait_port "$KG_PORT" "keygate $1"
  if [ "$WARM" -gt 0 ]; then
    taskset -c "$LOAD_CPU" h2load -t1 -c"$CONNS" -m"$STREAMS" -D"$WARM" -H "x-api-key: $KEY" \
      "http://127.0.0.1:$KG_PORT/" >/dev/null 2>&1 || true
  fi
  rm -f "$D/requests.log"
  o0=$(opens)
  t0=$(tree_ticks "$kg")
  out=$(taskset -c "$LOAD_CPU" h2load -t1 -c"$CONNS" -m"$STREAMS" -D"$SECS" --log-file="$D/requests.log" \
    -H "x-api-key: $KEY" "http://127.0.0.1:$KG_PORT/" 2>&1 || true)
  t1=$(tree_ticks "$kg")
  o1=$(opens)
  kill "$kg"
  wait "$kg" 2>/dev/null || true
  python3 - "$1" "$3" "$((t1 - t0))" "$(getconf CLK_TCK)" "$SECS" "$((o1 - o0 - CONNS))" "$D/requests.log" "$out" <<'PY' | tee -a "$LINES"
import re, sys
label, r, ticks, hz, secs, opened, log, out = sys.argv[1:9]
rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
reqs = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
lat = []
try:
    for line in open(log):
        f = line.split()
        if len(f) >= 3:
            lat.append(int(f[2]))
except OSError:
    pass
if not rate or not codes or not reqs or not lat:
    print(f"{label} round {r}: FAILED: {' '.join(out.split())}")
    sys.exit()
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000
n = float(rate[1])
cpu = int(ticks) / int(hz) * 1e6 / max(n * float(secs), 1)
other = sum(int(x) for x in codes.groups()[1:])
lost = int(reqs[5]) + int(reqs[6]) + int(reqs[7])
slow = sum(1 for x in lat if x > 900_000)
print(f"{label} round {r}: {n:.0f} req/s, CPU {cpu:.2f} µs/req, {opened} connects, {other} non-2xx, {lost} unanswered, "
      f"p50 {q(.5):.1f} p99 {q(.99):.1f} p99.9 {q(.999):.1f} max {lat[-1] / 1000:.1f} ms, {slow} over 900 ms")
PY
}

A=$1 B=$2
echo "A: $A"
echo "B: $B"
echo "h2load $CONNS connections × $STREAMS streams, $SECS s per run (after $WARM s unmeasured), upstream backlog $BACKLOG, $ROUNDS rounds"
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then
    measure A "$A" "$r"
    measure B "$B" "$r"
  else
    measure B "$B" "$r"
    measure A "$A" "$r"
  fi
done

echo
python3 - "$LINES" <<'PY'
import re, statistics, sys
runs = {}
pat = re.compile(r"(A|B) round (\d+): (\d+) req/s, CPU ([\d.]+) µs/req, (-?\d+) connects, (\d+) non-2xx, (\d+) unanswered, "
                 r"p50 ([\d.]+) p99 ([\d.]+) p99.9 ([\d.]+) max ([\d.]+) ms, (\d+) over 900 ms")
for line in open(sys.argv[1]):
    m = pat.match(line)
    if m:
        runs.setdefault(m[1], []).append([float(x) for x in m.groups()[2:]])
print("| binary | rounds | req/s | CPU µs/req | connects | non-2xx (all rounds) | unanswered (all rounds) | p50 ms | p99 ms | p99.9 ms | max ms | over 900 ms (all rounds) | rounds with any over 900 ms |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for label in ("A", "B"):
    v = runs.get(label, [])
    if not v:
        continue
    med = lambda i, f="{:,.0f}": f.format(statistics.median(x[i] for x in v))
    tot = lambda i: f"{sum(int(x[i]) for x in v):,}"
    print(f"| {label} | {len(v)} | {med(0)} | {med(1, '{:.2f}')} | {med(2)} | {tot(3)} | {tot(4)} | {med(5, '{:,.1f}')} | "
          f"{med(6, '{:,.1f}')} | {med(7, '{:,.1f}')} | {med(8, '{:,.1f}')} | {tot(9)} | {sum(1 for x in v if x[9] > 0)} of {len(v)} |")
PY
