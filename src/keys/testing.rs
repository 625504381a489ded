//! Test fixtures: keys and clients as a store keeps them. Used by the unit tests, the
//! integration tests, the benches and the examples (each a crate of its own, hence public);
//! not part of keygate's API.
//!
//! ```
//! use keygate::keys::ApiKey;
//!
//! let (key, new) = ApiKey::builder()
//!     .client("acme")
//!     .permissions(&["READ"])
//!     .expires_at(keygate::keys::now_millis() + 60_000)
//!     .build();
//! assert_eq!(key.key_hash, new.hash);
//! assert!(new.plaintext.expose().starts_with(&key.prefix));
//! ```

use uuid::Uuid;

use super::{ApiKey, Client, KeyFormat, KeyHash, KeyRecord, Millis, NewKey, RateLimit, now_millis};

/// The client of a [`KeyBuilder`] key unless [`KeyBuilder::client`] names another.
pub const CLIENT: &str = "acme";
/// The key prefix of every built key (the config's default).
pub const KEY_PREFIX: &str = "kg_";

impl ApiKey {
    /// A freshly generated key, described field by field; see [`KeyBuilder`].
    #[doc(hidden)]
    pub fn builder() -> KeyBuilder {
        KeyBuilder::new()
    }
}

/// Builds a key with a freshly generated plaintext (prefix [`KEY_PREFIX`]) and the record a
/// store keeps for it. Unless set: client [`CLIENT`], name `"test key"`, no permissions,
/// enabled, created and updated now, no expiry, never used, never rotated, no rate-limit
/// override, no metadata. Its constraints (disabled, expiry, rate limit) are an admin's; its
/// token generation is its `rotated_at`.
#[derive(Clone, Debug)]
pub struct KeyBuilder {
    id: Uuid,
    client_id: String,
    name: String,
    permissions: Vec<String>,
    enabled: bool,
    created_at: Millis,
    updated_at: Millis,
    expires_at: Option<Millis>,
    last_used_at: Option<Millis>,
    rotated_at: Option<Millis>,
    previous: Option<(KeyHash, Millis)>,
    rate_limit: Option<RateLimit>,
    metadata: Option<serde_json::Value>,
}

impl Default for KeyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyBuilder {
    pub fn new() -> Self {
        let now = now_millis();
        KeyBuilder {
            id: Uuid::now_v7(),
            client_id: CLIENT.into(),
            name: "test key".into(),
            permissions: Vec::new(),
            enabled: true,
            created_at: now,
            updated_at: now,
            expires_at: None,
            last_used_at: None,
            rotated_at: None,
            previous: None,
            rate_limit: None,
            metadata: None,
        }
    }

    pub fn client(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn permissions(mut self, permissions: &[&str]) -> Self {
        self.permissions = permissions.iter().map(|p| (*p).to_owned()).collect();
        self
    }

    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// Sets `created_at`, and `updated_at` to the same time.
    pub fn created_at(mut self, at: Millis) -> Self {
        self.created_at = at;
        self.updated_at = at;
        self
    }

    pub fn updated_at(mut self, at: Millis) -> Self {
        self.updated_at = at;
        self
    }

    pub fn expires_at(mut self, at: Millis) -> Self {
        self.expires_at = Some(at);
        self
    }

    pub fn last_used_at(mut self, at: Millis) -> Self {
        self.last_used_at = Some(at);
        self
    }

    pub fn rotated_at(mut self, at: Millis) -> Self {
        self.rotated_at = Some(at);
        self
    }

    /// The hash the key had before a rotation, accepted until `valid_until`.
    pub fn previous_hash(mut self, hash: KeyHash, valid_until: Millis) -> Self {
        self.previous = Some((hash, valid_until));
        self
    }

    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// The key as stored, and its plaintext (with its hash and display prefix).
    pub fn build(self) -> (ApiKey, NewKey) {
        let new = KeyFormat::new(KEY_PREFIX).generate();
        let key = ApiKey {
            id: self.id,
            client_id: self.client_id,
            name: self.name,
            prefix: new.display_prefix.clone(),
            key_hash: new.hash,
            previous_hash: self.previous.map(|(h, _)| h),
            previous_valid_until: self.previous.map(|(_, until)| until),
            permissions: self.permissions,
            enabled: self.enabled,
            created_at: self.created_at,
            updated_at: self.updated_at,
            expires_at: self.expires_at,
            last_used_at: self.last_used_at,
            rotated_at: self.rotated_at,
            rate_limit: self.rate_limit,
            metadata: self.metadata,
            disabled_by: None,
            expires_set_by: None,
            rate_limit_set_by: None,
            tokens_valid_after: self.rotated_at,
        }
        .with_setters_known();
        (key, new)
    }

    /// The key as a lookup by hash returns it, its client on plan `license`.
    pub fn record(self, license: &str) -> (KeyRecord, NewKey) {
        let (key, new) = self.build();
        let record = KeyRecord {
            key,
            license: license.into(),
            credits: None,
        };
        (record, new)
    }
}

/// `n` a second with a burst of `burst`.
pub fn per_second(n: u32, burst: u32) -> crate::keys::RateLimit {
    crate::keys::RateLimit {
        per_second: Some(n),
        per_minute: None,
        per_hour: None,
        burst,
    }
}

/// A client `client_id` on plan `pro`, created now, without metadata.
pub fn client(client_id: &str) -> Client {
    Client {
        client_id: client_id.into(),
        license: "pro".into(),
        created_at: now_millis(),
        metadata: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_key_is_its_plaintext_as_stored() {
        let (key, new) = ApiKey::builder().build();
        assert!(KeyFormat::new(KEY_PREFIX).check(new.plaintext.expose()));
        assert_eq!(key.key_hash, KeyHash::of(new.plaintext.expose()));
        assert_eq!(key.prefix, new.display_prefix);
        assert_eq!(key.client_id, CLIENT);
        assert!(key.enabled && key.permissions.is_empty());
        assert_eq!(key.created_at, key.updated_at);
        assert_eq!(
            (key.expires_at, key.last_used_at, key.rotated_at),
            (None, None, None)
        );
        assert_eq!((key.previous_hash, key.previous_valid_until), (None, None));
        assert_eq!((key.rate_limit, key.metadata), (None, None));
        let (other, _) = ApiKey::builder().build();
        assert_ne!(key.id, other.id);
        assert_ne!(key.key_hash, other.key_hash);
    }

    #[test]
    fn every_field_can_be_set() {
        let limit = RateLimit {
            per_second: None,
            per_minute: Some(6),
            per_hour: None,
            burst: 2,
        };
        let old = KeyHash::of("old");
        let (r, _) = ApiKey::builder()
            .client("c")
            .name("n")
            .permissions(&["A", "B"])
            .enabled(false)
            .created_at(10)
            .updated_at(11)
            .expires_at(12)
            .last_used_at(13)
            .rotated_at(14)
            .previous_hash(old, 15)
            .rate_limit(limit)
            .metadata(serde_json::json!({"a": 1}))
            .record("free");
        let k = &r.key;
        assert_eq!(r.license, "free");
        assert_eq!((k.client_id.as_str(), k.name.as_str()), ("c", "n"));
        assert_eq!(k.permissions, ["A", "B"]);
        assert!(!k.enabled);
        assert_eq!(
            (k.created_at, k.updated_at, k.expires_at, k.last_used_at),
            (10, 11, Some(12), Some(13))
        );
        assert_eq!(
            (k.rotated_at, k.previous_hash, k.previous_valid_until),
            (Some(14), Some(old), Some(15))
        );
        assert_eq!(k.rate_limit, Some(limit));
        assert_eq!(k.metadata, Some(serde_json::json!({"a": 1})));
    }
}
