//! Configuration: a TOML file, then `KEYGATE_*` environment variables, then CLI flags; each
//! later source overrides the earlier one. The file is parsed into raw serde structs that reject
//! unknown fields, then [`RawConfig::validate`] checks everything at once and returns either a
//! validated [`Config`] or the full list of problems, each naming the field and the fix (one
//! function per section, in `config/validate.rs`).
//!
//! Admin keys are the exception to "override": `KEYGATE_ADMIN_KEY` and `--admin-key` each add a
//! key to those listed in `[admin] keys`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use crate::keys::{KeyHash, RateLimit};

pub mod events;
pub mod identity;
mod validate;

/// The config file used when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG_PATH: &str = "config/keygate.toml";

// Defaults, with the reason for each.
/// Proxy on every interface: it is the public face.
const DEFAULT_PROXY_LISTEN: &str = "0.0.0.0:8080";
/// Admin on loopback only: it can mint keys, so exposing it is an explicit decision.
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:9000";
const DEFAULT_STORE_URL: &str = "sqlite://data/keygate.db";
/// Header name used by most API-key clients (Kong, Tyk, APISIX all accept it).
const DEFAULT_API_KEY_HEADER: &str = "x-api-key";
const DEFAULT_QUERY_PARAM: &str = "api_key";
const DEFAULT_KEY_PREFIX: &str = "kg_";
const DEFAULT_MAX_KEYS_PER_CLIENT: u32 = 5;
/// Connect failures on loopback/LAN are immediate; 2 s covers a SYN retransmit.
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// TLS 1.3 session tickets sent after each handshake (`[proxy] tls_session_tickets`).
pub const DEFAULT_TLS_SESSION_TICKETS: usize = 1;
/// The most `[proxy] tls_session_tickets` accepts.
pub const MAX_TLS_SESSION_TICKETS: usize = 16;
/// Matches nginx's `proxy_read_timeout` order of magnitude.
const DEFAULT_UPSTREAM_TIMEOUT_MS: u64 = 30_000;
/// Between Envoy's 60 KiB and hyper's 408 KiB default; larger heads get 431.
const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
const DEFAULT_MAX_HEADERS: usize = 100;
/// Slowloris guard: a client has this long to send a complete request head.
const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 10;
/// A request body that stalls, or a client that stops taking its response, is dropped after
/// this long (nginx's `client_body_timeout` / `send_timeout` are 60 s).
const DEFAULT_BODY_TIMEOUT_SECS: u64 = 30;
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
const DEFAULT_ADMIN_MAX_BODY_BYTES: usize = 1024 * 1024;
const DEFAULT_SELF_SERVICE_PERMISSION: &str = "keys:manage";
const DEFAULT_CACHE_TTL_SECS: u64 = 60;
/// Short so a key created elsewhere is found quickly; long enough to absorb floods.
const DEFAULT_NEGATIVE_TTL_SECS: u64 = 5;
/// 1M entries of a few hundred bytes each: a few hundred MB at most, usually far less.
const DEFAULT_CACHE_CAPACITY: u64 = 1_000_000;
const DEFAULT_STALE_IF_ERROR_SECS: u64 = 300;
const DEFAULT_LAST_USED_FLUSH_SECS: u64 = 10;
const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
/// The listen backlog of the proxy and admin listeners (`[server] listen_backlog`): connections
/// the kernel completes and queues while the event loop has not accepted them yet.
pub const DEFAULT_LISTEN_BACKLOG: u32 = 1024;
/// The most `[server] listen_backlog` accepts (the kernel also caps it at
/// `net.core.somaxconn`).
pub const MAX_LISTEN_BACKLOG: u32 = 65535;
/// Admin keys shorter than this are refused unless the admin listener is on loopback.
pub const MIN_ADMIN_KEY_LEN: usize = 16;

fn d_proxy_listen() -> String {
    DEFAULT_PROXY_LISTEN.into()
}
fn d_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.into()
}
fn d_upstream() -> String {
    DEFAULT_UPSTREAM.into()
}
fn d_store_url() -> String {
    DEFAULT_STORE_URL.into()
}
fn d_api_key_header() -> String {
    DEFAULT_API_KEY_HEADER.into()
}
fn d_query_param() -> String {
    DEFAULT_QUERY_PARAM.into()
}
fn d_key_prefix() -> String {
    DEFAULT_KEY_PREFIX.into()
}
fn d_max_keys() -> u32 {
    DEFAULT_MAX_KEYS_PER_CLIENT
}
fn d_connect_timeout() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}
fn d_tls_session_tickets() -> usize {
    DEFAULT_TLS_SESSION_TICKETS
}
fn d_upstream_timeout() -> u64 {
    DEFAULT_UPSTREAM_TIMEOUT_MS
}
fn d_max_header_bytes() -> usize {
    DEFAULT_MAX_HEADER_BYTES
}
fn d_max_headers() -> usize {
    DEFAULT_MAX_HEADERS
}
fn d_header_read_timeout() -> u64 {
    DEFAULT_HEADER_READ_TIMEOUT_SECS
}
fn d_body_timeout() -> u64 {
    DEFAULT_BODY_TIMEOUT_SECS
}
fn d_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn d_admin_body() -> usize {
    DEFAULT_ADMIN_MAX_BODY_BYTES
}
fn d_self_service() -> String {
    DEFAULT_SELF_SERVICE_PERMISSION.into()
}
fn d_cache_ttl() -> u64 {
    DEFAULT_CACHE_TTL_SECS
}
fn d_redis_prefix() -> String {
    crate::keys::store::redis::DEFAULT_PREFIX.into()
}
fn d_negative_ttl() -> u64 {
    DEFAULT_NEGATIVE_TTL_SECS
}
fn d_cache_capacity() -> u64 {
    DEFAULT_CACHE_CAPACITY
}
fn d_stale() -> u64 {
    DEFAULT_STALE_IF_ERROR_SECS
}
fn d_flush() -> u64 {
    DEFAULT_LAST_USED_FLUSH_SECS
}
fn d_grace() -> u64 {
    DEFAULT_SHUTDOWN_GRACE_SECS
}
fn d_listen_backlog() -> u32 {
    DEFAULT_LISTEN_BACKLOG
}
fn d_issuer() -> String {
    "keygate".into()
}
/// 15 minutes: short enough that a leaked token dies soon, long enough to be useful.
fn d_jwt_ttl() -> u64 {
    900
}
/// Clock skew tolerated on exp/nbf; RFC 8725 practice keeps it small.
fn d_jwt_leeway() -> u64 {
    30
}
/// Longest token lifetime accepted in the config.
/// Shortest JWT signing secret accepted (bytes).
pub const MIN_JWT_SECRET_LEN: usize = 32;
const MAX_JWT_TTL_SECS: u64 = 24 * 3600;
const MAX_JWT_LEEWAY_SECS: u64 = 30;
fn d_verify_path() -> String {
    "/_keygate/verify".into()
}

fn d_true() -> bool {
    true
}
fn d_log_level() -> String {
    "info".into()
}
/// 20 failed authentications a minute per peer IP, then 429: slow enough to make guessing
/// hopeless, loose enough for a human fixing a typo.
fn d_failed_auth_limit() -> RateLimit {
    RateLimit {
        per_second: None,
        per_minute: Some(20),
        per_hour: None,
        burst: 20,
    }
}
fn d_default_limit() -> RateLimit {
    RateLimit {
        per_second: Some(100),
        per_minute: None,
        per_hour: None,
        burst: 200,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub keys: RawKeys,
    #[serde(default)]
    pub rate_limit: RawRateLimit,
    #[serde(default)]
    pub plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub jwt: RawJwt,
    #[serde(default)]
    pub forward_auth: RawForwardAuth,
    #[serde(default)]
    pub identity: identity::RawIdentity,
    #[serde(default)]
    pub webhooks: Vec<events::RawWebhook>,
    #[serde(default)]
    pub events: events::RawEvents,
    #[serde(default)]
    pub secret_scanning: events::RawSecretScanning,
}

/// `[forward_auth]`: the verify endpoint edge proxies (nginx `auth_request`, Traefik
/// `forwardAuth`, Caddy `forward_auth`, Envoy HTTP `ext_authz`) ask before they pass a request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForwardAuth {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "d_verify_path")]
    pub path: String,
    #[serde(default)]
    pub deny: DenyMode,
}

/// How the verify endpoint answers a refusal.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DenyMode {
    /// The proxy's own status and problem+json (Traefik, Caddy, Envoy relay them as they are).
    #[default]
    Status,
    /// 403 for every refusal but 401, the real status in `X-Keygate-Status` (nginx
    /// `auth_request` turns anything but 2xx, 401 and 403 into a 500).
    Nginx,
}

/// The validated `[forward_auth]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardAuth {
    /// `None`: off.
    pub path: Option<String>,
    pub deny: DenyMode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    /// HS256 signing secret (≥ 32 bytes); prefer KEYGATE_JWT_SECRET.
    pub secret: Option<String>,
    #[serde(default = "d_issuer")]
    pub issuer: String,
    pub audience: Option<String>,
    #[serde(default = "d_jwt_ttl")]
    pub ttl_secs: u64,
    #[serde(default = "d_jwt_leeway")]
    pub leeway_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    #[serde(default = "d_proxy_listen")]
    pub listen: String,
    #[serde(default = "d_upstream")]
    pub upstream: String,
    #[serde(default = "d_api_key_header")]
    pub api_key_header: String,
    #[serde(default)]
    pub allow_query_param: bool,
    #[serde(default = "d_query_param")]
    pub query_param: String,
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout_ms: u64,
    #[serde(default = "d_upstream_timeout")]
    pub upstream_timeout_ms: u64,
    /// PEM certificate chain and key: serve the proxy over TLS.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// TLS 1.3 session tickets sent after each handshake (0: no resumption by ticket).
    #[serde(default = "d_tls_session_tickets")]
    pub tls_session_tickets: usize,
    /// PEM CA bundle for `https://` upstreams (default: the webpki root set).
    pub upstream_ca: Option<String>,
    /// Forward `X-HTTP-Method-Override`, `X-HTTP-Method` and `X-Method-Override`.
    #[serde(default)]
    pub allow_method_override: bool,
    /// Accept paths that are not ASCII once percent-decoded.
    #[serde(default)]
    pub allow_non_ascii_paths: bool,
    /// Peers (CIDRs) whose `X-Forwarded-For` / `Forwarded` names the client.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Add `Vary` naming the credential fields to authenticated answers.
    #[serde(default = "d_true")]
    pub vary_credentials: bool,
    /// Add `Cache-Control: private` to authenticated answers the upstream did not mark
    /// `public` or `s-maxage`.
    #[serde(default = "d_true")]
    pub cache_private: bool,
    /// CORS of every route without its own `cors` (see [`RawCors`]).
    pub cors: Option<RawCors>,
}

/// `cors = { origins, methods, headers, expose_headers, max_age, credentials }`, in `[proxy]`
/// (the default) or in a `[[routes]]` entry (replacing the default there).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    /// `scheme://host[:port]`, `scheme://*.domain[:port]` (whole labels) or `*`; empty: off.
    #[serde(default)]
    pub origins: Vec<String>,
    /// Default: GET, HEAD, POST, PUT, PATCH, DELETE; `["*"]`: any.
    pub methods: Option<Vec<String>>,
    /// Request fields a script may send. Default: authorization, content-type and the API-key
    /// header; `["*"]`: any.
    pub headers: Option<Vec<String>>,
    /// Answer fields a script may read besides keygate's own (always exposed).
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// `Access-Control-Max-Age` in seconds (0 to 86400; default 600).
    pub max_age: Option<u64>,
    /// Allow credentialed requests (cookies, TLS client certificates, browser-managed auth).
    #[serde(default)]
    pub credentials: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default = "d_admin_listen")]
    pub listen: String,
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default = "d_admin_body")]
    pub max_body_bytes: usize,
    #[serde(default = "d_self_service")]
    pub self_service_permission: String,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// Host names the admin listener answers besides `localhost` and IP addresses; setting
    /// any turns the check on for a listener that is not on loopback too.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    #[serde(default = "d_store_url")]
    pub url: String,
    #[serde(default = "d_cache_ttl")]
    pub cache_ttl_secs: u64,
    #[serde(default = "d_negative_ttl")]
    pub negative_ttl_secs: u64,
    #[serde(default = "d_cache_capacity")]
    pub cache_capacity: u64,
    #[serde(default = "d_stale")]
    pub stale_if_error_secs: u64,
    #[serde(default = "d_flush")]
    pub last_used_flush_secs: u64,
    #[serde(default = "d_redis_prefix")]
    pub redis_prefix: String,
    #[serde(default)]
    pub redis_ca: Option<String>,
    #[serde(default)]
    pub redis_client_cert: Option<String>,
    #[serde(default)]
    pub redis_client_key: Option<String>,
    /// Replicas that must confirm each admin write (Redis `WAIT`); 0 = none.
    #[serde(default)]
    pub redis_wait_replicas: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeys {
    #[serde(default = "d_key_prefix")]
    pub prefix: String,
    #[serde(default = "d_max_keys")]
    pub max_per_client: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    #[serde(default = "d_default_limit")]
    pub default: RateLimit,
    #[serde(default = "d_failed_auth_limit")]
    pub failed_auth: RateLimit,
    /// `local` (each instance counts on its own) or `cluster`.
    #[serde(default)]
    pub mode: RateMode,
}

/// How instances share rate limits.
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RateMode {
    #[default]
    Local,
    Cluster,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    pub rate_limit: Option<RateLimit>,
    /// Who shares the plan's rate limit (default: the client as a whole).
    #[serde(default)]
    pub scope: crate::keys::allowance::Scope,
    /// Requests per UTC calendar period, per client.
    pub quota: Option<crate::keys::allowance::Quota>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RouteAuth {
    Required,
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path: String,
    pub upstream: Option<String>,
    #[serde(default)]
    pub permissions: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    pub auth: Option<RouteAuth>,
    /// Per-key limit on this route, on top of the key's own limit.
    pub rate_limit: Option<RateLimit>,
    /// This route's CORS, replacing `[proxy] cors`.
    pub cors: Option<RawCors>,
    /// `aud` of the signed identity on this route (default: the upstream's origin).
    pub audience: Option<String>,
    /// Credits a request on this route takes from a key that has credits (default 1).
    pub cost: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    #[serde(default = "d_max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "d_max_headers")]
    pub max_headers: usize,
    #[serde(default = "d_header_read_timeout")]
    pub header_read_timeout_secs: u64,
    #[serde(default = "d_body_timeout")]
    pub body_timeout_secs: u64,
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
    /// Unset: half of `max_connections`; 0: no cap.
    #[serde(default)]
    pub max_connections_per_ip: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default = "d_grace")]
    pub shutdown_grace_secs: u64,
    /// 0 = one per CPU core.
    #[serde(default)]
    pub worker_threads: usize,
    /// The event loop never sleeps: it polls for I/O with a zero timeout instead of waiting
    /// (needs `worker_threads = 1`).
    #[serde(default)]
    pub busy_polling: bool,
    /// A busy event loop (its last wait for events shorter than 1 ms) that is not saturated
    /// (it worked less than 75 % of the last 10 ms) sleeps this many microseconds before it
    /// waits again, so packets arriving meanwhile do not each wake it. 0 = off.
    #[serde(default)]
    pub event_coalesce_us: u64,
    /// Completed connections the kernel queues on each listener until they are accepted
    /// (1..=65535; the kernel caps it at `net.core.somaxconn`).
    #[serde(default = "d_listen_backlog")]
    pub listen_backlog: u32,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<LogFormat>,
    #[serde(default = "d_log_level")]
    pub level: String,
    #[serde(default = "d_true")]
    pub access_log: bool,
    /// A `KEYGATE_LOG_FORMAT` that is neither `json` nor `human` (any case), for validation
    /// to refuse: never read from the file.
    #[serde(skip)]
    pub env_format_refused: Option<String>,
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                toml::from_str("").expect("every field has a default")
            }
        }
    )*};
}
default_from_serde!(
    RawJwt,
    RawProxy,
    RawAdmin,
    RawStore,
    RawKeys,
    RawRateLimit,
    RawLimits,
    RawServer,
    RawLog,
    RawForwardAuth
);

/// Values given on the command line; each overrides the file and the environment.
#[derive(Debug, Default, Clone)]
pub struct CliOverrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub upstream: Option<String>,
    pub store: Option<String>,
    pub admin_key: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validated configuration.

#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub keys: KeysConfig,
    pub default_limit: RateLimit,
    pub failed_auth_limit: RateLimit,
    pub plans: HashMap<String, Option<RateLimit>>,
    pub routes: Vec<Route>,
    pub limits: Limits,
    pub shutdown_grace: Duration,
    pub listen_backlog: u32,
    pub event_loop: crate::runtime::EventLoop,
    pub log: LogConfig,
    pub jwt: JwtConfig,
    pub forward_auth: ForwardAuth,
    pub identity: crate::identity::IdentityConfig,
    pub webhooks: Vec<events::WebhookConfig>,
    pub events: events::EventsConfig,
    pub secret_scanning: events::SecretScanning,
    /// Things an operator should know but that do not stop startup.
    pub warnings: Vec<String>,
    /// Scopes and quotas of the plans (`[plans.X] scope`, `quota`).
    pub plan_terms: HashMap<String, PlanTerms>,
    /// `[rate_limit] mode`.
    pub rate_mode: RateMode,
}

/// What a plan sets besides its rate limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanTerms {
    pub scope: crate::keys::allowance::Scope,
    pub quota: Option<crate::keys::allowance::Quota>,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub upstream: Uri,
    pub api_key_header: http::HeaderName,
    pub query_param: Option<String>,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub tls: Option<TlsFiles>,
    /// TLS 1.3 session tickets sent after each handshake.
    pub tls_session_tickets: usize,
    pub upstream_ca: Option<PathBuf>,
    pub allow_method_override: bool,
    pub allow_non_ascii_paths: bool,
    pub trusted_proxies: Vec<Cidr>,
    pub vary_credentials: bool,
    pub cache_private: bool,
    /// The default CORS rules (`None`: none).
    pub cors: Option<std::sync::Arc<crate::cors::Cors>>,
}

/// An address block, `addr/prefix` (a bare address is the block of that address alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a.parse().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.trim().parse().ok()?, None),
        };
        let addr: std::net::IpAddr = addr;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr {
            addr: addr.to_canonical(),
            prefix: if addr.to_canonical().is_ipv4() && !addr.is_ipv4() {
                prefix.saturating_sub(96)
            } else {
                prefix
            },
        })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let bits = |n: u32, p: u8| if p == 0 { 0 } else { n >> (32 - p) };
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                bits(u32::from(a), self.prefix) == bits(u32::from(b), self.prefix)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let (a, b) = (u128::from(a), u128::from(b));
                self.prefix == 0
                    || a >> (128 - u32::from(self.prefix)) == b >> (128 - u32::from(self.prefix))
            }
            _ => false,
        }
    }
}

/// A certificate chain and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// SHA-256 of each admin key; compared in constant time.
    pub key_hashes: Vec<KeyHash>,
    pub max_body_bytes: usize,
    pub self_service_permission: String,
    pub tls: Option<TlsFiles>,
    /// The `Host` names answered (besides `localhost`, `*.localhost` and IP addresses), when
    /// the admin listener checks them: on loopback, or when `allowed_hosts` is set. `None`:
    /// any `Host`.
    pub allowed_hosts: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    Redis(String),
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub url: StoreUrl,
    pub cache_ttl: Duration,
    pub negative_ttl: Duration,
    pub cache_capacity: u64,
    pub stale_if_error: Duration,
    pub last_used_flush: Duration,
    /// Prefix of every Redis key keygate writes (Redis stores only).
    pub redis_prefix: String,
    /// CA and client certificate of a `rediss://` store.
    pub redis_tls: crate::keys::store::redis::RedisTls,
    /// Replicas that must confirm each admin write (Redis stores only; 0 = none).
    pub redis_wait_replicas: u32,
}

#[derive(Debug, Clone)]
pub struct KeysConfig {
    pub prefix: String,
    pub max_per_client: u32,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub path: String,
    pub upstream: Uri,
    pub permissions: Vec<String>,
    pub methods: Vec<http::Method>,
    pub auth: RouteAuth,
    pub rate_limit: Option<RateLimit>,
    /// The route's own CORS rules (`None`: the default's).
    pub cors: Option<std::sync::Arc<crate::cors::Cors>>,
    pub audience: Option<String>,
    /// Credits a request takes (keys with credits only).
    pub cost: u64,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    /// Longest pause while a request body is read or a response is written to a client.
    pub body_timeout: Duration,
    pub max_connections: usize,
    /// Most open connections of one client address per listener (IPv6: per /64); 0 = no cap.
    pub max_connections_per_ip: usize,
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// `None`: no secret configured; a random per-process secret is used (single node only).
    pub secret: Option<crate::keys::Secret>,
    pub issuer: String,
    pub audience: Option<String>,
    pub ttl: Duration,
    pub leeway: Duration,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    pub access_log: bool,
}

/// Every problem found in a configuration, one per line.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Loads `path` (or [`DEFAULT_CONFIG_PATH`] when it exists, or built-in defaults), applies
    /// `env` (normally `std::env::vars()`) and `cli`, and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: &HashMap<String, String>,
        cli: &CliOverrides,
    ) -> Result<Config, ConfigErrors> {
        let (text, origin) = read(path)?;
        Self::from_toml(&text, &origin, env, cli)
    }

    /// Where the admin API listens and whether it speaks TLS: `[admin] listen` and its TLS
    /// files as the file, the environment and the command line set them, without judging the
    /// rest of the file (the admin-API commands need nothing else; a setting only `serve` needs,
    /// such as a secret kept in the service's environment, does not stop them).
    pub fn admin_target(
        path: Option<&Path>,
        env: &HashMap<String, String>,
        cli: &CliOverrides,
    ) -> Result<(std::net::SocketAddr, bool), ConfigErrors> {
        let (text, origin) = read(path)?;
        let mut raw: RawConfig = toml::from_str(&text)
            .map_err(|e| ConfigErrors(vec![format!("{origin}:{}", toml_error(&text, &e))]))?;
        raw.apply_env(env);
        raw.apply_cli(cli);
        let listen = raw.admin.listen.parse().map_err(|_| {
            ConfigErrors(vec![format!(
                "admin.listen: {:?} is not an address; use IP:PORT, e.g. \"127.0.0.1:8081\"",
                raw.admin.listen
            )])
        })?;
        let tls = raw.admin.tls_cert.as_deref().is_some_and(|c| !c.is_empty());
        Ok((listen, tls))
    }

    pub fn from_toml(
        text: &str,
        origin: &str,
        env: &HashMap<String, String>,
        cli: &CliOverrides,
    ) -> Result<Config, ConfigErrors> {
        let mut raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigErrors(vec![format!("{origin}:{}", toml_error(text, &e))]))?;
        raw.apply_env(env);
        raw.apply_cli(cli);
        raw.validate()
    }
}

/// The config file's text and the name it is reported by; no file at the default path reads
/// as an empty one (every default).
fn read(path: Option<&Path>) -> Result<(String, String), ConfigErrors> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| {
            ConfigErrors(vec![format!(
                "cannot read config file {}: {e}",
                p.display()
            )])
        })?,
        // Only a file that is not there reads as every default: one that is there but cannot
        // be read (its permissions, not UTF-8, a directory) would otherwise start a gateway
        // without its routes, plans and TLS, and `check-config` would call it OK.
        None => match std::fs::read_to_string(DEFAULT_CONFIG_PATH) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(ConfigErrors(vec![format!(
                    "cannot read config file {DEFAULT_CONFIG_PATH}: {e}"
                )]));
            }
        },
    };
    let origin = path.map_or(DEFAULT_CONFIG_PATH.into(), |p| p.display().to_string());
    Ok((text, origin))
}

/// A TOML file's error as it may be printed: where (line and column) and what, never the
/// text of the file. The parser's own rendering quotes the offending line and serde quotes a
/// value of the wrong type (`invalid type: string "…"`), and the line or the value may be a
/// secret (an admin key, a Redis URL's password, a webhook or JWT secret): both are left out.
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let at = e.span().map_or_else(String::new, |span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
        match field_at(text, line, column) {
            Some(field) => format!("{line}:{column}: `{field}`:"),
            None => format!("{line}:{column}:"),
        }
    });
    format!("{at} {}", without_strings(e.message().trim_end()))
}

/// The setting written on `line` (1-based), with its table: `[table]` and `key = …` when both
/// are plain names (letters, digits, `_`, `-`, `.`), and the key of an inline table's value the
/// error is at (`column`, 1-based) when nothing quoted comes before it. Anything else on the
/// line may be a value (a line inside a multi-line array, say): no name then.
fn field_at(text: &str, line: usize, column: usize) -> Option<String> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    };
    let written = text.lines().nth(line - 1)?;
    let first = written.split_once('=')?.0.trim();
    if !plain(first) {
        return None;
    }
    let before: String = written.chars().take(column - 1).collect();
    let inner = (!before.contains(['"', '\'']))
        .then(|| {
            before
                .trim_end()
                .strip_suffix('=')?
                .trim_end()
                .rsplit([' ', '{', ','])
                .next()
        })
        .flatten()
        .filter(|k| plain(k) && *k != first);
    let key = match inner {
        Some(k) => format!("{first}.{k}"),
        None => first.to_owned(),
    };
    let table = text
        .lines()
        .take(line - 1)
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .last()
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match table {
        Some(t) if plain(t) => Some(format!("{t}.{key}")),
        Some(_) => None,
        None => Some(key),
    }
}

/// `message` without the string values it quotes: serde writes one as `string "…"` (escaped
/// as Rust's `Debug` does), which becomes `a string` — a list of admin keys written as one
/// string would be quoted whole. Names stay: of fields, of the expected variants, and of an
/// unknown variant (`algorithm = "RS256"` is worth naming; a setting of a fixed set of names
/// is no place for a secret).
pub fn without_strings(message: &str) -> String {
    const QUOTED: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(QUOTED) {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        let value = &rest[at + QUOTED.len()..];
        let mut chars = value.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                _ => {}
            }
        }
        match end {
            Some(end) => rest = &value[end..],
            // Unterminated: nothing after it is printed.
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

impl RawConfig {
    fn apply_env(&mut self, env: &HashMap<String, String>) {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        if let Some(v) = get("KEYGATE_LISTEN") {
            self.proxy.listen = v;
        }
        if let Some(v) = get("KEYGATE_ADMIN_LISTEN") {
            self.admin.listen = v;
        }
        if let Some(v) = get("KEYGATE_UPSTREAM") {
            self.proxy.upstream = v;
        }
        if let Some(v) = get("KEYGATE_STORE") {
            self.store.url = v;
        }
        if let Some(v) = get("KEYGATE_ADMIN_KEY") {
            self.admin.keys.push(v);
        }
        for (var, slot) in [
            ("KEYGATE_TLS_CERT", &mut self.proxy.tls_cert),
            ("KEYGATE_TLS_KEY", &mut self.proxy.tls_key),
            ("KEYGATE_UPSTREAM_CA", &mut self.proxy.upstream_ca),
            ("KEYGATE_ADMIN_TLS_CERT", &mut self.admin.tls_cert),
            ("KEYGATE_ADMIN_TLS_KEY", &mut self.admin.tls_key),
            ("KEYGATE_REDIS_CA", &mut self.store.redis_ca),
            (
                "KEYGATE_REDIS_CLIENT_CERT",
                &mut self.store.redis_client_cert,
            ),
            ("KEYGATE_REDIS_CLIENT_KEY", &mut self.store.redis_client_key),
        ] {
            if let Some(v) = get(var) {
                *slot = Some(v);
            }
        }
        if let Some(v) = get("KEYGATE_JWT_SECRET") {
            self.jwt.secret = Some(v);
        }
        if let Some(v) = get("KEYGATE_LOG_LEVEL") {
            self.log.level = v;
        }
        if let Some(v) = get("KEYGATE_LOG_FORMAT") {
            match v.to_ascii_lowercase().as_str() {
                "json" => self.log.format = Some(LogFormat::Json),
                "human" => self.log.format = Some(LogFormat::Human),
                _ => self.log.env_format_refused = Some(v),
            }
        }
    }

    fn apply_cli(&mut self, cli: &CliOverrides) {
        if let Some(v) = &cli.listen {
            self.proxy.listen = v.clone();
        }
        if let Some(v) = &cli.admin_listen {
            self.admin.listen = v.clone();
        }
        if let Some(v) = &cli.upstream {
            self.proxy.upstream = v.clone();
        }
        if let Some(v) = &cli.store {
            self.store.url = v.clone();
        }
        if let Some(v) = &cli.admin_key {
            self.admin.keys.push(v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)], cli: CliOverrides) -> Result<Config, ConfigErrors> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_toml(text, "test.toml", &env, &cli)
    }

    #[test]
    fn a_password_in_a_url_is_refused_or_never_repeated() {
        let none = CliOverrides::default();
        for text in [
            "[proxy]\nupstream = \"http://svc:hunter2@10.0.0.5:9000\"\n",
            "[[routes]]\npath = \"/r\"\nupstream = \"https://svc:hunter2@api.internal\"\n",
        ] {
            let e = load(text, &[], none.clone()).unwrap_err().to_string();
            assert!(
                e.contains("upstream: must not carry a user or password"),
                "{e}"
            );
            assert!(!e.contains("hunter2"), "{e}");
        }
        for url in [
            "unix:///run/redis.sock?pass=hunter2",
            "redis+unixx:/run/r.sock?password=hunter2",
            "memcached://u:hunter2@h:11211",
        ] {
            let e = load(&format!("[store]\nurl = \"{url}\"\n"), &[], none.clone())
                .unwrap_err()
                .to_string();
            assert!(!e.contains("hunter2"), "{e}");
            assert!(e.contains("store.url: a URL of scheme "), "{e}");
        }
    }

    #[test]
    fn a_file_that_does_not_parse_is_reported_by_place_without_its_text() {
        let none = CliOverrides::default();
        for (text, secret, at) in [
            // A string where a list belongs: serde would quote the value.
            (
                "[admin]\nkeys = \"adm-hunter2-0123456789\"\n",
                "hunter2",
                "2:8:",
            ),
            // An unclosed quote: the parser would quote the line.
            (
                "[store]\nurl = \"redis://:hunter2@10.0.0.1:6379/0\n",
                "hunter2",
                "2:40:",
            ),
            // An unquoted value.
            ("[jwt]\nsecret = whsec_hunter2\n", "hunter2", "2:10:"),
            // Escaped quotes inside the value do not end it early.
            ("[admin]\nkeys = \"a\\\"hunter2\\\"b\"\n", "hunter2", "2:8:"),
        ] {
            let e = load(text, &[], none.clone()).unwrap_err().to_string();
            assert!(!e.contains(secret), "{text:?} → {e}");
            assert!(e.contains(&format!("- test.toml:{at} `")), "{text:?} → {e}");
        }
        // The key inside an inline table is named with its table and setting.
        let e = load(
            "[plans.p]\nquota = { requests = 1, per = \"week\" }\n",
            &[],
            none.clone(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("2:31: `plans.p.quota.per`: unknown variant `week`"),
            "{e}"
        );
        // A line that may be part of a value is not named.
        let e = load(
            "[admin]\nkeys = [\n  hunter2 \"x\"=\n]\n",
            &[],
            none.clone(),
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        let e = load("[admin]\nkeys = \"x\"\n", &[], none.clone())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid type: a string, expected a sequence"),
            "{e}"
        );
        // A value that is no variant of its field is named, with the names it may take.
        let e = load("[forward_auth]\ndeny = \"teapot\"\n", &[], none.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `teapot`, expected"), "{e}");
        assert!(e.contains("`status`"), "{e}");
        // A field's name (never a value) is still named.
        let e = load("[admin]\nkes = []\n", &[], none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `kes`"), "{e}");
    }

    #[test]
    fn the_per_address_connection_cap_defaults_to_half_of_the_connection_cap() {
        let key = [("KEYGATE_ADMIN_KEY", "0123456789abcdef0123")];
        let cap = |limits: &str| {
            load(limits, &key, CliOverrides::default())
                .unwrap()
                .limits
                .max_connections_per_ip
        };
        assert_eq!(cap(""), 5000);
        assert_eq!(cap("[limits]\nmax_connections = 5\n"), 2);
        assert_eq!(cap("[limits]\nmax_connections = 1\n"), 1);
        assert_eq!(cap("[limits]\nmax_connections_per_ip = 0\n"), 0);
        assert_eq!(cap("[limits]\nmax_connections_per_ip = 7\n"), 7);
    }

    #[test]
    fn defaults_apply_and_admin_key_comes_from_env() {
        let c = load(
            "",
            &[("KEYGATE_ADMIN_KEY", "0123456789abcdef0123")],
            CliOverrides::default(),
        )
        .unwrap();
        assert_eq!(c.proxy.listen.to_string(), DEFAULT_PROXY_LISTEN);
        assert_eq!(c.admin.listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(
            c.admin.key_hashes,
            vec![KeyHash::of("0123456789abcdef0123")]
        );
        assert_eq!(c.store.url, StoreUrl::Sqlite("data/keygate.db".into()));
        assert_eq!(c.keys.max_per_client, 5);
        assert!(c.proxy.query_param.is_none());
    }

    #[test]
    fn precedence_is_file_then_env_then_cli() {
        let text = "[proxy]\nupstream = \"http://file:1\"\nlisten = \"127.0.0.1:1\"\n";
        let c = load(
            text,
            &[
                ("KEYGATE_UPSTREAM", "http://env:2"),
                ("KEYGATE_LISTEN", "127.0.0.1:2"),
            ],
            CliOverrides {
                upstream: Some("http://cli:3".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.proxy.upstream.to_string(), "http://cli:3/");
        assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:2");
    }

    #[test]
    fn unknown_fields_are_errors_naming_the_field() {
        let e = load(
            "[proxy]\nlisten_addr = \"x\"\n",
            &[],
            CliOverrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
        let e = load("[nonsense]\n", &[], CliOverrides::default()).unwrap_err();
        assert!(e.to_string().contains("nonsense"), "{e}");
    }

    #[test]
    fn tls_session_tickets_default_to_one_and_are_bounded() {
        let key = [("KEYGATE_ADMIN_KEY", "0123456789abcdef0123")];
        let tickets = |text: &str| load(text, &key, CliOverrides::default());
        assert_eq!(tickets("").unwrap().proxy.tls_session_tickets, 1);
        for n in [0, 2, MAX_TLS_SESSION_TICKETS] {
            let text = format!("[proxy]\ntls_session_tickets = {n}\n");
            assert_eq!(tickets(&text).unwrap().proxy.tls_session_tickets, n);
        }
        let text = format!(
            "[proxy]\ntls_session_tickets = {}\n",
            MAX_TLS_SESSION_TICKETS + 1
        );
        let e = tickets(&text).unwrap_err().to_string();
        assert!(e.contains("proxy.tls_session_tickets: at most 16"), "{e}");
        for bad in ["-1", "\"two\"", "1.5"] {
            let text = format!("[proxy]\ntls_session_tickets = {bad}\n");
            let e = tickets(&text).unwrap_err().to_string();
            assert!(e.contains("tls_session_tickets"), "{bad}: {e}");
        }
    }

    /// A refused upstream URL is named without its query (a token there is a credential).
    #[test]
    fn a_refused_upstream_is_named_without_its_query() {
        let key = [("KEYGATE_ADMIN_KEY", "0123456789abcdef0123")];
        let text = "[proxy]\nupstream = \"http://api.internal/v1?token=upstream-credential\"\n";
        let e = load(text, &key, CliOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"http://api.internal/v1?…\" must be"), "{e}");
        assert!(!e.contains("upstream-credential"), "{e}");
    }

    /// `KEYGATE_LOG_FORMAT` in any case; another word is an error, not human logs.
    #[test]
    fn the_log_format_variable_is_read_in_any_case_and_a_typo_refused() {
        let file = "[log]\nformat = \"json\"\n";
        let load_with = |v: &str| {
            let env = [
                ("KEYGATE_ADMIN_KEY", "0123456789abcdef0123"),
                ("KEYGATE_LOG_FORMAT", v),
            ];
            load(file, &env, CliOverrides::default())
        };
        for (v, format) in [
            ("JSON", LogFormat::Json),
            ("json", LogFormat::Json),
            ("Human", LogFormat::Human),
        ] {
            assert_eq!(load_with(v).unwrap().log.format, format, "{v}");
        }
        let e = load_with("jsn").unwrap_err().to_string();
        assert!(
            e.contains("KEYGATE_LOG_FORMAT: \"jsn\" is neither \"json\" nor \"human\""),
            "{e}"
        );
    }

    /// Values that would overflow a time, panic a semaphore or make every request allocate a
    /// table of fields are refused, each naming its bound; the bounds themselves pass.
    #[test]
    fn oversized_limits_and_times_are_refused() {
        let key = [("KEYGATE_ADMIN_KEY", "0123456789abcdef0123")];
        for (text, expected) in [
            (
                "[limits]\nmax_header_bytes = 1048577\n",
                "limits.max_header_bytes: must be from 8192 to 1048576",
            ),
            (
                "[limits]\nmax_headers = 1001\n",
                "limits.max_headers: must be from 1 to 1000",
            ),
            (
                "[limits]\nmax_connections = 1000001\n",
                "limits.max_connections: must be from 1 to 1000000",
            ),
            (
                "[store]\ncache_ttl_secs = 86401\n",
                "store.cache_ttl_secs: must be at most 86400",
            ),
            (
                "[server]\nshutdown_grace_secs = 10000000000000000000\n",
                "server.shutdown_grace_secs: at most 86400",
            ),
            (
                "[store]\nnegative_ttl_secs = 86401\n",
                "store.negative_ttl_secs: must be at most 86400",
            ),
            (
                "[store]\nstale_if_error_secs = 604801\n",
                "store.stale_if_error_secs: must be at most 604800",
            ),
            (
                "[events]\ngive_up_after_secs = 9223372036854775\n",
                "events.give_up_after_secs must be at most 2592000",
            ),
            (
                "[events]\nretry_max_ms = 86400001\n",
                "events.retry_max_ms must be at most 86400000",
            ),
        ] {
            let e = load(text, &key, CliOverrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
        let most = "[limits]\nmax_header_bytes = 1048576\nmax_headers = 1000\nmax_connections = 1000000\n\
            [store]\ncache_ttl_secs = 86400\nnegative_ttl_secs = 86400\nstale_if_error_secs = 604800\n\
            [events]\ngive_up_after_secs = 2592000\nretry_max_ms = 86400000\n";
        load(most, &key, CliOverrides::default()).unwrap();
    }

    #[test]
    fn an_api_key_header_that_is_refused_inbound_is_an_error() {
        for name in ["x_api_key", "X-Keygate-Key", "authorization", "bad header"] {
            let text = format!("[proxy]\napi_key_header = \"{name}\"\n");
            let e = load(&text, &[], CliOverrides::default()).unwrap_err();
            assert!(
                e.to_string().contains("proxy.api_key_header"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn forward_auth_is_off_by_default_and_its_path_is_checked() {
        let c = load("", &[], CliOverrides::default()).unwrap();
        assert_eq!(c.forward_auth.path, None);
        assert_eq!(c.forward_auth.deny, DenyMode::Status);
        let c = load(
            "[forward_auth]\nenabled = true\ndeny = \"nginx\"\n",
            &[],
            CliOverrides::default(),
        )
        .unwrap();
        assert_eq!(c.forward_auth.path.as_deref(), Some("/_keygate/verify"));
        assert_eq!(c.forward_auth.deny, DenyMode::Nginx);
        // A disabled section is not judged.
        assert!(
            load(
                "[forward_auth]\npath = \"x\"\n",
                &[],
                CliOverrides::default()
            )
            .is_ok()
        );
        for (path, routes) in [
            ("verify", ""),
            ("/", ""),
            ("/v/", ""),
            ("/v?x", ""),
            ("/a/../v", ""),
            ("/_keygate/health", ""),
            ("/auth", ""),
            // The key set of signed identity (a verifier fetching it got the verify answer).
            ("/.well-known", ""),
            ("/.well-known/jwks.json", ""),
            ("/api", "[[routes]]\npath = \"/api/v1\"\n"),
            ("/api", "[[routes]]\npath = \"/api\"\n"),
            // A route matches /api/v1/… too: the verify path would answer its requests.
            ("/api", "[[routes]]\npath = \"/API/v1\"\n"),
        ] {
            let text = format!("[forward_auth]\nenabled = true\npath = \"{path}\"\n{routes}");
            let e = load(&text, &[], CliOverrides::default()).unwrap_err();
            assert!(e.to_string().contains("forward_auth.path"), "{path}: {e}");
        }
        // A catch-all route is no clash: the verify path is more specific.
        let text = "[forward_auth]\nenabled = true\n[[routes]]\npath = \"/\"\n[[routes]]\npath = \"/_keygate/verifyx\"\n";
        assert!(load(text, &[], CliOverrides::default()).is_ok());
        let e = load(
            "[forward_auth]\nenabled = true\ndeny = \"500\"\n",
            &[],
            CliOverrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("deny"), "{e}");
    }

    #[test]
    fn a_configured_burst_that_takes_over_a_century_to_come_back_is_refused() {
        for text in [
            "[plans.slow]\nrate_limit = { per_hour = 1, burst = 6000000 }\n",
            "[[routes]]\npath = \"/a\"\nrate_limit = { per_hour = 1, burst = 6000000 }\n",
            "[rate_limit]\nfailed_auth = { per_hour = 1, burst = 6000000 }\n",
            "[rate_limit]\ndefault = { per_second = 1, burst = 4000000000 }\n",
        ] {
            let e = load(text, &[], CliOverrides::default()).unwrap_err();
            assert!(e.to_string().contains("100 years"), "{text}: {e}");
        }
        let text = "[plans.slow]\nrate_limit = { per_hour = 1, burst = 876600 }\n";
        assert!(load(text, &[], CliOverrides::default()).is_ok());
    }

    #[test]
    fn every_problem_is_listed() {
        let text = r#"
[proxy]
listen = "nowhere"
upstream = "ftp://x"
[admin]
keys = ["sha256:zz", "short"]
listen = "0.0.0.0:8081"
[store]
url = "mysql://u:secretpw@h/db"
[keys]
prefix = "bad prefix!"
[rate_limit]
default = { per_second = 1, per_minute = 1, burst = 1 }
[[routes]]
path = "/a/../b"
"#;
        let e = load(text, &[], CliOverrides::default()).unwrap_err();
        let s = e.to_string();
        for needle in [
            "proxy.listen",
            "proxy.upstream",
            "admin.keys[0]",
            "admin.keys[1]",
            "store.url",
            "keys.prefix",
            "rate_limit.default",
            "routes[0].path",
        ] {
            assert!(s.contains(needle), "missing {needle} in {s}");
        }
        assert!(!s.contains("secretpw"), "password leaked: {s}");
    }

    #[test]
    fn problems_are_listed_section_by_section_in_file_order() {
        let text = r#"
[proxy]
connect_timeout_ms = 0
[admin]
max_body_bytes = 0
keys = ["0123456789abcdef0123"]
[store]
cache_ttl_secs = 0
[keys]
prefix = ""
[rate_limit]
default = { per_second = 0, burst = 1 }
[plans.x]
rate_limit = { per_second = 1, burst = 0 }
[[routes]]
path = "x"
[limits]
max_headers = 0
[log]
level = "=&&"
[jwt]
issuer = ""
"#;
        let e = load(text, &[], CliOverrides::default()).unwrap_err();
        let fields: Vec<&str> =
            e.0.iter()
                .map(|p| p.split([':', '.', '[']).next().unwrap())
                .collect();
        assert_eq!(
            fields,
            [
                "proxy",
                "admin",
                "store",
                "keys",
                "rate_limit",
                "plans",
                "routes",
                "limits",
                "log",
                "jwt"
            ],
            "{e}"
        );
    }

    #[test]
    fn limits_settings_are_checked() {
        let base = "[admin]\nkeys = [\"0123456789abcdef0123456789abcdef\"]\n";
        let redis = "[store]\nurl = \"redis://127.0.0.1:6379/0\"\n[jwt]\nsecret = \"0123456789abcdef0123456789abcdef\"\n";
        let cluster = "[rate_limit]\nmode = \"cluster\"\n";
        let e = load(&format!("{base}{cluster}"), &[], CliOverrides::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("rate_limit.mode: \"cluster\" needs the Redis store"),
            "{e}"
        );
        let c = load(
            &format!("{base}{redis}{cluster}"),
            &[],
            CliOverrides::default(),
        )
        .unwrap();
        assert_eq!(c.rate_mode, RateMode::Cluster);
        let e = load(
            &format!("{base}[rate_limit]\nmode = \"global\"\n"),
            &[],
            CliOverrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("mode"), "{e}");

        let plans = "[plans.p]\nscope = \"key\"\nquota = { requests = 10, per = \"month\" }\n[plans.q]\nrate_limit = { per_second = 1, burst = 1 }\n[[routes]]\npath = \"/x\"\ncost = 5\n";
        let c = load(&format!("{base}{plans}"), &[], CliOverrides::default()).unwrap();
        let p = c.plan_terms["p"];
        assert_eq!(p.scope, crate::keys::allowance::Scope::Key);
        assert_eq!(p.quota.unwrap().requests, 10);
        assert_eq!(
            c.plan_terms["q"].scope,
            crate::keys::allowance::Scope::Client
        );
        assert_eq!(c.routes[0].cost, 5);
        for (bad, field) in [
            (
                "[plans.p]\nquota = { requests = 0, per = \"day\" }\n",
                "plans.p.quota.requests",
            ),
            (
                "[plans.p]\nquota = { requests = 1, per = \"week\" }\n",
                "per",
            ),
            ("[plans.p]\nscope = \"team\"\n", "scope"),
            ("[[routes]]\npath = \"/x\"\ncost = 0\n", "routes[0].cost"),
            (
                "[[routes]]\npath = \"/x\"\nauth = \"none\"\ncost = 2\n",
                "cannot have a cost",
            ),
        ] {
            let e = load(&format!("{base}{bad}"), &[], CliOverrides::default()).unwrap_err();
            assert!(e.to_string().contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn a_duplicate_route_is_reported_whatever_the_upstreams() {
        let routes = "[[routes]]\npath = \"/x\"\n[[routes]]\npath = \"/x\"\n";
        for proxy in [
            "[proxy]\nupstream = \"nope\"\n",
            "[proxy]\nlisten = \"nope\"\n",
            "[proxy]\n",
        ] {
            let e = load(&format!("{proxy}{routes}"), &[], CliOverrides::default()).unwrap_err();
            assert!(
                e.to_string()
                    .contains("routes[1].path: \"/x\" is defined twice"),
                "{proxy}: {e}"
            );
        }
        let bad_upstream = "[[routes]]\npath = \"/x\"\nupstream = \"ftp://h\"\n";
        let e = load(
            &format!("{bad_upstream}{bad_upstream}"),
            &[],
            CliOverrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("defined twice"), "{e}");
    }

    #[test]
    fn short_admin_key_only_on_loopback() {
        let c = load("[admin]\nkeys=[\"short\"]\n", &[], CliOverrides::default()).unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert!(
            load(
                "[admin]\nkeys=[\"short\"]\nlisten=\"0.0.0.0:1\"\n",
                &[],
                CliOverrides::default()
            )
            .is_err()
        );
    }

    #[test]
    fn admin_host_names_are_checked_on_loopback_or_when_listed() {
        let key = "[admin]\nkeys=[\"a-very-long-admin-key\"]\n";
        let on = |extra: &str| {
            load(&format!("{key}{extra}"), &[], CliOverrides::default())
                .map(|c| c.admin.allowed_hosts)
                .map_err(|e| e.to_string())
        };
        assert_eq!(on("").unwrap(), Some(vec![]));
        assert_eq!(on("listen=\"[::1]:1\"\n").unwrap(), Some(vec![]));
        assert_eq!(on("listen=\"0.0.0.0:1\"\n").unwrap(), None);
        assert_eq!(
            on("listen=\"0.0.0.0:1\"\nallowed_hosts=[\"Admin.Example.com.\"]\n").unwrap(),
            Some(vec!["admin.example.com".to_string()])
        );
        for bad in [
            "",
            ".",
            "a:80",
            "http://a",
            "-a",
            "a b",
            "*.example.com",
            "a/b",
        ] {
            let e = on(&format!("allowed_hosts=[{bad:?}]\n")).unwrap_err();
            assert!(e.contains("admin.allowed_hosts[0]"), "{bad}: {e}");
        }
    }

    #[test]
    fn sha256_admin_keys() {
        let h = hex::encode(KeyHash::of("a-very-long-admin-key").0);
        let c = load(
            &format!("[admin]\nkeys=[\"sha256:{h}\"]\n"),
            &[],
            CliOverrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.admin.key_hashes,
            vec![KeyHash::of("a-very-long-admin-key")]
        );
    }

    #[test]
    fn redis_store_settings() {
        let secret = [("KEYGATE_JWT_SECRET", "a-shared-secret-of-at-least-32-bytes")];
        let ok = |text: &str| load(text, &secret, CliOverrides::default());
        let c = ok("[store]\nurl = \"redis://127.0.0.1:6379/2\"\n").unwrap();
        // Without a shared token secret a Redis store is refused.
        let e = load(
            "[store]\nurl = \"redis://127.0.0.1:6379/2\"\n",
            &[],
            CliOverrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("jwt.secret"), "{e}");
        assert_eq!(
            c.store.url,
            StoreUrl::Redis("redis://127.0.0.1:6379/2".into())
        );
        assert_eq!(c.store.redis_prefix, "keygate:");
        let c =
            ok("[store]\nurl = \"redis+unix:///run/r.sock\"\nredis_prefix = \"kg1:\"\n").unwrap();
        assert_eq!(c.store.redis_prefix, "kg1:");
        let e = ok(
            "[store]\nurl = \"rediss://u:secretpw@h:6380/0#insecure\"\nredis_prefix = \"a b\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("store.url") && e.contains("always verified"),
            "{e}"
        );
        assert!(e.contains("store.redis_prefix"), "{e}");
        assert!(!e.contains("secretpw"), "password leaked: {e}");
        // TLS and an ACL user are accepted.
        let c = ok("[store]\nurl = \"rediss://kg:secretpw@h:6380/0\"\n").unwrap();
        assert_eq!(
            c.store.url,
            StoreUrl::Redis("rediss://kg:secretpw@h:6380/0".into())
        );
        assert!(c.store.redis_tls.is_empty());
        let e = ok("[store]\nurl = \"redis+unix://relative.sock?pass=secretpw\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.url"), "{e}");
        assert!(!e.contains("secretpw"), "password leaked: {e}");
    }

    #[test]
    fn redis_tls_files() {
        let secret = [("KEYGATE_JWT_SECRET", "a-shared-secret-of-at-least-32-bytes")];
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let client = rcgen::generate_simple_self_signed(vec!["kg".to_string()]).unwrap();
        let f = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let ca_pem = f("ca.pem", &ca.cert.pem());
        let cert = f("client.pem", &client.cert.pem());
        let key = f("client.key", &client.signing_key.serialize_pem());
        let other_key = f("other.key", &ca.signing_key.serialize_pem());
        let garbage = f("garbage.pem", "not a certificate\n");
        let missing = dir.path().join("missing.pem").display().to_string();
        let load = |url: &str, ca: &str, cert: &str, key: &str| {
            let mut text = format!("[store]\nurl = \"{url}\"\n");
            for (k, v) in [
                ("redis_ca", ca),
                ("redis_client_cert", cert),
                ("redis_client_key", key),
            ] {
                if !v.is_empty() {
                    text += &format!("{k} = \"{v}\"\n");
                }
            }
            load(&text, &secret, CliOverrides::default()).map_err(|e| e.to_string())
        };
        let url = "rediss://kg:secretpw@h:6380/0";
        let c = load(url, &ca_pem, &cert, &key).unwrap();
        assert_eq!(
            c.store.redis_tls.ca.as_deref(),
            Some(std::path::Path::new(&ca_pem))
        );
        assert!(load(url, &ca_pem, "", "").is_ok());
        assert!(load(url, "", &cert, &key).is_ok());
        let refused = |ca: &str, cert: &str, key: &str, field: &str, file: &str| {
            let e = load(url, ca, cert, key).unwrap_err();
            assert!(e.contains(field) && e.contains(file), "{field} {file}: {e}");
            assert!(!e.contains("secretpw"), "password leaked: {e}");
            assert!(!e.contains("PRIVATE KEY"), "key leaked: {e}");
        };
        refused(&missing, "", "", "store.redis_ca", &missing);
        refused(&garbage, "", "", "store.redis_ca", &garbage);
        refused(&key, "", "", "store.redis_ca", &key);
        refused(&ca_pem, &garbage, &key, "store.redis_client_cert", &garbage);
        refused(&ca_pem, &cert, &garbage, "store.redis_client_key", &garbage);
        refused(
            &ca_pem,
            &cert,
            &other_key,
            "store.redis_client_key",
            &other_key,
        );
        refused(&ca_pem, &cert, "", "redis_client_key", "set both");
        // The environment names them too.
        let text = format!("[store]\nurl = \"{url}\"\n");
        let env = [
            secret[0],
            ("KEYGATE_REDIS_CA", ca_pem.as_str()),
            ("KEYGATE_REDIS_CLIENT_CERT", cert.as_str()),
            ("KEYGATE_REDIS_CLIENT_KEY", key.as_str()),
        ];
        let c = self::load(&text, &env, CliOverrides::default()).unwrap();
        assert_eq!(
            c.store.redis_tls.client_key.as_deref(),
            Some(std::path::Path::new(&key))
        );
        // The files belong to a rediss:// store.
        let e = load("redis://h:6379/0", &ca_pem, "", "").unwrap_err();
        assert!(e.contains("rediss://"), "{e}");
    }

    #[test]
    fn shipped_config_is_valid_and_has_the_plans() {
        let text = include_str!("../config/keygate.toml");
        let c = load(text, &[], CliOverrides::default()).unwrap();
        for plan in ["free", "maker", "pro"] {
            assert!(c.plans.contains_key(plan), "missing plan {plan}");
        }
    }
}
