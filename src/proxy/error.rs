//! Errors of the proxy path, sorted by who caused them: the client (4xx), the upstream
//! (502/504) or the store (503). [`ProxyError::response`] is the one place they become HTTP
//! answers: `application/problem+json` (RFC 9457) with a stable `code`. Bodies are static
//! strings: they never carry a key, a hash, a token or the reason a key was refused beyond
//! its code.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use crate::auth::AuthError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("missing credentials")]
    MissingCredentials,
    /// A credential that was not accepted (401, 403, or 503 when the store could not say).
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("rate limited")]
    RateLimited {
        retry_after: Duration,
        /// Until the bucket is full again (`RateLimit-Reset`).
        full_after: Duration,
        limit: u32,
    },
    /// The key's credits or its client's quota are used up; `retry_after` until the next
    /// refill or quota period, when there is one.
    #[error("quota exhausted")]
    QuotaExhausted {
        retry_after: Option<Duration>,
        credits: Option<u64>,
        quota: Option<u64>,
    },
    /// Too many failed authentications from one peer.
    #[error("too many failed authentications")]
    AuthThrottled { retry_after: Duration },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("no route")]
    RouteNotFound,
    /// The route owning the path does not answer this method; `Allow` lists those it does.
    #[error("method not allowed")]
    MethodNotAllowed(HeaderValue),
    /// The request body stalled for longer than `limits.body_timeout_secs`.
    #[error("request body timed out")]
    BodyTimeout,
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    #[error("upstream timeout")]
    UpstreamTimeout,
    /// A CORS preflight the route's CORS rules refuse (why).
    #[error("CORS preflight refused: {0}")]
    CorsRefused(&'static str),
    /// More header fields than `limits.max_headers` (HTTP/2; hyper answers HTTP/1.1's 431).
    #[error("too many header fields")]
    TooManyFields,
}

pub const RATELIMIT_LIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: http::HeaderName =
    http::HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: http::HeaderName = http::HeaderName::from_static("ratelimit-reset");
/// What a key with credits has left (answers on counted routes, and a `quota_exhausted` 429).
pub const KEYGATE_CREDITS_REMAINING: http::HeaderName =
    http::HeaderName::from_static("keygate-credits-remaining");
/// What the client's plan quota has left in the current period.
pub const KEYGATE_QUOTA_REMAINING: http::HeaderName =
    http::HeaderName::from_static("keygate-quota-remaining");

/// `HeaderValue`s for small numbers, made once, so rate-limit headers cost no allocation; a
/// larger number costs one (its digits are written on the stack and copied once, where
/// `HeaderValue::from(u64)` allocates twice).
pub fn number(n: u64) -> HeaderValue {
    static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| (0..4096u64).map(HeaderValue::from).collect());
    if let Some(v) = table.get(n as usize) {
        return v.clone();
    }
    let mut buf = [0u8; 20];
    HeaderValue::from_bytes(digits(n, &mut buf)).unwrap_or_else(|_| HeaderValue::from(n))
}

/// `n` in decimal, written at the end of `buf`.
pub fn digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Seconds a client should wait before retrying when the store is down.
const STORE_RETRY_AFTER_SECS: u64 = 5;

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingCredentials
            | Self::Auth(
                AuthError::InvalidApiKey
                | AuthError::ExpiredApiKey
                | AuthError::DisabledApiKey
                | AuthError::InvalidToken
                | AuthError::StaleToken,
            ) => StatusCode::UNAUTHORIZED,
            Self::Auth(AuthError::InsufficientPermissions) | Self::CorsRefused(_) => {
                StatusCode::FORBIDDEN
            }
            Self::RateLimited { .. } | Self::AuthThrottled { .. } | Self::QuotaExhausted { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Auth(AuthError::StoreUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooManyFields => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    /// The stable machine-readable code of SPEC §3.6.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingCredentials => "missing_credentials",
            Self::Auth(AuthError::InvalidApiKey) => "invalid_api_key",
            Self::Auth(AuthError::ExpiredApiKey) => "expired_api_key",
            Self::Auth(AuthError::DisabledApiKey) => "disabled_api_key",
            Self::Auth(AuthError::InvalidToken | AuthError::StaleToken) => "invalid_token",
            Self::Auth(AuthError::InsufficientPermissions) => "insufficient_permissions",
            Self::RateLimited { .. } | Self::AuthThrottled { .. } => "rate_limited",
            Self::QuotaExhausted { .. } => "quota_exhausted",
            Self::BadRequest(_) => "bad_request",
            Self::RouteNotFound => "route_not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::BodyTimeout => "request_timeout",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::Auth(AuthError::StoreUnavailable) => "store_unavailable",
            Self::CorsRefused(_) => "cors_refused",
            Self::TooManyFields => "header_fields_too_large",
        }
    }

    fn detail(&self) -> &'static str {
        match self {
            Self::MissingCredentials => {
                "send an API key in Authorization: Bearer, X-API-Key or Basic auth"
            }
            Self::Auth(AuthError::InvalidApiKey) => "the API key is not valid",
            Self::Auth(AuthError::ExpiredApiKey) => "the API key has expired",
            Self::Auth(AuthError::DisabledApiKey) => "the API key is disabled",
            Self::Auth(AuthError::InvalidToken | AuthError::StaleToken) => "the token is not valid",
            Self::Auth(AuthError::InsufficientPermissions) => {
                "the key lacks a permission this route requires"
            }
            Self::RateLimited { .. } => "rate limit exceeded; retry after the Retry-After delay",
            Self::QuotaExhausted { .. } => {
                "the key's credits or the plan's quota are used up; nothing was forwarded"
            }
            Self::AuthThrottled { .. } => {
                "too many failed authentications from this address; retry later"
            }
            Self::BadRequest(why) => why,
            Self::RouteNotFound => "no route matches this path",
            Self::MethodNotAllowed(_) => "this path does not answer this method; see Allow",
            Self::BodyTimeout => "the request body stopped arriving; send it again",
            Self::UpstreamUnavailable => "the upstream could not be reached",
            Self::UpstreamTimeout => "the upstream did not answer in time",
            Self::Auth(AuthError::StoreUnavailable) => "the key store is unavailable; retry later",
            Self::CorsRefused(why) => why,
            Self::TooManyFields => "the request has more header fields than the gateway takes",
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::AuthThrottled { retry_after } => {
                Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
            }
            Self::Auth(AuthError::StoreUnavailable) => Some(STORE_RETRY_AFTER_SECS),
            Self::QuotaExhausted { retry_after, .. } => {
                retry_after.map(|d| d.as_secs_f64().ceil().max(1.0) as u64)
            }
            _ => None,
        }
    }

    /// The problem+json response for this error.
    pub fn response<B: From<Bytes>>(&self) -> Response<B> {
        let status = self.status();
        let body = serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.detail(),
            "code": self.code(),
        });
        let mut res = Response::new(B::from(Bytes::from(body.to_string())));
        *res.status_mut() = status;
        let h = res.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            h.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static(match self {
                    Self::MissingCredentials => "Bearer realm=\"keygate\"",
                    _ => "Bearer realm=\"keygate\", error=\"invalid_token\"",
                }),
            );
        }
        if let Self::MethodNotAllowed(allow) = self {
            h.insert(http::header::ALLOW, allow.clone());
        }
        if let Self::QuotaExhausted { credits, quota, .. } = self {
            if let Some(n) = credits {
                h.insert(KEYGATE_CREDITS_REMAINING, number(*n));
            }
            if let Some(n) = quota {
                h.insert(KEYGATE_QUOTA_REMAINING, number(*n));
            }
        }
        if let Some(secs) = self.retry_after() {
            h.insert(RETRY_AFTER, number(secs));
            if let Self::RateLimited {
                limit, full_after, ..
            } = self
            {
                h.insert(RATELIMIT_LIMIT, number(u64::from(*limit)));
                h.insert(RATELIMIT_REMAINING, number(0));
                // Seconds until the bucket is full again, as on every other answer (rounded up).
                let full = full_after.as_nanos().div_ceil(1_000_000_000) as u64;
                h.insert(RATELIMIT_RESET, number(full.max(secs)));
            }
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(number(0), "0");
        assert_eq!(number(4095), "4095");
        assert_eq!(number(4096), "4096");
        assert_eq!(number(100_000), "100000");
        assert_eq!(number(u64::MAX), u64::MAX.to_string().as_str());
    }

    #[test]
    fn statuses_and_headers() {
        let r: Response<Bytes> = ProxyError::Auth(AuthError::InvalidApiKey).response();
        assert_eq!(r.status(), 401);
        assert!(r.headers().contains_key(WWW_AUTHENTICATE));
        assert_eq!(r.headers()[CONTENT_TYPE], "application/problem+json");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["code"], "invalid_api_key");
        assert_eq!(v["status"], 401);

        let r: Response<Bytes> = ProxyError::Auth(AuthError::StoreUnavailable).response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[RETRY_AFTER], "5");

        let r: Response<Bytes> = ProxyError::RateLimited {
            retry_after: Duration::from_millis(1200),
            full_after: Duration::from_millis(6100),
            limit: 5,
        }
        .response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "2");
        assert_eq!(r.headers()[RATELIMIT_LIMIT], "5");
        assert_eq!(r.headers()[RATELIMIT_REMAINING], "0");
        assert_eq!(r.headers()[RATELIMIT_RESET], "7");
        assert_eq!(ProxyError::UpstreamTimeout.status(), 504);
        assert_eq!(ProxyError::UpstreamUnavailable.status(), 502);
    }
}
