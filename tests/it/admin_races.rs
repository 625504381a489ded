//! Lost updates on admin writes, over HTTP against the real gateway, on both stores. A client's
//! `keys:manage` key has been stolen; the attacker loops harmless PATCHes (a new name) on one
//! of the client's keys while an admin disables that key and rotates it. Every round, all
//! writes are acknowledged; afterwards the disable and the rotation must both hold: the admin
//! API shows the key disabled with the rotated prefix, the rotated-away key and the disabled
//! key are refused by the proxy, and the key works again once the admin re-enables it.

use std::time::Instant;

use serde_json::{Value, json};

use crate::redis_support::RedisServer;
use crate::support::{ADMIN_KEY, Gateway, Reply, Upstream};

/// Rounds of disable + rotate + two attacker PATCHes, all four in flight at once.
const RACES: usize = 1_000;

/// Refused keys are part of the test: the per-IP failed-authentication limit must not turn
/// them into 429s (which would hide whether the key was accepted).
const EXTRA: &str = "[rate_limit]\nfailed_auth = { per_second = 1000000, burst = 1000000 }\n";

/// What the test counts; every figure but the first two must stay 0.
#[derive(Debug, Default)]
struct Figures {
    races: usize,
    acknowledged_writes: usize,
    disables_undone: usize,
    rotations_undone: usize,
    rotated_away_key_accepted: usize,
    disabled_key_accepted: usize,
}

impl Figures {
    /// Every sign of an acknowledged write undone (one undone write may show twice).
    fn violations(&self) -> usize {
        self.disables_undone
            + self.rotations_undone
            + self.rotated_away_key_accepted
            + self.disabled_key_accepted
    }
}

fn ok(r: &Reply, what: &str) -> Value {
    assert_eq!(
        r.status,
        200,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

async fn race(gw: &Gateway) -> Figures {
    let stolen = gw.manager("victim", "pro").await;
    let target = gw.key("victim", json!({"name": "target"})).await;
    let id = target["id"].as_str().unwrap().to_owned();
    let mut current = target["key"].as_str().unwrap().to_owned();
    assert_eq!(gw.get_with_key("/", &current).await.status, 200);

    let path = format!("/v1/api-keys/{id}");
    let rotate_path = format!("{path}/rotate");
    let attacker = [("x-api-key", stolen.as_str())];
    let admin = [("x-admin-key", ADMIN_KEY)];
    let mut f = Figures::default();
    for i in 0..RACES {
        let name = |n: usize| json!({ "name": format!("renamed {i}.{n}") });
        // The attacker's PATCHes go first and last so their read and write can straddle the
        // admin's writes.
        let (p1, disable, rotate, p2) = tokio::join!(
            gw.admin_as("PATCH", &path, Some(name(1)), &attacker),
            gw.admin_as("PATCH", &path, Some(json!({"enabled": false})), &admin),
            gw.admin_as("POST", &rotate_path, Some(json!({})), &admin),
            gw.admin_as("PATCH", &path, Some(name(2)), &attacker),
        );
        ok(&p1, "attacker PATCH");
        ok(&p2, "attacker PATCH");
        assert_eq!(ok(&disable, "disable")["enabled"], false);
        let rotated = ok(&rotate, "rotate");
        let fresh = rotated["key"].as_str().unwrap().to_owned();
        f.races += 1;
        f.acknowledged_writes += 4;

        let now = ok(&gw.admin("GET", &path, None).await, "GET");
        if now["enabled"] != false {
            f.disables_undone += 1;
        }
        if now["prefix"] != rotated["prefix"] {
            f.rotations_undone += 1;
        }
        if gw.get_with_key("/", &current).await.status == 200 {
            f.rotated_away_key_accepted += 1;
        }
        if gw.get_with_key("/", &fresh).await.status == 200 {
            f.disabled_key_accepted += 1;
        }

        // Re-enabled, the rotated key works (so the refusals above are not vacuous), and the
        // next round starts from an enabled key again.
        let back = gw
            .admin("PATCH", &path, Some(json!({"enabled": true})))
            .await;
        assert_eq!(ok(&back, "re-enable")["enabled"], true);
        if gw.get_with_key("/", &fresh).await.status == 200 {
            current = fresh;
        } else {
            // The rotation was undone: the key still answers to the old secret.
            assert!(f.rotations_undone > 0);
            assert_eq!(gw.get_with_key("/", &current).await.status, 200);
        }
    }
    f
}

async fn run(store: &str, gw: Gateway) {
    let started = Instant::now();
    let f = race(&gw).await;
    eprintln!(
        "admin races on {store}: {} races, {} acknowledged writes, {} violations ({f:?}) in {:.1} s",
        f.races,
        f.acknowledged_writes,
        f.violations(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        f.violations(),
        0,
        "acknowledged writes undone on {store}: {f:?}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_disable_and_rotate_survive_concurrent_patches() {
    run("sqlite", Gateway::start_with(EXTRA).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_disable_and_rotate_survive_concurrent_patches() {
    let redis = RedisServer::start();
    let store = format!("url = \"{}\"", redis.tcp_url(0));
    let gw = Gateway::start_on_store(Upstream::start().await, &store, EXTRA).await;
    run("redis", gw).await;
}
