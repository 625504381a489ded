//! Time, as the request path reads it: one [`Clock`], made once at startup and handed to every
//! component that asks what time it is (the key cache, the authenticator and its token cache,
//! the rate limiters, the usage recorder, the `Date` field of the fast path), so tests move a
//! [`FakeClock`] instead of sleeping.
//!
//! A clock gives wall-clock milliseconds (expiry, cache TTLs, usage) and monotonic nanoseconds
//! (rate-limit buckets). The real one reads both from the TSC through `quanta` (about 14 ns here
//! against about 48 ns for `SystemTime::now()` in this VM). Its wall clock is the monotonic
//! count plus an offset (in nanoseconds, so no rounding adds up) taken from `SystemTime` at most
//! one second earlier: the first read after a second has passed re-takes it, so a step of the
//! system clock (NTP, an operator) is followed within a second, and the TSC's drift between two
//! calibrations is a few microseconds at most.
//!
//! A [`Clock`] is one word: a fake clock's pointer, or none for the machine's clock (one
//! calibration and one wall-clock offset per process, shared by every [`Clock::real`]). The
//! buckets each hold one and stay in the same allocation size. Reading it is a branch on which
//! it is (always the same in a process, so predicted), not a call through a vtable.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Milliseconds since the Unix epoch, UTC. Stores and caches keep time in this form.
pub type Millis = i64;

/// How long a wall-clock offset is used before it is taken again.
const RECALIBRATE_NS: u64 = 1_000_000_000;

/// The time every component of the request path reads; clones share it.
#[derive(Clone)]
pub struct Clock(Option<FakeClock>);

/// The machine's clock, calibrated once per process.
#[inline]
fn tsc() -> &'static Tsc {
    static TSC: OnceLock<Tsc> = OnceLock::new();
    TSC.get_or_init(|| Tsc::new(quanta::Clock::new(), Box::new(system_nanos), RECALIBRATE_NS))
}

impl Clock {
    /// The machine's clock (the TSC where it is usable, else the OS monotonic clock). The
    /// first one made in a process calibrates the TSC, which takes a few milliseconds.
    pub fn real() -> Clock {
        tsc();
        Clock(None)
    }

    /// Milliseconds since the Unix epoch.
    #[inline]
    pub fn now_millis(&self) -> Millis {
        match &self.0 {
            None => tsc().now_millis(),
            Some(f) => f.now_millis(),
        }
    }

    /// Nanoseconds since the clock was first read in this process (a fake clock: since it was
    /// made); never decreases.
    #[inline]
    pub fn mono_nanos(&self) -> u64 {
        match &self.0 {
            None => tsc().mono_nanos(),
            Some(f) => f.mono_nanos(),
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Clock::Tsc"),
            Some(c) => f.debug_tuple("Clock::Fake").field(&c.now_millis()).finish(),
        }
    }
}

/// The machine's clock: the TSC counter, and the wall clock as an offset from it.
struct Tsc {
    clock: quanta::Clock,
    /// The raw reading that monotonic time is counted from.
    base: u64,
    /// Wall-clock nanoseconds at monotonic zero.
    offset_ns: AtomicI64,
    /// Monotonic time at which the offset is taken again.
    recalibrate_at: AtomicU64,
    /// How long an offset is used.
    every_ns: u64,
    /// The system's wall clock in nanoseconds since the Unix epoch (read once per `every_ns`).
    system: Box<dyn Fn() -> i64 + Send + Sync>,
}

impl Tsc {
    fn new(
        clock: quanta::Clock,
        system: Box<dyn Fn() -> i64 + Send + Sync>,
        every_ns: u64,
    ) -> Self {
        let base = clock.raw();
        let offset_ns = system();
        Tsc {
            clock,
            base,
            offset_ns: AtomicI64::new(offset_ns),
            recalibrate_at: AtomicU64::new(every_ns),
            every_ns,
            system,
        }
    }

    #[inline]
    fn mono_nanos(&self) -> u64 {
        self.clock.delta_as_nanos(self.base, self.clock.raw())
    }

    #[inline]
    fn now_millis(&self) -> Millis {
        let ns = self.mono_nanos();
        if ns >= self.recalibrate_at.load(Ordering::Relaxed) {
            return self.recalibrate(ns);
        }
        (ns as i64 + self.offset_ns.load(Ordering::Relaxed)) / 1_000_000
    }

    #[cold]
    fn recalibrate(&self, ns: u64) -> Millis {
        let wall = (self.system)();
        self.offset_ns.store(wall - ns as i64, Ordering::Relaxed);
        self.recalibrate_at
            .store(ns + self.every_ns, Ordering::Relaxed);
        wall / 1_000_000
    }
}

/// A clock for tests: time stands still until [`FakeClock::advance`] or
/// [`FakeClock::set_millis`] moves it. Clones, and the [`Clock`]s made from them, share the
/// time.
#[derive(Clone, Debug)]
pub struct FakeClock(Arc<FakeTime>);

#[derive(Debug)]
struct FakeTime {
    mono_ns: AtomicU64,
    /// Wall-clock nanoseconds at monotonic zero.
    offset_ns: AtomicI64,
}

impl FakeClock {
    /// Where a fake clock starts unless told otherwise: 2025-01-01T00:00:00Z.
    pub const START: Millis = 1_735_689_600_000;

    /// A clock at [`FakeClock::START`], monotonic time zero.
    pub fn new() -> Self {
        Self::at(Self::START)
    }

    /// A clock whose wall clock reads `wall`, monotonic time zero.
    pub fn at(wall: Millis) -> Self {
        FakeClock(Arc::new(FakeTime {
            mono_ns: AtomicU64::new(0),
            offset_ns: AtomicI64::new(wall * 1_000_000),
        }))
    }

    /// The [`Clock`] that components take; it reads this fake's time.
    pub fn clock(&self) -> Clock {
        Clock(Some(self.clone()))
    }

    /// Moves both the wall clock and monotonic time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).expect("an advance shorter than 584 years");
        self.0.mono_ns.fetch_add(ns, Ordering::SeqCst);
    }

    /// Sets the wall clock to `wall` (a step of the system clock); monotonic time does not
    /// move.
    pub fn set_millis(&self, wall: Millis) {
        let mono = self.0.mono_ns.load(Ordering::SeqCst) as i64;
        self.0
            .offset_ns
            .store(wall * 1_000_000 - mono, Ordering::SeqCst);
    }

    // The readers are out of line (`cold`): the real clock's branch is the one the request
    // path takes.

    /// The wall clock, in milliseconds since the Unix epoch.
    #[cold]
    pub fn now_millis(&self) -> Millis {
        let mono = self.0.mono_ns.load(Ordering::SeqCst) as i64;
        (mono + self.0.offset_ns.load(Ordering::SeqCst)).div_euclid(1_000_000)
    }

    /// Monotonic nanoseconds since the clock was made.
    #[cold]
    pub fn mono_nanos(&self) -> u64 {
        self.0.mono_ns.load(Ordering::SeqCst)
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

/// `SystemTime::now()` in nanoseconds since the Unix epoch (0 before it; `i64` lasts until
/// 2262).
fn system_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// `SystemTime::now()` in milliseconds since the Unix epoch (0 before it): the wall clock of
/// the code that takes no [`Clock`] (the admin plane and the stores, off the request path).
pub fn system_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A TSC clock over quanta's mock counter and a system clock the test sets, re-based every
    /// `every_ns`.
    fn mocked(every_ns: u64) -> (Tsc, Arc<quanta::Mock>, Arc<AtomicI64>) {
        let (clock, counter) = quanta::Clock::mock();
        let system = Arc::new(AtomicI64::new(FakeClock::START * MS as i64));
        let read = Arc::clone(&system);
        let tsc = Tsc::new(
            clock,
            Box::new(move || read.load(Ordering::SeqCst)),
            every_ns,
        );
        (tsc, counter, system)
    }

    #[test]
    fn wall_clock_follows_the_system_clock() {
        let c = Clock::real();
        for _ in 0..5 {
            let before = system_millis();
            let ours = c.now_millis();
            let after = system_millis();
            // One millisecond either way for the truncation of the two counts.
            assert!(
                before - 1 <= ours && ours <= after + 1,
                "{before} {ours} {after}"
            );
        }
    }

    /// Between re-basings the wall clock runs on the counter, not on the system clock.
    #[test]
    fn between_rebases_the_wall_clock_runs_on_the_counter() {
        let (c, counter, _system) = mocked(RECALIBRATE_NS);
        assert_eq!(c.now_millis(), FakeClock::START);
        counter.increment(300 * MS);
        assert_eq!(c.now_millis(), FakeClock::START + 300);
        counter.increment(699 * MS);
        assert_eq!(c.now_millis(), FakeClock::START + 999);
    }

    /// A step of the system clock (here: an hour) is followed at the next re-basing, and not
    /// before.
    #[test]
    fn a_system_clock_step_is_followed_at_the_next_rebase() {
        let hour = 3_600_000;
        let (c, counter, system) = mocked(50 * MS);
        let early = c.now_millis();
        assert_eq!(early, FakeClock::START);
        counter.increment(10 * MS);
        system.store((FakeClock::START + hour + 10) * MS as i64, Ordering::SeqCst);
        let before_rebase = c.now_millis();
        assert_eq!(before_rebase, FakeClock::START + 10, "not re-based yet");
        counter.increment(50 * MS);
        system.store((FakeClock::START + hour + 60) * MS as i64, Ordering::SeqCst);
        let late = c.now_millis();
        assert_eq!(late, FakeClock::START + hour + 60, "re-based: {late}");
        // And from the new offset on, the counter again.
        counter.increment(5 * MS);
        assert_eq!(c.now_millis(), FakeClock::START + hour + 65);
    }

    #[test]
    fn monotonic_time_advances() {
        let (c, counter, _system) = mocked(RECALIBRATE_NS);
        let a = c.mono_nanos();
        counter.increment(20 * MS);
        let b = c.mono_nanos();
        assert!(b - a >= 19_000_000, "{a} {b}");
        assert!(b - a < 2_000_000_000, "{a} {b}");
        // The real counter never goes back.
        let real = Clock::real();
        let mut last = real.mono_nanos();
        for _ in 0..1000 {
            let now = real.mono_nanos();
            assert!(now >= last, "{last} {now}");
            last = now;
        }
    }

    #[test]
    fn a_fake_clock_moves_only_when_told() {
        let fake = FakeClock::new();
        let clock = fake.clock();
        let other = fake.clone().clock();
        assert_eq!(
            (clock.now_millis(), clock.mono_nanos()),
            (FakeClock::START, 0)
        );
        fake.advance(Duration::from_micros(1500));
        assert_eq!(clock.now_millis(), FakeClock::START + 1);
        assert_eq!(clock.mono_nanos(), 1_500_000);
        fake.advance(Duration::from_micros(500));
        assert_eq!(
            other.now_millis(),
            FakeClock::START + 2,
            "clones share the time"
        );
        // A step of the wall clock, back or forth, leaves monotonic time where it was.
        fake.set_millis(1_000);
        assert_eq!(clock.now_millis(), 1_000);
        assert_eq!(clock.mono_nanos(), 2_000_000);
        fake.advance(Duration::from_millis(10));
        assert_eq!(clock.now_millis(), 1_010);
        assert_eq!(clock.mono_nanos(), 12_000_000);
    }
}
