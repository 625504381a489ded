//! A client's self-service key (`keys:manage`) against the constraints an admin put on the
//! client's keys, over HTTP against the real gateway, on SQLite and on a real redis-server: the
//! client may tighten what the admin set (disable, bring the expiry closer) but never loosen
//! it (enable, remove or postpone the expiry, change the rate limit): 403, nothing changed.
//! Each key object says who set each constraint.

use serde_json::{Value, json};

use crate::redis_support::RedisServer;
use crate::support::{Gateway, Reply, Upstream};

/// A gateway on SQLite, or on a redis-server that lives as long as it.
pub async fn on_store(redis: bool) -> (Gateway, Option<RedisServer>) {
    if redis {
        let server = RedisServer::start();
        let store = format!("url = \"{}\"", server.tcp_url(0));
        let gw = Gateway::start_on_store(Upstream::start().await, &store, "").await;
        (gw, Some(server))
    } else {
        (Gateway::start().await, None)
    }
}

fn body(r: &Reply) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn setters(v: &Value) -> (Value, Value, Value) {
    (
        v["disabled_by"].clone(),
        v["expires_set_by"].clone(),
        v["rate_limit_set_by"].clone(),
    )
}

async fn a_client_never_loosens_what_an_admin_set(redis: bool) {
    let (gw, _redis) = on_store(redis).await;
    let r = gw
        .admin(
            "POST",
            "/v1/clients",
            Some(json!({"client_id": "acme", "license": "pro", "permissions": ["keys:manage", "READ"]})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", body(&r));
    let self_key = r.json()["api_key"]["key"].as_str().unwrap().to_owned();
    let as_client = [("x-api-key", self_key.as_str())];
    let client = |m: &'static str, path: String, b: Option<Value>| {
        let gw = &gw;
        async move { gw.admin_as(m, &path, b, &as_client).await }
    };

    // The admin gives a key an expiry and a rate limit, then disables it.
    let v = gw
        .key(
            "acme",
            json!({"permissions": ["READ"], "expires_days": 30,
                   "rate_limit": {"per_second": 5, "burst": 5}}),
        )
        .await;
    let (key, id) = (
        v["key"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().to_owned(),
    );
    assert_eq!(setters(&v), (Value::Null, json!("admin"), json!("admin")));
    let path = format!("/v1/api-keys/{id}");
    let r = gw
        .admin("PATCH", &path, Some(json!({"enabled": false})))
        .await;
    assert_eq!(r.status, 200, "{}", body(&r));
    let constrained = r.json();
    assert_eq!(
        setters(&constrained),
        (json!("admin"), json!("admin"), json!("admin"))
    );
    let admin_expiry = constrained["expires_at"].as_str().unwrap().to_owned();
    let expiry_in = |days: i64| {
        (chrono::DateTime::parse_from_rfc3339(&admin_expiry).unwrap()
            + chrono::Duration::days(days))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };

    // Every loosening: 403 problem+json saying why, and nothing written (not even the name).
    for (patch, why) in [
        (json!({"enabled": true, "name": "x"}), "disabled this key"),
        (json!({"expires_at": null, "name": "x"}), "expiry"),
        (json!({"expires_at": expiry_in(1), "name": "x"}), "expiry"),
        (
            json!({"rate_limit": {"per_second": 50, "burst": 50}}),
            "rate limit",
        ),
        (json!({"rate_limit": null}), "rate limit"),
    ] {
        let r = client("PATCH", path.clone(), Some(patch.clone())).await;
        assert_eq!(r.status, 403, "{patch}: {}", body(&r));
        assert_eq!(
            r.headers["content-type"], "application/problem+json",
            "{patch}"
        );
        assert_eq!(r.code(), "forbidden");
        let detail = r.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(why), "{patch}: {detail}");
        let now = gw.admin("GET", &path, None).await.json();
        assert_eq!(now, constrained, "{patch} changed the key");
    }
    assert_eq!(gw.get_with_key("/", &key).await.status, 401);

    // Tightening is allowed, and leaves the constraints the admin's.
    let r = client(
        "PATCH",
        path.clone(),
        Some(json!({"expires_at": expiry_in(-1), "enabled": false, "name": "tight"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", body(&r));
    let v = r.json();
    assert_eq!(v["name"], "tight");
    assert_eq!(v["expires_at"], json!(expiry_in(-1)));
    assert_eq!(
        setters(&v),
        (json!("admin"), json!("admin"), json!("admin"))
    );
    let r = client(
        "PATCH",
        path.clone(),
        Some(json!({"expires_at": admin_expiry})),
    )
    .await;
    assert_eq!(
        r.status,
        403,
        "back past the tightened expiry: {}",
        body(&r)
    );

    // A client still sets no rate limit at all, not even on a new key.
    let r = client(
        "POST",
        "/v1/api-keys".into(),
        Some(json!({"name": "fresh", "rate_limit": {"per_second": 1, "burst": 1}})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", body(&r));

    // Once the admin enables the key, the client's own disable is the client's to lift.
    let r = gw
        .admin("PATCH", &path, Some(json!({"enabled": true})))
        .await;
    assert_eq!(r.json()["disabled_by"], Value::Null);
    let r = client("PATCH", path.clone(), Some(json!({"enabled": false}))).await;
    assert_eq!(r.json()["disabled_by"], "client", "{}", body(&r));
    assert_eq!(gw.get_with_key("/", &key).await.status, 401);
    let r = client("PATCH", path.clone(), Some(json!({"enabled": true}))).await;
    assert_eq!(r.status, 200, "{}", body(&r));
    assert_eq!(r.json()["enabled"], true);
    assert_eq!(gw.get_with_key("/", &key).await.status, 200);

    // A key the client makes with an expiry: the client may remove it.
    let r = client(
        "POST",
        "/v1/api-keys".into(),
        Some(json!({"name": "own", "permissions": ["READ"], "expires_days": 1})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", body(&r));
    let own = r.json();
    assert_eq!(own["expires_set_by"], "client");
    let r = client(
        "PATCH",
        format!("/v1/api-keys/{}", own["id"].as_str().unwrap()),
        Some(json!({"expires_at": null})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", body(&r));
    assert_eq!(setters(&r.json()), (Value::Null, Value::Null, Value::Null));

    // The Kixote revoke disables every key as an admin: the client cannot undo it (its own
    // key is disabled too, so it cannot even authenticate).
    let r = gw
        .admin(
            "POST",
            "/auth/revoke_client_key",
            Some(json!({"client_id": "acme"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        gw.admin("GET", &path, None).await.json()["disabled_by"],
        "admin"
    );
    assert_eq!(client("GET", path.clone(), None).await.status, 401);
}

#[tokio::test]
async fn sqlite_a_client_never_loosens_what_an_admin_set() {
    a_client_never_loosens_what_an_admin_set(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_client_never_loosens_what_an_admin_set() {
    a_client_never_loosens_what_an_admin_set(true).await;
}

/// A narrow self-service key may not rotate a sibling key holding a permission it lacks (the
/// answer would hand it that key's new secret): 403, the sibling's secret unchanged. A sibling
/// within its own permissions it may rotate.
async fn a_client_rotates_only_keys_within_its_own_permissions(redis: bool) {
    let (gw, _redis) = on_store(redis).await;
    let narrow = gw.manager("acme", "pro").await;
    let as_client = [("x-api-key", narrow.as_str())];
    let wide = gw
        .key(
            "acme",
            json!({"permissions": ["keys:manage", "billing:write"]}),
        )
        .await;
    let wide_id = wide["id"].as_str().unwrap().to_owned();
    let wide_key = wide["key"].as_str().unwrap().to_owned();
    let r = gw
        .admin_as(
            "POST",
            &format!("/v1/api-keys/{wide_id}/rotate"),
            Some(json!({"grace_period_seconds": 0})),
            &as_client,
        )
        .await;
    assert_eq!(r.status, 403, "{}", body(&r));
    assert!(!body(&r).contains("kg_"), "{}", body(&r));
    // Nothing changed: the wide key still works, with its prefix as before.
    assert_eq!(gw.get_with_key("/x", &wide_key).await.status, 200);
    let now = gw
        .admin("GET", &format!("/v1/api-keys/{wide_id}"), None)
        .await
        .json();
    assert_eq!(now["prefix"], wide["prefix"]);
    // A sibling within the caller's permissions: rotated, its new secret in the answer.
    let same = gw
        .key("acme", json!({"permissions": ["keys:manage"]}))
        .await;
    let same_id = same["id"].as_str().unwrap();
    let r = gw
        .admin_as(
            "POST",
            &format!("/v1/api-keys/{same_id}/rotate"),
            None,
            &as_client,
        )
        .await;
    assert_eq!(r.status, 200, "{}", body(&r));
    let new = r.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(gw.get_with_key("/x", &new).await.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn sqlite_a_client_rotates_only_keys_within_its_own_permissions() {
    a_client_rotates_only_keys_within_its_own_permissions(false).await;
}

#[tokio::test]
async fn redis_a_client_rotates_only_keys_within_its_own_permissions() {
    a_client_rotates_only_keys_within_its_own_permissions(true).await;
}
