//! Domain types shared by the proxy and the admin plane, and the API key format.
//!
//! A key string is `<prefix><43 base62 chars from a CSPRNG><6 base62 chars of CRC32>`. The
//! 43-character body carries 43 · log2(62) ≈ 256 bits. The checksum covers everything before it,
//! so a mistyped or truncated key is refused by [`KeyFormat::check`] before any cache or store
//! work is done. At rest only [`KeyHash`] (SHA-256 of the whole string) is kept.

pub mod allowance;
pub mod bucket;
pub mod cache;
pub mod cluster;
pub mod foreign;
pub mod outbox;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod threshold;
pub mod usage;

use std::fmt;
use std::sync::Arc;

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// Number of random base62 characters in a key body (≥ 256 bits).
pub const KEY_BODY_LEN: usize = 43;
/// Number of base62 characters of the CRC32 checksum (62^6 > 2^32).
pub const KEY_CHECKSUM_LEN: usize = 6;
/// How many leading characters of a key are shown and logged as its `prefix`.
pub const DISPLAY_PREFIX_LEN: usize = 12;
/// Longest configurable key prefix; keeps every key within [`MAX_KEY_LEN`].
pub const MAX_PREFIX_LEN: usize = 15;
/// Longest key string the format can produce.
pub const MAX_KEY_LEN: usize = MAX_PREFIX_LEN + KEY_BODY_LEN + KEY_CHECKSUM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn base62_value(c: u8) -> Option<u32> {
    match c {
        b'0'..=b'9' => Some(u32::from(c - b'0')),
        b'A'..=b'Z' => Some(u32::from(c - b'A') + 10),
        b'a'..=b'z' => Some(u32::from(c - b'a') + 36),
        _ => None,
    }
}

fn checksum_chars(data: &[u8]) -> [u8; KEY_CHECKSUM_LEN] {
    let mut n = u64::from(crc32fast::hash(data));
    let mut out = [b'0'; KEY_CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// The configured key format: generates keys and checks their shape and checksum.
#[derive(Clone, Debug)]
pub struct KeyFormat {
    prefix: String,
}

/// A freshly generated key: the plaintext (shown once) and what is stored.
pub struct NewKey {
    pub plaintext: Secret,
    pub hash: KeyHash,
    pub display_prefix: String,
}

impl KeyFormat {
    /// `prefix` must be 1..=15 characters of `[A-Za-z0-9_]`; the config layer validates it.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn key_len(&self) -> usize {
        self.prefix.len() + KEY_BODY_LEN + KEY_CHECKSUM_LEN
    }

    /// Generates a key from the operating system's CSPRNG.
    pub fn generate(&self) -> NewKey {
        // ThreadRng is a ChaCha-based CSPRNG seeded and periodically reseeded from the OS.
        let mut rng = rand::rng();
        let mut s = String::with_capacity(self.key_len());
        s.push_str(&self.prefix);
        for _ in 0..KEY_BODY_LEN {
            // Rejection sampling inside `random_range` keeps the distribution uniform.
            s.push(BASE62[rng.random_range(0..62)] as char);
        }
        let sum = checksum_chars(s.as_bytes());
        s.push_str(std::str::from_utf8(&sum).expect("base62 is ascii"));
        let hash = KeyHash::of(&s);
        let display_prefix = s[..DISPLAY_PREFIX_LEN].to_owned();
        NewKey {
            plaintext: Secret(s),
            hash,
            display_prefix,
        }
    }

    /// True when `key` has this format's prefix and length (the first half of
    /// [`KeyFormat::check`]).
    pub fn shape(&self, key: &str) -> bool {
        key.len() == self.key_len() && key.as_bytes().starts_with(self.prefix.as_bytes())
    }

    /// True when `key` has this format's prefix, length, alphabet and a matching checksum.
    /// Pure: no allocation, no cache or store access.
    pub fn check(&self, key: &str) -> bool {
        if !self.shape(key) {
            return false;
        }
        let b = key.as_bytes();
        let (head, sum) = b.split_at(b.len() - KEY_CHECKSUM_LEN);
        if !head[self.prefix.len()..]
            .iter()
            .all(|&c| base62_value(c).is_some())
        {
            return false;
        }
        let mut n: u64 = 0;
        for &c in sum {
            match base62_value(c) {
                Some(v) => n = n * 62 + u64::from(v),
                None => return false,
            }
        }
        n == u64::from(crc32fast::hash(head))
    }
}

/// A plaintext secret (API key, admin key, JWT). `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// SHA-256 of a key string: the only form in which keys are stored or cached.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Constant-time equality, for every comparison of secret-derived bytes.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(***)")
    }
}

/// A rate limit: `burst` and exactly one of `per_second`, `per_minute`, `per_hour` (a rate is a
/// number or absent, never null).
// Never null: that is what lets the schema's `maxProperties: 2`, with `burst` required, say
// "exactly one rate".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 2, max_properties = 2, examples(json!({"per_second": 50, "burst": 100})))]
pub struct RateLimit {
    /// Requests per second, at least 1.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = u32, minimum = 1, maximum = 4294967295_u64)]
    pub per_second: Option<u32>,
    /// Requests per minute, at least 1.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = u32, minimum = 1, maximum = 4294967295_u64)]
    pub per_minute: Option<u32>,
    /// Requests per hour, at least 1.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = u32, minimum = 1, maximum = 4294967295_u64)]
    pub per_hour: Option<u32>,
    /// Requests allowed at once, at least 1.
    #[schema(minimum = 1, maximum = 4294967295_u64)]
    pub burst: u32,
}

/// The longest a rate limit's burst may take to come back (100 years of 365.25 days).
const MAX_REFILL_SECS: u128 = 3_155_760_000;

/// A field that is a value when present (absent is `None`; null is refused).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    u32::deserialize(d).map(Some)
}

impl RateLimit {
    /// Describes what is wrong with this limit, if anything.
    pub fn problem(&self) -> Option<&'static str> {
        let set = [self.per_second, self.per_minute, self.per_hour]
            .iter()
            .filter(|r| r.is_some())
            .count();
        if set != 1 {
            return Some("exactly one of per_second, per_minute, per_hour must be set");
        }
        if [self.per_second, self.per_minute, self.per_hour]
            .iter()
            .flatten()
            .any(|&r| r == 0)
        {
            return Some("the rate must be at least 1");
        }
        if self.burst == 0 {
            return Some("burst must be at least 1");
        }
        None
    }

    /// [`RateLimit::problem`], and for a limit of the configuration file also a burst that
    /// would take more than a century to come back at its rate (the route and failed-auth
    /// limiters count that time in nanoseconds). A key's bucket takes any limit the admin API
    /// does (the API states every rule in its schema): it counts such a burst up to what a
    /// century gives back.
    pub fn config_problem(&self) -> Option<&'static str> {
        if let Some(why) = self.problem() {
            return Some(why);
        }
        let (n, secs) = self.rate();
        if u128::from(self.burst - 1) * u128::from(secs) > u128::from(n) * MAX_REFILL_SECS {
            return Some("the burst would take more than 100 years to come back at this rate");
        }
        None
    }

    /// The rate as (count, period in seconds).
    pub fn rate(&self) -> (u32, u64) {
        match (self.per_second, self.per_minute, self.per_hour) {
            (Some(n), _, _) => (n, 1),
            (_, Some(n), _) => (n, 60),
            (_, _, Some(n)) => (n, 3600),
            _ => (1, 1),
        }
    }
}

/// Who set a constraint on a key (disabled it, gave it an expiry or a rate limit). A client
/// (self-service) may tighten a constraint an admin set — disable the key, shorten the expiry —
/// but never loosen it; an admin may do anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SetBy {
    /// An admin key (or a Kixote call).
    #[default]
    Admin,
    /// The client itself, with a key or token holding the self-service permission.
    Client,
}

impl SetBy {
    /// `"admin"` or `"client"`, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            SetBy::Admin => "admin",
            SetBy::Client => "client",
        }
    }

    pub fn parse(s: &str) -> Option<SetBy> {
        match s {
            "admin" => Some(SetBy::Admin),
            "client" => Some(SetBy::Client),
            _ => None,
        }
    }
}

pub use crate::clock::Millis;
/// The system's wall clock, for code that takes no [`Clock`](crate::clock::Clock): the admin
/// plane and the stores. The request path reads the clock it was given.
pub use crate::clock::system_millis as now_millis;

/// A client: the owner of keys. `license` names a plan in the config.
#[derive(Clone, Debug, PartialEq)]
pub struct Client {
    pub client_id: String,
    pub license: String,
    pub created_at: Millis,
    pub metadata: Option<serde_json::Value>,
}

/// An API key record as stored. Never contains the plaintext.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiKey {
    pub id: Uuid,
    pub client_id: String,
    pub name: String,
    pub prefix: String,
    pub key_hash: KeyHash,
    /// The hash the key had before its last rotation, valid until `previous_valid_until`.
    pub previous_hash: Option<KeyHash>,
    pub previous_valid_until: Option<Millis>,
    pub permissions: Vec<String>,
    pub enabled: bool,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub expires_at: Option<Millis>,
    pub last_used_at: Option<Millis>,
    /// When the key was last rotated.
    pub rotated_at: Option<Millis>,
    pub rate_limit: Option<RateLimit>,
    pub metadata: Option<serde_json::Value>,
    /// Who disabled the key; `None` while it is enabled.
    pub disabled_by: Option<SetBy>,
    /// Who set `expires_at`; `None` while there is none.
    pub expires_set_by: Option<SetBy>,
    /// Who set `rate_limit`; `None` while there is none.
    pub rate_limit_set_by: Option<SetBy>,
    /// The key's token generation: tokens minted from the key carry it (`rot`) and are refused
    /// once it has changed. Every disable, rotation and Kixote revoke moves it on, to the
    /// write's time and always past its last value, so no token minted before one of them ever
    /// works again (re-enabling the key does not bring them back). `None`: never moved on.
    pub tokens_valid_after: Option<Millis>,
}

impl ApiKey {
    /// A new, enabled key of `client_id` made at `now`, with none of the optional attributes
    /// (no expiry, rate limit, metadata, rotation or setters).
    pub fn fresh(
        client_id: &str,
        name: String,
        prefix: String,
        key_hash: KeyHash,
        permissions: Vec<String>,
        now: Millis,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            client_id: client_id.to_owned(),
            name,
            prefix,
            key_hash,
            previous_hash: None,
            previous_valid_until: None,
            permissions,
            enabled: true,
            created_at: now,
            updated_at: now,
            expires_at: None,
            last_used_at: None,
            rotated_at: None,
            rate_limit: None,
            metadata: None,
            disabled_by: None,
            expires_set_by: None,
            rate_limit_set_by: None,
            tokens_valid_after: None,
        }
    }

    /// Every hash under which this key may currently be cached.
    pub fn hashes(&self) -> impl Iterator<Item = KeyHash> + '_ {
        std::iter::once(self.key_hash).chain(self.previous_hash)
    }

    /// Records `by` as the setter of every constraint the key has (a new key).
    pub fn set_by(&mut self, by: SetBy) {
        self.disabled_by = (!self.enabled).then_some(by);
        self.expires_set_by = self.expires_at.map(|_| by);
        self.rate_limit_set_by = self.rate_limit.map(|_| by);
    }

    /// Fills in the setter of a constraint that has none recorded (a record written before
    /// setters were recorded) as an admin, the safe reading: only an admin may loosen it.
    pub fn with_setters_known(mut self) -> Self {
        let known = |has: bool, by: Option<SetBy>| has.then(|| by.unwrap_or(SetBy::Admin));
        self.disabled_by = known(!self.enabled, self.disabled_by);
        self.expires_set_by = known(self.expires_at.is_some(), self.expires_set_by);
        self.rate_limit_set_by = known(self.rate_limit.is_some(), self.rate_limit_set_by);
        self
    }
}

/// What a key lookup by hash returns: the key and its client's license.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRecord {
    pub key: ApiKey,
    pub license: String,
    /// The key's credit terms, when it has credits (the count itself stays in the store).
    pub credits: Option<allowance::CreditTerms>,
}

/// An authenticated caller, built once per cache fill and shared by every request that uses
/// the key. Its client id, permissions and license live in one buffer with the key id, which
/// is also where the identity headers are written from, so the request path copies bytes and
/// clones nothing.
#[derive(Debug)]
pub struct Principal {
    pub key_id: Uuid,
    pub enabled: bool,
    /// `Millis::MAX`: none (see [`Principal::expires_at`]).
    expires_at: Millis,
    /// `Millis::MAX`: none (see [`Principal::grace_until`]).
    grace_until: Millis,
    /// `Millis::MIN`: none (see [`Principal::token_generation`]).
    token_generation: Millis,
    /// The key's rate-limit bucket (shared by every credential form of the key).
    pub limiter: Arc<bucket::KeyLimiter>,
    /// The client's bucket, when the plan's limit is client-wide and the key has its own
    /// (tighter) limit in `limiter`: a request draws from both.
    pub client_limiter: Option<Arc<bucket::KeyLimiter>>,
    /// What the request path charges in the store: the key's credits, the plan's quota.
    /// Both `None` (most keys): no store call.
    pub credits: Option<allowance::CreditTerms>,
    pub quota: Option<allowance::Quota>,
    /// The plan's bucket shared by every instance (`[rate_limit] mode = "cluster"`); `limiter`
    /// is then the key's own limit, or none.
    pub cluster: Option<Arc<cluster::ClusterBucket>>,
    /// Requests not yet written to the store.
    pub usage: usage::KeyUsage,
    pub headers: IdentityHeaders,
    /// Set by the first request that found this principal past its cache TTL and started the
    /// background lookup that replaces it.
    pub refreshing: std::sync::atomic::AtomicBool,
}

/// The identity sent upstream: client id, key id, permissions (comma-separated; permissions
/// never hold a comma) and license, rendered once as the four header fields they go out as,
/// back to back in one buffer: a request appends them with one copy.
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    /// The fields (`wire` bytes), then each value as given that does not go out as given.
    text: bytes::Bytes,
    wire: u32,
    /// Each value as it goes out (`invalid` for one that is not header text, [`header_text`])
    /// and as given: `(start, end)` in `text`.
    sent: [(u32, u32); 4],
    given: [(u32, u32); 4],
}

/// The identity fields, in the order of [`IdentityHeaders`]'s values.
pub const IDENTITY_FIELDS: [&str; 4] = [
    "x-keygate-client-id",
    "x-keygate-key-id",
    "x-keygate-permissions",
    "x-keygate-license",
];

/// True when `v` is a header value as text by the rules of `HeaderValue::from_str` and
/// `HeaderValue::to_str`: visible ASCII and tab only.
pub fn header_text(v: &[u8]) -> bool {
    // A fold without early exit: the compiler checks many bytes at a time.
    v.iter().fold(true, |ok, &b| {
        ok & ((b == b'\t') | (b.wrapping_sub(32) < 95))
    })
}

impl IdentityHeaders {
    pub fn new(client_id: &str, key_id: &str, permissions: &str, license: &str) -> Self {
        let parts = [client_id, key_id, permissions, license];
        let mut text = Vec::with_capacity(
            IDENTITY_FIELDS.iter().map(|n| n.len() + 4).sum::<usize>()
                + parts.iter().map(|p| p.len()).sum::<usize>(),
        );
        let valid = parts.map(|p| header_text(p.as_bytes()));
        let span = |text: &Vec<u8>, start: usize| (start as u32, text.len() as u32);
        let mut sent = [(0, 0); 4];
        let mut given = [(0, 0); 4];
        for (i, (name, p)) in IDENTITY_FIELDS.iter().zip(parts).enumerate() {
            text.extend_from_slice(name.as_bytes());
            text.extend_from_slice(b": ");
            let start = text.len();
            text.extend_from_slice(if valid[i] { p.as_bytes() } else { b"invalid" });
            sent[i] = span(&text, start);
            given[i] = sent[i];
            text.extend_from_slice(b"\r\n");
        }
        let wire = text.len() as u32;
        for (i, p) in parts.iter().enumerate() {
            if !valid[i] {
                let start = text.len();
                text.extend_from_slice(p.as_bytes());
                given[i] = span(&text, start);
            }
        }
        IdentityHeaders {
            text: bytes::Bytes::from(text),
            wire,
            sent,
            given,
        }
    }

    fn range((start, end): (u32, u32)) -> std::ops::Range<usize> {
        start as usize..end as usize
    }

    /// Value `i` as given (not as sent: a value that is not header text goes out as
    /// `invalid`, but is what it is in a signed assertion's JSON).
    pub fn text(&self, i: usize) -> &str {
        std::str::from_utf8(self.given(i)).unwrap_or("")
    }

    /// The bytes of value `i` as given.
    pub fn given(&self, i: usize) -> &[u8] {
        &self.text[Self::range(self.given[i])]
    }

    /// Value `i` as it goes out in a header.
    pub fn value(&self, i: usize) -> &[u8] {
        &self.text[Self::range(self.sent[i])]
    }

    /// Appends the four fields as they go on the wire.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.text[..self.wire as usize]);
    }

    /// The four values as they go out: slices of the one buffer, no copy.
    pub fn shared_values(&self) -> [bytes::Bytes; 4] {
        std::array::from_fn(|i| self.text.slice(Self::range(self.sent[i])))
    }
}

impl Principal {
    /// Builds the principal for a record found under `hash`.
    pub fn from_record(
        record: &KeyRecord,
        hash: &KeyHash,
        limiter: Arc<bucket::KeyLimiter>,
    ) -> Arc<Principal> {
        Self::with_limits(record, hash, limiter, None, None, None)
    }

    /// Builds the principal with its client's bucket (client-wide plan limit under a key's
    /// own) and its plan's quota.
    pub fn with_limits(
        record: &KeyRecord,
        hash: &KeyHash,
        limiter: Arc<bucket::KeyLimiter>,
        client_limiter: Option<Arc<bucket::KeyLimiter>>,
        quota: Option<allowance::Quota>,
        cluster: Option<Arc<cluster::ClusterBucket>>,
    ) -> Arc<Principal> {
        let key = &record.key;
        let grace_until =
            (!key.key_hash.ct_eq(hash)).then(|| key.previous_valid_until.unwrap_or(i64::MIN));
        let headers = IdentityHeaders::new(
            &key.client_id,
            &key.id.to_string(),
            &key.permissions.join(","),
            &record.license,
        );
        Arc::new(Principal {
            key_id: key.id,
            enabled: key.enabled,
            expires_at: key.expires_at.unwrap_or(Millis::MAX),
            grace_until: grace_until.unwrap_or(Millis::MAX),
            token_generation: key.tokens_valid_after.unwrap_or(Millis::MIN),
            limiter,
            client_limiter,
            credits: record.credits,
            quota,
            cluster,
            usage: Default::default(),
            headers,
            refreshing: Default::default(),
        })
    }

    pub fn client_id(&self) -> &str {
        self.headers.text(0)
    }

    pub fn license(&self) -> &str {
        self.headers.text(3)
    }

    pub fn permissions(&self) -> impl Iterator<Item = &str> {
        self.headers.text(2).split(',').filter(|p| !p.is_empty())
    }

    pub fn permission_list(&self) -> Vec<String> {
        self.permissions().map(str::to_owned).collect()
    }

    pub fn expires_at(&self) -> Option<Millis> {
        (self.expires_at != Millis::MAX).then_some(self.expires_at)
    }

    /// Set when the principal was found under the key's previous hash: the end of the
    /// rotation grace period.
    pub fn grace_until(&self) -> Option<Millis> {
        (self.grace_until != Millis::MAX).then_some(self.grace_until)
    }

    /// The key's token generation ([`ApiKey::tokens_valid_after`]); a token minted under
    /// another one is refused.
    pub fn token_generation(&self) -> Option<Millis> {
        (self.token_generation != Millis::MIN).then_some(self.token_generation)
    }

    /// The earliest moment this principal stops being valid, if any.
    pub fn valid_until(&self) -> Option<Millis> {
        let end = self.expires_at.min(self.grace_until);
        (end != Millis::MAX).then_some(end)
    }

    pub fn has_all(&self, required: &[String]) -> bool {
        required.iter().all(|r| self.has(r))
    }

    pub fn has(&self, permission: &str) -> bool {
        self.permissions().any(|p| p == permission)
    }
}

/// Most permissions a key may carry.
pub const MAX_PERMISSIONS: usize = 100;

/// Why a key's name is refused, if it is: it must be 1–100 characters without control
/// characters.
pub fn name_problem(name: &str) -> Option<&'static str> {
    let n = name.chars().count();
    (!(1..=100).contains(&n) || name.chars().any(char::is_control))
        .then_some("must be 1–100 characters without control characters")
}

/// Why a key's permissions are refused, if they are: at most [`MAX_PERMISSIONS`], each 1–100
/// printable ASCII characters without commas or spaces (they travel comma-separated in a
/// header).
pub fn permissions_problem(perms: &[String]) -> Option<String> {
    if perms.len() > MAX_PERMISSIONS {
        return Some(format!("at most {MAX_PERMISSIONS} permissions"));
    }
    perms
        .iter()
        .any(|p| {
            p.is_empty() || p.len() > 100 || !p.bytes().all(|c| c.is_ascii_graphic() && c != b',')
        })
        .then(|| {
            "each permission must be 1–100 printable ASCII characters without commas or spaces"
                .to_owned()
        })
}

/// What a client id is, as the admin API says it.
pub const CLIENT_ID_RULE: &str = "must be 1–64 characters of [A-Za-z0-9._-], not `.` or `..`";

/// [`valid_client_id`] as the OpenAPI document's pattern (no lookahead: any JSON Schema engine
/// reads it). The document's attributes repeat it as a literal; a test holds them equal.
pub const CLIENT_ID_PATTERN: &str = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$";

/// Validates a client id: 1–64 characters of `[A-Za-z0-9._-]`, and not `.` or `..` (a URL path
/// segment of its own that clients and proxies resolve away: the console's and the admin API's
/// URLs of such a client would name another resource).
pub fn valid_client_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt() -> KeyFormat {
        KeyFormat::new("kg_")
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let k = fmt().generate();
        let s = k.plaintext.expose();
        assert_eq!(s.len(), 3 + 43 + 6);
        assert!(s.starts_with("kg_"));
        assert!(s[3..].bytes().all(|c| c.is_ascii_alphanumeric()));
        assert!(fmt().check(s));
        assert_eq!(k.display_prefix, &s[..12]);
        assert_eq!(k.hash, KeyHash::of(s));
        assert_ne!(fmt().generate().plaintext, k.plaintext);
    }

    #[test]
    fn checksum_rejects_every_single_character_change() {
        for _ in 0..20 {
            let key = fmt().generate().plaintext.0;
            let bytes = key.as_bytes();
            for i in 0..bytes.len() {
                for &c in BASE62.iter().chain(b"_-.") {
                    if c == bytes[i] {
                        continue;
                    }
                    let mut m = bytes.to_vec();
                    m[i] = c;
                    let m = String::from_utf8(m).unwrap();
                    assert!(!fmt().check(&m), "accepted {i}:{}", c as char);
                }
            }
        }
    }

    #[test]
    fn checksum_rejects_adjacent_swaps() {
        for _ in 0..200 {
            let key = fmt().generate().plaintext.0;
            let bytes = key.as_bytes();
            for i in 0..bytes.len() - 1 {
                if bytes[i] == bytes[i + 1] {
                    continue;
                }
                let mut m = bytes.to_vec();
                m.swap(i, i + 1);
                assert!(!fmt().check(std::str::from_utf8(&m).unwrap()));
            }
        }
    }

    #[test]
    fn wrong_shapes_are_rejected() {
        let key = fmt().generate().plaintext.0;
        assert!(!fmt().check(""));
        assert!(!fmt().check(&key[..key.len() - 1]));
        assert!(!fmt().check(&format!("{key}0")));
        assert!(!fmt().check(&key.replacen("kg_", "xx_", 1)));
        assert!(!KeyFormat::new("other_").check(&key));
        assert!(!fmt().check(&"é".repeat(26)));
    }

    #[test]
    fn secrets_and_hashes_never_print() {
        let k = fmt().generate();
        let dbg = format!("{:?} {:?}", k.plaintext, k.hash);
        assert!(!dbg.contains(k.plaintext.expose()));
        assert!(!dbg.contains(&hex::encode(k.hash.0)));
    }

    #[test]
    fn rate_limit_validation() {
        let ok = RateLimit {
            per_second: Some(5),
            per_minute: None,
            per_hour: None,
            burst: 5,
        };
        assert_eq!(ok.problem(), None);
        assert_eq!(ok.rate(), (5, 1));
        let both = RateLimit {
            per_minute: Some(1),
            ..ok
        };
        assert!(both.problem().is_some());
        let zero = RateLimit { burst: 0, ..ok };
        assert!(zero.problem().is_some());
        // In the configuration file, a burst that comes back within a century is a limit; one
        // that would take longer is not (the governor limiters' arithmetic would overflow).
        let slow = |burst| RateLimit {
            per_second: None,
            per_minute: None,
            per_hour: Some(1),
            burst,
        };
        assert_eq!(slow(876_600).config_problem(), None);
        assert!(slow(876_602).config_problem().is_some());
        assert!(slow(6_000_000).config_problem().is_some());
        // The admin API's rules are its schema's: any rate, any burst.
        assert_eq!(slow(6_000_000).problem(), None);
        assert_eq!(
            RateLimit {
                per_second: Some(u32::MAX),
                burst: u32::MAX,
                ..ok
            }
            .config_problem(),
            None
        );
        assert!(zero.config_problem().is_some());
    }

    #[test]
    fn identity_headers_follow_from_str_rules() {
        let h = IdentityHeaders::new("acme", "0190-id", "A,B", "pro");
        assert_eq!(h.shared_values(), ["acme", "0190-id", "A,B", "pro"]);
        let h = IdentityHeaders::new("caf\u{e9}", "id", "", "line\nbreak");
        assert_eq!(h.shared_values(), ["invalid", "id", "", "invalid"]);
        let mut wire = Vec::new();
        h.write(&mut wire);
        assert_eq!(
            wire,
            b"x-keygate-client-id: invalid\r\nx-keygate-key-id: id\r\n\
              x-keygate-permissions: \r\nx-keygate-license: invalid\r\n"
        );
        // The values as given are kept for the gateway's own use.
        assert_eq!(h.text(0), "caf\u{e9}");
        assert_eq!(h.text(3), "line\nbreak");
    }

    #[test]
    fn client_ids() {
        assert!(valid_client_id("acme-corp_1.x"));
        assert!(!valid_client_id(""));
        assert!(!valid_client_id(&"a".repeat(65)));
        assert!(!valid_client_id("a b"));
        assert!(!valid_client_id("a/b"));
        assert!(!valid_client_id("."));
        assert!(!valid_client_id(".."));
        assert!(valid_client_id("..."));
        assert!(valid_client_id(".a"));
        assert!(valid_client_id("..a"));
        assert!(valid_client_id("a."));
    }

    #[test]
    fn the_documented_pattern_is_the_rule() {
        let pattern = regex::Regex::new(CLIENT_ID_PATTERN).unwrap();
        let mut ids: Vec<String> = ["", ".", "..", "...", "-", "_", "a", "a/b", "a b", "é"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for n in [1, 2, 3, 62, 63, 64, 65] {
            for c in [".", "a", "-"] {
                ids.push(c.repeat(n));
                ids.push(format!(".{}", c.repeat(n)));
                ids.push(format!("..{}", c.repeat(n)));
                ids.push(format!("{}.", c.repeat(n)));
            }
        }
        for id in &ids {
            assert_eq!(pattern.is_match(id), valid_client_id(id), "{id:?}");
        }
    }
}
