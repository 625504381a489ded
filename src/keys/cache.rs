//! The key cache: SHA-256 of a key → the principal it authenticates, or "unknown".
//!
//! Positive entries live for the configured TTL but never past the key's own expiry or the end
//! of a rotation grace period; negative entries (unknown hashes) live for a short TTL so a flood
//! of made-up keys costs one store lookup per distinct key per TTL. Every admin write
//! invalidates the hashes it touched before it answers.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;

use super::{KeyHash, Principal, now_millis};

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

struct EntryExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Expiry<KeyHash, Cached> for EntryExpiry {
    fn expire_after_create(&self, _: &KeyHash, value: &Cached, _: Instant) -> Option<Duration> {
        Some(match value {
            Cached::Unknown => self.negative_ttl,
            Cached::Found(p) => match p.valid_until() {
                None => self.ttl,
                Some(until) => {
                    let left = until.saturating_sub(now_millis()).max(0) as u64;
                    self.ttl.min(Duration::from_millis(left))
                }
            },
        })
    }
}

#[derive(Clone, Debug)]
pub struct CacheSettings {
    pub capacity: u64,
    pub ttl: Duration,
    pub negative_ttl: Duration,
}

#[derive(Clone)]
pub struct KeyCache {
    inner: Cache<KeyHash, Cached, DigestHasher>,
}

impl KeyCache {
    pub fn new(settings: &CacheSettings) -> Self {
        let inner = Cache::builder()
            .max_capacity(settings.capacity)
            .expire_after(EntryExpiry {
                ttl: settings.ttl,
                negative_ttl: settings.negative_ttl,
            })
            .build_with_hasher(DigestHasher(0));
        Self { inner }
    }

    pub fn get(&self, hash: &KeyHash) -> Option<Cached> {
        self.inner.get(hash)
    }

    pub fn insert(&self, hash: KeyHash, value: Cached) {
        self.inner.insert(hash, value);
    }

    pub fn invalidate(&self, hash: &KeyHash) {
        self.inner.invalidate(hash);
    }

    pub fn invalidate_all(&self) {
        self.inner.invalidate_all();
    }

    /// Entries currently held (approximate until pending maintenance has run).
    pub fn entry_count(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }
}
