//! The clocks of the request path: a monotonic nanosecond count for the rate-limit buckets and
//! wall-clock milliseconds for expiry, cache TTLs and usage, both read from the TSC through
//! `quanta` (about 14 ns here against about 48 ns for `SystemTime::now()` in this VM).
//!
//! The wall clock is the monotonic count plus an offset (in nanoseconds, so no rounding adds
//! up) taken from `SystemTime` at most one second earlier: the first read after a second has
//! passed re-takes it, so a step of the system clock (NTP, an operator) is followed within a
//! second, and the TSC's drift between two calibrations is a few microseconds at most.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::keys::Millis;

/// How long a wall-clock offset is used before it is taken again.
const RECALIBRATE_NS: u64 = 1_000_000_000;

struct Clocks {
    clock: quanta::Clock,
    /// The raw reading that monotonic time is counted from.
    base: u64,
    /// Wall-clock nanoseconds at monotonic zero.
    offset_ns: AtomicI64,
    /// Monotonic time at which the offset is taken again.
    recalibrate_at: AtomicU64,
    /// How long an offset is used.
    every_ns: u64,
}

impl Clocks {
    fn new(offset_ns: i64, every_ns: u64) -> Self {
        let clock = quanta::Clock::new();
        let base = clock.raw();
        Clocks {
            clock,
            base,
            offset_ns: AtomicI64::new(offset_ns),
            recalibrate_at: AtomicU64::new(every_ns),
            every_ns,
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
        let wall = system_nanos();
        self.offset_ns.store(wall - ns as i64, Ordering::Relaxed);
        self.recalibrate_at
            .store(ns + self.every_ns, Ordering::Relaxed);
        wall / 1_000_000
    }
}

fn clocks() -> &'static Clocks {
    static CLOCKS: OnceLock<Clocks> = OnceLock::new();
    CLOCKS.get_or_init(|| Clocks::new(system_nanos(), RECALIBRATE_NS))
}

/// Calibrates the clocks now (it takes a few milliseconds once) rather than on the first
/// request.
pub fn init() {
    clocks();
}

/// Nanoseconds since the clocks were first read; never decreases.
#[inline]
pub fn mono_nanos() -> u64 {
    clocks().mono_nanos()
}

/// Milliseconds since the Unix epoch.
#[inline]
pub fn now_millis() -> Millis {
    clocks().now_millis()
}

/// `SystemTime::now()` in nanoseconds since the Unix epoch (0 before it; `i64` lasts until
/// 2262).
fn system_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// `SystemTime::now()` in milliseconds since the Unix epoch (0 before it).
pub fn system_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_follows_the_system_clock() {
        for _ in 0..5 {
            let before = system_millis();
            let ours = now_millis();
            let after = system_millis();
            // One millisecond either way for the truncation of the two counts.
            assert!(
                before - 1 <= ours && ours <= after + 1,
                "{before} {ours} {after}"
            );
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }

    /// A step of the system clock (here: an offset an hour off) is followed at the next
    /// re-basing, and not before.
    #[test]
    fn a_system_clock_step_is_followed_at_the_next_rebase() {
        let hour = 3_600_000;
        let c = Clocks::new(system_nanos() - hour * 1_000_000, 50_000_000);
        let early = c.now_millis();
        assert!(
            (system_millis() - hour - early).abs() <= 2,
            "not re-based yet"
        );
        std::thread::sleep(std::time::Duration::from_millis(60));
        let late = c.now_millis();
        assert!((system_millis() - late).abs() <= 2, "re-based: {late}");
    }

    #[test]
    fn monotonic_time_advances() {
        let a = mono_nanos();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = mono_nanos();
        assert!(b - a >= 19_000_000, "{a} {b}");
        assert!(b - a < 2_000_000_000, "{a} {b}");
    }
}
