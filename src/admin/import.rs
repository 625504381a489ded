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
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{AdminError, ErrorResponses, FieldError, JsonBody};
use super::keys::{check_name, check_permissions};
use super::{AdminState, Caller};
use crate::keys::{
    ApiKey, KeyFormat, KeyHash, Millis, SetBy, foreign, now_millis, valid_client_id,
};

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
            errs.push(FieldError::new(shown(field), "unknown field"));
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
        match parse_item(item, Some(&state.format), now) {
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

/// A field name as it may be shown back: at most 64 characters.
fn shown(field: &str) -> String {
    field.chars().take(64).collect()
}

fn string<'a>(o: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, String> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{field}: must be a string")),
    }
}

/// One import item → the key to store, or why not (never quoting a value).
/// One import item as a key to write, or why it is refused. `format`: the gateway's own key
/// format, whose keys must carry a valid checksum; `None` (the CLI's local check, which does not
/// know the server's prefix) leaves that one check to the server.
pub(crate) fn parse_item(
    item: &Value,
    format: Option<&KeyFormat>,
    now: Millis,
) -> Result<ApiKey, String> {
    let Value::Object(o) = item else {
        return Err("must be a JSON object".into());
    };
    const FIELDS: [&str; 7] = [
        "client_id",
        "name",
        "key",
        "sha256",
        "permissions",
        "roles",
        "expires_at",
    ];
    if let Some(f) = o.keys().find(|f| !FIELDS.contains(&f.as_str())) {
        return Err(format!("unknown field `{}`", shown(f)));
    }
    let client_id = string(o, "client_id")?.ok_or("client_id: required")?;
    if !valid_client_id(client_id) {
        return Err("client_id: must be 1–64 characters of [A-Za-z0-9._-]".into());
    }
    let name = string(o, "name")?.ok_or("name: required")?;
    let mut errs = Vec::new();
    check_name(name, &mut errs);
    let (key_hash, prefix) = match (string(o, "key")?, string(o, "sha256")?) {
        (Some(key), None) => {
            if let Some(format) = format.filter(|f| key.starts_with(f.prefix())) {
                if !format.check(key) {
                    return Err(
                        "key: starts with keygate's key prefix but is not a valid keygate key \
                         (such a key could never authenticate)"
                            .into(),
                    );
                }
                (
                    KeyHash::of(key),
                    key[..crate::keys::DISPLAY_PREFIX_LEN].to_owned(),
                )
            } else if foreign::shape(key) {
                (KeyHash::of(key), foreign::display_prefix(key))
            } else {
                return Err(
                    "key: must be 16–256 visible ASCII characters (no spaces or control \
                     characters)"
                        .into(),
                );
            }
        }
        (None, Some(hex_hash)) => {
            let mut h = [0u8; 32];
            if hex_hash.len() != 64 || hex::decode_to_slice(hex_hash, &mut h).is_err() {
                return Err("sha256: must be 64 hexadecimal characters".into());
            }
            (KeyHash(h), String::new())
        }
        (Some(_), Some(_)) => return Err("give either key or sha256, not both".into()),
        (None, None) => return Err("key or sha256: required".into()),
    };
    if o.contains_key("permissions") && o.contains_key("roles") {
        return Err("give either permissions or roles, not both".into());
    }
    let permissions = match o.get("permissions").or_else(|| o.get("roles")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| p.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or("permissions: must be an array of strings")?,
        Some(_) => return Err("permissions: must be an array of strings".into()),
    };
    check_permissions(&permissions, &mut errs);
    let expires_at = match string(o, "expires_at")? {
        None => None,
        Some(t) => match DateTime::parse_from_rfc3339(t) {
            Ok(t) if t.with_timezone(&Utc).timestamp_millis() > now => Some(t.timestamp_millis()),
            Ok(_) => return Err("expires_at: must be in the future".into()),
            Err(_) => return Err("expires_at: must be an RFC 3339 time".into()),
        },
    };
    if let Some(e) = errs.first() {
        return Err(format!("{}: {}", e.field, e.message));
    }
    let mut key = ApiKey {
        id: Uuid::now_v7(),
        client_id: client_id.to_owned(),
        name: name.to_owned(),
        prefix,
        key_hash,
        previous_hash: None,
        previous_valid_until: None,
        permissions,
        enabled: true,
        created_at: now,
        updated_at: now,
        expires_at,
        last_used_at: None,
        rotated_at: None,
        rate_limit: None,
        metadata: None,
        disabled_by: None,
        expires_set_by: None,
        rate_limit_set_by: None,
        tokens_valid_after: None,
    };
    key.set_by(SetBy::Admin);
    Ok(key)
}
