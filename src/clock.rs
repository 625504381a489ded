//! The clocks of the request path: a monotonic nanosecond count for the rate-limit buckets and
//! wall-clock milliseconds for expiry, cache TTLs and usage, both read from the TSC through
//! `quanta` (about 14 ns here against about 48 ns for `SystemTime::now()` in this VM).
//!
//! The wall clock is the monotonic count plus an offset taken from `SystemTime` at most one
//! second earlier: the first read after a second has passed re-takes it, so a step of the
//! system clock (NTP, an operator) is followed within a second, and the TSC's drift between two
//! calibrations is a few microseconds at most.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::keys::Millis;

/// How long a wall-clock offset is used before it is taken again.
const RECALIBRATE_NS: u64 = 1_000_000_000;

struct Clocks {
    clock: quanta::Clock,
    /// The raw reading that monotonic time is counted from.
    base: u64,
    /// Wall-clock milliseconds at monotonic zero.
    offset_ms: AtomicI64,
    /// Monotonic time at which the offset is taken again.
    recalibrate_at: AtomicU64,
}

fn clocks() -> &'static Clocks {
    static CLOCKS: OnceLock<Clocks> = OnceLock::new();
    CLOCKS.get_or_init(|| {
        let clock = quanta::Clock::new();
        let base = clock.raw();
        Clocks {
            clock,
            base,
            offset_ms: AtomicI64::new(system_millis()),
            recalibrate_at: AtomicU64::new(RECALIBRATE_NS),
        }
    })
}

/// Calibrates the clocks now (it takes a few milliseconds once) rather than on the first
/// request.
pub fn init() {
    clocks();
}

/// Nanoseconds since the clocks were first read; never decreases.
#[inline]
pub fn mono_nanos() -> u64 {
    let c = clocks();
    c.clock.delta_as_nanos(c.base, c.clock.raw())
}

/// Milliseconds since the Unix epoch.
#[inline]
pub fn now_millis() -> Millis {
    let c = clocks();
    let ns = c.clock.delta_as_nanos(c.base, c.clock.raw());
    if ns >= c.recalibrate_at.load(Ordering::Relaxed) {
        return recalibrate(c, ns);
    }
    (ns / 1_000_000) as Millis + c.offset_ms.load(Ordering::Relaxed)
}

#[cold]
fn recalibrate(c: &Clocks, ns: u64) -> Millis {
    let wall = system_millis();
    c.offset_ms
        .store(wall - (ns / 1_000_000) as Millis, Ordering::Relaxed);
    c.recalibrate_at
        .store(ns + RECALIBRATE_NS, Ordering::Relaxed);
    wall
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

    #[test]
    fn monotonic_time_advances() {
        let a = mono_nanos();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = mono_nanos();
        assert!(b - a >= 19_000_000, "{a} {b}");
        assert!(b - a < 2_000_000_000, "{a} {b}");
    }
}
