//! The one client for plain `http://` upstreams, used by every engine: keep-alive HTTP/1.1
//! connections (raw TCP streams with their read buffers) lent to one exchange at a time (LIFO,
//! so few connections stay warm) and given back only when the exchange ended exactly at a
//! message boundary; the exchange itself (head, body, response head) with the one retry rule;
//! the response body read by its framing, with the one stall timeout; and the one log line of a
//! failed upstream request.
//!
//! A request that finds no idle connection waits in line (oldest first) for the next
//! connection given back by another exchange or newly opened, and a new one is opened for it
//! unless the connects under way already outnumber the requests in line. A connect fails one
//! request (the oldest in line) and ends nothing else. There are never fewer connects under way
//! than requests in line, and each ends within the connect timeout: no request waits longer for
//! a connection or an error. So a burst of requests beyond the idle
//! connections is carried by the connections that free up within microseconds instead of
//! waiting out a connect the upstream is slow to take (a full accept queue drops the SYN and
//! the kernel tries again a second later), and no more connects are opened than requests wait.
//!
//! Timeouts (the upstream policy): connecting within `proxy.connect_timeout`; the response head
//! within `proxy.upstream_timeout` of sending (504); a response body may not pause longer than
//! that either. A request body is copied while the upstream is watched: an upstream that
//! answers before the body is complete ends the upload (the connection is not reused).
//!
//! Retry rule: a reused connection that turns out to be closed before it took the request, or
//! (for an idempotent request none of whose body is lost: sent whole from memory, or not a byte
//! of it copied from the client yet) before it answered anything, is replaced once by a new one.
//! How the body is framed does not matter: an empty chunked or streamed body is as retryable as
//! none.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::Method;
use http::uri::Authority;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Sleep;

use super::codec::chunked::{self, Decoder};
use super::codec::head::{self, Field, Framing, ResponseHead};
use super::deadline;
use crate::net::Tcp;
use crate::proxy::error::ProxyError;
use crate::route::Route;

/// Idle upstream connections are kept this long for reuse.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream host.
pub const MAX_IDLE_PER_HOST: usize = 1024;
/// Read buffer of an upstream connection (response heads must fit in it).
pub const BUFFER: usize = 16 * 1024;
/// Largest response head accepted from an upstream (502 beyond it).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// One upstream connection and what has been read from it.
pub struct Conn {
    pub io: Tcp,
    pub buf: Vec<u8>,
    /// Bytes `buf[..end]` were read and not yet consumed.
    pub end: usize,
    /// Taken from the pool (it may have been closed by the upstream since).
    pub reused: bool,
    since: Instant,
    /// The connection's timer: the wait for each response head (on the heap: the connection
    /// moves in and out of the pool, the timer may not move).
    timer: Pin<Box<Sleep>>,
}

impl Conn {
    fn new(io: TcpStream) -> Self {
        Conn {
            io: Tcp::new(io),
            buf: vec![0; BUFFER],
            end: 0,
            reused: false,
            since: Instant::now(),
            timer: Box::pin(deadline::timer()),
        }
    }

    /// Not idle for too long at `now` and not closed (nor written to) by its upstream since.
    fn usable(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) <= IDLE_TIMEOUT && self.still_idle()
    }

    /// True when the upstream has neither closed the idle connection nor sent anything on it.
    /// Costs a system call only when the reactor saw the socket become readable.
    fn still_idle(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// Idle connections per upstream authority (a handful of upstreams: a list beats a map).
pub struct Pool {
    hosts: Mutex<Vec<Host>>,
    connect_timeout: Duration,
}

/// One upstream authority's idle connections and the requests waiting for one.
struct Host {
    authority: Authority,
    /// Oldest first.
    idle: Vec<Conn>,
    /// Requests waiting for a connection, oldest first (one that stopped waiting leaves a
    /// closed sender: skipped, and pruned).
    waiters: VecDeque<oneshot::Sender<Result<Conn, ConnectError>>>,
    /// Connects under way (each ends by handing its connection or its error on).
    connecting: usize,
}

/// Waiters are pruned of those that stopped waiting once there are this many.
const PRUNE_WAITERS: usize = 64;

/// Why no connection to the upstream could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Io(std::io::Error),
    #[error("connect timed out")]
    Timeout,
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Self {
        Pool {
            hosts: Mutex::new(Vec::new()),
            connect_timeout,
        }
    }

    /// The most recently returned idle connection that is still usable at `now` (checked
    /// outside the lock; dead ones are dropped outside it too).
    fn take(&self, authority: &Authority, now: Instant) -> Option<Conn> {
        loop {
            let mut c = {
                let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
                let host = hosts.iter_mut().find(|h| h.authority == *authority)?;
                host.idle.pop()?
            };
            if c.usable(now) {
                c.reused = true;
                return Some(c);
            }
        }
    }

    /// Drops connections idle for too long or closed by their upstream (called periodically,
    /// so sockets do not linger in CLOSE_WAIT once traffic stops).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut dead = Vec::new();
        {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            for host in hosts.iter_mut() {
                dead.extend(host.idle.extract_if(.., |c| !c.usable(now)));
                host.waiters.retain(|w| !w.is_closed());
            }
        }
        // Closed here, outside the lock.
        drop(dead);
    }

    /// Gives a connection back after an exchange that ended at a message boundary: to the
    /// oldest request waiting for one, else to the idle ones. It is idle from `now` (the end of
    /// the exchange or, as the fast path passes it, the arrival of the response: a little
    /// earlier, so it is dropped a little sooner, never later).
    pub fn put(&self, authority: &Authority, mut conn: Conn, now: Instant) {
        debug_assert_eq!(conn.end, 0);
        conn.reused = true;
        self.give(authority, Ok(conn), now, false);
    }

    /// Hands what a connect or an exchange gave to the oldest request still waiting; else a
    /// connection joins the idle ones (an error is only logged). `opened`: it comes from a
    /// connect, which ends here.
    fn give(
        &self,
        authority: &Authority,
        mut got: Result<Conn, ConnectError>,
        now: Instant,
        mut opened: bool,
    ) {
        loop {
            let waiter = {
                let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
                let host = Self::host(&mut hosts, authority);
                if opened {
                    host.connecting -= 1;
                    opened = false;
                }
                match host.waiters.pop_front() {
                    Some(w) => w,
                    None => {
                        let Ok(mut conn) = got else {
                            break;
                        };
                        conn.since = now;
                        // The oldest connections sit at the front: drop those idle too long.
                        let idle = &mut host.idle;
                        let stale = idle
                            .iter()
                            .take_while(|c| now.duration_since(c.since) > IDLE_TIMEOUT)
                            .count();
                        if stale > 0 {
                            idle.drain(..stale);
                        }
                        if idle.len() < MAX_IDLE_PER_HOST {
                            idle.push(conn);
                        }
                        return;
                    }
                }
            };
            // A connection given back that its upstream has written to again (bytes past the
            // answer's end, or its close) goes to nobody: the waiting request would read those
            // bytes as its answer. It waits on (for its connect, or the next one given back).
            // Idle connections are looked at when taken; a system call only when the reactor
            // saw the socket readable after the last read.
            if let Ok(c) = &got
                && c.reused
                && !c.still_idle()
            {
                let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
                Self::host(&mut hosts, authority).waiters.push_front(waiter);
                return;
            }
            // Handed over outside the lock (the waiter may be woken on another thread).
            match waiter.send(got) {
                Ok(()) => return,
                // That request stopped waiting: the next one.
                Err(back) => got = back,
            }
        }
        if let Err(e) = got {
            tracing::debug!(
                upstream = %authority,
                error = %e,
                "upstream connect failed with no request waiting"
            );
        }
    }

    fn host<'h>(hosts: &'h mut Vec<Host>, authority: &Authority) -> &'h mut Host {
        match hosts.iter().position(|h| h.authority == *authority) {
            Some(i) => &mut hosts[i],
            None => {
                hosts.push(Host {
                    authority: authority.clone(),
                    idle: Vec::new(),
                    waiters: VecDeque::new(),
                    connecting: 0,
                });
                hosts.last_mut().expect("just pushed")
            }
        }
    }

    /// A connection for an exchange: the most recent idle one; else the next one given back or
    /// opened (see the module's text). Fails when a connect fails while this request is the
    /// oldest in line.
    async fn acquire(
        self: &Arc<Self>,
        authority: &Authority,
        now: Instant,
    ) -> Result<Conn, ConnectError> {
        if let Some(c) = self.take(authority, now) {
            return Ok(c);
        }
        let (tx, rx) = oneshot::channel();
        let open = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            let host = Self::host(&mut hosts, authority);
            if host.waiters.len() >= PRUNE_WAITERS {
                host.waiters.retain(|w| !w.is_closed());
            }
            host.waiters.push_back(tx);
            let open = host.connecting < host.waiters.len();
            if open {
                host.connecting += 1;
            }
            open
        };
        if open {
            // On its own task: it goes on when this request stops waiting, for the next one.
            let (pool, authority) = (self.clone(), authority.clone());
            tokio::spawn(async move {
                let got = pool.connect(&authority).await;
                pool.give(&authority, got, Instant::now(), true);
            });
        }
        rx.await.unwrap_or_else(|_| {
            // The sender went with the pool.
            Err(ConnectError::Io(std::io::Error::other(
                "connection pool closed",
            )))
        })
    }

    /// Opens a new connection (every address of the host in turn, within the connect timeout).
    pub async fn connect(&self, authority: &Authority) -> Result<Conn, ConnectError> {
        let port = authority.port_u16().unwrap_or(80);
        let connect = async {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((authority.host(), port))
                .await
                .map_err(ConnectError::Io)?
                .collect();
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(ConnectError::Io(last.unwrap_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
            })))
        };
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| ConnectError::Timeout)??;
        let _ = stream.set_nodelay(true);
        Ok(Conn::new(stream))
    }
}

/// The full cause chain of an error, for log lines that say what actually failed
/// (e.g. "invalid peer certificate: UnknownIssuer").
pub fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// The one log line of an upstream request that failed (the client sees 502).
pub fn failed(route: &Route, connect: bool, error: &dyn std::error::Error) {
    tracing::warn!(
        route = %route.name,
        upstream = %route.upstream,
        connect,
        error = %cause_chain(error),
        "upstream request failed"
    );
}

/// Methods whose request may be sent again on a new connection (RFC 9110 §9.2.2).
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// What was found on an upstream connection while a request body was being copied to it.
enum Probe {
    /// The readiness was stale: nothing to read.
    Nothing,
    /// The upstream began its final response (the bytes are in the buffer).
    Answer,
    Closed,
}

/// An upstream connection being written to while it is watched for an early answer.
pub struct Watched<'c> {
    r: tokio::net::tcp::ReadHalf<'c>,
    w: tokio::net::tcp::WriteHalf<'c>,
    buf: &'c mut Vec<u8>,
    end: &'c mut usize,
}

impl Conn {
    pub fn watch(&mut self) -> Watched<'_> {
        let (r, w) = self.io.split();
        Watched {
            r,
            w,
            buf: &mut self.buf,
            end: &mut self.end,
        }
    }
}

impl Watched<'_> {
    /// Resolves when the upstream began its final answer (`Ok`) or closed (`Err`). Interim
    /// answers (`100 Continue`, `103 Early Hints`) are dropped and the upload goes on.
    pub async fn answered(&mut self) -> Result<(), ProxyError> {
        loop {
            if self.r.readable().await.is_err() {
                return Err(ProxyError::UpstreamUnavailable);
            }
            match probe(&self.r, self.buf, self.end) {
                Probe::Nothing => {}
                Probe::Answer => return Ok(()),
                Probe::Closed => return Err(ProxyError::UpstreamUnavailable),
            }
        }
    }

    /// Writes `data`. `Ok(false)`: the upstream answered before it was all written.
    pub async fn write(
        &mut self,
        data: &[u8],
        deadline: tokio::time::Instant,
    ) -> Result<bool, ProxyError> {
        use tokio::io::AsyncWriteExt;
        let Watched { r, w, buf, end } = self;
        let mut at = 0;
        while at < data.len() {
            tokio::select! {
                biased;
                ready = r.readable() => match ready.map(|()| probe(r, buf, end)) {
                    Ok(Probe::Nothing) => {}
                    Ok(Probe::Answer) => return Ok(false),
                    Ok(Probe::Closed) | Err(_) => return Err(ProxyError::UpstreamUnavailable),
                },
                n = w.write(&data[at..]) => match n {
                    Ok(k) if k > 0 => at += k,
                    _ => return Err(ProxyError::UpstreamUnavailable),
                },
                () = tokio::time::sleep_until(deadline) => return Err(ProxyError::UpstreamTimeout),
            }
        }
        Ok(true)
    }
}

/// Reads what the upstream sent while a request body was still being copied. Interim answers
/// are dropped; anything else — a final answer, or bytes that are no answer at all — ends the
/// upload.
fn probe(r: &tokio::net::tcp::ReadHalf<'_>, buf: &mut [u8], end: &mut usize) -> Probe {
    if *end == buf.len() {
        return Probe::Answer;
    }
    match r.try_read(&mut buf[*end..]) {
        Ok(0) => return Probe::Closed,
        Ok(n) => *end += n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Probe::Nothing,
        Err(_) => return Probe::Closed,
    }
    let mut fields = Vec::new();
    loop {
        match head::parse_response(&buf[..*end], false, &mut fields) {
            Ok(Some(h)) if (100..200).contains(&h.status) && h.status != 101 => {
                buf.copy_within(h.len..*end, 0);
                *end -= h.len;
            }
            // Not complete yet: keep copying the body until it is.
            Ok(None) if *end < buf.len() => return Probe::Nothing,
            _ => return Probe::Answer,
        }
        if *end == 0 {
            return Probe::Nothing;
        }
    }
}

/// The body of a request on its way upstream, as an engine holds it.
pub(crate) trait BodySource {
    /// True when body bytes remain to be copied after the head (and what was sent with it).
    fn pending(&self) -> bool;
    /// True while nothing has been taken from the client that could not be sent again: the
    /// exchange may be retried on another connection (the head, and what went with it, sent
    /// again, and the rest of the body pumped from where it is).
    fn replayable(&self) -> bool;
    /// Copies the rest of the body. `Ok(false)`: the upstream began to answer before it was
    /// complete.
    async fn pump(
        &mut self,
        uc: &mut Conn,
        deadline: tokio::time::Instant,
    ) -> Result<bool, ProxyError>;
}

/// A request whose whole body (if any) went with its head.
pub struct Whole;

impl BodySource for Whole {
    fn pending(&self) -> bool {
        false
    }

    fn replayable(&self) -> bool {
        true
    }

    async fn pump(&mut self, _: &mut Conn, _: tokio::time::Instant) -> Result<bool, ProxyError> {
        Ok(true)
    }
}

/// A finished exchange: the connection, the response head read from it, and whether the
/// request body was sent to its end.
pub struct Exchange {
    pub conn: Conn,
    pub head: ResponseHead,
    pub body_sent: bool,
}

impl Pool {
    /// Sends `head` (the request head and whatever body bytes are in memory) and the rest of
    /// `body` on a pooled or new connection, and reads the response head (its fields into
    /// `fields`), with the retry rule of this module. `sent`: now, as the caller read it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn exchange(
        self: &Arc<Self>,
        route: &Route,
        authority: &Authority,
        head: &[u8],
        body: &mut impl BodySource,
        method: &Method,
        sent: Instant,
        deadline: tokio::time::Instant,
        fields: &mut Vec<Field>,
    ) -> Result<Exchange, ProxyError> {
        let mut retried = false;
        loop {
            // A retry takes a new connection, not one given back; no timer unless it has to
            // wait (an idle connection is taken at once).
            let acquired = if retried {
                // On the heap: a retry is rare, and its state is most of this future's.
                deadline::until(deadline, Box::pin(self.connect(authority))).await
            } else {
                deadline::until(deadline, self.acquire(authority, sent)).await
            };
            let mut uc = match acquired {
                Err(_) => return Err(ProxyError::UpstreamTimeout),
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    failed(route, true, &e);
                    return Err(ProxyError::UpstreamUnavailable);
                }
            };
            match write_all(&mut uc.io, head, deadline).await {
                Ok(()) => {}
                Err(WriteError::Timeout) => return Err(ProxyError::UpstreamTimeout),
                Err(WriteError::Io { written: 0, .. }) if uc.reused => continue,
                Err(WriteError::Io { error, .. }) => {
                    failed(route, false, &error);
                    return Err(ProxyError::UpstreamUnavailable);
                }
            }
            // A reused connection closed before it answered anything, with nothing of the
            // request lost: once more on a new one (which is not reused, so only once).
            let retry = |uc: &Conn, replayable: bool| uc.reused && replayable && idempotent(method);
            let body_sent = if body.pending() {
                match body.pump(&mut uc, deadline).await {
                    Ok(sent) => sent,
                    Err(ProxyError::UpstreamUnavailable)
                        if uc.end == 0 && retry(&uc, body.replayable()) =>
                    {
                        retried = true;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                true
            };
            match read_response(&mut uc, *method == Method::HEAD, deadline, fields).await {
                Ok(res) => {
                    return Ok(Exchange {
                        conn: uc,
                        head: res,
                        body_sent,
                    });
                }
                Err(ReadError::Closed) if retry(&uc, body.replayable()) => {
                    retried = true;
                }
                Err(ReadError::Timeout) => return Err(ProxyError::UpstreamTimeout),
                Err(e) => {
                    failed(route, false, &e);
                    return Err(ProxyError::UpstreamUnavailable);
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("timed out")]
    Timeout,
    #[error("write failed after {written} bytes: {error}")]
    Io {
        error: std::io::Error,
        written: usize,
    },
}

async fn write_all(
    io: &mut Tcp,
    data: &[u8],
    deadline: tokio::time::Instant,
) -> Result<(), WriteError> {
    use tokio::io::AsyncWriteExt;
    let mut written = 0;
    while written < data.len() {
        match deadline::until(deadline, io.write(&data[written..])).await {
            Err(_) => return Err(WriteError::Timeout),
            Ok(Ok(0)) => {
                return Err(WriteError::Io {
                    error: std::io::ErrorKind::WriteZero.into(),
                    written,
                });
            }
            Ok(Ok(n)) => written += n,
            Ok(Err(error)) => return Err(WriteError::Io { error, written }),
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("timed out")]
    Timeout,
    /// Closed before a single byte of the response arrived.
    #[error("connection closed before any response")]
    Closed,
    #[error("{0}")]
    Io(std::io::Error),
    #[error(transparent)]
    Bad(#[from] head::BadResponse),
    #[error("response head larger than {MAX_RESPONSE_HEAD} bytes")]
    TooLarge,
    #[error("upstream switched protocols unasked")]
    Switched,
}

/// Reads the response head, skipping interim (1xx) responses.
async fn read_response(
    uc: &mut Conn,
    head_request: bool,
    deadline: tokio::time::Instant,
    fields: &mut Vec<Field>,
) -> Result<ResponseHead, ReadError> {
    use tokio::io::AsyncReadExt;
    let mut received = false;
    loop {
        if uc.end > 0 {
            match head::parse_response(&uc.buf[..uc.end], head_request, fields)? {
                Some(h) if h.status == 101 => return Err(ReadError::Switched),
                Some(h) if h.status < 200 => {
                    uc.buf.copy_within(h.len..uc.end, 0);
                    uc.end -= h.len;
                    continue;
                }
                Some(h) => return Ok(h),
                None => {}
            }
            if uc.end == uc.buf.len() {
                if uc.buf.len() >= MAX_RESPONSE_HEAD {
                    return Err(ReadError::TooLarge);
                }
                let len = (uc.buf.len() * 2).min(MAX_RESPONSE_HEAD);
                uc.buf.resize(len, 0);
            }
        }
        let read = uc.io.read(&mut uc.buf[uc.end..]);
        match deadline::on_timer(uc.timer.as_mut(), || deadline, read).await {
            Err(_) => return Err(ReadError::Timeout),
            Ok(Ok(0)) if !received => return Err(ReadError::Closed),
            Ok(Ok(0)) => return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(Ok(n)) => {
                uc.end += n;
                received = true;
            }
            Ok(Err(e))
                if !received
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    ) =>
            {
                return Err(ReadError::Closed);
            }
            Ok(Err(e)) => return Err(ReadError::Io(e)),
        }
    }
}

/// What the next look at a response body found.
pub enum Step {
    /// `conn.buf[range]` is body data.
    Data(std::ops::Range<usize>),
    /// Nothing more is buffered: call [`BodyReader::fill`].
    NeedRead,
    /// The body is complete.
    End,
}

/// Reads a response body from its connection by the head's framing (RFC 9112 §6.3). Chunk
/// extensions and trailer fields are dropped.
pub struct BodyReader {
    framing: Framing,
    pos: usize,
    left: u64,
    decoder: Decoder,
    done: bool,
}

impl BodyReader {
    pub fn new(head: &ResponseHead) -> Self {
        BodyReader {
            framing: head.framing,
            pos: head.len,
            left: match head.framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            decoder: Decoder::new(),
            done: false,
        }
    }

    /// The next data in the buffer, or what has to happen first; no I/O.
    pub fn step(&mut self, uc: &Conn) -> Result<Step, &'static str> {
        if self.done {
            return Ok(Step::End);
        }
        match self.framing {
            Framing::Empty => self.done = true,
            Framing::Length(_) if self.left == 0 => self.done = true,
            Framing::Length(_) => {
                if self.pos == uc.end {
                    return Ok(Step::NeedRead);
                }
                let n = self.left.min((uc.end - self.pos) as u64) as usize;
                let data = self.pos..self.pos + n;
                self.pos += n;
                self.left -= n as u64;
                return Ok(Step::Data(data));
            }
            Framing::Chunked => match self.decoder.decode(&uc.buf[self.pos..uc.end]) {
                Ok(chunked::Step::Data {
                    start,
                    len,
                    consumed,
                }) => {
                    let data = self.pos + start..self.pos + start + len;
                    self.pos += consumed;
                    return Ok(Step::Data(data));
                }
                Ok(chunked::Step::NeedMore) => {
                    self.pos = uc.end;
                    return Ok(Step::NeedRead);
                }
                Ok(chunked::Step::Done { consumed }) => {
                    self.pos += consumed;
                    self.done = true;
                }
                Err(_) => return Err("malformed chunked body from the upstream"),
            },
            Framing::Close => {
                if self.pos == uc.end {
                    return Ok(Step::NeedRead);
                }
                let data = self.pos..uc.end;
                self.pos = uc.end;
                return Ok(Step::Data(data));
            }
        }
        Ok(Step::End)
    }

    /// Reads more of the body; a pause longer than `idle` is an error ("stalled").
    pub async fn fill(&mut self, uc: &mut Conn, idle: Duration) -> Result<(), &'static str> {
        use tokio::io::AsyncReadExt;
        // A length-delimited body is read no further than its end, so the connection stays at
        // a message boundary.
        let want = match self.framing {
            Framing::Length(_) => self.left.min(uc.buf.len() as u64) as usize,
            _ => uc.buf.len(),
        };
        match deadline::within(idle, uc.io.read(&mut uc.buf[..want])).await {
            Ok(Ok(0)) if self.framing == Framing::Close => {
                // Ended by closing (the connection is not reusable).
                self.done = true;
                Ok(())
            }
            Ok(Ok(0)) => Err("upstream closed before the end of the body"),
            Ok(Ok(n)) => {
                uc.end = n;
                self.pos = 0;
                Ok(())
            }
            Ok(Err(_)) => Err("upstream read failed"),
            Err(_) => Err("upstream body stalled"),
        }
    }

    /// True when every byte of a length-delimited body has been stepped over: the next step
    /// is [`Step::End`], without reading.
    pub fn complete(&self) -> bool {
        self.done || matches!(self.framing, Framing::Length(_)) && self.left == 0
    }

    /// After [`Step::End`]: the connection ended exactly at the end of the response and can
    /// carry another (given the head allowed keep-alive).
    pub fn at_boundary(&self, uc: &Conn) -> bool {
        self.done && self.framing != Framing::Close && self.pos == uc.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener whose accept queue (backlog 0) is full: one connection waits in it, never
    /// accepted, so a new connect has its SYN dropped and hangs until the queue empties.
    async fn full_listener() -> (tokio::net::TcpListener, Authority, TcpStream) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let queued = TcpStream::connect(addr).await.unwrap();
        (listener, addr.to_string().parse().unwrap(), queued)
    }

    /// A connection to a listener of its own, to be given back to the pool.
    async fn spare(listener: &tokio::net::TcpListener) -> Conn {
        let c = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        Conn::new(c)
    }

    async fn waiters_become(pool: &Pool, authority: &Authority, n: usize) {
        for _ in 0..1000 {
            let len = {
                let hosts = pool.hosts.lock().unwrap();
                hosts
                    .iter()
                    .find(|h| h.authority == *authority)
                    .map_or(0, |h| h.waiters.iter().filter(|w| !w.is_closed()).count())
            };
            if len == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("waiters never became {n}");
    }

    fn peer(c: &Conn) -> SocketAddr {
        c.io.peer_addr().unwrap()
    }

    /// A pool, a full listener as its upstream, and another listener for connections to give
    /// back.
    struct Setup {
        pool: Arc<Pool>,
        full: tokio::net::TcpListener,
        authority: Authority,
        _queued: TcpStream,
        other: tokio::net::TcpListener,
    }

    impl Setup {
        async fn new() -> Setup {
            let (full, authority, _queued) = full_listener().await;
            Setup {
                pool: Arc::new(Pool::new(Duration::from_secs(30))),
                full,
                authority,
                _queued,
                other: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            }
        }

        /// A request for a connection, on a task of its own.
        fn acquire(&self) -> tokio::task::JoinHandle<Result<Conn, ConnectError>> {
            let (pool, authority) = (self.pool.clone(), self.authority.clone());
            tokio::spawn(async move { pool.acquire(&authority, Instant::now()).await })
        }

        async fn waiters_become(&self, n: usize) {
            waiters_become(&self.pool, &self.authority, n).await
        }

        /// Gives back a connection to the other listener.
        async fn give_back(&self) {
            let c = spare(&self.other).await;
            self.pool.put(&self.authority, c, Instant::now());
        }

        fn other_addr(&self) -> SocketAddr {
            self.other.local_addr().unwrap()
        }
    }

    #[tokio::test]
    async fn a_connection_given_back_goes_to_the_oldest_waiter_still_waiting_then_to_the_idle() {
        let t = Setup::new().await;
        let first = t.acquire();
        t.waiters_become(1).await;
        let second = t.acquire();
        let third = t.acquire();
        t.waiters_become(3).await;
        // The oldest stops waiting (its client went away): the next in line gets the first
        // connection given back, then the one after it.
        first.abort();
        assert!(matches!(first.await, Err(e) if e.is_cancelled()));
        t.give_back().await;
        let got = second.await.unwrap().unwrap();
        assert!(got.reused);
        assert_eq!(peer(&got), t.other_addr());
        assert!(!third.is_finished());
        t.give_back().await;
        assert_eq!(peer(&third.await.unwrap().unwrap()), t.other_addr());
        // Nobody waits: the next one is idle, for the next request.
        t.give_back().await;
        let idle = t.pool.take(&t.authority, Instant::now()).expect("pooled");
        assert_eq!(peer(&idle), t.other_addr());
    }

    /// A connection whose upstream wrote more than its answer (bytes past the body's end, in
    /// the same write) goes to nobody: a waiting request would read them as its own answer,
    /// and its real answer would then reach the next request on the connection.
    #[tokio::test]
    async fn a_connection_given_back_with_bytes_past_its_answer_goes_to_nobody() {
        use tokio::io::AsyncWriteExt;
        let t = Setup::new().await;
        let waiter = t.acquire();
        t.waiters_become(1).await;
        let c = TcpStream::connect(t.other_addr()).await.unwrap();
        let (mut upstream, _) = t.other.accept().await.unwrap();
        upstream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!")
            .await
            .unwrap();
        c.readable().await.unwrap();
        t.pool.put(&t.authority, Conn::new(c), Instant::now());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "the waiter got the written-to connection"
        );
        assert!(t.pool.take(&t.authority, Instant::now()).is_none());
        // A clean one goes to it.
        t.give_back().await;
        assert_eq!(peer(&served(waiter, "clean").await), t.other_addr());
    }

    #[tokio::test]
    async fn a_connect_whose_request_was_served_meanwhile_pools_its_connection() {
        let t = Setup::new().await;
        let waiter = t.acquire();
        t.waiters_become(1).await;
        t.give_back().await;
        assert_eq!(peer(&waiter.await.unwrap().unwrap()), t.other_addr());
        assert!(t.pool.take(&t.authority, Instant::now()).is_none());
        // The queue empties: the connect still under way (its SYN sent again by the kernel)
        // completes and, nobody waiting, its connection waits in the pool.
        let _accepted = t.full.accept().await.unwrap();
        let pooled = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(c) = t.pool.take(&t.authority, Instant::now()) {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the background connection joined the pool");
        assert_eq!(peer(&pooled), t.full.local_addr().unwrap());
    }

    /// The connection a request got, within 20 s (a dropped SYN is sent again after 1 s, then
    /// 3 s, once the listener's queue has room).
    async fn served(
        request: tokio::task::JoinHandle<Result<Conn, ConnectError>>,
        what: &str,
    ) -> Conn {
        tokio::time::timeout(Duration::from_secs(20), request)
            .await
            .unwrap_or_else(|_| panic!("timed out: {what}"))
            .unwrap()
            .unwrap()
    }

    fn connecting(t: &Setup) -> usize {
        let hosts = t.pool.hosts.lock().unwrap();
        hosts
            .iter()
            .find(|h| h.authority == t.authority)
            .map_or(0, |h| h.connecting)
    }

    #[tokio::test]
    async fn a_request_in_line_behind_enough_connects_opens_none_and_takes_the_next() {
        let t = Setup::new().await;
        let first = t.acquire();
        t.waiters_become(1).await;
        assert_eq!(connecting(&t), 1);
        // Served by a connection given back; its connect goes on.
        t.give_back().await;
        assert_eq!(peer(&first.await.unwrap().unwrap()), t.other_addr());
        assert_eq!(connecting(&t), 1);
        // The next request finds that connect enough: it opens none and gets its connection.
        let second = t.acquire();
        t.waiters_become(1).await;
        assert_eq!(connecting(&t), 1);
        // A third is one more than the connects under way: it opens one.
        let third = t.acquire();
        t.waiters_become(2).await;
        assert_eq!(connecting(&t), 2);
        let _accepted = t.full.accept().await.unwrap();
        let a = served(second, "the connect under way served the second").await;
        assert_eq!(peer(&a), t.full.local_addr().unwrap());
        assert!(!a.reused);
        // The listener takes the next: the third's connect completes.
        let _accepted = t.full.accept().await.unwrap();
        let b = served(third, "its own connect served the third").await;
        assert_eq!(peer(&b), t.full.local_addr().unwrap());
        assert_eq!(connecting(&t), 0);
    }

    #[tokio::test]
    async fn a_request_that_cannot_get_a_connection_by_its_deadline_is_answered_504() {
        // The connect hangs (a dropped SYN) and its own timeout, 30 s, is far off: the
        // request's deadline ends the wait.
        let t = Setup::new().await;
        let upstream: http::Uri = format!("http://{}/", t.authority).parse().unwrap();
        let routes = crate::route::RouteTable::new(&[], &upstream, &crate::clock::Clock::real());
        let route = routes.find("/").unwrap();
        let started = tokio::time::Instant::now();
        let exchanged = tokio::time::timeout(
            Duration::from_secs(20),
            t.pool.exchange(
                route,
                &t.authority,
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                &mut Whole,
                &Method::GET,
                Instant::now(),
                started + Duration::from_millis(300),
                &mut Vec::new(),
            ),
        )
        .await
        .expect("the deadline ended the wait");
        assert!(matches!(exchanged, Err(ProxyError::UpstreamTimeout)));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_failed_connect_fails_the_request_and_leaves_no_waiter_behind() {
        let pool = Arc::new(Pool::new(Duration::from_secs(30)));
        // Bound, not listening: refused.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let authority: Authority = socket.local_addr().unwrap().to_string().parse().unwrap();
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            pool.acquire(&authority, Instant::now()),
        )
        .await
        .expect("the failed connect's error reached the request")
        .err();
        assert!(matches!(e, Some(ConnectError::Io(_))), "{e:?}");
        waiters_become(&pool, &authority, 0).await;
        // A connection given back now is idle, not handed to the request that failed.
        let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        pool.put(&authority, spare(&other).await, Instant::now());
        assert!(pool.take(&authority, Instant::now()).is_some());
    }
}
