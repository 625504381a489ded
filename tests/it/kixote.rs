//! Kixote-compatible client calls with exact bodies, login, tokens through the proxy, and
//! self-service client principals.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::{Value, json};

use crate::support::{ADMIN_KEY, Gateway};

fn keys_of(v: &Value) -> Vec<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

#[tokio::test]
async fn every_kixote_call_with_its_exact_body_and_answer() {
    let gw = Gateway::start().await;

    // create_client
    let r = gw
        .admin(
            "POST",
            "/auth/create_client",
            Some(json!({"client_id": "acme", "license": "pro"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let mut fields = keys_of(&v);
    fields.sort_unstable();
    assert_eq!(fields, ["api_key", "client_id", "license"]);
    assert_eq!(v["client_id"], "acme");
    assert_eq!(v["license"], "pro");
    let key1 = v["api_key"].as_str().unwrap().to_owned();
    assert_eq!(gw.get_with_key("/", &key1).await.status, 200);

    let r = gw
        .admin(
            "POST",
            "/auth/create_client",
            Some(json!({"client_id": "acme", "license": "pro"})),
        )
        .await;
    assert_eq!(r.status, 409);
    let r = gw
        .admin(
            "POST",
            "/auth/create_client",
            Some(json!({"client_id": "b", "license": "gold"})),
        )
        .await;
    assert_eq!(r.status, 422);

    // list_clients: exact fields and date format.
    let r = gw.admin("GET", "/auth/list_clients", None).await;
    assert_eq!(r.status, 200);
    let list = r.json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    let mut fields = keys_of(&list[0]);
    fields.sort_unstable();
    assert_eq!(fields, ["client_id", "created_at", "license"]);
    let created = list[0]["created_at"].as_str().unwrap();
    assert!(
        chrono::NaiveDateTime::parse_from_str(created, "%Y-%m-%d %H:%M:%S").is_ok(),
        "{created}"
    );

    // revoke_client_key: the key stops with the next request.
    let r = gw
        .admin(
            "POST",
            "/auth/revoke_client_key",
            Some(json!({"client_id": "acme"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"client_id": "acme", "message": "Client key revoked"})
    );
    let r = gw.get_with_key("/", &key1).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "disabled_api_key")
    );

    // create_client_key: a new key works, earlier keys do not.
    let r = gw
        .admin(
            "POST",
            "/auth/create_client_key",
            Some(json!({"client_id": "acme"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["client_id"], "acme");
    assert_eq!(v["message"], "Client key recreated");
    let key2 = v["api_key"].as_str().unwrap().to_owned();
    assert_eq!(keys_of(&v).len(), 3);
    assert_eq!(gw.get_with_key("/", &key2).await.status, 200);
    assert_eq!(gw.get_with_key("/", &key1).await.status, 401);
    let r = gw
        .admin(
            "POST",
            "/auth/create_client_key",
            Some(json!({"client_id": "acme"})),
        )
        .await;
    let key3 = r.json()["api_key"].as_str().unwrap().to_owned();
    assert_eq!(gw.get_with_key("/", &key2).await.status, 401);
    assert_eq!(gw.get_with_key("/", &key3).await.status, 200);

    // delete_client (JSON body on DELETE).
    let r = gw
        .admin(
            "DELETE",
            "/auth/delete_client",
            Some(json!({"client_id": "acme"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"message": "Client deleted", "client_id": "acme"})
    );
    assert_eq!(gw.get_with_key("/", &key3).await.status, 401);

    // Unknown clients → 404; missing or wrong admin key → 401.
    for (m, p) in [
        ("POST", "/auth/revoke_client_key"),
        ("POST", "/auth/create_client_key"),
        ("DELETE", "/auth/delete_client"),
    ] {
        let r = gw.admin(m, p, Some(json!({"client_id": "nobody"}))).await;
        assert_eq!(r.status, 404, "{m} {p}");
        let r = gw
            .admin_as(m, p, Some(json!({"client_id": "nobody"})), &[])
            .await;
        assert_eq!(r.status, 401, "{m} {p}");
        let r = gw
            .admin_as(
                m,
                p,
                Some(json!({"client_id": "x"})),
                &[("x-admin-key", "wrong-wrong-wrong-wrong")],
            )
            .await;
        assert_eq!(r.status, 401, "{m} {p}");
    }
    assert_eq!(
        gw.admin_as("GET", "/auth/list_clients", None, &[])
            .await
            .status,
        401
    );
}

async fn login(gw: &Gateway, on_proxy: bool, key: &str) -> crate::support::Reply {
    let addr = if on_proxy { gw.proxy } else { gw.admin };
    let req = http::Request::post(format!("http://{addr}/auth/login"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            json!({"api_key": key}).to_string(),
        )))
        .unwrap();
    gw.send(req).await
}

#[tokio::test]
async fn login_on_both_listeners_and_tokens_through_the_proxy() {
    let gw = Gateway::start().await;
    let (key, key_id) = gw.client("acme", "pro").await;
    for on_proxy in [false, true] {
        let r = login(&gw, on_proxy, &key).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["expires_in"], 900);
        let token = v["access_token"].as_str().unwrap();
        assert_eq!(token.split('.').count(), 3);
        let r = gw.get_with_key("/with-token", token).await;
        assert_eq!(r.status, 200);
        let seen = gw.upstream.last();
        assert_eq!(seen.headers["x-keygate-key-id"], key_id.as_str());
        assert!(!seen.headers.contains_key("authorization"));
    }
    let r = login(&gw, true, "kg_not-a-key").await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "invalid_api_key")
    );
    let r = login(&gw, false, "kg_not-a-key").await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn a_token_dies_with_its_key() {
    let gw = Gateway::start().await;
    gw.client("acme", "pro").await;
    let token_for = |key: String| {
        let gw = &gw;
        async move {
            let r = login(gw, true, &key).await;
            assert_eq!(r.status, 200);
            r.json()["access_token"].as_str().unwrap().to_owned()
        }
    };
    let refused = |r: crate::support::Reply| {
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (401, "invalid_token")
        );
    };

    // Disabled.
    let v = gw.key("acme", json!({})).await;
    let (k, id) = (
        v["key"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().to_owned(),
    );
    let t = token_for(k).await;
    assert_eq!(gw.get_with_key("/", &t).await.status, 200);
    gw.admin(
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"enabled": false})),
    )
    .await;
    refused(gw.get_with_key("/", &t).await);
    // A token keygate signed is no guess: a script still sending it past the failed-auth
    // allowance (20 a minute) gets 401 every time, never 429, and its address is not held
    // back for the guesses the allowance is for.
    for i in 0..25 {
        let r = gw.get_with_key("/", &t).await;
        assert_eq!(r.status, 401, "request {i} with a dead key's token");
    }
    let fake = keygate::keys::KeyFormat::new("kg_").generate().plaintext.0;
    assert_eq!(gw.get_with_key("/", &fake).await.status, 401);

    // Rotated (even with a grace period for the old key).
    let v = gw.key("acme", json!({})).await;
    let (k, id) = (
        v["key"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().to_owned(),
    );
    let t = token_for(k).await;
    assert_eq!(gw.get_with_key("/", &t).await.status, 200);
    let r = gw
        .admin(
            "POST",
            &format!("/v1/api-keys/{id}/rotate"),
            Some(json!({"grace_period_seconds": 60})),
        )
        .await;
    let new_key = r.json()["key"].as_str().unwrap().to_owned();
    refused(gw.get_with_key("/", &t).await);
    let t2 = token_for(new_key).await;
    assert_eq!(gw.get_with_key("/", &t2).await.status, 200);

    // Deleted.
    let r = gw
        .admin("DELETE", &format!("/v1/api-keys/{id}"), None)
        .await;
    assert_eq!(r.status, 200);
    refused(gw.get_with_key("/", &t2).await);

    // Client revoked through Kixote, then the whole client deleted.
    let v = gw.key("acme", json!({})).await;
    let t = token_for(v["key"].as_str().unwrap().to_owned()).await;
    assert_eq!(gw.get_with_key("/", &t).await.status, 200);
    gw.admin(
        "POST",
        "/auth/revoke_client_key",
        Some(json!({"client_id": "acme"})),
    )
    .await;
    refused(gw.get_with_key("/", &t).await);
    let r = gw
        .admin(
            "POST",
            "/auth/create_client_key",
            Some(json!({"client_id": "acme"})),
        )
        .await;
    let t = token_for(r.json()["api_key"].as_str().unwrap().to_owned()).await;
    assert_eq!(gw.get_with_key("/", &t).await.status, 200);
    gw.admin("DELETE", "/v1/clients/acme", None).await;
    refused(gw.get_with_key("/", &t).await);
}

#[tokio::test]
async fn forged_tokens_are_refused_by_the_proxy() {
    use base64::Engine;
    let secret = crate::support::JWT_SECRET;
    let gw = Gateway::start().await;
    let (key, key_id) = gw.client("acme", "pro").await;
    let r = login(&gw, true, &key).await;
    let good = r.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(gw.get_with_key("/", &good).await.status, 200);

    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let payload = good.split('.').nth(1).unwrap().to_owned();
    let now = chrono::Utc::now().timestamp();
    let claims = |exp: i64, iss: &str| {
        b64(
            &json!({"iss": iss, "sub": "acme", "iat": now - 10, "nbf": now - 10, "exp": exp,
            "jti": "x", "kid": key_id, "rot": 0, "permissions": []})
            .to_string(),
        )
    };
    let sign = |h: &str, p: &str, secret: &[u8]| {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{h}.{p}").as_bytes());
        let sig =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{h}.{p}.{sig}")
    };
    let hs = b64(r#"{"alg":"HS256","typ":"JWT"}"#);
    // Sanity: a token we forge with the real secret and good claims is accepted.
    assert_eq!(
        gw.get_with_key(
            "/",
            &sign(&hs, &claims(now + 300, "keygate"), secret.as_bytes())
        )
        .await
        .status,
        200
    );
    let corpus = [
        format!("{}.{payload}.", b64(r#"{"alg":"none"}"#)),
        sign(&hs, &payload, b"some-other-secret-some-other-secret"),
        sign(&b64(r#"{"alg":"RS256"}"#), &payload, secret.as_bytes()),
        sign(&hs, &claims(now - 3600, "keygate"), secret.as_bytes()),
        sign(&hs, &claims(now + 300, "someone-else"), secret.as_bytes()),
        format!("{}x", &good[..good.len() - 1]),
        format!(
            "{}.{}.{}",
            good.split('.').next().unwrap(),
            claims(now + 300, "keygate"),
            good.split('.').nth(2).unwrap()
        ),
        good[..good.len() / 2].to_string(),
        format!("a.{}.c", "A".repeat(60 * 1024)),
    ];
    for (i, t) in corpus.iter().enumerate() {
        let r = gw.get_with_key("/", t).await;
        assert!(
            r.status == 401 || r.status == 431,
            "token {i} got {}",
            r.status
        );
        if r.status == 401 {
            // Anything with three parts is judged as a token; anything else as a key.
            let expected = if t.matches('.').count() == 2 {
                "invalid_token"
            } else {
                "invalid_api_key"
            };
            assert_eq!(r.code(), expected, "token {i}");
        }
    }
    // An API key is not a token, and the admin key is nothing on the proxy.
    assert_eq!(
        gw.get_with_key("/", ADMIN_KEY).await.code(),
        "invalid_api_key"
    );
}

#[tokio::test]
async fn client_principals_manage_only_their_own_keys() {
    let gw = Gateway::start().await;
    let r = gw
        .admin(
            "POST",
            "/v1/clients",
            Some(json!({"client_id": "acme", "license": "pro", "permissions": ["keys:manage", "READ"]})),
        )
        .await;
    let self_key = r.json()["api_key"]["key"].as_str().unwrap().to_owned();
    let (other_key, other_id) = gw.client("beta", "pro").await;
    let as_client = |k: &str| vec![("x-api-key".to_string(), k.to_string())];
    let call = |m: &'static str, p: String, body: Option<Value>, k: &str| {
        let h = as_client(k);
        let gw = &gw;
        async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            gw.admin_as(m, &p, body, &h).await
        }
    };

    let r = call("GET", "/v1/api-keys".into(), None, &self_key).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["total"], 1);
    assert_eq!(v["data"][0]["client_id"], "acme");

    let r = call(
        "POST",
        "/v1/api-keys".into(),
        Some(json!({"name": "mine", "permissions": ["READ"]})),
        &self_key,
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["client_id"], "acme");
    let mine = r.json()["id"].as_str().unwrap().to_owned();

    // Another client's key: 404, whatever the verb.
    for (m, p) in [
        ("GET", format!("/v1/api-keys/{other_id}")),
        ("DELETE", format!("/v1/api-keys/{other_id}")),
        ("POST", format!("/v1/api-keys/{other_id}/rotate")),
    ] {
        assert_eq!(
            call(m, p.clone(), None, &self_key).await.status,
            404,
            "{m} {p}"
        );
    }
    assert_eq!(
        gw.get_with_key("/", &other_key).await.status,
        200,
        "untouched"
    );
    let r = call(
        "POST",
        "/v1/api-keys".into(),
        Some(json!({"name": "x", "client_id": "beta"})),
        &self_key,
    )
    .await;
    assert_eq!(r.status, 422);

    // No escalation: permissions it lacks, rate limits, client management.
    let r = call(
        "POST",
        "/v1/api-keys".into(),
        Some(json!({"name": "x", "permissions": ["ADMIN"]})),
        &self_key,
    )
    .await;
    assert_eq!(r.status, 403);
    let r = call(
        "PATCH",
        format!("/v1/api-keys/{mine}"),
        Some(json!({"rate_limit": {"per_second": 1000000, "burst": 1000000}})),
        &self_key,
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        call("GET", "/v1/clients".into(), None, &self_key)
            .await
            .status,
        403
    );
    // The Kixote calls answer a missing X-ADMIN-KEY 401 (their contract), a client
    // principal's credential included; nothing is changed.
    assert_eq!(
        call("GET", "/auth/list_clients".into(), None, &self_key)
            .await
            .status,
        401
    );
    for (path, body) in [
        (
            "/auth/create_client",
            json!({"client_id": "sneaky", "license": "pro"}),
        ),
        ("/auth/revoke_client_key", json!({"client_id": "acme"})),
        ("/auth/create_client_key", json!({"client_id": "acme"})),
    ] {
        let r = call("POST", path.into(), Some(body), &self_key).await;
        assert_eq!(r.status, 401, "{path}");
        assert!(r.headers.contains_key("www-authenticate"), "{path}");
    }
    let r = call(
        "DELETE",
        "/auth/delete_client".into(),
        Some(json!({"client_id": "acme"})),
        &self_key,
    )
    .await;
    assert_eq!(r.status, 401);
    // Whatever its body: wrong types, unknown licenses, malformed JSON, oversized.
    for (what, body) in [
        ("wrong types", json!({"client_id": 5, "license": ["pro"]})),
        (
            "unknown license",
            json!({"client_id": "sneaky", "license": "gold"}),
        ),
        ("text", json!("not an object")),
    ] {
        let r = call("POST", "/auth/create_client".into(), Some(body), &self_key).await;
        assert_eq!(
            r.status,
            401,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    for (what, body) in [
        ("malformed JSON", b"{\"client_id\":".to_vec()),
        ("oversized", vec![b' '; 2 * 1024 * 1024]),
    ] {
        let req = Request::post(format!("http://{}/auth/create_client", gw.admin))
            .header("x-api-key", &self_key)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        assert_eq!(gw.send(req).await.status, 401, "{what}");
    }
    assert_eq!(gw.get_with_key("/x", &self_key).await.status, 200);
    assert_eq!(
        gw.admin("GET", "/v1/clients/sneaky", None).await.status,
        404
    );
    // So does a valid key without the self-service permission: 401 as for a wrong key (it
    // was 403, which told a valid key from a guess), nothing changed.
    let plain = gw.key("acme", json!({})).await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    for (m, path, body) in [
        ("GET", "/auth/list_clients", None),
        (
            "POST",
            "/auth/create_client",
            Some(json!({"client_id": "sneaky", "license": "pro"})),
        ),
        (
            "POST",
            "/auth/revoke_client_key",
            Some(json!({"client_id": "acme"})),
        ),
        (
            "POST",
            "/auth/create_client_key",
            Some(json!({"client_id": "acme"})),
        ),
        (
            "DELETE",
            "/auth/delete_client",
            Some(json!({"client_id": "acme"})),
        ),
    ] {
        let r = call(m, path.into(), body, &plain).await;
        assert_eq!(r.status, 401, "{path}");
        assert!(r.headers.contains_key("www-authenticate"), "{path}");
    }
    assert_eq!(gw.get_with_key("/x", &plain).await.status, 200);
    // The rest of the admin API still says why: the key lacks the permission.
    assert_eq!(
        call("GET", "/v1/api-keys".into(), None, &plain)
            .await
            .status,
        403
    );

    // Own key management works, with a token too.
    let r = call(
        "PATCH",
        format!("/v1/api-keys/{mine}"),
        Some(json!({"name": "renamed"})),
        &self_key,
    )
    .await;
    assert_eq!(r.status, 200);
    let token = login(&gw, false, &self_key).await.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = gw
        .admin_as(
            "GET",
            &format!("/v1/api-keys/{mine}"),
            None,
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "renamed");

    // A key without the self-service permission is not a principal.
    assert_eq!(
        call("GET", "/v1/api-keys".into(), None, &other_key)
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn failed_admin_authentications_and_logins_are_throttled() {
    let gw = Gateway::start().await;
    for i in 0..20 {
        let r = gw
            .admin_as(
                "GET",
                "/v1/api-keys",
                None,
                &[("x-admin-key", "guess-guess-guess-guess")],
            )
            .await;
        assert_eq!(r.status, 401, "attempt {i}");
    }
    let r = gw
        .admin_as(
            "GET",
            "/v1/api-keys",
            None,
            &[("x-admin-key", "guess-guess-guess-guess")],
        )
        .await;
    assert_eq!(r.status, 429);
    assert!(r.headers.contains_key("retry-after"));
    // Failing logins from the same address are held back too; the right admin key is never
    // refused for what others sent from its address.
    assert_eq!(login(&gw, false, "kg_whatever").await.status, 429);
    assert_eq!(gw.admin("GET", "/v1/api-keys", None).await.status, 200);
}

/// A token minted before its key was disabled, rotated or revoked stays refused for good:
/// re-enabling the key does not bring it back, and a token minted with the old secret during a
/// rotation's grace period dies when the grace period ends.
async fn tokens_die_for_good_with_what_killed_their_key(redis: bool) {
    let (gw, _redis) = crate::self_service::on_store(redis).await;
    let (_, _) = gw.client("acme", "pro").await;
    let token_for = |key: String| {
        let gw = &gw;
        async move {
            let r = login(gw, true, &key).await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            r.json()["access_token"].as_str().unwrap().to_owned()
        }
    };
    let status = |t: String| {
        let gw = &gw;
        async move { gw.get_with_key("/", &t).await.status.as_u16() }
    };
    let v = gw.key("acme", json!({})).await;
    let (key, id) = (
        v["key"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().to_owned(),
    );
    let path = format!("/v1/api-keys/{id}");
    let enable = |on: bool| {
        let gw = &gw;
        let path = path.clone();
        async move {
            let r = gw
                .admin("PATCH", &path, Some(json!({ "enabled": on })))
                .await;
            assert_eq!(r.status, 200);
        }
    };

    // Disabled, then enabled again: the old token stays dead, a new one works.
    let before_disable = token_for(key.clone()).await;
    assert_eq!(status(before_disable.clone()).await, 200);
    enable(false).await;
    assert_eq!(status(before_disable.clone()).await, 401);
    enable(true).await;
    assert_eq!(
        status(before_disable.clone()).await,
        401,
        "a token minted before the disable works again after the enable"
    );
    let after_enable = token_for(key.clone()).await;
    assert_eq!(status(after_enable.clone()).await, 200);

    // Revoked through Kixote (every key of the client disabled), then enabled again.
    let r = gw
        .admin(
            "POST",
            "/auth/revoke_client_key",
            Some(json!({"client_id": "acme"})),
        )
        .await;
    assert_eq!(r.status, 200);
    enable(true).await;
    assert_eq!(
        status(after_enable).await,
        401,
        "a token minted before the revoke works again after the enable"
    );

    // Rotated with a short grace period: a token minted with the new key works; one minted
    // with the old key during the grace period dies when it ends.
    let before_rotation = token_for(key.clone()).await;
    let r = gw
        .admin(
            "POST",
            &format!("{path}/rotate"),
            Some(json!({"grace_period_seconds": 2})),
        )
        .await;
    assert_eq!(r.status, 200);
    let new_key = r.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(status(before_rotation).await, 401);
    let in_grace = token_for(key.clone()).await;
    assert_eq!(
        status(in_grace.clone()).await,
        200,
        "within the grace period"
    );
    let with_new = token_for(new_key.clone()).await;
    // Wait (bounded) until the old key itself is refused: the grace period is over.
    let waited = std::time::Instant::now();
    while gw.get_with_key("/", &key).await.status == 200 {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(10),
            "the grace period never ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        status(in_grace).await,
        401,
        "a token minted with the old key outlives the grace period"
    );
    assert_eq!(status(with_new).await, 200);
    assert_eq!(status(token_for(new_key).await).await, 200);
}

#[tokio::test]
async fn sqlite_tokens_die_for_good_with_what_killed_their_key() {
    tokens_die_for_good_with_what_killed_their_key(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tokens_die_for_good_with_what_killed_their_key() {
    tokens_die_for_good_with_what_killed_their_key(true).await;
}
