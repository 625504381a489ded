//! The hyper engine: HTTP/2 (h2c and TLS) and every HTTP/1.1 request the fast path hands over
//! (chunked or `Expect` uploads, HTTP/1.0, upgrades, unusual targets, `POST /auth/login`,
//! `https://` routes). It shows the policy core a view of `http::request::Parts` and carries
//! out the same decisions as the fast path:
//!
//! - plain `http://` upstreams go through the one HTTP/1.1 client ([`super::upstream`]): the
//!   head is written by the same writer as the fast path's, the body streamed (chunked when its
//!   length is not known; trailer fields filtered by the request field rules), the response
//!   head parsed by the same parser and its body read by the same reader, with the same
//!   timeouts and retry rule;
//! - `https://` upstreams (HTTP/2 where offered by ALPN; certificates verified against the
//!   webpki roots or the configured CA) and WebSocket upgrades go through hyper-util's client.
//!
//! WebSocket: a request that asked for `Upgrade: websocket` is forwarded with its upgrade
//! headers, and bytes are bridged only after the upstream answered 101 with the right
//! `Sec-WebSocket-Accept`. Any other answer is relayed as a plain response and the client's
//! connection stays HTTP, so bytes sent after it are parsed (and authenticated) as requests.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::codec::head::Framing;
use super::codec::wire::{self, BodyOut};
use super::h1::CUT_SHORT;
use super::headers;
use super::policy::{self, Admitted, FieldRules, Routed, Rule};
use super::upstream::{self, BodyReader, BodySource, Conn, Exchange, Pool, Step};
use super::{ConnInfo, Gateway, Outcome};
use crate::proxy::error::ProxyError;
use crate::route::Route;

/// Response body of the proxy: the upstream's stream, or a body the gateway wrote itself.
pub type ProxyBody = Either<UpstreamBody, Full<Bytes>>;

/// Idle upstream connections of hyper-util's client are kept this long.
const POOL_IDLE_TIMEOUT: Duration = upstream::IDLE_TIMEOUT;
/// Largest login body read.
const LOGIN_MAX_BODY: usize = 16 * 1024;
/// A small body read whole ran past its limit (a body that could not be read is another 400).
const BODY_TOO_LARGE: &str = "the body is too large";

/// hyper-util's client, for `https://` upstreams and WebSocket upgrades.
#[derive(Clone)]
pub struct HyperClient {
    client: Client<HttpsConnector<HttpConnector>, ClientBody>,
    /// For WebSocket upgrades: HTTP/1.1 only. Offered h2 by an upstream's ALPN (or on a pooled
    /// HTTP/2 connection), the upgrade would go as an HTTP/2 request without its `Upgrade` and
    /// `Connection` fields, and never open a tunnel.
    upgrades: Client<HttpsConnector<HttpConnector>, ClientBody>,
}

impl HyperClient {
    /// `ca`: PEM bundle for `https://` upstreams (default: the webpki roots).
    pub fn new(connect_timeout: Duration, ca: Option<&std::path::Path>) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.enforce_http(false);
        let tls = crate::tls::client_config(ca)?;
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http.clone());
        let h1 = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let build = |connector| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_max_idle_per_host(upstream::MAX_IDLE_PER_HOST)
                .build(connector)
        };
        Ok(Self {
            client: build(https),
            upgrades: build(h1),
        })
    }
}

impl Gateway {
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<ProxyBody> {
        let start = self.access_log.then(Instant::now);
        let (mut parts, body) = req.into_parts();
        let mut outcome = Outcome::default();
        let served = if parts.version == Version::HTTP_2 {
            h2_request(&mut parts, self.policy.max_headers).and_then(|()| one_host(&parts))
        } else {
            one_host(&parts)
        };
        let served = match served {
            Ok(()) => self.serve_hyper(&parts, body, conn, &mut outcome).await,
            Err(e) => Err(e),
        };
        let mut res = match served {
            Ok(res) => res,
            Err(e) => {
                let mut res = e.response::<Bytes>();
                self.cors_own(outcome.route, &parts, &mut res);
                own(res)
            }
        };
        if parts.method == http::Method::HEAD {
            head_answer(&mut res);
        }
        self.finish(
            &parts.method,
            parts.uri.path(),
            &outcome,
            res.status().as_u16(),
            start,
            conn,
        );
        res
    }

    async fn serve_hyper<'g>(
        &'g self,
        parts: &http::request::Parts,
        body: Incoming,
        conn: &ConnInfo,
        outcome: &mut Outcome<'g>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let route = match self.route(parts, outcome)? {
            Routed::Health => {
                let mut res = policy::health();
                self.cors_own(None, parts, &mut res);
                return Ok(own(res));
            }
            Routed::Login => {
                let body = self.read_small(body, LOGIN_MAX_BODY).await?;
                let ip = self.policy.client_ip(parts, conn.peer.ip());
                let mut res = self.login(&body, ip).await?;
                self.cors_own(None, parts, &mut res);
                return Ok(own(res));
            }
            Routed::Verify => {
                let mut res = self.verify(parts, conn, outcome).await;
                self.cors_own(outcome.route, parts, &mut res);
                return Ok(own(res));
            }
            // Answered by the core; nothing is forwarded.
            Routed::Preflight(route, answer) => {
                outcome.route = route;
                let mut res = answer?;
                self.cors_own(route, parts, &mut res);
                return Ok(own(res));
            }
            Routed::Jwks => {
                let mut res = self.jwks();
                self.cors_own(None, parts, &mut res);
                return Ok(own(res));
            }
            Routed::SecretScanning => {
                let ip = self.policy.client_ip(parts, conn.peer.ip());
                return Ok(own(self.leak_report(parts, body, ip).await));
            }
            Routed::Route(route) => route,
        };
        outcome.route = Some(route);
        let admitted = self.admit(route, parts, conn, outcome).await?;
        let websocket = headers::websocket_requested(&parts.headers, parts.version);
        let sent = Instant::now();
        let plain = route.upstream.scheme() == Some(&Scheme::HTTP);
        let forwarded = if plain && !websocket {
            self.relay(route, &admitted, parts, body, conn).await
        } else {
            self.forward_hyper(route, &admitted, parts, body, conn, websocket)
                .await
        };
        let upstream_time = sent.elapsed();
        outcome.upstream = Some(upstream_time);
        let mut res = match forwarded {
            Ok(res) => {
                self.metrics.upstream_latency.observe(upstream_time);
                res
            }
            Err(e) => {
                if e.status().is_server_error() {
                    self.metrics.upstream_errors.inc();
                }
                // Admitted and charged: the answer says what is left, as a relayed one does.
                let mut res = e.response::<Bytes>();
                if let Some(rate) = &admitted.rate {
                    headers::add_rate(res.headers_mut(), rate);
                }
                self.cors_own(Some(route), parts, &mut res);
                return Ok(own(res));
            }
        };
        if let Some(rate) = &admitted.rate {
            headers::add_rate(res.headers_mut(), rate);
            headers::add_cache(res.headers_mut(), &self.policy.cache);
        }
        if let Some(cors) = self.cors(Some(route)) {
            let origin = parts.headers.get(http::header::ORIGIN);
            let grant = cors.grant(origin.map(HeaderValue::as_bytes));
            cors.replace(res.headers_mut(), grant, origin.cloned());
        }
        Ok(res.map(Either::Left))
    }

    /// A leaked-key report: the body, bounded (413 above), to the leak reports. A report whose
    /// signature does not verify is a failed authentication of `ip` (audited, and past the
    /// failed-authentication allowance refused 429 without another audit line), so forged
    /// reports cannot flood the log.
    async fn leak_report(
        &self,
        parts: &http::request::Parts,
        body: Incoming,
        ip: std::net::IpAddr,
    ) -> Response<Bytes> {
        let res = self.leak_report_of(parts, body).await;
        if res.status() != http::StatusCode::UNAUTHORIZED {
            return res;
        }
        match self.failed_auth.record_failure(ip) {
            Some(retry_after) => ProxyError::AuthThrottled { retry_after }.response::<Bytes>(),
            None => {
                tracing::warn!(target: "keygate::audit", action = "secret_scanning.report", outcome = 401,
                    "leaked-key report refused: missing or invalid GitHub signature");
                res
            }
        }
    }

    /// The leak reports' answer to a report whose body is within [`MAX_BODY`](crate::events::leaks::MAX_BODY), else 413.
    async fn leak_report_of(
        &self,
        parts: &http::request::Parts,
        body: Incoming,
    ) -> Response<Bytes> {
        use crate::events::leaks::{MAX_BODY, too_large};
        let Some(leaks) = &self.leaks else {
            return ProxyError::RouteNotFound.response::<Bytes>();
        };
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return too_large();
        }
        // One byte over the limit tells a large body from one exactly at it.
        match self.read_small(body, MAX_BODY + 1).await {
            Ok(b) if b.len() > MAX_BODY => too_large(),
            Ok(b) => leaks.handle(&parts.headers, &b).await,
            Err(ProxyError::BadRequest(BODY_TOO_LARGE)) => too_large(),
            Err(e) => e.response::<Bytes>(),
        }
    }

    /// Reads a small body whole ([`BODY_TOO_LARGE`] past `limit`), within `limits.body_timeout` in all (not per pause: a client
    /// sending a byte now and then cannot hold its connection).
    async fn read_small(&self, body: Incoming, limit: usize) -> Result<Bytes, ProxyError> {
        let mut body = http_body_util::Limited::new(body, limit);
        let mut out = bytes::BytesMut::new();
        let deadline = tokio::time::Instant::now() + self.upstreams.body_timeout;
        loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(ProxyError::BodyTimeout),
                Ok(None) => return Ok(out.freeze()),
                Ok(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        out.extend_from_slice(d);
                    }
                }
                Ok(Some(Err(e))) => {
                    return Err(ProxyError::BadRequest(
                        if e.downcast_ref::<http_body_util::LengthLimitError>()
                            .is_some()
                        {
                            BODY_TOO_LARGE
                        } else {
                            "the body could not be read (broken framing)"
                        },
                    ));
                }
            }
        }
    }

    /// A plain `http://` request through the one HTTP/1.1 client.
    async fn relay(
        &self,
        route: &Route,
        admitted: &Admitted<'_>,
        parts: &http::request::Parts,
        body: Incoming,
        conn: &ConnInfo,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let Some(authority) = route.upstream.authority() else {
            return Err(ProxyError::UpstreamUnavailable);
        };
        let rules = &self.policy.fields;
        let named = headers::connection_names(&parts.headers);
        let rule = |name: &HeaderName| headers::rule_of(name, &named, |n| rules.request(n));
        let first = |r: Rule| {
            parts
                .headers
                .iter()
                .find(|(n, _)| rule(n) == r)
                .map(|(_, v)| v.as_bytes())
        };
        let has_length = first(Rule::ContentLength).is_some();
        let mut xff = None;
        for (_, v) in parts
            .headers
            .iter()
            .filter(|(n, _)| rule(n) == Rule::XForwardedFor)
        {
            headers::join_xff(&mut xff, v.clone());
        }
        let body_out = match body.size_hint().exact() {
            Some(n) if has_length => BodyOut::Length(n),
            _ if body.is_end_stream() => BodyOut::None,
            _ => BodyOut::Chunked,
        };
        let target = match &admitted.target {
            Some(t) => t.as_str(),
            None => parts.uri.path_and_query().map_or("/", PathAndQuery::as_str),
        };
        let mut out = Vec::with_capacity(1024);
        wire::request_head(
            &mut out,
            parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes(), rule(n))),
            &wire::Upstream {
                method: parts.method.as_str().as_bytes(),
                target: target.as_bytes(),
                strip: admitted.strip,
                identity: admitted.permit.principal().map(|p| &p.headers),
                assertion: admitted.assertion.as_ref().map(HeaderValue::as_bytes),
                xff: xff.as_ref().map(HeaderValue::as_bytes),
                // The request's authority: HTTP/2's `:authority` (RFC 9113 §8.3.1) or an
                // absolute-form target's (RFC 9112 §3.2.2), before any `Host` field.
                client_host: parts
                    .uri
                    .authority()
                    .map(|a| a.as_str().as_bytes())
                    .or_else(|| first(Rule::Host)),
                peer_ip: conn.peer_ip.as_bytes(),
                proto: conn.proto.as_bytes(),
                host: route.host.as_bytes(),
                body: body_out,
            },
        );
        let sent = Instant::now();
        let deadline = tokio::time::Instant::from_std(sent + self.upstreams.timeout);
        let mut source = StreamedBody {
            body,
            chunked: body_out == BodyOut::Chunked,
            ended: false,
            copied: false,
            timeout: self.upstreams.body_timeout,
            rules: &self.policy.fields,
            out: Vec::new(),
        };
        let mut fields = Vec::with_capacity(16);
        let Exchange {
            conn: uc,
            head: res,
            body_sent,
        } = self
            .upstreams
            .pool
            .exchange(
                route,
                authority,
                &out,
                &mut source,
                &parts.method,
                sent,
                deadline,
                &mut fields,
            )
            .await?;
        let own_rate = admitted.rate.is_some();
        let mut answer = Response::new(());
        *answer.status_mut() =
            StatusCode::from_u16(res.status).map_err(|_| ProxyError::UpstreamUnavailable)?;
        let h = answer.headers_mut();
        h.reserve(fields.len() + 4);
        // The values share one copy of the head (two allocations however many there are).
        let block = Bytes::copy_from_slice(&uc.buf[..res.len]);
        for f in &fields {
            if policy::relayed(f.kind, own_rate)
                && let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(f.name.get(&uc.buf)),
                    HeaderValue::from_maybe_shared(block.slice(f.value.range())),
                )
            {
                h.append(n, v);
            }
        }
        let size = match res.framing {
            Framing::Empty => Some(0),
            Framing::Length(n) => {
                // The length the gateway relays, set here from the table of small numbers
                // (hyper would otherwise format it into two allocations of its own).
                h.insert(http::header::CONTENT_LENGTH, super::error::number(n));
                Some(n)
            }
            _ => None,
        };
        let relay = Relay {
            reader: BodyReader::new(&res),
            conn: Some(uc),
            pool: Arc::clone(&self.upstreams.pool),
            authority: authority.clone(),
            reusable: body_sent && res.keep_alive && res.framing != Framing::Empty,
            idle: self.upstreams.timeout,
            route: route.name.clone(),
        };
        Ok(answer.map(|()| UpstreamBody::relayed(relay, size)))
    }

    /// An `https://` request or a WebSocket upgrade through hyper-util's client.
    async fn forward_hyper(
        &self,
        route: &Route,
        admitted: &Admitted<'_>,
        parts: &http::request::Parts,
        body: Incoming,
        conn: &ConnInfo,
        websocket: bool,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let answered = Arc::new(Answered::default());
        let mut req = Request::new(ClientBody {
            inner: body,
            idle: self.upstreams.body_timeout,
            pause: None,
            answered: Arc::clone(&answered),
            rules: self.policy.fields.clone(),
        });
        *req.method_mut() = parts.method.clone();
        *req.headers_mut() = parts.headers.clone();
        *req.extensions_mut() = parts.extensions.clone();
        let client_side = websocket.then(|| hyper::upgrade::on(&mut req));
        let expected_accept = websocket
            .then(|| headers::websocket_accept(&parts.headers))
            .flatten();
        let upstream = &route.upstream;
        let pq = match &admitted.target {
            Some(t) => t
                .parse()
                .map_err(|_| ProxyError::BadRequest("invalid request target"))?,
            None => parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(upstream.scheme().cloned().unwrap_or(Scheme::HTTP));
        uri.authority = upstream.authority().cloned();
        uri.path_and_query = Some(pq);
        *req.uri_mut() =
            Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        *req.version_mut() = Version::HTTP_11;

        let h = req.headers_mut();
        let mut inbound = headers::retain_forwarded(h, admitted.strip, &self.policy.fields);
        // The request's authority before any `Host` field (as above).
        if let Some(a) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            inbound.host = Some(a);
        }
        if let Some(p) = admitted.permit.principal() {
            headers::add_identity(h, &p.headers);
        }
        if let Some(a) = &admitted.assertion {
            h.insert(crate::identity::X_KEYGATE_ASSERTION, a.clone());
        }
        headers::add_forwarded(h, inbound, &conn.peer_ip, conn.proto, &route.host);
        if websocket {
            h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        }

        let client = if websocket {
            &self.upstreams.https.upgrades
        } else {
            &self.upstreams.https.client
        };
        let sent = tokio::time::timeout(self.upstreams.timeout, client.request(req));
        let mut res = match sent.await {
            Err(_) => return Err(ProxyError::UpstreamTimeout),
            Ok(Err(e)) if let Some(refused) = client_body_failed(&e) => {
                tracing::debug!(route = %route.name, error = %e, "the client's request body failed");
                return Err(refused);
            }
            Ok(Err(e)) => {
                upstream::failed(route, e.is_connect(), &e);
                return Err(ProxyError::UpstreamUnavailable);
            }
            Ok(Ok(res)) => res,
        };
        if unrelayable_coding(res.headers()) {
            tracing::warn!(route = %route.name, "upstream answered with a transfer coding other than chunked");
            return Err(ProxyError::UpstreamUnavailable);
        }
        let own_rate = admitted.rate.is_some();
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
            headers::retain_relayed(res.headers_mut(), own_rate);
            let h = res.headers_mut();
            h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            return Ok(res.map(|b| UpstreamBody::hyper(b, answered, self.upstreams.timeout)));
        }
        headers::retain_relayed(res.headers_mut(), own_rate);
        let status = res.status();
        headers::one_length(res.headers_mut(), status);
        Ok(res.map(|b| UpstreamBody::hyper(b, answered, self.upstreams.timeout)))
    }
}

/// A response the gateway wrote itself.
fn own(res: Response<Bytes>) -> Response<ProxyBody> {
    res.map(|b| Either::Right(Full::new(b)))
}

/// What an HTTP/2 request needs before it is read as an HTTP/1.1 one: at most `max_headers`
/// fields (hyper counts them for HTTP/1.1 only: 431 past them), and its `cookie` crumbs
/// joined into one field with "; " (RFC 9113 §8.2.3; an HTTP/1.1 upstream reads one `Cookie`
/// line, RFC 6265 §5.4).
fn h2_request(parts: &mut http::request::Parts, max_headers: usize) -> Result<(), ProxyError> {
    if parts.headers.len() > max_headers {
        return Err(ProxyError::TooManyFields);
    }
    let crumbs = parts.headers.get_all(http::header::COOKIE);
    if crumbs.iter().nth(1).is_some() {
        let mut joined = Vec::new();
        for c in crumbs {
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(c.as_bytes());
        }
        let joined = HeaderValue::from_bytes(&joined)
            .map_err(|_| ProxyError::BadRequest("invalid cookie field"))?;
        parts.headers.insert(http::header::COOKIE, joined);
    }
    Ok(())
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host` field, and no request more than
/// one (two would be read one way by the gateway and another by what stands behind it). HTTP/2
/// and HTTP/1.0 may leave it out.
fn one_host(parts: &http::request::Parts) -> Result<(), ProxyError> {
    let mut hosts = parts.headers.get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => Err(ProxyError::BadRequest("more than one Host field")),
        (None, _) if parts.version == Version::HTTP_11 => Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs a Host field",
        )),
        _ => Ok(()),
    }
}

/// The gateway's own answer to a HEAD request: the length of the body a GET would get, and no
/// body (RFC 9110 §9.3.2; over HTTP/2 a DATA frame on a HEAD answer is a protocol error the
/// client resets the stream for). An upstream's answer is relayed as it came.
fn head_answer(res: &mut Response<ProxyBody>) {
    if let Either::Right(full) = res.body() {
        let len = full.size_hint().exact().unwrap_or(0);
        if res.status() != StatusCode::NO_CONTENT {
            res.headers_mut()
                .entry(http::header::CONTENT_LENGTH)
                .or_insert(http::HeaderValue::from(len));
        }
        *res.body_mut() = Either::Right(Full::new(Bytes::new()));
    }
}

/// A request body read by hyper, on its way through the one HTTP/1.1 client.
struct StreamedBody<'a> {
    body: Incoming,
    /// Framed as chunks (its length was not known).
    chunked: bool,
    /// The client's body has ended (on a retry only its end is written again).
    ended: bool,
    /// Bytes of the body (or its trailer fields) were copied: they cannot be sent again.
    copied: bool,
    /// Longest pause of the body.
    timeout: Duration,
    rules: &'a FieldRules,
    out: Vec<u8>,
}

impl BodySource for StreamedBody<'_> {
    async fn pump(
        &mut self,
        uc: &mut Conn,
        deadline: tokio::time::Instant,
    ) -> Result<bool, ProxyError> {
        let mut up = uc.watch();
        loop {
            if self.ended {
                return if self.chunked {
                    up.write(wire::LAST_CHUNK, deadline).await
                } else {
                    Ok(true)
                };
            }
            let frame = tokio::select! {
                biased;
                a = up.answered() => return a.map(|()| false),
                f = tokio::time::timeout(self.timeout, self.body.frame()) => f,
                () = tokio::time::sleep_until(deadline) => return Err(ProxyError::UpstreamTimeout),
            };
            let frame = match frame {
                Err(_) => return Err(ProxyError::BodyTimeout),
                Ok(None) => {
                    self.ended = true;
                    continue;
                }
                Ok(Some(Err(_))) => return Err(ProxyError::BadRequest(CUT_SHORT)),
                Ok(Some(Ok(frame))) => frame,
            };
            self.out.clear();
            let frame = match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) if !self.chunked => {
                    self.copied = true;
                    if !up.write(&data, deadline).await? {
                        return Ok(false);
                    }
                    continue;
                }
                Ok(data) => {
                    self.copied = true;
                    wire::chunk_start(&mut self.out, data.len());
                    self.out.extend_from_slice(&data);
                    self.out.extend_from_slice(wire::CHUNK_END);
                    if !up.write(&self.out, deadline).await? {
                        return Ok(false);
                    }
                    continue;
                }
                Err(frame) => frame,
            };
            // Trailer fields end a chunked body, filtered by the rules of the head's fields.
            if let Ok(mut trailers) = frame.into_trailers()
                && self.chunked
            {
                self.copied = true;
                self.ended = true;
                headers::retain_trailers(&mut trailers, self.rules);
                self.out.extend_from_slice(b"0\r\n");
                for (name, value) in &trailers {
                    self.out.extend_from_slice(name.as_str().as_bytes());
                    self.out.extend_from_slice(b": ");
                    self.out.extend_from_slice(value.as_bytes());
                    self.out.extend_from_slice(b"\r\n");
                }
                self.out.extend_from_slice(b"\r\n");
                return up.write(&self.out, deadline).await;
            }
        }
    }

    fn pending(&self) -> bool {
        // A chunked body always ends with its last chunk, written by the pump.
        self.chunked || !self.ended && !self.body.is_end_stream()
    }

    fn replayable(&self) -> bool {
        !self.copied
    }
}

/// A response body on its way from the one HTTP/1.1 client to hyper: its connection goes back
/// to the pool when the body was read exactly to its end.
struct Relay {
    reader: BodyReader,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    authority: Authority,
    reusable: bool,
    idle: Duration,
    route: String,
}

/// Why a relayed response body was cut off.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RelayError(&'static str);

/// The read of more response body bytes, with the relay it reads for.
type Filling = Pin<Box<dyn Future<Output = (Relay, Result<(), &'static str>)> + Send>>;

impl Relay {
    /// The relay cut off: its connection is dropped.
    fn broken(self, why: &'static str) -> RelayError {
        tracing::debug!(route = %self.route, why, "response relay broken off");
        RelayError(why)
    }

    /// Gives the connection back to the pool when the body was read exactly to its end (and
    /// the exchange allows reuse); drops it otherwise.
    fn release(&mut self) {
        if let Some(mut uc) = self.conn.take()
            && self.reusable
            && matches!(self.reader.step(&uc), Ok(Step::End))
            && self.reader.at_boundary(&uc)
        {
            uc.end = 0;
            self.pool.put(&self.authority, uc, Instant::now());
        }
    }
}

/// A relayed response body: the bytes already buffered are handed over with no allocation
/// but their copy; only a body that needs another read allocates that read's future. (`Ready`
/// is the large variant and the usual one: boxing it would be the allocation this type saves.)
#[allow(clippy::large_enum_variant)]
enum Relaying {
    Ready(Relay),
    Filling(Filling),
    Done,
}

impl Relaying {
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RelayError>>> {
        loop {
            match std::mem::replace(self, Relaying::Done) {
                Relaying::Done => return Poll::Ready(None),
                Relaying::Filling(mut fill) => match fill.as_mut().poll(cx) {
                    Poll::Pending => {
                        *self = Relaying::Filling(fill);
                        return Poll::Pending;
                    }
                    Poll::Ready((r, Ok(()))) => *self = Relaying::Ready(r),
                    Poll::Ready((r, Err(why))) => return Poll::Ready(Some(Err(r.broken(why)))),
                },
                Relaying::Ready(mut r) => {
                    let Some(mut uc) = r.conn.take() else {
                        return Poll::Ready(None);
                    };
                    match r.reader.step(&uc) {
                        Ok(Step::Data(data)) => {
                            let frame = Frame::data(Bytes::copy_from_slice(&uc.buf[data]));
                            r.conn = Some(uc);
                            // Hyper does not poll a body again once its exact size has been
                            // yielded: the connection of a length-delimited body goes back
                            // with its last bytes.
                            if r.reader.complete() {
                                r.release();
                            }
                            *self = Relaying::Ready(r);
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        Ok(Step::NeedRead) => {
                            *self = Relaying::Filling(Box::pin(async move {
                                let read = r.reader.fill(&mut uc, r.idle).await;
                                r.conn = Some(uc);
                                (r, read)
                            }));
                        }
                        Ok(Step::End) => {
                            r.conn = Some(uc);
                            r.release();
                            return Poll::Ready(None);
                        }
                        Err(why) => return Poll::Ready(Some(Err(r.broken(why)))),
                    }
                }
            }
        }
    }
}

/// The upstream's response body, whichever client fetched it. A body that pauses for longer
/// than `proxy.upstream_timeout` ends with an error (the client's connection or stream is
/// cut off).
pub struct UpstreamBody {
    inner: Inner,
    size: SizeHint,
}

enum Inner {
    Relayed(Relaying),
    Hyper {
        body: Incoming,
        answered: Arc<Answered>,
        idle: Duration,
        pause: Option<Pin<Box<tokio::time::Sleep>>>,
    },
}

impl UpstreamBody {
    fn relayed(relay: Relay, size: Option<u64>) -> Self {
        UpstreamBody {
            inner: Inner::Relayed(Relaying::Ready(relay)),
            size: size.map_or_else(SizeHint::new, SizeHint::with_exact),
        }
    }

    fn hyper(body: Incoming, answered: Arc<Answered>, idle: Duration) -> Self {
        let size = body.size_hint();
        UpstreamBody {
            inner: Inner::Hyper {
                body,
                answered,
                idle,
                pause: None,
            },
            size,
        }
    }
}

/// Why a response body from hyper-util's client was cut off.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("upstream body stalled")]
    Stalled,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        let this = &mut *self;
        match &mut this.inner {
            Inner::Relayed(s) => {
                let item = std::task::ready!(s.poll_next(cx));
                if let Some(Ok(f)) = &item
                    && let Some(d) = f.data_ref()
                    && let Some(left) = this.size.exact()
                {
                    this.size = SizeHint::with_exact(left.saturating_sub(d.len() as u64));
                }
                Poll::Ready(item.map(|r| r.map_err(UpstreamBodyError::from)))
            }
            Inner::Hyper {
                body,
                answered,
                idle,
                pause,
            } => {
                if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
                    *pause = None;
                    if frame.is_none() {
                        answered.fire();
                    }
                    return Poll::Ready(frame.map(|f| f.map_err(UpstreamBodyError::from)));
                }
                if paused_for(pause, *idle, cx) {
                    return Poll::Ready(Some(Err(UpstreamBodyError::Stalled)));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Relayed(_) => self.size.exact() == Some(0),
            Inner::Hyper { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Relayed(_) => self.size,
            Inner::Hyper { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Inner::Hyper { answered, .. } = &self.inner {
            answered.fire();
        }
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

/// The client's request body on its way to hyper-util's client: an error when it pauses longer
/// than `limits.body_timeout`, cut off once the response to it has been relayed, and its
/// trailer fields filtered by the rules of the head's fields.
pub struct ClientBody {
    inner: Incoming,
    idle: Duration,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    answered: Arc<Answered>,
    rules: FieldRules,
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
            let rules = &this.rules;
            return Poll::Ready(frame.map(|f| {
                f.map_err(ClientBodyError::Read)
                    .map(|f| match f.into_trailers() {
                        Ok(mut t) => {
                            headers::retain_trailers(&mut t, rules);
                            Frame::trailers(t)
                        }
                        Err(f) => f,
                    })
            }));
        }
        if paused_for(&mut this.pause, this.idle, cx) {
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

/// The pause timer of a body that has nothing to give: armed for `idle` at the first pause
/// (reset by the caller when a frame comes), `true` once it has run out.
fn paused_for(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    idle: Duration,
    cx: &mut Context<'_>,
) -> bool {
    timer
        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)))
        .as_mut()
        .poll(cx)
        .is_ready()
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
                _ => ProxyError::BadRequest(CUT_SHORT),
            });
        }
        user |= s
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user);
        source = s.source();
    }
    user.then_some(ProxyError::BadRequest(CUT_SHORT))
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
