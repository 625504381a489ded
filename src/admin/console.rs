//! `/console`: the web console, plain HTML, CSS and JavaScript modules embedded in the binary
//! (nothing built by Node, nothing fetched from elsewhere). It speaks only the public admin
//! API, from the browser, with the key the operator types in: that key lives in a JavaScript
//! variable of the tab (never a cookie, never local or session storage) and is gone on
//! reload. The pages are public (they hold no data); every call they make needs the key.
//!
//! Every answer carries a strict Content-Security-Policy (scripts, styles and connections
//! from this origin only, no inline code, no framing, no forms posting elsewhere), and the
//! script writes every value with `textContent`, never as HTML. The three files are in the
//! OpenAPI document like every admin route (tag `console`), without security.

use axum::response::{IntoResponse, Response};
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderName, HeaderValue};

const INDEX: &str = include_str!("console/index.html");
const CSS: &str = include_str!("console/console.css");
const JS: &str = include_str!("console/console.js");

/// The policy of every console answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            HeaderName::from_static("content-security-policy"),
            HeaderValue::from_static(CSP),
        ),
        (
            HeaderName::from_static("x-content-type-options"),
            HeaderValue::from_static("nosniff"),
        ),
        (
            HeaderName::from_static("referrer-policy"),
            HeaderValue::from_static("no-referrer"),
        ),
        (
            HeaderName::from_static("x-frame-options"),
            HeaderValue::from_static("DENY"),
        ),
        (CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    (headers, body).into_response()
}

/// The console page.
#[utoipa::path(get, path = "/console", operation_id = "console", tag = "console", security(()),
    responses((status = 200, description = "The web console (HTML)", content_type = "text/html")))]
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

/// The console's style sheet.
#[utoipa::path(get, path = "/console/console.css", operation_id = "console_css", tag = "console", security(()),
    responses((status = 200, description = "CSS", content_type = "text/css")))]
pub async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

/// The console's script (a JavaScript module).
#[utoipa::path(get, path = "/console/console.js", operation_id = "console_js", tag = "console", security(()),
    responses((status = 200, description = "JavaScript module", content_type = "text/javascript")))]
pub async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}
