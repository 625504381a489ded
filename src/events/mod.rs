//! Events: signed webhooks fed from the store's durable outbox ([`crate::keys::outbox`]), the
//! `key.expiring` check, and leaked-key reports ([`leaks`]).
//!
//! # Delivery
//! One loop per process claims due deliveries from the outbox with a lease (so with several
//! instances on one store each delivery is made by one of them), sends each as an HTTP POST
//! signed per Standard Webhooks ([`signing`]) and records the outcome. A 2xx answer delivers;
//! anything else (another status, a connection error, a timeout) is retried after
//! `retry_base × 2^(attempts-1)`, at most `retry_max`, until `give_up_after` has passed since the
//! event happened (the last attempt is made then); then the delivery is marked failed. A webhook gets the events of one key (or
//! client) in the order they happened: the next one waits until the one before is delivered or
//! given up. A process killed mid-delivery loses nothing: the delivery is made again, with the
//! same `webhook-id`, once its lease has ended (at once on restart for the embedded store).
//!
//! At most `CLAIM_BATCH` (64) attempts are under way, at most `PER_WEBHOOK` (16) of them to one
//! webhook. A round waits `ROUND_WAIT` (1 s) at most for its own attempts before the next claim;
//! the slower ones go on and keep their share taken, so an endpoint that hangs holds its own
//! deliveries until `request_timeout`, not the other webhooks'.

pub mod leaks;
pub mod signing;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::config::events::{EventsConfig, WebhookConfig};
use crate::keys::now_millis;
use crate::keys::outbox::{Claimed, NewEvent, Outbox, Outcome, Subscription, Webhook};
use crate::keys::store::StoreResult;
use crate::telemetry::metrics::Metrics;

/// Attempts under way at most, across rounds.
const CLAIM_BATCH: usize = 64;
/// Attempts under way to one webhook at most: an endpoint that holds its attempts (until
/// `request_timeout`) holds this share, not the other webhooks' deliveries.
const PER_WEBHOOK: usize = 16;
/// How long a round waits for its attempts before it claims again; those still under way go on
/// and keep their webhook's share taken until they end.
const ROUND_WAIT: Duration = Duration::from_secs(1);
/// How often the pending gauge is read from the store when nothing is being delivered.
const GAUGE_EVERY: Duration = Duration::from_secs(5);
/// Longest error text kept with an attempt.
const MAX_ERROR_LEN: usize = 200;

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The webhooks of this process and the loop that delivers to them.
pub struct Events {
    outbox: Arc<dyn Outbox>,
    configured: Vec<Webhook>,
    settings: EventsConfig,
    metrics: Arc<Metrics>,
    client: HttpClient,
    wake: Notify,
    /// When the pending gauge was last read (ms).
    gauge_read: std::sync::atomic::AtomicI64,
}

/// The id of a webhook from the configuration file: stable across restarts (so its pending
/// deliveries still find it) as long as its `url` and `events` stay the same.
pub fn configured_id(w: &WebhookConfig) -> String {
    let mut h = Sha256::new();
    h.update(w.url.as_bytes());
    h.update(b"\n");
    h.update(w.events.join(",").as_bytes());
    format!("wh_cfg_{}", &hex::encode(h.finalize())[..16])
}

impl Events {
    pub fn new(
        outbox: Arc<dyn Outbox>,
        webhooks: &[WebhookConfig],
        settings: EventsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(settings.request_timeout));
        http.enforce_http(false);
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(crate::tls::client_config(settings.ca_file.as_deref())?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        let configured = webhooks
            .iter()
            .map(|w| Webhook {
                id: configured_id(w),
                url: w.url.clone(),
                events: w.events.clone(),
                secret: w.secret.clone(),
                created_at: 0,
                previous_secret: w.previous_secret.clone(),
                previous_until: None,
            })
            .collect();
        Ok(Arc::new(Self {
            outbox,
            configured,
            settings,
            metrics,
            client,
            wake: Notify::new(),
            gauge_read: std::sync::atomic::AtomicI64::new(0),
        }))
    }

    pub fn outbox(&self) -> &Arc<dyn Outbox> {
        &self.outbox
    }

    /// The webhooks of the configuration file (not managed through the admin API).
    pub fn configured(&self) -> &[Webhook] {
        &self.configured
    }

    /// Writes events no other write causes and starts delivering them at once.
    pub async fn emit(&self, events: &[NewEvent]) -> StoreResult<()> {
        self.outbox.emit(events).await?;
        self.wake();
        Ok(())
    }

    /// Looks at the outbox now rather than at the next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Every webhook: the configured ones, then those of the store.
    pub async fn webhooks(&self) -> StoreResult<Vec<Webhook>> {
        let mut all = self.configured.clone();
        all.extend(self.outbox.list_webhooks().await?);
        Ok(all)
    }

    /// Starts the delivery loop and the expiry check; both run until aborted.
    pub fn spawn(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let deliver = {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                let mut under_way = UnderWay::default();
                loop {
                    under_way.reap();
                    let claimed = match this.round(&mut under_way).await {
                        Ok(n) => n,
                        Err(e) => {
                            tracing::warn!(error = %e, "webhook outbox unavailable; retrying");
                            0
                        }
                    };
                    if claimed > 0 {
                        // This round's attempts, for a while; then the next claim at once (more
                        // may be due: a key's next event, a backlog).
                        let until = tokio::time::Instant::now() + ROUND_WAIT;
                        while under_way.this_round > 0
                            && tokio::time::timeout_at(until, under_way.join_next())
                                .await
                                .is_ok()
                        {}
                        continue;
                    }
                    // Nothing claimed: the next poll, a wake, or the end of an attempt still
                    // under way (it may make the next delivery of its key due).
                    tokio::select! {
                        _ = tokio::time::sleep(this.settings.poll_interval) => {}
                        _ = this.wake.notified() => {}
                        _ = under_way.join_next(), if !under_way.is_empty() => {}
                    }
                }
            })
        };
        let expiry = {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(this.settings.expiry_check_interval);
                loop {
                    tick.tick().await;
                    match this.outbox.emit_expiring(now_millis()).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(events = n, "key.expiring events written");
                            this.wake();
                        }
                        Err(e) => tracing::warn!(error = %e, "expiry check failed; retrying"),
                    }
                }
            })
        };
        vec![deliver, expiry]
    }

    /// One claim of what `under_way` has room for, its attempts started there; returns how
    /// many deliveries were claimed.
    async fn round(self: &Arc<Self>, under_way: &mut UnderWay) -> StoreResult<usize> {
        let hooks = Arc::new(self.webhooks().await?);
        // The configured webhooks come first (`webhooks`).
        let configured = self.configured.len();
        let subs: Vec<Subscription> = hooks
            .iter()
            .enumerate()
            .map(|(i, h)| Subscription {
                webhook_id: h.id.clone(),
                events: h.events.clone(),
                room: under_way.room_of(&h.id),
                stored: i >= configured,
            })
            .collect();
        let lease = (self.settings.request_timeout * 2 + Duration::from_secs(1)).as_millis() as i64;
        let claimed = self
            .outbox
            .claim(&subs, now_millis(), lease, under_way.room())
            .await?;
        let n = claimed.len();
        under_way.next_round();
        for c in claimed {
            let this = Arc::clone(self);
            let hooks = Arc::clone(&hooks);
            let webhook = c.webhook_id.clone();
            under_way.spawn(webhook, async move {
                let outcome = match hooks.iter().find(|h| h.id == c.webhook_id) {
                    Some(h) => this.attempt(h, &c).await,
                    None => Outcome::Failed {
                        status: None,
                        error: Some("the webhook no longer exists".into()),
                    },
                };
                match &outcome {
                    Outcome::Delivered { .. } => this.metrics.webhook_delivered.inc(),
                    Outcome::Retry { status, error, .. } => {
                        this.metrics.webhook_attempt_errors.inc();
                        tracing::warn!(webhook = %c.webhook_id, event = %c.event_id,
                            status = ?status, error = ?error, "webhook delivery failed; will retry");
                    }
                    Outcome::Failed { status, error } => {
                        this.metrics.webhook_failed.inc();
                        tracing::error!(webhook = %c.webhook_id, event = %c.event_id,
                            status = ?status, error = ?error, "webhook delivery given up");
                    }
                }
                if let Err(e) = this.outbox.complete(&c, &outcome, now_millis()).await {
                    // The lease ends and the delivery is made again: at least once.
                    tracing::warn!(error = %e, event = %c.event_id, "cannot record a webhook delivery");
                }
            });
        }
        let now = now_millis();
        let last = self.gauge_read.load(std::sync::atomic::Ordering::Relaxed);
        if n > 0 || now - last >= GAUGE_EVERY.as_millis() as i64 {
            self.gauge_read
                .store(now, std::sync::atomic::Ordering::Relaxed);
            if let Ok(pending) = self.outbox.pending().await {
                self.metrics.webhook_pending.set(pending as i64);
            }
        }
        Ok(n)
    }

    /// One signed POST of `c` to `hook`.
    async fn attempt(&self, hook: &Webhook, c: &Claimed) -> Outcome {
        let now = now_millis();
        let keys = std::iter::once(hook.secret.as_str())
            .chain(hook.previous_at(now))
            .map(signing::decode_secret)
            .collect::<Result<Vec<_>, _>>();
        let Ok(keys) = keys else {
            return Outcome::Failed {
                status: None,
                error: Some("the webhook's secret is not a whsec_ secret".into()),
            };
        };
        let ts = now / 1000;
        let req = http::Request::post(&hook.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "keygate-webhooks")
            .header("webhook-id", &c.event_id)
            .header("webhook-timestamp", ts.to_string())
            .header(
                "webhook-signature",
                signing::signatures(&keys, &c.event_id, ts, &c.body),
            )
            .body(Full::new(Bytes::from(c.body.clone())));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Failed {
                    status: None,
                    error: Some(format!("cannot build the request: {e}")),
                };
            }
        };
        let mut wait = None;
        let (status, error) =
            match tokio::time::timeout(self.settings.request_timeout, self.client.request(req))
                .await
            {
                Ok(Ok(res)) if res.status().is_success() => {
                    return Outcome::Delivered {
                        status: res.status().as_u16(),
                    };
                }
                // The receiver says it is gone for good (Standard Webhooks): no retries.
                Ok(Ok(res)) if res.status() == http::StatusCode::GONE => {
                    return Outcome::Failed {
                        status: Some(410),
                        error: Some("410 Gone: not tried again".to_owned()),
                    };
                }
                Ok(Ok(res)) => {
                    wait = retry_after(res.headers(), std::time::SystemTime::now());
                    (Some(res.status().as_u16()), None)
                }
                Ok(Err(e)) => (None, Some(error_text(&e))),
                Err(_) => (None, Some("timed out".to_owned())),
            };
        self.retry_or_give_up(c, status, error, wait)
    }

    /// The next attempt after the backoff (spread by up to a fifth more, so that deliveries
    /// that failed together are not all tried again in the same instant), or after the
    /// receiver's `Retry-After` (`wait`) when that is later; never past the give-up time.
    fn retry_or_give_up(
        &self,
        c: &Claimed,
        status: Option<u16>,
        error: Option<String>,
        wait: Option<Duration>,
    ) -> Outcome {
        match retry_time(&self.settings, c.created_at, c.attempts, now_millis(), wait) {
            Some(at) => Outcome::Retry { at, status, error },
            None => Outcome::Failed { status, error },
        }
    }
}

/// The attempts under way, across rounds, and how many go to each webhook.
#[derive(Default)]
struct UnderWay {
    tasks: tokio::task::JoinSet<()>,
    /// Each attempt's webhook and round.
    of: HashMap<tokio::task::Id, (String, u64)>,
    per_webhook: HashMap<String, usize>,
    round: u64,
    /// Attempts of the latest round under way.
    this_round: usize,
}

impl UnderWay {
    /// The attempts spawned from now on are the next round's.
    fn next_round(&mut self) {
        self.round += 1;
        self.this_round = 0;
    }

    fn spawn(&mut self, webhook: String, attempt: impl Future<Output = ()> + Send + 'static) {
        *self.per_webhook.entry(webhook.clone()).or_default() += 1;
        let id = self.tasks.spawn(attempt).id();
        self.of.insert(id, (webhook, self.round));
        self.this_round += 1;
    }

    fn ended(&mut self, id: tokio::task::Id) {
        let Some((webhook, round)) = self.of.remove(&id) else {
            return;
        };
        if round == self.round {
            self.this_round -= 1;
        }
        if let Some(n) = self.per_webhook.get_mut(&webhook) {
            *n -= 1;
            if *n == 0 {
                self.per_webhook.remove(&webhook);
            }
        }
    }

    /// Takes note of every attempt that has ended.
    fn reap(&mut self) {
        while let Some(r) = self.tasks.try_join_next_with_id() {
            self.ended(r.map_or_else(|e| e.id(), |(id, ())| id));
        }
    }

    /// Waits for the next attempt to end; false when none is under way.
    async fn join_next(&mut self) -> bool {
        match self.tasks.join_next_with_id().await {
            Some(r) => {
                self.ended(r.map_or_else(|e| e.id(), |(id, ())| id));
                true
            }
            None => false,
        }
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Attempts that may start now.
    fn room(&self) -> usize {
        CLAIM_BATCH.saturating_sub(self.tasks.len())
    }

    /// Attempts to `webhook` that may start now.
    fn room_of(&self, webhook: &str) -> usize {
        PER_WEBHOOK.saturating_sub(self.per_webhook.get(webhook).copied().unwrap_or(0))
    }
}

/// The wait after the attempt that followed `attempts` earlier ones.
/// When a delivery of an event made at `created_at` is tried again after its attempt number
/// `attempts + 1` failed at `now`: after the backoff, or at the give-up time when that comes
/// first (the last try is made then); `None` once that time has come (given up).
fn next_attempt(
    s: &EventsConfig,
    created_at: crate::keys::Millis,
    attempts: u32,
    now: crate::keys::Millis,
) -> Option<crate::keys::Millis> {
    let deadline = created_at.saturating_add(s.give_up_after.as_millis() as i64);
    if now >= deadline {
        return None;
    }
    Some(
        now.saturating_add(backoff(s, attempts).as_millis() as i64)
            .min(deadline),
    )
}

/// When a delivery whose attempt number `attempts + 1` failed at `now` is tried again
/// ([`Events::retry_or_give_up`]); `None`: given up.
fn retry_time(
    s: &EventsConfig,
    created_at: crate::keys::Millis,
    attempts: u32,
    now: crate::keys::Millis,
    wait: Option<Duration>,
) -> Option<crate::keys::Millis> {
    let at = next_attempt(s, created_at, attempts, now)?;
    let deadline = created_at.saturating_add(s.give_up_after.as_millis() as i64);
    let asked = wait.map_or(at, |w| now.saturating_add(w.as_millis() as i64));
    Some(spread(at, now).max(asked).min(deadline))
}

/// `at` (a retry `at - now` from now) put off by a random part of up to a fifth of that wait.
fn spread(at: crate::keys::Millis, now: crate::keys::Millis) -> crate::keys::Millis {
    let most = at.saturating_sub(now).max(0) / 5;
    at.saturating_add(rand::random_range(0..=most))
}

/// A receiver's `Retry-After` (RFC 9110 §10.2.3): seconds, or an HTTP date (any of the three
/// forms a recipient must read) taken as the time from `now`; a past date is no wait. At most a
/// day; anything else is not read.
fn retry_after(h: &http::HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let text = h.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // delay-seconds: digits only; more than fit are more than a day.
        Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        httpdate::parse_http_date(text)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    };
    Some(wait.min(Duration::from_secs(86_400)))
}

pub fn backoff(s: &EventsConfig, attempts: u32) -> Duration {
    let factor = 1u32.checked_shl(attempts.min(30)).unwrap_or(u32::MAX);
    s.retry_base.saturating_mul(factor).min(s.retry_max)
}

fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text.chars().take(MAX_ERROR_LEN).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EventsConfig {
        EventsConfig {
            poll_interval: Duration::from_secs(1),
            retry_base: Duration::from_secs(5),
            retry_max: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(86_400),
            request_timeout: Duration::from_secs(10),
            expiry_check_interval: Duration::from_secs(3600),
            ca_file: None,
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let s = settings();
        assert_eq!(backoff(&s, 0), Duration::from_secs(5));
        assert_eq!(backoff(&s, 1), Duration::from_secs(10));
        assert_eq!(backoff(&s, 3), Duration::from_secs(40));
        assert_eq!(backoff(&s, 20), Duration::from_secs(3600));
        assert_eq!(backoff(&s, 1000), Duration::from_secs(3600));
    }

    /// `Retry-After` in seconds or as an HTTP date in each of its three forms, a past date no
    /// wait, capped at a day; anything else unread.
    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let read = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::RETRY_AFTER, v.parse().unwrap());
            retry_after(&h, now)
        };
        assert_eq!(read("120"), Some(Duration::from_secs(120)));
        assert_eq!(read(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(read("999999999"), Some(Duration::from_secs(86_400)));
        assert_eq!(
            read("99999999999999999999999"),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(
            read("Sun, 06 Nov 1994 08:51:37 GMT"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            read("Sunday, 06-Nov-94 08:50:07 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            read("Sun Nov  6 08:49:47 1994"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(read("Sun, 06 Nov 1994 08:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(
            read("Mon, 07 Nov 1994 08:49:38 GMT"),
            Some(Duration::from_secs(86_400))
        );
        // A wrong weekday, an hour out of range, not a number nor a date.
        for bad in [
            "Wed, 07 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:00:00 GMT",
            "-5",
            "+5",
            "1.5",
            "soon",
            "",
        ] {
            assert_eq!(read(bad), None, "{bad:?}");
        }
        assert_eq!(retry_after(&http::HeaderMap::new(), now), None);
    }

    /// Retries of deliveries that failed together are spread over up to a fifth of their wait
    /// more, never earlier than the backoff.
    #[test]
    fn retries_are_spread_after_the_backoff() {
        let s = settings();
        let t0 = 1_000_000;
        // The second attempt failed at t0: the backoff is 10 s.
        let times: std::collections::BTreeSet<i64> = (0..200)
            .map(|_| retry_time(&s, t0, 1, t0, None).unwrap())
            .collect();
        assert!(
            times
                .iter()
                .all(|&t| (t0 + 10_000..=t0 + 12_000).contains(&t)),
            "{times:?}"
        );
        assert!(times.len() > 50, "{} distinct of 200", times.len());
        // A receiver's Retry-After past the spread wins; the give-up time bounds all.
        let later = retry_time(&s, t0, 1, t0, Some(Duration::from_secs(60))).unwrap();
        assert_eq!(later, t0 + 60_000);
        let day = 86_400_000;
        let last = retry_time(&s, t0, 30, t0 + day - 1_000, Some(Duration::from_secs(600)));
        assert_eq!(last, Some(t0 + day));
        assert_eq!(retry_time(&s, t0, 31, t0 + day, None), None);
    }

    /// Retries go on until the give-up time, the last one made at that time: an attempt that
    /// fails 55 min before it (the next a full hour later) is retried at the give-up time, not
    /// given up at once; one that fails at or after it is given up.
    #[test]
    fn the_last_retry_is_made_at_the_give_up_time() {
        let s = settings();
        let (t0, hour, day) = (1_000_000, 3_600_000, 86_400_000);
        assert_eq!(next_attempt(&s, t0, 0, t0), Some(t0 + 5_000));
        assert_eq!(next_attempt(&s, t0, 30, t0 + hour), Some(t0 + 2 * hour));
        let late = t0 + day - 55 * 60_000;
        assert_eq!(next_attempt(&s, t0, 30, late), Some(t0 + day));
        assert_eq!(next_attempt(&s, t0, 31, t0 + day), None);
        assert_eq!(next_attempt(&s, t0, 31, t0 + day + 1), None);
    }
}
