//! The holes of an adversarial review of the data plane, each closed and proven here against
//! the real gateway: method rules that other methods (or spellings) dodged, look-alike paths,
//! credentials forwarded although unused, identity trailers, the failed-auth limiter locking
//! out the innocent, and authenticated answers a shared cache could store.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Gateway, Upstream, config_text};

/// One raw request on its own connection (`Connection: close` is added); the answer's status,
/// head and body.
async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{head}Connection: close\r\n\r\n").into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answered and closed")
        .unwrap();
    let at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&out[..at]).into_owned();
    let status = head[9..12].parse().unwrap();
    (status, head, out[at + 4..].to_vec())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

const METHOD_ROUTES: &str = r#"
[[routes]]
path = "/"
[[routes]]
path = "/admin"
methods = ["GET"]
permissions = ["ADMIN"]
"#;

#[tokio::test]
async fn a_method_restricted_route_cannot_be_reached_with_another_method_or_spelling() {
    let gw = Gateway::start_with(METHOD_ROUTES).await;
    let (plain, _) = gw.client("acme", "pro").await;
    let admin = gw
        .key("acme", serde_json::json!({"permissions": ["ADMIN"]}))
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = gw.upstream.count();
    let auth = |k: &str| format!("Host: g\r\nX-API-Key: {k}\r\n");
    // Without the permission: HEAD is judged as GET (403); other methods are 405 with Allow;
    // a method that is not an uppercase token is 400. None falls through to "/".
    for (line, want) in [
        ("HEAD /admin HTTP/1.1", 403),
        ("GET /admin/x HTTP/1.1", 403),
        ("get /admin HTTP/1.1", 400),
        ("Get /admin HTTP/1.1", 400),
        ("OPTIONS /admin HTTP/1.1", 405),
        ("POST /admin HTTP/1.1", 405),
        ("DELETE /admin HTTP/1.1", 405),
        ("PURGE /admin HTTP/1.1", 405),
    ] {
        let (status, head, _) = raw(gw.proxy, &format!("{line}\r\n{}", auth(&plain)), b"").await;
        assert_eq!(status, want, "{line}: {head}");
        if want == 405 {
            assert_eq!(header(&head, "allow"), Some("GET, HEAD"), "{line}");
        }
    }
    assert_eq!(
        gw.upstream.count(),
        before,
        "a refused method reached the upstream"
    );
    // With the permission: GET and HEAD pass, POST is still 405.
    for (line, want) in [
        ("GET /admin HTTP/1.1", 200),
        ("HEAD /admin HTTP/1.1", 200),
        ("POST /admin HTTP/1.1", 405),
    ] {
        let (status, _, _) = raw(gw.proxy, &format!("{line}\r\n{}", auth(&admin)), b"").await;
        assert_eq!(status, want, "{line}");
    }
    assert_eq!(gw.upstream.count(), before + 2);
    // Method-override fields are dropped inbound: a Rails- or Laravel-style upstream cannot be
    // steered to DELETE by a request judged as GET.
    let (status, _, _) = raw(
        gw.proxy,
        &format!(
            "GET /admin HTTP/1.1\r\n{}X-HTTP-Method-Override: DELETE\r\nX-HTTP-Method: DELETE\r\nX-Method-Override: DELETE\r\n",
            auth(&admin)
        ),
        b"",
    )
    .await;
    assert_eq!(status, 200);
    let seen = gw.upstream.last();
    for name in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        assert!(!seen.headers.contains_key(name), "{name} forwarded");
    }
}

#[tokio::test]
async fn method_override_fields_pass_only_when_allowed() {
    let gw = Gateway::start_with("").await;
    let (key, _) = gw.client("acme", "pro").await;
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let cfg = config_text(&upstream.url(), &dir.path().join("k.db"), "")
        .replace("[admin]", "allow_method_override = true\n[admin]");
    let allowed = Gateway::start_from(upstream, dir, &cfg).await;
    let (key2, _) = allowed.client("acme", "pro").await;
    for (g, k, forwarded) in [(&gw, &key, false), (&allowed, &key2, true)] {
        let r = g
            .get(
                "/x",
                &[("x-api-key", k), ("x-http-method-override", "PATCH")],
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            g.upstream
                .last()
                .headers
                .contains_key("x-http-method-override"),
            forwarded
        );
    }
}

#[tokio::test]
async fn look_alike_letters_and_encoded_query_marks_do_not_dodge_a_route() {
    let routes = r#"
[[routes]]
path = "/"
[[routes]]
path = "/admin"
permissions = ["ADMIN"]
"#;
    let gw = Gateway::start_with(routes).await;
    let (plain, _) = gw.client("acme", "pro").await;
    let before = gw.upstream.count();
    for path in [
        "/%EF%BD%81dmin",
        "/adm%C4%B1n",
        "/admin%3f",
        "/admin%3Fx=1",
        "/admin%23",
        "/%E2%84%AAey",
    ] {
        let r = gw.get_with_key(path, &plain).await;
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(r.code(), "bad_request");
    }
    assert_eq!(gw.upstream.count(), before);
    // Plain paths and ordinary escapes still route.
    assert_eq!(gw.get_with_key("/%61dmin", &plain).await.status, 403);
    assert_eq!(gw.get_with_key("/a%20b", &plain).await.status, 200);

    // An operator who needs non-ASCII paths can allow them.
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let cfg = config_text(&upstream.url(), &dir.path().join("k.db"), routes)
        .replace("[admin]", "allow_non_ascii_paths = true\n[admin]");
    let open = Gateway::start_from(upstream, dir, &cfg).await;
    let (k, _) = open.client("acme", "pro").await;
    assert_eq!(open.get_with_key("/caf%C3%A9", &k).await.status, 200);
    // Encoded '?' and '#' stay refused.
    assert_eq!(open.get_with_key("/admin%3f", &k).await.status, 400);
}

#[tokio::test]
async fn every_credential_field_is_stripped_and_two_different_credentials_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let text = config_text(&upstream.url(), &dir.path().join("k.db"), "")
        .replace("[admin]", "allow_query_param = true\n[admin]");
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let (a, _) = gw.client("alice", "pro").await;
    let (b, _) = gw.client("bob", "pro").await;
    let before = gw.upstream.count();
    // Another client's key beside the one used: refused before anything is forwarded.
    for headers in [
        vec![
            ("authorization", format!("Bearer {a}")),
            ("x-api-key", b.clone()),
        ],
        vec![("x-api-key", a.clone()), ("authorization", basic(&b))],
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = gw.get("/x", &h).await;
        assert_eq!(r.status, 400, "{headers:?}");
        assert_eq!(r.code(), "bad_request");
    }
    let r = gw
        .get(
            &format!("/x?api_key={b}"),
            &[("authorization", &format!("Bearer {a}"))],
        )
        .await;
    assert_eq!(r.status, 400);
    // Two keys in one field given twice: the header twice (even holding one key), the query
    // parameter twice with two keys (only the first was read; the other was stripped unjudged).
    for (path, headers) in [
        (
            "/x".to_owned(),
            vec![("x-api-key", a.as_str()), ("x-api-key", b.as_str())],
        ),
        (
            "/x".to_owned(),
            vec![("x-api-key", a.as_str()), ("x-api-key", a.as_str())],
        ),
        (format!("/x?api_key={a}&api_key={b}"), vec![]),
    ] {
        let r = gw.get(&path, &headers).await;
        assert_eq!(r.status, 400, "{path} {}", headers.len());
        assert_eq!(r.code(), "bad_request");
    }
    assert_eq!(gw.upstream.count(), before);
    // The same key in every field (the query parameter twice): served, and no field carries
    // it upstream.
    let r = gw
        .get(
            &format!("/x?a=1&api_key={a}&b=2&api_key={a}"),
            &[("authorization", &format!("Bearer {a}")), ("x-api-key", &a)],
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = gw.upstream.last();
    assert!(!seen.headers.contains_key("authorization"));
    assert!(!seen.headers.contains_key("x-api-key"));
    assert_eq!(seen.uri, "/x?a=1&b=2");
    assert_eq!(seen.headers["x-keygate-client-id"], "alice");
    // Used by Bearer, an X-API-Key holding the same key is stripped too (it was forwarded).
    let r = gw
        .get(
            "/y",
            &[("authorization", &format!("Bearer {a}")), ("x-api-key", &a)],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(!gw.upstream.last().headers.contains_key("x-api-key"));
}

fn basic(key: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

/// A chunked upload to `/trailers` with identity trailers; what the upstream says it got.
async fn upload_with_trailers(proxy: SocketAddr, key: &str) -> Value {
    let (status, _, body) = raw(
        proxy,
        &format!(
            "POST /trailers HTTP/1.1\r\nHost: g\r\nX-API-Key: {key}\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n"
        ),
        b"5\r\nhello\r\n0\r\nX-Keygate-Client-Id: evil\r\nX_Keygate_Key_Id: evil\r\nX-Keygate-Permissions: ADMIN\r\nAuthorization: Bearer x\r\nX-Checksum: 1\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // The answer may be chunked (HTTP/1.1 from hyper): take the JSON out of it.
    let text = String::from_utf8_lossy(&body).into_owned();
    let json = &text[text.find('{').unwrap()..=text.rfind('}').unwrap()];
    serde_json::from_str(json).unwrap()
}

#[tokio::test]
async fn identity_trailers_never_reach_an_upstream() {
    // A plain http:// upstream (the gateway's own HTTP/1.1 client).
    let gw = Gateway::start().await;
    let (key, _) = gw.client("acme", "pro").await;
    let v = upload_with_trailers(gw.proxy, &key).await;
    assert_eq!(v["len"], 5);
    assert_eq!(v["trailers"], serde_json::json!(["x-checksum"]), "{v}");

    // An https:// upstream speaking HTTP/2, where every trailer frame would be sent.
    let dir = tempfile::tempdir().unwrap();
    let up_pki = crate::tls_ws::pki(dir.path(), "upstream");
    let upstream = Upstream::start_with_tls(Some(crate::tls_ws::upstream_tls(&up_pki))).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let text = config_text(&url, &dir.path().join("k.db"), "").replace(
        "[admin]",
        &format!("upstream_ca = \"{}\"\n[admin]", up_pki.ca_pem.display()),
    );
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let (key, _) = gw.client("acme", "pro").await;
    let v = upload_with_trailers(gw.proxy, &key).await;
    assert_eq!(gw.upstream.last().version, http::Version::HTTP_2);
    assert_eq!(v["trailers"], serde_json::json!(["x-checksum"]), "{v}");
}

#[tokio::test]
async fn a_flood_of_bad_keys_never_locks_out_a_valid_key_or_the_admin() {
    let gw = Gateway::start().await;
    let (good, _) = gw.client("acme", "pro").await;
    let fake = keygate::keys::KeyFormat::new("kg_").generate().plaintext.0;
    let (mut refused, mut served) = (0, 0);
    for i in 0..200 {
        let r = gw.get_with_key("/", &fake).await;
        assert!(matches!(r.status.as_u16(), 401 | 429), "{}", r.status);
        refused += usize::from(r.status == 429);
        if i % 10 == 0 {
            assert_eq!(gw.get_with_key("/", &good).await.status, 200);
            served += 1;
            // Wrong admin keys from the same address: the admin listener's budget.
            let _ = gw
                .admin_as(
                    "GET",
                    "/v1/api-keys",
                    None,
                    &[("x-admin-key", "wrong-admin-key-guess")],
                )
                .await;
            assert_eq!(gw.admin("GET", "/v1/api-keys", None).await.status, 200);
        }
    }
    assert!(refused >= 150, "the flood was not held back: {refused}");
    assert_eq!(served, 20);
    // Disabled keys are not guesses: a stale script's key never counts against its address.
    let fresh = Gateway::start().await;
    fresh.client("office", "pro").await;
    let stale = fresh
        .key("office", serde_json::json!({"enabled": false}))
        .await;
    let stale = stale["key"].as_str().unwrap().to_owned();
    for _ in 0..30 {
        let r = fresh.get_with_key("/", &stale).await;
        assert_eq!(r.code(), "disabled_api_key");
    }
    assert_eq!(fresh.get_with_key("/", &fake).await.status, 401);
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_has_its_own_budget() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let text = config_text(&upstream.url(), &dir.path().join("k.db"), "")
        .replace("[admin]", "trusted_proxies = [\"127.0.0.0/8\"]\n[admin]");
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let fake = keygate::keys::KeyFormat::new("kg_").generate().plaintext.0;
    let bearer = format!("Bearer {fake}");
    // 21 guesses from one client behind the load balancer: its 21st is refused...
    let mut last = 0;
    for _ in 0..21 {
        last = gw
            .get(
                "/",
                &[
                    ("authorization", &bearer),
                    ("x-forwarded-for", "203.0.113.9"),
                ],
            )
            .await
            .status
            .as_u16();
    }
    assert_eq!(last, 429);
    // ...another client behind the same load balancer still gets 401, not 429.
    let r = gw
        .get(
            "/",
            &[
                ("authorization", &bearer),
                ("x-forwarded-for", "198.51.100.4"),
            ],
        )
        .await;
    assert_eq!(r.status, 401);
    // A spoofed hop in front of the real client does not give it a fresh budget.
    let r = gw
        .get(
            "/",
            &[
                ("authorization", &bearer),
                ("x-forwarded-for", "1.1.1.1, 203.0.113.9"),
            ],
        )
        .await;
    assert_eq!(r.status, 429);
    // Nor one in a line of its own, with the load balancer's own line after it (HAProxy's
    // `option forwardfor` adds a line): the lines are one list.
    let r = gw
        .get(
            "/",
            &[
                ("authorization", &bearer),
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "203.0.113.9"),
            ],
        )
        .await;
    assert_eq!(r.status, 429);
    // The upstream gets the whole list, the peer appended, in one line.
    let (key, _) = gw.client("acme", "pro").await;
    let r = gw
        .get(
            "/",
            &[
                ("x-api-key", &key),
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "198.51.100.4"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = gw.upstream.last();
    let xff: Vec<_> = seen.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff, ["1.1.1.1, 198.51.100.4, 127.0.0.1"]);
}

/// Whether a shared cache may store `res` under RFC 9111 §3 and §3.5 (the request carried no
/// `Authorization`, as with `X-API-Key`): a final status, no `no-store`/`private`, and a
/// `Vary` that does not name the credential field makes the response reusable for a caller
/// without that field.
fn storable_by_shared_cache(headers: &http::HeaderMap, credential_field: &str) -> bool {
    let cc: Vec<String> = headers
        .get_all("cache-control")
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect();
    if cc
        .iter()
        .any(|d| d == "no-store" || d.starts_with("private"))
    {
        return false;
    }
    let vary: Vec<String> = headers
        .get_all("vary")
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .collect();
    // Reusable for a request without the credential field only if Vary does not name it.
    !vary.iter().any(|v| v == "*" || v == credential_field)
}

#[tokio::test]
async fn authenticated_answers_cannot_be_stored_by_a_shared_cache() {
    let routes = r#"
[[routes]]
path = "/"
[[routes]]
path = "/public"
auth = "none"
"#;
    let gw = Gateway::start_with(routes).await;
    let (key, _) = gw.client("acme", "pro").await;
    // Through the fast path (plain GET) and hyper (chunked upload), each credential form.
    let r = gw.get("/x", &[("x-api-key", &key)]).await;
    assert_eq!(r.status, 200);
    assert!(
        !storable_by_shared_cache(&r.headers, "x-api-key"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.headers["cache-control"], "private");
    assert_eq!(r.headers["vary"], "authorization, x-api-key");
    let (status, head, _) = raw(
        gw.proxy,
        &format!(
            "POST /x HTTP/1.1\r\nHost: g\r\nX-API-Key: {key}\r\nTransfer-Encoding: chunked\r\n"
        ),
        b"0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    let mut h = http::HeaderMap::new();
    for l in head.lines().skip(1) {
        let (k, v) = l.split_once(':').unwrap();
        h.append(
            http::HeaderName::from_bytes(k.trim().as_bytes()).unwrap(),
            v.trim().parse().unwrap(),
        );
    }
    assert!(!storable_by_shared_cache(&h, "x-api-key"), "{head}");
    // A public route is left as the upstream answered it.
    let r = gw.get("/public/x", &[]).await;
    assert!(!r.headers.contains_key("vary") && !r.headers.contains_key("cache-control"));
}

#[tokio::test]
async fn an_upstream_can_opt_in_to_shared_caching() {
    // An upstream marking its answer `public` (or `s-maxage`) keeps that choice; keygate still
    // names the credential fields in Vary so a cache keys on them.
    let dir = tempfile::tempdir().unwrap();
    let upstream = cache_upstream().await;
    let text = config_text(&format!("http://{upstream}"), &dir.path().join("k.db"), "");
    let gw = Gateway::start_from(Upstream::start().await, dir, &text).await;
    let (key, _) = gw.client("acme", "pro").await;
    let r = gw.get("/public-answer", &[("x-api-key", &key)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["cache-control"], "public, max-age=60");
    assert_eq!(r.headers["vary"], "authorization, x-api-key");
    let r = gw.get("/private-answer", &[("x-api-key", &key)]).await;
    let cc: Vec<&str> = r
        .headers
        .get_all("cache-control")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cc, ["max-age=60", "private"]);
}

/// An upstream answering `/public-answer` with `Cache-Control: public, max-age=60` and
/// anything else with `max-age=60`.
async fn cache_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let cc = if head.starts_with("GET /public-answer ") {
                        "public, max-age=60"
                    } else {
                        "max-age=60"
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncache-control: {cc}\r\ncontent-length: 2\r\n\r\nok"
                    );
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_login_body_dripped_a_byte_at_a_time_is_cut_off_in_all() {
    let gw = Gateway::start_with("[limits]\nbody_timeout_secs = 1\n").await;
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(b"POST /auth/login HTTP/1.1\r\nHost: g\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // One byte every 300 ms: never a pause as long as the body timeout.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    for _ in 0..20 {
        let _ = s.write_all(b" ").await;
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                answer.extend_from_slice(&chunk[..n]);
                break;
            }
            Ok(_) => break,
            Err(_) => {}
        }
    }
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(took < Duration::from_secs(4), "answered after {took:?}");
}

/// DNS rebinding: a web page whose name resolves to 127.0.0.1 reaches a loopback admin
/// listener from the operator's browser, under its own name. The admin listener on loopback
/// answers `localhost`, IP addresses and the names of `[admin] allowed_hosts` only; another
/// `Host` (or HTTP/2 `:authority`) is 421 before anything is read or changed, even with a
/// valid admin key.
#[tokio::test]
async fn a_loopback_admin_listener_refuses_foreign_host_names() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&upstream.url(), &dir.path().join("k.db"), "")
        .replace("[admin]\n", "[admin]\nallowed_hosts = [\"admin.test\"]\n");
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let port = gw.admin.port();
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        "localhost.evil.example".to_string(),
    ] {
        for (method, path, body) in [
            ("GET", "/healthz", ""),
            ("GET", "/metrics", ""),
            ("GET", "/console", ""),
            ("POST", "/auth/login", "{\"api_key\": \"x\"}"),
            ("GET", "/v1/clients", ""),
            (
                "POST",
                "/v1/clients",
                "{\"client_id\": \"rebound\", \"license\": \"pro\"}",
            ),
        ] {
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {host}\r\nX-Admin-Key: {}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n",
                crate::support::ADMIN_KEY,
                body.len()
            );
            let (status, _, answer) = raw(gw.admin, &head, body.as_bytes()).await;
            assert_eq!(status, 421, "{method} {path} Host {host}");
            let v: Value = serde_json::from_slice(&answer).unwrap();
            assert_eq!(v["code"], "misdirected_request");
            assert!(!String::from_utf8_lossy(&answer).contains(&host));
        }
    }
    // The public key set is answered under any name (verifiers fetch it by theirs).
    let head = "GET /.well-known/jwks.json HTTP/1.1\r\nHost: keygate-admin.internal\r\n";
    assert_ne!(raw(gw.admin, head, b"").await.0, 421);
    // HTTP/2: the `:authority` is the name.
    let tcp = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for (authority, want) in [("evil.example", 421), ("localhost", 200)] {
        let req = http::Request::get(format!("http://{authority}:{port}/healthz"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let res = h2.send_request(req).await.unwrap();
        assert_eq!(res.status().as_u16(), want, "{authority}");
    }
    // Nothing was made.
    let r = gw.admin("GET", "/v1/clients/rebound", None).await;
    assert_eq!(r.status, 404);
    // The names it answers.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "admin.test".to_string(),
        format!("ADMIN.test:{port}"),
    ] {
        let head = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n");
        assert_eq!(raw(gw.admin, &head, b"").await.0, 200, "{host}");
    }
    let body = br#"{"client_id": "named", "license": "pro"}"#;
    let head = format!(
        "POST /v1/clients HTTP/1.1\r\nHost: admin.test:{port}\r\nX-Admin-Key: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        crate::support::ADMIN_KEY,
        body.len()
    );
    assert_eq!(raw(gw.admin, &head, body).await.0, 201);
}
