#!/usr/bin/env bash
# The whole test suite, from a clean checkout on a fresh machine. Installs what it needs,
# starts its own servers on free loopback ports, and leaves nothing running.
# FUZZ_SECONDS (default 10) sets the time per fuzz target, FUZZ_BUILD (default dev) its build.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v prlimit >/dev/null 2>&1 || need_apt+=(util-linux)
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx-light)
command -v caddy >/dev/null 2>&1 || need_apt+=(caddy)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# The slow-client test holds 1 000 connections; it raises its own limit, this helps too.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

rm -rf target/tmp/hostile
cargo fmt --all -- --check
(cd fuzz && cargo fmt --all -- --check)
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets
scripts/schemathesis.sh
# The web console in headless Chromium (installs chromium, chromium-driver, selenium itself).
scripts/browser-test.sh
FUZZ_BUILD="${FUZZ_BUILD:-dev}" scripts/fuzz.sh "${FUZZ_SECONDS:-10}"

echo
echo "=== hostile-input figures (target/tmp/hostile) ==="
for f in target/tmp/hostile/*.txt; do
  echo "--- $(basename "$f" .txt)"
  cat "$f"
done
echo "=== scripts/test.sh took $((SECONDS - started)) s ==="
