//! The key cache: SHA-256 of a key → the principal it authenticates, or "unknown".
//!
//! Positive entries are fresh for the configured TTL, then kept for `stale_if_error` more in
//! case the store is down, but never past the key's own expiry or the end of a rotation grace
//! period; negative entries (unknown hashes) live for a short TTL so a flood
//! of made-up keys costs one store lookup per distinct key per TTL. Every admin write
//! invalidates the hashes it touched before it answers.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;

use uuid::Uuid;

use super::{KeyHash, Millis, Principal, now_millis};

/// What the cache knows about a hash.
#[derive(Clone, Debug)]
pub enum Cached {
    Found(Arc<Principal>),
    Unknown,
}

/// SHA-256 output is uniformly distributed, so its first eight bytes are already a good hash;
/// this skips running SipHash over 32 bytes on every lookup.
#[derive(Clone, Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

impl BuildHasher for DigestHasher {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

impl std::hash::Hash for KeyHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(b));
    }
}

/// A cached answer and until when it is fresh. Past `fresh_until` a positive entry is
/// revalidated against the store, and served stale only while the store is unreachable.
#[derive(Clone, Debug)]
pub struct Entry {
    pub value: Cached,
    pub fresh_until: Millis,
}

struct EntryExpiry {
    stale_if_error: Duration,
    negative_ttl: Duration,
}

impl<K> Expiry<K, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &K, entry: &Entry, _: Instant) -> Option<Duration> {
        let now = now_millis();
        let until = |ms: Millis| Duration::from_millis(ms.saturating_sub(now).max(0) as u64);
        Some(match &entry.value {
            Cached::Unknown => self.negative_ttl,
            Cached::Found(p) => {
                let keep = until(entry.fresh_until) + self.stale_if_error;
                match p.valid_until() {
                    None => keep,
                    Some(v) => keep.min(until(v)),
                }
            }
        })
    }
}

#[derive(Clone, Debug)]
pub struct CacheSettings {
    pub capacity: u64,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_if_error: Duration,
}

/// Invalidations published by another instance sharing the store.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Invalidation {
    pub key_ids: Vec<Uuid>,
    pub hashes: Vec<KeyHash>,
    /// When the write was published (ms since the epoch), to measure propagation lag.
    pub published_at: Option<Millis>,
}

/// Where a shared store delivers invalidations made elsewhere.
pub trait InvalidationSink: Send + Sync + 'static {
    fn invalidate(&self, inv: &Invalidation);
    /// Called when invalidations may have been missed (a broken subscription reconnected).
    fn invalidate_all(&self);
}

#[derive(Clone)]
pub struct KeyCache {
    inner: Cache<KeyHash, Entry, DigestHasher>,
    /// The same principals by key id, for tokens (which name the key, not its hash).
    by_id: Cache<Uuid, Entry>,
    ttl: Duration,
    /// Bumped by every invalidation, so a fill that read the store before an invalidation
    /// cannot leave its (old) answer behind.
    epoch: Arc<AtomicU64>,
}

impl KeyCache {
    pub fn new(settings: &CacheSettings) -> Self {
        let inner = Cache::builder()
            .max_capacity(settings.capacity)
            .expire_after(EntryExpiry {
                stale_if_error: settings.stale_if_error,
                negative_ttl: settings.negative_ttl,
            })
            .build_with_hasher(DigestHasher(0));
        let by_id = Cache::builder()
            .max_capacity(settings.capacity)
            .expire_after(EntryExpiry {
                stale_if_error: settings.stale_if_error,
                negative_ttl: settings.negative_ttl,
            })
            .build();
        Self {
            inner,
            by_id,
            ttl: settings.ttl,
            epoch: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn get(&self, hash: &KeyHash) -> Option<Entry> {
        self.inner.get(hash)
    }

    /// The current invalidation epoch; pass it to [`KeyCache::insert`] after a store read.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Caches `value`, fresh for the TTL from `now`, unless an invalidation happened since
    /// `epoch` was read (then the value may be outdated and is dropped).
    pub fn insert(&self, hash: KeyHash, value: Cached, now: Millis, epoch: u64) {
        let fresh_until = now + self.ttl.as_millis() as i64;
        self.inner.insert(hash, Entry { value, fresh_until });
        if self.epoch.load(Ordering::Acquire) != epoch {
            self.inner.invalidate(&hash);
        }
    }

    pub fn invalidate(&self, hash: &KeyHash) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.inner.invalidate(hash);
    }

    pub fn get_id(&self, id: &Uuid) -> Option<Entry> {
        self.by_id.get(id)
    }

    /// Like [`KeyCache::insert`], by key id.
    pub fn insert_id(&self, id: Uuid, value: Cached, now: Millis, epoch: u64) {
        let fresh_until = now + self.ttl.as_millis() as i64;
        self.by_id.insert(id, Entry { value, fresh_until });
        if self.epoch.load(Ordering::Acquire) != epoch {
            self.by_id.invalidate(&id);
        }
    }

    pub fn invalidate_id(&self, id: &Uuid) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.by_id.invalidate(id);
    }

    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.inner.invalidate_all();
        self.by_id.invalidate_all();
    }

    /// Entries currently held (runs pending maintenance first).
    pub fn entry_count(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }
}

impl InvalidationSink for KeyCache {
    fn invalidate(&self, inv: &Invalidation) {
        for h in &inv.hashes {
            KeyCache::invalidate(self, h);
        }
        for id in &inv.key_ids {
            self.invalidate_id(id);
        }
    }

    fn invalidate_all(&self) {
        KeyCache::invalidate_all(self);
    }
}
