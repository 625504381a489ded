//! Jwt::verify on arbitrary tokens: never panics, and never accepts one (the fuzzer does not
//! know the secret, so any acceptance is a forgery).
#![no_main]
use std::sync::OnceLock;
use std::time::Duration;

use keygate::auth::jwt::{Jwt, JwtSettings};
use keygate::keys::Secret;
use libfuzzer_sys::fuzz_target;

fn jwt() -> &'static Jwt {
    static J: OnceLock<Jwt> = OnceLock::new();
    J.get_or_init(|| {
        Jwt::new(&JwtSettings {
            secret: Secret("fuzz-secret-0123456789abcdef0123456789".into()),
            issuer: "keygate".into(),
            audience: Some("api".into()),
            ttl: Duration::from_secs(900),
            leeway: Duration::from_secs(30),
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    assert!(
        jwt().verify(token, 1_800_000_000_000).is_err(),
        "forged token accepted"
    );
});
