//! `/v1/clients`: create (with a first key), list, get, update, delete (with all its keys).

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{AdminError, ErrorResponses, FieldError, JsonBody, Path, Query};
use super::keys::{KeyView, audit, check_metadata, check_permissions, new_key};
use super::{AdminState, Caller, PageQuery, PageView, all_keys_of, rfc3339};
use crate::keys::store::ClientPatch;
use crate::keys::{CLIENT_ID_RULE, Client, now_millis, valid_client_id};

/// Name of the key created together with a client.
pub const FIRST_KEY_NAME: &str = "default";

/// A client as the admin API shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({
    "client_id": "acme",
    "license": "pro",
    "created_at": "2026-11-30T09:15:00.000Z",
    "metadata": {"billing_account": "ba-1042"}
})))]
pub struct ClientView {
    #[schema(
        pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$"
    )]
    pub client_id: String,
    /// One of the configured plans (`[plans.<license>]`).
    pub license: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(value_type = Option<Object>, additional_properties)]
    pub metadata: Option<serde_json::Value>,
}

impl ClientView {
    pub fn of(c: &Client) -> Self {
        Self {
            client_id: c.client_id.clone(),
            license: c.license.clone(),
            created_at: rfc3339(c.created_at),
            metadata: c.metadata.clone(),
        }
    }
}

/// A new client and its first key (with the plaintext, shown once).
#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({
    "client_id": "acme",
    "license": "pro",
    "created_at": "2026-11-30T09:15:00.000Z",
    "metadata": {"billing_account": "ba-1042"},
    "api_key": {
        "id": "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d",
        "client_id": "acme",
        "name": "default",
        "prefix": "kg_3xQ9vLm2a",
        "permissions": ["invoices:read"],
        "enabled": true,
        "created_at": "2026-11-30T09:15:00.000Z",
        "updated_at": "2026-11-30T09:15:00.000Z",
        "expires_at": null,
        "last_used_at": null,
        "rate_limit": null,
        "metadata": null,
        "disabled_by": null,
        "expires_set_by": null,
        "rate_limit_set_by": null,
        "key": "kg_3xQ9vLm2aR7tYp0sWk4eHd8uJc6nBf1gZ5"
    }
})))]
pub struct CreatedClient {
    #[serde(flatten)]
    pub client: ClientView,
    pub api_key: KeyView,
}

/// A deleted client and how many keys went with it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({
    "client_id": "acme",
    "license": "pro",
    "created_at": "2026-11-30T09:15:00.000Z",
    "metadata": null,
    "deleted_keys": 3
})))]
pub struct DeletedClient {
    #[serde(flatten)]
    pub client: ClientView,
    pub deleted_keys: usize,
}

/// The body of `POST /v1/clients`. `roles` is an alias of `permissions` (not both).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({
    "client_id": "acme",
    "license": "pro",
    "metadata": {"billing_account": "ba-1042"},
    "permissions": ["invoices:read"]
})))]
pub struct CreateClient {
    /// 1–64 characters of `[A-Za-z0-9._-]`, not `.` or `..`, unique (409 when it exists).
    #[schema(value_type = String, required = true, pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$", examples("acme"))]
    pub client_id: Option<String>,
    /// One of the configured plans (`[plans.<license>]`).
    #[schema(value_type = String, required = true, examples("pro"))]
    pub license: Option<String>,
    /// Any JSON object.
    #[schema(value_type = Option<Object>, additional_properties)]
    pub metadata: Option<serde_json::Value>,
    /// Permissions of the first key: up to 100, each 1–100 printable ASCII characters
    /// without commas or spaces (alias `roles`).
    #[serde(alias = "roles")]
    #[schema(value_type = Option<Vec<super::keys::Permission>>, max_items = 100)]
    pub permissions: Option<Vec<String>>,
}

/// The body of `PATCH /v1/clients/{client_id}`: only the fields given change (a null
/// `license` changes nothing).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"license": "pro", "metadata": {"billing_account": "ba-2077"}})))]
pub struct UpdateClient {
    /// One of the configured plans (`[plans.<license>]`).
    pub license: Option<String>,
    /// Any JSON object, or null to remove it.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Object>, additional_properties)]
    pub metadata: Option<Option<serde_json::Value>>,
}

fn nullable<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<serde_json::Value>>, D::Error> {
    Option::<serde_json::Value>::deserialize(d).map(Some)
}

pub fn check_client_id(id: Option<&str>, errs: &mut Vec<FieldError>) -> String {
    match id {
        Some(id) if valid_client_id(id) => id.to_owned(),
        Some(_) => {
            errs.push(FieldError::new("client_id", CLIENT_ID_RULE));
            String::new()
        }
        None => {
            errs.push(FieldError::new("client_id", "required"));
            String::new()
        }
    }
}

pub fn check_license(
    state: &AdminState,
    license: Option<&str>,
    errs: &mut Vec<FieldError>,
) -> String {
    match license {
        Some(l) if state.plans.contains(l) => l.to_owned(),
        Some(_) => {
            let mut known: Vec<&str> = state.plans.iter().map(String::as_str).collect();
            known.sort_unstable();
            errs.push(FieldError::new(
                "license",
                format!("unknown license; configured plans: {}", known.join(", ")),
            ));
            String::new()
        }
        None => {
            errs.push(FieldError::new("license", "required"));
            String::new()
        }
    }
}

/// Validates and creates a client with its first key; returns both and the key's plaintext.
/// Shared by `/v1/clients` and the Kixote `create_client`.
pub async fn create_with_first_key(
    state: &AdminState,
    caller: &Caller,
    client_id: Option<&str>,
    license: Option<&str>,
    metadata: Option<serde_json::Value>,
    permissions: Vec<String>,
) -> Result<(Client, crate::keys::ApiKey, crate::keys::Secret), AdminError> {
    caller.admin_only()?;
    let now = now_millis();
    let mut errs = Vec::new();
    let client_id = check_client_id(client_id, &mut errs);
    let license = check_license(state, license, &mut errs);
    check_metadata(&metadata, &mut errs);
    check_permissions(&permissions, &mut errs);
    if !errs.is_empty() {
        return Err(AdminError::Validation(errs));
    }
    let client = Client {
        client_id: client_id.clone(),
        license,
        created_at: now,
        metadata,
    };
    let (key, plaintext) = new_key(state, &client_id, FIRST_KEY_NAME.into(), permissions, now);
    state.store.insert_client(&client, &key).await?;
    state.invalidate(std::slice::from_ref(&key));
    audit("client.create", caller, &key);
    Ok((client, key, plaintext))
}

/// Creates a client and its first key (plaintext in the answer, once).
#[utoipa::path(post, path = "/v1/clients", operation_id = "create_client", tag = "clients", request_body = CreateClient,
    responses((status = 201, description = "The client and its first key (plaintext shown once)", body = CreatedClient), ErrorResponses))]
pub async fn create(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<CreateClient>,
) -> Result<impl IntoResponse, AdminError> {
    let (client, key, plaintext) = create_with_first_key(
        &state,
        &caller,
        body.client_id.as_deref(),
        body.license.as_deref(),
        body.metadata,
        body.permissions.unwrap_or_default(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedClient {
            client: ClientView::of(&client),
            api_key: KeyView::with_secret(&key, plaintext.expose()),
        }),
    ))
}

/// Lists clients.
#[utoipa::path(get, path = "/v1/clients", operation_id = "list_clients", tag = "clients", params(PageQuery),
    responses((status = 200, description = "One page of clients", body = PageView<ClientView>,
        example = json!({"data": [{"client_id": "acme", "license": "pro", "created_at": "2026-11-30T09:15:00.000Z", "metadata": null}], "page": 1, "per_page": 100, "total": 1})), ErrorResponses))]
pub async fn list(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<PageQuery>,
) -> Result<Json<PageView<ClientView>>, AdminError> {
    caller.admin_only()?;
    let (page, per_page) = q.bounds()?;
    let p = state.store.list_clients(page, per_page).await?;
    Ok(Json(PageView {
        data: p.items.iter().map(ClientView::of).collect(),
        page,
        per_page,
        total: p.total,
    }))
}

const NO_CLIENT: &str = "no client with this client_id";

/// One client.
#[utoipa::path(get, path = "/v1/clients/{client_id}", operation_id = "get_client", tag = "clients",
    params(("client_id" = String, Path, pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$", example = "acme")),
    responses((status = 200, description = "The client", body = ClientView), ErrorResponses))]
pub async fn show(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(client_id): Path<String>,
) -> Result<Json<ClientView>, AdminError> {
    caller.admin_only()?;
    let c = state
        .store
        .get_client(&client_id)
        .await?
        .ok_or(AdminError::NotFound(NO_CLIENT))?;
    Ok(Json(ClientView::of(&c)))
}

/// Changes a client's license or metadata; its keys follow at once.
#[utoipa::path(patch, path = "/v1/clients/{client_id}", operation_id = "update_client", tag = "clients", request_body(content = Option<UpdateClient>, description = "Optional: an empty body changes nothing"),
    params(("client_id" = String, Path, pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$", example = "acme")),
    responses((status = 200, description = "The updated client", body = ClientView), ErrorResponses))]
pub async fn update(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(client_id): Path<String>,
    JsonBody(body): JsonBody<UpdateClient>,
) -> Result<Json<ClientView>, AdminError> {
    caller.admin_only()?;
    let mut errs = Vec::new();
    let license = body
        .license
        .as_deref()
        .map(|l| check_license(&state, Some(l), &mut errs));
    if let Some(m) = &body.metadata {
        check_metadata(m, &mut errs);
    }
    if !errs.is_empty() {
        return Err(AdminError::Validation(errs));
    }
    // Only what the body names is written, on the client as it is at that moment.
    let patch = ClientPatch {
        license,
        metadata: body.metadata,
    };
    let c = state
        .store
        .patch_client(&client_id, &patch)
        .await?
        .ok_or(AdminError::NotFound(NO_CLIENT))?;
    // The license is part of every cached principal of this client. The patch stands: should
    // its keys not be listed now, every cached key is asked again instead (the answer is not
    // "nothing was changed", and this instance does not go on with the old license).
    match all_keys_of(state.store.as_ref(), &client_id).await {
        Ok(keys) => state.invalidate(&keys),
        Err(e) => {
            tracing::warn!(error = ?e, client_id = %client_id, "client updated, but its keys could not be listed; every cached key is asked again");
            state.invalidate_all();
        }
    }
    tracing::info!(target: "keygate::audit", action = "client.update", caller = ?caller, client_id = %client_id, outcome = "ok");
    Ok(Json(ClientView::of(&c)))
}

/// Deletes a client and its keys, drops them from the cache and audits it. Shared by
/// `/v1/clients/{client_id}` and the Kixote `delete_client`.
pub async fn delete_with_keys(
    state: &AdminState,
    caller: &Caller,
    client_id: &str,
) -> Result<crate::keys::store::ClientWithKeys, AdminError> {
    caller.admin_only()?;
    let deleted = state
        .store
        .delete_client(client_id)
        .await?
        .ok_or(AdminError::NotFound(NO_CLIENT))?;
    state.invalidate(&deleted.keys);
    tracing::info!(target: "keygate::audit", action = "client.delete", caller = ?caller, client_id = %client_id, keys = deleted.keys.len(), outcome = "ok");
    Ok(deleted)
}

/// Deletes a client and all its keys; they stop working at once.
#[utoipa::path(delete, path = "/v1/clients/{client_id}", operation_id = "delete_client", tag = "clients",
    params(("client_id" = String, Path, pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$", example = "acme")),
    responses((status = 200, description = "The deleted client", body = DeletedClient), ErrorResponses))]
pub async fn remove(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(client_id): Path<String>,
) -> Result<Json<DeletedClient>, AdminError> {
    let deleted = delete_with_keys(&state, &caller, &client_id).await?;
    Ok(Json(DeletedClient {
        client: ClientView::of(&deleted.client),
        deleted_keys: deleted.keys.len(),
    }))
}
