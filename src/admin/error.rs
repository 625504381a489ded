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
#[schema(examples(json!({"field": "name", "message": "must be 1–100 characters without control characters"})))]
pub struct FieldError {
    /// The field, as named in the request (a query parameter, or a body field's JSON path).
    pub field: String,
    /// Why it was refused.
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

/// The stable, machine-readable `code` of an error answer; each belongs to one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProblemCode {
    /// 400: malformed JSON, a body that is not an object, an unreadable body.
    BadRequest,
    /// 401: missing or wrong admin key or client credential.
    Unauthorized,
    /// 401 (`/auth/login`): the API key does not authenticate.
    InvalidApiKey,
    /// 403: the caller may not make this call.
    Forbidden,
    /// 404: no such resource, or not the caller's.
    NotFound,
    /// 409: conflicts with existing state.
    Conflict,
    /// 422: one or more fields failed their check (see `errors`).
    ValidationFailed,
    /// 408: the body did not arrive in time.
    RequestTimeout,
    /// 413: the body is larger than `limits.max_body_bytes`.
    PayloadTooLarge,
    /// 429: too many failed authentications from this address.
    RateLimited,
    /// 503: the store is unavailable; nothing was changed.
    StoreUnavailable,
    /// 421: the request's `Host` is not one the admin listener answers.
    MisdirectedRequest,
}

/// An error body: RFC 9457 problem details with a stable `code`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({
    "type": "about:blank",
    "title": "Unprocessable Entity",
    "status": 422,
    "code": "validation_failed",
    "detail": "one or more fields are invalid",
    "errors": [{"field": "name", "message": "must be 1–100 characters without control characters"}]
})))]
pub struct Problem {
    /// Always `about:blank`: `code` says what happened.
    #[serde(rename = "type")]
    #[schema(examples("about:blank"))]
    pub type_: String,
    /// The status's reason phrase.
    pub title: String,
    /// The HTTP status of the answer.
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    pub code: ProblemCode,
    /// What went wrong, for a person.
    pub detail: String,
    /// Present on 422: each field that failed and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Vec<FieldError>)]
    pub errors: Option<Vec<FieldError>>,
}

/// The error answers every admin call may give, each a problem+json body whose `code` is
/// the one (or, for 401, one of the two) named in its description.
#[allow(dead_code)]
#[derive(IntoResponses)]
pub enum ErrorResponses {
    /// `bad_request`: malformed JSON, a body that is not a JSON object, or an unreadable body.
    #[response(status = 400, content_type = "application/problem+json",
        example = json!({"type": "about:blank", "title": "Bad Request", "status": 400, "code": "bad_request", "detail": "malformed JSON: EOF while parsing an object at line 1 column 1"}))]
    BadRequest(Problem),
    /// `unauthorized`: missing or wrong admin key or client credential; `invalid_api_key`:
    /// the API key given to `/auth/login` does not authenticate.
    #[response(status = 401, content_type = "application/problem+json",
        headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"keygate-admin\"`")),
        example = json!({"type": "about:blank", "title": "Unauthorized", "status": 401, "code": "unauthorized", "detail": "a valid admin key is required (X-ADMIN-KEY or Authorization: Bearer)"}))]
    Unauthorized(Problem),
    /// `forbidden`: the caller may not make this call (a client principal calling an
    /// admin-only operation, granting permissions it does not hold, setting a rate limit, or
    /// loosening a constraint an admin set).
    #[response(status = 403, content_type = "application/problem+json",
        example = json!({"type": "about:blank", "title": "Forbidden", "status": 403, "code": "forbidden", "detail": "this call needs an admin key"}))]
    Forbidden(Problem),
    /// `not_found`: no such resource, or not the caller's.
    #[response(status = 404, content_type = "application/problem+json",
        example = json!({"type": "about:blank", "title": "Not Found", "status": 404, "code": "not_found", "detail": "no API key with this id"}))]
    NotFound(Problem),
    /// `request_timeout`: the request body did not arrive in time (the connection is closed).
    #[response(status = 408, content_type = "application/problem+json",
        example = json!({"type": "about:blank", "title": "Request Timeout", "status": 408, "code": "request_timeout", "detail": "the request body did not arrive in time; send it again"}))]
    RequestTimeout(Problem),
    /// `conflict`: conflicts with existing state (the client exists, the client has as many
    /// keys as allowed).
    #[response(status = 409, content_type = "application/problem+json",
        example = json!({"type": "about:blank", "title": "Conflict", "status": 409, "code": "conflict", "detail": "a client with this client_id already exists"}))]
    Conflict(Problem),
    /// `misdirected_request`: the request's `Host` is not `localhost`, an IP address or a
    /// name of `[admin] allowed_hosts` (checked on a loopback admin listener, or whenever
    /// `allowed_hosts` is set); nothing was read or changed.
    #[response(status = 421, content_type = "application/problem+json",
        example = json!({"type": "about:blank", "title": "Misdirected Request", "status": 421, "code": "misdirected_request", "detail": "this admin listener answers requests for localhost, an IP address or a name of [admin] allowed_hosts only"}))]
    Misdirected(Problem),
    /// `payload_too_large`: the body is larger than `limits.max_body_bytes`.
    #[response(status = 413, content_type = "application/problem+json",
        example = json!({"type": "about:blank", "title": "Payload Too Large", "status": 413, "code": "payload_too_large", "detail": "the request body is too large"}))]
    TooLarge(Problem),
    /// `validation_failed`: one or more fields failed their check; `errors` names each.
    #[response(status = 422, content_type = "application/problem+json",
        example = json!({"type": "about:blank", "title": "Unprocessable Entity", "status": 422, "code": "validation_failed", "detail": "one or more fields are invalid", "errors": [{"field": "name", "message": "must be 1–100 characters without control characters"}]}))]
    Unprocessable(Problem),
    /// `rate_limited`: too many failed authentications from this address.
    #[response(status = 429, content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait")),
        example = json!({"type": "about:blank", "title": "Too Many Requests", "status": 429, "code": "rate_limited", "detail": "too many failed authentications from this address; retry later"}))]
    TooMany(Problem),
    /// `store_unavailable`: the store is unavailable and nothing was changed; or, with
    /// `[store] redis_wait_replicas`, the change was made but its replicas did not confirm it;
    /// or it failed partway through a change of several writes (an atomic import that could
    /// not be undone, a key's credits after its other attributes) and part of it may stand
    /// (the `detail` says which).
    #[response(status = 503, content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait")),
        example = json!({"type": "about:blank", "title": "Service Unavailable", "status": 503, "code": "store_unavailable", "detail": "the key store is unavailable; nothing was changed; retry later"}))]
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
    /// The store failed partway through a change of several writes that could not all be
    /// undone (an atomic import on Redis; a key's credits after its other attributes, or after
    /// the key whose deletion then failed).
    StoreIncomplete,
    /// The request's `Host` is not one this listener answers (`[admin] allowed_hosts`).
    MisdirectedHost,
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
            StoreError::Incomplete(detail) => {
                tracing::error!(error = %detail, "store failed partway through a change");
                AdminError::StoreIncomplete
            }
        }
    }
}

impl AdminError {
    fn parts(&self) -> (StatusCode, ProblemCode, String) {
        match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, ProblemCode::BadRequest, m.clone()),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                ProblemCode::Unauthorized,
                "a valid admin key is required (X-ADMIN-KEY or Authorization: Bearer)".into(),
            ),
            Self::InvalidApiKey => (
                StatusCode::UNAUTHORIZED,
                ProblemCode::InvalidApiKey,
                "the API key is not valid".into(),
            ),
            Self::Forbidden(m) => (StatusCode::FORBIDDEN, ProblemCode::Forbidden, m.clone()),
            Self::NotFound(what) => (StatusCode::NOT_FOUND, ProblemCode::NotFound, (*what).into()),
            Self::Conflict(m) => (StatusCode::CONFLICT, ProblemCode::Conflict, m.clone()),
            Self::Validation(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ProblemCode::ValidationFailed,
                "one or more fields are invalid".into(),
            ),
            Self::RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                ProblemCode::RequestTimeout,
                "the request body did not arrive in time; send it again".into(),
            ),
            Self::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ProblemCode::PayloadTooLarge,
                "the request body is too large".into(),
            ),
            Self::TooManyRequests { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                ProblemCode::RateLimited,
                "too many failed authentications from this address; retry later".into(),
            ),
            Self::StoreUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                ProblemCode::StoreUnavailable,
                "the key store is unavailable; nothing was changed; retry later".into(),
            ),
            Self::StoreUnconfirmed => (
                StatusCode::SERVICE_UNAVAILABLE,
                ProblemCode::StoreUnavailable,
                "the change was made but its replicas did not confirm it in time; a failover may \
                 lose it: read it back before retrying"
                    .into(),
            ),
            Self::StoreIncomplete => (
                StatusCode::SERVICE_UNAVAILABLE,
                ProblemCode::StoreUnavailable,
                "the key store failed partway and part of the change may stand: read it back \
                 before retrying"
                    .into(),
            ),
            Self::MisdirectedHost => (
                StatusCode::MISDIRECTED_REQUEST,
                ProblemCode::MisdirectedRequest,
                "this admin listener answers requests for localhost, an IP address or a name \
                 of [admin] allowed_hosts only"
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
            code,
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
            Self::StoreUnavailable | Self::StoreUnconfirmed | Self::StoreIncomplete => {
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

/// Query parameters: a query string that does not fit `T` (a parameter given twice) → 400
/// problem+json, like every other admin error.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| AdminError::BadRequest(without_variant(&e.body_text())))
    }
}

/// Path parameters: one that does not fit `T` (not UTF-8 once percent-decoded) → 400
/// problem+json, like every other admin error (axum's own answer was plain text). The message
/// names no value: a path parameter may be anything a caller typed.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> axum::extract::FromRequestParts<S> for Path<T> {
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|_| {
                AdminError::BadRequest(
                    "a path parameter is not valid (percent-decoded, it must be UTF-8)".into(),
                )
            })
    }
}

/// JSON Schema's `integer` includes numbers written with a zero fraction (`3600.0`): such
/// numbers are read as the integer they are, everywhere but inside free-form `metadata`
/// (stored as sent).
fn whole_numbers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64())
                && f.fract() == 0.0
                && f.abs() < 9.0e15
            {
                *v = serde_json::Value::from(f as i64);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(whole_numbers),
        serde_json::Value::Object(m) => m
            .iter_mut()
            .filter(|(k, _)| k.as_str() != "metadata")
            .for_each(|(_, v)| whole_numbers(v)),
        _ => {}
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AdminError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) || bytes.trim_ascii() == b"null"
    {
        b"{}"
    } else {
        bytes
    };
    let mut value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| AdminError::BadRequest(format!("malformed JSON: {e}")))?;
    if !value.is_object() {
        return Err(AdminError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    whole_numbers(&mut value);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        // Without the string values serde quotes: a secret sent in the wrong field (a key as
        // `enabled`) is not echoed back.
        let mut msg = without_variant(&crate::config::without_strings(&e.into_inner().to_string()));
        // serde reports a missing or unknown field at the parent; name it instead (an unknown
        // name only when it cannot be a secret: `foreign::shown`).
        let field = match extract_field(&msg) {
            Some(name) => {
                let shown = crate::keys::foreign::shown(&name);
                if shown != name {
                    msg = msg.replacen(&format!("`{name}`"), &shown, 1);
                }
                shown
            }
            None => field,
        };
        AdminError::Validation(vec![FieldError::new(field, msg)])
    })
}

/// `msg` without the unknown variant serde names (``unknown variant `…`, expected …``): in a
/// request it is whatever the caller sent, and a key sent as an enum value would come back in
/// the answer (and in the audit line of the refusal).
fn without_variant(msg: &str) -> String {
    const LEAD: &str = "unknown variant `";
    let Some(at) = msg.find(LEAD) else {
        return msg.to_owned();
    };
    let value = &msg[at + LEAD.len()..];
    // The value is written as sent (a backtick in it included): its end is the last of serde's
    // own continuations.
    let end = ["`, expected ", "`, there are no variants"]
        .iter()
        .filter_map(|t| value.rfind(t))
        .max();
    match end {
        Some(end) => format!("{}unknown variant{}", &msg[..at], &value[end + 1..]),
        None => format!("{}unknown variant", &msg[..at]),
    }
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
    fn an_unknown_variant_is_not_echoed() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(rename_all = "lowercase")]
        #[allow(dead_code)]
        enum Interval {
            Daily,
            Monthly,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct WithEnum {
            interval: Interval,
        }
        let secret = "kg_SeCrEt`, expected `x`0123456789abcdef";
        let body = serde_json::json!({ "interval": secret }).to_string();
        let Err(AdminError::Validation(errs)) = parse_json::<WithEnum>(body.as_bytes()) else {
            panic!("not a validation error");
        };
        let msg = &errs[0].message;
        assert!(
            !msg.contains("SeCrEt") && !msg.contains("0123456789"),
            "{msg}"
        );
        assert!(
            msg.starts_with("unknown variant, expected `daily` or `monthly`"),
            "{msg}"
        );
        assert_eq!(without_variant("no variant here"), "no variant here");
        assert_eq!(
            without_variant("unknown variant `kg_x`, there are no variants"),
            "unknown variant, there are no variants"
        );
        assert_eq!(without_variant("unknown variant `kg_x"), "unknown variant");
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

    #[test]
    fn numbers_with_a_zero_fraction_are_integers_but_metadata_is_kept_as_sent() {
        #[derive(Debug, serde::Deserialize)]
        struct Nested {
            n: u32,
            list: Vec<u64>,
            metadata: serde_json::Value,
        }
        let v: Nested =
            parse_json(br#"{"n": 3600.0, "list": [1.0, 2], "metadata": {"x": 1.0}}"#).unwrap();
        assert_eq!((v.n, v.list), (3600, vec![1, 2]));
        assert_eq!(v.metadata["x"].as_f64(), Some(1.0));
        assert!(v.metadata["x"].is_f64());
        assert!(matches!(
            parse_json::<Body>(br#"{"n": 1.5}"#),
            Err(AdminError::Validation(_))
        ));
    }
}

#[cfg(test)]
mod documented {
    use super::*;

    /// One of each error, so that a new variant must be added here (the match is exhaustive).
    fn one_of_each() -> Vec<AdminError> {
        let all = vec![
            AdminError::BadRequest("x".into()),
            AdminError::Unauthorized,
            AdminError::InvalidApiKey,
            AdminError::Forbidden("x".into()),
            AdminError::NotFound("x"),
            AdminError::Conflict("x".into()),
            AdminError::Validation(vec![FieldError::new("f", "m")]),
            AdminError::RequestTimeout,
            AdminError::PayloadTooLarge,
            AdminError::TooManyRequests {
                retry_after_secs: 1,
            },
            AdminError::StoreUnavailable,
            AdminError::StoreUnconfirmed,
            AdminError::StoreIncomplete,
            AdminError::MisdirectedHost,
        ];
        for e in &all {
            match e {
                AdminError::BadRequest(_)
                | AdminError::Unauthorized
                | AdminError::InvalidApiKey
                | AdminError::Forbidden(_)
                | AdminError::NotFound(_)
                | AdminError::Conflict(_)
                | AdminError::Validation(_)
                | AdminError::RequestTimeout
                | AdminError::PayloadTooLarge
                | AdminError::TooManyRequests { .. }
                | AdminError::StoreUnavailable
                | AdminError::StoreUnconfirmed
                | AdminError::StoreIncomplete
                | AdminError::MisdirectedHost => {}
            }
        }
        all
    }

    /// Every error the admin API answers is documented: its status is one of the error
    /// responses, whose description names its `code`.
    #[test]
    fn every_error_is_documented_with_its_status_and_code() {
        let documented = ErrorResponses::responses();
        for e in one_of_each() {
            let (status, code, _) = e.parts();
            let code = serde_json::to_value(code).unwrap();
            let code = code.as_str().unwrap();
            let response = documented
                .get(status.as_str())
                .unwrap_or_else(|| panic!("{status} is not documented"));
            let response = serde_json::to_value(response).unwrap();
            let description = response["description"].as_str().unwrap();
            assert!(
                description.contains(&format!("`{code}`")),
                "{status}: the description does not name `{code}`"
            );
            let example = &response["content"]["application/problem+json"]["example"];
            assert_eq!(example["status"], status.as_u16(), "{status}");
        }
    }
}
