//! Metrics with exact values, batched last_used_at and usage counts (flushed on shutdown),
//! access and audit logs, a full session at trace level that must not leak any secret, and a
//! graceful shutdown of the real binary.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::binary::Binary;
use crate::support::{ADMIN_KEY, Gateway, Upstream, config_text};

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

#[tokio::test]
async fn metrics_move_exactly_as_the_requests_predict() {
    let gw = Gateway::start_with(
        "[[routes]]\npath = \"/\"\n[[routes]]\npath = \"/open\"\nauth = \"none\"\n",
    )
    .await;
    let (key, _) = gw.client("acme", "pro").await;
    let unknown = keygate::keys::KeyFormat::new("kg_").generate().plaintext.0;
    for _ in 0..3 {
        assert_eq!(gw.get_with_key("/a", &key).await.status, 200);
    }
    assert_eq!(gw.get_with_key("/a", "garbage").await.status, 401);
    assert_eq!(gw.get_with_key("/a", &unknown).await.status, 401);
    assert_eq!(gw.get_with_key("/a", &unknown).await.status, 401);
    assert_eq!(gw.get("/a", &[]).await.status, 401);
    assert_eq!(gw.get("/open/x", &[]).await.status, 200);
    assert_eq!(gw.get_with_key("/a/../b", &key).await.status, 400);

    let r = gw.admin_as("GET", "/metrics", None, &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let m = String::from_utf8(r.body.to_vec()).unwrap();
    assert_eq!(
        metric(&m, "keygate_requests_total{route=\"/\",status=\"2xx\"}"),
        3
    );
    assert_eq!(
        metric(&m, "keygate_requests_total{route=\"/\",status=\"4xx\"}"),
        4
    );
    assert_eq!(
        metric(&m, "keygate_requests_total{route=\"/open\",status=\"2xx\"}"),
        1
    );
    assert_eq!(
        metric(
            &m,
            "keygate_requests_total{route=\"(none)\",status=\"4xx\"}"
        ),
        1
    );
    assert_eq!(metric(&m, "keygate_auth_total{outcome=\"valid\"}"), 3);
    assert_eq!(
        metric(&m, "keygate_auth_total{outcome=\"invalid_api_key\"}"),
        3
    );
    assert_eq!(
        metric(&m, "keygate_auth_total{outcome=\"missing_credentials\"}"),
        1
    );
    assert_eq!(metric(&m, "keygate_auth_total{outcome=\"public\"}"), 1);
    // First use of the key and of the unknown key miss; then hits and a negative hit. The
    // garbage key never reaches the cache.
    assert_eq!(metric(&m, "keygate_cache_total{result=\"miss\"}"), 2);
    assert_eq!(metric(&m, "keygate_cache_total{result=\"hit\"}"), 2);
    assert_eq!(
        metric(&m, "keygate_cache_total{result=\"negative_hit\"}"),
        1
    );
    assert_eq!(metric(&m, "keygate_upstream_duration_seconds_count"), 4);
    assert!(metric(&m, "keygate_store_duration_seconds_count") >= 3);
    assert!(metric(&m, "keygate_connections{listener=\"admin\"}") >= 1);
    // No secret and no raw path in any label.
    assert!(!m.contains(&key) && !m.contains(&unknown) && !m.contains("/a/../b"));
}

/// The open-connections gauge of the proxy listener, read from the admin listener.
async fn proxy_connections(gw: &Gateway) -> u64 {
    let r = gw.admin_as("GET", "/metrics", None, &[]).await;
    let m = String::from_utf8(r.body.to_vec()).unwrap();
    metric(&m, "keygate_connections{listener=\"proxy\"}")
}

#[tokio::test]
async fn open_connections_are_counted_while_open_and_uncounted_once_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start().await;
    let (key, _) = gw.client("acme", "pro").await;
    let before = proxy_connections(&gw).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
        let req = format!("GET /a HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        held.push(s);
    }
    // Idle keep-alive connections are open connections.
    assert_eq!(proxy_connections(&gw).await, before + 3);
    drop(held);
    // Closed by the client: each is uncounted once the server reads its end.
    let asked = Instant::now();
    let mut now = proxy_connections(&gw).await;
    while now != before && asked.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        now = proxy_connections(&gw).await;
    }
    assert_eq!(now, before, "connections still counted after they closed");
}

#[tokio::test]
async fn last_used_and_usage_are_batched_and_flushed_on_shutdown() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&upstream.url(), &dir.path().join("k.db"), "")
        .replace("[store]", "[store]\nlast_used_flush_secs = 3600");
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let (key, id) = gw.client("acme", "pro").await;
    let login = {
        let req = http::Request::post(format!("http://{}/auth/login", gw.proxy))
            .body(http_body_util::Full::new(bytes::Bytes::from(
                json!({"api_key": key}).to_string(),
            )))
            .unwrap();
        gw.send(req).await.json()["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    for _ in 0..5 {
        assert_eq!(gw.get_with_key("/", &key).await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(gw.get_with_key("/", &login).await.status, 200);
    }
    // Nothing was written on the request path.
    let r = gw.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(r.json()["last_used_at"], Value::Null);
    let r = gw
        .admin("GET", &format!("/v1/api-keys/{id}/usage"), None)
        .await;
    assert_eq!(r.json()["total"], 0);

    // A graceful stop flushes; a new process over the same file sees everything.
    let (upstream, dir) = gw.stop().await;
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let r = gw.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    let last = r.json()["last_used_at"]
        .as_str()
        .expect("last_used_at set")
        .to_owned();
    assert!(last.ends_with('Z'));
    let listing = gw.admin("GET", "/v1/api-keys", None).await.json();
    assert_eq!(listing["data"][0]["last_used_at"], last.as_str());
    let r = gw
        .admin("GET", &format!("/v1/api-keys/{id}/usage?days=7"), None)
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["total"], 7, "{v}");
    assert_eq!(v["days"][0]["requests"], 7);
    assert_eq!(
        v["days"][0]["date"],
        chrono::Utc::now().format("%Y-%m-%d").to_string()
    );
    assert_eq!(
        gw.admin("GET", &format!("/v1/api-keys/{id}/usage?days=0"), None)
            .await
            .status,
        422
    );
}

#[tokio::test]
async fn usage_is_flushed_periodically() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&upstream.url(), &dir.path().join("k.db"), "")
        .replace("[store]", "[store]\nlast_used_flush_secs = 1");
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let (key, id) = gw.client("acme", "pro").await;
    for _ in 0..3 {
        gw.get_with_key("/", &key).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = gw
            .admin("GET", &format!("/v1/api-keys/{id}/usage"), None)
            .await
            .json();
        if v["total"] == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "usage never flushed: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const JWT_SECRET: &str = "jwt-secret-for-the-log-test-0123456789";

/// The real binary serving `config` from `dir`, logging JSON at trace level.
pub(crate) fn spawn(config: &str, dir: &std::path::Path) -> Binary {
    Binary::serve(config, dir)
        .env("RUST_LOG", "trace")
        .env("KEYGATE_JWT_SECRET", JWT_SECRET)
        .json_logs()
        .spawn()
}

fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn call(
    method: &str,
    url: String,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    use http_body_util::BodyExt;
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = body
        .map(|v| bytes::Bytes::from(v.to_string()))
        .unwrap_or_default();
    let res = client()
        .request(b.body(http_body_util::Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_full_session_at_trace_level_logs_no_secret() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.db");
    let text =
        config_text(&upstream.url(), &db, "").replace("access_log = false", "access_log = true");
    let mut p = spawn(&text, dir.path());
    let admin = |path: &str| format!("http://{}{path}", p.admin);
    let proxy = |path: &str| format!("http://{}{path}", p.proxy);
    let ak = [("x-admin-key", ADMIN_KEY)];
    let mut secrets: Vec<String> = vec![ADMIN_KEY.into(), JWT_SECRET.into()];

    let (s, v) = call(
        "POST",
        admin("/v1/clients"),
        &ak,
        Some(json!({"client_id": "acme", "license": "pro", "permissions": ["keys:manage"]})),
    )
    .await;
    assert_eq!(s, 201);
    let k1 = v["api_key"]["key"].as_str().unwrap().to_owned();
    let (_, v) = call(
        "POST",
        admin("/v1/api-keys"),
        &ak,
        Some(json!({"name": "two", "client_id": "acme"})),
    )
    .await;
    let (k2, id2) = (
        v["key"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().to_owned(),
    );
    secrets.extend([k1.clone(), k2.clone()]);

    use base64::Engine;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{k2}:"))
    );
    for h in [
        ("authorization", format!("Bearer {k1}")),
        ("x-api-key", k2.clone()),
        ("authorization", basic),
    ] {
        assert_eq!(
            call("GET", proxy("/hello?q=1"), &[(h.0, h.1.as_str())], None)
                .await
                .0,
            200
        );
    }
    let (s, v) = call(
        "POST",
        proxy("/auth/login"),
        &[],
        Some(json!({"api_key": k1})),
    )
    .await;
    assert_eq!(s, 200);
    let token = v["access_token"].as_str().unwrap().to_owned();
    secrets.push(token.clone());
    assert_eq!(
        call(
            "GET",
            proxy("/t"),
            &[("authorization", &format!("Bearer {token}"))],
            None
        )
        .await
        .0,
        200
    );
    // Self-service with the key and the token.
    assert_eq!(
        call("GET", admin("/v1/api-keys"), &[("x-api-key", &k1)], None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(
            "GET",
            admin("/v1/api-keys"),
            &[("authorization", &format!("Bearer {token}"))],
            None
        )
        .await
        .0,
        200
    );
    // Failures of every kind.
    let bad = keygate::keys::KeyFormat::new("kg_").generate().plaintext.0;
    secrets.push(bad.clone());
    assert_eq!(
        call("GET", proxy("/x"), &[("x-api-key", &bad)], None)
            .await
            .0,
        401
    );
    assert_eq!(
        call(
            "GET",
            admin("/v1/api-keys"),
            &[("x-admin-key", "wrong-admin-key-wrong")],
            None
        )
        .await
        .0,
        401
    );
    let (s, v) = call(
        "POST",
        admin(&format!("/v1/api-keys/{id2}/rotate")),
        &ak,
        Some(json!({"grace_period_seconds": 5})),
    )
    .await;
    assert_eq!(s, 200);
    let k3 = v["key"].as_str().unwrap().to_owned();
    secrets.push(k3.clone());
    assert_eq!(
        call("GET", proxy("/r"), &[("x-api-key", &k3)], None)
            .await
            .0,
        200
    );
    let (s, v) = call(
        "POST",
        admin("/auth/create_client"),
        &ak,
        Some(json!({"client_id": "kx", "license": "free"})),
    )
    .await;
    assert_eq!(s, 201);
    secrets.push(v["api_key"].as_str().unwrap().to_owned());
    let (_, v) = call(
        "POST",
        admin("/auth/create_client_key"),
        &ak,
        Some(json!({"client_id": "kx"})),
    )
    .await;
    secrets.push(v["api_key"].as_str().unwrap().to_owned());
    assert_eq!(
        call("DELETE", admin(&format!("/v1/api-keys/{id2}")), &ak, None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(
            "POST",
            admin("/v1/api-keys"),
            &ak,
            Some(json!({"name": "", "client_id": "nobody"}))
        )
        .await
        .0,
        422
    );

    // A webhook whose URL carries a credential in its path and query: the audit line names
    // its origin only; its signing secret is in no line either (the store holds both: it
    // signs and sends with them).
    let (s, v) = call(
        "POST",
        admin("/v1/webhooks"),
        &ak,
        Some(json!({
            "url": "http://127.0.0.1:9/services/T0/B0/hook-path-credential?token=hook-query-credential",
            "events": ["client.deleted"],
        })),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    // Its secret rotated with a grace period: the new one is in no line either.
    let (s, rotated) = call(
        "POST",
        admin(&format!(
            "/v1/webhooks/{}/rotate",
            v["id"].as_str().unwrap()
        )),
        &ak,
        Some(json!({"grace_period_seconds": 60})),
    )
    .await;
    assert_eq!(s, 200, "{rotated}");
    let webhook_secrets = [
        "hook-path-credential".to_owned(),
        "hook-query-credential".to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
        rotated["secret"].as_str().unwrap().to_owned(),
    ];

    // A mutation with a wrong admin key: refused, audited without a caller, the guess nowhere.
    let guess = "guessed-admin-key-0123456789abcdef";
    secrets.push(guess.into());
    assert_eq!(
        call(
            "DELETE",
            admin("/v1/clients/acme"),
            &[("x-admin-key", guess)],
            None
        )
        .await
        .0,
        401
    );

    assert!(p.terminate().success());
    let lines = p.lines();
    assert!(
        lines.len() > 15,
        "expected a logged session, got {} lines",
        lines.len()
    );

    let mut needles = secrets.clone();
    needles.extend(webhook_secrets);
    for s in &secrets {
        needles.push(hex::encode(keygate::keys::KeyHash::of(s).0));
    }
    // The key body without its prefix, too (a log could cut the prefix off).
    for s in &secrets {
        if let Some(body) = s.strip_prefix("kg_") {
            needles.push(body.to_owned());
        }
    }
    for (i, line) in lines.iter().enumerate() {
        for n in &needles {
            assert!(
                !line.contains(n.as_str()),
                "line {i} leaks a secret: {line}"
            );
        }
    }
    // The store holds no plaintext key either (file and WAL).
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let f = f.unwrap().path();
        if f.to_string_lossy().contains("k.db") {
            let bytes = std::fs::read(&f).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            for s in &secrets {
                assert!(!text.contains(s.as_str()), "{} holds a secret", f.display());
            }
        }
    }

    // Access lines carry the documented fields; audit lines name the action.
    let access: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "keygate::access")
        .collect();
    assert!(access.len() >= 6, "{} access lines", access.len());
    let ok = access
        .iter()
        .find(|v| v["status"] == 200 && v["key_id"].is_string())
        .expect("an access line with a key id");
    for f in [
        "method",
        "path",
        "route",
        "status",
        "latency_us",
        "upstream_us",
        "key_id",
        "client_id",
        "peer",
    ] {
        assert!(!ok[f].is_null(), "access line lacks {f}: {ok}");
    }
    assert_eq!(ok["path"], "/hello", "the query string is not logged");
    let audits: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "keygate::audit")
        .collect();
    for action in [
        "client.create",
        "key.create",
        "key.rotate",
        "key.delete",
        "client.recreate_key",
        "webhook.create",
    ] {
        assert!(
            audits.iter().any(|v| v["action"] == action),
            "no audit line for {action}"
        );
    }
    assert!(
        audits.iter().any(|v| v["outcome"] == 422),
        "failed mutation not audited"
    );
    let hook = audits
        .iter()
        .find(|v| v["action"] == "webhook.create")
        .unwrap();
    assert_eq!(hook["url"], "http://127.0.0.1:9", "{hook}");
    let refused: Vec<&Value> = audits.iter().filter(|v| v["outcome"] == 401).collect();
    assert_eq!(
        refused.len(),
        1,
        "a refused admin credential is audited: {audits:?}"
    );
    assert_eq!(refused[0]["path"], "/v1/clients/acme");
    assert_eq!(refused[0]["action"], "DELETE");
    assert!(
        refused[0]["caller"].is_null() || refused[0]["caller"] == "None",
        "{}",
        refused[0]
    );
    assert!(
        refused[0]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1"))
    );
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_and_refuses_new_ones() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&upstream.url(), &dir.path().join("k.db"), "")
        .replace("[log]", "[server]\nshutdown_grace_secs = 10\n[log]");
    let mut p = spawn(&text, dir.path());
    let (s, v) = call(
        "POST",
        format!("http://{}/v1/clients", p.admin),
        &[("x-admin-key", ADMIN_KEY)],
        Some(json!({"client_id": "acme", "license": "pro"})),
    )
    .await;
    assert_eq!(s, 201);
    let key = v["api_key"]["key"].as_str().unwrap().to_owned();
    let url = format!("http://{}/slow/1500", p.proxy);
    let auth = format!("Bearer {key}");
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let r = call("GET", url, &[("authorization", &auth)], None).await;
        (r, started.elapsed())
    });
    // Let the slow request reach the upstream, then ask keygate to stop.
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.count() == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New connections are refused while the in-flight request drains.
    let refused = tokio::net::TcpStream::connect(&p.proxy).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during shutdown"
    );
    let ((status, _), took) = slow.await.unwrap();
    assert_eq!(status, 200, "in-flight request did not complete");
    assert!(took >= Duration::from_millis(1400));
    // Within the grace period (10 s) plus slack.
    let exit = p.wait_exit(Duration::from_secs(12));
    assert!(exit.success(), "exit status {exit}");
}

/// The admin audit line of a refused mutation in the default human log: a path holding
/// characters log readers take for line breaks (U+0085, U+2028) or for spaces (U+00A0), sent to
/// forge fields or lines, is quoted and escaped; and requests with no credential at all are
/// counted as failed authentications, so a flood of them is answered 429 past the allowance and
/// writes no more audit lines than that.
#[tokio::test]
async fn admin_audit_lines_cannot_be_forged_or_flooded_without_a_credential() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_text("http://127.0.0.1:9", &dir.path().join("k.db"), "");
    let p = Binary::serve(&config, dir.path()).spawn();
    let forged = "/v1/clients/x\u{85}caller=Some(Admin)\u{a0}outcome=200\u{2028}keygate::audit";
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let mut s = tokio::net::TcpStream::connect(p.admin).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(
            format!("DELETE {forged} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        statuses.push(String::from_utf8_lossy(&out[9..12]).into_owned());
    }
    assert_eq!(statuses[0], "401");
    assert_eq!(statuses[39], "429", "{statuses:?}");
    let audited = || {
        p.lines()
            .into_iter()
            .filter(|l| l.contains("keygate::audit"))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while audited().is_empty() {
        assert!(Instant::now() < deadline, "no audit line: {:?}", p.lines());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lines = audited();
    let refused = statuses.iter().filter(|s| *s == "401").count();
    assert_eq!(
        lines.len(),
        refused,
        "one line per 401, none per 429: {lines:?}"
    );
    for l in &lines {
        for c in ['\u{85}', '\u{2028}', '\u{a0}'] {
            assert!(!l.contains(c), "raw {c:?} in {l:?}");
        }
        assert!(l.contains("path=\"/v1/clients/x\\u{85}"), "{l}");
    }
}
