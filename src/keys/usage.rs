//! `last_used_at` and per-day request counts, recorded in memory on the request path (atomics
//! on the cached principal, no lock except once per key per flush interval) and written to the
//! store every `last_used_flush_secs` — in small chunks spread over up to half that interval, so
//! a flush of many keys never holds up requests — and once more, at once, on graceful shutdown.
//! A failed write keeps the counts for the next flush: nothing is lost while the process lives,
//! and nothing is counted twice: a chunk whose write failed after it was sent (Redis: its answer
//! lost, the script run) is sent again as it was, under its own name ([`UsageWrite`]), which the
//! store applies once.
//! What it keeps is one entry per key and day, not the principals the counts came from: a
//! principal replaced by a cache refresh or evicted is freed while the store refuses writes,
//! and requests keep the day they were made on however long the store is down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::store::{Store, Usage, UsageWrite};
use super::{Millis, Principal};
use crate::clock::Clock;
use crate::telemetry::metrics::Metrics;

const DAY_MS: i64 = 86_400_000;
/// Counts to write, one entry per key and day.
type ByDay = HashMap<(Uuid, i64), Usage>;

/// Keys written per store call when usage is flushed.
const FLUSH_CHUNK: usize = 25;
/// Longest pause between the chunks of a periodic flush. The store's work (SQLite's usage
/// writer runs at the lowest CPU priority, but may share the request path's core) goes out in
/// small pieces instead of holding up requests for milliseconds at a time.
const FLUSH_PACE: std::time::Duration = std::time::Duration::from_millis(1);

/// Usage not yet written, kept on each cached principal.
#[derive(Debug, Default)]
pub struct KeyUsage {
    last_used: AtomicI64,
    requests: AtomicU64,
    queued: AtomicBool,
}

impl KeyUsage {
    /// When the key was last used through this principal (0: not yet).
    pub fn last_used(&self) -> Millis {
        self.last_used.load(Ordering::Relaxed)
    }
}

pub struct UsageRecorder {
    pending: Mutex<Vec<Arc<Principal>>>,
    /// Counts a failed flush did not send, for the next flush.
    carried: Mutex<ByDay>,
    /// Chunks whose write failed once sent: the store may hold them, so they go again as they
    /// were, under their name, before anything new.
    unsure: Mutex<Vec<(UsageWrite, Vec<Usage>)>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// When a request was made (`last_used_at`, the day it is counted on).
    clock: Clock,
}

impl UsageRecorder {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>, clock: Clock) -> Self {
        Self {
            pending: Mutex::new(Vec::new()),
            carried: Mutex::new(HashMap::new()),
            unsure: Mutex::new(Vec::new()),
            store,
            metrics,
            clock,
        }
    }

    /// Records one request of `p`, now.
    pub fn touch(&self, p: &Arc<Principal>) {
        let now = self.clock.now_millis();
        let u = &p.usage;
        // Requests of a key within one millisecond: a read, not a locked write, after the first.
        if u.last_used.load(Ordering::Relaxed) < now {
            u.last_used.fetch_max(now, Ordering::Relaxed);
        }
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

    /// Writes everything recorded so far, at once (shutdown). Returns how many entries (a key's
    /// requests on one day) it wrote.
    pub async fn flush(&self) -> usize {
        self.flush_spread(std::time::Duration::ZERO).await
    }

    /// Writes everything recorded so far in chunks, paused so the whole write takes up to
    /// `spread` (pauses of at most `FLUSH_PACE`).
    pub async fn flush_spread(&self, spread: std::time::Duration) -> usize {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut by_day =
            std::mem::take(&mut *self.carried.lock().unwrap_or_else(|e| e.into_inner()));
        for p in batch {
            p.usage.queued.store(false, Ordering::Release);
            let last = p.usage.last_used.load(Ordering::Relaxed);
            let n = p.usage.requests.swap(0, Ordering::AcqRel);
            merge(
                &mut by_day,
                Usage {
                    key_id: p.key_id,
                    last_used_at: last,
                    day: last.div_euclid(DAY_MS),
                    requests: n,
                },
            );
        }
        // Chunks a failed write left unsure: again, as they were.
        let unsure = std::mem::take(&mut *self.unsure.lock().unwrap_or_else(|e| e.into_inner()));
        let mut written = 0;
        for (i, (write, chunk)) in unsure.iter().enumerate() {
            if let Err(e) = self.store.record_usage(*write, chunk).await {
                self.keep_for_next(&e, &unsure[i..], by_day.into_values());
                return written;
            }
            written += chunk.len();
        }
        if by_day.is_empty() {
            if written > 0 {
                self.metrics.usage_flushes.inc();
            }
            return written;
        }
        // In key order: a chunk's keys are neighbours in the store's tables and indexes, so a
        // chunk rewrites a few pages rather than one or more per key (SQLite: several times
        // less written per flush, see bench usage_flush).
        let mut entries: Vec<Usage> = by_day.into_values().collect();
        entries.sort_unstable_by_key(|u| (u.key_id, u.day));
        let chunks = entries.len().div_ceil(FLUSH_CHUNK).max(1) as u32;
        let pace = (spread / chunks).min(FLUSH_PACE);
        let flush: u64 = rand::random();
        // In chunks, yielding between them: a flush of many keys does not hold up requests for
        // the whole write.
        let mut sent = 0;
        for (n, chunk) in entries.chunks(FLUSH_CHUNK).enumerate() {
            let write = UsageWrite {
                flush,
                chunk: n as u32,
            };
            if let Err(e) = self.store.record_usage(write, chunk).await {
                // Sent, maybe stored: again as it is. The rest was not sent.
                let left = entries[sent + chunk.len()..].iter().copied();
                self.keep_for_next(&e, &[(write, chunk.to_vec())], left);
                return written;
            }
            sent += chunk.len();
            written += chunk.len();
            if pace.is_zero() || sent == entries.len() {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(pace).await;
            }
        }
        self.metrics.usage_flushes.inc();
        written
    }

    /// After a failed write: `unsure` chunks (sent, maybe stored) go again as they are, the
    /// `unsent` counts merge with the next flush's.
    fn keep_for_next(
        &self,
        e: &super::store::StoreError,
        unsure: &[(UsageWrite, Vec<Usage>)],
        unsent: impl Iterator<Item = Usage>,
    ) {
        let mut kept = self.unsure.lock().unwrap_or_else(|e| e.into_inner());
        kept.extend_from_slice(unsure);
        let mut carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
        for u in unsent {
            merge(&mut carried, u);
        }
        let entries = carried.len() + kept.iter().map(|(_, c)| c.len()).sum::<usize>();
        tracing::warn!(error = %e, entries, "usage flush failed; will retry");
        self.metrics.usage_flush_errors.inc();
    }

    /// Entries (a key and a day) a failed flush did not send, waiting for the next flush.
    #[cfg(test)]
    fn carried(&self) -> usize {
        self.carried.lock().unwrap().len()
    }

    /// Entries of chunks sent by a write that failed, to be sent again as they were.
    #[cfg(test)]
    fn unsure(&self) -> usize {
        self.unsure
            .lock()
            .unwrap()
            .iter()
            .map(|(_, c)| c.len())
            .sum()
    }
}

/// Adds `u` to its key's entry for its day.
fn merge(by_day: &mut ByDay, u: Usage) {
    by_day
        .entry((u.key_id, u.day))
        .and_modify(|e| {
            e.last_used_at = e.last_used_at.max(u.last_used_at);
            e.requests += u.requests;
        })
        .or_insert(u);
}

/// Writes what `usage` recorded every `every`, each flush spread over half of it, until `stop`
/// is notified. A flush under way then is finished first (it is never dropped halfway: what it
/// took from the principals and had not written yet would be lost), so the final flush of a
/// shutdown, after this task ends, writes the rest.
pub fn spawn_flusher(
    usage: Arc<UsageRecorder>,
    every: std::time::Duration,
    stop: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    usage.flush_spread(every / 2).await;
                }
                _ = stop.notified() => return,
            }
        }
    })
}

/// Days since the Unix epoch (UTC) of `ms`.
pub fn day_of(ms: Millis) -> i64 {
    ms.div_euclid(DAY_MS)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::clock::FakeClock;
    use crate::keys::ApiKey;
    use crate::keys::bucket::KeyLimiter;
    use crate::keys::store::sqlite::SqliteStore;
    use crate::keys::store::testing::Counting;
    use crate::keys::testing::client;

    /// `n` keys of one client in a fresh store, and their principals.
    async fn keys(n: usize) -> (Arc<Counting>, Vec<Arc<Principal>>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Counting::new(
            SqliteStore::open(&dir.path().join("u.db")).unwrap(),
        ));
        let client = client("c");
        let mut principals = Vec::new();
        for i in 0..n {
            let (record, new) = ApiKey::builder().client("c").record("pro");
            if i == 0 {
                store.insert_client(&client, &record.key).await.unwrap();
            } else {
                store.insert_key(&record.key, 0).await.unwrap();
            }
            let limiter = Arc::new(KeyLimiter::new(
                crate::keys::RateLimit {
                    per_second: Some(10),
                    per_minute: None,
                    per_hour: None,
                    burst: 10,
                },
                FakeClock::new().clock(),
            ));
            principals.push(Principal::from_record(&record, &new.hash, limiter));
        }
        (store, principals, dir)
    }

    /// A recorder writing to `store`, on `clock`.
    fn recorder(store: &Arc<Counting>, clock: &FakeClock) -> UsageRecorder {
        let metrics = Arc::new(Metrics::new(vec!["/".into()]));
        UsageRecorder::new(store.clone() as Arc<dyn Store>, metrics, clock.clock())
    }

    /// Requests counted per day, `from..=to`, for `p`.
    async fn days(store: &Counting, p: &Principal, from: i64, to: i64) -> Vec<(i64, u64)> {
        store.usage(p.key_id, from, to).await.unwrap()
    }

    /// A flush of more keys than one chunk writes them all; a chunk that fails gives its
    /// counts, and those of the chunks after it, back for the next flush, and nothing that was
    /// written is counted twice.
    #[tokio::test]
    async fn flushes_go_out_in_chunks_and_a_failed_chunk_is_kept() {
        let n = FLUSH_CHUNK * 2 + 100;
        let (store, principals, _dir) = keys(n).await;
        let clock = FakeClock::new();
        let usage = recorder(&store, &clock);
        let now = clock.now_millis();
        for p in &principals {
            usage.touch(p);
            usage.touch(p);
        }
        // The second chunk fails: the first is written, the second and third are kept.
        store.usage_writes_left.store(1, Ordering::SeqCst);
        assert_eq!(usage.flush().await, FLUSH_CHUNK);
        store.usage_writes_left.store(usize::MAX, Ordering::SeqCst);
        for p in &principals {
            usage.touch(p);
        }
        // The failed chunk again, as it was, and every key's new and carried counts.
        assert_eq!(usage.flush().await, FLUSH_CHUNK + n);
        let day = day_of(now);
        let count = |p: &Principal| {
            let store = store.clone();
            let id = p.key_id;
            async move {
                let days = store.usage(id, day, day).await.unwrap();
                days.iter().map(|(_, r)| r).sum::<u64>()
            }
        };
        let mut totals = Vec::new();
        for p in &principals {
            totals.push(count(p).await);
        }
        assert!(totals.iter().all(|&t| t == 3), "{:?}", &totals[..10]);
    }

    /// A chunk whose write failed once sent may be stored (Redis: an answer lost): the next
    /// flush sends it again first, as it was and under its name (which the store applies once),
    /// and what was counted since goes in writes of its own; a chunk never sent is merged with
    /// the new counts.
    #[tokio::test]
    async fn a_failed_chunk_is_sent_again_as_it_was_under_its_name() {
        let n = FLUSH_CHUNK + 5;
        let (store, principals, _dir) = keys(n).await;
        let clock = FakeClock::new();
        let usage = recorder(&store, &clock);
        for p in &principals {
            usage.touch(p);
        }
        store.usage_writes_left.store(0, Ordering::SeqCst);
        assert_eq!(usage.flush().await, 0);
        assert_eq!((usage.unsure(), usage.carried()), (FLUSH_CHUNK, 5));
        let failed = store.usage_calls.lock().unwrap()[0].clone();
        for p in &principals {
            usage.touch(p);
        }
        // Still failing: the same chunk is tried again, nothing new is sent.
        assert_eq!(usage.flush().await, 0);
        assert_eq!(store.usage_calls.lock().unwrap()[1], failed);
        assert_eq!(store.usage_calls.lock().unwrap().len(), 2);
        store.usage_writes_left.store(usize::MAX, Ordering::SeqCst);
        assert_eq!(usage.flush().await, FLUSH_CHUNK + n);
        let calls = store.usage_calls.lock().unwrap().clone();
        assert_eq!(calls[2], failed, "again first, as it was");
        assert!(calls[3..].iter().all(|(w, _)| w.flush != failed.0.flush));
        let new: u64 = calls[3..]
            .iter()
            .flat_map(|(_, c)| c.iter().map(|u| u.requests))
            .sum();
        // Every request counted once: the failed chunk's 25 and the rest in the new writes.
        assert_eq!(new, (2 * n - FLUSH_CHUNK) as u64);
        assert_eq!(usage.unsure() + usage.carried(), 0);
    }

    /// While the store refuses writes, what a flush keeps is one entry per key and day, not the
    /// principals: a principal replaced by a cache refresh is freed (before, every principal
    /// ever touched stayed queued until a write went through), and each request is counted on
    /// the day it was made, not on the day of the flush that finally wrote it.
    #[tokio::test]
    async fn a_failed_flush_keeps_counts_by_day_not_principals() {
        let (store, principals, _dir) = keys(1).await;
        let first = Arc::clone(&principals[0]);
        let record = store.find_by_id(first.key_id).await.unwrap().unwrap();
        let clock = FakeClock::new();
        let usage = recorder(&store, &clock);
        let day = day_of(clock.now_millis());
        store.usage_writes_left.store(0, Ordering::SeqCst);
        usage.touch(&first);
        assert_eq!(usage.flush().await, 0);
        // A cache refresh replaces the principal; the old one is dropped by the cache.
        let refreshed =
            Principal::from_record(&record, &record.key.key_hash, Arc::clone(&first.limiter));
        usage.touch(&refreshed);
        usage.touch(&refreshed);
        assert_eq!(usage.flush().await, 0);
        assert_eq!(Arc::strong_count(&first), 2, "only the test's two handles");
        assert_eq!(usage.carried(), 1, "one key, one day");
        clock.advance(std::time::Duration::from_millis(DAY_MS as u64));
        usage.touch(&refreshed);
        assert_eq!(usage.flush().await, 0);
        assert_eq!(usage.carried(), 2, "one key, two days");
        // The first request's chunk, sent by the first failed write: kept as it was.
        assert_eq!(usage.unsure(), 1);
        store.usage_writes_left.store(usize::MAX, Ordering::SeqCst);
        assert_eq!(usage.flush().await, 3);
        assert_eq!(usage.carried() + usage.unsure(), 0);
        assert_eq!(
            days(&store, &first, day - 1, day + 2).await,
            [(day, 3), (day + 1, 1)]
        );
        let record = store.find_by_id(first.key_id).await.unwrap().unwrap();
        assert_eq!(record.key.last_used_at, Some(clock.now_millis()));
    }

    /// The flusher stops between flushes, never inside one: a spread flush under way when it
    /// is told to stop (shutdown) is finished, so no count is lost (aborting it lost the chunks
    /// it had taken and not yet written).
    #[tokio::test]
    async fn the_flusher_stops_after_the_flush_under_way() {
        let n = FLUSH_CHUNK * 4;
        let (store, principals, _dir) = keys(n).await;
        store.usage_write_delay_ms.store(50, Ordering::SeqCst);
        let clock = FakeClock::new();
        let usage = Arc::new(recorder(&store, &clock));
        for p in &principals {
            usage.touch(p);
        }
        let stop = Arc::new(tokio::sync::Notify::new());
        let flusher = spawn_flusher(
            Arc::clone(&usage),
            std::time::Duration::from_millis(10),
            Arc::clone(&stop),
        );
        // The periodic flush is under way: its first chunk is written, three are to come.
        while store.usage_written.lock().unwrap().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        stop.notify_one();
        flusher.await.unwrap();
        assert_eq!(store.usage_written.lock().unwrap().len(), n);
        assert_eq!(usage.flush().await, 0, "nothing left for the final flush");
    }

    /// A flush gives the store its keys in key order, whatever the order they were used in
    /// (neighbours in the store's tables: fewer pages written per chunk).
    #[tokio::test]
    async fn a_flush_writes_keys_in_key_order() {
        let n = FLUSH_CHUNK * 2 + 10;
        let (store, principals, _dir) = keys(n).await;
        let clock = FakeClock::new();
        let usage = recorder(&store, &clock);
        for p in principals.iter().rev() {
            usage.touch(p);
        }
        assert_eq!(usage.flush().await, n);
        let written = store.usage_written.lock().unwrap().clone();
        let mut ids: Vec<Uuid> = principals.iter().map(|p| p.key_id).collect();
        ids.sort();
        assert_eq!(written, ids);
    }

    /// A request is recorded at the recorder's clock: `last_used_at` is that instant and the
    /// request counts on its day; the next day's requests count on the next day.
    #[tokio::test]
    async fn requests_are_recorded_at_the_clocks_time() {
        let (store, principals, _dir) = keys(1).await;
        let p = &principals[0];
        // A minute before midnight.
        let clock = FakeClock::at(FakeClock::START + DAY_MS - 60_000);
        let usage = recorder(&store, &clock);
        let day = day_of(FakeClock::START);
        usage.touch(p);
        assert_eq!(p.usage.last_used(), clock.now_millis());
        assert_eq!(usage.flush().await, 1);
        let record = store.find_by_id(p.key_id).await.unwrap().unwrap();
        assert_eq!(record.key.last_used_at, Some(clock.now_millis()));
        clock.advance(std::time::Duration::from_secs(61));
        usage.touch(p);
        usage.touch(p);
        assert_eq!(usage.flush().await, 1);
        assert_eq!(
            days(&store, p, day - 1, day + 2).await,
            [(day, 1), (day + 1, 2)]
        );
        let record = store.find_by_id(p.key_id).await.unwrap().unwrap();
        assert_eq!(record.key.last_used_at, Some(clock.now_millis()));
    }
}
