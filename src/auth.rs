//! Authentication: a credential becomes a [`Principal`], or an error code. Authorization: a
//! principal and a route become a [`Permit`], the only thing `forward` accepts.
//!
//! API key path: shape and checksum (no I/O) → SHA-256 → cache → store on miss. Unknown hashes
//! are cached negatively. The store answer is compared to the computed hash in constant time.
//!
//! Token path: the signature and claims of a token are verified once; the result is cached by
//! SHA-256 of the token's signature segment (one block, whatever the token's length) until the
//! token's `exp` (plus the verifier's leeway), with the signed part (header and claims, which
//! are not secret) kept in the entry and compared whole on every hit. What is cached is only
//! "this exact string is a genuine token for key `kid`, generation `rot`, client `sub`": the
//! key itself is still looked up (cached by id) and checked on every request, so a token still
//! dies with its key (revoked, disabled, rotated, deleted).
//!
//! Time is the key cache's [`Clock`]: freshness, expiry, the store's backoff and the token
//! cache are all judged on it.

pub mod credential;
pub mod jwt;
mod tokens;

use std::sync::Arc;

use uuid::Uuid;

use crate::clock::Clock;
use crate::keys::cache::{Cached, Entry, KeyCache};
use crate::keys::store::{Store, StoreHealth};
use crate::keys::{KeyFormat, KeyHash, Millis, Principal};
use crate::limit::KeyLimits;
use crate::route::Route;
use crate::telemetry::metrics::{CacheResult, Metrics};
use credential::{Credential, Kind};
use jwt::{Jwt, Token};
use tokens::{TokenCache, VerifiedToken};

/// Most verified tokens remembered (each about 400 bytes with its signed part); past it the
/// expired and then the soonest to expire make room ([`tokens::TokenCache`]).
const TOKEN_CACHE_CAPACITY: usize = 100_000;
/// How long past its TTL a cached key is still served while one background lookup refreshes
/// it (never longer than the TTL itself). Past it, requests wait for the store. The cache
/// knows it too: after missed invalidations it makes keys stale past it.
const REVALIDATE_WINDOW_MS: Millis = crate::keys::cache::REVALIDATE_WINDOW_MS;
/// Most stale keys one background refresh asks the store about at once.
const REFRESH_BATCH: usize = 256;
/// How long the refresh task waits for more stale keys before it asks the store about a batch
/// that is not full. Keys cached together go stale over a few seconds, one request at a time:
/// without the wait each would be a batch of its own, a store call and (SQLite) a wakeup of
/// the refresh thread on the request path's core per key; with it, every key that went stale
/// in the window shares one. A stale key is served meanwhile, so the wait delays only how soon
/// a change made behind the cache's back is seen, by this much at most.
const REFRESH_GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// A cached principal past its TTL, to be asked of the store again in the background.
enum Stale {
    /// Cached by key hash (API keys).
    Hash(KeyHash),
    /// Cached by key id (tokens).
    Id(Uuid),
}

/// Why a credential was not accepted. The proxy and the admin listener each turn it into
/// their own answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("invalid api key")]
    InvalidApiKey,
    #[error("expired api key")]
    ExpiredApiKey,
    #[error("disabled api key")]
    DisabledApiKey,
    #[error("invalid token")]
    InvalidToken,
    /// A token keygate signed that no longer passes: past its time, or its key disabled,
    /// rotated, deleted or its client's keys revoked since. Answered as [`AuthError::InvalidToken`]
    /// (nothing tells a caller which), but not a guess.
    #[error("invalid token")]
    StaleToken,
    #[error("insufficient permissions")]
    InsufficientPermissions,
    /// The store could not be asked and no stale answer was at hand.
    #[error("store unavailable")]
    StoreUnavailable,
}

impl AuthError {
    /// A guess: an unknown key or token (not a real key that is disabled or expired). Only
    /// guesses count against a client's failed-authentication allowance.
    pub fn is_guess(self) -> bool {
        matches!(self, Self::InvalidApiKey | Self::InvalidToken)
    }
}

#[derive(Clone)]
pub struct Authenticator {
    format: KeyFormat,
    cache: KeyCache,
    store: Arc<dyn Store>,
    limits: Arc<KeyLimits>,
    jwt: Arc<Jwt>,
    metrics: Arc<Metrics>,
    store_health: Arc<StoreHealth>,
    /// Tokens already verified, by SHA-256 of their signature segment.
    tokens: Arc<TokenCache>,
    /// The queue of background refreshes, to the task that works it ([`Authenticator::refresh`]);
    /// started with the first refresh.
    refreshes: Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Stale>>>,
    /// [`REFRESH_GATHER`] (tests set another).
    refresh_gather: std::time::Duration,
}

impl Authenticator {
    pub fn new(
        format: KeyFormat,
        cache: KeyCache,
        store: Arc<dyn Store>,
        limits: Arc<KeyLimits>,
        jwt: Arc<Jwt>,
        metrics: Arc<Metrics>,
        store_health: Arc<StoreHealth>,
    ) -> Self {
        let tokens = Arc::new(TokenCache::new(TOKEN_CACHE_CAPACITY));
        Self {
            format,
            cache,
            store,
            limits,
            jwt,
            metrics,
            store_health,
            tokens,
            refreshes: Default::default(),
            refresh_gather: REFRESH_GATHER,
        }
    }

    /// The rate limits, scopes and quotas of the plans.
    pub fn limits(&self) -> &KeyLimits {
        &self.limits
    }

    /// The store keys are looked up in (the request path charges credits and quotas there).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The clock authentication is judged on (the key cache's).
    pub fn clock(&self) -> &Clock {
        self.cache.clock()
    }

    /// Parts of the periodic sweep of idle state (key buckets, expired cache entries).
    pub fn sweep_shards(&self) -> usize {
        self.limits.shards().max(self.cache.shards())
    }

    /// Sweeps one part (see [`Authenticator::sweep_shards`]).
    pub fn sweep_shard(&self, shard: usize) {
        self.limits.sweep_shard(shard);
        self.cache.sweep_shard(shard, self.clock().now_millis());
    }

    fn store_failed(&self, now: Millis, e: &crate::keys::store::StoreError, stale: bool) {
        self.store_health.failed(now);
        tracing::warn!(
            error = %e,
            serving_stale = stale,
            "key lookup failed; lookups skip the store for {} ms",
            StoreHealth::BACKOFF_MS
        );
    }

    pub async fn authenticate(&self, cred: &Credential<'_>) -> Result<Arc<Principal>, AuthError> {
        match cred.kind {
            Kind::ApiKey => self.api_key(cred.secret.as_str()).await,
            Kind::Jwt => self.token(cred.secret.as_str()).await,
        }
    }

    /// Trades a valid API key for an access token.
    pub async fn login(&self, api_key: &str) -> Result<Token, AuthError> {
        let p = self.api_key(api_key).await?;
        Ok(self
            .jwt
            .issue(&p, p.token_generation(), self.clock().now_millis()))
    }

    /// Authenticates an access token: signature and claims, then the key it was minted from
    /// must still be valid and not disabled, rotated or revoked since (cached lookup by key id).
    pub async fn token(&self, token: &str) -> Result<Arc<Principal>, AuthError> {
        let now = self.clock().now_millis();
        let claims = self.verified(token, now)?;
        let id = claims.key_id;
        let principal =
            match self.classify(self.cache.get_id(&id), now, || self.refresh(Stale::Id(id))) {
                Lookup::Fresh(p) => p,
                Lookup::Unknown => return Err(AuthError::StaleToken),
                // On the heap, as in `api_key`.
                Lookup::Refill(stale) => Box::pin(self.fill_id(id, now, stale)).await?,
            };
        let current = check_status(&principal, now).is_ok()
            && principal.token_generation().unwrap_or(0) == claims.rot
            && now < claims.grace_until
            && *principal.client_id() == *claims.sub;
        if current {
            Ok(principal)
        } else {
            Err(AuthError::StaleToken)
        }
    }

    /// The verified claims of `token`: from the token cache, or by verifying it (and caching
    /// the result until the token expires).
    fn verified(&self, token: &str, now: Millis) -> Result<Arc<VerifiedToken>, AuthError> {
        // Bounded before hashing, as the verifier bounds it before decoding.
        if token.len() > jwt::MAX_TOKEN_LEN {
            return Err(AuthError::InvalidToken);
        }
        let Some((signed, signature)) = token.rsplit_once('.') else {
            return Err(AuthError::InvalidToken);
        };
        // Only a genuine token's signature finds an entry; the rest of the string must then be
        // the one that signature was verified with (a changed header or claim with a copied
        // signature is verified, and refused, like any other new string).
        let digest = KeyHash::of(signature);
        if let Some(t) = self.tokens.get(&digest)
            && now / 1000 <= t.usable_until_secs
            && *t.signed == *signed
        {
            return Ok(t);
        }
        let claims = self.jwt.verify(token, now).map_err(|e| match e {
            jwt::InvalidToken::Forged => AuthError::InvalidToken,
            jwt::InvalidToken::OutOfTime => AuthError::StaleToken,
        })?;
        let key_id = Uuid::parse_str(&claims.kid).map_err(|_| AuthError::InvalidToken)?;
        let t = Arc::new(VerifiedToken {
            signed: signed.into(),
            key_id,
            rot: claims.rot,
            grace_until: claims.grace_until.unwrap_or(Millis::MAX),
            sub: claims.sub.into_boxed_str(),
            usable_until_secs: claims.exp.saturating_add(self.jwt.leeway_secs()),
        });
        self.tokens.insert(digest, Arc::clone(&t), now / 1000);
        Ok(t)
    }

    async fn fill_id(
        &self,
        id: Uuid,
        now: Millis,
        stale: Option<Arc<Principal>>,
    ) -> Result<Arc<Principal>, AuthError> {
        let lookup = || self.store.find_by_id(id);
        self.fill_from(lookup, now, stale, |found, epoch| {
            self.cache_id_answer(id, found, now, epoch)
        })
        .await
    }

    /// Caches the store's answer for key `id` (asked at `now`, when the cache was at `epoch`).
    fn cache_id_answer(
        &self,
        id: Uuid,
        found: Option<crate::keys::KeyRecord>,
        now: Millis,
        epoch: u64,
    ) -> Result<Arc<Principal>, AuthError> {
        match found {
            Some(record) => {
                let p = self.principal(&record, &record.key.key_hash);
                self.cache
                    .insert_id(id, Cached::Found(Arc::clone(&p)), now, epoch);
                Ok(p)
            }
            None => {
                // Asked for a verified token's key: keygate signed it, so not a guess.
                self.cache.insert_id(id, Cached::Unknown, now, epoch);
                Err(AuthError::StaleToken)
            }
        }
    }

    /// The answer when the store failed: the stale principal if there is one, else 503.
    fn stale(&self, stale: Option<Arc<Principal>>) -> Result<Arc<Principal>, AuthError> {
        match stale {
            Some(p) => {
                self.metrics.cache(CacheResult::StaleServed);
                Ok(p)
            }
            None => Err(AuthError::StoreUnavailable),
        }
    }

    fn principal(&self, record: &crate::keys::KeyRecord, hash: &KeyHash) -> Arc<Principal> {
        let key = &record.key;
        let b = self
            .limits
            .buckets(key.id, &key.client_id, key.rate_limit, &record.license);
        Principal::with_limits(
            record,
            hash,
            b.first,
            b.client,
            self.limits.quota(&record.license),
            b.cluster,
        )
    }

    /// Authenticates a plaintext API key.
    /// A string with keygate's prefix must be a keygate key (shape and checksum); any other
    /// must have the shape of an imported key ([`crate::keys::foreign`]). Either way only
    /// SHA-256 of it is looked up, in the cache and then the store.
    pub async fn api_key(&self, key: &str) -> Result<Arc<Principal>, AuthError> {
        let keygate = key.as_bytes().starts_with(self.format.prefix().as_bytes());
        if keygate && !self.format.shape(key) || !keygate && !crate::keys::foreign::shape(key) {
            return Err(AuthError::InvalidApiKey);
        }
        let hash = KeyHash::of(key);
        let now = self.clock().now_millis();
        let entry = self.cache.get_at(&hash, now);
        // Only keys that passed the whole check are ever cached, and an entry is found only
        // for the same SHA-256, so a cached key's alphabet and checksum need no second look;
        // anything else is checked before it can cost a store lookup.
        if entry.is_none() && keygate && !self.format.check(key) {
            return Err(AuthError::InvalidApiKey);
        }
        let principal = match self.classify(entry, now, || self.refresh(Stale::Hash(hash))) {
            Lookup::Fresh(p) => p,
            Lookup::Unknown => return Err(AuthError::InvalidApiKey),
            // On the heap: a store lookup is rare (a miss) and its future would otherwise widen
            // every request's state to its size.
            Lookup::Refill(stale) => Box::pin(self.fill(hash, now, stale)).await?,
        };
        check_status(&principal, now)?;
        Ok(principal)
    }

    /// What a cache entry means at `now` (and the hit metrics). A key just past its TTL is
    /// served while it is revalidated in the background (`refresh` starts that, once per
    /// cached principal), so a hot key never makes a request wait for the store.
    fn classify(&self, entry: Option<Entry>, now: Millis, refresh: impl FnOnce()) -> Lookup {
        match entry {
            Some(Entry {
                value: Cached::Found(p),
                fresh_until,
            }) if now < fresh_until => {
                self.metrics.cache(CacheResult::Hit);
                Lookup::Fresh(p)
            }
            Some(Entry {
                value: Cached::Unknown,
                ..
            }) => {
                self.metrics.cache(CacheResult::NegativeHit);
                Lookup::Unknown
            }
            Some(Entry {
                value: Cached::Found(stale),
                fresh_until,
            }) => {
                let window = REVALIDATE_WINDOW_MS.min(self.cache.ttl_millis());
                if now < fresh_until + window && !self.store_health.backing_off(now) {
                    self.metrics.cache(CacheResult::Hit);
                    if !stale
                        .refreshing
                        .swap(true, std::sync::atomic::Ordering::AcqRel)
                    {
                        refresh();
                    }
                    return Lookup::Fresh(stale);
                }
                Lookup::Refill(Some(stale))
            }
            None => Lookup::Refill(None),
        }
    }

    /// Looks `hash` up in the store and caches the answer. When the store fails, a stale
    /// principal (still within `stale_if_error`) is served; without one the answer is 503,
    /// never 401: an unverified key is neither accepted nor called invalid.
    async fn fill(
        &self,
        hash: KeyHash,
        now: Millis,
        stale: Option<Arc<Principal>>,
    ) -> Result<Arc<Principal>, AuthError> {
        let lookup = || self.store.find_by_hash(&hash, now);
        self.fill_from(lookup, now, stale, |found, epoch| {
            self.cache_answer(hash, found, now, epoch)
        })
        .await
    }

    /// Asks the store (`lookup`, called only past the back-off and after the cache's epoch is
    /// read) and caches its answer with `answer`, given that epoch. A failed lookup serves
    /// `stale` if there is one, else 503.
    async fn fill_from<F>(
        &self,
        lookup: impl FnOnce() -> F,
        now: Millis,
        stale: Option<Arc<Principal>>,
        answer: impl FnOnce(Option<crate::keys::KeyRecord>, u64) -> Result<Arc<Principal>, AuthError>,
    ) -> Result<Arc<Principal>, AuthError>
    where
        F: Future<Output = crate::keys::store::StoreResult<Option<crate::keys::KeyRecord>>>,
    {
        self.metrics.cache(CacheResult::Miss);
        if self.store_health.backing_off(now) {
            return self.stale(stale);
        }
        let epoch = self.cache.epoch();
        match self.recorded(now, stale.is_some(), lookup().await) {
            Some(found) => answer(found, epoch),
            None => self.stale(stale),
        }
    }

    /// A store call's outcome with the store's health recorded: the answer, or `None` (logged)
    /// when it failed.
    fn recorded<T>(
        &self,
        now: Millis,
        serving_stale: bool,
        outcome: crate::keys::store::StoreResult<T>,
    ) -> Option<T> {
        match outcome {
            Ok(answer) => {
                self.store_health.succeeded();
                Some(answer)
            }
            Err(e) => {
                self.store_failed(now, &e, serving_stale);
                None
            }
        }
    }

    /// Caches the store's answer for `hash` (asked at `now`, when the cache was at `epoch`).
    fn cache_answer(
        &self,
        hash: KeyHash,
        found: Option<crate::keys::KeyRecord>,
        now: Millis,
        epoch: u64,
    ) -> Result<Arc<Principal>, AuthError> {
        let matching = found.filter(|r| {
            r.key.key_hash.ct_eq(&hash) || r.key.previous_hash.is_some_and(|p| p.ct_eq(&hash))
        });
        match matching {
            Some(record) => {
                let p = self.principal(&record, &hash);
                self.cache
                    .insert(hash, Cached::Found(Arc::clone(&p)), now, epoch);
                Ok(p)
            }
            None => {
                self.cache.insert(hash, Cached::Unknown, now, epoch);
                Err(AuthError::InvalidApiKey)
            }
        }
    }

    /// Starts the background refresh of a stale cached principal. Refreshes queue for one task
    /// that asks the store about up to [`REFRESH_BATCH`] keys at once
    /// ([`Store::find_many_by_hash`]): keys cached together go stale together (a burst of new
    /// callers, a restart, a load test), and the store then sees a few batched lookups instead
    /// of a task, a store call and a blocking thread per key, on the cores requests run on.
    fn refresh(&self, stale: Stale) {
        let queue = self.refreshes.get_or_init(|| {
            let (queue, work) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(self.clone().refresh_all(work));
            queue
        });
        if let Err(unsent) = queue.send(stale) {
            // The task ended with the runtime it ran on (only tests run several): alone then.
            let me = self.clone();
            tokio::spawn(async move { me.refresh_batch(&mut vec![unsent.0]).await });
        }
    }

    /// The refresh task: batches of what is queued, one after the other. A batch that is not
    /// full waits [`REFRESH_GATHER`] for more keys first.
    async fn refresh_all(self, mut work: tokio::sync::mpsc::UnboundedReceiver<Stale>) {
        let mut batch = Vec::with_capacity(REFRESH_BATCH);
        while work.recv_many(&mut batch, REFRESH_BATCH).await > 0 {
            if batch.len() < REFRESH_BATCH {
                tokio::time::sleep(self.refresh_gather).await;
                while batch.len() < REFRESH_BATCH {
                    match work.try_recv() {
                        Ok(stale) => batch.push(stale),
                        Err(_) => break,
                    }
                }
            }
            self.refresh_batch(&mut batch).await;
        }
    }

    /// Asks the store about the stale principals in `batch` (emptied) and caches the answers.
    /// While the store backs off, or when it fails, the entries stay as they are: served stale
    /// until the revalidate window ends, then asked again by the requests themselves.
    async fn refresh_batch(&self, batch: &mut Vec<Stale>) {
        let now = self.clock().now_millis();
        self.metrics.cache_n(CacheResult::Miss, batch.len() as u64);
        if self.store_health.backing_off(now) {
            batch.clear();
            return;
        }
        let mut hashes = Vec::with_capacity(batch.len());
        for stale in batch.drain(..) {
            match stale {
                Stale::Hash(h) => hashes.push(h),
                // Tokens' keys, by id: one lookup each.
                Stale::Id(id) => {
                    let epoch = self.cache.epoch();
                    let Some(found) = self.recorded(now, true, self.store.find_by_id(id).await)
                    else {
                        return;
                    };
                    let _ = self.cache_id_answer(id, found, now, epoch);
                }
            }
        }
        if hashes.is_empty() {
            return;
        }
        let epoch = self.cache.epoch();
        let found = self.store.find_many_by_hash(&hashes, now).await;
        for (hash, found) in hashes
            .into_iter()
            .zip(self.recorded(now, true, found).unwrap_or_default())
        {
            let _ = self.cache_answer(hash, found, now, epoch);
        }
    }
}

/// A cache entry, classified.
enum Lookup {
    Fresh(Arc<Principal>),
    /// Known not to exist (negative entry).
    Unknown,
    /// Ask the store; the stale principal, if any, is served when the store fails.
    Refill(Option<Arc<Principal>>),
}

fn check_status(p: &Principal, now: Millis) -> Result<(), AuthError> {
    if p.grace_until().is_some_and(|g| g <= now) {
        return Err(AuthError::InvalidApiKey);
    }
    if !p.enabled {
        return Err(AuthError::DisabledApiKey);
    }
    if p.expires_at().is_some_and(|e| e <= now) {
        return Err(AuthError::ExpiredApiKey);
    }
    Ok(())
}

/// Proof that a request may be forwarded on `route`: either the route is public, or
/// `principal` holds every permission it requires. Constructed only here.
pub struct Permit<'r> {
    route: &'r Route,
    principal: Option<Arc<Principal>>,
}

impl<'r> Permit<'r> {
    pub fn route(&self) -> &'r Route {
        self.route
    }

    pub fn principal(&self) -> Option<&Arc<Principal>> {
        self.principal.as_ref()
    }
}

/// A permit for a route with `auth = "none"`; `None` when the route requires a key.
pub fn public(route: &Route) -> Option<Permit<'_>> {
    route.is_public().then_some(Permit {
        route,
        principal: None,
    })
}

/// A permit when `principal` holds all of the route's permissions.
pub fn authorize(route: &Route, principal: Arc<Principal>) -> Result<Permit<'_>, AuthError> {
    if principal.has_all(&route.permissions) {
        Ok(Permit {
            route,
            principal: Some(principal),
        })
    } else {
        Err(AuthError::InsufficientPermissions)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::clock::FakeClock;
    use crate::keys::cache::CacheSettings;
    use crate::keys::store::sqlite::SqliteStore;
    use crate::keys::store::testing::Counting;
    use crate::keys::testing::client;

    /// An authenticator over the real SQLite store (counting lookups), on a fake clock.
    struct Setup {
        auth: Authenticator,
        store: Arc<Counting>,
        cache: KeyCache,
        clock: FakeClock,
        _dir: tempfile::TempDir,
    }

    fn setup() -> Setup {
        setup_ttl(Duration::from_secs(60))
    }

    fn setup_ttl(ttl: Duration) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Counting::new(
            SqliteStore::open(&dir.path().join("k.db")).unwrap(),
        ));
        let clock = FakeClock::new();
        let cache = KeyCache::new(
            &CacheSettings {
                capacity: 1000,
                ttl,
                negative_ttl: Duration::from_secs(60),
                stale_if_error: Duration::from_secs(60),
            },
            clock.clock(),
        );
        let limits = Arc::new(KeyLimits::new(
            crate::keys::RateLimit {
                per_second: Some(100),
                per_minute: None,
                per_hour: None,
                burst: 100,
            },
            Default::default(),
            clock.clock(),
        ));
        let jwt = Arc::new(Jwt::new(&jwt::JwtSettings {
            secret: Jwt::random_secret(),
            issuer: "keygate".into(),
            audience: None,
            ttl: Duration::from_secs(900),
            leeway: Duration::from_secs(30),
        }));
        let auth = Authenticator::new(
            KeyFormat::new("kg_"),
            cache.clone(),
            store.clone(),
            limits,
            jwt,
            Arc::new(Metrics::new(vec![])),
            Arc::new(StoreHealth::default()),
        );
        Setup {
            auth,
            store,
            cache,
            clock,
            _dir: dir,
        }
    }

    #[tokio::test]
    async fn bad_shapes_never_reach_cache_or_store_and_unknown_keys_cost_one_lookup() {
        let Setup {
            auth, store, cache, ..
        } = setup();
        let good = KeyFormat::new("kg_").generate().plaintext.0;
        let mut wrong_sum = good.clone().into_bytes();
        let last = wrong_sum.len() - 1;
        wrong_sum[last] = if wrong_sum[last] == b'0' { b'1' } else { b'0' };
        for bad in [
            "".to_string(),
            "kg_short".into(),
            // Keygate's prefix claims a keygate key: shape and checksum must hold.
            String::from_utf8(wrong_sum).unwrap(),
            format!("kg_{}", "x".repeat(60)),
            // Not of the imported-key shape: too short, too long, not visible ASCII.
            "x".repeat(15),
            "x".repeat(257),
            "sixteen chars ok".into(),
            "tab\tin-the-middle-of-it".into(),
        ] {
            assert_eq!(
                auth.api_key(&bad).await.unwrap_err(),
                AuthError::InvalidApiKey
            );
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 0, "store touched");
        assert_eq!(cache.entry_count(), 0, "cache touched");

        // A well-formed unknown key costs one lookup, then is answered from the negative cache.
        for _ in 0..3 {
            assert_eq!(
                auth.api_key(&good).await.unwrap_err(),
                AuthError::InvalidApiKey
            );
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);

        // Strings of the imported-key shape go through the cache and the negative cache: one
        // lookup per distinct string, however often it is presented.
        let foreign = ["x".repeat(52), good.replacen("kg_", "kx_", 1)];
        for _ in 0..5 {
            for f in &foreign {
                assert_eq!(auth.api_key(f).await.unwrap_err(), AuthError::InvalidApiKey);
            }
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 3);
    }

    /// Disables the key of `hash` in the store behind the cache's back (no invalidation).
    async fn disable_behind_the_cache(store: &Counting, hash: &KeyHash) {
        let mut key = store
            .inner
            .find_by_hash(hash, crate::keys::now_millis())
            .await
            .unwrap()
            .unwrap()
            .key;
        key.enabled = false;
        assert!(store.inner.update_key(&key).await.unwrap());
    }

    async fn seed(store: &Counting) -> crate::keys::NewKey {
        let (key, k) = crate::keys::ApiKey::builder()
            .client("c")
            .permissions(&["P"])
            .build();
        store.insert_client(&client("c"), &key).await.unwrap();
        k
    }

    /// A key past its expiry is refused from the cache like a disabled one: one lookup, then
    /// 401s without the store (its entry ended at the key's end, so every request with it went
    /// to the store, and no failed-authentication limit counts an expired key).
    #[tokio::test]
    async fn an_expired_key_costs_one_lookup_however_often_it_is_sent() {
        let Setup {
            auth, store, clock, ..
        } = setup();
        let now = clock.clock().now_millis();
        let (expired, gone) = crate::keys::ApiKey::builder()
            .client("c")
            .expires_at(now - 1_000)
            .build();
        store.insert_client(&client("c"), &expired).await.unwrap();
        for _ in 0..5 {
            assert_eq!(
                auth.api_key(gone.plaintext.expose()).await.unwrap_err(),
                AuthError::ExpiredApiKey
            );
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
        // One that expires while cached: refused from the cache too.
        let (soon, k) = crate::keys::ApiKey::builder()
            .client("c")
            .name("soon")
            .expires_at(now + 1_000)
            .build();
        store.insert_key(&soon, 10).await.unwrap();
        assert!(auth.api_key(k.plaintext.expose()).await.is_ok());
        clock.advance(Duration::from_secs(2));
        for _ in 0..5 {
            assert_eq!(
                auth.api_key(k.plaintext.expose()).await.unwrap_err(),
                AuthError::ExpiredApiKey
            );
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn cache_hits_do_not_touch_the_store() {
        let Setup { auth, store, .. } = setup();
        let k = seed(&store).await;
        for _ in 0..5 {
            let p = auth.api_key(k.plaintext.expose()).await.unwrap();
            assert_eq!(p.client_id(), "c");
            assert_eq!(p.license(), "pro");
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn verified_tokens_are_cached_but_still_die_with_their_key() {
        let Setup {
            auth, store, cache, ..
        } = setup();
        let k = seed(&store).await;
        let token = auth.login(k.plaintext.expose()).await.unwrap().access_token;
        for _ in 0..3 {
            let p = auth.token(token.expose()).await.unwrap();
            assert_eq!(p.client_id(), "c");
        }
        assert_eq!(auth.tokens.len(), 1, "verified once, then cached");

        // Another string (one signature character changed) is not the cached token.
        let mut forged = token.expose().as_bytes().to_vec();
        let i = forged.len() - 10;
        forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert_eq!(
            auth.token(&forged).await.unwrap_err(),
            AuthError::InvalidToken
        );

        // The cached token's signature under another signed part (a claim changed, the
        // signature copied) is verified as a new string, and refused; the genuine entry stays.
        let (signed, signature) = token.expose().rsplit_once('.').unwrap();
        let (header, claims) = signed.split_once('.').unwrap();
        let mut other = claims.as_bytes().to_vec();
        other[5] = if other[5] == b'A' { b'B' } else { b'A' };
        let copied = format!("{header}.{}.{signature}", String::from_utf8(other).unwrap());
        assert_eq!(
            auth.token(&copied).await.unwrap_err(),
            AuthError::InvalidToken
        );
        assert_eq!(auth.token(token.expose()).await.unwrap().client_id(), "c");
        assert_eq!(auth.tokens.len(), 1);

        // Disable the key as the admin plane does: store first, then the cache.
        let mut key = store
            .find_by_hash(&k.hash, crate::keys::now_millis())
            .await
            .unwrap()
            .unwrap()
            .key;
        key.enabled = false;
        assert!(store.update_key(&key).await.unwrap());
        cache.invalidate(&k.hash);
        cache.invalidate_id(&key.id);
        // Refused, but not a guess: keygate signed it (the forged ones above are guesses).
        let e = auth.token(token.expose()).await.unwrap_err();
        assert_eq!(e, AuthError::StaleToken);
        assert!(!e.is_guess() && AuthError::InvalidToken.is_guess());
    }

    /// A verified token is answered from the token cache until the verifier would refuse it
    /// (`exp` plus the leeway, on the authenticator's clock), and refused from then on.
    #[tokio::test]
    async fn a_cached_token_is_refused_once_past_its_exp_and_leeway() {
        let Setup {
            auth, store, clock, ..
        } = setup();
        let k = seed(&store).await;
        let token = auth.login(k.plaintext.expose()).await.unwrap().access_token;
        auth.token(token.expose()).await.unwrap();
        // The token's `exp` is 900 s after it was issued; the leeway is 30 s.
        clock.advance(Duration::from_secs(900 + 30));
        assert!(
            auth.token(token.expose()).await.is_ok(),
            "refused within the leeway"
        );
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            auth.token(token.expose()).await.unwrap_err(),
            AuthError::StaleToken
        );
    }

    #[tokio::test]
    async fn store_outage_serves_stale_principals_and_503_for_the_rest() {
        let Setup {
            auth, store, clock, ..
        } = setup_ttl(Duration::from_millis(1));
        let k = seed(&store).await;
        auth.api_key(k.plaintext.expose()).await.unwrap();
        clock.advance(Duration::from_millis(5));
        store.down.store(true, Ordering::SeqCst);
        // Past its TTL, the key is revalidated; the store fails; the stale entry is served.
        let before = store.lookups.load(Ordering::SeqCst);
        let p = auth.api_key(k.plaintext.expose()).await.unwrap();
        assert_eq!(p.client_id(), "c");
        assert_eq!(
            store.lookups.load(Ordering::SeqCst),
            before + 1,
            "revalidation attempted"
        );
        // A key never seen: 503, not 401.
        let unknown = KeyFormat::new("kg_").generate();
        assert_eq!(
            auth.api_key(unknown.plaintext.expose()).await.unwrap_err(),
            AuthError::StoreUnavailable
        );
        // Within the backoff the store is not asked again: stale served, unknown 503.
        let asked = store.lookups.load(Ordering::SeqCst);
        assert!(auth.api_key(k.plaintext.expose()).await.is_ok());
        assert_eq!(
            auth.api_key(unknown.plaintext.expose()).await.unwrap_err(),
            AuthError::StoreUnavailable
        );
        assert_eq!(
            store.lookups.load(Ordering::SeqCst),
            asked,
            "store asked during backoff"
        );
        store.down.store(false, Ordering::SeqCst);
        // The backoff holds until its last millisecond, then the store is asked again.
        clock.advance(Duration::from_millis(StoreHealth::BACKOFF_MS as u64 - 1));
        assert_eq!(
            auth.api_key(unknown.plaintext.expose()).await.unwrap_err(),
            AuthError::StoreUnavailable
        );
        assert_eq!(store.lookups.load(Ordering::SeqCst), asked);
        clock.advance(Duration::from_millis(1));
        assert_eq!(
            auth.api_key(unknown.plaintext.expose()).await.unwrap_err(),
            AuthError::InvalidApiKey
        );
    }
    #[tokio::test]
    async fn a_key_past_its_ttl_is_served_while_one_background_lookup_refreshes_it() {
        let Setup {
            auth, store, clock, ..
        } = setup_ttl(Duration::from_millis(300));
        let k = seed(&store).await;
        auth.api_key(k.plaintext.expose()).await.unwrap();
        clock.advance(Duration::from_millis(320));
        // Disabled in the store behind the cache's back (no invalidation reaches it).
        disable_behind_the_cache(&store, &k.hash).await;
        let before = store.lookups.load(Ordering::SeqCst);
        // Past the TTL: every request is still answered from the cache at once, and exactly
        // one lookup goes to the store in the background.
        for _ in 0..20 {
            let served = common_ready(auth.api_key(k.plaintext.expose()));
            assert!(served.is_ok());
        }
        // The clock stands still from here on: the background lookup is given turns to run
        // (its store call finishes on a blocking thread), nothing waits for time to pass.
        let waited = std::time::Instant::now();
        while store.lookups.load(Ordering::SeqCst) == before {
            assert!(waited.elapsed() < Duration::from_secs(5), "no revalidation");
            tokio::task::yield_now().await;
        }
        let mut refreshed = false;
        while waited.elapsed() < Duration::from_secs(5) {
            if auth.api_key(k.plaintext.expose()).await.err() == Some(AuthError::DisabledApiKey) {
                refreshed = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(refreshed, "the refreshed entry was not used");
        assert_eq!(store.lookups.load(Ordering::SeqCst), before + 1);
    }

    /// Keys cached together go stale together: their refreshes reach the store as one batched
    /// lookup (not a lookup per key), every request is still answered from the cache at once,
    /// and what the batch found replaces each entry (a key disabled behind the cache's back is
    /// refused, the others are served fresh without another lookup).
    #[tokio::test]
    async fn keys_gone_stale_together_are_refreshed_in_one_batched_lookup() {
        let Setup {
            auth, store, clock, ..
        } = setup_ttl(Duration::from_millis(300));
        let first = seed(&store).await;
        auth.api_key(first.plaintext.expose()).await.unwrap();
        let mut keys = vec![first];
        keys.extend(cached_keys(&auth, &store, 39).await);
        let before = store.lookups.load(Ordering::SeqCst);
        clock.advance(Duration::from_millis(320));
        let disabled = &keys[7];
        disable_behind_the_cache(&store, &disabled.hash).await;
        for k in &keys {
            assert!(common_ready(auth.api_key(k.plaintext.expose())).is_ok());
        }
        let waited = std::time::Instant::now();
        while auth.api_key(disabled.plaintext.expose()).await.is_ok() {
            assert!(waited.elapsed() < Duration::from_secs(5), "not refreshed");
            tokio::task::yield_now().await;
        }
        assert_eq!(*store.batches.lock().unwrap(), vec![40]);
        assert_eq!(store.lookups.load(Ordering::SeqCst), before + 40);
        for (i, k) in keys.iter().enumerate() {
            let answer = common_ready(auth.api_key(k.plaintext.expose()));
            if i == 7 {
                assert_eq!(answer.unwrap_err(), AuthError::DisabledApiKey);
            } else {
                assert!(answer.is_ok());
            }
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), before + 40);
    }

    /// `n` keys of one client in `store` besides the seeded one, each looked up once (cached).
    async fn cached_keys(
        auth: &Authenticator,
        store: &Counting,
        n: usize,
    ) -> Vec<crate::keys::NewKey> {
        let mut keys = Vec::with_capacity(n);
        for _ in 0..n {
            let (key, k) = crate::keys::ApiKey::builder()
                .client("c")
                .permissions(&["P"])
                .build();
            store.insert_key(&key, 0).await.unwrap();
            auth.api_key(k.plaintext.expose()).await.unwrap();
            keys.push(k);
        }
        keys
    }

    /// A TTL of 300 ms, the refresh task's gather window set to `gather`, `n` keys cached
    /// besides the seeded one, and the clock moved past their TTL: every one of them is stale.
    async fn stale_keys(gather: Duration, n: usize) -> (Setup, Vec<crate::keys::NewKey>) {
        let mut setup = setup_ttl(Duration::from_millis(300));
        setup.auth.refresh_gather = gather;
        seed(&setup.store).await;
        let keys = cached_keys(&setup.auth, &setup.store, n).await;
        setup.clock.advance(Duration::from_millis(320));
        (setup, keys)
    }

    /// Keys that go stale one after the other, within the gather window, share one batched
    /// lookup: a batch that is not full waits for more keys before the store is asked, and
    /// each key is served from the cache meanwhile.
    #[tokio::test]
    async fn keys_gone_stale_one_after_the_other_wait_to_share_a_batch() {
        let (Setup { auth, store, .. }, keys) = stale_keys(Duration::from_millis(500), 5).await;
        let before = store.lookups.load(Ordering::SeqCst);
        assert!(common_ready(auth.api_key(keys[0].plaintext.expose())).is_ok());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            store.batches.lock().unwrap().is_empty(),
            "the store was asked about one key without waiting for more"
        );
        for k in &keys[1..] {
            assert!(common_ready(auth.api_key(k.plaintext.expose())).is_ok());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let waited = std::time::Instant::now();
        while store.lookups.load(Ordering::SeqCst) < before + 5 {
            assert!(waited.elapsed() < Duration::from_secs(5), "not refreshed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*store.batches.lock().unwrap(), vec![5]);
        assert_eq!(store.lookups.load(Ordering::SeqCst), before + 5);
    }

    /// A full batch of stale keys goes to the store at once, without the gather window's wait.
    #[tokio::test]
    async fn a_full_batch_of_stale_keys_is_asked_about_without_waiting() {
        let (Setup { auth, store, .. }, keys) =
            stale_keys(Duration::from_secs(600), REFRESH_BATCH + 4).await;
        for k in &keys {
            assert!(common_ready(auth.api_key(k.plaintext.expose())).is_ok());
        }
        let waited = std::time::Instant::now();
        while store.batches.lock().unwrap().is_empty() {
            assert!(
                waited.elapsed() < Duration::from_secs(5),
                "a full batch waited for more keys"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*store.batches.lock().unwrap(), vec![REFRESH_BATCH]);
    }

    /// A token's key past its TTL is refreshed through the same queue (by key id): the token is
    /// served at once meanwhile, and refused once the refresh found its key disabled.
    #[tokio::test]
    async fn a_tokens_key_past_its_ttl_is_refreshed_in_the_background() {
        let Setup {
            auth, store, clock, ..
        } = setup_ttl(Duration::from_millis(300));
        let k = seed(&store).await;
        let token = auth.login(k.plaintext.expose()).await.unwrap().access_token;
        auth.token(token.expose()).await.unwrap();
        clock.advance(Duration::from_millis(320));
        disable_behind_the_cache(&store, &k.hash).await;
        assert!(common_ready(auth.token(token.expose())).is_ok());
        let waited = std::time::Instant::now();
        while auth.token(token.expose()).await.is_ok() {
            assert!(waited.elapsed() < Duration::from_secs(5), "not refreshed");
            tokio::task::yield_now().await;
        }
        assert_eq!(
            auth.token(token.expose()).await.unwrap_err(),
            AuthError::StaleToken
        );
    }

    /// A refresh that finds the store down leaves the entries as they are: served stale within
    /// the revalidate window, without a lookup per request, and asked again by the requests
    /// once the window has passed.
    #[tokio::test]
    async fn a_failed_batched_refresh_serves_stale_and_leaves_the_rest_to_the_requests() {
        let Setup {
            auth, store, clock, ..
        } = setup_ttl(Duration::from_millis(300));
        let k = seed(&store).await;
        auth.api_key(k.plaintext.expose()).await.unwrap();
        clock.advance(Duration::from_millis(320));
        store.down.store(true, Ordering::SeqCst);
        let before = store.lookups.load(Ordering::SeqCst);
        assert!(common_ready(auth.api_key(k.plaintext.expose())).is_ok());
        let waited = std::time::Instant::now();
        while store.batches.lock().unwrap().is_empty() {
            assert!(waited.elapsed() < Duration::from_secs(5), "no refresh");
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            assert!(common_ready(auth.api_key(k.plaintext.expose())).is_ok());
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), before + 1);
        // Past the window (and the back-off), the request asks the store itself.
        store.down.store(false, Ordering::SeqCst);
        clock.advance(Duration::from_millis(
            REVALIDATE_WINDOW_MS.min(300) as u64 + StoreHealth::BACKOFF_MS as u64,
        ));
        assert!(auth.api_key(k.plaintext.expose()).await.is_ok());
        assert_eq!(store.lookups.load(Ordering::SeqCst), before + 2);
        assert_eq!(store.batches.lock().unwrap().len(), 1);
    }

    /// After a subscription came back (invalidations may have been missed), a cached key is
    /// asked of the store again before it is served: a key disabled meanwhile is refused at
    /// once, and while the store does not answer the cached key is served stale, not 503.
    #[tokio::test]
    async fn after_missed_invalidations_keys_are_asked_again_and_served_stale_only_while_the_store_is_down()
     {
        let Setup {
            auth,
            store,
            cache,
            clock,
            ..
        } = setup();
        let k = seed(&store).await;
        let unknown = KeyFormat::new("kg_").generate().plaintext.0;
        auth.api_key(k.plaintext.expose()).await.unwrap();
        assert!(auth.api_key(&unknown).await.is_err());
        let lookups = store.lookups.load(Ordering::SeqCst);

        cache.invalidate_all();
        store.down.store(true, Ordering::SeqCst);
        assert!(
            auth.api_key(k.plaintext.expose()).await.is_ok(),
            "a cached key is served stale while the store is down"
        );
        assert_eq!(
            store.lookups.load(Ordering::SeqCst),
            lookups + 1,
            "it was asked of the store first"
        );
        // The unknown key's entry is gone: without the store it is neither accepted nor refused.
        assert_eq!(
            auth.api_key(&unknown).await.unwrap_err(),
            AuthError::StoreUnavailable
        );

        store.down.store(false, Ordering::SeqCst);
        clock.advance(Duration::from_secs(2)); // past the store back-off
        disable_behind_the_cache(&store, &k.hash).await;
        // The store answers: the stale entry is not served (not even while revalidated).
        cache.invalidate_all();
        assert_eq!(
            auth.api_key(k.plaintext.expose()).await.unwrap_err(),
            AuthError::DisabledApiKey
        );
    }

    /// Polls a future once: it must be ready (a cache hit never waits).
    fn common_ready<F: std::future::Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        match f.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("the request waited for the store"),
        }
    }
}
