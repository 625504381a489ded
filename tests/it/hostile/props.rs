//! Property tests of the pure checks: the key format, the path check, header sanitising.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use keygate::keys::KeyFormat;
use keygate::paths::check_path;
use keygate::proxy::headers::{add_identity, retain_forwarded};
use keygate::proxy::policy::{FieldRules, Strip};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(2000))]

    /// Generated keys always pass; every single-character substitution and every swap of two
    /// different adjacent characters fails.
    #[test]
    fn key_format_catches_every_typo(
        prefix in "[A-Za-z0-9_]{1,15}",
        pos in any::<prop::sample::Index>(),
        sub in prop::sample::select(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-.~ ".to_vec()),
    ) {
        let f = KeyFormat::new(prefix.clone());
        let key = f.generate().plaintext.0;
        prop_assert!(f.check(&key));
        prop_assert_eq!(key.len(), prefix.len() + 49);
        let b = key.as_bytes();
        let i = pos.index(b.len());
        if b[i] != sub {
            let mut m = b.to_vec();
            m[i] = sub;
            prop_assert!(!f.check(std::str::from_utf8(&m).unwrap()), "substitution at {} accepted", i);
        }
        let j = pos.index(b.len() - 1);
        if b[j] != b[j + 1] {
            let mut m = b.to_vec();
            m.swap(j, j + 1);
            prop_assert!(!f.check(std::str::from_utf8(&m).unwrap()), "swap at {} accepted", j);
        }
    }

    /// Arbitrary strings never pass by accident (and never panic).
    #[test]
    fn key_format_refuses_arbitrary_strings(s in "kg_[0-9A-Za-z]{49}|.{0,80}") {
        let f = KeyFormat::new("kg_");
        // 62^6 checksums over 2^32 values: a random body passes with probability ~2^-32.
        prop_assert!(!f.check(&s));
    }
}

fn hexval(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn pct_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hexval),
                b.get(i + 2).copied().and_then(hexval),
            )
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Paths built from the pieces that matter to the check.
fn path_strategy() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "/",
        "/",
        "/",
        "a",
        "b",
        "admin",
        ".",
        "..",
        "...",
        "%2e",
        "%2E",
        "%2f",
        "%2F",
        "%5c",
        "%25",
        "%252e",
        "%",
        "%4",
        "%41",
        "%61",
        "%7e",
        "~",
        "\\",
        ";",
        ";x",
        "%3b",
        "%20",
        " ",
        "%00",
        "%0a",
        "%7f",
        "%c0%ae",
        "%c0%af",
        "%ef%bc%8e",
        "%ef%bc%8f",
        "\u{ff0e}",
        "é",
        "%c3%a9",
        "%e2%80%a4",
        "%ff",
        "-",
        "_",
        "?",
        "#",
        "x.y",
    ]);
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config(20000))]

    /// What check_path accepts has no dot-segment, no empty segment, no encoded separator,
    /// nothing that decodes further, no segment ending in '.' or a space, and decodes to the
    /// same segments as its raw form (so matching the decoded path cannot move a boundary).
    #[test]
    fn accepted_paths_are_unambiguous(p in path_strategy()) {
        if check_path(&p, true).is_ok() {
            prop_assert!(p.starts_with('/'));
            let lower = p.to_ascii_lowercase();
            for enc in ["%2e", "%2f", "%5c", "%25", "%3b", "%00"] {
                prop_assert!(!lower.contains(enc), "{:?} holds {}", p, enc);
            }
            prop_assert!(!p.contains("//") && !p.contains('\\') && !p.contains(';'));
            let decoded = pct_decode(&p);
            let text = std::str::from_utf8(&decoded);
            prop_assert!(text.is_ok(), "{:?} decodes to invalid UTF-8", p);
            let text = text.unwrap();
            // Decoding is idempotent: nothing decodes a second time.
            prop_assert_eq!(pct_decode(text), decoded.clone());
            prop_assert_eq!(
                text.matches('/').count(),
                p.matches('/').count(),
                "decoding {:?} moved a separator", &p
            );
            let segs: Vec<&str> = text[1..].split('/').collect();
            for (i, s) in segs.iter().enumerate() {
                prop_assert!(*s != "." && *s != "..", "dot-segment in {:?}", p);
                prop_assert!(!s.is_empty() || i == segs.len() - 1, "empty segment in {:?}", p);
                prop_assert!(!s.ends_with('.') && !s.ends_with(' '), "segment {:?} of {:?}", s, p);
                prop_assert!(!s.chars().any(|c| c.is_control()));
                prop_assert!(!s.contains(['\u{ff0e}', '\u{ff0f}', '\u{2024}']), "look-alike in {:?}", p);
            }
            // The decoded form is itself acceptable (and would be read the same way).
            prop_assert!(check_path(text, true).is_ok(), "decoded {:?} refused", text);
        }
    }
}

/// Header names built from the fields that matter to sanitising.
fn name_strategy() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "close",
        "x-keygate-client-id",
        "x-keygate-key-id",
        "x-keygate-anything",
        "x_keygate_client_id",
        "transfer_encoding",
        "x_api_key",
        "trailer",
        "accept",
        "x-custom",
        "x-other",
        "content-type",
    ])
    .prop_map(str::to_owned)
}

fn value_strategy() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            name_strategy(),
            Just("close".to_owned()),
            Just(" ".to_owned())
        ],
        0..4,
    )
    .prop_map(|v| v.join(", "))
}

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

proptest! {
    #![proptest_config(config(5000))]

    /// After the inbound clean-up no hop-by-hop field, no field named in Connection, no
    /// `x-keygate-*` and no underscored name survives, `Trailer` declares none of them, other
    /// fields are kept, and the identity added afterwards is exactly ours.
    #[test]
    fn sanitised_headers_hold_no_hop_by_hop_or_identity_field(
        fields in prop::collection::vec((name_strategy(), value_strategy()), 0..16)
    ) {
        let mut h = HeaderMap::new();
        for (k, v) in &fields {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        let named: Vec<String> = h
            .get_all("connection")
            .iter()
            .flat_map(|v| v.to_str().unwrap().split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect();
        retain_forwarded(&mut h, Strip::NOTHING, &FieldRules::default());
        for k in h.keys() {
            let k = k.as_str();
            prop_assert!(!HOP_BY_HOP.contains(&k), "{} survived", k);
            prop_assert!(!k.starts_with("x-keygate-") && !k.contains('_'), "{} survived", k);
            prop_assert!(!named.iter().any(|n| n == k), "{} named in Connection survived", k);
        }
        for v in h.get_all("trailer") {
            for t in v.to_str().unwrap().split(',') {
                let t = t.trim();
                prop_assert!(!t.starts_with("x-keygate-") && !t.contains('_'), "Trailer declares {}", t);
            }
        }
        for (k, _) in &fields {
            let keep = ["accept", "x-custom", "x-other", "content-type"].contains(&k.as_str())
                && !named.contains(k);
            if keep {
                prop_assert!(h.contains_key(k.as_str()), "{} was removed", k);
            }
        }
        let id = keygate::keys::IdentityHeaders::new("acme", "k1", "A", "pro");
        add_identity(&mut h, &id);
        for (k, v) in [("x-keygate-client-id", "acme"), ("x-keygate-key-id", "k1")] {
            prop_assert_eq!(h.get_all(k).iter().count(), 1);
            prop_assert_eq!(&h[k], v);
        }
    }
}
