//! The only upstream I/O: a pooled keep-alive hyper client (HTTP/1.1, and HTTP/2 where an
//! `https://` upstream offers it by ALPN; certificates verified against the webpki roots or the
//! configured CA). Bodies stream both ways; nothing is buffered whole.
//!
//! WebSocket: a request that asked for `Upgrade: websocket` is forwarded with its upgrade
//! headers, and bytes are bridged only after the upstream answered 101 with the right
//! `Sec-WebSocket-Accept`. Any other answer is relayed as a plain response and the client's
//! connection stays HTTP, so bytes sent after it are parsed (and authenticated) as requests.

use std::time::Duration;

use http::StatusCode;
use http::header::{CONNECTION, UPGRADE};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::headers;
use crate::auth::Permit;
use crate::error::ProxyError;

/// Idle upstream connections are kept this long for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream host.
const POOL_MAX_IDLE_PER_HOST: usize = 1024;

#[derive(Clone)]
pub struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Incoming>,
    timeout: Duration,
}

/// The full cause chain of an error, for log lines that say what actually failed
/// (e.g. "invalid peer certificate: UnknownIssuer").
fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
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
        Ok(Self { client, timeout })
    }

    /// Sends `req` to the permit's upstream. Headers must already be rewritten except for
    /// those this function owns: target URI, `Host`, identity and forwarding headers.
    pub async fn forward(
        &self,
        permit: Permit<'_>,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        path_and_query: Option<PathAndQuery>,
        websocket: bool,
    ) -> Result<Response<Incoming>, ProxyError> {
        let route = permit.route();
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
            Ok(Err(e)) if client_body_failed(&e) => {
                tracing::debug!(route = %route.name, error = %e, "the client's request body failed");
                return Err(ProxyError::BadRequest(
                    "the request body is malformed or was cut short",
                ));
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
            return Ok(res);
        }
        headers::remove_hop_by_hop(res.headers_mut());
        Ok(res)
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

/// True when a forward failed because the client's own request body could not be read
/// (malformed chunked framing, an upload cut short): the client's fault, answered 400, not
/// the upstream's (502).
fn client_body_failed(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
        {
            return true;
        }
        source = s.source();
    }
    false
}
