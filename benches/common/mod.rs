//! Fixtures shared by the benches: the real SQLite store in a temp dir, seeded with clients and
//! keys, an `Authenticator` built the way `App::bind` builds it, and a real `redis-server`.

#![allow(dead_code)] // each bench uses a different part of this module

use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use keygate::auth::Authenticator;
use keygate::auth::jwt::{Jwt, JwtSettings};
use keygate::clock::Clock;
use keygate::keys::cache::{CacheSettings, KeyCache};
use keygate::keys::store::Store;
use keygate::keys::store::sqlite::SqliteStore;
use keygate::keys::testing::client;
use keygate::keys::{ApiKey, KeyFormat, RateLimit, Secret};
use keygate::limit::KeyLimits;

/// A limit no bench loop can reach: every check is allowed.
pub const UNLIMITED: RateLimit = RateLimit {
    per_second: Some(1_000_000_000),
    per_minute: None,
    per_hour: None,
    burst: 1_000_000,
};

pub const JWT_SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

/// A current-thread runtime with I/O and timers, as keygate runs with one worker.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Polls a future that must complete without waiting (a cache hit never awaits).
pub fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the future waited: not a cache hit"),
    }
}

/// The real SQLite store in `dir`, holding `n` clients with one key each (license `pro`).
/// Returns the plaintext keys in insertion order.
pub async fn seeded_store(dir: &std::path::Path, n: usize) -> (Arc<SqliteStore>, Vec<Secret>) {
    let store = Arc::new(SqliteStore::open(&dir.join("bench.db")).expect("store opens"));
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let client = client(&format!("client-{i}"));
        let (key, new) = ApiKey::builder()
            .client(&client.client_id)
            .name("bench")
            .permissions(&["read", "write"])
            .build();
        store.insert_client(&client, &key).await.expect("insert");
        keys.push(new.plaintext);
    }
    (store, keys)
}

/// A key cache on the real clock, as `App::bind` makes it.
pub fn cache(capacity: u64) -> KeyCache {
    KeyCache::new(
        &CacheSettings {
            capacity,
            ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(300),
        },
        Clock::real(),
    )
}

pub fn jwt() -> Arc<Jwt> {
    Arc::new(Jwt::new(&JwtSettings {
        secret: Secret(JWT_SECRET.into()),
        issuer: "keygate".into(),
        audience: None,
        ttl: Duration::from_secs(900),
        leeway: Duration::from_secs(30),
    }))
}

/// An authenticator over `store` whose keys are never rate limited, on the cache's clock.
pub fn authenticator(store: Arc<SqliteStore>, cache: KeyCache) -> Authenticator {
    let limits = Arc::new(KeyLimits::new(
        UNLIMITED,
        [("pro".to_string(), Some(UNLIMITED))].into(),
        cache.clock().clone(),
    ));
    let store: Arc<dyn Store> = store;
    Authenticator::new(
        KeyFormat::new("kg_"),
        cache,
        store,
        limits,
        jwt(),
        Arc::new(keygate::telemetry::metrics::Metrics::new(vec![])),
        Arc::new(keygate::keys::store::StoreHealth::default()),
    )
}

/// A redis-server on a free loopback port (no persistence), killed on drop.
pub struct Redis(Child, u16);

impl Redis {
    pub fn start(dir: &std::path::Path) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "redis-server");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis(child, port)
    }

    /// `redis://` for database `db`.
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.1)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
