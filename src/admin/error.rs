//! Admin errors: one enum, one `IntoResponse`, problem+json bodies. Internal detail (store
//! errors) is logged, never shown.

use axum::extract::FromRequest;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::{IntoResponses, ToSchema};

use crate::keys::store::StoreError;

/// A field that failed its check.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An error body: RFC 9457 problem details with a stable `code`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub code: String,
    pub detail: String,
    /// Present on 422: each field that failed and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

/// The error answers every protected admin call may give.
#[allow(dead_code)]
#[derive(IntoResponses)]
pub enum ErrorResponses {
    /// Malformed JSON or request.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// Missing or wrong credentials.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// The caller may not make this call.
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// No such resource (or not the caller's).
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// Conflicts with existing state.
    #[response(status = 409, content_type = "application/problem+json")]
    Conflict(Problem),
    /// The request body did not arrive in time (the connection is closed).
    #[response(status = 408, content_type = "application/problem+json")]
    RequestTimeout(Problem),
    /// Body too large.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(Problem),
    /// A field failed its check.
    #[response(status = 422, content_type = "application/problem+json")]
    Unprocessable(Problem),
    /// Too many failed authentications from this address.
    #[response(status = 429, content_type = "application/problem+json")]
    TooMany(Problem),
    /// The store is unavailable; nothing was changed.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

#[derive(Debug)]
pub enum AdminError {
    BadRequest(String),
    Unauthorized,
    /// `/auth/login` with a key that does not authenticate.
    InvalidApiKey,
    Forbidden(String),
    NotFound(&'static str),
    Conflict(String),
    Validation(Vec<FieldError>),
    /// The request body did not arrive whole within `limits.body_timeout_secs`.
    RequestTimeout,
    PayloadTooLarge,
    TooManyRequests {
        retry_after_secs: u64,
    },
    StoreUnavailable,
    /// Written on the Redis primary, not confirmed by its replicas (`redis_wait_replicas`).
    StoreUnconfirmed,
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(detail) => {
                tracing::error!(error = %detail, "store call failed");
                AdminError::StoreUnavailable
            }
            StoreError::Conflict(c) => AdminError::Conflict(c.to_string()),
            StoreError::NotFound => AdminError::NotFound("not found"),
            StoreError::Refused(c) => AdminError::Forbidden(c.to_string()),
            StoreError::Unconfirmed(detail) => {
                tracing::error!(error = %detail, "store write not confirmed by replicas");
                AdminError::StoreUnconfirmed
            }
        }
    }
}

impl AdminError {
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m.clone()),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid admin key is required (X-ADMIN-KEY or Authorization: Bearer)".into(),
            ),
            Self::InvalidApiKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "the API key is not valid".into(),
            ),
            Self::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m.clone()),
            Self::NotFound(what) => (StatusCode::NOT_FOUND, "not_found", (*what).into()),
            Self::Conflict(m) => (StatusCode::CONFLICT, "conflict", m.clone()),
            Self::Validation(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                "one or more fields are invalid".into(),
            ),
            Self::RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time; send it again".into(),
            ),
            Self::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is too large".into(),
            ),
            Self::TooManyRequests { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many failed authentications from this address; retry later".into(),
            ),
            Self::StoreUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the key store is unavailable; nothing was changed; retry later".into(),
            ),
            Self::StoreUnconfirmed => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the change was made but its replicas did not confirm it in time; a failover may \
                 lose it: read it back before retrying"
                    .into(),
            ),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, code, detail) = self.parts();
        let body = Problem {
            type_: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            code: code.into(),
            detail,
            errors: match &self {
                Self::Validation(errors) => Some(errors.clone()),
                _ => None,
            },
        };
        let body = serde_json::to_string(&body).expect("serializable");
        let mut res = (status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match self {
            Self::Unauthorized | Self::InvalidApiKey => {
                h.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keygate-admin\""),
                );
            }
            Self::TooManyRequests { retry_after_secs } => {
                h.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            Self::StoreUnavailable | Self::StoreUnconfirmed => {
                h.insert(RETRY_AFTER, HeaderValue::from_static("5"));
            }
            // The rest of the body may still come: the connection is not reused.
            Self::RequestTimeout => {
                h.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        res
    }
}

/// The error of an admin request body that did not arrive whole within
/// `limits.body_timeout_secs` of its head (see `admin::service`).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimedOut;

/// True when `e` (or an error it wraps) is [`BodyTimedOut`].
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| e.is::<BodyTimedOut>())
}

/// A JSON body: malformed JSON → 400; a value that does not fit `T` → 422 naming the field;
/// a body that does not arrive in time → 408. An empty body, or `null` (what an optional body
/// looks like in the OpenAPI document), is read as `{}`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = AdminError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if timed_out(&e) {
                AdminError::RequestTimeout
            } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AdminError::PayloadTooLarge
            } else {
                AdminError::BadRequest("could not read the request body".into())
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AdminError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) || bytes.trim_ascii() == b"null"
    {
        b"{}"
    } else {
        bytes
    };
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| AdminError::BadRequest(format!("malformed JSON: {e}")))?;
    if !value.is_object() {
        return Err(AdminError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        let msg = e.into_inner().to_string();
        // serde reports a missing or unknown field at the parent; name it instead.
        let field = extract_field(&msg).unwrap_or(field);
        AdminError::Validation(vec![FieldError::new(field, msg)])
    })
}

fn extract_field(msg: &str) -> Option<String> {
    for lead in ["missing field `", "unknown field `", "duplicate field `"] {
        if let Some(rest) = msg.strip_prefix(lead) {
            return rest.split('`').next().map(str::to_owned);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        n: Option<u32>,
    }

    #[test]
    fn empty_and_null_bodies_read_as_an_empty_object() {
        for b in [&b""[..], b"  ", b"null", b" null\n"] {
            assert!(parse_json::<Body>(b).unwrap().n.is_none());
        }
        assert!(matches!(
            parse_json::<Body>(b"[]"),
            Err(AdminError::BadRequest(_))
        ));
        assert!(matches!(
            parse_json::<Body>(b"{"),
            Err(AdminError::BadRequest(_))
        ));
        assert!(matches!(
            parse_json::<Body>(b"{\"n\": -1}"),
            Err(AdminError::Validation(_))
        ));
    }
}
