//! Path checks and route matching.
//!
//! A path is checked before any route is matched, and refused (400) when an upstream could read
//! it as a different path than the one matched here: dot-segments, empty segments (`//`),
//! backslashes, `;` parameters, segments ending in `.` or a space, encoded `.`, `/`, `\`, `;`,
//! `%` (so nothing is double-encoded), control characters (C0 and C1, raw or encoded),
//! malformed escapes, escapes that are not UTF-8 (overlong `%c0%ae`), and characters whose
//! compatibility form holds `.`, `/`, `\`, `;` or `%` (full-width `．`, `／`…). What passes is
//! forwarded byte for byte, so the path that was authorised is the path the upstream sees.
//!
//! Matching is by prefix on whole segments (`/v1/a` matches `/v1/a` and `/v1/a/x`, not
//! `/v1/ab`), on the percent-decoded path (`/%61dmin` is `/admin` to every upstream that
//! decodes), ASCII case-insensitive (so `/V1/A` cannot dodge the checks of `/v1/a` on a
//! case-insensitive upstream), longest prefix first.

use std::sync::Arc;

use http::{HeaderValue, Method, Uri};
use uuid::Uuid;

use crate::clock::Clock;
use crate::config::{self, RouteAuth};
use crate::limit::KeyedLimit;

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// True for bytes that must never appear percent-encoded in a path we forward.
fn forbidden_encoded(b: u8) -> bool {
    matches!(b, b'.' | b'/' | b'\\' | b';' | b'%') || b < 0x20 || b == 0x7f
}

/// Code points whose NFKC form contains `.`, `/`, `\`, `;` or `%` (the whole list, from the
/// Unicode data): an upstream that normalises would read them as separators or dots.
fn lookalike(c: char) -> bool {
    matches!(
        c as u32,
        0x037E
            | 0x2024..=0x2026
            | 0x2100
            | 0x2101
            | 0x2105
            | 0x2106
            | 0x2488..=0x249B
            | 0x33C2
            | 0x33C7
            | 0x33D8
            | 0xFE14
            | 0xFE19
            | 0xFE30
            | 0xFE52
            | 0xFE54
            | 0xFE68
            | 0xFE6A
            | 0xFF05
            | 0xFF0E
            | 0xFF0F
            | 0xFF1B
            | 0xFF3C
            | 0x1F100
    )
}

/// The bytes of `b` with well-formed percent-escapes decoded.
fn decoded(b: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let c = *b.get(i)?;
        if c == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            i += 3;
            return Some(h << 4 | l);
        }
        i += 1;
        Some(c)
    })
}

/// Checks a request path. `Err` carries the reason for the 400 body.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err("the path must start with '/'");
    }
    let mut non_ascii = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\\' => return Err("backslashes are not allowed in paths"),
            b';' => return Err("';' parameters are not allowed in paths"),
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err("malformed percent-encoding in path");
                };
                let decoded = h << 4 | l;
                if decoded == b'%' {
                    return Err("an encoded '%' (double encoding) is not allowed in paths");
                }
                if forbidden_encoded(decoded) {
                    return Err(
                        "encoded '.', '/', '\\', ';' or control characters are not allowed in paths",
                    );
                }
                non_ascii |= decoded >= 0x80;
                i += 3;
                continue;
            }
            c if c < 0x20 || c == 0x7f => {
                return Err("control characters are not allowed in paths");
            }
            c => non_ascii |= c >= 0x80,
        }
        i += 1;
    }
    // Segment rules (the leading '/' makes the first split element empty).
    let mut segments = path[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg.is_empty() && !last {
            return Err("empty path segments ('//') are not allowed");
        }
        if seg == "." || seg == ".." {
            return Err("dot-segments are not allowed in paths");
        }
        // Windows servers trim both from the end of a segment.
        if seg.ends_with(['.', ' ']) || seg.ends_with("%20") {
            return Err("path segments ending in '.' or a space are not allowed");
        }
    }
    if non_ascii {
        let bytes: Vec<u8> = decoded(b).collect();
        let text =
            std::str::from_utf8(&bytes).map_err(|_| "paths must be UTF-8 once percent-decoded")?;
        if text.chars().any(char::is_control) {
            return Err("control characters are not allowed in paths");
        }
        if text.chars().any(lookalike) {
            return Err(
                "characters that read as '.', '/', '\\', ';' or '%' are not allowed in paths",
            );
        }
    }
    Ok(())
}

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
    /// Per-key limit on this route, on top of the key's own.
    pub limiter: Option<Arc<KeyedLimit<Uuid>>>,
    /// Position in the table (for per-route metrics).
    pub index: usize,
}

fn host_of(upstream: &Uri) -> HeaderValue {
    upstream
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .unwrap_or_else(|| HeaderValue::from_static("localhost"))
}

impl Route {
    /// Compares percent-decoded bytes: [`check_path`] has refused encoded separators and
    /// `%`, so decoding cannot move a segment boundary.
    fn matches(&self, path: &str, method: &Method) -> bool {
        let mut want = decoded(self.path.trim_end_matches('/').as_bytes());
        let mut got = decoded(path.as_bytes());
        let prefix = want.all(|w| got.next().is_some_and(|g| g.eq_ignore_ascii_case(&w)));
        let hit = prefix && matches!(got.next(), None | Some(b'/'));
        hit && (self.methods.is_empty() || self.methods.contains(method))
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
                limiter: None,
                index: 0,
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
                    limiter: r
                        .rate_limit
                        .map(|l| Arc::new(KeyedLimit::new(l, clock.clone()))),
                    index: 0,
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

    /// The longest route matching `path` and `method`.
    pub fn find(&self, path: &str, method: &Method) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(path, method))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_ambiguous_paths() {
        for p in [
            "//admin",
            "/./admin",
            "/x/../admin",
            "/%2e%2e/admin",
            "/.%2E/admin",
            "/%2fadmin",
            "/admin%2F",
            "/\\admin",
            "/%5cadmin",
            "/%252e%252e/admin",
            "/%252fadmin",
            "/admin;x",
            "/admin.",
            "/admin%00",
            "/admin%0a",
            "/a/..",
            "/a/.",
            "/%zz",
            "/%2",
            "/%2561dmin",
            "/%25",
            "/admin%20",
            "/admin%20/x",
            "/admin ",
            "/x/%c0%ae%c0%ae/admin",
            "/v1%c0%afextract",
            "/x/%ef%bc%8e%ef%bc%8e/admin",
            "/x/\u{ff0e}\u{ff0e}/admin",
            "/v1%ef%bc%8fextract",
            "/admin%e2%80%a4",
            "/%ff",
            "/pv\u{9e}",
            "/a%c2%85",
            "admin",
            "",
        ] {
            assert!(check_path(p).is_err(), "accepted {p:?}");
        }
    }

    #[test]
    fn accepts_ordinary_paths() {
        for p in [
            "/",
            "/v1/extract",
            "/v1/extract/",
            "/a.b/c",
            "/a%20b",
            "/%41",
            "/a/.well-known",
            "/%20a",
            "/jos%C3%A9",
            "/jos\u{e9}/caf%c3%a9",
            "/%7Euser",
        ] {
            assert!(check_path(p).is_ok(), "refused {p:?}");
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
        let name = |p: &str, m: Method| t.find(p, &m).map(|r| r.name.clone());
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
        assert_eq!(
            name("/v1/extract/admin", Method::GET).unwrap(),
            "/v1/extract"
        );
    }

    #[test]
    fn catch_all_when_no_routes() {
        let up: Uri = "http://127.0.0.1:1".parse().unwrap();
        let t = RouteTable::new(&[], &up, &crate::clock::FakeClock::new().clock());
        let r = t.find("/anything", &Method::GET).unwrap();
        assert_eq!(r.auth, RouteAuth::Required);
        assert!(r.permissions.is_empty());
    }
}
