//! `/v1/api-keys` (also under `/api/v1/api-keys`): create, list, get, update, delete, rotate.

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{AdminError, ErrorResponses, FieldError, JsonBody, Path, Query};
use super::{AdminState, Caller, PageQuery, PageView, rfc3339};
use crate::keys::store::{KeyPatch, Rotated, Rotation};
use crate::keys::{ApiKey, CLIENT_ID_RULE, Millis, RateLimit, SetBy, now_millis, valid_client_id};

/// Longest rotation grace period: 7 days.
pub const MAX_GRACE_SECONDS: u64 = 7 * 24 * 3600;
const MAX_EXPIRES_DAYS: u32 = 36_500;

/// A key as the admin API shows it. `key` (the plaintext) is present only in the answers to
/// create and rotate.
#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({
    "id": "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d",
    "client_id": "acme",
    "name": "billing backend",
    "prefix": "kg_3xQ9vLm2a",
    "permissions": ["invoices:read", "invoices:write"],
    "enabled": true,
    "created_at": "2026-11-30T09:15:00.000Z",
    "updated_at": "2026-11-30T09:15:00.000Z",
    "expires_at": "2027-11-30T09:15:00.000Z",
    "last_used_at": null,
    "rate_limit": {"per_second": 50, "burst": 100},
    "metadata": {"team": "billing"},
    "disabled_by": null,
    "expires_set_by": "admin",
    "rate_limit_set_by": "admin",
    "key": "kg_3xQ9vLm2aR7tYp0sWk4eHd8uJc6nBf1gZ5"
})))]
pub struct KeyView {
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(
        pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$"
    )]
    pub client_id: String,
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    /// The key's first characters, to recognise it (not a secret).
    pub prefix: String,
    pub permissions: Vec<String>,
    pub enabled: bool,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// When the key stops working (null: never).
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    /// Last request seen with the key (written in batches; null: never used).
    #[schema(format = DateTime)]
    pub last_used_at: Option<String>,
    /// The key's own limit (null: its client's plan, else the default).
    pub rate_limit: Option<RateLimit>,
    #[schema(value_type = Option<Object>, additional_properties)]
    pub metadata: Option<serde_json::Value>,
    /// Who disabled the key (null while it is enabled). A key an admin disabled can be enabled
    /// by an admin only.
    pub disabled_by: Option<SetBy>,
    /// Who set `expires_at` (null when there is none). An expiry an admin set can be brought
    /// closer by the client, but removed or postponed by an admin only.
    pub expires_set_by: Option<SetBy>,
    /// Who set `rate_limit` (null when there is none); only an admin sets rate limits.
    pub rate_limit_set_by: Option<SetBy>,
    /// After a rotation with a grace period: until when the previous key still works.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, format = DateTime)]
    pub previous_key_valid_until: Option<String>,
    /// The plaintext key: only in the answers to create and rotate, never again.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub key: Option<String>,
    /// The key's credits, when it has credits (absent: the key is not limited by credits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<super::limits::CreditsView>,
}

impl KeyView {
    pub fn of(k: &ApiKey) -> Self {
        let now = now_millis();
        Self {
            id: k.id.to_string(),
            client_id: k.client_id.clone(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            permissions: k.permissions.clone(),
            enabled: k.enabled,
            created_at: rfc3339(k.created_at),
            updated_at: rfc3339(k.updated_at),
            expires_at: k.expires_at.map(rfc3339),
            last_used_at: k.last_used_at.map(rfc3339),
            rate_limit: k.rate_limit,
            metadata: k.metadata.clone(),
            disabled_by: k.disabled_by,
            expires_set_by: k.expires_set_by,
            rate_limit_set_by: k.rate_limit_set_by,
            previous_key_valid_until: k
                .previous_valid_until
                .filter(|&t| k.previous_hash.is_some() && t > now)
                .map(rfc3339),
            key: None,
            credits: None,
        }
    }

    pub fn with_secret(k: &ApiKey, plaintext: &str) -> Self {
        Self {
            key: Some(plaintext.to_owned()),
            ..Self::of(k)
        }
    }
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn nullable<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The body of `POST /v1/api-keys`. At most one of `expires_at`, `expires_days` and
/// `never_expire` may be given (not null); `roles` is an alias of `permissions` (not both).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({
    "name": "billing backend",
    "client_id": "acme",
    "permissions": ["invoices:read", "invoices:write"],
    "expires_days": 365,
    "rate_limit": {"per_second": 50, "burst": 100},
    "metadata": {"team": "billing"}
})))]
pub struct CreateKey {
    /// 1–100 characters, no control characters.
    #[schema(value_type = String, required = true, min_length = 1, max_length = 100,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$", examples("billing backend"))]
    pub name: Option<String>,
    /// Owner of the key: an existing client (404 otherwise). Required for admin callers; a
    /// client principal may omit it or give its own id only.
    #[schema(value_type = String, required = true, pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$", examples("acme"))]
    pub client_id: Option<String>,
    /// Up to 100 permissions, each 1–100 printable ASCII characters without commas or spaces
    /// (alias `roles`). A client principal may grant only permissions it holds (403 otherwise).
    #[serde(alias = "roles")]
    #[schema(value_type = Option<Vec<Permission>>, max_items = 100)]
    pub permissions: Option<Vec<String>>,
    /// Default true.
    pub enabled: Option<bool>,
    /// RFC 3339 time, which must be in the future (a rule no schema keyword can state).
    #[schema(value_type = Option<String>, format = DateTime, examples("2027-12-31T23:59:59Z"))]
    pub expires_at: Option<DateTime<Utc>>,
    /// Days from now, 1–36500.
    #[schema(minimum = 1, maximum = 36500)]
    pub expires_days: Option<u32>,
    /// `true`: the key never expires (the default). `false` is refused.
    // The document states that with `not: {const: false}` (added in `admin::document`).
    pub never_expire: Option<bool>,
    /// Admin callers only (403 for a client principal).
    pub rate_limit: Option<RateLimit>,
    /// Any JSON object.
    #[schema(value_type = Option<Object>, additional_properties)]
    pub metadata: Option<serde_json::Value>,
    /// Credits the key starts with, and their refill (admins only).
    pub credits: Option<super::limits::CreditsBody>,
}

/// The body of `PATCH /v1/api-keys/{id}`: only the fields given change (a null `name`,
/// `enabled` or `permissions` changes nothing). `roles` is an alias of `permissions` (not both).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({
    "name": "billing backend (2027)",
    "enabled": false,
    "permissions": ["invoices:read"],
    "expires_at": "2027-12-31T23:59:59Z",
    "rate_limit": null,
    "metadata": {"team": "billing", "ticket": "OPS-1234"}
})))]
pub struct UpdateKey {
    /// 1–100 characters, no control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub name: Option<String>,
    /// A client principal may not enable a key an admin disabled (403).
    pub enabled: Option<bool>,
    /// Up to 100 permissions, each 1–100 printable ASCII characters without commas or spaces
    /// (alias `roles`). A client principal may grant only permissions it holds (403 otherwise).
    #[serde(alias = "roles")]
    #[schema(value_type = Option<Vec<Permission>>, max_items = 100)]
    pub permissions: Option<Vec<String>>,
    /// RFC 3339 time, which must be in the future (a rule no schema keyword can state), or
    /// null for never. A client principal may bring an admin's expiry closer, not remove or
    /// postpone it (403).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = DateTime, examples("2027-12-31T23:59:59Z"))]
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// A limit, or null to fall back to the plan. Admin callers only (403 for a client
    /// principal).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<RateLimit>)]
    pub rate_limit: Option<Option<RateLimit>>,
    /// Any JSON object, or null.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Object>, additional_properties)]
    pub metadata: Option<Option<serde_json::Value>>,
    /// New credit terms, or null: the key is no longer limited by credits (admins only).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<super::limits::CreditsBody>)]
    pub credits: Option<Option<super::limits::CreditsBody>>,
}

/// One permission: 1–100 printable ASCII characters without commas or spaces (permissions
/// travel comma-separated in a header).
#[derive(ToSchema)]
#[schema(value_type = String, min_length = 1, max_length = 100, pattern = "^[\\x21-\\x2B\\x2D-\\x7E]+$", examples("invoices:read"))]
pub struct Permission(pub String);

/// The body of `POST /v1/api-keys/{id}/rotate` (optional).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"grace_period_seconds": 3600})))]
pub struct RotateKey {
    /// How long the previous key keeps working, 0–604800 s (7 days; default 0: it stops at
    /// once).
    #[schema(minimum = 0, maximum = 604800)]
    pub grace_period_seconds: Option<u64>,
}

/// A rotation's `grace_period_seconds` (a key's or a webhook secret's): 0 when not given, at
/// most [`MAX_GRACE_SECONDS`].
pub fn grace_period(given: Option<u64>) -> Result<u64, AdminError> {
    let grace = given.unwrap_or(0);
    if grace > MAX_GRACE_SECONDS {
        return Err(AdminError::Validation(vec![FieldError::new(
            "grace_period_seconds",
            format!("must be from 0 to {MAX_GRACE_SECONDS} (7 days)"),
        )]));
    }
    Ok(grace)
}

pub fn check_name(name: &str, errs: &mut Vec<FieldError>) {
    if let Some(why) = crate::keys::name_problem(name) {
        errs.push(FieldError::new("name", why));
    }
}

pub fn check_permissions(perms: &[String], errs: &mut Vec<FieldError>) {
    if let Some(why) = crate::keys::permissions_problem(perms) {
        errs.push(FieldError::new("permissions", why));
    }
}

pub fn check_rate_limit(limit: &Option<RateLimit>, errs: &mut Vec<FieldError>) {
    if let Some(why) = limit.as_ref().and_then(RateLimit::problem) {
        errs.push(FieldError::new("rate_limit", why));
    }
}

pub fn check_metadata(meta: &Option<serde_json::Value>, errs: &mut Vec<FieldError>) {
    if meta.as_ref().is_some_and(|m| !m.is_object()) {
        errs.push(FieldError::new("metadata", "must be a JSON object"));
    }
}

fn future_millis(t: DateTime<Utc>, now: Millis, errs: &mut Vec<FieldError>) -> Option<Millis> {
    let ms = t.timestamp_millis();
    if ms <= now {
        errs.push(FieldError::new("expires_at", "must be in the future"));
    }
    Some(ms)
}

/// Resolves `expires_at` / `expires_days` / `never_expire` (at most one may be given).
fn expiry(body: &CreateKey, now: Millis, errs: &mut Vec<FieldError>) -> Option<Millis> {
    let given = [
        body.expires_at.is_some(),
        body.expires_days.is_some(),
        body.never_expire.is_some(),
    ]
    .iter()
    .filter(|&&b| b)
    .count();
    if given > 1 {
        errs.push(FieldError::new(
            "expires_at",
            "give at most one of expires_at, expires_days, never_expire",
        ));
        return None;
    }
    if let Some(t) = body.expires_at {
        return future_millis(t, now, errs);
    }
    if let Some(days) = body.expires_days {
        if !(1..=MAX_EXPIRES_DAYS).contains(&days) {
            errs.push(FieldError::new(
                "expires_days",
                format!("must be from 1 to {MAX_EXPIRES_DAYS}"),
            ));
            return None;
        }
        return Some(now + i64::from(days) * 86_400_000);
    }
    if body.never_expire == Some(false) {
        errs.push(FieldError::new(
            "never_expire",
            "only `true` is meaningful; give expires_at or expires_days instead",
        ));
    }
    None
}

/// Builds a new key record for `client_id` and returns it with its plaintext.
pub fn new_key(
    state: &AdminState,
    client_id: &str,
    name: String,
    permissions: Vec<String>,
    now: Millis,
) -> (ApiKey, crate::keys::Secret) {
    let generated = state.format.generate();
    let key = ApiKey::fresh(
        client_id,
        name,
        generated.display_prefix,
        generated.hash,
        permissions,
        now,
    );
    (key, generated.plaintext)
}

/// What a client principal may not do to its own keys: grant permissions it does not hold
/// itself, or change rate limits.
fn check_client_limits(
    caller: &Caller,
    permissions: Option<&[String]>,
    sets_rate_limit: bool,
) -> Result<(), AdminError> {
    let Caller::Client {
        permissions: own, ..
    } = caller
    else {
        return Ok(());
    };
    if sets_rate_limit {
        return Err(AdminError::Forbidden(
            "only an admin can set rate limits".into(),
        ));
    }
    if permissions.is_some_and(|p| p.iter().any(|p| !own.contains(p))) {
        return Err(AdminError::Forbidden(
            "a key cannot grant permissions the caller does not hold".into(),
        ));
    }
    Ok(())
}

/// Creates an API key; the plaintext is in the answer, once.
#[utoipa::path(post, path = "/v1/api-keys", operation_id = "create_key", tag = "keys", request_body = CreateKey,
    responses((status = 201, description = "The new key, with its plaintext `key` (shown once)", body = KeyView), ErrorResponses))]
pub async fn create(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<CreateKey>,
) -> Result<impl IntoResponse, AdminError> {
    let now = now_millis();
    check_client_limits(
        &caller,
        body.permissions.as_deref(),
        body.rate_limit.is_some(),
    )?;
    if body.credits.is_some() {
        super::limits::admin_sets_credits(&caller)?;
    }
    let mut errs = Vec::new();
    let credits = body.credits.map(|c| c.write(&mut errs));
    let name = body.name.clone().unwrap_or_default();
    check_name(&name, &mut errs);
    let client_id = match (&caller, body.client_id.as_deref()) {
        (Caller::Client { client_id, .. }, None) => client_id.clone(),
        (Caller::Client { client_id, .. }, Some(id)) if id == client_id => client_id.clone(),
        (Caller::Client { .. }, Some(_)) => {
            errs.push(FieldError::new(
                "client_id",
                "a client can only create keys for itself",
            ));
            String::new()
        }
        (Caller::Admin, Some(id)) if valid_client_id(id) => id.to_owned(),
        (Caller::Admin, Some(_)) => {
            errs.push(FieldError::new("client_id", CLIENT_ID_RULE));
            String::new()
        }
        (Caller::Admin, None) => {
            errs.push(FieldError::new("client_id", "required for admin callers"));
            String::new()
        }
    };
    let permissions = body.permissions.clone().unwrap_or_default();
    check_permissions(&permissions, &mut errs);
    check_rate_limit(&body.rate_limit, &mut errs);
    check_metadata(&body.metadata, &mut errs);
    let expires_at = expiry(&body, now, &mut errs);
    if !errs.is_empty() {
        return Err(AdminError::Validation(errs));
    }

    let (mut key, plaintext) = new_key(&state, &client_id, name, permissions, now);
    key.enabled = body.enabled.unwrap_or(true);
    key.expires_at = expires_at;
    key.rate_limit = body.rate_limit;
    key.metadata = body.metadata;
    key.set_by(caller.set_by());
    state
        .store
        .insert_key(&key, state.max_keys_per_client)
        .await
        .map_err(|e| match e {
            // The body is well formed; what it names does not exist (as on every other call
            // that names a missing client).
            crate::keys::store::StoreError::NotFound => {
                AdminError::NotFound("no client with this client_id")
            }
            e => e.into(),
        })?;
    // A hash is new by construction, but a negative entry could exist in theory: drop it.
    state.invalidate(std::slice::from_ref(&key));
    let mut view = KeyView::with_secret(&key, plaintext.expose());
    if let Some(w) = credits {
        // Nobody holds the plaintext yet: if the credits cannot be written, the key is
        // deleted again and the create fails (a key must never work without its credits).
        match super::limits::write(&state, &key, w).await {
            Ok(c) => view.credits = c,
            Err(e) => {
                let undone = state.store.delete_key(key.id).await;
                state.invalidate(std::slice::from_ref(&key));
                if let Err(d) = undone {
                    // The key stands without its credits (its secret was never shown).
                    tracing::error!(error = %d, key_id = %key.id, "could not delete a key whose credits were not written");
                    return Err(AdminError::StoreIncomplete);
                }
                return Err(e);
            }
        }
    }
    audit("key.create", &caller, &key);
    Ok((StatusCode::CREATED, Json(view)))
}

/// Lists keys (a client principal sees its own only). No secrets.
#[utoipa::path(get, path = "/v1/api-keys", operation_id = "list_keys", tag = "keys", params(PageQuery),
    responses((status = 200, description = "One page of keys (no secrets)", body = PageView<KeyView>,
        example = json!({"data": [{"id": "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d", "client_id": "acme", "name": "billing backend", "prefix": "kg_3xQ9vLm2a", "permissions": ["invoices:read"], "enabled": true, "created_at": "2026-11-30T09:15:00.000Z", "updated_at": "2026-11-30T09:15:00.000Z", "expires_at": null, "last_used_at": "2026-12-01T17:42:08.120Z", "rate_limit": null, "metadata": null, "disabled_by": null, "expires_set_by": null, "rate_limit_set_by": null}], "page": 1, "per_page": 100, "total": 1})), ErrorResponses))]
pub async fn list(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<PageQuery>,
) -> Result<Json<PageView<KeyView>>, AdminError> {
    let (page, per_page) = q.bounds()?;
    let client = match &caller {
        Caller::Admin => q.client_id.as_deref(),
        Caller::Client { client_id, .. } => Some(client_id.as_str()),
    };
    let p = state.store.list_keys(client, page, per_page).await?;
    let mut data = Vec::with_capacity(p.items.len());
    for k in &p.items {
        let mut v = KeyView::of(k);
        v.credits = super::limits::view(&state, k.id).await?;
        data.push(v);
    }
    Ok(Json(PageView {
        data,
        page,
        per_page,
        total: p.total,
    }))
}

/// Loads a key the caller may see; others answer 404 (not 403).
pub(super) async fn load(
    state: &AdminState,
    caller: &Caller,
    id: &str,
) -> Result<ApiKey, AdminError> {
    const NOT_FOUND: &str = "no API key with this id";
    let id = Uuid::parse_str(id).map_err(|_| AdminError::NotFound(NOT_FOUND))?;
    let record = state
        .store
        .find_by_id(id)
        .await?
        .ok_or(AdminError::NotFound(NOT_FOUND))?;
    match caller {
        Caller::Admin => Ok(record.key),
        Caller::Client { client_id, .. } if *client_id == record.key.client_id => Ok(record.key),
        Caller::Client { .. } => Err(AdminError::NotFound(NOT_FOUND)),
    }
}

/// One key. No secret.
#[utoipa::path(get, path = "/v1/api-keys/{id}", operation_id = "get_key", tag = "keys",
    params(("id" = String, Path, format = Uuid, description = "Key id (a key of another client answers 404)", example = "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d")),
    responses((status = 200, description = "The key (no secret)", body = KeyView), ErrorResponses))]
pub async fn show(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, AdminError> {
    let key = load(&state, &caller, &id).await?;
    let mut view = KeyView::of(&key);
    view.credits = super::limits::view(&state, key.id).await?;
    Ok(Json(view))
}

/// Changes a key; the proxy obeys the change from the next request on.
#[utoipa::path(patch, path = "/v1/api-keys/{id}", operation_id = "update_key", tag = "keys", request_body(content = Option<UpdateKey>, description = "Optional: an empty body changes nothing"),
    params(("id" = String, Path, format = Uuid, description = "Key id (a key of another client answers 404)", example = "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d")),
    responses((status = 200, description = "The updated key", body = KeyView), ErrorResponses))]
pub async fn update(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateKey>,
) -> Result<Json<KeyView>, AdminError> {
    let now = now_millis();
    let key = load(&state, &caller, &id).await?;
    check_client_limits(
        &caller,
        body.permissions.as_deref(),
        body.rate_limit.is_some(),
    )?;
    if body.credits.is_some() {
        super::limits::admin_sets_credits(&caller)?;
    }
    let mut errs = Vec::new();
    let credits = body.credits.map(|c| match c {
        Some(c) => c.write(&mut errs),
        None => crate::keys::allowance::CreditsWrite::Remove,
    });
    if let Some(name) = &body.name {
        check_name(name, &mut errs);
    }
    if let Some(p) = &body.permissions {
        check_permissions(p, &mut errs);
    }
    if let Some(limit) = &body.rate_limit {
        check_rate_limit(limit, &mut errs);
    }
    if let Some(meta) = &body.metadata {
        check_metadata(meta, &mut errs);
    }
    let expires_at = match body.expires_at {
        Some(Some(t)) => Some(future_millis(t, now, &mut errs)),
        Some(None) => Some(None),
        None => None,
    };
    if !errs.is_empty() {
        return Err(AdminError::Validation(errs));
    }
    // Only the attributes the body names are written, on the key as it is at that moment: a
    // concurrent disable, rotation or other PATCH is never undone by this one.
    let patch = KeyPatch {
        name: body.name,
        enabled: body.enabled,
        permissions: body.permissions,
        expires_at,
        rate_limit: body.rate_limit,
        metadata: body.metadata,
        // A client may tighten what an admin set but not loosen it: the store judges that on
        // the key as it is at the moment of the write, and refuses the whole patch (403).
        by: caller.set_by(),
        leak: None,
    };
    let key = state
        .store
        .patch_key(key.id, &patch, now)
        .await?
        .ok_or(AdminError::NotFound("no API key with this id"))?;
    state.invalidate(std::slice::from_ref(&key));
    // The patch stands from here: audited now, and a store failure below (the credits' write,
    // or only their read for the answer) is one partway through the change, never "nothing
    // was changed".
    audit("key.update", &caller, &key);
    let partway = |e| match e {
        AdminError::StoreUnavailable => AdminError::StoreIncomplete,
        e => e,
    };
    let mut view = KeyView::of(&key);
    view.credits = match credits {
        Some(w) => super::limits::write(&state, &key, w)
            .await
            .map_err(partway)?,
        None => super::limits::view(&state, key.id).await.map_err(partway)?,
    };
    Ok(Json(view))
}

/// Deletes a key; it stops working at once. Answers the deleted key.
#[utoipa::path(delete, path = "/v1/api-keys/{id}", operation_id = "delete_key", tag = "keys",
    params(("id" = String, Path, format = Uuid, description = "Key id (a key of another client answers 404)", example = "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d")),
    responses((status = 200, description = "The deleted key", body = KeyView), ErrorResponses))]
pub async fn remove(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, AdminError> {
    let key = load(&state, &caller, &id).await?;
    let deleted = state
        .store
        .delete_key(key.id)
        .await?
        .ok_or(AdminError::NotFound("no API key with this id"))?;
    state.invalidate(std::slice::from_ref(&deleted));
    audit("key.delete", &caller, &deleted);
    Ok(Json(KeyView::of(&deleted)))
}

/// Replaces a key's secret (same id); the old one stops at once or after the grace period.
#[utoipa::path(post, path = "/v1/api-keys/{id}/rotate", operation_id = "rotate_key", tag = "keys", request_body(content = Option<RotateKey>),
    params(("id" = String, Path, format = Uuid, description = "Key id (a key of another client answers 404)", example = "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d")),
    responses((status = 200, description = "The key with its new plaintext `key` (shown once)", body = KeyView), ErrorResponses))]
pub async fn rotate(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RotateKey>,
) -> Result<Json<KeyView>, AdminError> {
    let now = now_millis();
    let grace = grace_period(body.grace_period_seconds)?;
    let key = load(&state, &caller, &id).await?;
    // A client principal gets the new secret in the answer: only for a key whose permissions it
    // holds itself, as for a key it creates (a narrow key must not yield a wider one).
    check_client_limits(&caller, Some(&key.permissions), false).map_err(|_| {
        AdminError::Forbidden(
            "a key cannot rotate a key holding permissions the caller does not hold".into(),
        )
    })?;
    let generated = state.format.generate();
    // The store swaps the secret on the key as it is at that moment and changes nothing else:
    // a concurrent PATCH neither undoes this rotation nor is undone by it.
    let rotation = Rotation {
        key_hash: generated.hash,
        prefix: generated.display_prefix,
        previous_valid_until: (grace > 0).then(|| now + grace as i64 * 1000),
        at: now,
    };
    let Rotated { before, after } = state
        .store
        .rotate_key(key.id, &rotation)
        .await?
        .ok_or(AdminError::NotFound("no API key with this id"))?;
    // Both the old state (its current and previous hashes) and the new one.
    state.invalidate(&[before, after.clone()]);
    audit("key.rotate", &caller, &after);
    Ok(Json(KeyView::with_secret(
        &after,
        generated.plaintext.expose(),
    )))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// How many days back, including today (1–366, default 30).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 366, example = 30)]
    days: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DayUsage {
    /// `YYYY-MM-DD` (UTC).
    #[schema(format = Date)]
    pub date: String,
    pub requests: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({
    "key_id": "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d",
    "last_used_at": "2026-12-01T17:42:08.120Z",
    "days": [{"date": "2026-11-30", "requests": 1520}, {"date": "2026-12-01", "requests": 1733}],
    "total": 3253
})))]
pub struct UsageView {
    #[schema(format = Uuid)]
    pub key_id: String,
    #[schema(format = DateTime)]
    pub last_used_at: Option<String>,
    /// Days with requests, oldest first. Counts reach the store in batches
    /// (`[store] last_used_flush_secs`), so the last seconds may be missing.
    pub days: Vec<DayUsage>,
    pub total: u64,
    /// The key's credits, when it has credits (exact: charged as requests are admitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<super::limits::CreditsView>,
}

const MAX_USAGE_DAYS: i64 = 366;

/// Requests per day of one key.
#[utoipa::path(get, path = "/v1/api-keys/{id}/usage", operation_id = "key_usage", tag = "keys",
    params(("id" = String, Path, format = Uuid, description = "Key id (a key of another client answers 404)", example = "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d"), UsageQuery),
    responses((status = 200, description = "Requests per day", body = UsageView), ErrorResponses))]
pub async fn usage(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<UsageQuery>,
) -> Result<Json<UsageView>, AdminError> {
    let days = match q.days.as_deref().map(str::parse::<i64>) {
        None => 30,
        Some(Ok(d)) if (1..=MAX_USAGE_DAYS).contains(&d) => d,
        Some(_) => {
            return Err(AdminError::Validation(vec![FieldError::new(
                "days",
                format!("must be a whole number from 1 to {MAX_USAGE_DAYS}"),
            )]));
        }
    };
    let key = load(&state, &caller, &id).await?;
    let today = crate::keys::usage::day_of(now_millis());
    let rows = state.store.usage(key.id, today - days + 1, today).await?;
    let total = rows.iter().map(|(_, n)| n).sum();
    let credits = super::limits::view(&state, key.id).await?;
    Ok(Json(UsageView {
        credits,
        key_id: key.id.to_string(),
        last_used_at: key.last_used_at.map(rfc3339),
        days: rows
            .into_iter()
            .map(|(day, requests)| DayUsage {
                date: chrono::DateTime::from_timestamp(day * 86_400, 0)
                    .unwrap_or_default()
                    .format("%Y-%m-%d")
                    .to_string(),
                requests,
            })
            .collect(),
        total,
    }))
}

pub fn audit(action: &'static str, caller: &Caller, key: &ApiKey) {
    tracing::info!(
        target: "keygate::audit",
        action,
        caller = ?caller,
        key_id = %key.id,
        client_id = %key.client_id,
        outcome = "ok",
    );
}
