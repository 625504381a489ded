#!/usr/bin/env bash
# Side-by-side load test: keygate against nginx on the same CPU layout, in one run.
#
#   scripts/loadtest.sh                       # 5 reps x 10 s at 64 connections
#   REPS=3 DURATION=10 CONNS="64 256" scripts/loadtest.sh
#
# Layout (the one of shared/research/performance.md): the contender alone on CPU $PROXY_CPU
# with one worker (keygate `[server] worker_threads = 1`, nginx `worker_processes 1`); wrk
# (one thread) and the upstream (nginx, one worker, `return 200 "ok\n"`, keep-alive) on CPU
# $LOAD_CPU. Everything on 127.0.0.1, free ports, bounded durations; every process started
# here is stopped on exit. Repetitions are interleaved (rep 1 of every contender, then rep 2…)
# so drift spreads over all of them; each measured run follows $WARM s (default 2) of the same
# load, unmeasured. Output: a Markdown table on stdout (also written to
# $OUT, default target/loadtest/latest.md). Not part of the test suite.
#
# Contenders:
#   direct             wrk → upstream (the ceiling)
#   nginx-plain        proxy_pass to the upstream with upstream keepalive
#   nginx-keyauth      X-API-Key checked against a `map` of 10,000 keys, `limit_req` per key,
#                      key header removed and the client id added, then proxy_pass
#   nginx-keyauth-rot  the same, wrk rotating over the 10,000 keys
#   keygate            X-API-Key, auth + per-key rate limiting (limits never reached), one key
#   keygate-rot        the same, wrk rotating over 10,000 keys (cache warmed first)
#   keygate-jwt        Authorization: Bearer <token from /auth/login>
#   nginx-fwdauth      nginx `auth_request` → keygate's verify endpoint (`deny = "nginx"`,
#                      X-Original-Method/-URI) → upstream, the identity copied with
#                      auth_request_set; nginx and keygate both on CPU $PROXY_CPU
#   nginx-fwdauth-rot  the same, wrk rotating over the 10,000 keys
#   keygate-verify     wrk → keygate's verify endpoint directly (verify checks per second on
#                      one core, warm cache)
#   keygate-signed     keygate with `[identity] sign = true` (X-Keygate-Assertion, EdDSA), a
#                      second instance on CPU $PROXY_CPU driven exactly like keygate: signing on
#                      against off in one run (target: ≥ 0.95× the req/s, p99 within 10 %)
#   keygate-signed-rot the same, wrk rotating over its 10,000 keys (an assertion per key)
#   base, base-rot,    with BASELINE=/path/to/an/earlier/keygate: that binary, configured and
#   base-jwt,          driven exactly like keygate, keygate-rot, keygate-jwt and keygate-h2c
#   base-h2c           (its own key and token): before/after a change, in one run; add them
#                      to CONTENDERS.
#                      BASE_FLUSH_SECS=N gives it another
#                      `[store] last_used_flush_secs` (e.g. 86400 with BASELINE=the same binary:
#                      the usage flush on against off); BASE_COALESCE_US=N its
#                      `[server] event_coalesce_us` (0: off), whatever COALESCE_US gives the
#                      others (the pause on against off with BASELINE=the same binary)
#   keygate-redis      keygate on the Redis store (`[rate_limit] mode = "local"`), one key; a
#                      redis-server started here on a free loopback port on CPU $LOAD_CPU
#                      (no persistence), database 1
#   keygate-cluster    the same with `mode = "cluster"` (cluster rate limits synchronised
#                      through that Redis, database 2): against keygate-redis, the cost of
#                      cluster limits (target: >= 0.95x the req/s, p99 within 10 %)
#   keygate-credits    keygate on SQLite, one key holding 10^12 credits (every request charges
#                      one credit in the store): against keygate, the cost of credits
#                      These three start their own instances with $SMALL_KEYS keys (default 100)
#                      on CPU $PROXY_CPU, only when named in CONTENDERS (not by default).
#   keygate-tls        keygate serving TLS 1.3 (a second instance with the same keys' setup,
#                      `[proxy] tls_cert/tls_key`), wrk over https, keep-alive, one key
#   keygate-tls-new    the same with a new connection per request (`Connection: close`; wrk
#                      keeps the session of the previous connection: TLS resumption)
#   keygate-tls-new-busy
#                      keygate-tls-new against a third instance with `[server] busy_polling =
#                      true` (its event loop never sleeps, so no packet has to wake it). It is
#                      kept stopped (SIGSTOP) except while it is measured: a loop that never
#                      sleeps would otherwise take the proxy core from every other contender.
#   nginx-keyauth-tls, nginx-keyauth-tls-new
#                      nginx-keyauth on its TLS listener (`ssl`, TLSv1.3, session cache and
#                      tickets), the same certificate and key; both sides take the client's
#                      cipher order (TLS_AES_256_GCM_SHA384, X25519 with OpenSSL's defaults)
#   keygate-h2c, nginx-keyauth-h2c
#                      h2load over HTTP/2 prior knowledge (nginx `listen … http2`), the
#                      connection count × $STREAMS (default 10) concurrent streams, one key
#   keygate-h2, nginx-keyauth-h2
#                      h2load over TLS 1.3 with ALPN h2
#                      (h2load: Debian nghttp2-client; p50/p99 from its per-request log)
#
# TLS_OPEN_RATES="1000 2000" (the default when CONTENDERS names both nginx-keyauth-tls-new and
# keygate-tls-new; "" for none) adds a phase: the two at each of these fixed rates of new
# connections (examples/open_loop_tls, on CPU $LOAD_CPU), $REPS runs of $DURATION s each after
# $WARM s, the order alternated from run to run. Each connection is timed from when it was due
# to its answer's last byte, the TCP and TLS handshakes included: wrk starts its clock after the
# handshake, and when its own core is full (the *-tls-new variants above) the time a connection
# waits for wrk falls on the server that answered fastest. One table: latency percentiles,
# the contender's CPU per connection, the share of handshakes resumed (the client is rustls:
# each ticket used once), the client's start lag, the most of the contender's core stolen in a
# run (such runs are reported, not run again). OPEN_LOOP_TLS=path runs that build of the example.
#
# IDLE=10000 adds a last phase: keygate and nginx-keyauth each hold $IDLE idle keep-alive
# client connections (one request answered on each, then silent), opened by a Python client on
# CPU $LOAD_CPU; RSS (every process of the contender) before and with them held, and wrk at the
# first connection count while they are held against right before, in one table. Each of the
# two is started again first (IDLE_FRESH=1, the default; same configuration, ports and store):
# a process that served the phases before sits at their high-water mark and would add nothing
# for the connections; IDLE_FRESH=0 measures them as they are. Then (IDLE_TWINS=1, the default)
# scripts/idletwins.sh: each contender's copy holding $IDLE idle connections against a copy
# holding none, wrk alternating between them ($REPS rounds of $DURATION s), a second table.
# IDLE_ELSEWHERE=1 (with IDLE) runs wrk a fourth time per contender while as many idle
# connections (at most half of `ulimit -n`) are held by scripts/idle_pairs.py, a process that is
# neither contender: the slowdown the machine puts on any server while idle sockets exist.
#
# The *-tls-new variants are bounded by the client on this layout when wrk's TLS handshakes fill
# CPU $LOAD_CPU: every repetition also prints how busy the load core was, and the report how
# often per request the load core was woken from the other (function-call and rescheduling
# interrupts it received) and the machine switched tasks: the fewer, the more requests the
# load core's wrk and upstream get through (BENCHMARKS "Run N"). CAPTURE=1 (the default
# when the report has a *-tls-new contender; tcpdump is installed if missing) records 1 s of
# each *-tls-new contender's loopback traffic in the first repetition and reports, per
# connection, what the server did on the wire (ClientHello → its handshake flight, request →
# response) apart from what the client took (response → the client's close_notify).
# CAPTURE_PLAIN=1 (with CAPTURE=1) records keygate, keygate-rot, base, base-rot, nginx-keyauth
# and nginx-keyauth-rot the same way and reports, per keep-alive request, the server's time from
# the request's first packet to the response's, beside wrk's latency: how much of a p99 is the
# server's and how much the client's own queue (tcpdump shares the load core; that repetition
# is slower), and with IDLE the first run without and with the idle connections held.
# CAPTURE_SECS=N captures N s instead of 1 (at most DURATION); CAPTURE_WINDOW_MS=M also cuts
# each keep-alive capture into windows of M ms (requests, server p50 and p99 in each).
#
# SHIELD=1 keeps the contender's core to the contenders while the script runs (as `cset shield`
# would): every task allowed on CPU $PROXY_CPU and on others (other processes, this script and
# the tools it starts, movable kernel threads such as kdamond.0) is moved to CPU $LOAD_CPU once
# the servers are up, and given its CPU list back at exit. Tasks pinned to CPU $PROXY_CPU alone
# stay: the contenders, and the per-CPU kernel threads (ksoftirqd, kworkers), which cannot be
# moved. Processes started meanwhile by a moved one keep CPU $LOAD_CPU, and a run killed with
# SIGKILL gives nothing back (`taskset -pc 0-N TID` does). Off by default: it changes the
# machine for the run's length; the report says when it was on.
#
# KEYGATE_BIN=path runs that binary instead of building the release one (e.g. a quick check of
# the script with a debug build; figures from a debug build mean nothing).
# INSTANCE_ENV="NAME=value …" is added to the environment of every keygate instance (the TLS
# ones too), e.g. a setting read by a scratch build; nginx, wrk and the upstream do not get it.
# COALESCE_US=N sets `[server] event_coalesce_us = N` in every keygate instance but the
# busy-polling one (unset: keygate's default); the report names it.
# KEEP_WORK=1 keeps the scratch directory (every instance's keygate.log and SQLite file,
# nginx's error logs) instead of removing it at exit; its path is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# free_port, wait_port, nginx_conf, keyauth_maps, keyauth_location
. scripts/lib/bench.sh

REPS=${REPS:-5}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
KEYS=${KEYS:-10000}
# Seconds of the same load, not measured, right before each measured run (steady state: warm
# caches and connection pools whatever ran before).
WARM=${WARM:-2}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
OUT=${OUT:-$ROOT/target/loadtest/latest.md}
# OUT is the report's file (the raw figures go to "$OUT.raw/" beside it): refused at once when it
# names a directory, which would fail only at the end of a long run and lose it.
if [ -d "$OUT" ]; then
  echo "OUT=$OUT is a directory; give the report's file name (e.g. $OUT/latest.md)" >&2
  exit 2
fi
if [ -e "$(dirname "$OUT")" ] && [ ! -d "$(dirname "$OUT")" ]; then
  echo "OUT=$OUT: $(dirname "$OUT") exists and is not a directory" >&2
  exit 2
fi
SMALL_KEYS=${SMALL_KEYS:-100}
STREAMS=${STREAMS:-10}
IDLE=${IDLE:-0}
# Each name matched on its own: in one pattern two adjacent names would share their space.
case " ${CONTENDERS:-} " in
  *" nginx-keyauth-tls-new "*)
    case " $CONTENDERS " in *" keygate-tls-new "*) TLS_OPEN_RATES=${TLS_OPEN_RATES-"1000 2000"} ;; esac ;;
esac
TLS_OPEN_RATES=${TLS_OPEN_RATES:-}
if [ -n "${TLS_OPEN_RATES// /}" ]; then
  case " ${CONTENDERS:-} " in
    *" nginx-keyauth-tls-new "*) case " $CONTENDERS " in *" keygate-tls-new "*) ;; *) TLS_OPEN_MISSING=1 ;; esac ;;
    *) TLS_OPEN_MISSING=1 ;;
  esac
  if [ -n "${TLS_OPEN_MISSING:-}" ]; then
    echo "TLS_OPEN_RATES needs both nginx-keyauth-tls-new and keygate-tls-new in CONTENDERS" >&2
    exit 2
  fi
fi
for r in $TLS_OPEN_RATES; do
  case $r in *[!0-9]* | 0*) echo "TLS_OPEN_RATES: '$r' is not a positive whole number of connections per second" >&2; exit 2 ;; esac
done
if [ -n "$TLS_OPEN_RATES" ]; then
  # open_loop_tls does not count its first second.
  for v in "WARM=$WARM" "DURATION=$DURATION"; do
    case ${v#*=} in '' | *[!0-9]* | 0 | 1) echo "TLS_OPEN_RATES needs $v to be at least 2 (seconds)" >&2; exit 2 ;; esac
  done
  if [ -n "${OPEN_LOOP_TLS:-}" ] && [ ! -x "$OPEN_LOOP_TLS" ]; then
    echo "OPEN_LOOP_TLS=$OPEN_LOOP_TLS is not an executable file" >&2
    exit 2
  fi
fi
IDLE_ELSEWHERE=${IDLE_ELSEWHERE:-0}
IDLE_FRESH=${IDLE_FRESH:-1}
IDLE_TWINS=${IDLE_TWINS:-1}
SHIELD=${SHIELD:-0}
# Runs with more of the contender's core stolen by the hypervisor than this (%) are run again.
STEAL_MAX=${STEAL_MAX:-2}
case " ${CONTENDERS:-} " in *"-tls-new "*) CAPTURE=${CAPTURE:-1} ;; esac
CAPTURE=${CAPTURE:-0}
CAPTURE_PLAIN=${CAPTURE_PLAIN:-0}
CAPTURE_SECS=${CAPTURE_SECS:-1}
CONTENDERS=${CONTENDERS:-"direct nginx-plain nginx-keyauth nginx-keyauth-rot keygate keygate-rot keygate-jwt nginx-fwdauth nginx-fwdauth-rot keygate-verify keygate-signed keygate-signed-rot"}

# ---- tools -------------------------------------------------------------------------------
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
case " $CONTENDERS " in
  *"-h2c "* | *"-h2 "*) command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client) ;;
esac
if [ "$CAPTURE" = 1 ]; then command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump); fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "loadtest: missing ${need[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "installing: ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [ "$(nproc)" -lt 2 ]; then
  echo "loadtest: needs at least 2 CPUs (contender and load on separate cores)" >&2
  exit 1
fi

if [ -n "${KEYGATE_BIN:-}" ]; then
  KEYGATE=$KEYGATE_BIN
else
  echo "building keygate (release)…" >&2
  cargo build --release --quiet --bin keygate
  KEYGATE=$ROOT/target/release/keygate
fi
OPEN_LOOP_TLS=${OPEN_LOOP_TLS:-$ROOT/target/release/examples/open_loop_tls}
if [ -n "$TLS_OPEN_RATES" ] && [ ! -x "$OPEN_LOOP_TLS" ]; then
  echo "building examples/open_loop_tls (release)…" >&2
  cargo build --release --quiet --example open_loop_tls
fi

# ---- scratch space and cleanup -----------------------------------------------------------
BASE=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && BASE=/dev/shm # the SQLite file too: no fsync cost
# SCRATCH=/var/tmp puts everything (the SQLite files too) on a disk instead.
BASE=${SCRATCH:-$BASE}
WORK=$(mktemp -d "$BASE/keygate-loadtest.XXXXXX")
PIDS=()
cleanup() {
  unshield
  # CONT: a stopped process (keygate-tls-new-busy) takes the TERM only once it runs again.
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; kill -CONT "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  if [ "${KEEP_WORK:-0}" = 1 ]; then
    echo "KEEP_WORK=1: the scratch directory is kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}
# SHIELD=1: the tasks moved off CPU $PROXY_CPU, with the CPU list each had ("tid list" lines).
SHIELDED=$WORK/shielded
: >"$SHIELDED"
# Whether CPU $1 is in the CPU list $2 ("0-3,6" as in /proc/*/status).
cpu_in_list() {
  local item
  for item in ${2//,/ }; do
    if [ "$1" -ge "${item%-*}" ] && [ "$1" -le "${item#*-}" ]; then return 0; fi
  done
  return 1
}
shield() {
  local t tid list n=0
  for t in /proc/[0-9]*/task/[0-9]*; do
    tid=${t##*/}
    list=$(awk '/^Cpus_allowed_list/ {print $2}' "$t/status" 2>/dev/null) || continue
    case "$list" in "" | "$PROXY_CPU") continue ;; esac
    cpu_in_list "$PROXY_CPU" "$list" || continue
    if taskset -pc "$LOAD_CPU" "$tid" >/dev/null 2>&1; then
      printf '%s %s\n' "$tid" "$list" >>"$SHIELDED"
      n=$((n + 1))
    fi
  done
  echo "SHIELD=1: $n tasks moved off CPU $PROXY_CPU for the run" >&2
}
unshield() {
  local tid list
  [ -s "${SHIELDED:-}" ] || return 0
  while read -r tid list; do taskset -pc "$list" "$tid" >/dev/null 2>&1 || true; done <"$SHIELDED"
  : >"$SHIELDED"
}
trap cleanup EXIT INT TERM
# Room for the idle connections of IDLE (both ends are on this machine).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# One certificate and key (ECDSA P-256, for 127.0.0.1) for every TLS listener.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
  -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null


UP_PORT=$(free_port)
NG_PLAIN_PORT=$(free_port)
NG_AUTH_PORT=$(free_port)
NG_FA_PORT=$(free_port)
KG_PORT=$(free_port)
KG_ADMIN_PORT=$(free_port)
KGB_PORT=$(free_port)
KGB_ADMIN_PORT=$(free_port)
KGS_PORT=$(free_port)
KGS_ADMIN_PORT=$(free_port)
KGR_PORT=$(free_port)
KGR_ADMIN_PORT=$(free_port)
KGC_PORT=$(free_port)
KGC_ADMIN_PORT=$(free_port)
KGCR_PORT=$(free_port)
KGCR_ADMIN_PORT=$(free_port)
KGT_PORT=$(free_port)
KGT_ADMIN_PORT=$(free_port)
KGTB_PORT=$(free_port)
KGTB_ADMIN_PORT=$(free_port)
NG_AUTH_TLS_PORT=$(free_port)
NG_AUTH_H2C_PORT=$(free_port)
REDIS_PORT=$(free_port)
ADMIN_KEY=loadtest-admin-$(python3 -c 'import secrets; print(secrets.token_hex(16))')
JWT_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))')

declare -A MASTER
start_nginx() { # name, cpu
  taskset -c "$2" "$NGINX" -p "$WORK/$1" -c "$WORK/$1/nginx.conf" -e "$WORK/$1/error.log" &
  PIDS+=($!)
  MASTER[$1]=$!
}

# ---- upstream ----------------------------------------------------------------------------
nginx_conf upstream "  server { listen 127.0.0.1:$UP_PORT; location / { return 200 \"ok\\n\"; } }"
start_nginx upstream "$LOAD_CPU"
wait_port "$UP_PORT" upstream

# ---- keygate and its keys ----------------------------------------------------------------
# The `[server]` line COALESCE_US asks for (none when unset); the busy-polling instance clears it.
KG_COALESCE_LINE=${COALESCE_US:+event_coalesce_us = $COALESCE_US}
# Runs keygate (binary $1, listening on port $2) with the configuration in $3 on the contender's
# core, its log appended to $3/keygate.log. Sets STARTED_PID.
launch_keygate() {
  env ${KG_ENV:-} ${INSTANCE_ENV:-} KEYGATE_ADMIN_KEY=$ADMIN_KEY taskset -c "$PROXY_CPU" "$1" serve --config "$3/keygate.toml" \
    >>"$3/keygate.log" 2>&1 &
  STARTED_PID=$!
  PIDS+=($STARTED_PID)
  wait_port "$2" "$1"
}
# Starts a keygate (binary $1) on ports $2/$3 with its files in $4, and creates $KEYS keys
# (or $8) through its admin API ($4/keys.txt, ids.txt, keys.map, token.txt); $5 is appended to
# its config, $6 is its store URL (default SQLite in $4), $7 extra `[rate_limit]` lines.
# Sets STARTED_PID.
start_keygate() {
local bin=$1 port=$2 admin_port=$3 dir=$4 extra=${5:-} store=${6:-sqlite://$4/keygate.db}
local rate_extra=${7:-} nkeys=${8:-$KEYS}
mkdir -p "$dir"
cat >"$dir/keygate.toml" <<EOF
[proxy]
listen = "127.0.0.1:$port"
upstream = "http://127.0.0.1:$UP_PORT"
[admin]
listen = "127.0.0.1:$admin_port"
[keys]
max_per_client = 0
[store]
url = "$store"
last_used_flush_secs = ${KG_FLUSH:-10}
[rate_limit]
default = { per_second = 1000000000, burst = 1000000 }
$rate_extra
[plans.bench]
rate_limit = { per_second = 1000000000, burst = 1000000 }
[server]
worker_threads = 1
busy_polling = ${KG_BUSY:-false}
${KG_COALESCE_LINE:-}
[jwt]
secret = "$JWT_SECRET"
# The token of keygate-jwt is minted once, before every run: it must outlive them all.
ttl_secs = 86400
[log]
level = "warn"
access_log = false
[limits]
max_connections = 30000
max_connections_per_ip = 0
header_read_timeout_secs = 300
$extra
EOF
launch_keygate "$bin" "$port" "$dir"

echo "creating $nkeys keys through the admin API…" >&2
python3 - "$admin_port" "$ADMIN_KEY" "$nkeys" "$dir" <<'EOF'
import http.client, json, sys
port, admin, n, work = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
c = http.client.HTTPConnection("127.0.0.1", port)
keys = []
for i in range(n):
    body = json.dumps({"client_id": f"bench-{i}", "license": "bench"})
    c.request("POST", "/v1/clients", body, {"x-admin-key": admin, "content-type": "application/json"})
    r = c.getresponse()
    data = r.read()
    if r.status != 201:
        sys.exit(f"creating client {i}: {r.status} {data[:200]!r}")
    made = json.loads(data)["api_key"]
    keys.append((made["key"], f"bench-{i}", made["id"]))
with open(f"{work}/keys.txt", "w") as f:
    f.write("".join(k[0] + "\n" for k in keys))
with open(f"{work}/ids.txt", "w") as f:
    f.write("".join(k[2] + "\n" for k in keys))
# nginx map: key -> client id ("" = unknown)
with open(f"{work}/keys.map", "w") as f:
    f.write("".join(f"{k} {c};\n" for k, c, _ in keys))
c.request("POST", "/auth/login", json.dumps({"api_key": keys[0][0]}), {"content-type": "application/json"})
r = c.getresponse()
data = r.read()
if r.status != 200:
    sys.exit(f"login: {r.status} {data[:200]!r}")
with open(f"{work}/token.txt", "w") as f:
    f.write(json.loads(data)["access_token"])
EOF
}
start_keygate "$KEYGATE" "$KG_PORT" "$KG_ADMIN_PORT" "$WORK" '[forward_auth]
enabled = true
deny = "nginx"'
KG_PID=$STARTED_PID
KGB_PID=
if [ -n "${BASELINE:-}" ]; then
  base_coalesce=$KG_COALESCE_LINE
  if [ -n "${BASE_COALESCE_US:-}" ]; then base_coalesce="event_coalesce_us = $BASE_COALESCE_US"; fi
  KG_FLUSH=${BASE_FLUSH_SECS:-10} KG_COALESCE_LINE=$base_coalesce \
    start_keygate "$BASELINE" "$KGB_PORT" "$KGB_ADMIN_PORT" "$WORK/base"
  KGB_PID=$STARTED_PID
fi
# The certificate and key of both TLS instances (keygate-tls…, keygate-tls-new-busy).
TLS_ENV="KEYGATE_TLS_CERT=$WORK/tls.crt KEYGATE_TLS_KEY=$WORK/tls.key"
KGT_PID=
case " $CONTENDERS " in
  *" keygate-tls"* | *" keygate-h2 "*)
    KG_ENV=$TLS_ENV \
      start_keygate "$KEYGATE" "$KGT_PORT" "$KGT_ADMIN_PORT" "$WORK/tls"
    KGT_PID=$STARTED_PID
    ;;
esac
KGTB_PID=
case " $CONTENDERS " in
  *" keygate-tls-new-busy "*)
    KG_BUSY=true KG_COALESCE_LINE= KG_ENV=$TLS_ENV \
      start_keygate "$KEYGATE" "$KGTB_PORT" "$KGTB_ADMIN_PORT" "$WORK/tls-busy"
    KGTB_PID=$STARTED_PID
    kill -STOP "$KGTB_PID"
    ;;
esac
KGS_PID=
case " $CONTENDERS " in
  *" keygate-signed"*)
    start_keygate "$KEYGATE" "$KGS_PORT" "$KGS_ADMIN_PORT" "$WORK/signed" '[identity]
sign = true'
    KGS_PID=$STARTED_PID
    ;;
esac
# The contenders of cluster limits and credits: Redis store with local or cluster rate limits,
# credits on SQLite.
KGR_PID=
KGC_PID=
KGCR_PID=
case " $CONTENDERS " in
  *" keygate-redis "* | *" keygate-cluster "*)
    command -v redis-server >/dev/null 2>&1 || {
      echo "loadtest: keygate-redis/keygate-cluster need redis-server (apt-get install redis-server)" >&2
      exit 1
    }
    mkdir -p "$WORK/redis"
    taskset -c "$LOAD_CPU" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' \
      --appendonly no --dir "$WORK/redis" --logfile "$WORK/redis/redis.log" &
    PIDS+=($!)
    wait_port "$REDIS_PORT" redis-server
    ;;
esac
case " $CONTENDERS " in
  *" keygate-redis "*)
    start_keygate "$KEYGATE" "$KGR_PORT" "$KGR_ADMIN_PORT" "$WORK/redis-local" '' \
      "redis://127.0.0.1:$REDIS_PORT/1" 'mode = "local"' "$SMALL_KEYS"
    KGR_PID=$STARTED_PID
    ;;
esac
case " $CONTENDERS " in
  *" keygate-cluster "*)
    start_keygate "$KEYGATE" "$KGC_PORT" "$KGC_ADMIN_PORT" "$WORK/redis-cluster" '' \
      "redis://127.0.0.1:$REDIS_PORT/2" 'mode = "cluster"' "$SMALL_KEYS"
    KGC_PID=$STARTED_PID
    ;;
esac
case " $CONTENDERS " in
  *" keygate-credits "*)
    start_keygate "$KEYGATE" "$KGCR_PORT" "$KGCR_ADMIN_PORT" "$WORK/credits" '' '' '' "$SMALL_KEYS"
    KGCR_PID=$STARTED_PID
    python3 - "$KGCR_ADMIN_PORT" "$ADMIN_KEY" "$(head -n1 "$WORK/credits/ids.txt")" <<'EOF'
import http.client, json, sys
port, admin, key_id = int(sys.argv[1]), sys.argv[2], sys.argv[3]
c = http.client.HTTPConnection("127.0.0.1", port)
c.request("POST", f"/v1/api-keys/{key_id}/credits", json.dumps({"set": 10**12}),
          {"x-admin-key": admin, "content-type": "application/json"})
r = c.getresponse()
data = r.read()
if r.status != 200:
    sys.exit(f"setting credits: {r.status} {data[:200]!r}")
EOF
    ;;
esac
KEY=$(head -n1 "$WORK/keys.txt")
TOKEN=$(cat "$WORK/token.txt")

# ---- nginx contenders --------------------------------------------------------------------
UPSTREAM_BLOCK="  upstream up { server 127.0.0.1:$UP_PORT; keepalive 256; }"
PROXY_COMMON="proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";"
nginx_conf nginx-plain "$UPSTREAM_BLOCK
  server { listen 127.0.0.1:$NG_PLAIN_PORT; location / { $PROXY_COMMON } }"
nginx_conf nginx-keyauth "$UPSTREAM_BLOCK
$(keyauth_maps "$WORK/keys.map")
  server {
    listen 127.0.0.1:$NG_AUTH_PORT;
    listen 127.0.0.1:$NG_AUTH_TLS_PORT ssl http2;
    listen 127.0.0.1:$NG_AUTH_H2C_PORT http2;
    ssl_certificate $WORK/tls.crt;
    ssl_certificate_key $WORK/tls.key;
    ssl_protocols TLSv1.3;
    ssl_session_cache shared:TLS:10m;
    ssl_session_tickets on;
    http2_max_concurrent_streams 128;
$(keyauth_location)
  }"
# The recipe of examples/forward-auth/nginx.conf, without the refusal mapping (nothing is
# refused here).
nginx_conf nginx-fwdauth "$UPSTREAM_BLOCK
  upstream keygate { server 127.0.0.1:$KG_PORT; keepalive 256; }
  server {
    listen 127.0.0.1:$NG_FA_PORT;
    location / {
      auth_request /_keygate_verify;
      auth_request_set \$keygate_client_id \$upstream_http_x_keygate_client_id;
      auth_request_set \$keygate_key_id \$upstream_http_x_keygate_key_id;
      auth_request_set \$keygate_permissions \$upstream_http_x_keygate_permissions;
      auth_request_set \$keygate_license \$upstream_http_x_keygate_license;
      proxy_set_header X-API-Key \"\";
      proxy_set_header X-Keygate-Client-Id \$keygate_client_id;
      proxy_set_header X-Keygate-Key-Id \$keygate_key_id;
      proxy_set_header X-Keygate-Permissions \$keygate_permissions;
      proxy_set_header X-Keygate-License \$keygate_license;
      $PROXY_COMMON
    }
    location = /_keygate_verify {
      internal;
      proxy_pass http://keygate/_keygate/verify;
      proxy_pass_request_body off;
      proxy_set_header Content-Length \"\";
      proxy_set_header X-Original-Method \$request_method;
      proxy_set_header X-Original-URI \$request_uri;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }
  }"
start_nginx nginx-plain "$PROXY_CPU"
start_nginx nginx-keyauth "$PROXY_CPU"
start_nginx nginx-fwdauth "$PROXY_CPU"
wait_port "$NG_PLAIN_PORT" nginx-plain
wait_port "$NG_AUTH_PORT" nginx-keyauth
wait_port "$NG_AUTH_TLS_PORT" nginx-keyauth-tls
wait_port "$NG_FA_PORT" nginx-fwdauth

# TLS: the suite both sides negotiate with OpenSSL's client defaults, and whether a client
# that reconnects with its last session (as the -new contenders' wrk does) resumes it: one
# request per connection, the session of each passed to the next, four reconnections.
tls_check() { # port, key
  python3 - "$1" "$2" <<'PY'
import socket, ssl, sys
port, key = int(sys.argv[1]), sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
session, resumed, cipher = None, 0, "?"
for i in range(5):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), session=session)
    s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n".encode())
    while s.recv(65536):
        pass
    resumed += i > 0 and s.session_reused
    cipher = s.cipher()[0]
    session = s.session
    s.close()
print(f"{cipher}, {resumed} of 4 reconnections resumed", end="")
PY
}
TLS_NOTE=
if [ -n "$KGT_PID" ]; then
  TLS_NOTE="TLS 1.3 (Python's OpenSSL client): keygate $(tls_check "$KGT_PORT" "$(head -n1 "$WORK/tls/keys.txt")"); nginx-keyauth $(tls_check "$NG_AUTH_TLS_PORT" "$(head -n1 "$WORK/keys.txt")")."
fi

# ---- wrk scripts -------------------------------------------------------------------------
# Every contender is driven by the same kind of script: requests formatted once, up front, from
# a file of credentials, and handed out in turn by request(). The load generator then does the
# same work per request whatever the contender, one key or 10,000.
head -n1 "$WORK/keys.txt" >"$WORK/key1.txt"
printf 'Bearer %s\n' "$TOKEN" >"$WORK/bearer.txt"
wrk_script() { # name, header, credentials file[, path, extra Lua header entries]
  cat >"$WORK/$1.lua" <<LUA
local reqs = {}
local i = 0
init = function(args)
  for line in io.lines("$3") do
    reqs[#reqs + 1] = wrk.format("GET", "${4:-/}", { ["$2"] = line${5:+, $5} })
  end
end
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
LUA
}
wrk_script one X-API-Key "$WORK/key1.txt"
if [ -n "$KGB_PID" ]; then
  head -n1 "$WORK/base/keys.txt" >"$WORK/base-key1.txt"
  wrk_script base-one X-API-Key "$WORK/base-key1.txt"
  wrk_script base-rotate X-API-Key "$WORK/base/keys.txt"
  printf 'Bearer %s\n' "$(cat "$WORK/base/token.txt")" >"$WORK/base-bearer.txt"
  wrk_script base-jwt Authorization "$WORK/base-bearer.txt"
fi
wrk_script rotate X-API-Key "$WORK/keys.txt"
wrk_script one-close X-API-Key "$WORK/key1.txt" / '["Connection"] = "close"'
if [ -n "$KGT_PID" ]; then
  head -n1 "$WORK/tls/keys.txt" >"$WORK/tls-key1.txt"
  wrk_script tls-one X-API-Key "$WORK/tls-key1.txt"
  wrk_script tls-one-close X-API-Key "$WORK/tls-key1.txt" / '["Connection"] = "close"'
fi
if [ -n "$KGTB_PID" ]; then
  head -n1 "$WORK/tls-busy/keys.txt" >"$WORK/tls-busy-key1.txt"
  wrk_script tls-busy-one-close X-API-Key "$WORK/tls-busy-key1.txt" / '["Connection"] = "close"'
fi
if [ -n "$KGS_PID" ]; then
  head -n1 "$WORK/signed/keys.txt" >"$WORK/signed-key1.txt"
  wrk_script signed-one X-API-Key "$WORK/signed-key1.txt"
  wrk_script signed-rotate X-API-Key "$WORK/signed/keys.txt"
fi
for d in redis-local redis-cluster credits; do
  if [ -s "$WORK/$d/keys.txt" ]; then
    head -n1 "$WORK/$d/keys.txt" >"$WORK/$d-key1.txt"
    wrk_script "$d-one" X-API-Key "$WORK/$d-key1.txt"
  fi
done
wrk_script jwt Authorization "$WORK/bearer.txt"
wrk_script verify X-API-Key "$WORK/key1.txt" /_keygate/verify \
  '["X-Original-Method"] = "GET", ["X-Original-URI"] = "/"'

# h2load at $2 connections × $STREAMS streams for $3 s against URL $5 with key $6; its summary
# is written to $4 in wrk's words (the lines the report reads), p50/p99 from its request log.
run_h2load() {
  local n=$1 d=$2 out=$3 url=$4 key=$5
  taskset -c "$LOAD_CPU" h2load -t1 -c"$n" -m"$STREAMS" -D"$d" --log-file="$out.log" \
    -H "x-api-key: $key" "$url" >"$out.h2load" 2>&1 || true
  python3 - "$out.h2load" "$out.log" "$d" >"$out" <<'PY'
import re, sys
text, log, d = open(sys.argv[1]).read(), sys.argv[2], float(sys.argv[3])
lat = []
for line in open(log):
    f = line.split()
    if len(f) >= 3:
        lat.append(int(f[2]))
lat.sort()
m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
if not (m and req and codes and lat):
    print(text)
    sys.exit(0)
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(f"  {req.group(3)} requests in {d:.2f}s")
print(f"Requests/sec: {m.group(3)}")
print(f"     50%  {q(0.50)}us")
print(f"     99%  {q(0.99)}us")
bad = int(codes.group(2)) + int(codes.group(3)) + int(codes.group(4))
if bad:
    print(f"  Non-2xx or 3xx responses: {bad}")
errs = int(req.group(5)) + int(req.group(6)) + int(req.group(7))
if errs:
    print(f"  Socket errors: connect 0, read {int(req.group(5))}, write {int(req.group(6))}, timeout {int(req.group(7))}")
PY
  rm -f "$out.log"
}

run_wrk() { # contender, conns, duration, out
  local c=$1 n=$2 d=$3 out=$4
  local port args=() scheme=http
  case $c in
    keygate-h2c) run_h2load "$n" "$d" "$out" "http://127.0.0.1:$KG_PORT/" "$KEY"; return ;;
    nginx-keyauth-h2c) run_h2load "$n" "$d" "$out" "http://127.0.0.1:$NG_AUTH_H2C_PORT/" "$KEY"; return ;;
    base-h2c) run_h2load "$n" "$d" "$out" "http://127.0.0.1:$KGB_PORT/" "$(cat "$WORK/base-key1.txt")"; return ;;
    keygate-h2) run_h2load "$n" "$d" "$out" "https://127.0.0.1:$KGT_PORT/" "$(cat "$WORK/tls-key1.txt")"; return ;;
    nginx-keyauth-h2) run_h2load "$n" "$d" "$out" "https://127.0.0.1:$NG_AUTH_TLS_PORT/" "$KEY"; return ;;
    keygate-tls) port=$KGT_PORT; scheme=https; args=(-s "$WORK/tls-one.lua") ;;
    keygate-tls-new) port=$KGT_PORT; scheme=https; args=(-s "$WORK/tls-one-close.lua") ;;
    keygate-tls-new-busy) port=$KGTB_PORT; scheme=https; args=(-s "$WORK/tls-busy-one-close.lua") ;;
    nginx-keyauth-tls) port=$NG_AUTH_TLS_PORT; scheme=https; args=(-s "$WORK/one.lua") ;;
    nginx-keyauth-tls-new) port=$NG_AUTH_TLS_PORT; scheme=https; args=(-s "$WORK/one-close.lua") ;;
    direct) port=$UP_PORT; args=(-s "$WORK/one.lua") ;;
    nginx-plain) port=$NG_PLAIN_PORT; args=(-s "$WORK/one.lua") ;;
    nginx-keyauth) port=$NG_AUTH_PORT; args=(-s "$WORK/one.lua") ;;
    nginx-keyauth-rot) port=$NG_AUTH_PORT; args=(-s "$WORK/rotate.lua") ;;
    keygate) port=$KG_PORT; args=(-s "$WORK/one.lua") ;;
    keygate-rot) port=$KG_PORT; args=(-s "$WORK/rotate.lua") ;;
    keygate-jwt) port=$KG_PORT; args=(-s "$WORK/jwt.lua") ;;
    nginx-fwdauth) port=$NG_FA_PORT; args=(-s "$WORK/one.lua") ;;
    nginx-fwdauth-rot) port=$NG_FA_PORT; args=(-s "$WORK/rotate.lua") ;;
    keygate-verify) port=$KG_PORT; args=(-s "$WORK/verify.lua") ;;
    keygate-signed) port=$KGS_PORT; args=(-s "$WORK/signed-one.lua") ;;
    keygate-signed-rot) port=$KGS_PORT; args=(-s "$WORK/signed-rotate.lua") ;;
    base) port=$KGB_PORT; args=(-s "$WORK/base-one.lua") ;;
    base-rot) port=$KGB_PORT; args=(-s "$WORK/base-rotate.lua") ;;
    base-jwt) port=$KGB_PORT; args=(-s "$WORK/base-jwt.lua") ;;
    keygate-redis) port=$KGR_PORT; args=(-s "$WORK/redis-local-one.lua") ;;
    keygate-cluster) port=$KGC_PORT; args=(-s "$WORK/redis-cluster-one.lua") ;;
    keygate-credits) port=$KGCR_PORT; args=(-s "$WORK/credits-one.lua") ;;
    *) echo "unknown contender $c" >&2; exit 1 ;;
  esac
  local rc=0
  if [ "$c" = keygate-tls-new-busy ]; then kill -CONT "$KGTB_PID"; fi
  taskset -c "$LOAD_CPU" wrk -t1 -c"$n" -d"${d}s" --latency "${args[@]}" \
    "$scheme://127.0.0.1:$port/" >"$out" 2>&1 || rc=$?
  if [ "$c" = keygate-tls-new-busy ]; then kill -STOP "$KGTB_PID"; fi
  return "$rc"
}

# CPU seconds (user+sys) used so far by the processes serving a contender.
contender_pids() {
  case $1 in
    direct) echo "" ;;
    nginx-plain*) echo "${MASTER[nginx-plain]} $(pgrep -P "${MASTER[nginx-plain]}" | tr '\n' ' ')" ;;
    nginx-keyauth*) echo "${MASTER[nginx-keyauth]} $(pgrep -P "${MASTER[nginx-keyauth]}" | tr '\n' ' ')" ;;
    # Both serve each request: nginx and the keygate it asks.
    nginx-fwdauth*) echo "${MASTER[nginx-fwdauth]} $(pgrep -P "${MASTER[nginx-fwdauth]}" | tr '\n' ' ') $KG_PID" ;;
    keygate-signed*) echo "$KGS_PID" ;;
    keygate-redis) echo "$KGR_PID" ;;
    keygate-cluster) echo "$KGC_PID" ;;
    keygate-credits) echo "$KGCR_PID" ;;
    keygate-tls-new-busy) echo "$KGTB_PID" ;;
    keygate-tls* | keygate-h2) echo "$KGT_PID" ;;
    keygate*) echo "$KG_PID" ;;
    base*) echo "$KGB_PID" ;;
  esac
}
# Ticks of CPU $1 (default $PROXY_CPU) so far: busy (user+nice+system+irq+softirq), then steal.
core_ticks() {
  awk -v c="cpu${1:-$PROXY_CPU}" '$1 == c {print $2 + $3 + $4 + $7 + $8, $9}' /proc/stat
}
# The machine's context switches so far, then the function-call and rescheduling interrupts
# CPU $LOAD_CPU has received (a task there woken from the other core): how often the load
# core's processes were woken and switched (see scripts/wakeups.py).
switches() {
  echo "$(awk '$1 == "ctxt" {print $2}' /proc/stat)" \
    "$(awk -v col=$((LOAD_CPU + 2)) '$1 == "CAL:" || $1 == "RES:" {s += $col} END {print s}' /proc/interrupts)"
}
# The listening port of a contender (for the capture).
contender_port() {
  case $1 in
    keygate-tls-new) echo "$KGT_PORT" ;;
    keygate-tls-new-busy) echo "$KGTB_PORT" ;;
    nginx-keyauth-tls-new) echo "$NG_AUTH_TLS_PORT" ;;
    keygate | keygate-rot) [ "$CAPTURE_PLAIN" != 1 ] || echo "$KG_PORT" ;;
    base | base-rot) [ "$CAPTURE_PLAIN" != 1 ] || echo "$KGB_PORT" ;;
    nginx-keyauth | nginx-keyauth-rot) [ "$CAPTURE_PLAIN" != 1 ] || echo "$NG_AUTH_PORT" ;;
  esac
}
# Records $CAPTURE_SECS s in the middle of the next $DURATION s run of contender $1 into $2, on
# the load core (as the client's cost); `wait "$cap_pid"` after the run.
start_capture() {
  (sleep "$(( (DURATION - CAPTURE_SECS) / 2 ))"
   timeout "$CAPTURE_SECS" taskset -c "$LOAD_CPU" tcpdump -i lo -n -s 96 -w "$2" \
     tcp port "$(contender_port "$1")" 2>/dev/null || true) &
  cap_pid=$!
}
cpu_ticks() {
  local t=0
  for p in $1; do
    [ -r "/proc/$p/stat" ] || continue
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$t"
}

if [ "$SHIELD" = 1 ]; then shield; fi
echo "warming up (every contender, ${DURATION}s each at the first connection count)…" >&2
for c in $CONTENDERS; do
  run_wrk "$c" "${CONNS%% *}" 3 "$WORK/warm-$c.txt"
done
# Make sure every key is in keygate's cache.
run_wrk keygate-rot "${CONNS%% *}" 3 "$WORK/warm-keygate-rot2.txt"
if [ -n "$KGB_PID" ]; then run_wrk base-rot "${CONNS%% *}" 3 "$WORK/warm-base-rot2.txt"; fi
if [ -n "$KGS_PID" ]; then run_wrk keygate-signed-rot "${CONNS%% *}" 3 "$WORK/warm-signed-rot2.txt"; fi

mkdir -p "$(dirname "$OUT")"
RAW=$WORK/raw.tsv
: >"$RAW"
: >"$WORK/stolen.tsv"
for n in $CONNS; do
  for r in $(seq "$REPS"); do
    for c in $CONTENDERS; do
      pids=$(contender_pids "$c")
      for attempt in 1 2 3; do
        run_wrk "$c" "$n" "$WARM" "$WORK/warm-$c-$n-$r.txt"
        cap=
        if [ "$CAPTURE" = 1 ] && [ "$r" = 1 ] && [ -n "$(contender_port "$c")" ]; then
          cap=$WORK/capture-$c-$n.pcap
          start_capture "$c" "$cap"
        fi
        t0=$(cpu_ticks "$pids")
        s0=$(core_ticks)
        l0=$(core_ticks "$LOAD_CPU")
        w0=$(switches)
        run_wrk "$c" "$n" "$DURATION" "$WORK/run-$c-$n-$r.txt"
        w1=$(switches)
        t1=$(cpu_ticks "$pids")
        s1=$(core_ticks)
        l1=$(core_ticks "$LOAD_CPU")
        if [ -n "$cap" ]; then wait "$cap_pid"; fi
        core=$(python3 -c "import sys; a, b = [list(map(int, x.split())) for x in sys.argv[1:]]; print(' '.join(str(y - x) for x, y in zip(a, b)))" "$s0" "$s1")
        load=$(python3 -c "import sys; a, b = [list(map(int, x.split())) for x in sys.argv[1:]]; print(b[0] - a[0])" "$l0" "$l1")
        # A run during which the hypervisor took more than STEAL_MAX % of the contender's
        # core measured the machine, not the contender: it is run again (twice at most), and
        # the report counts it.
        stolen=$(( ${core#* } * 100 / (DURATION * $(getconf CLK_TCK)) ))
        if [ "$stolen" -le "$STEAL_MAX" ] || [ "$attempt" = 3 ]; then break; fi
        echo "  c$n rep $r $c: ${stolen} % stolen, run again" >&2
        printf '%s\t%s\n' "$c" "$n" >>"$WORK/stolen.tsv"
      done
      woken="$((${w1% *} - ${w0% *})) $((${w1#* } - ${w0#* }))"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$n" "$r" "$((t1 - t0))" "$WORK/run-$c-$n-$r.txt" "$core" "$load" "$woken" >>"$RAW"
      echo "  c$n rep $r $c: $(grep -m1 'Requests/sec' "$WORK/run-$c-$n-$r.txt" || echo failed)" >&2
    done
  done
done
SHIELD_NOTE=
if [ "$SHIELD" = 1 ]; then
  SHIELD_NOTE="SHIELD=1: every other task that could run on CPU $PROXY_CPU was moved to CPU $LOAD_CPU for the run ($(wc -l <"$SHIELDED") tasks)."
fi
INSTANCE_ENV_NOTE=
if [ -n "${INSTANCE_ENV:-}" ]; then
  INSTANCE_ENV_NOTE="Every keygate instance ran with \`$INSTANCE_ENV\` added to its environment (INSTANCE_ENV)."
fi
if [ -n "${COALESCE_US:-}" ]; then
  INSTANCE_ENV_NOTE="${INSTANCE_ENV_NOTE:+$INSTANCE_ENV_NOTE }Every keygate instance but the busy-polling one ran with \`[server] event_coalesce_us = $COALESCE_US\` (COALESCE_US)."
fi
if [ -n "${BASELINE:-}" ] && [ -n "${BASE_COALESCE_US:-}" ]; then
  INSTANCE_ENV_NOTE="${INSTANCE_ENV_NOTE:+$INSTANCE_ENV_NOTE }The baseline instance (base…) ran with \`[server] event_coalesce_us = $BASE_COALESCE_US\` (BASE_COALESCE_US)."
fi
export IDLE_FRESH WARM STEAL_MAX TLS_NOTE CAPTURE_SECS CAPTURE_WINDOW_MS SHIELD_NOTE INSTANCE_ENV_NOTE LOAD_CPU
# ---- new TLS connections at fixed rates (open loop) ---------------------------------------
OPEN_RAW=$WORK/open-tls.tsv
: >"$OPEN_RAW"
if [ -n "$TLS_OPEN_RATES" ]; then
  k=0
  for rate in $TLS_OPEN_RATES; do
    for r in $(seq "$REPS"); do
      order="nginx-keyauth-tls-new keygate-tls-new"
      [ $(((k + r) % 2)) = 0 ] && order="keygate-tls-new nginx-keyauth-tls-new"
      for c in $order; do
        case $c in
          keygate-tls-new) port=$KGT_PORT key=$(head -n1 "$WORK/tls-key1.txt") ;;
          *) port=$NG_AUTH_TLS_PORT key=$KEY ;;
        esac
        pids=$(contender_pids "$c")
        out=$WORK/open-tls-$c-$rate-$r.txt
        # A run that fails (a refused or reset connection, answers missing) is reported as
        # failed in the table, with what it printed, and the phase goes on.
        taskset -c "$LOAD_CPU" "$OPEN_LOOP_TLS" "127.0.0.1:$port" "$rate" "$WARM" "$WORK/tls.crt" "X-API-Key: $key" >"$out" 2>&1 \
          || echo "loadtest: open_loop_tls's warm-up against $c at $rate/s failed: $(tr '\n' ' ' <"$out")" >&2
        t0=$(cpu_ticks "$pids")
        read -r _ st0 < <(core_ticks)
        taskset -c "$LOAD_CPU" "$OPEN_LOOP_TLS" "127.0.0.1:$port" "$rate" "$DURATION" "$WORK/tls.crt" "X-API-Key: $key" >"$out" 2>&1 \
          || echo "FAILED (exit $?)" >>"$out"
        read -r _ st1 < <(core_ticks)
        # The contender's CPU ticks, then the ticks of its core the hypervisor stole.
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$rate" "$r" "$(($(cpu_ticks "$pids") - t0))" "$((st1 - st0))" "$(tr '\n' ' ' <"$out")" >>"$OPEN_RAW"
        echo "  open loop $c $rate/s #$r: $(tr '\n' ' ' <"$out")" >&2
      done
    done
    k=$((k + 1))
  done
fi

# keygate's memory after the phases above (the idle phase below may start it again).
PEAK_RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$KG_PID/status")
RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$KG_PID/status")
# ---- idle connections --------------------------------------------------------------------
# keygate and nginx-keyauth in turn: wrk at the first connection count ($REPS runs), then
# $IDLE keep-alive connections opened (one request answered on each, then silent) and held
# while wrk runs again ($REPS runs), RSS of every process of the contender before and while
# held; then the connections are closed and wrk runs a third time ($REPS runs). One table
# appended to the report.
rss_kb() {
  local t=0
  for p in $1; do
    [ -r "/proc/$p/status" ] || continue
    t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status")))
  done
  echo "$t"
}
# IDLE_FRESH=1: the contender is stopped and started again first (same configuration, ports
# and store), so that what the idle connections add is measured from a new process's memory,
# not from the high-water mark the phases before left (the allocator keeps what it freed).
restart_contender() {
  case $1 in
    keygate)
      kill "$KG_PID"
      wait "$KG_PID" 2>/dev/null || true
      launch_keygate "$KEYGATE" "$KG_PORT" "$WORK"
      KG_PID=$STARTED_PID
      ;;
    nginx-keyauth)
      kill "${MASTER[nginx-keyauth]}"
      wait "${MASTER[nginx-keyauth]}" 2>/dev/null || true
      start_nginx nginx-keyauth "$PROXY_CPU"
      wait_port "$NG_AUTH_PORT" nginx-keyauth
      ;;
  esac
}
IDLE_RAW=$WORK/idle.tsv
: >"$IDLE_RAW"
# With CAPTURE_PLAIN=1: the first run without and the first with the idle connections, on the
# wire (the server's time per request, as for the keep-alive contenders).
idle_capture() { # contender, phase, repetition
  cap_pid=
  if [ "$CAPTURE" = 1 ] && [ "$CAPTURE_PLAIN" = 1 ] && [ "$3" = 1 ]; then
    start_capture "$1" "$WORK/capture-idle-$2-$1-${CONNS%% *}.pcap"
  fi
}
idle_captured() {
  if [ -n "$cap_pid" ]; then wait "$cap_pid"; fi
}
if [ "$IDLE" -gt 0 ]; then
  n=${CONNS%% *}
  for c in keygate nginx-keyauth; do
    case $c in keygate) port=$KG_PORT ;; nginx-keyauth) port=$NG_AUTH_PORT ;; esac
    if [ "$IDLE_FRESH" = 1 ]; then restart_contender "$c"; fi
    pids=$(contender_pids "$c")
    for r in $(seq "$REPS"); do
      run_wrk "$c" "$n" "$WARM" /dev/null
      idle_capture "$c" without "$r"
      run_wrk "$c" "$n" "$DURATION" "$WORK/idle-$c-without-$r.txt"
      idle_captured
    done
    before=$(rss_kb "$pids")
    rm -f "$WORK/idle-ready"
    mkfifo "$WORK/idle-hold"
    taskset -c "$LOAD_CPU" python3 scripts/idle_hold.py "$port" "$IDLE" "$KEY" "$WORK/idle-ready" \
      <"$WORK/idle-hold" >"$WORK/idle-$c-client.txt" 2>&1 &
    holder=$!
    PIDS+=($holder)
    exec {hold}>"$WORK/idle-hold"
    for _ in $(seq 900); do [ -s "$WORK/idle-ready" ] && break; sleep 0.1; done
    sleep 1
    held=$(rss_kb "$pids")
    for r in $(seq "$REPS"); do
      run_wrk "$c" "$n" "$WARM" /dev/null
      idle_capture "$c" with "$r"
      run_wrk "$c" "$n" "$DURATION" "$WORK/idle-$c-with-$r.txt"
      idle_captured
    done
    exec {hold}>&-
    wait "$holder" || true
    rm -f "$WORK/idle-hold"
    # And again once they are closed: a p99 that stays up after them came with the time, not
    # with the idle connections.
    sleep 1
    for r in $(seq "$REPS"); do
      run_wrk "$c" "$n" "$WARM" /dev/null
      run_wrk "$c" "$n" "$DURATION" "$WORK/idle-$c-after-$r.txt"
    done
    # IDLE_ELSEWHERE=1: a fourth time while as many idle connections are held by a process
    # that is neither contender (scripts/idle_pairs.py, both ends its own): how much of the
    # slowdown while held the machine puts on any server.
    if [ "$IDLE_ELSEWHERE" = 1 ]; then
      pairs=$(( ($(ulimit -n) - 64) / 2 ))
      [ "$pairs" -gt "$IDLE" ] && pairs=$IDLE
      rm -f "$WORK/idle-pairs"
      taskset -c "$LOAD_CPU" python3 scripts/idle_pairs.py "$pairs" "$WORK/idle-pairs" &
      pairs_pid=$!
      PIDS+=($pairs_pid)
      for _ in $(seq 900); do [ -s "$WORK/idle-pairs" ] && break; sleep 0.1; done
      sleep 1
      for r in $(seq "$REPS"); do
        run_wrk "$c" "$n" "$WARM" /dev/null
        run_wrk "$c" "$n" "$DURATION" "$WORK/idle-$c-elsewhere-$r.txt"
      done
      echo "$pairs" >"$WORK/idle-elsewhere-pairs"
      rm -f "$WORK/idle-pairs"
      wait "$pairs_pid" || true
      sleep 1
    fi
    printf '%s\t%s\t%s\t%s\n' "$c" "$before" "$held" "$(cat "$WORK/idle-$c-client.txt")" >>"$IDLE_RAW"
    echo "  idle $c: RSS $before kB -> $held kB; $(cat "$WORK/idle-$c-client.txt")" >&2
  done
fi
# IDLE_TWINS=1 (the default, with IDLE): scripts/idletwins.sh on this run's directory, the
# holder of $IDLE idle connections against a twin holding none, alternated round by round.
if [ "$IDLE" -gt 0 ] && [ "$IDLE_TWINS" = 1 ]; then
  echo "idle connections against a twin (scripts/idletwins.sh)…" >&2
  WORK=$WORK KEYGATE_BIN=$KEYGATE IDLE=$IDLE ROUNDS=$REPS SECS=$DURATION WARM=$WARM CONNS=${CONNS%% *} \
    PROXY_CPU=$PROXY_CPU LOAD_CPU=$LOAD_CPU CONTENDERS="keygate nginx-keyauth" bash scripts/idletwins.sh >"$WORK/idletwins.txt" 2>&1 \
    || echo "loadtest: scripts/idletwins.sh failed: $(tail -n 3 "$WORK/idletwins.txt" | tr '\n' ' ')" >&2
fi

CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$RAW" "$(getconf CLK_TCK)" "$PEAK_RSS_KB" "$RSS_KB" "$KEYS" "$REPS" "$DURATION" \
  "$(nproc --all)" "$CPU_MODEL" "$(uname -r)" "$LOADAVG" "$CONTENDERS" >"$OUT" <<'EOF'
import os, re, statistics, sys
raw, hz, peak_kb, rss_kb, keys, reps, dur, nproc, cpu, kernel, load, order = sys.argv[1:13]
hz = int(hz); order = order.split()
load_cpu = os.environ.get("LOAD_CPU", "1")

def us(v):
    m = re.match(r"([\d.]+)(us|ms|s)$", v)
    x = float(m.group(1))
    return x * {"us": 1, "ms": 1000, "s": 1e6}[m.group(2)]

def pids_known(c): return c != "direct"

rows = {}
impossible = []
for line in open(raw):
    c, n, r, ticks, path, core, load_ticks, woken = line.rstrip("\n").split("\t")
    switched, ipis = map(int, woken.split())
    busy, steal = map(int, core.split())
    t = open(path).read()
    m = re.search(r"Requests/sec:\s+([\d.]+)", t)
    total = re.search(r"(\d+) requests in", t)
    p50 = re.search(r"^\s+50%\s+(\S+)", t, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", t, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
    rec = rows.setdefault((c, int(n)), {"rps": [], "p50": [], "p99": [], "cpu": [], "bad": 0, "err": 0, "reps": [], "switched": [], "ipis": []})
    if not (m and total and p50 and p99):
        rec["err"] += 1
        continue
    rec["rps"].append(float(m.group(1)))
    rec["p50"].append(us(p50.group(1)))
    rec["p99"].append(us(p99.group(1)))
    reqs = int(total.group(1))
    if int(ticks) > 0 and reqs:
        rec["cpu"].append(int(ticks) / hz / reqs * 1e6)
    if reqs:
        rec["switched"].append(switched / reqs)
        rec["ipis"].append(ipis / reqs)
    # Per repetition: CPU time on the contender's core outside its processes, and steal.
    rec["reps"].append((int(r), float(m.group(1)), us(p99.group(1)), (busy - int(ticks)) / hz / float(dur) * 100 if pids_known(c) else None, steal / hz / float(dur) * 100, int(load_ticks) / hz / float(dur) * 100))
    rec["bad"] += int(non2xx.group(1)) if non2xx else 0
    rec["err"] += sum(int(x) for x in errs.groups()) if errs else 0
    # Little's law: n closed-loop connections (wrk, one request each at a time) hold at most n
    # requests in flight, so mean latency × rate cannot exceed n. A repetition above it (10 %
    # of rounding allowed) recorded latencies that no server behaviour can produce.
    mean = re.search(r"^\s+Latency\s+(\S+)", t, re.M)
    if mean and not c.endswith(("-h2c", "-h2")):
        held = us(mean.group(1)) / 1e6 * float(m.group(1))
        if held > 1.1 * int(n):
            impossible.append((c, int(n), int(r), held))

def med(xs): return statistics.median(xs) if xs else float("nan")

# The nginx-keyauth of a contender's variant: rotating keys against nginx-keyauth-rot, TLS and
# HTTP/2 against nginx-keyauth's listener of the same kind, everything else nginx-keyauth.
VARIANT_OF = {
    "keygate-rot": "nginx-keyauth-rot", "base-rot": "nginx-keyauth-rot",
    "keygate-signed-rot": "nginx-keyauth-rot", "nginx-fwdauth-rot": "nginx-keyauth-rot",
    "keygate-tls": "nginx-keyauth-tls", "keygate-tls-new": "nginx-keyauth-tls-new",
    "keygate-tls-new-busy": "nginx-keyauth-tls-new", "keygate-h2c": "nginx-keyauth-h2c",
    "keygate-h2": "nginx-keyauth-h2", "base-h2c": "nginx-keyauth-h2c",
}
def counterpart(c):
    return c if c.startswith("nginx-keyauth") else VARIANT_OF.get(c, "nginx-keyauth")
def rng(xs, f): return f"{f(min(xs))}–{f(max(xs))}" if xs else "–"
k = lambda x: f"{x:,.0f}"

print(f"Machine: {nproc} CPUs, {cpu}, Linux {kernel}; load average at the end {load}.  ")
import os
print(f"{reps} × {dur} s per contender and connection count (each after {os.environ.get('WARM', '2')} s of the same load, unmeasured), interleaved; medians (min–max).  ")
print(f"keygate peak RSS (VmHWM) {int(peak_kb)/1024:.1f} MiB, RSS at the end {int(rss_kb)/1024:.1f} MiB, with {keys} keys cached.  ")
stolen = [l.split() for l in open(raw.replace("raw.tsv", "stolen.tsv"))]
if os.environ.get("TLS_NOTE"):
    print(os.environ["TLS_NOTE"] + "  ")
if os.environ.get("SHIELD_NOTE"):
    print(os.environ["SHIELD_NOTE"] + "  ")
if os.environ.get("INSTANCE_ENV_NOTE"):
    print(os.environ["INSTANCE_ENV_NOTE"] + "  ")
print(f"Runs repeated because over {os.environ.get('STEAL_MAX', '2')} % of the contender's core was stolen by the hypervisor: "
      + (", ".join(f"{c} c{n}" for c, n in stolen) if stolen else "none") + ".")
print()
print("Repetitions whose latencies no closed loop can produce (mean latency × req/s above 1.1 × the connections wrk holds; "
      "their figures stay in the medians): "
      + ("; ".join(f"{c} c{n} rep {r}, {held:,.0f} requests in flight on {n} connections" for c, n, r, held in impossible)
         if impossible else "none") + ".")
print()
for n in sorted({n for _, n in rows}):
    base_plain = med(rows.get(("nginx-plain", n), {}).get("rps", []))
    base_auth = med(rows.get(("nginx-keyauth", n), {}).get("rps", []))
    print(f"### c{n}")
    print()
    print("\"vs nginx-keyauth\": against the nginx-keyauth of the same variant (-rot, -tls, -tls-new, -h2c, -h2).")
    print()
    print("| contender | req/s | p50 µs | p99 µs | CPU µs/req | vs nginx-plain | vs nginx-keyauth | p99 vs nginx-keyauth | CPU vs nginx-keyauth | non-2xx | socket errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in order:
        r = rows.get((c, n))
        if not r:
            continue
        rps = med(r["rps"])
        ref = rows.get((counterpart(c), n), {})
        cpu_us = f"{med(r['cpu']):.2f}" if r["cpu"] else "–"
        cpu_vs = f"{med(r['cpu']) / med(ref['cpu']):.2f}" if r["cpu"] and ref.get("cpu") else "–"
        print(f"| {c} | {k(rps)} ({rng(r['rps'], k)}) | {med(r['p50']):,.0f} | {med(r['p99']):,.0f} ({rng(r['p99'], k)}) | "
              f"{cpu_us} | {rps / base_plain:.2f} | {rps / med(ref.get('rps', [])):.2f} | "
              f"{med(r['p99']) / med(ref.get('p99', [])):.2f} | {cpu_vs} | {r['bad']} | {r['err']} |")
    fa = med(rows.get(("nginx-fwdauth", n), {}).get("rps", []))
    if fa == fa and base_auth == base_auth:
        print()
        print(f"nginx + auth_request → keygate verify vs nginx-keyauth: {fa / base_auth:.2f}× req/s "
              f"(target ≥ 0.5×).")
    one = med(rows.get(("keygate", n), {}).get("rps", []))
    rot = med(rows.get(("keygate-rot", n), {}).get("rps", []))
    if one == one and rot == rot:
        print()
        print(f"keygate with {keys} rotating keys vs one key: {rot / one:.2f}×.")
    print()
    print("Every repetition (req/s, p99 µs; % of the contender's core busy outside it, % stolen by the hypervisor; % of the load core (wrk, upstream) busy):")
    print()
    for c in order:
        r = rows.get((c, n))
        if not r:
            continue
        cells = [f"{q:,.0f} / {p:,.0f}" + (f" ({o:.0f} % other, {st:.0f} % steal" if o is not None else f" ({st:.0f} % steal")
                 + f"; load {ld:.0f} %)"
                 for _, q, p, o, st, ld in sorted(r["reps"])]
        print(f"- {c}: " + "; ".join(cells))
    print()
    print("The load core woken from the other and the machine's context switches, per request (median of the repetitions; scripts/wakeups.py):")
    print()
    for c in order:
        r = rows.get((c, n))
        if r and r["switched"]:
            print(f"- {c}: {med(r['ipis']):.3f} interrupts received by CPU {load_cpu}, {med(r['switched']):.3f} context switches")
    # p99 against the variant's nginx-keyauth in each round (repetition r of both).
    lines = []
    for c in order:
        ref = counterpart(c)
        r, q = rows.get((c, n)), rows.get((ref, n))
        if c == ref or not r or not q:
            continue
        theirs = {rep: p for rep, _, p, *_ in q["reps"]}
        pairs = [(p, theirs[rep]) for rep, _, p, *_ in sorted(r["reps"]) if rep in theirs]
        if pairs:
            ok = sum(1 for a, b in pairs if a <= b)
            lines.append(f"- {c} against {ref}: " + ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in pairs)
                         + f" ({ok} of {len(pairs)} at or below)")
    if lines:
        print()
        print("p99 µs in each round, against the variant's nginx-keyauth:")
        print()
        print("\n".join(lines))
    for now, before in (("keygate", "base"), ("keygate-rot", "base-rot"), ("keygate-jwt", "base-jwt"),
                        ("keygate-h2c", "base-h2c")):
        a, b = rows.get((now, n)), rows.get((before, n))
        if a and b and a["rps"] and b["rps"]:
            print()
            print(f"{now} vs {before} (the baseline binary): req/s {med(a['rps']) / med(b['rps']):.3f}×, "
                  f"p99 {med(a['p99']) / med(b['p99']):.3f}×.")
    print()
EOF
if ls "$WORK"/capture-*.pcap >/dev/null 2>&1; then
  for f in "$WORK"/capture-*.pcap; do
    tcpdump -r "$f" -n -tt -S 2>/dev/null >"${f%.pcap}.txt" || true
  done
  python3 - "$WORK" "$CONTENDERS" >>"$OUT" <<'PY'
import glob, os, re, statistics, sys
from collections import Counter
work, order = sys.argv[1], sys.argv[2].split()
pat = re.compile(r"^(\d+\.\d+) IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+): Flags \[([^\]]*)\].*length (\d+)")
def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else float("nan")
def captures(tls):
    """(connections, contender, packets, server port) of every capture of the -tls-new
    contenders (tls) or of the others, in the report's order."""
    files = glob.glob(f"{work}/capture-*.txt")
    # The idle phase's: its first run without and with the idle connections held.
    idle = [f"idle-{ph}-{c}" for c in ("keygate", "nginx-keyauth") for ph in ("without", "with")]
    for n in sorted({int(re.search(r"-(\d+)\.txt$", f).group(1)) for f in files}):
        for c in order + idle:
            path = f"{work}/capture-{c}-{n}.txt"
            if ("-tls-new" in c) != tls or not os.path.exists(path):
                continue
            rows = [m.groups() for m in map(pat.match, open(path)) if m]
            ports = Counter(x for r in rows for x in r[1:3])
            if ports:
                yield n, c, rows, ports.most_common(1)[0][0]
tls = any("-tls-new" in os.path.basename(f) for f in glob.glob(f"{work}/capture-*.txt"))
if tls:
    print("### TLS, a new connection per request: on the wire")
    print()
    print(f"{os.environ.get('CAPTURE_SECS', '1')} s of loopback traffic per contender (tcpdump, first repetition), per connection: the "
          "server's handshake flight after the ClientHello, its response after the request, and the "
          "client's close_notify after that response (the time the client took to read it). "
          "p50 / p99 in ms; connections seen whole in the capture.")
    print()
    print("| connections | contender | SYN → ClientHello (client) | ClientHello → flight (server) | request → response (server) | response → client's close_notify (client) | whole |")
    print("|---|---|---|---|---|---|---|")
    for n, c, rows, srv in captures(tls=True):
        # One list per connection: a client port's SYN starts a new one (ports are reused).
        current, flows = {}, []
        for t, a, b, fl, ln in rows:
            side, peer = ("S", b) if a == srv else ("C", a)
            if side == "C" and fl == "S":
                current[peer] = []
                flows.append(current[peer])
            if peer in current:
                current[peer].append((float(t), side, fl, int(ln)))
        syn_ch, hs, rr, pick, whole = [], [], [], [], 0
        for ev in flows:
            if not ev or ev[0][1] != "C" or "S" not in ev[0][2]:
                continue
            cd = [e for e in ev if e[1] == "C" and e[3] > 0]
            sd = [e for e in ev if e[1] == "S" and e[3] > 0]
            if len(cd) < 3 or len(sd) < 2:
                continue
            req = cd[2]
            after = [e for e in sd if e[0] >= req[0]]
            if not after:
                continue
            resp = after[-2] if len(after) >= 2 and after[-1][3] == 24 else after[-1]
            flight = next((e for e in sd if e[0] >= cd[0][0]), None)
            if flight is None:
                continue
            whole += 1
            syn_ch.append(cd[0][0] - ev[0][0])
            hs.append(flight[0] - cd[0][0])
            rr.append(resp[0] - req[0])
            closing = [e for e in cd if e[0] > resp[0]]
            if closing:
                pick.append(closing[0][0] - resp[0])
        f = lambda xs: f"{q(xs, 0.5):.2f} / {q(xs, 0.99):.2f}"
        print(f"| c{n} | {c} | {f(syn_ch)} | {f(hs)} | {f(rr)} | {f(pick)} | {whole:,} |")
    print()
if not any("-tls-new" not in os.path.basename(f) for f in glob.glob(f"{work}/capture-*.txt")):
    sys.exit()
print("### Keep-alive requests on the wire")
print()
print(f"{os.environ.get('CAPTURE_SECS', '1')} s of loopback traffic per contender (tcpdump, first repetition; its packets, not wrk's "
      "timer): per request, the server's time from the request's first packet to the "
      "response's (µs), and wrk's latency of that repetition. idle-without-X / idle-with-X: "
      "X's first run of the idle phase without and with the idle connections held.")
print()
print("| connections | contender | requests seen | server p50 | server p90 | server p99 | server p99.9 | wrk p50 | wrk p99 |")
print("|---|---|---|---|---|---|---|---|---|")
def wrk_q(c, n, label):
    m = re.match(r"idle-(without|with)-(.+)$", c)
    path = f"{work}/idle-{m.group(2)}-{m.group(1)}-1.txt" if m else f"{work}/run-{c}-{n}-1.txt"
    try:
        t = open(path).read()
    except OSError:
        return "–"
    m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)$", t, re.M)
    return f"{float(m.group(1)) * {'us': 1, 'ms': 1000, 's': 1e6}[m.group(2)]:,.0f}" if m else "–"
window = float(os.environ.get("CAPTURE_WINDOW_MS") or 0) / 1000
windows = []
for n, c, rows, srv in captures(tls=False):
    asked, lat, at = {}, [], []
    for t, a, b, fl, ln in rows:
        if int(ln) == 0:
            continue
        if b == srv:
            asked.setdefault(a, float(t))
        elif b in asked:
            sent = asked.pop(b)
            lat.append(float(t) - sent)
            at.append(sent)
    us = lambda p: f"{q(lat, p) * 1000:,.0f}"
    print(f"| c{n} | {c} | {len(lat):,} | {us(0.5)} | {us(0.9)} | {us(0.99)} | {us(0.999)} | "
          f"{wrk_q(c, n, 50)} | {wrk_q(c, n, 99)} |")
    if window and at:
        start, by = min(at), {}
        for t0, l in zip(at, lat):
            by.setdefault(int((t0 - start) // window), []).append(l)
        cells = (f"{k * window:.1f} s: {len(v):,} / {q(v, 0.5) * 1000:,.0f} / {q(v, 0.99) * 1000:,.0f}"
                 for k, v in sorted(by.items()))
        windows.append(f"- c{n} {c}: " + "; ".join(cells))
print()
if windows:
    print(f"The same requests in windows of {window * 1000:,.0f} ms (from the capture's first "
          "request): requests / server p50 / server p99 (µs).")
    print()
    for line in windows:
        print(line)
    print()
PY
fi
if [ -s "$OPEN_RAW" ]; then
  python3 - "$OPEN_RAW" "$DURATION" "$(getconf CLK_TCK)" >>"$OUT" <<'PY'
import re, statistics, sys
raw, secs, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
runs, failed = {}, {}
for line in open(raw):
    c, rate, rep, ticks, stolen, text = line.rstrip("\n").split("\t", 5)
    m = re.search(r"resumed ([\d.]+) %; latency µs p50 (\d+) p90 (\d+) p99 (\d+) p99\.9 (\d+).*"
                  r"start lag µs median (\d+), 99th percentile (\d+)", text)
    if not m or "FAILED" in text:
        failed.setdefault((int(rate), c), []).append(f"run {rep}: {text.strip()}")
        continue
    cpu = int(ticks) * 1e6 / hz / (int(rate) * secs)
    steal = 100 * int(stolen) / (hz * secs)
    # resumed, p50, p90, p99, p99.9, CPU, start lag p99, % of the core stolen
    runs.setdefault((int(rate), c), []).append(
        [float(m[1])] + [int(x) for x in m.groups()[1:5]] + [cpu, int(m[7]), steal])
print("### A new TLS connection per request at fixed rates (open loop, `examples/open_loop_tls`)")
print()
print("Each connection timed from when it was due to its answer's last byte: TCP and TLS handshakes, "
      "the request and the answer (wrk's latency above starts after the handshake). Medians of the runs; "
      "CPU: the contender's user + system time over the run per connection; start lag: how late the "
      "client started a connection (p99; when it nears the latency, the client is the bound, not the server); "
      "steal: the most of the contender's core the hypervisor took in one run.")
print()
print("| rate (conn/s) | contender | runs | p50 µs | p90 µs | p99 µs | p99.9 µs | CPU µs/conn | resumed | start lag p99 µs | steal | p99 of each run | failed runs |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for key in sorted(set(runs) | set(failed)):
    rate, c = key
    v, f = runs.get(key, []), failed.get(key, [])
    if v:
        med = [statistics.median(x[i] for x in v) for i in range(7)]
        cells = " | ".join(f"{m:,.0f}" for m in med[1:5]) + f" | {med[5]:,.1f} | {med[0]:.1f} % | {med[6]:,.0f} | " \
            + f"{max(x[7] for x in v):.0f} % | " + ", ".join(f"{x[3]:,}" for x in v)
    else:
        cells = " | ".join("–" for _ in range(9))
    print(f"| {rate:,} | {c} | {len(v)} | {cells} | {len(f)} |")
print()
for rate in sorted({r for r, _ in runs}):
    k, n = runs.get((rate, "keygate-tls-new")), runs.get((rate, "nginx-keyauth-tls-new"))
    if k and n:
        pk, pn = statistics.median(x[3] for x in k), statistics.median(x[3] for x in n)
        cpu = statistics.median(x[5] for x in k) / statistics.median(x[5] for x in n)
        if len(k) == len(n):
            below = f"{sum(a[3] <= b[3] for a, b in zip(k, n))} of {len(k)} runs at or below"
        else:
            below = "some runs failed: not paired"
        print(f"- {rate:,} conn/s: keygate's p99 {pk / pn:.2f}× nginx-keyauth's ({below}), "
              f"its CPU per connection {cpu:.2f}×.")
for key in sorted(failed):
    for line in failed[key]:
        print(f"- failed, {key[1]} at {key[0]:,} conn/s, {line}")
print()
PY
fi
if [ -s "$IDLE_RAW" ]; then
  python3 - "$IDLE_RAW" "$WORK" "$IDLE" "${CONNS%% *}" >>"$OUT" <<'PY'
import glob, os, re, statistics, sys
raw, work, idle, n = sys.argv[1:5]
def p99(path):
    t = open(path).read()
    m = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)$", t, re.M)
    return float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1e6}[m.group(2)] if m else float("nan")
def rps(path):
    m = re.search(r"Requests/sec:\s+([\d.]+)", open(path).read())
    return float(m.group(1)) if m else float("nan")
rows = [l.rstrip("\n").split("\t") for l in open(raw)]
print(f"### {int(idle):,} idle keep-alive connections held")
print()
fresh = os.environ.get("IDLE_FRESH") == "1"
print(f"wrk at c{n} (medians of the runs) without, while the idle connections are held, and after they are closed; RSS of every process of the contender"
      + (", each contender started again right before (IDLE_FRESH=1)." if fresh else ", each contender as the phases before left it (IDLE_FRESH=0)."))
print()
print("| contender | RSS before | RSS with idle | added per idle connection | req/s without → with → after | p99 µs without → with → after | idle clients |")
print("|---|---|---|---|---|---|---|")
rss, runs, flat = {}, [], []
for c, before, held, client in rows:
    w = sorted(glob.glob(f"{work}/idle-{c}-without-*.txt"))
    h = sorted(glob.glob(f"{work}/idle-{c}-with-*.txt"))
    a = sorted(glob.glob(f"{work}/idle-{c}-after-*.txt"))
    rss[c] = int(held)
    med = lambda f, xs: f"{statistics.median(map(f, xs)):,.0f}" if xs else "–"
    print(f"| {c} | {int(before)/1024:.1f} MiB | {int(held)/1024:.1f} MiB | {(int(held)-int(before))*1024/int(idle):,.0f} B | "
          f"{med(rps, w)} → {med(rps, h)} → {med(rps, a)} | "
          f"{med(p99, w)} → {med(p99, h)} → {med(p99, a)} | {client} |")
    # Less than 64 B per connection: the RSS did not grow with them (the process was at the
    # high-water mark of earlier phases, its freed memory reused), so nothing was measured.
    if (int(held) - int(before)) * 1024 < 64 * int(idle):
        flat.append(c)
    runs.append(f"{c} p99 per run, µs: without {', '.join(f'{p99(x):,.0f}' for x in w)}; "
                f"with {', '.join(f'{p99(x):,.0f}' for x in h)}; after {', '.join(f'{p99(x):,.0f}' for x in a)}.")
print()
for line in runs:
    print(line)
for c in flat:
    print()
    print(f"{c}: its RSS did not grow while the connections were held (memory freed by the earlier "
          f"phases reused): the bytes per idle connection are not measured here; the idle phase "
          f'alone (CONTENDERS="nginx-keyauth keygate") measures them in fresh instances.')
try:
    pairs = int(open(f"{work}/idle-elsewhere-pairs").read())
except OSError:
    pairs = 0
if pairs:
    print()
    print(f"While {pairs:,} idle connections are held by another process (scripts/idle_pairs.py; "
          f"{2 * pairs:,} idle sockets, neither contender's), after the runs above:")
    print()
    for c, *_ in rows:
        e = sorted(glob.glob(f"{work}/idle-{c}-elsewhere-*.txt"))
        w = sorted(glob.glob(f"{work}/idle-{c}-without-*.txt"))
        if e and w:
            pe, pw = statistics.median(map(p99, e)), statistics.median(map(p99, w))
            print(f"- {c}: p99 {pe:,.0f} µs ({pe / pw:.2f}× its p99 without; runs "
                  f"{', '.join(f'{p99(x):,.0f}' for x in e)}), req/s {statistics.median(map(rps, e)):,.0f}")
if "keygate" in rss and "nginx-keyauth" in rss:
    print()
    print(f"keygate RSS with the idle connections vs nginx-keyauth's: {rss['keygate'] / rss['nginx-keyauth']:.2f}× (target ≤ 2×).")
print()
print("Without, with and after are runs one after the other: the host's drift between them and what the machine "
      "does for idle sockets of any process are in those ratios. `WORK=<this run's directory, KEEP_WORK=1> "
      "scripts/idletwins.sh` (the next table, with IDLE_TWINS=1) measures a holder against its twin holding none, alternated in the same minutes.")
print()
PY
fi
# The idle phase's holder against a twin (IDLE_TWINS=1), after its table.
if [ -s "$WORK/idletwins.txt" ]; then
  {
    echo "#### The same against a twin (scripts/idletwins.sh, IDLE_TWINS=1)"
    echo
    echo "Two copies of each contender on CPU $PROXY_CPU, one holding $IDLE idle connections and the other none, wrk (c${CONNS%% *}) alternating between them for $REPS rounds of $DURATION s: the machine's idle sockets and the host's drift fall on both."
    echo
    grep '^|' "$WORK/idletwins.txt"
    echo
  } >>"$OUT"
fi
# The raw wrk/h2load outputs beside the report.
mkdir -p "$OUT.raw"
cp "$RAW" "$WORK"/run-*.txt "$OUT.raw/" 2>/dev/null || true
cp "$WORK"/idle-* "$OUT.raw/" 2>/dev/null || true
cp "$WORK"/open-tls* "$OUT.raw/" 2>/dev/null || true
cp "$WORK"/capture-*.txt "$OUT.raw/" 2>/dev/null || true
cat "$OUT"
