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
    for i in accepted {
        match store.insert_key(&keys[i], max_keys).await {
            Ok(()) => written.push(i),
            Err(StoreError::NotFound) => refused.push((i, Refusal::UnknownClient)),
            Err(StoreError::Conflict(Conflict::TooManyKeys { max })) => {
                refused.push((i, Refusal::TooManyKeys { max }));
            }
            Err(e) => {
                if atomic {
                    undo(store, &keys, &written).await;
                }
                return Err(e);
            }
        }
        if atomic && !refused.is_empty() {
            undo(store, &keys, &written).await;
            return Ok(refused);
        }
    }
    refused.sort_by_key(|(i, _)| *i);
    Ok(refused)
}

async fn undo<S: Store + ?Sized>(store: &S, keys: &[ApiKey], written: &[usize]) {
    for &i in written {
        if let Err(e) = store.delete_key(keys[i].id).await {
            tracing::error!(key_id = %keys[i].id, error = %e, "import: could not undo a written key");
        }
    }
}
