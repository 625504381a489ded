//! The outbox of the embedded store: events are rows of `webhook_events`, written inside the
//! transaction of the change that caused them ([`write_events`]); each (event, webhook) pair
//! becomes a row of `webhook_deliveries` when it is fanned out, and each attempt a row of
//! `webhook_attempts`.
//!
//! One process owns a SQLite file (it holds the file's lock, `sqlite::FileLock`, while its
//! store is open), so the leases of deliveries found at the first claim are
//! from a process that is gone (killed mid-delivery): they are released at once and those
//! deliveries are made again, under the same `webhook-id`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{StoreError, StoreResult};
use crate::keys::outbox::{
    Attempt, CLAIM_SCAN, Claimed, DAY_MS, EXPIRING_DAYS, EventType, NewEvent, ORPHAN_AFTER_MS,
    Outbox, Outcome, Subscription, Webhook, expiring_window,
};
use crate::keys::{ApiKey, Millis};

/// Delivered and failed deliveries, their events and attempts are kept this long.
const RETENTION_MS: Millis = 7 * DAY_MS;
/// Events fanned out per claim.
const FANOUT_BATCH: i64 = 1_000;
/// How often a claim also drops what is past [`RETENTION_MS`].
const PRUNE_EVERY_MS: Millis = 60_000;

/// The deliveries a claim hands out from `candidates` (id, webhook; oldest first): up to
/// `limit`, at most each subscription's room of its webhook; a webhook without one (deleted
/// since) has no such bound.
fn pick(subs: &[Subscription], candidates: Vec<(i64, String)>, limit: usize) -> Vec<i64> {
    let mut room: std::collections::HashMap<&str, usize> = subs
        .iter()
        .map(|s| (s.webhook_id.as_str(), s.room))
        .collect();
    let mut out = Vec::new();
    for (id, webhook) in candidates {
        if out.len() == limit {
            break;
        }
        match room.get_mut(webhook.as_str()) {
            Some(0) => continue,
            Some(left) => *left -= 1,
            None => {}
        }
        out.push(id);
    }
    out
}
/// The indexes that let a prune read only what it drops: without them each prune read every
/// event and attempt kept (about 9 ms for 40,000 events, on the outbox thread beside the
/// request path, once a minute; BENCHMARKS.md "The outbox prune, timed").
pub const PRUNE_INDEXES: &str = r#"
CREATE INDEX webhook_events_by_created_at ON webhook_events(created_at);
CREATE INDEX webhook_attempts_by_at ON webhook_attempts(at);
"#;
/// The index of the keys that can expire, by when: the hourly `key.expiring` check reads the
/// keys expiring within its widest window through it instead of every key (on the outbox's
/// connection, whose transaction holds the write lock while it reads; BENCHMARKS.md "The
/// expiry check, timed").
pub const EXPIRY_INDEX: &str = r#"
CREATE INDEX api_keys_by_expiry ON api_keys(expires_at) WHERE enabled = 1 AND expires_at IS NOT NULL;
"#;
/// The keys the `key.expiring` check looks at: enabled, expiring after `?1` and by `?2`. Its
/// terms imply [`EXPIRY_INDEX`]'s condition, so that index serves it.
pub(super) const EXPIRING_KEYS: &str = "k.enabled = 1 AND k.expires_at > ?1 AND k.expires_at <= ?2";
/// Drops the events fanned out (`?1`: the cursor) and older than `?2` that no delivery still
/// waits for.
pub(super) const PRUNE_EVENTS: &str = "DELETE FROM webhook_events WHERE seq <= ?1 AND created_at < ?2 \
     AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d \
         WHERE d.event_seq = webhook_events.seq AND d.state = 'pending')";
/// Drops the delivery attempts older than `?1`.
pub(super) const PRUNE_ATTEMPTS: &str = "DELETE FROM webhook_attempts WHERE at < ?1";

/// A webhook's secret before its last rotation, signed with beside the current one until
/// `previous_until`.
pub const PREVIOUS_SECRET: &str = r#"
ALTER TABLE webhooks ADD COLUMN previous_secret TEXT;
ALTER TABLE webhooks ADD COLUMN previous_until INTEGER;
"#;

/// The columns [`webhook_from_row`] reads.
const WEBHOOK_COLUMNS: &str =
    "id, url, events, secret, created_at, previous_secret, previous_until";

pub const MIGRATION: &str = r#"
CREATE TABLE webhook_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    type         TEXT NOT NULL,
    ordering_key TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    body         TEXT NOT NULL
);
CREATE TABLE webhooks (
    id         TEXT PRIMARY KEY NOT NULL,
    url        TEXT NOT NULL,
    events     TEXT NOT NULL,
    secret     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE webhook_deliveries (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_seq    INTEGER NOT NULL REFERENCES webhook_events(seq) ON DELETE CASCADE,
    webhook_id   TEXT NOT NULL,
    ordering_key TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    next_at      INTEGER NOT NULL,
    lease_until  INTEGER,
    updated_at   INTEGER NOT NULL,
    UNIQUE (event_seq, webhook_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(state, next_at);
CREATE INDEX webhook_deliveries_order
    ON webhook_deliveries(webhook_id, ordering_key, state, event_seq);
CREATE TABLE webhook_attempts (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    event_type TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    at         INTEGER NOT NULL,
    status     INTEGER,
    error      TEXT,
    outcome    TEXT NOT NULL
);
CREATE INDEX webhook_attempts_by_webhook ON webhook_attempts(webhook_id, id);
CREATE TABLE expiry_notices (
    key_id     TEXT NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    days       INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (key_id, days, expires_at)
) WITHOUT ROWID;
CREATE TABLE outbox_cursor (
    name TEXT PRIMARY KEY NOT NULL,
    seq  INTEGER NOT NULL
) WITHOUT ROWID;
"#;

/// Appends events to the outbox, inside the caller's transaction.
pub fn write_events(conn: &Connection, events: &[NewEvent]) -> rusqlite::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut stmt = conn.prepare_cached(
        "INSERT INTO webhook_events (id, type, ordering_key, created_at, body) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for e in events {
        stmt.execute(params![e.id, e.kind.as_str(), e.ordering_key, e.at, e.body])?;
    }
    Ok(())
}

/// How the store reads a key row: its column list (`k.` aliased) and the row decoder.
#[derive(Clone, Copy)]
pub struct KeyRows {
    pub columns: &'static str,
    pub read: fn(&Row<'_>) -> rusqlite::Result<ApiKey>,
}

pub struct SqliteOutbox {
    store: Conn,
    keys: KeyRows,
    /// Leases left by an earlier process are released at the first claim.
    released: Arc<AtomicBool>,
    /// When the last claim pruned old rows.
    pruned_at: Arc<std::sync::atomic::AtomicI64>,
}

/// The store's connection for the outbox, on a thread of its own
/// ([`super::sqlite::run_there`]). Its transactions begin IMMEDIATE (the store sets that when
/// it opens it).
#[derive(Clone)]
struct Conn(std::sync::mpsc::Sender<super::sqlite::Job>);

impl Conn {
    async fn run<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        super::sqlite::run_there(&self.0, f).await
    }
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteOutbox {
    pub fn new(conn: std::sync::mpsc::Sender<super::sqlite::Job>, keys: KeyRows) -> Self {
        Self {
            store: Conn(conn),
            keys,
            released: Arc::new(AtomicBool::new(false)),
            pruned_at: Arc::new(std::sync::atomic::AtomicI64::new(0)),
        }
    }
}

/// The webhook with this id, read within `tx`.
fn webhook_by_id(tx: &rusqlite::Transaction<'_>, id: &str) -> StoreResult<Option<Webhook>> {
    tx.query_row(
        &format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = ?1"),
        [id],
        webhook_from_row,
    )
    .optional()
    .map_err(db)
}

fn webhook_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Webhook> {
    let events: String = r.get(2)?;
    Ok(Webhook {
        id: r.get(0)?,
        url: r.get(1)?,
        events: serde_json::from_str(&events).unwrap_or_default(),
        secret: r.get(3)?,
        created_at: r.get(4)?,
        previous_secret: r.get(5)?,
        previous_until: r.get(6)?,
    })
}

#[async_trait]
impl Outbox for SqliteOutbox {
    async fn emit(&self, events: &[NewEvent]) -> StoreResult<()> {
        let events = events.to_vec();
        self.store
            .run(move |c| {
                let tx = c.transaction().map_err(db)?;
                write_events(&tx, &events).map_err(db)?;
                tx.commit().map_err(db)
            })
            .await
    }

    async fn emit_expiring(&self, now: Millis) -> StoreResult<usize> {
        let KeyRows { columns, read } = self.keys;
        self.store
            .run(move |c| {
                let tx = c.transaction().map_err(db)?;
                let widest = EXPIRING_DAYS[0] * DAY_MS;
                let keys = tx
                    .prepare_cached(&format!(
                        "SELECT {columns} FROM api_keys k WHERE {EXPIRING_KEYS}"
                    ))
                    .map_err(db)?
                    .query_map(params![now, now + widest], read)
                    .map_err(db)?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(db)?;
                let mut events = Vec::new();
                for k in keys {
                    let Some(exp) = k.expires_at else { continue };
                    let Some(days) = expiring_window(exp, now) else {
                        continue;
                    };
                    let id = k.id.to_string();
                    let noticed: bool = tx
                        .query_row(
                            "SELECT EXISTS(SELECT 1 FROM expiry_notices WHERE key_id = ?1 \
                             AND days = ?2 AND expires_at = ?3)",
                            params![id, days, exp],
                            |r| r.get(0),
                        )
                        .map_err(db)?;
                    if noticed {
                        continue;
                    }
                    // This window and every wider one: a key that is already within a day of
                    // its expiry gets one notice, not two.
                    for d in EXPIRING_DAYS.iter().filter(|&&d| d >= days) {
                        tx.execute(
                            "INSERT OR IGNORE INTO expiry_notices (key_id, days, expires_at) \
                             VALUES (?1, ?2, ?3)",
                            params![id, d, exp],
                        )
                        .map_err(db)?;
                    }
                    events.push(NewEvent::key(
                        EventType::KeyExpiring,
                        &k,
                        now,
                        serde_json::json!({"days": days}),
                    ));
                }
                write_events(&tx, &events).map_err(db)?;
                tx.commit().map_err(db)?;
                Ok(events.len())
            })
            .await
    }

    async fn claim(
        &self,
        subscriptions: &[Subscription],
        now: Millis,
        lease_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<Claimed>> {
        let subs = subscriptions.to_vec();
        let release = !self.released.swap(true, Ordering::AcqRel);
        let prune = now - self.pruned_at.load(Ordering::Relaxed) >= PRUNE_EVERY_MS;
        if prune {
            self.pruned_at.store(now, Ordering::Relaxed);
        }
        self.store
            .run(move |c| {
                let tx = c.transaction().map_err(db)?;
                if release {
                    tx.execute(
                        "UPDATE webhook_deliveries SET lease_until = NULL \
                         WHERE lease_until IS NOT NULL",
                        [],
                    )
                    .map_err(db)?;
                }
                // Fan out what was written since the last claim.
                let cursor: i64 = tx
                    .query_row(
                        "SELECT seq FROM outbox_cursor WHERE name = 'fanout'",
                        [],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db)?
                    .unwrap_or(0);
                let fresh = tx
                    .prepare_cached(
                        "SELECT seq, type, ordering_key, created_at FROM webhook_events \
                         WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                    )
                    .map_err(db)?
                    .query_map(params![cursor, FANOUT_BATCH], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    })
                    .map_err(db)?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(db)?;
                if let Some(last) = fresh.last().map(|f| f.0) {
                    // The store's webhooks as they are now, not as the caller's list (read
                    // before) has them: one made since gets the events written after its
                    // creation was answered, one deleted since gets none, and a change of
                    // event types applies to every event written after it. The configured
                    // ones come from the caller.
                    let stored = tx
                        .prepare_cached("SELECT id, events FROM webhooks")
                        .map_err(db)?
                        .query_map([], |r| {
                            let events: String = r.get(1)?;
                            Ok(Subscription {
                                webhook_id: r.get(0)?,
                                events: serde_json::from_str(&events).unwrap_or_default(),
                                room: 0,
                                stored: true,
                            })
                        })
                        .map_err(db)?
                        .collect::<rusqlite::Result<Vec<_>>>()
                        .map_err(db)?;
                    let fan: Vec<&Subscription> =
                        subs.iter().filter(|s| !s.stored).chain(&stored).collect();
                    let mut ins = tx
                        .prepare_cached(
                            "INSERT OR IGNORE INTO webhook_deliveries (event_seq, webhook_id, \
                             ordering_key, state, attempts, next_at, updated_at) \
                             VALUES (?1, ?2, ?3, 'pending', 0, ?4, ?5)",
                        )
                        .map_err(db)?;
                    for (seq, kind, key, at) in &fresh {
                        for s in fan.iter().filter(|s| s.wants(kind)) {
                            ins.execute(params![seq, s.webhook_id, key, at, now])
                                .map_err(db)?;
                        }
                    }
                    tx.execute(
                        "INSERT INTO outbox_cursor (name, seq) VALUES ('fanout', ?1) \
                         ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
                        [last],
                    )
                    .map_err(db)?;
                }
                // Due deliveries, each the oldest undelivered one of its webhook and key, of
                // webhooks with room, and of webhooks not named only once their event is
                // `ORPHAN_AFTER_MS` old (ids only: bodies are read for those handed out).
                let full: Vec<&str> = subs
                    .iter()
                    .filter(|s| s.room == 0)
                    .map(|s| s.webhook_id.as_str())
                    .collect();
                let named: Vec<&str> = subs.iter().map(|s| s.webhook_id.as_str()).collect();
                let candidates = tx
                    .prepare_cached(
                        "SELECT d.id, d.webhook_id FROM webhook_deliveries d \
                         WHERE d.state = 'pending' AND d.next_at <= ?1 \
                         AND (d.lease_until IS NULL OR d.lease_until <= ?1) \
                         AND d.webhook_id NOT IN (SELECT value FROM json_each(?3)) \
                         AND (d.webhook_id IN (SELECT value FROM json_each(?4)) \
                             OR (SELECT e.created_at FROM webhook_events e \
                                 WHERE e.seq = d.event_seq) < ?5) \
                         AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p \
                             WHERE p.webhook_id = d.webhook_id \
                             AND p.ordering_key = d.ordering_key \
                             AND p.state = 'pending' AND p.event_seq < d.event_seq) \
                         ORDER BY d.event_seq LIMIT ?2",
                    )
                    .map_err(db)?
                    .query_map(
                        params![
                            now,
                            // Webhooks without room are left out by the query, so a few
                            // times `limit` finds `limit` unless some webhook's room ends first
                            // (then it is left out of the next claim).
                            (limit * 4).min(CLAIM_SCAN) as i64,
                            serde_json::to_string(&full).expect("strings"),
                            serde_json::to_string(&named).expect("strings"),
                            now - ORPHAN_AFTER_MS
                        ],
                        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
                    )
                    .map_err(db)?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(db)?;
                let picked = pick(&subs, candidates, limit);
                let mut due = Vec::with_capacity(picked.len());
                {
                    let mut read = tx
                        .prepare_cached(
                            "SELECT d.id, d.webhook_id, e.id, e.type, e.body, d.attempts, \
                             e.created_at FROM webhook_deliveries d \
                             JOIN webhook_events e ON e.seq = d.event_seq WHERE d.id = ?1",
                        )
                        .map_err(db)?;
                    let mut lease = tx
                        .prepare_cached(
                            "UPDATE webhook_deliveries SET lease_until = ?2 WHERE id = ?1",
                        )
                        .map_err(db)?;
                    for id in picked {
                        due.push(
                            read.query_row([id], |r| {
                                Ok(Claimed {
                                    delivery: r.get::<_, i64>(0)?.to_string(),
                                    webhook_id: r.get(1)?,
                                    event_id: r.get(2)?,
                                    event_type: r.get(3)?,
                                    body: r.get(4)?,
                                    attempts: r.get(5)?,
                                    created_at: r.get(6)?,
                                })
                            })
                            .map_err(db)?,
                        );
                        lease.execute(params![id, now + lease_ms]).map_err(db)?;
                    }
                }
                // What is done and old goes (now and then: it reads old rows).
                if prune {
                    let horizon = now - RETENTION_MS;
                    tx.execute(PRUNE_EVENTS, params![cursor, horizon])
                        .map_err(db)?;
                    tx.execute(PRUNE_ATTEMPTS, [horizon]).map_err(db)?;
                }
                tx.commit().map_err(db)?;
                Ok(due)
            })
            .await
    }

    async fn complete(&self, claimed: &Claimed, outcome: &Outcome, now: Millis) -> StoreResult<()> {
        let claimed = claimed.clone();
        let outcome = outcome.clone();
        self.store
            .run(move |c| {
                let tx = c.transaction().map_err(db)?;
                let (state, next_at) = match &outcome {
                    Outcome::Delivered { .. } => ("delivered", now),
                    Outcome::Retry { at, .. } => ("pending", *at),
                    Outcome::Failed { .. } => ("failed", now),
                };
                let updated = tx
                    .execute(
                        "UPDATE webhook_deliveries SET state = ?2, attempts = attempts + 1, \
                         next_at = ?3, lease_until = NULL, updated_at = ?4 WHERE id = ?1",
                        params![claimed.delivery, state, next_at, now],
                    )
                    .map_err(db)?;
                // The delivery went with its webhook while the attempt was under way: nothing
                // to record.
                if updated == 0 {
                    return Ok(());
                }
                tx.execute(
                    "INSERT INTO webhook_attempts (webhook_id, event_id, event_type, attempt, \
                     at, status, error, outcome) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        claimed.webhook_id,
                        claimed.event_id,
                        claimed.event_type,
                        claimed.attempts + 1,
                        now,
                        outcome.status(),
                        outcome.error(),
                        outcome.name(),
                    ],
                )
                .map_err(db)?;
                tx.commit().map_err(db)
            })
            .await
    }

    async fn pending(&self) -> StoreResult<u64> {
        self.store
            .run(|c| {
                // A range of the (state, next_at) index: the pending rows only, not the delivered
                // ones kept for the deliveries listing.
                c.prepare_cached("SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending'")
                    .map_err(db)?
                    .query_row([], |r| r.get::<_, i64>(0))
                    .map(|n| n as u64)
                    .map_err(db)
            })
            .await
    }

    async fn insert_webhook(&self, w: &Webhook, max: usize) -> StoreResult<bool> {
        let w = w.clone();
        self.store
            .run(move |c| {
                let tx = c.transaction().map_err(db)?;
                let held: i64 = tx
                    .query_row("SELECT COUNT(*) FROM webhooks", [], |r| r.get(0))
                    .map_err(db)?;
                if held as usize >= max {
                    return Ok(false);
                }
                let n = tx
                    .execute(
                        "INSERT OR IGNORE INTO webhooks (id, url, events, secret, created_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![
                            w.id,
                            w.url,
                            serde_json::to_string(&w.events).expect("serializable"),
                            w.secret,
                            w.created_at
                        ],
                    )
                    .map_err(db)?;
                if n == 0 {
                    return Err(StoreError::Unavailable("webhook id collision".into()));
                }
                tx.commit().map_err(db)?;
                Ok(true)
            })
            .await
    }

    async fn list_webhooks(&self) -> StoreResult<Vec<Webhook>> {
        self.store
            .run(|c| {
                c.prepare_cached(&format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id"
                ))
                .map_err(db)?
                .query_map([], webhook_from_row)
                .map_err(db)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db)
            })
            .await
    }

    async fn update_webhook(
        &self,
        id: &str,
        url: Option<&str>,
        events: Option<&[String]>,
    ) -> StoreResult<Option<Webhook>> {
        let id = id.to_owned();
        let url = url.map(str::to_owned);
        let events = events.map(|e| serde_json::to_string(e).expect("serializable"));
        self.store
            .run(move |c| {
                let tx = c.transaction().map_err(db)?;
                tx.execute(
                    "UPDATE webhooks SET url = COALESCE(?2, url), events = COALESCE(?3, events) \
                     WHERE id = ?1",
                    params![id, url, events],
                )
                .map_err(db)?;
                let w = webhook_by_id(&tx, &id)?;
                tx.commit().map_err(db)?;
                Ok(w)
            })
            .await
    }

    async fn rotate_webhook_secret(
        &self,
        id: &str,
        secret: &str,
        previous_until: Option<Millis>,
    ) -> StoreResult<Option<Webhook>> {
        let (id, secret) = (id.to_owned(), secret.to_owned());
        self.store
            .run(move |c| {
                let tx = c.transaction().map_err(db)?;
                tx.execute(
                    "UPDATE webhooks SET \
                     previous_secret = CASE WHEN ?3 IS NULL THEN NULL ELSE secret END, \
                     previous_until = ?3, secret = ?2 WHERE id = ?1",
                    params![id, secret, previous_until],
                )
                .map_err(db)?;
                let w = webhook_by_id(&tx, &id)?;
                tx.commit().map_err(db)?;
                Ok(w)
            })
            .await
    }

    async fn delete_webhook(&self, id: &str) -> StoreResult<Option<Webhook>> {
        let id = id.to_owned();
        self.store
            .run(move |c| {
                let tx = c.transaction().map_err(db)?;
                let w = webhook_by_id(&tx, &id)?;
                if w.is_some() {
                    tx.execute("DELETE FROM webhooks WHERE id = ?1", [&id])
                        .map_err(db)?;
                    tx.execute(
                        "DELETE FROM webhook_deliveries WHERE webhook_id = ?1 \
                         AND state = 'pending'",
                        [&id],
                    )
                    .map_err(db)?;
                    tx.execute("DELETE FROM webhook_attempts WHERE webhook_id = ?1", [&id])
                        .map_err(db)?;
                }
                tx.commit().map_err(db)?;
                Ok(w)
            })
            .await
    }

    async fn attempts(&self, webhook_id: &str, limit: u32) -> StoreResult<Vec<Attempt>> {
        let id = webhook_id.to_owned();
        self.store
            .run(move |c| {
                c.prepare_cached(
                    "SELECT event_id, event_type, attempt, at, status, error, outcome \
                     FROM webhook_attempts WHERE webhook_id = ?1 ORDER BY id DESC LIMIT ?2",
                )
                .map_err(db)?
                .query_map(params![id, limit], |r| {
                    Ok(Attempt {
                        event_id: r.get(0)?,
                        event_type: r.get(1)?,
                        attempt: r.get(2)?,
                        at: r.get(3)?,
                        status: r.get(4)?,
                        error: r.get(5)?,
                        outcome: r.get(6)?,
                    })
                })
                .map_err(db)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db)
            })
            .await
    }
}
