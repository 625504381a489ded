#!/usr/bin/env bash
# Generated clients as tests: generates a Python client (openapi-python-client, PyPI) and
# TypeScript types (openapi-typescript, npm) from the live /openapi.json of the real binary,
# then
#   - runs the admin API's seed flows (tests/clients/flows.py) with the Python client against
#     that keygate: a call the client cannot express, or an answer it cannot parse, fails;
#   - type-checks tests/clients/usage.ts against the TypeScript types with `tsc --noEmit`.
# Generation warnings (an operation or schema the generator had to leave out) fail too.
# Tools are installed on first use: target/openapi-client-venv (pip) and target/openapi-ts (npm).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/openapi-client-venv
if ! "$venv/bin/openapi-python-client" --version >/dev/null 2>&1; then
  echo "installing openapi-python-client into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv" || { echo "python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 1; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'openapi-python-client>=0.29,<0.30'
fi
ts=target/openapi-ts
if [ ! -x "$ts/node_modules/.bin/openapi-typescript" ] || [ ! -x "$ts/node_modules/.bin/tsc" ]; then
  command -v npm >/dev/null || { echo "npm is missing (Debian: apt-get install nodejs npm)"; exit 1; }
  echo "installing openapi-typescript and typescript into $ts"
  mkdir -p "$ts"
  npm install --prefix "$ts" --no-audit --no-fund --silent 'openapi-typescript@^7.13' 'typescript@^5.9' >/dev/null
fi

. scripts/lib/keygate.sh
trap keygate_stop EXIT
keygate_start

out=target/generated-clients
rm -rf "$out"
mkdir -p "$out/python" "$out/typescript"
curl -fsS "http://$kg_admin/openapi.json" -o "$out/openapi.json"

echo "--- Python client (openapi-python-client $("$venv/bin/openapi-python-client" --version | awk '{print $NF}'))"
printf 'post_hooks: []\n' >"$out/python-config.yml"
"$venv/bin/openapi-python-client" generate --path "$out/openapi.json" --meta none \
  --output-path "$out/python/keygate_admin_client" --config "$out/python-config.yml" >"$out/python.log" 2>&1 \
  || { cat "$out/python.log"; echo "the Python client could not be generated"; exit 1; }
if grep -qiE 'warning|error|unable|will not be generated' "$out/python.log"; then
  cat "$out/python.log"; echo "the Python client was generated with warnings: the document has gaps"; exit 1
fi
PYTHONPATH="$out/python" "$venv/bin/python" tests/clients/flows.py "http://$kg_admin" "$kg_admin_key"

echo "--- TypeScript types (openapi-typescript $("$ts/node_modules/.bin/openapi-typescript" --version 2>/dev/null | awk '{print $NF}'), tsc $("$ts/node_modules/.bin/tsc" --version | awk '{print $NF}'))"
"$ts/node_modules/.bin/openapi-typescript" "$out/openapi.json" -o "$out/typescript/keygate-admin.ts" >"$out/typescript.log" 2>&1 \
  || { cat "$out/typescript.log"; echo "the TypeScript types could not be generated"; exit 1; }
cp tests/clients/usage.ts "$out/typescript/usage.ts"
"$ts/node_modules/.bin/tsc" --noEmit --strict --target es2022 --module es2022 --moduleResolution bundler \
  "$out/typescript/usage.ts"
echo "tests/clients/usage.ts type-checks against the generated types"

keygate_check_alive
