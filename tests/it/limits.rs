//! Limits that hold across keys and instances, through the real gateway: a plan's rate limit
//! shared by every key and token of a client (or per key), credits charged exactly (on SQLite
//! in one process, on one redis-server behind three gateway processes), quotas per client and
//! UTC calendar period, and the admin calls that set and read them — with hostile inputs.

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::redis_support::RedisServer;
use crate::support::binary::Binary;
use crate::support::{ADMIN_KEY, Gateway, Reply, Upstream, config_text, store_config_text};

/// A plan fast enough that only credits and quotas refuse anything, one client-wide plan with
/// a small burst, the same per key, and a plan with a daily quota.
const PLANS: &str = r#"
[plans.bulk]
rate_limit = { per_second = 100000, burst = 100000 }
[plans.small]
rate_limit = { per_minute = 60, burst = 6 }
[plans.small_per_key]
rate_limit = { per_minute = 60, burst = 6 }
scope = "key"
[plans.metered]
rate_limit = { per_second = 100000, burst = 100000 }
quota = { requests = 5, per = "day" }
[plans.monthly]
rate_limit = { per_second = 100000, burst = 100000 }
quota = { requests = 1, per = "month" }
[[routes]]
path = "/"
[[routes]]
path = "/expensive"
cost = 3
"#;

fn text(r: &Reply) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn header(r: &Reply, name: &str) -> Option<String> {
    r.headers.get(name).map(|v| v.to_str().unwrap().to_owned())
}

/// Sends `n` requests with `key` one after the other; counts the 200s and returns the
/// refusals.
async fn sequence(gw: &Gateway, key: &str, path: &str, n: usize) -> (usize, Vec<Reply>) {
    let mut ok = 0;
    let mut refused = Vec::new();
    for _ in 0..n {
        let r = gw.get_with_key(path, key).await;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => refused.push(r),
            s => panic!("unexpected {s}: {}", text(&r)),
        }
    }
    (ok, refused)
}

async fn key_with(gw: &Gateway, client: &str, extra: Value) -> (String, String) {
    let v = gw.key(client, extra).await;
    (
        v["key"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().to_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Scopes.

/// A request one limit refuses spends nothing of the limits checked before it: a key with its
/// own limit (1 request per 10 s, burst 4) under a client-wide plan of 2/s with a burst of 1.
/// Requests the client's bucket refuses once drained the key's own bucket as well, so when the
/// client's refilled the key's was empty: 429 for seconds where the key had 3 requests left.
#[tokio::test]
async fn a_request_one_limit_refuses_spends_nothing_of_the_others() {
    let gw = Gateway::start_with(
        "[plans.tight]\nrate_limit = { per_second = 2, burst = 1 }\n[[routes]]\npath = \"/\"\n",
    )
    .await;
    gw.client("layered", "tight").await;
    let (key, _) = key_with(
        &gw,
        "layered",
        json!({"rate_limit": {"per_minute": 6, "burst": 4}}),
    )
    .await;
    let start = std::time::Instant::now();
    assert_eq!(gw.get_with_key("/x", &key).await.status, 200);
    // The client's one cell is spent: refused by its bucket (for 500 ms).
    let mut refused = 0;
    while refused < 3 && start.elapsed() < std::time::Duration::from_millis(400) {
        let r = gw.get_with_key("/x", &key).await;
        assert_eq!(r.status, 429);
        refused += 1;
    }
    assert_eq!(refused, 3, "three refusals within the client's 500 ms");
    tokio::time::sleep(std::time::Duration::from_millis(1_100).saturating_sub(start.elapsed()))
        .await;
    // The client's bucket has a cell again, and the key's own still its three.
    for i in 0..3 {
        let r = gw.get_with_key("/x", &key).await;
        assert_eq!(r.status, 200, "request {i} after the client's refill");
        tokio::time::sleep(std::time::Duration::from_millis(550)).await;
    }
}

#[tokio::test]
async fn every_key_and_token_of_a_client_draws_from_one_bucket() {
    let gw = Gateway::start_with(PLANS).await;
    let (first, first_id) = gw.client("shared", "small").await;
    let (second, _) = key_with(&gw, "shared", json!({})).await;
    let (third, _) = key_with(&gw, "shared", json!({})).await;
    let login = gw
        .send(
            Request::post(format!("http://{}/auth/login", gw.proxy))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(
                    json!({"api_key": third}).to_string(),
                )))
                .unwrap(),
        )
        .await;
    assert_eq!(login.status, 200, "{}", text(&login));
    let token = login.json()["access_token"].as_str().unwrap().to_owned();
    // Burst 6 at 1/s for the client as a whole, whichever of its credentials is used.
    let mut ok = 0;
    for i in 0..24 {
        let cred = [&first, &second, &third, &token][i % 4];
        match gw.get_with_key("/", cred).await.status.as_u16() {
            200 => ok += 1,
            429 => {}
            s => panic!("unexpected {s}"),
        }
    }
    assert!(
        (6..=7).contains(&ok),
        "{ok} allowed for the client (burst 6)"
    );
    // A key deleted and created again gets no fresh allowance: the client's bucket is empty.
    let r = gw
        .admin("DELETE", &format!("/v1/api-keys/{first_id}"), None)
        .await;
    assert_eq!(r.status, 200);
    let (fresh, _) = key_with(&gw, "shared", json!({})).await;
    let r = gw.get_with_key("/", &fresh).await;
    assert_eq!(
        r.status, 429,
        "a new key of the client got a fresh allowance"
    );
    assert_eq!(r.code(), "rate_limited");
    // Another client of the same plan has its own bucket.
    let (other, _) = gw.client("other", "small").await;
    assert_eq!(gw.get_with_key("/", &other).await.status, 200);
}

#[tokio::test]
async fn a_per_key_plan_gives_each_key_its_own_bucket() {
    let gw = Gateway::start_with(PLANS).await;
    let (a, _) = gw.client("perkey", "small_per_key").await;
    let (b, _) = key_with(&gw, "perkey", json!({})).await;
    let (ok_a, _) = sequence(&gw, &a, "/", 12).await;
    let (ok_b, _) = sequence(&gw, &b, "/", 12).await;
    assert!((6..=7).contains(&ok_a), "{ok_a}");
    assert!(
        (6..=7).contains(&ok_b),
        "{ok_b}: the second key shared the first's bucket"
    );
}

#[tokio::test]
async fn a_keys_own_limit_is_a_tighter_limit_on_top_of_its_clients() {
    let gw = Gateway::start_with(PLANS).await;
    let (plain, _) = gw.client("layered", "small").await;
    // Looser than the plan: the client's bucket still holds it.
    let (loose, _) = key_with(
        &gw,
        "layered",
        json!({"rate_limit": {"per_second": 1000, "burst": 1000}}),
    )
    .await;
    let (ok, refused) = sequence(&gw, &loose, "/", 12).await;
    assert!(
        (6..=7).contains(&ok),
        "{ok}: a key's own limit escaped its client's"
    );
    assert_eq!(header(&refused[0], "ratelimit-limit").as_deref(), Some("6"));
    // The client's bucket is empty now for its other keys too.
    assert_eq!(gw.get_with_key("/", &plain).await.status, 429);

    // Tighter than the plan: the key's own limit refuses first and the headers show it.
    let (_, _) = gw.client("tight", "small").await;
    let (tight, _) = key_with(
        &gw,
        "tight",
        json!({"rate_limit": {"per_minute": 1, "burst": 2}}),
    )
    .await;
    let r = gw.get_with_key("/", &tight).await;
    assert_eq!(r.status, 200);
    assert_eq!(header(&r, "ratelimit-limit").as_deref(), Some("2"));
    assert_eq!(header(&r, "ratelimit-remaining").as_deref(), Some("1"));
    let (ok, _) = sequence(&gw, &tight, "/", 5).await;
    assert_eq!(ok, 1, "the key's own burst of 2");
}

// ---------------------------------------------------------------------------------------------
// Credits on SQLite, one process.

#[tokio::test]
async fn credits_are_charged_per_route_cost_and_refused_whole() {
    let gw = Gateway::start_with(PLANS).await;
    gw.client("payg", "bulk").await;
    let (key, id) = key_with(&gw, "payg", json!({"credits": {"remaining": 10}})).await;
    let v = gw.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(v.json()["credits"]["remaining"], 10);
    assert_eq!(v.json()["credits"]["refill"], Value::Null);

    let before = gw.upstream.count();
    let r = gw.get_with_key("/expensive", &key).await; // 3
    assert_eq!(r.status, 200);
    assert_eq!(
        header(&r, "keygate-credits-remaining").as_deref(),
        Some("7")
    );
    let r = gw.get_with_key("/", &key).await; // 1
    assert_eq!(
        header(&r, "keygate-credits-remaining").as_deref(),
        Some("6")
    );
    assert_eq!(
        header(&r, "keygate-quota-remaining"),
        None,
        "the plan has no quota"
    );
    gw.get_with_key("/expensive", &key).await; // 3 → 3 left
    gw.get_with_key("/expensive", &key).await; // 3 → 0 left
    let r = gw.get_with_key("/expensive", &key).await;
    assert_eq!(r.status, 429, "{}", text(&r));
    assert_eq!(r.code(), "quota_exhausted");
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(
        header(&r, "keygate-credits-remaining").as_deref(),
        Some("0")
    );
    assert_eq!(
        header(&r, "retry-after"),
        None,
        "no refill: no time to come back"
    );
    assert_eq!(
        gw.upstream.count() - before,
        4,
        "a refused request was forwarded"
    );

    // Two left, the route costs three: refused whole, nothing taken.
    let r = gw
        .admin(
            "POST",
            &format!("/v1/api-keys/{id}/credits"),
            Some(json!({"add": 2})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["remaining"], 2);
    let r = gw.get_with_key("/expensive", &key).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        header(&r, "keygate-credits-remaining").as_deref(),
        Some("2")
    );
    let r = gw.get_with_key("/", &key).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        header(&r, "keygate-credits-remaining").as_deref(),
        Some("1")
    );
    let usage = gw
        .admin("GET", &format!("/v1/api-keys/{id}/usage"), None)
        .await;
    assert_eq!(usage.json()["credits"]["remaining"], 1);

    // Credits taken away: the key is unlimited again, and keys without credits never carry
    // the header.
    let r = gw
        .admin(
            "PATCH",
            &format!("/v1/api-keys/{id}"),
            Some(json!({"credits": null})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json().get("credits").is_none());
    for _ in 0..5 {
        let r = gw.get_with_key("/expensive", &key).await;
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "keygate-credits-remaining"), None);
    }
}

#[tokio::test]
async fn a_refill_sets_a_retry_after_until_the_next_utc_midnight() {
    let gw = Gateway::start_with(PLANS).await;
    gw.client("daily", "bulk").await;
    let (key, id) = key_with(
        &gw,
        "daily",
        json!({"credits": {"remaining": 1, "refill": {"amount": 50, "interval": "daily"}}}),
    )
    .await;
    assert_eq!(gw.get_with_key("/", &key).await.status, 200);
    let r = gw.get_with_key("/", &key).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.code(), "quota_exhausted");
    let now = chrono::Utc::now();
    let midnight = (now.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let want = (midnight - now).num_seconds();
    let got: i64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!(
        (got - want).abs() <= 2,
        "retry-after {got}, midnight in {want}"
    );
    let v = gw.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(
        v.json()["credits"]["next_refill_at"].as_str().unwrap(),
        midnight.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
    );
    // A monthly refill on day 1: the next one is the first of next month.
    let (_, monthly) = key_with(
        &gw,
        "daily",
        json!({"credits": {"remaining": 0, "refill": {"amount": 5, "interval": "monthly", "day": 1}}}),
    )
    .await;
    let v = gw
        .admin("GET", &format!("/v1/api-keys/{monthly}"), None)
        .await;
    let next = v.json()["credits"]["next_refill_at"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(next.ends_with("-01T00:00:00.000Z"), "{next}");

    // A refill that would not cover the route's cost brings nothing: no Retry-After.
    let (short, _) = key_with(
        &gw,
        "daily",
        json!({"credits": {"remaining": 0, "refill": {"amount": 2, "interval": "daily"}}}),
    )
    .await;
    let r = gw.get_with_key("/expensive", &short).await;
    assert_eq!(r.status, 429);
    assert_eq!(header(&r, "retry-after"), None);

    // Credits and a monthly quota both used up: the credits come back at midnight, the
    // request passes only once the month is over too.
    gw.client("both", "monthly").await;
    let (both, _) = key_with(
        &gw,
        "both",
        json!({"credits": {"remaining": 1, "refill": {"amount": 50, "interval": "daily"}}}),
    )
    .await;
    assert_eq!(gw.get_with_key("/", &both).await.status, 200);
    let r = gw.get_with_key("/", &both).await;
    assert_eq!(r.status, 429);
    let now = chrono::Utc::now();
    let first = chrono::Datelike::with_day(&now.date_naive(), 1).unwrap() + chrono::Months::new(1);
    let want = (first.and_hms_opt(0, 0, 0).unwrap().and_utc() - now).num_seconds();
    let got: i64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!(
        (got - want).abs() <= 2,
        "retry-after {got}, the next month in {want}"
    );
}

/// Concurrent requests with `key` against `targets` (round robin), `in_flight` at a time;
/// returns (200s, 429 quota_exhausted, anything else).
async fn storm(
    targets: &[std::net::SocketAddr],
    key: &str,
    total: usize,
    in_flight: usize,
) -> (usize, usize, usize) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(in_flight)
        .build_http::<Full<Bytes>>();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (client, next, targets, key) = (
            client.clone(),
            Arc::clone(&next),
            targets.to_vec(),
            key.to_owned(),
        );
        tasks.spawn(async move {
            let mut counts = (0, 0, 0);
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return counts;
                }
                let req = Request::get(format!("http://{}/storm", targets[i % targets.len()]))
                    .header("x-api-key", &key)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let res = client.request(req).await.expect("request sent");
                let status = res.status().as_u16();
                let body = res.into_body().collect().await.unwrap().to_bytes();
                match status {
                    200 => counts.0 += 1,
                    429 if body.windows(15).any(|w| w == b"quota_exhausted") => counts.1 += 1,
                    _ => counts.2 += 1,
                }
            }
        });
    }
    let mut sum = (0, 0, 0);
    while let Some(c) = tasks.join_next().await {
        let c = c.unwrap();
        sum = (sum.0 + c.0, sum.1 + c.1, sum.2 + c.2);
    }
    sum
}

#[tokio::test]
async fn sqlite_credits_are_exact_under_concurrency_and_survive_a_restart() {
    let gw = Gateway::start_with(PLANS).await;
    gw.client("burst", "bulk").await;
    let (key, id) = key_with(&gw, "burst", json!({"credits": {"remaining": 300}})).await;
    let before = gw.upstream.count();
    let (ok, exhausted, other) = storm(&[gw.proxy], &key, 1500, 64).await;
    assert_eq!((ok, exhausted, other), (300, 1200, 0));
    assert_eq!(gw.upstream.count() - before, 300);
    // The count is in the store: a restarted gateway still refuses.
    let (upstream, dir) = gw.stop().await;
    let text = config_text(&upstream.url(), &dir.path().join("keygate.db"), PLANS);
    let gw = Gateway::start_from(upstream, dir, &text).await;
    assert_eq!(gw.get_with_key("/", &key).await.code(), "quota_exhausted");
    let v = gw.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(v.json()["credits"]["remaining"], 0);
}

/// The real binary killed with SIGKILL mid-run loses no charge on SQLite: what was answered
/// 200 is what was taken.
#[tokio::test]
async fn sqlite_charges_survive_kill_9() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_text(&upstream.url(), &dir.path().join("keygate.db"), PLANS);
    let mut gw = Binary::serve(&config, dir.path()).spawn();
    let admin = |gw: &Binary, m: &'static str, path: &str, body: Option<Value>| {
        call(
            gw.admin,
            m,
            path.to_owned(),
            body,
            &[("x-admin-key", ADMIN_KEY)],
        )
    };
    let (s, _) = admin(
        &gw,
        "POST",
        "/v1/clients",
        Some(json!({"client_id": "k9", "license": "metered"})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, v) = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(json!({"client_id": "k9", "name": "k", "credits": {"remaining": 100}})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let key = v["key"].as_str().unwrap().to_owned();
    let id = v["id"].as_str().unwrap().to_owned();
    let (ok, _, other) = storm(&[gw.proxy], &key, 4, 1).await;
    assert_eq!((ok, other), (4, 0));
    gw.kill9();
    let gw = Binary::serve(&config, dir.path()).spawn();
    let (_, v) = admin(&gw, "GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(v["credits"]["remaining"], 96);
    let (_, u) = admin(&gw, "GET", "/v1/clients/k9/usage", None).await;
    assert_eq!(u["quota"]["used"], 4, "{u}");
}

/// Asks each admin listener in `admins` for key `id` until it answers from the store again (15 s
/// at most in all), and checks the credits the key then has.
async fn credits_once_back(admins: &[std::net::SocketAddr], id: &str, remaining: i64) {
    let admin = [("x-admin-key", ADMIN_KEY)];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    for &a in admins {
        loop {
            let (s, v) = call(a, "GET", format!("/v1/api-keys/{id}"), None, &admin).await;
            if s == 200 {
                assert_eq!(v["credits"]["remaining"], remaining, "{v}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "store never came back: {s}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: String,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = body.map(|v| v.to_string()).unwrap_or_default();
    let res = client
        .request(b.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

// ---------------------------------------------------------------------------------------------
// Quotas.

#[tokio::test]
async fn a_quota_counts_the_client_per_utc_day_across_its_keys_and_restarts() {
    let gw = Gateway::start_with(PLANS).await;
    let (a, _) = gw.client("quoted", "metered").await;
    let (b, _) = key_with(&gw, "quoted", json!({})).await;
    let before = gw.upstream.count();
    let mut left = Vec::new();
    for cred in [&a, &b, &a, &b, &a] {
        let r = gw.get_with_key("/", cred).await;
        assert_eq!(r.status, 200);
        left.push(header(&r, "keygate-quota-remaining").unwrap());
    }
    assert_eq!(left, ["4", "3", "2", "1", "0"]);
    let r = gw.get_with_key("/", &b).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.code(), "quota_exhausted");
    assert_eq!(header(&r, "keygate-quota-remaining").as_deref(), Some("0"));
    let now = chrono::Utc::now();
    let midnight = (now.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let got: i64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!((got - (midnight - now).num_seconds()).abs() <= 2, "{got}");
    assert_eq!(gw.upstream.count() - before, 5);

    let u = gw.admin("GET", "/v1/clients/quoted/usage", None).await;
    assert_eq!(u.status, 200, "{}", text(&u));
    let u = u.json();
    assert_eq!(u["quota"]["requests"], 5);
    assert_eq!(u["quota"]["per"], "day");
    assert_eq!(u["quota"]["used"], 5);
    assert_eq!(u["quota"]["remaining"], 0);
    assert_eq!(
        u["quota"]["resets_at"].as_str().unwrap(),
        midnight.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
    );
    // Another client of the plan has its own quota; a client without a quota shows none.
    let (other, _) = gw.client("quoted2", "metered").await;
    assert_eq!(gw.get_with_key("/", &other).await.status, 200);
    gw.client("free_of_quota", "bulk").await;
    let u = gw
        .admin("GET", "/v1/clients/free_of_quota/usage", None)
        .await;
    assert_eq!(u.json()["quota"], Value::Null);
    assert_eq!(
        gw.admin("GET", "/v1/clients/nobody/usage", None)
            .await
            .status,
        404
    );

    let (upstream, dir) = gw.stop().await;
    let text = config_text(&upstream.url(), &dir.path().join("keygate.db"), PLANS);
    let gw = Gateway::start_from(upstream, dir, &text).await;
    assert_eq!(gw.get_with_key("/", &a).await.code(), "quota_exhausted");
}

// ---------------------------------------------------------------------------------------------
// The admin calls, hostile.

/// A connection to `gw`'s SQLite file, the store made to refuse every credits row (as a full
/// disk would) until the trigger `no_credits` is dropped.
fn refusing_credits(gw: &Gateway) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(gw.dir.path().join("keygate.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    db.execute_batch(
        "CREATE TRIGGER no_credits BEFORE INSERT ON key_credits \
         BEGIN SELECT RAISE(ABORT, 'refused'); END;",
    )
    .unwrap();
    db
}

/// A PATCH that names other attributes and credits writes the attributes, then the credits:
/// when the store fails between the two, the answer says part of the change may stand (503
/// `store_unavailable`, read it back), never that nothing was changed, and reading back shows
/// what stands.
#[tokio::test]
async fn a_patch_whose_credits_fail_after_its_other_fields_says_part_may_stand() {
    let gw = Gateway::start_with(PLANS).await;
    gw.client("partway", "bulk").await;
    let (_, id) = key_with(&gw, "partway", json!({})).await;
    let db = refusing_credits(&gw);
    let path = format!("/v1/api-keys/{id}");
    let patch = || {
        gw.admin(
            "PATCH",
            &path,
            Some(json!({"name": "renamed", "credits": {"remaining": 100}})),
        )
    };
    let r = patch().await;
    assert_eq!(r.status, 503, "{}", text(&r));
    assert_eq!(r.code(), "store_unavailable");
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("partway"), "{detail}");
    let v = gw.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(v.json()["name"], "renamed");
    assert_eq!(v.json()["credits"], Value::Null);
    // The same PATCH again, once the store takes it, finishes the change.
    db.execute_batch("DROP TRIGGER no_credits").unwrap();
    let r = patch().await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["credits"]["remaining"], 100);
}

/// A PATCH without credits that the store writes, but whose answer's credits it cannot read
/// back, says part of the change may stand (it said "nothing was changed").
#[tokio::test]
async fn a_patch_whose_answer_cannot_be_read_back_says_part_may_stand() {
    let gw = Gateway::start_with(PLANS).await;
    gw.client("readback", "bulk").await;
    let (_, id) = key_with(&gw, "readback", json!({})).await;
    let db = rusqlite::Connection::open(gw.dir.path().join("keygate.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    // The key can be read, its credits' balance not (as a damaged table would be).
    db.execute_batch(
        "ALTER TABLE key_credits RENAME TO key_credits_away; \
         CREATE VIEW key_credits AS SELECT key_id, refill_amount, refill_interval, refill_day \
         FROM key_credits_away;",
    )
    .unwrap();
    let path = format!("/v1/api-keys/{id}");
    let r = gw
        .admin("PATCH", &path, Some(json!({"name": "renamed"})))
        .await;
    assert_eq!(r.status, 503, "{}", text(&r));
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("partway"), "{detail}");
    db.execute_batch("DROP VIEW key_credits; ALTER TABLE key_credits_away RENAME TO key_credits")
        .unwrap();
    let v = gw.admin("GET", &path, None).await;
    assert_eq!(v.json()["name"], "renamed");
}

/// A key created with credits the store will not write is deleted again and the create fails
/// (503, nothing stands); when that deletion fails too, the answer says part of the change may
/// stand, and the key that stands is listed, its secret never shown.
#[tokio::test]
async fn a_create_whose_credits_and_undo_both_fail_says_part_may_stand() {
    let gw = Gateway::start_with(PLANS).await;
    gw.client("undo", "bulk").await;
    let db = refusing_credits(&gw);
    let create = || {
        gw.admin(
            "POST",
            "/v1/api-keys",
            Some(json!({"client_id": "undo", "name": "metered", "credits": {"remaining": 5}})),
        )
    };
    let metered = || async {
        let listed = gw
            .admin("GET", "/v1/api-keys?client_id=undo", None)
            .await
            .json();
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["name"] == "metered")
            .count()
    };
    let r = create().await;
    assert_eq!(r.status, 503, "{}", text(&r));
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("nothing was changed"), "{detail}");
    assert_eq!(metered().await, 0);
    db.execute_batch(
        "CREATE TRIGGER no_delete BEFORE DELETE ON api_keys \
         BEGIN SELECT RAISE(ABORT, 'refused'); END;",
    )
    .unwrap();
    let r = create().await;
    assert_eq!(r.status, 503, "{}", text(&r));
    assert!(r.json().get("key").is_none());
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("partway"), "{detail}");
    assert_eq!(metered().await, 1);
}

#[tokio::test]
async fn credit_changes_refuse_bad_input_and_change_nothing() {
    let gw = Gateway::start_with(PLANS).await;
    gw.client("hostile", "bulk").await;
    let (_, id) = key_with(&gw, "hostile", json!({"credits": {"remaining": 5}})).await;
    let path = format!("/v1/api-keys/{id}/credits");
    let remaining = || async {
        gw.admin("GET", &format!("/v1/api-keys/{id}"), None)
            .await
            .json()["credits"]["remaining"]
            .clone()
    };
    for (body, status) in [
        (r#"{"add": -1}"#, 400),
        (r#"{"set": -5}"#, 400),
        (r#"{"add": 1.5}"#, 400),
        (r#"{"add": "3"}"#, 400),
        (r#"{"add": 18446744073709551616}"#, 400),
        // 1e3 is the integer 1000 (JSON Schema: a zero fraction is an integer); 2.5e0 is not.
        (r#"{"add": 2.5e0}"#, 400),
        (r#"{"set": 1000000000000001}"#, 422),
        (r#"{"add": 1, "set": 2}"#, 422),
        (r#"{}"#, 422),
        (r#"{"add": 1, "extra": true}"#, 400),
        (r#"{"add": 1"#, 400),
        (r#"[1]"#, 400),
    ] {
        let r = gw
            .send(
                Request::post(format!("http://{}{path}", gw.admin))
                    .header("x-admin-key", ADMIN_KEY)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
            .await;
        assert!(
            r.status == status || (status == 400 && r.status == 422),
            "{body}: {} {}",
            r.status,
            text(&r)
        );
        assert_eq!(
            header(&r, "content-type").as_deref(),
            Some("application/problem+json")
        );
        assert_eq!(remaining().await, 5, "{body} changed the credits");
    }
    // Overflow of the sum: refused, nothing changed.
    let r = gw
        .admin(
            "POST",
            &path,
            Some(json!({"set": 1_000_000_000_000_000_u64})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = gw.admin("POST", &path, Some(json!({"add": 1}))).await;
    assert_eq!(r.status, 422, "{}", text(&r));
    assert_eq!(remaining().await, 1_000_000_000_000_000_u64);
    // Malformed and oversized bodies.
    let r = gw
        .admin_as(
            "POST",
            &path,
            None,
            &[
                ("x-admin-key", ADMIN_KEY),
                ("content-type", "application/json"),
            ],
        )
        .await;
    assert!(r.status.is_client_error(), "{}", r.status);
    let big = json!({"add": 1, "pad": "x".repeat(2 << 20)});
    assert!(
        gw.admin("POST", &path, Some(big))
            .await
            .status
            .is_client_error()
    );
    // Unknown keys, no credential, a wrong one.
    let ghost = uuid::Uuid::now_v7();
    for p in [
        format!("/v1/api-keys/{ghost}/credits"),
        "/v1/api-keys/not-a-uuid/credits".to_owned(),
    ] {
        let r = gw.admin("POST", &p, Some(json!({"add": 1}))).await;
        assert_eq!(r.status, 404, "{p}");
    }
    let r = gw
        .admin_as("POST", &path, Some(json!({"add": 1})), &[])
        .await;
    assert_eq!(r.status, 401);
    let r = gw
        .admin_as(
            "POST",
            &path,
            Some(json!({"add": 1})),
            &[("x-admin-key", "wrong-admin-key-0123456789abcdef")],
        )
        .await;
    assert_eq!(r.status, 401);
    // Bad terms on create and PATCH.
    for credits in [
        json!({"remaining": -1}),
        json!({"remaining": 1_000_000_000_000_001_u64}),
        json!({"remaining": 1, "refill": {"amount": 1, "interval": "weekly"}}),
        json!({"remaining": 1, "refill": {"amount": 1, "interval": "monthly", "day": 29}}),
        json!({"remaining": 1, "refill": {"amount": 1, "interval": "daily", "day": 3}}),
    ] {
        let r = gw
            .admin(
                "POST",
                "/v1/api-keys",
                Some(json!({"client_id": "hostile", "name": "x", "credits": credits})),
            )
            .await;
        assert!(r.status.is_client_error(), "{credits}: {}", r.status);
        let r = gw
            .admin(
                "PATCH",
                &format!("/v1/api-keys/{id}"),
                Some(json!({"credits": credits})),
            )
            .await;
        assert!(r.status.is_client_error(), "{credits}: {}", r.status);
    }
    assert_eq!(remaining().await, 1_000_000_000_000_000_u64);
    let listed = gw
        .admin("GET", "/v1/api-keys?client_id=hostile", None)
        .await;
    assert_eq!(
        listed.json()["total"],
        2,
        "a refused create left a key behind"
    );
}

#[tokio::test]
async fn a_client_reads_its_own_credits_and_quota_but_never_raises_them() {
    let gw = Gateway::start_with(PLANS).await;
    let r = gw
        .admin(
            "POST",
            "/v1/clients",
            Some(
                json!({"client_id": "self", "license": "metered", "permissions": ["keys:manage"]}),
            ),
        )
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let own = r.json()["api_key"]["key"].as_str().unwrap().to_owned();
    gw.client("neighbour", "metered").await;
    let (_, id) = key_with(&gw, "self", json!({"credits": {"remaining": 7}})).await;
    let as_client = [("x-api-key", own.as_str())];

    let r = gw
        .admin_as("GET", &format!("/v1/api-keys/{id}"), None, &as_client)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["credits"]["remaining"], 7);
    let r = gw
        .admin_as("GET", "/v1/clients/self/usage", None, &as_client)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["quota"]["requests"], 5);
    assert_eq!(r.json()["credits"][0]["credits"]["remaining"], 7);
    let r = gw
        .admin_as("GET", "/v1/clients/neighbour/usage", None, &as_client)
        .await;
    assert_eq!(r.status, 404, "another client's usage");
    // No credential, a wrong one, a guessed key, ids that are no client's.
    assert_eq!(
        gw.admin_as("GET", "/v1/clients/self/usage", None, &[])
            .await
            .status,
        401
    );
    let fake = keygate::keys::KeyFormat::new("kg_").generate().plaintext.0;
    for creds in [
        [("x-admin-key", "wrong-admin-key-0123456789abcdef")],
        [("x-api-key", fake.as_str())],
    ] {
        let r = gw
            .admin_as("GET", "/v1/clients/self/usage", None, &creds)
            .await;
        assert_eq!(r.status, 401, "{}", text(&r));
    }
    for id in ["x".repeat(65), "a%2F..%2Fb".to_owned(), "%00".to_owned()] {
        let r = gw
            .admin("GET", &format!("/v1/clients/{id}/usage"), None)
            .await;
        assert!(r.status.is_client_error(), "{id}: {}", r.status);
        assert!(!text(&r).contains(&own), "a key in an error body");
    }

    for (m, path, body) in [
        (
            "POST",
            format!("/v1/api-keys/{id}/credits"),
            json!({"add": 100}),
        ),
        (
            "POST",
            format!("/v1/api-keys/{id}/credits"),
            json!({"set": 100}),
        ),
        (
            "PATCH",
            format!("/v1/api-keys/{id}"),
            json!({"credits": {"remaining": 100}}),
        ),
        (
            "PATCH",
            format!("/v1/api-keys/{id}"),
            json!({"credits": null}),
        ),
        (
            "POST",
            "/v1/api-keys".to_owned(),
            json!({"name": "more", "credits": {"remaining": 100}}),
        ),
    ] {
        let r = gw.admin_as(m, &path, Some(body.clone()), &as_client).await;
        assert_eq!(r.status, 403, "{m} {path} {body}: {}", text(&r));
    }
    let v = gw.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(v.json()["credits"]["remaining"], 7);
    let keys = gw.admin("GET", "/v1/api-keys?client_id=self", None).await;
    assert_eq!(keys.json()["total"], 2);
}

#[tokio::test]
async fn refusals_are_counted_per_limit_kind() {
    let gw = Gateway::start_with(PLANS).await;
    gw.client("counted", "small").await;
    let (key, _) = key_with(&gw, "counted", json!({"credits": {"remaining": 2}})).await;
    let (ok, refused) = sequence(&gw, &key, "/", 4).await;
    assert_eq!(ok, 2);
    assert!(refused.iter().all(|r| r.code() == "quota_exhausted"));
    let (plain, _) = gw.client("counted2", "small").await;
    let (_, refused) = sequence(&gw, &plain, "/", 10).await;
    let limited = refused.len();
    assert!(limited >= 3);
    let m = gw.admin("GET", "/metrics", None).await;
    let m = text(&m);
    assert!(
        m.contains("keygate_limit_refusals_total{kind=\"quota_exhausted\"} 2"),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "keygate_limit_refusals_total{{kind=\"rate_limited\"}} {limited}"
        )),
        "{m}"
    );
}

// ---------------------------------------------------------------------------------------------
// Three gateway processes on one redis-server.

#[tokio::test]
async fn credits_and_quotas_are_exact_across_three_gateway_processes_on_redis() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let store = format!("url = \"{}\"", redis.tcp_url(0));
    let config = store_config_text(&upstream.url(), &store, PLANS);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let gws: Vec<Binary> = dirs
        .iter()
        .map(|d| Binary::serve(&config, d.path()).spawn())
        .collect();
    let admin = [("x-admin-key", ADMIN_KEY)];
    let (s, _) = call(
        gws[0].admin,
        "POST",
        "/v1/clients".into(),
        Some(json!({"client_id": "fleet", "license": "bulk"})),
        &admin,
    )
    .await;
    assert_eq!(s, 201);
    let (s, v) = call(
        gws[1].admin,
        "POST",
        "/v1/api-keys".into(),
        Some(json!({"client_id": "fleet", "name": "k", "credits": {"remaining": 1000}})),
        &admin,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let key = v["key"].as_str().unwrap().to_owned();
    let id = v["id"].as_str().unwrap().to_owned();
    let proxies: Vec<_> = gws.iter().map(|g| g.proxy).collect();
    let before = upstream.count();
    let (ok, exhausted, other) = storm(&proxies, &key, 10_000, 150).await;
    assert_eq!((ok, exhausted, other), (1000, 9000, 0));
    assert_eq!(upstream.count() - before, 1000, "forwarded ≠ accepted");
    let (_, v) = call(
        gws[2].admin,
        "GET",
        format!("/v1/api-keys/{id}"),
        None,
        &admin,
    )
    .await;
    assert_eq!(v["credits"]["remaining"], 0);

    // An admin top-up on one instance is spent through the others.
    let (s, _) = call(
        gws[0].admin,
        "POST",
        format!("/v1/api-keys/{id}/credits"),
        Some(json!({"add": 30})),
        &admin,
    )
    .await;
    assert_eq!(s, 200);
    let (ok, _, other) = storm(&proxies[1..], &key, 300, 30).await;
    assert_eq!((ok, other), (30, 0));

    // Redis crashes (SIGKILL) and comes back from its AOF: the count is where it was.

    redis.kill();
    redis.restart();
    credits_once_back(&[gws[0].admin], &id, 0).await;
    let (s, _) = call(
        gws[0].admin,
        "POST",
        format!("/v1/api-keys/{id}/credits"),
        Some(json!({"set": 7})),
        &admin,
    )
    .await;
    assert_eq!(s, 200);
    redis.kill();
    redis.restart();
    // Every instance's store connection back before the quota storm: an instance's first call
    // on its broken connection fails (its connection is re-made in the background), and
    // for a second after that it answers keys it does not know with 503.
    let admins: Vec<_> = gws.iter().map(|g| g.admin).collect();
    credits_once_back(&admins, &id, 7).await;
    // The back-off of an instance whose first call failed ends within a second.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;

    // A quota of 5 a day for a client, spread over the three.
    let (s, v) = call(
        gws[0].admin,
        "POST",
        "/v1/clients".into(),
        Some(json!({"client_id": "fleetq", "license": "metered"})),
        &admin,
    )
    .await;
    assert_eq!(s, 201);
    let qkey = v["api_key"]["key"].as_str().unwrap().to_owned();
    let (ok, exhausted, other) = storm(&proxies, &qkey, 300, 30).await;
    assert_eq!((ok, exhausted, other), (5, 295, 0));
    let (_, u) = call(
        gws[2].admin,
        "GET",
        "/v1/clients/fleetq/usage".into(),
        None,
        &admin,
    )
    .await;
    assert_eq!(u["quota"]["used"], 5, "{u}");
}

// ---------------------------------------------------------------------------------------------
// Cluster rate limits: three gateway processes, one redis-server.

const CLUSTER: &str = r#"
[plans.shared]
rate_limit = { per_minute = 100, burst = 100 }
"#;

/// Sends requests with `key` for `run`, to `targets[i]` at `rates[i]` requests a second each;
/// returns the times (since the start) of the accepted ones, per target.
async fn paced(
    targets: &[std::net::SocketAddr],
    rates: &[u32],
    key: &str,
    run: std::time::Duration,
) -> Vec<Vec<std::time::Duration>> {
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (&target, &rate)) in targets.iter().zip(rates).enumerate() {
        let key = key.to_owned();
        tasks.spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<Full<Bytes>>();
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1) / rate.max(1));
            let mut accepted = Vec::new();
            while start.elapsed() < run {
                tick.tick().await;
                let req = Request::get(format!("http://{target}/paced"))
                    .header("x-api-key", &key)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let res = client.request(req).await.expect("request sent");
                let status = res.status().as_u16();
                let _ = res.into_body().collect().await;
                match status {
                    200 => accepted.push(start.elapsed()),
                    429 => {}
                    s => panic!("unexpected {s}"),
                }
            }
            (i, accepted)
        });
    }
    let mut out = vec![Vec::new(); targets.len()];
    while let Some(r) = tasks.join_next().await {
        let (i, a) = r.unwrap();
        out[i] = a;
    }
    out
}

/// The most requests accepted in any window of `window` (a window starts at an accepted
/// request).
fn busiest(accepted: &[std::time::Duration], window: std::time::Duration) -> usize {
    let mut all = accepted.to_vec();
    all.sort();
    (0..all.len())
        .map(|i| {
            all[i..]
                .iter()
                .take_while(|&&t| t < all[i] + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

async fn metric(admin: std::net::SocketAddr, name: &str) -> Option<f64> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let res = client
        .request(
            Request::get(format!("http://{admin}/metrics"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .ok()?;
    let body = res.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8_lossy(&body).lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}

/// `n` keygate processes in cluster mode on one real redis-server, in front of one upstream.
/// Bind every field by name (`_upstream`, not `..` or `_`): a field left out is dropped at
/// once, and Redis, the upstream or a data directory with it.
struct Fleet {
    redis: RedisServer,
    gws: Vec<Binary>,
    _upstream: Upstream,
    _dirs: Vec<tempfile::TempDir>,
}

/// The config of a cluster-mode gateway on `redis` in front of `upstream`: `store` goes into
/// `[store]` after the URL, `more` (plans, say) after it.
fn cluster_config(redis: &RedisServer, upstream: &Upstream, store: &str, more: &str) -> String {
    store_config_text(
        &upstream.url(),
        &format!("url = \"{}\"\n{store}", redis.tcp_url(0)),
        &format!("{more}\n[rate_limit]\nmode = \"cluster\"\n"),
    )
}

async fn fleet(n: usize) -> Fleet {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let config = cluster_config(&redis, &upstream, "", CLUSTER);
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let gws = dirs
        .iter()
        .map(|d| Binary::serve(&config, d.path()).spawn())
        .collect();
    Fleet {
        redis,
        gws,
        _upstream: upstream,
        _dirs: dirs,
    }
}

/// An instance that has had no request of a cluster-limited client still counts itself in the
/// fleet (and sees the others), so that each divides the limit by all of them should Redis go:
/// the traffic may move to it.
#[tokio::test]
async fn an_instance_without_traffic_is_counted_in_the_fleet() {
    let Fleet {
        redis: _redis,
        gws,
        _upstream,
        _dirs,
    } = fleet(2).await;
    let (s, v) = call(
        gws[0].admin,
        "POST",
        "/v1/clients".into(),
        Some(json!({"client_id": "busy", "license": "shared"})),
        &[("x-admin-key", ADMIN_KEY)],
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let key = v["api_key"]["key"].as_str().unwrap().to_owned();
    // Traffic on the first instance only; the second has no bucket at all.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // (The plan's burst is 100: the last of these may be refused.)
        let r = call(
            gws[0].proxy,
            "GET",
            "/x".into(),
            None,
            &[("x-api-key", key.as_str())],
        )
        .await;
        assert!(matches!(r.0, 200 | 429), "{}", r.0);
        let live = [
            metric(gws[0].admin, "keygate_cluster_instances").await,
            metric(gws[1].admin, "keygate_cluster_instances").await,
        ];
        if live == [Some(2.0), Some(2.0)] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fleet seen as {live:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A lease in hand is not lost with its bucket: alone on an instance a client holds its whole
/// room, and when its bucket went (a key's `PATCH` makes the cache entry anew; the old one, and
/// the bucket with it, is let go at the next usage flush) or the instance stopped, those cells
/// stayed reserved in Redis until their time passed (100/min: 0.6 s a cell), so the client got
/// a few requests where it had 99 left.
/// One keygate process in cluster mode on its own redis-server: `store` and `more` go into
/// the config file's `[store]` and after it. Bind every field by name, as for [`Fleet`].
struct Alone {
    _redis: RedisServer,
    _upstream: Upstream,
    config: String,
    dir: tempfile::TempDir,
    gw: Binary,
}

async fn alone(store: &str, more: &str) -> Alone {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let config = cluster_config(&redis, &upstream, store, more);
    let dir = tempfile::tempdir().unwrap();
    let gw = Binary::serve(&config, dir.path()).spawn();
    Alone {
        _redis: redis,
        _upstream: upstream,
        config,
        dir,
        gw,
    }
}

/// One `GET /x` with `key` through `proxy`: admitted (200) or refused by a limit (429).
async fn admitted(proxy: std::net::SocketAddr, key: &str) -> bool {
    let (s, _) = call(proxy, "GET", "/x".into(), None, &[("x-api-key", key)]).await;
    assert!(matches!(s, 200 | 429), "{s}");
    s == 200
}

/// A client made with the admin key: its first key and that key's id.
async fn client_on(gw: &Binary, client_id: &str, license: &str) -> (String, String) {
    let (s, v) = call(
        gw.admin,
        "POST",
        "/v1/clients".into(),
        Some(json!({"client_id": client_id, "license": license})),
        &[("x-admin-key", ADMIN_KEY)],
    )
    .await;
    assert_eq!(s, 201, "{v}");
    (
        v["api_key"]["key"].as_str().unwrap().to_owned(),
        v["api_key"]["id"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn a_lease_in_hand_survives_its_bucket_and_a_restart() {
    let Alone {
        _redis,
        _upstream,
        config,
        dir,
        mut gw,
    } = alone("last_used_flush_secs = 1", CLUSTER).await;
    let admin = [("x-admin-key", ADMIN_KEY)];
    let (key, id) = client_on(&gw, "held", "shared").await;
    let accepted = |proxy: std::net::SocketAddr, n: usize| {
        let key = key.clone();
        async move {
            let mut ok = 0;
            for _ in 0..n {
                ok += usize::from(admitted(proxy, &key).await);
            }
            ok
        }
    };
    assert_eq!(accepted(gw.proxy, 1).await, 1);
    let (s, v) = call(
        gw.admin,
        "PATCH",
        format!("/v1/api-keys/{id}"),
        Some(json!({"metadata": {"changed": true}})),
        &admin,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // Past the usage flush that lets the old entry go (and under the 2 s after which an idle
    // bucket gives its lease back by itself).
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let ok = accepted(gw.proxy, 30).await;
    assert!(ok >= 29, "{ok} of 30 accepted after the key's change");
    // A graceful stop gives back what the instance held; another instance finds it.
    assert!(gw.terminate().success());
    let gw = Binary::serve(&config, dir.path()).spawn();
    let ok = accepted(gw.proxy, 30).await;
    assert!(ok >= 29, "{ok} of 30 accepted after the restart");
}

/// A fast plan with a small burst gets its rate: 100/s with a burst of 1, asked for 2 s by
/// requests back to back, accepts close to 200 (171 seen; once 41: a refusal waited for the next
/// 50 ms sync instead of the next cell, 10 ms on), and never more than the rate allows.
#[tokio::test]
async fn a_fast_plan_with_a_small_burst_gets_its_rate_in_cluster_mode() {
    let Alone {
        _redis,
        _upstream,
        config: _,
        dir: _dir,
        gw,
    } = alone(
        "",
        "[plans.fast]\nrate_limit = { per_second = 100, burst = 1 }\n",
    )
    .await;
    let (key, _) = client_on(&gw, "fast", "fast").await;
    let start = std::time::Instant::now();
    let (mut sent, mut ok) = (0u32, 0u32);
    while start.elapsed() < std::time::Duration::from_secs(2) {
        sent += 1;
        ok += u32::from(admitted(gw.proxy, &key).await);
    }
    let took = start.elapsed().as_secs_f64();
    eprintln!("fast plan: {ok} of {sent} in {took:.2} s");
    // Asked at least twice as often as the rate, or the figure says nothing.
    assert!(
        f64::from(sent) >= 400.0 * took / 2.0,
        "only {sent} requests in {took:.2} s"
    );
    let most = (100.0 * took).ceil() as u32 + 1;
    assert!(ok <= most, "{ok} accepted in {took:.2} s: over 100/s");
    assert!(
        ok >= most * 3 / 5,
        "{ok} accepted in {took:.2} s of {sent} requests: under 100/s"
    );
}

/// 100/min with a burst of 100, over three instances for a minute and more, load spread evenly
/// for one client and 90/10 for another: over any window of a minute the fleet accepts at most
/// the burst and a minute's rate (+5 %), and the skewed client is not starved. Then Redis is
/// killed: each instance falls back to a third of the limit, says so, and recovers.
#[tokio::test]
async fn cluster_limits_hold_across_three_processes_and_survive_a_redis_crash() {
    let Fleet {
        mut redis,
        gws,
        _upstream,
        _dirs,
    } = fleet(3).await;
    let admin = [("x-admin-key", ADMIN_KEY)];
    let mut keys = Vec::new();
    for client in ["even", "skewed", "crash"] {
        let (s, v) = call(
            gws[0].admin,
            "POST",
            "/v1/clients".into(),
            Some(json!({"client_id": client, "license": "shared"})),
            &admin,
        )
        .await;
        assert_eq!(s, 201, "{v}");
        keys.push(v["api_key"]["key"].as_str().unwrap().to_owned());
    }
    let proxies: Vec<_> = gws.iter().map(|g| g.proxy).collect();
    let run = std::time::Duration::from_secs(65);
    let minute = std::time::Duration::from_secs(60);
    let (even, skewed) = tokio::join!(
        paced(&proxies, &[10, 10, 10], &keys[0], run),
        paced(&proxies[..2], &[27, 3], &keys[1], run),
    );
    // GCRA at 100/min with a burst of 100: at most 100 + 100 in any minute, + 5 %.
    let bound = (200.0_f64 * 1.05).floor() as usize;
    for (name, per_instance) in [("even", &even), ("skewed", &skewed)] {
        let all: Vec<_> = per_instance.iter().flatten().copied().collect();
        let peak = busiest(&all, minute);
        let counts: Vec<usize> = per_instance.iter().map(Vec::len).collect();
        eprintln!(
            "{name}: {} accepted in {run:?} ({counts:?} per instance), busiest minute {peak}",
            all.len()
        );
        assert!(
            peak <= bound,
            "{name}: {peak} accepted in a minute (bound {bound})"
        );
        // Not starved: the burst and most of the refill over the run.
        assert!(
            all.len() >= 170,
            "{name}: only {} accepted in {run:?}",
            all.len()
        );
    }
    assert!(
        skewed[0].len() > skewed[1].len(),
        "the busy instance got the larger share: {} vs {}",
        skewed[0].len(),
        skewed[1].len()
    );

    // Redis dies: the cached key keeps working, each instance allows a third of the limit.
    let crash = &keys[2];
    for p in &proxies {
        let r = call(
            *p,
            "GET",
            "/warm".into(),
            None,
            &[("x-api-key", crash.as_str())],
        )
        .await;
        assert_eq!(r.0, 200);
    }
    redis.kill();
    // The next sync fails (the warm requests keep the bucket active): every instance says so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for g in &gws {
        while metric(g.admin, "keygate_cluster_degraded").await != Some(1.0) {
            assert!(std::time::Instant::now() < deadline, "never degraded");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let mut total = 0;
    for p in &proxies {
        let (ok, _, other) = storm(&[*p], crash, 60, 1).await;
        let _ = other;
        total += ok;
    }
    eprintln!("while Redis is down: {total} accepted by three instances");
    // Burst 100 ÷ 3 each (33), less the 1 or so each already took, plus a cell of refill.
    assert!(
        (90..=105).contains(&total),
        "{total} accepted while degraded"
    );
    for g in &gws {
        assert_eq!(metric(g.admin, "keygate_cluster_degraded").await, Some(1.0));
        assert!(g.log_contains("Redis unreachable"), "no log line");
        assert!(g.panics().is_empty(), "{:?}", g.panics());
    }
    redis.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    for g in &gws {
        loop {
            // Traffic makes the instance ask Redis again.
            let _ = call(
                g.proxy,
                "GET",
                "/again".into(),
                None,
                &[("x-api-key", crash.as_str())],
            )
            .await;
            if metric(g.admin, "keygate_cluster_degraded").await == Some(0.0) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never recovered");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(g.log_contains("Redis answers again"));
    }
}

/// The store round trips the gateway counts (`keygate_store_duration_seconds_count`).
async fn store_calls(gw: &Gateway) -> u64 {
    let m = gw.admin("GET", "/metrics", None).await;
    text(&m)
        .lines()
        .find_map(|l| l.strip_prefix("keygate_store_duration_seconds_count "))
        .expect("store histogram")
        .trim()
        .parse()
        .unwrap()
}

/// The fast path stays free of the store: a cached key without credits on a plan without a
/// quota makes no store call at all, a key with credits one per request.
#[tokio::test]
async fn only_counted_keys_pay_a_store_call() {
    let gw = Gateway::start_with(PLANS).await;
    let (plain, _) = gw.client("plain", "bulk").await;
    let (credited, _) = key_with(&gw, "plain", json!({"credits": {"remaining": 1000}})).await;
    for k in [&plain, &credited] {
        assert_eq!(gw.get_with_key("/", k).await.status, 200);
    }
    let before = store_calls(&gw).await;
    for _ in 0..50 {
        assert_eq!(gw.get_with_key("/", &plain).await.status, 200);
    }
    // The metrics call itself is not a store call.
    assert_eq!(
        store_calls(&gw).await,
        before,
        "an uncredited key touched the store"
    );
    for _ in 0..50 {
        assert_eq!(gw.get_with_key("/", &credited).await.status, 200);
    }
    assert_eq!(store_calls(&gw).await, before + 50);
}

/// The verify endpoint of forward-auth is judged by the same core: it charges credits and
/// answers what is left, and refuses once they are gone.
#[tokio::test]
async fn forward_auth_verify_charges_credits_too() {
    let gw = Gateway::start_with(&format!("[forward_auth]\nenabled = true\n{PLANS}")).await;
    gw.client("edge", "bulk").await;
    let (key, _) = key_with(&gw, "edge", json!({"credits": {"remaining": 4}})).await;
    let ask = |uri: &'static str| {
        let key = key.clone();
        let gw = &gw;
        async move {
            gw.get(
                "/_keygate/verify",
                &[
                    ("x-forwarded-method", "GET"),
                    ("x-forwarded-uri", uri),
                    ("x-forwarded-host", "api.example"),
                    ("x-forwarded-proto", "https"),
                    ("x-api-key", key.as_str()),
                ],
            )
            .await
        }
    };
    let r = ask("/expensive/x").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        header(&r, "keygate-credits-remaining").as_deref(),
        Some("1")
    );
    let r = ask("/expensive/x").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.code(), "quota_exhausted");
    let r = ask("/x").await;
    assert_eq!(
        header(&r, "keygate-credits-remaining").as_deref(),
        Some("0")
    );
    assert_eq!(gw.upstream.count(), 0, "verify forwarded something");
}
