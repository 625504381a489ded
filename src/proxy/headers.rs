//! Header rewriting on header maps, for the requests hyper's client sends (`https://` upstreams
//! and WebSocket upgrades) and the responses it returns. Every decision comes from the policy
//! core's field rules ([`FieldRules::request`], [`policy::forwarded`],
//! [`policy::response_rule`], [`policy::relayed`]); the byte-level twin for the one HTTP/1.1
//! client is `codec::wire`.
//!
//! Order matters for requests: the client's fields are filtered first (fields named in
//! `Connection` included), and only then are the gateway's own fields added — so no
//! `Connection` token sent by a client can delete an identity header.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::error::{
    KEYGATE_CREDITS_REMAINING, KEYGATE_QUOTA_REMAINING, RATELIMIT_LIMIT, RATELIMIT_REMAINING,
    RATELIMIT_RESET, number,
};
use super::policy::{self, FieldRules, Rule, Strip};
use crate::keys::IdentityHeaders;
use crate::limit::RateInfo;

pub const X_KEYGATE_CLIENT_ID: HeaderName = HeaderName::from_static("x-keygate-client-id");
pub const X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
pub const X_KEYGATE_PERMISSIONS: HeaderName = HeaderName::from_static("x-keygate-permissions");
pub const X_KEYGATE_LICENSE: HeaderName = HeaderName::from_static("x-keygate-license");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The names a message's `Connection` fields make hop-by-hop (lowercase).
pub fn connection_names(h: &HeaderMap) -> Vec<Vec<u8>> {
    let mut names = Vec::new();
    for v in h.get_all(header::CONNECTION) {
        for t in policy::connection_tokens(v.as_bytes()) {
            if let policy::ConnectionToken::Names(n) = t {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    names
}

/// The rule of a field of a message whose `Connection` fields named `named`.
pub fn rule_of(name: &HeaderName, named: &[Vec<u8>], rule: impl Fn(&[u8]) -> Rule) -> Rule {
    let n = name.as_str().as_bytes();
    if named.iter().any(|c| c == n) {
        Rule::Drop
    } else {
        rule(n)
    }
}

/// `line` appended to the `X-Forwarded-For` list in `list` (`, ` between): the lines of one
/// request are one list.
pub fn join_xff(list: &mut Option<HeaderValue>, line: HeaderValue) {
    *list = Some(match list.take() {
        None => line,
        Some(first) => {
            let mut v = Vec::with_capacity(first.len() + 2 + line.len());
            v.extend_from_slice(first.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(line.as_bytes());
            // Two valid field values joined by ", " are a valid field value.
            HeaderValue::from_bytes(&v).unwrap_or(first)
        }
    });
}

/// What a client's request carried that the gateway rewrites itself.
#[derive(Debug, Default)]
pub struct Inbound {
    /// The `X-Forwarded-For` lines, joined into one list.
    pub xff: Option<HeaderValue>,
    /// `Host` (or the request's authority), sent as `X-Forwarded-Host`.
    pub host: Option<HeaderValue>,
}

/// Keeps only the request fields [`policy::forwarded`] keeps (a `Trailer` declaration loses
/// the names that may not be sent), and returns what the gateway rewrites itself.
pub fn retain_forwarded(h: &mut HeaderMap, strip: Strip, rules: &FieldRules) -> Inbound {
    let named = connection_names(h);
    let mut inbound = Inbound::default();
    let mut trailers = Vec::new();
    let old = std::mem::take(h);
    let mut last: Option<HeaderName> = None;
    for (name, value) in old {
        let name = match name {
            Some(n) => {
                last = Some(n.clone());
                n
            }
            None => match &last {
                Some(n) => n.clone(),
                None => continue,
            },
        };
        match rule_of(&name, &named, |n| rules.request(n)) {
            Rule::XForwardedFor => join_xff(&mut inbound.xff, value),
            Rule::Host => inbound.host = Some(value),
            Rule::Trailer => {
                if let Ok(v) = value.to_str() {
                    trailers.extend(
                        v.split(',')
                            .map(|t| t.trim().to_ascii_lowercase())
                            .filter(|t| {
                                !t.is_empty() && rules.request(t.as_bytes()) == Rule::Forward
                            }),
                    );
                }
            }
            rule if policy::forwarded(rule, strip) => {
                h.append(name, value);
            }
            _ => {}
        }
    }
    if let Ok(v) = HeaderValue::from_str(&trailers.join(", "))
        && !trailers.is_empty()
    {
        h.insert(header::TRAILER, v);
    }
    inbound
}

/// An upstream answer's `Content-Length` as the client gets it: none on a 1xx or 204, else one
/// plain number where the upstream listed or repeated the same one (`5, 5`), or none when
/// they differ (RFC 9110 §8.6; HTTP/2 clients reset the stream for either). hyper framed the
/// body already; its server writes the length of a body it knows again when none is given.
pub fn one_length(h: &mut HeaderMap, status: http::StatusCode) {
    let mut values = h.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return;
    };
    if values.next().is_none()
        && first.as_bytes().iter().all(u8::is_ascii_digit)
        && !status.is_informational()
        && status != http::StatusCode::NO_CONTENT
    {
        return;
    }
    let mut one: Option<u64> = None;
    let mut agree = !status.is_informational() && status != http::StatusCode::NO_CONTENT;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for n in v.to_str().unwrap_or("x").split(',') {
            match n.trim().parse::<u64>() {
                Ok(n) if one.is_none_or(|o| o == n) => one = Some(n),
                _ => agree = false,
            }
        }
    }
    h.remove(header::CONTENT_LENGTH);
    if let (true, Some(n)) = (agree, one) {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

/// Keeps only the trailer fields a client may send upstream (the same rule as its head).
pub fn retain_trailers(h: &mut HeaderMap, rules: &FieldRules) {
    let old = std::mem::take(h);
    let mut last: Option<HeaderName> = None;
    for (name, value) in old {
        if let Some(n) = name {
            last = Some(n);
        }
        if let Some(n) = &last
            && rules.request(n.as_str().as_bytes()) == Rule::Forward
        {
            h.append(n.clone(), value);
        }
    }
}

/// Keeps only the response fields [`policy::relayed`] relays.
pub fn retain_relayed(h: &mut HeaderMap, own_rate: bool) {
    let named = connection_names(h);
    let mut drop: Vec<HeaderName> = Vec::new();
    for name in h.keys() {
        if !policy::relayed(rule_of(name, &named, policy::response_rule), own_rate) {
            drop.push(name.clone());
        }
    }
    for name in drop {
        h.remove(name);
    }
}

/// Sets the gateway's `RateLimit-*` fields.
pub fn add_rate(h: &mut HeaderMap, rate: &RateInfo) {
    h.insert(RATELIMIT_LIMIT, number(u64::from(rate.limit)));
    h.insert(RATELIMIT_REMAINING, number(u64::from(rate.remaining)));
    h.insert(RATELIMIT_RESET, number(rate.reset_secs));
    add_allowance(h, rate.credits, rate.quota);
}

/// Sets `Keygate-Credits-Remaining` and `Keygate-Quota-Remaining` for what is counted.
pub fn add_allowance(h: &mut HeaderMap, credits: Option<u64>, quota: Option<u64>) {
    if let Some(n) = credits {
        h.insert(KEYGATE_CREDITS_REMAINING, number(n));
    }
    if let Some(n) = quota {
        h.insert(KEYGATE_QUOTA_REMAINING, number(n));
    }
}

/// Adds what [`policy::CachePolicy`] asks of an authenticated answer: `Cache-Control:
/// private` and a `Vary` naming the credential fields.
pub fn add_cache(h: &mut HeaderMap, cache: &policy::CachePolicy) {
    let (private, vary) = {
        let fields = h
            .get_all(header::CACHE_CONTROL)
            .iter()
            .map(|v| (Rule::CacheControl, v.as_bytes()))
            .chain(
                h.get_all(header::VARY)
                    .iter()
                    .map(|v| (Rule::Vary, v.as_bytes())),
            );
        cache.additions(fields)
    };
    if private {
        h.append(header::CACHE_CONTROL, HeaderValue::from_static("private"));
    }
    if vary && let Some(v) = &cache.vary {
        h.append(header::VARY, v.clone());
    }
}

/// True for an HTTP/1.1 request asking to switch to WebSocket (RFC 6455 §4.1): `Upgrade:
/// websocket` and `Connection: upgrade`. Any other upgrade (h2c included) is not forwarded.
pub fn websocket_requested(h: &HeaderMap, version: http::Version) -> bool {
    if version != http::Version::HTTP_11 {
        return false;
    }
    let upgrade = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    let connection = h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    upgrade && connection && h.contains_key("sec-websocket-key")
}

/// The `Sec-WebSocket-Accept` an upstream must answer for this request's key (RFC 6455 §4.2.2).
pub fn websocket_accept(h: &HeaderMap) -> Option<HeaderValue> {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let key = h.get("sec-websocket-key")?;
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID);
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    HeaderValue::from_str(&accept).ok()
}

/// Adds the caller's identity.
pub fn add_identity(h: &mut HeaderMap, id: &IdentityHeaders) {
    // Every value was checked to be header text (or replaced) when the principal was built.
    let [client_id, key_id, permissions, license] = id.shared_values().map(|v| {
        HeaderValue::from_maybe_shared(v).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    });
    h.insert(X_KEYGATE_CLIENT_ID, client_id);
    h.insert(X_KEYGATE_KEY_ID, key_id);
    h.insert(X_KEYGATE_PERMISSIONS, permissions);
    h.insert(X_KEYGATE_LICENSE, license);
}

/// The identity fields, present and empty: no caller (the verify answer for a public route).
pub fn add_no_identity(h: &mut HeaderMap) {
    for name in [
        X_KEYGATE_CLIENT_ID,
        X_KEYGATE_KEY_ID,
        X_KEYGATE_PERMISSIONS,
        X_KEYGATE_LICENSE,
    ] {
        h.insert(name, HeaderValue::from_static(""));
    }
}

/// Appends the peer to the client's `X-Forwarded-For`, sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host` (the client's `Host`), and `Host` (the upstream's authority).
pub fn add_forwarded(
    h: &mut HeaderMap,
    inbound: Inbound,
    peer_ip: &HeaderValue,
    proto: &'static str,
    upstream_host: &HeaderValue,
) {
    let xff = match inbound.xff {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + peer_ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer_ip.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| peer_ip.clone())
        }
        None => peer_ip.clone(),
    };
    h.insert(X_FORWARDED_FOR, xff);
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = inbound.host {
        h.insert(X_FORWARDED_HOST, host);
    }
    h.insert(header::HOST, upstream_host.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_length_relays_a_plain_number_or_none() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CONTENT_LENGTH, HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let after = |values: &[&str], status: u16| {
            let mut h = with(values);
            one_length(&mut h, http::StatusCode::from_u16(status).unwrap());
            h.get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(after(&["5"], 200), ["5"]);
        assert_eq!(after(&["5, 5"], 200), ["5"]);
        assert_eq!(after(&["5", "5"], 200), ["5"]);
        assert!(after(&["5", "6"], 200).is_empty());
        assert!(after(&["5, x"], 200).is_empty());
        assert!(after(&["5"], 204).is_empty());
        assert!(after(&["0"], 103).is_empty());
        assert!(after(&[], 200).is_empty());
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ids() -> IdentityHeaders {
        IdentityHeaders::new("acme", "k1", "A,B", "pro")
    }

    fn rules() -> FieldRules {
        FieldRules::default()
    }

    #[test]
    fn connection_cannot_delete_identity_headers() {
        let mut h = map(&[
            ("connection", "close, x-keygate-client-id, x-secret"),
            ("x-secret", "1"),
            ("x-keygate-client-id", "spoofed"),
            ("X-Keygate-Anything", "spoofed"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("x-api-key", "kg_x"),
            ("accept", "*/*"),
            ("accept", "text/plain"),
        ]);
        retain_forwarded(&mut h, Strip::API_KEY, &rules());
        add_identity(&mut h, &ids());
        assert_eq!(h["x-keygate-client-id"], "acme");
        assert!(!h.contains_key("x-keygate-anything"));
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "upgrade",
            "proxy-authorization",
            "x-api-key",
        ] {
            assert!(!h.contains_key(gone), "{gone} survived");
        }
        assert_eq!(h.get_all("accept").iter().count(), 2);
    }

    #[test]
    fn websocket_detection_and_accept() {
        let h = map(&[
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        assert!(websocket_requested(&h, http::Version::HTTP_11));
        assert!(!websocket_requested(&h, http::Version::HTTP_2));
        // RFC 6455 §1.3's example.
        assert_eq!(
            websocket_accept(&h).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let h2c = map(&[
            ("upgrade", "h2c"),
            ("connection", "Upgrade, HTTP2-Settings"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ]);
        assert!(!websocket_requested(&h2c, http::Version::HTTP_11));
        let mut h2c = h2c;
        retain_forwarded(&mut h2c, Strip::NOTHING, &rules());
        assert!(h2c.is_empty(), "{h2c:?}");
    }

    #[test]
    fn underscored_names_and_keygate_trailers_are_dropped() {
        let mut h = map(&[
            ("x_keygate_client_id", "spoofed"),
            ("transfer_encoding", "chunked"),
            ("x_api_key", "kg_x"),
            ("trailer", "X-Keygate-Key-Id, x-checksum, X_Keygate_License"),
            ("trailer", "x-keygate-client-id"),
            ("x-ok", "1"),
        ]);
        retain_forwarded(&mut h, Strip::NOTHING, &rules());
        for gone in ["x_keygate_client_id", "transfer_encoding", "x_api_key"] {
            assert!(!h.contains_key(gone), "{gone} survived");
        }
        assert_eq!(h.get_all("trailer").iter().count(), 1);
        assert_eq!(h["trailer"], "x-checksum");
        assert_eq!(h["x-ok"], "1");

        let mut h = map(&[("trailer", "x-keygate-key-id")]);
        retain_forwarded(&mut h, Strip::NOTHING, &rules());
        assert!(!h.contains_key("trailer"));

        let mut t = map(&[
            ("x-keygate-client-id", "evil"),
            ("x_keygate_key_id", "evil"),
            ("authorization", "Bearer x"),
            ("x-checksum", "1"),
        ]);
        retain_trailers(&mut t, &rules());
        assert_eq!(t.len(), 1);
        assert_eq!(t["x-checksum"], "1");
    }

    #[test]
    fn forwarded_headers() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.9"),
            ("host", "api.example.com"),
            ("x-forwarded-host", "evil"),
        ]);
        let inbound = retain_forwarded(&mut h, Strip::NOTHING, &rules());
        add_forwarded(
            &mut h,
            inbound,
            &HeaderValue::from_static("127.0.0.1"),
            "http",
            &HeaderValue::from_static("127.0.0.1:9000"),
        );
        // Two lines are one list, the peer appended.
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.9, 127.0.0.1");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["host"], "127.0.0.1:9000");
    }

    #[test]
    fn relayed_response_fields() {
        let mut h = map(&[
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("transfer-encoding", "chunked"),
            ("ratelimit-limit", "9"),
            ("x-ok", "1"),
        ]);
        retain_relayed(&mut h, true);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-ok"], "1");
    }
}
