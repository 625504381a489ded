# Sourced by the scripts that test the admin API from outside: starts the debug binary on free
# loopback ports with SQLite in a temp dir, and stops it (and removes the dir) on exit.
#
#   keygate_start [EXTRA_TOML]   sets $kg_tmp, $kg_pid, $kg_admin (host:port), $kg_admin_key
#   keygate_check_alive          fails when keygate died or panicked
# The caller's EXIT trap must call keygate_stop.

kg_admin_key="generated-client-admin-key-0123456789abcdef"
kg_pid=""
kg_tmp=""

keygate_stop() {
  if [ -n "$kg_pid" ]; then kill -TERM "$kg_pid" 2>/dev/null || true; wait "$kg_pid" 2>/dev/null || true; fi
  if [ -n "$kg_tmp" ]; then rm -rf "$kg_tmp"; fi
}

keygate_start() {
  cargo build --quiet --bin keygate
  kg_tmp="$(mktemp -d)"
  cat >"$kg_tmp/keygate.toml" <<TOML
[proxy]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:9"
[admin]
listen = "127.0.0.1:0"
keys = ["$kg_admin_key"]
[store]
url = "sqlite://$kg_tmp/keygate.db"
[keys]
max_per_client = 0
[rate_limit]
failed_auth = { per_second = 100000, burst = 100000 }
[log]
access_log = false
level = "warn,keygate=info"
[plans.free]
[plans.pro]
${1:-}
TOML
  env -u RUST_LOG KEYGATE_LOG_FORMAT=json target/debug/keygate serve --config "$kg_tmp/keygate.toml" >"$kg_tmp/log" 2>&1 &
  kg_pid=$!
  kg_admin=""
  for _ in $(seq 1 200); do
    kg_admin="$(grep -o '"admin":"[^"]*"' "$kg_tmp/log" | head -1 | cut -d'"' -f4 || true)"
    [ -n "$kg_admin" ] && return 0
    kill -0 "$kg_pid" 2>/dev/null || break
    sleep 0.05
  done
  cat "$kg_tmp/log"; echo "keygate did not start"; return 1
}

keygate_check_alive() {
  if ! kill -0 "$kg_pid" 2>/dev/null; then
    echo "keygate died"; cat "$kg_tmp/log"; return 1
  fi
  if grep -q panicked "$kg_tmp/log"; then
    grep panicked "$kg_tmp/log"; echo "keygate panicked"; return 1
  fi
}
