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
//!
//!   Pausing pays only where the wakeups it saves were slowing the loop's peers; where they
//!   were not, clients that wait for each response before they send the next (a few
//!   keep-alive connections) wait for every pause too, and the loop does less work. So the
//!   loop checks ([`Probe`]): it pauses for a few windows (a trial), then does not for a few (a
//!   probe), and compares the share of time it worked. Work that drops by more than
//!   [`PROBE_MARGIN_PERCENT`] with the pause means the pause holds it back, and a loop
//!   saturated without the pause has no wakeups to spare (paused, it could fall below the
//!   saturation line and stay there, pausing on while it works less): either way no pause for
//!   a while (twice as long after each such trial), then a new trial. Otherwise it pauses in a
//!   spell of [`PAUSE_WINDOWS`], ended early when its work falls behind the probe's, and
//!   probes again.

use std::cell::Cell;
use std::io;
use std::num::NonZeroU64;
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

/// Windows of a trial of the pause ([`Probe`]), of the probe without it after each spell of
/// pausing, and of a spell of pausing once a trial has shown it does not cost work. The first
/// window of each is not compared (the loop is still changing pace).
const TRIAL_WINDOWS: u32 = 5;
const PROBE_WINDOWS: u32 = 5;
const PAUSE_WINDOWS: u32 = 40;
/// Windows in a row of a spell of pausing that worked less than the last probe (by more than
/// the margin) to end the spell.
const LOW_WINDOWS: u32 = 3;
/// The first and the longest rest from pausing after a trial in which it cost work (or the
/// loop was saturated without it).
const REST_WINDOWS: u32 = 50;
const MAX_REST_WINDOWS: u32 = 1_000;
/// How much more of its time the loop must work without the pause than with it for the pause
/// to count as holding work back (per cent). At 25 % pauses that cost a tenth to a fifth of
/// the rate with 8 and 32 keep-alive clients went on (BENCHMARKS.md, "Event coalescing (2)").
const PROBE_MARGIN_PERCENT: u64 = 10;

/// The timer slack (nanoseconds) of a thread that pauses: how much later than asked the kernel
/// may end its sleeps (and the timeouts of its waits for events). A thread's default is 50 µs,
/// which let a pause of 50 µs last up to 100; set on each worker thread at its first pause
/// check, so a pause lasts what `event_coalesce_us` says.
pub const PAUSE_TIMER_SLACK_NS: u64 = 1_000;

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
            if !state.slack_set {
                state.slack_set = true;
                // Where it cannot be set (a seccomp filter), pauses last up to the default
                // slack longer, as before.
                let _ =
                    rustix::thread::set_current_timer_slack(NonZeroU64::new(PAUSE_TIMER_SLACK_NS));
            }
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
    /// Whether pausing is being tried, kept up, or rested from.
    probe: Probe,
    /// The thread's timer slack has been set to [`PAUSE_TIMER_SLACK_NS`].
    slack_set: bool,
}

/// Whether pausing holds the loop's work back: windows with the pause and windows without it,
/// compared by the share of time the thread worked in them (shares in per mille).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probe {
    phase: Phase,
    /// Windows left in the phase.
    left: u32,
    /// No window of the phase has ended yet.
    fresh: bool,
    /// The loop paused in the current window.
    paused: bool,
    /// The shares of the phase's compared windows, summed, and how many.
    sum: u64,
    count: u64,
    /// The mean share of the last trial or spell (its windows with a pause).
    paused_share: u64,
    /// The mean share of the last probe (none before the first).
    unpaused_share: Option<u64>,
    /// Windows of the current spell in a row that worked less than the last probe by more
    /// than the margin.
    low: u32,
    /// The next rest's length, in windows.
    rest: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Pausing for [`TRIAL_WINDOWS`], to compare.
    Trial,
    /// Not pausing for [`PROBE_WINDOWS`], to compare.
    Probing,
    /// Pausing for [`PAUSE_WINDOWS`]: the last trial showed no cost.
    Pausing,
    /// Not pausing: the last trial showed the pause holding work back, or the loop was
    /// saturated without it.
    Resting,
}

impl Probe {
    const fn new() -> Self {
        Self {
            phase: Phase::Trial,
            left: TRIAL_WINDOWS,
            fresh: true,
            paused: false,
            sum: 0,
            count: 0,
            paused_share: 0,
            unpaused_share: None,
            low: 0,
            rest: REST_WINDOWS,
        }
    }

    fn allows_pause(&self) -> bool {
        matches!(self.phase, Phase::Trial | Phase::Pausing)
    }

    fn enter(&mut self, phase: Phase, windows: u32) {
        self.phase = phase;
        self.left = windows;
        self.fresh = true;
        self.sum = 0;
        self.count = 0;
        self.low = 0;
    }

    /// No pause for the next rest, and a rest twice as long (at most [`MAX_REST_WINDOWS`])
    /// the time after.
    fn rest(&mut self) {
        let rest = self.rest;
        self.rest = (rest * 2).min(MAX_REST_WINDOWS);
        self.enter(Phase::Resting, rest);
    }

    /// Whether `share` is less than the last probe's by more than the margin.
    fn below_probe(&self, share: u64) -> bool {
        self.unpaused_share
            .is_some_and(|unpaused| share * (100 + PROBE_MARGIN_PERCENT) < unpaused * 100)
    }

    /// A window ended in which the thread worked `share` per mille of the time.
    fn window(&mut self, share: u64) {
        // The first window of a phase is the change of pace; the others are compared, those of
        // a trial or a spell only if the loop paused in them (not idle, nor saturated).
        let paused = std::mem::take(&mut self.paused);
        let compared = self.phase == Phase::Probing || paused;
        if !std::mem::take(&mut self.fresh) && compared {
            self.sum += share;
            self.count += 1;
            // A spell of pausing ends at once when the work falls behind the last probe's
            // in [`LOW_WINDOWS`] windows in a row (the load changed, or the pause now holds
            // the work back where it did not).
            if self.phase == Phase::Pausing {
                self.low = if self.below_probe(share) {
                    self.low + 1
                } else {
                    0
                };
                if self.low >= LOW_WINDOWS {
                    self.rest();
                    return;
                }
            }
        }
        self.left = self.left.saturating_sub(1);
        if self.left > 0 {
            return;
        }
        match self.phase {
            // No window with a pause: nothing to compare, and nothing held back. Again.
            Phase::Trial | Phase::Pausing if self.count == 0 => {
                self.enter(Phase::Trial, TRIAL_WINDOWS)
            }
            // After a trial or a spell, a probe, against its windows with a pause.
            Phase::Trial | Phase::Pausing => {
                self.paused_share = self.sum / self.count;
                self.enter(Phase::Probing, PROBE_WINDOWS);
            }
            Phase::Probing => {
                let unpaused = self.sum / self.count.max(1);
                self.unpaused_share = Some(unpaused);
                let saturated = unpaused >= u64::from(SATURATED_PERCENT) * 10;
                if saturated || unpaused * 100 > self.paused_share * (100 + PROBE_MARGIN_PERCENT) {
                    self.rest();
                } else {
                    self.rest = REST_WINDOWS;
                    self.enter(Phase::Pausing, PAUSE_WINDOWS);
                }
            }
            Phase::Resting => self.enter(Phase::Trial, TRIAL_WINDOWS),
        }
    }
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
            probe: Probe::new(),
            slack_set: false,
        }
    }

    /// The thread is out of work and about to wait for events: the pause to take first, if
    /// any. The time since it woke counts as worked (the pause does not), and a window that
    /// has run its length is judged first.
    fn out_of_work(&mut self, now: Instant, coalesce: Duration) -> Option<Duration> {
        self.worked_until(now);
        let pause = self.pause(coalesce);
        self.probe.paused |= pause.is_some();
        pause
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
            let share = self.worked.as_nanos() * 1000 / span.as_nanos();
            self.probe.window(u64::try_from(share).unwrap_or(u64::MAX));
            self.window = Some(now);
            self.worked = Duration::ZERO;
        }
    }

    /// Before the thread waits for events: the pause to take first, if the last wait ended
    /// within [`BUSY_WAIT`], the last window was not saturated, and the probe has not found
    /// the pause holding work back.
    fn pause(&self, coalesce: Duration) -> Option<Duration> {
        match self.last {
            Some(last)
                if last < BUSY_WAIT
                    && !self.saturated
                    && self.probe.allows_pause()
                    && !coalesce.is_zero() =>
            {
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
    /// state and the time after (the thread woken and working), and how many waits paused.
    fn run(
        mut w: Waits,
        start: Instant,
        busy: Duration,
        cycle: Duration,
        cycles: u32,
    ) -> (Waits, Instant, u32) {
        let (mut t, mut paused) = (start, 0);
        for _ in 0..cycles {
            w.woken(t);
            t += busy;
            // The load is offered from outside: the cycle keeps its length, and a pause
            // takes (up to all of) the idle part of it.
            let idle = cycle - busy;
            let pause = w.out_of_work(t, PAUSE).unwrap_or_default().min(idle);
            paused += u32::from(!pause.is_zero());
            t += pause;
            w.waiting(t);
            t += idle - pause;
        }
        w.woken(t);
        (w, t, paused)
    }

    /// A thread whose probe keeps it pausing (its phase never ends): the other rules alone.
    fn steady() -> Waits {
        let mut w = Waits::new();
        w.probe.left = u32::MAX;
        w
    }

    /// A thread serving clients that each send their next request `gap` after the response to
    /// the last (the response leaves when the work ends); `busy` of work per request. A pause
    /// longer than the gap holds the next request back. Driven as the park hooks drive it for
    /// `span` from `start`; the state and the time after, and how many waits were paused
    /// before, of how many.
    fn closed_loop(
        mut w: Waits,
        start: Instant,
        busy: Duration,
        gap: Duration,
        span: Duration,
    ) -> (Waits, Instant, u32, u32) {
        let (mut t, mut paused, mut waits) = (start, 0, 0);
        while t < start + span {
            w.woken(t);
            t += busy;
            let answered = t;
            let pause = w.out_of_work(t, PAUSE).unwrap_or_default();
            paused += u32::from(!pause.is_zero());
            waits += 1;
            t += pause;
            w.waiting(t);
            t = t.max(answered + gap);
        }
        w.woken(t);
        (w, t, paused, waits)
    }

    #[test]
    fn a_pause_that_holds_work_back_is_dropped_and_tried_again_later() {
        let start = Instant::now();
        let (busy, gap) = (Duration::from_micros(20), Duration::from_micros(10));
        // Unpaused the thread works 2/3 of the time (not saturated); each 50 µs pause makes
        // the clients wait and cuts that to 2/7: the trial and the probe show it.
        let (w, t, paused, _) = closed_loop(Waits::new(), start, busy, gap, WINDOW * 12);
        assert!(paused > 0, "the trial did not pause");
        let (w, mut t, paused, waits) = closed_loop(w, t, busy, gap, WINDOW * 20);
        assert_eq!(
            paused, 0,
            "{paused} of {waits} waits paused after the pause cost work"
        );
        // The rest lasts REST_WINDOWS (counted from the probe's end), then a new trial;
        // it fails as the first did, and the next rest is twice as long.
        let mut w = w;
        for rest in [REST_WINDOWS, REST_WINDOWS * 2] {
            let mut windows = 0;
            loop {
                let (next, after, paused, _) = closed_loop(w, t, busy, gap, WINDOW);
                (w, t) = (next, after);
                windows += 1;
                if paused > 0 {
                    break;
                }
                assert!(windows < rest + 30, "no new trial after {windows} windows");
            }
            assert!(
                windows + 25 > rest,
                "a new trial after {windows} windows, not about {rest}"
            );
            let (next, after, _, _) = closed_loop(w, t, busy, gap, WINDOW * 12);
            (w, t) = (next, after);
            assert_eq!(w.pause(PAUSE), None, "the trial failed, yet pausing on");
        }
    }

    #[test]
    fn a_loop_saturated_without_the_pause_does_not_pause_after_a_dip() {
        let start = Instant::now();
        let (busy, gap) = (Duration::from_micros(140), Duration::from_micros(40));
        // Unpaused the thread works 78 % of the time (saturated); a pause brings it below the
        // saturation line (140 of 190 µs), 5 % less work: less than the margin, and once
        // paused it would stay below the line and pause on. The probe finds it saturated.
        let (w, t, _, _) = closed_loop(Waits::new(), start, busy, gap, WINDOW * 12);
        // A window of lighter load (66 %, not saturated) starts a trial of the pause, then the
        // load of before; the probe finds the loop saturated without the pause.
        let (w, t, _, _) = closed_loop(w, t, busy, gap * 2, WINDOW);
        let (w, t, _, _) = closed_loop(w, t, busy, gap, WINDOW * 15);
        // Another dip, then the load of before: no pause.
        let (w, t, _, _) = closed_loop(w, t, busy, gap * 2, WINDOW);
        let (_, _, paused, waits) = closed_loop(w, t, busy, gap, WINDOW * 30);
        assert_eq!(
            paused, 0,
            "{paused} of {waits} waits paused after a dip in a saturated loop"
        );
    }

    #[test]
    fn a_spell_of_pausing_ends_when_the_work_falls_behind_the_probe() {
        let start = Instant::now();
        // Offered from outside (40 of every 100 µs): the pause costs nothing, and after the
        // trial and the probe the loop pauses on in a spell.
        let (w, t, _) = run(
            Waits::new(),
            start,
            Duration::from_micros(40),
            Duration::from_micros(100),
            1_500,
        );
        assert_eq!(w.probe.phase, Phase::Pausing, "no spell of pausing");
        // Then clients that wait for each answer (20 µs of work, 10 µs until the next
        // request): each pause holds them back, and the spell ends within a few windows.
        let (w, _, _, _) = closed_loop(
            w,
            t,
            Duration::from_micros(20),
            Duration::from_micros(10),
            WINDOW * 6,
        );
        assert_eq!(
            w.probe.phase,
            Phase::Resting,
            "the spell went on though the work fell"
        );
    }

    #[test]
    fn idle_windows_are_not_compared() {
        // Idle: the thread wakes every 50 ms, works a little, and waits again (no pause: the
        // waits are long). Many windows end with nothing paused to compare.
        let (mut w, mut t) = (Waits::new(), Instant::now());
        for _ in 0..40 {
            w.woken(t);
            t += Duration::from_micros(30);
            assert_eq!(w.out_of_work(t, PAUSE), None, "an idle loop paused");
            w.waiting(t);
            t += Duration::from_millis(50);
        }
        // Then a load the pause costs nothing (offered from outside): the loop pauses at once.
        let waits = 3_000;
        let (_, _, paused) = run(
            w,
            t,
            Duration::from_micros(40),
            Duration::from_micros(100),
            waits,
        );
        assert!(
            paused * 100 > waits * 70,
            "{paused} of {waits} waits paused after an idle spell"
        );
    }

    #[test]
    fn a_pause_that_costs_no_work_is_kept() {
        let start = Instant::now();
        let cycle = Duration::from_micros(100);
        // The load is offered from outside: a pause takes part of the idle time, the work
        // stays the same, and the loop keeps pausing but for its probes.
        let waits = 20_000;
        let (_, _, paused) = run(Waits::new(), start, Duration::from_micros(40), cycle, waits);
        // 2 s: trial, probe, then spells of PAUSE_WINDOWS each followed by a probe.
        assert!(
            paused * 100 > waits * 80,
            "{paused} of {waits} waits paused: the pause was dropped though it cost no work"
        );
    }

    #[test]
    fn a_saturated_loop_does_not_pause_and_one_with_room_does() {
        let start = Instant::now();
        let cycle = Duration::from_micros(100);
        // 90 % working for 30 ms: saturated.
        let (mut w, t, _) = run(steady(), start, Duration::from_micros(90), cycle, 300);
        assert_eq!(w.out_of_work(t, PAUSE), None, "saturated, yet a pause");
        // Then 60 % for 30 ms: room, and the waits are short: pause.
        let (mut w, t, _) = run(w, t, Duration::from_micros(60), cycle, 300);
        assert_eq!(w.out_of_work(t, PAUSE), Some(PAUSE), "60 % busy, no pause");
        // And saturated again.
        let (mut w, t, _) = run(w, t, Duration::from_micros(80), cycle, 300);
        assert_eq!(w.out_of_work(t, PAUSE), None, "80 % busy, yet a pause");
    }

    #[test]
    fn the_share_is_judged_on_whole_windows() {
        let start = Instant::now();
        let cycle = Duration::from_micros(100);
        // 95 % working, but for less than a window: nothing judged yet.
        let (mut w, t, _) = run(Waits::new(), start, Duration::from_micros(95), cycle, 50);
        assert_eq!(w.out_of_work(t, PAUSE), Some(PAUSE));
    }

    #[test]
    fn zero_never_pauses() {
        assert_eq!(
            after_wait(Duration::from_micros(1)).pause(Duration::ZERO),
            None
        );
    }

    /// The kernel's default timer slack; each test thread starts from it, whatever the thread
    /// that runs the test has set.
    const DEFAULT_SLACK_NS: u64 = 50_000;

    /// The timer slack of the thread that ran a task after a wait for events, on the runtime
    /// `build` makes with `worker_threads` and `coalesce`, run on a thread of its own (its
    /// workers inherit its slack).
    fn slack_after_a_wait(worker_threads: usize, coalesce: Duration) -> u64 {
        std::thread::spawn(move || {
            rustix::thread::set_current_timer_slack(NonZeroU64::new(DEFAULT_SLACK_NS))
                .expect("PR_SET_TIMERSLACK");
            let rt = build(EventLoop {
                worker_threads,
                busy_polling: false,
                coalesce,
            })
            .expect("runtime");
            rt.block_on(async {
                tokio::spawn(async {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    rustix::thread::current_timer_slack().expect("PR_GET_TIMERSLACK")
                })
                .await
                .expect("task")
            })
        })
        .join()
        .expect("runtime thread")
    }

    #[test]
    fn a_thread_that_pauses_sleeps_no_longer_than_asked() {
        assert_eq!(slack_after_a_wait(1, PAUSE), PAUSE_TIMER_SLACK_NS);
        assert_eq!(slack_after_a_wait(2, PAUSE), PAUSE_TIMER_SLACK_NS);
    }

    #[test]
    fn without_the_pause_a_thread_keeps_its_timer_slack() {
        assert_eq!(slack_after_a_wait(1, Duration::ZERO), DEFAULT_SLACK_NS);
        assert_eq!(slack_after_a_wait(2, Duration::ZERO), DEFAULT_SLACK_NS);
    }
}
