#!/usr/bin/env python3
"""The web console in headless Chromium, against the real keygate binary.

Starts an upstream and `keygate serve` on free loopback ports (SQLite in a temp dir), then:
signs in with the admin key, creates a client, copies the key shown once, proves it works on
the proxy, revokes it, proves it is refused, and checks that the key is not in the page, nor
in any browser storage, after a reload. Also: a wrong key is refused, a key name holding
HTML is shown as text and never run, and a client's own key signs in to that client's keys
only. Screenshots go to DOCS (the README shows them).

Usage: console_test.py KEYGATE_BINARY DOCS_DIR
"""

import http.server
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

BIN, DOCS = sys.argv[1], sys.argv[2]
ADMIN_KEY = "console-admin-key-0123456789abcdef"


class Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"upstream ok\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_gateway(tmp, upstream_port):
    config = os.path.join(tmp, "keygate.toml")
    with open(config, "w") as f:
        f.write(
            f"""
[proxy]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:{upstream_port}"
[admin]
listen = "127.0.0.1:0"
[store]
url = "sqlite://{tmp}/keygate.db"
last_used_flush_secs = 1
[plans.free]
rate_limit = {{ per_minute = 600, burst = 50 }}
[plans.pro]
rate_limit = {{ per_second = 100, burst = 200 }}
quota = {{ requests = 1000, per = "month" }}
[log]
format = "json"
access_log = false
"""
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env["KEYGATE_ADMIN_KEY"] = ADMIN_KEY
    proc = subprocess.Popen(
        [BIN, "serve", "--config", config],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("keygate exited before listening")
        if "keygate listening" in line:
            v = json.loads(line)
            # Keep draining its output so it never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, v["proxy"], v["admin"]
    raise SystemExit("keygate did not start within 30 s")


def http_call(method, url, key=None, body=None, admin=False):
    headers = {}
    if key:
        headers["x-admin-key" if admin else "authorization"] = key if admin else f"Bearer {key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok - {what}")


def main():
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    tmp = tempfile.mkdtemp()
    proc, proxy, admin = start_gateway(tmp, upstream.server_address[1])
    os.makedirs(DOCS, exist_ok=True)

    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"]:
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    # Tables are redrawn after each change: an element may go stale while the test reads it.
    wait = WebDriverWait(driver, 15, ignored_exceptions=[StaleElementReferenceException, IndexError])
    by_id = lambda i: driver.find_element(By.ID, i)
    visible = lambda i: wait.until(EC.visibility_of_element_located((By.ID, i)))

    def sign_in(key):
        visible("signin-key").send_keys(key)
        by_id("signin-go").click()

    try:
        console = f"http://{admin}/console"
        # Let the page use the clipboard, so the test can read what the copy button copied.
        driver.execute_cdp_cmd("Browser.grantPermissions", {
            "origin": f"http://{admin}",
            "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"],
        })
        driver.get(console)
        visible("signin-key")
        driver.save_screenshot(os.path.join(DOCS, "console-signin.png"))

        # A wrong key is refused.
        sign_in("not-the-admin-key-0123456789")
        wait.until(lambda d: "Refused" in by_id("signin-error").text)
        check(not by_id("clients").is_displayed(), "a wrong key is refused")

        # Sign in; create a client; the key is shown once.
        sign_in(ADMIN_KEY)
        visible("clients")
        check("ready" in visible("h-ready").text, "the health strip shows readiness")
        by_id("new-client-id").send_keys("acme")
        by_id("new-client-license").send_keys("pro")
        by_id("new-client-go").click()
        visible("newkey")
        key = by_id("newkey-value").text
        check(key.startswith("kg_") and len(key) == 52, "the new key is shown")
        by_id("newkey-copy").click()
        wait.until(lambda d: by_id("newkey-copy").text == "Copied")
        copied = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "navigator.clipboard.readText().then(done, (e) => done('error: ' + e));")
        check(copied == key, "the copy button puts exactly the key on the clipboard")
        driver.save_screenshot(os.path.join(DOCS, "console-new-key.png"))

        # It works on the proxy.
        status, body = http_call("GET", f"http://{proxy}/hello", key)
        check(status == 200 and body == b"upstream ok\n", "the copied key works on the proxy")

        # A key whose name holds HTML is shown as text and never run.
        hostile = '<img src=x onerror="window.pwned=1">'
        s, _ = http_call("POST", f"http://{admin}/v1/api-keys", ADMIN_KEY,
                         {"client_id": "acme", "name": hostile, "permissions": ["keys:manage"]}, admin=True)
        check(s == 201, "a key named with HTML is created through the API")
        by_id("newkey-done").click()
        check(by_id("newkey-value").text == "", "dismissing the key clears it")
        driver.find_element(By.ID, "nav-clients").click()
        visible("clients")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#client-table tbody tr")) == 1)
        driver.save_screenshot(os.path.join(DOCS, "console-clients.png"))
        driver.find_element(By.CSS_SELECTOR, "#client-table tbody tr button").click()
        visible("client")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#key-table tbody tr")) == 2)
        names = [r.find_elements(By.TAG_NAME, "td")[0].text
                 for r in driver.find_elements(By.CSS_SELECTOR, "#key-table tbody tr")]
        check(hostile in names, "the HTML name is shown literally")
        check(driver.execute_script("return window.pwned === undefined"), "and never runs")
        check(not driver.find_elements(By.CSS_SELECTOR, "#key-table img"), "no element made from it")
        check(key not in driver.page_source, "the key is not in the page once dismissed")
        driver.save_screenshot(os.path.join(DOCS, "console-client.png"))

        # Revoke the first key (confirming); the proxy refuses it at once.
        row = [r for r in driver.find_elements(By.CSS_SELECTOR, "#key-table tbody tr")
               if r.find_elements(By.TAG_NAME, "td")[0].text == "default"][0]
        [b for b in row.find_elements(By.TAG_NAME, "button") if b.text == "Revoke"][0].click()
        wait.until(EC.alert_is_present()).accept()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#key-table tbody tr")) == 1)
        status, _ = http_call("GET", f"http://{proxy}/hello", key)
        check(status == 401, "the revoked key is refused by the proxy")

        # Create a key with permissions and an expiry; disable and enable it; rotate it with a
        # grace period (both secrets work); the proxy obeys each change at once.
        def row_of(name):
            return [r for r in driver.find_elements(By.CSS_SELECTOR, "#key-table tbody tr")
                    if r.find_elements(By.TAG_NAME, "td")[0].text == name][0]

        def press(name, label):
            def click(_):
                [b for b in row_of(name).find_elements(By.TAG_NAME, "button") if b.text == label][0].click()
                return True
            wait.until(click)

        by_id("new-key-name").send_keys("ci")
        by_id("new-key-perms").send_keys("read, write")
        by_id("new-key-days").send_keys("30")
        by_id("new-key-go").click()
        visible("newkey")
        ci = by_id("newkey-value").text
        by_id("newkey-done").click()
        cells = wait.until(lambda d: [c.text for c in row_of("ci").find_elements(By.TAG_NAME, "td")])
        check(cells[2] == "read, write" and cells[4] != "never", "a key with permissions and an expiry")
        check(http_call("GET", f"http://{proxy}/hello", ci)[0] == 200, "it works on the proxy")
        press("ci", "Disable")
        wait.until(lambda d: row_of("ci").find_elements(By.TAG_NAME, "td")[3].text == "no")
        check(http_call("GET", f"http://{proxy}/hello", ci)[0] == 401, "disabled: refused")
        press("ci", "Enable")
        wait.until(lambda d: row_of("ci").find_elements(By.TAG_NAME, "td")[3].text == "yes")
        check(http_call("GET", f"http://{proxy}/hello", ci)[0] == 200, "enabled again: accepted")
        press("ci", "Rotate")
        prompt = wait.until(EC.alert_is_present())
        prompt.send_keys("3600")
        prompt.accept()
        visible("newkey")
        rotated = by_id("newkey-value").text
        check(rotated != ci and rotated.startswith("kg_"), "rotation shows the new key once")
        by_id("newkey-done").click()
        check(http_call("GET", f"http://{proxy}/hello", rotated)[0] == 200
              and http_call("GET", f"http://{proxy}/hello", ci)[0] == 200,
              "both secrets work during the grace period")

        # Usage: the 7 accepted requests of this key (4 above, 3 here; the refused one while it
        # was disabled is not counted) reach the store within the flush interval (1 s here); the
        # client's chart and the key's chart show them.
        for _ in range(3):
            http_call("GET", f"http://{proxy}/hello", rotated)
        time.sleep(2.5)
        driver.find_element(By.ID, "nav-clients").click()
        visible("clients")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#client-table tbody tr button")[0].click() or True)
        visible("client")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#client-usage svg rect"))
        press("ci", "Usage")
        bars = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#key-usage svg rect"))
        title = by_id("key-usage").find_element(By.TAG_NAME, "h3").text
        check(len(bars) == 1 and "total 7" in title, f"usage charts per client and per key ({title})")
        driver.save_screenshot(os.path.join(DOCS, "console-usage.png"))

        # A key with credits (5 now, refilled to 10 every day): the key table shows what is
        # left, and each accepted request on the proxy takes one; the client's quota (1000 a
        # month on plan pro) shows what is left of it, from GET /v1/clients/{id}/usage.
        def quota():
            text = by_id("client-quota").text
            m = re.search(r"Quota: (\d+) of 1000 requests left this month \(used (\d+),", text)
            check(m is not None, f"the client's quota is shown ({text!r})")
            return int(m.group(1)), int(m.group(2))

        def reopen():
            driver.find_element(By.ID, "nav-clients").click()
            visible("clients")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#client-table tbody tr button")[0].click() or True)
            visible("client")
            wait.until(lambda d: "Quota:" in by_id("client-quota").text)

        left, used = quota()
        check(used > 0 and left + used == 1000, f"quota remaining is 1000 less the use ({left}, {used})")
        # A refill amount without an interval, or a negative number: an error, no key made.
        keys_before = len(driver.find_elements(By.CSS_SELECTOR, "#key-table tbody tr"))
        by_id("new-key-name").send_keys("metered")
        by_id("new-key-refill").send_keys("10")
        by_id("new-key-go").click()
        wait.until(lambda d: "refill needs both" in by_id("error").text)
        by_id("new-key-credits").send_keys("-1")
        Select(by_id("new-key-refill-interval")).select_by_value("daily")
        by_id("new-key-go").click()
        wait.until(lambda d: "credits" in by_id("error").text)
        check(len(driver.find_elements(By.CSS_SELECTOR, "#key-table tbody tr")) == keys_before
              and not by_id("newkey").is_displayed(), f"bad credits are refused ({by_id('error').text!r})")
        by_id("new-key-credits").clear()
        by_id("new-key-credits").send_keys("5")
        Select(by_id("new-key-refill-interval")).select_by_value("daily")
        by_id("new-key-go").click()
        visible("newkey")
        metered = by_id("newkey-value").text
        by_id("newkey-done").click()
        cell = wait.until(lambda d: row_of("metered").find_elements(By.TAG_NAME, "td")[6].text)
        check(cell.startswith("5 left (refill to 10 every day"), f"the new key's credits ({cell!r})")
        check(row_of("ci").find_elements(By.TAG_NAME, "td")[6].text == "unlimited",
              "a key without credits says so")
        s, body = http_call("GET", f"http://{admin}/v1/clients/acme/usage", ADMIN_KEY, admin=True)
        credits = json.loads(body)["credits"]
        check([c["credits"]["remaining"] for c in credits if c["name"] == "metered"] == [5],
              "the server holds the credits the console set")
        for _ in range(2):
            check(http_call("GET", f"http://{proxy}/hello", metered)[0] == 200, "a metered request")
        reopen()
        wait.until(lambda d: row_of("metered").find_elements(By.TAG_NAME, "td")[6].text.startswith("3 left"))
        check(True, "each request took a credit: 3 left")
        wait.until(lambda d: reopen() or quota()[1] >= used + 2)
        left2, used2 = quota()
        check(left2 == 1000 - used2 and left2 <= left - 2, f"the quota shrank ({left} -> {left2})")
        press("metered", "Usage")
        wait.until(lambda d: "Credits: 3 left" in by_id("key-usage").text)
        check(True, "the key's usage view shows its credits")
        driver.execute_script("arguments[0].scrollIntoView()", row_of("metered"))
        driver.save_screenshot(os.path.join(DOCS, "console-credits.png"))

        # Rotating with a grace period that is not a whole number of seconds: an error, nothing
        # rotated (it used to become 0: the old secret stopped at once).
        press("ci", "Rotate")
        prompt = wait.until(EC.alert_is_present())
        prompt.send_keys("1h")
        prompt.accept()
        wait.until(lambda d: "whole number of seconds" in by_id("error").text)
        check(not by_id("newkey").is_displayed()
              and http_call("GET", f"http://{proxy}/hello", rotated)[0] == 200,
              "an unreadable grace period rotates nothing")

        # A rotation whose refresh fails (the key list answers 503): the new key is still shown,
        # with the error, since it is shown only once.
        driver.execute_script("""
            window.realFetch = window.fetch;
            window.fetch = (url, init) => (init && init.method === 'GET'
                    && String(url).includes('/v1/api-keys?'))
                ? Promise.resolve(new Response(
                    JSON.stringify({title: 'Service Unavailable', detail: 'store down (test)'}),
                    {status: 503, headers: {'Content-Type': 'application/problem+json'}}))
                : window.realFetch(url, init);
        """)
        press("ci", "Rotate")
        prompt = wait.until(EC.alert_is_present())
        prompt.send_keys("0")
        prompt.accept()
        visible("newkey")
        again = by_id("newkey-value").text
        check(again.startswith("kg_") and again != rotated and "store down" in by_id("error").text,
              "a rotation shows its new key even when the refresh after it fails")
        check(http_call("GET", f"http://{proxy}/hello", again)[0] == 200
              and http_call("GET", f"http://{proxy}/hello", rotated)[0] == 401,
              "the shown key is the one that works now")
        driver.execute_script("window.fetch = window.realFetch;")
        by_id("newkey-done").click()

        # Change the license; search; delete a client after confirming.
        by_id("client-license").clear()
        by_id("client-license").send_keys("free")
        by_id("client-license-go").click()
        wait.until(lambda d: by_id("client-license").get_attribute("value") == "free")
        s, c = http_call("GET", f"http://{admin}/v1/clients/acme", ADMIN_KEY, admin=True)
        check(json.loads(c)["license"] == "free", "the license changed")
        http_call("POST", f"http://{admin}/v1/clients", ADMIN_KEY,
                  {"client_id": "doomed", "license": "free"}, admin=True)
        driver.find_element(By.ID, "nav-clients").click()
        visible("clients")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#client-table tbody tr")) == 2)
        by_id("client-search").send_keys("doo")
        rows = driver.find_elements(By.CSS_SELECTOR, "#client-table tbody tr")
        check(len(rows) == 1 and "doomed" in rows[0].text, "search narrows the list")
        rows[0].find_element(By.CSS_SELECTOR, "button.danger").click()
        wait.until(EC.alert_is_present()).dismiss()
        check(http_call("GET", f"http://{admin}/v1/clients/doomed", ADMIN_KEY, admin=True)[0] == 200,
              "a dismissed confirmation deletes nothing")
        driver.find_element(By.CSS_SELECTOR, "#client-table tbody tr button.danger").click()
        wait.until(EC.alert_is_present()).accept()
        wait.until(lambda d: http_call("GET", f"http://{admin}/v1/clients/doomed", ADMIN_KEY, admin=True)[0] == 404)
        check(True, "a confirmed delete removes the client")

        # A new client's key, not dismissed, is gone from the page when the list is opened.
        by_id("new-client-id").send_keys("walkaway")
        by_id("new-client-license").clear()
        by_id("new-client-license").send_keys("free")
        by_id("new-client-go").click()
        visible("newkey")
        walked = by_id("newkey-value").text
        check(walked.startswith("kg_"), "a new client's key is shown")
        driver.find_element(By.ID, "nav-clients").click()
        visible("clients")
        check(walked not in driver.page_source and not by_id("newkey").is_displayed(),
              "leaving for the client list takes the undismissed key out of the page")

        # After a reload: signed out, the key nowhere in the page or the browser's storage.
        driver.refresh()
        visible("signin")
        check(not by_id("clients").is_displayed(), "a reload signs out")
        check(all(k not in driver.page_source for k in (key, ci, rotated, again)),
              "no key shown earlier is in the page after a reload")
        check(ADMIN_KEY not in driver.page_source, "nor the admin key")
        stored = driver.execute_script(
            "return localStorage.length + sessionStorage.length + document.cookie.length")
        check(stored == 0 and not driver.get_cookies(), "nothing in cookies or storage")

        # A client's own key with keys:manage signs in to that client's keys only.
        s, created = http_call("POST", f"http://{admin}/v1/clients", ADMIN_KEY,
                               {"client_id": "globex", "license": "free", "permissions": ["keys:manage"]},
                               admin=True)
        check(s == 201, "a second client")
        own = json.loads(created)["api_key"]["key"]
        sign_in(own)
        visible("client")
        check(not by_id("nav-clients").is_displayed(), "a client sees no client list")
        check(not by_id("new-key-credits-row").is_displayed(), "only an admin sets credits")
        wait.until(lambda d: "Quota: none" in by_id("client-quota").text)
        check(True, "a client sees its own quota (none on plan free)")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#key-table tbody tr")) == 1)
        check("globex" in by_id("client-title").text, "a client sees its own keys only")
        names = [r.find_elements(By.TAG_NAME, "td")[0].text
                 for r in driver.find_elements(By.CSS_SELECTOR, "#key-table tbody tr")]
        check(names == ["default"], "and none of another client's")
        # It creates keys of its own (without the credits and rate limit only an admin sets).
        check(not by_id("new-key-limit-row").is_displayed(), "only an admin sets rate limits")
        by_id("new-key-name").send_keys("mine")
        by_id("new-key-go").click()
        visible("newkey")
        mine = by_id("newkey-value").text
        check(mine.startswith("kg_"), "a client creates a key of its own and sees it once")
        by_id("newkey-done").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#key-table tbody tr")) == 2)
        s, listed = http_call("GET", f"http://{admin}/v1/api-keys?client_id=globex", ADMIN_KEY, admin=True)
        check(s == 200 and sorted(k["name"] for k in json.loads(listed)["data"]) == ["default", "mine"],
              "the new key is the client's")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=15)
        upstream.shutdown()
    print("console browser test: all checks passed")


if __name__ == "__main__":
    main()
