#!/usr/bin/env bash
# Schemathesis against /openapi.json of a live admin listener (the real binary on free loopback
# ports, SQLite in a temp dir, plans `free` and `pro`): every check, positive_data_acceptance
# included (every request the document calls valid must be accepted), all four phases
# (examples, coverage, fuzzing, stateful). Installs schemathesis from PyPI into
# target/schemathesis-venv when it is missing. Fails on any failure, a crash or a panic.
#
# The one rule no schema keyword can state (`expires_at` must be in the future) is handled by
# scripts/schemathesis/hooks.py, which drops only the failures that rule explains.
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
. scripts/lib/keygate.sh
trap keygate_stop EXIT
keygate_start
admin="$kg_admin"
admin_key="$kg_admin_key"
tmp="$kg_tmp"

report_dir=target/tmp/hostile
mkdir -p "$report_dir"
set +e
# From the temp dir, so schemathesis' cache (.schemathesis/) starts empty and stays out of the tree.
report_abs="$(cd "$report_dir" && pwd)"
st_bin="$(cd "$venv/bin" && pwd)/st"
hooks_dir="$(cd scripts/schemathesis && pwd)"
dropped="$report_abs/schemathesis-dropped.txt"
: >"$dropped"
(cd "$tmp" && KEYGATE_ST_DROPPED="$dropped" PYTHONPATH="$hooks_dir" SCHEMATHESIS_HOOKS=hooks timeout --kill-after=10 "$max_seconds" "$st_bin" run "http://$admin/openapi.json" \
  -H "X-ADMIN-KEY: $admin_key" \
  --checks all \
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
keygate_check_alive
{
  echo "schemathesis $("$venv/bin/st" --version | awk '{print $NF}'), --max-examples $max_examples, --checks all, phases examples,coverage,fuzzing,stateful, wall-clock cap ${max_seconds}s"
  grep -E -A4 '^(API Operations|Test Phases|Failures|Errors):' "$tmp/st.out" | grep -vE '^(--)?$' || true
  grep -A1 '^Test cases:' "$tmp/st.out" | tail -1
  echo "failures dropped by scripts/schemathesis/hooks.py: $(wc -l <"$dropped") (listed in schemathesis-dropped.txt)"
  cut -d: -f1-2 "$dropped" | sort | uniq -c
  echo "exit status $rc"
} >"$report_dir/schemathesis.txt"
exit "$rc"
