//! Signing keys in Redis: one hash, `<prefix>signing_keys`, key id → record (JSON, the private
//! key base64). A key is added (and the retired ones removed) by one script, so the first key
//! of a fleet is written once however many instances start together.

use ::redis::{Script, Value};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::RedisStore;
use super::codec::Args;
use crate::keys::Millis;
use crate::keys::store::signing::{AddKey, SigningKeyRecord};
use crate::keys::store::{StoreError, StoreResult};

#[derive(Serialize, Deserialize)]
struct Stored {
    kid: String,
    algorithm: String,
    private_pkcs8: String,
    active_from: Millis,
    created_at: Millis,
}

fn corrupt() -> StoreError {
    StoreError::Unavailable("redis: a stored signing key does not decode".into())
}

fn decode(v: &[u8]) -> StoreResult<SigningKeyRecord> {
    let s: Stored = serde_json::from_slice(v).map_err(|_| corrupt())?;
    Ok(SigningKeyRecord {
        kid: s.kid,
        algorithm: s.algorithm,
        private_pkcs8: STANDARD.decode(s.private_pkcs8).map_err(|_| corrupt())?,
        active_from: s.active_from,
        created_at: s.created_at,
    })
}

fn records(v: Value) -> StoreResult<Vec<SigningKeyRecord>> {
    match v {
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::BulkString(b) => decode(&b),
                _ => Err(corrupt()),
            })
            .collect(),
        Value::Nil => Ok(Vec::new()),
        _ => Err(corrupt()),
    }
}

fn add_script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| Script::new(include_str!("scripts/add_signing_key.lua")))
}

impl RedisStore {
    pub(super) async fn read_signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>> {
        let key = &format!("{}signing_keys", self.prefix());
        let v = self
            .bounded_read("signing keys", |mut conn| async move {
                ::redis::cmd("HVALS")
                    .arg(key)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        records(v)
    }

    pub(super) async fn write_signing_key(
        &self,
        key: &SigningKeyRecord,
        how: AddKey,
        prune: &[String],
    ) -> StoreResult<Vec<SigningKeyRecord>> {
        let record = serde_json::to_string(&Stored {
            kid: key.kid.clone(),
            algorithm: key.algorithm.clone(),
            private_pkcs8: STANDARD.encode(&key.private_pkcs8),
            active_from: key.active_from,
            created_at: key.created_at,
        })
        .map_err(|_| corrupt())?;
        let mut args = Args(Vec::with_capacity(3 + prune.len()));
        args.push(match how {
            AddKey::Always => "always",
            AddKey::IfNone => "if_none",
        })
        .push(&key.kid)
        .push(record);
        for kid in prune {
            args.push(kid);
        }
        // An admin write like the others: with `store.redis_wait_replicas` it is answered only
        // once the replicas hold it (a rotation acknowledged and then lost to a failover would
        // leave the fleet signing with a key no instance publishes any more).
        let v = self.write("add signing key", add_script(), args).await?;
        records(v)
    }
}
