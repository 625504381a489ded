//! Rate limits: GCRA, one bucket per API key id, whichever credential form is used.
//!
//! A key's limit is its own override, else its client's plan, else the default. The bucket is
//! looked up in a registry only when the key cache is filled (a miss); the principal then holds
//! it, so a request touches no map and takes no lock. A key's bucket ([`crate::keys::bucket`])
//! is one atomic word (the theoretical arrival time of GCRA), its two constants and the clock,
//! about 60 bytes. The registry drops a bucket once no cached principal holds it and it is
//! full again: a full bucket and a new one are the same, so nothing is lost and memory does not
//! grow with keys that went idle. Limits are per instance.
//!
//! Failed authentications and per-route limits use governor's keyed limiters; failed
//! authentications are limited per peer IP: past the allowance every request from that IP gets
//! 429 until the bucket allows another attempt, so keys cannot be guessed at line rate.
//!
//! Every limit reads the [`Clock`] it is given (governor's limiters through it as well), so
//! tests move a fake clock instead of waiting.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use uuid::Uuid;

use crate::clock::Clock;
use crate::keys::RateLimit;
pub use crate::keys::allowance::Quota as PlanQuota;
pub use crate::keys::allowance::Scope;
use crate::keys::bucket::emission_interval;
pub use crate::keys::bucket::{KeyLimiter, RateInfo, Refusal};
use crate::keys::cluster::{ClusterBucket, ClusterShared};

/// The governor quota for a limit (the same emission interval and burst as a key's bucket).
pub fn quota(limit: &RateLimit) -> Quota {
    let burst = NonZeroU32::new(limit.burst.max(1)).expect("at least 1");
    Quota::with_period(emission_interval(limit))
        .expect("non-zero period")
        .allow_burst(burst)
}

/// The clock as governor reads it: monotonic nanoseconds.
#[derive(Clone)]
struct GovernorClock(Clock);

impl governor::clock::Clock for GovernorClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.0.mono_nanos())
    }
}

/// Shards of the bucket registry (a fill locks one).
const REGISTRY_SHARDS: usize = 64;

type RegistryShard = Mutex<HashMap<Uuid, Arc<KeyLimiter>>>;

type ClientShard = Mutex<HashMap<Box<str>, Arc<KeyLimiter>>>;

/// Key buckets by key id, client buckets by client id, and the limit each gets.
pub struct KeyLimits {
    registry: Box<[RegistryShard]>,
    /// Buckets of plans whose limit is client-wide ([`Scope::Client`]).
    clients: Box<[ClientShard]>,
    plans: HashMap<String, Option<RateLimit>>,
    /// Plans whose limit is per key ([`Scope::Key`]); every other license is client-wide.
    key_scoped: HashSet<String>,
    quotas: HashMap<String, PlanQuota>,
    /// `[rate_limit] mode = "cluster"`: plan buckets are shared through Redis.
    cluster: Option<Arc<ClusterShared>>,
    /// Stands in for a key's own bucket when the key has none and the plan's bucket is the
    /// cluster's (it never refuses).
    unlimited: Arc<KeyLimiter>,
    default: RateLimit,
    /// The clock every bucket reads.
    clock: Clock,
}

/// The buckets a key's requests draw from.
pub struct Buckets {
    /// The key's own bucket, or its client's when the key has no limit of its own.
    pub first: Arc<KeyLimiter>,
    /// The client's bucket under a key's own limit (client-wide plans only).
    pub client: Option<Arc<KeyLimiter>>,
    /// The plan's bucket shared by the cluster (cluster mode; `first` is then the key's own
    /// limit or a bucket that never refuses, and `client` is none).
    pub cluster: Option<Arc<ClusterBucket>>,
}

impl KeyLimits {
    pub fn new(
        default: RateLimit,
        plans: HashMap<String, Option<RateLimit>>,
        clock: Clock,
    ) -> Self {
        Self {
            registry: (0..REGISTRY_SHARDS).map(|_| Mutex::default()).collect(),
            clients: (0..REGISTRY_SHARDS).map(|_| Mutex::default()).collect(),
            plans,
            key_scoped: HashSet::new(),
            quotas: HashMap::new(),
            cluster: None,
            unlimited: Arc::new(KeyLimiter::new(
                RateLimit {
                    per_second: Some(u32::MAX),
                    per_minute: None,
                    per_hour: None,
                    burst: u32::MAX,
                },
                clock.clone(),
            )),
            default,
            clock,
        }
    }

    /// Shares the plans' buckets across instances through `shared` (cluster mode).
    pub fn with_cluster(mut self, shared: Arc<ClusterShared>) -> Self {
        self.cluster = Some(shared);
        self
    }

    /// Sets each plan's scope and quota (plans not named: client-wide, no quota).
    pub fn with_plan_terms(
        mut self,
        terms: impl IntoIterator<Item = (String, Scope, Option<PlanQuota>)>,
    ) -> Self {
        for (plan, scope, quota) in terms {
            if scope == Scope::Key {
                self.key_scoped.insert(plan.clone());
            }
            if let Some(q) = quota {
                self.quotas.insert(plan, q);
            }
        }
        self
    }

    /// The scope of `license`'s rate limit.
    pub fn scope(&self, license: &str) -> Scope {
        if self.key_scoped.contains(license) {
            Scope::Key
        } else {
            Scope::Client
        }
    }

    /// The quota of `license`, if its plan has one.
    pub fn quota(&self, license: &str) -> Option<PlanQuota> {
        self.quotas.get(license).copied()
    }

    /// The buckets of a key (called on key-cache fills only). Per-key plans: the key's
    /// override, else the plan's limit, in the key's bucket. Client-wide plans: the plan's
    /// limit in the client's bucket, shared by all its keys (a key deleted and created again
    /// finds it as it was), and a key's own override in the key's bucket on top of it.
    pub fn buckets(
        &self,
        key_id: Uuid,
        client_id: &str,
        key_override: Option<RateLimit>,
        license: &str,
    ) -> Buckets {
        if let Some(shared) = &self.cluster {
            return match self.scope(license) {
                Scope::Key => Buckets {
                    first: Arc::clone(&self.unlimited),
                    client: None,
                    cluster: Some(
                        shared.bucket(&format!("k:{key_id}"), self.resolve(key_override, license)),
                    ),
                },
                Scope::Client => Buckets {
                    first: match key_override {
                        Some(own) => self.bucket(key_id, own),
                        None => Arc::clone(&self.unlimited),
                    },
                    client: None,
                    cluster: Some(
                        shared.bucket(&format!("c:{client_id}"), self.resolve(None, license)),
                    ),
                },
            };
        }
        match self.scope(license) {
            Scope::Key => Buckets {
                first: self.bucket(key_id, self.resolve(key_override, license)),
                client: None,
                cluster: None,
            },
            Scope::Client => {
                let client = self.client_bucket(client_id, self.resolve(None, license));
                match key_override {
                    Some(own) => Buckets {
                        first: self.bucket(key_id, own),
                        client: Some(client),
                        cluster: None,
                    },
                    None => Buckets {
                        first: client,
                        client: None,
                        cluster: None,
                    },
                }
            }
        }
    }

    /// The bucket of client `client_id` with `limit` (kept when the limit is the same).
    pub fn client_bucket(&self, client_id: &str, limit: RateLimit) -> Arc<KeyLimiter> {
        let shard = &self.clients[shard_of_name(client_id)];
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        match shard.get(client_id) {
            Some(b) if b.enforces(&limit) => Arc::clone(b),
            _ => {
                let b = Arc::new(KeyLimiter::new(limit, self.clock.clone()));
                shard.insert(client_id.into(), Arc::clone(&b));
                b
            }
        }
    }

    /// The limit for a key: its override, else its plan's, else the default.
    pub fn resolve(&self, key_override: Option<RateLimit>, license: &str) -> RateLimit {
        key_override
            .or_else(|| self.plans.get(license).copied().flatten())
            .unwrap_or(self.default)
    }

    fn shard(&self, key_id: &Uuid) -> &RegistryShard {
        // The last bytes of a v7 id are random.
        &self.registry[usize::from(key_id.as_bytes()[15]) % REGISTRY_SHARDS]
    }

    /// The bucket for `key_id` with `limit`; an existing bucket is kept when its limit is the
    /// same, replaced (full) when the limit changed. Called on key-cache fills only.
    pub fn bucket(&self, key_id: Uuid, limit: RateLimit) -> Arc<KeyLimiter> {
        let mut shard = self
            .shard(&key_id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match shard.get(&key_id) {
            Some(b) if b.enforces(&limit) => Arc::clone(b),
            _ => {
                let b = Arc::new(KeyLimiter::new(limit, self.clock.clone()));
                shard.insert(key_id, Arc::clone(&b));
                b
            }
        }
    }

    /// Drops the buckets of one shard that no principal holds and that are full again.
    pub fn sweep_shard(&self, i: usize) {
        let Some(shard) = self.registry.get(i) else {
            return;
        };
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        shard.retain(|_, b| Arc::strong_count(b) > 1 || !b.is_full());
        if shard.capacity() > 4 * shard.len().max(16) {
            shard.shrink_to_fit();
        }
        drop(shard);
        let mut clients = self.clients[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        clients.retain(|_, b| Arc::strong_count(b) > 1 || !b.is_full());
        if clients.capacity() > 4 * clients.len().max(16) {
            clients.shrink_to_fit();
        }
    }

    pub fn shards(&self) -> usize {
        REGISTRY_SHARDS
    }

    /// Buckets currently held.
    pub fn len(&self) -> usize {
        self.registry
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum::<usize>()
            + self
                .clients
                .iter()
                .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
                .sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The shard of a client id (FNV-1a: stable, cheap, good enough to spread names).
fn shard_of_name(name: &str) -> usize {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h % REGISTRY_SHARDS as u64) as usize
}

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, GovernorClock, NoOpMiddleware<Nanos>>;

impl<K: std::hash::Hash + Eq + Clone> std::fmt::Debug for KeyedLimit<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimit")
            .field("limit", &self.limit)
            .finish()
    }
}

/// A limit shared by many keys of one kind (a route's per-key limit, failed attempts per IP).
pub struct KeyedLimit<K: std::hash::Hash + Eq + Clone> {
    limit: RateLimit,
    limiter: Keyed<K>,
    clock: Clock,
}

impl<K: std::hash::Hash + Eq + Clone> KeyedLimit<K> {
    pub fn new(limit: RateLimit, clock: Clock) -> Self {
        Self {
            limit,
            limiter: RateLimiter::dashmap_with_clock(quota(&limit), GovernorClock(clock.clone())),
            clock,
        }
    }

    pub fn check(&self, key: &K) -> Result<(), Refusal> {
        self.limiter.check_key(key).map_err(|not_until| {
            let retry_after = not_until.wait_time_from(Nanos::from(self.clock.mono_nanos()));
            Refusal {
                limit: self.limit.burst,
                retry_after,
                full_after: retry_after.saturating_add(
                    emission_interval(&self.limit)
                        .saturating_mul(self.limit.burst.saturating_sub(1)),
                ),
            }
        })
    }

    /// Drops state of keys whose buckets are full again (bounded memory).
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// The address a client is counted by: an IPv4 address (also written IPv4-mapped) itself, an
/// IPv6 address its /64 (one host usually holds a whole /64, and picks any address in it).
pub fn client_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !u128::from(u64::MAX),
            )),
        },
    }
}

/// Failed authentications per client address ([`client_group`]). Only failing attempts are ever counted or
/// refused: nothing is looked up for a request that authenticates.
pub struct FailedAuth {
    attempts: KeyedLimit<IpAddr>,
}

impl FailedAuth {
    pub fn new(limit: RateLimit, clock: Clock) -> Self {
        Self {
            attempts: KeyedLimit::new(limit, clock),
        }
    }

    /// Records a failed attempt; `Some(wait)` when `ip`'s [`client_group`] is over its
    /// allowance (the attempt is then refused with 429 and `Retry-After: wait`).
    pub fn record_failure(&self, ip: IpAddr) -> Option<Duration> {
        self.attempts
            .check(&client_group(ip))
            .err()
            .map(|r| r.retry_after)
    }

    pub fn sweep(&self) {
        self.attempts.sweep();
    }

    pub fn tracked_ips(&self) -> usize {
        self.attempts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    use crate::keys::testing::per_second;

    #[test]
    fn resolution_order_and_bucket_reuse() {
        let plans = HashMap::from([
            ("pro".to_string(), Some(per_second(50, 50))),
            ("bare".to_string(), None),
        ]);
        let limits = KeyLimits::new(per_second(1, 1), plans, FakeClock::new().clock());
        let own = per_second(7, 7);
        assert_eq!(limits.resolve(Some(own), "pro"), own);
        assert_eq!(limits.resolve(None, "pro"), per_second(50, 50));
        assert_eq!(limits.resolve(None, "bare"), per_second(1, 1));
        assert_eq!(limits.resolve(None, "unknown"), per_second(1, 1));

        let id = Uuid::now_v7();
        let a = limits.bucket(id, own);
        let b = limits.bucket(id, own);
        assert!(
            Arc::ptr_eq(&a, &b),
            "same limit keeps the bucket (and its state)"
        );
        let c = limits.bucket(id, per_second(8, 8));
        assert!(!Arc::ptr_eq(&a, &c), "a changed limit gets a new bucket");
    }

    #[test]
    fn a_client_wide_plan_shares_one_bucket_and_a_per_key_plan_does_not() {
        let plans = HashMap::from([
            ("team".to_string(), Some(per_second(10, 10))),
            ("solo".to_string(), Some(per_second(10, 10))),
        ]);
        let limits = KeyLimits::new(per_second(1, 1), plans, FakeClock::new().clock())
            .with_plan_terms([("solo".to_string(), Scope::Key, None)]);
        assert_eq!(limits.scope("team"), Scope::Client);
        assert_eq!(limits.scope("unknown"), Scope::Client);
        assert_eq!(limits.scope("solo"), Scope::Key);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let ba = limits.buckets(a, "c", None, "team");
        let bb = limits.buckets(b, "c", None, "team");
        assert!(
            Arc::ptr_eq(&ba.first, &bb.first),
            "two keys, one client bucket"
        );
        assert!(ba.client.is_none());
        let other = limits.buckets(Uuid::now_v7(), "d", None, "team");
        assert!(!Arc::ptr_eq(&ba.first, &other.first));
        // A key's own limit: its own bucket, with the client's on top.
        let own = limits.buckets(Uuid::now_v7(), "c", Some(per_second(2, 2)), "team");
        assert!(own.first.enforces(&per_second(2, 2)));
        assert!(Arc::ptr_eq(own.client.as_ref().unwrap(), &ba.first));
        // Per key: separate buckets, the override replacing the plan's limit.
        let sa = limits.buckets(a, "c", None, "solo");
        let sb = limits.buckets(b, "c", None, "solo");
        assert!(!Arc::ptr_eq(&sa.first, &sb.first) && sa.client.is_none());
        let so = limits.buckets(Uuid::now_v7(), "c", Some(per_second(2, 2)), "solo");
        assert!(so.first.enforces(&per_second(2, 2)) && so.client.is_none());
        // The client's bucket is kept while it refills, whoever holds it.
        for _ in 0..10 {
            ba.first.check().unwrap();
        }
        drop((ba, bb, own));
        for i in 0..limits.shards() {
            limits.sweep_shard(i);
        }
        let again = limits.buckets(Uuid::now_v7(), "c", None, "team");
        assert!(
            again.first.check().is_err(),
            "a new key found a fresh client bucket"
        );
    }

    #[test]
    fn only_buckets_nobody_holds_and_that_are_full_are_dropped() {
        let clock = FakeClock::new();
        let limits = KeyLimits::new(per_second(1000, 10), HashMap::new(), clock.clock());
        for _ in 0..2000 {
            limits.bucket(Uuid::now_v7(), per_second(1000, 10));
        }
        // Held by a principal, or still refilling: kept.
        let held_id = Uuid::now_v7();
        let held = limits.bucket(held_id, per_second(1000, 10));
        let busy_id = Uuid::now_v7();
        let busy = limits.bucket(busy_id, per_second(1, 10));
        busy.check().unwrap();
        drop(busy);
        assert_eq!(limits.len(), 2002);
        for i in 0..limits.shards() {
            limits.sweep_shard(i);
        }
        assert_eq!(limits.len(), 2, "idle full buckets still held");
        // The one still refilling keeps its state: the same bucket comes back.
        let again = limits.bucket(busy_id, per_second(1, 10));
        assert_eq!(again.check().unwrap().remaining, 8);
        assert!(Arc::ptr_eq(
            &held,
            &limits.bucket(held_id, per_second(1000, 10))
        ));
        // Two cells taken at 1 per second: kept for two seconds, then dropped.
        drop(again);
        clock.advance(Duration::from_secs(1));
        for i in 0..limits.shards() {
            limits.sweep_shard(i);
        }
        assert_eq!(limits.len(), 2, "a bucket still refilling was dropped");
        clock.advance(Duration::from_secs(1));
        for i in 0..limits.shards() {
            limits.sweep_shard(i);
        }
        assert_eq!(limits.len(), 1, "a full bucket nobody holds was kept");
    }

    #[test]
    fn the_bucket_is_governors_gcra() {
        // Same decisions as governor's direct limiter, request by request, over an uneven
        // schedule.
        let clock = FakeClock::new();
        let limit = per_second(7, 4);
        let ours = KeyLimiter::new(limit, clock.clock());
        let fake = governor::clock::FakeRelativeClock::default();
        let theirs = RateLimiter::direct_with_clock(quota(&limit), fake.clone());
        for step in 0..2000u64 {
            let gap = Duration::from_millis((step * 37) % 211);
            clock.advance(gap);
            fake.advance(gap);
            assert_eq!(ours.check().is_ok(), theirs.check().is_ok(), "step {step}");
        }
    }

    /// A route's per-key limit (governor, on the clock it is given): refused until the next
    /// cell is due, per key, and its state dropped once the bucket is full again.
    #[test]
    fn a_keyed_limit_refills_on_its_clock() {
        let clock = FakeClock::new();
        let l = KeyedLimit::new(per_second(2, 2), clock.clock());
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(l.check(&a).is_ok() && l.check(&a).is_ok());
        let refusal = l.check(&a).unwrap_err();
        assert_eq!(refusal.retry_after, Duration::from_millis(500));
        assert!(l.check(&b).is_ok(), "another key has its own bucket");
        clock.advance(Duration::from_millis(499));
        assert!(l.check(&a).is_err());
        clock.advance(Duration::from_millis(1));
        assert!(l.check(&a).is_ok());
        l.sweep();
        assert_eq!(l.len(), 2, "state of buckets still refilling dropped");
        // Both buckets full again (governor keeps a key one interval past that): state dropped.
        clock.advance(Duration::from_millis(1500));
        l.sweep();
        assert!(l.is_empty(), "state of full buckets kept");
    }

    /// A failed-auth limit of 3 a minute, burst 3, on `clock`.
    fn three_a_minute(clock: &FakeClock) -> FailedAuth {
        FailedAuth::new(
            RateLimit {
                per_second: None,
                per_minute: Some(3),
                per_hour: None,
                burst: 3,
            },
            clock.clock(),
        )
    }

    #[test]
    fn failed_auth_counts_an_ipv6_client_by_its_64() {
        let clock = FakeClock::new();
        let fa = three_a_minute(&clock);
        // A guess from each of three addresses of one /64 spends one allowance.
        for i in 1..=3 {
            let ip: IpAddr = format!("2001:db8:1:2::{i:x}").parse().unwrap();
            assert!(fa.record_failure(ip).is_none());
        }
        let next: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:9".parse().unwrap();
        assert!(fa.record_failure(next).is_some());
        // Another /64 has its own.
        assert!(
            fa.record_failure("2001:db8:1:3::1".parse().unwrap())
                .is_none()
        );
        assert_eq!(fa.tracked_ips(), 2);
    }

    #[test]
    fn failed_auth_blocks_an_ip_past_its_allowance() {
        let clock = FakeClock::new();
        let fa = three_a_minute(&clock);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(fa.record_failure(ip).is_none());
        }
        let wait = fa
            .record_failure(ip)
            .expect("fourth failure is over the limit");
        assert!(wait > Duration::from_secs(15) && wait <= Duration::from_secs(20));
        // Refused again while the wait lasts; another address has its own allowance.
        assert!(fa.record_failure(ip).is_some());
        assert!(fa.record_failure(other).is_none());
        // Written IPv4-mapped, it is the same address.
        assert!(
            fa.record_failure("::ffff:10.0.0.1".parse().unwrap())
                .is_some()
        );
        // Exactly the wait it was told: one more failure is allowed after it, the next one is
        // refused again (the allowance comes back one attempt at a time).
        clock.advance(wait - Duration::from_millis(1));
        assert_eq!(fa.record_failure(ip), Some(Duration::from_millis(1)));
        clock.advance(Duration::from_millis(1));
        assert!(fa.record_failure(ip).is_none());
        assert!(fa.record_failure(ip).is_some());
    }
}
