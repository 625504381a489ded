//! The data plane's one policy core. Every engine (the HTTP/1.1 fast path, hyper for HTTP/1.1
//! and HTTP/2) is an adapter that shows the core a [`RequestView`] and carries out what the core
//! decides; no rule below is written a second time in an engine.
//!
//! - [`Gateway::route`]: the health check, the login path, the path checks and the route.
//! - [`Gateway::admit`]: failed-authentication throttle, credential, key, client and route
//!   limits, usage, permissions, credits and quota → an [`Admitted`] request holding the
//!   [`Permit`], the rate answer (with what credits and quota are left), what to strip and the
//!   signed identity (`X-Keygate-Assertion`, [`crate::identity`]).
//! - Field rules: [`request_rule`] and [`response_rule`] say what each field is to the gateway
//!   (forwarded, dropped, owned by the gateway); [`forwarded`] says whether a request field
//!   reaches the upstream; [`relayed`] whether a response field reaches the client.
//! - [`Gateway::login`]: `POST /auth/login` on the proxy listener.
//! - The verify endpoint of forward-auth ([`super::verify`]) shows the same two steps a view
//!   of the original request it names.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};

use super::{ConnInfo, Gateway, HEALTH_PATH, LOGIN_PATH, Outcome};
use crate::auth::credential::Credential;
use crate::auth::jwt::{LoginRequest, TokenResponse};
use crate::auth::{self, AuthError, Permit};
use crate::config::{Cidr, ForwardAuth};
use crate::cors::Cors;
use crate::keys::Principal;
use crate::keys::allowance::{Charge, Exhausted, QuotaCharge};
use crate::limit::{RateInfo, Refusal};
use crate::paths;
use crate::proxy::error::ProxyError;
use crate::route::Route;
use crate::telemetry::metrics::LimitKind;

/// A request as the core sees it, whichever engine read it.
pub trait RequestView {
    fn method(&self) -> &Method;
    /// The path as sent (not decoded).
    fn path(&self) -> &str;
    /// The query, when the target has a `?`.
    fn query(&self) -> Option<&str>;
    /// The first `Authorization` value, when it is header text.
    fn authorization(&self) -> Option<&str>;
    /// True when the request has more than one `Authorization` line (a field that is no list:
    /// the gateway would judge one and forward the other).
    fn authorizations(&self) -> bool;
    /// The first value of the API-key header (`name`), when it is header text.
    fn api_key(&self, name: &HeaderName) -> Option<&str>;
    /// True when the API-key header (`name`) is sent more than once (as `Authorization`: one
    /// would be judged, the other ignored).
    fn api_keys(&self, name: &HeaderName) -> bool;
    /// Every `X-Forwarded-For` line, in order (a proxy may add a line of its own rather than
    /// extend the one it got: together they are one list, RFC 9110 §5.3). A line that is not
    /// header text is `None`.
    fn forwarded_for(&self) -> impl Iterator<Item = Option<&str>>;
    /// Every `Forwarded` line, in order, as [`RequestView::forwarded_for`].
    fn forwarded(&self) -> impl Iterator<Item = Option<&str>>;
    /// The first value of any field (`name` lowercase), as sent. Read only by the verify
    /// endpoint.
    fn field(&self, name: &str) -> Option<&[u8]>;
    /// True when field `name` (lowercase) is sent more than once.
    fn repeated(&self, name: &str) -> bool;
}

impl RequestView for http::request::Parts {
    fn method(&self) -> &Method {
        &self.method
    }

    fn path(&self) -> &str {
        self.uri.path()
    }

    fn query(&self) -> Option<&str> {
        self.uri.query()
    }

    fn authorization(&self) -> Option<&str> {
        self.headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
    }

    fn api_keys(&self, name: &HeaderName) -> bool {
        self.headers.get_all(name).iter().nth(1).is_some()
    }

    fn authorizations(&self) -> bool {
        self.headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .nth(1)
            .is_some()
    }

    fn api_key(&self, name: &HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn forwarded_for(&self) -> impl Iterator<Item = Option<&str>> {
        self.headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.to_str().ok())
    }

    fn forwarded(&self) -> impl Iterator<Item = Option<&str>> {
        self.headers
            .get_all(http::header::FORWARDED)
            .iter()
            .map(|v| v.to_str().ok())
    }

    fn field(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name).map(HeaderValue::as_bytes)
    }

    fn repeated(&self, name: &str) -> bool {
        self.headers.get_all(name).iter().nth(1).is_some()
    }
}

/// The rules of the data plane that come from the configuration.
pub struct Policy {
    pub fields: FieldRules,
    /// Accept paths that are not ASCII once decoded.
    pub non_ascii_paths: bool,
    /// Peers whose `X-Forwarded-For` / `Forwarded` names the client.
    pub trusted_proxies: Vec<Cidr>,
    pub cache: CachePolicy,
    /// The verify endpoint (`path: None`: off).
    pub forward_auth: ForwardAuth,
    /// The CORS rules of routes without their own (`None`: no CORS).
    pub cors: Option<Arc<Cors>>,
    /// `limits.max_headers`, for HTTP/2 requests (hyper's HTTP/1.1 and the fast path count
    /// their own).
    pub max_headers: usize,
}

impl Policy {
    /// The client's address: the peer's, or — when the peer is a trusted proxy — the
    /// right-most address of `X-Forwarded-For` (else `Forwarded`), all its lines read as one
    /// list, that is not itself a trusted proxy. An address that does not parse there (or a
    /// line that is not text) is not trusted: the peer's is used.
    pub fn client_ip(&self, req: &impl RequestView, peer: IpAddr) -> IpAddr {
        let trusted = |ip: IpAddr| self.trusted_proxies.iter().any(|c| c.contains(ip));
        if !trusted(peer) {
            return peer;
        }
        let mut hops: Vec<Option<&str>> = Vec::new();
        for line in req.forwarded_for() {
            match line {
                Some(xff) => hops.extend(xff.split(',').map(Some)),
                None => hops.push(None),
            }
        }
        if hops.is_empty() {
            for line in req.forwarded() {
                let Some(fwd) = line else {
                    hops.push(None);
                    continue;
                };
                // An element without `for=` names no hop: skipped.
                hops.extend(
                    fwd.split(',')
                        .filter_map(|element| {
                            element.split(';').find_map(|pair| {
                                let (k, v) = pair.split_once('=')?;
                                k.trim().eq_ignore_ascii_case("for").then_some(v)
                            })
                        })
                        .map(Some),
                );
            }
        }
        for hop in hops.iter().rev() {
            match hop.and_then(parse_hop) {
                Some(ip) if trusted(ip) => continue,
                Some(ip) => return ip,
                None => return peer,
            }
        }
        peer
    }
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:80`, `"[2001:db8::1]:4711"`, `::1`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim().trim_matches('"');
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(sa) = hop.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    hop.strip_prefix('[')
        .and_then(|h| h.split_once(']'))
        .and_then(|(ip, _)| ip.parse().ok())
}

/// What the gateway adds to authenticated answers so that no shared cache (a CDN in front of
/// keygate) serves one caller's answer to another: RFC 9111 §3.5 protects only requests that
/// carry `Authorization`, and a key may come in another field.
pub struct CachePolicy {
    /// `Vary` naming the credential fields (None: off).
    pub vary: Option<HeaderValue>,
    /// `Cache-Control: private` unless the upstream allowed shared caching (`public`,
    /// `s-maxage`).
    pub private: bool,
}

impl CachePolicy {
    pub fn new(api_key_header: &HeaderName, vary: bool, private: bool) -> Self {
        CachePolicy {
            vary: vary
                .then(|| HeaderValue::from_str(&format!("authorization, {api_key_header}")).ok())
                .flatten(),
            private,
        }
    }

    /// What to add, given the upstream's `Cache-Control` and `Vary` values: (`private`,
    /// `Vary`).
    pub fn additions<'a>(&self, fields: impl Iterator<Item = (Rule, &'a [u8])>) -> (bool, bool) {
        let (mut shared, mut any_vary) = (false, false);
        for (rule, value) in fields {
            match rule {
                Rule::CacheControl => {
                    shared |= value.split(|&b| b == b',').any(|d| {
                        let name = d.split(|&b| b == b'=').next().unwrap_or(b"").trim_ascii();
                        name.eq_ignore_ascii_case(b"public")
                            || name.eq_ignore_ascii_case(b"s-maxage")
                    });
                }
                Rule::Vary => {
                    any_vary |= value.split(|&b| b == b',').any(|v| v.trim_ascii() == b"*")
                }
                _ => {}
            }
        }
        (self.private && !shared, self.vary.is_some() && !any_vary)
    }
}

/// The request field rules that depend on the configuration.
#[derive(Debug, Clone)]
pub struct FieldRules {
    api_key_header: HeaderName,
    /// Forward the method-override fields.
    method_override: bool,
}

impl Default for FieldRules {
    fn default() -> Self {
        FieldRules::new(HeaderName::from_static("x-api-key"), false)
    }
}

impl FieldRules {
    pub fn new(api_key_header: HeaderName, method_override: bool) -> Self {
        FieldRules {
            api_key_header,
            method_override,
        }
    }

    pub fn api_key_header(&self) -> &HeaderName {
        &self.api_key_header
    }

    /// The rule for a request field: [`request_rule`], and the method-override fields
    /// (`X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override`) dropped unless they are
    /// allowed — Rails- or Laravel-style upstreams would run another method than the one the
    /// route's method rules judged.
    pub fn request(&self, name: &[u8]) -> Rule {
        let rule = request_rule(name, self.api_key_header.as_str().as_bytes());
        if rule == Rule::Forward
            && !self.method_override
            && (eq(name, b"x-http-method-override")
                || eq(name, b"x-http-method")
                || eq(name, b"x-method-override"))
        {
            Rule::Drop
        } else {
            rule
        }
    }
}

/// A preflight's route (`None`: the login path, under the default rules) and the core's
/// answer to it.
pub type Preflighted<'g> = (Option<&'g Route>, Result<Response<Bytes>, ProxyError>);

/// What a request is, before any credential is looked at.
pub enum Routed<'g> {
    /// `GET /_keygate/health`: answered by the gateway, no key needed.
    Health,
    /// `POST /auth/login`: the engine reads the body and calls [`Gateway::login`].
    Login,
    /// The forward-auth verify path (or below it): the engine calls [`Gateway::verify`].
    Verify,
    /// A CORS preflight on a route with CORS (`None`: the login path, under the default
    /// rules): the core's answer (204, or 403), to send as it is, through
    /// [`Gateway::cors_own`] like every answer of the gateway's own.
    Preflight(Option<&'g Route>, Result<Response<Bytes>, ProxyError>),
    /// `GET /.well-known/jwks.json` while signed identity is on: the engine answers
    /// [`Gateway::jwks`].
    Jwks,
    /// `POST /_keygate/secret-scanning/github` when `[secret_scanning]` is on: the engine reads
    /// the body (at most [`crate::events::leaks::MAX_BODY`]) and calls the leak reports.
    SecretScanning,
    Route(&'g Route),
}

/// Which credential fields are removed before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Strip {
    /// Every `Authorization` field.
    pub authorization: bool,
    /// Every field of the API-key header.
    pub api_key: bool,
}

impl Strip {
    pub const NOTHING: Strip = Strip {
        authorization: false,
        api_key: false,
    };
    pub const AUTHORIZATION: Strip = Strip {
        authorization: true,
        api_key: false,
    };
    pub const API_KEY: Strip = Strip {
        authorization: false,
        api_key: true,
    };
    pub const BOTH: Strip = Strip {
        authorization: true,
        api_key: true,
    };
}

/// A request the gateway will forward: the permit, the rate answer of an authenticated route,
/// the credential fields to strip and, for a query credential, the target without it.
pub struct Admitted<'g> {
    pub permit: Permit<'g>,
    pub rate: Option<RateInfo>,
    pub strip: Strip,
    pub target: Option<String>,
    /// `X-Keygate-Assertion` (signed identity on, a caller): added after the identity fields.
    pub assertion: Option<HeaderValue>,
}

impl Gateway {
    /// The first steps of every request: the health check, the login path, the verify path,
    /// then [`Gateway::route_table`].
    pub fn route<'g>(
        &'g self,
        req: &impl RequestView,
        outcome: &mut Outcome<'g>,
    ) -> Result<Routed<'g>, ProxyError> {
        upper_method(req.method())?;
        let path = req.path();
        if path == HEALTH_PATH {
            return Ok(Routed::Health);
        }
        if path == LOGIN_PATH && *req.method() == Method::POST {
            return Ok(Routed::Login);
        }
        if self.leaks.is_some()
            && path == crate::config::events::SECRET_SCANNING_PATH
            && *req.method() == Method::POST
        {
            return Ok(Routed::SecretScanning);
        }
        if let Some(verify) = &self.policy.forward_auth.path
            && path
                .strip_prefix(verify.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        {
            return Ok(Routed::Verify);
        }
        if path == crate::identity::JWKS_PATH
            && self.identity.is_some()
            && matches!(*req.method(), Method::GET | Method::HEAD)
        {
            return Ok(Routed::Jwks);
        }
        if let Some((route, answer)) = self.preflight(req) {
            return Ok(Routed::Preflight(route, answer));
        }
        self.table(req, outcome).map(Routed::Route)
    }

    /// The CORS rules of an answer on `route` (`None`: no route was found): the route's own,
    /// else the default; none when they allow no origin.
    pub fn cors<'a>(&'a self, route: Option<&'a Route>) -> Option<&'a Cors> {
        route
            .and_then(|r| r.cors.as_deref())
            .or(self.policy.cors.as_deref())
            .filter(|c| !c.is_off())
    }

    /// A CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) on a
    /// route with CORS (or on the login path, under the default rules): the route and the
    /// answer. Before the route's method rules: a route
    /// that does not answer `OPTIONS` still has its preflights answered. A preflight on a route
    /// without CORS is an ordinary request.
    pub fn preflight<'g>(&'g self, req: &impl RequestView) -> Option<Preflighted<'g>> {
        if *req.method() != Method::OPTIONS {
            return None;
        }
        let method = req.field("access-control-request-method")?;
        let origin = req.field("origin")?;
        paths::check_path(req.path(), self.policy.non_ascii_paths).ok()?;
        // The login call answers under the default rules (no route is its): its preflight too,
        // or a page could never send it JSON.
        let route = match req.path() {
            LOGIN_PATH => None,
            path => Some(self.routes.find(path)?),
        };
        let cors = self.cors(route)?;
        let answer = cors
            .preflight(origin, method, req.field("access-control-request-headers"))
            .map_err(ProxyError::CorsRefused);
        Some((route, answer))
    }

    /// Adds the CORS fields to an answer the gateway made itself (an error, a preflight, a
    /// verify answer) to `req` on `route` (`None`: before a route was found).
    pub fn cors_own<B>(
        &self,
        route: Option<&Route>,
        req: &impl RequestView,
        res: &mut Response<B>,
    ) {
        if let Some(cors) = self.cors(route) {
            let origin = req.field("origin");
            let grant = cors.grant(origin);
            let value = origin.and_then(|o| HeaderValue::from_bytes(o).ok());
            cors.add(res.headers_mut(), grant, value);
        }
    }

    /// The method check, the path checks (400), the route (404) and its methods (405): what
    /// the original request of a verify request goes through, as a proxied request does in
    /// [`Gateway::route`].
    pub fn route_table<'g>(
        &'g self,
        req: &impl RequestView,
        outcome: &mut Outcome<'g>,
    ) -> Result<&'g Route, ProxyError> {
        upper_method(req.method())?;
        self.table(req, outcome)
    }

    /// The route of `req`, or the refusal; a 405 names its route in `outcome` (its answer
    /// carries that route's CORS fields, not the default's).
    fn table<'g>(
        &'g self,
        req: &impl RequestView,
        outcome: &mut Outcome<'g>,
    ) -> Result<&'g Route, ProxyError> {
        let method = req.method();
        let path = req.path();
        paths::check_path(path, self.policy.non_ascii_paths).map_err(ProxyError::BadRequest)?;
        let route = self.routes.find(path).ok_or(ProxyError::RouteNotFound)?;
        if !route.allows(method) {
            outcome.route = Some(route);
            let allow = route.allow.clone().unwrap_or(HeaderValue::from_static(""));
            return Err(ProxyError::MethodNotAllowed(allow));
        }
        Ok(route)
    }

    /// Admits a request on `route`: public routes at once; otherwise the credential (two
    /// different ones are refused), the key's, its client's (or the cluster's) and the route's
    /// rate limits, the usage count, the route's permissions and — for a key with credits or a
    /// plan with a quota only — the charge in the store, in that order. Every credential field keygate reads is stripped,
    /// used or not.
    pub async fn admit<'g>(
        &self,
        route: &'g Route,
        req: &impl RequestView,
        conn: &ConnInfo,
        outcome: &mut Outcome<'g>,
    ) -> Result<Admitted<'g>, ProxyError> {
        if let Some(permit) = auth::public(route) {
            self.metrics.auth("public");
            return Ok(Admitted {
                permit,
                rate: None,
                strip: Strip::NOTHING,
                target: None,
                assertion: None,
            });
        }
        let found = self.extractor.find(
            req.authorization(),
            req.api_key(&self.extractor.api_key_header),
            req.query(),
        );
        let checked = if found.conflict {
            Err(ProxyError::BadRequest(
                "the request carries two different credentials",
            ))
        } else if req.authorizations() {
            Err(ProxyError::BadRequest(
                "the request carries more than one Authorization field",
            ))
        } else if req.api_keys(&self.extractor.api_key_header) {
            Err(ProxyError::BadRequest(
                "the request carries more than one API-key field",
            ))
        } else {
            let ip = self.policy.client_ip(req, conn.peer.ip());
            outcome.client = Some(ip);
            self.check(route, found.chosen.as_ref(), ip, outcome).await
        };
        self.metrics.auth(match &checked {
            Ok(_) => "valid",
            Err(e) => e.code(),
        });
        let (permit, rate, assertion) = checked?;
        Ok(Admitted {
            permit,
            rate: Some(rate),
            strip: Strip {
                authorization: found.in_authorization,
                api_key: true,
            },
            target: found.in_query.then(|| self.target_without_credential(req)),
            assertion,
        })
    }

    /// The signed identity of an admitted caller (signing on). Without a signing key (the
    /// store was unreachable since the start) the request is refused 503, never forwarded
    /// unsigned.
    fn assertion(&self, permit: &Permit<'_>) -> Result<Option<HeaderValue>, ProxyError> {
        let (Some(identity), Some(principal)) = (&self.identity, permit.principal()) else {
            return Ok(None);
        };
        identity
            .assertion(permit.route().index, principal)
            .map(Some)
            .ok_or(ProxyError::Auth(AuthError::StoreUnavailable))
    }

    /// The answer of `GET /.well-known/jwks.json` (or HEAD, whose answer leaves the body out
    /// and keeps its length): the public signing keys.
    pub fn jwks(&self) -> Response<Bytes> {
        match &self.identity {
            Some(id) => id.jwks_response(),
            None => ProxyError::RouteNotFound.response(),
        }
    }

    async fn check<'g>(
        &self,
        route: &'g Route,
        cred: Option<&Credential<'_>>,
        ip: IpAddr,
        outcome: &mut Outcome<'g>,
    ) -> Result<(Permit<'g>, RateInfo, Option<HeaderValue>), ProxyError> {
        let cred = cred.ok_or(ProxyError::MissingCredentials)?;
        let principal = match self.auth.authenticate(cred).await {
            Ok(p) => p,
            Err(e) => return Err(self.failed(e, ip)),
        };
        if self.access_log {
            // Only the access log names the key after the answer.
            outcome.principal = Some(Arc::clone(&principal));
        }
        let mut rate = principal
            .limiter
            .check()
            .map_err(|r| self.rate_limited(r))?;
        // A request one limit refuses spends nothing of the limits checked before it (else a
        // key's own bucket would drain while its client's, or the route's, refuses).
        let client = principal.client_limiter.as_deref();
        if let Some(client) = client {
            // The client's bucket under the key's own: the answer shows the tighter one.
            let c = client.check().map_err(|r| {
                principal.limiter.give_back();
                self.rate_limited(r)
            })?;
            if c.remaining < rate.remaining {
                rate = c;
            }
        }
        if let Some(shared) = &principal.cluster {
            let c = shared.check().await.map_err(|r| {
                principal.limiter.give_back();
                client.inspect(|c| c.give_back());
                self.rate_limited(r)
            })?;
            if c.remaining < rate.remaining {
                rate = c;
            }
        }
        if let Some(limiter) = &route.limiter {
            limiter.check(&principal.key_id).map_err(|r| {
                principal.limiter.give_back();
                client.inspect(|c| c.give_back());
                if let Some(shared) = &principal.cluster {
                    shared.give_back();
                }
                self.rate_limited(r)
            })?;
        }
        self.usage.touch(&principal);
        let permit = auth::authorize(route, principal).map_err(ProxyError::from)?;
        // Signed before the charge: a request refused for want of a signing key costs nothing.
        let assertion = self.assertion(&permit)?;
        if let Some(p) = permit.principal()
            && (p.credits.is_some() || p.quota.is_some())
        {
            let (credits, quota) = self.charge(p, route.cost).await?;
            rate.credits = credits;
            rate.quota = quota;
        }
        Ok((permit, rate, assertion))
    }

    fn rate_limited(&self, r: Refusal) -> ProxyError {
        self.metrics.limit_refused(LimitKind::RateLimited);
        rate_limited(r)
    }

    /// Charges a principal with credits or a quota in the store (the only store call of the
    /// request path for a cached key; principals without either never get here): the route's
    /// cost in credits and one request of the quota, both or neither. The remaining amounts
    /// are returned for the answer's fields.
    async fn charge(
        &self,
        p: &Principal,
        cost: u64,
    ) -> Result<(Option<u64>, Option<u64>), ProxyError> {
        let now = self.auth.clock().now_millis();
        let charge = Charge {
            key_id: p.key_id,
            cost: p.credits.map(|_| cost),
            quota: p.quota.map(|quota| QuotaCharge {
                client_id: p.client_id(),
                quota,
            }),
            now,
        };
        let charged = self.auth.store().charge(&charge).await.map_err(|e| {
            tracing::warn!(error = %e, "credits/quota charge failed; refusing the request");
            ProxyError::Auth(AuthError::StoreUnavailable)
        })?;
        let Some(why) = charged.refused else {
            return Ok((charged.credits, charged.quota));
        };
        self.metrics.limit_refused(LimitKind::QuotaExhausted);
        let quota_ends = || p.quota.map(|q| q.per.start(q.per.index(now) + 1));
        let next = match why {
            // The credits come back at the refill, if it sets them to the route's cost at
            // least (it replaces what was left); a quota used up too holds the request on to
            // its own period's end.
            Exhausted::Credits => p
                .credits
                .and_then(|t| t.refill)
                .filter(|r| r.amount >= cost)
                .map(|r| match (charged.quota, quota_ends()) {
                    (Some(0), Some(q)) => r.next_at(now).max(q),
                    _ => r.next_at(now),
                }),
            Exhausted::Quota => quota_ends(),
        };
        Err(ProxyError::QuotaExhausted {
            retry_after: next.map(|t| Duration::from_millis((t - now).max(1) as u64)),
            credits: charged.credits,
            quota: charged.quota,
        })
    }

    /// Counts a failed authentication against the client; past the allowance it becomes a
    /// 429. Only guesses count (an unknown key or token), not a real key that is disabled or
    /// expired; and only failing attempts are ever refused: a valid credential is never
    /// throttled, however many guesses came from its address.
    fn failed(&self, e: AuthError, ip: IpAddr) -> ProxyError {
        match e
            .is_guess()
            .then(|| self.failed_auth.record_failure(ip))
            .flatten()
        {
            Some(retry_after) => ProxyError::AuthThrottled { retry_after },
            None => e.into(),
        }
    }

    /// `path?query` with the query credential removed.
    fn target_without_credential(&self, req: &impl RequestView) -> String {
        let param = self.extractor.query_param.as_deref().unwrap_or_default();
        let rest = crate::auth::credential::strip_query_param(req.query().unwrap_or(""), param);
        if rest.is_empty() {
            req.path().to_owned()
        } else {
            format!("{}?{rest}", req.path())
        }
    }

    /// `POST /auth/login` on the proxy listener: an API key in (`body`, JSON), an access token
    /// out. Failures are throttled per client like every other authentication.
    pub async fn login(&self, body: &[u8], ip: IpAddr) -> Result<Response<Bytes>, ProxyError> {
        let login: LoginRequest = serde_json::from_slice(body)
            .map_err(|_| ProxyError::BadRequest("expected a JSON body {\"api_key\": \"…\"}"))?;
        let token = match self.auth.login(&login.api_key).await {
            Ok(t) => t,
            Err(e) => return Err(self.failed(e, ip)),
        };
        let body = serde_json::to_vec(&TokenResponse::from(token)).expect("serializable");
        let mut res = Response::new(Bytes::from(body));
        let h = res.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        Ok(res)
    }
}

fn upper_method(method: &Method) -> Result<(), ProxyError> {
    if upper_token(method.as_str()) {
        Ok(())
    } else {
        Err(ProxyError::BadRequest(
            "the method must be an uppercase token (RFC 9110 §9.1)",
        ))
    }
}

/// An uppercase token (RFC 9110 §9.1; Django and Werkzeug uppercase methods, so `get` would
/// run the GET handler on a route judged for another method).
fn upper_token(m: &str) -> bool {
    !m.is_empty()
        && m.bytes().all(|b| {
            b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

fn rate_limited(r: Refusal) -> ProxyError {
    ProxyError::RateLimited {
        retry_after: r.retry_after,
        full_after: r.full_after,
        limit: r.limit,
    }
}

/// The answer of the load-balancer health check.
/// The health answer; to a HEAD request too, whose answer leaves the body out and keeps its
/// length (RFC 9110 §9.3.2, §8.6).
pub fn health() -> Response<Bytes> {
    let mut res = Response::new(Bytes::from_static(b"{\"status\":\"ok\"}"));
    *res.status_mut() = StatusCode::OK;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// What a header field is to the gateway, in either direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Forwarded (relayed) byte for byte.
    Forward,
    /// Never forwarded: hop-by-hop (RFC 9110 §7.6.1), named by `Connection`, owned by the
    /// gateway (`X-Forwarded-Proto`, `X-Forwarded-Host`), or refused inbound (`x-keygate-*`,
    /// names with `_`).
    Drop,
    Host,
    /// `X-Forwarded-For`: the first one is extended, later ones dropped.
    XForwardedFor,
    /// Forwarded unless it carried the credential.
    Authorization,
    /// The configured API-key header: forwarded unless it carried the credential.
    ApiKey,
    /// Framing, written by the gateway itself.
    ContentLength,
    TransferEncoding,
    /// Read for its options, never forwarded.
    Connection,
    Expect,
    Upgrade,
    /// A request's `Trailer` declaration.
    Trailer,
    /// `RateLimit-*` of a response: replaced when the gateway adds its own.
    RateLimit,
    /// `Date` of a response (the gateway adds one when it is missing).
    Date,
    /// `Cache-Control` of a response (relayed; read by [`CachePolicy`]).
    CacheControl,
    /// `Vary` of a response (relayed; read by [`CachePolicy`]).
    Vary,
}

fn eq(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len() && name.eq_ignore_ascii_case(lower)
}

/// Never end-to-end, in either direction (RFC 9110 §7.6.1, plus `Proxy-Connection` seen in the
/// wild, the proxy authentication pair, which addresses this hop, `HTTP2-Settings` of the
/// h2c upgrade, RFC 9113 §3.1, which is never forwarded, and `Close`, a reserved name
/// (RFC 9110 §18.4) that `Connection: close` names although it is read as an option).
fn hop_by_hop(name: &[u8]) -> bool {
    eq(name, b"keep-alive")
        || eq(name, b"close")
        || eq(name, b"proxy-connection")
        || eq(name, b"te")
        || eq(name, b"proxy-authorization")
        || eq(name, b"proxy-authenticate")
        || eq(name, b"http2-settings")
}

/// Fields a client may not send: the gateway's own `x-keygate-*`, and any name with an
/// underscore, which CGI-style upstreams (WSGI, PHP, Rack) read as the dashed name —
/// `X_Keygate_Client_Id` would become `X-Keygate-Client-Id` there (nginx drops such fields by
/// default for the same reason).
pub fn forbidden_inbound(name: &[u8]) -> bool {
    const PREFIX: &[u8] = b"x-keygate-";
    name.contains(&b'_')
        || name
            .get(..PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
}

/// The rule for a request field. `api_key_header` is the configured key header (lowercase).
/// Engines take [`FieldRules::request`], which adds the configured rules on top.
fn request_rule(name: &[u8], api_key_header: &[u8]) -> Rule {
    if eq(name, b"host") {
        Rule::Host
    } else if eq(name, b"content-length") {
        Rule::ContentLength
    } else if eq(name, b"transfer-encoding") {
        Rule::TransferEncoding
    } else if eq(name, b"connection") {
        Rule::Connection
    } else if eq(name, b"expect") {
        Rule::Expect
    } else if eq(name, b"upgrade") {
        Rule::Upgrade
    } else if eq(name, b"trailer") {
        Rule::Trailer
    } else if eq(name, b"authorization") {
        Rule::Authorization
    } else if eq(name, api_key_header) {
        Rule::ApiKey
    } else if eq(name, b"x-forwarded-for") {
        Rule::XForwardedFor
    } else if eq(name, b"x-forwarded-proto")
        || eq(name, b"x-forwarded-host")
        || hop_by_hop(name)
        || forbidden_inbound(name)
    {
        Rule::Drop
    } else {
        Rule::Forward
    }
}

/// The rule for a response field from an upstream.
pub fn response_rule(name: &[u8]) -> Rule {
    if eq(name, b"content-length") {
        Rule::ContentLength
    } else if eq(name, b"transfer-encoding") {
        Rule::TransferEncoding
    } else if eq(name, b"connection") {
        Rule::Connection
    } else if eq(name, b"upgrade") || hop_by_hop(name) {
        Rule::Drop
    } else if eq(name, b"ratelimit-limit")
        || eq(name, b"ratelimit-remaining")
        || eq(name, b"ratelimit-reset")
        || eq(name, b"keygate-credits-remaining")
        || eq(name, b"keygate-quota-remaining")
    {
        Rule::RateLimit
    } else if eq(name, b"date") {
        Rule::Date
    } else if eq(name, b"cache-control") {
        Rule::CacheControl
    } else if eq(name, b"vary") {
        Rule::Vary
    } else {
        Rule::Forward
    }
}

/// Whether a client's request field of rule `rule` is copied to the upstream as it is. The
/// gateway writes `Host`, `X-Forwarded-For` and the framing itself.
pub fn forwarded(rule: Rule, strip: Strip) -> bool {
    match rule {
        Rule::Forward => true,
        Rule::Authorization => !strip.authorization,
        Rule::ApiKey => !strip.api_key,
        _ => false,
    }
}

/// Whether an upstream's response field of rule `rule` is relayed to the client as it is.
/// `own_rate`: the gateway adds its own `RateLimit-*` (authenticated routes). A length left as
/// [`Rule::ContentLength`] is the one of a bodiless answer (see `h1::head::parse_response`).
pub fn relayed(rule: Rule, own_rate: bool) -> bool {
    match rule {
        Rule::Forward | Rule::Date | Rule::ContentLength | Rule::CacheControl | Rule::Vary => true,
        Rule::RateLimit => !own_rate,
        _ => false,
    }
}

/// The options of a `Connection` field value: `close`, `keep-alive`, `upgrade`, and the names
/// of the fields it makes hop-by-hop.
pub enum ConnectionToken<'a> {
    Close,
    KeepAlive,
    Upgrade,
    Names(&'a [u8]),
}

/// The tokens of one `Connection` value.
pub fn connection_tokens(value: &[u8]) -> impl Iterator<Item = ConnectionToken<'_>> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .map(|t| {
            if t.eq_ignore_ascii_case(b"close") {
                ConnectionToken::Close
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                ConnectionToken::KeepAlive
            } else if t.eq_ignore_ascii_case(b"upgrade") {
                ConnectionToken::Upgrade
            } else {
                ConnectionToken::Names(t)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_rules() {
        let k = b"x-api-key";
        for (name, rule) in [
            ("Host", Rule::Host),
            ("X-API-Key", Rule::ApiKey),
            ("authorization", Rule::Authorization),
            ("Content-Length", Rule::ContentLength),
            ("Transfer-Encoding", Rule::TransferEncoding),
            ("Connection", Rule::Connection),
            ("TE", Rule::Drop),
            ("Keep-Alive", Rule::Drop),
            ("Close", Rule::Drop),
            ("Proxy-Connection", Rule::Drop),
            ("Proxy-Authorization", Rule::Drop),
            ("HTTP2-Settings", Rule::Drop),
            ("X-Forwarded-For", Rule::XForwardedFor),
            ("X-Forwarded-Host", Rule::Drop),
            ("X-Forwarded-Proto", Rule::Drop),
            ("X-Keygate-Client-Id", Rule::Drop),
            ("x-keygate-anything", Rule::Drop),
            ("X_Custom", Rule::Drop),
            ("Upgrade", Rule::Upgrade),
            ("Expect", Rule::Expect),
            ("Trailer", Rule::Trailer),
            ("Accept", Rule::Forward),
            ("X-Forwarded", Rule::Forward),
        ] {
            assert_eq!(request_rule(name.as_bytes(), k), rule, "{name}");
        }
        assert!(forwarded(Rule::Forward, Strip::API_KEY));
        assert!(!forwarded(Rule::ApiKey, Strip::API_KEY));
        assert!(forwarded(Rule::Authorization, Strip::API_KEY));
        assert!(!forwarded(Rule::Authorization, Strip::AUTHORIZATION));
        for r in [
            Rule::Drop,
            Rule::Host,
            Rule::Connection,
            Rule::ContentLength,
        ] {
            assert!(!forwarded(r, Strip::NOTHING));
        }
        assert!(
            !forwarded(Rule::Authorization, Strip::BOTH) && !forwarded(Rule::ApiKey, Strip::BOTH)
        );
        let rules = FieldRules::default();
        let allowed = FieldRules::new(HeaderName::from_static("x-api-key"), true);
        for name in [
            "X-HTTP-Method-Override",
            "x-http-method",
            "X-Method-Override",
        ] {
            assert_eq!(rules.request(name.as_bytes()), Rule::Drop, "{name}");
            assert_eq!(allowed.request(name.as_bytes()), Rule::Forward, "{name}");
        }
        assert!(upper_token("GET") && upper_token("M-SEARCH") && upper_token("PURGE"));
        assert!(
            !upper_token("get") && !upper_token("Get") && !upper_token("") && !upper_token("G T")
        );
    }

    #[test]
    fn response_rules() {
        for (name, rule) in [
            ("Content-Length", Rule::ContentLength),
            ("Transfer-Encoding", Rule::TransferEncoding),
            ("Connection", Rule::Connection),
            ("Upgrade", Rule::Drop),
            ("Keep-Alive", Rule::Drop),
            ("Close", Rule::Drop),
            ("Proxy-Authenticate", Rule::Drop),
            ("RateLimit-Limit", Rule::RateLimit),
            ("Date", Rule::Date),
            ("X-Keygate-Whatever", Rule::Forward),
        ] {
            assert_eq!(response_rule(name.as_bytes()), rule, "{name}");
        }
        assert!(relayed(Rule::RateLimit, false) && !relayed(Rule::RateLimit, true));
        assert!(!relayed(Rule::Drop, false) && !relayed(Rule::Connection, false));
    }

    #[test]
    fn the_client_address_comes_from_trusted_proxies_only() {
        let policy = |trusted: &[&str]| Policy {
            fields: FieldRules::default(),
            non_ascii_paths: false,
            trusted_proxies: trusted.iter().map(|c| Cidr::parse(c).unwrap()).collect(),
            cache: CachePolicy::new(&HeaderName::from_static("x-api-key"), true, true),
            forward_auth: ForwardAuth {
                path: None,
                deny: crate::config::DenyMode::Status,
            },
            cors: None,
            max_headers: 100,
        };
        let req = |xff: Option<&str>, fwd: Option<&str>| {
            let mut b = http::Request::builder();
            if let Some(v) = xff {
                b = b.header("x-forwarded-for", v);
            }
            if let Some(v) = fwd {
                b = b.header("forwarded", v);
            }
            b.body(()).unwrap().into_parts().0
        };
        let lb: IpAddr = "10.0.0.5".parse().unwrap();
        let stranger: IpAddr = "198.51.100.7".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let p = policy(&["10.0.0.0/8"]);
        // Untrusted peers are who they are, whatever they claim.
        assert_eq!(p.client_ip(&req(Some("1.2.3.4"), None), stranger), stranger);
        // The right-most address that is not a trusted proxy.
        let spoofed = req(Some("6.6.6.6, 1.2.3.4, 10.1.1.1"), None);
        assert_eq!(p.client_ip(&spoofed, lb), ip("1.2.3.4"));
        assert_eq!(
            p.client_ip(
                &req(
                    None,
                    Some("for=6.6.6.6, for=\"[2001:db8::1]:4711\";proto=https")
                ),
                lb
            ),
            ip("2001:db8::1")
        );
        assert_eq!(
            p.client_ip(&req(Some("1.2.3.4:5555"), None), lb),
            ip("1.2.3.4")
        );
        // An element without `for=` names no hop.
        assert_eq!(
            p.client_ip(&req(None, Some("for=1.2.3.4, proto=https")), lb),
            ip("1.2.3.4")
        );
        // Lines of one field are one list, the last line the nearest hop.
        let mut two = req(Some("6.6.6.6"), None);
        two.headers
            .append("x-forwarded-for", "1.2.3.4, 10.1.1.1".parse().unwrap());
        assert_eq!(p.client_ip(&two, lb), ip("1.2.3.4"));
        let mut two = req(None, Some("for=6.6.6.6"));
        two.headers
            .append("forwarded", "for=1.2.3.4".parse().unwrap());
        assert_eq!(p.client_ip(&two, lb), ip("1.2.3.4"));
        // Garbage where an address belongs: the peer.
        assert_eq!(p.client_ip(&req(Some("evil, unknown"), None), lb), lb);
        assert_eq!(p.client_ip(&req(None, None), lb), lb);
        // Nothing trusted by default.
        assert_eq!(policy(&[]).client_ip(&spoofed, lb), lb);
    }

    #[test]
    fn cache_additions() {
        let c = CachePolicy::new(&HeaderName::from_static("x-api-key"), true, true);
        assert_eq!(c.vary.as_ref().unwrap(), "authorization, x-api-key");
        let add = |f: &[(Rule, &str)]| c.additions(f.iter().map(|(r, v)| (*r, v.as_bytes())));
        assert_eq!(add(&[]), (true, true));
        assert_eq!(add(&[(Rule::CacheControl, "max-age=60")]), (true, true));
        assert_eq!(
            add(&[(Rule::CacheControl, "no-cache, Public")]),
            (false, true)
        );
        assert_eq!(add(&[(Rule::CacheControl, "s-maxage=10")]), (false, true));
        assert_eq!(add(&[(Rule::Vary, "accept, *")]), (true, false));
        let off = CachePolicy::new(&HeaderName::from_static("x-api-key"), false, false);
        assert_eq!(off.additions(std::iter::empty()), (false, false));
    }

    #[test]
    fn connection_options() {
        let t: Vec<String> = connection_tokens(b" close ,, X-Secret,keep-alive, Upgrade")
            .map(|t| match t {
                ConnectionToken::Close => "close".into(),
                ConnectionToken::KeepAlive => "keep-alive".into(),
                ConnectionToken::Upgrade => "upgrade".into(),
                ConnectionToken::Names(n) => String::from_utf8(n.to_vec()).unwrap(),
            })
            .collect();
        assert_eq!(t, ["close", "X-Secret", "keep-alive", "upgrade"]);
    }
}
