//! Header rewriting for forwarded requests and relayed responses. Small pure functions.
//!
//! Order matters for requests: inbound `X-Keygate-*` are removed first, then hop-by-hop fields
//! (RFC 9110 §7.6.1: `Connection` and every field it names, plus the fixed list), then the
//! credential, and only then are the gateway's own headers added — so no `Connection` token
//! sent by a client can delete an identity header.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::auth::credential::Source;
use crate::keys::IdentityHeaders;

pub const X_KEYGATE_CLIENT_ID: HeaderName = HeaderName::from_static("x-keygate-client-id");
pub const X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
pub const X_KEYGATE_PERMISSIONS: HeaderName = HeaderName::from_static("x-keygate-permissions");
pub const X_KEYGATE_LICENSE: HeaderName = HeaderName::from_static("x-keygate-license");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Fields that are never end-to-end (RFC 9110 §7.6.1, plus `Proxy-Connection` seen in the
/// wild and the proxy authentication pair, which addresses this hop).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

const KEYGATE_PREFIX: &[u8] = b"x-keygate-";

/// Removes every header whose name starts with `x-keygate-` (case-insensitive by
/// construction: header names are stored lowercase).
pub fn remove_keygate_headers(h: &mut HeaderMap) {
    if !h
        .keys()
        .any(|k| k.as_str().as_bytes().starts_with(KEYGATE_PREFIX))
    {
        return;
    }
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().as_bytes().starts_with(KEYGATE_PREFIX))
        .cloned()
        .collect();
    for n in names {
        h.remove(n);
    }
}

/// Removes hop-by-hop fields: those named in `Connection`, then the fixed list.
pub fn remove_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none or only `Connection`: one walk over the (few) names finds out,
    // instead of hashing and probing for each of the fixed names.
    if !h.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderValue> = h.get_all(header::CONNECTION).iter().cloned().collect();
        for v in &named {
            let Ok(v) = v.to_str() else { continue };
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                h.remove(token);
            }
        }
    }
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
}

/// Removes the credential that authenticated the request (query credentials are removed from
/// the URI by the caller).
pub fn remove_credential(h: &mut HeaderMap, source: Source, api_key_header: &HeaderName) {
    match source {
        Source::Bearer | Source::Basic => {
            h.remove(header::AUTHORIZATION);
        }
        Source::Header => {
            h.remove(api_key_header);
        }
        Source::Query => {}
    }
}

/// Adds the caller's identity.
pub fn add_identity(h: &mut HeaderMap, id: &IdentityHeaders) {
    h.insert(X_KEYGATE_CLIENT_ID, id.client_id.clone());
    h.insert(X_KEYGATE_KEY_ID, id.key_id.clone());
    h.insert(X_KEYGATE_PERMISSIONS, id.permissions.clone());
    h.insert(X_KEYGATE_LICENSE, id.license.clone());
}

/// Appends the peer to `X-Forwarded-For`, sets `X-Forwarded-Proto` and `X-Forwarded-Host`
/// (from `Host`, which is then replaced by the upstream's authority).
pub fn add_forwarded(
    h: &mut HeaderMap,
    peer_ip: &HeaderValue,
    proto: &'static str,
    original_host: Option<HeaderValue>,
    upstream_host: &HeaderValue,
) {
    let xff = match h.get(&X_FORWARDED_FOR) {
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
    match original_host {
        Some(host) => {
            h.insert(X_FORWARDED_HOST, host);
        }
        None => {
            h.remove(X_FORWARDED_HOST);
        }
    }
    h.insert(header::HOST, upstream_host.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

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
        IdentityHeaders {
            client_id: HeaderValue::from_static("acme"),
            key_id: HeaderValue::from_static("k1"),
            permissions: HeaderValue::from_static("A,B"),
            license: HeaderValue::from_static("pro"),
        }
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
        ]);
        remove_keygate_headers(&mut h);
        remove_hop_by_hop(&mut h);
        remove_credential(
            &mut h,
            Source::Header,
            &HeaderName::from_static("x-api-key"),
        );
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
        assert_eq!(h["accept"], "*/*");
    }

    #[test]
    fn forwarded_headers() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1"), ("host", "api.example.com")]);
        let host = h.get(header::HOST).cloned();
        add_forwarded(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            "http",
            host,
            &HeaderValue::from_static("127.0.0.1:9000"),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["host"], "127.0.0.1:9000");
    }
}
