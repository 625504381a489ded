//! Memory per cached key: fills the real `KeyCache` with N principals, built the way a cache
//! fill builds them (the key's rate-limit bucket from `KeyLimits`, identity headers
//! pre-encoded), and reports the growth of VmRSS per key.
//!
//! `cargo run --release --example cache_rss -- 100000 1000000` (each size and part runs in a
//! process of its own; the key records are made before the first reading).

use std::sync::Arc;
use std::time::Duration;

use keygate::clock::Clock;
use keygate::keys::cache::{CacheSettings, Cached, KeyCache};
use keygate::keys::{ApiKey, KeyHash, KeyRecord, Principal, RateLimit};
use keygate::limit::KeyLimits;
use uuid::Uuid;

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn record(i: usize, now: i64) -> (KeyHash, KeyRecord) {
    let (record, new) = ApiKey::builder()
        .client(format!("client-{i:07}"))
        .name("default")
        .permissions(&["read", "write"])
        .created_at(now)
        .record("pro");
    (new.hash, record)
}

/// What to hold per key: everything (`all`), or one part, for the breakdown.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    All,
    /// Only the limiter registry and buckets.
    Buckets,
    /// Only the principals (one shared bucket), kept in a `Vec`.
    Principals,
    /// Only the cache's own entries (negative entries, no principal).
    Entries,
}

fn measure(n: usize, part: Part) {
    let clock = Clock::real();
    let cache = KeyCache::new(
        &CacheSettings {
            // Room to spare: nothing is evicted while the table fills.
            capacity: 2 * n as u64,
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(3600),
            stale_if_error: Duration::from_secs(300),
        },
        clock.clone(),
    );
    let limit = RateLimit {
        per_second: Some(100),
        per_minute: None,
        per_hour: None,
        burst: 200,
    };
    let limits = KeyLimits::new(limit, Default::default(), clock.clone());
    let shared = limits.bucket(Uuid::now_v7(), limit);
    let mut principals = Vec::new();
    let now = clock.now_millis();
    let records: Vec<(KeyHash, KeyRecord)> = (0..n).map(|i| record(i, now)).collect();
    let before = vm_rss_kib();
    for (hash, rec) in &records {
        let epoch = cache.epoch();
        match part {
            Part::All => {
                // What `Authenticator::fill` does on a miss, minus the store read.
                let bucket = limits.bucket(rec.key.id, limits.resolve(None, &rec.license));
                let p: Arc<Principal> = Principal::from_record(rec, hash, bucket);
                cache.insert(*hash, Cached::Found(p), now, epoch);
            }
            Part::Buckets => {
                limits.bucket(rec.key.id, limit);
            }
            Part::Principals => {
                principals.push(Principal::from_record(rec, hash, Arc::clone(&shared)));
            }
            Part::Entries => cache.insert(*hash, Cached::Unknown, now, epoch),
        }
    }
    let held = cache.entry_count();
    let buckets = limits.len();
    let after = vm_rss_kib();
    let per_key = (after.saturating_sub(before) as f64 * 1024.0) / n as f64;
    let what = match part {
        Part::All => "per cached key (cache entry + principal + limiter bucket)",
        Part::Buckets => "of it in the limiter registry and bucket",
        Part::Principals => "of it in the principal",
        Part::Entries => "of it in the cache entry itself",
    };
    println!(
        "{n:>9} keys: VmRSS {before} KiB -> {after} KiB: {per_key:>5.0} bytes {what} \
         ({held} cache entries, {buckets} buckets, {} principals)",
        principals.len()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let part = match args
        .iter()
        .find(|a| a.starts_with("--part="))
        .map(String::as_str)
    {
        Some("--part=buckets") => Some(Part::Buckets),
        Some("--part=principals") => Some(Part::Principals),
        Some("--part=entries") => Some(Part::Entries),
        Some("--part=all") => Some(Part::All),
        _ => None,
    };
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    match (sizes.as_slice(), part) {
        ([n], Some(part)) => measure(*n, part),
        _ => {
            // One process per size, so memory freed by one run cannot be reused by the next.
            let sizes = if sizes.is_empty() {
                vec![100_000, 1_000_000]
            } else {
                sizes
            };
            let exe = std::env::current_exe().expect("own path");
            for n in sizes {
                for part in ["all", "buckets", "principals", "entries"] {
                    let status = std::process::Command::new(&exe)
                        .arg(n.to_string())
                        .arg(format!("--part={part}"))
                        .status()
                        .expect("run");
                    assert!(status.success());
                }
            }
        }
    }
}
