//! The HTTP/1.1 fast path of the proxy listener. One task per client connection reads request
//! heads into a reused buffer, shows them to the policy core ([`Gateway::route`],
//! [`Gateway::admit`]), writes each request upstream as one buffer through the one upstream
//! client ([`super::upstream`]) on a connection it owns for the exchange, and relays the
//! response: no header map, no channel or task between the two connections, no allocation per
//! request.
//!
//! It takes only plain requests (see [`head`]). Anything else — HTTP/1.0, chunked or `Expect`
//! uploads, upgrades, unusual targets, malformed or oversized heads, `POST /auth/login`,
//! routes to `https://` upstreams — is handed to hyper together with the bytes already read,
//! and hyper serves the rest of the connection exactly as it would have from its start.
//!
//! Timeouts: a request head must be complete within `limits.header_read_timeout` of the
//! previous exchange (idle keep-alive time counts); a request body that pauses for
//! `limits.body_timeout` is answered 408; the upstream's response head must arrive within
//! `proxy.upstream_timeout` of sending (504), and its body may not pause longer than that; a
//! client that takes no response bytes for `limits.body_timeout` is dropped.
//!
//! A request whose body was not read to its end (refused, or answered early by the upstream)
//! ends its connection: the answer says `Connection: close`, the write side is shut, and what
//! the client still sends is read and dropped for a moment so the answer is not lost to a reset.
//! So does any close the client did not ask for (the listener draining, a broken exchange) or
//! that leaves bytes of its unread. A connection the client asked to close (`Connection: close`)
//! whose input was read to the end of that request is closed as soon as its answer is written:
//! what could still arrive (a TLS client's close_notify) comes after the client read the
//! answer, and waiting for it would cost a wakeup and hold the connection for nothing.

use std::pin::{Pin, pin};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Scheme;
use http::{Method, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Sleep;

use super::codec::head::{self, Field, Framing, Parsed, RequestHead, ResponseHead};
use super::codec::wire::{self, BodyOut, Out};
use super::deadline;
use super::drain::{DrainWait, draining};
use super::headers;
use super::policy::{self, RequestView, Routed};
use super::upstream::{BodyReader, BodySource, Conn, Exchange, Step};
use super::{ConnInfo, Gateway, Outcome};
use crate::auth::credential;
use crate::proxy::error::ProxyError;

/// Initial read buffer of a client connection; it grows up to `limits.max_header_bytes` for a
/// large head.
const READ_BUFFER: usize = 8 * 1024;
/// Request body bytes read from the client at a time.
const BODY_CHUNK: usize = 16 * 1024;
/// Relayed response bytes gathered before they are written to the client.
const FLUSH_AT: usize = 16 * 1024;
/// How long a closing connection's remaining input is read and dropped.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes read and dropped while lingering.
const LINGER_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Settings {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub body_timeout: Duration,
}

/// How a connection left the fast path.
pub enum End {
    Closed,
    /// Hyper serves the rest of the connection, starting with `read` (bytes already read from
    /// it and not consumed). `served`: requests the fast path answered before.
    Handover {
        read: Vec<u8>,
        served: u64,
    },
}

enum Next {
    KeepAlive,
    /// `linger`: the client may still be sending (see the module's notes).
    Close {
        linger: bool,
    },
    Handover,
}

/// Why an exchange did not end with a relayed response.
enum Stop {
    /// The gateway answers (an error, the health check).
    Answer(Response<Bytes>),
    /// Hyper takes the connection from this request on.
    Handover,
    /// The exchange broke after the response had begun: the connection is closed.
    Abort(u16),
}

impl From<ProxyError> for Stop {
    fn from(e: ProxyError) -> Stop {
        Stop::Answer(e.response())
    }
}

/// A relayed response.
struct Relayed {
    status: u16,
    close: bool,
}

/// Serves requests on `io` until the connection ends or hyper has to take over.
pub async fn serve<I>(
    io: &mut I,
    gw: &Gateway,
    conn: &ConnInfo,
    st: &Settings,
    drain: &watch::Receiver<bool>,
) -> End
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let timer = pin!(deadline::timer());
    let drained = pin!(super::drain::changed(drain));
    let mut c = Client {
        io,
        timer,
        drained: DrainWait::new(drained),
        buf: Vec::new(),
        start: 0,
        end: 0,
        body_in_buf: 0,
        unread: 0,
        out: Vec::new(),
        fields: Vec::new(),
        ufields: Vec::new(),
    };
    let mut served = 0;
    // Nothing but the connection's state is held across the wait for a head: the head is held
    // only while its exchange runs (in the room the read's state takes while it waits), and
    // the ends of a connection are boxed as the exchange is (their timers and writes would
    // otherwise widen every idle connection's state to their size).
    let refused = loop {
        let next = {
            let head = match c.read_head(gw, st, drain).await {
                HeadRead::Head(h) => h,
                HeadRead::Closed => return End::Closed,
                HeadRead::Handover => {
                    return End::Handover {
                        read: c.buf[c.start..c.end].to_vec(),
                        served,
                    };
                }
                HeadRead::Refuse(why) => break why,
            };
            // On the heap for the exchange only (freed at its end and reused by the allocator
            // for the next): between requests a connection's state is a few hundred bytes, so
            // thousands of idle keep-alive connections stay cheap.
            Box::pin(c.exchange(gw, conn, st, &head, drain)).await
        };
        match next {
            Next::KeepAlive => {
                served += 1;
                c.rest();
            }
            Next::Close { linger: true } => {
                Box::pin(c.linger()).await;
                return End::Closed;
            }
            Next::Close { linger: false } => {
                Box::pin(c.shut()).await;
                return End::Closed;
            }
            Next::Handover => {
                return End::Handover {
                    read: c.buf[c.start..c.end].to_vec(),
                    served,
                };
            }
        }
    };
    Box::pin(c.refuse(gw, st, refused)).await;
    End::Closed
}

enum HeadRead {
    Head(RequestHead),
    Closed,
    Handover,
    /// Answered 400, then the connection closes.
    Refuse(&'static str),
}

struct Client<'c, I> {
    io: &'c mut I,
    /// The connection's timer: the wait for each request head.
    timer: Pin<&'c mut Sleep>,
    /// What an idle wait for the next head also waits for.
    drained: DrainWait<'c>,
    /// `buf[start..end]`: read from the client and not yet consumed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Body bytes of the current request held in `buf` right after its head.
    body_in_buf: usize,
    /// Body bytes of the current request the client has not sent yet.
    unread: u64,
    /// What is written next: the upstream request, then the client's response.
    out: Vec<u8>,
    fields: Vec<Field>,
    ufields: Vec<Field>,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Client<'_, I> {
    async fn read_head(
        &mut self,
        gw: &Gateway,
        st: &Settings,
        drain: &watch::Receiver<bool>,
    ) -> HeadRead {
        let mut deadline = None;
        loop {
            if self.end > self.start {
                let msg = &self.buf[self.start..self.end];
                let rules = &gw.policy.fields;
                // Taken and given back together (`rest`): no field list, none of them held.
                if self.fields.capacity() == 0 {
                    let w = spare::take_work();
                    (self.out, self.fields, self.ufields) = (w.out, w.fields, w.upstream_fields);
                }
                match head::parse_request(msg, rules, st.max_headers, &mut self.fields) {
                    // Hyper answers 431.
                    Parsed::Complete(h) if h.len > st.max_header_bytes => {
                        return HeadRead::Handover;
                    }
                    Parsed::Complete(h) => return HeadRead::Head(h),
                    Parsed::Handover => return HeadRead::Handover,
                    Parsed::Refuse(why) => return HeadRead::Refuse(why),
                    Parsed::Partial => {}
                }
                // Hyper reads on and answers 431.
                if self.end - self.start >= st.max_header_bytes {
                    return HeadRead::Handover;
                }
            } else if draining(drain) {
                return HeadRead::Closed;
            }
            if !self.buf.is_empty() && self.end == self.buf.len() {
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                } else {
                    let len = (self.buf.len() * 2).min(st.max_header_bytes + 1);
                    self.buf.resize(len.max(self.buf.len() + 1), 0);
                }
            }
            let idle = self.start == self.end;
            let limit = st.header_read_timeout;
            let read = deadline::on_timer(
                self.timer.as_mut(),
                || *deadline.get_or_insert_with(|| tokio::time::Instant::now() + limit),
                read_into(self.io, &mut self.buf, self.end),
            );
            let got = if idle {
                let drained = &mut self.drained;
                tokio::select! {
                    biased;
                    r = read => r,
                    () = std::future::poll_fn(|cx| drained.poll(cx, drain)) => {
                        return HeadRead::Closed;
                    }
                }
            } else {
                read.await
            };
            match got {
                Ok(Ok(n)) if n > 0 => self.end += n,
                // End of input, an error, or the head took too long: hyper closes too.
                _ => return HeadRead::Closed,
            }
        }
    }

    async fn exchange(
        &mut self,
        gw: &Gateway,
        conn: &ConnInfo,
        st: &Settings,
        head: &RequestHead,
        drain: &watch::Receiver<bool>,
    ) -> Next {
        let started = gw.access_log.then(Instant::now);
        let body_at = self.start + head.len;
        self.body_in_buf = ((self.end - body_at) as u64).min(head.body_len()) as usize;
        self.unread = head.body_len() - self.body_in_buf as u64;
        let mut outcome = Outcome::default();
        let (status, close) = match self.relay(gw, conn, st, head, &mut outcome, drain).await {
            Ok(r) => (r.status, r.close),
            Err(Stop::Handover) => return Next::Handover,
            Err(Stop::Abort(status)) => (status, true),
            Err(Stop::Answer(mut res)) => {
                let view = View {
                    head,
                    buf: &self.buf[self.start..self.end],
                    fields: &self.fields,
                };
                gw.cors_own(outcome.route, &view, &mut res);
                let close = self.unread > 0 || head.close || draining(drain);
                self.out.clear();
                let head_request = head.method == Method::HEAD;
                wire::own_response(&mut self.out, &res, head_request, close, gw.auth.clock());
                let written = write_client(self.io, &self.out, st.body_timeout).await;
                (res.status().as_u16(), close || written.is_err())
            }
        };
        let path = head.path(&self.buf[self.start..self.end]);
        gw.finish(&head.method, path, &outcome, status, started, conn);
        if close {
            let all_read = self.unread == 0 && self.end == body_at + self.body_in_buf;
            return Next::Close {
                linger: !(head.close && all_read),
            };
        }
        self.start = body_at + self.body_in_buf;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Next::KeepAlive
    }

    /// Routes, admits and forwards one request, and relays the upstream's response.
    async fn relay<'g>(
        &mut self,
        gw: &'g Gateway,
        conn: &ConnInfo,
        st: &Settings,
        head: &RequestHead,
        outcome: &mut Outcome<'g>,
        drain: &watch::Receiver<bool>,
    ) -> Result<Relayed, Stop> {
        let msg = &self.buf[self.start..self.end];
        let view = View {
            head,
            buf: msg,
            fields: &self.fields,
        };
        let route = match gw.route(&view, outcome)? {
            Routed::Health => return Err(Stop::Answer(policy::health())),
            // Hyper reads the body; the core answers.
            Routed::Login | Routed::SecretScanning => return Err(Stop::Handover),
            // The core decides (below); nothing is forwarded.
            Routed::Verify => None,
            // Answered by the core; nothing is forwarded.
            Routed::Preflight(route, answer) => {
                outcome.route = route;
                return Err(Stop::Answer(answer.unwrap_or_else(|e| e.response())));
            }
            Routed::Jwks => return Err(Stop::Answer(gw.jwks())),
            Routed::Route(route) => Some(route),
        };
        // Awaited past the match, so that the routing's values are not held while it runs
        // (they would widen every request's state).
        let Some(route) = route else {
            return Err(Stop::Answer(gw.verify(&view, conn, outcome).await));
        };
        outcome.route = Some(route);
        if route.upstream.scheme() != Some(&Scheme::HTTP) {
            return Err(Stop::Handover);
        }
        let Some(authority) = route.upstream.authority() else {
            return Err(ProxyError::UpstreamUnavailable.into());
        };
        let admitted = gw.admit(route, &view, conn, outcome).await?;
        let cors = gw.cors(Some(route)).map(|c| {
            let origin = self
                .fields
                .iter()
                .find(|f| f.name.get(msg).eq_ignore_ascii_case(b"origin"))
                .map(|f| f.value);
            (c, c.grant(origin.map(|o| o.get(msg))), origin)
        });

        self.out.clear();
        wire::request_head(
            &mut self.out,
            wire::spans(msg, &self.fields),
            &wire::Upstream {
                method: head.method.as_str().as_bytes(),
                target: admitted
                    .target
                    .as_deref()
                    .map_or_else(|| head.target.get(msg), str::as_bytes),
                strip: admitted.strip,
                identity: admitted.permit.principal().map(|p| &p.headers),
                assertion: admitted.assertion.as_ref().map(http::HeaderValue::as_bytes),
                xff: head.xff.map(|s| s.get(msg)),
                client_host: head.host.map(|s| s.get(msg)),
                peer_ip: conn.peer_ip.as_bytes(),
                proto: conn.proto.as_bytes(),
                host: route.host.as_bytes(),
                body: head.content_length.map_or(BodyOut::None, BodyOut::Length),
            },
        );
        let body_at = self.start + head.len;
        self.out
            .extend_from_slice(&self.buf[body_at..body_at + self.body_in_buf]);

        let sent = Instant::now();
        let deadline = tokio::time::Instant::from_std(sent + gw.upstreams.timeout);
        let pumped = self.unread > 0;
        let mut body = FastBody {
            io: &mut *self.io,
            buf: &mut self.buf,
            body_at,
            unread: &mut self.unread,
            timeout: st.body_timeout,
            copied: false,
        };
        let exchanged = gw
            .upstreams
            .pool
            .exchange(
                route,
                authority,
                &self.out,
                &mut body,
                &head.method,
                sent,
                deadline,
                &mut self.ufields,
            )
            .await;
        if pumped {
            // The buffer past the head carried the body: nothing of it is left there.
            self.body_in_buf = 0;
            self.end = body_at;
        }
        let Exchange {
            conn: mut uc,
            head: res,
            body_sent,
        } = match exchanged {
            Ok(x) => x,
            Err(e) => {
                if e.status().is_server_error() {
                    gw.metrics.upstream_errors.inc();
                }
                // Admitted and charged: the answer says what is left, as a relayed one does.
                let mut res = e.response();
                if let Some(rate) = &admitted.rate {
                    headers::add_rate(res.headers_mut(), rate);
                }
                return Err(Stop::Answer(res));
            }
        };
        let answered = Instant::now();
        let upstream_time = answered - sent;
        outcome.upstream = Some(upstream_time);
        gw.metrics.upstream_latency.observe(upstream_time);

        let close = !body_sent || head.close || draining(drain);
        let framing = match res.framing {
            Framing::Empty | Framing::Length(_) => Out::AsIs,
            Framing::Chunked | Framing::Close => Out::Chunked,
        };
        self.out.clear();
        wire::response_head(
            &mut self.out,
            &uc.buf[..uc.end],
            &res,
            &self.ufields,
            admitted.rate.as_ref().map(|r| (r, &gw.policy.cache)),
            framing,
            close,
            gw.auth.clock(),
            cors.map(|(c, grant, origin)| {
                let msg = &self.buf[self.start..];
                (c, grant, origin.map_or(&b""[..], |o| o.get(msg)))
            }),
        );
        match self
            .relay_body(&mut uc, &res, framing, st, gw.upstreams.timeout)
            .await
        {
            Ok(at_boundary) => {
                // After a bodiless answer (HEAD, 204, 304) the connection is not reused: an
                // upstream that wrongly sends a body there cannot make it the next answer.
                let bodiless = res.framing == Framing::Empty;
                if at_boundary && body_sent && res.keep_alive && !bodiless {
                    uc.end = 0;
                    gw.upstreams.pool.put(authority, uc, answered);
                }
                Ok(Relayed {
                    status: res.status,
                    close,
                })
            }
            Err(why) => {
                tracing::debug!(route = %route.name, why, "response relay broken off");
                Err(Stop::Abort(res.status))
            }
        }
    }

    /// Writes `self.out` (the response head) and the response body to the client.
    /// `Ok(true)`: the upstream connection ended exactly at the end of the response.
    async fn relay_body(
        &mut self,
        uc: &mut Conn,
        res: &ResponseHead,
        framing: Out,
        st: &Settings,
        idle: Duration,
    ) -> Result<bool, &'static str> {
        let to_client = st.body_timeout;
        let mut reader = BodyReader::new(res);
        loop {
            match reader.step(uc)? {
                Step::Data(data) if framing == Out::AsIs => {
                    // The head goes out with the first bytes; the rest straight from the
                    // upstream's buffer.
                    if self.out.is_empty() {
                        write_client(self.io, &uc.buf[data], to_client).await?;
                    } else {
                        self.out.extend_from_slice(&uc.buf[data]);
                        write_client(self.io, &self.out, to_client).await?;
                        self.out.clear();
                    }
                }
                Step::Data(data) => {
                    wire::chunk_start(&mut self.out, data.len());
                    self.out.extend_from_slice(&uc.buf[data]);
                    self.out.extend_from_slice(wire::CHUNK_END);
                    if self.out.len() >= FLUSH_AT {
                        write_client(self.io, &self.out, to_client).await?;
                        self.out.clear();
                    }
                }
                Step::NeedRead => {
                    if !self.out.is_empty() {
                        write_client(self.io, &self.out, to_client).await?;
                        self.out.clear();
                    }
                    reader.fill(uc, idle).await?;
                }
                Step::End => {
                    if framing == Out::Chunked {
                        self.out.extend_from_slice(wire::LAST_CHUNK);
                    }
                    if !self.out.is_empty() {
                        write_client(self.io, &self.out, to_client).await?;
                        self.out.clear();
                    }
                    return Ok(reader.at_boundary(uc));
                }
            }
        }
    }

    /// Answers 400 for a head that is refused, then closes lingering.
    async fn refuse(&mut self, gw: &Gateway, st: &Settings, why: &'static str) {
        let res: Response<Bytes> = ProxyError::BadRequest(why).response();
        gw.metrics.route(None).record(res.status().as_u16());
        self.out.clear();
        wire::own_response(&mut self.out, &res, false, true, gw.auth.clock());
        let _ = write_client(self.io, &self.out, st.body_timeout).await;
        self.linger().await;
    }

    /// Shuts the write side (the client asked to close and sent nothing more).
    async fn shut(&mut self) {
        let _ = tokio::time::timeout(LINGER, self.io.shutdown()).await;
    }

    /// Shuts the write side, then reads and drops what the client still sends for a moment, so
    /// the last answer reaches it before the connection is closed.
    async fn linger(&mut self) {
        let io = &mut *self.io;
        let _ = tokio::time::timeout(LINGER, async {
            let _ = io.shutdown().await;
            // On the heap: it is needed only now, at the end.
            let mut sink = vec![0u8; 4096];
            let mut total = 0;
            while total < LINGER_BYTES {
                match io.read(&mut sink).await {
                    Ok(n) if n > 0 => total += n,
                    _ => break,
                }
            }
        })
        .await;
    }
}

impl<I> Client<'_, I> {
    /// Between requests: with nothing of the next one read yet, the buffers and field lists go
    /// back to the thread's spares, so an idle keep-alive connection holds none.
    fn rest(&mut self) {
        if self.start == self.end {
            spare::give_read(std::mem::take(&mut self.buf));
            spare::give_work(spare::Work {
                out: std::mem::take(&mut self.out),
                fields: std::mem::take(&mut self.fields),
                upstream_fields: std::mem::take(&mut self.ufields),
            });
        }
    }
}

/// Reads from `io` into `buf[end..]`. A connection without a buffer (idle, see
/// [`Client::rest`]) takes one from the spares only when bytes arrive: while it waits it holds
/// none.
async fn read_into<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut Vec<u8>,
    end: usize,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        if buf.is_empty() {
            let mut fresh = spare::take_read();
            let mut rb = tokio::io::ReadBuf::new(&mut fresh);
            let polled = std::pin::Pin::new(&mut *io).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            match polled {
                std::task::Poll::Ready(Ok(())) => {
                    *buf = fresh;
                    std::task::Poll::Ready(Ok(n))
                }
                other => {
                    spare::give_read(fresh);
                    other.map_ok(|()| 0)
                }
            }
        } else {
            let mut rb = tokio::io::ReadBuf::new(&mut buf[end..]);
            std::pin::Pin::new(&mut *io)
                .poll_read(cx, &mut rb)
                .map_ok(|()| rb.filled().len())
        }
    })
    .await
}

/// The buffers of connections between requests, kept per thread for the next request of any
/// connection: under load a request takes and gives back the same few buffers (no allocation),
/// and thousands of idle keep-alive connections cost no buffer memory. Public for the benches.
pub mod spare {
    use std::cell::RefCell;

    use super::{Field, READ_BUFFER};

    /// Most spare buffers of each kind kept per thread; past it they are freed.
    const MAX_SPARE: usize = 512;
    /// Capacity of a new response/upstream-request buffer.
    const OUT_BUFFER: usize = 4096;
    /// Buffers that grew past this (large heads, request bodies) are freed, not kept.
    const MAX_KEPT: usize = 32 * 1024;
    /// Capacity of a new field list (a head's fields; more grow it).
    const FIELDS: usize = 16;
    /// Field lists that grew past this are freed, not kept.
    const MAX_KEPT_FIELDS: usize = 128;

    thread_local! {
        static READS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
        static WORK: RefCell<Vec<Work>> = const { RefCell::new(Vec::new()) };
    }

    /// A read buffer: `READ_BUFFER` bytes long (its content is not meaningful).
    pub fn take_read() -> Vec<u8> {
        READS
            .with(|s| s.borrow_mut().pop())
            .unwrap_or_else(|| vec![0; READ_BUFFER])
    }

    pub fn give_read(mut b: Vec<u8>) {
        if b.len() < READ_BUFFER || b.capacity() > MAX_KEPT {
            return;
        }
        b.truncate(READ_BUFFER);
        keep(&READS, b);
    }

    /// What an exchange writes and parses into, taken when a request head has arrived and given
    /// back together when the connection is idle again.
    pub struct Work {
        /// The upstream request, then the client's response.
        pub out: Vec<u8>,
        /// The request head's fields.
        pub fields: Vec<Field>,
        /// The upstream response head's fields.
        pub upstream_fields: Vec<Field>,
    }

    /// An empty output buffer and field lists.
    pub fn take_work() -> Work {
        WORK.with(|s| s.borrow_mut().pop()).unwrap_or_else(|| Work {
            out: Vec::with_capacity(OUT_BUFFER),
            fields: Vec::with_capacity(FIELDS),
            upstream_fields: Vec::with_capacity(FIELDS),
        })
    }

    pub fn give_work(mut w: Work) {
        let fits = (1..=MAX_KEPT).contains(&w.out.capacity())
            && (1..=MAX_KEPT_FIELDS).contains(&w.fields.capacity())
            && (1..=MAX_KEPT_FIELDS).contains(&w.upstream_fields.capacity());
        if !fits {
            return;
        }
        w.out.clear();
        w.fields.clear();
        w.upstream_fields.clear();
        keep(&WORK, w);
    }

    fn keep<T: 'static>(pool: &'static std::thread::LocalKey<RefCell<Vec<T>>>, b: T) {
        // A thread being torn down drops the buffer instead.
        let _ = pool.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < MAX_SPARE {
                s.push(b);
            }
        });
    }
}

/// The fast path's request as the policy core sees it.
struct View<'a> {
    head: &'a RequestHead,
    buf: &'a [u8],
    fields: &'a [Field],
}

impl RequestView for View<'_> {
    fn method(&self) -> &Method {
        &self.head.method
    }

    fn path(&self) -> &str {
        self.head.path(self.buf)
    }

    fn query(&self) -> Option<&str> {
        self.head.query(self.buf)
    }

    fn authorization(&self) -> Option<&str> {
        self.head
            .authorization
            .and_then(|s| credential::header_text(s.get(self.buf)))
    }

    fn authorizations(&self) -> bool {
        // A request with more is handed over.
        false
    }

    fn api_keys(&self, _: &http::HeaderName) -> bool {
        // A request with more is handed over.
        false
    }

    fn api_key(&self, _: &http::HeaderName) -> Option<&str> {
        self.head
            .api_key
            .and_then(|s| credential::header_text(s.get(self.buf)))
    }

    fn forwarded_for(&self) -> impl Iterator<Item = Option<&str>> {
        // One line at most: a request with more is handed over.
        self.head
            .xff
            .map(|s| credential::header_text(s.get(self.buf)))
            .into_iter()
    }

    fn forwarded(&self) -> impl Iterator<Item = Option<&str>> {
        // Read only when the peer is a trusted proxy.
        self.fields
            .iter()
            .filter(|f| f.name.get(self.buf).eq_ignore_ascii_case(b"forwarded"))
            .map(|f| credential::header_text(f.value.get(self.buf)))
    }

    fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|f| f.name.get(self.buf).eq_ignore_ascii_case(name.as_bytes()))
            .map(|f| f.value.get(self.buf))
    }

    fn repeated(&self, name: &str) -> bool {
        self.fields
            .iter()
            .filter(|f| f.name.get(self.buf).eq_ignore_ascii_case(name.as_bytes()))
            .nth(1)
            .is_some()
    }
}

/// The rest of a `Content-Length` request body, copied from the client to the upstream.
struct FastBody<'a, I> {
    io: &'a mut I,
    /// The client connection's buffer; the body passes through `buf[body_at..]`.
    buf: &'a mut Vec<u8>,
    body_at: usize,
    /// Body bytes the client has not sent yet.
    unread: &'a mut u64,
    timeout: Duration,
    /// Bytes read from the client were copied upstream: they cannot be sent again.
    copied: bool,
}

impl<I: AsyncRead + Unpin> BodySource for FastBody<'_, I> {
    fn pending(&self) -> bool {
        *self.unread > 0
    }

    fn replayable(&self) -> bool {
        !self.copied
    }

    async fn pump(
        &mut self,
        uc: &mut Conn,
        deadline: tokio::time::Instant,
    ) -> Result<bool, ProxyError> {
        let at = self.body_at;
        if self.buf.len() < at + BODY_CHUNK {
            self.buf.resize(at + BODY_CHUNK, 0);
        }
        let mut up = uc.watch();
        while *self.unread > 0 {
            let room = (*self.unread).min(BODY_CHUNK as u64) as usize;
            let n = tokio::select! {
                biased;
                a = up.answered() => return a.map(|()| false),
                r = tokio::time::timeout(self.timeout, self.io.read(&mut self.buf[at..at + room])) => {
                    match r {
                        Err(_) => return Err(ProxyError::BodyTimeout),
                        Ok(Ok(n)) if n > 0 => n,
                        Ok(_) => return Err(ProxyError::BadRequest(CUT_SHORT)),
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Err(ProxyError::UpstreamTimeout),
            };
            *self.unread -= n as u64;
            self.copied = true;
            if !up.write(&self.buf[at..at + n], deadline).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The answer to a request body that is malformed or ends early.
pub const CUT_SHORT: &str = "the request body is malformed or was cut short";

/// Writes `data` to the client; `timeout` bounds each pause (a client that takes no bytes for
/// that long), not the whole write.
async fn write_client<I: AsyncWrite + Unpin>(
    io: &mut I,
    data: &[u8],
    timeout: Duration,
) -> Result<(), &'static str> {
    let mut written = 0;
    while written < data.len() {
        match deadline::within(timeout, io.write(&data[written..])).await {
            Ok(Ok(n)) if n > 0 => written += n,
            Ok(_) => return Err("client write failed"),
            Err(_) => return Err("client stopped reading"),
        }
    }
    match deadline::within(timeout, io.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("client write failed"),
        Err(_) => Err("client stopped reading"),
    }
}
