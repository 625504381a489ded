//! A `Store` wrapper that times every call and counts failures, and measures how long
//! invalidations from other instances took to arrive. Delegates everything else.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use crate::keys::allowance::{Charge, Charged, Credits, CreditsWrite, CreditsWritten, Period};
use uuid::Uuid;

use super::{
    ClientPatch, ClientWithKeys, KeyPatch, Page, Rotated, Rotation, Store, StoreHealth,
    StoreResult, Usage, UsageWrite,
};
use crate::keys::cache::{Invalidation, InvalidationSink};
use crate::keys::{ApiKey, Client, KeyHash, KeyRecord, Millis, now_millis};
use crate::telemetry::metrics::Metrics;

pub struct Metered {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    health: Arc<StoreHealth>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>, health: Arc<StoreHealth>) -> Self {
        Self {
            inner,
            metrics,
            health,
        }
    }

    async fn timed<T>(&self, f: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        self.timed_with(true, f).await
    }

    /// Times `f` and counts its failure; `back_off`: an unavailable store also puts key lookups
    /// into the back-off ([`StoreHealth`]).
    async fn timed_with<T>(
        &self,
        back_off: bool,
        f: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let start = Instant::now();
        let r = f.await;
        self.metrics.store_latency.observe(start.elapsed());
        match &r {
            Err(super::StoreError::Unavailable(_)) => {
                self.metrics.store_errors.inc();
                if back_off {
                    self.health.failed(now_millis());
                }
            }
            _ => self.health.succeeded(),
        }
        r
    }
}

struct MeteredSink {
    inner: Arc<dyn InvalidationSink>,
    metrics: Arc<Metrics>,
    health: Arc<StoreHealth>,
}

impl InvalidationSink for MeteredSink {
    fn invalidate(&self, inv: &Invalidation) {
        self.inner.invalidate(inv);
        self.metrics.invalidations_received.inc();
        if let Some(at) = inv.published_at {
            let lag = now_millis().saturating_sub(at).max(0) as u64;
            self.metrics
                .invalidation_lag
                .observe(std::time::Duration::from_millis(lag));
        }
    }

    /// Called when the subscription is back, so the store is reachable again: lookups stop
    /// skipping it at once (the cache was just emptied and must refill).
    fn invalidate_all(&self) {
        self.health.succeeded();
        self.inner.invalidate_all();
    }
}

#[async_trait]
impl Store for Metered {
    async fn find_by_hash(&self, h: &KeyHash, now: Millis) -> StoreResult<Option<KeyRecord>> {
        self.timed(self.inner.find_by_hash(h, now)).await
    }
    async fn find_many_by_hash(
        &self,
        h: &[KeyHash],
        now: Millis,
    ) -> StoreResult<Vec<Option<KeyRecord>>> {
        self.timed(self.inner.find_many_by_hash(h, now)).await
    }
    async fn find_by_id(&self, id: Uuid) -> StoreResult<Option<KeyRecord>> {
        self.timed(self.inner.find_by_id(id)).await
    }
    async fn list_keys(&self, c: Option<&str>, p: u32, n: u32) -> StoreResult<Page<ApiKey>> {
        self.timed(self.inner.list_keys(c, p, n)).await
    }
    async fn insert_key(&self, k: &ApiKey, max: u32) -> StoreResult<()> {
        self.timed(self.inner.insert_key(k, max)).await
    }
    async fn patch_key(&self, id: Uuid, p: &KeyPatch, now: Millis) -> StoreResult<Option<ApiKey>> {
        self.timed(self.inner.patch_key(id, p, now)).await
    }
    async fn rotate_key(&self, id: Uuid, r: &Rotation) -> StoreResult<Option<Rotated>> {
        self.timed(self.inner.rotate_key(id, r)).await
    }
    async fn delete_key(&self, id: Uuid) -> StoreResult<Option<ApiKey>> {
        self.timed(self.inner.delete_key(id)).await
    }
    async fn insert_client(&self, c: &Client, k: &ApiKey) -> StoreResult<()> {
        self.timed(self.inner.insert_client(c, k)).await
    }
    async fn get_client(&self, id: &str) -> StoreResult<Option<Client>> {
        self.timed(self.inner.get_client(id)).await
    }
    async fn list_clients(&self, p: u32, n: u32) -> StoreResult<Page<Client>> {
        self.timed(self.inner.list_clients(p, n)).await
    }
    async fn patch_client(&self, id: &str, p: &ClientPatch) -> StoreResult<Option<Client>> {
        self.timed(self.inner.patch_client(id, p)).await
    }
    async fn delete_client(&self, id: &str) -> StoreResult<Option<ClientWithKeys>> {
        self.timed(self.inner.delete_client(id)).await
    }
    async fn disable_client_keys(&self, id: &str) -> StoreResult<Vec<ApiKey>> {
        self.timed(self.inner.disable_client_keys(id)).await
    }
    async fn replace_client_keys(&self, id: &str, new_key: &ApiKey) -> StoreResult<Vec<ApiKey>> {
        self.timed(self.inner.replace_client_keys(id, new_key))
            .await
    }
    async fn record_usage(&self, write: UsageWrite, usage: &[Usage]) -> StoreResult<()> {
        self.timed(self.inner.record_usage(write, usage)).await
    }
    async fn usage(&self, key_id: Uuid, from: i64, to: i64) -> StoreResult<Vec<(i64, u64)>> {
        self.timed(self.inner.usage(key_id, from, to)).await
    }
    async fn charge(&self, c: &Charge<'_>) -> StoreResult<Charged> {
        self.timed(self.inner.charge(c)).await
    }
    async fn credits(&self, key_id: Uuid) -> StoreResult<Option<Credits>> {
        self.timed(self.inner.credits(key_id)).await
    }
    async fn write_credits(
        &self,
        key_id: Uuid,
        w: &CreditsWrite,
        now: Millis,
    ) -> StoreResult<CreditsWritten> {
        self.timed(self.inner.write_credits(key_id, w, now)).await
    }
    async fn quota_used(&self, client_id: &str, per: Period, index: i64) -> StoreResult<u64> {
        self.timed(self.inner.quota_used(client_id, per, index))
            .await
    }
    async fn sync_rates(
        &self,
        instance: &str,
        buckets: &[crate::keys::cluster::BucketSync],
    ) -> StoreResult<crate::keys::cluster::SyncReply> {
        self.timed(self.inner.sync_rates(instance, buckets)).await
    }
    async fn import_keys(
        &self,
        keys: Vec<ApiKey>,
        max: u32,
        atomic: bool,
    ) -> StoreResult<Vec<(usize, super::import::Refusal)>> {
        self.timed(self.inner.import_keys(keys, max, atomic)).await
    }
    /// The readiness probe: a failure (the store, or only Redis's invalidation subscription)
    /// is counted but does not put key lookups into the back-off; their own failures do.
    async fn ping(&self) -> StoreResult<()> {
        self.timed_with(false, self.inner.ping()).await
    }
    async fn signing_keys(&self) -> StoreResult<Vec<super::signing::SigningKeyRecord>> {
        self.timed(self.inner.signing_keys()).await
    }
    async fn add_signing_key(
        &self,
        key: &super::signing::SigningKeyRecord,
        how: super::signing::AddKey,
        prune: &[String],
    ) -> StoreResult<Vec<super::signing::SigningKeyRecord>> {
        self.timed(self.inner.add_signing_key(key, how, prune))
            .await
    }
    fn watch_invalidations(&self, sink: Arc<dyn InvalidationSink>) {
        self.inner.watch_invalidations(Arc::new(MeteredSink {
            inner: sink,
            metrics: Arc::clone(&self.metrics),
            health: Arc::clone(&self.health),
        }));
    }

    fn outbox(&self) -> Option<Arc<dyn crate::keys::outbox::Outbox>> {
        self.inner.outbox()
    }
}
