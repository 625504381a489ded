//! A key's rate-limit bucket: GCRA (the same arithmetic as governor's), one atomic word of
//! state, held by the key's cached [`Principal`](super::Principal) so a request touches no map
//! and takes no lock. The registry that hands buckets out, and the other limits, are in
//! [`crate::limit`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::RateLimit;
use crate::clock::Clock;

/// What a request learns from its key's bucket, for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// Credits the key has left after this request (keys with credits only):
    /// `Keygate-Credits-Remaining`.
    pub credits: Option<u64>,
    /// Requests left in the client's quota period (plans with a quota only):
    /// `Keygate-Quota-Remaining`.
    pub quota: Option<u64>,
}

/// A refusal: when the next request would be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub limit: u32,
    pub retry_after: Duration,
    /// Until the bucket is full again: the next cell's wait and the burst's other cells.
    pub full_after: Duration,
}

/// The time between two cells of `limit` (at least a nanosecond).
pub fn emission_interval(limit: &RateLimit) -> Duration {
    let (n, secs) = limit.rate();
    (Duration::from_secs(secs) / n.max(1)).max(Duration::from_nanos(1))
}

/// The longest tolerance a bucket keeps: 100 years (of 365.25 days) in nanoseconds. A burst
/// that would take longer to come back (the admin API takes any rate and burst) counts up to
/// what a century gives back; `now + tau + t` then always fits.
const MAX_TAU_NS: u64 = 3_155_760_000 * 1_000_000_000;

/// `tau = t × (burst − 1)`, at most [`MAX_TAU_NS`].
#[inline(always)]
fn tolerance(t: u64, burst: u32) -> u64 {
    t.saturating_mul(u64::from(burst.max(1) - 1))
        .min(MAX_TAU_NS)
}

/// The GCRA constants of a limit: the emission interval `t` and the tolerance `tau`
/// ([`tolerance`]), in nanoseconds.
fn gcra(limit: &RateLimit) -> (u64, u64) {
    let t = (emission_interval(limit).as_nanos() as u64).max(1);
    (t, tolerance(t, limit.burst))
}

/// One key's bucket: `t` is the emission interval, `tat` the theoretical arrival time of the
/// next cell on the clock's monotonic time plus one (0: never used, a full bucket). The
/// tolerance `tau = t × (burst − 1)` is computed when it is needed (one multiplication), so a
/// bucket with its clock fits in 32 bytes, half a cache line.
pub struct KeyLimiter {
    t: u64,
    tat: AtomicU64,
    /// The limit's burst, reported as `RateLimit-Limit`.
    burst: u32,
    clock: Clock,
}

impl std::fmt::Debug for KeyLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLimiter")
            .field("t_ns", &self.t)
            .field("burst", &self.burst)
            .finish()
    }
}

impl KeyLimiter {
    pub fn new(limit: RateLimit, clock: Clock) -> Self {
        let (t, _) = gcra(&limit);
        Self {
            t,
            tat: AtomicU64::new(0),
            burst: limit.burst,
            clock,
        }
    }

    /// Now, never 0 (0 marks a bucket never used).
    #[inline]
    fn now_ns(&self) -> u64 {
        self.clock.mono_nanos() + 1
    }

    /// The tolerance ([`tolerance`]), in nanoseconds (as [`gcra`] computes it).
    #[inline(always)]
    fn tau(&self) -> u64 {
        tolerance(self.t, self.burst)
    }

    /// True when this bucket enforces `limit`.
    pub fn enforces(&self, limit: &RateLimit) -> bool {
        (self.t, self.tau(), self.burst) == {
            let (t, tau) = gcra(limit);
            (t, tau, limit.burst)
        }
    }

    /// Takes one cell, or says how long to wait. (Inlined into the request path, as it was
    /// when the bucket was generic over its clock: one call fewer per request.)
    #[inline(always)]
    pub fn check(&self) -> Result<RateInfo, Refusal> {
        let now = self.now_ns();
        let (t, tau) = (self.t, self.tau());
        let mut prev = self.tat.load(Ordering::Acquire);
        loop {
            let tat = if prev == 0 { now } else { prev };
            let earliest = tat.saturating_sub(tau);
            if now < earliest {
                return Err(Refusal {
                    limit: self.burst,
                    retry_after: Duration::from_nanos(earliest - now),
                    full_after: Duration::from_nanos(tat - now),
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
                        credits: None,
                        quota: None,
                    });
                }
                Err(actual) => prev = actual,
            }
        }
    }

    /// Gives back the cell a successful [`KeyLimiter::check`] took: that request was refused by
    /// a limit checked after this one, and a refused request spends nothing.
    pub fn give_back(&self) {
        let t = self.t;
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                (tat != 0).then(|| tat.saturating_sub(t).max(1))
            });
    }

    /// True when the bucket holds its whole burst (it is then the same as a new one).
    pub fn is_full(&self) -> bool {
        let tat = self.tat.load(Ordering::Acquire);
        tat == 0 || tat <= self.now_ns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    use crate::keys::testing::per_second;

    #[test]
    fn a_bucket_with_its_clock_fits_in_32_bytes() {
        assert!(std::mem::size_of::<KeyLimiter>() <= 32);
        let l = KeyLimiter::new(per_second(5, 7), FakeClock::new().clock());
        assert_eq!(l.tau(), gcra(&per_second(5, 7)).1);
        assert!(l.enforces(&per_second(5, 7)));
        assert!(!l.enforces(&per_second(5, 8)) && !l.enforces(&per_second(6, 7)));
    }

    /// A limit whose burst comes back within a century (1 an hour, burst 876,600) counts its
    /// burst exactly; a slower one (the admin API takes any) counts what a century gives back,
    /// without overflowing (it panicked in debug builds, and in release never refused and
    /// reported a wrapped reset).
    #[test]
    fn the_slowest_limits_count_without_overflowing() {
        let clock = FakeClock::new();
        let hourly = |burst| RateLimit {
            per_second: None,
            per_minute: None,
            per_hour: Some(1),
            burst,
        };
        let l = KeyLimiter::new(hourly(876_600), clock.clock());
        let first = l.check().unwrap();
        assert_eq!((first.remaining, first.reset_secs), (876_599, 3_600));
        for _ in 1..876_600 {
            assert!(l.check().is_ok());
        }
        assert!(l.check().is_err());
        let past = KeyLimiter::new(hourly(6_000_000), clock.clock());
        let info = past.check().unwrap();
        assert_eq!(info.limit, 6_000_000);
        assert_eq!(info.remaining, 876_600);
        for _ in 1..876_601 {
            assert!(past.check().is_ok());
        }
        let refused = past.check().unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(3_600));
    }

    /// A cell given back is there for the next request, and never more than the burst.
    #[test]
    fn a_cell_given_back_is_taken_again() {
        let clock = FakeClock::new();
        let l = KeyLimiter::new(per_second(1, 1), clock.clock());
        assert!(l.check().is_ok());
        assert!(l.check().is_err());
        l.give_back();
        assert!(l.check().is_ok());
        assert!(l.check().is_err());
        // On a full bucket: still one cell, not two.
        let full = KeyLimiter::new(per_second(1, 1), clock.clock());
        full.give_back();
        assert!(full.check().is_ok());
        assert!(full.check().is_err());
    }

    #[test]
    fn burst_is_exact_and_refills_on_schedule() {
        let clock = FakeClock::new();
        let l = KeyLimiter::new(per_second(5, 5), clock.clock());
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
        let clock = FakeClock::new();
        let l = KeyLimiter::new(per_second(10, 3), clock.clock());
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
        let clock = FakeClock::new();
        let l = KeyLimiter::new(
            RateLimit {
                per_second: None,
                per_minute: Some(60),
                per_hour: None,
                burst: 2,
            },
            clock.clock(),
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
        assert_eq!(emission_interval(&h), Duration::from_secs(1));
    }

    #[test]
    fn a_bucket_is_full_again_once_its_cells_have_come_back() {
        let clock = FakeClock::new();
        let l = KeyLimiter::new(per_second(10, 2), clock.clock());
        assert!(l.is_full(), "never used");
        l.check().unwrap();
        assert!(!l.is_full());
        clock.advance(Duration::from_millis(99));
        assert!(!l.is_full());
        clock.advance(Duration::from_millis(1));
        assert!(l.is_full());
    }
}
