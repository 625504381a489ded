//! Keys issued by another system and imported (Kong key-auth, Tyk custom keys, Unkey hash
//! exports…): any string of 16–256 visible ASCII characters. They are stored, like keygate's
//! own keys, only as SHA-256.
//!
//! A string that starts with keygate's configured prefix claims to be a keygate key: it must
//! pass the shape and checksum check, so the fast refusal of mistyped or forged keygate keys
//! (no cache, no store) is unchanged. Every other string of the foreign shape goes through the
//! cache, the negative cache and, on a miss, the store: one store lookup per distinct string
//! per negative TTL, bounded further by the failed-authentication limit per client address.
//! (The checksum was never a defence against an attacker, who can compute a CRC32; it spares
//! the store mistyped keys. Random strings of the foreign shape cost what well-formed unknown
//! keygate keys always cost.)

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::keys::{ApiKey, CLIENT_ID_RULE, KeyFormat, KeyHash, Millis, SetBy, valid_client_id};

/// Shortest imported plaintext key.
pub const MIN_FOREIGN_KEY_LEN: usize = 16;
/// Longest imported plaintext key (and longest API key a credential may carry).
pub const MAX_FOREIGN_KEY_LEN: usize = 256;

/// True when `key` has the shape of an imported key: 16–256 visible ASCII characters
/// (`!`–`~`, no spaces or control characters). Pure, no allocation.
pub fn shape(key: &str) -> bool {
    (MIN_FOREIGN_KEY_LEN..=MAX_FOREIGN_KEY_LEN).contains(&key.len())
        && key.bytes().all(|b| b.is_ascii_graphic())
}

/// The part of an imported key shown and logged as its `prefix`: the first quarter of it, at
/// most 12 characters, so a short foreign key is never mostly revealed.
pub fn display_prefix(key: &str) -> String {
    let n = (key.len() / 4).min(crate::keys::DISPLAY_PREFIX_LEN);
    key[..n].to_owned()
}

/// A field name of a request as it may be shown back in an error: a short lowercase name (a
/// misspelt `permisions`) as it is; anything else — a name as long as a hash, or with the mixed
/// case and digits of a key (an export keyed by its keys) — is not repeated.
pub fn shown(field: &str) -> String {
    let plain = (1..=24).contains(&field.len())
        && field
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
        && field.bytes().filter(u8::is_ascii_digit).count() <= 2;
    if plain {
        field.to_owned()
    } else {
        "(a name not repeated)".to_owned()
    }
}

fn string<'a>(o: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, String> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{field}: must be a string")),
    }
}

/// One import item (`POST /v1/api-keys/import`, a line of `keygate key import`) as the key to
/// store, or why it is refused, never quoting a value. `format`: the gateway's own key
/// format, whose keys must carry a valid checksum; `None` (the CLI's local check, which does not
/// know the server's prefix) leaves that one check to the server.
pub fn parse_import_item(
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
        return Err(format!("client_id: {CLIENT_ID_RULE}"));
    }
    let name = string(o, "name")?.ok_or("name: required")?;
    if let Some(why) = crate::keys::name_problem(name) {
        return Err(format!("name: {why}"));
    }
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
            } else if shape(key) {
                (KeyHash::of(key), display_prefix(key))
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
    if let Some(why) = crate::keys::permissions_problem(&permissions) {
        return Err(format!("permissions: {why}"));
    }
    let expires_at = match string(o, "expires_at")? {
        None => None,
        Some(t) => match DateTime::parse_from_rfc3339(t) {
            Ok(t) if t.with_timezone(&Utc).timestamp_millis() > now => Some(t.timestamp_millis()),
            Ok(_) => return Err("expires_at: must be in the future".into()),
            Err(_) => return Err("expires_at: must be an RFC 3339 time".into()),
        },
    };
    let mut key = ApiKey::fresh(
        client_id,
        name.to_owned(),
        prefix,
        key_hash,
        permissions,
        now,
    );
    key.expires_at = expires_at;
    key.set_by(SetBy::Admin);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_is_16_to_256_visible_ascii_characters() {
        assert!(shape(&"a".repeat(16)));
        assert!(shape(&"~".repeat(256)));
        assert!(!shape(&"a".repeat(15)));
        assert!(!shape(&"a".repeat(257)));
        assert!(!shape("aaaaaaaa aaaaaaaa"));
        assert!(!shape("aaaaaaaa\taaaaaaaa"));
        assert!(!shape("aaaaaaaaaaaaaaaaé"));
    }

    #[test]
    fn the_display_prefix_is_at_most_a_quarter_of_the_key() {
        assert_eq!(display_prefix("0123456789abcdef"), "0123");
        assert_eq!(display_prefix(&"x".repeat(200)), "x".repeat(12));
    }
}
