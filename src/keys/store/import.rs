//! Keys migrated from another system: why one may be refused, and the generic import that
//! works through the other store calls (stores with transactions do it in one).

use std::collections::{HashMap, HashSet};

use super::{Conflict, Store, StoreError, StoreResult};
use crate::keys::{ApiKey, now_millis};

/// Why one imported key was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No client with the key's `client_id`.
    UnknownClient,
    /// The secret is already stored (as a key's current or previous secret, or earlier in
    /// the same import).
    Duplicate,
    /// The client already has the maximum number of keys.
    TooManyKeys { max: u32 },
    /// The store failed before this key's write was confirmed (a non-atomic import goes on
    /// only as far as the store answers): it may or may not stand.
    Unconfirmed,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::UnknownClient => f.write_str("no client with this client_id"),
            Refusal::Duplicate => f.write_str("a key with this secret is already stored"),
            Refusal::TooManyKeys { max } => write!(
                f,
                "the client already has the maximum of {max} keys (keys.max_per_client)"
            ),
            Refusal::Unconfirmed => f.write_str(
                "the key store failed before this key was confirmed; import it again (if it \
                 was written, it is then refused as already stored)",
            ),
        }
    }
}

/// [`Store::import_keys`] through `get_client`, `find_by_hash`, `insert_key` and (to undo an
/// atomic import) `delete_key`.
pub async fn one_by_one<S: Store + ?Sized>(
    store: &S,
    keys: Vec<ApiKey>,
    max_keys: u32,
    atomic: bool,
) -> StoreResult<Vec<(usize, Refusal)>> {
    let now = now_millis();
    let mut refused = Vec::new();
    let mut clients: HashMap<String, bool> = HashMap::new();
    let mut seen = HashSet::new();
    let mut accepted = Vec::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        let exists = match clients.get(&k.client_id) {
            Some(&e) => e,
            None => {
                let e = store.get_client(&k.client_id).await?.is_some();
                clients.insert(k.client_id.clone(), e);
                e
            }
        };
        if !exists {
            refused.push((i, Refusal::UnknownClient));
        } else if !seen.insert(k.key_hash.0)
            || store.find_by_hash(&k.key_hash, now).await?.is_some()
        {
            refused.push((i, Refusal::Duplicate));
        } else {
            accepted.push(i);
        }
    }
    if atomic && !refused.is_empty() {
        return Ok(refused);
    }
    let mut written = Vec::with_capacity(accepted.len());
    for (n, &i) in accepted.iter().enumerate() {
        match store.insert_key(&keys[i], max_keys).await {
            Ok(()) => written.push(i),
            Err(StoreError::NotFound) => refused.push((i, Refusal::UnknownClient)),
            Err(StoreError::Conflict(Conflict::TooManyKeys { max })) => {
                refused.push((i, Refusal::TooManyKeys { max }));
            }
            Err(e) if written.is_empty() => return Err(e),
            Err(e) if atomic => {
                return match undo(store, &keys, &written).await {
                    Ok(()) => Err(e),
                    Err(undo) => Err(StoreError::Incomplete(format!(
                        "import: {e}; undoing the keys written before: {undo}"
                    ))),
                };
            }
            Err(e) => {
                // What was written stands; this key and the rest are not confirmed.
                tracing::error!(error = %e, "import: the store failed partway");
                refused.extend(accepted[n..].iter().map(|&i| (i, Refusal::Unconfirmed)));
                break;
            }
        }
        if atomic && !refused.is_empty() {
            undo(store, &keys, &written).await.map_err(|undo| {
                StoreError::Incomplete(format!("import: undoing the keys written before: {undo}"))
            })?;
            return Ok(refused);
        }
    }
    refused.sort_by_key(|(i, _)| *i);
    Ok(refused)
}

/// Deletes the keys `written` by an atomic import that stopped, each as
/// [`Store::delete_key`] does (its `key.revoked` follows the `key.created` that went out: a
/// webhook sees the keys come and go). A key not written is no error; the first failure is
/// answered after every key was tried.
pub(crate) async fn undo<S: Store + ?Sized>(
    store: &S,
    keys: &[ApiKey],
    written: &[usize],
) -> StoreResult<()> {
    let mut failed = None;
    for &i in written {
        match store.delete_key(keys[i].id).await {
            Ok(_) | Err(StoreError::NotFound) => {}
            Err(e) => {
                tracing::error!(key_id = %keys[i].id, error = %e, "import: could not undo a written key");
                failed.get_or_insert(e);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}
