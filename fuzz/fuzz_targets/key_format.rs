//! KeyFormat::check on arbitrary strings: never panics, and what passes has the documented
//! shape (prefix, 43 + 6 base62 characters).
#![no_main]
use keygate::keys::KeyFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for prefix in ["kg_", "kg_live_", "x"] {
        let f = KeyFormat::new(prefix);
        if f.check(s) {
            assert_eq!(s.len(), prefix.len() + 49);
            assert!(s.starts_with(prefix));
            assert!(s[prefix.len()..].bytes().all(|c| c.is_ascii_alphanumeric()));
        }
    }
});
