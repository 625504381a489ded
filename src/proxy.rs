//! The data plane. [`Gateway::handle`] owns the span, the access log line and the single
//! conversion of errors into responses; [`Gateway::handle_inner`] is the chain of steps, each
//! returning early with `?`.

pub mod forward;
pub mod h1;
pub mod headers;
pub mod route;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::auth::credential::{self, Extractor, Source};
use crate::auth::jwt::{LoginRequest, TokenResponse};
use crate::auth::{self, Authenticator, Permit};
use crate::error::{ProxyError, RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET};
use crate::keys::Principal;
use crate::keys::usage::UsageRecorder;
use crate::limit::{FailedAuth, RateInfo, Refusal, number_header};
use crate::telemetry::metrics::Metrics;
use forward::{ConnInfo, Forwarder, UpstreamBody};
use route::{Route, RouteTable};

/// Response body of the proxy: the upstream's stream, or a body the gateway wrote itself.
pub type ProxyBody = Either<UpstreamBody, Full<Bytes>>;

/// Path of the unauthenticated load-balancer health check on the proxy listener.
pub const HEALTH_PATH: &str = "/_keygate/health";
/// API key → access token, also served on the proxy listener.
pub const LOGIN_PATH: &str = "/auth/login";
/// Largest login body read.
const LOGIN_MAX_BODY: usize = 16 * 1024;

/// The proxy's request handler and everything it needs.
pub struct Gateway {
    pub auth: Authenticator,
    pub routes: RouteTable,
    pub extractor: Extractor,
    pub forwarder: Forwarder,
    pub failed_auth: Arc<FailedAuth>,
    pub metrics: Arc<Metrics>,
    pub usage: Arc<UsageRecorder>,
    /// Write one `keygate::access` line per request.
    pub access_log: bool,
}

/// What the access log needs to know about a request once it is answered.
#[derive(Default)]
struct Outcome<'a> {
    principal: Option<Arc<Principal>>,
    route: Option<&'a Route>,
    upstream: Option<std::time::Duration>,
}

impl Gateway {
    /// Drops idle limiter state (called periodically).
    pub fn sweep(&self) {
        self.routes.sweep();
        self.failed_auth.sweep();
        self.forwarder.h1.sweep();
    }

    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<ProxyBody> {
        let start = self.access_log.then(Instant::now);
        let method = req.method().clone();
        let log_uri = self.access_log.then(|| req.uri().clone());
        let mut outcome = Outcome::default();
        let res = match self.handle_inner(req, conn, &mut outcome).await {
            Ok(res) => res,
            Err(e) => e.response::<Full<Bytes>>().map(Either::Right),
        };
        let path = log_uri.as_ref().map_or("", |u| u.path());
        self.finish(&method, path, &outcome, res.status().as_u16(), start, conn);
        res
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
                peer = %conn.peer.ip(),
            );
        }
    }

    async fn handle_inner<'a>(
        &'a self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let path = req.uri().path();
        if path == HEALTH_PATH {
            return Ok(health::<Full<Bytes>>(req.method()).map(Either::Right));
        }
        if path == LOGIN_PATH && req.method() == Method::POST {
            return self.login(req, conn).await;
        }
        route::check_path(path).map_err(ProxyError::BadRequest)?;
        let route = self
            .routes
            .find(path, req.method())
            .ok_or(ProxyError::RouteNotFound)?;
        outcome.route = Some(route);

        headers::remove_keygate_headers(req.headers_mut());
        let (permit, new_pq, rate) = match auth::public(route) {
            Some(permit) => {
                self.metrics.auth("public");
                (permit, None, None)
            }
            None => {
                let checked = self.check_caller(&mut req, route, conn, outcome).await;
                self.metrics.auth(match &checked {
                    Ok(_) => "valid",
                    Err(e) => e.code(),
                });
                let (permit, new_pq, rate) = checked?;
                (permit, new_pq, Some(rate))
            }
        };
        let websocket = headers::websocket_requested(req.headers(), req.version());
        headers::remove_hop_by_hop(req.headers_mut());
        let sent = Instant::now();
        let forwarded = self
            .forwarder
            .forward(permit, req, conn, new_pq, websocket)
            .await;
        let upstream = sent.elapsed();
        outcome.upstream = Some(upstream);
        let mut res = match forwarded {
            Ok(res) => {
                self.metrics.upstream_latency.observe(upstream);
                res
            }
            Err(e) => {
                self.metrics.upstream_errors.inc();
                return Err(e);
            }
        };
        if let Some(rate) = rate {
            let h = res.headers_mut();
            h.insert(RATELIMIT_LIMIT, number_header(u64::from(rate.limit)));
            h.insert(
                RATELIMIT_REMAINING,
                number_header(u64::from(rate.remaining)),
            );
            h.insert(RATELIMIT_RESET, number_header(rate.reset_secs));
        }
        Ok(res.map(Either::Left))
    }

    /// `POST /auth/login`: an API key in, an access token out.
    async fn login(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        use http_body_util::BodyExt;
        let ip = conn.peer.ip();
        self.failed_auth
            .check(ip)
            .map_err(|retry_after| ProxyError::AuthThrottled { retry_after })?;
        let body = http_body_util::Limited::new(req.into_body(), LOGIN_MAX_BODY)
            .collect()
            .await
            .map_err(|_| ProxyError::BadRequest("the body could not be read or is too large"))?
            .to_bytes();
        let login: LoginRequest = serde_json::from_slice(&body)
            .map_err(|_| ProxyError::BadRequest("expected a JSON body {\"api_key\": \"…\"}"))?;
        let token = match self.auth.login(&login.api_key).await {
            Ok(t) => t,
            Err(e) => return Err(self.failed(e, ip)),
        };
        let body = serde_json::to_vec(&TokenResponse::from(token)).expect("serializable");
        let mut res = Response::new(Either::Right(Full::new(Bytes::from(body))));
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        res.headers_mut().insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        Ok(res)
    }

    /// Authentication, rate limits and authorization of a request on a protected route.
    async fn check_caller<'a>(
        &self,
        req: &mut Request<Incoming>,
        route: &'a Route,
        conn: &ConnInfo,
        outcome: &mut Outcome<'_>,
    ) -> Result<(Permit<'a>, Option<PathAndQuery>, RateInfo), ProxyError> {
        let cred = self.extractor.extract(req.headers(), req.uri().query());
        let source = cred.map(|c| c.source);
        let (permit, rate) = self.admit(route, cred, conn.peer.ip(), outcome).await?;
        let new_pq = match source {
            Some(source) => self.strip_credential(req, source)?,
            None => None,
        };
        Ok((permit, new_pq, rate))
    }

    /// The steps every protected request takes, whichever HTTP implementation read it: the
    /// failed-authentication throttle, the credential, the key's and the route's rate limits,
    /// the usage count and the route's permissions.
    async fn admit<'a>(
        &self,
        route: &'a Route,
        cred: Option<credential::Credential<'_>>,
        ip: std::net::IpAddr,
        outcome: &mut Outcome<'_>,
    ) -> Result<(Permit<'a>, RateInfo), ProxyError> {
        self.failed_auth
            .check(ip)
            .map_err(|retry_after| ProxyError::AuthThrottled { retry_after })?;
        let cred = cred.ok_or(ProxyError::MissingCredentials)?;
        let principal = match self.auth.authenticate(&cred).await {
            Ok(p) => p,
            Err(e) => return Err(self.failed(e, ip)),
        };
        outcome.principal = Some(Arc::clone(&principal));
        let rate = principal.limiter.check().map_err(rate_limited)?;
        if let Some(limiter) = &route.limiter {
            limiter.check(&principal.key_id).map_err(rate_limited)?;
        }
        self.usage.touch(&principal);
        let permit = auth::authorize(route, principal)?;
        Ok((permit, rate))
    }

    /// Counts a failed authentication against the peer; past the allowance it becomes a 429.
    fn failed(&self, e: ProxyError, ip: std::net::IpAddr) -> ProxyError {
        let guess = matches!(e, ProxyError::InvalidApiKey | ProxyError::InvalidToken);
        match guess.then(|| self.failed_auth.record_failure(ip)).flatten() {
            Some(retry_after) => ProxyError::AuthThrottled { retry_after },
            None => e,
        }
    }

    /// Removes the credential; returns a rewritten path-and-query when it was in the query.
    fn strip_credential(
        &self,
        req: &mut Request<Incoming>,
        source: Source,
    ) -> Result<Option<PathAndQuery>, ProxyError> {
        headers::remove_credential(req.headers_mut(), source, &self.extractor.api_key_header);
        if source != Source::Query {
            return Ok(None);
        }
        let param = self.extractor.query_param.as_deref().unwrap_or_default();
        let query = credential::strip_query_param(req.uri().query().unwrap_or(""), param);
        let pq = if query.is_empty() {
            req.uri().path().to_owned()
        } else {
            format!("{}?{}", req.uri().path(), query)
        };
        pq.parse()
            .map(Some)
            .map_err(|_| ProxyError::BadRequest("invalid request target"))
    }
}

fn rate_limited(r: Refusal) -> ProxyError {
    ProxyError::RateLimited {
        retry_after: r.retry_after,
        limit: r.limit,
    }
}

/// The answer of the load-balancer health check.
fn health<B: From<Bytes>>(method: &Method) -> Response<B> {
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from_static(b"{\"status\":\"ok\"}")
    };
    let mut res = Response::new(B::from(body));
    *res.status_mut() = StatusCode::OK;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// The hyper service for one proxy connection.
pub fn service(
    gateway: Arc<Gateway>,
    conn: ConnInfo,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send,
> + Clone
+ Send {
    let conn = Arc::new(conn);
    hyper::service::service_fn(move |req| {
        let gateway = Arc::clone(&gateway);
        let conn = Arc::clone(&conn);
        async move { Ok(gateway.handle(req, &conn).await) }
    })
}
