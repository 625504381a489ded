//! The outbox of the Redis store. The write scripts append each event to the stream `P events`
//! in the same script as the change (`emit` in the prelude); [`RedisOutbox::claim`] fans the
//! stream out to the webhooks, one FIFO queue per webhook and ordering key, and claims queue
//! heads with a lease (the queue's score in `P events:due`), so with many instances on one
//! Redis each delivery is made by one of them at a time; a head whose instance died is claimed
//! again by another once its lease has ended, under the same `webhook-id`.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P events` | stream | events not yet fanned out |
//! | `P d:<webhook>\|<event>` | hash | one delivery: the event's fields, `webhook`, `queue`, `attempts` |
//! | `P q:<webhook>\|<okey>` | list | deliveries of one webhook and key (or client), oldest first |
//! | `P events:due` | sorted set | queues by when their head is due (or its lease ends) |
//! | `P wq:<webhook>` | set | the queues of a webhook |
//! | `P webhooks` | hash | webhooks made through the API (JSON) |
//! | `P attempts:<webhook>` | list | the webhook's latest 1,000 attempts (JSON), newest first |
//! | `P events:pending` | string | deliveries not yet delivered or given up (the gauge) |
//! | `P expiries` | sorted set | enabled keys with an expiry, scored by it |
//! | `P expiry_notices:<id>` | set | `key.expiring` notices sent (`days:expires_at`) |
//!
//! Instances sharing a Redis should list the same `[[webhooks]]`: events are fanned out by
//! whichever instance claims first, with the webhooks it knows. `key.expiring` reads the index
//! `P expiries` (enabled keys by `expires_at`, kept by the write scripts) and records what it
//! sent in `P expiry_notices:<id>`; keys written before the index existed are not in it until
//! their next change.

use ::redis::{Script, Value};
use async_trait::async_trait;
use serde_json::json;

use super::codec::{Args, array, client_from, corrupt, fields, int, key_from, text};
use super::{PRELUDE, RedisStore};
use crate::keys::Millis;
use crate::keys::outbox::{
    Attempt, CLAIM_SCAN, Claimed, EXPIRING_DAYS, EventType, NewEvent, ORPHAN_AFTER_MS, Outbox,
    Outcome, Subscription, Webhook, key_data,
};
use crate::keys::store::{StoreError, StoreResult};

struct Scripts {
    claim: Script,
    complete: Script,
    delete_webhook: Script,
    insert_webhook: Script,
    update_webhook: Script,
    rotate_webhook: Script,
    emit: Script,
    expiring: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| {
        let s = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts {
            claim: s(include_str!("scripts/outbox_claim.lua")),
            complete: s(include_str!("scripts/outbox_complete.lua")),
            delete_webhook: s(include_str!("scripts/outbox_delete_webhook.lua")),
            insert_webhook: s(include_str!("scripts/outbox_insert_webhook.lua")),
            update_webhook: s(include_str!("scripts/outbox_update_webhook.lua")),
            rotate_webhook: s(include_str!("scripts/outbox_rotate_webhook.lua")),
            emit: s(include_str!("scripts/outbox_emit.lua")),
            expiring: s(include_str!("scripts/outbox_expiring.lua")),
        }
    })
}

pub struct RedisOutbox {
    pub(super) store: RedisStore,
}

fn rfc3339(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The body of an event the scripts wrote: built from the record and extra members the script
/// stored, the same bytes on every attempt.
fn body_of(f: &std::collections::HashMap<String, String>) -> StoreResult<String> {
    if let Some(body) = f.get("body") {
        return Ok(body.clone());
    }
    let get = |n: &str| f.get(n).ok_or_else(|| corrupt("event"));
    let kind = EventType::parse(get("type")?).ok_or_else(|| corrupt("event"))?;
    let at: Millis = get("t")?.parse().map_err(|_| corrupt("event"))?;
    if get("what")? == "threshold" {
        return threshold_body(f, at);
    }
    let rec: Vec<String> = serde_json::from_str(get("rec")?).unwrap_or_default();
    let rec = Value::Array(
        rec.into_iter()
            .map(|s| Value::BulkString(s.into_bytes()))
            .collect(),
    );
    let mut extra: serde_json::Value =
        serde_json::from_str(f.get("extra").map_or("{}", String::as_str)).unwrap_or(json!({}));
    if let Some(v) = extra.get_mut("previous_valid_until")
        && let Some(ms) = v.as_i64()
    {
        *v = json!(rfc3339(ms));
    }
    let ev = match get("what")?.as_str() {
        "client" => NewEvent::client(kind, &client_from(&rec)?, at, extra),
        _ => {
            let key = key_from(&rec)?;
            let mut data = key_data(&key);
            if let (Some(d), Some(e)) = (data.as_object_mut(), extra.as_object()) {
                d.extend(e.clone());
            }
            NewEvent::new(kind, key.id.to_string(), at, data)
        }
    };
    Ok(ev.body)
}

#[async_trait]
impl Outbox for RedisOutbox {
    async fn emit(&self, events: &[NewEvent]) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut a = Args::default();
        a.push(crate::keys::now_millis()).push(events.len());
        for e in events {
            a.push(e.kind.as_str()).push(&e.ordering_key).push(&e.body);
        }
        self.store
            .script("emit events", &scripts().emit, a)
            .await
            .map(|_| ())
    }

    async fn emit_expiring(&self, now: Millis) -> StoreResult<usize> {
        let mut a = Args::default();
        a.push(now);
        for d in EXPIRING_DAYS {
            a.push(d);
        }
        let v = self
            .store
            .script("expiry check", &scripts().expiring, a)
            .await?;
        Ok(int(&v)?.max(0) as usize)
    }

    async fn claim(
        &self,
        subscriptions: &[Subscription],
        now: Millis,
        lease_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<Claimed>> {
        let mut a = Args::default();
        a.push(now)
            .push(lease_ms)
            .push(limit)
            .push(CLAIM_SCAN)
            .push(subscriptions.len());
        for s in subscriptions {
            a.push(&s.webhook_id)
                .push(format!(",{},", s.events.join(",")))
                .push(s.room)
                .push(u8::from(s.stored));
        }
        a.push(now - ORPHAN_AFTER_MS);
        let v = self
            .store
            .script("claim events", &scripts().claim, a)
            .await?;
        let mut out = Vec::new();
        for item in array(v)? {
            let parts = array(item)?;
            let [d, f] = parts.as_slice() else {
                return Err(corrupt("delivery"));
            };
            let d = text(d).ok_or_else(|| corrupt("delivery"))?;
            let f = fields(f).ok_or_else(|| corrupt("delivery"))?;
            let get = |n: &str| f.get(n).cloned().ok_or_else(|| corrupt("delivery"));
            out.push(Claimed {
                delivery: d,
                webhook_id: get("webhook")?,
                event_id: format!("msg_{}", get("event")?),
                event_type: get("type")?,
                body: body_of(&f)?,
                attempts: get("attempts")?.parse().map_err(|_| corrupt("delivery"))?,
                created_at: get("t")?.parse().map_err(|_| corrupt("delivery"))?,
            });
        }
        Ok(out)
    }

    async fn complete(&self, claimed: &Claimed, outcome: &Outcome, now: Millis) -> StoreResult<()> {
        let (name, next) = match outcome {
            Outcome::Delivered { .. } => ("delivered", now),
            Outcome::Retry { at, .. } => ("retry", *at),
            Outcome::Failed { .. } => ("failed", now),
        };
        let attempt = json!({
            "event_id": claimed.event_id,
            "event_type": claimed.event_type,
            "attempt": claimed.attempts + 1,
            "at": now,
            "status": outcome.status(),
            "error": outcome.error(),
            "outcome": outcome.name(),
        });
        let mut a = Args::default();
        a.push(now)
            .push(&claimed.delivery)
            .push(name)
            .push(next)
            .push(attempt);
        self.store
            .script("complete delivery", &scripts().complete, a)
            .await
            .map(|_| ())
    }

    async fn pending(&self) -> StoreResult<u64> {
        let key = format!("{}events:pending", self.store.prefix());
        let mut conn = self.store.conn();
        let v = self
            .store
            .bounded("pending events", async move {
                ::redis::cmd("GET")
                    .arg(key)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        Ok(text(&v).and_then(|s| s.parse().ok()).unwrap_or(0))
    }

    async fn insert_webhook(&self, w: &Webhook, max: usize) -> StoreResult<bool> {
        let value = json!({"id": w.id, "url": w.url, "events": w.events, "secret": w.secret,
            "created_at": w.created_at})
        .to_string();
        let mut a = Args::default();
        a.push(&w.id).push(value).push(max);
        let v = self
            .store
            .write("insert webhook", &scripts().insert_webhook, a)
            .await?;
        match int(&v)? {
            1 => Ok(true),
            2 => Ok(false),
            _ => Err(StoreError::Unavailable("webhook id collision".into())),
        }
    }

    async fn list_webhooks(&self) -> StoreResult<Vec<Webhook>> {
        let key = format!("{}webhooks", self.store.prefix());
        let mut conn = self.store.conn();
        let v = self
            .store
            .bounded("list webhooks", async move {
                ::redis::cmd("HVALS")
                    .arg(key)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        let mut out: Vec<Webhook> = array(v)?
            .iter()
            .filter_map(|v| webhook_from(&text(v)?))
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    async fn update_webhook(
        &self,
        id: &str,
        url: Option<&str>,
        events: Option<&[String]>,
    ) -> StoreResult<Option<Webhook>> {
        let mut a = Args::default();
        a.push(crate::keys::now_millis())
            .push(id)
            .push(url.unwrap_or(""))
            .push(events.map(|e| json!(e).to_string()).unwrap_or_default());
        self.webhook_written("update webhook", &scripts().update_webhook, a)
            .await
    }

    async fn rotate_webhook_secret(
        &self,
        id: &str,
        secret: &str,
        previous_until: Option<Millis>,
    ) -> StoreResult<Option<Webhook>> {
        let mut a = Args::default();
        a.push(crate::keys::now_millis())
            .push(id)
            .push(secret)
            .push(previous_until.map(|t| t.to_string()).unwrap_or_default());
        self.webhook_written("rotate webhook secret", &scripts().rotate_webhook, a)
            .await
    }

    async fn delete_webhook(&self, id: &str) -> StoreResult<Option<Webhook>> {
        let mut a = Args::default();
        a.push(crate::keys::now_millis()).push(id);
        self.webhook_written("delete webhook", &scripts().delete_webhook, a)
            .await
    }

    async fn attempts(&self, webhook_id: &str, limit: u32) -> StoreResult<Vec<Attempt>> {
        let key = format!("{}attempts:{webhook_id}", self.store.prefix());
        let mut conn = self.store.conn();
        let v = self
            .store
            .bounded("webhook attempts", async move {
                ::redis::cmd("LRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(i64::from(limit) - 1)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        Ok(array(v)?
            .iter()
            .filter_map(|v| {
                let a: serde_json::Value = serde_json::from_str(&text(v)?).ok()?;
                Some(Attempt {
                    event_id: a["event_id"].as_str()?.to_owned(),
                    event_type: a["event_type"].as_str()?.to_owned(),
                    attempt: a["attempt"].as_u64()? as u32,
                    at: a["at"].as_i64()?,
                    status: a["status"].as_u64().map(|s| s as u16),
                    error: a["error"].as_str().map(str::to_owned),
                    outcome: a["outcome"].as_str()?.to_owned(),
                })
            })
            .collect())
    }
}

impl RedisOutbox {
    /// Runs a webhook write script that answers the webhook's JSON after the write, or nil
    /// when there is no such webhook.
    async fn webhook_written(
        &self,
        op: &'static str,
        script: &Script,
        args: Args,
    ) -> StoreResult<Option<Webhook>> {
        match self.store.write(op, script, args).await? {
            Value::Nil => Ok(None),
            v => Ok(text(&v).and_then(|s| webhook_from(&s))),
        }
    }
}

fn webhook_from(s: &str) -> Option<Webhook> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    Some(Webhook {
        id: v["id"].as_str()?.to_owned(),
        url: v["url"].as_str()?.to_owned(),
        events: v["events"]
            .as_array()?
            .iter()
            .filter_map(|e| e.as_str().map(str::to_owned))
            .collect(),
        secret: v["secret"].as_str()?.to_owned(),
        created_at: v["created_at"].as_i64()?,
        previous_secret: v["previous_secret"].as_str().map(str::to_owned),
        previous_until: v["previous_until"].as_i64(),
    })
}

/// The body of a `quota.threshold` event charge.lua wrote: its numbers, built by the same code
/// as the SQLite store's ([`crate::keys::threshold`]).
fn threshold_body(
    f: &std::collections::HashMap<String, String>,
    at: Millis,
) -> StoreResult<String> {
    use crate::keys::allowance::{Interval, Period, Refill};
    use crate::keys::threshold::{Crossing, Of};
    let get = |n: &str| f.get(n).map(String::as_str).ok_or_else(|| corrupt("event"));
    let number = |n: &str| -> StoreResult<u64> {
        get(n)?
            .parse::<f64>()
            .map(|v| v as u64)
            .map_err(|_| corrupt("event"))
    };
    let key_id = f.get("key").map(String::as_str).unwrap_or_default();
    let of = match get("kind")? {
        "quota" => Of::Quota {
            per: match get("per")? {
                "hour" => Period::Hour,
                "day" => Period::Day,
                _ => Period::Month,
            },
            index: get("index")?.parse().map_err(|_| corrupt("event"))?,
        },
        _ => Of::Credits {
            key_id,
            refill: Interval::parse(get("interval")?).map(|interval| Refill {
                amount: 0,
                interval,
                day: f.get("day").and_then(|d| d.parse().ok()),
            }),
        },
    };
    let threshold = number("threshold")?.min(100) as u8;
    Ok(Crossing {
        of,
        client_id: get("client")?,
        threshold,
        limit: number("limit")?,
        used: number("used")?,
    }
    .event(at)
    .body)
}
