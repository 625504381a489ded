//! Standard Webhooks signing (<https://www.standardwebhooks.com/>): each delivery carries
//! `webhook-id` (the event's id, the same on every attempt), `webhook-timestamp` (Unix seconds
//! of the attempt) and `webhook-signature` = `v1,` + base64 of HMAC-SHA256 over
//! `{id}.{timestamp}.{body}`, keyed with the base64-decoded part of the `whsec_` secret.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

pub const SECRET_PREFIX: &str = "whsec_";
/// Bytes of a generated signing key.
const SECRET_BYTES: usize = 32;
/// Accepted signing-key sizes (the specification asks for 24 to 64 bytes).
const SECRET_MIN: usize = 24;
const SECRET_MAX: usize = 64;

/// A new secret: `whsec_` + base64 of 32 random bytes.
pub fn new_secret() -> String {
    use rand::Rng;
    let key: [u8; SECRET_BYTES] = rand::rng().random();
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// The signing key of a `whsec_` secret, or why it is not one.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, &'static str> {
    let b64 = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or("must start with \"whsec_\"")?;
    let key = STANDARD
        .decode(b64)
        .map_err(|_| "must be \"whsec_\" followed by standard base64")?;
    if !(SECRET_MIN..=SECRET_MAX).contains(&key.len()) {
        return Err("must encode 24 to 64 bytes");
    }
    Ok(key)
}

/// The `webhook-signature` value of one attempt.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body.as_bytes());
    format!("v1,{}", STANDARD.encode(ctx.sign().as_ref()))
}

/// The `webhook-signature` value of one attempt signed with each of `keys` (the current
/// secret first, then one a rotation keeps signing for a while), space-separated as the
/// specification has it: a receiver accepts the delivery when any one verifies.
pub fn signatures(keys: &[Vec<u8>], id: &str, timestamp: i64, body: &str) -> String {
    let mut out = String::new();
    for key in keys {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&sign(key, id, timestamp, body));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                r#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_round_trip_and_bad_ones_are_refused() {
        let s = new_secret();
        assert_eq!(decode_secret(&s).unwrap().len(), 32);
        assert_ne!(s, new_secret());
        assert!(decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(decode_secret("whsec_not base64!").is_err());
        assert!(decode_secret("whsec_c2hvcnQ=").is_err());
    }
}
