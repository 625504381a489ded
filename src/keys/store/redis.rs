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
//! | `P invalidate` | pub/sub channel | one message per write (see below) |
//!
//! Listings page through the sorted sets (`ZRANGE` by rank); nothing ever runs `KEYS` or `SCAN`.
//! Equal scores order by member bytes, which matches SQLite's `ORDER BY created_at, id`.
//!
//! # Atomicity and invalidation
//! Every call is one round trip: a Lua script (executed atomically by Redis, written to the AOF
//! as one MULTI/EXEC block), or a single command for `get_client` and `ping`. Write scripts check every precondition (client exists, key
//! limit, unused id and hashes) before their first write, so a refused write changes nothing,
//! and they publish one invalidation message naming the key ids and every hash (old and new,
//! current and previous) they touched: `{"t": <ms>, "ids": [..], "hashes": [<hex>..]}`, where
//! `t` is the writer's clock when it sent the write (for measuring propagation lag).
//!
//! # Failure
//! Every call is bounded by [`CALL_TIMEOUT`]; a dead or hung Redis turns into
//! [`StoreError::Unavailable`] within it. The command connection is a redis-rs
//! `ConnectionManager` that reconnects in the background; the invalidation subscription has its
//! own connection and task, which reconnects with backoff and clears the local cache after every
//! (re)subscription, since messages may have been missed while it was down.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{ConnectionInfo, IntoConnectionInfo, RedisError, Script, Value};
use async_trait::async_trait;
use futures_util::StreamExt;
use uuid::Uuid;

use super::{ClientWithKeys, Conflict, Page, Store, StoreError, StoreResult, Usage};
use crate::keys::cache::{Invalidation, InvalidationSink};
use crate::keys::{ApiKey, Client, KeyHash, KeyRecord, Millis, RateLimit, now_millis};

/// Longest a store call may take, including waiting for a reconnection, before it fails with
/// [`StoreError::Unavailable`].
pub const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The prefix used when the configuration names none.
pub const DEFAULT_PREFIX: &str = "keygate:";
/// How often the subscription connection is pinged to detect a silently dead connection.
const SUBSCRIPTION_PING: Duration = Duration::from_secs(5);
/// Reconnection backoff of the subscription: doubles from the first value up to the second.
const RESUBSCRIBE_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(50), Duration::from_secs(1));

/// Parses a store URL into what the redis client needs. `redis://HOST:PORT/DB` and
/// `redis+unix:///path.sock` (`?db=N`, `?pass=…`) are supported; `rediss://` is refused because
/// this build has no TLS client for Redis. Errors never repeat the URL (it may hold a password).
pub fn parse_url(url: &str) -> Result<ConnectionInfo, String> {
    if url.starts_with("rediss://") {
        return Err(
            "rediss:// (Redis over TLS) is not supported by this build; use redis:// on a \
             private network, or a TLS tunnel (e.g. stunnel) to a local redis:// address"
                .into(),
        );
    }
    if !(url.starts_with("redis://") || url.starts_with("redis+unix://")) {
        return Err("a Redis store URL starts with redis:// or redis+unix://".into());
    }
    url.into_connection_info()
        .map_err(|e| format!("not a usable Redis URL ({e}); e.g. redis://127.0.0.1:6379/0"))
}

/// Where a connection goes, for logs: address and database, never credentials.
fn describe(info: &ConnectionInfo) -> String {
    format!("{} (db {})", info.addr(), info.redis_settings().db())
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis {what}: {e}"))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Unavailable(format!("redis: malformed {what} record"))
}

#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: ::redis::Client,
    conn: ConnectionManager,
    prefix: String,
    target: String,
    /// Dropped with the store: background tasks watch it and stop.
    alive: tokio::sync::watch::Sender<()>,
    /// State of the invalidation subscription (`SUB_*`).
    subscription: Arc<AtomicU8>,
}

/// No subscription was asked for (a store used alone).
const SUB_NONE: u8 = 0;
/// Subscribed, and the local cache was cleared after subscribing.
const SUB_UP: u8 = 1;
/// Asked for, but not (yet, or no longer) subscribed: invalidations may be missed.
const SUB_DOWN: u8 = 2;

impl RedisStore {
    /// Prepares a store for `url` whose keys live under `prefix`. Does not wait for Redis: when
    /// it is unreachable, calls fail with [`StoreError::Unavailable`] until it answers, and a
    /// background check logs the persistence settings once it does.
    pub fn open(url: &str, prefix: &str) -> StoreResult<Self> {
        let info = parse_url(url).map_err(StoreError::Unavailable)?;
        let target = describe(&info);
        let client = ::redis::Client::open(info).map_err(|e| unavailable("client", e))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            // One short retry per reconnection: a call made while Redis is down waits for that
            // attempt (tens of ms), then fails; the next call starts a new attempt. So calls
            // fail fast, connection attempts stay a few dozen per second at most, and a Redis
            // that comes back is found by the next call.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(25))
            .set_max_delay(Duration::from_millis(100));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| unavailable("connection", e))?;
        let (alive, _) = tokio::sync::watch::channel(());
        let store = Self {
            inner: Arc::new(Inner {
                client,
                conn,
                prefix: prefix.to_owned(),
                target,
                alive,
                subscription: Arc::new(AtomicU8::new(SUB_NONE)),
            }),
        };
        tracing::info!(redis = %store.inner.target, prefix = %store.inner.prefix, "using the Redis store");
        store.spawn_persistence_check();
        Ok(store)
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
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
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(what, e)),
            Err(_) => Err(unavailable(
                what,
                format_args!("no answer within {} ms", CALL_TIMEOUT.as_millis()),
            )),
        }
    }

    /// Runs one script with `args` (the prefix is prepended).
    async fn script(&self, what: &str, script: &Script, args: Args) -> StoreResult<Value> {
        let mut inv = script.prepare_invoke();
        inv.arg(self.prefix());
        for a in args.0 {
            inv.arg(a);
        }
        let mut conn = self.conn();
        self.bounded(
            what,
            async move { inv.invoke_async::<Value>(&mut conn).await },
        )
        .await
    }

    /// Reads `CONFIG GET appendonly / appendfsync / maxmemory-policy` once Redis answers and
    /// warns when acknowledged admin writes could be lost by a Redis restart or evicted.
    fn spawn_persistence_check(&self) {
        let mut conn = self.conn();
        let target = self.inner.target.clone();
        let mut stopped = self.inner.alive.subscribe();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
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
                    _ => {}
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
    conn: &mut ConnectionManager,
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

/// The warning to log for this `maxmemory-policy`, if any: keygate's Redis keys have no TTL, so
/// only the `allkeys-*` policies can evict them.
pub fn eviction_warning(policy: Option<&str>) -> Option<String> {
    let policy = policy?;
    policy.starts_with("allkeys-").then(|| {
        format!(
            "Redis has maxmemory-policy {policy}: under memory pressure it may evict API keys and \
             clients (they would stop working); use noeviction (or a volatile-* policy)"
        )
    })
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// Script arguments after the prefix.
#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn push(&mut self, v: impl ToString) -> &mut Self {
        self.0.push(v.to_string());
        self
    }

    /// A key as the scripts read it (`read_key` in the Lua prelude): id, client_id,
    /// created_at, key_hash, previous_hash ('' = none), then a count and the mutable fields.
    fn key(&mut self, k: &ApiKey) -> &mut Self {
        self.push(k.id)
            .push(&k.client_id)
            .push(k.created_at)
            .push(hex::encode(k.key_hash.0))
            .push(
                k.previous_hash
                    .map(|h| hex::encode(h.0))
                    .unwrap_or_default(),
            );
        let fields = key_fields(k);
        self.push(fields.len() * 2);
        for (name, value) in fields {
            self.push(name).push(value);
        }
        self
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serializable")
}

/// The fields of a key that `update_key` may replace; absent optional values are left out.
fn key_fields(k: &ApiKey) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("name", k.name.clone()),
        ("prefix", k.prefix.clone()),
        ("key_hash", hex::encode(k.key_hash.0)),
        ("permissions", json(&k.permissions)),
        ("enabled", if k.enabled { "1" } else { "0" }.to_owned()),
        ("updated_at", k.updated_at.to_string()),
    ];
    let mut opt = |name, v: Option<String>| {
        if let Some(v) = v {
            f.push((name, v));
        }
    };
    opt("previous_hash", k.previous_hash.map(|h| hex::encode(h.0)));
    opt(
        "previous_valid_until",
        k.previous_valid_until.map(|v| v.to_string()),
    );
    opt("expires_at", k.expires_at.map(|v| v.to_string()));
    opt("last_used_at", k.last_used_at.map(|v| v.to_string()));
    opt("rotated_at", k.rotated_at.map(|v| v.to_string()));
    opt("rate_limit", k.rate_limit.as_ref().map(json));
    opt("metadata", k.metadata.as_ref().map(json));
    f
}

fn client_fields(c: &Client) -> Vec<String> {
    let mut f = vec![
        "client_id".into(),
        c.client_id.clone(),
        "license".into(),
        c.license.clone(),
        "created_at".into(),
        c.created_at.to_string(),
    ];
    if let Some(m) = &c.metadata {
        f.push("metadata".into());
        f.push(json(m));
    }
    f
}

/// A flat `HGETALL` answer as a map.
fn fields(v: &Value) -> Option<HashMap<String, String>> {
    let Value::Array(items) = v else {
        return match v {
            Value::Map(m) => m
                .iter()
                .map(|(k, v)| Some((text(k)?, text(v)?)))
                .collect::<Option<HashMap<_, _>>>(),
            _ => None,
        };
    };
    items
        .chunks(2)
        .map(|pair| match pair {
            [k, v] => Some((text(k)?, text(v)?)),
            _ => None,
        })
        .collect()
}

fn parse_hash(s: &str) -> Option<KeyHash> {
    let b = hex::decode(s).ok()?;
    Some(KeyHash(<[u8; 32]>::try_from(b.as_slice()).ok()?))
}

fn key_from(v: &Value) -> StoreResult<ApiKey> {
    let f = fields(v).ok_or_else(|| corrupt("key"))?;
    let get = |name: &str| f.get(name).map(String::as_str);
    let req = |name: &str| get(name).ok_or_else(|| corrupt("key"));
    let int = |name: &str| -> StoreResult<Option<Millis>> {
        get(name)
            .map(|s| s.parse::<Millis>().map_err(|_| corrupt("key")))
            .transpose()
    };
    let json_opt = |name: &str| -> StoreResult<Option<serde_json::Value>> {
        get(name)
            .map(|s| serde_json::from_str(s).map_err(|_| corrupt("key")))
            .transpose()
    };
    Ok(ApiKey {
        id: Uuid::parse_str(req("id")?).map_err(|_| corrupt("key"))?,
        client_id: req("client_id")?.to_owned(),
        name: req("name")?.to_owned(),
        prefix: req("prefix")?.to_owned(),
        key_hash: parse_hash(req("key_hash")?).ok_or_else(|| corrupt("key"))?,
        previous_hash: get("previous_hash")
            .map(|s| parse_hash(s).ok_or_else(|| corrupt("key")))
            .transpose()?,
        previous_valid_until: int("previous_valid_until")?,
        permissions: serde_json::from_str(req("permissions")?).map_err(|_| corrupt("key"))?,
        enabled: req("enabled")? == "1",
        created_at: int("created_at")?.ok_or_else(|| corrupt("key"))?,
        updated_at: int("updated_at")?.ok_or_else(|| corrupt("key"))?,
        expires_at: int("expires_at")?,
        last_used_at: int("last_used_at")?,
        rotated_at: int("rotated_at")?,
        rate_limit: get("rate_limit")
            .map(|s| serde_json::from_str::<RateLimit>(s).map_err(|_| corrupt("key")))
            .transpose()?,
        metadata: json_opt("metadata")?,
    })
}

fn client_from(v: &Value) -> StoreResult<Client> {
    let f = fields(v).ok_or_else(|| corrupt("client"))?;
    let req = |name: &str| f.get(name).cloned().ok_or_else(|| corrupt("client"));
    Ok(Client {
        client_id: req("client_id")?,
        license: req("license")?,
        created_at: req("created_at")?.parse().map_err(|_| corrupt("client"))?,
        metadata: f
            .get("metadata")
            .map(|s| serde_json::from_str(s).map_err(|_| corrupt("client")))
            .transpose()?,
    })
}

fn array(v: Value) -> StoreResult<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        _ => Err(corrupt("reply")),
    }
}

fn int(v: &Value) -> StoreResult<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        _ => Err(corrupt("reply")),
    }
}

/// `{license, key fields}` or nil, as answered by the lookup scripts.
fn record_from(v: Value) -> StoreResult<Option<KeyRecord>> {
    if v == Value::Nil {
        return Ok(None);
    }
    let a = array(v)?;
    let [license, key] = a.as_slice() else {
        return Err(corrupt("lookup"));
    };
    Ok(Some(KeyRecord {
        license: text(license).ok_or_else(|| corrupt("lookup"))?,
        key: key_from(key)?,
    }))
}

/// `{total, item, item…}` as answered by the listing scripts.
fn page_from<T>(v: Value, item: impl Fn(&Value) -> StoreResult<T>) -> StoreResult<Page<T>> {
    let a = array(v)?;
    let (total, items) = a.split_first().ok_or_else(|| corrupt("listing"))?;
    Ok(Page {
        total: int(total)?.max(0) as u64,
        items: items.iter().map(item).collect::<StoreResult<_>>()?,
    })
}

/// Maps a write script's status code.
fn status(code: i64) -> StoreResult<bool> {
    match code {
        1 => Ok(true),
        0 => Ok(false),
        CODE_CLIENT_EXISTS => Err(StoreError::Conflict(Conflict::ClientExists)),
        CODE_IN_USE => Err(StoreError::Unavailable(
            "redis: the key id or key hash is already in use".into(),
        )),
        _ => Err(corrupt("status")),
    }
}

const CODE_TOO_MANY: i64 = -1;
const CODE_CLIENT_EXISTS: i64 = -2;
const CODE_IN_USE: i64 = -3;

fn page_range(page: u32, per_page: u32) -> (i64, i64) {
    let per = i64::from(per_page.max(1));
    let start = (i64::from(page.max(1)) - 1) * per;
    (start, start + per - 1)
}

/// Shared by every script: key names, reading a key from ARGV, index maintenance, publishing.
const PRELUDE: &str = r#"
local P = ARGV[1]
local function kkey(id) return P .. 'key:' .. id end
local function ukey(id) return P .. 'usage:' .. id end
local function hkey(h) return P .. 'h:' .. h end
local function ckey(c) return P .. 'client:' .. c end
local function ckeys(c) return P .. 'client_keys:' .. c end
local ALL_KEYS = P .. 'keys'
local ALL_CLIENTS = P .. 'clients'

local function append(t, items) for _, v in ipairs(items) do t[#t + 1] = v end return t end

-- The current and previous hash of a stored key.
local function hashes_of(id)
  local v = redis.call('HMGET', kkey(id), 'key_hash', 'previous_hash')
  local out = {}
  if v[1] then out[#out + 1] = v[1] end
  if v[2] then out[#out + 1] = v[2] end
  return out
end

-- A key sent by the gateway at ARGV[i]: id, client_id, created_at, key_hash, previous_hash
-- ('' = none), n, then n strings of field/value pairs. Returns it and the next index.
local function read_key(i)
  local k = {id = ARGV[i], client = ARGV[i + 1], created = ARGV[i + 2], h = ARGV[i + 3],
             ph = ARGV[i + 4], fields = {}}
  local n = tonumber(ARGV[i + 5])
  for j = 1, n do k.fields[j] = ARGV[i + 5 + j] end
  return k, i + 6 + n
end

local function key_hashes(k)
  local out = {k.h}
  if k.ph ~= '' then out[2] = k.ph end
  return out
end

-- -3 when the new key's id or one of its hashes is taken; checked before any write.
local function check_new(k)
  if redis.call('EXISTS', kkey(k.id)) == 1 then return -3 end
  for _, h in ipairs(key_hashes(k)) do
    if redis.call('EXISTS', hkey(h)) == 1 then return -3 end
  end
  return nil
end

local function insert_key(k)
  redis.call('HSET', kkey(k.id), 'id', k.id, 'client_id', k.client, 'created_at', k.created,
             unpack(k.fields))
  for _, h in ipairs(key_hashes(k)) do redis.call('SET', hkey(h), k.id) end
  redis.call('ZADD', ckeys(k.client), k.created, k.id)
  redis.call('ZADD', ALL_KEYS, k.created, k.id)
end

local function remove_key(id, client)
  for _, h in ipairs(hashes_of(id)) do
    if redis.call('GET', hkey(h)) == id then redis.call('DEL', hkey(h)) end
  end
  redis.call('DEL', kkey(id))
  redis.call('DEL', ukey(id))
  redis.call('ZREM', ckeys(client), id)
  redis.call('ZREM', ALL_KEYS, id)
end

local function quoted(items)
  if #items == 0 then return '' end
  return '"' .. table.concat(items, '","') .. '"'
end

-- One invalidation message: the writer's timestamp, key ids and hashes (hex).
local function publish(t, ids, hashes)
  redis.call('PUBLISH', P .. 'invalidate',
    '{"t":' .. t .. ',"ids":[' .. quoted(ids) .. '],"hashes":[' .. quoted(hashes) .. ']}')
end

local function record(id)
  local rec = redis.call('HGETALL', kkey(id))
  if #rec == 0 then return nil end
  local client = redis.call('HGET', kkey(id), 'client_id')
  local license = redis.call('HGET', ckey(client), 'license')
  if not license then return nil end
  return {license, rec}
end
"#;

/// ARGV: P, hash hex, now. The key whose current hash, or previous hash within its grace
/// period, is the given one, with its client's license.
const FIND_BY_HASH: &str = r#"
local h = ARGV[2]
local id = redis.call('GET', hkey(h))
if not id then return nil end
local v = redis.call('HMGET', kkey(id), 'key_hash', 'previous_hash', 'previous_valid_until')
if v[1] ~= h then
  if v[2] ~= h or not v[3] or tonumber(v[3]) <= tonumber(ARGV[3]) then return nil end
end
return record(id)
"#;

/// ARGV: P, id.
const FIND_BY_ID: &str = r#"
return record(ARGV[2])
"#;

/// ARGV: P, client_id ('' = all), first rank, last rank.
const LIST_KEYS: &str = r#"
local idx = ALL_KEYS
if ARGV[2] ~= '' then idx = ckeys(ARGV[2]) end
local out = {redis.call('ZCARD', idx)}
for _, id in ipairs(redis.call('ZRANGE', idx, ARGV[3], ARGV[4])) do
  out[#out + 1] = redis.call('HGETALL', kkey(id))
end
return out
"#;

/// ARGV: P, t, max keys (0 = unlimited), key.
const INSERT_KEY: &str = r#"
local k = read_key(4)
if redis.call('EXISTS', ckey(k.client)) == 0 then return 0 end
local max = tonumber(ARGV[3])
if max > 0 and redis.call('ZCARD', ckeys(k.client)) >= max then return -1 end
local taken = check_new(k)
if taken then return taken end
insert_key(k)
publish(ARGV[2], {k.id}, key_hashes(k))
return 1
"#;

/// ARGV: P, t, key. Replaces every field but id, client_id and created_at.
const UPDATE_KEY: &str = r#"
local k = read_key(3)
local old = redis.call('HMGET', kkey(k.id), 'client_id', 'created_at', 'last_used_at')
if not old[1] then return 0 end
for _, h in ipairs(key_hashes(k)) do
  local owner = redis.call('GET', hkey(h))
  if owner and owner ~= k.id then return -3 end
end
local old_hashes = hashes_of(k.id)
for _, h in ipairs(old_hashes) do
  if h ~= k.h and h ~= k.ph then redis.call('DEL', hkey(h)) end
end
redis.call('DEL', kkey(k.id))
redis.call('HSET', kkey(k.id), 'id', k.id, 'client_id', old[1], 'created_at', old[2],
           unpack(k.fields))
-- last_used_at only moves forward: a usage flush between the caller's read and this write
-- is kept.
if old[3] then
  local cur = redis.call('HGET', kkey(k.id), 'last_used_at')
  if not cur or tonumber(cur) < tonumber(old[3]) then
    redis.call('HSET', kkey(k.id), 'last_used_at', old[3])
  end
end
for _, h in ipairs(key_hashes(k)) do redis.call('SET', hkey(h), k.id) end
publish(ARGV[2], {k.id}, append(old_hashes, key_hashes(k)))
return 1
"#;

/// ARGV: P, t, id. Answers the deleted key's fields, or nil.
const DELETE_KEY: &str = r#"
local id = ARGV[3]
local rec = redis.call('HGETALL', kkey(id))
if #rec == 0 then return nil end
local hashes = hashes_of(id)
remove_key(id, redis.call('HGET', kkey(id), 'client_id'))
publish(ARGV[2], {id}, hashes)
return rec
"#;

/// ARGV: P, t, client_id, created_at, n, n client field/value strings, first key.
const INSERT_CLIENT: &str = r#"
local cid = ARGV[3]
local n = tonumber(ARGV[5])
if redis.call('EXISTS', ckey(cid)) == 1 then return -2 end
local k = read_key(6 + n)
local taken = check_new(k)
if taken then return taken end
local cf = {}
for j = 1, n do cf[j] = ARGV[5 + j] end
redis.call('HSET', ckey(cid), unpack(cf))
redis.call('ZADD', ALL_CLIENTS, ARGV[4], cid)
insert_key(k)
publish(ARGV[2], {k.id}, key_hashes(k))
return 1
"#;

/// ARGV: P, first rank, last rank.
const LIST_CLIENTS: &str = r#"
local out = {redis.call('ZCARD', ALL_CLIENTS)}
for _, id in ipairs(redis.call('ZRANGE', ALL_CLIENTS, ARGV[2], ARGV[3])) do
  out[#out + 1] = redis.call('HGETALL', ckey(id))
end
return out
"#;

/// ARGV: P, t, client_id, license, has metadata ('1'/'0'), metadata.
/// Every cached principal of the client carries its license: all its keys are invalidated.
const UPDATE_CLIENT: &str = r#"
local cid = ARGV[3]
if redis.call('EXISTS', ckey(cid)) == 0 then return 0 end
redis.call('HSET', ckey(cid), 'license', ARGV[4])
if ARGV[5] == '1' then
  redis.call('HSET', ckey(cid), 'metadata', ARGV[6])
else
  redis.call('HDEL', ckey(cid), 'metadata')
end
local ids = redis.call('ZRANGE', ckeys(cid), 0, -1)
local hashes = {}
for _, id in ipairs(ids) do append(hashes, hashes_of(id)) end
publish(ARGV[2], ids, hashes)
return 1
"#;

/// ARGV: P, t, client_id. Answers {client fields, {key fields…}} or nil.
const DELETE_CLIENT: &str = r#"
local cid = ARGV[3]
local c = redis.call('HGETALL', ckey(cid))
if #c == 0 then return nil end
local ids = redis.call('ZRANGE', ckeys(cid), 0, -1)
local keys, hashes = {}, {}
for _, id in ipairs(ids) do
  keys[#keys + 1] = redis.call('HGETALL', kkey(id))
  append(hashes, hashes_of(id))
  remove_key(id, cid)
end
redis.call('DEL', ckey(cid), ckeys(cid))
redis.call('ZREM', ALL_CLIENTS, cid)
publish(ARGV[2], ids, hashes)
return {c, keys}
"#;

/// ARGV: P, t, client_id, disable only ('1'/'0'), has new key ('1'/'0'), new key.
/// Answers {status} or {1, {key fields before…}}.
const REPLACE_CLIENT_KEYS: &str = r#"
local cid = ARGV[3]
if redis.call('EXISTS', ckey(cid)) == 0 then return {0} end
local k = nil
if ARGV[5] == '1' then
  k = read_key(6)
  local taken = check_new(k)
  if taken then return {taken} end
end
local ids = redis.call('ZRANGE', ckeys(cid), 0, -1)
local before, hashes = {}, {}
for _, id in ipairs(ids) do
  before[#before + 1] = redis.call('HGETALL', kkey(id))
  append(hashes, hashes_of(id))
end
for _, id in ipairs(ids) do
  if ARGV[4] == '1' then
    redis.call('HSET', kkey(id), 'enabled', '0', 'updated_at', ARGV[2])
  else
    remove_key(id, cid)
  end
end
if k then
  insert_key(k)
  ids[#ids + 1] = k.id
  append(hashes, key_hashes(k))
end
publish(ARGV[2], ids, hashes)
return {1, before}
"#;

/// ARGV: P, then id/time pairs. Keeps the latest time; unknown ids are skipped.
const RECORD_LAST_USED: &str = r#"
for i = 2, #ARGV, 2 do
  local key = kkey(ARGV[i])
  if redis.call('EXISTS', key) == 1 then
    local cur = redis.call('HGET', key, 'last_used_at')
    if not cur or tonumber(cur) < tonumber(ARGV[i + 1]) then
      redis.call('HSET', key, 'last_used_at', ARGV[i + 1])
    end
  end
end
return 1
"#;

/// ARGV: P, then id/time/day/count quadruples. Raises last_used_at, adds to the day's count;
/// unknown ids are skipped.
const RECORD_USAGE: &str = r#"
for i = 2, #ARGV, 4 do
  local key = kkey(ARGV[i])
  if redis.call('EXISTS', key) == 1 then
    local cur = redis.call('HGET', key, 'last_used_at')
    if not cur or tonumber(cur) < tonumber(ARGV[i + 1]) then
      redis.call('HSET', key, 'last_used_at', ARGV[i + 1])
    end
    redis.call('HINCRBY', ukey(ARGV[i]), ARGV[i + 2], ARGV[i + 3])
  end
end
return 1
"#;

/// ARGV: P, id, from day, to day. Returns day/count pairs in the range.
const USAGE: &str = r#"
local out = {}
local all = redis.call('HGETALL', ukey(ARGV[2]))
for i = 1, #all, 2 do
  local day = tonumber(all[i])
  if day >= tonumber(ARGV[3]) and day <= tonumber(ARGV[4]) then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
"#;

struct Scripts {
    find_by_hash: Script,
    find_by_id: Script,
    list_keys: Script,
    insert_key: Script,
    update_key: Script,
    delete_key: Script,
    insert_client: Script,
    list_clients: Script,
    update_client: Script,
    delete_client: Script,
    replace_client_keys: Script,
    record_last_used: Script,
    record_usage: Script,
    usage: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| {
        let s = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            find_by_hash: s(FIND_BY_HASH),
            find_by_id: s(FIND_BY_ID),
            list_keys: s(LIST_KEYS),
            insert_key: s(INSERT_KEY),
            update_key: s(UPDATE_KEY),
            delete_key: s(DELETE_KEY),
            insert_client: s(INSERT_CLIENT),
            list_clients: s(LIST_CLIENTS),
            update_client: s(UPDATE_CLIENT),
            delete_client: s(DELETE_CLIENT),
            replace_client_keys: s(REPLACE_CLIENT_KEYS),
            record_last_used: s(RECORD_LAST_USED),
            record_usage: s(RECORD_USAGE),
            usage: s(USAGE),
        }
    })
}

#[async_trait]
impl Store for RedisStore {
    async fn find_by_hash(&self, hash: &KeyHash, now: Millis) -> StoreResult<Option<KeyRecord>> {
        let mut a = Args::default();
        a.push(hex::encode(hash.0)).push(now);
        record_from(self.script("lookup", &scripts().find_by_hash, a).await?)
    }

    async fn find_by_id(&self, id: Uuid) -> StoreResult<Option<KeyRecord>> {
        let mut a = Args::default();
        a.push(id);
        record_from(self.script("lookup", &scripts().find_by_id, a).await?)
    }

    async fn list_keys(
        &self,
        client_id: Option<&str>,
        page: u32,
        per_page: u32,
    ) -> StoreResult<Page<ApiKey>> {
        let (first, last) = page_range(page, per_page);
        let mut a = Args::default();
        a.push(client_id.unwrap_or("")).push(first).push(last);
        page_from(
            self.script("list keys", &scripts().list_keys, a).await?,
            key_from,
        )
    }

    async fn insert_key(&self, key: &ApiKey, max_keys: u32) -> StoreResult<()> {
        let mut a = Args::default();
        a.push(now_millis()).push(max_keys).key(key);
        let v = self.script("insert key", &scripts().insert_key, a).await?;
        match int(&v)? {
            0 => Err(StoreError::NotFound),
            CODE_TOO_MANY => Err(StoreError::Conflict(Conflict::TooManyKeys {
                max: max_keys,
            })),
            code => status(code).map(|_| ()),
        }
    }

    async fn update_key(&self, key: &ApiKey) -> StoreResult<bool> {
        let mut a = Args::default();
        a.push(now_millis()).key(key);
        status(int(&self
            .script("update key", &scripts().update_key, a)
            .await?)?)
    }

    async fn delete_key(&self, id: Uuid) -> StoreResult<Option<ApiKey>> {
        let mut a = Args::default();
        a.push(now_millis()).push(id);
        match self.script("delete key", &scripts().delete_key, a).await? {
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
            .script("insert client", &scripts().insert_client, a)
            .await?;
        status(int(&v)?).map(|_| ())
    }

    async fn get_client(&self, client_id: &str) -> StoreResult<Option<Client>> {
        let mut conn = self.conn();
        let key = format!("{}client:{client_id}", self.prefix());
        let v = self
            .bounded("get client", async move {
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
            self.script("list clients", &scripts().list_clients, a)
                .await?,
            client_from,
        )
    }

    async fn update_client(&self, client: &Client) -> StoreResult<bool> {
        let mut a = Args::default();
        a.push(now_millis())
            .push(&client.client_id)
            .push(&client.license);
        match &client.metadata {
            Some(m) => a.push("1").push(json(m)),
            None => a.push("0").push(""),
        };
        status(int(&self
            .script("update client", &scripts().update_client, a)
            .await?)?)
    }

    async fn delete_client(&self, client_id: &str) -> StoreResult<Option<ClientWithKeys>> {
        let mut a = Args::default();
        a.push(now_millis()).push(client_id);
        let v = self
            .script("delete client", &scripts().delete_client, a)
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

    async fn replace_client_keys(
        &self,
        client_id: &str,
        disable_only: bool,
        new_key: Option<&ApiKey>,
    ) -> StoreResult<Vec<ApiKey>> {
        let mut a = Args::default();
        a.push(now_millis())
            .push(client_id)
            .push(if disable_only { "1" } else { "0" });
        match new_key {
            Some(k) => a.push("1").key(k),
            None => a.push("0"),
        };
        let v = self
            .script("replace keys", &scripts().replace_client_keys, a)
            .await?;
        let parts = array(v)?;
        let code = int(parts.first().ok_or_else(|| corrupt("replacement"))?)?;
        if code == 0 {
            return Err(StoreError::NotFound);
        }
        status(code)?;
        let before = parts.get(1).cloned().unwrap_or(Value::Nil);
        array(before)?.iter().map(key_from).collect()
    }

    async fn record_last_used(&self, used: &[(Uuid, Millis)]) -> StoreResult<()> {
        if used.is_empty() {
            return Ok(());
        }
        let mut a = Args::default();
        for (id, at) in used {
            a.push(id).push(at);
        }
        self.script("record last use", &scripts().record_last_used, a)
            .await
            .map(|_| ())
    }

    async fn record_usage(&self, usage: &[Usage]) -> StoreResult<()> {
        if usage.is_empty() {
            return Ok(());
        }
        let mut a = Args::default();
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
        let v = self.script("usage", &scripts().usage, a).await?;
        let items: Vec<String> = ::redis::from_redis_value(v)
            .map_err(|e| StoreError::Unavailable(format!("redis: unexpected usage reply: {e}")))?;
        let mut out: Vec<(i64, u64)> = items
            .chunks_exact(2)
            .filter_map(|c| Some((c[0].parse().ok()?, c[1].parse().ok()?)))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Redis answers, and — once invalidations are watched — the subscription is up (an
    /// instance that may miss revocations is not ready).
    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.conn();
        self.bounded("ping", async move {
            ::redis::cmd("PING").query_async::<Value>(&mut conn).await
        })
        .await?;
        if self.inner.subscription.load(Ordering::Acquire) == SUB_DOWN {
            return Err(StoreError::Unavailable(
                "redis: the invalidation subscription is down".into(),
            ));
        }
        Ok(())
    }

    fn watch_invalidations(&self, sink: Arc<dyn InvalidationSink>) {
        let watcher = Watcher {
            client: self.inner.client.clone(),
            conn: self.conn(),
            channel: format!("{}invalidate", self.prefix()),
            target: self.inner.target.clone(),
            sink,
            state: Arc::clone(&self.inner.subscription),
        };
        watcher.state.store(SUB_DOWN, Ordering::Release);
        let mut stopped = self.inner.alive.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                () = watcher.run() => {}
                _ = stopped.changed() => {}
            }
        });
    }
}

/// The subscription task: delivers invalidations published by every instance to `sink`.
struct Watcher {
    client: ::redis::Client,
    conn: ConnectionManager,
    channel: String,
    target: String,
    sink: Arc<dyn InvalidationSink>,
    state: Arc<AtomicU8>,
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
    async fn run(self) {
        let mut backoff = RESUBSCRIBE_BACKOFF.0;
        let mut was_down = false;
        loop {
            match self.subscribe().await {
                Ok(pubsub) => {
                    if was_down {
                        tracing::info!(redis = %self.target, "invalidation subscription restored");
                    }
                    was_down = false;
                    backoff = RESUBSCRIBE_BACKOFF.0;
                    self.resync().await;
                    self.state.store(SUB_UP, Ordering::Release);
                    let why = self.listen(pubsub).await;
                    self.state.store(SUB_DOWN, Ordering::Release);
                    tracing::warn!(
                        redis = %self.target,
                        "invalidation subscription lost ({why}); reconnecting, then the key cache is cleared"
                    );
                }
                Err(e) => {
                    if was_down {
                        tracing::debug!(redis = %self.target, "cannot subscribe to invalidations: {e}");
                    } else {
                        tracing::warn!(redis = %self.target, "cannot subscribe to invalidations: {e}; retrying");
                    }
                    was_down = true;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RESUBSCRIBE_BACKOFF.1);
        }
    }

    async fn subscribe(&self) -> Result<::redis::aio::PubSub, String> {
        let connect = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, RedisError>(pubsub)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {} ms",
                CONNECT_TIMEOUT.as_millis()
            )),
        }
    }

    /// After (re)subscribing: anything published while the subscription was down was missed,
    /// so every cached entry is dropped. Waits (briefly) until the command connection answers
    /// too, so that stale entries are not dropped while they would still be needed.
    async fn resync(&self) {
        for _ in 0..20 {
            let mut conn = self.conn.clone();
            let ping = async move { ::redis::cmd("PING").query_async::<Value>(&mut conn).await };
            if matches!(tokio::time::timeout(CALL_TIMEOUT, ping).await, Ok(Ok(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.sink.invalidate_all();
    }

    /// Delivers messages until the connection breaks; returns why it ended.
    async fn listen(&self, pubsub: ::redis::aio::PubSub) -> String {
        let (mut sink, mut stream) = pubsub.split();
        let mut tick = tokio::time::interval(SUBSCRIPTION_PING);
        tick.tick().await;
        loop {
            tokio::select! {
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

    #[test]
    fn urls() {
        assert!(parse_url("redis://127.0.0.1:6379/2").is_ok());
        assert!(parse_url("redis+unix:///tmp/r.sock").is_ok());
        let e = parse_url("rediss://u:hunter2@example.com:6380/0").unwrap_err();
        assert!(e.contains("not supported"), "{e}");
        assert!(!e.contains("hunter2"));
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
        assert!(eviction_warning(Some("volatile-lru")).is_none());
        assert!(eviction_warning(None).is_none());
    }

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

    #[test]
    fn key_fields_round_trip() {
        let now = now_millis();
        let (k, _) = ApiKey::builder()
            .client("c")
            .name("n")
            .previous_hash(KeyHash::of("b"), now + 5)
            .permissions(&["A", "B"])
            .enabled(false)
            .created_at(now)
            .updated_at(now + 1)
            .expires_at(now + 2)
            .last_used_at(now + 3)
            .rotated_at(now + 4)
            .rate_limit(RateLimit {
                per_second: Some(3),
                per_minute: None,
                per_hour: None,
                burst: 4,
            })
            .metadata(serde_json::json!({"a": [1, 2]}))
            .build();
        let mut flat = vec![
            Value::BulkString(b"id".to_vec()),
            Value::BulkString(k.id.to_string().into_bytes()),
            Value::BulkString(b"client_id".to_vec()),
            Value::BulkString(b"c".to_vec()),
            Value::BulkString(b"created_at".to_vec()),
            Value::BulkString(now.to_string().into_bytes()),
        ];
        for (name, v) in key_fields(&k) {
            flat.push(Value::BulkString(name.as_bytes().to_vec()));
            flat.push(Value::BulkString(v.into_bytes()));
        }
        assert_eq!(key_from(&Value::Array(flat)).unwrap(), k);
    }
}
