//! `cors` tables, in `[proxy]` and in `[[routes]]`: every refusal says what browsers would do
//! with the setting and what to write instead.

use std::sync::Arc;

use http::{HeaderName, Method};

use super::Problems;
use crate::config::RawCors;
use crate::cors::{
    Allowed, Cors, DEFAULT_MAX_AGE, DEFAULT_METHODS, MAX_MAX_AGE, OriginPattern, Settings,
};

/// Validates the `cors` table at `field`; `api_key_header` is allowed by default.
pub(super) fn cors(
    field: &str,
    raw: &RawCors,
    api_key_header: &HeaderName,
    p: &mut Problems,
) -> Option<Arc<Cors>> {
    let errors = p.errors.len();
    let mut origins = Vec::new();
    for o in &raw.origins {
        match OriginPattern::parse(o) {
            Ok(pattern) => origins.push(pattern),
            Err(why) => p.error(format!("{field}.origins: {o:?}: {why}")),
        }
    }
    let any = origins.contains(&OriginPattern::Any);
    if any && raw.credentials {
        p.error(format!(
            "{field}: origins = [\"*\"] with credentials = true: browsers refuse `Access-Control-Allow-Origin: *` on credentialed requests, and answering every origin with itself instead would let any web site read answers made with its visitors' credentials; list the origins that may call"
        ));
    }
    if any && origins.len() > 1 {
        p.error(format!(
            "{field}.origins: \"*\" allows every origin; list no other origin beside it"
        ));
    }
    let methods = match &raw.methods {
        None => Allowed::List(
            DEFAULT_METHODS
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()).expect("a method"))
                .collect(),
        ),
        Some(list) if list.iter().any(|m| m == "*") => {
            if list.len() > 1 {
                p.error(format!(
                    "{field}.methods: \"*\" allows every method; list no other beside it"
                ));
            }
            Allowed::Any
        }
        Some(list) => Allowed::List(
            list.iter()
                .filter_map(|m| {
                    let upper = m.to_ascii_uppercase();
                    let parsed = Method::from_bytes(upper.as_bytes()).ok();
                    if parsed.is_none() || m.is_empty() {
                        p.error(format!("{field}.methods: {m:?} is not an HTTP method"));
                    }
                    parsed
                })
                .collect(),
        ),
    };
    let names = |what: &str, list: &[String], p: &mut Problems| -> Vec<HeaderName> {
        list.iter()
            .filter_map(|h| {
                let name = HeaderName::from_bytes(h.as_bytes()).ok();
                if name.is_none() {
                    p.error(format!(
                        "{field}.{what}: {h:?} is not a header field name (e.g. \"x-request-id\")"
                    ));
                }
                name
            })
            .collect()
    };
    let headers = match &raw.headers {
        None => Allowed::List(vec![
            http::header::AUTHORIZATION,
            http::header::CONTENT_TYPE,
            api_key_header.clone(),
        ]),
        Some(list) if list.iter().any(|h| h == "*") => {
            if list.len() > 1 {
                p.error(format!(
                    "{field}.headers: \"*\" allows every request field; list no other beside it"
                ));
            }
            Allowed::Any
        }
        Some(list) => Allowed::List(names("headers", list, p)),
    };
    let expose_headers = names("expose_headers", &raw.expose_headers, p);
    let max_age = raw.max_age.unwrap_or(DEFAULT_MAX_AGE);
    if max_age > MAX_MAX_AGE {
        p.error(format!(
            "{field}.max_age: {max_age} is out of range: 0 to {MAX_MAX_AGE} seconds (browsers cap it at one day or less)"
        ));
    }
    (p.errors.len() == errors).then(|| {
        Arc::new(Cors::new(&Settings {
            origins,
            methods,
            headers,
            expose_headers,
            max_age,
            credentials: raw.credentials,
        }))
    })
}
