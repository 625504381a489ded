//! Forward-auth: the verify endpoint an edge proxy asks "may this request pass?" (nginx
//! `auth_request`, Traefik `forwardAuth`, Caddy `forward_auth`, Envoy HTTP `ext_authz`).
//!
//! A verify request names an original request. [`Original`] shows the policy core that
//! request — its method and target from the edge proxy's fields, its credential fields and
//! client address from the verify request itself — and the core judges it with the same
//! [`Gateway::route_table`] and [`Gateway::admit`] as a proxied request. Nothing is forwarded.
//!
//! The original request is named by one of:
//! - `X-Forwarded-Method` + `X-Forwarded-Uri` (Traefik, Caddy);
//! - `X-Original-Method` + `X-Original-URI` (the nginx convention);
//! - the path after the verify path, with the verify request's own method and query (Envoy's
//!   HTTP `ext_authz` with `path_prefix`).
//!
//! Edge proxies pass the client's own fields to the verify request, so a client may add a
//! convention the edge proxy does not use: when two conventions are present they must name the
//! same request, or the verify request is refused (400).

use bytes::Bytes;
use http::{HeaderName, Method, Response, StatusCode};

use super::error::{ProxyError, number};
use super::headers;
use super::policy::RequestView;
use super::{ConnInfo, Gateway, Outcome};
use crate::config::DenyMode;

/// The real status of a refusal answered 403 in the nginx deny mode.
pub const X_KEYGATE_STATUS: HeaderName = HeaderName::from_static("x-keygate-status");
/// The problem `code` of a refusal in the nginx deny mode (nginx's own answer replaces the
/// body; the recipe writes this code into it).
pub const X_KEYGATE_CODE: HeaderName = HeaderName::from_static("x-keygate-code");

const NO_ORIGINAL: &str = "the verify request names no original request: send X-Forwarded-Method and X-Forwarded-Uri, X-Original-Method and X-Original-URI, or the original path after the verify path";
const HALF_NAMED: &str =
    "the original request needs both its method and its URI (X-Forwarded-* or X-Original-*)";
const BAD_METHOD: &str = "the original method is not an HTTP method";
const BAD_TARGET: &str =
    "the original URI must be an origin-form target: '/', then visible ASCII without '#'";
const TWO_ORIGINALS: &str = "the verify request names two different original requests";
const REPEATED: &str = "a field naming the original request is sent more than once";
/// The fields that name the original request: each must be sent once at most (an edge proxy
/// that adds its own line rather than replacing the client's would otherwise have the
/// client's judged).
const NAMING: [&str; 4] = [
    "x-forwarded-method",
    "x-forwarded-uri",
    "x-original-method",
    "x-original-uri",
];

/// The original request named by a verify request, as the policy core sees it.
pub struct Original<'a, V> {
    verify: &'a V,
    method: Method,
    path: &'a str,
    query: Option<&'a str>,
}

/// One convention's naming of the original request.
struct Named<'a> {
    method: Method,
    path: &'a str,
    query: Option<&'a str>,
}

impl<'a, V: RequestView> Original<'a, V> {
    /// Reads the original request `verify` names; `verify_path` is the configured path.
    pub fn read(verify: &'a V, verify_path: &str) -> Result<Self, ProxyError> {
        if NAMING.iter().any(|name| verify.repeated(name)) {
            return Err(ProxyError::BadRequest(REPEATED));
        }
        let headers = |method: &str, uri: &str| -> Result<Option<Named<'a>>, ProxyError> {
            match (verify.field(method), verify.field(uri)) {
                (None, None) => Ok(None),
                (Some(m), Some(u)) => {
                    let (path, query) = target(u)?;
                    Ok(Some(Named {
                        method: Method::from_bytes(m)
                            .map_err(|_| ProxyError::BadRequest(BAD_METHOD))?,
                        path,
                        query,
                    }))
                }
                _ => Err(ProxyError::BadRequest(HALF_NAMED)),
            }
        };
        let forwarded = headers("x-forwarded-method", "x-forwarded-uri")?;
        let original = headers("x-original-method", "x-original-uri")?;
        let suffix = verify
            .path()
            .strip_prefix(verify_path)
            .filter(|rest| !rest.is_empty())
            .map(|path| Named {
                method: verify.method().clone(),
                path,
                query: verify.query(),
            });
        let mut named = [forwarded, original, suffix].into_iter().flatten();
        let first = named.next().ok_or(ProxyError::BadRequest(NO_ORIGINAL))?;
        if named.any(|n| n.method != first.method || n.path != first.path || n.query != first.query)
        {
            return Err(ProxyError::BadRequest(TWO_ORIGINALS));
        }
        Ok(Original {
            verify,
            method: first.method,
            path: first.path,
            query: first.query,
        })
    }
}

/// An origin-form target (RFC 9112 §3.2.1): `/`, then visible ASCII, no fragment; split into
/// path and query.
fn target(v: &[u8]) -> Result<(&str, Option<&str>), ProxyError> {
    let ok = v.first() == Some(&b'/') && v.iter().all(|&b| b.is_ascii_graphic() && b != b'#');
    let v = std::str::from_utf8(v)
        .ok()
        .filter(|_| ok)
        .ok_or(ProxyError::BadRequest(BAD_TARGET))?;
    Ok(match v.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (v, None),
    })
}

impl<V: RequestView> RequestView for Original<'_, V> {
    fn method(&self) -> &Method {
        &self.method
    }

    fn path(&self) -> &str {
        self.path
    }

    fn query(&self) -> Option<&str> {
        self.query
    }

    fn authorization(&self) -> Option<&str> {
        self.verify.authorization()
    }

    fn authorizations(&self) -> bool {
        self.verify.authorizations()
    }

    fn api_key(&self, name: &HeaderName) -> Option<&str> {
        self.verify.api_key(name)
    }

    fn api_keys(&self, name: &HeaderName) -> bool {
        self.verify.api_keys(name)
    }

    fn forwarded_for(&self) -> impl Iterator<Item = Option<&str>> {
        self.verify.forwarded_for()
    }

    fn forwarded(&self) -> impl Iterator<Item = Option<&str>> {
        self.verify.forwarded()
    }

    fn field(&self, name: &str) -> Option<&[u8]> {
        self.verify.field(name)
    }

    fn repeated(&self, name: &str) -> bool {
        self.verify.repeated(name)
    }
}

/// What the core decided on the original request.
enum Decided<'g> {
    Admitted(super::policy::Admitted<'g>),
    /// A CORS preflight, allowed: its answer.
    Preflight(Response<Bytes>),
}

impl Gateway {
    /// Answers a verify request: the original request it names goes through the route table
    /// and admission exactly as a proxied request would. Allowed: 200, empty body, the
    /// caller's `X-Keygate-*` identity (empty on a public route) and `RateLimit-*`. Refused: the proxy's own answer, or
    /// in the nginx deny mode 403 with the real status in `X-Keygate-Status` (401 stays 401).
    /// A CORS preflight of the original request on a route with CORS gets the proxy's answer
    /// (204 with the `Access-Control-*` fields, or 403): 2xx lets the edge proxy pass it on.
    /// The engine adds the CORS fields of the original's route (see [`Gateway::cors_own`]).
    pub async fn verify<'g>(
        &'g self,
        req: &impl RequestView,
        conn: &ConnInfo,
        outcome: &mut Outcome<'g>,
    ) -> Response<Bytes> {
        let fa = &self.policy.forward_auth;
        let decided = async {
            let original = Original::read(req, fa.path.as_deref().unwrap_or_default())?;
            // A preflight of the original request is answered as the proxy answers it.
            if let Some((route, answer)) = self.preflight(&original) {
                outcome.route = route;
                return answer.map(Decided::Preflight);
            }
            let route = self.route_table(&original, outcome)?;
            outcome.route = Some(route);
            self.admit(route, &original, conn, outcome)
                .await
                .map(Decided::Admitted)
        }
        .await;
        // No caller (a public route, a preflight passed on): the identity fields are sent
        // empty, so an edge proxy that copies them overwrites whatever the client sent (Caddy
        // 2.6 would otherwise copy its unreplaced placeholder; Envoy leaves a field the answer
        // lacks as the client sent it).
        let no_caller = |h: &mut http::HeaderMap| {
            headers::add_no_identity(h);
            if self.identity.is_some() {
                h.insert(
                    crate::identity::X_KEYGATE_ASSERTION,
                    http::HeaderValue::from_static(""),
                );
            }
        };
        let mut res = match decided {
            Ok(Decided::Preflight(mut res)) => {
                if res.status().is_success() {
                    no_caller(res.headers_mut());
                }
                res
            }
            Ok(Decided::Admitted(admitted)) => {
                let mut res = Response::new(Bytes::new());
                let h = res.headers_mut();
                match admitted.permit.principal() {
                    Some(p) => {
                        headers::add_identity(h, &p.headers);
                        // Signed identity: the assertion (none is made only for no caller).
                        if self.identity.is_some() {
                            h.insert(
                                crate::identity::X_KEYGATE_ASSERTION,
                                admitted
                                    .assertion
                                    .unwrap_or_else(|| http::HeaderValue::from_static("")),
                            );
                        }
                    }
                    None => no_caller(h),
                }
                if let Some(rate) = &admitted.rate {
                    headers::add_rate(h, rate);
                }
                res
            }
            Err(e) => {
                let mut res: Response<Bytes> = e.response();
                if fa.deny == DenyMode::Nginx {
                    let status = res.status();
                    res.headers_mut()
                        .insert(X_KEYGATE_STATUS, number(u64::from(status.as_u16())));
                    res.headers_mut()
                        .insert(X_KEYGATE_CODE, http::HeaderValue::from_static(e.code()));
                    if status != StatusCode::UNAUTHORIZED {
                        *res.status_mut() = StatusCode::FORBIDDEN;
                    }
                }
                res
            }
        };
        // An answer for one caller and one moment (identity, limits): an edge proxy's cache
        // must not give it to another request.
        res.headers_mut().insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        res
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn parts(uri: &str, method: &str, fields: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri).method(method);
        for (k, v) in fields {
            b = b.header(*k, HeaderValue::from_bytes(v.as_bytes()).unwrap());
        }
        b.body(()).unwrap().into_parts().0
    }

    fn read(p: &http::request::Parts) -> Result<(String, String, Option<String>), ProxyError> {
        Original::read(p, "/_keygate/verify").map(|o| {
            (
                o.method().to_string(),
                o.path().to_owned(),
                o.query().map(str::to_owned),
            )
        })
    }

    fn named(m: &str, path: &str, q: Option<&str>) -> (String, String, Option<String>) {
        (m.into(), path.into(), q.map(Into::into))
    }

    #[test]
    fn each_convention_names_the_original_request() {
        let p = parts(
            "/_keygate/verify",
            "GET",
            &[
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", "/a/b?x=1"),
            ],
        );
        assert_eq!(read(&p).unwrap(), named("POST", "/a/b", Some("x=1")));
        let p = parts(
            "/_keygate/verify",
            "GET",
            &[("x-original-method", "DELETE"), ("x-original-uri", "/a")],
        );
        assert_eq!(read(&p).unwrap(), named("DELETE", "/a", None));
        let p = parts("/_keygate/verify/a/b?y=2", "PUT", &[]);
        assert_eq!(read(&p).unwrap(), named("PUT", "/a/b", Some("y=2")));
        // Two conventions that agree.
        let p = parts(
            "/_keygate/verify/a",
            "GET",
            &[("x-original-method", "GET"), ("x-original-uri", "/a")],
        );
        assert_eq!(read(&p).unwrap(), named("GET", "/a", None));
    }

    #[test]
    fn verify_requests_that_name_no_clear_original_are_refused() {
        for fields in [
            &[][..],
            &[("x-forwarded-uri", "/a")],
            &[("x-original-method", "GET")],
            &[("x-forwarded-method", "GET"), ("x-forwarded-uri", "a")],
            &[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "http://h/a"),
            ],
            &[("x-forwarded-method", "GET"), ("x-forwarded-uri", "/a#f")],
            &[("x-forwarded-method", "GET"), ("x-forwarded-uri", "/a b")],
            &[("x-forwarded-method", "GET"), ("x-forwarded-uri", "")],
            &[("x-forwarded-method", "G T"), ("x-forwarded-uri", "/a")],
            // A client's own convention that disagrees with the edge proxy's.
            &[
                ("x-original-method", "GET"),
                ("x-original-uri", "/admin"),
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/public"),
            ],
        ] {
            let p = parts("/_keygate/verify", "GET", fields);
            assert!(
                matches!(read(&p), Err(ProxyError::BadRequest(_))),
                "{fields:?}"
            );
        }
        let p = parts(
            "/_keygate/verify/admin",
            "GET",
            &[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/public"),
            ],
        );
        assert!(read(&p).is_err());
        let obs = [
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/caf\u{e9}"),
        ];
        let mut b = http::Request::builder().uri("/_keygate/verify");
        for (k, v) in obs {
            b = b.header(k, HeaderValue::from_bytes(v.as_bytes()).unwrap());
        }
        let p = b.body(()).unwrap().into_parts().0;
        assert!(read(&p).is_err());
    }
}
