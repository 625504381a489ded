//! Cluster endpoints with a real 3-primary cluster (`redis-cli --cluster create`): gateways
//! share keys and revocations through it (invalidations over the cluster's pub/sub), and a slot
//! moved to another node is followed (`ASK` during the migration, `MOVED` after it). And `check-config` on every new URL form.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::redis_ha_support::Cluster;
use crate::redis_support::RedisServer;
use crate::support::binary::Binary;
use crate::support::{ADMIN_KEY, Gateway, Upstream};

const PREFIX: &str = "{kg}:";

/// The cluster URL listing the nodes from the `first`-th on, so that two gateways subscribe to
/// invalidations on different nodes.
fn url_from(cluster: &Cluster, first: usize) -> String {
    let n = cluster.nodes.len();
    let list = (0..n)
        .map(|i| format!("127.0.0.1:{}", cluster.nodes[(first + i) % n].port()))
        .collect::<Vec<_>>()
        .join(",");
    format!("redis+cluster://{list}")
}

async fn on_cluster(cluster: &Cluster, first: usize) -> Gateway {
    let store = format!(
        "url = \"{}\"\nredis_prefix = \"{PREFIX}\"",
        url_from(cluster, first)
    );
    let gw = Gateway::start_on_store(Upstream::start().await, &store, "").await;
    let start = Instant::now();
    while gw.admin_as("GET", "/readyz", None, &[]).await.status != 200 {
        assert!(start.elapsed() < Duration::from_secs(10), "not ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw
}

fn slot_count(node: &RedisServer, slot: i64) -> i64 {
    node.query(0, redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(slot))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_on_a_cluster_endpoint_share_keys_and_revocations_and_follow_a_moved_slot() {
    let cluster = Cluster::start();
    let a = on_cluster(&cluster, 0).await;
    let b = on_cluster(&cluster, 1).await;
    let (key, id) = a.client("acme", "pro").await;
    assert_eq!(b.get_with_key("/shared", &key).await.status, 200);

    // All keys in one slot, on one node.
    let slot: i64 = cluster.nodes[0].query(0, redis::cmd("CLUSTER").arg("KEYSLOT").arg(PREFIX));
    let owners: Vec<usize> = (0..3)
        .filter(|&i| slot_count(&cluster.nodes[i], slot) > 0)
        .collect();
    assert_eq!(owners.len(), 1, "{owners:?}");
    for n in &cluster.nodes {
        let all: i64 = n.query(0, &mut redis::cmd("DBSIZE"));
        assert_eq!(all, slot_count(n, slot), "a key outside the tag's slot");
    }

    // A revocation on A reaches B (subscribed on another node) within the bound.
    a.admin("DELETE", &format!("/v1/api-keys/{id}"), None).await;
    let start = Instant::now();
    while b.get_with_key("/revoked", &key).await.status != 401 {
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "not revoked on B"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // Move the slot to another node, as a resharding does; both gateways follow.
    let src = &cluster.nodes[owners[0]];
    let dst = &cluster.nodes[(owners[0] + 1) % 3];
    let id_of = |n: &RedisServer| -> String { n.query(0, redis::cmd("CLUSTER").arg("MYID")) };
    let (src_id, dst_id) = (id_of(src), id_of(dst));
    let _: () = dst.query(
        0,
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&src_id),
    );
    let _: () = src.query(
        0,
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&dst_id),
    );
    let keys: Vec<String> = src.query(
        0,
        redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(1000),
    );
    assert!(!keys.is_empty());
    let _: () = src.query(
        0,
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(dst.port())
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys),
    );
    // Mid-migration the old node answers ASK for the keys it no longer holds: followed, for
    // reads and for a write script.
    for (name, gw) in [("A", &a), ("B", &b)] {
        let r = gw.admin("GET", "/v1/clients/acme", None).await;
        assert_eq!(
            r.status,
            200,
            "{name} (ASK): {}",
            String::from_utf8_lossy(&r.body)
        );
        let created = gw
            .key("acme", json!({"name": format!("mid-move {name}")}))
            .await;
        let fresh = created["key"].as_str().unwrap();
        assert_eq!(gw.get_with_key("/asked", fresh).await.status, 200, "{name}");
    }
    assert_eq!(slot_count(src, slot), 0, "a write landed on the old node");
    for n in &cluster.nodes {
        let _: () = n.query(
            0,
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&dst_id),
        );
    }
    assert_eq!(slot_count(src, slot), 0);
    assert!(slot_count(dst, slot) > 0);

    // Reads and writes through both gateways, none of them cached.
    for (name, gw) in [("A", &a), ("B", &b)] {
        let r = gw.admin("GET", "/v1/clients/acme", None).await;
        assert_eq!(
            r.status,
            200,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let created = gw
            .key("acme", json!({"name": format!("after move {name}")}))
            .await;
        let fresh = created["key"].as_str().unwrap();
        assert_eq!(gw.get_with_key("/moved", fresh).await.status, 200, "{name}");
    }
    // Invalidations still flow after the move.
    let created = a.key("acme", json!({})).await;
    let (fresh, fresh_id) = (
        created["key"].as_str().unwrap().to_owned(),
        created["id"].as_str().unwrap().to_owned(),
    );
    assert_eq!(b.get_with_key("/warm", &fresh).await.status, 200);
    a.admin("DELETE", &format!("/v1/api-keys/{fresh_id}"), None)
        .await;
    let start = Instant::now();
    while b.get_with_key("/revoked", &fresh).await.status != 401 {
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "not revoked on B"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

const PASSWORD: &str = "s3cret-pw";

/// `check-config` with this `[store]` section; (success, everything printed).
fn check(store: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    std::fs::write(&path, format!("[store]\n{store}\n")).unwrap();
    let out = Binary::command(["check-config", "--config"])
        .arg(&path)
        .env("KEYGATE_ADMIN_KEY", ADMIN_KEY)
        .env("KEYGATE_JWT_SECRET", "a-token-secret-of-at-least-32-bytes")
        .output();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains(PASSWORD), "password shown: {text}");
    (out.status.success(), text)
}

#[test]
fn check_config_accepts_sentinel_and_cluster_urls_and_explains_each_refusal() {
    for store in [
        "url = \"redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3/mymaster/0\"".to_owned(),
        format!("url = \"rediss+sentinel://keygate:{PASSWORD}@s1,s2/mymaster/2\""),
        format!(
            "url = \"redis+sentinel://:{PASSWORD}@[::1]:26379/mymaster\"\nredis_wait_replicas = 1"
        ),
        "url = \"redis+cluster://10.0.0.1:7000,10.0.0.2:7000\"\nredis_prefix = \"{keygate}:\""
            .to_owned(),
        format!(
            "url = \"rediss+cluster://kg:{PASSWORD}@c1:6380/0\"\nredis_prefix = \"app:{{kg}}:\""
        ),
    ] {
        let (ok, text) = check(&store);
        assert!(ok, "{store}: {text}");
    }
    for (store, why) in [
        (
            format!("url = \"redis+sentinel://{PASSWORD}@s1:26379\""),
            "the service name is missing",
        ),
        (
            "url = \"redis+sentinel://s1:26379,,s2/mymaster\"".to_owned(),
            "sentinel address #2 is empty",
        ),
        (
            "url = \"redis+sentinel://s1:port/mymaster\"".to_owned(),
            "no valid port",
        ),
        (
            "url = \"redis+sentinel://s1/mymaster/zero\"".to_owned(),
            "database after the service name must be a number",
        ),
        (
            "url = \"redis+cluster://c1:7000/3\"\nredis_prefix = \"{kg}:\"".to_owned(),
            "only database 0",
        ),
        (
            "url = \"redis+cluster://c1:7000\"".to_owned(),
            "has no hash tag",
        ),
        (
            "url = \"redis+cluster://c1:7000\"\nredis_prefix = \"{}kg:\"".to_owned(),
            "has no hash tag",
        ),
        (
            "url = \"redis+cluster://c1:7000\"\nredis_prefix = \"{kg}:\"\nredis_wait_replicas = 1"
                .to_owned(),
            "not supported with a redis+cluster://",
        ),
        (
            format!("url = \"redis+cluster://u:{PASSWORD}@\"\nredis_prefix = \"{{kg}}:\""),
            "no cluster node address",
        ),
        (
            "url = \"redis://127.0.0.1:6379/0\"\nredis_wait_replicas = 17".to_owned(),
            "at most 16",
        ),
        (
            "url = \"redis+sentinel://s1/mymaster\"\nredis_ca = \"/x.pem\"".to_owned(),
            "only used with a rediss://",
        ),
    ] {
        let (ok, text) = check(&store);
        assert!(!ok, "{store}: accepted");
        assert!(text.contains(why), "{store}: {text}");
        assert!(text.contains("store."), "{store}: names no field: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_of_the_slot_down_cached_keys_work_the_rest_503_and_service_comes_back() {
    let mut cluster = Cluster::start();
    let gw = on_cluster(&cluster, 0).await;
    let (key, _) = gw.client("acme", "pro").await;
    assert_eq!(gw.get_with_key("/warm", &key).await.status, 200);
    // The invalidation the client's creation published can arrive after that first lookup
    // (a loaded machine) and drop the entry it made: cached again once it has.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.get_with_key("/warm", &key).await.status, 200);
    let slot: i64 = cluster.nodes[0].query(0, redis::cmd("CLUSTER").arg("KEYSLOT").arg(PREFIX));
    let owner = (0..3)
        .find(|&i| slot_count(&cluster.nodes[i], slot) > 0)
        .unwrap();
    let unknown = keygate::keys::KeyFormat::new("kg_").generate().plaintext.0;

    cluster.nodes[owner].kill();
    for _ in 0..3 {
        assert_eq!(gw.get_with_key("/cached", &key).await.status, 200);
        let t = Instant::now();
        let r = gw.get_with_key("/unknown", &unknown).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.code(), "store_unavailable");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let r = gw
            .admin(
                "POST",
                "/v1/clients",
                Some(json!({"client_id": "during", "license": "pro"})),
            )
            .await;
        assert_eq!(r.status, 503);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The node comes back (same port, data and cluster config); the gateway was not restarted.
    cluster.nodes[owner].restart();
    let start = Instant::now();
    loop {
        let r = gw
            .admin(
                "POST",
                "/v1/clients",
                Some(json!({"client_id": "after", "license": "pro"})),
            )
            .await;
        if r.status == 201 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "still {} after the node came back",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "cluster node restarted: admin writes back after {:.0} ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
    // Lookups skip the store for up to a second after a failed one (see README): then 401.
    let start = Instant::now();
    while gw.get_with_key("/back", &unknown).await.status != 401 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "unknown key not 401"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        gw.admin("GET", "/v1/clients/during", None).await.status,
        404
    );
    let r = gw.get_with_key("/back", &key).await;
    assert_eq!(
        r.status,
        200,
        "the key after the node came back: {}",
        String::from_utf8_lossy(&r.body)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_starts_while_the_cluster_is_down_and_serves_once_it_is_up() {
    let mut cluster = Cluster::start();
    for n in cluster.nodes.iter_mut() {
        n.kill();
    }
    let store = format!(
        "url = \"{}\"\nredis_prefix = \"{PREFIX}\"",
        url_from(&cluster, 0)
    );
    let gw = Gateway::start_on_store(Upstream::start().await, &store, "").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(gw.admin_as("GET", "/readyz", None, &[]).await.status, 503);
    let r = gw
        .admin(
            "POST",
            "/v1/clients",
            Some(json!({"client_id": "early", "license": "pro"})),
        )
        .await;
    assert_eq!(r.status, 503);

    for n in cluster.nodes.iter_mut() {
        n.restart();
    }
    let start = Instant::now();
    while gw.admin_as("GET", "/readyz", None, &[]).await.status != 200 {
        assert!(start.elapsed() < Duration::from_secs(20), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Right after a whole cluster restarts, the cluster client may still be rebuilding its
    // slot map: a call can then time out once (503, never a wrong answer), and lookups skip
    // the store for the backoff. Writes and serving must resume within a few seconds and hold.
    let start = Instant::now();
    let key = loop {
        let r = gw
            .admin(
                "POST",
                "/v1/clients",
                Some(json!({"client_id": "acme", "license": "pro"})),
            )
            .await;
        if r.status == 201 {
            break r.json()["api_key"]["key"].as_str().unwrap().to_owned();
        }
        assert_eq!(r.status, 503, "only 503 while the store recovers");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "writes never resumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let start = Instant::now();
    loop {
        let status = gw.get_with_key("/up", &key).await.status;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "only 503 while the store recovers");
        assert!(start.elapsed() < Duration::from_secs(5), "never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..20 {
        assert_eq!(gw.get_with_key("/up", &key).await.status, 200);
    }
    assert_eq!(gw.admin("GET", "/v1/clients/early", None).await.status, 404);
}
