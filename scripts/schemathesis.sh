#!/usr/bin/env bash
# Schemathesis against /openapi.json of a live admin listener (the real binary on free loopback
# ports, SQLite in a temp dir): every check but positive_data_acceptance, all four phases
# (examples, coverage, fuzzing, stateful). Installs schemathesis from PyPI into
# target/schemathesis-venv when it is missing. Fails on any failure, a crash or a panic.
#
# positive_data_acceptance is left out: it expects every schema-valid request to succeed, and
# some rules cannot be written in the schema (expires_at in the future, at most one of
# expires_at / expires_days / never_expire, exactly one rate in a rate limit, a license that
# names a configured plan); those answer 422 by design.
#
# Usage: scripts/schemathesis.sh [MAX_EXAMPLES per operation, default 100] [WALL_CLOCK_SECONDS, default 300]
set -euo pipefail
cd "$(dirname "$0")/.."
max_examples="${1:-100}"
max_seconds="${2:-300}"
venv=target/schemathesis-venv
if ! "$venv/bin/st" --version >/dev/null 2>&1; then
  echo "installing schemathesis into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv" || { echo "python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 1; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4.32,<5'
fi
cargo build --quiet --bin keygate
bin=target/debug/keygate

tmp="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
admin_key="schemathesis-admin-key-0123456789abcdef"
cat >"$tmp/keygate.toml" <<TOML
[proxy]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:9"
[admin]
listen = "127.0.0.1:0"
keys = ["$admin_key"]
[store]
url = "sqlite://$tmp/keygate.db"
[keys]
max_per_client = 0
[rate_limit]
failed_auth = { per_second = 100000, burst = 100000 }
[log]
access_log = false
level = "warn,keygate=info"
TOML
env -u RUST_LOG KEYGATE_LOG_FORMAT=json "$bin" serve --config "$tmp/keygate.toml" >"$tmp/log" 2>&1 &
pid=$!
admin=""
for _ in $(seq 1 200); do
  admin="$(grep -o '"admin":"[^"]*"' "$tmp/log" | head -1 | cut -d'"' -f4 || true)"
  [ -n "$admin" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$tmp/log"; echo "keygate did not start"; exit 1; }
  sleep 0.05
done
[ -n "$admin" ] || { cat "$tmp/log"; echo "keygate did not start"; exit 1; }

report_dir=target/tmp/hostile
mkdir -p "$report_dir"
set +e
# From the temp dir, so schemathesis' cache (.schemathesis/) starts empty and stays out of the tree.
report_abs="$(cd "$report_dir" && pwd)"
st_bin="$(cd "$venv/bin" && pwd)/st"
(cd "$tmp" && timeout --kill-after=10 "$max_seconds" "$st_bin" run "http://$admin/openapi.json" \
  -H "X-ADMIN-KEY: $admin_key" \
  --checks all \
  --exclude-checks positive_data_acceptance \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "$max_examples" \
  --request-timeout 10 \
  --seed 20261123 \
  --workers 1 \
  --no-color \
  --report junit --report-dir "$report_abs/schemathesis" \
  >"$tmp/st.out" 2>&1)
rc=$?
set -e
cat "$tmp/st.out"
if ! kill -0 "$pid" 2>/dev/null; then
  echo "keygate died during schemathesis"; cat "$tmp/log"; exit 1
fi
if grep -q panicked "$tmp/log"; then
  grep panicked "$tmp/log"; echo "keygate panicked during schemathesis"; exit 1
fi
{
  echo "schemathesis $("$venv/bin/st" --version | awk '{print $NF}'), --max-examples $max_examples, --checks all but positive_data_acceptance, phases examples,coverage,fuzzing,stateful, wall-clock cap ${max_seconds}s"
  grep -E -A4 '^(API Operations|Test Phases|Failures|Errors):' "$tmp/st.out" | grep -vE '^(--)?$' || true
  grep -A1 '^Test cases:' "$tmp/st.out" | tail -1
  echo "exit status $rc"
} >"$report_dir/schemathesis.txt"
exit "$rc"
