//! The admin plane (axum): key and client management, Kixote-compatible client calls, login,
//! health, readiness and the OpenAPI document.
//!
//! Callers: an admin key (X-ADMIN-KEY or `Authorization: Bearer`, compared by SHA-256 digest in
//! constant time against every configured key) manages everything; a client's API key or token
//! (any credential form of the proxy) whose permissions include the self-service permission
//! manages that client's own keys. Failed authentications are limited per peer IP.
//!
//! Every route is registered through utoipa-axum's `routes!`, so the OpenAPI document is built
//! from the same handlers and types that serve the requests. Every write goes to the store
//! first and then invalidates the cache entries it affects, before the answer is sent.

pub mod clients;
pub mod console;
pub mod document;
pub mod error;
pub mod gateway_config;
pub mod identity;
pub mod import;
pub mod keys;
pub mod kixote;
pub mod limits;
pub mod webhooks;

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::AUTHORIZATION;
use hyper::body::Incoming;
use serde::Serialize;
use subtle::{Choice, ConstantTimeEq};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::credential::Extractor;
use crate::auth::{AuthError, Authenticator};
use crate::keys::cache::KeyCache;
use crate::keys::store::Store;
use crate::keys::{ApiKey as StoredKey, KeyFormat, KeyHash, Millis};
use crate::limit::FailedAuth;
use crate::telemetry::metrics::Metrics;
use error::AdminError;

/// Who is calling the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An admin key: every client.
    Admin,
    /// A client's own key or token holding the self-service permission: that client only.
    Client {
        client_id: String,
        permissions: Vec<String>,
    },
}

impl Caller {
    /// Who this caller is as the setter of a key's constraints.
    pub fn set_by(&self) -> crate::keys::SetBy {
        match self {
            Caller::Admin => crate::keys::SetBy::Admin,
            Caller::Client { .. } => crate::keys::SetBy::Client,
        }
    }

    /// Refuses client principals (for calls that only an operator may make).
    pub fn admin_only(&self) -> Result<(), AdminError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Client { .. } => {
                Err(AdminError::Forbidden("this call needs an admin key".into()))
            }
        }
    }

    /// For the Kixote calls, whose contract answers a missing or wrong `X-ADMIN-KEY` with 401:
    /// a client principal (no admin key) gets 401 there, not 403.
    pub fn admin_key_required(&self) -> Result<(), AdminError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Client { .. } => Err(AdminError::Unauthorized),
        }
    }
}

pub struct AdminInner {
    pub store: Arc<dyn Store>,
    pub cache: KeyCache,
    pub format: KeyFormat,
    pub admin_keys: Vec<KeyHash>,
    pub plans: HashSet<String>,
    pub max_keys_per_client: u32,
    pub auth: Authenticator,
    pub extractor: Extractor,
    pub failed_auth: Arc<FailedAuth>,
    pub self_service_permission: String,
    pub openapi_json: OnceLock<String>,
    pub metrics: Arc<Metrics>,
    /// Signed identity (`[identity] sign`); `None`: off.
    pub identity: Option<Arc<crate::identity::Identity>>,
    /// Webhooks and their outbox (`None`: the store keeps no events).
    pub events: Option<Arc<crate::events::Events>>,
    /// Plans and routes as `GET /v1/config` shows them.
    pub gateway_config: serde_json::Value,
}

#[derive(Clone)]
pub struct AdminState(pub Arc<AdminInner>);

impl std::ops::Deref for AdminState {
    type Target = AdminInner;
    fn deref(&self) -> &AdminInner {
        &self.0
    }
}

impl AdminInner {
    /// Drops every cache entry of `keys` (current and previous hashes, and by id). Every admin
    /// write calls this after the store's write, which also wrote its events: the delivery loop
    /// is woken for them.
    pub fn invalidate(&self, keys: &[StoredKey]) {
        if let Some(events) = &self.events {
            events.wake();
        }
        for k in keys {
            for h in k.hashes() {
                self.cache.invalidate(&h);
            }
            self.cache.invalidate_id(&k.id);
        }
    }

    /// Every cached key is asked again at its next use (what a write touched cannot be named).
    pub fn invalidate_all(&self) {
        if let Some(events) = &self.events {
            events.wake();
        }
        self.cache.invalidate_all();
    }

    /// True when `presented` is one of the admin keys. Compares against every configured key
    /// without an early exit.
    fn is_admin_key(&self, presented: &str) -> bool {
        let h = KeyHash::of(presented);
        let mut hit = Choice::from(0);
        for k in &self.admin_keys {
            hit |= k.0.ct_eq(&h.0);
        }
        hit.into()
    }

    /// Counts a failed authentication from `ip`; past the allowance the answer is 429.
    pub fn failed(&self, ip: std::net::IpAddr, e: AdminError) -> AdminError {
        match self.failed_auth.record_failure(ip) {
            Some(wait) => AdminError::TooManyRequests {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            },
            None => e,
        }
    }
}

struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-ADMIN-KEY"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keygate admin API",
        description = "Clients and API keys of a keygate gateway. Every /v1/api-keys route is also served under /api/v1/api-keys."
    ),
    modifiers(&SecurityAddon),
    components(schemas(error::Problem, error::FieldError, import::ImportKey)),
    security(("admin_key" = []), ("bearer" = []))
)]
struct ApiDoc;

/// Every admin route, with its OpenAPI operation.
fn api(state: &AdminState) -> OpenApiRouter<AdminState> {
    // Calls a client principal never makes: refused 403 before their body is read (the
    // handlers check again).
    let admin_only = OpenApiRouter::new()
        .routes(routes!(import::import))
        .routes(routes!(gateway_config::show))
        .routes(routes!(clients::create, clients::list))
        .routes(routes!(clients::show, clients::update, clients::remove))
        .routes(routes!(identity::rotate))
        .routes(routes!(webhooks::create, webhooks::list))
        .routes(routes!(webhooks::show, webhooks::update, webhooks::remove))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(webhooks::rotate))
        .route_layer(middleware::from_fn(require_admin));
    // The Kixote calls are the admin key's alone: a client principal is refused 401 (their
    // contract) before its body is read.
    let kixote_calls = OpenApiRouter::new()
        .routes(routes!(kixote::create_client))
        .routes(routes!(kixote::list_clients))
        .routes(routes!(kixote::revoke_client_key))
        .routes(routes!(kixote::create_client_key))
        .routes(routes!(kixote::delete_client))
        .route_layer(middleware::from_fn(require_admin_key));
    // Credits are set by an admin only: a client principal is refused 403 before the body is
    // read (the handler checks again).
    let credit_changes = OpenApiRouter::new()
        .routes(routes!(limits::change))
        .route_layer(middleware::from_fn(require_credit_setter));
    let protected = OpenApiRouter::new()
        .routes(routes!(keys::create, keys::list))
        .routes(routes!(keys::show, keys::update, keys::remove))
        .routes(routes!(keys::rotate))
        .routes(routes!(keys::usage))
        .routes(routes!(limits::client_usage))
        .merge(admin_only)
        .merge(credit_changes)
        .merge(kixote_calls)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_caller,
        ))
        // Outside the caller check, so refused credentials are audited too.
        .route_layer(middleware::from_fn(audit_failures));
    let open = OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(openapi_json))
        .routes(routes!(metrics))
        .routes(routes!(kixote::login))
        .routes(routes!(identity::jwks))
        .routes(routes!(console::page))
        .routes(routes!(console::css))
        .routes(routes!(console::js));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(protected)
        .merge(open)
}

/// The OpenAPI document of the admin API, as served (JSON: it holds JSON Schema keywords
/// utoipa's types do not model, such as `dependentSchemas`).
pub fn openapi(state: &AdminState) -> serde_json::Value {
    document::complete(&api(state).into_openapi(), state)
}

pub fn router(state: AdminState, max_body_bytes: usize) -> Router {
    let (router, doc) = api(&state).split_for_parts();
    let doc = document::complete(&doc, &state);
    let _ = state.openapi_json.set(doc.to_string());
    router
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .fallback(|| async { AdminError::NotFound("no such admin endpoint") })
        .layer(middleware::map_response(no_store))
        .with_state(state)
}

/// Every admin answer is `Cache-Control: no-store` unless it says otherwise (the key set's
/// `max-age`): answers carry new keys, tokens and the state of keys, which no cache between
/// the admin and keygate (nor a browser) may keep (RFC 6749 §5.1 for tokens).
async fn no_store(mut res: Response) -> Response {
    res.headers_mut()
        .entry(http::header::CACHE_CONTROL)
        .or_insert(http::HeaderValue::from_static("no-store"));
    res
}

/// Prefix under which the key routes are also served.
const ALIAS_PREFIX: &str = "/api/v1/api-keys";

/// The `Host` names an admin listener answers (`[admin] allowed_hosts`): a page whose name
/// resolves to 127.0.0.1 (DNS rebinding) reaches a loopback listener from the operator's
/// browser under its own name, which is refused. `localhost`, `*.localhost` and IP addresses
/// are always answered; a request without a `Host` (not a browser's) too.
#[derive(Clone, Debug)]
pub struct AllowedHosts(Option<Arc<[String]>>);

impl AllowedHosts {
    /// `names` lowercase, without a trailing dot; `None`: any `Host`.
    pub fn new(names: Option<&[String]>) -> Self {
        Self(names.map(Arc::from))
    }

    /// Whether `authority` (`host[:port]`, as in `Host`) is answered.
    pub fn allows(&self, authority: &[u8]) -> bool {
        let Some(names) = &self.0 else {
            return true;
        };
        let Ok(a) = std::str::from_utf8(authority) else {
            return false;
        };
        let port_ok =
            |p: &str| p.is_empty() || (p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit()));
        if let Some(rest) = a.strip_prefix('[') {
            // An IPv6 literal.
            return rest.split_once(']').is_some_and(|(ip, tail)| {
                ip.parse::<std::net::Ipv6Addr>().is_ok()
                    && (tail.is_empty() || tail.strip_prefix(':').is_some_and(port_ok))
            });
        }
        let host = match a.rsplit_once(':') {
            Some((h, p)) if port_ok(p) => h,
            Some(_) => return false,
            None => a,
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.parse::<std::net::Ipv4Addr>().is_ok() {
            return true;
        }
        let lower = host.to_ascii_lowercase();
        lower == "localhost" || lower.ends_with(".localhost") || names.contains(&lower)
    }
}

/// The hyper service for one admin connection: records the peer, maps the
/// `/api/v1/api-keys` alias onto `/v1/api-keys`, and gives every request body
/// `body_timeout` from the arrival of its head to arrive whole (then reading it fails with
/// [`error::BodyTimedOut`], answered 408): a client that sends a head and holds back the body
/// gives its connection slot back within that time.
pub fn service(
    router: Router,
    peer: SocketAddr,
    body_timeout: Duration,
    hosts: AllowedHosts,
) -> impl hyper::service::Service<
    http::Request<Incoming>,
    Response = Response,
    Error = Infallible,
    Future = impl Future<Output = Result<Response, Infallible>> + Send,
> + Send {
    use tower::ServiceExt;
    hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().as_bytes())
            .or_else(|| req.headers().get(http::header::HOST).map(|h| h.as_bytes()));
        // The public key set is public: verifiers fetch it by whatever name reaches them.
        let misdirected = !authority.is_none_or(|a| hosts.allows(a))
            && req.uri().path() != crate::identity::JWKS_PATH;
        req.extensions_mut().insert(ConnectInfo(peer));
        if req.uri().path().starts_with(ALIAS_PREFIX)
            && let Some(pq) = req.uri().path_and_query()
            && let Ok(rewritten) = pq.as_str()["/api".len()..].parse::<http::Uri>()
        {
            *req.uri_mut() = rewritten;
        }
        let deadline = tokio::time::Instant::now() + body_timeout;
        let answer = (!misdirected).then(|| {
            router.clone().oneshot(req.map(|body| {
                axum::body::Body::new(DeadlineBody {
                    inner: body,
                    deadline,
                    timer: None,
                })
            }))
        });
        async move {
            match answer {
                Some(answer) => answer.await,
                None => Ok(no_store(AdminError::MisdirectedHost.into_response()).await),
            }
        }
    })
}

/// A request body that fails with [`error::BodyTimedOut`] once `deadline` has passed
/// before it ended.
struct DeadlineBody<B> {
    inner: B,
    deadline: tokio::time::Instant,
    /// Armed on the first read that has to wait.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> hyper::body::Body for DeadlineBody<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(error::BodyTimedOut))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn peer_ip(req: &Request) -> std::net::IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |c| c.0.ip())
}

fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let auth = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = auth.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case("bearer ").then(|| rest.trim())
}

async fn require_caller(
    State(state): State<AdminState>,
    mut req: Request,
    next: Next,
) -> Result<Response, AdminError> {
    let ip = peer_ip(&req);
    let caller = match identify(&state, req.headers(), ip).await {
        // The Kixote calls answer any caller without the admin key 401 (their contract): a
        // valid key without the self-service permission is no different there from a wrong one.
        Err(AdminError::Forbidden(_)) if req.uri().path().starts_with("/auth/") => {
            return Err(AdminError::Unauthorized);
        }
        other => other?,
    };
    req.extensions_mut().insert(caller.clone());
    let mut res = next.run(req).await;
    // For the audit around this check.
    res.extensions_mut().insert(caller);
    Ok(res)
}

/// The admin-only calls' check (403), inside [`require_caller`] (which names the caller).
async fn require_admin(req: Request, next: Next) -> Result<Response, AdminError> {
    caller_of(&req)?.admin_only()?;
    Ok(next.run(req).await)
}

/// The credit changes' check (403), inside [`require_caller`].
async fn require_credit_setter(req: Request, next: Next) -> Result<Response, AdminError> {
    limits::admin_sets_credits(caller_of(&req)?)?;
    Ok(next.run(req).await)
}

/// The Kixote calls' check (401), inside [`require_caller`].
async fn require_admin_key(req: Request, next: Next) -> Result<Response, AdminError> {
    caller_of(&req)?.admin_key_required()?;
    Ok(next.run(req).await)
}

/// The caller [`require_caller`] named.
fn caller_of(req: &Request) -> Result<&Caller, AdminError> {
    req.extensions()
        .get::<Caller>()
        .ok_or(AdminError::Unauthorized)
}

/// Admin mutations that fail are audited here, those refused for their credential (401, 403,
/// 429: `caller` none) included (successful ones are audited by their handlers, with the ids
/// they touched).
async fn audit_failures(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    if method == http::Method::GET || method == http::Method::HEAD {
        return next.run(req).await;
    }
    let path = req.uri().path().to_owned();
    let peer = peer_ip(&req);
    let res = next.run(req).await;
    let caller = res.extensions().get::<Caller>();
    // A refused credential is audited up to the failed-authentication limit; what that limit
    // then turns away (429) is not, so a flood of guesses does not flood the log.
    let throttled = caller.is_none() && res.status() == StatusCode::TOO_MANY_REQUESTS;
    if !res.status().is_success() && !throttled {
        let path: String = path.chars().take(256).collect();
        tracing::info!(
            target: "keygate::audit",
            action = %method,
            // As a string value: quoted and escaped in human logs (a path may hold U+0085 or
            // U+2028, which log readers take for line breaks, and look-alike spaces).
            path = path.as_str(),
            caller = ?caller,
            peer = %peer,
            outcome = res.status().as_u16(),
        );
    }
    res
}

async fn identify(
    state: &AdminState,
    headers: &http::HeaderMap,
    ip: std::net::IpAddr,
) -> Result<Caller, AdminError> {
    // Failures are counted and, past the allowance, refused (429); a valid admin key or
    // credential is never throttled, however many guesses came from its address.
    if let Some(k) = headers.get("x-admin-key") {
        let ok = k.to_str().is_ok_and(|k| state.is_admin_key(k.trim()));
        return if ok {
            Ok(Caller::Admin)
        } else {
            Err(state.failed(ip, AdminError::Unauthorized))
        };
    }
    if bearer(headers).is_some_and(|k| state.is_admin_key(k)) {
        return Ok(Caller::Admin);
    }
    // No credential at all counts as a failure too: each is audited (on a mutation), and only
    // the failed-authentication limit bounds how many lines a flood of them writes.
    let Some(cred) = state.extractor.extract(headers, None) else {
        return Err(state.failed(ip, AdminError::Unauthorized));
    };
    match state.auth.authenticate(&cred).await {
        Ok(p) if p.has(&state.self_service_permission) => Ok(Caller::Client {
            client_id: p.client_id().to_owned(),
            permissions: p.permission_list(),
        }),
        Ok(_) => Err(AdminError::Forbidden(format!(
            "the key lacks the {:?} permission",
            state.self_service_permission
        ))),
        Err(AuthError::StoreUnavailable) => Err(AdminError::StoreUnavailable),
        // Only guesses count; a real key that is disabled or expired is not one.
        Err(e) if e.is_guess() => Err(state.failed(ip, AdminError::Unauthorized)),
        Err(_) => Err(AdminError::Unauthorized),
    }
}

#[derive(Serialize, ToSchema)]
#[schema(examples(json!({"status": "ok"})))]
pub struct Status {
    /// `ok` (healthz), `ready` or `store_unavailable` (readyz).
    #[schema(pattern = "^(ok|ready|store_unavailable)$")]
    pub status: String,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "service", security(()),
    responses((status = 200, description = "The process answers", body = Status)))]
async fn healthz() -> impl IntoResponse {
    axum::Json(Status {
        status: "ok".into(),
    })
}

/// Readiness: the store answers.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "service", security(()),
    responses((status = 200, description = "The store answers", body = Status),
        (status = 503, description = "The store does not answer", body = Status, example = json!({"status": "store_unavailable"}))))]
async fn readyz(State(state): State<AdminState>) -> Response {
    match state.store.ping().await {
        Ok(()) => axum::Json(Status {
            status: "ready".into(),
        })
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check: store unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(Status {
                    status: "store_unavailable".into(),
                }),
            )
                .into_response()
        }
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "service", security(()),
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json",
        example = json!({"openapi": "3.1.0", "info": {"title": "keygate admin API", "version": "0.1.0"}, "paths": {}}))))]
async fn openapi_json(State(state): State<AdminState>) -> Response {
    let body = state.openapi_json.get().cloned().unwrap_or_default();
    ([(http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Prometheus metrics (text format).
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "service", security(()),
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// RFC 3339 UTC with millisecond precision.
pub fn rfc3339(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `page`/`per_page` query parameters.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page number, from 1 (default 1).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 4294967295_u64, example = 1)]
    page: Option<String>,
    /// Items per page, 1–1000 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000, example = 100)]
    per_page: Option<String>,
    /// Only this client's items (admin callers).
    pub client_id: Option<String>,
}

pub const DEFAULT_PER_PAGE: u32 = 100;
pub const MAX_PER_PAGE: u32 = 1000;

impl PageQuery {
    pub fn bounds(&self) -> Result<(u32, u32), AdminError> {
        let mut errs = Vec::new();
        let page = match self.page.as_deref().map(str::parse::<u32>) {
            None => 1,
            Some(Ok(p)) if p >= 1 => p,
            Some(_) => {
                errs.push(error::FieldError::new("page", "must be a whole number ≥ 1"));
                1
            }
        };
        let per_page = match self.per_page.as_deref().map(str::parse::<u32>) {
            None => DEFAULT_PER_PAGE,
            Some(Ok(p)) if (1..=MAX_PER_PAGE).contains(&p) => p,
            Some(_) => {
                errs.push(error::FieldError::new(
                    "per_page",
                    format!("must be a whole number from 1 to {MAX_PER_PAGE}"),
                ));
                DEFAULT_PER_PAGE
            }
        };
        if errs.is_empty() {
            Ok((page, per_page))
        } else {
            Err(AdminError::Validation(errs))
        }
    }
}

/// One page of items, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct PageView<T> {
    pub data: Vec<T>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

/// Every key of a client, across pages.
pub async fn all_keys_of(store: &dyn Store, client_id: &str) -> Result<Vec<StoredKey>, AdminError> {
    let mut out = Vec::new();
    for page in 1.. {
        let p = store.list_keys(Some(client_id), page, MAX_PER_PAGE).await?;
        let n = p.items.len();
        out.extend(p.items);
        if n < MAX_PER_PAGE as usize {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_answered() {
        let listed = ["admin.example.com".to_string()];
        let hosts = AllowedHosts::new(Some(&listed));
        for ok in [
            "127.0.0.1",
            "127.0.0.1:8081",
            "10.1.2.3:80",
            "[::1]:8081",
            "[::1]",
            "localhost",
            "LocalHost:8081",
            "localhost.:8081",
            "console.localhost:8081",
            "admin.example.com",
            "Admin.Example.COM.:443",
        ] {
            assert!(hosts.allows(ok.as_bytes()), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:8081",
            "127.0.0.1.evil.example:8081",
            "localhost.evil.example",
            "example.com",
            "admin.example.com.evil",
            "[::1]x",
            "[nonsense]:80",
            "127.0.0.1:80:80",
            "127.0.0.1:port",
            "",
        ] {
            assert!(!hosts.allows(refused.as_bytes()), "{refused}");
        }
        assert!(!hosts.allows(b"\xff:80"));
        assert!(AllowedHosts::new(None).allows(b"evil.example"));
    }

    /// A body that never sends anything.
    struct Stalled;

    impl hyper::body::Body for Stalled {
        type Data = bytes::Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Infallible>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_body_past_its_deadline_is_answered_408_and_closes_the_connection() {
        use tower::ServiceExt;
        // One handler reading a JSON body, behind the body limit, as the admin router has it.
        let router: axum::routing::MethodRouter<(), Infallible> = axum::routing::post(
            |error::JsonBody(v): error::JsonBody<serde_json::Value>| async move { v.to_string() },
        )
        .layer(DefaultBodyLimit::max(1024));
        let body = axum::body::Body::new(DeadlineBody {
            inner: Stalled,
            deadline: tokio::time::Instant::now() + Duration::from_millis(50),
            timer: None,
        });
        let req = http::Request::post("/").body(body).unwrap();
        let started = std::time::Instant::now();
        let res = router.oneshot(req).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(res.headers()[http::header::CONNECTION], "close");
        let body = axum::body::to_bytes(res.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "request_timeout");
    }
}
