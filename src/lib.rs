//! keygate: a reverse-proxy authentication gateway.
//!
//! # Bird's-eye view
//! Two listeners in one process. The proxy listener takes every request, finds its credential,
//! authenticates it against a cache in front of a store, checks the route's permissions and
//! forwards the request upstream with identity headers. The admin listener manages clients and
//! keys; every write lands in the store and invalidates the cache before it is acknowledged.
//!
//! # Code map
//! - [`config`]: TOML → env → CLI, raw structs validated into [`config::Config`].
//! - [`server`]: the accept loop both listeners share (limits, connection cap, drain).
//! - [`proxy`]: the data plane: one policy core ([`proxy::policy`]) behind two engines (the
//!   HTTP/1.1 fast path [`proxy::h1`] and [`proxy::hyper`]), one `http://` client
//!   ([`proxy::upstream`]), proxy errors and their one conversion into responses.
//! - [`route`] and [`paths`]: the route table; path checks.
//! - [`cors`]: CORS rules (origin patterns, preflight decision, answer fields), applied by the
//!   policy core.
//! - [`auth`]: credential → [`keys::Principal`]; principal + route → [`auth::Permit`].
//! - [`keys`]: domain types and key format; [`keys::cache`] and [`keys::store`].
//! - [`limit`]: the key buckets' registry, route and failed-authentication limits.
//! - [`clock`]: the one [`clock::Clock`] every component of the request path reads.
//! - [`admin`]: the axum router of the admin plane.
//! - [`events`]: webhook delivery from the store's outbox ([`keys::outbox`]), the
//!   `key.expiring` check, leaked-key reports.
//!
//! # Invariants
//! - No plaintext key, key hash or token is stored, logged or returned, except the plaintext in
//!   the one answer that creates it.
//! - The proxy never calls the store on a cache hit, and never for a key with a bad checksum.
//! - Every data-plane rule exists once, in [`proxy::policy`] (upstreams: [`proxy::upstream`]).
//! - No import circles; `proxy` and `admin` do not import each other; `keys` knows nothing
//!   about HTTP (`tests/it/layers.rs` enforces the layering).
//! - Only [`proxy::upstream`] and hyper-util's client talk to upstreams, reached with a
//!   [`auth::Permit`].
//! - The request path reads time only from the [`clock::Clock`] made in [`App::bind_with_store`].

pub mod admin;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod cors;
pub mod events;
pub mod identity;
pub mod keys;
pub mod limit;
pub mod net;
pub mod paths;
pub mod proxy;
pub mod route;
pub mod runtime;
pub mod server;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};

use crate::auth::credential::Extractor;
use crate::clock::Clock;
use crate::config::{Config, StoreUrl};
use crate::keys::KeyFormat;
use crate::keys::cache::{CacheSettings, KeyCache};
use crate::keys::store::Store;
use crate::keys::store::metered::Metered;
use crate::keys::store::redis::RedisStore;
use crate::keys::store::sqlite::SqliteStore;
use crate::keys::usage::UsageRecorder;
use crate::proxy::Gateway;
use crate::proxy::{ConnInfo, Upstreams};
use crate::route::RouteTable;
use crate::server::ServerOptions;
use crate::telemetry::metrics::Metrics;

/// How often idle limiter state (per-route, failed-auth) is dropped.
const LIMITER_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no admin key is configured: set KEYGATE_ADMIN_KEY, --admin-key or [admin] keys")]
    NoAdminKey,
    #[error("cannot listen on {addr} ({which}): {source}")]
    Bind {
        which: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the store: {0}")]
    Store(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Identity(String),
    #[error("{0}")]
    Events(String),
}

/// How long a start waits for another holder of its SQLite file to let go, beyond
/// `[server] shutdown_grace_secs` (that holder's shutdown, when it is one).
const SQLITE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens the configured store.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    match &config.store.url {
        StoreUrl::Sqlite(path) => {
            // The file's holder may be a process (or this process's previous store) still
            // shutting down: it gets as long as a shutdown takes, and a few seconds more.
            let wait = config.shutdown_grace + SQLITE_LOCK_WAIT;
            let deadline = std::time::Instant::now() + wait;
            let store_error = |e: keys::store::StoreError| StartError::Store(e.to_string());
            let mut told = false;
            let lock = loop {
                match SqliteStore::lock(path).map_err(store_error)? {
                    Some(lock) => break lock,
                    None if std::time::Instant::now() < deadline => {
                        if !std::mem::replace(&mut told, true) {
                            tracing::warn!(store = %path.display(), wait_secs = wait.as_secs(),
                                "another keygate process holds the SQLite file; waiting for it to exit");
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    None => return Err(store_error(keys::store::sqlite::in_use(path))),
                }
            };
            let store = SqliteStore::open_locked(path, lock).map_err(store_error)?;
            Ok(Arc::new(store))
        }
        StoreUrl::Redis(url) => {
            let store = RedisStore::open_with(
                url,
                &config.store.redis_prefix,
                &config.store.redis_tls,
                config.store.redis_wait_replicas,
            )
            .map_err(|e| StartError::Store(e.to_string()))?;
            Ok(Arc::new(store))
        }
    }
}

/// A gateway whose listeners are bound but not yet serving. Binding first lets callers (and
/// tests on port 0) learn the addresses before traffic starts.
pub struct App {
    config: Config,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    gateway: Arc<Gateway>,
    admin_failed_auth: Arc<limit::FailedAuth>,
    admin: axum::Router,
    metrics: Arc<Metrics>,
    usage: Arc<UsageRecorder>,
    proxy_cert: Option<Arc<tls::ReloadableCert>>,
    admin_cert: Option<Arc<tls::ReloadableCert>>,
    events: Option<Arc<events::Events>>,
    /// Cluster rate limits (`[rate_limit] mode = "cluster"`), synced in the background.
    cluster: Option<Arc<keys::cluster::ClusterShared>>,
}

impl App {
    pub async fn bind(config: Config) -> Result<App, StartError> {
        if config.admin.key_hashes.is_empty() {
            return Err(StartError::NoAdminKey);
        }
        catch_hangup();
        let store = open_store(&config).await?;
        Self::bind_with_store(config, store).await
    }

    pub async fn bind_with_store(config: Config, store: Arc<dyn Store>) -> Result<App, StartError> {
        if config.admin.key_hashes.is_empty() {
            return Err(StartError::NoAdminKey);
        }
        // The one clock of the request path (calibrated here rather than on the first request).
        let clock = Clock::real();
        let routes = RouteTable::new(&config.routes, &config.proxy.upstream, &clock);
        let metrics = Arc::new(Metrics::new(routes.names()));
        let store_health = Arc::new(keys::store::StoreHealth::default());
        let store: Arc<dyn Store> = Arc::new(Metered::new(
            store,
            Arc::clone(&metrics),
            Arc::clone(&store_health),
        ));
        let usage = Arc::new(UsageRecorder::new(
            Arc::clone(&store),
            Arc::clone(&metrics),
            clock.clone(),
        ));
        let format = KeyFormat::new(config.keys.prefix.clone());
        let cache = KeyCache::new(
            &CacheSettings {
                capacity: config.store.cache_capacity,
                ttl: config.store.cache_ttl,
                negative_ttl: config.store.negative_ttl,
                stale_if_error: config.store.stale_if_error,
            },
            clock.clone(),
        );
        store.watch_invalidations(Arc::new(cache.clone()));
        let cluster = (config.rate_mode == config::RateMode::Cluster)
            .then(|| keys::cluster::ClusterShared::new(Arc::clone(&store), clock.clone()));
        let mut limits =
            limit::KeyLimits::new(config.default_limit, config.plans.clone(), clock.clone())
                .with_plan_terms(
                    config
                        .plan_terms
                        .iter()
                        .map(|(name, t)| (name.clone(), t.scope, t.quota)),
                );
        if let Some(shared) = &cluster {
            limits = limits.with_cluster(Arc::clone(shared));
        }
        let limits = Arc::new(limits);
        let jwt_secret = config.jwt.secret.clone().unwrap_or_else(|| {
            tracing::warn!(
                "no jwt.secret configured (KEYGATE_JWT_SECRET): using a random per-process secret; tokens from /auth/login die on restart"
            );
            auth::jwt::Jwt::random_secret()
        });
        let jwt = Arc::new(auth::jwt::Jwt::new(&auth::jwt::JwtSettings {
            secret: jwt_secret,
            issuer: config.jwt.issuer.clone(),
            audience: config.jwt.audience.clone(),
            ttl: config.jwt.ttl,
            leeway: config.jwt.leeway,
        }));
        let authenticator = auth::Authenticator::new(
            format.clone(),
            cache.clone(),
            Arc::clone(&store),
            limits,
            jwt,
            Arc::clone(&metrics),
            store_health,
        );
        let extractor = Extractor {
            api_key_header: config.proxy.api_key_header.clone(),
            query_param: config.proxy.query_param.clone(),
        };
        // Separate budgets: a flood of bad keys on the proxy cannot lock the admin out.
        let proxy_failed_auth = Arc::new(limit::FailedAuth::new(
            config.failed_auth_limit,
            clock.clone(),
        ));
        let admin_failed_auth = Arc::new(limit::FailedAuth::new(
            config.failed_auth_limit,
            clock.clone(),
        ));
        let load_cert = |files: &Option<config::TlsFiles>| {
            files
                .as_ref()
                .map(|f| tls::ReloadableCert::load(&f.cert, &f.key).map(Arc::new))
                .transpose()
                .map_err(StartError::Tls)
        };
        let proxy_cert = load_cert(&config.proxy.tls)?;
        let admin_cert = load_cert(&config.admin.tls)?;
        let upstreams = Upstreams::new(
            config.proxy.connect_timeout,
            config.proxy.upstream_timeout,
            config.limits.body_timeout,
            config.proxy.upstream_ca.as_deref(),
        )
        .map_err(StartError::Tls)?;
        // Signed identity: the keys are read now; an unreachable store is retried by the
        // refresh task, and until then authenticated requests are answered 503.
        let audiences = routes
            .names()
            .iter()
            .map(
                |name| match config.routes.iter().find(|r| &r.path == name) {
                    Some(r) => identity::audience(r.audience.as_deref(), &r.upstream),
                    None => identity::audience(None, &config.proxy.upstream),
                },
            )
            .collect();
        let identity = identity::Identity::new(
            config.identity.clone(),
            audiences,
            Arc::clone(&store),
            clock.clone(),
        )
        .map_err(StartError::Identity)?;
        if let Some(id) = &identity {
            if let Err(e) = id.load().await {
                tracing::error!(error = %e, "cannot read the signing keys; retrying");
            }
            id.spawn_refresh();
        }
        // Events: the outbox of the store, when it keeps one.
        let events = match store.outbox() {
            Some(outbox) => Some(
                events::Events::new(
                    outbox,
                    &config.webhooks,
                    config.events.clone(),
                    Arc::clone(&metrics),
                )
                .map_err(StartError::Events)?,
            ),
            None => {
                if !config.webhooks.is_empty() {
                    tracing::warn!("this store keeps no event outbox: [[webhooks]] get no events");
                }
                None
            }
        };
        let leaks = match &config.secret_scanning.github_keys_file {
            Some(file) => Some(Arc::new(
                events::leaks::LeakReports::load(
                    file,
                    config.secret_scanning.action,
                    format.clone(),
                    Arc::clone(&store),
                    cache.clone(),
                    events.clone(),
                )
                .map_err(StartError::Events)?,
            )),
            None => None,
        };
        let gateway = Arc::new(Gateway {
            auth: authenticator.clone(),
            routes,
            extractor: extractor.clone(),
            policy: proxy::policy::Policy {
                fields: proxy::policy::FieldRules::new(
                    config.proxy.api_key_header.clone(),
                    config.proxy.allow_method_override,
                ),
                non_ascii_paths: config.proxy.allow_non_ascii_paths,
                trusted_proxies: config.proxy.trusted_proxies.clone(),
                cache: proxy::policy::CachePolicy::new(
                    &config.proxy.api_key_header,
                    config.proxy.vary_credentials,
                    config.proxy.cache_private,
                ),
                forward_auth: config.forward_auth.clone(),
                cors: config.proxy.cors.clone(),
                max_headers: config.limits.max_headers,
            },
            upstreams,
            failed_auth: proxy_failed_auth,
            metrics: Arc::clone(&metrics),
            usage: Arc::clone(&usage),
            access_log: config.log.access_log,
            identity: identity.clone(),
            leaks,
        });
        let admin_state = admin::AdminState(Arc::new(admin::AdminInner {
            store,
            cache,
            format,
            admin_keys: config.admin.key_hashes.clone(),
            plans: config.plans.keys().cloned().collect(),
            max_keys_per_client: config.keys.max_per_client,
            auth: authenticator,
            extractor,
            failed_auth: Arc::clone(&admin_failed_auth),
            self_service_permission: config.admin.self_service_permission.clone(),
            openapi_json: Default::default(),
            metrics: Arc::clone(&metrics),
            identity,
            events: events.clone(),
            gateway_config: admin::gateway_config::describe(&config),
        }));
        let admin = admin::router(admin_state, config.admin.max_body_bytes);

        let backlog = config.listen_backlog;
        let bind = |which, addr| async move {
            listen(addr, backlog).map_err(|source| StartError::Bind {
                which,
                addr,
                source,
            })
        };
        let proxy_listener = bind("proxy", config.proxy.listen).await?;
        let admin_listener = bind("admin", config.admin.listen).await?;
        Ok(App {
            config,
            proxy_listener,
            admin_listener,
            gateway,
            admin_failed_auth,
            admin,
            metrics,
            usage,
            proxy_cert,
            admin_cert,
            events,
            cluster,
        })
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_listener.local_addr().expect("bound listener")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().expect("bound listener")
    }

    /// Serves both listeners until `shutdown` resolves, then drains them.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let signal = move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let opts = |name, cert: &Option<Arc<tls::ReloadableCert>>, tickets| ServerOptions {
            name,
            limits: self.config.limits.clone(),
            shutdown_grace: self.config.shutdown_grace,
            metrics: Arc::clone(&self.metrics),
            tls: cert.clone().map(|c| tls::server_config(c, tickets)),
            fast_path: None,
        };
        let reloader = spawn_cert_reloader(
            [("proxy", &self.proxy_cert), ("admin", &self.admin_cert)]
                .into_iter()
                .filter_map(|(n, c)| Some((n, Arc::clone(c.as_ref()?))))
                .collect(),
        );
        let proxy_proto = if self.proxy_cert.is_some() {
            "https"
        } else {
            "http"
        };
        tracing::info!(
            proxy = %self.proxy_addr(),
            admin = %self.admin_addr(),
            "keygate listening"
        );
        let gateway = self.gateway;
        let sweeper = {
            let gateway = Arc::clone(&gateway);
            let admin_failed_auth = Arc::clone(&self.admin_failed_auth);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(LIMITER_SWEEP_INTERVAL);
                loop {
                    tick.tick().await;
                    gateway.sweep();
                    admin_failed_auth.sweep();
                    // Shard by shard, yielding between them, so a sweep of many keys does not
                    // hold up requests.
                    for shard in 0..gateway.auth.sweep_shards() {
                        gateway.auth.sweep_shard(shard);
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        let flush_stop = Arc::new(tokio::sync::Notify::new());
        let flusher = keys::usage::spawn_flusher(
            Arc::clone(&self.usage),
            self.config.store.last_used_flush,
            Arc::clone(&flush_stop),
        );
        let event_tasks = self
            .events
            .as_ref()
            .map(events::Events::spawn)
            .unwrap_or_default();
        let cluster_sync = self.cluster.clone().map(|shared| {
            let metrics = Arc::clone(&self.metrics);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(keys::cluster::SYNC_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let synced = shared.sync().await;
                    if synced.buckets > 0 {
                        metrics.cluster_sync.observe(synced.took);
                    }
                    metrics.cluster_degraded.set(i64::from(shared.degraded()));
                    metrics.cluster_live.set(i64::from(shared.live()));
                }
            })
        });
        let proxy_opts = ServerOptions {
            fast_path: Some(server::FastPath {
                gateway: Arc::clone(&gateway),
                proto: proxy_proto,
            }),
            ..opts(
                "proxy",
                &self.proxy_cert,
                self.config.proxy.tls_session_tickets,
            )
        };
        let proxy = server::serve(
            self.proxy_listener,
            proxy_opts,
            move |peer| proxy::service(Arc::clone(&gateway), ConnInfo::new(peer, proxy_proto)),
            signal(),
        );
        let admin_router = self.admin;
        let admin_body_timeout = self.config.limits.body_timeout;
        let admin_hosts = admin::AllowedHosts::new(self.config.admin.allowed_hosts.as_deref());
        let admin = server::serve(
            self.admin_listener,
            opts(
                "admin",
                &self.admin_cert,
                config::DEFAULT_TLS_SESSION_TICKETS,
            ),
            move |peer| {
                admin::service(
                    admin_router.clone(),
                    peer,
                    admin_body_timeout,
                    admin_hosts.clone(),
                )
            },
            signal(),
        );
        let trigger = async move {
            shutdown.await;
            tracing::info!("shutdown requested");
            let _ = tx.send(true);
        };
        tokio::join!(proxy, admin, trigger);
        sweeper.abort();
        let _ = sweeper.await;
        // Stopped, not aborted: a spread flush under way is finished before the final one.
        flush_stop.notify_one();
        let _ = flusher.await;
        reloader.abort();
        let _ = reloader.await;
        // Awaited once aborted, so that what they hold (the store, with its file's lock) is
        // dropped before this returns.
        for t in event_tasks {
            t.abort();
            let _ = t.await;
        }
        if let Some(task) = cluster_sync {
            task.abort();
            let _ = task.await;
            if let Some(shared) = &self.cluster {
                keys::cluster::give_back(shared).await;
            }
        }
        let written = self.usage.flush().await;
        tracing::info!(entries = written, "usage flushed");
    }
}

/// A listener on `addr` with `backlog` connections queued until accepted (the kernel caps it at
/// `net.core.somaxconn`). `SO_REUSEADDR` as `TcpListener::bind` sets it, so a restart binds
/// while the old process's connections are in TIME_WAIT; its backlog (128) would drop the SYNs
/// of a burst of new connections that a busy loop has not accepted yet.
fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Takes SIGHUP from its default action (ending the process at once: no drain, no usage
/// flush) for the rest of the process, from before the store opens (which may wait for another
/// process): once a handler is installed it stays, and a SIGHUP nobody waits for is dropped.
/// [`spawn_cert_reloader`] then answers it.
fn catch_hangup() {
    #[cfg(unix)]
    if let Err(e) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tracing::warn!(error = %e, "cannot catch SIGHUP; it would end the process");
    }
}

/// Reloads the listeners' certificates on SIGHUP (open connections keep theirs; new handshakes
/// get the new one; a file that fails to load leaves the current certificate in place). Nothing
/// else is reloaded: each SIGHUP logs that other settings take a restart.
fn spawn_cert_reloader(
    certs: Vec<(&'static str, Arc<tls::ReloadableCert>)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP; certificates will not be reloaded");
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!(
                    certificates = certs.len(),
                    "SIGHUP: reloading TLS certificates, the one thing reloaded (other settings take a restart)"
                );
                for (name, cert) in &certs {
                    match cert.reload() {
                        Ok(()) => tracing::info!(listener = name, "certificate reloaded"),
                        Err(e) => {
                            tracing::error!(listener = name, error = %e, "certificate reload failed; keeping the current one")
                        }
                    }
                }
            }
        }
    })
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (not when
/// the future is first polled), so a signal that arrives right after startup is not lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                }
                _ => {
                    tracing::warn!("cannot install signal handlers; stop keygate with SIGKILL");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
