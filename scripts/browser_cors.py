"""CORS in a real browser: headless Chromium (Selenium) runs `fetch` from pages served on other
origins (other loopback ports) against the real keygate binary.

- a page on an allowed origin calls with a key: the preflight passes, the answer and its
  exposed RateLimit-* fields are readable (the upstream's own Access-Control-Allow-Origin,
  which names another origin, is replaced by keygate's);
- the same call from a disallowed origin is blocked, and nothing reaches the upstream;
- keygate's own 401 and a 429 are readable from script, with the 429's Retry-After;
- the upstream never sees a preflight.

Usage: browser_cors.py PATH_TO_KEYGATE. Exit 0 when every check passed.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

ADMIN_KEY = "browser-test-admin-key-0123456789abcdef"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


def serve(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Upstream(BaseHTTPRequestHandler):
    """Answers 200 "ok", allowing an origin of its own; records every request."""

    seen = []

    def answer(self):
        Upstream.seen.append(f"{self.command} {self.path}")
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "http://upstream-own.invalid")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_OPTIONS = answer

    def log_message(self, *args):
        pass


class Page(BaseHTTPRequestHandler):
    """The web page the scripts run in."""

    def do_GET(self):
        body = b"<!doctype html><html><head><title>app</title></head><body>app</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_keygate(binary, tmp, allowed_origin, upstream):
    config = f"""
[proxy]
listen = "127.0.0.1:0"
upstream = "{upstream}"
cors = {{ origins = ["{allowed_origin}"] }}
[admin]
listen = "127.0.0.1:0"
keys = ["{ADMIN_KEY}"]
[store]
url = "sqlite://{tmp}/keygate.db"
[plans.pro]
rate_limit = {{ per_second = 1000, burst = 1000 }}
[log]
access_log = false

[[routes]]
path = "/api"
[[routes]]
path = "/limited"
rate_limit = {{ per_minute = 1, burst = 1 }}
"""
    path = os.path.join(tmp, "keygate.toml")
    with open(path, "w") as f:
        f.write(config)
    log = open(os.path.join(tmp, "log"), "w+")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_") and k != "RUST_LOG"}
    env["KEYGATE_LOG_FORMAT"] = "json"
    proc = subprocess.Popen([binary, "serve", "--config", path], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        log.seek(0)
        text = log.read()
        proxy = re.search(r'"proxy":"([^"]+)"', text)
        admin = re.search(r'"admin":"([^"]+)"', text)
        if proxy and admin:
            return proc, proxy.group(1), admin.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    log.seek(0)
    sys.exit(f"keygate did not start:\n{log.read()}")


def create_key(admin):
    req = urllib.request.Request(
        f"http://{admin}/v1/clients",
        data=json.dumps({"client_id": "web", "license": "pro"}).encode(),
        headers={"X-Admin-Key": ADMIN_KEY, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req) as res:
        return json.load(res)["api_key"]["key"]


# Runs in the page: one fetch, and what the script could read of its answer.
FETCH = """
const [url, key, done] = arguments;
const headers = key ? {"x-api-key": key} : {};
fetch(url, {headers}).then(async (res) => done({
    status: res.status,
    body: await res.text(),
    retryAfter: res.headers.get("Retry-After"),
    remaining: res.headers.get("RateLimit-Remaining"),
})).catch((e) => done({blocked: String(e)}));
"""


def main():
    binary = sys.argv[1]
    results = []

    def check(name, ok, detail):
        results.append(bool(ok))
        print(f"{'ok  ' if ok else 'FAIL'} {name}" + ("" if ok else f": {detail}"))

    upstream = serve(Upstream)
    allowed = serve(Page)
    other = serve(Page)
    allowed_origin = f"http://127.0.0.1:{allowed.server_address[1]}"
    other_origin = f"http://127.0.0.1:{other.server_address[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        proc, proxy, admin = start_keygate(
            binary, tmp, allowed_origin, f"http://127.0.0.1:{upstream.server_address[1]}"
        )
        driver = None
        try:
            key = create_key(admin)
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]:
                options.add_argument(arg)
            driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
            driver.set_script_timeout(20)

            def fetch(origin, path, key):
                driver.get(origin + "/")
                return driver.execute_async_script(FETCH, f"http://{proxy}{path}", key)

            r = fetch(allowed_origin, "/api/items", key)
            check(
                "an allowed origin calls with a key and reads the answer",
                r.get("status") == 200 and '"ok"' in r.get("body", ""),
                r,
            )
            check("RateLimit-Remaining is readable from script", r.get("remaining") not in (None, ""), r)

            seen = len(Upstream.seen)
            r = fetch(other_origin, "/api/items", key)
            check("a disallowed origin is blocked", "blocked" in r, r)
            check("the disallowed call never reached the upstream", len(Upstream.seen) == seen, Upstream.seen)

            r = fetch(allowed_origin, "/api/items", None)
            check(
                "keygate's 401 is readable from script",
                r.get("status") == 401 and "missing_credentials" in r.get("body", ""),
                r,
            )

            first = fetch(allowed_origin, "/limited", key)
            r = fetch(allowed_origin, "/limited", key)
            check(
                "a 429 and its Retry-After are readable from script",
                first.get("status") == 200
                and r.get("status") == 429
                and (r.get("retryAfter") or "").isdigit()
                and int(r["retryAfter"]) >= 1,
                (first, r),
            )
            check(
                "the upstream never saw a preflight",
                bool(Upstream.seen) and not any(s.startswith("OPTIONS") for s in Upstream.seen),
                Upstream.seen,
            )
        finally:
            if driver is not None:
                driver.quit()
            proc.terminate()
            proc.wait(timeout=15)
    passed = sum(results)
    failed = len(results) - passed
    print(f"browser-cors: {passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 else 1)


if __name__ == "__main__":
    main()
