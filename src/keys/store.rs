//! The `Store` trait: durable clients and keys. The proxy calls it on cache misses only; the
//! admin plane calls it for every read and write. Implementations must make each write atomic
//! (a crash never leaves half a client or half a key) and acknowledge only what is durable.
//!
//! # Changes never undo each other
//! A change to an existing record names what it changes ([`KeyPatch`], [`Rotation`],
//! [`ClientPatch`]) and is applied by the store to the record as it is at the moment of the
//! write, in one atomic step; nothing is read by the caller, edited and written back whole. So
//! two changes made at the same time both hold where they touch different attributes, and the
//! later one wins where they touch the same: a PATCH that does not name `enabled` cannot
//! re-enable a disabled key, a PATCH cannot restore a rotated-away secret, and a rotation
//! cannot undo a PATCH. Such writes never fail because of a concurrent write (there is nothing
//! to retry), and each answers the record as its own write left it.

pub mod import;
pub mod metered;
pub mod redis;
pub mod signing;
pub mod sqlite;
pub mod sqlite_outbox;
#[cfg(test)]
pub mod testing;

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use super::allowance::{Charge, Charged, Credits, CreditsWrite, CreditsWritten, Period};
use super::cache::InvalidationSink;
use super::cluster::{BucketSync, SyncReply};
use super::{ApiKey, Client, KeyHash, KeyRecord, Millis, RateLimit, SetBy};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or failed; the caller answers 503.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule was violated (client exists, too many keys…).
    #[error("{0}")]
    Conflict(Conflict),
    /// A referenced record does not exist.
    #[error("not found")]
    NotFound,
    /// A client's change would have loosened a constraint an admin set; nothing was written.
    #[error("{0}")]
    Refused(Constraint),
    /// The write was made on the Redis primary but not confirmed by as many replicas as
    /// `store.redis_wait_replicas` asks for: it stands, yet a failover may lose it. The caller
    /// answers 503 and says so.
    #[error("write not confirmed by replicas: {0}")]
    Unconfirmed(String),
    /// The store failed partway through a call of several writes, and what was written could
    /// not all be undone: some of the change may stand. The caller answers 503 and says so.
    #[error("store failed partway: {0}")]
    Incomplete(String),
}

/// A constraint on a key that only an admin may loosen (see [`KeyPatch::setters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Constraint {
    /// The key was disabled by an admin: a client may not enable it.
    Disabled,
    /// The expiry was set by an admin: a client may shorten it, not remove or extend it.
    Expiry,
    /// The rate limit was set by an admin: a client may not change it.
    RateLimit,
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Constraint::Disabled => {
                "an admin disabled this key; only an admin can enable it (nothing was changed)"
            }
            Constraint::Expiry => {
                "an admin set this key's expiry; a client can only bring it closer, not remove \
                 or postpone it (nothing was changed)"
            }
            Constraint::RateLimit => {
                "an admin set this key's rate limit; only an admin can change it (nothing was \
                 changed)"
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    ClientExists,
    TooManyKeys { max: u32 },
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conflict::ClientExists => f.write_str("a client with this client_id already exists"),
            Conflict::TooManyKeys { max } => write!(
                f,
                "the client already has the maximum of {max} keys; revoke (DELETE) a key first"
            ),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Whether the store failed recently, shared by everything that calls it: after a failure,
/// key lookups skip the store for [`StoreHealth::BACKOFF_MS`] (stale principals are served,
/// unknown keys get 503 at once) instead of every request waiting on a dead or hung store; any
/// successful call (an admin call, a readiness probe, a lookup) ends the backoff.
#[derive(Debug, Default)]
pub struct StoreHealth {
    down_until: std::sync::atomic::AtomicI64,
}

impl StoreHealth {
    pub const BACKOFF_MS: i64 = 1_000;

    pub fn failed(&self, now: Millis) {
        self.down_until
            .store(now + Self::BACKOFF_MS, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn succeeded(&self) {
        if self.down_until.load(std::sync::atomic::Ordering::Relaxed) != 0 {
            self.down_until
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn backing_off(&self, now: Millis) -> bool {
        now < self.down_until.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Names one write of usage: a write sent again because its answer was lost carries the same
/// name, and a store that can apply a write its caller never hears back from (Redis: a reply
/// lost or late) applies a write of one name once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageWrite {
    /// Random, per flush.
    pub flush: u64,
    /// The chunk's place in its flush.
    pub chunk: u32,
}

impl UsageWrite {
    /// The first chunk of a new flush.
    pub fn random() -> Self {
        Self {
            flush: rand::random(),
            chunk: 0,
        }
    }
}

/// Usage of one key since the last flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub key_id: Uuid,
    pub last_used_at: Millis,
    /// Days since the Unix epoch (UTC) the requests are counted on.
    pub day: i64,
    pub requests: u64,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: u64,
}

/// A client and the keys it owned, as returned by deletions.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientWithKeys {
    pub client: Client,
    pub keys: Vec<ApiKey>,
}

/// A change to some attributes of a key: `None` leaves an attribute as it is. The secret is
/// changed by a [`Rotation`] only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub enabled: Option<bool>,
    pub permissions: Option<Vec<String>>,
    /// `Some(None)`: the key never expires.
    pub expires_at: Option<Option<Millis>>,
    /// `Some(None)`: the key falls back to its client's plan.
    pub rate_limit: Option<Option<RateLimit>>,
    /// `Some(None)`: no metadata.
    pub metadata: Option<Option<serde_json::Value>>,
    /// Who makes the change: a client's change may not loosen what an admin set
    /// ([`KeyPatch::setters`]).
    pub by: SetBy,
    /// A leak report acted on (`url`, `source`, `token_type`): the same atomic write adds
    /// `key.leaked` with these members and `action` — `revoked` when this write disabled the
    /// key, `already_disabled` when it was disabled before, `notified` otherwise.
    pub leak: Option<serde_json::Value>,
}

/// Who set each constraint of a key once a patch is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setters {
    pub disabled_by: Option<SetBy>,
    pub expires_set_by: Option<SetBy>,
    pub rate_limit_set_by: Option<SetBy>,
}

impl KeyPatch {
    /// Who set each constraint of `current` once this patch is applied to it, or the
    /// constraint it may not loosen. The rules, for a patch by a client on a constraint an
    /// admin set: enabling a disabled key, removing or postponing the expiry, or changing the
    /// rate limit is refused (the whole patch); disabling it again or bringing the expiry
    /// closer is allowed and leaves the constraint the admin's (so a client cannot turn an
    /// admin's constraint into its own and then lift it). A constraint a client set is the
    /// client's to lift; anything an admin writes is the admin's. Every store applies these
    /// rules in the same atomic step as the write.
    pub fn setters(&self, current: &ApiKey) -> Result<Setters, Constraint> {
        let current = current.clone().with_setters_known();
        let client = self.by == SetBy::Client;
        // The setter of a constraint this patch sets: an admin's stays the admin's.
        let setter = |was: Option<SetBy>| {
            if was == Some(SetBy::Admin) {
                SetBy::Admin
            } else {
                self.by
            }
        };
        let disabled_by = match self.enabled {
            None => current.disabled_by,
            Some(true) if client && current.disabled_by == Some(SetBy::Admin) => {
                return Err(Constraint::Disabled);
            }
            Some(true) => None,
            Some(false) => Some(setter(current.disabled_by)),
        };
        let admin_expiry = client && current.expires_set_by == Some(SetBy::Admin);
        let expires_set_by = match self.expires_at {
            None => current.expires_set_by,
            Some(None) if admin_expiry => return Err(Constraint::Expiry),
            Some(None) => None,
            Some(Some(t)) if admin_expiry && current.expires_at.is_some_and(|e| t > e) => {
                return Err(Constraint::Expiry);
            }
            Some(Some(_)) => Some(setter(current.expires_set_by)),
        };
        let rate_limit_set_by = match self.rate_limit {
            None => current.rate_limit_set_by,
            Some(_) if client && current.rate_limit_set_by == Some(SetBy::Admin) => {
                return Err(Constraint::RateLimit);
            }
            Some(None) => None,
            Some(Some(_)) => Some(setter(current.rate_limit_set_by)),
        };
        Ok(Setters {
            disabled_by,
            expires_set_by,
            rate_limit_set_by,
        })
    }
}

/// A new secret for a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotation {
    pub key_hash: KeyHash,
    /// The display prefix of the new secret.
    pub prefix: String,
    /// Until when the secret being replaced keeps working; `None`: it stops at once.
    pub previous_valid_until: Option<Millis>,
    pub at: Millis,
}

/// A key just before and just after a rotation, both as the rotation's own write saw them.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotated {
    pub before: ApiKey,
    pub after: ApiKey,
}

/// A change to some attributes of a client: `None` leaves an attribute as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientPatch {
    pub license: Option<String>,
    /// `Some(None)`: no metadata.
    pub metadata: Option<Option<serde_json::Value>>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The key whose current hash, or whose previous hash still within its grace period at
    /// `now`, equals `hash`, with its client's license. One round trip.
    async fn find_by_hash(&self, hash: &KeyHash, now: Millis) -> StoreResult<Option<KeyRecord>>;

    /// [`Store::find_by_hash`] for each of `hashes`, answered in their order: the background
    /// refreshes of cached keys past their TTL come in batches. A store may run them apart from
    /// the lookups requests wait for; an error fails the whole batch. By default the lookups
    /// are made all at once (a networked store then pays one round trip for the batch, not
    /// one per key).
    async fn find_many_by_hash(
        &self,
        hashes: &[KeyHash],
        now: Millis,
    ) -> StoreResult<Vec<Option<KeyRecord>>> {
        futures_util::future::try_join_all(hashes.iter().map(|h| self.find_by_hash(h, now))).await
    }

    /// The key with this id and its client's license.
    async fn find_by_id(&self, id: Uuid) -> StoreResult<Option<KeyRecord>>;

    /// Keys ordered by creation, optionally of one client. `page` starts at 1.
    async fn list_keys(
        &self,
        client_id: Option<&str>,
        page: u32,
        per_page: u32,
    ) -> StoreResult<Page<ApiKey>>;

    /// Inserts a key for an existing client. `max_keys` (0 = unlimited) is checked in the same
    /// transaction. `NotFound` when the client does not exist.
    async fn insert_key(&self, key: &ApiKey, max_keys: u32) -> StoreResult<()>;

    /// Sets the attributes `patch` names, and `updated_at` to `now` unless it is already later,
    /// in one atomic write on the key as it is then: its secret and every attribute the patch
    /// does not name stay as they are; a patch that disables the key also moves its
    /// `tokens_valid_after` on past its current value, to at least `now` (every token minted
    /// before is refused for good); who set each constraint follows [`KeyPatch::setters`],
    /// judged on the key as it is then, and a patch those rules refuse changes nothing
    /// ([`StoreError::Refused`]). Returns the key as this write left it, `None` when it does
    /// not exist.
    async fn patch_key(
        &self,
        id: Uuid,
        patch: &KeyPatch,
        now: Millis,
    ) -> StoreResult<Option<ApiKey>>;

    /// Gives the key a new secret in one atomic write. The hash that is current at the moment of
    /// the write becomes the previous hash, valid until `previous_valid_until`, or stops at once
    /// when that is `None`; an older previous hash always stops. Only the hashes, `prefix`,
    /// `rotated_at`, `tokens_valid_after` (moved on past its current value, to at least `at`)
    /// and `updated_at` change. `None` when the key does not exist.
    async fn rotate_key(&self, id: Uuid, rotation: &Rotation) -> StoreResult<Option<Rotated>>;

    /// Deletes a key and returns it.
    async fn delete_key(&self, id: Uuid) -> StoreResult<Option<ApiKey>>;

    /// Creates a client together with its first key, atomically.
    async fn insert_client(&self, client: &Client, first_key: &ApiKey) -> StoreResult<()>;

    async fn get_client(&self, client_id: &str) -> StoreResult<Option<Client>>;

    async fn list_clients(&self, page: u32, per_page: u32) -> StoreResult<Page<Client>>;

    /// Sets the attributes `patch` names in one atomic write. Returns the client as this write
    /// left it, `None` when it does not exist.
    async fn patch_client(
        &self,
        client_id: &str,
        patch: &ClientPatch,
    ) -> StoreResult<Option<Client>>;

    /// Deletes a client and all its keys, atomically, returning what was deleted.
    async fn delete_client(&self, client_id: &str) -> StoreResult<Option<ClientWithKeys>>;

    /// Disables every key of the client, as an admin (only `enabled`, `disabled_by`,
    /// `tokens_valid_after`, moved on, and `updated_at` change), atomically; the Kixote revoke
    /// call. Returns the keys as they were before. `NotFound` when the client
    /// does not exist.
    async fn disable_client_keys(&self, client_id: &str) -> StoreResult<Vec<ApiKey>>;

    /// Deletes every key of the client and inserts `new_key` in their place, atomically; the
    /// Kixote recreate call. Returns the deleted keys. `NotFound` when the client does not
    /// exist (and nothing is written).
    async fn replace_client_keys(
        &self,
        client_id: &str,
        new_key: &ApiKey,
    ) -> StoreResult<Vec<ApiKey>>;

    /// Records a batch of usage in one atomic write: each entry raises the key's
    /// `last_used_at` to at least `last_used_at` and adds `requests` to its count for `day`.
    /// Entries of keys that no longer exist are ignored. A write named `write` that was
    /// already applied is not applied again (Redis, for a day: an answer lost after the script
    /// ran); SQLite's writes are in-process, so an error there means nothing was written.
    async fn record_usage(&self, write: UsageWrite, usage: &[Usage]) -> StoreResult<()>;

    /// Request counts of a key per day (days since the Unix epoch, UTC) in `from..=to`,
    /// ascending, days without requests omitted.
    async fn usage(&self, key_id: Uuid, from: i64, to: i64) -> StoreResult<Vec<(i64, u64)>>;

    /// Succeeds when the store can serve requests.
    async fn ping(&self) -> StoreResult<()>;

    /// Charges one request atomically: the key's credits (`cost`, after a refill that is due)
    /// and its client's quota for the current period; nothing at all when either is short.
    /// Called on the request path only for keys with credits or a plan with a quota.
    async fn charge(&self, charge: &Charge<'_>) -> StoreResult<Charged>;

    /// A key's credits as stored (a refill that is due is not yet applied; see
    /// [`Credits::at`]). `None`: no credits.
    async fn credits(&self, key_id: Uuid) -> StoreResult<Option<Credits>>;

    /// Changes a key's credits in one atomic step; a change of terms (credits given or taken
    /// away, another refill) invalidates the key's cache entries on every instance.
    async fn write_credits(
        &self,
        key_id: Uuid,
        write: &CreditsWrite,
        now: Millis,
    ) -> StoreResult<CreditsWritten>;

    /// Requests counted against a client's quota in period `index` of `per`.
    async fn quota_used(&self, client_id: &str, per: Period, index: i64) -> StoreResult<u64>;

    /// One sync round of cluster rate limits ([`super::cluster`]) for instance `instance`:
    /// gives back unused leases and reserves new ones, atomically. Only the Redis store shares
    /// buckets; the others answer that they cannot.
    async fn sync_rates(&self, _instance: &str, _buckets: &[BucketSync]) -> StoreResult<SyncReply> {
        Err(StoreError::Unavailable(
            "cluster rate limits need the Redis store".into(),
        ))
    }

    /// Writes keys migrated from another system (see [`import`]). Each key is judged in
    /// order: its client must exist, its hash must not be any stored key's current or previous
    /// hash nor an earlier key's of the same call, and its client must stay within `max_keys`
    /// (0 = unlimited). The answer lists every refused key by its index in `keys`.
    /// `atomic`: when any key is refused, nothing at all is written; otherwise the accepted
    /// keys are written, each atomically (SQLite writes the whole call in one transaction).
    ///
    /// The default works through the other calls: it checks first, then inserts key by key,
    /// and in `atomic` mode deletes what it inserted when a later key is refused or the store
    /// fails. Stores with transactions override it.
    async fn import_keys(
        &self,
        keys: Vec<ApiKey>,
        max_keys: u32,
        atomic: bool,
    ) -> StoreResult<Vec<(usize, import::Refusal)>> {
        import::one_by_one(self, keys, max_keys, atomic).await
    }

    /// Starts delivering invalidations made by other instances to `sink`, for as long as the
    /// store lives; after a broken subscription is restored, calls `invalidate_all` (anything
    /// may have been missed). Stores that are not shared between instances do nothing.
    fn watch_invalidations(&self, _sink: Arc<dyn InvalidationSink>) {}

    /// The signing keys of signed identity (`[identity]`), in no particular order.
    async fn signing_keys(&self) -> StoreResult<Vec<signing::SigningKeyRecord>> {
        Err(StoreError::Unavailable(
            "this store keeps no signing keys".into(),
        ))
    }

    /// Adds `key` (see [`signing::AddKey`]) and removes the keys named in `prune`, in one
    /// atomic step; answers the set as the write left it.
    async fn add_signing_key(
        &self,
        _key: &signing::SigningKeyRecord,
        _how: signing::AddKey,
        _prune: &[String],
    ) -> StoreResult<Vec<signing::SigningKeyRecord>> {
        Err(StoreError::Unavailable(
            "this store keeps no signing keys".into(),
        ))
    }

    /// The store's event outbox and webhooks ([`super::outbox`]); `None` when this store
    /// keeps no events.
    fn outbox(&self) -> Option<Arc<dyn super::outbox::Outbox>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SetBy::{Admin, Client};

    fn key(enabled: bool, expires_at: Option<Millis>, by: SetBy) -> ApiKey {
        let mut b = ApiKey::builder().enabled(enabled).rate_limit(RateLimit {
            per_second: Some(1),
            per_minute: None,
            per_hour: None,
            burst: 1,
        });
        if let Some(t) = expires_at {
            b = b.expires_at(t);
        }
        let (mut k, _) = b.build();
        k.set_by(by);
        k
    }

    fn patch(by: SetBy) -> KeyPatch {
        KeyPatch {
            by,
            ..KeyPatch::default()
        }
    }

    #[test]
    fn a_client_may_tighten_an_admins_constraints_but_never_loosen_them() {
        let admins = key(false, Some(1_000), Admin);
        let enable = KeyPatch {
            enabled: Some(true),
            ..patch(Client)
        };
        assert_eq!(enable.setters(&admins), Err(Constraint::Disabled));
        let never = KeyPatch {
            expires_at: Some(None),
            ..patch(Client)
        };
        assert_eq!(never.setters(&admins), Err(Constraint::Expiry));
        let later = KeyPatch {
            expires_at: Some(Some(1_001)),
            ..patch(Client)
        };
        assert_eq!(later.setters(&admins), Err(Constraint::Expiry));
        let no_limit = KeyPatch {
            rate_limit: Some(None),
            ..patch(Client)
        };
        assert_eq!(no_limit.setters(&admins), Err(Constraint::RateLimit));

        // Tightening is allowed, and what it tightens stays the admin's.
        let sooner = KeyPatch {
            enabled: Some(false),
            expires_at: Some(Some(999)),
            ..patch(Client)
        };
        let s = sooner.setters(&admins).unwrap();
        assert_eq!(
            (s.disabled_by, s.expires_set_by, s.rate_limit_set_by),
            (Some(Admin), Some(Admin), Some(Admin))
        );
        // So is a patch that names nothing of them.
        assert!(patch(Client).setters(&admins).is_ok());
        // An admin may loosen anything.
        let lift = KeyPatch {
            enabled: Some(true),
            expires_at: Some(None),
            rate_limit: Some(None),
            ..patch(Admin)
        };
        let s = lift.setters(&admins).unwrap();
        assert_eq!(
            (s.disabled_by, s.expires_set_by, s.rate_limit_set_by),
            (None, None, None)
        );
    }

    #[test]
    fn what_a_client_set_the_client_may_lift() {
        let mut own = key(false, Some(1_000), Client);
        own.rate_limit = None;
        own.rate_limit_set_by = None;
        let lift = KeyPatch {
            enabled: Some(true),
            expires_at: Some(Some(5_000)),
            ..patch(Client)
        };
        let s = lift.setters(&own).unwrap();
        assert_eq!((s.disabled_by, s.expires_set_by), (None, Some(Client)));
        // An admin's disable of a key the client disabled makes it the admin's.
        let disable = KeyPatch {
            enabled: Some(false),
            ..patch(Admin)
        };
        assert_eq!(disable.setters(&own).unwrap().disabled_by, Some(Admin));
        // A client's disable of an enabled key is the client's.
        let enabled = key(true, None, Admin);
        let disable = KeyPatch {
            enabled: Some(false),
            ..patch(Client)
        };
        assert_eq!(disable.setters(&enabled).unwrap().disabled_by, Some(Client));
    }

    #[test]
    fn constraints_without_a_recorded_setter_are_an_admins() {
        let mut legacy = key(false, Some(1_000), Admin);
        legacy.disabled_by = None;
        legacy.expires_set_by = None;
        let enable = KeyPatch {
            enabled: Some(true),
            ..patch(Client)
        };
        assert_eq!(enable.setters(&legacy), Err(Constraint::Disabled));
        let later = KeyPatch {
            expires_at: Some(Some(2_000)),
            ..patch(Client)
        };
        assert_eq!(later.setters(&legacy), Err(Constraint::Expiry));
    }
}
