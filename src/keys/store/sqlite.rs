//! Embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so an acknowledged
//! admin write survives a crash of the process or of the machine. Calls run on tokio's blocking
//! pool against one connection; the proxy reaches here on cache misses only. Credit and quota
//! charges use a second connection with `synchronous=NORMAL`, and the usage flush a third, on its
//! own thread at the lowest CPU priority, also with `synchronous=NORMAL` (no fsync per commit;
//! durable across a crash of the process). The background refreshes of cached keys read in
//! batches on a fourth, read-only connection on a thread of its own at a lowered priority, and
//! the event outbox works on a fifth (`synchronous=FULL`, as admin writes), also on a thread of
//! its own at a lowered priority.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};
use uuid::Uuid;

use super::signing::{AddKey, SigningKeyRecord};
use super::sqlite_outbox::write_events;
use super::{
    ClientPatch, ClientWithKeys, Conflict, KeyPatch, Page, Rotated, Rotation, Store, StoreError,
    StoreResult, Usage, UsageWrite, import,
};
use crate::keys::allowance::{
    Charge, Charged, CreditTerms, Credits, CreditsWrite, CreditsWritten, Exhausted, Interval,
    Period, Refill, credits_after,
};
use crate::keys::outbox::{self, EventType, NewEvent};
use crate::keys::{ApiKey, Client, KeyHash, KeyRecord, Millis, RateLimit, SetBy, now_millis};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE clients (
    client_id  TEXT PRIMARY KEY NOT NULL,
    license    TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    metadata   TEXT
);
CREATE TABLE api_keys (
    id                   TEXT PRIMARY KEY NOT NULL,
    client_id            TEXT NOT NULL REFERENCES clients(client_id) ON DELETE CASCADE,
    name                 TEXT NOT NULL,
    prefix               TEXT NOT NULL,
    key_hash             BLOB NOT NULL UNIQUE,
    previous_hash        BLOB,
    previous_valid_until INTEGER,
    permissions          TEXT NOT NULL,
    enabled              INTEGER NOT NULL,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    expires_at           INTEGER,
    last_used_at         INTEGER,
    rotated_at           INTEGER,
    rate_limit           TEXT,
    metadata             TEXT
);
CREATE INDEX api_keys_by_client ON api_keys(client_id, created_at, id);
CREATE INDEX api_keys_by_previous_hash ON api_keys(previous_hash) WHERE previous_hash IS NOT NULL;
"#,
    r#"
CREATE TABLE key_usage (
    key_id   TEXT NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    day      INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    PRIMARY KEY (key_id, day)
) WITHOUT ROWID;
"#,
    // Who set each constraint; what was set before this was recorded counts as an admin's.
    r#"
ALTER TABLE api_keys ADD COLUMN disabled_by TEXT;
ALTER TABLE api_keys ADD COLUMN expires_set_by TEXT;
ALTER TABLE api_keys ADD COLUMN rate_limit_set_by TEXT;
UPDATE api_keys SET
    disabled_by = CASE WHEN enabled = 0 THEN 'admin' END,
    expires_set_by = CASE WHEN expires_at IS NOT NULL THEN 'admin' END,
    rate_limit_set_by = CASE WHEN rate_limit IS NOT NULL THEN 'admin' END;
"#,
    // The token generation; until now tokens carried the key's rotated_at.
    r#"
ALTER TABLE api_keys ADD COLUMN tokens_valid_after INTEGER;
UPDATE api_keys SET tokens_valid_after = rotated_at;
"#,
    super::sqlite_outbox::MIGRATION,
    // Credits per key; quota use per client and calendar period (no foreign key: a client
    // deleted and created again starts from what its name already used in the period).
    r#"
CREATE TABLE key_credits (
    key_id          TEXT PRIMARY KEY NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    remaining       INTEGER NOT NULL,
    refill_amount   INTEGER,
    refill_interval TEXT,
    refill_day      INTEGER,
    period          INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE quota_use (
    client_id TEXT NOT NULL,
    per       TEXT NOT NULL,
    period    INTEGER NOT NULL,
    used      INTEGER NOT NULL,
    PRIMARY KEY (client_id, per, period)
) WITHOUT ROWID;
"#,
    // quota.threshold for credits: the amount of credits without refill (the balance after the
    // last set/add) and the highest threshold fired since the last refill or set/add.
    r#"
ALTER TABLE key_credits ADD COLUMN alert_base INTEGER;
ALTER TABLE key_credits ADD COLUMN alerted INTEGER NOT NULL DEFAULT 0;
"#,
    super::sqlite_outbox::PRUNE_INDEXES,
    super::sqlite_outbox::EXPIRY_INDEX,
    super::sqlite_outbox::PREVIOUS_SECRET,
];

const KEY_COLUMNS: &str = "k.id, k.client_id, k.name, k.prefix, k.key_hash, k.previous_hash, \
     k.previous_valid_until, k.permissions, k.enabled, k.created_at, k.updated_at, k.expires_at, \
     k.last_used_at, k.rotated_at, k.rate_limit, k.metadata, k.disabled_by, k.expires_set_by, \
     k.rate_limit_set_by, k.tokens_valid_after";
/// How many columns [`KEY_COLUMNS`] names.
const KEY_COLUMN_COUNT: usize = 20;
/// The next token generation of a key, as SQL: the write's time (`?{n}`), and always past the
/// current one.
fn next_generation(now: &str) -> String {
    format!("MAX(COALESCE(tokens_valid_after, 0) + 1, {now})")
}

/// A store's hold on its SQLite file: an exclusive `flock` on `<file>.lock` beside it, taken
/// when the store opens and given up when it is dropped (every clone) or its process ends,
/// however it ends. One process per file: a second one would go on serving keys the first
/// revoked (caches are invalidated within a process only) and take over the first one's
/// webhook deliveries; several instances share a Redis store instead.
pub struct FileLock {
    _file: std::fs::File,
}

/// Where the lock of the database at `path` is: `<path>.lock`.
fn lock_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    name.into()
}

/// The refusal of a database another store holds.
pub fn in_use(path: &Path) -> StoreError {
    unavailable(format!(
        "{} is in use by another keygate process (it holds {}): one process per SQLite file; \
         several instances share a Redis store",
        path.display(),
        lock_path(path).display()
    ))
}

#[derive(Clone)]
pub struct SqliteStore {
    /// The hold on the file, for as long as any clone or connection thread lives.
    _lock: Arc<FileLock>,
    conn: Arc<Mutex<Connection>>,
    /// A second connection for the charges of the request path (credits, quotas), with
    /// `synchronous=NORMAL`: in WAL mode a commit survives a crash of the process (kill -9)
    /// without an fsync per request; only a power loss can lose the last charges, which then
    /// count as not spent (in the client's favour).
    charges: Arc<Mutex<Connection>>,
    /// The usage flush's writes, to a thread and connection of their own at the lowest CPU
    /// priority ([`USAGE_NICE`]).
    usage: std::sync::mpsc::Sender<Job>,
    /// The batched lookups of background cache refreshes ([`Store::find_many_by_hash`]), to a
    /// thread and read connection of their own at a lowered CPU priority ([`REFRESH_NICE`]):
    /// the lookups requests wait for never queue behind them.
    refresh: std::sync::mpsc::Sender<Job>,
    /// The event outbox's work (fan-out, claims, delivery records, webhooks), to a thread and
    /// connection of their own at a lowered CPU priority ([`EVENTS_NICE`]): the delivery loop
    /// claims once a second, and on a core shared with the request path each claim then runs
    /// in short turns instead of holding the core for its whole length.
    events: std::sync::mpsc::Sender<Job>,
}

/// The usage writer's CPU priority: the lowest. A flush that falls behind only delays when
/// usage shows (and the next flush carries what is left).
const USAGE_NICE: i32 = 19;
/// How many pages the usage writer lets the WAL grow by before it checkpoints
/// ([`SqliteStore::open_usage`]).
const USAGE_CHECKPOINT_PAGES: i64 = 100;
/// The refresh thread's CPU priority. Lowered, not the lowest: a key served stale must be
/// refreshed within the revalidate window (10 s), or requests wait for the store; at nice 10 a
/// core kept busy by requests still leaves it about a tenth, enough for tens of thousands of
/// lookups a second.
const REFRESH_NICE: i32 = 10;
/// The event outbox thread's CPU priority (see [`SqliteStore`]'s `events`).
const EVENTS_NICE: i32 = 10;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies pending migrations;
    /// refused when another store holds the file ([`SqliteStore::lock`]).
    pub fn open(path: &Path) -> StoreResult<Self> {
        let lock = Self::lock(path)?.ok_or_else(|| in_use(path))?;
        Self::open_locked(path, lock)
    }

    /// The hold on the database at `path` (creating its directory if needed), or `None` when
    /// another store has it, in this process or another ([`FileLock`]).
    pub fn lock(path: &Path) -> StoreResult<Option<FileLock>> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                unavailable(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let at = lock_path(path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&at)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", at.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(FileLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(unavailable(format!("cannot lock {}: {e}", at.display())))
            }
        }
    }

    /// Opens the database at `path`, whose `lock` the caller took, as [`SqliteStore::open`].
    pub fn open_locked(path: &Path, lock: FileLock) -> StoreResult<Self> {
        let mut conn = connect(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(unavailable)?;
        // Up to 64 MiB of page cache (SQLite's default is 2 MiB), allocated as pages are used:
        // the key-hash index of a million keys (about 50 MB) then stays in memory, and a bulk
        // import does not spill pages to the WAL in mid-transaction or re-read them through the
        // kernel (BENCHMARKS.md, key import).
        conn.pragma_update(None, "cache_size", -65_536)
            .map_err(unavailable)?;
        migrate(&mut conn).map_err(unavailable)?;
        // Every transaction takes the write lock when it begins and waits for it (busy
        // timeout). A deferred one that read first could not wait: a charge committed on the
        // other connection between its read and its write would fail it ("database is
        // locked"). Read-only transactions queue behind writers too; they are admin calls.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        // The threads hold the lock too: they run what was sent to them after the last clone
        // of the store is gone (the outbox keeps a sender of its own).
        let lock = Arc::new(lock);
        let thread = |name, nice, conn| connection_thread(name, nice, conn, Arc::clone(&lock));
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            charges: Arc::new(Mutex::new(Self::open_normal(path)?)),
            usage: thread("keygate-usage", USAGE_NICE, Self::open_usage(path)?)?,
            refresh: thread("keygate-refresh", REFRESH_NICE, Self::open_reader(path)?)?,
            events: thread("keygate-events", EVENTS_NICE, Self::open_events(path)?)?,
            _lock: lock,
        })
    }

    /// The event outbox's connection to the (migrated) database at `path`: settings as the
    /// main connection's (`synchronous=FULL`, foreign keys, transactions that take the write
    /// lock when they begin).
    fn open_events(path: &Path) -> StoreResult<Connection> {
        let c = Self::open_writer(path, "FULL")?;
        c.pragma_update(None, "foreign_keys", "ON")
            .map_err(unavailable)?;
        Ok(c)
    }

    /// The usage writer's connection: as [`SqliteStore::open_normal`], and it copies the WAL
    /// back into the database (checkpoints, which the connection that commits runs) every
    /// [`USAGE_CHECKPOINT_PAGES`] pages instead of SQLite's 1,000: a checkpoint is one call
    /// that cannot be cut short, and on a core shared with the request path a thread keeps the
    /// core until the scheduler's next tick (4 ms at 250 Hz) once it runs, so many small ones
    /// hold requests up for less each time than a few large ones.
    fn open_usage(path: &Path) -> StoreResult<Connection> {
        let c = Self::open_normal(path)?;
        c.pragma_update(None, "wal_autocheckpoint", USAGE_CHECKPOINT_PAGES)
            .map_err(unavailable)?;
        Ok(c)
    }

    /// A read connection to the (migrated) database at `path` for the background refreshes:
    /// it reads what was committed when each batch began (WAL), and never writes.
    fn open_reader(path: &Path) -> StoreResult<Connection> {
        let c = connect(path)?;
        c.pragma_update(None, "query_only", "ON")
            .map_err(unavailable)?;
        // Up to 16 MiB of page cache, allocated as pages are used (the main connection's is 64).
        c.pragma_update(None, "cache_size", -16_384)
            .map_err(unavailable)?;
        Ok(c)
    }

    /// A further connection to the (migrated) database at `path` with `synchronous=NORMAL`,
    /// for the writes that need no fsync per commit (charges, usage).
    fn open_normal(path: &Path) -> StoreResult<Connection> {
        Self::open_writer(path, "NORMAL")
    }

    /// A further connection to the (migrated) database at `path` that writes with
    /// `synchronous` at `sync`; its transactions take the write lock when they begin, as the
    /// main connection's do.
    fn open_writer(path: &Path, sync: &str) -> StoreResult<Connection> {
        let mut c = connect(path)?;
        c.pragma_update(None, "synchronous", sync)
            .map_err(unavailable)?;
        c.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        Ok(c)
    }

    /// Runs `f` on the connection of credit and quota charges.
    async fn run_charge<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        run_on(Arc::clone(&self.charges), f).await
    }

    /// Runs `f` on the main connection.
    async fn run<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        run_on(Arc::clone(&self.conn), f).await
    }
}

/// A connection to the database at `path` that waits up to 5 s for a lock held by another.
fn connect(path: &Path) -> StoreResult<Connection> {
    let c = Connection::open(path)
        .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
    c.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(unavailable)?;
    Ok(c)
}

/// Work for a connection on a thread of its own ([`connection_thread`]).
pub(super) type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Starts a thread named `name` that runs the jobs sent to it, one after the other, on `conn`
/// at CPU priority `nice` (Linux; 19 is the lowest): on a core shared with the request path,
/// its work then takes the time the requests leave over instead of delaying them. The thread
/// ends when every sender (the store's clones, the outbox) is dropped, and holds `lock` until
/// then.
fn connection_thread(
    name: &str,
    nice: i32,
    mut conn: Connection,
    lock: Arc<FileLock>,
) -> StoreResult<std::sync::mpsc::Sender<Job>> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // On Linux this names the calling thread only.
            if let Err(e) = rustix::process::setpriority_process(None, nice) {
                tracing::debug!(error = %e, "store thread: CPU priority not lowered");
            }
            while let Ok(job) = rx.recv() {
                job(&mut conn);
            }
            drop(conn);
            drop(lock);
        })
        .map_err(|e| unavailable(format!("cannot start the store thread {name}: {e}")))?;
    Ok(tx)
}

/// Runs `f` on the thread behind `jobs` ([`connection_thread`]) and answers its outcome.
pub(super) async fn run_there<T, F>(jobs: &std::sync::mpsc::Sender<Job>, f: F) -> StoreResult<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
{
    let (done, outcome) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move |c| {
        let _ = done.send(f(c));
    });
    let stopped = || unavailable("a store thread has stopped");
    jobs.send(job).map_err(|_| stopped())?;
    outcome.await.map_err(|_| stopped())?
}

/// Runs `f` on a blocking thread with `conn` held.
async fn run_on<T, F>(conn: Arc<Mutex<Connection>>, f: F) -> StoreResult<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let mut guard = conn
            .lock()
            .map_err(|_| unavailable("store connection poisoned"))?;
        f(&mut guard)
    })
    .await
    .map_err(unavailable)?
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn db(e: rusqlite::Error) -> StoreError {
    unavailable(e)
}

fn json_col<T: serde::de::DeserializeOwned>(s: Option<String>) -> rusqlite::Result<Option<T>> {
    s.map(|s| {
        serde_json::from_str(&s).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
    })
    .transpose()
}

fn hash_col(v: Option<Vec<u8>>) -> rusqlite::Result<Option<KeyHash>> {
    v.map(|b| {
        <[u8; 32]>::try_from(b.as_slice())
            .map(KeyHash)
            .map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Blob,
                    Box::new(e),
                )
            })
    })
    .transpose()
}

fn key_from_row(r: &Row<'_>) -> rusqlite::Result<ApiKey> {
    let id: String = r.get(0)?;
    let id = Uuid::parse_str(&id).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let key_hash = hash_col(Some(r.get(4)?))?.expect("non-null column");
    Ok(ApiKey {
        id,
        client_id: r.get(1)?,
        name: r.get(2)?,
        prefix: r.get(3)?,
        key_hash,
        previous_hash: hash_col(r.get(5)?)?,
        previous_valid_until: r.get(6)?,
        permissions: json_col(Some(r.get(7)?))?.unwrap_or_default(),
        enabled: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        expires_at: r.get(11)?,
        last_used_at: r.get(12)?,
        rotated_at: r.get(13)?,
        rate_limit: json_col::<RateLimit>(r.get(14)?)?,
        metadata: json_col(r.get(15)?)?,
        disabled_by: setter_col(r.get(16)?)?,
        expires_set_by: setter_col(r.get(17)?)?,
        rate_limit_set_by: setter_col(r.get(18)?)?,
        tokens_valid_after: r.get(19)?,
    }
    // Read as the Redis store reads it (a constraint with no setter is an admin's).
    .with_setters_known())
}

fn setter_col(v: Option<String>) -> rusqlite::Result<Option<SetBy>> {
    v.map(|s| {
        SetBy::parse(&s).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                format!("not a setter: {s:?}").into(),
            )
        })
    })
    .transpose()
}

fn client_from_row(r: &Row<'_>) -> rusqlite::Result<Client> {
    Ok(Client {
        client_id: r.get(0)?,
        license: r.get(1)?,
        created_at: r.get(2)?,
        metadata: json_col(r.get(3)?)?,
    })
}

fn to_json<T: serde::Serialize>(v: &Option<T>) -> Option<String> {
    v.as_ref()
        .map(|v| serde_json::to_string(v).expect("serializable"))
}

/// `execute` through the connection's statement cache: the statement is prepared once, not
/// on every row (a bulk import inserts many).
struct Cached<'a>(&'a Connection);

impl Cached<'_> {
    fn execute<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.0.prepare_cached(sql)?.execute(params)
    }
}

fn insert_key_row(conn: &Connection, k: &ApiKey) -> rusqlite::Result<()> {
    Cached(conn).execute(
        "INSERT INTO api_keys (id, client_id, name, prefix, key_hash, previous_hash, \
         previous_valid_until, permissions, enabled, created_at, updated_at, expires_at, \
         last_used_at, rotated_at, rate_limit, metadata, disabled_by, expires_set_by, \
         rate_limit_set_by, tokens_valid_after) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
         ?19, ?20)",
        params![
            k.id.to_string(),
            k.client_id,
            k.name,
            k.prefix,
            &k.key_hash.0[..],
            k.previous_hash.as_ref().map(|h| h.0.to_vec()),
            k.previous_valid_until,
            serde_json::to_string(&k.permissions).expect("serializable"),
            k.enabled,
            k.created_at,
            k.updated_at,
            k.expires_at,
            k.last_used_at,
            k.rotated_at,
            to_json(&k.rate_limit),
            to_json(&k.metadata),
            k.disabled_by.map(SetBy::as_str),
            k.expires_set_by.map(SetBy::as_str),
            k.rate_limit_set_by.map(SetBy::as_str),
            k.tokens_valid_after,
        ],
    )?;
    Ok(())
}

fn keys_of(conn: &Connection, client_id: &str) -> rusqlite::Result<Vec<ApiKey>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.client_id = ?1 ORDER BY k.created_at, k.id"
    ))?;
    stmt.query_map([client_id], key_from_row)?.collect()
}

fn key_by_id(conn: &Connection, id: Uuid) -> rusqlite::Result<Option<ApiKey>> {
    conn.prepare_cached(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.id = ?1"
    ))?
    .query_row([id.to_string()], key_from_row)
    .optional()
}

fn client_by_id(conn: &Connection, client_id: &str) -> rusqlite::Result<Option<Client>> {
    conn.prepare_cached(
        "SELECT client_id, license, created_at, metadata FROM clients WHERE client_id = ?1",
    )?
    .query_row([client_id], client_from_row)
    .optional()
}

fn client_exists(conn: &Connection, client_id: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM clients WHERE client_id = ?1)",
        [client_id],
        |r| r.get(0),
    )
}

/// The key whose current hash, or previous hash still valid at `now`, is `h`.
fn record_by_hash(c: &Connection, h: &KeyHash, now: Millis) -> StoreResult<Option<KeyRecord>> {
    if let Some(r) = record_query(c, "k.key_hash = ?1", &[&&h.0[..]])? {
        return Ok(Some(r));
    }
    record_query(
        c,
        "k.previous_hash = ?1 AND k.previous_valid_until > ?2",
        &[&&h.0[..], &now],
    )
}

fn record_query(
    conn: &Connection,
    filter: &str,
    p: &[&dyn rusqlite::ToSql],
) -> StoreResult<Option<KeyRecord>> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {KEY_COLUMNS}, c.license, cr.key_id IS NOT NULL, cr.refill_amount, \
             cr.refill_interval, cr.refill_day FROM api_keys k \
             JOIN clients c ON c.client_id = k.client_id \
             LEFT JOIN key_credits cr ON cr.key_id = k.id WHERE {filter}"
        ))
        .map_err(db)?;
    stmt.query_row(p, |r| {
        let has_credits: bool = r.get(KEY_COLUMN_COUNT + 1)?;
        Ok(KeyRecord {
            key: key_from_row(r)?,
            license: r.get(KEY_COLUMN_COUNT)?,
            credits: has_credits
                .then(|| {
                    Ok::<_, rusqlite::Error>(CreditTerms {
                        refill: refill_cols(r, KEY_COLUMN_COUNT + 2)?,
                    })
                })
                .transpose()?,
        })
    })
    .optional()
    .map_err(db)
}

/// `key.created` of a key just inserted.
/// `key.created` of a key written by an import (`data.imported: true`).
fn imported(key: &ApiKey) -> NewEvent {
    NewEvent::key(
        EventType::KeyCreated,
        key,
        now_millis(),
        serde_json::json!({"imported": true}),
    )
}

fn created(key: &ApiKey) -> NewEvent {
    NewEvent::key(
        EventType::KeyCreated,
        key,
        now_millis(),
        serde_json::json!({}),
    )
}

/// A refill from its three columns at `i` (amount, interval, day).
fn refill_cols(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<Refill>> {
    let amount: Option<i64> = r.get(i)?;
    let interval: Option<String> = r.get(i + 1)?;
    let day: Option<i64> = r.get(i + 2)?;
    Ok(
        match (amount, interval.as_deref().and_then(Interval::parse)) {
            (Some(amount), Some(interval)) => Some(Refill {
                amount: amount.max(0) as u64,
                interval,
                day: day.map(|d| d as u8),
            }),
            _ => None,
        },
    )
}

fn credits_of(conn: &Connection, key_id: &str) -> rusqlite::Result<Option<Credits>> {
    conn.prepare_cached(
        "SELECT remaining, period, refill_amount, refill_interval, refill_day FROM key_credits \
         WHERE key_id = ?1",
    )?
    .query_row([key_id], |r| {
        let remaining: i64 = r.get(0)?;
        Ok(Credits {
            remaining: remaining.max(0) as u64,
            period: r.get(1)?,
            refill: refill_cols(r, 2)?,
        })
    })
    .optional()
}

/// A key's credits as stored and their `quota.threshold` state: the amount of credits without
/// refill (`alert_base`) and the highest threshold fired (`alerted`). One read, as the charge
/// made before the state was kept.
fn credits_alert_of(
    conn: &Connection,
    key_id: &str,
) -> rusqlite::Result<Option<(Credits, Option<u64>, u8)>> {
    conn.prepare_cached(
        "SELECT remaining, period, refill_amount, refill_interval, refill_day, alert_base, \
         alerted FROM key_credits WHERE key_id = ?1",
    )?
    .query_row([key_id], |r| {
        let remaining: i64 = r.get(0)?;
        let base: Option<i64> = r.get(5)?;
        let alerted: i64 = r.get(6)?;
        Ok((
            Credits {
                remaining: remaining.max(0) as u64,
                period: r.get(1)?,
                refill: refill_cols(r, 2)?,
            },
            base.map(|b| b.max(0) as u64),
            alerted.clamp(0, 100) as u8,
        ))
    })
    .optional()
}

fn write_credits_row(conn: &Connection, key_id: &str, c: &Credits) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO key_credits (key_id, remaining, refill_amount, refill_interval, refill_day, \
         period) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(key_id) DO UPDATE SET \
         remaining = excluded.remaining, refill_amount = excluded.refill_amount, \
         refill_interval = excluded.refill_interval, refill_day = excluded.refill_day, \
         period = excluded.period",
    )?
    .execute(params![
        key_id,
        c.remaining as i64,
        c.refill.map(|r| r.amount as i64),
        c.refill.map(|r| r.interval.as_str()),
        c.refill.and_then(|r| r.day).map(i64::from),
        c.period,
    ])?;
    Ok(())
}

fn page_bounds(page: u32, per_page: u32) -> (i64, i64) {
    let per = i64::from(per_page.max(1));
    (per, (i64::from(page.max(1)) - 1) * per)
}

/// The rows of [`Store::import_keys`], judged and (unless an atomic import saw a refusal)
/// inserted inside the caller's transaction.
fn import_rows(
    tx: &Connection,
    keys: &[ApiKey],
    max_keys: u32,
    atomic: bool,
) -> rusqlite::Result<Vec<(usize, import::Refusal)>> {
    let mut refused = Vec::new();
    // Per client: exists, and how many keys it has (counted only when there is a maximum).
    let mut clients: std::collections::HashMap<&str, Option<u32>> = Default::default();
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    let mut stored = tx.prepare_cached(
        "SELECT EXISTS(SELECT 1 FROM api_keys WHERE key_hash = ?1) \
         OR EXISTS(SELECT 1 FROM api_keys WHERE previous_hash = ?1)",
    )?;
    for (i, k) in keys.iter().enumerate() {
        if !clients.contains_key(k.client_id.as_str()) {
            let c = if !client_exists(tx, &k.client_id)? {
                None
            } else if max_keys > 0 {
                Some(tx.query_row(
                    "SELECT COUNT(*) FROM api_keys WHERE client_id = ?1",
                    [&k.client_id],
                    |r| r.get(0),
                )?)
            } else {
                Some(0)
            };
            clients.insert(k.client_id.as_str(), c);
        }
        let count = clients
            .get_mut(k.client_id.as_str())
            .expect("inserted above");
        let Some(n) = count else {
            refused.push((i, import::Refusal::UnknownClient));
            continue;
        };
        if !seen.insert(k.key_hash.0) || stored.query_row([&k.key_hash.0[..]], |r| r.get(0))? {
            refused.push((i, import::Refusal::Duplicate));
            continue;
        }
        if max_keys > 0 && *n >= max_keys {
            refused.push((i, import::Refusal::TooManyKeys { max: max_keys }));
            continue;
        }
        *n += 1;
        if !atomic || refused.is_empty() {
            insert_key_row(tx, k)?;
            write_events(tx, &[imported(k)])?;
        }
    }
    Ok(refused)
}

#[async_trait]
impl Store for SqliteStore {
    async fn find_by_hash(&self, hash: &KeyHash, now: Millis) -> StoreResult<Option<KeyRecord>> {
        let h = *hash;
        self.run(move |c| record_by_hash(c, &h, now)).await
    }

    /// On the refresh thread's own connection, in one read transaction (one snapshot).
    async fn find_many_by_hash(
        &self,
        hashes: &[KeyHash],
        now: Millis,
    ) -> StoreResult<Vec<Option<KeyRecord>>> {
        let hashes = hashes.to_vec();
        run_there(&self.refresh, move |c| {
            let tx = c.transaction().map_err(db)?;
            let found = hashes
                .iter()
                .map(|h| record_by_hash(&tx, h, now))
                .collect::<StoreResult<Vec<_>>>()?;
            tx.finish().map_err(db)?;
            Ok(found)
        })
        .await
    }

    async fn find_by_id(&self, id: Uuid) -> StoreResult<Option<KeyRecord>> {
        self.run(move |c| record_query(c, "k.id = ?1", &[&id.to_string()]))
            .await
    }

    async fn list_keys(
        &self,
        client_id: Option<&str>,
        page: u32,
        per_page: u32,
    ) -> StoreResult<Page<ApiKey>> {
        let client_id = client_id.map(str::to_owned);
        let (limit, offset) = page_bounds(page, per_page);
        self.run(move |c| {
            let total: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM api_keys WHERE ?1 IS NULL OR client_id = ?1",
                    [&client_id],
                    |r| r.get(0),
                )
                .map_err(db)?;
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys k WHERE ?1 IS NULL OR k.client_id = ?1 \
                     ORDER BY k.created_at, k.id LIMIT ?2 OFFSET ?3"
                ))
                .map_err(db)?;
            let items = stmt
                .query_map(params![client_id, limit, offset], key_from_row)
                .map_err(db)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db)?;
            Ok(Page {
                items,
                total: total as u64,
            })
        })
        .await
    }

    async fn insert_key(&self, key: &ApiKey, max_keys: u32) -> StoreResult<()> {
        let key = key.clone();
        self.run(move |c| {
            let tx = c.transaction().map_err(db)?;
            if !client_exists(&tx, &key.client_id).map_err(db)? {
                return Err(StoreError::NotFound);
            }
            if max_keys > 0 {
                let n: u32 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM api_keys WHERE client_id = ?1",
                        [&key.client_id],
                        |r| r.get(0),
                    )
                    .map_err(db)?;
                if n >= max_keys {
                    return Err(StoreError::Conflict(Conflict::TooManyKeys {
                        max: max_keys,
                    }));
                }
            }
            insert_key_row(&tx, &key).map_err(db)?;
            write_events(&tx, &[created(&key)]).map_err(db)?;
            tx.commit().map_err(db)
        })
        .await
    }

    async fn patch_key(
        &self,
        id: Uuid,
        patch: &KeyPatch,
        now: Millis,
    ) -> StoreResult<Option<ApiKey>> {
        let p = patch.clone();
        self.run(move |c| {
            let tx = c.transaction().map_err(db)?;
            // Who may change what is judged on the row as it is inside this transaction, which
            // holds the write lock from its start (IMMEDIATE, as every transaction here):
            // nothing changes the row in between.
            let Some(current) = key_by_id(&tx, id).map_err(db)? else {
                return Ok(None);
            };
            let setters = p.setters(&current).map_err(StoreError::Refused)?;
            // One statement: each attribute is set only when the patch names it (`?n` true),
            // from the row as it is at this moment.
            let n = tx
                .prepare_cached(&format!(
                    "UPDATE api_keys SET \
                     name = CASE WHEN ?2 THEN ?3 ELSE name END, \
                     enabled = CASE WHEN ?4 THEN ?5 ELSE enabled END, \
                     permissions = CASE WHEN ?6 THEN ?7 ELSE permissions END, \
                     expires_at = CASE WHEN ?8 THEN ?9 ELSE expires_at END, \
                     rate_limit = CASE WHEN ?10 THEN ?11 ELSE rate_limit END, \
                     metadata = CASE WHEN ?12 THEN ?13 ELSE metadata END, \
                     updated_at = MAX(updated_at, ?14), \
                     disabled_by = ?15, expires_set_by = ?16, rate_limit_set_by = ?17, \
                     tokens_valid_after = CASE WHEN ?18 THEN {} ELSE tokens_valid_after END \
                     WHERE id = ?1",
                    next_generation("?14")
                ))
                .map_err(db)?
                .execute(params![
                    id.to_string(),
                    p.name.is_some(),
                    p.name,
                    p.enabled.is_some(),
                    p.enabled,
                    p.permissions.is_some(),
                    p.permissions
                        .as_ref()
                        .map(|v| serde_json::to_string(v).expect("serializable")),
                    p.expires_at.is_some(),
                    p.expires_at.flatten(),
                    p.rate_limit.is_some(),
                    to_json(&p.rate_limit.flatten()),
                    p.metadata.is_some(),
                    to_json(&p.metadata.clone().flatten()),
                    now,
                    setters.disabled_by.map(SetBy::as_str),
                    setters.expires_set_by.map(SetBy::as_str),
                    setters.rate_limit_set_by.map(SetBy::as_str),
                    // A disable kills every token minted before it.
                    p.enabled == Some(false),
                ])
                .map_err(db)?;
            if n == 0 {
                return Ok(None);
            }
            let key = key_by_id(&tx, id).map_err(db)?;
            if let Some(after) = &key {
                write_events(
                    &tx,
                    &outbox::patch_events(&current, after, now_millis(), p.leak.as_ref()),
                )
                .map_err(db)?;
            }
            tx.commit().map_err(db)?;
            Ok(key)
        })
        .await
    }

    async fn rotate_key(&self, id: Uuid, r: &Rotation) -> StoreResult<Option<Rotated>> {
        let r = r.clone();
        self.run(move |c| {
            let tx = c.transaction().map_err(db)?;
            let Some(before) = key_by_id(&tx, id).map_err(db)? else {
                return Ok(None);
            };
            // SQLite evaluates every right-hand side on the row before the update: the hash
            // kept for the grace period is the one current at this moment.
            tx.execute(
                &format!(
                    "UPDATE api_keys SET \
                     previous_hash = CASE WHEN ?2 IS NULL THEN NULL ELSE key_hash END, \
                     previous_valid_until = ?2, key_hash = ?3, prefix = ?4, rotated_at = ?5, \
                     tokens_valid_after = {}, updated_at = MAX(updated_at, ?5) WHERE id = ?1",
                    next_generation("?5")
                ),
                params![
                    id.to_string(),
                    r.previous_valid_until,
                    &r.key_hash.0[..],
                    r.prefix,
                    r.at
                ],
            )
            .map_err(db)?;
            let after = key_by_id(&tx, id)
                .map_err(db)?
                .ok_or(StoreError::NotFound)?;
            let rotated = NewEvent::key(
                EventType::KeyRotated,
                &after,
                now_millis(),
                serde_json::json!({"previous_valid_until": r.previous_valid_until
                    .map(|t| chrono::DateTime::from_timestamp_millis(t).unwrap_or_default()
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true))}),
            );
            write_events(&tx, &[rotated]).map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(Some(Rotated { before, after }))
        })
        .await
    }

    async fn delete_key(&self, id: Uuid) -> StoreResult<Option<ApiKey>> {
        self.run(move |c| {
            let tx = c.transaction().map_err(db)?;
            let key = key_by_id(&tx, id).map_err(db)?;
            if let Some(k) = &key {
                tx.execute("DELETE FROM api_keys WHERE id = ?1", [id.to_string()])
                    .map_err(db)?;
                write_events(&tx, &[outbox::revoked(k, "deleted", now_millis())]).map_err(db)?;
            }
            tx.commit().map_err(db)?;
            Ok(key)
        })
        .await
    }

    async fn insert_client(&self, client: &Client, first_key: &ApiKey) -> StoreResult<()> {
        let client = client.clone();
        let key = first_key.clone();
        self.run(move |c| {
            let tx = c.transaction().map_err(db)?;
            let inserted = tx
                .execute(
                    "INSERT OR IGNORE INTO clients (client_id, license, created_at, metadata) \
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        client.client_id,
                        client.license,
                        client.created_at,
                        to_json(&client.metadata)
                    ],
                )
                .map_err(db)?;
            if inserted == 0 {
                return Err(StoreError::Conflict(Conflict::ClientExists));
            }
            insert_key_row(&tx, &key).map_err(db)?;
            let at = now_millis();
            write_events(
                &tx,
                &[
                    NewEvent::client(EventType::ClientCreated, &client, at, serde_json::json!({})),
                    created(&key),
                ],
            )
            .map_err(db)?;
            tx.commit().map_err(db)
        })
        .await
    }

    async fn get_client(&self, client_id: &str) -> StoreResult<Option<Client>> {
        let id = client_id.to_owned();
        self.run(move |c| client_by_id(c, &id).map_err(db)).await
    }

    async fn list_clients(&self, page: u32, per_page: u32) -> StoreResult<Page<Client>> {
        let (limit, offset) = page_bounds(page, per_page);
        self.run(move |c| {
            let total: i64 = c
                .query_row("SELECT COUNT(*) FROM clients", [], |r| r.get(0))
                .map_err(db)?;
            let mut stmt = c
                .prepare_cached(
                    "SELECT client_id, license, created_at, metadata FROM clients \
                     ORDER BY created_at, client_id LIMIT ?1 OFFSET ?2",
                )
                .map_err(db)?;
            let items = stmt
                .query_map(params![limit, offset], client_from_row)
                .map_err(db)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db)?;
            Ok(Page {
                items,
                total: total as u64,
            })
        })
        .await
    }

    async fn patch_client(
        &self,
        client_id: &str,
        patch: &ClientPatch,
    ) -> StoreResult<Option<Client>> {
        let id = client_id.to_owned();
        let p = patch.clone();
        self.run(move |c| {
            let tx = c.transaction().map_err(db)?;
            let n = tx
                .execute(
                    "UPDATE clients SET license = COALESCE(?2, license), \
                     metadata = CASE WHEN ?3 THEN ?4 ELSE metadata END WHERE client_id = ?1",
                    params![
                        id,
                        p.license,
                        p.metadata.is_some(),
                        to_json(&p.metadata.clone().flatten())
                    ],
                )
                .map_err(db)?;
            if n == 0 {
                return Ok(None);
            }
            let client = client_by_id(&tx, &id).map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(client)
        })
        .await
    }

    async fn delete_client(&self, client_id: &str) -> StoreResult<Option<ClientWithKeys>> {
        let id = client_id.to_owned();
        self.run(move |c| {
            let tx = c.transaction().map_err(db)?;
            let Some(client) = client_by_id(&tx, &id).map_err(db)? else {
                return Ok(None);
            };
            let keys = keys_of(&tx, &id).map_err(db)?;
            tx.execute("DELETE FROM api_keys WHERE client_id = ?1", [&id])
                .map_err(db)?;
            tx.execute("DELETE FROM clients WHERE client_id = ?1", [&id])
                .map_err(db)?;
            // Its quota counts that can no longer be read go (what this period and the one
            // before counted stays, as on Redis until it expires: a client made again under
            // its id within them starts from what it used).
            let at = now_millis();
            for per in [Period::Hour, Period::Day, Period::Month] {
                tx.execute(PRUNE_QUOTA_USE, params![id, per.as_str(), per.index(at)])
                    .map_err(db)?;
            }
            let mut events: Vec<NewEvent> = keys
                .iter()
                .map(|k| outbox::revoked(k, "deleted", at))
                .collect();
            events.push(NewEvent::client(
                EventType::ClientDeleted,
                &client,
                at,
                serde_json::json!({"keys_deleted": keys.len()}),
            ));
            write_events(&tx, &events).map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(Some(ClientWithKeys { client, keys }))
        })
        .await
    }

    async fn disable_client_keys(&self, client_id: &str) -> StoreResult<Vec<ApiKey>> {
        let id = client_id.to_owned();
        self.run(move |c| {
            let tx = c.transaction().map_err(db)?;
            if !client_exists(&tx, &id).map_err(db)? {
                return Err(StoreError::NotFound);
            }
            let before = keys_of(&tx, &id).map_err(db)?;
            tx.execute(
                &format!(
                    "UPDATE api_keys SET enabled = 0, disabled_by = 'admin', \
                     tokens_valid_after = {}, updated_at = MAX(updated_at, ?2) \
                     WHERE client_id = ?1",
                    next_generation("?2")
                ),
                params![id, crate::keys::now_millis()],
            )
            .map_err(db)?;
            let at = now_millis();
            let events: Vec<NewEvent> = keys_of(&tx, &id)
                .map_err(db)?
                .iter()
                .filter(|k| before.iter().any(|b| b.id == k.id && b.enabled))
                .map(|k| outbox::revoked(k, "disabled", at))
                .collect();
            write_events(&tx, &events).map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(before)
        })
        .await
    }

    async fn replace_client_keys(
        &self,
        client_id: &str,
        new_key: &ApiKey,
    ) -> StoreResult<Vec<ApiKey>> {
        let id = client_id.to_owned();
        let new_key = new_key.clone();
        self.run(move |c| {
            let tx = c.transaction().map_err(db)?;
            if !client_exists(&tx, &id).map_err(db)? {
                return Err(StoreError::NotFound);
            }
            let before = keys_of(&tx, &id).map_err(db)?;
            tx.execute("DELETE FROM api_keys WHERE client_id = ?1", [&id])
                .map_err(db)?;
            insert_key_row(&tx, &new_key).map_err(db)?;
            let at = now_millis();
            let mut events: Vec<NewEvent> = before
                .iter()
                .map(|k| outbox::revoked(k, "deleted", at))
                .collect();
            events.push(created(&new_key));
            write_events(&tx, &events).map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(before)
        })
        .await
    }

    /// Committed with `synchronous=NORMAL`: no fsync per flush (a crash of the process loses
    /// none of it; a power loss can lose the last flushes, as it can the last charges). On the
    /// usage writer's own connection and thread ([`USAGE_NICE`]): lookups never wait for it
    /// (WAL readers do not wait for a writer), and writes on the other connections take the
    /// write lock when they begin, so they wait for a chunk's commit instead of failing.
    async fn record_usage(&self, _: UsageWrite, usage: &[Usage]) -> StoreResult<()> {
        let usage = usage.to_vec();
        run_there(&self.usage, move |c| write_usage(c, &usage)).await
    }

    async fn usage(&self, key_id: Uuid, from: i64, to: i64) -> StoreResult<Vec<(i64, u64)>> {
        self.run(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT day, requests FROM key_usage WHERE key_id = ?1 AND day BETWEEN ?2 AND ?3 \
                     ORDER BY day",
                )
                .map_err(db)?;
            stmt.query_map(params![key_id.to_string(), from, to], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)
        })
        .await
    }

    async fn import_keys(
        &self,
        keys: Vec<ApiKey>,
        max_keys: u32,
        atomic: bool,
    ) -> StoreResult<Vec<(usize, import::Refusal)>> {
        self.run(move |c| {
            let tx = c.transaction().map_err(db)?;
            let refused = import_rows(&tx, &keys, max_keys, atomic).map_err(db)?;
            if atomic && !refused.is_empty() {
                return Ok(refused);
            }
            tx.commit().map_err(db)?;
            Ok(refused)
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.run(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(db))
            .await
    }

    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>> {
        self.run(|c| {
            c.execute_batch(SIGNING_KEYS_TABLE).map_err(db)?;
            signing_keys(c).map_err(db)
        })
        .await
    }

    async fn add_signing_key(
        &self,
        key: &SigningKeyRecord,
        how: AddKey,
        prune: &[String],
    ) -> StoreResult<Vec<SigningKeyRecord>> {
        let key = key.clone();
        let prune = prune.to_vec();
        self.run(move |c| {
            c.execute_batch(SIGNING_KEYS_TABLE).map_err(db)?;
            let tx = c.transaction().map_err(db)?;
            let empty: bool = tx
                .query_row("SELECT COUNT(*) = 0 FROM signing_keys", [], |r| r.get(0))
                .map_err(db)?;
            if how == AddKey::Always || empty {
                tx.execute(
                    "INSERT OR REPLACE INTO signing_keys \
                     (kid, algorithm, private_pkcs8, active_from, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        key.kid,
                        key.algorithm,
                        key.private_pkcs8,
                        key.active_from,
                        key.created_at
                    ],
                )
                .map_err(db)?;
                for kid in &prune {
                    tx.execute("DELETE FROM signing_keys WHERE kid = ?1", params![kid])
                        .map_err(db)?;
                }
            }
            let keys = signing_keys(&tx).map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(keys)
        })
        .await
    }

    fn outbox(&self) -> Option<Arc<dyn outbox::Outbox>> {
        Some(Arc::new(super::sqlite_outbox::SqliteOutbox::new(
            self.events.clone(),
            super::sqlite_outbox::KeyRows {
                columns: KEY_COLUMNS,
                read: key_from_row,
            },
        )))
    }

    async fn charge(&self, charge: &Charge<'_>) -> StoreResult<Charged> {
        let key_id = charge.key_id.to_string();
        let cost = charge.cost;
        let now = charge.now;
        let quota = charge
            .quota
            .map(|q| (q.client_id.to_owned(), q.quota, q.quota.per.index(now)));
        self.run_charge(move |c| {
            let tx = c.transaction().map_err(db)?;
            let stored = match cost {
                Some(_) => credits_alert_of(&tx, &key_id).map_err(db)?,
                None => None,
            };
            let credits = stored.map(|(c, _, _)| c.at(now));
            let used = match &quota {
                Some((client, q, index)) => Some(
                    tx.prepare_cached(
                        "SELECT used FROM quota_use WHERE client_id = ?1 AND per = ?2 \
                         AND period = ?3",
                    )
                    .map_err(db)?
                    .query_row(params![client, q.per.as_str(), index], |r| {
                        r.get::<_, i64>(0)
                    })
                    .optional()
                    .map_err(db)?
                    .unwrap_or(0)
                    .max(0) as u64,
                ),
                None => None,
            };
            let cost = cost.unwrap_or(0);
            let limit = quota.as_ref().map(|(_, q, _)| q.requests);
            let refused = if credits.is_some_and(|c| c.remaining < cost) {
                Some(Exhausted::Credits)
            } else if let (Some(used), Some(limit)) = (used, limit)
                && used >= limit
            {
                Some(Exhausted::Quota)
            } else {
                None
            };
            let left = |used: u64| limit.map(|l| l.saturating_sub(used));
            if refused.is_some() {
                return Ok(Charged {
                    credits: credits.map(|c| c.remaining),
                    quota: used.and_then(left),
                    refused,
                });
            }
            let credits = credits.map(|mut c| {
                c.remaining -= cost;
                c
            });
            if let Some(c) = &credits {
                write_credits_row(&tx, &key_id, c).map_err(db)?;
            }
            if let Some((client, q, index)) = &quota {
                tx.prepare_cached(
                    "INSERT INTO quota_use (client_id, per, period, used) VALUES (?1, ?2, ?3, 1) \
                     ON CONFLICT(client_id, per, period) DO UPDATE SET used = used + 1",
                )
                .map_err(db)?
                .execute(params![client, q.per.as_str(), index])
                .map_err(db)?;
                // The client's first charge of a period: its counts older than the period just
                // ended go (as Redis lets them expire). Once per client and period, on the
                // table's key prefix.
                if used == Some(0) {
                    tx.prepare_cached(PRUNE_QUOTA_USE)
                        .map_err(db)?
                        .execute(params![client, q.per.as_str(), index])
                        .map_err(db)?;
                }
            }
            charge_thresholds(&tx, &key_id, stored, credits, &quota, used, now).map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(Charged {
                credits: credits.map(|c| c.remaining),
                quota: used.map(|u| u + 1).and_then(left),
                refused: None,
            })
        })
        .await
    }

    async fn credits(&self, key_id: Uuid) -> StoreResult<Option<Credits>> {
        let key_id = key_id.to_string();
        self.run_charge(move |c| credits_of(c, &key_id).map_err(db))
            .await
    }

    async fn write_credits(
        &self,
        key_id: Uuid,
        write: &CreditsWrite,
        now: Millis,
    ) -> StoreResult<CreditsWritten> {
        let write = *write;
        // An admin write: on the main connection (`synchronous=FULL`), not the charges'.
        self.run(move |c| {
            let tx = c.transaction().map_err(db)?;
            if key_by_id(&tx, key_id).map_err(db)?.is_none() {
                return Ok(CreditsWritten::NoKey);
            }
            let id = key_id.to_string();
            let stored = credits_of(&tx, &id).map_err(db)?;
            let current = stored.map(|c| c.at(now));
            let Some(next) = credits_after(current, write, now) else {
                return Ok(CreditsWritten::TooMany);
            };
            match &next {
                Some(credits) => {
                    write_credits_row(&tx, &id, credits).map_err(db)?;
                    // Credits without refill: a fresh amount at each set/add. With a refill:
                    // thresholds fire again after new terms or a refill.
                    let reset = credits.refill.is_none()
                        || matches!(write, CreditsWrite::Set { .. })
                        || stored.map(|c| c.period) != current.map(|c| c.period);
                    tx.prepare_cached(
                        "UPDATE key_credits SET alert_base = ?2, \
                         alerted = CASE WHEN ?3 THEN 0 ELSE alerted END WHERE key_id = ?1",
                    )
                    .and_then(|mut st| {
                        st.execute(params![
                            id,
                            credits.refill.is_none().then_some(credits.remaining as i64),
                            reset
                        ])
                    })
                    .map_err(db)?;
                }
                None => {
                    tx.execute("DELETE FROM key_credits WHERE key_id = ?1", [&id])
                        .map_err(db)?;
                }
            }
            tx.commit().map_err(db)?;
            Ok(CreditsWritten::Done(next))
        })
        .await
    }

    async fn quota_used(&self, client_id: &str, per: Period, index: i64) -> StoreResult<u64> {
        let client = client_id.to_owned();
        self.run_charge(move |c| {
            c.query_row(
                "SELECT used FROM quota_use WHERE client_id = ?1 AND per = ?2 AND period = ?3",
                params![client, per.as_str(), index],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|u| u.unwrap_or(0).max(0) as u64)
            .map_err(db)
        })
        .await
    }
}

/// The signing keys' table, made when first used (it is not among [`MIGRATIONS`]: a database
/// of a gateway that never signs does not get it).
const SIGNING_KEYS_TABLE: &str = "CREATE TABLE IF NOT EXISTS signing_keys (
    kid           TEXT PRIMARY KEY NOT NULL,
    algorithm     TEXT NOT NULL,
    private_pkcs8 BLOB NOT NULL,
    active_from   INTEGER NOT NULL,
    created_at    INTEGER NOT NULL
)";

fn signing_keys(c: &Connection) -> rusqlite::Result<Vec<SigningKeyRecord>> {
    let mut stmt = c.prepare(
        "SELECT kid, algorithm, private_pkcs8, active_from, created_at FROM signing_keys",
    )?;
    stmt.query_map([], |r| {
        Ok(SigningKeyRecord {
            kid: r.get(0)?,
            algorithm: r.get(1)?,
            private_pkcs8: r.get(2)?,
            active_from: r.get(3)?,
            created_at: r.get(4)?,
        })
    })?
    .collect()
}

/// Writes the `quota.threshold` events of a charge in its transaction ([`crate::keys::threshold`]):
/// `stored` the key's credits and threshold state before the charge, `credits` after it, `used`
/// the quota count before it. Writes nothing unless a threshold is crossed (or a refill reset
/// the credits' state).
fn charge_thresholds(
    tx: &Connection,
    key_id: &str,
    stored: Option<(Credits, Option<u64>, u8)>,
    credits: Option<Credits>,
    quota: &Option<(String, crate::keys::allowance::Quota, i64)>,
    used: Option<u64>,
    now: Millis,
) -> rusqlite::Result<()> {
    use crate::keys::threshold::{Crossing, Of, credits_crossed, quota_crossed};
    let mut events = Vec::new();
    if let (Some((client, q, index)), Some(u)) = (quota, used) {
        for t in quota_crossed(q.requests, u, u + 1) {
            let of = Of::Quota {
                per: q.per,
                index: *index,
            };
            events.push(
                Crossing {
                    of,
                    client_id: client,
                    threshold: t,
                    limit: q.requests,
                    used: u + 1,
                }
                .event(now),
            );
        }
    }
    if let (Some((before, base, alerted)), Some(c)) = (stored, credits) {
        let from = if c.period != before.period {
            0
        } else {
            alerted
        };
        let limit = c.refill.map(|r| r.amount).or(base).unwrap_or(0);
        let used = limit.saturating_sub(c.remaining);
        let mut to = from;
        let mut client: Option<String> = None;
        for t in credits_crossed(limit, used, from) {
            to = t;
            if client.is_none() {
                client = tx
                    .prepare_cached("SELECT client_id FROM api_keys WHERE id = ?1")?
                    .query_row([key_id], |r| r.get(0))
                    .optional()?;
            }
            let Some(client_id) = client.as_deref() else {
                break;
            };
            events.push(
                Crossing {
                    of: Of::Credits {
                        key_id,
                        refill: c.refill,
                    },
                    client_id,
                    threshold: t,
                    limit,
                    used,
                }
                .event(now),
            );
        }
        if to != alerted {
            tx.prepare_cached("UPDATE key_credits SET alerted = ?2 WHERE key_id = ?1")?
                .execute(params![key_id, i64::from(to)])?;
        }
    }
    if !events.is_empty() {
        write_events(tx, &events)?;
    }
    Ok(())
}

/// Drops a client's quota counts (`?1`) of period length `?2` older than the period before
/// `?3`. (Counts of a period length the client's plan no longer has stay: two at most each,
/// read again if the plan comes back within them, as on Redis until they expire.)
const PRUNE_QUOTA_USE: &str = "DELETE FROM quota_use WHERE client_id = ?1 AND per = ?2 \
     AND period < ?3 - 1";

/// Writes one chunk of usage in one transaction.
fn write_usage(c: &mut Connection, usage: &[Usage]) -> StoreResult<()> {
    let tx = c.transaction().map_err(db)?;
    {
        let mut last = tx
            .prepare_cached(
                "UPDATE api_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?2) \
                 WHERE id = ?1",
            )
            .map_err(db)?;
        let mut count = tx
            .prepare_cached(
                "INSERT INTO key_usage (key_id, day, requests) SELECT ?1, ?2, ?3 \
                 WHERE EXISTS (SELECT 1 FROM api_keys WHERE id = ?1) \
                 ON CONFLICT (key_id, day) DO UPDATE SET requests = requests + excluded.requests",
            )
            .map_err(db)?;
        for u in usage {
            let id = u.key_id.to_string();
            last.execute(params![id, u.last_used_at]).map_err(db)?;
            count
                .execute(params![id, u.day, u.requests as i64])
                .map_err(db)?;
        }
    }
    tx.commit().map_err(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite's plan for `sql` on a migrated database (its `params` parameters all 0), its
    /// steps joined by "; ".
    fn query_plan(sql: &str, params: usize) -> String {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        st.query_map(rusqlite::params_from_iter(vec![0_i64; params]), |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .map(Result::unwrap)
        .collect::<Vec<_>>()
        .join("; ")
    }

    /// The outbox's minutely prune finds what it drops through an index, so its cost follows
    /// what it drops, not every event and attempt kept (`PRUNE_INDEXES`).
    #[test]
    fn a_prune_reads_only_what_it_drops() {
        let events = query_plan(super::super::sqlite_outbox::PRUNE_EVENTS, 2);
        assert!(
            events.contains("INDEX webhook_events_by_created_at (created_at<?)"),
            "{events}"
        );
        let attempts = query_plan(super::super::sqlite_outbox::PRUNE_ATTEMPTS, 1);
        assert!(
            attempts.contains("INDEX webhook_attempts_by_at (at<?)"),
            "{attempts}"
        );
    }

    /// A file one store holds is refused to another (in this process too) until that one is
    /// dropped with every clone, and the outbox it handed out (whose thread runs on after the
    /// store's clones are gone).
    #[test]
    fn one_store_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let first = SqliteStore::open(&path).unwrap();
        let clone = first.clone();
        let outbox = first.outbox().unwrap();
        drop(first);
        let Err(e) = SqliteStore::open(&path) else {
            panic!("opened twice")
        };
        assert!(
            e.to_string().contains("in use by another keygate process")
                && e.to_string().contains("l.db.lock"),
            "{e}"
        );
        drop(clone);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            SqliteStore::lock(&path).unwrap().is_none(),
            "the outbox's thread runs on"
        );
        drop(outbox);
        // Its threads end once they have seen the last sender go.
        let lock = (0..500)
            .find_map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                SqliteStore::lock(&path).unwrap()
            })
            .expect("let go within 5 s");
        let again = SqliteStore::open_locked(&path, lock).unwrap();
        assert!(SqliteStore::lock(&path).unwrap().is_none());
        drop(again);
    }

    /// A client's quota counts do not pile up: its first charge of a period drops its counts
    /// of that period length older than the period just ended, reading only that client's
    /// rows; deleting the client drops every count older than that, of every period length
    /// (the conformance tests show what stays readable).
    #[tokio::test]
    async fn quota_counts_are_pruned_per_client_and_go_with_the_client() {
        let plan = query_plan(PRUNE_QUOTA_USE, 3);
        assert!(
            plan.contains("USING PRIMARY KEY (client_id=? AND per=? AND period<?)"),
            "{plan}"
        );
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("q.db")).unwrap();
        let (k, _) = ApiKey::builder().client("c").build();
        store
            .insert_client(&crate::keys::testing::client("c"), &k)
            .await
            .unwrap();
        let (other, _) = ApiKey::builder().client("d").build();
        store
            .insert_client(&crate::keys::testing::client("d"), &other)
            .await
            .unwrap();
        let charge = |client: &'static str, per, day: i64| {
            let store = &store;
            let key_id = if client == "c" { k.id } else { other.id };
            async move {
                let quota = crate::keys::allowance::QuotaCharge {
                    client_id: client,
                    quota: crate::keys::allowance::Quota { requests: 100, per },
                };
                let c = Charge {
                    key_id,
                    cost: None,
                    quota: Some(quota),
                    now: day * 86_400_000 + 1_000,
                };
                assert_eq!(store.charge(&c).await.unwrap().refused, None);
            }
        };
        let rows = |client: &'static str| {
            let store = &store;
            async move {
                store
                    .run(move |c| {
                        let mut st = c
                            .prepare(
                                "SELECT per, period FROM quota_use WHERE client_id = ?1 \
                                 ORDER BY per, period",
                            )
                            .unwrap();
                        Ok(st
                            .query_map([client], |r| {
                                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                            })
                            .unwrap()
                            .collect::<rusqlite::Result<Vec<_>>>()
                            .unwrap())
                    })
                    .await
                    .unwrap()
            }
        };
        let d = 20_000;
        charge("d", Period::Day, d - 5).await;
        charge("c", Period::Hour, d - 5).await;
        charge("c", Period::Day, d - 5).await;
        charge("c", Period::Day, d - 3).await;
        charge("c", Period::Day, d - 1).await;
        let hour = ("hour".to_owned(), (d - 5) * 24);
        assert_eq!(rows("c").await, [("day".to_owned(), d - 1), hour.clone()]);
        charge("c", Period::Day, d).await;
        charge("c", Period::Day, d).await;
        assert_eq!(
            rows("c").await,
            [("day".to_owned(), d - 1), ("day".to_owned(), d), hour]
        );
        assert_eq!(store.quota_used("c", Period::Day, d).await.unwrap(), 2);
        assert_eq!(
            rows("d").await,
            [("day".to_owned(), d - 5)],
            "another client's"
        );
        // Deleted, the client keeps what can still be read (this period and the one before):
        // nothing here, as the test's days are long past.
        store.delete_client("c").await.unwrap().unwrap();
        assert_eq!(rows("c").await, []);
        assert_eq!(rows("d").await.len(), 1);
    }

    /// The hourly `key.expiring` check finds the keys in its window through the expiry index,
    /// not by reading every key (`EXPIRY_INDEX`).
    #[test]
    fn the_expiry_check_reads_only_keys_that_can_expire() {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k WHERE {}",
            super::super::sqlite_outbox::EXPIRING_KEYS
        );
        let plan = query_plan(&sql, 2);
        assert!(
            plan.contains("INDEX api_keys_by_expiry (expires_at>? AND expires_at<?)"),
            "{plan}"
        );
    }

    /// The prune's statements drop what is past the horizon and fanned out, and keep an old
    /// event a delivery still waits for, a recent one and one not fanned out yet.
    #[test]
    fn a_prune_drops_only_old_settled_rows() {
        use super::super::sqlite_outbox::{PRUNE_ATTEMPTS, PRUNE_EVENTS};
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let (old, horizon, recent) = (1_000_i64, 5_000_i64, 9_000_i64);
        // seq 1 old and delivered, 2 old with a pending delivery, 3 recent, 4 old but past
        // the fan-out cursor (3).
        for (id, at) in [("e1", old), ("e2", old), ("e3", recent), ("e4", old)] {
            conn.execute(
                "INSERT INTO webhook_events (id, type, ordering_key, created_at, body) \
                 VALUES (?1, 'key.created', 'k', ?2, '{}')",
                params![id, at],
            )
            .unwrap();
        }
        for (seq, state) in [(1, "delivered"), (2, "pending")] {
            conn.execute(
                "INSERT INTO webhook_deliveries (event_seq, webhook_id, ordering_key, state, \
                 attempts, next_at, updated_at) VALUES (?1, 'w', 'k', ?2, 1, 0, 0)",
                params![seq, state],
            )
            .unwrap();
        }
        for (event, at) in [("e1", old), ("e3", recent)] {
            conn.execute(
                "INSERT INTO webhook_attempts (webhook_id, event_id, event_type, attempt, at, \
                 outcome) VALUES ('w', ?1, 'key.created', 1, ?2, 'delivered')",
                params![event, at],
            )
            .unwrap();
        }
        conn.execute(PRUNE_EVENTS, params![3, horizon]).unwrap();
        conn.execute(PRUNE_ATTEMPTS, [horizon]).unwrap();
        let ids = |sql: &str| -> Vec<String> {
            let mut st = conn.prepare(sql).unwrap();
            st.query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert_eq!(
            ids("SELECT id FROM webhook_events ORDER BY seq"),
            ["e2", "e3", "e4"]
        );
        assert_eq!(ids("SELECT event_id FROM webhook_attempts"), ["e3"]);
    }

    /// Holds the store's main connection from another thread for `secs` seconds (standing in
    /// for a long admin call or lookup); answers once it is held.
    fn hold_main_connection(store: &SqliteStore, secs: u64) -> std::thread::JoinHandle<()> {
        let main = Arc::clone(&store.conn);
        let (held, holding) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let _guard = main.lock().unwrap();
            held.send(()).unwrap();
            std::thread::sleep(std::time::Duration::from_secs(secs));
        });
        holding.recv().unwrap();
        holder
    }

    /// The nice values of this process's threads named `name`, from `/proc`.
    #[cfg(target_os = "linux")]
    fn nice_of_threads(name: &str) -> Vec<i64> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| {
                let dir = t.ok()?.path();
                let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
                (comm.trim_end() == name).then_some(())?;
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                // Field 19 is the nice value; fields are counted after the command's ')'.
                let rest = &stat[stat.rfind(')')? + 2..];
                rest.split(' ').nth(16)?.parse().ok()
            })
            .collect()
    }

    /// Background refreshes: a batch answers what one lookup per hash answers (current hash,
    /// previous hash only within its grace, unknown), in order, on a thread of lowered priority
    /// with a connection of its own (it does not wait for the main connection).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn batched_lookups_answer_as_single_ones_on_a_thread_and_connection_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        let (a, ka) = ApiKey::builder().client("c").build();
        let (b, kb) = ApiKey::builder().client("c").build();
        store
            .insert_client(&crate::keys::testing::client("c"), &a)
            .await
            .unwrap();
        store.insert_key(&b, 0).await.unwrap();
        let b_new = KeyHash::of("kg_the_new_secret");
        store
            .rotate_key(
                b.id,
                &Rotation {
                    key_hash: b_new,
                    prefix: "kg_the".into(),
                    previous_valid_until: Some(now_millis() + 60_000),
                    at: now_millis(),
                },
            )
            .await
            .unwrap()
            .unwrap();
        let hashes = [ka.hash, kb.hash, b_new, KeyHash::of("kg_unknown")];
        for now in [now_millis(), now_millis() + 120_000] {
            let mut one_by_one = Vec::new();
            for h in &hashes {
                one_by_one.push(store.find_by_hash(h, now).await.unwrap());
            }
            let holder = hold_main_connection(&store, 2);
            let batch = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                store.find_many_by_hash(&hashes, now),
            )
            .await
            .expect("the batch waited for the main connection")
            .unwrap();
            holder.join().unwrap();
            let ids = |v: &[Option<KeyRecord>]| {
                v.iter()
                    .map(|r| r.as_ref().map(|r| (r.key.id, r.license.clone())))
                    .collect::<Vec<_>>()
            };
            assert_eq!(ids(&batch), ids(&one_by_one));
            assert_eq!(batch[0].as_ref().unwrap().key.id, a.id);
            assert_eq!(batch[2].as_ref().unwrap().key.id, b.id);
            assert!(batch[3].is_none());
            // The previous hash within its grace, then not.
            assert_eq!(batch[1].is_some(), now < now_millis() + 60_000);
        }
        let nice = nice_of_threads("keygate-refresh");
        assert!(!nice.is_empty(), "no refresh thread");
        assert!(nice.iter().all(|n| *n == REFRESH_NICE as i64), "{nice:?}");
    }

    /// The event outbox works on a thread of lowered priority with a connection of its own:
    /// a claim does not wait for the main connection.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_outbox_works_on_a_thread_and_connection_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("e.db")).unwrap();
        let (key, _) = ApiKey::builder().client("c").build();
        store
            .insert_client(&crate::keys::testing::client("c"), &key)
            .await
            .unwrap();
        let outbox = store.outbox().unwrap();
        let holder = hold_main_connection(&store, 2);
        let subs = [outbox::Subscription {
            webhook_id: "w".into(),
            events: vec!["*".into()],
            room: 10,
            stored: false,
        }];
        let claimed = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            outbox.claim(&subs, now_millis(), 30_000, 10),
        )
        .await
        .expect("the claim waited for the main connection")
        .unwrap();
        holder.join().unwrap();
        // The client's and its key's creation, fanned out to the webhook that wants every event.
        assert_eq!(claimed.len(), 2, "{claimed:?}");
        assert!(claimed.iter().all(|c| c.webhook_id == "w"));
        let nice = nice_of_threads("keygate-events");
        assert!(!nice.is_empty(), "no outbox thread");
        assert!(nice.iter().all(|n| *n == EVENTS_NICE as i64), "{nice:?}");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn usage_is_written_by_a_thread_of_lowest_priority_on_its_own_connection() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("u.db")).unwrap();
        let (key, _) = ApiKey::builder().client("c").build();
        store
            .insert_client(&crate::keys::testing::client("c"), &key)
            .await
            .unwrap();
        let usage = Usage {
            key_id: key.id,
            last_used_at: 1_000,
            day: 0,
            requests: 3,
        };
        // Its own connection: a chunk is written while the main connection is held (by a
        // thread standing in for a long admin call or lookup); on the main connection it would
        // wait for the whole hold.
        let holder = hold_main_connection(&store, 3);
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            store.record_usage(UsageWrite::random(), &[usage]),
        )
        .await
        .expect("the chunk waited for the main connection")
        .unwrap();
        holder.join().unwrap();
        let checkpoint: i64 = run_there(&store.usage, |c| {
            c.pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
                .map_err(db)
        })
        .await
        .unwrap();
        assert_eq!(checkpoint, USAGE_CHECKPOINT_PAGES);
        let nice = nice_of_threads("keygate-usage");
        assert!(!nice.is_empty(), "no usage writer thread");
        assert!(nice.iter().all(|n| *n == 19), "{nice:?}");
        // The flush's synchronous=NORMAL is its connection's own: admin writes keep FULL.
        let sync: i64 = store
            .conn
            .lock()
            .unwrap()
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "the main connection stays synchronous=FULL");
        assert_eq!(store.usage(key.id, 0, 0).await.unwrap(), vec![(0, 3)]);
        let found = store.find_by_id(key.id).await.unwrap().unwrap();
        assert_eq!(found.key.last_used_at, Some(1_000));
    }

    #[tokio::test]
    async fn keys_stored_before_setters_and_token_generations_are_read_safely() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // A database as the first two migrations left it, with one disabled key that
            // expires, has its own rate limit and was rotated.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(MIGRATIONS[1]).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute(
                "INSERT INTO clients (client_id, license, created_at) VALUES ('c', 'pro', 1)",
                [],
            )
            .unwrap();
            for (id, enabled, expires, limit) in [
                (
                    "0190e0f2-0000-7000-8000-000000000001",
                    0,
                    Some(5),
                    Some("{\"per_second\":1,\"burst\":1}"),
                ),
                ("0190e0f2-0000-7000-8000-000000000002", 1, None, None),
            ] {
                conn.execute(
                    "INSERT INTO api_keys (id, client_id, name, prefix, key_hash, permissions, \
                     enabled, created_at, updated_at, expires_at, rate_limit, rotated_at) \
                     VALUES (?1, 'c', 'n', 'kg_x', ?2, '[]', ?3, 1, 1, ?4, ?5, ?4)",
                    params![id, KeyHash::of(id).0.to_vec(), enabled, expires, limit],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        let page = store.list_keys(Some("c"), 1, 10).await.unwrap();
        let [old, plain] = page.items.as_slice() else {
            panic!("{page:?}")
        };
        assert_eq!(
            (old.disabled_by, old.expires_set_by, old.rate_limit_set_by),
            (Some(SetBy::Admin), Some(SetBy::Admin), Some(SetBy::Admin))
        );
        assert_eq!(
            (
                plain.disabled_by,
                plain.expires_set_by,
                plain.rate_limit_set_by
            ),
            (None, None, None)
        );
        // Tokens minted before carry the key's rotated_at as their generation: they still
        // work after the upgrade.
        assert_eq!(
            (old.tokens_valid_after, plain.tokens_valid_after),
            (Some(5), None)
        );
    }
}
