//! The accept loop shared by both listeners: HTTP/1.1 and HTTP/2 (h2c prior knowledge) through
//! hyper-util's auto builder, a head size and count limit, a header read timeout (slowloris), a
//! connection cap, accept errors logged and survived (EMFILE backs off instead of spinning or
//! exiting), and a graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::Limits;
use crate::telemetry::metrics::Metrics;

/// Pause after a failed accept (typically EMFILE/ENFILE) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Listener name for logs ("proxy" or "admin").
    pub name: &'static str,
    pub limits: Limits,
    pub shutdown_grace: Duration,
    pub metrics: Arc<Metrics>,
    /// Serve TLS with this configuration (its certificate resolver may be reloaded).
    pub tls: Option<Arc<rustls::ServerConfig>>,
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
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = &opts.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
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
        .keep_alive_interval(Some(Duration::from_secs(30)));

    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
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
        let _ = stream.set_nodelay(true);
        let service = make_service(peer);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let metrics = Arc::clone(&opts.metrics);
        let name = opts.name;
        let tls = opts.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let handshake_timeout = limits.header_read_timeout;
        metrics.connection_opened(name);
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let conn =
                                builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                            watcher.watch(conn.into_owned()).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
            metrics.connection_closed(name);
            drop(slot);
        });
    }

    drop(listener);
    let open = graceful.count();
    tracing::info!(
        listener = opts.name,
        open,
        "stopped accepting; draining connections"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(listener = opts.name, "all connections closed"),
        () = tokio::time::sleep(opts.shutdown_grace) => {
            tracing::warn!(listener = opts.name, "grace period over; closing remaining connections");
        }
    }
}
