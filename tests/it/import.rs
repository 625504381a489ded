//! `POST /v1/api-keys/import`: keys migrated from other systems (Kong-style plaintext,
//! Unkey-style SHA-256 hex) authenticate through every credential form; hostile input is
//! refused and changes nothing; unknown foreign-looking keys reach the store once per distinct
//! key per negative TTL.

use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::{ADMIN_KEY, Gateway, Upstream, store_config_text};

const EXTRA: &str = "[rate_limit]\nfailed_auth = { per_second = 1000000, burst = 1000000 }\n";

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

async fn import(gw: &Gateway, body: Value) -> crate::support::Reply {
    gw.admin("POST", "/v1/api-keys/import", Some(body)).await
}

async fn key_count(gw: &Gateway) -> u64 {
    let r = gw.admin("GET", "/v1/api-keys", None).await;
    assert_eq!(r.status, 200);
    r.json()["total"].as_u64().unwrap()
}

async fn login(gw: &Gateway, key: &str) -> String {
    let r = gw
        .admin_as("POST", "/auth/login", Some(json!({ "api_key": key })), &[])
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["access_token"].as_str().unwrap().to_owned()
}

/// Every credential form of the proxy, for `key`: the statuses it answers.
async fn statuses(gw: &Gateway, key: &str) -> Vec<u16> {
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let mut out = vec![
        gw.get_with_key("/x", key).await.status.as_u16(),
        gw.get("/x", &[("x-api-key", key)]).await.status.as_u16(),
        gw.get(
            "/x",
            &[(
                "authorization",
                &format!("Basic {}", b64(format!("{key}:"))),
            )],
        )
        .await
        .status
        .as_u16(),
        gw.get(
            "/x",
            &[(
                "authorization",
                &format!("Basic {}", b64(format!("user:{key}"))),
            )],
        )
        .await
        .status
        .as_u16(),
    ];
    let token = login(gw, key).await;
    out.push(gw.get_with_key("/x", &token).await.status.as_u16());
    out
}

#[tokio::test]
async fn kong_plaintext_and_unkey_hashes_authenticate_through_every_credential_form() {
    let gw = Gateway::start_with(EXTRA).await;
    gw.client("acme", "pro").await;
    gw.client("globex", "free").await;
    // Kong key-auth keys are 32 random characters; Tyk custom keys may carry punctuation.
    let kong = "Vv8mJ1cUq0Qm2xW4e6r7t8y9u0i1o2p3";
    let tyk = "org-5f2a/custom.key_with+punctuation~!";
    let unkey = "uk_3ZkT9p8QxW2mN5vB7cR4yH6jL1dF0sA";
    let before = key_count(&gw).await;
    let body = json!({"keys": [
        {"client_id": "acme", "name": "kong", "key": kong, "permissions": ["read"]},
        {"client_id": "acme", "name": "tyk", "key": tyk},
        {"client_id": "globex", "name": "unkey", "sha256": sha256_hex(unkey).to_uppercase(),
         "roles": ["read", "write"], "expires_at": "2999-01-01T00:00:00Z"},
    ]});
    let r = import(&gw, body.clone()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json(), json!({"imported": 3, "errors": []}));
    assert_eq!(key_count(&gw).await, before + 3);
    // Replayed: every key is a duplicate, nothing changes.
    let r = import(&gw, body).await;
    assert_eq!(r.json()["imported"], 0);
    assert_eq!(r.json()["errors"].as_array().unwrap().len(), 3);
    assert_eq!(key_count(&gw).await, before + 3);

    for key in [kong, tyk, unkey] {
        assert_eq!(statuses(&gw, key).await, [200; 5], "{key}");
    }
    // The identity forwarded is the imported key's.
    gw.get_with_key("/x", unkey).await;
    let seen = gw.upstream.last();
    assert_eq!(seen.headers["x-keygate-client-id"], "globex");
    assert_eq!(seen.headers["x-keygate-permissions"], "read,write");

    // Listings show a short prefix (a quarter of a plaintext, nothing of a hash), never the key
    // or its hash.
    let r = gw.admin("GET", "/v1/api-keys?client_id=acme", None).await;
    let text = String::from_utf8_lossy(&r.body).to_string();
    for secret in [kong, tyk, unkey, &sha256_hex(kong), &sha256_hex(unkey)] {
        assert!(!text.contains(secret));
    }
    let kong_view = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "kong")
        .cloned()
        .unwrap();
    assert_eq!(kong_view["prefix"], "Vv8mJ1cU");
    assert_eq!(kong_view["permissions"], json!(["read"]));

    // Imported keys obey the admin API like any other: disabled → refused at once.
    let id = kong_view["id"].as_str().unwrap();
    let r = gw
        .admin(
            "PATCH",
            &format!("/v1/api-keys/{id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.get_with_key("/x", kong).await.status, 401);

    // Keygate's own keys still work, and a keygate-looking key with a bad checksum is refused
    // without a store lookup (the unit tests count lookups; here: the answer).
    let (own, _) = gw.client("initech", "pro").await;
    assert_eq!(gw.get_with_key("/x", &own).await.status, 200);
    let mut bad = own.into_bytes();
    let last = bad.len() - 1;
    bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
    assert_eq!(
        gw.get_with_key("/x", std::str::from_utf8(&bad).unwrap())
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn a_key_presented_before_its_import_works_right_after_it() {
    let gw = Gateway::start_with(EXTRA).await;
    gw.client("acme", "pro").await;
    let kong = "presented-before-import-0123456789";
    // Now cached as unknown (negative TTL 5 s by default).
    assert_eq!(gw.get_with_key("/x", kong).await.status, 401);
    let r = import(
        &gw,
        json!({"keys": [{"client_id": "acme", "name": "k", "key": kong}]}),
    )
    .await;
    assert_eq!(r.json()["imported"], 1);
    assert_eq!(gw.get_with_key("/x", kong).await.status, 200);
}

#[tokio::test]
async fn bad_items_are_reported_by_index_and_the_others_imported() {
    let gw = Gateway::start_with(EXTRA).await;
    gw.client("acme", "pro").await;
    let (own, _) = gw.client("other", "pro").await;
    let stored = "already-stored-key-0123456789";
    assert_eq!(
        import(
            &gw,
            json!({"keys": [{"client_id": "acme", "name": "a", "key": stored}]})
        )
        .await
        .json()["imported"],
        1
    );
    let before = key_count(&gw).await;
    let good = "a-good-foreign-key-0123456789";
    let secret_in_wrong_place = "this-secret-must-never-be-echoed";
    let r = import(
        &gw,
        json!({"keys": [
            {"client_id": "acme", "name": "ok", "key": good},
            {"client_id": "acme", "name": "short", "key": "fifteen-chars!!"},
            {"client_id": "acme", "name": "long", "key": "x".repeat(257)},
            {"client_id": "acme", "name": "space", "key": "has a space in the middle"},
            {"client_id": "acme", "name": "ctl", "key": "tab\there-and-more-chars"},
            {"client_id": "acme", "name": "hex", "sha256": "zz".repeat(32)},
            {"client_id": "acme", "name": "hex-short", "sha256": "ab".repeat(31)},
            {"client_id": "acme", "name": "dup-stored", "key": stored},
            {"client_id": "acme", "name": "dup-batch", "sha256": sha256_hex(good)},
            {"client_id": "nobody", "name": "x", "key": "unknown-client-key-0123"},
            {"client_id": "acme", "name": "both", "key": "both-given-key-01234567", "sha256": sha256_hex("b")},
            {"client_id": "acme", "name": "none"},
            {"client_id": "acme", "name": "kg", "key": "kg_not-a-valid-keygate-key-at-all-0123456789abcdefgh"},
            {"client_id": "acme", "name": "own", "key": own},
            {"client_id": "acme", "name": "extra", "key": "extra-field-key-0123", "secret": 1},
            {"client_id": "acme", "name": "types", "key": "types-key-0123456789", "permissions": secret_in_wrong_place},
            {"client_id": "acme", "name": "past", "key": "past-expiry-key-0123", "expires_at": "2000-01-01T00:00:00Z"},
            "not an object",
            {"client_id": "bad id!", "name": "x", "key": "bad-client-id-key-0123"},
            {"client_id": "..", "name": "x", "key": "dot-dot-client-key-0123"},
        ]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["imported"], 1);
    let indexes: Vec<u64> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, (1..=19).collect::<Vec<_>>());
    let text = v.to_string();
    for leak in [good, stored, secret_in_wrong_place, &own, &sha256_hex(good)] {
        assert!(!text.contains(leak), "{leak} echoed in {text}");
    }
    assert!(text.contains("already stored"));
    assert!(text.contains("no client with this client_id"));
    // `..` refused as a client id, not as a client that is missing.
    let dots = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["index"] == 19)
        .unwrap();
    assert!(dots.to_string().contains("not `.` or `..`"), "{dots}");
    assert_eq!(key_count(&gw).await, before + 1);
    assert_eq!(gw.get_with_key("/x", good).await.status, 200);
}

/// An export keyed by its keys (or their hashes) sent as import items: the unknown field names
/// are secrets, and are not repeated in the answer; a short misspelt name is.
#[tokio::test]
async fn unknown_field_names_that_could_be_secrets_are_not_repeated() {
    let gw = Gateway::start_with(EXTRA).await;
    gw.client("acme", "pro").await;
    let key = "kong-3xQ9vLm2aR7tYp0sWk4eHd8uJc6nBf1g";
    let hash = sha256_hex(key);
    let mut item = json!({"client_id": "acme", "name": "x", "key": "field-name-test-0123"});
    item[key] = json!(true);
    let mut other = json!({"client_id": "acme", "name": "y", "key": "field-name-test-4567"});
    other[hash.as_str()] = json!({});
    let third = json!({"client_id": "acme", "name": "z", "key": "field-name-test-89ab", "nmae": 1});
    let mut body = json!({"keys": []});
    body[hash.as_str()] = json!(1);
    let r = gw.admin("POST", "/v1/api-keys/import", Some(body)).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    let text = String::from_utf8_lossy(&r.body);
    assert!(!text.contains(&hash), "the hash repeated: {text}");
    let r = gw
        .admin(
            "POST",
            "/v1/api-keys/import",
            Some(json!({"keys": [item, other, third]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let text = String::from_utf8_lossy(&r.body);
    for secret in [key, hash.as_str()] {
        assert!(!text.contains(secret), "{secret} repeated: {text}");
    }
    assert_eq!(r.json()["errors"].as_array().unwrap().len(), 3, "{text}");
    assert!(text.contains("unknown field `nmae`"), "{text}");
}

#[tokio::test]
async fn an_atomic_import_with_one_bad_key_writes_nothing() {
    let gw = Gateway::start_with(EXTRA).await;
    gw.client("acme", "pro").await;
    let before = key_count(&gw).await;
    let good = "atomic-good-key-0123456789";
    for bad in [
        // Refused by the validation before the store.
        json!({"client_id": "acme", "name": "b", "key": "short"}),
        // Refused by the store (inside its transaction).
        json!({"client_id": "nobody", "name": "b", "key": "atomic-bad-client-0123"}),
        json!({"client_id": "acme", "name": "b", "key": good}),
    ] {
        let r = import(
            &gw,
            json!({"atomic": true, "keys": [
                {"client_id": "acme", "name": "g", "key": good}, bad,
            ]}),
        )
        .await;
        assert_eq!(r.status, 200);
        let v = r.json();
        assert_eq!(v["imported"], 0, "{v}");
        assert_eq!(v["errors"][0]["index"], 1, "{v}");
        assert_eq!(key_count(&gw).await, before);
        assert_eq!(gw.get_with_key("/x", good).await.status, 401);
    }
}

#[tokio::test]
async fn import_is_refused_without_an_admin_credential_and_for_hostile_bodies() {
    let gw = Gateway::start_with(EXTRA).await;
    let (client_key, _) = gw.client("acme", "pro").await;
    let (self_service, _) = {
        let v = gw
            .key("acme", json!({"permissions": ["keys:manage"]}))
            .await;
        (v["key"].as_str().unwrap().to_owned(), ())
    };
    let before = key_count(&gw).await;
    let body =
        json!({"keys": [{"client_id": "acme", "name": "k", "key": "hostile-import-key-0123"}]});
    let post = |headers: Vec<(&'static str, String)>, body: Option<Value>| {
        let gw = &gw;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            gw.admin_as("POST", "/v1/api-keys/import", body, &h).await
        }
    };
    assert_eq!(post(vec![], Some(body.clone())).await.status, 401);
    assert_eq!(
        post(
            vec![("x-admin-key", "wrong-admin-key-0123456789".into())],
            Some(body.clone())
        )
        .await
        .status,
        401
    );
    assert_eq!(
        post(
            vec![("authorization", format!("Bearer {client_key}"))],
            Some(body.clone())
        )
        .await
        .status,
        403,
        "a key without the self-service permission"
    );
    assert_eq!(
        post(
            vec![("authorization", format!("Bearer {self_service}"))],
            Some(body.clone())
        )
        .await
        .status,
        403,
        "import is for admins only"
    );
    let admin = || vec![("x-admin-key", ADMIN_KEY.to_string())];
    for (bad, status) in [
        (json!({}), 422),
        (json!({"keys": "not-an-array"}), 422),
        (json!({"keys": [], "atomic": "yes"}), 422),
        (json!({"keys": [], "other": 1}), 422),
        (
            json!({"keys": vec![json!({"client_id": "acme", "name": "k", "sha256": "00"}); 10_001]}),
            422,
        ),
    ] {
        let r = post(admin(), Some(bad.clone())).await;
        assert_eq!(
            r.status,
            status,
            "{bad}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // Malformed JSON, and a body past the admin body limit (1 MiB).
    let raw = |body: Vec<u8>| {
        let gw = &gw;
        async move {
            let req = http::Request::post(format!("http://{}/v1/api-keys/import", gw.admin))
                .header("x-admin-key", ADMIN_KEY)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            gw.send(req).await
        }
    };
    assert_eq!(raw(b"{\"keys\": [".to_vec()).await.status, 400);
    let mut big = b"{\"keys\": [\"".to_vec();
    big.extend(std::iter::repeat_n(b'x', 2 << 20));
    big.extend(b"\"]}");
    assert_eq!(raw(big).await.status, 413);
    assert_eq!(key_count(&gw).await, before);
    assert_eq!(
        gw.get_with_key("/x", "hostile-import-key-0123")
            .await
            .status,
        401
    );
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

async fn store_calls(gw: &Gateway) -> u64 {
    let r = gw.admin_as("GET", "/metrics", None, &[]).await;
    metric(
        &String::from_utf8_lossy(&r.body),
        "keygate_store_duration_seconds_count",
    )
}

#[tokio::test]
async fn a_flood_of_unknown_foreign_keys_reaches_the_store_once_per_distinct_key() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!(
        "url = \"sqlite://{}\"\nnegative_ttl_secs = 3600",
        dir.path().join("k.db").display()
    );
    let text = store_config_text(&upstream.url(), &store, EXTRA);
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let distinct: Vec<String> = (0..20)
        .map(|i| format!("unknown-foreign-key-{i:04}-padding"))
        .collect();
    let start = store_calls(&gw).await;
    for _ in 0..10 {
        for k in &distinct {
            assert_eq!(gw.get_with_key("/x", k).await.status, 401);
            assert_eq!(gw.get("/x", &[("x-api-key", k)]).await.status, 401);
        }
    }
    assert_eq!(
        store_calls(&gw).await - start,
        distinct.len() as u64,
        "400 requests with 20 distinct unknown keys: one store lookup each"
    );
    // Strings of neither shape never reach it.
    for k in ["short", "kg_not-a-keygate-key"] {
        for _ in 0..5 {
            assert_eq!(gw.get_with_key("/x", k).await.status, 401);
        }
    }
    assert_eq!(store_calls(&gw).await - start, distinct.len() as u64);
}

#[tokio::test]
async fn the_longest_and_shortest_imported_keys_work_in_every_form() {
    let gw = Gateway::start_with(EXTRA).await;
    gw.client("acme", "pro").await;
    let visible: String = (0x21u8..=0x7e).map(char::from).collect();
    let longest: String = visible.chars().cycle().skip(3).take(256).collect();
    // Basic credentials split at the first ':', so a key holding one needs the `user:` form.
    let longest = longest.replace(':', "_");
    let shortest = "exactly16chars!!";
    let r = import(
        &gw,
        json!({"keys": [
            {"client_id": "acme", "name": "long", "key": longest},
            {"client_id": "acme", "name": "short", "key": shortest},
        ]}),
    )
    .await;
    assert_eq!(r.json(), json!({"imported": 2, "errors": []}));
    for key in [longest.as_str(), shortest] {
        assert_eq!(statuses(&gw, key).await, [200; 5], "{key}");
    }
}

#[tokio::test]
async fn imported_keys_work_on_every_instance_sharing_a_redis_store() {
    let redis = crate::redis_support::RedisServer::start();
    let upstream = Upstream::start().await;
    let store = format!("url = \"{}\"\nnegative_ttl_secs = 3600", redis.tcp_url(0));
    let a = Gateway::start_on_store(upstream.clone(), &store, EXTRA).await;
    let b = Gateway::start_on_store(upstream, &store, EXTRA).await;
    a.client("acme", "pro").await;
    let kong = "shared-store-kong-key-0123456789";
    let unkey = "shared-store-unkey-key-0123456789";
    // B has seen both as unknown (cached negatively for an hour).
    for k in [kong, unkey] {
        assert_eq!(b.get_with_key("/x", k).await.status, 401);
    }
    let r = import(
        &a,
        json!({"keys": [
            {"client_id": "acme", "name": "kong", "key": kong},
            {"client_id": "acme", "name": "unkey", "sha256": sha256_hex(unkey)},
            {"client_id": "acme", "name": "dup", "key": kong},
        ]}),
    )
    .await;
    assert_eq!(r.json()["imported"], 2, "{}", r.json());
    assert_eq!(r.json()["errors"][0]["index"], 2);
    // The writes' invalidations reach B: its negative entries go well before their TTL.
    let start = std::time::Instant::now();
    for k in [kong, unkey] {
        loop {
            if b.get_with_key("/x", k).await.status == 200 {
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "B still refuses an imported key"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(a.get_with_key("/x", k).await.status, 200);
    }
}
