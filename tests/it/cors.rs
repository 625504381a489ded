//! CORS at the gateway, against the real binary with raw HTTP/1.1 requests: preflights
//! answered by keygate (and never forwarded), the CORS fields of relayed answers and of
//! keygate's own 401, 403, 404 and 429, origin matching (exact, wildcard labels, `*`, `null`,
//! malformed and oversized values), credentials, per-route rules, the upstream's own
//! `Access-Control-*` fields, and what check-config refuses.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::scripted::{Answer, Raw};
use crate::support::binary::Binary;
use crate::support::{ADMIN_KEY, JWT_SECRET};

const APP: &str = "https://app.example.com";
const EVIL: &str = "https://evil.example.net";
/// The origin the upstream itself allows (keygate replaces it on routes with CORS).
const UPSTREAM_ORIGIN: &str = "https://from-upstream.example";

/// An upstream that counts requests and answers 200 with its own CORS fields.
#[derive(Clone)]
pub struct CorsUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    /// `METHOD path` of every request, in order.
    pub seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl CorsUpstream {
    pub async fn start() -> CorsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, log) = (Arc::clone(&requests), Arc::clone(&seen));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (count, log) = (Arc::clone(&count), Arc::clone(&log));
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        count.fetch_add(1, Ordering::SeqCst);
                        log.lock()
                            .unwrap()
                            .push(format!("{} {}", req.method(), req.uri().path()));
                        async move {
                            let mut res = Response::new(Full::new(Bytes::from_static(b"ok")));
                            let h = res.headers_mut();
                            h.insert(
                                "access-control-allow-origin",
                                UPSTREAM_ORIGIN.parse().unwrap(),
                            );
                            h.insert("access-control-allow-credentials", "true".parse().unwrap());
                            h.insert("access-control-max-age", "99999".parse().unwrap());
                            h.insert("x-request-id", "r-1".parse().unwrap());
                            Ok::<_, Infallible>(res)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        CorsUpstream {
            addr,
            requests,
            seen,
        }
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// The `[proxy] cors` default and the routes of every test here.
pub fn cors_config(upstream: SocketAddr, db: &std::path::Path) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "http://{upstream}"
cors = {{ origins = ["{APP}", "https://*.example.org"], expose_headers = ["x-request-id"] }}
[admin]
listen = "127.0.0.1:0"
keys = ["{ADMIN_KEY}"]
[store]
url = "sqlite://{db}"
[plans.pro]
rate_limit = {{ per_second = 1000, burst = 1000 }}
[log]
access_log = false
[jwt]
secret = "{JWT_SECRET}"

[[routes]]
path = "/api"
methods = ["GET", "PUT"]
[[routes]]
path = "/private"
permissions = ["NOPE"]
[[routes]]
path = "/limited"
rate_limit = {{ per_minute = 1, burst = 1 }}
[[routes]]
path = "/creds"
cors = {{ origins = ["{APP}"], credentials = true, methods = ["GET"], headers = ["x-api-key"], max_age = 60 }}
[[routes]]
path = "/open"
cors = {{ origins = ["*"], headers = ["*"] }}
[[routes]]
path = "/plain"
cors = {{ origins = [] }}
"#,
        db = db.display()
    )
}

pub struct Setup {
    pub gw: Binary,
    pub up: CorsUpstream,
    pub key: String,
    _dir: tempfile::TempDir,
}

pub async fn setup() -> Setup {
    let up = CorsUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = cors_config(up.addr, &dir.path().join("k.db"));
    let gw = Binary::serve(&config, dir.path()).spawn();
    let key = create_key(gw.admin).await;
    Setup {
        gw,
        up,
        key,
        _dir: dir,
    }
}

/// A `pro` client's first key, through the admin API.
pub async fn create_key(admin: SocketAddr) -> String {
    let mut raw = Raw::connect(admin).await;
    let body = r#"{"client_id":"web","license":"pro"}"#;
    raw.send(
        format!(
            "POST /v1/clients HTTP/1.1\r\nHost: localhost\r\nX-Admin-Key: {ADMIN_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let a = raw.read("POST").await;
    assert_eq!(a.status, 201, "{}", a.head);
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    v["api_key"]["key"].as_str().unwrap().to_owned()
}

/// One raw HTTP/1.1 request on a new connection.
async fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut r = Raw::connect(addr).await;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: api.example\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    r.send(head.as_bytes()).await;
    r.read(method).await
}

/// Every `Access-Control-*` field of an answer.
fn cors_fields(a: &Answer) -> Vec<(String, String)> {
    a.headers
        .iter()
        .filter(|(k, _)| k.starts_with("access-control-"))
        .cloned()
        .collect()
}

fn all(a: &Answer, name: &str) -> Vec<String> {
    a.headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .collect()
}

fn varies_on_origin(a: &Answer) -> bool {
    all(a, "vary").iter().any(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("origin"))
    })
}

/// The answer allows `origin` to read it, exposes keygate's fields, and varies on Origin.
#[track_caller]
fn granted(a: &Answer, origin: &str) {
    assert_eq!(
        all(a, "access-control-allow-origin"),
        [origin],
        "{}",
        a.head
    );
    let exposed = a
        .header("access-control-expose-headers")
        .unwrap_or_else(|| panic!("no expose field: {}", a.head));
    for f in [
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "retry-after",
        "keygate-credits-remaining",
        "keygate-quota-remaining",
    ] {
        assert!(exposed.contains(f), "{f} not exposed: {}", a.head);
    }
    assert!(varies_on_origin(a), "no Vary: Origin: {}", a.head);
}

/// The answer carries no `Access-Control-*` field.
#[track_caller]
fn refused(a: &Answer) {
    assert_eq!(cors_fields(a), [], "{}", a.head);
}

#[tokio::test]
async fn an_allowed_origin_reads_the_answer_and_no_other_does() {
    let s = setup().await;
    let p = s.gw.proxy;
    let key = s.key.as_str();
    let a = raw(p, "GET", "/api/x", &[("x-api-key", key), ("origin", APP)]).await;
    assert_eq!(a.status, 200, "{}", a.head);
    granted(&a, APP);
    assert!(
        a.header("access-control-expose-headers")
            .unwrap()
            .contains("x-request-id")
    );
    // keygate's fields replace the upstream's own, and no credentials are claimed.
    assert_eq!(a.header("access-control-allow-credentials"), None);
    assert_eq!(a.header("access-control-max-age"), None);
    assert_eq!(a.header("x-request-id").as_deref(), Some("r-1"));

    // Not allowed, or not a browser: no CORS field at all, never an echo of the origin.
    for origin in [
        EVIL,
        "https://app.example.com.evil.io",
        "https://evil-app.example.com",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://app.example.com/",
        "HTTPS://APP.EXAMPLE.COM",
        "https://app.example.com, https://evil.example.net",
        "null",
        "",
    ] {
        let a = raw(
            p,
            "GET",
            "/api/x",
            &[("x-api-key", key), ("origin", origin)],
        )
        .await;
        assert_eq!(a.status, 200, "{origin}: {}", a.head);
        refused(&a);
        assert!(varies_on_origin(&a), "{origin}: {}", a.head);
    }
    let a = raw(p, "GET", "/api/x", &[("x-api-key", key)]).await;
    refused(&a);
    let huge = format!("https://{}.example.org", "a".repeat(2000));
    let a = raw(p, "GET", "/api/x", &[("x-api-key", key), ("origin", &huge)]).await;
    assert_eq!(a.status, 200, "{}", a.head);
    refused(&a);

    // Wildcard subdomains: whole labels in front of the domain, nothing else.
    for origin in [
        "https://a.example.org",
        "https://a.b.example.org",
        "https://x-1.example.org",
    ] {
        let a = raw(
            p,
            "GET",
            "/api/x",
            &[("x-api-key", key), ("origin", origin)],
        )
        .await;
        granted(&a, origin);
    }
    for origin in [
        "https://example.org",
        "https://.example.org",
        "https://evil-example.org",
        "https://evilexample.org",
        "https://a.example.org.evil.io",
        "https://a.example.org:444",
        "http://a.example.org",
        "https://a..example.org",
        "https://a_b.example.org",
    ] {
        let a = raw(
            p,
            "GET",
            "/api/x",
            &[("x-api-key", key), ("origin", origin)],
        )
        .await;
        refused(&a);
    }
}

#[tokio::test]
async fn preflights_are_answered_by_keygate_without_a_key_and_never_forwarded() {
    let s = setup().await;
    let p = s.gw.proxy;
    let preflight = |origin: &'static str, method: &'static str, fields: Option<&'static str>| {
        let mut h = vec![
            ("origin", origin),
            ("access-control-request-method", method),
        ];
        if let Some(f) = fields {
            h.push(("access-control-request-headers", f));
        }
        h
    };
    // The route answers GET and PUT only: its preflights are answered all the same.
    let a = raw(
        p,
        "OPTIONS",
        "/api/items",
        &preflight(APP, "PUT", Some("x-api-key,content-type")),
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.head);
    granted(&a, APP);
    assert_eq!(
        a.header("access-control-allow-methods").as_deref(),
        Some("GET, HEAD, POST, PUT, PATCH, DELETE")
    );
    assert_eq!(
        a.header("access-control-allow-headers").as_deref(),
        Some("authorization, content-type, x-api-key")
    );
    assert_eq!(a.header("access-control-max-age").as_deref(), Some("600"));
    assert_eq!(a.header("content-length"), None, "{}", a.head);
    assert!(a.body.is_empty());
    let a = raw(
        p,
        "OPTIONS",
        "/api",
        &preflight("https://deep.sub.example.org", "DELETE", None),
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.head);
    granted(&a, "https://deep.sub.example.org");

    // Refused: 403 problem+json, no CORS field, nothing forwarded.
    let long_fields = format!("x-api-key{}", ", content-type".repeat(400));
    let long_fields: &'static str = Box::leak(long_fields.into_boxed_str());
    let long_origin: &'static str =
        Box::leak(format!("https://{}.example.org", "a".repeat(400)).into_boxed_str());
    for (what, h) in [
        ("origin", preflight(EVIL, "GET", None)),
        (
            "look-alike origin",
            preflight("https://app.example.com.evil.io", "GET", None),
        ),
        ("null origin", preflight("null", "GET", None)),
        (
            "malformed origin",
            preflight("https://app.example.com/path", "GET", None),
        ),
        ("oversized origin", preflight(long_origin, "GET", None)),
        ("method", preflight(APP, "PURGE", None)),
        ("malformed method", preflight(APP, "G(E)T", None)),
        ("field", preflight(APP, "PUT", Some("x-api-key, x-secret"))),
        (
            "malformed fields",
            preflight(APP, "PUT", Some("x-api-key, (bad)")),
        ),
        ("oversized fields", preflight(APP, "PUT", Some(long_fields))),
    ] {
        let a = raw(p, "OPTIONS", "/api/items", &h).await;
        assert_eq!(a.status, 403, "{what}: {}", a.head);
        assert_eq!(
            a.header("content-type").as_deref(),
            Some("application/problem+json"),
            "{what}"
        );
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["code"], "cors_refused", "{what}");
        if what.contains("origin") {
            refused(&a);
        }
    }
    assert_eq!(s.up.count(), 0, "a preflight reached the upstream");

    // An OPTIONS that is not a preflight is an ordinary request: this route does not answer
    // OPTIONS (405, with the CORS fields so a script can read why).
    let a = raw(p, "OPTIONS", "/api", &[("origin", APP)]).await;
    assert_eq!(a.status, 405, "{}", a.head);
    granted(&a, APP);
    assert_eq!(s.up.count(), 0);
}

/// A page logs in across origins: the login call's preflight is answered under the same
/// (default) rules as its answer; an origin they do not allow is refused both.
#[tokio::test]
async fn the_login_call_is_preflighted_under_the_rules_of_its_answer() {
    let s = setup().await;
    let p = s.gw.proxy;
    let pre = |origin: &'static str| {
        vec![
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type"),
        ]
    };
    let a = raw(p, "OPTIONS", "/auth/login", &pre(APP)).await;
    assert_eq!(a.status, 204, "{}", a.head);
    assert_eq!(all(&a, "access-control-allow-origin"), [APP], "{}", a.head);
    let a = raw(p, "OPTIONS", "/auth/login", &pre(EVIL)).await;
    assert_eq!(a.status, 403, "{}", a.head);
    refused(&a);
    let body = format!("{{\"api_key\":\"{}\"}}", s.key);
    let mut c = Raw::connect(p).await;
    c.send(
        format!(
            "POST /auth/login HTTP/1.1\r\nHost: localhost\r\nOrigin: {APP}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let a = c.read("POST").await;
    assert_eq!(a.status, 200, "{}", a.head);
    granted(&a, APP);
    assert_eq!(
        s.up.count(),
        0,
        "a login or its preflight reached the upstream"
    );
}

#[tokio::test]
async fn keygate_own_refusals_carry_the_cors_fields() {
    let s = setup().await;
    let p = s.gw.proxy;
    let key = s.key.as_str();
    let bad = format!("kg_{}", "A".repeat(49));
    for (what, path, headers, status) in [
        ("no key", "/api", vec![("origin", APP)], 401),
        (
            "wrong key",
            "/api",
            vec![("origin", APP), ("x-api-key", bad.as_str())],
            401,
        ),
        (
            "permission",
            "/private",
            vec![("origin", APP), ("x-api-key", key)],
            403,
        ),
        (
            "no route",
            "/nowhere",
            vec![("origin", APP), ("x-api-key", key)],
            404,
        ),
    ] {
        let a = raw(p, "GET", path, &headers).await;
        assert_eq!(a.status, status, "{what}: {}", a.head);
        granted(&a, APP);
        // Another origin gets the same refusal, unreadable.
        let mut other = headers.clone();
        other[0] = ("origin", EVIL);
        let a = raw(p, "GET", path, &other).await;
        assert_eq!(a.status, status, "{what}: {}", a.head);
        refused(&a);
    }
    let first = raw(p, "GET", "/limited", &[("origin", APP), ("x-api-key", key)]).await;
    assert_eq!(first.status, 200, "{}", first.head);
    let a = raw(p, "GET", "/limited", &[("origin", APP), ("x-api-key", key)]).await;
    assert_eq!(a.status, 429, "{}", a.head);
    granted(&a, APP);
    assert!(a.header("retry-after").is_some(), "{}", a.head);
    assert_eq!(s.up.count(), 1);
}

#[tokio::test]
async fn credentials_never_get_a_wildcard_and_routes_replace_the_default() {
    let s = setup().await;
    let p = s.gw.proxy;
    let key = s.key.as_str();
    // /creds: only APP, credentials, GET, x-api-key, max_age 60.
    let a = raw(p, "GET", "/creds", &[("x-api-key", key), ("origin", APP)]).await;
    assert_eq!(a.status, 200, "{}", a.head);
    granted(&a, APP);
    assert_eq!(
        all(&a, "access-control-allow-credentials"),
        ["true"],
        "{}",
        a.head
    );
    let pre = |method: &'static str, fields: &'static str| {
        vec![
            ("origin", APP),
            ("access-control-request-method", method),
            ("access-control-request-headers", fields),
        ]
    };
    let a = raw(p, "OPTIONS", "/creds", &pre("GET", "x-api-key")).await;
    assert_eq!(a.status, 204, "{}", a.head);
    granted(&a, APP);
    assert_eq!(
        a.header("access-control-allow-credentials").as_deref(),
        Some("true")
    );
    assert_eq!(
        a.header("access-control-allow-methods").as_deref(),
        Some("GET")
    );
    assert_eq!(
        a.header("access-control-allow-headers").as_deref(),
        Some("x-api-key")
    );
    assert_eq!(a.header("access-control-max-age").as_deref(), Some("60"));
    for (method, fields) in [("PUT", "x-api-key"), ("GET", "authorization")] {
        let a = raw(p, "OPTIONS", "/creds", &pre(method, fields)).await;
        assert_eq!(a.status, 403, "{method} {fields}: {}", a.head);
    }
    // The default's wildcard does not apply where the route has its own rules.
    let a = raw(
        p,
        "GET",
        "/creds",
        &[("x-api-key", key), ("origin", "https://a.example.org")],
    )
    .await;
    refused(&a);

    // /open: every origin, without credentials: `*`, even for `null`.
    for origin in [EVIL, "null", APP] {
        let a = raw(p, "GET", "/open", &[("x-api-key", key), ("origin", origin)]).await;
        assert_eq!(a.status, 200, "{}", a.head);
        granted(&a, "*");
        assert_eq!(a.header("access-control-allow-credentials"), None);
    }
    let a = raw(
        p,
        "OPTIONS",
        "/open",
        &[
            ("origin", EVIL),
            ("access-control-request-method", "PATCH"),
            ("access-control-request-headers", "x-anything, x-api-key"),
        ],
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.head);
    assert_eq!(
        a.header("access-control-allow-headers").as_deref(),
        Some("x-anything, x-api-key")
    );

    // /plain: `origins = []` turns CORS off there: the upstream's fields pass untouched and a
    // preflight is an ordinary request (a key needed, then forwarded).
    let a = raw(p, "GET", "/plain", &[("x-api-key", key), ("origin", APP)]).await;
    assert_eq!(a.status, 200, "{}", a.head);
    assert_eq!(
        a.header("access-control-allow-origin").as_deref(),
        Some(UPSTREAM_ORIGIN)
    );
    assert_eq!(a.header("access-control-max-age").as_deref(), Some("99999"));
    assert!(!varies_on_origin(&a), "{}", a.head);
    let before = s.up.count();
    let preflight = [("origin", APP), ("access-control-request-method", "PUT")];
    let a = raw(p, "OPTIONS", "/plain", &preflight).await;
    assert_eq!(a.status, 401, "{}", a.head);
    refused(&a);
    let mut with_key = preflight.to_vec();
    with_key.push(("x-api-key", key));
    let a = raw(p, "OPTIONS", "/plain", &with_key).await;
    assert_eq!(a.status, 200, "{}", a.head);
    assert_eq!(s.up.count(), before + 1);
    assert_eq!(
        s.up.seen.lock().unwrap().last().map(String::as_str),
        Some("OPTIONS /plain")
    );
}

#[test]
fn check_config_refuses_bad_cors_settings_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let good = cors_config("127.0.0.1:9".parse().unwrap(), &dir.path().join("k.db"));
    std::fs::write(&path, &good).unwrap();
    let out = Binary::command(["check-config", "--config"])
        .arg(&path)
        .output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = good
        .replace(
            r#"cors = { origins = ["https://app.example.com", "https://*.example.org"], expose_headers = ["x-request-id"] }"#,
            r#"cors = { origins = ["*"], credentials = true, max_age = 86401 }"#,
        )
        .replace(
            r#"cors = { origins = [] }"#,
            r#"cors = { origins = ["app.example.com", "https://a.example.com/", "https://*example.com", "https://a.*.example.com", "https://*.com", "null"], methods = ["G T"], headers = ["bad header"], expose_headers = ["x:y"] }"#,
        );
    assert_ne!(bad, good);
    std::fs::write(&path, &bad).unwrap();
    let out = Binary::command(["check-config", "--config"])
        .arg(&path)
        .output();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        // `*` with credentials, explained.
        "proxy.cors: origins = [\"*\"] with credentials = true",
        "browsers refuse",
        "proxy.cors.max_age: 86401 is out of range",
        "routes[5].cors.origins: \"app.example.com\": an origin is scheme://host[:port]",
        "routes[5].cors.origins: \"https://a.example.com/\": an origin has no path",
        "routes[5].cors.origins: \"https://*example.com\"",
        "routes[5].cors.origins: \"https://a.*.example.com\"",
        "routes[5].cors.origins: \"https://*.com\": a wildcard is",
        "routes[5].cors.origins: \"null\"",
        "routes[5].cors.methods: \"G T\" is not an HTTP method",
        "routes[5].cors.headers: \"bad header\" is not a header field name",
        "routes[5].cors.expose_headers: \"x:y\" is not a header field name",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
    // An unknown field in a cors table is named.
    std::fs::write(
        &path,
        good.replace("max_age = 60", "max_age = 60, allow_all = true"),
    )
    .unwrap();
    let out = Binary::command(["check-config", "--config"])
        .arg(&path)
        .output();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("allow_all"));
}

#[tokio::test]
async fn preflights_change_nothing_whatever_credential_they_carry() {
    let s = setup().await;
    let p = s.gw.proxy;
    let key = s.key.as_str();
    let bad = format!("kg_{}", "A".repeat(49));
    let forged = "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
    // More preflights than the route's limit (1 a minute) and the failed-authentication
    // allowance (20 a minute), with the right key, a wrong one, a forged token or none.
    for i in 0..30 {
        let mut h = vec![
            ("origin", APP),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "x-api-key"),
        ];
        match i % 4 {
            0 => h.push(("x-api-key", key)),
            1 => h.push(("x-api-key", bad.as_str())),
            2 => h.push(("authorization", forged)),
            _ => {}
        }
        let a = raw(p, "OPTIONS", "/limited", &h).await;
        assert_eq!(a.status, 204, "preflight {i}: {}", a.head);
    }
    assert_eq!(s.up.count(), 0, "a preflight reached the upstream");
    // Nothing was counted: the route's one request a minute is still there, and a missing
    // key is still a 401, not a throttled 429.
    let a = raw(p, "GET", "/limited", &[("origin", APP), ("x-api-key", key)]).await;
    assert_eq!(a.status, 200, "{}", a.head);
    let a = raw(
        p,
        "GET",
        "/api",
        &[("origin", APP), ("x-api-key", bad.as_str())],
    )
    .await;
    assert_eq!(a.status, 401, "{}", a.head);
    granted(&a, APP);
    assert_eq!(s.up.count(), 1);
}
