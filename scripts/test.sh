#!/usr/bin/env bash
# The whole test suite, from a clean checkout on a fresh machine. Installs what it needs,
# starts its own servers on free loopback ports, and leaves nothing running.
# FUZZ_SECONDS (default 10) sets the time per fuzz target, FUZZ_BUILD (default dev) its build.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || need_apt+=(redis-sentinel)
command -v prlimit >/dev/null 2>&1 || need_apt+=(util-linux)
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx-light)
command -v caddy >/dev/null 2>&1 || need_apt+=(caddy)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v ss >/dev/null 2>&1 || need_apt+=(iproute2)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# PyJWT for the signed-identity tests, which run examples/verify-upstream/verify.py as it is.
pyjwt=target/pyjwt-venv
if ! "$pyjwt/bin/python" -c 'import jwt, cryptography' >/dev/null 2>&1; then
  echo "installing pyjwt[crypto] into $pyjwt"
  rm -rf "$pyjwt"
  python3 -m venv "$pyjwt"
  "$pyjwt/bin/pip" install --quiet --disable-pip-version-check 'pyjwt[crypto]>=2.8,<3'
fi
# The slow-client test holds 1 000 connections; it raises its own limit, this helps too.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The official Standard Webhooks verifier the webhook tests run (tests/it/events.rs).
if ! target/webhooks-venv/bin/python -c 'import standardwebhooks' >/dev/null 2>&1; then
  echo "installing standardwebhooks into target/webhooks-venv"
  rm -rf target/webhooks-venv
  python3 -m venv target/webhooks-venv
  target/webhooks-venv/bin/pip install --quiet --disable-pip-version-check standardwebhooks
fi
rm -rf target/tmp/hostile
cargo fmt --all -- --check
(cd fuzz && cargo fmt --all -- --check)
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets
scripts/schemathesis.sh
scripts/browser-cors.sh
scripts/generated-clients.sh
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
