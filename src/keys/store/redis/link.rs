//! The store's way to its Redis, whatever the endpoint: one server through a reconnecting
//! `ConnectionManager`, the current primary of a Sentinel service ([`Primary`]), or a cluster
//! through redis-rs' cluster connection (which follows `MOVED` and `ASK`). [`Conn`] is what a
//! single call uses; it is cheap to clone (a handle).

use std::sync::Arc;

use ::redis::aio::{ConnectionLike, ConnectionManager};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::watch;

use super::sentinel::Primary;

// One per store, made once and kept behind an `Arc`: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Link {
    Single {
        client: Client,
        conn: ConnectionManager,
        /// For writes that wait for replicas (`WAIT`), which holds up every later call on its
        /// connection: lookups do not queue behind them. Connects on its first use.
        writes: ConnectionManager,
    },
    Sentinel(Arc<Primary>),
    Cluster {
        conn: ClusterConnection,
        /// One client per configured node, for the invalidation subscription (a message
        /// published on any node of a cluster reaches the subscribers of every node).
        nodes: Vec<Client>,
    },
}

/// A connection for one call.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    /// Sentinel, while no primary is known: every call fails at once.
    NoPrimary,
}

impl Link {
    pub(super) fn conn(&self) -> Conn {
        self.connection(false)
    }

    /// A connection for a write followed by `WAIT`: not the one lookups use (a cluster has
    /// no `WAIT` writes).
    pub(super) fn write_conn(&self) -> Conn {
        self.connection(true)
    }

    /// The server's lookup connection, or its connection for writes that wait for replicas.
    fn connection(&self, waits: bool) -> Conn {
        let pick = |conn: &ConnectionManager, writes: &ConnectionManager| {
            Conn::Single(if waits { writes } else { conn }.clone())
        };
        match self {
            Link::Single { conn, writes, .. } => pick(conn, writes),
            Link::Sentinel(p) => p
                .current()
                .map_or(Conn::NoPrimary, |c| pick(&c.conn, &c.writes)),
            Link::Cluster { conn, .. } => Conn::Cluster(conn.clone()),
        }
    }

    /// Where to subscribe to invalidations on the `attempt`-th try; `None` while a Sentinel
    /// service has no known primary.
    pub(super) fn pubsub_client(&self, attempt: usize) -> Option<Client> {
        match self {
            Link::Single { client, .. } => Some(client.clone()),
            Link::Sentinel(p) => p.current().map(|c| c.client.clone()),
            Link::Cluster { nodes, .. } => nodes.get(attempt % nodes.len().max(1)).cloned(),
        }
    }

    /// Changes when the subscription must move to another server (a Sentinel failover).
    pub(super) fn generation(&self) -> Option<watch::Receiver<u64>> {
        match self {
            Link::Sentinel(p) => Some(p.generation()),
            _ => None,
        }
    }

    /// The command that tells whether the store answers: `PING`, or on a cluster a read of a
    /// key under `prefix`, which goes to the node of keygate's slot (a cluster `PING` would
    /// ask every node).
    pub(super) fn probe(&self, prefix: &str) -> Cmd {
        match self {
            Link::Cluster { .. } => {
                let mut c = ::redis::cmd("EXISTS");
                c.arg(format!("{prefix}keys"));
                c
            }
            _ => ::redis::cmd("PING"),
        }
    }

    /// A call failed with `e` (`None`: no answer in time).
    pub(super) fn failed(&self, e: Option<&RedisError>) {
        if let Link::Sentinel(p) = self {
            p.failed(e);
        }
    }
}

fn no_primary() -> RedisError {
    RedisError::from((
        ErrorKind::Io,
        "no primary",
        "the sentinels name no reachable primary (yet)".to_owned(),
    ))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::NoPrimary => Box::pin(async { Err(no_primary()) }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::NoPrimary => Box::pin(async { Err(no_primary()) }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::NoPrimary => 0,
        }
    }
}
