//! `last_used_at` and per-day request counts, recorded in memory on the request path (atomics
//! on the cached principal, no lock except once per key per flush interval) and written to the
//! store in one batch every `last_used_flush_secs`, and once more on graceful shutdown. A failed
//! write keeps the counts for the next flush: nothing is lost while the process lives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::store::{Store, Usage};
use super::{Millis, Principal};
use crate::telemetry::metrics::Metrics;

const DAY_MS: i64 = 86_400_000;

/// Usage not yet written, kept on each cached principal.
#[derive(Debug, Default)]
pub struct KeyUsage {
    last_used: AtomicI64,
    requests: AtomicU64,
    queued: AtomicBool,
}

pub struct UsageRecorder {
    pending: Mutex<Vec<Arc<Principal>>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl UsageRecorder {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self {
            pending: Mutex::new(Vec::new()),
            store,
            metrics,
        }
    }

    /// Records one request of `p` at `now`.
    pub fn touch(&self, p: &Arc<Principal>, now: Millis) {
        let u = &p.usage;
        u.last_used.fetch_max(now, Ordering::Relaxed);
        u.requests.fetch_add(1, Ordering::Relaxed);
        if !u.queued.load(Ordering::Relaxed) && !u.queued.swap(true, Ordering::AcqRel) {
            self.queue(p);
        }
    }

    fn queue(&self, p: &Arc<Principal>) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::clone(p));
    }

    /// Writes everything recorded so far in one store call. Returns how many keys it wrote.
    pub async fn flush(&self) -> usize {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if batch.is_empty() {
            return 0;
        }
        let mut taken = Vec::with_capacity(batch.len());
        let mut by_key: HashMap<Uuid, Usage> = HashMap::new();
        for p in batch {
            p.usage.queued.store(false, Ordering::Release);
            let last = p.usage.last_used.load(Ordering::Relaxed);
            let n = p.usage.requests.swap(0, Ordering::AcqRel);
            let e = by_key.entry(p.key_id).or_insert(Usage {
                key_id: p.key_id,
                last_used_at: last,
                day: last.div_euclid(DAY_MS),
                requests: 0,
            });
            e.last_used_at = e.last_used_at.max(last);
            e.day = e.last_used_at.div_euclid(DAY_MS);
            e.requests += n;
            taken.push((p, n));
        }
        let entries: Vec<Usage> = by_key.into_values().collect();
        match self.store.record_usage(&entries).await {
            Ok(()) => {
                self.metrics.usage_flushes.inc();
                entries.len()
            }
            Err(e) => {
                tracing::warn!(error = %e, keys = entries.len(), "usage flush failed; will retry");
                self.metrics.usage_flush_errors.inc();
                for (p, n) in taken {
                    p.usage.requests.fetch_add(n, Ordering::AcqRel);
                    if !p.usage.queued.swap(true, Ordering::AcqRel) {
                        self.queue(&p);
                    }
                }
                0
            }
        }
    }
}

/// Days since the Unix epoch (UTC) of `ms`.
pub fn day_of(ms: Millis) -> i64 {
    ms.div_euclid(DAY_MS)
}
