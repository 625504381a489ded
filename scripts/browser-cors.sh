#!/usr/bin/env bash
# CORS in a real browser: headless Chromium (Selenium) calls the real keygate binary from pages
# on other loopback origins (scripts/browser_cors.py says what is checked). Needs the Debian
# packages chromium and chromium-driver (scripts/test.sh installs them); installs Selenium from
# PyPI into target/browser-venv when it is missing. Fails when any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in chromium chromedriver; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is missing (Debian: apt-get install chromium chromium-driver)"; exit 1; }
done
venv=target/browser-venv
if ! "$venv/bin/python" -c 'import selenium' >/dev/null 2>&1; then
  echo "installing selenium into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv" || { echo "python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 1; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'selenium>=4.20,<5'
fi
cargo build --quiet --bin keygate
CHROMIUM="$(command -v chromium)" CHROMEDRIVER="$(command -v chromedriver)" \
  "$venv/bin/python" scripts/browser_cors.py target/debug/keygate
