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
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Fields that are never end-to-end (RFC 9110 §7.6.1, plus `Proxy-Connection` seen in the
/// wild, the proxy authentication pair, which addresses this hop, and `HTTP2-Settings` of the
/// h2c upgrade, RFC 7540 §3.2.1, which is never forwarded).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HTTP2_SETTINGS,
];

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

const KEYGATE_PREFIX: &[u8] = b"x-keygate-";

/// Fields the client may not send: our own `x-keygate-*` (case-insensitive by construction:
/// header names are stored lowercase), and any name with an underscore, which CGI-style
/// upstreams (WSGI, PHP, Rack) read as the dashed name — `X_Keygate_Client_Id` would become
/// `X-Keygate-Client-Id` there (nginx drops such fields by default for the same reason).
fn forbidden_inbound(name: &[u8]) -> bool {
    name.starts_with(KEYGATE_PREFIX) || name.contains(&b'_')
}

/// Removes every inbound field [`forbidden_inbound`] refuses, and drops such names from
/// `Trailer`: hyper forwards exactly the trailer fields a request declares there, so a
/// declared `X-Keygate-Key-Id` trailer would otherwise reach the upstream.
pub fn remove_keygate_headers(h: &mut HeaderMap) {
    if h.keys().any(|k| forbidden_inbound(k.as_str().as_bytes())) {
        let names: Vec<HeaderName> = h
            .keys()
            .filter(|k| forbidden_inbound(k.as_str().as_bytes()))
            .cloned()
            .collect();
        for n in names {
            h.remove(n);
        }
    }
    if h.contains_key(header::TRAILER) {
        let declared: Vec<String> = h
            .get_all(header::TRAILER)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty() && !forbidden_inbound(t.as_bytes()))
            .collect();
        h.remove(header::TRAILER);
        if let Ok(v) = HeaderValue::from_str(&declared.join(", "))
            && !declared.is_empty()
        {
            h.insert(header::TRAILER, v);
        }
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
    let [client_id, key_id, permissions, license] = id.header_values();
    h.insert(X_KEYGATE_CLIENT_ID, client_id);
    h.insert(X_KEYGATE_KEY_ID, key_id);
    h.insert(X_KEYGATE_PERMISSIONS, permissions);
    h.insert(X_KEYGATE_LICENSE, license);
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
        IdentityHeaders::new("acme", "k1", "A,B", "pro")
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
        remove_hop_by_hop(&mut h2c);
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
        remove_keygate_headers(&mut h);
        for gone in ["x_keygate_client_id", "transfer_encoding", "x_api_key"] {
            assert!(!h.contains_key(gone), "{gone} survived");
        }
        assert_eq!(h.get_all("trailer").iter().count(), 1);
        assert_eq!(h["trailer"], "x-checksum");
        assert_eq!(h["x-ok"], "1");

        let mut h = map(&[("trailer", "x-keygate-key-id")]);
        remove_keygate_headers(&mut h);
        assert!(!h.contains_key("trailer"));
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
