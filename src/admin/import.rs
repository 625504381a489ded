//! `POST /v1/api-keys/import` (admin only): keys migrated from another system, each given as
//! the plaintext the other system issued (16–256 visible ASCII characters: Kong key-auth, Tyk
//! custom keys…) or as the SHA-256 hex of it (Unkey-style hash exports). Only SHA-256 is
//! stored; the plaintext is never stored, logged or echoed.
//!
//! Each key is judged on its own and refused keys are listed by index with why; the others
//! are written. With `"atomic": true` nothing at all is written when any key is refused (the
//! `--on-error abort` mode of `keygate key import`). Messages never quote a key, a hash or any
//! other value of the request, only field names.

use axum::Json;
use axum::extract::{Extension, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{AdminError, ErrorResponses, FieldError, JsonBody};
use super::{AdminState, Caller};
use crate::keys::{KeyHash, foreign, now_millis};

/// Most keys one import request may carry (the admin body limit applies as well).
pub const MAX_IMPORT_KEYS: usize = 10_000;

/// One key to import: exactly one of `key` and `sha256`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Documents the body; the handler reads it field by field.
pub struct ImportKey {
    /// An existing client.
    pub client_id: String,
    /// 1–100 characters.
    pub name: String,
    /// The plaintext key as the other system issued it: 16–256 visible ASCII characters. A key
    /// starting with keygate's own prefix must be a valid keygate key.
    #[schema(min_length = 16, max_length = 256)]
    pub key: Option<String>,
    /// SHA-256 of the plaintext key, 64 hex characters.
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    pub sha256: Option<String>,
    /// Permissions (alias `roles`).
    pub permissions: Option<Vec<String>>,
    /// RFC 3339 time in the future; absent or null: never expires.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Documents the body; the handler reads it field by field.
#[schema(examples(json!({"keys": [
    {"client_id": "acme", "name": "migrated from Kong", "key": "kong-3xQ9vLm2aR7tYp0sWk4e", "permissions": ["invoices:read"]},
    {"client_id": "acme", "name": "migrated from Unkey", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
], "atomic": false})))]
pub struct ImportRequest {
    /// At most 10000 keys, each an `ImportKey` object (`client_id`, `name`, `key` | `sha256`,
    /// `permissions`?, `expires_at`?). Each is judged on its own: one that does not fit (a
    /// missing or unknown field, a bad key or hash, an unknown client, a duplicate…) is
    /// reported in `errors` by its index, not refused with the request.
    #[schema(value_type = Vec<Value>, max_items = 10000)]
    pub keys: Vec<ImportKey>,
    /// `true`: when any key is refused, nothing is written (default false: the others are).
    pub atomic: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImportError {
    /// Position of the key in `keys`, from 0.
    pub index: usize,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(examples(json!({"imported": 1, "errors": [{"index": 1, "message": "client_id: no such client"}]})))]
pub struct ImportResult {
    /// Keys written.
    pub imported: usize,
    /// Keys not written, by index, ascending.
    pub errors: Vec<ImportError>,
}

/// Imports keys from another system (plaintext or SHA-256); admin only.
#[utoipa::path(post, path = "/v1/api-keys/import", operation_id = "import_keys", tag = "keys", request_body = ImportRequest,
    responses((status = 200, description = "How many keys were written, and each refused key by index with why", body = ImportResult), ErrorResponses))]
pub async fn import(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<ImportResult>, AdminError> {
    caller.admin_only()?;
    let obj = body.as_object().expect("JsonBody<Value> is an object");
    let mut errs = Vec::new();
    for field in obj.keys() {
        if field != "keys" && field != "atomic" {
            errs.push(FieldError::new(foreign::shown(field), "unknown field"));
        }
    }
    let items = match obj.get("keys") {
        Some(Value::Array(items)) if items.len() <= MAX_IMPORT_KEYS => items.as_slice(),
        Some(Value::Array(_)) => {
            errs.push(FieldError::new(
                "keys",
                format!("at most {MAX_IMPORT_KEYS} keys per request"),
            ));
            &[]
        }
        _ => {
            errs.push(FieldError::new("keys", "required: an array of keys"));
            &[]
        }
    };
    let atomic = match obj.get("atomic") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errs.push(FieldError::new("atomic", "must be true or false"));
            false
        }
    };
    if !errs.is_empty() {
        return Err(AdminError::Validation(errs));
    }

    let now = now_millis();
    let mut errors = Vec::new();
    let mut keys = Vec::with_capacity(items.len());
    let mut index_of = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        match foreign::parse_import_item(item, Some(&state.format), now) {
            Ok(k) => {
                keys.push(k);
                index_of.push(index);
            }
            Err(message) => errors.push(ImportError { index, message }),
        }
    }
    if atomic && !errors.is_empty() {
        return Ok(Json(ImportResult {
            imported: 0,
            errors,
        }));
    }
    let hashes: Vec<KeyHash> = keys.iter().map(|k| k.key_hash).collect();
    let refused = state
        .store
        .import_keys(keys, state.max_keys_per_client, atomic)
        .await?;
    // A hash presented before the import may be cached as unknown.
    for h in &hashes {
        state.cache.invalidate(h);
    }
    // Their key.created events go out now, not at the next poll.
    if let Some(events) = &state.events {
        events.wake();
    }
    let imported = if atomic && !refused.is_empty() {
        0
    } else {
        hashes.len() - refused.len()
    };
    errors.extend(refused.into_iter().map(|(j, why)| ImportError {
        index: index_of[j],
        message: why.to_string(),
    }));
    errors.sort_by_key(|e| e.index);
    tracing::info!(
        target: "keygate::audit",
        action = "key.import",
        caller = ?caller,
        imported,
        refused = errors.len(),
        outcome = "ok",
    );
    Ok(Json(ImportResult { imported, errors }))
}
