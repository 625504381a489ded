//! Signed identity on the admin listener: the public key set (no credential, like on the
//! proxy listener) and the start of a signing-key rotation (admin key only).

use axum::Json;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{AdminError, ErrorResponses, JsonBody};
use super::{AdminState, Caller};
use crate::identity::{KeyInfo, RotateError};

const OFF: &str = "signed identity is off ([identity] sign = false)";

/// The body of a rotation: none, or an empty object (the call takes no fields; anything else
/// is refused and changes nothing).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({})))]
pub struct RotateSigningKey {}

/// The signing keys after a rotation started.
#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({
    "next": {"kid": "q4yKx0yQ4w6mJ3bI0mRrjv3f8uVq6fYJ3l2bxnPYz0M", "alg": "EdDSA", "state": "next",
             "active_from": "2026-01-01T01:00:00Z"},
    "keys": [
        {"kid": "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k", "alg": "EdDSA", "state": "current",
         "active_from": "2025-12-01T00:00:00Z"},
        {"kid": "q4yKx0yQ4w6mJ3bI0mRrjv3f8uVq6fYJ3l2bxnPYz0M", "alg": "EdDSA", "state": "next",
         "active_from": "2026-01-01T01:00:00Z"}
    ]
})))]
pub struct Rotation {
    /// The new key (state `next`): published now, signing from its `active_from`.
    pub next: Option<KeyInfo>,
    /// Every published key.
    pub keys: Vec<KeyInfo>,
}

/// Starts a signing-key rotation: a new key is published in the key set at once and signs
/// from `publish_ahead_secs` on; the current key stays published for `overlap_secs` after
/// that. Refused (409) while a rotation is pending or when the key comes from
/// `signing_key_file`.
#[utoipa::path(post, path = "/v1/identity/rotate", operation_id = "rotate_signing_key", tag = "identity",
    request_body(content = Option<RotateSigningKey>),
    responses((status = 200, description = "The rotation started: the new key and every published key", body = Rotation), ErrorResponses))]
pub async fn rotate(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    JsonBody(_): JsonBody<RotateSigningKey>,
) -> Result<Json<Rotation>, AdminError> {
    caller.admin_only()?;
    let identity = state.identity.as_ref().ok_or(AdminError::NotFound(OFF))?;
    let keys = identity.rotate().await.map_err(|e| match e {
        RotateError::Store(e) => AdminError::from(e),
        e @ (RotateError::KeyFile | RotateError::Pending { .. }) => {
            AdminError::Conflict(e.to_string())
        }
    })?;
    let next = keys
        .iter()
        .find(|k| k.state == crate::identity::KeyState::Next)
        .cloned();
    Ok(Json(Rotation { next, keys }))
}

/// The public signing keys (RFC 7517) that verify `X-Keygate-Assertion`: the current key, the
/// next one during a rotation and the previous one until its overlap ends. No credential.
#[utoipa::path(get, path = "/.well-known/jwks.json", operation_id = "jwks", tag = "identity", security(()),
    responses((status = 200, description = "The JWK set", content_type = "application/json", body = Object,
            example = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                "kid": "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k", "use": "sig", "alg": "EdDSA"}]})),
        (status = 404, description = "`not_found`: signed identity is off", body = super::error::Problem, content_type = "application/problem+json",
            example = json!({"type": "about:blank", "title": "Not Found", "status": 404, "code": "not_found", "detail": "signed identity is off ([identity] sign = false)"}))))]
pub async fn jwks(State(state): State<AdminState>) -> Result<Response, AdminError> {
    let identity = state.identity.as_ref().ok_or(AdminError::NotFound(OFF))?;
    Ok(identity
        .jwks_response()
        .map(axum::body::Body::from)
        .into_response())
}
