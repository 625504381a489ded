#!/usr/bin/env bash
# The web console in headless Chromium against the real binary (tests/browser/console_test.py):
# sign in, create a client, copy the key shown once, use it on the proxy, revoke it, check it
# is refused and gone from the page after a reload; screenshots into docs/.
# Installs chromium + chromium-driver (apt) and Selenium (PyPI, into target/selenium-venv) when
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."
need_browser=()
command -v chromium >/dev/null 2>&1 || need_browser+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_browser+=(chromium-driver)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_browser+=(python3-venv)
if [ ${#need_browser[@]} -gt 0 ]; then
  echo "installing: ${need_browser[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_browser[@]}" >/dev/null
fi
venv=target/selenium-venv
if ! "$venv/bin/python" -c 'import selenium' >/dev/null 2>&1; then
  echo "installing selenium into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'selenium>=4.20,<5'
fi
cargo build --quiet --bin keygate
"$venv/bin/python" tests/browser/console_test.py target/debug/keygate docs
