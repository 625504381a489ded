//! Rate limits: GCRA (governor), one bucket per API key id, whichever credential form is used.
//!
//! A key's limit is its own override, else its client's plan, else the default. The bucket is
//! looked up in a registry only when the key cache is filled (a miss); the principal then holds
//! it, so a request touches no map and takes no lock. A registry entry is dropped after it has
//! been idle for long enough that its bucket is full again (or twice the key-cache TTL, if
//! longer): dropping a full bucket loses nothing, so memory does not grow with keys that went
//! idle. Limits are per instance.
//!
//! Failed authentications are limited per peer IP: past the allowance every request from that
//! IP gets 429 until the bucket allows another attempt, so keys cannot be guessed at line rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::HeaderValue;
use uuid::Uuid;

use crate::keys::RateLimit;

/// The governor quota for a limit.
pub fn quota(limit: &RateLimit) -> Quota {
    let (n, secs) = limit.rate();
    let per_one = (Duration::from_secs(secs) / n.max(1)).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(limit.burst.max(1)).expect("at least 1");
    Quota::with_period(per_one)
        .expect("non-zero period")
        .allow_burst(burst)
}

/// Time for an empty bucket to become full again.
fn refill_time(limit: &RateLimit) -> Duration {
    let q = quota(limit);
    q.replenish_interval() * q.burst_size().get()
}

/// What a request learns from its key's bucket, for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
}

/// A refusal: when the next request would be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub limit: u32,
    pub retry_after: Duration,
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

/// One key's bucket. Generic over the clock so tests can advance time by hand.
pub struct KeyLimiter<C: Clock = DefaultClock> {
    limit: RateLimit,
    /// `quota(&limit)`, computed once.
    quota: Quota,
    limiter: Direct<C>,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for KeyLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLimiter")
            .field("limit", &self.limit)
            .finish()
    }
}

impl<C: Clock + Clone> KeyLimiter<C> {
    pub fn with_clock(limit: RateLimit, clock: C) -> Self {
        let quota = quota(&limit);
        let limiter = RateLimiter::direct_with_clock(quota, clock.clone()).with_middleware();
        Self {
            limit,
            quota,
            limiter,
            clock,
        }
    }

    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    /// Takes one cell, or says how long to wait.
    pub fn check(&self) -> Result<RateInfo, Refusal> {
        let q = &self.quota;
        match self.limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let missing = q.burst_size().get() - remaining;
                let reset = q.replenish_interval() * missing;
                Ok(RateInfo {
                    limit: self.limit.burst,
                    remaining,
                    reset_secs: reset.as_secs_f64().ceil() as u64,
                })
            }
            Err(not_until) => Err(Refusal {
                limit: self.limit.burst,
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
        }
    }
}

impl KeyLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self::with_clock(limit, DefaultClock::default())
    }
}

struct IdleExpiry {
    min_idle: Duration,
}

impl moka::Expiry<Uuid, Arc<KeyLimiter>> for IdleExpiry {
    fn expire_after_create(&self, _: &Uuid, v: &Arc<KeyLimiter>, _: Instant) -> Option<Duration> {
        Some(refill_time(v.limit()).max(self.min_idle))
    }
    fn expire_after_read(
        &self,
        _: &Uuid,
        v: &Arc<KeyLimiter>,
        _: Instant,
        _: Option<Duration>,
        _: Instant,
    ) -> Option<Duration> {
        Some(refill_time(v.limit()).max(self.min_idle))
    }
    fn expire_after_update(
        &self,
        _: &Uuid,
        v: &Arc<KeyLimiter>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(refill_time(v.limit()).max(self.min_idle))
    }
}

/// Key buckets by key id, and the limit each key gets.
pub struct KeyLimits {
    registry: moka::sync::Cache<Uuid, Arc<KeyLimiter>>,
    plans: HashMap<String, Option<RateLimit>>,
    default: RateLimit,
}

impl KeyLimits {
    /// `cache_ttl` is the key cache's TTL: a bucket is kept at least twice that long after its
    /// last use so a cache refill finds it.
    pub fn new(
        default: RateLimit,
        plans: HashMap<String, Option<RateLimit>>,
        cache_ttl: Duration,
    ) -> Self {
        let registry = moka::sync::Cache::builder()
            .expire_after(IdleExpiry {
                min_idle: cache_ttl * 2,
            })
            .build();
        Self {
            registry,
            plans,
            default,
        }
    }

    /// The limit for a key: its override, else its plan's, else the default.
    pub fn resolve(&self, key_override: Option<RateLimit>, license: &str) -> RateLimit {
        key_override
            .or_else(|| self.plans.get(license).copied().flatten())
            .unwrap_or(self.default)
    }

    /// The bucket for `key_id` with `limit`; an existing bucket is kept when its limit is the
    /// same, replaced (full) when the limit changed. Called on key-cache fills only.
    pub fn bucket(&self, key_id: Uuid, limit: RateLimit) -> Arc<KeyLimiter> {
        if let Some(b) = self.registry.get(&key_id).filter(|b| *b.limit() == limit) {
            return b;
        }
        let b = Arc::new(KeyLimiter::new(limit));
        self.registry.insert(key_id, Arc::clone(&b));
        b
    }

    /// Buckets currently held.
    pub fn len(&self) -> u64 {
        self.registry.run_pending_tasks();
        self.registry.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

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
    clock: DefaultClock,
}

impl<K: std::hash::Hash + Eq + Clone> KeyedLimit<K> {
    pub fn new(limit: RateLimit) -> Self {
        let clock = DefaultClock::default();
        Self {
            limit,
            limiter: RateLimiter::dashmap_with_clock(quota(&limit), clock.clone()),
            clock,
        }
    }

    pub fn check(&self, key: &K) -> Result<(), Refusal> {
        self.limiter.check_key(key).map_err(|not_until| Refusal {
            limit: self.limit.burst,
            retry_after: not_until.wait_time_from(self.clock.now()),
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

/// Failed authentications per peer IP. The request path pays one atomic load unless some IP
/// is currently blocked.
pub struct FailedAuth {
    attempts: KeyedLimit<IpAddr>,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    /// Milliseconds since `epoch` until which at least one IP may be blocked.
    horizon_ms: AtomicU64,
    epoch: Instant,
}

impl FailedAuth {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            attempts: KeyedLimit::new(limit),
            blocked: Mutex::new(HashMap::new()),
            horizon_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// `Err(wait)` while `ip` is blocked.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        if self.horizon_ms.load(Ordering::Relaxed) <= self.ms(now) {
            return Ok(());
        }
        let blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        match blocked.get(&ip) {
            Some(&until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Records a failed attempt; `Some(wait)` when `ip` is now over its allowance.
    pub fn record_failure(&self, ip: IpAddr) -> Option<Duration> {
        let refusal = self.attempts.check(&ip).err()?;
        let now = Instant::now();
        let until = now + refusal.retry_after;
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        blocked.retain(|_, t| *t > now);
        blocked.insert(ip, until);
        self.horizon_ms
            .fetch_max(self.ms(until) + 1, Ordering::Relaxed);
        Some(refusal.retry_after)
    }

    pub fn sweep(&self) {
        self.attempts.sweep();
        let now = Instant::now();
        self.blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, t| *t > now);
    }

    pub fn tracked_ips(&self) -> usize {
        self.attempts.len()
    }
}

/// `HeaderValue`s for small numbers, made once, so rate-limit headers cost no allocation.
pub fn number_header(n: u64) -> HeaderValue {
    static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| (0..4096u64).map(HeaderValue::from).collect());
    match table.get(n as usize) {
        Some(v) => v.clone(),
        None => HeaderValue::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn per_second(n: u32, burst: u32) -> RateLimit {
        RateLimit {
            per_second: Some(n),
            per_minute: None,
            per_hour: None,
            burst,
        }
    }

    #[test]
    fn burst_is_exact_and_refills_on_schedule() {
        let clock = FakeRelativeClock::default();
        let l = KeyLimiter::with_clock(per_second(5, 5), clock.clone());
        let allowed = (0..30).filter(|_| l.check().is_ok()).count();
        assert_eq!(allowed, 5);
        let refusal = l.check().unwrap_err();
        assert_eq!(refusal.retry_after, Duration::from_millis(200));
        clock.advance(Duration::from_millis(199));
        assert!(l.check().is_err());
        clock.advance(Duration::from_millis(1));
        assert!(l.check().is_ok());
        clock.advance(Duration::from_secs(1));
        let allowed = (0..30).filter(|_| l.check().is_ok()).count();
        assert_eq!(allowed, 5, "a full second refills the whole burst of 5");
    }

    #[test]
    fn headers_info_counts_down() {
        let clock = FakeRelativeClock::default();
        let l = KeyLimiter::with_clock(per_second(10, 3), clock);
        let a = l.check().unwrap();
        assert_eq!((a.limit, a.remaining), (3, 2));
        assert_eq!(a.reset_secs, 1);
        let b = l.check().unwrap();
        assert_eq!(b.remaining, 1);
        let c = l.check().unwrap();
        assert_eq!(c.remaining, 0);
        assert!(l.check().is_err());
    }

    #[test]
    fn per_minute_and_per_hour() {
        let clock = FakeRelativeClock::default();
        let l = KeyLimiter::with_clock(
            RateLimit {
                per_second: None,
                per_minute: Some(60),
                per_hour: None,
                burst: 2,
            },
            clock.clone(),
        );
        assert!(l.check().is_ok() && l.check().is_ok() && l.check().is_err());
        clock.advance(Duration::from_secs(1));
        assert!(l.check().is_ok());
        let h = RateLimit {
            per_second: None,
            per_minute: None,
            per_hour: Some(3600),
            burst: 1,
        };
        assert_eq!(quota(&h).replenish_interval(), Duration::from_secs(1));
    }

    #[test]
    fn resolution_order_and_bucket_reuse() {
        let plans = HashMap::from([
            ("pro".to_string(), Some(per_second(50, 50))),
            ("bare".to_string(), None),
        ]);
        let limits = KeyLimits::new(per_second(1, 1), plans, Duration::from_secs(60));
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
    fn idle_buckets_are_dropped() {
        // moka's timer wheel works in ~1 s steps, so idle time is measured in seconds here.
        let limits = KeyLimits::new(
            per_second(1000, 10),
            HashMap::new(),
            Duration::from_millis(500),
        );
        for _ in 0..2000 {
            limits.bucket(Uuid::now_v7(), per_second(1000, 10));
        }
        assert_eq!(limits.len(), 2000);
        std::thread::sleep(Duration::from_millis(2600));
        assert_eq!(limits.len(), 0, "idle buckets still held");
    }

    #[test]
    fn failed_auth_blocks_an_ip_past_its_allowance() {
        let fa = FailedAuth::new(RateLimit {
            per_second: None,
            per_minute: Some(3),
            per_hour: None,
            burst: 3,
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(fa.check(ip).is_ok());
        for _ in 0..3 {
            assert!(fa.record_failure(ip).is_none());
        }
        let wait = fa
            .record_failure(ip)
            .expect("fourth failure is over the limit");
        assert!(wait > Duration::from_secs(15) && wait <= Duration::from_secs(20));
        assert!(fa.check(ip).is_err());
        assert!(fa.check(other).is_ok());
    }

    #[test]
    fn number_headers() {
        assert_eq!(number_header(0), "0");
        assert_eq!(number_header(4095), "4095");
        assert_eq!(number_header(100_000), "100000");
    }
}
