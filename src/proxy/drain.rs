//! The listener's drain as a connection of the fast path sees it.
//!
//! The listener says it drains through a `watch` channel (`true`, or the sender gone). A
//! connection in the middle of an exchange looks at it ([`draining`]) when it decides whether to
//! keep the connection; a connection waiting for its next request head has to be woken by it
//! ([`DrainWait`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::sync::watch;

/// True once the listener drains (or is gone).
pub fn draining(drain: &watch::Receiver<bool>) -> bool {
    drain.has_changed().unwrap_or(true)
}

/// The wait for the listener's drain that an idle connection adds to its read, made once per
/// connection (see the module). Its first poll registers this task's waker with the channel, and
/// the registration stays: later idle waits of the connection only look whether the drain
/// began ([`draining`]) as long as the waker registered is the one they would register. A
/// `changed()` made per wait registered a waiter and removed it again — two locks, a waker
/// cloned and dropped — for every request whose next head had not arrived yet.
pub struct DrainWait<'c> {
    /// `changed()` of a receiver of the connection's own.
    wait: Pin<&'c mut (dyn Future<Output = ()> + Send)>,
    /// The waker `wait` was last polled with.
    waker: Option<Waker>,
    /// `wait` has completed (it is not polled again).
    fired: bool,
}

/// The end of the wait for a drain: `changed()` of a receiver of its own, so the connection's
/// `drain` stays free to look.
pub fn changed(drain: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + use<> {
    let mut watch = drain.clone();
    async move {
        let _ = watch.changed().await;
    }
}

impl<'c> DrainWait<'c> {
    pub fn new(wait: Pin<&'c mut (dyn Future<Output = ()> + Send)>) -> Self {
        DrainWait {
            wait,
            waker: None,
            fired: false,
        }
    }

    /// Ready once the listener drains. `drain`: the connection's receiver.
    pub fn poll(&mut self, cx: &mut Context<'_>, drain: &watch::Receiver<bool>) -> Poll<()> {
        if self.fired {
            return Poll::Ready(());
        }
        if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            // Registered with this waker: a drain wakes this task, and this sees it.
            return if draining(drain) {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
        self.waker = None;
        if self.wait.as_mut().poll(cx).is_ready() {
            self.fired = true;
            return Poll::Ready(());
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    /// A waker that counts its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    /// Polls `wait` with `waker`.
    fn poll(wait: &mut DrainWait<'_>, waker: &Waker, drain: &watch::Receiver<bool>) -> Poll<()> {
        wait.poll(&mut Context::from_waker(waker), drain)
    }

    #[test]
    fn a_drain_wakes_the_waker_an_idle_wait_registered_last_and_is_seen_by_later_waits() {
        let (tx, drain) = watch::channel(false);
        let fut = pin!(changed(&drain));
        let mut wait = DrainWait::new(fut);
        let (first, first_waker) = waker();
        let (second, second_waker) = waker();
        // Registered with the first waker; idle waits with it again look, and register nothing.
        for _ in 0..3 {
            assert!(poll(&mut wait, &first_waker, &drain).is_pending());
        }
        // A wait with another waker registers that one in its place.
        assert!(poll(&mut wait, &second_waker, &drain).is_pending());
        tx.send_replace(true);
        assert_eq!(
            first.0.load(Ordering::SeqCst),
            0,
            "the replaced waker was woken"
        );
        assert_eq!(second.0.load(Ordering::SeqCst), 1, "the drain woke nobody");
        assert!(poll(&mut wait, &second_waker, &drain).is_ready());
        // Once ready, it stays ready (the wait itself is not polled again).
        assert!(poll(&mut wait, &first_waker, &drain).is_ready());
    }

    #[test]
    fn a_wait_registered_once_sees_the_sender_gone_as_a_drain() {
        let (tx, drain) = watch::channel(false);
        let fut = pin!(changed(&drain));
        let mut wait = DrainWait::new(fut);
        let (count, w) = waker();
        assert!(poll(&mut wait, &w, &drain).is_pending());
        assert!(poll(&mut wait, &w, &drain).is_pending());
        // The sender gone counts as a drain too.
        drop(tx);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(poll(&mut wait, &w, &drain).is_ready());
    }
}
