//! Redis behind Sentinel, with real processes: a primary, two replicas and three sentinels
//! (quorum 2, down after 1 s). The primary is killed (SIGKILL) while two gateways serve traffic:
//! cached keys keep working throughout, unknown keys and admin writes get 503 while there is no
//! primary, the gateways follow the promotion, admin writes succeed again within 5 s of it, an
//! admin write acknowledged before the kill (with `redis_wait_replicas = 1`) is still there,
//! and invalidations flow again on the new primary.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keygate::keys::KeyFormat;
use serde_json::json;

use crate::redis_ha_support::{SERVICE, Sentinel, SentinelOptions, sentinel_url};
use crate::redis_support::{Pki, RedisServer};
use crate::support::{Gateway, Upstream};

/// The bound SPEC §6 sets for a revocation on one instance to be enforced by every other.
const PROPAGATION_BOUND: Duration = Duration::from_millis(100);

/// A primary, its replicas and the sentinels watching them.
struct Ha {
    primary: RedisServer,
    _replicas: Vec<RedisServer>,
    sentinels: Vec<Sentinel>,
}

/// `min-replicas-to-write 1` on every server: a primary without a connected replica refuses
/// writes (the replicas only use it once promoted). Replicas sync without the default 5 s
/// delay of diskless replication.
const DURABLE: [&str; 6] = [
    "--min-replicas-to-write",
    "1",
    "--min-replicas-max-lag",
    "10",
    "--repl-diskless-sync-delay",
    "0",
];

fn sentinel_view(s: &Sentinel) -> HashMap<String, String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", s.port())).unwrap();
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .unwrap();
    let flat: Vec<String> = redis::cmd("SENTINEL")
        .arg("master")
        .arg(SERVICE)
        .query(&mut con)
        .unwrap();
    flat.chunks_exact(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

/// A primary and one replica, syncing without delay, once the replica acknowledges writes.
fn primary_and_replica() -> (RedisServer, RedisServer) {
    let primary = RedisServer::start_args(&["--repl-diskless-sync-delay", "0"]);
    let port = primary.port().to_string();
    let replica = RedisServer::start_args(&[
        "--replicaof",
        "127.0.0.1",
        &port,
        "--repl-diskless-sync-delay",
        "0",
    ]);
    replicas_acknowledge(&primary, 1, Instant::now() + Duration::from_secs(20));
    (primary, replica)
}

/// Waits until `n` replicas acknowledge a write made on `primary` (they are connected, synced
/// and streaming).
fn replicas_acknowledge(primary: &RedisServer, n: i64, deadline: Instant) {
    let client = redis::Client::open(primary.tcp_url(0)).unwrap();
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .unwrap();
    loop {
        // Refused (NOREPLICAS) while min-replicas-to-write is not met yet.
        let written: redis::RedisResult<()> = redis::cmd("SET").arg("probe").arg(1).query(&mut con);
        if written.is_ok() {
            let _: () = redis::cmd("DEL").arg("probe").query(&mut con).unwrap();
            let acked: i64 = redis::cmd("WAIT").arg(n).arg(200).query(&mut con).unwrap();
            if acked >= n {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{n} replicas do not acknowledge writes: {written:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_ha() -> Ha {
    let primary = RedisServer::start_args(&DURABLE);
    let port = primary.port().to_string();
    let replicas: Vec<RedisServer> = (0..2)
        .map(|_| {
            let mut args = vec!["--replicaof", "127.0.0.1", &port];
            args.extend(DURABLE);
            RedisServer::start_args(&args)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    replicas_acknowledge(&primary, 2, deadline);
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(primary.port(), 2)).collect();
    // Every sentinel knows both replicas and the two other sentinels (hello messages go out
    // every 2 s), so that a failover can be agreed.
    for s in &sentinels {
        loop {
            let v = sentinel_view(s);
            if v.get("num-slaves").map(String::as_str) == Some("2")
                && v.get("num-other-sentinels").map(String::as_str) == Some("2")
            {
                break;
            }
            assert!(Instant::now() < deadline, "sentinels not settled: {v:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ha {
        primary,
        _replicas: replicas,
        sentinels,
    }
}

async fn wait_ready(gw: &Gateway, limit: Duration) {
    let start = Instant::now();
    loop {
        if gw.admin_as("GET", "/readyz", None, &[]).await.status == 200 {
            return;
        }
        assert!(start.elapsed() < limit, "/readyz not 200 after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_during_traffic_cached_keys_keep_working_and_writes_resume_on_the_promoted_replica()
 {
    let mut ha = start_ha();
    let store = format!(
        "url = \"{}\"\nredis_wait_replicas = 1",
        sentinel_url(&ha.sentinels, 0)
    );
    let a = Gateway::start_on_store(Upstream::start().await, &store, "").await;
    let b = Gateway::start_on_store(Upstream::start().await, &store, "").await;
    for gw in [&a, &b] {
        wait_ready(gw, Duration::from_secs(10)).await;
    }
    let (key, _) = a.client("acme", "pro").await;
    for gw in [&a, &b] {
        assert_eq!(gw.get_with_key("/warm", &key).await.status, 200);
    }
    // Acknowledged just before the crash: a replica confirmed it (WAIT 1).
    let durable = a
        .admin(
            "POST",
            "/v1/clients",
            Some(json!({"client_id": "durable", "license": "pro"})),
        )
        .await;
    assert_eq!(durable.status, 201);
    let unknown = KeyFormat::new("kg_").generate().plaintext.0;

    // Traffic with the cached key on both gateways, through the failover.
    let a = Arc::new(a);
    let b = Arc::new(b);
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let mut traffic = Vec::new();
    for gw in [a.clone(), b.clone()] {
        let (stop, statuses, key) = (stop.clone(), statuses.clone(), key.clone());
        traffic.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let s = gw.get_with_key("/traffic", &key).await.status.as_u16();
                statuses.lock().unwrap().push(s);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let old = ha.primary.port();
    ha.primary.kill();
    let killed = Instant::now();

    // No primary yet (the sentinels wait 1 s before they call it down): the outage rules.
    let r = a.get_with_key("/unknown", &unknown).await;
    assert_eq!(r.status, 503, "unknown key without a primary");
    assert_eq!(r.code(), "store_unavailable");
    let r = a
        .admin(
            "POST",
            "/v1/clients",
            Some(json!({"client_id": "during", "license": "pro"})),
        )
        .await;
    assert_eq!(r.status, 503, "admin write without a primary");
    assert!(
        killed.elapsed() < Duration::from_millis(900),
        "the checks without a primary took {:?}: the sentinels may have promoted meanwhile",
        killed.elapsed()
    );

    // Admin writes until one succeeds; meanwhile, watch the sentinels promote a replica.
    let mut promoted = None;
    let mut n = 0;
    let written = loop {
        if promoted.is_none() && ha.sentinels[0].primary().is_some_and(|p| p != old) {
            promoted = Some(killed.elapsed());
        }
        n += 1;
        let r = b
            .admin(
                "POST",
                "/v1/clients",
                Some(json!({"client_id": format!("after-{n}"), "license": "pro"})),
            )
            .await;
        if r.status == 201 {
            break killed.elapsed();
        }
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no admin write succeeded within 30 s of the kill (promoted: {promoted:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let promoted = promoted.unwrap_or_else(|| {
        assert!(ha.sentinels[0].primary().is_some_and(|p| p != old));
        written
    });
    eprintln!(
        "sentinel failover: replica promoted {:.0} ms after the kill; first admin write accepted \
         {:.0} ms after the kill ({:.0} ms after the promotion)",
        ms(promoted),
        ms(written),
        ms(written.saturating_sub(promoted))
    );
    assert!(
        written.saturating_sub(promoted) < Duration::from_secs(5),
        "admin writes resumed {written:?} after the kill, promotion at {promoted:?}"
    );

    for gw in [&*a, &*b] {
        wait_ready(gw, Duration::from_secs(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in traffic {
        t.await.unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    assert!(statuses.len() > 100, "only {} requests", statuses.len());
    let failed: Vec<_> = statuses.iter().filter(|&&s| s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests with a cached key failed: {failed:?}",
        failed.len(),
        statuses.len()
    );

    // The acknowledged write survived; the refused one left nothing.
    assert_eq!(
        a.admin("GET", "/v1/clients/durable", None).await.status,
        200
    );
    assert_eq!(a.admin("GET", "/v1/clients/during", None).await.status, 404);
    assert_eq!(a.get_with_key("/after", &key).await.status, 200);
    let r = a.get_with_key("/after", &unknown).await;
    assert_eq!(r.status, 401);

    // Both gateways subscribed again on the new primary: a revocation on A reaches B at once.
    let created = a.key("acme", json!({})).await;
    let (fresh, fresh_id) = (
        created["key"].as_str().unwrap().to_owned(),
        created["id"].as_str().unwrap().to_owned(),
    );
    assert_eq!(b.get_with_key("/warm", &fresh).await.status, 200);
    let r = a
        .admin("DELETE", &format!("/v1/api-keys/{fresh_id}"), None)
        .await;
    assert_eq!(r.status, 200);
    let start = Instant::now();
    while b.get_with_key("/revoked", &fresh).await.status != 401 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "revocation did not reach B"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = start.elapsed();
    eprintln!(
        "after the failover, revocation propagated A→B in {:.1} ms",
        ms(took)
    );
    assert!(took < PROPAGATION_BOUND, "took {took:?}");
}

/// With `redis_wait_replicas`, a write waits in `WAIT` for the replicas, and `WAIT` holds up
/// every later call on its connection: a key lookup made while a write waits is answered at
/// once, not after the write (writes that wait have a connection of their own). Shown by the
/// primary's client list: the lookup's answer is in while the write's connection is still
/// blocked in `WAIT` (the replica paused). On a busy machine the 300 ms `WAIT` can end before
/// the lookup is even sent: up to three tries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_wait_replicas_lookups_do_not_queue_behind_a_write_waiting_for_replicas() {
    use keygate::keys::store::Store;
    use keygate::keys::store::redis::{RedisStore, RedisTls};
    use keygate::keys::{ApiKey, Client, now_millis};

    let (primary, replica) = primary_and_replica();
    let store = Arc::new(
        RedisStore::open_with(&primary.tcp_url(0), "keygate:", &RedisTls::default(), 1).unwrap(),
    );
    let client = |id: &str| Client {
        client_id: id.into(),
        license: "pro".into(),
        created_at: now_millis(),
        metadata: None,
    };
    let (key, new) = ApiKey::builder().client("looked-up").build();
    // Acknowledged or not (a late replica on a busy machine), the write stands on the primary.
    let _ = store.insert_client(&client("looked-up"), &key).await;
    let found = store.find_by_hash(&new.hash, now_millis()).await.unwrap();
    assert_eq!(found.map(|r| r.key.id), Some(key.id));
    let blocked_in_wait = || {
        let list: String = primary.query(0, redis::cmd("CLIENT").arg("LIST"));
        list.lines()
            .any(|l| l.contains("cmd=wait") && l.contains("flags=b"))
    };
    let mut seen = false;
    for attempt in 0..3 {
        replica.pause();
        let id = format!("waiting-{attempt}");
        let (other, _) = ApiKey::builder().client(&id).build();
        let write = {
            let (store, client) = (Arc::clone(&store), client(&id));
            tokio::spawn(async move { store.insert_client(&client, &other).await })
        };
        // The write's script has run: its connection now waits in WAIT.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !blocked_in_wait() {
            assert!(Instant::now() < deadline, "the write never reached WAIT");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let found = store.find_by_hash(&new.hash, now_millis()).await.unwrap();
        let still_waiting = blocked_in_wait();
        replica.resume();
        assert_eq!(found.map(|r| r.key.id), Some(key.id));
        // Confirmed once the replica is back, or not within the wait.
        let written = write.await.unwrap();
        assert!(
            matches!(
                written,
                Ok(()) | Err(keygate::keys::store::StoreError::Unconfirmed(_))
            ),
            "{written:?}"
        );
        if still_waiting {
            seen = true;
            break;
        }
    }
    assert!(
        seen,
        "each lookup was answered only once the write's WAIT had ended"
    );
}

/// With `redis_wait_replicas` and a replica that does not answer, two admin writes made at
/// once are both made and both answered as made but not confirmed: the second is not answered
/// as a failure because it waited behind the first one's `WAIT` past its time bound (writes
/// that wait for replicas go out one at a time, each with its own bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_wait_replicas_writes_made_at_once_are_each_answered_for_what_they_did() {
    use keygate::keys::store::redis::{RedisStore, RedisTls};
    use keygate::keys::store::{Store, StoreError};
    use keygate::keys::{ApiKey, Client, now_millis};

    let (primary, replica) = primary_and_replica();
    let store = Arc::new(
        RedisStore::open_with(&primary.tcp_url(0), "keygate:", &RedisTls::default(), 1).unwrap(),
    );
    let insert = |id: &'static str| {
        let store = Arc::clone(&store);
        async move {
            let client = Client {
                client_id: id.into(),
                license: "pro".into(),
                created_at: now_millis(),
                metadata: None,
            };
            let (key, _) = ApiKey::builder().client(id).build();
            store.insert_client(&client, &key).await
        }
    };
    // The script loaded on the server first (its first use costs a round more).
    let _ = insert("first").await;
    replica.pause();
    let (a, b) = tokio::join!(insert("at-once-a"), insert("at-once-b"));
    replica.resume();
    for (id, r) in [("at-once-a", a), ("at-once-b", b)] {
        assert!(matches!(r, Err(StoreError::Unconfirmed(_))), "{id}: {r:?}");
        let there: i64 = primary.query(0, redis::cmd("EXISTS").arg(format!("keygate:client:{id}")));
        assert_eq!(there, 1, "{id} was written");
    }
}

/// Webhook writes through the admin API are admin writes: with `redis_wait_replicas` and a
/// replica that does not answer, each is made and answered as not confirmed (they went out
/// without `WAIT`: a webhook deleted just before a failover could come back, and events go on
/// to a URL the operator removed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_wait_replicas_webhook_writes_wait_for_a_replica_too() {
    use keygate::keys::now_millis;
    use keygate::keys::outbox::Webhook;
    use keygate::keys::store::redis::{RedisStore, RedisTls};
    use keygate::keys::store::{Store, StoreError};

    let (primary, replica) = primary_and_replica();
    let store =
        RedisStore::open_with(&primary.tcp_url(0), "keygate:", &RedisTls::default(), 1).unwrap();
    let outbox = store.outbox().unwrap();
    let hook = |id: &str| Webhook {
        id: id.into(),
        url: "https://hooks.example.com/k".into(),
        events: vec!["*".into()],
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        created_at: now_millis(),
        previous_secret: None,
        previous_until: None,
    };
    // Each script loaded on the server first (a first use costs a round more: with a replica
    // still catching up it can pass the bound, so these answers are not judged), and the
    // webhook to change and delete made on the primary.
    let _ = outbox.insert_webhook(&hook("wh_first"), 100).await;
    let _ = outbox
        .update_webhook("wh_first", Some("https://hooks.example.com/a"), None)
        .await;
    let _ = outbox.delete_webhook("wh_none").await;
    let listed = outbox.list_webhooks().await.unwrap();
    assert!(listed.iter().any(|w| w.id == "wh_first"), "{listed:?}");
    replica.pause();
    let made = outbox.insert_webhook(&hook("wh_paused"), 100).await;
    let changed = outbox
        .update_webhook("wh_first", Some("https://hooks.example.com/b"), None)
        .await;
    let deleted = outbox.delete_webhook("wh_first").await;
    replica.resume();
    assert!(matches!(made, Err(StoreError::Unconfirmed(_))), "{made:?}");
    assert!(
        matches!(changed, Err(StoreError::Unconfirmed(_))),
        "{changed:?}"
    );
    assert!(
        matches!(deleted, Err(StoreError::Unconfirmed(_))),
        "{deleted:?}"
    );
    let ids: Vec<String> = outbox
        .list_webhooks()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(ids, ["wh_paused"], "each write was made on the primary");
}

/// An import of more than one chunk whose first chunk is written but not confirmed (a replica
/// that does not answer `WAIT`): atomic, it is undone like a later chunk (its error alone left
/// 250 keys standing); not atomic, every key is listed as not confirmed (the rest was never
/// sent), not answered as one write that stands whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_wait_replicas_an_import_whose_first_chunk_is_unconfirmed_is_undone_or_told() {
    use keygate::keys::store::import::Refusal;
    use keygate::keys::store::redis::{RedisStore, RedisTls};
    use keygate::keys::store::{Store, StoreError};
    use keygate::keys::{ApiKey, Client, now_millis};

    let (primary, replica) = primary_and_replica();
    let store =
        RedisStore::open_with(&primary.tcp_url(0), "keygate:", &RedisTls::default(), 1).unwrap();
    let client = Client {
        client_id: "bulk".into(),
        license: "pro".into(),
        created_at: now_millis(),
        metadata: None,
    };
    let (first, _) = ApiKey::builder().client("bulk").build();
    store.insert_client(&client, &first).await.unwrap();
    let batch = || -> Vec<ApiKey> {
        (0..300)
            .map(|_| ApiKey::builder().client("bulk").build().0)
            .collect()
    };
    // The scripts loaded on the server first (not judged).
    let _ = store.import_keys(batch(), 0, true).await;
    let _ = store.delete_key(first.id).await;

    let keys = batch();
    replica.pause();
    // The replica answers again once the first chunk's `WAIT` (300 ms) has given up, so that
    // the undo's deletes are confirmed (each would wait its 300 ms too).
    let (atomic, ()) = tokio::join!(store.import_keys(keys.clone(), 0, true), async {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        replica.resume();
    });
    assert!(
        matches!(
            atomic,
            Err(StoreError::Incomplete(_) | StoreError::Unconfirmed(_))
        ),
        "{atomic:?}"
    );
    for k in &keys {
        assert!(
            store.find_by_id(k.id).await.unwrap().is_none(),
            "{} stands",
            k.id
        );
    }

    let keys = batch();
    replica.pause();
    let told = store.import_keys(keys.clone(), 0, false).await;
    replica.resume();
    let refused = told.unwrap();
    assert_eq!(
        refused,
        (0..300)
            .map(|i| (i, Refusal::Unconfirmed))
            .collect::<Vec<_>>()
    );
}

/// A signing key rotation is an admin write too: with `redis_wait_replicas` and a replica
/// that does not answer, it is made and answered as not confirmed (it went out without
/// `WAIT`: a rotation acknowledged just before a failover could be lost, and the instance that
/// made it drop its new key at the next read of the set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_wait_replicas_a_signing_key_rotation_waits_for_a_replica_too() {
    use keygate::keys::now_millis;
    use keygate::keys::store::redis::{RedisStore, RedisTls};
    use keygate::keys::store::signing::{AddKey, SigningKeyRecord};
    use keygate::keys::store::{Store, StoreError};

    let (primary, replica) = primary_and_replica();
    let store =
        RedisStore::open_with(&primary.tcp_url(0), "keygate:", &RedisTls::default(), 1).unwrap();
    let key = |kid: &str| SigningKeyRecord {
        kid: kid.into(),
        algorithm: "EdDSA".into(),
        private_pkcs8: vec![7; 48],
        active_from: now_millis(),
        created_at: now_millis(),
    };
    // The script loaded on the server first (not judged, as above): the fleet's first key.
    let _ = store
        .add_signing_key(&key("first"), AddKey::IfNone, &[])
        .await;
    replica.pause();
    let rotated = store
        .add_signing_key(&key("second"), AddKey::Always, &[])
        .await;
    replica.resume();
    assert!(
        matches!(rotated, Err(StoreError::Unconfirmed(_))),
        "{rotated:?}"
    );
    let mut kids: Vec<String> = store
        .signing_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.kid)
        .collect();
    kids.sort();
    assert_eq!(
        kids,
        ["first", "second"],
        "the rotation was made on the primary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_wait_replicas_an_admin_write_is_acknowledged_only_once_a_replica_holds_it() {
    let (primary, replica) = primary_and_replica();
    let store = |wait: u32| {
        format!(
            "url = \"{}\"\nredis_wait_replicas = {wait}",
            primary.tcp_url(0)
        )
    };
    let waiting = Gateway::start_on_store(Upstream::start().await, &store(1), "").await;
    let plain = Gateway::start_on_store(Upstream::start().await, &store(0), "").await;
    for gw in [&waiting, &plain] {
        wait_ready(gw, Duration::from_secs(10)).await;
    }
    let create = |id: &str| json!({"client_id": id, "license": "pro"});
    // A replica that keeps up confirms within the wait; on a machine busy with other tests its
    // confirmation can come late once (503, never a 201 it does not hold): another client then.
    let mut attempt = 0;
    let id = loop {
        let id = format!("replicated-{attempt}");
        let r = waiting
            .admin("POST", "/v1/clients", Some(create(&id)))
            .await;
        if r.status == 201 {
            break id;
        }
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        attempt += 1;
        assert!(attempt < 5, "the replica never confirmed in time");
    };
    let on_replica: i64 =
        replica.query(0, redis::cmd("EXISTS").arg(format!("keygate:client:{id}")));
    assert_eq!(on_replica, 1, "acknowledged, yet not on the replica");

    // The replica hangs: the write is made on the primary, but not acknowledged.
    replica.pause();
    let t = Instant::now();
    let r = waiting
        .admin("POST", "/v1/clients", Some(create("unconfirmed")))
        .await;
    let took = t.elapsed();
    replica.resume();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code(), "store_unavailable");
    assert!(r.headers.contains_key("retry-after"));
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("did not confirm"), "{detail}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // A credit change is such an admin write too.
    let listed = waiting
        .admin("GET", &format!("/v1/api-keys?client_id={id}"), None)
        .await
        .json();
    let key_id = listed["data"][0]["id"].as_str().unwrap().to_owned();
    let credits = |n: u64| {
        let (gw, path) = (&waiting, format!("/v1/api-keys/{key_id}/credits"));
        async move { gw.admin("POST", &path, Some(json!({"set": n}))).await }
    };
    // (Its script's first use on this server: refused unloaded, loaded, sent again, each time
    // with its WAIT.)
    replica.pause();
    let r = credits(1000).await;
    replica.resume();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("did not confirm"), "{detail}");
    // Without redis_wait_replicas the same situation is acknowledged at once.
    replica.pause();
    let r = plain
        .admin("POST", "/v1/clients", Some(create("unwaited")))
        .await;
    replica.resume();
    assert_eq!(r.status, 201);
    // What the 503 said: the unconfirmed write stands on the primary.
    assert_eq!(
        waiting
            .admin("GET", "/v1/clients/unconfirmed", None)
            .await
            .status,
        200
    );
}

const ACL_PASSWORD: &str = "acl-Pa55word";

/// A TLS primary with an ACL user `keygate`, and a sentinel that reaches it over TLS with that
/// user and listens with TLS itself.
fn tls_primary_and_sentinel(pki: &Pki) -> (RedisServer, Sentinel) {
    let primary = RedisServer::start_tls(pki.server(false));
    let _: () = primary.query(
        0,
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("keygate")
            .arg("on")
            .arg(format!(">{ACL_PASSWORD}"))
            .arg("~*")
            .arg("&*")
            .arg("+@all"),
    );
    let tls = pki.server(false);
    let sentinel = Sentinel::start_with(
        primary.tls_port(),
        1,
        &SentinelOptions {
            tls: Some(&tls),
            auth: Some((Some("keygate"), ACL_PASSWORD)),
        },
    );
    (primary, sentinel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_sentinel_with_an_acl_user_serves_and_a_wrong_password_changes_nothing() {
    let pki = Pki::generate();
    let (_primary, sentinel) = tls_primary_and_sentinel(&pki);
    let store = |password: &str| {
        format!(
            "url = \"rediss+sentinel://keygate:{password}@127.0.0.1:{}/{SERVICE}/0\"\nredis_ca = \"{}\"",
            sentinel.tls_port(),
            pki.ca.display()
        )
    };
    let gw = Gateway::start_on_store(Upstream::start().await, &store(ACL_PASSWORD), "").await;
    wait_ready(&gw, Duration::from_secs(10)).await;
    let (key, _) = gw.client("acme", "pro").await;
    assert_eq!(gw.get_with_key("/tls", &key).await.status, 200);

    // The wrong password: never ready, lookups and writes 503, nothing written.
    let wrong =
        Gateway::start_on_store(Upstream::start().await, &store("wrong-password"), "").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        wrong.admin_as("GET", "/readyz", None, &[]).await.status,
        503
    );
    let r = wrong
        .admin(
            "POST",
            "/v1/clients",
            Some(json!({"client_id": "intruder", "license": "pro"})),
        )
        .await;
    assert_eq!(r.status, 503);
    assert!(!String::from_utf8_lossy(&r.body).contains("wrong-password"));
    let fresh = KeyFormat::new("kg_").generate().plaintext.0;
    assert_eq!(wrong.get_with_key("/x", &fresh).await.status, 503);
    assert_eq!(
        gw.admin("GET", "/v1/clients/intruder", None).await.status,
        404
    );
    // The right one still works, over TLS to both the sentinel and the primary.
    assert_eq!(gw.admin("GET", "/v1/clients/acme", None).await.status, 200);
}

#[test]
fn the_binary_via_sentinel_skips_a_dead_sentinel_and_logs_no_password_key_or_hash() {
    use crate::redis_store::{has_hex_run, http};
    use crate::support::binary::Binary;
    const PASSWORD: &str = "s3nt1nel-redis-pw";
    let primary = RedisServer::start();
    let _: () = primary.query(
        0,
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg(PASSWORD),
    );
    let sentinel = Sentinel::start_with(
        primary.port(),
        1,
        &SentinelOptions {
            tls: None,
            auth: Some((None, PASSWORD)),
        },
    );
    // The first sentinel of the list is not there.
    let (dead, _held) = crate::support::closed_port();
    let url = format!(
        "redis+sentinel://:{PASSWORD}@{dead},127.0.0.1:{}/{SERVICE}/0",
        sentinel.port()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut p = Binary::command([
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/keygate.toml"),
    ])
    .args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ])
    .args(["--upstream", "http://127.0.0.1:1"])
    .arg("--store")
    .arg(&url)
    .env("KEYGATE_ADMIN_KEY", "an-admin-key-of-decent-length")
    .env("KEYGATE_JWT_SECRET", "a-token-secret-of-at-least-32-bytes")
    .json_logs()
    .env("KEYGATE_LOG_LEVEL", "debug")
    .current_dir(dir.path())
    .spawn();
    let (admin, proxy) = (p.admin.to_string(), p.proxy.to_string());
    p.wait_for_line("Redis primary at", Duration::from_secs(20));
    let (status, body) = http(
        &admin,
        "POST",
        "/v1/clients",
        &[
            ("x-admin-key", "an-admin-key-of-decent-length"),
            ("content-type", "application/json"),
        ],
        r#"{"client_id":"acme","license":"pro"}"#,
    );
    assert_eq!(status, 201, "{body}");
    let created: serde_json::Value = serde_json::from_str(&body).unwrap();
    let key = created["api_key"]["key"].as_str().unwrap().to_owned();
    p.wait_for_line("invalidation received", Duration::from_secs(10));
    let (status, _) = http(
        &proxy,
        "GET",
        "/",
        &[("authorization", &format!("Bearer {key}"))],
        "",
    );
    assert_eq!(status, 502, "the key works (the upstream is down)");
    assert!(p.terminate().success());

    let all = p.lines().join("\n");
    assert!(all.contains("via sentinels"), "{all}");
    assert!(!all.contains(PASSWORD), "the password was logged:\n{all}");
    assert!(!all.contains(&key), "a key was logged:\n{all}");
    assert!(
        !has_hex_run(&all),
        "something like a key hash was logged:\n{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_the_sentinels_do_not_monitor_is_never_ready_and_changes_nothing() {
    let primary = RedisServer::start();
    let sentinel = Sentinel::start(primary.port(), 1);
    let url = format!(
        "redis+sentinel://127.0.0.1:{}/not-{SERVICE}/0",
        sentinel.port()
    );
    let gw =
        Gateway::start_on_store(Upstream::start().await, &format!("url = \"{url}\""), "").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(gw.admin_as("GET", "/readyz", None, &[]).await.status, 503);
    let r = gw
        .admin(
            "POST",
            "/v1/clients",
            Some(json!({"client_id": "nowhere", "license": "pro"})),
        )
        .await;
    assert_eq!(r.status, 503);
    let fresh = KeyFormat::new("kg_").generate().plaintext.0;
    assert_eq!(gw.get_with_key("/x", &fresh).await.status, 503);
    let keys: Vec<String> = primary.query(0, redis::cmd("KEYS").arg("*"));
    assert!(keys.is_empty(), "{keys:?}");
}

/// A stand-in for a sentinel that names whatever port `primary` holds (as `127.0.0.1`): for
/// the cases a real sentinel does not produce on demand.
async fn fake_sentinel(primary: Arc<std::sync::atomic::AtomicU16>) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let primary = primary.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r);
                loop {
                    // One command: *N then N bulk strings.
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let n: usize = line.trim().trim_start_matches('*').parse().unwrap_or(0);
                    let mut args = Vec::new();
                    for _ in 0..n {
                        line.clear();
                        r.read_line(&mut line).await.unwrap();
                        let len: usize = line.trim().trim_start_matches('$').parse().unwrap();
                        let mut buf = vec![0; len + 2];
                        r.read_exact(&mut buf).await.unwrap();
                        args.push(String::from_utf8_lossy(&buf[..len]).to_uppercase());
                    }
                    let reply = match args.first().map(String::as_str) {
                        Some("SENTINEL") => {
                            let p = primary.load(Ordering::SeqCst).to_string();
                            format!("*2\r\n$9\r\n127.0.0.1\r\n${}\r\n{p}\r\n", p.len())
                        }
                        Some("SUBSCRIBE") => {
                            "*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n".into()
                        }
                        Some("PING") => "+PONG\r\n".into(),
                        _ => "+OK\r\n".into(),
                    };
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_named_as_primary_is_not_used_and_the_real_primary_is_taken_once_named() {
    let primary = RedisServer::start_args(&["--repl-diskless-sync-delay", "0"]);
    let port = primary.port().to_string();
    let replica = RedisServer::start_args(&["--replicaof", "127.0.0.1", &port]);
    replicas_acknowledge(&primary, 1, Instant::now() + Duration::from_secs(20));
    // A key written to the primary through a gateway that uses it directly; the replica holds it too.
    let named = Arc::new(std::sync::atomic::AtomicU16::new(replica.port()));
    let sentinel = fake_sentinel(named.clone()).await;
    let url = format!("redis+sentinel://127.0.0.1:{sentinel}/{SERVICE}/0");
    let direct = Gateway::start_on_store(
        Upstream::start().await,
        &format!("url = \"{}\"", primary.tcp_url(0)),
        "",
    )
    .await;
    wait_ready(&direct, Duration::from_secs(10)).await;
    let (key, _) = direct.client("acme", "pro").await;
    replicas_acknowledge(&primary, 1, Instant::now() + Duration::from_secs(5));

    let gw =
        Gateway::start_on_store(Upstream::start().await, &format!("url = \"{url}\""), "").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The replica holds the key, but a gateway must not serve from a replica.
    assert_eq!(gw.admin_as("GET", "/readyz", None, &[]).await.status, 503);
    let r = gw.get_with_key("/from-replica", &key).await;
    assert_eq!(r.status, 503, "served from a replica");

    // The sentinel names the real primary: the gateway takes it by itself.
    named.store(primary.port(), Ordering::SeqCst);
    wait_ready(&gw, Duration::from_secs(5)).await;
    assert_eq!(gw.get_with_key("/from-primary", &key).await.status, 200);
}
