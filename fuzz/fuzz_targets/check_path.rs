//! check_path on arbitrary strings: never panics, and what it accepts is unambiguous: no
//! dot-segment, no empty segment, no encoded separator or '%', UTF-8 once decoded, and decoding
//! is idempotent and moves no separator.
#![no_main]
use keygate::paths::check_path;
use libfuzzer_sys::fuzz_target;

fn decode(b: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
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

fuzz_target!(|data: &[u8]| {
    let Ok(p) = std::str::from_utf8(data) else {
        return;
    };
    if check_path(p, true).is_err() {
        return;
    }
    assert!(p.starts_with('/'));
    let lower = p.to_ascii_lowercase();
    for enc in ["%2e", "%2f", "%5c", "%25", "%3b"] {
        assert!(!lower.contains(enc), "{p:?} holds {enc}");
    }
    assert!(!p.contains("//") && !p.contains('\\') && !p.contains(';'));
    let d = decode(p.as_bytes());
    let text = std::str::from_utf8(&d).expect("accepted paths decode to UTF-8");
    assert_eq!(decode(&d), d, "{p:?} decodes twice");
    assert_eq!(text.matches('/').count(), p.matches('/').count());
    let segs: Vec<&str> = text[1..].split('/').collect();
    for (i, s) in segs.iter().enumerate() {
        assert!(*s != "." && *s != "..", "dot-segment in {p:?}");
        assert!(
            !s.is_empty() || i == segs.len() - 1,
            "empty segment in {p:?}"
        );
        assert!(!s.ends_with(['.', ' ']), "segment {s:?} of {p:?}");
        assert!(!s.chars().any(char::is_control));
    }
    assert!(
        check_path(text, true).is_ok(),
        "decoded form of {p:?} refused"
    );
});
