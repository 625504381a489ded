//! What only the Redis store does, against a real `redis-server`: invalidation messages for
//! every write (received by another store instance over pub/sub), prefix isolation, lookups in
//! one round trip (and batches of them in one script call per 64 keys), bounded calls when Redis
//! is dead or hung, and recovery without a restart.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keygate::keys::cache::{Invalidation, InvalidationSink};
use keygate::keys::store::redis::RedisStore;
use keygate::keys::store::{ClientPatch, KeyPatch, Rotation, Store, StoreError, Usage, UsageWrite};
use keygate::keys::testing::client;
use keygate::keys::{ApiKey, KeyHash, now_millis};
use uuid::Uuid;

use crate::redis_support::RedisServer;
use crate::support::binary::Binary;

/// Records what a store's subscription delivers.
#[derive(Default)]
struct Recorder {
    messages: Mutex<Vec<Invalidation>>,
    resyncs: AtomicUsize,
}

impl InvalidationSink for Recorder {
    fn invalidate(&self, inv: &Invalidation) {
        self.messages.lock().unwrap().push(inv.clone());
    }
    fn invalidate_all(&self) {
        self.resyncs.fetch_add(1, Ordering::SeqCst);
    }
}

impl Recorder {
    /// Waits for the subscription to be (re)established `n` times in all.
    async fn wait_resyncs(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.resyncs.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "no (re)subscription");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The next message, waiting up to two seconds.
    async fn next(&self) -> Invalidation {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            {
                let mut m = self.messages.lock().unwrap();
                if !m.is_empty() {
                    return m.remove(0);
                }
            }
            assert!(Instant::now() < deadline, "no invalidation received");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn pending(&self) -> usize {
        self.messages.lock().unwrap().len()
    }
}

/// A new key of `client_id` (the plaintext is not needed here).
fn key(client_id: &str) -> ApiKey {
    ApiKey::builder().client(client_id).build().0
}

fn assert_inv(inv: &Invalidation, ids: &[Uuid], hashes: &[KeyHash]) {
    let got_ids: HashSet<Uuid> = inv.key_ids.iter().copied().collect();
    assert_eq!(got_ids, ids.iter().copied().collect(), "key ids");
    let hex = |h: &KeyHash| hex::encode(h.0);
    let got: HashSet<String> = inv.hashes.iter().map(hex).collect();
    let want: HashSet<String> = hashes.iter().map(hex).collect();
    assert_eq!(got, want, "hashes");
}

#[tokio::test]
async fn every_write_publishes_the_ids_and_all_hashes_it_touched() {
    let redis = RedisServer::start();
    // Writer and watcher reach the same Redis by different URL forms.
    let a = RedisStore::open(&redis.unix_url(), "shared:").unwrap();
    let b = RedisStore::open(&redis.tcp_url(0), "shared:").unwrap();
    let other = RedisStore::open(&redis.unix_url(), "other:").unwrap();
    let seen = Arc::new(Recorder::default());
    let seen_other = Arc::new(Recorder::default());
    b.watch_invalidations(seen.clone());
    other.watch_invalidations(seen_other.clone());
    seen.wait_resyncs(1).await;
    seen_other.wait_resyncs(1).await;

    let k1 = key("acme");
    let h1 = k1.key_hash;
    a.insert_client(&client("acme"), &k1).await.unwrap();
    assert_inv(&seen.next().await, &[k1.id], &[h1]);

    let k2 = key("acme");
    a.insert_key(&k2, 0).await.unwrap();
    assert_inv(&seen.next().await, &[k2.id], &[k2.key_hash]);

    // A patch: the key and its hash.
    let disable = KeyPatch {
        enabled: Some(false),
        ..KeyPatch::default()
    };
    a.patch_key(k1.id, &disable, now_millis()).await.unwrap();
    assert_inv(&seen.next().await, &[k1.id], &[h1]);

    // Rotation with grace: old and new hash.
    let rotation = |h, until| Rotation {
        key_hash: h,
        prefix: "kg_rotatedAB".into(),
        previous_valid_until: until,
        at: now_millis(),
    };
    let h1b = KeyHash::of("rotated once");
    a.rotate_key(k1.id, &rotation(h1b, Some(now_millis() + 60_000)))
        .await
        .unwrap();
    assert_inv(&seen.next().await, &[k1.id], &[h1, h1b]);

    // Rotation without grace: the old current and the old previous hash go too.
    let h1c = KeyHash::of("rotated twice");
    a.rotate_key(k1.id, &rotation(h1c, None)).await.unwrap();
    assert_inv(&seen.next().await, &[k1.id], &[h1, h1b, h1c]);

    // A client patch reaches every key of the client (their license is cached).
    let free = ClientPatch {
        license: Some("free".into()),
        metadata: None,
    };
    a.patch_client("acme", &free).await.unwrap();
    assert_inv(&seen.next().await, &[k1.id, k2.id], &[h1c, k2.key_hash]);

    a.disable_client_keys("acme").await.unwrap();
    assert_inv(&seen.next().await, &[k1.id, k2.id], &[h1c, k2.key_hash]);

    a.delete_key(k2.id).await.unwrap();
    assert_inv(&seen.next().await, &[k2.id], &[k2.key_hash]);

    let k3 = key("acme");
    a.replace_client_keys("acme", &k3).await.unwrap();
    assert_inv(&seen.next().await, &[k1.id, k3.id], &[h1c, k3.key_hash]);

    // Refused and empty writes publish nothing.
    assert!(
        a.insert_client(&client("acme"), &key("acme"))
            .await
            .is_err()
    );
    assert!(a.insert_key(&key("acme"), 1).await.is_err());
    assert!(a.insert_key(&key("nobody"), 0).await.is_err());
    let ghost = key("acme");
    assert!(
        a.patch_key(ghost.id, &disable, now_millis())
            .await
            .unwrap()
            .is_none()
    );
    let unused = KeyHash::of("never used");
    assert!(
        a.rotate_key(ghost.id, &rotation(unused, None))
            .await
            .unwrap()
            .is_none()
    );
    assert!(a.patch_client("nobody", &free).await.unwrap().is_none());
    assert!(a.disable_client_keys("nobody").await.is_err());
    assert!(
        a.replace_client_keys("nobody", &key("nobody"))
            .await
            .is_err()
    );
    assert!(a.delete_key(Uuid::now_v7()).await.unwrap().is_none());
    assert!(a.delete_client("nobody").await.unwrap().is_none());
    a.record_usage(
        UsageWrite::random(),
        &[Usage {
            key_id: k3.id,
            last_used_at: now_millis(),
            day: 1,
            requests: 1,
        }],
    )
    .await
    .unwrap();

    a.delete_client("acme").await.unwrap().unwrap();
    assert_inv(&seen.next().await, &[k3.id], &[k3.key_hash]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(seen.pending(), 0, "unexpected extra messages");

    // Another prefix is another database: no data, no messages.
    assert_eq!(seen_other.pending(), 0);
    a.insert_client(&client("acme"), &key("acme"))
        .await
        .unwrap();
    seen.next().await;
    assert_eq!(other.get_client("acme").await.unwrap(), None);
    assert_eq!(other.list_clients(1, 10).await.unwrap().total, 0);
    assert_eq!(other.list_keys(None, 1, 10).await.unwrap().total, 0);
    assert_eq!(seen_other.pending(), 0);
    redis.assert_no_keyspace_scans();
}

#[tokio::test]
async fn a_lookup_by_hash_is_one_round_trip() {
    let redis = RedisServer::start();
    let s = RedisStore::open(&redis.unix_url(), "keygate:").unwrap();
    let k = key("acme");
    s.insert_client(&client("acme"), &k).await.unwrap();
    // Loads the script once.
    s.find_by_hash(&k.key_hash, now_millis()).await.unwrap();
    let _: () = redis.query(0, ::redis::cmd("CONFIG").arg("RESETSTAT"));
    assert!(
        s.find_by_hash(&k.key_hash, now_millis())
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        s.find_by_hash(&KeyHash::of("unknown"), now_millis())
            .await
            .unwrap()
            .is_none()
    );
    let calls = redis.command_calls();
    assert_eq!(calls.get("evalsha"), Some(&2), "{calls:?}");
    for top_level in ["eval", "script|load", "multi", "exec"] {
        assert_eq!(calls.get(top_level), None, "{calls:?}");
    }
}

/// A shared rate bucket whose `tat` lies further ahead than any write leaves it (Redis's clock
/// stepped back, or a promoted replica's runs behind) is an empty bucket, refilling from now:
/// not one that stays empty for as long as the clock moved (every request 429 meanwhile).
#[tokio::test]
async fn a_cluster_bucket_ahead_of_a_clock_that_stepped_back_refills_from_now() {
    use keygate::keys::cluster::BucketSync;
    let redis = RedisServer::start();
    let s = RedisStore::open(&redis.unix_url(), "keygate:").unwrap();
    // 10 a second, burst 10: full again within a second of being emptied.
    let bucket = BucketSync {
        name: "client:acme:10/s".into(),
        t_us: 100_000.0,
        tau_us: 900_000.0,
        unused: 0,
        demand: 5,
        want: true,
    };
    let first = s
        .sync_rates("instance-a", std::slice::from_ref(&bucket))
        .await
        .unwrap();
    assert_eq!(first.leases[0].cells, 10);
    // As Redis's clock an hour later left it.
    let (secs, micros): (i64, i64) = redis.query(0, &mut ::redis::cmd("TIME"));
    let hour_ahead = (secs + 3_600) * 1_000_000 + micros;
    let _: () = redis.query(
        0,
        ::redis::cmd("SET")
            .arg("keygate:rl:client:acme:10/s")
            .arg(hour_ahead)
            .arg("PX")
            .arg(7_200_000),
    );
    let after = s
        .sync_rates("instance-b", std::slice::from_ref(&bucket))
        .await
        .unwrap();
    assert!(
        after.leases[0].until_full_us <= 1_000_000,
        "empty for longer than its refill: {after:?}"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let later = s
        .sync_rates("instance-b", std::slice::from_ref(&bucket))
        .await
        .unwrap();
    assert!(later.leases[0].cells > 0, "{later:?}");
}

/// The cache's background refreshes look keys up in batches: a batch is one script call per
/// 64 hashes (the calls sent together), not one call per key.
#[tokio::test]
async fn a_batched_lookup_is_one_script_call_per_64_hashes() {
    let redis = RedisServer::start();
    let s = RedisStore::open(&redis.unix_url(), "keygate:").unwrap();
    let k = key("acme");
    s.insert_client(&client("acme"), &k).await.unwrap();
    let mut hashes: Vec<KeyHash> = (0..150)
        .map(|i| KeyHash::of(&format!("unknown {i}")))
        .collect();
    hashes[70] = k.key_hash;
    // Loads the script once.
    s.find_many_by_hash(&hashes[..1], now_millis())
        .await
        .unwrap();
    let _: () = redis.query(0, ::redis::cmd("CONFIG").arg("RESETSTAT"));
    let found = s.find_many_by_hash(&hashes, now_millis()).await.unwrap();
    assert_eq!(found.len(), 150);
    for (i, f) in found.iter().enumerate() {
        assert_eq!(
            f.as_ref().map(|r| r.key.id),
            (i == 70).then_some(k.id),
            "{i}"
        );
    }
    let calls = redis.command_calls();
    // 150 hashes: calls of 64, 64 and 22; each looks every one of its hashes up.
    assert_eq!(calls.get("evalsha"), Some(&3), "{calls:?}");
    assert_eq!(calls.get("get"), Some(&150), "{calls:?}");
    for top_level in ["eval", "script|load", "multi", "exec"] {
        assert_eq!(calls.get(top_level), None, "{calls:?}");
    }
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    let v = f.await;
    (v, t.elapsed())
}

fn assert_unavailable<T: std::fmt::Debug>(r: Result<T, StoreError>, took: Duration) {
    assert!(
        matches!(r, Err(StoreError::Unavailable(_))),
        "expected Unavailable, got {r:?}"
    );
    // The call timeout is 500 ms; the rest is slack for a loaded machine.
    assert!(took < Duration::from_millis(1000), "took {took:?}");
}

#[tokio::test]
async fn dead_or_hung_redis_fails_fast_and_the_store_recovers_by_itself() {
    let mut redis = RedisServer::start();
    let s = RedisStore::open(&redis.unix_url(), "keygate:").unwrap();
    let seen = Arc::new(Recorder::default());
    s.watch_invalidations(seen.clone());
    seen.wait_resyncs(1).await;
    let k = key("acme");
    s.insert_client(&client("acme"), &k).await.unwrap();
    s.ping().await.unwrap();

    // Hung: the process is stopped, connections stay open and nothing answers.
    redis.pause();
    let (r, took) = timed(s.find_by_hash(&k.key_hash, now_millis())).await;
    assert_unavailable(r, took);
    let (r, took) = timed(s.insert_key(&key("acme"), 0)).await;
    assert_unavailable(r, took);
    redis.resume();

    // Dead.
    redis.kill();
    for _ in 0..3 {
        let (r, took) = timed(s.find_by_hash(&k.key_hash, now_millis())).await;
        assert_unavailable(r, took);
        let (r, took) = timed(s.list_keys(None, 1, 10)).await;
        assert_unavailable(r, took);
        let (r, took) = timed(s.ping()).await;
        assert_unavailable(r, took);
        let (r, took) = timed(s.delete_key(k.id)).await;
        assert_unavailable(r, took);
    }

    // Back, with its data (append-only file): the same store object works again.
    let resyncs = seen.resyncs.load(Ordering::SeqCst);
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.ping().await.is_err() {
        assert!(Instant::now() < deadline, "store did not recover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        s.find_by_hash(&k.key_hash, now_millis())
            .await
            .unwrap()
            .is_some()
    );
    // `ping` succeeding includes the resubscription, which cleared the cache.
    assert!(seen.resyncs.load(Ordering::SeqCst) > resyncs);
}

/// A Redis restarted between two calls leaves the store's connection dead; the first read
/// after it is answered all the same (asked again on the new connection), a write is not
/// asked again (it may have run) and fails, and the next call works.
#[tokio::test]
async fn the_first_read_after_a_redis_restart_is_answered() {
    let mut redis = RedisServer::start();
    let s = RedisStore::open(&redis.tcp_url(0), "keygate:").unwrap();
    let k = key("acme");
    s.insert_client(&client("acme"), &k).await.unwrap();
    // The store's connection is up (a ping answered on it), then Redis restarts under it.
    async fn restart(redis: &mut RedisServer, s: &RedisStore) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.ping().await.is_err() {
            assert!(Instant::now() < deadline, "the store did not reconnect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        redis.kill();
        redis.restart();
    }

    // Each read after a restart of its own; every one is checked, then all are reported.
    let mut answered: Vec<(&str, Result<bool, StoreError>)> = Vec::new();
    restart(&mut redis, &s).await;
    let r = s.find_by_hash(&k.key_hash, now_millis()).await;
    answered.push((
        "lookup by hash",
        r.map(|f| f.map(|r| r.key.id) == Some(k.id)),
    ));
    restart(&mut redis, &s).await;
    let r = s
        .find_many_by_hash(std::slice::from_ref(&k.key_hash), now_millis())
        .await;
    answered.push((
        "batched lookup",
        r.map(|f| f.len() == 1 && f[0].as_ref().map(|r| r.key.id) == Some(k.id)),
    ));
    restart(&mut redis, &s).await;
    let r = s.find_by_id(k.id).await;
    answered.push(("lookup by id", r.map(|f| f.map(|r| r.key.id) == Some(k.id))));
    restart(&mut redis, &s).await;
    let r = s.list_keys(Some("acme"), 1, 10).await;
    answered.push(("key listing", r.map(|p| p.items.len() == 1)));
    restart(&mut redis, &s).await;
    let r = s.get_client("acme").await;
    answered.push((
        "client",
        r.map(|c| c.is_some_and(|c| c.client_id == "acme")),
    ));
    restart(&mut redis, &s).await;
    let r = s.signing_keys().await;
    answered.push(("signing keys", r.map(|_| true)));
    let wrong: Vec<_> = answered
        .iter()
        .filter(|(_, r)| !matches!(r, Ok(true)))
        .collect();
    assert!(wrong.is_empty(), "reads after a restart: {wrong:?}");

    // A write is sent once: on the dead connection it fails, and nothing was stored.
    restart(&mut redis, &s).await;
    let second = key("acme");
    let r = s.insert_key(&second, 0).await;
    assert!(
        matches!(r, Err(StoreError::Unavailable(_))),
        "a write on a dropped connection is not sent again: {r:?}"
    );
    assert!(s.find_by_id(second.id).await.unwrap().is_none());
    s.insert_key(&second, 0).await.unwrap();
    assert!(s.find_by_id(second.id).await.unwrap().is_some());
}

#[tokio::test]
async fn a_broken_subscription_reconnects_and_clears_the_cache() {
    let redis = RedisServer::start();
    let writer = RedisStore::open(&redis.unix_url(), "keygate:").unwrap();
    let watcher = RedisStore::open(&redis.unix_url(), "keygate:").unwrap();
    let seen = Arc::new(Recorder::default());
    watcher.watch_invalidations(seen.clone());
    seen.wait_resyncs(1).await;

    // Redis drops the subscriber connection (as after a network blip); Redis itself stays up.
    let killed: i64 = redis.query(
        0,
        ::redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"),
    );
    assert_eq!(killed, 1);
    seen.wait_resyncs(2).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while watcher.ping().await.is_err() {
        assert!(Instant::now() < deadline, "not ready after resubscribing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let k = key("acme");
    writer.insert_client(&client("acme"), &k).await.unwrap();
    assert_inv(&seen.next().await, &[k.id], &[k.key_hash]);
}

/// One HTTP/1.1 exchange on a fresh connection; returns the status and body.
pub(crate) fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// True when `s` holds 64 hex digits in a row (what a logged key hash would look like).
pub(crate) fn has_hex_run(s: &str) -> bool {
    let mut run = 0;
    for c in s.chars() {
        run = if c.is_ascii_hexdigit() { run + 1 } else { 0 };
        if run >= 64 {
            return true;
        }
    }
    false
}

#[test]
fn the_binary_on_redis_warns_about_aof_and_eviction_and_logs_no_password_key_or_hash() {
    const PASSWORD: &str = "s3cr3t-redis-pw";
    let redis = RedisServer::start();
    let _: () = redis.query(
        0,
        ::redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("allkeys-lru"),
    );
    let _: () = redis.query(
        0,
        ::redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendonly")
            .arg("no"),
    );
    let _: () = redis.query(
        0,
        ::redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg(PASSWORD),
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
    .arg(format!("redis://:{PASSWORD}@127.0.0.1:{}/0", redis.port()))
    .env("KEYGATE_ADMIN_KEY", "an-admin-key-of-decent-length")
    .env("KEYGATE_JWT_SECRET", "a-token-secret-of-at-least-32-bytes")
    .json_logs()
    .env("KEYGATE_LOG_LEVEL", "debug")
    .current_dir(dir.path())
    .spawn();
    let (admin, proxy) = (p.admin.to_string(), p.proxy.to_string());
    // Each line waited for is a JSON log line.
    let wait_for = |needle: &str| -> serde_json::Value {
        let line = p.wait_for_line(needle, Duration::from_secs(20));
        serde_json::from_str(&line).expect("JSON log line")
    };
    wait_for("appendonly");
    wait_for("maxmemory-policy allkeys-lru");

    // A client and its key, one lookup through the proxy (the upstream is down: 502), and the
    // invalidation that the write published, received back by this instance.
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
    wait_for("invalidation received");
    let (status, _) = http(
        &proxy,
        "GET",
        "/",
        &[("authorization", &format!("Bearer {key}"))],
        "",
    );
    assert_eq!(status, 502);

    assert!(p.terminate().success());

    let all = p.lines().join("\n");
    assert!(all.contains("using the Redis store"), "{all}");
    assert!(all.contains("lag_ms"), "{all}");
    assert!(
        !all.contains(PASSWORD),
        "the Redis password was logged:\n{all}"
    );
    assert!(!all.contains(&key), "a key was logged:\n{all}");
    assert!(
        !has_hex_run(&all),
        "something like a key hash was logged:\n{all}"
    );
}

/// Redis's `used_memory`, in bytes.
fn used_memory(redis: &RedisServer) -> u64 {
    let info: String = redis.query(0, redis::cmd("INFO").arg("memory"));
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO memory")
}

/// Leaves Redis `room` bytes above what it uses now: a script that finds it using more is
/// refused before it writes (OOM, `noeviction`).
fn leave_room(redis: &RedisServer, room: u64) {
    let max = used_memory(redis) + room;
    let _: () = redis.query(0, redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(max));
}

/// An import is written in scripts of 250 keys. One the store fails partway through (here:
/// Redis out of memory after a script or two) leaves nothing behind when it is atomic — the
/// keys written before are deleted again and the call fails as any call the store fails —
/// and, when it is not, keeps what was written and answers the rest as not confirmed.
#[tokio::test]
async fn an_import_the_store_fails_partway_is_undone_when_atomic_and_told_when_not() {
    use keygate::keys::store::import::Refusal;
    let redis = RedisServer::start();
    let s = RedisStore::open(&redis.unix_url(), "keygate:").unwrap();
    s.insert_client(&client("acme"), &key("acme"))
        .await
        .unwrap();
    s.insert_client(&client("warm"), &key("warm"))
        .await
        .unwrap();
    // What the keys of one script of 250 take (each with its event), measured between two
    // such imports, so that Redis's buffer for the script's arguments is there both times.
    let mut used = Vec::new();
    for _ in 0..2 {
        let warm: Vec<ApiKey> = (0..250).map(|_| key("warm")).collect();
        assert!(s.import_keys(warm, 0, false).await.unwrap().is_empty());
        used.push(used_memory(&redis));
    }
    let chunk = used[1] - used[0];

    let keys: Vec<ApiKey> = (0..2_000).map(|_| key("acme")).collect();
    let gone = |keys: &[ApiKey]| {
        let (s, keys) = (&s, keys.to_vec());
        async move {
            for k in keys {
                assert!(
                    s.find_by_id(k.id).await.unwrap().is_none(),
                    "{} stands",
                    k.id
                );
                assert!(
                    s.find_by_hash(&k.key_hash, now_millis())
                        .await
                        .unwrap()
                        .is_none()
                );
            }
        }
    };
    // Room for one script's keys and a half: the first goes through, a later one is refused.
    leave_room(&redis, chunk * 3 / 2);
    let _: () = redis.query(0, redis::cmd("CONFIG").arg("RESETSTAT"));
    let r = s.import_keys(keys.clone(), 0, true).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    // Keys were written, and deleted again.
    assert!(redis.command_calls().get("del").is_some_and(|&n| n >= 250));
    gone(&keys).await;

    leave_room(&redis, chunk * 3 / 2);
    let refused = s.import_keys(keys.clone(), 0, false).await.unwrap();
    let _: () = redis.query(0, redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0));
    let from = refused.first().expect("the store failed partway").0;
    assert!(from >= 250 && from % 250 == 0, "refused from {from}");
    assert_eq!(
        refused,
        (from..2_000)
            .map(|i| (i, Refusal::Unconfirmed))
            .collect::<Vec<_>>()
    );
    for k in &keys[..from] {
        assert_eq!(s.find_by_id(k.id).await.unwrap().unwrap().key.id, k.id);
    }
    gone(&keys[from..]).await;
}

/// `/readyz` reports a lost invalidation subscription (503) while Redis itself answers; the
/// probe's failure does not put key lookups into the store back-off: a key not in the cache is
/// still looked up in Redis and accepted (it was 503 for a second after each probe).
#[tokio::test]
async fn a_lost_subscription_fails_readiness_not_the_lookups() {
    use crate::support::{Gateway, Upstream};
    let redis = RedisServer::start();
    let gw = Gateway::start_on_store(
        Upstream::start().await,
        &format!("url = \"{}\"", redis.tcp_url(0)),
        "",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.admin_as("GET", "/readyz", None, &[]).await.status != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (key, _) = gw.client("acme", "pro").await;
    // The subscription is dropped and may not come back: no channel is allowed any more.
    let _: () = redis.query(
        0,
        ::redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("resetchannels"),
    );
    let _: i64 = redis.query(
        0,
        ::redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.admin_as("GET", "/readyz", None, &[]).await.status != 503 {
        assert!(
            Instant::now() < deadline,
            "still ready without a subscription"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Right after the failed probe, a key never seen by this instance is looked up.
    assert_eq!(gw.admin_as("GET", "/readyz", None, &[]).await.status, 503);
    assert_eq!(gw.get_with_key("/x", &key).await.status, 200);
    gw.stop().await;
}

/// A usage write whose answer is lost (Redis hung after it was sent: the call fails, the
/// script runs once Redis goes on) is applied once when the flush sends it again under its
/// name; another chunk of the flush, or another flush, is another write.
#[tokio::test]
async fn a_usage_write_sent_again_after_its_answer_was_lost_counts_once() {
    let redis = RedisServer::start();
    let s = RedisStore::open(&redis.unix_url(), "keygate:").unwrap();
    let k = key("acme");
    s.insert_client(&client("acme"), &k).await.unwrap();
    let day = now_millis().div_euclid(86_400_000);
    let usage = |requests| Usage {
        key_id: k.id,
        last_used_at: now_millis(),
        day,
        requests,
    };
    // Redis knows the script (else the call would send EVALSHA, get NOSCRIPT, and load it).
    let other = key("acme");
    s.insert_key(&other, 0).await.unwrap();
    s.record_usage(
        UsageWrite::random(),
        &[Usage {
            key_id: other.id,
            ..usage(1)
        }],
    )
    .await
    .unwrap();
    let w = UsageWrite::random();
    redis.pause();
    let r = s.record_usage(w, &[usage(5)]).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    redis.resume();
    // The write was sent: it runs now, answered to nobody.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.usage(k.id, day, day).await.ok() != Some(vec![(day, 5)]) {
        assert!(Instant::now() < deadline, "the sent write never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Sent again by the next flush: applied once.
    s.record_usage(w, &[usage(5)]).await.unwrap();
    assert_eq!(s.usage(k.id, day, day).await.unwrap(), vec![(day, 5)]);
    s.record_usage(UsageWrite { chunk: 1, ..w }, &[usage(2)])
        .await
        .unwrap();
    s.record_usage(UsageWrite::random(), &[usage(3)])
        .await
        .unwrap();
    assert_eq!(s.usage(k.id, day, day).await.unwrap(), vec![(day, 10)]);
    // The marks expire: a day.
    let ttl: i64 = redis.query(
        0,
        redis::cmd("TTL").arg(format!("keygate:flushed:{}", w.flush)),
    );
    assert!((86_000..=86_400).contains(&ttl), "{ttl}");
}
