"""Copies of what a directory kept by scripts/loadtest.sh (KEEP_WORK=1) runs, with ports of
their own, for the scripts that run beside the kept directory's own instances
(scripts/idletwins.sh, scripts/upstreamburst.sh, scripts/clientprofile.sh). Imported, not
run."""
import os
import re
import socket
import sqlite3
import sys

NGINX_TEMP = ("body", "proxy", "fastcgi", "uwsgi", "scgi")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def keygate(what, work, d, upstream_port=None, instance=None):
    """$work's keygate configuration in d with every `listen` on a free port (and its upstream on
    upstream_port when given), and a copy of its SQLite store made by SQLite's backup, consistent
    even while the kept directory's keygate writes to it. `instance` names another instance's
    directory under $work instead (e.g. "tls", the TLS keygate's). Exits with a message naming
    `what` when the configuration is not the one loadtest.sh writes."""
    work = f"{work}/{instance}" if instance else work
    kg = open(f"{work}/keygate.toml").read()
    if f"sqlite://{work}/keygate.db" not in kg:
        sys.exit(f"{what}: {work}/keygate.toml's store is not {work}/keygate.db")
    os.makedirs(d, exist_ok=True)
    for f in ("keygate.db", "keygate.db-wal", "keygate.db-shm"):
        if os.path.exists(f"{d}/{f}"):
            os.remove(f"{d}/{f}")
    src, dst = sqlite3.connect(f"{work}/keygate.db"), sqlite3.connect(f"{d}/keygate.db")
    src.backup(dst)
    src.close()
    dst.close()
    kg = re.sub(r'(?m)^listen = "127\.0\.0\.1:\d+"', lambda m: f'listen = "127.0.0.1:{free_port()}"', kg)
    if upstream_port is not None:
        kg, n = re.subn(r'(?m)^upstream = "http://127\.0\.0\.1:\d+"', f'upstream = "http://127.0.0.1:{upstream_port}"', kg)
        if n != 1:
            sys.exit(f'{what}: no upstream = "http://127.0.0.1:PORT" in {work}/keygate.toml')
    open(f"{d}/keygate.toml", "w").write(kg.replace(f"sqlite://{work}/keygate.db", f"sqlite://{d}/keygate.db"))


def nginx(conf, prefix, d, listen=None):
    """An nginx configuration `conf` (text) whose files were under `prefix`, moved to d (with the
    temporary directories), every `listen 127.0.0.1:PORT` on a free port, or rewritten by
    `listen` (a function of the match) when given. Returns the text written to d/nginx.conf."""
    for sub in NGINX_TEMP:
        os.makedirs(f"{d}/{sub}", exist_ok=True)
    text = re.sub(r"listen 127\.0\.0\.1:\d+", listen or (lambda m: f"listen 127.0.0.1:{free_port()}"),
                  conf.replace(prefix, f"{d}/"))
    open(f"{d}/nginx.conf", "w").write(text)
    return text
