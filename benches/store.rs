//! Store calls made off the request path, against a real `redis-server`:
//!
//! - `redis_lookup_256/batched` vs `redis_lookup_256/one_call_each`: the lookup of 256 cached
//!   keys gone stale together (the cache's background refreshes, `Store::find_many_by_hash`), as
//!   the Redis store makes it (one script call per 64 keys, the calls sent together) and as one
//!   lookup script per key, all sent at once (the trait's default).
//!
//! Needs `redis-server` on the PATH. Run: `cargo bench --bench store`.

mod common;

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keygate::keys::store::Store;
use keygate::keys::store::redis::RedisStore;
use keygate::keys::testing::client;
use keygate::keys::{ApiKey, KeyHash, now_millis};

/// Keys per lookup: one batch of the cache's background refreshes at its largest.
const BATCH: usize = 256;

fn benches(c: &mut Criterion) {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let redis = common::Redis::start(dir.path());
    let url = redis.url(0);
    let store = rt.block_on(async {
        let store = RedisStore::open(&url, "bench:").expect("store opens");
        for i in 0..BATCH {
            let client = client(&format!("client-{i}"));
            let (key, _) = ApiKey::builder()
                .client(&client.client_id)
                .name("bench")
                .build();
            store.insert_client(&client, &key).await.expect("insert");
        }
        store
    });
    let hashes: Vec<KeyHash> = rt.block_on(async {
        let page = store.list_keys(None, 1, BATCH as u32).await.unwrap();
        page.items.iter().map(|k| k.key_hash).collect()
    });
    assert_eq!(hashes.len(), BATCH);

    let mut g = c.benchmark_group("redis_lookup_256");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.bench_function("batched", |b| {
        b.iter(|| {
            let found = rt
                .block_on(store.find_many_by_hash(&hashes, now_millis()))
                .unwrap();
            assert!(found.iter().all(Option::is_some));
        })
    });
    g.bench_function("one_call_each", |b| {
        b.iter(|| {
            let now = now_millis();
            let found = rt
                .block_on(futures_util::future::try_join_all(
                    hashes.iter().map(|h| store.find_by_hash(h, now)),
                ))
                .unwrap();
            assert!(found.iter().all(Option::is_some));
        })
    });
    g.finish();
}

criterion_group!(store_benches, benches);
criterion_main!(store_benches);
