//! Shared store: Redis, for many gateways in front of one key database.
//!
//! # Layout
//! Every Redis key lives under a configurable prefix `P` (default `keygate:`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P key:<id>` | hash | one API key, one field per attribute (absent field = none) |
//! | `P h:<sha256 hex>` | string | the id of the key whose current or previous hash this is |
//! | `P client:<client_id>` | hash | one client |
//! | `P client_keys:<client_id>` | sorted set | the client's key ids, scored by `created_at` |
//! | `P keys` | sorted set | every key id, scored by `created_at` |
//! | `P clients` | sorted set | every client id, scored by `created_at` |
//! | `P usage:<id>` | hash | requests of a key per day (field: days since the epoch) |
//! | `P flushed:<flush>` | string | a bit per chunk of one usage flush written (kept a day) |
//! | `P invalidate` | pub/sub channel | one message per write (see below) |
//! | `P events`, `P q:…`, `P d:…`, `P webhooks`, … | | the event outbox and webhooks (`outbox.rs`) |
//!
//! Listings page through the sorted sets (`ZRANGE` by rank); nothing ever runs `KEYS` or `SCAN`.
//! Equal scores order by member bytes, which matches SQLite's `ORDER BY created_at, id`.
//!
//! # Atomicity and invalidation
//! Every call is one round trip: a Lua script (executed atomically by Redis, written to the AOF
//! as one MULTI/EXEC block), or a single command for `get_client` and `ping`. Write scripts
//! check every precondition (client exists, key limit, unused id and hashes) before their first
//! write, so a refused write changes nothing, and they publish one invalidation message naming
//! the key ids and every hash (old and new, current and previous) they touched:
//! `{"t": <ms>, "ids": [..], "hashes": [<hex>..]}`, where `t` is the writer's clock when it sent
//! the write (for measuring propagation lag).
//!
//! # Failure
//! Every call is bounded by [`CALL_TIMEOUT`]; a dead or hung Redis turns into
//! [`StoreError::Unavailable`] within it. The command connection is a redis-rs
//! `ConnectionManager` that reconnects in the background; the invalidation subscription has its
//! own connection and task, which reconnects with backoff and invalidates the whole local cache
//! after every (re)subscription (`invalidate_all`: every cached key is asked of Redis again),
//! since messages may have been missed while it was down.
//!
//! # TLS
//! `rediss://` connects through rustls; the server's certificate is always verified, against the
//! webpki roots or only the CAs of `store.redis_ca` ([`RedisTls`]), and a client certificate is
//! sent when one is configured. Both connections (commands and subscription) use the same
//! settings. A certificate that does not verify is an unreachable store, plus an error log that
//! names the TLS cause on each attempt.
//!
//! # Endpoints
//! One server (`redis://`, `rediss://`, `redis+unix://`); the primary of a Sentinel service
//! (`redis+sentinel://`, followed across failovers by `sentinel.rs`; the subscription moves
//! with it); or a cluster endpoint (`redis+cluster://`, redis-rs' cluster connection, which
//! follows `MOVED` / `ASK`). On a cluster every key lives in the slot of the prefix's `{…}` hash
//! tag, and each script names `<prefix>keys` as `KEYS[1]` so that it is sent to that slot's
//! node. With `wait_replicas`, each write is followed by `WAIT` (see [`RedisStore::open_with`]).
//!
//! # Files
//! This file holds [`RedisStore`] and its [`Store`] implementation; `endpoint.rs` parses store
//! URLs; `link.rs` is the command connection of each kind of endpoint; `codec.rs` turns records
//! into script arguments and replies back into records; `watch.rs` is the invalidation
//! subscription; `scripts/*.lua` are the scripts, each run after `scripts/prelude.lua` and each
//! starting with a comment that says what ARGV holds and what it answers.

mod codec;
pub mod endpoint;
mod link;
pub mod outbox;
mod sentinel;
mod signing;
mod watch;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::{
    ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError, Script, ScriptInvocation, Value,
};
use async_trait::async_trait;
use uuid::Uuid;

use super::signing::{AddKey, SigningKeyRecord};
use super::{
    ClientPatch, ClientWithKeys, Conflict, KeyPatch, Page, Rotated, Rotation, Store, StoreError,
    StoreResult, Usage, UsageWrite,
};
use crate::keys::allowance::{
    Calendar, Charge, Charged, Credits, CreditsWrite, CreditsWritten, Exhausted, Interval,
    MAX_CREDITS, Period, Refill,
};
use crate::keys::cache::InvalidationSink;
use crate::keys::{ApiKey, Client, KeyHash, KeyRecord, Millis, now_millis};
use codec::{
    Args, CODE_REFUSED, CODE_TOO_MANY, array, client_fields, client_from, corrupt, int, json,
    key_from, page_from, page_range, patch_fields, record_from, refused, status, text,
};
pub use endpoint::{Endpoint, cluster_prefix_problem, hash_tag};
use link::{Conn, Link};
pub use watch::decode_invalidation;
use watch::{SUB_DOWN, SUB_NONE, Watcher};

/// Longest a store call may take, including waiting for a reconnection, before it fails with
/// [`StoreError::Unavailable`].
pub const CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// Keys per script of an import ([`Store::import_keys`]).
const IMPORT_CHUNK: usize = 250;
/// Hashes per script of a batched lookup ([`Store::find_many_by_hash`]): a script holds Redis
/// for every other client while it runs, so a batch of the cache's background refreshes is
/// looked up a bounded number of keys at a time, in a few calls sent together.
const LOOKUP_BATCH: usize = 64;
/// Longest a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest a write waits for its replicas (`store.redis_wait_replicas`). A write that waits is
/// bounded by [`CALL_TIMEOUT`] + this (a script's first use on a server sends `WAIT` twice).
pub const WAIT_TIMEOUT: Duration = Duration::from_millis(300);
/// Why `store.redis_wait_replicas` is refused with a cluster endpoint.
pub const WAIT_ON_CLUSTER: &str = "store.redis_wait_replicas: not supported with a \
    redis+cluster:// endpoint (WAIT would reach an arbitrary node); a cluster's replication \
    is the managed service's own";
/// The prefix used when the configuration names none.
pub const DEFAULT_PREFIX: &str = "keygate:";

/// Parses a store URL into what the redis client needs. `redis://HOST:PORT/DB`,
/// `rediss://HOST:PORT/DB` (TLS, the server's certificate always verified) and
/// `redis+unix:///path.sock` (`?db=N`, `?pass=…`) are supported, each with `:PASSWORD@` or an ACL
/// `USER:PASSWORD@`. Errors never repeat the URL (it may hold a password).
pub fn parse_url(url: &str) -> Result<ConnectionInfo, String> {
    if !["redis://", "rediss://", "redis+unix://"]
        .iter()
        .any(|s| url.starts_with(s))
    {
        return Err("a Redis store URL starts with redis://, rediss:// or redis+unix://".into());
    }
    let info = url
        .into_connection_info()
        .map_err(|e| format!("not a usable Redis URL ({e}); e.g. redis://127.0.0.1:6379/0"))?;
    if let ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
        return Err(
            "rediss://…#insecure is refused: the Redis server's certificate is always verified \
             (against the webpki roots, or store.redis_ca)"
                .into(),
        );
    }
    Ok(info)
}

/// How a command connection to one server behaves: every call bounded, reconnection in the
/// background.
fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(CALL_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        // One short retry per reconnection: a call made while Redis is down waits for that
        // attempt (tens of ms), then fails; the next call starts a new attempt. So calls
        // fail fast, connection attempts stay a few dozen per second at most, and a Redis
        // that comes back is found by the next call.
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(25))
        .set_max_delay(Duration::from_millis(100))
}

/// Where a connection goes, for logs: address, database and whether it is TLS, never
/// credentials.
fn describe(info: &ConnectionInfo) -> String {
    let tls = match info.addr() {
        ConnectionAddr::TcpTls { .. } => ", TLS",
        _ => "",
    };
    format!("{} (db {}{tls})", info.addr(), info.redis_settings().db())
}

/// The files a `rediss://` store may use: a CA (PEM) that replaces the webpki roots, and a
/// client certificate and key (PEM) for mutual TLS. All unset: the server is verified against
/// the webpki roots and no client certificate is sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisTls {
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl RedisTls {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client_cert.is_none() && self.client_key.is_none()
    }

    /// Reads and checks the files. An error names the setting and the file, never what the
    /// file holds.
    pub fn load(&self) -> Result<::redis::TlsCertificates, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};

        fn read(field: &str, path: &Path) -> Result<Vec<u8>, String> {
            std::fs::read(path).map_err(|e| format!("{field}: cannot read {}: {e}", path.display()))
        }
        fn certs(
            field: &str,
            path: &Path,
            pem: &[u8],
        ) -> Result<Vec<CertificateDer<'static>>, String> {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    format!(
                        "{field}: {} is not a PEM certificate file ({e})",
                        path.display()
                    )
                })?;
            if certs.is_empty() {
                return Err(format!(
                    "{field}: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                    path.display()
                ));
            }
            Ok(certs)
        }

        let root_cert = match &self.ca {
            None => None,
            Some(path) => {
                let pem = read("redis_ca", path)?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in certs("redis_ca", path, &pem)? {
                    roots.add(cert).map_err(|e| {
                        format!(
                            "redis_ca: {} holds an unusable CA certificate ({e})",
                            path.display()
                        )
                    })?;
                }
                Some(pem)
            }
        };
        let client_tls = match (&self.client_cert, &self.client_key) {
            (None, None) => None,
            (Some(cert_path), Some(key_path)) => {
                let cert_pem = read("redis_client_cert", cert_path)?;
                let chain = certs("redis_client_cert", cert_path, &cert_pem)?;
                let key_pem = read("redis_client_key", key_path)?;
                // The parser's error is not repeated: it could quote the file.
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
                    format!(
                        "redis_client_key: {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                        key_path.display()
                    )
                })?;
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_client_auth_cert(chain, key)
                .map_err(|e| {
                    format!(
                        "redis_client_key: {} does not fit redis_client_cert {} ({e})",
                        key_path.display(),
                        cert_path.display()
                    )
                })?;
                Some(::redis::ClientTlsConfig {
                    client_cert: cert_pem,
                    client_key: key_pem,
                })
            }
            _ => {
                return Err(
                    "redis_client_cert and redis_client_key: set both (PEM files), or neither"
                        .into(),
                );
            }
        };
        Ok(::redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// The TLS cause of a failed connection, if TLS is why it failed (e.g. the server's certificate
/// did not verify).
fn tls_cause(e: &RedisError) -> Option<String> {
    type Shared = Arc<dyn std::error::Error + Send + Sync>;
    fn find(err: &(dyn std::error::Error + 'static), depth: u8) -> Option<String> {
        if depth == 0 {
            return None;
        }
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        // redis-rs keeps the error it wraps behind an `Arc`, and an `io::Error` keeps its
        // payload out of `source()`: both are opened here.
        if let Some(inner) = err.downcast_ref::<Shared>() {
            return find(inner.as_ref(), depth - 1);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            return find(inner, depth - 1);
        }
        find(err.source()?, depth - 1)
    }
    find(e, 8)
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis {what}: {e}"))
}

#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    link: Arc<Link>,
    prefix: String,
    target: String,
    /// Dropped with the store: background tasks watch it and stop.
    alive: tokio::sync::watch::Sender<()>,
    /// State of the invalidation subscription (`SUB_*`).
    subscription: Arc<AtomicU8>,
    /// Replicas that must confirm each write (`WAIT`); 0: none.
    wait_replicas: u32,
    /// Taken by a write that waits for replicas for as long as it runs: such writes go out
    /// one at a time, each with its whole time bound (behind another's `WAIT` on the same
    /// connection, a write's answer came after its response timeout, and a write that stood
    /// was answered as one that did not happen).
    wait_turn: tokio::sync::Mutex<()>,
}

impl RedisStore {
    /// Prepares a store for `url` whose keys live under `prefix`. Does not wait for Redis: when
    /// it is unreachable, calls fail with [`StoreError::Unavailable`] until it answers, and a
    /// background check logs the persistence settings once it does.
    pub fn open(url: &str, prefix: &str) -> StoreResult<Self> {
        Self::open_with_tls(url, prefix, &RedisTls::default())
    }

    /// [`RedisStore::open`], with the CA and client certificate of a `rediss://` URL.
    pub fn open_with_tls(url: &str, prefix: &str, tls: &RedisTls) -> StoreResult<Self> {
        Self::open_with(url, prefix, tls, 0)
    }

    /// [`RedisStore::open_with_tls`], where every write is answered only once `wait_replicas`
    /// replicas confirm it (`store.redis_wait_replicas`; not with a cluster endpoint).
    pub fn open_with(
        url: &str,
        prefix: &str,
        tls: &RedisTls,
        wait_replicas: u32,
    ) -> StoreResult<Self> {
        let endpoint = endpoint::parse(url).map_err(StoreError::Unavailable)?;
        let is_tls = match &endpoint {
            Endpoint::Single(info) => matches!(info.addr(), ConnectionAddr::TcpTls { .. }),
            Endpoint::Sentinel(s) => s.tls,
            Endpoint::Cluster(c) => c.tls,
        };
        let certs = if tls.is_empty() {
            None
        } else if !is_tls {
            return Err(StoreError::Unavailable(
                "redis_ca / redis_client_cert / redis_client_key need a rediss:// (or \
                 rediss+sentinel://, rediss+cluster://) store URL"
                    .into(),
            ));
        } else {
            Some(tls.load().map_err(StoreError::Unavailable)?)
        };
        let (link, target) = match endpoint {
            Endpoint::Single(info) => {
                let target = describe(&info);
                let client = match certs {
                    None => ::redis::Client::open(info),
                    Some(certs) => ::redis::Client::build_with_tls(info, certs),
                }
                .map_err(|e| unavailable("client", e))?;
                let manager = || {
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config())
                        .map_err(|e| unavailable("connection", e))
                };
                let (conn, writes) = (manager()?, manager()?);
                (
                    Link::Single {
                        client,
                        conn,
                        writes,
                    },
                    target,
                )
            }
            Endpoint::Sentinel(s) => {
                let primary = sentinel::Primary::new(s, certs);
                let target = primary.describe();
                (Link::Sentinel(primary), target)
            }
            Endpoint::Cluster(c) => {
                if let Some(problem) = cluster_prefix_problem(prefix) {
                    return Err(StoreError::Unavailable(problem));
                }
                if wait_replicas > 0 {
                    return Err(StoreError::Unavailable(WAIT_ON_CLUSTER.into()));
                }
                let infos: Vec<ConnectionInfo> = c
                    .nodes
                    .iter()
                    .map(|(h, p)| endpoint::node_info(h, *p, c.tls, &c.auth, 0))
                    .collect();
                let nodes = infos
                    .iter()
                    .map(|i| match &certs {
                        None => ::redis::Client::open(i.clone()),
                        Some(certs) => ::redis::Client::build_with_tls(i.clone(), certs.clone()),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| unavailable("client", e))?;
                let mut builder = ClusterClientBuilder::new(infos)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(CALL_TIMEOUT);
                if let Some(u) = &c.auth.username {
                    builder = builder.username(u);
                }
                if let Some(p) = &c.auth.password {
                    builder = builder.password(p);
                }
                if let Some(certs) = certs {
                    builder = builder.certs(certs);
                }
                let client = builder
                    .build()
                    .map_err(|e| unavailable("cluster client", e))?;
                let config = ::redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(CALL_TIMEOUT);
                let conn = client.get_pending_async_connection_with_config(config);
                let list = c
                    .nodes
                    .iter()
                    .map(|(h, p)| format!("{h}:{p}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let tls = if c.tls { " (TLS)" } else { "" };
                (
                    Link::Cluster { conn, nodes },
                    format!("cluster via {list}{tls}"),
                )
            }
        };
        let (alive, _) = tokio::sync::watch::channel(());
        let store = Self {
            inner: Arc::new(Inner {
                link: Arc::new(link),
                prefix: prefix.to_owned(),
                target,
                alive,
                subscription: Arc::new(AtomicU8::new(SUB_NONE)),
                wait_replicas,
                wait_turn: tokio::sync::Mutex::new(()),
            }),
        };
        tracing::info!(redis = %store.inner.target, prefix = %store.inner.prefix, "using the Redis store");
        if let Link::Sentinel(p) = store.inner.link.as_ref() {
            p.spawn(store.inner.alive.subscribe());
        }
        store.spawn_persistence_check();
        Ok(store)
    }

    fn conn(&self) -> Conn {
        self.inner.link.conn()
    }

    fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Runs `fut` within [`CALL_TIMEOUT`].
    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, RedisError>>,
    ) -> StoreResult<T> {
        self.bounded_within(what, CALL_TIMEOUT, fut).await
    }

    /// Runs `fut` within `limit`.
    async fn bounded_within<T>(
        &self,
        what: &str,
        limit: Duration,
        fut: impl Future<Output = Result<T, RedisError>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.inner.link.failed(Some(&e));
                Err(unavailable(what, e))
            }
            Err(_) => Err({
                self.inner.link.failed(None);
                unavailable(
                    what,
                    format_args!("no answer within {} ms", limit.as_millis()),
                )
            }),
        }
    }

    /// Runs `call` within [`CALL_TIMEOUT`] as [`Self::bounded`] does, once more when it fails
    /// on a connection found dropped: a Redis restarted since the last call leaves each idle
    /// connection dead, and the first call on it fails while the connection manager makes a
    /// new one; the second goes out on that one, within the same timeout. For reads only: a
    /// write whose connection dropped may have run.
    async fn bounded_read<T, F>(&self, what: &str, call: impl Fn(Conn) -> F) -> StoreResult<T>
    where
        F: Future<Output = Result<T, RedisError>>,
    {
        let link = &self.inner.link;
        self.bounded(what, async {
            match call(link.conn()).await {
                Err(e) if e.is_unrecoverable_error() => call(link.conn()).await,
                other => other,
            }
        })
        .await
    }

    /// `script` with `args`, the prefix prepended.
    fn invocation<'s>(&self, script: &'s Script, args: Args) -> ScriptInvocation<'s> {
        let mut inv = script.prepare_invoke();
        // The scripts name their keys from the prefix (ARGV[1]); KEYS[1] is one of them, so
        // that a cluster connection sends the script to the node that holds the prefix's slot.
        inv.key(format!("{}keys", self.prefix()));
        inv.arg(self.prefix());
        for a in args.0 {
            inv.arg(a);
        }
        inv
    }

    /// Runs one script with `args` (the prefix is prepended).
    async fn script(&self, what: &str, script: &Script, args: Args) -> StoreResult<Value> {
        let inv = self.invocation(script, args);
        let mut conn = self.conn();
        self.bounded(
            what,
            async move { inv.invoke_async::<Value>(&mut conn).await },
        )
        .await
    }

    /// Runs one read-only script with `args`, as [`Self::script`], sent once more on a new
    /// connection when the first was found dropped ([`Self::bounded_read`]).
    async fn read(&self, what: &str, script: &Script, args: Args) -> StoreResult<Value> {
        let inv = &self.invocation(script, args);
        self.bounded_read(what, |mut conn| async move {
            inv.invoke_async::<Value>(&mut conn).await
        })
        .await
    }

    /// Runs a write script; with `wait_replicas` set ([`RedisStore::open_with`]), answers only
    /// once that many replicas hold the write, else [`StoreError::Unconfirmed`] (the write
    /// stands on the primary but is not acknowledged). The script and `WAIT` go out as one
    /// pipeline on one connection, so `WAIT` waits for exactly this connection's writes; a
    /// connection of their own, as `WAIT` holds up every later call on its connection until
    /// the replicas answer (lookups would queue behind it for up to `WAIT_TIMEOUT`).
    async fn write(&self, what: &str, script: &Script, args: Args) -> StoreResult<Value> {
        let n = self.inner.wait_replicas;
        if n == 0 {
            return self.script(what, script, args).await;
        }
        let mut eval = ::redis::cmd("EVALSHA");
        eval.arg(script.get_hash())
            .arg(1)
            .arg(format!("{}keys", self.prefix()))
            .arg(self.prefix());
        for a in args.0 {
            eval.arg(a);
        }
        let mut pipe = ::redis::pipe();
        pipe.add_command(eval)
            .cmd("WAIT")
            .arg(n)
            .arg(WAIT_TIMEOUT.as_millis() as u64);
        let _turn = self.inner.wait_turn.lock().await;
        let mut conn = self.inner.link.write_conn();
        let run = async move {
            match pipe.query_async::<(Value, i64)>(&mut conn).await {
                // Not loaded on this server yet: nothing ran; load it and send both again.
                Err(e)
                    if e.kind()
                        == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript) =>
                {
                    script.prepare_invoke().load_async(&mut conn).await?;
                    pipe.query_async::<(Value, i64)>(&mut conn).await
                }
                other => other,
            }
        };
        // A script not loaded on this server yet costs a second `WAIT` (the first one went out
        // with the refused script): that much more time, or a write that stands would be
        // answered as one that did not happen.
        let (v, acked) = self
            .bounded_within(what, CALL_TIMEOUT + WAIT_TIMEOUT, run)
            .await?;
        if acked < i64::from(n) {
            return Err(StoreError::Unconfirmed(format!(
                "redis {what}: {acked} of {n} replicas confirmed the write within {} ms",
                WAIT_TIMEOUT.as_millis()
            )));
        }
        Ok(v)
    }

    /// Reads `CONFIG GET appendonly / appendfsync / maxmemory-policy` once Redis answers and
    /// warns when acknowledged admin writes could be lost by a Redis restart or evicted.
    fn spawn_persistence_check(&self) {
        let link = Arc::clone(&self.inner.link);
        let target = self.inner.target.clone();
        let mut stopped = self.inner.alive.subscribe();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                let mut conn = link.conn();
                let read = async {
                    let a = config_get(&mut conn, "appendonly").await?;
                    let f = config_get(&mut conn, "appendfsync").await?;
                    let p = config_get(&mut conn, "maxmemory-policy").await?;
                    Ok::<_, RedisError>((a, f, p))
                };
                match tokio::time::timeout(CALL_TIMEOUT, read).await {
                    Ok(Ok((appendonly, appendfsync, policy))) => {
                        if let Some(w) = eviction_warning(policy.as_deref()) {
                            tracing::warn!(redis = %target, "{w}");
                        }
                        match persistence_warning(appendonly.as_deref(), appendfsync.as_deref()) {
                            Some(w) => tracing::warn!(redis = %target, "{w}"),
                            None => tracing::info!(
                                redis = %target,
                                appendfsync = appendfsync.as_deref().unwrap_or("?"),
                                "Redis persistence: append-only file on"
                            ),
                        }
                        return;
                    }
                    Ok(Err(e)) if e.kind() != ::redis::ErrorKind::Io => {
                        tracing::info!(
                            redis = %target,
                            "cannot read Redis persistence settings (CONFIG may be disabled): {e}; \
                             make sure Redis runs with appendonly yes"
                        );
                        return;
                    }
                    Ok(Err(e)) => {
                        if let Some(cause) = tls_cause(&e) {
                            tracing::error!(
                                redis = %target,
                                "cannot connect to Redis: TLS: {cause}; retrying (the store is unavailable until it verifies)"
                            );
                        }
                    }
                    Err(_) => {}
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped.changed() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        });
    }
}

async fn config_get(
    conn: &mut impl ConnectionLike,
    name: &str,
) -> Result<Option<String>, RedisError> {
    let v: Value = ::redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(conn)
        .await?;
    let pairs: Vec<Value> = match v {
        Value::Array(a) => a,
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    };
    Ok(pairs.get(1).and_then(text))
}

/// The warning to log for these persistence settings, if any.
pub fn persistence_warning(appendonly: Option<&str>, appendfsync: Option<&str>) -> Option<String> {
    if appendonly != Some("yes") {
        return Some(
            "Redis runs without the append-only file (appendonly is not \"yes\"): keys created and \
             revocations acknowledged shortly before a Redis restart can be lost; set \
             `appendonly yes` (with `appendfsync everysec` or `always`)"
                .into(),
        );
    }
    if appendfsync == Some("no") {
        return Some(
            "Redis has appendfsync no: writes reach the disk when the OS decides, so a machine \
             crash can lose many seconds of admin writes; use everysec or always"
                .into(),
        );
    }
    None
}

/// The warning to log for this `maxmemory-policy`, if any: every policy but `noeviction` can
/// evict keygate's state. The `allkeys-*` ones take keys and clients (they stop working); the
/// `volatile-*` ones take what keygate gives a TTL: quota counters (a client's quota would start
/// again from 0) and the cluster rate limits' buckets.
pub fn eviction_warning(policy: Option<&str>) -> Option<String> {
    let policy = policy?;
    if policy == "noeviction" {
        return None;
    }
    let what = if policy.starts_with("allkeys-") {
        "API keys and clients (they would stop working) and quota counters"
    } else {
        "quota counters (a client's quota would start again from 0) and cluster rate-limit state"
    };
    Some(format!(
        "Redis has maxmemory-policy {policy}: under memory pressure it may evict {what}; use \
         noeviction"
    ))
}

/// The Lua scripts (`scripts/*.lua`), each run after the shared prelude. The first lines of
/// every script say what ARGV holds and what it answers.
struct Scripts {
    find_by_hash: Script,
    find_many_by_hash: Script,
    find_by_id: Script,
    list_keys: Script,
    insert_key: Script,
    patch_key: Script,
    rotate_key: Script,
    delete_key: Script,
    insert_client: Script,
    list_clients: Script,
    patch_client: Script,
    delete_client: Script,
    disable_client_keys: Script,
    replace_client_keys: Script,
    record_usage: Script,
    usage: Script,
    charge: Script,
    write_credits: Script,
    credits: Script,
    quota_used: Script,
    sync_rates: Script,
    import_keys: Script,
}

const PRELUDE: &str = include_str!("scripts/prelude.lua");

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| {
        let s = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts {
            find_by_hash: s(include_str!("scripts/find_by_hash.lua")),
            find_many_by_hash: s(include_str!("scripts/find_many_by_hash.lua")),
            find_by_id: s(include_str!("scripts/find_by_id.lua")),
            list_keys: s(include_str!("scripts/list_keys.lua")),
            insert_key: s(include_str!("scripts/insert_key.lua")),
            patch_key: s(include_str!("scripts/patch_key.lua")),
            rotate_key: s(include_str!("scripts/rotate_key.lua")),
            delete_key: s(include_str!("scripts/delete_key.lua")),
            insert_client: s(include_str!("scripts/insert_client.lua")),
            list_clients: s(include_str!("scripts/list_clients.lua")),
            patch_client: s(include_str!("scripts/patch_client.lua")),
            delete_client: s(include_str!("scripts/delete_client.lua")),
            disable_client_keys: s(include_str!("scripts/disable_client_keys.lua")),
            replace_client_keys: s(include_str!("scripts/replace_client_keys.lua")),
            record_usage: s(include_str!("scripts/record_usage.lua")),
            usage: s(include_str!("scripts/usage.lua")),
            charge: s(include_str!("scripts/charge.lua")),
            write_credits: s(include_str!("scripts/write_credits.lua")),
            credits: s(include_str!("scripts/credits.lua")),
            quota_used: s(include_str!("scripts/quota_used.lua")),
            sync_rates: s(include_str!("scripts/sync_rates.lua")),
            import_keys: s(include_str!("scripts/import_keys.lua")),
        }
    })
}

/// The Redis key suffix of a client's quota count in one period (under `P quota:`).
fn quota_key(client_id: &str, per: Period, index: i64) -> String {
    format!("{}:{index}:{client_id}", per.as_str())
}

/// How long a period's quota count is kept: the period and as long again (so reads of the
/// period just ended still answer), then Redis drops it.
fn quota_ttl_secs(per: Period) -> u64 {
    match per {
        Period::Hour => 2 * 3600,
        Period::Day => 2 * 86_400,
        Period::Month => 62 * 86_400,
    }
}

/// `{remaining, amount, interval, day, period}` as the credit scripts answer them.
fn credits_from(v: &[Value]) -> StoreResult<Credits> {
    let t = |i: usize| v.get(i).and_then(text).unwrap_or_default();
    let remaining: u64 = t(0).parse().map_err(|_| corrupt("credits"))?;
    let refill = match (t(1).parse::<u64>(), Interval::parse(&t(2))) {
        (Ok(amount), Some(interval)) => Some(Refill {
            amount,
            interval,
            day: t(3).parse().ok(),
        }),
        _ => None,
    };
    Ok(Credits {
        remaining,
        refill,
        period: t(4).parse().unwrap_or(0),
    })
}

/// `{status}` or `{1, {key fields…}}`, as answered by the scripts that replace or disable a
/// client's keys.
fn keys_before(v: Value) -> StoreResult<Vec<ApiKey>> {
    let parts = array(v)?;
    let code = int(parts.first().ok_or_else(|| corrupt("replacement"))?)?;
    if !status(code)? {
        return Err(StoreError::NotFound);
    }
    let before = parts.get(1).cloned().unwrap_or(Value::Nil);
    array(before)?.iter().map(key_from).collect()
}

#[async_trait]
impl Store for RedisStore {
    async fn find_by_hash(&self, hash: &KeyHash, now: Millis) -> StoreResult<Option<KeyRecord>> {
        let mut a = Args::default();
        a.push(hex::encode(hash.0)).push(now);
        record_from(self.read("lookup", &scripts().find_by_hash, a).await?)
    }

    /// One script call per [`LOOKUP_BATCH`] hashes, the calls at once.
    async fn find_many_by_hash(
        &self,
        hashes: &[KeyHash],
        now: Millis,
    ) -> StoreResult<Vec<Option<KeyRecord>>> {
        let calls = hashes.chunks(LOOKUP_BATCH).map(|chunk| async move {
            let mut a = Args::default();
            a.push(now);
            for h in chunk {
                a.push(hex::encode(h.0));
            }
            let found = array(self.read("lookup", &scripts().find_many_by_hash, a).await?)?;
            if found.len() != chunk.len() {
                return Err(corrupt("lookup"));
            }
            found
                .into_iter()
                .map(record_from)
                .collect::<StoreResult<Vec<_>>>()
        });
        let chunks = futures_util::future::try_join_all(calls).await?;
        Ok(chunks.into_iter().flatten().collect())
    }

    async fn find_by_id(&self, id: Uuid) -> StoreResult<Option<KeyRecord>> {
        let mut a = Args::default();
        a.push(id);
        record_from(self.read("lookup", &scripts().find_by_id, a).await?)
    }

    async fn list_keys(
        &self,
        client_id: Option<&str>,
        page: u32,
        per_page: u32,
    ) -> StoreResult<Page<ApiKey>> {
        // The script reads "" as "every client": an empty filter is no client's (as on SQLite).
        if client_id == Some("") {
            return Ok(Page {
                items: Vec::new(),
                total: 0,
            });
        }
        let (first, last) = page_range(page, per_page);
        let mut a = Args::default();
        a.push(client_id.unwrap_or("")).push(first).push(last);
        page_from(
            self.read("list keys", &scripts().list_keys, a).await?,
            key_from,
        )
    }

    async fn insert_key(&self, key: &ApiKey, max_keys: u32) -> StoreResult<()> {
        let mut a = Args::default();
        a.push(now_millis()).push(max_keys).key(key);
        let v = self.write("insert key", &scripts().insert_key, a).await?;
        match int(&v)? {
            0 => Err(StoreError::NotFound),
            CODE_TOO_MANY => Err(StoreError::Conflict(Conflict::TooManyKeys {
                max: max_keys,
            })),
            code => status(code).map(|_| ()),
        }
    }

    async fn patch_key(
        &self,
        id: Uuid,
        patch: &KeyPatch,
        now: Millis,
    ) -> StoreResult<Option<ApiKey>> {
        let (set, clear) = patch_fields(patch);
        let mut a = Args::default();
        a.push(now_millis())
            .push(id)
            .push(now)
            .push(patch.by.as_str())
            .push(
                patch
                    .leak
                    .as_ref()
                    .map(serde_json::Value::to_string)
                    .unwrap_or_default(),
            )
            .push(set.len() * 2);
        for (name, value) in set {
            a.push(name).push(value);
        }
        for name in clear {
            a.push(name);
        }
        let v = self.write("patch key", &scripts().patch_key, a).await?;
        if v == Value::Nil {
            return Ok(None);
        }
        match array(v)?.as_slice() {
            [code, fields] if int(code)? == 1 => key_from(fields).map(Some),
            [code, what] if int(code)? == CODE_REFUSED => Err(refused(what)),
            _ => Err(corrupt("patch")),
        }
    }

    async fn rotate_key(&self, id: Uuid, r: &Rotation) -> StoreResult<Option<Rotated>> {
        let mut a = Args::default();
        a.push(now_millis())
            .push(id)
            .push(hex::encode(r.key_hash.0))
            .push(&r.prefix)
            .push(
                r.previous_valid_until
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
            )
            .push(r.at);
        let parts = array(self.write("rotate key", &scripts().rotate_key, a).await?)?;
        let code = int(parts.first().ok_or_else(|| corrupt("rotation"))?)?;
        if !status(code)? {
            return Ok(None);
        }
        let [_, before, after] = parts.as_slice() else {
            return Err(corrupt("rotation"));
        };
        Ok(Some(Rotated {
            before: key_from(before)?,
            after: key_from(after)?,
        }))
    }

    async fn delete_key(&self, id: Uuid) -> StoreResult<Option<ApiKey>> {
        let mut a = Args::default();
        a.push(now_millis()).push(id);
        match self.write("delete key", &scripts().delete_key, a).await? {
            Value::Nil => Ok(None),
            v => key_from(&v).map(Some),
        }
    }

    async fn insert_client(&self, client: &Client, first_key: &ApiKey) -> StoreResult<()> {
        let cf = client_fields(client);
        let mut a = Args::default();
        a.push(now_millis())
            .push(&client.client_id)
            .push(client.created_at)
            .push(cf.len());
        for f in cf {
            a.push(f);
        }
        a.key(first_key);
        let v = self
            .write("insert client", &scripts().insert_client, a)
            .await?;
        status(int(&v)?).map(|_| ())
    }

    async fn get_client(&self, client_id: &str) -> StoreResult<Option<Client>> {
        let key = &format!("{}client:{client_id}", self.prefix());
        let v = self
            .bounded_read("get client", |mut conn| async move {
                ::redis::cmd("HGETALL")
                    .arg(key)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        match &v {
            Value::Array(a) if a.is_empty() => Ok(None),
            Value::Map(m) if m.is_empty() => Ok(None),
            Value::Nil => Ok(None),
            v => client_from(v).map(Some),
        }
    }

    async fn list_clients(&self, page: u32, per_page: u32) -> StoreResult<Page<Client>> {
        let (first, last) = page_range(page, per_page);
        let mut a = Args::default();
        a.push(first).push(last);
        page_from(
            self.read("list clients", &scripts().list_clients, a)
                .await?,
            client_from,
        )
    }

    async fn patch_client(
        &self,
        client_id: &str,
        patch: &ClientPatch,
    ) -> StoreResult<Option<Client>> {
        let mut a = Args::default();
        a.push(now_millis()).push(client_id);
        match &patch.license {
            Some(l) => a.push("1").push(l),
            None => a.push("0").push(""),
        };
        match &patch.metadata {
            None => a.push("keep").push(""),
            Some(Some(m)) => a.push("set").push(json(m)),
            Some(None) => a.push("clear").push(""),
        };
        match self
            .write("patch client", &scripts().patch_client, a)
            .await?
        {
            Value::Nil => Ok(None),
            v => client_from(&v).map(Some),
        }
    }

    async fn delete_client(&self, client_id: &str) -> StoreResult<Option<ClientWithKeys>> {
        let mut a = Args::default();
        a.push(now_millis()).push(client_id);
        let v = self
            .write("delete client", &scripts().delete_client, a)
            .await?;
        if v == Value::Nil {
            return Ok(None);
        }
        let parts = array(v)?;
        let [client, keys] = parts.as_slice() else {
            return Err(corrupt("deletion"));
        };
        Ok(Some(ClientWithKeys {
            client: client_from(client)?,
            keys: array(keys.clone())?
                .iter()
                .map(key_from)
                .collect::<StoreResult<_>>()?,
        }))
    }

    async fn disable_client_keys(&self, client_id: &str) -> StoreResult<Vec<ApiKey>> {
        let mut a = Args::default();
        a.push(now_millis()).push(client_id);
        keys_before(
            self.write("disable keys", &scripts().disable_client_keys, a)
                .await?,
        )
    }

    async fn replace_client_keys(
        &self,
        client_id: &str,
        new_key: &ApiKey,
    ) -> StoreResult<Vec<ApiKey>> {
        let mut a = Args::default();
        a.push(now_millis()).push(client_id).key(new_key);
        keys_before(
            self.write("replace keys", &scripts().replace_client_keys, a)
                .await?,
        )
    }

    async fn record_usage(&self, write: UsageWrite, usage: &[Usage]) -> StoreResult<()> {
        if usage.is_empty() {
            return Ok(());
        }
        let mut a = Args::default();
        a.push(write.flush).push(write.chunk);
        for u in usage {
            a.push(u.key_id)
                .push(u.last_used_at)
                .push(u.day)
                .push(u.requests);
        }
        self.script("record usage", &scripts().record_usage, a)
            .await
            .map(|_| ())
    }

    async fn usage(&self, key_id: Uuid, from: i64, to: i64) -> StoreResult<Vec<(i64, u64)>> {
        let mut a = Args::default();
        a.push(key_id).push(from).push(to);
        let v = self.read("usage", &scripts().usage, a).await?;
        let items: Vec<String> = ::redis::from_redis_value(v)
            .map_err(|e| StoreError::Unavailable(format!("redis: unexpected usage reply: {e}")))?;
        let mut out: Vec<(i64, u64)> = items
            .chunks_exact(2)
            .filter_map(|c| Some((c[0].parse().ok()?, c[1].parse().ok()?)))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    async fn charge(&self, c: &Charge<'_>) -> StoreResult<Charged> {
        let cal = Calendar::at(c.now);
        let mut a = Args::default();
        a.push(c.key_id)
            .push(c.cost.map(|n| n.to_string()).unwrap_or_default())
            .push(cal.day)
            .push(cal.month)
            .push(cal.day_of_month);
        match &c.quota {
            Some(q) => a
                .push(quota_key(
                    q.client_id,
                    q.quota.per,
                    q.quota.per.index(c.now),
                ))
                .push(q.quota.requests)
                .push(quota_ttl_secs(q.quota.per)),
            None => a.push("").push(0).push(0),
        };
        // For the quota.threshold events the script may write.
        a.push(c.now);
        match &c.quota {
            Some(q) => a
                .push(q.client_id)
                .push(q.quota.per.as_str())
                .push(q.quota.per.index(c.now)),
            None => a.push("").push("").push(0),
        };
        let v = self.script("charge", &scripts().charge, a).await?;
        let parts: Vec<i64> = ::redis::from_redis_value(v)
            .map_err(|e| StoreError::Unavailable(format!("redis: unexpected charge reply: {e}")))?;
        let [status, credits, quota] = parts[..] else {
            return Err(corrupt("charge"));
        };
        let amount = |n: i64| (n >= 0).then_some(n as u64);
        Ok(Charged {
            credits: amount(credits),
            quota: amount(quota),
            refused: match status {
                0 => None,
                1 => Some(Exhausted::Credits),
                _ => Some(Exhausted::Quota),
            },
        })
    }

    async fn credits(&self, key_id: Uuid) -> StoreResult<Option<Credits>> {
        let mut a = Args::default();
        a.push(key_id);
        let v = self.read("credits", &scripts().credits, a).await?;
        if v == Value::Nil {
            return Ok(None);
        }
        credits_from(&array(v)?).map(Some)
    }

    async fn write_credits(
        &self,
        key_id: Uuid,
        write: &CreditsWrite,
        now: Millis,
    ) -> StoreResult<CreditsWritten> {
        let cal = Calendar::at(now);
        let (op, n, refill) = match *write {
            CreditsWrite::Set { remaining, refill } => ("set", remaining, refill),
            CreditsWrite::SetRemaining(n) => ("set_remaining", n, None),
            CreditsWrite::Add(n) => ("add", n, None),
            CreditsWrite::Remove => ("remove", 0, None),
        };
        let mut a = Args::default();
        a.push(now).push(key_id).push(op).push(n);
        match refill {
            Some(r) => a
                .push(r.amount)
                .push(r.interval.as_str())
                .push(r.day.map(|d| d.to_string()).unwrap_or_default())
                .push(r.period(now)),
            None => a.push("").push("").push("").push(0),
        };
        a.push(cal.day)
            .push(cal.month)
            .push(cal.day_of_month)
            .push(MAX_CREDITS);
        let v = array(
            // An admin write: acknowledged by `redis_wait_replicas` replicas, as the others.
            self.write("write credits", &scripts().write_credits, a)
                .await?,
        )?;
        let code = int(v.first().ok_or_else(|| corrupt("credits"))?)?;
        Ok(match code {
            0 => CreditsWritten::NoKey,
            1 => CreditsWritten::TooMany,
            2 => CreditsWritten::Done(Some(credits_from(&v[1..])?)),
            _ => CreditsWritten::Done(None),
        })
    }

    async fn quota_used(&self, client_id: &str, per: Period, index: i64) -> StoreResult<u64> {
        let mut a = Args::default();
        a.push(quota_key(client_id, per, index));
        let v = self.read("quota", &scripts().quota_used, a).await?;
        Ok(int(&v)?.max(0) as u64)
    }

    async fn sync_rates(
        &self,
        instance: &str,
        buckets: &[crate::keys::cluster::BucketSync],
    ) -> StoreResult<crate::keys::cluster::SyncReply> {
        let mut a = Args::default();
        a.push(instance).push(buckets.len());
        for b in buckets {
            a.push(&b.name)
                .push(b.t_us)
                .push(b.tau_us)
                .push(b.unused)
                .push(b.demand)
                .push(if b.want { "1" } else { "0" });
        }
        let v = self.script("sync rates", &scripts().sync_rates, a).await?;
        let parts: Vec<i64> = ::redis::from_redis_value(v).map_err(|e| {
            StoreError::Unavailable(format!("redis: unexpected rate sync reply: {e}"))
        })?;
        let (live, rest) = parts.split_first().ok_or_else(|| corrupt("rate sync"))?;
        Ok(crate::keys::cluster::SyncReply {
            live: (*live).clamp(1, i64::from(u32::MAX)) as u32,
            leases: rest
                .chunks_exact(2)
                .map(|c| crate::keys::cluster::Lease {
                    cells: c[0].max(0) as u64,
                    until_full_us: c[1].max(0) as u64,
                })
                .collect(),
        })
    }

    /// Redis answers, and — once invalidations are watched — the subscription is up (an
    /// instance that may miss revocations is not ready).
    /// Scripts of at most [`IMPORT_CHUNK`] keys (each well within [`CALL_TIMEOUT`], so Redis
    /// is never held long): every key written with its `key.created` (`imported: true`) in
    /// the same script. An atomic import is first judged whole, chunk by chunk, without
    /// writing; only when nothing is refused are the chunks written. Should a chunk then be
    /// refused (another writer took a hash or a client's room between the two passes) or the
    /// store fail, the chunks written before are deleted again (`key.revoked` follows their
    /// `key.created`), so nothing stands; when even that fails, [`StoreError::Incomplete`].
    /// A non-atomic import the store fails partway keeps what was written and answers the
    /// rest [`Unconfirmed`](super::import::Refusal::Unconfirmed).
    async fn import_keys(
        &self,
        keys: Vec<ApiKey>,
        max_keys: u32,
        atomic: bool,
    ) -> StoreResult<Vec<(usize, super::import::Refusal)>> {
        use super::import::Refusal;
        use std::collections::{HashMap, HashSet};
        let mut refused = Vec::new();
        let mut seen = HashSet::with_capacity(keys.len());
        let mut candidates = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let fresh = seen.insert(k.key_hash.0);
            let prev = k.previous_hash.is_none_or(|h| seen.insert(h.0));
            if fresh && prev {
                candidates.push(i);
            } else {
                refused.push((i, Refusal::Duplicate));
            }
        }
        // An atomic import judged whole before anything is written (one chunk judges itself).
        if atomic && (!refused.is_empty() || candidates.len() > IMPORT_CHUNK) {
            let mut earlier: HashMap<&str, u32> = HashMap::new();
            for chunk in candidates.chunks(IMPORT_CHUNK) {
                let mut before = HashMap::new();
                for &i in chunk {
                    let c = keys[i].client_id.as_str();
                    before.insert(c, earlier.get(c).copied().unwrap_or(0));
                }
                let out = self
                    .import_chunk(&keys, chunk, max_keys, atomic, true, &before)
                    .await?;
                for &i in chunk {
                    if !out.iter().any(|r| r.0 == i) {
                        *earlier.entry(keys[i].client_id.as_str()).or_default() += 1;
                    }
                }
                refused.extend(out);
            }
            if !refused.is_empty() {
                refused.sort_by_key(|(i, _)| *i);
                return Ok(refused);
            }
        }
        let none = HashMap::new();
        // What the chunks before wrote, to undo should an atomic import stop.
        let mut written: Vec<usize> = Vec::new();
        for (n, chunk) in candidates.chunks(IMPORT_CHUNK).enumerate() {
            let out = match self
                .import_chunk(&keys, chunk, max_keys, atomic, false, &none)
                .await
            {
                Ok(out) => out,
                // One chunk, nothing written before: the store's error, as any call's. (With
                // more, the first may have been written too: undone or told below, as a later
                // one is; its error alone said the whole import stood, or none of it.)
                Err(e) if n == 0 && candidates.len() <= IMPORT_CHUNK => return Err(e),
                Err(e) if atomic => {
                    // The failed chunk may have been written (an answer lost, a timeout).
                    written.extend_from_slice(chunk);
                    return match super::import::undo(self, &keys, &written).await {
                        Ok(()) => Err(e),
                        Err(undo) => Err(StoreError::Incomplete(format!(
                            "import: {e}; undoing the keys written before: {undo}"
                        ))),
                    };
                }
                Err(e) => {
                    // The chunks before stand: this one and the rest are not confirmed.
                    tracing::error!(error = %e, "import: the store failed partway");
                    let rest = candidates[n * IMPORT_CHUNK..].iter();
                    refused.extend(rest.map(|&i| (i, Refusal::Unconfirmed)));
                    refused.sort_by_key(|(i, _)| *i);
                    return Ok(refused);
                }
            };
            if atomic && !out.is_empty() {
                // Another writer took a hash or a client's room since the judging: the
                // chunks written before are undone, so the import writes nothing.
                super::import::undo(self, &keys, &written)
                    .await
                    .map_err(|undo| {
                        StoreError::Incomplete(format!(
                            "import: a key was taken meanwhile; undoing the keys written \
                             before: {undo}"
                        ))
                    })?;
                refused.extend(out);
                refused.sort_by_key(|(i, _)| *i);
                return Ok(refused);
            }
            if atomic {
                written.extend_from_slice(chunk);
            }
            refused.extend(out);
        }
        refused.sort_by_key(|(i, _)| *i);
        Ok(refused)
    }

    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.conn();
        let probe = self.inner.link.probe(self.prefix());
        self.bounded("ping", async move {
            probe.query_async::<Value>(&mut conn).await
        })
        .await?;
        if self.inner.subscription.load(Ordering::Acquire) == SUB_DOWN {
            return Err(StoreError::Unavailable(
                "redis: the invalidation subscription is down".into(),
            ));
        }
        Ok(())
    }

    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>> {
        self.read_signing_keys().await
    }

    async fn add_signing_key(
        &self,
        key: &SigningKeyRecord,
        how: AddKey,
        prune: &[String],
    ) -> StoreResult<Vec<SigningKeyRecord>> {
        self.write_signing_key(key, how, prune).await
    }

    fn watch_invalidations(&self, sink: Arc<dyn InvalidationSink>) {
        Watcher {
            link: Arc::clone(&self.inner.link),
            channel: format!("{}invalidate", self.prefix()),
            prefix: self.prefix().to_owned(),
            target: self.inner.target.clone(),
            sink,
            state: Arc::clone(&self.inner.subscription),
        }
        .spawn(self.inner.alive.subscribe());
    }

    fn outbox(&self) -> Option<Arc<dyn crate::keys::outbox::Outbox>> {
        Some(Arc::new(outbox::RedisOutbox {
            store: self.clone(),
        }))
    }
}

impl RedisStore {
    /// One chunk of an import (import_keys.lua): the refusals, by index in `keys`.
    async fn import_chunk(
        &self,
        keys: &[ApiKey],
        chunk: &[usize],
        max_keys: u32,
        atomic: bool,
        judge: bool,
        earlier: &std::collections::HashMap<&str, u32>,
    ) -> StoreResult<Vec<(usize, super::import::Refusal)>> {
        use super::import::Refusal;
        let mut a = Args::default();
        a.push(now_millis())
            .push(max_keys)
            .push(if atomic { "1" } else { "0" })
            .push(if judge { "1" } else { "0" })
            .push(earlier.len());
        for (c, n) in earlier {
            a.push(c).push(n);
        }
        a.push(chunk.len());
        for &i in chunk {
            a.key(&keys[i]);
        }
        // Judging writes nothing: no replica has anything to confirm (sent through `write`,
        // a lagging replica answered a judging pass "made but not confirmed").
        let v = if judge {
            self.script("judge import", &scripts().import_keys, a)
                .await?
        } else {
            self.write("import keys", &scripts().import_keys, a).await?
        };
        let parts: Vec<i64> = ::redis::from_redis_value(v)
            .map_err(|e| StoreError::Unavailable(format!("redis: unexpected import reply: {e}")))?;
        parts
            .chunks_exact(2)
            .map(|c| {
                let refusal = match c[1] {
                    1 => Refusal::UnknownClient,
                    2 => Refusal::Duplicate,
                    3 => Refusal::TooManyKeys { max: max_keys },
                    _ => return Err(corrupt("import")),
                };
                let at = usize::try_from(c[0]).map_err(|_| corrupt("import"))?;
                Ok((*chunk.get(at).ok_or_else(|| corrupt("import"))?, refusal))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(parse_url("redis://127.0.0.1:6379/2").is_ok());
        assert!(parse_url("redis+unix:///tmp/r.sock").is_ok());
        let info = parse_url("rediss://u:hunter2@example.com:6380/0").unwrap();
        assert_eq!(info.redis_settings().username(), Some("u"));
        assert_eq!(describe(&info), "example.com:6380 (db 0, TLS)");
        let e = parse_url("rediss://u:hunter2@example.com:6380/0#insecure").unwrap_err();
        assert!(e.contains("always verified"), "{e}");
        assert!(!e.contains("hunter2"));
        let e = parse_url("http://u:hunter2@example.com:6380/0").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        let e = parse_url("redis://u:hunter2@host:6379/notanumber").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        let info = parse_url("redis://:hunter2@10.0.0.1:6380/3").unwrap();
        let d = describe(&info);
        assert_eq!(d, "10.0.0.1:6380 (db 3)");
    }

    #[test]
    fn persistence_warnings() {
        assert!(persistence_warning(Some("no"), Some("everysec")).is_some());
        assert!(persistence_warning(None, None).is_some());
        assert!(persistence_warning(Some("yes"), Some("no")).is_some());
        assert!(persistence_warning(Some("yes"), Some("everysec")).is_none());
        assert!(persistence_warning(Some("yes"), Some("always")).is_none());
        assert!(eviction_warning(Some("allkeys-lru")).is_some());
        assert!(eviction_warning(Some("noeviction")).is_none());
        // Quota counters and cluster buckets have a TTL: a volatile-* policy takes them.
        assert!(eviction_warning(Some("volatile-lru")).is_some());
        assert!(eviction_warning(Some("volatile-ttl")).is_some_and(|w| w.contains("quota")));
        assert!(eviction_warning(None).is_none());
    }
}
