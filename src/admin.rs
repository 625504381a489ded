//! The admin plane (axum): key and client management, health and readiness.
//!
//! Every route except `/healthz` and `/readyz` requires a caller. An admin key (X-ADMIN-KEY or
//! `Authorization: Bearer`) is compared by SHA-256 digest in constant time against every
//! configured key. Every write goes to the store first and then invalidates the cache entries it
//! affects, before the answer is sent: a revoked key is refused by the very next request.

pub mod clients;
pub mod error;
pub mod keys;

use std::collections::HashSet;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use http::header::AUTHORIZATION;
use serde::Serialize;
use subtle::{Choice, ConstantTimeEq};

use crate::keys::cache::KeyCache;
use crate::keys::store::Store;
use crate::keys::{ApiKey, KeyFormat, KeyHash, Millis};
use error::AdminError;

/// Who is calling the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An admin key: every client.
    Admin,
}

pub struct AdminInner {
    pub store: Arc<dyn Store>,
    pub cache: KeyCache,
    pub format: KeyFormat,
    pub admin_keys: Vec<KeyHash>,
    pub plans: HashSet<String>,
    pub max_keys_per_client: u32,
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
    /// Drops every cache entry of `keys` (current and previous hashes).
    pub fn invalidate(&self, keys: &[ApiKey]) {
        for k in keys {
            for h in k.hashes() {
                self.cache.invalidate(&h);
            }
        }
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
}

pub fn router(state: AdminState, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .merge(keys::routes())
        .merge(clients::routes())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_caller,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(api)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .fallback(|| async { AdminError::NotFound("no such admin endpoint") })
        .with_state(state)
}

fn presented_admin_key(req: &Request) -> Option<&str> {
    let h = req.headers();
    if let Some(v) = h.get("x-admin-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim());
    }
    let auth = h.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = auth.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case("bearer ").then(|| rest.trim())
}

async fn require_caller(
    State(state): State<AdminState>,
    mut req: Request,
    next: Next,
) -> Result<Response, AdminError> {
    let ok = presented_admin_key(&req).is_some_and(|k| state.is_admin_key(k));
    if !ok {
        return Err(AdminError::Unauthorized);
    }
    req.extensions_mut().insert(Caller::Admin);
    Ok(next.run(req).await)
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match state.store.ping().await {
        Ok(()) => axum::Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check: store unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({"status": "store_unavailable"})),
            )
                .into_response()
        }
    }
}

/// RFC 3339 UTC with millisecond precision.
pub fn rfc3339(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `page`/`per_page` query parameters.
#[derive(Debug, serde::Deserialize)]
pub struct PageQuery {
    page: Option<String>,
    per_page: Option<String>,
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

#[derive(Debug, Serialize)]
pub struct PageView<T> {
    pub data: Vec<T>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

/// Every key of a client, across pages.
pub async fn all_keys_of(store: &dyn Store, client_id: &str) -> Result<Vec<ApiKey>, AdminError> {
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
