#!/usr/bin/env bash
# How many key lookups a second one Redis primary serves for keygate: the store's lookup on a
# cache miss is one EVALSHA of scripts/prelude.lua + scripts/find_by_hash.lua (see
# src/keys/store/redis/mod.rs). This starts its own redis-server on a free loopback port
# (appendonly on, as docker-compose runs it), stores a real key through `keygate serve` and its
# admin API, then drives that exact script with redis-benchmark.
#
#   scripts/redis_lookups.sh                 # 50 connections, 200 000 lookups, no pipelining
#   CLIENTS=8 REQUESTS=100000 PIPELINE=16 scripts/redis_lookups.sh
#
# KEYGATE_BIN (default target/debug/keygate, built if missing) only loads the key: the figure
# is Redis' own and does not depend on how keygate was built.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS="${CLIENTS:-50}"
REQUESTS="${REQUESTS:-200000}"
PIPELINE="${PIPELINE:-1}"
BIN="${KEYGATE_BIN:-target/debug/keygate}"
[ -x "$BIN" ] || cargo build --quiet --bin keygate

tmp="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

port="$(free_port)"
redis-server --port "$port" --bind 127.0.0.1 --dir "$tmp" --save "" --appendonly yes \
  --appendfsync everysec --logfile "$tmp/redis.log" --daemonize no &
pids+=($!)
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done

admin_port="$(free_port)"
admin_key="bench-admin-key-0123456789"
cat >"$tmp/keygate.toml" <<EOF
[proxy]
listen = "127.0.0.1:$(free_port)"
upstream = "http://127.0.0.1:9"
[admin]
listen = "127.0.0.1:$admin_port"
keys = ["$admin_key"]
[store]
url = "redis://127.0.0.1:$port/0"
[jwt]
secret = "a-benchmark-secret-of-at-least-32-bytes"
[plans.pro]
rate_limit = { per_second = 1000, burst = 1000 }
EOF
"$BIN" serve --config "$tmp/keygate.toml" >"$tmp/keygate.log" 2>&1 &
pids+=($!)
until curl -fsS "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1; do sleep 0.1; done
key="$(curl -fsS -X POST "http://127.0.0.1:$admin_port/v1/clients" \
  -H "x-admin-key: $admin_key" -H 'content-type: application/json' \
  -d '{"client_id":"bench","license":"pro"}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"]["key"])')"
hash="$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)"

dir=src/keys/store/redis/scripts
sha="$(redis-cli -p "$port" SCRIPT LOAD "$(cat "$dir/prelude.lua")
$(cat "$dir/find_by_hash.lua")")"
now="$(date +%s%3N)"
# The script answers the key's record (nil would mean the lookup found nothing).
found="$(redis-cli -p "$port" EVALSHA "$sha" 1 keygate:keys keygate: "$hash" "$now" | head -1)"
[ -n "$found" ] || { echo "the lookup script found no key" >&2; exit 1; }

echo "one redis-server ($(redis-server --version | cut -d' ' -f3)), $(nproc) cores shared with the benchmark client;" \
  "clients=$CLIENTS requests=$REQUESTS pipeline=$PIPELINE"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
redis-benchmark -p "$port" -c "$CLIENTS" -n "$REQUESTS" -P "$PIPELINE" -q \
  EVALSHA "$sha" 1 keygate:keys keygate: "$hash" "$now" |
  tr '\r' '\n' | grep 'requests per second' | sed 's/^.*: \([0-9.]* requests per second.*\)$/key lookups (find_by_hash script): \1/'
