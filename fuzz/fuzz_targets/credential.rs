//! Credential extraction from arbitrary headers and query strings: never panics; a credential
//! found is non-empty and comes from where it says.
#![no_main]
use http::HeaderName;
use keygate::auth::credential::{Extractor, Kind, Source};
use keygate::keys::foreign::MAX_FOREIGN_KEY_LEN;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (h, query) = common::headers(data);
    let ex = Extractor {
        api_key_header: HeaderName::from_static("x-api-key"),
        query_param: Some("api_key".into()),
    };
    let Some(c) = ex.extract(&h, query) else {
        return;
    };
    let secret = c.secret.as_str();
    assert!(!secret.is_empty());
    match c.source {
        Source::Bearer => assert!(h.contains_key("authorization")),
        Source::Basic => {
            assert!(h.contains_key("authorization"));
            assert!(secret.len() <= MAX_FOREIGN_KEY_LEN);
        }
        Source::Header => assert!(h.contains_key("x-api-key")),
        Source::Query => assert!(query.is_some_and(|q| q.contains(secret))),
    }
    if c.kind == Kind::Jwt {
        assert_eq!(secret.matches('.').count(), 2);
    }
});
