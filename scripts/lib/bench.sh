# Shared by scripts/loadtest.sh and scripts/profile.sh (sourced, not run): free loopback ports,
# waiting for a listener, and the nginx configurations both measure keygate against, so that
# "nginx-keyauth" is the same nginx in both. Needs $WORK (the scratch directory) when called.
# scripts/openloop.sh, scripts/idletwins.sh, scripts/upstreamburst.sh and
# scripts/clientprofile.sh use wait_port, port_open, tree_ticks, kept_ports,
# nginx_port/keygate_port and positive_ints, on the configurations a
# loadtest.sh run kept (the copies of those configurations: scripts/lib/kept_copy.py).

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# The sum of one figure over a process and its children (nginx's master and its worker): the
# number the awk program $3 prints from /proc/<pid>/$2 (0 for a process gone meanwhile). CPU time
# in clock ticks (tree_ticks) or resident memory in kB (tree_rss_kb).
tree_sum() { # pid, file, awk program
  local t=0 p v
  for p in "$1" $(ps -o pid= --ppid "$1"); do
    v=$(awk "$3" "/proc/$p/$2" 2>/dev/null) || v=0
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
tree_ticks() { tree_sum "$1" stat '{print $14 + $15}'; }
tree_rss_kb() { tree_sum "$1" status '/VmRSS/ {print $2}'; }

# The first plain listener of an nginx configuration (`listen 127.0.0.1:PORT;`, a `backlog=`
# allowed) and the [proxy] listener of a keygate one: the port, or nothing.
nginx_port() { grep -m1 -oE 'listen 127\.0\.0\.1:[0-9]+( backlog=[0-9]+)?;' "$1" | grep -oE ':[0-9]+' | tr -d ':'; }
keygate_port() { awk -F'"' '/^\[/{s=$0} s=="[proxy]" && /^listen *=/{split($2,a,":"); print a[2]; exit}' "$1"; }

# The plain listeners of a directory kept by scripts/loadtest.sh: NG_PORT (nginx-keyauth's),
# UP_PORT (the upstream's), KG_PORT (keygate's). Exits when one is missing. The caller's name for
# messages: $1.
kept_ports() { # what
  NG_PORT=$(nginx_port "$WORK/nginx-keyauth/nginx.conf")
  UP_PORT=$(nginx_port "$WORK/upstream/nginx.conf")
  KG_PORT=$(keygate_port "$WORK/keygate.toml")
  [ -n "$NG_PORT" ] && [ -n "$UP_PORT" ] && [ -n "$KG_PORT" ] || { echo "$1: cannot find the ports in $WORK's configurations" >&2; exit 2; }
}

# Exits 2 unless every NAME=value given is a positive whole number. $1: the caller's name.
positive_ints() { # what, NAME=value...
  local what=$1 v
  shift
  for v in "$@"; do
    case ${v#*=} in '' | *[!0-9]* | 0) echo "$what: $v: a positive whole number" >&2; exit 2 ;; esac
  done
}

# Whether something listens on 127.0.0.1:$1 (status 0 when it does).
port_open() { # port
  python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.2); sys.exit(s.connect_ex(('127.0.0.1',$1)))" 2>/dev/null
}

wait_port() { # port[, what]
  for _ in $(seq 100); do
    if port_open "$1"; then
      return 0
    fi
    sleep 0.1
  done
  echo "$(basename "$0"): ${2:-nothing} did not start on port $1" >&2
  exit 1
}

# $WORK/<name>/nginx.conf: one worker, no logs, keep-alive without limits; $2 is the body of
# the http block.
nginx_conf() { # name, http-block body
  mkdir -p "$WORK/$1"
  cat >"$WORK/$1/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 32768; }
http {
  access_log off;
  client_body_temp_path $WORK/$1/body;
  proxy_temp_path $WORK/$1/proxy;
  fastcgi_temp_path $WORK/$1/fastcgi;
  uwsgi_temp_path $WORK/$1/uwsgi;
  scgi_temp_path $WORK/$1/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
$2
}
NGINX
}

# nginx-keyauth's http-block lines: X-API-Key looked up in a `map` of the keys in $1 (lines
# "key client-id;"), a `limit_req` zone per key (never reached).
keyauth_maps() { # keys.map
  cat <<NGINX
  map_hash_max_size 262144;
  map_hash_bucket_size 256;
  map \$http_x_api_key \$client_id { default ""; include $1; }
  map \$client_id \$limit_key { default \$http_x_api_key; "" ""; }
  limit_req_zone \$limit_key zone=perkey:16m rate=100000000r/s;
  limit_req_status 429;
NGINX
}

# nginx-keyauth's location: unknown key 401, the limit, the key removed and the client id
# added, proxied to the upstream block `up` over keep-alive.
keyauth_location() {
  cat <<'NGINX'
    location / {
      if ($client_id = "") { return 401; }
      limit_req zone=perkey burst=1000000 nodelay;
      proxy_set_header X-API-Key "";
      proxy_set_header X-Keygate-Client-Id $client_id;
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
    }
NGINX
}
