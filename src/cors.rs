//! CORS at the gateway (the Fetch standard's CORS protocol), as the policy core applies it on
//! every engine and on the verify endpoint (see `proxy::policy`).
//!
//! - A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) on a route with
//!   CORS is answered by keygate itself ([`Cors::preflight`]): 204 with the
//!   `Access-Control-*` fields when the origin, the method and every requested field are
//!   allowed, else 403. No key is needed and nothing reaches the upstream.
//! - Every other answer on such a route — relayed or keygate's own 401, 403, 429… — carries
//!   `Vary: Origin` and, for an allowed origin, `Access-Control-Allow-Origin` (the request's own
//!   origin, or `*` when every origin is allowed — never an arbitrary origin reflected),
//!   `Access-Control-Allow-Credentials` when configured and `Access-Control-Expose-Headers`
//!   ([`Cors::grant`], [`Cors::write`], [`Cors::add`]). A disallowed origin gets no
//!   `Access-Control-*` field.
//! - The upstream's own `Access-Control-*` answer fields are replaced by keygate's on such a
//!   route ([`upstream_owned`]); on a route without CORS they pass through untouched, and so do
//!   preflights (to the upstream, authenticated like any request).
//!
//! Origins are matched byte for byte against their serialization (`scheme://host[:port]`,
//! lowercase, as browsers send it); a wildcard pattern `scheme://*.example.com[:port]` matches
//! one or more whole labels in front of `example.com` — never `example.com` itself,
//! `evil-example.com` or `example.com.evil.io`. `null` is never allowed by name.
//!
//! Nothing here allocates for a request without `Origin` or on a route without CORS.

use bytes::Bytes;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};

/// Longest `Origin` value considered (a serialized origin is a scheme, a host name of at most
/// 253 bytes and a port): a longer one is never allowed.
pub const MAX_ORIGIN_LEN: usize = 300;
/// Longest `Access-Control-Request-Headers` value of a preflight: a longer one is refused.
pub const MAX_REQUEST_HEADERS_LEN: usize = 4096;
/// `Access-Control-Max-Age` when none is configured (seconds).
pub const DEFAULT_MAX_AGE: u64 = 600;
/// Largest `max_age` accepted (one day; Firefox caps there, Chromium at two hours).
pub const MAX_MAX_AGE: u64 = 86_400;
/// Methods allowed when none are configured.
pub const DEFAULT_METHODS: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];
/// Fields of keygate's own answers, always exposed to scripts: the rate-limit fields, the
/// retry delay of a 429 or 503, the credit and quota counters.
pub const GATEWAY_EXPOSED: [&str; 6] = [
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "retry-after",
    "keygate-credits-remaining",
    "keygate-quota-remaining",
];

/// The `Access-Control-*` fields of an answer, which keygate owns on a route with CORS.
const ANSWER_FIELDS: [HeaderName; 6] = [
    ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_ALLOW_CREDENTIALS,
    ACCESS_CONTROL_EXPOSE_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_MAX_AGE,
];

/// Whether an upstream's answer field `name` is one keygate writes itself on a route with
/// CORS (and so is not relayed there).
pub fn upstream_owned(name: &[u8]) -> bool {
    ANSWER_FIELDS
        .iter()
        .any(|f| f.as_str().len() == name.len() && name.eq_ignore_ascii_case(f.as_str().as_bytes()))
}

/// One entry of `origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    /// `*`: every origin.
    Any,
    /// `scheme://host[:port]`, lowercase.
    Exact(String),
    /// `scheme://*.suffix[:port]`: one or more labels in front of `suffix`.
    Subdomains {
        /// `scheme://`.
        scheme: String,
        /// `.suffix`, lowercase, with its leading dot.
        suffix: String,
        /// `:port`, or empty.
        port: String,
    },
}

impl OriginPattern {
    /// Parses one configured origin; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<OriginPattern, &'static str> {
        if s == "*" {
            return Ok(OriginPattern::Any);
        }
        if s.eq_ignore_ascii_case("null") {
            return Err(
                "\"null\" is the origin of sandboxed frames, file: pages and redirects: any site can send it, so it is never allowed",
            );
        }
        let lower = s.to_ascii_lowercase();
        let (scheme, rest) = lower
            .split_once("://")
            .ok_or("an origin is scheme://host[:port], e.g. \"https://app.example.com\"")?;
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_lowercase())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
        if !scheme_ok {
            return Err("the scheme must be letters, digits, '+', '-' or '.' (e.g. https)");
        }
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err("an origin has no path, query or fragment (not even a trailing '/')");
        }
        if rest.contains('@') {
            return Err("an origin has no user information");
        }
        let (host, port) = split_port(rest).ok_or("the port must be a number from 1 to 65535")?;
        // A browser leaves its scheme's default port out of `Origin` (RFC 6454 §6.2): kept, it
        // would never match.
        let port = port.filter(|p| !matches!((scheme, *p), ("http", "80") | ("https", "443")));
        if let Some(suffix) = host.strip_prefix("*.") {
            if !hostname(suffix) || !suffix.contains('.') {
                return Err(
                    "a wildcard is \"scheme://*.domain.tld\": '*.' first, then a host name of at least two labels",
                );
            }
            return Ok(OriginPattern::Subdomains {
                scheme: format!("{scheme}://"),
                suffix: format!(".{suffix}"),
                port: port.map(|p| format!(":{p}")).unwrap_or_default(),
            });
        }
        if host.contains('*') {
            return Err(
                "'*' stands only for whole leading labels (\"https://*.example.com\") or alone for every origin",
            );
        }
        if !(hostname(host) || ipv6_literal(host)) {
            return Err(
                "the host must be a host name, an IPv4 address or a bracketed IPv6 address",
            );
        }
        let port = port.map(|p| format!(":{p}")).unwrap_or_default();
        Ok(OriginPattern::Exact(format!("{scheme}://{host}{port}")))
    }
}

/// `host[:port]` → (host, port); `None` when a port is there but not 1–65535.
fn split_port(rest: &str) -> Option<(&str, Option<&str>)> {
    let colon = if rest.starts_with('[') {
        rest.find(']')
            .and_then(|i| rest[i..].find(':').map(|j| i + j))
    } else {
        rest.rfind(':')
    };
    match colon {
        None => Some((rest, None)),
        Some(i) => {
            let port = &rest[i + 1..];
            let ok = !port.is_empty()
                && port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && !port.starts_with('0')
                && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
            ok.then_some((&rest[..i], Some(port)))
        }
    }
}

/// Lowercase labels of letters, digits and '-' (not at either end), separated by dots.
fn hostname(h: &str) -> bool {
    !h.is_empty() && h.len() <= 253 && h.split('.').all(label)
}

fn label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && !l.starts_with('-')
        && !l.ends_with('-')
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn ipv6_literal(h: &str) -> bool {
    h.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
}

/// Allowed methods or request fields: a list, or `*` (whatever the preflight asks for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed<T> {
    Any,
    List(Vec<T>),
}

/// What an answer carries, besides `Vary: Origin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// No `Origin`, or one that is not allowed: no `Access-Control-*` field.
    Nothing,
    /// `Access-Control-Allow-Origin: *`.
    Any,
    /// `Access-Control-Allow-Origin: <the request's Origin>`.
    Origin,
}

/// The validated settings of one `cors` table.
#[derive(Debug, Clone)]
pub struct Settings {
    pub origins: Vec<OriginPattern>,
    pub methods: Allowed<Method>,
    pub headers: Allowed<HeaderName>,
    /// Exposed besides [`GATEWAY_EXPOSED`].
    pub expose_headers: Vec<HeaderName>,
    pub max_age: u64,
    pub credentials: bool,
}

/// One route's (or the default) CORS rules, with every field value made once.
#[derive(Debug)]
pub struct Cors {
    any: bool,
    exact: Vec<Box<[u8]>>,
    subdomains: Vec<Wildcard>,
    credentials: bool,
    methods: Allowed<Method>,
    headers: Allowed<HeaderName>,
    allow_methods: HeaderValue,
    allow_headers: Option<HeaderValue>,
    expose: HeaderValue,
    max_age: HeaderValue,
}

/// `scheme://*.suffix[:port]`, as bytes.
#[derive(Debug)]
struct Wildcard {
    /// `scheme://`.
    scheme: Box<[u8]>,
    /// `.suffix`.
    suffix: Box<[u8]>,
    /// `:port`, or empty.
    port: Box<[u8]>,
}

fn joined<'a>(names: impl Iterator<Item = &'a str>) -> HeaderValue {
    let text: Vec<&str> = names.collect();
    HeaderValue::from_str(&text.join(", ")).expect("tokens are field text")
}

impl Cors {
    pub fn new(s: &Settings) -> Cors {
        let mut cors = Cors {
            any: false,
            exact: Vec::new(),
            subdomains: Vec::new(),
            credentials: s.credentials,
            methods: s.methods.clone(),
            headers: s.headers.clone(),
            allow_methods: match &s.methods {
                Allowed::Any => HeaderValue::from_static("*"),
                Allowed::List(m) => joined(m.iter().map(Method::as_str)),
            },
            allow_headers: match &s.headers {
                Allowed::List(h) if !h.is_empty() => Some(joined(h.iter().map(HeaderName::as_str))),
                _ => None,
            },
            expose: joined(
                GATEWAY_EXPOSED
                    .iter()
                    .copied()
                    .chain(s.expose_headers.iter().map(HeaderName::as_str)),
            ),
            max_age: HeaderValue::from(s.max_age),
        };
        for o in &s.origins {
            match o {
                OriginPattern::Any => cors.any = true,
                OriginPattern::Exact(e) => cors.exact.push(e.as_bytes().into()),
                OriginPattern::Subdomains {
                    scheme,
                    suffix,
                    port,
                } => cors.subdomains.push(Wildcard {
                    scheme: scheme.as_bytes().into(),
                    suffix: suffix.as_bytes().into(),
                    port: port.as_bytes().into(),
                }),
            }
        }
        cors
    }

    /// No origin is allowed (`origins = []`): the route has no CORS, even where a default
    /// would apply.
    pub fn is_off(&self) -> bool {
        !self.any && self.exact.is_empty() && self.subdomains.is_empty()
    }

    /// Whether `origin` (the request's `Origin` value) is allowed.
    pub fn allows(&self, origin: &[u8]) -> bool {
        if origin.len() > MAX_ORIGIN_LEN || origin.is_empty() {
            return false;
        }
        if self.any {
            return true;
        }
        self.exact.iter().any(|e| **e == *origin)
            || self
                .subdomains
                .iter()
                .any(|w| subdomain_of(origin, &w.scheme, &w.suffix, &w.port))
    }

    /// What an answer to a request with `origin` carries.
    pub fn grant(&self, origin: Option<&[u8]>) -> Grant {
        match origin {
            // `*` never echoes: an arbitrary origin is never reflected (check-config refuses
            // `*` with credentials, where browsers would ignore this answer).
            Some(o) if self.allows(o) => {
                if self.any {
                    Grant::Any
                } else {
                    Grant::Origin
                }
            }
            _ => Grant::Nothing,
        }
    }

    /// Appends the fields of `grant` to an HTTP/1.1 head being written; `origin` is the
    /// request's `Origin` value.
    pub fn write(&self, out: &mut Vec<u8>, grant: Grant, origin: &[u8]) {
        out.extend_from_slice(b"vary: origin\r\n");
        let value = match grant {
            Grant::Nothing => return,
            Grant::Any => b"*".as_slice(),
            Grant::Origin => origin,
        };
        out.extend_from_slice(b"access-control-allow-origin: ");
        out.extend_from_slice(value);
        if self.credentials {
            out.extend_from_slice(b"\r\naccess-control-allow-credentials: true");
        }
        out.extend_from_slice(b"\r\naccess-control-expose-headers: ");
        out.extend_from_slice(self.expose.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// Adds the fields of `grant` to an answer's fields; `origin` is the request's `Origin`.
    pub fn add(&self, h: &mut HeaderMap, grant: Grant, origin: Option<HeaderValue>) {
        h.append(VARY, HeaderValue::from_static("origin"));
        let value = match (grant, origin) {
            (Grant::Any, _) => HeaderValue::from_static("*"),
            (Grant::Origin, Some(o)) => o,
            _ => return,
        };
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, value);
        if self.credentials {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, self.expose.clone());
    }

    /// [`Cors::add`] to a relayed answer, whose own `Access-Control-*` fields it replaces.
    pub fn replace(&self, h: &mut HeaderMap, grant: Grant, origin: Option<HeaderValue>) {
        for name in &ANSWER_FIELDS {
            h.remove(name);
        }
        self.add(h, grant, origin);
    }

    /// The answer to a preflight from `origin` asking for `method` and the fields `fields`
    /// (`Access-Control-Request-Headers`): 204 with `Access-Control-Allow-Methods`,
    /// `-Allow-Headers` and `-Max-Age` (the origin fields are added like on every answer, by
    /// [`Cors::add`]); or why it is refused.
    pub fn preflight(
        &self,
        origin: &[u8],
        method: &[u8],
        fields: Option<&[u8]>,
    ) -> Result<Response<Bytes>, &'static str> {
        if !self.allows(origin) {
            return Err("the origin is not allowed to call this route");
        }
        if !token(method) {
            return Err("Access-Control-Request-Method is not a method");
        }
        // GET, HEAD and POST are never refused by a browser, listed or not.
        let safelisted = matches!(method, b"GET" | b"HEAD" | b"POST");
        if let Allowed::List(list) = &self.methods
            && !safelisted
            && !list.iter().any(|m| m.as_str().as_bytes() == method)
        {
            return Err("the method is not allowed for cross-origin requests on this route");
        }
        let fields = fields.unwrap_or_default();
        if fields.len() > MAX_REQUEST_HEADERS_LEN {
            return Err("Access-Control-Request-Headers is too long");
        }
        for name in fields
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .filter(|n| !n.is_empty())
        {
            if !token(name) {
                return Err("Access-Control-Request-Headers is not a list of field names");
            }
            if let Allowed::List(list) = &self.headers
                && !list
                    .iter()
                    .any(|h| name.eq_ignore_ascii_case(h.as_str().as_bytes()))
            {
                return Err(
                    "a requested field is not allowed for cross-origin requests on this route",
                );
            }
        }
        let mut res = Response::new(Bytes::new());
        *res.status_mut() = StatusCode::NO_CONTENT;
        let h = res.headers_mut();
        let echo = |v: &[u8]| HeaderValue::from_bytes(v).expect("tokens are field text");
        h.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            match self.methods {
                // Echoed: `*` is not honoured on credentialed requests.
                Allowed::Any => echo(method),
                Allowed::List(_) => self.allow_methods.clone(),
            },
        );
        let allow_headers = match self.headers {
            Allowed::Any => (!fields.trim_ascii().is_empty()).then(|| echo(fields.trim_ascii())),
            Allowed::List(_) => self.allow_headers.clone(),
        };
        if let Some(v) = allow_headers {
            h.insert(ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        h.insert(ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        h.insert(
            VARY,
            HeaderValue::from_static(
                "access-control-request-method, access-control-request-headers",
            ),
        );
        Ok(res)
    }
}

/// `origin` is `scheme` + one or more labels + `suffix` + `port`.
fn subdomain_of(origin: &[u8], scheme: &[u8], suffix: &[u8], port: &[u8]) -> bool {
    let Some(rest) = origin.strip_prefix(scheme) else {
        return false;
    };
    let Some(rest) = rest.strip_suffix(port) else {
        return false;
    };
    let Some(labels) = rest.strip_suffix(suffix) else {
        return false;
    };
    // Whatever follows the suffix must be the port exactly: `rest` ends there, so a
    // `.example.com.evil.io` or `:8443` left over does not end in the suffix.
    std::str::from_utf8(labels).is_ok_and(hostname)
}

/// An RFC 9110 token.
fn token(v: &[u8]) -> bool {
    !v.is_empty()
        && v.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], credentials: bool) -> Cors {
        Cors::new(&Settings {
            origins: origins
                .iter()
                .map(|o| OriginPattern::parse(o).unwrap())
                .collect(),
            methods: Allowed::List(vec![Method::GET, Method::PUT]),
            headers: Allowed::List(vec![
                HeaderName::from_static("authorization"),
                HeaderName::from_static("x-api-key"),
            ]),
            expose_headers: vec![HeaderName::from_static("x-request-id")],
            max_age: 600,
            credentials,
        })
    }

    #[test]
    fn origins_parse_or_say_why_not() {
        assert_eq!(OriginPattern::parse("*"), Ok(OriginPattern::Any));
        assert_eq!(
            OriginPattern::parse("HTTPS://App.Example.com:8443"),
            Ok(OriginPattern::Exact("https://app.example.com:8443".into()))
        );
        assert_eq!(
            OriginPattern::parse("https://*.example.com"),
            Ok(OriginPattern::Subdomains {
                scheme: "https://".into(),
                suffix: ".example.com".into(),
                port: String::new(),
            })
        );
        // The scheme's default port is what a browser leaves out.
        assert_eq!(
            OriginPattern::parse("https://app.example.com:443"),
            Ok(OriginPattern::Exact("https://app.example.com".into()))
        );
        assert_eq!(
            OriginPattern::parse("http://app.example.com:80"),
            Ok(OriginPattern::Exact("http://app.example.com".into()))
        );
        assert_eq!(
            OriginPattern::parse("http://app.example.com:443"),
            Ok(OriginPattern::Exact("http://app.example.com:443".into()))
        );
        assert_eq!(
            OriginPattern::parse("https://*.example.com:443"),
            OriginPattern::parse("https://*.example.com")
        );
        assert!(OriginPattern::parse("http://[::1]:3000").is_ok());
        assert!(OriginPattern::parse("http://127.0.0.1:3000").is_ok());
        for bad in [
            "null",
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/x",
            "https://user@app.example.com",
            "https://app.example.com:0",
            "https://app.example.com:65536",
            "https://app.example.com:",
            "https://*example.com",
            "https://a.*.example.com",
            "https://*.*.example.com",
            "https://*.com",
            "https://*",
            "https://exa mple.com",
            "https://-a.example.com",
            "1https://a.example.com",
            "https://",
        ] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcards_match_whole_labels_only() {
        let c = cors(&["https://*.example.com", "http://app.test:3000"], false);
        for ok in [
            "https://a.example.com",
            "https://a.b.example.com",
            "https://x-1.example.com",
            "http://app.test:3000",
        ] {
            assert!(c.allows(ok.as_bytes()), "{ok}");
        }
        for no in [
            "https://example.com",
            "https://.example.com",
            "https://evil-example.com",
            "https://evilexample.com",
            "https://a.example.com.evil.io",
            "https://a.example.com:8443",
            "http://a.example.com",
            "https://a..example.com",
            "https://a/.example.com",
            "https://A.example.com",
            "http://app.test",
            "http://app.test:30000",
            "null",
            "",
        ] {
            assert!(!c.allows(no.as_bytes()), "{no}");
        }
        let long = format!("https://{}.example.com", "a".repeat(MAX_ORIGIN_LEN));
        assert!(!c.allows(long.as_bytes()));
        let ported = cors(&["https://*.example.com:8443"], false);
        assert!(ported.allows(b"https://a.example.com:8443"));
        assert!(!ported.allows(b"https://a.example.com"));
        assert!(!ported.allows(b"https://a.example.com:84433"));
    }

    /// Whole lowercase labels: the oracle of the property below, written apart from `hostname`.
    fn whole_labels(s: &str) -> bool {
        !s.is_empty()
            && s.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    }

    proptest::proptest! {
        /// Whatever a client puts around the configured domain, a wildcard allows exactly
        /// `https://` + whole lowercase labels + `.example.org`, and nothing else is allowed
        /// but the exact origin.
        #[test]
        fn only_whole_labels_of_the_domain_match(
            scheme in "(https|http|HTTPS|https:/)",
            prefix in "[a-zA-Z0-9._:/@-]{0,12}",
            suffix in "(\\.example\\.org|example\\.org|-example\\.org|\\.example\\.org\\.evil\\.io|\\.example\\.orgx|\\.EXAMPLE\\.org)",
            port in "(|:443|:8443|:)",
        ) {
            let c = cors(&["https://*.example.org", "https://app.example.com"], false);
            let origin = format!("{scheme}://{prefix}{suffix}{port}");
            // Judged on the host as the client sends it: a prefix `a.` before `example.org`
            // makes the same origin as `a` before `.example.org`.
            let host = format!("{prefix}{suffix}");
            let expected = scheme == "https"
                && port.is_empty()
                && host.strip_suffix(".example.org").is_some_and(whole_labels);
            proptest::prop_assert_eq!(c.allows(origin.as_bytes()), expected, "{}", origin);
            // Without the domain (the prefix is too short to hold a label and the domain).
            let bare = format!("{scheme}://{prefix}{port}");
            proptest::prop_assert!(!c.allows(bare.as_bytes()), "{}", bare);
        }
    }

    #[test]
    fn grants() {
        let any = cors(&["*"], false);
        assert_eq!(any.grant(Some(b"https://x.io")), Grant::Any);
        assert_eq!(any.grant(Some(b"null")), Grant::Any);
        assert_eq!(any.grant(None), Grant::Nothing);
        let listed = cors(&["https://app.io"], true);
        assert_eq!(listed.grant(Some(b"https://app.io")), Grant::Origin);
        assert_eq!(listed.grant(Some(b"https://evil.io")), Grant::Nothing);
        assert!(cors(&[], false).is_off());

        let mut out = Vec::new();
        listed.write(&mut out, Grant::Origin, b"https://app.io");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("vary: origin\r\naccess-control-allow-origin: https://app.io\r\naccess-control-allow-credentials: true\r\naccess-control-expose-headers: ratelimit-limit, ratelimit-remaining, ratelimit-reset, retry-after, keygate-credits-remaining, keygate-quota-remaining, x-request-id\r\n"), "{text}");
        let mut out = Vec::new();
        listed.write(&mut out, Grant::Nothing, b"https://evil.io");
        assert_eq!(out, b"vary: origin\r\n");

        let mut h = HeaderMap::new();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("1"));
        listed.replace(&mut h, Grant::Nothing, None);
        assert!(
            !h.contains_key(ACCESS_CONTROL_ALLOW_ORIGIN) && !h.contains_key(ACCESS_CONTROL_MAX_AGE)
        );
        assert_eq!(h[VARY], "origin");
        assert!(upstream_owned(b"Access-Control-Allow-Origin") && !upstream_owned(b"vary"));
    }

    #[test]
    fn preflights() {
        let c = cors(&["https://app.io"], false);
        let res = c
            .preflight(b"https://app.io", b"PUT", Some(b"X-API-Key, authorization"))
            .unwrap();
        assert_eq!(res.status(), 204);
        assert_eq!(res.headers()[ACCESS_CONTROL_ALLOW_METHODS], "GET, PUT");
        assert_eq!(
            res.headers()[ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization, x-api-key"
        );
        assert_eq!(res.headers()[ACCESS_CONTROL_MAX_AGE], "600");
        assert!(c.preflight(b"https://app.io", b"POST", None).is_ok());
        for (origin, method, fields) in [
            (b"https://evil.io".as_slice(), b"GET".as_slice(), None),
            (b"https://app.io", b"DELETE", None),
            (b"https://app.io", b"G T", None),
            (b"https://app.io", b"GET", Some(b"x-other".as_slice())),
            (b"https://app.io", b"GET", Some(b"x-api-key, (bad)")),
        ] {
            assert!(c.preflight(origin, method, fields).is_err());
        }
        let huge = format!("x-api-key{}", ", authorization".repeat(400));
        assert!(
            c.preflight(b"https://app.io", b"GET", Some(huge.as_bytes()))
                .is_err()
        );
        let open = Cors::new(&Settings {
            origins: vec![OriginPattern::Any],
            methods: Allowed::Any,
            headers: Allowed::Any,
            expose_headers: Vec::new(),
            max_age: 0,
            credentials: false,
        });
        let res = open
            .preflight(b"https://x.io", b"PURGE", Some(b"x-a, x-b"))
            .unwrap();
        assert_eq!(res.headers()[ACCESS_CONTROL_ALLOW_METHODS], "PURGE");
        assert_eq!(res.headers()[ACCESS_CONTROL_ALLOW_HEADERS], "x-a, x-b");
    }
}
