//! Cluster-wide rate limits (`[rate_limit] mode = "cluster"`, Redis store): one GCRA bucket
//! per plan bucket (a client's, or a key's under a per-key plan) held in Redis, shared by every
//! instance, and spent through leases so that the request path makes no Redis round trip in the
//! common case.
//!
//! # Design
//! - Redis holds each bucket's theoretical arrival time (`tat`, on Redis's own clock, `TIME`).
//! - Every [`SYNC_INTERVAL`] each instance sends, in one script call for all its active
//!   buckets, the cells of its lease it did not use (given back: `tat` moves back) and how many
//!   requests it saw (its demand); the script reserves for it a new lease of
//!   `floor(room × share)` cells, at most `room ÷ live instances` (at least one cell while there
//!   is room) — `room`: the cells the bucket allows right now, `share`: this instance's part of
//!   the demand of the instances seen in the last second — by moving `tat` forward, and answers
//!   the lease.
//! - A request takes one cell of the local lease (one atomic decrement). With none left it asks
//!   Redis for a lease itself (one round trip, one request at a time per bucket); when Redis has
//!   none to give either, requests are refused locally until the next cell's time (or the next
//!   sync).
//! - Every admitted request therefore spent a cell reserved in Redis's GCRA, at most one sync
//!   interval after it was reserved: across the fleet the accepted traffic over a window W stays
//!   within the burst plus the rate over W + [`SYNC_INTERVAL`] while Redis answers (a cell
//!   spent late can meet cells Redis has handed out again since its time passed; making cells
//!   lapse at their time costs a Redis trip per burst on the request path for short bursts). A
//!   lease not used is held back for at most one sync interval. A bucket dropped with a lease
//!   (its cache entry made anew) leaves it to the next bucket of its name or to the next sync.
//! - Redis unreachable: each instance enforces the limit ÷ the live instances it last saw (every
//!   instance of the fleet: one with no bucket to sync still tells Redis it is there, every
//!   [`HEARTBEAT_NS`]), on a local bucket, says so in the log and in `keygate_cluster_degraded`, and goes back to the
//!   shared bucket once a sync succeeds. What instances admit during the outage is not known to
//!   Redis afterwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use super::RateLimit;
use super::bucket::{KeyLimiter, RateInfo, Refusal, emission_interval};
use super::store::{Store, StoreResult};
use crate::clock::Clock;

/// How often an instance gives back unused leases and takes new ones.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// A bucket without requests for this long is given back and forgotten by the instance.
const IDLE_AFTER_NS: u64 = 2_000_000_000;
/// How often an instance with no bucket to sync still tells Redis it is there, so that every
/// instance divides a limit by the whole fleet while Redis is unreachable (the traffic may move
/// to an instance that had none).
const HEARTBEAT_NS: u64 = 1_000_000_000;

/// One bucket in a sync call.
#[derive(Debug, Clone)]
pub struct BucketSync {
    /// The bucket's name, the same on every instance (its owner and its limit).
    pub name: String,
    /// Emission interval and tolerance, in microseconds.
    pub t_us: f64,
    pub tau_us: f64,
    /// Cells of the lease given back.
    pub unused: u64,
    /// Requests seen since the last sync.
    pub demand: u64,
    /// Ask for a lease (false: only give back).
    pub want: bool,
}

/// What Redis answered for one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub cells: u64,
    /// Microseconds until the bucket is full again (after this lease).
    pub until_full_us: u64,
}

/// The answer of a sync: the instances of the fleet (seen in the last seconds, with buckets
/// or not) and one lease per bucket, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReply {
    pub live: u32,
    pub leases: Vec<Lease>,
}

/// The state every cluster bucket of one instance shares, and the sync loop's registry.
pub struct ClusterShared {
    store: Arc<dyn Store>,
    instance: String,
    clock: Clock,
    buckets: Mutex<HashMap<String, Weak<ClusterBucket>>>,
    /// Cells of buckets dropped with a lease in hand (their owner's cache entry changed or went):
    /// taken over by the next bucket of the same name on this instance, else given back at the
    /// next sync. Without it they stayed reserved in Redis until their time passed (a client
    /// alone on an instance holds its whole room: a key's `PATCH` held it to the refill rate).
    orphans: Mutex<HashMap<String, Orphan>>,
    degraded: AtomicBool,
    /// Instances of the fleet seen at the last successful sync (at least 1), those without
    /// buckets included.
    live: AtomicU32,
    /// When this instance last told Redis it is there with no bucket to sync (monotonic ns).
    heartbeat_at: AtomicU64,
}

impl std::fmt::Debug for ClusterShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterShared")
            .field("instance", &self.instance)
            .finish()
    }
}

/// A dropped bucket's unused lease.
#[derive(Debug, Clone, Copy)]
struct Orphan {
    t_us: f64,
    tau_us: f64,
    cells: i64,
}

impl Orphan {
    /// The sync entry that gives the cells of bucket `name` back.
    fn returned((name, o): (String, Orphan)) -> BucketSync {
        BucketSync {
            name,
            t_us: o.t_us,
            tau_us: o.tau_us,
            unused: o.cells.max(0) as u64,
            demand: 0,
            want: false,
        }
    }
}

/// What one sync round did, for the metrics.
#[derive(Debug, Clone, Copy)]
pub struct Synced {
    pub ok: bool,
    pub took: Duration,
    pub buckets: usize,
}

impl ClusterShared {
    pub fn new(store: Arc<dyn Store>, clock: Clock) -> Arc<Self> {
        Arc::new(ClusterShared {
            store,
            instance: uuid::Uuid::now_v7().simple().to_string(),
            clock,
            buckets: Mutex::default(),
            orphans: Mutex::default(),
            degraded: AtomicBool::new(false),
            live: AtomicU32::new(1),
            heartbeat_at: AtomicU64::new(0),
        })
    }

    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    pub fn live(&self) -> u32 {
        self.live.load(Ordering::Relaxed).max(1)
    }

    /// The bucket `name` with `limit` (one per name and limit on this instance).
    pub fn bucket(self: &Arc<Self>, owner: &str, limit: RateLimit) -> Arc<ClusterBucket> {
        let t = emission_interval(&limit);
        let name = format!("{owner}:{}:{}", t.as_nanos(), limit.burst.max(1));
        let mut map = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = map.get(&name).and_then(Weak::upgrade) {
            return b;
        }
        let t_us = t.as_nanos() as f64 / 1000.0;
        let adopted = self
            .orphans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&name)
            .map_or(0, |o| o.cells);
        let b = Arc::new(ClusterBucket {
            t_us,
            tau_us: t_us * f64::from(limit.burst.max(1) - 1),
            burst: limit.burst.max(1),
            limit,
            lease: AtomicI64::new(adopted),
            demand: AtomicU64::new(0),
            refuse_until: AtomicU64::new(0),
            until_full_us: AtomicU64::new(0),
            last_seen: AtomicU64::new(self.clock.mono_nanos()),
            acquiring: tokio::sync::Mutex::new(()),
            fallback: Mutex::new(Arc::new(KeyLimiter::new(
                share_of(limit, self.live()),
                self.clock.clone(),
            ))),
            fallback_live: AtomicU32::new(self.live()),
            clock: self.clock.clone(),
            shared: Arc::clone(self),
            name: name.clone(),
        });
        map.insert(name, Arc::downgrade(&b));
        b
    }

    /// One sync round: gives back what active buckets did not use and takes new leases.
    pub async fn sync(&self) -> Synced {
        let now = self.clock.mono_nanos();
        let mut active = Vec::new();
        {
            let mut map = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
            map.retain(|_, w| w.strong_count() > 0);
            for b in map.values().filter_map(Weak::upgrade) {
                let idle = now.saturating_sub(b.last_seen.load(Ordering::Relaxed)) > IDLE_AFTER_NS;
                if !idle || b.lease.load(Ordering::Relaxed) > 0 {
                    active.push((b, idle));
                }
            }
        }
        let mut orphans: HashMap<String, Orphan> =
            std::mem::take(&mut *self.orphans.lock().unwrap_or_else(PoisonError::into_inner));
        if active.is_empty() && orphans.is_empty() {
            let due = now.saturating_sub(self.heartbeat_at.load(Ordering::Relaxed)) >= HEARTBEAT_NS;
            if due {
                self.heartbeat_at.store(now, Ordering::Relaxed);
                match self.store.sync_rates(&self.instance, &[]).await {
                    Ok(reply) => self.recovered(reply.live),
                    Err(e) => self.failed(&e.to_string()),
                }
            }
            return Synced {
                ok: !self.degraded(),
                took: Duration::ZERO,
                buckets: 0,
            };
        }
        let mut request: Vec<BucketSync> = active
            .iter()
            .map(|(b, idle)| BucketSync {
                name: b.name.clone(),
                t_us: b.t_us,
                tau_us: b.tau_us,
                // With the cells of a bucket of this name dropped since the last sync (one
                // made again while the old one was still being dropped).
                unused: (b.lease.swap(0, Ordering::AcqRel).max(0)
                    + orphans.remove(&b.name).map_or(0, |o| o.cells.max(0)))
                    as u64,
                demand: b.demand.swap(0, Ordering::AcqRel),
                want: !idle,
            })
            .collect();
        // After the active buckets, so the replies line up with `active`.
        request.extend(orphans.into_iter().map(Orphan::returned));
        let start = std::time::Instant::now();
        let reply = self.store.sync_rates(&self.instance, &request).await;
        let took = start.elapsed();
        match reply {
            Ok(reply) if reply.leases.len() == request.len() => {
                self.recovered(reply.live);
                for ((b, _), lease) in active.iter().zip(&reply.leases) {
                    b.granted(*lease);
                }
                Synced {
                    ok: true,
                    took,
                    buckets: active.len(),
                }
            }
            other => {
                // The leases given back are lost with the call (held back, never over-spent);
                // the demand is counted again.
                for ((b, _), r) in active.iter().zip(&request) {
                    b.demand.fetch_add(r.demand, Ordering::Relaxed);
                }
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "a reply of the wrong length".to_owned(),
                };
                self.failed(&why);
                Synced {
                    ok: false,
                    took,
                    buckets: active.len(),
                }
            }
        }
    }

    fn recovered(&self, live: u32) {
        self.live.store(live.max(1), Ordering::Relaxed);
        if self.degraded.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                live_instances = live,
                "cluster rate limits: Redis answers again; back to the shared buckets"
            );
        }
    }

    fn failed(&self, why: &str) {
        if !self.degraded.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                error = why,
                live_instances = self.live(),
                "cluster rate limits: Redis unreachable; each instance now enforces limit ÷ {} (the live instances last seen) on its own",
                self.live()
            );
        }
    }
}

/// `limit` ÷ `n`: the rate and the burst divided (at least 1 each).
fn share_of(limit: RateLimit, n: u32) -> RateLimit {
    let n = n.max(1);
    let part = |v: Option<u32>| v.map(|v| (v / n).max(1));
    RateLimit {
        per_second: part(limit.per_second),
        per_minute: part(limit.per_minute),
        per_hour: part(limit.per_hour),
        burst: (limit.burst / n).max(1),
    }
}

/// One plan bucket of the cluster, as this instance holds it.
pub struct ClusterBucket {
    name: String,
    t_us: f64,
    tau_us: f64,
    burst: u32,
    limit: RateLimit,
    /// Cells reserved for this instance and not yet used.
    lease: AtomicI64,
    /// Requests seen since the last sync.
    demand: AtomicU64,
    /// Monotonic nanoseconds before which requests are refused without asking Redis.
    refuse_until: AtomicU64,
    until_full_us: AtomicU64,
    last_seen: AtomicU64,
    /// One lease request to Redis at a time from the request path.
    acquiring: tokio::sync::Mutex<()>,
    /// The limit ÷ live instances, enforced while Redis is unreachable.
    fallback: Mutex<Arc<KeyLimiter>>,
    fallback_live: AtomicU32,
    clock: Clock,
    /// Held strongly (the registry holds buckets weakly, so there is no cycle): the request
    /// path reads it without an upgrade.
    shared: Arc<ClusterShared>,
}

impl Drop for ClusterBucket {
    /// Hands an unused lease to the registry: the next bucket of this name takes it over, or
    /// the next sync gives it back.
    fn drop(&mut self) {
        let cells = *self.lease.get_mut();
        if cells > 0 {
            let mut orphans = self
                .shared
                .orphans
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let o = orphans
                .entry(std::mem::take(&mut self.name))
                .or_insert(Orphan {
                    t_us: self.t_us,
                    tau_us: self.tau_us,
                    cells: 0,
                });
            o.cells += cells;
        }
    }
}

/// Gives back every lease this instance holds (at shutdown: the cells return to the fleet now,
/// not when their time passes).
pub async fn give_back(shared: &Arc<ClusterShared>) {
    let held: Vec<Arc<ClusterBucket>> = shared
        .buckets
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .filter_map(Weak::upgrade)
        .collect();
    let mut request: Vec<BucketSync> = held
        .iter()
        .filter_map(|b| {
            let unused = b.lease.swap(0, Ordering::AcqRel);
            (unused > 0).then(|| BucketSync {
                name: b.name.clone(),
                t_us: b.t_us,
                tau_us: b.tau_us,
                unused: unused as u64,
                demand: 0,
                want: false,
            })
        })
        .collect();
    let orphans = std::mem::take(
        &mut *shared
            .orphans
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    request.extend(orphans.into_iter().map(Orphan::returned));
    if !request.is_empty()
        && let Err(e) = shared.store.sync_rates(&shared.instance, &request).await
    {
        tracing::warn!(error = %e, "cluster rate limits: the leases held could not be given back at shutdown");
    }
}

impl std::fmt::Debug for ClusterBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBucket")
            .field("burst", &self.burst)
            .finish()
    }
}

impl ClusterBucket {
    /// What a request admitted with `lease_left` cells still in this instance's lease learns:
    /// those cells and the room Redis held beyond every instance's leases at its last answer
    /// (the client may spend that through this instance or another). The lease alone
    /// said 49 where the fleet's bucket held 99, and 0 where the next request was admitted.
    fn info(&self, lease_left: u64) -> RateInfo {
        let until_full = self.until_full_us.load(Ordering::Relaxed);
        let room = ((self.tau_us + self.t_us - until_full as f64) / self.t_us).max(0.0) as u64;
        RateInfo {
            limit: self.burst,
            remaining: lease_left.saturating_add(room).min(u64::from(self.burst)) as u32,
            reset_secs: until_full.div_ceil(1_000_000),
            credits: None,
            quota: None,
        }
    }

    /// Takes one cell of the lease.
    fn take(&self) -> Option<RateInfo> {
        let mut l = self.lease.load(Ordering::Acquire);
        while l > 0 {
            match self
                .lease
                .compare_exchange_weak(l, l - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(self.info((l - 1) as u64)),
                Err(now) => l = now,
            }
        }
        None
    }

    fn granted(&self, lease: Lease) {
        self.until_full_us
            .store(lease.until_full_us, Ordering::Relaxed);
        if lease.cells > 0 {
            self.lease.fetch_add(lease.cells as i64, Ordering::AcqRel);
            self.refuse_until.store(0, Ordering::Relaxed);
        }
    }

    fn refusal(&self, now: u64) -> Refusal {
        let until = self.refuse_until.load(Ordering::Relaxed);
        let retry_after = Duration::from_nanos(until.saturating_sub(now))
            .max(Duration::from_micros(self.t_us as u64).min(Duration::from_secs(1)));
        Refusal {
            limit: self.burst,
            retry_after,
            full_after: retry_after.saturating_add(Duration::from_micros(self.tau_us as u64)),
        }
    }

    /// Admits one request against the shared bucket.
    pub async fn check(&self) -> Result<RateInfo, Refusal> {
        let shared = &self.shared;
        let now = shared.clock.mono_nanos();
        self.last_seen.store(now, Ordering::Relaxed);
        self.demand.fetch_add(1, Ordering::Relaxed);
        if shared.degraded() {
            return self.fallback_check(shared.live());
        }
        if let Some(info) = self.take() {
            return Ok(info);
        }
        if now < self.refuse_until.load(Ordering::Relaxed) {
            return Err(self.refusal(now));
        }
        // No lease: ask Redis, one request at a time; the others find the lease it brought.
        let _one = self.acquiring.lock().await;
        if let Some(info) = self.take() {
            return Ok(info);
        }
        let now = shared.clock.mono_nanos();
        if now < self.refuse_until.load(Ordering::Relaxed) {
            return Err(self.refusal(now));
        }
        let ask = BucketSync {
            name: self.name.clone(),
            t_us: self.t_us,
            tau_us: self.tau_us,
            unused: 0,
            demand: self.demand.load(Ordering::Relaxed).max(1),
            want: true,
        };
        match acquire(shared, ask).await {
            Ok(reply) => {
                shared.recovered(reply.live);
                let lease = reply.leases.first().copied().unwrap_or(Lease {
                    cells: 0,
                    until_full_us: 0,
                });
                self.granted(lease);
                match self.take() {
                    Some(info) => Ok(info),
                    None => {
                        // Nothing to give: wait for the next cell's time (asking Redis again
                        // then, unless the sync brings one before), at least one emission
                        // interval or the sync's, whichever is shorter. (It waited at least the
                        // sync's 50 ms: a plan of 100/s with a burst of 1 got 20 a second.)
                        let floor = self.t_us.min(SYNC_INTERVAL.as_micros() as f64);
                        let wait = Duration::from_micros(
                            (lease.until_full_us as f64 - self.tau_us).max(floor) as u64,
                        );
                        self.refuse_until
                            .store(now + wait.as_nanos() as u64, Ordering::Relaxed);
                        Err(self.refusal(now))
                    }
                }
            }
            Err(e) => {
                shared.failed(&e.to_string());
                self.fallback_check(shared.live())
            }
        }
    }

    /// Gives back the cell a successful [`ClusterBucket::check`] took (the request was refused
    /// by a limit checked after this one): to the lease, or to the fallback bucket while Redis
    /// is unreachable.
    pub fn give_back(&self) {
        if self.shared.degraded() {
            let b = Arc::clone(&self.fallback.lock().unwrap_or_else(PoisonError::into_inner));
            b.give_back();
        } else {
            self.lease.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn fallback_check(&self, live: u32) -> Result<RateInfo, Refusal> {
        let b = {
            let mut f = self.fallback.lock().unwrap_or_else(PoisonError::into_inner);
            if self.fallback_live.swap(live, Ordering::Relaxed) != live {
                *f = Arc::new(KeyLimiter::new(
                    share_of(self.limit, live),
                    self.clock.clone(),
                ));
            }
            Arc::clone(&f)
        };
        b.check()
    }
}

async fn acquire(shared: &ClusterShared, ask: BucketSync) -> StoreResult<SyncReply> {
    shared
        .store
        .sync_rates(&shared.instance, std::slice::from_ref(&ask))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    fn per_second(n: u32, burst: u32) -> RateLimit {
        RateLimit {
            per_second: Some(n),
            per_minute: None,
            per_hour: None,
            burst,
        }
    }

    /// A bucket dropped with cells in hand leaves them to the next bucket of its name.
    #[test]
    fn a_dropped_buckets_lease_goes_to_the_next_of_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::keys::store::sqlite::SqliteStore::open(&dir.path().join("k.db")).unwrap();
        let clock = FakeClock::new();
        let shared = ClusterShared::new(Arc::new(store), clock.clock());
        let b = shared.bucket("c:acme", per_second(1000, 10));
        b.granted(Lease {
            cells: 5,
            until_full_us: 10_000,
        });
        drop(b);
        let again = shared.bucket("c:acme", per_second(1000, 10));
        assert_eq!(std::iter::from_fn(|| again.take()).count(), 5);
        // Another limit is another bucket: nothing to take over.
        let other = shared.bucket("c:acme", per_second(10, 10));
        assert!(other.take().is_none());
        // A cell given back (its request refused by a later limit) goes back to the lease.
        other.give_back();
        assert!(other.take().is_some());
        assert!(other.take().is_none());
    }

    /// `RateLimit-Remaining` in cluster mode: the cells left in this instance's lease and the
    /// room Redis held beyond all leases at its last answer, never more than the burst.
    #[test]
    fn remaining_counts_the_lease_and_the_room_redis_still_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::keys::store::sqlite::SqliteStore::open(&dir.path().join("k.db")).unwrap();
        let clock = FakeClock::new();
        let shared = ClusterShared::new(Arc::new(store), clock.clock());
        // 100 a minute (a cell every 0.6 s), burst 100.
        let limit = RateLimit {
            per_second: None,
            per_minute: Some(100),
            per_hour: None,
            burst: 100,
        };
        let cell = 600_000;
        let b = shared.bucket("c:fleet", limit);
        // Half the bucket leased here (the other half still in Redis).
        b.granted(Lease {
            cells: 50,
            until_full_us: 50 * cell,
        });
        assert_eq!(b.take().unwrap().remaining, 99);
        // Every cell leased (here and elsewhere): this lease's cells only.
        b.granted(Lease {
            cells: 0,
            until_full_us: 100 * cell,
        });
        assert_eq!(b.take().unwrap().remaining, 48);
        // Never above the burst.
        b.granted(Lease {
            cells: 60,
            until_full_us: 0,
        });
        assert_eq!(b.take().unwrap().remaining, 100);
    }

    #[test]
    fn a_share_divides_rate_and_burst() {
        let l = RateLimit {
            per_second: None,
            per_minute: Some(100),
            per_hour: None,
            burst: 100,
        };
        let s = share_of(l, 3);
        assert_eq!((s.per_minute, s.burst), (Some(33), 33));
        assert_eq!(share_of(l, 1), l);
        assert_eq!(share_of(l, 1000).burst, 1);
    }
}
