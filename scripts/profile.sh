#!/usr/bin/env bash
# Where keygate's CPU time per request goes, under the load of scripts/loadtest.sh.
#
#   scripts/profile.sh                 # one key, 64 connections, 10 s per measurement
#   MODE=rot scripts/profile.sh        # wrk rotating over $KEYS keys
#   MODE=jwt scripts/profile.sh        # Authorization: Bearer <token>
#   MODE=h2c scripts/profile.sh        # h2load, 64 connections x 10 streams, HTTP/2 prior knowledge
#   TARGET=nginx-keyauth scripts/profile.sh   # the same measurements of nginx-keyauth
#   REPEAT=8 CONNS=256 scripts/profile.sh      # measurement 1 eight times back to back in one
#                                              # process: how far the host moves it
#
# Layout as in loadtest.sh: keygate alone on CPU $PROXY_CPU with one worker, wrk and the
# upstream (nginx `return 200`) on CPU $LOAD_CPU. Three measurements of $DURATION s each, every
# one after $WARM s of the same load:
#   1. user and system CPU µs per request (/proc/<pid>/stat), context switches per request,
#      TCP segments per request on the machine (`nstat`: sent, received, pure ACKs, delayed ACKs);
#   2. system calls per request (`strace -c -f`; strace slows keygate down, so only the counts
#      mean anything, not its timings); then the time in them per request by socket: sends and
#      reads on the client's side (the listener's port) against the upstream's (bpftrace on the
#      syscall and `sock` tracepoints; the probes add their own cost to every call, so the
#      shares mean more than the times);
#   3. a CPU profile (`perf record -g`, software clock: no hardware counters needed), its top
#      entries by self time and by caller, user space against kernel.
# Output: target/profile/<target>-<mode>/{summary.md,perf.data,perf-*.txt,strace.txt,nstat.txt}
# (nstat.txt: the counters of the last measurement 1). Not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# free_port, wait_port, nginx_conf, keyauth_maps, keyauth_location
. scripts/lib/bench.sh
MODE=${MODE:-one}
DURATION=${DURATION:-10}
WARM=${WARM:-2}
REPEAT=${REPEAT:-1}
CONNS=${CONNS:-64}
KEYS=${KEYS:-10000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
OUTDIR=${OUTDIR:-$ROOT/target/profile/${TARGET:-keygate}-$MODE}

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v perf >/dev/null 2>&1 || need+=(linux-perf)
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v bpftrace >/dev/null 2>&1 || need+=(bpftrace)
command -v nstat >/dev/null 2>&1 || need+=(iproute2)
[ "$MODE" != h2c ] || command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [ -n "${KEYGATE_BIN:-}" ]; then
  KEYGATE=$KEYGATE_BIN
else
  cargo build --release --quiet --bin keygate
  KEYGATE=$ROOT/target/release/keygate
fi

BASE=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && BASE=/dev/shm
WORK=$(mktemp -d "$BASE/keygate-profile.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
UP_PORT=$(free_port)
KG_PORT=$(free_port)
ADMIN_PORT=$(free_port)
ADMIN_KEY=profile-admin-$(python3 -c 'import secrets; print(secrets.token_hex(16))')

# An nginx configuration in $WORK/$1 with the http-block body $2 (one worker, no access log).
mkdir -p "$OUTDIR"
nginx_conf up "  server { listen 127.0.0.1:$UP_PORT; location / { return 200 \"ok\\n\"; } }"
taskset -c "$LOAD_CPU" "$NGINX" -p "$WORK/up" -c "$WORK/up/nginx.conf" -e "$WORK/up/error.log" &
PIDS+=($!)
wait_port "$UP_PORT"

cat >"$WORK/keygate.toml" <<EOF
[proxy]
listen = "127.0.0.1:$KG_PORT"
upstream = "http://127.0.0.1:$UP_PORT"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[keys]
max_per_client = 0
[store]
url = "sqlite://$WORK/keygate.db"
[rate_limit]
default = { per_second = 1000000000, burst = 1000000 }
[plans.bench]
rate_limit = { per_second = 1000000000, burst = 1000000 }
[server]
worker_threads = 1
[jwt]
secret = "$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
[log]
level = "warn"
access_log = false
EOF
KEYGATE_ADMIN_KEY=$ADMIN_KEY taskset -c "$PROXY_CPU" "$KEYGATE" serve --config "$WORK/keygate.toml" \
  >"$WORK/keygate.log" 2>&1 &
KG_PID=$!
PIDS+=($KG_PID)
wait_port "$KG_PORT"
echo "creating $KEYS keys…" >&2
python3 - "$ADMIN_PORT" "$ADMIN_KEY" "$KEYS" "$WORK" <<'EOF'
import http.client, json, sys
port, admin, n, work = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
c = http.client.HTTPConnection("127.0.0.1", port)
keys = []
for i in range(n):
    c.request("POST", "/v1/clients", json.dumps({"client_id": f"p-{i}", "license": "bench"}),
              {"x-admin-key": admin, "content-type": "application/json"})
    r = c.getresponse()
    data = r.read()
    if r.status != 201:
        sys.exit(f"creating client {i}: {r.status} {data[:200]!r}")
    keys.append(json.loads(data)["api_key"]["key"])
open(f"{work}/keys.txt", "w").write("".join(k + "\n" for k in keys))
open(f"{work}/key1.txt", "w").write(keys[0] + "\n")
c.request("POST", "/auth/login", json.dumps({"api_key": keys[0]}), {"content-type": "application/json"})
r = c.getresponse()
open(f"{work}/bearer.txt", "w").write("Bearer " + json.loads(r.read())["access_token"] + "\n")
EOF
# TARGET=nginx-keyauth profiles nginx instead (one worker on CPU $PROXY_CPU, the 10,000-key
# `map` and `limit_req` of loadtest.sh, the keys just created), for the same split of its time.
if [ "${TARGET:-keygate}" = nginx-keyauth ]; then
  kill "$KG_PID"
  python3 -c "
import sys
keys = [l.strip() for l in open('$WORK/keys.txt')]
open('$WORK/keys.map', 'w').write(''.join(f'{k} c{i};\n' for i, k in enumerate(keys)))"
  NG_PORT=$(free_port)
  nginx_conf ng "  upstream up { server 127.0.0.1:$UP_PORT; keepalive 256; }
$(keyauth_maps "$WORK/keys.map")
  server {
    listen 127.0.0.1:$NG_PORT;
$(keyauth_location)
  }"
  taskset -c "$PROXY_CPU" "$NGINX" -p "$WORK/ng" -c "$WORK/ng/nginx.conf" -e "$WORK/ng/error.log" &
  PIDS+=($!)
  wait_port "$NG_PORT"
  KG_PID=$(pgrep -P "$!" | head -n1)
  KG_PORT=$NG_PORT
  [ "$MODE" != jwt ] || { echo "profile: nginx-keyauth takes no tokens" >&2; exit 1; }
fi
case $MODE in
  one | h2c) creds=$WORK/key1.txt header=X-API-Key ;;
  rot) creds=$WORK/keys.txt header=X-API-Key ;;
  jwt) creds=$WORK/bearer.txt header=Authorization ;;
  *) echo "profile: unknown MODE $MODE" >&2; exit 1 ;;
esac
cat >"$WORK/load.lua" <<LUA
local reqs, i = {}, 0
init = function(args)
  for line in io.lines("$creds") do reqs[#reqs + 1] = wrk.format("GET", "/", { ["$header"] = line }) end
end
request = function() i = i % #reqs + 1; return reqs[i] end
LUA
load() { # seconds, output
  if [ "$MODE" = h2c ]; then
    taskset -c "$LOAD_CPU" h2load -t1 -c"$CONNS" -m10 -D"$1" -H "x-api-key: $(cat "$WORK/key1.txt")" \
      "http://127.0.0.1:$KG_PORT/" >"$2" 2>&1
    sed -n 's/.*requests: \([0-9]*\) total.*/\1/p' "$2"
  else
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${1}s" -s "$WORK/load.lua" "http://127.0.0.1:$KG_PORT/" >"$2" 2>&1
    sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' "$2"
  fi
}
stat_of() { awk '{print $14, $15}' "/proc/$KG_PID/stat"; }
switches() { awk '/ctxt_switches/ {s += $2} END {print s}' "/proc/$KG_PID/status"; }
hz=$(getconf CLK_TCK)

load 3 /dev/null >/dev/null # the cache warm (every key once at least)
: >"$OUTDIR/summary.md"
for rep in $(seq "$REPEAT"); do
[ "$REPEAT" = 1 ] || echo "measurement $rep of $REPEAT:" >>"$OUTDIR/summary.md"
load "$WARM" /dev/null >/dev/null
read -r u0 s0 < <(stat_of)
c0=$(switches)
nstat -n >/dev/null 2>&1 # resets nstat's history: the next call prints what changed since
n=$(load "$DURATION" "$OUTDIR/wrk.txt")
nstat >"$OUTDIR/nstat.txt" 2>/dev/null
read -r u1 s1 < <(stat_of)
c1=$(switches)
python3 - "$n" "$((u1 - u0))" "$((s1 - s0))" "$((c1 - c0))" "$hz" "$DURATION" "$OUTDIR/nstat.txt" \
  >>"$OUTDIR/summary.md" <<'EOF'
import sys
n, u, s, cs, hz, d = map(float, sys.argv[1:7])
seen = dict(l.split()[:2] for l in open(sys.argv[7]) if not l.startswith("#"))
seg = {k: int(seen.get(k, 0)) / n for k in ("TcpOutSegs", "TcpInSegs", "TcpExtTCPPureAcks", "TcpExtDelayedACKs")}
print(f"requests: {n:,.0f} in {d:.0f} s ({n / d:,.0f}/s)")
print(f"CPU per request: {(u + s) / hz / n * 1e6:.2f} µs = user {u / hz / n * 1e6:.2f} + system {s / hz / n * 1e6:.2f} "
      f"({s / (u + s) * 100:.0f} % in the kernel)")
print(f"context switches per request: {cs / n:.3f}")
print(f"TCP segments per request (the machine's, loopback): {seg['TcpOutSegs']:.3f} sent, "
      f"{seg['TcpInSegs']:.3f} received; pure ACKs received {seg['TcpExtTCPPureAcks']:.3f}, "
      f"delayed ACKs sent {seg['TcpExtDelayedACKs']:.3f}")
EOF
done

# System calls per request.
load "$WARM" /dev/null >/dev/null
strace -c -f -p "$KG_PID" -o "$OUTDIR/strace.txt" &
ST=$!
sleep 0.5
n=$(load "$DURATION" "$OUTDIR/wrk-strace.txt")
kill -INT "$ST"
wait "$ST" 2>/dev/null || true
python3 - "$n" "$OUTDIR/strace.txt" >>"$OUTDIR/summary.md" <<'EOF'
import re, sys
n = float(sys.argv[1])
rows = []
for line in open(sys.argv[2]):
    f = line.split()
    if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
        calls = int(f[3])
        rows.append((calls, f[-1]))
rows.sort(reverse=True)
total = sum(c for c, _ in rows)
print(f"system calls per request (strace -c, {n:,.0f} requests while traced): {total / n:.2f} = "
      + ", ".join(f"{name} {c / n:.2f}" for c, name in rows if c / n >= 0.01))
EOF

# System call time per request by socket: the client's side (local port $KG_PORT) against the
# upstream's. The class of a call is set by the `sock` tracepoint it passes (none: not counted).
load "$WARM" /dev/null >/dev/null
cat >"$WORK/sides.bt" <<BT
tracepoint:raw_syscalls:sys_enter /pid == $KG_PID/ { @enter[tid] = nsecs; }
tracepoint:sock:sock_send_length /pid == $KG_PID/ {
  @side[tid] = ((struct sock *)args->sk)->__sk_common.skc_num == $KG_PORT ? 1 : 2;
}
tracepoint:sock:sock_recv_length /pid == $KG_PID/ {
  @side[tid] = ((struct sock *)args->sk)->__sk_common.skc_num == $KG_PORT ? 3 : 4;
}
tracepoint:raw_syscalls:sys_exit /@enter[tid]/ {
  @ns[@side[tid]] = sum(nsecs - @enter[tid]);
  @calls[@side[tid]] = count();
  delete(@enter[tid]);
  delete(@side[tid]);
}
BT
# bpftrace reads the tracepoints from tracefs, which a fresh VM may not have mounted.
[ -d /sys/kernel/tracing/events/raw_syscalls ] || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
bpftrace "$WORK/sides.bt" >"$OUTDIR/sides.txt" 2>&1 &
BT=$!
# Attached once it says so.
for _ in $(seq 100); do grep -q Attaching "$OUTDIR/sides.txt" && break; sleep 0.1; done
sleep 0.5
n=$(load "$DURATION" "$OUTDIR/wrk-sides.txt")
kill -INT "$BT"
wait "$BT" || true
# Without it the split is left out, not the CPU profile after it.
python3 - "$n" "$OUTDIR/sides.txt" >>"$OUTDIR/summary.md" <<'EOF' || echo "system call time per request by socket: not measured (bpftrace: $OUTDIR/sides.txt)" >>"$OUTDIR/summary.md"
import re, sys
n = float(sys.argv[1])
got = {(m[0], m[1]): int(m[2]) for m in re.findall(r"@(ns|calls)\[(\d)\]: (\d+)", open(sys.argv[2]).read())}
if not got:
    sys.exit(f"bpftrace measured nothing: see {sys.argv[2]}")
sides = {"1": "send to the client", "2": "send upstream", "3": "read from the client", "4": "read from upstream"}
total = sum(got.get(("ns", k), 0) for k in sides)
print(f"system call time per request by socket (bpftrace, {n:,.0f} requests while traced; "
      "the probes' cost included):")
for k, name in sides.items():
    ns = got.get(("ns", k), 0)
    print(f"    {name}: {ns / n / 1e3:.2f} µs in {got.get(('calls', k), 0) / n:.2f} calls ({ns / total * 100:.0f} %)")
EOF

# A CPU profile.
load "$WARM" /dev/null >/dev/null
perf record -F 4999 -g -p "$KG_PID" -o "$OUTDIR/perf.data" -- sleep "$DURATION" 2>/dev/null &
PR=$!
load "$DURATION" /dev/null >/dev/null
wait "$PR" || true
perf report -i "$OUTDIR/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -12 >"$OUTDIR/perf-dso.txt" || true
perf report -i "$OUTDIR/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -60 >"$OUTDIR/perf-self.txt" || true
perf report -i "$OUTDIR/perf.data" --children --sort sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -80 >"$OUTDIR/perf-children.txt" || true
{
  echo
  echo "CPU profile by object (self time):"
  sed 's/^/    /' "$OUTDIR/perf-dso.txt"
  echo
  echo "top functions by self time:"
  head -40 "$OUTDIR/perf-self.txt" | sed 's/^/    /'
} >>"$OUTDIR/summary.md"
cat "$OUTDIR/summary.md"
