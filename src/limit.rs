//! Rate limits: GCRA, one bucket per API key id, whichever credential form is used.
//!
//! A key's limit is its own override, else its client's plan, else the default. The bucket is
//! looked up in a registry only when the key cache is filled (a miss); the principal then holds
//! it, so a request touches no map and takes no lock. A key's bucket is one atomic word (the
//! theoretical arrival time of GCRA) and its two constants, about 60 bytes. The registry drops
//! a bucket once no cached principal holds it and it is full again: a full bucket and a new one
//! are the same, so nothing is lost and memory does not grow with keys that went idle. Limits
//! are per instance.
//!
//! Failed authentications and per-route limits use governor's keyed limiters; failed
//! authentications are limited per peer IP: past the allowance every request from that IP gets
//! 429 until the bucket allows another attempt, so keys cannot be guessed at line rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::{Clock as _, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
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

/// Nanoseconds on a monotonic clock, never 0 (0 marks a bucket never used).
pub trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> u64;
}

/// The process's monotonic clock (the TSC where it is usable, via quanta), in nanoseconds
/// since the clocks were first read (`crate::clock`), plus one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Monotonic;

impl Clock for Monotonic {
    fn now_ns(&self) -> u64 {
        crate::clock::mono_nanos() + 1
    }
}

/// A clock moved by hand (tests).
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst) + 1
    }
}

/// The GCRA constants of a limit: the emission interval `t` and the tolerance
/// `tau = t × (burst − 1)`, in nanoseconds.
fn gcra(limit: &RateLimit) -> (u64, u64) {
    let q = quota(limit);
    let t = (q.replenish_interval().as_nanos() as u64).max(1);
    (t, t.saturating_mul(u64::from(q.burst_size().get() - 1)))
}

/// One key's bucket (GCRA, the same arithmetic as governor's): `t` is the emission interval,
/// `tau` the tolerance, `tat` the theoretical arrival time of the next cell (0: never used, a
/// full bucket). Generic over the clock so tests can advance time.
pub struct KeyLimiter<C: Clock = Monotonic> {
    t: u64,
    tau: u64,
    tat: AtomicU64,
    /// The limit's burst, reported as `RateLimit-Limit`.
    burst: u32,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for KeyLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLimiter")
            .field("t_ns", &self.t)
            .field("burst", &self.burst)
            .finish()
    }
}

impl<C: Clock> KeyLimiter<C> {
    pub fn with_clock(limit: RateLimit, clock: C) -> Self {
        let (t, tau) = gcra(&limit);
        Self {
            t,
            tau,
            tat: AtomicU64::new(0),
            burst: limit.burst,
            clock,
        }
    }

    /// True when this bucket enforces `limit`.
    pub fn enforces(&self, limit: &RateLimit) -> bool {
        (self.t, self.tau, self.burst) == {
            let (t, tau) = gcra(limit);
            (t, tau, limit.burst)
        }
    }

    /// Takes one cell, or says how long to wait.
    pub fn check(&self) -> Result<RateInfo, Refusal> {
        let now = self.clock.now_ns();
        let (t, tau) = (self.t, self.tau);
        let mut prev = self.tat.load(Ordering::Acquire);
        loop {
            let tat = if prev == 0 { now } else { prev };
            let earliest = tat.saturating_sub(tau);
            if now < earliest {
                return Err(Refusal {
                    limit: self.burst,
                    retry_after: Duration::from_nanos(earliest - now),
                });
            }
            let next = tat.max(now).saturating_add(t);
            match self
                .tat
                .compare_exchange_weak(prev, next, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => {
                    let room = (now + tau + t).saturating_sub(next).min(tau + t);
                    let remaining = (room / t) as u32;
                    let missing = u64::from(self.burst.max(1)).saturating_sub(u64::from(remaining));
                    let reset_ns = t.saturating_mul(missing);
                    return Ok(RateInfo {
                        limit: self.burst,
                        remaining,
                        reset_secs: reset_ns.div_ceil(1_000_000_000),
                    });
                }
                Err(actual) => prev = actual,
            }
        }
    }

    /// True when the bucket holds its whole burst (it is then the same as a new one).
    fn is_full(&self) -> bool {
        let tat = self.tat.load(Ordering::Acquire);
        tat == 0 || tat <= self.clock.now_ns()
    }
}

impl KeyLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self::with_clock(limit, Monotonic)
    }
}

/// Shards of the bucket registry (a fill locks one).
const REGISTRY_SHARDS: usize = 64;

type RegistryShard = Mutex<HashMap<Uuid, Arc<KeyLimiter>>>;

/// Key buckets by key id, and the limit each key gets.
pub struct KeyLimits {
    registry: Box<[RegistryShard]>,
    plans: HashMap<String, Option<RateLimit>>,
    default: RateLimit,
}

impl KeyLimits {
    pub fn new(default: RateLimit, plans: HashMap<String, Option<RateLimit>>) -> Self {
        Self {
            registry: (0..REGISTRY_SHARDS).map(|_| Mutex::default()).collect(),
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
                let b = Arc::new(KeyLimiter::new(limit));
                shard.insert(key_id, Arc::clone(&b));
                b
            }
        }
    }

    /// Drops the buckets of one shard that no principal holds and that are full again.
    pub fn sweep_shard(&self, shard: usize) {
        let Some(shard) = self.registry.get(shard) else {
            return;
        };
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        shard.retain(|_, b| Arc::strong_count(b) > 1 || !b.is_full());
        if shard.capacity() > 4 * shard.len().max(16) {
            shard.shrink_to_fit();
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
            .sum()
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let clock = ManualClock::default();
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
        let clock = ManualClock::default();
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
        let clock = ManualClock::default();
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
        let limits = KeyLimits::new(per_second(1, 1), plans);
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
    fn only_buckets_nobody_holds_and_that_are_full_are_dropped() {
        let limits = KeyLimits::new(per_second(1000, 10), HashMap::new());
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
    }

    #[test]
    fn the_bucket_is_governors_gcra() {
        // Same decisions as governor's direct limiter, request by request, over an uneven
        // schedule.
        let clock = ManualClock::default();
        let limit = per_second(7, 4);
        let ours = KeyLimiter::with_clock(limit, clock.clone());
        let fake = governor::clock::FakeRelativeClock::default();
        let theirs = RateLimiter::direct_with_clock(quota(&limit), fake.clone());
        for step in 0..2000u64 {
            let gap = Duration::from_millis((step * 37) % 211);
            clock.advance(gap);
            fake.advance(gap);
            assert_eq!(ours.check().is_ok(), theirs.check().is_ok(), "step {step}");
        }
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
}
