//! `[identity]`: the signed assertion keygate adds to every forwarded request and every
//! forward-auth allow (see [`crate::identity`]), and `[[routes]] audience`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::identity::IdentityConfig;
use crate::identity::material::{Alg, Material};

fn d_ttl() -> u64 {
    60
}
fn d_issuer() -> String {
    "keygate".into()
}
fn d_publish_ahead() -> u64 {
    3600
}
fn d_overlap() -> u64 {
    7 * 24 * 3600
}

/// Longest assertion lifetime accepted: an assertion is a bearer credential for the upstream.
pub const MAX_TTL_SECS: u64 = 3600;
/// Shortest assertion lifetime. `iat` and `exp` are whole seconds (`exp = iat + ttl`, `iat`
/// rounded down), so an assertion signed late in a second lives up to a second less than
/// `ttl_secs`: with 1 s it could reach the upstream expired, and its refresh point (a quarter of
/// the lifetime before `exp`) could already be past, signing anew on every request.
pub const MIN_TTL_SECS: u64 = 5;
/// The longest `publish_ahead_secs`: 30 days.
pub const MAX_PUBLISH_AHEAD_SECS: u64 = 30 * 86_400;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    /// Add `X-Keygate-Assertion` (off by default).
    #[serde(default)]
    pub sign: bool,
    #[serde(default)]
    pub algorithm: Alg,
    #[serde(default = "d_ttl")]
    pub ttl_secs: u64,
    #[serde(default = "d_issuer")]
    pub issuer: String,
    #[serde(default = "d_publish_ahead")]
    pub publish_ahead_secs: u64,
    #[serde(default = "d_overlap")]
    pub overlap_secs: u64,
    /// A PEM private key managed by the operator instead of keys kept in the store.
    pub signing_key_file: Option<PathBuf>,
}

impl Default for RawIdentity {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

/// Checks `[identity]`; each problem is pushed to `errors` naming the field and the fix.
pub fn validate(raw: RawIdentity, errors: &mut Vec<String>) -> IdentityConfig {
    if raw.ttl_secs < MIN_TTL_SECS || raw.ttl_secs > MAX_TTL_SECS {
        errors.push(format!(
            "identity.ttl_secs: {} must be between {MIN_TTL_SECS} and {MAX_TTL_SECS} (an assertion is a short-lived credential, with whole-second times)",
            raw.ttl_secs
        ));
    }
    if raw.issuer.is_empty() || raw.issuer.chars().any(char::is_control) {
        errors
            .push("identity.issuer: must be a non-empty string without control characters".into());
    }
    // 0 would sign with a new key before the other instances (which read the set every
    // publish_ahead / 4, at least 250 ms) publish it; a huge value would never let it sign.
    if raw.publish_ahead_secs == 0 || raw.publish_ahead_secs > MAX_PUBLISH_AHEAD_SECS {
        errors.push(format!(
            "identity.publish_ahead_secs: {} must be between 1 and {MAX_PUBLISH_AHEAD_SECS} (30 days): a new key is published this long before it signs",
            raw.publish_ahead_secs
        ));
    }
    if raw.overlap_secs < raw.ttl_secs {
        errors.push(format!(
            "identity.overlap_secs: {} is shorter than ttl_secs ({}): assertions signed just before a rotation would stop verifying before they expire",
            raw.overlap_secs, raw.ttl_secs
        ));
    }
    if let Some(path) = &raw.signing_key_file {
        match std::fs::read_to_string(path) {
            Err(e) => errors.push(format!(
                "identity.signing_key_file: {} cannot be read: {e}",
                path.display()
            )),
            Ok(text) => match Material::from_pem(&text) {
                Err(why) => errors.push(format!(
                    "identity.signing_key_file: {}: {why}; e.g. `openssl genpkey -algorithm ed25519 -out signing.pem`",
                    path.display()
                )),
                Ok(m) if m.alg != raw.algorithm => errors.push(format!(
                    "identity.signing_key_file: {} holds a key for {}, but identity.algorithm is {}; make them agree",
                    path.display(),
                    m.alg.name(),
                    raw.algorithm.name()
                )),
                Ok(_) => {}
            },
        }
    }
    IdentityConfig {
        sign: raw.sign,
        algorithm: raw.algorithm,
        ttl: Duration::from_secs(raw.ttl_secs),
        issuer: raw.issuer,
        publish_ahead: Duration::from_secs(raw.publish_ahead_secs),
        overlap: Duration::from_secs(raw.overlap_secs),
        signing_key_file: raw.signing_key_file,
    }
}

/// Checks `routes[i].audience`.
pub fn check_audience(field: &str, audience: Option<&str>, errors: &mut Vec<String>) {
    if let Some(a) = audience
        && (a.is_empty() || a.chars().any(char::is_control))
    {
        errors.push(format!(
            "{field}.audience: must be a non-empty string without control characters"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let mut errors = Vec::new();
        let c = validate(RawIdentity::default(), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(!c.sign);
        assert_eq!(c.algorithm, Alg::EdDSA);
        assert_eq!(c.ttl, Duration::from_secs(60));
        assert_eq!(c.issuer, "keygate");
        assert_eq!(c.publish_ahead, Duration::from_secs(3600));
        assert_eq!(c.overlap, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.signing_key_file, None);
        let raw: RawIdentity = toml::from_str("algorithm = \"ES256\"\nsign = true").unwrap();
        assert_eq!(validate(raw, &mut errors).algorithm, Alg::ES256);
        assert!(toml::from_str::<RawIdentity>("algorithm = \"HS256\"").is_err());
        assert!(toml::from_str::<RawIdentity>("signe = true").is_err());
    }

    #[test]
    fn publish_ahead_is_bounded() {
        for (text, ok) in [
            ("publish_ahead_secs = 0", false),
            ("publish_ahead_secs = 1", true),
            ("publish_ahead_secs = 2592000", true),
            ("publish_ahead_secs = 2592001", false),
            ("publish_ahead_secs = 18446744073709551615", false),
        ] {
            let mut errors = Vec::new();
            validate(toml::from_str(text).unwrap(), &mut errors);
            assert_eq!(errors.is_empty(), ok, "{text}: {errors:?}");
            if !ok {
                assert!(
                    errors[0].starts_with("identity.publish_ahead_secs: "),
                    "{errors:?}"
                );
            }
        }
    }

    #[test]
    fn audiences_default_to_the_upstream_origin_as_configured() {
        let up: http::Uri = "http://127.0.0.1:9000/base".parse().unwrap();
        assert_eq!(
            crate::identity::audience(None, &up),
            "http://127.0.0.1:9000"
        );
        let up: http::Uri = "https://api.internal".parse().unwrap();
        assert_eq!(crate::identity::audience(None, &up), "https://api.internal");
        assert_eq!(crate::identity::audience(Some("urn:x"), &up), "urn:x");
        let mut errors = Vec::new();
        check_audience("routes[0]", Some(""), &mut errors);
        check_audience("routes[1]", Some("ok"), &mut errors);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("routes[0].audience"));
    }
}
