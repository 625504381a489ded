//! Kixote-compatible client calls: the exact paths, bodies, field names, messages and date
//! format of SPEC §4.3, so existing scripts run unchanged. Bodies accept extra fields (old
//! scripts may send them); answers have exactly the documented fields, in the documented order.

use axum::Json;
use axum::extract::{ConnectInfo, Extension, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::clients::{self, FIRST_KEY_NAME, check_client_id};
use super::error::{AdminError, ErrorResponses, JsonBody};
use super::keys::{audit, new_key};
use super::{AdminState, Caller, MAX_PER_PAGE};
use crate::auth::AuthError;
use crate::auth::jwt::{LoginRequest, TokenResponse};
use crate::keys::now_millis;
use crate::keys::store::StoreError;

const NO_CLIENT: &str = "client not found";

/// The body of `POST /auth/create_client` (other fields are ignored).
#[derive(Debug, Deserialize, ToSchema)]
#[schema(examples(json!({"client_id": "acme", "license": "pro"})))]
pub struct KxCreateClient {
    /// 1–64 characters of `[A-Za-z0-9._-]`, not `.` or `..`, unique (409 when it exists).
    #[schema(value_type = String, required = true, pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$", examples("acme"))]
    pub client_id: Option<String>,
    /// One of the configured plans (`[plans.<license>]`).
    #[schema(value_type = String, required = true, examples("pro"))]
    pub license: Option<String>,
}

/// A body naming one client (other fields are ignored); an unknown client answers 404.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(examples(json!({"client_id": "acme"})))]
pub struct KxClientRef {
    #[schema(value_type = String, required = true, pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$", examples("acme"))]
    pub client_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({"api_key": "kg_3xQ9vLm2aR7tYp0sWk4eHd8uJc6nBf1gZ5", "client_id": "acme", "license": "pro"})))]
pub struct KxCreated {
    /// The client's key, shown once.
    pub api_key: String,
    #[schema(
        pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$"
    )]
    pub client_id: String,
    pub license: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({"client_id": "acme", "created_at": "2026-11-30 09:15:00", "license": "pro"})))]
pub struct KxClient {
    #[schema(
        pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$"
    )]
    pub client_id: String,
    /// `YYYY-MM-DD HH:MM:SS`, UTC.
    #[schema(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$")]
    pub created_at: String,
    pub license: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({"client_id": "acme", "message": "Client key revoked"})))]
pub struct KxRevoked {
    #[schema(
        pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$"
    )]
    pub client_id: String,
    /// Always `Client key revoked`.
    #[schema(examples("Client key revoked"))]
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({"api_key": "kg_3xQ9vLm2aR7tYp0sWk4eHd8uJc6nBf1gZ5", "client_id": "acme", "message": "Client key recreated"})))]
pub struct KxRecreated {
    /// The client's new key, shown once.
    pub api_key: String,
    #[schema(
        pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$"
    )]
    pub client_id: String,
    /// Always `Client key recreated`.
    #[schema(examples("Client key recreated"))]
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({"message": "Client deleted", "client_id": "acme"})))]
pub struct KxDeleted {
    /// Always `Client deleted`.
    #[schema(examples("Client deleted"))]
    pub message: String,
    #[schema(
        pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$"
    )]
    pub client_id: String,
}

fn client_id_of(body: KxClientRef) -> Result<String, AdminError> {
    let mut errs = Vec::new();
    let id = check_client_id(body.client_id.as_deref(), &mut errs);
    if errs.is_empty() {
        Ok(id)
    } else {
        Err(AdminError::Validation(errs))
    }
}

fn not_found(e: StoreError) -> AdminError {
    match e {
        StoreError::NotFound => AdminError::NotFound(NO_CLIENT),
        e => e.into(),
    }
}

/// Creates a client and its key.
#[utoipa::path(post, path = "/auth/create_client", operation_id = "kixote_create_client", tag = "kixote", request_body = KxCreateClient,
    responses((status = 201, description = "The client and its key (shown once)", body = KxCreated), ErrorResponses))]
pub async fn create_client(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<KxCreateClient>,
) -> Result<impl IntoResponse, AdminError> {
    caller.admin_key_required()?;
    let (client, _, plaintext) = clients::create_with_first_key(
        &state,
        &caller,
        body.client_id.as_deref(),
        body.license.as_deref(),
        None,
        Vec::new(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(KxCreated {
            api_key: plaintext.expose().to_owned(),
            client_id: client.client_id,
            license: client.license,
        }),
    ))
}

/// Every client.
#[utoipa::path(get, path = "/auth/list_clients", operation_id = "kixote_list_clients", tag = "kixote",
    responses((status = 200, description = "Every client", body = Vec<KxClient>,
        example = json!([{"client_id": "acme", "created_at": "2026-11-30 09:15:00", "license": "pro"}])), ErrorResponses))]
pub async fn list_clients(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<KxClient>>, AdminError> {
    caller.admin_key_required()?;
    let mut out = Vec::new();
    for page in 1.. {
        let p = state.store.list_clients(page, MAX_PER_PAGE).await?;
        let n = p.items.len();
        out.extend(p.items.into_iter().map(|c| {
            KxClient {
                created_at: chrono::DateTime::from_timestamp_millis(c.created_at)
                    .unwrap_or_default()
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string(),
                client_id: c.client_id,
                license: c.license,
            }
        }));
        if n < MAX_PER_PAGE as usize {
            break;
        }
    }
    Ok(Json(out))
}

/// Disables every key of the client.
#[utoipa::path(post, path = "/auth/revoke_client_key", operation_id = "kixote_revoke_client_key", tag = "kixote", request_body = KxClientRef,
    responses((status = 200, description = "Every key of the client is disabled", body = KxRevoked), ErrorResponses))]
pub async fn revoke_client_key(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<KxClientRef>,
) -> Result<Json<KxRevoked>, AdminError> {
    caller.admin_key_required()?;
    let client_id = client_id_of(body)?;
    let before = state
        .store
        .disable_client_keys(&client_id)
        .await
        .map_err(not_found)?;
    state.invalidate(&before);
    tracing::info!(target: "keygate::audit", action = "client.revoke_keys", caller = ?caller, client_id = %client_id, keys = before.len(), outcome = "ok");
    Ok(Json(KxRevoked {
        client_id,
        message: "Client key revoked".into(),
    }))
}

/// Replaces every key of the client by one new key (with the permissions of the client's
/// oldest key, if any).
#[utoipa::path(post, path = "/auth/create_client_key", operation_id = "kixote_create_client_key", tag = "kixote", request_body = KxClientRef,
    responses((status = 200, description = "The client's only key now (shown once)", body = KxRecreated), ErrorResponses))]
pub async fn create_client_key(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<KxClientRef>,
) -> Result<Json<KxRecreated>, AdminError> {
    caller.admin_key_required()?;
    let client_id = client_id_of(body)?;
    if state.store.get_client(&client_id).await?.is_none() {
        return Err(AdminError::NotFound(NO_CLIENT));
    }
    let oldest = state.store.list_keys(Some(&client_id), 1, 1).await?;
    let permissions = oldest
        .items
        .first()
        .map(|k| k.permissions.clone())
        .unwrap_or_default();
    let (key, plaintext) = new_key(
        &state,
        &client_id,
        FIRST_KEY_NAME.into(),
        permissions,
        now_millis(),
    );
    let mut before = state
        .store
        .replace_client_keys(&client_id, &key)
        .await
        .map_err(not_found)?;
    before.push(key.clone());
    state.invalidate(&before);
    audit("client.recreate_key", &caller, &key);
    Ok(Json(KxRecreated {
        api_key: plaintext.expose().to_owned(),
        client_id,
        message: "Client key recreated".into(),
    }))
}

/// Deletes the client and its keys.
#[utoipa::path(delete, path = "/auth/delete_client", operation_id = "kixote_delete_client", tag = "kixote", request_body = KxClientRef,
    responses((status = 200, description = "The client and its keys are deleted", body = KxDeleted), ErrorResponses))]
pub async fn delete_client(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<KxClientRef>,
) -> Result<Json<KxDeleted>, AdminError> {
    caller.admin_key_required()?;
    let client_id = client_id_of(body)?;
    clients::delete_with_keys(&state, &caller, &client_id)
        .await
        .map_err(|e| match e {
            AdminError::NotFound(_) => AdminError::NotFound(NO_CLIENT),
            e => e,
        })?;
    Ok(Json(KxDeleted {
        message: "Client deleted".into(),
        client_id,
    }))
}

/// Trades an API key for a short-lived access token. No admin key needed.
#[utoipa::path(post, path = "/auth/login", operation_id = "login", tag = "kixote", request_body = LoginRequest, security(()),
    responses((status = 200, description = "An access token", body = TokenResponse), ErrorResponses))]
pub async fn login(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    JsonBody(body): JsonBody<LoginRequest>,
) -> Result<Json<TokenResponse>, AdminError> {
    let ip = peer.ip();
    match state.auth.login(&body.api_key).await {
        Ok(token) => Ok(Json(TokenResponse::from(token))),
        Err(AuthError::StoreUnavailable) => Err(AdminError::StoreUnavailable),
        Err(e) if e.is_guess() => Err(state.failed(ip, AdminError::InvalidApiKey)),
        Err(_) => Err(AdminError::InvalidApiKey),
    }
}
