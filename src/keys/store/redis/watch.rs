//! The invalidation subscription: one task per store that listens on the `invalidate` channel,
//! hands every message to the local cache, and after each (re)subscription invalidates the whole
//! cache (messages may have been missed while it was down).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use ::redis::{RedisError, Value};
use futures_util::StreamExt;
use uuid::Uuid;

use super::codec::parse_hash;
use super::link::Link;
use super::{CALL_TIMEOUT, CONNECT_TIMEOUT, tls_cause};
use crate::keys::cache::{Invalidation, InvalidationSink};
use crate::keys::{Millis, now_millis};

/// How often the subscription connection is pinged to detect a silently dead connection.
const SUBSCRIPTION_PING: Duration = Duration::from_secs(5);
/// Reconnection backoff of the subscription: doubles from the first value up to the second.
const RESUBSCRIBE_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(50), Duration::from_secs(1));

/// How often a subscription that keeps failing on TLS logs its error again.
const TLS_ERROR_EVERY: Duration = Duration::from_secs(10);

/// No subscription was asked for (a store used alone).
pub(super) const SUB_NONE: u8 = 0;
/// Subscribed, and the local cache was cleared after subscribing.
pub(super) const SUB_UP: u8 = 1;
/// Asked for, but not (yet, or no longer) subscribed: invalidations may be missed.
pub(super) const SUB_DOWN: u8 = 2;

/// The subscription task: delivers invalidations published by every instance to `sink`.
pub(super) struct Watcher {
    /// The store's way to Redis: where to subscribe, and its command connection (to know when
    /// Redis answers again).
    pub(super) link: Arc<Link>,
    pub(super) channel: String,
    /// The store's key prefix (for [`Link::probe`]).
    pub(super) prefix: String,
    /// Where Redis is, for logs (no credentials).
    pub(super) target: String,
    pub(super) sink: Arc<dyn InvalidationSink>,
    /// The store's view of the subscription (`SUB_*`), read by its readiness check.
    pub(super) state: Arc<AtomicU8>,
}

/// Why a subscription attempt failed; `tls` when TLS is the cause (`text` is then that cause).
struct Failed {
    text: String,
    tls: bool,
}

/// An invalidation message as published by the write scripts.
#[derive(serde::Deserialize)]
struct Message {
    t: Millis,
    ids: Vec<String>,
    hashes: Vec<String>,
}

/// Decodes a message; `None` when it is malformed.
pub fn decode_invalidation(payload: &[u8]) -> Option<(Invalidation, Millis)> {
    let m: Message = serde_json::from_slice(payload).ok()?;
    let key_ids = m
        .ids
        .iter()
        .map(|s| Uuid::parse_str(s).ok())
        .collect::<Option<Vec<_>>>()?;
    let hashes = m
        .hashes
        .iter()
        .map(|s| parse_hash(s))
        .collect::<Option<Vec<_>>>()?;
    Some((
        Invalidation {
            key_ids,
            hashes,
            published_at: Some(m.t),
        },
        m.t,
    ))
}

impl Watcher {
    /// Starts the subscription task; it ends when `stopped` changes (the store was dropped).
    pub(super) fn spawn(self, mut stopped: tokio::sync::watch::Receiver<()>) {
        self.state.store(SUB_DOWN, Ordering::Release);
        tokio::spawn(async move {
            tokio::select! {
                () = self.run() => {}
                _ = stopped.changed() => {}
            }
        });
    }

    async fn run(self) {
        let mut backoff = RESUBSCRIBE_BACKOFF.0;
        let mut was_down = false;
        let mut last_tls_error = None;
        let mut attempt = 0usize;
        loop {
            // Taken before the primary to subscribe to is chosen: a Sentinel switch while
            // subscribing, or while listening, ends the subscription at once.
            let mut moved = self.link.generation();
            match self.subscribe(attempt).await {
                Ok(pubsub) => {
                    last_tls_error = None;
                    if was_down {
                        tracing::info!(redis = %self.target, "invalidation subscription restored");
                    }
                    was_down = false;
                    backoff = RESUBSCRIBE_BACKOFF.0;
                    self.resync().await;
                    self.state.store(SUB_UP, Ordering::Release);
                    let why = self.listen(pubsub, &mut moved).await;
                    self.state.store(SUB_DOWN, Ordering::Release);
                    tracing::warn!(
                        redis = %self.target,
                        "invalidation subscription lost ({why}); reconnecting, then every cached key is revalidated"
                    );
                }
                Err(Failed { text, tls }) => {
                    if tls {
                        // A certificate that does not verify needs a person: said as an error,
                        // again every TLS_ERROR_EVERY while it lasts.
                        if last_tls_error.is_none_or(|t: Instant| t.elapsed() >= TLS_ERROR_EVERY) {
                            tracing::error!(redis = %self.target, "cannot subscribe to invalidations: TLS: {text}; retrying");
                            last_tls_error = Some(Instant::now());
                        }
                    } else if was_down {
                        tracing::debug!(redis = %self.target, "cannot subscribe to invalidations: {text}");
                    } else {
                        tracing::warn!(redis = %self.target, "cannot subscribe to invalidations: {text}; retrying");
                    }
                    was_down = true;
                    attempt = attempt.wrapping_add(1);
                }
            }
            // A new Sentinel primary is tried at once rather than after the backoff.
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = async {
                    match moved.as_mut() {
                        Some(g) => { let _ = g.changed().await; }
                        None => std::future::pending().await,
                    }
                } => { backoff = RESUBSCRIBE_BACKOFF.0; }
            }
            backoff = (backoff * 2).min(RESUBSCRIBE_BACKOFF.1);
        }
    }

    async fn subscribe(&self, attempt: usize) -> Result<::redis::aio::PubSub, Failed> {
        let Some(client) = self.link.pubsub_client(attempt) else {
            return Err(Failed {
                text: "no primary known yet".into(),
                tls: false,
            });
        };
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, RedisError>(pubsub)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(match tls_cause(&e) {
                Some(cause) => Failed {
                    text: cause,
                    tls: true,
                },
                None => Failed {
                    text: e.to_string(),
                    tls: false,
                },
            }),
            Err(_) => Err(Failed {
                text: format!("no answer within {} ms", CONNECT_TIMEOUT.as_millis()),
                tls: false,
            }),
        }
    }

    /// After (re)subscribing: anything published while the subscription was down was missed,
    /// so the whole cache is invalidated (every cached key is asked of the store again on its
    /// next use). Waits until the store answers first (on a cluster, the node of keygate's
    /// slot, which may be down while the subscription moved to another node): while it does
    /// not, nothing can be written, and revalidating would only fail.
    async fn resync(&self) {
        loop {
            let mut conn = self.link.conn();
            let probe = self.link.probe(&self.prefix);
            let ping = async move { probe.query_async::<Value>(&mut conn).await };
            if matches!(tokio::time::timeout(CALL_TIMEOUT, ping).await, Ok(Ok(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.sink.invalidate_all();
    }

    /// Delivers messages until the connection breaks or `moved` (the Sentinel primary's
    /// generation as it was before the subscription's primary was chosen) changes; returns
    /// why it ended.
    async fn listen(
        &self,
        pubsub: ::redis::aio::PubSub,
        moved: &mut Option<tokio::sync::watch::Receiver<u64>>,
    ) -> String {
        let (mut sink, mut stream) = pubsub.split();
        let mut tick = tokio::time::interval(SUBSCRIPTION_PING);
        tick.tick().await;
        let primary_moved = async {
            match moved.as_mut() {
                Some(g) => {
                    // Ends when another primary is taken into use (or the store is gone).
                    let _ = g.changed().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(primary_moved);
        loop {
            tokio::select! {
                () = &mut primary_moved => {
                    return "the Redis primary changed".into();
                }
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return "connection closed".into();
                    };
                    self.deliver(msg.get_payload_bytes());
                }
                _ = tick.tick() => {
                    match tokio::time::timeout(CALL_TIMEOUT, sink.ping::<Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return e.to_string(),
                        Err(_) => return "no answer to a ping".into(),
                    }
                }
            }
        }
    }

    fn deliver(&self, payload: &[u8]) {
        match decode_invalidation(payload) {
            Some((inv, t)) => {
                tracing::debug!(
                    keys = inv.key_ids.len(),
                    hashes = inv.hashes.len(),
                    lag_ms = now_millis() - t,
                    "invalidation received"
                );
                self.sink.invalidate(&inv);
            }
            None => {
                tracing::warn!("malformed invalidation message; clearing the key cache");
                self.sink.invalidate_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyHash;

    #[test]
    fn invalidation_messages() {
        let id = Uuid::now_v7();
        let h = KeyHash::of("x");
        let msg = format!(
            r#"{{"t":1763899146123,"ids":["{id}"],"hashes":["{}"]}}"#,
            hex::encode(h.0)
        );
        let (inv, t) = decode_invalidation(msg.as_bytes()).unwrap();
        assert_eq!(t, 1763899146123);
        assert_eq!(inv.key_ids, vec![id]);
        assert_eq!(inv.hashes, vec![h]);
        assert!(decode_invalidation(br#"{"t":1,"ids":[],"hashes":[]}"#).is_some());
        assert!(decode_invalidation(br#"{"t":1,"ids":["nope"],"hashes":[]}"#).is_none());
        assert!(decode_invalidation(b"garbage").is_none());
    }
}
