//! The request path end to end, in-process: a hyper client on one keep-alive connection →
//! keygate (real SQLite store in a temp dir, warm cache) → an upstream answering `ok\n`, all on
//! one current-thread runtime over loopback. The time per iteration is the CPU of the whole
//! round trip (client + gateway + upstream + kernel); `direct_upstream` is the same client
//! straight to the upstream, so the difference is what the gateway adds.
//!
//! `keygate_api_key` and `keygate_jwt` take the HTTP/1.1 fast path (`proxy::h1`);
//! `keygate_api_key_hyper_path` is the same request over HTTP/2 with prior knowledge (h2c) on
//! one connection, so it runs the hyper engine through the same policy core and upstream client
//! (a connection handed over from HTTP/1.1 serves one request only, so h2c is how one connection
//! stays on hyper).
//!
//! `keygate_h2_10_streams` is ten such requests at once on that connection (an iteration ends
//! when all ten are answered): the shape of the h2load runs of `scripts/loadtest.sh`, where many
//! streams are in flight and their allocations overflow the allocator's per-size caches.
//!
//! `keygate_verify` is a forward-auth verify request on the fast path (`X-Original-Method` /
//! `-URI` and the key, answered 200 with the identity; no upstream exchange): the round trip an
//! edge proxy's subrequest costs, client included.
//!
//! Run: `cargo bench --bench proxy`.

mod common;

use std::collections::HashMap;
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

/// The upstream of the loadtest, in-process: `200 ok\n`, keep-alive.
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

async fn connect(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn connect_h2(addr: SocketAddr) -> H2Send {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

type H2Send = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

fn request(header: (&str, &str)) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri("http://127.0.0.1/bench")
        .header(header.0, header.1)
        .body(Empty::new())
        .unwrap()
}

async fn check(res: Response<Incoming>) {
    assert!(res.status().is_success(), "status {}", res.status());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok\n");
}

async fn round_trip(send: &mut SendRequest<Empty<Bytes>>, header: (&str, &str)) {
    send.ready().await.unwrap();
    let mut req = request(header);
    *req.uri_mut() = "/bench".parse().unwrap();
    req.headers_mut()
        .insert("host", http::HeaderValue::from_static("127.0.0.1"));
    check(send.send_request(req).await.unwrap()).await;
}

async fn round_trip_h2(send: &mut H2Send, header: (&str, &str)) {
    send.ready().await.unwrap();
    check(send.send_request(request(header)).await.unwrap()).await;
}

async fn verify_round_trip(send: &mut SendRequest<Empty<Bytes>>, key: &str) {
    send.ready().await.unwrap();
    let req = Request::get("/_keygate/verify")
        .header("host", "127.0.0.1")
        .header("x-original-method", "GET")
        .header("x-original-uri", "/bench")
        .header("x-api-key", key)
        .body(Empty::new())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-keygate-client-id"));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty());
}

/// `n` sequential round trips on one connection, timed inside the runtime.
fn timed(
    rt: &tokio::runtime::Runtime,
    n: u64,
    send: &mut SendRequest<Empty<Bytes>>,
    header: (&str, &str),
) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..n {
            round_trip(send, header).await;
        }
        start.elapsed()
    })
}

fn end_to_end(c: &mut Criterion) {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let (gateway, up, key) = rt.block_on(async {
        let up = upstream().await;
        let (store, keys) = common::seeded_store(dir.path(), 1).await;
        let text = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "http://{up}"
[admin]
listen = "127.0.0.1:0"
keys = ["{ADMIN_KEY}"]
[store]
url = "sqlite://{db}"
[rate_limit]
default = {{ per_second = 1000000000, burst = 1000000 }}
[plans.pro]
rate_limit = {{ per_second = 1000000000, burst = 1000000 }}
[jwt]
secret = "{secret}"
[log]
access_log = false
[forward_auth]
enabled = true
"#,
            db = dir.path().join("bench.db").display(),
            secret = common::JWT_SECRET,
        );
        let config = Config::from_toml(&text, "bench", &HashMap::new(), &CliOverrides::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let app = keygate::App::bind_with_store(config, store).await.unwrap();
        let addr = app.proxy_addr();
        tokio::spawn(app.run(std::future::pending()));
        (addr, up, keys[0].expose().to_owned())
    });
    let token = rt.block_on(async {
        let stream = TcpStream::connect(gateway).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::post("/auth/login")
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::from(format!(r#"{{"api_key":"{key}"}}"#))))
            .unwrap();
        let res = send.send_request(req).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["access_token"].as_str().unwrap().to_owned()
    });
    let bearer = format!("Bearer {token}");

    let mut g = c.benchmark_group("end_to_end");
    let mut direct = rt.block_on(connect(up));
    g.bench_function("direct_upstream", |b| {
        b.iter_custom(|n| timed(&rt, n, &mut direct, ("x-api-key", &key)))
    });
    let mut via = rt.block_on(connect(gateway));
    // First request fills the cache.
    rt.block_on(round_trip(&mut via, ("x-api-key", &key)));
    g.bench_function("keygate_api_key", |b| {
        b.iter_custom(|n| timed(&rt, n, &mut via, ("x-api-key", &key)))
    });
    rt.block_on(round_trip(&mut via, ("authorization", &bearer)));
    g.bench_function("keygate_jwt", |b| {
        b.iter_custom(|n| timed(&rt, n, &mut via, ("authorization", &bearer)))
    });
    rt.block_on(verify_round_trip(&mut via, &key));
    g.bench_function("keygate_verify", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..n {
                    verify_round_trip(&mut via, &key).await;
                }
                start.elapsed()
            })
        })
    });
    let mut h2 = rt.block_on(connect_h2(gateway));
    rt.block_on(round_trip_h2(&mut h2, ("x-api-key", &key)));
    g.bench_function("keygate_api_key_hyper_path", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..n {
                    round_trip_h2(&mut h2, ("x-api-key", &key)).await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("keygate_h2_10_streams", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..n {
                    h2.ready().await.unwrap();
                    let sent = (0..10).map(|_| {
                        let answer = h2.send_request(request(("x-api-key", &key)));
                        async move { check(answer.await.unwrap()).await }
                    });
                    futures_util::future::join_all(sent).await;
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = proxy;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = end_to_end
}
criterion_main!(proxy);
