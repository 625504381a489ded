//! Timeouts on the data plane without a timer per operation.
//!
//! Most reads and writes of an exchange finish on their first poll: the bytes are there, the
//! socket has room. `tokio::time::timeout` around each would still read the clock and build a
//! timer for it, and every wait that arms one registers it in the runtime's timer wheel and
//! takes it out again, each under the wheel's lock. Here the operation is polled once first and
//! only a wait arms a timer ([`within`], [`until`]); and the waits of one connection reuse one
//! timer of that connection ([`on_timer`]), moved only when it would fire late: a timer armed
//! for an earlier deadline wakes the wait once and is moved then, instead of at every wait.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The deadline passed before the operation finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

/// Polls `fut` once: its output if it finished, `None` if it has to wait (its waker is then
/// registered like any poll's).
async fn first_poll<F: Future>(mut fut: Pin<&mut F>) -> Option<F::Output> {
    poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(out) => Poll::Ready(Some(out)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// `fut`, bounded by `limit` from the moment it first has to wait.
pub async fn within<F: Future>(limit: Duration, fut: F) -> Result<F::Output, TimedOut> {
    bounded(|| Instant::now() + limit, fut).await
}

/// `fut`, bounded by `deadline`.
pub async fn until<F: Future>(deadline: Instant, fut: F) -> Result<F::Output, TimedOut> {
    bounded(|| deadline, fut).await
}

/// `fut`, bounded by the deadline `deadline()` gives, asked (and a timer made) only if `fut`
/// has to wait.
async fn bounded<F: Future>(
    deadline: impl FnOnce() -> Instant,
    fut: F,
) -> Result<F::Output, TimedOut> {
    let mut fut = pin!(fut);
    if let Some(out) = first_poll(fut.as_mut()).await {
        return Ok(out);
    }
    tokio::time::timeout_at(deadline(), fut)
        .await
        .map_err(|_| TimedOut)
}

/// `fut`, bounded by the deadline `deadline()` gives (asked only if `fut` has to wait), on the
/// connection's own `timer`.
pub async fn on_timer<F: Future>(
    mut timer: Pin<&mut Sleep>,
    deadline: impl FnOnce() -> Instant,
    fut: F,
) -> Result<F::Output, TimedOut> {
    let mut fut = pin!(fut);
    if let Some(out) = first_poll(fut.as_mut()).await {
        return Ok(out);
    }
    let deadline = deadline();
    // Moved only when it would fire late (armed for a later deadline) or has fired. A timer
    // armed earlier than `deadline`, the usual case (each wait of a keep-alive connection
    // ends later than the one before), is left as it is: it wakes this wait once, early, and
    // is moved then. A wait that ends first moves nothing.
    if timer.deadline() > deadline || timer.is_elapsed() {
        timer.as_mut().reset(deadline);
    }
    loop {
        tokio::select! {
            biased;
            out = fut.as_mut() => return Ok(out),
            () = timer.as_mut() => {
                if timer.deadline() >= deadline {
                    return Err(TimedOut);
                }
                timer.as_mut().reset(deadline);
            }
        }
    }
}

/// A connection's timer, not armed until [`on_timer`] first waits on it.
pub fn timer() -> Sleep {
    tokio::time::sleep_until(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ready on the `n`th poll (waking itself each time before that).
    struct ReadyAfter(u32);

    impl Future for ReadyAfter {
        type Output = u32;
        fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<u32> {
            if self.0 <= 1 {
                return Poll::Ready(7);
            }
            self.0 -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_operation_finishes_or_times_out_at_its_limit() {
        assert_eq!(within(Duration::ZERO, ReadyAfter(1)).await, Ok(7));
        assert_eq!(within(Duration::from_secs(1), ReadyAfter(3)).await, Ok(7));
        let never = std::future::pending::<()>();
        let started = Instant::now();
        assert_eq!(within(Duration::from_secs(5), never).await, Err(TimedOut));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        let at = Instant::now() + Duration::from_secs(2);
        assert_eq!(until(at, std::future::pending::<()>()).await, Err(TimedOut));
        assert_eq!(Instant::now(), at);
    }

    /// A wait on `timer`, its deadline `secs` away, for an operation that takes `takes` s
    /// (`None`: never finishes); asserts it ends when it should, and how.
    async fn wait(timer: Pin<&mut Sleep>, secs: u64, takes: Option<u64>) {
        let started = Instant::now();
        let op = async {
            match takes {
                Some(t) => tokio::time::sleep(Duration::from_secs(t)).await,
                None => std::future::pending::<()>().await,
            }
        };
        let got = on_timer(timer, || started + Duration::from_secs(secs), op).await;
        match takes {
            Some(t) if t < secs => {
                assert_eq!(got, Ok(()));
                assert_eq!(started.elapsed(), Duration::from_secs(t));
            }
            _ => {
                assert_eq!(got, Err(TimedOut));
                assert_eq!(started.elapsed(), Duration::from_secs(secs));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_timer_serves_many_waits_with_their_own_deadlines() {
        let mut timer = pin!(timer());
        // A later deadline each time (the keep-alive case), then an earlier one.
        for secs in [3, 10, 4, 1] {
            wait(timer.as_mut(), secs, None).await;
        }
        // A wait that ends before its deadline leaves the timer armed; the next wait, with a
        // later deadline, still times out at its own.
        wait(timer.as_mut(), 60, Some(1)).await;
        wait(timer.as_mut(), 90, None).await;
        // Armed for a later deadline than the next wait's (a wait that ended early, then one
        // bounded tighter): that wait still ends at its own.
        wait(timer.as_mut(), 60, Some(1)).await;
        wait(timer.as_mut(), 5, None).await;
        // Armed earlier than the wait's deadline, which outlasts the armed one and finishes
        // before its own: the early wake-up neither ends nor cuts it short.
        wait(timer.as_mut(), 10, Some(1)).await;
        wait(timer.as_mut(), 30, Some(20)).await;
        // The deadline function is not asked when the operation finishes at once.
        let got = on_timer(timer.as_mut(), || panic!("no wait, no deadline"), async {
            1
        })
        .await;
        assert_eq!(got, Ok(1));
        // A deadline already past: the wait times out at once.
        let past = Instant::now();
        tokio::time::advance(Duration::from_millis(5)).await;
        let waited = on_timer(timer.as_mut(), || past, std::future::pending::<()>()).await;
        assert_eq!(waited, Err(TimedOut));
    }
}
