//! Routes: matching by prefix on whole segments (`/v1/a` matches `/v1/a` and `/v1/a/x`, not
//! `/v1/ab`), on the percent-decoded path (`/%61dmin` is `/admin` to every upstream that
//! decodes), ASCII case-insensitive (so `/V1/A` cannot dodge the checks of `/v1/a` on a
//! case-insensitive upstream), longest prefix first. Paths are checked first ([`crate::paths`]).

use std::sync::Arc;

use http::{HeaderValue, Method, Uri};
use uuid::Uuid;

use crate::clock::Clock;
use crate::config::{self, RouteAuth};
use crate::limit::KeyedLimit;
use crate::paths::decoded;

/// A configured route, ready for matching.
#[derive(Debug, Clone)]
pub struct Route {
    pub path: String,
    pub upstream: Uri,
    pub permissions: Vec<String>,
    pub methods: Vec<Method>,
    pub auth: RouteAuth,
    /// Stable label for logs and metrics (the configured path, never the request path).
    pub name: String,
    /// `Host` sent upstream: the upstream's authority, encoded once.
    pub host: HeaderValue,
    /// The methods it answers (`Allow` of a 405), when it restricts them.
    pub allow: Option<HeaderValue>,
    /// Per-key limit on this route, on top of the key's own.
    pub limiter: Option<Arc<KeyedLimit<Uuid>>>,
    /// Credits a request takes from a key that has credits.
    pub cost: u64,
    /// Position in the table (for per-route metrics).
    pub index: usize,
    /// The route's own CORS rules (`None`: the default's, see `proxy::policy`).
    pub cors: Option<Arc<crate::cors::Cors>>,
}

fn host_of(upstream: &Uri) -> HeaderValue {
    upstream
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .unwrap_or_else(|| HeaderValue::from_static("localhost"))
}

/// `Allow` for a route restricted to `methods` (HEAD added where GET is).
fn allow_of(methods: &[Method]) -> Option<HeaderValue> {
    if methods.is_empty() {
        return None;
    }
    let mut names: Vec<&str> = methods.iter().map(Method::as_str).collect();
    if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
        names.push("HEAD");
    }
    HeaderValue::from_str(&names.join(", ")).ok()
}

impl Route {
    /// `auth = "none"`: no key needed.
    pub fn is_public(&self) -> bool {
        self.auth == RouteAuth::None
    }

    /// Compares percent-decoded bytes: [`crate::paths::check_path`] has refused encoded separators and
    /// `%`, so decoding cannot move a segment boundary.
    fn matches(&self, path: &str) -> bool {
        let mut want = decoded(self.path.trim_end_matches('/').as_bytes());
        let mut got = decoded(path.as_bytes());
        let prefix = want.all(|w| got.next().is_some_and(|g| g.eq_ignore_ascii_case(&w)));
        prefix && matches!(got.next(), None | Some(b'/'))
    }

    /// Whether the route answers `method`; HEAD is judged as GET (frameworks run the GET
    /// handler for HEAD).
    pub fn allows(&self, method: &Method) -> bool {
        self.methods.is_empty()
            || self.methods.contains(method)
            || (*method == Method::HEAD && self.methods.contains(&Method::GET))
    }
}

#[derive(Debug, Clone)]
pub struct RouteTable {
    /// Longest path first.
    routes: Vec<Route>,
}

impl RouteTable {
    /// Builds the table; with no configured routes, one catch-all route to `default_upstream`
    /// that requires a key. Route limits read `clock`.
    pub fn new(routes: &[config::Route], default_upstream: &Uri, clock: &Clock) -> Self {
        let mut routes: Vec<Route> = if routes.is_empty() {
            vec![Route {
                path: "/".into(),
                upstream: default_upstream.clone(),
                permissions: Vec::new(),
                methods: Vec::new(),
                auth: RouteAuth::Required,
                name: "/".into(),
                host: host_of(default_upstream),
                allow: None,
                limiter: None,
                cost: 1,
                index: 0,
                cors: None,
            }]
        } else {
            routes
                .iter()
                .map(|r| Route {
                    path: r.path.clone(),
                    upstream: r.upstream.clone(),
                    permissions: r.permissions.clone(),
                    methods: r.methods.clone(),
                    auth: r.auth,
                    name: r.path.clone(),
                    host: host_of(&r.upstream),
                    allow: allow_of(&r.methods),
                    limiter: r
                        .rate_limit
                        .map(|l| Arc::new(KeyedLimit::new(l, clock.clone()))),
                    cost: r.cost,
                    index: 0,
                    cors: r.cors.clone(),
                })
                .collect()
        };
        routes.sort_by_key(|r| std::cmp::Reverse(r.path.trim_end_matches('/').len()));
        for (i, r) in routes.iter_mut().enumerate() {
            r.index = i;
        }
        Self { routes }
    }

    /// Route names in table order (the order of [`Route::index`]).
    pub fn names(&self) -> Vec<String> {
        self.routes.iter().map(|r| r.name.clone()).collect()
    }

    /// Drops idle per-route limiter state.
    pub fn sweep(&self) {
        for r in &self.routes {
            if let Some(l) = &r.limiter {
                l.sweep();
            }
        }
    }

    /// The longest route matching `path`. A route owns its paths for every method: one that
    /// does not allow the request's method answers 405, never a shorter route.
    pub fn find(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_route(path: &str) -> config::Route {
        config::Route {
            path: path.into(),
            upstream: "http://127.0.0.1:1".parse().unwrap(),
            permissions: Vec::new(),
            methods: Vec::new(),
            auth: RouteAuth::Required,
            rate_limit: None,
            cors: None,
            audience: None,
            cost: 1,
        }
    }

    fn table() -> RouteTable {
        let up: Uri = "http://127.0.0.1:1".parse().unwrap();
        let mk = |path: &str, perms: &[&str], methods: &[Method]| config::Route {
            path: path.into(),
            upstream: up.clone(),
            permissions: perms.iter().map(|s| s.to_string()).collect(),
            methods: methods.to_vec(),
            auth: RouteAuth::Required,
            rate_limit: None,
            cors: None,
            audience: None,
            cost: 1,
        };
        RouteTable::new(
            &[
                mk("/", &[], &[]),
                mk("/v1/extract", &["DATA_EXTRACTION"], &[]),
                mk("/v1/extract/admin", &["ADMIN"], &[Method::POST]),
            ],
            &up,
            &crate::clock::FakeClock::new().clock(),
        )
    }

    #[test]
    fn longest_whole_segment_prefix_wins() {
        let t = table();
        let name = |p: &str, m: Method| t.find(p).filter(|r| r.allows(&m)).map(|r| r.name.clone());
        assert_eq!(name("/v1/extract", Method::GET).unwrap(), "/v1/extract");
        assert_eq!(name("/v1/extract/x", Method::GET).unwrap(), "/v1/extract");
        assert_eq!(name("/V1/EXTRACT/x", Method::GET).unwrap(), "/v1/extract");
        assert_eq!(name("/v1/extractor", Method::GET).unwrap(), "/");
        // Decoded before matching: an encoded letter is the same path to an upstream.
        assert_eq!(name("/v1/%65xtract", Method::GET).unwrap(), "/v1/extract");
        assert_eq!(
            name("/%56%31/EXTRACT/x", Method::GET).unwrap(),
            "/v1/extract"
        );
        assert_eq!(name("/v1/extract%41", Method::GET).unwrap(), "/");
        assert_eq!(
            name("/v1/extract/admin", Method::POST).unwrap(),
            "/v1/extract/admin"
        );
        // A route owns its path for every method: GET does not fall through to a shorter
        // route; HEAD is judged as GET.
        assert_eq!(name("/v1/extract/admin", Method::GET), None);
        let admin = t.find("/v1/extract/admin").unwrap();
        assert_eq!(admin.allow.as_ref().unwrap(), "POST");
        let get_only = RouteTable::new(
            &[config::Route {
                methods: vec![Method::GET],
                ..table_route("/admin")
            }],
            &"http://u:1".parse().unwrap(),
            &crate::clock::FakeClock::new().clock(),
        );
        let r = get_only.find("/admin/x").unwrap();
        assert!(r.allows(&Method::GET) && r.allows(&Method::HEAD));
        assert!(!r.allows(&Method::POST) && !r.allows(&Method::OPTIONS));
        assert_eq!(r.allow.as_ref().unwrap(), "GET, HEAD");
    }

    #[test]
    fn catch_all_when_no_routes() {
        let up: Uri = "http://127.0.0.1:1".parse().unwrap();
        let t = RouteTable::new(&[], &up, &crate::clock::FakeClock::new().clock());
        let r = t.find("/anything").unwrap();
        assert_eq!(r.auth, RouteAuth::Required);
        assert!(r.permissions.is_empty());
    }
}
