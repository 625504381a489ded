//! Two gateway instances sharing one real `redis-server` (one reaches it over its unix socket,
//! the other over TCP): keys created on one work on the other, revocations and changes made on
//! one are enforced by the other within 100 ms, and a Redis outage is survived: cached keys keep
//! working, unknown keys and admin writes get 503, and service comes back by itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keygate::keys::KeyFormat;
use serde_json::json;

use crate::redis_support::RedisServer;
use crate::support::{Gateway, Reply, Upstream};

/// The bound SPEC §6 sets for a revocation on one instance to be enforced by every other.
const PROPAGATION_BOUND: Duration = Duration::from_millis(100);

async fn pair(redis: &RedisServer, store_settings: &str) -> (Gateway, Gateway) {
    let upstream = Upstream::start().await;
    let store = |url: String| format!("url = \"{url}\"\n{store_settings}");
    let a = Gateway::start_on_store(upstream.clone(), &store(redis.unix_url()), "").await;
    let b = Gateway::start_on_store(upstream, &store(redis.tcp_url(0)), "").await;
    for gw in [&a, &b] {
        wait_ready(gw, Duration::from_secs(10)).await;
    }
    (a, b)
}

/// Polls `/readyz` until it answers 200; returns how long that took.
async fn wait_ready(gw: &Gateway, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let r = gw.admin_as("GET", "/readyz", None, &[]).await;
        if r.status == 200 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "/readyz still {} after {limit:?}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends requests with `key` to `gw` back to back until one answers `status`; returns how long
/// that took and the answer. Gives up after two seconds.
async fn until_status(gw: &Gateway, key: &str, status: u16) -> (Duration, Reply) {
    let start = Instant::now();
    loop {
        let r = gw.get_with_key("/poll", key).await;
        if r.status == status {
            return (start.elapsed(), r);
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "still {} after 2 s, expected {status}",
            r.status
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn warm(gw: &Gateway, key: &str) {
    for _ in 0..3 {
        let r = gw.get_with_key("/warm", key).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
}

#[tokio::test]
async fn a_key_created_on_one_instance_works_on_the_other_and_its_revocation_reaches_it_at_once() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis, "").await;
    let (key, id) = a.client("acme", "pro").await;
    warm(&b, &key).await;
    assert_eq!(
        b.upstream.last().headers["x-keygate-client-id"],
        "acme",
        "B authenticated the key created on A"
    );
    warm(&a, &key).await;

    // B's cache holds the key (TTL 60 s): only the invalidation can make B refuse it now.
    let sent = Instant::now();
    let r = a.admin("DELETE", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(r.status, 200);
    let answered = sent.elapsed();
    let (took, r) = until_status(&b, &key, 401).await;
    assert_eq!(r.code(), "invalid_api_key");
    eprintln!(
        "revocation propagated A→B in {:.1} ms after the DELETE was answered ({:.1} ms to answer it)",
        ms(took),
        ms(answered)
    );
    assert!(took < PROPAGATION_BOUND, "took {took:?}");
    for gw in [&a, &b] {
        assert_eq!(gw.get_with_key("/after", &key).await.status, 401);
    }
}

#[tokio::test]
async fn rotation_disabling_and_license_changes_on_one_instance_reach_the_other() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis, "").await;
    let (old, id) = a.client("acme", "pro").await;
    warm(&b, &old).await;

    // Rotation without grace: the old key stops on B at once, the new one works there.
    let r = a
        .admin(
            "POST",
            &format!("/v1/api-keys/{id}/rotate"),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, 200);
    let new = r.json()["key"].as_str().unwrap().to_owned();
    let (took, _) = until_status(&b, &old, 401).await;
    eprintln!("rotation propagated A→B in {:.1} ms", ms(took));
    assert!(took < PROPAGATION_BOUND, "took {took:?}");
    warm(&b, &new).await;

    // Rotation with a grace period: both work on B until it ends.
    let r = a
        .admin(
            "POST",
            &format!("/v1/api-keys/{id}/rotate"),
            Some(json!({"grace_period_seconds": 3600})),
        )
        .await;
    let newer = r.json()["key"].as_str().unwrap().to_owned();
    warm(&b, &newer).await;
    warm(&b, &new).await;

    // Disabled on A: B answers disabled_api_key at once; enabled again: B serves it again.
    let r = a
        .admin(
            "PATCH",
            &format!("/v1/api-keys/{id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(r.status, 200);
    let (took, r) = until_status(&b, &newer, 401).await;
    assert_eq!(r.code(), "disabled_api_key");
    assert!(took < PROPAGATION_BOUND, "took {took:?}");
    a.admin(
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"enabled": true})),
    )
    .await;
    let (took, _) = until_status(&b, &newer, 200).await;
    assert!(took < PROPAGATION_BOUND, "took {took:?}");

    // A client's license is part of its cached keys: B forwards the new one at once.
    assert_eq!(b.upstream.last().headers["x-keygate-license"], "pro");
    let r = a
        .admin(
            "PATCH",
            "/v1/clients/acme",
            Some(json!({"license": "free"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let start = Instant::now();
    loop {
        assert_eq!(b.get_with_key("/license", &newer).await.status, 200);
        if b.upstream.last().headers["x-keygate-license"] == "free" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "license not updated"
        );
    }
    assert!(start.elapsed() < PROPAGATION_BOUND, "{:?}", start.elapsed());

    // Deleting the client on A stops all its keys on B.
    let r = a.admin("DELETE", "/v1/clients/acme", None).await;
    assert_eq!(r.status, 200);
    let (took, _) = until_status(&b, &newer, 401).await;
    assert!(took < PROPAGATION_BOUND, "took {took:?}");
    assert_eq!(b.get_with_key("/x", &new).await.status, 401);
}

fn assert_store_unavailable(r: &Reply, what: &str) {
    assert_eq!(
        r.status,
        503,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.code(), "store_unavailable", "{what}");
    assert!(
        r.headers.contains_key("retry-after"),
        "{what}: no Retry-After"
    );
}

#[tokio::test]
async fn redis_outage_cached_keys_keep_working_the_rest_gets_503_and_service_comes_back() {
    let mut redis = RedisServer::start();
    // A short cache TTL, so that during the outage cached keys are past it and are served
    // stale (stale_if_error) after a failed revalidation.
    let (a, b) = pair(&redis, "cache_ttl_secs = 1").await;
    let (key, id) = a.client("acme", "pro").await;
    let spare = a.key("acme", json!({})).await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    warm(&a, &key).await;
    warm(&b, &key).await;
    let keys_before = a.admin("GET", "/v1/api-keys", None).await.json()["total"].clone();
    let unknown = KeyFormat::new("kg_").generate().plaintext.0;

    // Traffic on A with the cached key, through the whole outage and recovery.
    let a = Arc::new(a);
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let traffic = tokio::spawn({
        let (a, stop, statuses, key) = (a.clone(), stop.clone(), statuses.clone(), key.clone());
        async move {
            while !stop.load(Ordering::SeqCst) {
                let s = a.get_with_key("/traffic", &key).await.status.as_u16();
                statuses.lock().unwrap().push(s);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    redis.kill();
    tokio::time::sleep(Duration::from_millis(1200)).await; // past the cache TTL

    for (name, gw) in [("A", &*a), ("B", &b)] {
        assert_eq!(
            gw.get_with_key("/cached", &key).await.status,
            200,
            "{name}: cached key"
        );
        for (what, k) in [
            ("never-seen key", &unknown),
            ("uncached stored key", &spare),
        ] {
            let t = Instant::now();
            let r = gw.get_with_key("/uncached", k).await;
            assert_store_unavailable(&r, &format!("{name}: {what}"));
            assert!(t.elapsed() < Duration::from_secs(1), "{name}: {what} slow");
        }
        let r = gw.admin_as("GET", "/readyz", None, &[]).await;
        assert_eq!(r.status, 503, "{name}: /readyz");
        let writes = [
            (
                "POST",
                "/v1/clients".to_string(),
                Some(json!({"client_id": "during", "license": "pro"})),
            ),
            (
                "POST",
                "/v1/api-keys".to_string(),
                Some(json!({"name": "during", "client_id": "acme"})),
            ),
            ("DELETE", format!("/v1/api-keys/{id}"), None),
            (
                "PATCH",
                format!("/v1/api-keys/{id}"),
                Some(json!({"enabled": false})),
            ),
        ];
        for (method, path, body) in writes {
            let r = gw.admin(method, &path, body).await;
            assert_store_unavailable(&r, &format!("{name}: {method} {path}"));
        }
    }

    // Redis comes back with its data (append-only file); the gateways were not restarted.
    redis.restart();
    let restarted = Instant::now();
    for gw in [&*a, &b] {
        wait_ready(gw, Duration::from_secs(10)).await;
    }
    eprintln!(
        "after the Redis restart both gateways were ready in {:.1} ms",
        ms(restarted.elapsed())
    );
    for (name, gw) in [("A", &*a), ("B", &b)] {
        for k in [&key, &spare] {
            assert_eq!(gw.get_with_key("/back", k).await.status, 200, "{name}");
        }
        let r = gw.get_with_key("/back", &unknown).await;
        assert_eq!(r.status, 401, "{name}: unknown key after recovery");
        assert_eq!(r.code(), "invalid_api_key");
    }
    // Nothing of the refused writes exists, and the key was neither deleted nor disabled.
    assert_eq!(a.admin("GET", "/v1/clients/during", None).await.status, 404);
    assert_eq!(
        a.admin("GET", "/v1/api-keys", None).await.json()["total"],
        keys_before
    );
    let shown = a.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(shown.json()["enabled"], true);

    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();
    let statuses = statuses.lock().unwrap().clone();
    assert!(statuses.len() > 100, "only {} requests", statuses.len());
    let failed: Vec<_> = statuses.iter().filter(|&&s| s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests with a cached key failed: {:?}",
        failed.len(),
        statuses.len(),
        failed
    );

    // Invalidations flow again: a revocation on A reaches B at once.
    let created = a.key("acme", json!({})).await;
    let (fresh, fresh_id) = (
        created["key"].as_str().unwrap().to_owned(),
        created["id"].as_str().unwrap().to_owned(),
    );
    warm(&b, &fresh).await;
    a.admin("DELETE", &format!("/v1/api-keys/{fresh_id}"), None)
        .await;
    let (took, _) = until_status(&b, &fresh, 401).await;
    eprintln!(
        "after the Redis restart, revocation propagated A→B in {:.1} ms",
        ms(took)
    );
    assert!(took < PROPAGATION_BOUND, "took {took:?}");
}

#[tokio::test]
async fn a_gateway_starts_while_redis_is_down_and_serves_once_it_is_up() {
    let mut redis = RedisServer::start();
    redis.kill();
    let gw = Gateway::start_on_store(
        Upstream::start().await,
        &format!("url = \"{}\"", redis.unix_url()),
        "",
    )
    .await;
    let r = gw.admin_as("GET", "/readyz", None, &[]).await;
    assert_eq!(r.status, 503);
    let unknown = KeyFormat::new("kg_").generate().plaintext.0;
    assert_store_unavailable(&gw.get_with_key("/", &unknown).await, "unknown key");

    redis.restart();
    wait_ready(&gw, Duration::from_secs(10)).await;
    let (key, _) = gw.client("acme", "pro").await;
    // Lookups skip the store for up to a second after a failure (no request waits on a dead
    // store); then keys are served again.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let s = gw.get_with_key("/", &key).await.status;
        if s == 200 {
            break;
        }
        assert_eq!(s, 503);
        assert!(std::time::Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.get_with_key("/", &unknown).await.status, 401);
}
