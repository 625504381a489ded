//! The data plane with API keys: credentials, statuses and codes, header rewriting, routes,
//! streaming, upstream failures.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::support::{Gateway, Upstream, closed_port, pattern};

#[tokio::test]
async fn a_key_gets_through_with_credential_stripped_and_identity_added() {
    let gw = Gateway::start().await;
    let (key, key_id) = gw.client("acme", "pro").await;

    let r = gw
        .get(
            "/hello?x=1",
            &[
                ("authorization", &format!("Bearer {key}")),
                ("x-keygate-client-id", "spoofed"),
                ("x-keygate-admin", "1"),
                ("connection", "x-drop-me"),
                ("x-drop-me", "1"),
                ("x-forwarded-for", "10.1.2.3"),
                ("host", "api.example.com"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = gw.upstream.last();
    assert_eq!(seen.uri, "/hello?x=1");
    let h = &seen.headers;
    assert!(!h.contains_key("authorization"), "credential forwarded");
    assert_eq!(h["x-keygate-client-id"], "acme");
    assert_eq!(h["x-keygate-key-id"], key_id.as_str());
    assert_eq!(h["x-keygate-license"], "pro");
    assert_eq!(h["x-keygate-permissions"], "");
    assert!(!h.contains_key("x-keygate-admin"));
    assert!(!h.contains_key("x-drop-me"));
    assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "api.example.com");
    assert_eq!(h["host"], gw.upstream.addr.to_string().as_str());
    // Hop-by-hop headers from the upstream are not relayed.
    assert!(!r.headers.contains_key("keep-alive"));
    // No secret is echoed anywhere in what the upstream saw.
    let all: String = h.iter().map(|(k, v)| format!("{k}:{v:?}\n")).collect();
    assert!(!all.contains(&key));
}

#[tokio::test]
async fn every_credential_form_is_accepted_and_stripped() {
    use base64::Engine;
    let gw = Gateway::start().await;
    let (key, _) = gw.client("acme", "pro").await;
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    for (name, value) in [
        ("x-api-key", key.clone()),
        ("authorization", format!("Basic {}", b64(format!("{key}:")))),
        (
            "authorization",
            format!("Basic {}", b64(format!("user:{key}"))),
        ),
    ] {
        let r = gw.get("/", &[(name, value.as_str())]).await;
        assert_eq!(r.status, 200, "{name}");
        let h = gw.upstream.last().headers;
        assert!(!h.contains_key(name), "{name} forwarded");
    }
    // Query parameter: off by default.
    let r = gw.get(&format!("/q?api_key={key}"), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "missing_credentials");
}

#[tokio::test]
async fn query_credential_when_enabled_is_removed_from_the_forwarded_url() {
    let upstream = Upstream::start().await;
    let url = upstream.url();
    let dir = tempfile::tempdir().unwrap();
    let text = crate::support::config_text(&url, &dir.path().join("k.db"), "")
        .replace("[admin]", "allow_query_param = true\n[admin]");
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let (key, _) = gw.client("acme", "pro").await;
    let r = gw.get(&format!("/q?a=1&api_key={key}&b=2"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.upstream.last().uri, "/q?a=1&b=2");
}

#[tokio::test]
async fn refusals_carry_the_spec_status_and_code() {
    let gw = Gateway::start().await;
    let (good, good_id) = gw.client("acme", "pro").await;

    let r = gw.get("/", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "missing_credentials")
    );
    assert!(r.headers.contains_key("www-authenticate"));
    assert_eq!(r.headers["content-type"], "application/problem+json");

    let r = gw.get_with_key("/", "garbage").await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "invalid_api_key")
    );

    // Right shape, wrong checksum: refused without a lookup.
    let mut bad = good.clone().into_bytes();
    let i = bad.len() - 10;
    bad[i] = if bad[i] == b'a' { b'b' } else { b'a' };
    let r = gw
        .get_with_key("/", std::str::from_utf8(&bad).unwrap())
        .await;
    assert_eq!(r.code(), "invalid_api_key");

    // Disabled.
    let r = gw
        .admin(
            "PATCH",
            &format!("/v1/api-keys/{good_id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = gw.get_with_key("/", &good).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "disabled_api_key")
    );
    let r = gw
        .admin(
            "PATCH",
            &format!("/v1/api-keys/{good_id}"),
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.get_with_key("/", &good).await.status, 200);

    // Expired: an expiry a moment ahead, then wait past it.
    let soon = chrono::Utc::now() + chrono::Duration::milliseconds(600);
    let v = gw
        .key("acme", json!({"expires_at": soon.to_rfc3339()}))
        .await;
    let exp_key = v["key"].as_str().unwrap();
    assert_eq!(gw.get_with_key("/", exp_key).await.status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let r = gw.get_with_key("/", exp_key).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "expired_api_key")
    );

    // No body ever says more than the code, and never echoes the key.
    assert!(!String::from_utf8_lossy(&r.body).contains(exp_key));
}

#[tokio::test]
async fn revoked_deleted_and_rotated_keys_stop_at_the_next_request() {
    let gw = Gateway::start().await;
    let (k1, id1) = gw.client("acme", "pro").await;
    // Warm the cache so the refusal must come from invalidation, not a miss.
    assert_eq!(gw.get_with_key("/", &k1).await.status, 200);
    let r = gw
        .admin("DELETE", &format!("/v1/api-keys/{id1}"), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], id1.as_str());
    assert!(r.json().get("key").is_none());
    let r = gw.get_with_key("/", &k1).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "invalid_api_key")
    );

    // Rotation without grace: old stops at once, new works, same id.
    let v = gw.key("acme", json!({})).await;
    let (old, id) = (
        v["key"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().to_owned(),
    );
    assert_eq!(gw.get_with_key("/", &old).await.status, 200);
    let r = gw
        .admin("POST", &format!("/v1/api-keys/{id}/rotate"), None)
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let new = r.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(r.json()["id"], id.as_str());
    assert_ne!(new, old);
    assert_eq!(gw.get_with_key("/", &old).await.status, 401);
    assert_eq!(gw.get_with_key("/", &new).await.status, 200);

    // Rotation with grace: both work until the grace ends, then only the new one.
    let r = gw
        .admin(
            "POST",
            &format!("/v1/api-keys/{id}/rotate"),
            Some(json!({"grace_period_seconds": 1})),
        )
        .await;
    assert_eq!(r.status, 200);
    let newer = r.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(
        gw.get_with_key("/", &new).await.status,
        200,
        "old key within grace"
    );
    assert_eq!(gw.get_with_key("/", &newer).await.status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(
        gw.get_with_key("/", &new).await.status,
        401,
        "old key after grace"
    );
    assert_eq!(gw.get_with_key("/", &newer).await.status, 200);

    // Deleting the client stops all its keys.
    let r = gw.admin("DELETE", "/v1/clients/acme", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.get_with_key("/", &newer).await.status, 401);
}

const ROUTES: &str = r#"
[[routes]]
path = "/"
[[routes]]
path = "/v1/extract"
permissions = ["DATA_EXTRACTION"]
[[routes]]
path = "/public"
auth = "none"
[[routes]]
path = "/v1/write"
methods = ["POST"]
"#;

#[tokio::test]
async fn routes_enforce_permissions_and_path_tricks_cannot_dodge_them() {
    let gw = Gateway::start_with(ROUTES).await;
    let (plain, _) = gw.client("acme", "pro").await;
    let v = gw.key("acme", json!({"roles": ["DATA_EXTRACTION"]})).await;
    let extract = v["key"].as_str().unwrap().to_owned();
    assert_eq!(v["permissions"], json!(["DATA_EXTRACTION"]));

    assert_eq!(
        gw.get_with_key("/v1/extract/doc", &extract).await.status,
        200
    );
    assert_eq!(
        gw.upstream.last().headers["x-keygate-permissions"],
        "DATA_EXTRACTION"
    );
    let r = gw.get_with_key("/v1/extract/doc", &plain).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (403, "insufficient_permissions")
    );
    // Case variations still hit the protected route.
    assert_eq!(gw.get_with_key("/V1/Extract/doc", &plain).await.status, 403);

    let before = gw.upstream.count();
    for p in [
        "//v1/extract",
        "/v1//extract",
        "/./v1/extract",
        "/x/../v1/extract",
        "/%2e%2e/v1/extract",
        "/v1/%2e%2e/v1/extract",
        "/v1%2Fextract",
        "/v1%2fextract",
        "/v1%5cextract",
        "/v1/extract;x",
        "/v1/extract.",
        "/v1/%252e%252e/extract",
    ] {
        let r = gw.get_with_key(p, &plain).await;
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (400, "bad_request"),
            "{p}"
        );
    }
    assert_eq!(
        gw.upstream.count(),
        before,
        "a refused path reached the upstream"
    );

    // Public route needs no key; a POST-only route answers 405 to GET (it owns its path for
    // every method: nothing falls through to the catch-all "/").
    assert_eq!(gw.get("/public/x", &[]).await.status, 200);
    let before = gw.upstream.count();
    let r = gw.get_with_key("/v1/write", &plain).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.code(), "method_not_allowed");
    assert_eq!(r.headers["allow"], "POST");
    assert_eq!(gw.upstream.count(), before);
    assert_eq!(gw.get("/_keygate/health", &[]).await.status, 200);
}

#[tokio::test]
async fn no_route_is_404() {
    let gw = Gateway::start_with("[[routes]]\npath = \"/only\"\n").await;
    let (key, _) = gw.client("acme", "pro").await;
    let r = gw.get_with_key("/other", &key).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (404, "route_not_found")
    );
}

#[tokio::test]
async fn five_megabytes_stream_through_both_ways() {
    let gw = Gateway::start().await;
    let (key, _) = gw.client("acme", "pro").await;
    let n = 5 * 1024 * 1024;
    let r = gw.get_with_key(&format!("/big/{n}"), &key).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), n);
    assert!(r.body == pattern(n), "downloaded body differs");

    let upload = Bytes::from(pattern(n));
    let req = Request::post(format!("http://{}/echo-body", gw.proxy))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(upload.clone()))
        .unwrap();
    let r = gw.send(req).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["len"], n);
    assert_eq!(v["sha256"], hex::encode(Sha256::digest(&upload)));
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_upstream_is_504() {
    let upstream = Upstream::start().await;
    let (dead, _held) = closed_port();
    let gw = Gateway::start_custom(upstream, |_| format!("http://{dead}"), "").await;
    let (key, _) = gw.client("acme", "pro").await;
    let r = gw.get_with_key("/", &key).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (502, "upstream_unavailable")
    );

    let upstream = Upstream::start().await;
    let url = upstream.url();
    let dir = tempfile::tempdir().unwrap();
    let text = crate::support::config_text(&url, &dir.path().join("k.db"), "")
        .replace("[admin]", "upstream_timeout_ms = 300\n[admin]");
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let (key, _) = gw.client("acme", "pro").await;
    let r = gw.get_with_key("/slow/3000", &key).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (504, "upstream_timeout")
    );
    assert_eq!(gw.get_with_key("/slow/10", &key).await.status, 200);
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let gw = Gateway::start().await;
    let (key, _) = gw.client("acme", "pro").await;
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let req = Request::get(format!("http://{}/h2", gw.proxy))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = client.request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), http::Version::HTTP_2);
    let seen = gw.upstream.last();
    assert_eq!(seen.uri, "/h2");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        gw.proxy.to_string().as_str()
    );
}

#[tokio::test]
async fn oversized_heads_get_431() {
    let gw = Gateway::start().await;
    let big = "a".repeat(70 * 1024);
    let r = gw.get("/", &[("x-big", &big)]).await;
    assert_eq!(r.status, 431);
    assert_eq!(gw.upstream.count(), 0);
}

/// An upstream that takes one connection and no more: it never accepts again, and its accept
/// queue (backlog 0) holds a single connection, so once one waits there every new connect
/// has its SYN dropped. Each request on the one connection (a head, no body) is answered
/// `ok` after `delay`, keep-alive. Returns its address and the count of answered requests.
async fn one_connection_upstream(
    delay: std::time::Duration,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        // Open, never accepting again.
        let _listener = listener;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            buf.drain(..end);
            tokio::time::sleep(delay).await;
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if conn.write_all(answer).await.is_err() {
                return;
            }
        }
    });
    (addr, served)
}

#[tokio::test]
async fn requests_beyond_the_idle_upstream_connections_take_one_given_back_while_connects_hang() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let (addr, served) = one_connection_upstream(Duration::from_millis(20)).await;
    // A long connect timeout: a request left to its own connect gets 502 after 20 s.
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = crate::support::config_text(&format!("http://{addr}"), &dir.path().join("k.db"), "")
        .replace("[admin]", "connect_timeout_ms = 20000\n[admin]");
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let (key, _) = gw.client("acme", "pro").await;

    // The gateway's one connection, taken by the upstream and now idle in the pool.
    let r = gw.get_with_key("/warm", &key).await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"ok"[..]));
    // The accept queue filled: a new connect now hangs (checked: a probe does not connect).
    let _queued = tokio::net::TcpStream::connect(addr).await.unwrap();
    let probe = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect(addr),
    )
    .await;
    assert!(probe.is_err(), "the upstream's accept queue is not full");

    // Six at once over HTTP/1.1 (six client connections), then six streams of one HTTP/2
    // connection (the hyper engine): one finds the idle connection, the others open new
    // ones that hang, and are carried by the one connection as it is given back.
    let answers = futures_util::future::join_all((0..6).map(|i| {
        let (gw, key) = (&gw, &key);
        async move { gw.get_with_key(&format!("/h1/{i}"), key).await }
    }))
    .await;
    for r in &answers {
        let body = String::from_utf8_lossy(&r.body);
        assert_eq!((r.status.as_u16(), body.as_ref()), (200, "ok"));
    }
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let answers = futures_util::future::join_all((0..6).map(|i| {
        let req = Request::get(format!("http://{}/h2/{i}", gw.proxy))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        h2.request(req)
    }))
    .await;
    for r in answers {
        let r = r.unwrap();
        assert_eq!(r.version(), http::Version::HTTP_2);
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        served.load(Ordering::SeqCst),
        13,
        "all on the one connection"
    );
}
