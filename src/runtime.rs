//! The event loop's runtime: one worker thread or several, and the two ways `[server]` can
//! change how it waits for events.
//!
//! - `busy_polling`: the loop never waits. A task that is always ready again makes tokio's
//!   current-thread runtime poll for I/O with a zero timeout instead of waiting in
//!   `epoll_wait`, so no packet has to wake the thread; the price is a core always busy.
//! - `event_coalesce_us`: a busy loop waits a little before it waits for events. When the
//!   thread's last wait for events ended within [`BUSY_WAIT`], it sleeps this long before it
//!   waits again. A thread in `nanosleep` is on no socket's wait queue, so packets arriving
//!   meanwhile are queued without waking it, and the next `epoll_wait` returns them all at
//!   once: one wakeup (its own timer, on its own core) for what would have been several (each
//!   paid by the sender: on a VM an inter-processor interrupt and an exit to the hypervisor).
//!   NICs call this interrupt coalescing. An idle loop (its last wait longer than
//!   [`BUSY_WAIT`]) does not pause, so a request after a quiet spell is not delayed; nor does
//!   a saturated one (it worked [`SATURATED_PERCENT`] or more of the last [`WINDOW`]): it
//!   rarely waits, so there are few wakeups to save, and a pause would only leave its work
//!   waiting while its clients wait for it.

use std::cell::Cell;
use std::io;
use std::time::{Duration, Instant};

use crate::telemetry::metrics::EVENT_LOOP_PAUSES;

/// A wait for events that ended sooner than this means the loop is busy: the next wait is
/// preceded by the coalescing pause, unless the loop is saturated.
pub const BUSY_WAIT: Duration = Duration::from_millis(1);

/// How much of a [`WINDOW`] the thread must have spent working to count as saturated: no pause
/// in the next window.
pub const SATURATED_PERCENT: u32 = 75;

/// The span over which the thread's share of time spent working is measured.
pub const WINDOW: Duration = Duration::from_millis(10);

/// The longest `event_coalesce_us` accepted: a pause delays every event that arrives during
/// it by up to its length.
pub const MAX_EVENT_COALESCE_US: u64 = 1_000;

/// How the runtime waits for events (`[server]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLoop {
    /// 0: one worker thread per core.
    pub worker_threads: usize,
    pub busy_polling: bool,
    /// Zero: no pause.
    pub coalesce: Duration,
}

/// The runtime `keygate serve` runs on. One worker thread is a current-thread runtime: it does
/// the same work without the multi-thread scheduler's cross-thread bookkeeping (blocking
/// store calls still run on their own pool). Busy polling starts with [`busy_poll`], spawned
/// by the caller on this runtime.
pub fn build(event_loop: EventLoop) -> io::Result<tokio::runtime::Runtime> {
    let mut rt = if event_loop.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if event_loop.worker_threads > 1 {
        rt.worker_threads(event_loop.worker_threads);
    }
    if !event_loop.coalesce.is_zero() {
        let pause = event_loop.coalesce;
        rt.on_thread_park(move || {
            let mut state = STATE.get();
            if let Some(p) = state.out_of_work(Instant::now(), pause) {
                EVENT_LOOP_PAUSES.inc();
                std::thread::sleep(p);
            }
            state.waiting(Instant::now());
            STATE.set(state);
        });
        rt.on_thread_unpark(|| {
            let mut state = STATE.get();
            state.woken(Instant::now());
            STATE.set(state);
        });
    }
    rt.enable_all().build()
}

/// `[server] busy_polling`: a task that is always ready again. It yields after every poll, and
/// a current-thread runtime with a task waiting to run again polls for I/O with a zero timeout
/// instead of waiting in `epoll_wait`: the event loop never sleeps.
pub async fn busy_poll() {
    loop {
        tokio::task::yield_now().await;
    }
}

thread_local! {
    /// The worker thread's own record of its waits (each worker coalesces for itself).
    static STATE: Cell<Waits> = const { Cell::new(Waits::new()) };
}

/// What a worker thread remembers of its waits for events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waits {
    /// When the current wait began (none while the thread runs tasks).
    since: Option<Instant>,
    /// How long the last wait lasted; none before the first ended.
    last: Option<Duration>,
    /// When the last wait ended: the thread has been working since.
    woke: Option<Instant>,
    /// When the current [`WINDOW`] began, and the time spent working in it so far.
    window: Option<Instant>,
    worked: Duration,
    /// The last whole window was saturated.
    saturated: bool,
}

impl Waits {
    const fn new() -> Self {
        Self {
            since: None,
            last: None,
            woke: None,
            window: None,
            worked: Duration::ZERO,
            saturated: false,
        }
    }

    /// The thread is out of work and about to wait for events: the pause to take first, if
    /// any. The time since it woke counts as worked (the pause does not), and a window that
    /// has run its length is judged first.
    fn out_of_work(&mut self, now: Instant, coalesce: Duration) -> Option<Duration> {
        self.worked_until(now);
        self.pause(coalesce)
    }

    /// The time since the thread woke counts as worked, and a window that has run its length
    /// is judged and a new one begun.
    fn worked_until(&mut self, now: Instant) {
        if let Some(woke) = self.woke.take() {
            self.worked += now.saturating_duration_since(woke);
        }
        let began = *self.window.get_or_insert(now);
        let span = now.saturating_duration_since(began);
        if span >= WINDOW {
            self.saturated = self.worked * 100 >= span * SATURATED_PERCENT;
            self.window = Some(now);
            self.worked = Duration::ZERO;
        }
    }

    /// Before the thread waits for events: the pause to take first, if the last wait ended
    /// within [`BUSY_WAIT`] and the last window was not saturated.
    fn pause(&self, coalesce: Duration) -> Option<Duration> {
        match self.last {
            Some(last) if last < BUSY_WAIT && !self.saturated && !coalesce.is_zero() => {
                Some(coalesce)
            }
            _ => None,
        }
    }

    /// The wait begins (after any pause).
    fn waiting(&mut self, now: Instant) {
        self.since = Some(now);
    }

    /// The wait ended: an event, a timer, or a task made ready by the park hook itself.
    fn woken(&mut self, now: Instant) {
        if let Some(since) = self.since.take() {
            self.last = Some(now.saturating_duration_since(since));
        }
        self.woke = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAUSE: Duration = Duration::from_micros(50);

    fn after_wait(of: Duration) -> Waits {
        let start = Instant::now();
        let mut w = Waits::new();
        w.waiting(start);
        w.woken(start + of);
        w
    }

    #[test]
    fn no_pause_before_the_first_wait_has_ended() {
        let mut w = Waits::new();
        assert_eq!(w.pause(PAUSE), None);
        w.waiting(Instant::now());
        assert_eq!(
            w.pause(PAUSE),
            None,
            "a wait still going is no evidence of load"
        );
    }

    #[test]
    fn a_short_wait_makes_the_next_one_pause_first() {
        assert_eq!(
            after_wait(Duration::from_micros(30)).pause(PAUSE),
            Some(PAUSE)
        );
        assert_eq!(
            after_wait(BUSY_WAIT - Duration::from_nanos(1)).pause(PAUSE),
            Some(PAUSE)
        );
    }

    #[test]
    fn a_long_wait_means_idle_and_no_pause() {
        assert_eq!(after_wait(BUSY_WAIT).pause(PAUSE), None);
        assert_eq!(after_wait(Duration::from_secs(3)).pause(PAUSE), None);
    }

    #[test]
    fn the_last_wait_decides() {
        let start = Instant::now();
        let mut w = after_wait(Duration::from_micros(10));
        w.waiting(start);
        w.woken(start + Duration::from_millis(20));
        assert_eq!(w.pause(PAUSE), None, "busy, then a quiet spell");
        w.waiting(start);
        w.woken(start + Duration::from_micros(5));
        assert_eq!(w.pause(PAUSE), Some(PAUSE), "quiet, then busy again");
    }

    #[test]
    fn a_wake_without_a_wait_changes_nothing() {
        let mut w = after_wait(Duration::from_micros(10));
        w.woken(Instant::now() + Duration::from_secs(5));
        assert_eq!(w.pause(PAUSE), Some(PAUSE));
    }

    /// A thread that works `busy` of every `cycle` (one wait per cycle, shorter than
    /// [`BUSY_WAIT`]) for `cycles` cycles from `start`, driven as the park hooks drive it; the
    /// state and the time after, the thread woken and working.
    fn run(
        mut w: Waits,
        start: Instant,
        busy: Duration,
        cycle: Duration,
        cycles: u32,
    ) -> (Waits, Instant) {
        let mut t = start;
        for _ in 0..cycles {
            w.woken(t);
            t += busy;
            // The load is offered from outside: the cycle keeps its length, and a pause
            // takes (up to all of) the idle part of it.
            let idle = cycle - busy;
            let pause = w.out_of_work(t, PAUSE).unwrap_or_default().min(idle);
            t += pause;
            w.waiting(t);
            t += idle - pause;
        }
        w.woken(t);
        (w, t)
    }

    #[test]
    fn a_saturated_loop_does_not_pause_and_one_with_room_does() {
        let start = Instant::now();
        let cycle = Duration::from_micros(100);
        // 90 % working for 30 ms: saturated.
        let (mut w, t) = run(Waits::new(), start, Duration::from_micros(90), cycle, 300);
        assert_eq!(w.out_of_work(t, PAUSE), None, "saturated, yet a pause");
        // Then 60 % for 30 ms: room, and the waits are short: pause.
        let (mut w, t) = run(w, t, Duration::from_micros(60), cycle, 300);
        assert_eq!(w.out_of_work(t, PAUSE), Some(PAUSE), "60 % busy, no pause");
        // And saturated again.
        let (mut w, t) = run(w, t, Duration::from_micros(80), cycle, 300);
        assert_eq!(w.out_of_work(t, PAUSE), None, "80 % busy, yet a pause");
    }

    #[test]
    fn the_share_is_judged_on_whole_windows() {
        let start = Instant::now();
        let cycle = Duration::from_micros(100);
        // 95 % working, but for less than a window: nothing judged yet.
        let (mut w, t) = run(Waits::new(), start, Duration::from_micros(95), cycle, 50);
        assert_eq!(w.out_of_work(t, PAUSE), Some(PAUSE));
    }

    #[test]
    fn zero_never_pauses() {
        assert_eq!(
            after_wait(Duration::from_micros(1)).pause(Duration::ZERO),
            None
        );
    }
}
