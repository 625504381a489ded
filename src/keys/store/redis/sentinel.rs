//! Following the primary of a Sentinel-managed Redis.
//!
//! One task per store asks the sentinels (`SENTINEL get-master-addr-by-name`) where the primary
//! is, checks with `ROLE` that the server there really is a primary, and then publishes a
//! command connection to it. It asks again at once when a sentinel announces `+switch-master`
//! (the task stays subscribed to one sentinel), when a store call fails on a connection error
//! or `READONLY` (see [`Primary::failed`]), and otherwise every [`RECHECK`]. While no primary is
//! known, calls fail fast with [`StoreError::Unavailable`](crate::keys::store::StoreError), so
//! the outage rules of a single Redis apply unchanged. Each switch bumps a generation counter
//! that the invalidation subscription watches: it subscribes again on the new primary and clears
//! the local cache.

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, MultiplexedConnection};
use ::redis::{Client, RedisError, TlsCertificates, Value};
use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use tokio::sync::{Notify, watch};

use super::endpoint::{SentinelEndpoint, bare_info, node_info};
use super::{CALL_TIMEOUT, CONNECT_TIMEOUT, manager_config};

/// How often the sentinels are asked even when nothing suggests a change.
const RECHECK: Duration = Duration::from_secs(1);
/// The shortest time between two rounds of questions to the sentinels.
const MIN_ASK_INTERVAL: Duration = Duration::from_millis(50);

/// The primary in use: where it is, and a connection to it.
pub(super) struct Current {
    pub(super) addr: (String, u16),
    pub(super) client: Client,
    pub(super) conn: ConnectionManager,
    /// For writes that wait for replicas (see `Link::write_conn`); connects on its first use.
    pub(super) writes: ConnectionManager,
}

/// The store's view of the primary, kept up to date by [`Primary::spawn`].
pub(super) struct Primary {
    endpoint: SentinelEndpoint,
    certs: Option<TlsCertificates>,
    current: ArcSwapOption<Current>,
    recheck: Notify,
    generation: watch::Sender<u64>,
}

impl Primary {
    pub(super) fn new(endpoint: SentinelEndpoint, certs: Option<TlsCertificates>) -> Arc<Self> {
        Arc::new(Self {
            endpoint,
            certs,
            current: ArcSwapOption::empty(),
            recheck: Notify::new(),
            generation: watch::channel(0).0,
        })
    }

    /// The primary in use, if one is known.
    pub(super) fn current(&self) -> Option<Arc<Current>> {
        self.current.load_full()
    }

    /// Changes each time another primary is taken into use.
    pub(super) fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// For logs: the service and the sentinels (no credentials).
    pub(super) fn describe(&self) -> String {
        let e = &self.endpoint;
        let list = e
            .sentinels
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let tls = if e.tls { ", TLS" } else { "" };
        format!(
            "primary of {} via sentinels {list} (db {}{tls})",
            e.service, e.db
        )
    }

    /// A store call failed with `e`: when it may mean that the primary moved, ask again now.
    pub(super) fn failed(&self, e: Option<&RedisError>) {
        let moved = match e {
            None => true, // no answer in time
            Some(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.code() == Some("READONLY")
                    || e.code() == Some("MASTERDOWN")
            }
        };
        if moved {
            self.recheck.notify_one();
        }
    }

    fn client(&self, host: &str, port: u16, with_auth: bool) -> Result<Client, RedisError> {
        let e = &self.endpoint;
        let info = if with_auth {
            node_info(host, port, e.tls, &e.auth, e.db)
        } else {
            bare_info(host, port, e.tls)
        };
        match &self.certs {
            Some(c) => Client::build_with_tls(info, c.clone()),
            None => Client::open(info),
        }
    }

    /// Starts the task; it ends when `stopped` changes (the store was dropped).
    pub(super) fn spawn(self: &Arc<Self>, mut stopped: watch::Receiver<()>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            tokio::select! {
                () = me.run() => {}
                _ = stopped.changed() => {}
            }
        });
    }

    async fn run(&self) {
        // The sentinel that answered last is asked first.
        let mut first = 0usize;
        let mut events: Option<::redis::aio::PubSub> = None;
        let mut last_problem: Option<String> = None;
        let mut conns: Vec<Option<MultiplexedConnection>> =
            vec![None; self.endpoint.sentinels.len()];
        loop {
            // However many calls fail, the sentinels are asked at most every MIN_ASK_INTERVAL.
            let asked = tokio::time::Instant::now();
            match self.ask(&mut first, &mut conns).await {
                Ok(addr) => {
                    let known = self.current().is_some_and(|c| c.addr == addr);
                    if !known {
                        match self.take(addr).await {
                            Ok(()) => last_problem = None,
                            Err(p) => self.problem(&mut last_problem, p),
                        }
                    } else {
                        last_problem = None;
                    }
                }
                Err(p) => self.problem(&mut last_problem, p),
            }
            if events.is_none() {
                events = self.subscribe(first).await;
            }
            let event = async {
                match events.as_mut() {
                    Some(p) => p.on_message().next().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                got = event => {
                    if got.is_none() {
                        events = None; // the sentinel went away: subscribe to another one
                    }
                }
                () = self.recheck.notified() => {}
                () = tokio::time::sleep(RECHECK) => {}
            }
            tokio::time::sleep_until(asked + MIN_ASK_INTERVAL).await;
        }
    }

    /// Logs a problem when it is new (it is repeated at debug level while it lasts).
    fn problem(&self, last: &mut Option<String>, p: String) {
        if last.as_deref() == Some(p.as_str()) {
            tracing::debug!(redis = %self.describe(), "{p}");
        } else {
            tracing::warn!(redis = %self.describe(), "{p}");
            *last = Some(p);
        }
    }

    /// Asks the sentinels, starting with `first`, where the primary is.
    /// `conns` holds a connection per sentinel, kept while it works.
    async fn ask(
        &self,
        first: &mut usize,
        conns: &mut [Option<MultiplexedConnection>],
    ) -> Result<(String, u16), String> {
        let list = &self.endpoint.sentinels;
        let mut why = Vec::new();
        for i in 0..list.len() {
            let n = (*first + i) % list.len();
            let (host, port) = &list[n];
            match self.ask_one(host, *port, &mut conns[n]).await {
                Ok(Some(addr)) => {
                    *first = n;
                    return Ok(addr);
                }
                Ok(None) => why.push(format!(
                    "{host}:{port} does not monitor {:?}",
                    self.endpoint.service
                )),
                Err(e) => why.push(format!("{host}:{port}: {e}")),
            }
        }
        Err(format!("no sentinel names a primary ({})", why.join("; ")))
    }

    async fn ask_one(
        &self,
        host: &str,
        port: u16,
        slot: &mut Option<MultiplexedConnection>,
    ) -> Result<Option<(String, u16)>, String> {
        let kept = slot.take();
        let query = async {
            let mut c = match kept {
                Some(c) => c,
                None => {
                    self.client(host, port, false)?
                        .get_multiplexed_async_connection()
                        .await?
                }
            };
            let answer = ::redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&self.endpoint.service)
                .query_async::<Option<(String, u16)>>(&mut c)
                .await?;
            Ok::<_, RedisError>((answer, c))
        };
        // A connection that failed or hung is dropped; the next round connects again.
        match tokio::time::timeout(CONNECT_TIMEOUT + CALL_TIMEOUT, query).await {
            Ok(Ok((answer, c))) => {
                *slot = Some(c);
                Ok(answer)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer".into()),
        }
    }

    /// Connects to `addr`, checks that it is a primary, and takes it into use.
    async fn take(&self, addr: (String, u16)) -> Result<(), String> {
        let (host, port) = (addr.0.clone(), addr.1);
        let host = host.as_str();
        let client = self
            .client(host, port, true)
            .map_err(|e| format!("primary {host}:{port}: {e}"))?;
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config())
            .map_err(|e| format!("primary {host}:{port}: {e}"))?;
        let mut probe = conn.clone();
        let role = tokio::time::timeout(CONNECT_TIMEOUT + CALL_TIMEOUT, async move {
            ::redis::cmd("ROLE").query_async::<Value>(&mut probe).await
        })
        .await
        .map_err(|_| format!("primary {host}:{port} gives no answer"))?
        .map_err(|e| format!("primary {host}:{port}: {e}"))?;
        let is_primary = match &role {
            Value::Array(parts) => {
                matches!(
                    parts.first(),
                    Some(Value::BulkString(b)) if b.as_slice() == b"master"
                ) || matches!(parts.first(), Some(Value::SimpleString(s)) if s == "master")
            }
            _ => false,
        };
        if !is_primary {
            return Err(format!(
                "the sentinels name {host}:{port} as the primary, but it is not (yet) one"
            ));
        }
        let writes = ConnectionManager::new_lazy_with_config(client.clone(), manager_config())
            .map_err(|e| format!("primary {host}:{port}: {e}"))?;
        let before = self.current.swap(Some(Arc::new(Current {
            addr,
            client,
            conn,
            writes,
        })));
        match before {
            Some(b) => tracing::warn!(
                redis = %self.describe(),
                "Redis failover: the primary moved from {}:{} to {host}:{port}",
                b.addr.0, b.addr.1
            ),
            None => tracing::info!(redis = %self.describe(), "Redis primary at {host}:{port}"),
        }
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// A subscription to `+switch-master` on a sentinel (starting with `first`).
    async fn subscribe(&self, first: usize) -> Option<::redis::aio::PubSub> {
        let list = &self.endpoint.sentinels;
        for i in 0..list.len() {
            let (host, port) = &list[(first + i) % list.len()];
            let Ok(client) = self.client(host, *port, false) else {
                continue;
            };
            let connect = async {
                let mut p = client.get_async_pubsub().await?;
                p.subscribe("+switch-master").await?;
                Ok::<_, RedisError>(p)
            };
            if let Ok(Ok(p)) = tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                return Some(p);
            }
        }
        None
    }
}
