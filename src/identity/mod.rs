//! Signed identity: with `[identity] sign = true` every forwarded request and every
//! forward-auth allow carries `X-Keygate-Assertion`, a compact JWS (EdDSA by default, ES256 as
//! an alternative) that the upstream verifies against `GET /.well-known/jwks.json`, so it can
//! trust the caller's identity even when a request could reach it around the gateway.
//!
//! - Claims: `iss`, `sub` (client id), `aud` (the route's audience, default the upstream's
//!   origin), `key_id`, `permissions` (array), `license`, `iat`, `exp`, `jti`; `kid` in the
//!   header.
//! - Cost: an assertion is cached per (API key, route) and reused until a quarter of its
//!   lifetime is left (or the signing key changes), so requests in the common case copy a
//!   header value and sign nothing. A reused assertion keeps its `jti` and `iat`: `jti` names
//!   an assertion, not a request. The cache is bounded ([`CACHE_CAPACITY`]).
//! - Keys: generated here and kept in the store, so every instance on one store signs with the
//!   same set; the private key never leaves the process but to the store. Exported as public
//!   JWKs only. A rotation adds a key that is published at once and signs from
//!   `publish_ahead` on; the key it replaces stays published for `overlap` after that, then
//!   leaves the set (and the store, at the next rotation). Instances read the set from the store every
//!   [`Identity::poll_interval`] (at most 10 s, at most a quarter of `publish_ahead`), so a
//!   rotation made on one instance is published by all within that bound and long before the
//!   new key signs. Or `signing_key_file`: one key the operator manages (no rotation here).
//! - Fail closed: an instance that holds no signing key (the store was unreachable since it
//!   started) answers authenticated requests 503 instead of forwarding them unsigned.

pub mod material;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http::{HeaderName, HeaderValue};
use serde::Serialize;
use uuid::Uuid;

use crate::clock::Clock;
use crate::keys::store::signing::{AddKey, SigningKeyRecord};
use crate::keys::store::{Store, StoreError};
use crate::keys::{IdentityHeaders, Millis, Principal};
use material::{Alg, Material};

/// The path of the key set on both listeners.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

pub const X_KEYGATE_ASSERTION: HeaderName = HeaderName::from_static("x-keygate-assertion");

/// Most cached assertions (one per API key and route in use).
pub const CACHE_CAPACITY: u64 = 100_000;

/// The validated `[identity]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    pub sign: bool,
    pub algorithm: Alg,
    pub ttl: Duration,
    pub issuer: String,
    pub publish_ahead: Duration,
    pub overlap: Duration,
    pub signing_key_file: Option<PathBuf>,
}

/// The audience of a route: its `audience`, else its upstream's origin as configured
/// (`scheme://host:port`, the port as written).
pub fn audience(configured: Option<&str>, upstream: &Uri) -> String {
    match configured {
        Some(a) => a.to_owned(),
        None => format!(
            "{}://{}",
            upstream.scheme_str().unwrap_or("http"),
            upstream.authority().map_or("", |a| a.as_str())
        ),
    }
}

/// A key of the set and when it starts signing.
struct Loaded {
    material: Material,
    active_from: Millis,
}

/// The keys, ordered by `active_from` (then key id).
#[derive(Default)]
struct KeySet {
    keys: Vec<Arc<Loaded>>,
}

impl KeySet {
    /// The index of the key signing at `now`: the latest to have started, or the earliest of
    /// all when none has (a clock behind the store's).
    fn current(&self, now: Millis) -> Option<usize> {
        if self.keys.is_empty() {
            return None;
        }
        Some(
            self.keys
                .iter()
                .rposition(|k| k.active_from <= now)
                .unwrap_or(0),
        )
    }

    /// When the signing key changes next after `now`.
    fn next_switch(&self, now: Millis) -> Option<Millis> {
        self.keys.iter().map(|k| k.active_from).find(|&t| t > now)
    }

    /// The state of each key at `now`: (key, state, until when a previous key stays
    /// published). Keys past their overlap are left out.
    fn states(&self, now: Millis, overlap: Millis) -> Vec<(&Loaded, KeyState, Option<Millis>)> {
        let Some(cur) = self.current(now) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            if i < cur {
                let retires = self.keys[i + 1].active_from.saturating_add(overlap);
                if retires > now {
                    out.push((&**k, KeyState::Previous, Some(retires)));
                }
            } else if i == cur {
                out.push((&**k, KeyState::Current, None));
            } else {
                out.push((&**k, KeyState::Next, None));
            }
        }
        out
    }

    /// Key ids past their overlap at `now`.
    fn retired(&self, now: Millis, overlap: Millis) -> Vec<String> {
        let Some(cur) = self.current(now) else {
            return Vec::new();
        };
        (0..cur)
            .filter(|&i| self.keys[i + 1].active_from.saturating_add(overlap) <= now)
            .map(|i| self.keys[i].material.kid.clone())
            .collect()
    }

    fn same(&self, other: &KeySet) -> bool {
        self.keys.len() == other.keys.len()
            && self
                .keys
                .iter()
                .zip(&other.keys)
                .all(|(a, b)| a.material.kid == b.material.kid && a.active_from == b.active_from)
    }
}

/// A key's place in a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Signs now.
    Current,
    /// Published, signs from `active_from` on.
    Next,
    /// Replaced; still published until `retires_at` for assertions it signed.
    Previous,
}

/// A signing key as the admin API shows it: public facts only.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyInfo {
    /// The key id (`kid`), the RFC 7638 thumbprint of the public key.
    pub kid: String,
    /// `EdDSA` or `ES256`.
    #[schema(example = "EdDSA")]
    pub alg: &'static str,
    pub state: KeyState,
    /// When it signs (or signed) from (RFC 3339).
    #[schema(example = "2026-01-01T00:00:00Z")]
    pub active_from: String,
    /// For a previous key: when it leaves the key set (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retires_at: Option<String>,
}

/// Why a rotation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(
        "the signing key comes from identity.signing_key_file: rotate it by replacing the file and restarting"
    )]
    KeyFile,
    #[error(
        "a rotation is already under way: the next key ({kid}) signs from {at}; rotate again after that"
    )]
    Pending { kid: String, at: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One cached assertion.
struct Cached {
    value: HeaderValue,
    /// Signed again from then on.
    refresh_at: Millis,
    /// The identity it asserts (a principal rebuilt after a change of the key no longer
    /// matches, and gets a fresh assertion).
    identity: IdentityHeaders,
}

enum Source {
    Store(Arc<dyn Store>),
    File,
}

/// The signing service shared by both listeners.
pub struct Identity {
    cfg: IdentityConfig,
    source: Source,
    keys: RwLock<Arc<KeySet>>,
    cache: moka::sync::Cache<(Uuid, usize), Arc<Cached>>,
    /// By [`crate::route::Route::index`].
    audiences: Vec<String>,
    clock: Clock,
}

fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

fn utc(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    key_id: &'a str,
    permissions: Vec<&'a str>,
    license: &'a str,
    iat: i64,
    exp: i64,
    jti: String,
}

impl Identity {
    /// The service for `cfg` (None when `sign` is off); `audiences` by [`crate::route::Route`]
    /// index. Keys from the store are read by [`Identity::load`].
    pub fn new(
        cfg: IdentityConfig,
        audiences: Vec<String>,
        store: Arc<dyn Store>,
        clock: Clock,
    ) -> Result<Option<Arc<Identity>>, String> {
        if !cfg.sign {
            return Ok(None);
        }
        let (source, keys) = match &cfg.signing_key_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!(
                        "identity.signing_key_file: {} cannot be read: {e}",
                        path.display()
                    )
                })?;
                let material = Material::from_pem(&text)
                    .map_err(|why| format!("identity.signing_key_file: {why}"))?;
                let set = KeySet {
                    keys: vec![Arc::new(Loaded {
                        material,
                        active_from: 0,
                    })],
                };
                (Source::File, set)
            }
            None => (Source::Store(store), KeySet::default()),
        };
        let cache = moka::sync::Cache::builder()
            .max_capacity(CACHE_CAPACITY)
            .time_to_live(cfg.ttl)
            .build();
        Ok(Some(Arc::new(Identity {
            cfg,
            source,
            keys: RwLock::new(Arc::new(keys)),
            cache,
            audiences,
            clock,
        })))
    }

    fn set(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// How often the key set is read from the store.
    pub fn poll_interval(&self) -> Duration {
        (self.cfg.publish_ahead / 4).clamp(Duration::from_millis(250), Duration::from_secs(10))
    }

    /// The `Cache-Control` max-age of the key set: a verifier that caches it still learns of
    /// a new key before it signs.
    fn max_age_secs(&self) -> u64 {
        (self.cfg.publish_ahead.as_secs() / 2).min(300)
    }

    /// Reads the key set from the store (making the first key when there is none) and takes
    /// it when it changed. A no-op for a key file.
    pub async fn load(&self) -> Result<(), StoreError> {
        let Source::Store(store) = &self.source else {
            return Ok(());
        };
        let mut records = store.signing_keys().await?;
        if records.is_empty() {
            let m = Material::generate(self.cfg.algorithm);
            let now = self.clock.now_millis();
            let first = record(&m, now, now);
            records = store.add_signing_key(&first, AddKey::IfNone, &[]).await?;
            tracing::info!(kid = %m.kid, alg = m.alg.name(), "made the first signing key");
        }
        self.take(records);
        Ok(())
    }

    fn take(&self, records: Vec<SigningKeyRecord>) {
        let mut keys: Vec<Arc<Loaded>> = records
            .into_iter()
            .filter_map(|r| {
                let alg = Alg::parse(&r.algorithm)?;
                match Material::from_pkcs8(alg, &r.private_pkcs8) {
                    Ok(material) if material.kid == r.kid => Some(Arc::new(Loaded {
                        material,
                        active_from: r.active_from,
                    })),
                    _ => {
                        tracing::error!(kid = %r.kid, "a stored signing key does not decode; it is left out");
                        None
                    }
                }
            })
            .collect();
        keys.sort_by(|a, b| {
            (a.active_from, &a.material.kid).cmp(&(b.active_from, &b.material.kid))
        });
        let set = KeySet { keys };
        let mut guard = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if !guard.same(&set) {
            *guard = Arc::new(set);
            drop(guard);
            self.cache.invalidate_all();
            if let Some(alg) = self.current_alg()
                && alg != self.cfg.algorithm
            {
                tracing::warn!(
                    signing = alg.name(),
                    configured = self.cfg.algorithm.name(),
                    "the current signing key is of another algorithm than identity.algorithm; POST /v1/identity/rotate makes a key of the configured one"
                );
            }
        }
    }

    fn current_alg(&self) -> Option<Alg> {
        let set = self.set();
        let i = set.current(self.clock.now_millis())?;
        Some(set.keys[i].material.alg)
    }

    /// Reads the key set every [`Identity::poll_interval`] until the process ends.
    pub fn spawn_refresh(self: &Arc<Self>) {
        if !matches!(self.source, Source::Store(_)) {
            return;
        }
        let this = Arc::downgrade(self);
        let every = self.poll_interval();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(every).await;
                let Some(id) = this.upgrade() else { return };
                match id.load().await {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cannot read the signing keys; retrying");
                    }
                    Err(_) => {}
                }
            }
        });
    }

    /// The assertion for `principal` on `route`: the cached one while it has more than a
    /// quarter of its lifetime left, else a new one. `None`: no signing key is loaded.
    pub fn assertion(&self, route: usize, principal: &Principal) -> Option<HeaderValue> {
        let now = self.clock.now_millis();
        let slot = (principal.key_id, route);
        if let Some(c) = self.cache.get(&slot)
            && now < c.refresh_at
            && same_identity(&c.identity, &principal.headers)
        {
            return Some(c.value.clone());
        }
        let fresh = Arc::new(self.sign(route, principal, now)?);
        let value = fresh.value.clone();
        self.cache.insert(slot, fresh);
        Some(value)
    }

    #[cold]
    fn sign(&self, route: usize, principal: &Principal, now: Millis) -> Option<Cached> {
        let set = self.set();
        let key = &set.keys[set.current(now)?];
        let ttl = millis(self.cfg.ttl);
        let iat = now.div_euclid(1000);
        let exp = iat + ttl / 1000;
        let id = &principal.headers;
        // As given: JSON carries any text a header cannot (a plan named `básico`).
        let text = |i: usize| id.text(i);
        let permissions = text(2);
        let claims = Claims {
            iss: &self.cfg.issuer,
            sub: text(0),
            aud: self.audiences.get(route).map_or("", String::as_str),
            key_id: text(1),
            permissions: permissions.split(',').filter(|p| !p.is_empty()).collect(),
            license: text(3),
            iat,
            exp,
            jti: Uuid::now_v7().to_string(),
        };
        let mut header = jsonwebtoken::Header::new(key.material.alg.jwt());
        header.kid = Some(key.material.kid.clone());
        let token = match jsonwebtoken::encode(&header, &claims, &key.material.encoding) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(kid = %key.material.kid, error = %e, "signing an assertion failed");
                return None;
            }
        };
        let mut refresh_at = exp * 1000 - ttl / 4;
        if let Some(switch) = set.next_switch(now) {
            refresh_at = refresh_at.min(switch);
        }
        Some(Cached {
            value: HeaderValue::from_maybe_shared(Bytes::from(token)).ok()?,
            refresh_at,
            identity: id.clone(),
        })
    }

    /// The public key set (RFC 7517) as JSON: the current key, the next one during a
    /// rotation, and previous ones until their overlap ends.
    pub fn jwks(&self) -> Bytes {
        let set = self.set();
        let keys: Vec<&serde_json::Value> = set
            .states(self.clock.now_millis(), millis(self.cfg.overlap))
            .into_iter()
            .map(|(k, _, _)| &k.material.jwk)
            .collect();
        Bytes::from(serde_json::to_vec(&serde_json::json!({ "keys": keys })).expect("JSON"))
    }

    /// The answer of `GET /.well-known/jwks.json` on either listener (and of HEAD: the
    /// engine leaves the body out and keeps its length, RFC 9110 §8.6).
    pub fn jwks_response(&self) -> http::Response<Bytes> {
        let mut res = http::Response::new(self.jwks());
        let h = res.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={}", self.max_age_secs())) {
            h.insert(http::header::CACHE_CONTROL, v);
        }
        res
    }

    /// The keys of the set and their states (no key material).
    pub fn key_infos(&self) -> Vec<KeyInfo> {
        let set = self.set();
        set.states(self.clock.now_millis(), millis(self.cfg.overlap))
            .into_iter()
            .map(|(k, state, retires)| KeyInfo {
                kid: k.material.kid.clone(),
                alg: k.material.alg.name(),
                state,
                active_from: utc(k.active_from),
                retires_at: retires.map(utc),
            })
            .collect()
    }

    /// Starts a rotation: a new key of the configured algorithm, published at once, signing
    /// from `publish_ahead` on; keys past their overlap leave the store in the same write.
    pub async fn rotate(&self) -> Result<Vec<KeyInfo>, RotateError> {
        let Source::Store(store) = &self.source else {
            return Err(RotateError::KeyFile);
        };
        // The set as the store has it now (another instance may have rotated).
        self.load().await?;
        let now = self.clock.now_millis();
        let set = self.set();
        if let Some(next) = set.keys.iter().find(|k| k.active_from > now) {
            return Err(RotateError::Pending {
                kid: next.material.kid.clone(),
                at: utc(next.active_from),
            });
        }
        let m = Material::generate(self.cfg.algorithm);
        let active_from = now.saturating_add(millis(self.cfg.publish_ahead));
        let prune = set.retired(now, millis(self.cfg.overlap));
        let records = store
            .add_signing_key(&record(&m, active_from, now), AddKey::Always, &prune)
            .await?;
        tracing::info!(target: "keygate::audit", kid = %m.kid, alg = m.alg.name(), active_from = %utc(active_from), "signing key rotation started");
        self.take(records);
        Ok(self.key_infos())
    }
}

fn record(m: &Material, active_from: Millis, now: Millis) -> SigningKeyRecord {
    SigningKeyRecord {
        kid: m.kid.clone(),
        algorithm: m.alg.name().into(),
        private_pkcs8: m.pkcs8().to_vec(),
        active_from,
        created_at: now,
    }
}

fn same_identity(a: &IdentityHeaders, b: &IdentityHeaders) -> bool {
    (0..4).all(|i| a.given(i) == b.given(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(alg: Alg, active_from: Millis) -> Arc<Loaded> {
        Arc::new(Loaded {
            material: Material::generate(alg),
            active_from,
        })
    }

    #[test]
    fn a_rotation_publishes_ahead_and_keeps_the_old_key_for_its_overlap() {
        let (old, new) = (loaded(Alg::EdDSA, 0), loaded(Alg::EdDSA, 1_000));
        let set = KeySet {
            keys: vec![old.clone(), new.clone()],
        };
        let overlap = 5_000;
        let states = |now| {
            set.states(now, overlap)
                .into_iter()
                .map(|(k, s, _)| (k.material.kid.clone(), s))
                .collect::<Vec<_>>()
        };
        let (o, n) = (old.material.kid.clone(), new.material.kid.clone());
        // Before the switch: the old key signs, the new one is published.
        assert_eq!(set.current(999), Some(0));
        assert_eq!(set.next_switch(999), Some(1_000));
        assert_eq!(
            states(999),
            [(o.clone(), KeyState::Current), (n.clone(), KeyState::Next)]
        );
        // After it: the new one signs, the old one stays for the overlap.
        assert_eq!(set.current(1_000), Some(1));
        assert_eq!(set.next_switch(1_000), None);
        assert_eq!(
            states(5_999),
            [
                (o.clone(), KeyState::Previous),
                (n.clone(), KeyState::Current)
            ]
        );
        assert!(set.retired(5_999, overlap).is_empty());
        // Then it is gone.
        assert_eq!(states(6_000), [(n.clone(), KeyState::Current)]);
        assert_eq!(set.retired(6_000, overlap), [o]);
        // A clock behind every key: the earliest signs.
        assert_eq!(set.current(-5), Some(0));
        assert_eq!(KeySet::default().current(0), None);
    }
}
