#!/usr/bin/env bash
# Latency at a fixed request rate (open loop): keygate against nginx-keyauth, the contenders'
# order rotated from round to round so that the host's slow spells fall on all of them. Runs on
# a directory kept by scripts/loadtest.sh (KEEP_WORK=1): its upstream, nginx-keyauth and
# keygate configurations, keys and SQLite file.
#
#   WORK=/dev/shm/keygate-loadtest.XXXXXX scripts/openloop.sh
#   WORK=… RATES="5000 20000" ROUNDS=6 CONTENDERS="nginx-keyauth keygate keygate-noflush keygate-pause" scripts/openloop.sh
#
# Contenders:
#   nginx-keyauth    $WORK/nginx-keyauth/nginx.conf (the 10,000-key `map` and `limit_req`)
#   keygate          $WORK/keygate.toml as it is
#   keygate-noflush  the same with `[store] last_used_flush_secs = 86400` (no usage flush in a run)
#   keygate-pause    the same with `[server] event_coalesce_us = $COALESCE_US` (default 50)
#   nginx-keyauth-tls-new, keygate-tls-new
#                    a new TLS connection per request (examples/open_loop_tls): nginx-keyauth's
#                    `ssl` listener; keygate's TLS instance, $WORK/tls/keygate.toml with
#                    $WORK/tls.crt and tls.key. Timed from when the connection was due to the
#                    answer's last byte, the handshake included (wrk starts its clock after it);
#                    CONNS does not apply (as many connections open as the rate and the
#                    latency make).
#
# Layout: the contender alone on CPU $PROXY_CPU (0); examples/open_loop and the upstream on CPU
# $LOAD_CPU (1). $CONNS (64) keep-alive connections, one key ($WORK/key1.txt); each run $SECS s
# (8) after $WARM s (2) of the same load, unmeasured. Output: each run's line, then per rate and
# contender the medians of the rounds (p50, p90, p99, p99.9 in µs; the contender's CPU µs per
# request, its process and children's user + system time over the measured run) and every
# round's p99.
# KEYGATE_BIN (default target/release/keygate), OPEN_LOOP (target/release/examples/open_loop) and
# OPEN_LOOP_TLS (target/release/examples/open_loop_tls) are built when missing. Not part of the
# test suite.
set -euo pipefail

cd "$(dirname "$0")/.."
# wait_port, tree_ticks, kept_ports, keygate_port, positive_ints
. scripts/lib/bench.sh
WORK=${WORK:?"WORK=<a directory kept by KEEP_WORK=1 scripts/loadtest.sh>"}
RATES=${RATES:-20000}
ROUNDS=${ROUNDS:-6}
CONNS=${CONNS:-64}
SECS=${SECS:-8}
WARM=${WARM:-2}
COALESCE_US=${COALESCE_US:-50}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
CONTENDERS=${CONTENDERS:-"nginx-keyauth keygate keygate-noflush keygate-pause"}
KEYGATE_BIN=${KEYGATE_BIN:-target/release/keygate}
OPEN_LOOP=${OPEN_LOOP:-target/release/examples/open_loop}
OPEN_LOOP_TLS=${OPEN_LOOP_TLS:-target/release/examples/open_loop_tls}

for f in keygate.toml key1.txt nginx-keyauth/nginx.conf upstream/nginx.conf; do
  [ -f "$WORK/$f" ] || { echo "openloop: $WORK/$f is missing: WORK must be a directory kept by KEEP_WORK=1 scripts/loadtest.sh" >&2; exit 2; }
done
TLS=
for c in $CONTENDERS; do
  case $c in nginx-keyauth | keygate | keygate-noflush | keygate-pause) ;;
    nginx-keyauth-tls-new | keygate-tls-new) TLS=1 ;;
    *) echo "openloop: unknown contender '$c'" >&2; exit 2 ;;
  esac
done
if [ -n "$TLS" ]; then
  for f in tls.crt tls.key tls-key1.txt tls/keygate.toml; do
    [ -f "$WORK/$f" ] || { echo "openloop: $WORK/$f is missing: a directory kept by a KEEP_WORK=1 run with a TLS contender" >&2; exit 2; }
  done
fi
case $COALESCE_US in '' | *[!0-9]*) echo "openloop: COALESCE_US must be a number of microseconds" >&2; exit 2 ;; esac
for v in "SECS=$SECS" "WARM=$WARM"; do
  case ${v#*=} in '' | *[!0-9]* | 0 | 1) echo "openloop: $v: at least 2 seconds (open_loop does not count the first)" >&2; exit 2 ;; esac
done
[ -n "${RATES// /}" ] && [ -n "${CONTENDERS// /}" ] || { echo "openloop: RATES and CONTENDERS must name at least one" >&2; exit 2; }
positive_ints openloop "CONNS=$CONNS" $(for r in $RATES; do echo "RATES=$r"; done)
[ -x "$KEYGATE_BIN" ] || cargo build --release --bin keygate
[ -x "$OPEN_LOOP" ] || cargo build --release --example open_loop
[ -z "$TLS" ] || [ -x "$OPEN_LOOP_TLS" ] || cargo build --release --example open_loop_tls

kept_ports openloop
KEY=$(head -n1 "$WORK/key1.txt")
if [ -n "$TLS" ]; then
  NG_TLS_PORT=$(grep -m1 -oE 'listen 127\.0\.0\.1:[0-9]+ ssl' "$WORK/nginx-keyauth/nginx.conf" | grep -oE ':[0-9]+' | tr -d ':')
  KGT_PORT=$(keygate_port "$WORK/tls/keygate.toml")
  [ -n "$NG_TLS_PORT" ] && [ -n "$KGT_PORT" ] || { echo "openloop: cannot find the TLS ports in $WORK's configurations" >&2; exit 2; }
  TLS_KEY=$(head -n1 "$WORK/tls-key1.txt")
fi

# The variants' configurations, next to the original.
grep -q '^last_used_flush_secs' "$WORK/keygate.toml" \
  && sed 's/^last_used_flush_secs *=.*/last_used_flush_secs = 86400/' "$WORK/keygate.toml" >"$WORK/openloop-noflush.toml" \
  || sed 's/^\[store\]$/[store]\nlast_used_flush_secs = 86400/' "$WORK/keygate.toml" >"$WORK/openloop-noflush.toml"
grep -q '^event_coalesce_us' "$WORK/keygate.toml" \
  && sed "s/^event_coalesce_us *=.*/event_coalesce_us = $COALESCE_US/" "$WORK/keygate.toml" >"$WORK/openloop-pause.toml" \
  || sed "s/^\[server\]\$/[server]\nevent_coalesce_us = $COALESCE_US/" "$WORK/keygate.toml" >"$WORK/openloop-pause.toml"
grep -q '^last_used_flush_secs = 86400' "$WORK/openloop-noflush.toml" || { echo "openloop: no [store] section in keygate.toml" >&2; exit 2; }
grep -q "^event_coalesce_us = $COALESCE_US" "$WORK/openloop-pause.toml" || { echo "openloop: no [server] section in keygate.toml" >&2; exit 2; }

# Room for the connections of an open loop that falls behind (as scripts/loadtest.sh).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

taskset -c "$LOAD_CPU" nginx -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf" -e "$WORK/upstream/error.log" &
PIDS+=($!)
wait_port "$UP_PORT" upstream

LINES=$(mktemp)
run() { # contender rate
  local c=$1 rate=$2 port pid load
  load=("$OPEN_LOOP")
  case $c in
    nginx-keyauth | nginx-keyauth-tls-new)
      taskset -c "$PROXY_CPU" nginx -p "$WORK/nginx-keyauth" -c "$WORK/nginx-keyauth/nginx.conf" -e "$WORK/nginx-keyauth/error.log" &
      pid=$! port=$NG_PORT
      [ "$c" = nginx-keyauth ] || { port=$NG_TLS_PORT load=(tls "$KEY"); } ;;
    keygate-tls-new)
      KEYGATE_TLS_CERT=$WORK/tls.crt KEYGATE_TLS_KEY=$WORK/tls.key KEYGATE_ADMIN_KEY=${KEYGATE_ADMIN_KEY:-openloop-admin-key-0000} \
        taskset -c "$PROXY_CPU" "$KEYGATE_BIN" serve --config "$WORK/tls/keygate.toml" >"$WORK/openloop-$c.log" 2>&1 &
      pid=$! port=$KGT_PORT load=(tls "$TLS_KEY") ;;
    keygate | keygate-noflush | keygate-pause)
      local toml=$WORK/keygate.toml
      [ "$c" = keygate-noflush ] && toml=$WORK/openloop-noflush.toml
      [ "$c" = keygate-pause ] && toml=$WORK/openloop-pause.toml
      KEYGATE_ADMIN_KEY=${KEYGATE_ADMIN_KEY:-openloop-admin-key-0000} taskset -c "$PROXY_CPU" "$KEYGATE_BIN" serve --config "$toml" >"$WORK/openloop-$c.log" 2>&1 &
      pid=$! port=$KG_PORT ;;
  esac
  PIDS+=("$pid")
  wait_port "$port" "$c"
  local t0 out
  # A load run that fails (an error from the load tool) is printed as FAILED with what the tool
  # said, left out of the table, and the rounds go on.
  if [ "${load[0]}" = tls ]; then
    taskset -c "$LOAD_CPU" "$OPEN_LOOP_TLS" "127.0.0.1:$port" "$rate" "$WARM" "$WORK/tls.crt" "X-API-Key: ${load[1]}" >/dev/null 2>&1 || true
    t0=$(tree_ticks "$pid")
    out=$(taskset -c "$LOAD_CPU" "$OPEN_LOOP_TLS" "127.0.0.1:$port" "$rate" "$SECS" "$WORK/tls.crt" "X-API-Key: ${load[1]}" 2>&1) \
      || out="FAILED: $(echo "$out" | tr '\n' ' ')"
  else
    taskset -c "$LOAD_CPU" "$OPEN_LOOP" "127.0.0.1:$port" "$rate" "$CONNS" "$WARM" "X-API-Key: $KEY" >/dev/null 2>&1 || true
    t0=$(tree_ticks "$pid")
    out=$(taskset -c "$LOAD_CPU" "$OPEN_LOOP" "127.0.0.1:$port" "$rate" "$CONNS" "$SECS" "X-API-Key: $KEY" 2>&1) \
      || out="FAILED: $(echo "$out" | tr '\n' ' ')"
  fi
  # The contender's CPU per request over the measured run (the first second included).
  echo "$c $rate: $out; contender CPU µs per request $(awk -v t="$(($(tree_ticks "$pid") - t0))" -v hz="$(getconf CLK_TCK)" \
    -v n="$((rate * SECS))" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')" | tee -a "$LINES"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  sleep 0.5
}

read -r -a ORDER <<<"$CONTENDERS"
n=${#ORDER[@]}
for r in $(seq 1 "$ROUNDS"); do
  for rate in $RATES; do
    for k in $(seq 0 $((n - 1))); do
      run "${ORDER[$(((k + r) % n))]}" "$rate"
    done
  done
done

echo
python3 - "$LINES" <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r'(\S+) (\d+): .*p50 (\d+) p90 (\d+) p99 (\d+) p99\.9 (\d+).*CPU µs per request ([\d.]+)', line)
    if m and "FAILED" not in line:
        runs.setdefault((int(m[2]), m[1]), []).append([float(x) for x in m.groups()[2:]])
print("| rate (req/s) | contender | rounds | p50 | p90 | p99 | p99.9 | CPU µs/req | p99 of each round |")
print("|---|---|---|---|---|---|---|---|---|")
for (rate, c), v in sorted(runs.items()):
    med = [statistics.median(x[i] for x in v) for i in range(5)]
    print(f"| {rate:,} | {c} | {len(v)} | " + " | ".join(f"{m:,.0f}" for m in med[:4])
          + f" | {med[4]:,.1f} | " + ", ".join(f"{x[2]:,.0f}" for x in v) + " |")
PY
rm -f "$LINES"
