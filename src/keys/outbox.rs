//! The event outbox: what happened to clients and keys, written by the store in the same
//! atomic step as the change that caused it, and the webhooks it is delivered to.
//!
//! An event's body is fixed when it is written (Standard Webhooks shape:
//! `{"type", "timestamp", "data"}`), so every attempt to deliver it sends the same bytes under
//! the same `webhook-id`. Bodies carry ids and metadata only: never a key, a key hash or a
//! token. Delivery state (which webhook got which event, attempts, the next attempt, leases)
//! lives in the store too, so a process killed at any moment loses nothing.

use async_trait::async_trait;
use serde_json::{Value, json};
use uuid::Uuid;

use super::store::StoreResult;
use super::{ApiKey, Client, Millis};

/// The event types, by their wire names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    KeyCreated,
    KeyUpdated,
    KeyRotated,
    /// Disabled or deleted (`data.reason`).
    KeyRevoked,
    /// 7 days and 1 day before `expires_at` (`data.days`).
    KeyExpiring,
    /// Reported as leaked (`data.url`, `data.action`).
    KeyLeaked,
    ClientCreated,
    ClientDeleted,
    /// 80 % or 100 % of a quota or of credits used (once per period).
    QuotaThreshold,
}

impl EventType {
    pub const ALL: [EventType; 9] = [
        EventType::KeyCreated,
        EventType::KeyUpdated,
        EventType::KeyRotated,
        EventType::KeyRevoked,
        EventType::KeyExpiring,
        EventType::KeyLeaked,
        EventType::ClientCreated,
        EventType::ClientDeleted,
        EventType::QuotaThreshold,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::KeyCreated => "key.created",
            EventType::KeyUpdated => "key.updated",
            EventType::KeyRotated => "key.rotated",
            EventType::KeyRevoked => "key.revoked",
            EventType::KeyExpiring => "key.expiring",
            EventType::KeyLeaked => "key.leaked",
            EventType::ClientCreated => "client.created",
            EventType::ClientDeleted => "client.deleted",
            EventType::QuotaThreshold => "quota.threshold",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// An event about to be written to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The `webhook-id` of every delivery of this event (`msg_` + a UUIDv7).
    pub id: String,
    pub kind: EventType,
    /// Events with the same ordering key reach each webhook in the order they were written
    /// (a key's id for key events, the client id for client events).
    pub ordering_key: String,
    pub at: Millis,
    /// The body, as it will be sent.
    pub body: String,
}

impl NewEvent {
    pub fn new(kind: EventType, ordering_key: impl Into<String>, at: Millis, data: Value) -> Self {
        let timestamp = chrono::DateTime::from_timestamp_millis(at)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let body = json!({"type": kind.as_str(), "timestamp": timestamp, "data": data});
        Self {
            id: format!("msg_{}", Uuid::now_v7().simple()),
            kind,
            ordering_key: ordering_key.into(),
            at,
            body: body.to_string(),
        }
    }

    /// An event about a key: its ids and attributes, never its secret or hash, plus `extra`
    /// members.
    pub fn key(kind: EventType, key: &ApiKey, at: Millis, extra: Value) -> Self {
        let mut data = key_data(key);
        if let (Value::Object(d), Value::Object(e)) = (&mut data, extra) {
            d.extend(e);
        }
        Self::new(kind, key.id.to_string(), at, data)
    }

    /// An event about a client.
    pub fn client(kind: EventType, client: &Client, at: Millis, extra: Value) -> Self {
        let mut data = json!({
            "client_id": client.client_id,
            "license": client.license,
            "created_at": rfc3339(client.created_at),
            "metadata": client.metadata,
        });
        if let (Value::Object(d), Value::Object(e)) = (&mut data, extra) {
            d.extend(e);
        }
        Self::new(kind, client.client_id.clone(), at, data)
    }

    /// `quota.threshold`: `percent` (80 or 100) of a quota or of credits of `key` used in the
    /// period starting at `period_start`, written through [`Outbox::emit`]. Charges write their
    /// own in the charge's transaction ([`crate::keys::threshold::Crossing::event`]).
    pub fn quota_threshold(
        key: &ApiKey,
        at: Millis,
        what: &str,
        percent: u8,
        limit: u64,
        used: u64,
        period_start: Option<Millis>,
    ) -> Self {
        Self::key(
            EventType::QuotaThreshold,
            key,
            at,
            json!({
                "key_id": key.id.to_string(),
                "limit_kind": what,
                "percent": percent,
                "limit": limit,
                "used": used,
                "period_start": period_start.map(rfc3339),
            }),
        )
    }
}

fn rfc3339(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The attributes of a key an event shows: what the admin API lists, no secret, no hash.
pub fn key_data(k: &ApiKey) -> Value {
    json!({
        "id": k.id.to_string(),
        "client_id": k.client_id,
        "name": k.name,
        "prefix": k.prefix,
        "permissions": k.permissions,
        "enabled": k.enabled,
        "created_at": rfc3339(k.created_at),
        "updated_at": rfc3339(k.updated_at),
        "expires_at": k.expires_at.map(rfc3339),
        "metadata": k.metadata,
    })
}

/// The events of a key patch: `key.updated`, `key.revoked` when it disabled an enabled key,
/// and `key.leaked` when it acted on a leak report ([`crate::keys::store::KeyPatch::leak`]).
pub fn patch_events(
    before: &ApiKey,
    after: &ApiKey,
    at: Millis,
    leak: Option<&Value>,
) -> Vec<NewEvent> {
    let mut out = vec![NewEvent::key(EventType::KeyUpdated, after, at, json!({}))];
    let disabled = before.enabled && !after.enabled;
    if disabled {
        out.push(revoked(after, "disabled", at));
    }
    if let Some(report) = leak {
        let mut data = report.clone();
        if let Value::Object(m) = &mut data {
            let action = match (disabled, before.enabled) {
                (true, _) => "revoked",
                (false, false) => "already_disabled",
                (false, true) => "notified",
            };
            m.insert("action".into(), action.into());
        }
        out.push(NewEvent::key(EventType::KeyLeaked, after, at, data));
    }
    out
}

/// `key.revoked` with its reason (`disabled`, `deleted`).
pub fn revoked(key: &ApiKey, reason: &str, at: Millis) -> NewEvent {
    NewEvent::key(EventType::KeyRevoked, key, at, json!({"reason": reason}))
}

/// Days before `expires_at` at which `key.expiring` is sent, widest first.
pub const EXPIRING_DAYS: [i64; 2] = [7, 1];
pub const DAY_MS: i64 = 86_400_000;

/// Which notice (days) is due for a key expiring at `expires_at` seen at `now`: the narrowest
/// window of [`EXPIRING_DAYS`] it is in, `None` outside them or once expired.
pub fn expiring_window(expires_at: Millis, now: Millis) -> Option<i64> {
    let left = expires_at - now;
    if left <= 0 {
        return None;
    }
    EXPIRING_DAYS
        .iter()
        .rev()
        .copied()
        .find(|d| left <= d * DAY_MS)
}

/// A webhook: where events go and the secret they are signed with.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    /// Event type names, or `["*"]` for every type.
    pub events: Vec<String>,
    /// `whsec_` + base64 of the signing key.
    pub secret: String,
    pub created_at: Millis,
    /// The secret before the last rotation, signed with beside `secret` until
    /// `previous_until` (no end: a configured `previous_secret`, for as long as it is there).
    pub previous_secret: Option<String>,
    pub previous_until: Option<Millis>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &"***")
            .field("previous_until", &self.previous_until)
            .finish()
    }
}

impl Webhook {
    /// The secret before the last rotation while it still signs at `now`.
    pub fn previous_at(&self, now: Millis) -> Option<&str> {
        let secret = self.previous_secret.as_deref()?;
        self.previous_until
            .is_none_or(|until| now < until)
            .then_some(secret)
    }

    pub fn wants(&self, kind: &str) -> bool {
        self.events.iter().any(|e| e == "*" || e == kind)
    }
}

/// Which webhook takes which event types, for the fan-out of new events, and how many of its
/// deliveries a claim may hand out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub webhook_id: String,
    pub events: Vec<String>,
    /// Deliveries of this webhook a claim may hand out now (0: its events are fanned out and
    /// none is claimed), so an endpoint that holds its attempts holds only its own share.
    pub room: usize,
    /// Made through the admin API and kept by the store (not configured): the fan-out takes
    /// the store's webhooks as the store has them when it runs (one made, changed or deleted
    /// since the caller read its list included), and only `room` from here.
    pub stored: bool,
}

impl Subscription {
    pub fn wants(&self, kind: &str) -> bool {
        self.events.iter().any(|e| e == "*" || e == kind)
    }
}

/// A delivery claimed by this instance until its lease ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The store's id of the delivery (one event to one webhook).
    pub delivery: String,
    pub webhook_id: String,
    pub event_id: String,
    pub event_type: String,
    pub body: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// When the event was written.
    pub created_at: Millis,
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        status: u16,
    },
    /// Tried again at `at`.
    Retry {
        at: Millis,
        status: Option<u16>,
        error: Option<String>,
    },
    /// Given up (retried for too long, or the webhook is gone).
    Failed {
        status: Option<u16>,
        error: Option<String>,
    },
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Retry { .. } => "retrying",
            Outcome::Failed { .. } => "failed",
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Delivered { status } => Some(*status),
            Outcome::Retry { status, .. } | Outcome::Failed { status, .. } => *status,
        }
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Delivered { .. } => None,
            Outcome::Retry { error, .. } | Outcome::Failed { error, .. } => error.as_deref(),
        }
    }
}

/// One recorded attempt, as `GET /v1/webhooks/{id}/deliveries` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub event_id: String,
    pub event_type: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub at: Millis,
    pub status: Option<u16>,
    pub error: Option<String>,
    /// `delivered`, `retrying` or `failed`.
    pub outcome: String,
}

/// Due deliveries a claim looks at, at most, to find those it hands out (the rest wait for the
/// next claim).
pub const CLAIM_SCAN: usize = 1_000;

/// How long a delivery to a webhook the claiming instance does not know (one made since its
/// list was read, one of another instance's configuration during a rolling deploy, or one
/// removed from the configuration) is left to an instance that knows it: a claim hands it out,
/// to be given up, only once its event is this old (the default `give_up_after`).
pub const ORPHAN_AFTER_MS: Millis = 86_400_000;

/// The outbox and the webhooks of a store.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Writes events that no other write causes (`key.leaked`, `quota.threshold`).
    async fn emit(&self, events: &[NewEvent]) -> StoreResult<()>;

    /// Writes `key.expiring` for every enabled key whose expiry is within a window of
    /// [`EXPIRING_DAYS`] at `now` and whose notice for that window and expiry was not written
    /// yet (a notice and its event in one atomic step). Returns how many were written.
    async fn emit_expiring(&self, now: Millis) -> StoreResult<usize>;

    /// Fans events written since the last call out to the configured `subscriptions` and to
    /// the store's webhooks as they are at that moment (one delivery per event and webhook
    /// that wants it), then claims up to `limit` deliveries that are due at `now`,
    /// each the oldest undelivered one of its webhook and ordering key, at most
    /// [`Subscription::room`] of each webhook (a webhook not among `subscriptions` has no such
    /// bound, and its deliveries are handed out only once their event is [`ORPHAN_AFTER_MS`]
    /// old), until `now + lease_ms`: no other
    /// caller gets them before then. Oldest first, looking at [`CLAIM_SCAN`] due deliveries at
    /// most (the embedded store skips webhooks without room in its query; Redis counts their
    /// queues among those it looks at).
    async fn claim(
        &self,
        subscriptions: &[Subscription],
        now: Millis,
        lease_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<Claimed>>;

    /// Records an attempt's outcome and releases the lease.
    async fn complete(&self, claimed: &Claimed, outcome: &Outcome, now: Millis) -> StoreResult<()>;

    /// Deliveries not yet delivered or given up.
    async fn pending(&self) -> StoreResult<u64>;

    /// Writes `webhook` unless the store holds `max` webhooks already (then `false`, nothing
    /// written), in one atomic step: webhooks created at once never pass `max`.
    async fn insert_webhook(&self, webhook: &Webhook, max: usize) -> StoreResult<bool>;

    async fn list_webhooks(&self) -> StoreResult<Vec<Webhook>>;

    /// Sets a webhook's `url` and/or `events` (`None`: unchanged). Deliveries already fanned out
    /// stay (and go to the new URL); later events are fanned out by the new list. `None` when
    /// there is no such webhook.
    async fn update_webhook(
        &self,
        id: &str,
        url: Option<&str>,
        events: Option<&[String]>,
    ) -> StoreResult<Option<Webhook>>;

    /// Replaces a webhook's signing secret with `secret`. With `previous_until`, the secret
    /// it replaces goes on signing beside it until then (deliveries carry both signatures);
    /// without, it stops at once (and an earlier previous one with it). `None` when there is
    /// no such webhook.
    async fn rotate_webhook_secret(
        &self,
        id: &str,
        secret: &str,
        previous_until: Option<Millis>,
    ) -> StoreResult<Option<Webhook>>;

    /// Deletes a webhook; its pending deliveries are dropped.
    async fn delete_webhook(&self, id: &str) -> StoreResult<Option<Webhook>>;

    /// The most recent attempts to deliver to a webhook, newest first.
    async fn attempts(&self, webhook_id: &str, limit: u32) -> StoreResult<Vec<Attempt>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiring_windows_pick_the_narrowest() {
        let now = 1_000_000_000;
        assert_eq!(expiring_window(now + 8 * DAY_MS, now), None);
        assert_eq!(expiring_window(now + 7 * DAY_MS, now), Some(7));
        assert_eq!(expiring_window(now + 2 * DAY_MS, now), Some(7));
        assert_eq!(expiring_window(now + DAY_MS, now), Some(1));
        assert_eq!(expiring_window(now + 1, now), Some(1));
        assert_eq!(expiring_window(now, now), None);
    }

    #[test]
    fn key_events_carry_no_secret_or_hash() {
        let (k, secret) = ApiKey::builder().build();
        let e = NewEvent::key(EventType::KeyCreated, &k, 0, json!({"x": 1}));
        assert!(!e.body.contains(secret.plaintext.expose()));
        assert!(!e.body.contains(&hex::encode(k.key_hash.0)));
        let v: Value = serde_json::from_str(&e.body).unwrap();
        assert_eq!(v["type"], "key.created");
        assert_eq!(v["data"]["id"], k.id.to_string());
        assert_eq!(v["data"]["x"], 1);
        assert!(e.id.starts_with("msg_"));
    }
}
