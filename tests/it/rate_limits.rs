//! Rate limits through the real proxy: per key, per plan, per route, live changes, headers,
//! failed-authentication throttling.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::Gateway;

/// Sends `n` requests with `key` as fast as possible; returns (allowed, refused, elapsed).
async fn burst(
    gw: &Gateway,
    key: &str,
    path: &str,
    n: usize,
) -> (usize, Vec<crate::support::Reply>, Duration) {
    let start = Instant::now();
    let mut ok = 0;
    let mut refused = Vec::new();
    for _ in 0..n {
        let r = gw.get_with_key(path, key).await;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => refused.push(r),
            s => panic!("unexpected status {s}"),
        }
    }
    (ok, refused, start.elapsed())
}

/// Cells a 5/s bucket may have refilled while a burst ran.
fn refilled(elapsed: Duration, per_second: u32) -> usize {
    (elapsed.as_secs_f64() * f64::from(per_second)).floor() as usize
}

#[tokio::test]
async fn a_key_gets_its_burst_and_recovers_after_the_refill_time() {
    let gw = Gateway::start().await;
    gw.client("acme", "pro").await;
    let v = gw
        .key("acme", json!({"rate_limit": {"per_second": 5, "burst": 5}}))
        .await;
    let key = v["key"].as_str().unwrap().to_owned();
    let seen_before = gw.upstream.count();
    let (ok, refused, elapsed) = burst(&gw, &key, "/", 30).await;
    assert!(
        ok >= 5 && ok <= 5 + refilled(elapsed, 5),
        "{ok} allowed in {elapsed:?}"
    );
    assert_eq!(ok + refused.len(), 30);
    assert_eq!(
        gw.upstream.count() - seen_before,
        ok,
        "a limited request reached the upstream"
    );

    let r = &refused[0];
    assert_eq!(r.code(), "rate_limited");
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.headers["ratelimit-limit"], "5");
    assert_eq!(r.headers["ratelimit-remaining"], "0");

    // After the bucket's refill time (1 s for 5 at 5/s) the whole burst is back.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (ok, _, elapsed) = burst(&gw, &key, "/", 30).await;
    assert!(
        ok >= 5 && ok <= 5 + refilled(elapsed, 5),
        "{ok} after refill"
    );
}

#[tokio::test]
async fn headers_count_down_consistently() {
    let gw = Gateway::start().await;
    gw.client("acme", "pro").await;
    let v = gw
        .key(
            "acme",
            json!({"rate_limit": {"per_minute": 60, "burst": 4}}),
        )
        .await;
    let key = v["key"].as_str().unwrap();
    let mut remaining = Vec::new();
    for _ in 0..4 {
        let r = gw.get_with_key("/", key).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["ratelimit-limit"], "4");
        let reset: u64 = r.headers["ratelimit-reset"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=4).contains(&reset), "reset {reset}");
        remaining.push(
            r.headers["ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(remaining, ["3", "2", "1", "0"]);
    let r = gw.get_with_key("/", key).await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=1).contains(&retry), "retry-after {retry}");
    // The 429's RateLimit-Reset means what it means on every answer: until the bucket is
    // full again (4 cells at one a second), not until the next cell.
    let reset: u64 = r.headers["ratelimit-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((3..=4).contains(&reset), "reset {reset}");
}

#[tokio::test]
async fn the_plan_limit_applies_to_a_key_without_override() {
    // The test config's "free" plan: 60/min, burst 10.
    let gw = Gateway::start().await;
    let (key, _) = gw.client("freebie", "free").await;
    let (ok, refused, elapsed) = burst(&gw, &key, "/", 25).await;
    assert!(ok >= 10 && ok <= 10 + refilled(elapsed, 1), "{ok}");
    assert_eq!(refused[0].headers["ratelimit-limit"], "10");
}

#[tokio::test]
async fn patching_a_limit_takes_effect_on_the_next_request() {
    let gw = Gateway::start().await;
    gw.client("acme", "pro").await;
    let v = gw
        .key("acme", json!({"rate_limit": {"per_minute": 1, "burst": 1}}))
        .await;
    let (key, id) = (v["key"].as_str().unwrap(), v["id"].as_str().unwrap());
    assert_eq!(gw.get_with_key("/", key).await.status, 200);
    assert_eq!(gw.get_with_key("/", key).await.status, 429);
    let r = gw
        .admin(
            "PATCH",
            &format!("/v1/api-keys/{id}"),
            Some(json!({"rate_limit": {"per_minute": 100, "burst": 3}})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = gw.get_with_key("/", key).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["ratelimit-limit"], "3");
    // Removing the override falls back to the plan ("pro": burst 1000).
    gw.admin(
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"rate_limit": null})),
    )
    .await;
    let r = gw.get_with_key("/", key).await;
    assert_eq!(r.headers["ratelimit-limit"], "1000");
}

#[tokio::test]
async fn a_route_limit_applies_on_top_of_the_key_limit() {
    let gw = Gateway::start_with(
        "[[routes]]\npath = \"/\"\n[[routes]]\npath = \"/expensive\"\nrate_limit = { per_minute = 2, burst = 2 }\n",
    )
    .await;
    let (key, _) = gw.client("acme", "pro").await;
    let (ok, _, _) = burst(&gw, &key, "/expensive", 6).await;
    assert_eq!(ok, 2);
    // The rest of the API is still open to the key.
    assert_eq!(gw.get_with_key("/cheap", &key).await.status, 200);
}

#[tokio::test]
async fn failed_authentications_are_throttled_per_ip() {
    let gw = Gateway::start_with("").await;
    let (good, _) = gw.client("acme", "pro").await;
    let fake = keygate::keys::KeyFormat::new("kg_").generate().plaintext.0;
    // Default allowance: 20 a minute.
    for i in 0..20 {
        let r = gw.get_with_key("/", &fake).await;
        assert_eq!(r.status, 401, "attempt {i}");
    }
    let r = gw.get_with_key("/", &fake).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.code(), "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry), "retry-after {retry}");
    // Only failing attempts are refused: a valid key from the same address is served, and the
    // next guess is still held back.
    assert_eq!(gw.get_with_key("/", &good).await.status, 200);
    assert_eq!(gw.upstream.count(), 1);
    assert_eq!(gw.get_with_key("/", &fake).await.status, 429);
    // The admin listener has its own budget: the admin key works, and its own guesses start
    // from a full allowance.
    assert_eq!(gw.admin("GET", "/v1/api-keys", None).await.status, 200);
}
