//! Header sanitising: after retain_forwarded no hop-by-hop field, no field named in Connection,
//! no x-keygate-* or underscored name survives, and Trailer declares none of them.
#![no_main]
use keygate::proxy::headers::retain_forwarded;
use keygate::proxy::policy::{FieldRules, Strip};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

fuzz_target!(|data: &[u8]| {
    let (mut h, _) = common::headers(data);
    let named: Vec<String> = h
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    retain_forwarded(&mut h, Strip::NOTHING, &FieldRules::default());
    for k in h.keys() {
        let k = k.as_str();
        assert!(!HOP_BY_HOP.contains(&k), "{k} survived");
        assert!(
            !k.starts_with("x-keygate-") && !k.contains('_'),
            "{k} survived"
        );
        assert!(
            !named.iter().any(|n| n == k),
            "{k} named in Connection survived"
        );
    }
    for v in h.get_all("trailer") {
        for t in v.to_str().unwrap_or("").split(',') {
            let t = t.trim().to_ascii_lowercase();
            assert!(
                !t.starts_with("x-keygate-") && !t.contains('_'),
                "Trailer declares {t}"
            );
        }
    }
});
