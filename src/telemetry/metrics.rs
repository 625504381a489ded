//! Prometheus metrics without locks on the request path: every series is created at startup
//! (routes, outcomes and status classes are known then) and updated with relaxed atomics.
//! Labels are route names from the config, outcome codes and listener names — never a key,
//! a hash, a token or a raw request path.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

/// Pauses of `[server] event_coalesce_us` taken, over every worker thread of the process
/// (`keygate_event_loop_pauses_total`; counted by `runtime`, which builds the event loop
/// before any `Metrics` exists).
pub static EVENT_LOOP_PAUSES: Counter = Counter::new();

impl Counter {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default, Debug)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bucket upper bounds in seconds, for latencies from 100 µs to 10 s.
const LATENCY_BOUNDS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

#[derive(Debug)]
pub struct Histogram {
    /// Non-cumulative counts per bound, plus one for +Inf.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            d.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = LATENCY_BOUNDS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// Authentication outcomes, by their error code (plus `valid`).
pub const AUTH_OUTCOMES: [&str; 10] = [
    "valid",
    "missing_credentials",
    "invalid_api_key",
    "expired_api_key",
    "disabled_api_key",
    "invalid_token",
    "insufficient_permissions",
    "rate_limited",
    "store_unavailable",
    "public",
];

pub const CACHE_RESULTS: [&str; 4] = ["hit", "miss", "negative_hit", "stale_served"];
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
pub const LISTENERS: [&str; 2] = ["proxy", "admin"];

/// Requests refused by a limit, by the kind of limit.
pub const LIMIT_KINDS: [&str; 2] = ["rate_limited", "quota_exhausted"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// A rate limit (the key's, its client's, or a route's).
    RateLimited = 0,
    /// Credits or a quota used up.
    QuotaExhausted = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheResult {
    Hit = 0,
    Miss = 1,
    NegativeHit = 2,
    StaleServed = 3,
}

/// Requests of one route by status class.
#[derive(Debug, Default)]
pub struct RouteCounters {
    by_class: [Counter; 5],
}

impl RouteCounters {
    pub fn record(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].inc();
    }
}

#[derive(Debug)]
pub struct Metrics {
    route_names: Vec<String>,
    /// One per route, in route-table order, plus one last for requests that matched none.
    routes: Vec<RouteCounters>,
    auth: [Counter; AUTH_OUTCOMES.len()],
    cache: [Counter; CACHE_RESULTS.len()],
    pub store_latency: Histogram,
    pub store_errors: Counter,
    pub upstream_latency: Histogram,
    pub upstream_errors: Counter,
    connections: [Gauge; LISTENERS.len()],
    connections_refused: [Counter; LISTENERS.len()],
    pub invalidation_lag: Histogram,
    pub invalidations_received: Counter,
    pub usage_flushes: Counter,
    pub usage_flush_errors: Counter,
    /// Webhook deliveries waiting in the outbox (as last read from the store).
    pub webhook_pending: Gauge,
    pub webhook_delivered: Counter,
    /// Deliveries given up after retrying for `events.give_up_after_secs`.
    pub webhook_failed: Counter,
    /// Attempts that did not get a 2xx (each is retried unless given up).
    pub webhook_attempt_errors: Counter,
    limit_refusals: [Counter; LIMIT_KINDS.len()],
    /// Cluster rate limits: one sync round trip (lease given back and taken) per observation.
    pub cluster_sync: Histogram,
    /// 1 while Redis is unreachable and each instance enforces its share on its own.
    pub cluster_degraded: Gauge,
    /// Instances seen alive at the last successful sync.
    pub cluster_live: Gauge,
}

impl Metrics {
    /// `route_names` in route-table order.
    pub fn new(route_names: Vec<String>) -> Self {
        let routes = (0..=route_names.len())
            .map(|_| RouteCounters::default())
            .collect();
        Self {
            route_names,
            routes,
            auth: Default::default(),
            cache: Default::default(),
            store_latency: Histogram::default(),
            store_errors: Counter::default(),
            upstream_latency: Histogram::default(),
            upstream_errors: Counter::default(),
            connections: Default::default(),
            connections_refused: Default::default(),
            invalidation_lag: Histogram::default(),
            invalidations_received: Counter::default(),
            usage_flushes: Counter::default(),
            usage_flush_errors: Counter::default(),
            webhook_pending: Gauge::default(),
            webhook_delivered: Counter::default(),
            webhook_failed: Counter::default(),
            webhook_attempt_errors: Counter::default(),
            limit_refusals: Default::default(),
            cluster_sync: Histogram::default(),
            cluster_degraded: Gauge::default(),
            cluster_live: Gauge::default(),
        }
    }

    /// Counters of route `index` (`None`: no route matched).
    pub fn route(&self, index: Option<usize>) -> &RouteCounters {
        let last = self.routes.len() - 1;
        &self.routes[index.unwrap_or(last).min(last)]
    }

    /// Counts an authentication outcome by its code (unknown codes are ignored).
    pub fn auth(&self, outcome: &str) {
        if let Some(i) = AUTH_OUTCOMES.iter().position(|&o| o == outcome) {
            self.auth[i].inc();
        }
    }

    pub fn auth_count(&self, outcome: &str) -> u64 {
        AUTH_OUTCOMES
            .iter()
            .position(|&o| o == outcome)
            .map_or(0, |i| self.auth[i].get())
    }

    pub fn limit_refused(&self, kind: LimitKind) {
        self.limit_refusals[kind as usize].inc();
    }

    pub fn limit_refusals(&self, kind: LimitKind) -> u64 {
        self.limit_refusals[kind as usize].get()
    }

    pub fn cache(&self, r: CacheResult) {
        self.cache[r as usize].inc();
    }

    /// `n` results of one kind at once.
    pub fn cache_n(&self, r: CacheResult, n: u64) {
        self.cache[r as usize].add(n);
    }

    pub fn connection_opened(&self, listener: &str) {
        if let Some(i) = LISTENERS.iter().position(|&l| l == listener) {
            self.connections[i].inc();
        }
    }

    pub fn connection_closed(&self, listener: &str) {
        if let Some(i) = LISTENERS.iter().position(|&l| l == listener) {
            self.connections[i].dec();
        }
    }

    /// Counts a connection closed at once because its address had too many open already
    /// (`limits.max_connections_per_ip`).
    pub fn connection_refused(&self, listener: &str) {
        if let Some(i) = LISTENERS.iter().position(|&l| l == listener) {
            self.connections_refused[i].inc();
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        out.push_str("# HELP keygate_requests_total Proxied requests by route and status class.\n");
        out.push_str("# TYPE keygate_requests_total counter\n");
        for (i, c) in self.routes.iter().enumerate() {
            let route = self.route_names.get(i).map_or("(none)", String::as_str);
            for (j, class) in STATUS_CLASSES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "keygate_requests_total{{route=\"{}\",status=\"{class}\"}} {}",
                    escape(route),
                    c.by_class[j].get()
                );
            }
        }
        out.push_str("# HELP keygate_auth_total Authentication outcomes on the proxy.\n");
        out.push_str("# TYPE keygate_auth_total counter\n");
        for (i, o) in AUTH_OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "keygate_auth_total{{outcome=\"{o}\"}} {}",
                self.auth[i].get()
            );
        }
        out.push_str("# HELP keygate_cache_total Key cache lookups by result.\n");
        out.push_str("# TYPE keygate_cache_total counter\n");
        for (i, r) in CACHE_RESULTS.iter().enumerate() {
            let _ = writeln!(
                out,
                "keygate_cache_total{{result=\"{r}\"}} {}",
                self.cache[i].get()
            );
        }
        out.push_str("# HELP keygate_store_duration_seconds Store round trips.\n");
        out.push_str("# TYPE keygate_store_duration_seconds histogram\n");
        self.store_latency
            .render(&mut out, "keygate_store_duration_seconds", "");
        counter(
            &mut out,
            "keygate_store_errors_total",
            "Failed store calls.",
            self.store_errors.get(),
        );
        out.push_str(
            "# HELP keygate_upstream_duration_seconds Time to the upstream's response head.\n",
        );
        out.push_str("# TYPE keygate_upstream_duration_seconds histogram\n");
        self.upstream_latency
            .render(&mut out, "keygate_upstream_duration_seconds", "");
        counter(
            &mut out,
            "keygate_upstream_errors_total",
            "Upstream connect failures and timeouts.",
            self.upstream_errors.get(),
        );
        out.push_str("# HELP keygate_connections Open connections by listener.\n");
        out.push_str("# TYPE keygate_connections gauge\n");
        for (i, l) in LISTENERS.iter().enumerate() {
            let _ = writeln!(
                out,
                "keygate_connections{{listener=\"{l}\"}} {}",
                self.connections[i].get()
            );
        }
        out.push_str("# HELP keygate_connections_refused_total Connections closed at once: their client address had limits.max_connections_per_ip open already.\n");
        out.push_str("# TYPE keygate_connections_refused_total counter\n");
        for (i, l) in LISTENERS.iter().enumerate() {
            let _ = writeln!(
                out,
                "keygate_connections_refused_total{{listener=\"{l}\"}} {}",
                self.connections_refused[i].get()
            );
        }
        out.push_str("# HELP keygate_invalidation_lag_seconds Time from a write on another instance to its cache invalidation here.\n");
        out.push_str("# TYPE keygate_invalidation_lag_seconds histogram\n");
        self.invalidation_lag
            .render(&mut out, "keygate_invalidation_lag_seconds", "");
        counter(
            &mut out,
            "keygate_invalidations_received_total",
            "Invalidations received from the shared store.",
            self.invalidations_received.get(),
        );
        counter(
            &mut out,
            "keygate_usage_flushes_total",
            "Batched writes of last_used_at and usage counts.",
            self.usage_flushes.get(),
        );
        counter(
            &mut out,
            "keygate_usage_flush_errors_total",
            "Failed batched usage writes (retried on the next flush).",
            self.usage_flush_errors.get(),
        );
        let _ = writeln!(
            out,
            "# HELP keygate_webhook_events_pending Webhook deliveries waiting in the outbox.\n# TYPE keygate_webhook_events_pending gauge\nkeygate_webhook_events_pending {}",
            self.webhook_pending.get()
        );
        counter(
            &mut out,
            "keygate_webhook_events_delivered_total",
            "Webhook deliveries answered 2xx by their receiver.",
            self.webhook_delivered.get(),
        );
        counter(
            &mut out,
            "keygate_webhook_events_failed_total",
            "Webhook deliveries given up after retrying for events.give_up_after_secs.",
            self.webhook_failed.get(),
        );
        counter(
            &mut out,
            "keygate_webhook_attempt_errors_total",
            "Webhook delivery attempts that got no 2xx answer (retried with backoff).",
            self.webhook_attempt_errors.get(),
        );
        out.push_str("# HELP keygate_limit_refusals_total Requests refused by a limit, by kind.\n");
        out.push_str("# TYPE keygate_limit_refusals_total counter\n");
        for (i, k) in LIMIT_KINDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "keygate_limit_refusals_total{{kind=\"{k}\"}} {}",
                self.limit_refusals[i].get()
            );
        }
        out.push_str("# HELP keygate_cluster_sync_seconds Cluster rate limits: round trip of one lease sync with Redis (the lag of the shared buckets).\n");
        out.push_str("# TYPE keygate_cluster_sync_seconds histogram\n");
        self.cluster_sync
            .render(&mut out, "keygate_cluster_sync_seconds", "");
        out.push_str("# HELP keygate_cluster_degraded 1 while Redis is unreachable and this instance enforces limit / live instances on its own.\n");
        out.push_str("# TYPE keygate_cluster_degraded gauge\n");
        let _ = writeln!(
            out,
            "keygate_cluster_degraded {}",
            self.cluster_degraded.get()
        );
        out.push_str(
            "# HELP keygate_cluster_instances Instances of the fleet seen at the last cluster sync (with buckets to sync or not).\n",
        );
        out.push_str("# TYPE keygate_cluster_instances gauge\n");
        let _ = writeln!(out, "keygate_cluster_instances {}", self.cluster_live.get());
        counter(
            &mut out,
            "keygate_event_loop_pauses_total",
            "Pauses of [server] event_coalesce_us taken by a busy event loop before it waited for events (process-wide).",
            EVENT_LOOP_PAUSES.get(),
        );
        out
    }
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

/// Escapes a label value (route names come from the config).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new(vec!["/".into(), "/v1/extract".into()]);
        m.route(Some(1)).record(200);
        m.route(Some(1)).record(503);
        m.route(None).record(404);
        m.auth("valid");
        m.auth("invalid_api_key");
        m.auth("not-a-code");
        m.cache(CacheResult::Hit);
        m.store_latency.observe(Duration::from_micros(300));
        m.upstream_latency.observe(Duration::from_secs(20));
        m.connection_opened("proxy");
        m.connection_refused("admin");
        let text = m.render();
        for line in [
            "keygate_requests_total{route=\"/v1/extract\",status=\"2xx\"} 1",
            "keygate_requests_total{route=\"/v1/extract\",status=\"5xx\"} 1",
            "keygate_requests_total{route=\"(none)\",status=\"4xx\"} 1",
            "keygate_auth_total{outcome=\"valid\"} 1",
            "keygate_auth_total{outcome=\"invalid_api_key\"} 1",
            "keygate_cache_total{result=\"hit\"} 1",
            "keygate_store_duration_seconds_bucket{le=\"0.0005\"} 1",
            "keygate_store_duration_seconds_bucket{le=\"0.00025\"} 0",
            "keygate_store_duration_seconds_count 1",
            "keygate_upstream_duration_seconds_bucket{le=\"10\"} 0",
            "keygate_upstream_duration_seconds_bucket{le=\"+Inf\"} 1",
            "keygate_connections{listener=\"proxy\"} 1",
            "keygate_connections_refused_total{listener=\"admin\"} 1",
            "keygate_connections_refused_total{listener=\"proxy\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
