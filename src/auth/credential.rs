//! Finding the credential in a request. Pure functions over headers and the query string.
//!
//! Order, first match wins: `Authorization: Bearer`, the API-key header, `Authorization: Basic`
//! (`base64(key:)` or `base64(anything:key)`), then — only when enabled — the query parameter.
//! A bearer value with exactly two dots is a JWT; anything else is an API key.

use base64::Engine;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName};

use crate::keys::foreign::MAX_FOREIGN_KEY_LEN;

/// Where the credential was found, so it can be removed before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Bearer,
    Header,
    Basic,
    Query,
}

/// The secret itself: borrowed from the request, or decoded from Basic auth into a buffer on
/// the stack (no allocation either way).
// The inline variant is large (an imported key may be 256 bytes) on purpose: it lives on the
// stack for one request, which is cheaper than a heap allocation per Basic credential.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy)]
pub enum SecretRef<'a> {
    Borrowed(&'a str),
    Inline {
        buf: [u8; MAX_FOREIGN_KEY_LEN],
        len: usize,
    },
}

impl SecretRef<'_> {
    pub fn as_str(&self) -> &str {
        match self {
            SecretRef::Borrowed(s) => s,
            // Only valid UTF-8 is ever stored inline (checked in `basic`).
            SecretRef::Inline { buf, len } => std::str::from_utf8(&buf[..*len]).unwrap_or(""),
        }
    }
}

impl std::fmt::Debug for SecretRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretRef(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ApiKey,
    Jwt,
}

#[derive(Debug, Clone, Copy)]
pub struct Credential<'a> {
    pub kind: Kind,
    pub source: Source,
    pub secret: SecretRef<'a>,
}

/// How credentials are accepted; built once from the config.
#[derive(Debug, Clone)]
pub struct Extractor {
    pub api_key_header: HeaderName,
    pub query_param: Option<String>,
}

/// Longest Basic credential decoded: `anything:key`, bounded so decoding stays on the stack.
const MAX_BASIC_DECODED: usize = 512;
/// Three dot-separated parts. Size is checked by the verifier (before any decoding).
fn is_jwt_shape(s: &str) -> bool {
    // Every request with a bearer token asks this of a few hundred bytes. Counted 16 bytes at a
    // time into one byte (the compiler makes each block a vector compare and sum; counting into
    // a usize per byte keeps it to 4 bytes a step), stopping once a third dot is seen.
    let mut blocks = s.as_bytes().chunks_exact(16);
    let mut dots = 0usize;
    for block in &mut blocks {
        let n: u8 = block.iter().map(|&b| u8::from(b == b'.')).sum();
        dots += usize::from(n);
        if dots > 2 {
            return false;
        }
    }
    dots += blocks.remainder().iter().filter(|&&b| b == b'.').count();
    dots == 2
}

/// Case-insensitive scheme match: `Bearer xyz` → `xyz`.
fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = value.split_at_checked(scheme.len())?;
    if s.eq_ignore_ascii_case(scheme) && rest.starts_with(' ') {
        Some(rest.trim_matches(' '))
    } else {
        None
    }
}

fn basic(encoded: &str) -> Option<SecretRef<'static>> {
    let mut decoded = [0u8; MAX_BASIC_DECODED];
    if encoded.len() > MAX_BASIC_DECODED * 4 / 3 + 4 {
        return None;
    }
    let n = base64::engine::general_purpose::STANDARD
        .decode_slice(encoded, &mut decoded)
        .ok()?;
    let text = std::str::from_utf8(&decoded[..n]).ok()?;
    let (user, pass) = text.split_once(':')?;
    let key = if pass.is_empty() { user } else { pass };
    if key.is_empty() || key.len() > MAX_FOREIGN_KEY_LEN {
        return None;
    }
    let mut buf = [0u8; MAX_FOREIGN_KEY_LEN];
    buf[..key.len()].copy_from_slice(key.as_bytes());
    Some(SecretRef::Inline {
        buf,
        len: key.len(),
    })
}

impl Extractor {
    /// Finds the credential, or `None` when the request carries none we accept.
    pub fn extract<'a>(
        &self,
        headers: &'a HeaderMap,
        query: Option<&'a str>,
    ) -> Option<Credential<'a>> {
        let auth = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        let api_key = headers
            .get(&self.api_key_header)
            .and_then(|v| v.to_str().ok());
        self.extract_from(auth, api_key, query)
    }

    /// [`Extractor::extract`] given the first `Authorization` value and the first API-key
    /// header value (each only when it is visible ASCII, as `HeaderValue::to_str` decides).
    pub fn extract_from<'a>(
        &self,
        auth: Option<&'a str>,
        api_key: Option<&'a str>,
        query: Option<&'a str>,
    ) -> Option<Credential<'a>> {
        self.find(auth, api_key, query).chosen
    }

    /// Every credential the request carries: the one used (first match wins), whether two
    /// differ, and which fields hold one (all of them are removed before forwarding).
    pub fn find<'a>(
        &self,
        auth: Option<&'a str>,
        api_key: Option<&'a str>,
        query: Option<&'a str>,
    ) -> Found<'a> {
        let bearer = auth
            .and_then(|a| strip_scheme(a, "Bearer"))
            .filter(|t| !t.is_empty())
            .map(|token| Credential {
                kind: if is_jwt_shape(token) {
                    Kind::Jwt
                } else {
                    Kind::ApiKey
                },
                source: Source::Bearer,
                secret: SecretRef::Borrowed(token),
            });
        let header = api_key
            .map(|v| v.trim_matches(' '))
            .filter(|v| !v.is_empty())
            .map(|v| Credential {
                kind: Kind::ApiKey,
                source: Source::Header,
                secret: SecretRef::Borrowed(v),
            });
        let basic_scheme = auth.and_then(|a| strip_scheme(a, "Basic"));
        let basic = basic_scheme.and_then(basic).map(|secret| Credential {
            kind: Kind::ApiKey,
            source: Source::Basic,
            secret,
        });
        let query_text = query;
        let query = self
            .query_param
            .as_deref()
            .zip(query)
            .and_then(|(param, q)| query_value(q, param))
            .map(|v| Credential {
                kind: Kind::ApiKey,
                source: Source::Query,
                secret: SecretRef::Borrowed(v),
            });
        // By reference: a credential holds room for a decoded Basic one (a few hundred bytes),
        // so only the one chosen is copied.
        let all = [
            bearer.as_ref(),
            header.as_ref(),
            basic.as_ref(),
            query.as_ref(),
        ];
        let chosen = all.into_iter().flatten().next();
        let conflict = chosen.is_some_and(|c| {
            all.into_iter()
                .flatten()
                .any(|o| o.secret.as_str() != c.secret.as_str())
        }) || query.is_some_and(|first| {
            // The parameter given again with another value (the first was judged, the other
            // ignored).
            let (Some(param), Some(q)) = (self.query_param.as_deref(), query_text) else {
                return false;
            };
            query_values(q, param).any(|v| v != first.secret.as_str())
        });
        Found {
            chosen: chosen.copied(),
            conflict,
            in_authorization: bearer.is_some() || basic_scheme.is_some(),
            in_query: query.is_some(),
        }
    }
}

/// What [`Extractor::find`] saw.
#[derive(Debug, Clone, Copy)]
pub struct Found<'a> {
    /// The credential used: the first of Bearer, the API-key header, Basic, the query.
    pub chosen: Option<Credential<'a>>,
    /// Two of them differ.
    pub conflict: bool,
    /// `Authorization` holds a Bearer or Basic credential.
    pub in_authorization: bool,
    /// The query holds the credential parameter (when it is accepted).
    pub in_query: bool,
}

/// A header value as text, by the rules of `HeaderValue::to_str`: visible ASCII and tab only.
pub fn header_text(v: &[u8]) -> Option<&str> {
    if crate::keys::header_text(v) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

/// The raw value of `name` in a query string. Keys are base62 so no decoding is needed; a
/// value containing escapes simply fails the key check later.
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query_values(query, name).next()
}

/// Every non-empty raw value of `name` in a query string, in order.
fn query_values<'a, 'n>(query: &'a str, name: &'n str) -> impl Iterator<Item = &'a str> + 'n
where
    'a: 'n,
{
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name && !v.is_empty()).then_some(v)
    })
}

/// The query string without `name` parameters (for stripping a query credential).
pub fn strip_query_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn header_text_accepts_what_to_str_accepts() {
        for b in 0..=255u8 {
            for v in [
                vec![b],
                vec![b'a'; 40].into_iter().chain([b]).collect::<Vec<u8>>(),
            ] {
                let http = HeaderValue::from_bytes(&v).is_ok_and(|h| h.to_str().is_ok());
                assert_eq!(header_text(&v).is_some(), http, "byte {b}");
            }
        }
    }

    fn ex(query: bool) -> Extractor {
        Extractor {
            api_key_header: HeaderName::from_static("x-api-key"),
            query_param: query.then(|| "api_key".to_string()),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn bearer_first_then_header_then_basic() {
        let h = headers(&[
            ("authorization", "Bearer kg_abc"),
            ("x-api-key", "kg_other"),
        ]);
        let c = ex(false).extract(&h, None).unwrap();
        assert_eq!(
            (c.source, c.kind, c.secret.as_str()),
            (Source::Bearer, Kind::ApiKey, "kg_abc")
        );

        let h = headers(&[("x-api-key", "kg_other")]);
        let c = ex(false).extract(&h, None).unwrap();
        assert_eq!((c.source, c.secret.as_str()), (Source::Header, "kg_other"));

        let h = headers(&[("authorization", &format!("Basic {}", b64("kg_user:")))]);
        let c = ex(false).extract(&h, None).unwrap();
        assert_eq!((c.source, c.secret.as_str()), (Source::Basic, "kg_user"));

        let h = headers(&[("authorization", &format!("basic {}", b64("anyone:kg_pass")))]);
        assert_eq!(
            ex(false).extract(&h, None).unwrap().secret.as_str(),
            "kg_pass"
        );
    }

    #[test]
    fn jwt_shape_is_detected() {
        let h = headers(&[("authorization", "bearer aaa.bbb.ccc")]);
        assert_eq!(ex(false).extract(&h, None).unwrap().kind, Kind::Jwt);
    }

    #[test]
    fn two_dots_anywhere_and_only_two_make_a_jwt() {
        // Dots in the 16-byte blocks, across their edges and in the remainder, against the
        // plain count.
        for len in [0, 2, 3, 15, 16, 17, 31, 32, 33, 47, 300] {
            for dots in 0..4 {
                for spread in [1, 7, 16, 17] {
                    let mut s = vec![b'a'; len];
                    let mut placed = 0;
                    let mut at = spread.min(len.saturating_sub(1));
                    while placed < dots && at < len {
                        s[at] = b'.';
                        placed += 1;
                        at += spread;
                    }
                    let s = String::from_utf8(s).unwrap();
                    let want = s.bytes().filter(|&b| b == b'.').count() == 2;
                    assert_eq!(
                        is_jwt_shape(&s),
                        want,
                        "{len} bytes, dots at every {spread}"
                    );
                }
            }
        }
        let mut many = "a.".repeat(200);
        assert!(!is_jwt_shape(&many));
        many.truncate(4);
        assert!(is_jwt_shape(&many), "a.a.");
    }

    #[test]
    fn query_only_when_enabled() {
        let h = HeaderMap::new();
        assert!(ex(false).extract(&h, Some("api_key=kg_q")).is_none());
        let c = ex(true).extract(&h, Some("a=1&api_key=kg_q")).unwrap();
        assert_eq!((c.source, c.secret.as_str()), (Source::Query, "kg_q"));
        assert_eq!(
            strip_query_param("a=1&api_key=kg_q&b=2", "api_key"),
            "a=1&b=2"
        );
    }

    #[test]
    fn nothing_usable() {
        for h in [
            headers(&[]),
            headers(&[("authorization", "Bearer ")]),
            headers(&[("authorization", "Digest x")]),
            headers(&[("authorization", "Basic !!!")]),
            headers(&[("authorization", &format!("Basic {}", b64("nocolon")))]),
            headers(&[("x-api-key", "")]),
        ] {
            assert!(ex(false).extract(&h, None).is_none());
        }
    }
}
