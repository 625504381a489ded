//! What limits cost on the request path, end to end and in-process as in `benches/proxy.rs`: a
//! hyper client on one keep-alive connection → keygate → an upstream answering `ok\n`, on one
//! current-thread runtime over loopback. Each pair differs in one thing only:
//!
//! - `sqlite_plain` vs `sqlite_credits`: a key without credits (no store call) and one with
//!   credits (one SQLite transaction per request);
//! - `redis_local` vs `redis_cluster`: the same key on the Redis store with
//!   `[rate_limit] mode = "local"` and `"cluster"` (a cell of a lease per request, synced every
//!   50 ms in the background);
//! - `redis_credits`: a key with credits on Redis (one script call per request).
//!
//! Needs `redis-server` on the PATH. Run: `cargo bench --bench limits`.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use keygate::config::{CliOverrides, Config};
use tokio::net::{TcpListener, TcpStream};

const ADMIN_KEY: &str = "bench-admin-key-0123456789abcdef";
const JWT_SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn connect<B>(addr: SocketAddr) -> SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// An admin call; answers the JSON body.
async fn admin(addr: SocketAddr, method: &str, path: &str, body: &str) -> serde_json::Value {
    let mut send = connect::<Full<Bytes>>(addr).await;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("x-admin-key", ADMIN_KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert!(
        res.status().is_success(),
        "{method} {path}: {}",
        res.status()
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

async fn round_trip(send: &mut SendRequest<Empty<Bytes>>, key: &str) {
    let req = Request::get("/bench")
        .header("host", "127.0.0.1")
        .header("x-api-key", key)
        .body(Empty::new())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let _ = res.into_body().collect().await.unwrap();
}

/// A gateway on `store` (a `[store]` url) with `extra` config; answers its proxy address and
/// two keys of one client: without credits, and with more credits than any run spends.
async fn gateway(up: SocketAddr, store: &str, extra: &str) -> (SocketAddr, String, String) {
    let text = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "http://{up}"
[admin]
listen = "127.0.0.1:0"
keys = ["{ADMIN_KEY}"]
[store]
url = "{store}"
[plans.pro]
rate_limit = {{ per_second = 1000000000, burst = 1000000 }}
[jwt]
secret = "{JWT_SECRET}"
[log]
access_log = false
{extra}
"#
    );
    let config = Config::from_toml(
        &text,
        "bench",
        &std::collections::HashMap::new(),
        &CliOverrides::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let app = keygate::App::bind(config).await.unwrap();
    let (proxy, adm) = (app.proxy_addr(), app.admin_addr());
    tokio::spawn(app.run(std::future::pending()));
    let client_id = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let v = admin(
        adm,
        "POST",
        "/v1/clients",
        &format!(r#"{{"client_id":"{client_id}","license":"pro"}}"#),
    )
    .await;
    let plain = v["api_key"]["key"].as_str().unwrap().to_owned();
    let v = admin(
        adm,
        "POST",
        "/v1/api-keys",
        &format!(
            r#"{{"client_id":"{client_id}","name":"credited","credits":{{"remaining":1000000000000000}}}}"#
        ),
    )
    .await;
    (proxy, plain, v["key"].as_str().unwrap().to_owned())
}

fn limits(c: &mut Criterion) {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let redis = common::Redis::start(dir.path());
    let redis_url = redis.url(0);
    let sqlite_url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let cases = rt.block_on(async {
        let up = upstream().await;
        let (sq, sq_plain, sq_credits) = gateway(up, &sqlite_url, "").await;
        let (rl, rl_plain, rl_credits) = gateway(up, &redis_url, "").await;
        let (rc, rc_plain, _) = gateway(up, &redis_url, "[rate_limit]\nmode = \"cluster\"\n").await;
        vec![
            ("sqlite_plain", sq, sq_plain),
            ("sqlite_credits", sq, sq_credits),
            ("redis_local", rl, rl_plain),
            ("redis_cluster", rc, rc_plain),
            ("redis_credits", rl, rl_credits),
        ]
    });
    let mut g = c.benchmark_group("limits");
    for (name, addr, key) in cases {
        let mut send = rt.block_on(connect::<Empty<Bytes>>(addr));
        // Fills the cache (and, in cluster mode, the first lease).
        rt.block_on(round_trip(&mut send, &key));
        g.bench_function(name, |b| {
            b.iter_custom(|n| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..n {
                        round_trip(&mut send, &key).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
    drop(redis);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = limits
}
criterion_main!(benches);
