//! Timeouts of a connection served by hyper, the same for HTTP/1.1 and HTTP/2 (and the same
//! bounds as the fast path's):
//!
//! - **idle**: while no request is in progress (none yet, or the last one's response body
//!   ended), the client has `limits.header_read_timeout` to start the next request — an h2c
//!   client that sends only the preface, or only PINGs and SETTINGS (or answers the server's
//!   own keep-alive PINGs), or a keep-alive connection left open, loses its slot; bytes that
//!   start no request do not extend it (as on the fast path, whose whole next head must come
//!   within that time);
//! - **write stall**: a client that takes no response bytes for `limits.body_timeout` is
//!   dropped — on HTTP/1.1 and HTTP/2 when it stops reading the connection, and on HTTP/2 also
//!   when it reads the connection but grants a stream no window: that stream is reset.
//!
//! [`Watched`] wraps the connection's I/O and enforces both on the connection; [`Counted`] wraps
//! the service and keeps the count of requests in progress (until their response bodies end or
//! are dropped); [`Exec`] runs each HTTP/2 stream with the stall timeout of its response body
//! (hyper stops polling a body while the stream has no window, so a stalled stream shows only
//! from outside it: its response body was last polled for a frame, not waiting for one).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use std::cell::Cell;

use futures_util::task::AtomicWaker;
use http::Response;
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::Service;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Requests in progress on one connection, and the reader to wake when the last one ends.
#[derive(Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// Requests started on the connection: an idle time armed before the last one began is
    /// over.
    started: AtomicUsize,
    reader: AtomicWaker,
}

impl Activity {
    fn start(self: &Arc<Self>) -> Guard {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Guard(Arc::clone(self))
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }
}

/// One request in progress; dropped when its response body ends or is dropped.
pub struct Guard(Arc<Activity>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.reader.wake();
        }
    }
}

/// The connection's I/O with the idle and write-stall timeouts.
pub struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
    idle: Duration,
    write_stall: Duration,
    idle_timer: Option<Pin<Box<Sleep>>>,
    /// [`Activity::started`] when the idle timer was armed.
    idle_since: usize,
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl<I> Watched<I> {
    pub fn new(io: I, activity: Arc<Activity>, idle: Duration, write_stall: Duration) -> Self {
        Watched {
            io,
            activity,
            idle,
            write_stall,
            idle_timer: None,
            idle_since: 0,
            write_timer: None,
        }
    }
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_owned())
}

/// Polls `timer` (armed for `after` when missing): `true` when it has fired.
fn expired(timer: &mut Option<Pin<Box<Sleep>>>, after: Duration, cx: &mut Context<'_>) -> bool {
    timer
        .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)))
        .as_mut()
        .poll(cx)
        .is_ready()
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        // A request began since the idle time was armed: it starts again when the connection is
        // next found idle.
        let started = this.activity.started.load(Ordering::Acquire);
        if started != this.idle_since || this.activity.busy() {
            this.idle_timer = None;
            this.idle_since = started;
        }
        let filled = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > filled {
            // Bytes that start no request (HTTP/2 PING, SETTINGS, WINDOW_UPDATE; a head still
            // coming) do not extend the idle time.
            if !this.activity.busy()
                && this
                    .idle_timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready())
            {
                return Poll::Ready(Err(timed_out("connection idle")));
            }
            return read;
        }
        if read.is_ready() {
            return read;
        }
        this.activity.reader.register(cx.waker());
        if !this.activity.busy() && expired(&mut this.idle_timer, this.idle, cx) {
            return Poll::Ready(Err(timed_out("connection idle")));
        }
        Poll::Pending
    }
}

impl<I: AsyncWrite + Unpin> Watched<I> {
    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        p: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if p.is_ready() {
            self.write_timer = None;
            return p;
        }
        if expired(&mut self.write_timer, self.write_stall, cx) {
            return Poll::Ready(Err(timed_out("client stopped reading")));
        }
        Poll::Pending
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let p = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(cx, p)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let p = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let p = Pin::new(&mut self.io).poll_flush(cx);
        self.progress(cx, p)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A service whose requests count as activity until their response bodies end.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Counted { inner, activity }
    }
}

impl<S, B, R> Service<R> for Counted<S>
where
    S: Service<R, Response = Response<B>>,
    B: Body,
{
    type Response = Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, req: R) -> Self::Future {
        CountedFuture {
            guard: Some(self.activity.start()),
            fut: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The service's future, with its request's activity handed to the response body.
    /// Written out rather than an `async` block: such a block keeps the inner future twice
    /// (as its capture and as the value awaited), and hyper allocates every HTTP/2 stream's
    /// future on the heap, so the block doubled each stream's allocation.
    pub struct CountedFuture<F> {
        #[pin]
        fut: F,
        guard: Option<Guard>,
    }
}

impl<F, B, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.fut.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(res.map(|inner| CountedBody { inner, guard })))
    }
}

/// A response body that ends its request's activity when it ends (or is dropped).
pub struct CountedBody<B> {
    inner: B,
    guard: Option<Guard>,
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        // Inside an HTTP/2 stream's task: say whether the body waits for its source or has
        // handed over a frame (and the stream now waits for the client).
        let _ = LAST_POLL.try_with(|last| {
            last.set(Some(if frame.is_pending() {
                Polled::Waiting
            } else {
                Polled::Yielded
            }))
        });
        let frame = std::task::ready!(frame);
        if frame.is_none() {
            self.guard = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a response body's last poll in an HTTP/2 stream's task ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Polled {
    /// Pending: the body waits for its source (the upstream, whose pauses have their own
    /// timeout).
    Waiting,
    /// A frame (or the end): what comes next is up to the stream, i.e. the client's window.
    Yielded,
}

tokio::task_local! {
    /// Set by [`CountedBody`] while an HTTP/2 stream's task is polled by [`Exec`].
    static LAST_POLL: Cell<Option<Polled>>;
}

/// The executor of hyper's connections: it runs each HTTP/2 stream (the only futures hyper
/// spawns for a served connection) with a write-stall timeout of its own. A stream whose
/// response body handed over a frame and has not been asked for the next one for
/// `write_stall` (the client grants no window) is dropped, which resets it; a body waiting for
/// its upstream does not count.
#[derive(Clone, Debug)]
pub struct Exec {
    write_stall: Duration,
}

impl Exec {
    pub fn new(write_stall: Duration) -> Self {
        Exec { write_stall }
    }
}

impl<F> hyper::rt::Executor<F> for Exec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Stalling {
            fut,
            write_stall: self.write_stall,
            stalled: false,
            timer: None,
        });
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/2 stream's task under its write-stall timeout. Written out rather than an
    /// `async` block, which would keep the stream's future twice in the task's allocation.
    struct Stalling<F> {
        #[pin]
        fut: F,
        write_stall: Duration,
        stalled: bool,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<F: Future<Output = ()>> Future for Stalling<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let (done, last) = LAST_POLL.sync_scope(Cell::new(None), || {
            let done = this.fut.as_mut().poll(cx);
            (done, LAST_POLL.with(Cell::get))
        });
        if done.is_ready() {
            return Poll::Ready(());
        }
        // Progress, or waiting for the upstream: the stall (if any) starts again. No poll of
        // the body at all: it still waits as it did.
        if let Some(p) = last {
            *this.stalled = p == Polled::Yielded;
            *this.timer = None;
        }
        if *this.stalled && expired(this.timer, *this.write_stall, cx) {
            tracing::debug!("HTTP/2 stream reset: the client took no data");
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
