//! Authentication: a credential becomes a [`Principal`], or an error code. Authorization: a
//! principal and a route become a [`Permit`], the only thing `forward` accepts.
//!
//! API key path: shape and checksum (no I/O) → SHA-256 → cache → store on miss. Unknown hashes
//! are cached negatively. The store answer is compared to the computed hash in constant time.

use std::sync::Arc;

use crate::config::RouteAuth;
use crate::error::ProxyError;
use crate::keys::cache::{Cached, KeyCache};
use crate::keys::store::Store;
use crate::keys::{KeyFormat, KeyHash, Millis, Principal, now_millis};
use crate::proxy::credential::{Credential, Kind};
use crate::proxy::route::Route;

#[derive(Clone)]
pub struct Authenticator {
    format: KeyFormat,
    cache: KeyCache,
    store: Arc<dyn Store>,
}

impl Authenticator {
    pub fn new(format: KeyFormat, cache: KeyCache, store: Arc<dyn Store>) -> Self {
        Self {
            format,
            cache,
            store,
        }
    }

    pub async fn authenticate(&self, cred: &Credential<'_>) -> Result<Arc<Principal>, ProxyError> {
        match cred.kind {
            Kind::ApiKey => self.api_key(cred.secret.as_str()).await,
            // Tokens are accepted once a signing key is configured (JWT support).
            Kind::Jwt => Err(ProxyError::InvalidToken),
        }
    }

    /// Authenticates a plaintext API key.
    pub async fn api_key(&self, key: &str) -> Result<Arc<Principal>, ProxyError> {
        if !self.format.check(key) {
            return Err(ProxyError::InvalidApiKey);
        }
        let hash = KeyHash::of(key);
        let now = now_millis();
        let principal = match self.cache.get(&hash) {
            Some(Cached::Found(p)) => p,
            Some(Cached::Unknown) => return Err(ProxyError::InvalidApiKey),
            None => self.fill(hash, now).await?,
        };
        check_status(&principal, now)?;
        Ok(principal)
    }

    async fn fill(&self, hash: KeyHash, now: Millis) -> Result<Arc<Principal>, ProxyError> {
        let found = self.store.find_by_hash(&hash, now).await.map_err(|e| {
            tracing::warn!(error = %e, "key lookup failed");
            ProxyError::StoreUnavailable
        })?;
        let matching = found.filter(|r| {
            r.key.key_hash.ct_eq(&hash) || r.key.previous_hash.is_some_and(|p| p.ct_eq(&hash))
        });
        match matching {
            Some(record) => {
                let p = Principal::from_record(&record, &hash);
                self.cache.insert(hash, Cached::Found(Arc::clone(&p)));
                Ok(p)
            }
            None => {
                self.cache.insert(hash, Cached::Unknown);
                Err(ProxyError::InvalidApiKey)
            }
        }
    }
}

fn check_status(p: &Principal, now: Millis) -> Result<(), ProxyError> {
    if p.grace_until.is_some_and(|g| g <= now) {
        return Err(ProxyError::InvalidApiKey);
    }
    if !p.enabled {
        return Err(ProxyError::DisabledApiKey);
    }
    if p.expires_at.is_some_and(|e| e <= now) {
        return Err(ProxyError::ExpiredApiKey);
    }
    Ok(())
}

/// Proof that a request may be forwarded on `route`: either the route is public, or
/// `principal` holds every permission it requires. Constructed only here.
pub struct Permit<'r> {
    route: &'r Route,
    principal: Option<Arc<Principal>>,
}

impl<'r> Permit<'r> {
    pub fn route(&self) -> &'r Route {
        self.route
    }

    pub fn principal(&self) -> Option<&Arc<Principal>> {
        self.principal.as_ref()
    }
}

/// A permit for a route with `auth = "none"`; `None` when the route requires a key.
pub fn public(route: &Route) -> Option<Permit<'_>> {
    (route.auth == RouteAuth::None).then_some(Permit {
        route,
        principal: None,
    })
}

/// A permit when `principal` holds all of the route's permissions.
pub fn authorize(route: &Route, principal: Arc<Principal>) -> Result<Permit<'_>, ProxyError> {
    if principal.has_all(&route.permissions) {
        Ok(Permit {
            route,
            principal: Some(principal),
        })
    } else {
        Err(ProxyError::InsufficientPermissions)
    }
}
