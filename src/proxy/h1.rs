//! The HTTP/1.1 fast path of the proxy listener. One task per client connection reads request
//! heads into a reused buffer, admits them with the same steps as the hyper path
//! ([`Gateway::admit`]), writes each request upstream as one buffer on a pooled connection it
//! owns for the exchange, and relays the response: no header map, no channel or task between
//! the two connections, no allocation per request.
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

pub mod chunked;
pub mod head;
pub mod upstream;
pub mod wire;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Method, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::forward::{ConnInfo, cause_chain};
use super::route::{self, Route};
use super::{Gateway, HEALTH_PATH, LOGIN_PATH, Outcome};
use crate::auth::credential::{self, Source};
use crate::auth::{self, Permit};
use crate::error::ProxyError;
use chunked::{Decoder, Step};
use head::{Field, Framing, Parsed, RequestHead, ResponseHead, Span};
use upstream::Conn;
use wire::{Out, Strip};

/// Initial read buffer of a client connection; it grows up to `limits.max_header_bytes` for a
/// large head.
const READ_BUFFER: usize = 8 * 1024;
/// Request body bytes read from the client at a time.
const BODY_CHUNK: usize = 16 * 1024;
/// Relayed response bytes gathered before they are written to the client.
const FLUSH_AT: usize = 16 * 1024;
/// Largest response head accepted from an upstream (502 beyond it).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
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
    Close,
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
    drain: &mut watch::Receiver<bool>,
) -> End
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut c = Client {
        io,
        buf: vec![0; READ_BUFFER],
        start: 0,
        end: 0,
        body_in_buf: 0,
        unread: 0,
        out: Vec::with_capacity(4096),
        fields: Vec::with_capacity(16),
        ufields: Vec::with_capacity(16),
    };
    let mut served = 0;
    loop {
        let head = match c.read_head(gw, st, drain).await {
            HeadRead::Head(h) => h,
            HeadRead::Closed => return End::Closed,
            HeadRead::Handover => {
                return End::Handover {
                    read: c.buf[c.start..c.end].to_vec(),
                    served,
                };
            }
        };
        match c.exchange(gw, conn, st, &head, drain).await {
            Next::KeepAlive => served += 1,
            Next::Close => {
                c.linger().await;
                return End::Closed;
            }
            Next::Handover => {
                return End::Handover {
                    read: c.buf[c.start..c.end].to_vec(),
                    served,
                };
            }
        }
    }
}

enum HeadRead {
    Head(RequestHead),
    Closed,
    Handover,
}

struct Client<'c, I> {
    io: &'c mut I,
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

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

fn draining(drain: &watch::Receiver<bool>) -> bool {
    drain.has_changed().unwrap_or(true)
}

impl<I: AsyncRead + AsyncWrite + Unpin> Client<'_, I> {
    async fn read_head(
        &mut self,
        gw: &Gateway,
        st: &Settings,
        drain: &mut watch::Receiver<bool>,
    ) -> HeadRead {
        let mut deadline = None;
        loop {
            if self.end > self.start {
                let msg = &self.buf[self.start..self.end];
                let key_header = gw.extractor.api_key_header.as_str();
                match head::parse_request(msg, key_header, st.max_headers, &mut self.fields) {
                    // Hyper answers 431.
                    Parsed::Complete(h) if h.len > st.max_header_bytes => {
                        return HeadRead::Handover;
                    }
                    Parsed::Complete(h) => return HeadRead::Head(h),
                    Parsed::Handover => return HeadRead::Handover,
                    Parsed::Partial => {}
                }
                // Hyper reads on and answers 431.
                if self.end - self.start >= st.max_header_bytes {
                    return HeadRead::Handover;
                }
            } else if draining(drain) {
                return HeadRead::Closed;
            }
            if self.end == self.buf.len() {
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                } else {
                    let len = (self.buf.len() * 2).min(st.max_header_bytes + 1);
                    self.buf.resize(len.max(self.buf.len() + 1), 0);
                }
            }
            let deadline = *deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + st.header_read_timeout);
            let idle = self.start == self.end;
            let read = tokio::time::timeout_at(deadline, self.io.read(&mut self.buf[self.end..]));
            let got = if idle {
                tokio::select! {
                    biased;
                    r = read => r,
                    _ = drain.changed() => return HeadRead::Closed,
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
            Err(Stop::Answer(res)) => {
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
            return Next::Close;
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
        let path = head.path(msg);
        if path == HEALTH_PATH {
            return Err(Stop::Answer(super::health(&head.method)));
        }
        if path == LOGIN_PATH && head.method == Method::POST {
            return Err(Stop::Handover);
        }
        route::check_path(path).map_err(ProxyError::BadRequest)?;
        let route = gw
            .routes
            .find(path, &head.method)
            .ok_or(ProxyError::RouteNotFound)?;
        outcome.route = Some(route);
        if route.upstream.scheme() != Some(&Scheme::HTTP) {
            return Err(Stop::Handover);
        }
        let Some(authority) = route.upstream.authority() else {
            return Err(ProxyError::UpstreamUnavailable.into());
        };

        let mut target = None;
        let mut strip = Strip::Nothing;
        let (permit, rate) = match auth::public(route) {
            Some(permit) => {
                gw.metrics.auth("public");
                (permit, None)
            }
            None => {
                let text = |s: Option<Span>| s.and_then(|s| credential::header_text(s.get(msg)));
                let query = head.query(msg);
                let cred =
                    gw.extractor
                        .extract_from(text(head.authorization), text(head.api_key), query);
                let source = cred.map(|c| c.source);
                let checked = gw.admit(route, cred, conn.peer.ip(), outcome).await;
                gw.metrics.auth(match &checked {
                    Ok(_) => "valid",
                    Err(e) => e.code(),
                });
                let (permit, rate) = checked?;
                match source {
                    Some(Source::Bearer | Source::Basic) => strip = Strip::Authorization,
                    Some(Source::Header) => strip = Strip::ApiKey,
                    Some(Source::Query) => {
                        let param = gw.extractor.query_param.as_deref().unwrap_or_default();
                        let rest = credential::strip_query_param(query.unwrap_or(""), param);
                        target = Some(if rest.is_empty() {
                            path.to_owned()
                        } else {
                            format!("{path}?{rest}")
                        });
                    }
                    None => {}
                }
                (permit, Some(rate))
            }
        };

        self.out.clear();
        wire::request_head(
            &mut self.out,
            msg,
            head,
            &self.fields,
            &wire::Upstream {
                target: target.as_deref().map(str::as_bytes),
                strip,
                identity: permit.principal().map(|p| &p.headers),
                peer_ip: conn.peer_ip.as_bytes(),
                proto: conn.proto.as_bytes(),
                host: route.host.as_bytes(),
            },
        );
        let body_at = self.start + head.len;
        self.out
            .extend_from_slice(&self.buf[body_at..body_at + self.body_in_buf]);

        let sent = Instant::now();
        let deadline = tokio::time::Instant::from_std(sent + gw.forwarder.timeout());
        let (mut uc, res, body_sent) = match self
            .send(gw, &permit, authority, head, body_at, deadline, st)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if matches!(&e, Stop::Answer(r) if r.status().is_server_error()) {
                    gw.metrics.upstream_errors.inc();
                }
                return Err(e);
            }
        };
        let upstream_time = sent.elapsed();
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
            rate.as_ref(),
            framing,
            close,
            gw.auth.clock(),
        );
        let idle = gw.forwarder.timeout();
        match self.relay_body(&mut uc, &res, st, idle).await {
            Ok(at_boundary) => {
                // After a bodiless answer (HEAD, 204, 304) the connection is not reused: an
                // upstream that wrongly sends a body there cannot make it the next answer.
                let bodiless = res.framing == Framing::Empty;
                if at_boundary && body_sent && res.keep_alive && !bodiless {
                    uc.end = 0;
                    gw.forwarder.h1.put(authority, uc);
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

    /// Sends the request (head and body) on a pooled or new connection and reads the
    /// response head. A reused connection that turns out to be closed before it took the
    /// request, or (for an idempotent request sent whole) before it answered anything, is
    /// replaced once by a fresh one.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &mut self,
        gw: &Gateway,
        permit: &Permit<'_>,
        authority: &Authority,
        head: &RequestHead,
        body_at: usize,
        deadline: tokio::time::Instant,
        st: &Settings,
    ) -> Result<(Conn, ResponseHead, bool), Stop> {
        let route = permit.route();
        let pool = &gw.forwarder.h1;
        let mut retried = false;
        loop {
            let pooled = if retried { None } else { pool.take(authority) };
            let mut uc = match pooled {
                Some(c) => c,
                None => match tokio::time::timeout_at(deadline, pool.connect(authority)).await {
                    Err(_) => return Err(ProxyError::UpstreamTimeout.into()),
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        tracing::warn!(
                            route = %route.name,
                            upstream = %route.upstream,
                            connect = true,
                            error = %cause_chain(&e),
                            "upstream request failed"
                        );
                        return Err(ProxyError::UpstreamUnavailable.into());
                    }
                },
            };
            match write_upstream(&mut uc.io, &self.out, deadline).await {
                Ok(()) => {}
                Err(WriteError::Timeout) => return Err(ProxyError::UpstreamTimeout.into()),
                Err(WriteError::Io { written: 0, .. }) if uc.reused => continue,
                Err(WriteError::Io { error, .. }) => {
                    upstream_failed(route, &error);
                    return Err(ProxyError::UpstreamUnavailable.into());
                }
            }
            let pumped = self.unread > 0;
            let body_sent = !pumped || self.pump(&mut uc, body_at, deadline, st).await?;
            let head_request = head.method == Method::HEAD;
            match read_response(&mut uc, head_request, deadline, &mut self.ufields).await {
                Ok(res) => return Ok((uc, res, body_sent)),
                Err(ReadError::Closed)
                    if uc.reused && !retried && !pumped && idempotent(&head.method) =>
                {
                    retried = true;
                }
                Err(ReadError::Timeout) => return Err(ProxyError::UpstreamTimeout.into()),
                Err(e) => {
                    upstream_failed(route, &e);
                    return Err(ProxyError::UpstreamUnavailable.into());
                }
            }
        }
    }

    /// Copies the rest of the request body (`self.unread` bytes) from the client to the
    /// upstream. `Ok(false)`: the upstream began to answer before the body was complete.
    async fn pump(
        &mut self,
        uc: &mut Conn,
        body_at: usize,
        deadline: tokio::time::Instant,
        st: &Settings,
    ) -> Result<bool, Stop> {
        // What was buffered has been sent with the head.
        self.body_in_buf = 0;
        self.end = body_at;
        if self.buf.len() < body_at + BODY_CHUNK {
            self.buf.resize(body_at + BODY_CHUNK, 0);
        }
        let (ur, mut uw) = uc.io.split();
        let (ubuf, uend) = (&mut uc.buf, &mut uc.end);
        while self.unread > 0 {
            let room = self.unread.min(BODY_CHUNK as u64) as usize;
            let n = tokio::select! {
                biased;
                _ = ur.readable() => match probe(&ur, ubuf, uend) {
                    Probe::Nothing => continue,
                    Probe::Answer => return Ok(false),
                    Probe::Closed => return Err(ProxyError::UpstreamUnavailable.into()),
                },
                r = tokio::time::timeout(
                    st.body_timeout,
                    self.io.read(&mut self.buf[body_at..body_at + room]),
                ) => match r {
                    Err(_) => return Err(ProxyError::BodyTimeout.into()),
                    Ok(Ok(n)) if n > 0 => n,
                    Ok(_) => {
                        return Err(ProxyError::BadRequest(
                            "the request body is malformed or was cut short",
                        )
                        .into());
                    }
                },
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ProxyError::UpstreamTimeout.into());
                }
            };
            self.unread -= n as u64;
            let mut w = 0;
            while w < n {
                tokio::select! {
                    biased;
                    _ = ur.readable() => match probe(&ur, ubuf, uend) {
                        Probe::Nothing => {}
                        Probe::Answer => return Ok(false),
                        Probe::Closed => return Err(ProxyError::UpstreamUnavailable.into()),
                    },
                    r = uw.write(&self.buf[body_at + w..body_at + n]) => match r {
                        Ok(k) if k > 0 => w += k,
                        _ => return Err(ProxyError::UpstreamUnavailable.into()),
                    },
                    () = tokio::time::sleep_until(deadline) => {
                        return Err(ProxyError::UpstreamTimeout.into());
                    }
                }
            }
        }
        Ok(true)
    }

    /// Writes `self.out` (the response head) and the response body to the client.
    /// `Ok(true)`: the upstream connection ended exactly at the end of the response.
    async fn relay_body(
        &mut self,
        uc: &mut Conn,
        res: &ResponseHead,
        st: &Settings,
        idle: Duration,
    ) -> Result<bool, &'static str> {
        let mut pos = res.len;
        let to_client = st.body_timeout;
        match res.framing {
            Framing::Empty => {
                write_client(self.io, &self.out, to_client).await?;
                Ok(pos == uc.end)
            }
            Framing::Length(n) => {
                let first = n.min((uc.end - pos) as u64) as usize;
                self.out.extend_from_slice(&uc.buf[pos..pos + first]);
                pos += first;
                let mut left = n - first as u64;
                write_client(self.io, &self.out, to_client).await?;
                while left > 0 {
                    let want = left.min(uc.buf.len() as u64) as usize;
                    let k = read_upstream(&mut uc.io, &mut uc.buf[..want], idle).await?;
                    write_client(self.io, &uc.buf[..k], to_client).await?;
                    left -= k as u64;
                    pos = k;
                    uc.end = k;
                }
                Ok(pos == uc.end)
            }
            Framing::Chunked => {
                let mut decoder = Decoder::new();
                loop {
                    match decoder.decode(&uc.buf[pos..uc.end]) {
                        Ok(Step::Data {
                            start,
                            len,
                            consumed,
                        }) => {
                            let data = pos + start;
                            wire::chunk_start(&mut self.out, len);
                            self.out.extend_from_slice(&uc.buf[data..data + len]);
                            self.out.extend_from_slice(wire::CHUNK_END);
                            pos += consumed;
                            if self.out.len() >= FLUSH_AT {
                                write_client(self.io, &self.out, to_client).await?;
                                self.out.clear();
                            }
                        }
                        Ok(Step::NeedMore) => {
                            if !self.out.is_empty() {
                                write_client(self.io, &self.out, to_client).await?;
                                self.out.clear();
                            }
                            uc.end = read_upstream(&mut uc.io, &mut uc.buf[..], idle).await?;
                            pos = 0;
                        }
                        Ok(Step::Done { consumed }) => {
                            pos += consumed;
                            self.out.extend_from_slice(wire::LAST_CHUNK);
                            write_client(self.io, &self.out, to_client).await?;
                            return Ok(pos == uc.end);
                        }
                        Err(_) => return Err("malformed chunked body from the upstream"),
                    }
                }
            }
            Framing::Close => {
                let mut have = uc.end - pos;
                let mut from = pos;
                loop {
                    if have > 0 {
                        wire::chunk_start(&mut self.out, have);
                        self.out.extend_from_slice(&uc.buf[from..from + have]);
                        self.out.extend_from_slice(wire::CHUNK_END);
                    }
                    write_client(self.io, &self.out, to_client).await?;
                    self.out.clear();
                    match tokio::time::timeout(idle, uc.io.read(&mut uc.buf[..])).await {
                        Ok(Ok(0)) => break,
                        Ok(Ok(k)) => {
                            have = k;
                            from = 0;
                        }
                        Ok(Err(_)) => return Err("upstream read failed"),
                        Err(_) => return Err("upstream body stalled"),
                    }
                }
                self.out.extend_from_slice(wire::LAST_CHUNK);
                write_client(self.io, &self.out, to_client).await?;
                Ok(false)
            }
        }
    }

    /// Shuts the write side, then reads and drops what the client still sends for a moment, so
    /// the last answer reaches it before the connection is closed.
    async fn linger(&mut self) {
        let io = &mut *self.io;
        let _ = tokio::time::timeout(LINGER, async {
            let _ = io.shutdown().await;
            let mut sink = [0u8; 4096];
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

enum Probe {
    /// The readiness was stale: nothing to read.
    Nothing,
    /// The upstream began its response (the bytes are in the buffer).
    Answer,
    Closed,
}

/// Reads what the upstream sent while the request body was still being copied. Interim
/// answers (`100 Continue`, `103 Early Hints`) are dropped and the upload goes on; anything
/// else — a final answer, or bytes that are no answer at all — ends the upload.
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

fn upstream_failed(route: &Route, error: &dyn std::error::Error) {
    tracing::warn!(
        route = %route.name,
        upstream = %route.upstream,
        connect = false,
        error = %cause_chain(error),
        "upstream request failed"
    );
}

/// Writes `data` to the client; `timeout` bounds each pause (a client that takes no bytes for
/// that long), not the whole write.
async fn write_client<I: AsyncWrite + Unpin>(
    io: &mut I,
    data: &[u8],
    timeout: Duration,
) -> Result<(), &'static str> {
    let mut written = 0;
    while written < data.len() {
        match tokio::time::timeout(timeout, io.write(&data[written..])).await {
            Ok(Ok(n)) if n > 0 => written += n,
            Ok(_) => return Err("client write failed"),
            Err(_) => return Err("client stopped reading"),
        }
    }
    match tokio::time::timeout(timeout, io.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("client write failed"),
        Err(_) => Err("client stopped reading"),
    }
}

async fn read_upstream(
    io: &mut TcpStream,
    buf: &mut [u8],
    idle: Duration,
) -> Result<usize, &'static str> {
    match tokio::time::timeout(idle, io.read(buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(n),
        Ok(Ok(_)) => Err("upstream closed before the end of the body"),
        Ok(Err(_)) => Err("upstream read failed"),
        Err(_) => Err("upstream body stalled"),
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

async fn write_upstream(
    io: &mut TcpStream,
    data: &[u8],
    deadline: tokio::time::Instant,
) -> Result<(), WriteError> {
    let mut written = 0;
    while written < data.len() {
        match tokio::time::timeout_at(deadline, io.write(&data[written..])).await {
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
        match tokio::time::timeout_at(deadline, uc.io.read(&mut uc.buf[uc.end..])).await {
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
