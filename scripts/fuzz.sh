#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 25) with libFuzzer, on
# stable Rust (RUSTC_BOOTSTRAP=1, no sanitizer). Fails on any crash, panic, timeout or OOM.
# Installs cargo-fuzz from crates.io when it is missing. Usage: scripts/fuzz.sh [SECONDS]
# The corpus grows in fuzz/corpus/<target> (not committed); seeds are in fuzz/seeds/<target>.
# FUZZ_BUILD=dev builds the fuzz profile `dev` (half the build time from clean, about a third
# of the execs a second; scripts/test.sh uses it); the default is cargo fuzz's release build.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-25}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
build_flags=(-s none)
if [ "${FUZZ_BUILD:-release}" = dev ]; then build_flags+=(--dev); fi
report_dir=target/tmp/hostile
mkdir -p "$report_dir"
summary="$report_dir/fuzz.txt"
: > "$summary.part"
cd fuzz
cargo fuzz build "${build_flags[@]}"
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t" "seeds/$t"
  log="$(mktemp)"
  if ! cargo fuzz run "${build_flags[@]}" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -60 "$log"
    echo "fuzz target $t FAILED (crash input in fuzz/artifacts/$t)"
    exit 1
  fi
  runs="$(grep -oE 'Done [0-9]+ runs' "$log" | tail -1 | grep -oE '[0-9]+' || echo '?')"
  cov="$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo '?')"
  corpus="$(find "corpus/$t" -type f | wc -l)"
  line="$(printf '%-12s %10s execs in %ss (%s build), coverage %s, corpus %s, crashes 0' "$t" "$runs" "$secs" "${FUZZ_BUILD:-release}" "$cov" "$corpus")"
  echo "$line" | tee -a "../$summary.part"
  rm -f "$log"
done
mv "../$summary.part" "../$summary"
