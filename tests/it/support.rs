//! Test fixtures: a recording upstream, a gateway on port 0 with a SQLite file in a temp dir,
//! and small HTTP helpers. Everything runs in-process on loopback, except the real binary,
//! which [`binary::Binary`] runs in a child process.

pub mod binary;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::config::{CliOverrides, Config};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef";
/// The token secret of every test gateway (shared, as a Redis deployment needs).
pub const JWT_SECRET: &str = "test-token-secret-shared-by-every-instance";

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub uri: String,
    pub headers: HeaderMap,
    pub version: http::Version,
}

/// An upstream that records every request. Paths:
/// - `/big/N`: answers N bytes (a repeating pattern), streamed in 64 KiB chunks;
/// - `/echo-body`: answers `{"len", "sha256"}` of the request body;
/// - `/slow/MS`: waits MS milliseconds, then answers;
/// - anything else: `{"path", "headers"}`.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

impl Upstream {
    pub async fn start() -> Upstream {
        Self::start_with_tls(None).await
    }

    /// An upstream serving TLS (HTTP/2 and HTTP/1.1 by ALPN) with `tls`.
    pub async fn start_with_tls(tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let rec = Arc::clone(&seen);
        let conns = Arc::clone(&connections);
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let rec = Arc::clone(&rec);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let rec = Arc::clone(&rec);
                        async move { Ok::<_, Infallible>(upstream_answer(req, &rec).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await;
                        }
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = builder
                                    .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            seen,
            connections,
        }
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw a request")
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// WebSocket endpoint: version 13 → 101 with the right accept, then echoes bytes;
/// anything else → 426.
fn websocket_answer(mut req: Request<Incoming>) -> Response<UpBody> {
    use base64::Engine;
    use sha1::Digest;
    let version_ok = req
        .headers()
        .get("sec-websocket-version")
        .is_some_and(|v| v == "13");
    let key = req.headers().get("sec-websocket-key").cloned();
    let (true, Some(key)) = (version_ok, key) else {
        let mut res = Response::new(Full::new(Bytes::from_static(b"upgrade required")).boxed());
        *res.status_mut() = StatusCode::UPGRADE_REQUIRED;
        res.headers_mut()
            .insert("sec-websocket-version", "13".parse().unwrap());
        return res;
    };
    let mut sha = sha1::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on_upgrade.await {
            let mut io = TokioIo::new(up);
            let (mut r, mut w) = tokio::io::split(&mut io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut res = Response::new(Full::new(Bytes::new()).boxed());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert("upgrade", "websocket".parse().unwrap());
    h.insert("connection", "Upgrade".parse().unwrap());
    h.insert("sec-websocket-accept", accept.parse().unwrap());
    res
}

async fn upstream_answer(req: Request<Incoming>, rec: &Mutex<Vec<Seen>>) -> Response<UpBody> {
    rec.lock().unwrap().push(Seen {
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
        version: req.version(),
    });
    let path = req.uri().path().to_owned();
    if path == "/ws" && req.headers().contains_key("upgrade") {
        return websocket_answer(req);
    }
    if let Some(n) = path.strip_prefix("/big/") {
        let n: usize = n.parse().unwrap();
        let data = Bytes::from(pattern(n));
        let chunks: Vec<Result<http_body::Frame<Bytes>, Infallible>> = (0..n)
            .step_by(64 * 1024)
            .map(|i| {
                Ok(http_body::Frame::data(
                    data.slice(i..(i + 64 * 1024).min(n)),
                ))
            })
            .collect();
        let body = http_body_util::StreamBody::new(futures_stream(chunks));
        return Response::new(BodyExt::boxed(body));
    }
    if path == "/trailers" {
        let collected = req.into_body().collect().await.unwrap();
        let names: Vec<String> = collected
            .trailers()
            .map(|t| t.keys().map(|k| k.to_string()).collect())
            .unwrap_or_default();
        let len = collected.to_bytes().len();
        let v = serde_json::json!({"trailers": names, "len": len});
        return Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    }
    if path == "/echo-body" {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let v =
            serde_json::json!({"len": body.len(), "sha256": hex::encode(Sha256::digest(&body))});
        return Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    let headers: HashMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let v = serde_json::json!({"path": req.uri().to_string(), "headers": headers});
    let mut res = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    res.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    // Hop-by-hop headers the gateway must not relay.
    res.headers_mut()
        .insert("keep-alive", "timeout=5".parse().unwrap());
    res
}

fn futures_stream<T: Send + 'static>(items: Vec<T>) -> impl futures_core::Stream<Item = T> {
    struct Iter<T>(std::vec::IntoIter<T>);
    impl<T> futures_core::Stream for Iter<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    impl<T> Unpin for Iter<T> {}
    Iter(items.into_iter())
}

/// A running gateway.
pub struct Gateway {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub upstream: Upstream,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }
}

/// Config text for a gateway: `extra` is appended (routes, plans…); `upstream` may be replaced.
pub fn config_text(upstream: &str, db: &std::path::Path, extra: &str) -> String {
    store_config_text(
        upstream,
        &format!("url = \"sqlite://{}\"", db.display()),
        extra,
    )
}

/// Config text for a gateway whose `[store]` section is `store` (`url = …` and more).
pub fn store_config_text(upstream: &str, store: &str, extra: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "{upstream}"
[admin]
listen = "127.0.0.1:0"
keys = ["{ADMIN_KEY}"]
[store]
{store}
[plans.free]
rate_limit = {{ per_minute = 60, burst = 10 }}
[plans.pro]
rate_limit = {{ per_second = 1000, burst = 1000 }}
[log]
access_log = false
[jwt]
secret = "{JWT_SECRET}"
{extra}
"#
    )
}

impl Gateway {
    pub async fn start() -> Gateway {
        Self::start_with("").await
    }

    pub async fn start_with(extra: &str) -> Gateway {
        let upstream = Upstream::start().await;
        let url = upstream.url();
        Self::start_custom(upstream, |_| url.clone(), extra).await
    }

    /// Starts a gateway whose catch-all upstream is `upstream_url(&upstream)`.
    pub async fn start_custom(
        upstream: Upstream,
        upstream_url: impl Fn(&Upstream) -> String,
        extra: &str,
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        let text = config_text(&upstream_url(&upstream), &db, extra);
        Self::start_from(upstream, dir, &text).await
    }

    /// Starts a gateway whose `[store]` section is `store` (e.g. a Redis URL and cache settings).
    pub async fn start_on_store(upstream: Upstream, store: &str, extra: &str) -> Gateway {
        let text = store_config_text(&upstream.url(), store, extra);
        Self::start_from(upstream, tempfile::tempdir().unwrap(), &text).await
    }

    pub async fn start_from(upstream: Upstream, dir: tempfile::TempDir, text: &str) -> Gateway {
        let config = Config::from_toml(text, "test", &HashMap::new(), &CliOverrides::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let app = keygate::App::bind(config).await.unwrap();
        let (proxy, admin) = (app.proxy_addr(), app.admin_addr());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(app.run(async move {
            let _ = rx.await;
        }));
        Gateway {
            proxy,
            admin,
            upstream,
            dir,
            stop: Some(tx),
            done: Some(done),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Stops the gateway gracefully; returns the upstream and the data directory for reuse.
    pub async fn stop(mut self) -> (Upstream, tempfile::TempDir) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            tokio::time::timeout(Duration::from_secs(10), done)
                .await
                .expect("gateway stops")
                .unwrap();
        }
        (self.upstream, self.dir)
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        let res = self.client.request(req).await.expect("request sent");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("body read").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// An admin call with the admin key.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        self.admin_as(method, path, body, &[("x-admin-key", ADMIN_KEY)])
            .await
    }

    pub async fn admin_as(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.admin, path));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let body = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
        if !body.is_empty() {
            b = b.header("content-type", "application/json");
        }
        self.send(b.body(Full::new(body)).unwrap()).await
    }

    /// A proxy request with the given headers.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut b = Request::builder().uri(format!("http://{}{}", self.proxy, path));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Full::new(Bytes::new())).unwrap()).await
    }

    /// A proxy GET with `Authorization: Bearer <key>`.
    pub async fn get_with_key(&self, path: &str, key: &str) -> Reply {
        self.get(path, &[("authorization", &format!("Bearer {key}"))])
            .await
    }

    /// Creates a client with `license`; returns its first key (plaintext) and key id.
    pub async fn client(&self, client_id: &str, license: &str) -> (String, String) {
        let r = self
            .admin(
                "POST",
                "/v1/clients",
                Some(serde_json::json!({"client_id": client_id, "license": license})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        (
            v["api_key"]["key"].as_str().unwrap().to_owned(),
            v["api_key"]["id"].as_str().unwrap().to_owned(),
        )
    }

    /// Creates a client whose first key carries `keys:manage` (a client principal of the admin
    /// API); returns that key.
    pub async fn manager(&self, client_id: &str, license: &str) -> String {
        let r = self
            .admin(
                "POST",
                "/v1/clients",
                Some(
                    serde_json::json!({"client_id": client_id, "license": license,
                    "permissions": ["keys:manage"]}),
                ),
            )
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        r.json()["api_key"]["key"].as_str().unwrap().to_owned()
    }

    /// Creates a key for `client_id` with the given extra fields; returns the whole answer.
    pub async fn key(&self, client_id: &str, extra: Value) -> Value {
        let mut body = serde_json::json!({"name": "test key", "client_id": client_id});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = self.admin("POST", "/v1/api-keys", Some(body)).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    }
}

/// A loopback address where nothing listens.
pub fn closed_port() -> (SocketAddr, tokio::net::TcpSocket) {
    // Bound but never listening: connections are refused, and no other test can take the port
    // while the socket is held.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (addr, socket)
}
