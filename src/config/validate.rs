//! Validation of the raw config, one function per section. Each section function appends every
//! problem it finds to [`Problems`] (naming the field and the fix) and returns that section's
//! validated value; a section whose value cannot be built at all (an address or URL that does
//! not parse) returns `None`, and has always said why in [`Problems`]. [`RawConfig::validate`]
//! runs every section, so one call reports the problems of all of them, and builds a
//! [`Config`] only when there are none.
//!
//! Sections depend on each other in two places only: routes without an upstream of their own
//! use the proxy's, and the token secret is required with a shared (Redis) store.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;

use super::{
    AdminConfig, Cidr, Config, ConfigErrors, DEFAULT_API_KEY_HEADER, ForwardAuth, JwtConfig,
    KeysConfig, Limits, LogConfig, LogFormat, MAX_JWT_LEEWAY_SECS, MAX_JWT_TTL_SECS,
    MAX_LISTEN_BACKLOG, MAX_TLS_SESSION_TICKETS, MIN_ADMIN_KEY_LEN, ProxyConfig, RawAdmin,
    RawConfig, RawForwardAuth, RawJwt, RawKeys, RawLimits, RawLog, RawPlan, RawProxy, RawRateLimit,
    RawRoute, RawServer, RawStore, Route, RouteAuth, StoreConfig, StoreUrl, TlsFiles,
};
use super::{PlanTerms, RateMode};
use crate::keys::{KeyHash, MAX_PREFIX_LEN, RateLimit};
use crate::runtime::{EventLoop, MAX_EVENT_COALESCE_US};

mod cors;

/// What validation found: errors stop startup, warnings are only reported.
#[derive(Default)]
struct Problems {
    errors: Vec<String>,
    warnings: Vec<String>,
}

impl Problems {
    fn error(&mut self, message: impl Into<String>) {
        self.errors.push(message.into());
    }

    fn warning(&mut self, message: impl Into<String>) {
        self.warnings.push(message.into());
    }
}

impl RawConfig {
    /// Checks everything and reports every problem, not just the first.
    pub fn validate(self) -> Result<Config, ConfigErrors> {
        let mut p = Problems::default();
        let proxy = proxy(self.proxy, &mut p);
        let admin = admin(self.admin, &mut p);
        let store = store(self.store, &mut p);
        let keys = keys(self.keys, &mut p);
        let cluster = self.rate_limit.mode;
        let (default_limit, failed_auth_limit) = rate_limit(self.rate_limit, &mut p);
        rate_mode(
            cluster,
            store
                .as_ref()
                .is_some_and(|s| matches!(s.url, StoreUrl::Redis(_))),
            &mut p,
        );
        let plans = plans(&self.plans, &mut p);
        let plan_terms = plan_terms(&self.plans, &mut p);
        let routes = routes(
            &self.routes,
            proxy.as_ref().map(|proxy| &proxy.upstream),
            &mut p,
        );
        let routes = route_cors(
            routes,
            &self.routes,
            proxy.as_ref().map(|proxy| &proxy.api_key_header),
            &mut p,
        );
        let limits = limits(&self.limits, &mut p);
        let (shutdown_grace, listen_backlog, event_loop) = server(&self.server, &mut p);
        let log = log(self.log, &mut p);
        let shared_store = store
            .as_ref()
            .is_some_and(|s| matches!(s.url, StoreUrl::Redis(_)));
        let jwt = jwt(self.jwt, shared_store, &mut p);
        let forward_auth = forward_auth(self.forward_auth, &self.routes, &mut p);
        let identity = super::identity::validate(self.identity, &mut p.errors);
        let webhooks = super::events::webhooks(self.webhooks, &mut p.errors);
        let events = super::events::events(&self.events, &mut p.errors);
        let secret_scanning = super::events::secret_scanning(self.secret_scanning, &mut p.errors);

        match (proxy, admin, store) {
            (Some(proxy), Some(admin), Some(store)) if p.errors.is_empty() => Ok(Config {
                proxy,
                admin,
                store,
                keys,
                default_limit,
                failed_auth_limit,
                plans,
                routes,
                limits,
                shutdown_grace,
                listen_backlog,
                event_loop,
                log,
                jwt,
                forward_auth,
                identity,
                webhooks,
                events,
                secret_scanning,
                warnings: p.warnings,
                plan_terms,
                rate_mode: cluster,
            }),
            _ => Err(ConfigErrors(p.errors)),
        }
    }
}

/// `[proxy]`: listener, catch-all upstream, credential sources, upstream timeouts, TLS.
/// `None` when the listen address or the upstream does not parse.
fn proxy(raw: RawProxy, p: &mut Problems) -> Option<ProxyConfig> {
    let listen = parse_addr("proxy.listen", &raw.listen, p);
    let upstream = parse_upstream("proxy.upstream", &raw.upstream, p);

    let api_key_header = match http::HeaderName::from_bytes(raw.api_key_header.as_bytes()) {
        // Fields with `_` and `x-keygate-*` are refused inbound (see proxy::headers): such a
        // name could never carry a key.
        Ok(h)
            if h != http::header::AUTHORIZATION
                && !h.as_str().contains('_')
                && !h.as_str().starts_with("x-keygate-") =>
        {
            h
        }
        _ => {
            p.error(format!(
                "proxy.api_key_header: {:?} is not a valid header name (other than Authorization, without '_', not x-keygate-*); e.g. \"x-api-key\"",
                raw.api_key_header
            ));
            http::HeaderName::from_static(DEFAULT_API_KEY_HEADER)
        }
    };
    if raw.allow_query_param
        && (raw.query_param.is_empty()
            || !raw
                .query_param
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'))
    {
        p.error("proxy.query_param: use letters, digits, '_' or '-' (e.g. \"api_key\")");
    }
    for (field, v) in [
        ("proxy.connect_timeout_ms", raw.connect_timeout_ms),
        ("proxy.upstream_timeout_ms", raw.upstream_timeout_ms),
    ] {
        if v == 0 {
            p.error(format!("{field}: must be at least 1"));
        }
    }

    let tls = tls_files("proxy", raw.tls_cert.as_deref(), raw.tls_key.as_deref(), p);
    if raw.tls_session_tickets > MAX_TLS_SESSION_TICKETS {
        p.error(format!(
            "proxy.tls_session_tickets: at most {MAX_TLS_SESSION_TICKETS} (is {}); 1 lets every \
             client resume its next connection, 0 turns resumption by ticket off",
            raw.tls_session_tickets
        ));
    }
    let upstream_ca = raw
        .upstream_ca
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    if let Some(ca) = &upstream_ca {
        if !ca.is_file() {
            p.error(format!(
                "proxy.upstream_ca: {} is not a readable file",
                ca.display()
            ));
        } else if let Err(e) = crate::tls::client_config(Some(ca)) {
            p.error(format!("proxy.upstream_ca: {e}"));
        }
    }

    let trusted_proxies = raw
        .trusted_proxies
        .iter()
        .filter_map(|c| {
            let cidr = Cidr::parse(c);
            if cidr.is_none() {
                p.error(format!(
                    "proxy.trusted_proxies: {c:?} is not an address or CIDR block (e.g. \"10.0.0.0/8\", \"::1\")"
                ));
            }
            cidr
        })
        .collect();

    let cors = raw
        .cors
        .as_ref()
        .and_then(|c| cors::cors("proxy.cors", c, &api_key_header, p));
    Some(ProxyConfig {
        cors,
        allow_method_override: raw.allow_method_override,
        allow_non_ascii_paths: raw.allow_non_ascii_paths,
        trusted_proxies,
        vary_credentials: raw.vary_credentials,
        cache_private: raw.cache_private,
        listen: listen?,
        upstream: upstream?,
        api_key_header,
        query_param: raw.allow_query_param.then_some(raw.query_param),
        connect_timeout: Duration::from_millis(raw.connect_timeout_ms),
        upstream_timeout: Duration::from_millis(raw.upstream_timeout_ms),
        tls,
        tls_session_tickets: raw.tls_session_tickets,
        upstream_ca,
    })
}

/// `[admin]`: listener, admin keys (short ones only on loopback, with a warning), request
/// limits, TLS. `None` when the listen address does not parse.
fn admin(raw: RawAdmin, p: &mut Problems) -> Option<AdminConfig> {
    let listen = parse_addr("admin.listen", &raw.listen, p);
    let loopback = listen.is_some_and(|a| a.ip().is_loopback());
    let key_hashes = admin_keys(&raw.keys, loopback, p);
    if raw.max_body_bytes == 0 {
        p.error("admin.max_body_bytes: must be at least 1");
    }
    if raw.self_service_permission.is_empty() {
        p.error("admin.self_service_permission: must not be empty");
    }
    let tls = tls_files("admin", raw.tls_cert.as_deref(), raw.tls_key.as_deref(), p);
    for (i, h) in raw.allowed_hosts.iter().enumerate() {
        let name = h.strip_suffix('.').unwrap_or(h);
        if name.is_empty()
            || name.len() > 253
            || name.starts_with(['.', '-'])
            || !name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
        {
            p.error(format!(
                "admin.allowed_hosts[{i}]: a host name (letters, digits, dots and hyphens; \
                 no port, no scheme)"
            ));
        }
    }
    // DNS rebinding: a page whose name resolves to 127.0.0.1 reaches a loopback listener from
    // the operator's browser, under its own name.
    let allowed_hosts = (loopback || !raw.allowed_hosts.is_empty()).then(|| {
        raw.allowed_hosts
            .iter()
            .map(|h| h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase())
            .collect()
    });
    Some(AdminConfig {
        listen: listen?,
        key_hashes,
        max_body_bytes: raw.max_body_bytes,
        self_service_permission: raw.self_service_permission,
        tls,
        allowed_hosts,
    })
}

/// `admin.keys`: plaintext or `sha256:<hex>` entries, as hashes.
fn admin_keys(keys: &[String], loopback: bool, p: &mut Problems) -> Vec<KeyHash> {
    let mut hashes = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        if let Some(hexed) = k.strip_prefix("sha256:") {
            match hex::decode(hexed)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
            {
                Some(h) => hashes.push(KeyHash(h)),
                None => p.error(format!(
                    "admin.keys[{i}]: a \"sha256:\" entry needs 64 hex characters (sha256sum of the key)"
                )),
            }
        } else if k.trim().is_empty() {
            p.error(format!("admin.keys[{i}]: empty admin key"));
        } else {
            if k.len() < MIN_ADMIN_KEY_LEN {
                if loopback {
                    p.warning(format!(
                        "admin.keys[{i}]: shorter than {MIN_ADMIN_KEY_LEN} characters; accepted only because the admin listener is on loopback"
                    ));
                } else {
                    p.error(format!(
                        "admin.keys[{i}]: shorter than {MIN_ADMIN_KEY_LEN} characters on a non-loopback admin listener; use a long random key (e.g. `openssl rand -hex 32`)"
                    ));
                }
            }
            hashes.push(KeyHash::of(k));
        }
    }
    hashes
}

/// `[store]`: the store URL and the cache in front of it. `None` when the URL is not usable.
fn store(raw: RawStore, p: &mut Problems) -> Option<StoreConfig> {
    let url = parse_store_url(&raw.url, p);
    if raw.cache_ttl_secs == 0 {
        p.error("store.cache_ttl_secs: must be at least 1");
    }
    // Upper bounds where a larger value would overflow a time or hold keys for ever.
    for (name, v, most) in [
        ("cache_ttl_secs", raw.cache_ttl_secs, DAY_SECS),
        ("negative_ttl_secs", raw.negative_ttl_secs, DAY_SECS),
        ("stale_if_error_secs", raw.stale_if_error_secs, 7 * DAY_SECS),
    ] {
        if v > most {
            p.error(format!("store.{name}: must be at most {most}"));
        }
    }
    if raw.cache_capacity == 0 {
        p.error("store.cache_capacity: must be at least 1");
    }
    if raw.last_used_flush_secs == 0 {
        p.error("store.last_used_flush_secs: must be at least 1");
    }
    let prefix = &raw.redis_prefix;
    if prefix.is_empty() || prefix.len() > 64 || !prefix.bytes().all(|c| c.is_ascii_graphic()) {
        p.error(format!(
            "store.redis_prefix: {prefix:?} must be 1–64 printable characters without spaces (e.g. \"keygate:\")"
        ));
    }
    let path = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(PathBuf::from);
    let redis_tls = crate::keys::store::redis::RedisTls {
        ca: path(&raw.redis_ca),
        client_cert: path(&raw.redis_client_cert),
        client_key: path(&raw.redis_client_key),
    };
    let is_cluster =
        raw.url.starts_with("redis+cluster://") || raw.url.starts_with("rediss+cluster://");
    if is_cluster {
        if let Some(problem) = crate::keys::store::redis::cluster_prefix_problem(prefix) {
            p.error(problem);
        }
        if raw.redis_wait_replicas > 0 {
            p.error(crate::keys::store::redis::WAIT_ON_CLUSTER);
        }
    }
    if raw.redis_wait_replicas > 16 {
        p.error("store.redis_wait_replicas: at most 16 (the replicas that must confirm each admin write)");
    }
    if raw.redis_wait_replicas > 0 && raw.url.starts_with("sqlite://") {
        p.error("store.redis_wait_replicas: only used with a Redis store");
    }
    if !redis_tls.is_empty() {
        if ["rediss://", "rediss+sentinel://", "rediss+cluster://"]
            .iter()
            .any(|s| raw.url.starts_with(s))
        {
            if let Err(why) = redis_tls.load() {
                p.error(format!("store.{why}"));
            }
        } else {
            p.error(
                "store.redis_ca / redis_client_cert / redis_client_key: only used with a rediss://, rediss+sentinel:// or rediss+cluster:// store URL",
            );
        }
    }
    Some(StoreConfig {
        url: url?,
        cache_ttl: Duration::from_secs(raw.cache_ttl_secs),
        negative_ttl: Duration::from_secs(raw.negative_ttl_secs),
        cache_capacity: raw.cache_capacity,
        stale_if_error: Duration::from_secs(raw.stale_if_error_secs),
        last_used_flush: Duration::from_secs(raw.last_used_flush_secs),
        redis_prefix: raw.redis_prefix,
        redis_tls,
        redis_wait_replicas: raw.redis_wait_replicas,
    })
}

/// `[keys]`: the key prefix and the per-client cap.
fn keys(raw: RawKeys, p: &mut Problems) -> KeysConfig {
    let prefix = &raw.prefix;
    if prefix.is_empty()
        || prefix.len() > MAX_PREFIX_LEN
        || !prefix
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_')
    {
        p.error(format!(
            "keys.prefix: {prefix:?} must be 1–{MAX_PREFIX_LEN} characters of [A-Za-z0-9_] (e.g. \"kg_\")"
        ));
    }
    KeysConfig {
        prefix: raw.prefix,
        max_per_client: raw.max_per_client,
    }
}

/// `[rate_limit]`: the default limit of a key and the failed-authentication limit of a peer,
/// in that order.
fn rate_limit(raw: RawRateLimit, p: &mut Problems) -> (RateLimit, RateLimit) {
    if let Some(why) = raw.default.config_problem() {
        p.error(format!("rate_limit.default: {why}"));
    }
    if let Some(why) = raw.failed_auth.config_problem() {
        p.error(format!("rate_limit.failed_auth: {why}"));
    }
    (raw.default, raw.failed_auth)
}

/// `[plans.NAME]`: each plan's limit (`None`: the default limit).
fn plans(raw: &BTreeMap<String, RawPlan>, p: &mut Problems) -> HashMap<String, Option<RateLimit>> {
    let mut plans = HashMap::new();
    for (name, plan) in raw {
        if let Some(why) = plan.rate_limit.and_then(|l| l.config_problem()) {
            p.error(format!("plans.{name}.rate_limit: {why}"));
        }
        plans.insert(name.clone(), plan.rate_limit);
    }
    plans
}

/// `[plans.NAME]`: each plan's scope and quota.
fn plan_terms(raw: &BTreeMap<String, RawPlan>, p: &mut Problems) -> HashMap<String, PlanTerms> {
    let mut terms = HashMap::new();
    for (name, plan) in raw {
        if let Some(q) = plan.quota
            && (q.requests == 0 || q.requests > crate::keys::allowance::MAX_CREDITS)
        {
            p.error(format!(
                "plans.{name}.quota.requests: must be between 1 and 10^15"
            ));
        }
        terms.insert(
            name.clone(),
            PlanTerms {
                scope: plan.scope,
                quota: plan.quota,
            },
        );
    }
    terms
}

/// `[rate_limit] mode`: `cluster` shares the plans' buckets through Redis, so it needs the
/// Redis store.
fn rate_mode(mode: RateMode, shared_store: bool, p: &mut Problems) {
    if mode == RateMode::Cluster && !shared_store {
        p.error(
            "rate_limit.mode: \"cluster\" needs the Redis store (store.url = \"redis://…\"); \
             with SQLite there is one instance: use \"local\"",
        );
    }
}

/// `[[routes]]`: paths, upstreams (`default_upstream` when a route names none; `None` when the
/// proxy's own did not parse), methods, auth and per-route limits. A route whose upstream is
/// unusable is left out (its problem is reported).
fn routes(raw: &[RawRoute], default_upstream: Option<&Uri>, p: &mut Problems) -> Vec<Route> {
    let mut routes = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let field = format!("routes[{i}]");
        if !r.path.starts_with('/') || crate::paths::check_path(&r.path, true).is_err() {
            p.error(format!(
                "{field}.path: {:?} must start with '/' and contain no dot-segments or encoded separators",
                r.path
            ));
        }
        if raw[..i].iter().any(|o| o.path == r.path) {
            p.error(format!("{field}.path: {:?} is defined twice", r.path));
        }
        let upstream = match &r.upstream {
            Some(u) => parse_upstream(&format!("{field}.upstream"), u, p),
            None => default_upstream.cloned(),
        };
        let mut methods = Vec::new();
        for m in &r.methods {
            match http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(m) => methods.push(m),
                Err(_) => p.error(format!("{field}.methods: {m:?} is not an HTTP method")),
            }
        }
        let auth = r.auth.unwrap_or(RouteAuth::Required);
        if let Some(why) = r.rate_limit.and_then(|l| l.config_problem()) {
            p.error(format!("{field}.rate_limit: {why}"));
        }
        if r.cost == Some(0)
            || r.cost
                .is_some_and(|c| c > crate::keys::allowance::MAX_CREDITS)
        {
            p.error(format!("{field}.cost: must be between 1 and 10^15"));
        }
        if auth == RouteAuth::None && r.cost.is_some() {
            p.error(format!(
                "{field}: auth = \"none\" cannot have a cost (no key is charged); remove it"
            ));
        }
        if auth == RouteAuth::None && (!r.permissions.is_empty() || r.rate_limit.is_some()) {
            p.error(format!(
                "{field}: auth = \"none\" cannot require permissions or a per-key rate_limit; remove them"
            ));
        }
        super::identity::check_audience(&field, r.audience.as_deref(), &mut p.errors);
        if let Some(upstream) = upstream {
            routes.push(Route {
                path: r.path.clone(),
                upstream,
                permissions: r.permissions.clone(),
                methods,
                auth,
                rate_limit: r.rate_limit,
                cors: None,
                audience: r.audience.clone(),
                cost: r.cost.unwrap_or(1),
            });
        }
    }
    routes
}

/// The `cors` table of each route (see [`cors::cors`]); `routes` holds the routes of `raw`
/// that were built, in order.
fn route_cors(
    mut routes: Vec<Route>,
    raw: &[RawRoute],
    api_key_header: Option<&http::HeaderName>,
    p: &mut Problems,
) -> Vec<Route> {
    let key = api_key_header
        .cloned()
        .unwrap_or(http::HeaderName::from_static(DEFAULT_API_KEY_HEADER));
    for (i, r) in raw.iter().enumerate() {
        let Some(c) = &r.cors else { continue };
        let cors = cors::cors(&format!("routes[{i}].cors"), c, &key, p);
        if let Some(route) = routes.iter_mut().find(|route| route.path == r.path) {
            route.cors = cors;
        }
    }
    routes
}

/// A day in seconds: the most a key may stay cached.
const DAY_SECS: u64 = 86_400;
/// The most `[limits] max_header_bytes` may be (1 MiB; HTTP/2's header list size is 32 bits).
const MAX_HEADER_BYTES: usize = 1 << 20;
/// The most `[limits] max_headers` may be: every request parsed gets that many slots.
const MAX_HEADERS: usize = 1000;
/// The most `[limits] max_connections` may be (per listener; far beyond any file limit).
const MAX_CONNECTIONS: usize = 1_000_000;

/// `[limits]`: request-head limits, timeouts on slow clients, the connection caps. The cap per
/// client address defaults to half of `max_connections`, so that one address can never take
/// every slot of a listener while a load balancer (whose address every connection it forwards
/// shares) still gets half of them.
fn limits(raw: &RawLimits, p: &mut Problems) -> Limits {
    if !(8192..=MAX_HEADER_BYTES).contains(&raw.max_header_bytes) {
        p.error(format!(
            "limits.max_header_bytes: must be from 8192 to {MAX_HEADER_BYTES}"
        ));
    }
    if !(1..=MAX_HEADERS).contains(&raw.max_headers) {
        p.error(format!(
            "limits.max_headers: must be from 1 to {MAX_HEADERS}"
        ));
    }
    if raw.header_read_timeout_secs == 0 {
        p.error("limits.header_read_timeout_secs: must be at least 1");
    }
    if raw.body_timeout_secs == 0 {
        p.error("limits.body_timeout_secs: must be at least 1");
    }
    if !(1..=MAX_CONNECTIONS).contains(&raw.max_connections) {
        p.error(format!(
            "limits.max_connections: must be from 1 to {MAX_CONNECTIONS}"
        ));
    }
    Limits {
        max_header_bytes: raw.max_header_bytes,
        max_headers: raw.max_headers,
        header_read_timeout: Duration::from_secs(raw.header_read_timeout_secs),
        body_timeout: Duration::from_secs(raw.body_timeout_secs),
        max_connections: raw.max_connections,
        max_connections_per_ip: raw
            .max_connections_per_ip
            .unwrap_or((raw.max_connections / 2).max(1)),
    }
}

/// `[server]`: the shutdown grace period, the listeners' backlog, and how the event loop waits:
/// the number of worker threads (0: one per core), busy polling and event coalescing. Busy
/// polling keeps one event loop from sleeping, so it needs exactly one worker thread: with
/// several, the runtime could not promise that each spins. A loop that never waits has no wait
/// to coalesce, so the two exclude each other.
/// The longest `server.shutdown_grace_secs` (a day): a stop's deadlines are that plus a few
/// seconds on the monotonic clock, which a larger value overflowed.
const MAX_SHUTDOWN_GRACE_SECS: u64 = 86_400;

fn server(raw: &RawServer, p: &mut Problems) -> (Duration, u32, EventLoop) {
    if !(1..=MAX_LISTEN_BACKLOG).contains(&raw.listen_backlog) {
        p.error(format!(
            "server.listen_backlog: 1 to {MAX_LISTEN_BACKLOG} (is {}); connections the kernel \
             queues on a listener until they are accepted",
            raw.listen_backlog
        ));
    }
    if raw.shutdown_grace_secs > MAX_SHUTDOWN_GRACE_SECS {
        p.error(format!(
            "server.shutdown_grace_secs: at most {MAX_SHUTDOWN_GRACE_SECS} (a day; is {}); how \
             long a stop waits for requests in flight",
            raw.shutdown_grace_secs
        ));
    }
    if raw.busy_polling && raw.worker_threads != 1 {
        p.error(format!(
            "server.busy_polling: needs worker_threads = 1 (is {}); run one keygate per core \
             to busy-poll on several",
            raw.worker_threads
        ));
    }
    if raw.event_coalesce_us > MAX_EVENT_COALESCE_US {
        p.error(format!(
            "server.event_coalesce_us: at most {MAX_EVENT_COALESCE_US} (is {}); a busy event \
             loop delays the events of each pause by up to its length",
            raw.event_coalesce_us
        ));
    }
    if raw.busy_polling && raw.event_coalesce_us > 0 {
        p.error(
            "server.event_coalesce_us: busy_polling never waits for events, so there is no \
             wait to coalesce; set one of the two"
                .to_owned(),
        );
    }
    (
        Duration::from_secs(raw.shutdown_grace_secs),
        raw.listen_backlog,
        EventLoop {
            worker_threads: raw.worker_threads,
            busy_polling: raw.busy_polling,
            coalesce: Duration::from_micros(raw.event_coalesce_us),
        },
    )
}

/// `[log]`: format, level (or filter) and the access log switch.
fn log(raw: RawLog, p: &mut Problems) -> LogConfig {
    if tracing_subscriber::EnvFilter::try_new(&raw.level).is_err() {
        p.error(format!(
            "log.level: {:?} is not a level or filter (e.g. \"info\" or \"keygate=debug\")",
            raw.level
        ));
    }
    if let Some(v) = &raw.env_format_refused {
        p.error(format!(
            "KEYGATE_LOG_FORMAT: {v:?} is neither \"json\" nor \"human\""
        ));
    }
    LogConfig {
        format: raw.format.unwrap_or(LogFormat::Human),
        level: raw.level,
        access_log: raw.access_log,
    }
}

/// `[forward_auth]`: the verify path must be a plain absolute path of its own: not the health,
/// login or key set path (nor above one), and not a route's path or above one (requests for that route would be
/// answered by the verify endpoint instead).
fn forward_auth(raw: RawForwardAuth, routes: &[RawRoute], p: &mut Problems) -> ForwardAuth {
    let path = raw.path.as_str();
    if raw.enabled {
        let plain = path.len() > 1
            && path.starts_with('/')
            && !path.ends_with('/')
            && !path.contains(['?', '#'])
            && crate::paths::check_path(path, false).is_ok();
        if !plain {
            p.error(format!(
                "forward_auth.path: {path:?} must start with '/', not be \"/\" or end with '/', and hold no query, dot-segments or encoded separators; e.g. \"/_keygate/verify\""
            ));
        }
        // The proxy listener's own paths (proxy::HEALTH_PATH, proxy::LOGIN_PATH, the key set
        // of signed identity, whether signing is on or not yet).
        for own in [
            "/_keygate/health",
            "/auth/login",
            crate::identity::JWKS_PATH,
        ] {
            if under(own, path) {
                p.error(format!(
                    "forward_auth.path: {path:?} would take the place of {own}; choose another path"
                ));
            }
        }
        for (i, r) in routes.iter().enumerate() {
            // Routes match whatever the letters' case (`route::Route::matches`).
            if under(&r.path.to_ascii_lowercase(), &path.to_ascii_lowercase()) {
                p.error(format!(
                    "forward_auth.path: {path:?} would answer the requests of routes[{i}] (path {:?}); choose another path",
                    r.path
                ));
            }
        }
    }
    ForwardAuth {
        path: raw.enabled.then_some(raw.path),
        deny: raw.deny,
    }
}

/// `path` is `prefix` or below it (whole segments).
fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `[jwt]`: the token secret (required when `shared_store`: every instance must verify the
/// tokens of the others), issuer, audience, lifetime and leeway.
fn jwt(raw: RawJwt, shared_store: bool, p: &mut Problems) -> JwtConfig {
    let secret = raw.secret.filter(|s| !s.is_empty());
    if secret
        .as_ref()
        .is_some_and(|s| s.len() < super::MIN_JWT_SECRET_LEN)
    {
        p.error(format!(
            "jwt.secret: must be at least {} bytes (e.g. `openssl rand -hex 32`)",
            super::MIN_JWT_SECRET_LEN
        ));
    }
    if secret.is_none() && shared_store {
        p.error(
            "jwt.secret: required with a shared (redis) store so tokens verify on every instance; set KEYGATE_JWT_SECRET",
        );
    }
    if !(1..=MAX_JWT_TTL_SECS).contains(&raw.ttl_secs) {
        p.error(format!(
            "jwt.ttl_secs: must be from 1 to {MAX_JWT_TTL_SECS}"
        ));
    }
    if raw.leeway_secs > MAX_JWT_LEEWAY_SECS {
        p.error(format!("jwt.leeway_secs: at most {MAX_JWT_LEEWAY_SECS}"));
    }
    if raw.issuer.is_empty() {
        p.error("jwt.issuer: must not be empty");
    }
    JwtConfig {
        secret: secret.map(crate::keys::Secret),
        issuer: raw.issuer,
        audience: raw.audience,
        ttl: Duration::from_secs(raw.ttl_secs),
        leeway: Duration::from_secs(raw.leeway_secs),
    }
}

fn parse_addr(field: &str, v: &str, p: &mut Problems) -> Option<SocketAddr> {
    match v.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            p.error(format!(
                "{field}: {v:?} is not an address; use IP:PORT, e.g. \"127.0.0.1:8080\""
            ));
            None
        }
    }
}

/// Both files or neither; each must exist.
fn tls_files(
    section: &str,
    cert: Option<&str>,
    key: Option<&str>,
    p: &mut Problems,
) -> Option<TlsFiles> {
    let cert = cert.filter(|s| !s.is_empty());
    let key = key.filter(|s| !s.is_empty());
    match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let mut found = true;
            for (field, path) in [("tls_cert", cert), ("tls_key", key)] {
                if !Path::new(path).is_file() {
                    p.error(format!("{section}.{field}: {path} is not a readable file"));
                    found = false;
                }
            }
            // Read as `serve` reads them: a file that is there but that it would refuse (bad
            // PEM, no certificate, a key of another certificate) is refused here too.
            if found && let Err(e) = crate::tls::load_certified_key(Path::new(cert), Path::new(key))
            {
                p.error(format!("{section}: {e}"));
            }
            Some(TlsFiles {
                cert: cert.into(),
                key: key.into(),
            })
        }
        _ => {
            p.error(format!(
                "{section}: set both tls_cert and tls_key (PEM files), or neither"
            ));
            None
        }
    }
}

fn parse_upstream(field: &str, v: &str, p: &mut Problems) -> Option<Uri> {
    // A user and password would be logged with failed requests, sent as the Host field and
    // signed into assertions' audience: refused, and not repeated.
    if v.parse::<Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.as_str().contains('@')))
        .unwrap_or(v.contains('@'))
    {
        p.error(format!(
            "{field}: must not carry a user or password (user:pass@host); keygate sends no credentials upstream"
        ));
        return None;
    }
    match v.parse::<Uri>() {
        Ok(u)
            if matches!(u.scheme_str(), Some("http" | "https"))
                && u.authority().is_some()
                && u.query().is_none()
                && matches!(u.path(), "" | "/") =>
        {
            Some(u)
        }
        _ => {
            // Not its query: a token there is a credential (`?token=…`).
            let shown = match v.split_once('?') {
                Some((before, _)) => format!("{before}?…"),
                None => v.to_owned(),
            };
            p.error(format!(
                "{field}: {shown:?} must be an http:// or https:// URL with a host and no path or query, e.g. \"http://127.0.0.1:9000\""
            ));
            None
        }
    }
}

fn parse_store_url(v: &str, p: &mut Problems) -> Option<StoreUrl> {
    if let Some(path) = v.strip_prefix("sqlite://") {
        if path.is_empty() {
            p.error("store.url: sqlite:// needs a file path, e.g. \"sqlite://data/keygate.db\"");
            return None;
        }
        return Some(StoreUrl::Sqlite(PathBuf::from(path)));
    }
    if [
        "redis://",
        "rediss://",
        "redis+unix://",
        "redis+sentinel://",
        "rediss+sentinel://",
        "redis+cluster://",
        "rediss+cluster://",
    ]
    .iter()
    .any(|s| v.starts_with(s))
    {
        return match crate::keys::store::redis::endpoint::parse(v) {
            Ok(_) => Some(StoreUrl::Redis(v.to_owned())),
            // The URL is not repeated: a password can hide in it (user:pass@ or ?pass=).
            Err(why) => {
                p.error(format!("store.url: {why}"));
                None
            }
        };
    }
    p.error(format!(
        "store.url: {} is not supported; use sqlite://PATH, redis://HOST:PORT/DB, rediss://…, redis+unix:///path.sock, redis+sentinel://H1:P1,H2:P2/SERVICE/DB or redis+cluster://H1:P1,H2:P2,… (rediss+… for TLS)",
        scheme_of(v)
    ));
    None
}

/// What an unsupported store URL is shown as: its scheme only, since a password can hide
/// anywhere after it (`user:pass@`, `?pass=`, `?password=`).
fn scheme_of(v: &str) -> String {
    match v.split_once(':') {
        Some((scheme, _))
            if !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')) =>
        {
            format!("a URL of scheme {scheme:?}")
        }
        _ => "a value without a URL scheme".to_owned(),
    }
}
