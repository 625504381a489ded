//! The only upstream I/O. Bodies stream both ways; nothing is buffered whole.
//!
//! Plain `http://` requests go through our own pool of keep-alive HTTP/1.1 connections: a
//! request takes an idle connection (LIFO, so few connections stay warm) and the response body
//! hands it back when the upstream's answer has been read to its end. No task is spawned and no
//! pool map is hashed per request. A request whose reused connection turned out to be closed
//! before the request was written is retried once on another connection.
//!
//! `https://` upstreams (HTTP/2 where offered by ALPN; certificates verified against the webpki
//! roots or the configured CA) and WebSocket upgrades go through hyper-util's pooled client.
//!
//! WebSocket: a request that asked for `Upgrade: websocket` is forwarded with its upgrade
//! headers, and bytes are bridged only after the upstream answered 101 with the right
//! `Sec-WebSocket-Accept`. Any other answer is relayed as a plain response and the client's
//! connection stays HTTP, so bytes sent after it are parsed (and authenticated) as requests.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http::header::{CONNECTION, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::headers;
use crate::auth::Permit;
use crate::error::ProxyError;

/// Idle upstream connections are kept this long for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream host.
const POOL_MAX_IDLE_PER_HOST: usize = 1024;
/// How long a request waits for a pooled connection that is not ready yet before using another.
const REUSE_WAIT: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct Forwarder {
    /// Plain http:// requests of the HTTP/1.1 fast path (`proxy::h1`).
    pub(crate) h1: Arc<super::h1::upstream::Pool>,
    /// Plain http:// requests served through hyper (HTTP/2 clients, chunked uploads…).
    pool: Arc<Pool>,
    /// https:// upstreams and WebSocket upgrades.
    client: Client<HttpsConnector<HttpConnector>, ClientBody>,
    connect_timeout: Duration,
    timeout: Duration,
    /// Longest pause of a request body on the hyper path.
    body_timeout: Duration,
}

/// The full cause chain of an error, for log lines that say what actually failed
/// (e.g. "invalid peer certificate: UnknownIssuer").
pub(crate) fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

struct Idle {
    send: SendRequest<ClientBody>,
    since: Instant,
}

/// Idle connections per upstream authority (a handful of upstreams: a list beats a map).
#[derive(Default)]
struct Pool {
    hosts: Mutex<Vec<(Authority, VecDeque<Idle>)>>,
}

impl Pool {
    fn take(&self, authority: &Authority) -> Option<SendRequest<ClientBody>> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let (_, idle) = hosts.iter_mut().find(|(a, _)| a == authority)?;
        while let Some(c) = idle.pop_back() {
            if !c.send.is_closed() {
                return Some(c.send);
            }
        }
        None
    }

    fn put(&self, authority: &Authority, send: SendRequest<ClientBody>) {
        if send.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let idle = match hosts.iter().position(|(a, _)| a == authority) {
            Some(i) => &mut hosts[i].1,
            None => {
                hosts.push((authority.clone(), VecDeque::new()));
                &mut hosts.last_mut().expect("just pushed").1
            }
        };
        // The oldest connections sit at the front: drop those idle for too long.
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.since) > POOL_IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < POOL_MAX_IDLE_PER_HOST {
            idle.push_back(Idle { send, since: now });
        }
    }
}

/// A connection lent to one response, returned to the pool when the body has been read.
struct Lease {
    pool: Arc<Pool>,
    authority: Authority,
    send: SendRequest<ClientBody>,
}

/// The upstream's response body. Returns its connection to the pool once the body is complete;
/// a body dropped before its end closes the connection instead. Either way the request body
/// still being sent (the upstream answered early) is cut off: nobody waits for it any more.
pub struct UpstreamBody {
    inner: Incoming,
    lease: Option<Lease>,
    request_done: Arc<Answered>,
}

impl UpstreamBody {
    /// A body whose connection belongs to another pool.
    fn unpooled(inner: Incoming, request_done: Arc<Answered>) -> Self {
        Self {
            inner,
            lease: None,
            request_done,
        }
    }

    fn release(&mut self) {
        self.request_done.fire();
        if let Some(l) = self.lease.take() {
            l.pool.put(&l.authority, l.send);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.release(),
            Some(Err(_)) => this.lease = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.release();
        }
        self.request_done.fire();
    }
}

/// Set once the response to a request has been relayed (or abandoned).
#[derive(Default)]
pub struct Answered {
    done: std::sync::atomic::AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

impl Answered {
    fn fire(&self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        self.waker.wake();
    }
}

/// Why a client's request body stopped on its way upstream.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("the request body paused for longer than the body timeout")]
    Timeout,
    #[error("the response was relayed before the request body ended")]
    Unneeded,
    #[error(transparent)]
    Read(hyper::Error),
}

/// The client's request body on its way upstream (the hyper path): an error when it pauses
/// longer than `limits.body_timeout`, and cut off once the response to it has been relayed.
pub struct ClientBody {
    inner: Incoming,
    idle: Duration,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    answered: Arc<Answered>,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = &mut *self;
        this.answered.waker.register(cx.waker());
        if this
            .answered
            .done
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Poll::Ready(Some(Err(ClientBodyError::Unneeded)));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.pause = None;
            return Poll::Ready(frame.map(|f| f.map_err(ClientBodyError::Read)));
        }
        let idle = this.idle;
        let pause = this
            .pause
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if pause.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(ClientBodyError::Timeout)));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the request path knows about the connection a request came on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: std::net::SocketAddr,
    pub peer_ip: HeaderValue,
    pub proto: &'static str,
}

impl ConnInfo {
    pub fn new(peer: std::net::SocketAddr, proto: &'static str) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            peer,
            peer_ip,
            proto,
        }
    }
}

impl Forwarder {
    /// `ca`: PEM bundle for `https://` upstreams (default: the webpki roots).
    pub fn new(
        connect_timeout: Duration,
        timeout: Duration,
        body_timeout: Duration,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.enforce_http(false);
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(crate::tls::client_config(ca)?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(https);
        Ok(Self {
            h1: Arc::new(super::h1::upstream::Pool::new(connect_timeout)),
            pool: Arc::default(),
            client,
            connect_timeout,
            timeout,
            body_timeout,
        })
    }

    /// Time allowed from sending a request until the upstream's response head has arrived.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `req` to the permit's upstream. Headers must already be rewritten except for
    /// those this function owns: target URI, `Host`, identity and forwarding headers.
    pub async fn forward(
        &self,
        permit: Permit<'_>,
        req: Request<Incoming>,
        conn: &ConnInfo,
        path_and_query: Option<PathAndQuery>,
        websocket: bool,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let route = permit.route();
        let answered = Arc::new(Answered::default());
        let mut req = req.map(|inner| ClientBody {
            inner,
            idle: self.body_timeout,
            pause: None,
            answered: Arc::clone(&answered),
        });
        if !websocket && route.upstream.scheme() == Some(&Scheme::HTTP) {
            return self
                .forward_pooled(permit, req, conn, path_and_query, answered)
                .await;
        }
        let client_side = websocket.then(|| hyper::upgrade::on(&mut req));
        let expected_accept = websocket
            .then(|| headers::websocket_accept(req.headers()))
            .flatten();
        let upstream = &route.upstream;
        let original_host = req.headers_mut().remove(http::header::HOST).or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(upstream.scheme().cloned().unwrap_or(Scheme::HTTP));
        parts.authority = upstream.authority().cloned();
        if let Some(pq) = path_and_query {
            parts.path_and_query = Some(pq);
        } else if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        *req.uri_mut() =
            Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        *req.version_mut() = Version::HTTP_11;

        let h = req.headers_mut();
        if let Some(p) = permit.principal() {
            headers::add_identity(h, &p.headers);
        }
        headers::add_forwarded(h, &conn.peer_ip, conn.proto, original_host, &route.host);
        if websocket {
            h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        }

        let mut res = match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => return Err(ProxyError::UpstreamTimeout),
            Ok(Err(e)) if let Some(refused) = client_body_failed(&e) => {
                tracing::debug!(route = %route.name, error = %e, "the client's request body failed");
                return Err(refused);
            }
            Ok(Err(e)) => {
                tracing::warn!(
                    route = %route.name,
                    upstream = %route.upstream,
                    connect = e.is_connect(),
                    error = %cause_chain(&e),
                    "upstream request failed"
                );
                return Err(ProxyError::UpstreamUnavailable);
            }
            Ok(Ok(res)) => res,
        };
        if unrelayable_coding(res.headers()) {
            tracing::warn!(route = %route.name, "upstream answered with a transfer coding other than chunked");
            return Err(ProxyError::UpstreamUnavailable);
        }
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_side) = client_side else {
                tracing::warn!(route = %route.name, "upstream switched protocols unasked");
                return Err(ProxyError::UpstreamUnavailable);
            };
            let accept = res.headers().get("sec-websocket-accept");
            if expected_accept.is_none() || accept != expected_accept.as_ref() {
                tracing::warn!(route = %route.name, "upstream 101 without a valid Sec-WebSocket-Accept");
                return Err(ProxyError::UpstreamUnavailable);
            }
            let upstream_side = hyper::upgrade::on(&mut res);
            tokio::spawn(bridge(client_side, upstream_side));
            headers::remove_hop_by_hop(res.headers_mut());
            let h = res.headers_mut();
            h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            return Ok(res.map(|b| UpstreamBody::unpooled(b, answered)));
        }
        headers::remove_hop_by_hop(res.headers_mut());
        Ok(res.map(|b| UpstreamBody::unpooled(b, answered)))
    }

    /// The fast path: a plain http:// request on our own connection pool.
    async fn forward_pooled(
        &self,
        permit: Permit<'_>,
        mut req: Request<ClientBody>,
        conn: &ConnInfo,
        path_and_query: Option<PathAndQuery>,
        answered: Arc<Answered>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let route = permit.route();
        let upstream = &route.upstream;
        let original_host = req.headers_mut().remove(http::header::HOST).or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        // HTTP/1.1 to the upstream in origin form: only the path and query go on the wire.
        let pq = match path_and_query {
            Some(pq) => pq,
            None => std::mem::take(req.uri_mut())
                .into_parts()
                .path_and_query
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        };
        *req.uri_mut() = pq.into();
        *req.version_mut() = Version::HTTP_11;
        let Some(authority) = upstream.authority() else {
            return Err(ProxyError::UpstreamUnavailable);
        };

        let h = req.headers_mut();
        // Room for the (up to) eight fields added below, so the map grows once, not per field.
        h.reserve(8);
        if let Some(p) = permit.principal() {
            headers::add_identity(h, &p.headers);
        }
        headers::add_forwarded(h, &conn.peer_ip, conn.proto, original_host, &route.host);

        let sent = tokio::time::timeout(self.timeout, self.send(authority, req)).await;
        let (res, send) = match sent {
            Err(_) => return Err(ProxyError::UpstreamTimeout),
            Ok(Err(e)) if let Some(refused) = e.client_body_failed() => {
                tracing::debug!(route = %route.name, error = %e, "the client's request body failed");
                return Err(refused);
            }
            Ok(Err(e)) => {
                tracing::warn!(
                    route = %route.name,
                    upstream = %route.upstream,
                    connect = e.is_connect(),
                    error = %cause_chain(&e),
                    "upstream request failed"
                );
                return Err(ProxyError::UpstreamUnavailable);
            }
            Ok(Ok(sent)) => sent,
        };
        if unrelayable_coding(res.headers()) {
            tracing::warn!(route = %route.name, "upstream answered with a transfer coding other than chunked");
            return Err(ProxyError::UpstreamUnavailable);
        }
        let lease = Lease {
            pool: Arc::clone(&self.pool),
            authority: authority.clone(),
            send,
        };
        let mut res = res.map(|inner| UpstreamBody {
            inner,
            lease: Some(lease),
            request_done: answered,
        });
        headers::remove_hop_by_hop(res.headers_mut());
        Ok(res)
    }

    /// Sends on an idle connection, or a new one. A reused connection that closed before the
    /// request was written gets the request back, and the next connection is tried.
    async fn send(
        &self,
        authority: &Authority,
        mut req: Request<ClientBody>,
    ) -> Result<(Response<Incoming>, SendRequest<ClientBody>), UpstreamError> {
        loop {
            let (mut send, reused) = match self.pool.take(authority) {
                Some(s) => (s, true),
                // Boxed: connecting is rare, and its large state would otherwise be part of
                // (and be moved with) every request's future.
                None => (Box::pin(self.connect(authority)).await?, false),
            };
            if reused && !send.is_ready() {
                // Usually ready within microseconds; a connection still writing a slow client's
                // upload (the upstream answered early) is not waited for: it is let go and
                // another connection is used.
                match tokio::time::timeout(REUSE_WAIT, send.ready()).await {
                    Ok(Ok(())) => {}
                    _ => continue,
                }
            } else if send.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(UpstreamError::Closed);
            }
            match send.try_send_request(req).await {
                Ok(res) => return Ok((res, send)),
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => req = back,
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
    }

    async fn connect(
        &self,
        authority: &Authority,
    ) -> Result<SendRequest<ClientBody>, UpstreamError> {
        let port = authority.port_u16().unwrap_or(80);
        let connect = async {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((authority.host(), port))
                .await
                .map_err(UpstreamError::Connect)?
                .collect();
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(UpstreamError::Connect(last.unwrap_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
            })))
        };
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)??;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(send)
    }
}

/// Copies bytes both ways between the upgraded client and upstream connections.
async fn bridge(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                tracing::debug!(error = %e, "websocket tunnel closed with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "websocket upgrade did not complete"),
    }
}

/// The answer when a forward failed because of the client's own request body: malformed
/// chunked framing or an upload cut short is the client's fault (400, not the upstream's 502);
/// a body that paused too long is 408.
fn client_body_failed(e: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    let mut user = false;
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<ClientBodyError>() {
            return Some(match b {
                ClientBodyError::Timeout => ProxyError::BodyTimeout,
                _ => ProxyError::BadRequest("the request body is malformed or was cut short"),
            });
        }
        user |= s
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user);
        source = s.source();
    }
    user.then_some(ProxyError::BadRequest(
        "the request body is malformed or was cut short",
    ))
}

/// True when a response's body is under a transfer coding other than one `chunked` (gzip…):
/// hyper removes the chunked framing, and the other coding cannot be relayed without its
/// `Transfer-Encoding`, which is hop-by-hop; such a response is refused (502).
fn unrelayable_coding(h: &http::HeaderMap) -> bool {
    let mut codings = h.get_all(http::header::TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (None, _) => false,
        (Some(v), None) => !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => true,
    }
}

/// Why an upstream request failed (logged; the client sees 502).
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Http(hyper::Error),
}

impl UpstreamError {
    fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::ConnectTimeout)
    }

    /// The client's request body failed (see [`client_body_failed`]).
    fn client_body_failed(&self) -> Option<ProxyError> {
        match self {
            Self::Http(e) => client_body_failed(e),
            _ => None,
        }
    }
}
