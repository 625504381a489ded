//! The key cache: SHA-256 of a key → the principal it authenticates, or "unknown".
//!
//! Positive entries are fresh for the configured TTL, then kept for `stale_if_error` more in
//! case the store is down, but never past the key's own expiry or the end of a rotation grace
//! period; negative entries (unknown hashes) live for a short TTL so a flood
//! of made-up keys costs one store lookup per distinct key per TTL. Every admin write
//! invalidates the hashes it touched before it answers.
//!
//! In front of the moka map sits a small lookaside table (2-way set-associative, indexed by the
//! digest's first bytes, at most 32,768 slots whatever the capacity). A moka `get` records the
//! read for its eviction policy and touches several scattered allocations: about 120 ns for a
//! hot key and about 1 µs when 10,000 keys rotate. A slot hit is one lock-free-for-readers
//! read of one set. Moka stays the owner of every entry (capacity, expiry); a slot only
//! mirrors an entry moka returned, never outlives moka's own expiry for it, and is dropped by
//! every insert and invalidation of its hash (see [`KeyCache::get_at`] for the ordering).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
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

/// One lookaside slot: a copy of what moka returned for `hash`, usable until `until`.
#[derive(Clone)]
struct Slot {
    hash: KeyHash,
    entry: Entry,
    /// When moka drops the entry (its expiry, computed the same way): never served past it.
    until: Millis,
}

/// Most sets in the lookaside table (two slots each).
const LOOKASIDE_MAX_SETS: usize = 16_384;

struct Lookaside {
    sets: Box<[RwLock<[Option<Slot>; 2]>]>,
    mask: usize,
    /// Bumped after moka dropped or replaced an entry and before the slots are cleared, so a
    /// concurrent `get_at` that read the old entry from moka does not store it.
    epoch: AtomicU64,
}

impl Lookaside {
    fn new(capacity: u64) -> Self {
        let sets = usize::try_from(capacity / 2)
            .unwrap_or(usize::MAX)
            .clamp(64, LOOKASIDE_MAX_SETS)
            .next_power_of_two();
        Self {
            sets: (0..sets).map(|_| RwLock::new([None, None])).collect(),
            mask: sets - 1,
            epoch: AtomicU64::new(0),
        }
    }

    fn set(&self, hash: &KeyHash) -> &RwLock<[Option<Slot>; 2]> {
        let mut b = [0u8; 8];
        b.copy_from_slice(&hash.0[..8]);
        &self.sets[u64::from_le_bytes(b) as usize & self.mask]
    }

    /// Forgets `hash` (call after moka has dropped or replaced it).
    fn forget(&self, hash: &KeyHash) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut set = self
            .set(hash)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for slot in set.iter_mut() {
            if slot.as_ref().is_some_and(|s| s.hash == *hash) {
                *slot = None;
            }
        }
    }

    fn forget_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for set in &self.sets {
            *set.write().unwrap_or_else(PoisonError::into_inner) = [None, None];
        }
    }
}

#[derive(Clone)]
pub struct KeyCache {
    inner: Cache<KeyHash, Entry, DigestHasher>,
    lookaside: Arc<Lookaside>,
    /// The same principals by key id, for tokens (which name the key, not its hash).
    by_id: Cache<Uuid, Entry>,
    ttl: Duration,
    negative_ttl: Duration,
    stale_if_error: Duration,
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
            lookaside: Arc::new(Lookaside::new(settings.capacity)),
            by_id,
            ttl: settings.ttl,
            negative_ttl: settings.negative_ttl,
            stale_if_error: settings.stale_if_error,
            epoch: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn get(&self, hash: &KeyHash) -> Option<Entry> {
        self.get_at(hash, now_millis())
    }

    /// The entry for `hash` at time `now`: from the lookaside table, else from moka (and then
    /// remembered in the table).
    ///
    /// Ordering against [`KeyCache::invalidate`], which drops the moka entry, then bumps the
    /// lookaside epoch, then clears the slot under the set's write lock: the epoch is read
    /// before moka and checked again under that lock before storing. Either the check sees the
    /// bump (nothing is stored), or the invalidation takes the lock afterwards and clears it.
    pub fn get_at(&self, hash: &KeyHash, now: Millis) -> Option<Entry> {
        let set = self.lookaside.set(hash);
        {
            let slots = set.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(s) = slots.iter().flatten().find(|s| s.hash == *hash)
                && now < s.until
            {
                return Some(s.entry.clone());
            }
        }
        let epoch = self.lookaside.epoch.load(Ordering::SeqCst);
        let entry = self.inner.get(hash)?;
        let until = self.expires_at(&entry);
        if now < until {
            let mut slots = set.write().unwrap_or_else(PoisonError::into_inner);
            if self.lookaside.epoch.load(Ordering::SeqCst) == epoch {
                let way = slots
                    .iter()
                    .position(|s| s.as_ref().is_some_and(|s| s.hash == *hash))
                    .or_else(|| slots.iter().position(Option::is_none))
                    .unwrap_or(usize::from(hash.0[8] & 1));
                slots[way] = Some(Slot {
                    hash: *hash,
                    entry: entry.clone(),
                    until,
                });
            }
        }
        Some(entry)
    }

    /// When moka drops `entry` ([`EntryExpiry`] from its insertion time `fresh_until - ttl`).
    fn expires_at(&self, entry: &Entry) -> Millis {
        let ms = |d: Duration| d.as_millis() as Millis;
        match &entry.value {
            Cached::Unknown => entry.fresh_until - ms(self.ttl) + ms(self.negative_ttl),
            Cached::Found(p) => {
                let keep = entry.fresh_until + ms(self.stale_if_error);
                p.valid_until().map_or(keep, |v| keep.min(v))
            }
        }
    }

    /// The current invalidation epoch; pass it to [`KeyCache::insert`] after a store read.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn ttl_millis(&self) -> Millis {
        self.ttl.as_millis() as Millis
    }

    /// Until when a key cached at `now` is fresh: the TTL less up to a tenth of it, by the
    /// key's `spread` byte, so keys cached together (at startup, after a flush) are not all
    /// revalidated in the same moment.
    fn fresh_until(&self, now: Millis, value: &Cached, spread: u8) -> Millis {
        let ttl = self.ttl_millis();
        match value {
            Cached::Found(_) => now + ttl - ttl * Millis::from(spread) / 2560,
            Cached::Unknown => now + ttl,
        }
    }

    /// Caches `value`, fresh for the TTL from `now`, unless an invalidation happened since
    /// `epoch` was read (then the value may be outdated and is dropped).
    pub fn insert(&self, hash: KeyHash, value: Cached, now: Millis, epoch: u64) {
        let fresh_until = self.fresh_until(now, &value, hash.0[9]);
        self.inner.insert(hash, Entry { value, fresh_until });
        if self.epoch.load(Ordering::Acquire) != epoch {
            self.inner.invalidate(&hash);
        }
        self.lookaside.forget(&hash);
    }

    pub fn invalidate(&self, hash: &KeyHash) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.inner.invalidate(hash);
        self.lookaside.forget(hash);
    }

    pub fn get_id(&self, id: &Uuid) -> Option<Entry> {
        self.by_id.get(id)
    }

    /// Like [`KeyCache::insert`], by key id.
    pub fn insert_id(&self, id: Uuid, value: Cached, now: Millis, epoch: u64) {
        let fresh_until = self.fresh_until(now, &value, id.as_bytes()[15]);
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
        self.lookaside.forget_all();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(negative_ttl: Duration) -> KeyCache {
        KeyCache::new(&CacheSettings {
            capacity: 1000,
            ttl: Duration::from_secs(60),
            negative_ttl,
            stale_if_error: Duration::from_secs(60),
        })
    }

    fn hash(i: u8) -> KeyHash {
        KeyHash([i; 32])
    }

    #[test]
    fn invalidation_and_replacement_reach_the_lookaside_table() {
        let c = cache(Duration::from_secs(60));
        let h = hash(1);
        c.insert(h, Cached::Unknown, now_millis(), c.epoch());
        // Twice: the first fills the lookaside slot, the second is served from it.
        assert!(c.get(&h).is_some());
        assert!(c.get(&h).is_some());
        c.invalidate(&h);
        assert!(c.get(&h).is_none(), "served after invalidation");

        c.insert(h, Cached::Unknown, now_millis(), c.epoch());
        let first = c.get(&h).unwrap().fresh_until;
        c.insert(h, Cached::Unknown, first + 5_000, c.epoch());
        assert_eq!(c.get(&h).unwrap().fresh_until, first + 5_000 + 60_000);

        for i in 0..10 {
            c.insert(hash(i), Cached::Unknown, now_millis(), c.epoch());
            assert!(c.get(&hash(i)).is_some());
        }
        c.invalidate_all();
        assert!((0..10).all(|i| c.get(&hash(i)).is_none()));
    }

    #[test]
    fn a_slot_never_outlives_the_moka_entry() {
        let c = cache(Duration::from_millis(100));
        let h = hash(2);
        c.insert(h, Cached::Unknown, now_millis(), c.epoch());
        assert!(c.get(&h).is_some());
        std::thread::sleep(Duration::from_millis(150));
        assert!(c.get(&h).is_none(), "negative entry served past its TTL");
    }
}
