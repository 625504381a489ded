#!/usr/bin/env bash
# The key-import figure: N (default 1 000 000) SHA-256 hashes, as JSON lines, imported with
# `keygate key import` into a fresh SQLite store through the admin API of a `keygate serve` on
# free loopback ports. Prints the wall time, the rate, the peak memory of the importing command
# and the machine's load. Not part of the test suite.
#
# Usage: scripts/import-bench.sh [N] [BINARY, default target/release/keygate]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000000}"
bin="${2:-target/release/keygate}"
[ -x "$bin" ] || { echo "no $bin: cargo build --release first (or pass a binary)"; exit 2; }
work=target/tmp/import-bench
mkdir -p "$work"
file="$work/keys-$n.jsonl"
if [ ! -s "$file" ]; then
  echo "writing $file"
  python3 - "$n" "$file" <<'PY'
import hashlib, sys
n, path = int(sys.argv[1]), sys.argv[2]
with open(path, "w") as f:
    for i in range(n):
        h = hashlib.sha256(b"bench-key-%d" % i).hexdigest()
        f.write('{"client_id":"bench-%d","name":"migrated-%d","sha256":"%s"}\n' % (i % 1000, i, h))
PY
fi
db="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$db"
}
trap cleanup EXIT
admin_key="import-bench-admin-key-0123456789"
cat >"$db/keygate.toml" <<TOML
[proxy]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:9"
[admin]
listen = "127.0.0.1:0"
[store]
url = "sqlite://$db/keygate.db"
[keys]
max_per_client = 0
[plans.free]
rate_limit = { per_minute = 60, burst = 10 }
[log]
format = "json"
access_log = false
TOML
KEYGATE_ADMIN_KEY="$admin_key" "$bin" serve --config "$db/keygate.toml" >"$db/serve.log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q 'keygate listening' "$db/serve.log" && break; sleep 0.1; done
admin=$(grep -o '"admin":"[^"]*"' "$db/serve.log" | cut -d'"' -f4)
export KEYGATE_ADMIN_URL="http://$admin" KEYGATE_ADMIN_KEY="$admin_key"
for i in $(seq 0 999); do "$bin" client create "bench-$i" --license free --quiet >/dev/null; done
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
start=$(date +%s.%N)
/usr/bin/time -f "import command: peak RSS %M KiB, CPU %U s user %S s sys" \
  "$bin" key import "$file" --on-error abort
end=$(date +%s.%N)
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
ps -o cputime= -p "$pid" | sed 's/^/server CPU time (whole run): /'
python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); n=int(sys.argv[3]); print(f'{n} keys in {s:.1f} s: {n/s:.0f} keys/s')" "$start" "$end" "$n"
