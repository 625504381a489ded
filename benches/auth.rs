//! The per-request auth work for a cached key, whole and piece by piece, and the token path.
//!
//! `auth_check_cache_hit/*` is what a proxied request pays between "headers parsed" and
//! "allowed to forward": credential extraction from the `HeaderMap`, shape check (the alphabet
//! and checksum are checked only for keys the cache does not know), SHA-256, cache hit, status
//! checks and the key's rate-limit bucket. Target ≤ 250 ns. `x_api_key_fast_path` is the same
//! work as the HTTP/1.1 fast path does it: the credential from the value the head parser
//! located (no `HeaderMap`).
//!
//! `cache_refresh/keys_10k` is the work of the background refreshes when every cached key
//! goes stale at once, until the last answer is cached. Its wall time includes the refresh
//! task's gather window (20 ms) for the batches that are not full: the last one, and the first
//! when the task starts it before all keys are queued.
//!
//! Run: `cargo bench --bench auth` (pin with `taskset -c 0` on a quiet machine).

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use keygate::auth::credential::{Extractor, header_text};
use keygate::clock::Clock;
use keygate::keys::cache::{Cached, Entry};
use keygate::keys::store::Store;
use keygate::keys::usage::UsageRecorder;
use keygate::keys::{KeyFormat, KeyHash};
use keygate::limit::KeyLimiter;
use keygate::telemetry::metrics::Metrics;

use common::{UNLIMITED, ready};

/// Keys in the store and the cache, so lookups are not into a tiny table.
const KEYS: usize = 10_000;

fn extractor() -> Extractor {
    Extractor {
        api_key_header: HeaderName::from_static("x-api-key"),
        query_param: None,
    }
}

/// A request head like wrk's plus a credential header.
fn headers(name: &'static str, value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("127.0.0.1:8080"));
    h.insert("user-agent", HeaderValue::from_static("wrk"));
    h.insert("accept", HeaderValue::from_static("*/*"));
    h.insert(name, HeaderValue::from_str(value).unwrap());
    h
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (store, keys) = rt.block_on(common::seeded_store(dir.path(), KEYS));
    let cache = common::cache(1_000_000);
    let auth = common::authenticator(Arc::clone(&store), cache.clone());
    // Warm the cache: every key is a hit from now on.
    rt.block_on(async {
        for k in &keys {
            auth.api_key(k.expose()).await.expect("seeded key");
        }
    });
    let key = keys[KEYS / 2].expose().to_owned();
    let token = rt
        .block_on(auth.login(&key))
        .unwrap()
        .access_token
        .expose()
        .to_owned();
    // Fill the by-id cache the token path uses.
    rt.block_on(auth.token(&token)).expect("token accepted");
    let ex = extractor();
    let h_header = headers("x-api-key", &key);
    let h_bearer = headers("authorization", &format!("Bearer {key}"));
    let h_token = headers("authorization", &format!("Bearer {token}"));

    let mut g = c.benchmark_group("auth_check_cache_hit");
    // The whole hot path: HeaderMap → credential → principal → bucket.
    for (name, h) in [("x_api_key", &h_header), ("bearer", &h_bearer)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let cred = ex.extract(black_box(h), None).unwrap();
                let p = ready(auth.authenticate(&cred)).unwrap();
                black_box(p.limiter.check().unwrap())
            })
        });
    }
    let raw_value = key.as_bytes().to_vec();
    g.bench_function("x_api_key_fast_path", |b| {
        b.iter(|| {
            let value = header_text(black_box(&raw_value));
            let cred = ex.extract_from(None, value, None).unwrap();
            let p = ready(auth.authenticate(&cred)).unwrap();
            black_box(p.limiter.check().unwrap())
        })
    });
    // Rotating over all cached keys (the loadtest's rot64 case): cache lines are cold.
    let rotating: Vec<HeaderMap> = keys
        .iter()
        .map(|k| headers("x-api-key", k.expose()))
        .collect();
    g.bench_function("x_api_key_rotating_10k", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % rotating.len();
            let cred = ex.extract(black_box(&rotating[i]), None).unwrap();
            let p = ready(auth.authenticate(&cred)).unwrap();
            black_box(p.limiter.check().unwrap())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("auth_piece");
    g.bench_function("extract_x_api_key", |b| {
        b.iter(|| black_box(ex.extract(black_box(&h_header), None).unwrap().kind))
    });
    g.bench_function("extract_bearer", |b| {
        b.iter(|| black_box(ex.extract(black_box(&h_bearer), None).unwrap().kind))
    });
    // A bearer JWT (a few hundred bytes: told apart from a key by its two dots).
    g.bench_function("extract_jwt", |b| {
        b.iter(|| black_box(ex.extract(black_box(&h_token), None).unwrap().kind))
    });
    let format = KeyFormat::new("kg_");
    g.bench_function("key_format_check", |b| {
        b.iter(|| format.check(black_box(&key)))
    });
    g.bench_function("key_hash_of", |b| b.iter(|| KeyHash::of(black_box(&key))));
    let hash = KeyHash::of(&key);
    g.bench_function("key_cache_get", |b| {
        b.iter(|| match cache.get(black_box(&hash)) {
            Some(Entry {
                value: Cached::Found(p),
                ..
            }) => p,
            _ => unreachable!("warm"),
        })
    });
    let limiter = KeyLimiter::new(UNLIMITED, cache.clock().clone());
    g.bench_function("key_limiter_check", |b| {
        b.iter(|| black_box(limiter.check().unwrap()))
    });
    let clock = Clock::real();
    g.bench_function("now_millis", |b| b.iter(|| clock.now_millis()));
    g.bench_function("mono_nanos", |b| b.iter(|| clock.mono_nanos()));
    g.bench_function("now_millis_system_time", |b| {
        b.iter(keygate::clock::system_millis)
    });
    g.bench_function("api_key_cached", |b| {
        b.iter(|| ready(auth.api_key(black_box(&key))).unwrap())
    });
    // A request's usage count and last use (on the cached principal), for one key used many
    // times a millisecond.
    let usage = UsageRecorder::new(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::new(Metrics::new(vec![])),
        cache.clock().clone(),
    );
    let principal = ready(auth.api_key(&key)).unwrap();
    g.bench_function("usage_touch", |b| {
        b.iter(|| usage.touch(black_box(&principal)))
    });
    g.finish();

    // The periodic usage flush after every one of the 10,000 keys was used: what it costs the
    // store (SQLite, in chunks one after another, unpaced), which shares the proxy's core.
    let principals: Vec<_> = keys
        .iter()
        .map(|k| ready(auth.api_key(k.expose())).unwrap())
        .collect();
    let mut g = c.benchmark_group("usage_flush");
    g.sample_size(10);
    g.bench_function("keys_10k", |b| {
        b.iter_batched(
            || principals.iter().for_each(|p| usage.touch(p)),
            |()| assert_eq!(rt.block_on(usage.flush()), KEYS),
            BatchSize::PerIteration,
        )
    });
    g.finish();

    // The background refreshes when all 10,000 cached keys go stale at once (keys cached
    // together go stale together): from the first stale request to the last answer cached.
    // Every request is served stale at once; what is measured is the work the refreshes put on
    // the cores (the store on its threads, the runtime's tasks).
    let stale_clock = keygate::clock::FakeClock::new();
    let stale_cache = keygate::keys::cache::KeyCache::new(
        &keygate::keys::cache::CacheSettings {
            capacity: 1_000_000,
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(300),
        },
        stale_clock.clock(),
    );
    let stale_auth = common::authenticator(Arc::clone(&store), stale_cache.clone());
    let hashes: Vec<KeyHash> = keys.iter().map(|k| KeyHash::of(k.expose())).collect();
    rt.block_on(async {
        for k in &keys {
            stale_auth.api_key(k.expose()).await.expect("seeded key");
        }
    });
    let mut g = c.benchmark_group("cache_refresh");
    g.sample_size(10);
    g.bench_function("keys_10k", |b| {
        b.iter_batched(
            // Past every key's TTL (60 s, less up to a tenth), within the revalidate window.
            || stale_clock.advance(Duration::from_millis(60_001)),
            |()| {
                let _runtime = rt.enter();
                for k in &keys {
                    ready(stale_auth.api_key(k.expose())).expect("served stale");
                }
                let now = stale_clock.now_millis();
                for h in &hashes {
                    while stale_cache.get(h).is_none_or(|e| e.fresh_until <= now) {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("token");
    g.bench_function("authenticate_cached_key", |b| {
        b.iter(|| ready(auth.token(black_box(&token))).unwrap())
    });
    g.bench_function("whole_hot_path", |b| {
        b.iter(|| {
            let cred = ex.extract(black_box(&h_token), None).unwrap();
            let p = ready(auth.authenticate(&cred)).unwrap();
            black_box(p.limiter.check().unwrap())
        })
    });
    let jwt = common::jwt();
    g.bench_function("jwt_verify_signature_and_claims", |b| {
        b.iter(|| jwt.verify(black_box(&token), clock.now_millis()).unwrap())
    });
    // A token never seen before (first request with a fresh token).
    g.bench_function("authenticate_first_use", |b| {
        b.iter_batched(
            || {
                rt.block_on(auth.login(&key))
                    .unwrap()
                    .access_token
                    .expose()
                    .to_owned()
            },
            |t| ready(auth.token(&t)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    drop(rt);
}

criterion_group! {
    name = auth;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(auth);
