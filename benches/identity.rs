//! Signed identity on the request path: the assertion an admitted request gets when signing is
//! on — a cache hit (the common case: a lookup per (key, route) and a `HeaderValue` clone) —
//! beside what a miss costs (signing a JWS, EdDSA and ES256), which the cache keeps off the
//! request path.
//!
//! Run: `cargo bench --bench identity`.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keygate::clock::Clock;
use keygate::identity::material::{Alg, Material};
use keygate::identity::{Identity, IdentityConfig};
use keygate::keys::store::Store;
use keygate::keys::store::sqlite::SqliteStore;
use keygate::keys::{ApiKey, Principal};
use keygate::limit::KeyLimiter;

const KEYS: usize = 10_000;

fn principal(i: usize) -> Arc<Principal> {
    let (record, new) = ApiKey::builder()
        .client(format!("client-{i}"))
        .name("bench")
        .permissions(&["read", "write"])
        .record("pro");
    Principal::from_record(
        &record,
        &new.hash,
        Arc::new(KeyLimiter::new(common::UNLIMITED, Clock::real())),
    )
}

fn identity(alg: Alg, dir: &std::path::Path) -> Arc<Identity> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("k.db")).unwrap());
    let cfg = IdentityConfig {
        sign: true,
        algorithm: alg,
        ttl: Duration::from_secs(60),
        issuer: "keygate".into(),
        publish_ahead: Duration::from_secs(3600),
        overlap: Duration::from_secs(7 * 24 * 3600),
        signing_key_file: None,
    };
    let id = Identity::new(
        cfg,
        vec!["http://127.0.0.1:9000".into()],
        store,
        Clock::real(),
    )
    .unwrap()
    .unwrap();
    common::runtime().block_on(id.load()).unwrap();
    id
}

fn assertions(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let id = identity(Alg::EdDSA, dir.path());
    let principals: Vec<Arc<Principal>> = (0..KEYS).map(principal).collect();
    for p in &principals {
        assert!(id.assertion(0, p).is_some());
    }
    let mut g = c.benchmark_group("identity");
    g.bench_function("assertion_cached_one_key", |b| {
        b.iter(|| id.assertion(0, black_box(&principals[0])))
    });
    let mut i = 0;
    g.bench_function("assertion_cached_rotating_10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            id.assertion(0, black_box(&principals[i]))
        })
    });
    for alg in [Alg::EdDSA, Alg::ES256] {
        let m = Material::generate(alg);
        let mut h = jsonwebtoken::Header::new(alg.jwt());
        h.kid = Some(m.kid.clone());
        let claims = serde_json::json!({
            "iss": "keygate", "sub": "client-1", "aud": "http://127.0.0.1:9000",
            "key_id": "0190a0b0-0000-7000-8000-000000000000", "permissions": ["read", "write"],
            "license": "pro", "iat": 1_800_000_000, "exp": 1_800_000_060,
            "jti": "0190a0b0-0000-7000-8000-000000000001",
        });
        g.bench_function(format!("sign_miss_{}", alg.name()), |b| {
            b.iter(|| jsonwebtoken::encode(&h, black_box(&claims), &m.encoding).unwrap())
        });
    }
    g.finish();
}

criterion_group! {
    name = identity_benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = assertions
}
criterion_main!(identity_benches);
