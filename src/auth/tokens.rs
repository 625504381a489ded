//! The verified-token cache: SHA-256 of a token's signature segment → what the verified token
//! says. Like the key cache (and sharded as it is: [`shard_count`], [`ShardKey`]), shards of
//! hash maps behind reader-writer locks: a hit is one shared lock, one probe and one
//! reference-count increment (no clock read, no bookkeeping of the access). Capacity is enforced per shard when a token is added: a full shard first drops
//! the tokens the verifier would refuse by now, then the tenth of them that expires soonest.
//! The caller judges expiry on every hit ([`VerifiedToken::usable_until_secs`]).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use uuid::Uuid;

use crate::keys::cache::{DigestHasher, ShardKey, shard_count};
use crate::keys::{KeyHash, Millis};

/// What a verified token says, as far as the request path needs it.
pub(super) struct VerifiedToken {
    /// The signed part of the token (`header.claims`, without the signature): a hit must
    /// present exactly this string with the signature whose digest found the entry.
    pub signed: Box<str>,
    pub key_id: Uuid,
    pub rot: Millis,
    /// Minted with a previous secret: the end of its grace period (`Millis::MAX`: not).
    pub grace_until: Millis,
    pub sub: Box<str>,
    /// Unix seconds after which the verifier would refuse the token (`exp` + leeway).
    pub usable_until_secs: i64,
}

type Shard = HashMap<KeyHash, Arc<VerifiedToken>, DigestHasher>;

pub(super) struct TokenCache {
    shards: Box<[RwLock<Shard>]>,
    per_shard: usize,
}

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let shards = shard_count(capacity);
        Self {
            shards: (0..shards).map(|_| RwLock::new(Shard::default())).collect(),
            per_shard: capacity.div_ceil(shards),
        }
    }

    fn shard(&self, k: &KeyHash) -> &RwLock<Shard> {
        &self.shards[k.shard_bits() & (self.shards.len() - 1)]
    }

    pub fn get(&self, k: &KeyHash) -> Option<Arc<VerifiedToken>> {
        let shard = self.shard(k).read().unwrap_or_else(PoisonError::into_inner);
        shard.get(k).cloned()
    }

    /// Adds (or replaces) a verified token; `now_secs` judges what has expired when the shard
    /// is full.
    pub fn insert(&self, k: KeyHash, t: Arc<VerifiedToken>, now_secs: i64) {
        let mut shard = self
            .shard(&k)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.per_shard && !shard.contains_key(&k) {
            shard.retain(|_, t| now_secs <= t.usable_until_secs);
            if shard.len() >= self.per_shard {
                let mut until: Vec<i64> = shard.values().map(|t| t.usable_until_secs).collect();
                let drop = (until.len() / 10).max(1);
                let (_, &mut threshold, _) = until.select_nth_unstable(drop - 1);
                let mut left = drop;
                shard.retain(|_, t| {
                    if left > 0 && t.usable_until_secs <= threshold {
                        left -= 1;
                        return false;
                    }
                    true
                });
            }
        }
        shard.insert(k, t);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(until: i64) -> Arc<VerifiedToken> {
        Arc::new(VerifiedToken {
            signed: "h.c".into(),
            key_id: Uuid::nil(),
            rot: 0,
            grace_until: Millis::MAX,
            sub: "c".into(),
            usable_until_secs: until,
        })
    }

    #[test]
    fn a_full_cache_drops_the_expired_then_the_soonest_to_expire() {
        let cache = TokenCache::new(100);
        assert_eq!(cache.shards.len(), 1);
        // 50 expired by t=1000, 50 usable until 2000 + i.
        for i in 0..100 {
            let until = if i < 50 { 900 } else { 2000 + i };
            cache.insert(KeyHash::of(&format!("t{i}")), token(until), 0);
        }
        assert_eq!(cache.len(), 100);
        cache.insert(KeyHash::of("new"), token(5000), 1000);
        assert_eq!(cache.len(), 51, "the expired went first");
        assert!(cache.get(&KeyHash::of("t10")).is_none());
        assert!(cache.get(&KeyHash::of("t60")).is_some());

        // Full of usable tokens: the tenth that expires soonest goes.
        for i in 100..149 {
            cache.insert(KeyHash::of(&format!("t{i}")), token(3000 + i), 1000);
        }
        assert_eq!(cache.len(), 100);
        cache.insert(KeyHash::of("newer"), token(6000), 1000);
        assert_eq!(cache.len(), 91);
        assert!(cache.get(&KeyHash::of("t50")).is_none(), "expired soonest");
        assert!(cache.get(&KeyHash::of("t59")).is_none());
        assert!(cache.get(&KeyHash::of("t60")).is_some());
        assert!(cache.get(&KeyHash::of("newer")).is_some());
        assert!(cache.get(&KeyHash::of("new")).is_some());
    }

    #[test]
    fn replacing_a_token_in_a_full_shard_drops_nothing() {
        let cache = TokenCache::new(10);
        for i in 0..10 {
            cache.insert(KeyHash::of(&format!("t{i}")), token(100), 0);
        }
        cache.insert(KeyHash::of("t3"), token(200), 500);
        assert_eq!(cache.len(), 10);
        assert_eq!(
            cache.get(&KeyHash::of("t3")).unwrap().usable_until_secs,
            200
        );
    }
}
