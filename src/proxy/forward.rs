//! The only upstream I/O: a pooled keep-alive hyper client. Bodies stream both ways; nothing
//! is buffered whole.

use std::time::Duration;

use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::headers;
use crate::auth::Permit;
use crate::error::ProxyError;

/// Idle upstream connections are kept this long for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream host.
const POOL_MAX_IDLE_PER_HOST: usize = 1024;

#[derive(Clone)]
pub struct Forwarder {
    client: Client<HttpConnector, Incoming>,
    timeout: Duration,
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
    pub fn new(connect_timeout: Duration, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(connector);
        Self { client, timeout }
    }

    /// Sends `req` to the permit's upstream. Headers must already be rewritten except for
    /// those this function owns: target URI, `Host`, identity and forwarding headers.
    pub async fn forward(
        &self,
        permit: Permit<'_>,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        path_and_query: Option<PathAndQuery>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let route = permit.route();
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

        let mut res = match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => return Err(ProxyError::UpstreamTimeout),
            Ok(Err(e)) if client_body_failed(&e) => {
                tracing::debug!(route = %route.name, error = %e, "the client's request body failed");
                return Err(ProxyError::BadRequest(
                    "the request body is malformed or was cut short",
                ));
            }
            Ok(Err(e)) => {
                tracing::warn!(route = %route.name, error = %e, connect = e.is_connect(), "upstream request failed");
                return Err(ProxyError::UpstreamUnavailable);
            }
            Ok(Ok(res)) => res,
        };
        headers::remove_hop_by_hop(res.headers_mut());
        Ok(res)
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
