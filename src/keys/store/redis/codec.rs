//! How keys, clients and script answers are encoded for Redis: the arguments the scripts read
//! and the replies they give.

use std::collections::HashMap;

use ::redis::Value;
use uuid::Uuid;

use crate::keys::allowance::{CreditTerms, Interval, Refill};
use crate::keys::store::{Conflict, Constraint, KeyPatch, Page, StoreError, StoreResult};
use crate::keys::{ApiKey, Client, KeyHash, KeyRecord, Millis, RateLimit, SetBy};

pub(super) fn corrupt(what: &str) -> StoreError {
    StoreError::Unavailable(format!("redis: malformed {what} record"))
}

pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// Script arguments after the prefix.
#[derive(Default)]
pub(super) struct Args(pub(super) Vec<String>);

impl Args {
    pub(super) fn push(&mut self, v: impl ToString) -> &mut Self {
        self.0.push(v.to_string());
        self
    }

    /// A key as the scripts read it (`read_key` in the Lua prelude): id, client_id,
    /// created_at, key_hash, previous_hash ('' = none), then a count and the mutable fields.
    pub(super) fn key(&mut self, k: &ApiKey) -> &mut Self {
        self.push(k.id)
            .push(&k.client_id)
            .push(k.created_at)
            .push(hex::encode(k.key_hash.0))
            .push(
                k.previous_hash
                    .map(|h| hex::encode(h.0))
                    .unwrap_or_default(),
            );
        let fields = key_fields(k);
        self.push(fields.len() * 2);
        for (name, value) in fields {
            self.push(name).push(value);
        }
        self
    }
}

pub(super) fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serializable")
}

/// The fields of a key besides id, client_id and created_at, as a new key is written; absent
/// optional values are left out.
pub(super) fn key_fields(k: &ApiKey) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("name", k.name.clone()),
        ("prefix", k.prefix.clone()),
        ("key_hash", hex::encode(k.key_hash.0)),
        ("permissions", json(&k.permissions)),
        ("enabled", flag(k.enabled)),
        ("updated_at", k.updated_at.to_string()),
    ];
    let mut opt = |name, v: Option<String>| {
        if let Some(v) = v {
            f.push((name, v));
        }
    };
    opt("previous_hash", k.previous_hash.map(|h| hex::encode(h.0)));
    opt(
        "previous_valid_until",
        k.previous_valid_until.map(|v| v.to_string()),
    );
    opt("expires_at", k.expires_at.map(|v| v.to_string()));
    opt("last_used_at", k.last_used_at.map(|v| v.to_string()));
    opt("rotated_at", k.rotated_at.map(|v| v.to_string()));
    opt("rate_limit", k.rate_limit.as_ref().map(json));
    opt("metadata", k.metadata.as_ref().map(json));
    opt("disabled_by", k.disabled_by.map(|b| b.as_str().to_owned()));
    opt(
        "expires_set_by",
        k.expires_set_by.map(|b| b.as_str().to_owned()),
    );
    opt(
        "rate_limit_set_by",
        k.rate_limit_set_by.map(|b| b.as_str().to_owned()),
    );
    opt(
        "tokens_valid_after",
        k.tokens_valid_after.map(|v| v.to_string()),
    );
    f
}

/// What a patch does to a key's hash: the fields it sets (encoded as [`key_fields`] encodes
/// them) and the fields it removes (attributes set to none).
pub(super) fn patch_fields(p: &KeyPatch) -> (Vec<(&'static str, String)>, Vec<&'static str>) {
    let mut set = Vec::new();
    let mut clear = Vec::new();
    if let Some(name) = &p.name {
        set.push(("name", name.clone()));
    }
    if let Some(enabled) = p.enabled {
        set.push(("enabled", flag(enabled)));
    }
    if let Some(permissions) = &p.permissions {
        set.push(("permissions", json(permissions)));
    }
    let mut opt = |name, v: Option<Option<String>>| match v {
        Some(Some(v)) => set.push((name, v)),
        Some(None) => clear.push(name),
        None => {}
    };
    opt("expires_at", p.expires_at.map(|v| v.map(|t| t.to_string())));
    opt("rate_limit", p.rate_limit.map(|v| v.as_ref().map(json)));
    opt(
        "metadata",
        p.metadata.as_ref().map(|v| v.as_ref().map(json)),
    );
    (set, clear)
}

fn flag(b: bool) -> String {
    if b { "1" } else { "0" }.to_owned()
}

pub(super) fn client_fields(c: &Client) -> Vec<String> {
    let mut f = vec![
        "client_id".into(),
        c.client_id.clone(),
        "license".into(),
        c.license.clone(),
        "created_at".into(),
        c.created_at.to_string(),
    ];
    if let Some(m) = &c.metadata {
        f.push("metadata".into());
        f.push(json(m));
    }
    f
}

/// A flat `HGETALL` answer as a map.
pub(super) fn fields(v: &Value) -> Option<HashMap<String, String>> {
    let Value::Array(items) = v else {
        return match v {
            Value::Map(m) => m
                .iter()
                .map(|(k, v)| Some((text(k)?, text(v)?)))
                .collect::<Option<HashMap<_, _>>>(),
            _ => None,
        };
    };
    items
        .chunks(2)
        .map(|pair| match pair {
            [k, v] => Some((text(k)?, text(v)?)),
            _ => None,
        })
        .collect()
}

pub(super) fn parse_hash(s: &str) -> Option<KeyHash> {
    let b = hex::decode(s).ok()?;
    Some(KeyHash(<[u8; 32]>::try_from(b.as_slice()).ok()?))
}

pub(super) fn key_from(v: &Value) -> StoreResult<ApiKey> {
    let f = fields(v).ok_or_else(|| corrupt("key"))?;
    let get = |name: &str| f.get(name).map(String::as_str);
    let req = |name: &str| get(name).ok_or_else(|| corrupt("key"));
    let int = |name: &str| -> StoreResult<Option<Millis>> {
        get(name)
            .map(|s| s.parse::<Millis>().map_err(|_| corrupt("key")))
            .transpose()
    };
    let setter = |name: &str| -> StoreResult<Option<SetBy>> {
        get(name)
            .map(|s| SetBy::parse(s).ok_or_else(|| corrupt("key")))
            .transpose()
    };
    let json_opt = |name: &str| -> StoreResult<Option<serde_json::Value>> {
        get(name)
            .map(|s| serde_json::from_str(s).map_err(|_| corrupt("key")))
            .transpose()
    };
    Ok(ApiKey {
        id: Uuid::parse_str(req("id")?).map_err(|_| corrupt("key"))?,
        client_id: req("client_id")?.to_owned(),
        name: req("name")?.to_owned(),
        prefix: req("prefix")?.to_owned(),
        key_hash: parse_hash(req("key_hash")?).ok_or_else(|| corrupt("key"))?,
        previous_hash: get("previous_hash")
            .map(|s| parse_hash(s).ok_or_else(|| corrupt("key")))
            .transpose()?,
        previous_valid_until: int("previous_valid_until")?,
        permissions: serde_json::from_str(req("permissions")?).map_err(|_| corrupt("key"))?,
        enabled: req("enabled")? == "1",
        created_at: int("created_at")?.ok_or_else(|| corrupt("key"))?,
        updated_at: int("updated_at")?.ok_or_else(|| corrupt("key"))?,
        expires_at: int("expires_at")?,
        last_used_at: int("last_used_at")?,
        rotated_at: int("rotated_at")?,
        rate_limit: get("rate_limit")
            .map(|s| serde_json::from_str::<RateLimit>(s).map_err(|_| corrupt("key")))
            .transpose()?,
        metadata: json_opt("metadata")?,
        disabled_by: setter("disabled_by")?,
        expires_set_by: setter("expires_set_by")?,
        rate_limit_set_by: setter("rate_limit_set_by")?,
        // A key written before token generations were kept: its tokens carry its rotated_at.
        tokens_valid_after: int("tokens_valid_after")?.or(int("rotated_at")?),
    }
    // A record written before setters were recorded: as the scripts read it.
    .with_setters_known())
}

pub(super) fn client_from(v: &Value) -> StoreResult<Client> {
    let f = fields(v).ok_or_else(|| corrupt("client"))?;
    let req = |name: &str| f.get(name).cloned().ok_or_else(|| corrupt("client"));
    Ok(Client {
        client_id: req("client_id")?,
        license: req("license")?,
        created_at: req("created_at")?.parse().map_err(|_| corrupt("client"))?,
        metadata: f
            .get("metadata")
            .map(|s| serde_json::from_str(s).map_err(|_| corrupt("client")))
            .transpose()?,
    })
}

pub(super) fn array(v: Value) -> StoreResult<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        _ => Err(corrupt("reply")),
    }
}

pub(super) fn int(v: &Value) -> StoreResult<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        _ => Err(corrupt("reply")),
    }
}

/// `{license, key fields}` or nil, as answered by the lookup scripts.
pub(super) fn record_from(v: Value) -> StoreResult<Option<KeyRecord>> {
    if v == Value::Nil {
        return Ok(None);
    }
    let a = array(v)?;
    let (license, key, credits) = match a.as_slice() {
        [license, key] => (license, key, None),
        [license, key, terms] => (license, key, Some(terms)),
        _ => return Err(corrupt("lookup")),
    };
    let credits = match credits {
        None => None,
        Some(terms) => {
            let t = array(terms.clone())?;
            let f = |i: usize| t.get(i).and_then(text).unwrap_or_default();
            let refill = match (f(0).parse::<u64>(), Interval::parse(&f(1))) {
                (Ok(amount), Some(interval)) => Some(Refill {
                    amount,
                    interval,
                    day: f(2).parse().ok(),
                }),
                _ => None,
            };
            Some(CreditTerms { refill })
        }
    };
    Ok(Some(KeyRecord {
        license: text(license).ok_or_else(|| corrupt("lookup"))?,
        key: key_from(key)?,
        credits,
    }))
}

/// `{total, item, item…}` as answered by the listing scripts.
pub(super) fn page_from<T>(
    v: Value,
    item: impl Fn(&Value) -> StoreResult<T>,
) -> StoreResult<Page<T>> {
    let a = array(v)?;
    let (total, items) = a.split_first().ok_or_else(|| corrupt("listing"))?;
    Ok(Page {
        total: int(total)?.max(0) as u64,
        items: items.iter().map(item).collect::<StoreResult<_>>()?,
    })
}

/// The constraint a refused patch named (`{-4, name}` from `patch_key.lua`).
pub(super) fn refused(name: &Value) -> StoreError {
    match text(name).as_deref() {
        Some("disabled") => StoreError::Refused(Constraint::Disabled),
        Some("expiry") => StoreError::Refused(Constraint::Expiry),
        Some("rate_limit") => StoreError::Refused(Constraint::RateLimit),
        _ => corrupt("refusal"),
    }
}

/// Maps a write script's status code.
pub(super) fn status(code: i64) -> StoreResult<bool> {
    match code {
        1 => Ok(true),
        0 => Ok(false),
        CODE_CLIENT_EXISTS => Err(StoreError::Conflict(Conflict::ClientExists)),
        CODE_IN_USE => Err(StoreError::Unavailable(
            "redis: the key id or key hash is already in use".into(),
        )),
        _ => Err(corrupt("status")),
    }
}

pub(super) const CODE_TOO_MANY: i64 = -1;
pub(super) const CODE_CLIENT_EXISTS: i64 = -2;
pub(super) const CODE_IN_USE: i64 = -3;
pub(super) const CODE_REFUSED: i64 = -4;

pub(super) fn page_range(page: u32, per_page: u32) -> (i64, i64) {
    let per = i64::from(per_page.max(1));
    let start = (i64::from(page.max(1)) - 1) * per;
    (start, start + per - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::now_millis;

    #[test]
    fn key_fields_round_trip() {
        let now = now_millis();
        let (k, _) = ApiKey::builder()
            .client("c")
            .name("n")
            .previous_hash(KeyHash::of("b"), now + 5)
            .permissions(&["A", "B"])
            .enabled(false)
            .created_at(now)
            .updated_at(now + 1)
            .expires_at(now + 2)
            .last_used_at(now + 3)
            .rotated_at(now + 4)
            .rate_limit(RateLimit {
                per_second: Some(3),
                per_minute: None,
                per_hour: None,
                burst: 4,
            })
            .metadata(serde_json::json!({"a": [1, 2]}))
            .build();
        let mut flat = vec![
            Value::BulkString(b"id".to_vec()),
            Value::BulkString(k.id.to_string().into_bytes()),
            Value::BulkString(b"client_id".to_vec()),
            Value::BulkString(b"c".to_vec()),
            Value::BulkString(b"created_at".to_vec()),
            Value::BulkString(now.to_string().into_bytes()),
        ];
        for (name, v) in key_fields(&k) {
            flat.push(Value::BulkString(name.as_bytes().to_vec()));
            flat.push(Value::BulkString(v.into_bytes()));
        }
        assert_eq!(key_from(&Value::Array(flat)).unwrap(), k);
    }

    #[test]
    fn a_key_stored_before_token_generations_has_its_rotated_at() {
        let (mut k, _) = ApiKey::builder().rotated_at(1234).build();
        k.tokens_valid_after = None;
        let mut flat = vec![
            Value::BulkString(b"id".to_vec()),
            Value::BulkString(k.id.to_string().into_bytes()),
            Value::BulkString(b"client_id".to_vec()),
            Value::BulkString(k.client_id.clone().into_bytes()),
            Value::BulkString(b"created_at".to_vec()),
            Value::BulkString(k.created_at.to_string().into_bytes()),
        ];
        for (name, v) in key_fields(&k) {
            flat.push(Value::BulkString(name.as_bytes().to_vec()));
            flat.push(Value::BulkString(v.into_bytes()));
        }
        let read = key_from(&Value::Array(flat)).unwrap();
        assert_eq!(read.tokens_valid_after, Some(1234));
    }

    /// A key's hash as `HGETALL` answers it, after `patch` was applied to the hash of `k`.
    fn patched(k: &ApiKey, patch: &KeyPatch) -> ApiKey {
        let mut f: Vec<(String, String)> = vec![
            ("id".into(), k.id.to_string()),
            ("client_id".into(), k.client_id.clone()),
            ("created_at".into(), k.created_at.to_string()),
        ];
        f.extend(key_fields(k).into_iter().map(|(n, v)| (n.to_owned(), v)));
        let (set, clear) = patch_fields(patch);
        for (name, v) in set {
            f.retain(|(n, _)| n != name);
            f.push((name.to_owned(), v));
        }
        f.retain(|(n, _)| !clear.contains(&n.as_str()));
        let flat = f
            .into_iter()
            .flat_map(|(n, v)| [n, v])
            .map(|s| Value::BulkString(s.into_bytes()))
            .collect();
        key_from(&Value::Array(flat)).unwrap()
    }

    #[test]
    fn patches_set_and_clear_only_what_they_name() {
        let now = now_millis();
        let k = ApiKey {
            id: Uuid::now_v7(),
            client_id: "c".into(),
            name: "n".into(),
            prefix: "kg_abcdefghi".into(),
            key_hash: KeyHash::of("a"),
            previous_hash: None,
            previous_valid_until: None,
            permissions: vec!["A".into()],
            enabled: true,
            created_at: now,
            updated_at: now,
            expires_at: Some(now + 2),
            last_used_at: None,
            rotated_at: None,
            rate_limit: None,
            metadata: Some(serde_json::json!({"a": 1})),
            disabled_by: None,
            expires_set_by: Some(SetBy::Client),
            rate_limit_set_by: None,
            tokens_valid_after: Some(now - 5),
        };
        assert_eq!(patched(&k, &KeyPatch::default()), k);
        let limit = RateLimit {
            per_second: None,
            per_minute: Some(60),
            per_hour: None,
            burst: 5,
        };
        let p = KeyPatch {
            name: Some("m".into()),
            enabled: Some(false),
            permissions: Some(vec![]),
            expires_at: Some(None),
            rate_limit: Some(Some(limit)),
            metadata: Some(None),
            by: SetBy::Admin,
            leak: None,
        };
        let want = ApiKey {
            name: "m".into(),
            enabled: false,
            permissions: vec![],
            expires_at: None,
            rate_limit: Some(limit),
            metadata: None,
            // What the script writes for an admin's patch (here: read back from the fields).
            disabled_by: Some(SetBy::Admin),
            expires_set_by: None,
            rate_limit_set_by: Some(SetBy::Admin),
            ..k.clone()
        };
        assert_eq!(patched(&k, &p), want);
        let only_enabled = KeyPatch {
            enabled: Some(false),
            ..KeyPatch::default()
        };
        assert_eq!(
            patch_fields(&only_enabled),
            (vec![("enabled", "0".into())], vec![])
        );
    }
}
