//! The admin plane: authentication, keys, clients, validation and status codes.

use serde_json::json;
use sha2::Digest;

use crate::support::{ADMIN_KEY, Gateway};

#[tokio::test]
async fn admin_auth_is_required_and_uniform() {
    let gw = Gateway::start().await;
    let missing = gw.admin_as("GET", "/v1/api-keys", None, &[]).await;
    let wrong = gw
        .admin_as(
            "GET",
            "/v1/api-keys",
            None,
            &[("x-admin-key", "not-the-admin-key-000")],
        )
        .await;
    assert_eq!(missing.status, 401);
    assert_eq!(wrong.status, 401);
    assert_eq!(
        missing.body, wrong.body,
        "missing and wrong keys answer alike"
    );
    let bearer = gw
        .admin_as(
            "GET",
            "/v1/api-keys",
            None,
            &[("authorization", &format!("Bearer {ADMIN_KEY}"))],
        )
        .await;
    assert_eq!(bearer.status, 200);
    // Health and readiness need no key.
    assert_eq!(gw.admin_as("GET", "/healthz", None, &[]).await.status, 200);
    let r = gw.admin_as("GET", "/readyz", None, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");
}

#[tokio::test]
async fn key_lifecycle_and_listing_never_shows_secrets() {
    let gw = Gateway::start().await;
    let (first, _) = gw.client("acme", "pro").await;
    let v = gw
        .key(
            "acme",
            json!({
                "name": "ci",
                "permissions": ["A", "B"],
                "expires_days": 30,
                "rate_limit": {"per_minute": 100, "burst": 10},
                "metadata": {"team": "data"}
            }),
        )
        .await;
    let key = v["key"].as_str().unwrap().to_owned();
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["prefix"], &key[..12]);
    assert_eq!(v["client_id"], "acme");
    assert_eq!(v["enabled"], true);
    assert_eq!(v["permissions"], json!(["A", "B"]));
    assert_eq!(v["rate_limit"], json!({"per_minute": 100, "burst": 10}));
    assert_eq!(v["metadata"], json!({"team": "data"}));
    assert!(v["expires_at"].as_str().unwrap().ends_with('Z'));
    assert!(uuid::Uuid::parse_str(&id).unwrap().get_version_num() == 7);

    let r = gw.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(r.status, 200);
    assert!(r.json().get("key").is_none());
    let r = gw
        .admin("GET", &format!("/api/v1/api-keys/{id}"), None)
        .await;
    assert_eq!(r.status, 200, "alias path");

    let r = gw
        .admin("GET", "/v1/api-keys?client_id=acme&per_page=1&page=2", None)
        .await;
    assert_eq!(r.status, 200);
    let page = r.json();
    assert_eq!(page["total"], 2);
    assert_eq!(page["page"], 2);
    assert_eq!(page["per_page"], 1);
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    let listing = String::from_utf8_lossy(&r.body).to_string();
    let all = gw.admin("GET", "/v1/api-keys", None).await;
    let all_text = String::from_utf8_lossy(&all.body).to_string();
    for secret in [&key, &first] {
        assert!(!listing.contains(secret.as_str()) && !all_text.contains(secret.as_str()));
        let hash = hex::encode(keygate::keys::KeyHash::of(secret).0);
        assert!(!all_text.contains(&hash));
    }

    let r = gw
        .admin(
            "PATCH",
            &format!("/v1/api-keys/{id}"),
            Some(json!({"name": "renamed", "roles": ["C"], "expires_at": null, "metadata": null})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["name"], "renamed");
    assert_eq!(v["permissions"], json!(["C"]));
    assert_eq!(v["expires_at"], serde_json::Value::Null);
    assert_eq!(v["metadata"], serde_json::Value::Null);
    assert_eq!(
        v["rate_limit"],
        json!({"per_minute": 100, "burst": 10}),
        "untouched"
    );
    assert_ne!(v["updated_at"], v["created_at"]);

    let r = gw
        .admin("DELETE", &format!("/v1/api-keys/{id}"), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        gw.admin("GET", &format!("/v1/api-keys/{id}"), None)
            .await
            .status,
        404
    );
    assert_eq!(
        gw.admin("DELETE", &format!("/v1/api-keys/{id}"), None)
            .await
            .status,
        404
    );
    assert_eq!(
        gw.admin("GET", "/v1/api-keys/not-a-uuid", None)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn max_keys_per_client_is_409_with_advice() {
    let gw = Gateway::start().await;
    gw.client("acme", "pro").await;
    for _ in 0..4 {
        gw.key("acme", json!({})).await;
    }
    let r = gw
        .admin(
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "6th", "client_id": "acme"})),
        )
        .await;
    assert_eq!(r.status, 409);
    assert!(r.json()["detail"].as_str().unwrap().contains("revoke"));
}

#[tokio::test]
async fn bad_input_is_400_or_422_naming_the_field() {
    let gw = Gateway::start().await;
    gw.client("acme", "pro").await;
    let raw = |body: &'static str| {
        let gw = &gw;
        async move {
            let req = http::Request::post(format!("http://{}/v1/api-keys", gw.admin))
                .header("x-admin-key", ADMIN_KEY)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    body.as_bytes(),
                )))
                .unwrap();
            gw.send(req).await
        }
    };
    assert_eq!(raw("{not json").await.status, 400);
    assert_eq!(raw("[1,2]").await.status, 400);

    let cases = [
        (json!({"client_id": "acme"}), "name"),
        (json!({"name": "", "client_id": "acme"}), "name"),
        (json!({"name": "x"}), "client_id"),
        (json!({"name": "x", "client_id": "bad id!"}), "client_id"),
        (json!({"name": "x", "client_id": "."}), "client_id"),
        (json!({"name": "x", "client_id": ".."}), "client_id"),
        (json!({"name": 5, "client_id": "acme"}), "name"),
        (
            json!({"name": "x", "client_id": "acme", "colour": "red"}),
            "colour",
        ),
        (
            json!({"name": "x", "client_id": "acme", "expires_days": 0}),
            "expires_days",
        ),
        (
            json!({"name": "x", "client_id": "acme", "expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at",
        ),
        (
            json!({"name": "x", "client_id": "acme", "expires_at": "tomorrow"}),
            "expires_at",
        ),
        (
            json!({"name": "x", "client_id": "acme", "expires_days": 1, "never_expire": true}),
            "expires_at",
        ),
        (
            json!({"name": "x", "client_id": "acme", "rate_limit": {"per_second": 1, "per_minute": 1, "burst": 1}}),
            "rate_limit",
        ),
        (
            json!({"name": "x", "client_id": "acme", "permissions": ["a,b"]}),
            "permissions",
        ),
        (
            json!({"name": "x", "client_id": "acme", "metadata": [1]}),
            "metadata",
        ),
    ];
    for (body, field) in cases {
        let r = gw.admin("POST", "/v1/api-keys", Some(body.clone())).await;
        assert_eq!(
            r.status,
            422,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let v = r.json();
        let fields: Vec<&str> = v["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert!(
            fields.iter().any(|f| f.starts_with(field)),
            "{body}: expected {field} in {fields:?}"
        );
    }
    // A well-formed body naming a client that does not exist: 404, as everywhere else.
    let r = gw
        .admin(
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "x", "client_id": "nobody"})),
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "not_found");
    assert!(r.json()["detail"].as_str().unwrap().contains("client"));
    let r = gw
        .admin(
            "POST",
            "/v1/clients",
            Some(json!({"client_id": "x", "license": "platinum"})),
        )
        .await;
    assert_eq!(r.status, 422);
    assert!(String::from_utf8_lossy(&r.body).contains("license"));
    // `.` and `..` are path segments URLs resolve away (GET /v1/clients/.. would be
    // /v1/clients): refused; `...` is an id like any other.
    for id in [".", ".."] {
        let r = gw
            .admin(
                "POST",
                "/v1/clients",
                Some(json!({"client_id": id, "license": "pro"})),
            )
            .await;
        assert_eq!(r.status, 422, "{id}");
        assert!(String::from_utf8_lossy(&r.body).contains("not `.` or `..`"));
    }
    let r = gw
        .admin(
            "POST",
            "/v1/clients",
            Some(json!({"client_id": "...", "license": "pro"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let listed = gw.admin("GET", "/v1/clients", None).await.json();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert!(!ids.contains(&".") && !ids.contains(&".."), "{ids:?}");
    let r = gw.admin("GET", "/v1/api-keys?per_page=5000", None).await;
    assert_eq!(r.status, 422);
    // A secret sent in the wrong field is named by its type, never echoed back.
    let (key, id) = gw.client("echo", "pro").await;
    for body in [
        json!({"enabled": key}),
        json!({"name": "x", "client_id": "acme", "expires_days": key}),
    ] {
        let path = if body.get("enabled").is_some() {
            format!("/v1/api-keys/{id}")
        } else {
            "/v1/api-keys".to_owned()
        };
        let m = if body.get("enabled").is_some() {
            "PATCH"
        } else {
            "POST"
        };
        let r = gw.admin(m, &path, Some(body.clone())).await;
        assert_eq!(r.status, 422, "{body}");
        let text = String::from_utf8_lossy(&r.body);
        assert!(!text.contains(&key), "the key echoed: {text}");
        assert!(text.contains("a string"), "{text}");
    }
    // A path parameter that is not UTF-8 once decoded: 400 problem+json like every other
    // refusal (it was plain text), naming no value.
    for path in [
        "/v1/api-keys/%FF",
        "/v1/clients/%FF%FE",
        "/v1/webhooks/%C3%28",
    ] {
        let r = gw.admin("DELETE", path, None).await;
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(
            r.headers["content-type"], "application/problem+json",
            "{path}"
        );
        assert_eq!(r.code(), "bad_request", "{path}");
    }
    // Nor as the value of a field of a fixed set of names (serde names an unknown variant).
    for (m, path) in [
        ("POST", "/v1/api-keys".to_owned()),
        ("PATCH", format!("/v1/api-keys/{id}")),
    ] {
        let mut body = json!({
            "credits": {"remaining": 1, "refill": {"amount": 1, "interval": key}}});
        if m == "POST" {
            body["name"] = json!("x");
            body["client_id"] = json!("echo");
        }
        let r = gw.admin(m, &path, Some(body)).await;
        assert_eq!(r.status, 422, "{m}");
        let text = String::from_utf8_lossy(&r.body);
        assert!(!text.contains(&key), "the key echoed: {text}");
        assert!(text.contains("unknown variant, expected"), "{text}");
    }
    // A secret sent as a field's name (a body keyed by its keys, or their hashes) or as a query
    // value is not repeated either; a short misspelt name is.
    let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    for name in [key.as_str(), hash.as_str(), "Xk9mQ2vL8pR4tW7z"] {
        let mut body = json!({"name": "x", "client_id": "acme"});
        body[name] = json!(true);
        let r = gw.admin("POST", "/v1/api-keys", Some(body)).await;
        assert_eq!(r.status, 422);
        let text = String::from_utf8_lossy(&r.body);
        assert!(!text.contains(name), "{name} echoed: {text}");
        assert!(text.contains("unknown field"), "{text}");
    }
    let r = gw
        .admin(
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "x", "client_id": "acme", "permisions": []})),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["errors"][0]["field"], "permisions");
    let r = gw
        .admin("GET", &format!("/v1/api-keys?per_page={key}"), None)
        .await;
    assert!(matches!(r.status.as_u16(), 400 | 422), "{}", r.status);
    let text = String::from_utf8_lossy(&r.body);
    assert!(!text.contains(&key), "the key echoed: {text}");
    let r = gw
        .admin(
            "POST",
            "/v1/api-keys/00000000-0000-7000-8000-000000000000/rotate",
            Some(json!({"grace_period_seconds": 700000})),
        )
        .await;
    assert_eq!(r.status, 422);
}

#[tokio::test]
async fn clients_crud() {
    let gw = Gateway::start().await;
    let r = gw
        .admin(
            "POST",
            "/v1/clients",
            Some(json!({"client_id": "acme", "license": "free", "metadata": {"tier": 1}})),
        )
        .await;
    assert_eq!(r.status, 201);
    let v = r.json();
    assert_eq!(v["client_id"], "acme");
    assert_eq!(v["license"], "free");
    let key = v["api_key"]["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("kg_"));

    let r = gw
        .admin(
            "POST",
            "/v1/clients",
            Some(json!({"client_id": "acme", "license": "free"})),
        )
        .await;
    assert_eq!(r.status, 409);

    gw.client("beta", "pro").await;
    let r = gw.admin("GET", "/v1/clients?per_page=1", None).await;
    assert_eq!(r.json()["total"], 2);
    assert_eq!(r.json()["data"][0]["client_id"], "acme");

    // A license change reaches the proxy at once (cached principal invalidated).
    assert_eq!(gw.get_with_key("/", &key).await.status, 200);
    assert_eq!(gw.upstream.last().headers["x-keygate-license"], "free");
    let r = gw
        .admin("PATCH", "/v1/clients/acme", Some(json!({"license": "pro"})))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["metadata"], json!({"tier": 1}));
    assert_eq!(gw.get_with_key("/", &key).await.status, 200);
    assert_eq!(gw.upstream.last().headers["x-keygate-license"], "pro");

    assert_eq!(gw.admin("GET", "/v1/clients/acme", None).await.status, 200);
    let r = gw.admin("DELETE", "/v1/clients/acme", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["deleted_keys"], 1);
    assert_eq!(gw.admin("GET", "/v1/clients/acme", None).await.status, 404);
    assert_eq!(
        gw.admin("DELETE", "/v1/clients/acme", None).await.status,
        404
    );
    assert_eq!(gw.get_with_key("/", &key).await.status, 401);
}

#[tokio::test]
async fn writes_survive_a_restart() {
    let gw = Gateway::start().await;
    let (key, id) = gw.client("acme", "pro").await;
    let (upstream, dir) = gw.stop().await;
    let text = crate::support::config_text(&upstream.url(), &dir.path().join("keygate.db"), "");
    let gw2 = Gateway::start_from(upstream, dir, &text).await;
    assert_eq!(gw2.get_with_key("/", &key).await.status, 200);
    let r = gw2.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(r.status, 200);
}

/// Admin answers carry new keys, tokens and the state of keys: every one is
/// `Cache-Control: no-store` (a cache between the admin and keygate keeps none of them), and
/// an answer that sets its own caching (the identity key set) keeps it.
#[tokio::test]
async fn admin_answers_are_not_stored_by_caches() {
    let gw = Gateway::start_with("[identity]\nsign = true\n").await;
    let created = gw
        .admin(
            "POST",
            "/v1/clients",
            Some(json!({"client_id": "acme", "license": "pro"})),
        )
        .await;
    assert_eq!(created.status, 201);
    let key = created.json()["api_key"]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = created.json()["api_key"]["id"].as_str().unwrap().to_owned();
    let rotated = gw
        .admin("POST", &format!("/v1/api-keys/{id}/rotate"), None)
        .await;
    assert_eq!(rotated.status, 200);
    let login = gw
        .admin_as(
            "POST",
            "/auth/login",
            Some(json!({"api_key": rotated.json()["key"]})),
            &[],
        )
        .await;
    assert_eq!(
        login.status,
        200,
        "{}",
        String::from_utf8_lossy(&login.body)
    );
    let listed = gw.admin("GET", "/v1/api-keys", None).await;
    let refused = gw
        .admin_as("GET", "/v1/api-keys", None, &[("x-admin-key", "wrong")])
        .await;
    assert_eq!(refused.status, 401);
    let missing = gw.admin("GET", "/v1/nothing-here", None).await;
    assert_eq!(missing.status, 404);
    for (what, r) in [
        ("client created", &created),
        ("key rotated", &rotated),
        ("token", &login),
        ("listing", &listed),
        ("refusal", &refused),
        ("no such endpoint", &missing),
    ] {
        assert_eq!(r.headers["cache-control"], "no-store", "{what}");
    }
    assert_ne!(key, rotated.json()["key"].as_str().unwrap());
    let jwks = gw
        .admin_as("GET", "/.well-known/jwks.json", None, &[])
        .await;
    assert_eq!(jwks.status, 200);
    assert!(
        jwks.headers["cache-control"]
            .to_str()
            .unwrap()
            .starts_with("public, max-age="),
        "{:?}",
        jwks.headers["cache-control"]
    );
    gw.stop().await;
}
