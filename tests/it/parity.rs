//! Engine parity: every scenario runs through the three engines of the proxy listener and must
//! give the same observable result on each —
//!
//! - [`Engine::Fast`]: HTTP/1.1 with `Content-Length` bodies, served by the fast path;
//! - [`Engine::Hyper`]: HTTP/1.1 with chunked bodies (even an empty one on a GET), which the fast
//!   path hands to hyper;
//! - [`Engine::H2c`]: HTTP/2 with prior knowledge (hyper's client), served by hyper.
//!
//! The upstream is the scripted raw one of [`crate::scripted`], so what each engine sent
//! upstream is compared byte for byte too. Where HTTP/1.1 and HTTP/2 can only differ in framing
//! (a cut-off is a closed connection on one and a reset stream on the other), each engine is
//! held to its own form of the same outcome. Each engine's run is a task of its own, so a
//! failing scenario names every engine that failed, not only the first.
//!
//! Timeouts are short (`limits.body_timeout` and `limits.header_read_timeout` 1 s,
//! `proxy.upstream_timeout` 1.5 s) and only bounded generously from above.

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::Request;
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::scripted::{Answer, Broken, HUGE, PATIENCE, Raw, Script, Seen, pattern, read_answer};
use crate::support::{Gateway, Upstream, config_text};

const BODY_TIMEOUT: Duration = Duration::from_secs(1);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(1);
const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Fast,
    Hyper,
    H2c,
}

const ENGINES: [Engine; 3] = [Engine::Fast, Engine::Hyper, Engine::H2c];

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Fast => "fast",
            Engine::Hyper => "hyper",
            Engine::H2c => "h2c",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway under test.

struct Setup {
    gw: Gateway,
    script: Script,
    /// The script's address (the `Host` the gateway sends upstream).
    up: SocketAddr,
    /// A `pro` key (1000/s) and its id.
    key: String,
    key_id: String,
}

/// A gateway in front of a [`Script`] with the suite's short timeouts; `extra` is appended to
/// its config (`{up}` in it is replaced by the script's address).
async fn setup(extra: &str) -> Arc<Setup> {
    let script = Script::default();
    let up = script.start().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[limits]\nbody_timeout_secs = {}\nheader_read_timeout_secs = {}\n{}",
        BODY_TIMEOUT.as_secs(),
        HEADER_READ_TIMEOUT.as_secs(),
        extra.replace("{up}", &up.to_string()),
    );
    let text = config_text(&format!("http://{up}"), &dir.path().join("k.db"), &extra).replace(
        "[admin]",
        &format!(
            "upstream_timeout_ms = {}\n[admin]",
            UPSTREAM_TIMEOUT.as_millis()
        ),
    );
    let gw = Gateway::start_from(Upstream::start().await, dir, &text).await;
    let (key, key_id) = gw.client("parity", "pro").await;
    Arc::new(Setup {
        gw,
        script,
        up,
        key,
        key_id,
    })
}

// ---------------------------------------------------------------------------------------------
// Running a scenario on every engine.

/// Runs `scenario` once per engine, each in a task of its own, one after the other; collects
/// what each returned and which ones failed.
struct Matrix {
    name: &'static str,
    failed: Vec<String>,
}

impl Matrix {
    fn new(name: &'static str) -> Self {
        Matrix {
            name,
            failed: Vec::new(),
        }
    }

    async fn run<T, F, Fut>(&mut self, s: &Arc<Setup>, scenario: F) -> Vec<(Engine, T)>
    where
        T: Send + 'static,
        F: Fn(Arc<Setup>, Engine) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let mut out = Vec::new();
        for engine in ENGINES {
            match tokio::spawn(scenario(Arc::clone(s), engine)).await {
                Ok(t) => out.push((engine, t)),
                Err(e) => self.failed.push(format!("{engine:?}: {}", panic_text(e))),
            }
        }
        out
    }

    /// Every engine that ran gave the same `T` as the first one.
    fn agree<T: PartialEq + Debug>(&mut self, what: &str, results: &[(Engine, T)]) {
        let Some((first, expected)) = results.first() else {
            return;
        };
        for (engine, got) in &results[1..] {
            if got != expected {
                self.failed.push(format!(
                    "{engine:?} disagrees with {first:?} on {what}:\n  {first:?}: {expected:?}\n  {engine:?}: {got:?}"
                ));
            }
        }
    }

    fn check(self) {
        assert!(
            self.failed.is_empty(),
            "{}: {} failure(s)\n{}",
            self.name,
            self.failed.len(),
            self.failed.join("\n")
        );
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panicked".into()),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The client: one request, written once, sent the way each engine needs.

/// A request body.
#[derive(Clone)]
enum Body {
    Empty,
    Whole(Vec<u8>),
    /// `first`, a pause, then `rest` (if the connection still takes it).
    Paused {
        first: Vec<u8>,
        pause: Duration,
        rest: Vec<u8>,
    },
    /// `first` of a body of `declared` bytes whose rest never comes.
    Open {
        first: Vec<u8>,
        declared: usize,
    },
}

impl Body {
    /// The body's length as a `Content-Length` states it.
    fn declared(&self) -> Option<usize> {
        match self {
            Body::Empty => None,
            Body::Whole(b) => Some(b.len()),
            Body::Paused { first, rest, .. } => Some(first.len() + rest.len()),
            Body::Open { declared, .. } => Some(*declared),
        }
    }
}

type ReqBody = UnsyncBoxBody<Bytes, Infallible>;

/// A request body fed through a channel (an upload that pauses or never ends).
struct Chan(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Chan {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// Stops a client connection's reads while it is shut (a client that stops reading its
/// socket).
#[derive(Clone, Default)]
struct Tap {
    shut: Arc<AtomicBool>,
    waker: Arc<AtomicWaker>,
}

impl Tap {
    fn shut(&self) {
        self.shut.store(true, Ordering::SeqCst);
    }

    fn open(&self) {
        self.shut.store(false, Ordering::SeqCst);
        self.waker.wake();
    }
}

struct Valve {
    io: TcpStream,
    tap: Tap,
}

impl AsyncRead for Valve {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.tap.shut.load(Ordering::SeqCst) {
            self.tap.waker.register(cx.waker());
            if self.tap.shut.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Valve {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// HTTP/2 flow-control windows of a client (hyper's defaults when `None`).
#[derive(Clone, Copy, Default)]
struct Windows {
    stream: Option<u32>,
    conn: Option<u32>,
}

struct H2Link {
    send: SendRequest<ReqBody>,
    /// Ends when the connection does.
    done: tokio::task::JoinHandle<()>,
    tap: Tap,
}

async fn h2_connect(addr: SocketAddr, windows: Windows) -> H2Link {
    let tap = Tap::default();
    let io = Valve {
        io: TcpStream::connect(addr).await.unwrap(),
        tap: tap.clone(),
    };
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.initial_stream_window_size(windows.stream)
        .initial_connection_window_size(windows.conn);
    let (send, conn) = b.handshake(TokioIo::new(io)).await.unwrap();
    let done = tokio::spawn(async move {
        let _ = conn.await;
    });
    H2Link { send, done, tap }
}

enum Link {
    H1(Raw),
    H2(H2Link),
}

/// A client of one engine; it keeps its connection from one request to the next while the
/// gateway keeps it open.
struct Client {
    engine: Engine,
    addr: SocketAddr,
    link: Option<Link>,
    /// Connections opened so far.
    opened: usize,
}

/// The head of an HTTP/1.1 request as `engine` sends it.
fn h1_head(
    engine: Engine,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &Body,
) -> Vec<u8> {
    let mut h = format!("{method} {path} HTTP/1.1\r\nHost: gw.example\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    match engine {
        Engine::Fast => {
            if let Some(n) = body.declared().filter(|&n| n > 0 || method != "GET") {
                h.push_str(&format!("Content-Length: {n}\r\n"));
            }
        }
        Engine::Hyper => h.push_str("Transfer-Encoding: chunked\r\n"),
        Engine::H2c => unreachable!(),
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// Body bytes as `engine` frames them on HTTP/1.1.
fn h1_data(engine: Engine, data: &[u8]) -> Vec<u8> {
    match engine {
        Engine::Hyper if data.is_empty() => Vec::new(),
        Engine::Hyper => {
            let mut out = format!("{:x}\r\n", data.len()).into_bytes();
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
            out
        }
        _ => data.to_vec(),
    }
}

/// The end of a body as `engine` frames it on HTTP/1.1.
fn h1_end(engine: Engine) -> &'static [u8] {
    match engine {
        Engine::Hyper => b"0\r\n\r\n",
        _ => b"",
    }
}

impl Client {
    fn new(engine: Engine, addr: SocketAddr) -> Self {
        Client {
            engine,
            addr,
            link: None,
            opened: 0,
        }
    }

    async fn connect(&mut self) {
        self.opened += 1;
        self.link = Some(match self.engine {
            Engine::H2c => Link::H2(h2_connect(self.addr, Windows::default()).await),
            _ => Link::H1(Raw::connect(self.addr).await),
        });
    }

    /// Sends one request and reads its answer; `Err` when the connection or stream was cut off
    /// before the answer was complete.
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<Answer, Broken> {
        if let Some(Link::H2(l)) = &self.link
            && l.send.is_closed()
        {
            self.link = None;
        }
        if self.link.is_none() {
            self.connect().await;
        }
        let keep = matches!(body, Body::Empty | Body::Whole(_));
        let answer = match self.link.as_mut().expect("connected") {
            Link::H1(raw) => h1_send(self.engine, raw, method, path, headers, body).await,
            Link::H2(l) => h2_send(&mut l.send, method, path, headers, body).await,
        };
        let closing = answer
            .as_ref()
            .map_or(true, |a| a.header("connection").as_deref() == Some("close"));
        if closing || !keep {
            self.link = None;
        }
        answer
    }

    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Answer, Broken> {
        self.send("GET", path, headers, Body::Empty).await
    }
}

async fn h1_send(
    engine: Engine,
    raw: &mut Raw,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> Result<Answer, Broken> {
    let mut out = h1_head(engine, method, path, headers, &body);
    let mut later = None;
    match &body {
        Body::Empty => out.extend_from_slice(h1_end(engine)),
        Body::Whole(b) => {
            out.extend(h1_data(engine, b));
            out.extend_from_slice(h1_end(engine));
        }
        Body::Paused { first, pause, rest } => {
            out.extend(h1_data(engine, first));
            let mut tail = h1_data(engine, rest);
            tail.extend_from_slice(h1_end(engine));
            later = Some((*pause, tail));
        }
        Body::Open { first, .. } => out.extend(h1_data(engine, first)),
    }
    raw.s
        .write_all(&out)
        .await
        .map_err(|e| Broken(format!("request not sent: {e}")))?;
    let (mut r, mut w) = raw.s.split();
    let reading = read_answer(&mut r, &mut raw.buf, method);
    match later {
        None => reading.await,
        Some((pause, tail)) => {
            let writing = async move {
                tokio::time::sleep(pause).await;
                let _ = w.write_all(&tail).await;
                std::future::pending::<()>().await
            };
            tokio::select! {
                a = reading => a,
                () = writing => unreachable!(),
            }
        }
    }
}

async fn h2_send(
    send: &mut SendRequest<ReqBody>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> Result<Answer, Broken> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://gw.example{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    // An upload that never ends keeps its sender until the answer is in.
    let mut open = None;
    let req_body: ReqBody = match body {
        Body::Empty => Empty::new().boxed_unsync(),
        Body::Whole(b) => Full::new(Bytes::from(b)).boxed_unsync(),
        Body::Paused { first, pause, rest } => {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.try_send(Bytes::from(first)).unwrap();
            tokio::spawn(async move {
                tokio::time::sleep(pause).await;
                let _ = tx.send(Bytes::from(rest)).await;
            });
            Chan(rx).boxed_unsync()
        }
        Body::Open { first, .. } => {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.try_send(Bytes::from(first)).unwrap();
            open = Some(tx);
            Chan(rx).boxed_unsync()
        }
    };
    let req = req.body(req_body).unwrap();
    let answer = async {
        send.ready()
            .await
            .map_err(|e| Broken(format!("connection closed: {e}")))?;
        let res = send
            .send_request(req)
            .await
            .map_err(|e| Broken(format!("request failed: {e}")))?;
        let (parts, body) = res.into_parts();
        let collected = body
            .collect()
            .await
            .map_err(|e| Broken(format!("response body cut off: {e}")))?;
        Ok(h2_answer(parts, collected))
    };
    let answer = tokio::time::timeout(PATIENCE, answer)
        .await
        .unwrap_or_else(|_| panic!("no HTTP/2 answer within {PATIENCE:?}: the exchange hangs"));
    drop(open);
    answer
}

fn h2_answer(parts: http::response::Parts, collected: http_body_util::Collected<Bytes>) -> Answer {
    let fields = |h: &http::HeaderMap| -> Vec<(String, String)> {
        h.iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect()
    };
    let headers = fields(&parts.headers);
    let trailers = collected.trailers().map(fields).unwrap_or_default();
    let mut head = format!("HTTP/2 {}\r\n", parts.status.as_u16());
    for (k, v) in &headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    Answer {
        status: parts.status.as_u16(),
        head,
        headers,
        body: collected.to_bytes().to_vec(),
        trailers,
        interim: Vec::new(),
    }
}

/// One request on a new connection of `engine`.
async fn send(
    engine: Engine,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> Result<Answer, Broken> {
    Client::new(engine, addr)
        .send(method, path, headers, body)
        .await
}

// ---------------------------------------------------------------------------------------------
// Comparing answers.

/// An answer as every engine must give it: the status, the end-to-end fields (framing and
/// connection fields left out; values that change from one request to the next as `*`),
/// sorted, and the body (a long one by its length and digest).
#[derive(Debug, PartialEq, Eq)]
struct View {
    status: u16,
    fields: Vec<(String, String)>,
    body: String,
    trailers: Vec<(String, String)>,
}

fn body_text(body: &[u8]) -> String {
    use sha2::Digest;
    if body.len() <= 256 {
        String::from_utf8_lossy(body).into_owned()
    } else {
        let digest = hex::encode(sha2::Sha256::digest(body));
        format!("{} bytes, sha256 {}", body.len(), &digest[..16])
    }
}

fn view(a: &Answer) -> View {
    let mut fields: Vec<(String, String)> = a
        .headers
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "transfer-encoding" | "connection"))
        .map(|(k, v)| {
            let v = match k.as_str() {
                "date" | "ratelimit-remaining" | "ratelimit-reset" | "retry-after" => "*".into(),
                _ => v.clone(),
            };
            (k.clone(), v)
        })
        .collect();
    fields.sort();
    View {
        status: a.status,
        fields,
        body: body_text(&a.body),
        trailers: a.trailers.clone(),
    }
}

/// What the upstream saw: the fields (names in lowercase, framing left out), sorted.
fn upstream_view(s: &Seen) -> Vec<(String, String)> {
    let mut f: Vec<(String, String)> = s
        .fields()
        .into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), "content-length" | "transfer-encoding"))
        .collect();
    f.sort();
    f
}

fn expect_ok(r: Result<Answer, Broken>, what: &str) -> Answer {
    r.unwrap_or_else(|b| panic!("{what}: cut off: {}", b.0))
}

/// Polls `f` until it is `Some` or `within` has passed.
async fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(t) = f() {
            return Some(t);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Every response framing.

#[tokio::test]
async fn every_response_framing_is_relayed_alike() {
    let s = setup("").await;
    let mut m = Matrix::new("response framings");
    let upload = pattern(300_000);
    let up = upload.clone();
    let results = m
        .run(&s, move |s, engine| {
            let upload = up.clone();
            async move {
                let key = [("x-api-key", s.key.as_str())];
                let mut c = Client::new(engine, s.gw.proxy);
                let mut views = Vec::new();
                for (method, path) in [
                    ("GET", "/ok"),
                    ("GET", "/chunked"),
                    ("GET", "/eof"),
                    ("GET", "/interim"),
                    ("HEAD", "/head"),
                    ("GET", "/notmod"),
                    ("GET", "/hop"),
                    ("GET", "/big"),
                    ("POST", "/echo"),
                    ("GET", "/drip"),
                ] {
                    let body = if method == "POST" {
                        Body::Whole(upload.clone())
                    } else {
                        Body::Empty
                    };
                    let target = format!("{path}?framing={}", engine.name());
                    let a = expect_ok(c.send(method, &target, &key, body).await, path);
                    let what = format!("{engine:?} {method} {path}:\n{}", a.head);
                    assert!(a.interim.is_empty(), "interim answer relayed: {what}");
                    assert!(a.trailers.is_empty(), "trailer relayed: {what}");
                    assert!(a.header("date").is_some(), "no Date: {what}");
                    assert_eq!(
                        a.headers
                            .iter()
                            .filter(|(k, _)| k == "ratelimit-limit")
                            .count(),
                        1,
                        "{what}"
                    );
                    assert_eq!(
                        a.header("ratelimit-limit").as_deref(),
                        Some("1000"),
                        "{what}"
                    );
                    let (status, body): (u16, &[u8]) = match path {
                        "/chunked" => (200, b"hello world"),
                        "/eof" => (200, b"until the end"),
                        "/head" | "/notmod" => (if path == "/head" { 200 } else { 304 }, b""),
                        "/drip" => (200, b"helloworld"),
                        "/big" | "/echo" => (200, b""),
                        _ => (200, b"ok"),
                    };
                    assert_eq!(a.status, status, "{what}");
                    match path {
                        "/big" => assert!(a.body == pattern(1 << 20), "/big body differs"),
                        "/echo" => assert!(a.body == upload, "/echo body differs"),
                        _ => assert_eq!(a.body, body, "{what}"),
                    }
                    match path {
                        "/chunked" => {
                            assert_eq!(a.header("x-up").as_deref(), Some("1"), "{what}");
                            assert!(a.header("x-trailer").is_none(), "{what}");
                        }
                        "/head" => {
                            assert_eq!(a.header("content-length").as_deref(), Some("100"), "{what}")
                        }
                        "/notmod" => {
                            assert_eq!(a.header("etag").as_deref(), Some("\"v1\""), "{what}");
                            assert!(a.header("content-length").is_none(), "{what}");
                        }
                        "/hop" => {
                            for gone in ["x-secret", "keep-alive", "upgrade", "proxy-authenticate"]
                            {
                                assert!(a.header(gone).is_none(), "{gone} relayed: {what}");
                            }
                            assert_eq!(a.header("x-kept").as_deref(), Some("1"), "{what}");
                        }
                        _ => {}
                    }
                    views.push((path, view(&a)));
                }
                views
            }
        })
        .await;
    for path in [
        "/ok", "/chunked", "/eof", "/interim", "/head", "/notmod", "/hop", "/big", "/echo", "/drip",
    ] {
        let per: Vec<(Engine, &View)> = results
            .iter()
            .filter_map(|(e, vs)| vs.iter().find(|(p, _)| *p == path).map(|(_, v)| (*e, v)))
            .collect();
        m.agree(path, &per);
    }
    // Upstream connections are reused alike: one exchange after another on the same one,
    // except after a body delimited by closing (/eof) and after a bodiless answer (HEAD, 304:
    // a body an upstream wrongly sends there must not become the next answer).
    let paths = [
        "/ok", "/chunked", "/eof", "/interim", "/head", "/notmod", "/hop", "/big", "/echo", "/drip",
    ];
    let expected = [true, true, false, true, false, false, true, true, true];
    let reuse: Vec<(Engine, Vec<bool>)> = ENGINES
        .iter()
        .map(|&engine| {
            let conns: Vec<usize> = paths
                .iter()
                .map(|p| {
                    s.script
                        .seen_at(&format!("{p}?framing={}", engine.name()))
                        .map_or(usize::MAX, |s| s.conn)
                })
                .collect();
            (engine, conns.windows(2).map(|w| w[0] == w[1]).collect())
        })
        .collect();
    for (engine, same) in &reuse {
        if same[..] != expected[..] {
            m.failed.push(format!(
                "{engine:?}: upstream connection reuse {same:?}, expected {expected:?} (for {paths:?})"
            ));
        }
    }
    // The upload reached the upstream whole on every engine.
    for engine in ENGINES {
        let seen = s
            .script
            .seen_at(&format!("/echo?framing={}", engine.name()));
        if seen.as_ref().map(|s| s.body.as_slice()) != Some(upload.as_slice()) {
            m.failed.push(format!(
                "{engine:?}: the upload did not reach the upstream whole"
            ));
        }
    }
    m.check();
}

// ---------------------------------------------------------------------------------------------
// 2. Misbehaving upstreams.

#[tokio::test]
async fn misbehaving_upstreams_are_502_alike() {
    let s = setup("").await;
    let mut m = Matrix::new("misbehaving upstreams");
    let results = m
        .run(&s, |s, engine| async move {
            let key = [("x-api-key", s.key.as_str())];
            let mut c = Client::new(engine, s.gw.proxy);
            let mut views = Vec::new();
            for path in [
                "/switch",
                "/conflict",
                "/garbage",
                "/gzipped",
                "/status",
                "/nothing",
            ] {
                let a = expect_ok(c.get(path, &key).await, path);
                assert_eq!(
                    (a.status, a.code().as_str()),
                    (502, "upstream_unavailable"),
                    "{engine:?} {path}:\n{}",
                    a.head
                );
                assert_eq!(
                    a.header("content-type").as_deref(),
                    Some("application/problem+json")
                );
                // Admitted and charged: the 502 says what is left, as a relayed answer does.
                assert!(
                    a.header("ratelimit-limit").is_some()
                        && a.header("ratelimit-remaining").is_some(),
                    "{engine:?} {path}: no RateLimit-* on the 502:\n{}",
                    a.head
                );
                // The client's connection survives the upstream's failure.
                let a = expect_ok(c.get("/ok", &key).await, "/ok after a 502");
                assert_eq!((a.status, &a.body[..]), (200, &b"ok"[..]), "after {path}");
                views.push((path, view(&a)));
            }
            // The upstream closes each connection right after answering: the next request
            // never sees it, whether the close is noticed before or after sending.
            let opened_before = c.opened;
            for i in 0..20 {
                let a = expect_ok(
                    c.get(&format!("/bye?{}-{i}", engine.name()), &key).await,
                    "/bye",
                );
                assert_eq!(
                    (a.status, &a.body[..]),
                    (200, &b"ok"[..]),
                    "{engine:?} /bye {i}"
                );
                if i % 3 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            // A connection handed to hyper serves that one request and closes (every HTTP/1.1
            // head is read by the fast path's parser first): the Hyper engine reconnects.
            if engine == Engine::Hyper {
                assert_eq!(
                    c.opened - opened_before,
                    20,
                    "{engine:?}: one connection a request"
                );
            } else {
                assert_eq!(c.opened, 1, "{engine:?}: the client's connection was lost");
            }
            // The upstream closes a kept-alive connection just as the next request arrives on
            // it (before answering anything): an idempotent request is sent again on a new
            // connection, whatever framing its (empty) body had.
            for i in 0..3 {
                let target = format!("/once?{}-{i}", engine.name());
                let a = expect_ok(c.get(&target, &key).await, "/once");
                assert_eq!(
                    (a.status, &a.body[..]),
                    (200, &b"ok"[..]),
                    "{engine:?} {target}:\n{}",
                    a.head
                );
            }
            // The same with a body that turns out to be empty only after the head (HTTP/1.1:
            // no length, or an empty chunked body; HTTP/2: HEADERS without END_STREAM, then
            // empty DATA frames, the last one ending the stream).
            for i in 0..3 {
                let target = format!("/once?{}-streamed-{i}", engine.name());
                let empty = Body::Paused {
                    first: Vec::new(),
                    pause: Duration::ZERO,
                    rest: Vec::new(),
                };
                let a = expect_ok(c.send("GET", &target, &key, empty).await, "/once");
                assert_eq!(
                    (a.status, &a.body[..]),
                    (200, &b"ok"[..]),
                    "{engine:?} {target}:\n{}",
                    a.head
                );
            }
            views
        })
        .await;
    m.agree("502 answers", &results);
    m.check();
}

// ---------------------------------------------------------------------------------------------
// 3. Request field rules.

#[tokio::test]
async fn request_fields_reach_the_upstream_alike() {
    let s = setup("").await;
    let mut m = Matrix::new("request field rules");
    let results = m
        .run(&s, |s, engine| async move {
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:", s.key));
            let basic_any =
                base64::engine::general_purpose::STANDARD.encode(format!("user:{}", s.key));
            let bearer = format!("Bearer {}", s.key);
            let basic = format!("Basic {basic}");
            let basic_any = format!("Basic {basic_any}");
            let creds: [(&str, (&str, &str)); 4] = [
                ("header", ("X-API-Key", s.key.as_str())),
                ("bearer", ("Authorization", bearer.as_str())),
                ("basic", ("Authorization", basic.as_str())),
                ("basic-any", ("Authorization", basic_any.as_str())),
            ];
            let mut views = Vec::new();
            for (name, cred) in creds {
                let mut headers = vec![
                    cred,
                    ("X-Keygate-Client-Id", "spoofed"),
                    ("X-Keygate-License", "enterprise"),
                    ("X_Keygate_Key_Id", "spoofed"),
                    ("Keep-Alive", "timeout=5"),
                    ("TE", "trailers"),
                    ("Proxy-Authorization", "Basic c3B5OnNweQ=="),
                    ("X-Forwarded-For", "10.1.2.3"),
                    ("X-Forwarded-Proto", "https"),
                    ("X-Forwarded-Host", "evil.example"),
                    ("X-Custom", "kept"),
                    // Another method than the one the route judged (off by default).
                    ("X-HTTP-Method-Override", "DELETE"),
                    ("X-HTTP-Method", "DELETE"),
                    ("X-Method-Override", "DELETE"),
                ];
                if engine != Engine::H2c {
                    // HTTP/2 has no Connection field.
                    headers.push(("Connection", "X-Secret"));
                    headers.push(("X-Secret", "1"));
                }
                let target = format!("/ok?fields={}-{name}", engine.name());
                let a = expect_ok(
                    send(engine, s.gw.proxy, "GET", &target, &headers, Body::Empty).await,
                    name,
                );
                assert_eq!(a.status, 200, "{engine:?} {name}:\n{}", a.head);
                let seen = s
                    .script
                    .seen_at(&target)
                    .expect("the upstream saw the request");
                // Each engine took the request: only the one handed over by its chunked body
                // reaches the upstream chunked.
                assert_eq!(
                    seen.header("transfer-encoding").is_some(),
                    engine == Engine::Hyper,
                    "{engine:?}:\n{}",
                    seen.head
                );
                let what = format!("{engine:?} {name}:\n{}", seen.head);
                for gone in [
                    "x-api-key",
                    "authorization",
                    "keep-alive",
                    "te",
                    "proxy-authorization",
                    "x_keygate_key_id",
                    "x-secret",
                    "connection",
                    "x-http-method-override",
                    "x-http-method",
                    "x-method-override",
                ] {
                    assert!(seen.header(gone).is_none(), "{gone} forwarded: {what}");
                }
                let one = |name: &str| {
                    let all: Vec<_> = seen
                        .fields()
                        .into_iter()
                        .filter(|(k, _)| k == name)
                        .collect();
                    assert_eq!(all.len(), 1, "{name} not once: {what}");
                    all[0].1.clone()
                };
                assert_eq!(one("x-keygate-client-id"), "parity", "{what}");
                assert_eq!(one("x-keygate-key-id"), s.key_id, "{what}");
                assert_eq!(one("x-keygate-license"), "pro", "{what}");
                one("x-keygate-permissions");
                assert_eq!(one("x-forwarded-for"), "10.1.2.3, 127.0.0.1", "{what}");
                assert_eq!(one("x-forwarded-proto"), "http", "{what}");
                assert_eq!(one("x-forwarded-host"), "gw.example", "{what}");
                assert_eq!(one("host"), s.up.to_string(), "{what}");
                assert_eq!(one("x-custom"), "kept", "{what}");
                views.push((name, upstream_view(&seen)));
            }
            views
        })
        .await;
    // Every engine and every credential: the same fields upstream.
    let all: Vec<(Engine, &Vec<(String, String)>)> = results
        .iter()
        .flat_map(|(e, vs)| vs.iter().map(move |(_, v)| (*e, v)))
        .collect();
    m.agree("the fields the upstream saw", &all);
    m.check();
}

// ---------------------------------------------------------------------------------------------
// 4. The gateway's own answers.

#[tokio::test]
async fn auth_answers_are_identical() {
    let s = setup(
        "[[routes]]\npath = \"/ok\"\nupstream = \"http://{up}\"\n\
         [[routes]]\npath = \"/private\"\nupstream = \"http://{up}\"\npermissions = [\"NOPE\"]\n",
    )
    .await;
    let mut m = Matrix::new("auth answers");
    let results = m
        .run(&s, |s, engine| async move {
            let (free, _) =
                s.gw.client(&format!("free-{}", engine.name()), "free")
                    .await;
            let addr = s.gw.proxy;
            let bad = format!("kg_{}", "A".repeat(49));
            let bearer_bad = format!("Bearer {bad}");
            /// Name, path, fields, status, code.
            type Case<'a> = (
                &'static str,
                &'static str,
                Vec<(&'static str, &'a str)>,
                u16,
                &'static str,
            );
            let cases: Vec<Case> = vec![
                ("no key", "/ok", vec![], 401, "missing_credentials"),
                (
                    "bad key",
                    "/ok",
                    vec![("x-api-key", bad.as_str())],
                    401,
                    "invalid_api_key",
                ),
                (
                    "permission",
                    "/private",
                    vec![("x-api-key", s.key.as_str())],
                    403,
                    "insufficient_permissions",
                ),
                (
                    "no route",
                    "/nowhere",
                    vec![("x-api-key", s.key.as_str())],
                    404,
                    "route_not_found",
                ),
                // Judged by one, the other would be forwarded with what it holds.
                (
                    "two authorizations",
                    "/ok",
                    vec![
                        ("x-api-key", s.key.as_str()),
                        ("authorization", "Digest x"),
                        ("authorization", bearer_bad.as_str()),
                    ],
                    400,
                    "bad_request",
                ),
            ];
            let mut views = Vec::new();
            for (name, path, headers, status, code) in cases {
                let a = expect_ok(
                    send(engine, addr, "GET", path, &headers, Body::Empty).await,
                    name,
                );
                let what = format!("{engine:?} {name}:\n{}", a.head);
                assert_eq!((a.status, a.code().as_str()), (status, code), "{what}");
                assert_eq!(
                    a.header("content-type").as_deref(),
                    Some("application/problem+json"),
                    "{what}"
                );
                assert_eq!(
                    a.header("www-authenticate").is_some(),
                    status == 401,
                    "{what}"
                );
                views.push((name, view(&a)));
            }
            // The free plan's burst is 10: the first refusal comes within a few more.
            let mut c = Client::new(engine, addr);
            let mut refused = None;
            for i in 0..15 {
                let a = expect_ok(c.get("/ok", &[("x-api-key", free.as_str())]).await, "free");
                if a.status == 429 {
                    refused = Some((i, a));
                    break;
                }
                assert_eq!(a.status, 200, "{engine:?} request {i}:\n{}", a.head);
            }
            let (i, a) = refused.unwrap_or_else(|| panic!("{engine:?}: never rate limited"));
            let what = format!("{engine:?} 429 after {i}:\n{}", a.head);
            assert_eq!(a.code(), "rate_limited", "{what}");
            for f in [
                "retry-after",
                "ratelimit-limit",
                "ratelimit-remaining",
                "ratelimit-reset",
            ] {
                assert!(a.header(f).is_some(), "no {f}: {what}");
            }
            assert_eq!(
                a.header("ratelimit-remaining").as_deref(),
                Some("0"),
                "{what}"
            );
            assert!(
                a.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1,
                "{what}"
            );
            views.push(("rate limited", view(&a)));
            views
        })
        .await;
    m.agree("the gateway's answers", &results);
    m.check();
}

// ---------------------------------------------------------------------------------------------
// 5. Upstream policy: stalled bodies, silent upstreams, stalled uploads.

#[tokio::test]
async fn upstream_timeouts_are_kept_alike() {
    let s = setup("").await;
    let mut m = Matrix::new("upstream policy");
    let results = m
        .run(&s, |s, engine| async move {
            let key = [("x-api-key", s.key.as_str())];
            let addr = s.gw.proxy;
            let bound = UPSTREAM_TIMEOUT * 3;

            // The response body stops after 10 of 100 bytes: cut off.
            let started = Instant::now();
            let r = send(engine, addr, "GET", "/stall", &key, Body::Empty).await;
            let took = started.elapsed();
            let Err(broken) = r else {
                panic!("{engine:?}: a stalled body was answered whole: {r:?}")
            };
            assert!(
                took < bound,
                "{engine:?}: cut off after {took:?} ({})",
                broken.0
            );

            // The upstream never answers: 504.
            let started = Instant::now();
            let a = expect_ok(
                send(engine, addr, "GET", "/hang", &key, Body::Empty).await,
                "/hang",
            );
            let took = started.elapsed();
            assert_eq!(
                (a.status, a.code().as_str()),
                (504, "upstream_timeout"),
                "{engine:?}:\n{}",
                a.head
            );
            assert!(took < bound, "{engine:?}: 504 after {took:?}");
            let hang = view(&a);

            // The client's upload pauses for longer than the body timeout: 408.
            let started = Instant::now();
            let body = Body::Paused {
                first: b"0123456789".to_vec(),
                pause: BODY_TIMEOUT * 3,
                rest: b"abcdefghij".to_vec(),
            };
            let target = format!("/echo?paused={}", engine.name());
            let a = expect_ok(
                send(engine, addr, "POST", &target, &key, body).await,
                "paused upload",
            );
            let took = started.elapsed();
            assert_eq!(
                (a.status, a.code().as_str()),
                (408, "request_timeout"),
                "{engine:?}:\n{}",
                a.head
            );
            assert!(took < BODY_TIMEOUT * 3, "{engine:?}: 408 after {took:?}");
            assert!(
                s.script.seen_at(&target).is_none(),
                "{engine:?}: the cut upload was completed upstream"
            );
            (hang, view(&a))
        })
        .await;
    m.agree("504 and 408 answers", &results);
    m.check();
}

// ---------------------------------------------------------------------------------------------
// 6. A client that stops reading.

/// How a client stops reading a large answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// It no longer reads its socket (HTTP/1.1 and HTTP/2 alike; on HTTP/2 with windows large
    /// enough that the gateway's writes stall before its flow control does).
    Socket,
    /// HTTP/2 only: it reads the socket but takes no data from the stream, so it grants no
    /// more window.
    Window,
}

async fn slow_client(s: Arc<Setup>, engine: Engine, stop: Stop) {
    let key: [(&'static str, &str); 1] = [("x-api-key", s.key.as_str())];
    let addr = s.gw.proxy;
    let target = format!("/huge?slow={}-{stop:?}", engine.name());
    let started = Instant::now();
    // The stalled exchange, and how to see how it ended once the client reads again.
    let ended: Pin<Box<dyn Future<Output = Result<usize, Broken>> + Send>> = match engine {
        Engine::Fast | Engine::Hyper => {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(64 * 1024).unwrap();
            let mut io = socket.connect(addr).await.unwrap();
            let head = h1_head(engine, "GET", &target, &key, &Body::Empty);
            io.write_all(&head).await.unwrap();
            io.write_all(h1_end(engine)).await.unwrap();
            Box::pin(async move {
                let mut total = 0;
                let mut chunk = vec![0u8; 1 << 20];
                loop {
                    match tokio::time::timeout(PATIENCE, io.read(&mut chunk)).await {
                        Err(_) => panic!("the stalled connection neither ended nor went on"),
                        Ok(Ok(0)) => return Err(Broken(format!("closed after {total} bytes"))),
                        Ok(Err(e)) => return Err(Broken(format!("{e} after {total} bytes"))),
                        Ok(Ok(n)) => total += n,
                    }
                    if total >= HUGE {
                        return Ok(total);
                    }
                }
            })
        }
        Engine::H2c => {
            let windows = match stop {
                Stop::Socket => Windows {
                    stream: Some(1 << 30),
                    conn: Some(1 << 30),
                },
                Stop::Window => Windows {
                    stream: Some(65_535),
                    conn: Some(65_535),
                },
            };
            let mut l = h2_connect(addr, windows).await;
            l.send.ready().await.unwrap();
            if stop == Stop::Socket {
                l.tap.shut();
            }
            let req = Request::get(format!("http://gw.example{target}"))
                .header("x-api-key", s.key.as_str())
                .body(Empty::new().boxed_unsync())
                .unwrap();
            let res = l.send.send_request(req);
            let tap = l.tap.clone();
            // The response is not read until the exchange is over.
            let (go, wait) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                let res = res.await;
                let _ = wait.await;
                let res = res.map_err(|e| Broken(format!("request failed: {e}")))?;
                let collected = tokio::time::timeout(PATIENCE, res.into_body().collect())
                    .await
                    .unwrap_or_else(|_| panic!("the stalled stream neither ended nor went on"))
                    .map_err(|e| Broken(format!("stream cut off: {e}")))?;
                Ok(collected.to_bytes().len())
            });
            Box::pin(async move {
                tap.open();
                let _ = go.send(());
                let r = task.await.unwrap();
                if stop == Stop::Window {
                    // Only the stream was reset: the connection goes on.
                    let a =
                        h2_send(&mut l.send, "GET", "/ok?same-connection", &key, Body::Empty).await;
                    assert_eq!(expect_ok(a, "the same connection").status, 200);
                }
                r
            })
        }
    };
    // Meanwhile other requests are served.
    let a = expect_ok(
        send(engine, addr, "GET", "/ok", &key, Body::Empty).await,
        "/ok",
    );
    assert_eq!(a.status, 200, "{engine:?} while a client stalls");
    // The gateway gives up on the stalled client: it drops the exchange, upstream included.
    let cut = wait_for(BODY_TIMEOUT * 6, || s.script.cut_at(&target)).await;
    let Some(cut) = cut else {
        panic!(
            "{engine:?} ({stop:?}): a client that stopped reading still holds its exchange after {:?}",
            started.elapsed()
        )
    };
    let took = cut.duration_since(started);
    assert!(
        took < BODY_TIMEOUT * 5,
        "{engine:?} ({stop:?}): dropped after {took:?}"
    );
    let a = expect_ok(
        send(engine, addr, "GET", "/ok", &key, Body::Empty).await,
        "/ok",
    );
    assert_eq!(a.status, 200, "{engine:?} after a client stalled");
    // And the client, reading again, sees its answer cut off.
    if let Ok(n) = ended.await {
        panic!("{engine:?} ({stop:?}): the whole answer ({n} bytes) arrived after all");
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_alike() {
    let s = setup("").await;
    let mut m = Matrix::new("slow client (socket)");
    m.run(&s, |s, engine| slow_client(s, engine, Stop::Socket))
        .await;
    m.check();
}

#[tokio::test]
async fn an_h2_stream_that_grants_no_window_is_reset() {
    let s = setup("").await;
    let mut m = Matrix::new("slow client (HTTP/2 window)");
    let r = tokio::spawn(slow_client(Arc::clone(&s), Engine::H2c, Stop::Window)).await;
    if let Err(e) = r {
        m.failed.push(format!("H2c: {}", panic_text(e)));
    }
    m.check();
}

// ---------------------------------------------------------------------------------------------
// 7. The upstream answers before the upload is complete.

#[tokio::test]
async fn an_early_answer_is_relayed_alike() {
    let s = setup("").await;
    let mut m = Matrix::new("early answer");
    let results = m
        .run(&s, |s, engine| async move {
            let key = [("x-api-key", s.key.as_str())];
            let target = format!("/early?{}", engine.name());
            let mut c = Client::new(engine, s.gw.proxy);
            let body = Body::Open {
                first: b"abc".to_vec(),
                declared: 1_000_000,
            };
            let started = Instant::now();
            let a = expect_ok(c.send("POST", &target, &key, body).await, "/early");
            assert_eq!(
                (a.status, &a.body[..]),
                (200, &b"early"[..]),
                "{engine:?}:\n{}",
                a.head
            );
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{engine:?}: answered after {:?}",
                started.elapsed()
            );
            assert!(s.script.seen_at(&target).is_some());
            // Nothing hangs afterwards: the next request is answered (on HTTP/1.1 on a new
            // connection, since the unfinished upload ended the old one).
            let a = expect_ok(c.get("/ok", &key).await, "/ok after /early");
            assert_eq!(a.status, 200, "{engine:?}");
            view(&a)
        })
        .await;
    m.agree("the answer after an early answer", &results);
    m.check();
}

/// On HTTP/1.1 a connection whose upload was cut short by an early answer ends promptly.
#[tokio::test]
async fn an_early_answer_ends_an_http1_connection() {
    let s = setup("").await;
    let mut m = Matrix::new("early answer ends the connection");
    m.run(&s, |s, engine| async move {
        if engine == Engine::H2c {
            return;
        }
        let key = [("x-api-key", s.key.as_str())];
        let mut raw = Raw::connect(s.gw.proxy).await;
        let body = Body::Open {
            first: b"abc".to_vec(),
            declared: 1_000_000,
        };
        let a = expect_ok(
            h1_send(engine, &mut raw, "POST", "/early?close", &key, body).await,
            "/early",
        );
        assert_eq!(a.status, 200);
        assert!(
            raw.closes(HEADER_READ_TIMEOUT * 4).await,
            "{engine:?}: the connection stays open"
        );
    })
    .await;
    m.check();
}

// ---------------------------------------------------------------------------------------------
// 8. Idle connections.

async fn closes_within(mut raw: Raw, bound: Duration) -> Duration {
    let started = Instant::now();
    assert!(raw.closes(bound).await, "still open after {bound:?}");
    started.elapsed()
}

#[tokio::test]
async fn idle_connections_are_closed_alike() {
    let s = setup("").await;
    let mut m = Matrix::new("idle connections");
    m.run(&s, |s, engine| async move {
        let key = [("x-api-key", s.key.as_str())];
        let addr = s.gw.proxy;
        let bound = HEADER_READ_TIMEOUT * 4;
        // A client that keeps sending requests on one connection, for longer than the idle
        // timeout, is served throughout.
        let busy = tokio::spawn({
            let key = s.key.clone();
            async move {
                let mut c = Client::new(engine, addr);
                for i in 0..8 {
                    let a = expect_ok(
                        c.get(&format!("/ok?busy-{i}"), &[("x-api-key", key.as_str())])
                            .await,
                        "busy",
                    );
                    assert_eq!(a.status, 200);
                    tokio::time::sleep(HEADER_READ_TIMEOUT * 3 / 10).await;
                }
                c.opened
            }
        });
        // A connection that sends nothing at all (on HTTP/2: only the preface and SETTINGS).
        let mut idle = Raw::connect(addr).await;
        if engine == Engine::H2c {
            idle.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                .await;
        }
        let took = closes_within(idle, bound).await;
        assert!(
            took >= HEADER_READ_TIMEOUT / 2,
            "{engine:?}: closed after only {took:?}"
        );
        // A connection left idle after a request.
        match engine {
            Engine::H2c => {
                let mut l = h2_connect(addr, Windows::default()).await;
                let a = h2_send(&mut l.send, "GET", "/ok?then-idle", &key, Body::Empty).await;
                assert_eq!(expect_ok(a, "then idle").status, 200);
                let started = Instant::now();
                tokio::time::timeout(bound, l.done)
                    .await
                    .unwrap_or_else(|_| {
                        panic!("H2c: an idle connection still open after {bound:?}")
                    })
                    .unwrap();
                assert!(started.elapsed() >= HEADER_READ_TIMEOUT / 2);
            }
            _ => {
                let mut raw = Raw::connect(addr).await;
                let a = h1_send(engine, &mut raw, "GET", "/ok?then-idle", &key, Body::Empty).await;
                assert_eq!(expect_ok(a, "then idle").status, 200);
                let took = closes_within(raw, bound).await;
                // Hyper closes a handed-over connection right after its answer.
                if engine != Engine::Hyper {
                    assert!(
                        took >= HEADER_READ_TIMEOUT / 2,
                        "{engine:?}: closed after only {took:?}"
                    );
                }
            }
        }
        let opened = busy.await.unwrap();
        assert_eq!(
            opened,
            if engine == Engine::Hyper { 8 } else { 1 },
            "{engine:?}: the busy connection was closed under it"
        );
    })
    .await;
    m.check();
}

// ---------------------------------------------------------------------------------------------
// 9. CORS: preflights answered by the core, the CORS fields of relayed and own answers, and
// the verify endpoint's view of the same requests.

#[tokio::test]
async fn cors_answers_are_identical() {
    const APP: &str = "https://app.example.com";
    const EVIL: &str = "https://evil.example.net";
    let s = setup(
        "[[routes]]\npath = \"/cors\"\nupstream = \"http://{up}\"\nmethods = [\"GET\"]\n\
         cors = { origins = [\"https://app.example.com\"], credentials = true, expose_headers = [\"x-request-id\"] }\n\
         [forward_auth]\nenabled = true\n",
    )
    .await;
    let mut m = Matrix::new("cors answers");
    let results = m
        .run(&s, |s, engine| async move {
            let addr = s.gw.proxy;
            let key = s.key.as_str();
            let preflight = |origin: &'static str| {
                vec![
                    ("origin", origin),
                    ("access-control-request-method", "PUT"),
                    ("access-control-request-headers", "x-api-key"),
                ]
            };
            let verify = |method: &'static str, origin: &'static str| {
                vec![
                    ("x-forwarded-method", method),
                    ("x-forwarded-uri", "/cors"),
                    ("origin", origin),
                    ("access-control-request-method", "PUT"),
                ]
            };
            /// Name, method, path, fields, status, the origin granted.
            type Case<'a> = (
                &'static str,
                &'static str,
                &'static str,
                Vec<(&'static str, &'a str)>,
                u16,
                Option<&'static str>,
            );
            let with_key = vec![("origin", APP), ("x-api-key", key)];
            let cases: Vec<Case> = vec![
                (
                    "preflight",
                    "OPTIONS",
                    "/cors",
                    preflight(APP),
                    204,
                    Some(APP),
                ),
                (
                    "preflight refused",
                    "OPTIONS",
                    "/cors",
                    preflight(EVIL),
                    403,
                    None,
                ),
                ("allowed", "GET", "/cors", with_key, 200, Some(APP)),
                (
                    "other origin",
                    "GET",
                    "/cors",
                    vec![("origin", EVIL), ("x-api-key", key)],
                    200,
                    None,
                ),
                (
                    "no key",
                    "GET",
                    "/cors",
                    vec![("origin", APP)],
                    401,
                    Some(APP),
                ),
                // A method the route does not answer: 405 under the route's own rules.
                (
                    "method not allowed",
                    "POST",
                    "/cors",
                    vec![("origin", APP), ("x-api-key", key)],
                    405,
                    Some(APP),
                ),
                (
                    "verify preflight",
                    "GET",
                    "/_keygate/verify",
                    verify("OPTIONS", APP),
                    204,
                    Some(APP),
                ),
                (
                    "verify preflight refused",
                    "GET",
                    "/_keygate/verify",
                    verify("OPTIONS", EVIL),
                    403,
                    None,
                ),
                (
                    "verify without a key",
                    "GET",
                    "/_keygate/verify",
                    verify("GET", APP),
                    401,
                    Some(APP),
                ),
                (
                    "verify of a method not allowed",
                    "GET",
                    "/_keygate/verify",
                    verify("POST", APP),
                    405,
                    Some(APP),
                ),
            ];
            let mut views = Vec::new();
            for (name, method, path, headers, status, granted) in cases {
                let a = expect_ok(
                    send(engine, addr, method, path, &headers, Body::Empty).await,
                    name,
                );
                let what = format!("{engine:?} {name}:\n{}", a.head);
                assert_eq!(a.status, status, "{what}");
                let acao: Vec<&str> = a
                    .headers
                    .iter()
                    .filter(|(k, _)| k == "access-control-allow-origin")
                    .map(|(_, v)| v.as_str())
                    .collect();
                assert_eq!(acao, granted.into_iter().collect::<Vec<_>>(), "{what}");
                assert_eq!(
                    a.header("access-control-allow-credentials").is_some(),
                    granted.is_some(),
                    "{what}"
                );
                assert!(
                    a.headers.iter().any(|(k, v)| k == "vary" && v == "origin"),
                    "{what}"
                );
                if granted.is_none() {
                    assert!(
                        !a.headers
                            .iter()
                            .any(|(k, _)| k.starts_with("access-control-")),
                        "{what}"
                    );
                }
                if status == 204 {
                    assert_eq!(
                        a.header("access-control-allow-headers").as_deref(),
                        Some("authorization, content-type, x-api-key"),
                        "{what}"
                    );
                }
                if name == "allowed" {
                    // The upstream's own CORS fields are replaced; its other fields pass.
                    assert_eq!(a.header("access-control-max-age"), None, "{what}");
                    assert_eq!(a.header("x-request-id").as_deref(), Some("r-1"), "{what}");
                    assert!(
                        a.header("access-control-expose-headers").is_some_and(|v| v
                            .contains("retry-after")
                            && v.contains("x-request-id")),
                        "{what}"
                    );
                }
                views.push((name, view(&a)));
            }
            views
        })
        .await;
    m.agree("the CORS answers", &results);
    assert!(
        s.script
            .seen()
            .iter()
            .all(|x| !x.head.starts_with("OPTIONS")),
        "a preflight reached the upstream"
    );
    m.check();
}

/// keygate's own answers outside any route (health, the key set of signed identity) carry the
/// default `[proxy] cors` fields alike on every engine (the key set's were left out on hyper's).
#[tokio::test]
async fn own_answers_carry_the_default_cors_fields_alike() {
    const APP: &str = "https://app.example.com";
    let s =
        setup("[identity]\nsign = true\n[proxy.cors]\norigins = [\"https://app.example.com\"]\n")
            .await;
    let mut m = Matrix::new("own answers' CORS");
    let results = m
        .run(&s, |s, engine| async move {
            let mut views = Vec::new();
            for path in ["/_keygate/health", "/.well-known/jwks.json"] {
                let a = expect_ok(
                    send(
                        engine,
                        s.gw.proxy,
                        "GET",
                        path,
                        &[("origin", APP)],
                        Body::Empty,
                    )
                    .await,
                    path,
                );
                let what = format!("{engine:?} {path}:\n{}", a.head);
                assert_eq!(a.status, 200, "{what}");
                assert_eq!(
                    a.header("access-control-allow-origin").as_deref(),
                    Some(APP),
                    "{what}"
                );
                let mut cors: Vec<(String, String)> = a
                    .headers
                    .iter()
                    .filter(|(k, _)| k.starts_with("access-control-") || k == "vary")
                    .cloned()
                    .collect();
                cors.sort();
                views.push((path, cors));
            }
            views
        })
        .await;
    m.agree("the CORS fields of own answers", &results);
    m.check();
}

/// What an HTTP/2 request must become before an HTTP/1.1 upstream reads it: its `cookie`
/// crumbs joined into one field with "; " (RFC 9113 §8.2.3; before, each went as a line of its
/// own), its `:authority` the `X-Forwarded-Host` over a `Host` field that differs (RFC 9113
/// §8.3.1; before, the `Host` won), and no more fields than `limits.max_headers` (431, as the
/// HTTP/1.1 engines answer; before, HTTP/2 took any number).
#[tokio::test]
async fn http2_requests_reach_the_upstream_as_http1_needs_them() {
    let s = setup("").await;
    let auth = ("X-API-Key", s.key.as_str());
    let target = "/ok?h2=cookies";
    let a = expect_ok(
        send(
            Engine::H2c,
            s.gw.proxy,
            "GET",
            target,
            &[
                auth,
                ("cookie", "a=1"),
                ("cookie", "b=2"),
                ("host", "evil.example"),
            ],
            Body::Empty,
        )
        .await,
        "h2c",
    );
    assert_eq!(a.status, 200, "{}", a.head);
    let seen = s.script.seen_at(target).expect("the upstream saw it");
    let cookies: Vec<_> = seen
        .fields()
        .into_iter()
        .filter(|(k, _)| k == "cookie")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(cookies, ["a=1; b=2"], "{}", seen.head);
    assert_eq!(
        seen.header("x-forwarded-host").as_deref(),
        Some("gw.example"),
        "{}",
        seen.head
    );
    // More fields than the limit (100 by default): 431 on every engine.
    let names: Vec<String> = (0..120).map(|i| format!("x-field-{i}")).collect();
    let mut many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    many.push(auth);
    for engine in ENGINES {
        let a = expect_ok(
            send(engine, s.gw.proxy, "GET", "/ok?h2=many", &many, Body::Empty).await,
            engine.name(),
        );
        assert_eq!(a.status, 431, "{engine:?}:\n{}", a.head);
    }
    assert!(s.script.seen_at("/ok?h2=many").is_none());
}

/// Lengths a bodiless answer must not carry as the upstream wrote them: a 204 with a
/// `Content-Length`, and a HEAD answer's length as a list (`100, 100`). Every engine relays no
/// length on the 204 and one plain number (or none) on the HEAD answer (RFC 9110 §8.6; an
/// HTTP/2 client resets the stream for a list), and the connection serves the next request.
#[tokio::test]
async fn bodiless_answers_carry_no_length_they_must_not() {
    let s = setup("").await;
    for engine in ENGINES {
        let key = [("x-api-key", s.key.as_str())];
        let mut c = Client::new(engine, s.gw.proxy);
        let a = expect_ok(
            c.send("GET", "/nocontent", &key, Body::Empty).await,
            "/nocontent",
        );
        assert_eq!(a.status, 204, "{engine:?}:\n{}", a.head);
        assert!(
            a.header("content-length").is_none(),
            "{engine:?}:\n{}",
            a.head
        );
        let a = expect_ok(
            c.send("HEAD", "/listed", &key, Body::Empty).await,
            "/listed",
        );
        assert_eq!(a.status, 200, "{engine:?}:\n{}", a.head);
        assert!(
            a.header("content-length").is_none_or(|l| l == "100"),
            "{engine:?}:\n{}",
            a.head
        );
        let a = expect_ok(c.get("/ok", &key).await, "/ok after");
        assert_eq!((a.status, &a.body[..]), (200, &b"ok"[..]), "{engine:?}");
    }
}

/// An HTTP/2 connection that starts no request but keeps sending frames (a PING every 200 ms,
/// as a client's keep-alive does, or answering the server's own) is closed once idle for
/// `header_read_timeout`, as one that sends nothing: frames that start no request do not keep
/// its slot (before, every frame read started the idle time again).
#[tokio::test]
async fn an_http2_connection_that_only_pings_is_closed_when_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup("").await;
    let mut c = tokio::net::TcpStream::connect(s.gw.proxy).await.unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00keygate!";
    let bound = HEADER_READ_TIMEOUT * 4;
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        assert!(
            started.elapsed() < bound,
            "a pinging connection still open after {bound:?}"
        );
        if c.write_all(ping).await.is_err() {
            break;
        }
        let read = tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            break;
        }
    }
}
