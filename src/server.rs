//! The accept loop shared by both listeners: a connection cap, a cap per client address
//! (over it a connection is closed at once), accept errors logged and survived (EMFILE backs
//! off instead of spinning or exiting), TLS, and a graceful drain on shutdown. On the proxy listener every HTTP/1.1 connection is served by the fast path
//! (`proxy::h1`) first; what it does not take — and every other connection (HTTP/2 by ALPN or
//! h2c prior knowledge, the admin listener) — goes to hyper-util's auto builder, with a head
//! size and count limit and a header read timeout (slowloris), given the bytes already read,
//! and the idle and write-stall timeouts of `activity` on HTTP/1.1 and HTTP/2 alike.

mod activity;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::Limits;
use crate::proxy::ConnInfo;
use crate::proxy::Gateway;
use crate::proxy::h1;
use crate::telemetry::metrics::Metrics;

/// HTTP/2 connections are pinged this often; one that does not answer a ping within
/// [`H2_PING_TIMEOUT`] is closed (a peer gone without a FIN).
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Pause after a failed accept (typically EMFILE/ENFILE) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The proxy's HTTP/1.1 fast path, tried on a connection before hyper.
#[derive(Clone)]
pub struct FastPath {
    pub gateway: Arc<Gateway>,
    /// `X-Forwarded-Proto` of the listener.
    pub proto: &'static str,
}

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Listener name for logs ("proxy" or "admin").
    pub name: &'static str,
    pub limits: Limits,
    pub shutdown_grace: Duration,
    pub metrics: Arc<Metrics>,
    /// Serve TLS with this configuration (its certificate resolver may be reloaded).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub fast_path: Option<FastPath>,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("proto", &self.proto)
            .finish()
    }
}

/// Serves connections from `listener` until `shutdown` resolves, then stops accepting and waits
/// up to the grace period for open connections to finish their requests.
pub async fn serve<F, S, B>(
    listener: TcpListener,
    opts: ServerOptions,
    make_service: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(SocketAddr) -> S,
    S: ConnService<B>,
    B: ConnBody,
{
    let limits = &opts.limits;
    let mut builder = auto::Builder::new(activity::Exec::new(limits.body_timeout));
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper answers 431 when a request head does not fit in this buffer.
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let builder = Arc::new(builder);

    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip =
        (limits.max_connections_per_ip > 0).then(|| PerIp::new(limits.max_connections_per_ip));
    let (drain, drained) = watch::channel(false);
    let settings = Arc::new(h1::Settings {
        max_header_bytes: limits.max_header_bytes,
        max_headers: limits.max_headers,
        header_read_timeout: limits.header_read_timeout,
        body_timeout: limits.body_timeout,
    });
    tokio::pin!(shutdown);

    loop {
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            s = Arc::clone(&slots).acquire_owned() => s.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(listener = opts.name, error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let ip_slot = match &per_ip {
            None => None,
            Some(table) => match table.admit(peer.ip()) {
                Some(held) => Some(held),
                None => {
                    tracing::debug!(
                        listener = opts.name,
                        peer = %peer.ip(),
                        "connection closed at once: its address has limits.max_connections_per_ip open already"
                    );
                    opts.metrics.connection_refused(opts.name);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let stream = crate::net::Tcp::new(stream);
        let conn = Connection {
            peer,
            builder: Arc::clone(&builder),
            fast: opts.fast_path.clone(),
            settings: Arc::clone(&settings),
            drain: drained.clone(),
            h2_only: false,
        };
        let service = make_service(peer);
        opts.metrics.connection_opened(opts.name);
        let opened = Opened {
            metrics: Arc::clone(&opts.metrics),
            name: opts.name,
            _ip_slot: ip_slot,
            _slot: slot,
        };
        // The task is the connection's future and its guard, nothing captured beside them: an
        // idle keep-alive connection costs its task's size.
        match opts.tls.clone().map(tokio_rustls::TlsAcceptor::from) {
            None => {
                tokio::spawn(Guarded {
                    serving: conn.serve(stream, service),
                    opened,
                });
            }
            Some(acceptor) => {
                let handshake_timeout = limits.header_read_timeout;
                let serving = async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                            // ALPN said h2: HTTP/2 only. Bytes of HTTP/1.1 on it would be read
                            // by hyper's own parser, without the fast path's refusals
                            // (Content-Length with Transfer-Encoding was forwarded).
                            let conn = Connection {
                                fast: if h2 { None } else { conn.fast },
                                h2_only: h2,
                                ..conn
                            };
                            conn.serve(tls, service).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer, "TLS handshake timed out");
                        }
                    }
                };
                tokio::spawn(Guarded { serving, opened });
            }
        }
    }

    drop(listener);
    drop(drained);
    let open = drain.receiver_count();
    tracing::info!(
        listener = opts.name,
        open,
        "stopped accepting; draining connections"
    );
    drain.send_replace(true);
    tokio::select! {
        () = drain.closed() => tracing::info!(listener = opts.name, "all connections closed"),
        () = tokio::time::sleep(opts.shutdown_grace) => {
            tracing::warn!(listener = opts.name, "grace period over; closing remaining connections");
        }
    }
}

/// Open connections per client address, for `limits.max_connections_per_ip`. IPv6 addresses
/// count per /64 (one host usually holds a whole /64), IPv4-mapped IPv6 as IPv4. Only the
/// accept loop adds; a connection's task removes its own when it ends (an address with no
/// open connection has no entry, so the table never outgrows the open connections).
struct PerIp {
    cap: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted for its address; dropped when the connection ends.
struct IpSlot {
    table: Arc<PerIp>,
    key: IpAddr,
}

impl PerIp {
    fn new(cap: usize) -> Arc<Self> {
        Arc::new(PerIp {
            cap,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, or `None` when it has `cap` open already.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let key = crate::limit::client_group(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: Arc::clone(self),
            key,
        })
    }

    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&crate::limit::client_group(ip))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// An open connection counted: in the metrics, its address's slot, its listener's slot. Dropped
/// after the connection is (it is the second field of [`Guarded`]), even when its task is
/// cancelled.
struct Opened {
    metrics: Arc<Metrics>,
    name: &'static str,
    _ip_slot: Option<IpSlot>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Opened {
    fn drop(&mut self) {
        // The slots are fields: released right after this, in their order.
        self.metrics.connection_closed(self.name);
    }
}

pin_project_lite::pin_project! {
    /// A connection's task: serving it, then (fields drop in order) its count and slots.
    struct Guarded<F> {
        #[pin]
        serving: F,
        opened: Opened,
    }
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().serving.poll(cx)
    }
}

/// A service a connection's requests go to (hyper's, the fast path's fallback).
pub trait ConnService<B>:
    Service<Request<Incoming>, Response = Response<B>, Error = Infallible, Future: Send + 'static>
    + Send
    + 'static
{
}

impl<S, B> ConnService<B> for S where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

/// The body of such a service's responses.
pub trait ConnBody:
    Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + Unpin + 'static
{
}

impl<B> ConnBody for B where
    B: Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + Unpin
        + 'static
{
}

/// One accepted connection and what serving it needs.
struct Connection {
    peer: SocketAddr,
    /// The listener's; cloned only for a connection hyper serves.
    builder: Arc<auto::Builder<activity::Exec>>,
    fast: Option<FastPath>,
    settings: Arc<h1::Settings>,
    /// Changes to `true` when the listener drains.
    drain: watch::Receiver<bool>,
    /// TLS with ALPN `h2`: hyper serves HTTP/2 and nothing else.
    h2_only: bool,
}

impl Connection {
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn's future holds its arguments twice (as passed, and moved into its body); this block holds them once"
    )]
    fn serve<I, S, B>(self, mut io: I, service: S) -> impl Future<Output = ()> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: ConnService<B>,
        B: ConnBody,
    {
        async move {
            let mut read = Vec::new();
            // What the fast path says of the connection it hands over.
            let mut handed_over = None;
            if let Some(fast) = &self.fast {
                let conn = ConnInfo::new(self.peer, fast.proto);
                match h1::serve(&mut io, &fast.gateway, &conn, &self.settings, &self.drain).await {
                    h1::End::Closed => return,
                    h1::End::Handover { read: r, served } => {
                        read = r;
                        handed_over = Some(served);
                    }
                }
            }
            // On the heap, as one allocation: only connections hyper serves pay for its state,
            // and an idle fast-path connection's task does not hold room for it.
            Box::pin(self.serve_with_hyper(io, read, handed_over, service)).await;
        }
    }

    /// Hyper serves the connection: all of it, or from the request the fast path handed over
    /// (`read`: the bytes it had read; `handed_over`: how many requests it had answered).
    #[allow(
        clippy::manual_async_fn,
        reason = "as for serve: the block holds its arguments once"
    )]
    fn serve_with_hyper<I, S, B>(
        mut self,
        io: I,
        read: Vec<u8>,
        handed_over: Option<u64>,
        service: S,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: ConnService<B>,
        B: ConnBody,
    {
        async move {
            let mut builder = (*self.builder).clone();
            if let Some(served) = handed_over {
                // Past the first request an HTTP/2 preface is not a connection preface.
                if served > 0 {
                    builder = builder.http1_only();
                }
                // Hyper answers the HTTP/1.1 request it was handed, then the connection closes:
                // every request head on a connection is read by the fast path's parser first, with
                // its refusals (Content-Length with Transfer-Encoding…), before hyper sees it.
                builder.http1().keep_alive(false);
            }
            // Handed over while draining: the request already read is answered, then the
            // connection closes (a graceful shutdown now would drop it unanswered).
            let draining = self.drain.has_changed().unwrap_or(true);
            if draining {
                builder.http1().keep_alive(false);
            }
            let activity = Arc::new(activity::Activity::default());
            let io = activity::Watched::new(
                Rewind { read, at: 0, io },
                Arc::clone(&activity),
                self.settings.header_read_timeout,
                self.settings.body_timeout,
            );
            let service = activity::Counted::new(service, activity);
            let io = TokioIo::new(io);
            // (`http2_only` binds `serve_connection` only: the one with upgrades reads the
            // version from the bytes whatever the builder says.)
            let result = if self.h2_only {
                let builder = builder.http2_only();
                let conn = builder.serve_connection(io, service);
                drive(conn, draining, &mut self.drain).await
            } else {
                let conn = builder.serve_connection_with_upgrades(io, service);
                drive(conn, draining, &mut self.drain).await
            };
            if let Err(e) = result {
                tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
            }
        }
    }
}

/// Runs a connection hyper serves to its end, shut down gracefully when the listener drains
/// (at once when it already does: `draining`).
async fn drive<C>(
    conn: C,
    draining: bool,
    drain: &mut watch::Receiver<bool>,
) -> Result<(), C::Error>
where
    C: hyper_util::server::graceful::GracefulConnection,
{
    tokio::pin!(conn);
    if draining {
        return conn.await;
    }
    tokio::select! {
        biased;
        r = conn.as_mut() => r,
        _ = drain.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// A stream whose first bytes were already read: they are read again first.
struct Rewind<I> {
    read: Vec<u8>,
    at: usize,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.read.len() {
            let n = (this.read.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            if this.at == this.read.len() {
                this.read = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_address_cap_counts_open_connections_and_forgets_closed_ones() {
        let table = PerIp::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = table.admit(a).unwrap();
        let second = table.admit(a).unwrap();
        assert!(table.admit(a).is_none(), "a third from the same address");
        let other = table.admit(b).unwrap();
        drop(first);
        let again = table.admit(a).expect("a slot came back");
        assert_eq!(table.open(a), 2);
        drop((second, again, other));
        assert!(
            table.open.lock().unwrap().is_empty(),
            "entries of closed addresses stay"
        );
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let table = PerIp::new(1);
        let _held = table.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(
            table
                .admit("2001:db8:1:2:ffff::9".parse().unwrap())
                .is_none(),
            "same /64"
        );
        assert!(table.admit("2001:db8:1:3::1".parse().unwrap()).is_some());
        let _v4 = table.admit("198.51.100.7".parse().unwrap()).unwrap();
        assert!(
            table
                .admit("::ffff:198.51.100.7".parse().unwrap())
                .is_none()
        );
    }
}
