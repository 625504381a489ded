//! The key cache: SHA-256 of a key → the principal it authenticates, or "unknown"; and the same
//! principals by key id, for tokens.
//!
//! Positive entries are fresh for the configured TTL (less up to a tenth, by key, so keys
//! cached together are not all revalidated in the same moment), then kept for
//! `stale_if_error` more in case the store is down, but never past the key's own expiry or the
//! end of a rotation grace period; negative entries (unknown hashes) live for a short TTL so a
//! flood of made-up keys costs one store lookup per distinct key per TTL. Every admin write
//! invalidates the hashes it touched before it answers.
//!
//! The table is a set of hash maps behind reader-writer locks, sharded by digest bits: a hit is
//! one shared lock, one probe and one reference-count increment, and an entry costs its key
//! and 16 bytes (the principal pointer and its freshness) in the map. Capacity is enforced per
//! shard: a full shard first drops what has expired, then the least recently used tenth of its
//! entries (by the principal's last use). Expired entries are also swept periodically.
//!
//! Freshness is judged on the [`Clock`] the cache is given; the authenticator reads the same
//! one ([`KeyCache::clock`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use uuid::Uuid;

use super::{KeyHash, Millis, Principal};
use crate::clock::Clock;

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

/// How long past its TTL a key is still served at once while one background lookup
/// revalidates it (never longer than the TTL itself).
pub const REVALIDATE_WINDOW_MS: Millis = 10_000;

/// How long entries live, in milliseconds.
#[derive(Clone, Copy, Debug)]
struct Lifetimes {
    ttl: Millis,
    negative_ttl: Millis,
    stale_if_error: Millis,
}

impl Lifetimes {
    /// When `entry` is dropped: a negative entry after the negative TTL, a positive one after
    /// `stale_if_error` past its freshness. A key past its end (its expiry, an old secret's
    /// grace) stays cached like a disabled one: every use of it is refused by its status check,
    /// from the cache (dropped at its end, it cost a store lookup per request, and no
    /// failed-authentication limit counts an expired key).
    fn expires_at(&self, entry: &Entry) -> Millis {
        match &entry.value {
            Cached::Unknown => entry.fresh_until - self.ttl + self.negative_ttl,
            Cached::Found(_) => entry.fresh_until + self.stale_if_error,
        }
    }

    /// How recently `entry` was used (for eviction): its principal's last use, else when it
    /// was cached.
    fn recency(&self, entry: &Entry) -> Millis {
        let cached = entry.fresh_until - self.ttl;
        match &entry.value {
            Cached::Found(p) => p.usage.last_used().max(cached),
            Cached::Unknown => cached,
        }
    }
}

/// How many shards a table of `capacity` entries gets: one per 4,096 entries, 1 to 64, a power
/// of two (a shard is then picked by a mask).
pub(crate) fn shard_count(capacity: usize) -> usize {
    (capacity / 4096).clamp(1, 64).next_power_of_two()
}

/// Which shard a key belongs to (bits its map's hash does not use).
pub(crate) trait ShardKey: Eq + Hash + Copy {
    fn shard_bits(&self) -> usize;
}

impl ShardKey for KeyHash {
    fn shard_bits(&self) -> usize {
        usize::from(u16::from_le_bytes([self.0[8], self.0[9]]))
    }
}

impl ShardKey for Uuid {
    fn shard_bits(&self) -> usize {
        // The last bytes of a v7 id are random.
        let b = self.as_bytes();
        usize::from(u16::from_le_bytes([b[14], b[15]]))
    }
}

/// One map of the cache, in shards.
struct Table<K, S> {
    shards: Box<[RwLock<HashMap<K, Entry, S>>]>,
    per_shard: usize,
    lifetimes: Lifetimes,
}

impl<K: ShardKey, S: BuildHasher + Default> Table<K, S> {
    fn new(capacity: u64, lifetimes: Lifetimes) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX).max(1);
        let shards = shard_count(capacity);
        Self {
            shards: (0..shards)
                .map(|_| RwLock::new(HashMap::default()))
                .collect(),
            per_shard: capacity.div_ceil(shards),
            lifetimes,
        }
    }

    fn shard(&self, k: &K) -> &RwLock<HashMap<K, Entry, S>> {
        &self.shards[k.shard_bits() & (self.shards.len() - 1)]
    }

    fn get(&self, k: &K, now: Millis) -> Option<Entry> {
        let shard = self.shard(k).read().unwrap_or_else(PoisonError::into_inner);
        let e = shard.get(k)?;
        (now < self.lifetimes.expires_at(e)).then(|| e.clone())
    }

    fn insert(&self, k: K, entry: Entry, now: Millis) {
        let mut shard = self
            .shard(&k)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.per_shard && !shard.contains_key(&k) {
            self.make_room(&mut shard, now);
        }
        shard.insert(k, entry);
    }

    /// Drops what has expired; if that is not enough, the least recently used tenth.
    fn make_room(&self, shard: &mut HashMap<K, Entry, S>, now: Millis) {
        let l = self.lifetimes;
        shard.retain(|_, e| now < l.expires_at(e));
        if shard.len() < self.per_shard {
            return;
        }
        let mut recency: Vec<Millis> = shard.values().map(|e| l.recency(e)).collect();
        let drop = (recency.len() / 10).max(1);
        let (_, &mut threshold, _) = recency.select_nth_unstable(drop - 1);
        // Everything older than the threshold goes, and of those as old, just enough.
        let older = recency.iter().filter(|&&r| r < threshold).count();
        let mut ties = drop - older;
        shard.retain(|_, e| {
            let r = l.recency(e);
            if r < threshold {
                return false;
            }
            if r == threshold && ties > 0 {
                ties -= 1;
                return false;
            }
            true
        });
    }

    fn remove(&self, k: &K) {
        self.shard(k)
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(k);
    }

    /// Drops the negative entries and makes every positive one stale as of `before` at the
    /// latest.
    fn expire_all(&self, before: Millis) {
        for s in self.shards.iter() {
            let mut shard = s.write().unwrap_or_else(PoisonError::into_inner);
            shard.retain(|_, e| match e.value {
                Cached::Found(_) => {
                    e.fresh_until = e.fresh_until.min(before);
                    true
                }
                Cached::Unknown => false,
            });
        }
    }

    /// Drops the expired entries of shard `i` (a no-op past the last shard).
    fn sweep(&self, i: usize, now: Millis) {
        let Some(shard) = self.shards.get(i) else {
            return;
        };
        let l = self.lifetimes;
        let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
        shard.retain(|_, e| now < l.expires_at(e));
        if shard.capacity() > 4 * shard.len().max(64) {
            shard.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[derive(Clone)]
pub struct KeyCache {
    inner: Arc<Table<KeyHash, DigestHasher>>,
    /// The same principals by key id, for tokens (which name the key, not its hash).
    by_id: Arc<Table<Uuid, std::hash::RandomState>>,
    lifetimes: Lifetimes,
    /// Bumped by every invalidation, so a fill that read the store before an invalidation
    /// cannot leave its (old) answer behind.
    epoch: Arc<AtomicU64>,
    clock: Clock,
}

impl KeyCache {
    pub fn new(settings: &CacheSettings, clock: Clock) -> Self {
        let ms = |d: Duration| d.as_millis() as Millis;
        let lifetimes = Lifetimes {
            ttl: ms(settings.ttl),
            negative_ttl: ms(settings.negative_ttl),
            stale_if_error: ms(settings.stale_if_error),
        };
        Self {
            inner: Arc::new(Table::new(settings.capacity, lifetimes)),
            by_id: Arc::new(Table::new(settings.capacity, lifetimes)),
            lifetimes,
            epoch: Arc::new(AtomicU64::new(0)),
            clock,
        }
    }

    /// The clock entries are judged by.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn get(&self, hash: &KeyHash) -> Option<Entry> {
        self.get_at(hash, self.clock.now_millis())
    }

    /// The entry for `hash` at time `now`, unless it has expired.
    pub fn get_at(&self, hash: &KeyHash, now: Millis) -> Option<Entry> {
        self.inner.get(hash, now)
    }

    /// The current invalidation epoch; pass it to [`KeyCache::insert`] after a store read.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn ttl_millis(&self) -> Millis {
        self.lifetimes.ttl
    }

    /// Until when a key cached at `now` is fresh: the TTL less up to a tenth of it, by the
    /// key's `spread` byte, so keys cached together (at startup, after a flush) are not all
    /// revalidated in the same moment.
    fn fresh_until(&self, now: Millis, value: &Cached, spread: u8) -> Millis {
        let ttl = self.lifetimes.ttl;
        match value {
            Cached::Found(_) => now + ttl - ttl * Millis::from(spread) / 2560,
            Cached::Unknown => now + ttl,
        }
    }

    /// Caches `value`, fresh for the TTL from `now`, unless an invalidation happened since
    /// `epoch` was read (then the value may be outdated and is dropped).
    pub fn insert(&self, hash: KeyHash, value: Cached, now: Millis, epoch: u64) {
        let fresh_until = self.fresh_until(now, &value, hash.0[10]);
        self.inner.insert(hash, Entry { value, fresh_until }, now);
        if self.epoch.load(Ordering::Acquire) != epoch {
            self.inner.remove(&hash);
        }
    }

    pub fn invalidate(&self, hash: &KeyHash) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.inner.remove(hash);
    }

    pub fn get_id(&self, id: &Uuid) -> Option<Entry> {
        self.by_id.get(id, self.clock.now_millis())
    }

    /// Like [`KeyCache::insert`], by key id.
    pub fn insert_id(&self, id: Uuid, value: Cached, now: Millis, epoch: u64) {
        let fresh_until = self.fresh_until(now, &value, id.as_bytes()[13]);
        self.by_id.insert(id, Entry { value, fresh_until }, now);
        if self.epoch.load(Ordering::Acquire) != epoch {
            self.by_id.remove(&id);
        }
    }

    pub fn invalidate_id(&self, id: &Uuid) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.by_id.remove(id);
    }

    /// Invalidations may have been missed (a broken subscription came back): no cached answer
    /// is served again before the store confirms it. Unknown-key entries are dropped; a known
    /// key is made stale past the window in which a key is served while it is revalidated
    /// ([`REVALIDATE_WINDOW_MS`]), so the next request with it asks the store, and a key revoked
    /// meanwhile is refused. It stays as the stale fallback only for when the store does not
    /// answer (within `stale_if_error`), as after its TTL: a failover of the store right after
    /// a reconnection does not turn every cached key into a 503.
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let window = REVALIDATE_WINDOW_MS.min(self.lifetimes.ttl);
        let before = self.clock.now_millis() - window;
        self.inner.expire_all(before);
        self.by_id.expire_all(before);
    }

    /// Parts of [`KeyCache::sweep_shard`].
    pub fn shards(&self) -> usize {
        self.inner.shards.len().max(self.by_id.shards.len())
    }

    /// Drops the expired entries of one part of the cache.
    pub fn sweep_shard(&self, shard: usize, now: Millis) {
        self.inner.sweep(shard, now);
        self.by_id.sweep(shard, now);
    }

    /// Entries currently held by hash.
    pub fn entry_count(&self) -> u64 {
        self.inner.len() as u64
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    fn cache(negative_ttl: Duration, capacity: u64) -> (KeyCache, FakeClock) {
        let clock = FakeClock::new();
        let c = KeyCache::new(
            &CacheSettings {
                capacity,
                ttl: Duration::from_secs(60),
                negative_ttl,
                stale_if_error: Duration::from_secs(60),
            },
            clock.clock(),
        );
        (c, clock)
    }

    fn hash(i: u32) -> KeyHash {
        KeyHash::of(&format!("key-{i}"))
    }

    #[test]
    fn invalidation_and_replacement() {
        let (c, clock) = cache(Duration::from_secs(60), 1000);
        let h = hash(1);
        c.insert(h, Cached::Unknown, clock.now_millis(), c.epoch());
        assert!(c.get(&h).is_some());
        c.invalidate(&h);
        assert!(c.get(&h).is_none(), "served after invalidation");

        c.insert(h, Cached::Unknown, clock.now_millis(), c.epoch());
        let first = c.get(&h).unwrap().fresh_until;
        c.insert(h, Cached::Unknown, first + 5_000, c.epoch());
        assert_eq!(c.get(&h).unwrap().fresh_until, first + 5_000 + 60_000);

        for i in 0..10 {
            c.insert(hash(i), Cached::Unknown, clock.now_millis(), c.epoch());
            assert!(c.get(&hash(i)).is_some());
        }
        c.invalidate_all();
        assert!((0..10).all(|i| c.get(&hash(i)).is_none()));
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_leaves_nothing() {
        let (c, clock) = cache(Duration::from_secs(60), 1000);
        let h = hash(3);
        let epoch = c.epoch();
        c.invalidate(&hash(4));
        c.insert(h, Cached::Unknown, clock.now_millis(), epoch);
        assert!(c.get(&h).is_none());
    }

    #[test]
    fn entries_expire() {
        let (c, clock) = cache(Duration::from_millis(100), 1000);
        let h = hash(2);
        c.insert(h, Cached::Unknown, clock.now_millis(), c.epoch());
        assert!(c.get(&h).is_some());
        clock.advance(Duration::from_millis(99));
        assert!(c.get(&h).is_some(), "negative entry dropped before its TTL");
        for s in 0..c.shards() {
            c.sweep_shard(s, clock.now_millis());
        }
        assert_eq!(c.entry_count(), 1, "live entry swept");
        clock.advance(Duration::from_millis(1));
        assert!(c.get(&h).is_none(), "negative entry served past its TTL");
        assert_eq!(c.entry_count(), 1);
        for s in 0..c.shards() {
            c.sweep_shard(s, clock.now_millis());
        }
        assert_eq!(c.entry_count(), 0, "expired entry not swept");
    }

    #[test]
    fn a_full_shard_of_equals_loses_a_tenth() {
        let (c, clock) = cache(Duration::from_secs(600), 1000);
        let now = clock.now_millis();
        for i in 0..1001u32 {
            c.insert(hash(i), Cached::Unknown, now, c.epoch());
        }
        assert_eq!(c.entry_count(), 901);
    }

    #[test]
    fn capacity_holds_and_the_least_recently_cached_go_first() {
        let (c, clock) = cache(Duration::from_secs(600), 10_000);
        let now = clock.now_millis();
        for i in 0..30_000u32 {
            c.insert(hash(i), Cached::Unknown, now + i64::from(i), c.epoch());
        }
        let held = c.entry_count();
        assert!((8_000..=10_000).contains(&held), "{held} held");
        // The newest are all there; the oldest are gone.
        assert!((29_000..30_000).all(|i| c.get_at(&hash(i), now + 30_000).is_some()));
        assert!((0..1_000).all(|i| c.get_at(&hash(i), now + 30_000).is_none()));
    }
}
