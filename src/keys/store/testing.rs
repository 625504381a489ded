//! Test support: the real SQLite store behind a wrapper that counts lookups and fails on
//! demand (for the cache, authentication and usage tests). Keys and clients to put in it come
//! from [`crate::keys::testing`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;

use crate::keys::allowance::{Charge, Charged, Credits, CreditsWrite, CreditsWritten, Period};
use uuid::Uuid;

use super::sqlite::SqliteStore;
use super::{
    ClientPatch, ClientWithKeys, KeyPatch, Page, Rotated, Rotation, Store, StoreError, StoreResult,
    Usage, UsageWrite,
};
use crate::keys::{ApiKey, Client, KeyHash, KeyRecord, Millis, now_millis};

/// A patch naming every attribute a patch can change, with the values of `key`.
pub fn patch_of(key: &ApiKey) -> KeyPatch {
    KeyPatch {
        name: Some(key.name.clone()),
        enabled: Some(key.enabled),
        permissions: Some(key.permissions.clone()),
        expires_at: Some(key.expires_at),
        rate_limit: Some(key.rate_limit),
        metadata: Some(key.metadata.clone()),
        by: crate::keys::SetBy::Admin,
        leak: None,
    }
}

impl SqliteStore {
    /// For tests that change a key by editing a copy of it: writes the copy's patchable
    /// attributes with [`Store::patch_key`]. True when the key exists.
    pub async fn update_key(&self, key: &ApiKey) -> StoreResult<bool> {
        let patched = self.patch_key(key.id, &patch_of(key), now_millis()).await?;
        Ok(patched.is_some())
    }
}

/// The real SQLite store, counting lookups by hash, with failures on demand.
pub struct Counting {
    pub inner: SqliteStore,
    pub lookups: AtomicUsize,
    /// The size of each batched lookup ([`Store::find_many_by_hash`]), in order.
    pub batches: std::sync::Mutex<Vec<usize>>,
    /// When set, lookups fail as if the store were unreachable.
    pub down: AtomicBool,
    /// `record_usage` calls that succeed before every further one fails.
    pub usage_writes_left: AtomicUsize,
    /// The keys of the usage written, in the order the store was given them.
    pub usage_written: std::sync::Mutex<Vec<Uuid>>,
    /// Milliseconds each usage write waits before it is made (a slow store).
    pub usage_write_delay_ms: std::sync::atomic::AtomicU64,
    /// Every usage write asked for, failed or not, with its name.
    pub usage_calls: std::sync::Mutex<Vec<(UsageWrite, Vec<Usage>)>>,
}

impl Counting {
    /// As [`SqliteStore::update_key`].
    pub async fn update_key(&self, key: &ApiKey) -> StoreResult<bool> {
        self.inner.update_key(key).await
    }

    pub fn new(inner: SqliteStore) -> Self {
        Counting {
            inner,
            lookups: AtomicUsize::new(0),
            batches: Default::default(),
            down: AtomicBool::new(false),
            usage_writes_left: AtomicUsize::new(usize::MAX),
            usage_written: Default::default(),
            usage_write_delay_ms: Default::default(),
            usage_calls: Default::default(),
        }
    }
}

#[async_trait]
impl Store for Counting {
    async fn find_by_hash(&self, h: &KeyHash, now: Millis) -> StoreResult<Option<KeyRecord>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down".into()));
        }
        self.inner.find_by_hash(h, now).await
    }
    async fn find_many_by_hash(
        &self,
        h: &[KeyHash],
        now: Millis,
    ) -> StoreResult<Vec<Option<KeyRecord>>> {
        self.lookups.fetch_add(h.len(), Ordering::SeqCst);
        self.batches.lock().unwrap().push(h.len());
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down".into()));
        }
        self.inner.find_many_by_hash(h, now).await
    }
    async fn find_by_id(&self, id: Uuid) -> StoreResult<Option<KeyRecord>> {
        self.inner.find_by_id(id).await
    }
    async fn list_keys(&self, c: Option<&str>, p: u32, n: u32) -> StoreResult<Page<ApiKey>> {
        self.inner.list_keys(c, p, n).await
    }
    async fn insert_key(&self, k: &ApiKey, max: u32) -> StoreResult<()> {
        self.inner.insert_key(k, max).await
    }
    async fn patch_key(&self, id: Uuid, p: &KeyPatch, now: Millis) -> StoreResult<Option<ApiKey>> {
        self.inner.patch_key(id, p, now).await
    }
    async fn rotate_key(&self, id: Uuid, r: &Rotation) -> StoreResult<Option<Rotated>> {
        self.inner.rotate_key(id, r).await
    }
    async fn delete_key(&self, id: Uuid) -> StoreResult<Option<ApiKey>> {
        self.inner.delete_key(id).await
    }
    async fn insert_client(&self, c: &Client, k: &ApiKey) -> StoreResult<()> {
        self.inner.insert_client(c, k).await
    }
    async fn get_client(&self, id: &str) -> StoreResult<Option<Client>> {
        self.inner.get_client(id).await
    }
    async fn list_clients(&self, p: u32, n: u32) -> StoreResult<Page<Client>> {
        self.inner.list_clients(p, n).await
    }
    async fn patch_client(&self, id: &str, p: &ClientPatch) -> StoreResult<Option<Client>> {
        self.inner.patch_client(id, p).await
    }
    async fn delete_client(&self, id: &str) -> StoreResult<Option<ClientWithKeys>> {
        self.inner.delete_client(id).await
    }
    async fn disable_client_keys(&self, id: &str) -> StoreResult<Vec<ApiKey>> {
        self.inner.disable_client_keys(id).await
    }
    async fn replace_client_keys(&self, id: &str, new_key: &ApiKey) -> StoreResult<Vec<ApiKey>> {
        self.inner.replace_client_keys(id, new_key).await
    }
    async fn record_usage(&self, write: UsageWrite, u: &[Usage]) -> StoreResult<()> {
        self.usage_calls.lock().unwrap().push((write, u.to_vec()));
        let allowed =
            self.usage_writes_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                    0 => None,
                    usize::MAX => Some(usize::MAX),
                    n => Some(n - 1),
                });
        if allowed.is_err() {
            return Err(StoreError::Unavailable("down".into()));
        }
        let delay = self.usage_write_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        self.inner.record_usage(write, u).await?;
        let mut written = self.usage_written.lock().unwrap();
        written.extend(u.iter().map(|u| u.key_id));
        Ok(())
    }
    async fn usage(&self, id: Uuid, from: i64, to: i64) -> StoreResult<Vec<(i64, u64)>> {
        self.inner.usage(id, from, to).await
    }
    async fn charge(&self, c: &Charge<'_>) -> StoreResult<Charged> {
        self.inner.charge(c).await
    }
    async fn credits(&self, key_id: Uuid) -> StoreResult<Option<Credits>> {
        self.inner.credits(key_id).await
    }
    async fn write_credits(
        &self,
        key_id: Uuid,
        w: &CreditsWrite,
        now: Millis,
    ) -> StoreResult<CreditsWritten> {
        self.inner.write_credits(key_id, w, now).await
    }
    async fn quota_used(&self, client_id: &str, per: Period, index: i64) -> StoreResult<u64> {
        self.inner.quota_used(client_id, per, index).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
}
