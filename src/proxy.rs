//! The data plane. One policy core ([`policy`]) decides what happens to a request; two engines
//! carry it out: the HTTP/1.1 fast path ([`h1`]) and hyper ([`hyper`], HTTP/1.1 and HTTP/2).
//! Plain `http://` upstreams are reached through one HTTP/1.1 client ([`upstream`]) whichever
//! engine read the request; `https://` upstreams and WebSocket upgrades through hyper-util.
//! Each engine owns the span of a request, and `Gateway::finish` records it (metrics, the
//! access log line); errors become responses in one place
//! ([`error::ProxyError::response`]).

pub mod codec;
pub mod deadline;
pub mod drain;
pub mod error;
pub mod h1;
pub mod headers;
pub mod hyper;
pub mod policy;
pub mod upstream;
pub mod verify;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::hyper::body::Incoming;
use http::{HeaderValue, Method, Request, Response};

use crate::auth::Authenticator;
use crate::auth::credential::Extractor;
use crate::keys::Principal;
use crate::keys::usage::UsageRecorder;
use crate::limit::FailedAuth;
use crate::route::{Route, RouteTable};
use crate::telemetry::metrics::Metrics;
pub use hyper::ProxyBody;

/// Path of the unauthenticated load-balancer health check on the proxy listener.
pub const HEALTH_PATH: &str = "/_keygate/health";
/// API key → access token, also served on the proxy listener.
pub const LOGIN_PATH: &str = "/auth/login";

/// The proxy's request handler and everything it needs.
pub struct Gateway {
    pub auth: Authenticator,
    pub routes: RouteTable,
    pub extractor: Extractor,
    pub policy: policy::Policy,
    pub upstreams: Upstreams,
    pub failed_auth: Arc<FailedAuth>,
    pub metrics: Arc<Metrics>,
    pub usage: Arc<UsageRecorder>,
    /// Write one `keygate::access` line per request.
    pub access_log: bool,
    /// Signs the caller's identity (`[identity] sign`); `None`: off.
    pub identity: Option<Arc<crate::identity::Identity>>,
    /// Leaked-key reports (`[secret_scanning]`); `None`: off.
    pub leaks: Option<Arc<crate::events::leaks::LeakReports>>,
}

/// The upstream clients and the upstream policy's timeouts.
pub struct Upstreams {
    /// The one client of plain `http://` upstreams.
    pub pool: Arc<upstream::Pool>,
    /// `https://` upstreams and WebSocket upgrades.
    pub https: hyper::HyperClient,
    /// From sending a request until its response head has arrived; also the longest pause of
    /// a response body.
    pub timeout: Duration,
    /// Longest pause of a request body.
    pub body_timeout: Duration,
}

impl Upstreams {
    /// `ca`: PEM bundle for `https://` upstreams (default: the webpki roots).
    pub fn new(
        connect_timeout: Duration,
        timeout: Duration,
        body_timeout: Duration,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        Ok(Upstreams {
            pool: Arc::new(upstream::Pool::new(connect_timeout)),
            https: hyper::HyperClient::new(connect_timeout, ca)?,
            timeout,
            body_timeout,
        })
    }
}

/// What the access log needs to know about a request once it is answered.
#[derive(Default)]
pub struct Outcome<'a> {
    principal: Option<Arc<Principal>>,
    /// The client's address when it is not the peer's (a trusted proxy named it).
    client: Option<std::net::IpAddr>,
    route: Option<&'a Route>,
    upstream: Option<Duration>,
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

impl Gateway {
    /// Drops idle limiter state and idle upstream connections (called periodically).
    pub fn sweep(&self) {
        self.routes.sweep();
        self.failed_auth.sweep();
        self.upstreams.pool.sweep();
    }

    /// Records a finished request in the metrics and, when it is on, the access log.
    fn finish(
        &self,
        method: &Method,
        path: &str,
        outcome: &Outcome<'_>,
        status: u16,
        start: Option<Instant>,
        conn: &ConnInfo,
    ) {
        self.metrics
            .route(outcome.route.map(|r| r.index))
            .record(status);
        if self.access_log {
            let p = outcome.principal.as_deref();
            tracing::info!(
                target: "keygate::access",
                method = %method,
                path,
                route = outcome.route.map_or("-", |r| r.name.as_str()),
                status,
                latency_us = start.map_or(0, |s| s.elapsed().as_micros() as u64),
                upstream_us = outcome.upstream.map(|d| d.as_micros() as u64),
                key_id = p.map(|p| tracing::field::display(p.key_id)),
                client_id = p.map(|p| p.client_id()),
                peer = %outcome.client.unwrap_or(conn.peer.ip()),
            );
        }
    }
}

/// The hyper service for one proxy connection.
pub fn service(
    gateway: Arc<Gateway>,
    conn: ConnInfo,
) -> impl ::hyper::service::Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send,
> + Clone
+ Send {
    let conn = Arc::new(conn);
    ::hyper::service::service_fn(move |req| {
        let gateway = Arc::clone(&gateway);
        let conn = Arc::clone(&conn);
        async move { Ok(gateway.handle(req, &conn).await) }
    })
}
